//! The Signpost gRPC server: `signpost.v1.RegistryService` over an `Arc<dyn`
//! [`signpost_store::Store`]`>`, with `grpc.health.v1.Health` and server reflection on the same
//! port.
//!
//! A request enters [`RegistryServer`] (`route`: Discover and Watch to their fast path, the rest
//! to the generated server), then a handler in [`Registry`]; it is validated and converted to
//! domain types (`convert`, `validate`, `selector`) and becomes one store write or read, whose
//! conditions and quotas (`limits`) the store judges atomically. Active health checks run in one
//! task (`health`, probes in `probe`) that follows the store and writes verdicts back. Watch
//! streams are served by one task each (`watch`), fed by the router of the store's one feed
//! (`hub`), which sees changes through the stream's `filter` and sends them framed once
//! (`encode`). Errors become `tonic::Status` in one place (`error`). Nothing here knows which
//! store backend it runs on.
//!
//! The same port is an xDS control plane ([`xds`]) for gRPC clients that balance by themselves:
//! it serves what they subscribe to from live views of the services (`view`), one task per
//! followed service on the hub. Envoy's message types come from
//! [envoy-types](https://docs.rs/envoy-types) (pre-generated for prost/tonic 0.14, no protoc);
//! [serde_json](https://docs.rs/serde_json) writes the clients' bootstrap file.
//! With [`serve_with`], [`dns`] answers DNS queries from the same live views, and [`http`]
//! serves Consul's HTTP API and Prometheus' HTTP service discovery, each on a port of its own.
//!
//! Security sits in front of every handler: [`auth`] checks access tokens (the token file is
//! TOML, read with [toml](https://docs.rs/toml); tokens are kept as SHA-256 hashes, computed with
//! RustCrypto's [sha2](https://docs.rs/sha2)), [`Limits`] are checked where the request is
//! understood, TLS is rustls through tokio-rustls (`tls`, so that certificates can be replaced
//! while serving), and `limits` turns tonic's answer to an oversized
//! request into the `RESOURCE_EXHAUSTED` every other limit answers. Each connection's writes
//! pass through `coalesce`, which sends the large frames of one turn of its task together.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use signpost_server::{Config, serve};
//! use signpost_store::{MemoryConfig, MemoryStore};
//! use std::sync::Arc;
//!
//! let store = Arc::new(MemoryStore::new(MemoryConfig::default()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! serve(store, Config::default(), listener, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```

pub mod auth;
mod coalesce;
mod convert;
pub mod dns;
mod encode;
mod error;
mod filter;
mod health;
pub mod http;
mod hub;
mod limits;
pub mod metrics;
mod probe;
mod route;
pub mod selector;
mod service;
mod tls;
mod validate;
mod view;
mod watch;
pub mod xds;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use signpost_store::Store;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub use auth::Tokens;
pub use convert::{DEFAULT_WEIGHT, MAX_CHECK_INTERVAL, MIN_CHECK_INTERVAL};
pub use error::Error;
pub use health::HealthConfig;
pub use limits::Limits;
pub use route::RegistryServer;
pub use service::{MAX_TTL, MIN_TTL, Registry};
pub use validate::DEFAULT_NAMESPACE;

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often an idle Watch stream gets a progress message; each stream waits between three
    /// quarters of this and all of it, so that streams idle since the same moment are spread out.
    pub watch_progress_interval: Duration,
    /// Messages queued towards one Watch stream before its task waits for the client.
    pub watch_buffer: usize,
    /// The largest request accepted, in bytes. Requests are small: an instance is at most ~20 KiB.
    pub max_request_size: usize,
    /// The largest response sent, in bytes; bounds a Discover or a reset view of a huge service.
    pub max_response_size: usize,
    /// Active health checks; `None` runs none (another server runs them, or nobody).
    pub health_checks: Option<HealthConfig>,
    /// Where RPCs, watches and store writes are counted; `None` counts nothing.
    pub metrics: Option<Arc<metrics::Metrics>>,
    /// Accepted access tokens; `None` serves everyone (the server warns about it at start-up).
    pub auth: Option<Arc<auth::Tokens>>,
    /// A token may only update or deregister instances it registered itself.
    pub strict_ownership: bool,
    /// What one client may take of the server.
    pub limits: Limits,
    /// TLS, and with a client CA, mutual TLS. `None` serves plaintext.
    pub tls: Option<Tls>,
    /// New TLS material to switch to while serving (renewed certificates, a new client CA):
    /// connections made after each value arrives use it, open ones go on. With `tls` only.
    pub tls_updates: Option<tokio::sync::watch::Receiver<Tls>>,
    /// Serve `grpc.reflection` (for grpcurl); off hides the API's shape from strangers.
    pub reflection: bool,
    /// The longest a unary call may run (the client's `grpc-timeout` can only shorten it).
    pub request_timeout: Duration,
}

/// PEM-encoded TLS material for the server.
#[derive(Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// With it, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Tls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            watch_progress_interval: Duration::from_secs(5),
            watch_buffer: 16,
            max_request_size: 1024 * 1024,
            max_response_size: 64 * 1024 * 1024,
            health_checks: Some(HealthConfig::default()),
            metrics: None,
            auth: None,
            strict_ownership: false,
            limits: Limits::default(),
            tls: None,
            tls_updates: None,
            reflection: true,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot serve TLS: {0}")]
    Tls(String),
}

