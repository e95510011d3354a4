//! The records that answer one question, from the instances of a live view.
//!
//! Only instances that get traffic (passing or warning) are answered, in a new random order each
//! time so that clients taking the first record spread out. An answer holds as many records as
//! fit the size the client can take (and, over UDP, at most the configured number); when records
//! are left out the answer says so (TC) and a client that wants them all asks again over TCP.
//! The sizes are counted here, not left to the encoder, so that what is cut is whole records and
//! the EDNS record always fits.
//!
//! The records for a name are built once per version of the service ([`Prepared`] keeps them)
//! and every answer refers to them in its own order: an answer costs a shuffle of indices, not
//! a hundred records made and dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use signpost_store::Instance;

use super::names::{ServiceName, addr_label};

/// What the answers are made with.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    /// Lowercase, fully qualified.
    pub(crate) domain: Name,
    pub(crate) ttl: u32,
    /// The most records in one UDP answer.
    pub(crate) udp_max_records: usize,
}

/// How an answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Records,
    /// The name exists, with no records of the type asked for (or none healthy).
    NoData,
    NxDomain,
}

/// The records of one name and type, in the order the view has them, with the size each
/// takes in a message (its glue included).
#[derive(Debug)]
pub(crate) struct Built {
    outcome: Outcome,
    answers: Vec<Record>,
    glue: Vec<Option<Record>>,
    sizes: Vec<usize>,
}

impl Built {
    fn empty(outcome: Outcome) -> Self {
        Built {
            outcome,
            answers: Vec::new(),
            glue: Vec::new(),
            sizes: Vec::new(),
        }
    }

    fn of(answers: Vec<Record>, glue: Vec<Option<Record>>, sizes: Vec<usize>) -> Self {
        Built {
            outcome: if answers.is_empty() {
                Outcome::NoData
            } else {
                Outcome::Records
            },
            answers,
            glue,
            sizes,
        }
    }
}

/// One answer: some of a [`Built`]'s records, in this answer's order.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) outcome: Outcome,
    built: Arc<Built>,
    kept: Vec<u32>,
    /// Records were left out for size.
    pub(crate) truncated: bool,
}

impl Answer {
    pub(crate) fn empty(outcome: Outcome) -> Self {
        Answer::whole(Built::empty(outcome))
    }

    fn whole(built: Built) -> Self {
        let kept = (0..built.answers.len())
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        Answer {
            outcome: built.outcome,
            built: Arc::new(built),
            kept,
            truncated: false,
        }
    }

    pub(crate) fn answers(&self) -> impl Iterator<Item = &Record> + Send {
        self.kept.iter().map(|&i| &self.built.answers[i as usize])
    }

    pub(crate) fn additionals(&self) -> impl Iterator<Item = &Record> + Send {
        self.kept
            .iter()
            .filter_map(|&i| self.built.glue.get(i as usize)?.as_ref())
    }

    #[cfg(test)]
    fn records(&self) -> Vec<&Record> {
        self.answers().collect()
    }
}

/// Room for records in one message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    /// Bytes left after the header, the question and the EDNS record.
    pub(crate) bytes: usize,
    pub(crate) records: usize,
}

impl Room {
    /// The room in a message to a client that takes `payload` bytes (512 without EDNS; 65,535 on
    /// TCP), for question `name`.
    pub(crate) fn new(payload: usize, name: &Name, edns: bool, records: usize) -> Self {
        let used = 12 + wire_len(name) + 4 + if edns { 11 } else { 0 };
        Room {
            bytes: payload.saturating_sub(used),
            records,
        }
    }

    /// Takes room for one record (and its glue) of `bytes`; false when it does not fit.
    fn take(&mut self, bytes: usize) -> bool {
        if self.records == 0 || bytes > self.bytes {
            return false;
        }
        self.records -= 1;
        self.bytes -= bytes;
        true
    }
}

/// A name's length on the wire, uncompressed (so an upper bound).
fn wire_len(name: &Name) -> usize {
    name.len() + 1
}

/// The fixed part of a record after its owner name: type, class, TTL, data length.
const RECORD_HEADER: usize = 10;
/// An owner name that repeats an earlier one is a two-byte pointer.
const POINTER: usize = 2;

impl Zone {
    fn record(&self, name: Name, data: RData) -> Record {
        Record::from_rdata(name, self.ttl, data)
    }

    /// The SOA of the zone, also the authority of a negative answer (its minimum is how long
    /// resolvers may remember that a name has no records: the TTL, as for the records).
    pub(crate) fn soa(&self) -> Record {
        let host = |label: &str| {
            Name::from_ascii(label)
                .and_then(|n| n.append_domain(&self.domain))
                .unwrap_or_else(|_| self.domain.clone())
        };
        let soa = SOA::new(
            host("ns"),
            host("hostmaster"),
            1,
            3600,
            600,
            86400,
            self.ttl,
        );
        self.record(self.domain.clone(), RData::SOA(soa))
    }

