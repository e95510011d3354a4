//! Routes the store's one feed of changes to the watch streams of each service.
//!
//! Every stream used to read the store's whole feed and skip what its filter did not want, so a
//! change woke every stream of every service: with 10,000 streams, a burst of lease expiries in
//! other services held up each stream's own changes for seconds. Here one task reads the feed and
//! passes each change on to the topics of the services it touches; a stream follows only its
//! service's topic.
//!
//! The router reads the store's feed like any subscriber, and can fall behind it (a burst of
//! writes while it waits for a core). It then catches up from the store's history, which holds
//! far more than the feed, passing on every change it missed; only when the history no longer
//! holds them all does every stream start over from a reset. So one slow reader costs only its
//! own streams, never every stream of the server.
//!
//! A topic exists while some stream follows it. A stream subscribes to its topic before it reads
//! its start from the store, so that every change after the start reaches it (see
//! [`Store::changes`]); the ones at or before the start it skips, as it did with the store's feed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use signpost_store::{Change, ChangeFeed, FeedItem, Store, WatchStart};
use tokio::sync::broadcast;

/// How many changes of its own service a stream may fall behind before it gets a fresh reset
/// instead. Each followed service's topic holds this many slots, allocated up front.
const TOPIC_CAPACITY: usize = 128;

#[derive(Debug, Clone)]
enum Item {
    Change(Arc<Change>),
    /// The router itself fell behind the store, or the store's history broke: changes may be
    /// missing, so every stream starts over from a fresh reset.
    Lagged,
}

type Topics = HashMap<String, HashMap<String, broadcast::Sender<Item>>>;

#[derive(Debug, Default)]
pub(crate) struct Hub {
    topics: Mutex<Topics>,
    /// The revision of the last change passed on: every change up to it is in its topics.
    routed: AtomicU64,
    /// How often the router fell behind the store's feed and caught up from its history.
    catch_ups: AtomicU64,
}

impl Hub {
    /// A hub fed by `store`'s changes; its task ends when the store's feed closes.
    pub(crate) fn start(store: Arc<dyn Store>) -> Arc<Hub> {
        let hub = Arc::new(Hub::default());
        let feed = store.changes();
        // Every change after this revision comes on the feed subscribed just before: the point
        // a catch-up starts from if the router falls behind before it has routed anything.
        if let Ok(usage) = store.usage("", "") {
            hub.routed.store(usage.revision, Ordering::Release);
        }
        tokio::spawn(route(feed, store, Arc::downgrade(&hub)));
        hub
    }

    fn topics(&self) -> MutexGuard<'_, Topics> {
        // A panic while the lock was held cannot leave the map half-changed in a way that
        // matters: at worst a topic lingers until its next change.
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the changes of `namespace`/`service` from now on.
    pub(crate) fn subscribe(self: &Arc<Self>, namespace: &str, service: &str) -> Topic {
        let mut topics = self.topics();
        let rx = topics
            .entry(namespace.to_owned())
            .or_default()
            .entry(service.to_owned())
            .or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0)
            .subscribe();
        Topic {
            rx: Some(rx),
            hub: Arc::downgrade(self),
            namespace: namespace.to_owned(),
            service: service.to_owned(),
        }
    }
}

async fn route(mut feed: ChangeFeed, store: Arc<dyn Store>, hub: Weak<Hub>) {
    loop {
        let item = match feed.next().await {
            FeedItem::Lagged => {
                let Some(hub) = hub.upgrade() else { return };
                catch_up(&*store, &hub).await
            }
            item => item,
        };
        let Some(hub) = hub.upgrade() else { return };
        match hub.pass_on(item) {
            Routed::Closed => return,
            // Let the streams of a filling topic run before more is routed to it, so that a
            // burst from the store does not overrun streams that are keeping up.
            Routed::Filling => tokio::task::yield_now().await,
            Routed::Ok => {}
        }
    }
}

