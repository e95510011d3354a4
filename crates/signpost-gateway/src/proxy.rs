//! One request through the gateway: route it, pick an instance, send it on, and answer.
//!
//! Retries, in the order the rules allow them:
//! - a request that never left (no connection could be made, or hyper handed the request back
//!   unsent) goes to another instance, whatever its method, up to `max_attempts`;
//! - an idempotent request (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) whose body is small enough
//!   to have been kept (or that has none) goes once more to another instance when the first
//!   answered 502/503/504 or broke the connection before answering, if the target's retry
//!   budget allows;
//! - anything else that may have reached an instance (a POST, a gRPC call, an upgrade, a
//!   streamed body) is never sent twice: it fails with 502 and says so.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use signpost_client::rules::grpc_timeout;

use crate::metrics::{Metrics, ServiceMetrics};
use crate::pace::Paced;
use crate::route::{Routed, Routes, Target};
use crate::upstream::{BoxError, Conn, Endpoint, Plain, ProxyBody, Upstream, Upstreams, ViewState};
use crate::wire::{self, Failure, Form, Framing, PlainBody, is_hop_by_hop};

/// What every request is held to; from the gateway's configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) namespace: String,
    pub(crate) request_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// How long a request waits for the registry's first answer about its target.
    pub(crate) wait_timeout: Duration,
    pub(crate) max_attempts: u32,
    /// Request bodies up to this size are kept so that an idempotent request can be retried.
    pub(crate) retry_buffer: usize,
    pub(crate) access_log: bool,
}

/// The gateway's request handler, shared by every connection.
#[derive(Debug)]
pub(crate) struct Proxy {
    pub(crate) routes: Routes,
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: Settings,
}

/// The request's body as the attempts see it.
enum Held {
    Empty,
    /// Kept whole: every attempt sends a copy.
    Full(Bytes),
    /// Streamed: the first attempt that sends it consumes it.
    Stream(Option<ProxyBody>),
}

impl Held {
    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            Held::Empty => Some(Empty::new().map_err(|never| match never {}).boxed()),
            Held::Full(bytes) => Some(
                Full::new(bytes.clone())
                    .map_err(|never| match never {})
                    .boxed(),
            ),
            Held::Stream(body) => body.take(),
        }
    }

    /// An unsent request's body comes back.
    fn put_back(&mut self, body: ProxyBody) {
        if let Held::Stream(slot) = self {
            *slot = Some(body);
        }
    }

    fn replayable(&self) -> bool {
        !matches!(self, Held::Stream(_))
    }
}

/// What the access log line and the metrics say of a request.
pub(crate) struct Record {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) client: SocketAddr,
    pub(crate) request_id: HeaderValue,
    /// The service label: the target's service once it is known to have instances.
    pub(crate) service: String,
    pub(crate) instance: Option<String>,
    pub(crate) retries: u32,
    pub(crate) started: Instant,
}

impl Record {
    pub(crate) fn finish(&self, log: bool, status: u16, bytes: Option<u64>) {
        let took = self.started.elapsed();
        if log {
            tracing::info!(
                target: "signpost_gateway::access",
                method = %self.method,
                path = %self.path,
                status,
                service = %self.service,
                instance = %self.instance.as_deref().unwrap_or("-"),
                duration_ms = took.as_secs_f64() * 1000.0,
                bytes = bytes.unwrap_or(0),
                retries = self.retries,
                request_id = %self.request_id.to_str().unwrap_or("-"),
                client = %self.client.ip(),
            );
        }
    }
}

/// The methods whose requests may be sent twice (RFC 9110 §9.2.2).
pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The upgrade a request asks for (`Connection: upgrade` with `Upgrade: websocket`), if any.
fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// The request's host, lowercase and without its port: `:authority` over HTTP/2, `Host` over
/// HTTP/1.1.
fn host_of<B>(request: &Request<B>) -> Option<String> {
    let text = match request.uri().authority() {
        Some(a) => a.host().to_owned(),
        None => {
            let value = request.headers().get(header::HOST)?.to_str().ok()?;
            match value.parse::<http::uri::Authority>() {
                Ok(a) => a.host().to_owned(),
                Err(_) => return None,
            }
        }
    };
    Some(
        text.trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase(),
    )
}

/// The caller's request id when it is a sane one (up to 128 visible characters), else a new one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    request_id_from(headers.get("x-request-id").map(HeaderValue::as_bytes))
}

/// [`request_id`] from the raw value of the caller's `x-request-id`, if it sent one.
///
/// The value is marked sensitive, which HTTP/2 encodes as a literal never indexed: an id is
/// new with every request, so indexing it would only churn the HPACK table, and h2's encoder
/// compares every indexed value of the same name before it adds one (a visible share of a
/// request's CPU).
pub(crate) fn request_id_from(given: Option<&[u8]>) -> HeaderValue {
    if let Some(id) = given
        && !id.is_empty()
        && id.len() <= 128
        && id.iter().all(|b| b.is_ascii_graphic())
        && let Ok(mut value) = HeaderValue::from_bytes(id)
    {
        value.set_sensitive(true);
        return value;
    }
    // 128 random bits in hex, written by hand: `format!` was a visible share of a request.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    let bits = fastrand::u128(..);
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = HEX[((bits >> (4 * (31 - i))) & 0xf) as usize];
    }
    let mut value =
        HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("-"));
    value.set_sensitive(true);
    value
}

