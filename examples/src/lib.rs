//! The Greeter used by Signpost's examples and end-to-end tests: a tonic service that answers
//! with its own instance id, so a caller can see which instance the balancer picked.
//!
//! It also serves `grpc.health.v1`, so the registry's gRPC health check can probe it.
//!
//! `greeter-server` registers itself with Signpost and serves it; `greeter-client` calls it
//! through a balanced channel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Generated code for `greeter.v1`.
pub mod pb {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("greeter.v1");
}

use pb::greeter_service_server::{GreeterService, GreeterServiceServer};

/// A Greeter that answers with `id` and counts the calls it served.
#[derive(Debug, Clone)]
pub struct Greeter {
    id: String,
    served: Arc<AtomicU64>,
    // When the first and the latest call were answered, for propagation measurements.
    calls: Arc<Mutex<Option<(Instant, Instant)>>>,
    /// Added to every answer: a slow instance, for the balancer's load awareness.
    delay: Duration,
    /// Answer UNAVAILABLE, as an instance whose own dependency is down would.
    failing: Arc<AtomicBool>,
    /// `grpc.health.v1` on the same port, for the registry's gRPC health checks.
    health: tonic_health::server::HealthReporter,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl Greeter {
    pub fn new(id: impl Into<String>) -> Self {
        let health = tonic_health::server::HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        Greeter {
            id: id.into(),
            served: Arc::default(),
            calls: Arc::default(),
            delay: Duration::ZERO,
            failing: Arc::default(),
            health,
            health_service,
        }
    }

    /// What its health service answers for the whole server (the empty service name): SERVING
    /// from the start, NOT_SERVING after `set_serving(false)`. Calls are answered either way.
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
    }

    /// Answers every call `delay` late.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// From now on answers every call UNAVAILABLE (or again normally).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// When the first call was answered, if any was.
    pub fn first_call(&self) -> Option<Instant> {
        self.lock_calls().map(|(first, _)| first)
    }

    /// When the latest call was answered, if any was.
    pub fn last_call(&self) -> Option<Instant> {
        self.lock_calls().map(|(_, last)| last)
    }

    fn lock_calls(&self) -> Option<(Instant, Instant)> {
        *self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Serves on `listener` until `shutdown` completes, then finishes in-flight calls.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        self.serve_with(tonic::transport::Server::builder(), listener, shutdown)
            .await
    }

    /// Serves over TLS with this certificate and key (PEM); with `client_ca_pem`, callers must
    /// present a certificate that CA signed.
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        cert_pem: &[u8],
        key_pem: &[u8],
        client_ca_pem: Option<&[u8]>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
        if let Some(ca) = client_ca_pem {
            tls = tls.client_ca_root(Certificate::from_pem(ca));
        }
        let builder = tonic::transport::Server::builder().tls_config(tls)?;
        self.serve_with(builder, listener, shutdown).await
    }

    async fn serve_with(
        self,
        mut builder: tonic::transport::Server,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        builder
            .add_service(self.health_service.clone())
            .add_service(GreeterServiceServer::new(self))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

#[tonic::async_trait]
impl GreeterService for Greeter {
    async fn say_hello(
        &self,
        request: Request<pb::SayHelloRequest>,
    ) -> Result<Response<pb::SayHelloResponse>, Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            return Err(Status::unavailable(format!(
                "{} is failing on purpose",
                self.id
            )));
        }
        let now = Instant::now();
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        *calls = Some(calls.map_or((now, now), |(first, _)| (first, now)));
        drop(calls);
        let name = request.into_inner().name;
        Ok(Response::new(pb::SayHelloResponse {
            message: format!("hello {name}, from {}", self.id),
            instance_id: self.id.clone(),
        }))
    }
}

/// Binds `address:port` (port 0 picks a free one) and returns the listener and what it got.
pub async fn bind(address: &str, port: u16) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind((address, port)).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}
