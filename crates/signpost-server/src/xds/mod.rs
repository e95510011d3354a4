//! An xDS control plane: `envoy.service.discovery.v3.AggregatedDiscoveryService`, State of the
//! World, fed by the registry's live views, so that any gRPC implementation with xDS support
//! balances over Signpost's instances with no Signpost library (`xds:///greeter`).
//!
//! Each ADS stream's state ([`AdsStream`]) keeps, per resource kind, what the client subscribed
//! to and what was last sent, and follows the live view ([`crate::view`]) of every service whose
//! endpoints it subscribed to. It lives in the stream's response body ([`AdsBody`]), which serves
//! the stream as h2 polls it for more: there is no task of its own. A proxyless gRPC client asks
//! in turn for a Listener (named by its target), the RouteConfiguration and Cluster that names,
//! and the cluster's ClusterLoadAssignment; what each name means, and the resource for it, is
//! `resources`'.
//!
//! The endpoints of a service version are encoded once, on the view, for every stream that
//! sends them. A stream that cannot send as fast as its service changes skips to the newest
//! version, since a State of the World response replaces the last. A client that stopped
//! reading altogether leaves its stream's body unpolled, so a graceful stop cannot end that
//! stream with a status either (as for a Watch stream stuck behind its window); `signpost
//! serve` bounds the wait by its shutdown grace. A service that does not
//! exist yet still gets its listener, route and cluster, with no endpoints: the client's calls
//! fail at once with `UNAVAILABLE` instead of waiting out the client's does-not-exist timer, and
//! succeed as soon as an instance registers.
//!
//! The protocol per gRFC A27 and Envoy's xDS protocol page: a request whose nonce is not the
//! last one sent for its type is stale and ignored; one that repeats the subscription with the
//! last nonce is an ACK, and with an `error_detail` a NACK, which is logged and not answered (an
//! answer would be the same rejected resources again). Delta xDS is not served.
//!
//! [`AdsServer`] routes StreamAggregatedResources itself, and the stream's body yields frames
//! it framed (as a Watch stream's are, see [`crate::route`]), in a response type wire-identical
//! to `DiscoveryResponse` whose resources are those shared encodings.
//! A change of one service is one response, framed once for its version, whose bytes go down
//! every stream that follows the service: its version is the view's revision and its nonce names
//! the revision and the service, the same on every stream and unique on each. Answers to a
//! client's own requests are framed for that stream, with nonces of the stream's own.
//! Request types come from [envoy-types](https://docs.rs/envoy-types): Envoy's API compiled for
//! prost/tonic 0.14, the versions the rest of Signpost uses, with no protoc at build time.

mod resources;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Wake, Waker};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
use hyper::body::Frame;
use prost::bytes::Bytes;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamMap};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Status, Streaming};

use crate::auth::{Principal, Verb};
use crate::encode::trailers;
use crate::route::OwnBody;
use crate::service::Registry;
use crate::view::{LiveView, ViewReceiver, ViewState, Views};
use resources::{Endpoints, Kind, Target};

/// The node metadata key a client's bootstrap sets to name the namespace its plain listener
/// names (`xds:///greeter`) are looked up in.
pub const NAMESPACE_METADATA_KEY: &str = "signpost.namespace";

/// The most resource names a stream may subscribe to of one kind: each endpoints name is a
/// service the server follows for it.
pub const MAX_NAMES_PER_KIND: usize = 1_000;

const STREAM_AGGREGATED_RESOURCES: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// Wire-identical to `envoy.service.discovery.v3.DiscoveryResponse`, with each resource already
/// encoded (an encoded `google.protobuf.Any`; a length-delimited field is the same whether it is
/// declared a message or bytes): the endpoints of a service version are encoded once, and each
/// stream's response only copies those bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct Response {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    resources: Vec<Bytes>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
}

/// The ADS service over a [`Registry`]'s live views. Mount [`Ads::server`] on a tonic server.
#[derive(Debug, Clone)]
pub struct Ads {
    registry: Registry,
}

impl Ads {
    pub fn new(registry: Registry) -> Self {
        Ads { registry }
    }