/// Headers that belong to one connection and are never sent on (RFC 9110 §7.6.1), with the
/// ones the request's own `Connection` header names.
fn remove_hop_by_hop(headers: &mut HeaderMap, keep_trailers_te: bool) {
    // Most requests and answers carry none: one pass over the names finds out.
    if !headers.keys().any(|name| is_hop_by_hop(name.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let te_trailers = keep_trailers_te
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The `X-Forwarded-For` and `Forwarded` (RFC 7239) values to send on: what earlier proxies
/// said, with this hop added.
pub(crate) fn forwarded_values(
    client: SocketAddr,
    https: bool,
    host: Option<&str>,
    earlier_for: Option<&str>,
    earlier_forwarded: Option<&str>,
) -> (String, String) {
    use std::fmt::Write as _;
    let proto = if https { "https" } else { "http" };
    let ip = client.ip();
    let mut xff = String::with_capacity(48);
    if let Some(earlier) = earlier_for {
        xff.push_str(earlier);
        xff.push_str(", ");
    }
    let _ = write!(xff, "{ip}");
    let mut forwarded = String::with_capacity(64);
    if let Some(earlier) = earlier_forwarded {
        forwarded.push_str(earlier);
        forwarded.push_str(", ");
    }
    let _ = match ip {
        std::net::IpAddr::V4(v4) => write!(forwarded, "for={v4};proto={proto}"),
        std::net::IpAddr::V6(v6) => write!(forwarded, "for=\"[{v6}]\";proto={proto}"),
    };
    if let Some(host) = host.filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    }) {
        let _ = write!(forwarded, ";host=\"{host}\"");
    }
    (xff, forwarded)
}

/// `X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded` (RFC 7239), added to what earlier
/// proxies said.
fn add_forwarded(headers: &mut HeaderMap, client: SocketAddr, https: bool, host: Option<&str>) {
    let value = |text: &str| HeaderValue::from_str(text).ok();
    let (xff, forwarded) = forwarded_values(
        client,
        https,
        host,
        headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
        headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()),
    );
    if let Some(v) = value(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    if let Some(v) = value(&forwarded) {
        headers.insert(header::FORWARDED, v);
    }
    if let Some(host) = host
        && !headers.contains_key("x-forwarded-host")
        && let Some(v) = value(host)
    {
        headers.insert("x-forwarded-host", v);
    }
}

/// gRPC's code for an HTTP status the gateway answers with.
fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 3,
        404 => 12,
        431 | 413 => 8,
        504 => 4,
        _ => 14,
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The gateway's own answer: a short JSON body for HTTP, a trailers-only answer for gRPC.
fn error_response(
    status: StatusCode,
    grpc: bool,
    message: &str,
    service: Option<&str>,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let mut response = if grpc {
        let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
        let headers = r.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            "grpc-status",
            HeaderValue::from(u16::from(grpc_code(status))),
        );
        if let Ok(m) = HeaderValue::from_str(&grpc_message(message)) {
            headers.insert("grpc-message", m);
        }
        r
    } else {
        let mut r = Response::new(
            Full::new(Bytes::from(error_json(status, message, service)))
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    response
        .headers_mut()
        .insert("x-request-id", request_id.clone());
    response
}

/// The JSON body of the gateway's own HTTP answers.
pub(crate) fn error_json(status: StatusCode, message: &str, service: Option<&str>) -> String {
    let mut body = serde_json::json!({ "error": message, "status": status.as_u16() });
    if let Some(service) = service {
        body["service"] = serde_json::Value::from(service);
    }
    let mut text = body.to_string();
    text.push('\n');
    text
}

pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    if let Some(io) = innermost.downcast_ref::<std::io::Error>() {
        return io.kind().to_string();
    }
    innermost.to_string()
}

impl Proxy {
    /// The upstream a routed request goes to, once the registry has answered about it and it
    /// has instances; else the status and message to answer with.
    pub(crate) async fn upstream_for(
        &self,
        routed: &Routed,
    ) -> Result<Arc<Upstream>, (StatusCode, String)> {
        let unavailable = |message: String| (StatusCode::SERVICE_UNAVAILABLE, message);
        let upstream = self.upstreams.get(&routed.target).map_err(|too_many| {
            unavailable(format!(
                "the gateway follows its most services already ({}); try again shortly",
                too_many.0
            ))
        })?;
        match upstream.synced(self.settings.wait_timeout).await {
            ViewState::Synced => {}
            ViewState::Waiting => {
                return Err(unavailable(format!(
                    "the registry has not answered about {} within {:?}",
                    routed.target, self.settings.wait_timeout
                )));
            }
            ViewState::Refused(reason) => {
                return Err(unavailable(format!(
                    "the registry refused to list {}: {reason}",
                    routed.target
                )));
            }
        }
        if upstream.registered() == 0 {
            if !routed.explicit {
                let message = format!(
                    "no service named {:?} in namespace {:?}",
                    routed.target.service, self.settings.namespace
                );
                return Err((StatusCode::NOT_FOUND, message));
            }
            return Err(unavailable(format!(
                "no instance of {} is registered",
                routed.target
            )));
        }
        Ok(upstream)
    }

    pub(crate) async fn handle(
        self: Arc<Self>,
        mut request: Request<Incoming>,
        client: SocketAddr,
        https: bool,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let grpc = is_grpc(request.headers());
        let id = request_id(request.headers());
        let host = host_of(&request);
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        let mut record = Record {
            method: request.method().clone(),
            path: path.clone(),
            client,
            request_id: id.clone(),
            service: "-".to_owned(),
            instance: None,
            retries: 0,
            started,
        };
        let fail = |record: &Record, status: StatusCode, message: &str, service: Option<&str>| {
            self.metrics
                .answered(&record.service, status.as_u16(), record.started.elapsed());
            record.finish(self.settings.access_log, status.as_u16(), None);
            error_response(status, grpc, message, service, &record.request_id)
        };
        let routed = match self.routes.route(&path, host.as_deref(), grpc) {
            Ok(routed) => routed,
            Err(no_route) => {
                return fail(
                    &record,
                    StatusCode::BAD_REQUEST,
                    &no_route.to_string(),
                    None,
                );
            }
        };
        let service = routed.target.service.clone();
        let upstream = match self.upstream_for(&routed).await {
            Ok(upstream) => upstream,
            Err((status, message)) => return fail(&record, status, &message, Some(&service)),
        };
        record.service = service.clone();
        let sm = upstream.metrics(&self.metrics);
        upstream.budget.deposit();

        let upgrade = upgrade_of(request.headers());
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));
        let (parts, body) = request.into_parts();
        let client_h2 = parts.version == Version::HTTP_2;
        let method = parts.method.clone();
        let mut headers = parts.headers;
        remove_hop_by_hop(&mut headers, true);
        headers.remove(header::HOST);
        add_forwarded(&mut headers, client, https, host.as_deref());
        headers.insert("x-request-id", id.clone());
        if let Some(upgrade) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, upgrade.clone());
        }
        let mut timeout = routed
            .timeouts
            .request
            .unwrap_or(self.settings.request_timeout);
        if grpc && let Some(deadline) = grpc_timeout(&headers) {
            timeout = timeout.min(deadline);
        }
        let idle = routed.timeouts.idle.unwrap_or(self.settings.idle_timeout);
        let deadline = later(started, timeout);
        let retry_status = idempotent(&method) && !grpc && upgrade.is_none();

        let mut held = if body.is_end_stream() {
            Held::Empty
        } else if retry_status
            && body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= self.settings.retry_buffer as u64)
        {
            let limit = self.settings.retry_buffer;
            match tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await {
                Ok(Ok(collected)) => Held::Full(collected.to_bytes()),
                Ok(Err(e)) => {
                    let message = format!("the request's body could not be read: {e}");
                    return fail(&record, StatusCode::BAD_REQUEST, &message, Some(&service));
                }
                Err(_) => {
                    let message = format!("the request's body did not arrive within {timeout:?}");
                    return fail(
                        &record,
                        StatusCode::REQUEST_TIMEOUT,
                        &message,
                        Some(&service),
                    );
                }
            }
        } else {
            Held::Stream(Some(Idle::wrap(body.map_err(BoxError::from).boxed(), idle)))
        };

        // A body-less request to an HTTP/1.1 instance goes the gateway's own way (`wire`), as
        // on `h1`'s path: hyper's client would cost a request as much again.
        let plain_path = matches!(held, Held::Empty) && upgrade.is_none() && !grpc;
        let bounds = Bounds {
            upstream: &upstream,
            target: &routed.target,
            service: &service,
            sm,
            idempotent: retry_status,
            head_request: method == Method::HEAD,
            timeout,
            deadline,
            form: Form::Map,
            client_h2,
        };
        let mut out = Vec::new();
        let mut tries = Tries::default();
        loop {
            let Some(endpoint) = upstream.pick(&tries.tried) else {
                let message = no_instance(&upstream, &routed.target, tries.last_error.take());
                return fail(
                    &record,
                    StatusCode::SERVICE_UNAVAILABLE,
                    &message,
                    Some(&service),
                );
            };
            tries.attempts += 1;
            if tries.attempts > 1 {
                record.retries += 1;
                sm.retries.inc();
            }
            record.instance = Some(endpoint.id.clone());
            if plain_path && endpoint.is_http1() {
                let target = routed.path_and_query.as_str();
                let authority = endpoint.authority.as_str();
                wire::request_head(&mut out, &method, target, authority, &headers);
                match self
                    .plain_attempt(&bounds, &mut tries, endpoint, &out)
                    .await
                {
                    Attempt::Answer(answer, plain, endpoint) => {
                        return self
                            .plain_answer(answer, plain, endpoint, record, &bounds, id, idle)
                            .await;
                    }
                    Attempt::Again => continue,
                    Attempt::Fail(status, message) => {
                        return fail(&record, status, &message, Some(&service));
                    }
                }
            }
            let mut conn = match endpoint.checkout(grpc).await {
                Ok(conn) => conn,
                Err(error) => {
                    sm.connect_errors.inc();
                    upstream.record(&endpoint, true);
                    tries.last_error = Some(format!("instance {}: {error}", endpoint.id));
                    tries.tried.push(endpoint);
                    if tries.attempts >= self.settings.max_attempts {
                        let message = unreachable(
                            &routed.target,
                            tries.attempts,
                            tries.last_error.as_deref(),
                        );
                        return fail(&record, StatusCode::BAD_GATEWAY, &message, Some(&service));
                    }
                    continue;
                }
            };
            if upgrade.is_some() {
                let Conn::H1(h1) = &mut conn else {
                    let message = format!(
                        "instance {} of {service} speaks HTTP/2 only (protocol=h2c), and an upgrade needs HTTP/1.1",
                        endpoint.id
                    );
                    return fail(&record, StatusCode::BAD_GATEWAY, &message, Some(&service));
                };
                h1.detach();
            }
            let Some(body) = held.take() else {
                let message = "the request's body was already sent to an instance that failed; it is not sent twice";
                return fail(&record, StatusCode::BAD_GATEWAY, message, Some(&service));
            };
            let mut outgoing = Request::new(body);
            *outgoing.method_mut() = method.clone();
            // Kept for a retry only when one could follow a sent request; an unsent one comes
            // back whole, its headers with it.
            *outgoing.headers_mut() = if retry_status && held.replayable() {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            let path_and_query = routed.path_and_query.as_str();
            match &conn {
                Conn::H1(_) => {
                    *outgoing.version_mut() = Version::HTTP_11;
                    if let Ok(uri) = path_and_query.parse() {
                        *outgoing.uri_mut() = uri;
                    }
                    if let Ok(value) = HeaderValue::from_str(endpoint.authority.as_str()) {
                        outgoing.headers_mut().insert(header::HOST, value);
                    }
                }
                Conn::H2(_) => {
                    *outgoing.version_mut() = Version::HTTP_2;
                    let uri = http::Uri::builder()
                        .scheme("http")
                        .authority(endpoint.authority.clone())
                        .path_and_query(path_and_query)
                        .build();
                    if let Ok(uri) = uri {
                        *outgoing.uri_mut() = uri;
                    }
                }
            }
            endpoint.load.start();
            let sent_at = Instant::now();
            let (answer, mut h1) = match conn {
                Conn::H1(mut h1) => {
                    let sending = h1.sender.try_send_request(outgoing);
                    (
                        tokio::time::timeout_at(deadline, h1.drive(sending)).await,
                        Some(h1),
                    )
                }
                Conn::H2(mut sender) => {
                    let sending = sender.try_send_request(outgoing);
                    (tokio::time::timeout_at(deadline, sending).await, None)
                }
            };
            let answer = match answer {
                Ok(answer) => answer,
                Err(_) => {
                    let message = timed_out(&upstream, &endpoint, &service, timeout, sent_at);
                    return fail(
                        &record,
                        StatusCode::GATEWAY_TIMEOUT,
                        &message,
                        Some(&service),
                    );
                }
            };
            let mut response = match answer {
                Ok(response) => response,
                Err(mut error) => {
                    endpoint.load.end();
                    let unsent = error.take_message();
                    let cause = root_cause(&error.into_error());
                    tries.last_error = Some(format!("instance {}: {cause}", endpoint.id));
                    tries.tried.push(endpoint.clone());
                    if let Some(unsent) = unsent {
                        // Never written: the connection was gone before the request left.
                        let (parts, body) = unsent.into_parts();
                        headers = parts.headers;
                        headers.remove(header::HOST);
                        held.put_back(body);
                        if tries.attempts < self.settings.max_attempts {
                            continue;
                        }
                    } else {
                        upstream.record(&endpoint, true);
                        if may_resend(
                            retry_status && held.replayable(),
                            tries.replayed,
                            tries.attempts,
                            self.settings.max_attempts,
                            &upstream,
                        ) {
                            tries.replayed = true;
                            continue;
                        }
                    }
                    let message = not_sent_twice(&endpoint, &service, &cause, retry_status, true);
                    return fail(&record, StatusCode::BAD_GATEWAY, &message, Some(&service));
                }
            };
            let now = Instant::now();
            endpoint.load.observe(now - sent_at, now);
            let status = response.status();
            let failed = status.is_server_error()
                || (grpc
                    && response
                        .headers()
                        .get("grpc-status")
                        .is_some_and(|s| s == "14"));
            let pending = judge_head(&upstream, &endpoint, failed);
            if matches!(status.as_u16(), 502..=504)
                && another(&upstream, &tries.tried, &endpoint)
                && may_resend(
                    retry_status && held.replayable(),
                    tries.replayed,
                    tries.attempts,
                    self.settings.max_attempts,
                    &upstream,
                )
            {
                endpoint.load.end();
                tries.replayed = true;
                tries.tried.push(endpoint);
                tries.last_error = Some(format!("an instance answered {status}"));
                continue;
            }
            if status == StatusCode::SWITCHING_PROTOCOLS
                && let Some(client_upgrade) = client_upgrade
            {
                sm.answered(&self.metrics, status.as_u16(), started.elapsed());
                if pending {
                    upstream.record(&endpoint, false);
                }
                endpoint.load.end();
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(
                    client_upgrade,
                    upstream_upgrade,
                    endpoint.id.clone(),
                ));
                record.finish(self.settings.access_log, status.as_u16(), None);
                response.headers_mut().insert("x-request-id", id);
                return response.map(|_| Empty::new().map_err(|never| match never {}).boxed());
            }
            // A small answer of known length is read whole and sent on in one write, as nginx's
            // proxy buffering does: half the writes for the typical API answer, and the
            // connection is back in the pool at once. Anything else streams.
            let small = !grpc
                && response
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .is_some_and(|n| n <= self.settings.retry_buffer as u64);
            if small {
                let (mut head, body) = response.into_parts();
                let limit = self.settings.retry_buffer;
                let collect = Limited::new(body, limit).collect();
                let read = match h1.as_mut() {
                    Some(h1) => tokio::time::timeout(idle, h1.drive(collect)).await,
                    None => tokio::time::timeout(idle, collect).await,
                };
                endpoint.load.end();
                let bytes = match read {
                    Ok(Ok(collected)) => collected.to_bytes(),
                    failed => {
                        if pending {
                            upstream.record(&endpoint, true);
                        }
                        let why = match failed {
                            Ok(Err(e)) => format!("broke off: {e}"),
                            _ => format!("stalled for {idle:?}"),
                        };
                        let message = format!("the answer of instance {} {why}", endpoint.id);
                        return fail(&record, StatusCode::BAD_GATEWAY, &message, Some(&service));
                    }
                };
                if pending {
                    upstream.record(&endpoint, false);
                }
                sm.answered(&self.metrics, status.as_u16(), started.elapsed());
                if let Some(h1) = h1 {
                    endpoint.checkin(h1);
                }
                remove_hop_by_hop(&mut head.headers, false);
                head.headers.insert("x-request-id", id);
                record.finish(
                    self.settings.access_log,
                    status.as_u16(),
                    Some(bytes.len() as u64),
                );
                let body = Full::new(bytes).map_err(|never| match never {}).boxed();
                return Response::from_parts(head, body);
            }
            sm.answered(&self.metrics, status.as_u16(), started.elapsed());
            remove_hop_by_hop(response.headers_mut(), false);
            response.headers_mut().insert("x-request-id", id);
            let body_endpoint = endpoint.clone();
            let finish = Finish {
                record,
                status: status.as_u16(),
                endpoint,
                judge: pending.then(|| upstream.clone()),
                log: self.settings.access_log,
                bytes: 0,
            };
            return response.map(|body| {
                let body = match h1 {
                    Some(h1) => Driven {
                        inner: body,
                        h1: Some(h1),
                        endpoint: body_endpoint,
                    }
                    .boxed(),
                    None => body.map_err(BoxError::from).boxed(),
                };
                let body = Tracked {
                    inner: Idle::wrap(body, idle),
                    finish: Some(finish),
                }
                .boxed();
                pace(body, client_h2, idle)
            });
        }
    }
}

