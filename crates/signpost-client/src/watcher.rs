//! A watch that survives the registry: it keeps its view while disconnected, reconnects with
//! backoff, and resumes from the last revision it saw (the registry replays what was missed, or
//! sends a reset when it no longer can). A stream that goes quiet for longer than the registry's
//! progress messages allow is taken for dead and reopened the same way.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use signpost_proto::v1 as pb;
use tokio::time::Instant;
use tonic::Streaming;

use crate::connections::Connections;
use crate::types::{Event, Instance, WatchUpdate, update_from_pb};
use crate::{Error, Filter, Result};
use signpost_backoff::Backoff;

/// A watch's view: what matched the filter at `revision`.
#[derive(Debug, Clone, Default)]
pub(crate) struct View {
    /// False until the first reset (or resume) arrived; an unsynced view is not an answer.
    pub(crate) synced: bool,
    pub(crate) revision: u64,
    pub(crate) instances: BTreeMap<String, Instance>,
}

/// What a watch has been through; for operators and tests.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Streams that broke (ended, failed, or went silent for too long) and were reopened.
    pub reconnects: AtomicU64,
    /// Reconnects that resumed by replay (no reset needed).
    pub resumes: AtomicU64,
    /// Reset views received, the first one included.
    pub resets: AtomicU64,
}

/// A snapshot of [`WatchStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WatchCounts {
    pub reconnects: u64,
    pub resumes: u64,
    pub resets: u64,
}

impl WatchStats {
    pub fn counts(&self) -> WatchCounts {
        WatchCounts {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            resumes: self.resumes.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
        }
    }
}

/// Where a watch stands. [`Watcher::next`] is one loop that matches on it and moves it on.
enum State {
    /// No stream; the next one opens at `retry_at` (at once for the first, after a backoff
    /// delay once one broke or could not be opened).
    Disconnected { retry_at: Instant },
    /// Opening a stream from revision `start` (0: from a fresh reset). The attempt lives in
    /// the state, so a caller that stops waiting for it does not restart it.
    Connecting { start: u64, opening: Opening },
    /// A stream is open. `resuming` holds until its first message says whether the registry
    /// replayed what was missed or had to reset; silence past `deadline` means the stream is
    /// dead even if no error reached this side (a half-open connection, a stuck proxy). The
    /// stream is boxed so that the states without one stay small.
    Connected {
        stream: Box<Streaming<pb::WatchResponse>>,
        resuming: bool,
        deadline: Instant,
    },
}

type Opening = Pin<Box<dyn Future<Output = Result<Streaming<pb::WatchResponse>>> + Send>>;

pub(crate) struct Watcher {
    conn: Arc<Connections>,
    filter: Filter,
    state: State,
    pub(crate) view: View,
    backoff: Backoff,
    pub(crate) stats: Arc<WatchStats>,
}

impl Watcher {
    pub(crate) fn new(conn: Arc<Connections>, filter: Filter) -> Self {
        let backoff = conn.new_backoff();
        Watcher {
            conn,
            filter,
            state: State::Disconnected {
                retry_at: Instant::now(),
            },
            view: View::default(),
            backoff,
            stats: Arc::default(),
        }
    }

    /// The next update, applied to the view. Transient failures are retried here; only a filter
    /// the registry refuses comes back as an error.
    ///
    /// Every wait is on something the state holds (a deadline, the open stream), so a caller
    /// that drops this future part way, as `select!` does, loses nothing: the next call picks up
    /// where this one stopped.
    pub(crate) async fn next(&mut self) -> Result<WatchUpdate> {
        loop {
            self.state = match &mut self.state {
                State::Disconnected { retry_at } => {
                    tokio::time::sleep_until(*retry_at).await;
                    let start = if self.view.synced {
                        self.view.revision
                    } else {
                        0
                    };
                    State::Connecting {
                        start,
                        opening: Box::pin(open(self.conn.clone(), self.filter.clone(), start)),
                    }
                }
                State::Connecting { start, opening } => {
                    match opening.await {
                        Ok(stream) => State::Connected {
                            stream: Box::new(stream),
                            resuming: *start != 0,
                            deadline: Instant::now() + self.conn.watch_idle_timeout,
                        },
                        Err(error) if retried(&error) => {
                            let delay = self.backoff.next_delay();
                            tracing::debug!(service = %self.filter.service_name(), %error, ?delay, "watch cannot connect; retrying");
                            State::Disconnected {
                                retry_at: Instant::now() + delay,
                            }
                        }
                        Err(error) => {
                            // Should the caller ask again, it asks after a pause, not in a spin.
                            self.state = State::Disconnected {
                                retry_at: Instant::now() + self.backoff.next_delay(),
                            };
                            return Err(error);
                        }
                    }
                }
                State::Connected {
                    stream,
                    resuming,
                    deadline,
                } => {
                    let reason = match tokio::time::timeout_at(*deadline, stream.message()).await {
                        Ok(Ok(Some(message))) => {
                            self.backoff.reset();
                            *deadline = Instant::now() + self.conn.watch_idle_timeout;
                            let update = update_from_pb(message);
                            let resumed = std::mem::take(resuming) && !update.reset;
                            apply(&mut self.view, &self.stats, &update, resumed);
                            if resumed {
                                tracing::debug!(service = %self.filter.service_name(), revision = update.revision, "watch resumed without a reset");
                            }
                            return Ok(update);
                        }
                        Ok(Ok(None)) => "the registry ended the watch".to_owned(),
                        Ok(Err(status)) => status.message().to_owned(),
                        Err(_) => format!("no message within {:?}", self.conn.watch_idle_timeout),
                    };
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    let delay = self.backoff.next_delay();
                    tracing::info!(service = %self.filter.service_name(), %reason, ?delay, "watch broke; reconnecting and resuming");
                    State::Disconnected {
                        retry_at: Instant::now() + delay,
                    }
                }
            };
        }
    }
}

/// Opens a stream from `start` on the registry in use.
async fn open(
    conn: Arc<Connections>,
    filter: Filter,
    start: u64,
) -> Result<Streaming<pb::WatchResponse>> {
    let (index, mut client) = conn.current();
    match client.watch(filter.watch_request(start)).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => {
            let error = conn.error(index, status);
            // Another registry may reach its store when this one cannot.
            if matches!(
                error,
                Error::Unavailable { .. } | Error::StoreUnavailable { .. }
            ) {
                conn.failed(index);
            }
            Err(error)
        }
    }
}

/// Whether a failed open is tried again. A registry at its watch limit is: places come back as
/// other streams end, and a channel that gave up would stop following its service for good.
fn retried(error: &Error) -> bool {
    error.is_transient() || matches!(error, Error::ResourceExhausted(_))
}

fn apply(view: &mut View, stats: &WatchStats, update: &WatchUpdate, resumed: bool) {
    if resumed {
        stats.resumes.fetch_add(1, Ordering::Relaxed);
    }
    if update.reset {
        stats.resets.fetch_add(1, Ordering::Relaxed);
        view.instances.clear();
    }
    for event in &update.events {
        match event {
            Event::Added(i) | Event::Updated(i) => {
                view.instances.insert(i.id.clone(), i.clone());
            }
            Event::Removed(i, _) => {
                view.instances.remove(&i.id);
            }
        }
    }
    view.revision = update.revision;
    view.synced = true;
}
