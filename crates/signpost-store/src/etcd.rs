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

mod members;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use members::{Failure, Members, Repeat};

use crate::codec::{decode_instance, encode_instance, key_bytes};
use crate::feed::ChangeFeed;
use crate::model::{
    Change, Counts, Deleted, Event, Health, Instance, InstanceKey, Lease, LeaseId, RemovalCause,
    Revision, ServiceList, Snapshot,
};
use crate::state::State;
use crate::{Error, HealthUpdate, Result, Store, Watch};

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

/// The keys under the prefix.
#[derive(Debug, Clone)]
struct Keys {
    /// Everything Signpost writes; the replica's watch covers this range.
    all: Vec<u8>,
    /// Instance keys start with this, followed by [`key_bytes`].
    instances: Vec<u8>,
    /// The removal-cause marker.
    removal: Vec<u8>,
    /// Held by the server that runs the health checks.
    checker: Vec<u8>,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let all = prefix.as_bytes().to_vec();
        let with = |suffix: &str| [prefix.as_bytes(), suffix.as_bytes()].concat();
        Keys {
            instances: with("instances/"),
            removal: with("removal"),
            checker: with("checker"),
            all,
        }
    }

    fn instance(&self, key: &InstanceKey) -> Vec<u8> {
        [self.instances.as_slice(), &key_bytes(key)].concat()
    }

    fn instance_key(&self, etcd_key: &[u8]) -> Option<InstanceKey> {
        let rest = std::str::from_utf8(etcd_key.strip_prefix(self.instances.as_slice())?).ok()?;
        let mut parts = rest.splitn(3, '\0');
        Some(InstanceKey {
            namespace: parts.next()?.to_owned(),
            service: parts.next()?.to_owned(),
            id: parts.next()?.to_owned(),
        })
    }
}

fn cause_bytes(cause: RemovalCause) -> &'static [u8] {
    match cause {
        RemovalCause::Deregistered => b"deregistered",
        RemovalCause::Expired => b"expired",
        RemovalCause::Unhealthy => b"unhealthy",
    }
}

fn cause_from(bytes: &[u8]) -> RemovalCause {
    match bytes {
        b"deregistered" => RemovalCause::Deregistered,
        b"unhealthy" => RemovalCause::Unhealthy,
        _ => RemovalCause::Expired,
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

/// What a compare-and-swap transaction came to.
enum Cas {
    /// The compare held and the transaction applied, in this attempt.
    Applied(TxnResponse),
    /// The compare failed. `repeated`: an earlier attempt may have been applied, and this
    /// refusal may be that attempt's own doing (its change made the compare fail); the
    /// response holds the `or_else` reads, from which each write tells.
    Refused { resp: TxnResponse, repeated: bool },
}

/// The key-values an `or_else` get of a refused transaction read.
fn else_kv(resp: &TxnResponse) -> Option<KeyValue> {
    resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().cloned(),
        _ => None,
    })
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound || status.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(reason) => reason.contains("lease not found"),
        _ => false,
    }
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .and_then(|h| Revision::try_from(h.revision()).ok())
        .ok_or_else(|| Error::Unavailable("etcd answered without a revision".into()))
}

fn to_etcd(revision: Revision) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

/// An instance as the replica holds it: the record, with the store-owned fields etcd keeps.
fn instance_from(kv: &KeyValue) -> Result<Instance> {
    let mut instance = decode_instance(kv.value())?;
    instance.create_revision = u64::try_from(kv.create_revision()).unwrap_or(0);
    instance.mod_revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
    instance.lease_id = u64::try_from(kv.lease()).ok().filter(|id| *id != 0);
    Ok(instance)
}

/// What the replica task and the store share.
#[derive(Debug)]
struct Replica {
    state: RwLock<State>,
    feed: broadcast::Sender<Arc<Change>>,
    /// The replica's revision, for writers waiting to see their own change.
    applied: watch::Sender<Revision>,
    /// `Err` with the reason while etcd cannot be followed.
    health: watch::Sender<std::result::Result<(), String>>,
}

impl Replica {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Changes are built before the lock is taken: poisoning cannot leave half a change.
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check(&self) -> Result<()> {
        match &*self.health.borrow() {
            Ok(()) => Ok(()),
            Err(reason) => Err(Error::Unavailable(format!("etcd unreachable: {reason}"))),
        }
    }

    /// Replaces the whole state (a first load, or after etcd compacted past the replica) and
    /// tells every subscriber to start over.
    fn load(&self, state: State) {
        let revision = state.revision();
        let mut guard = self
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = state;
        let _ = self.feed.send(ChangeFeed::reset_marker(revision));
        drop(guard);
        self.applied.send_replace(revision);
    }

