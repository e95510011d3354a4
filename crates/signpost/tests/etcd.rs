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
async fn an_etcd_outage_refuses_writes_and_is_not_serving_until_etcd_returns() {
    let Some(mut etcd) = Etcd::start(1).await else {
        return;
    };
    let s = server(&etcd.endpoints(), &[]);
    let mut client = connect(s.url()).await;
    signpost_tests::register(&mut client, instance("svc", "kept", 1)).await;
    assert_eq!(health_status(s.url()).await, Some(ServingStatus::Serving));

    etcd.kill(0);
    let status = within("a write answering UNAVAILABLE", async {
        let mut n = 0;
        loop {
            n += 1;
            let id = format!("during{n}");
            match client
                .register(register_request(instance("svc", &id, 2), None))
                .await
            {
                Err(status) => return status,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("etcd unreachable"), "{status:?}");
    within("health NOT_SERVING", async {
        while health_status(s.url()).await != Some(ServingStatus::NotServing) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Reads are served from the replica: the last state etcd agreed on.
    assert_eq!(ids(&discover(&mut client, "svc").await), ["kept"]);

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
            ..Default::default()
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

    let killed = std::time::Instant::now();
    a.kill9();
    b.wait_for_log("this server runs the health checks");
    // The README promises a takeover within a few seconds: the checker key's lease is 3 s.
    let takeover = killed.elapsed();
    eprintln!("health checks taken over {takeover:?} after the checker died");
    assert!(
        takeover < Duration::from_secs(6),
        "the health checks moved only after {takeover:?}"
    );
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

/// What the writers of [`Load`] saw in one phase of a test.
#[derive(Debug, Default, Clone)]
struct Phase {
    name: String,
    writes: u64,
    failed: Vec<String>,
    slowest: Duration,
}

/// Writers through several servers: each registers instance after instance and deregisters
/// every fifth one it made, one call at a time, and counts every call that failed.
struct Load {
    acknowledged: Arc<Mutex<BTreeSet<String>>>,
    deregistered: Arc<Mutex<BTreeSet<String>>>,
    /// The highest revision any acknowledged write answered with.
    revision: Arc<std::sync::atomic::AtomicU64>,
    phases: Arc<Mutex<Vec<Phase>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(urls: &[String], writers: usize, service: &'static str) -> Load {
        let load = Load {
            acknowledged: Arc::default(),
            deregistered: Arc::default(),
            revision: Arc::default(),
            phases: Arc::new(Mutex::new(vec![Phase {
                name: "start".into(),
                ..Phase::default()
            }])),
            stop: Arc::default(),
            writers: Vec::new(),
        };
        let writers = (0..writers)
            .map(|w| {
                let url = urls[w % urls.len()].clone();
                let (acknowledged, deregistered, revision, phases, stop) = (
                    load.acknowledged.clone(),
                    load.deregistered.clone(),
                    load.revision.clone(),
                    load.phases.clone(),
                    load.stop.clone(),
                );
                tokio::spawn(async move {
                    let mut client = connect(url).await;
                    let record = |took: Duration, failure: Option<String>| {
                        let mut phases = phases.lock().unwrap();
                        let phase = phases.last_mut().unwrap();
                        phase.writes += 1;
                        phase.slowest = phase.slowest.max(took);
                        phase.failed.extend(failure);
                    };
                    for n in 0u32.. {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let id = format!("w{w}-{n}");
                        let started = std::time::Instant::now();
                        let registered = client
                            .register(register_request(
                                instance(service, &id, n % 60_000 + 1),
                                None,
                            ))
                            .await;
                        match registered {
                            Ok(answer) => {
                                revision.fetch_max(
                                    answer.into_inner().revision,
                                    std::sync::atomic::Ordering::SeqCst,
                                );
                                acknowledged.lock().unwrap().insert(id);
                                record(started.elapsed(), None);
                            }
                            Err(status) => record(
                                started.elapsed(),
                                Some(format!("register {id}: {status:?}")),
                            ),
                        }
                        if n % 5 == 4 {
                            let old = format!("w{w}-{}", n - 4);
                            let started = std::time::Instant::now();
                            let removed = client
                                .deregister(pb::DeregisterRequest {
                                    namespace: "default".into(),
                                    service: service.into(),
                                    id: old.clone(),
                                })
                                .await;
                            match removed {
                                Ok(answer) => {
                                    revision.fetch_max(
                                        answer.into_inner().revision,
                                        std::sync::atomic::Ordering::SeqCst,
                                    );
                                    deregistered.lock().unwrap().insert(old);
                                    record(started.elapsed(), None);
                                }
                                Err(status) => record(
                                    started.elapsed(),
                                    Some(format!("deregister {old}: {status:?}")),
                                ),
                            }
                        }
                        // A steady load, not as much as the machine can take.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Load { writers, ..load }
    }

    /// Starts counting into a new phase.
    fn phase(&self, name: String) {
        self.phases.lock().unwrap().push(Phase {
            name,
            ..Phase::default()
        });
    }

    /// Waits until `n` more writes were acknowledged.
    async fn more(&self, n: usize) {
        let count = || self.acknowledged.lock().unwrap().len();
        let target = count() + n;
        within("writes going on", async {
            while count() < target {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    async fn stop(self) -> Vec<Phase> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for writer in self.writers {
            within("a writer stopping", writer).await.unwrap();
        }
        self.phases.lock().unwrap().clone()
    }
}

/// A watch that a task reads all along, as a real watcher does; [`Reader::stop`] hands the
/// view back.
struct Reader {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(WatchView, Client)>,
}

impl Reader {
    async fn open(url: String, service: &str) -> Reader {
        let mut client = connect(url).await;
        let mut view = watch(&mut client, service).await;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    // `WatchView::next` only awaits the stream's next message, which is safe
                    // to give up on: nothing is lost.
                    _ = stopped.changed() => return (view, client),
                    next = view.next() => { next.expect("the watch goes on through etcd failures"); }
                }
            }
        });
        Reader { stop, task }
    }

    async fn stop(self) -> (WatchView, Client) {
        self.stop.send_replace(true);
        within("a watch reader stopping", self.task).await.unwrap()
    }
}

/// Every acknowledged write is there on every server, and every watcher's view equals Discover.
async fn check_after_load(
    urls: &[String],
    service: &str,
    acknowledged: &BTreeSet<String>,
    deregistered: &BTreeSet<String>,
    revision: u64,
    readers: Vec<Reader>,
) {
    for url in urls {
        let mut client = connect(url.clone()).await;
        let found = within("the server reaching the last acknowledged write", async {
            loop {
                let found = discover(&mut client, service).await;
                if found.revision >= revision {
                    return found;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let present: BTreeSet<String> = ids(&found).into_iter().collect();
        for id in acknowledged {
            assert!(
                present.contains(id) || deregistered.contains(id),
                "{id} was acknowledged, never deregistered, and is not on {url}"
            );
        }
        for id in deregistered {
            assert!(
                !present.contains(id),
                "{id} was deregistered and is on {url}"
            );
        }
    }
    for reader in readers {
        let (mut view, mut client) = reader.stop().await;
        until_equal_to_discover(&mut view, &mut client, service).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_each_etcd_member_in_turn_under_load_fails_no_write() {
    let Some(mut etcd) = Etcd::start(3).await else {
        return;
    };
    // Both servers list the members in the same order, so the first endpoint is the one both
    // use first: the case tonic's balancer handled worst.
    let a = server(&etcd.endpoints(), &[]);
    let b = server(&etcd.endpoints(), &[]);
    let urls = [a.url(), b.url()];
    let mut readers = Vec::new();
    for url in urls.iter().chain(urls.iter()) {
        readers.push(Reader::open(url.clone(), "load").await);
    }
    // A lease kept alive through B all along.
    let mut on_b = connect(b.url()).await;
    let leased = must(
        on_b.register(register_request(
            instance("leased", "l1", 1),
            Some(Duration::from_secs(2)),
        ))
        .await,
        "register a leased instance",
    )
    .into_inner();
    let (keep_tx, keep_rx) = tokio::sync::mpsc::channel(4);
    let mut answers = must(
        on_b.keep_alive(tokio_stream::wrappers::ReceiverStream::new(keep_rx))
            .await,
        "keep_alive on B",
    )
    .into_inner();
    let keeper_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let stop = keeper_stop.clone();
        tokio::spawn(async move {
            let mut refreshed = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                keep_tx
                    .send(pb::KeepAliveRequest {
                        lease_id: leased.lease_id,
                    })
                    .await
                    .unwrap();
                let answer = within("keep-alive answer", answers.message())
                    .await
                    .expect("the keep-alive stream goes on")
                    .expect("an answer");
                assert!(!answer.expired, "the lease expired while etcd had quorum");
                refreshed += 1;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            refreshed
        })
    };

    let load = Load::start(&urls, 4, "load");
    load.more(40).await;
    for member in 0..3 {
        etcd.kill(member);
        load.phase(format!("m{member} killed"));
        load.more(60).await;
        load.phase(format!("m{member} restarting"));
        etcd.restart(member).await;
        load.phase(format!("m{member} back"));
        load.more(40).await;
    }
    // Read once the writers have stopped, so that both sets are of the same moment.
    let (acknowledged, deregistered, revision) = (
        load.acknowledged.clone(),
        load.deregistered.clone(),
        load.revision.clone(),
    );
    let phases = load.stop().await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    let deregistered = deregistered.lock().unwrap().clone();
    let revision = revision.load(std::sync::atomic::Ordering::SeqCst);
    keeper_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let refreshed = within("the keeper stopping", keeper).await.unwrap();

    for phase in &phases {
        eprintln!(
            "{}: {} writes, {} failed, slowest {:?}",
            phase.name,
            phase.writes,
            phase.failed.len(),
            phase.slowest
        );
    }
    let failed: Vec<&String> = phases.iter().flat_map(|p| &p.failed).collect();
    assert!(
        failed.is_empty(),
        "writes failed while two members were up: {failed:#?}"
    );
    assert!(refreshed > 0);
    check_after_load(
        &urls,
        "load",
        &acknowledged,
        &deregistered,
        revision,
        readers,
    )
    .await;
    assert_eq!(ids(&discover(&mut on_b, "leased").await), ["l1"]);

    // One line when a member goes and one when it is back, not one per retry; and nothing that
    // says the store, or the health checks, were lost.
    for server in [&a, &b] {
        let logs: Vec<String> = server.logs.try_iter().collect();
        let count = |needle: &str| logs.iter().filter(|l| l.contains(needle)).count();
        // Per member, the lines alternate: down, back, down, back...
        let mut states: std::collections::BTreeMap<String, Vec<bool>> = Default::default();
        for line in &logs {
            let up = if line.contains("etcd member unreachable") {
                false
            } else if line.contains("etcd member reachable again") {
                true
            } else {
                continue;
            };
            let endpoint = line
                .split("endpoint=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_default()
                .to_owned();
            states.entry(endpoint).or_default().push(up);
        }
        for (endpoint, changes) in &states {
            let alternate = changes
                .iter()
                .enumerate()
                .all(|(i, up)| *up == (i % 2 == 1));
            // Each of the three kills is at most one down and one back for a member: its own
            // death, or, for a live one, answering too slowly while the leader was gone.
            assert!(
                alternate && changes.len() <= 6,
                "{endpoint}: {changes:?} in {logs:#?}"
            );
        }
        eprintln!("{}: member state changes logged: {states:?}", server.url());
        for needle in [
            "etcd unreachable",
            "health checks cannot read the store",
            "lost the checker key",
        ] {
            assert_eq!(count(needle), 0, "{needle:?} in {logs:#?}");
        }
    }
}

/// Waits until the server at `url` reports `status` on `grpc.health.v1`; returns how long that
/// took.
async fn until_health(url: &str, status: ServingStatus, what: &'static str) -> Duration {
    let started = std::time::Instant::now();
    within(what, async {
        while health_status(url.to_owned()).await != Some(status) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_etcd_members_of_three_down_writes_fail_unavailable_and_reads_go_on() {
    // The store's own bound on one etcd request (EtcdConfig::request_timeout), which a write
    // that cannot be made must not outlast by much.
    const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
    let Some(mut etcd) = Etcd::start(3).await else {
        return;
    };
    let a = server(&etcd.endpoints(), &[]);
    let b = server(&etcd.endpoints(), &[]);
    let mut on_a = connect(a.url()).await;
    let mut on_b = connect(b.url()).await;
    signpost_tests::register(&mut on_a, instance("svc", "kept", 1)).await;
    let mut watch_b = watch(&mut on_b, "svc").await;
    watch_b.until("B sees kept", |v| v.ids() == ["kept"]).await;
    until_health(&a.url(), ServingStatus::Serving, "A serving").await;

    // The first endpoint and one more: no quorum.
    etcd.kill(0);
    etcd.kill(1);
    let down = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    let mut refusals = Vec::new();
    let first_refusal = within("writes failing UNAVAILABLE", async {
        loop {
            n += 1;
            let started = std::time::Instant::now();
            let written = on_a
                .register(register_request(
                    instance("svc", &format!("during{n}"), 2),
                    None,
                ))
                .await;
            let took = started.elapsed();
            slowest = slowest.max(took);
            match written {
                // etcd's remaining member may take a write for a moment before it sees that it
                // has lost its quorum; no member can commit it, though.
                Ok(_) => {}
                Err(status) => {
                    refusals.push(status);
                    if refusals.len() == 3 {
                        return down.elapsed();
                    }
                }
            }
        }
    })
    .await;
    eprintln!("a refused write: {}", refusals[0].message());
    for status in &refusals {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("etcd unreachable"),
            "the message names etcd: {status:?}"
        );
    }
    assert!(
        slowest <= REQUEST_DEADLINE + Duration::from_secs(1),
        "a write took {slowest:?}, more than the request deadline"
    );
    until_health(&a.url(), ServingStatus::NotServing, "A NOT_SERVING").await;
    let not_serving = down.elapsed();
    until_health(&b.url(), ServingStatus::NotServing, "B NOT_SERVING").await;
    // Once the server knows, a write fails at once.
    let started = std::time::Instant::now();
    let refused = on_b
        .register(register_request(instance("svc", "refused", 3), None))
        .await
        .expect_err("a write without quorum");
    let fast_refusal = started.elapsed();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("etcd unreachable"),
        "{refused:?}"
    );

    // The CLI says whose failure it is: the registry answered.
    let (ok, _, stderr) = signpost_tests::process::run(std::process::Command::new(EXE).args([
        "register",
        "svc",
        "--id",
        "from-cli",
        "--address",
        "127.0.0.1",
        "--port",
        "4",
        "--registry",
        &a.url(),
    ]));
    assert!(!ok, "the CLI's register fails without quorum: {stderr}");
    assert!(
        stderr.contains(&format!("the registry at {} answered", a.url()))
            && stderr.contains("etcd unreachable")
            && !stderr.contains("cannot reach registry"),
        "{stderr}"
    );

    // Reads go on from each server's replica, and so do watches, old and new.
    for client in [&mut on_a, &mut on_b] {
        assert!(
            ids(&discover(client, "svc").await).contains(&"kept".to_owned()),
            "Discover answers from the replica"
        );
    }
    let mut fresh = watch(&mut on_a, "svc").await;
    assert!(fresh.ids().contains(&"kept".to_owned()));

    // One member back: quorum, and everything recovers by itself.
    let back = std::time::Instant::now();
    etcd.restart(1).await;
    let serving_a = until_health(&a.url(), ServingStatus::Serving, "A SERVING again").await;
    until_health(&b.url(), ServingStatus::Serving, "B SERVING again").await;
    let recovered = back.elapsed();
    let after_a = signpost_tests::register(&mut on_a, instance("svc", "after-a", 5)).await;
    let after_b = signpost_tests::register(&mut on_b, instance("svc", "after-b", 6)).await;
    for view in [&mut watch_b, &mut fresh] {
        view.until_revision(after_a.revision.max(after_b.revision))
            .await;
        assert!(view.ids().contains(&"after-a".to_owned()));
        assert!(view.ids().contains(&"after-b".to_owned()));
    }
    until_equal_to_discover(&mut watch_b, &mut on_b, "svc").await;
    until_equal_to_discover(&mut fresh, &mut on_a, "svc").await;
    eprintln!(
        "two of three down: first UNAVAILABLE after {first_refusal:?}, slowest write {slowest:?}, \
         NOT_SERVING after {not_serving:?}, then refused in {fast_refusal:?}; \
         one member back: SERVING after {serving_a:?} ({recovered:?} with etcd's restart)"
    );
}
