//! One health probe against an instance's own address and port: HTTP GET, TCP connect, or
//! `grpc.health.v1.Health/Check`. Each answers a health and a line of output for operators.

use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use signpost_store::{Health, HealthCheck, Probe};
use tokio::net::TcpStream;
use tonic_health::pb::health_check_response::ServingStatus;

/// `host:port`, with brackets around an IPv6 address.
pub(crate) fn authority(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// Runs the probe within the check's timeout.
pub(crate) async fn probe(check: &HealthCheck, address: &str, port: u16) -> (Health, String) {
    let target = authority(address, port);
    let run = async {
        match &check.probe {
            Probe::Http {
                path,
                method,
                headers,
            } => http(&target, path, method, headers).await,
            Probe::Tcp => match TcpStream::connect(&target).await {
                Ok(_) => (Health::Passing, format!("TCP connect to {target}: ok")),
                Err(e) => (Health::Critical, format!("TCP connect to {target}: {e}")),
            },
            Probe::Grpc { service } => grpc(&target, service, check.timeout).await,
            // The checker never schedules these (see `Probe::is_probed`).
            Probe::Ttl => (
                Health::Critical,
                "a ttl check is reported by the instance, not probed".to_owned(),
            ),
        }
    };
    match tokio::time::timeout(check.timeout, run).await {
        Ok(result) => result,
        Err(_) => (
            Health::Critical,
            format!("timed out after {:?}", check.timeout),
        ),
    }
}

async fn http(
    target: &str,
    path: &str,
    method: &str,
    headers: &[(String, String)],
) -> (Health, String) {
    let method = if method.is_empty() { "GET" } else { method };
    let stream = match TcpStream::connect(target).await {
        Ok(stream) => stream,
        Err(e) => return (Health::Critical, format!("HTTP connect to {target}: {e}")),
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(e) => {
                return (
                    Health::Critical,
                    format!("HTTP handshake with {target}: {e}"),
                );
            }
        };
    // The connection future drives the socket; it ends with this probe.
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .header(hyper::header::HOST, target)
        .header(hyper::header::USER_AGENT, "signpost-health-check")
        .body(Empty::<Bytes>::new());
    let result = match request {
        Err(e) => (Health::Critical, format!("HTTP request for {path:?}: {e}")),
        Ok(request) => match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                let line = format!(
                    "HTTP {method} {path}: {} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                );
                let health = if status.is_success() {
                    Health::Passing
                } else if status == hyper::StatusCode::TOO_MANY_REQUESTS {
                    Health::Warning
                } else {
                    Health::Critical
                };
                (health, line.trim_end().to_owned())
            }
            Err(e) => (Health::Critical, format!("HTTP {method} {path}: {e}")),
        },
    };
    driver.abort();
    result
}

async fn grpc(target: &str, service: &str, timeout: Duration) -> (Health, String) {
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{target}")) {
        Ok(endpoint) => endpoint.connect_timeout(timeout).timeout(timeout),
        Err(e) => return (Health::Critical, format!("gRPC endpoint {target}: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => return (Health::Critical, format!("gRPC connect to {target}: {e}")),
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    match client.check(request).await {
        Ok(answer) => match answer.into_inner().status() {
            ServingStatus::Serving => {
                (Health::Passing, format!("gRPC health {service:?}: SERVING"))
            }
            other => (
                Health::Critical,
                format!("gRPC health {service:?}: {}", other.as_str_name()),
            ),
        },
        Err(status) => (
            Health::Critical,
            format!(
                "gRPC health {service:?}: {:?}: {}",
                status.code(),
                status.message()
            ),
        ),
    }
}
