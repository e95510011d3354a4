//! Server-side discovery for Signpost: `signpost gateway`, a reverse proxy that sends
//! `http://GATEWAY/{service}/{path}` to `/{path}` on a healthy instance of `service`, so that a
//! caller in any language (a browser, `curl`, a gRPC stub) reaches a service with no library.
//!
//! How it fits: [`Gateway::serve`] accepts client connections (`server`: HTTP/1.1 with
//! keep-alive, HTTP/2 with prior knowledge or over TLS, upgrades); each request is routed by
//! `route` (by path, `Host`, or gRPC service name) to a target, whose `upstream` follows the
//! registry with a watch and keeps a pool of connections per instance; `proxy` sends the request
//! there, retries it where that is safe (`budget` bounds how much), streams both bodies, and
//! answers 404/503/504 in JSON (or a gRPC status) when it cannot. Plain connections start on
//! `h1`, the gateway's own HTTP/1.1 path for body-less requests (most API reads), with `proxy`'s
//! rules and about a third less CPU than hyper's server and client; anything else is handed to
//! hyper with what was read. `wire` is the gateway's own HTTP/1.1 client side, which `h1` and
//! `proxy` share: body-less requests from HTTP/2 and TLS callers to HTTP/1.1 instances go out
//! through it too, with hyper serving the caller. Instances are picked by the
//! same rules as the balanced channel's (`signpost_client::rules`). `metrics` counts it all for
//! Prometheus; each request gets an access log line (the `signpost_gateway::access` target).
//!
//! While the registry is unreachable, the last known instances keep serving; a registry that
//! comes back empty leaves them for a grace period while they register again.
//!
//! Built on hyper 1 and hyper-util, the pieces tonic and the registry already use, rather than
//! pingora: pingora has its own HTTP stack, TLS through OpenSSL or BoringSSL (rustls is
//! experimental there), and a server that owns the process and its runtimes, where the gateway
//! must share a tokio runtime and rustls with the rest of Signpost. `serde_json` writes the
//! error bodies; `prometheus-client` is the metrics registry the server uses too; `httparse` is
//! the head parser hyper itself uses, for `h1`, and `httpdate` the `Date` hyper writes, for
//! `h1`'s own answers.

mod budget;
mod h1;
mod metrics;
mod pace;
mod proxy;
mod route;
mod server;
mod upstream;
mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use signpost_client::rules::Policy;
use signpost_client::{Client, OutlierDetection};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

pub use budget::BudgetPolicy;
pub use metrics::{Metrics, serve_metrics};
pub use route::{Routes, Target, check_service_name, parse_duration};

/// How a gateway routes, waits, retries and limits. Every default is named on its field.
#[derive(Debug, Clone)]
pub struct Config {
    /// The namespace services are looked up in. Default `default`.
    pub namespace: String,
    /// Routes tried before `/{service}/{path}`; see [`Routes::parse`].
    pub routes: Routes,
    /// The gateway's zone: instances of this zone are preferred while enough are up. Default none.
    pub zone: String,
    /// How long a request may wait for its answer's head. Default 15 s (Envoy's route default).
    pub request_timeout: Duration,
    /// How long a body (either way) may go without a byte. Default 5 min.
    pub idle_timeout: Duration,
    /// How long connecting to an instance may take. Default 2 s.
    pub connect_timeout: Duration,
    /// How long a request waits for the registry's first answer about its service. Default 5 s.
    pub wait_timeout: Duration,
    /// Attempts per request, on different instances. Default 3.
    pub max_attempts: u32,
    /// Bodies up to this many bytes are kept so that an idempotent request can be retried.
    /// Default 64 KiB.
    pub retry_buffer: usize,
    pub retry_budget: BudgetPolicy,
    pub outlier: OutlierDetection,
    /// As the balanced channel's: below this share of instances not ejected, every reachable
    /// one takes requests. Default 0.5.
    pub panic_threshold: f64,
    /// How long instances stay after a registry that restarted empty stops listing them.
    /// Default 15 s.
    pub stale_grace: Duration,
    /// Services followed at once; a request for one more gets 503. Default 1,024.
    pub max_services: usize,
    /// Client connections open at once; past it, new ones wait. Default 10,000.
    pub max_connections: usize,
    /// The largest request head (request line and headers). Default 64 KiB.
    pub max_header_bytes: usize,
    /// Idle connections kept per instance, for each of the two HTTP/1.1 paths (`h1` and hyper).
    /// Default 64.
    pub max_idle_per_instance: usize,
    /// How long shutdown waits for requests in flight. Default 10 s.
    pub drain_timeout: Duration,
    /// One log line per request. Default on.
    pub access_log: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: "default".to_owned(),
            routes: Routes::default(),
            zone: String::new(),
            request_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(2),
            wait_timeout: Duration::from_secs(5),
            max_attempts: 3,
            retry_buffer: 64 * 1024,
            retry_budget: BudgetPolicy::default(),
            outlier: OutlierDetection::default(),
            panic_threshold: 0.5,
            stale_grace: Duration::from_secs(15),
            max_services: 1024,
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            max_idle_per_instance: 64,
            drain_timeout: Duration::from_secs(10),
            access_log: true,
        }
    }
}

