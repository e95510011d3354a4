//! The Python example on stubs generated from proto/, against the real server: the proto stays
//! usable from other languages.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use signpost_tests::process::{ServerProcess, require_program, run};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

fn grpc_tools_available() -> bool {
    let (ok, _, _) = run(Command::new("python3").args(["-c", "import grpc_tools, grpc"]));
    if !ok {
        assert!(
            std::env::var_os("SIGNPOST_REQUIRE_ALL").is_none(),
            "python3 with grpcio-tools is required (SIGNPOST_REQUIRE_ALL is set): pip install grpcio-tools"
        );
        eprintln!("skipping: grpcio-tools is not installed");
    }
    ok
}

#[test]
fn the_python_example_registers_keeps_alive_discovers_watches_and_deregisters() {
    if require_program("python3").is_none() || !grpc_tools_available() {
        return;
    }
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python");
    let stubs = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(Command::new("bash")
        .arg(examples.join("generate.sh"))
        .arg(stubs.path()));
    assert!(ok, "generate.sh failed: {err}");

    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let (ok, out, err) = run(Command::new("python3")
        .arg(examples.join("client.py"))
        .args(["--registry", &server.addr.to_string()])
        .env("SIGNPOST_STUBS", stubs.path()));
    assert!(ok, "client.py failed:\n{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    let expect = [
        "watch: reset with 0 instances",
        "registered py-greeter/py-1 lease=",
        "watch: EVENT_TYPE_ADDED py-1 127.0.0.1:50051",
        "keepalive: lease=",
        "discover: ['py-1']",
        "deregistered existed=True",
        "watch: EVENT_TYPE_REMOVED py-1 reason=REMOVAL_REASON_DEREGISTERED",
        "bad input: INVALID_ARGUMENT: service \"Bad Name\" is invalid",
    ];
    assert_eq!(lines.len(), expect.len(), "{out}");
    for (line, expected) in lines.iter().zip(expect) {
        assert!(
            line.starts_with(expected),
            "expected {expected:?}, got {line:?}\n{out}"
        );
    }
    assert!(out.contains("expired=False"), "{out}");
}
