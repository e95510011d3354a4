//! `signpost.v1.RegistryService` over a [`Store`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prost::Message;
use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_server::RegistryService;
use signpost_store::{InstanceKey, Store};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::Config;
use crate::auth::{Principal, Verb};
use crate::convert::{duration_from_pb, duration_to_pb, instance_from_pb, instance_to_pb};
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::hub::Hub;
use crate::validate;
use crate::watch::{WatchReceiver, WatchTask};

/// The shortest lease ttl: shorter leases cannot be kept alive reliably over a real network.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest lease ttl; an instance that should outlive this is registered without a ttl.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The registry service. Cheap to clone; clones share the store and the shutdown signal.
#[derive(Debug)]
pub struct Registry<S> {
    store: Arc<S>,
    config: Arc<Config>,
    shutdown: CancellationToken,
    watches: Arc<Semaphore>,
    per_connection: PerConnection,
    /// Routes changes to each service's watch streams; started with the first watch.
    hub: Arc<OnceLock<Arc<Hub>>>,
}

impl<S> Clone for Registry<S> {
    fn clone(&self) -> Self {
        Registry {
            store: self.store.clone(),
            config: self.config.clone(),
            shutdown: self.shutdown.clone(),
            watches: self.watches.clone(),
            per_connection: self.per_connection.clone(),
            hub: self.hub.clone(),
        }
    }
}

/// Open watch streams per client connection (keyed by its remote address).
type PerConnection = Arc<Mutex<HashMap<SocketAddr, usize>>>;

/// A watch stream's places under the limits; dropping it frees them.
#[derive(Debug)]
pub(crate) struct WatchSlots {
    _total: OwnedSemaphorePermit,
    connection: Option<(SocketAddr, PerConnection)>,
}

impl Drop for WatchSlots {
    fn drop(&mut self) {
        if let Some((addr, counts)) = &self.connection {
            let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = counts.get_mut(addr) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(addr);
                }
            }
        }
    }
}

/// Whether `principal` (when the server checks tokens) may `verb` in `namespace`.
fn allow(principal: Option<&Principal>, verb: Verb, namespace: &str) -> Result<()> {
    principal.map_or(Ok(()), |p| p.check(verb, namespace))
}

impl<S: Store> Registry<S> {
    pub fn new(store: Arc<S>, config: Config) -> Self {
        Registry {
            store,
            watches: Arc::new(Semaphore::new(config.limits.max_watches)),
            per_connection: Arc::default(),
            hub: Arc::default(),
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
        }
    }

    /// The token a request carries, when the server checks tokens. Checked before anything
    /// else, so that a stranger learns nothing, not even whether the request was well formed.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Option<Principal>> {
        let Some(tokens) = &self.config.auth else {
            return Ok(None);
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        tokens.authenticate(header).map(Some)
    }

    /// Takes a place for one more watch stream, or says which limit is full.
    fn watch_slots(&self, remote: Option<SocketAddr>) -> Result<WatchSlots> {
        let limits = &self.config.limits;
        let total = self
            .watches
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::limit("max_watches", limits.max_watches, ""))?;
        let connection = match remote {
            None => None,
            Some(addr) => {
                let mut counts = self
                    .per_connection
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let n = counts.entry(addr).or_insert(0);
                if *n >= limits.max_watches_per_connection {
                    return Err(Error::limit(
                        "max_watches_per_connection",
                        limits.max_watches_per_connection,
                        "",
                    ));
                }
                *n += 1;
                Some((addr, self.per_connection.clone()))
            }
        };
        Ok(WatchSlots {
            _total: total,
            connection,
        })
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

