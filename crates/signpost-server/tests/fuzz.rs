//! Property tests of request validation and the selector parser: random bytes decoded as requests
//! and random structured requests reach the real service, and never panic nor get any answer but
//! OK or INVALID_ARGUMENT (NOT_FOUND too for a Register naming a lease that does not exist).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;

use proptest::prelude::*;
use prost::Message;
use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_server::RegistryService;
use signpost_server::selector::Selector;
use signpost_server::{Config, Registry};
use signpost_store::{MemoryConfig, MemoryStore};
use tonic::{Code, Request};

struct Harness {
    runtime: tokio::runtime::Runtime,
    registry: Registry,
}

impl Harness {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let registry = runtime.block_on(async {
            Registry::new(
                Arc::new(MemoryStore::new(MemoryConfig::default())),
                Config {
                    health_checks: None,
                    ..Config::default()
                },
            )
        });
        Harness { runtime, registry }
    }

    fn register(&self, req: pb::RegisterRequest) -> Code {
        let lease = req.lease_id;
        let code = self.code(self.registry.register(Request::new(req)));
        if lease != 0 && code == Code::NotFound {
            return Code::Ok;
        }
        code
    }

    fn code<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Code {
        match self.runtime.block_on(call) {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        }
    }

    /// Every request type decoded from the same bytes, where they decode.
    fn all(&self, bytes: &[u8]) -> Vec<Code> {
        let mut codes = Vec::new();
        if let Ok(req) = pb::RegisterRequest::decode(bytes) {
            codes.push(self.register(req));
        }
        if let Ok(req) = pb::DeregisterRequest::decode(bytes) {
            codes.push(self.code(self.registry.deregister(Request::new(req))));
        }
        if let Ok(req) = pb::DiscoverRequest::decode(bytes) {
            codes.push(self.code(self.registry.discover(Request::new(req))));
        }
        if let Ok(req) = pb::WatchRequest::decode(bytes) {
            codes.push(self.code(self.registry.watch(Request::new(req))));
        }
        if let Ok(req) = pb::ListServicesRequest::decode(bytes) {
            codes.push(self.code(self.registry.list_services(Request::new(req))));
        }
        codes
    }
}

fn fine(code: Code) -> bool {
    matches!(code, Code::Ok | Code::InvalidArgument)
}

/// Strings that are sometimes valid names and often not.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{0,12}",
        "[a-zA-Z0-9._/=!(), -]{0,24}",
        ".{0,40}",
        "[a-z]{60,70}",
    ]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    prop::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
    )
}

fn check() -> impl Strategy<Value = Option<pb::HealthCheck>> {
    let probe = prop_oneof![
        Just(None),
        (text(), text(), text(), text()).prop_map(|(path, method, name, value)| {
            Some(pb::health_check::Probe::Http(pb::HttpProbe {
                path,
                method,
                headers: [(name, value)].into(),
            }))
        }),
        Just(Some(pb::health_check::Probe::Tcp(pb::TcpProbe {}))),
        text().prop_map(|service| Some(pb::health_check::Probe::Grpc(pb::GrpcProbe { service }))),
        Just(Some(pb::health_check::Probe::Ttl(pb::TtlProbe {}))),
    ];
    prop::option::of(
        (
            probe,
            duration(),
            duration(),
            duration(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(probe, interval, timeout, after, successes, failures)| {
                pb::HealthCheck {
                    probe,
                    interval,
                    timeout,
                    deregister_critical_after: after,
                    successes_before_passing: successes,
                    failures_before_critical: failures,
                }
            }),
    )
}

fn instance() -> impl Strategy<Value = pb::Instance> {
    (
        (text(), text(), text(), text(), any::<u32>()),
        prop::collection::vec(text(), 0..4),
        prop::collection::btree_map(text(), text(), 0..4),
        (any::<u32>(), text(), check()),
    )
        .prop_map(
            |((namespace, service, id, address, port), tags, metadata, (weight, zone, check))| {
                pb::Instance {
                    namespace,
                    service,
                    id,
                    address,
                    port,
                    tags,
                    metadata: metadata.into_iter().collect(),
                    weight,
                    zone,
                    check,
                    ..Default::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_as_any_request_are_answered_ok_or_invalid(
        bytes in prop::collection::vec(any::<u8>(), 0..256)
    ) {
        let harness = Harness::new();
        for code in harness.all(&bytes) {
            prop_assert!(fine(code), "{code:?} for {bytes:?}");
        }
    }

    #[test]
    fn random_registrations_are_answered_ok_or_invalid(
        instance in prop::option::of(instance()),
        ttl in duration(),
        lease_id in prop_oneof![Just(0u64), any::<u64>()],
    ) {
        let harness = Harness::new();
        let code = harness.register(pb::RegisterRequest { instance, ttl, lease_id });
        prop_assert!(fine(code), "{code:?}");
    }

    #[test]
    fn random_filters_are_answered_ok_or_invalid(
        namespace in text(),
        service in text(),
        tags in prop::collection::vec(text(), 0..4),
        selector in text(),
        start_revision in any::<u64>(),
    ) {
        let harness = Harness::new();
        let discover = pb::DiscoverRequest {
            namespace: namespace.clone(),
            service: service.clone(),
            tags: tags.clone(),
            selector: selector.clone(),
            include_unhealthy: false,
        };
        let code = harness.code(harness.registry.discover(Request::new(discover)));
        prop_assert!(fine(code), "Discover: {code:?}");
        let watch = pb::WatchRequest {
            namespace,
            service,
            tags,
            selector,
            include_unhealthy: true,
            start_revision,
        };
        let code = harness.code(harness.registry.watch(Request::new(watch)));
        prop_assert!(fine(code), "Watch: {code:?}");
    }

    #[test]
    fn the_selector_parser_never_panics(input in prop_oneof![".{0,64}", "[a-z=!(), in notexis]{0,48}"]) {
        // Ok or a parse error; either way it returns.
        let _ = Selector::parse(&input);
    }
}
