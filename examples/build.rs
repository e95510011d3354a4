//! Compiles the Greeter proto with protox (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile([root.join("greeter/v1/greeter.proto")], [&root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
