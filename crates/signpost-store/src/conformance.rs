//! The store contract as one test suite, generic over [`Store`], that every backend runs
//! unchanged (enable the `test-util` feature). See the contract on [`Store`].
//!
//! A backend's tests call [`conformance_tests!`](crate::conformance_tests) with a function that
//! makes a fresh, empty store from [`Options`]; it gets one `#[tokio::test]` per rule.
//! The suite uses real time (ttls of a second), so that backends with their own clocks, such as
//! etcd, can run it too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::{
    Change, ChangeFeed, Error, FeedItem, Instance, InstanceKey, RemovalCause, Store, WatchStart,
};

/// How the suite wants a store made for one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Keep at most this many changes of history (a backend may keep a little more).
    pub history_limit: usize,
    /// Hold at most this many changes per feed subscriber before it lags.
    pub feed_capacity: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            history_limit: 1_000,
            feed_capacity: 1_000,
        }
    }
}

/// Generates one `#[tokio::test]` per rule of the contract. `$make` is an async function
/// `Options -> (impl Store, guard)`; the guard lives as long as the test (a temp dir, say).
///
/// With `if $ready`, each test first calls `$ready()` and skips when it answers false (for a
/// backend that needs an outside program that may not be installed).
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::conformance_tests!(@all $make, || true);
    };
    ($make:path, if $ready:path) => {
        $crate::conformance_tests!(@all $make, $ready);
    };
    (@all $make:path, $ready:expr) => {
        $crate::conformance_tests!(@each $make, $ready;
            revisions_increase_by_one_per_change,
            upserts_keep_create_revision,
            reads_are_sorted_and_counted,
            leases_expire_with_their_instances,
            revoke_and_refresh,
            joining_a_dead_lease_fails,
            watch_replays_exactly_after_a_revision,
            compacted_history_gives_a_snapshot,
            a_lagging_feed_says_so_and_goes_on,
            concurrent_writers_get_distinct_ordered_revisions,
        );
    };
    (@each $make:path, $ready:expr; $($name:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if !($ready)() {
                    return;
                }
                $crate::conformance::$name($make).await;
            }
        )*
    };
}

/// An instance of `service` with `id`, ready to put.
pub fn instance(service: &str, id: &str) -> Instance {
    Instance {
        service: service.into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        ..Instance::default()
    }
}

fn key(service: &str, id: &str) -> InstanceKey {
    instance(service, id).key()
}

async fn next_change(feed: &mut ChangeFeed) -> Arc<Change> {
    match tokio::time::timeout(Duration::from_secs(10), feed.next()).await {
        Ok(FeedItem::Change(c)) => c,
        Ok(other) => panic!("expected a change, got {other:?}"),
        Err(_) => panic!("no change on the feed within 10s"),
    }
}

async fn revision<S: Store>(store: &S) -> u64 {
    store.list("default", "-").await.unwrap().revision
}

pub async fn revisions_increase_by_one_per_change<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let start = revision(&store).await;
    let a = store.put(instance("svc", "a"), None).await.unwrap();
    assert_eq!(a.mod_revision, start + 1);
    let b = store.put(instance("svc", "b"), None).await.unwrap();
    assert_eq!(b.mod_revision, start + 2);
    let gone = store.delete(&key("svc", "a")).await.unwrap();
    assert_eq!(gone.revision, start + 3);
    assert_eq!(gone.prev.map(|p| p.id.clone()), Some("a".to_string()));
    let nothing = store.delete(&key("svc", "a")).await.unwrap();
    assert_eq!(
        (nothing.prev, nothing.revision),
        (None, start + 3),
        "deleting nothing takes no revision"
    );
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.keep_alive(lease.id).await.unwrap();
    assert_eq!(
        revision(&store).await,
        start + 3,
        "lease grants and refreshes take no revision"
    );
}

pub async fn upserts_keep_create_revision<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let first = store.put(instance("svc", "a"), None).await.unwrap();
    let mut changed = instance("svc", "a");
    changed.port = 9090;
    let second = store.put(changed, None).await.unwrap();
    assert_eq!(second.create_revision, first.create_revision);
    assert_eq!(second.mod_revision, first.mod_revision + 1);
    assert_eq!(second.port, 9090);
    let listed = store.list("default", "svc").await.unwrap();
    assert_eq!(listed.instances, vec![second.clone()]);
    assert_eq!(listed.revision, second.mod_revision);
}

