//! Model-based test of the watch contract: random sequences of register, update, deregister and
//! lease expiry, with many watchers on random filters. After every step, each watcher's view,
//! built only from its stream, equals Discover with the same filter at the same revision.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_server::Config;
use signpost_store::{MemoryConfig, Store};
use signpost_tests::*;

/// SplitMix64: a deterministic generator, so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

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

fn random_filter(rng: &mut Rng) -> pb::DiscoverRequest {
    let tags = match rng.below(3) {
        0 => vec![],
        _ => vec![rng.pick(&TAGS).to_string()],
    };
    pb::DiscoverRequest {
        namespace: String::new(),
        service: rng.pick(&SERVICES).to_string(),
        tags,
        selector: rng.pick(&SELECTORS).to_string(),
        include_unhealthy: rng.below(2) == 0,
    }
}

fn random_instance(rng: &mut Rng) -> pb::Instance {
    let mut i = instance(
        rng.pick::<&str>(&SERVICES),
        &format!("i{}", rng.below(6)),
        1 + rng.below(5) as u32,
    );
    i.tags = TAGS
        .iter()
        .filter(|_| rng.below(2) == 0)
        .map(|t| t.to_string())
        .collect();
    i.metadata
        .insert("version".into(), rng.pick(&VERSIONS).to_string());
    if rng.below(4) == 0 {
        i.metadata.insert("canary".into(), "true".into());
    }
    i
}

async fn run(seed: u64, steps: usize, watchers: usize) {
    let mut rng = Rng(seed);
    let config = Config {
        watch_progress_interval: Duration::from_millis(20),
        ..Config::default()
    };
    // A small history and feed make resets and resumes part of the run too.
    let memory = MemoryConfig {
        history_limit: 8,
        feed_capacity: 8,
    };
    let server = TestServer::start_with(config, memory).await;
    let mut client = server.client().await;

    let mut views = Vec::new();
    for _ in 0..watchers {
        let filter = random_filter(&mut rng);
        let request = pb::WatchRequest {
            namespace: filter.namespace.clone(),
            service: filter.service.clone(),
            tags: filter.tags.clone(),
            selector: filter.selector.clone(),
            include_unhealthy: filter.include_unhealthy,
            start_revision: 0,
        };
        let view = WatchView::open(&mut client, request.clone()).await;
        let past: Vec<(u64, std::collections::BTreeMap<String, pb::Instance>)> = Vec::new();
        views.push((filter, request, view, past));
    }
    let mut leases: Vec<u64> = Vec::new();

    for step in 0..steps {
        let op = rng.below(10);
        match op {
            0..=3 => {
                register(&mut client, random_instance(&mut rng)).await;
            }
            4..=5 => {
                let ttl = Some(Duration::from_secs(60));
                let i = random_instance(&mut rng);
                let lease = if !leases.is_empty() && rng.below(2) == 0 {
                    let id = *rng.pick(&leases);
                    pb::RegisterRequest {
                        lease_id: id,
                        ..register_request(i, None)
                    }
                } else {
                    register_request(i, ttl)
                };
                let answer = must(client.register(lease).await, "register on lease").into_inner();
                if !leases.contains(&answer.lease_id) {
                    leases.push(answer.lease_id);
                }
            }
            6..=7 => {
                let request = pb::DeregisterRequest {
                    namespace: String::new(),
                    service: rng.pick(&SERVICES).to_string(),
                    id: format!("i{}", rng.below(6)),
                };
                must(client.deregister(request).await, "deregister");
            }
            8 if !leases.is_empty() => {
                // Expiry itself: the same store path the expiry timer takes.
                let id = leases.swap_remove(rng.below(leases.len()));
                must(server.store.revoke_lease(id).await, "revoke");
            }
            _ => {
                // A watcher reconnects: starting over, or resuming from a view it held some steps
                // ago, which the server replays from history when it still has it and answers
                // with a reset when it does not.
                let n = rng.below(views.len());
                let (_, request, view, past) = &mut views[n];
                let start = if past.is_empty() || rng.below(3) == 0 {
                    None
                } else {
                    Some(past[rng.below(past.len())].clone())
                };
                *view = match start {
                    None => WatchView::open(&mut client, request.clone()).await,
                    Some((revision, instances)) => {
                        let request = pb::WatchRequest {
                            start_revision: revision,
                            ..request.clone()
                        };
                        WatchView::resume(&mut client, request, instances).await
                    }
                };
            }
        }

        for (n, (filter, _, view, past)) in views.iter_mut().enumerate() {
            let truth = discover(&mut client, filter.clone()).await;
            view.until_revision(truth.revision).await;
            let seen: Vec<pb::Instance> = view.instances.values().cloned().collect();
            assert_eq!(
                seen, truth.instances,
                "seed {seed} step {step} op {op}: watcher {n} ({filter:?}) differs from Discover at revision {}",
                truth.revision
            );
            past.push((view.revision, view.instances.clone()));
            if past.len() > 20 {
                past.remove(0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watchers_view_equals_discover_after_every_step() {
    for seed in 1..=6 {
        within_for(Duration::from_secs(120), "model run", run(seed, 80, 12)).await;
    }
}
