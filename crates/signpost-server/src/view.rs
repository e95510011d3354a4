//! Live views: the current instances of one service, kept up to date by one task per followed
//! service and shared by every reader of it.
//!
//! A Watch stream keeps its own view on the client's side; the protocols the server speaks for
//! clients that keep none (xDS today) need the server to hold it. One task per service follows
//! its topic of the [`Hub`] and publishes each new version as one `Arc<LiveView>` on a
//! `tokio::sync::watch` channel: a reader that falls behind skips to the newest version instead
//! of queueing old ones, which is what a reader that sends whole states wants. The view carries
//! a [`Memo`] so that a reader's encoding of a version is made once for all readers.
//!
//! The task starts with the first reader and ends when the last one is gone, or on shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use signpost_store::{Change, FeedItem, Instance, Memo, Revision, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, Topic};
use crate::metrics::Metrics;

/// One version of a service's instances, healthy or not, sorted by id.
#[derive(Debug, Default)]
pub(crate) struct LiveView {
    pub(crate) revision: Revision,
    pub(crate) instances: Vec<Arc<Instance>>,
    /// Room for one encoding of this version, made by the first reader that needs it.
    pub(crate) memo: Memo,
}

/// Where a view is.
#[derive(Debug, Clone)]
pub(crate) enum ViewState {
    /// Its first version is being read from the store.
    Reading,
    Live(Arc<LiveView>),
    /// No more versions come: the store failed or its feed closed, or the server is shutting
    /// down. A reader that still wants the service follows it anew.
    Ended,
}

pub(crate) type ViewReceiver = watch::Receiver<ViewState>;

type Key = (String, String);

/// Where a view task publishes; shared with the map so that new readers can subscribe.
type Publisher = Arc<watch::Sender<ViewState>>;

/// The followed services and their views.
pub(crate) struct Views {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    metrics: Option<Arc<Metrics>>,
    followed: Mutex<HashMap<Key, Publisher>>,
}

impl std::fmt::Debug for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Views")
            .field("followed", &self.followed().len())
            .finish_non_exhaustive()
    }
}

impl Views {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Views {
            store,
            hub,
            shutdown,
            metrics,
            followed: Mutex::default(),
        }
    }

    fn count(&self, followed: usize) {
        if let Some(m) = &self.metrics {
            m.live_views(followed);
        }
    }

    fn followed(&self) -> MutexGuard<'_, HashMap<Key, Publisher>> {
        // The map is changed by single inserts and removes: a panic cannot leave it half-done.
        self.followed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `namespace`/`service` has an instance now (a store read, no view); true when the
    /// store cannot say, so that following it reports the failure.
    pub(crate) fn has_instances(&self, namespace: &str, service: &str) -> bool {
        self.store
            .list(namespace, service)
            .map_or(true, |snapshot| !snapshot.instances.is_empty())
    }

    /// The live view of `namespace`/`service`, followed from now until the receiver (and every
    /// other one of the same service) is dropped.
    pub(crate) fn follow(self: &Arc<Self>, namespace: &str, service: &str) -> ViewReceiver {
        let key = (namespace.to_owned(), service.to_owned());
        let mut followed = self.followed();
        if let Some(tx) = followed.get(&key) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(ViewState::Reading);
        let tx = Arc::new(tx);
        followed.insert(key.clone(), tx.clone());
        self.count(followed.len());
        // Subscribed before the task reads its start, so no change falls between the two.
        let topic = self.hub.subscribe(namespace, service);
        tokio::spawn(self.clone().run(key, tx, topic));
        rx
    }

    async fn run(self: Arc<Self>, key: Key, tx: Publisher, topic: Topic) {
        let mut follower = Follower {
            store: &*self.store,
            key: &key,
            topic,
            current: LiveView::default(),
        };
        loop {
            let published = match follower.start() {
                Ok(view) => view,
                Err(e) => {
                    tracing::warn!(namespace = %key.0, service = %key.1, error = %e, "cannot read a service for its live view");
                    break;
                }
            };
            tx.send_replace(ViewState::Live(published));
            let lagged = loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => break None,
                    _ = tx.closed() => {
                        // Only under the map's lock is "no reader" final: `follow` subscribes
                        // under it.
                        let mut followed = self.followed();
                        if tx.receiver_count() == 0 {
                            followed.remove(&key);
                            self.count(followed.len());
                            return;
                        }
                        continue;
                    }
                    item = follower.topic.next() => match follower.apply(item) {
                        Step::Changed => {
                            // Take in whatever else is already there: one version for a burst.
                            let mut lagged = false;
                            while let Some(item) = follower.topic.try_next() {
                                match follower.apply(item) {
                                    Step::Changed | Step::Same => {}
                                    Step::Lagged => { lagged = true; break }
                                    Step::Closed => return self.end(&key, &tx),
                                }
                            }
                            if lagged { break Some(()) }
                            tx.send_replace(ViewState::Live(follower.publish()));
                        }
                        Step::Same => {}
                        Step::Lagged => break Some(()),
                        Step::Closed => return self.end(&key, &tx),
                    },
                }
            };
            if lagged.is_none() {
                break;
            }
            // Changes may be missing: read the service afresh.
        }
        self.end(&key, &tx);
    }

    /// Stops following: readers see the end, and the service is followed anew by the next
    /// reader.
    fn end(&self, key: &Key, tx: &watch::Sender<ViewState>) {
        let mut followed = self.followed();
        if followed.get(key).is_some_and(|t| std::ptr::eq(&**t, tx)) {
            followed.remove(key);
            self.count(followed.len());
        }
        tx.send_replace(ViewState::Ended);
    }
}