/// A request's attempts so far.
#[derive(Default)]
pub(crate) struct Tries {
    pub(crate) tried: Vec<Arc<Endpoint>>,
    pub(crate) attempts: u32,
    pub(crate) replayed: bool,
    pub(crate) last_error: Option<String>,
}

/// What one attempt on the gateway's own HTTP/1.1 client path ([`wire`]) came to.
pub(crate) enum Attempt {
    /// The instance's answer head; its body is still to be read from the connection.
    Answer(wire::Answer, Plain, Arc<Endpoint>),
    /// The rules allow another attempt.
    Again,
    /// The request fails with this status and message.
    Fail(StatusCode, String),
}

/// A body-less request's bounds and resend rule, the same for each of its attempts.
pub(crate) struct Bounds<'a> {
    pub(crate) upstream: &'a Arc<Upstream>,
    pub(crate) target: &'a Target,
    pub(crate) service: &'a str,
    pub(crate) sm: &'a ServiceMetrics,
    /// Whether the request may be sent twice: idempotent, and with no body it is whole.
    pub(crate) idempotent: bool,
    pub(crate) head_request: bool,
    pub(crate) timeout: Duration,
    pub(crate) deadline: Instant,
    pub(crate) form: Form,
    /// The caller speaks HTTP/2, where it can stop taking an answer by flow control alone:
    /// streamed answers get a [`Paced`] watchdog.
    pub(crate) client_h2: bool,
}

