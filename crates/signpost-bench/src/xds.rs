//! The xDS workloads: push fan-out to ADS subscribers against Watch fan-out to as many watchers
//! in the same run, and the time from a registration to the first call a real gRPC xDS client
//! (Python grpcio) routes to the new instance.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prost::bytes::Bytes;
use signpost_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::grpc_h2;
use crate::workloads::{Arrivals, connect, report};
use crate::{Common, Latencies, Target, cpu_time};

/// Each endpoint hostname (the instance id) in an encoded ClusterLoadAssignment, as bytes.
/// The generator reads nothing else and copies nothing: a thousand streams each decoding a whole
/// endpoint set per change would make the generator, not the server, what is measured.
fn hostnames(cla: &[u8], mut each: impl FnMut(&[u8])) {
    // ClusterLoadAssignment.endpoints (2) → LocalityLbEndpoints.lb_endpoints (2) →
    // LbEndpoint.endpoint (1) → Endpoint.hostname (3).
    for locality in fields(cla, 2) {
        for lb in fields(locality, 2) {
            for endpoint in fields(lb, 1) {
                fields(endpoint, 3).for_each(&mut each);
            }
        }
    }
}

/// The length-delimited fields numbered `tag` of an encoded message; stops at bytes it cannot
/// read.
fn fields(mut message: &[u8], tag: u64) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        while !message.is_empty() {
            let key = prost::encoding::decode_varint(&mut message).ok()?;
            let len = match key & 7 {
                0 => {
                    prost::encoding::decode_varint(&mut message).ok()?;
                    continue;
                }
                1 => 8,
                5 => 4,
                2 => usize::try_from(prost::encoding::decode_varint(&mut message).ok()?).ok()?,
                _ => return None,
            };
            let (field, rest) = message.split_at_checked(len)?;
            message = rest;
            if key >> 3 == tag && key & 7 == 2 {
                return Some(field);
            }
        }
        None
    })
}

/// The changes (instance ids `PREFIX<n>`) in each endpoint set pushed, read once per set:
/// every stream that follows the service is sent the same bytes for a version, and a thousand
/// streams each reading a hundred endpoints per change would make the generator, not the
/// server, what is measured. Sets are told apart by their bytes, not by anything the server
/// says about them.
#[derive(Default)]
struct Contents {
    recent: std::sync::Mutex<VecDeque<(Bytes, Arc<[usize]>)>>,
}

impl Contents {
    /// The most recent sets kept: the versions streams are receiving at one time.
    const KEEP: usize = 4;

    fn changes(&self, resources: &[Bytes], prefix: &str) -> Arc<[usize]> {
        let read = || -> Arc<[usize]> {
            let mut changes = Vec::new();
            // Any.value (2) is the ClusterLoadAssignment.
            for cla in resources.iter().filter_map(|any| fields(any, 2).next()) {
                hostnames(cla, |id| {
                    if let Some(n) = std::str::from_utf8(id)
                        .ok()
                        .and_then(|id| id.strip_prefix(prefix))
                        .and_then(|n| n.parse::<usize>().ok())
                    {
                        changes.push(n);
                    }
                });
            }
            changes.into()
        };
        let [resource] = resources else {
            return read();
        };
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, changes)) = recent.iter().find(|(bytes, _)| bytes == resource) {
            return changes.clone();
        }
        let changes = read();
        if recent.len() == Self::KEEP {
            recent.pop_front();
        }
        recent.push_back((resource.clone(), changes.clone()));
        changes
    }
}

const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

const STREAM_AGGREGATED_RESOURCES: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

const WATCH: &str = "/signpost.v1.RegistryService/Watch";

/// The fields of a `DiscoveryResponse` a subscriber reads, each resource left as the bytes of
/// its encoded `Any` (cut from the received buffer, not copied): a thousand streams each decoding
/// every endpoint set into its own `Any` values would measure the generator.
#[derive(Clone, PartialEq, prost::Message)]
struct Pushed {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    resources: Vec<Bytes>,
    #[prost(string, tag = "5")]
    nonce: String,
}

/// What ADS subscribers count: each change as it reaches them, and again once they have sent
/// its ACK (handed it to h2, which writes it soon after): the next change is timed after that
/// and a pause ([`settle`]), in which the server reads the ACKs.
#[derive(Clone)]
struct Pushes {
    saw: Arc<Arrivals>,
    acked: Arc<Arrivals>,
}

