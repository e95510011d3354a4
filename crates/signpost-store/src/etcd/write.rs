//! The write path: every [`Write`] decided against the replica by the model's rules, then made
//! one etcd transaction whose compares make that decision hold at the moment it applies.
//!
//! - The compare on the instance key (its mod revision, or its absence) makes conditions and
//!   ownership atomic: a write decided over a version that changed since is refused by etcd, and
//!   decided again over the new one.
//! - A put that creates an instance within [`UNCHECKED_PLACES`] of a quota also compares the
//!   service's and the namespace's key ranges: no key in them may have been *created* after the
//!   revision the counts were read at. Updates and deletes in the range do not refuse it (a delete
//!   only makes room), so only creates wait for each other; on one server they queue on a local
//!   lock instead of refusing each other in etcd.
//! - A lease counts once it holds an instance: near the lease quota, the first instance put on
//!   a lease also puts the lease's marker key (on the lease, so it goes with it) and compares
//!   the markers' range the same way.
//! - A refused transaction is decided again once the replica has seen what refused it (the
//!   `or_else` reads tell which revision that was), never from a guess.

use std::sync::Arc;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::time::Instant;

use super::keys::{cause_bytes, instance_from, revision_of, to_etcd};
use super::members::{Failure, Repeat};
use super::{EtcdStore, failure_is_lease_not_found, unavailable};
use crate::codec::encode_instance;
use crate::model::{
    Instance, InstanceKey, LeaseId, Quota, RemovalCause, Revision, Write, Written, rules,
};
use crate::{Error, Result};

/// What a compare-and-swap transaction came to.
pub(super) enum Cas {
    /// The compare held and the transaction applied, in this attempt.
    Applied(TxnResponse),
    /// The compare failed. `repeated`: an earlier attempt may have been applied, and this
    /// refusal may be that attempt's own doing (its change made the compare fail); the
    /// response holds the `or_else` reads, from which each write tells.
    Refused { resp: TxnResponse, repeated: bool },
}

/// The key-value the first `or_else` get of a refused transaction read.
pub(super) fn else_kv(resp: &TxnResponse) -> Option<KeyValue> {
    resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().cloned(),
        _ => None,
    })
}

/// The newest revision any `or_else` read of a refused transaction saw a key at: the replica
/// must have seen it before the write is decided again.
fn refused_at(resp: &TxnResponse) -> Revision {
    resp.op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(
                get.kvs()
                    .iter()
                    .map(|kv| kv.mod_revision().max(kv.create_revision()))
                    .max()
                    .unwrap_or(0),
            ),
            _ => None,
        })
        .max()
        .and_then(|r| Revision::try_from(r).ok())
        .unwrap_or(0)
}

/// What the model decided a write does to the instance the replica holds.
enum Decision {
    /// Store this version (a put or a health change) over `prev`.
    Store {
        next: Box<Instance>,
        lease: Option<LeaseId>,
        /// A health change keeps the instance on its lease.
        keep_lease: bool,
        /// Creates under a quota: the ranges' counts read at this revision must still hold.
        quota_at: Option<Revision>,
        /// The instance is the first the replica knows on its lease, near the lease quota: the
        /// lease's marker goes in the same transaction, and the count of leases read at this
        /// revision must still hold.
        first_on_lease: Option<Revision>,
    },
    /// Remove `prev`: that registration of it, or (`exact`) that very version, when the
    /// condition was judged on more than the registration (an owner can change within one).
    Remove {
        prev: Arc<Instance>,
        cause: RemovalCause,
        exact: bool,
    },
    Nothing,
}

/// How many places must be left in a service and its namespace for a create to go without the
/// range compares. Those compares make creates in one namespace wait for each other (each etcd
/// transaction is an fsync: 64 writers fell from 3,400 registrations/s to 115), so they are made
/// only within this many places of a limit, where a race could pass it. Further away, only more
/// creates than this in flight at the same moment, over every server, could.
const UNCHECKED_PLACES: u64 = 1_024;

fn near(quota: &Quota, usage: &crate::Usage) -> bool {
    usage.service_instances.saturating_add(UNCHECKED_PLACES) >= quota.instances_per_service
        || usage.namespace_instances.saturating_add(UNCHECKED_PLACES)
            >= quota.instances_per_namespace
}

