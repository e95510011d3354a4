//! `signpost-bench`: a load generator for service-discovery workloads, defined once and run
//! against Signpost (`signpost://HOST:PORT`) or against etcd used as a registry the way people do
//! today (`etcd://HOST:PORT`: a lease per instance, a key per instance under a prefix, prefix range
//! reads and prefix watches).
//!
//! Each run prints one line (or one JSON object with `--json`) that `bench/compare.sh` collects
//! into `docs/benchmarks.md`. With `--server-pid`, the server's CPU time per request (from /proc)
//! and its memory are reported beside throughput, because on one small machine the load generator
//! competes with the server for the same cores.
//!
//! `failover` starts `greeter-server` processes (and, without `--target`, a registry) and kills
//! them on every way out, a signal included.
//!
//! `http-backend` is the instance behind the gateway benchmark (hyper, as in the gateway).
//!
//! `xds-fanout`'s thousands of ADS and Watch subscribers speak gRPC straight over `h2`
//! (`grpc_h2`), with no task or channel per stream besides their own, so that the generator
//! stays lighter than the server it measures.
//!
//! `etcd-client` is the etcd v3 client the comparison needs (it shares tonic with Signpost);
//! `mimalloc` keeps the generator's own allocations cheap; `rustix` is a safe `prctl` (the
//! workspace forbids `unsafe`), to keep the generator off transparent huge pages.

mod backend;
mod balance;
mod failover;
mod grpc_h2;
mod process;
mod workloads;
mod xds;

/// The same allocator as the server: decoding answers allocates as much as building them did,
/// and the generator should be the last thing to run out of CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "signpost-bench",
    about = "Load generator for Signpost and etcd"
)]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

/// What every workload takes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Common {
    /// signpost://HOST:PORT or etcd://HOST:PORT
    #[arg(long)]
    pub target: String,
    /// The server's process id, to report its CPU time per request and its memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// C concurrent clients register N instances over S services, each on its own lease.
    Register {
        #[command(flatten)]
        common: Common,
        #[arg(long, short = 'c', default_value_t = 64)]
        clients: usize,
        #[arg(long, short = 'n', default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        services: usize,
        /// Lease ttl in seconds.
        #[arg(long, default_value_t = 60)]
        ttl: i64,
    },
    /// S services of I instances each; C concurrent Discover calls on random services.
    Discover {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10)]
        services: usize,
        #[arg(long, default_value_t = 100)]
        instances: usize,
        #[arg(long, short = 'c', default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// etcd only: linearizable reads instead of serializable ones.
        #[arg(long)]
        linearizable: bool,
    },
    /// W watch streams on one service; for each of K changes, the time from sending the write to
    /// the moment all W watchers have it.
    Watch {
        #[command(flatten)]
        common: Common,
        #[arg(long, short = 'w', default_value_t = 1_000)]
        watchers: usize,
        #[arg(long, short = 'k', default_value_t = 100)]
        changes: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
    },
    /// L leases refreshed as fast as S streams can, for a while; refreshes per second and
    /// expiries that should not have happened.
    Keepalive {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1_000)]
        leases: usize,
        #[arg(long, default_value_t = 64)]
        streams: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Load N instances (each on its own lease) and W watch streams, then report the server's
    /// memory, Discover p99 and watch fan-out p99.
    Scale {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100_000)]
        instances: usize,
        #[arg(long, default_value_t = 10_000)]
        watchers: usize,
        /// Instances per service.
        #[arg(long, default_value_t = 100)]
        per_service: usize,
    },
    /// Calls per second through the client crate's balanced channel, through a plain tonic
    /// channel to the first backend, and through tonic's `balance_channel` over the same
    /// backends, in turn, in the same run.
    Balance {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 32)]
        callers: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Greeter backends (in this process) behind the balanced channels.
        #[arg(long, default_value_t = 1)]
        backends: usize,
    },
    /// Callers on three greeter-server processes, one of which is killed with SIGKILL: failed
    /// calls, calls in flight on it, and how long calls kept going to it, through the client
    /// crate's balanced channel and through tonic's `balance_channel` fed by the same watch.
    Failover {
        /// signpost://HOST:PORT; without it, a registry (the `signpost` binary) is started.
        #[arg(long)]
        target: Option<String>,
        /// The greeter-server binary; default: next to this one, or under
        /// $CARGO_TARGET_DIR/release (target/release).
        #[arg(long)]
        greeter_server: Option<PathBuf>,
        /// The signpost binary, when no --target is given; found like greeter-server.
        #[arg(long)]
        signpost: Option<PathBuf>,
        #[arg(long, short = 'c', default_value_t = 32)]
        callers: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The greeters' lease ttl: how long the registry keeps a killed one.
        #[arg(long, default_value_t = 2)]
        ttl_secs: u64,
        /// Seconds of calls before the kill.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long)]
        json: bool,
    },
    /// An HTTP/1.1 and h2c backend for the gateway benchmark; prints `serving on PORT`.
    HttpBackend {
        /// 0 for any free port.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// What every answer says.
        #[arg(long, default_value = "backend")]
        id: String,
    },
    /// S ADS streams subscribed to one service's endpoints and S Watch streams on another; for
    /// each of K changes to each, the time from the write to the moment all S have it.
    XdsFanout {
        #[command(flatten)]
        common: Common,
        #[arg(long, short = 's', default_value_t = 1_000)]
        subscribers: usize,
        #[arg(long, short = 'k', default_value_t = 100)]
        changes: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
    },
    /// Time from a greeter's registration to the first call a Python grpcio xDS client
    /// (`caller.py`, run with python3) routes to it.
    XdsFirstCall {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        #[arg(long, default_value = "examples/tests/xds/caller.py")]
        caller: PathBuf,
        #[arg(long, default_value = "examples/proto")]
        proto_dir: PathBuf,
    },
    /// Time from a backend's Register to its first routed call, and from its Deregister to its
    /// last, with callers busy on a balanced channel.
    Propagation {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        rounds: usize,
    },
}

