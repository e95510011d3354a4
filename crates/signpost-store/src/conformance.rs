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
    Change, ChangeFeed, Condition, Error, FeedItem, Health, HealthCheck, HealthUpdate, Instance,
    InstanceKey, Lease, LeaseId, Probe, Quota, RemovalCause, Store, WatchStart, Write, Written,
};

/// The suite's shorthands for the writes it makes most, each one [`Store::write`].
pub trait Shorthand: Store {
    fn put(
        &self,
        instance: Instance,
        lease: Option<LeaseId>,
    ) -> crate::BoxFuture<'_, crate::Result<Arc<Instance>>> {
        let write = self.write(Write::put(instance, lease));
        Box::pin(async move {
            match write.await? {
                Written::Stored(stored) => Ok(stored),
                other => panic!("a put answered {other:?}"),
            }
        })
    }

    fn delete(&self, key: &InstanceKey) -> crate::BoxFuture<'_, crate::Result<Written>> {
        self.write(Write::delete(key.clone()))
    }

    fn grant(&self, ttl: Duration) -> crate::BoxFuture<'_, crate::Result<Lease>> {
        self.grant_lease(ttl, Quota::default())
    }
}

impl<S: Store + ?Sized> Shorthand for S {}

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
            conditions_are_judged_with_the_write,
            health_verdicts_follow_the_rules,
            usage_counts_what_the_store_holds,
            a_lease_holds_one_namespace,
            watch_checks_follows_every_checked_instance,
            racing_writers_never_pass_a_quota_or_an_owner,
            racing_registrations_never_pass_the_lease_quota,
            a_lease_quota_counts_live_leases,
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
    store.list("default", "-").unwrap().revision
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
    match store.delete(&key("svc", "a")).await.unwrap() {
        Written::Removed { prev, revision } => {
            assert_eq!(revision, start + 3);
            assert_eq!(prev.id, "a");
        }
        other => panic!("expected a removal, got {other:?}"),
    }
    assert_eq!(
        store.delete(&key("svc", "a")).await.unwrap(),
        Written::Unchanged {
            revision: start + 3
        },
        "deleting nothing takes no revision"
    );
    let lease = store.grant(Duration::from_secs(30)).await.unwrap();
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
    let listed = store.list("default", "svc").unwrap();
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

    let web = store.list("default", "web").unwrap();
    let ids: Vec<&str> = web.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let services = store.list_services("default").unwrap();
    assert_eq!(services.revision, last.mod_revision);
    let counts: Vec<(&str, u32, u32)> = services
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.instances, s.healthy))
        .collect();
    assert_eq!(counts, [("api", 1, 1), ("web", 3, 3)]);
    assert_eq!(store.list_services("staging").unwrap().services.len(), 1);
    assert!(store.list_services("empty").unwrap().services.is_empty());
}

pub async fn leases_expire_with_their_instances<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let lease = store.grant(Duration::from_secs(1)).await.unwrap();
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
    let mut feed = store.changes();
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
    let left = store.list("default", "svc").unwrap();
    assert_eq!(left.instances.len(), 1);
    assert_eq!(store.keep_alive(lease.id).await.unwrap(), None);
}

