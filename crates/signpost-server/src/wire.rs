//! Discover answered from each instance's encoding, made once per version of the instance.
//!
//! A Discover answer is mostly instances, and the same versions of the same instances go out in
//! answer after answer. Building a `pb::Instance` for each (a dozen strings and a map, copied) and
//! encoding it every time was most of Discover's cost. Here each stored instance keeps its encoding
//! ([`signpost_store::Encoded`]) and an answer is those bytes laid end to end.
//!
//! The answer type is wire-identical to `signpost.v1.DiscoverResponse`: field 1 is length-delimited
//! whether its declared type is `Instance` or `bytes`, so clients decode it as the generated type.
//! [`RegistryServer`] routes Discover here and every other method to the generated server.

use std::convert::Infallible;

use prost::Message;
use prost::bytes::Bytes;
use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_server::RegistryServiceServer;
use signpost_store::{Instance, Store};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};

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

/// The encoding of one version of an instance, made the first time an answer needs it.
pub(crate) fn encoded(instance: &Instance) -> Bytes {
    instance
        .encoded
        .get_or_init(|| Bytes::from(instance_to_pb(instance).encode_to_vec()))
}

const DISCOVER: &str = "/signpost.v1.RegistryService/Discover";

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
        if request.uri().path() != DISCOVER {
            return self.generated.call(request);
        }
        let method = Discover(self.registry.clone());
        let (max_request, max_response) = (self.max_request, self.max_response);
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<DiscoverResponse, pb::DiscoverRequest>::default();
            let mut grpc = Grpc::new(codec)
                .apply_max_message_size_config(Some(max_request), Some(max_response));
            Ok(grpc.unary(method, request).await)
        })
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
        // A new version (a clone) does not reuse the old encoding.
        let mut moved = instance.clone();
        moved.port = 9090;
        assert_eq!(pb::Instance::decode(encoded(&moved)).unwrap().port, 9090);
    }
}