    /// The name of an SRV target for an address: `<hex>.addr.<domain>`.
    fn addr_name(&self, ip: IpAddr) -> Option<Name> {
        Name::from_ascii(format!("{}.addr", addr_label(ip)))
            .and_then(|n| n.append_domain(&self.domain))
            .ok()
    }

    /// The apex: its SOA; nothing else.
    pub(crate) fn apex(&self, qtype: RecordType) -> Answer {
        match qtype {
            RecordType::SOA | RecordType::ANY => {
                Answer::whole(Built::of(vec![self.soa()], Vec::new(), Vec::new()))
            }
            _ => Answer::empty(Outcome::NoData),
        }
    }

    /// `<hex>.addr`: the address it spells.
    pub(crate) fn addr(&self, qname: &Name, qtype: RecordType, ip: IpAddr) -> Answer {
        let data = match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(A(v4)),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(v6)),
            _ => return Answer::empty(Outcome::NoData),
        };
        Answer::whole(Built::of(
            vec![self.record(qname.clone(), data)],
            Vec::new(),
            Vec::new(),
        ))
    }

    /// What the answers for one version of a service are made of, made once per version: the
    /// address, SRV target and glue of each instance.
    pub(crate) fn prepare(&self, instances: &[Arc<Instance>]) -> Prepared {
        let targets = instances
            .iter()
            .map(|instance| {
                let ip = instance.address.parse::<IpAddr>().ok();
                let srv_target = match ip {
                    Some(ip) => self.addr_name(ip),
                    None => Name::from_ascii(format!("{}.", instance.address)).ok(),
                };
                let glue = ip
                    .zip(srv_target.as_ref())
                    .map(|(ip, target)| self.record(target.clone(), address_data(ip)));
                Target {
                    instance: instance.clone(),
                    ip,
                    srv_target,
                    glue,
                }
            })
            .collect();
        Prepared {
            targets,
            built: Mutex::default(),
        }
    }

    /// A service name: its healthy instances as A/AAAA (IP addresses only) or SRV records, as
    /// many as `room` takes, in a new order.
    pub(crate) fn service(
        &self,
        prepared: &Prepared,
        asked: &ServiceName,
        owner: &LowerName,
        qtype: RecordType,
        mut room: Room,
    ) -> Answer {
        let built = prepared.built(owner, qtype, || {
            self.build(prepared, asked, &Name::from(owner), qtype)
        });
        let mut order: Vec<u32> = (0..built.answers.len())
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        fastrand::shuffle(&mut order);
        let mut truncated = false;
        let mut kept = Vec::with_capacity(order.len());
        for i in order {
            if !room.take(built.sizes[i as usize]) {
                truncated = true;
                break;
            }
            kept.push(i);
        }
        Answer {
            outcome: built.outcome,
            built,
            kept,
            truncated,
        }
    }

    /// Every record `owner` has of `qtype`, for every healthy instance it stands for.
    fn build(
        &self,
        prepared: &Prepared,
        asked: &ServiceName,
        owner: &Name,
        qtype: RecordType,
    ) -> Built {
        let mut chosen: Vec<(&Target, u16)> = prepared
            .targets
            .iter()
            .filter(|t| {
                asked.tag.as_ref().is_none_or(|tag| {
                    t.instance
                        .tags
                        .iter()
                        .any(|have| have.eq_ignore_ascii_case(tag))
                })
            })
            .filter_map(|t| match &asked.port_name {
                None => Some((t, t.instance.port)),
                Some(name) => named_port(&t.instance, name).map(|port| (t, port)),
            })
            .collect();
        if chosen.is_empty() {
            return Built::empty(Outcome::NxDomain);
        }
        chosen.retain(|(t, _)| t.instance.health.is_healthy());
        let (v4, v6) = match qtype {
            // Kubernetes' port names are SRV names only.
            RecordType::A | RecordType::AAAA | RecordType::ANY if asked.port_name.is_some() => {
                return Built::empty(Outcome::NoData);
            }
            RecordType::A => (true, false),
            RecordType::AAAA => (false, true),
            RecordType::ANY => (true, true),
            RecordType::SRV => return self.srv(&chosen, owner),
            _ => return Built::empty(Outcome::NoData),
        };
        let mut answers = Vec::with_capacity(chosen.len());
        let mut sizes = Vec::with_capacity(chosen.len());
        for (target, _) in &chosen {
            // Hostnames are answered in SRV records, whose targets are names.
            let (data, size) = match target.ip {
                Some(IpAddr::V4(ip)) if v4 => (RData::A(A(ip)), 4),
                Some(IpAddr::V6(ip)) if v6 => (RData::AAAA(AAAA(ip)), 16),
                _ => continue,
            };
            answers.push(self.record(owner.clone(), data));
            sizes.push(POINTER + RECORD_HEADER + size);
        }
        Built::of(answers, Vec::new(), sizes)
    }

    fn srv(&self, chosen: &[(&Target, u16)], owner: &Name) -> Built {
        let mut answers = Vec::with_capacity(chosen.len());
        let mut glue = Vec::with_capacity(chosen.len());
        let mut sizes = Vec::with_capacity(chosen.len());
        for (target, port) in chosen {
            let Some(name) = &target.srv_target else {
                continue;
            };
            // A target in SRV data is not compressed (RFC 2782), and the glue's owner may not
            // point at it: both are counted whole.
            let glue_size = match target.ip {
                Some(IpAddr::V6(_)) => wire_len(name) + RECORD_HEADER + 16,
                Some(IpAddr::V4(_)) => wire_len(name) + RECORD_HEADER + 4,
                None => 0,
            };
            let srv = SRV::new(1, srv_weight(target.instance.weight), *port, name.clone());
            answers.push(self.record(owner.clone(), RData::SRV(srv)));
            glue.push(target.glue.clone());
            sizes.push(POINTER + RECORD_HEADER + 6 + wire_len(name) + glue_size);
        }
        Built::of(answers, glue, sizes)
    }
}

