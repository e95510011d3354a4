//! The data model: instances, leases, revisions, and the changes the store publishes.

use std::collections::BTreeMap;
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
    pub metadata: BTreeMap<String, String>,
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

/// A once-made encoding of one version of an instance (see [`Instance::encoded`]). Cloning an
/// instance makes a new version, so a clone starts empty; it compares equal to any other.
#[derive(Default)]
pub struct Encoded(std::sync::OnceLock<prost::bytes::Bytes>);

impl Encoded {
    /// The encoding, made by `encode` the first time it is asked for.
    pub fn get_or_init(&self, encode: impl FnOnce() -> prost::bytes::Bytes) -> prost::bytes::Bytes {
        self.0.get_or_init(encode).clone()
    }
}

impl Clone for Encoded {
    fn clone(&self) -> Self {
        Encoded::default()
    }
}

impl PartialEq for Encoded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Encoded {}

impl std::fmt::Debug for Encoded {
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