impl Proxy {
    /// The answer to a request that went the gateway's own way: a small body of known length
    /// is read whole first, so the connection is free at once; any other streams.
    #[allow(clippy::too_many_arguments)]
    async fn plain_answer(
        &self,
        answer: wire::Answer,
        mut plain: Plain,
        endpoint: Arc<Endpoint>,
        record: Record,
        bounds: &Bounds<'_>,
        id: HeaderValue,
        idle: Duration,
    ) -> Response<ProxyBody> {
        let failed = |record: &Record, message: &str| {
            self.metrics.answered(
                &record.service,
                StatusCode::BAD_GATEWAY.as_u16(),
                record.started.elapsed(),
            );
            record.finish(self.settings.access_log, 502, None);
            error_response(
                StatusCode::BAD_GATEWAY,
                false,
                message,
                Some(bounds.service),
                &record.request_id,
            )
        };
        let pending = !fails_at_head(answer.status);
        let Ok(status) = StatusCode::from_u16(answer.status) else {
            endpoint.load.end();
            if pending {
                bounds.upstream.record(&endpoint, true);
            }
            let message = format!(
                "instance {} answered with status {}, which HTTP does not have",
                endpoint.id, answer.status
            );
            return failed(&record, &message);
        };
        let small = match answer.framing {
            Framing::None => Some(0),
            Framing::Length(n) if n <= self.settings.retry_buffer as u64 => usize::try_from(n).ok(),
            _ => None,
        };
        let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
        *response.status_mut() = status;
        let closes = answer.closes;
        if let Some(n) = small {
            if let Err(why) = wire::read_whole(&mut plain, n, idle).await {
                endpoint.load.end();
                if pending {
                    bounds.upstream.record(&endpoint, true);
                }
                let message = format!("the answer of instance {} {why}", endpoint.id);
                return failed(&record, &message);
            }
            if pending {
                bounds.upstream.record(&endpoint, false);
            }
            bounds
                .sm
                .answered(&self.metrics, status.as_u16(), record.started.elapsed());
            let bytes = plain.buf.split_to(n).freeze();
            endpoint.load.end();
            if !closes {
                endpoint.checkin_plain(plain);
            }
            *response.headers_mut() = answer.headers;
            response.headers_mut().insert("x-request-id", id);
            record.finish(self.settings.access_log, status.as_u16(), Some(n as u64));
            *response.body_mut() = Full::new(bytes).map_err(|never| match never {}).boxed();
            return response;
        }
        bounds
            .sm
            .answered(&self.metrics, status.as_u16(), record.started.elapsed());
        let body = PlainBody::new(plain, &answer, endpoint.clone());
        *response.headers_mut() = answer.headers;
        response.headers_mut().insert("x-request-id", id);
        let finish = Finish {
            record,
            status: status.as_u16(),
            endpoint,
            judge: pending.then(|| bounds.upstream.clone()),
            log: self.settings.access_log,
            bytes: 0,
        };
        let body = Tracked {
            inner: Idle::wrap(body.boxed(), idle),
            finish: Some(finish),
        }
        .boxed();
        *response.body_mut() = pace(body, bounds.client_h2, idle);
        response
    }

