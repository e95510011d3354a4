//! The call path of a balanced channel: pick a ready endpoint, send, and retry elsewhere a call
//! that never left; record each answer for the load estimate and outlier detection.
//!
//! A call is retried only when hyper hands the request back, which it does when the request was
//! never written to a connection (the connection was gone before the call was dispatched). A
//! call that may have reached an instance is never sent twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::endpoint::{Activity, Body, Endpoint, EndpointState, Ready, root_cause};
use crate::outlier::{self, OutlierDetection};
use crate::pick::{Candidate, Known, Policy, pick};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// gRPC's code for UNAVAILABLE: the one answer that counts against an endpoint.
const UNAVAILABLE: i32 = 14;

/// What every clone of a balanced channel shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) service: String,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    /// False until the watch delivered its first view.
    synced: AtomicBool,
    /// Why the registry refused the channel's watch, if it did: waiting cannot help then.
    refused: std::sync::Mutex<Option<String>>,
    pub(crate) changed: Arc<watch::Sender<u64>>,
    pub(crate) policy: Policy,
    pub(crate) outlier: OutlierDetection,
    pub(crate) max_attempts: u32,
    pub(crate) wait_timeout: Duration,
    pub(crate) unresponsive_after: Duration,
    pub(crate) counters: Counters,
}

/// Channel-wide counters; see [`ChannelStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    calls: AtomicU64,
    retries: AtomicU64,
    ejections: AtomicU64,
    panic_picks: AtomicU64,
    unavailable: AtomicU64,
}

/// What a balanced channel has done, and where each of its endpoints stands.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStats {
    /// Calls sent to an instance (retries not counted twice).
    pub calls: u64,
    /// Calls sent again to another instance because the first never left.
    pub retries: u64,
    /// Endpoints ejected by outlier detection.
    pub ejections: u64,
    /// Picks made in panic mode: too few healthy endpoints, so every connected one was used.
    pub panic_picks: u64,
    /// Calls failed by the channel itself with UNAVAILABLE: no instance could take them.
    pub unavailable: u64,
    pub endpoints: Vec<EndpointStats>,
}

/// One endpoint of a balanced channel.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStats {
    pub id: String,
    /// `host:port`.
    pub address: String,
    pub zone: String,
    pub weight: u32,
    /// The registry calls it PASSING or WARNING.
    pub healthy: bool,
    pub state: crate::EndpointState,
    /// Set while outlier detection keeps the endpoint out: how much longer.
    pub ejected_for: Option<Duration>,
    /// Kept although the registry's view, after a reconnect, no longer has it.
    pub stale: bool,
    pub in_flight: u32,
    /// The peak-EWMA latency estimate.
    pub latency: Duration,
    /// Answers received, and how many of them were failures (UNAVAILABLE or a broken call).
    pub answers: u64,
    pub failures: u64,
    /// Times a call waited long with nothing read and the connection was probed.
    pub probes: u64,
    /// Why the connection last failed, if it ever did.
    pub last_error: Option<String>,
}

