//! The client crate against the real server and real greeter backends over sockets.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use signpost_client::{RegistrationBuilder, RegistrationState};
use signpost_examples::Greeter;
use signpost_examples::pb::SayHelloRequest;
use signpost_examples::pb::greeter_service_client::GreeterServiceClient;
use signpost_proto::v1 as pb;
use signpost_server::Config;
use signpost_store::{MemoryConfig, MemoryStore};
use signpost_tests::greeters::{Backend, Caller, test_client, wait_for_ids};
use signpost_tests::proxy::Proxy;
use signpost_tests::*;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_every_backend() {
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let mut backends = Vec::new();
    for id in ["g1", "g2", "g3"] {
        backends.push(Backend::start(&client, id, Duration::from_secs(10)).await);
    }
    let greeters = client.channel("greeter");
    must(greeters.wait_for_ready(DEADLINE).await, "ready");
    wait_for_ids(&greeters, &["g1", "g2", "g3"]).await;

    let mut greeter = GreeterServiceClient::new(greeters.channel());
    let mut answers: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..300 {
        let answer = must(
            greeter
                .say_hello(SayHelloRequest { name: "x".into() })
                .await,
            "call",
        );
        *answers.entry(answer.into_inner().instance_id).or_default() += 1;
    }
    assert_eq!(answers.len(), 3, "{answers:?}");
    // A third each when their latencies are alike; the balancer weighs latency, so a greeter
    // that is slower for a moment on a loaded machine gets fewer (51 of 300 once in CI), but
    // never so few that it is out of the rotation.
    for (id, n) in &answers {
        assert!(*n >= 30, "{id} got {n} of 300 calls: {answers:?}");
    }
    // The client's discover is served from the channel's view.
    let found = must(client.discover("greeter").await, "discover");
    assert_eq!(
        found.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["g1", "g2", "g3"]
    );
    for b in &backends {
        assert!(b.greeter.served() > 0, "{} served nothing", b.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_deregisters_and_stops_costs_no_failed_call() {
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let _a = Backend::start(&client, "a", Duration::from_secs(10)).await;
    let mut b = Backend::start(&client, "b", Duration::from_secs(10)).await;
    let greeters = client.channel("greeter");
    wait_for_ids(&greeters, &["a", "b"]).await;
    let caller = Caller::start(greeters.channel());
    caller.calls(100).await;
    assert!(caller.answered_by("b") > 0);

    let registration = b.registration.take();
    assert!(must(
        must(registration.ok_or("none"), "registration")
            .deregister()
            .await,
        "deregister"
    ));
    wait_for_ids(&greeters, &["a"]).await;
    let served_at_removal = b.greeter.served();
    caller.calls(20).await;
    b.stop_serving().await;
    caller.calls(200).await;
    let (_, failures) = caller.stop().await;
    assert_eq!(failures, 0, "no call may fail while a backend leaves");
    assert!(
        b.greeter.served() <= served_at_removal + 1,
        "b served {} calls after its removal was applied (at most the one in flight)",
        b.greeter.served() - served_at_removal
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_gets_calls_without_a_failed_call() {
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let _a = Backend::start(&client, "a", Duration::from_secs(10)).await;
    let greeters = client.channel("greeter");
    wait_for_ids(&greeters, &["a"]).await;
    let caller = Caller::start(greeters.channel());
    caller.calls(50).await;

    let _b = Backend::start(&client, "b", Duration::from_secs(10)).await;
    wait_for_ids(&greeters, &["a", "b"]).await;
    within("calls reaching the new backend", async {
        while caller.answered_by("b") < 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let (_, failures) = caller.stop().await;
    assert_eq!(failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_on_while_the_registry_is_down_and_registrations_come_back_after_an_empty_restart()
{
    let server = TestServer::start().await;
    let addr = server.addr;
    let client = test_client(server.url());
    let _a = Backend::start(&client, "a", Duration::from_secs(2)).await;
    let _b = Backend::start(&client, "b", Duration::from_secs(2)).await;
    let greeters = client.channel("greeter");
    wait_for_ids(&greeters, &["a", "b"]).await;
    let caller = Caller::start(greeters.channel());
    caller.calls(50).await;

    must(server.stop().await, "stop registry");
    caller.calls(300).await; // the registry is gone; the known backends still answer
    let (answers, failures) = caller.stop().await;
    assert_eq!(failures, 0, "calls failed while the registry was down");
    assert!(answers.contains_key("a") && answers.contains_key("b"));

    // An empty registry on the same address: the registrations notice their leases are gone and
    // register again, and the channel converges back to the true set.
    let store = Arc::new(MemoryStore::new(MemoryConfig::default()));
    let restarted = TestServer::serve_on(addr, store, Config::default()).await;
    let mut direct = restarted.client().await;
    within_for(
        Duration::from_secs(15),
        "registrations coming back",
        async {
            loop {
                let found = discover(
                    &mut direct,
                    pb::DiscoverRequest {
                        service: "greeter".into(),
                        ..Default::default()
                    },
                )
                .await;
                if ids(&found.instances) == ["a", "b"] {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    wait_for_ids(&greeters, &["a", "b"]).await;
    let mut greeter = GreeterServiceClient::new(greeters.channel());
    must(
        greeter
            .say_hello(SayHelloRequest { name: "x".into() })
            .await,
        "call after restart",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_during_a_partition_is_registered_again_once_healed() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let owner = test_client(proxy.url());
    let registration = must(
        owner
            .register(
                RegistrationBuilder::new("svc")
                    .id("owner")
                    .address("127.0.0.1")
                    .port(9)
                    .ttl(Duration::from_secs(1)),
            )
            .await,
        "register",
    );
    let mut states = registration.subscribe();
    let mut direct = server.client().await;
    let mut view = WatchView::open(&mut direct, watch_request("svc")).await;
    view.until("registered", |v| v.ids() == ["owner"]).await;

    proxy.cut();
    view.until("the lease expires during the partition", |v| {
        v.instances.is_empty()
    })
    .await;
    let expired = view.events.last().map(|e| e.reason());
    assert_eq!(expired, Some(pb::RemovalReason::Expired));

    proxy.heal();
    view.until("registered again after the partition", |v| {
        v.ids() == ["owner"]
    })
    .await;
    within("state back to registered", async {
        loop {
            if matches!(
                *states.borrow_and_update(),
                RegistrationState::Registered { .. }
            ) {
                return;
            }
            must(states.changed().await, "state");
        }
    })
    .await;
    assert!(
        must(registration.deregister().await, "deregister"),
        "it was registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_watch_resumes_from_its_last_revision_without_a_reset() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let mut direct = server.client().await;
    register(&mut direct, instance("svc", "one", 1)).await;

    let watching = test_client(proxy.url());
    let channel = watching.channel("svc");
    wait_for_ids(&channel, &["one"]).await;
    assert_eq!(channel.watch_counts().resets, 1);

    proxy.cut();
    // Only once the client knows its stream broke is "two" surely missed: a change made while
    // the cut is still on its way could reach the old stream first.
    within("the client sees its watch break", async {
        while channel.watch_counts().reconnects == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    register(&mut direct, instance("svc", "two", 2)).await; // missed while cut
    proxy.heal();
    wait_for_ids(&channel, &["one", "two"]).await;
    let counts = channel.watch_counts();
    assert!(counts.reconnects >= 1, "{counts:?}");
    assert!(counts.resumes >= 1, "resumed by replay: {counts:?}");
    assert_eq!(counts.resets, 1, "no second reset: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_rules_and_typed_watch() {
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let refused = client
        .register(
            RegistrationBuilder::new("Bad Name")
                .address("127.0.0.1")
                .port(1),
        )
        .await;
    match refused {
        Err(signpost_client::Error::InvalidArgument(message)) => {
            assert!(message.contains("instance.service"), "{message}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    let missing = client.register(RegistrationBuilder::new("svc")).await;
    assert!(matches!(
        missing,
        Err(signpost_client::Error::InvalidArgument(_))
    ));

    let mut updates = client.watch("svc");
    use tokio_stream::StreamExt;
    let first = must(
        must(
            within("reset", updates.next()).await.ok_or("ended"),
            "update",
        ),
        "update",
    );
    assert!(first.reset && first.events.is_empty());
    let registration = must(
        client
            .register(
                RegistrationBuilder::new("svc")
                    .address("10.0.0.7")
                    .port(8080),
            )
            .await,
        "register",
    );
    assert_eq!(
        registration.id(),
        "10.0.0.7-8080",
        "the default id is address-port"
    );
    let added = must(
        must(
            within("added", updates.next()).await.ok_or("ended"),
            "update",
        ),
        "update",
    );
    assert!(
        matches!(&added.events[..], [signpost_client::Event::Added(i)] if i.id == "10.0.0.7-8080" && i.port == 8080)
    );
    must(registration.deregister().await, "deregister");
    let removed = must(
        must(
            within("removed", updates.next()).await.ok_or("ended"),
            "update",
        ),
        "update",
    );
    assert!(matches!(
        &removed.events[..],
        [signpost_client::Event::Removed(
            _,
            signpost_client::RemovalReason::Deregistered
        )]
    ));
}

#[tokio::test]
async fn an_unreachable_registry_is_a_clear_error() {
    // A port nothing listens on: bind one, then free it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = test_client(format!("http://{addr}"));
    match client.discover("svc").await {
        Err(e @ signpost_client::Error::Unavailable { .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("cannot reach registry at http://{addr}")),
                "{text}"
            );
            assert!(text.to_lowercase().contains("connection refused"), "{text}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_can_carry_a_health_check_that_gates_its_traffic() {
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let backend = signpost_tests::http::FlipServer::start(500).await;
    let check = signpost_client::HealthCheck::http("/health", Duration::from_secs(1));
    let _registration = must(
        client
            .register(
                RegistrationBuilder::new("checked")
                    .id("c1")
                    .address("127.0.0.1")
                    .port(backend.addr.port())
                    .check(check),
            )
            .await,
        "register with a check",
    );
    let channel = client.channel("checked");
    let all = must(
        client
            .discover(signpost_client::Filter::service("checked").include_unhealthy(true))
            .await,
        "discover",
    );
    assert_eq!(all.len(), 1);
    assert_eq!(
        all[0].health,
        signpost_client::Health::Critical,
        "no traffic before the first pass"
    );
    assert!(channel.instances().is_empty());

    backend.set(200);
    wait_for_ids(&channel, &["c1"]).await;
    backend.set(500);
    wait_for_ids(&channel, &[]).await;
    let all = must(
        client
            .discover(signpost_client::Filter::service("checked").include_unhealthy(true))
            .await,
        "discover",
    );
    assert!(
        all[0].health_output.contains("500"),
        "{}",
        all[0].health_output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_moves_is_followed_to_its_new_address() {
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let mut direct = server.client().await;
    // Two greeters; one registered instance id that first points at A, then moves to B.
    let mut ports = Vec::new();
    let mut stops = Vec::new();
    for id in ["at-a", "at-b"] {
        let (listener, bound) = must(signpost_examples::bind("127.0.0.1", 0).await, "bind");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(Greeter::new(id).serve(listener, async {
            let _ = stopped.await;
        }));
        ports.push(u32::from(bound.port()));
        stops.push(stop);
    }
    register(&mut direct, instance("mover", "m", ports[0])).await;
    let channel = client.channel("mover");
    wait_for_ids(&channel, &["m"]).await;
    let mut greeter = GreeterServiceClient::new(channel.channel());
    let first = must(
        greeter
            .say_hello(SayHelloRequest { name: "x".into() })
            .await,
        "call",
    );
    assert_eq!(first.into_inner().instance_id, "at-a");

    register(&mut direct, instance("mover", "m", ports[1])).await; // UPDATED with a new port
    within("calls following the move", async {
        loop {
            if channel.instances().first().map(|i| u32::from(i.port)) == Some(ports[1]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    for _ in 0..20 {
        let answer = must(
            greeter
                .say_hello(SayHelloRequest { name: "x".into() })
                .await,
            "call",
        );
        assert_eq!(
            answer.into_inner().instance_id,
            "at-b",
            "the old address gets no more calls"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_behind_a_channel_ends_when_the_last_clone_is_dropped() {
    let metrics = Arc::new(signpost_server::metrics::Metrics::new());
    let config = Config {
        metrics: Some(metrics.clone()),
        ..Config::default()
    };
    let server = TestServer::start_with(config, MemoryConfig::default()).await;
    let client = test_client(server.url());
    let open_watches = || {
        let metrics = metrics.clone();
        let store = server.store.clone();
        async move {
            let text = metrics.render(&*store);
            text.lines()
                .find_map(|l| l.strip_prefix("signpost_watch_streams "))
                .and_then(|v| v.trim().parse::<i64>().ok())
                .unwrap_or(-1)
        }
    };
    let until = |want: i64, what: &'static str| {
        within(what, async move {
            while open_watches().await != want {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let balanced = client.channel("svc");
    let copy = balanced.clone();
    let raw = balanced.channel();
    until(1, "the channel's watch is open").await;
    drop(balanced);
    drop(copy);
    // A tonic Channel clone still holds the balancer: the watch must stay.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        open_watches().await,
        1,
        "still in use through a Channel clone"
    );
    drop(raw);
    until(0, "the watch ends with the last clone").await;
}
