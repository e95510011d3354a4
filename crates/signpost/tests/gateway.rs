//! `signpost gateway` as its users meet it: real registries, real backends written the way a
//! user writes them (Python's http.server, websockets, grpcio) registered with `signpost
//! register`, and callers from Python, curl and grpcurl.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use signpost_tests::DEADLINE;
use signpost_tests::process::{ServerProcess, require_program, run};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

fn backends_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gateway/backends.py")
}

/// A child process whose output lines (stdout and stderr) are read as they come; killed when
/// dropped.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(command: &mut Command) -> Proc {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(line);
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no line with {needle:?} within {DEADLINE:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to end and returns all it printed since the last wait.
    fn finish(mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} did not end",
                self.child.id()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(50));
        let mut text: Vec<String> = std::mem::take(&mut self.seen);
        text.extend(self.lines.try_iter());
        (status.success(), text.join("\n"))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python backend and the `signpost register --ttl` process that keeps it registered.
struct Backend {
    id: String,
    port: u16,
    process: Proc,
    _registration: Proc,
}

fn backend(kind: &str, service: &str, id: &str, registry: &str, extra: &[&str]) -> Backend {
    backend_with(kind, service, id, registry, extra, &[])
}

fn backend_with(
    kind: &str,
    service: &str,
    id: &str,
    registry: &str,
    register_extra: &[&str],
    backend_extra: &[&str],
) -> Backend {
    let mut process = Proc::spawn(
        Command::new("python3")
            .arg(backends_py())
            .args([kind, "--id", id])
            .args(backend_extra),
    );
    let line = process.wait_for("serving on");
    let port: u16 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let port_text = port.to_string();
    let mut registration = Proc::spawn(
        Command::new(EXE)
            .args(["register", service, "--registry", registry, "--id", id])
            .args([
                "--address",
                "127.0.0.1",
                "--port",
                &port_text,
                "--ttl",
                "3s",
            ])
            .args(register_extra),
    );
    registration.wait_for("keeping it alive");
    Backend {
        id: id.to_owned(),
        port,
        process,
        _registration: registration,
    }
}

/// A running `signpost gateway`.
struct Gateway {
    addr: SocketAddr,
    metrics: SocketAddr,
    process: Proc,
}

fn field(line: &str, name: &str) -> String {
    let at = line
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"));
    line[at + name.len() + 1..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

fn gateway(registry: &str, args: &[&str]) -> Gateway {
    let mut process = Proc::spawn(
        Command::new(EXE)
            .args(["gateway", "--listen", "127.0.0.1:0", "--registry", registry])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("SIGNPOST_LOG_FORMAT", "text"),
    );
    let metrics = field(&process.wait_for("gateway metrics at"), "addr")
        .parse()
        .unwrap();
    let addr = field(&process.wait_for("gateway listening"), "addr")
        .parse()
        .unwrap();
    Gateway {
        addr,
        metrics,
        process,
    }
}

/// One HTTP/1.1 exchange over a new connection: the status and the body.
fn http(addr: SocketAddr, raw: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(raw.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_owned(), body.to_owned())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"),
    );
    (status, body)
}

/// Waits until GETs of `path` have been answered by every one of `ids`.
fn wait_until_served_by(addr: SocketAddr, path: &str, ids: &[&str]) {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < ids.len() {
        let (status, body) = get(addr, path);
        if status == 200 && ids.contains(&body.as_str()) {
            seen.insert(body);
        }
        assert!(
            Instant::now() < deadline,
            "only {seen:?} of {ids:?} answered {path} within {DEADLINE:?} (last: {status})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of a counter in the gateway's metrics, 0 when absent.
fn metric(gateway: &Gateway, name_and_labels: &str) -> f64 {
    let (_, body) = get(gateway.metrics, "/metrics");
    body.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn wait_for_metric(gateway: &Gateway, name_and_labels: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = metric(gateway, name_and_labels);
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name_and_labels} is {value}, not {at_least}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn python(args: &[&str]) -> (bool, String, String) {
    run(Command::new("python3").arg(backends_py()).args(args))
}

fn python_ready(modules: &str) -> bool {
    if require_program("python3").is_none() {
        return false;
    }
    let (ok, _, err) = run(Command::new("python3").args(["-c", &format!("import {modules}")]));
    if !ok {
        assert!(
            std::env::var_os("SIGNPOST_REQUIRE_ALL").is_none(),
            "python3 with {modules} is required (SIGNPOST_REQUIRE_ALL is set): {err}"
        );
    }
    ok
}

fn registry() -> ServerProcess {
    ServerProcess::start(Path::new(EXE), &["--store", "memory"])
}

#[test]
fn python_gets_through_the_gateway_reach_every_instance_with_the_request_intact() {
    if !python_ready("json") {
        return;
    }
    let registry = registry();
    let url = registry.url();
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|id| backend("http", "web", id, &url, &[]))
        .collect();
    let mut gw = gateway(&url, &["--route", "host=*.svc.test"]);
    wait_until_served_by(gw.addr, "/web/whoami", &["a", "b", "c"]);

    // The seed pattern: a user's few lines of Python.
    let (ok, out, err) = python(&["get", &format!("http://{}/web/whoami", gw.addr), "90"]);
    assert!(ok, "{out}{err}");
    let counts: Vec<(String, u32)> = out
        .lines()
        .map(|l| {
            let (id, n) = l.split_once(' ').unwrap();
            (id.to_owned(), n.parse().unwrap())
        })
        .collect();
    assert_eq!(counts.len(), 3, "every instance answered: {out}");
    assert_eq!(counts.iter().map(|c| c.1).sum::<u32>(), 90);

    // Method, path, query and body pass through; the service's prefix is gone.
    let (ok, out, err) = python(&["post", &format!("http://{}/web/echo?x=1", gw.addr), "hello"]);
    assert!(ok, "{err}");
    let (status, answer) = out.trim().split_once(' ').unwrap();
    assert_eq!(status, "200", "{out}");
    let (who, body) = answer.split_once(':').unwrap();
    assert!(backends.iter().any(|b| b.id == who), "{out}");
    assert_eq!(body, "hello");

    let (status, head, body) = http(
        gw.addr,
        "GET /web/headers/x?q=1&r HTTP/1.1\r\nHost: gw.test\r\nX-Request-Id: trace-7\r\n\
         Connection: close, x-hop\r\nx-hop: secret\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n",
    );
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-request-id: trace-7"),
        "{head}"
    );
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/headers/x?q=1&r");
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "gw.test");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"gw.test\"");
    assert_eq!(h["x-request-id"], "trace-7");
    assert!(
        h.get("x-hop").is_none(),
        "a hop-by-hop header went through: {h}"
    );
    let b = backends
        .iter()
        .find(|b| h["host"] == format!("127.0.0.1:{}", b.port));
    assert!(b.is_some(), "Host names the instance: {h}");

    // An access log line per request, naming the instance that served it.
    let line = gw.process.wait_for("signpost_gateway::access");
    assert!(
        line.contains("service=web") && line.contains("status=200"),
        "{line}"
    );
    assert!(
        ["a", "b", "c"].contains(&field(&line, "instance").as_str()),
        "{line}"
    );

    // A made request id; host routing; HTTP/2 from the client (h2c, prior knowledge).
    let (_, head, _) = http(
        gw.addr,
        "GET /web/whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        head.to_ascii_lowercase().contains("x-request-id: "),
        "{head}"
    );
    let (status, body) = get_with_host(gw.addr, "/whoami", "web.svc.test");
    assert_eq!(status, 200);
    assert!(["a", "b", "c"].contains(&body.as_str()), "{body}");
    if let Some(curl) = require_program("curl") {
        let (ok, out, err) = run(Command::new(curl).args([
            "-s",
            "--http2-prior-knowledge",
            "-w",
            " %{http_version}",
            &format!("http://{}/web/whoami", gw.addr),
        ]));
        assert!(ok, "{err}");
        assert!(out.ends_with(" 2"), "answered over HTTP/2: {out}");
    }
}

fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> (u16, String) {
    let (status, _, body) = http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    );
    (status, body)
}

