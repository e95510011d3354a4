//! HTTP/1.1 to instances, as bytes: the gateway's own client side, where hyper's client would
//! build a request, hand it to a connection task and parse the answer into maps again.
//!
//! [`exchange`] writes a request head on a [`Plain`] connection and reads the answer's head,
//! in one of two [`Form`]s: header lines ready for an HTTP/1.1 client (`h1`, which writes them
//! on as they are), or a `HeaderMap` for hyper's server (`proxy`, for requests that came over
//! HTTP/2 or TLS). [`Chunks`] finds where a chunked body ends and where its data lies;
//! [`PlainBody`] is an answer body read from the connection as the client takes it.
//!
//! The framing rules (RFC 9112 §6.3) and the hop-by-hop rules ([`is_hop_by_hop`]) live here
//! once, for both forms.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::upstream::{BoxError, Endpoint, Plain};

/// As many header fields as hyper accepts.
pub(crate) const MAX_HEADERS: usize = 100;
/// The largest answer head read from an instance.
const MAX_ANSWER_HEAD: usize = 64 * 1024;
/// The longest chunk-size or trailer line accepted in a chunked answer.
const MAX_CHUNK_LINE: usize = 4096;

pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| t.trim_ascii())
}

pub(crate) fn push_line(lines: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    lines.extend_from_slice(name);
    lines.extend_from_slice(b": ");
    lines.extend_from_slice(value);
    lines.extend_from_slice(b"\r\n");
}

/// Whether a header belongs to one connection and is never sent on (RFC 9110 §7.6.1), the
/// ones a `Connection` header names aside; `name` in any case.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    const HOP_BY_HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// How an instance's answer body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the instance closes the connection.
    Close,
}

/// An instance's answer head, made ready for the client.
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// The status line and header lines for the client, without the request id or the final
    /// CRLF.
    pub(crate) head: Vec<u8>,
    /// The header fields for hyper's server, in [`Form::Map`].
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// The instance will close the connection after this answer.
    pub(crate) closes: bool,
}

/// Why an exchange with an instance failed.
pub(crate) enum Failure {
    /// Nothing reached the instance.
    Unsent(String),
    Sent(String),
}

/// What an answer's head is read into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// A status line and header lines for an HTTP/1.1 client, in [`Answer::head`].
    Lines,
    /// Header fields for hyper's server, in [`Answer::headers`].
    Map,
}