    /// `envoy.service.discovery.v3.AggregatedDiscoveryService` as a tower service, with the
    /// registry's message size limits.
    pub fn server(self) -> AdsServer {
        let (max_request, max_response) = self.registry.message_limits();
        AdsServer {
            ads: self,
            max_request,
            max_response,
        }
    }

    /// Opens a stream: its body, which serves it, travels in the answer's extensions.
    fn open(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<NoResponses>, Status> {
        let principal = self.registry.authenticate(&request).map_err(Status::from)?;
        if let Some(p) = &principal {
            p.check_any(Verb::Read).map_err(Status::from)?;
        }
        let remote = request.remote_addr();
        // A stream that follows services costs what a Watch does: it takes a watch place.
        let slots = self.registry.watch_slots(remote).map_err(Status::from)?;
        let metrics = self.registry.metrics();
        if let Some(m) = &metrics {
            m.xds_opened();
        }
        let stream = AdsStream {
            views: self.registry.views(),
            max_response: self.registry.message_limits().1,
            metrics,
            principal,
            remote,
            node: String::new(),
            node_seen: false,
            namespace: crate::DEFAULT_NAMESPACE.to_owned(),
            kinds: Default::default(),
            followed: StreamMap::new(),
            known: BTreeMap::new(),
            nonces: 0,
            out: VecDeque::new(),
            views_added: false,
            _slots: slots,
        };
        let wakes = Arc::new(Wakes::default());
        let waker = |source| {
            Waker::from(Arc::new(SourceWaker {
                wakes: wakes.clone(),
                source,
            }))
        };
        let body = AdsBody {
            stream,
            requests: request.into_inner(),
            cancelled: Box::pin(self.registry.shutdown_token().cancelled_owned()),
            ended: false,
            wakers: [waker(REQUESTS), waker(VIEWS), waker(SHUTDOWN)],
            wakes,
            dirty: REQUESTS | VIEWS | SHUTDOWN,
            yielded: false,
        };
        let mut response = tonic::Response::new(tokio_stream::empty());
        response
            .extensions_mut()
            .insert(OwnBody::new(tonic::body::Body::new(body)));
        Ok(response)
    }
}

/// Empty: a stream's body travels in the answer's extensions (see [`OwnBody`]).
type NoResponses = tokio_stream::Empty<Result<Response, Status>>;

/// The ADS service as mounted: StreamAggregatedResources served here, with responses made of
/// shared encodings; Delta xDS (and any other method) answered `UNIMPLEMENTED`.
#[derive(Debug, Clone)]
pub struct AdsServer {
    ads: Ads,
    max_request: usize,
    max_response: usize,
}

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

struct Sar(Ads);

impl StreamingService<DiscoveryRequest> for Sar {
    type Response = Response;
    type ResponseStream = NoResponses;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let opened = self.0.open(request);
        Box::pin(async move { opened })
    }
}

impl<B> Service<http::Request<B>> for AdsServer
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
        if request.uri().path() != STREAM_AGGREGATED_RESOURCES {
            return Box::pin(async {
                Ok(Status::unimplemented(
                    "this server serves State of the World xDS (StreamAggregatedResources) only",
                )
                .into_http())
            });
        }
        let sar = Sar(self.ads.clone());
        let (max_request, max_response) = (Some(self.max_request), Some(self.max_response));
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Response, DiscoveryRequest>::default();
            let mut grpc =
                Grpc::new(codec).apply_max_message_size_config(max_request, max_response);
            let mut response = grpc.streaming(sar, request).await;
            OwnBody::install(&mut response);
            Ok(response)
        })
    }
}

/// Per resource kind: what the client subscribed to, and what it was last sent.
#[derive(Debug, Default)]
struct Subscription {
    names: BTreeSet<String>,
    /// The names as the client last listed them: a request that lists them again in the same
    /// order (every ACK does) is known to ask for the same without building a set.
    listed: Vec<String>,
    /// The version of the last response of this kind.
    version: Arc<str>,
    /// The nonce of the last response of this kind, which a request must carry to be current.
    nonce: Arc<str>,
}

