//! Discover and Watch answers made from each instance's encoding, made once per version of the
//! instance, and the gRPC framing of Watch messages. A leaf: it knows messages and bytes only.
//!
//! A Discover answer is mostly instances, and the same versions of the same instances go out in
//! answer after answer. Building a `pb::Instance` for each (a dozen strings and a map, copied) and
//! encoding it every time was most of Discover's cost, and a change fanned out to ten thousand
//! watchers was converted ten thousand times. Here each stored instance keeps its encoding
//! (in its [`signpost_store::Memo`]) and an answer is those bytes laid end to end.
//!
//! The answer types are wire-identical to `signpost.v1.DiscoverResponse` and `WatchResponse`: a
//! length-delimited field is the same whether its declared type is `Instance` or `bytes`, and an
//! enum is an int32, so clients decode them as the generated types.

use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
use signpost_store::Instance;
use tonic::codegen::http;

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

/// The encoding of one version of an instance, made the first time an answer needs it and kept
/// in the instance's memo.
pub(crate) fn encoded(instance: &Instance) -> Bytes {
    let kept = instance
        .memo
        .get_or_init(|| Encoding(Bytes::from(instance_to_pb(instance).encode_to_vec())));
    kept.0.clone()
}

/// What the server keeps in an instance's memo: its `signpost.v1.Instance` encoding.
struct Encoding(Bytes);

/// What the server keeps in a change's memo: the framed message every watcher of the change's
/// service gets, without and with unhealthy instances, with the number of events in it.
#[derive(Default)]
pub(crate) struct ChangeFrames([std::sync::OnceLock<(Bytes, usize)>; 2]);

impl ChangeFrames {
    /// The frame for watchers that `include_unhealthy` or not, made by `frame` the first time it
    /// succeeds (two streams racing may both make it; one is kept).
    pub(crate) fn get_or_try_init<E>(
        &self,
        include_unhealthy: bool,
        frame: impl FnOnce() -> Result<(Bytes, usize), E>,
    ) -> Result<(Bytes, usize), E> {
        let slot = &self.0[usize::from(include_unhealthy)];
        if let Some(made) = slot.get() {
            return Ok(made.clone());
        }
        let made = frame()?;
        Ok(slot.get_or_init(|| made).clone())
    }
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

/// The trailers that end a stream with `status`.
pub(crate) fn trailers(status: &tonic::Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        // Only a message that cannot be a header value gets here; the code still goes out.
        trailers.clear();
        let _ = tonic::Status::new(status.code(), "").add_header(&mut trailers);
    }
    trailers
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_proto::v1 as pb;

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
