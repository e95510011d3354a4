//! The discovery workloads, each defined once over a [`Conn`] that speaks to Signpost or to etcd.

// Without the `etcd` feature the etcd half of each workload is compiled out.
#![cfg_attr(not(feature = "etcd"), allow(dead_code, unused_variables))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
#[cfg(feature = "etcd")]
use etcd_client::{GetOptions, PutOptions, WatchOptions};
#[cfg(feature = "etcd")]
use prost::Message;
use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_client::RegistryServiceClient;
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::{Common, Latencies, Target, cpu_time, rss_mib};

const PREFIX: &str = "/bench/";

/// One connection to the target.
#[derive(Clone)]
pub(crate) enum Conn {
    Signpost(RegistryServiceClient<Channel>),
    #[cfg(feature = "etcd")]
    Etcd(etcd_client::Client),
}

pub(crate) async fn connect(target: &Target, n: usize) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        conns.push(match target {
            Target::Signpost(url) => {
                let channel = Endpoint::from_shared(url.clone())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {url}"))?;
                Conn::Signpost(
                    RegistryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
                )
            }
            #[cfg(not(feature = "etcd"))]
            Target::Etcd(_) => bail!("this signpost-bench was built without the `etcd` feature"),
            #[cfg(feature = "etcd")]
            Target::Etcd(url) => Conn::Etcd(
                etcd_client::Client::connect([url.as_str()], None)
                    .await
                    .with_context(|| format!("cannot connect to {url}"))?,
            ),
        });
    }
    Ok(conns)
}

fn instance(service: &str, id: &str) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        id: id.into(),
        address: "10.1.2.3".into(),
        port: 8080,
        tags: vec!["v2".into(), "grpc".into()],
        metadata: [
            ("version".to_string(), "2.4.1".to_string()),
            ("zone".to_string(), "eu-west-1a".to_string()),
        ]
        .into(),
        weight: 100,
        zone: "eu-west-1a".into(),
        ..Default::default()
    }
}

fn key(service: &str, id: &str) -> String {
    format!("{PREFIX}{service}/{id}")
}

