//! Several `signpost serve --store etcd` processes over real etcd clusters: any server answers
//! any client, and losing a server, an etcd member, or etcd's history loses nothing and leaves
//! no gap in any watch.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_client::RegistryServiceClient;
use signpost_tests::etcd::Etcd;
use signpost_tests::http::FlipServer;
use signpost_tests::process::ServerProcess;
use signpost_tests::proxy::Proxy;
use signpost_tests::{WatchView, instance, must, register_request, watch_request, within};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

type Client = RegistryServiceClient<Channel>;

fn server(endpoints: &[String], extra: &[&str]) -> ServerProcess {
    let endpoints = endpoints.join(",");
    let mut args = vec!["--store", "etcd", "--etcd-endpoints", &endpoints];
    args.extend_from_slice(extra);
    ServerProcess::start(Path::new(EXE), &args)
}

async fn connect(url: String) -> Client {
    let channel = Channel::from_shared(url)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect");
    RegistryServiceClient::new(channel)
}

async fn discover(client: &mut Client, service: &str) -> pb::DiscoverResponse {
    must(
        client
            .discover(pb::DiscoverRequest {
                service: service.into(),
                ..Default::default()
            })
            .await,
        "discover",
    )
    .into_inner()
}

fn ids(response: &pb::DiscoverResponse) -> Vec<String> {
    signpost_tests::ids(&response.instances)
}

async fn watch(client: &mut Client, service: &str) -> WatchView {
    let mut view = WatchView::open(client, watch_request(service)).await;
    within("the first reset", view.next()).await.unwrap();
    view
}

/// Applies watch messages until the view holds exactly what Discover answers at a revision the
/// view has reached.
async fn until_equal_to_discover(view: &mut WatchView, client: &mut Client, service: &str) {
    within("watch view equal to Discover", async {
        loop {
            let found = discover(client, service).await;
            while view.revision < found.revision {
                view.next().await.expect("watch message");
            }
            if view.revision == found.revision {
                assert_eq!(view.ids(), ids(&found), "watch view against Discover");
                return;
            }
            // The view moved past this answer: ask again.
        }
    })
    .await
}

