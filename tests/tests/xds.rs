//! The ADS protocol as a client other than gRPC's sees it: ACKs and NACKs answered per the
//! protocol (a rejected response is not sent again, and the server says why), stale requests
//! ignored, unsubscribing honoured; pushes that share a revision told apart; a set too large to
//! send refused by name; a thousand streams following one service; a client that stops
//! reading skipped to the newest set, not queued for; a graceful stop ending every stream
//! with UNAVAILABLE; and a client that ends its requests told so with OK.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use signpost_tests::{TestServer, instance, must, register, register_request, within};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::Channel;

const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// What the server logged, for the test that reads why a NACK was logged.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// One ADS stream, driven by hand.
struct Ads {
    requests: mpsc::UnboundedSender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
}

impl Ads {
    async fn open(channel: Channel) -> Ads {
        Ads::open_with(channel, None).await.unwrap()
    }

    async fn open_with(channel: Channel, token: Option<&str>) -> Result<Ads, tonic::Status> {
        let (requests, rx) = mpsc::unbounded_channel();
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let responses = within(
            "open an ADS stream",
            client.stream_aggregated_resources(request),
        )
        .await?
        .into_inner();
        Ok(Ads {
            requests,
            responses,
        })
    }

    fn ask(&self, type_url: &str, names: &[&str], version: &str, nonce: &str) {
        self.requests
            .send(DiscoveryRequest {
                node: Some(Node {
                    id: "ads-test".into(),
                    ..Node::default()
                }),
                type_url: type_url.into(),
                resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                ..DiscoveryRequest::default()
            })
            .unwrap();
    }

    fn nack(&self, type_url: &str, names: &[&str], version: &str, nonce: &str, why: &str) {
        self.requests
            .send(DiscoveryRequest {
                type_url: type_url.into(),
                resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: why.into(),
                    details: Vec::new(),
                }),
                ..DiscoveryRequest::default()
            })
            .unwrap();
    }

    async fn next(&mut self) -> DiscoveryResponse {
        within("an ADS response", self.responses.message())
            .await
            .unwrap()
            .expect("the stream ended")
    }
}

/// The endpoint addresses of an endpoints response, as `ip:port`.
fn endpoints(response: &DiscoveryResponse) -> Vec<String> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    assert_eq!(response.type_url, ENDPOINTS);
    let mut all = Vec::new();
    for resource in &response.resources {
        let cla = ClusterLoadAssignment::decode(resource.value.as_slice()).unwrap();
        for locality in cla.endpoints {
            for e in locality.lb_endpoints {
                let Some(HostIdentifier::Endpoint(ep)) = e.host_identifier else {
                    continue;
                };
                if let Some(Address::SocketAddress(sa)) = ep.address.and_then(|a| a.address) {
                    let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
                        continue;
                    };
                    all.push(format!("{}:{port}", sa.address));
                }
            }
        }
    }
    all.sort();
    all
}