impl Conn {
    /// Registers an instance: on Signpost with a ttl (a fresh lease); on etcd a lease grant and
    /// a put on it, as etcd-based registries do. `ttl` 0: persistent.
    pub(crate) async fn register(
        &mut self,
        service: &str,
        id: &str,
        ttl: i64,
    ) -> anyhow::Result<i64> {
        match self {
            Conn::Signpost(c) => {
                let request = pb::RegisterRequest {
                    instance: Some(instance(service, id)),
                    ttl: (ttl > 0).then_some(prost_types::Duration {
                        seconds: ttl,
                        nanos: 0,
                    }),
                    lease_id: 0,
                };
                Ok(c.register(request).await?.into_inner().lease_id as i64)
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => {
                let value = instance(service, id).encode_to_vec();
                if ttl > 0 {
                    let lease = c.lease_grant(ttl, None).await?.id();
                    c.put(
                        key(service, id),
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await?;
                    Ok(lease)
                } else {
                    c.put(key(service, id), value, None).await?;
                    Ok(0)
                }
            }
        }
    }

    /// The instances of a service: Discover, or a prefix range read.
    async fn discover(&mut self, service: &str, linearizable: bool) -> anyhow::Result<usize> {
        match self {
            Conn::Signpost(c) => {
                let request = pb::DiscoverRequest {
                    service: service.into(),
                    ..Default::default()
                };
                Ok(c.discover(request).await?.into_inner().instances.len())
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => {
                let mut options = GetOptions::new().with_prefix();
                if !linearizable {
                    options = options.with_serializable();
                }
                Ok(c.get(format!("{PREFIX}{service}/"), Some(options))
                    .await?
                    .kvs()
                    .len())
            }
        }
    }
}

/// Prints a result line: `name key=value ...`, or one JSON object.
pub(crate) fn report(common: &Common, workload: &str, fields: &[(&str, f64)]) {
    if common.json {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v:.3}"))
            .collect();
        println!(
            "{{\"workload\":\"{workload}\",\"target\":\"{}\",{}}}",
            common.target,
            body.join(",")
        );
    } else {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
        println!("{workload} {}: {}", common.target, body.join(" "));
    }
}

/// Server CPU microseconds per operation over a measured stretch.
pub(crate) struct CpuMeter {
    pid: Option<u32>,
    start: Option<Duration>,
}

impl CpuMeter {
    pub(crate) fn start(pid: Option<u32>) -> Self {
        CpuMeter {
            pid,
            start: cpu_time(pid),
        }
    }

    pub(crate) fn per_op_us(&self, ops: u64) -> f64 {
        match (self.start, cpu_time(self.pid)) {
            (Some(a), Some(b)) if ops > 0 => (b - a).as_secs_f64() * 1e6 / ops as f64,
            _ => 0.0,
        }
    }
}

/// Runs `count` registrations with `clients` concurrent clients; answers per-call latencies.
async fn register_many(
    conns: &[Conn],
    clients: usize,
    count: usize,
    services: usize,
    ttl: i64,
    prefix: &str,
) -> anyhow::Result<Vec<u64>> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|c| {
            let mut conn = conns[c % conns.len()].clone();
            let next = next.clone();
            let prefix = prefix.to_owned();
            let services = services.max(1);
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    let sent = Instant::now();
                    conn.register(&format!("{prefix}{}", n % services), &format!("i-{n}"), ttl)
                        .await?;
                    samples.push(sent.elapsed().as_micros() as u64);
                }
                Ok::<_, anyhow::Error>(samples)
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(count);
    for task in tasks {
        samples.extend(task.await.context("client task")??);
    }
    Ok(samples)
}

pub(crate) async fn register(
    common: Common,
    clients: usize,
    count: usize,
    services: usize,
    ttl: i64,
) -> anyhow::Result<()> {
    let target = Target::parse(&common.target)?;
    let conns = connect(&target, 4).await?;
    let cpu = CpuMeter::start(common.server_pid);
    let started = Instant::now();
    let samples = register_many(&conns, clients, count, services, ttl, "reg-").await?;
    let elapsed = started.elapsed();
    let latencies = Latencies::new(samples);
    report(
        &common,
        "register",
        &[
            ("clients", clients as f64),
            ("count", count as f64),
            ("per_second", count as f64 / elapsed.as_secs_f64()),
            ("p50_ms", latencies.percentile(50.0)),
            ("p99_ms", latencies.percentile(99.0)),
            ("max_ms", latencies.percentile(100.0)),
            ("server_cpu_us", cpu.per_op_us(count as u64)),
        ],
    );
    Ok(())
}

/// A cheap, good-enough random index for picking services.
fn pick(state: &mut u64, n: usize) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state % n.max(1) as u64) as usize
}

async fn discover_load(
    conns: &[Conn],
    services: &[String],
    clients: usize,
    seconds: f64,
    linearizable: bool,
) -> anyhow::Result<(u64, Vec<u64>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let services = Arc::new(services.to_vec());
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|c| {
            let mut conn = conns[c % conns.len()].clone();
            let (stop, services) = (stop.clone(), services.clone());
            tokio::spawn(async move {
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1);
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let service = &services[pick(&mut seed, services.len())];
                    let sent = Instant::now();
                    let found = conn.discover(service, linearizable).await?;
                    samples.push(sent.elapsed().as_micros() as u64);
                    if found == 0 {
                        bail!("{service} came back empty");
                    }
                }
                Ok(samples)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.context("caller")??);
    }
    Ok((samples.len() as u64, samples))
}