/// Opens `subscribers` ADS streams over `conns`, each subscribed to the endpoints of
/// `service`; each instance id new to a stream counts as an arrival there. Returns once every
/// stream has had its first answer.
async fn open_subscribers(
    conns: &[grpc_h2::Connection],
    service: &str,
    subscribers: usize,
    arrivals: Pushes,
    prefix: &'static str,
) -> anyhow::Result<()> {
    let (ready_tx, mut ready) = mpsc::channel::<anyhow::Result<()>>(subscribers.max(1));
    let name = format!("default/{service}");
    let contents = Arc::new(Contents::default());
    for s in 0..subscribers {
        let conn = conns[s % conns.len()].clone();
        let (arrivals, ready, name) = (arrivals.clone(), ready_tx.clone(), name.clone());
        let contents = contents.clone();
        tokio::spawn(async move {
            let ask = |version: String, nonce: String| {
                grpc_h2::frame(&DiscoveryRequest {
                    type_url: ENDPOINTS.into(),
                    resource_names: vec![name.clone()],
                    version_info: version,
                    response_nonce: nonce,
                    ..DiscoveryRequest::default()
                })
            };
            let first = ask(String::new(), String::new());
            let mut stream = match conn.stream(STREAM_AGGREGATED_RESOURCES, first, false).await {
                Ok(s) => s,
                Err(e) => return drop(ready.send(Err(e)).await),
            };
            // Which changes (instance ids `PREFIX<n>`) this stream has seen.
            let mut seen = vec![false; arrivals.saw.changes()];
            let mut first = true;
            let ended = loop {
                let response: Pushed = match stream.next().await {
                    Ok(response) => response,
                    Err(e) => break e,
                };
                if std::mem::take(&mut first) {
                    let _ = ready.send(Ok(())).await;
                }
                let mut new = Vec::new();
                for &n in contents.changes(&response.resources, prefix).iter() {
                    if let Some(seen) = seen.get_mut(n)
                        && !std::mem::replace(seen, true)
                    {
                        new.push(n);
                    }
                }
                for &n in &new {
                    arrivals.saw.saw_change(n).await;
                }
                // The endpoints are the client's once decoded: the ACK follows.
                if let Err(e) = stream.send(ask(response.version_info, response.nonce)) {
                    break e;
                }
                for n in new {
                    arrivals.acked.saw_change(n).await;
                }
            };
            ended_early(first, ended, &ready).await;
        });
    }
    drop(ready_tx);
    all_ready(&mut ready, subscribers, "an ADS stream").await
}

/// Opens `watchers` Watch streams on `service` over `conns`, with the same client as the ADS
/// subscribers; each instance id in an event counts as an arrival. Returns once every stream
/// has had its first answer.
async fn open_watchers(
    conns: &[grpc_h2::Connection],
    service: &str,
    watchers: usize,
    arrivals: Arc<Arrivals>,
    prefix: &'static str,
) -> anyhow::Result<()> {
    let (ready_tx, mut ready) = mpsc::channel::<anyhow::Result<()>>(watchers.max(1));
    let request = grpc_h2::frame(&pb::WatchRequest {
        service: service.to_owned(),
        ..Default::default()
    });
    for w in 0..watchers {
        let conn = conns[w % conns.len()].clone();
        let (arrivals, ready, request) = (arrivals.clone(), ready_tx.clone(), request.clone());
        tokio::spawn(async move {
            let mut stream = match conn.stream(WATCH, request, true).await {
                Ok(s) => s,
                Err(e) => return drop(ready.send(Err(e)).await),
            };
            let mut first = true;
            let ended = loop {
                let message: pb::WatchResponse = match stream.next().await {
                    Ok(message) => message,
                    Err(e) => break e,
                };
                if std::mem::take(&mut first) {
                    let _ = ready.send(Ok(())).await;
                }
                for event in &message.events {
                    if let Some(i) = &event.instance {
                        arrivals.saw(&i.id, prefix).await;
                    }
                }
            };
            ended_early(first, ended, &ready).await;
        });
    }
    drop(ready_tx);
    all_ready(&mut ready, watchers, "a Watch stream").await
}

