//! What the memory and durable backends share: the state behind a lock, the change feed, the
//! lease-expiry task, and the path every mutation takes — applied to the state, then (for the
//! durable backend) handed to the commit log and acknowledged only once it is on disk.

use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::feed::ChangeFeed;
use crate::model::{
    Change, Lease, LeaseId, Quota, Revision, ServiceList, Snapshot, Usage, Write, Written,
};
use crate::state::State;
use crate::{Error, Result, WatchStart};

/// How many leases one expiry pass takes, so that a mass expiry commits in bounded batches.
const EXPIRY_BATCH: usize = 256;

/// A lease change the durable backend writes down. Refreshes are not written: after a restart
/// every lease gets its full ttl again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseOp {
    Put { id: LeaseId, ttl: Duration },
    Delete(LeaseId),
}

/// One mutation, applied in memory, on its way to disk.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) changes: Vec<Arc<Change>>,
    pub(crate) leases: Vec<LeaseOp>,
    pub(crate) revision: Revision,
    pub(crate) next_lease: LeaseId,
    pub(crate) done: oneshot::Sender<Result<()>>,
    /// Released once the mutation is on disk; see [`CommitLog::in_flight`].
    pub(crate) _permit: OwnedSemaphorePermit,
}

/// The durable backend's side of the engine.
#[derive(Debug)]
pub(crate) struct CommitLog {
    pub(crate) tx: mpsc::UnboundedSender<Pending>,
    /// Bounds the mutations applied in memory but not yet on disk. A restarted store starts its
    /// revisions and lease ids this far above what it finds on disk, so that nothing a reader may
    /// have seen before a crash is ever reused.
    pub(crate) in_flight: Arc<Semaphore>,
    /// Set when a write to disk failed: from then on the memory state is ahead of the disk and
    /// every call answers unavailable rather than serve a state it cannot keep.
    pub(crate) failed: Arc<OnceLock<String>>,
}

/// The result of applying a mutation: what to answer, and what to publish and persist.
struct Applied<T> {
    value: T,
    changes: Vec<Arc<Change>>,
    leases: Vec<LeaseOp>,
}

