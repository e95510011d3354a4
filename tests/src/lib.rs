//! The harness for Signpost's end-to-end tests: a real server on `127.0.0.1:0`, a generated
//! client, and a watch view that checks the watch rules on every message it applies; and, in
//! `fake`, a registry whose every answer the test scripts, for the client's edge cases.
//!
//! Tests live in `tests/tests/*.rs`; tests of the `signpost` binary as a process live beside the
//! binary (`crates/signpost/tests/`), where cargo can hand them its path.

pub mod etcd;
pub mod fake;
pub mod greeters;
pub mod http;
pub mod process;
pub mod proxy;
pub mod tls;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_client::RegistryServiceClient;
use signpost_server::{Config, ServeError};
use signpost_store::{MemoryConfig, MemoryStore, Store};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// How long any single condition in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub type Client = RegistryServiceClient<Channel>;

/// A registry served on a loopback port, stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Config::default(), MemoryConfig::default()).await
    }

    pub async fn start_with(config: Config, memory: MemoryConfig) -> Self {
        Self::serve(Arc::new(MemoryStore::new(memory)), config).await
    }

    /// Serves `store`; bound before this returns, so clients can connect at once.
    pub async fn serve(store: Arc<dyn Store>, config: Config) -> Self {
        Self::serve_on(SocketAddr::from(([127, 0, 0, 1], 0)), store, config).await
    }

    /// Serves `store` on `addr`, e.g. the address of a server that was just stopped.
    pub async fn serve_on(addr: SocketAddr, store: Arc<dyn Store>, config: Config) -> Self {
        let listener = must(TcpListener::bind(addr).await, "bind");
        let addr = must(listener.local_addr(), "local_addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(signpost_server::serve(
            store.clone(),
            config,
            listener,
            async {
                let _ = rx.await;
            },
        ));
        TestServer {
            addr,
            store,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        let channel = must(
            Channel::from_shared(self.url()).map(|e| e.connect_timeout(DEADLINE).tcp_nodelay(true)),
            "endpoint",
        )
        .connect()
        .await;
        RegistryServiceClient::new(must(channel, "connect"))
    }

    /// Stops gracefully and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => match tokio::time::timeout(DEADLINE, task).await {
                Ok(Ok(result)) => result,
                Ok(Err(join)) => panic!("server task failed: {join}"),
                Err(_) => panic!("server did not stop within {DEADLINE:?}"),
            },
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Unwraps in test code with the step named, so a failure says where.
#[track_caller]
pub fn must<T, E: std::fmt::Debug>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("{what} failed: {e:?}"),
    }
}

/// Waits for `future`, failing the test after [`DEADLINE`].
#[track_caller]
pub fn within<F: Future>(what: &'static str, future: F) -> impl Future<Output = F::Output> {
    within_for(DEADLINE, what, future)
}

#[track_caller]
pub fn within_for<F: Future>(
    limit: Duration,
    what: &'static str,
    future: F,
) -> impl Future<Output = F::Output> {
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(limit, future).await {
            Ok(v) => v,
            Err(_) => panic!("{what}: not done within {limit:?} (at {caller})"),
        }
    }
}

pub fn instance(service: &str, id: &str, port: u32) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port,
        ..Default::default()
    }
}

pub fn register_request(instance: pb::Instance, ttl: Option<Duration>) -> pb::RegisterRequest {
    pb::RegisterRequest {
        instance: Some(instance),
        ttl: ttl.map(|d| prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }),
        lease_id: 0,
    }
}

pub async fn register(client: &mut Client, instance: pb::Instance) -> pb::RegisterResponse {
    must(
        client.register(register_request(instance, None)).await,
        "register",
    )
    .into_inner()
}

pub async fn discover(client: &mut Client, request: pb::DiscoverRequest) -> pb::DiscoverResponse {
    must(client.discover(request).await, "discover").into_inner()
}

/// A client-side view built only from a Watch stream, checking the watch rules as it goes:
/// the first message is a reset, events come in revision order, ADDED only for what is not in
/// the view, UPDATED and REMOVED only for what is.
#[derive(Debug)]
pub struct WatchView {
    stream: Streaming<pb::WatchResponse>,
    pub instances: BTreeMap<String, pb::Instance>,
    pub revision: u64,
    pub resets: usize,
    pub messages: usize,
    /// Every event applied outside resets, in order.
    pub events: Vec<pb::Event>,
    started: bool,
}

