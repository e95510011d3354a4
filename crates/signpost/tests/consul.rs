//! `signpost serve --http-listen` as Consul's users meet it: python-consul and py-consul code
//! (tests/consul/scenario.py) against real HTTP backends, a real Prometheus scraping what
//! Signpost lists through `http_sd_configs`, Traefik's Consul Catalog provider routing to
//! registered backends, and the gRPC API and the Consul API agreeing on the same instances.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use signpost_tests::process::{
    ServerProcess, cli, logged_addr, python_package_dir, readme_block, require_program, run,
};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

/// A memory-store server with the HTTP API; its HTTP address.
fn start(args: &[&str]) -> (ServerProcess, SocketAddr) {
    let mut all = vec!["--store", "memory", "--http-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut server = ServerProcess::start(Path::new(EXE), &all);
    let addr = logged_addr(&mut server, "http api on http://");
    (server, addr)
}

/// `signpost ARGS --registry URL`, which must succeed.
fn signpost(server: &ServerProcess, args: &[&str]) -> String {
    cli(Path::new(EXE), server, args)
}

/// One HTTP/1.0 request (so that no server answers chunked): its status and body.
fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    body: &str,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = call(addr, "GET", path, "localhost", "").expect("an answer");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Polls `check` until it holds, up to `limit`.
fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scenario(package: &str) {
    let Some(dir) = python_package_dir(package) else {
        return;
    };
    let (_server, http) = start(&[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/consul/scenario.py");
    let (ok, out, err) = run(Command::new("python3")
        .env("PYTHONPATH", &dir)
        .arg(script)
        .args([http.ip().to_string(), http.port().to_string()]));
    assert!(
        ok && out.ends_with("done\n"),
        "{package} scenario failed:\n{out}\n{err}"
    );
}

#[test]
fn py_consul_code_registers_checks_and_blocks_against_signpost() {
    scenario("py-consul");
}

#[test]
fn python_consul_code_registers_checks_and_blocks_against_signpost() {
    scenario("python-consul");
}

#[test]
fn grpc_and_the_consul_api_see_the_same_instances() {
    let (server, http) = start(&[]);
    // One registered through gRPC (the CLI), one through Consul's API.
    signpost(
        &server,
        &[
            "register",
            "pay",
            "--id",
            "pay-1",
            "--address",
            "10.1.0.1",
            "--port",
            "8443",
            "--tag",
            "blue",
            "--meta",
            "version=2",
            "--weight",
            "7",
        ],
    );
    let body = r#"{"Name": "pay", "ID": "pay-2", "Address": "10.1.0.2", "Port": 8443,
        "Tags": ["green"], "Meta": {"version": "3"}, "Weights": {"Passing": 5, "Warning": 1}}"#;
    let (status, text) =
        call(http, "PUT", "/v1/agent/service/register", "localhost", body).unwrap();
    assert_eq!(status, 200, "{text}");

    let grpc: Value =
        serde_json::from_str(&signpost(&server, &["ls", "pay", "-o", "json"])).unwrap();
    let consul = get_json(http, "/v1/health/service/pay");
    let from_grpc: Vec<Value> = grpc
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            serde_json::json!([
                i["id"],
                i["address"],
                i["port"],
                i["tags"],
                i["metadata"],
                i["weight"],
                i["health"].as_str().unwrap().to_ascii_lowercase()
            ])
        })
        .collect();
    let from_consul: Vec<Value> = consul
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = &e["Service"];
            serde_json::json!([
                s["ID"],
                s["Address"],
                s["Port"],
                s["Tags"],
                s["Meta"],
                s["Weights"]["Passing"],
                e["Checks"][0]["Status"]
            ])
        })
        .collect();
    assert_eq!(from_grpc, from_consul);
    assert_eq!(from_grpc.len(), 2);

    // Deregistered through Consul, gone for gRPC.
    let (status, _) = call(
        http,
        "PUT",
        "/v1/agent/service/deregister/pay-1",
        "localhost",
        "",
    )
    .unwrap();
    assert_eq!(status, 200);
    let grpc: Value =
        serde_json::from_str(&signpost(&server, &["ls", "pay", "-o", "json"])).unwrap();
    assert_eq!(grpc.as_array().unwrap().len(), 1);
    assert_eq!(grpc[0]["id"], "pay-2");
}

