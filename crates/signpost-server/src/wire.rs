//! Discover and Watch answered from each instance's encoding, made once per version of the
//! instance.
//!
//! A Discover answer is mostly instances, and the same versions of the same instances go out in
//! answer after answer. Building a `pb::Instance` for each (a dozen strings and a map, copied) and
//! encoding it every time was most of Discover's cost, and a change fanned out to ten thousand
//! watchers was converted ten thousand times. Here each stored instance keeps its encoding
//! ([`signpost_store::Encoded`]) and an answer is those bytes laid end to end.
//!
//! The answer types are wire-identical to `signpost.v1.DiscoverResponse` and `WatchResponse`: a
//! length-delimited field is the same whether its declared type is `Instance` or `bytes`, and an
//! enum is an int32, so clients decode them as the generated types. [`RegistryServer`] routes
//! Discover and Watch here and every other method to the generated server.
//!
//! A Watch stream goes further: its messages are framed here ([`frame`]) and its body sends those
//! frames as they are, so one framed change can go down every stream that sees it alike. tonic
//! still reads the request and answers errors before the stream starts; only the body is ours.
//! (tonic's own body would also keep a buffer per stream as large as the largest message it ever
//! sent: a 23 KB reset, ten thousand streams, 230 MB.)

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::StreamBody;
use hyper::body::Frame;
use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_server::RegistryServiceServer;
use signpost_store::{Instance, Store};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};

use crate::Registry;
use crate::convert::instance_to_pb;
use crate::watch::{Sent, WatchReceiver};

/// `signpost.v1.DiscoverResponse` with its instances already encoded.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct DiscoverResponse {
    /// Each an encoded `signpost.v1.Instance`.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub(crate) instances: Vec<Bytes>,
    #[prost(uint64, tag = "2")]
    pub(crate) revision: u64,
}

/// `signpost.v1.Event` with its instance already encoded.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Event {
    /// A `signpost.v1.EventType`.
    #[prost(int32, tag = "1")]
    pub(crate) r#type: i32,
    /// An encoded `signpost.v1.Instance`.
    #[prost(bytes = "bytes", tag = "2")]
    pub(crate) instance: Bytes,
    /// A `signpost.v1.RemovalReason`.
    #[prost(int32, tag = "3")]
    pub(crate) reason: i32,
    #[prost(uint64, tag = "4")]
    pub(crate) revision: u64,
}

/// `signpost.v1.WatchResponse` with its events' instances already encoded.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct WatchResponse {
    #[prost(uint64, tag = "1")]
    pub(crate) revision: u64,
    #[prost(bool, tag = "2")]
    pub(crate) reset: bool,
    #[prost(message, repeated, tag = "3")]
    pub(crate) events: Vec<Event>,
}

/// The encoding of one version of an instance, made the first time an answer needs it.
pub(crate) fn encoded(instance: &Instance) -> Bytes {
    instance
        .encoded
        .get_or_init(|| Bytes::from(instance_to_pb(instance).encode_to_vec()))
}

/// `message` as one gRPC length-prefixed message: not compressed, its length, its bytes. A
/// message over `limit` (the server's `max_response_size`) is refused with the limit's name.
pub(crate) fn frame(message: &impl Message, limit: usize) -> Result<Bytes, tonic::Status> {
    let len = fits(message, limit)?;
    let prefix = u32::try_from(len).map_err(|_| too_large(len, limit))?;
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    message
        .encode(&mut buf)
        .map_err(|e| tonic::Status::internal(format!("cannot encode a watch message: {e}")))?;
    Ok(buf.freeze())
}

/// The encoded length of `message`, or RESOURCE_EXHAUSTED naming the limit when it is over
/// `limit` (the server's `max_response_size`).
pub(crate) fn fits(message: &impl Message, limit: usize) -> Result<usize, crate::error::Error> {
    let len = message.encoded_len();
    if len > limit {
        return Err(too_large(len, limit));
    }
    Ok(len)
}

fn too_large(len: usize, limit: usize) -> crate::error::Error {
    crate::error::Error::limit(
        "max_response_size",
        format!("{limit} bytes"),
        &format!(": the answer is {len} bytes; narrow it with tags or a selector"),
    )
}

/// The frames of a Watch stream, handed from the handler to the route through the response's
/// extensions (which tonic carries over), so that they become the body instead of tonic's.
#[derive(Clone)]
pub(crate) struct WatchFrames(Arc<Mutex<Option<WatchReceiver>>>);

impl WatchFrames {
    pub(crate) fn new(frames: WatchReceiver) -> Self {
        WatchFrames(Arc::new(Mutex::new(Some(frames))))
    }

