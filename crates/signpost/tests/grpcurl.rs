//! The real `signpost` binary, driven from a shell with grpcurl, as the README shows.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use signpost_tests::DEADLINE;
use signpost_tests::process::{ServerProcess, readme_block, require_program, run};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

#[test]
fn the_readme_walkthrough_runs_verbatim_against_the_binary() {
    if require_program("grpcurl").is_none() {
        return;
    }
    // As the README runs it: the default durable store, here in a temp dir.
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().to_str().expect("utf-8 path");
    let server = ServerProcess::start(Path::new(EXE), &["--data-dir", data_dir]);
    let script = readme_block("walkthrough").replace("127.0.0.1:7070", &server.addr.to_string());
    let dir = std::env::temp_dir().join(format!("signpost-walkthrough-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (ok, out, err) = run(Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "walkthrough failed\nstdout:\n{out}\nstderr:\n{err}");

    for expected in [
        "signpost.v1.RegistryService",
        "grpc.health.v1.Health",
        // `list` shows both reflection versions the port serves, not only the one that answered.
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "\"ttl\": \"30s\"", // Register's granted ttl, and KeepAlive's
        "\"health\": \"HEALTH_STATUS_PASSING\"", // in Discover
        "\"existed\": true", // Deregister
        "\"name\": \"greeter\"", // ListServices
        "\"reset\": true",  // the watch's first message
        "\"reason\": \"REMOVAL_REASON_DEREGISTERED\"",
    ] {
        assert!(
            out.contains(expected),
            "{expected} missing from the walkthrough output:\n{out}"
        );
    }
    assert!(
        !out.contains("\"expired\": true"),
        "the lease was kept alive:\n{out}"
    );
}

/// Starts `grpcurl … Watch` for `service`; its stdout lines arrive on the receiver.
fn spawn_watch(grpcurl: &Path, addr: &str, service: &str) -> (Child, Receiver<String>) {
    let body = format!(r#"{{"service":"{service}"}}"#);
    let mut watch = Command::new(grpcurl)
        .args([
            "-plaintext",
            "-d",
            &body,
            addr,
            "signpost.v1.RegistryService/Watch",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("grpcurl watch");
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().expect("stdout");
    let stderr = watch.stderr.take().expect("stderr");
    for pipe in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    (watch, lines)
}

fn wait_for(lines: &Receiver<String>, needle: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return,
            Ok(_) => {}
            Err(_) => panic!("the watch printed no line with {needle:?}"),
        }
    }
}

#[test]
fn grpcurl_registers_discovers_and_watches_with_json() {
    let Some(grpcurl) = require_program("grpcurl") else {
        return;
    };
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let addr = server.addr.to_string();
    let call = |body: &str, method: &str| {
        let method = format!("signpost.v1.RegistryService/{method}");
        run(Command::new(&grpcurl).args(["-plaintext", "-d", body, &addr, &method]))
    };

    let (mut watch, lines) = spawn_watch(&grpcurl, &addr, "pay");
    wait_for(&lines, "\"reset\": true");

    let (ok, out, err) = call(
        r#"{"instance":{"service":"pay","id":"pay-1","address":"::1","port":9000}}"#,
        "Register",
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"address\": \"::1\""), "{out}");
    wait_for(&lines, "EVENT_TYPE_ADDED");

    let (ok, out, _) = call(r#"{"service":"pay"}"#, "Discover");
    assert!(ok && out.contains("\"id\": \"pay-1\""), "{out}");

    let (ok, _, err) = call(
        r#"{"instance":{"service":"pay","id":"pay-2","address":"x","port":0}}"#,
        "Register",
    );
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("instance.port"),
        "{err}"
    );

    let (ok, _, _) = call(r#"{"service":"pay","id":"pay-1"}"#, "Deregister");
    assert!(ok);
    wait_for(&lines, "REMOVAL_REASON_DEREGISTERED");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn sigterm_stops_the_server_gracefully_with_streams_open() {
    let Some(grpcurl) = require_program("grpcurl") else {
        return;
    };
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let (mut watch, lines) = spawn_watch(&grpcurl, &server.addr.to_string(), "x");
    wait_for(&lines, "\"reset\": true");

    let started = Instant::now();
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "graceful stop took {:?}",
        started.elapsed()
    );
    // The open watch was ended by the server with UNAVAILABLE, not cut.
    wait_for(&lines, "Unavailable");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn the_readme_health_check_walkthrough_shows_an_instance_turn_critical() {
    if require_program("grpcurl").is_none() || require_program("python3").is_none() {
        return;
    }
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let script = readme_block("health-walkthrough")
        .replace("127.0.0.1:7070", &server.addr.to_string())
        .replace("8080", &free_port.to_string());
    let (ok, out, err) = run(Command::new("bash").args(["-euo", "pipefail", "-c", &script]));
    assert!(
        ok,
        "health walkthrough failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    let passing = out
        .find("HEALTH_STATUS_PASSING")
        .expect("the instance passed");
    let critical = out[passing..]
        .find("HEALTH_STATUS_CRITICAL")
        .expect("then turned critical");
    assert!(
        out[passing + critical..].contains("\"healthOutput\""),
        "{out}"
    );
    // It cleans up after itself: the persistent instance is deregistered, as the watch saw.
    assert!(out.contains("\"existed\": true"), "{out}");
    assert!(out.contains("REMOVAL_REASON_DEREGISTERED"), "{out}");
}

#[test]
fn reflection_and_health_need_no_token_and_reflection_can_be_turned_off() {
    let Some(grpcurl) = require_program("grpcurl") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[token]]\nname = \"ops\"\nsecret = \"ops-secret\"\nread = [\"*\"]\n",
    )
    .expect("token file");
    let tokens = tokens.to_str().expect("utf-8 path");

    let guarded = ServerProcess::start(
        Path::new(EXE),
        &["--store", "memory", "--auth-tokens", tokens],
    );
    let addr = guarded.addr.to_string();
    let (ok, out, err) = run(Command::new(&grpcurl).args(["-plaintext", &addr, "list"]));
    assert!(
        ok && out.contains("signpost.v1.RegistryService"),
        "{out}{err}"
    );
    let (ok, out, err) =
        run(Command::new(&grpcurl).args(["-plaintext", &addr, "grpc.health.v1.Health/Check"]));
    assert!(ok && out.contains("SERVING"), "{out}{err}");
    // The registry itself wants a token, and takes one as grpcurl sends it.
    let discover = |header: Option<&str>| {
        let mut command = Command::new(&grpcurl);
        command.arg("-plaintext");
        if let Some(h) = header {
            command.args(["-H", h]);
        }
        run(command.args([
            "-d",
            r#"{"service":"pay"}"#,
            &addr,
            "signpost.v1.RegistryService/Discover",
        ]))
    };
    let (ok, _, err) = discover(None);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, out, err) = discover(Some("authorization: Bearer ops-secret"));
    assert!(ok, "{out}{err}");

    let hidden = ServerProcess::start(Path::new(EXE), &["--store", "memory", "--no-reflection"]);
    let (ok, _, err) =
        run(Command::new(&grpcurl).args(["-plaintext", &hidden.addr.to_string(), "list"]));
    assert!(!ok, "reflection was served with --no-reflection: {err}");
}

#[test]
fn reflection_lists_both_of_its_versions() {
    let Some(grpcurl) = require_program("grpcurl") else {
        return;
    };
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let addr = server.addr.to_string();
    let (ok, out, err) = run(Command::new(&grpcurl).args(["-plaintext", &addr, "list"]));
    assert!(ok, "{out}{err}");
    let listed: Vec<&str> = out.lines().collect();
    for service in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(listed.contains(&service), "{service} not listed: {out}");
        // And each is described, so a client can ask either version what it offers.
        let (ok, out, err) =
            run(Command::new(&grpcurl).args(["-plaintext", &addr, "describe", service]));
        assert!(ok && out.contains("ServerReflectionInfo"), "{out}{err}");
    }
}