#[test]
fn tokens_reach_the_consul_api_however_consul_clients_send_them() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[token]]\nname = \"app\"\nsecret = \"s3cret\"\nread = [\"default\"]\nwrite = [\"default\"]\n\n\
         [[token]]\nname = \"reader\"\nsecret = \"look\"\nread = [\"default\"]\n",
    )
    .unwrap();
    let (_server, http) = start(&["--auth-tokens", tokens.to_str().unwrap()]);
    let body = r#"{"Name": "api", "Address": "10.0.0.1", "Port": 80}"#;
    let put = |path: &str, header: &str| {
        let mut stream = TcpStream::connect(http).unwrap();
        write!(
            stream,
            "PUT {path} HTTP/1.0\r\nHost: x\r\n{header}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    let code = |response: &str| -> u16 {
        response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    let register = "/v1/agent/service/register";
    assert_eq!(code(&put(register, "")), 403, "no token");
    assert_eq!(code(&put(register, "X-Consul-Token: wrong\r\n")), 403);
    let refused = put(register, "X-Consul-Token: look\r\n");
    assert!(
        code(&refused) == 403 && refused.contains("may not write"),
        "{refused}"
    );
    assert_eq!(code(&put(register, "X-Consul-Token: s3cret\r\n")), 200);
    assert_eq!(code(&put(&format!("{register}?token=s3cret"), "")), 200);
    assert_eq!(
        code(&put(register, "Authorization: Bearer s3cret\r\n")),
        200
    );
    let (status, _) = call(http, "GET", "/v1/health/service/api", "x", "").unwrap();
    assert_eq!(status, 403, "a read needs a token too");
    let (status, body) = call(http, "GET", "/v1/health/service/api?token=look", "x", "").unwrap();
    assert_eq!(status, 200, "{body}");
}

/// An HTTP server that answers every request with its name (and `/metrics` in Prometheus'
/// text format), for as long as it lives.
struct Backend {
    addr: SocketAddr,
}

impl Backend {
    fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut request = [0u8; 4096];
                    let n = stream.read(&mut request).unwrap_or(0);
                    let request = String::from_utf8_lossy(&request[..n]);
                    let body = if request.starts_with("GET /metrics") {
                        format!("# TYPE backend_up gauge\nbackend_up{{name=\"{name}\"}} 1\n")
                    } else {
                        name.to_owned()
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        Backend { addr }
    }
}

fn prometheus() -> Option<PathBuf> {
    require_program("prometheus")
}

#[test]
fn prometheus_scrapes_what_signpost_lists_and_drops_it_when_deregistered() {
    let Some(prometheus) = prometheus() else {
        return;
    };
    let (server, http) = start(&[]);
    let backend = Backend::start("scraped");
    let port = backend.addr.port().to_string();
    signpost(
        &server,
        &[
            "register",
            "metrics-app",
            "--id",
            "m1",
            "--address",
            "127.0.0.1",
            "--port",
            &port,
            "--tag",
            "prod",
        ],
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    // The README's configuration, pointed at this server and polled faster.
    let scrape = readme_block("consul-prometheus")
        .replace("127.0.0.1:8500", &http.to_string())
        .replace("refresh_interval: 15s", "refresh_interval: 1s");
    assert!(
        scrape.contains(&format!("http://{http}/prometheus/targets")),
        "{scrape}"
    );
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n{scrape}\n"),
    )
    .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _prometheus = Killed(child);

    let targets = || -> Vec<Value> {
        call(web, "GET", "/api/v1/targets?state=active", "localhost", "")
            .filter(|(status, _)| *status == 200)
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .and_then(|v| v["data"]["activeTargets"].as_array().cloned())
            .unwrap_or_default()
    };
    let mut scraped = None;
    eventually(
        "Prometheus scrapes the registered instance",
        Duration::from_secs(30),
        || {
            scraped = targets()
                .into_iter()
                .find(|t| t["labels"]["service"] == "metrics-app" && t["health"] == "up");
            scraped.is_some()
        },
    );
    let target = scraped.unwrap();
    assert_eq!(target["labels"]["instance"], format!("127.0.0.1:{port}"));
    assert_eq!(target["labels"]["namespace"], "default");
    assert_eq!(target["discoveredLabels"]["__meta_signpost_tags"], ",prod,");
    assert_eq!(target["discoveredLabels"]["__meta_signpost_id"], "m1");

    signpost(&server, &["deregister", "metrics-app", "m1"]);
    eventually(
        "Prometheus drops the deregistered instance",
        Duration::from_secs(30),
        || {
            !targets()
                .iter()
                .any(|t| t["labels"]["service"] == "metrics-app")
        },
    );
}

#[test]
fn traefik_routes_to_the_catalog_and_follows_a_deregistration() {
    let Some(traefik) = require_program("traefik") else {
        return;
    };
    let (_server, http) = start(&[]);
    let (one, two) = (Backend::start("one"), Backend::start("two"));
    for (id, backend) in [("shop-1", &one), ("shop-2", &two)] {
        let body = format!(
            r#"{{"Name": "shop", "ID": "{id}", "Address": "127.0.0.1", "Port": {},
                "Check": {{"HTTP": "http://127.0.0.1:{}/health", "Interval": "1s"}}}}"#,
            backend.addr.port(),
            backend.addr.port()
        );
        let (status, text) = call(http, "PUT", "/v1/agent/service/register", "x", &body).unwrap();
        assert_eq!(status, 200, "{text}");
    }

    let entry = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(traefik)
        .current_dir(dir.path())
        .arg(format!("--entryPoints.web.address={entry}"))
        .arg("--providers.consulcatalog=true")
        .arg(format!("--providers.consulcatalog.endpoint.address={http}"))
        .arg("--providers.consulcatalog.refreshInterval=1s")
        .arg("--log.level=ERROR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _traefik = Killed(child);

    let answers = || -> Vec<String> {
        (0..10)
            .filter_map(|_| call(entry, "GET", "/", "shop", ""))
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
            .collect()
    };
    eventually(
        "Traefik reaches both instances of shop",
        Duration::from_secs(30),
        || {
            let seen = answers();
            seen.iter().any(|b| b == "one") && seen.iter().any(|b| b == "two")
        },
    );

    let (status, _) = call(http, "PUT", "/v1/agent/service/deregister/shop-2", "x", "").unwrap();
    assert_eq!(status, 200);
    eventually(
        "Traefik stops sending to the deregistered instance",
        Duration::from_secs(30),
        || {
            let seen = answers();
            seen.len() == 10 && seen.iter().all(|b| b == "one")
        },
    );
}

