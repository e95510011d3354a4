//! The gateway's Prometheus metrics, by service: requests by status code, latency to the
//! answer's head, connect errors to instances, retries and ejections; and the client connections
//! open. Served as Prometheus text at `/metrics` on `--metrics-listen`.
//!
//! A request for a name that is not a service counts under `service="-"`, so that requests
//! for made-up names cannot grow the metrics without bound.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    service: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

/// The gateway's metrics; recording is lock-free past the first use of a label.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<CodeLabels, Counter>,
    duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    connect_errors: Family<ServiceLabels, Counter>,
    retries: Family<ServiceLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    pub(crate) connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("signpost_gateway");
        let requests = Family::<CodeLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by service and the status code answered",
            requests.clone(),
        );
        let duration = Family::<ServiceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its answer's head, by service",
            duration.clone(),
        );
        let connect_errors = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "upstream_connect_errors",
            "Connections to instances that could not be made",
            connect_errors.clone(),
        );
        let retries = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "retries",
            "Requests sent again to another instance",
            retries.clone(),
        );
        let ejections = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "ejections",
            "Instances taken out of the pick by outlier detection",
            ejections.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Client connections open",
            connections.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            connect_errors,
            retries,
            ejections,
            connections,
        }
    }

    fn service(service: &str) -> ServiceLabels {
        ServiceLabels {
            service: service.to_owned(),
        }
    }

    pub(crate) fn answered(&self, service: &str, code: u16, took: Duration) {
        self.requests
            .get_or_create(&CodeLabels {
                service: service.to_owned(),
                code,
            })
            .inc();
        self.duration
            .get_or_create(&Self::service(service))
            .observe(took.as_secs_f64());
    }

    /// One service's handles, so that a request costs no label lookup.
    pub(crate) fn for_service(&self, service: &str) -> ServiceMetrics {
        let labels = Self::service(service);
        ServiceMetrics {
            service: service.to_owned(),
            ok: self
                .requests
                .get_or_create(&CodeLabels {
                    service: service.to_owned(),
                    code: 200,
                })
                .clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            connect_errors: self.connect_errors.get_or_create(&labels).clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            ejections: self.ejections.get_or_create(&labels).clone(),
        }
    }

    /// The metrics as Prometheus text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// A service's metrics, looked up once.
#[derive(Debug, Clone)]
pub(crate) struct ServiceMetrics {
    service: String,
    ok: Counter,
    duration: Histogram,
    pub(crate) connect_errors: Counter,
    pub(crate) retries: Counter,
    pub(crate) ejections: Counter,
}

impl ServiceMetrics {
    pub(crate) fn answered(&self, metrics: &Metrics, code: u16, took: Duration) {
        if code == 200 {
            self.ok.inc();
        } else {
            metrics
                .requests
                .get_or_create(&CodeLabels {
                    service: self.service.clone(),
                    code,
                })
                .inc();
        }
        self.duration.observe(took.as_secs_f64());
    }
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let response = if request.uri().path() == "/metrics" {
                            http::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(metrics.render())))
                        } else {
                            http::Response::builder()
                                .status(http::StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
                        };
                        Ok::<_, Infallible>(
                            response
                                .unwrap_or_else(|_| http::Response::new(Full::new(Bytes::new()))),
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
