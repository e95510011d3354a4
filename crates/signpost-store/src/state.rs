//! The registry's state as a plain, synchronous state machine: instances, leases, the revision
//! counter and the bounded history. Backends wrap it with locking, publishing and (for the durable
//! backend) persistence, so the rules of what a change does live in one place.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::{
    Change, Event, Instance, InstanceKey, Lease, LeaseId, Quota, RemovalCause, Revision,
    ServiceList, ServiceSummary, Snapshot, Usage, Write, Written, rules,
};
use crate::{Error, Result};

type Ids = BTreeMap<String, Arc<Instance>>;

#[derive(Debug)]
struct LeaseEntry {
    ttl: Duration,
    deadline: Instant,
    instances: Keys,
}

/// The instances on one lease, in key order. Almost every lease holds one instance, and a B-tree
/// set allocates room for eleven keys (~800 bytes) even for one: a hundred thousand leases paid
/// 80 MB for that. So a few keys are a sorted vector, and only a large set is a tree.
#[derive(Debug)]
enum Keys {
    Few(Vec<InstanceKey>),
    Many(BTreeSet<InstanceKey>),
}

impl Keys {
    const FEW: usize = 16;

    fn new() -> Self {
        Keys::Few(Vec::new())
    }

    fn insert(&mut self, key: InstanceKey) {
        match self {
            Keys::Few(keys) => match keys.binary_search(&key) {
                Ok(_) => {}
                Err(at) if keys.len() < Self::FEW => keys.insert(at, key),
                Err(_) => {
                    let mut set: BTreeSet<InstanceKey> = std::mem::take(keys).into_iter().collect();
                    set.insert(key);
                    *self = Keys::Many(set);
                }
            },
            Keys::Many(set) => {
                set.insert(key);
            }
        }
    }

