//! `signpost.v1.RegistryService` over a [`Store`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_server::RegistryService;
use signpost_store::{InstanceKey, Store};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::Config;
use crate::convert::{duration_from_pb, duration_to_pb, instance_from_pb, instance_to_pb};
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::validate;
use crate::watch::WatchTask;

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
}

impl<S> Clone for Registry<S> {
    fn clone(&self) -> Self {
        Registry {
            store: self.store.clone(),
            config: self.config.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

impl<S: Store> Registry<S> {
    pub fn new(store: Arc<S>, config: Config) -> Self {
        Registry {
            store,
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
        }
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

    async fn do_register(&self, req: pb::RegisterRequest) -> Result<pb::RegisterResponse> {
        let instance = req
            .instance
            .ok_or_else(|| Error::invalid("instance", "is required"))?;
        let instance = instance_from_pb("instance", instance)?;
        let ttl = req.ttl.map(|d| duration_from_pb("ttl", d)).transpose()?;
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

    async fn do_deregister(&self, req: pb::DeregisterRequest) -> Result<pb::DeregisterResponse> {
        let namespace = validate::namespace("namespace", req.namespace)?;
        validate::service("service", &req.service)?;
        validate::id("id", &req.id)?;
        let key = InstanceKey {
            namespace,
            service: req.service,
            id: req.id,
        };
        let started = Instant::now();
        let deleted = self.store.delete(&key).await?;
        self.store_write("delete", started);
        Ok(pb::DeregisterResponse {
            existed: deleted.prev.is_some(),
            revision: deleted.revision,
        })
    }

    async fn do_discover(&self, req: pb::DiscoverRequest) -> Result<pb::DiscoverResponse> {
        let filter = Filter::new(
            req.namespace,
            req.service,
            req.tags,
            &req.selector,
            req.include_unhealthy,
        )?;
        let snapshot = self.store.list(&filter.namespace, &filter.service).await?;
        Ok(pb::DiscoverResponse {
            instances: snapshot
                .instances
                .iter()
                .filter(|i| filter.matches(i))
                .map(|i| instance_to_pb(i))
                .collect(),
            revision: snapshot.revision,
        })
    }

    async fn do_list_services(
        &self,
        req: pb::ListServicesRequest,
    ) -> Result<pb::ListServicesResponse> {
        let namespace = validate::namespace("namespace", req.namespace)?;
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

    fn start_watch(
        &self,
        req: pb::WatchRequest,
    ) -> Result<ReceiverStream<Result<pb::WatchResponse, Status>>> {
        let filter = Filter::new(
            req.namespace,
            req.service,
            req.tags,
            &req.selector,
            req.include_unhealthy,
        )?;
        let (tx, rx) = mpsc::channel(self.config.watch_buffer.max(1));
        let task = WatchTask {
            store: self.store.clone(),
            filter,
            start_revision: (req.start_revision != 0).then_some(req.start_revision),
            progress_interval: self.config.watch_progress_interval,
            shutdown: self.shutdown.clone(),
            metrics: self.config.metrics.clone(),
            tx,
        };
        // The task owns the sending half: it ends when the client goes away (the receiver is
        // dropped), on shutdown, or when the store fails.
        tokio::spawn(task.run());
        Ok(ReceiverStream::new(rx))
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
        self.timed("Register", self.do_register(request.into_inner()))
            .await
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.timed("Deregister", self.do_deregister(request.into_inner()))
            .await
    }

    type KeepAliveStream = ReceiverStream<Result<pb::KeepAliveResponse, Status>>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let stream = self.start_keep_alive(request.into_inner());
        self.timed("KeepAlive", async { Ok(stream) }).await
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn discover(
        &self,
        request: Request<pb::DiscoverRequest>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        self.timed("Discover", self.do_discover(request.into_inner()))
            .await
    }

    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    #[tracing::instrument(skip_all, level = "debug")]
    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let started = self.start_watch(request.into_inner());
        self.timed("Watch", async { started }).await
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.timed("ListServices", self.do_list_services(request.into_inner()))
            .await
    }
}