enum Step {
    Changed,
    Same,
    Lagged,
    Closed,
}

/// The state one view task keeps: what it last read, and the topic it reads on.
struct Follower<'a> {
    store: &'a dyn Store,
    key: &'a Key,
    topic: Topic,
    current: LiveView,
}

impl Follower<'_> {
    /// Reads the service from the store; the topic goes on after the revision read.
    fn start(&mut self) -> signpost_store::Result<Arc<LiveView>> {
        let snapshot = self.store.list(&self.key.0, &self.key.1)?;
        self.current = LiveView {
            revision: snapshot.revision,
            instances: snapshot.instances,
            memo: Memo::default(),
        };
        Ok(self.publish())
    }

    fn publish(&mut self) -> Arc<LiveView> {
        Arc::new(LiveView {
            revision: self.current.revision,
            instances: self.current.instances.clone(),
            memo: Memo::default(),
        })
    }

    fn apply(&mut self, item: FeedItem) -> Step {
        match item {
            FeedItem::Change(change) if change.revision <= self.current.revision => Step::Same,
            FeedItem::Change(change) => {
                self.current.revision = change.revision;
                if self.apply_change(&change) {
                    Step::Changed
                } else {
                    Step::Same
                }
            }
            FeedItem::Lagged => Step::Lagged,
            FeedItem::Closed => Step::Closed,
        }
    }

    /// Applies the events of `change` that concern this service; whether any did.
    fn apply_change(&mut self, change: &Change) -> bool {
        let (namespace, service) = (&self.key.0, &self.key.1);
        let instances = &mut self.current.instances;
        let mut changed = false;
        for event in &change.events {
            let Some(id) = event
                .current
                .as_deref()
                .or(event.prev.as_deref())
                .filter(|i| i.is_in(namespace, service))
                .map(|i| i.id.as_str())
            else {
                continue;
            };
            changed = true;
            let at = instances.binary_search_by(|i| i.id.as_str().cmp(id));
            match (at, &event.current) {
                (Ok(at), Some(now)) => instances[at] = now.clone(),
                (Err(at), Some(now)) => instances.insert(at, now.clone()),
                (Ok(at), None) => {
                    instances.remove(at);
                }
                (Err(_), None) => {}
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_store::conformance::Shorthand;
    use signpost_store::{MemoryConfig, MemoryStore};
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

    async fn until(rx: &mut ViewReceiver, want: impl Fn(&LiveView) -> bool) -> Arc<LiveView> {
        let wait = async {
            loop {
                if let ViewState::Live(view) = rx.borrow_and_update().clone()
                    && want(&view)
                {
                    return view;
                }
                if rx.changed().await.is_err() {
                    panic!("the view ended");
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), wait).await {
            Ok(view) => view,
            Err(_) => panic!("the view did not get there within 10 s"),
        }
    }

    fn ids(view: &LiveView) -> Vec<&str> {
        view.instances.iter().map(|i| i.id.as_str()).collect()
    }

    #[tokio::test]
    async fn a_view_follows_its_service_alone_and_ends_with_its_last_reader() {
        let store = Arc::new(MemoryStore::new(MemoryConfig::default()));
        store.put(instance("a", "a1"), None).await.unwrap();
        let shutdown = CancellationToken::new();
        let views = Arc::new(Views::new(
            store.clone(),
            Hub::start(store.clone()),
            shutdown.clone(),
            None,
        ));
        let mut rx = views.follow("default", "a");
        let mut rx2 = views.follow("default", "a");
        until(&mut rx, |v| ids(v) == ["a1"]).await;

        store.put(instance("b", "b1"), None).await.unwrap();
        store.put(instance("a", "a0"), None).await.unwrap();
        let view = until(&mut rx2, |v| ids(v) == ["a0", "a1"]).await;
        assert!(view.instances.iter().all(|i| i.service == "a"));
        store
            .delete(&signpost_store::InstanceKey {
                namespace: "default".into(),
                service: "a".into(),
                id: "a1".into(),
            })
            .await
            .unwrap();
        until(&mut rx, |v| ids(v) == ["a0"]).await;

        drop(rx);
        drop(rx2);
        let gone = async {
            while !views.followed().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("the view task ends with its last reader");

        // A new reader starts it again, from the store's current state.
        let mut rx = views.follow("default", "a");
        until(&mut rx, |v| ids(v) == ["a0"]).await;
        shutdown.cancel();
        let ended = async {
            while rx.changed().await.is_ok() {
                if matches!(*rx.borrow(), ViewState::Ended) {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .expect("readers see the end on shutdown");
    }
}
