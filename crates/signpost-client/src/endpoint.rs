//! One backend instance behind a balanced channel: its HTTP/2 connection, the state the picker
//! reads (connecting, ready, failed), its load and its outlier record.
//!
//! Each endpoint owns one connection and a task that keeps it, written as a state machine:
//! `Connecting` (TCP connect, HTTP/2 handshake, and the server's first bytes — its SETTINGS
//! frame — all within the connect timeout; as gRPC's own clients do, a connection counts as ready
//! only once the server has spoken, so a process that is stopped but whose kernel still accepts
//! connections is never ready), `Connected` (the connection is driven until it ends: EOF, GOAWAY,
//! reset, keep-alive timeout, or a call that found it unresponsive), and `Disconnected` (a
//! backoff before the next attempt). The endpoint is out of the pick the moment its connection
//! ends, long before the registry notices that the instance is gone.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::load::Load;
use crate::outlier::Outlier;
use crate::tls::Tls;
use crate::types::{Health, Instance};
use signpost_backoff::Backoff;

/// The request body of every call a generated client makes.
pub(crate) type Body = tonic::body::Body;
pub(crate) type Sender = http2::SendRequest<Body>;

/// Where an endpoint's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EndpointState {
    /// Connecting, or waiting for the server's first frame.
    Connecting,
    /// Connected and taking calls.
    Ready,
    /// The last attempt failed; waiting before the next.
    Failed,
    /// Connected, but a call waited long with nothing read from the connection: out of the pick
    /// while a probe asks the instance whether it is still there.
    Probing,
}

impl EndpointState {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => EndpointState::Ready,
            2 => EndpointState::Failed,
            3 => EndpointState::Probing,
            _ => EndpointState::Connecting,
        }
    }
}

/// How an endpoint connects; shared by every endpoint of a channel.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) connect_timeout: Duration,
    pub(crate) keep_alive_interval: Option<Duration>,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) reconnect_base: Duration,
    pub(crate) reconnect_max: Duration,
    /// How the RTT estimate forgets: the weight of an old sample falls by e every `decay`.
    pub(crate) ewma_decay: Duration,
    /// TLS to the instances, if they speak it.
    pub(crate) tls: Option<Tls>,
}

/// The parts of an instance that may change without a new connection.
#[derive(Debug, Clone)]
struct Meta {
    pub(crate) weight: u32,
    pub(crate) zone: String,
    pub(crate) healthy: bool,
}

impl Meta {
    fn of(instance: &Instance) -> Meta {
        Meta {
            weight: instance.weight,
            zone: instance.zone.clone(),
            // Only a CRITICAL verdict counts against an instance; a status this client does not
            // know (a newer registry) does not.
            healthy: instance.health != Health::Critical,
        }
    }
}

/// One connection's activity: how many reads returned bytes. A call that waited long and saw
/// no read at all makes the connection suspect.
#[derive(Debug)]
pub(crate) struct Activity {
    reads: AtomicU64,
    /// Fired by the server's first frame, its SETTINGS.
    spoke: Notify,
    /// The first bytes were not an HTTP/2 frame.
    not_http2: AtomicBool,
    suspect: Notify,
    /// A second handle on the socket, to shut it down: the HTTP/2 connection runs on a task of
    /// hyper's, which ends (failing every call on it) only when its socket does.
    socket: Option<std::net::TcpStream>,
}

impl Activity {
    fn new(socket: Option<std::net::TcpStream>) -> Activity {
        Activity {
            reads: AtomicU64::new(0),
            spoke: Notify::new(),
            not_http2: AtomicBool::new(false),
            suspect: Notify::new(),
            socket,
        }
    }

    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// A call gave up after waiting long with nothing read: the connection task probes.
    pub(crate) fn declare_suspect(&self) {
        self.suspect.notify_one();
    }

