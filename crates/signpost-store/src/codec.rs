//! How instances are written down by the persistent backends: protobuf (prost), with field
//! numbers that mirror `signpost.v1.Instance`, so a record stays readable as the model grows.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;

use crate::model::{Health, HealthCheck, Instance, InstanceKey, Probe};
use crate::{Error, Result};

#[derive(Clone, PartialEq, prost::Message)]
struct StoredInstance {
    #[prost(string, tag = "1")]
    namespace: String,
    #[prost(string, tag = "2")]
    service: String,
    #[prost(string, tag = "3")]
    id: String,
    #[prost(string, tag = "4")]
    address: String,
    #[prost(uint32, tag = "5")]
    port: u32,
    #[prost(string, repeated, tag = "6")]
    tags: Vec<String>,
    #[prost(btree_map = "string, string", tag = "7")]
    metadata: BTreeMap<String, String>,
    #[prost(uint32, tag = "8")]
    weight: u32,
    #[prost(string, tag = "9")]
    zone: String,
    #[prost(message, optional, tag = "10")]
    check: Option<StoredCheck>,
    #[prost(uint32, tag = "11")]
    health: u32,
    #[prost(uint64, tag = "12")]
    lease_id: u64,
    #[prost(uint64, tag = "13")]
    create_revision: u64,
    #[prost(uint64, tag = "14")]
    mod_revision: u64,
    #[prost(string, tag = "15")]
    health_output: String,
    /// Unix time in nanoseconds; 0 for never.
    #[prost(uint64, tag = "16")]
    health_checked_at_nanos: u64,
    /// Unix time in nanoseconds; 0 for unknown.
    #[prost(uint64, tag = "17")]
    created_at_nanos: u64,
    /// Empty for none.
    #[prost(string, tag = "18")]
    owner: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredCheck {
    /// 1 http, 2 tcp, 3 grpc, 4 ttl (reported, not probed).
    #[prost(uint32, tag = "1")]
    kind: u32,
    /// The HTTP path or the gRPC service name.
    #[prost(string, tag = "2")]
    target: String,
    #[prost(uint64, tag = "3")]
    interval_nanos: u64,
    #[prost(uint64, tag = "4")]
    timeout_nanos: u64,
    #[prost(uint64, optional, tag = "5")]
    deregister_critical_after_nanos: Option<u64>,
    #[prost(uint32, tag = "6")]
    successes_before_passing: u32,
    #[prost(uint32, tag = "7")]
    failures_before_critical: u32,
    /// An HTTP probe's method; empty is GET.
    #[prost(string, tag = "8")]
    method: String,
    /// An HTTP probe's headers, in order.
    #[prost(message, repeated, tag = "9")]
    headers: Vec<StoredHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredHeader {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// The key of an instance: its three names joined by NUL, which no name may contain.
pub(crate) fn key_bytes(key: &InstanceKey) -> Vec<u8> {
    format!("{}\0{}\0{}", key.namespace, key.service, key.id).into_bytes()
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn unix_nanos(t: Option<std::time::SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, nanos)
}

fn from_unix_nanos(n: u64) -> Option<std::time::SystemTime> {
    (n != 0).then(|| std::time::UNIX_EPOCH + Duration::from_nanos(n))
}

pub(crate) fn encode_instance(i: &Instance) -> Vec<u8> {
    let check = i.check.as_ref().map(|c| {
        let (mut method, mut headers) = (String::new(), Vec::new());
        let (kind, target) = match &c.probe {
            Probe::Http {
                path,
                method: m,
                headers: h,
            } => {
                method.clone_from(m);
                headers = h
                    .iter()
                    .map(|(name, value)| StoredHeader {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect();
                (1, path.clone())
            }
            Probe::Tcp => (2, String::new()),
            Probe::Grpc { service } => (3, service.clone()),
            Probe::Ttl => (4, String::new()),
        };
        StoredCheck {
            kind,
            target,
            interval_nanos: nanos(c.interval),
            timeout_nanos: nanos(c.timeout),
            deregister_critical_after_nanos: c.deregister_critical_after.map(nanos),
            successes_before_passing: c.successes_before_passing,
            failures_before_critical: c.failures_before_critical,
            method,
            headers,
        }
    });
    StoredInstance {
        namespace: i.namespace.clone(),
        service: i.service.clone(),
        id: i.id.clone(),
        address: i.address.clone(),
        port: u32::from(i.port),
        tags: i.tags.clone(),
        metadata: i
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        weight: i.weight,
        zone: i.zone.clone(),
        check,
        health: match i.health {
            Health::Passing => 1,
            Health::Warning => 2,
            Health::Critical => 3,
        },
        lease_id: i.lease_id.unwrap_or(0),
        create_revision: i.create_revision,
        mod_revision: i.mod_revision,
        health_output: i.health_output.clone(),
        health_checked_at_nanos: unix_nanos(i.health_checked_at),
        created_at_nanos: unix_nanos(i.created_at),
        owner: i.owner.clone().unwrap_or_default(),
    }
    .encode_to_vec()
}

pub(crate) fn decode_instance(bytes: &[u8]) -> Result<Instance> {
    let corrupt = |what: &str| Error::Unavailable(format!("corrupt instance record: {what}"));
    let s = StoredInstance::decode(bytes).map_err(|e| corrupt(&e.to_string()))?;
    let check = match s.check {
        None => None,
        Some(c) => Some(HealthCheck {
            probe: match c.kind {
                1 => Probe::Http {
                    path: c.target,
                    method: c.method,
                    headers: c.headers.into_iter().map(|h| (h.name, h.value)).collect(),
                },
                2 => Probe::Tcp,
                3 => Probe::Grpc { service: c.target },
                4 => Probe::Ttl,
                other => return Err(corrupt(&format!("unknown probe kind {other}"))),
            },
            interval: Duration::from_nanos(c.interval_nanos),
            timeout: Duration::from_nanos(c.timeout_nanos),
            deregister_critical_after: c.deregister_critical_after_nanos.map(Duration::from_nanos),
            successes_before_passing: c.successes_before_passing.max(1),
            failures_before_critical: c.failures_before_critical.max(1),
        }),
    };
    Ok(Instance {
        namespace: s.namespace,
        service: s.service,
        id: s.id,
        address: s.address,
        port: u16::try_from(s.port).map_err(|_| corrupt("port out of range"))?,
        tags: s.tags,
        metadata: s.metadata.into_iter().collect(),
        weight: s.weight,
        zone: s.zone,
        check,
        health: match s.health {
            2 => Health::Warning,
            3 => Health::Critical,
            _ => Health::Passing,
        },
        lease_id: (s.lease_id != 0).then_some(s.lease_id),
        create_revision: s.create_revision,
        mod_revision: s.mod_revision,
        health_output: s.health_output,
        health_checked_at: from_unix_nanos(s.health_checked_at_nanos),
        created_at: from_unix_nanos(s.created_at_nanos),
        owner: (!s.owner.is_empty()).then_some(s.owner),
        memo: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_survives_encoding() {
        let instance = Instance {
            namespace: "prod".into(),
            service: "pay".into(),
            id: "pay-1".into(),
            address: "::1".into(),
            port: 443,
            tags: vec!["a".into(), "b".into()],
            metadata: [("version".to_string(), "v2".to_string())].into(),
            weight: 7,
            zone: "eu-1a".into(),
            check: Some(HealthCheck {
                probe: Probe::Http {
                    path: "/health".into(),
                    method: "HEAD".into(),
                    headers: vec![("x-probe".into(), "signpost".into())],
                },
                interval: Duration::from_secs(10),
                timeout: Duration::from_millis(1500),
                deregister_critical_after: Some(Duration::from_secs(60)),
                successes_before_passing: 2,
                failures_before_critical: 3,
            }),
            health: Health::Critical,
            health_output: "HTTP 500".into(),
            health_checked_at: Some(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            lease_id: Some(99),
            owner: Some("payments".into()),
            created_at: Some(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            create_revision: 5,
            mod_revision: 9,
            memo: Default::default(),
        };
        assert_eq!(
            decode_instance(&encode_instance(&instance)),
            Ok(instance.clone())
        );
        assert!(decode_instance(b"\xff\xff\xff").is_err());
        for probe in [
            Probe::Tcp,
            Probe::Grpc {
                service: "g".into(),
            },
            Probe::Ttl,
        ] {
            let mut other = instance.clone();
            if let Some(check) = other.check.as_mut() {
                check.probe = probe;
            }
            assert_eq!(decode_instance(&encode_instance(&other)), Ok(other));
        }
    }
}
