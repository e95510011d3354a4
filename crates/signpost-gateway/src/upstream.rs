//! The instances behind one route target, and the connections to them.
//!
//! An [`Upstream`] follows its target with a Signpost watch (which survives the registry: it
//! keeps its view while disconnected and resumes), keeps one [`Endpoint`] per instance, and picks
//! one per attempt by the balanced channel's own rules (`signpost_client::rules`): health,
//! panic threshold, zone, power of two choices on peak-EWMA load and weights, and passive outlier
//! ejection. A watch that comes back from a reconnect with a reset that drops instances (a
//! registry restarted empty) keeps them for a grace period, as the balanced channel does.
//!
//! An endpoint keeps its own pool: idle HTTP/1.1 connections, and one HTTP/2 connection for
//! gRPC and for instances whose `protocol` metadata is `h2c`. A connection is taken before the
//! request is handed over, so a connect failure never costs the request; the endpoint is then out
//! of the pick (`down`) until a background connect to it succeeds again, long before the registry
//! notices that the instance is gone.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use signpost_client::rules::{self, Candidate, Known, Load, Outlier, Policy};
use signpost_client::{Client, Filter, Health, Instance, OutlierDetection};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::metrics::{Metrics, ServiceMetrics};
use crate::route::Target;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the gateway sends on, either way.
pub(crate) type ProxyBody = BoxBody<Bytes, BoxError>;

/// How the gateway speaks to an instance: HTTP/1.1 unless its `protocol` metadata says HTTP/2
/// with prior knowledge. gRPC always goes over HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    H2c,
}

impl Protocol {
    fn of(instance: &Instance) -> Protocol {
        match instance
            .metadata
            .get("protocol")
            .map(|p| p.to_ascii_lowercase())
        {
            Some(p) if matches!(p.as_str(), "h2c" | "h2" | "http2" | "grpc") => Protocol::H2c,
            _ => Protocol::Http1,
        }
    }
}

/// How endpoints connect and are judged; one per gateway.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) namespace: String,
    pub(crate) zone: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) policy: Policy,
    pub(crate) outlier: OutlierDetection,
    pub(crate) stale_grace: Duration,
    /// Idle HTTP/1.1 connections kept per endpoint.
    pub(crate) max_idle_per_endpoint: usize,
    pub(crate) reconnect_base: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) ewma_decay: Duration,
    pub(crate) retry_budget: crate::budget::BudgetPolicy,
}

/// A connection taken from an endpoint's pool for one attempt.
pub(crate) enum Conn {
    H1(H1),
    H2(http2::SendRequest<ProxyBody>),
}

/// An HTTP/1.1 connection to an instance with no task of its own: whoever holds it polls its
/// I/O (the request, then the answer's body as the client reads it), so a request and its
/// answer are written and read on the request's own task. A connection task would cost two
/// hand-overs between tasks a request, and as many wake-ups; hyper's client works that way.
pub(crate) struct H1 {
    pub(crate) sender: http1::SendRequest<ProxyBody>,
    /// `None` once it ended, or once an upgrade gave it a task of its own. Boxed: it is large,
    /// and the pool moves connections in and out.
    io: Option<Box<http1::Connection<TokioIo<TcpStream>, ProxyBody>>>,
}

impl std::fmt::Debug for H1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1")
            .field("driven_here", &self.io.is_some())
            .field("closed", &self.sender.is_closed())
            .finish()
    }
}

impl H1 {
    /// Reads and writes what the connection can now.
    pub(crate) fn poll_io(&mut self, cx: &mut Context<'_>) {
        if let Some(io) = &mut self.io
            && Pin::new(&mut **io).poll(cx).is_ready()
        {
            self.io = None;
        }
    }

    /// `future` (an answer on this connection, or the read of its body), with the connection
    /// driven until it is done.
    pub(crate) async fn drive<F: Future>(&mut self, future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        std::future::poll_fn(|cx| {
            self.poll_io(cx);
            future.as_mut().poll(cx)
        })
        .await
    }

