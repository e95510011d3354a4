//! The etcd members a store talks to, one client each.
//!
//! etcd-client's own `Client::connect` balances one channel over every endpoint with tonic's
//! balancer, which goes on choosing an endpoint that cannot connect: with one member of three
//! dead, about one request in four failed with that member's connect error. Here each member has
//! a client of its own over a single lazily connected channel, and [`Members::call`] chooses:
//! the member that answered last first, then the others that are up, then (as a last resort,
//! in case one came back before its probe noticed) the ones that are down.
//!
//! An attempt that failed before it was sent (connect refused or timed out, a stream the member
//! refused, a member without a leader, which etcd refuses before it proposes anything) moves on
//! to the next member at once: nothing was applied. An attempt that may have reached etcd (the
//! connection died mid-call, no answer in time) is [`Failure::Unknown`]; whether to send it again
//! is the caller's decision (see [`Repeat`]), because repeating a write that was applied is only
//! harmless when the write says so.
//!
//! A member that failed is down until a background probe (a linearizable read, which needs a
//! leader, as writes do) gets an answer from it; the change is logged once each way.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Why a call got no usable answer.
#[derive(Debug)]
pub(super) enum Failure {
    /// etcd answered with an error of its own (a lease that does not exist, a bad argument):
    /// a definite answer, which another member would give too.
    Answered(etcd_client::Error),
    /// No member took the request, so nothing was applied. Names each member's last error.
    Unreachable(String),
    /// An attempt may have been applied: it reached (or may have reached) a member, and no
    /// answer came back.
    Unknown(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Answered(e) => write!(f, "{e}"),
            Failure::Unreachable(reason) => write!(f, "no member could take the request: {reason}"),
            Failure::Unknown(reason) => write!(f, "no answer from etcd: {reason}"),
        }
    }
}

/// Whether a call may be sent again to another member after an attempt that may have been
/// applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Repeat {
    /// Reads, and writes whose second application changes nothing (a lease refresh).
    Safe,
    /// Stop at the first attempt that may have been applied and report [`Failure::Unknown`].
    Never,
}

/// What one failed attempt says about the request and the member.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// Never sent, or refused before etcd acted on it.
    NotSent(String),
    /// May have been applied.
    Unknown(String),
    /// etcd's own answer.
    Answered,
}

fn classify(error: &etcd_client::Error) -> Attempt {
    match error {
        etcd_client::Error::GRpcStatus(status) => classify_status(status),
        // Only raised while a connection is being made.
        etcd_client::Error::TransportError(e) => Attempt::NotSent(e.to_string()),
        // A stream (a watch, a keep-alive) ended or failed with requests on it.
        etcd_client::Error::WatchError(reason)
        | etcd_client::Error::LeaseKeepAliveError(reason) => Attempt::Unknown(reason.clone()),
        _ => Attempt::Answered,
    }
}

fn classify_status(status: &tonic::Status) -> Attempt {
    let mut source = std::error::Error::source(status);
    let mut from_transport = false;
    while let Some(cause) = source {
        from_transport = true;
        if cause.downcast_ref::<tonic::ConnectError>().is_some() {
            return Attempt::NotSent(root_cause(status));
        }
        source = cause.source();
    }
    if from_transport {
        // The connection failed after the request may have been written.
        return Attempt::Unknown(root_cause(status));
    }
    let message = status.message();
    // etcd checks these before it proposes anything (gRPC interceptor, request limiter), so
    // another member may take the request as it is.
    if ["no leader", "not capable", "too many requests"]
        .iter()
        .any(|m| message.contains(m))
    {
        return Attempt::NotSent(format!("etcd: {message}"));
    }
    match status.code() {
        // "request timed out", "leader changed", "server stopped": proposed, outcome unknown.
        tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Cancelled
        | tonic::Code::Unknown
        | tonic::Code::Aborted
        | tonic::Code::Internal => Attempt::Unknown(format!("etcd: {message}")),
        _ => Attempt::Answered,
    }
}

/// The innermost cause of a transport failure, such as "Connection refused (os error 111)".
fn root_cause(status: &tonic::Status) -> String {
    let mut innermost = None;
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        innermost = Some(c);
        cause = c.source();
    }
    match innermost {
        Some(c) => c.to_string(),
        None => status.message().to_owned(),
    }
}

#[derive(Debug, Clone)]
enum State {
    Up { since: Instant },
    Down { since: Instant, error: String },
}

