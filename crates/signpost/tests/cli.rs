//! The operator's commands against a real server: tables, JSON, watch, register --ttl, and the
//! one-line error when the registry is down.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use signpost_tests::DEADLINE;
use signpost_tests::process::{ServerProcess, run};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

fn cli(registry: &str, args: &[&str]) -> (bool, String, String) {
    run(Command::new(EXE)
        .args(args)
        .env("SIGNPOST_REGISTRY", registry)
        .env_remove("RUST_LOG"))
}

fn ok(registry: &str, args: &[&str]) -> String {
    let (ok, out, err) = cli(registry, args);
    assert!(ok, "signpost {args:?} failed: {err}");
    out
}

/// A long-running command whose stdout lines arrive on a channel.
fn spawn(registry: &str, args: &[&str]) -> (Child, Receiver<String>) {
    let mut child = Command::new(EXE)
        .args(args)
        .env("SIGNPOST_REGISTRY", registry)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn signpost");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, lines)
}

fn next_line_with(lines: &Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => panic!("no line with {needle:?}"),
        }
    }
}

#[test]
fn tables_and_json_for_services_ls_register_deregister() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let url = server.url();
    let out = ok(
        &url,
        &[
            "register",
            "api",
            "--id",
            "api-1",
            "--address",
            "10.0.0.1",
            "--port",
            "8080",
            "--tag",
            "v1",
            "--tag",
            "grpc",
            "--meta",
            "version=v1",
            "--zone",
            "eu-1a",
        ],
    );
    assert!(
        out.contains("registered api/api-1 at 10.0.0.1:8080 (persistent"),
        "{out}"
    );
    ok(
        &url,
        &[
            "register",
            "api",
            "--id",
            "api-2",
            "--address",
            "10.0.0.2",
            "--port",
            "8080",
            "--meta",
            "version=v2",
        ],
    );
    ok(
        &url,
        &[
            "register",
            "web",
            "--address",
            "10.0.0.3",
            "--port",
            "80",
            "-n",
            "staging",
        ],
    );

    let services = ok(&url, &["services"]);
    let lines: Vec<&str> = services.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["SERVICE", "INSTANCES", "HEALTHY"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["api", "2", "2"]
    );
    assert_eq!(lines.len(), 2, "{services}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&url, &["services", "-n", "staging", "-o", "json"])).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"name": "web", "instances": 1, "healthy": 1}])
    );

    let ls = ok(&url, &["ls", "api"]);
    let rows: Vec<Vec<&str>> = ls.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows[0],
        ["ID", "ADDRESS", "HEALTH", "ZONE", "TAGS", "METADATA", "AGE"]
    );
    assert_eq!(
        rows[1][..6],
        [
            "api-1",
            "10.0.0.1:8080",
            "PASSING",
            "eu-1a",
            "v1,grpc",
            "version=v1"
        ]
    );
    assert_eq!(
        rows[2][..6],
        ["api-2", "10.0.0.2:8080", "PASSING", "-", "-", "version=v2"]
    );
    assert!(rows[1][6].ends_with('s'), "age: {}", rows[1][6]);

    let filtered: serde_json::Value = serde_json::from_str(&ok(
        &url,
        &["ls", "api", "--selector", "version=v2", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    assert_eq!(filtered[0]["id"], "api-2");
    assert_eq!(filtered[0]["health"], "PASSING");
    let tagged = ok(&url, &["ls", "api", "--tags", "v1,grpc", "-o", "json"]);
    assert!(
        tagged.contains("\"api-1\"") && !tagged.contains("\"api-2\""),
        "{tagged}"
    );
    assert!(ok(&url, &["ls", "api", "--selector", "version=v9"]).contains("no instances"));

    assert!(ok(&url, &["deregister", "api", "api-2"]).contains("deregistered api/api-2"));
    assert!(ok(&url, &["deregister", "api", "api-2"]).contains("was not registered"));
    let answer: serde_json::Value =
        serde_json::from_str(&ok(&url, &["deregister", "api", "api-1", "-o", "json"])).unwrap();
    assert_eq!(answer, serde_json::json!({"existed": true}));
}

#[test]
fn watch_prints_one_line_per_event_as_it_happens() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let url = server.url();
    ok(
        &url,
        &[
            "register",
            "pay",
            "--id",
            "p1",
            "--address",
            "10.0.0.1",
            "--port",
            "1",
        ],
    );
    let (mut table_watch, table_lines) = spawn(&url, &["watch", "pay"]);
    let (mut json_watch, json_lines) = spawn(&url, &["watch", "pay", "-o", "json"]);
    let existing = next_line_with(&table_lines, "p1");
    assert!(
        existing.contains("ADDED") && existing.contains("10.0.0.1:1"),
        "{existing}"
    );
    next_line_with(&json_lines, "\"p1\"");

    ok(
        &url,
        &[
            "register",
            "pay",
            "--id",
            "p2",
            "--address",
            "10.0.0.2",
            "--port",
            "2",
        ],
    );
    let added = next_line_with(&table_lines, "p2");
    let fields: Vec<&str> = added.split_whitespace().collect();
    assert!(fields[0].ends_with('Z'), "a timestamp first: {added}");
    assert_eq!(fields[1..], ["ADDED", "p2", "10.0.0.2:2", "PASSING"]);

    ok(&url, &["deregister", "pay", "p2"]);
    let removed = next_line_with(&table_lines, "REMOVED");
    assert!(
        removed.contains("p2") && removed.ends_with("DEREGISTERED"),
        "{removed}"
    );

    let json_added: serde_json::Value =
        serde_json::from_str(&next_line_with(&json_lines, "\"p2\"")).unwrap();
    assert_eq!(json_added["type"], "ADDED");
    let json_removed: serde_json::Value =
        serde_json::from_str(&next_line_with(&json_lines, "REMOVED")).unwrap();
    assert_eq!(
        (json_removed["id"].as_str(), json_removed["reason"].as_str()),
        (Some("p2"), Some("DEREGISTERED"))
    );
    for child in [&mut table_watch, &mut json_watch] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn register_with_a_ttl_holds_the_instance_until_stopped() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let url = server.url();
    let (mut holder, lines) = spawn(
        &url,
        &[
            "register",
            "job",
            "--id",
            "j1",
            "--address",
            "10.0.0.9",
            "--port",
            "7",
            "--ttl",
            "1s",
        ],
    );
    next_line_with(&lines, "keeping it alive until Ctrl-C");
    // Three ttls later it is still there: the lease is being kept alive.
    std::thread::sleep(Duration::from_secs(3));
    assert!(ok(&url, &["ls", "job"]).contains("j1"));

    let pid = holder.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    next_line_with(&lines, "deregistered job/j1");
    assert!(holder.wait().unwrap().success());
    assert!(
        ok(&url, &["ls", "job"]).contains("no instances"),
        "deregistered at once, not left to expire"
    );
}

#[test]
fn an_unreachable_registry_is_one_line_and_a_non_zero_exit() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        &["services"][..],
        &["ls", "x"],
        &["deregister", "x", "y"],
        &["register", "x", "--address", "a", "--port", "1"],
    ] {
        let (ok, out, err) = cli(&url, args);
        assert!(!ok, "{args:?} succeeded");
        assert!(out.is_empty(), "{out}");
        assert_eq!(
            err.trim_end(),
            format!("signpost: cannot reach registry at {url}: connection refused"),
            "{args:?}"
        );
    }
    let (ok, _, err) = cli(
        &url,
        &[
            "register",
            "Bad Name",
            "--address",
            "a",
            "--port",
            "1",
            "--registry",
            "http://",
        ],
    );
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_one_line_naming_the_field() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let (ok, _, err) = cli(
        &server.url(),
        &[
            "register",
            "Bad Name",
            "--address",
            "10.0.0.1",
            "--port",
            "1",
        ],
    );
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("instance.service \"Bad Name\" is invalid"),
        "{err}"
    );
}
