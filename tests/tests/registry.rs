//! The unary RPCs and leases, over a real socket.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_tests::*;
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test]
async fn register_discover_deregister_round_trip() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let mut one = instance("greeter", "greeter-1", 50051);
    one.tags = vec!["v2".into()];
    one.metadata = [("version".to_string(), "v2".to_string())].into();
    let first = register(&mut client, one.clone()).await;
    let stored = must(first.instance.ok_or("no instance"), "register answer");
    assert_eq!(
        stored.namespace, "default",
        "an empty namespace is the default"
    );
    assert_eq!(stored.weight, 100, "an unset weight is the default");
    assert_eq!(stored.health(), pb::HealthStatus::Passing);
    assert_eq!(stored.lease_id, 0, "no ttl: persistent");
    assert_eq!(first.lease_id, 0);
    assert!(first.ttl.is_none());
    assert_eq!(stored.create_revision, first.revision);
    assert_eq!(stored.mod_revision, first.revision);

    // An update keeps create_revision and takes a new revision.
    one.port = 50052;
    let second = register(&mut client, one).await;
    let updated = must(second.instance.ok_or("no instance"), "register answer");
    assert!(second.revision > first.revision);
    assert_eq!(updated.create_revision, first.revision);
    assert_eq!(updated.mod_revision, second.revision);
    assert_eq!(updated.port, 50052);

    let found = discover(
        &mut client,
        pb::DiscoverRequest {
            service: "greeter".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(found.revision, second.revision);
    assert_eq!(found.instances, vec![updated]);

    let gone = must(
        client
            .deregister(pb::DeregisterRequest {
                service: "greeter".into(),
                id: "greeter-1".into(),
                ..Default::default()
            })
            .await,
        "deregister",
    )
    .into_inner();
    assert!(gone.existed);
    assert!(gone.revision > second.revision);

    // Idempotent: a second deregister says it did not exist and takes no revision.
    let again = must(
        client
            .deregister(pb::DeregisterRequest {
                service: "greeter".into(),
                id: "greeter-1".into(),
                ..Default::default()
            })
            .await,
        "deregister again",
    )
    .into_inner();
    assert!(!again.existed);
    assert_eq!(again.revision, gone.revision);

    let found = discover(
        &mut client,
        pb::DiscoverRequest {
            service: "greeter".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(found.instances.is_empty());
    assert_eq!(found.revision, gone.revision);
}

#[tokio::test]
async fn discover_filters_by_tags_selector_and_namespace() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let specs = [
        (
            "a",
            "default",
            &["v2", "grpc"][..],
            &[("version", "v2"), ("env", "prod")][..],
        ),
        (
            "b",
            "default",
            &["v1"][..],
            &[("version", "v1"), ("env", "dev")][..],
        ),
        (
            "c",
            "default",
            &["v2"][..],
            &[("version", "v2"), ("env", "dev"), ("canary", "true")][..],
        ),
        ("d", "staging", &["v2"][..], &[("version", "v2")][..]),
    ];
    for (id, ns, tags, meta) in specs {
        let mut i = instance("api", id, 8080);
        i.namespace = ns.into();
        i.tags = tags.iter().map(|t| t.to_string()).collect();
        i.metadata = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        register(&mut client, i).await;
    }
    let cases: [(&str, &[&str], &str, &[&str]); 7] = [
        ("", &[], "", &["a", "b", "c"]),
        ("staging", &[], "", &["d"]),
        ("", &["v2"], "", &["a", "c"]),
        ("", &["v2", "grpc"], "", &["a"]),
        ("", &[], "version=v2,!canary", &["a"]),
        ("", &[], "env in (dev),version!=v1", &["c"]),
        ("", &["v2"], "env notin (prod)", &["c"]),
    ];
    for (ns, tags, selector, expected) in cases {
        let found = discover(
            &mut client,
            pb::DiscoverRequest {
                namespace: ns.into(),
                service: "api".into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                selector: selector.into(),
                include_unhealthy: false,
            },
        )
        .await;
        assert_eq!(
            ids(&found.instances),
            expected,
            "ns={ns:?} tags={tags:?} selector={selector:?}"
        );
    }
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let good = instance("greeter", "greeter-1", 50051);
    let with = |f: &dyn Fn(&mut pb::Instance)| {
        let mut i = good.clone();
        f(&mut i);
        i
    };
    let cases: Vec<(pb::RegisterRequest, &str)> = vec![
        (pb::RegisterRequest::default(), "instance is required"),
        (
            register_request(with(&|i| i.service = "Bad Name!".into()), None),
            "instance.service \"Bad Name!\" is invalid",
        ),
        (
            register_request(with(&|i| i.service = String::new()), None),
            "instance.service is required",
        ),
        (
            register_request(with(&|i| i.namespace = "A".into()), None),
            "instance.namespace",
        ),
        (
            register_request(with(&|i| i.id = "x".repeat(129)), None),
            "instance.id",
        ),
        (
            register_request(with(&|i| i.address = "not an address".into()), None),
            "instance.address",
        ),
        (
            register_request(with(&|i| i.address = String::new()), None),
            "instance.address is required",
        ),
        (
            register_request(with(&|i| i.port = 0), None),
            "instance.port 0 is out of range",
        ),
        (
            register_request(with(&|i| i.port = 70000), None),
            "instance.port 70000",
        ),
        (
            register_request(
                with(&|i| i.tags = (0..33).map(|n| n.to_string()).collect()),
                None,
            ),
            "instance.tags has 33 entries",
        ),
        (
            register_request(
                with(&|i| i.metadata = (0..65).map(|n| (format!("k{n}"), String::new())).collect()),
                None,
            ),
            "instance.metadata has 65 entries",
        ),
        (
            register_request(
                with(&|i| i.metadata = [("k".into(), "v".repeat(17_000))].into()),
                None,
            ),
            "instance.metadata takes",
        ),
        (
            register_request(good.clone(), Some(Duration::from_millis(500))),
            "ttl",
        ),
        (
            register_request(good.clone(), Some(Duration::from_secs(25 * 3600))),
            "ttl",
        ),
        (
            pb::RegisterRequest {
                lease_id: 7,
                ..register_request(good.clone(), Some(Duration::from_secs(5)))
            },
            "lease_id cannot be combined with ttl",
        ),
    ];
    for (request, expected) in cases {
        let status = match client.register(request.clone()).await {
            Ok(r) => panic!("{request:?} was accepted: {r:?}"),
            Err(s) => s,
        };
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
        assert!(
            status.message().contains(expected),
            "expected {expected:?} in {:?}",
            status.message()
        );
    }

    let bad_selector = client
        .discover(pb::DiscoverRequest {
            service: "greeter".into(),
            selector: "version in v2".into(),
            ..Default::default()
        })
        .await;
    let status = must(bad_selector.err().ok_or("accepted"), "bad selector");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("selector"),
        "{}",
        status.message()
    );

    let no_service = client.discover(pb::DiscoverRequest::default()).await;
    let status = must(
        no_service.err().ok_or("accepted"),
        "discover without service",
    );
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "service is required");

    let bad_watch = client
        .watch(pb::WatchRequest {
            service: "x y".into(),
            ..Default::default()
        })
        .await;
    let status = must(bad_watch.err().ok_or("accepted"), "watch with bad service");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("service"));

    let bad_deregister = client
        .deregister(pb::DeregisterRequest {
            service: "greeter".into(),
            ..Default::default()
        })
        .await;
    let status = must(
        bad_deregister.err().ok_or("accepted"),
        "deregister without id",
    );
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "id is required");

    // Nothing was stored by any of the rejected requests.
    let list = must(
        client
            .list_services(pb::ListServicesRequest::default())
            .await,
        "list",
    )
    .into_inner();
    assert!(list.services.is_empty(), "{list:?}");
}

