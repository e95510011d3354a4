//! The records that answer one question, from the instances of a live view.
//!
//! Only instances that get traffic (passing or warning) are answered, in a new random order each
//! time so that clients taking the first record spread out. The records for a name are built
//! once per version of the service, as wire bytes ([`Prepared`] keeps them), and every answer is
//! a shuffle of indices into them; `wire` writes as many as fit the room the client has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use hickory_server::proto::rr::{LowerName, Name, RecordType};
use signpost_store::Instance;

use super::names::{ServiceName, addr_label};
use super::wire::{self, Glue, QUESTION, WireRecord};

const TYPE_A: u16 = 1;
const TYPE_SOA: u16 = 6;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;

/// What the answers are made with.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    /// Lowercase, fully qualified.
    pub(crate) domain: Name,
    pub(crate) ttl: u32,
    /// The most records in one UDP answer.
    pub(crate) udp_max_records: usize,
    /// The zone's SOA record, owned by the domain.
    soa: Vec<u8>,
}

/// How an answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Records,
    /// The name exists, with no records of the type asked for (or none healthy).
    NoData,
    NxDomain,
}

/// The records of one name and type, one per healthy instance it stands for.
#[derive(Debug)]
pub(crate) struct Built {
    outcome: Outcome,
    records: Vec<WireRecord>,
}

impl Built {
    fn empty(outcome: Outcome) -> Self {
        Built {
            outcome,
            records: Vec::new(),
        }
    }

    fn of(records: Vec<WireRecord>) -> Self {
        Built {
            outcome: if records.is_empty() {
                Outcome::NoData
            } else {
                Outcome::Records
            },
            records,
        }
    }
}

/// One answer: a [`Built`]'s records in this answer's order.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) outcome: Outcome,
    built: Arc<Built>,
    order: Vec<u32>,
}

impl Answer {
    pub(crate) fn empty(outcome: Outcome) -> Self {
        Answer::of(Arc::new(Built::empty(outcome)), false)
    }

    fn of(built: Arc<Built>, shuffle: bool) -> Self {
        let mut order: Vec<u32> = (0..built.records.len())
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        if shuffle {
            fastrand::shuffle(&mut order);
        }
        Answer {
            outcome: built.outcome,
            built,
            order,
        }
    }

    /// The records, in this answer's order.
    pub(crate) fn records(&self) -> Vec<&WireRecord> {
        self.order
            .iter()
            .filter_map(|&i| self.built.records.get(i as usize))
            .collect()
    }
}

impl Zone {
    pub(crate) fn new(domain: Name, ttl: u32, udp_max_records: usize) -> Self {
        let host = |label: &str| {
            Name::from_ascii(label)
                .and_then(|n| n.append_domain(&domain))
                .unwrap_or_else(|_| domain.clone())
        };
        // Its minimum is how long resolvers may remember that a name has no records: the TTL,
        // as for the records.
        let mut data = wire::name_bytes(&host("ns"));
        data.extend(wire::name_bytes(&host("hostmaster")));
        for value in [1u32, 3600, 600, 86400, ttl] {
            data.extend_from_slice(&value.to_be_bytes());
        }
        let soa = wire::record(&wire::name_bytes(&domain), TYPE_SOA, ttl, &data);
        Zone {
            domain,
            ttl,
            udp_max_records,
            soa,
        }
    }

    /// The SOA record, for the authority section of a negative answer.
    pub(crate) fn soa(&self) -> &[u8] {
        &self.soa
    }

    /// The name of an SRV target for an address: `<hex>.addr.<domain>`.
    fn addr_name(&self, ip: IpAddr) -> Option<Name> {
        Name::from_ascii(format!("{}.addr", addr_label(ip)))
            .and_then(|n| n.append_domain(&self.domain))
            .ok()
    }

    fn address(&self, ip: IpAddr) -> WireRecord {
        let bytes = match ip {
            IpAddr::V4(v4) => wire::record(&QUESTION, TYPE_A, self.ttl, &v4.octets()),
            IpAddr::V6(v6) => wire::record(&QUESTION, TYPE_AAAA, self.ttl, &v6.octets()),
        };
        WireRecord { bytes, glue: None }
    }