impl Shared {
    pub(crate) fn new(
        service: String,
        policy: Policy,
        outlier: OutlierDetection,
        max_attempts: u32,
        wait_timeout: Duration,
        unresponsive_after: Duration,
    ) -> Shared {
        Shared {
            service,
            endpoints: RwLock::new(Arc::new(Vec::new())),
            synced: AtomicBool::new(false),
            refused: std::sync::Mutex::new(None),
            changed: Arc::new(watch::channel(0).0),
            policy,
            outlier,
            max_attempts: max_attempts.max(1),
            wait_timeout,
            unresponsive_after,
            counters: Counters::default(),
        }
    }

    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the endpoint set (the watch's view changed).
    pub(crate) fn set_endpoints(&self, endpoints: Vec<Arc<Endpoint>>) {
        *self.endpoints.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(endpoints);
        self.synced.store(true, Ordering::Release);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The registry refused the watch: calls fail at once, saying why.
    pub(crate) fn set_refused(&self, reason: String) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.changed.send_modify(|n| *n += 1);
    }

    fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn any_ready(&self) -> bool {
        self.snapshot()
            .iter()
            .any(|e| e.state() == EndpointState::Ready)
    }

    pub(crate) fn stats(&self) -> ChannelStats {
        let now = Instant::now();
        let c = &self.counters;
        let mut endpoints: Vec<EndpointStats> = self
            .snapshot()
            .iter()
            .map(|e| {
                // Read before the other fields, so that no two locks are held at once.
                let ejected_for = e
                    .outlier
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ejected_until(now)
                    .map(|until| until - now);
                EndpointStats {
                    id: e.id.clone(),
                    address: e.authority.to_string(),
                    zone: e.zone(),
                    weight: e.weight(),
                    healthy: e.is_healthy(),
                    state: e.state(),
                    ejected_for,
                    stale: e.stale.load(Ordering::Relaxed),
                    in_flight: e.load.pending(),
                    latency: e.load.estimate(now),
                    answers: e.calls.load(Ordering::Relaxed),
                    failures: e.failures.load(Ordering::Relaxed),
                    probes: e.probes.load(Ordering::Relaxed),
                    last_error: e.last_error(),
                }
            })
            .collect();
        endpoints.sort_by(|a, b| a.id.cmp(&b.id));
        ChannelStats {
            calls: c.calls.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            ejections: c.ejections.load(Ordering::Relaxed),
            panic_picks: c.panic_picks.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
            endpoints,
        }
    }

    /// A ready connection that `tried` does not hold, by the rules of `pick.rs`. A
    /// connection found closed is set aside and the pick made again; its endpoint's task,
    /// which has seen it end, is already making the next one.
    fn pick(&self, tried: &mut Vec<Tried>) -> Option<(Arc<Endpoint>, Ready)> {
        loop {
            let endpoint = self.pick_once(tried)?;
            match endpoint.ready() {
                Some(ready) => return Some((endpoint, ready)),
                None => tried.push(Tried::now(&endpoint)),
            }
        }
    }

    fn pick_once(&self, tried: &[Tried]) -> Option<Arc<Endpoint>> {
        let snapshot = self.snapshot();
        let now = Instant::now();
        let known = Known {
            all: snapshot.len(),
            local: snapshot.iter().filter(|e| e.is_local()).count(),
        };
        let mut endpoints = Vec::with_capacity(snapshot.len());
        let mut candidates = Vec::with_capacity(snapshot.len());
        for e in snapshot.iter() {
            if e.state() != EndpointState::Ready || tried.iter().any(|t| t.covers(e)) {
                continue;
            }
            candidates.push(Candidate {
                weight: e.weight(),
                local: e.is_local(),
                healthy: e.is_healthy(),
                ejected: e
                    .outlier
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_ejected(now),
            });
            endpoints.push(e);
        }
        // Only the two drawn endpoints' costs are worked out.
        let cost = |i: usize| endpoints[i].load.cost(now);
        let picked = pick(&candidates, known, &self.policy, cost, &mut fastrand::f64)?;
        if picked.panic {
            self.counters.panic_picks.fetch_add(1, Ordering::Relaxed);
        }
        Some(endpoints[picked.index].clone())
    }

    /// Whether waiting may bring a connection: the first view has not come yet, or some
    /// endpoint is connecting or has a connection this call has not tried.
    fn worth_waiting(&self, tried: &[Tried]) -> bool {
        if self.refused().is_some() {
            return false;
        }
        !self.synced.load(Ordering::Acquire)
            || self.snapshot().iter().any(|e| match e.state() {
                EndpointState::Connecting | EndpointState::Probing => true,
                EndpointState::Ready => !tried.iter().any(|t| t.covers(e)),
                EndpointState::Failed => false,
            })
    }

    fn no_instance(&self, last_error: Option<String>) -> BoxError {
        self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
        Box::new(tonic::Status::unavailable(format!(
            "no instance of {} can take the call: {}",
            self.service,
            self.why_none(last_error)
        )))
    }

    /// Why no instance can take a call, in words for a person.
    pub(crate) fn why_none(&self, last_error: Option<String>) -> String {
        let snapshot = self.snapshot();
        if let Some(reason) = self.refused().filter(|_| snapshot.is_empty()) {
            format!("the registry refused the channel's watch: {reason}")
        } else if !self.synced.load(Ordering::Acquire) {
            "the registry has not answered the channel's watch yet".to_owned()
        } else if snapshot.is_empty() {
            "none is registered".to_owned()
        } else {
            let reason = last_error
                .or_else(|| snapshot.iter().find_map(|e| e.last_error()))
                .map(|r| format!("; last error: {r}"))
                .unwrap_or_default();
            format!("{} registered, none connected{reason}", snapshot.len())
        }
    }

    /// Records an answer from `endpoint`, ejecting it if it keeps failing.
    fn record(&self, endpoint: &Endpoint, failed: bool) {
        endpoint.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            endpoint.failures.fetch_add(1, Ordering::Relaxed);
        }
        let now = Instant::now();
        let snapshot = self.snapshot();
        let all = snapshot.iter().map(|e| &e.outlier);
        if let Some(until) = outlier::record(&self.outlier, &endpoint.outlier, all, failed, now) {
            self.counters.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %self.service, id = %endpoint.id, ejected_for = ?(until - now), "endpoint ejected: its calls keep failing");
            self.changed.send_modify(|n| *n += 1);
        }
    }

    pub(crate) async fn call(
        self: Arc<Self>,
        mut request: http::Request<Body>,
    ) -> Result<http::Response<ResponseBody>, BoxError> {
        let started = Instant::now();
        // tonic's generated clients only write the deadline into the header; its own Channel
        // enforces it, and so must this one.
        let deadline = grpc_timeout(request.headers()).map(|t| later(started, t));
        let wait_until = later(started, self.wait_timeout).min(deadline.unwrap_or(*FAR));
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        // Subscribed to endpoint changes only once a pick found nothing (most calls never
        // wait), and then the pick is made again before waiting, so no change is missed.
        let mut changes: Option<watch::Receiver<u64>> = None;
        let mut tried: Vec<Tried> = Vec::new();
        let mut attempts = 0;
        let mut last_error = None;
        loop {
            if let Some(changes) = changes.as_mut() {
                changes.borrow_and_update();
            }
            let Some((endpoint, ready)) = self.pick(&mut tried) else {
                let Some(waiting) = changes.as_mut() else {
                    changes = Some(self.changed.subscribe());
                    continue;
                };
                if !self.worth_waiting(&tried) || Instant::now() >= wait_until {
                    return Err(self.no_instance(last_error));
                }
                tokio::select! {
                    _ = waiting.changed() => {}
                    _ = tokio::time::sleep_until(wait_until) => {}
                }
                continue;
            };
            attempts += 1;
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(endpoint.scheme.clone());
            parts.authority = Some(endpoint.authority.clone());
            parts.path_and_query = Some(path.clone());
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
            if attempts == 1 {
                self.counters.calls.fetch_add(1, Ordering::Relaxed);
            }
            let call = Call::start(&self, &endpoint, &ready.activity);
            let generation = ready.generation;
            let mut sender = ready.sender;
            let sent = sender.try_send_request(request);
            let answer = match deadline {
                None => sent.await,
                Some(deadline) => match tokio::time::timeout_at(deadline, sent).await {
                    Ok(answer) => answer,
                    // Dropping the attempt lets the call's record see what it waited for.
                    Err(_) => {
                        drop(call);
                        return Err(Box::new(tonic::Status::deadline_exceeded(format!(
                            "no answer from instance {} of {} within the call's deadline",
                            endpoint.id, self.service
                        ))));
                    }
                },
            };
            match answer {
                Ok(response) => return Ok(call.answered(response)),
                Err(mut error) => {
                    let back = error.take_message();
                    let error = error.into_error();
                    let cause = root_cause(&error);
                    match back {
                        Some(unsent) => {
                            // Never written: the connection went away under the pick.
                            call.never_sent();
                            last_error = Some(format!("instance {}: {cause}", endpoint.id));
                            if attempts >= self.max_attempts {
                                return Err(self.no_instance(last_error));
                            }
                            self.counters.retries.fetch_add(1, Ordering::Relaxed);
                            tried.push(Tried {
                                endpoint,
                                generation,
                            });
                            request = unsent;
                        }
                        None if refused_unprocessed(&error) => {
                            // The instance said it never processed the call (a GOAWAY or
                            // REFUSED_STREAM as it shuts down): no mark against it. The request
                            // is gone with hyper, so the caller must send it again.
                            call.never_sent();
                            return Err(Box::new(tonic::Status::unavailable(format!(
                                "instance {} of {} refused the call unprocessed ({cause}); it is safe to send again",
                                endpoint.id, self.service
                            ))));
                        }
                        None => {
                            call.broke();
                            return Err(Box::new(tonic::Status::unavailable(format!(
                                "the call to instance {} of {} at {} failed: {cause}",
                                endpoint.id, self.service, endpoint.authority
                            ))));
                        }
                    }
                }
            }
        }
    }
}

