//! `signpost.v1.RegistryService` over a [`Store`].

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prost::Message;
use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_server::RegistryService;
use signpost_store::{Condition, InstanceKey, RemovalCause, Store, Write, Written};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::Config;
use crate::auth::{Principal, Verb};
use crate::convert::{duration_from_pb, duration_to_pb, instance_from_pb, instance_to_pb};
use crate::encode;
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::hub::Hub;
use crate::limits::{WatchLimits, request_too_large, too_large_request};
use crate::selector::Selector;
use crate::validate;
use crate::view::Views;
use crate::watch::{Sent, WatchReceiver, WatchTask};

/// The shortest lease ttl: shorter leases cannot be kept alive reliably over a real network.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest lease ttl; an instance that should outlive this is registered without a ttl.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The registry service over a store, with the limits and settings of [`Config`]. Cheap to
/// clone; clones share the store and the shutdown signal. Mount it with
/// [`RegistryServer`](crate::RegistryServer).
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    shutdown: CancellationToken,
    watches: WatchLimits,
    /// Routes changes to each service's watch streams; started with the first watch.
    hub: Arc<OnceLock<Arc<Hub>>>,
    /// The live views of services followed for clients that keep none (xDS).
    views: Arc<OnceLock<Arc<Views>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Whether `principal` (when the server checks tokens) may `verb` in `namespace`.
fn allow(principal: Option<&Principal>, verb: Verb, namespace: &str) -> Result<()> {
    principal.map_or(Ok(()), |p| p.check(verb, namespace))
}

impl Registry {
    pub fn new(store: Arc<dyn Store>, config: Config) -> Self {
        Registry {
            store,
            watches: WatchLimits::new(&config.limits),
            hub: Arc::default(),
            views: Arc::default(),
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
        }
    }

    /// A stream's places under the watch limits (an ADS stream counts as a watch).
    pub(crate) fn watch_slots(
        &self,
        remote: Option<std::net::SocketAddr>,
    ) -> Result<crate::limits::WatchSlots> {
        self.watches.take(remote)
    }

    pub(crate) fn metrics(&self) -> Option<Arc<crate::metrics::Metrics>> {
        self.config.metrics.clone()
    }

    /// The largest request and response the service is built for.
    pub(crate) fn message_limits(&self) -> (usize, usize) {
        (self.config.max_request_size, self.config.max_response_size)
    }