pub async fn reads_are_sorted_and_counted<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    for id in ["c", "a", "b"] {
        store.put(instance("web", id), None).await.unwrap();
    }
    store.put(instance("api", "x"), None).await.unwrap();
    let mut other = instance("api", "y");
    other.namespace = "staging".into();
    let last = store.put(other, None).await.unwrap();

    let web = store.list("default", "web").await.unwrap();
    let ids: Vec<&str> = web.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let services = store.list_services("default").await.unwrap();
    assert_eq!(services.revision, last.mod_revision);
    let counts: Vec<(&str, u32, u32)> = services
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.instances, s.healthy))
        .collect();
    assert_eq!(counts, [("api", 1, 1), ("web", 3, 3)]);
    assert_eq!(
        store.list_services("staging").await.unwrap().services.len(),
        1
    );
    assert!(
        store
            .list_services("empty")
            .await
            .unwrap()
            .services
            .is_empty()
    );
}

pub async fn leases_expire_with_their_instances<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    assert_eq!(lease.ttl, Duration::from_secs(1));
    store
        .put(instance("svc", "a"), Some(lease.id))
        .await
        .unwrap();
    let b = store
        .put(instance("other", "b"), Some(lease.id))
        .await
        .unwrap();
    store
        .put(instance("svc", "persistent"), None)
        .await
        .unwrap();
    assert_eq!(b.lease_id, Some(lease.id));
    let mut feed = store.watch("default", "svc", None).await.unwrap().feed;
    let granted = std::time::Instant::now();

    let change = next_change(&mut feed).await;
    let lived = granted.elapsed();
    assert!(
        lived < Duration::from_millis(2_500),
        "expired {lived:?} after grant (ttl 1s)"
    );
    let removed: BTreeSet<&str> = change
        .events
        .iter()
        .map(|e| e.prev.as_ref().unwrap().id.as_str())
        .collect();
    assert_eq!(
        removed,
        BTreeSet::from(["a", "b"]),
        "one revision for the whole lease"
    );
    assert!(
        change
            .events
            .iter()
            .all(|e| e.current.is_none() && e.removal == Some(RemovalCause::Expired))
    );
    let left = store.list("default", "svc").await.unwrap();
    assert_eq!(left.instances.len(), 1);
    assert_eq!(store.keep_alive(lease.id).await.unwrap(), None);
}

pub async fn revoke_and_refresh<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let kept = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    store
        .put(instance("svc", "kept"), Some(kept.id))
        .await
        .unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let refreshed = store.keep_alive(kept.id).await.unwrap();
        assert_eq!(
            refreshed.map(|l| l.id),
            Some(kept.id),
            "a refreshed lease stays alive"
        );
    }
    assert_eq!(
        store.list("default", "svc").await.unwrap().instances.len(),
        1
    );

    let mut feed = store.watch("default", "svc", None).await.unwrap().feed;
    assert!(store.revoke_lease(kept.id).await.unwrap());
    let change = next_change(&mut feed).await;
    assert_eq!(change.events.len(), 1);
    assert_eq!(change.events[0].removal, Some(RemovalCause::Expired));
    assert!(
        !store.revoke_lease(kept.id).await.unwrap(),
        "revoking twice finds nothing"
    );
    assert_eq!(store.keep_alive(kept.id).await.unwrap(), None);
    assert_eq!(
        store.keep_alive(u64::MAX - 7).await.unwrap(),
        None,
        "unknown lease"
    );
}

pub async fn joining_a_dead_lease_fails<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.revoke_lease(lease.id).await.unwrap();
    let before = revision(&store).await;
    assert_eq!(
        store.put(instance("svc", "a"), Some(lease.id)).await,
        Err(Error::LeaseNotFound(lease.id))
    );
    assert_eq!(
        revision(&store).await,
        before,
        "a failed put takes no revision"
    );
    assert!(
        store
            .list("default", "svc")
            .await
            .unwrap()
            .instances
            .is_empty()
    );
}