impl<T> Applied<T> {
    fn nothing(value: T) -> Self {
        Applied {
            value,
            changes: Vec::new(),
            leases: Vec::new(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Engine {
    state: RwLock<State>,
    pub(crate) feed: broadcast::Sender<Arc<Change>>,
    wake: Arc<Notify>,
    log: Option<CommitLog>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl Engine {
    /// Wraps `state` and starts the expiry task. `log` is `None` for the memory backend.
    pub(crate) fn start(
        state: State,
        feed: broadcast::Sender<Arc<Change>>,
        log: Option<CommitLog>,
    ) -> Arc<Engine> {
        let wake = Arc::new(Notify::new());
        let engine = Arc::new(Engine {
            state: RwLock::new(state),
            feed,
            wake: wake.clone(),
            log,
        });
        tokio::spawn(expire_leases(Arc::downgrade(&engine), wake));
        engine
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, State>> {
        self.check()?;
        // Every mutation is built before it is linked in, so a panic while holding the lock
        // cannot leave a half-made change behind: poisoning is ignored.
        Ok(self
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    fn lock(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check(&self) -> Result<()> {
        match self.log.as_ref().and_then(|log| log.failed.get()) {
            Some(reason) => Err(Error::Unavailable(format!(
                "the store stopped after a failed write to disk: {reason}"
            ))),
            None => Ok(()),
        }
    }

    /// Applies `f` to the state. In memory, its changes are published at once; with a commit log,
    /// they are published by the log once on disk, and this returns only then.
    async fn mutate<T>(
        &self,
        revisions: usize,
        f: impl FnOnce(&mut State, Instant) -> Result<Applied<T>>,
    ) -> Result<T> {
        self.check()?;
        let Some(log) = &self.log else {
            let mut state = self.lock();
            let applied = f(&mut state, Instant::now())?;
            for change in applied.changes {
                // No subscribers is not an error: nobody is watching.
                let _ = self.feed.send(change);
            }
            return Ok(applied.value);
        };

        let permits = u32::try_from(revisions).unwrap_or(u32::MAX);
        let permit = log
            .in_flight
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::Unavailable("the store is closed".into()))?;
        let (done, committed) = oneshot::channel();
        let value = {
            let mut state = self.lock();
            let applied = f(&mut state, Instant::now())?;
            if applied.changes.is_empty() && applied.leases.is_empty() {
                return Ok(applied.value);
            }
            let pending = Pending {
                changes: applied.changes,
                leases: applied.leases,
                revision: state.revision(),
                next_lease: state.next_lease(),
                done,
                _permit: permit,
            };
            // Sent under the lock, so the log receives mutations in revision order.
            if log.tx.send(pending).is_err() {
                return Err(Error::Unavailable("the store's commit log stopped".into()));
            }
            applied.value
        };
        match committed.await {
            Ok(Ok(())) => Ok(value),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Unavailable("the store's commit log stopped".into())),
        }
    }

    pub(crate) async fn write(&self, write: Write) -> Result<Written> {
        self.mutate(1, |state, now| {
            let (written, change) = state.write(write, now)?;
            Ok(Applied {
                value: written,
                changes: change.into_iter().collect(),
                leases: Vec::new(),
            })
        })
        .await
    }

    pub(crate) fn usage(&self, namespace: &str, service: &str) -> Result<Usage> {
        Ok(self.read()?.usage(namespace, service))
    }

    pub(crate) fn lease_namespace(&self, lease: LeaseId) -> Result<Option<String>> {
        Ok(self.read()?.lease_namespace(lease).map(str::to_owned))
    }

    pub(crate) fn watch_checks(&self) -> Result<(Snapshot, ChangeFeed)> {
        let state = self.read()?;
        let feed = ChangeFeed::new(self.feed.subscribe());
        Ok((state.checked(), feed))
    }

    pub(crate) async fn grant_lease(&self, ttl: Duration, quota: Quota) -> Result<Lease> {
        let lease = self
            .mutate(1, |state, now| {
                let lease = state.grant(ttl, &quota, now)?;
                Ok(Applied {
                    value: lease,
                    changes: Vec::new(),
                    leases: vec![LeaseOp::Put {
                        id: lease.id,
                        ttl: lease.ttl,
                    }],
                })
            })
            .await?;
        self.wake.notify_one();
        Ok(lease)
    }

    pub(crate) fn keep_alive(&self, lease: LeaseId) -> Result<Option<Lease>> {
        self.check()?;
        Ok(self.lock().refresh(lease, Instant::now()))
    }

    pub(crate) async fn revoke_lease(&self, lease: LeaseId) -> Result<bool> {
        self.mutate(1, |state, _| {
            Ok(match state.revoke(lease) {
                None => Applied::nothing(false),
                Some(change) => Applied {
                    value: true,
                    changes: change.into_iter().collect(),
                    leases: vec![LeaseOp::Delete(lease)],
                },
            })
        })
        .await
    }

    /// Expires due leases, a batch at a time; true when more are due.
    async fn expire(&self) -> Result<bool> {
        self.mutate(EXPIRY_BATCH, |state, now| {
            let expired = state.expire(now, EXPIRY_BATCH);
            let leases = expired.iter().map(|(id, _)| LeaseOp::Delete(*id)).collect();
            let changes = expired.into_iter().filter_map(|(_, c)| c).collect();
            Ok(Applied {
                value: state.has_due(now),
                changes,
                leases,
            })
        })
        .await
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.read().ok().and_then(|state| state.next_deadline())
    }

    pub(crate) fn list(&self, namespace: &str, service: &str) -> Result<Snapshot> {
        Ok(self.read()?.list(namespace, service))
    }

    pub(crate) fn list_services(&self, namespace: &str) -> Result<ServiceList> {
        Ok(self.read()?.list_services(namespace))
    }

    pub(crate) fn changes(&self) -> ChangeFeed {
        ChangeFeed::new(self.feed.subscribe())
    }

    pub(crate) fn watch(
        &self,
        namespace: &str,
        service: &str,
        after: Option<Revision>,
    ) -> Result<WatchStart> {
        // Every change is applied to the state before it is published on the feed, so a feed
        // subscribed before this read misses nothing the start does not hold.
        Ok(self.read()?.watch_start(namespace, service, after))
    }
}

async fn expire_leases(engine: Weak<Engine>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(engine) = engine.upgrade() else {
                return;
            };
            match engine.expire().await {
                Ok(true) => continue,
                Ok(false) => engine.next_deadline(),
                Err(e) => {
                    tracing::error!(error = %e, "lease expiry stopped");
                    return;
                }
            }
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Implements [`Store`](crate::Store) for a backend that is an [`Engine`] in a field named
/// `engine`: the memory and durable backends differ only in how the engine was built.
macro_rules! store_on_engine {
    ($backend:ty) => {
        impl $crate::Store for $backend {
            fn write(
                &self,
                write: $crate::Write,
            ) -> $crate::BoxFuture<'_, $crate::Result<$crate::Written>> {
                Box::pin(self.engine.write(write))
            }

            fn grant_lease(
                &self,
                ttl: std::time::Duration,
                quota: $crate::Quota,
            ) -> $crate::BoxFuture<'_, $crate::Result<$crate::Lease>> {
                Box::pin(self.engine.grant_lease(ttl, quota))
            }

            fn keep_alive(
                &self,
                lease: $crate::LeaseId,
            ) -> $crate::BoxFuture<'_, $crate::Result<Option<$crate::Lease>>> {
                Box::pin(async move { self.engine.keep_alive(lease) })
            }

            fn revoke_lease(
                &self,
                lease: $crate::LeaseId,
            ) -> $crate::BoxFuture<'_, $crate::Result<bool>> {
                Box::pin(self.engine.revoke_lease(lease))
            }

            fn lease_namespace(
                &self,
                lease: $crate::LeaseId,
            ) -> $crate::BoxFuture<'_, $crate::Result<Option<String>>> {
                Box::pin(async move { self.engine.lease_namespace(lease) })
            }

            fn list(&self, namespace: &str, service: &str) -> $crate::Result<$crate::Snapshot> {
                self.engine.list(namespace, service)
            }

            fn list_services(&self, namespace: &str) -> $crate::Result<$crate::ServiceList> {
                self.engine.list_services(namespace)
            }

            fn usage(&self, namespace: &str, service: &str) -> $crate::Result<$crate::Usage> {
                self.engine.usage(namespace, service)
            }

            fn changes(&self) -> $crate::ChangeFeed {
                self.engine.changes()
            }

            fn watch<'a>(
                &'a self,
                namespace: &'a str,
                service: &'a str,
                after: Option<$crate::Revision>,
            ) -> $crate::BoxFuture<'a, $crate::Result<$crate::WatchStart>> {
                Box::pin(async move { self.engine.watch(namespace, service, after) })
            }

            fn watch_checks(
                &self,
            ) -> $crate::BoxFuture<'_, $crate::Result<($crate::Snapshot, $crate::ChangeFeed)>> {
                Box::pin(async move { self.engine.watch_checks() })
            }
        }
    };
}
pub(crate) use store_on_engine;
