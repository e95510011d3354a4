//! The records that answer one question, from the instances of a live view.
//!
//! Only instances that get traffic (passing or warning) are answered, in a new random order each
//! time so that clients taking the first record spread out. An answer holds as many records as
//! fit the size the client can take (and, over UDP, at most the configured number); when records
//! are left out the answer says so (TC) and a client that wants them all asks again over TCP.
//! The sizes are counted here, not left to the encoder, so that what is cut is whole records and
//! the EDNS record always fits.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
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

#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) outcome: Outcome,
    pub(crate) answers: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
    /// Records were left out for size.
    pub(crate) truncated: bool,
}

impl Answer {
    fn empty(outcome: Outcome) -> Self {
        Answer {
            outcome,
            answers: Vec::new(),
            additionals: Vec::new(),
            truncated: false,
        }
    }

    fn of(answers: Vec<Record>, additionals: Vec<Record>, truncated: bool) -> Self {
        Answer {
            outcome: if answers.is_empty() {
                Outcome::NoData
            } else {
                Outcome::Records
            },
            answers,
            additionals,
            truncated,
        }
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
            RecordType::SOA | RecordType::ANY => Answer::of(vec![self.soa()], Vec::new(), false),
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
        Answer::of(vec![self.record(qname.clone(), data)], Vec::new(), false)
    }