    /// The token a request carries, when the server checks tokens. Checked before anything
    /// else, so that a stranger learns nothing, not even whether the request was well formed.
    pub(crate) fn authenticate<T>(&self, request: &Request<T>) -> Result<Option<Principal>> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.authenticate_header(header)
    }

    /// [`authenticate`](Self::authenticate) for an `authorization` header however it came.
    pub(crate) fn authenticate_header(&self, header: Option<&str>) -> Result<Option<Principal>> {
        let Some(tokens) = &self.config.auth else {
            return Ok(None);
        };
        tokens.authenticate(header).map(Some)
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Whether `principal` (when the server checks tokens) may `verb` in `namespace`.
    pub(crate) fn allow(
        &self,
        principal: Option<&Principal>,
        verb: Verb,
        namespace: &str,
    ) -> Result<()> {
        allow(principal, verb, namespace)
    }

    fn hub(&self) -> &Arc<Hub> {
        self.hub.get_or_init(|| Hub::start(self.store.clone()))
    }

    /// The live views of the services, shared by every stream that follows one.
    pub(crate) fn views(&self) -> Arc<Views> {
        self.views
            .get_or_init(|| {
                Arc::new(Views::new(
                    self.store.clone(),
                    self.hub().clone(),
                    self.shutdown.clone(),
                    self.config.metrics.clone(),
                ))
            })
            .clone()
    }

    /// Cancelling this token ends every Watch and KeepAlive stream with `UNAVAILABLE`, so that a
    /// graceful shutdown does not wait on streams that would otherwise never end.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs a handler body, turns its error into a status (the one place that does), and
    /// counts the call by method and code.
    async fn timed<T>(
        &self,
        method: &'static str,
        body: impl std::future::Future<Output = Result<T>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = body.await.map(Response::new).map_err(Status::from);
        if let Some(metrics) = &self.config.metrics {
            let code = result
                .as_ref()
                .map_or_else(Status::code, |_| tonic::Code::Ok);
            metrics.rpc(method, code, started);
        }
        result
    }

    fn store_write(&self, op: &'static str, started: Instant) {
        if let Some(metrics) = &self.config.metrics {
            metrics.store_write(op, started);
        }
    }

    pub(crate) async fn do_register(
        &self,
        principal: Option<Principal>,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse> {
        let instance = req
            .instance
            .ok_or_else(|| Error::invalid("instance", "is required"))?;
        let mut instance = instance_from_pb("instance", instance)?;
        allow(principal.as_ref(), Verb::Write, &instance.namespace)?;
        let ttl = req.ttl.map(|d| duration_from_pb("ttl", d)).transpose()?;
        if instance
            .check
            .as_ref()
            .is_some_and(|c| !c.probe.is_probed())
            && ttl.is_none()
            && req.lease_id == 0
        {
            return Err(Error::invalid(
                "instance.check.ttl",
                "needs a lease: register with a ttl (or lease_id), which each report refreshes",
            ));
        }
        instance.owner = principal.as_ref().map(|p| p.name.to_string());
        let condition = self.ownership(principal.as_ref());
        let quota = self.config.limits.quota();
        let lease = match (ttl, req.lease_id) {
            (Some(_), id) if id != 0 => {
                return Err(Error::invalid(
                    "lease_id",
                    "cannot be combined with ttl: set ttl to grant a new lease, or lease_id to join an existing one",
                ));
            }
            (Some(ttl), _) => {
                if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
                    return Err(Error::invalid(
                        "ttl",
                        format!(
                            "{ttl:?} is out of range: use 1s to 24h, or no ttl for a persistent instance"
                        ),
                    ));
                }
                let started = Instant::now();
                let lease = self.store.grant_lease(ttl, quota).await?;
                self.store_write("grant_lease", started);
                Some(lease)
            }
            (None, 0) => None,
            // Joining a lease is a sign of life from its owner, so it refreshes the lease; that
            // also tells us its ttl and whether it is still live. Only for a token that may keep
            // that lease alive, as a KeepAlive would be.
            (None, id) => Some(
                refresh(&*self.store, principal.as_ref(), id)
                    .await?
                    .ok_or(signpost_store::Error::LeaseNotFound(id))?,
            ),
        };
        let started = Instant::now();
        let put = Write::Put {
            instance,
            lease: lease.map(|l| l.id),
            condition,
            quota,
        };
        let stored = match self.store.write(put).await {
            Ok(Written::Stored(stored)) => {
                self.store_write("put", started);
                stored
            }
            Ok(other) => {
                return Err(Error::Store(signpost_store::Error::Unavailable(format!(
                    "the store answered a put with {other:?}"
                ))));
            }
            Err(e) => {
                if let (Some(lease), Some(_)) = (lease, ttl) {
                    // Do not leave the lease granted for this request behind, empty.
                    let _ = self.store.revoke_lease(lease.id).await;
                }
                return Err(ownership_error(e));
            }
        };
        tracing::debug!(service = %stored.service, id = %stored.id, revision = stored.mod_revision, "registered");
        Ok(pb::RegisterResponse {
            lease_id: stored.lease_id.unwrap_or(0),
            ttl: lease.map(|l| duration_to_pb(l.ttl)),
            revision: stored.mod_revision,
            instance: Some(instance_to_pb(&stored)),
        })
    }

    /// Records the status an instance with a ttl check reports of itself, and refreshes its
    /// lease: the report is its sign of life. `Ok(None)` when there is no such instance or its
    /// lease has run out; `Ok(Some)` with the instance as it stands after the report.
    pub(crate) async fn report(
        &self,
        principal: Option<&Principal>,
        instance: &signpost_store::Instance,
        health: signpost_store::Health,
        output: String,
    ) -> Result<Option<Arc<signpost_store::Instance>>> {
        allow(principal, Verb::Write, &instance.namespace)?;
        let Some(check) = instance.check.clone().filter(|c| !c.probe.is_probed()) else {
            return Err(Error::invalid(
                "check",
                format!(
                    "{}/{} has no ttl check: its health is probed by the registry",
                    instance.service, instance.id
                ),
            ));
        };
        // Under strict ownership a report is an update like any other: the owner's alone.
        if self.config.strict_ownership
            && let Some(p) = principal
            && !Condition::OwnedBy(p.name.to_string()).holds(Some(instance))
        {
            return Err(Error::PermissionDenied(format!(
                "instance {}/{}/{} was registered with another token (strict ownership)",
                instance.namespace, instance.service, instance.id
            )));
        }
        let Some(lease) = instance.lease_id else {
            return Ok(None);
        };
        if refresh(&*self.store, principal, lease).await?.is_none() {
            return Ok(None);
        }
        let started = Instant::now();
        let verdict = Write::Health(signpost_store::HealthUpdate {
            key: instance.key(),
            create_revision: instance.create_revision,
            check,
            health,
            output,
            checked_at: std::time::SystemTime::now(),
        });
        match self.store.write(verdict).await {
            Ok(Written::Stored(stored)) => {
                self.store_write("health", started);
                Ok(Some(stored))
            }
            Ok(_) => Ok(Some(Arc::new(instance.clone()))),
            // Registered anew or removed since it was read: the report was for what is gone.
            Err(signpost_store::Error::Conflict(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Under strict ownership, only the token that registered an instance may change it: the
    /// store judges that atomically with the write.
    fn ownership(&self, principal: Option<&Principal>) -> Condition {
        match principal {
            Some(p) if self.config.strict_ownership => Condition::OwnedBy(p.name.to_string()),
            _ => Condition::Always,
        }
    }

    pub(crate) async fn do_deregister(
        &self,
        principal: Option<Principal>,
        req: pb::DeregisterRequest,
    ) -> Result<pb::DeregisterResponse> {
        let namespace = validate::namespace("namespace", req.namespace)?;
        validate::service("service", &req.service)?;
        validate::id("id", &req.id)?;
        allow(principal.as_ref(), Verb::Write, &namespace)?;
        let key = InstanceKey {
            namespace,
            service: req.service,
            id: req.id,
        };
        let started = Instant::now();
        let delete = Write::Delete {
            key,
            cause: RemovalCause::Deregistered,
            condition: self.ownership(principal.as_ref()),
        };
        let deleted = self.store.write(delete).await.map_err(ownership_error)?;
        self.store_write("delete", started);
        Ok(pb::DeregisterResponse {
            existed: matches!(deleted, Written::Removed { .. }),
            revision: deleted.revision(),
        })
    }

    /// The instances a Discover asks for, each turned into `T`, and the revision they were read at.
    async fn do_discover<T>(
        &self,
        principal: Option<Principal>,
        req: pb::DiscoverRequest,
        each: impl Fn(&signpost_store::Instance) -> T,
    ) -> Result<(Vec<T>, u64)> {
        let filter = Filter::new(
            req.namespace,
            req.service,
            req.tags,
            &req.selector,
            req.include_unhealthy,
        )?;
        allow(principal.as_ref(), Verb::Read, &filter.namespace)?;
        let snapshot = self.store.list(&filter.namespace, &filter.service)?;
        let instances = snapshot
            .instances
            .iter()
            .filter(|i| filter.matches(i))
            .map(|i| each(i))
            .collect();
        Ok((instances, snapshot.revision))
    }

    /// Watch as the server answers it: the stream's frames, made by its task (see `watch`).
    pub(crate) async fn watch_frames(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<WatchReceiver, Status> {
        let started = self.start_watch(request);
        Ok(self.timed("Watch", async { started }).await?.into_inner())
    }

    /// Discover as the server answers it: from each instance's cached encoding (see `wire`).
    pub(crate) async fn discover_encoded(
        &self,
        request: Request<pb::DiscoverRequest>,
    ) -> Result<Response<encode::DiscoverResponse>, Status> {
        self.timed("Discover", async {
            let principal = self.authenticate(&request)?;
            let (instances, revision) = self
                .do_discover(principal, request.into_inner(), encode::encoded)
                .await?;
            let answer = encode::DiscoverResponse {
                instances,
                revision,
            };
            encode::fits(&answer, self.config.max_response_size)?;
            Ok(answer)
        })
        .await
    }

    async fn do_list_services(
        &self,
        principal: Option<Principal>,
        req: pb::ListServicesRequest,
    ) -> Result<pb::ListServicesResponse> {
        let namespace = validate::namespace("namespace", req.namespace)?;
        allow(principal.as_ref(), Verb::Read, &namespace)?;
        let selector = Selector::parse(&req.selector).map_err(|e| {
            Error::invalid("selector", format!("{:?} is invalid: {e}", req.selector))
        })?;
        let mut list = self.store.list_services(&namespace)?;
        if !selector.is_empty() {
            // Each service is read on its own; one that emptied in between is left out.
            let mut kept = Vec::with_capacity(list.services.len());
            for mut summary in list.services {
                let instances = self.store.list(&namespace, &summary.name)?.instances;
                let matching = instances.iter().filter(|i| selector.matches(&i.metadata));
                let (all, healthy) = matching.fold((0u32, 0u32), |(all, healthy), i| {
                    (all + 1, healthy + u32::from(i.health.is_healthy()))
                });
                if all > 0 {
                    summary.instances = all;
                    summary.healthy = healthy;
                    kept.push(summary);
                }
            }
            list.services = kept;
        }
        Ok(pb::ListServicesResponse {
            services: list
                .services
                .into_iter()
                .map(|s| pb::ServiceSummary {
                    name: s.name,
                    instances: s.instances,
                    healthy: s.healthy,
                })
                .collect(),
            revision: list.revision,
        })
    }

    fn start_watch(&self, request: Request<pb::WatchRequest>) -> Result<WatchReceiver> {
        let principal = self.authenticate(&request)?;
        let remote = request.remote_addr();
        let req = request.into_inner();
        let filter = Filter::new(
            req.namespace,
            req.service,
            req.tags,
            &req.selector,
            req.include_unhealthy,
        )?;
        allow(principal.as_ref(), Verb::Read, &filter.namespace)?;
        let slots = self.watches.take(remote)?;
        let (tx, rx) = mpsc::channel(self.config.watch_buffer.max(1));
        let task = WatchTask {
            store: self.store.clone(),
            filter,
            start_revision: (req.start_revision != 0).then_some(req.start_revision),
            progress_interval: self.config.watch_progress_interval,
            shutdown: self.shutdown.clone(),
            metrics: self.config.metrics.clone(),
            max_message: self.config.max_response_size,
            tx,
            _slots: slots,
        };
        let topic = self
            .hub()
            .subscribe(&task.filter.namespace, &task.filter.service);
        // The task owns the sending half: it ends when the client goes away (the receiver is
        // dropped), on shutdown, or when the store fails.
        tokio::spawn(task.run(topic));
        Ok(rx)
    }

    fn start_keep_alive(
        &self,
        principal: Option<Principal>,
        mut inbound: Streaming<pb::KeepAliveRequest>,
    ) -> ReceiverStream<Result<pb::KeepAliveResponse, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let store = self.store.clone();
        let shutdown = self.shutdown.clone();
        let max_request = self.config.max_request_size;
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tx.try_send(Err(Status::unavailable("the registry is shutting down: reconnect")));
                        return;
                    }
                    next = inbound.next() => match next {
                        Some(Ok(request)) => request,
                        Some(Err(status)) if request_too_large(&status) => {
                            let _ = tx.send(Err(Status::from(too_large_request(max_request)))).await;
                            return;
                        }
                        // The client closed its side or the connection broke: nothing to answer.
                        Some(Err(_)) | None => return,
                    },
                };
                let response = match refresh(&*store, principal.as_ref(), request.lease_id).await {
                    Ok(Some(lease)) => Ok(pb::KeepAliveResponse {
                        lease_id: lease.id,
                        ttl: Some(duration_to_pb(lease.ttl)),
                        expired: false,
                    }),
                    Ok(None) => Ok(pb::KeepAliveResponse {
                        lease_id: request.lease_id,
                        ttl: Some(duration_to_pb(Duration::ZERO)),
                        expired: true,
                    }),
                    Err(e) => Err(Status::from(e)),
                };
                let failed = response.is_err();
                if tx.send(response).await.is_err() || failed {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Refreshes a lease for `principal`: only a token that may write the namespace whose instances
/// the lease holds may keep it alive (a lease that holds none keeps nothing visible alive).
async fn refresh(
    store: &dyn Store,
    principal: Option<&Principal>,
    lease: signpost_store::LeaseId,
) -> Result<Option<signpost_store::Lease>> {
    if lease == 0 {
        return Ok(None);
    }
    if let Some(principal) = principal
        && let Some(namespace) = store.lease_namespace(lease).await?
    {
        principal.check(Verb::Write, &namespace)?;
    }
    Ok(store.keep_alive(lease).await?)
}

/// A refused ownership condition is the caller's token not being the owner's.
fn ownership_error(e: signpost_store::Error) -> Error {
    match e {
        signpost_store::Error::Conflict(reason) => Error::PermissionDenied(reason),
        other => Error::Store(other),
    }
}

#[tonic::async_trait]
impl RegistryService for Registry {
    #[tracing::instrument(skip_all, level = "debug")]
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.timed("Register", async {
            let principal = self.authenticate(&request)?;
            self.do_register(principal, request.into_inner()).await
        })
        .await
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.timed("Deregister", async {
            let principal = self.authenticate(&request)?;
            self.do_deregister(principal, request.into_inner()).await
        })
        .await
    }

    type KeepAliveStream = ReceiverStream<Result<pb::KeepAliveResponse, Status>>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        self.timed("KeepAlive", async {
            let principal = self.authenticate(&request)?;
            if let Some(principal) = &principal {
                principal.check_any(Verb::Write)?;
            }
            Ok(self.start_keep_alive(principal, request.into_inner()))
        })
        .await
    }

    /// The generated type, for callers of this trait directly; the server itself answers with
    /// the encoded answer of `discover_encoded`, and this decodes it.
    #[tracing::instrument(skip_all, level = "debug")]
    async fn discover(
        &self,
        request: Request<pb::DiscoverRequest>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        let answer = self.discover_encoded(request).await?.into_inner();
        pb::DiscoverResponse::decode(answer.encode_to_vec().as_slice())
            .map(Response::new)
            .map_err(|e| Status::internal(format!("cannot re-read a Discover answer: {e}")))
    }

    /// The generated types, for callers of this trait directly; the server itself sends Watch
    /// as frames (`watch_frames`), and this decodes them.
    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::WatchResponse, Status>> + Send>,
    >;

    #[tracing::instrument(skip_all, level = "debug")]
    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let frames = ReceiverStream::new(self.watch_frames(request).await?);
        let decoded = frames.map(|sent| match sent {
            Sent::Message(data) => pb::WatchResponse::decode(data.get(5..).unwrap_or_default())
                .map_err(|e| Status::internal(format!("cannot re-read a watch message: {e}"))),
            Sent::End(status) => Err(*status),
        });
        Ok(Response::new(Box::pin(decoded)))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.timed("ListServices", async {
            let principal = self.authenticate(&request)?;
            self.do_list_services(principal, request.into_inner()).await
        })
        .await
    }
}
