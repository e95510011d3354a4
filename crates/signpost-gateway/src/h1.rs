//! The gateway's own HTTP/1.1 path, for the common request: HTTP/1.1 on a plain connection,
//! with no body, to an instance that speaks HTTP/1.1. It reads and writes the bytes itself
//! (`httparse` for the heads, the same parser hyper uses), where hyper's server and client
//! would each build a request, hand it between connection state machines and encode it
//! again: on this path a request costs about a third less CPU, which is what lets the gateway
//! keep up with nginx.
//!
//! Anything else hands the connection, with what was read from it, to hyper for the rest of
//! its life: a body, an upgrade, `Expect`, gRPC, HTTP/1.0, a head hyper would refuse (too
//! large, malformed: hyper answers 400 or 431 as before), h2c with prior knowledge, or a
//! target with an HTTP/2 instance. So every rule that hyper enforces on bad input still holds,
//! and this path only ever sees heads it can send on whole.
//!
//! The request's handling is `proxy`'s, shared and with the same rules: routing, the pick,
//! retries (a request that was never written goes to another instance; an idempotent one that
//! failed or got 502/503/504 goes once more, within the retry budget), timeouts, outlier
//! records, metrics, the access log and the headers sent on (`wire::is_hop_by_hop`,
//! `proxy::forwarded_values`, `proxy::request_id_from`). Answers pass through as they come:
//! a small one of known length is read whole and written in one go; a longer one, a chunked
//! one (its chunks forwarded as they arrive, the framing checked to find the end) and one
//! delimited by the instance closing stream.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderValue;
use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proxy::{self, Proxy, Record};
use crate::upstream::Plain;
use crate::wire::{
    Answer, Chunks, Form, Framing, MAX_HEADERS, is_hop_by_hop, push_line, read_whole, tokens,
};

/// How a connection's time on this path ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Done,
    /// hyper serves the rest: the connection, with what was read from it and not handled.
    Handoff(Rewound),
}

/// A connection with bytes already read from it put back in front.
#[derive(Debug)]
pub(crate) struct Rewound {
    pre: Bytes,
    io: TcpStream,
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A request head this path can send on.
struct Head {
    method: Method,
    /// The request target as sent: a path and query.
    path: String,
    host: Option<String>,
    /// The client asked to close after this answer.
    close: bool,
    request_id: HeaderValue,
    /// The header lines to send on, each with its CRLF: the client's, less the hop-by-hop
    /// ones and `Host`, with this hop's forwarding headers and the request id.
    lines: Vec<u8>,
}

enum Parsed {
    Partial,
    /// Not for this path: hyper's.
    Hyper,
    Request(Head, usize),
}

/// A header value as text, when it is the visible ASCII `HeaderValue::to_str` accepts.
fn visible(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

fn parse(buf: &[u8], client: SocketAddr) -> Parsed {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut slots);
    let used = match request.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    let (Some(1), Some(path), Some(method)) = (request.version, request.path, request.method)
    else {
        return Parsed::Hyper;
    };
    // hyper's `Uri` takes visible ASCII only; what it would refuse is its to refuse.
    if !path.starts_with('/') || !path.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Parsed::Hyper;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    if method == Method::CONNECT {
        return Parsed::Hyper;
    }
    let mut close = false;
    let mut host = None;
    let mut named: Vec<&[u8]> = Vec::new();
    let (mut earlier_for, mut earlier_forwarded, mut forwarded_host) = (None, None, false);
    let mut given_id = None;
    let mut te_trailers = false;
    for field in request.headers.iter() {
        let name = field.name;
        let value = field.value;
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("connection") {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::Hyper;
                } else if !token.is_empty() {
                    named.push(token);
                }
            }
        } else if is("transfer-encoding") || is("upgrade") || is("expect") {
            return Parsed::Hyper;
        } else if is("content-length") {
            if value.trim_ascii() != b"0" {
                return Parsed::Hyper;
            }
        } else if is("content-type") {
            if value.starts_with(b"application/grpc") {
                return Parsed::Hyper;
            }
        } else if is("host") {
            if host.is_none() {
                host = visible(value)
                    .and_then(|v| v.parse::<http::uri::Authority>().ok())
                    .map(|a| {
                        a.host()
                            .trim_start_matches('[')
                            .trim_end_matches(']')
                            .to_ascii_lowercase()
                    });
            }
        } else if is("te") {
            te_trailers = tokens(value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        } else if is("x-forwarded-for") {
            // The first of repeated fields, as `HeaderMap::get` gives the hyper path.
            earlier_for = earlier_for.or(visible(value));
        } else if is("forwarded") {
            earlier_forwarded = earlier_forwarded.or(visible(value));
        } else if is("x-forwarded-host") {
            forwarded_host = true;
        } else if is("x-request-id") {
            given_id = given_id.or(Some(value));
        }
    }
    // A header the client's `Connection` names is removed before this hop's are worked out.
    let named_here = |name: &str| {
        named
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    };
    if named_here("x-forwarded-for") {
        earlier_for = None;
    }
    if named_here("forwarded") {
        earlier_forwarded = None;
    }
    if named_here("x-forwarded-host") {
        forwarded_host = false;
    }
    if named_here("x-request-id") {
        given_id = None;
    }
    let mut lines = Vec::with_capacity(used + 192);
    for field in request.headers.iter() {
        let name = field.name;
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is_hop_by_hop(name)
            || is("host")
            || is("x-forwarded-for")
            || is("x-forwarded-proto")
            || is("forwarded")
            || is("x-request-id")
            || named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        push_line(&mut lines, name.as_bytes(), field.value);
    }
    if te_trailers && !named.iter().any(|n| n.eq_ignore_ascii_case(b"te")) {
        push_line(&mut lines, b"te", b"trailers");
    }
    let (xff, forwarded) = proxy::forwarded_values(
        client,
        false,
        host.as_deref(),
        earlier_for,
        earlier_forwarded,
    );
    push_line(&mut lines, b"x-forwarded-for", xff.as_bytes());
    push_line(&mut lines, b"x-forwarded-proto", b"http");
    push_line(&mut lines, b"forwarded", forwarded.as_bytes());
    if !forwarded_host && let Some(host) = &host {
        push_line(&mut lines, b"x-forwarded-host", host.as_bytes());
    }
    let request_id = proxy::request_id_from(given_id);
    push_line(&mut lines, b"x-request-id", request_id.as_bytes());
    Parsed::Request(
        Head {
            method,
            path: path.to_owned(),
            host,
            close,
            request_id,
            lines,
        },
        used,
    )
}

