//! A watch that survives the registry: it keeps its view while disconnected, reconnects with
//! backoff, and resumes from the last revision it saw (the registry replays what was missed, or
//! sends a reset when it no longer can).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use signpost_proto::v1 as pb;
use tonic::Streaming;

use crate::backoff::Backoff;
use crate::connections::Connections;
use crate::types::{Event, Instance, WatchUpdate, update_from_pb};
use crate::{Error, Filter, Result};

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
    /// Streams opened after a break.
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

pub(crate) struct Watcher {
    conn: Arc<Connections>,
    filter: Filter,
    stream: Option<Streaming<pb::WatchResponse>>,
    /// Set on a reconnect until its first message says whether it resumed.
    resuming: bool,
    pub(crate) view: View,
    backoff: Backoff,
    pub(crate) stats: Arc<WatchStats>,
}

impl Watcher {
    pub(crate) fn new(conn: Arc<Connections>, filter: Filter) -> Self {
        let (base, max) = conn.backoff;
        Watcher {
            conn,
            filter,
            stream: None,
            resuming: false,
            view: View::default(),
            backoff: Backoff::new(base, max),
            stats: Arc::default(),
        }
    }

    /// The next update, applied to the view. Transient failures are retried here; only a filter
    /// the registry refuses comes back as an error.
    pub(crate) async fn next(&mut self) -> Result<WatchUpdate> {
        loop {
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    self.connect().await?;
                    continue;
                }
            };
            match stream.message().await {
                Ok(Some(message)) => {
                    self.backoff.reset();
                    let update = update_from_pb(message);
                    self.apply(&update);
                    return Ok(update);
                }
                Ok(None) => self.broke("the registry ended the watch").await,
                Err(status) => self.broke(status.message()).await,
            }
        }
    }

    async fn connect(&mut self) -> Result<()> {
        let start = if self.view.synced {
            self.view.revision
        } else {
            0
        };
        let request = self.filter.watch_request(start);
        let (index, mut client) = self.conn.current();
        match client.watch(request).await {
            Ok(response) => {
                self.stream = Some(response.into_inner());
                self.resuming = start != 0;
                Ok(())
            }
            Err(status) => {
                let error = self.conn.error(index, status);
                if !error.is_transient() {
                    return Err(error);
                }
                if matches!(error, Error::Unavailable { .. }) {
                    self.conn.failed(index);
                }
                let delay = self.backoff.next_delay();
                tracing::debug!(service = %self.filter.service_name(), %error, ?delay, "watch cannot connect; retrying");
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }

    async fn broke(&mut self, reason: &str) {
        self.stream = None;
        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        let delay = self.backoff.next_delay();
        tracing::info!(service = %self.filter.service_name(), reason, ?delay, "watch broke; reconnecting and resuming");
        tokio::time::sleep(delay).await;
    }

    fn apply(&mut self, update: &WatchUpdate) {
        if std::mem::take(&mut self.resuming) && !update.reset {
            self.stats.resumes.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(service = %self.filter.service_name(), revision = update.revision, "watch resumed without a reset");
        }
        if update.reset {
            self.stats.resets.fetch_add(1, Ordering::Relaxed);
            self.view.instances.clear();
        }
        for event in &update.events {
            match event {
                Event::Added(i) | Event::Updated(i) => {
                    self.view.instances.insert(i.id.clone(), i.clone());
                }
                Event::Removed(i, _) => {
                    self.view.instances.remove(&i.id);
                }
            }
        }
        self.view.revision = update.revision;
        self.view.synced = true;
    }
}
