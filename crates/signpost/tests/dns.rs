//! `signpost serve --dns-listen` as its users meet it: `dig` and dnspython asking every name
//! form, health checks of a real HTTP backend turning answers on and off, 200 instances that do
//! not fit a UDP answer, random bytes thrown at the port, and nginx reaching a backend through
//! its `resolver`.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use signpost_tests::DEADLINE;
use signpost_tests::process::{
    ServerProcess, cli, logged_addr, require_program, require_python_modules, run,
};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

fn client_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dns/client.py")
}

/// A memory-store server answering DNS; its DNS address.
fn start(args: &[&str]) -> (ServerProcess, SocketAddr) {
    let mut all = vec!["--store", "memory", "--dns-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut server = ServerProcess::start(Path::new(EXE), &all);
    let addr = logged_addr(&mut server, "dns on ");
    (server, addr)
}

/// `signpost ARGS --registry URL`, which must succeed.
fn signpost(server: &ServerProcess, args: &[&str]) -> String {
    cli(Path::new(EXE), server, args)
}

fn register(server: &ServerProcess, service: &str, address: &str, port: u16, extra: &[&str]) {
    let port = port.to_string();
    let mut args = vec!["register", service, "--address", address, "--port", &port];
    args.extend_from_slice(extra);
    signpost(server, &args);
}

/// `dig @DNS ARGS`, its whole output.
fn dig(dns: SocketAddr, args: &[&str]) -> String {
    let (ok, out, err) = run(Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .args(["-p", &dns.port().to_string(), "+time=5", "+tries=1"])
        .args(args));
    assert!(ok, "dig {args:?} failed: {out}{err}");
    out
}

/// The answer section of `dig +short`, sorted.
fn short(dns: SocketAddr, name: &str, rtype: &str) -> Vec<String> {
    let mut lines: Vec<String> = dig(dns, &["+short", name, rtype])
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    lines
}

/// The text with every run of whitespace as one space (dig aligns columns with tabs or spaces).
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn status(output: &str) -> &str {
    output
        .split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no status in {output}"))
}

fn flags(output: &str) -> Vec<&str> {
    output
        .split(";; flags: ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no flags in {output}"))
        .split_whitespace()
        .collect()
}

/// "ANSWER: N" of a dig header.
fn count(output: &str, section: &str) -> usize {
    output
        .split(&format!("{section}: "))
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {section} count in {output}"))
}

/// dnspython's answer (sorted records, then `ttl N`), or NXDOMAIN / NODATA.
fn python_resolve(dns: SocketAddr, name: &str, rtype: &str) -> Vec<String> {
    let (ok, out, err) = run(Command::new("python3").arg(client_py()).args([
        "resolve",
        &dns.ip().to_string(),
        &dns.port().to_string(),
        name,
        rtype,
    ]));
    assert!(ok, "dnspython failed: {out}{err}");
    out.lines().map(str::to_owned).collect()
}

fn tools() -> bool {
    require_program("dig").is_some() && require_python_modules(&[("dns.resolver", "dnspython")])
}

