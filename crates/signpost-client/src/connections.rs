//! The registry connections every part of the client shares: one lazily connected channel per
//! registry address, which one is in use, failover, and the translation of a failed call's
//! status into an [`Error`] that says which registry and why.
//!
//! It sits below the client, the keep-alive stream, the registrations and the watches, and
//! imports none of them, so each of those can depend on it without depending on one another.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use signpost_proto::v1::registry_service_client::RegistryServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::{Error, Result};
use signpost_backoff::Backoff;

/// How long a watch may hear nothing before it is reopened. The registry sends an idle stream a
/// progress message at least every 5 s (its default `watch_progress_interval`), so three missed
/// ones mean the stream, or the path to it, is dead even if no error reached this side.
pub(crate) const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends the access token with every call.
#[derive(Clone)]
pub(crate) struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    /// `authorization: Bearer TOKEN` on every call, or nothing without a token.
    pub(crate) fn bearer(token: Option<&str>) -> Result<Auth> {
        match token {
            None => Ok(Auth(None)),
            Some(token) => MetadataValue::try_from(format!("Bearer {token}"))
                .map(|value| Auth(Some(value)))
                .map_err(|_| {
                    Error::InvalidArgument(
                        "the access token may only hold visible ASCII characters".into(),
                    )
                }),
        }
    }
}

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Auth(token)"
        } else {
            "Auth(none)"
        })
    }
}

/// A generated client on one registry connection, with the access token attached.
pub(crate) type Rpc = RegistryServiceClient<InterceptedService<Channel, Auth>>;

/// The registry addresses and which one is in use. Shared by the client and its background
/// tasks; holds nothing that would keep those tasks alive.
#[derive(Debug)]
pub(crate) struct Connections {
    registries: Vec<(String, Channel)>,
    auth: Auth,
    active: AtomicUsize,
    /// The first and the longest wait between retries.
    pub(crate) backoff: (Duration, Duration),
    /// See [`WATCH_IDLE_TIMEOUT`].
    pub(crate) watch_idle_timeout: Duration,
    /// Whether calls speak TLS, so that a failed handshake can be told apart from a refusal.
    tls: TlsMode,
    /// A TLS connector with the client's own settings, to ask a registry directly why a TLS
    /// call died without a word (see [`Connections::diagnose_tls`]).
    tls_probe: Option<crate::tls::Tls>,
}

/// What TLS this side speaks to the registries. A failed handshake means different things with
/// and without a client certificate, so the message says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsMode {
    Off,
    On { identity: bool },
}

impl Connections {
    /// `registries` must not be empty; the builder refuses a client without an address.
    pub(crate) fn new(
        registries: Vec<(String, Channel)>,
        auth: Auth,
        backoff: (Duration, Duration),
        watch_idle_timeout: Duration,
    ) -> Self {
        Connections {
            registries,
            auth,
            active: AtomicUsize::new(0),
            backoff,
            watch_idle_timeout,
            tls: TlsMode::Off,
            tls_probe: None,
        }
    }

    /// The connector [`Connections::diagnose_tls`] uses.
    pub(crate) fn with_tls_probe(mut self, probe: Option<crate::tls::Tls>) -> Self {
        self.tls_probe = probe;
        self
    }