/// A time `after` past `now`, or as far as a clock goes.
fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after).unwrap_or(now + FAR_AHEAD)
}

/// A century: past any deadline a setting could mean.
const FAR_AHEAD: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Stands for "no deadline" in comparisons of instants.
static FAR: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(|| Instant::now() + FAR_AHEAD);

/// Whether an error after the request was handed over says the instance did not process it.
fn refused_unprocessed(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cause = c.source();
    }
    false
}

/// A connection a call already tried: the endpoint and which of its connections.
struct Tried {
    endpoint: Arc<Endpoint>,
    generation: u64,
}

impl Tried {
    fn now(endpoint: &Arc<Endpoint>) -> Tried {
        Tried {
            endpoint: endpoint.clone(),
            generation: endpoint.generation(),
        }
    }

    /// A new connection of the same endpoint is worth a try.
    fn covers(&self, endpoint: &Arc<Endpoint>) -> bool {
        Arc::ptr_eq(&self.endpoint, endpoint) && endpoint.generation() == self.generation
    }
}

/// One attempt on one endpoint: in flight from the start until the answer's body ends (a
/// stream of answers is load for as long as it lasts); its latency is the time to the answer's
/// head. On the way out it records what happened.
struct Call {
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    activity: Arc<Activity>,
    started: Instant,
    reads_at_start: u64,
    done: bool,
}