    async fn do_register(
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
        let existing = self.store.get(&instance.key()).await?;
        self.check_owner(principal.as_ref(), existing.as_deref())?;
        instance.owner = principal.map(|p| p.name.to_string());
        let limits = &self.config.limits;
        if existing.is_none() || ttl.is_some() {
            let sizes = self
                .store
                .sizes(&instance.namespace, &instance.service)
                .await?;
            if existing.is_none() {
                let at = format!(" in {}/{}", instance.namespace, instance.service);
                if sizes.service_instances >= limits.max_instances_per_service {
                    return Err(Error::limit(
                        "max_instances_per_service",
                        limits.max_instances_per_service,
                        &at,
                    ));
                }
                if sizes.namespace_instances >= limits.max_instances_per_namespace {
                    let at = format!(" in namespace {}", instance.namespace);
                    return Err(Error::limit(
                        "max_instances_per_namespace",
                        limits.max_instances_per_namespace,
                        &at,
                    ));
                }
            }
            if ttl.is_some() && sizes.leases >= limits.max_leases {
                return Err(Error::limit("max_leases", limits.max_leases, ""));
            }
        }
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
                let lease = self.store.grant_lease(ttl).await?;
                self.store_write("grant_lease", started);
                Some(lease)
            }
            (None, 0) => None,
            // Joining a lease is a sign of life from its owner, so it refreshes the lease; that
            // also tells us its ttl and whether it is still live.
            (None, id) => Some(
                self.store
                    .keep_alive(id)
                    .await?
                    .ok_or(signpost_store::Error::LeaseNotFound(id))?,
            ),
        };
        let started = Instant::now();
        let stored = match self.store.put(instance, lease.map(|l| l.id)).await {
            Ok(stored) => {
                self.store_write("put", started);
                stored
            }
            Err(e) => {
                if let (Some(lease), Some(_)) = (lease, ttl) {
                    // Do not leave the lease granted for this request behind, empty.
                    let _ = self.store.revoke_lease(lease.id).await;
                }
                return Err(e.into());
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

    /// Under strict ownership, only the token that registered an instance may change it.
    fn check_owner(
        &self,
        principal: Option<&Principal>,
        existing: Option<&signpost_store::Instance>,
    ) -> Result<()> {
        let (Some(principal), Some(existing)) = (principal, existing) else {
            return Ok(());
        };
        match &existing.owner {
            Some(owner) if self.config.strict_ownership && **owner != *principal.name => {
                Err(Error::PermissionDenied(format!(
                    "instance {}/{}/{} was registered with another token (strict ownership)",
                    existing.namespace, existing.service, existing.id
                )))
            }
            _ => Ok(()),
        }
    }

    async fn do_deregister(
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
        if self.config.strict_ownership && principal.is_some() {
            let existing = self.store.get(&key).await?;
            self.check_owner(principal.as_ref(), existing.as_deref())?;
        }
        let started = Instant::now();
        let deleted = self.store.delete(&key).await?;
        self.store_write("delete", started);
        Ok(pb::DeregisterResponse {
            existed: deleted.prev.is_some(),
            revision: deleted.revision,
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
        let snapshot = self.store.list(&filter.namespace, &filter.service).await?;
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
    ) -> Result<Response<crate::wire::DiscoverResponse>, Status> {
        self.timed("Discover", async {
            let principal = self.authenticate(&request)?;
            let (instances, revision) = self
                .do_discover(principal, request.into_inner(), crate::wire::encoded)
                .await?;
            let answer = crate::wire::DiscoverResponse {
                instances,
                revision,
            };
            crate::wire::fits(&answer, self.config.max_response_size)?;
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
        let list = self.store.list_services(&namespace).await?;
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
        let slots = self.watch_slots(remote)?;
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
            .hub
            .get_or_init(|| Hub::start(&*self.store))
            .subscribe(&task.filter.namespace, &task.filter.service);
        // The task owns the sending half: it ends when the client goes away (the receiver is
        // dropped), on shutdown, or when the store fails.
        tokio::spawn(task.run(topic));
        Ok(rx)
    }

    fn start_keep_alive(
        &self,
        mut inbound: Streaming<pb::KeepAliveRequest>,
    ) -> ReceiverStream<Result<pb::KeepAliveResponse, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let store = self.store.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tx.try_send(Err(Status::unavailable("the registry is shutting down: reconnect")));
                        return;
                    }
                    next = inbound.next() => match next {
                        Some(Ok(request)) => request,
                        // The client closed its side or the connection broke: nothing to answer.
                        Some(Err(_)) | None => return,
                    },
                };
                let answer = match request.lease_id {
                    0 => Ok(None),
                    id => store.keep_alive(id).await,
                };
                let response = match answer {
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
                    Err(e) => Err(Status::from(Error::from(e))),
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

#[tonic::async_trait]
impl<S: Store> RegistryService for Registry<S> {
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
            if let Some(principal) = self.authenticate(&request)? {
                principal.check_any(Verb::Write)?;
            }
            Ok(self.start_keep_alive(request.into_inner()))
        })
        .await
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn discover(
        &self,
        request: Request<pb::DiscoverRequest>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        self.timed("Discover", async {
            let principal = self.authenticate(&request)?;
            let (instances, revision) = self
                .do_discover(principal, request.into_inner(), instance_to_pb)
                .await?;
            Ok(pb::DiscoverResponse {
                instances,
                revision,
            })
        })
        .await
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
            crate::watch::Sent::Message(data) => {
                pb::WatchResponse::decode(data.get(5..).unwrap_or_default())
                    .map_err(|e| Status::internal(format!("cannot re-read a watch message: {e}")))
            }
            crate::watch::Sent::End(status) => Err(*status),
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