pub(crate) async fn discover(
    common: Common,
    services: usize,
    instances: usize,
    clients: usize,
    seconds: f64,
    linearizable: bool,
) -> anyhow::Result<()> {
    let target = Target::parse(&common.target)?;
    let conns = connect(&target, 4).await?;
    register_many(&conns, 16, services * instances, services, 0, "disc-").await?;
    let names: Vec<String> = (0..services).map(|s| format!("disc-{s}")).collect();
    // Warm up, then measure.
    discover_load(&conns, &names, clients, seconds.min(1.0), linearizable).await?;
    let cpu = CpuMeter::start(common.server_pid);
    let started = Instant::now();
    let (calls, samples) = discover_load(&conns, &names, clients, seconds, linearizable).await?;
    let elapsed = started.elapsed();
    let latencies = Latencies::new(samples);
    report(
        &common,
        if linearizable {
            "discover_linearizable"
        } else {
            "discover"
        },
        &[
            ("clients", clients as f64),
            ("instances_per_service", instances as f64),
            ("per_second", calls as f64 / elapsed.as_secs_f64()),
            ("p50_ms", latencies.percentile(50.0)),
            ("p99_ms", latencies.percentile(99.0)),
            ("server_cpu_us", cpu.per_op_us(calls)),
        ],
    );
    Ok(())
}

/// Counts, per change, how many watchers have seen it, and when the last one did.
pub(crate) struct Arrivals {
    counts: Vec<AtomicUsize>,
    done: Mutex<Vec<Option<Instant>>>,
    notify: Notify,
    watchers: usize,
}

impl Arrivals {
    pub(crate) fn new(changes: usize, watchers: usize) -> Arc<Self> {
        Arc::new(Arrivals {
            counts: (0..changes).map(|_| AtomicUsize::new(0)).collect(),
            done: Mutex::new(vec![None; changes]),
            notify: Notify::new(),
            watchers,
        })
    }

    /// A watcher saw instance id `id`; ids of changes look like `PREFIX<n>`.
    pub(crate) async fn saw(&self, id: &str, prefix: &str) {
        if let Some(n) = id
            .strip_prefix(prefix)
            .and_then(|n| n.parse::<usize>().ok())
        {
            self.saw_change(n).await;
        }
    }

    /// How many changes are counted.
    pub(crate) fn changes(&self) -> usize {
        self.counts.len()
    }

    /// A watcher saw change `n`.
    pub(crate) async fn saw_change(&self, n: usize) {
        let Some(count) = self.counts.get(n) else {
            return;
        };
        if count.fetch_add(1, Ordering::AcqRel) + 1 == self.watchers {
            self.done.lock().await[n] = Some(Instant::now());
            self.notify.notify_waiters();
        }
    }

    pub(crate) async fn wait(&self, n: usize) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let notified = self.notify.notified();
            if let Some(at) = self.done.lock().await[n] {
                return Ok(at);
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                bail!(
                    "change {n} reached {} of {} watchers in 30 s",
                    self.counts[n].load(Ordering::Relaxed),
                    self.watchers
                );
            }
        }
    }
}

/// Opens `watchers` watch streams on `service` over `conns`; each reports arrivals. Returns once
/// every stream is established.
pub(crate) async fn open_watchers(
    conns: &[Conn],
    service: &str,
    watchers: usize,
    arrivals: Arc<Arrivals>,
    prefix: &'static str,
) -> anyhow::Result<()> {
    let (ready_tx, mut ready) = mpsc::channel::<anyhow::Result<()>>(watchers.max(1));
    for w in 0..watchers {
        let conn = conns[w % conns.len()].clone();
        let (arrivals, ready, service) = (arrivals.clone(), ready_tx.clone(), service.to_owned());
        tokio::spawn(async move {
            match conn {
                Conn::Signpost(mut c) => {
                    let request = pb::WatchRequest {
                        service,
                        ..Default::default()
                    };
                    let mut stream = match c.watch(request).await {
                        Ok(s) => s.into_inner(),
                        Err(e) => return drop(ready.send(Err(e.into())).await),
                    };
                    let mut first = true;
                    while let Ok(Some(message)) = stream.message().await {
                        if std::mem::take(&mut first) {
                            let _ = ready.send(Ok(())).await;
                        }
                        for event in &message.events {
                            if let Some(i) = &event.instance {
                                arrivals.saw(&i.id, prefix).await;
                            }
                        }
                    }
                }
                #[cfg(feature = "etcd")]
                Conn::Etcd(mut c) => {
                    let options = WatchOptions::new().with_prefix();
                    let mut stream =
                        match c.watch(format!("{PREFIX}{service}/"), Some(options)).await {
                            Ok(s) => s,
                            Err(e) => return drop(ready.send(Err(e.into())).await),
                        };
                    let _ = ready.send(Ok(())).await;
                    while let Ok(Some(message)) = stream.message().await {
                        for event in message.events() {
                            if let Some(kv) = event.kv() {
                                let key = String::from_utf8_lossy(kv.key());
                                let id = key.rsplit('/').next().unwrap_or("");
                                arrivals.saw(id, prefix).await;
                            }
                        }
                    }
                }
            }
        });
    }
    for _ in 0..watchers {
        match ready.recv().await {
            Some(result) => result?,
            None => bail!("a watcher ended before it started"),
        }
    }
    Ok(())
}

