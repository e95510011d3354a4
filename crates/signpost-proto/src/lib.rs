//! Generated code for the Signpost v1 API (`proto/signpost/v1/registry.proto`).
//!
//! This crate holds nothing hand-written beyond this module tree: the prost message types, the tonic
//! client and server for `signpost.v1.RegistryService`, and the encoded file descriptor set that the
//! server hands to gRPC reflection. Conversions to domain types live beside those types, in
//! `signpost-store` and `signpost-server`.
//!
//! ```
//! use signpost_proto::v1::{DiscoverRequest, registry_service_client::RegistryServiceClient};
//! let request = DiscoverRequest { service: "greeter".into(), ..Default::default() };
//! # let _ = (request, std::marker::PhantomData::<RegistryServiceClient<tonic::transport::Channel>>);
//! ```

/// `signpost.v1`: messages, enums, `registry_service_client` and `registry_service_server`.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("signpost.v1");
}

/// The encoded `FileDescriptorSet` of the v1 API and its imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("signpost_descriptor");
