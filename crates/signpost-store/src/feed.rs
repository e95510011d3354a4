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

    /// Waits for the next item.
    pub async fn next(&mut self) -> FeedItem {
        match self.rx.recv().await {
            Ok(change) => FeedItem::Change(change),
            Err(broadcast::error::RecvError::Lagged(_)) => FeedItem::Lagged,
            Err(broadcast::error::RecvError::Closed) => FeedItem::Closed,
        }
    }
}