struct Member {
    endpoint: String,
    client: Client,
    state: Mutex<State>,
    /// Wakes the member's probe when it goes down.
    down: Notify,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("endpoint", &self.endpoint)
            .field("state", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl Member {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is replaced whole: a panic elsewhere cannot leave it half written.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_up(&self) -> bool {
        matches!(*self.lock(), State::Up { .. })
    }

    /// `seen` is when the failure was seen to begin: for an answer that did not come in time,
    /// when the request was sent. Evidence from before the member was last seen back is stale
    /// (several calls sent to a hung member time out one after another) and changes nothing.
    fn mark_down(&self, error: &str, seen: Instant) {
        let mut state = self.lock();
        match &mut *state {
            State::Up { since } if *since > seen => {}
            State::Up { .. } => {
                tracing::warn!(endpoint = %self.endpoint, %error, "etcd member unreachable; using the others");
                *state = State::Down {
                    since: Instant::now(),
                    error: error.to_owned(),
                };
                drop(state);
                self.down.notify_one();
            }
            // Already reported: keep the newest reason for the next error message.
            State::Down { error: last, .. } => *last = error.to_owned(),
        }
    }

    fn mark_up(&self) {
        let mut state = self.lock();
        if let State::Down { since, .. } = &*state {
            tracing::info!(endpoint = %self.endpoint, down_for = ?since.elapsed(), "etcd member reachable again");
            *state = State::Up {
                since: Instant::now(),
            };
        }
    }

    fn describe(&self) -> String {
        match &*self.lock() {
            State::Up { .. } => format!("{}: up", self.endpoint),
            State::Down { since, error } => {
                format!(
                    "{}: {error} (down for {:.1?})",
                    self.endpoint,
                    since.elapsed()
                )
            }
        }
    }
}

/// One client per etcd member, the state of each, and the probes of the ones that are down.
pub(super) struct Members {
    members: Vec<Arc<Member>>,
    /// The member that answered last, tried first.
    preferred: AtomicUsize,
    /// The longest one attempt may take; a call's whole deadline is the caller's.
    attempt_timeout: Duration,
    probes: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Members")
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for probe in &self.probes {
            probe.abort();
        }
    }
}

/// The URI of an endpoint given as `host:port` or `http://host:port`.
fn uri(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

impl Members {
    /// Clients for `endpoints`, connected lazily (a member that is down at start is found out
    /// by the first request to it). `probe_key` is read to tell whether a member is back.
    pub(super) async fn new(
        endpoints: &[String],
        request_timeout: Duration,
        probe_key: Vec<u8>,
    ) -> Result<Arc<Members>, String> {
        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let channel = tonic::transport::Endpoint::from_shared(uri(endpoint))
                .map_err(|e| format!("etcd endpoint {endpoint:?}: {e}"))?
                .connect_timeout(Duration::from_secs(2))
                // A member that vanishes without closing the connection must still end the
                // calls and the watch on it.
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(2))
                .keep_alive_while_idle(true)
                .tcp_nodelay(true)
                .connect_lazy();
            // A member cut off from its quorum must not answer reads or watches from stale
            // data, and refuses writes at once instead of waiting for a leader.
            let options = ConnectOptions::new().with_require_leader(true);
            let client = Client::from_channel(etcd_client::Channel::Tonic(channel), Some(options))
                .await
                .map_err(|e| format!("etcd endpoint {endpoint:?}: {e}"))?;
            members.push(Arc::new(Member {
                endpoint: endpoint.clone(),
                client,
                state: Mutex::new(State::Up {
                    since: Instant::now(),
                }),
                down: Notify::new(),
            }));
        }
        let probes = members
            .iter()
            .map(|m| tokio::spawn(probe(m.clone(), probe_key.clone())))
            .collect();
        Ok(Arc::new(Members {
            members,
            preferred: AtomicUsize::new(0),
            // Half the deadline: an attempt on a member that hangs leaves time for another.
            attempt_timeout: (request_timeout / 2).max(Duration::from_secs(1)),
            probes,
        }))
    }

    /// The client of the member calls go to first.
    pub(super) fn preferred(&self) -> (usize, Client) {
        let i = self.order()[0];
        (i, self.members[i].client.clone())
    }

    /// Every member's endpoint and state, for error messages.
    pub(super) fn describe(&self) -> String {
        let states: Vec<String> = self.members.iter().map(|m| m.describe()).collect();
        states.join("; ")
    }

