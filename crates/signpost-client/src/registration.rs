//! Self-registration: register, keep the lease alive, register again when the registry lost it,
//! deregister on the way out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use signpost_proto::v1 as pb;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::Client;
use crate::connections::Connections;
use crate::keepalive::KeepAlives;
use crate::types::{HealthCheck, check_to_pb, duration_to_pb};
use crate::{Error, Result};

/// Where a [`Registration`] stands, for the owner's own health endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// Registered on `lease_id` and kept alive.
    Registered { lease_id: u64 },
    /// Not registered right now; trying again (the reason says why).
    Retrying { reason: String },
    /// Lost its lease and could not register again for a reason retrying cannot fix (a limit
    /// reached, a token no longer good); nothing more is tried. The reason says which.
    Failed { reason: String },
    /// Deregistered or dropped; nothing more will happen.
    Stopped,
}

/// What to register. `service`, `address` and `port` are required.
#[derive(Debug, Clone)]
pub struct RegistrationBuilder {
    namespace: String,
    service: String,
    id: Option<String>,
    address: String,
    port: u16,
    tags: Vec<String>,
    metadata: BTreeMap<String, String>,
    weight: u32,
    zone: String,
    ttl: Duration,
    check: Option<HealthCheck>,
}

impl RegistrationBuilder {
    /// An instance of `service` with a 10 s ttl in the default namespace.
    pub fn new(service: impl Into<String>) -> Self {
        RegistrationBuilder {
            namespace: String::new(),
            service: service.into(),
            id: None,
            address: String::new(),
            port: 0,
            tags: Vec::new(),
            metadata: BTreeMap::new(),
            weight: 0,
            zone: String::new(),
            ttl: Duration::from_secs(10),
            check: None,
        }
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The instance id; by default `ADDRESS-PORT` in the registry's alphabet.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }

    /// How long the registry keeps the instance without hearing from it (default 10 s). The
    /// lease is refreshed at about a third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// An active health check for the registry to run against the instance.
    pub fn check(mut self, check: HealthCheck) -> Self {
        self.check = Some(check);
        self
    }

    fn default_id(&self) -> String {
        format!("{}-{}", self.address, self.port)
            .chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '-' | '.' | '_') => c,
                _ => '-',
            })
            .collect()
    }

    fn request(&self) -> pb::RegisterRequest {
        pb::RegisterRequest {
            instance: Some(pb::Instance {
                namespace: self.namespace.clone(),
                service: self.service.clone(),
                id: self.id.clone().unwrap_or_else(|| self.default_id()),
                address: self.address.clone(),
                port: u32::from(self.port),
                tags: self.tags.clone(),
                metadata: self.metadata.clone().into_iter().collect(),
                weight: self.weight,
                zone: self.zone.clone(),
                check: self.check.as_ref().map(check_to_pb),
                ..Default::default()
            }),
            ttl: Some(duration_to_pb(self.ttl)),
            lease_id: 0,
        }
    }
}

/// A live registration. Dropping it stops the keep-alive and deregisters on a best-effort basis;
/// [`Registration::deregister`] does it and says how it went.
#[derive(Debug)]
pub struct Registration {
    namespace: String,
    service: String,
    id: String,
    state: watch::Receiver<RegistrationState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<bool>>>,
}

