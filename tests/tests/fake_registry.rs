//! The client's watch, keep-alive and registration against a registry whose every answer the
//! test scripts (`signpost_tests::fake`): the edge cases a real server seldom produces on cue.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use signpost_client::{
    Client, ClientBuilder, Error, Event, RegistrationBuilder, RegistrationState, WatchUpdate,
};
use signpost_proto::v1 as pb;
use signpost_tests::fake::{FakeRegistry, changes, event, leased, progress, reset};
use signpost_tests::{instance, within};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

const ADDED: i32 = pb::EventType::Added as i32;
const REMOVED: i32 = pb::EventType::Removed as i32;

fn builder(fake: &FakeRegistry) -> ClientBuilder {
    Client::builder()
        .registry(fake.url())
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
}

/// An instance of `svc` at a port nothing listens on: only its id matters here.
fn svc(id: &str) -> pb::Instance {
    instance("svc", id, 1)
}

fn greeter() -> RegistrationBuilder {
    RegistrationBuilder::new("greeter")
        .id("greeter-1")
        .address("127.0.0.1")
        .port(1)
        .ttl(Duration::from_secs(1))
}

async fn next(updates: &mut ReceiverStream<signpost_client::Result<WatchUpdate>>) -> WatchUpdate {
    let update = within("a watch update", updates.next()).await;
    update.expect("the watch ended").expect("watch update")
}

/// Each event as (kind, id), for comparisons.
fn events(update: &WatchUpdate) -> Vec<(&'static str, String)> {
    update
        .events
        .iter()
        .map(|e| match e {
            Event::Added(i) => ("added", i.id.clone()),
            Event::Updated(i) => ("updated", i.id.clone()),
            Event::Removed(i, _) => ("removed", i.id.clone()),
        })
        .collect()
}

/// What a caller folding the updates holds.
fn fold(view: &mut BTreeMap<String, u64>, update: &WatchUpdate) {
    if update.reset {
        view.clear();
    }
    for e in &update.events {
        match e {
            Event::Added(i) | Event::Updated(i) => view.insert(i.id.clone(), update.revision),
            Event::Removed(i, _) => view.remove(&i.id),
        };
    }
}

fn ids(view: &BTreeMap<String, u64>) -> Vec<&str> {
    view.keys().map(String::as_str).collect()
}

#[tokio::test]
async fn a_reset_mid_stream_replaces_the_view() {
    let mut fake = FakeRegistry::start().await;
    let client = builder(&fake).build().unwrap();
    let mut updates = client.watch("svc");
    let watch = fake.next_watch().await;
    assert_eq!(watch.request.service, "svc");
    assert_eq!(
        watch.request.start_revision, 0,
        "a fresh watch asks for a reset"
    );

    let mut view = BTreeMap::new();
    watch.send(reset(5, &[svc("a"), svc("b")])).await;
    fold(&mut view, &next(&mut updates).await);
    assert_eq!(ids(&view), ["a", "b"]);

    // The registry fell behind on this stream and starts over, on the same stream.
    watch.send(reset(9, &[svc("c")])).await;
    let update = next(&mut updates).await;
    assert!(update.reset);
    assert_eq!(update.revision, 9);
    assert_eq!(events(&update), [("added", "c".to_owned())]);
    fold(&mut view, &update);
    assert_eq!(ids(&view), ["c"]);

    // The watch's own view moved to the reset's revision: a reconnect resumes from there.
    drop(watch);
    let again = fake.next_watch().await;
    assert_eq!(again.request.start_revision, 9);
}

#[tokio::test]
async fn an_event_of_an_unknown_type_is_skipped_and_the_stream_goes_on() {
    let mut fake = FakeRegistry::start().await;
    let client = builder(&fake).build().unwrap();
    let mut updates = client.watch("svc");
    let watch = fake.next_watch().await;
    watch.send(reset(5, &[svc("a")])).await;
    next(&mut updates).await;

    // Type 99 is what a newer registry might send; this client knows nothing of it.
    watch
        .send(changes(
            6,
            vec![event(99, &svc("b"), 6), event(ADDED, &svc("c"), 6)],
        ))
        .await;
    let update = next(&mut updates).await;
    assert_eq!(update.revision, 6);
    assert!(!update.reset);
    assert_eq!(events(&update), [("added", "c".to_owned())]);

    watch
        .send(changes(7, vec![event(REMOVED, &svc("a"), 7)]))
        .await;
    let update = next(&mut updates).await;
    assert_eq!(update.revision, 7);
    assert_eq!(events(&update), [("removed", "a".to_owned())]);
    assert!(!watch.tx.is_closed(), "the stream is still the client's");
    assert!(
        fake.try_next_watch().is_none(),
        "no second stream was opened"
    );
}

