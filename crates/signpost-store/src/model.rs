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
    Http {
        path: String,
        /// The request's method; empty is GET.
        method: String,
        /// Sent with every probe, in order.
        headers: Vec<(String, String)>,
    },
    Tcp,
    Grpc {
        service: String,
    },
    /// Nothing: the instance reports its own status (Consul's TTL checks), and its lease
    /// removes it when it stops. The interval and timeout of such a check are unused.
    Ttl,
}

impl Probe {
    /// Whether the server runs this check itself.
    pub fn is_probed(&self) -> bool {
        !matches!(self, Probe::Ttl)
    }
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
/// there is replaced on a [`crate::Write::Put`].
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
    /// Room for a layer above the store to keep one value made from this version (the server
    /// keeps its API encoding here, made once and then shared by every answer that carries it).
    /// Not part of the instance's value.
    pub memo: Memo,
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

/// Room for one value made once from what it sits beside (see [`Instance::memo`] and
/// [`Change::memo`]), by whichever layer asks first, of a type the store knows nothing of.
/// Cloning makes a new version, so a clone starts empty; it compares equal to any other, since
/// it is not part of the value.
pub struct Memo(std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>);

impl Memo {
    /// The value, made by `make` the first time it is asked for (two callers racing may both
    /// make it; one is kept). Asked for as another type than the one kept (two layers sharing
    /// one memo), it is made for the caller and not kept.
    pub fn get_or_init<T: std::any::Any + Send + Sync>(
        &self,
        make: impl Fn() -> T,
    ) -> MemoValue<'_, T> {
        let kept = self.0.get_or_init(|| Arc::new(make()));
        match kept.downcast_ref::<T>() {
            Some(value) => MemoValue::Kept(value),
            None => MemoValue::Made(make()),
        }
    }
}

/// A value from a [`Memo`]: the one kept, or one made for this caller alone.
#[derive(Debug)]
pub enum MemoValue<'a, T> {
    Kept(&'a T),
    Made(T),
}

impl<T> std::ops::Deref for MemoValue<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        match self {
            MemoValue::Kept(value) => value,
            MemoValue::Made(value) => value,
        }
    }
}

impl Default for Memo {
    fn default() -> Self {
        Memo(std::sync::OnceLock::new())
    }
}

impl Clone for Memo {
    fn clone(&self) -> Self {
        Memo::default()
    }
}

impl PartialEq for Memo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Memo {}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Memo(kept)"
        } else {
            "Memo(empty)"
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
    /// Room for a layer above the store to keep one value made from this change (the server
    /// keeps the message every watcher of the change's service gets: made once, then the same
    /// bytes go to ten thousand watchers). Not part of the change's value.
    pub memo: Memo,
}

impl Change {
    pub fn new(revision: Revision, events: Vec<Event>) -> Self {
        Change {
            revision,
            events,
            memo: Memo::default(),
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

/// How much a store holds: in total (for metrics) and in one namespace and service (for limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub instances: u64,
    pub services: u64,
    /// Live leases that hold at least one instance (a lease granted and not yet used is not
    /// counted by every backend).
    pub leases: u64,
    /// Leases that ran out since the store started (revoked ones not counted; 0 on a backend
    /// whose leases expire elsewhere).
    pub leases_expired: u64,
    pub revision: Revision,
    pub namespace_instances: u64,
    pub service_instances: u64,
}

/// When a [`Write`] may apply, judged against the instance the store holds under the write's key,
/// atomically with the write (as object_store's `PutMode`). A write whose condition fails changes
/// nothing and answers [`Error::Conflict`](crate::Error::Conflict).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Condition {
    /// Whatever is there.
    #[default]
    Always,
    /// Only when no instance has the key (create-only).
    Absent,
    /// Only when the instance is the registration created at this revision (not one made anew
    /// since).
    Registration(Revision),
    /// Only when no instance has the key, or the one there was registered by this owner or by no
    /// owner at all (strict ownership).
    OwnedBy(String),
}

impl Condition {
    /// Whether the condition holds over `prev`, the instance stored under the key now.
    pub fn holds(&self, prev: Option<&Instance>) -> bool {
        match (self, prev) {
            (Condition::Always, _) => true,
            (Condition::Absent, prev) => prev.is_none(),
            (Condition::Registration(r), Some(p)) => p.create_revision == *r,
            (Condition::Registration(_), None) => false,
            (Condition::OwnedBy(_), None) => true,
            (Condition::OwnedBy(owner), Some(p)) => p.owner.as_ref().is_none_or(|o| o == owner),
        }
    }