    fn shut_down(&self) {
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A ready connection: the handle calls are sent on, and its activity.
#[derive(Debug, Clone)]
pub(crate) struct Ready {
    pub(crate) sender: Sender,
    pub(crate) activity: Arc<Activity>,
    /// Which connection of the endpoint this is (each new one takes the next number).
    pub(crate) generation: u64,
}

/// One backend instance. Shared by the balancer (which reads it on every pick) and its
/// connection task (which writes its state).
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) authority: http::uri::Authority,
    /// `https` when the channel speaks TLS to its instances.
    pub(crate) scheme: http::uri::Scheme,
    /// The latest connection's number; see [`Ready::generation`].
    generation: AtomicU64,
    /// Read on every pick, so kept in atomics; the zone's name only for stats.
    weight: AtomicU32,
    healthy: AtomicBool,
    /// In the client's zone.
    local: AtomicBool,
    zone: Mutex<String>,
    /// Kept past its removal from the registry's view (see `balance.rs`).
    pub(crate) stale: AtomicBool,
    state: AtomicU8,
    ready: Mutex<Option<Ready>>,
    last_error: Mutex<Option<String>>,
    pub(crate) load: Load,
    pub(crate) outlier: Mutex<Outlier>,
    pub(crate) calls: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// Probes of a suspect connection (answered or not).
    pub(crate) probes: AtomicU64,
    /// Wakes calls that wait for an endpoint to become ready.
    changed: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
}