pub(crate) async fn watch(
    common: Common,
    watchers: usize,
    changes: usize,
    connections: usize,
) -> anyhow::Result<()> {
    let target = Target::parse(&common.target)?;
    let conns = connect(&target, connections).await?;
    let service = format!("watched-{}", std::process::id());
    let arrivals = Arrivals::new(changes, watchers);
    open_watchers(&conns, &service, watchers, arrivals.clone(), "k").await?;
    let mut writer = conns[0].clone();
    let cpu = CpuMeter::start(common.server_pid);
    let mut samples = Vec::with_capacity(changes);
    for n in 0..changes {
        let sent = Instant::now();
        writer.register(&service, &format!("k{n}"), 0).await?;
        let all = arrivals.wait(n).await?;
        samples.push(all.duration_since(sent).as_micros() as u64);
    }
    let latencies = Latencies::new(samples);
    report(
        &common,
        "watch",
        &[
            ("watchers", watchers as f64),
            ("changes", changes as f64),
            ("p50_ms", latencies.percentile(50.0)),
            ("p99_ms", latencies.percentile(99.0)),
            ("max_ms", latencies.percentile(100.0)),
            ("server_cpu_us_per_change", cpu.per_op_us(changes as u64)),
            ("server_rss_mib", rss_mib(common.server_pid).unwrap_or(0.0)),
        ],
    );
    Ok(())
}