/// Where the load goes.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) enum Target {
    Signpost(String),
    Etcd(String),
}

impl Target {
    pub(crate) fn parse(target: &str) -> anyhow::Result<Target> {
        match target.split_once("://") {
            Some(("signpost", addr)) => Ok(Target::Signpost(format!("http://{addr}"))),
            Some(("etcd", addr)) => Ok(Target::Etcd(format!("http://{addr}"))),
            _ => bail!("target {target:?} is not signpost://HOST:PORT or etcd://HOST:PORT"),
        }
    }
}

/// Latencies in microseconds, sorted; percentiles by nearest rank.
pub(crate) struct Latencies(Vec<u64>);

impl Latencies {
    pub(crate) fn new(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        Latencies(samples)
    }

    /// In milliseconds.
    pub(crate) fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1] as f64 / 1000.0
    }
}

/// A process's CPU time so far (user + system), from /proc; Linux counts it in 1/100 s.
pub(crate) fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// A process's resident memory in MiB, from /proc.
pub(crate) fn rss_mib(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let workload = Cli::parse().workload;
    // On SIGINT or SIGTERM the workload is dropped, and with it every child process it started
    // (they are killed on drop); dying of the signal would leave them running.
    tokio::select! {
        result = run(workload) => result,
        signal = interrupted() => bail!("stopped by {}", signal?),
    }
}

/// Turns transparent huge pages off for this process. mimalloc asks for them on the regions it
/// maps, and a heap that grows by a huge page has the kernel zero 2 MiB at the fault: when a
/// thousand streams' buffers grew at once (the fan-out's endpoint sets crossing a size), the
/// generator stood still for 50–80 ms while the server waited on it, and those were the slowest
/// changes measured. Small pages are zeroed as they are touched. For `xds-fanout` alone: the
/// setting is inherited by the processes other workloads start (registries, greeters, Python),
/// whose conditions it would change.
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("signpost-bench: transparent huge pages stay on: {e}");
    }
}

async fn interrupted() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

async fn run(workload: Workload) -> anyhow::Result<()> {
    match workload {
        Workload::HttpBackend { port, id } => backend::serve(port, id).await,
        Workload::Register {
            common,
            clients,
            count,
            services,
            ttl,
        } => workloads::register(common, clients, count, services, ttl).await,
        Workload::Discover {
            common,
            services,
            instances,
            clients,
            seconds,
            linearizable,
        } => workloads::discover(common, services, instances, clients, seconds, linearizable).await,
        Workload::Watch {
            common,
            watchers,
            changes,
            connections,
        } => workloads::watch(common, watchers, changes, connections).await,
        Workload::Keepalive {
            common,
            leases,
            streams,
            seconds,
        } => workloads::keepalive(common, leases, streams, seconds).await,
        Workload::Scale {
            common,
            instances,
            watchers,
            per_service,
        } => workloads::scale(common, instances, watchers, per_service).await,
        Workload::Balance {
            common,
            callers,
            seconds,
            rounds,
            backends,
        } => {
            let Target::Signpost(url) = Target::parse(&common.target)? else {
                bail!("balance runs against a signpost:// target");
            };
            balance::balance(url, callers, seconds, rounds, backends, common.json).await
        }
        Workload::Failover {
            target,
            greeter_server,
            signpost,
            callers,
            rounds,
            ttl_secs,
            warmup,
            json,
        } => {
            let registry = match target.as_deref().map(Target::parse).transpose()? {
                None => None,
                Some(Target::Signpost(url)) => Some(url),
                Some(Target::Etcd(_)) => bail!("failover runs against a signpost:// target"),
            };
            failover::failover(failover::Settings {
                registry,
                greeter_server,
                signpost,
                callers,
                rounds,
                ttl_secs: ttl_secs.max(1),
                warmup: Duration::from_secs_f64(warmup.max(0.0)),
                json,
            })
            .await
        }
        Workload::XdsFanout {
            common,
            subscribers,
            changes,
            connections,
        } => {
            without_huge_pages();
            xds::fanout(common, subscribers, changes, connections).await
        }
        Workload::XdsFirstCall {
            common,
            rounds,
            caller,
            proto_dir,
        } => xds::first_call(common, rounds, caller, proto_dir).await,
        Workload::Propagation { common, rounds } => {
            let Target::Signpost(url) = Target::parse(&common.target)? else {
                bail!("propagation runs against a signpost:// target");
            };
            balance::propagation(url, rounds, common.json).await
        }
    }
}
