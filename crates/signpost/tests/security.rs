//! The README's "Securing Signpost" section, run as written: certificates and tokens made with
//! openssl, the server with TLS, mutual TLS, tokens and strict ownership, then the CLI.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use signpost_tests::process::{ServerProcess, readme_block, require_program, run};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

fn bash(dir: &Path, script: &str) -> (bool, String, String) {
    run(Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir))
}

#[test]
fn the_readme_secure_setup_serves_the_cli_over_mutual_tls_with_tokens() {
    if require_program("openssl").is_none() || require_program("sha256sum").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The setup block, keeping its tokens and its secrets' directory for the CLI block.
    let setup = format!(
        "{}\ndeclare -p PAYMENTS_TOKEN OPS_TOKEN GREETER_TOKEN dir > tokens.env",
        readme_block("secure-setup")
    );
    let (ok, out, err) = bash(dir.path(), &setup);
    assert!(ok, "setup failed\n{out}\n{err}");
    let (ok, secrets, err) = bash(dir.path(), "source tokens.env; printf %s \"$dir\"");
    assert!(ok, "{err}");
    let secrets = std::path::PathBuf::from(secrets);
    assert!(
        !secrets.starts_with(dir.path()),
        "the secrets are in a directory of their own, not where the setup ran"
    );

    let path = |name: &str| secrets.join(name).to_str().unwrap().to_owned();
    let tokens = secrets.join("tokens.toml");
    let server = ServerProcess::start(
        Path::new(EXE),
        &[
            "--store",
            "memory",
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
            "--tls-client-ca",
            &path("ca.pem"),
            "--auth-tokens",
            tokens.to_str().unwrap(),
            "--strict-ownership",
        ],
    );

    let cli = readme_block("secure-cli")
        .replace(
            "localhost:7070",
            &format!("localhost:{}", server.addr.port()),
        )
        .replace(" signpost ", &format!(" {EXE} "));
    let (ok, out, err) = bash(dir.path(), &format!("source tokens.env\n{cli}"));
    assert!(ok, "the CLI block failed\nstdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("registered api/127.0.0.1-8443"),
        "{out}\n{err}"
    );
    assert!(
        out.contains("127.0.0.1:8443  PASSING"),
        "ops can read: {out}"
    );
    assert!(
        err.contains("permission denied: token \"ops\" may not write namespace \"payments\""),
        "ops cannot write: {err}"
    );
    assert!(out.contains("refused"), "{out}");

    // Without a client certificate the handshake fails; without a token the call is refused.
    let (ok, _, err) = run(Command::new(EXE)
        .args(["ls", "api", "-n", "payments", "--registry"])
        .arg(format!("https://localhost:{}", server.addr.port()))
        .args(["--ca-cert", &path("ca.pem")])
        .current_dir(dir.path()));
    assert!(!ok, "a client without a certificate was served");
    assert!(err.starts_with("signpost: "), "{err}");
    let (ok, _, err) = run(Command::new(EXE)
        .args(["ls", "api", "-n", "payments", "--registry"])
        .arg(format!("https://localhost:{}", server.addr.port()))
        .args(["--ca-cert", &path("ca.pem")])
        .args(["--client-cert", &path("client.pem")])
        .args(["--client-key", &path("client.key")])
        .env_remove("SIGNPOST_TOKEN")
        .current_dir(dir.path()));
    assert!(!ok);
    assert!(err.contains("not authenticated"), "{err}");

    // The teardown removes the secrets (its `kill` is for the processes the README starts,
    // which here are the test's own).
    let block = readme_block("secure-teardown");
    let teardown: Vec<&str> = block
        .lines()
        .filter(|line| !line.starts_with("kill "))
        .collect();
    let (ok, out, err) = bash(
        dir.path(),
        &format!("source tokens.env\n{}", teardown.join("\n")),
    );
    assert!(ok, "the teardown failed\n{out}\n{err}");
    assert!(!secrets.exists(), "the teardown left {}", secrets.display());
}