    /// The apex: its SOA; nothing else.
    pub(crate) fn apex(&self, qtype: RecordType) -> Answer {
        match qtype {
            RecordType::SOA | RecordType::ANY => {
                // Owned by the domain, which is the question here.
                let at = wire::name_bytes(&self.domain).len();
                let mut bytes = QUESTION.to_vec();
                bytes.extend_from_slice(&self.soa[at..]);
                Answer::of(
                    Arc::new(Built::of(vec![WireRecord { bytes, glue: None }])),
                    false,
                )
            }
            _ => Answer::empty(Outcome::NoData),
        }
    }

    /// `<hex>.addr`: the address it spells.
    pub(crate) fn addr(&self, qtype: RecordType, ip: IpAddr) -> Answer {
        match (ip, qtype) {
            (IpAddr::V4(_), RecordType::A | RecordType::ANY)
            | (IpAddr::V6(_), RecordType::AAAA | RecordType::ANY) => {
                Answer::of(Arc::new(Built::of(vec![self.address(ip)])), false)
            }
            _ => Answer::empty(Outcome::NoData),
        }
    }

    /// What the answers for one version of a service are made of, made once per version: the
    /// address and SRV target of each instance.
    pub(crate) fn prepare(&self, instances: &[Arc<Instance>]) -> Prepared {
        let targets = instances
            .iter()
            .map(|instance| {
                let ip = instance.address.parse::<IpAddr>().ok();
                let srv_target = match ip {
                    Some(ip) => self.addr_name(ip),
                    None => Name::from_ascii(format!("{}.", instance.address)).ok(),
                };
                Target {
                    instance: instance.clone(),
                    ip,
                    srv_target: srv_target.as_ref().map(wire::name_bytes),
                }
            })
            .collect();
        Prepared {
            targets,
            built: Mutex::default(),
        }
    }

    /// A service name: its healthy instances as A/AAAA (IP addresses only) or SRV records, in a
    /// new order.
    pub(crate) fn service(
        &self,
        prepared: &Prepared,
        asked: &ServiceName,
        owner: &LowerName,
        qtype: RecordType,
    ) -> Answer {
        let built = prepared.built(owner, qtype, || self.build(prepared, asked, qtype));
        Answer::of(built, true)
    }

