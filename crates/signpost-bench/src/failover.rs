//! `failover`: what callers see when one of three greeter processes dies with SIGKILL (no
//! deregistration, no goodbye on its connections), through our balanced channel and through
//! tonic's `balance_channel` fed by the same registry watch.
//!
//! Each round runs one phase per balancer, each on three fresh `greeter-server` processes: the
//! callers warm up, one backend is killed, and the phase runs on until the registry has expired
//! the dead instance's lease (that removal is all tonic's balancer has to go on) and a little
//! longer, so that late failures are counted too. The two balancers never run at once: a
//! balancer that fails calls fast would take CPU from the other on a small machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use signpost_client::{Client, EndpointState, Event, Filter};
use signpost_examples::pb::SayHelloRequest;
use signpost_examples::pb::greeter_service_client::GreeterServiceClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

use crate::Latencies;
use crate::balance::Transport;
use crate::process::{GreeterProcess, Process, find_binary, start_greeter, start_registry};

/// The service `greeter-server` registers.
const SERVICE: &str = "greeter";
const BACKENDS: usize = 3;
/// A call not answered within this counts as failed: a dead backend must not hang a caller.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a phase goes on after the registry dropped the dead instance.
const SETTLE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The registry; `None` starts one.
    pub registry: Option<String>,
    pub greeter_server: Option<PathBuf>,
    pub signpost: Option<PathBuf>,
    pub callers: usize,
    pub rounds: usize,
    pub ttl_secs: u64,
    pub warmup: Duration,
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Balancer {
    Ours,
    Tonic,
}

/// What one phase measured; times are from the kill.
#[derive(Debug, Default)]
struct Phase {
    calls: u64,
    failed: u64,
    failed_before_kill: u64,
    /// Ours only: calls in flight on the killed backend just before the kill.
    in_flight: Option<u32>,
    /// Ours only: until the killed backend's endpoint was no longer Ready.
    left_ready: Option<Duration>,
    last_failure: Option<Duration>,
    /// Until the balancer was told by the registry that the instance is gone.
    removed: Duration,
}

/// Counts the callers share; times in microseconds since `base`.
struct Tally {
    base: Instant,
    calls: AtomicU64,
    failed: AtomicU64,
    /// 0 until the first failure; else its time + 1.
    last_failure_us: AtomicU64,
}

impl Tally {
    fn new() -> Arc<Tally> {
        Arc::new(Tally {
            base: Instant::now(),
            calls: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_failure_us: AtomicU64::new(0),
        })
    }

    fn since_base(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64
    }
}

