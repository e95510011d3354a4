//! The watch rules of the design, one by one, over a real socket.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_server::Config;
use signpost_store::MemoryConfig;
use signpost_tests::*;

fn event_summary(events: &[pb::Event]) -> Vec<(pb::EventType, String, pb::RemovalReason)> {
    events
        .iter()
        .map(|e| {
            (
                e.r#type(),
                e.instance
                    .as_ref()
                    .map(|i| i.id.clone())
                    .unwrap_or_default(),
                e.reason(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_watch_starts_with_a_reset_then_follows_every_change_with_its_reason() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut existing = instance("api", "old", 1);
    existing.metadata = [("version".to_string(), "v2".to_string())].into();
    let before = register(&mut client, existing.clone()).await;
    register(&mut client, instance("other", "x", 1)).await;

    let request = pb::WatchRequest {
        service: "api".into(),
        selector: "version=v2".into(),
        ..Default::default()
    };
    let mut view = WatchView::open(&mut client, request).await;
    let first = must(within("reset", view.next()).await, "first message");
    assert!(first.reset);
    assert!(
        first.revision > before.revision,
        "the reset is at the current revision"
    );
    assert_eq!(view.ids(), ["old"]);

    let mut fresh = instance("api", "new", 2);
    fresh.metadata = [("version".to_string(), "v2".to_string())].into();
    register(&mut client, fresh.clone()).await; // ADDED
    fresh.port = 3;
    register(&mut client, fresh.clone()).await; // UPDATED
    fresh.metadata = [("version".to_string(), "v3".to_string())].into();
    register(&mut client, fresh.clone()).await; // leaves the selector: REMOVED (FILTERED)
    register(&mut client, instance("other", "y", 1)).await; // another service: nothing
    fresh.metadata = [("version".to_string(), "v2".to_string())].into();
    register(&mut client, fresh).await; // back in: ADDED
    let last = must(
        client
            .deregister(pb::DeregisterRequest {
                service: "api".into(),
                id: "old".into(),
                ..Default::default()
            })
            .await,
        "deregister",
    )
    .into_inner();

    view.until_revision(last.revision).await;
    use pb::EventType::*;
    use pb::RemovalReason as R;
    assert_eq!(
        event_summary(&view.events),
        [
            (Added, "new".to_string(), R::Unspecified),
            (Updated, "new".to_string(), R::Unspecified),
            (Removed, "new".to_string(), R::Filtered),
            (Added, "new".to_string(), R::Unspecified),
            (Removed, "old".to_string(), R::Deregistered),
        ]
    );
    assert_eq!(view.ids(), ["new"]);
    let updated = view.events[1].instance.as_ref().map(|i| i.port);
    assert_eq!(updated, Some(3), "UPDATED carries the new instance");
    let filtered_out = view.events[2]
        .instance
        .as_ref()
        .map(|i| i.metadata.get("version").cloned());
    assert_eq!(
        filtered_out,
        Some(Some("v2".to_string())),
        "REMOVED carries the instance as last seen in the view"
    );
}

#[tokio::test]
async fn two_hundred_watchers_all_receive_a_change() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut views = Vec::new();
    for _ in 0..200 {
        let mut view = WatchView::open(&mut client, watch_request("busy")).await;
        view.until("initial reset", |v| v.resets == 1).await;
        views.push(view);
    }
    let change = register(&mut client, instance("busy", "one", 1)).await;
    let waits = views.into_iter().map(|mut view| {
        tokio::spawn(async move {
            view.until_revision(change.revision).await;
            view.ids()
        })
    });
    for wait in waits {
        assert_eq!(must(wait.await, "watcher"), ["one"]);
    }
}

#[tokio::test]
async fn a_watcher_that_stops_reading_gets_a_reset_and_the_server_buffers_a_bounded_amount() {
    let config = Config {
        watch_buffer: 4,
        ..Config::default()
    };
    let memory = MemoryConfig {
        feed_capacity: 32,
        ..MemoryConfig::default()
    };
    let server = TestServer::start_with(config, memory).await;
    // The slow watcher has a connection of its own, as a slow client would: on a shared HTTP/2
    // connection its unread data would hold the connection's flow-control window for everyone.
    let mut slow_client = server.client().await;
    let mut client = server.client().await;
    let mut slow = WatchView::open(&mut slow_client, watch_request("churn")).await;
    slow.until("initial reset", |v| v.resets == 1).await;

    // Big instances fill the HTTP/2 windows quickly, so the server side must hold the rest.
    let big = "x".repeat(8 * 1024);
    let updates = 2_000;
    let mut last = 0;
    for n in 0..updates {
        let mut i = instance("churn", &format!("i{}", n % 10), 1000 + n);
        i.metadata = [("pad".to_string(), big.clone())].into();
        last = register(&mut client, i).await.revision;
    }
    slow.until_revision(last).await;
    assert!(
        slow.resets >= 2,
        "the slow watcher was collapsed into a fresh reset"
    );
    assert!(
        slow.messages < updates as usize / 2,
        "{} messages for {updates} changes: the server buffered them instead of collapsing",
        slow.messages
    );
    let truth = discover(
        &mut client,
        pb::DiscoverRequest {
            service: "churn".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        slow.instances.values().cloned().collect::<Vec<_>>(),
        truth.instances
    );
}

#[tokio::test]
async fn resuming_from_a_revision_replays_exactly_the_missed_events() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut steady = WatchView::open(&mut client, watch_request("svc")).await;
    steady.until("reset", |v| v.resets == 1).await;
    let mut flaky = WatchView::open(&mut client, watch_request("svc")).await;
    flaky.until("reset", |v| v.resets == 1).await;

    let a = register(&mut client, instance("svc", "a", 1)).await;
    register(&mut client, instance("svc", "b", 1)).await;
    flaky.until_revision(a.revision).await;
    let (cut_at, cut_view) = (flaky.revision, flaky.instances.clone());
    drop(flaky);

    // Missed while disconnected: an update, a removal, another service, an addition.
    register(&mut client, instance("svc", "a", 2)).await;
    must(
        client
            .deregister(pb::DeregisterRequest {
                service: "svc".into(),
                id: "b".into(),
                ..Default::default()
            })
            .await,
        "deregister",
    );
    register(&mut client, instance("elsewhere", "z", 1)).await;
    let last = register(&mut client, instance("svc", "c", 1)).await;

    let request = pb::WatchRequest {
        start_revision: cut_at,
        ..watch_request("svc")
    };
    let mut resumed = WatchView::resume(&mut client, request, cut_view).await;
    resumed.until_revision(last.revision).await;
    steady.until_revision(last.revision).await;

    assert_eq!(
        resumed.resets, 0,
        "history covers the gap: replay, not reset"
    );
    let missed: Vec<pb::Event> = steady
        .events
        .iter()
        .filter(|e| e.revision > cut_at)
        .cloned()
        .collect();
    assert_eq!(resumed.events, missed);
    assert_eq!(resumed.instances, steady.instances);
    assert_eq!(resumed.ids(), ["a", "c"]);
}

#[tokio::test]
async fn resuming_from_a_revision_no_longer_kept_or_never_reached_gets_a_reset() {
    let memory = MemoryConfig {
        history_limit: 5,
        ..MemoryConfig::default()
    };
    let server = TestServer::start_with(Config::default(), memory).await;
    let mut client = server.client().await;
    let first = register(&mut client, instance("svc", "a", 1)).await;
    let mut last = first.revision;
    for n in 0..20 {
        last = register(&mut client, instance("svc", &format!("n{}", n % 3), n + 1))
            .await
            .revision;
    }
    let truth = discover(
        &mut client,
        pb::DiscoverRequest {
            service: "svc".into(),
            ..Default::default()
        },
    )
    .await;

    for start_revision in [first.revision, last + 1_000] {
        let stale: BTreeMap<String, pb::Instance> = BTreeMap::new();
        let request = pb::WatchRequest {
            start_revision,
            ..watch_request("svc")
        };
        let mut resumed = WatchView::resume(&mut client, request, stale).await;
        let message = must(
            within("first message", resumed.next()).await,
            "first message",
        );
        assert!(
            message.reset,
            "start_revision {start_revision}: expected a reset, got {message:?}"
        );
        assert_eq!(message.revision, last);
        assert_eq!(
            resumed.instances.values().cloned().collect::<Vec<_>>(),
            truth.instances
        );
    }
}

#[tokio::test]
async fn an_idle_watch_gets_progress_messages_at_the_configured_interval() {
    let config = Config {
        watch_progress_interval: Duration::from_millis(200),
        ..Config::default()
    };
    let server = TestServer::start_with(config, MemoryConfig::default()).await;
    let mut client = server.client().await;
    let mut view = WatchView::open(&mut client, watch_request("quiet")).await;
    view.until("reset", |v| v.resets == 1).await;
    let elsewhere = register(&mut client, instance("noisy", "n", 1)).await;

    let started = tokio::time::Instant::now();
    let progress = must(within("progress message", view.next()).await, "progress");
    assert!(
        !progress.reset && progress.events.is_empty(),
        "{progress:?}"
    );
    assert_eq!(
        progress.revision, elsewhere.revision,
        "progress says how far the stream has seen"
    );
    // Each idle stream's progress comes after between three quarters of the interval and all of
    // it (spread, so that streams opened together do not all speak at once); the register above
    // used a little of it.
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "progress came too early: {:?}",
        started.elapsed()
    );
    let second = must(within("second progress", view.next()).await, "progress");
    assert!(second.events.is_empty());
}

#[tokio::test]
async fn watchers_of_one_change_each_see_it_through_their_own_filter() {
    // Watchers of a service without tags or a selector are sent one shared encoding of each
    // change; everyone else gets their own. Both must give each watcher exactly its view.
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let pay = |selector: &str, include_unhealthy: bool| pb::WatchRequest {
        service: "pay".into(),
        selector: selector.into(),
        include_unhealthy,
        ..Default::default()
    };
    let requests = [
        pay("", false),
        pay("", false),
        pay("", true),
        pay("zone=a", false),
        watch_request("ship"),
    ];
    let mut views = Vec::new();
    for request in &requests {
        let mut view = WatchView::open(&mut client, request.clone()).await;
        view.until("initial reset", |v| v.resets == 1).await;
        views.push(view);
    }

    // One lease holding an instance of each service: its expiry is one change with events in
    // both services.
    let mut a = instance("pay", "p-a", 1);
    a.metadata = [("zone".to_string(), "a".to_string())].into();
    let leased = must(
        client
            .register(register_request(a, Some(Duration::from_secs(1))))
            .await,
        "register on a lease",
    )
    .into_inner();
    let mut on_lease = register_request(instance("ship", "s-1", 1), None);
    on_lease.lease_id = leased.lease_id;
    must(
        client.register(on_lease).await,
        "register on the same lease",
    );
    let mut b = instance("pay", "p-b", 2);
    b.metadata = [("zone".to_string(), "b".to_string())].into();
    register(&mut client, b).await;
    // A health check makes an instance critical until probed: only include_unhealthy sees it.
    // Its first probe, jittered over one interval, is recorded (an UPDATED event) even though it
    // fails: the longest interval keeps it out of this test's few seconds.
    let mut checked = instance("pay", "p-checked", 3);
    checked.check = Some(pb::HealthCheck {
        probe: Some(pb::health_check::Probe::Tcp(pb::TcpProbe {})),
        interval: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    });
    register(&mut client, checked).await;

    use pb::EventType::*;
    use pb::RemovalReason as R;
    let expired = |id: &str| (Removed, id.to_string(), R::Expired);
    let added = |id: &str| (Added, id.to_string(), R::Unspecified);
    let want = [
        vec![added("p-a"), added("p-b"), expired("p-a")],
        vec![added("p-a"), added("p-b"), expired("p-a")],
        vec![
            added("p-a"),
            added("p-b"),
            added("p-checked"),
            expired("p-a"),
        ],
        vec![added("p-a"), expired("p-a")],
        vec![added("s-1"), expired("s-1")],
    ];
    for ((view, request), want) in views.iter_mut().zip(&requests).zip(want) {
        view.until("the lease's expiry", |v| {
            v.events
                .iter()
                .any(|e| e.reason() == pb::RemovalReason::Expired)
        })
        .await;
        assert_eq!(event_summary(&view.events), want, "{request:?}");
        let found = discover(
            &mut client,
            pb::DiscoverRequest {
                service: request.service.clone(),
                selector: request.selector.clone(),
                include_unhealthy: request.include_unhealthy,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(view.ids(), ids(&found.instances), "{request:?}");
    }
}