impl WatchView {
    pub async fn open(client: &mut Client, request: pb::WatchRequest) -> Self {
        let stream = must(client.watch(request).await, "watch").into_inner();
        WatchView {
            stream,
            instances: BTreeMap::new(),
            revision: 0,
            resets: 0,
            messages: 0,
            events: Vec::new(),
            started: false,
        }
    }

    /// A view that already holds `instances` at `revision`, for a stream resumed with
    /// `start_revision`: its first message need not be a reset.
    pub async fn resume(
        client: &mut Client,
        request: pb::WatchRequest,
        instances: BTreeMap<String, pb::Instance>,
    ) -> Self {
        let revision = request.start_revision;
        let mut view = Self::open(client, request).await;
        view.instances = instances;
        view.revision = revision;
        view.started = true;
        view
    }

    /// Receives and applies one message. `Err` when the stream ends with a status.
    pub async fn next(&mut self) -> Result<pb::WatchResponse, Status> {
        let message = match self.stream.message().await? {
            Some(m) => m,
            None => return Err(Status::aborted("watch stream ended without a status")),
        };
        self.apply(&message);
        Ok(message)
    }

    fn apply(&mut self, m: &pb::WatchResponse) {
        self.messages += 1;
        assert!(
            self.started || m.reset,
            "the first message of a fresh watch must be a reset: {m:?}"
        );
        self.started = true;
        // A reset replaces the view whatever it held; anything else must move forward.
        assert!(
            m.reset || m.revision >= self.revision,
            "revision went backwards: {} after {}",
            m.revision,
            self.revision
        );
        if m.reset {
            self.resets += 1;
            self.instances.clear();
            for e in &m.events {
                assert_eq!(e.r#type(), pb::EventType::Added, "reset events are ADDED");
                let i = must(e.instance.clone().ok_or("no instance"), "reset event");
                assert!(
                    self.instances.insert(i.id.clone(), i).is_none(),
                    "duplicate in reset"
                );
            }
        } else {
            let mut last = self.revision;
            for e in &m.events {
                assert!(
                    e.revision > self.revision,
                    "event at or before the view's revision: {e:?}"
                );
                assert!(e.revision >= last, "events out of order");
                last = e.revision;
                let i = must(e.instance.clone().ok_or("no instance"), "event");
                match e.r#type() {
                    pb::EventType::Added => {
                        assert!(
                            self.instances.insert(i.id.clone(), i).is_none(),
                            "ADDED for an instance already in the view: {e:?}"
                        );
                        assert_eq!(e.reason(), pb::RemovalReason::Unspecified);
                    }
                    pb::EventType::Updated => {
                        assert!(
                            self.instances.insert(i.id.clone(), i).is_some(),
                            "UPDATED for an instance not in the view: {e:?}"
                        );
                    }
                    pb::EventType::Removed => {
                        assert!(
                            self.instances.remove(&i.id).is_some(),
                            "REMOVED for an instance not in the view: {e:?}"
                        );
                        assert_ne!(
                            e.reason(),
                            pb::RemovalReason::Unspecified,
                            "REMOVED needs a reason"
                        );
                    }
                    pb::EventType::Unspecified => panic!("event without a type: {e:?}"),
                }
                self.events.push(e.clone());
            }
        }
        self.revision = m.revision;
    }

    /// Applies messages until the view has reached `revision`.
    pub async fn until_revision(&mut self, revision: u64) {
        within("watch reaching a revision", async {
            while self.revision < revision {
                must(self.next().await, "watch message");
            }
        })
        .await
    }

    /// Applies messages until `done` holds for the view.
    pub async fn until(&mut self, what: &'static str, mut done: impl FnMut(&WatchView) -> bool) {
        within(what, async {
            while !done(self) {
                must(self.next().await, "watch message");
            }
        })
        .await
    }

    pub fn ids(&self) -> Vec<String> {
        self.instances.keys().cloned().collect()
    }
}

pub fn watch_request(service: &str) -> pb::WatchRequest {
    pb::WatchRequest {
        service: service.into(),
        ..Default::default()
    }
}

/// The ids of a Discover answer, sorted.
pub fn ids(instances: &[pb::Instance]) -> Vec<String> {
    let mut ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    ids
}