/// What the server keeps on a view version for xDS: the service's ClusterLoadAssignment, and
/// the response that pushes this version, framed once for every stream that follows it.
struct Pushed {
    endpoints: Endpoints,
    version: Arc<str>,
    nonce: Arc<str>,
    /// `None` when the response is over the server's `max_response_size`: each stream then
    /// frames it and ends with that error.
    frame: Option<Bytes>,
}

impl Pushed {
    fn new(target: &Target, view: &LiveView, max_response: usize) -> Pushed {
        let endpoints = resources::endpoints(target, view.instances.iter().map(|i| &**i));
        if endpoints.hostnames > 0 {
            tracing::warn!(
                namespace = %target.namespace,
                service = %target.service,
                left_out = endpoints.hostnames,
                "instances registered by hostname are left out of xDS endpoints: gRPC needs IP addresses"
            );
        }
        let version: Arc<str> = view.revision.to_string().into();
        // Unique on a stream: one service has one version at a revision, and several services
        // that change at one revision (a lease's expiry) have different names.
        let nonce: Arc<str> = format!("{}@{}", view.revision, target.canonical()).into();
        let response = Response {
            version_info: version.to_string(),
            resources: vec![endpoints.resource.clone()],
            type_url: Kind::Endpoints.type_url().to_owned(),
            nonce: nonce.to_string(),
        };
        let frame = crate::encode::frame(&response, max_response).ok();
        Pushed {
            endpoints,
            version,
            nonce,
            frame,
        }
    }
}

struct AdsStream {
    views: Arc<Views>,
    /// The server's `max_response_size`, which every framed response must fit.
    max_response: usize,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    principal: Option<Principal>,
    remote: Option<SocketAddr>,
    /// The client's node id, for logs.
    node: String,
    /// Whether the node was read: only the first request's counts (Envoy repeats it on every
    /// request; the namespace must not change under resources already sent).
    node_seen: bool,
    /// Where plain listener names are looked up: the node's `signpost.namespace`, or `default`.
    namespace: String,
    /// By [`Kind`]: inline, as an ACK reads its kind's on every push.
    kinds: [Subscription; 4],
    /// The live view of each service whose endpoints the client subscribed to, by the name it
    /// subscribed with.
    followed: StreamMap<Arc<str>, WatchStream<ViewState>>,
    /// The newest version of each followed view, and the service it is of.
    known: BTreeMap<Arc<str>, (Target, Option<Arc<crate::view::LiveView>>)>,
    /// Responses framed for this stream alone so far: their nonces count them.
    nonces: u64,
    /// Responses framed and not yet taken by the body: at most the one answer to what was
    /// just read, since the body reads nothing more until h2 has taken it.
    out: VecDeque<Bytes>,
    /// Set when a view is newly followed: it must be polled before it can wake the stream.
    views_added: bool,
    /// The stream's places under the watch limits, given back when it ends.
    _slots: crate::limits::WatchSlots,
}

/// Why a stream stops.
enum End {
    /// The stream is reset or its connection gone: nothing can reach the client.
    ClientGone,
    Status(Status),
}

/// A stream's response body, which serves the stream: each time h2 has room for more of the
/// answer it polls the body, which reads the client's requests and the followed views and
/// answers them. A change of a followed service thus wakes one task per stream (the one hyper
/// runs for the stream's body) and no channel lies between the stream and its body; a client
/// that does not read leaves its body unpolled, and the views it follows skip to their newest
/// versions meanwhile, as a State of the World response replaces the last.
struct AdsBody {
    stream: AdsStream,
    requests: Streaming<DiscoveryRequest>,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
    /// What each source is polled with ([`REQUESTS`], [`VIEWS`], [`SHUTDOWN`] in that order),
    /// so that its wake says which it was.
    wakers: [Waker; 3],
    wakes: Arc<Wakes>,
    /// The sources to poll: those that woke, and those whose last poll was ready (which left
    /// no waker with them).
    dirty: u8,
    /// Whether the last poll yielded to the streams ahead of it in the run queue.
    yielded: bool,
}

