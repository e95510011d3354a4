//! The [`Client`] and its settings: what a client is built from, and the calls that are neither a
//! registration nor a balanced channel. The connections it holds are `connections.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use signpost_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::connections::{Auth, Connections, TlsMode, WATCH_IDLE_TIMEOUT};
use crate::keepalive::KeepAlives;
use crate::types::{WatchUpdate, instance_from_pb};
use crate::watcher::{View, WatchStats, Watcher};
use crate::{Error, Filter, Instance, Result};

/// Settings for a [`Client`].
#[derive(Clone)]
pub struct ClientBuilder {
    addresses: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    backoff_base: Duration,
    backoff_max: Duration,
    watch_idle_timeout: Duration,
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    tls_domain: Option<String>,
    token: Option<String>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and tokens stay out of logs.
        f.debug_struct("ClientBuilder")
            .field("addresses", &self.addresses)
            .field("tls", &(self.ca_pem.is_some() || self.identity.is_some()))
            .field("client_certificate", &self.identity.is_some())
            .field("token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            addresses: Vec::new(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            watch_idle_timeout: WATCH_IDLE_TIMEOUT,
            ca_pem: None,
            identity: None,
            tls_domain: None,
            token: None,
        }
    }
}

impl ClientBuilder {
    /// Adds a registry address such as `http://127.0.0.1:7070`; one without a scheme
    /// (`127.0.0.1:7070`, as grpcurl takes it) is `http://`, or `https://` with TLS settings.
    /// With several, calls go to one and move to the next when it cannot be reached.
    pub fn registry(mut self, address: impl Into<String>) -> Self {
        self.addresses.push(address.into());
        self
    }

    /// How long connecting to a registry may take (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a unary call may take (default 10 s). Streams are not bound by it.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The first and the longest wait between retries (default 100 ms and 5 s).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// How long a watch may hear nothing from the registry, not even one of the progress
    /// messages it sends an idle stream every few seconds, before the watch takes the stream for
    /// dead and reopens it (default 15 s, three of the registry's default progress intervals).
    /// Shorten it only together with the registry's `watch_progress_interval`.
    pub fn watch_idle_timeout(mut self, timeout: Duration) -> Self {
        self.watch_idle_timeout = timeout;
        self
    }

