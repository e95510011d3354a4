//! `signpost-bench`: a load generator for Signpost's discovery workloads.
//!
//! Each workload is defined once and run against a target URL; the summary is one line of text
//! (or JSON with `--json`) that `bench/compare.sh` collects into `docs/benchmarks.md`.
//!
//! Workloads: `register` — C concurrent clients register N instances over S services with a ttl,
//! each on its own lease; reports throughput and latency percentiles. `balance` — calls per second
//! through the client crate's balanced channel against a plain channel to the same backend.
//! `propagation` — how long a new backend waits for its first routed call, and how long a
//! deregistered one keeps getting calls.

mod balance;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_client::RegistryServiceClient;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(name = "signpost-bench", about = "Load generator for Signpost")]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// Concurrent registrations, each with its own lease.
    Register(RegisterArgs),
    /// Calls per second through a balanced channel against a plain channel to the same backend.
    Balance {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 32)]
        callers: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
    /// Time from a backend's Register to its first routed call, and from its Deregister to its
    /// last, with callers busy on a balanced channel.
    Propagation {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct RegisterArgs {
    /// signpost://HOST:PORT
    #[arg(long)]
    target: String,
    /// Concurrent clients (each sends one request at a time).
    #[arg(long, short = 'c', default_value_t = 64)]
    clients: usize,
    /// Instances to register in all.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    count: usize,
    /// Services the instances are spread over.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Lease ttl in seconds.
    #[arg(long, default_value_t = 60)]
    ttl: i64,
    /// Connections the clients are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug)]
enum Target {
    Signpost(String),
}

fn parse_target(target: &str) -> anyhow::Result<Target> {
    match target.split_once("://") {
        Some(("signpost", addr)) => Ok(Target::Signpost(format!("http://{addr}"))),
        _ => bail!("target {target:?} is not of the form signpost://HOST:PORT"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().workload {
        Workload::Register(args) => register(args).await,
        Workload::Balance {
            target,
            callers,
            seconds,
            rounds,
            json,
        } => {
            let Target::Signpost(url) = parse_target(&target)?;
            balance::balance(url, callers, seconds, rounds, json).await
        }
        Workload::Propagation {
            target,
            rounds,
            json,
        } => {
            let Target::Signpost(url) = parse_target(&target)?;
            balance::propagation(url, rounds, json).await
        }
    }
}

async fn channels(url: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let channel = Endpoint::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        out.push(channel);
    }
    Ok(out)
}

/// Latencies in microseconds, sorted; percentiles by nearest rank.
struct Latencies(Vec<u64>);

impl Latencies {
    fn new(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        Latencies(samples)
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1] as f64 / 1000.0
    }
}

async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let Target::Signpost(url) = parse_target(&args.target)?;
    let channels = channels(&url, args.connections).await?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients.max(1))
        .map(|c| {
            let mut client = RegistryServiceClient::new(channels[c % channels.len()].clone());
            let next = next.clone();
            let (count, services, ttl) = (args.count, args.services.max(1), args.ttl);
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    let request = pb::RegisterRequest {
                        instance: Some(pb::Instance {
                            service: format!("svc-{}", n % services),
                            id: format!("i-{n}"),
                            address: "10.0.0.1".into(),
                            port: 8080,
                            ..Default::default()
                        }),
                        ttl: Some(prost_types::Duration {
                            seconds: ttl,
                            nanos: 0,
                        }),
                        lease_id: 0,
                    };
                    let sent = Instant::now();
                    client.register(request).await?;
                    samples.push(sent.elapsed().as_micros() as u64);
                }
                Ok::<_, tonic::Status>(samples)
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(args.count);
    for task in tasks {
        samples.extend(
            task.await
                .context("client task")?
                .context("register failed")?,
        );
    }
    let elapsed = started.elapsed();
    report(&args, elapsed, Latencies::new(samples));
    Ok(())
}

fn report(args: &RegisterArgs, elapsed: Duration, latencies: Latencies) {
    let rate = args.count as f64 / elapsed.as_secs_f64();
    let (p50, p99, max) = (
        latencies.percentile(50.0),
        latencies.percentile(99.0),
        latencies.percentile(100.0),
    );
    if args.json {
        println!(
            "{{\"workload\":\"register\",\"target\":\"{}\",\"clients\":{},\"count\":{},\"per_second\":{rate:.0},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"max_ms\":{max:.3}}}",
            args.target, args.clients, args.count
        );
    } else {
        println!(
            "register {} clients={} count={}: {rate:.0}/s p50={p50:.2}ms p99={p99:.2}ms max={max:.2}ms",
            args.target, args.clients, args.count
        );
    }
}
