//! The watch fan-out: one task per Watch stream, reading the store's change feed and sending what
//! its filter sees.
//!
//! Backpressure is the client's own: the task waits on a small bounded channel towards the stream.
//! While it waits, the store's feed keeps only a bounded number of changes for it; past that it
//! lags, and the task answers a lag by sending one fresh `reset` view. So a slow watcher costs
//! bounded memory and never slows the store or any other watcher.

use std::sync::Arc;
use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_store::{Change, FeedItem, Revision, Snapshot, Store, WatchStart};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::filter::Filter;
use crate::metrics::Metrics;
use crate::wire::{Event, WatchResponse, encoded};

pub(crate) type WatchSender = mpsc::Sender<Result<WatchResponse, Status>>;

pub(crate) struct WatchTask<S> {
    pub(crate) store: Arc<S>,
    pub(crate) filter: Filter,
    pub(crate) start_revision: Option<Revision>,
    pub(crate) progress_interval: Duration,
    pub(crate) shutdown: CancellationToken,
    pub(crate) metrics: Option<Arc<Metrics>>,
    pub(crate) tx: WatchSender,
    /// The stream's places under the watch limits, given back when the task ends.
    pub(crate) _slots: crate::service::WatchSlots,
}

/// Counts an open stream for as long as it lives.
struct Open(Option<Arc<Metrics>>);

impl Open {
    fn new(metrics: Option<Arc<Metrics>>) -> Self {
        if let Some(m) = &metrics {
            m.watch_opened();
        }
        Open(metrics)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.watch_closed();
        }
    }
}

/// Why a watch task stopped sending.
enum Stop {
    ClientGone,
    Shutdown,
}

impl<S: Store> WatchTask<S> {
    pub(crate) async fn run(self) {
        let _open = Open::new(self.metrics.clone());
        match self.follow().await {
            Ok(Stop::ClientGone) => {
                tracing::debug!(service = %self.filter.service, "watch ended by client")
            }
            Ok(Stop::Shutdown) => {
                let _ = self.tx.try_send(Err(Status::unavailable(
                    "the registry is shutting down: reconnect",
                )));
            }
            Err(status) => {
                tracing::warn!(service = %self.filter.service, %status, "watch failed");
                let _ = self.tx.try_send(Err(status));
            }
        }
    }

    async fn follow(&self) -> Result<Stop, Status> {
        let f = &self.filter;
        let watch = self
            .store
            .watch(&f.namespace, &f.service, self.start_revision)
            .await
            .map_err(|e| Status::from(crate::error::Error::from(e)))?;
        let mut feed = watch.feed;
        let mut revision = match watch.start {
            WatchStart::Snapshot(snapshot) => {
                let revision = snapshot.revision;
                if let Err(stop) = self.send(self.reset(snapshot)).await {
                    return Ok(stop);
                }
                revision
            }
            WatchStart::Replay { changes, revision } => {
                let mut last_sent = None;
                for change in &changes {
                    if let Some(message) = self.changes_message(change) {
                        if let Err(stop) = self.send(message).await {
                            return Ok(stop);
                        }
                        last_sent = Some(change.revision);
                    }
                }
                // A resumed stream always says at once how far it is, even when nothing it
                // filters for changed, so the client knows it is live and up to date.
                if last_sent != Some(revision)
                    && let Err(stop) = self.send(progress(revision)).await
                {
                    return Ok(stop);
                }
                revision
            }
        };
        tracing::debug!(service = %f.service, namespace = %f.namespace, revision, "watch started");

        let mut ticker = tokio::time::interval_at(
            Instant::now() + self.progress_interval,
            self.progress_interval,
        );
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Stop::Shutdown),
                _ = self.tx.closed() => return Ok(Stop::ClientGone),
                _ = ticker.tick() => progress(revision),
                item = feed.next() => match item {
                    FeedItem::Change(change) if change.revision <= revision => continue,
                    FeedItem::Change(change) => {
                        revision = change.revision;
                        match self.changes_message(&change) {
                            Some(message) => message,
                            None => continue,
                        }
                    }
                    FeedItem::Lagged => {
                        let snapshot = self
                            .store
                            .list(&f.namespace, &f.service)
                            .await
                            .map_err(|e| Status::from(crate::error::Error::from(e)))?;
                        tracing::debug!(service = %f.service, revision = snapshot.revision, "slow watcher collapsed into a reset");
                        if let Some(m) = &self.metrics {
                            m.slow_reset();
                        }
                        revision = revision.max(snapshot.revision);
                        self.reset(snapshot)
                    }
                    FeedItem::Closed => {
                        return Err(Status::unavailable("the store's change feed closed: reconnect"));
                    }
                },
            };
            if let Err(stop) = self.send(message).await {
                return Ok(stop);
            }
            ticker.reset();
        }
    }

    fn reset(&self, snapshot: Snapshot) -> WatchResponse {
        let events = snapshot
            .instances
            .iter()
            .filter(|i| self.filter.matches(i))
            .map(|i| Event {
                r#type: pb::EventType::Added.into(),
                instance: encoded(i),
                reason: pb::RemovalReason::Unspecified.into(),
                revision: i.mod_revision,
            })
            .collect();
        WatchResponse {
            revision: snapshot.revision,
            reset: true,
            events,
        }
    }

    fn changes_message(&self, change: &Change) -> Option<WatchResponse> {
        let events: Vec<Event> = change
            .events
            .iter()
            .filter_map(|e| self.filter.view_event(e, change.revision))
            .collect();
        (!events.is_empty()).then_some(WatchResponse {
            revision: change.revision,
            reset: false,
            events,
        })
    }

    async fn send(&self, message: WatchResponse) -> Result<(), Stop> {
        if let Some(m) = &self.metrics {
            m.events_sent(message.events.len());
        }
        tokio::select! {
            sent = self.tx.send(Ok(message)) => sent.map_err(|_| Stop::ClientGone),
            _ = self.shutdown.cancelled() => Err(Stop::Shutdown),
        }
    }
}

fn progress(revision: Revision) -> WatchResponse {
    WatchResponse {
        revision,
        reset: false,
        events: Vec::new(),
    }
}