/// Polls `check` until it holds, up to `limit`.
fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_name_form_answers_the_healthy_instances() {
    if !tools() {
        return;
    }
    let (server, dns) = start(&[]);
    register(
        &server,
        "web",
        "10.0.0.1",
        8080,
        &["--tag", "v2", "--meta", "port.metrics=9090"],
    );
    register(
        &server,
        "web",
        "10.0.0.2",
        8081,
        &["--weight", "300", "--meta", "port-name=http"],
    );
    register(&server, "web", "fd00::3", 8082, &[]);
    register(&server, "web", "db.example.com", 5432, &[]);
    register(&server, "web", "10.9.9.9", 80, &["-n", "payments"]);
    register(&server, "api.v1", "10.0.1.1", 7000, &[]);

    let both = ["10.0.0.1", "10.0.0.2"];
    // Consul's names.
    assert_eq!(short(dns, "web.service.signpost", "A"), both);
    assert_eq!(
        short(dns, "WEB.Service.SIGNPOST", "A"),
        both,
        "names have no case"
    );
    assert_eq!(short(dns, "v2.web.service.signpost", "A"), ["10.0.0.1"]);
    assert_eq!(
        short(dns, "web.service.payments.signpost", "A"),
        ["10.9.9.9"]
    );
    assert_eq!(short(dns, "web.service.signpost", "AAAA"), ["fd00::3"]);
    let srv = short(dns, "_web._tcp.service.signpost", "SRV");
    assert_eq!(
        srv,
        [
            "1 100 5432 db.example.com.",
            "1 100 8080 0a000001.addr.signpost.",
            "1 100 8082 fd000000000000000000000000000003.addr.signpost.",
            "1 300 8081 0a000002.addr.signpost.",
        ],
        "port and weight from the instance; hostnames are targets as they are"
    );
    assert_eq!(
        short(dns, "_web._v2.service.signpost", "SRV"),
        ["1 100 8080 0a000001.addr.signpost."]
    );
    // The SRV targets resolve, and come along as glue.
    assert_eq!(short(dns, "0a000001.addr.signpost", "A"), ["10.0.0.1"]);
    let full = words(&dig(dns, &["web.service.signpost", "SRV"]));
    assert_eq!(count(&full, "ANSWER"), 4);
    assert!(
        full.contains("0a000002.addr.signpost. 5 IN A 10.0.0.2"),
        "{full}"
    );
    assert!(full.contains("IN AAAA fd00::3"), "{full}");

    // Kubernetes' names.
    assert_eq!(short(dns, "web.default.svc.signpost", "A"), both);
    assert_eq!(short(dns, "web.payments.svc.signpost", "A"), ["10.9.9.9"]);
    assert_eq!(
        short(dns, "api.v1.default.svc.signpost", "A"),
        ["10.0.1.1"],
        "a dotted service name"
    );
    assert_eq!(
        short(dns, "_metrics._tcp.web.default.svc.signpost", "SRV"),
        ["1 100 9090 0a000001.addr.signpost."],
        "metadata port.metrics names a port"
    );
    assert_eq!(
        short(dns, "_http._tcp.web.default.svc.signpost", "SRV"),
        ["1 300 8081 0a000002.addr.signpost."],
        "metadata port-name names the instance's port"
    );

    // dnspython, as an application resolves, agrees.
    assert_eq!(
        python_resolve(dns, "web.service.signpost", "A"),
        ["10.0.0.1", "10.0.0.2", "ttl 5"]
    );
    assert_eq!(
        python_resolve(dns, "_http._tcp.web.default.svc.signpost", "SRV")[0],
        "1 300 8081 0a000002.addr.signpost."
    );

    // What is not there, and what is not ours.
    let unknown = dig(dns, &["nope.service.signpost", "A"]);
    assert_eq!(status(&unknown), "NXDOMAIN");
    assert!(flags(&unknown).contains(&"aa"), "{unknown}");
    assert!(
        words(&unknown).contains("IN SOA ns.signpost. hostmaster.signpost."),
        "negative answers carry the SOA: {unknown}"
    );
    assert_eq!(
        python_resolve(dns, "nope.service.signpost", "A"),
        ["NXDOMAIN"]
    );
    assert_eq!(
        status(&dig(dns, &["v9.web.service.signpost", "A"])),
        "NXDOMAIN",
        "no instance has the tag"
    );
    assert_eq!(status(&dig(dns, &["web.node.signpost", "A"])), "NXDOMAIN");
    let txt = dig(dns, &["web.service.signpost", "TXT"]);
    assert_eq!(
        (status(&txt), count(&txt, "ANSWER")),
        ("NOERROR", 0),
        "NODATA: {txt}"
    );
    assert_eq!(
        python_resolve(dns, "web.service.signpost", "TXT"),
        ["NODATA"]
    );
    for between in [
        "service.signpost",
        "default.svc.signpost",
        "_tcp.service.signpost",
    ] {
        let out = dig(dns, &[between, "A"]);
        assert_eq!(
            (status(&out), count(&out, "ANSWER")),
            ("NOERROR", 0),
            "a name with names below it exists: {out}"
        );
    }
    // dig reports a refused transfer as a failed one.
    assert!(dig(dns, &["+tcp", "signpost", "AXFR"]).contains("Transfer failed"));
    let other = dig(dns, &["example.com", "A"]);
    assert_eq!(status(&other), "REFUSED", "no recursion: {other}");
    assert!(!flags(&other).contains(&"ra"), "{other}");
    assert_eq!(
        short(dns, "signpost", "SOA"),
        ["ns.signpost. hostmaster.signpost. 1 3600 600 86400 5"]
    );

    // EDNS: answered with EDNS; a version we do not speak is BADVERS.
    assert!(dig(dns, &["web.service.signpost"]).contains("; EDNS: version: 0"));
    assert_eq!(
        status(&dig(
            dns,
            &["+edns=1", "+noednsneg", "web.service.signpost"]
        )),
        "BADVERS"
    );
    // Without EDNS, still answered (in 512 bytes).
    assert_eq!(
        status(&dig(dns, &["+noedns", "web.service.signpost"])),
        "NOERROR"
    );

    // The same server, stopped as systemd stops it.
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_consul_domain_and_namespaces_kept_out() {
    if !tools() {
        return;
    }
    let (server, dns) = start(&[
        "--dns-domain",
        "consul",
        "--dns-namespaces",
        "default",
        "--dns-ttl",
        "30s",
    ]);
    register(&server, "web", "10.0.0.1", 8080, &[]);
    register(&server, "web", "10.0.0.2", 8080, &["-n", "secret"]);
    assert_eq!(short(dns, "web.service.consul", "A"), ["10.0.0.1"]);
    assert_eq!(
        python_resolve(dns, "web.service.consul", "A"),
        ["10.0.0.1", "ttl 30"]
    );
    assert_eq!(
        status(&dig(dns, &["web.service.secret.consul"])),
        "NXDOMAIN"
    );
    assert_eq!(status(&dig(dns, &["web.service.signpost"])), "REFUSED");
}

/// An HTTP server whose `/health` answers 200 or 500 as `healthy` says; every other path 200
/// with `name`.
struct Backend {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
}

impl Backend {
    fn start(ip: &str, port: u16, name: &'static str) -> Backend {
        let listener = TcpListener::bind((ip, port)).unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = [0u8; 2048];
                let n = stream.read(&mut request).unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..n]);
                let (code, body) =
                    if request.starts_with("GET /health") && !flag.load(Ordering::SeqCst) {
                        ("500 Internal Server Error", "sick")
                    } else {
                        ("200 OK", name)
                    };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Backend { addr, healthy }
    }
}

