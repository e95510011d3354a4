//! The etcd backend: several stateless Signpost servers over one etcd cluster.
//!
//! etcd holds the truth: one key per instance (the protobuf record of [`codec`](crate::codec)),
//! Signpost leases are etcd leases and Signpost revisions are etcd revisions, so any server can
//! answer any client and a watch resumed on another server continues from the same numbers.
//!
//! Each server follows the whole prefix with one etcd watch into a local replica (the same
//! [`State`] the other backends use, driven by etcd's revisions instead of its own). Reads,
//! Discover and every Watch stream are served from that replica and its change history, so a
//! thousand watchers cost etcd one watch, and a write returns once the replica has seen it
//! (read-your-writes on the server that took it).
//!
//! Why an instance went away is not something etcd records: a lease expiry and a delete look the
//! same in its watch. A deregister or an eviction therefore also writes the cause to one marker key
//! in the same transaction, so every server's watch sees the delete and the marker at one revision;
//! a delete without the marker is a lease expiry or revoke. The marker is a single key overwritten
//! each time, so it takes no space however many instances come and go.
//!
//! When etcd compacts past what the replica has seen (it was cut off for a while), the replica
//! loads a fresh copy and every subscriber of its feed gets a lag, which the server turns into a
//! reset of each watch: never a gap.
//!
//! Active health checks must run on one server at a time: [`Store::watch_checks`] answers only on
//! the server that holds the checker key (put on a short etcd lease), and its feed closes when that
//! server loses it.
//!
//! etcd is reached through [`members`]: one client per member, so that a dead member costs no
//! request. A request that failed before it was sent goes to another member at once. One that
//! may have been applied is sent again only where the write makes that safe; each write path
//! says why it is. Reads are served from the replica even while etcd cannot be followed (no
//! quorum): the replica holds the last state etcd agreed on, and etcd expires no lease without
//! a leader, so it is the best answer there is; writes then fail with `etcd unreachable`.

mod checker;
mod follow;
mod keys;
mod members;
mod refresh;
mod replica;
mod write;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use keys::Keys;
use members::{Failure, Members, Repeat};
use replica::Replica;

use crate::feed::ChangeFeed;
use crate::model::{Lease, LeaseId, Quota, Revision, ServiceList, Snapshot, Usage, Write, Written};
use crate::state::State;
use crate::{BoxFuture, Error, Result, Store, WatchStart};

/// How to reach etcd and where under it Signpost keeps its keys.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:port` of one or more cluster members.
    pub endpoints: Vec<String>,
    /// Every key Signpost writes starts with this; several registries can share one cluster
    /// under different prefixes.
    pub prefix: String,
    /// How many changes each server keeps for watches that resume from a revision.
    pub history_limit: usize,
    /// How many changes the feed holds for each subscriber before it counts as lagging.
    pub feed_capacity: usize,
    /// Longest wait for one etcd request.
    pub request_timeout: Duration,
    /// How long [`EtcdStore::connect`] waits for etcd before giving up.
    pub startup_timeout: Duration,
    /// The ttl of the lease on the checker key: a server that dies hands the health checks over
    /// to another one after about this long.
    pub checker_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/signpost/".into(),
            history_limit: 10_000,
            feed_capacity: 4_096,
            request_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(10),
            checker_ttl: Duration::from_secs(3),
        }
    }
}

fn unavailable(failure: Failure) -> Error {
    match failure {
        Failure::Answered(e) => Error::Unavailable(format!("etcd refused the request: {e}")),
        Failure::Unreachable(_) => Error::Unavailable(format!("etcd unreachable: {failure}")),
        Failure::Unknown(_) => Error::Unavailable(format!(
            "etcd unreachable: {failure}; the change may or may not have been made"
        )),
    }
}

fn failure_is_lease_not_found(failure: &Failure) -> bool {
    matches!(failure, Failure::Answered(e) if is_lease_not_found(e))
}

/// Whether etcd said the lease does not exist: the gRPC code etcd's `ErrGRPCLeaseNotFound`
/// answers with. (A refresh learns it from the ttl of 0 its answer carries instead.)
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::NotFound)
}

/// A store on an etcd cluster. Cheap to clone: clones share one replica and one connection.
#[derive(Debug, Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    members: Arc<Members>,
    keys: Keys,
    config: EtcdConfig,
    replica: Arc<Replica>,
    follower: JoinHandle<()>,
    /// The lease keep-alive streams, one per member, that every refresh shares.
    refresher: Arc<refresh::Refresher>,
    /// Refreshes etcd answered moments ago, which answer the ones that follow them.
    recent: refresh::Recent,
    /// While this server holds the checker key: true until it loses it.
    checker: tokio::sync::Mutex<Option<watch::Receiver<bool>>>,
    /// Taken by writes near a quota on this server, so that they queue here rather than refuse
    /// each other in etcd (see `write`).
    near_limit: tokio::sync::Mutex<()>,
    /// Tasks forwarding the checker's feed: they end with the store.
    tasks: Tasks,
}