impl EtcdStore {
    /// Sends a compare-and-swap transaction; when an attempt may have been applied, sends the
    /// same transaction again on another member, within one deadline.
    ///
    /// Only for transactions whose compare is on the key they change (its version, mod or
    /// create revision): an attempt that was applied changed that, so the repeat cannot apply a
    /// second time. It is refused instead, and the caller reads the `or_else` part of the
    /// response to tell its own earlier write from another server's.
    pub(super) async fn cas(&self, txn: Txn) -> std::result::Result<Cas, Failure> {
        let deadline = self.deadline();
        let mut repeated = false;
        loop {
            let attempt = self
                .inner
                .members
                .call(Repeat::Never, deadline, |client| {
                    let txn = txn.clone();
                    async move { client.kv_client().txn(txn).await }
                })
                .await;
            match attempt {
                Ok(resp) if resp.succeeded() => return Ok(Cas::Applied(resp)),
                Ok(resp) => return Ok(Cas::Refused { resp, repeated }),
                Err(Failure::Unknown(reason)) if Instant::now() < deadline => {
                    tracing::debug!(%reason, "an etcd transaction may have been applied; sending it again");
                    repeated = true;
                }
                Err(Failure::Unreachable(reason)) if repeated => {
                    // Nothing took the repeat; the first attempt's outcome is still unknown.
                    return Err(Failure::Unknown(reason));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the replica has applied `revision` (a write this server just made, or one
    /// that refused it).
    pub(super) async fn seen(&self, revision: Revision) -> Result<()> {
        let mut applied = self.replica().applied.subscribe();
        match tokio::time::timeout(
            self.inner.config.request_timeout,
            applied.wait_for(|r| *r >= revision),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "the change at revision {revision} was written to etcd but has not come back on \
                 this server's watch yet"
            ))),
        }
    }

    /// The instance at `key` as the replica holds it at `revision`, when it still is that one.
    fn stored(&self, key: &InstanceKey, revision: Revision) -> Option<Arc<Instance>> {
        self.replica()
            .read()
            .get(key)
            .filter(|i| i.mod_revision == revision)
            .cloned()
    }

    /// Decides `write` against the replica, as the model's rules say.
    fn decide(&self, write: &Write) -> Result<(Decision, Option<Arc<Instance>>, Revision)> {
        let key = write.key();
        let state = self.replica().read();
        let prev = state.get(&key).cloned();
        let at = state.revision();
        let decision = match write {
            Write::Put {
                instance,
                lease,
                condition,
                quota,
            } => {
                let creates = prev.is_none();
                let usage = state.usage(&key.namespace, &key.service);
                rules::admit_put(
                    &key,
                    prev.as_deref(),
                    instance,
                    condition,
                    lease.map(|id| (id, state.lease_namespace(id))),
                    quota,
                    &usage,
                )?;
                // A lease counts once it holds an instance (etcd grants leases outside
                // transactions): its first instance is where the lease quota is kept.
                let first_on_lease = lease.filter(|id| state.lease_namespace(*id).is_none());
                if first_on_lease.is_some() {
                    quota.admit_lease(usage.leases)?;
                }
                Decision::Store {
                    next: Box::new(rules::put(instance.clone(), prev.as_deref(), *lease)),
                    lease: *lease,
                    keep_lease: false,
                    quota_at: (creates && near(quota, &usage)).then_some(at),
                    // Far from the quota no marker is needed: only a crowd of writes larger than
                    // the places left could pass it, as with instances (each marker costs etcd
                    // a key: 17 % of registrations/s when every lease had one).
                    first_on_lease: first_on_lease
                        .filter(|_| usage.leases.saturating_add(UNCHECKED_PLACES) >= quota.leases)
                        .map(|_| at),
                }
            }
            Write::Health(update) => match rules::health(prev.as_deref(), update)? {
                Some(next) => Decision::Store {
                    lease: next.lease_id,
                    next: Box::new(next),
                    keep_lease: true,
                    quota_at: None,
                    first_on_lease: None,
                },
                None => Decision::Nothing,
            },
            Write::Delete {
                cause, condition, ..
            } => {
                condition.check(prev.as_deref(), &key)?;
                match &prev {
                    Some(p) => Decision::Remove {
                        prev: p.clone(),
                        cause: *cause,
                        exact: matches!(condition, crate::Condition::OwnedBy(_)),
                    },
                    None => Decision::Nothing,
                }
            }
        };
        Ok((decision, prev, at))
    }

    pub(super) async fn write_instance(&self, write: Write) -> Result<Written> {
        self.replica().check()?;
        let key = write.key();
        let etcd_key = self.inner.keys.instance(&key);
        // Held by a create near a limit, for as long as it takes to decide, write and see it.
        let mut creating = None;
        // A plain deregister that finds nothing may be racing a registration the replica has not
        // seen yet: it asks etcd once, as the old read-modify-write did.
        let mut fetched = false;
        for _ in 0..16 {
            let (decision, prev, at) = self.decide(&write)?;
            let attempt = match decision {
                Decision::Nothing => {
                    if matches!(write, Write::Delete { .. }) && prev.is_none() && !fetched {
                        fetched = true;
                        if let Some(revision) = self.fetch_revision(&etcd_key).await? {
                            self.seen(revision).await?;
                            continue;
                        }
                    }
                    return Ok(Written::Unchanged { revision: at });
                }
                Decision::Store {
                    quota_at,
                    first_on_lease,
                    ..
                } if creating.is_none() && (quota_at.is_some() || first_on_lease.is_some()) => {
                    // Near a limit writes queue here, and decide again once they hold the lock.
                    let queued = tokio::time::timeout(
                        self.inner.config.request_timeout,
                        self.inner.near_limit.lock(),
                    );
                    creating = Some(queued.await.map_err(|_| {
                        Error::Unavailable(format!(
                            "too many writes near a limit: instance {}/{}/{} waited {:?} for \
                             its turn",
                            key.namespace, key.service, key.id, self.inner.config.request_timeout
                        ))
                    })?);
                    continue;
                }
                Decision::Store {
                    next,
                    lease,
                    keep_lease,
                    quota_at,
                    first_on_lease,
                } => {
                    let checks = Checks {
                        quota_at,
                        first_on_lease,
                    };
                    self.try_store(
                        &key,
                        &etcd_key,
                        *next,
                        prev.as_deref(),
                        lease,
                        keep_lease,
                        checks,
                    )
                    .await?
                }
                Decision::Remove { prev, cause, exact } => {
                    self.try_remove(&key, &etcd_key, prev, cause, exact, &write)
                        .await?
                }
            };
            match attempt {
                Attempt::Done(written) => return Ok(written),
                Attempt::Refused(refusal) => {
                    // Decided again only once the replica holds what refused it: a newer version
                    // of the key (or its removal, which leaves nothing for the `or_else` reads
                    // to date), or the newest create in a range that was compared.
                    let decided = prev.as_ref().map(|p| p.mod_revision);
                    let key_moved = refusal.key != decided;
                    self.until("the change that refused a write", |state| {
                        state.revision() >= refusal.range
                            && (!key_moved || state.get(&key).map(|i| i.mod_revision) != decided)
                    })
                    .await?;
                }
            }
        }
        Err(Error::Unavailable(format!(
            "instance {}/{}/{} is being changed too often to write it",
            key.namespace, key.service, key.id
        )))
    }

    /// The revision etcd holds the key at, if it holds it.
    async fn fetch_revision(&self, etcd_key: &[u8]) -> Result<Option<Revision>> {
        let resp = self
            .inner
            .members
            .call(Repeat::Safe, self.deadline(), |client| async move {
                client.kv_client().get(etcd_key, None).await
            })
            .await
            .map_err(unavailable)?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| Revision::try_from(kv.mod_revision()).ok()))
    }

