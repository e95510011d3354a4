//! Workloads of the client crate: calls through a balanced channel against a plain channel, and
//! how fast a backend's registration and deregistration reach a busy caller.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use signpost_client::{Client, RegistrationBuilder};
use signpost_examples::pb::SayHelloRequest;
use signpost_examples::pb::greeter_service_client::GreeterServiceClient;
use signpost_examples::{Greeter, bind};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

use crate::Latencies;

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

/// Calls per second over `seconds` with `callers` concurrent callers on `channel`.
async fn rate(channel: &Channel, callers: usize, seconds: f64) -> anyhow::Result<f64> {
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
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let calls = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    for task in tasks {
        task.await.context("caller")?.context("call failed")?;
    }
    Ok(calls as f64 / elapsed.as_secs_f64())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) async fn balance(
    registry: String,
    callers: usize,
    seconds: f64,
    rounds: usize,
    json: bool,
) -> anyhow::Result<()> {
    let client = Client::new(registry.clone())?;
    let server = backend("bench-1").await?;
    let _registration = client
        .register(registration("bench-balance", "bench-1", server.port))
        .await?;
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", server.port))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let balanced = client.channel("bench-balance");
    balanced.wait_for_ready(Duration::from_secs(10)).await?;
    let balanced = balanced.channel();

    let (mut plain_rates, mut balanced_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let p = rate(&plain, callers, seconds).await?;
        let b = rate(&balanced, callers, seconds).await?;
        plain_rates.push(p);
        balanced_rates.push(b);
        ratios.push(b / p);
    }
    let (p, b, r) = (median(plain_rates), median(balanced_rates), median(ratios));
    if json {
        println!(
            "{{\"workload\":\"balance\",\"target\":\"{registry}\",\"callers\":{callers},\"plain_per_second\":{p:.0},\"balanced_per_second\":{b:.0},\"ratio\":{r:.3}}}"
        );
    } else {
        println!(
            "balance callers={callers}: plain {p:.0}/s, balanced {b:.0}/s, ratio {r:.3} (median of {rounds} rounds)"
        );
    }
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
        let mut greeter = GreeterServiceClient::new(balanced.channel());
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

async fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
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
