//! Workloads of the client crate: calls through its balanced channel against a plain tonic
//! channel and against tonic's own balancer, and how fast a backend's registration and
//! deregistration reach a busy caller.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use signpost_client::{BalancedChannel, Client, EndpointState, RegistrationBuilder};
use signpost_examples::pb::SayHelloRequest;
use signpost_examples::pb::greeter_service_client::GreeterServiceClient;
use signpost_examples::{Greeter, bind};
use tokio::sync::oneshot;
use tonic::codegen::{Body, Bytes, StdError};
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

use crate::Latencies;

/// What a generated client needs of its transport, plus what spawning callers on it needs:
/// tonic's `Channel`, its balanced `Channel` and our `BalancedChannel` all are one.
pub(crate) trait Transport:
    tonic::client::GrpcService<
        tonic::body::Body,
        Future: Send,
        Error: Into<StdError>,
        ResponseBody: Body<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Future: Send,
            Error: Into<StdError>,
            ResponseBody: Body<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A greeter serving on a loopback port, stopped when dropped.
struct Backend {
    greeter: Greeter,
    port: u16,
    _stop: oneshot::Sender<()>,
}

async fn backend(id: &str) -> anyhow::Result<Backend> {
    let (listener, bound) = bind("127.0.0.1", 0).await?;
    let greeter = Greeter::new(id);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(greeter.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    Ok(Backend {
        greeter,
        port: bound.port(),
        _stop: stop,
    })
}

fn registration(service: &str, id: &str, port: u16) -> RegistrationBuilder {
    RegistrationBuilder::new(service)
        .id(id)
        .address("127.0.0.1")
        .port(port)
        .ttl(Duration::from_secs(30))
}

fn endpoint(port: u16) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?.tcp_nodelay(true))
}

/// Calls per second with `callers` concurrent callers on `channel`: counted over `seconds`
/// after a short warm-up, so that connection set-up and the first calls' costs stay out.
async fn rate<T: Transport>(channel: &T, callers: usize, seconds: f64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut greeter = GreeterServiceClient::new(channel.clone());
            let (stop, done) = (stop.clone(), done.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    greeter
                        .say_hello(SayHelloRequest { name: "b".into() })
                        .await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, tonic::Status>(())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64((seconds / 10.0).min(0.5))).await;
    let (started, before) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let calls = done.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.context("caller")?.context("call failed")?;
    }
    Ok(calls as f64 / elapsed.as_secs_f64())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Waits until every one of `ids` is a Ready endpoint of `channel`.
async fn all_ready(channel: &BalancedChannel, ids: &[String]) -> anyhow::Result<()> {
    wait_for(|| {
        let stats = channel.stats();
        ids.iter()
            .all(|id| {
                stats
                    .endpoints
                    .iter()
                    .any(|e| &e.id == id && e.state == EndpointState::Ready)
            })
            .then_some(())
    })
    .await
    .context("the balanced channel did not connect to every backend")
}