    /// A service name: its healthy instances as A/AAAA (IP addresses only) or SRV records.
    pub(crate) fn service(
        &self,
        instances: &[Arc<Instance>],
        asked: &ServiceName,
        qname: &Name,
        qtype: RecordType,
        mut room: Room,
    ) -> Answer {
        let mut chosen: Vec<(&Instance, u16)> = instances
            .iter()
            .filter(|i| {
                asked
                    .tag
                    .as_ref()
                    .is_none_or(|tag| i.tags.iter().any(|t| t.eq_ignore_ascii_case(tag)))
            })
            .filter_map(|i| match &asked.port_name {
                None => Some((&**i, i.port)),
                Some(name) => named_port(i, name).map(|port| (&**i, port)),
            })
            .collect();
        if chosen.is_empty() {
            return Answer::empty(Outcome::NxDomain);
        }
        chosen.retain(|(i, _)| i.health.is_healthy());
        fastrand::shuffle(&mut chosen);

        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let mut truncated = false;
        let addresses = match qtype {
            // Kubernetes' port names are SRV names only.
            RecordType::A | RecordType::AAAA | RecordType::ANY if asked.port_name.is_some() => {
                return Answer::empty(Outcome::NoData);
            }
            RecordType::A => Some((true, false)),
            RecordType::AAAA => Some((false, true)),
            RecordType::ANY => Some((true, true)),
            RecordType::SRV => None,
            _ => return Answer::empty(Outcome::NoData),
        };
        if let Some((v4, v6)) = addresses {
            for (instance, _) in &chosen {
                let data = match instance.address.parse::<IpAddr>() {
                    Ok(IpAddr::V4(ip)) if v4 => RData::A(A(ip)),
                    Ok(IpAddr::V6(ip)) if v6 => RData::AAAA(AAAA(ip)),
                    // Hostnames are answered in SRV records, whose targets are names.
                    _ => continue,
                };
                let size =
                    POINTER + RECORD_HEADER + if matches!(data, RData::A(_)) { 4 } else { 16 };
                if !room.take(size) {
                    truncated = true;
                    break;
                }
                answers.push(self.record(qname.clone(), data));
            }
            return Answer::of(answers, additionals, truncated);
        }
        for (instance, port) in &chosen {
            let ip = instance.address.parse::<IpAddr>().ok();
            let target = match ip {
                Some(ip) => self.addr_name(ip),
                None => Name::from_ascii(format!("{}.", instance.address)).ok(),
            };
            let Some(target) = target else { continue };
            let glue = ip.map(|ip| match ip {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            });
            // A target in SRV data is not compressed (RFC 2782), and the glue's owner may not
            // point at it: both are counted whole.
            let glue_size = match &glue {
                Some(RData::AAAA(_)) => wire_len(&target) + RECORD_HEADER + 16,
                Some(_) => wire_len(&target) + RECORD_HEADER + 4,
                None => 0,
            };
            let size = POINTER + RECORD_HEADER + 6 + wire_len(&target) + glue_size;
            if !room.take(size) {
                truncated = true;
                break;
            }
            let srv = SRV::new(1, srv_weight(instance.weight), *port, target.clone());
            answers.push(self.record(qname.clone(), RData::SRV(srv)));
            if let Some(glue) = glue {
                additionals.push(self.record(target, glue));
            }
        }
        Answer::of(answers, additionals, truncated)
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

    fn qname() -> Name {
        Name::from_ascii("web.service.signpost.").unwrap()
    }

    fn room(payload: usize) -> Room {
        Room::new(payload, &qname(), true, usize::MAX)
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
        let a = z.service(&all, &asked(None, None), &qname(), RecordType::A, room(512));
        let mut ips: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
        ips.sort();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
        let aaaa = z.service(
            &all,
            &asked(None, None),
            &qname(),
            RecordType::AAAA,
            room(512),
        );
        assert_eq!(aaaa.answers.len(), 1);
        let srv = z.service(
            &all,
            &asked(None, None),
            &qname(),
            RecordType::SRV,
            room(512),
        );
        assert_eq!(srv.answers.len(), 4, "hostnames are SRV targets");
        assert_eq!(srv.additionals.len(), 3, "glue for the addresses only");

        let critical = [instance("c", "10.0.0.3", Health::Critical, &[])];
        let none = z.service(
            &critical,
            &asked(None, None),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert_eq!(none.outcome, Outcome::NoData);
        let none = z.service(&[], &asked(None, None), &qname(), RecordType::A, room(512));
        assert_eq!(none.outcome, Outcome::NxDomain);
        let tag = z.service(
            &all,
            &asked(Some("primary"), None),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert_eq!(tag.answers.len(), 2, "tags match without case");
        let tag = z.service(
            &all,
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
            &many,
            &asked(None, None),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert!(udp.truncated);
        let mut encoded = Vec::new();
        for r in &udp.answers {
            assert!(!encoded.contains(&r.data.to_string()), "no instance twice");
            encoded.push(r.data.to_string());
        }
        assert!(udp.answers.len() >= 20, "{}", udp.answers.len());
        let few = Room::new(4096, &qname(), true, 5);
        assert_eq!(
            z.service(&many, &asked(None, None), &qname(), RecordType::A, few)
                .answers
                .len(),
            5
        );
        let tcp = z.service(
            &many,
            &asked(None, None),
            &qname(),
            RecordType::SRV,
            room(65535),
        );
        assert!(!tcp.truncated);
        assert_eq!(tcp.answers.len(), 200);
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
            &all,
            &asked(None, Some("metrics")),
            &qname(),
            RecordType::SRV,
            room(512),
        );
        assert_eq!(metrics.answers.len(), 1);
        assert!(
            metrics.answers[0].data.to_string().contains(" 9090 "),
            "{}",
            metrics.answers[0].data
        );
        let grpc = z.service(
            &all,
            &asked(None, Some("grpc")),
            &qname(),
            RecordType::SRV,
            room(512),
        );
        assert!(grpc.answers[0].data.to_string().contains(" 8080 "));
        let a = z.service(
            &all,
            &asked(None, Some("grpc")),
            &qname(),
            RecordType::A,
            room(512),
        );
        assert_eq!(a.outcome, Outcome::NoData);
        let none = z.service(
            &all,
            &asked(None, Some("http")),
            &qname(),
            RecordType::SRV,
            room(512),
        );
        assert_eq!(none.outcome, Outcome::NxDomain);
    }
}
