//! The memory backend: all state in one process, gone when it stops.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use crate::engine::Engine;
use crate::model::Revision;
use crate::state::State;

/// Tuning for a [`MemoryStore`] (and the in-memory side of the durable store).
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
    engine: Arc<Engine>,
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
        // A client refreshing a lease from a previous run must be told it expired, not refresh
        // another: lease ids carry 32 bits of a keyed hash that differs from run to run.
        let state = State::new(start, 1, config.history_limit);
        MemoryStore {
            engine: Engine::start(state, feed, None),
        }
    }
}

crate::engine::store_on_engine!(MemoryStore);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Shorthand;
    use crate::{Change, ChangeFeed, FeedItem, Instance, RemovalCause, Store, WatchStart, Written};
    use std::time::Duration;
    use tokio::time::Instant;

    fn instance(service: &str, id: &str) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 80,
            ..Instance::default()
        }
    }

    fn store_with(history_limit: usize, feed_capacity: usize) -> MemoryStore {
        let config = MemoryConfig {
            history_limit,
            feed_capacity,
        };
        MemoryStore::starting_at(config, 0)
    }

    fn store() -> MemoryStore {
        store_with(100, 100)
    }

    async fn count(store: &MemoryStore, service: &str) -> usize {
        store.list("default", service).unwrap().instances.len()
    }

    async fn next_change(feed: &mut ChangeFeed) -> Arc<Change> {
        match feed.next().await {
            FeedItem::Change(c) => c,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_expires_after_its_ttl_and_takes_its_instances_at_one_revision() {
        let store = store();
        let granted = Instant::now();
        let lease = store.grant(Duration::from_secs(10)).await.unwrap();
        store.put(instance("a", "1"), Some(lease.id)).await.unwrap();
        store.put(instance("b", "2"), Some(lease.id)).await.unwrap();
        store.put(instance("a", "persistent"), None).await.unwrap();
        let mut feed = store.changes();

        tokio::time::sleep(Duration::from_millis(9_990)).await;
        assert_eq!(count(&store, "a").await, 2, "alive just before its ttl");

        let change = next_change(&mut feed).await;
        let lived = granted.elapsed();
        assert!(
            lived >= Duration::from_secs(10) && lived < Duration::from_secs(11),
            "{lived:?}"
        );
        assert_eq!(change.revision, 4, "one revision for the whole lease");
        assert_eq!(change.events.len(), 2);
        assert!(
            change
                .events
                .iter()
                .all(|e| e.current.is_none() && e.removal == Some(RemovalCause::Expired))
        );
        assert_eq!(count(&store, "a").await, 1, "the persistent instance stays");
        assert_eq!(count(&store, "b").await, 0);
        assert_eq!(store.keep_alive(lease.id).await.unwrap(), None);
        assert_eq!(
            store.put(instance("a", "late"), Some(lease.id)).await,
            Err(crate::Error::LeaseNotFound(lease.id))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_gives_the_full_ttl_again() {
        let store = store();
        let lease = store.grant(Duration::from_secs(3)).await.unwrap();
        store.put(instance("a", "1"), Some(lease.id)).await.unwrap();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let refreshed = store.keep_alive(lease.id).await.unwrap();
            assert_eq!(refreshed.map(|l| l.ttl), Some(Duration::from_secs(3)));
        }
        assert_eq!(
            count(&store, "a").await,
            1,
            "refreshed every 2s, a 3s lease lives on"
        );
        tokio::time::sleep(Duration::from_millis(3_100)).await;
        assert_eq!(
            count(&store, "a").await,
            0,
            "then expires 3s after the last refresh"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_past_its_deadline_is_dead_before_the_sweep() {
        let store = store();
        let lease = store.grant(Duration::from_secs(1)).await.unwrap();
        // Advance the clock without letting the expiry task run.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.keep_alive(lease.id).await.unwrap(), None);
        assert!(store.put(instance("a", "1"), Some(lease.id)).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn many_leases_expire_in_deadline_order() {
        let store = store();
        let mut feed = store.changes();
        for n in (1..=50u64).rev() {
            let lease = store.grant(Duration::from_secs(n)).await.unwrap();
            store
                .put(instance("s", &format!("i{n:02}")), Some(lease.id))
                .await
                .unwrap();
        }
        for _ in 0..50 {
            next_change(&mut feed).await; // the puts
        }
        let mut order = Vec::new();
        for _ in 0..50 {
            let change = next_change(&mut feed).await;
            let id = change.events[0].prev.as_ref().unwrap().id.clone();
            order.push(id);
        }
        let expected: Vec<String> = (1..=50).map(|n| format!("i{n:02}")).collect();
        assert_eq!(order, expected);
    }

    #[tokio::test]
    async fn revoke_removes_at_once_and_an_empty_lease_takes_no_revision() {
        let store = store();
        let empty = store.grant(Duration::from_secs(60)).await.unwrap();
        assert!(store.revoke_lease(empty.id).await.unwrap());
        assert!(!store.revoke_lease(empty.id).await.unwrap());
        assert_eq!(store.list("default", "a").unwrap().revision, 0);

        let lease = store.grant(Duration::from_secs(60)).await.unwrap();
        store.put(instance("a", "1"), Some(lease.id)).await.unwrap();
        assert!(store.revoke_lease(lease.id).await.unwrap());
        let snapshot = store.list("default", "a").unwrap();
        assert!(snapshot.instances.is_empty());
        assert_eq!(snapshot.revision, 2);
    }

    #[tokio::test]
    async fn moving_an_instance_to_another_lease_detaches_it_from_the_first() {
        let store = store();
        let first = store.grant(Duration::from_secs(60)).await.unwrap();
        let second = store.grant(Duration::from_secs(60)).await.unwrap();
        store.put(instance("a", "1"), Some(first.id)).await.unwrap();
        store
            .put(instance("a", "1"), Some(second.id))
            .await
            .unwrap();
        store.revoke_lease(first.id).await.unwrap();
        assert_eq!(
            count(&store, "a").await,
            1,
            "revoking the old lease leaves it alone"
        );
        store.put(instance("a", "1"), None).await.unwrap();
        store.revoke_lease(second.id).await.unwrap();
        assert_eq!(
            count(&store, "a").await,
            1,
            "a persistent instance is on no lease"
        );
    }

    #[tokio::test]
    async fn revisions_and_create_revision_follow_upserts() {
        let store = store();
        let first = store.put(instance("a", "1"), None).await.unwrap();
        let second = store.put(instance("a", "1"), None).await.unwrap();
        assert_eq!((first.create_revision, first.mod_revision), (1, 1));
        assert_eq!((second.create_revision, second.mod_revision), (1, 2));
        let gone = store.delete(&first.key()).await.unwrap();
        assert_eq!(
            gone,
            Written::Removed {
                prev: second,
                revision: 3
            }
        );
        let again = store.delete(&first.key()).await.unwrap();
        assert_eq!(again, Written::Unchanged { revision: 3 });
        let reborn = store.put(instance("a", "1"), None).await.unwrap();
        assert_eq!(reborn.create_revision, 4, "a new life after a delete");
    }

    #[tokio::test]
    async fn a_watch_replays_from_history_or_starts_from_a_snapshot() {
        let store = store_with(5, 100);
        for n in 1..=10 {
            store
                .put(instance("a", &format!("{}", n % 3)), None)
                .await
                .unwrap();
        }
        // History keeps revisions 6..=10.
        match store.watch("default", "a", Some(5)).await.unwrap() {
            WatchStart::Replay { changes, revision } => {
                let revisions: Vec<u64> = changes.iter().map(|c| c.revision).collect();
                assert_eq!(revisions, [6, 7, 8, 9, 10]);
                assert_eq!(revision, 10);
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        match store.watch("default", "a", Some(10)).await.unwrap() {
            WatchStart::Replay { changes, .. } => assert!(changes.is_empty()),
            other => panic!("expected an empty replay, got {other:?}"),
        }
        for gone in [Some(4), Some(11), None] {
            match store.watch("default", "a", gone).await.unwrap() {
                WatchStart::Snapshot(s) => {
                    assert_eq!(s.revision, 10);
                    assert_eq!(s.instances.len(), 3);
                }
                other => panic!("{gone:?}: expected a snapshot, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_feed_that_falls_behind_lags_once_then_goes_on() {
        let store = store_with(100, 4);
        let mut feed = store.changes();
        for n in 0..10 {
            store
                .put(instance("a", &n.to_string()), None)
                .await
                .unwrap();
        }
        assert_eq!(feed.next().await, FeedItem::Lagged);
        let next = next_change(&mut feed).await;
        assert_eq!(next.revision, 7, "the oldest change still held");
    }

    #[tokio::test]
    async fn memory_revisions_start_above_any_earlier_run() {
        let earlier = MemoryStore::new(MemoryConfig::default());
        let revision = earlier
            .put(instance("a", "1"), None)
            .await
            .unwrap()
            .mod_revision;
        let later = MemoryStore::new(MemoryConfig::default());
        let start = later.list("default", "a").unwrap().revision;
        assert!(start >= revision, "{start} < {revision}");
    }
}
