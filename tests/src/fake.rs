//! A registry whose every answer the test gives, to drive the client through what a real server
//! seldom does on cue: a reset mid-stream, an event type from a newer server, a stream that ends
//! or stalls, a lease reported expired, a limit reached.
//!
//! The test receives a handle for each Watch and KeepAlive stream the client opens and answers
//! on it; Register and Deregister take their answers, in order, from a script the test fills,
//! and wait while it is empty, so a test can hold a call in flight for as long as it likes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_server::{RegistryService, RegistryServiceServer};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{must, within};

type Answers<T> = Arc<Mutex<mpsc::UnboundedReceiver<Result<T, Status>>>>;

/// One Watch stream the client opened.
#[derive(Debug)]
pub struct WatchHandle {
    /// What the client asked for, `start_revision` included.
    pub request: pb::WatchRequest,
    /// The stream's messages; dropping it ends the stream cleanly, an `Err` ends it with that
    /// status, and sending nothing (without dropping it) is a stall.
    pub tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
}

impl WatchHandle {
    /// Sends a message, failing the test if the client no longer reads this stream.
    pub async fn send(&self, message: pb::WatchResponse) {
        must(
            within("a watch message sent", self.tx.send(Ok(message))).await,
            "send a watch message (the client closed the stream)",
        );
    }

    /// Waits until the client has dropped this stream.
    pub async fn closed(&self) {
        within("the client closing a watch stream", self.tx.closed()).await
    }
}

/// One KeepAlive stream the client opened.
#[derive(Debug)]
pub struct KeepAliveHandle {
    leases: mpsc::UnboundedReceiver<u64>,
    /// The stream's answers; dropping it ends the stream.
    pub tx: mpsc::Sender<Result<pb::KeepAliveResponse, Status>>,
}

impl KeepAliveHandle {
    /// The next lease id the client refreshed; `None` once the client closed the stream.
    pub async fn next_lease(&mut self) -> Option<u64> {
        within("a keep-alive request", self.leases.recv()).await
    }

    /// Waits for a refresh of `lease`, skipping refreshes of others.
    pub async fn until_lease(&mut self, lease: u64) {
        within("a keep-alive request for a lease", async {
            loop {
                match self.leases.recv().await {
                    Some(id) if id == lease => return,
                    Some(_) => {}
                    None => panic!("the keep-alive stream closed before lease {lease} came"),
                }
            }
        })
        .await
    }

    /// Waits until the client has dropped this stream.
    pub async fn closed_by_client(&self) {
        within("the client closing a keep-alive stream", self.tx.closed()).await
    }

    /// Answers that `lease` is alive.
    pub async fn refreshed(&self, lease: u64, ttl: Duration) {
        self.answer(pb::KeepAliveResponse {
            lease_id: lease,
            ttl: Some(duration(ttl)),
            expired: false,
        })
        .await
    }

    /// Answers that `lease` is gone, as a registry that restarted or timed it out does.
    pub async fn expired(&self, lease: u64) {
        self.answer(pb::KeepAliveResponse {
            lease_id: lease,
            ttl: None,
            expired: true,
        })
        .await
    }

    async fn answer(&self, answer: pb::KeepAliveResponse) {
        must(
            within("a keep-alive answer sent", self.tx.send(Ok(answer))).await,
            "send a keep-alive answer (the client closed the stream)",
        );
    }
}