    /// Why TLS with registry `index` fails, found by a handshake of this side's own and a short
    /// read: a call on tonic's channel that a server refused for want of a client certificate
    /// can die with a bare "connection closed" (the client's first write meets the closed
    /// socket, and the alert that said why is lost with it), while a handshake that sends
    /// nothing after it always gets the alert. `None` when TLS works or no answer came.
    pub(crate) async fn diagnose_tls(&self, index: usize) -> Option<String> {
        let TlsMode::On { identity } = self.tls else {
            return None;
        };
        let probe = self.tls_probe.as_ref()?;
        let address = &self.registries[index % self.registries.len()].0;
        let uri: http::Uri = address.parse().ok()?;
        let host = uri
            .host()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let name = probe.server_name(&host).ok()?;
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .ok()?;
            let mut stream = match probe.connector.connect(name, tcp).await {
                Ok(stream) => stream,
                Err(e) => return Some(describe_handshake(&e, identity)),
            };
            let mut byte = [0u8; 1];
            match tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await {
                // The server spoke (its HTTP/2 settings): TLS is not what failed.
                Ok(n) if n > 0 => None,
                Ok(_) => Some(refused_identity(identity, "closed after the handshake")),
                Err(e) => Some(describe_handshake(&e, identity)),
            }
        };
        tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .ok()
            .flatten()
    }

    /// Says which TLS the registries' channels were built with (none by default).
    pub(crate) fn with_tls(mut self, tls: TlsMode) -> Self {
        self.tls = tls;
        self
    }

    /// A fresh retry schedule with the client's settings; each reconnect loop keeps its own.
    pub(crate) fn new_backoff(&self) -> Backoff {
        Backoff::new(self.backoff.0, self.backoff.1)
    }

    pub(crate) fn current(&self) -> (usize, Rpc) {
        let index = self.active.load(Ordering::Relaxed) % self.registries.len();
        (
            index,
            RegistryServiceClient::with_interceptor(
                self.registries[index].1.clone(),
                self.auth.clone(),
            ),
        )
    }

    /// Moves to the next registry, unless another caller already moved away from `index`.
    pub(crate) fn failed(&self, index: usize) {
        let next = (index + 1) % self.registries.len();
        if self
            .active
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && self.registries.len() > 1
        {
            tracing::warn!(from = %self.registries[index].0, to = %self.registries[next].0, "registry unreachable; trying the next");
        }
    }

    pub(crate) fn addresses(&self) -> String {
        let names: Vec<&str> = self.registries.iter().map(|(a, _)| a.as_str()).collect();
        names.join(", ")
    }

    /// Turns a failed call's status into an [`Error`]; unreachable registries say so plainly,
    /// and a registry that answered that its store is unreachable is not called unreachable.
    pub(crate) fn error(&self, index: usize, status: Status) -> Error {
        let address = || self.registries[index % self.registries.len()].0.clone();
        // A handshake that failed is the registry's connection, whatever code the call got:
        // under TLS 1.3 a refused client certificate surfaces mid-call, as UNKNOWN.
        if let TlsMode::On { identity } = self.tls
            && let Some(reason) = tls_failure(&status, identity)
        {
            return Error::Unavailable {
                address: address(),
                reason,
            };
        }
        // A call that failed on this side's transport (a timeout, a closed connection) never
        // reached the registry, whatever code tonic gave it.
        if matches!(status.code(), Code::Unknown | Code::Cancelled)
            && std::error::Error::source(&status).is_some()
        {
            return Error::Unavailable {
                address: address(),
                reason: root_cause(&status),
            };
        }
        match status.code() {
            Code::Unavailable => match store_failure(&status) {
                Some(reason) => Error::StoreUnavailable {
                    address: address(),
                    reason: reason.to_owned(),
                },
                None => Error::Unavailable {
                    address: address(),
                    reason: root_cause(&status),
                },
            },
            Code::InvalidArgument => Error::InvalidArgument(status.message().to_owned()),
            Code::Unauthenticated => Error::Unauthenticated(status.message().to_owned()),
            Code::PermissionDenied => Error::PermissionDenied(status.message().to_owned()),
            Code::ResourceExhausted => Error::ResourceExhausted(status.message().to_owned()),
            _ => Error::Status(status),
        }
    }

    /// One unary call, trying each registry once while they are unreachable.
    pub(crate) async fn unary<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(Rpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let mut last = None;
        for _ in 0..self.registries.len() {
            let (index, client) = self.current();
            match call(client).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.code() == Code::Unavailable => {
                    // Another registry may reach the store when this one cannot.
                    self.failed(index);
                    let error = self.explain(index, status).await;
                    // A registry that answered says more than one that could not be reached.
                    if !matches!(last, Some(Error::StoreUnavailable { .. })) {
                        last = Some(error);
                    }
                }
                Err(status) => return Err(self.explain(index, status).await),
            }
        }
        Err(last.unwrap_or(Error::Stopped))
    }

    /// [`Connections::error`], and for a TLS call that died without a word, why.
    async fn explain(&self, index: usize, status: Status) -> Error {
        let mut error = self.error(index, status);
        if let Error::Unavailable { reason, .. } = &mut error
            && is_bare_close(reason)
            && let Some(why) = self.diagnose_tls(index).await
        {
            *reason = why;
        }
        error
    }
}

/// The registry's own account of a store it cannot reach: an UNAVAILABLE status that came over
/// the wire (a transport failure on this side has a source) with the server's store message.
fn store_failure(status: &Status) -> Option<&str> {
    if std::error::Error::source(status).is_some() {
        return None;
    }
    status.message().strip_prefix("store unavailable: ")
}

/// The innermost cause of a transport failure in plain words, such as "connection refused".
pub(crate) fn root_cause(status: &Status) -> String {
    let mut innermost = None;
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && io.kind() != std::io::ErrorKind::Other
        {
            return io.kind().to_string();
        }
        innermost = Some(c);
        cause = c.source();
    }
    match innermost {
        Some(c) => c.to_string(),
        None => status.message().to_owned(),
    }
}

/// Why a TLS connection failed, in words that say what to change: the registry does not speak
/// TLS, its certificate is not trusted, or it wants (another) client certificate. `None` when
/// the failure was not the handshake's.
fn tls_failure(status: &Status, identity: bool) -> Option<String> {
    use tokio_rustls::rustls;
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let tls = c.downcast_ref::<rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(error) = tls {
            return Some(describe_tls(error, identity));
        }
        // Some layers keep only the text of rustls's error; it names the same cases.
        if let Some(reason) = describe_tls_text(&c.to_string(), identity) {
            return Some(reason);
        }
        // Under TLS 1.3 a server that refuses the client's certificate (or its absence) does so
        // after the client thinks the handshake is done: the client's first write meets a
        // closed connection instead of an alert.
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            return Some(refused_identity(identity, &io.kind().to_string()));
        }
        cause = c.source();
    }
    None
}