/// The sources of a stream's work, as bits. A push to a stream is followed by the client's ACK,
/// a second wake of the stream per change: that one polls the requests alone, not the views and
/// the shutdown token (whose polls take locks every stream of a service, or of the server,
/// shares), and a view's wake does not poll the requests.
const REQUESTS: u8 = 1;
const VIEWS: u8 = 2;
const SHUTDOWN: u8 = 4;

/// Which of a stream's sources have woken it since its body last looked, and the task to wake.
#[derive(Default)]
struct Wakes {
    woke: AtomicU8,
    task: Mutex<Option<Waker>>,
}

impl Wakes {
    /// Registers the body's task and takes the sources that have woken since they were last
    /// taken (here or by the body's swap of `woke`): a wake after this wakes the task again.
    fn take(&self, task: &Waker) -> u8 {
        let mut current = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if !current.as_ref().is_some_and(|w| w.will_wake(task)) {
            *current = Some(task.clone());
        }
        drop(current);
        self.woke.swap(0, Ordering::AcqRel)
    }
}

/// The waker one source of a stream is polled with.
struct SourceWaker {
    wakes: Arc<Wakes>,
    source: u8,
}

impl Wake for SourceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.woke.fetch_or(self.source, Ordering::AcqRel);
        let task = self
            .wakes
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// The most requests a body reads in one poll without answering any (ACKs are not answered)
/// before it lets its task yield: a client's flood must not hold the thread.
const REQUESTS_PER_POLL: usize = 64;

impl AdsBody {
    /// Reads requests and views until there is a response to send (`Ready(None)`), the stream
    /// ends (`Ready(Some(end))`), or there is nothing to read.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Option<End>> {
        let woke = self.wakes.take(cx.waker());
        // Woken by a request alone (nearly always the ACK of a push): the task first yields,
        // once, to the back of the run queue, behind the streams a change has woken to push
        // to. The push reaches every subscriber before the server spends its time reading
        // what they answer, and the request waits only as long as the queue ahead of it.
        if woke == REQUESTS && self.dirty == 0 && !self.yielded {
            self.yielded = true;
            self.dirty = REQUESTS;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        self.dirty |= woke;
        for _ in 0..REQUESTS_PER_POLL {
            if !self.stream.out.is_empty() {
                return Poll::Ready(None);
            }
            if self.dirty & SHUTDOWN != 0 {
                let mut shutdown = Context::from_waker(&self.wakers[2]);
                if self.cancelled.as_mut().poll(&mut shutdown).is_ready() {
                    return Poll::Ready(Some(End::Status(Status::unavailable(
                        "the registry is shutting down: reconnect",
                    ))));
                }
                self.dirty &= !SHUTDOWN;
            }
            // The client going away ends its request stream too, so that is all there is to
            // watch for besides requests and views.
            if self.dirty & REQUESTS != 0 {
                let mut requests = Context::from_waker(&self.wakers[0]);
                match Pin::new(&mut self.requests).poll_next(&mut requests) {
                    // The client ended its requests: there is nothing more to answer, and an
                    // OK status tells it so (no status at all reads as a failure).
                    Poll::Ready(None) => {
                        return Poll::Ready(Some(End::Status(Status::ok(
                            "the client ended its requests",
                        ))));
                    }
                    // A request that does not decode, or is too large, ends the stream saying
                    // why; when the stream was reset the status goes nowhere, harmlessly.
                    Poll::Ready(Some(Err(status))) => {
                        tracing::debug!(node = %self.stream.node, %status, "xDS request stream failed");
                        return Poll::Ready(Some(match status.code() {
                            tonic::Code::Cancelled | tonic::Code::Unknown => End::ClientGone,
                            _ => End::Status(status),
                        }));
                    }
                    Poll::Ready(Some(Ok(request))) => {
                        if let Err(end) = self.stream.on_request(request) {
                            return Poll::Ready(Some(end));
                        }
                        if std::mem::take(&mut self.stream.views_added) {
                            self.dirty |= VIEWS;
                        }
                        continue;
                    }
                    Poll::Pending => self.dirty &= !REQUESTS,
                }
            }
            if self.dirty & VIEWS != 0 {
                let mut views = Context::from_waker(&self.wakers[1]);
                if !self.stream.followed.is_empty()
                    && let Poll::Ready(Some((name, view))) =
                        Pin::new(&mut self.stream.followed).poll_next(&mut views)
                {
                    match self.stream.on_view(name, view) {
                        Ok(()) => continue,
                        Err(end) => return Poll::Ready(Some(end)),
                    }
                }
                self.dirty &= !VIEWS;
            }
            let woke = self.wakes.woke.swap(0, Ordering::AcqRel);
            if woke == 0 {
                return Poll::Pending;
            }
            self.dirty |= woke;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Body for AdsBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.stream.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match std::task::ready!(this.poll_step(cx)) {
                None => continue,
                Some(end) => {
                    this.ended = true;
                    this.stream.out.clear();
                    let End::Status(status) = end else {
                        return Poll::Ready(None);
                    };
                    if !matches!(status.code(), tonic::Code::Ok | tonic::Code::Unavailable) {
                        tracing::warn!(node = %this.stream.node, %status, "xDS stream ended");
                    }
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
                }
            }
        }
    }
}