fn spawn_callers<T: Transport>(
    channel: &T,
    callers: usize,
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    (0..callers)
        .map(|_| {
            let mut greeter = GreeterServiceClient::new(channel.clone());
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let call = greeter.say_hello(SayHelloRequest { name: "f".into() });
                    let ok = matches!(tokio::time::timeout(CALL_TIMEOUT, call).await, Ok(Ok(_)));
                    tally.calls.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        let at = tally.since_base(Instant::now()) + 1;
                        tally.last_failure_us.fetch_max(at, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

/// Tells the callers to stop when dropped, so that no way out of a phase leaves them calling.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Three greeters, stopped (and their instances deregistered) when the phase ends.
struct Greeters {
    client: Client,
    greeters: Vec<GreeterProcess>,
}

impl Greeters {
    async fn start(
        client: &Client,
        binary: &std::path::Path,
        registry: &str,
        ttl: u64,
    ) -> anyhow::Result<Greeters> {
        let mut greeters = Greeters {
            client: client.clone(),
            greeters: Vec::new(),
        };
        for _ in 0..BACKENDS {
            greeters
                .greeters
                .push(start_greeter(binary, registry, ttl).await?);
        }
        Ok(greeters)
    }

    fn ids(&self) -> Vec<String> {
        self.greeters.iter().map(|g| g.id.clone()).collect()
    }

    /// Kills every process, then takes their instances out of the registry, so that the next
    /// phase starts with only its own (a killed process cannot deregister itself).
    async fn stop(self) -> anyhow::Result<()> {
        let ids = self.ids();
        for greeter in self.greeters {
            greeter.process.stop().await;
        }
        for id in ids {
            self.client
                .deregister("", SERVICE, &id)
                .await
                .with_context(|| format!("deregistering {id}"))?;
        }
        Ok(())
    }
}

/// Waits until the registry lists no instance of the service: leftovers of an earlier run
/// expire within a lease's ttl.
async fn wait_empty(client: &Client, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let left = client
            .discover(Filter::service(SERVICE).include_unhealthy(true))
            .await?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let ids: Vec<_> = left.iter().map(|i| i.id.as_str()).collect();
            bail!(
                "the registry still lists {SERVICE} instances {ids:?}; failover needs the service to itself"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn phase(
    balancer: Balancer,
    client: &Client,
    greeter_server: &std::path::Path,
    registry: &str,
    settings: &Settings,
    round: usize,
) -> anyhow::Result<Phase> {
    let mut greeters = Greeters::start(client, greeter_server, registry, settings.ttl_secs).await?;
    let outcome = match balancer {
        Balancer::Ours => ours(client, &mut greeters, settings, round).await,
        Balancer::Tonic => tonic_balance(client, &mut greeters, settings, round).await,
    };
    // Stopped on every path; a failed measurement is reported after the clean-up.
    let stopped = greeters.stop().await;
    let phase = outcome?;
    stopped?;
    Ok(phase)
}

/// How long a phase may wait for the registry to drop the killed instance: its lease's ttl,
/// with room for a loaded machine.
fn removal_deadline(settings: &Settings) -> Duration {
    Duration::from_secs(settings.ttl_secs) + Duration::from_secs(5)
}

async fn ours(
    client: &Client,
    greeters: &mut Greeters,
    settings: &Settings,
    round: usize,
) -> anyhow::Result<Phase> {
    let ids = greeters.ids();
    let channel = client.channel(SERVICE);
    wait_until(
        "every greeter Ready on our balanced channel",
        Duration::from_secs(10),
        || {
            let stats = channel.stats();
            ids.iter().all(|id| {
                stats
                    .endpoints
                    .iter()
                    .any(|e| &e.id == id && e.state == EndpointState::Ready)
            })
        },
    )
    .await?;
    let tally = Tally::new();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let callers = spawn_callers(&channel, settings.callers, &tally, &stop);
    tokio::time::sleep(settings.warmup).await;

    let victim = round % BACKENDS;
    let victim_id = ids[victim].clone();
    let before = channel.stats();
    let in_flight = before
        .endpoints
        .iter()
        .find(|e| e.id == victim_id)
        .map_or(0, |e| e.in_flight);
    let failed_before_kill = tally.failed.load(Ordering::Relaxed);
    // Taken before the signal: the process may be gone, and calls failing, before kill(2)
    // has returned.
    let killed = Instant::now();
    greeters.greeters[victim].process.kill()?;

    // Polled every millisecond: the state change (seen by the endpoint's connection task) and
    // the registry's removal (after the lease's ttl).
    let mut left_ready = None;
    let deadline = killed + removal_deadline(settings);
    let removed = loop {
        if left_ready.is_none() {
            let stats = channel.stats();
            let ready = stats
                .endpoints
                .iter()
                .any(|e| e.id == victim_id && e.state == EndpointState::Ready);
            if !ready {
                left_ready = Some(killed.elapsed());
            }
        }
        if !channel.instances().iter().any(|i| i.id == victim_id) {
            break killed.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "the registry did not drop the killed {victim_id} within {:?}",
                removal_deadline(settings)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    tokio::time::sleep(SETTLE).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.context("caller")?;
    }
    Ok(finish(
        &tally,
        killed,
        failed_before_kill,
        Some(in_flight),
        left_ready,
        removed,
    ))
}

/// Feeds tonic's balancer from a registry watch: Insert on added (or moved) instances, Remove
/// on removed ones; publishes the ids it has inserted.
fn feed_tonic(
    client: &Client,
    changes: tokio::sync::mpsc::Sender<Change<String, Endpoint>>,
) -> (JoinHandle<()>, watch::Receiver<BTreeSet<String>>) {
    let mut updates = client.watch(Filter::service(SERVICE));
    let (known_tx, known_rx) = watch::channel(BTreeSet::new());
    let task = tokio::spawn(async move {
        // id -> uri
        let mut known: BTreeMap<String, String> = BTreeMap::new();
        while let Some(Ok(update)) = updates.next().await {
            let mut wanted: Vec<(String, String)> = Vec::new();
            let mut gone: Vec<String> = Vec::new();
            if update.reset {
                let now: BTreeMap<String, String> = update
                    .events
                    .iter()
                    .map(|e| (e.instance().id.clone(), e.instance().uri()))
                    .collect();
                gone.extend(known.keys().filter(|id| !now.contains_key(*id)).cloned());
                wanted.extend(now);
            } else {
                for event in &update.events {
                    match event {
                        Event::Added(i) | Event::Updated(i) => wanted.push((i.id.clone(), i.uri())),
                        Event::Removed(i, _) => gone.push(i.id.clone()),
                    }
                }
            }
            for id in gone {
                if known.remove(&id).is_some() && changes.send(Change::Remove(id)).await.is_err() {
                    return;
                }
            }
            for (id, uri) in wanted {
                if known.get(&id) == Some(&uri) {
                    continue;
                }
                let Ok(endpoint) = Endpoint::from_shared(uri.clone()) else {
                    continue;
                };
                if changes
                    .send(Change::Insert(id.clone(), endpoint.tcp_nodelay(true)))
                    .await
                    .is_err()
                {
                    return;
                }
                known.insert(id, uri);
            }
            known_tx.send_replace(known.keys().cloned().collect());
        }
    });
    (task, known_rx)
}

async fn tonic_balance(
    client: &Client,
    greeters: &mut Greeters,
    settings: &Settings,
    round: usize,
) -> anyhow::Result<Phase> {
    let ids = greeters.ids();
    let (channel, changes) = Channel::balance_channel::<String>(16);
    let (feeder, known) = feed_tonic(client, changes);
    // Aborted on every way out of this function.
    let _feeder = AbortOnDrop(feeder);
    wait_until(
        "tonic's balancer fed every greeter",
        Duration::from_secs(10),
        || {
            let known = known.borrow();
            ids.iter().all(|id| known.contains(id))
        },
    )
    .await?;
    // Its connections are made on the first calls: warm until every greeter has answered.
    let mut warm = GreeterServiceClient::new(channel.clone());
    let mut answered = BTreeSet::new();
    let warm_until = Instant::now() + Duration::from_secs(10);
    while answered.len() < ids.len() {
        if Instant::now() > warm_until {
            bail!("tonic's balancer did not reach every greeter within 10s");
        }
        let answer = warm
            .say_hello(SayHelloRequest { name: "w".into() })
            .await
            .context("warm-up call through tonic's balancer")?;
        answered.insert(answer.into_inner().instance_id);
    }

    let tally = Tally::new();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let callers = spawn_callers(&channel, settings.callers, &tally, &stop);
    tokio::time::sleep(settings.warmup).await;

    let victim = round % BACKENDS;
    let victim_id = ids[victim].clone();
    let failed_before_kill = tally.failed.load(Ordering::Relaxed);
    // Taken before the signal: the process may be gone, and calls failing, before kill(2)
    // has returned.
    let killed = Instant::now();
    greeters.greeters[victim].process.kill()?;
    let deadline = killed + removal_deadline(settings);
    let removed = loop {
        if !known.borrow().contains(&victim_id) {
            break killed.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "the registry did not drop the killed {victim_id} within {:?}",
                removal_deadline(settings)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    tokio::time::sleep(SETTLE).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.context("caller")?;
    }
    Ok(finish(
        &tally,
        killed,
        failed_before_kill,
        None,
        None,
        removed,
    ))
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn finish(
    tally: &Tally,
    killed: Instant,
    failed_before_kill: u64,
    in_flight: Option<u32>,
    left_ready: Option<Duration>,
    removed: Duration,
) -> Phase {
    // A failure stamped before the kill (there are none when the phase went as planned) does not
    // count as one caused by it.
    let last_failure = tally
        .last_failure_us
        .load(Ordering::Relaxed)
        .checked_sub(1)
        .and_then(|at| at.checked_sub(tally.since_base(killed)))
        .map(Duration::from_micros);
    Phase {
        calls: tally.calls.load(Ordering::Relaxed),
        failed: tally
            .failed
            .load(Ordering::Relaxed)
            .saturating_sub(failed_before_kill),
        failed_before_kill,
        in_flight,
        left_ready,
        last_failure,
        removed,
    }
}

async fn wait_until(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !probe() {
        if Instant::now() > deadline {
            bail!("{what}: not reached within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Percentiles in milliseconds over the rounds' durations; a round without one counts as 0.
fn times(phases: &[Phase], pick: impl Fn(&Phase) -> Option<Duration>) -> Latencies {
    Latencies::new(
        phases
            .iter()
            .map(|p| pick(p).unwrap_or_default().as_micros() as u64)
            .collect(),
    )
}

pub(crate) async fn failover(settings: Settings) -> anyhow::Result<()> {
    let greeter_server = find_binary("greeter-server", settings.greeter_server.as_deref())?;
    // A registry of our own unless one was given; killed with the workload.
    let mut _registry: Option<Process> = None;
    let registry = match &settings.registry {
        Some(url) => url.clone(),
        None => {
            let binary = find_binary("signpost", settings.signpost.as_deref())?;
            let (process, url) = start_registry(&binary).await?;
            _registry = Some(process);
            url
        }
    };
    let client = Client::new(registry.clone())?;
    let ttl = Duration::from_secs(settings.ttl_secs);
    wait_empty(&client, ttl + Duration::from_secs(3)).await?;

    let rounds = settings.rounds.max(1);
    let (mut ours_phases, mut tonic_phases) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for balancer in [Balancer::Ours, Balancer::Tonic] {
            let phase = phase(
                balancer,
                &client,
                &greeter_server,
                &registry,
                &settings,
                round,
            )
            .await
            .with_context(|| format!("round {round}, {balancer:?}"))?;
            wait_empty(&client, ttl + Duration::from_secs(3)).await?;
            match balancer {
                Balancer::Ours => ours_phases.push(phase),
                Balancer::Tonic => tonic_phases.push(phase),
            }
        }
    }

    let sum = |phases: &[Phase], f: fn(&Phase) -> u64| phases.iter().map(f).sum::<u64>();
    let max = |phases: &[Phase], f: fn(&Phase) -> u64| phases.iter().map(f).max().unwrap_or(0);
    let o = &ours_phases;
    let t = &tonic_phases;
    let o_failed = sum(o, |p| p.failed);
    let o_failed_max = max(o, |p| p.failed);
    let o_in_flight = sum(o, |p| u64::from(p.in_flight.unwrap_or(0)));
    let o_before = sum(o, |p| p.failed_before_kill);
    let o_calls = sum(o, |p| p.calls);
    let o_never_left = o.iter().filter(|p| p.left_ready.is_none()).count();
    let o_left = times(o, |p| p.left_ready);
    let o_last = times(o, |p| p.last_failure);
    let t_failed = sum(t, |p| p.failed);
    let t_failed_max = max(t, |p| p.failed);
    let t_before = sum(t, |p| p.failed_before_kill);
    let t_calls = sum(t, |p| p.calls);
    let t_last = times(t, |p| p.last_failure);
    let removed = times(o, |p| Some(p.removed));
    let callers = settings.callers;
    let ttl = settings.ttl_secs;
    if settings.json {
        println!(
            "{{\"workload\":\"failover\",\"target\":\"{registry}\",\"callers\":{callers},\"backends\":{BACKENDS},\"rounds\":{rounds},\"ttl_secs\":{ttl},\
\"ours_calls\":{o_calls},\"ours_failed_total\":{o_failed},\"ours_failed_max\":{o_failed_max},\"ours_in_flight_at_kill_total\":{o_in_flight},\"ours_failed_before_kill\":{o_before},\
\"ours_left_ready_p50_ms\":{:.3},\"ours_left_ready_p99_ms\":{:.3},\"ours_never_left_ready\":{o_never_left},\"ours_last_failure_p50_ms\":{:.3},\"ours_last_failure_p99_ms\":{:.3},\
\"tonic_calls\":{t_calls},\"tonic_failed_total\":{t_failed},\"tonic_failed_max\":{t_failed_max},\"tonic_failed_before_kill\":{t_before},\"tonic_last_failure_p50_ms\":{:.3},\"tonic_last_failure_p99_ms\":{:.3},\
\"registry_removal_p50_ms\":{:.3},\"registry_removal_p99_ms\":{:.3}}}",
            o_left.percentile(50.0),
            o_left.percentile(99.0),
            o_last.percentile(50.0),
            o_last.percentile(99.0),
            t_last.percentile(50.0),
            t_last.percentile(99.0),
            removed.percentile(50.0),
            removed.percentile(99.0),
        );
    } else {
        println!(
            "failover callers={callers} backends={BACKENDS} rounds={rounds} ttl={ttl}s, one backend SIGKILLed per round:\n  \
             ours:  {o_failed} failed of {o_calls} calls (max {o_failed_max} in a round; {o_in_flight} in flight on the killed backend at the kills); \
             kill->endpoint not Ready p50={:.2}ms p99={:.2}ms; kill->last failed call p50={:.2}ms p99={:.2}ms\n  \
             tonic: {t_failed} failed of {t_calls} calls (max {t_failed_max} in a round); kill->last failed call p50={:.2}ms p99={:.2}ms\n  \
             kill->registry dropped the instance (lease expiry) p50={:.2}ms p99={:.2}ms; failures before the kills: ours {o_before}, tonic {t_before}",
            o_left.percentile(50.0),
            o_left.percentile(99.0),
            o_last.percentile(50.0),
            o_last.percentile(99.0),
            t_last.percentile(50.0),
            t_last.percentile(99.0),
            removed.percentile(50.0),
            removed.percentile(99.0),
        );
    }
    Ok(())
}
