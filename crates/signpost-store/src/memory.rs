//! The memory backend: all state in one process, gone when it stops.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use crate::feed::ChangeFeed;
use crate::model::{
    Change, Deleted, Instance, InstanceKey, Lease, LeaseId, RemovalCause, Revision, ServiceList,
    Snapshot,
};
use crate::state::State;
use crate::{Result, Store, Watch, WatchStart};

/// Tuning for a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// How many changes are kept for watches that resume from a revision. A watch resuming from
    /// before the oldest kept change gets a fresh snapshot instead of a replay.
    pub history_limit: usize,
    /// How many changes the feed holds for each subscriber before it counts as lagging.
    pub feed_capacity: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            history_limit: 10_000,
            feed_capacity: 4_096,
        }
    }
}

/// A store that keeps everything in memory. Cheap to clone: clones share one state.
///
/// Revisions start from the wall clock in microseconds rather than from zero. A restarted memory
/// store has lost its history, and a client that resumes a watch with a revision from the previous
/// run must get a fresh snapshot, not a replay of unrelated changes that happen to carry the same
/// numbers; starting above any revision the previous run could have reached guarantees that.
///
/// Leases expire on a background task that lives as long as the store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: RwLock<State>,
    feed: broadcast::Sender<Arc<Change>>,
    // Wakes the expiry task when a lease that may be due earlier than its current sleep is granted,
    // and when the store is dropped.
    wake: Arc<Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl MemoryStore {
    /// A new, empty store. Must be called inside a Tokio runtime (it spawns the expiry task).
    pub fn new(config: MemoryConfig) -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        Self::starting_at(config, start)
    }

    /// A new, empty store whose first change takes revision `start + 1`.
    pub fn starting_at(config: MemoryConfig, start: Revision) -> Self {
        let (feed, _) = broadcast::channel(config.feed_capacity.max(1));
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            // Lease ids start from the same clock, for the same reason as revisions: a client
            // refreshing a lease from a previous run must be told it expired, not refresh another.
            state: RwLock::new(State::new(start, start, config.history_limit)),
            feed,
            wake: wake.clone(),
        });
        tokio::spawn(expire_leases(Arc::downgrade(&shared), wake));
        MemoryStore { shared }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed in a way later readers
        // should refuse: every mutation is built before it is linked in. So poisoning is ignored.
        self.shared
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.shared
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, change: Arc<Change>) {
        // No subscribers is not an error: nobody is watching.
        let _ = self.shared.feed.send(change);
    }
}

async fn expire_leases(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let store = MemoryStore { shared };
            let now = Instant::now();
            let mut state = store.write();
            for change in state.expire(now) {
                store.publish(change);
            }
            state.next_deadline()
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

impl Store for MemoryStore {
    async fn put(&self, instance: Instance, lease: Option<LeaseId>) -> Result<Arc<Instance>> {
        let mut state = self.write();
        let (stored, change) = state.put(instance, lease, Instant::now())?;
        self.publish(change);
        Ok(stored)
    }

    async fn delete(&self, key: &InstanceKey) -> Result<Deleted> {
        let mut state = self.write();
        let found = state.delete(key, RemovalCause::Deregistered);
        if let Some((_, change)) = &found {
            self.publish(change.clone());
        }
        Ok(state.deleted(found))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let lease = self.write().grant(ttl, Instant::now())?;
        self.shared.wake.notify_one();
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Lease>> {
        Ok(self.write().refresh(lease, Instant::now()))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<bool> {
        let mut state = self.write();
        match state.revoke(lease) {
            None => Ok(false),
            Some(change) => {
                if let Some(change) = change {
                    self.publish(change);
                }
                Ok(true)
            }
        }
    }

    async fn list(&self, namespace: &str, service: &str) -> Result<Snapshot> {
        Ok(self.read().list(namespace, service))
    }

    async fn list_services(&self, namespace: &str) -> Result<ServiceList> {
        Ok(self.read().list_services(namespace))
    }

    async fn watch(
        &self,
        namespace: &str,
        service: &str,
        after: Option<Revision>,
    ) -> Result<Watch> {
        // Subscribing and reading under one lock is what makes the start and the feed seamless:
        // changes are published while the write lock is held, so none can fall between them.
        let state = self.read();
        let feed = ChangeFeed::new(self.shared.feed.subscribe());
        let replay = after.and_then(|revision| state.replay_after(revision));
        let start = match replay {
            Some(changes) => WatchStart::Replay {
                changes,
                revision: state.revision(),
            },
            None => WatchStart::Snapshot(state.list(namespace, service)),
        };
        Ok(Watch { start, feed })
    }
}