/// A transport failure that says nothing of its cause.
fn is_bare_close(reason: &str) -> bool {
    [
        "connection closed",
        "connection reset",
        "broken pipe",
        "operation was canceled",
    ]
    .iter()
    .any(|bare| reason.contains(bare))
}

/// A failed handshake or read of [`Connections::diagnose_tls`], in the words of `describe_tls`.
fn describe_handshake(error: &std::io::Error, identity: bool) -> String {
    use tokio_rustls::rustls;
    if let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return describe_tls(tls, identity);
    }
    match error.kind() {
        // Hung up on the ClientHello: the far end does not speak TLS.
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            NOT_TLS.to_owned()
        }
        _ => describe_tls_text(&error.to_string(), identity)
            .unwrap_or_else(|| format!("TLS failed: {error}")),
    }
}

fn refused_identity(identity: bool, how: &str) -> String {
    if identity {
        format!(
            "the registry closed the TLS connection ({how}): it does not accept this client \
             certificate; present one signed by the CA it trusts for clients"
        )
    } else {
        format!(
            "the registry closed the TLS connection ({how}): it wants a client certificate \
             (mutual TLS); present one signed by the CA it trusts for clients"
        )
    }
}

fn describe_tls_text(text: &str, identity: bool) -> Option<String> {
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        return Some(NOT_TLS.to_owned());
    }
    // A plaintext HTTP/2 server takes the ClientHello for a bad preface and hangs up without a
    // word; a TLS server that refuses a client says why with an alert instead.
    if text.contains("operation was canceled: connection closed") {
        return Some(NOT_TLS.to_owned());
    }
    if let Some(rest) = text.split("invalid peer certificate: ").nth(1) {
        if rest.starts_with("NotValidForName") {
            return Some(WRONG_NAME.to_owned());
        }
        return Some(format!(
            "the registry's certificate is not trusted ({rest}): trust the CA that signed it"
        ));
    }
    if let Some(alert) = text.split("received fatal alert: ").nth(1) {
        let identity = identity && alert != "CertificateRequired";
        return Some(refused_identity(identity, &format!("alert {alert}")));
    }
    None
}

const NOT_TLS: &str = "the registry does not speak TLS (it hung up on the TLS handshake): use \
                       an http:// address and no CA certificate";
const WRONG_NAME: &str = "the registry's certificate is not valid for this host name: address \
                          it by a name the certificate holds, or set the TLS domain to one";

fn describe_tls(error: &tokio_rustls::rustls::Error, identity: bool) -> String {
    use tokio_rustls::rustls::{AlertDescription, CertificateError, Error as Tls};
    match error {
        Tls::InvalidMessage(_) | Tls::InappropriateMessage { .. } => NOT_TLS.to_owned(),
        Tls::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => WRONG_NAME.to_owned(),
        Tls::InvalidCertificate(reason) => format!(
            "the registry's certificate is not trusted ({reason:?}): trust the CA that signed it"
        ),
        Tls::AlertReceived(
            AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure,
        ) if !identity => refused_identity(false, "alert"),
        Tls::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired
            | AlertDescription::HandshakeFailure),
        ) => refused_identity(identity, &format!("alert {alert:?}")),
        other => format!("TLS failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connections() -> Connections {
        let channel = Channel::from_static("http://127.0.0.1:7070").connect_lazy();
        Connections::new(
            vec![("http://127.0.0.1:7070".into(), channel)],
            Auth(None),
            (Duration::from_millis(10), Duration::from_millis(100)),
            WATCH_IDLE_TIMEOUT,
        )
    }

    #[test]
    fn tls_failures_say_which_of_three_it_is() {
        let says = |text: &str, identity| describe_tls_text(text, identity).unwrap_or_default();
        assert!(
            says("received corrupt message of type InvalidContentType", false)
                .contains("does not speak TLS")
        );
        assert!(
            says("invalid peer certificate: UnknownIssuer", false)
                .contains("not trusted (UnknownIssuer)")
        );
        assert!(
            says("received fatal alert: CertificateRequired", false)
                .contains("wants a client certificate")
        );
        assert!(
            says("received fatal alert: UnknownCA", true)
                .contains("does not accept this client certificate")
        );
        assert_eq!(describe_tls_text("connection refused", false), None);
    }

    #[tokio::test]
    async fn a_store_failure_the_registry_reports_is_not_an_unreachable_registry() {
        let conn = connections();
        let answered = Status::unavailable("store unavailable: etcd unreachable: no quorum");
        let error = conn.error(0, answered);
        assert!(
            matches!(&error, Error::StoreUnavailable { reason, .. } if reason == "etcd unreachable: no quorum"),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "the registry at http://127.0.0.1:7070 answered, but its store is unavailable: \
             etcd unreachable: no quorum"
        );
        assert!(error.is_transient());

        // A transport failure on this side is the registry's, whatever its message says.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let mut local = Status::unavailable("store unavailable: looks like the server's");
        local.set_source(std::sync::Arc::new(io));
        assert!(matches!(conn.error(0, local), Error::Unavailable { .. }));
        assert!(matches!(
            conn.error(0, Status::unavailable("server shutting down")),
            Error::Unavailable { .. }
        ));
    }
}
