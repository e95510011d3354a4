//! An authoritative DNS server for the registry: any program that resolves a name can find the
//! healthy instances of a service.
//!
//! [hickory-server](https://docs.rs/hickory-server) (the DNS server crate of the Rust ecosystem,
//! formerly trust-dns) reads queries from UDP and TCP, drops packets that are not DNS and answers
//! malformed ones with FORMERR; [async-trait](https://docs.rs/async-trait) is how its handler
//! trait is implemented. Here, a query is read as a name (`names`), looked up in a live view of
//! the service (`crate::view`, the same views the xDS server follows, so an answer lags the
//! registry by no more than a watch does), and answered (`answer`).
//!
//! The server is authoritative for one domain (`signpost.` unless configured, `consul.` for
//! clients written for Consul) and refuses every other name: it is not a resolver. Views of the
//! services asked about are kept while they are asked for; one not asked for in
//! [`IDLE`] is let go, and at most [`DnsConfig::max_followed`] are kept at once.

mod answer;
mod names;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Name, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo, Server};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::view::{LiveView, ViewReceiver, ViewState, Views};
use answer::{Answer, Outcome, Prepared, Room, Zone};
use names::Asked;

/// How long a view nobody asks about is kept.
pub const IDLE: Duration = Duration::from_secs(300);

/// How long a query waits for a service's first read before the answer is SERVFAIL.
const FIRST_READ: Duration = Duration::from_secs(2);

/// The largest UDP answer, whatever a client offers: larger ones are fragmented, and fragments
/// are lost or dropped on the way (DNS Flag Day 2020's 1,232 bytes, as NSD and BIND default to).
const MAX_UDP_PAYLOAD: u16 = 1232;

/// A TCP connection that sends no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// DNS settings.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The domain answered, such as `signpost.` or `consul.`.
    pub domain: String,
    /// The TTL of every record, and how long resolvers may remember a negative answer.
    pub ttl: Duration,
    /// The most records in one UDP answer; a larger answer is cut, marked truncated, and given
    /// whole over TCP. Fewer go out when fewer fit the client's UDP size.
    pub udp_max_records: usize,
    /// Only these namespaces are answered (others do not exist); `None` answers every one.
    pub namespaces: Option<Vec<String>>,
    /// The most services whose views are kept for DNS at once.
    pub max_followed: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            domain: "signpost.".into(),
            ttl: Duration::from_secs(5),
            udp_max_records: 32,
            namespaces: None,
            max_followed: 10_000,
        }
    }
}

/// A bound DNS listener: UDP and TCP on one port.
#[derive(Debug)]
pub struct DnsListener {
    udp: UdpSocket,
    tcp: TcpListener,
    config: DnsConfig,
    zone: Name,
}

/// Why a DNS listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("--dns-domain {0:?} is not a domain name: {1}")]
    Domain(String, String),
    #[error("cannot listen for DNS on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

