//! TLS and mutual TLS with certificates made here, access tokens for every RPC, strict ownership,
//! and the limits that keep one client from exhausting the server.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_client::RegistryServiceClient;
use signpost_server::{Config, Limits, Tokens};
use signpost_store::{MemoryConfig, MemoryStore};
use signpost_tests::tls::Pki;
use signpost_tests::{TestServer, instance, register_request, watch_request, within};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

async fn serve(config: Config) -> TestServer {
    TestServer::serve(Arc::new(MemoryStore::new(MemoryConfig::default())), config).await
}

async fn tls_channel(
    server: &TestServer,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{}", server.addr))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Whether a Discover over TLS with these settings is answered at all.
async fn served(server: &TestServer, ca: &str, identity: Option<(&str, &str)>) -> bool {
    match tls_channel(server, ca, identity).await {
        Err(_) => false,
        Ok(channel) => RegistryServiceClient::new(channel)
            .discover(discover_request("", "svc"))
            .await
            .is_ok(),
    }
}

fn discover_request(namespace: &str, service: &str) -> pb::DiscoverRequest {
    pb::DiscoverRequest {
        namespace: namespace.into(),
        service: service.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_only() {
    let pki = Pki::new("registry");
    let server = serve(Config {
        tls: Some(pki.server_tls(false)),
        ..Config::default()
    })
    .await;

    let channel = tls_channel(&server, &pki.ca_pem, None).await.unwrap();
    let mut client = RegistryServiceClient::new(channel);
    signpost_tests::register(&mut client, instance("svc", "a", 1)).await;

    // A client that trusts another CA refuses the server's certificate.
    let stranger = Pki::new("stranger");
    assert!(!served(&server, &stranger.ca_pem, None).await);

    // A plaintext client gets no answer from a TLS port.
    let mut plain = server.client().await;
    let refused = plain.discover(discover_request("", "svc")).await;
    assert!(
        refused.is_err(),
        "plaintext must not be served: {refused:?}"
    );
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_of_its_ca() {
    let pki = Pki::new("registry");
    let server = serve(Config {
        tls: Some(pki.server_tls(true)),
        ..Config::default()
    })
    .await;

    // No client certificate: the handshake fails, nothing reaches the service.
    assert!(
        !served(&server, &pki.ca_pem, None).await,
        "a client without a certificate was served"
    );
    // A certificate from another CA is refused the same way.
    let stranger = Pki::new("stranger");
    assert!(
        !served(
            &server,
            &pki.ca_pem,
            Some((&stranger.client_cert_pem, &stranger.client_key_pem))
        )
        .await,
        "a client with a foreign certificate was served"
    );

    // The right certificate, through the client crate with a token too.
    let tokens = Tokens::parse(
        "[[token]]\nname = \"app\"\nsecret = \"app-secret\"\nread = [\"*\"]\nwrite = [\"*\"]\n",
    )
    .unwrap();
    drop(server);
    let server = serve(Config {
        tls: Some(pki.server_tls(true)),
        auth: Some(Arc::new(tokens)),
        ..Config::default()
    })
    .await;
    let client = signpost_client::Client::builder()
        .registry(server.url())
        .ca_certificate(pki.ca_pem.clone())
        .identity(pki.client_cert_pem.clone(), pki.client_key_pem.clone())
        .token("app-secret")
        .build()
        .unwrap();
    let registration = client
        .register(
            signpost_client::RegistrationBuilder::new("svc")
                .id("secure")
                .address("127.0.0.1")
                .port(8080)
                .ttl(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    let found = client.discover("svc").await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(registration.deregister().await.unwrap());
}

const TOKENS: &str = r#"
[[token]]
name = "reader"
secret = "reader-secret"
read = ["*"]

[[token]]
name = "payments"
secret = "payments-secret"
read = ["payments"]
write = ["payments"]

[[token]]
name = "admin"
secret = "admin-secret"
read = ["*"]
write = ["*"]
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Register,
    Deregister,
    KeepAlive,
    Discover,
    Watch,
    ListServices,
}

/// Calls `rpc` on namespace "orders" with `token`; the status code it gets.
async fn call(server: &TestServer, rpc: Rpc, token: Option<&str>, lease: u64) -> Code {
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    let mut client =
        RegistryServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            if let Some(h) = &header {
                r.metadata_mut().insert("authorization", h.clone());
            }
            Ok(r)
        });
    let mut orders = instance("pay", "matrix", 1);
    orders.namespace = "orders".into();
    let result = match rpc {
        Rpc::Register => client
            .register(register_request(orders, None))
            .await
            .map(|_| ()),
        Rpc::Deregister => client
            .deregister(pb::DeregisterRequest {
                namespace: "orders".into(),
                service: "pay".into(),
                id: "matrix".into(),
            })
            .await
            .map(|_| ()),
        Rpc::KeepAlive => {
            let requests = tokio_stream::iter([pb::KeepAliveRequest { lease_id: lease }]);
            match client.keep_alive(requests).await {
                Ok(response) => {
                    let mut answers = response.into_inner();
                    within("keep-alive answer", answers.message())
                        .await
                        .map(|_| ())
                }
                Err(status) => Err(status),
            }
        }
        Rpc::Discover => client
            .discover(discover_request("orders", "pay"))
            .await
            .map(|_| ()),
        Rpc::Watch => match client
            .watch(pb::WatchRequest {
                namespace: "orders".into(),
                ..watch_request("pay")
            })
            .await
        {
            Ok(response) => within("watch reset", response.into_inner().message())
                .await
                .map(|_| ()),
            Err(status) => Err(status),
        },
        Rpc::ListServices => client
            .list_services(pb::ListServicesRequest {
                namespace: "orders".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => {
            if status.code() == Code::PermissionDenied {
                assert!(
                    status.message().contains("namespace \"orders\"")
                        || status.message().contains("any namespace"),
                    "PERMISSION_DENIED names the namespace: {status:?}"
                );
            }
            status.code()
        }
    }
}

#[tokio::test]
async fn every_rpc_answers_each_kind_of_token_with_the_right_code() {
    let server = serve(Config {
        auth: Some(Arc::new(Tokens::parse(TOKENS).unwrap())),
        ..Config::default()
    })
    .await;
    // A live lease of namespace "orders" for KeepAlive to refresh.
    let lease = {
        let channel = Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let admin: tonic::metadata::MetadataValue<_> = "Bearer admin-secret".parse().unwrap();
        let mut client =
            RegistryServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", admin.clone());
                Ok(r)
            });
        let mut leased = instance("pay", "leased", 2);
        leased.namespace = "orders".into();
        client
            .register(register_request(leased, Some(Duration::from_secs(60))))
            .await
            .unwrap()
            .into_inner()
            .lease_id
    };

    use Code::{Ok as Allowed, PermissionDenied as Denied, Unauthenticated as Unknown};
    let reads = [Rpc::Discover, Rpc::Watch, Rpc::ListServices];
    let writes = [Rpc::Register, Rpc::Deregister, Rpc::KeepAlive];
    for rpc in reads.into_iter().chain(writes) {
        let is_read = reads.contains(&rpc);
        let expected = [
            (None, Unknown),
            (Some("not-a-token"), Unknown),
            (
                Some("reader-secret"),
                if is_read { Allowed } else { Denied },
            ),
            // KeepAlive names a lease: the namespace is that of the instances it holds.
            (Some("payments-secret"), Denied),
            (Some("admin-secret"), Allowed),
        ];
        for (token, code) in expected {
            assert_eq!(
                call(&server, rpc, token, lease).await,
                code,
                "{rpc:?} with token {token:?}"
            );
        }
    }

    // Health stays open for load balancers.
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test]
async fn a_denial_says_nothing_about_whether_the_service_exists() {
    let server = serve(Config {
        auth: Some(Arc::new(Tokens::parse(TOKENS).unwrap())),
        ..Config::default()
    })
    .await;
    let mut admin = authorized(&server, "admin-secret").await;
    let mut exists = instance("pay", "p1", 1);
    exists.namespace = "orders".into();
    admin
        .register(register_request(exists, None))
        .await
        .unwrap();
    let mut payments = authorized(&server, "payments-secret").await;
    let a = payments
        .discover(discover_request("orders", "pay"))
        .await
        .unwrap_err();
    let b = payments
        .discover(discover_request("orders", "nothing-here"))
        .await
        .unwrap_err();
    assert_eq!((a.code(), a.message()), (b.code(), b.message()));
}

type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Authorized =
    RegistryServiceClient<tonic::service::interceptor::InterceptedService<Channel, AddToken>>;

async fn authorized(server: &TestServer, token: &str) -> Authorized {
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let add: AddToken = Box::new(move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", header.clone());
        Ok(r)
    });
    RegistryServiceClient::with_interceptor(channel, add)
}

#[tokio::test]
async fn strict_ownership_keeps_one_token_off_another_tokens_instances() {
    let tokens = "[[token]]\nname = \"a\"\nsecret = \"a-secret\"\nread = [\"*\"]\nwrite = [\"*\"]\n\
                  [[token]]\nname = \"b\"\nsecret = \"b-secret\"\nread = [\"*\"]\nwrite = [\"*\"]\n";
    let server = serve(Config {
        auth: Some(Arc::new(Tokens::parse(tokens).unwrap())),
        strict_ownership: true,
        ..Config::default()
    })
    .await;
    let mut a = authorized(&server, "a-secret").await;
    let mut b = authorized(&server, "b-secret").await;
    a.register(register_request(instance("pay", "mine", 1), None))
        .await
        .unwrap();
    let deregister = || pb::DeregisterRequest {
        namespace: String::new(),
        service: "pay".into(),
        id: "mine".into(),
    };
    let stolen = b.deregister(deregister()).await.unwrap_err();
    assert_eq!(stolen.code(), Code::PermissionDenied, "{stolen:?}");
    let hijacked = b
        .register(register_request(instance("pay", "mine", 6666), None))
        .await
        .unwrap_err();
    assert_eq!(hijacked.code(), Code::PermissionDenied, "{hijacked:?}");
    // The owner still can, and nothing of b's attempts stuck.
    let found = a
        .discover(discover_request("", "pay"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.instances[0].port, 1);
    assert!(
        a.deregister(deregister())
            .await
            .unwrap()
            .into_inner()
            .existed
    );
}

async fn code_of<T>(result: Result<T, tonic::Status>) -> (Code, String) {
    match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

#[tokio::test]
async fn each_limit_is_resource_exhausted_and_others_are_still_served() {
    let server = serve(Config {
        limits: Limits {
            max_instances_per_service: 2,
            max_instances_per_namespace: 3,
            max_leases: 2,
            max_watches: 3,
            max_watches_per_connection: 2,
        },
        max_request_size: 64 * 1024,
        ..Config::default()
    })
    .await;
    let mut client = server.client().await;

    // Instances per service, then per namespace; updates are not new instances.
    for id in ["a1", "a2"] {
        signpost_tests::register(&mut client, instance("a", id, 1)).await;
    }
    let (code, message) = code_of(
        client
            .register(register_request(instance("a", "a3", 1), None))
            .await,
    )
    .await;
    assert_eq!(code, Code::ResourceExhausted);
    assert!(
        message.contains("max_instances_per_service (2)"),
        "{message}"
    );
    signpost_tests::register(&mut client, instance("a", "a1", 2)).await;
    signpost_tests::register(&mut client, instance("b", "b1", 1)).await;
    let (code, message) = code_of(
        client
            .register(register_request(instance("b", "b2", 1), None))
            .await,
    )
    .await;
    assert_eq!(code, Code::ResourceExhausted);
    assert!(
        message.contains("max_instances_per_namespace (3)"),
        "{message}"
    );

    // Leases.
    // Each in its own service, so that only the lease limit applies.
    let leased = |id: &str| {
        let mut i = instance(id, id, 1);
        i.namespace = "leases".into();
        register_request(i, Some(Duration::from_secs(60)))
    };
    client.register(leased("l1")).await.unwrap();
    client.register(leased("l2")).await.unwrap();
    let (code, message) = code_of(client.register(leased("l3")).await).await;
    assert_eq!(code, Code::ResourceExhausted);
    assert!(message.contains("max_leases (2)"), "{message}");

    // Request size.
    let mut huge = instance("c", "big", 1);
    huge.namespace = "other".into();
    huge.metadata.insert("blob".into(), "x".repeat(100 * 1024));
    let (code, message) = code_of(client.register(register_request(huge, None)).await).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(
        message.contains("max_request_size (65536 bytes)"),
        "{message}"
    );

    // Watches per connection, then in total.
    let mut first = server.client().await;
    let w1 = first.watch(watch_request("a")).await.unwrap();
    let _w2 = first.watch(watch_request("a")).await.unwrap();
    let (code, message) = code_of(first.watch(watch_request("a")).await).await;
    assert_eq!(code, Code::ResourceExhausted);
    assert!(
        message.contains("max_watches_per_connection (2)"),
        "{message}"
    );
    let mut second = server.client().await;
    let _w3 = second.watch(watch_request("a")).await.unwrap();
    let (code, message) = code_of(second.watch(watch_request("a")).await).await;
    assert_eq!(code, Code::ResourceExhausted);
    assert!(message.contains("max_watches (3)"), "{message}");
    // A closed stream gives its place back.
    drop(w1);
    within("a watch place freed", async {
        loop {
            if second.watch(watch_request("a")).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Through all of it, ordinary calls are served.
    let found = client
        .discover(discover_request("", "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.instances.len(), 2);
}

#[tokio::test]
async fn an_answer_over_the_response_limit_is_resource_exhausted_and_a_narrower_one_is_served() {
    let server = serve(Config {
        max_response_size: 4096,
        ..Config::default()
    })
    .await;
    let mut client = server.client().await;
    for n in 0..40 {
        let mut i = instance("big", &format!("b{n:02}"), 1);
        i.metadata = [
            ("shard".to_string(), (n % 4).to_string()),
            ("note".to_string(), "x".repeat(100)),
        ]
        .into();
        signpost_tests::register(&mut client, i).await;
    }
    // Forty instances of ~170 bytes: over the limit; the ten of one shard: under it.
    let limit = "limit max_response_size (4096 bytes) reached";

    let (code, message) = code_of(client.discover(discover_request("", "big")).await).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains(limit), "{message}");

    // A watch's reset is one message too: the stream ends with the same answer.
    let mut stream = client
        .watch(watch_request("big"))
        .await
        .unwrap()
        .into_inner();
    let (code, message) = code_of(within("the watch's answer", stream.message()).await).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains(limit), "{message}");

    // Narrowed by a selector, both are served.
    let mut narrow = discover_request("", "big");
    narrow.selector = "shard=1".into();
    let found = client.discover(narrow).await.unwrap().into_inner();
    assert_eq!(found.instances.len(), 10);
    let mut request = watch_request("big");
    request.selector = "shard=1".into();
    let mut stream = client.watch(request).await.unwrap().into_inner();
    let reset = within("a narrow reset", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert!(reset.reset);
    assert_eq!(reset.events.len(), 10);
}

/// One KeepAlive request on a fresh stream of `client`: the answer, or the status the stream
/// ended with.
async fn keep_alive_once(
    client: &mut Authorized,
    lease: u64,
) -> Result<pb::KeepAliveResponse, tonic::Status> {
    let requests = tokio_stream::iter([pb::KeepAliveRequest { lease_id: lease }]);
    let mut answers = client.keep_alive(requests).await?.into_inner();
    match within("keep-alive answer", answers.message()).await? {
        Some(answer) => Ok(answer),
        None => Err(tonic::Status::unknown("the stream ended without an answer")),
    }
}

#[tokio::test]
async fn only_a_writer_of_its_namespace_may_keep_a_lease_alive() {
    let tokens = "[[token]]\nname = \"a\"\nsecret = \"a-secret\"\nread = [\"a\"]\nwrite = [\"a\"]\n\
                  [[token]]\nname = \"b\"\nsecret = \"b-secret\"\nread = [\"b\"]\nwrite = [\"b\"]\n";
    let server = serve(Config {
        auth: Some(Arc::new(Tokens::parse(tokens).unwrap())),
        ..Config::default()
    })
    .await;
    let mut a = authorized(&server, "a-secret").await;
    let mut b = authorized(&server, "b-secret").await;
    let mut in_a = instance("pay", "p1", 1);
    in_a.namespace = "a".into();
    let lease = a
        .register(register_request(in_a, Some(Duration::from_secs(30))))
        .await
        .unwrap()
        .into_inner()
        .lease_id;

    let denied = keep_alive_once(&mut b, lease).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("may not write namespace \"a\""),
        "names the verb and namespace: {denied:?}"
    );
    let kept = keep_alive_once(&mut a, lease).await.unwrap();
    assert!(!kept.expired && kept.lease_id == lease, "{kept:?}");

    // Nor may b attach an instance of its own namespace to a's lease.
    let mut in_b = instance("pay", "p2", 2);
    in_b.namespace = "b".into();
    let joined = b
        .register(pb::RegisterRequest {
            lease_id: lease,
            ..register_request(in_b, None)
        })
        .await
        .unwrap_err();
    // Refused before it refreshes the lease, as a KeepAlive of it would be.
    assert_eq!(joined.code(), Code::PermissionDenied, "{joined:?}");
    assert!(
        joined.message().contains("may not write namespace \"a\""),
        "{joined:?}"
    );
}

#[tokio::test]
async fn lease_ids_cannot_be_guessed_from_one_another() {
    let server = serve(Config::default()).await;
    let mut client = server.client().await;
    let mut secrets = Vec::new();
    for n in 0..20 {
        let granted = client
            .register(register_request(
                instance("pay", &format!("p{n}"), 1),
                Some(Duration::from_secs(30)),
            ))
            .await
            .unwrap()
            .into_inner();
        secrets.push(granted.lease_id & u64::from(u32::MAX));
    }
    // The low 32 bits of each id are unpredictable: spread over their whole range, not a
    // sequence (20 uniform draws all within 2^24 of each other: less likely than 2^-150).
    let spread = secrets.iter().max().unwrap() - secrets.iter().min().unwrap();
    assert!(
        spread > 1 << 24,
        "lease ids' low bits {secrets:?} look sequential"
    );
}

#[tokio::test]
async fn an_oversized_keep_alive_message_is_resource_exhausted_naming_the_limit() {
    let server = serve(Config {
        max_request_size: 1024,
        ..Config::default()
    })
    .await;
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // A message of another type, as bytes the KeepAlive decoder must read whole: 4 KiB of a field
    // KeepAliveRequest does not know.
    let mut big = instance("pay", "p1", 1);
    big.metadata.insert("filler".into(), "x".repeat(4096));
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/signpost.v1.RegistryService/KeepAlive",
    );
    let codec = tonic_prost::ProstCodec::<pb::Instance, pb::KeepAliveResponse>::default();
    let request = tonic::Request::new(tokio_stream::iter([big]));
    let answer = match grpc.streaming(request, path, codec).await {
        Ok(response) => {
            let mut answers = response.into_inner();
            within("an answer to the oversized message", answers.message())
                .await
                .map(|_| ())
        }
        Err(status) => Err(status),
    };
    let status = answer.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_request_size"), "{status:?}");
}
