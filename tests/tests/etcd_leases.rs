//! Lease refreshes on the etcd backend, against a real etcd: a lease refreshed again and again
//! costs etcd one renew per window, it never runs out while it is refreshed, and no answer
//! promises a lease more time than etcd holds for it.

use std::time::{Duration, Instant};

use signpost_store::conformance::{Shorthand, instance};
use signpost_store::{EtcdConfig, Store};
use signpost_tests::etcd::Etcd;

async fn etcd() -> Option<Etcd> {
    Etcd::start(1).await
}

#[tokio::test]
async fn a_lease_refreshed_in_a_burst_costs_etcd_a_renew_per_second_and_keeps_its_promise() {
    let Some(etcd) = etcd().await else { return };
    let store = etcd.store(EtcdConfig::default()).await;
    let lease = store.grant(Duration::from_secs(20)).await.unwrap();
    store
        .put(instance("burst", "b1"), Some(lease.id))
        .await
        .unwrap();
    let before = etcd.leases_renewed().await;
    let started = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..500 {
        let refreshed = store.keep_alive(lease.id).await.unwrap();
        let ttl = refreshed.expect("a refreshed lease is alive").ttl;
        answers.push((Instant::now(), ttl));
    }
    let elapsed = started.elapsed();
    let renewed = etcd.leases_renewed().await - before;
    // One renew per second of the burst (a tenth of the ttl is longer), and the first.
    let most = elapsed.as_secs() + 2;
    assert!(
        (1..=most).contains(&renewed),
        "500 refreshes in {elapsed:?} made etcd renew {renewed} times (want 1..={most})"
    );
    for (_, ttl) in &answers {
        assert!(
            *ttl <= lease.ttl && *ttl + Duration::from_secs(1) >= lease.ttl,
            "an answer's ttl is what is left of the granted {:?}, at most a second less: {ttl:?}",
            lease.ttl
        );
    }
    // What etcd itself holds for the lease is at least what the last answer promised, less the
    // time since (etcd counts whole seconds, rounding down).
    let (at, promised) = *answers.last().unwrap();
    let client = etcd.client().await;
    let held = client
        .lease_client()
        .time_to_live(i64::try_from(lease.id).unwrap(), None)
        .await
        .unwrap()
        .ttl();
    let since = at.elapsed();
    assert!(
        Duration::from_secs(u64::try_from(held).unwrap() + 1) >= promised.saturating_sub(since),
        "etcd holds {held} s for the lease, the last answer promised {promised:?} {since:?} ago"
    );
}

#[tokio::test]
async fn a_short_lease_refreshed_faster_than_it_is_renewed_never_runs_out() {
    let Some(etcd) = etcd().await else { return };
    let store = etcd.store(EtcdConfig::default()).await;
    let lease = store.grant(Duration::from_secs(2)).await.unwrap();
    store
        .put(instance("short", "s1"), Some(lease.id))
        .await
        .unwrap();
    let before = etcd.leases_renewed().await;
    // Every 20 ms for three ttls: most are answered from the last renew, yet the lease must
    // never come close to running out in etcd.
    let until = Instant::now() + lease.ttl * 3;
    let mut refreshes = 0;
    while Instant::now() < until {
        let refreshed = store.keep_alive(lease.id).await.unwrap();
        assert!(refreshed.is_some(), "the lease ran out while refreshed");
        refreshes += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let renewed = etcd.leases_renewed().await - before;
    assert!(
        renewed < refreshes / 2,
        "{refreshes} refreshes made etcd renew {renewed} times"
    );
    assert_eq!(store.list("default", "short").unwrap().instances.len(), 1);
    // Once refreshes stop, etcd expires it as it would any lease.
    let deadline = Instant::now() + lease.ttl + Duration::from_secs(10);
    while store.list("default", "short").unwrap().instances.len() == 1 {
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.keep_alive(lease.id).await.unwrap(), None);
}

#[tokio::test]
async fn a_revoked_lease_is_answered_expired_at_once() {
    let Some(etcd) = etcd().await else { return };
    let store = etcd.store(EtcdConfig::default()).await;
    let lease = store.grant(Duration::from_secs(20)).await.unwrap();
    assert!(store.keep_alive(lease.id).await.unwrap().is_some());
    assert!(store.revoke_lease(lease.id).await.unwrap());
    assert_eq!(
        store.keep_alive(lease.id).await.unwrap(),
        None,
        "a refresh right after a revoke asks etcd, not the last renew"
    );
}