#[test]
fn a_failing_check_takes_the_instance_out_of_the_next_answers() {
    if !tools() {
        return;
    }
    let (server, dns) = start(&["--dns-ttl", "1s"]);
    let backend = Backend::start("127.0.0.1", 0, "one");
    let port = backend.addr.port();
    register(
        &server,
        "web",
        "127.0.0.1",
        port,
        &["--http-check", "/health", "--interval", "1s"],
    );
    let name = "web.service.signpost";
    eventually("the instance answers", DEADLINE, || {
        short(dns, name, "A") == ["127.0.0.1"]
    });

    backend.healthy.store(false, Ordering::SeqCst);
    // One failing probe turns it critical; the answer follows the registry at once, and a
    // resolver that cached it holds it for the TTL (1 s).
    let failed = Instant::now();
    eventually("a critical instance leaves the answers", DEADLINE, || {
        let out = dig(dns, &[name, "A"]);
        status(&out) == "NOERROR" && count(&out, "ANSWER") == 0
    });
    let gone_after = failed.elapsed();
    // The check runs every second and one failure turns it critical: the answers follow the
    // registry at once, so well within a few check intervals (a resolver may add its TTL).
    assert!(gone_after < Duration::from_secs(5), "{gone_after:?}");
    let nodata = dig(dns, &[name, "A"]);
    assert!(
        words(&nodata).contains("IN SOA"),
        "NODATA carries the SOA: {nodata}"
    );
    assert_eq!(python_resolve(dns, name, "A"), ["NODATA"]);

    backend.healthy.store(true, Ordering::SeqCst);
    eventually("a recovered instance comes back", DEADLINE, || {
        short(dns, name, "A") == ["127.0.0.1"]
    });
    eprintln!("a failing instance left the DNS answers {gone_after:?} after its backend failed");
}

