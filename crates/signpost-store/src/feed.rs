//! The change feed: every change a store commits, in revision order, to each subscriber.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::model::Change;

/// What a [`ChangeFeed`] yields next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    /// The next change, in revision order.
    Change(Arc<Change>),
    /// This subscriber fell too far behind and changes were dropped for it. The feed goes on with
    /// later changes; the subscriber must read a fresh snapshot and skip the changes it covers.
    Lagged,
    /// The store is gone; nothing more will come.
    Closed,
}

/// A subscription to a store's committed changes.
///
/// The feed holds a bounded number of changes for each subscriber. One that does not keep up never
/// slows the store or other subscribers: it gets [`FeedItem::Lagged`] instead, once, and goes on.
#[derive(Debug)]
pub struct ChangeFeed {
    rx: broadcast::Receiver<Arc<Change>>,
}

impl ChangeFeed {
    /// Wraps a broadcast receiver; backends publish each committed change on the sender.
    pub fn new(rx: broadcast::Receiver<Arc<Change>>) -> Self {
        ChangeFeed { rx }
    }

    /// What a backend publishes when the changes it published so far cannot be continued (the
    /// etcd backend after its etcd history was compacted under it): every subscriber gets
    /// [`FeedItem::Lagged`] at that point in the feed, and reads a fresh snapshot.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn reset_marker(revision: crate::Revision) -> Arc<Change> {
        Arc::new(Change::new(revision, Vec::new()))
    }

    /// Waits for the next item.
    pub async fn next(&mut self) -> FeedItem {
        match self.rx.recv().await {
            // A change without events is how a backend tells every subscriber at once that its
            // history broke (see `ChangeFeed::reset_marker`): for each of them, that is a lag.
            Ok(change) if change.events.is_empty() => FeedItem::Lagged,
            Ok(change) => FeedItem::Change(change),
            Err(broadcast::error::RecvError::Lagged(_)) => FeedItem::Lagged,
            Err(broadcast::error::RecvError::Closed) => FeedItem::Closed,
        }
    }
}