/// After the router fell behind its feed: passes on every change since the last one routed, from
/// the store's history. `Lagged` (every stream starts over) only when the history does not hold
/// them all any more.
async fn catch_up(store: &dyn Store, hub: &Hub) -> FeedItem {
    let routed = hub.routed.load(Ordering::Acquire);
    match store.watch("", "", Some(routed)).await {
        Ok(WatchStart::Replay { changes, .. }) => {
            tracing::debug!(
                from = routed,
                changes = changes.len(),
                "watch router caught up from history"
            );
            hub.catch_ups.fetch_add(1, Ordering::Relaxed);
            for change in changes {
                match hub.pass_on(FeedItem::Change(change)) {
                    Routed::Closed => return FeedItem::Closed,
                    // As when routing the feed: let a filling topic's streams read before more
                    // comes, or the replay would overflow the topics it is there to keep whole.
                    Routed::Filling => tokio::task::yield_now().await,
                    Routed::Ok => {}
                }
            }
            // Nothing more to pass on here: the feed goes on, and repeats are skipped.
            FeedItem::Change(Arc::new(Change::new(0, Vec::new())))
        }
        Ok(WatchStart::Snapshot(_)) | Err(_) => FeedItem::Lagged,
    }
}

enum Routed {
    Ok,
    /// A topic that got the change holds half its capacity or more.
    Filling,
    /// The store's feed closed; so did every topic.
    Closed,
}

impl Hub {
    /// Sends `item` to the topics it concerns.
    fn pass_on(&self, item: FeedItem) -> Routed {
        let mut topics = self.topics();
        match item {
            // A change already passed on (the feed repeating what a catch-up took from the
            // history), or nothing at all.
            FeedItem::Change(change) if change.revision <= self.routed.load(Ordering::Acquire) => {
                Routed::Ok
            }
            FeedItem::Change(change) => {
                let mut routed = Routed::Ok;
                for (namespace, service) in services(&change) {
                    let Some(in_namespace) = topics.get_mut(namespace) else {
                        continue;
                    };
                    let Some(topic) = in_namespace.get(service) else {
                        continue;
                    };
                    let gone = topic.send(Item::Change(change.clone())).is_err();
                    if topic.len() >= TOPIC_CAPACITY / 2 {
                        routed = Routed::Filling;
                    }
                    if gone {
                        in_namespace.remove(service);
                        if in_namespace.is_empty() {
                            topics.remove(namespace);
                        }
                    }
                }
                self.routed.fetch_max(change.revision, Ordering::Release);
                routed
            }
            FeedItem::Lagged => {
                tracing::warn!(
                    "changes may be missing (the watch router fell behind the store, or the \
                     store's history broke): every watch starts over"
                );
                for topic in topics.values().flat_map(HashMap::values) {
                    let _ = topic.send(Item::Lagged);
                }
                Routed::Ok
            }
            FeedItem::Closed => {
                // Dropping the senders closes every topic.
                topics.clear();
                Routed::Closed
            }
        }
    }
}

/// The services a change touches, each once (most changes touch one).
fn services(change: &Change) -> Vec<(&str, &str)> {
    let mut services: Vec<(&str, &str)> = Vec::with_capacity(1);
    for event in &change.events {
        if let Some(i) = event.current.as_deref().or(event.prev.as_deref()) {
            let service = (i.namespace.as_str(), i.service.as_str());
            if !services.contains(&service) {
                services.push(service);
            }
        }
    }
    services
}

/// One stream's subscription to its service's changes. Dropping it removes the topic once no
/// stream follows it.
#[derive(Debug)]
pub(crate) struct Topic {
    rx: Option<broadcast::Receiver<Item>>,
    hub: Weak<Hub>,
    namespace: String,
    service: String,
}

impl Topic {
    /// Waits for the next change to the service, as the store's feed would give it.
    pub(crate) async fn next(&mut self) -> FeedItem {
        let Some(rx) = self.rx.as_mut() else {
            return FeedItem::Closed;
        };
        match rx.recv().await {
            Ok(Item::Change(change)) => FeedItem::Change(change),
            Ok(Item::Lagged) | Err(broadcast::error::RecvError::Lagged(_)) => FeedItem::Lagged,
            Err(broadcast::error::RecvError::Closed) => FeedItem::Closed,
        }
    }
}

