//! What a caller of the balanced channel sees when a `greeter-server` process dies (kill -9),
//! hangs (SIGSTOP) or is stopped by an orchestrator (SIGTERM), under steady calls.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use signpost_client::BalancedChannel;
use signpost_tests::greeters::{Caller, GreeterProcess, test_client, wait_for_connected};
use signpost_tests::{DEADLINE, TestServer, within, within_for};

const GREETER: &str = env!("CARGO_BIN_EXE_greeter-server");

async fn start_greeters(registry: &str, n: usize, ttl_secs: u32) -> Vec<GreeterProcess> {
    let mut greeters = Vec::new();
    for _ in 0..n {
        let registry = registry.to_owned();
        let ttl = ttl_secs.to_string();
        greeters.push(
            tokio::task::spawn_blocking(move || {
                GreeterProcess::start(Path::new(GREETER), &registry, &["--ttl-secs", &ttl])
            })
            .await
            .unwrap(),
        );
    }
    greeters
}

fn has(channel: &BalancedChannel, id: &str) -> bool {
    channel.instances().iter().any(|i| i.id == id)
}

/// Kills one of three greeters with SIGKILL under `callers` concurrent callers, and goes on
/// calling until the registry has expired the lease and beyond. Returns the failures, the
/// callers' count, and how many calls the channel had in flight on the victim just before.
async fn kill_one_of_three(callers: usize) {
    let registry = TestServer::start().await;
    let url = registry.url();
    let mut greeters = start_greeters(&url, 3, 2).await;
    let client = test_client(url);
    let channel = client.channel("greeter");
    wait_for_connected(&channel, 3).await;
    let caller = Caller::start_many(channel.clone(), callers, Duration::ZERO, DEADLINE);
    caller.calls(500).await;

    let victim = greeters.remove(0);
    let in_flight = channel
        .stats()
        .endpoints
        .iter()
        .find(|e| e.id == victim.id)
        .map_or(0, |e| e.in_flight);
    victim.signal("KILL");
    let killed_at = Instant::now();
    let id = victim.id.clone();
    drop(victim);
    // Until the registry expired the lease (2 s) and the view dropped it, then some more.
    within("the registry drops the killed greeter", async {
        while has(&channel, &id) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    caller.calls(500).await;
    let failures = caller.failures();
    let (answers, _) = caller.stop().await;
    eprintln!(
        "{callers} callers: {} failed calls, {in_flight} in flight on {id} just before the kill: {answers:?}",
        failures.len()
    );
    // Only the calls in flight on the killed instance may fail: at most one per caller, and
    // all of them at the kill.
    assert!(
        failures.len() <= callers,
        "{} calls failed with {callers} callers: {failures:?}",
        failures.len()
    );
    for (at, message) in &failures {
        assert!(
            at.duration_since(killed_at) < Duration::from_millis(500),
            "a call failed {:?} after the kill: {message}",
            at.duration_since(killed_at)
        );
    }
    assert!(answers.len() >= 3, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_greeter_fails_at_most_the_call_in_flight_of_one_caller() {
    kill_one_of_three(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_greeter_fails_at_most_the_calls_in_flight_of_32_callers() {
    kill_one_of_three(32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_greeter_costs_at_most_one_call_and_is_picked_again_once_continued() {
    let registry = TestServer::start().await;
    let url = registry.url();
    // A long lease: the stopped process cannot refresh it, and the registry must not notice.
    let greeters = start_greeters(&url, 3, 60).await;
    let client = test_client(url);
    let channel = client.channel("greeter");
    wait_for_connected(&channel, 3).await;
    let caller = Caller::start_many(
        channel.clone(),
        1,
        Duration::from_millis(2),
        Duration::from_secs(2),
    );
    caller.calls(200).await;

    let victim = &greeters[0];
    victim.signal("STOP");
    let before = caller.answered_by(&victim.id);
    // Long enough for several picks of the stopped one, had it stayed in the pick.
    let calls_at_stop = caller.answers().values().sum::<u64>();
    within_for(Duration::from_secs(20), "calls while stopped", async {
        while caller.answers().values().sum::<u64>() < calls_at_stop + 1_000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(caller.answered_by(&victim.id), before);
    let failures = caller.failures();
    assert!(failures.len() <= 1, "{failures:?}");
    assert!(has(&channel, &victim.id), "the registry still lists it");

    victim.signal("CONT");
    within("the continued greeter is picked again", async {
        while caller.answered_by(&victim.id) == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (answers, failures) = caller.stop().await;
    assert!(failures <= 1, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_greeter_costs_no_call() {
    let registry = TestServer::start().await;
    let url = registry.url();
    let mut greeters = start_greeters(&url, 3, 10).await;
    let client = test_client(url);
    let channel = client.channel("greeter");
    wait_for_connected(&channel, 3).await;
    let caller = Caller::start_many(channel.clone(), 4, Duration::from_millis(1), DEADLINE);
    caller.calls(300).await;

    let mut victim = greeters.remove(0);
    victim.signal("TERM");
    victim.wait_for("deregistered");
    let status = tokio::task::block_in_place(|| victim.exit_status());
    assert!(status.success(), "{status:?}");
    wait_for_connected(&channel, 2).await;
    caller.calls(300).await;
    let (answers, failures) = caller.stop().await;
    assert_eq!(failures, 0, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_stopped_greeter_ends_at_its_deadline_and_the_greeter_is_probed_out() {
    use signpost_client::EndpointState;
    use signpost_examples::pb::SayHelloRequest;
    use signpost_examples::pb::greeter_service_client::GreeterServiceClient;

    let registry = TestServer::start().await;
    let url = registry.url();
    let greeters = start_greeters(&url, 1, 60).await;
    let client = test_client(url);
    let channel = client.channel("greeter");
    wait_for_connected(&channel, 1).await;
    let mut greeter = GreeterServiceClient::new(channel.clone());
    let hello = || {
        let mut request = tonic::Request::new(SayHelloRequest { name: "x".into() });
        request.set_timeout(Duration::from_millis(1_200));
        request
    };
    assert!(greeter.say_hello(hello()).await.is_ok());

    greeters[0].signal("STOP");
    let started = Instant::now();
    let status = greeter.say_hello(hello()).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        took >= Duration::from_millis(1_200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The call waited past `unresponsive_after` with nothing read: a probe finds the instance
    // silent and the connection is shut; a new one is not ready while the process is stopped.
    within("the stopped greeter out of the pick", async {
        while !channel
            .stats()
            .endpoints
            .iter()
            .any(|e| e.state == EndpointState::Failed || e.state == EndpointState::Connecting)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let stats = channel.stats();
    assert!(
        stats.endpoints[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("stopped answering")),
        "{stats:?}"
    );

    greeters[0].signal("CONT");
    wait_for_connected(&channel, 1).await;
    assert!(greeter.say_hello(hello()).await.is_ok());
}