    /// Trusts this CA (PEM) for the registry's certificate, and speaks TLS to every registry
    /// (`https://` addresses do too).
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this certificate (PEM chain and key) to registries that require mutual TLS.
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// The name to check the registry's certificate against, when it is not the address's host.
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        self.tls_domain = Some(name.into());
        self
    }

    /// Sends `authorization: Bearer TOKEN` with every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Takes the token and TLS files from the environment, as the `signpost` CLI does:
    /// `SIGNPOST_TOKEN`, `SIGNPOST_CA_CERT`, `SIGNPOST_CLIENT_CERT` with `SIGNPOST_CLIENT_KEY`, and
    /// `SIGNPOST_TLS_DOMAIN`. Unset variables change nothing; a file that cannot be read is an error.
    pub fn security_from_env(mut self) -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let file = |name: &str| -> Result<Option<Vec<u8>>> {
            var(name)
                .map(|path| {
                    std::fs::read(&path).map_err(|e| {
                        Error::InvalidArgument(format!("{name}: cannot read {path}: {e}"))
                    })
                })
                .transpose()
        };
        if let Some(token) = var("SIGNPOST_TOKEN") {
            self = self.token(token);
        }
        if let Some(ca) = file("SIGNPOST_CA_CERT")? {
            self = self.ca_certificate(ca);
        }
        match (file("SIGNPOST_CLIENT_CERT")?, file("SIGNPOST_CLIENT_KEY")?) {
            (Some(cert), Some(key)) => self = self.identity(cert, key),
            (None, None) => {}
            _ => {
                return Err(Error::InvalidArgument(
                    "SIGNPOST_CLIENT_CERT and SIGNPOST_CLIENT_KEY go together".into(),
                ));
            }
        }
        if let Some(domain) = var("SIGNPOST_TLS_DOMAIN") {
            self = self.tls_domain(domain);
        }
        Ok(self)
    }

    fn tls(&self) -> Option<ClientTlsConfig> {
        let wanted = self.ca_pem.is_some()
            || self.identity.is_some()
            || self.tls_domain.is_some()
            || self.addresses.iter().any(|a| a.starts_with("https://"));
        if !wanted {
            return None;
        }
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        Some(tls)
    }

    /// The same TLS settings as a connector of this crate's own, for diagnosing a failed
    /// handshake; only with a CA, since nothing else here can vouch for a registry.
    fn tls_probe(&self) -> Option<crate::tls::Tls> {
        let ca = self.ca_pem.as_ref()?;
        let mut tls = crate::InstanceTls::new(ca.clone());
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(cert.clone(), key.clone());
        }
        if let Some(domain) = &self.tls_domain {
            tls = tls.domain(domain.clone());
        }
        tls.connector().ok()
    }

    /// Builds the client. No connection is made until the first call.
    pub fn build(self) -> Result<Client> {
        if self.addresses.is_empty() {
            return Err(Error::InvalidArgument(
                "at least one registry address is required".into(),
            ));
        }
        let auth = Auth::bearer(self.token.as_deref())?;
        let tls = self.tls();
        let mut registries = Vec::with_capacity(self.addresses.len());
        for address in &self.addresses {
            // A TLS registry is addressed with https, whatever the caller wrote; an address
            // without a scheme is taken as the host:port grpcurl and other tools accept.
            let rest = address
                .strip_prefix("http://")
                .or_else(|| (!address.contains("://")).then_some(address.as_str()));
            let address = match (&tls, rest) {
                (Some(_), Some(rest)) => format!("https://{rest}"),
                (None, Some(rest)) => format!("http://{rest}"),
                _ => address.clone(),
            };
            let mut endpoint = Endpoint::from_shared(address.clone())
                .map_err(|e| Error::InvalidAddress {
                    address: address.clone(),
                    reason: format!("{e}; write it as http://HOST:PORT or https://HOST:PORT"),
                })?
                .connect_timeout(self.connect_timeout)
                .timeout(self.request_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true);
            if let Some(tls) = &tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| Error::InvalidAddress {
                        address: address.clone(),
                        reason: format!("TLS settings: {e}"),
                    })?;
            }
            registries.push((address.clone(), endpoint.connect_lazy()));
        }
        Ok(Client {
            conn: Arc::new(
                Connections::new(
                    registries,
                    auth,
                    (self.backoff_base, self.backoff_max),
                    self.watch_idle_timeout,
                )
                .with_tls_probe(self.tls_probe())
                .with_tls(match tls {
                    Some(_) => TlsMode::On {
                        identity: self.identity.is_some(),
                    },
                    None => TlsMode::Off,
                }),
            ),
            keep_alives: Arc::new(OnceLock::new()),
            views: Arc::default(),
        })
    }
}

/// A Signpost client. Cheap to clone: clones share the connections, the one KeepAlive stream of
/// all their registrations, and the watches behind their balanced channels.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) conn: Arc<Connections>,
    keep_alives: Arc<OnceLock<KeepAlives>>,
    views: Arc<Mutex<HashMap<Filter, Weak<ViewReceiver>>>>,
}

/// The live view of a balanced channel's watch.
pub(crate) type ViewReceiver = watch::Receiver<Arc<View>>;

impl Client {
    /// A client of the registry at `address` with default settings.
    pub fn new(address: impl Into<String>) -> Result<Client> {
        ClientBuilder::default().registry(address).build()
    }

    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The shared KeepAlive stream, started with the first registration.
    pub(crate) fn keep_alives(&self) -> KeepAlives {
        self.keep_alives
            .get_or_init(|| KeepAlives::start(self.conn.clone()))
            .clone()
    }