    /// One attempt at storing `next` over `prev`.
    #[allow(clippy::too_many_arguments)]
    async fn try_store(
        &self,
        key: &InstanceKey,
        etcd_key: &[u8],
        mut next: Instance,
        prev: Option<&Instance>,
        lease: Option<LeaseId>,
        keep_lease: bool,
        checks: Checks,
    ) -> Result<Attempt> {
        let lease_id = match lease {
            Some(id) => Some(i64::try_from(id).map_err(|_| Error::LeaseNotFound(id))?),
            None => None,
        };
        let options = if keep_lease {
            Some(PutOptions::new().with_ignore_lease())
        } else {
            lease_id.map(|id| PutOptions::new().with_lease(id))
        };
        let value = encode_instance(&next);
        let mut when = vec![unchanged(etcd_key, prev)];
        let mut then = vec![TxnOp::put(etcd_key, value.clone(), options)];
        let mut or_else = vec![TxnOp::get(etcd_key, None)];
        let mut ranges = Vec::new();
        if let Some(at) = checks.quota_at {
            ranges.push((self.inner.keys.service_range(key), at));
            ranges.push((self.inner.keys.namespace_range(&key.namespace), at));
        }
        if let (Some(at), Some(id)) = (checks.first_on_lease, lease_id) {
            then.push(TxnOp::put(
                self.inner.keys.lease(id),
                key.namespace.as_bytes(),
                Some(PutOptions::new().with_lease(id)),
            ));
            ranges.push((self.inner.keys.leases.clone(), at));
        }
        {
            for (range, at) in ranges {
                let end = range_end(&range);
                when.push(
                    Compare::create_revision(range.clone(), CompareOp::Less, to_etcd(at + 1))
                        .with_range(end.clone()),
                );
                // The newest create in the range, for the wait before deciding again.
                or_else.push(TxnOp::get(
                    range,
                    Some(
                        GetOptions::new()
                            .with_range(end)
                            .with_keys_only()
                            .with_sort(SortTarget::Create, SortOrder::Descend)
                            .with_limit(1),
                    ),
                ));
            }
        }
        // Safe to repeat (see `cas`): the compare is on this key's mod revision (or on its
        // absence), which an applied attempt moved on. A refused repeat that finds exactly this
        // value (on exactly this lease, for a put) is the earlier attempt's write: the same bytes
        // carry this attempt's creation or check time, so no other write leaves them.
        let txn = Txn::new().when(when).and_then(then).or_else(or_else);
        match self.cas(txn).await {
            Ok(Cas::Applied(resp)) => {
                let revision = revision_of(resp.header())?;
                next.mod_revision = revision;
                next.create_revision = prev.map_or(revision, |p| p.create_revision);
                self.seen(revision).await?;
                Ok(Attempt::Done(Written::Stored(
                    self.stored(key, revision).unwrap_or_else(|| Arc::new(next)),
                )))
            }
            Ok(Cas::Refused { resp, repeated }) => match else_kv(&resp) {
                Some(kv)
                    if repeated
                        && kv.value() == value.as_slice()
                        && (keep_lease || kv.lease() == lease_id.unwrap_or(0)) =>
                {
                    let revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
                    next.mod_revision = revision;
                    next.create_revision = u64::try_from(kv.create_revision()).unwrap_or(0);
                    self.seen(revision).await?;
                    Ok(Attempt::Done(Written::Stored(
                        self.stored(key, revision).unwrap_or_else(|| Arc::new(next)),
                    )))
                }
                current => Ok(Attempt::Refused(Refusal::of(current, &resp))),
            },
            Err(e) if lease.is_some() && !keep_lease && failure_is_lease_not_found(&e) => {
                Err(Error::LeaseNotFound(lease.unwrap_or_default()))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// One attempt at removing `prev`.
    async fn try_remove(
        &self,
        key: &InstanceKey,
        etcd_key: &[u8],
        prev: Arc<Instance>,
        cause: RemovalCause,
        exact: bool,
        write: &Write,
    ) -> Result<Attempt> {
        let keys = &self.inner.keys;
        // Safe to repeat (see `cas`): an applied attempt deleted this registration (or version),
        // so the compare of a repeat cannot hold again, even if the instance was registered
        // anew. The cause rides in the same transaction as a marker key (see the module docs).
        let compare = if exact {
            unchanged(etcd_key, Some(&prev))
        } else {
            Compare::create_revision(etcd_key, CompareOp::Equal, to_etcd(prev.create_revision))
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([
                TxnOp::delete(etcd_key, Some(DeleteOptions::new().with_prev_key())),
                TxnOp::put(keys.removal.as_slice(), cause_bytes(cause), None),
            ])
            .or_else([TxnOp::get(etcd_key, None)]);
        match self.cas(txn).await.map_err(unavailable)? {
            Cas::Applied(resp) => {
                let revision = revision_of(resp.header())?;
                let removed = resp.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Delete(d) => d.prev_kvs().first().cloned(),
                    _ => None,
                });
                self.seen(revision).await?;
                Ok(Attempt::Done(match removed {
                    Some(kv) => Written::Removed {
                        prev: Arc::new(instance_from(&kv)?),
                        revision,
                    },
                    None => Written::Unchanged { revision },
                }))
            }
            Cas::Refused { resp, repeated } => {
                let current = else_kv(&resp);
                let same_registration = current
                    .as_ref()
                    .is_some_and(|kv| kv.create_revision() == to_etcd(prev.create_revision));
                if !repeated || same_registration {
                    // Not ours: something changed the instance since the decision.
                    return Ok(Attempt::Refused(Refusal::of(current, &resp)));
                }
                // The registration is gone: this server's earlier attempt removed it, or
                // something else did meanwhile. Either way what was asked is done, unless the
                // instance is there again under a plain deregister: then the first attempt may
                // have removed it before it came back, or not, and only the caller can tell.
                let plain = matches!(
                    write,
                    Write::Delete {
                        condition: crate::Condition::Always,
                        ..
                    }
                );
                if current.is_some() && plain {
                    return Err(Error::Unavailable(
                        "etcd unreachable: a member failed during the deregister, and the \
                         instance is registered again now; deregister again to be sure"
                            .into(),
                    ));
                }
                // Answered once this server's replica no longer holds it, so that a read here
                // right after agrees.
                self.until("the removal of the instance", |state| {
                    state
                        .get(key)
                        .is_none_or(|i| i.create_revision != prev.create_revision)
                })
                .await?;
                let revision = self.replica().read().revision();
                Ok(Attempt::Done(Written::Removed { prev, revision }))
            }
        }
    }

    /// Waits until the replica's state satisfies `done`, within the request timeout.
    async fn until(&self, what: &str, done: impl Fn(&crate::state::State) -> bool) -> Result<()> {
        let replica = self.replica();
        let mut applied = replica.applied.subscribe();
        let reached = tokio::time::timeout(
            self.inner.config.request_timeout,
            applied.wait_for(|_| done(&replica.read())),
        )
        .await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "{what} was made in etcd but has not come back on this server's watch yet"
            ))),
        }
    }
}