impl DnsListener {
    /// Binds UDP and TCP on `addr`. With port 0, both get the same free port.
    pub async fn bind(addr: SocketAddr, config: DnsConfig) -> Result<Self, DnsError> {
        let zone = Name::from_ascii(&config.domain)
            .map(|mut n| {
                n.set_fqdn(true);
                n.to_lowercase()
            })
            .map_err(|e| DnsError::Domain(config.domain.clone(), e.to_string()))?;
        // A port the OS picks for UDP may be taken for TCP: try a few.
        let mut last = None;
        for _ in 0..if addr.port() == 0 { 20 } else { 1 } {
            let udp = UdpSocket::bind(addr)
                .await
                .map_err(|e| DnsError::Bind(addr, e))?;
            let bound = udp.local_addr().map_err(|e| DnsError::Bind(addr, e))?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => {
                    return Ok(DnsListener {
                        udp,
                        tcp,
                        config,
                        zone,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(DnsError::Bind(
            addr,
            last.unwrap_or_else(|| std::io::Error::other("no port")),
        ))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// Serves DNS until `shutdown`.
pub(crate) async fn serve(
    listener: DnsListener,
    views: Arc<Views>,
    metrics: Option<Arc<Metrics>>,
    shutdown: CancellationToken,
) {
    let DnsListener {
        udp,
        tcp,
        config,
        zone,
    } = listener;
    let followed = Arc::new(Followed {
        views,
        map: RwLock::default(),
        started: Instant::now(),
        max: config.max_followed.max(1),
    });
    let handler = Handler {
        zone: Zone {
            domain: zone,
            ttl: u32::try_from(config.ttl.as_secs()).unwrap_or(u32::MAX),
            udp_max_records: config.udp_max_records.max(1),
        },
        namespaces: config.namespaces,
        followed: followed.clone(),
        metrics,
    };
    let mut server = Server::new(handler);
    server.register_socket(udp);
    // 64 answers queued per connection before its reader waits.
    server.register_listener(tcp, TCP_IDLE, 64);
    let sweeper = async {
        let mut tick = tokio::time::interval(IDLE / 10);
        loop {
            tick.tick().await;
            followed.sweep(IDLE);
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = sweeper => {}
        result = server.block_until_done() => {
            if let Err(e) = result {
                tracing::error!(error = %e, "the DNS server stopped");
            }
            return;
        }
    }
    if let Err(e) = server.shutdown_gracefully().await {
        tracing::warn!(error = %e, "the DNS server did not stop cleanly");
    }
}

type Key = (String, String);

/// A view kept for DNS, when it was last asked for, and its last version prepared to answer.
struct Entry {
    rx: ViewReceiver,
    /// Seconds since `Followed::started`.
    used: AtomicU64,
    prepared: Mutex<Option<(Arc<LiveView>, Arc<Prepared>)>>,
}

impl Entry {
    /// `view` prepared by `zone`, made once per version.
    fn prepared(&self, view: Arc<LiveView>, zone: &Zone) -> Arc<Prepared> {
        let mut kept = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, prepared)) = &*kept
            && Arc::ptr_eq(seen, &view)
        {
            return prepared.clone();
        }
        let prepared = Arc::new(zone.prepare(&view.instances));
        *kept = Some((view, prepared.clone()));
        prepared
    }
}

/// The views DNS keeps, so that a query does not start (and end) one each time.
struct Followed {
    views: Arc<Views>,
    map: RwLock<HashMap<Key, Arc<Entry>>>,
    started: Instant,
    max: usize,
}

impl Followed {
    fn now(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn entry(&self, key: &Key) -> Arc<Entry> {
        let now = self.now();
        let found = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        if let Some(entry) = found {
            entry.used.store(now, Ordering::Relaxed);
            return entry;
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get(key) {
            return entry.clone();
        }
        if map.len() >= self.max {
            // The least recently asked for goes; a scan, at the limit only.
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.used.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let entry = Arc::new(Entry {
            rx: self.views.follow(&key.0, &key.1),
            used: AtomicU64::new(now),
            prepared: Mutex::default(),
        });
        map.insert(key.clone(), entry.clone());
        entry
    }

    fn forget(&self, key: &Key, entry: &Arc<Entry>) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            map.remove(key);
        }
    }

    fn sweep(&self, idle: Duration) {
        let cutoff = self.now().saturating_sub(idle.as_secs());
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, e| e.used.load(Ordering::Relaxed) >= cutoff);
    }

    /// The current version of a service, prepared to answer from; `None` if it cannot be read.
    async fn prepared(&self, namespace: &str, service: &str, zone: &Zone) -> Option<Arc<Prepared>> {
        let key = (namespace.to_owned(), service.to_owned());
        // A view that ended (its store read failed, or it lagged past repair) is followed anew
        // once.
        for _ in 0..2 {
            let entry = self.entry(&key);
            let state = entry.rx.borrow().clone();
            match state {
                ViewState::Live(view) => return Some(entry.prepared(view, zone)),
                ViewState::Ended => self.forget(&key, &entry),
                ViewState::Reading => {
                    let mut rx = entry.rx.clone();
                    let read = tokio::time::timeout(
                        FIRST_READ,
                        rx.wait_for(|s| !matches!(s, ViewState::Reading)),
                    )
                    .await;
                    match read {
                        Ok(Ok(state)) => match &*state {
                            ViewState::Live(view) => {
                                return Some(entry.prepared(view.clone(), zone));
                            }
                            _ => self.forget(&key, &entry),
                        },
                        Ok(Err(_)) => self.forget(&key, &entry),
                        Err(_) => return None,
                    }
                }
            }
        }
        None
    }
}

struct Handler {
    zone: Zone,
    namespaces: Option<Vec<String>>,
    followed: Arc<Followed>,
    metrics: Option<Arc<Metrics>>,
}

/// What a query came to, for the log and the metrics.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Answer,
    Truncated,
    NoData,
    NxDomain,
    Refused,
    ServFail,
    FormErr,
    BadVers,
    NotImp,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Answer => "answer",
            Verdict::Truncated => "truncated",
            Verdict::NoData => "nodata",
            Verdict::NxDomain => "nxdomain",
            Verdict::Refused => "refused",
            Verdict::ServFail => "servfail",
            Verdict::FormErr => "formerr",
            Verdict::BadVers => "badvers",
            Verdict::NotImp => "notimp",
        }
    }
}

impl Handler {
    /// The answer to a well-formed query, or the error code to give instead.
    async fn lookup(&self, request: &Request, room: Room) -> Result<(Answer, bool), ResponseCode> {
        let info = request.request_info().map_err(|_| ResponseCode::FormErr)?;
        let query = info.query;
        if query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY {
            return Err(ResponseCode::Refused);
        }
        let qname: &Name = query.name();
        if !self.zone.domain.zone_of(qname) {
            // Not ours, and this is no resolver.
            return Err(ResponseCode::Refused);
        }
        let below = usize::from(qname.num_labels() - self.zone.domain.num_labels());
        let labels: Option<Vec<&str>> = qname
            .iter()
            .take(below)
            .map(|l| std::str::from_utf8(l).ok())
            .collect();
        let asked = labels.as_deref().map_or(Asked::Unknown, names::parse);
        // Records are owned by the name as the client spelled it.
        let owner = query.original().name().clone();
        let qtype = query.query_type();
        let answer = match asked {
            Asked::Apex => self.zone.apex(qtype),
            Asked::Addr(ip) => self.zone.addr(&owner, qtype, ip),
            Asked::Unknown => return Ok((nxdomain(), true)),
            Asked::Service(name) => {
                if self
                    .namespaces
                    .as_ref()
                    .is_some_and(|allowed| !allowed.contains(&name.namespace))
                {
                    return Ok((nxdomain(), true));
                }
                let prepared = self
                    .followed
                    .prepared(&name.namespace, &name.service, &self.zone)
                    .await
                    .ok_or(ResponseCode::ServFail)?;
                self.zone
                    .service(&prepared, &name, query.name(), qtype, room)
            }
        };
        let negative = answer.outcome != Outcome::Records;
        Ok((answer, negative))
    }

    fn count(&self, result: Verdict) {
        if let Some(m) = &self.metrics {
            m.dns_query(result.label());
        }
    }
}

fn nxdomain() -> Answer {
    Answer::empty(Outcome::NxDomain)
}

/// What to send back for one request.
struct Reply {
    metadata: Metadata,
    edns: Option<Edns>,
    answer: Option<Answer>,
    /// The zone's SOA, with a negative answer.
    soa: Option<Record>,
    verdict: Verdict,
}

impl Handler {
    async fn reply(&self, request: &Request) -> Reply {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = false;
        let reply = |metadata: Metadata, edns: Option<Edns>, verdict| Reply {
            metadata,
            edns,
            answer: None,
            soa: None,
            verdict,
        };

        let mut edns = None;
        let mut payload = 512;
        if let Some(asked) = request.edns.as_ref() {
            let mut ours = Edns::new();
            ours.set_max_payload(MAX_UDP_PAYLOAD);
            ours.set_version(0);
            payload = usize::from(asked.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            if asked.version() > 0 {
                metadata.response_code = ResponseCode::BADVERS;
                return reply(metadata, Some(ours), Verdict::BadVers);
            }
            edns = Some(ours);
        }
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            metadata.response_code = ResponseCode::NotImp;
            return reply(metadata, edns, Verdict::NotImp);
        }
        let qname = request
            .queries
            .queries()
            .first()
            .map(|q| Name::from(q.name()))
            .unwrap_or_else(Name::root);
        let room = match request.protocol() {
            Protocol::Udp => Room::new(payload, &qname, edns.is_some(), self.zone.udp_max_records),
            _ => Room::new(usize::from(u16::MAX), &qname, edns.is_some(), usize::MAX),
        };
        match self.lookup(request, room).await {
            Err(code) => {
                metadata.response_code = code;
                metadata.authoritative = code != ResponseCode::Refused;
                let verdict = match code {
                    ResponseCode::Refused => Verdict::Refused,
                    ResponseCode::FormErr => Verdict::FormErr,
                    _ => Verdict::ServFail,
                };
                reply(metadata, edns, verdict)
            }
            Ok((answer, negative)) => {
                let verdict = match answer.outcome {
                    Outcome::NxDomain => Verdict::NxDomain,
                    Outcome::NoData => Verdict::NoData,
                    Outcome::Records if answer.truncated => Verdict::Truncated,
                    Outcome::Records => Verdict::Answer,
                };
                if answer.outcome == Outcome::NxDomain {
                    metadata.response_code = ResponseCode::NXDomain;
                }
                metadata.truncation = answer.truncated;
                Reply {
                    metadata,
                    edns,
                    soa: negative.then(|| self.zone.soa()),
                    answer: Some(answer),
                    verdict,
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let reply = self.reply(request).await;
        self.count(reply.verdict);
        let answer = reply.answer.as_ref();
        let built = MessageResponseBuilder::new(&request.queries, reply.edns.as_ref()).build(
            reply.metadata,
            answer.into_iter().flat_map(Answer::answers),
            std::iter::empty(),
            reply.soa.as_ref(),
            answer.into_iter().flat_map(Answer::additionals),
        );
        match response.send_response(built).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "cannot send a DNS answer");
                failed(request)
            }
        }
    }
}

/// The info of an answer that could not be sent.
fn failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(hickory_server::proto::op::Header {
        metadata,
        counts: Default::default(),
    })
}
