//! gRPC streams spoken straight over h2, for the fan-out workload's thousands of subscribers.
//!
//! Through tonic's client each stream of a subscriber costs two tasks (the stream's own and
//! hyper's, which pipes the request body to h2) and a channel between them, so every ACK an
//! ADS subscriber sends wakes both: the generator then spent about as much CPU per change as
//! the server it measures. Here a stream's task writes its messages to h2 itself and reads
//! the answers' DATA frames as they come, framing and unframing gRPC messages (a flag byte and a
//! 4-byte length) by hand, and a connection's writes leave together once per run of its task
//! ([`Batched`]). Both sides of the xDS-against-Watch comparison use it, so they are measured
//! with the same client.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{self, Poll, ready};

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One HTTP/2 connection to a gRPC server, on which streams are opened.
#[derive(Clone)]
pub(crate) struct Connection {
    requests: SendRequest<Bytes>,
    /// `http://host:port`, the requests' scheme and authority.
    base: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("base", &self.base)
            .finish()
    }
}

impl Connection {
    /// Connects to `base` (`http://host:port`). Each response is a subscriber's whole view, and
    /// hundreds of streams share a connection: the windows are large, as a real client with
    /// bandwidth-delay probing (grpc C-core, Java) grows its own.
    pub(crate) async fn open(base: &str) -> anyhow::Result<Connection> {
        let authority = base
            .strip_prefix("http://")
            .with_context(|| format!("{base}: only plain-text http:// targets are spoken here"))?;
        let tcp = TcpStream::connect(authority)
            .await
            .with_context(|| format!("cannot connect to {base}"))?;
        tcp.set_nodelay(true)?;
        let (requests, connection) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake::<_, Bytes>(Batched::new(tcp))
            .await
            .with_context(|| format!("HTTP/2 handshake with {base} failed"))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("signpost-bench: a connection ended: {e}");
            }
        });
        Ok(Connection {
            requests,
            base: base.to_owned(),
        })
    }

    /// Opens a stream on `path` (`/package.Service/Method`) that sends `first`, and ends the
    /// request there if `last`.
    pub(crate) async fn stream(
        &self,
        path: &str,
        first: Bytes,
        last: bool,
    ) -> anyhow::Result<Stream> {
        let mut requests = self.requests.clone().ready().await?;
        let request = http::Request::post(format!("{}{path}", self.base))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut send) = requests.send_request(request, false)?;
        send.send_data(first, last)?;
        let response = response.await?;
        if response.status() != http::StatusCode::OK {
            bail!("{path}: HTTP status {}", response.status());
        }
        // A call refused at once answers with its status in the headers (trailers-only).
        if let Some(status) = failed(response.headers()) {
            bail!("{path}: {status}");
        }
        Ok(Stream {
            send,
            recv: response.into_body(),
            buf: BytesMut::new(),
        })
    }
}

/// A gRPC status other than OK in `headers`, as text.
fn failed(headers: &http::HeaderMap) -> Option<String> {
    let code = headers.get("grpc-status")?.to_str().unwrap_or("?");
    if code == "0" {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("");
    Some(format!("grpc-status {code} {message}"))
}

/// The largest message a stream takes, as the other workloads' clients are set.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// One open gRPC stream: messages out as framed bytes, messages in as their encoded bytes.
pub(crate) struct Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Bytes received and not yet returned as a message.
    buf: BytesMut,
}

impl Stream {
    /// The next message's bytes, or `None` once the server ended the stream with OK.
    pub(crate) async fn message(&mut self) -> anyhow::Result<Option<Bytes>> {
        loop {
            if let Some(message) = self.next_in_buf()? {
                return Ok(Some(message));
            }
            match self.recv.data().await {
                Some(chunk) => {
                    let chunk = chunk?;
                    // Read is consumed: the server may send as much again.
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    // A chunk that is one whole message (a push is one DATA frame) is that
                    // message, with no copy into the buffer.
                    if self.buf.is_empty()
                        && let Some(message) = whole(&chunk)
                    {
                        return Ok(Some(chunk.slice(5..5 + message)));
                    }
                    self.buf.extend_from_slice(&chunk);
                }
                None => {
                    let trailers = self.recv.trailers().await?.unwrap_or_default();
                    if !trailers.contains_key("grpc-status") {
                        bail!("the stream ended with no gRPC status");
                    }
                    if let Some(status) = failed(&trailers) {
                        bail!("the stream ended: {status}");
                    }
                    if !self.buf.is_empty() {
                        bail!("the stream ended inside a message");
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// The next message decoded as `M`; the stream's end, however it ends, is an error here.
    pub(crate) async fn next<M: prost::Message + Default>(&mut self) -> anyhow::Result<M> {
        let message = self
            .message()
            .await?
            .context("the server ended the stream")?;
        M::decode(message).context("an undecodable message")
    }

    fn next_in_buf(&mut self) -> anyhow::Result<Option<Bytes>> {
        let Some(header) = self.buf.get(..5) else {
            return Ok(None);
        };
        if header[0] != 0 {
            bail!("a compressed message, which this client never asked for");
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_MESSAGE {
            bail!("a message of {len} bytes, over this client's {MAX_MESSAGE}");
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Sends a framed message (see [`frame`]).
    pub(crate) fn send(&mut self, framed: Bytes) -> anyhow::Result<()> {
        Ok(self.send.send_data(framed, false)?)
    }
}

/// The length of the message `chunk` holds, when it holds exactly one uncompressed message
/// within the size limit; anything else goes through the buffer, which says what is wrong.
fn whole(chunk: &[u8]) -> Option<usize> {
    let header = chunk.get(..5)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    (header[0] == 0 && len <= MAX_MESSAGE && chunk.len() == 5 + len).then_some(len)
}

/// `message` as a gRPC frame: uncompressed, its length, its bytes.
pub(crate) fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    // Cannot fail: the buffer has room for the whole message.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// The generator's end of a connection: what h2 writes leaves at its next flush, normally
/// the connection task's next run, with what the streams' tasks have given h2 meanwhile. The
/// ACKs of the hundreds of subscribers on a connection were otherwise a system call each (each
/// also running the server's side of loopback TCP), the largest part of the generator's CPU per
/// change: real subscribers, each on a machine of its own, do not share one CPU for that. The
/// server still reads every ACK.
struct Batched<T> {
    io: T,
    kept: Vec<u8>,
    /// How much of `kept` is already written.
    written: usize,
    /// Whether the last flush was put off to the task's next run.
    deferred: bool,
}

impl<T> Batched<T> {
    /// Kept bytes beyond this are written at once.
    const HOLD: usize = 256 * 1024;

    fn new(io: T) -> Self {
        Batched {
            io,
            kept: Vec::new(),
            written: 0,
            deferred: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Batched<T> {
    fn drain(&mut self, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.kept.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.kept[self.written..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.written += n,
            }
        }
        self.kept.clear();
        self.written = 0;
        self.deferred = false;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Batched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Batched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.kept.len() - this.written >= Self::HOLD {
            ready!(this.drain(cx))?;
        }
        let mut len = 0;
        for b in bufs {
            this.kept.extend_from_slice(b);
            len += b.len();
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.written < this.kept.len() {
            if !this.deferred {
                // h2 flushes each time its task runs (and it is woken here to run again): the
                // next flush writes this, and whatever the streams queue before it.
                this.deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(this.drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
