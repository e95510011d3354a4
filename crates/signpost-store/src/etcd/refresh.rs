//! Lease refreshes over a few long-lived etcd LeaseKeepAlive streams per member, shared by every
//! refresh this server makes, instead of a stream opened (and its first answer awaited) for each.
//! etcd works through one stream's requests one after another; [`STREAMS`] of them, a lease
//! always on the same one, let an etcd with several cores work on several at once.
//!
//! Each stream has a task that owns it: refreshes are handed to it on a channel, sent
//! on the stream, and answered from it by lease id, in order for each id (etcd answers a
//! stream's requests in order). A stream that fails fails the refreshes waiting on it, which
//! [`Members::call`](super::members::Members::call) then sends to another member (a refresh is
//! safe to repeat); the next refresh for that member opens a new stream. So does the next refresh
//! for a stream that has kept refreshes waiting for [`STUCK_AFTER`]. The tasks belong to the
//! [`Refresher`] and end with it.
//!
//! A lease refreshed moments ago by this server is not refreshed in etcd again: [`Recent`]
//! answers it with what is left of the ttl etcd gave the last refresh, measured from when that
//! refresh was sent (etcd counts from when it got it, later). A client that refreshes every few
//! milliseconds then costs etcd one renew per [`COALESCE`] window instead of one each time, and the
//! answer never promises more than etcd holds.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The refreshes one stream may have waiting for an answer; past that the stream is taken for
/// stuck, and fails them.
const MAX_WAITING: usize = 4_096;

/// Keep-alive streams per member.
const STREAMS: u64 = 8;

/// A stream with refreshes waiting and no answer for this long is taken for stuck: new refreshes
/// go on a new one. (etcd holds a refresh of a lease that ran out until it has revoked it, and
/// everything behind it on the stream waits too; after a mass expiry that can take seconds.)
const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest a refresh is answered from the last one etcd answered. Per lease it is a tenth of
/// the lease's ttl when that is shorter, so a lease always has at least nine tenths of its ttl left
/// when a refresh is answered.
pub(super) const COALESCE: std::time::Duration = std::time::Duration::from_secs(1);

/// The refreshes etcd answered in the last [`COALESCE`] windows, by lease id.
///
/// Two generations: each [`COALESCE`] the newer becomes the older and the older is dropped, so
/// the table holds only leases refreshed in the last two windows however many come and go, and
/// every entry still young enough to answer from is in one of them.
#[derive(Debug)]
pub(super) struct Recent {
    table: Mutex<Generations>,
}

#[derive(Debug)]
struct Generations {
    started: Instant,
    newer: HashMap<i64, Renewed>,
    older: HashMap<i64, Renewed>,
}

/// A refresh etcd answered: when it was sent, and the ttl etcd gave the lease.
#[derive(Debug, Clone, Copy)]
struct Renewed {
    sent: Instant,
    ttl: std::time::Duration,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            table: Mutex::new(Generations {
                started: Instant::now(),
                newer: HashMap::new(),
                older: HashMap::new(),
            }),
        }
    }
}

impl Recent {
    /// What is left of lease `id`'s ttl, when etcd refreshed it recently enough to answer
    /// from that.
    pub(super) fn answer(&self, id: i64) -> Option<std::time::Duration> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let renewed = table.newer.get(&id).or_else(|| table.older.get(&id))?;
        let age = renewed.sent.elapsed();
        (age < (renewed.ttl / 10).min(COALESCE)).then(|| renewed.ttl.saturating_sub(age))
    }

    /// Notes that a refresh of lease `id` sent at `sent` was answered with `ttl`.
    pub(super) fn renewed(&self, id: i64, sent: Instant, ttl: std::time::Duration) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.started.elapsed() >= COALESCE {
            table.older = std::mem::take(&mut table.newer);
            table.started = Instant::now();
        }
        table.older.remove(&id);
        table.newer.insert(id, Renewed { sent, ttl });
    }

    /// Lease `id` is gone (revoked, or etcd knows it no more): nothing is answered for it here.
    pub(super) fn forget(&self, id: i64) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.newer.remove(&id);
        table.older.remove(&id);
    }
}

/// A refresh's answer: the lease's ttl in seconds (`None`: etcd knows no such lease), or why the
/// stream it went on failed.
type Answer = Result<Option<i64>, String>;

#[derive(Debug, Default)]
pub(super) struct Refresher {
    /// By member, and by lease id modulo [`STREAMS`].
    streams: Mutex<HashMap<(usize, u64), Stream>>,
    /// Streams replaced while refreshes still waited on them: they end once those are answered
    /// or failed, and are aborted with the refresher if they have not.
    retired: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Stream {
    requests: mpsc::Sender<(i64, oneshot::Sender<Answer>)>,
    task: JoinHandle<()>,
    progress: Arc<Progress>,
}

/// How a stream is keeping up: refreshes waiting, and when it last answered one (or started
/// having one to answer).
#[derive(Debug)]
struct Progress {
    waiting: std::sync::atomic::AtomicUsize,
    since: Mutex<Instant>,
}

impl Progress {
    fn stuck(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed) > 0
            && self
                .since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                > STUCK_AFTER
    }