    /// Sends `request`, a body-less request's head made for `endpoint`, on one of the
    /// endpoint's plain connections and reads the answer's head, with the rules of
    /// [`Proxy::handle`]: a connect failure or an unsent request is another attempt's, a sent
    /// one goes once more only by [`may_resend`], and so does a 502/503/504 while another
    /// instance could take it.
    pub(crate) async fn plain_attempt(
        &self,
        bounds: &Bounds<'_>,
        tries: &mut Tries,
        endpoint: Arc<Endpoint>,
        request: &[u8],
    ) -> Attempt {
        let max_attempts = self.settings.max_attempts;
        let mut plain = match endpoint.checkout_plain().await {
            Ok(plain) => plain,
            Err(error) => {
                bounds.sm.connect_errors.inc();
                bounds.upstream.record(&endpoint, true);
                tries.last_error = Some(format!("instance {}: {error}", endpoint.id));
                tries.tried.push(endpoint);
                if tries.attempts >= max_attempts {
                    let message =
                        unreachable(bounds.target, tries.attempts, tries.last_error.as_deref());
                    return Attempt::Fail(StatusCode::BAD_GATEWAY, message);
                }
                return Attempt::Again;
            }
        };
        endpoint.load.start();
        let sent_at = Instant::now();
        let exchanged = tokio::time::timeout_at(
            bounds.deadline,
            wire::exchange(&mut plain, request, bounds.head_request, bounds.form),
        )
        .await;
        let answer = match exchanged {
            Err(_) => {
                let message = timed_out(
                    bounds.upstream,
                    &endpoint,
                    bounds.service,
                    bounds.timeout,
                    sent_at,
                );
                return Attempt::Fail(StatusCode::GATEWAY_TIMEOUT, message);
            }
            Ok(Err(Failure::Unsent(cause))) => {
                endpoint.load.end();
                tries.last_error = Some(format!("instance {}: {cause}", endpoint.id));
                tries.tried.push(endpoint.clone());
                if tries.attempts < max_attempts {
                    return Attempt::Again;
                }
                let message = format!(
                    "the request to instance {} of {} failed: {cause}",
                    endpoint.id, bounds.service
                );
                return Attempt::Fail(StatusCode::BAD_GATEWAY, message);
            }
            Ok(Err(Failure::Sent(cause))) => {
                endpoint.load.end();
                tries.last_error = Some(format!("instance {}: {cause}", endpoint.id));
                tries.tried.push(endpoint.clone());
                bounds.upstream.record(&endpoint, true);
                if may_resend(
                    bounds.idempotent,
                    tries.replayed,
                    tries.attempts,
                    max_attempts,
                    bounds.upstream,
                ) {
                    tries.replayed = true;
                    return Attempt::Again;
                }
                let message =
                    not_sent_twice(&endpoint, bounds.service, &cause, bounds.idempotent, false);
                return Attempt::Fail(StatusCode::BAD_GATEWAY, message);
            }
            Ok(Ok(answer)) => answer,
        };
        let now = Instant::now();
        endpoint.load.observe(now - sent_at, now);
        let status = answer.status;
        judge_head(bounds.upstream, &endpoint, fails_at_head(status));
        if matches!(status, 502..=504)
            && another(bounds.upstream, &tries.tried, &endpoint)
            && may_resend(
                bounds.idempotent,
                tries.replayed,
                tries.attempts,
                max_attempts,
                bounds.upstream,
            )
        {
            endpoint.load.end();
            tries.replayed = true;
            tries.tried.push(endpoint);
            tries.last_error = Some(format!("an instance answered {status}"));
            return Attempt::Again;
        }
        Attempt::Answer(answer, plain, endpoint)
    }
}