fn removal_of(view: &WatchView, id: &str) -> Option<pb::RemovalReason> {
    view.events
        .iter()
        .rev()
        .find(|e| {
            e.r#type() == pb::EventType::Removed && e.instance.as_ref().is_some_and(|i| i.id == id)
        })
        .map(|e| e.reason())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_registrations_leases_and_watches_and_survive_one_dying() {
    let Some(etcd) = Etcd::start(3).await else {
        return;
    };
    let a = server(&etcd.endpoints(), &[]);
    let b = server(&etcd.endpoints(), &[]);
    let mut on_a = connect(a.url()).await;
    let mut on_b = connect(b.url()).await;
    let mut watch_a = watch(&mut on_a, "pay").await;
    let mut watch_b = watch(&mut on_b, "pay").await;

    // Registered on A, seen by a watcher on B.
    let leased = must(
        on_a.register(register_request(
            instance("pay", "leased", 1),
            Some(Duration::from_secs(2)),
        ))
        .await,
        "register on A",
    )
    .into_inner();
    watch_b
        .until("B sees A's registration", |v| v.ids() == ["leased"])
        .await;

    // KeepAlive through B holds the lease granted through A well past its ttl.
    let (keep_tx, keep_rx) = tokio::sync::mpsc::channel(4);
    let mut answers = must(
        on_b.keep_alive(tokio_stream::wrappers::ReceiverStream::new(keep_rx))
            .await,
        "keep_alive on B",
    )
    .into_inner();
    let held_since = std::time::Instant::now();
    while held_since.elapsed() < Duration::from_secs(5) {
        keep_tx
            .send(pb::KeepAliveRequest {
                lease_id: leased.lease_id,
            })
            .await
            .unwrap();
        let answer = within("keep-alive answer", answers.message())
            .await
            .unwrap()
            .unwrap();
        assert!(!answer.expired, "B refreshes the lease A granted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(ids(&discover(&mut on_a, "pay").await), ["leased"]);

    // Without refreshes it expires, and both servers' watchers say why.
    drop(keep_tx);
    for view in [&mut watch_a, &mut watch_b] {
        view.until("the expiry seen on each server", |v| {
            removal_of(v, "leased").is_some()
        })
        .await;
    }
    assert_eq!(
        removal_of(&watch_a, "leased"),
        Some(pb::RemovalReason::Expired)
    );
    assert_eq!(
        removal_of(&watch_b, "leased"),
        Some(pb::RemovalReason::Expired)
    );

    // A deregister through B is DEREGISTERED on A's watch.
    signpost_tests::register(&mut on_a, instance("pay", "gone", 2)).await;
    must(
        on_b.deregister(pb::DeregisterRequest {
            namespace: "default".into(),
            service: "pay".into(),
            id: "gone".into(),
        })
        .await,
        "deregister on B",
    )
    .into_inner();
    watch_a
        .until("A sees the deregister", |v| {
            v.events.iter().any(|e| {
                e.r#type() == pb::EventType::Removed
                    && e.instance.as_ref().is_some_and(|i| i.id == "gone")
            })
        })
        .await;
    assert_eq!(
        removal_of(&watch_a, "gone"),
        Some(pb::RemovalReason::Deregistered)
    );

    // A client that knows both servers; instances registered through each.
    let client = signpost_client::Client::builder()
        .registry(a.url())
        .registry(b.url())
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .build()
        .unwrap();
    for n in 0..10 {
        let target = if n % 2 == 0 { &mut on_a } else { &mut on_b };
        signpost_tests::register(target, instance("pay", &format!("p{n}"), 10 + n)).await;
    }
    until_equal_to_discover(&mut watch_b, &mut on_b, "pay").await;
    let resets_before = watch_b.resets;

    // A dies. Nothing is lost, B's watcher goes on without a gap, and the client carries on.
    a.kill9();
    let kept = client
        .register_persistent(
            signpost_client::RegistrationBuilder::new("pay")
                .id("after-a")
                .address("127.0.0.1")
                .port(99),
        )
        .await;
    must(kept, "register through the client after A died");
    let found = within("discover through the client", client.discover("pay"))
        .await
        .unwrap();
    let mut found: Vec<String> = found.into_iter().map(|i| i.id).collect();
    found.sort();
    let mut expected: Vec<String> = (0..10).map(|n| format!("p{n}")).collect();
    expected.push("after-a".into());
    expected.sort();
    assert_eq!(found, expected, "every instance, through B");
    until_equal_to_discover(&mut watch_b, &mut on_b, "pay").await;
    assert_eq!(watch_b.ids(), expected);
    assert_eq!(
        watch_b.resets, resets_before,
        "B's watcher saw every change as an event: no reset, no gap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_etcd_leader_under_load_loses_no_acknowledged_registration() {
    let Some(mut etcd) = Etcd::start(3).await else {
        return;
    };
    let a = server(&etcd.endpoints(), &[]);
    let b = server(&etcd.endpoints(), &[]);
    let urls = [a.url(), b.url()];
    let mut watchers = Vec::new();
    for url in urls.iter().chain(urls.iter()) {
        let mut client = connect(url.clone()).await;
        let view = watch(&mut client, "load").await;
        watchers.push((view, client));
    }

    // Writers through both servers: register, and now and then deregister what they made.
    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let deregistered: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let url = urls[w % 2].clone();
            let (acknowledged, deregistered, stop) =
                (acknowledged.clone(), deregistered.clone(), stop.clone());
            tokio::spawn(async move {
                let mut client = connect(url).await;
                let mut failures = 0u32;
                for n in 0u32.. {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let id = format!("w{w}-{n}");
                    match client
                        .register(register_request(instance("load", &id, n % 60_000), None))
                        .await
                    {
                        Ok(_) => {
                            acknowledged.lock().unwrap().insert(id);
                        }
                        Err(_) => failures += 1,
                    }
                    if n % 5 == 4 {
                        let old = format!("w{w}-{}", n - 4);
                        if client
                            .deregister(pb::DeregisterRequest {
                                namespace: "default".into(),
                                service: "load".into(),
                                id: old.clone(),
                            })
                            .await
                            .is_ok()
                        {
                            deregistered.lock().unwrap().insert(old);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                failures
            })
        })
        .collect();

    let count = || acknowledged.lock().unwrap().len();
    within("load running", async {
        while count() < 40 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let leader = etcd.leader().await;
    etcd.kill(leader);
    let before = count();
    within("registrations going on without the leader", async {
        while count() < before + 40 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    etcd.restart(leader).await;
    let before = count();
    within("registrations going on after the restart", async {
        while count() < before + 40 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }

    let mut on_a = connect(a.url()).await;
    let mut on_b = connect(b.url()).await;
    let found_a = discover(&mut on_a, "load").await;
    let present: BTreeSet<String> = ids(&found_a).into_iter().collect();
    let deregistered = deregistered.lock().unwrap().clone();
    for id in acknowledged.lock().unwrap().iter() {
        assert!(
            present.contains(id) || deregistered.contains(id),
            "{id} was acknowledged, never deregistered, and is gone"
        );
    }
    for id in &deregistered {
        assert!(!present.contains(id), "{id} was deregistered and is back");
    }
    until_equal_to_discover(&mut watchers[0].0, &mut on_b, "load").await;
    for (view, client) in &mut watchers {
        until_equal_to_discover(view, client, "load").await;
        assert_eq!(view.ids(), ids(&found_a));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_a_paused_watcher_resumes_it_with_an_exact_reset() {
    let Some(etcd) = Etcd::start(1).await else {
        return;
    };
    // P reaches etcd through a proxy the test can cut; Q directly.
    let member: std::net::SocketAddr = etcd.endpoint(0)["http://".len()..].parse().unwrap();
    let proxy = Proxy::start(member).await;
    let p = server(&[proxy.url()], &["--history-size", "8"]);
    let q = server(&etcd.endpoints(), &["--history-size", "8"]);
    let mut on_p = connect(p.url()).await;
    let mut on_q = connect(q.url()).await;
    for n in 0..5 {
        signpost_tests::register(&mut on_q, instance("svc", &format!("old{n}"), n + 1)).await;
    }

    // A client's watcher pauses (disconnects) at a revision…
    let mut paused = watch(&mut on_q, "svc").await;
    until_equal_to_discover(&mut paused, &mut on_q, "svc").await;
    let (paused_at, paused_view) = (paused.revision, paused.instances.clone());
    drop(paused);
    // …and a watcher on P stays connected while P is cut off from etcd.
    let mut cut_off = watch(&mut on_p, "svc").await;
    let registered = discover(&mut on_q, "svc").await.revision;
    within("P catching up with Q", async {
        while discover(&mut on_p, "svc").await.revision < registered {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    until_equal_to_discover(&mut cut_off, &mut on_p, "svc").await;
    let events_before_cut = cut_off.events.len();
    proxy.cut();

    for n in 0..3 {
        must(
            on_q.deregister(pb::DeregisterRequest {
                namespace: "default".into(),
                service: "svc".into(),
                id: format!("old{n}"),
            })
            .await,
            "deregister",
        );
    }
    for n in 0..20 {
        signpost_tests::register(&mut on_q, instance("svc", &format!("new{n}"), 100 + n)).await;
    }
    let compacted_at = etcd.compact().await;
    assert!(compacted_at > i64::try_from(paused_at).unwrap());
    let now = discover(&mut on_q, "svc").await;

    // The paused watcher resumes from its revision: that history is gone, so a reset with
    // exactly what is registered now.
    let mut resumed = WatchView::resume(
        &mut on_q,
        pb::WatchRequest {
            service: "svc".into(),
            start_revision: paused_at,
            ..Default::default()
        },
        paused_view,
    )
    .await;
    let first = within("the resumed watch's first message", resumed.next())
        .await
        .unwrap();
    assert!(first.reset, "a resume past compaction starts with a reset");
    assert_eq!(resumed.ids(), ids(&now));
    assert_eq!(first.revision, now.revision);

    // P comes back to an etcd that compacted what it missed: its watcher gets a reset with
    // exactly the current instances, not a gap.
    proxy.heal();
    cut_off
        .until("P's watcher reset after the compaction", |v| v.resets == 2)
        .await;
    assert_eq!(cut_off.ids(), ids(&now));
    assert_eq!(
        cut_off.events.len(),
        events_before_cut,
        "nothing from the compacted history was made up as events: {:?}",
        &cut_off.events[events_before_cut..]
    );
    until_equal_to_discover(&mut cut_off, &mut on_p, "svc").await;
}

async fn health_status(url: String) -> Option<ServingStatus> {
    let channel = Channel::from_shared(url).ok()?.connect().await.ok()?;
    let answer = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "signpost.v1.RegistryService".into(),
        })
        .await
        .ok()?;
    Some(answer.into_inner().status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_is_unavailable_and_not_serving_until_etcd_returns() {
    let Some(mut etcd) = Etcd::start(1).await else {
        return;
    };
    let s = server(&etcd.endpoints(), &[]);
    let mut client = connect(s.url()).await;
    signpost_tests::register(&mut client, instance("svc", "kept", 1)).await;
    assert_eq!(health_status(s.url()).await, Some(ServingStatus::Serving));

    etcd.kill(0);
    let status = within("Discover answering UNAVAILABLE", async {
        loop {
            match client
                .discover(pb::DiscoverRequest {
                    service: "svc".into(),
                    ..Default::default()
                })
                .await
            {
                Err(status) => return status,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("etcd"), "{status:?}");
    let refused = client
        .register(register_request(instance("svc", "during", 2), None))
        .await
        .expect_err("a write without etcd");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    within("health NOT_SERVING", async {
        while health_status(s.url()).await != Some(ServingStatus::NotServing) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    etcd.restart(0).await;
    within("health SERVING again", async {
        while health_status(s.url()).await != Some(ServingStatus::Serving) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(ids(&discover(&mut client, "svc").await), ["kept"]);
    signpost_tests::register(&mut client, instance("svc", "after", 3)).await;
    assert_eq!(ids(&discover(&mut client, "svc").await), ["after", "kept"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_move_to_another_server_when_the_checker_dies_and_evictions_say_why() {
    let Some(etcd) = Etcd::start(1).await else {
        return;
    };
    let mut a = server(&etcd.endpoints(), &[]);
    a.wait_for_log("this server runs the health checks");
    let mut b = server(&etcd.endpoints(), &[]);
    let mut on_b = connect(b.url()).await;
    let backend = FlipServer::start(200).await;
    let mut checked = instance("web", "w1", backend.port());
    checked.check = Some(pb::HealthCheck {
        probe: Some(pb::health_check::Probe::Http(pb::HttpProbe {
            path: "/health".into(),
        })),
        interval: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 500_000_000,
        }),
        deregister_critical_after: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        successes_before_passing: 1,
        failures_before_critical: 1,
    });
    signpost_tests::register(&mut on_b, checked).await;
    // With unhealthy instances included, a verdict shows as the instance's health.
    let mut view = WatchView::open(
        &mut on_b,
        pb::WatchRequest {
            include_unhealthy: true,
            ..watch_request("web")
        },
    )
    .await;
    let health_of = |v: &WatchView| v.instances.get("w1").map(|i| i.health());
    view.until("passing, checked by A", |v| {
        health_of(v) == Some(pb::HealthStatus::Passing)
    })
    .await;

    a.kill9();
    b.wait_for_log("this server runs the health checks");
    backend.set(500);
    view.until("critical, checked by B", |v| {
        health_of(v) == Some(pb::HealthStatus::Critical)
    })
    .await;
    // Critical for longer than allowed: evicted, and the reason survives the trip through etcd.
    view.until("evicted", |v| removal_of(v, "w1").is_some())
        .await;
    assert_eq!(removal_of(&view, "w1"), Some(pb::RemovalReason::Unhealthy));
}