impl Call {
    fn start(shared: &Arc<Shared>, endpoint: &Arc<Endpoint>, activity: &Arc<Activity>) -> Call {
        endpoint.load.start();
        Call {
            shared: shared.clone(),
            endpoint: endpoint.clone(),
            activity: activity.clone(),
            started: Instant::now(),
            reads_at_start: activity.reads(),
            done: false,
        }
    }

    fn observe(&self) {
        let now = Instant::now();
        self.endpoint.load.observe(now - self.started, now);
    }

    fn answered(
        mut self,
        response: http::Response<hyper::body::Incoming>,
    ) -> http::Response<ResponseBody> {
        self.done = true;
        self.observe();
        let open = OpenCall {
            shared: self.shared.clone(),
            endpoint: self.endpoint.clone(),
            outcome: true,
        };
        // A trailers-only answer carries its status in the head.
        let open = match grpc_status(response.headers()) {
            Some(status) => {
                open.record(status == UNAVAILABLE);
                None
            }
            None => Some(open),
        };
        response.map(|inner| ResponseBody { inner, open })
    }

    fn never_sent(mut self) {
        self.done = true;
        // Not an answer: the latency estimate learns nothing.
        self.endpoint.load.end();
    }

    fn broke(mut self) {
        self.done = true;
        self.observe();
        self.endpoint.load.end();
        self.shared.record(&self.endpoint, true);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Given up on before any answer (the deadline, or the caller went away). The wait
        // counts as latency, so a hung instance looks as slow as it is; and a long wait with
        // nothing at all read from the connection makes it suspect.
        let waited = self.started.elapsed();
        self.observe();
        self.endpoint.load.end();
        if waited >= self.shared.unresponsive_after && self.activity.reads() == self.reads_at_start
        {
            self.activity.declare_suspect();
        }
    }
}

/// A call whose answer's body is still coming: in flight until it ends, and its outcome
/// recorded once its status is known.
struct OpenCall {
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    /// Whether the outcome is still to be recorded.
    outcome: bool,
}

impl OpenCall {
    fn record(mut self, failed: bool) {
        self.outcome = false;
        self.shared.record(&self.endpoint, failed);
    }

    fn record_once(&mut self, failed: bool) {
        if std::mem::take(&mut self.outcome) {
            self.shared.record(&self.endpoint, failed);
        }
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.endpoint.load.end();
    }
}

/// The body of an answer; watches for the trailers that carry the call's status.
pub struct ResponseBody {
    inner: hyper::body::Incoming,
    open: Option<OpenCall>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let failed = grpc_status(trailers) == Some(UNAVAILABLE);
                    if let Some(mut open) = self.open.take() {
                        open.record_once(failed);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut open) = self.open.take() {
                    open.record_once(true);
                }
            }
            // Ended without trailers: not a gRPC answer; nothing to learn.
            Poll::Ready(None) => self.open = None,
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The call's deadline from its `grpc-timeout` header (`1S`, `250m`, …).
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The future of one call.
pub(crate) type CallFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, BoxError>> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut h = http::HeaderMap::new();
        for (text, want) in [
            ("1S", Some(Duration::from_secs(1))),
            ("250m", Some(Duration::from_millis(250))),
            ("2M", Some(Duration::from_secs(120))),
            ("7u", Some(Duration::from_micros(7))),
            ("S", None),
            ("", None),
            ("12x", None),
        ] {
            h.insert("grpc-timeout", http::HeaderValue::from_static(text));
            assert_eq!(grpc_timeout(&h), want, "{text:?}");
        }
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&h), Some(UNAVAILABLE));
    }
}
