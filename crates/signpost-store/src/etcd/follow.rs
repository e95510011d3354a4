//! Following etcd into the replica: one watch of the whole prefix, reopened on another member
//! when one fails, and a fresh load when etcd compacted past the replica.

use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::time::Instant;

use super::keys::{Keys, cause_from, instance_from, to_etcd};
use super::members::Members;
use super::replica::Replica;
use crate::Result;
use crate::model::{Event, RemovalCause, Revision};
use crate::state::State;

/// Follows etcd into the replica for as long as the store lives.
pub(super) async fn follow(
    replica: Weak<Replica>,
    members: Arc<Members>,
    keys: Keys,
    history_limit: usize,
    request_timeout: Duration,
) {
    let mut loaded = false;
    let mut strikes = 0u32;
    let mut backoff =
        signpost_backoff::Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
    // Since when the replica has not been able to follow etcd.
    let mut failing_since = None;
    loop {
        let Some(shared) = replica.upgrade() else {
            return;
        };
        let mut synced = false;
        // The member that answered last, or the next one up: a watch on a member that died
        // is reopened on another from the replica's revision, so nothing is missed.
        let (member, client) = members.preferred();
        let result = async {
            if !loaded {
                tokio::time::timeout(
                    request_timeout,
                    load(&shared, &client, &keys, history_limit),
                )
                .await
                .map_err(|_| {
                    etcd_client::Error::WatchError(format!(
                        "no answer to the initial read within {request_timeout:?}"
                    ))
                })??;
                loaded = true;
            }
            let from = shared.read().revision() + 1;
            stream(&shared, &client, &keys, from, &mut synced).await
        }
        .await;
        match result {
            Ok(Followed::Compacted) => {
                tracing::warn!("etcd compacted past this server's replica: reloading");
                loaded = false;
            }
            Err(e) => {
                let member_failed = members.failed(member, &e);
                // A watch that breaks after working is most often one member going away: the
                // next attempt reaches another at once, and nobody needs to see the blip. A
                // leader election makes every member refuse the watch for a moment. Only a
                // failure that lasts longer than that means no member can be followed: no
                // quorum, and the server is not serving.
                let now = Instant::now();
                if synced {
                    strikes = 1;
                    failing_since = Some(now);
                } else {
                    strikes += 1;
                }
                let since = *failing_since.get_or_insert(now);
                tracing::debug!(error = %e, strikes, "etcd watch failed");
                if strikes > 1 && now.duration_since(since) >= UNREACHABLE_AFTER {
                    shared.set_health(Err(format!(
                        "no member can be followed ({})",
                        members.describe()
                    )));
                }
                drop(shared);
                if synced {
                    backoff.reset();
                }
                // The first failure of a member that failed moves to the next member at once.
                if !(strikes == 1 && member_failed) {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// How long the replica may fail to follow etcd before the store says it is unreachable: longer
/// than a leader election (a second or two with etcd's defaults), during which every member
/// refuses new watches.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(2);

enum Followed {
    /// etcd no longer has the changes after the replica's revision.
    Compacted,
}

/// Reads every instance into a new replica state. On the first load, the state is read as of
/// `history_limit` revisions ago when etcd still has that, so that the watch that follows fills
/// the history and watches resumed from another server's revisions can be replayed here too.
async fn load(
    replica: &Replica,
    client: &Client,
    keys: &Keys,
    history_limit: usize,
) -> Result<(), etcd_client::Error> {
    let mut kv = client.kv_client();
    let prefix = || GetOptions::new().with_prefix();
    let mut resp = kv.get(keys.instances.as_slice(), Some(prefix())).await?;
    let mut revision = resp.header().map_or(0, |h| h.revision());
    let mut current = true;
    let back = revision.saturating_sub(i64::try_from(history_limit).unwrap_or(i64::MAX));
    if replica.read().revision() == 0 && back > 0 {
        // When etcd has compacted that far already, start from now with no history.
        if let Ok(older) = kv
            .get(
                keys.instances.as_slice(),
                Some(prefix().with_revision(back)),
            )
            .await
        {
            resp = older;
            revision = back;
            current = false;
        }
    }
    let mut instances = Vec::with_capacity(resp.kvs().len());
    for kv in resp.kvs() {
        match instance_from(kv) {
            Ok(instance) => instances.push(instance),
            Err(e) => {
                tracing::error!(key = ?String::from_utf8_lossy(kv.key()), error = %e, "skipping an unreadable instance record")
            }
        }
    }
    let revision = Revision::try_from(revision).unwrap_or(0);
    // A state read as of now is one to serve at once (the watchers this reload resets read it
    // straight away); one read from the past waits for the watch to catch up.
    replica.load(State::replica(revision, history_limit, instances));
    // Healthy only once loaded: a reader let in before would see an empty registry.
    if current {
        replica.set_health(Ok(()));
    }
    Ok(())
}

/// Applies etcd's changes from revision `from` on, until the watch fails or is compacted.
/// `caught_up` turns true once etcd says the watch has caught up with it.
async fn stream(
    replica: &Replica,
    client: &Client,
    keys: &Keys,
    from: Revision,
    caught_up: &mut bool,
) -> Result<Followed, etcd_client::Error> {
    let mut watches = client.watch_client();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(to_etcd(from))
        .with_progress_notify();
    // A member that hangs (stopped, cut off) neither fails the call nor answers: bound the wait
    // for the watch to be created, so that the next attempt tries another member.
    let no_answer = || etcd_client::Error::WatchError("the member did not answer within 2s".into());
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        watches.watch(keys.all.as_slice(), Some(options)),
    )
    .await
    .map_err(|_| no_answer())??;
    let mut first = Some(
        tokio::time::timeout(Duration::from_secs(2), stream.message())
            .await
            .map_err(|_| no_answer())??,
    );
    let (mut requests, mut responses) = stream.split();
    // The replica is only current (and the store healthy) once etcd says this watch has caught
    // up; etcd ignores a progress request while the watch is still replaying, so ask until then.
    let mut synced = false;
    let mut ask = tokio::time::interval(Duration::from_millis(200));
    ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let next = match first.take() {
            Some(created) => created,
            None => tokio::select! {
                next = responses.message() => next?,
                _ = ask.tick(), if !synced => {
                    requests.request_progress().await?;
                    continue;
                }
            },
        };
        let Some(resp) = next else { break };
        if resp.compact_revision() > 0 {
            return Ok(Followed::Compacted);
        }
        if resp.canceled() {
            return Err(etcd_client::Error::WatchError(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            )));
        }
        if !resp.created() && resp.events().is_empty() {
            // A progress notification: the watch has caught up. Its revision is not used to move
            // the replica on: etcd before 3.4.25 / 3.5.8 could send one ahead of events still
            // queued for the watch (etcd issue 15220), and a replica that claimed that revision
            // would hand out snapshots missing those events.
            if !synced {
                synced = true;
                *caught_up = true;
                replica.set_health(Ok(()));
            }
        }
        // etcd never splits one revision's events over two responses.
        let events = resp.events();
        let mut start = 0;
        while start < events.len() {
            let revision = events[start].kv().map_or(0, |kv| kv.mod_revision());
            let end = events[start..]
                .iter()
                .position(|e| e.kv().map_or(0, |kv| kv.mod_revision()) != revision)
                .map_or(events.len(), |n| start + n);
            apply_revision(replica, keys, revision, &events[start..end]);
            start = end;
        }
    }
    Err(etcd_client::Error::WatchError(
        "etcd ended the watch stream".into(),
    ))
}

/// Turns the etcd events of one revision into a change of the replica.
fn apply_revision(replica: &Replica, keys: &Keys, revision: i64, events: &[etcd_client::Event]) {
    let Ok(revision) = Revision::try_from(revision) else {
        return;
    };
    let cause = events
        .iter()
        .filter_map(|e| e.kv())
        .find(|kv| kv.key() == keys.removal.as_slice())
        .map_or(RemovalCause::Expired, |kv| cause_from(kv.value()));
    let mut changes = Vec::new();
    {
        let state = replica.read();
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = keys.instance_key(kv.key()) else {
                continue;
            };
            let prev = state.get(&key).cloned();
            match event.event_type() {
                EventType::Put => match instance_from(kv) {
                    Ok(current) => changes.push(Event {
                        prev,
                        current: Some(Arc::new(current)),
                        removal: None,
                    }),
                    Err(e) => {
                        tracing::error!(?key, error = %e, "ignoring an unreadable instance record")
                    }
                },
                EventType::Delete => {
                    if prev.is_some() {
                        changes.push(Event {
                            prev,
                            current: None,
                            removal: Some(cause),
                        });
                    }
                }
            }
        }
    }
    if !changes.is_empty() {
        replica.apply(revision, changes);
    }
}
