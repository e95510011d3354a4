//! The watch fan-out: one task per Watch stream, reading the store's change feed and sending what
//! its filter sees.
//!
//! Backpressure is the client's own: the task waits on a small bounded channel towards the stream.
//! While it waits, the store's feed keeps only a bounded number of changes for it; past that it
//! lags, and the task answers a lag by sending one fresh `reset` view. So a slow watcher costs
//! bounded memory and never slows the store or any other watcher.
//!
//! The task sends gRPC frames, not messages (`encode::frame`): a change that every watcher of its
//! service sees the same way is framed once, on the change itself, and the same bytes go down
//! every stream. The stream's end is a trailers frame carrying the status.

use std::sync::Arc;
use std::time::Duration;

use prost::bytes::Bytes;
use signpost_proto::v1 as pb;
use signpost_store::{Change, FeedItem, Revision, Snapshot, Store, WatchStart};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::convert::removal_to_pb;
use crate::encode::{ChangeFrames, Event, WatchResponse, encoded, frame};
use crate::filter::{Filter, Left, View};
use crate::hub::Topic;
use crate::limits::WatchSlots;
use crate::metrics::Metrics;

/// What a watch task sends towards its stream: framed messages, then at most one end. Small on
/// purpose: each stream's channel allocates its slots 32 at a time.
#[derive(Debug)]
pub(crate) enum Sent {
    Message(Bytes),
    End(Box<Status>),
}

pub(crate) type WatchSender = mpsc::Sender<Sent>;
pub(crate) type WatchReceiver = mpsc::Receiver<Sent>;

pub(crate) struct WatchTask {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) filter: Filter,
    pub(crate) start_revision: Option<Revision>,
    pub(crate) progress_interval: Duration,
    pub(crate) shutdown: CancellationToken,
    pub(crate) metrics: Option<Arc<Metrics>>,
    /// The largest message the server may send (`max_response_size`).
    pub(crate) max_message: usize,
    pub(crate) tx: WatchSender,
    /// The stream's places under the watch limits, given back when the task ends.
    pub(crate) _slots: WatchSlots,
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

impl WatchTask {
    /// Runs the stream; `topic` was subscribed to before the task was started, so that the start
    /// the task reads from the store leaves no gap before the topic's first change.
    pub(crate) async fn run(self, topic: Topic) {
        let _open = Open::new(self.metrics.clone());
        match self.follow(topic).await {
            Ok(Stop::ClientGone) => {
                tracing::debug!(service = %self.filter.service, "watch ended by client")
            }
            Ok(Stop::Shutdown) => self.end(Status::unavailable(
                "the registry is shutting down: reconnect",
            )),
            Err(status) => {
                tracing::warn!(service = %self.filter.service, %status, "watch failed");
                self.end(status)
            }
        }
    }

    /// Ends the stream with `status`.
    fn end(&self, status: Status) {
        let _ = self.tx.try_send(Sent::End(Box::new(status)));
    }