    /// An upgrade (a WebSocket) takes the connection over after its answer, which only a
    /// connection with a task of its own can give.
    pub(crate) fn detach(&mut self) {
        if let Some(io) = self.io.take() {
            tokio::spawn(async move {
                let _ = io.with_upgrades().await;
            });
        }
    }

    /// Open and waiting for a request, as far as one poll can tell: an idle connection the
    /// instance closed is seen closed here, before a request is trusted to it.
    async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            self.poll_io(cx);
            Poll::Ready(())
        })
        .await;
        self.io.is_some() && self.sender.is_ready()
    }
}

/// An HTTP/1.1 connection the gateway speaks itself (module `h1`), with what it has read
/// past the last answer.
#[derive(Debug)]
pub(crate) struct Plain {
    pub(crate) tcp: TcpStream,
    pub(crate) buf: bytes::BytesMut,
}

impl Plain {
    /// Still open and quiet, as far as the kernel can tell without waiting: an idle connection
    /// the instance closed (or one it wrote to unasked) is not trusted with a request.
    fn quiet(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match self.tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            // Readiness can be left over from the last answer's read: ask the socket.
            Poll::Ready(Ok(())) => matches!(
                self.tcp.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
            Poll::Ready(Err(_)) => false,
        }
    }
}

/// One instance of an upstream.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) id: String,
    pub(crate) authority: http::uri::Authority,
    host: String,
    port: u16,
    protocol: Protocol,
    weight: AtomicU32,
    healthy: AtomicBool,
    local: AtomicBool,
    /// Connects to it fail: out of the pick until a background connect succeeds.
    down: AtomicBool,
    last_error: Mutex<Option<String>>,
    pub(crate) load: Load,
    pub(crate) outlier: Mutex<Outlier>,
    idle: Mutex<Vec<H1>>,
    plain: Mutex<Vec<Plain>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<ProxyBody>>>,
    settings: Arc<Settings>,
    stop: CancellationToken,
}

impl Endpoint {
    fn new(instance: &Instance, settings: Arc<Settings>) -> Result<Arc<Endpoint>, String> {
        let authority = instance.authority()?;
        let endpoint = Arc::new(Endpoint {
            id: instance.id.clone(),
            authority,
            host: instance.address.clone(),
            port: instance.port,
            protocol: Protocol::of(instance),
            weight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            local: AtomicBool::new(false),
            down: AtomicBool::new(false),
            last_error: Mutex::new(None),
            load: Load::new(settings.ewma_decay),
            outlier: Mutex::new(Outlier::default()),
            idle: Mutex::new(Vec::new()),
            plain: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
            settings,
            stop: CancellationToken::new(),
        });
        endpoint.update(instance);
        Ok(endpoint)
    }

    /// Same address and protocol: the pool can stay.
    fn serves(&self, instance: &Instance) -> bool {
        self.host == instance.address
            && self.port == instance.port
            && self.protocol == Protocol::of(instance)
    }