/// Serves the registry, health and reflection on `listener` until `shutdown` completes.
///
/// On shutdown the health status turns NOT_SERVING, open Watch and KeepAlive streams end with
/// `UNAVAILABLE` (so clients reconnect elsewhere), and in-flight unary calls finish.
pub async fn serve(
    store: Arc<dyn Store>,
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with(store, config, listener, Listeners::default(), shutdown).await
}

/// The protocols served next to gRPC, each on a listener of its own; `None` serves it not.
#[derive(Debug, Default)]
pub struct Listeners {
    /// DNS ([`dns`]).
    pub dns: Option<dns::DnsListener>,
    /// Consul's HTTP API and Prometheus' HTTP service discovery ([`http`]).
    pub http: Option<http::HttpListener>,
}

/// [`serve`], and the protocols of `more` from the same registry and live views, stopping
/// with it.
pub async fn serve_with(
    store: Arc<dyn Store>,
    config: Config,
    listener: TcpListener,
    more: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let Listeners { dns, http } = more;
    let max_request = config.max_request_size;
    let tls_updates = config.tls_updates.clone();
    let (tls, with_reflection, request_timeout) = (
        config.tls.clone(),
        config.reflection,
        config.request_timeout,
    );
    if config.auth.is_none() {
        tracing::warn!(
            "no --auth-tokens: anyone who can reach this server can register, deregister and discover"
        );
    }
    let health_checks = config.health_checks.clone();
    let store_serving = store.serving();
    let registry = Registry::new(store.clone(), config);
    let streams = registry.shutdown_token();
    // The health checker is owned here: it stops with the server and is awaited below.
    let checker = health_checks.map(|c| tokio::spawn(health::run(store, c, streams.clone())));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RegistryServer>().await;
    if let Some(serving) = store_serving {
        tokio::spawn(follow_backend(serving, health.clone(), streams.clone()));
    }

    // Each of tonic-reflection's builders adds only its own version's descriptor set, so
    // `grpcurl list` would show whichever version answered and hide the other one this port also
    // serves. Both sets go into both builders (a file registered twice is kept once).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(signpost_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let (reflection_v1, reflection_v1alpha) = if with_reflection {
        (
            Some(reflection().build_v1()?),
            Some(reflection().build_v1alpha()?),
        )
    } else {
        (None, None)
    };

    let dns = dns.map(|listener| {
        tokio::spawn(dns::serve(
            listener,
            registry.views(),
            registry.metrics(),
            streams.clone(),
        ))
    });
    let http =
        http.map(|listener| tokio::spawn(http::serve(listener, registry.clone(), streams.clone())));
    let ads = xds::Ads::new(registry.clone()).server();
    let registry = RegistryServer::new(registry);

    let stop_streams = streams.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: ending streams, finishing in-flight calls");
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health.set_not_serving::<RegistryServer>().await;
        stop_streams.cancel();
    };

    let router = tonic::transport::Server::builder()
        // Bounds unary calls; streams are bounded by their clients and by shutdown.
        .timeout(request_timeout)
        .layer(limits::RequestSizeLayer { limit: max_request })
        // h2 closes a connection holding too many small DATA frames not yet read, with a budget
        // of half the connection window. Each Watch request is one such frame: at the default
        // 1 MiB window, a client opening ~2,300 watches at once faster than the server takes
        // them in lost its connection. 16 MiB covers max_watches_per_connection (20,000).
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(ads)
        .add_service(registry);
    match tls {
        None => {
            // Settings on the builder such as tcp_nodelay only apply to listeners it binds
            // itself, so the incoming connections are configured here. Without TCP_NODELAY,
            // answers to requests larger than a segment wait ~40 ms on delayed ACKs.
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|tcp| tcp.map(coalesce::Coalesced::new));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
        Some(tls) => {
            let (current, config) =
                tokio::sync::watch::channel(tls::server_config(&tls).map_err(ServeError::Tls)?);
            if let Some(updates) = tls_updates {
                tokio::spawn(tls::follow(updates, current, streams.clone()));
            }
            router
                .serve_with_incoming_shutdown(
                    tls::incoming(listener, config).map(|tls| tls.map(coalesce::Coalesced::new)),
                    shutdown,
                )
                .await?;
        }
    }
    streams.cancel();
    if let Some(checker) = checker {
        let _ = checker.await;
    }
    if let Some(dns) = dns {
        let _ = dns.await;
    }
    if let Some(http) = http {
        let _ = http.await;
    }
    Ok(())
}

/// Mirrors the backend's availability in the health status, so that load balancers and clients
/// stop sending to a server whose backend (etcd) it cannot reach.
async fn follow_backend(
    mut serving: tokio::sync::watch::Receiver<Result<(), String>>,
    health: tonic_health::server::HealthReporter,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let status = match &*serving.borrow_and_update() {
            Ok(()) => ServingStatus::Serving,
            Err(_) => ServingStatus::NotServing,
        };
        health.set_service_status("", status).await;
        health
            .set_service_status(
                <RegistryServer as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = serving.changed() => if changed.is_err() { return },
        }
    }
}
