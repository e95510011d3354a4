//! The balanced channel driven by a registry whose answers the test scripts
//! (`signpost_tests::fake`), with real greeters behind it: what the channel does with a reset
//! that empties its view after a reconnect and on a live stream, and with calls made before the
//! first view arrives.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use signpost_client::{BalancedChannel, Client, EndpointState};
use signpost_examples::Greeter;
use signpost_examples::pb::SayHelloRequest;
use signpost_examples::pb::greeter_service_client::GreeterServiceClient;
use signpost_proto::v1 as pb;
use signpost_tests::fake::{FakeRegistry, reset};
use signpost_tests::greeters::{Caller, wait_for_connected};
use signpost_tests::{instance, must, within};
use tokio::sync::oneshot;

/// Greeters that serve but do not register: the fake registry lists them.
async fn greeters(ids: &[&str]) -> (Vec<pb::Instance>, Vec<oneshot::Sender<()>>) {
    let mut instances = Vec::new();
    let mut stops = Vec::new();
    for id in ids {
        let (listener, bound) = must(signpost_examples::bind("127.0.0.1", 0).await, "bind");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(Greeter::new(*id).serve(listener, async {
            let _ = stopped.await;
        }));
        instances.push(instance("greeter", id, u32::from(bound.port())));
        stops.push(stop);
    }
    (instances, stops)
}

fn client(fake: &FakeRegistry) -> Client {
    must(
        Client::builder()
            .registry(fake.url())
            .backoff(Duration::from_millis(10), Duration::from_millis(50))
            .build(),
        "client",
    )
}

async fn call(channel: &BalancedChannel) -> Result<String, tonic::Status> {
    let mut greeter = GreeterServiceClient::new(channel.clone());
    greeter
        .say_hello(SayHelloRequest { name: "x".into() })
        .await
        .map(|answer| answer.into_inner().instance_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_reset_after_a_reconnect_keeps_the_endpoints_for_the_grace_period() {
    let mut fake = FakeRegistry::start().await;
    let (instances, _stops) = greeters(&["g1", "g2"]).await;
    let client = client(&fake);
    let channel = client
        .balanced("greeter")
        .stale_grace(Duration::from_millis(1_500))
        .build();
    let watch = fake.next_watch().await;
    watch.send(reset(10, &instances)).await;
    wait_for_connected(&channel, 2).await;
    let caller = Caller::start(channel.clone());
    caller.calls(50).await;

    // The registry restarts empty: the stream ends, and the one that replaces it starts with
    // a reset that lists nothing.
    drop(watch);
    let again = fake.next_watch().await;
    assert_eq!(
        again.request.start_revision, 10,
        "resumed from its revision"
    );
    again.send(reset(1, &[])).await;
    within("the empty view applied", async {
        while !channel.instances().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let stats = channel.stats();
    assert_eq!(stats.endpoints.len(), 2, "{stats:?}");
    assert!(stats.endpoints.iter().all(|e| e.stale), "{stats:?}");
    caller.calls(200).await;
    assert!(caller.failures().is_empty(), "{:?}", caller.failures());

    // One instance registers again: it keeps its connection; the other one goes when the
    // grace period ends.
    again
        .send(signpost_tests::fake::changes(
            2,
            vec![signpost_tests::fake::event(
                pb::EventType::Added as i32,
                &instances[0],
                2,
            )],
        ))
        .await;
    within_grace_then_gone(&channel).await;
    let stats = channel.stats();
    assert_eq!(
        stats
            .endpoints
            .iter()
            .map(|e| (e.id.as_str(), e.stale))
            .collect::<Vec<_>>(),
        [("g1", false)],
        "{stats:?}"
    );
    caller.calls(100).await;
    let (answers, failures) = caller.stop().await;
    assert_eq!(failures, 0, "{answers:?}");
}

async fn within_grace_then_gone(channel: &BalancedChannel) {
    within("the stale endpoint removed after its grace period", async {
        while channel.stats().endpoints.len() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_reset_on_a_live_stream_is_applied_at_once() {
    let mut fake = FakeRegistry::start().await;
    let (instances, _stops) = greeters(&["g1"]).await;
    let client = client(&fake);
    let channel = client.channel("greeter");
    let watch = fake.next_watch().await;
    watch.send(reset(5, &instances)).await;
    wait_for_connected(&channel, 1).await;
    assert_eq!(must(call(&channel).await, "call"), "g1");

    // A reset on a stream that never broke is the registry's word (a watcher that fell
    // behind, say): nothing is kept.
    watch.send(reset(6, &[])).await;
    within("endpoints gone", async {
        while !channel.stats().endpoints.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let refused = call(&channel).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("no instance of greeter can take the call: none is registered"),
        "{refused:?}"
    );
    assert_eq!(channel.stats().unavailable, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_before_the_first_view_waits_for_it_within_the_wait_timeout() {
    let mut fake = FakeRegistry::start().await;
    let (instances, _stops) = greeters(&["g1"]).await;
    let client = client(&fake);
    let channel = client
        .balanced("greeter")
        .wait_timeout(Duration::from_millis(300))
        .build();
    // No view within the wait timeout: UNAVAILABLE saying why.
    let watch = fake.next_watch().await;
    let early = call(&channel).await.unwrap_err();
    assert_eq!(early.code(), tonic::Code::Unavailable);
    assert!(
        early
            .message()
            .contains("the registry has not answered the channel's watch yet"),
        "{early:?}"
    );

    // A call waiting when the view arrives goes through.
    let waiting = tokio::spawn({
        let channel = channel.clone();
        async move { call(&channel).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    watch.send(reset(3, &instances)).await;
    let answered = must(within("the waiting call", waiting).await, "join");
    assert_eq!(must(answered, "call"), "g1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_instance_that_never_listened_is_never_called() {
    let mut fake = FakeRegistry::start().await;
    let (mut instances, _stops) = greeters(&["g1"]).await;
    // A port nothing listens on: bound, then freed.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = free.local_addr().unwrap().port();
    drop(free);
    instances.push(instance("greeter", "dead", u32::from(dead_port)));
    let client = client(&fake);
    let channel = client.channel("greeter");
    let watch = fake.next_watch().await;
    watch.send(reset(3, &instances)).await;
    within("the dead one failed to connect", async {
        while !channel
            .stats()
            .endpoints
            .iter()
            .any(|e| e.id == "dead" && e.state == EndpointState::Failed)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    for _ in 0..200 {
        assert_eq!(must(call(&channel).await, "call"), "g1");
    }
    let stats = channel.stats();
    let dead = stats.endpoints.iter().find(|e| e.id == "dead").unwrap();
    assert!(
        dead.last_error
            .as_deref()
            .is_some_and(|e| e.contains("connection refused")),
        "{dead:?}"
    );
    assert_eq!(dead.answers, 0);
}