#[test]
fn bad_bytes_get_a_4xx_that_says_why_and_the_server_goes_on() {
    let (_server, http) = start(&[]);
    let register = "/v1/agent/service/register";
    let cases: [(&str, u16, &str); 5] = [
        ("{not json", 400, "decode"),
        ("[1, 2]", 400, "Invalid body: must be a JSON object"),
        (r#"{"Name": "web", "Port": "eighty"}"#, 400, "Port"),
        (r#"{"Name": "web", "Port": 70000}"#, 400, "Port"),
        (
            r#"{"Name": "web", "Port": 80, "Check": {"HTTP": "http://127.0.0.1/"}}"#,
            400,
            "Check",
        ),
    ];
    for (body, want, says) in cases {
        let (status, text) = call(http, "PUT", register, "x", body).unwrap();
        assert_eq!(status, want, "{body}: {text}");
        assert!(text.contains(says), "{body}: {text:?} should say {says:?}");
    }
    // A body larger than the server takes (1 MiB) is refused on its announced size.
    let mut stream = TcpStream::connect(http).unwrap();
    write!(
        stream,
        "PUT {register} HTTP/1.0\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n{{"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.0 413") || response.starts_with("HTTP/1.1 413"),
        "{response}"
    );
    assert!(response.contains("at most 1048576 bytes"), "{response}");
    // Random bytes where a request should be: the connection is refused, the server is not.
    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..50 {
        let mut stream = TcpStream::connect(http).unwrap();
        let garbage: Vec<u8> = (0..512)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed.to_le_bytes()[0]
            })
            .collect();
        let _ = stream.write_all(&garbage);
    }
    let (status, text) = call(http, "GET", "/v1/catalog/services", "x", "").unwrap();
    assert_eq!((status, text.as_str()), (200, "{}"));
    let (status, text) = call(http, "GET", "/v1/health/service/web?index=abc", "x", "").unwrap();
    assert_eq!(status, 400, "{text}");
    let (status, text) = call(
        http,
        "GET",
        "/v1/health/service/web?wait=forever&index=5",
        "x",
        "",
    )
    .unwrap();
    assert_eq!(status, 400, "{text}");
    let (status, text) = call(http, "GET", "/v1/health/service/web?dc=dc9", "x", "").unwrap();
    assert!(status == 400 && text.contains("dc9"), "{status} {text}");
}

#[test]
fn sigterm_answers_blocking_queries_instead_of_leaving_them_hanging() {
    let (server, http) = start(&[]);
    let (status, _) = call(
        http,
        "PUT",
        "/v1/agent/service/register",
        "x",
        r#"{"Name": "web", "Address": "10.0.0.1", "Port": 80}"#,
    )
    .unwrap();
    assert_eq!(status, 200);
    let mut first = TcpStream::connect(http).unwrap();
    write!(
        first,
        "GET /v1/health/service/web HTTP/1.0\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).unwrap();
    let index: u64 = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-consul-index: "))
        .and_then(|i| i.trim().parse().ok())
        .unwrap_or_else(|| panic!("no index in {answer}"));
    let mut stream = TcpStream::connect(http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The index the service is at: this query would wait its whole five minutes.
    write!(
        stream,
        "GET /v1/health/service/web?index={index}&wait=5m HTTP/1.0\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    // Still waiting a moment later: it did not answer at once.
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        stream.read(&mut byte).is_err(),
        "the blocking query answered before any change"
    );
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let _ = server.terminate();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the blocking query held the shutdown {:?}",
        started.elapsed()
    );
    // Answered with what it had, as a wait that ran out would be.
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    assert!(response.contains("10.0.0.1"), "{response}");
}

#[test]
fn the_readme_consul_snippet_runs_as_written() {
    let Some(dir) = python_package_dir("py-consul") else {
        return;
    };
    let (_server, http) = start(&[]);
    let snippet =
        readme_block("consul-python").replace("port=8500", &format!("port={}", http.port()));
    let (ok, out, err) = run(Command::new("python3")
        .env("PYTHONPATH", &dir)
        .args(["-c", &snippet]));
    assert!(ok, "{out}{err}");
    // Nothing listens on 8080 here: the check has not passed yet, and the instance says so.
    assert_eq!(out.trim(), "[('web-1', 'critical')]");
}
