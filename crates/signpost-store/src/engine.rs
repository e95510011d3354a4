//! What the memory and durable backends share: the state behind a lock, the change feed, the
//! lease-expiry task, and the path every mutation takes — applied to the state, then (for the
//! durable backend) handed to the commit log and acknowledged only once it is on disk.

use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::feed::ChangeFeed;
use crate::model::{
    Change, Deleted, Instance, InstanceKey, Lease, LeaseId, RemovalCause, Revision, ServiceList,
    Snapshot,
};
use crate::state::State;
use crate::{Error, HealthUpdate, Result, Watch};

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

    fn write(&self) -> RwLockWriteGuard<'_, State> {
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
            let mut state = self.write();
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
            let mut state = self.write();
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

    pub(crate) async fn put(
        &self,
        instance: Instance,
        lease: Option<LeaseId>,
    ) -> Result<Arc<Instance>> {
        self.mutate(1, |state, now| {
            let (stored, change) = state.put(instance, lease, now)?;
            Ok(Applied {
                value: stored,
                changes: vec![change],
                leases: Vec::new(),
            })
        })
        .await
    }

    pub(crate) async fn delete(&self, key: &InstanceKey) -> Result<Deleted> {
        self.remove(key, RemovalCause::Deregistered, None).await
    }

    /// Removes an instance for `cause`; with `create_revision`, only that registration of it.
    async fn remove(
        &self,
        key: &InstanceKey,
        cause: RemovalCause,
        create_revision: Option<Revision>,
    ) -> Result<Deleted> {
        self.mutate(1, |state, _| {
            if create_revision.is_some_and(|r| state.create_revision(key) != Some(r)) {
                return Ok(Applied::nothing(state.deleted(None)));
            }
            let found = state.delete(key, cause);
            let changes = found.iter().map(|(_, c)| c.clone()).collect();
            Ok(Applied {
                value: state.deleted(found),
                changes,
                leases: Vec::new(),
            })
        })
        .await
    }

    pub(crate) async fn set_health(&self, update: HealthUpdate) -> Result<Option<Arc<Instance>>> {
        self.mutate(1, |state, _| {
            let HealthUpdate {
                key,
                create_revision,
                check,
                health,
                output,
                checked_at,
            } = update;
            Ok(
                match state.set_health(&key, create_revision, &check, health, output, checked_at) {
                    Some((stored, change)) => Applied {
                        value: Some(stored),
                        changes: vec![change],
                        leases: Vec::new(),
                    },
                    None => Applied::nothing(None),
                },
            )
        })
        .await
    }

    pub(crate) async fn evict(
        &self,
        key: &InstanceKey,
        create_revision: Revision,
    ) -> Result<Deleted> {
        self.remove(key, RemovalCause::Unhealthy, Some(create_revision))
            .await
    }

    pub(crate) fn get(&self, key: &InstanceKey) -> Result<Option<Arc<Instance>>> {
        Ok(self.read()?.get(key).cloned())
    }

    pub(crate) fn sizes(&self, namespace: &str, service: &str) -> Result<crate::Sizes> {
        Ok(self.read()?.sizes(namespace, service))
    }

    pub(crate) fn counts(&self) -> Result<crate::Counts> {
        Ok(self.read()?.counts())
    }

    pub(crate) fn watch_checks(&self) -> Result<(Snapshot, ChangeFeed)> {
        let state = self.read()?;
        let feed = ChangeFeed::new(self.feed.subscribe());
        Ok((state.checked(), feed))
    }

    pub(crate) async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let lease = self
            .mutate(1, |state, now| {
                let lease = state.grant(ttl, now)?;
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

    pub(crate) async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Lease>> {
        self.check()?;
        Ok(self.write().refresh(lease, Instant::now()))
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
    ) -> Result<Watch> {
        // Subscribing and reading under one lock is what makes the start and the feed seamless:
        // a change is applied under the write lock and published after it, so it is either in
        // the start or still to come on the feed (or both, and the reader skips the repeat).
        let state = self.read()?;
        let feed = ChangeFeed::new(self.feed.subscribe());
        let start = state.watch_start(namespace, service, after);
        Ok(Watch { start, feed })
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
            async fn put(
                &self,
                instance: $crate::Instance,
                lease: Option<$crate::LeaseId>,
            ) -> $crate::Result<std::sync::Arc<$crate::Instance>> {
                self.engine.put(instance, lease).await
            }

            async fn delete(&self, key: &$crate::InstanceKey) -> $crate::Result<$crate::Deleted> {
                self.engine.delete(key).await
            }

            async fn grant_lease(&self, ttl: std::time::Duration) -> $crate::Result<$crate::Lease> {
                self.engine.grant_lease(ttl).await
            }

            async fn keep_alive(
                &self,
                lease: $crate::LeaseId,
            ) -> $crate::Result<Option<$crate::Lease>> {
                self.engine.keep_alive(lease).await
            }

            async fn revoke_lease(&self, lease: $crate::LeaseId) -> $crate::Result<bool> {
                self.engine.revoke_lease(lease).await
            }

            async fn list(
                &self,
                namespace: &str,
                service: &str,
            ) -> $crate::Result<$crate::Snapshot> {
                self.engine.list(namespace, service)
            }

            async fn list_services(&self, namespace: &str) -> $crate::Result<$crate::ServiceList> {
                self.engine.list_services(namespace)
            }

            async fn watch(
                &self,
                namespace: &str,
                service: &str,
                after: Option<$crate::Revision>,
            ) -> $crate::Result<$crate::Watch> {
                self.engine.watch(namespace, service, after)
            }

            fn changes(&self) -> $crate::ChangeFeed {
                self.engine.changes()
            }

            async fn set_health(
                &self,
                update: $crate::HealthUpdate,
            ) -> $crate::Result<Option<std::sync::Arc<$crate::Instance>>> {
                self.engine.set_health(update).await
            }

            async fn evict(
                &self,
                key: &$crate::InstanceKey,
                create_revision: $crate::Revision,
            ) -> $crate::Result<$crate::Deleted> {
                self.engine.evict(key, create_revision).await
            }

            async fn get(
                &self,
                key: &$crate::InstanceKey,
            ) -> $crate::Result<Option<std::sync::Arc<$crate::Instance>>> {
                self.engine.get(key)
            }

            async fn sizes(&self, namespace: &str, service: &str) -> $crate::Result<$crate::Sizes> {
                self.engine.sizes(namespace, service)
            }

            async fn counts(&self) -> $crate::Result<$crate::Counts> {
                self.engine.counts()
            }

            async fn watch_checks(&self) -> $crate::Result<($crate::Snapshot, $crate::ChangeFeed)> {
                self.engine.watch_checks()
            }
        }
    };
}
pub(crate) use store_on_engine;
