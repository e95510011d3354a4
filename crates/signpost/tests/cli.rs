//! The operator's commands against a real server: tables, JSON, watch, register --ttl, the
//! one-line error when the registry is down or TLS is set up wrong, and the exit codes.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use signpost_tests::DEADLINE;
use signpost_tests::process::{ServerProcess, run};
use signpost_tests::tls::Pki;

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
    let (child, stdout, _) = spawn_both(registry, args);
    (child, stdout)
}

/// Starts `signpost ARGS` against `registry` (with RUST_LOG unset, so that stderr holds only
/// its own lines), sending the lines of its stdout and of its stderr to two channels.
fn spawn_both(registry: &str, args: &[&str]) -> (Child, Receiver<String>, Receiver<String>) {
    let mut child = Command::new(EXE)
        .args(args)
        .env("SIGNPOST_REGISTRY", registry)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn signpost");
    let lines = |output: Box<dyn std::io::Read + Send>| {
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        lines
    };
    let stdout = lines(Box::new(child.stdout.take().unwrap()));
    let stderr = lines(Box::new(child.stderr.take().unwrap()));
    (child, stdout, stderr)
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
    let selected = ok(
        &url,
        &["services", "--selector", "version=v2", "-o", "json"],
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&selected).unwrap(),
        serde_json::json!([{"name": "api", "instances": 1, "healthy": 1}]),
        "only the matching instance counts"
    );
    let none = ok(&url, &["services", "--selector", "version=v9"]);
    assert!(none.contains("no services"), "{none}");
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
    assert!(
        ok(&url, &["deregister", "api", "api-2"]).contains("was not registered; nothing to do")
    );
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
    // Its only instance gone, the service is gone too.
    let (status, _, err) = code(&url, &["ls", "job"]);
    assert_eq!(status, Some(1), "deregistered at once, not left to expire");
    assert!(err.contains("no service \"job\""), "{err}");
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