/// Serves a plain connection's requests while they suit this path.
pub(crate) async fn serve(
    mut tcp: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    max_head: usize,
    header_timeout: Duration,
    stop: &CancellationToken,
) -> Outcome {
    let mut inbuf = BytesMut::with_capacity(8 * 1024);
    let mut out = Vec::with_capacity(4 * 1024);
    loop {
        // The next head, or its first byte, is due within the header timeout of the last
        // answer, as hyper has it: an idle keep-alive connection does not hold a slot for ever.
        let due = proxy::later(Instant::now(), header_timeout);
        let (head, used) = loop {
            if !inbuf.is_empty() {
                match parse(&inbuf, peer) {
                    Parsed::Request(head, used) => break (head, used),
                    Parsed::Hyper => {
                        return Outcome::Handoff(Rewound {
                            pre: inbuf.freeze(),
                            io: tcp,
                        });
                    }
                    Parsed::Partial if inbuf.len() >= max_head => {
                        return Outcome::Handoff(Rewound {
                            pre: inbuf.freeze(),
                            io: tcp,
                        });
                    }
                    Parsed::Partial => {}
                }
            }
            inbuf.reserve(4 * 1024);
            let read = tokio::select! {
                biased;
                read = tokio::time::timeout_at(due, tcp.read_buf(&mut inbuf)) => read,
                // Between requests only: a head under way is read to its end.
                _ = stop.cancelled(), if inbuf.is_empty() => return Outcome::Done,
            };
            match read {
                Ok(Ok(0) | Err(_)) | Err(_) => return Outcome::Done,
                Ok(Ok(_)) => {}
            }
        };
        let next = answer(&proxy, &mut tcp, head, peer, stop, &mut out).await;
        match next {
            Next::Keep if !stop.is_cancelled() => inbuf.advance(used),
            Next::Keep | Next::Close => return Outcome::Done,
            Next::Hyper => {
                return Outcome::Handoff(Rewound {
                    pre: inbuf.freeze(),
                    io: tcp,
                });
            }
        }
    }
}