    fn body(&self) -> Option<tonic::body::Body> {
        let frames = self.0.lock().ok()?.take()?;
        let frames = ReceiverStream::new(frames).map(|sent| {
            Ok::<_, Infallible>(match sent {
                Sent::Message(bytes) => Frame::data(bytes),
                Sent::End(status) => Frame::trailers(trailers(&status)),
            })
        });
        Some(tonic::body::Body::new(StreamBody::new(frames)))
    }
}

/// The trailers that end a stream with `status`.
fn trailers(status: &tonic::Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        // Only a message that cannot be a header value gets here; the code still goes out.
        trailers.clear();
        let _ = tonic::Status::new(status.code(), "").add_header(&mut trailers);
    }
    trailers
}

const DISCOVER: &str = "/signpost.v1.RegistryService/Discover";
const WATCH: &str = "/signpost.v1.RegistryService/Watch";

/// `signpost.v1.RegistryService`: the generated server, with Discover served from encodings.
#[derive(Debug)]
pub(crate) struct RegistryServer<S: Store> {
    generated: RegistryServiceServer<Registry<S>>,
    registry: Registry<S>,
    max_request: usize,
    max_response: usize,
}

impl<S: Store> Clone for RegistryServer<S> {
    fn clone(&self) -> Self {
        RegistryServer {
            generated: self.generated.clone(),
            registry: self.registry.clone(),
            max_request: self.max_request,
            max_response: self.max_response,
        }
    }
}

impl<S: Store> RegistryServer<S> {
    pub(crate) fn new(registry: Registry<S>, max_request: usize, max_response: usize) -> Self {
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

impl<S: Store> NamedService for RegistryServer<S> {
    const NAME: &'static str = signpost_proto::v1::registry_service_server::SERVICE_NAME;
}

struct Discover<S: Store>(Registry<S>);

impl<S: Store> UnaryService<pb::DiscoverRequest> for Discover<S> {
    type Response = DiscoverResponse;
    type Future = BoxFuture<tonic::Response<DiscoverResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<pb::DiscoverRequest>) -> Self::Future {
        let registry = self.0.clone();
        Box::pin(async move { registry.discover_encoded(request).await })
    }
}

struct Watch<S: Store>(Registry<S>);

impl<S: Store> ServerStreamingService<pb::WatchRequest> for Watch<S> {
    type Response = WatchResponse;
    /// Empty: the stream's frames travel in the response's extensions (see [`WatchFrames`]).
    type ResponseStream = tokio_stream::Empty<Result<WatchResponse, tonic::Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<pb::WatchRequest>) -> Self::Future {
        let registry = self.0.clone();
        Box::pin(async move {
            let frames = registry.watch_frames(request).await?;
            let mut response = tonic::Response::new(tokio_stream::empty());
            response.extensions_mut().insert(WatchFrames::new(frames));
            Ok(response)
        })
    }
}

impl<S, B> Service<http::Request<B>> for RegistryServer<S>
where
    S: Store,
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
                    if let Some(body) = response
                        .extensions_mut()
                        .remove::<WatchFrames>()
                        .and_then(|frames| frames.body())
                    {
                        *response.body_mut() = body;
                    }
                    Ok(response)
                })
            }
            _ => self.generated.call(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_answer_decodes_as_the_generated_type() {
        let instance = Instance {
            service: "pay".into(),
            id: "p1".into(),
            address: "10.0.0.1".into(),
            port: 8080,
            tags: vec!["v2".into()],
            metadata: [("zone".to_string(), "a".to_string())].into(),
            mod_revision: 7,
            ..Instance::default()
        };
        let answer = DiscoverResponse {
            instances: vec![encoded(&instance), encoded(&instance)],
            revision: 9,
        };
        let decoded = pb::DiscoverResponse::decode(answer.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.revision, 9);
        assert_eq!(decoded.instances, vec![instance_to_pb(&instance); 2]);
        let watch = WatchResponse {
            revision: 9,
            reset: false,
            events: vec![Event {
                r#type: pb::EventType::Removed.into(),
                instance: encoded(&instance),
                reason: pb::RemovalReason::Expired.into(),
                revision: 9,
            }],
        };
        let decoded = pb::WatchResponse::decode(watch.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            decoded.events,
            vec![pb::Event {
                r#type: pb::EventType::Removed.into(),
                instance: Some(instance_to_pb(&instance)),
                reason: pb::RemovalReason::Expired.into(),
                revision: 9,
            }]
        );
        // A new version (a clone) does not reuse the old encoding.
        let mut moved = instance.clone();
        moved.port = 9090;
        assert_eq!(pb::Instance::decode(encoded(&moved)).unwrap().port, 9090);
    }
}