/// Whether a request that may have reached an instance goes once more: only a `replayable` one
/// (idempotent, its body kept whole), never a second time, within the attempts and the
/// target's retry budget (which this draws on).
pub(crate) fn may_resend(
    replayable: bool,
    replayed: bool,
    attempts: u32,
    max_attempts: u32,
    upstream: &Upstream,
) -> bool {
    replayable && !replayed && attempts < max_attempts && upstream.budget.withdraw()
}

/// Counts an answer's head in its instance's outlier record when it says the request failed;
/// true when the answer is still to be judged by its body. Each answer counts once: a failure
/// by its head, or else by its body, a success once whole and a failure if it broke off. A
/// good head counted before a broken body would end the instance's run of failures on every
/// request, and an instance that breaks every answer would never be ejected.
pub(crate) fn judge_head(upstream: &Upstream, endpoint: &Endpoint, failed: bool) -> bool {
    if failed {
        upstream.record(endpoint, true);
    }
    !failed
}

/// Whether an answer's status alone makes it a failure, on the paths that see no gRPC status.
pub(crate) fn fails_at_head(status: u16) -> bool {
    (500..600).contains(&status)
}

/// An attempt whose answer's head did not come in time: the instance's load and outlier record
/// say so, and the words for the 504.
pub(crate) fn timed_out(
    upstream: &Upstream,
    endpoint: &Endpoint,
    service: &str,
    timeout: Duration,
    sent_at: Instant,
) -> String {
    endpoint.load.observe(sent_at.elapsed(), Instant::now());
    endpoint.load.end();
    upstream.record(endpoint, true);
    format!(
        "instance {} of {service} did not answer within {timeout:?}",
        endpoint.id
    )
}