    fn moved(&self, waiting: usize) {
        self.waiting
            .store(waiting, std::sync::atomic::Ordering::Relaxed);
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        let streams = self.streams.get_mut().unwrap_or_else(|p| p.into_inner());
        for stream in streams.values() {
            stream.task.abort();
        }
        for task in self
            .retired
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Refresher {
    /// Refreshes lease `id` on its stream of member `member` (through `client`, when a stream
    /// must be opened): its ttl in seconds, or `None` when etcd knows no such lease.
    pub(super) async fn refresh(
        &self,
        member: usize,
        client: Client,
        id: i64,
    ) -> Result<Option<i64>, etcd_client::Error> {
        let stream = (member, id.unsigned_abs() % STREAMS);
        let (reply, answer) = oneshot::channel();
        let sent = {
            let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            streams
                .get(&stream)
                .filter(|open| !open.progress.stuck())
                .map(|open| open.requests.try_send((id, reply)))
        };
        let answer = match sent {
            Some(Ok(())) => answer,
            // No stream yet, or its task ended (the stream failed), or it is full: a new one,
            // whose first request is this refresh.
            Some(Err(refused)) => {
                let (_, reply) = refused.into_inner();
                self.open(stream, client, id, reply).await?;
                answer
            }
            None => {
                let (reply, answer) = oneshot::channel();
                self.open(stream, client, id, reply).await?;
                answer
            }
        };
        match answer.await {
            Ok(Ok(ttl)) => Ok(ttl),
            Ok(Err(reason)) => Err(etcd_client::Error::WatchError(reason)),
            Err(_) => Err(etcd_client::Error::WatchError(
                "the lease keep-alive stream ended".into(),
            )),
        }
    }

    async fn open(
        &self,
        stream: (usize, u64),
        client: Client,
        id: i64,
        reply: oneshot::Sender<Answer>,
    ) -> Result<(), etcd_client::Error> {
        let (keeper, responses) = client.lease_client().keep_alive_many(id).await?;
        let (requests, inbox) = mpsc::channel(MAX_WAITING);
        let mut waiting: HashMap<i64, VecDeque<oneshot::Sender<Answer>>> = HashMap::new();
        waiting.entry(id).or_default().push_back(reply);
        let progress = Arc::new(Progress {
            waiting: std::sync::atomic::AtomicUsize::new(1),
            since: Mutex::new(Instant::now()),
        });
        let task = tokio::spawn(serve(keeper, responses, inbox, waiting, progress.clone()));
        let replaced = {
            let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            streams.insert(
                stream,
                Stream {
                    requests,
                    task,
                    progress,
                },
            )
        };
        // The stream replaced (stuck, failed, or opened by a refresh racing this one) serves what
        // it was sent, then ends: its sender is dropped here.
        if let Some(old) = replaced {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            retired.retain(|task| !task.is_finished());
            retired.push(old.task);
        }
        Ok(())
    }
}

/// Sends each refresh handed over on the stream and answers it from the stream, until either
/// fails; then fails every refresh still waiting.
async fn serve(
    mut keeper: LeaseKeeper,
    mut responses: LeaseKeepAliveStream,
    mut inbox: mpsc::Receiver<(i64, oneshot::Sender<Answer>)>,
    mut waiting: HashMap<i64, VecDeque<oneshot::Sender<Answer>>>,
    progress: Arc<Progress>,
) {
    let mut count: usize = waiting.values().map(VecDeque::len).sum();
    let mut replaced = false;
    let reason = loop {
        tokio::select! {
            request = inbox.recv(), if !replaced => {
                let Some((id, reply)) = request else {
                    // Replaced by a newer stream: answer what is still on its way, then end.
                    if count == 0 {
                        return;
                    }
                    replaced = true;
                    continue;
                };
                if count >= MAX_WAITING {
                    let _ = reply.send(Err("the lease keep-alive stream is not answering".into()));
                    break "the lease keep-alive stream is not answering".to_owned();
                }
                if let Err(e) = keeper.keep_alive_id(id).await {
                    let _ = reply.send(Err(e.to_string()));
                    break e.to_string();
                }
                waiting.entry(id).or_default().push_back(reply);
                count += 1;
                if count == 1 {
                    progress.moved(count);
                } else {
                    progress.waiting.store(count, std::sync::atomic::Ordering::Relaxed);
                }
            }
            response = responses.message() => match response {
                Ok(Some(answer)) => {
                    let id = answer.id();
                    let reply = waiting.get_mut(&id).and_then(VecDeque::pop_front);
                    if waiting.get(&id).is_some_and(VecDeque::is_empty) {
                        waiting.remove(&id);
                    }
                    if let Some(reply) = reply {
                        count -= 1;
                        progress.moved(count);
                        let ttl = answer.ttl();
                        let _ = reply.send(Ok((ttl > 0).then_some(ttl)));
                    }
                    if count == 0 && replaced {
                        return;
                    }
                }
                Ok(None) => break "etcd ended the lease keep-alive stream".to_owned(),
                Err(e) => break e.to_string(),
            },
        }
    };
    for reply in waiting.into_values().flatten() {
        let _ = reply.send(Err(reason.clone()));
    }
}
