//! Where Signpost's records live under the prefix, and how etcd's key-values become instances.

use etcd_client::KeyValue;

use crate::codec::{decode_instance, key_bytes};
use crate::model::{Instance, InstanceKey, RemovalCause, Revision};
use crate::{Error, Result};

/// The keys under the prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    /// Everything Signpost writes; the replica's watch covers this range.
    pub(super) all: Vec<u8>,
    /// Instance keys start with this, followed by [`key_bytes`].
    pub(super) instances: Vec<u8>,
    /// The removal-cause marker.
    pub(super) removal: Vec<u8>,
    /// Held by the server that runs the health checks.
    pub(super) checker: Vec<u8>,
    /// A marker per lease, put (on the lease) with its first instance near the lease quota, so
    /// that racing registrations can be compared in a transaction. Gone with the lease.
    pub(super) leases: Vec<u8>,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        let all = prefix.as_bytes().to_vec();
        let with = |suffix: &str| [prefix.as_bytes(), suffix.as_bytes()].concat();
        Keys {
            instances: with("instances/"),
            removal: with("removal"),
            checker: with("checker"),
            leases: with("leases/"),
            all,
        }
    }

    pub(super) fn instance(&self, key: &InstanceKey) -> Vec<u8> {
        [self.instances.as_slice(), &key_bytes(key)].concat()
    }

    /// The marker of lease `id`.
    pub(super) fn lease(&self, id: i64) -> Vec<u8> {
        [self.leases.as_slice(), format!("{id:016x}").as_bytes()].concat()
    }

    /// Every instance key of `key`'s service.
    pub(super) fn service_range(&self, key: &InstanceKey) -> Vec<u8> {
        [
            self.instances.as_slice(),
            format!("{}\0{}\0", key.namespace, key.service).as_bytes(),
        ]
        .concat()
    }

    /// Every instance key of `namespace`.
    pub(super) fn namespace_range(&self, namespace: &str) -> Vec<u8> {
        [
            self.instances.as_slice(),
            format!("{namespace}\0").as_bytes(),
        ]
        .concat()
    }

    pub(super) fn instance_key(&self, etcd_key: &[u8]) -> Option<InstanceKey> {
        let rest = std::str::from_utf8(etcd_key.strip_prefix(self.instances.as_slice())?).ok()?;
        let mut parts = rest.splitn(3, '\0');
        Some(InstanceKey {
            namespace: parts.next()?.to_owned(),
            service: parts.next()?.to_owned(),
            id: parts.next()?.to_owned(),
        })
    }
}

pub(super) fn cause_bytes(cause: RemovalCause) -> &'static [u8] {
    match cause {
        RemovalCause::Deregistered => b"deregistered",
        RemovalCause::Expired => b"expired",
        RemovalCause::Unhealthy => b"unhealthy",
    }
}

pub(super) fn cause_from(bytes: &[u8]) -> RemovalCause {
    match bytes {
        b"deregistered" => RemovalCause::Deregistered,
        b"unhealthy" => RemovalCause::Unhealthy,
        _ => RemovalCause::Expired,
    }
}

pub(super) fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .and_then(|h| Revision::try_from(h.revision()).ok())
        .ok_or_else(|| Error::Unavailable("etcd answered without a revision".into()))
}

pub(super) fn to_etcd(revision: Revision) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

/// An instance as the replica holds it: the record, with the store-owned fields etcd keeps.
pub(super) fn instance_from(kv: &KeyValue) -> Result<Instance> {
    let mut instance = decode_instance(kv.value())?;
    instance.create_revision = u64::try_from(kv.create_revision()).unwrap_or(0);
    instance.mod_revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
    instance.lease_id = u64::try_from(kv.lease()).ok().filter(|id| *id != 0);
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_keys_round_trip_under_the_prefix() {
        let keys = Keys::new("/signpost/");
        let key = InstanceKey {
            namespace: "prod".into(),
            service: "pay".into(),
            id: "10.0.0.1:80/a".into(),
        };
        let etcd_key = keys.instance(&key);
        assert!(etcd_key.starts_with(b"/signpost/instances/"));
        assert_eq!(keys.instance_key(&etcd_key), Some(key.clone()));
        assert_eq!(keys.instance_key(&keys.removal), None);
        assert!(etcd_key.starts_with(&keys.service_range(&key)));
        assert!(etcd_key.starts_with(&keys.namespace_range("prod")));
        assert!(
            !keys
                .namespace_range("prod")
                .starts_with(&keys.namespace_range("pro"))
        );
        assert_eq!(keys.instance_key(b"/other/instances/a\0b\0c"), None);
    }

    #[test]
    fn removal_causes_survive_the_marker() {
        for cause in [
            RemovalCause::Deregistered,
            RemovalCause::Expired,
            RemovalCause::Unhealthy,
        ] {
            assert_eq!(cause_from(cause_bytes(cause)), cause);
        }
    }
}