#[tokio::test]
async fn joining_an_unknown_lease_is_not_found() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let request = pb::RegisterRequest {
        lease_id: 42,
        ..register_request(instance("a", "a-1", 1), None)
    };
    let status = must(
        client.register(request).await.err().ok_or("accepted"),
        "register on unknown lease",
    );
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("lease 42"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_lease_not_kept_alive_expires_and_removes_every_instance_on_it() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut watch = WatchView::open(&mut client, watch_request("svc")).await;
    watch.until("initial reset", |v| v.resets == 1).await;

    let first = must(
        client
            .register(register_request(
                instance("svc", "one", 1),
                Some(Duration::from_secs(1)),
            ))
            .await,
        "register with ttl",
    )
    .into_inner();
    assert_ne!(first.lease_id, 0);
    assert_eq!(
        first.ttl,
        Some(prost_types::Duration {
            seconds: 1,
            nanos: 0
        })
    );
    let joined = must(
        client
            .register(pb::RegisterRequest {
                lease_id: first.lease_id,
                ..register_request(instance("svc", "two", 2), None)
            })
            .await,
        "join lease",
    )
    .into_inner();
    assert_eq!(joined.lease_id, first.lease_id);
    assert_eq!(
        must(joined.instance.ok_or("none"), "instance").lease_id,
        first.lease_id
    );

    let registered_at = tokio::time::Instant::now();
    watch
        .until("both instances", |v| v.instances.len() == 2)
        .await;
    watch.until("expiry", |v| v.instances.is_empty()).await;
    let elapsed = registered_at.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "expired early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "expired late: {elapsed:?}"
    );

    let removed: Vec<_> = watch
        .events
        .iter()
        .filter(|e| e.r#type() == pb::EventType::Removed)
        .collect();
    assert_eq!(removed.len(), 2);
    assert!(
        removed
            .iter()
            .all(|e| e.reason() == pb::RemovalReason::Expired)
    );
    assert_eq!(
        removed[0].revision, removed[1].revision,
        "one lease expiry is one revision"
    );

    let found = discover(
        &mut client,
        pb::DiscoverRequest {
            service: "svc".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(found.instances.is_empty());

    // The expired lease answers expired on KeepAlive and cannot be joined.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = must(
        client
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await,
        "keep_alive",
    )
    .into_inner();
    must(
        tx.send(pb::KeepAliveRequest {
            lease_id: first.lease_id,
        })
        .await,
        "send",
    );
    let answer = must(
        must(
            within("keepalive answer", answers.next())
                .await
                .ok_or("ended"),
            "answer",
        ),
        "answer",
    );
    assert!(answer.expired);
    assert_eq!(answer.lease_id, first.lease_id);
}

#[tokio::test]
async fn keep_alive_holds_a_lease_and_answers_unknown_leases_without_ending() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let registered = must(
        client
            .register(register_request(
                instance("svc", "kept", 1),
                Some(Duration::from_secs(1)),
            ))
            .await,
        "register",
    )
    .into_inner();

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = must(
        client
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await,
        "keep_alive",
    )
    .into_inner();

    // An unknown lease, and lease 0, are answered as expired; the stream goes on.
    for unknown in [0, 12345] {
        must(
            tx.send(pb::KeepAliveRequest { lease_id: unknown }).await,
            "send",
        );
        let answer = must(
            must(
                within("answer", answers.next()).await.ok_or("ended"),
                "answer",
            ),
            "answer",
        );
        assert!(answer.expired, "{answer:?}");
        assert_eq!(answer.lease_id, unknown);
    }

    // Refresh at ttl/3 for three ttls: the instance must still be there.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        must(
            tx.send(pb::KeepAliveRequest {
                lease_id: registered.lease_id,
            })
            .await,
            "send",
        );
        let answer = must(
            must(
                within("answer", answers.next()).await.ok_or("ended"),
                "answer",
            ),
            "answer",
        );
        assert!(!answer.expired);
        assert_eq!(
            answer.ttl,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 0
            })
        );
        tokio::time::sleep(Duration::from_millis(330)).await;
    }
    let found = discover(
        &mut client,
        pb::DiscoverRequest {
            service: "svc".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&found.instances), ["kept"]);
}