    async fn follow(&self, mut feed: Topic) -> Result<Stop, Status> {
        let f = &self.filter;
        // The topic follows this service from before the start is read: no gap between them.
        let start = self
            .store
            .watch(&f.namespace, &f.service, self.start_revision)
            .await
            .map_err(|e| Status::from(crate::error::Error::from(e)))?;
        let mut revision = match start {
            WatchStart::Snapshot(snapshot) => {
                let revision = snapshot.revision;
                if let Err(stop) = self.send(self.reset(snapshot)?).await {
                    return Ok(stop);
                }
                revision
            }
            WatchStart::Replay { changes, revision } => {
                let mut last_sent = None;
                for change in &changes {
                    if let Some(message) = self.changes_message(change)? {
                        if let Err(stop) = self.send(message).await {
                            return Ok(stop);
                        }
                        last_sent = Some(change.revision);
                    }
                }
                // A resumed stream always says at once how far it is, even when nothing it
                // filters for changed, so the client knows it is live and up to date.
                if last_sent != Some(revision)
                    && let Err(stop) = self.send(self.progress(revision)?).await
                {
                    return Ok(stop);
                }
                revision
            }
        };
        tracing::debug!(service = %f.service, namespace = %f.namespace, revision, "watch started");

        let mut ticker = tokio::time::interval_at(
            Instant::now() + signpost_backoff::spread(self.progress_interval),
            self.progress_interval,
        );
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // A progress message due, with how far the router had got when it fell due. It goes out
        // once the topic holds nothing older, so that it never claims a change not yet sent.
        let mut progress_due: Option<Revision> = None;
        loop {
            let message = if let Some(routed) = progress_due {
                match feed.try_next() {
                    Some(item) => match self.on_item(item, &mut revision).await? {
                        Some(message) => message,
                        None => continue,
                    },
                    None => {
                        progress_due = None;
                        // The stream's service did not change up to `routed`: it has seen that
                        // far, so a resume from here needs no older history.
                        revision = revision.max(routed);
                        self.progress(revision)?
                    }
                }
            } else {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(Stop::Shutdown),
                    _ = self.tx.closed() => return Ok(Stop::ClientGone),
                    _ = ticker.tick() => {
                        progress_due = Some(feed.routed());
                        continue;
                    }
                    item = feed.next() => match self.on_item(item, &mut revision).await? {
                        Some(message) => message,
                        None => continue,
                    },
                }
            };
            if let Err(stop) = self.send(message).await {
                return Ok(stop);
            }
            ticker.reset_after(signpost_backoff::spread(self.progress_interval));
        }
    }

    /// What the stream sends for one item of its topic, if anything; `revision` is how far the
    /// stream has seen.
    async fn on_item(
        &self,
        item: FeedItem,
        revision: &mut Revision,
    ) -> Result<Option<Message>, Status> {
        let f = &self.filter;
        match item {
            FeedItem::Change(change) if change.revision <= *revision => Ok(None),
            FeedItem::Change(change) => {
                *revision = change.revision;
                self.changes_message(&change)
            }
            FeedItem::Lagged => {
                let snapshot = self
                    .store
                    .list(&f.namespace, &f.service)
                    .map_err(|e| Status::from(crate::error::Error::from(e)))?;
                tracing::debug!(service = %f.service, revision = snapshot.revision, "slow watcher collapsed into a reset");
                if let Some(m) = &self.metrics {
                    m.slow_reset();
                }
                *revision = (*revision).max(snapshot.revision);
                self.reset(snapshot).map(Some)
            }
            FeedItem::Closed => Err(Status::unavailable(
                "the store's change feed closed: reconnect",
            )),
        }
    }

    fn reset(&self, snapshot: Snapshot) -> Result<Message, Status> {
        let events: Vec<Event> = snapshot
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
        let count = events.len();
        let message = WatchResponse {
            revision: snapshot.revision,
            reset: true,
            events,
        };
        Ok((frame(&message, self.max_message)?, count))
    }

    /// What this stream sends for `change`, if its filter sees any of it.
    fn changes_message(&self, change: &Change) -> Result<Option<Message>, Status> {
        let f = &self.filter;
        let shared = f.is_whole_service()
            && change.events.iter().all(|e| {
                e.current
                    .as_deref()
                    .or(e.prev.as_deref())
                    .is_some_and(|i| i.is_in(&f.namespace, &f.service))
            });
        let (bytes, count) = if shared {
            // Every watcher of this service without tags or a selector sees this change alike:
            // the first one to get here frames it for all of them.
            change
                .memo
                .get_or_init(ChangeFrames::default)
                .get_or_try_init(f.include_unhealthy, || self.changes_frame(change))?
        } else {
            self.changes_frame(change)?
        };
        Ok((count > 0).then_some((bytes, count)))
    }

    /// `change` as this stream's filter sees it, framed; empty when it sees nothing.
    fn changes_frame(&self, change: &Change) -> Result<Message, Status> {
        let events: Vec<Event> = change
            .events
            .iter()
            .filter_map(|e| self.filter.view_event(e))
            .map(|view| view_to_wire(view, change.revision))
            .collect();
        if events.is_empty() {
            return Ok((Bytes::new(), 0));
        }
        let count = events.len();
        let message = WatchResponse {
            revision: change.revision,
            reset: false,
            events,
        };
        Ok((frame(&message, self.max_message)?, count))
    }

    fn progress(&self, revision: Revision) -> Result<Message, Status> {
        let message = WatchResponse {
            revision,
            reset: false,
            events: Vec::new(),
        };
        Ok((frame(&message, self.max_message)?, 0))
    }

    async fn send(&self, (bytes, events): Message) -> Result<(), Stop> {
        if let Some(m) = &self.metrics {
            m.events_sent(events);
        }
        tokio::select! {
            sent = self.tx.send(Sent::Message(bytes)) => sent.map_err(|_| Stop::ClientGone),
            _ = self.shutdown.cancelled() => Err(Stop::Shutdown),
        }
    }
}

/// A view event as the wire carries it.
fn view_to_wire(view: View<'_>, revision: Revision) -> Event {
    let (kind, instance, reason) = match view {
        View::Added(now) => (pb::EventType::Added, now, pb::RemovalReason::Unspecified),
        View::Updated(now) => (pb::EventType::Updated, now, pb::RemovalReason::Unspecified),
        View::Removed(before, left) => (
            pb::EventType::Removed,
            before,
            match left {
                Left::Gone(cause) => removal_to_pb(cause),
                Left::Unhealthy => pb::RemovalReason::Unhealthy,
                Left::Filtered => pb::RemovalReason::Filtered,
            },
        ),
    };
    Event {
        r#type: kind.into(),
        instance: encoded(instance),
        reason: reason.into(),
        revision,
    }
}

/// A framed message and the number of events in it.
type Message = (Bytes, usize);