/// What follows an answer on the client's connection.
enum Next {
    Keep,
    Close,
    /// The request was not handled: hyper takes it, and the connection.
    Hyper,
}

/// Why a streamed answer stopped short.
enum Broke {
    Instance(String),
    Client,
}

/// Writes `bytes` to the client, which must take some of them at least every `idle`: a client
/// that stops reading would otherwise hold this connection, and the instance's, for ever.
async fn send(client: &mut TcpStream, mut bytes: &[u8], idle: Duration) -> Result<(), Broke> {
    while !bytes.is_empty() {
        match tokio::time::timeout(idle, client.write(bytes)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(Broke::Client),
            Ok(Ok(n)) => bytes = &bytes[n..],
        }
    }
    Ok(())
}

/// Sends the rest of an answer body on as it arrives; the bytes sent.
async fn forward(
    plain: &mut Plain,
    client: &mut TcpStream,
    framing: Framing,
    idle: Duration,
) -> Result<u64, Broke> {
    let mut sent = 0u64;
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut chunks = Chunks::default();
    loop {
        let take = match framing {
            Framing::None => return Ok(0),
            Framing::Length(_) => {
                usize::try_from(left).map_or(plain.buf.len(), |l| l.min(plain.buf.len()))
            }
            Framing::Chunked => chunks
                .feed(&plain.buf)
                .map_err(|e| Broke::Instance(e.into()))?,
            Framing::Close => plain.buf.len(),
        };
        if take > 0 {
            send(client, &plain.buf[..take], idle).await?;
            plain.buf.advance(take);
            sent += take as u64;
            left -= take as u64;
        }
        let finished = match framing {
            Framing::Length(_) => left == 0,
            Framing::Chunked => chunks.done(),
            _ => false,
        };
        if finished {
            return Ok(sent);
        }
        plain.buf.reserve(16 * 1024);
        match tokio::time::timeout(idle, plain.tcp.read_buf(&mut plain.buf)).await {
            Ok(Ok(0)) if framing == Framing::Close => return Ok(sent),
            Ok(Ok(0)) => return Err(Broke::Instance("broke off".to_owned())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Broke::Instance(format!("broke off: {}", e.kind()))),
            Err(_) => return Err(Broke::Instance(format!("stalled for {idle:?}"))),
        }
    }
}