#[test]
fn two_hundred_instances_are_cut_over_udp_and_whole_over_tcp() {
    if !tools() {
        return;
    }
    let (server, dns) = start(&[]);
    for i in 0..200u16 {
        let address = format!("10.1.{}.{}", i / 100, i % 100 + 1);
        register(&server, "big", &address, 9000 + i, &[]);
    }
    let name = "big.service.signpost";
    let udp = dig(dns, &["+ignore", "+bufsize=1232", name, "A"]);
    assert!(flags(&udp).contains(&"tc"), "{udp}");
    assert_eq!(count(&udp, "ANSWER"), 32, "--dns-udp-max-records' default");
    // However much a client offers, a UDP answer stays unfragmented.
    let offered = dig(dns, &["+ignore", "+bufsize=4096", name, "SRV"]);
    let size: usize = offered
        .split("MSG SIZE  rcvd: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {offered}"));
    assert!(size <= 1232 && flags(&offered).contains(&"tc"), "{offered}");
    let plain = dig(dns, &["+ignore", "+noedns", name, "SRV"]);
    assert!(flags(&plain).contains(&"tc"), "{plain}");
    let srv = count(&plain, "ANSWER");
    assert!((1..32).contains(&srv), "what fits 512 bytes: {srv}");
    assert_eq!(
        count(&plain, "ADDITIONAL"),
        srv,
        "glue for every SRV record kept"
    );

    // dig falls back to TCP on TC, as resolvers do, and gets everything.
    let whole = dig(dns, &[name, "SRV"]);
    assert!(!flags(&whole).contains(&"tc"), "{whole}");
    assert_eq!(count(&whole, "ANSWER"), 200);
    assert_eq!(
        count(&whole, "ADDITIONAL"),
        201,
        "200 glue records and EDNS"
    );
    let tcp = short(dns, name, "A");
    assert_eq!(tcp.len(), 200);
    let resolved = python_resolve(dns, name, "A");
    assert_eq!(resolved.len(), 201, "dnspython retries over TCP too");

    // Shuffled: the first record of a cut answer is not always the same.
    let firsts: std::collections::HashSet<String> = (0..10)
        .map(|_| {
            dig(dns, &["+ignore", "+short", name, "A"])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert!(
        firsts.len() > 1,
        "the same first record ten times: {firsts:?}"
    );
}

#[test]
fn random_packets_never_stop_the_server() {
    if !tools() {
        return;
    }
    let (mut server, dns) = start(&[]);
    register(&server, "web", "10.0.0.1", 8080, &[]);
    let (ok, out, err) = run(Command::new("python3").arg(client_py()).args([
        "fuzz",
        &dns.ip().to_string(),
        &dns.port().to_string(),
        "20000",
        "7",
    ]));
    assert!(ok, "the fuzzer failed: {out}{err}");
    assert!(
        out.contains("silent connection closed=True"),
        "a silent TCP connection is closed: {out}"
    );
    assert!(server.is_running(), "the server died");
    assert_eq!(short(dns, "web.service.signpost", "A"), ["10.0.0.1"]);
    let tcp = dig(dns, &["+tcp", "web.service.signpost", "A"]);
    assert_eq!(status(&tcp), "NOERROR", "{tcp}");
    // And gRPC on the same server still answers.
    assert!(signpost(&server, &["ls", "web"]).contains("10.0.0.1"));
}

/// nginx, killed when dropped.
struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: SocketAddr) -> Option<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[test]
fn nginx_reaches_a_backend_by_its_dns_name_and_follows_changes() {
    let Some(nginx) = require_program("nginx").or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nginx");
        sbin.is_file().then_some(sbin)
    }) else {
        return;
    };
    let (server, dns) = start(&["--dns-ttl", "1s"]);
    // Two backends on one port, at two loopback addresses: nginx's proxy_pass names the port.
    let one = Backend::start("127.0.0.1", 0, "backend-one");
    let port = one.addr.port();
    let two = Backend::start("127.0.0.2", port, "backend-two");
    register(&server, "web", "127.0.0.1", port, &["--id", "one"]);

    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let d = dir.path().display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
         error_log stderr warn;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
           uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           resolver 127.0.0.1:{dns_port} valid=1s ipv6=off;\n\
           resolver_timeout 2s;\n\
           server {{\n\
             listen 127.0.0.1:{listen};\n\
             location / {{ set $svc web.service.signpost; proxy_pass http://$svc:{port}; }}\n\
           }}\n\
         }}\n",
        dns_port = dns.port(),
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(nginx)
        .args(["-p", &d.to_string(), "-c"])
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _nginx = Nginx { child, _dir: dir };
    let front = SocketAddr::from(([127, 0, 0, 1], listen));
    let reaches = |text: &'static str| {
        move || http_get(front).is_some_and(|r| r.starts_with("HTTP/1.1 200") && r.ends_with(text))
    };
    eventually(
        "nginx reaches backend one by name",
        DEADLINE,
        reaches("backend-one"),
    );

    // The instance moves: nginx follows once its 1 s cache of the name runs out.
    register(&server, "web", "127.0.0.2", port, &["--id", "two"]);
    signpost(&server, &["deregister", "web", "one"]);
    eventually(
        "nginx follows to backend two",
        DEADLINE,
        reaches("backend-two"),
    );
    drop((one, two));
}

#[test]
fn the_readme_dig_examples_answer_as_their_comments_say() {
    if !tools() {
        return;
    }
    let (server, dns) = start(&[]);
    let block = signpost_tests::process::readme_block("dns-dig");
    let mut lines = block.lines();
    let register: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(register[0], "signpost");
    signpost(&server, &register[1..]);
    let mut answers = Vec::new();
    for line in lines {
        let command = line.split('#').next().unwrap();
        let words: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(words[..4], ["dig", "@127.0.0.1", "-p", "8600"], "{line}");
        let out = dig(dns, &words[4..]);
        answers.push(out.trim().to_owned());
    }
    assert_eq!(
        answers,
        [
            "10.0.0.1",
            "10.0.0.1",
            "1 100 8080 0a000001.addr.signpost.",
            "10.0.0.1",
            "1 100 8080 0a000001.addr.signpost.",
        ]
    );
}