    fn update(&self, instance: &Instance) {
        self.weight.store(instance.weight, Ordering::Relaxed);
        self.healthy
            .store(instance.health != Health::Critical, Ordering::Relaxed);
        let zone = &self.settings.zone;
        self.local.store(
            !zone.is_empty() && &instance.zone == zone,
            Ordering::Relaxed,
        );
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A connection for one request: an idle one if any is still open, else a new one.
    /// `h2` asks for HTTP/2 whatever the instance's protocol (gRPC).
    pub(crate) async fn checkout(self: &Arc<Self>, h2: bool) -> Result<Conn, String> {
        if h2 || self.protocol == Protocol::H2c {
            let mut shared = self.h2.lock().await;
            if let Some(sender) = shared.as_ref().filter(|s| !s.is_closed()) {
                return Ok(Conn::H2(sender.clone()));
            }
            let sender = self.connect_h2().await.inspect_err(|e| self.failed(e))?;
            *shared = Some(sender.clone());
            return Ok(Conn::H2(sender));
        }
        // The most recently used idle connection that is still open; one the instance closed
        // while it idled is dropped here.
        loop {
            let last = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(mut h1) = last else {
                break;
            };
            if h1.ready().await {
                return Ok(Conn::H1(h1));
            }
        }
        let h1 = self.connect_h1().await.inspect_err(|e| self.failed(e))?;
        Ok(Conn::H1(h1))
    }

    /// Whether the instance speaks HTTP/1.1 (its `protocol` metadata names no HTTP/2).
    pub(crate) fn is_http1(&self) -> bool {
        self.protocol == Protocol::Http1
    }

    /// A connection for the gateway's own HTTP/1.1 path: an idle one still open, else a new
    /// one. A connect failure takes the endpoint out of the pick, as for [`Self::checkout`].
    pub(crate) async fn checkout_plain(self: &Arc<Self>) -> Result<Plain, String> {
        loop {
            let last = self.plain.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(plain) = last else {
                break;
            };
            if plain.quiet() {
                return Ok(plain);
            }
        }
        let tcp = self.tcp().await.inspect_err(|e| self.failed(e))?;
        Ok(Plain {
            tcp,
            buf: bytes::BytesMut::with_capacity(8 * 1024),
        })
    }

    /// A connection whose answer was read to its end, and that may carry another.
    pub(crate) fn checkin_plain(&self, plain: Plain) {
        let mut idle = self.plain.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.settings.max_idle_per_endpoint {
            idle.push(plain);
        }
    }

    /// An HTTP/1.1 connection whose answer was read to its end goes back to the pool, unless
    /// it closed or the pool is full.
    pub(crate) fn checkin(&self, h1: H1) {
        if h1.io.is_none() || h1.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.settings.max_idle_per_endpoint {
            idle.push(h1);
        }
    }

    async fn tcp(&self) -> Result<TcpStream, String> {
        let (host, port) = (self.host.as_str(), self.port);
        let tcp = tokio::time::timeout(
            self.settings.connect_timeout,
            TcpStream::connect((host, port)),
        )
        .await
        .map_err(|_| {
            format!(
                "connect to {} timed out after {:?}",
                self.authority, self.settings.connect_timeout
            )
        })?
        .map_err(|e| format!("connect to {}: {}", self.authority, e.kind()))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn connect_h1(&self) -> Result<H1, String> {
        let tcp = self.tcp().await?;
        let (sender, io) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/1.1 with {}: {e}", self.authority))?;
        Ok(H1 {
            sender,
            io: Some(Box::new(io)),
        })
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<ProxyBody>, String> {
        let tcp = self.tcp().await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20);
        let handshake = builder.handshake(TokioIo::new(tcp));
        let (sender, connection) = tokio::time::timeout(self.settings.connect_timeout, handshake)
            .await
            .map_err(|_| format!("HTTP/2 handshake with {} timed out", self.authority))?
            .map_err(|e| format!("HTTP/2 with {}: {e}", self.authority))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// A connect failed: out of the pick, and a task tries again with backoff until a connect
    /// succeeds or the endpoint is gone.
    fn failed(self: &Arc<Self>, error: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_owned());
        if self.down.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!(id = %self.id, authority = %self.authority, %error, "endpoint out of the pick until it accepts connections again");
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        let mut backoff = signpost_backoff::Backoff::new(
            self.settings.reconnect_base,
            self.settings.reconnect_max,
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                let Some(endpoint) = weak.upgrade() else {
                    return;
                };
                match endpoint.tcp().await {
                    Ok(_) => {
                        tracing::info!(id = %endpoint.id, authority = %endpoint.authority, "endpoint accepts connections again");
                        endpoint.down.store(false, Ordering::Release);
                        return;
                    }
                    Err(e) => {
                        *endpoint
                            .last_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                }
            }
        });
    }

    fn stop(&self) {
        self.stop.cancel();
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.plain.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Where an upstream's view stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ViewState {
    /// The registry has not answered the watch yet.
    Waiting,
    Synced,
    /// The registry refused the watch (a bad selector, a token that may not read).
    Refused(String),
}

/// The balancer of one target.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) target: Target,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    /// Instances the view holds, critical ones included: 0 means the service has none.
    registered: AtomicU64,
    sync: watch::Sender<ViewState>,
    settings: Arc<Settings>,
    pub(crate) budget: Budget,
    /// Made on the first request that finds instances: a name that is not a service gets
    /// no metrics of its own.
    metrics: std::sync::OnceLock<ServiceMetrics>,
    /// Milliseconds since the gateway started, at the last request.
    last_used: AtomicU64,
    stop: CancellationToken,
}

impl Upstream {
    fn start(
        target: Target,
        client: &Client,
        settings: Arc<Settings>,
        epoch: Instant,
    ) -> Arc<Self> {
        let upstream = Arc::new(Upstream {
            target: target.clone(),
            endpoints: RwLock::new(Arc::new(Vec::new())),
            registered: AtomicU64::new(0),
            sync: watch::channel(ViewState::Waiting).0,
            budget: Budget::new(settings.retry_budget),
            settings,
            metrics: std::sync::OnceLock::new(),
            last_used: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        upstream.touch(epoch);
        let mut filter = Filter::service(target.service)
            .namespace(upstream.settings.namespace.clone())
            .include_unhealthy(true);
        if let Some(tag) = target.tag {
            filter = filter.tag(tag);
        }
        if let Some(selector) = target.selector {
            filter = filter.selector(selector);
        }
        tokio::spawn(follow(
            Arc::downgrade(&upstream),
            client.clone(),
            filter,
            upstream.stop.clone(),
        ));
        upstream
    }

    fn touch(&self, epoch: Instant) {
        self.last_used
            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self, epoch: Instant) -> Duration {
        let now = epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_used.load(Ordering::Relaxed)))
    }