    /// The instances matching `filter`. Served from the view of a balanced channel or watch this
    /// client already runs for the same filter, with no round trip; otherwise one `Discover`.
    pub async fn discover(&self, filter: impl Into<Filter>) -> Result<Vec<Instance>> {
        let filter = filter.into();
        if let Some(view) = self.cached_view(&filter) {
            return Ok(view.instances.values().cloned().collect());
        }
        let request = filter.discover_request();
        let answer = self
            .conn
            .unary(|mut c| {
                let request = request.clone();
                async move { c.discover(request).await }
            })
            .await?;
        Ok(answer.instances.into_iter().map(instance_from_pb).collect())
    }

    fn cached_view(&self, filter: &Filter) -> Option<Arc<View>> {
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = match views.get(filter).and_then(Weak::upgrade) {
            Some(receiver) => receiver,
            None => {
                views.remove(filter);
                return None;
            }
        };
        let view = receiver.borrow().clone();
        view.synced.then_some(view)
    }

    /// Makes a live view available to [`Client::discover`] for as long as `view` is held.
    pub(crate) fn publish_view(&self, filter: &Filter, view: &Arc<ViewReceiver>) {
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        views.retain(|_, v| v.strong_count() > 0);
        views.insert(filter.clone(), Arc::downgrade(view));
    }

    /// Follows `filter` as a stream of typed updates: a reset first, then every change. The
    /// stream reconnects on its own (with backoff) and resumes from the last revision it saw;
    /// it ends with an error only when the registry refuses the filter.
    pub fn watch(&self, filter: impl Into<Filter>) -> ReceiverStream<Result<WatchUpdate>> {
        self.watch_with_stats(filter).0
    }

    /// [`Client::watch`], with the counts of what its stream went through (reconnects, resumes,
    /// resets), for a caller that reports a lost and regained stream as it happens.
    pub fn watch_with_stats(
        &self,
        filter: impl Into<Filter>,
    ) -> (ReceiverStream<Result<WatchUpdate>>, Arc<WatchStats>) {
        let (tx, rx) = mpsc::channel(16);
        let mut watcher = Watcher::new(self.conn.clone(), filter.into());
        let stats = watcher.stats.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    update = watcher.next() => {
                        let failed = update.is_err();
                        if tx.send(update).await.is_err() || failed {
                            return;
                        }
                    }
                }
            }
        });
        (ReceiverStream::new(rx), stats)
    }

    /// Lists the services of `namespace` ("" for the default one) with their counts.
    pub async fn services(&self, namespace: &str) -> Result<Vec<pb::ServiceSummary>> {
        self.services_matching(namespace, "").await
    }

    /// Lists the services of `namespace` having an instance whose metadata matches `selector`
    /// (a label selector such as `app=web,tier!=canary`), counting the matching instances only.
    pub async fn services_matching(
        &self,
        namespace: &str,
        selector: &str,
    ) -> Result<Vec<pb::ServiceSummary>> {
        let request = pb::ListServicesRequest {
            namespace: namespace.to_owned(),
            selector: selector.to_owned(),
        };
        let answer = self
            .conn
            .unary(|mut c| {
                let request = request.clone();
                async move { c.list_services(request).await }
            })
            .await?;
        Ok(answer.services)
    }

    /// Removes an instance; `true` when it existed.
    pub async fn deregister(&self, namespace: &str, service: &str, id: &str) -> Result<bool> {
        let request = pb::DeregisterRequest {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            id: id.to_owned(),
        };
        let answer = self
            .conn
            .unary(|mut c| {
                let request = request.clone();
                async move { c.deregister(request).await }
            })
            .await?;
        Ok(answer.existed)
    }

    /// The registry addresses, comma-separated, for messages.
    pub fn addresses(&self) -> String {
        self.conn.addresses()
    }
}