/// The answer's head at the start of `buf` and its length, once it is all there; the fields
/// sent on are those neither hop-by-hop nor named by `Connection`, with the framing header
/// the gateway itself writes.
fn parse_answer(
    buf: &[u8],
    head_request: bool,
    form: Form,
) -> Result<Option<(Answer, usize)>, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let used = match response.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) if buf.len() > MAX_ANSWER_HEAD => {
            return Err(format!("its answer's head is over {MAX_ANSWER_HEAD} bytes"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("its answer is not HTTP/1.1: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let http10 = response.version == Some(0);
    let mut named: Vec<&[u8]> = Vec::new();
    let mut closes = http10;
    let mut length: Option<u64> = None;
    let mut coding: Option<&[u8]> = None;
    for field in response.headers.iter() {
        let is = |n: &str| field.name.eq_ignore_ascii_case(n);
        if is("connection") {
            for token in tokens(field.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    closes = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    closes = closes && !http10;
                } else if !token.is_empty() {
                    named.push(token);
                }
            }
        } else if is("content-length") {
            let n = std::str::from_utf8(field.value.trim_ascii())
                .ok()
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or("its answer's content-length is not a number")?;
            if length.is_some_and(|l| l != n) {
                return Err("its answer has two content-lengths".to_owned());
            }
            length = Some(n);
        } else if is("transfer-encoding") {
            coding = Some(field.value);
        }
    }
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::None
    } else if let Some(coding) = coding {
        let last = tokens(coding).last().unwrap_or_default();
        if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let kept = response.headers.iter().filter(|field| {
        let name = field.name;
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        // The framing headers are written below, whatever `Connection` names: the body goes on
        // framed as it came, and the client must be told how.
        !(is_hop_by_hop(name)
            || is("x-request-id")
            || is("content-length")
            || named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes())))
    });
    // A length beside a transfer coding is not sent on (RFC 9112 §6.3).
    let length = match (coding, length) {
        (None, Some(n)) if status != 204 && !(100..200).contains(&status) => Some(n),
        _ => None,
    };
    let mut head = Vec::new();
    let mut headers = HeaderMap::new();
    match form {
        Form::Lines => {
            head.reserve(used + 64);
            head.extend_from_slice(b"HTTP/1.1 ");
            // httparse reads a status as exactly three digits.
            head.extend_from_slice(&[
                b'0' + (status / 100 % 10) as u8,
                b'0' + (status / 10 % 10) as u8,
                b'0' + (status % 10) as u8,
            ]);
            head.push(b' ');
            head.extend_from_slice(response.reason.unwrap_or("").as_bytes());
            head.extend_from_slice(b"\r\n");
            for field in kept {
                push_line(&mut head, field.name.as_bytes(), field.value);
            }
            match (coding, length) {
                // The body goes on as it came, transfer-coded, so its coding does too.
                (Some(coding), _) if framing != Framing::None => {
                    push_line(&mut head, b"transfer-encoding", coding)
                }
                (_, Some(n)) => push_line(&mut head, b"content-length", n.to_string().as_bytes()),
                _ => {}
            }
        }
        Form::Map => {
            headers.reserve(response.headers.len());
            for field in kept {
                let name = HeaderName::from_bytes(field.name.as_bytes());
                let value = HeaderValue::from_bytes(field.value);
                let (Ok(name), Ok(value)) = (name, value) else {
                    return Err(format!("its answer's header {:?} is malformed", field.name));
                };
                headers.append(name, value);
            }
            // The body's coding is undone (`PlainBody`); hyper frames it anew for its client.
            if let Some(n) = length {
                headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
    }
    Ok(Some((
        Answer {
            status,
            head,
            headers,
            framing,
            closes: closes || framing == Framing::Close,
        },
        used,
    )))
}

/// Sends `request` on `plain` and reads the answer's head, interim answers skipped.
pub(crate) async fn exchange(
    plain: &mut Plain,
    request: &[u8],
    head_request: bool,
    form: Form,
) -> Result<Answer, Failure> {
    plain
        .tcp
        .write_all(request)
        .await
        .map_err(|e| Failure::Unsent(e.kind().to_string()))?;
    loop {
        if !plain.buf.is_empty() {
            match parse_answer(&plain.buf, head_request, form) {
                Ok(Some((answer, used))) => {
                    plain.buf.advance(used);
                    if answer.status == 101 {
                        return Err(Failure::Sent("it switched protocols unasked".to_owned()));
                    }
                    if (100..200).contains(&answer.status) {
                        continue;
                    }
                    return Ok(answer);
                }
                Ok(None) => {}
                Err(why) => return Err(Failure::Sent(why)),
            }
        }
        plain.buf.reserve(8 * 1024);
        match plain.tcp.read_buf(&mut plain.buf).await {
            Ok(0) => {
                return Err(Failure::Sent(
                    "connection closed before message completed".to_owned(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::Sent(e.kind().to_string())),
        }
    }
}

/// Where a chunked body ends, found as its bytes go by (RFC 9112 §7.1).
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    state: ChunkState,
    size: u64,
    digits: usize,
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Whitespace after the size, before an extension or the line's end.
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// How many of `bytes` belong to the body; fewer than all only once it has ended.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<usize, &'static str> {
        self.feed_data(bytes, |_, _| {})
    }

    /// [`Self::feed`], telling `data` where in `bytes` each run of chunk data lies (start,
    /// length): what is left once the coding is undone.
    pub(crate) fn feed_data(
        &mut self,
        bytes: &[u8],
        mut data: impl FnMut(usize, usize),
    ) -> Result<usize, &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() && self.state != Done {
            let b = bytes[i];
            match self.state {
                Data => {
                    let n = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    data(i, n);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(digit))
                            .ok_or("a chunk size overflows")?;
                        self.digits += 1;
                    }
                    b';' if self.digits > 0 => self.state = Extension,
                    b' ' | b'\t' if self.digits > 0 => self.state = SizeSpace,
                    b'\r' if self.digits > 0 => self.state = SizeLf,
                    _ => return Err("a chunk size is malformed"),
                },
                SizeSpace => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = Extension,
                    b'\r' => self.state = SizeLf,
                    _ => return Err("a chunk size is malformed"),
                },
                Extension => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err("a chunk extension is too long");
                    }
                    match b {
                        b'\r' => self.state = SizeLf,
                        // A bare LF or another control byte would let a lenient client see
                        // a different end.
                        b'\t' => {}
                        0..=0x1f | 0x7f => return Err("a chunk extension has a control byte"),
                        _ => {}
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err("a chunk size line is malformed");
                    }
                    self.line = 0;
                    self.digits = 0;
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                DataCr => {
                    if b != b'\r' {
                        return Err("a chunk does not end with CRLF");
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err("a chunk does not end with CRLF");
                    }
                    self.state = Size;
                }
                TrailerStart => match b {
                    b'\r' => self.state = EndLf,
                    b'\n' => return Err("a trailer line is malformed"),
                    _ => self.state = Trailer,
                },
                Trailer => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err("a trailer is too long");
                    }
                    match b {
                        b'\r' => self.state = TrailerLf,
                        b'\t' => {}
                        0..=0x1f | 0x7f => return Err("a trailer has a control byte"),
                        _ => {}
                    }
                }
                TrailerLf => {
                    if b != b'\n' {
                        return Err("a trailer line is malformed");
                    }
                    self.line = 0;
                    self.state = TrailerStart;
                }
                EndLf => {
                    if b != b'\n' {
                        return Err("a chunked body does not end with CRLF");
                    }
                    self.state = Done;
                }
                Done => {}
            }
            i += 1;
        }
        Ok(i)
    }

    pub(crate) fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// Reads a body of `n` bytes whole into `plain.buf`.