async fn channel(server: &TestServer) -> Channel {
    within(
        "connect",
        Channel::from_shared(server.url()).unwrap().connect(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_nacks_stale_requests_and_unsubscribing_follow_the_protocol() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    // The server's tasks run on other threads: the subscriber must be theirs too.
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let metrics = Arc::new(signpost_server::metrics::Metrics::new());
    let server = {
        let _guard = tracing::dispatcher::set_default(&dispatch);
        TestServer::start_with(
            signpost_server::Config {
                metrics: Some(metrics.clone()),
                ..signpost_server::Config::default()
            },
            signpost_store::MemoryConfig::default(),
        )
        .await
    };
    let _global = tracing::dispatcher::set_global_default(dispatch);
    let mut client = server.client().await;
    let mut ads = Ads::open(channel(&server).await).await;

    ads.ask(LISTENER, &["greeter"], "", "");
    let l1 = ads.next().await;
    assert_eq!(l1.type_url, LISTENER);
    assert_eq!(l1.resources.len(), 1);
    let listener = Listener::decode(l1.resources[0].value.as_slice()).unwrap();
    assert_eq!(listener.name, "greeter");

    // ACK, then NACK the same response: neither is answered. Proven by the order of what
    // comes next on the stream: the answer to a later request, not a repeat.
    ads.ask(LISTENER, &["greeter"], &l1.version_info, &l1.nonce);
    ads.nack(
        LISTENER,
        &["greeter"],
        "",
        &l1.nonce,
        "listener rejected on purpose",
    );
    ads.ask(CLUSTER, &["default/greeter"], "", "");
    let c1 = ads.next().await;
    assert_eq!(c1.type_url, CLUSTER, "a NACK was answered with {c1:?}");
    within("the NACK is logged with why", async {
        while !logs.text().contains("listener rejected on purpose") {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    ads.ask(CLUSTER, &["default/greeter"], &c1.version_info, &c1.nonce);
    let text = metrics.render(&*server.store);
    for line in [
        "signpost_xds_streams 1",
        "signpost_xds_nacks_total{kind=\"listener\"} 1",
        "signpost_xds_responses_total{kind=\"cluster\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }

    // Endpoints of a service with no instance yet: an empty assignment, then each change.
    ads.ask(ENDPOINTS, &["default/greeter"], "", "");
    let e1 = ads.next().await;
    assert_eq!(endpoints(&e1), Vec::<String>::new());
    register(&mut client, instance("greeter", "g1", 5001)).await;
    let e2 = ads.next().await;
    assert_eq!(endpoints(&e2), ["127.0.0.1:5001"]);

    // A NACK of endpoints: not sent again, but the next change is.
    ads.nack(
        ENDPOINTS,
        &["default/greeter"],
        &e1.version_info,
        &e2.nonce,
        "no",
    );
    register(&mut client, instance("greeter", "g2", 5002)).await;
    let e3 = ads.next().await;
    assert_eq!(endpoints(&e3), ["127.0.0.1:5001", "127.0.0.1:5002"]);

    // A request with an old nonce is stale: its unsubscribe is ignored.
    ads.ask(ENDPOINTS, &[], &e2.version_info, &e2.nonce);
    register(&mut client, instance("greeter", "g3", 5003)).await;
    let e4 = ads.next().await;
    assert_eq!(endpoints(&e4).len(), 3);

    // A current one is not: the stream stops following the service (the only follower here,
    // so the server's live view of it goes).
    ads.ask(ENDPOINTS, &[], &e4.version_info, &e4.nonce);
    ads.ask(LISTENER, &["greeter", "other"], &l1.version_info, &l1.nonce);
    let l2 = ads.next().await;
    assert_eq!(l2.type_url, LISTENER, "{l2:?}");
    assert_eq!(l2.resources.len(), 2);
    within("the unsubscribed service is no longer followed", async {
        while !metrics
            .render(&*server.store)
            .lines()
            .any(|l| l == "signpost_live_views 0")
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;

    // A client reconnecting with a version and nonce from an earlier stream is answered.
    let mut again = Ads::open(channel(&server).await).await;
    again.ask(LISTENER, &["greeter"], "7", "nonce-of-another-stream");
    let fresh = again.next().await;
    assert_eq!(fresh.type_url, LISTENER);
    assert_eq!(fresh.resources.len(), 1);
    drop(again);

    // Names that name no service are left out, and said why.
    ads.ask(LISTENER, &["Not A Service"], &l2.version_info, &l2.nonce);
    let l3 = ads.next().await;
    assert!(l3.resources.is_empty(), "{l3:?}");
    within("the bad name is logged", async {
        while !logs.text().contains("Not A Service") {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_each_get_every_change_of_their_service() {
    const STREAMS: usize = 1_000;
    const CONNECTIONS: usize = 10;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut connections = Vec::new();
    for _ in 0..CONNECTIONS {
        connections.push(channel(&server).await);
    }
    // Each stream reports how many endpoints its newest assignment holds.
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(usize, usize)>();
    let mut tasks = Vec::new();
    for n in 0..STREAMS {
        let mut ads = Ads::open(connections[n % CONNECTIONS].clone()).await;
        let seen = seen_tx.clone();
        tasks.push(tokio::spawn(async move {
            ads.ask(ENDPOINTS, &["default/fan"], "", "");
            loop {
                let Ok(Some(response)) = ads.responses.message().await else {
                    return;
                };
                ads.ask(
                    ENDPOINTS,
                    &["default/fan"],
                    &response.version_info,
                    &response.nonce,
                );
                if seen.send((n, endpoints(&response).len())).is_err() {
                    return;
                }
            }
        }));
    }
    let mut newest = vec![usize::MAX; STREAMS];
    wait_for(&mut newest, 0, &mut seen).await;
    for i in 1..=5u32 {
        register(&mut client, instance("fan", &format!("f{i}"), 6000 + i)).await;
        let started = std::time::Instant::now();
        wait_for(&mut newest, i as usize, &mut seen).await;
        eprintln!(
            "change {i} reached {STREAMS} streams in {:?}",
            started.elapsed()
        );
    }
    for task in tasks {
        task.abort();
    }
}

/// Reads what the streams report until every one's newest assignment holds `want` endpoints.
async fn wait_for(
    newest: &mut [usize],
    want: usize,
    seen: &mut mpsc::UnboundedReceiver<(usize, usize)>,
) {
    within("every stream has the change", async {
        while newest.iter().any(|&n| n != want) {
            let (stream, count) = seen.recv().await.unwrap();
            newest[stream] = count;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_a_stream_needs_one_that_may_read_what_it_asks_for() {
    let tokens = signpost_server::Tokens::parse(
        "[[token]]\nname = \"payments\"\nsecret = \"p-secret\"\nread = [\"payments\"]\n",
    )
    .unwrap();
    let server = TestServer::start_with(
        signpost_server::Config {
            auth: Some(Arc::new(tokens)),
            ..signpost_server::Config::default()
        },
        signpost_store::MemoryConfig::default(),
    )
    .await;
    let refused = Ads::open_with(channel(&server).await, None).await.err();
    assert_eq!(
        refused.map(|s| s.code()),
        Some(tonic::Code::Unauthenticated)
    );

    let mut ads = Ads::open_with(channel(&server).await, Some("p-secret"))
        .await
        .unwrap();
    ads.ask(LISTENER, &["greeter.payments.svc"], "", "");
    assert_eq!(ads.next().await.resources.len(), 1);
    // A name of another namespace is left out, and the stream goes on: gRPC shares one stream
    // between every xds:/// channel of a process.
    ads.ask(CLUSTER, &["default/greeter", "payments/greeter"], "", "");
    let clusters = ads.next().await;
    assert_eq!(clusters.resources.len(), 1, "{clusters:?}");
    let cluster = envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(
        clusters.resources[0].value.as_slice(),
    )
    .unwrap();
    assert_eq!(cluster.name, "payments/greeter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_names_than_the_limit_end_the_stream_saying_so() {
    let server = TestServer::start().await;
    let mut ads = Ads::open(channel(&server).await).await;
    let names: Vec<String> = (0..=signpost_server::xds::MAX_NAMES_PER_KIND)
        .map(|n| format!("default/s{n}"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    ads.ask(ENDPOINTS, &names, "", "");
    let ended = within("the stream ends", ads.responses.message())
        .await
        .unwrap_err();
    assert_eq!(ended.code(), tonic::Code::ResourceExhausted, "{ended:?}");
    assert!(
        ended.message().contains("limit xds names per kind"),
        "{ended:?}"
    );
}

/// The services named in an endpoints response, each with its endpoint count.
fn assignments(response: &DiscoveryResponse) -> Vec<(String, usize)> {
    assert_eq!(response.type_url, ENDPOINTS);
    let mut all: Vec<(String, usize)> = response
        .resources
        .iter()
        .map(|resource| {
            let cla = ClusterLoadAssignment::decode(resource.value.as_slice()).unwrap();
            let count = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
            (cla.cluster_name, count)
        })
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_that_change_at_one_revision_are_pushed_with_nonces_of_their_own() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let first = must(
        client
            .register(register_request(
                instance("greeter", "g1", 5001),
                Some(std::time::Duration::from_secs(60)),
            ))
            .await,
        "register on a lease",
    )
    .into_inner();
    let mut second = register_request(instance("billing", "b1", 5002), None);
    second.lease_id = first.lease_id;
    must(client.register(second).await, "register on the same lease");

    let mut ads = Ads::open(channel(&server).await).await;
    let names = ["default/billing", "default/greeter"];
    ads.ask(ENDPOINTS, &names, "", "");
    // Views are read as they come: the first answers may hold one service each.
    let mut live = std::collections::BTreeMap::new();
    while live.len() < 2 || live.values().any(|&n| n == 0) {
        let response = ads.next().await;
        ads.ask(ENDPOINTS, &names, &response.version_info, &response.nonce);
        live.extend(assignments(&response));
    }

    // Revoking the lease removes both instances at one revision: two pushes, one per
    // service, each with a nonce the client can ACK without it meaning the other.
    assert!(
        server.store.revoke_lease(first.lease_id).await.unwrap(),
        "the lease existed"
    );
    let a = ads.next().await;
    let b = ads.next().await;
    let mut pushed = assignments(&a);
    pushed.extend(assignments(&b));
    pushed.sort();
    assert_eq!(
        pushed,
        [
            ("default/billing".to_owned(), 0),
            ("default/greeter".to_owned(), 0)
        ]
    );
    assert_eq!(a.version_info, b.version_info, "one revision, one version");
    assert_ne!(
        a.nonce, b.nonce,
        "two responses on one stream share a nonce"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_over_max_response_size_end_the_stream_saying_so() {
    let server = TestServer::start_with(
        signpost_server::Config {
            max_response_size: 2048,
            ..signpost_server::Config::default()
        },
        signpost_store::MemoryConfig::default(),
    )
    .await;
    let mut client = server.client().await;
    let mut ads = Ads::open(channel(&server).await).await;
    ads.ask(ENDPOINTS, &["default/greeter"], "", "");
    let empty = ads.next().await;
    assert_eq!(endpoints(&empty), Vec::<String>::new());
    ads.ask(
        ENDPOINTS,
        &["default/greeter"],
        &empty.version_info,
        &empty.nonce,
    );

    // Each change is pushed while it fits; the first that does not ends the stream, naming
    // the limit, rather than leaving the client on an old set without a word.
    let mut registered = 0;
    let ended = loop {
        registered += 1;
        assert!(registered <= 200, "no push ever went over 2048 bytes");
        register(
            &mut client,
            instance("greeter", &format!("g{registered}"), 5000 + registered),
        )
        .await;
        match within("a push", ads.responses.message()).await {
            Ok(Some(push)) => {
                assert_eq!(endpoints(&push).len(), registered as usize);
                ads.ask(
                    ENDPOINTS,
                    &["default/greeter"],
                    &push.version_info,
                    &push.nonce,
                );
            }
            Ok(None) => panic!("the stream ended with OK"),
            Err(status) => break status,
        }
    };
    assert!(registered > 1, "the first push was already too large");
    assert_eq!(ended.code(), tonic::Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("max_response_size"), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_back_only_itself_and_a_stop_ends_streams_unavailable() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // A 1 KiB window: a few pushes fill it while the client does not read.
    let narrow = within(
        "connect",
        Channel::from_shared(server.url())
            .unwrap()
            .initial_stream_window_size(Some(1024))
            .connect(),
    )
    .await
    .unwrap();
    // On one connection: the one that stops reading must not hold back its neighbour.
    let mut slow = Ads::open(narrow.clone()).await;
    let mut fast = Ads::open(narrow).await;
    for ads in [&mut slow, &mut fast] {
        ads.ask(ENDPOINTS, &["default/busy"], "", "");
        let empty = ads.next().await;
        assert_eq!(endpoints(&empty), Vec::<String>::new());
        ads.ask(
            ENDPOINTS,
            &["default/busy"],
            &empty.version_info,
            &empty.nonce,
        );
    }

    const CHANGES: u32 = 40;
    for i in 1..=CHANGES {
        register(&mut client, instance("busy", &format!("b{i}"), 7000 + i)).await;
        // The reading client gets every change, whatever the other does.
        let push = fast.next().await;
        assert_eq!(endpoints(&push).len(), i as usize);
        fast.ask(
            ENDPOINTS,
            &["default/busy"],
            &push.version_info,
            &push.nonce,
        );
    }

    // The one that did not read gets what its window held, then the newest set: the
    // versions in between were skipped, not queued.
    let mut read = 0;
    loop {
        let push = slow.next().await;
        read += 1;
        let count = endpoints(&push).len();
        if count == CHANGES as usize {
            break;
        }
        assert!(
            read < CHANGES,
            "{read} pushes read and still {count} endpoints"
        );
    }
    assert!(
        read <= 10,
        "a client that did not read was sent {read} of {CHANGES} versions: they were queued"
    );

    // A stream that follows no service (a listener alone) has nothing but the stop to end it.
    let mut listener_only = Ads::open(channel(&server).await).await;
    listener_only.ask(LISTENER, &["greeter"], "", "");
    let l = listener_only.next().await;
    listener_only.ask(LISTENER, &["greeter"], &l.version_info, &l.nonce);

    // A graceful stop ends each open stream with UNAVAILABLE, which tells a client to
    // reconnect, rather than dropping it without a status. (A client still not reading would
    // not see it: its stream's body is not polled, and the server's grace bounds the wait.)
    let stopping = tokio::spawn(server.stop());
    for (which, ads) in [
        ("reading", &mut fast),
        ("slow", &mut slow),
        ("listener-only", &mut listener_only),
    ] {
        let ended = within("the stream ends", async {
            loop {
                match ads.responses.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the {which} stream ended with OK"),
                    Err(status) => break status,
                }
            }
        })
        .await;
        assert_eq!(ended.code(), tonic::Code::Unavailable, "{which}: {ended:?}");
    }
    within("the server stops", stopping).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ends_its_requests_gets_an_ok_end() {
    let server = TestServer::start().await;
    let mut ads = Ads::open(channel(&server).await).await;
    ads.ask(LISTENER, &["greeter"], "", "");
    let listener = ads.next().await;
    assert_eq!(listener.type_url, LISTENER);
    // Half-closing: the client will ask nothing more, and is told the stream ended well.
    let Ads {
        requests,
        mut responses,
    } = ads;
    drop(requests);
    let ended = within("the stream ends", responses.message()).await;
    assert!(matches!(ended, Ok(None)), "{ended:?}");
}