/// Tasks a store owns: aborted when it is dropped. Finished ones are let go as new ones come.
#[derive(Debug, Default)]
struct Tasks(Mutex<Vec<JoinHandle<()>>>);

impl Tasks {
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(task));
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in self
            .0
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl EtcdStore {
    /// Connects to etcd and loads the replica; fails with [`Error::Unavailable`] when etcd cannot
    /// be reached within `startup_timeout`. Must be called inside a Tokio runtime.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(Error::Invalid {
                field: "etcd endpoints",
                reason: "at least one is needed".into(),
            });
        }
        let keys = Keys::new(&config.prefix);
        let members = Members::new(
            &config.endpoints,
            config.request_timeout,
            keys.checker.clone(),
        )
        .await
        .map_err(|reason| Error::Invalid {
            field: "etcd endpoints",
            reason,
        })?;
        let (feed, _) = broadcast::channel(config.feed_capacity.max(1));
        let replica = Arc::new(Replica {
            state: RwLock::new(State::replica(0, config.history_limit, [])),
            feed,
            applied: watch::Sender::new(0),
            health: watch::Sender::new(Err("not connected yet".into())),
        });
        let follower = tokio::spawn(follow::follow(
            Arc::downgrade(&replica),
            members.clone(),
            keys.clone(),
            config.history_limit,
            config.request_timeout,
        ));
        let store = EtcdStore {
            inner: Arc::new(Inner {
                members,
                keys,
                replica,
                follower,
                refresher: Arc::default(),
                recent: refresh::Recent::default(),
                checker: tokio::sync::Mutex::new(None),
                near_limit: tokio::sync::Mutex::new(()),
                tasks: Tasks::default(),
                config,
            }),
        };
        let mut health = store.inner.replica.health.subscribe();
        let ready = tokio::time::timeout(
            store.inner.config.startup_timeout,
            health.wait_for(|h| h.is_ok()),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !ready {
            let reason = match &*health.borrow() {
                Err(reason) => reason.clone(),
                Ok(()) => "no answer".into(),
            };
            return Err(Error::Unavailable(format!(
                "cannot reach etcd at {} within {:?}: {reason}",
                store.inner.config.endpoints.join(","),
                store.inner.config.startup_timeout
            )));
        }
        Ok(store)
    }

    /// A client of the etcd member this store uses now, for tools that need to look at etcd
    /// directly.
    pub fn client(&self) -> Client {
        self.inner.members.preferred().1
    }

    /// The latest a request started now may answer.
    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.config.request_timeout
    }

    fn replica(&self) -> &Replica {
        &self.inner.replica
    }
}

impl Store for EtcdStore {
    fn write(&self, write: Write) -> BoxFuture<'_, Result<Written>> {
        Box::pin(self.write_instance(write))
    }

    fn grant_lease(&self, ttl: Duration, quota: Quota) -> BoxFuture<'_, Result<Lease>> {
        Box::pin(self.grant(ttl, quota))
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Option<Lease>>> {
        Box::pin(self.refresh(lease))
    }

    fn revoke_lease(&self, lease: LeaseId) -> BoxFuture<'_, Result<bool>> {
        Box::pin(self.revoke(lease))
    }

    fn lease_namespace(&self, lease: LeaseId) -> BoxFuture<'_, Result<Option<String>>> {
        let known = self
            .replica()
            .read()
            .lease_namespace(lease)
            .map(str::to_owned);
        Box::pin(async move { Ok(known) })
    }

    fn list(&self, namespace: &str, service: &str) -> Result<Snapshot> {
        Ok(self.replica().read().list(namespace, service))
    }

    fn list_services(&self, namespace: &str) -> Result<ServiceList> {
        Ok(self.replica().read().list_services(namespace))
    }

    fn usage(&self, namespace: &str, service: &str) -> Result<Usage> {
        Ok(self.replica().read().usage(namespace, service))
    }

    fn changes(&self) -> ChangeFeed {
        ChangeFeed::new(self.replica().feed.subscribe())
    }

    fn watch<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
        after: Option<Revision>,
    ) -> BoxFuture<'a, Result<WatchStart>> {
        Box::pin(async move {
            // Like every read, served from the replica even while etcd cannot be followed.
            if let Some(after) = after {
                // A client moving over from another server may have seen a revision this one
                // has not applied yet; a moment's wait turns what would be a reset into a replay.
                let mut applied = self.replica().applied.subscribe();
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), applied.wait_for(|r| *r >= after))
                        .await;
            }
            Ok(self.replica().read().watch_start(namespace, service, after))
        })
    }

    fn watch_checks(&self) -> BoxFuture<'_, Result<(Snapshot, ChangeFeed)>> {
        Box::pin(self.checks())
    }

    fn serving(&self) -> Option<watch::Receiver<std::result::Result<(), String>>> {
        Some(self.replica().health.subscribe())
    }
}