impl Drop for AdsStream {
    fn drop(&mut self) {
        tracing::debug!(node = %self.node, remote = ?self.remote, "xDS stream ended");
        if let Some(m) = &self.metrics {
            m.xds_closed();
        }
    }
}

impl AdsStream {
    fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), End> {
        if let Some(node) = &request.node
            && !self.node_seen
        {
            self.node_seen = true;
            self.node = node.id.clone();
            if let Some(namespace) = node
                .metadata
                .as_ref()
                .and_then(|m| m.fields.get(NAMESPACE_METADATA_KEY))
                .and_then(|v| match &v.kind {
                    Some(ValueKind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
            {
                self.namespace = crate::validate::namespace(NAMESPACE_METADATA_KEY, namespace)
                    .map_err(|e| {
                        End::Status(Status::invalid_argument(format!("node.metadata {e}")))
                    })?;
            }
        }
        let Some(kind) = Kind::from_type_url(&request.type_url) else {
            // Envoy asks for kinds a gRPC client does not (secrets, runtime): nothing to send.
            tracing::debug!(node = %self.node, type_url = %request.type_url, "xDS request for a kind this server does not serve");
            return Ok(());
        };
        let state = &mut self.kinds[kind as usize];
        // Stale: the client has not yet seen the newest response of this kind, whose answer to
        // it is on its way. A nonce on a kind this stream never answered is a client
        // reconnecting with one from an earlier stream (or server): answered as a first request.
        if !state.nonce.is_empty()
            && !request.response_nonce.is_empty()
            && *request.response_nonce != *state.nonce
        {
            return Ok(());
        }
        if request.resource_names.len() > MAX_NAMES_PER_KIND {
            return Err(End::Status(Status::resource_exhausted(format!(
                "limit xds names per kind ({MAX_NAMES_PER_KIND}) reached: {} {} names asked for",
                request.resource_names.len(),
                kind.short()
            ))));
        }
        let first = state.nonce.is_empty();
        let same = !first
            && (request.resource_names == state.listed || {
                let names: BTreeSet<&str> =
                    request.resource_names.iter().map(String::as_str).collect();
                names.len() == state.names.len() && names.iter().all(|n| state.names.contains(*n))
            });
        if same {
            if let Some(error) = &request.error_detail {
                if let Some(m) = &self.metrics {
                    m.xds_nack(kind.short());
                }
                tracing::warn!(
                    node = %self.node,
                    kind = kind.short(),
                    rejected_version = %state.version,
                    kept_version = %request.version_info,
                    error = %error.message,
                    "an xDS client rejected resources (NACK); not sending them again until they change"
                );
            }
            return Ok(());
        }
        state.names = request.resource_names.iter().cloned().collect();
        state.listed = request.resource_names;
        match kind {
            Kind::Endpoints => {
                self.follow_endpoints();
                // Views already followed answer now; new ones answer when they are first read.
                let read: Vec<Arc<str>> = self
                    .known
                    .iter()
                    .filter(|(_, (_, view))| view.is_some())
                    .map(|(name, _)| name.clone())
                    .collect();
                if read.is_empty() {
                    return Ok(());
                }
                self.send_endpoints(&read)
            }
            _ => self.send_static(kind),
        }
    }

    /// The service a resource name asks for, if it names one this stream may read. A name
    /// that does not is left out of the answer (the client reports that resource missing after
    /// its timer), not the end of the stream: gRPC shares one stream between every `xds:///`
    /// channel of a process, and one bad target must not take the others down.
    fn target(&self, kind: Kind, name: &str) -> Option<Target> {
        let parsed = match kind {
            Kind::Listener => Target::from_listener(name, &self.namespace),
            _ => Target::from_canonical(name),
        };
        let why = match parsed {
            Ok(target) => match &self.principal {
                None => return Some(target),
                Some(p) => match p.check(Verb::Read, &target.namespace) {
                    Ok(()) => return Some(target),
                    Err(denied) => denied.to_string(),
                },
            },
            Err(why) => why,
        };
        tracing::warn!(node = %self.node, kind = kind.short(), name, why, "xDS resource left out");
        None
    }

    /// Sends every subscribed listener, route or cluster: each depends on its name alone.
    fn send_static(&mut self, kind: Kind) -> Result<(), End> {
        let names: Vec<String> = self.kinds[kind as usize].names.iter().cloned().collect();
        let mut sent = Vec::with_capacity(names.len());
        for name in &names {
            if let Some(target) = self.target(kind, name) {
                sent.push(match kind {
                    Kind::Listener => resources::listener(name, &target),
                    Kind::Route => resources::route(&target),
                    Kind::Cluster => resources::cluster(&target),
                    Kind::Endpoints => continue,
                });
            }
        }
        self.send(kind, sent)
    }

    /// Follows the views of the subscribed endpoints, and stops following the rest.
    fn follow_endpoints(&mut self) {
        let names = self.kinds[Kind::Endpoints as usize].names.clone();
        let gone: Vec<Arc<str>> = self
            .known
            .keys()
            .filter(|n| !names.contains(&***n))
            .cloned()
            .collect();
        for name in gone {
            self.known.remove(&name);
            self.followed.remove(&name);
        }
        for name in names {
            if self.known.contains_key(name.as_str()) {
                continue;
            }
            if let Some(target) = self.target(Kind::Endpoints, &name) {
                let view: ViewReceiver = self.views.follow(&target.namespace, &target.service);
                // Shared: the stream map hands its key back with every change of the view.
                let name: Arc<str> = name.into();
                self.followed.insert(name.clone(), WatchStream::new(view));
                self.views_added = true;
                self.known.insert(name, (target, None));
            }
        }
    }

    fn on_view(&mut self, name: Arc<str>, view: ViewState) -> Result<(), End> {
        let Some((_, known)) = self.known.get_mut(&name) else {
            return Ok(());
        };
        match view {
            ViewState::Live(view) => {
                *known = Some(view);
                // Endpoints resources may be sent one at a time: only the changed one goes.
                self.push_endpoints(&name)
            }
            ViewState::Reading => Ok(()),
            // The client reconnects and its services are followed anew.
            ViewState::Ended => Err(End::Status(Status::unavailable(
                "the registry stopped following a service: reconnect",
            ))),
        }
    }

    /// Sends the endpoints of the followed services `names` that have been read, framed for
    /// this stream.
    fn send_endpoints(&mut self, names: &[Arc<str>]) -> Result<(), End> {
        let max_response = self.max_response;
        let resources: Vec<Bytes> = names
            .iter()
            .filter_map(|name| {
                let (target, view) = self.known.get(name)?;
                let view = view.as_ref()?;
                let pushed = view
                    .memo
                    .get_or_init(|| Pushed::new(target, view, max_response));
                Some(pushed.endpoints.resource.clone())
            })
            .collect();
        self.send(Kind::Endpoints, resources)
    }

    /// Sends the new version of followed service `name`: the response framed once for every
    /// stream that follows it.
    fn push_endpoints(&mut self, name: &str) -> Result<(), End> {
        let Some((target, Some(view))) = self.known.get(name) else {
            return Ok(());
        };
        let pushed = view
            .memo
            .get_or_init(|| Pushed::new(target, view, self.max_response));
        let Some(frame) = pushed.frame.clone() else {
            let resource = pushed.endpoints.resource.clone();
            return self.send(Kind::Endpoints, vec![resource]);
        };
        let (version, nonce) = (pushed.version.clone(), pushed.nonce.clone());
        if let Some(m) = &self.metrics {
            m.xds_response(Kind::Endpoints.short());
        }
        let state = &mut self.kinds[Kind::Endpoints as usize];
        state.version = version;
        state.nonce = nonce;
        self.out.push_back(frame);
        Ok(())
    }

    /// Frames a response for this stream alone, with a nonce of its own.
    fn send(&mut self, kind: Kind, resources: Vec<Bytes>) -> Result<(), End> {
        if let Some(m) = &self.metrics {
            m.xds_response(kind.short());
        }
        self.nonces += 1;
        let state = &mut self.kinds[kind as usize];
        // Never a view revision's form (`7`, `7@ns/svc`): a stream's own nonces and versions
        // cannot meet the shared ones.
        state.version = format!("s{}", self.nonces).into();
        state.nonce = format!("s{}", self.nonces).into();
        let response = Response {
            version_info: state.version.to_string(),
            resources,
            type_url: kind.type_url().to_owned(),
            nonce: state.nonce.to_string(),
        };
        let frame = crate::encode::frame(&response, self.max_response).map_err(End::Status)?;
        self.out.push_back(frame);
        Ok(())
    }
}

/// What a gRPC client's xDS bootstrap names: this server and the client itself.
#[derive(Debug, Clone, Default)]
pub struct Bootstrap {
    /// The registry's `host:port`.
    pub server_uri: String,
    /// The client's node id, as the server's logs name it.
    pub node_id: String,
    /// The namespace plain target names (`xds:///greeter`) are looked up in.
    pub namespace: Option<String>,
    /// The client's zone (the node's locality).
    pub zone: Option<String>,
    /// Reach the server over TLS: the CA file that signed its certificate, and for mutual TLS
    /// the client's own certificate and key files (PEM).
    pub tls: Option<BootstrapTls>,
}

/// Files for a bootstrap's `tls` channel credentials.
#[derive(Debug, Clone, Default)]
pub struct BootstrapTls {
    pub ca_certificate_file: String,
    pub certificate_file: Option<String>,
    pub private_key_file: Option<String>,
}

impl Bootstrap {
    /// The bootstrap file's JSON (gRPC's xDS bootstrap format, gRFC A27 and A65).
    pub fn to_json(&self) -> String {
        let creds = match &self.tls {
            None => serde_json::json!({ "type": "insecure" }),
            Some(tls) => {
                let mut config = serde_json::Map::new();
                config.insert(
                    "ca_certificate_file".into(),
                    tls.ca_certificate_file.clone().into(),
                );
                if let Some(cert) = &tls.certificate_file {
                    config.insert("certificate_file".into(), cert.clone().into());
                }
                if let Some(key) = &tls.private_key_file {
                    config.insert("private_key_file".into(), key.clone().into());
                }
                serde_json::json!({ "type": "tls", "config": config })
            }
        };
        let mut node = serde_json::Map::new();
        node.insert("id".into(), self.node_id.clone().into());
        // grpc-js refuses a bootstrap whose node has no locality at all.
        node.insert(
            "locality".into(),
            match &self.zone {
                Some(zone) => serde_json::json!({ "zone": zone }),
                None => serde_json::json!({}),
            },
        );
        if let Some(namespace) = &self.namespace {
            node.insert(
                "metadata".into(),
                serde_json::json!({ NAMESPACE_METADATA_KEY: namespace }),
            );
        }
        let bootstrap = serde_json::json!({
            "xds_servers": [{
                "server_uri": self.server_uri,
                "channel_creds": [creds],
                "server_features": ["xds_v3"],
            }],
            "node": node,
        });
        serde_json::to_string_pretty(&bootstrap).unwrap_or_default()
    }
}