fn end_head(out: &mut Vec<u8>, request_id: &HeaderValue, close: bool) {
    push_line(out, b"x-request-id", request_id.as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The gateway's own answer, as `proxy::error_response` makes it for HTTP.
async fn write_error(
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    status: StatusCode,
    message: &str,
    service: Option<&str>,
    request_id: &HeaderValue,
    close: bool,
) -> Next {
    let body = proxy::error_json(status, message, service);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\n");
    push_line(out, b"content-length", body.len().to_string().as_bytes());
    // The gateway is the origin of this answer, and an origin with a clock dates what it
    // sends (RFC 9110, 6.6.1), as hyper does for the gateway's answers on its path.
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    push_line(out, b"date", date.as_bytes());
    end_head(out, request_id, close);
    out.extend_from_slice(body.as_bytes());
    match client.write_all(out).await {
        Ok(()) if !close => Next::Keep,
        _ => Next::Close,
    }
}

async fn answer(
    proxy: &Proxy,
    client: &mut TcpStream,
    head: Head,
    peer: SocketAddr,
    stop: &CancellationToken,
    out: &mut Vec<u8>,
) -> Next {
    let settings = &proxy.settings;
    let started = Instant::now();
    let mut record = Record {
        method: head.method.clone(),
        path: head.path.clone(),
        client: peer,
        request_id: head.request_id.clone(),
        service: "-".to_owned(),
        instance: None,
        retries: 0,
        started,
    };
    macro_rules! fail {
        ($status:expr, $message:expr, $service:expr) => {{
            let status: StatusCode = $status;
            proxy
                .metrics
                .answered(&record.service, status.as_u16(), record.started.elapsed());
            record.finish(settings.access_log, status.as_u16(), None);
            let close = head.close || stop.is_cancelled();
            return write_error(
                client,
                out,
                status,
                $message,
                $service,
                &record.request_id,
                close,
            )
            .await;
        }};
    }
    let routed = match proxy.routes.route(&head.path, head.host.as_deref(), false) {
        Ok(routed) => routed,
        Err(no_route) => fail!(StatusCode::BAD_REQUEST, &no_route.to_string(), None),
    };
    let service = routed.target.service.clone();
    let upstream = match proxy.upstream_for(&routed).await {
        Ok(upstream) => upstream,
        Err((status, message)) => fail!(status, &message, Some(&service)),
    };
    if !upstream.snapshot().iter().all(|e| e.is_http1()) {
        return Next::Hyper;
    }
    record.service = service.clone();
    let sm = upstream.metrics(&proxy.metrics);
    upstream.budget.deposit();

    let timeout = routed.timeouts.request.unwrap_or(settings.request_timeout);
    let idle = routed.timeouts.idle.unwrap_or(settings.idle_timeout);
    let deadline = proxy::later(started, timeout);

    let bounds = proxy::Bounds {
        upstream: &upstream,
        target: &routed.target,
        service: &service,
        sm,
        idempotent: proxy::idempotent(&head.method),
        head_request: head.method == Method::HEAD,
        timeout,
        deadline,
        client_h2: false,
        form: Form::Lines,
    };
    let mut tries = proxy::Tries::default();
    loop {
        let Some(endpoint) = upstream.pick(&tries.tried) else {
            let message = proxy::no_instance(&upstream, &routed.target, tries.last_error.take());
            fail!(StatusCode::SERVICE_UNAVAILABLE, &message, Some(&service))
        };
        if !endpoint.is_http1() {
            // An instance registered as h2c since the check above: hyper's path takes a first
            // attempt; a later one passes it over.
            if tries.attempts == 0 {
                return Next::Hyper;
            }
            tries.tried.push(endpoint);
            continue;
        }
        tries.attempts += 1;
        if tries.attempts > 1 {
            record.retries += 1;
            sm.retries.inc();
        }
        record.instance = Some(endpoint.id.clone());
        out.clear();
        out.extend_from_slice(head.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(routed.path_and_query.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        push_line(out, b"host", endpoint.authority.as_str().as_bytes());
        out.extend_from_slice(&head.lines);
        out.extend_from_slice(b"\r\n");
        let (answer, mut plain, endpoint) = match proxy
            .plain_attempt(&bounds, &mut tries, endpoint, out)
            .await
        {
            proxy::Attempt::Answer(answer, plain, endpoint) => (answer, plain, endpoint),
            proxy::Attempt::Again => continue,
            proxy::Attempt::Fail(status, message) => fail!(status, &message, Some(&service)),
        };
        let status = answer.status;
        // Judged by the body unless the head said failure already (`proxy::judge_head`).
        let pending = !proxy::fails_at_head(status);
        let close = head.close || stop.is_cancelled() || answer.framing == Framing::Close;
        let Answer {
            head: answer_head,
            framing,
            closes,
            ..
        } = answer;
        *out = answer_head;
        end_head(out, &head.request_id, close);
        let small = match framing {
            Framing::None => Some(0),
            Framing::Length(n) if n <= settings.retry_buffer as u64 => usize::try_from(n).ok(),
            _ => None,
        };
        let result = if let Some(n) = small {
            // Read whole and sent on in one write, as nginx's proxy buffering does: half the
            // writes for the typical API answer, and the connection is back in the pool at once.
            if let Err(why) = read_whole(&mut plain, n, idle).await {
                endpoint.load.end();
                if pending {
                    upstream.record(&endpoint, true);
                }
                let message = format!("the answer of instance {} {why}", endpoint.id);
                fail!(StatusCode::BAD_GATEWAY, &message, Some(&service))
            }
            if pending {
                upstream.record(&endpoint, false);
            }
            sm.answered(&proxy.metrics, status, started.elapsed());
            out.extend_from_slice(&plain.buf[..n]);
            plain.buf.advance(n);
            // The instance is done with before a slow client reads: its load ends and its
            // connection is free for the next request.
            endpoint.load.end();
            if !closes {
                endpoint.checkin_plain(plain);
            }
            send(client, out, idle).await.map(|()| n as u64)
        } else {
            sm.answered(&proxy.metrics, status, started.elapsed());
            let streamed = match send(client, out, idle).await {
                Ok(()) => forward(&mut plain, client, framing, idle).await,
                Err(broke) => Err(broke),
            };
            endpoint.load.end();
            if streamed.is_ok() {
                if pending {
                    upstream.record(&endpoint, false);
                }
                if !closes {
                    endpoint.checkin_plain(plain);
                }
            }
            streamed
        };
        let next = match result {
            Ok(bytes) => {
                record.finish(settings.access_log, status, Some(bytes));
                if close { Next::Close } else { Next::Keep }
            }
            Err(Broke::Client) => {
                record.finish(settings.access_log, status, None);
                Next::Close
            }
            Err(Broke::Instance(why)) => {
                if pending {
                    upstream.record(&endpoint, true);
                }
                tracing::debug!(instance = %endpoint.id, %why, "an answer broke off mid-body");
                record.finish(settings.access_log, status, None);
                Next::Close
            }
        };
        return next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(raw: &str) -> Option<Head> {
        match parse(raw.as_bytes(), "192.0.2.7:5000".parse().ok()?) {
            Parsed::Request(head, used) => {
                assert_eq!(used, raw.len());
                Some(head)
            }
            _ => None,
        }
    }

    #[test]
    fn requests_with_a_body_an_upgrade_or_grpc_go_to_hyper() {
        assert!(head_of("GET /web/ HTTP/1.1\r\nhost: a\r\n\r\n").is_some());
        assert!(head_of("DELETE /web/x HTTP/1.1\r\ncontent-length: 0\r\n\r\n").is_some());
        for raw in [
            "POST /web/ HTTP/1.1\r\ncontent-length: 3\r\n\r\n",
            "POST /web/ HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /ws HTTP/1.1\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
            "POST /g/M HTTP/1.1\r\ncontent-type: application/grpc\r\n\r\n",
            "GET /web/ HTTP/1.0\r\n\r\n",
            "GET http://a/web/ HTTP/1.1\r\n\r\n",
            "PUT /web/ HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            "CONNECT /web/ HTTP/1.1\r\n\r\n",
            "GET /web/caf\u{e9} HTTP/1.1\r\n\r\n",
        ] {
            assert!(head_of(raw).is_none(), "{raw:?}");
        }
        let mut slots = [httparse::EMPTY_HEADER; 4];
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert!(httparse::Request::new(&mut slots).parse(preface).is_err());
        assert!(matches!(
            parse(
                preface,
                "192.0.2.7:5000".parse().unwrap_or(([0, 0, 0, 0], 0).into())
            ),
            Parsed::Hyper
        ));
    }

    #[test]
    fn headers_sent_on_drop_hop_by_hop_ones_and_add_this_hop() {
        let head = head_of(
            "GET /web/a?b=1 HTTP/1.1\r\nHost: Api.Example:8080\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nX-Forwarded-For: 10.0.0.1\r\nAccept: */*\r\nX-Request-Id: abc\r\n\r\n",
        );
        let Some(head) = head else {
            panic!("a plain GET is this path's");
        };
        let lines = String::from_utf8_lossy(&head.lines).into_owned();
        assert_eq!(head.host.as_deref(), Some("api.example"));
        assert_eq!(head.path, "/web/a?b=1");
        assert_eq!(
            lines,
            "Accept: */*\r\nx-forwarded-for: 10.0.0.1, 192.0.2.7\r\nx-forwarded-proto: http\r\nforwarded: for=192.0.2.7;proto=http;host=\"api.example\"\r\nx-forwarded-host: api.example\r\nx-request-id: abc\r\n"
        );
        assert!(!head.close);
        // What `Connection` names is gone before this hop's headers are made; the first of
        // repeated fields counts; a zero length stays.
        let Some(named) = head_of(
            "DELETE /web/x HTTP/1.1\r\nHost: a\r\nConnection: x-forwarded-host\r\nX-Forwarded-Host: b\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\nContent-Length: 0\r\n\r\n",
        ) else {
            panic!("a body-less DELETE is this path's");
        };
        let lines = String::from_utf8_lossy(&named.lines).into_owned();
        assert!(lines.starts_with("Content-Length: 0\r\n"), "{lines}");
        assert!(
            lines.contains("x-forwarded-for: 10.0.0.1, 192.0.2.7\r\n"),
            "{lines}"
        );
        assert!(lines.contains("x-forwarded-host: a\r\n"), "{lines}");
        assert!(!lines.contains(": b\r\n"), "{lines}");
        let closing = head_of("GET / HTTP/1.1\r\nconnection: close\r\n\r\n");
        assert!(closing.is_some_and(|h| h.close));
    }
}
