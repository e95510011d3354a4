//! What only the durable backend promises: restarts keep everything, the data directory is
//! exclusive, bad directories fail clearly, and churn does not grow the file.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use signpost_store::conformance::{Shorthand, instance};
use signpost_store::{
    DATA_FILE, DurableStore, Error, FeedItem, MAX_IN_FLIGHT, MemoryConfig, Store, WatchStart,
};

fn open(dir: &std::path::Path) -> DurableStore {
    DurableStore::open(dir, MemoryConfig::default()).expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_instances_leases_and_the_revision_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let lease = store.grant(Duration::from_secs(30)).await.unwrap();
    let leased = store
        .put(instance("svc", "leased"), Some(lease.id))
        .await
        .unwrap();
    let persistent = store
        .put(instance("svc", "persistent"), None)
        .await
        .unwrap();
    store.put(instance("svc", "gone"), None).await.unwrap();
    let deleted = store.delete(&instance("svc", "gone").key()).await.unwrap();
    store.close().await;

    let store = open(dir.path());
    let snapshot = store.list("default", "svc").unwrap();
    assert_eq!(snapshot.instances, vec![leased.clone(), persistent]);
    assert!(
        snapshot.revision >= deleted.revision() + MAX_IN_FLIGHT,
        "revisions never go backwards"
    );
    let refreshed = store.keep_alive(lease.id).await.unwrap();
    assert_eq!(
        refreshed.map(|l| l.ttl),
        Some(Duration::from_secs(30)),
        "the lease and its ttl survive"
    );
    let next = store.put(instance("svc", "new"), None).await.unwrap();
    assert!(next.mod_revision > snapshot.revision);
    let another = store.grant(Duration::from_secs(5)).await.unwrap();
    assert!(another.id > lease.id, "lease ids are not reused: they grow");

    // A watch resuming from before the restart gets a snapshot, never a replay with holes.
    match store
        .watch("default", "svc", Some(leased.mod_revision))
        .await
        .unwrap()
    {
        WatchStart::Snapshot(s) => assert_eq!(s.instances.len(), 3),
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_not_kept_alive_after_a_restart_still_expires() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let lease = store.grant(Duration::from_secs(1)).await.unwrap();
    store
        .put(instance("svc", "a"), Some(lease.id))
        .await
        .unwrap();
    store.close().await;

    let store = open(dir.path());
    let mut feed = store.changes();
    assert_eq!(
        store.list("default", "svc").unwrap().instances.len(),
        1,
        "full ttl again after restart"
    );
    match tokio::time::timeout(Duration::from_secs(5), feed.next()).await {
        Ok(FeedItem::Change(c)) => assert!(c.events[0].current.is_none()),
        other => panic!("expected the expiry, got {other:?}"),
    }
    store.close().await;
    let store = open(dir.path());
    assert!(
        store.list("default", "svc").unwrap().instances.is_empty(),
        "the expiry was persisted"
    );
}

#[tokio::test]
async fn only_one_store_may_open_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    match DurableStore::open(dir.path(), MemoryConfig::default()) {
        Err(Error::Open { path, reason }) => {
            assert_eq!(path, dir.path());
            assert!(
                reason.contains("in use by another signpost server"),
                "{reason}"
            );
        }
        other => panic!("a second open must fail, got {other:?}"),
    }
    first.close().await;
    let again = DurableStore::open(dir.path(), MemoryConfig::default());
    assert!(again.is_ok(), "free again once closed: {again:?}");
}

#[tokio::test]
async fn unusable_data_directories_fail_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    match DurableStore::open(file.join("data"), MemoryConfig::default()) {
        Err(e @ Error::Open { .. }) => assert!(e.to_string().contains("plain-file"), "{e}"),
        other => panic!("expected an open error, got {other:?}"),
    }

    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join(DATA_FILE), vec![0xA5; 64 * 1024]).unwrap();
    match DurableStore::open(&corrupt, MemoryConfig::default()) {
        Err(e @ Error::Open { .. }) => assert!(e.to_string().contains(DATA_FILE), "{e}"),
        other => panic!("expected an open error for a corrupt file, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_does_not_grow_the_data_file() {
    async fn churn(store: &Arc<DurableStore>, rounds: usize) {
        let writers: Vec<_> = (0..16)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for n in 0..rounds / 16 {
                        let id = format!("w{w}-{}", n % 4);
                        store.put(instance("churn", &id), None).await.unwrap();
                        store.delete(&instance("churn", &id).key()).await.unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
    }
    // SIGNPOST_CHURN_ROUNDS runs the long version (docs/benchmarks.md reports one million).
    let rounds: usize = std::env::var("SIGNPOST_CHURN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let size = || std::fs::metadata(dir.path().join(DATA_FILE)).unwrap().len();
    churn(&store, 2_000).await;
    let after_warmup = size();
    let started = std::time::Instant::now();
    churn(&store, rounds).await;
    let after_churn = size();
    eprintln!(
        "{rounds} register/deregister cycles in {:?}: data file {after_warmup} -> {after_churn} bytes",
        started.elapsed()
    );
    assert!(
        after_churn <= after_warmup * 2,
        "the data file grew from {after_warmup} to {after_churn} bytes under churn"
    );
    assert!(store.list("default", "churn").unwrap().instances.is_empty());
}
