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

use std::convert::Infallible;

use prost::Message;
use prost::bytes::Bytes;
use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_server::RegistryServiceServer;
use signpost_store::{Instance, Store};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};

use crate::Registry;
use crate::convert::instance_to_pb;

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
    type ResponseStream = crate::service::EncodedWatchStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<pb::WatchRequest>) -> Self::Future {
        let registry = self.0.clone();
        Box::pin(async move { registry.watch_encoded(request).await })
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
                    Ok(grpc.server_streaming(method, request).await)
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