impl Endpoint {
    /// The endpoint for `instance`, with its connection task started; `None` when the
    /// instance's address cannot be an HTTP authority.
    pub(crate) fn start(
        instance: &Instance,
        client_zone: &str,
        settings: Arc<Settings>,
        changed: Arc<watch::Sender<u64>>,
    ) -> Result<Arc<Endpoint>, String> {
        let authority = instance.authority()?;
        let meta = Meta::of(instance);
        let endpoint = Arc::new(Endpoint {
            id: instance.id.clone(),
            host: instance.address.clone(),
            port: instance.port,
            authority,
            scheme: if settings.tls.is_some() {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            generation: AtomicU64::new(0),
            weight: AtomicU32::new(meta.weight),
            healthy: AtomicBool::new(meta.healthy),
            local: AtomicBool::new(!client_zone.is_empty() && meta.zone == client_zone),
            zone: Mutex::new(meta.zone),
            stale: AtomicBool::new(false),
            state: AtomicU8::new(0),
            ready: Mutex::new(None),
            last_error: Mutex::new(None),
            load: Load::new(settings.ewma_decay),
            outlier: Mutex::new(Outlier::default()),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            changed,
            stop: CancellationToken::new(),
        });
        tokio::spawn(keep_connected(endpoint.clone(), settings));
        Ok(endpoint)
    }

    /// Same address: the connection can stay.
    pub(crate) fn serves(&self, instance: &Instance) -> bool {
        self.host == instance.address && self.port == instance.port
    }

    pub(crate) fn update(&self, instance: &Instance, client_zone: &str) {
        let meta = Meta::of(instance);
        self.weight.store(meta.weight, Ordering::Relaxed);
        self.healthy.store(meta.healthy, Ordering::Relaxed);
        self.local.store(
            !client_zone.is_empty() && meta.zone == client_zone,
            Ordering::Relaxed,
        );
        *self.zone.lock().unwrap_or_else(|p| p.into_inner()) = meta.zone;
        self.stale.store(false, Ordering::Relaxed);
        self.changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn zone(&self) -> String {
        self.zone.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn is_local(&self) -> bool {
        self.local.load(Ordering::Relaxed)
    }

    pub(crate) fn state(&self) -> EndpointState {
        EndpointState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The connection to send a call on, if it is up.
    pub(crate) fn ready(&self) -> Option<Ready> {
        let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        ready.as_ref().filter(|r| !r.sender.is_closed()).cloned()
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, state: EndpointState, ready: Option<Ready>, error: Option<String>) {
        *self.ready.lock().unwrap_or_else(|p| p.into_inner()) = ready;
        if let Some(error) = error {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
        }
        self.state.store(state as u8, Ordering::Release);
        self.changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Stops the connection task. Calls in flight finish on the connection; no new one is sent.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How long a connection must have lasted for its end to reset the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(1);

type Connection = http2::Connection<TokioIo<Watched<Io>>, Body, TokioExecutor>;

/// The connection task's states.
enum State {
    Connecting,
    Connected {
        connection: Pin<Box<Connection>>,
        sender: Sender,
        activity: Arc<Activity>,
        since: Instant,
    },
    Disconnected {
        delay: Duration,
    },
}

async fn keep_connected(endpoint: Arc<Endpoint>, settings: Arc<Settings>) {
    let stop = endpoint.stop.clone();
    // The task holds the endpoint only weakly between states, so that a dropped channel's
    // endpoints go away even while their task waits.
    let weak = Arc::downgrade(&endpoint);
    drop(endpoint);
    let mut backoff = Backoff::new(settings.reconnect_base, settings.reconnect_max);
    let mut state = State::Connecting;
    loop {
        state = match state {
            State::Connecting => {
                let Some(endpoint) = weak.upgrade() else {
                    return;
                };
                if endpoint.state() != EndpointState::Connecting {
                    endpoint.set(EndpointState::Connecting, None, None);
                }
                let (host, port) = (endpoint.host.clone(), endpoint.port);
                drop(endpoint);
                let attempt =
                    tokio::time::timeout(settings.connect_timeout, connect(&host, port, &settings));
                let result = tokio::select! {
                    _ = stop.cancelled() => return,
                    result = attempt => result,
                };
                let Some(endpoint) = weak.upgrade() else {
                    return;
                };
                match result {
                    Ok(Ok((sender, connection, activity))) => {
                        endpoint.load.reset();
                        tracing::debug!(id = %endpoint.id, authority = %endpoint.authority, "endpoint ready");
                        let generation = endpoint.generation.fetch_add(1, Ordering::AcqRel) + 1;
                        endpoint.set(
                            EndpointState::Ready,
                            Some(Ready {
                                sender: sender.clone(),
                                activity: activity.clone(),
                                generation,
                            }),
                            None,
                        );
                        State::Connected {
                            connection,
                            sender,
                            activity,
                            since: Instant::now(),
                        }
                    }
                    Ok(Err(error)) => {
                        let delay = backoff.next_delay();
                        tracing::debug!(id = %endpoint.id, authority = %endpoint.authority, %error, ?delay, "endpoint cannot connect");
                        endpoint.set(EndpointState::Failed, None, Some(error));
                        State::Disconnected { delay }
                    }
                    Err(_) => {
                        let delay = backoff.next_delay();
                        let error = format!(
                            "no answer within the connect timeout ({:?})",
                            settings.connect_timeout
                        );
                        tracing::debug!(id = %endpoint.id, authority = %endpoint.authority, %error, ?delay, "endpoint cannot connect");
                        endpoint.set(EndpointState::Failed, None, Some(error));
                        State::Disconnected { delay }
                    }
                }
            }
            State::Connected {
                mut connection,
                sender,
                activity,
                since,
            } => {
                let ended = loop {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            // Removed from the channel: no new calls (the handle is gone with
                            // the endpoint); the connection finishes the calls in flight.
                            if let Some(endpoint) = weak.upgrade() {
                                endpoint.set(EndpointState::Connecting, None, None);
                            }
                            drop(sender);
                            let _ = connection.await;
                            return;
                        }
                        _ = activity.suspect.notified() => {
                            match probe(&weak, &sender, &mut connection, &stop).await {
                                Probe::Answered => continue,
                                Probe::Silent => {
                                    activity.shut_down();
                                    break format!(
                                        "the instance stopped answering: a call waited with nothing read, and a probe got no answer within {PROBE_TIMEOUT:?}"
                                    );
                                }
                                Probe::Ended(reason) => break reason,
                                Probe::Stopped => return,
                            }
                        }
                        result = &mut connection => break ended(result),
                    }
                };
                let Some(endpoint) = weak.upgrade() else {
                    return;
                };
                tracing::info!(id = %endpoint.id, authority = %endpoint.authority, reason = %ended, "endpoint out of the pick; reconnecting");
                endpoint.set(EndpointState::Failed, None, Some(ended));
                // A connection that served a while is tried again at once (after a GOAWAY on a
                // restart it is often back on the next attempt); one that ends as soon as it is
                // made backs off, or an instance that accepts and hangs up would be a busy loop.
                let delay = if since.elapsed() >= STABLE_CONNECTION {
                    backoff.reset();
                    Duration::ZERO
                } else {
                    backoff.next_delay()
                };
                State::Disconnected { delay }
            }
            State::Disconnected { delay } => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => State::Connecting,
                }
            }
        };
    }
}

/// How long a suspect connection's probe may wait for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

fn ended(result: Result<(), hyper::Error>) -> String {
    match result {
        Ok(()) => "the instance closed the connection".to_owned(),
        Err(e) => format!("the connection broke: {}", root_cause(&e)),
    }
}

enum Probe {
    Answered,
    Silent,
    Ended(String),
    Stopped,
}

/// Asks a suspect connection whether the instance is still there, with a request any HTTP/2
/// server answers at once (a gRPC server with UNIMPLEMENTED if it has no health service): a
/// slow handler answers this, a stopped or hung process does not. The endpoint is out of the
/// pick meanwhile, so no new call waits on it.
async fn probe(
    weak: &std::sync::Weak<Endpoint>,
    sender: &Sender,
    connection: &mut Pin<Box<Connection>>,
    stop: &CancellationToken,
) -> Probe {
    let Some(endpoint) = weak.upgrade() else {
        return Probe::Stopped;
    };
    let ready = endpoint.ready();
    endpoint.probes.fetch_add(1, Ordering::Relaxed);
    endpoint.set(EndpointState::Probing, ready.clone(), None);
    let uri = http::Uri::builder()
        .scheme(endpoint.scheme.clone())
        .authority(endpoint.authority.clone())
        .path_and_query("/grpc.health.v1.Health/Check")
        .build();
    let request = uri.map_err(|e| e.to_string()).and_then(|uri| {
        http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(Body::empty())
            .map_err(|e| e.to_string())
    });
    let Ok(request) = request else {
        return Probe::Answered;
    };
    let mut sender = sender.clone();
    let outcome = tokio::select! {
        _ = stop.cancelled() => return Probe::Stopped,
        answer = tokio::time::timeout(PROBE_TIMEOUT, sender.send_request(request)) => match answer {
            Ok(_) => Probe::Answered,
            Err(_) => Probe::Silent,
        },
        result = connection.as_mut() => Probe::Ended(ended(result)),
    };
    if matches!(outcome, Probe::Answered) && endpoint.state() == EndpointState::Probing {
        tracing::debug!(id = %endpoint.id, "a suspect connection answered its probe");
        endpoint.set(EndpointState::Ready, ready, None);
    }
    outcome
}

/// TCP, the HTTP/2 handshake, and the server's first frame.
async fn connect(
    host: &str,
    port: u16,
    settings: &Settings,
) -> Result<(Sender, Pin<Box<Connection>>, Arc<Activity>), String> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect to {host}:{port}: {}", describe_io(&e)))?;
    let _ = tcp.set_nodelay(true);
    let socket = tcp
        .into_std()
        .and_then(|std| Ok((std.try_clone()?, std)))
        .and_then(|(clone, std)| Ok((clone, TcpStream::from_std(std)?)));
    let (socket, tcp) = socket.map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    let io = match &settings.tls {
        None => Io::Plain(tcp),
        Some(tls) => {
            let name = tls.server_name(host)?;
            let stream = tls
                .connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(format!(
                    "TLS with {host}:{port}: the instance did not agree to HTTP/2 (ALPN h2)"
                ));
            }
            Io::Tls(Box::new(stream))
        }
    };
    let activity = Arc::new(Activity::new(Some(socket)));
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
        prefix: Some(Vec::with_capacity(16)),
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keep_alive_interval)
        .keep_alive_timeout(settings.keep_alive_timeout)
        .keep_alive_while_idle(false);
    let (sender, connection) = builder
        .handshake(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let mut connection = Box::pin(connection);
    // The server's SETTINGS frame is its first read.
    let spoke = activity.spoke.notified();
    let ended = tokio::select! {
        result = &mut connection => result,
        _ = spoke => return Ok((sender, connection, activity)),
    };
    Err(if activity.not_http2.load(Ordering::Relaxed) {
        let hint = if settings.tls.is_some() {
            ""
        } else {
            " (if the instance speaks TLS, set BalancedChannelBuilder::tls)"
        };
        format!(
            "{host}:{port} does not answer HTTP/2: its first bytes are not an HTTP/2 frame{hint}"
        )
    } else {
        // Over TLS 1.3 an instance that refuses the client's certificate says so after the
        // handshake, and our first write can meet the closed socket before that alert is
        // read ("broken pipe"): a handshake of our own that writes nothing reads it.
        let refused = match &settings.tls {
            Some(tls) => tls_refusal(host, port, tls).await,
            None => None,
        };
        match (refused, ended) {
            (Some(why), _) => format!("TLS with {host}:{port}: {why}"),
            (None, Ok(())) => "the instance closed the connection before it spoke".to_owned(),
            (None, Err(e)) => format!(
                "the connection broke before the instance spoke: {}",
                root_cause(&e)
            ),
        }
    })
}

