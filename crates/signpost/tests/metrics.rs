//! `signpost serve --metrics-listen`: Prometheus text at /metrics that counts what happened.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use signpost_tests::process::{ServerProcess, run};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[test]
fn metrics_count_rpcs_instances_and_watches() {
    let mut server = ServerProcess::start(
        Path::new(EXE),
        &["--store", "memory", "--metrics-listen", "127.0.0.1:0"],
    );
    let line = server.wait_for_log("metrics on http://");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap()
        .to_owned();
    let url = server.url();
    let cli = |args: &[&str]| run(Command::new(EXE).args(args).env("SIGNPOST_REGISTRY", &url));
    assert!(
        cli(&[
            "register",
            "api",
            "--id",
            "a1",
            "--address",
            "10.0.0.1",
            "--port",
            "1"
        ])
        .0
    );
    assert!(
        cli(&[
            "register",
            "api",
            "--id",
            "a2",
            "--address",
            "10.0.0.2",
            "--port",
            "1"
        ])
        .0
    );
    assert!(
        cli(&[
            "register",
            "web",
            "--id",
            "w1",
            "--address",
            "10.0.0.3",
            "--port",
            "1"
        ])
        .0
    );
    assert!(cli(&["deregister", "web", "w1"]).0);
    assert!(!cli(&["register", "Bad", "--address", "10.0.0.1", "--port", "1"]).0);
    assert!(cli(&["ls", "api"]).0);

    let text = scrape(&addr);
    assert_eq!(
        value(
            &text,
            "signpost_rpc_requests_total{method=\"Register\",code=\"OK\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            "signpost_rpc_requests_total{method=\"Register\",code=\"INVALID_ARGUMENT\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "signpost_rpc_requests_total{method=\"Deregister\",code=\"OK\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "signpost_rpc_requests_total{method=\"Discover\",code=\"OK\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "signpost_rpc_duration_seconds_count{method=\"Register\",code=\"OK\"}"
        ),
        3.0
    );
    assert_eq!(value(&text, "signpost_instances"), 2.0);
    assert_eq!(value(&text, "signpost_services"), 1.0);
    assert_eq!(value(&text, "signpost_watch_streams"), 0.0);
    assert!(
        value(
            &text,
            "signpost_store_write_duration_seconds_count{op=\"put\"}"
        ) >= 3.0
    );
    assert!(
        text.contains("# TYPE signpost_lease_expiries counter"),
        "{text}"
    );

    // An open watch is counted, and so are the events it was sent (its reset view: two).
    let mut watch = std::process::Command::new(EXE)
        .args(["watch", "api"])
        .env("SIGNPOST_REGISTRY", &url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    // Kept open until the end: a closed pipe would make the CLI's next line fail, and the CLI
    // exit and take its stream with it.
    let mut output = std::io::BufReader::new(watch.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut output, &mut first).unwrap();
    assert!(first.contains("ADDED"), "{first}");
    let text = scrape(&addr);
    assert_eq!(value(&text, "signpost_watch_streams"), 1.0);
    assert_eq!(value(&text, "signpost_watch_events_total"), 2.0);
    let _ = watch.kill();
    let _ = watch.wait();
    drop(output);
    assert!(
        text.contains("# TYPE signpost_watch_slow_resets counter"),
        "{text}"
    );
}
