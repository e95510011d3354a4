//! A balanced channel: Signpost's own load balancer over the live instances of a service, fed
//! by a watch, usable as the transport of any tonic-generated client.
//!
//! How it fits: the builder starts one task (`feed`) that follows the watch and keeps one
//! [`Endpoint`](crate::endpoint) per instance — each with its own HTTP/2 connection and state —
//! in the set the call path (`channel.rs`) picks from (`pick.rs`). While the registry is
//! unreachable the last known endpoints stay, so calls keep flowing; and when the watch comes
//! back with a reset that drops instances (a registry restarted empty), those instances stay
//! for a grace period as *stale*, so that a registry that lost its state does not take every
//! endpoint away at once while the instances register again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::channel::{BoxError, CallFuture, ChannelStats, ResponseBody, Shared};
use crate::client::Client;
use crate::endpoint::{Body, Endpoint, Settings};
use crate::outlier::OutlierDetection;
use crate::pick::Policy;
use crate::tls::{InstanceTls, Tls};
use crate::types::{Health, Instance};
use crate::watcher::{View, WatchCounts, WatchStats, Watcher};
use crate::{Error, Filter, Result};

/// Builds a [`BalancedChannel`]; from [`Client::balanced`]. Every default is named on its
/// setter.
#[derive(Debug, Clone)]
pub struct BalancedChannelBuilder {
    client: Client,
    filter: Filter,
    zone: String,
    connect_timeout: Duration,
    keep_alive_interval: Option<Duration>,
    keep_alive_timeout: Duration,
    max_attempts: u32,
    wait_timeout: Duration,
    unresponsive_after: Duration,
    outlier: OutlierDetection,
    panic_threshold: f64,
    zone_min_share: f64,
    stale_grace: Duration,
    tls: Option<Tls>,
}

impl BalancedChannelBuilder {
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.filter = self.filter.tag(tag);
        self
    }

    pub fn selector(mut self, selector: impl Into<String>) -> Self {
        self.filter = self.filter.selector(selector);
        self
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.filter = self.filter.namespace(namespace);
        self
    }

    /// The caller's zone: calls stay with the instances of this zone while at least
    /// [`zone_min_share`](Self::zone_min_share) of them are up, and spill over to every zone
    /// when fewer are. Default: none (no preference).
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }

    /// The share of the zone's instances that must be up to keep calls in the zone.
    /// Default 0.5.
    pub fn zone_min_share(mut self, share: f64) -> Self {
        self.zone_min_share = share.clamp(0.0, 1.0);
        self
    }

    /// How long connecting to an instance may take, up to its first HTTP/2 frame. Default 3 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// HTTP/2 PINGs on a connection with calls in flight and nothing read for `interval`; no
    /// answer within `timeout` closes it. Default off, as in gRPC's and tonic's clients: calls
    /// keep their deadlines, and a call given up on with nothing read gets its connection probed
    /// (see [`unresponsive_after`](Self::unresponsive_after)). PINGs cost about 1.5 % of
    /// throughput on one core (hyper notes every frame for them), and servers limit how often
    /// they accept them (grpc-go's default: once per 5 minutes without data).
    pub fn keep_alive(mut self, interval: Option<Duration>, timeout: Duration) -> Self {
        self.keep_alive_interval = interval;
        self.keep_alive_timeout = timeout;
        self
    }

    /// Attempts a call may take when the instances it was sent to were gone before it left.
    /// Default 3. A call that may have reached an instance is never sent again.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// How long a call waits for an instance while none is connected yet (the first view, or
    /// a connection in progress); the call's own deadline shortens it. Default 5 s. A call
    /// fails at once with UNAVAILABLE when no instance is registered or every one is failing.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// A call given up on after this long with nothing at all read from its connection
    /// meanwhile (a stopped or hung process) takes the connection down, and with it the
    /// endpoint until a new connection is answered. Default 1 s.
    pub fn unresponsive_after(mut self, after: Duration) -> Self {
        self.unresponsive_after = after;
        self
    }

    /// Passive outlier detection; see [`OutlierDetection`] for the defaults.
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.outlier = outlier;
        self
    }

    /// When fewer than this share of the known instances are healthy (by the registry's health
    /// checks and outlier detection), spread calls over every connected instance instead of
    /// overloading the few left. Default 0.5, as Envoy's panic threshold; 0 turns it off.
    pub fn panic_threshold(mut self, threshold: f64) -> Self {
        self.panic_threshold = threshold.clamp(0.0, 1.0);
        self
    }

    /// How long instances that a reset after a reconnect no longer lists stay in the pick
    /// (a registry that restarted empty is waiting for its instances to register again).
    /// Default 15 s; an instance that registers again meanwhile keeps its connection.
    pub fn stale_grace(mut self, grace: Duration) -> Self {
        self.stale_grace = grace;
        self
    }

    /// Speaks TLS to every instance (HTTP/2 over TLS, as gRPC servers with TLS expect). Fails
    /// when the certificates or the name cannot be used.
    pub fn tls(mut self, tls: InstanceTls) -> Result<Self> {
        self.tls = Some(tls.connector()?);
        Ok(self)
    }

    /// Starts the watch behind the channel. Must be called inside a Tokio runtime.
    pub fn build(self) -> BalancedChannel {
        let shared = Arc::new(Shared::new(
            self.filter.service_name().to_owned(),
            Policy {
                panic_threshold: self.panic_threshold,
                zone_min_share: self.zone_min_share,
            },
            self.outlier,
            self.max_attempts,
            self.wait_timeout,
            self.unresponsive_after,
        ));
        let (base, max) = self.client.conn.backoff;
        let settings = Arc::new(Settings {
            connect_timeout: self.connect_timeout,
            keep_alive_interval: self.keep_alive_interval,
            keep_alive_timeout: self.keep_alive_timeout,
            reconnect_base: base,
            reconnect_max: max,
            ewma_decay: crate::load::DECAY,
            tls: self.tls,
        });
        let (view_tx, view_rx) = watch::channel(Arc::new(View::default()));
        let view_rx = Arc::new(view_rx);
        self.client.publish_view(&self.filter, &view_rx);
        // The balancer sees critical instances too, for its panic threshold; what the channel
        // reports and `discover` answers stays the caller's filter.
        let wants_unhealthy = self.filter.includes_unhealthy();
        let watcher = Watcher::new(
            self.client.conn.clone(),
            self.filter.clone().include_unhealthy(true),
        );
        let watch_stats = watcher.stats.clone();
        let (error_tx, error) = watch::channel(None);
        let stop = CancellationToken::new();
        tokio::spawn(
            Feed {
                shared: shared.clone(),
                settings,
                zone: self.zone,
                stale_grace: self.stale_grace,
                wants_unhealthy,
                endpoints: HashMap::new(),
                stale: HashMap::new(),
                reconnects_seen: 0,
            }
            .run(watcher, view_tx, error_tx, stop.clone()),
        );
        BalancedChannel {
            shared,
            _owner: Arc::new(Owner(stop)),
            view: view_rx,
            watch_stats,
            error,
            filter: self.filter,
        }
    }
}