pub(crate) async fn read_whole(plain: &mut Plain, n: usize, idle: Duration) -> Result<(), String> {
    while plain.buf.len() < n {
        plain.buf.reserve(n - plain.buf.len());
        match tokio::time::timeout(idle, plain.tcp.read_buf(&mut plain.buf)).await {
            Ok(Ok(0)) => return Err("broke off".to_owned()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("broke off: {}", e.kind())),
            Err(_) => return Err(format!("stalled for {idle:?}")),
        }
    }
    Ok(())
}

/// The head of a request going on to an instance, from fields hop-by-hop ones were taken from:
/// `host` first, and the cookies in one field as HTTP/1.1 has them (HTTP/2 may split them,
/// RFC 9113 §8.2.3). A `te: trailers` is not sent: [`PlainBody`] does not pass trailers on, so
/// the gateway does not claim to take them.
pub(crate) fn request_head(
    out: &mut Vec<u8>,
    method: &http::Method,
    target: &str,
    authority: &str,
    headers: &HeaderMap,
) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_line(out, b"host", authority.as_bytes());
    let mut cookies = false;
    for (name, value) in headers {
        if name == http::header::COOKIE {
            cookies = true;
            continue;
        }
        if name == http::header::TE {
            continue;
        }
        push_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if cookies {
        out.extend_from_slice(b"cookie: ");
        for (i, value) in headers.get_all(http::header::COOKIE).iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// An answer's body read from its instance's connection as the client takes it, a chunked
/// coding undone (its trailers are not sent on); read to its end, the connection goes back to
/// the endpoint's pool, and dropped before, it closes.
pub(crate) struct PlainBody {
    plain: Option<Plain>,
    framing: Framing,
    /// What is still to come of a body of known length.
    left: u64,
    chunks: Chunks,
    /// The instance closes the connection after this answer.
    closes: bool,
    endpoint: Arc<Endpoint>,
    done: bool,
}

impl PlainBody {
    pub(crate) fn new(plain: Plain, answer: &Answer, endpoint: Arc<Endpoint>) -> PlainBody {
        let left = match answer.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut body = PlainBody {
            plain: Some(plain),
            framing: answer.framing,
            left,
            chunks: Chunks::default(),
            closes: answer.closes,
            endpoint,
            done: false,
        };
        if body.is_empty() {
            body.finish();
        }
        body
    }

    fn is_empty(&self) -> bool {
        match self.framing {
            Framing::None => true,
            Framing::Length(_) => self.left == 0,
            _ => false,
        }
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some(plain) = self.plain.take()
            && !self.closes
        {
            self.endpoint.checkin_plain(plain);
        }
    }

    fn broke(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.plain = None;
        Poll::Ready(Some(Err(why.into())))
    }
}

impl http_body::Body for PlainBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(plain) = this.plain.as_mut() else {
                return Poll::Ready(None);
            };
            if !plain.buf.is_empty() {
                let data = match this.framing {
                    Framing::None => Bytes::new(),
                    Framing::Length(_) => {
                        let n = usize::try_from(this.left)
                            .map_or(plain.buf.len(), |left| left.min(plain.buf.len()));
                        this.left -= n as u64;
                        plain.buf.split_to(n).freeze()
                    }
                    Framing::Close => plain.buf.split().freeze(),
                    Framing::Chunked => {
                        let mut spans: Vec<(usize, usize)> = Vec::new();
                        let used = match this
                            .chunks
                            .feed_data(&plain.buf, |at, n| spans.push((at, n)))
                        {
                            Ok(used) => used,
                            Err(why) => {
                                return this.broke(format!("the answer's chunked coding: {why}"));
                            }
                        };
                        let raw = plain.buf.split_to(used).freeze();
                        match spans.as_slice() {
                            [] => Bytes::new(),
                            [(at, n)] => raw.slice(*at..at + n),
                            many => {
                                let mut joined = Vec::with_capacity(many.iter().map(|s| s.1).sum());
                                for (at, n) in many {
                                    joined.extend_from_slice(&raw[*at..at + n]);
                                }
                                Bytes::from(joined)
                            }
                        }
                    }
                };
                if this.is_empty() || this.chunks.done() {
                    this.finish();
                }
                if !data.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                continue;
            }
            plain.buf.reserve(16 * 1024);
            match plain.tcp.try_read_buf(&mut plain.buf) {
                Ok(0) if this.framing == Framing::Close => {
                    this.done = true;
                    this.plain = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.broke("the answer broke off".to_owned()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    match plain.tcp.poll_read_ready(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => {
                            return this.broke(format!("the answer broke off: {}", e.kind()));
                        }
                    }
                }
                Err(e) => return this.broke(format!("the answer broke off: {}", e.kind())),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::None => SizeHint::with_exact(0),
            Framing::Length(_) => SizeHint::with_exact(self.left),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(body: &[u8]) -> Result<usize, &'static str> {
        Chunks::default().feed(body)
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        let body = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nExpires: never\r\n\r\nNEXT";
        assert_eq!(chunked(body), Ok(body.len() - 4));
        assert_eq!(chunked(b"0\r\n\r\n"), Ok(5));
        // Fed a byte at a time, it ends at the same place.
        let mut chunks = Chunks::default();
        let mut taken = 0;
        for b in body.iter() {
            taken += chunks.feed(std::slice::from_ref(b)).unwrap_or(0);
            if chunks.done() {
                break;
            }
        }
        assert_eq!(taken, body.len() - 4);
    }

    #[test]
    fn a_malformed_chunked_body_is_refused() {
        assert!(chunked(b"x\r\n").is_err());
        assert!(chunked(b"\r\n").is_err());
        assert!(chunked(b"3\r\nabcX").is_err());
        assert!(chunked(b"ffffffffffffffffff\r\n").is_err());
        // A bare LF could end a line for a lenient client and not here, or the reverse.
        assert!(chunked(b"5;x\nhello\r\n").is_err());
        assert!(chunked(b"0\r\n\n").is_err());
        assert!(chunked(b"0\r\nx: y\n\r\n\r\n").is_err());
        assert!(chunked(b"5 x\r\n").is_err());
        let spaced = b"5 ;x=1\r\nhello\r\n0\r\n\r\n";
        assert_eq!(chunked(spaced), Ok(spaced.len()));
    }

    #[test]
    fn answers_are_framed_by_the_rules_of_http_1_1() {
        let framing = |raw: &str, head: bool| {
            parse_answer(raw.as_bytes(), head, Form::Lines)
                .ok()
                .flatten()
                .map(|(a, _)| (a.framing, a.closes))
        };
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", false),
            Some((Framing::Length(3), false))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true),
            Some((Framing::None, false))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
                false
            ),
            Some((Framing::Chunked, false))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\n\r\n", false),
            Some((Framing::Close, true))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false),
            Some((Framing::Length(1), true))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
                false
            ),
            Some((Framing::None, true))
        );
        assert!(
            parse_answer(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false,
                Form::Lines
            )
            .is_err()
        );
        assert!(
            parse_answer(
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                false,
                Form::Lines
            )
            .is_err()
        );
        assert!(
            parse_answer(
                b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
                false,
                Form::Lines
            )
            .is_err()
        );
        let head = |raw: &[u8]| match parse_answer(raw, false, Form::Lines) {
            Ok(Some((answer, _))) => String::from_utf8_lossy(&answer.head).into_owned(),
            _ => String::new(),
        };
        // The client is told the framing the body comes in, whatever `Connection` names.
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 05\r\n\r\n"),
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n"
        );
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\n"),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n"
        );
        assert!(matches!(
            parse_answer(b"HTTP/1.1 200 OK\r\n", false, Form::Lines),
            Ok(None)
        ));
        let Ok(Some((answer, _))) = parse_answer(
            b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nx-hop: 1\r\nx-request-id: theirs\r\nserver: b\r\ncontent-length: 0\r\n\r\n",
            false,
            Form::Lines,
        ) else {
            panic!("a sound answer parses");
        };
        assert_eq!(
            String::from_utf8_lossy(&answer.head),
            "HTTP/1.1 200 OK\r\nserver: b\r\ncontent-length: 0\r\n"
        );
    }

    #[test]
    fn an_answer_for_hyper_has_its_fields_and_no_framing_of_http_1_1() {
        let map = |raw: &[u8], head: bool| match parse_answer(raw, head, Form::Map) {
            Ok(Some((answer, _))) => Some((answer.framing, answer.headers)),
            _ => None,
        };
        let Some((framing, headers)) = map(
            b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nx-hop: 1\r\nset-cookie: a=1\r\n\
              set-cookie: b=2\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            false,
        ) else {
            panic!("a sound answer parses");
        };
        assert_eq!(framing, Framing::Chunked);
        let names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        // The coding is undone for the client, so neither it nor the length beside it goes on.
        assert_eq!(names, ["set-cookie"]);
        assert_eq!(headers.get_all("set-cookie").iter().count(), 2);
        let Some((framing, headers)) = map(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true)
        else {
            panic!("a sound answer parses");
        };
        // A HEAD answer has no body, and its length says what a GET's would be.
        assert_eq!(framing, Framing::None);
        assert_eq!(
            headers.get("content-length").map(|v| v.as_bytes()),
            Some(&b"7"[..])
        );
        assert!(map(b"HTTP/1.1 200 OK\r\nbad\x01: x\r\n\r\n", false).is_none());
    }

    #[test]
    fn a_request_head_has_its_host_first_and_its_cookies_in_one_field() {
        let mut headers = HeaderMap::new();
        headers.append("cookie", HeaderValue::from_static("a=1"));
        headers.append("accept", HeaderValue::from_static("*/*"));
        headers.append("cookie", HeaderValue::from_static("b=2"));
        headers.append("te", HeaderValue::from_static("trailers"));
        let mut out = Vec::new();
        request_head(
            &mut out,
            &http::Method::GET,
            "/x?y=1",
            "10.0.0.1:80",
            &headers,
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET /x?y=1 HTTP/1.1\r\nhost: 10.0.0.1:80\r\naccept: */*\r\ncookie: a=1; b=2\r\n\r\n"
        );
    }
}
