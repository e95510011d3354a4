//! Every limit that keeps one client from exhausting the server, and where each is enforced:
//! instances and leases by the store, atomically with the write ([`Limits::quota`]); watch
//! streams here, per server and per connection ([`WatchLimits`]); request size by tonic's decoder,
//! whose `OUT_OF_RANGE` answer [`RequestSizeLayer`] turns into the `RESOURCE_EXHAUSTED` naming the
//! limit that every other limit answers (a KeepAlive stream, whose messages are decoded after the
//! stream started, says the same through [`request_too_large`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use tonic::codegen::http::{self, HeaderValue};
use tower::{Layer, Service};

/// Limits that keep one client from exhausting the server. Reaching one is `RESOURCE_EXHAUSTED`
/// with its name and value. The defaults leave room for 100,000 instances and their watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_instances_per_service: u64,
    pub max_instances_per_namespace: u64,
    /// Live leases (on etcd: those that hold instances, counted from the replica).
    pub max_leases: u64,
    /// Watch streams open on this server.
    pub max_watches: usize,
    /// Watch streams open on one client connection.
    pub max_watches_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instances_per_service: 100_000,
            max_instances_per_namespace: 1_000_000,
            max_leases: 1_000_000,
            max_watches: 200_000,
            max_watches_per_connection: 20_000,
        }
    }
}

impl Limits {
    /// The limits the store keeps atomically with each write.
    pub(crate) fn quota(&self) -> signpost_store::Quota {
        signpost_store::Quota {
            instances_per_service: self.max_instances_per_service,
            instances_per_namespace: self.max_instances_per_namespace,
            leases: self.max_leases,
        }
    }
}

/// Open watch streams per client connection, keyed by its remote address.
type PerConnection = Arc<Mutex<HashMap<SocketAddr, usize>>>;

/// Open watch streams, in all and per client connection.
#[derive(Debug, Clone)]
pub(crate) struct WatchLimits {
    total: Arc<Semaphore>,
    per_connection: PerConnection,
    max_watches: usize,
    max_per_connection: usize,
}

impl WatchLimits {
    pub(crate) fn new(limits: &Limits) -> Self {
        WatchLimits {
            total: Arc::new(Semaphore::new(limits.max_watches)),
            per_connection: Arc::default(),
            max_watches: limits.max_watches,
            max_per_connection: limits.max_watches_per_connection,
        }
    }

    /// Takes a place for one more watch stream, or says which limit is full.
    pub(crate) fn take(&self, remote: Option<SocketAddr>) -> Result<WatchSlots, crate::Error> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| crate::Error::limit("max_watches", self.max_watches, ""))?;
        let connection = match remote {
            None => None,
            Some(addr) => {
                let mut counts = self
                    .per_connection
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let n = counts.entry(addr).or_insert(0);
                if *n >= self.max_per_connection {
                    return Err(crate::Error::limit(
                        "max_watches_per_connection",
                        self.max_per_connection,
                        "",
                    ));
                }
                *n += 1;
                Some((addr, self.per_connection.clone()))
            }
        };
        Ok(WatchSlots {
            _total: total,
            connection,
        })
    }
}

/// A watch stream's places under the limits; dropping it frees them.
#[derive(Debug)]
pub(crate) struct WatchSlots {
    _total: OwnedSemaphorePermit,
    connection: Option<(SocketAddr, PerConnection)>,
}

impl Drop for WatchSlots {
    fn drop(&mut self) {
        if let Some((addr, counts)) = &self.connection {
            let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = counts.get_mut(addr) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(addr);
                }
            }
        }
    }
}

/// Whether a message error on a request stream is tonic's decoder refusing an oversized message.
pub(crate) fn request_too_large(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::OutOfRange && status.message().contains(TOO_LARGE)
}

/// The answer to an oversized message, as every limit words it.
pub(crate) fn too_large_request(limit: usize) -> crate::Error {
    crate::Error::ResourceExhausted(format!("limit max_request_size ({limit} bytes) exceeded"))
}

/// Wraps the whole server; `limit` is the request size the registry service is built with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestSizeLayer {
    pub(crate) limit: usize,
}

impl<S> Layer<S> for RequestSizeLayer {
    type Service = RequestSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSize {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RequestSize<S> {
    inner: S,
    limit: usize,
}

const OUT_OF_RANGE: &str = "11";
const TOO_LARGE: &str = "decoded message length too large";

impl<S, B, R> Service<http::Request<B>> for RequestSize<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limit = self.limit;
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            let headers = response.headers_mut();
            let too_large = headers
                .get("grpc-status")
                .is_some_and(|s| s == OUT_OF_RANGE)
                && headers
                    .get("grpc-message")
                    .and_then(|m| m.to_str().ok())
                    // grpc-message is percent-encoded.
                    .is_some_and(|m| m.replace("%20", " ").contains(TOO_LARGE));
            if too_large {
                headers.insert("grpc-status", HeaderValue::from_static("8"));
                if let Ok(message) = HeaderValue::try_from(format!(
                    "limit%20max_request_size%20({limit}%20bytes)%20exceeded"
                )) {
                    headers.insert("grpc-message", message);
                }
            }
            Ok(response)
        })
    }
}
