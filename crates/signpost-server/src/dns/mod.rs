//! An authoritative DNS server for the registry: any program that resolves a name can find the
//! healthy instances of a service.
//!
//! A query is read with [hickory-server](https://docs.rs/hickory-server)'s parser (the DNS
//! crates of the Rust ecosystem, formerly trust-dns), read as a name (`names`), looked up in a
//! live view of the service (`crate::view`, the views the xDS server follows, so an answer lags
//! the registry by no more than a watch does), and answered from records encoded once per
//! version of the service (`answer`, `wire`). The UDP and TCP loops are here rather than
//! hickory's: its server encodes every answer record by record through its message encoder,
//! which held a 100-instance answer to a third of a static server's rate (docs/benchmarks.md).
//!
//! The server is authoritative for one domain (`signpost.` unless configured, `consul.` for
//! clients written for Consul) and refuses every other name: it is not a resolver. Views of the
//! services asked about are kept while they are asked for; one not asked for in
//! [`IDLE`] is let go, and at most [`DnsConfig::max_followed`] are kept at once.

mod answer;
mod names;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{LowerQuery, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Name, RecordType};
use hickory_server::server::Request;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::view::{LiveView, ViewReceiver, ViewState, Views};
use answer::{Answer, Outcome, Prepared, Zone};
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
    #[error("--dns-namespaces: {0}")]
    Namespace(String),
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
        for namespace in config.namespaces.iter().flatten() {
            // The registry's own rule: a namespace it would refuse can never be asked for.
            if namespace.is_empty() {
                return Err(DnsError::Namespace("an empty namespace".into()));
            }
            crate::validate::namespace("namespace", namespace.clone())
                .map_err(|e| DnsError::Namespace(e.to_string()))?;
        }
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
    let handler = Arc::new(Handler {
        zone: Zone::new(
            zone,
            // At most 2^31 - 1 (RFC 2181 8).
            u32::try_from(config.ttl.as_secs()).map_or(i32::MAX as u32, |t| t.min(i32::MAX as u32)),
            config.udp_max_records.max(1),
        ),
        namespaces: config.namespaces,
        followed: followed.clone(),
        metrics,
    });
    let udp = Arc::new(udp);
    let mut tasks = tokio::task::JoinSet::new();
    // One reader per core: a UDP socket's queries are taken by whichever is free.
    let readers = std::thread::available_parallelism().map_or(2, |n| n.get());
    for _ in 0..readers {
        tasks.spawn(serve_udp(udp.clone(), handler.clone(), shutdown.clone()));
    }
    tasks.spawn(serve_tcp(tcp, handler.clone(), shutdown.clone()));
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
    }
    tasks.shutdown().await;
}

/// The most bytes read of one UDP query (a query is one question and perhaps an EDNS record).
const MAX_UDP_QUERY: usize = 4096;

async fn serve_udp(socket: Arc<UdpSocket>, handler: Arc<Handler>, shutdown: CancellationToken) {
    let mut buf = vec![0u8; MAX_UDP_QUERY];
    loop {
        let (len, from) = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    // ICMP errors from earlier sends (a client that went away) surface here; the
                    // socket itself goes on.
                    tracing::debug!(error = %e, "DNS: cannot receive on UDP");
                    continue;
                }
            },
        };
        let Some(answer) = handler.answer(&buf[..len], Transport::Udp).await else {
            continue;
        };
        if let Err(e) = socket.send_to(&answer, from).await {
            tracing::debug!(error = %e, %from, "DNS: cannot send a UDP answer");
        }
    }
}

/// TCP connections served at once; more wait to be accepted.
const MAX_TCP_CONNECTIONS: usize = 1024;

async fn serve_tcp(listener: TcpListener, handler: Arc<Handler>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let (stream, from) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "DNS: cannot accept a TCP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = serve_connection(stream, &handler) => if let Err(e) = result {
                    tracing::debug!(error = %e, %from, "DNS: TCP connection ended");
                },
            }
        });
    }
}