pub(crate) async fn keepalive(
    common: Common,
    leases: usize,
    streams: usize,
    seconds: f64,
) -> anyhow::Result<()> {
    let target = Target::parse(&common.target)?;
    let conns = connect(&target, 4).await?;
    // Each lease carries one instance, so an expiry would be a real loss.
    let mut ids = Vec::with_capacity(leases);
    for n in 0..leases {
        let mut conn = conns[n % conns.len()].clone();
        ids.push(conn.register("ka", &format!("i-{n}"), 30).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let refreshes = Arc::new(AtomicU64::new(0));
    let spurious = Arc::new(AtomicU64::new(0));
    let streams = streams.clamp(1, leases.max(1));
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mine: Vec<i64> = ids.iter().skip(s).step_by(streams).copied().collect();
        let conn = conns[s % conns.len()].clone();
        let (stop, refreshes, spurious) = (stop.clone(), refreshes.clone(), spurious.clone());
        tasks.push(tokio::spawn(async move {
            match conn {
                Conn::Signpost(mut c) => {
                    let (tx, rx) = mpsc::channel(4);
                    let mut answers = c.keep_alive(ReceiverStream::new(rx)).await?.into_inner();
                    'run: loop {
                        for lease in &mine {
                            if stop.load(Ordering::Relaxed) {
                                break 'run;
                            }
                            tx.send(pb::KeepAliveRequest {
                                lease_id: *lease as u64,
                            })
                            .await?;
                            let answer = answers.message().await?.context("stream ended")?;
                            refreshes.fetch_add(1, Ordering::Relaxed);
                            if answer.expired {
                                spurious.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                #[cfg(feature = "etcd")]
                Conn::Etcd(mut c) => {
                    // etcd-client keeps one stream per lease; this task drives its share of them.
                    let mut keepers = Vec::with_capacity(mine.len());
                    for lease in &mine {
                        keepers.push(c.lease_keep_alive(*lease).await?);
                    }
                    'run: loop {
                        for (keeper, answers) in &mut keepers {
                            if stop.load(Ordering::Relaxed) {
                                break 'run;
                            }
                            keeper.keep_alive().await?;
                            let answer = answers.message().await?.context("stream ended")?;
                            refreshes.fetch_add(1, Ordering::Relaxed);
                            if answer.ttl() <= 0 {
                                spurious.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let cpu = CpuMeter::start(common.server_pid);
    let started = Instant::now();
    let before = refreshes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let done = refreshes.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.context("keep-alive task")??;
    }
    // Every instance must still be there.
    let mut conn = conns[0].clone();
    let present = conn.discover("ka", false).await?;
    report(
        &common,
        "keepalive",
        &[
            ("leases", leases as f64),
            ("streams", streams as f64),
            ("per_second", done as f64 / elapsed.as_secs_f64()),
            ("spurious_expiries", spurious.load(Ordering::Relaxed) as f64),
            ("instances_lost", leases.saturating_sub(present) as f64),
            ("server_cpu_us", cpu.per_op_us(done)),
        ],
    );
    Ok(())
}

pub(crate) async fn scale(
    common: Common,
    instances: usize,
    watchers: usize,
    per_service: usize,
) -> anyhow::Result<()> {
    let target = Target::parse(&common.target)?;
    let conns = connect(&target, 8).await?;
    let services = instances.div_ceil(per_service.max(1)).max(1);
    let rss_empty = rss_mib(common.server_pid).unwrap_or(0.0);
    let loading = Instant::now();
    register_many(&conns, 64, instances, services, 600, "scale-").await?;
    let load_seconds = loading.elapsed().as_secs_f64();
    let rss_loaded = rss_mib(common.server_pid).unwrap_or(0.0);

    // Watchers spread evenly over the services; changes go to watched services only.
    let watched = services.min(watchers.max(1));
    let per_watched = watchers / watched;
    let mut arrivals = Vec::with_capacity(watched);
    for s in 0..watched {
        let a = Arrivals::new(5, per_watched.max(1));
        open_watchers(
            &conns,
            &format!("scale-{s}"),
            per_watched.max(1),
            a.clone(),
            "fan",
        )
        .await?;
        arrivals.push(a);
    }
    let rss_watched = rss_mib(common.server_pid).unwrap_or(0.0);

    let names: Vec<String> = (0..services).map(|s| format!("scale-{s}")).collect();
    let (_, samples) = discover_load(&conns, &names, 16, 3.0, false).await?;
    let discover = Latencies::new(samples);

    let mut writer = conns[0].clone();
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut fan = Vec::new();
    for n in 0..50 {
        let s = pick(&mut seed, watched);
        // Each service's Arrivals tracks up to five changes.
        let slot = n % 5;
        if arrivals[s].done.lock().await[slot].is_some() {
            continue;
        }
        let sent = Instant::now();
        writer
            .register(&format!("scale-{s}"), &format!("fan{slot}"), 0)
            .await?;
        let all = arrivals[s].wait(slot).await?;
        fan.push(all.duration_since(sent).as_micros() as u64);
    }
    let fan = Latencies::new(fan);
    report(
        &common,
        "scale",
        &[
            ("instances", instances as f64),
            ("watchers", (per_watched * watched) as f64),
            ("load_seconds", load_seconds),
            ("rss_empty_mib", rss_empty),
            ("rss_loaded_mib", rss_loaded),
            ("rss_with_watchers_mib", rss_watched),
            ("discover_p99_ms", discover.percentile(99.0)),
            ("fanout_p99_ms", fan.percentile(99.0)),
        ],
    );
    Ok(())
}