#[test]
fn a_backend_killed_under_steady_gets_fails_no_get_and_an_in_flight_post_is_not_retried() {
    if !python_ready("json") {
        return;
    }
    let registry = registry();
    let url = registry.url();
    let mut web: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|id| backend("http", "web", id, &url, &[]))
        .collect();
    let marks = tempfile::tempdir().unwrap();
    let marks_dir = marks.path().to_str().unwrap();
    let mut pay: Vec<Backend> = ["p1", "p2"]
        .iter()
        .map(|id| backend_with("http", "pay", id, &url, &[], &["--marks", marks_dir]))
        .collect();
    let gw = gateway(&url, &[]);
    wait_until_served_by(gw.addr, "/web/whoami", &["a", "b", "c"]);
    wait_until_served_by(gw.addr, "/pay/whoami", &["p1", "p2"]);

    // Steady GETs from eight Python threads; b is killed in the middle. Its registration
    // stays: the gateway must route around an instance the registry still lists.
    let stop = marks.path().join("stop");
    let load = Proc::spawn(
        Command::new("python3")
            .arg(backends_py())
            .args(["load", &format!("http://{}/web/whoami", gw.addr)])
            .arg(&stop),
    );
    let ok = "signpost_gateway_requests_total{service=\"web\",code=\"200\"}";
    let before = metric(&gw, ok);
    wait_for_metric(&gw, ok, before + 300.0);
    web[1].process.kill9();
    let killed_at = metric(&gw, ok);
    wait_for_metric(&gw, ok, killed_at + 600.0);
    std::fs::write(&stop, "").unwrap();
    let (_, out) = load.finish();
    let line = out
        .lines()
        .find(|l| l.starts_with("ok "))
        .unwrap_or_else(|| panic!("{out}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], "0", "GETs failed after a kill -9: {out}");
    assert!(fields[1].parse::<u32>().unwrap() >= 900, "{out}");

    // A POST held by an instance that is then killed fails once and goes nowhere else.
    let post = Proc::spawn(Command::new("python3").arg(backends_py()).args([
        "post",
        &format!("http://{}/pay/hold", gw.addr),
        "order-1",
    ]));
    let deadline = Instant::now() + DEADLINE;
    let holder = loop {
        let arrived: Vec<String> = std::fs::read_dir(marks.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("arrived-"))
            .collect();
        if let Some(first) = arrived.first() {
            break first.trim_start_matches("arrived-").to_owned();
        }
        assert!(Instant::now() < deadline, "the POST reached no instance");
        std::thread::sleep(Duration::from_millis(10));
    };
    let index = pay.iter().position(|b| b.id == holder).unwrap();
    pay[index].process.kill9();
    let (_, out) = post.finish();
    assert!(
        out.starts_with("502 "),
        "the held POST failed with 502: {out}"
    );
    assert!(out.contains("not sent twice"), "{out}");
    let arrived = std::fs::read_dir(marks.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("arrived-"))
        .count();
    assert_eq!(arrived, 1, "the POST was sent to a second instance");
    let other = &pay[1 - index].id;
    for _ in 0..5 {
        let (ok, out, err) = python(&["post", &format!("http://{}/pay/echo", gw.addr), "order-2"]);
        assert!(ok, "{err}");
        assert_eq!(out.trim(), format!("200 {other}:order-2"));
    }
}

#[test]
fn connections_to_an_instance_are_reused_and_one_it_closed_is_not_trusted_with_a_post() {
    if !python_ready("json") {
        return;
    }
    let registry = registry();
    let url = registry.url();
    let mut web = backend_with("http", "web", "k", &url, &[], &["--idle-close", "2"]);
    let gw = gateway(&url, &[]);
    wait_until_served_by(gw.addr, "/web/whoami", &["k"]);

    // One request at a time: each goes on the same connection to the instance, after a small
    // answer read whole and after a large one streamed through alike.
    let (status, first) = get(gw.addr, "/web/conn");
    assert_eq!(status, 200);
    for path in [
        "/web/big",
        "/web/conn",
        "/web/big",
        "/web/whoami",
        "/web/conn",
    ] {
        let (status, body) = get(gw.addr, path);
        assert_eq!(status, 200, "{path}: {body}");
        match path {
            "/web/big" => assert_eq!(body.len(), 256 * 1024),
            "/web/conn" => assert_eq!(body, first, "a new connection after the one before"),
            _ => {}
        }
    }

    // The instance closes the idle connection. A POST is never retried once sent, so the
    // gateway must see the connection closed before it sends one on it.
    web.process.wait_for("closed an idle connection");
    let (ok, out, err) = python(&[
        "post",
        &format!("http://{}/web/echo", gw.addr),
        "after-close",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "200 k:after-close");
    let (status, second) = get(gw.addr, "/web/conn");
    assert_eq!(status, 200);
    assert_ne!(second, first, "the closed connection was used again");
}

/// A registry, one HTTP backend `id` of service `web`, and a gateway that already routes to it.
fn gateway_over_one_backend(id: &str) -> (ServerProcess, Backend, Gateway) {
    gateway_with_args_over_one_backend(id, &[])
}

fn gateway_with_args_over_one_backend(
    id: &str,
    args: &[&str],
) -> (ServerProcess, Backend, Gateway) {
    let registry = registry();
    let url = registry.url();
    let web = backend("http", "web", id, &url, &[]);
    let gw = gateway(&url, args);
    wait_until_served_by(gw.addr, "/web/whoami", &[id]);
    (registry, web, gw)
}

/// The answers on one connection, in order: status, head and body each; `head_requests` says
/// which answer a HEAD has (a length but no body).
fn answers(raw: &[u8], head_requests: &[bool]) -> Vec<(u16, String, Vec<u8>)> {
    let mut at = 0;
    let mut out = Vec::new();
    for &head_request in head_requests {
        let rest = &raw[at..];
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            panic!(
                "answer {} missing in {:?}",
                out.len() + 1,
                String::from_utf8_lossy(raw)
            );
        };
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok());
        let body_at = end + 4;
        let body = match (head_request, length) {
            (true, _) => Vec::new(),
            (false, Some(n)) => rest[body_at..body_at + n].to_vec(),
            (false, None) => rest[body_at..].to_vec(),
        };
        at += body_at + body.len();
        out.push((status, head, body));
    }
    assert_eq!(at, raw.len(), "more than the answers asked for");
    out
}

