//! The registry service as the server mounts it: Discover and Watch routed to the fast path
//! (answers made of cached encodings, Watch bodies made of shared frames), every other method to
//! the generated server.
//!
//! A Watch stream's messages are framed by its task (`watch`), and the body sends those frames as
//! they are, so one framed change can go down every stream that sees it alike. tonic still reads
//! the request and answers errors before the stream starts; only the body is ours. (tonic's own
//! body would also keep a buffer per stream as large as the largest message it ever sent: a 23 KB
//! reset, ten thousand streams, 230 MB.)

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::StreamBody;
use hyper::body::Frame;
use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_server::RegistryServiceServer;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};

use crate::encode::{DiscoverResponse, WatchResponse, trailers};
use crate::service::Registry;
use crate::watch::{Sent, WatchReceiver};

/// A stream's own body, handed from the handler to the route through the response's
/// extensions (which tonic carries over, and which must be `Sync`, as a body is not), so that it
/// becomes the body instead of tonic's: a Watch stream's frames, an xDS stream's `AdsBody`.
#[derive(Clone)]
pub(crate) struct OwnBody(Arc<Mutex<Option<tonic::body::Body>>>);

impl OwnBody {
    pub(crate) fn new(body: tonic::body::Body) -> Self {
        OwnBody(Arc::new(Mutex::new(Some(body))))
    }

    /// Makes the body a handler put in `response`'s extensions its body.
    pub(crate) fn install(response: &mut http::Response<tonic::body::Body>) {
        if let Some(body) = response
            .extensions_mut()
            .remove::<OwnBody>()
            .and_then(|own| own.0.lock().ok()?.take())
        {
            *response.body_mut() = body;
        }
    }
}

/// A Watch stream's body: the frames its task sends, as they are.
fn watch_body(frames: WatchReceiver) -> tonic::body::Body {
    let frames = ReceiverStream::new(frames).map(|sent| {
        Ok::<_, Infallible>(match sent {
            Sent::Message(bytes) => Frame::data(bytes),
            Sent::End(status) => Frame::trailers(trailers(&status)),
        })
    });
    tonic::body::Body::new(StreamBody::new(frames))
}

const DISCOVER: &str = "/signpost.v1.RegistryService/Discover";
const WATCH: &str = "/signpost.v1.RegistryService/Watch";

/// `signpost.v1.RegistryService` as a tower service to mount on a tonic server: Discover and
/// Watch on their fast path, every other method through the generated server. What
/// [`serve`](crate::serve) mounts, and what an embedder mounts on a server of its own.
#[derive(Debug, Clone)]
pub struct RegistryServer {
    generated: RegistryServiceServer<Registry>,
    registry: Registry,
    max_request: usize,
    max_response: usize,
}

impl RegistryServer {
    pub fn new(registry: Registry) -> Self {
        let (max_request, max_response) = registry.message_limits();
        RegistryServer {
            generated: RegistryServiceServer::new(registry.clone())
                .max_decoding_message_size(max_request)
                .max_encoding_message_size(max_response),
            registry,
            max_request,
            max_response,
        }
    }
}

impl NamedService for RegistryServer {
    const NAME: &'static str = signpost_proto::v1::registry_service_server::SERVICE_NAME;
}

struct Discover(Registry);

impl UnaryService<pb::DiscoverRequest> for Discover {
    type Response = DiscoverResponse;
    type Future = BoxFuture<tonic::Response<DiscoverResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<pb::DiscoverRequest>) -> Self::Future {
        let registry = self.0.clone();
        Box::pin(async move { registry.discover_encoded(request).await })
    }
}

struct Watch(Registry);

impl ServerStreamingService<pb::WatchRequest> for Watch {
    type Response = WatchResponse;
    /// Empty: the stream's body travels in the response's extensions (see [`OwnBody`]).
    type ResponseStream = tokio_stream::Empty<Result<WatchResponse, tonic::Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<pb::WatchRequest>) -> Self::Future {
        let registry = self.0.clone();
        Box::pin(async move {
            let frames = registry.watch_frames(request).await?;
            let mut response = tonic::Response::new(tokio_stream::empty());
            response
                .extensions_mut()
                .insert(OwnBody::new(watch_body(frames)));
            Ok(response)
        })
    }
}

impl<B> Service<http::Request<B>> for RegistryServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (max_request, max_response) = (Some(self.max_request), Some(self.max_response));
        match request.uri().path() {
            DISCOVER => {
                let method = Discover(self.registry.clone());
                Box::pin(async move {
                    let codec =
                        tonic_prost::ProstCodec::<DiscoverResponse, pb::DiscoverRequest>::default();
                    let mut grpc =
                        Grpc::new(codec).apply_max_message_size_config(max_request, max_response);
                    Ok(grpc.unary(method, request).await)
                })
            }
            WATCH => {
                let method = Watch(self.registry.clone());
                Box::pin(async move {
                    let codec =
                        tonic_prost::ProstCodec::<WatchResponse, pb::WatchRequest>::default();
                    let mut grpc =
                        Grpc::new(codec).apply_max_message_size_config(max_request, max_response);
                    let mut response = grpc.server_streaming(method, request).await;
                    OwnBody::install(&mut response);
                    Ok(response)
                })
            }
            _ => self.generated.call(request),
        }
    }
}
