//! Model-based test of the watch contract, on every backend: random sequences of register,
//! update, deregister, lease expiry, health verdicts and evictions, with watchers on random
//! filters that reconnect and resume. After every step, each watcher's view, built only from its
//! stream, equals Discover with the same filter at the same revision. The operations are
//! proptest's, so a failing sequence shrinks to a short one.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use signpost_proto::v1 as pb;
use signpost_server::Config;
use signpost_store::{
    Condition, DurableStore, EtcdConfig, Health, HealthUpdate, MemoryConfig, MemoryStore,
    RemovalCause, Store, Write,
};
use signpost_tests::etcd::Etcd;
use signpost_tests::process::require_program;
use signpost_tests::*;

const SERVICES: [&str; 2] = ["alpha", "beta"];
const TAGS: [&str; 3] = ["a", "b", "c"];
const VERSIONS: [&str; 3] = ["v1", "v2", "v3"];
const SELECTORS: [&str; 6] = [
    "",
    "version=v2",
    "version!=v1",
    "version in (v1,v3)",
    "canary",
    "!canary,version notin (v3)",
];
const IDS: usize = 6;

#[derive(Debug, Clone)]
struct Filter {
    service: usize,
    tag: Option<usize>,
    selector: usize,
    include_unhealthy: bool,
}

impl Filter {
    fn discover(&self) -> pb::DiscoverRequest {
        pb::DiscoverRequest {
            namespace: String::new(),
            service: SERVICES[self.service].into(),
            tags: self.tag.map(|t| TAGS[t].to_string()).into_iter().collect(),
            selector: SELECTORS[self.selector].into(),
            include_unhealthy: self.include_unhealthy,
        }
    }