    /// Every record of `qtype` for every healthy instance `asked` stands for.
    fn build(&self, prepared: &Prepared, asked: &ServiceName, qtype: RecordType) -> Built {
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
            RecordType::SRV => return self.srv(&chosen),
            _ => return Built::empty(Outcome::NoData),
        };
        // Hostnames are answered in SRV records, whose targets are names.
        let records = chosen
            .iter()
            .filter_map(|(target, _)| target.ip)
            .filter(|ip| if ip.is_ipv4() { v4 } else { v6 })
            .map(|ip| self.address(ip))
            .collect();
        Built::of(records)
    }

    fn srv(&self, chosen: &[(&Target, u16)]) -> Built {
        let mut records = Vec::with_capacity(chosen.len());
        for (target, port) in chosen {
            let Some(name) = &target.srv_target else {
                continue;
            };
            let mut data = Vec::with_capacity(6 + name.len());
            data.extend_from_slice(&1u16.to_be_bytes());
            data.extend_from_slice(&srv_weight(target.instance.weight).to_be_bytes());
            data.extend_from_slice(&port.to_be_bytes());
            // Not compressed (RFC 2782).
            data.extend_from_slice(name);
            let bytes = wire::record(&QUESTION, TYPE_SRV, self.ttl, &data);
            let glue = target.ip.map(|ip| {
                let address = self.address(ip);
                Glue {
                    // Owner pointer, fixed part, then priority, weight and port.
                    target_at: 2 + 10 + 6,
                    target: name.clone(),
                    tail: address.bytes[QUESTION.len()..].to_vec(),
                }
            });
            records.push(WireRecord { bytes, glue });
        }
        Built::of(records)
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
    /// `<hex>.addr.<domain>` for an address, the hostname itself otherwise, as wire bytes;
    /// `None` for a hostname that is not a DNS name.
    srv_target: Option<Vec<u8>>,
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
    use hickory_server::proto::op::Message;
    use signpost_store::{Health, Metadata};

    fn zone() -> Zone {
        Zone::new(Name::from_ascii("signpost.").unwrap(), 5, 32)
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

    /// The answer as a client reads it, through hickory's own parser: (answers, additionals,
    /// truncated), each record as text.
    fn read(
        answer: &Answer,
        qtype: RecordType,
        limit: usize,
        max: usize,
    ) -> (Vec<String>, Vec<String>, bool) {
        let name = Name::from_ascii("Web.Service.Signpost.").unwrap();
        let records = answer.records();
        let reply = wire::Reply {
            head: wire::Head {
                id: 7,
                opcode: 0,
                recursion_desired: true,
                checking_disabled: false,
            },
            rcode: 0,
            authoritative: true,
            question: Some((&name, u16::from(qtype), 1)),
            records: &records,
            soa: None,
            edns: Some(1232),
            limit,
            max_records: max,
        };
        let message = Message::from_vec(&reply.encode()).unwrap();
        assert_eq!(message.id, 7);
        assert_eq!(
            message.queries[0].name(),
            &name,
            "the question as the client spelled it"
        );
        let text = |records: &[hickory_server::proto::rr::Record]| {
            records
                .iter()
                .map(|r| format!("{} {}", r.name.to_lowercase(), r.data))
                .collect::<Vec<_>>()
        };
        assert!(message.edns.is_some(), "the EDNS record always fits");
        (
            text(&message.answers),
            text(&message.additionals),
            message.metadata.truncation,
        )
    }

    fn answer(z: &Zone, all: &[Arc<Instance>], asked: &ServiceName, qtype: RecordType) -> Answer {
        let owner = LowerName::from(Name::from_ascii("web.service.signpost.").unwrap());
        z.service(&z.prepare(all), asked, &owner, qtype)
    }

    #[test]
    fn only_healthy_instances_and_nodata_when_none() {
        let z = zone();
        let all = [
            instance("a", "10.0.0.1", Health::Passing, &[]),
            instance("b", "10.0.0.2", Health::Warning, &[]),
            instance("c", "10.0.0.3", Health::Critical, &[]),
            instance("d", "fd00::4", Health::Passing, &[]),
            instance("e", "db.example.com", Health::Passing, &[]),
        ];
        let (mut a, _, tc) = read(
            &answer(&z, &all, &asked(None, None), RecordType::A),
            RecordType::A,
            1232,
            32,
        );
        a.sort();
        assert_eq!(
            a,
            [
                "web.service.signpost. 10.0.0.1",
                "web.service.signpost. 10.0.0.2"
            ]
        );
        assert!(!tc);
        let (aaaa, _, _) = read(
            &answer(&z, &all, &asked(None, None), RecordType::AAAA),
            RecordType::AAAA,
            1232,
            32,
        );
        assert_eq!(aaaa, ["web.service.signpost. fd00::4"]);
        let (mut srv, mut glue, _) = read(
            &answer(&z, &all, &asked(None, None), RecordType::SRV),
            RecordType::SRV,
            1232,
            32,
        );
        srv.sort();
        glue.sort();
        assert_eq!(
            srv,
            [
                "web.service.signpost. 1 100 8080 0a000001.addr.signpost.",
                "web.service.signpost. 1 100 8080 0a000002.addr.signpost.",
                "web.service.signpost. 1 100 8080 db.example.com.",
                "web.service.signpost. 1 100 8080 fd000000000000000000000000000004.addr.signpost.",
            ],
            "hostnames are SRV targets"
        );
        assert_eq!(
            glue,
            [
                "0a000001.addr.signpost. 10.0.0.1",
                "0a000002.addr.signpost. 10.0.0.2",
                "fd000000000000000000000000000004.addr.signpost. fd00::4",
            ],
            "glue for the addresses, pointing at the SRV targets"
        );

        let critical = [instance("c", "10.0.0.3", Health::Critical, &[])];
        assert_eq!(
            answer(&z, &critical, &asked(None, None), RecordType::A).outcome,
            Outcome::NoData
        );
        assert_eq!(
            answer(&z, &[], &asked(None, None), RecordType::A).outcome,
            Outcome::NxDomain
        );
        let tag = answer(&z, &all, &asked(Some("primary"), None), RecordType::A);
        assert_eq!(tag.records().len(), 2, "tags match without case");
        let tag = answer(&z, &all, &asked(Some("other"), None), RecordType::A);
        assert_eq!(tag.outcome, Outcome::NxDomain);
    }

    #[test]
    fn answers_stop_at_the_room_and_say_so() {
        let z = zone();
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
        let a = answer(&z, &many, &asked(None, None), RecordType::A);
        let (udp, _, tc) = read(&a, RecordType::A, 512, 1000);
        assert!(tc);
        let distinct: std::collections::HashSet<&String> = udp.iter().collect();
        assert_eq!(distinct.len(), udp.len(), "no instance twice");
        assert!(udp.len() >= 25, "{}", udp.len());
        let (few, _, tc) = read(&a, RecordType::A, 4096, 5);
        assert_eq!((few.len(), tc), (5, true));
        let srv = answer(&z, &many, &asked(None, None), RecordType::SRV);
        let (cut, glue, tc) = read(&srv, RecordType::SRV, 512, 1000);
        assert!(tc && !cut.is_empty());
        assert_eq!(glue.len(), cut.len(), "a record is only kept with its glue");
        let (all, glue, tc) = read(&srv, RecordType::SRV, 65535, usize::MAX);
        assert_eq!((all.len(), glue.len(), tc), (200, 200, false));

        // 600 fit one TCP message whole, glue and EDNS too: glue past the ~16 KiB a compression
        // pointer reaches names its target in full. A thousand do not fit 65,535 bytes: cut,
        // marked, and every record kept has its glue.
        let many = |n: usize| -> Vec<_> {
            (0..n)
                .map(|i| {
                    instance(
                        &i.to_string(),
                        &format!("10.1.{}.{}", i / 250, i % 250),
                        Health::Passing,
                        &[],
                    )
                })
                .collect()
        };
        let srv = answer(&z, &many(600), &asked(None, None), RecordType::SRV);
        let (all, glue, tc) = read(&srv, RecordType::SRV, 65535, usize::MAX);
        assert_eq!((all.len(), glue.len(), tc), (600, 600, false));
        let srv = answer(&z, &many(1000), &asked(None, None), RecordType::SRV);
        let (cut, glue, tc) = read(&srv, RecordType::SRV, 65535, usize::MAX);
        assert!(
            tc && cut.len() > 900 && glue.len() == cut.len(),
            "{} {}",
            cut.len(),
            glue.len()
        );
    }

    #[test]
    fn port_names_come_from_metadata() {
        let z = zone();
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
        let (metrics, _, _) = read(
            &answer(&z, &all, &asked(None, Some("metrics")), RecordType::SRV),
            RecordType::SRV,
            1232,
            32,
        );
        assert_eq!(
            metrics,
            ["web.service.signpost. 1 100 9090 0a000001.addr.signpost."]
        );
        let (grpc, _, _) = read(
            &answer(&z, &all, &asked(None, Some("grpc")), RecordType::SRV),
            RecordType::SRV,
            1232,
            32,
        );
        assert_eq!(
            grpc,
            ["web.service.signpost. 1 100 8080 0a000002.addr.signpost."]
        );
        let a = answer(&z, &all, &asked(None, Some("grpc")), RecordType::A);
        assert_eq!(a.outcome, Outcome::NoData);
        let none = answer(&z, &all, &asked(None, Some("http")), RecordType::SRV);
        assert_eq!(none.outcome, Outcome::NxDomain);
    }

    #[test]
    fn the_apex_and_addresses() {
        let z = zone();
        let (soa, _, _) = read(&z.apex(RecordType::SOA), RecordType::SOA, 1232, 32);
        assert_eq!(soa.len(), 1);
        assert!(
            soa[0].ends_with("ns.signpost. hostmaster.signpost. 1 3600 600 86400 5"),
            "{soa:?}"
        );
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let (a, _, _) = read(&z.addr(RecordType::A, ip), RecordType::A, 1232, 32);
        assert_eq!(a.len(), 1);
        assert!(a[0].ends_with(" 10.1.2.3"));
        assert_eq!(z.addr(RecordType::AAAA, ip).outcome, Outcome::NoData);
    }
}