#[tokio::test]
async fn a_stream_the_registry_ends_is_reopened_from_its_revision_and_counted_as_a_resume() {
    let mut fake = FakeRegistry::start().await;
    let client = builder(&fake).build().unwrap();
    let channel = client.channel("svc");
    let first = fake.next_watch().await;
    first.send(reset(5, &[svc("a")])).await;
    within("the reset counted", async {
        while channel.watch_counts().resets == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // The registry ends the stream cleanly, as a server shutting down does.
    drop(first);
    let second = fake.next_watch().await;
    assert_eq!(second.request.start_revision, 5, "resumes where it was");
    second
        .send(changes(6, vec![event(ADDED, &svc("b"), 6)]))
        .await;
    within("the resume counted", async {
        while channel.watch_counts().resumes == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let counts = channel.watch_counts();
    assert_eq!(counts.reconnects, 1, "{counts:?}");
    assert_eq!(counts.resumes, 1, "{counts:?}");
    assert_eq!(counts.resets, 1, "only the first reset: {counts:?}");
}

#[tokio::test]
async fn a_silent_stream_is_taken_for_dead_and_reopened_from_its_revision() {
    let mut fake = FakeRegistry::start().await;
    let client = builder(&fake)
        .watch_idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut updates = client.watch("svc");
    let first = fake.next_watch().await;
    first.send(reset(3, &[svc("a")])).await;
    next(&mut updates).await;

    // From here on the first stream says nothing and stays open: a half-open connection.
    let second = fake.next_watch().await;
    assert_eq!(second.request.start_revision, 3);
    first.closed().await;
    second
        .send(changes(4, vec![event(ADDED, &svc("b"), 4)]))
        .await;
    let update = next(&mut updates).await;
    assert!(!update.reset, "resumed by replay");
    assert_eq!(update.revision, 4);
    assert_eq!(events(&update), [("added", "b".to_owned())]);
}

#[tokio::test]
async fn progress_messages_keep_a_quiet_stream_open() {
    let mut fake = FakeRegistry::start().await;
    let idle = Duration::from_millis(500);
    let client = builder(&fake).watch_idle_timeout(idle).build().unwrap();
    let mut updates = client.watch("svc");
    let watch = fake.next_watch().await;
    watch.send(reset(3, &[svc("a")])).await;
    next(&mut updates).await;

    // Three times the idle timeout of nothing but progress, each well inside it.
    let mut every = tokio::time::interval(idle / 5);
    for _ in 0..15 {
        every.tick().await;
        watch.send(progress(3)).await;
        let update = next(&mut updates).await;
        assert!(update.events.is_empty() && !update.reset);
    }
    assert!(!watch.tx.is_closed(), "the stream is still the client's");
    assert!(
        fake.try_next_watch().is_none(),
        "no second stream was opened"
    );
}

#[tokio::test]
async fn a_lease_reported_expired_is_registered_again() {
    let mut fake = FakeRegistry::start().await;
    let client = builder(&fake).build().unwrap();
    fake.answer_register(Ok(leased(7, Duration::from_secs(1))));
    let registration = within("register", client.register(greeter()))
        .await
        .unwrap();
    assert_eq!(fake.next_register().await.lease_id, 0);
    assert_eq!(
        registration.state(),
        RegistrationState::Registered { lease_id: 7 }
    );
    let mut state = registration.subscribe();
    let mut keep_alive = fake.next_keep_alive().await;
    keep_alive.until_lease(7).await;
    keep_alive.refreshed(7, Duration::from_secs(1)).await;

    // A registry that restarted without its leases says so on the next refresh.
    keep_alive.until_lease(7).await;
    keep_alive.expired(7).await;
    within(
        "the registration retrying",
        state.wait_for(|s| matches!(s, RegistrationState::Retrying { .. })),
    )
    .await
    .unwrap();
    // The new Register is held until answered, so the state stays Retrying until then.
    let again = fake.next_register().await;
    let registered = again.instance.unwrap();
    assert_eq!(
        (registered.service.as_str(), registered.id.as_str()),
        ("greeter", "greeter-1")
    );
    assert!(matches!(
        registration.state(),
        RegistrationState::Retrying { .. }
    ));
    fake.answer_register(Ok(leased(8, Duration::from_secs(1))));
    within(
        "the registration registered again",
        state.wait_for(|s| *s == RegistrationState::Registered { lease_id: 8 }),
    )
    .await
    .unwrap();
    // The new lease is refreshed on the same stream.
    keep_alive.until_lease(8).await;

    fake.answer_deregister(Ok(pb::DeregisterResponse {
        existed: true,
        revision: 0,
    }));
    let existed = within("deregister", registration.deregister()).await;
    assert!(existed.unwrap());
    assert_eq!(fake.next_deregister().await.id, "greeter-1");
}

#[tokio::test]
async fn register_refused_for_a_limit_fails_at_once() {
    let mut fake = FakeRegistry::start().await;
    let client = builder(&fake).build().unwrap();
    fake.answer_register(Err(Status::resource_exhausted(
        "namespace \"default\" holds its limit of 2 instances",
    )));
    // A retry would wait for a second answer that never comes, and the deadline would fail.
    let result = within("register", client.register(greeter())).await;
    let error = result.expect_err("a limit reached is no registration");
    assert!(matches!(error, Error::ResourceExhausted(_)), "{error:?}");
    assert!(!error.is_transient());
    assert_eq!(
        error.to_string(),
        "limit reached: namespace \"default\" holds its limit of 2 instances"
    );
    fake.next_register().await;
    assert!(fake.try_next_register().is_none(), "register was retried");
}

#[tokio::test]
async fn registering_again_refused_for_a_limit_stops_with_a_failed_state() {
    let mut fake = FakeRegistry::start().await;
    let client = builder(&fake).build().unwrap();
    fake.answer_register(Ok(leased(7, Duration::from_secs(1))));
    let registration = within("register", client.register(greeter()))
        .await
        .unwrap();
    fake.next_register().await;
    let mut state = registration.subscribe();
    let mut keep_alive = fake.next_keep_alive().await;
    keep_alive.until_lease(7).await;
    keep_alive.expired(7).await;

    fake.next_register().await;
    fake.answer_register(Err(Status::resource_exhausted(
        "namespace \"default\" holds its limit of 2 instances",
    )));
    let failed = within(
        "the registration failing",
        state.wait_for(|s| matches!(s, RegistrationState::Failed { .. })),
    )
    .await
    .unwrap()
    .clone();
    let RegistrationState::Failed { reason } = failed else {
        unreachable!()
    };
    assert!(reason.starts_with("limit reached: "), "{reason}");

    // Stopping a failed registration sends nothing: the registry holds nothing of it.
    let existed = within("deregister", registration.deregister()).await;
    assert!(!existed.unwrap());
    assert!(
        fake.try_next_register().is_none(),
        "registering was retried"
    );
}

#[tokio::test]
async fn a_keep_alive_stream_the_registry_ends_is_reopened_and_refreshes_at_once() {
    let mut fake = FakeRegistry::start().await;
    let client = builder(&fake).build().unwrap();
    // A minute's ttl: the next regular refresh is 20 s away, far past the deadline below.
    fake.answer_register(Ok(leased(7, Duration::from_secs(60))));
    let _registration = within(
        "register",
        client.register(greeter().ttl(Duration::from_secs(60))),
    )
    .await
    .unwrap();
    let first = fake.next_keep_alive().await;
    drop(first);
    let mut second = fake.next_keep_alive().await;
    second.until_lease(7).await;
}

#[tokio::test]
async fn a_lease_added_while_the_keep_alive_stream_is_down_is_refreshed_once_it_is_back() {
    let mut fake = FakeRegistry::start().await;
    // Seconds of backoff: the second registration lands while the stream waits to reconnect.
    let client = builder(&fake)
        .backoff(Duration::from_secs(2), Duration::from_secs(2))
        .build()
        .unwrap();
    let minute = Duration::from_secs(60);
    fake.answer_register(Ok(leased(7, minute)));
    let _first = within("register", client.register(greeter().ttl(minute)))
        .await
        .unwrap();
    let broken = fake.next_keep_alive().await;
    broken
        .tx
        .send(Err(Status::unavailable("restarting")))
        .await
        .unwrap();
    broken.closed_by_client().await;

    fake.answer_register(Ok(leased(8, minute)));
    let _second = within(
        "register while the stream is down",
        client.register(greeter().id("greeter-2").ttl(minute)),
    )
    .await
    .unwrap();
    // With a minute's ttl neither lease is due for 20 s: both come at once because the stream
    // is fresh, which needs the second lease to have been taken while it was down.
    let mut back = fake.next_keep_alive().await;
    let mut seen = vec![
        back.next_lease().await.unwrap(),
        back.next_lease().await.unwrap(),
    ];
    seen.sort();
    assert_eq!(seen, [7, 8]);
}