impl Registration {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The current state.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// Follows state changes.
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Stops keeping the lease alive and deregisters; `true` when the instance existed.
    pub async fn deregister(mut self) -> Result<bool> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|_| Error::Stopped)?,
            None => Err(Error::Stopped),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // The task sees the stop and deregisters on its own; nothing to wait for here.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Client {
    /// Registers an instance and keeps it registered: its lease is refreshed on this client's
    /// shared KeepAlive stream, and when the registry reports it expired (a restart, a partition
    /// longer than the ttl) it is registered again. Returns once the first registration
    /// succeeded; transient failures until then (an unreachable or restarting registry) are
    /// retried with backoff. A refusal that retrying cannot fix comes back at once: input the
    /// registry refuses as [`Error::InvalidArgument`], a limit reached as
    /// [`Error::ResourceExhausted`], a missing or insufficient token as
    /// [`Error::Unauthenticated`] or [`Error::PermissionDenied`], anything else as
    /// [`Error::Status`]. Should registering again later be refused that way, the registration
    /// stops trying and its state says [`RegistrationState::Failed`].
    pub async fn register(&self, registration: RegistrationBuilder) -> Result<Registration> {
        if registration.service.is_empty()
            || registration.address.is_empty()
            || registration.port == 0
        {
            return Err(Error::InvalidArgument(
                "a registration needs a service, an address and a port".into(),
            ));
        }
        let request = registration.request();
        let mut backoff = self.conn.new_backoff();
        let lease_id = loop {
            match register_once(&self.conn, &request).await {
                Ok(lease) => break lease,
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(service = %registration.service, error = %e, ?delay, "cannot register yet; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        };
        let instance = request.instance.clone().unwrap_or_default();
        tracing::info!(service = %instance.service, id = %instance.id, lease = lease_id, "registered");
        let (state_tx, state) = watch::channel(RegistrationState::Registered { lease_id });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep_registered(
            self.conn.clone(),
            self.keep_alives(),
            request,
            registration.ttl,
            lease_id,
            state_tx,
            stopped,
        ));
        Ok(Registration {
            namespace: instance.namespace,
            service: instance.service,
            id: instance.id,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }
}

impl Client {
    /// Registers a persistent instance: no lease, nothing kept alive; it stays until it is
    /// deregistered. The registration's ttl is ignored.
    pub async fn register_persistent(
        &self,
        registration: RegistrationBuilder,
    ) -> Result<crate::Instance> {
        let mut request = registration.request();
        request.ttl = None;
        let answer = self
            .conn
            .unary(|mut c| {
                let request = request.clone();
                async move { c.register(request).await }
            })
            .await?;
        answer
            .instance
            .map(crate::types::instance_from_pb)
            .ok_or_else(|| {
                Error::Status(tonic::Status::internal(
                    "the registry answered without the instance",
                ))
            })
    }
}

async fn register_once(conn: &Connections, request: &pb::RegisterRequest) -> Result<u64> {
    let answer = conn
        .unary(|mut c| {
            let request = request.clone();
            async move { c.register(request).await }
        })
        .await?;
    Ok(answer.lease_id)
}

/// Where a registration stands in the background.
enum State {
    /// Registered on `lease`, kept alive on the shared stream; `expired` fires when the registry
    /// reports the lease gone.
    Registered {
        lease: u64,
        expired: oneshot::Receiver<()>,
    },
    /// The lease is gone; the next attempt to register again starts at `retry_at`.
    Reregistering { retry_at: Instant },
    /// Registering again was refused for a reason retrying cannot fix. Nothing is kept alive; the
    /// owner learns it from [`RegistrationState::Failed`] and only a stop is awaited.
    Failed,
    /// The owner stopped the registration: deregister (unless it had failed) and end.
    Stopping { deregister: bool },
}

async fn keep_registered(
    conn: Arc<Connections>,
    keep_alives: KeepAlives,
    request: pb::RegisterRequest,
    ttl: Duration,
    lease_id: u64,
    state_tx: watch::Sender<RegistrationState>,
    mut stopped: oneshot::Receiver<()>,
) -> Result<bool> {
    let instance = request.instance.clone().unwrap_or_default();
    let every = (ttl / 3).max(Duration::from_millis(100));
    let mut backoff = conn.new_backoff();
    let keep_alive = |lease: u64| {
        let (expired_tx, expired) = oneshot::channel();
        keep_alives.add(lease, every, expired_tx);
        State::Registered { lease, expired }
    };
    let mut state = keep_alive(lease_id);
    loop {
        state = match state {
            State::Registered { lease, mut expired } => tokio::select! {
                _ = &mut stopped => {
                    keep_alives.remove(lease);
                    State::Stopping { deregister: true }
                }
                _ = &mut expired => {
                    tracing::warn!(service = %instance.service, id = %instance.id, lease, "registration lost (lease expired); registering again");
                    let _ = state_tx.send(RegistrationState::Retrying {
                        reason: "the lease expired".into(),
                    });
                    State::Reregistering { retry_at: Instant::now() }
                }
            },
            State::Reregistering { retry_at } => tokio::select! {
                // An attempt cut short may have registered all the same: deregister.
                _ = &mut stopped => State::Stopping { deregister: true },
                result = async {
                    tokio::time::sleep_until(retry_at).await;
                    register_once(&conn, &request).await
                } => match result {
                    Ok(lease) => {
                        backoff.reset();
                        tracing::info!(service = %instance.service, id = %instance.id, lease, "registered again");
                        let _ = state_tx.send(RegistrationState::Registered { lease_id: lease });
                        keep_alive(lease)
                    }
                    Err(e) if e.is_transient() => {
                        let delay = backoff.next_delay();
                        tracing::warn!(service = %instance.service, error = %e, ?delay, "cannot register again yet; retrying");
                        let _ = state_tx.send(RegistrationState::Retrying { reason: e.to_string() });
                        State::Reregistering { retry_at: Instant::now() + delay }
                    }
                    Err(e) => {
                        tracing::error!(service = %instance.service, id = %instance.id, error = %e, "cannot register again; giving up");
                        let _ = state_tx.send(RegistrationState::Failed { reason: e.to_string() });
                        State::Failed
                    }
                },
            },
            State::Failed => {
                let _ = (&mut stopped).await;
                State::Stopping { deregister: false }
            }
            State::Stopping { deregister } => {
                return stop(&conn, &instance, deregister, &state_tx).await;
            }
        };
    }
}

/// Deregisters on the way out. After a failure the registry has refused this instance, so there
/// is nothing of it to remove, and a call made with the same refused token would only fail.
async fn stop(
    conn: &Connections,
    instance: &pb::Instance,
    deregister: bool,
    state: &watch::Sender<RegistrationState>,
) -> Result<bool> {
    let _ = state.send(RegistrationState::Stopped);
    if !deregister {
        tracing::info!(service = %instance.service, id = %instance.id, "stopped after registering again failed; nothing to deregister");
        return Ok(false);
    }
    let request = pb::DeregisterRequest {
        namespace: instance.namespace.clone(),
        service: instance.service.clone(),
        id: instance.id.clone(),
    };
    let result = conn
        .unary(|mut c| {
            let request = request.clone();
            async move { c.deregister(request).await }
        })
        .await
        .map(|answer| answer.existed);
    match &result {
        Ok(_) => tracing::info!(service = %instance.service, id = %instance.id, "deregistered"),
        Err(e) => {
            tracing::warn!(service = %instance.service, id = %instance.id, error = %e, "deregister failed; the lease will expire")
        }
    }
    result
}