/// Stops the feed when the last clone of the channel is gone.
#[derive(Debug)]
struct Owner(CancellationToken);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A load-balanced channel over the live instances of a service, and the transport of any
/// generated client: `GreeterClient::new(channel.clone())`. Clone it freely: clones share one
/// set of connections, and the watch behind them ends with the last clone.
///
/// A call goes to an instance whose connection is up (never to one whose connection failed or
/// is still being made), picked by power of two choices on a peak-EWMA latency estimate times
/// the calls in flight, drawn in proportion to instance weights and kept in the caller's zone
/// when one is set. A call whose instance was gone before the call left is sent to another
/// (up to 3 attempts); an instance that keeps answering UNAVAILABLE is ejected for a while.
#[derive(Debug, Clone)]
pub struct BalancedChannel {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
    view: Arc<watch::Receiver<Arc<View>>>,
    watch_stats: Arc<WatchStats>,
    error: watch::Receiver<Option<Error>>,
    filter: Filter,
}

impl BalancedChannel {
    /// The channel itself, for code that builds generated clients with
    /// `GreeterClient::new(balanced.channel())`.
    pub fn channel(&self) -> BalancedChannel {
        self.clone()
    }

    /// The instances of the registry's current view (the caller's filter), sorted by id.
    pub fn instances(&self) -> Vec<Instance> {
        self.view.borrow().instances.values().cloned().collect()
    }

    /// What the watch behind the channel has been through.
    pub fn watch_counts(&self) -> WatchCounts {
        self.watch_stats.counts()
    }

    /// Calls, retries, ejections, and where each endpoint stands.
    pub fn stats(&self) -> ChannelStats {
        self.shared.stats()
    }

    /// Waits until at least one instance is connected and can take calls, or `timeout` passes.
    pub async fn wait_for_ready(&self, timeout: Duration) -> Result<()> {
        let mut changes = self.shared.changed.subscribe();
        let mut error = self.error.clone();
        let wait = async {
            loop {
                changes.borrow_and_update();
                if self.shared.any_ready() {
                    return Ok(());
                }
                if let Some(e) = error.borrow_and_update().clone() {
                    return Err(e);
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return Err(Error::Stopped) },
                    changed = error.changed() => if changed.is_err() { return Err(Error::Stopped) },
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(Error::NoInstance(format!(
                "no instance of {} became available within {timeout:?}: {}",
                self.filter.service_name(),
                self.shared.why_none(None)
            ))),
        }
    }
}

impl tower_service::Service<http::Request<Body>> for BalancedChannel {
    type Response = http::Response<ResponseBody>;
    type Error = BoxError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        // Calls wait for an instance inside the call, bounded by the wait timeout and the
        // call's deadline; readiness here would make every caller wait for all of them.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.shared.clone().call(request))
    }
}