/// Queries on one TCP connection, each a two-byte length and a message (RFC 1035 4.2.2),
/// answered in order; the connection closes after [`TCP_IDLE`] without a query.
async fn serve_connection(mut stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.set_nodelay(true)?;
    let mut message = Vec::new();
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            // Closed, or idle: either way, done.
            Ok(Err(_)) | Err(_) => return Ok(()),
        };
        message.resize(len, 0);
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut message)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let Some(answer) = handler.answer(&message, Transport::Tcp).await else {
            return Ok(());
        };
        // Answers are at most 65,535 bytes: the room an answer is cut to.
        let mut framed = Vec::with_capacity(2 + answer.len());
        framed.extend_from_slice(&(answer.len() as u16).to_be_bytes());
        framed.extend_from_slice(&answer);
        stream.write_all(&framed).await?;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
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

    /// The entry of `key`, made (and the service followed) when there is none and `follow`
    /// says so.
    fn entry(&self, key: &Key, follow: impl FnOnce() -> bool) -> Option<Arc<Entry>> {
        let now = self.now();
        let found = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        if let Some(entry) = found {
            entry.used.store(now, Ordering::Relaxed);
            return Some(entry);
        }
        if !follow() {
            return None;
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get(key) {
            return Some(entry.clone());
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
        Some(entry)
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
            // A name no instance has is not followed: a flood of made-up names must not start a
            // view for each.
            let Some(entry) = self.entry(&key, || self.views.has_instances(namespace, service))
            else {
                return Some(Arc::new(zone.prepare(&[])));
            };
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
    /// The answer to `packet`, or `None` when nothing is to be sent (not DNS, or a response).
    async fn answer(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let head = wire::query_head(packet)?;
        let mut reply = wire::Reply {
            head,
            rcode: u16::from(ResponseCode::NoError),
            authoritative: true,
            question: None,
            records: &[],
            soa: None,
            edns: None,
            limit: usize::from(u16::MAX),
            max_records: usize::MAX,
        };
        let from = SocketAddr::from(([0, 0, 0, 0], 0));
        let protocol = match transport {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        };
        let request = match Request::from_bytes(packet.to_vec(), from, protocol) {
            Ok(request) => request,
            Err(_) => {
                self.count(Verdict::FormErr);
                reply.rcode = u16::from(ResponseCode::FormErr);
                return Some(reply.encode());
            }
        };
        if let Some(asked) = request.edns.as_ref() {
            reply.edns = Some(MAX_UDP_PAYLOAD);
            if transport == Transport::Udp {
                reply.limit = usize::from(asked.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            }
            if asked.version() > 0 {
                self.count(Verdict::BadVers);
                reply.rcode = u16::from(ResponseCode::BADVERS);
                return Some(reply.encode());
            }
        } else if transport == Transport::Udp {
            reply.limit = 512;
        }
        if transport == Transport::Udp {
            reply.max_records = self.zone.udp_max_records;
        }
        if request.metadata.op_code != OpCode::Query {
            self.count(Verdict::NotImp);
            reply.rcode = u16::from(ResponseCode::NotImp);
            return Some(reply.encode());
        }
        let Ok(info) = request.request_info() else {
            // Not exactly one question.
            self.count(Verdict::FormErr);
            reply.rcode = u16::from(ResponseCode::FormErr);
            return Some(reply.encode());
        };
        let query = info.query;
        let original = query.original();
        reply.question = Some((
            original.name(),
            u16::from(query.query_type()),
            u16::from(query.query_class()),
        ));
        let (verdict, answer) = match self.lookup(query).await {
            Err(code) => {
                reply.rcode = u16::from(code);
                reply.authoritative = code != ResponseCode::Refused;
                let verdict = match code {
                    ResponseCode::Refused => Verdict::Refused,
                    _ => Verdict::ServFail,
                };
                (verdict, None)
            }
            Ok(answer) => {
                let verdict = match answer.outcome {
                    Outcome::NxDomain => Verdict::NxDomain,
                    Outcome::NoData => Verdict::NoData,
                    Outcome::Records => Verdict::Answer,
                };
                if answer.outcome == Outcome::NxDomain {
                    reply.rcode = u16::from(ResponseCode::NXDomain);
                }
                if answer.outcome != Outcome::Records {
                    reply.soa = Some(self.zone.soa());
                }
                (verdict, Some(answer))
            }
        };
        let records = answer.as_ref().map(Answer::records).unwrap_or_default();
        reply.records = &records;
        let encoded = reply.encode();
        // The TC bit: records were left out.
        let truncated = encoded.get(2).is_some_and(|flags| flags & 0x02 != 0);
        self.count(if truncated {
            Verdict::Truncated
        } else {
            verdict
        });
        Some(encoded)
    }

    /// The answer to one question, or the error code to give instead.
    async fn lookup(&self, query: &LowerQuery) -> Result<Answer, ResponseCode> {
        if query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY {
            return Err(ResponseCode::Refused);
        }
        let qname: &Name = query.name();
        if !self.zone.domain.zone_of(qname) {
            // Not ours, and this is no resolver.
            return Err(ResponseCode::Refused);
        }
        // Counted, not `num_labels`, which leaves out a leading `*`.
        let below = qname
            .iter()
            .count()
            .saturating_sub(self.zone.domain.iter().count());
        let labels: Option<Vec<&str>> = qname
            .iter()
            .take(below)
            .map(|l| std::str::from_utf8(l).ok())
            .collect();
        let asked = labels.as_deref().map_or(Asked::Unknown, names::parse);
        let qtype = query.query_type();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // The zone is the registry: there is nothing to transfer.
            return Err(ResponseCode::Refused);
        }
        Ok(match asked {
            Asked::Apex => self.zone.apex(qtype),
            Asked::Between => Answer::empty(Outcome::NoData),
            Asked::Addr(ip) => self.zone.addr(qtype, ip),
            Asked::Unknown => Answer::empty(Outcome::NxDomain),
            Asked::Service(name) => {
                if self
                    .namespaces
                    .as_ref()
                    .is_some_and(|allowed| !allowed.contains(&name.namespace))
                {
                    return Ok(Answer::empty(Outcome::NxDomain));
                }
                let prepared = self
                    .followed
                    .prepared(&name.namespace, &name.service, &self.zone)
                    .await
                    .ok_or(ResponseCode::ServFail)?;
                self.zone.service(&prepared, &name, query.name(), qtype)
            }
        })
    }

    fn count(&self, result: Verdict) {
        if let Some(m) = &self.metrics {
            m.dns_query(result.label());
        }
    }
}