impl Topic {
    /// The next change already in the topic, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<FeedItem> {
        let Some(rx) = self.rx.as_mut() else {
            return Some(FeedItem::Closed);
        };
        match rx.try_recv() {
            Ok(Item::Change(change)) => Some(FeedItem::Change(change)),
            Ok(Item::Lagged) | Err(broadcast::error::TryRecvError::Lagged(_)) => {
                Some(FeedItem::Lagged)
            }
            Err(broadcast::error::TryRecvError::Closed) => Some(FeedItem::Closed),
            Err(broadcast::error::TryRecvError::Empty) => None,
        }
    }

    /// How far the router has passed changes on: those of this topic's service up to here are
    /// already in the topic. Read before draining the topic.
    pub(crate) fn routed(&self) -> u64 {
        self.hub
            .upgrade()
            .map_or(0, |hub| hub.routed.load(Ordering::Acquire))
    }
}

impl Drop for Topic {
    fn drop(&mut self) {
        drop(self.rx.take());
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let mut topics = hub.topics();
        if let Some(in_namespace) = topics.get_mut(&self.namespace) {
            if in_namespace
                .get(&self.service)
                .is_some_and(|topic| topic.receiver_count() == 0)
            {
                in_namespace.remove(&self.service);
            }
            if in_namespace.is_empty() {
                topics.remove(&self.namespace);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_store::conformance::Shorthand;
    use signpost_store::{Instance, MemoryConfig, MemoryStore};
    use std::time::Duration;

    fn instance(service: &str, id: &str) -> Instance {
        Instance {
            namespace: "default".into(),
            service: service.into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port: 80,
            ..Instance::default()
        }
    }

    async fn next(topic: &mut Topic) -> FeedItem {
        match tokio::time::timeout(Duration::from_secs(10), topic.next()).await {
            Ok(item) => item,
            Err(_) => panic!("no change within 10 s"),
        }
    }

    #[tokio::test]
    async fn a_topic_gets_its_services_changes_only_and_goes_when_its_last_stream_does() {
        let store = Arc::new(MemoryStore::new(MemoryConfig::default()));
        let hub = Hub::start(store.clone());
        let mut a = hub.subscribe("default", "a");
        let mut a2 = hub.subscribe("default", "a");
        let b = hub.subscribe("default", "b");

        store.put(instance("c", "c1"), None).await.unwrap();
        let put = store.put(instance("a", "a1"), None).await.unwrap();
        for topic in [&mut a, &mut a2] {
            match next(topic).await {
                FeedItem::Change(change) => assert_eq!(change.revision, put.mod_revision),
                other => panic!("expected the change to a, got {other:?}"),
            }
        }
        // b saw nothing; the router has passed everything up to the change to a.
        let mut b = b;
        assert_eq!(b.try_next(), None);
        assert!(b.routed() >= put.mod_revision);

        drop(a);
        assert!(
            hub.topics()["default"].contains_key("a"),
            "a2 still follows a"
        );
        drop(a2);
        drop(b);
        assert!(hub.topics().is_empty(), "{:?}", hub.topics());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_router_that_falls_behind_the_feed_catches_up_from_history_without_a_reset() {
        // A feed of 4 and a history of 1,000: 200 writes made before the router gets to run
        // overflow its feed by far.
        let store = Arc::new(MemoryStore::new(MemoryConfig {
            history_limit: 1_000,
            feed_capacity: 4,
        }));
        let hub = Hub::start(store.clone());
        let mut a = hub.subscribe("default", "a");
        let mut b = hub.subscribe("default", "b");
        let mut written = Vec::new();
        for n in 0..200 {
            // The memory store answers at once: the router task does not run in between.
            let service = if n % 2 == 0 { "a" } else { "b" };
            let put = store
                .put(instance(service, &n.to_string()), None)
                .await
                .unwrap();
            written.push((service, put.mod_revision));
        }
        for (topic, service) in [(&mut a, "a"), (&mut b, "b")] {
            let want: Vec<u64> = written
                .iter()
                .filter(|(s, _)| *s == service)
                .map(|(_, r)| *r)
                .collect();
            let mut got = Vec::new();
            while got.len() < want.len() {
                match next(topic).await {
                    FeedItem::Change(change) => got.push(change.revision),
                    other => panic!("{service}: expected a change, got {other:?}"),
                }
            }
            assert_eq!(got, want, "{service}: every change, in order, none twice");
        }
        assert!(
            hub.catch_ups.load(Ordering::Relaxed) >= 1,
            "the router fell behind"
        );
    }
}