    fn apply(&self, revision: Revision, events: Vec<Event>) {
        let mut guard = self
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let change = guard.apply(revision, events);
        // Published under the lock, so that a watch that reads a start and subscribes under the
        // read lock sees each change in one or the other.
        let _ = self.feed.send(change);
        drop(guard);
        self.applied.send_replace(revision);
    }

    fn set_health(&self, health: std::result::Result<(), String>) {
        self.health.send_if_modified(|current| {
            // Logged and published when it turns, not each time the reason is worded anew.
            let turned = current.is_ok() != health.is_ok();
            if turned {
                match &health {
                    Ok(()) => tracing::info!("following etcd"),
                    Err(reason) => tracing::warn!(%reason, "etcd unreachable"),
                }
            }
            *current = health;
            turned
        });
    }
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
    /// Granted ttls, so that a refresh can answer one without asking etcd again.
    ttls: Mutex<HashMap<LeaseId, Duration>>,
    /// While this server holds the checker key: true until it loses it.
    checker: tokio::sync::Mutex<Option<watch::Receiver<bool>>>,
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
        let follower = tokio::spawn(follow(
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
                ttls: Mutex::new(HashMap::new()),
                checker: tokio::sync::Mutex::new(None),
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

    /// Sends a compare-and-swap transaction; when an attempt may have been applied, sends the
    /// same transaction again on another member, within one deadline.
    ///
    /// Only for transactions whose compare is on the key they change (its version, mod or
    /// create revision): an attempt that was applied changed that, so the repeat cannot apply a
    /// second time. It is refused instead, and the caller reads the `or_else` part of the
    /// response to tell its own earlier write from another server's.
    async fn cas(&self, txn: Txn) -> std::result::Result<Cas, Failure> {
        let deadline = self.deadline();
        let mut repeated = false;
        loop {
            let attempt = self
                .inner
                .members
                .call(Repeat::Never, deadline, |client| {
                    let txn = txn.clone();
                    async move { client.kv_client().txn(txn).await }
                })
                .await;
            match attempt {
                Ok(resp) if resp.succeeded() => return Ok(Cas::Applied(resp)),
                Ok(resp) => return Ok(Cas::Refused { resp, repeated }),
                Err(Failure::Unknown(reason)) if Instant::now() < deadline => {
                    tracing::debug!(%reason, "an etcd transaction may have been applied; sending it again");
                    repeated = true;
                }
                Err(Failure::Unreachable(reason)) if repeated => {
                    // Nothing took the repeat; the first attempt's outcome is still unknown.
                    return Err(Failure::Unknown(reason));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn replica(&self) -> &Replica {
        &self.inner.replica
    }

    /// Waits until the replica has applied `revision` (a write this server just made).
    async fn seen(&self, revision: Revision) -> Result<()> {
        let mut applied = self.replica().applied.subscribe();
        match tokio::time::timeout(
            self.inner.config.request_timeout,
            applied.wait_for(|r| *r >= revision),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "the change at revision {revision} was written to etcd but has not come back on \
                 this server's watch yet"
            ))),
        }
    }

    /// The instance at `key` as the replica holds it at `revision`, or as etcd does when the
    /// replica has moved on already.
    fn stored(&self, key: &InstanceKey, revision: Revision) -> Option<Arc<Instance>> {
        self.replica()
            .read()
            .get(key)
            .filter(|i| i.mod_revision == revision)
            .cloned()
    }

    async fn fetch(&self, key: &[u8]) -> Result<Option<Arc<Instance>>> {
        let resp = self
            .inner
            .members
            .call(Repeat::Safe, self.deadline(), |client| async move {
                client.kv_client().get(key, None).await
            })
            .await
            .map_err(unavailable)?;
        resp.kvs()
            .first()
            .map(|kv| instance_from(kv).map(Arc::new))
            .transpose()
    }

    /// Runs `attempt` against what the replica holds for `key`, and again against what etcd
    /// holds when the replica was behind (the compare in the transaction failed).
    async fn read_modify_write<T, F, Fut>(&self, key: &InstanceKey, mut attempt: F) -> Result<T>
    where
        F: FnMut(Option<Arc<Instance>>) -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let mut prev = self.replica().read().get(key).cloned();
        for _ in 0..16 {
            if let Some(done) = attempt(prev).await? {
                return Ok(done);
            }
            prev = self.fetch(&self.inner.keys.instance(key)).await?;
        }
        Err(Error::Unavailable(format!(
            "instance {}/{}/{} is being changed too often to update it",
            key.namespace, key.service, key.id
        )))
    }

    /// One attempt at an upsert over `prev`; `None` when the instance changed meanwhile.
    async fn try_put(
        &self,
        etcd_key: &[u8],
        instance: &Instance,
        lease: Option<LeaseId>,
        prev: Option<Arc<Instance>>,
    ) -> Result<Option<Instance>> {
        let mut next = instance.clone();
        next.lease_id = lease;
        next.created_at = match &prev {
            Some(p) => p.created_at,
            None => Some(std::time::SystemTime::now()),
        };
        (next.health, next.health_output, next.health_checked_at) = match (&next.check, &prev) {
            (None, _) => (Health::Passing, String::new(), None),
            (Some(check), Some(p)) if p.check.as_ref() == Some(check) => {
                (p.health, p.health_output.clone(), p.health_checked_at)
            }
            (Some(_), _) => (Health::Critical, "not checked yet".to_owned(), None),
        };
        let lease_id = match lease {
            Some(id) => Some(i64::try_from(id).map_err(|_| Error::LeaseNotFound(id))?),
            None => None,
        };
        let options = lease_id.map(|id| PutOptions::new().with_lease(id));
        let value = encode_instance(&next);
        // Safe to repeat (see `cas`): the compare is on this key's mod revision (or on its
        // absence), which an applied attempt moved on. A refused repeat that finds exactly this
        // value on exactly this lease is the earlier attempt's write: the same bytes carry the
        // creation time of this attempt, so no other write leaves them.
        let txn = Txn::new()
            .when([Self::unchanged(etcd_key, prev.as_deref())])
            .and_then([TxnOp::put(etcd_key, value.clone(), options)])
            .or_else([TxnOp::get(etcd_key, None)]);
        match self.cas(txn).await {
            Ok(Cas::Applied(resp)) => {
                let revision = revision_of(resp.header())?;
                next.mod_revision = revision;
                next.create_revision = prev.map_or(revision, |p| p.create_revision);
                Ok(Some(next))
            }
            Ok(Cas::Refused { resp, repeated }) => match else_kv(&resp) {
                Some(kv)
                    if repeated
                        && kv.value() == value.as_slice()
                        && kv.lease() == lease_id.unwrap_or(0) =>
                {
                    next.mod_revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
                    next.create_revision = u64::try_from(kv.create_revision()).unwrap_or(0);
                    Ok(Some(next))
                }
                _ => Ok(None),
            },
            Err(e) if lease.is_some() && failure_is_lease_not_found(&e) => {
                Err(Error::LeaseNotFound(lease.unwrap_or_default()))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// One attempt at recording a verdict over `prev`: `Some(None)` when there is nothing to
    /// record, `None` when the instance changed meanwhile.
    async fn try_set_health(
        &self,
        etcd_key: &[u8],
        update: &HealthUpdate,
        prev: Option<Arc<Instance>>,
    ) -> Result<Option<Option<Revision>>> {
        let Some(prev) = prev.filter(|p| {
            p.create_revision == update.create_revision
                && p.check.as_ref() == Some(&update.check)
                // As the memory engine: a status change, or the check's first verdict.
                && (p.health != update.health || p.health_checked_at.is_none())
        }) else {
            return Ok(Some(None));
        };
        let mut next = (*prev).clone();
        next.health = update.health;
        next.health_output = update.output.clone();
        next.health_checked_at = Some(update.checked_at);
        let value = encode_instance(&next);
        // Safe to repeat, as a put is: the compare is on the mod revision an applied attempt
        // moved on, and the value (with this verdict's check time) tells that attempt's write.
        let txn = Txn::new()
            .when([Self::unchanged(etcd_key, Some(&prev))])
            .and_then([TxnOp::put(
                etcd_key,
                value.clone(),
                Some(PutOptions::new().with_ignore_lease()),
            )])
            .or_else([TxnOp::get(etcd_key, None)]);
        match self.cas(txn).await.map_err(unavailable)? {
            Cas::Applied(resp) => Ok(Some(Some(revision_of(resp.header())?))),
            Cas::Refused { resp, repeated } => match else_kv(&resp) {
                Some(kv) if repeated && kv.value() == value.as_slice() => {
                    Ok(Some(Some(u64::try_from(kv.mod_revision()).unwrap_or(0))))
                }
                _ => Ok(None),
            },
        }
    }

    /// A compare that holds when `key` is still what `prev` says.
    fn unchanged(etcd_key: &[u8], prev: Option<&Instance>) -> Compare {
        match prev {
            Some(p) => Compare::mod_revision(etcd_key, CompareOp::Equal, to_etcd(p.mod_revision)),
            None => Compare::version(etcd_key, CompareOp::Equal, 0),
        }
    }

    async fn remove(
        &self,
        key: &InstanceKey,
        cause: RemovalCause,
        create_revision: Option<Revision>,
    ) -> Result<Deleted> {
        self.replica().check()?;
        let keys = &self.inner.keys;
        let etcd_key = keys.instance(key);
        let absent = || Deleted {
            prev: None,
            revision: self.replica().read().revision(),
        };
        // The incarnation to remove: the one asked for (an eviction), else the one the replica
        // holds, else etcd's (the replica has not seen it yet). Naming it in the compare is what
        // makes the transaction safe to repeat.
        let mut known = self.replica().read().get(key).cloned();
        let mut target = match (create_revision, &known) {
            (Some(r), _) => r,
            (None, Some(instance)) => instance.create_revision,
            (None, None) => match self.fetch(&etcd_key).await? {
                Some(instance) => {
                    let r = instance.create_revision;
                    known = Some(instance);
                    r
                }
                None => return Ok(absent()),
            },
        };
        for _ in 0..16 {
            // Safe to repeat (see `cas`): an applied attempt deleted this incarnation, so the
            // compare of a repeat cannot hold again, even if the instance was registered anew.
            let txn = Txn::new()
                .when([Compare::create_revision(
                    etcd_key.as_slice(),
                    CompareOp::Equal,
                    to_etcd(target),
                )])
                .and_then([
                    TxnOp::delete(
                        etcd_key.as_slice(),
                        Some(DeleteOptions::new().with_prev_key()),
                    ),
                    TxnOp::put(keys.removal.as_slice(), cause_bytes(cause), None),
                ])
                .or_else([TxnOp::get(etcd_key.as_slice(), None)]);
            match self.cas(txn).await.map_err(unavailable)? {
                Cas::Applied(resp) => {
                    let revision = revision_of(resp.header())?;
                    let prev = resp.op_responses().into_iter().find_map(|op| match op {
                        TxnOpResponse::Delete(d) => d.prev_kvs().first().cloned(),
                        _ => None,
                    });
                    self.seen(revision).await?;
                    return Ok(Deleted {
                        prev: prev
                            .map(|kv| instance_from(&kv).map(Arc::new))
                            .transpose()?,
                        revision,
                    });
                }
                Cas::Refused { resp, repeated } => {
                    let current = else_kv(&resp);
                    if repeated {
                        // The incarnation is gone: this server's earlier attempt removed it, or
                        // something else did meanwhile. Either way what was asked is done,
                        // unless the instance is there again under a plain deregister: then
                        // the first attempt may have missed it (the replica was behind) or
                        // removed it before it came back, and only the caller can tell.
                        if current.is_some() && create_revision.is_none() {
                            return Err(Error::Unavailable(
                                "etcd unreachable: a member failed during the deregister, and the \
                                 instance is registered again now; deregister again to be sure"
                                    .into(),
                            ));
                        }
                        let revision = revision_of(resp.header())?;
                        self.seen(revision).await?;
                        return Ok(Deleted {
                            prev: known.filter(|i| i.create_revision == target),
                            revision,
                        });
                    }
                    match (create_revision, current) {
                        // An eviction is of that incarnation only.
                        (Some(_), _) | (None, None) => return Ok(absent()),
                        // Registered anew since the replica looked: remove that one.
                        (None, Some(kv)) => {
                            let instance = instance_from(&kv)?;
                            target = instance.create_revision;
                            known = Some(Arc::new(instance));
                        }
                    }
                }
            }
        }
        Err(Error::Unavailable(format!(
            "instance {}/{}/{} is being changed too often to remove it",
            key.namespace, key.service, key.id
        )))
    }

    fn remember_ttl(&self, id: LeaseId, ttl: Duration) {
        let mut ttls = self
            .inner
            .ttls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A cache, not a registry of leases: dropping it costs one lookup per lease.
        if ttls.len() >= 100_000 {
            ttls.clear();
        }
        ttls.insert(id, ttl);
    }

    fn known_ttl(&self, id: LeaseId) -> Option<Duration> {
        self.inner
            .ttls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
            .copied()
    }

    /// Becomes the server that runs the health checks, waiting for as long as another one is.
    /// The returned watch turns false when this server is no longer it.
    async fn campaign(&self) -> Result<watch::Receiver<bool>> {
        // Held from an earlier call (the checker re-subscribes after a lag): keep it.
        let mut checker = self.inner.checker.lock().await;
        if let Some(held) = checker.as_ref().filter(|held| *held.borrow()) {
            return Ok(held.clone());
        }
        let held = self.win_checker().await?;
        *checker = Some(held.clone());
        Ok(held)
    }

    async fn win_checker(&self) -> Result<watch::Receiver<bool>> {
        let ttl = self.inner.config.checker_ttl.max(Duration::from_secs(1));
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let key = self.inner.keys.checker.clone();
        let members = &self.inner.members;
        loop {
            self.replica().check()?;
            // Safe to repeat: a grant whose answer was lost leaves a lease nothing is attached
            // to, which etcd expires after its ttl.
            let lease = members
                .call(Repeat::Safe, self.deadline(), |client| async move {
                    client.lease_client().grant(secs, None).await
                })
                .await
                .map_err(unavailable)?
                .id();
            // Safe to repeat (see `cas`): the compare is on the key's absence, which an applied
            // attempt ended; a refused repeat that finds the key on this very lease is that
            // attempt's win.
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key.as_slice(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    key.as_slice(),
                    format!("pid {}", std::process::id()),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.as_slice(), None)]);
            let won = match self.cas(txn).await.map_err(unavailable)? {
                Cas::Applied(_) => true,
                Cas::Refused { resp, repeated } => {
                    repeated && else_kv(&resp).is_some_and(|kv| kv.lease() == lease)
                }
            };
            if won {
                let (held_tx, held) = watch::channel(true);
                tokio::spawn(hold(members.clone(), ttl, held_tx, lease));
                tracing::info!("this server runs the health checks");
                return Ok(held);
            }
            let _ = members
                .call(Repeat::Safe, self.deadline(), |client| async move {
                    client.lease_client().revoke(lease).await
                })
                .await;
            tokio::time::sleep(ttl / 3).await;
        }
    }
}

/// Keeps the checker lease alive until it cannot; then says so and gives the lease up.
///
/// Each refresh is one call through the member set, so that a member dying moves the refreshes
/// to another instead of losing the key; one that hangs (a member whose leader just died) is
/// given up on after a third of the ttl and the next refresh goes elsewhere. The key counts as
/// lost once no refresh has worked for five sixths of the ttl, counted from when the last good
/// one was sent: etcd's deadline runs from no earlier than that, so this server stops before
/// another can win. A leader election alone does not lose it: etcd's new leader extends every
/// lease.
async fn hold(members: Arc<Members>, ttl: Duration, held: watch::Sender<bool>, lease: i64) {
    let mut refreshed_at = Instant::now();
    loop {
        tokio::select! {
            _ = held.closed() => break,
            _ = tokio::time::sleep(ttl / 6) => {}
        }
        let sent = Instant::now();
        let give_up = refreshed_at + ttl * 5 / 6;
        // Safe to repeat: a refresh applied twice is one refresh.
        let refreshed = members
            .call(
                Repeat::Safe,
                (sent + ttl / 3).min(give_up),
                |client| async move { client.lease_client().keep_alive(lease).await },
            )
            .await;
        match refreshed {
            Ok(_) => refreshed_at = sent,
            Err(e) if failure_is_lease_not_found(&e) => {
                tracing::warn!(
                    "lost the checker key (its lease expired): health checks move to another server"
                );
                break;
            }
            Err(e) if Instant::now() >= give_up => {
                tracing::warn!(error = %e, "lost the checker key: health checks move to another server");
                break;
            }
            Err(_) => {}
        }
    }
    held.send_replace(false);
    let deadline = Instant::now() + ttl;
    let _ = members
        .call(Repeat::Safe, deadline, |client| async move {
            client.lease_client().revoke(lease).await
        })
        .await;
}

/// Follows etcd into the replica for as long as the store lives.
async fn follow(
    replica: Weak<Replica>,
    members: Arc<Members>,
    keys: Keys,
    history_limit: usize,
    request_timeout: Duration,
) {
    let mut loaded = false;
    let mut strikes = 0u32;
    // Since when the replica has not been able to follow etcd.
    let mut failing_since = None;
    loop {
        let Some(shared) = replica.upgrade() else {
            return;
        };
        let mut synced = false;
        // The member that answered last, or the next one up: a watch on a member that died
        // is reopened on another from the replica's revision, so nothing is missed.
        let (member, client) = members.preferred();
        let result = async {
            if !loaded {
                tokio::time::timeout(
                    request_timeout,
                    load(&shared, &client, &keys, history_limit),
                )
                .await
                .map_err(|_| {
                    etcd_client::Error::WatchError(format!(
                        "no answer to the initial read within {request_timeout:?}"
                    ))
                })??;
                loaded = true;
            }
            let from = shared.read().revision() + 1;
            stream(&shared, &client, &keys, from, &mut synced).await
        }
        .await;
        match result {
            Ok(Followed::Compacted) => {
                tracing::warn!("etcd compacted past this server's replica: reloading");
                loaded = false;
            }
            Err(e) => {
                let member_failed = members.failed(member, &e);
                // A watch that breaks after working is most often one member going away: the
                // next attempt reaches another at once, and nobody needs to see the blip. A
                // leader election makes every member refuse the watch for a moment. Only a
                // failure that lasts longer than that means no member can be followed: no
                // quorum, and the server is not serving.
                let now = Instant::now();
                if synced {
                    strikes = 1;
                    failing_since = Some(now);
                } else {
                    strikes += 1;
                }
                let since = *failing_since.get_or_insert(now);
                tracing::debug!(error = %e, strikes, "etcd watch failed");
                if strikes > 1 && now.duration_since(since) >= UNREACHABLE_AFTER {
                    shared.set_health(Err(format!(
                        "no member can be followed ({})",
                        members.describe()
                    )));
                }
                drop(shared);
                let pause = if strikes == 1 && member_failed {
                    Duration::ZERO
                } else {
                    Duration::from_millis(50) * 2u32.pow(strikes.min(4))
                };
                tokio::time::sleep(pause.min(Duration::from_millis(500))).await;
            }
        }
    }
}

/// How long the replica may fail to follow etcd before the store says it is unreachable: longer
/// than a leader election (a second or two with etcd's defaults), during which every member
/// refuses new watches.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(2);

enum Followed {
    /// etcd no longer has the changes after the replica's revision.
    Compacted,
}

/// Reads every instance into a new replica state. On the first load, the state is read as of
/// `history_limit` revisions ago when etcd still has that, so that the watch that follows fills
/// the history and watches resumed from another server's revisions can be replayed here too.
async fn load(
    replica: &Replica,
    client: &Client,
    keys: &Keys,
    history_limit: usize,
) -> Result<(), etcd_client::Error> {
    let mut kv = client.kv_client();
    let prefix = || GetOptions::new().with_prefix();
    let mut resp = kv.get(keys.instances.as_slice(), Some(prefix())).await?;
    let mut revision = resp.header().map_or(0, |h| h.revision());
    let mut current = true;
    let back = revision.saturating_sub(i64::try_from(history_limit).unwrap_or(i64::MAX));
    if replica.read().revision() == 0 && back > 0 {
        // When etcd has compacted that far already, start from now with no history.
        if let Ok(older) = kv
            .get(
                keys.instances.as_slice(),
                Some(prefix().with_revision(back)),
            )
            .await
        {
            resp = older;
            revision = back;
            current = false;
        }
    }
    let mut instances = Vec::with_capacity(resp.kvs().len());
    for kv in resp.kvs() {
        match instance_from(kv) {
            Ok(instance) => instances.push(instance),
            Err(e) => {
                tracing::error!(key = ?String::from_utf8_lossy(kv.key()), error = %e, "skipping an unreadable instance record")
            }
        }
    }
    let revision = Revision::try_from(revision).unwrap_or(0);
    // A state read as of now is one to serve at once (the watchers this reload resets read it
    // straight away); one read from the past waits for the watch to catch up.
    replica.load(State::replica(revision, history_limit, instances));
    // Healthy only once loaded: a reader let in before would see an empty registry.
    if current {
        replica.set_health(Ok(()));
    }
    Ok(())
}

/// Applies etcd's changes from revision `from` on, until the watch fails or is compacted.
/// `caught_up` turns true once etcd says the watch has caught up with it.
async fn stream(
    replica: &Replica,
    client: &Client,
    keys: &Keys,
    from: Revision,
    caught_up: &mut bool,
) -> Result<Followed, etcd_client::Error> {
    let mut watches = client.watch_client();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(to_etcd(from))
        .with_progress_notify();
    // A member that hangs (stopped, cut off) neither fails the call nor answers: bound the wait
    // for the watch to be created, so that the next attempt tries another member.
    let no_answer = || etcd_client::Error::WatchError("the member did not answer within 2s".into());
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        watches.watch(keys.all.as_slice(), Some(options)),
    )
    .await
    .map_err(|_| no_answer())??;
    let mut first = Some(
        tokio::time::timeout(Duration::from_secs(2), stream.message())
            .await
            .map_err(|_| no_answer())??,
    );
    let (mut requests, mut responses) = stream.split();
    // The replica is only current (and the store healthy) once etcd says this watch has caught
    // up; etcd ignores a progress request while the watch is still replaying, so ask until then.
    let mut synced = false;
    let mut ask = tokio::time::interval(Duration::from_millis(200));
    ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let next = match first.take() {
            Some(created) => created,
            None => tokio::select! {
                next = responses.message() => next?,
                _ = ask.tick(), if !synced => {
                    requests.request_progress().await?;
                    continue;
                }
            },
        };
        let Some(resp) = next else { break };
        if resp.compact_revision() > 0 {
            return Ok(Followed::Compacted);
        }
        if resp.canceled() {
            return Err(etcd_client::Error::WatchError(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            )));
        }
        if !resp.created() && resp.events().is_empty() {
            // A progress notification: the watch has caught up. Its revision is not used to move
            // the replica on: etcd before 3.4.25 / 3.5.8 could send one ahead of events still
            // queued for the watch (etcd issue 15220), and a replica that claimed that revision
            // would hand out snapshots missing those events.
            if !synced {
                synced = true;
                *caught_up = true;
                replica.set_health(Ok(()));
            }
        }
        // etcd never splits one revision's events over two responses.
        let events = resp.events();
        let mut start = 0;
        while start < events.len() {
            let revision = events[start].kv().map_or(0, |kv| kv.mod_revision());
            let end = events[start..]
                .iter()
                .position(|e| e.kv().map_or(0, |kv| kv.mod_revision()) != revision)
                .map_or(events.len(), |n| start + n);
            apply_revision(replica, keys, revision, &events[start..end]);
            start = end;
        }
    }
    Err(etcd_client::Error::WatchError(
        "etcd ended the watch stream".into(),
    ))
}

