//! The replica: this server's copy of what etcd holds, the same [`State`] the other backends
//! use, driven by etcd's revisions, with the change feed and the revision writers wait on.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::sync::{broadcast, watch};

use crate::feed::ChangeFeed;
use crate::model::{Change, Event, Revision};
use crate::state::State;
use crate::{Error, Result};

/// What the replica task and the store share.
#[derive(Debug)]
pub(super) struct Replica {
    pub(super) state: RwLock<State>,
    pub(super) feed: broadcast::Sender<Arc<Change>>,
    /// The replica's revision, for writers waiting to see their own change.
    pub(super) applied: watch::Sender<Revision>,
    /// `Err` with the reason while etcd cannot be followed.
    pub(super) health: watch::Sender<std::result::Result<(), String>>,
}

impl Replica {
    pub(super) fn read(&self) -> RwLockReadGuard<'_, State> {
        // Changes are built before the lock is taken: poisoning cannot leave half a change.
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn check(&self) -> Result<()> {
        match &*self.health.borrow() {
            Ok(()) => Ok(()),
            Err(reason) => Err(Error::Unavailable(format!("etcd unreachable: {reason}"))),
        }
    }

    /// Replaces the whole state (a first load, or after etcd compacted past the replica) and
    /// tells every subscriber to start over.
    pub(super) fn load(&self, state: State) {
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

    pub(super) fn apply(&self, revision: Revision, events: Vec<Event>) {
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

    pub(super) fn set_health(&self, health: std::result::Result<(), String>) {
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