pub async fn revoke_and_refresh<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let kept = store.grant(Duration::from_secs(1)).await.unwrap();
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
    assert_eq!(store.list("default", "svc").unwrap().instances.len(), 1);

    let mut feed = store.changes();
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
    let lease = store.grant(Duration::from_secs(30)).await.unwrap();
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
    assert!(store.list("default", "svc").unwrap().instances.is_empty());
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

    let mut feed = store.changes();
    let start = store
        .watch("default", "svc", Some(first.mod_revision))
        .await
        .unwrap();
    match start {
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
    let next = store.put(instance("svc", "d"), None).await.unwrap();
    loop {
        let change = next_change(&mut feed).await;
        if change.revision > last.mod_revision {
            assert_eq!(change.revision, next.mod_revision);
            break;
        }
    }

    let fresh = store.watch("default", "svc", None).await.unwrap();
    match fresh {
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
        match store.watch("default", "svc", Some(gone)).await.unwrap() {
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
    let mut feed = store.changes();
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
    let mut feed = store.changes();
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
    assert_eq!(store.list("default", "svc").unwrap().instances.len(), 400);
}

fn checked(service: &str, id: &str, path: &str) -> Instance {
    let mut instance = instance(service, id);
    instance.check = Some(HealthCheck {
        probe: Probe::Http {
            path: path.into(),
            method: String::new(),
            headers: Vec::new(),
        },
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(1),
        deregister_critical_after: None,
        successes_before_passing: 1,
        failures_before_critical: 1,
    });
    instance
}

fn verdict(of: &Instance, health: Health, output: &str) -> Write {
    Write::Health(HealthUpdate {
        key: of.key(),
        create_revision: of.create_revision,
        check: of.check.clone().unwrap(),
        health,
        output: output.into(),
        checked_at: std::time::SystemTime::now(),
    })
}

fn conflict<T: std::fmt::Debug>(result: crate::Result<T>) -> String {
    match result {
        Err(Error::Conflict(reason)) => reason,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

pub async fn conditions_are_judged_with_the_write<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let create = |instance: Instance, condition: Condition| Write::Put {
        instance,
        lease: None,
        condition,
        quota: Quota::default(),
    };
    let first = store
        .write(create(instance("svc", "a"), Condition::Absent))
        .await
        .unwrap();
    let first = first.stored().unwrap().clone();
    let before = revision(&store).await;
    let again = conflict(
        store
            .write(create(instance("svc", "a"), Condition::Absent))
            .await,
    );
    assert!(again.contains("svc/a already exists"), "{again}");
    assert_eq!(
        revision(&store).await,
        before,
        "a refused write takes no revision"
    );

    // The registration condition: an update of exactly that registration.
    let mut moved = instance("svc", "a");
    moved.port = 9;
    let updated = store
        .write(create(
            moved.clone(),
            Condition::Registration(first.create_revision),
        ))
        .await
        .unwrap();
    assert_eq!(updated.stored().unwrap().port, 9);
    store.delete(&first.key()).await.unwrap();
    let reborn = store.put(instance("svc", "a"), None).await.unwrap();
    conflict(
        store
            .write(create(
                moved,
                Condition::Registration(first.create_revision),
            ))
            .await,
    );
    conflict(
        store
            .write(Write::Delete {
                key: first.key(),
                cause: RemovalCause::Unhealthy,
                condition: Condition::Registration(first.create_revision),
            })
            .await,
    );
    assert_eq!(
        store.list("default", "svc").unwrap().instances,
        vec![reborn]
    );

    // Ownership: a foreign owner can neither overwrite nor remove; the owner and an unowned
    // instance's writers can.
    let mut owned = instance("svc", "o");
    owned.owner = Some("alice".into());
    store
        .write(create(owned.clone(), Condition::OwnedBy("alice".into())))
        .await
        .unwrap();
    let mut taken = owned.clone();
    taken.owner = Some("mallory".into());
    let refused = conflict(
        store
            .write(create(taken, Condition::OwnedBy("mallory".into())))
            .await,
    );
    assert!(refused.contains("another token"), "{refused}");
    conflict(
        store
            .write(Write::Delete {
                key: owned.key(),
                cause: RemovalCause::Deregistered,
                condition: Condition::OwnedBy("mallory".into()),
            })
            .await,
    );
    let listed = store.list("default", "svc").unwrap();
    let o = listed.instances.iter().find(|i| i.id == "o").unwrap();
    assert_eq!(o.owner.as_deref(), Some("alice"));
    store
        .write(Write::Delete {
            key: owned.key(),
            cause: RemovalCause::Deregistered,
            condition: Condition::OwnedBy("alice".into()),
        })
        .await
        .unwrap();
    let mut claimed = instance("svc", "a");
    claimed.owner = Some("bob".into());
    store
        .write(create(claimed, Condition::OwnedBy("bob".into())))
        .await
        .unwrap();
}

pub async fn health_verdicts_follow_the_rules<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let new = store
        .put(checked("svc", "a", "/health"), None)
        .await
        .unwrap();
    assert_eq!(
        (new.health, new.health_output.as_str()),
        (Health::Critical, "not checked yet")
    );
    assert_eq!(new.health_checked_at, None);

    // The first verdict is recorded even when it keeps the status, for its output.
    let first = store
        .write(verdict(&new, Health::Critical, "connection refused"))
        .await
        .unwrap();
    let first = first.stored().unwrap().clone();
    assert_eq!(first.mod_revision, new.mod_revision + 1);
    assert_eq!(first.health_output, "connection refused");
    assert!(first.health_checked_at.is_some());
    // A verdict that changes no status takes no revision.
    assert_eq!(
        store
            .write(verdict(&first, Health::Critical, "still refused"))
            .await
            .unwrap(),
        Written::Unchanged {
            revision: first.mod_revision
        }
    );
    let passing = store
        .write(verdict(&first, Health::Passing, "200 OK"))
        .await
        .unwrap();
    let passing = passing.stored().unwrap().clone();
    assert_eq!(passing.health, Health::Passing);

    // An update with the same check keeps the verdict; a new check must pass again.
    let mut moved = checked("svc", "a", "/health");
    moved.port = 9;
    let kept = store.put(moved, None).await.unwrap();
    assert_eq!(
        (kept.health, kept.health_output.as_str()),
        (Health::Passing, "200 OK")
    );
    let rechecked = store
        .put(checked("svc", "a", "/ready"), None)
        .await
        .unwrap();
    assert_eq!(rechecked.health, Health::Critical);
    assert_eq!(rechecked.create_revision, new.create_revision);

    // A verdict on the old check, or on an older registration, is stale.
    let before = revision(&store).await;
    conflict(
        store
            .write(verdict(&passing, Health::Passing, "200 OK"))
            .await,
    );
    store.delete(&new.key()).await.unwrap();
    let reborn = store
        .put(checked("svc", "a", "/ready"), None)
        .await
        .unwrap();
    conflict(
        store
            .write(verdict(&rechecked, Health::Passing, "200 OK"))
            .await,
    );
    assert_eq!(
        revision(&store).await,
        before + 2,
        "stale verdicts take no revision"
    );

    // Eviction is a delete of that registration, with its cause on the feed.
    let mut feed = store.changes();
    let evicted = store
        .write(Write::Delete {
            key: reborn.key(),
            cause: RemovalCause::Unhealthy,
            condition: Condition::Registration(reborn.create_revision),
        })
        .await
        .unwrap();
    assert!(matches!(evicted, Written::Removed { .. }), "{evicted:?}");
    let change = next_change(&mut feed).await;
    assert_eq!(change.events[0].removal, Some(RemovalCause::Unhealthy));
    conflict(store.write(verdict(&reborn, Health::Passing, "late")).await);
}

pub async fn usage_counts_what_the_store_holds<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let lease = store.grant(Duration::from_secs(30)).await.unwrap();
    for id in ["a", "b", "c"] {
        store
            .put(instance("web", id), Some(lease.id))
            .await
            .unwrap();
    }
    store.put(instance("api", "x"), None).await.unwrap();
    let mut staging = instance("api", "y");
    staging.namespace = "staging".into();
    let last = store.put(staging, None).await.unwrap();
    let usage = store.usage("default", "web").unwrap();
    assert_eq!(
        (
            usage.instances,
            usage.services,
            usage.namespace_instances,
            usage.service_instances
        ),
        (5, 3, 4, 3)
    );
    assert_eq!(usage.leases, 1);
    assert_eq!(usage.revision, last.mod_revision);
    store.delete(&key("web", "a")).await.unwrap();
    let usage = store.usage("staging", "api").unwrap();
    assert_eq!(
        (
            usage.instances,
            usage.namespace_instances,
            usage.service_instances
        ),
        (4, 1, 1)
    );
    assert_eq!(store.usage("none", "none").unwrap().namespace_instances, 0);
    // A backend that can be cut off from its data says how it is: serving, now.
    if let Some(serving) = store.serving() {
        assert_eq!(*serving.borrow(), Ok(()));
    }
}

pub async fn a_lease_holds_one_namespace<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let lease = store.grant(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        store.lease_namespace(lease.id).await.unwrap(),
        None,
        "holds nothing yet"
    );
    let mut payments = instance("pay", "p1");
    payments.namespace = "payments".into();
    store.put(payments, Some(lease.id)).await.unwrap();
    assert_eq!(
        store.lease_namespace(lease.id).await.unwrap().as_deref(),
        Some("payments")
    );
    match store.put(instance("pay", "p2"), Some(lease.id)).await {
        Err(Error::Invalid {
            field: "lease_id",
            reason,
        }) => {
            assert!(reason.contains("payments"), "{reason}")
        }
        other => panic!("an instance of another namespace joined the lease: {other:?}"),
    }
    assert_eq!(store.lease_namespace(u64::MAX - 3).await.unwrap(), None);
}