/// A certificate and key (PEM) for the gateway's TLS listener.
#[derive(Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// The acceptor, offering HTTP/2 and HTTP/1.1 by ALPN; the error says what is wrong with
    /// the files.
    pub fn acceptor(&self) -> Result<TlsAcceptor, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the certificate is not PEM: {e}"))?;
        if certs.is_empty() {
            return Err("the certificate file holds no certificate".into());
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| format!("the key is not a PEM private key: {e}"))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("the certificate and key cannot be used: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// A gateway: one per process, serving any number of listeners.
#[derive(Debug, Clone)]
pub struct Gateway {
    proxy: Arc<proxy::Proxy>,
    limits: server::Limits,
}

impl Gateway {
    /// A gateway that looks services up through `client`. Must be called inside a Tokio
    /// runtime (it starts the task that forgets unused services).
    pub fn new(client: Client, config: Config) -> Gateway {
        let settings = upstream::Settings {
            namespace: config.namespace.clone(),
            zone: config.zone.clone(),
            connect_timeout: config.connect_timeout,
            policy: Policy {
                panic_threshold: config.panic_threshold.clamp(0.0, 1.0),
                zone_min_share: 0.5,
            },
            outlier: config.outlier,
            stale_grace: config.stale_grace,
            max_idle_per_endpoint: config.max_idle_per_instance,
            reconnect_base: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            ewma_decay: signpost_client::rules::DECAY,
            retry_budget: config.retry_budget,
        };
        let upstreams = upstream::Upstreams::new(client, settings, config.max_services);
        let proxy = Arc::new(proxy::Proxy {
            routes: config.routes.clone(),
            upstreams,
            metrics: Arc::new(Metrics::new()),
            settings: proxy::Settings {
                namespace: config.namespace.clone(),
                request_timeout: config.request_timeout,
                idle_timeout: config.idle_timeout,
                wait_timeout: config.wait_timeout,
                max_attempts: config.max_attempts.max(1),
                retry_buffer: config.retry_buffer,
                access_log: config.access_log,
            },
        });
        Gateway {
            proxy,
            limits: server::Limits {
                max_connections: config.max_connections,
                max_header_bytes: config.max_header_bytes,
                header_timeout: Duration::from_secs(10),
                drain_timeout: config.drain_timeout,
            },
        }
    }

    /// The gateway's metrics, for [`serve_metrics`].
    pub fn metrics(&self) -> Arc<Metrics> {
        self.proxy.metrics.clone()
    }

    /// Serves `listener` (over TLS when `tls` is given) until `shutdown`, then waits for the
    /// requests in flight, up to the drain timeout.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) {
        server::serve(
            listener,
            tls,
            self.proxy.clone(),
            self.limits.clone(),
            shutdown,
        )
        .await
    }
}