impl Client {
    /// A builder for a balanced channel over `service`'s healthy instances.
    pub fn balanced(&self, service: impl Into<String>) -> BalancedChannelBuilder {
        BalancedChannelBuilder {
            client: self.clone(),
            filter: Filter::service(service),
            zone: String::new(),
            connect_timeout: Duration::from_secs(3),
            keep_alive_interval: None,
            keep_alive_timeout: Duration::from_secs(10),
            max_attempts: 3,
            wait_timeout: Duration::from_secs(5),
            unresponsive_after: Duration::from_secs(1),
            outlier: OutlierDetection::default(),
            panic_threshold: 0.5,
            zone_min_share: 0.5,
            stale_grace: Duration::from_secs(15),
            tls: None,
        }
    }

    /// A balanced channel over `service`'s healthy instances, with default settings.
    pub fn channel(&self, service: impl Into<String>) -> BalancedChannel {
        self.balanced(service).build()
    }
}

/// The task that follows the watch and keeps the endpoint set in line with it.
struct Feed {
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    zone: String,
    stale_grace: Duration,
    wants_unhealthy: bool,
    endpoints: HashMap<String, Arc<Endpoint>>,
    /// Endpoints the registry's view dropped in a reset after a reconnect, until when they stay.
    stale: HashMap<String, Instant>,
    reconnects_seen: u64,
}

impl Feed {
    async fn run(
        mut self,
        mut watcher: Watcher,
        view: watch::Sender<Arc<View>>,
        error: watch::Sender<Option<Error>>,
        stop: CancellationToken,
    ) {
        loop {
            let next_stale = self.stale.values().min().copied();
            let update = tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(next_stale.unwrap_or_else(Instant::now)), if next_stale.is_some() => {
                    self.expire_stale();
                    self.publish();
                    continue;
                }
                update = watcher.next() => update,
            };
            let update = match update {
                Ok(update) => update,
                Err(e) => {
                    tracing::error!(service = %self.shared.service, error = %e, "the registry refused this channel's watch; keeping the last endpoints");
                    self.shared.set_refused(e.to_string());
                    let _ = error.send(Some(e));
                    stop.cancelled().await;
                    break;
                }
            };
            let reconnects = watcher.stats.reconnects.load(Ordering::Relaxed);
            let after_reconnect =
                std::mem::replace(&mut self.reconnects_seen, reconnects) != reconnects;
            if update.reset {
                self.reset(&watcher.view, after_reconnect);
            } else {
                for event in &update.events {
                    let id = &event.instance().id;
                    match watcher.view.instances.get(id) {
                        Some(instance) => self.upsert(instance),
                        None => self.remove(id),
                    }
                }
            }
            self.publish();
            // Published after the balancer has the change, so a caller that sees an instance
            // gone from `instances()` knows no new call will be sent to it.
            let _ = view.send(Arc::new(self.visible(&watcher.view)));
        }
        for endpoint in self.endpoints.values() {
            endpoint.stop();
        }
    }

    fn reset(&mut self, view: &View, after_reconnect: bool) {
        let gone: Vec<String> = self
            .endpoints
            .keys()
            .filter(|id| !view.instances.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if after_reconnect && !self.stale.contains_key(&id) {
                tracing::info!(service = %self.shared.service, %id, grace = ?self.stale_grace, "instance missing from the registry's view after a reconnect; kept for the grace period");
                if let Some(endpoint) = self.endpoints.get(&id) {
                    endpoint.stale.store(true, Ordering::Relaxed);
                }
                let now = Instant::now();
                let until = now
                    .checked_add(self.stale_grace)
                    .unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600));
                self.stale.insert(id, until);
            } else if !after_reconnect {
                self.remove(&id);
            }
        }
        for instance in view.instances.values() {
            self.upsert(instance);
        }
    }

    fn upsert(&mut self, instance: &Instance) {
        self.stale.remove(&instance.id);
        if let Some(endpoint) = self.endpoints.get(&instance.id) {
            if endpoint.serves(instance) {
                endpoint.update(instance, &self.zone);
                return;
            }
            // Moved to another address: a new connection; the old one finishes its calls.
            endpoint.stop();
        }
        match Endpoint::start(
            instance,
            &self.zone,
            self.settings.clone(),
            self.shared.changed.clone(),
        ) {
            Ok(endpoint) => {
                self.endpoints.insert(instance.id.clone(), endpoint);
            }
            Err(error) => {
                self.endpoints.remove(&instance.id);
                tracing::warn!(service = %self.shared.service, id = %instance.id, %error, "instance address is not usable; skipped");
            }
        }
    }

    fn remove(&mut self, id: &str) {
        self.stale.remove(id);
        if let Some(endpoint) = self.endpoints.remove(id) {
            endpoint.stop();
        }
    }

    fn expire_stale(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .stale
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            tracing::info!(service = %self.shared.service, %id, "stale instance did not come back; removed");
            self.remove(&id);
        }
    }

    fn publish(&self) {
        self.shared
            .set_endpoints(self.endpoints.values().cloned().collect());
    }

    /// The view as the caller's filter sees it.
    fn visible(&self, view: &View) -> View {
        let mut visible = view.clone();
        if !self.wants_unhealthy {
            visible
                .instances
                .retain(|_, i| i.health != Health::Critical);
        }
        visible
    }
}