/// Why the instance refuses a TLS connection, if it does: a handshake that sends nothing after
/// it and reads the instance's first bytes (its HTTP/2 settings, or the TLS alert that refused
/// us), within 2 s.
async fn tls_refusal(host: &str, port: u16, tls: &Tls) -> Option<String> {
    let attempt = async {
        let tcp = TcpStream::connect((host, port)).await.ok()?;
        let name = tls.server_name(host).ok()?;
        let mut stream = match tls.connector.connect(name, tcp).await {
            Ok(stream) => stream,
            Err(e) => return Some(describe_io(&e)),
        };
        let mut byte = [0u8; 1];
        match tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await {
            Ok(n) if n > 0 => None,
            Ok(_) => Some("the instance closed the connection after the TLS handshake".into()),
            Err(e) => Some(describe_io(&e)),
        }
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// The innermost cause of a connection's failure in plain words, such as "connection reset".
pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost: &(dyn std::error::Error + 'static) = error;
    let mut cause = Some(error);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && io.kind() != std::io::ErrorKind::Other
        {
            return describe_io(io);
        }
        innermost = c;
        cause = c.source();
    }
    innermost.to_string()
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        // TLS failures come as invalid data; their own words say what the peer refused.
        std::io::ErrorKind::Other | std::io::ErrorKind::InvalidData => e.to_string(),
        kind => kind.to_string(),
    }
}

/// A connection to an instance, plain or TLS.
#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A socket that counts the reads that returned bytes.
#[derive(Debug)]
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    /// The first bytes the instance sent, until there are enough to tell an HTTP/2 frame.
    prefix: Option<Vec<u8>>,
}

/// The type of an HTTP/2 SETTINGS frame: the first frame every HTTP/2 server sends.
const SETTINGS_FRAME: u8 = 0x4;

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.reads.fetch_add(1, Ordering::Relaxed);
            // The instance has spoken once its first frame header shows a SETTINGS frame; a
            // TLS alert or an HTTP/1 answer is not an HTTP/2 server speaking.
            if let Some(prefix) = self.prefix.as_mut() {
                prefix.extend_from_slice(&buf.filled()[before..]);
                if prefix.len() >= 4 {
                    if prefix[3] == SETTINGS_FRAME {
                        self.activity.spoke.notify_one();
                    } else {
                        self.activity.not_http2.store(true, Ordering::Relaxed);
                    }
                    self.prefix = None;
                }
            }
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