pub async fn watch_checks_follows_every_checked_instance<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    store.put(checked("web", "a", "/h"), None).await.unwrap();
    let mut elsewhere = checked("api", "b", "/h");
    elsewhere.namespace = "staging".into();
    store.put(elsewhere, None).await.unwrap();
    store.put(instance("web", "unchecked"), None).await.unwrap();
    let (snapshot, mut feed) = tokio::time::timeout(Duration::from_secs(20), store.watch_checks())
        .await
        .expect("watch_checks answers")
        .unwrap();
    let ids: BTreeSet<&str> = snapshot.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, BTreeSet::from(["a", "b"]));
    let next = store.put(checked("web", "c", "/h"), None).await.unwrap();
    loop {
        let change = next_change(&mut feed).await;
        if change.revision > snapshot.revision {
            assert_eq!(
                change.revision, next.mod_revision,
                "no gap after the snapshot"
            );
            break;
        }
    }
}

/// Many writers racing for the last places: never more than the quota, never a foreign
/// overwrite, and every refusal says why.
pub async fn racing_writers_never_pass_a_quota_or_an_owner<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let store = Arc::new(store);
    let quota = Quota {
        instances_per_service: 10,
        instances_per_namespace: 15,
        ..Quota::default()
    };
    for n in 0..9 {
        store
            .put(instance("svc", &format!("old{n}")), None)
            .await
            .unwrap();
    }
    let race = |service: &'static str, writers: usize| {
        let racers: Vec<_> = (0..writers)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write(Write::Put {
                            instance: instance(service, &format!("new{n}")),
                            lease: None,
                            condition: Condition::Always,
                            quota,
                        })
                        .await
                })
            })
            .collect();
        async move {
            let mut won = 0;
            for racer in racers {
                match racer.await.unwrap() {
                    Ok(_) => won += 1,
                    Err(Error::Limit { .. }) => {}
                    Err(other) => panic!("a racer failed otherwise: {other}"),
                }
            }
            won
        }
    };
    assert_eq!(race("svc", 60).await, 1, "one place left in the service");
    assert_eq!(store.list("default", "svc").unwrap().instances.len(), 10);
    // The namespace holds 10; 5 places are left in it, raced for from another service.
    assert_eq!(
        race("other", 60).await,
        5,
        "five places left in the namespace"
    );
    assert_eq!(
        store.usage("default", "other").unwrap().namespace_instances,
        15
    );

    // Two owners racing for the same ids: each id ends with one owner, whose write was the one
    // that won; the other got a conflict, and nothing was overwritten.
    let racers: Vec<_> = (0..40)
        .map(|n| {
            let store = store.clone();
            let owner = if n % 2 == 0 { "alice" } else { "bob" };
            tokio::spawn(async move {
                let mut claim = instance("owned", &format!("id{}", n / 2));
                claim.owner = Some(owner.into());
                let result = store
                    .write(Write::Put {
                        instance: claim,
                        lease: None,
                        condition: Condition::OwnedBy(owner.into()),
                        quota: Quota::default(),
                    })
                    .await;
                (n / 2, owner, result)
            })
        })
        .collect();
    let mut winners = std::collections::BTreeMap::new();
    for racer in racers {
        let (id, owner, result) = racer.await.unwrap();
        match result {
            Ok(_) => assert!(winners.insert(id, owner).is_none(), "two owners won id{id}"),
            Err(Error::Conflict(_)) => {}
            Err(other) => panic!("a claim failed otherwise: {other}"),
        }
    }
    assert_eq!(winners.len(), 20, "every id was won once");
    for stored in store.list("default", "owned").unwrap().instances {
        let id: usize = stored.id.trim_start_matches("id").parse().unwrap();
        assert_eq!(
            stored.owner.as_deref(),
            Some(winners[&id]),
            "{} overwritten",
            stored.id
        );
    }
}