/// Why a request that may have reached an instance and failed is not sent again; `has_body`
/// when it may have had a body too large to keep.
pub(crate) fn not_sent_twice(
    endpoint: &Endpoint,
    service: &str,
    cause: &str,
    idempotent: bool,
    has_body: bool,
) -> String {
    let why = match (idempotent, has_body) {
        (true, true) => "it was retried already, or its body was not kept, so it",
        (true, false) => "it was retried already, so it",
        (false, _) => "a non-idempotent request",
    };
    format!(
        "the request to instance {} of {service} failed: {cause}; {why} is not sent twice",
        endpoint.id
    )
}

/// Why no instance is left to pick for an attempt.
pub(crate) fn no_instance(
    upstream: &Upstream,
    target: &Target,
    last_error: Option<String>,
) -> String {
    let why = match last_error {
        Some(error) => format!("{}; last error: {error}", upstream.why_none()),
        None => upstream.why_none(),
    };
    format!("no healthy instance of {target} can take the request: {why}")
}

/// Why a request failed when every attempt's connect did.
pub(crate) fn unreachable(target: &Target, attempts: u32, last_error: Option<&str>) -> String {
    format!(
        "no instance of {target} could be reached in {attempts} attempts; last error: {}",
        last_error.unwrap_or("none")
    )
}

/// `after` past `now`, or a year when a setting is too large for the clock.
pub(crate) fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .unwrap_or(now + Duration::from_secs(365 * 24 * 3600))
}