    fn remove(&mut self, key: &InstanceKey) {
        match self {
            Keys::Few(keys) => {
                if let Ok(at) = keys.binary_search(key) {
                    keys.remove(at);
                }
            }
            Keys::Many(set) => {
                set.remove(key);
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Keys::Few(keys) => keys.len(),
            Keys::Many(set) => set.len(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &InstanceKey> {
        let (few, many) = match self {
            Keys::Few(keys) => (Some(keys.iter()), None),
            Keys::Many(set) => (None, Some(set.iter())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

#[derive(Debug)]
pub(crate) struct State {
    revision: Revision,
    next_lease: LeaseId,
    namespaces: BTreeMap<String, BTreeMap<String, Ids>>,
    /// Instances per namespace, and in all, so that a limit check costs no walk.
    in_namespace: HashMap<String, u64>,
    instances: u64,
    services: u64,
    leases: HashMap<LeaseId, LeaseEntry>,
    // One entry per lease, at or before its deadline: a refresh only moves `LeaseEntry::deadline`,
    // and the entry is pushed again when it comes due early. This keeps the heap as large as the
    // number of leases however often clients refresh.
    deadlines: BinaryHeap<Reverse<(Instant, LeaseId)>>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    // Every change after this revision is still in `history`.
    compacted: Revision,
    leases_expired: u64,
    /// SipHash with keys drawn from the OS: a pseudo-random function of the lease counter that
    /// nobody without the keys can predict.
    lease_ids: std::hash::RandomState,
}

impl State {
    pub(crate) fn new(
        start_revision: Revision,
        first_lease: LeaseId,
        history_limit: usize,
    ) -> Self {
        State {
            revision: start_revision,
            next_lease: first_lease.max(1),
            namespaces: BTreeMap::new(),
            in_namespace: HashMap::new(),
            instances: 0,
            services: 0,
            leases: HashMap::new(),
            deadlines: BinaryHeap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: start_revision,
            leases_expired: 0,
            lease_ids: std::hash::RandomState::new(),
        }
    }

    pub(crate) fn revision(&self) -> Revision {
        self.revision
    }

    pub(crate) fn next_lease(&self) -> LeaseId {
        self.next_lease
    }

    /// Rebuilds the state from what a durable backend kept: every lease gets its full ttl from
    /// `now`, and history starts empty at `revision` (older resumes get a snapshot).
    pub(crate) fn restore(
        revision: Revision,
        next_lease: LeaseId,
        history_limit: usize,
        leases: impl IntoIterator<Item = (LeaseId, Duration)>,
        instances: impl IntoIterator<Item = Instance>,
        now: Instant,
    ) -> (Self, Vec<Instance>) {
        let mut state = State::new(revision, next_lease, history_limit);
        for (id, ttl) in leases {
            let deadline = now + ttl;
            state.leases.insert(
                id,
                LeaseEntry {
                    ttl,
                    deadline,
                    instances: Keys::new(),
                },
            );
            state.deadlines.push(Reverse((deadline, id)));
        }
        let mut orphans = Vec::new();
        for instance in instances {
            let key = instance.key();
            if let Some(id) = instance.lease_id {
                match state.leases.get_mut(&id) {
                    Some(entry) => {
                        entry.instances.insert(key.clone());
                    }
                    None => {
                        orphans.push(instance);
                        continue;
                    }
                }
            }
            state.link(Arc::new(instance));
        }
        (state, orphans)
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    /// A replica of a state kept elsewhere (etcd): `instances` as of `revision`, no history yet.
    pub(crate) fn replica(
        revision: Revision,
        history_limit: usize,
        instances: impl IntoIterator<Item = Instance>,
    ) -> Self {
        let mut state = State::new(revision, 1, history_limit);
        for instance in instances {
            state.follow_lease(&instance.key(), None, instance.lease_id);
            state.link(Arc::new(instance));
        }
        state
    }

    /// A replica's index of which instances each lease holds (etcd keeps the leases themselves):
    /// what lease namespaces and lease counts are read from.
    fn follow_lease(&mut self, key: &InstanceKey, old: Option<LeaseId>, new: Option<LeaseId>) {
        if old == new {
            return;
        }
        if let Some(old) = old
            && let Some(entry) = self.leases.get_mut(&old)
        {
            entry.instances.remove(key);
            if entry.instances.len() == 0 {
                self.leases.remove(&old);
            }
        }
        if let Some(new) = new {
            self.leases
                .entry(new)
                .or_insert_with(|| LeaseEntry {
                    ttl: Duration::ZERO,
                    // Never due here: etcd expires it.
                    deadline: Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600),
                    instances: Keys::new(),
                })
                .instances
                .insert(key.clone());
        }
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    /// Applies a change that was decided elsewhere (the etcd backend follows etcd's own
    /// revisions): each event's `current` replaces the instance, or its `prev` is unlinked.
    pub(crate) fn apply(&mut self, revision: Revision, events: Vec<Event>) -> Arc<Change> {
        for event in &events {
            match (&event.current, &event.prev) {
                (Some(current), prev) => {
                    let key = current.key();
                    let old = self
                        .get(&key)
                        .map_or(prev.as_ref().and_then(|p| p.lease_id), |i| i.lease_id);
                    self.follow_lease(&key, old, current.lease_id);
                    self.link(current.clone());
                }
                (None, Some(prev)) => {
                    let key = prev.key();
                    if let Some(gone) = self.unlink(&key) {
                        self.follow_lease(&key, gone.lease_id, None);
                    }
                }
                (None, None) => {}
            }
        }
        self.commit_at(revision, events)
    }

    fn link(&mut self, instance: Arc<Instance>) {
        let key = instance.key();
        let services = self.namespaces.entry(key.namespace.clone()).or_default();
        let ids = match services.get_mut(&key.service) {
            Some(ids) => ids,
            None => {
                self.services += 1;
                services.entry(key.service).or_default()
            }
        };
        if ids.insert(key.id, instance).is_none() {
            self.instances += 1;
            *self.in_namespace.entry(key.namespace).or_default() += 1;
        }
    }

    pub(crate) fn get(&self, key: &InstanceKey) -> Option<&Arc<Instance>> {
        self.namespaces
            .get(&key.namespace)?
            .get(&key.service)?
            .get(&key.id)
    }

    fn lease_is_live(&self, id: LeaseId, now: Instant) -> bool {
        self.leases.get(&id).is_some_and(|l| l.deadline > now)
    }

    /// Applies one write: its condition and quota are judged against the state it changes, under
    /// the caller's lock, so that no other write comes between. The change is `None` when the
    /// write changed nothing.
    pub(crate) fn write(
        &mut self,
        write: Write,
        now: Instant,
    ) -> Result<(Written, Option<Arc<Change>>)> {
        let key = write.key();
        let prev = self.get(&key).cloned();
        let next = match write {
            Write::Put {
                instance,
                lease,
                condition,
                quota,
            } => {
                if let Some(id) = lease
                    // A lease past its deadline is dead even if the expiry task has not swept it.
                    && !self.lease_is_live(id, now)
                {
                    return Err(Error::LeaseNotFound(id));
                }
                rules::admit_put(
                    &key,
                    prev.as_deref(),
                    &instance,
                    &condition,
                    lease.map(|id| (id, self.lease_namespace(id))),
                    &quota,
                    &self.usage(&key.namespace, &key.service),
                )?;
                self.move_lease(&key, prev.as_ref().and_then(|p| p.lease_id), lease);
                rules::put(instance, prev.as_deref(), lease)
            }
            Write::Health(update) => match rules::health(prev.as_deref(), &update)? {
                Some(next) => next,
                None => {
                    return Ok((
                        Written::Unchanged {
                            revision: self.revision,
                        },
                        None,
                    ));
                }
            },
            Write::Delete {
                key,
                cause,
                condition,
            } => {
                condition.check(prev.as_deref(), &key)?;
                return Ok(match self.delete(&key, cause) {
                    Some((prev, change)) => (
                        Written::Removed {
                            prev,
                            revision: change.revision,
                        },
                        Some(change),
                    ),
                    None => (
                        Written::Unchanged {
                            revision: self.revision,
                        },
                        None,
                    ),
                });
            }
        };
        let revision = self.revision + 1;
        let mut next = next;
        next.create_revision = prev.as_ref().map_or(revision, |p| p.create_revision);
        next.mod_revision = revision;
        let next = Arc::new(next);
        self.link(next.clone());
        let change = self.commit(vec![Event {
            prev,
            current: Some(next.clone()),
            removal: None,
        }]);
        Ok((Written::Stored(next), Some(change)))
    }

    /// Moves `key` from the lease it was on to the one it is put on.
    fn move_lease(&mut self, key: &InstanceKey, old: Option<LeaseId>, new: Option<LeaseId>) {
        if let Some(entry) = old
            .filter(|old| Some(*old) != new)
            .and_then(|old| self.leases.get_mut(&old))
        {
            entry.instances.remove(key);
        }
        if let Some(entry) = new.and_then(|id| self.leases.get_mut(&id)) {
            entry.instances.insert(key.clone());
        }
    }

    /// The namespace of the instances a lease holds; `None` when it holds none or is unknown.
    pub(crate) fn lease_namespace(&self, id: LeaseId) -> Option<&str> {
        let entry = self.leases.get(&id)?;
        entry.instances.iter().next().map(|k| k.namespace.as_str())
    }

    pub(crate) fn usage(&self, namespace: &str, service: &str) -> Usage {
        let services = self.namespaces.get(namespace);
        Usage {
            instances: self.instances,
            services: self.services,
            leases: self.leases.len() as u64,
            leases_expired: self.leases_expired,
            revision: self.revision,
            namespace_instances: self.in_namespace.get(namespace).copied().unwrap_or(0),
            service_instances: services
                .and_then(|s| s.get(service))
                .map_or(0, |ids| ids.len() as u64),
        }
    }

    /// Every instance that carries a health check, in all namespaces.
    pub(crate) fn checked(&self) -> Snapshot {
        let instances = self
            .namespaces
            .values()
            .flat_map(|services| services.values())
            .flat_map(|ids| ids.values())
            .filter(|i| i.check.is_some())
            .cloned()
            .collect();
        Snapshot {
            revision: self.revision,
            instances,
        }
    }

    /// Removes one instance. `None` when it did not exist; no revision is taken then.
    pub(crate) fn delete(
        &mut self,
        key: &InstanceKey,
        cause: RemovalCause,
    ) -> Option<(Arc<Instance>, Arc<Change>)> {
        let prev = self.unlink(key)?;
        if let Some(entry) = prev.lease_id.and_then(|id| self.leases.get_mut(&id)) {
            entry.instances.remove(key);
        }
        let change = self.commit(vec![Event {
            prev: Some(prev.clone()),
            current: None,
            removal: Some(cause),
        }]);
        Some((prev, change))
    }

    fn unlink(&mut self, key: &InstanceKey) -> Option<Arc<Instance>> {
        let services = self.namespaces.get_mut(&key.namespace)?;
        let ids = services.get_mut(&key.service)?;
        let prev = ids.remove(&key.id)?;
        if ids.is_empty() {
            services.remove(&key.service);
            self.services -= 1;
            if services.is_empty() {
                self.namespaces.remove(&key.namespace);
            }
        }
        self.instances -= 1;
        if let Some(n) = self.in_namespace.get_mut(&key.namespace) {
            *n -= 1;
            if *n == 0 {
                self.in_namespace.remove(&key.namespace);
            }
        }
        Some(prev)
    }

    pub(crate) fn grant(&mut self, ttl: Duration, quota: &Quota, now: Instant) -> Result<Lease> {
        if ttl.is_zero() {
            return Err(Error::Invalid {
                field: "ttl",
                reason: "must be greater than zero".into(),
            });
        }
        quota.admit_lease(self.leases.len() as u64)?;
        // A lease id should not be guessable from the ids a client has seen: its low 32 bits
        // are the counter through a keyed hash. Its high bits are the counter itself, so that ids
        // grow, and the durable store's lease table is appended to rather than written all over
        // (random ids as its keys made a registration 6-26% slower).
        let id = loop {
            let counter = self.next_lease;
            self.next_lease += 1;
            let secret = self.lease_ids.hash_one(counter) & u64::from(u32::MAX);
            let id = ((counter & 0x7FFF_FFFF) << 32) | secret;
            if id != 0 && !self.leases.contains_key(&id) {
                break id;
            }
        };
        let deadline = now + ttl;
        self.leases.insert(
            id,
            LeaseEntry {
                ttl,
                deadline,
                instances: Keys::new(),
            },
        );
        self.deadlines.push(Reverse((deadline, id)));
        Ok(Lease { id, ttl })
    }

    /// Gives a live lease its full ttl again; `None` when it is unknown or already past due.
    pub(crate) fn refresh(&mut self, id: LeaseId, now: Instant) -> Option<Lease> {
        let entry = self.leases.get_mut(&id)?;
        if entry.deadline <= now {
            return None;
        }
        entry.deadline = now + entry.ttl;
        Some(Lease { id, ttl: entry.ttl })
    }

    /// Removes a lease and every instance on it, all at one revision. The outer `None` means the
    /// lease did not exist; the inner one that it held no instance, so no revision was taken.
    pub(crate) fn revoke(&mut self, id: LeaseId) -> Option<Option<Arc<Change>>> {
        let entry = self.leases.remove(&id)?;
        let mut events = Vec::with_capacity(entry.instances.len());
        for key in entry.instances.iter() {
            if let Some(prev) = self.unlink(key) {
                events.push(Event {
                    prev: Some(prev),
                    current: None,
                    removal: Some(RemovalCause::Expired),
                });
            }
        }
        Some((!events.is_empty()).then(|| self.commit(events)))
    }

    /// Expires up to `limit` leases whose deadline is at or before `now`, returning each expired
    /// lease with the change that removed its instances (none for an empty lease).
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        limit: usize,
    ) -> Vec<(LeaseId, Option<Arc<Change>>)> {
        let mut expired = Vec::new();
        while expired.len() < limit {
            let Some(&Reverse((due, id))) = self.deadlines.peek() else {
                break;
            };
            if due > now {
                break;
            }
            self.deadlines.pop();
            let Some(entry) = self.leases.get(&id) else {
                continue; // revoked
            };
            if entry.deadline > now {
                let deadline = entry.deadline;
                self.deadlines.push(Reverse((deadline, id)));
                continue;
            }
            tracing::debug!(
                lease = id,
                instances = entry.instances.len(),
                "lease expired"
            );
            if let Some(change) = self.revoke(id) {
                expired.push((id, change));
            }
        }
        expired
    }

    /// Whether a lease is due now (so the expiry task should run again at once).
    pub(crate) fn has_due(&self, now: Instant) -> bool {
        self.next_deadline().is_some_and(|due| due <= now)
    }

    /// When the expiry task should look again.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((due, _))| *due)
    }

    pub(crate) fn list(&self, namespace: &str, service: &str) -> Snapshot {
        let instances = self
            .namespaces
            .get(namespace)
            .and_then(|s| s.get(service))
            .map(|ids| ids.values().cloned().collect())
            .unwrap_or_default();
        Snapshot {
            revision: self.revision,
            instances,
        }
    }

    pub(crate) fn list_services(&self, namespace: &str) -> ServiceList {
        let services = self
            .namespaces
            .get(namespace)
            .map(|services| {
                services
                    .iter()
                    .map(|(name, ids)| ServiceSummary {
                        name: name.clone(),
                        instances: count(ids.len()),
                        healthy: count(ids.values().filter(|i| i.health.is_healthy()).count()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ServiceList {
            revision: self.revision,
            services,
        }
    }

    /// Where a watch of `namespace`/`service` starts: a replay of the changes after `after` when
    /// they are all kept, else a snapshot. Read under the same lock as the feed's subscription.
    pub(crate) fn watch_start(
        &self,
        namespace: &str,
        service: &str,
        after: Option<Revision>,
    ) -> crate::WatchStart {
        match after.and_then(|revision| self.replay_after(revision)) {
            Some(changes) => crate::WatchStart::Replay {
                changes,
                revision: self.revision,
            },
            None => crate::WatchStart::Snapshot(self.list(namespace, service)),
        }
    }

    /// The changes after `revision`, or `None` when some of them are no longer kept (or the
    /// revision is one this store never reached).
    pub(crate) fn replay_after(&self, revision: Revision) -> Option<Vec<Arc<Change>>> {
        if revision < self.compacted || revision > self.revision {
            return None;
        }
        let start = self.history.partition_point(|c| c.revision <= revision);
        Some(self.history.range(start..).cloned().collect())
    }

    fn commit(&mut self, events: Vec<Event>) -> Arc<Change> {
        self.commit_at(self.revision + 1, events)
    }

    fn commit_at(&mut self, revision: Revision, events: Vec<Event>) -> Arc<Change> {
        self.revision = revision;
        let change = Arc::new(Change::new(revision, events));
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.revision;
            }
        }
        change
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: usize) -> InstanceKey {
        InstanceKey {
            namespace: "default".into(),
            service: "pay".into(),
            id: format!("i-{id:03}"),
        }
    }

    #[test]
    fn a_lease_keeps_its_instances_in_order_past_the_small_size() {
        let mut keys = Keys::new();
        // Added out of order and twice, past the size where the vector becomes a tree.
        for id in (0..40).rev().chain(0..40) {
            keys.insert(key(id * 7 % 40));
        }
        assert_eq!(keys.len(), 40);
        assert!(matches!(keys, Keys::Many(_)));
        for id in (0..40).filter(|id| id % 3 == 0) {
            keys.remove(&key(id));
        }
        let want: Vec<InstanceKey> = (0..40).filter(|id| id % 3 != 0).map(key).collect();
        assert_eq!(keys.iter().cloned().collect::<Vec<_>>(), want);

        let mut few = Keys::new();
        for id in [5, 1, 3, 1] {
            few.insert(key(id));
        }
        few.remove(&key(9));
        few.remove(&key(3));
        assert_eq!(
            few.iter().cloned().collect::<Vec<_>>(),
            vec![key(1), key(5)]
        );
    }
}