/// Writers racing for the last places of a lease quota, each granting a lease and putting its
/// instance on it, as a registration with a ttl does: never more leases holding instances than
/// the quota. (A backend may refuse at the grant or at the lease's first instance.)
pub async fn racing_registrations_never_pass_the_lease_quota<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let store = Arc::new(store);
    let quota = Quota {
        leases: 5,
        ..Quota::default()
    };
    for n in 0..3 {
        let lease = store
            .grant_lease(Duration::from_secs(30), quota)
            .await
            .unwrap();
        store
            .put(instance("held", &n.to_string()), Some(lease.id))
            .await
            .unwrap();
    }
    let racers: Vec<_> = (0..40)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let lease = match store.grant_lease(Duration::from_secs(30), quota).await {
                    Ok(lease) => lease,
                    Err(Error::Limit {
                        name: "max_leases", ..
                    }) => return false,
                    Err(other) => panic!("a grant failed otherwise: {other}"),
                };
                let put = Write::Put {
                    instance: instance("racing", &n.to_string()),
                    lease: Some(lease.id),
                    condition: Condition::Always,
                    quota,
                };
                match store.write(put).await {
                    Ok(_) => true,
                    Err(Error::Limit {
                        name: "max_leases", ..
                    }) => {
                        // As the server does: a lease granted for a refused registration goes.
                        store.revoke_lease(lease.id).await.unwrap();
                        false
                    }
                    Err(other) => panic!("a put failed otherwise: {other}"),
                }
            })
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        won += usize::from(racer.await.unwrap());
    }
    assert_eq!(won, 2, "two places were left");
    assert_eq!(store.list("default", "racing").unwrap().instances.len(), 2);
}

pub async fn a_lease_quota_counts_live_leases<S: Store, G, F, Fut>(make: F)
where
    F: FnOnce(Options) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let (store, _guard) = make(Options::default()).await;
    let quota = Quota {
        leases: 2,
        ..Quota::default()
    };
    let mut leases = Vec::new();
    for n in 0..2 {
        let lease = store
            .grant_lease(Duration::from_secs(30), quota)
            .await
            .unwrap();
        store
            .put(instance("svc", &n.to_string()), Some(lease.id))
            .await
            .unwrap();
        leases.push(lease);
    }
    match store.grant_lease(Duration::from_secs(30), quota).await {
        Err(Error::Limit {
            name: "max_leases",
            limit: 2,
            ..
        }) => {}
        other => panic!("a third lease under a quota of 2: {other:?}"),
    }
    store.revoke_lease(leases[0].id).await.unwrap();
    // A backend that counts from its replica sees the revoke a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match store.grant_lease(Duration::from_secs(30), quota).await {
            Ok(_) => break,
            Err(Error::Limit { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("a lease after a revoke made room: {other:?}"),
        }
    }
}