pub(crate) async fn balance(
    registry: String,
    callers: usize,
    seconds: f64,
    rounds: usize,
    backends: usize,
    json: bool,
) -> anyhow::Result<()> {
    const SERVICE: &str = "bench-balance";
    let client = Client::new(registry.clone())?;
    let mut servers = Vec::new();
    let mut registrations = Vec::new();
    let mut ids = Vec::new();
    for n in 0..backends.max(1) {
        let id = format!("bench-{n}");
        let server = backend(&id).await?;
        registrations.push(
            client
                .register(registration(SERVICE, &id, server.port))
                .await?,
        );
        servers.push(server);
        ids.push(id);
    }

    // A plain channel to the first backend: the cost of a call with no balancing at all.
    let plain = endpoint(servers[0].port)?.connect().await?;
    let ours = client.channel(SERVICE);
    ours.wait_for_ready(Duration::from_secs(10)).await?;
    all_ready(&ours, &ids).await?;
    // tonic's balancer, fed the same backends by hand.
    let (tonic_balance, changes) = Channel::balance_channel::<String>(16);
    for (id, server) in ids.iter().zip(&servers) {
        changes
            .send(Change::Insert(id.clone(), endpoint(server.port)?))
            .await
            .context("tonic's balancer stopped")?;
    }
    // Its connections are made on the first calls; every backend should have had some before
    // the measured rounds.
    let mut warm = GreeterServiceClient::new(tonic_balance.clone());
    let served_before: Vec<u64> = servers.iter().map(|s| s.greeter.served()).collect();
    let warm_until = Instant::now() + Duration::from_secs(10);
    while servers
        .iter()
        .zip(&served_before)
        .any(|(s, before)| s.greeter.served() == *before)
    {
        if Instant::now() > warm_until {
            bail!("tonic's balancer did not reach every backend within 10s");
        }
        warm.say_hello(SayHelloRequest { name: "w".into() })
            .await
            .context("warm-up call through tonic's balancer")?;
    }

    let rounds = rounds.max(1);
    let (mut plain_rates, mut ours_rates, mut tonic_rates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut vs_plain, mut vs_tonic) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Each round starts with another of the three, so that none is always measured first
        // (or last) on a machine whose load drifts.
        let (mut p, mut o, mut t) = (0.0, 0.0, 0.0);
        for k in 0..3 {
            match (round + k) % 3 {
                0 => p = rate(&plain, callers, seconds).await?,
                1 => o = rate(&ours, callers, seconds).await?,
                _ => t = rate(&tonic_balance, callers, seconds).await?,
            }
        }
        plain_rates.push(p);
        ours_rates.push(o);
        tonic_rates.push(t);
        vs_plain.push(o / p);
        vs_tonic.push(o / t);
    }
    let stats = ours.stats();
    let (p, o, t) = (median(plain_rates), median(ours_rates), median(tonic_rates));
    let (rp, rt) = (median(vs_plain), median(vs_tonic));
    let backends = ids.len();
    if json {
        println!(
            "{{\"workload\":\"balance\",\"target\":\"{registry}\",\"callers\":{callers},\"backends\":{backends},\"rounds\":{rounds},\"plain_per_second\":{p:.0},\"ours_per_second\":{o:.0},\"tonic_balance_per_second\":{t:.0},\"ours_vs_plain\":{rp:.3},\"ours_vs_tonic_balance\":{rt:.3},\"ours_retries\":{},\"ours_unavailable\":{}}}",
            stats.retries, stats.unavailable
        );
    } else {
        println!(
            "balance callers={callers} backends={backends}: plain {p:.0}/s, ours {o:.0}/s, tonic balance_channel {t:.0}/s; ours/plain {rp:.3}, ours/tonic {rt:.3} (median of {rounds} rounds); ours retried {} and failed {} calls itself",
            stats.retries, stats.unavailable
        );
    }
    drop(registrations);
    Ok(())
}

pub(crate) async fn propagation(registry: String, rounds: usize, json: bool) -> anyhow::Result<()> {
    const SERVICE: &str = "bench-propagation";
    let client = Client::new(registry.clone())?;
    let base = backend("base").await?;
    let _base = client
        .register(registration(SERVICE, "base", base.port))
        .await?;
    let balanced = client.channel(SERVICE);
    balanced.wait_for_ready(Duration::from_secs(10)).await?;

    // Busy callers, so that a backend's first and last calls follow the channel's view closely.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    for _ in 0..4 {
        let mut greeter = GreeterServiceClient::new(balanced.clone());
        let (stop, failures) = (stop.clone(), failures.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if greeter
                    .say_hello(SayHelloRequest { name: "p".into() })
                    .await
                    .is_err()
                {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        let id = format!("p{round}");
        let server = backend(&id).await?;
        let started = Instant::now();
        let registration = client
            .register(registration(SERVICE, &id, server.port))
            .await?;
        let first = wait_for(|| server.greeter.first_call()).await?;
        added.push(first.saturating_duration_since(started).as_micros() as u64);

        let leaving = Instant::now();
        registration.deregister().await?;
        // The channel publishes its view after its endpoints have the change, so once the
        // instance is gone from `instances()` no new call goes to it.
        wait_for(|| (!balanced.instances().iter().any(|i| i.id == id)).then_some(())).await?;
        // Calls dispatched before the removal may still land; give them time to.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let last = server.greeter.last_call().unwrap_or(leaving);
        removed.push(last.saturating_duration_since(leaving).as_micros() as u64);
    }
    stop.store(true, Ordering::Relaxed);
    let (added, removed) = (Latencies::new(added), Latencies::new(removed));
    let failed = failures.load(Ordering::Relaxed);
    if json {
        println!(
            "{{\"workload\":\"propagation\",\"target\":\"{registry}\",\"rounds\":{rounds},\"register_to_first_p50_ms\":{:.3},\"register_to_first_p99_ms\":{:.3},\"deregister_to_last_p50_ms\":{:.3},\"deregister_to_last_p99_ms\":{:.3},\"failed_calls\":{failed}}}",
            added.percentile(50.0),
            added.percentile(99.0),
            removed.percentile(50.0),
            removed.percentile(99.0)
        );
    } else {
        println!(
            "propagation rounds={rounds}: register->first routed call p50={:.2}ms p99={:.2}ms; deregister->last routed call p50={:.2}ms p99={:.2}ms; failed calls {failed}",
            added.percentile(50.0),
            added.percentile(99.0),
            removed.percentile(50.0),
            removed.percentile(99.0)
        );
    }
    Ok(())
}

pub(crate) async fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("condition not reached within 10s");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}