pub async fn watch_replays_exactly_after_a_revision<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let first = store.put(instance("svc", "a"), None).await.unwrap();
    store.put(instance("svc", "b"), None).await.unwrap();
    store.delete(&key("svc", "a")).await.unwrap();
    let last = store.put(instance("elsewhere", "c"), None).await.unwrap();

    let watch = store
        .watch("default", "svc", Some(first.mod_revision))
        .await
        .unwrap();
    match watch.start {
        WatchStart::Replay { changes, revision } => {
            let revisions: Vec<u64> = changes.iter().map(|c| c.revision).collect();
            let expected: Vec<u64> = (first.mod_revision + 1..=last.mod_revision).collect();
            assert_eq!(
                revisions, expected,
                "every change after the revision, in order, no holes"
            );
            assert_eq!(revision, last.mod_revision);
        }
        other => panic!("expected a replay, got {other:?}"),
    }
    // The feed goes on after the replay with no gap.
    let mut feed = watch.feed;
    let next = store.put(instance("svc", "d"), None).await.unwrap();
    loop {
        let change = next_change(&mut feed).await;
        if change.revision > last.mod_revision {
            assert_eq!(change.revision, next.mod_revision);
            break;
        }
    }

    let fresh = store.watch("default", "svc", None).await.unwrap();
    match fresh.start {
        WatchStart::Snapshot(s) => {
            let ids: Vec<&str> = s.instances.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(ids, ["b", "d"]);
            assert_eq!(s.revision, next.mod_revision);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

pub async fn compacted_history_gives_a_snapshot<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let options = Options {
        history_limit: 4,
        ..Options::default()
    };
    let (store, _guard) = make(options).await;
    let first = store.put(instance("svc", "a"), None).await.unwrap();
    let mut last = first.clone();
    for n in 0..20 {
        last = store
            .put(instance("svc", &format!("n{}", n % 3)), None)
            .await
            .unwrap();
    }
    for gone in [first.mod_revision, last.mod_revision + 1_000] {
        match store
            .watch("default", "svc", Some(gone))
            .await
            .unwrap()
            .start
        {
            WatchStart::Snapshot(s) => {
                assert_eq!(s.revision, last.mod_revision);
                let ids: Vec<&str> = s.instances.iter().map(|i| i.id.as_str()).collect();
                assert_eq!(
                    ids,
                    ["a", "n0", "n1", "n2"],
                    "the snapshot is exactly the current view"
                );
            }
            other => panic!("resuming from {gone}: expected a snapshot, got {other:?}"),
        }
    }
}

pub async fn a_lagging_feed_says_so_and_goes_on<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let options = Options {
        feed_capacity: 4,
        ..Options::default()
    };
    let (store, _guard) = make(options).await;
    let mut feed = store.watch("default", "svc", None).await.unwrap().feed;
    let mut last = 0;
    for n in 0..32 {
        last = store
            .put(instance("svc", &n.to_string()), None)
            .await
            .unwrap()
            .mod_revision;
    }
    let mut lagged = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), feed.next()).await {
            Ok(FeedItem::Lagged) => lagged = true,
            Ok(FeedItem::Change(c)) if c.revision == last => break,
            Ok(FeedItem::Change(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(lagged, "32 unread changes through a feed of 4 must lag");
}

pub async fn concurrent_writers_get_distinct_ordered_revisions<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options {
        feed_capacity: 10_000,
        ..Options::default()
    })
    .await;
    let store = Arc::new(store);
    let mut feed = store.watch("default", "svc", None).await.unwrap().feed;
    let start = revision(&*store).await;
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut revisions = Vec::new();
                for n in 0..25 {
                    let put = store
                        .put(instance("svc", &format!("w{w}-{n}")), None)
                        .await
                        .unwrap();
                    revisions.push(put.mod_revision);
                }
                revisions
            })
        })
        .collect();
    let mut all = Vec::new();
    for writer in writers {
        let revisions = writer.await.unwrap();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "one writer's revisions increase"
        );
        all.extend(revisions);
    }
    all.sort_unstable();
    let expected: Vec<u64> = (start + 1..=start + 400).collect();
    assert_eq!(
        all, expected,
        "400 changes, 400 distinct consecutive revisions"
    );
    for expected in start + 1..=start + 400 {
        assert_eq!(
            next_change(&mut feed).await.revision,
            expected,
            "the feed is in revision order"
        );
    }
    assert_eq!(
        store.list("default", "svc").await.unwrap().instances.len(),
        400
    );
}
