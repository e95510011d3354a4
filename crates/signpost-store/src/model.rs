//! The data model: instances, leases, revisions, and the changes the store publishes.

use std::sync::Arc;
use std::time::Duration;

/// One store-wide counter; every change takes the next value.
pub type Revision = u64;

/// Identifies a lease. Never 0: 0 means "no lease" on the wire.
pub type LeaseId = u64;

/// The identity of an instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceKey {
    pub namespace: String,
    pub service: String,
    pub id: String,
}

/// The health of an instance as the registry sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Health {
    #[default]
    Passing,
    Warning,
    Critical,
}

impl Health {
    /// Passing and warning instances get traffic; critical ones do not.
    pub fn is_healthy(self) -> bool {
        !matches!(self, Health::Critical)
    }
}

/// What an active health check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Http { path: String },
    Tcp,
    Grpc { service: String },
}

/// An active health check, run by the server against the instance's address and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub deregister_critical_after: Option<Duration>,
    /// Consecutive good probes that turn a critical instance passing (at least 1).
    pub successes_before_passing: u32,
    /// Consecutive failed probes that turn a healthy instance critical (at least 1).
    pub failures_before_critical: u32,
}

/// A registered instance. The fields after `check` are owned by the store: whatever a caller puts
/// there is replaced on [`crate::Store::put`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub namespace: String,
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub metadata: Metadata,
    pub weight: u32,
    pub zone: String,
    pub check: Option<HealthCheck>,
    /// The access token that registered it, when the server enforces ownership.
    pub owner: Option<String>,

    pub health: Health,
    /// The probe result behind the last health change (empty without a check), and when it came.
    pub health_output: String,
    pub health_checked_at: Option<std::time::SystemTime>,
    pub lease_id: Option<LeaseId>,
    /// When the instance was first registered (kept across updates).
    pub created_at: Option<std::time::SystemTime>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// Room for the server to keep this version's API encoding, made once and then shared by
    /// every answer that carries it. Not part of the instance's value.
    pub encoded: Encoded,
}

/// An instance's metadata, sorted by key, each key once (a later value for a key replaces an
/// earlier one, as in a map). A sorted vector rather than a B-tree map: the map allocates room for
/// eleven entries even for the two an instance typically has, ~550 bytes per instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(Vec<(String, String)>);

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|at| &self.0[at].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find(&self, key: &str) -> std::result::Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }
}

impl FromIterator<(String, String)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        let mut pairs: Vec<(String, String)> = pairs.into_iter().collect();
        // Stable: among equal keys the last one given stays last, and is the one kept.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<(String, String)> = Vec::with_capacity(pairs.len());
        for pair in pairs {
            match kept.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => kept.push(pair),
            }
        }
        kept.shrink_to_fit();
        Metadata(kept)
    }
}

impl<const N: usize> From<[(String, String); N]> for Metadata {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Metadata {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl IntoIterator for Metadata {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// A once-made encoding kept beside what it encodes (see [`Instance::encoded`] and
/// [`Change::encoded`]). Cloning makes a new version, so a clone starts empty; it compares equal
/// to any other, since it is not part of the value.
pub struct Encoded<T = prost::bytes::Bytes>(std::sync::OnceLock<T>);

impl<T: Clone> Encoded<T> {
    /// The encoding, made by `encode` the first time it is asked for.
    pub fn get_or_init(&self, encode: impl FnOnce() -> T) -> T {
        self.0.get_or_init(encode).clone()
    }

    /// The encoding, made by `encode` the first time it succeeds. Two callers racing may both
    /// encode; one result is kept.
    pub fn get_or_try_init<E>(&self, encode: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        if let Some(made) = self.0.get() {
            return Ok(made.clone());
        }
        let made = encode()?;
        Ok(self.0.get_or_init(|| made).clone())
    }
}

impl<T> Default for Encoded<T> {
    fn default() -> Self {
        Encoded(std::sync::OnceLock::new())
    }
}

impl<T> Clone for Encoded<T> {
    fn clone(&self) -> Self {
        Encoded::default()
    }
}

impl<T> PartialEq for Encoded<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Encoded<T> {}

impl<T> std::fmt::Debug for Encoded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Encoded(cached)"
        } else {
            "Encoded(none)"
        })
    }
}