/// Waits for `n` subscribers to have had their first answer, or for the first that failed.
async fn all_ready(
    ready: &mut mpsc::Receiver<anyhow::Result<()>>,
    n: usize,
    what: &str,
) -> anyhow::Result<()> {
    for _ in 0..n {
        ready
            .recv()
            .await
            .with_context(|| format!("{what} ended before its first answer"))??;
    }
    Ok(())
}

/// A subscriber's stream ended: before its first answer, the opening fails with why; after
/// it, why is said here (the change it misses then fails its wait, naming how many saw it).
async fn ended_early(
    before_first: bool,
    why: anyhow::Error,
    ready: &mpsc::Sender<anyhow::Result<()>>,
) {
    if before_first {
        let _ = ready.send(Err(why)).await;
    } else {
        eprintln!("signpost-bench: a subscriber's stream ended: {why:#}");
    }
}

/// A pause after each timed change, so that the next is not timed while the server (or this
/// generator) still works on the last: an ADS change's ACKs, read after its push has reached
/// every stream, would otherwise land on the Watch change that follows.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// W Watch streams on one service and W ADS streams on another; each change goes to one
/// service and then the other, so both are measured under the same conditions.
pub(crate) async fn fanout(
    common: Common,
    subscribers: usize,
    changes: usize,
    connections: usize,
) -> anyhow::Result<()> {
    let target = Target::parse(&common.target)?;
    let Target::Signpost(url) = &target else {
        bail!("xds-fanout runs against a signpost:// target");
    };
    let mut writer = connect(&target, 1)
        .await?
        .pop()
        .context("no connection to write on")?;
    let (mut watch_conns, mut xds_conns) = (Vec::new(), Vec::new());
    for _ in 0..connections.max(1) {
        watch_conns.push(grpc_h2::Connection::open(url).await?);
        xds_conns.push(grpc_h2::Connection::open(url).await?);
    }
    let run = std::process::id();
    let (watched, pushed) = (format!("fan-watch-{run}"), format!("fan-xds-{run}"));
    let watch_arrivals = Arrivals::new(changes, subscribers);
    let xds_arrivals = Pushes {
        saw: Arrivals::new(changes, subscribers),
        acked: Arrivals::new(changes, subscribers),
    };
    open_watchers(
        &watch_conns,
        &watched,
        subscribers,
        watch_arrivals.clone(),
        "w",
    )
    .await?;
    open_subscribers(&xds_conns, &pushed, subscribers, xds_arrivals.clone(), "x").await?;
    let (mut watch, mut xds) = (Vec::with_capacity(changes), Vec::with_capacity(changes));
    // CPU time spent on each kind of change, summed over the interleaved stretches: the
    // server's, and this generator's own (which should not be what limits the push).
    let (mut watch_cpu, mut xds_cpu) = (Duration::ZERO, Duration::ZERO);
    let (mut watch_own, mut xds_own) = (Duration::ZERO, Duration::ZERO);
    let cpu = || cpu_time(common.server_pid).unwrap_or_default();
    let own = || cpu_time(Some(std::process::id())).unwrap_or_default();
    // Each change's CPU is counted to the end of the pause after it, which takes in what the
    // server does after the change has reached everyone (reading ADS ACKs).
    for n in 0..changes {
        let (sent, before, own_before) = (Instant::now(), cpu(), own());
        writer.register(&watched, &format!("w{n}"), 0).await?;
        watch.push(
            watch_arrivals
                .wait(n)
                .await?
                .duration_since(sent)
                .as_micros() as u64,
        );
        settle().await;
        let (sent, between, own_between) = (Instant::now(), cpu(), own());
        writer.register(&pushed, &format!("x{n}"), 0).await?;
        let reached = xds_arrivals.saw.wait(n).await?;
        xds.push(reached.duration_since(sent).as_micros() as u64);
        xds_arrivals.acked.wait(n).await?;
        settle().await;
        watch_cpu += between.saturating_sub(before);
        xds_cpu += cpu().saturating_sub(between);
        watch_own += own_between.saturating_sub(own_before);
        xds_own += own().saturating_sub(own_between);
    }
    let per_change = |d: Duration| d.as_secs_f64() * 1e6 / changes.max(1) as f64;
    let (watch, xds) = (Latencies::new(watch), Latencies::new(xds));
    report(
        &common,
        "xds-fanout",
        &[
            ("subscribers", subscribers as f64),
            ("changes", changes as f64),
            ("watch_p50_ms", watch.percentile(50.0)),
            ("watch_p99_ms", watch.percentile(99.0)),
            ("xds_p50_ms", xds.percentile(50.0)),
            ("xds_p99_ms", xds.percentile(99.0)),
            (
                "xds_vs_watch_p99",
                xds.percentile(99.0) / watch.percentile(99.0).max(f64::MIN_POSITIVE),
            ),
            ("server_cpu_us_per_watch_change", per_change(watch_cpu)),
            ("server_cpu_us_per_xds_change", per_change(xds_cpu)),
            ("client_cpu_us_per_watch_change", per_change(watch_own)),
            ("client_cpu_us_per_xds_change", per_change(xds_own)),
        ],
    );
    Ok(())
}