/// What a put's transaction must compare beyond the instance key (see [`Decision::Store`]).
struct Checks {
    quota_at: Option<Revision>,
    first_on_lease: Option<Revision>,
}

/// One attempt's outcome: done, or refused by a change the replica must see first.
enum Attempt {
    Done(Written),
    Refused(Refusal),
}

/// What refused a transaction, as its `or_else` reads tell.
struct Refusal {
    /// The key's mod revision now (`None`: absent).
    key: Option<Revision>,
    /// The newest revision any read saw (the newest create in a compared range).
    range: Revision,
}

impl Refusal {
    fn of(current: Option<KeyValue>, resp: &TxnResponse) -> Self {
        Refusal {
            key: current.and_then(|kv| Revision::try_from(kv.mod_revision()).ok()),
            range: refused_at(resp),
        }
    }
}

/// A compare that holds when `key` is still what `prev` says.
fn unchanged(etcd_key: &[u8], prev: Option<&Instance>) -> Compare {
    match prev {
        Some(p) => Compare::mod_revision(etcd_key, CompareOp::Equal, to_etcd(p.mod_revision)),
        None => Compare::version(etcd_key, CompareOp::Equal, 0),
    }
}

/// The end of the key range of every key starting with `prefix` (etcd's "prefix end").
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the key space.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::range_end;

    #[test]
    fn a_range_end_covers_exactly_the_keys_with_the_prefix() {
        assert_eq!(range_end(b"a/b\0"), b"a/b\x01".to_vec());
        assert_eq!(range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
    }
}