/// One version of a service, ready to answer from.
#[derive(Debug)]
pub(crate) struct Prepared {
    targets: Vec<Target>,
    /// The records of each name asked for in this version.
    built: Mutex<HashMap<(LowerName, RecordType), Arc<Built>>>,
}

/// Names one version keeps records for; past it, the set starts over (a flood of names
/// cannot grow it).
const MAX_BUILT_NAMES: usize = 64;

impl Prepared {
    fn built(
        &self,
        owner: &LowerName,
        qtype: RecordType,
        build: impl FnOnce() -> Built,
    ) -> Arc<Built> {
        let key = (owner.clone(), qtype);
        if let Some(built) = self.lock().get(&key) {
            return built.clone();
        }
        // Built outside the lock; two queries racing both build, one is kept.
        let built = Arc::new(build());
        let mut kept = self.lock();
        if kept.len() >= MAX_BUILT_NAMES {
            kept.clear();
        }
        kept.insert(key, built.clone());
        built
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(LowerName, RecordType), Arc<Built>>> {
        // Inserts and clears only: a panic cannot leave the map half-changed.
        self.built.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct Target {
    instance: Arc<Instance>,
    ip: Option<IpAddr>,
    /// `<hex>.addr.<domain>` for an address, the hostname itself otherwise; `None` for a
    /// hostname that is not a DNS name.
    srv_target: Option<Name>,
    glue: Option<Record>,
}

fn address_data(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// An SRV weight is 16 bits; a larger weight keeps the largest share that fits.
fn srv_weight(weight: u32) -> u16 {
    u16::try_from(weight).unwrap_or(u16::MAX)
}

/// The port an instance names `name`: metadata `port.<name>` (a port number), or its own port
/// when its metadata `port-name` says `name`.
pub(crate) fn named_port(instance: &Instance, name: &str) -> Option<u16> {
    let mut own = None;
    for (key, value) in instance.metadata.iter() {
        if let Some(port) = key.strip_prefix("port.")
            && port.eq_ignore_ascii_case(name)
        {
            if let Some(port) = value.trim().parse::<u16>().ok().filter(|p| *p != 0) {
                return Some(port);
            }
        } else if key == "port-name" && value.eq_ignore_ascii_case(name) {
            own = Some(instance.port);
        }
    }
    own
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use signpost_store::{Health, Metadata};

    fn zone(max: usize) -> Zone {
        Zone {
            domain: Name::from_ascii("signpost.").unwrap(),
            ttl: 5,
            udp_max_records: max,
        }
    }

    fn instance(id: &str, address: &str, health: Health, meta: &[(&str, &str)]) -> Arc<Instance> {
        Arc::new(Instance {
            namespace: "default".into(),
            service: "web".into(),
            id: id.into(),
            address: address.into(),
            port: 8080,
            tags: vec!["Primary".into()],
            metadata: Metadata::from_iter(meta.iter().map(|(k, v)| (k.to_string(), v.to_string()))),
            weight: 100,
            health,
            ..Instance::default()
        })
    }

    fn asked(tag: Option<&str>, port: Option<&str>) -> ServiceName {
        ServiceName {
            namespace: "default".into(),
            service: "web".into(),
            tag: tag.map(Into::into),
            port_name: port.map(Into::into),
        }
    }

    fn qname() -> LowerName {
        LowerName::from(Name::from_ascii("web.service.signpost.").unwrap())
    }

    fn room(payload: usize) -> Room {
        Room::new(payload, &Name::from(qname()), true, usize::MAX)
    }

    #[test]
    fn only_healthy_instances_and_nodata_when_none() {
        let z = zone(32);
        let all = [
            instance("a", "10.0.0.1", Health::Passing, &[]),
            instance("b", "10.0.0.2", Health::Warning, &[]),
            instance("c", "10.0.0.3", Health::Critical, &[]),
            instance("d", "fd00::4", Health::Passing, &[]),
            instance("e", "db.example.com", Health::Passing, &[]),
        ];
        let a = z.service(
            &z.prepare(&all),
            &asked(None, None),
            &qname(),
            RecordType::A,
            room(512),
        );
        let mut ips: Vec<String> = a.answers().map(|r| r.data.to_string()).collect();
        ips.sort();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
        let aaaa = z.service(
            &z.prepare(&all),
            &asked(None, None),
            &qname(),
            RecordType::AAAA,
            room(512),
        );
        assert_eq!(aaaa.records().len(), 1);
        let srv = z.service(
            &z.prepare(&all),
            &asked(None, None),
            &qname(),
            RecordType::SRV,
            room(512),
        );
        assert_eq!(srv.records().len(), 4, "hostnames are SRV targets");
        assert_eq!(srv.additionals().count(), 3, "glue for the addresses only");

        let critical = [instance("c", "10.0.0.3", Health::Critical, &[])];
        let none = z.service(
            &z.prepare(&critical),
            &asked(None, None),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert_eq!(none.outcome, Outcome::NoData);
        let none = z.service(
            &z.prepare(&[]),
            &asked(None, None),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert_eq!(none.outcome, Outcome::NxDomain);
        let tag = z.service(
            &z.prepare(&all),
            &asked(Some("primary"), None),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert_eq!(tag.records().len(), 2, "tags match without case");
        let tag = z.service(
            &z.prepare(&all),
            &asked(Some("other"), None),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert_eq!(tag.outcome, Outcome::NxDomain);
    }

    #[test]
    fn answers_stop_at_the_room_and_say_so() {
        let z = zone(32);
        let many: Vec<_> = (0..200)
            .map(|i| {
                instance(
                    &i.to_string(),
                    &format!("10.0.{}.{}", i / 250, i % 250),
                    Health::Passing,
                    &[],
                )
            })
            .collect();
        let udp = z.service(
            &z.prepare(&many),
            &asked(None, None),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert!(udp.truncated);
        let mut encoded = Vec::new();
        for r in &udp.records() {
            assert!(!encoded.contains(&r.data.to_string()), "no instance twice");
            encoded.push(r.data.to_string());
        }
        assert!(udp.records().len() >= 20, "{}", udp.records().len());
        let few = Room::new(4096, &Name::from(qname()), true, 5);
        assert_eq!(
            z.service(
                &z.prepare(&many),
                &asked(None, None),
                &qname(),
                RecordType::A,
                few
            )
            .records()
            .len(),
            5
        );
        let tcp = z.service(
            &z.prepare(&many),
            &asked(None, None),
            &qname(),
            RecordType::SRV,
            room(65535),
        );
        assert!(!tcp.truncated);
        assert_eq!(tcp.records().len(), 200);
    }

    #[test]
    fn port_names_come_from_metadata() {
        let z = zone(32);
        let all = [
            instance(
                "a",
                "10.0.0.1",
                Health::Passing,
                &[("port.metrics", "9090")],
            ),
            instance("b", "10.0.0.2", Health::Passing, &[("port-name", "grpc")]),
            instance(
                "c",
                "10.0.0.3",
                Health::Passing,
                &[("port.metrics", "nope")],
            ),
        ];
        let metrics = z.service(
            &z.prepare(&all),
            &asked(None, Some("metrics")),
            &qname(),
            RecordType::SRV,
            room(512),
        );
        assert_eq!(metrics.records().len(), 1);
        assert!(
            metrics.records()[0].data.to_string().contains(" 9090 "),
            "{}",
            metrics.records()[0].data
        );
        let grpc = z.service(
            &z.prepare(&all),
            &asked(None, Some("grpc")),
            &qname(),
            RecordType::SRV,
            room(512),
        );
        assert!(grpc.records()[0].data.to_string().contains(" 8080 "));
        let a = z.service(
            &z.prepare(&all),
            &asked(None, Some("grpc")),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert_eq!(a.outcome, Outcome::NoData);
        let none = z.service(
            &z.prepare(&all),
            &asked(None, Some("http")),
            &qname(),
            RecordType::SRV,
            room(512),
        );
        assert_eq!(none.outcome, Outcome::NxDomain);
    }
}