/// Whether an instance other than `endpoint` and those tried could take a retry: without one,
/// the instance's own answer is better than the gateway's 503.
pub(crate) fn another(
    upstream: &Upstream,
    tried: &[Arc<Endpoint>],
    endpoint: &Arc<Endpoint>,
) -> bool {
    let mut all = tried.to_vec();
    all.push(endpoint.clone());
    upstream.pick(&all).is_some()
}

/// An upgraded connection (a WebSocket): bytes both ways until either side closes.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    id: String,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(instance = %id, %error, "an upgrade did not complete");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(instance = %id, %error, "an upgraded connection ended");
    }
}

/// An answer's end: the endpoint's load, the access log line.
struct Finish {
    record: Record,
    status: u16,
    endpoint: Arc<Endpoint>,
    /// Where the body's outcome goes when the head left it to be judged ([`judge_head`]).
    judge: Option<Arc<Upstream>>,
    log: bool,
    bytes: u64,
}

impl Finish {
    /// The body came whole or broke off: the instance's outlier record says so, once. A
    /// client that goes away first says nothing of the instance.
    fn judged(&mut self, broke: bool) {
        if let Some(upstream) = self.judge.take() {
            upstream.record(&self.endpoint, broke);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.endpoint.load.end();
        self.record.finish(self.log, self.status, Some(self.bytes));
    }
}

/// An answer's body on its way to the client; its end (or the client going away) finishes
/// the request.
struct Tracked {
    inner: ProxyBody,
    finish: Option<Finish>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(finish)) = (frame.data_ref(), self.finish.as_mut()) {
                    finish.bytes += data.len() as u64;
                }
            }
            Poll::Ready(end) => {
                let broke = end.is_some();
                if let Some(mut finish) = self.finish.take() {
                    finish.judged(broke);
                }
            }
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    /// The client stops polling at the end it knows of (a body of known length) without a
    /// last poll: read to its end, the body came whole.
    fn drop(&mut self) {
        if let Some(finish) = self.finish.as_mut()
            && self.inner.is_end_stream()
        {
            finish.judged(false);
        }
    }
}

/// An answer's body from an HTTP/1.1 connection it drives as it is read (see
/// [`crate::upstream::H1`]); read to its end, the connection goes back to the endpoint's pool.
struct Driven {
    inner: Incoming,
    h1: Option<crate::upstream::H1>,
    endpoint: Arc<Endpoint>,
}

impl http_body::Body for Driven {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(h1) = &mut this.h1 {
            h1.poll_io(cx);
        }
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = poll
            && let Some(h1) = this.h1.take()
        {
            this.endpoint.checkin(h1);
        }
        poll.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Driven {
    /// The client stops polling at the end it knows of (a body of known length) without a last
    /// poll: read to its end, the connection is still good. Dropped before, it closes.
    fn drop(&mut self) {
        if let Some(h1) = self.h1.take()
            && self.inner.is_end_stream()
        {
            self.endpoint.checkin(h1);
        }
    }
}

/// An answer streamed to an HTTP/2 caller gets a watchdog for a caller that stops granting
/// window (see `pace`); an HTTP/1.1 caller that stops reading is cut off by its connection's
/// write deadline instead. Outside `Tracked`, so that a cut-off answer's access line is
/// written when it is cut off.
fn pace(body: ProxyBody, client_h2: bool, idle: Duration) -> ProxyBody {
    if client_h2 && !body.is_end_stream() {
        Paced::wrap(body, idle)
    } else {
        body
    }
}

/// A body that fails once it has gone `idle` without a frame: a stalled instance or client
/// cannot hold a request open for ever.
struct Idle {
    inner: ProxyBody,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl Idle {
    fn wrap(inner: ProxyBody, idle: Duration) -> ProxyBody {
        Idle {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
        .boxed()
    }
}

impl http_body::Body for Idle {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => {
                if self.timer.as_mut().poll(cx).is_ready() {
                    let idle = self.idle;
                    return Poll::Ready(Some(Err(format!(
                        "no data for {idle:?}: the body is cut off"
                    )
                    .into())));
                }
                Poll::Pending
            }
            ready => {
                let next = later(Instant::now(), self.idle);
                self.timer.as_mut().reset(next);
                ready
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        remove_hop_by_hop(&mut h, true);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept", "te"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn forwarded_headers_append_to_earlier_proxies() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let client: SocketAddr = "[::1]:5000".parse().unwrap();
        add_forwarded(&mut h, client, true, Some("api.example"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";proto=https;host=\"api.example\""
        );
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        let made = request_id(&h);
        assert_eq!(made.len(), 32);
        assert!(
            made.as_bytes().iter().all(u8::is_ascii_hexdigit),
            "{made:?}"
        );
        assert_ne!(made, request_id(&h), "each made id is new");
    }

    #[test]
    fn grpc_errors_are_trailers_only_with_a_code() {
        let id = HeaderValue::from_static("x");
        let r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            true,
            "no instance: 100%",
            None,
            &id,
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no instance: 100%25");
        let r = error_response(StatusCode::NOT_FOUND, false, "no service", Some("web"), &id);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn upgrades_are_recognised_only_with_connection_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_of(&h).is_none());
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade_of(&h).unwrap(), "websocket");
    }
}