    /// `Ok` when the condition holds over `prev`, else the conflict the write answers.
    pub(crate) fn check(&self, prev: Option<&Instance>, key: &InstanceKey) -> crate::Result<()> {
        if self.holds(prev) {
            Ok(())
        } else {
            Err(self.refused(key))
        }
    }

    /// The error a write refused by this condition answers.
    fn refused(&self, key: &InstanceKey) -> crate::Error {
        let name = format!("instance {}/{}/{}", key.namespace, key.service, key.id);
        crate::Error::Conflict(match self {
            Condition::Always => format!("{name} changed"),
            Condition::Absent => format!("{name} already exists"),
            Condition::Registration(r) => {
                format!("{name} is no longer the registration made at revision {r}")
            }
            Condition::OwnedBy(_) => {
                format!("{name} was registered with another token (strict ownership)")
            }
        })
    }
}

/// The most a write may fill, checked atomically with it. Unlimited by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub instances_per_service: u64,
    pub instances_per_namespace: u64,
    /// Live leases, checked when one is granted.
    pub leases: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            instances_per_service: u64::MAX,
            instances_per_namespace: u64::MAX,
            leases: u64::MAX,
        }
    }
}

impl Quota {
    /// Whether a put that creates an instance (`creates`) fits in a namespace and service that
    /// hold what `usage` says. An update always fits: it takes no new place.
    pub(crate) fn admit(
        &self,
        creates: bool,
        usage: &Usage,
        key: &InstanceKey,
    ) -> crate::Result<()> {
        if !creates {
            return Ok(());
        }
        if usage.service_instances >= self.instances_per_service {
            return Err(crate::Error::Limit {
                name: "max_instances_per_service",
                limit: self.instances_per_service,
                scope: format!(" in {}/{}", key.namespace, key.service),
            });
        }
        if usage.namespace_instances >= self.instances_per_namespace {
            return Err(crate::Error::Limit {
                name: "max_instances_per_namespace",
                limit: self.instances_per_namespace,
                scope: format!(" in namespace {}", key.namespace),
            });
        }
        Ok(())
    }

    /// Whether one more lease fits next to `live` ones.
    pub(crate) fn admit_lease(&self, live: u64) -> crate::Result<()> {
        if live >= self.leases {
            return Err(crate::Error::Limit {
                name: "max_leases",
                limit: self.leases,
                scope: String::new(),
            });
        }
        Ok(())
    }
}

/// One change asked of the store: every change to instances is one of these.
// A write is made once per request and moved into the store: boxing the instance would cost an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Registers an instance or updates it, attached to `lease` when one is given (which must be
    /// live, and hold only instances of the same namespace).
    Put {
        instance: Instance,
        lease: Option<LeaseId>,
        condition: Condition,
        quota: Quota,
    },
    /// Removes an instance, giving `cause` as the reason.
    Delete {
        key: InstanceKey,
        cause: RemovalCause,
        condition: Condition,
    },
    /// Records a health verdict; its condition is the registration and check it is for.
    Health(crate::HealthUpdate),
}

impl Write {
    /// An unconditional upsert.
    pub fn put(instance: Instance, lease: Option<LeaseId>) -> Self {
        Write::Put {
            instance,
            lease,
            condition: Condition::Always,
            quota: Quota::default(),
        }
    }

    /// An unconditional deregister.
    pub fn delete(key: InstanceKey) -> Self {
        Write::Delete {
            key,
            cause: RemovalCause::Deregistered,
            condition: Condition::Always,
        }
    }

    /// The key of the instance the write is about.
    pub fn key(&self) -> InstanceKey {
        match self {
            Write::Put { instance, .. } => instance.key(),
            Write::Delete { key, .. } => key.clone(),
            Write::Health(update) => update.key.clone(),
        }
    }
}

/// What a [`Write`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The instance as stored now; its `mod_revision` is the change's revision.
    Stored(Arc<Instance>),
    /// The instance was removed at `revision`.
    Removed {
        prev: Arc<Instance>,
        revision: Revision,
    },
    /// Nothing needed doing (a delete of nothing, a verdict that changes no status); `revision`
    /// is the store's current one.
    Unchanged { revision: Revision },
}

impl Written {
    /// The stored instance, for a write that stored one.
    pub fn stored(&self) -> Option<&Arc<Instance>> {
        match self {
            Written::Stored(instance) => Some(instance),
            _ => None,
        }
    }

    /// The revision the write took, or the store's current one when it took none.
    pub fn revision(&self) -> Revision {
        match self {
            Written::Stored(instance) => instance.mod_revision,
            Written::Removed { revision, .. } | Written::Unchanged { revision } => *revision,
        }
    }
}

