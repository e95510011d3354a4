//! The balanced channel's picking and failure handling against real greeters on loopback
//! sockets: load awareness, weights, zones, outlier ejection, an instance that stops listening
//! while still registered, and a registry restarted empty under load.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use signpost_client::{EndpointState, RegistrationBuilder};
use signpost_examples::Greeter;
use signpost_server::Config;
use signpost_store::{MemoryConfig, MemoryStore};
use signpost_tests::greeters::{Backend, Caller, test_client, wait_for_ids};
use signpost_tests::*;

/// The tests that measure shares run one at a time: each one's calls are latency the others'
/// balancers would see, and the shares they assert are what a quiet machine gives.
static SHARES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn share(answers: &std::collections::BTreeMap<String, u64>, id: &str) -> f64 {
    let total: u64 = answers.values().sum();
    answers.get(id).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

/// The tests that measure how calls are shared out take this alone; the others share it. A
/// share follows latencies, and the other tests' greeters and callers on the same two cores
/// moved one from 0.5 to 0.42 in CI.
static MEASURING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_instance_gets_few_calls() {
    // Shares follow latencies: measured with no other test of this file loading the machine.
    let _alone = MEASURING.write().await;
    let _one_at_a_time = SHARES.lock().await;
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let ttl = Duration::from_secs(10);
    let _fast1 = Backend::start(&client, "fast1", ttl).await;
    let _fast2 = Backend::start(&client, "fast2", ttl).await;
    let _slow = Backend::start_with(
        &client,
        Greeter::new("slow").with_delay(Duration::from_millis(20)),
        RegistrationBuilder::new("greeter").id("slow").ttl(ttl),
    )
    .await;
    let greeters = client.channel("greeter");
    wait_for_ids(&greeters, &["fast1", "fast2", "slow"]).await;
    must(greeters.wait_for_ready(DEADLINE).await, "ready");

    let caller = Caller::start(greeters.channel());
    caller.calls(600).await;
    let (answers, failures) = caller.stop().await;
    eprintln!("shares with one slow instance: {answers:?}");
    assert_eq!(failures, 0);
    // Measured: the slow one gets about 1 call in 600 (its first, and one whenever its
    // estimate has decayed to the others').
    assert!(share(&answers, "slow") < 0.15, "{answers:?}");
    assert!(share(&answers, "fast1") > 0.3, "{answers:?}");
    assert!(share(&answers, "fast2") > 0.3, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_set_the_shares() {
    // Shares follow latencies: measured with no other test of this file loading the machine.
    let _alone = MEASURING.write().await;
    let _one_at_a_time = SHARES.lock().await;
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let mut backends = Vec::new();
    for (id, weight) in [("w100a", 100), ("w100b", 100), ("w200", 200)] {
        backends.push(
            Backend::start_with(
                &client,
                Greeter::new(id),
                RegistrationBuilder::new("greeter")
                    .id(id)
                    .weight(weight)
                    .ttl(Duration::from_secs(10)),
            )
            .await,
        );
    }
    let greeters = client.channel("greeter");
    wait_for_ids(&greeters, &["w100a", "w100b", "w200"]).await;
    must(greeters.wait_for_ready(DEADLINE).await, "ready");
    within("every endpoint connected", async {
        while greeters
            .stats()
            .endpoints
            .iter()
            .any(|e| e.state != EndpointState::Ready)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    let caller = Caller::start(greeters.channel());
    caller.calls(2_000).await;
    let (answers, failures) = caller.stop().await;
    eprintln!("shares by weight: {answers:?}");
    assert_eq!(failures, 0);
    for (id, want) in [("w100a", 0.25), ("w100b", 0.25), ("w200", 0.5)] {
        let got = share(&answers, id);
        assert!(
            (got - want).abs() < 0.06,
            "{id}: {got:.3} of the calls, want {want}: {answers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_zone_takes_the_calls_and_spills_over_when_it_is_gone() {
    // Shares follow latencies: measured with no other test of this file loading the machine.
    let _alone = MEASURING.write().await;
    let _one_at_a_time = SHARES.lock().await;
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let mut backends = Vec::new();
    for (id, zone) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")] {
        backends.push(
            Backend::start_with(
                &client,
                Greeter::new(id),
                RegistrationBuilder::new("greeter")
                    .id(id)
                    .zone(zone)
                    .ttl(Duration::from_secs(10)),
            )
            .await,
        );
    }
    let greeters = client.balanced("greeter").zone("a").build();
    wait_for_ids(&greeters, &["a1", "a2", "b1", "b2"]).await;
    must(greeters.wait_for_ready(DEADLINE).await, "ready");

    let caller = Caller::start(greeters.channel());
    caller.calls(500).await;
    let answers = caller.answers();
    let in_a = share(&answers, "a1") + share(&answers, "a2");
    assert!(in_a >= 0.95, "{answers:?}");

    // Zone a leaves: everything goes to b, and no call fails on the way.
    for backend in backends.iter_mut().take(2) {
        let registration = backend.registration.take().unwrap();
        must(registration.deregister().await, "deregister");
    }
    wait_for_ids(&greeters, &["b1", "b2"]).await;
    let before_b = caller.answered_by("b1") + caller.answered_by("b2");
    let before_a = caller.answered_by("a1") + caller.answered_by("a2");
    caller.calls(300).await;
    let (answers, failures) = caller.stop().await;
    assert_eq!(failures, 0, "{answers:?}");
    let after_a = answers["a1"] + answers["a2"];
    let after_b = answers.get("b1").unwrap_or(&0) + answers.get("b2").unwrap_or(&0);
    assert!(
        after_a <= before_a + 1,
        "zone a kept getting calls: {answers:?}"
    );
    assert!(after_b >= before_b + 299, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_answering_unavailable_is_ejected_after_five_failures() {
    let _shared = MEASURING.read().await;
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let ttl = Duration::from_secs(10);
    let _good1 = Backend::start(&client, "good1", ttl).await;
    let _good2 = Backend::start(&client, "good2", ttl).await;
    let bad = Backend::start(&client, "bad", ttl).await;
    let greeters = client.channel("greeter");
    wait_for_ids(&greeters, &["bad", "good1", "good2"]).await;
    must(greeters.wait_for_ready(DEADLINE).await, "ready");
    bad.greeter.set_failing(true);

    let caller = Caller::start(greeters.channel());
    caller.calls(1_000).await;
    let (answers, failures) = caller.stop().await;
    // Five in a row eject it; nothing after that reaches it.
    assert_eq!(failures, 5, "{answers:?}");
    let stats = greeters.stats();
    assert_eq!(stats.ejections, 1, "{stats:?}");
    let bad_stats = stats.endpoints.iter().find(|e| e.id == "bad").unwrap();
    assert!(bad_stats.ejected_for.is_some(), "{bad_stats:?}");
    assert_eq!(bad_stats.failures, 5, "{bad_stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stops_listening_while_registered_costs_no_call() {
    let _shared = MEASURING.read().await;
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let ttl = Duration::from_secs(30);
    let _a = Backend::start(&client, "a", ttl).await;
    let _b = Backend::start(&client, "b", ttl).await;
    let mut c = Backend::start(&client, "c", ttl).await;
    let greeters = client.channel("greeter");
    wait_for_ids(&greeters, &["a", "b", "c"]).await;
    let caller = Caller::start(greeters.channel());
    caller.calls(200).await;
    assert!(caller.answered_by("c") > 0);

    // c stops serving (its listener closes, its connections end) but its lease lives on.
    c.stop_serving().await;
    let endpoint_state = |id: &str| {
        greeters
            .stats()
            .endpoints
            .into_iter()
            .find(|e| e.id == id)
            .map(|e| e.state)
    };
    within("c out of the pick", async {
        while endpoint_state("c") == Some(EndpointState::Ready) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let served = c.greeter.served();
    caller.calls(500).await;
    assert_eq!(
        c.greeter.served(),
        served,
        "calls reached a stopped instance"
    );
    assert_eq!(
        greeters.instances().len(),
        3,
        "the registry still lists it: the channel found out on its own"
    );

    // Back on the same port: the endpoint reconnects and gets calls again.
    c.serve_again().await;
    within("c gets calls again", async {
        while c.greeter.served() == served {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // At most the one call sent as c's GOAWAY crossed it: refused unprocessed, it fails saying
    // it is safe to send again (the request is gone with hyper, so the channel cannot).
    let failed = caller.failures();
    let (_, failures) = caller.stop().await;
    assert!(
        failures <= 1 && failed.iter().all(|(_, m)| m.contains("safe to send again")),
        "no call but the one crossing the GOAWAY may fail when an instance stops listening: {failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_keep_flowing_while_a_registry_restarts_empty() {
    let _shared = MEASURING.read().await;
    let server = TestServer::start().await;
    let addr = server.addr;
    let client = test_client(server.url());
    let ttl = Duration::from_secs(2);
    let _a = Backend::start(&client, "a", ttl).await;
    let _b = Backend::start(&client, "b", ttl).await;
    let greeters = client.channel("greeter");
    wait_for_ids(&greeters, &["a", "b"]).await;
    let caller = Caller::start(greeters.channel());
    caller.calls(50).await;

    // The registry restarts with nothing: the watch comes back to an empty view (or one with
    // only some instances registered again) while the registrations find out and return.
    must(server.stop().await, "stop registry");
    caller.calls(50).await;
    let store = Arc::new(MemoryStore::new(MemoryConfig::default()));
    let restarted = TestServer::serve_on(addr, store, Config::default()).await;
    within_for(
        Duration::from_secs(15),
        "the watch back on the restarted registry",
        async {
            while greeters.watch_counts().resets < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
    )
    .await;
    caller.calls(300).await;
    wait_for_ids(&greeters, &["a", "b"]).await;
    caller.calls(100).await;
    let (answers, failures) = caller.stop().await;
    assert_eq!(failures, 0, "calls failed across the restart: {answers:?}");
    let stats = greeters.stats();
    assert!(
        stats.endpoints.iter().all(|e| !e.stale),
        "both registered again: {stats:?}"
    );
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_the_registry_refuses_fails_its_calls_at_once_saying_why() {
    let _shared = MEASURING.read().await;
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let channel = client
        .balanced("greeter")
        .selector("version in (v1")
        .build();
    let refused = channel.wait_for_ready(DEADLINE).await.unwrap_err();
    assert!(
        matches!(refused, signpost_client::Error::InvalidArgument(_)),
        "{refused:?}"
    );
    let started = std::time::Instant::now();
    let mut greeter =
        signpost_examples::pb::greeter_service_client::GreeterServiceClient::new(channel.clone());
    let status = greeter
        .say_hello(signpost_examples::pb::SayHelloRequest { name: "x".into() })
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "no waiting");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status
            .message()
            .contains("the registry refused the channel's watch")
            && status.message().contains("selector"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_an_empty_service_says_none_is_registered() {
    let _shared = MEASURING.read().await;
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let channel = client.channel("nobody");
    let error = channel
        .wait_for_ready(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "no instance of nobody became available within 300ms: none is registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_that_require_mutual_tls_are_reached_over_tls() {
    let _shared = MEASURING.read().await;
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let pki = signpost_tests::tls::Pki::new("instances");
    let (listener, bound) = must(signpost_examples::bind("127.0.0.1", 0).await, "bind");
    let greeter = Greeter::new("tls1");
    let tls_pki = pki.clone();
    tokio::spawn(async move {
        greeter
            .serve_tls(
                listener,
                tls_pki.server_cert_pem.as_bytes(),
                tls_pki.server_key_pem.as_bytes(),
                Some(tls_pki.ca_pem.as_bytes()),
                std::future::pending(),
            )
            .await
    });
    let _registration = must(
        client
            .register(
                RegistrationBuilder::new("greeter")
                    .id("tls1")
                    .address("127.0.0.1")
                    .port(bound.port()),
            )
            .await,
        "register",
    );

    let tls = signpost_client::InstanceTls::new(pki.ca_pem.clone())
        .identity(pki.client_cert_pem.clone(), pki.client_key_pem.clone());
    let channel = must(client.balanced("greeter").tls(tls), "tls settings").build();
    signpost_tests::greeters::wait_for_connected(&channel, 1).await;
    let caller = Caller::start(channel.clone());
    caller.calls(50).await;
    let (answers, failures) = caller.stop().await;
    assert_eq!(failures, 0, "{answers:?}");
    assert!(answers["tls1"] >= 50, "{answers:?}");

    // Without a client certificate the instance refuses the handshake, and without TLS the
    // connection is not HTTP/2 at all: either way the endpoint fails, and says why.
    let anonymous = must(
        client
            .balanced("greeter")
            .tls(signpost_client::InstanceTls::new(pki.ca_pem.clone())),
        "tls settings",
    )
    .build();
    let plain = client.channel("greeter");
    for (channel, what) in [(&anonymous, "no client certificate"), (&plain, "plaintext")] {
        let error = within("the endpoint fails", async {
            loop {
                let stats = channel.stats();
                if let Some(e) = stats.endpoints.first()
                    && e.state == EndpointState::Failed
                {
                    return e.last_error.clone().unwrap_or_default();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let expected = if what == "plaintext" {
            "does not answer HTTP/2"
        } else {
            "CertificateRequired"
        };
        assert!(error.contains(expected), "{what}: {error}");
    }
    let refused = client
        .balanced("greeter")
        .tls(signpost_client::InstanceTls::new("not a certificate"));
    match refused {
        Err(signpost_client::Error::InvalidArgument(message)) => {
            assert!(message.starts_with("instance TLS: "), "{message}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_given_up_on_does_not_take_the_connection_down() {
    let _shared = MEASURING.read().await;
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let _backend = Backend::start_with(
        &client,
        Greeter::new("slow").with_delay(Duration::from_secs(3)),
        RegistrationBuilder::new("greeter")
            .id("slow")
            .ttl(Duration::from_secs(10)),
    )
    .await;
    let channel = client.channel("greeter");
    signpost_tests::greeters::wait_for_connected(&channel, 1).await;
    let mut greeter =
        signpost_examples::pb::greeter_service_client::GreeterServiceClient::new(channel.clone());
    // Given up on by the caller after 1.5 s, with nothing read meanwhile: the connection is
    // suspect, and the probe it gets is answered at once.
    let call = greeter.say_hello(signpost_examples::pb::SayHelloRequest { name: "x".into() });
    assert!(
        tokio::time::timeout(Duration::from_millis(1_500), call)
            .await
            .is_err()
    );
    // A probe that got no answer would shut the connection within its 1 s timeout; past that,
    // the endpoint is still ready, never failed, never ejected: the same connection goes on.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stats = channel.stats();
    let endpoint = &stats.endpoints[0];
    assert_eq!(endpoint.state, EndpointState::Ready, "{stats:?}");
    assert_eq!(endpoint.last_error, None, "{stats:?}");
    assert_eq!(endpoint.probes, 1, "the wait made it suspect: {stats:?}");
    assert_eq!(stats.ejections, 0);
    let answer = greeter
        .say_hello(signpost_examples::pb::SayHelloRequest { name: "y".into() })
        .await;
    assert!(answer.is_ok(), "{answer:?}");
}