    pub(crate) fn metrics(&self, metrics: &Metrics) -> &ServiceMetrics {
        self.metrics
            .get_or_init(|| metrics.for_service(&self.target.service))
    }

    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn registered(&self) -> u64 {
        self.registered.load(Ordering::Relaxed)
    }

    /// Waits, up to `wait`, for the registry's first answer.
    pub(crate) async fn synced(&self, wait: Duration) -> ViewState {
        if *self.sync.borrow() == ViewState::Synced {
            return ViewState::Synced;
        }
        let mut sync = self.sync.subscribe();
        let reached = tokio::time::timeout(wait, sync.wait_for(|s| *s != ViewState::Waiting)).await;
        match reached {
            Ok(Ok(state)) => state.clone(),
            _ => self.sync.borrow().clone(),
        }
    }

    /// An endpoint for an attempt, by the balanced channel's rules, among those that are up,
    /// not critical and not in `tried`.
    pub(crate) fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        let snapshot = self.snapshot();
        let now = Instant::now();
        let mut known = Known::default();
        let mut endpoints = Vec::with_capacity(snapshot.len());
        let mut candidates = Vec::with_capacity(snapshot.len());
        for e in snapshot.iter() {
            // The registry's critical instances are not candidates at all: the gateway answers
            // 503 rather than send to an instance its checks fail. What is judged here is
            // outlier detection's, which the panic threshold may overrule.
            if !e.is_healthy() {
                continue;
            }
            let local = e.local.load(Ordering::Relaxed);
            known.all += 1;
            known.local += usize::from(local);
            if e.is_down() || tried.iter().any(|t| Arc::ptr_eq(t, e)) {
                continue;
            }
            candidates.push(Candidate {
                weight: e.weight.load(Ordering::Relaxed),
                local,
                healthy: true,
                ejected: e
                    .outlier
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_ejected(now),
            });
            endpoints.push(e);
        }
        let cost = |i: usize| endpoints[i].load.cost(now);
        let picked = rules::pick(
            &candidates,
            known,
            &self.settings.policy,
            cost,
            &mut fastrand::f64,
        )?;
        Some(endpoints[picked.index].clone())
    }

    /// Records an answer (or a failure to get one) from `endpoint`, and counts an ejection.
    pub(crate) fn record(&self, endpoint: &Endpoint, failed: bool) {
        // The metrics exist once a request has been counted, which is before any answer.
        if self.judge(endpoint, failed)
            && let Some(metrics) = self.metrics.get()
        {
            metrics.ejections.inc();
        }
    }