/// The rules of what a write makes of the stored instance, in one place for every backend.
pub(crate) mod rules {
    use super::*;

    /// What a put stores over `prev`: the caller's fields, with the store-owned ones filled in.
    /// Revisions are the backend's to set. An update keeps the instance's health when its check
    /// is the same (a new check must pass before traffic comes), and its creation time.
    pub(crate) fn put(
        mut instance: Instance,
        prev: Option<&Instance>,
        lease: Option<LeaseId>,
    ) -> Instance {
        instance.lease_id = lease;
        instance.created_at = match prev {
            Some(p) => p.created_at,
            None => Some(std::time::SystemTime::now()),
        };
        (
            instance.health,
            instance.health_output,
            instance.health_checked_at,
        ) = match (&instance.check, prev) {
            (None, _) => (Health::Passing, String::new(), None),
            (Some(check), Some(p)) if p.check.as_ref() == Some(check) => {
                (p.health, p.health_output.clone(), p.health_checked_at)
            }
            (Some(_), _) => (Health::Critical, "not checked yet".to_owned(), None),
        };
        instance
    }

    /// Whether a put of `instance` (at `key`) may apply over `prev`: its condition, the lease it joins
    /// (with the namespace that lease's instances live in, if any), and its quota over what the
    /// namespace and service hold.
    pub(crate) fn admit_put(
        key: &InstanceKey,
        prev: Option<&Instance>,
        instance: &Instance,
        condition: &Condition,
        lease: Option<(LeaseId, Option<&str>)>,
        quota: &Quota,
        usage: &Usage,
    ) -> crate::Result<()> {
        condition.check(prev, key)?;
        if let Some((id, namespace)) = lease {
            join(id, namespace, instance)?;
        }
        quota.admit(prev.is_none(), usage, key)
    }

    /// What a health verdict makes of `prev`: `Err` (a conflict) when the verdict is stale — the
    /// instance is gone, was registered anew, or its check changed — and `None` when it changes
    /// nothing. Only a change of status is a change (or, for a reported check, of output), and
    /// the first verdict on a check, even when the status stays the same, so that
    /// `health_output` says what the probe saw rather than "not checked yet" for ever.
    pub(crate) fn health(
        prev: Option<&Instance>,
        update: &crate::HealthUpdate,
    ) -> crate::Result<Option<Instance>> {
        let stale = || {
            crate::Error::Conflict(format!(
                "the health verdict on {}/{}/{} is stale: the instance changed since it was checked",
                update.key.namespace, update.key.service, update.key.id
            ))
        };
        let prev = prev.ok_or_else(stale)?;
        if prev.create_revision != update.create_revision
            || prev.check.as_ref() != Some(&update.check)
        {
            return Err(stale());
        }
        // A reported check's output is what its instance says of itself, so a new one is news;
        // a probe's output only matters with the status it explains.
        let same_output = update.check.probe.is_probed() || prev.health_output == update.output;
        if prev.health == update.health && prev.health_checked_at.is_some() && same_output {
            return Ok(None);
        }
        let mut next = prev.clone();
        next.health = update.health;
        next.health_output = update.output.clone();
        next.health_checked_at = Some(update.checked_at);
        Ok(Some(next))
    }

    /// Whether `instance` may join a lease that holds instances of `lease_namespace` (`None`: it
    /// holds none yet). A lease belongs to one namespace, so that refreshing it can be allowed to
    /// exactly the tokens that may write there.
    pub(crate) fn join(
        lease: LeaseId,
        lease_namespace: Option<&str>,
        instance: &Instance,
    ) -> crate::Result<()> {
        match lease_namespace {
            Some(namespace) if namespace != instance.namespace => Err(crate::Error::Invalid {
                field: "lease_id",
                reason: format!(
                    "lease {lease} holds instances of namespace {namespace:?}; an instance of \
                     {:?} needs a lease of its own",
                    instance.namespace
                ),
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Memo, Metadata};

    #[test]
    fn a_memo_keeps_the_first_value_made_and_a_clone_starts_empty() {
        let memo = Memo::default();
        assert_eq!(*memo.get_or_init(|| 7u32), 7);
        assert_eq!(*memo.get_or_init(|| 8u32), 7, "kept");
        assert_eq!(
            *memo.get_or_init(|| "other"),
            "other",
            "another type is not kept"
        );
        assert_eq!(*memo.get_or_init(|| 9u32), 7);
        assert_eq!(
            *memo.clone().get_or_init(|| 10u32),
            10,
            "a new version starts empty"
        );
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