impl EtcdStore {
    async fn grant(&self, ttl: Duration, quota: Quota) -> Result<Lease> {
        self.replica().check()?;
        // Counted from the replica: leases that hold instances. A first refusal here; the one that
        // holds under racing writers is made with each lease's first instance (see `write`).
        quota.admit_lease(self.replica().read().usage("", "").leases)?;
        if ttl.is_zero() {
            return Err(Error::Invalid {
                field: "ttl",
                reason: "must be greater than zero".into(),
            });
        }
        // etcd counts in whole seconds; round up so a lease never lives shorter than asked.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let asked = i64::try_from(secs).unwrap_or(i64::MAX);
        // Safe to repeat: a grant whose answer was lost leaves a lease that no key is attached
        // to and nobody refreshes, which etcd expires after its ttl.
        let resp = self
            .inner
            .members
            .call(Repeat::Safe, self.deadline(), |client| async move {
                client.lease_client().grant(asked, None).await
            })
            .await
            .map_err(unavailable)?;
        let id = LeaseId::try_from(resp.id())
            .map_err(|_| Error::Unavailable(format!("etcd granted lease {}", resp.id())))?;
        // etcd may raise a ttl below its minimum; the granted one is what clients must follow.
        let ttl = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(secs));
        Ok(Lease { id, ttl })
    }

    async fn refresh(&self, lease: LeaseId) -> Result<Option<Lease>> {
        self.replica().check()?;
        let Ok(id) = i64::try_from(lease) else {
            return Ok(None);
        };
        if let Some(ttl) = self.inner.recent.answer(id) {
            return Ok(Some(Lease { id: lease, ttl }));
        }
        let refresher = &self.inner.refresher;
        let sent = tokio::time::Instant::now();
        // Safe to repeat: two refreshes in a row are one refresh. Each goes on the member's one
        // shared keep-alive stream, and its answer carries the lease's granted ttl.
        let refreshed = self
            .inner
            .members
            .call_on(Repeat::Safe, self.deadline(), |member, client| {
                refresher.refresh(member, client, id)
            })
            .await
            .map_err(unavailable)?;
        let Some(secs) = refreshed.and_then(|ttl| u64::try_from(ttl).ok()) else {
            self.inner.recent.forget(id);
            return Ok(None);
        };
        let ttl = Duration::from_secs(secs);
        self.inner.recent.renewed(id, sent, ttl);
        Ok(Some(Lease { id: lease, ttl }))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<bool> {
        self.replica().check()?;
        let Ok(id) = i64::try_from(lease) else {
            return Ok(false);
        };
        // From now on a refresh must ask etcd, which says whether the revoke took.
        self.inner.recent.forget(id);
        let deadline = self.deadline();
        let revoke = || {
            self.inner
                .members
                .call(Repeat::Never, deadline, |client| async move {
                    client.lease_client().revoke(id).await
                })
        };
        // Safe to repeat once: a second revoke of a revoked lease changes nothing, and its
        // "not found" then means the first one did it (or the lease ran out meanwhile, which
        // leaves the same state).
        let revoked = match revoke().await {
            Err(Failure::Unknown(_)) => match revoke().await {
                Err(e) if failure_is_lease_not_found(&e) => Ok(()),
                other => other.map(|_| ()),
            },
            other => other.map(|_| ()),
        };
        match revoked {
            Ok(()) => Ok(true),
            Err(e) if failure_is_lease_not_found(&e) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn checks(&self) -> Result<(Snapshot, ChangeFeed)> {
        let mut held = self.campaign().await?;
        let state = self.replica().read();
        let mut source = ChangeFeed::new(self.replica().feed.subscribe());
        let snapshot = state.checked();
        drop(state);
        // The checker's own feed, which closes when this server stops being the checker.
        let (tx, rx) = broadcast::channel(self.inner.config.feed_capacity.max(1));
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = held.wait_for(|h| !*h) => return,
                    _ = tx.closed() => return,
                    item = source.next() => match item {
                        crate::FeedItem::Change(change) => { let _ = tx.send(change); }
                        crate::FeedItem::Lagged => { let _ = tx.send(ChangeFeed::reset_marker(0)); }
                        crate::FeedItem::Closed => return,
                    },
                }
            }
        });
        Ok((snapshot, ChangeFeed::new(rx)))
    }
}