    /// The order in which members are tried: the preferred one if it is up, the other members
    /// that are up, then the ones that are down.
    fn order(&self) -> Vec<usize> {
        let n = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed) % n.max(1);
        let rotated = (0..n).map(|k| (first + k) % n);
        let (up, down): (Vec<usize>, Vec<usize>) = rotated.partition(|&i| self.members[i].is_up());
        up.into_iter().chain(down).collect()
    }

    /// Notes that member `i` answered (it is up, and tried first from now on).
    pub(super) fn worked(&self, i: usize) {
        self.members[i].mark_up();
        self.preferred.store(i, Ordering::Relaxed);
    }

    /// Notes that member `i` failed with `error`, when the error says the member (rather than
    /// the request) is at fault. Returns whether it did.
    pub(super) fn failed(&self, i: usize, error: &etcd_client::Error) -> bool {
        match classify(error) {
            Attempt::NotSent(reason) | Attempt::Unknown(reason) => {
                self.members[i].mark_down(&reason, Instant::now());
                true
            }
            Attempt::Answered => false,
        }
    }

    /// Sends `request` to one member after another until one answers, an attempt may have been
    /// applied and `repeat` is [`Repeat::Never`], or `deadline` passes. When every member
    /// failed before the request was sent (during a leader election, each refuses with "no
    /// leader"), it goes round them again after a short pause, so that an election costs a
    /// wait rather than an error.
    pub(super) async fn call<T, F, Fut>(
        &self,
        repeat: Repeat,
        deadline: Instant,
        mut request: F,
    ) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(repeat, deadline, |_, client| request(client))
            .await
    }

    /// [`call`](Members::call), for a request that needs to know which member it goes to (one
    /// that uses a stream of that member's).
    pub(super) async fn call_on<T, F, Fut>(
        &self,
        repeat: Repeat,
        deadline: Instant,
        mut request: F,
    ) -> Result<T, Failure>
    where
        F: FnMut(usize, Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut pause =
            signpost_backoff::Backoff::new(Duration::from_millis(25), Duration::from_millis(400));
        loop {
            for i in self.order() {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let member = &self.members[i];
                let limit = (now + self.attempt_timeout).min(deadline);
                // `seen`: when the failure began. The absence of an answer began when the
                // request was sent.
                let (attempt, seen) =
                    match tokio::time::timeout_at(limit, request(i, member.client.clone())).await {
                        Ok(Ok(answer)) => {
                            self.worked(i);
                            return Ok(answer);
                        }
                        Ok(Err(e)) => match classify(&e) {
                            Attempt::Answered => return Err(Failure::Answered(e)),
                            other => (other, Instant::now()),
                        },
                        Err(_) => (
                            Attempt::Unknown(format!(
                                "no answer within {:?}",
                                limit.saturating_duration_since(now)
                            )),
                            now,
                        ),
                    };
                match attempt {
                    Attempt::NotSent(reason) => member.mark_down(&reason, seen),
                    Attempt::Unknown(reason) => {
                        member.mark_down(&reason, seen);
                        if repeat == Repeat::Never {
                            return Err(Failure::Unknown(format!("{}: {reason}", member.endpoint)));
                        }
                    }
                    Attempt::Answered => {}
                }
            }
            let wait = pause.next_delay();
            if Instant::now() + wait >= deadline {
                return Err(Failure::Unreachable(self.describe()));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Probes a member while it is down, and marks it up when it answers. Runs until the member
/// set is dropped, which aborts it.
async fn probe(member: Arc<Member>, key: Vec<u8>) {
    let mut pause =
        signpost_backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        if member.is_up() {
            pause.reset();
            // `notify_one` keeps a permit when nobody waits: a fall in between is not missed.
            member.down.notified().await;
            continue;
        }
        tokio::time::sleep(pause.next_delay()).await;
        let mut client = member.client.clone();
        let sent = Instant::now();
        let answered = tokio::time::timeout(
            Duration::from_secs(1),
            client.get(key.as_slice(), Some(GetOptions::new().with_count_only())),
        )
        .await;
        match answered {
            Ok(Ok(_)) => member.mark_up(),
            Ok(Err(e)) => {
                let reason = match classify(&e) {
                    Attempt::NotSent(r) | Attempt::Unknown(r) => r,
                    Attempt::Answered => e.to_string(),
                };
                member.mark_down(&reason, Instant::now());
            }
            Err(_) => member.mark_down("no answer to a probe within 1s", sent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_refusals_before_a_proposal_are_not_sent_and_timeouts_are_unknown() {
        let status =
            |code, message: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, message));
        assert!(matches!(
            classify(&status(tonic::Code::Unavailable, "etcdserver: no leader")),
            Attempt::NotSent(_)
        ));
        assert!(matches!(
            classify(&status(
                tonic::Code::Unavailable,
                "etcdserver: request timed out"
            )),
            Attempt::Unknown(_)
        ));
        assert!(matches!(
            classify(&status(
                tonic::Code::Unavailable,
                "etcdserver: leader changed"
            )),
            Attempt::Unknown(_)
        ));
        assert_eq!(
            classify(&status(
                tonic::Code::NotFound,
                "etcdserver: requested lease not found"
            )),
            Attempt::Answered
        );
        // A keep-alive stream that failed with refreshes on it: they may or may not have been
        // applied (a lease etcd does not know is an answer with a ttl of 0, not an error).
        assert!(matches!(
            classify(&etcd_client::Error::LeaseKeepAliveError(
                "channel closed".into()
            )),
            Attempt::Unknown(_)
        ));
    }

    #[tokio::test]
    async fn a_refused_connection_is_not_sent_and_moves_to_the_next_member() {
        // A port nothing listens on: bind one, then free it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let members = Members::new(&[dead.clone(), dead], Duration::from_secs(2), b"k".to_vec())
            .await
            .unwrap();
        let mut errors = Vec::new();
        let got = members
            .call(
                Repeat::Never,
                Instant::now() + Duration::from_secs(2),
                |mut c| async move { c.get("k", None).await },
            )
            .await;
        match got {
            Err(Failure::Unreachable(reason)) => errors.push(reason),
            other => panic!("expected unreachable, got {other:?}"),
        }
        assert!(errors[0].to_lowercase().contains("refused"), "{errors:?}");
        assert!(!members.members[0].is_up() && !members.members[1].is_up());
    }
}