#[test]
fn one_connection_carries_pipelined_gets_a_head_and_a_post_in_order() {
    if !python_ready("json") {
        return;
    }
    let (_registry, _web, gw) = gateway_over_one_backend("p");

    // All in one write: answers must come back in order, the HEAD's without a body, and the
    // POST's body must reach the instance whole, with the GET after it still answered.
    let mut stream = TcpStream::connect(gw.addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
        .write_all(
            b"GET /web/whoami HTTP/1.1\r\nHost: gw.test\r\nX-Request-Id: one\r\n\r\n\
              HEAD /web/whoami HTTP/1.1\r\nHost: gw.test\r\n\r\n\
              GET /web/big HTTP/1.1\r\nHost: gw.test\r\n\r\n\
              POST /web/echo HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n\r\nhello\
              GET /web/whoami HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let got = answers(&raw, &[false, true, false, false, false]);
    let bodies: Vec<String> = got
        .iter()
        .map(|(_, _, b)| {
            if b.len() > 64 {
                format!("{} bytes", b.len())
            } else {
                String::from_utf8_lossy(b).into_owned()
            }
        })
        .collect();
    assert_eq!(
        bodies,
        ["p", "", &format!("{} bytes", 256 * 1024), "p:hello", "p"]
    );
    for (status, head, _) in &got {
        assert_eq!(*status, 200, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("x-request-id: "),
            "{head}"
        );
    }
    assert!(got[0].1.contains("x-request-id: one"), "{}", got[0].1);
    assert!(
        got[1].1.to_ascii_lowercase().contains("content-length: 1"),
        "a HEAD's answer keeps its length: {}",
        got[1].1
    );

    // An answer whose end is the instance closing: the client's connection closes after it.
    let (status, head, body) = http(
        gw.addr,
        "GET /web/until-close HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    );
    assert_eq!((status, body.as_str()), (200, "all of it from p"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
}

#[test]
fn a_client_that_stops_reading_an_answer_is_cut_off_after_the_idle_timeout() {
    if !python_ready("json") {
        return;
    }
    let (_registry, _web, mut gw) =
        gateway_with_args_over_one_backend("i", &["--idle-timeout", "1s"]);
    let _ = gw.process.wait_for("signpost_gateway::access");

    // Asks for 256 MiB and reads none of it: the gateway's writes stop making progress, and
    // after the idle timeout it gives up on this client (its access line, with no byte
    // count, is written when it does) and goes on serving.
    let mut stalled = TcpStream::connect(gw.addr).unwrap();
    stalled
        .write_all(b"GET /web/huge HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let line = gw.process.wait_for("/web/huge");
    assert!(line.contains("status=200"), "{line}");
    assert!(started.elapsed() >= Duration::from_secs(1), "{line}");
    assert_eq!(get(gw.addr, "/web/whoami"), (200, "i".to_owned()));
    drop(stalled);
}

#[test]
fn a_client_that_stops_reading_is_cut_off_on_hypers_path_too() {
    if !python_ready("json") {
        return;
    }
    let (_registry, _web, mut gw) =
        gateway_with_args_over_one_backend("i", &["--idle-timeout", "1s"]);
    let _ = gw.process.wait_for("signpost_gateway::access");

    // A request with a body goes to hyper's HTTP/1.1 server rather than the gateway's own
    // path; its client asks for 256 MiB and reads none of it.
    let mut stalled = TcpStream::connect(gw.addr).unwrap();
    stalled
        .write_all(b"POST /web/huge HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 1\r\n\r\nx")
        .unwrap();
    let started = Instant::now();
    let line = gw.process.wait_for("/web/huge");
    assert!(
        line.contains("POST") && line.contains("status=200"),
        "{line}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1), "{line}");
    assert_eq!(get(gw.addr, "/web/whoami"), (200, "i".to_owned()));
    drop(stalled);
}

#[test]
fn an_http2_client_that_grants_no_window_is_cut_off_from_the_instance() {
    if !python_ready("json") {
        return;
    }
    let (_registry, _web, mut gw) =
        gateway_with_args_over_one_backend("i", &["--idle-timeout", "1s"]);
    let _ = gw.process.wait_for("signpost_gateway::access");

    // An HTTP/2 client that goes on reading its socket (the connection lives, pings are
    // answered) but never gives back the window of a stream it stopped reading: the gateway
    // can send no more on it, and must not hold the instance's connection for as long as
    // the client keeps the stream.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = gw.addr;
    let (body, started) = runtime.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let request = http::Request::get(format!("http://{addr}/web/huge"))
            .body(())
            .unwrap();
        let (answer, _) = client.send_request(request, true).unwrap();
        let answer = answer.await.unwrap();
        assert_eq!(answer.status(), 200);
        let mut body = answer.into_body();
        // One frame taken, its window never released.
        assert!(body.data().await.is_some_and(|d| d.is_ok()));
        (body, Instant::now())
    });
    let line = gw.process.wait_for("/web/huge");
    assert!(line.contains("status=200"), "{line}");
    assert!(started.elapsed() >= Duration::from_secs(1), "{line}");
    assert_eq!(get(gw.addr, "/web/whoami"), (200, "i".to_owned()));
    drop(body);
}

#[test]
fn idle_client_connections_are_closed_after_the_header_timeout() {
    if !python_ready("json") {
        return;
    }
    let (_registry, _web, gw) = gateway_over_one_backend("i");

    // One connection idles after an answer, one never sends a byte: neither may hold a
    // connection slot for ever (the header timeout is 10 s).
    let mut after_answer = TcpStream::connect(gw.addr).unwrap();
    let mut silent = TcpStream::connect(gw.addr).unwrap();
    after_answer
        .write_all(b"GET /web/whoami HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .unwrap();
    for stream in [&mut after_answer, &mut silent] {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
    }
    let mut raw = Vec::new();
    let started = Instant::now();
    let read = after_answer.read_to_end(&mut raw);
    assert!(
        read.is_ok(),
        "still open after {:?}: {read:?}",
        started.elapsed()
    );
    let got = answers(&raw, &[false]);
    assert_eq!((got[0].0, got[0].2.as_slice()), (200, &b"i"[..]));
    let mut nothing = Vec::new();
    let read = silent.read_to_end(&mut nothing);
    assert!(read.is_ok() && nothing.is_empty(), "{read:?} {nothing:?}");
}

#[test]
fn a_websocket_echo_goes_through_the_gateway() {
    if !python_ready("websockets") {
        return;
    }
    let registry = registry();
    let _ws = backend("ws", "echo", "w1", &registry.url(), &[]);
    let gw = gateway(&registry.url(), &[]);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (ok, out, err) = python(&["wsecho", &format!("ws://{}/echo/chat", gw.addr), "hello"]);
        if ok {
            assert_eq!(out.trim(), "w1:hello\nw1:hello-again");
            break;
        }
        // The instance may not be in the gateway's view yet: 404 until it is.
        assert!(Instant::now() < deadline, "{out}{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn greeter_stubs(dir: &Path) {
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/proto");
    let (ok, _, err) = run(Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&protos)
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg(protos.join("greeter/v1/greeter.proto")));
    assert!(ok, "protoc: {err}");
    std::fs::write(dir.join("greeter/__init__.py"), "").unwrap();
    std::fs::write(dir.join("greeter/v1/__init__.py"), "").unwrap();
}

#[test]
fn grpc_passes_through_for_grpcurl_and_python_stubs_with_streams_unbuffered() {
    if !python_ready("grpc_tools, grpc") {
        return;
    }
    let Some(grpcurl) = require_program("grpcurl") else {
        return;
    };
    let stubs = tempfile::tempdir().unwrap();
    greeter_stubs(stubs.path());
    let stubs_dir = stubs.path().to_str().unwrap();
    let registry = registry();
    let url = registry.url();
    let _g = backend_with("grpc", "greeter", "g1", &url, &[], &["--stubs", stubs_dir]);
    let gw = gateway(
        &url,
        &["--route", "grpc=greeter.v1.GreeterService,service=greeter"],
    );
    let addr = gw.addr.to_string();

    let deadline = Instant::now() + DEADLINE;
    loop {
        let (ok, out, err) = python(&["greet", &addr, "py", "--stubs", stubs_dir]);
        assert!(ok, "{err}");
        if out.trim() == "answer g1 hello py" {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A status from the instance, in its trailers, reaches the caller as it was.
    let (_, out, _) = python(&["greet", &addr, "nobody", "--stubs", stubs_dir]);
    assert_eq!(out.trim(), "error NOT_FOUND there is nobody to greet");

    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/proto");
    let (ok, out, err) = run(Command::new(grpcurl)
        .args(["-plaintext", "-import-path"])
        .arg(&protos)
        .args([
            "-proto",
            "greeter/v1/greeter.proto",
            "-d",
            r#"{"name":"curl"}"#,
        ])
        .args([addr.as_str(), "greeter.v1.GreeterService/SayHello"]));
    assert!(ok, "{out}{err}");
    assert!(out.contains("\"message\": \"hello curl\""), "{out}");
    assert!(out.contains("\"instanceId\": \"g1\""), "{out}");

    // The second message is sent only after the client has the first.
    let flags = tempfile::tempdir().unwrap();
    let (ok, out, err) = python(&["stream", &addr, flags.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "stream one two");
}

/// Asks the backend for its two chunks: the second comes once `flag` exists.
fn ask_for_chunks(addr: SocketAddr, flag: &Path) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET /web/chunks?flag={} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        flag.display()
    )
    .unwrap();
    stream
}

#[test]
fn a_chunked_answer_streams_through_unbuffered() {
    if !python_ready("json") {
        return;
    }
    let registry = registry();
    let _web = backend("http", "web", "a", &registry.url(), &[]);
    let gw = gateway(&registry.url(), &[]);
    wait_until_served_by(gw.addr, "/web/whoami", &["a"]);
    let flags = tempfile::tempdir().unwrap();
    let flag = flags.path().join("got-first");
    let mut stream = ask_for_chunks(gw.addr, &flag);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("first") {
        let n = stream
            .read(&mut buf)
            .expect("the first chunk arrives before the second is sent");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    std::fs::write(&flag, "").unwrap();
    let _ = stream.read_to_end(&mut seen);
    assert!(String::from_utf8_lossy(&seen).contains("second"));
}

/// `curl` over HTTP/2 with prior knowledge (h2c) to the gateway, with `args` before the URL.
fn curl_h2(curl: &Path, args: &[&str], url: &str) -> (bool, String, String) {
    run(Command::new(curl)
        .args(["-sS", "--http2-prior-knowledge"])
        .args(args)
        .arg(url))
}

#[test]
fn http2_callers_get_whole_answers_from_http1_instances_and_streams_stay_streams() {
    if !python_ready("json") {
        return;
    }
    let Some(curl) = require_program("curl") else {
        return;
    };
    let registry = registry();
    let url = registry.url();
    let mut a = backend("http", "web", "a", &url, &[]);
    let _b = backend("http", "web", "b", &url, &[]);
    let mut solo = backend("http", "solo", "s", &url, &[]);
    let gw = gateway(&url, &[]);
    wait_until_served_by(gw.addr, "/web/whoami", &["a", "b"]);
    wait_until_served_by(gw.addr, "/solo/whoami", &["s"]);
    let at = |path: &str| format!("http://{}{path}", gw.addr);

    // A body over the gateway's retry buffer streams through, every byte of it.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    let (ok, out, err) = curl_h2(
        &curl,
        &[
            "-o",
            big.to_str().unwrap(),
            "-w",
            "%{http_code} %{http_version}",
        ],
        &at("/web/big"),
    );
    assert!(ok, "{err}");
    assert_eq!(out, "200 2");
    assert_eq!(std::fs::read(&big).unwrap(), vec![b'x'; 256 * 1024]);

    // A body that ends when the instance closes its connection.
    let (ok, out, err) = curl_h2(&curl, &[], &at("/web/until-close"));
    assert!(ok, "{err}");
    assert!(
        out == "all of it from a" || out == "all of it from b",
        "{out}"
    );

    // A HEAD answer: the length a GET would have, and no body.
    let (ok, out, err) = curl_h2(&curl, &["-I"], &at("/web/whoami"));
    assert!(ok, "{err}");
    let head = out.to_ascii_lowercase();
    assert!(head.starts_with("http/2 200"), "{out}");
    assert!(head.contains("content-length: 1\r\n"), "{out}");
    assert!(head.contains("x-request-id: "), "{out}");

    // HTTP/2 may send cookies as separate fields; an HTTP/1.1 instance gets them in one.
    let (ok, out, err) = curl_h2(
        &curl,
        &[
            "-H",
            "cookie: a=1",
            "-H",
            "cookie: b=2",
            "-H",
            "x-request-id: mine-1",
        ],
        &at("/web/headers?q=1"),
    );
    assert!(ok, "{err}");
    let seen: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(seen["path"], "/headers?q=1");
    assert_eq!(seen["headers"]["cookie"], "a=1; b=2");
    assert_eq!(seen["headers"]["x-request-id"], "mine-1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert!(
        seen["headers"]["host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(seen["headers"].get("te").is_none(), "{out}");

    // A chunked answer streams: the first chunk reaches the caller before the second is sent.
    let flag = dir.path().join("got-first");
    let chunks = at(&format!("/web/chunks?flag={}", flag.display()));
    let mut streaming =
        Proc::spawn(Command::new(&curl).args(["-sS", "-N", "--http2-prior-knowledge", &chunks]));
    streaming.wait_for("first");
    std::fs::write(&flag, "").unwrap();
    let (ok, out) = streaming.finish();
    assert!(ok, "{out}");
    assert!(out.contains("second"), "{out}");

    // An instance killed mid-answer: the caller sees the answer break off, not a short body
    // that looks whole, and the gateway goes on serving.
    let flag = dir.path().join("never");
    let chunks = at(&format!("/solo/chunks?flag={}", flag.display()));
    let mut broken =
        Proc::spawn(Command::new(&curl).args(["-sS", "-N", "--http2-prior-knowledge", &chunks]));
    broken.wait_for("first");
    solo.process.kill9();
    let (ok, out) = broken.finish();
    assert!(!ok, "a broken answer is not a whole one: {out}");

    // kill -9 of an instance under steady GETs on one HTTP/2 connection: none fails.
    a.process.kill9();
    let Some(h2load) = require_program("h2load") else {
        return;
    };
    let (ok, out, err) = run(Command::new(h2load)
        .args(["-n", "60", "-c", "1", "-m", "1"])
        .arg(at("/web/whoami")));
    assert!(ok, "{err}");
    assert!(out.contains("60 succeeded, 0 failed, 0 errored"), "{out}");
    assert!(
        out.contains("status codes: 60 2xx, 0 3xx, 0 4xx, 0 5xx"),
        "{out}"
    );
}

#[test]
fn failures_get_clear_answers_and_the_gateway_keeps_serving() {
    if !python_ready("json") {
        return;
    }
    let registry = registry();
    let url = registry.url();
    let _a = backend("http", "web", "a", &url, &[]);
    let _b = backend("http", "web", "b", &url, &[]);
    // Registered, but nothing listens on its port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let mut dead = Proc::spawn(Command::new(EXE).args([
        "register",
        "dead",
        "--registry",
        &url,
        "--id",
        "d1",
        "--address",
        "127.0.0.1",
        "--port",
        &closed_port,
        "--ttl",
        "5s",
    ]));
    dead.wait_for("keeping it alive");
    let gw = gateway(&url, &["--request-timeout", "1s"]);
    wait_until_served_by(gw.addr, "/web/whoami", &["a", "b"]);

    let json = |body: &str| -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    };
    let (status, head, body) = http(
        gw.addr,
        "GET /nope/x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 404);
    assert_eq!(json(&body)["service"], "nope");
    // Dated, as every answer from an origin with a clock.
    let date = head
        .lines()
        .find_map(|l| l.strip_prefix("date: "))
        .unwrap_or_else(|| panic!("no date in {head:?}"));
    let age = std::time::SystemTime::now()
        .duration_since(httpdate::parse_http_date(date).unwrap())
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "{date}");
    let (status, body) = get(gw.addr, "/dead/x");
    assert_eq!(status, 503, "{body}");
    let answer = json(&body);
    assert_eq!(answer["service"], "dead");
    assert!(
        answer["error"].as_str().unwrap().contains("connect"),
        "{body}"
    );
    for path in ["/", "//x", "/Not_A_Name/x"] {
        let (status, body) = get(gw.addr, path);
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            json(&body)["error"].as_str().unwrap().contains("service"),
            "{body}"
        );
    }
    let started = Instant::now();
    let (status, body) = get(gw.addr, "/web/hang");
    assert_eq!(status, 504, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("did not answer within")
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // An instance's own 503 is passed on once every instance has said it; a GET was retried.
    let retries = "signpost_gateway_retries_total{service=\"web\"}";
    let before = metric(&gw, retries);
    let (status, body) = get(gw.addr, "/web/unavailable");
    assert_eq!(status, 503);
    assert_eq!(body, "down for maintenance");
    assert_eq!(metric(&gw, retries), before + 1.0);

    // Bad bytes: a clear 4xx each, and the gateway goes on.
    let big = "x".repeat(70 * 1024);
    let (status, _, _) = http(
        gw.addr,
        &format!("GET /web/whoami HTTP/1.1\r\nHost: gw\r\nX-Big: {big}\r\n\r\n"),
    );
    assert_eq!(status, 431);
    let (status, _, _) = http(gw.addr, "NOT HTTP AT ALL\r\n\r\n");
    assert_eq!(status, 400);
    let (status, _, _) = http(
        gw.addr,
        "GET /web/whoami HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n",
    );
    assert_eq!(status, 400);
    let (status, body) = get(gw.addr, "/web/whoami");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn routing_goes_on_while_the_registry_is_down_and_after_it_restarts_empty() {
    if !python_ready("json") {
        return;
    }
    let registry = registry();
    let url = registry.url();
    let registry_addr = registry.addr.to_string();
    let _a = backend("http", "web", "a", &url, &[]);
    let _b = backend("http", "web", "b", &url, &[]);
    let gw = gateway(&url, &[]);
    wait_until_served_by(gw.addr, "/web/whoami", &["a", "b"]);

    registry.kill9();
    for _ in 0..50 {
        let (status, body) = get(gw.addr, "/web/whoami");
        assert_eq!(status, 200, "{body}");
    }
    // Back, empty: the instances register again meanwhile; nothing fails in between.
    let restarted = ServerProcess::start_at(Path::new(EXE), &registry_addr, &["--store", "memory"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let ls = |registry: &ServerProcess| {
        run(Command::new(EXE).args(["ls", "web", "--registry", &registry.url()])).1
    };
    loop {
        let (status, body) = get(gw.addr, "/web/whoami");
        assert_eq!(status, 200, "{body}");
        let listed = ls(&restarted);
        if listed.contains(" a ") || listed.lines().filter(|l| l.contains("127.0.0.1")).count() == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the instances did not register again: {listed}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_until_served_by(gw.addr, "/web/whoami", &["a", "b"]);
}

#[test]
fn sigterm_lets_a_request_in_flight_finish() {
    if !python_ready("json") {
        return;
    }
    let registry = registry();
    let _a = backend("http", "web", "a", &registry.url(), &[]);
    let gw = gateway(&registry.url(), &[]);
    wait_until_served_by(gw.addr, "/web/whoami", &["a"]);
    let flags = tempfile::tempdir().unwrap();
    let flag = flags.path().join("go");
    let mut stream = ask_for_chunks(gw.addr, &flag);
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200"));
    let Gateway { mut process, .. } = gw;
    process.signal("TERM");
    process.wait_for("draining");
    std::fs::write(&flag, "").unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(
        String::from_utf8_lossy(&rest).contains("second"),
        "the answer was cut"
    );
    let (ok, out) = process.finish();
    assert!(ok, "the gateway exited with an error: {out}");
}

#[test]
fn an_instance_registered_as_h2c_is_reached_over_http2() {
    // The registry itself stands in for an HTTP/2-only server: tonic speaks no HTTP/1.1.
    let registry = registry();
    let url = registry.url();
    let port = registry.addr.port().to_string();
    let register = |service: &str, extra: &[&str]| {
        let mut p = Proc::spawn(
            Command::new(EXE)
                .args(["register", service, "--registry", &url, "--id", "r1"])
                .args(["--address", "127.0.0.1", "--port", &port, "--ttl", "5s"])
                .args(extra),
        );
        p.wait_for("keeping it alive");
        p
    };
    let _h2 = register("h2", &["--meta", "protocol=h2c"]);
    let _h1 = register("h1", &[]);
    let gw = gateway(&url, &[]);
    let path = "/h2/grpc.health.v1.Health/Check";
    let deadline = Instant::now() + DEADLINE;
    let head = loop {
        let (status, head, _) = http(
            gw.addr,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        );
        if status == 200 {
            break head;
        }
        assert!(Instant::now() < deadline, "{status} {head}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // tonic answered (over HTTP/2): a gRPC status for the empty request.
    assert!(head.contains("grpc-status"), "{head}");
    // The same server without the metadata is spoken to in HTTP/1.1, which it does not speak.
    let (status, body) = get(gw.addr, "/h1/grpc.health.v1.Health/Check");
    assert_eq!(status, 503, "{body}");
}

#[test]
fn the_tls_listener_speaks_http2_and_http1_by_alpn() {
    if !python_ready("json") {
        return;
    }
    let Some(curl) = require_program("curl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = signpost_tests::tls::Pki::new("gateway");
    pki.write(dir.path());
    let registry = registry();
    let _a = backend("http", "web", "a", &registry.url(), &[]);
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server.key");
    let mut gw = gateway(
        &registry.url(),
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    wait_until_served_by(gw.addr, "/web/whoami", &["a"]);
    let line = gw
        .process
        .seen
        .iter()
        .find(|l| l.contains("gateway serving HTTPS"))
        .cloned()
        .unwrap_or_else(|| gw.process.wait_for("gateway serving HTTPS"));
    let https = field(&line, "addr");
    let ca = dir.path().join("ca.pem");
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (ok, out, err) = run(Command::new(&curl)
            .args(["-s", flag, "--cacert"])
            .arg(&ca)
            .args([
                "-w",
                " %{http_version}",
                &format!("https://{https}/web/headers"),
            ]));
        assert!(ok, "{err}");
        let (body, got) = out.rsplit_once(' ').unwrap();
        assert_eq!(got, version, "{out}");
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    }
}

#[test]
fn an_instance_that_keeps_failing_is_ejected_and_the_rest_take_its_share() {
    if !python_ready("json") {
        return;
    }
    let registry = registry();
    let url = registry.url();
    let _good = backend("http", "flaky", "good", &url, &[]);
    let _bad = backend_with("http", "flaky", "bad", &url, &[], &["--status", "500"]);
    let gw = gateway(&url, &[]);
    // Every answer counts, from the first one the gateway gives.
    let deadline = Instant::now() + DEADLINE;
    let mut failures = 0;
    let mut answers = Vec::new();
    while answers.len() < 60 {
        let (status, body) = get(gw.addr, "/flaky/whoami");
        assert!(Instant::now() < deadline, "{answers:?}");
        match status {
            500 => failures += 1,
            200 => {}
            // Not in the gateway's view yet.
            _ => continue,
        }
        answers.push((status, body));
    }
    // Five failures in a row on the one instance eject it; after that every answer is good.
    assert_eq!(failures, 5, "{answers:?}");
    assert!(
        answers[answers.len() - 20..]
            .iter()
            .all(|(s, b)| *s == 200 && b == "good")
    );
    assert_eq!(
        metric(&gw, "signpost_gateway_ejections_total{service=\"flaky\"}"),
        1.0
    );
}

#[test]
fn an_instance_that_breaks_off_its_answers_is_ejected_whatever_path_they_take() {
    if !python_ready("json") {
        return;
    }
    let Some(curl) = require_program("curl") else {
        return;
    };
    let registry = registry();
    let url = registry.url();
    let _good = backend("http", "cut", "good", &url, &[]);
    // Its every answer promises 100 bytes more than it sends, then the connection closes.
    let _bad = backend_with("http", "cut", "bad", &url, &[], &["--cut"]);
    let gw = gateway(&url, &[]);
    let big = 256 * 1024;
    let content_length = |head: &str| -> Option<usize> {
        head.lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(str::to_owned)
            })
            .and_then(|v| v.trim().parse().ok())
    };
    // Each of the gateway's ways to an HTTP/1.1 instance in turn: HTTP/1.1 GETs (its own
    // path), POSTs (hyper's client), small answers read whole and large ones streamed, and
    // h2c GETs. `Some(true)` is a whole answer from the good instance, `Some(false)` a broken
    // one, `None` an answer from before the gateway knew the service.
    let ask = |n: usize| -> Option<bool> {
        let (status, head, body) = match n % 5 {
            0 => http(
                gw.addr,
                "GET /cut/whoami HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
            ),
            1 => http(
                gw.addr,
                "POST /cut/whoami HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\nContent-Length: 1\r\n\r\np",
            ),
            2 => http(
                gw.addr,
                "GET /cut/big HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
            ),
            3 => http(
                gw.addr,
                "POST /cut/big HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\nContent-Length: 1\r\n\r\np",
            ),
            _ => {
                let (_, out, _) = curl_h2(
                    &curl,
                    ["-o", "-", "-w", "\n%{http_code}"].as_slice(),
                    &format!("http://{}/cut/whoami", gw.addr),
                );
                let (body, status) = out.rsplit_once('\n').unwrap_or(("", "0"));
                let status = status.trim().parse().unwrap_or(0);
                let head = format!("content-length: {}", body.len());
                (status, head, body.to_owned())
            }
        };
        match status {
            200 => {
                let whole = content_length(&head) == Some(body.len())
                    && (body == "good" || body == "good:p" || body.len() == big);
                Some(whole)
            }
            502 => Some(false),
            _ => None,
        }
    };
    let deadline = Instant::now() + DEADLINE;
    let mut answers = Vec::new();
    let mut n = 0;
    while answers.len() < 60 {
        assert!(Instant::now() < deadline, "{answers:?}");
        if let Some(whole) = ask(n) {
            answers.push(whole);
        }
        n += 1;
    }
    // Five broken answers in a row eject the instance, whichever path each took; a good head
    // before a broken body must not count as a success that starts the run again.
    let broken = answers.iter().filter(|whole| !**whole).count();
    assert_eq!(broken, 5, "{answers:?}");
    assert!(answers[answers.len() - 20..].iter().all(|whole| *whole));
    assert_eq!(
        metric(&gw, "signpost_gateway_ejections_total{service=\"cut\"}"),
        1.0
    );
    // Each request is counted once, by the code its caller got.
    let counted = metric(
        &gw,
        "signpost_gateway_requests_total{service=\"cut\",code=\"200\"}",
    ) + metric(
        &gw,
        "signpost_gateway_requests_total{service=\"cut\",code=\"502\"}",
    );
    assert_eq!(counted, answers.len() as f64, "{answers:?}");
}