/// Turns the etcd events of one revision into a change of the replica.
fn apply_revision(replica: &Replica, keys: &Keys, revision: i64, events: &[etcd_client::Event]) {
    let Ok(revision) = Revision::try_from(revision) else {
        return;
    };
    let cause = events
        .iter()
        .filter_map(|e| e.kv())
        .find(|kv| kv.key() == keys.removal.as_slice())
        .map_or(RemovalCause::Expired, |kv| cause_from(kv.value()));
    let mut changes = Vec::new();
    {
        let state = replica.read();
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = keys.instance_key(kv.key()) else {
                continue;
            };
            let prev = state.get(&key).cloned();
            match event.event_type() {
                EventType::Put => match instance_from(kv) {
                    Ok(current) => changes.push(Event {
                        prev,
                        current: Some(Arc::new(current)),
                        removal: None,
                    }),
                    Err(e) => {
                        tracing::error!(?key, error = %e, "ignoring an unreadable instance record")
                    }
                },
                EventType::Delete => {
                    if prev.is_some() {
                        changes.push(Event {
                            prev,
                            current: None,
                            removal: Some(cause),
                        });
                    }
                }
            }
        }
    }
    if !changes.is_empty() {
        replica.apply(revision, changes);
    }
}

impl Store for EtcdStore {
    async fn put(&self, instance: Instance, lease: Option<LeaseId>) -> Result<Arc<Instance>> {
        self.replica().check()?;
        let key = instance.key();
        let etcd_key = self.inner.keys.instance(&key);
        let written = self
            .read_modify_write(&key, |prev| self.try_put(&etcd_key, &instance, lease, prev))
            .await?;
        self.seen(written.mod_revision).await?;
        // The replica's copy when it still is this write (the same value every reader gets);
        // the one written when the instance has changed again since.
        Ok(self
            .stored(&key, written.mod_revision)
            .unwrap_or_else(|| Arc::new(written)))
    }

