//! Active health checks against real listeners: HTTP, TCP and gRPC probes, hysteresis, removal
//! of what stays critical, and scheduling at scale.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use signpost_proto::v1 as pb;
use signpost_tests::http::FlipServer;
use signpost_tests::*;
use tonic::Code;

fn secs(s: f64) -> prost_types::Duration {
    let d = Duration::from_secs_f64(s);
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn checked(
    service: &str,
    id: &str,
    port: u32,
    probe: pb::health_check::Probe,
    successes: u32,
    failures: u32,
) -> pb::Instance {
    let mut i = instance(service, id, port);
    i.check = Some(pb::HealthCheck {
        probe: Some(probe),
        interval: Some(secs(1.0)),
        timeout: Some(secs(0.5)),
        deregister_critical_after: None,
        successes_before_passing: successes,
        failures_before_critical: failures,
    });
    i
}

fn http(path: &str) -> pb::health_check::Probe {
    pb::health_check::Probe::Http(pb::HttpProbe {
        path: path.into(),
        ..Default::default()
    })
}

async fn health_of(client: &mut Client, service: &str, id: &str) -> Option<pb::Instance> {
    let all = discover(
        client,
        pb::DiscoverRequest {
            service: service.into(),
            include_unhealthy: true,
            ..Default::default()
        },
    )
    .await;
    all.instances.into_iter().find(|i| i.id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_drives_health_with_hysteresis_and_watchers_follow() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let backend = FlipServer::start(500).await;
    let mut healthy = WatchView::open(&mut client, watch_request("web")).await;
    healthy.until("reset", |v| v.resets == 1).await;
    let mut everything = WatchView::open(
        &mut client,
        pb::WatchRequest {
            include_unhealthy: true,
            ..watch_request("web")
        },
    )
    .await;
    everything.until("reset", |v| v.resets == 1).await;

    let registered = register(
        &mut client,
        checked("web", "w1", backend.port(), http("/health"), 2, 2),
    )
    .await;
    let stored = registered.instance.unwrap();
    assert_eq!(
        stored.health(),
        pb::HealthStatus::Critical,
        "no traffic before a first pass"
    );
    assert_eq!(stored.health_output, "not checked yet");
    everything
        .until("seen critical", |v| v.instances.contains_key("w1"))
        .await;
    assert!(healthy.instances.is_empty());

    // 200: passing after two good probes in a row.
    backend.set(200);
    let started = Instant::now();
    within_for(
        Duration::from_secs(6),
        "passing",
        healthy.until("added", |v| v.ids() == ["w1"]),
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "two probes at a 1 s interval take over a second"
    );
    let added = healthy.events.last().unwrap();
    assert_eq!(added.r#type(), pb::EventType::Added);
    let passing = health_of(&mut client, "web", "w1").await.unwrap();
    assert_eq!(passing.health(), pb::HealthStatus::Passing);
    assert!(
        passing.health_output.contains("200"),
        "{}",
        passing.health_output
    );
    assert!(passing.health_checked_at.is_some());

    // 429: warning at once, still in the healthy view.
    backend.set(429);
    within_for(
        Duration::from_secs(4),
        "warning",
        healthy.until("updated", |v| {
            v.instances
                .get("w1")
                .is_some_and(|i| i.health() == pb::HealthStatus::Warning)
        }),
    )
    .await;

    // 500: critical after two failures; healthy watchers see it removed as UNHEALTHY.
    backend.set(500);
    within_for(
        Duration::from_secs(6),
        "critical",
        healthy.until("removed", |v| v.instances.is_empty()),
    )
    .await;
    let removed = healthy.events.last().unwrap();
    assert_eq!(
        (removed.r#type(), removed.reason()),
        (pb::EventType::Removed, pb::RemovalReason::Unhealthy)
    );
    everything
        .until("critical in the full view", |v| {
            v.instances
                .get("w1")
                .is_some_and(|i| i.health() == pb::HealthStatus::Critical)
        })
        .await;
    let critical = health_of(&mut client, "web", "w1").await.unwrap();
    assert!(
        critical.health_output.contains("500"),
        "{}",
        critical.health_output
    );
    let healthy_only = discover(
        &mut client,
        pb::DiscoverRequest {
            service: "web".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(healthy_only.instances.is_empty());
    let services = client
        .list_services(pb::ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (services.services[0].instances, services.services[0].healthy),
        (1, 0)
    );

    // A hang is a timeout: still critical. Back to 200: ADDED again.
    backend.set(FlipServer::HANG);
    tokio::time::sleep(Duration::from_millis(1_600)).await; // let at least one probe time out
    assert_eq!(
        health_of(&mut client, "web", "w1").await.unwrap().health(),
        pb::HealthStatus::Critical
    );
    backend.set(200);
    within_for(
        Duration::from_secs(6),
        "recovered",
        healthy.until("added again", |v| v.ids() == ["w1"]),
    )
    .await;
    assert_eq!(
        healthy.events.last().unwrap().r#type(),
        pb::EventType::Added
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_never_passes_says_what_its_probes_see() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // A port nobody listens on: every probe is refused, from the first on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let tcp = pb::health_check::Probe::Tcp(pb::TcpProbe {});
    let registered = register(
        &mut client,
        checked("down", "d1", u32::from(closed), tcp, 1, 1),
    )
    .await;
    let stored = registered.instance.unwrap();
    assert_eq!(stored.health_output, "not checked yet");

    let deadline = Instant::now() + Duration::from_secs(4);
    let first = loop {
        let now = health_of(&mut client, "down", "d1").await.unwrap();
        if now.health_output != "not checked yet" {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "healthOutput still says not checked yet after 4 s of 1 s probes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(first.health(), pb::HealthStatus::Critical);
    assert!(
        first.health_output.to_lowercase().contains("refused"),
        "{}",
        first.health_output
    );
    assert!(first.health_checked_at.is_some());
    assert!(first.mod_revision > stored.mod_revision);

    // Later probes that see the same thing are no store change.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let later = health_of(&mut client, "down", "d1").await.unwrap();
    assert_eq!(later.mod_revision, first.mod_revision, "{later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_probe_says_so() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let backend = FlipServer::start(200).await;
    register(
        &mut client,
        checked("slow", "s1", backend.port(), http("/"), 1, 1),
    )
    .await;
    let mut view = WatchView::open(&mut client, watch_request("slow")).await;
    view.until("passing", |v| v.ids() == ["s1"]).await;
    backend.set(FlipServer::HANG);
    view.until("critical", |v| v.instances.is_empty()).await;
    let critical = health_of(&mut client, "slow", "s1").await.unwrap();
    assert!(
        critical.health_output.contains("timed out"),
        "{}",
        critical.health_output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_checks_follow_a_listener_closed_and_reopened() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tcp = pb::health_check::Probe::Tcp(pb::TcpProbe {});
    register(
        &mut client,
        checked("db", "d1", u32::from(addr.port()), tcp, 1, 1),
    )
    .await;
    let mut view = WatchView::open(&mut client, watch_request("db")).await;
    view.until("passing", |v| v.ids() == ["d1"]).await;

    drop(listener);
    view.until("critical when closed", |v| v.instances.is_empty())
        .await;
    let output = health_of(&mut client, "db", "d1")
        .await
        .unwrap()
        .health_output;
    assert!(output.to_lowercase().contains("refused"), "{output}");

    let _reopened = tokio::net::TcpListener::bind(addr).await.unwrap();
    view.until("passing when reopened", |v| v.ids() == ["d1"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_checks_follow_the_backends_health_service() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("greeter", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let grpc = pb::health_check::Probe::Grpc(pb::GrpcProbe {
        service: "greeter".into(),
    });
    register(
        &mut client,
        checked("greeter", "g1", u32::from(port), grpc, 1, 1),
    )
    .await;
    let mut view = WatchView::open(&mut client, watch_request("greeter")).await;
    view.until("serving", |v| v.ids() == ["g1"]).await;

    reporter
        .set_service_status("greeter", tonic_health::ServingStatus::NotServing)
        .await;
    view.until("not serving", |v| v.instances.is_empty()).await;
    let output = health_of(&mut client, "greeter", "g1")
        .await
        .unwrap()
        .health_output;
    assert!(output.contains("NOT_SERVING"), "{output}");
    reporter
        .set_service_status("greeter", tonic_health::ServingStatus::Serving)
        .await;
    view.until("serving again", |v| v.ids() == ["g1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stays_critical_is_removed_as_unhealthy() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let backend = FlipServer::start(503).await;
    let mut i = checked("flaky", "f1", backend.port(), http("/"), 1, 1);
    i.check.as_mut().unwrap().deregister_critical_after = Some(secs(2.0));
    register(&mut client, i).await;
    let mut view = WatchView::open(
        &mut client,
        pb::WatchRequest {
            include_unhealthy: true,
            ..watch_request("flaky")
        },
    )
    .await;
    view.until("present", |v| v.ids() == ["f1"]).await;
    within_for(
        Duration::from_secs(6),
        "removal",
        view.until("removed", |v| v.instances.is_empty()),
    )
    .await;
    let removed = view.events.last().unwrap();
    assert_eq!(
        (removed.r#type(), removed.reason()),
        (pb::EventType::Removed, pb::RemovalReason::Unhealthy)
    );
    assert!(health_of(&mut client, "flaky", "f1").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_checks_are_invalid_argument_naming_the_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let base = checked("x", "x1", 80, http("/health"), 1, 1);
    let with = |f: &dyn Fn(&mut pb::HealthCheck)| {
        let mut i = base.clone();
        f(i.check.as_mut().unwrap());
        i
    };
    let cases: Vec<(pb::Instance, &str)> = vec![
        (
            with(&|c| c.interval = Some(secs(0.5))),
            "instance.check.interval",
        ),
        (
            with(&|c| c.interval = None),
            "instance.check.interval is required",
        ),
        (
            with(&|c| c.timeout = Some(secs(1.0))),
            "instance.check.timeout",
        ),
        (
            with(&|c| c.timeout = Some(secs(0.0))),
            "instance.check.timeout",
        ),
        (
            with(&|c| c.probe = None),
            "instance.check.probe is required",
        ),
        (
            with(&|c| c.probe = Some(http("health"))),
            "instance.check.http.path",
        ),
        (
            with(&|c| {
                c.probe = Some(pb::health_check::Probe::Http(pb::HttpProbe {
                    path: "/".into(),
                    method: "BREW".into(),
                    ..Default::default()
                }))
            }),
            "instance.check.http.method",
        ),
        (
            with(&|c| {
                c.probe = Some(pb::health_check::Probe::Http(pb::HttpProbe {
                    path: "/".into(),
                    headers: [("Host".to_string(), "elsewhere".to_string())].into(),
                    ..Default::default()
                }))
            }),
            "instance.check.http.headers[\"Host\"]",
        ),
        (
            with(&|c| c.successes_before_passing = 101),
            "instance.check.successes_before_passing",
        ),
        (
            with(&|c| c.deregister_critical_after = Some(secs(0.2))),
            "instance.check.deregister_critical_after",
        ),
    ];
    for (instance, expected) in cases {
        let status = client
            .register(register_request(instance, None))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(expected),
            "expected {expected:?}, got {:?}",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_checks_each_run_about_once_a_second() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let backend = FlipServer::start(200).await;
    const N: usize = 2_000;
    for n in 0..N {
        register(
            &mut client,
            checked(
                "fleet",
                &format!("i{n}"),
                backend.port(),
                http(&format!("/h/{n}")),
                1,
                1,
            ),
        )
        .await;
    }
    // Let every check run once (first runs are spread over one interval), then measure.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before = backend.hits();
    let window = Instant::now();
    // The registry keeps answering while it probes.
    let mut slowest = Duration::ZERO;
    while window.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        let found = discover(
            &mut client,
            pb::DiscoverRequest {
                service: "fleet".into(),
                ..Default::default()
            },
        )
        .await;
        slowest = slowest.max(t.elapsed());
        assert!(found.instances.len() <= N);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = window.elapsed().as_secs_f64();
    let after = backend.hits();
    let total: u64 = (0..N)
        .map(|n| {
            let path = format!("/h/{n}");
            after.get(&path).copied().unwrap_or(0) - before.get(&path).copied().unwrap_or(0)
        })
        .sum();
    let expected = N as f64 * seconds;
    eprintln!(
        "{total} probes in {seconds:.1}s for {N} checks at 1/s; slowest Discover {slowest:?}"
    );
    assert!(
        (total as f64) > expected * 0.7 && (total as f64) < expected * 1.3,
        "{total} probes in {seconds:.1}s; expected about {expected:.0}"
    );
    for n in 0..N {
        let path = format!("/h/{n}");
        let ran = after.get(&path).copied().unwrap_or(0) - before.get(&path).copied().unwrap_or(0);
        assert!(
            (2..=7).contains(&ran),
            "{path} ran {ran} times in {seconds:.1}s"
        );
    }
    assert!(
        slowest < Duration::from_secs(1),
        "Discover took {slowest:?} under probe load"
    );
    let all = discover(
        &mut client,
        pb::DiscoverRequest {
            service: "fleet".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.instances.len(), N, "every instance passing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_check_needs_a_lease_and_is_never_probed() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // The port answers nothing: a probe of it would say "refused" within a second.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let ttl = pb::health_check::Probe::Ttl(pb::TtlProbe {});
    let mut reported = instance("job", "j1", u32::from(closed));
    reported.check = Some(pb::HealthCheck {
        probe: Some(ttl),
        ..Default::default()
    });
    let status = client
        .register(register_request(reported.clone(), None))
        .await
        .expect_err("a ttl check without a lease");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("instance.check.ttl needs a lease"),
        "{status:?}"
    );

    let registered = client
        .register(register_request(reported, Some(Duration::from_secs(30))))
        .await
        .unwrap()
        .into_inner();
    let stored = registered.instance.unwrap();
    assert_eq!(stored.health(), pb::HealthStatus::Critical);
    assert!(matches!(
        stored.check.and_then(|c| c.probe),
        Some(pb::health_check::Probe::Ttl(_))
    ));
    // Past two intervals of the shortest check: a probed one would have written its verdict.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let now = health_of(&mut client, "job", "j1").await.unwrap();
    assert_eq!(now.health_output, "not checked yet");
    assert_eq!(now.mod_revision, stored.mod_revision);
}