    /// Records an answer (or a failure to get one) from `endpoint`; true when it ejected it.
    fn judge(&self, endpoint: &Endpoint, failed: bool) -> bool {
        let now = Instant::now();
        let snapshot = self.snapshot();
        let all = snapshot.iter().map(|e| &e.outlier);
        match rules::record(&self.settings.outlier, &endpoint.outlier, all, failed, now) {
            Some(until) => {
                tracing::warn!(service = %self.target, id = %endpoint.id, ejected_for = ?(until - now), "endpoint ejected: its requests keep failing");
                true
            }
            None => false,
        }
    }

    /// Why no endpoint can take a request, in words for its answer.
    pub(crate) fn why_none(&self) -> String {
        let snapshot = self.snapshot();
        let critical = snapshot.iter().filter(|e| !e.is_healthy()).count();
        if snapshot.is_empty() {
            return "no instance is registered".to_owned();
        }
        if critical == snapshot.len() {
            return format!(
                "{} registered, every one failing its health check",
                snapshot.len()
            );
        }
        let error = snapshot
            .iter()
            .find_map(|e| e.last_error())
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default();
        format!("{} registered, none reachable{error}", snapshot.len())
    }

    fn set_endpoints(&self, endpoints: Vec<Arc<Endpoint>>, registered: usize) {
        *self.endpoints.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(endpoints);
        self.registered.store(registered as u64, Ordering::Relaxed);
        self.sync.send_if_modified(|s| {
            let was = std::mem::replace(s, ViewState::Synced);
            was != ViewState::Synced
        });
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
        for e in self.snapshot().iter() {
            e.stop();
        }
    }
}

/// Follows the target's watch into the upstream's endpoint set, until the upstream is gone.
async fn follow(upstream: Weak<Upstream>, client: Client, filter: Filter, stop: CancellationToken) {
    let (mut stream, stats) = client.watch_with_stats(filter);
    let mut view: BTreeMap<String, Instance> = BTreeMap::new();
    let mut endpoints: HashMap<String, Arc<Endpoint>> = HashMap::new();
    // Instances a reset after a reconnect no longer lists, and until when they stay.
    let mut stale: HashMap<String, Instant> = HashMap::new();
    let mut reconnects_seen = 0;
    loop {
        let next_stale = stale.values().min().copied();
        let update = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next_stale.unwrap_or_else(Instant::now)), if next_stale.is_some() => None,
            update = stream.next() => match update {
                Some(update) => Some(update),
                None => return,
            },
        };
        let Some(upstream) = upstream.upgrade() else {
            return;
        };
        let settings = upstream.settings.clone();
        match update {
            None => {
                let now = Instant::now();
                stale.retain(|id, until| {
                    if *until > now {
                        return true;
                    }
                    tracing::info!(service = %upstream.target, %id, "stale instance did not come back; removed");
                    if let Some(e) = endpoints.remove(id) {
                        e.stop();
                    }
                    false
                });
            }
            Some(Err(error)) => {
                tracing::error!(service = %upstream.target, %error, "the registry refused the gateway's watch; keeping the last endpoints");
                upstream
                    .sync
                    .send_replace(ViewState::Refused(error.to_string()));
                return;
            }
            Some(Ok(update)) => {
                let reconnects = stats.reconnects.load(Ordering::Relaxed);
                let after_reconnect =
                    std::mem::replace(&mut reconnects_seen, reconnects) != reconnects;
                if update.reset {
                    view = update
                        .events
                        .iter()
                        .map(|e| (e.instance().id.clone(), e.instance().clone()))
                        .collect();
                    let gone: Vec<String> = endpoints
                        .keys()
                        .filter(|id| !view.contains_key(*id))
                        .cloned()
                        .collect();
                    for id in gone {
                        if !after_reconnect {
                            stale.remove(&id);
                            if let Some(e) = endpoints.remove(&id) {
                                e.stop();
                            }
                        } else if let std::collections::hash_map::Entry::Vacant(entry) =
                            stale.entry(id)
                        {
                            tracing::info!(service = %upstream.target, id = %entry.key(), grace = ?settings.stale_grace, "instance missing from the registry's view after a reconnect; kept for the grace period");
                            entry.insert(
                                Instant::now()
                                    .checked_add(settings.stale_grace)
                                    .unwrap_or_else(|| {
                                        Instant::now() + Duration::from_secs(365 * 24 * 3600)
                                    }),
                            );
                        }
                    }
                } else {
                    for event in &update.events {
                        let instance = event.instance();
                        if let signpost_client::Event::Removed(..) = event {
                            view.remove(&instance.id);
                            stale.remove(&instance.id);
                            if let Some(e) = endpoints.remove(&instance.id) {
                                e.stop();
                            }
                        } else {
                            view.insert(instance.id.clone(), instance.clone());
                        }
                    }
                }
                for instance in view.values() {
                    stale.remove(&instance.id);
                    if let Some(e) = endpoints.get(&instance.id) {
                        if e.serves(instance) {
                            e.update(instance);
                            continue;
                        }
                        e.stop();
                    }
                    match Endpoint::new(instance, settings.clone()) {
                        Ok(e) => {
                            endpoints.insert(instance.id.clone(), e);
                        }
                        Err(error) => {
                            endpoints.remove(&instance.id);
                            tracing::warn!(service = %upstream.target, id = %instance.id, %error, "instance address is not usable; skipped");
                        }
                    }
                }
            }
        }
        let registered = endpoints.len();
        upstream.set_endpoints(endpoints.values().cloned().collect(), registered);
    }
}