    async fn delete(&self, key: &InstanceKey) -> Result<Deleted> {
        self.remove(key, RemovalCause::Deregistered, None).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        self.replica().check()?;
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
        self.remember_ttl(id, ttl);
        Ok(Lease { id, ttl })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Lease>> {
        self.replica().check()?;
        let Ok(id) = i64::try_from(lease) else {
            return Ok(None);
        };
        let members = &self.inner.members;
        // Safe to repeat: two refreshes in a row are one refresh.
        let refreshed = members
            .call(Repeat::Safe, self.deadline(), |client| async move {
                client.lease_client().keep_alive(id).await
            })
            .await;
        match refreshed {
            Ok(_) => {}
            Err(e) if failure_is_lease_not_found(&e) => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        }
        if let Some(ttl) = self.known_ttl(lease) {
            return Ok(Some(Lease { id: lease, ttl }));
        }
        // Granted through another server: ask etcd once (a read).
        let resp = members
            .call(Repeat::Safe, self.deadline(), |client| async move {
                client.lease_client().time_to_live(id, None).await
            })
            .await
            .map_err(unavailable)?;
        let Ok(granted) = u64::try_from(resp.granted_ttl()) else {
            return Ok(None);
        };
        if resp.ttl() <= 0 {
            return Ok(None);
        }
        let ttl = Duration::from_secs(granted);
        self.remember_ttl(lease, ttl);
        Ok(Some(Lease { id: lease, ttl }))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<bool> {
        self.replica().check()?;
        let Ok(id) = i64::try_from(lease) else {
            return Ok(false);
        };
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
            Ok(()) => {
                self.inner
                    .ttls
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .remove(&lease);
                Ok(true)
            }
            Err(e) if failure_is_lease_not_found(&e) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn list(&self, namespace: &str, service: &str) -> Result<Snapshot> {
        Ok(self.replica().read().list(namespace, service))
    }

    async fn list_services(&self, namespace: &str) -> Result<ServiceList> {
        Ok(self.replica().read().list_services(namespace))
    }

    fn changes(&self) -> ChangeFeed {
        ChangeFeed::new(self.replica().feed.subscribe())
    }

    async fn watch(
        &self,
        namespace: &str,
        service: &str,
        after: Option<Revision>,
    ) -> Result<Watch> {
        // Like every read, served from the replica even while etcd cannot be followed.
        if let Some(after) = after {
            // A client moving over from another server may have seen a revision this one has
            // not applied yet; a moment's wait turns what would be a reset into a replay.
            let mut applied = self.replica().applied.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(1), applied.wait_for(|r| *r >= after))
                .await;
        }
        let state = self.replica().read();
        let feed = ChangeFeed::new(self.replica().feed.subscribe());
        let start = state.watch_start(namespace, service, after);
        Ok(Watch { start, feed })
    }

    async fn set_health(&self, update: HealthUpdate) -> Result<Option<Arc<Instance>>> {
        self.replica().check()?;
        let etcd_key = self.inner.keys.instance(&update.key);
        let written = self
            .read_modify_write(&update.key, |prev| {
                self.try_set_health(&etcd_key, &update, prev)
            })
            .await?;
        let Some(revision) = written else {
            return Ok(None);
        };
        self.seen(revision).await?;
        Ok(self.stored(&update.key, revision))
    }

    async fn evict(&self, key: &InstanceKey, create_revision: Revision) -> Result<Deleted> {
        self.remove(key, RemovalCause::Unhealthy, Some(create_revision))
            .await
    }

    async fn get(&self, key: &InstanceKey) -> Result<Option<Arc<Instance>>> {
        Ok(self.replica().read().get(key).cloned())
    }

    async fn sizes(&self, namespace: &str, service: &str) -> Result<crate::Sizes> {
        Ok(self.replica().read().sizes(namespace, service))
    }

    async fn counts(&self) -> Result<Counts> {
        Ok(self.replica().read().counts())
    }

    async fn watch_checks(&self) -> Result<(Snapshot, ChangeFeed)> {
        let mut held = self.campaign().await?;
        let state = self.replica().read();
        let mut source = ChangeFeed::new(self.replica().feed.subscribe());
        let snapshot = state.checked();
        drop(state);
        // The checker's own feed, which closes when this server stops being the checker.
        let (tx, rx) = broadcast::channel(self.inner.config.feed_capacity.max(1));
        tokio::spawn(async move {
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

    fn serving(&self) -> Option<watch::Receiver<std::result::Result<(), String>>> {
        Some(self.replica().health.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_keys_round_trip_under_the_prefix() {
        let keys = Keys::new("/signpost/");
        let key = InstanceKey {
            namespace: "prod".into(),
            service: "pay".into(),
            id: "10.0.0.1:80/a".into(),
        };
        let etcd_key = keys.instance(&key);
        assert!(etcd_key.starts_with(b"/signpost/instances/"));
        assert_eq!(keys.instance_key(&etcd_key), Some(key));
        assert_eq!(keys.instance_key(&keys.removal), None);
        assert_eq!(keys.instance_key(b"/other/instances/a\0b\0c"), None);
    }

    #[test]
    fn removal_causes_survive_the_marker() {
        for cause in [
            RemovalCause::Deregistered,
            RemovalCause::Expired,
            RemovalCause::Unhealthy,
        ] {
            assert_eq!(cause_from(cause_bytes(cause)), cause);
        }
    }
}
