//! Prometheus metrics: RPC counts and latencies by method and code, watch streams and what they
//! sent, store sizes and write latency. Served as Prometheus text at `/metrics` by
//! [`serve_metrics`].
//!
//! `prometheus-client` is the registry (the Prometheus project's own Rust client, no global
//! state); the endpoint is a few lines of hyper, which tonic already brings.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use signpost_store::Store;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~3 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The server's metrics. Cheap to share; recording is lock-free.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    store_writes: Family<OpLabels, Histogram, fn() -> Histogram>,
    watch_streams: Gauge,
    watch_events: Counter,
    watch_resets_slow: Counter,
    xds_streams: Gauge,
    live_views: Gauge,
    xds_responses: Family<KindLabels, Counter>,
    xds_nacks: Family<KindLabels, Counter>,
    dns_queries: Family<ResultLabels, Counter>,
    instances: Gauge,
    services: Gauge,
    leases: Gauge,
    revision: Gauge,
    leases_expired: Counter,
    leases_expired_seen: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("signpost");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "gRPC calls by method and status code",
            rpc_requests.clone(),
        );
        let rpc_duration = Family::<RpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency by method and status code (streams: time to open)",
            rpc_duration.clone(),
        );
        let store_writes = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "store_write_duration_seconds",
            "store mutation latency, commit included, by operation",
            store_writes.clone(),
        );
        let watch_streams = Gauge::default();
        registry.register("watch_streams", "open Watch streams", watch_streams.clone());
        let watch_events = Counter::default();
        registry.register(
            "watch_events",
            "events sent on Watch streams",
            watch_events.clone(),
        );
        let watch_resets_slow = Counter::default();
        registry.register(
            "watch_slow_resets",
            "resets sent to watchers that fell behind",
            watch_resets_slow.clone(),
        );
        let xds_streams = Gauge::default();
        registry.register("xds_streams", "open xDS (ADS) streams", xds_streams.clone());
        let live_views = Gauge::default();
        registry.register(
            "live_views",
            "services whose live view the server follows (for xDS clients)",
            live_views.clone(),
        );
        let xds_responses = Family::<KindLabels, Counter>::default();
        registry.register(
            "xds_responses",
            "xDS responses sent, by resource kind",
            xds_responses.clone(),
        );
        let xds_nacks = Family::<KindLabels, Counter>::default();
        registry.register(
            "xds_nacks",
            "xDS responses a client rejected, by resource kind (the server log says why)",
            xds_nacks.clone(),
        );
        let dns_queries = Family::<ResultLabels, Counter>::default();
        registry.register(
            "dns_queries",
            "DNS queries answered, by result (answer, truncated, nodata, nxdomain, refused, \
             servfail, formerr, badvers, notimp)",
            dns_queries.clone(),
        );
        let instances = Gauge::default();
        registry.register("instances", "registered instances", instances.clone());
        let services = Gauge::default();
        registry.register(
            "services",
            "services with at least one instance",
            services.clone(),
        );
        let leases = Gauge::default();
        registry.register("leases", "live leases", leases.clone());
        let revision = Gauge::default();
        registry.register("revision", "the store's current revision", revision.clone());
        let leases_expired = Counter::default();
        registry.register(
            "lease_expiries",
            "leases that ran out",
            leases_expired.clone(),
        );
        Metrics {
            registry,
            rpc_requests,
            rpc_duration,
            store_writes,
            watch_streams,
            watch_events,
            watch_resets_slow,
            xds_streams,
            live_views,
            xds_responses,
            xds_nacks,
            dns_queries,
            instances,
            services,
            leases,
            revision,
            leases_expired,
            leases_expired_seen: AtomicU64::new(0),
        }
    }

    pub(crate) fn rpc(&self, method: &'static str, code: tonic::Code, started: Instant) {
        let labels = RpcLabels {
            method,
            code: code_name(code),
        };
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    pub(crate) fn store_write(&self, op: &'static str, started: Instant) {
        self.store_writes
            .get_or_create(&OpLabels { op })
            .observe(started.elapsed().as_secs_f64());
    }

    pub(crate) fn watch_opened(&self) {
        self.watch_streams.inc();
    }

    pub(crate) fn watch_closed(&self) {
        self.watch_streams.dec();
    }

    pub(crate) fn events_sent(&self, n: usize) {
        self.watch_events.inc_by(n as u64);
    }

    pub(crate) fn slow_reset(&self) {
        self.watch_resets_slow.inc();
    }

    pub(crate) fn xds_opened(&self) {
        self.xds_streams.inc();
    }

    pub(crate) fn xds_closed(&self) {
        self.xds_streams.dec();
    }

    pub(crate) fn live_views(&self, followed: usize) {
        self.live_views.set(to_i64(followed as u64));
    }

    pub(crate) fn xds_response(&self, kind: &'static str) {
        self.xds_responses.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn dns_query(&self, result: &'static str) {
        self.dns_queries
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub(crate) fn xds_nack(&self, kind: &'static str) {
        self.xds_nacks.get_or_create(&KindLabels { kind }).inc();
    }

    /// Reads the store's sizes and renders everything as Prometheus text.
    pub fn render(&self, store: &dyn Store) -> String {
        if let Ok(counts) = store.usage("", "") {
            self.instances.set(to_i64(counts.instances));
            self.services.set(to_i64(counts.services));
            self.leases.set(to_i64(counts.leases));
            self.revision.set(to_i64(counts.revision));
            let before = self
                .leases_expired_seen
                .swap(counts.leases_expired, Ordering::Relaxed);
            self.leases_expired
                .inc_by(counts.leases_expired.saturating_sub(before));
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener cannot accept");
                    continue;
                }
            },
        };
        let (metrics, store) = (metrics.clone(), store.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let (metrics, store) = (metrics.clone(), store.clone());
                    async move {
                        let response = if request.uri().path() == "/metrics" {
                            hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(metrics.render(&*store))))
                        } else {
                            hyper::Response::builder()
                                .status(hyper::StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
                        };
                        Ok::<_, Infallible>(
                            response
                                .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new()))),
                        )
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