/// Why the gateway cannot follow one more target.
#[derive(Debug)]
pub(crate) struct TooMany(pub(crate) usize);

/// Every target the gateway follows, made on a target's first request and dropped once unused.
#[derive(Debug)]
pub(crate) struct Upstreams {
    client: Client,
    settings: Arc<Settings>,
    map: Mutex<HashMap<Target, Arc<Upstream>>>,
    max: usize,
    epoch: Instant,
}

/// A target with no instance stops being followed after this long without a request, so
/// that requests for names that are not services cost no lasting watch.
const EMPTY_IDLE: Duration = Duration::from_secs(10);
/// Any target stops being followed after this long without a request.
const IDLE: Duration = Duration::from_secs(600);

impl Upstreams {
    pub(crate) fn new(client: Client, settings: Settings, max: usize) -> Arc<Upstreams> {
        let upstreams = Arc::new(Upstreams {
            client,
            settings: Arc::new(settings),
            map: Mutex::new(HashMap::new()),
            max: max.max(1),
            epoch: Instant::now(),
        });
        let weak = Arc::downgrade(&upstreams);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(upstreams) = weak.upgrade() else {
                    return;
                };
                upstreams.sweep();
            }
        });
        upstreams
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Arc<Upstream>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sweep(&self) {
        let epoch = self.epoch;
        self.lock().retain(|_, u| {
            let idle = u.idle_for(epoch);
            !(idle >= IDLE || (idle >= EMPTY_IDLE && u.registered() == 0))
        });
    }

    /// The upstream of `target`, started on first use.
    pub(crate) fn get(&self, target: &Target) -> Result<Arc<Upstream>, TooMany> {
        let mut map = self.lock();
        if let Some(u) = map.get(target) {
            u.touch(self.epoch);
            return Ok(u.clone());
        }
        if map.len() >= self.max {
            // Make room by the target unused the longest, if it has no instance.
            let epoch = self.epoch;
            let victim = map
                .iter()
                .filter(|(_, u)| u.registered() == 0 && u.idle_for(epoch) >= Duration::from_secs(1))
                .max_by_key(|(_, u)| u.idle_for(epoch))
                .map(|(t, _)| t.clone());
            match victim {
                Some(t) => {
                    map.remove(&t);
                }
                None => return Err(TooMany(self.max)),
            }
        }
        let upstream = Upstream::start(
            target.clone(),
            &self.client,
            self.settings.clone(),
            self.epoch,
        );
        map.insert(target.clone(), upstream.clone());
        Ok(upstream)
    }
}