/// The fake registry on a loopback port, stopped when dropped.
#[derive(Debug)]
pub struct FakeRegistry {
    pub addr: SocketAddr,
    watches: mpsc::UnboundedReceiver<WatchHandle>,
    keep_alives: mpsc::UnboundedReceiver<KeepAliveHandle>,
    registers: mpsc::UnboundedReceiver<pb::RegisterRequest>,
    deregisters: mpsc::UnboundedReceiver<pb::DeregisterRequest>,
    register_script: mpsc::UnboundedSender<Result<pb::RegisterResponse, Status>>,
    deregister_script: mpsc::UnboundedSender<Result<pb::DeregisterResponse, Status>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl FakeRegistry {
    /// Serves on `127.0.0.1:0`; bound before this returns, so clients can connect at once.
    pub async fn start() -> Self {
        let listener = must(
            TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await,
            "bind",
        );
        let addr = must(listener.local_addr(), "local_addr");
        let (watch_tx, watches) = mpsc::unbounded_channel();
        let (keep_alive_tx, keep_alives) = mpsc::unbounded_channel();
        let (register_tx, registers) = mpsc::unbounded_channel();
        let (deregister_tx, deregisters) = mpsc::unbounded_channel();
        let (register_script, register_answers) = mpsc::unbounded_channel();
        let (deregister_script, deregister_answers) = mpsc::unbounded_channel();
        let service = Fake {
            watches: watch_tx,
            keep_alives: keep_alive_tx,
            registers: register_tx,
            deregisters: deregister_tx,
            register_answers: Arc::new(Mutex::new(register_answers)),
            deregister_answers: Arc::new(Mutex::new(deregister_answers)),
        };
        let (shutdown, stopped) = oneshot::channel::<()>();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RegistryServiceServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        FakeRegistry {
            addr,
            watches,
            keep_alives,
            registers,
            deregisters,
            register_script,
            deregister_script,
            shutdown: Some(shutdown),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next Watch stream the client opens.
    pub async fn next_watch(&mut self) -> WatchHandle {
        let watch = within("the client opening a watch", self.watches.recv()).await;
        must(watch.ok_or("the fake registry stopped"), "next watch")
    }

    /// A Watch stream opened since the last one taken, if any.
    pub fn try_next_watch(&mut self) -> Option<WatchHandle> {
        self.watches.try_recv().ok()
    }

    /// The next KeepAlive stream the client opens.
    pub async fn next_keep_alive(&mut self) -> KeepAliveHandle {
        let stream = within(
            "the client opening a keep-alive stream",
            self.keep_alives.recv(),
        )
        .await;
        must(
            stream.ok_or("the fake registry stopped"),
            "next keep-alive stream",
        )
    }

    /// The next Register request received (answered or not).
    pub async fn next_register(&mut self) -> pb::RegisterRequest {
        let request = within("a register request", self.registers.recv()).await;
        must(request.ok_or("the fake registry stopped"), "next register")
    }

    /// A Register request received since the last one taken, if any.
    pub fn try_next_register(&mut self) -> Option<pb::RegisterRequest> {
        self.registers.try_recv().ok()
    }

    /// The answer to the next Register call that has none yet.
    pub fn answer_register(&self, answer: Result<pb::RegisterResponse, Status>) {
        must(
            self.register_script.send(answer).map_err(|_| "stopped"),
            "script a register answer",
        );
    }

    /// The next Deregister request received (answered or not).
    pub async fn next_deregister(&mut self) -> pb::DeregisterRequest {
        let request = within("a deregister request", self.deregisters.recv()).await;
        must(
            request.ok_or("the fake registry stopped"),
            "next deregister",
        )
    }

    /// The answer to the next Deregister call that has none yet.
    pub fn answer_deregister(&self, answer: Result<pb::DeregisterResponse, Status>) {
        must(
            self.deregister_script.send(answer).map_err(|_| "stopped"),
            "script a deregister answer",
        );
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A Register answer granting `lease`.
pub fn leased(lease: u64, ttl: Duration) -> pb::RegisterResponse {
    pb::RegisterResponse {
        instance: None,
        lease_id: lease,
        ttl: Some(duration(ttl)),
        revision: 0,
    }
}

/// A reset: the whole view at `revision`.
pub fn reset(revision: u64, instances: &[pb::Instance]) -> pb::WatchResponse {
    pb::WatchResponse {
        revision,
        reset: true,
        events: instances
            .iter()
            .map(|i| event(pb::EventType::Added as i32, i, revision))
            .collect(),
    }
}

/// A message of changes at `revision`.
pub fn changes(revision: u64, events: Vec<pb::Event>) -> pb::WatchResponse {
    pb::WatchResponse {
        revision,
        reset: false,
        events,
    }
}

/// A progress message: nothing changed up to `revision`.
pub fn progress(revision: u64) -> pb::WatchResponse {
    changes(revision, Vec::new())
}

/// An event of type `kind`, a raw number so that a test can send one no enum value names.
pub fn event(kind: i32, instance: &pb::Instance, revision: u64) -> pb::Event {
    let removed = kind == pb::EventType::Removed as i32;
    pb::Event {
        r#type: kind,
        instance: Some(instance.clone()),
        reason: if removed {
            pb::RemovalReason::Deregistered as i32
        } else {
            pb::RemovalReason::Unspecified as i32
        },
        revision,
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

struct Fake {
    watches: mpsc::UnboundedSender<WatchHandle>,
    keep_alives: mpsc::UnboundedSender<KeepAliveHandle>,
    registers: mpsc::UnboundedSender<pb::RegisterRequest>,
    deregisters: mpsc::UnboundedSender<pb::DeregisterRequest>,
    register_answers: Answers<pb::RegisterResponse>,
    deregister_answers: Answers<pb::DeregisterResponse>,
}

/// The next scripted answer, waiting for one while there is none.
async fn scripted<T>(answers: &Answers<T>) -> Result<Response<T>, Status> {
    match answers.lock().await.recv().await {
        Some(answer) => answer.map(Response::new),
        None => Err(Status::unavailable("the fake registry stopped")),
    }
}

#[tonic::async_trait]
impl RegistryService for Fake {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let _ = self.registers.send(request.into_inner());
        scripted(&self.register_answers).await
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let _ = self.deregisters.send(request.into_inner());
        scripted(&self.deregister_answers).await
    }

    type KeepAliveStream = ReceiverStream<Result<pb::KeepAliveResponse, Status>>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (leases_tx, leases) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(Ok(request)) = inbound.next().await {
                if leases_tx.send(request.lease_id).is_err() {
                    return;
                }
            }
        });
        let _ = self.keep_alives.send(KeepAliveHandle { leases, tx });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn discover(
        &self,
        _: Request<pb::DiscoverRequest>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        Err(Status::unimplemented(
            "the fake registry answers no Discover",
        ))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let _ = self.watches.send(WatchHandle {
            request: request.into_inner(),
            tx,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        Err(Status::unimplemented(
            "the fake registry answers no ListServices",
        ))
    }
}