    fn watch(&self) -> pb::WatchRequest {
        let d = self.discover();
        pb::WatchRequest {
            namespace: d.namespace,
            service: d.service,
            tags: d.tags,
            selector: d.selector,
            include_unhealthy: d.include_unhealthy,
            start_revision: 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Spec {
    service: usize,
    id: usize,
    port: u32,
    tags: [bool; 3],
    version: usize,
    canary: bool,
    /// With a (never probed) health check, so that verdicts and evictions apply to it.
    checked: bool,
}

impl Spec {
    fn instance(&self) -> pb::Instance {
        let mut i = instance(SERVICES[self.service], &format!("i{}", self.id), self.port);
        i.tags = TAGS
            .iter()
            .zip(self.tags)
            .filter(|(_, on)| *on)
            .map(|(t, _)| t.to_string())
            .collect();
        i.metadata
            .insert("version".into(), VERSIONS[self.version].to_string());
        if self.canary {
            i.metadata.insert("canary".into(), "true".into());
        }
        if self.checked {
            i.check = Some(pb::HealthCheck {
                probe: Some(pb::health_check::Probe::Tcp(pb::TcpProbe {})),
                interval: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                timeout: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                deregister_critical_after: None,
                successes_before_passing: 1,
                failures_before_critical: 1,
            });
        }
        i
    }
}

#[derive(Debug, Clone)]
enum Op {
    Register(Spec),
    /// On a lease of its own, or joining the `n`th lease granted so far.
    RegisterOnLease(Spec, Option<usize>),
    Deregister {
        service: usize,
        id: usize,
    },
    /// The `n`th live lease ends, as an expiry would end it.
    Revoke(usize),
    /// A verdict on a checked instance, written as the checker writes it.
    Verdict {
        service: usize,
        id: usize,
        health: usize,
    },
    /// A checked instance evicted for staying critical, as the checker evicts it.
    Evict {
        service: usize,
        id: usize,
    },
    /// The `n`th watcher reconnects: afresh, or resuming from a view it held `back` steps ago.
    Reconnect {
        watcher: usize,
        back: Option<usize>,
    },
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0..SERVICES.len(),
        0..IDS,
        1..6u32,
        any::<[bool; 3]>(),
        0..VERSIONS.len(),
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.5),
    )
        .prop_map(|(service, id, port, tags, version, canary, checked)| Spec {
            service,
            id,
            port,
            tags,
            version,
            canary,
            checked,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let key = (0..SERVICES.len(), 0..IDS);
    prop_oneof![
        4 => spec().prop_map(Op::Register),
        2 => (spec(), prop::option::of(0..8usize)).prop_map(|(s, l)| Op::RegisterOnLease(s, l)),
        2 => key.clone().prop_map(|(service, id)| Op::Deregister { service, id }),
        1 => (0..8usize).prop_map(Op::Revoke),
        3 => (key.clone(), 0..3usize).prop_map(|((service, id), health)| Op::Verdict { service, id, health }),
        1 => key.prop_map(|(service, id)| Op::Evict { service, id }),
        1 => (0..6usize, prop::option::of(0..20usize)).prop_map(|(watcher, back)| Op::Reconnect { watcher, back }),
    ]
}

fn filter() -> impl Strategy<Value = Filter> {
    (
        0..SERVICES.len(),
        prop::option::weighted(0.3, 0..TAGS.len()),
        0..SELECTORS.len(),
        any::<bool>(),
    )
        .prop_map(|(service, tag, selector, include_unhealthy)| Filter {
            service,
            tag,
            selector,
            include_unhealthy,
        })
}

type Past = Vec<(u64, BTreeMap<String, pb::Instance>)>;

async fn run(store: Arc<dyn Store>, filters: Vec<Filter>, ops: Vec<Op>) -> Result<(), String> {
    let config = Config {
        watch_progress_interval: Duration::from_millis(20),
        // Nothing probes: verdicts come from the test, as the checker would write them.
        health_checks: None,
        ..Config::default()
    };
    let server = TestServer::serve(store.clone(), config).await;
    let mut client = server.client().await;
    let mut views: Vec<(Filter, WatchView, Past)> = Vec::new();
    for filter in filters {
        let view = WatchView::open(&mut client, filter.watch()).await;
        views.push((filter, view, Vec::new()));
    }
    let mut leases: Vec<u64> = Vec::new();

    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Register(spec) => {
                register(&mut client, spec.instance()).await;
            }
            Op::RegisterOnLease(spec, join) => {
                let request = match join.and_then(|n| leases.get(n % leases.len().max(1))) {
                    Some(&lease_id) => pb::RegisterRequest {
                        lease_id,
                        ..register_request(spec.instance(), None)
                    },
                    None => register_request(spec.instance(), Some(Duration::from_secs(60))),
                };
                // A lease revoked since, or one that holds instances of no other namespace:
                // NOT_FOUND is a valid answer, and nothing changes.
                if let Ok(answer) = client.register(request).await {
                    let lease = answer.into_inner().lease_id;
                    if !leases.contains(&lease) {
                        leases.push(lease);
                    }
                }
            }
            Op::Deregister { service, id } => {
                let request = pb::DeregisterRequest {
                    namespace: String::new(),
                    service: SERVICES[*service].into(),
                    id: format!("i{id}"),
                };
                must(client.deregister(request).await, "deregister");
            }
            Op::Revoke(n) if !leases.is_empty() => {
                let id = leases.swap_remove(n % leases.len());
                must(store.revoke_lease(id).await, "revoke");
            }
            Op::Revoke(_) => {}
            Op::Verdict {
                service,
                id,
                health,
            } => {
                if let Some(current) = find(&*store, *service, *id) {
                    let update = HealthUpdate {
                        key: current.key(),
                        create_revision: current.create_revision,
                        check: current.check.clone().unwrap(),
                        health: [Health::Passing, Health::Warning, Health::Critical][*health],
                        output: format!("step {step}"),
                        checked_at: std::time::SystemTime::now(),
                    };
                    must(store.write(Write::Health(update)).await, "verdict");
                }
            }
            Op::Evict { service, id } => {
                if let Some(current) = find(&*store, *service, *id) {
                    let evict = Write::Delete {
                        key: current.key(),
                        cause: RemovalCause::Unhealthy,
                        condition: Condition::Registration(current.create_revision),
                    };
                    must(store.write(evict).await, "evict");
                }
            }
            Op::Reconnect { watcher, back } => {
                let n = watcher % views.len();
                let (filter, view, past) = &mut views[n];
                *view = match back.filter(|_| !past.is_empty()) {
                    None => WatchView::open(&mut client, filter.watch()).await,
                    Some(back) => {
                        let (revision, instances) =
                            past[past.len() - 1 - back % past.len()].clone();
                        let request = pb::WatchRequest {
                            start_revision: revision,
                            ..filter.watch()
                        };
                        WatchView::resume(&mut client, request, instances).await
                    }
                };
            }
        }

        for (n, (filter, view, past)) in views.iter_mut().enumerate() {
            let truth = discover(&mut client, filter.discover()).await;
            view.until_revision(truth.revision).await;
            let seen: Vec<pb::Instance> = view.instances.values().cloned().collect();
            if seen != truth.instances {
                return Err(format!(
                    "step {step} ({op:?}): watcher {n} ({filter:?}) differs from Discover at \
                     revision {}:\n  watch:    {seen:?}\n  discover: {:?}",
                    truth.revision, truth.instances
                ));
            }
            past.push((view.revision, view.instances.clone()));
            if past.len() > 20 {
                past.remove(0);
            }
        }
    }
    Ok(())
}

/// A checked instance the store holds now.
fn find(store: &dyn Store, service: usize, id: usize) -> Option<signpost_store::Instance> {
    let snapshot = store.list("default", SERVICES[service]).unwrap();
    snapshot
        .instances
        .iter()
        .find(|i| i.id == format!("i{id}") && i.check.is_some())
        .map(|i| (**i).clone())
}

/// A small history and feed make resets and resumes part of every run.
const HISTORY: usize = 8;

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(MemoryConfig {
        history_limit: HISTORY,
        feed_capacity: HISTORY,
    }))
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        // Each case starts servers; shrinking a failure still finishes in minutes.
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    fn on_memory_every_watchers_view_equals_discover_after_every_step(
        filters in prop::collection::vec(filter(), 6),
        ops in prop::collection::vec(op(), 1..70),
    ) {
        let outcome = runtime().block_on(async {
            within_for(Duration::from_secs(120), "model run", run(memory(), filters, ops)).await
        });
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

proptest! {
    #![proptest_config(cases(8))]

    #[test]
    fn on_durable_every_watchers_view_equals_discover_after_every_step(
        filters in prop::collection::vec(filter(), 6),
        ops in prop::collection::vec(op(), 1..70),
    ) {
        let outcome = runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let config = MemoryConfig { history_limit: HISTORY, feed_capacity: HISTORY };
            let store: Arc<dyn Store> = Arc::new(DurableStore::open(dir.path(), config).unwrap());
            within_for(Duration::from_secs(120), "model run", run(store, filters, ops)).await
        });
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

proptest! {
    #![proptest_config(cases(6))]

    #[test]
    fn on_etcd_every_watchers_view_equals_discover_after_every_step(
        filters in prop::collection::vec(filter(), 6),
        ops in prop::collection::vec(op(), 1..50),
    ) {
        if require_program("etcd").is_none() {
            return Ok(());
        }
        let outcome = runtime().block_on(async {
            let etcd = Etcd::start(1).await.expect("etcd starts");
            let store = etcd
                .store(EtcdConfig {
                    history_limit: HISTORY,
                    feed_capacity: HISTORY,
                    ..EtcdConfig::default()
                })
                .await;
            let outcome =
                within_for(Duration::from_secs(120), "model run", run(Arc::new(store), filters, ops))
                    .await;
            drop(etcd);
            outcome
        });
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}