#[tokio::test]
async fn list_services_counts_instances_per_namespace() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for (svc, id) in [("api", "1"), ("api", "2"), ("web", "1")] {
        register(&mut client, instance(svc, id, 80)).await;
    }
    let mut other = instance("api", "9", 80);
    other.namespace = "staging".into();
    let last = register(&mut client, other).await;

    let list = must(
        client
            .list_services(pb::ListServicesRequest::default())
            .await,
        "list",
    )
    .into_inner();
    assert_eq!(list.revision, last.revision);
    let summary: Vec<(String, u32, u32)> = list
        .services
        .into_iter()
        .map(|s| (s.name, s.instances, s.healthy))
        .collect();
    assert_eq!(
        summary,
        [("api".to_string(), 2, 2), ("web".to_string(), 1, 1)]
    );

    let staging = must(
        client
            .list_services(pb::ListServicesRequest {
                namespace: "staging".into(),
                ..Default::default()
            })
            .await,
        "list",
    )
    .into_inner();
    assert_eq!(staging.services.len(), 1);
    assert_eq!(staging.services[0].instances, 1);
}

#[tokio::test]
async fn list_services_by_selector_keeps_services_with_a_matching_instance() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for (svc, id, app) in [
        ("api", "1", "shop"),
        ("api", "2", "admin"),
        ("web", "1", "admin"),
    ] {
        let mut i = instance(svc, id, 80);
        i.metadata.insert("app".into(), app.into());
        register(&mut client, i).await;
    }
    register(&mut client, instance("db", "1", 80)).await;
    let list = |selector: &str| {
        let mut client = client.clone();
        let selector = selector.to_owned();
        async move {
            client
                .list_services(pb::ListServicesRequest {
                    selector,
                    ..Default::default()
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .services
                        .into_iter()
                        .map(|s| (s.name, s.instances))
                        .collect::<Vec<_>>()
                })
        }
    };
    let shop = must(list("app=shop").await, "list");
    assert_eq!(
        shop,
        [("api".to_string(), 1)],
        "counts the matching instances"
    );
    let admin = must(list("app in (admin)").await, "list");
    assert_eq!(admin, [("api".to_string(), 1), ("web".to_string(), 1)]);
    let no_app = must(list("!app").await, "list");
    assert_eq!(no_app, [("db".to_string(), 1)]);
    let all = must(list("").await, "list");
    assert_eq!(all.len(), 3);
    let bad = list("app in (")
        .await
        .expect_err("a bad selector is refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("selector"), "{}", bad.message());
}

#[tokio::test]
async fn health_and_reflection_are_served_on_the_same_port() {
    let server = TestServer::start().await;
    let channel = must(
        must(tonic::transport::Channel::from_shared(server.url()), "url")
            .connect()
            .await,
        "connect",
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "signpost.v1.RegistryService"] {
        let answer = must(
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await,
            "health check",
        )
        .into_inner();
        assert_eq!(
            answer.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
}

#[tokio::test]
async fn graceful_shutdown_ends_open_streams() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut watch = WatchView::open(&mut client, watch_request("svc")).await;
    watch.until("initial reset", |v| v.resets == 1).await;
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::KeepAliveRequest>(1);
    let mut keepalive = must(
        client
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await,
        "keep_alive",
    )
    .into_inner();

    must(server.stop().await, "graceful stop");
    let status = must(
        within("watch ending", watch.next())
            .await
            .err()
            .ok_or("no end"),
        "watch end",
    );
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    match within("keepalive ending", keepalive.next()).await {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable),
        other => panic!("keepalive did not end with UNAVAILABLE: {other:?}"),
    }
}
