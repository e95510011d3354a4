//! A `tonic::transport::Channel` that spreads calls over the live instances of a service,
//! fed by a watch: every ADDED inserts an endpoint, every REMOVED removes it, an UPDATED that
//! moves an instance replaces it. While the registry is unreachable the last known endpoints stay
//! in place, so calls keep flowing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

use crate::client::Client;
use crate::types::Instance;
use crate::watcher::{View, WatchCounts, WatchStats, Watcher};
use crate::{Error, Filter, Result};

type Configure = Arc<dyn Fn(Endpoint) -> Endpoint + Send + Sync>;

/// Builds a [`BalancedChannel`]; from [`Client::balanced`].
pub struct BalancedChannelBuilder {
    client: Client,
    filter: Filter,
    configure: Configure,
}

impl std::fmt::Debug for BalancedChannelBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancedChannelBuilder")
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

impl BalancedChannelBuilder {
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.filter = self.filter.tag(tag);
        self
    }

    pub fn selector(mut self, selector: impl Into<String>) -> Self {
        self.filter = self.filter.selector(selector);
        self
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.filter = self.filter.namespace(namespace);
        self
    }

    /// Settings for every backend endpoint (timeouts, keep-alive, TLS), applied to each
    /// instance's `Endpoint` before it joins the balancer.
    pub fn configure_endpoint(
        mut self,
        configure: impl Fn(Endpoint) -> Endpoint + Send + Sync + 'static,
    ) -> Self {
        self.configure = Arc::new(configure);
        self
    }

    /// Starts the watch behind the channel. Must be called inside a Tokio runtime.
    pub fn build(self) -> BalancedChannel {
        let (channel, changes) = Channel::balance_channel::<String>(64);
        let (view_tx, view_rx) = watch::channel(Arc::new(View::default()));
        let view_rx = Arc::new(view_rx);
        self.client.publish_view(&self.filter, &view_rx);
        let watcher = Watcher::new(self.client.conn.clone(), self.filter.clone());
        let stats = watcher.stats.clone();
        let (error_tx, error) = watch::channel(None);
        tokio::spawn(feed(watcher, changes, view_tx, error_tx, self.configure));
        BalancedChannel {
            channel,
            view: view_rx,
            stats,
            error,
            filter: self.filter,
        }
    }
}

/// A load-balanced channel over the live instances of a service. Clone it freely; the watch
/// behind it ends when the last clone of it and of its [`channel`](Self::channel) are dropped.
#[derive(Debug, Clone)]
pub struct BalancedChannel {
    channel: Channel,
    view: Arc<watch::Receiver<Arc<View>>>,
    stats: Arc<WatchStats>,
    error: watch::Receiver<Option<Error>>,
    filter: Filter,
}

impl BalancedChannel {
    /// The channel to build generated clients on: `GreeterClient::new(balanced.channel())`.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The instances the channel currently balances over, sorted by id.
    pub fn instances(&self) -> Vec<Instance> {
        self.view.borrow().instances.values().cloned().collect()
    }

    /// What the watch behind the channel has been through.
    pub fn watch_counts(&self) -> WatchCounts {
        self.stats.counts()
    }

    /// Waits until the channel has at least one instance, or `timeout` passes.
    pub async fn wait_for_ready(&self, timeout: Duration) -> Result<()> {
        let mut view = (*self.view).clone();
        let mut error = self.error.clone();
        let wait = async {
            loop {
                if !view.borrow_and_update().instances.is_empty() {
                    return Ok(());
                }
                if let Some(e) = error.borrow_and_update().clone() {
                    return Err(e);
                }
                tokio::select! {
                    changed = view.changed() => if changed.is_err() { return Err(Error::Stopped) },
                    changed = error.changed() => if changed.is_err() { return Err(Error::Stopped) },
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable {
                address: format!("service {}", self.filter.service_name()),
                reason: format!("no instance became available within {timeout:?}"),
            }),
        }
    }
}

impl Client {
    /// A builder for a balanced channel over `service`'s healthy instances.
    pub fn balanced(&self, service: impl Into<String>) -> BalancedChannelBuilder {
        BalancedChannelBuilder {
            client: self.clone(),
            filter: Filter::service(service),
            configure: Arc::new(|endpoint| endpoint),
        }
    }

    /// A balanced channel over `service`'s healthy instances, with default settings.
    pub fn channel(&self, service: impl Into<String>) -> BalancedChannel {
        self.balanced(service).build()
    }
}

async fn feed(
    mut watcher: Watcher,
    changes: mpsc::Sender<Change<String, Endpoint>>,
    view: watch::Sender<Arc<View>>,
    error: watch::Sender<Option<Error>>,
    configure: Configure,
) {
    // What the balancer holds: id -> uri.
    let mut endpoints: HashMap<String, String> = HashMap::new();
    loop {
        let update = tokio::select! {
            // Every clone of the channel is gone: the balancer dropped its receiver.
            _ = changes.closed() => return,
            update = watcher.next() => update,
        };
        let update = match update {
            Ok(update) => update,
            Err(e) => {
                tracing::error!(error = %e, "the registry refused this channel's watch; keeping the last endpoints");
                let _ = error.send(Some(e));
                return;
            }
        };
        let mut wanted: Vec<Change<String, Endpoint>> = Vec::new();
        let touched: Vec<Instance> = if update.reset {
            let gone: Vec<String> = endpoints
                .keys()
                .filter(|id| !watcher.view.instances.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                endpoints.remove(&id);
                wanted.push(Change::Remove(id));
            }
            watcher.view.instances.values().cloned().collect()
        } else {
            update.events.iter().map(|e| e.instance().clone()).collect()
        };
        for instance in touched {
            match watcher.view.instances.get(&instance.id) {
                Some(now) if endpoints.get(&now.id) != Some(&now.uri()) => {
                    if endpoints.remove(&now.id).is_some() {
                        wanted.push(Change::Remove(now.id.clone()));
                    }
                    match Endpoint::from_shared(now.uri()) {
                        Ok(endpoint) => {
                            endpoints.insert(now.id.clone(), now.uri());
                            wanted.push(Change::Insert(now.id.clone(), configure(endpoint)));
                        }
                        Err(e) => {
                            tracing::warn!(id = %now.id, uri = %now.uri(), error = %e, "instance address is not a valid endpoint");
                        }
                    }
                }
                None if endpoints.remove(&instance.id).is_some() => {
                    wanted.push(Change::Remove(instance.id.clone()));
                }
                _ => {}
            }
        }
        for change in wanted {
            if changes.send(change).await.is_err() {
                return;
            }
        }
        // Published after the balancer has the changes, so a caller that sees an instance gone
        // from `instances()` knows no new call will be sent to it.
        let _ = view.send(Arc::new(watcher.view.clone()));
    }
}