impl Instance {
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            id: self.id.clone(),
        }
    }

    /// Whether this instance belongs to `namespace`/`service`; cheaper than building a key.
    pub fn is_in(&self, namespace: &str, service: &str) -> bool {
        self.service == service && self.namespace == namespace
    }
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    /// The granted ttl; a refresh gives the lease this much time again.
    pub ttl: Duration,
}

/// Why an instance was removed from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemovalCause {
    /// Removed by an explicit deregister.
    Deregistered,
    /// Its lease expired or was revoked.
    Expired,
    /// It stayed critical for longer than its check allows.
    Unhealthy,
}

/// One instance's transition within a [`Change`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The instance before the change; `None` when it was created.
    pub prev: Option<Arc<Instance>>,
    /// The instance after the change; `None` when it was removed.
    pub current: Option<Arc<Instance>>,
    /// Set when `current` is `None`.
    pub removal: Option<RemovalCause>,
}

impl Event {
    /// The instance this event is about: the current one, or the removed one.
    pub fn instance(&self) -> Option<&Arc<Instance>> {
        self.current.as_ref().or(self.prev.as_ref())
    }
}

/// Everything that happened at one revision. Most changes hold one event; a lease expiry removes
/// all the lease's instances at a single revision, as etcd does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: Revision,
    pub events: Vec<Event>,
    /// Room for the server to keep the message it sends every watcher of the change's service
    /// (without and with unhealthy instances), with the number of events in it: made once, then
    /// the same bytes go to ten thousand watchers. Not part of the change's value.
    pub encoded: [Encoded<(prost::bytes::Bytes, usize)>; 2],
}

impl Change {
    pub fn new(revision: Revision, events: Vec<Event>) -> Self {
        Change {
            revision,
            events,
            encoded: Default::default(),
        }
    }
}

/// The instances of one service at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: Revision,
    /// Sorted by id.
    pub instances: Vec<Arc<Instance>>,
}

/// One service's counts, for `ListServices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSummary {
    pub name: String,
    pub instances: u32,
    /// Instances whose health is passing or warning.
    pub healthy: u32,
}

/// The services of a namespace at one revision, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceList {
    pub revision: Revision,
    pub services: Vec<ServiceSummary>,
}

/// Sizes and totals of a store, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub instances: u64,
    pub services: u64,
    pub leases: u64,
    /// Leases that ran out since the store started (revoked ones not counted).
    pub leases_expired: u64,
    pub revision: Revision,
}

/// How full one namespace and one service are, and how many leases are live, for limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sizes {
    pub namespace_instances: u64,
    pub service_instances: u64,
    pub leases: u64,
}

/// The answer to a deregister.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The removed instance, if there was one.
    pub prev: Option<Arc<Instance>>,
    /// The revision of the removal, or the current revision when nothing was removed.
    pub revision: Revision,
}

#[cfg(test)]
mod tests {
    use super::{Encoded, Metadata};

    #[test]
    fn a_failed_encoding_is_not_kept() {
        let slot: Encoded<u32> = Encoded::default();
        assert_eq!(slot.get_or_try_init(|| Err("too large")), Err("too large"));
        assert_eq!(slot.get_or_try_init(|| Ok::<_, &str>(7)), Ok(7));
        assert_eq!(slot.get_or_try_init(|| Ok::<_, &str>(8)), Ok(7));
    }

    #[test]
    fn metadata_is_a_map_sorted_by_key_where_the_last_value_given_wins() {
        let pairs = [("zone", "a"), ("app", "pay"), ("zone", "b"), ("tier", "1")];
        let metadata: Metadata = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let keys: Vec<&str> = metadata.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["app", "tier", "zone"]);
        assert_eq!(metadata.get("zone").map(String::as_str), Some("b"));
        assert!(metadata.contains_key("tier"));
        assert!(!metadata.contains_key("zon"));
        assert_eq!(metadata.get("missing"), None);
        assert_eq!(metadata.len(), 3);
    }
}