/// A greeter in this process, registered as `id`, until dropped.
struct Greeter {
    _registration: signpost_client::Registration,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Greeter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn greeter(client: &signpost_client::Client, id: &str) -> anyhow::Result<Greeter> {
    let (listener, bound) = signpost_examples::bind("127.0.0.1", 0).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(signpost_examples::Greeter::new(id).serve(listener, async {
        let _ = stopped.await;
    }));
    let registration = client
        .register(
            signpost_client::RegistrationBuilder::new("xds-first-call")
                .id(id)
                .address("127.0.0.1")
                .port(bound.port())
                .ttl(Duration::from_secs(10)),
        )
        .await?;
    Ok(Greeter {
        _registration: registration,
        stop: Some(stop),
    })
}

/// Rounds of: register a new greeter, wait for the first call the Python xDS caller routes to
/// it, deregister it. One greeter stays registered throughout, so calls flow all the time.
pub(crate) async fn first_call(
    common: Common,
    rounds: usize,
    caller: PathBuf,
    proto_dir: PathBuf,
) -> anyhow::Result<()> {
    let Target::Signpost(url) = Target::parse(&common.target)? else {
        bail!("xds-first-call runs against a signpost:// target");
    };
    let authority = url
        .strip_prefix("http://")
        .context("xds-first-call needs a plaintext http:// registry")?;
    let client = signpost_client::Client::builder()
        .registry(url.clone())
        .build()?;
    let _steady = greeter(&client, "steady").await?;
    let bootstrap = tempfile_path("signpost-xds-bootstrap.json");
    std::fs::write(
        &bootstrap,
        format!(
            r#"{{"xds_servers":[{{"server_uri":"{authority}","channel_creds":[{{"type":"insecure"}}],"server_features":["xds_v3"]}}],"node":{{"id":"bench","locality":{{}}}}}}"#
        ),
    )?;
    let mut child = tokio::process::Command::new("python3")
        .arg(&caller)
        .args(["--target", "xds:///xds-first-call", "--pause-ms", "1"])
        .arg("--proto-dir")
        .arg(&proto_dir)
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run python3 {}", caller.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let mut next_line = async || -> anyhow::Result<String> {
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("the xDS caller ended"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("the xDS caller printed nothing for 30 s"),
        }
    };
    // Calls flowing to the steady greeter first.
    while next_line().await? != "ok steady" {}
    let mut samples = Vec::with_capacity(rounds);
    for n in 0..rounds {
        let id = format!("new-{n}");
        let started = Instant::now();
        let newcomer = greeter(&client, &id).await?;
        let want = format!("ok {id}");
        while next_line().await? != want {}
        samples.push(started.elapsed().as_micros() as u64);
        drop(newcomer);
        // Its deregistration reaches the caller before the next round starts.
        let mut without = 0;
        while without < 20 {
            without = if next_line().await? == want {
                0
            } else {
                without + 1
            };
        }
    }
    let latencies = Latencies::new(samples);
    report(
        &common,
        "xds-first-call",
        &[
            ("rounds", rounds as f64),
            ("p50_ms", latencies.percentile(50.0)),
            ("p99_ms", latencies.percentile(99.0)),
            ("max_ms", latencies.percentile(100.0)),
        ],
    );
    let _ = std::fs::remove_file(&bootstrap);
    Ok(())
}

fn tempfile_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", std::process::id()))
}