/// Runs the CLI and returns its exit code with stdout and stderr.
fn code(registry: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(EXE)
        .args(args)
        .env("SIGNPOST_REGISTRY", registry)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run signpost");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A long-running command whose stderr lines arrive on a channel.
fn spawn_stderr(registry: &str, args: &[&str]) -> (Child, Receiver<String>) {
    let (child, _, stderr) = spawn_both(registry, args);
    (child, stderr)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_registry_that_never_answers_fails_within_the_timeout() {
    // Connections are accepted by the kernel, and nothing ever answers on them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    for args in [
        &["services", "--timeout", "1s"][..],
        &["ls", "x", "--timeout", "1s"],
        &["deregister", "x", "y", "--timeout", "1s"],
        &[
            "register",
            "x",
            "--address",
            "a",
            "--port",
            "1",
            "--timeout",
            "1s",
        ],
    ] {
        let started = Instant::now();
        let (status, out, err) = code(&url, args);
        assert!(
            started.elapsed() < DEADLINE,
            "{args:?} took {:?}",
            started.elapsed()
        );
        assert_eq!(status, Some(1), "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("signpost: ") && err.contains(&url),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn long_running_commands_say_what_they_wait_for() {
    let url = format!("http://127.0.0.1:{}", free_port());
    for args in [
        &["watch", "greeter"][..],
        &[
            "register",
            "x",
            "--address",
            "a",
            "--port",
            "1",
            "--ttl",
            "10s",
        ],
    ] {
        let (mut child, lines) = spawn_stderr(&url, args);
        let line = next_line_with(&lines, "waiting for");
        assert_eq!(
            line,
            format!("signpost: waiting for registry at {url}: connection refused; retrying in 1s"),
            "{args:?}"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn watch_says_when_it_loses_its_stream() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let url = server.url();
    // One watch, both its outputs: its stream must be open (its event printed) before the
    // registry dies, or it has no stream to lose.
    let (mut child, lines, errors) = spawn_both(&url, &["watch", "w"]);
    ok(
        &url,
        &[
            "register",
            "w",
            "--id",
            "w1",
            "--address",
            "10.0.0.1",
            "--port",
            "1",
        ],
    );
    next_line_with(&lines, "w1");
    let server_addr = server.addr;
    server.kill9();
    let lost = next_line_with(&errors, "lost");
    assert_eq!(
        lost,
        format!("signpost: lost the watch stream from registry at {url}; reconnecting")
    );
    next_line_with(&errors, "waiting for registry");
    // The registry back on the same address: the watch says it is watching again.
    let addr = server_addr.to_string();
    let _back = ServerProcess::start_at(Path::new(EXE), &addr, &["--store", "memory"]);
    let again = next_line_with(&errors, "watching again");
    assert_eq!(
        again,
        format!("signpost: watching again (registry at {url})")
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn an_address_without_a_scheme_is_http() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let bare = server.addr.to_string();
    let out = ok(
        &bare,
        &["register", "api", "--address", "10.0.0.1", "--port", "80"],
    );
    assert!(out.contains("registered api/10.0.0.1-80"), "{out}");
    assert!(ok(&bare, &["ls", "api"]).contains("10.0.0.1:80"));
}

#[test]
fn exit_codes_say_done_failed_or_bad_usage() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let url = server.url();
    assert_eq!(code(&url, &["services"]).0, Some(0));
    // Deregistering what is not there is done, not failed: the instance is gone either way.
    let (status, out, _) = code(&url, &["deregister", "api", "nope"]);
    assert_eq!(status, Some(0));
    assert!(out.contains("was not registered"), "{out}");
    let (status, _, err) = code(
        &url,
        &["register", "Bad Name", "--address", "a", "--port", "1"],
    );
    assert_eq!(status, Some(1), "{err}");
    let dead = format!("http://127.0.0.1:{}", free_port());
    assert_eq!(code(&dead, &["services"]).0, Some(1));
    for (args, needle) in [
        (
            &["register", "x", "--address", "a", "--port", "0"][..],
            "--port",
        ),
        (
            &[
                "register",
                "x",
                "--address",
                "a",
                "--port",
                "1",
                "--ttl",
                "0s",
            ],
            "--ttl",
        ),
        (
            &[
                "register",
                "x",
                "--address",
                "a",
                "--port",
                "1",
                "--interval",
                "5s",
            ],
            "--http-check",
        ),
        (
            &[
                "register",
                "x",
                "--address",
                "a",
                "--port",
                "1",
                "--tcp-check",
                "--interval",
                "2s",
                "--check-timeout",
                "3s",
            ],
            "--check-timeout",
        ),
        (&["ls"], "<SERVICE>"),
    ] {
        let (status, _, err) = code(&url, args);
        assert_eq!(status, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let (status, _, err) = run(Command::new(EXE)
        .args(["ls", "x", "--registry", &url])
        .env("SIGNPOST_CLIENT_CERT", "")
        .env("SIGNPOST_CLIENT_KEY", "/nonexistent"));
    assert!(!status);
    assert!(
        err.contains("SIGNPOST_CLIENT_CERT is empty") && !err.contains("--client-cert"),
        "{err}"
    );
}

#[test]
fn ls_of_a_service_that_does_not_exist_suggests_the_near_name() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let url = server.url();
    ok(
        &url,
        &[
            "register",
            "greeter",
            "--address",
            "10.0.0.1",
            "--port",
            "1",
        ],
    );
    let (status, out, err) = code(&url, &["ls", "greter"]);
    assert_eq!(status, Some(1), "{out}{err}");
    assert_eq!(
        err.trim_end(),
        "signpost: no service \"greter\" in namespace \"default\"; did you mean \"greeter\"?"
    );
    // An existing service with nothing matching is an answer, not a failure.
    let (status, out, _) = code(&url, &["ls", "greeter", "--tags", "none"]);
    assert_eq!(status, Some(0));
    assert!(out.contains("no instances"), "{out}");
}

#[test]
fn the_table_shows_why_an_instance_is_critical() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let url = server.url();
    let closed = free_port().to_string();
    ok(
        &url,
        &[
            "register",
            "db",
            "--id",
            "db-1",
            "--address",
            "127.0.0.1",
            "--port",
            &closed,
            "--tcp-check",
            "--interval",
            "1s",
        ],
    );
    let deadline = Instant::now() + DEADLINE;
    let table = loop {
        let table = ok(&url, &["ls", "db", "--all"]);
        if table.contains("CRITICAL") {
            break table;
        }
        assert!(Instant::now() < deadline, "never critical: {table}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[1].starts_with("db-1"), "{table}");
    assert!(lines[2].starts_with("  check: "), "{table}");
    assert!(lines[2].len() > "  check: ".len(), "{table}");
}

/// A registry speaking TLS, with `mutual` asking clients for certificates too.
fn tls_server(dir: &Path, pki: &Pki, mutual: bool) -> ServerProcess {
    pki.write(dir);
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let mut args = vec![
        "--store".to_owned(),
        "memory".into(),
        "--tls-cert".into(),
        path("server.pem"),
        "--tls-key".into(),
        path("server.key"),
    ];
    if mutual {
        args.extend(["--tls-client-ca".to_owned(), path("ca.pem")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProcess::start(Path::new(EXE), &args)
}

fn one_line_error(registry: &str, args: &[&str]) -> String {
    let (status, _, err) = code(registry, args);
    assert_eq!(status, Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    err
}

#[test]
fn tls_mistakes_say_which_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("cli");
    let other = tempfile::tempdir().unwrap();
    Pki::new("other").write(other.path());
    let ca = dir.path().join("ca.pem").to_str().unwrap().to_owned();
    let wrong_ca = other.path().join("ca.pem").to_str().unwrap().to_owned();

    let plain = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let err = one_line_error(&format!("https://{}", plain.addr), &["services"]);
    assert!(err.contains("does not speak TLS"), "{err}");

    let mutual = tls_server(dir.path(), &pki, true);
    let url = format!("https://localhost:{}", mutual.addr.port());
    let err = one_line_error(&url, &["services", "--ca-cert", &ca]);
    assert!(err.contains("wants a client certificate"), "{err}");
    let err = one_line_error(&url, &["services", "--ca-cert", &wrong_ca]);
    assert!(err.contains("certificate is not trusted"), "{err}");
    let client = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let out = ok(
        &url,
        &[
            "services",
            "--ca-cert",
            &ca,
            "--client-cert",
            &client("client.pem"),
            "--client-key",
            &client("client.key"),
        ],
    );
    assert!(out.contains("no services"), "{out}");
}

#[test]
fn xds_bootstrap_prints_a_file_grpc_takes_to_reach_the_registry() {
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let url = server.url();
    let out = ok(&url, &["xds-bootstrap", "-n", "payments", "--zone", "z1"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        json["xds_servers"][0]["server_uri"],
        server.addr.to_string(),
        "{out}"
    );
    assert_eq!(json["node"]["metadata"]["signpost.namespace"], "payments");
    assert_eq!(json["node"]["locality"]["zone"], "z1");
    let (succeeded, _, err) = cli(&url, &["xds-bootstrap", "--registry", "https://r.example"]);
    assert!(!succeeded && err.contains("--ca-cert"), "{err}");

    // grpcio reads it and asks the registry: a service with no instance fails at once.
    if !signpost_tests::process::require_python_modules(&[("grpc", "grpcio")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bootstrap.json");
    std::fs::write(&file, &out).unwrap();
    let probe = r#"
import grpc
channel = grpc.insecure_channel("xds:///nobody")
try:
    channel.unary_unary("/greeter.v1.GreeterService/SayHello")(b"", timeout=10)
except grpc.RpcError as e:
    print(e.code().name, e.details())
"#;
    let (ran, stdout, stderr) = signpost_tests::process::run(
        std::process::Command::new("python3")
            .args(["-c", probe])
            .env("GRPC_XDS_BOOTSTRAP", &file),
    );
    assert!(ran, "{stderr}");
    assert!(
        stdout.starts_with("UNAVAILABLE") && stdout.contains("payments/nobody"),
        "{stdout}{stderr}"
    );
}
