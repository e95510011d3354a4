//! Active health checks: one task owns every check the store holds, runs each probe about once
//! per interval (first runs spread with jitter over the interval, so that a restart or a mass
//! registration is no thundering herd), with a bounded number of probes in flight, and writes a
//! status change to the store as a change of its own.
//!
//! Status rules (as Consul's): an instance with a check starts CRITICAL and gets traffic only
//! after `successes_before_passing` good probes in a row; a healthy one turns CRITICAL after
//! `failures_before_critical` failed probes in a row; HTTP 429 is WARNING (still healthy). One
//! that stays CRITICAL for `deregister_critical_after` is removed with reason UNHEALTHY. A check
//! whose instance is updated with a different check, re-registered or deregistered is replaced or
//! stopped at once: the task follows the store's change feed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use signpost_store::{
    Condition, Event, FeedItem, Health, HealthCheck, HealthUpdate, Instance, InstanceKey,
    RemovalCause, Revision, Store, Write, Written,
};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::probe::probe;

/// Settings for the health checker.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Probes running at once, at most; the rest wait their turn.
    pub max_in_flight: usize,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { max_in_flight: 512 }
    }
}

/// One check being run.
#[derive(Debug, Clone)]
struct Tracked {
    create_revision: Revision,
    check: HealthCheck,
    address: String,
    port: u16,
    health: Health,
    successes: u32,
    failures: u32,
    critical_since: Option<Instant>,
    /// Whether the store holds a verdict of this check. The first verdict is written even when
    /// the status stays what it started as (CRITICAL), so that `healthOutput` says what the probe
    /// saw from the first probe on; after that only a status change is written, so that a steady
    /// check is not a store change (a revision, an event to every watcher) on every probe.
    checked: bool,
    /// Bumped when the check is replaced, so stale schedule entries and probe results are dropped.
    generation: u64,
    probing: bool,
}

/// A probe to run now.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) key: InstanceKey,
    pub(crate) generation: u64,
    pub(crate) check: HealthCheck,
    pub(crate) address: String,
    pub(crate) port: u16,
}

/// What a probe result asks of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    None,
    SetHealth(HealthUpdate),
    Evict(InstanceKey, Revision),
}

/// The checks and their schedule, without I/O, so the rules can be tested on a paused clock.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    tracked: HashMap<InstanceKey, Tracked>,
    due: BinaryHeap<Reverse<(Instant, u64, InstanceKey)>>,
    next_generation: u64,
}

impl Checks {
    pub(crate) fn len(&self) -> usize {
        self.tracked.len()
    }

    /// Follows an instance as the store has it: starts, replaces or stops its check.
    pub(crate) fn follow(&mut self, instance: &Instance, now: Instant) {
        let key = instance.key();
        let Some(check) = instance.check.as_ref().filter(|c| c.probe.is_probed()) else {
            self.tracked.remove(&key);
            return;
        };
        if let Some(t) = self.tracked.get_mut(&key)
            && t.create_revision == instance.create_revision
            && &t.check == check
            && t.address == instance.address
            && t.port == instance.port
        {
            // The same check; the store's copy of the health is the truth.
            t.health = instance.health;
            t.checked = instance.health_checked_at.is_some();
            return;
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        let first = now + check.interval.mul_f64(signpost_backoff::jitter());
        self.tracked.insert(
            key.clone(),
            Tracked {
                create_revision: instance.create_revision,
                check: check.clone(),
                address: instance.address.clone(),
                port: instance.port,
                health: instance.health,
                successes: 0,
                failures: 0,
                critical_since: (!instance.health.is_healthy()).then_some(now),
                checked: instance.health_checked_at.is_some(),
                generation,
                probing: false,
            },
        );
        self.due.push(Reverse((first, generation, key)));
    }

    pub(crate) fn forget(&mut self, key: &InstanceKey) {
        self.tracked.remove(key);
    }

    /// Replaces everything with what the store holds now.
    pub(crate) fn reconcile(&mut self, instances: &[Arc<Instance>], now: Instant) {
        let keep: std::collections::HashSet<InstanceKey> =
            instances.iter().map(|i| i.key()).collect();
        self.tracked.retain(|k, _| keep.contains(k));
        for instance in instances {
            self.follow(instance, now);
        }
    }

    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The probes due at `now`; each is scheduled again one interval after its slot, so checks
    /// keep the spread their jitter gave them.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<Job> {
        let mut jobs = Vec::new();
        while let Some(Reverse((at, generation, _))) = self.due.peek() {
            if *at > now {
                break;
            }
            let (at, generation) = (*at, *generation);
            let Some(Reverse((_, _, key))) = self.due.pop() else {
                break;
            };
            let Some(t) = self.tracked.get_mut(&key) else {
                continue; // stopped
            };
            if t.generation != generation {
                continue; // replaced
            }
            // A slot missed by more than an interval (a stall) restarts from now.
            let mut next = at + t.check.interval;
            if next <= now {
                next = now + t.check.interval;
            }
            self.due.push(Reverse((next, generation, key.clone())));
            if t.probing {
                continue; // the previous probe is still running: skip a beat rather than pile up
            }
            t.probing = true;
            jobs.push(Job {
                key,
                generation,
                check: t.check.clone(),
                address: t.address.clone(),
                port: t.port,
            });
        }
        jobs
    }

    /// Applies a probe's outcome and says what the store must record.
    pub(crate) fn record(
        &mut self,
        key: &InstanceKey,
        generation: u64,
        outcome: Health,
        output: String,
        now: Instant,
        wall: SystemTime,
    ) -> Action {
        let Some(t) = self.tracked.get_mut(key) else {
            return Action::None;
        };
        if t.generation != generation {
            return Action::None;
        }
        t.probing = false;
        let next = if outcome.is_healthy() {
            t.failures = 0;
            t.successes = t.successes.saturating_add(1);
            if t.health.is_healthy() || t.successes >= t.check.successes_before_passing.max(1) {
                outcome
            } else {
                t.health
            }
        } else {
            t.successes = 0;
            t.failures = t.failures.saturating_add(1);
            if t.failures >= t.check.failures_before_critical.max(1) {
                Health::Critical
            } else {
                t.health
            }
        };
        if next.is_healthy() {
            t.critical_since = None;
        } else if t.critical_since.is_none() {
            t.critical_since = Some(now);
        }
        if let (Some(since), Some(after)) = (t.critical_since, t.check.deregister_critical_after)
            && now.duration_since(since) >= after
        {
            let create_revision = t.create_revision;
            self.tracked.remove(key);
            return Action::Evict(key.clone(), create_revision);
        }
        if next == t.health && t.checked {
            return Action::None;
        }
        t.health = next;
        t.checked = true;
        Action::SetHealth(HealthUpdate {
            key: key.clone(),
            create_revision: t.create_revision,
            check: t.check.clone(),
            health: next,
            output,
            checked_at: wall,
        })
    }
}

struct Outcome {
    key: InstanceKey,
    generation: u64,
    health: Health,
    output: String,
}

/// Runs every check in `store` until `shutdown` is cancelled.
pub(crate) async fn run(store: Arc<dyn Store>, config: HealthConfig, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let (results_tx, mut results) = mpsc::unbounded_channel::<Outcome>();
    let mut checks = Checks::default();
    let mut retry =
        signpost_backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    // Said once when the store fails and once when it is back, not on every retry.
    let mut failing = false;
    'subscribe: loop {
        let (snapshot, mut feed) = tokio::select! {
            _ = shutdown.cancelled() => return,
            started = store.watch_checks() => match started {
                Ok(started) => started,
                Err(e) => {
                    if failing {
                        tracing::debug!(error = %e, "health checks still cannot read the store");
                    } else {
                        tracing::warn!(error = %e, "health checks cannot read the store; retrying");
                        failing = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(retry.next_delay()) => {}
                    }
                    continue 'subscribe;
                }
            },
        };
        if failing {
            tracing::info!("health checks reading the store again");
            failing = false;
        }
        retry.reset();
        checks.reconcile(&snapshot.instances, Instant::now());
        tracing::debug!(checks = checks.len(), "health checks following the store");
        let mut seen = snapshot.revision;
        loop {
            let next_due = checks.next_due();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                item = feed.next() => match item {
                    FeedItem::Change(change) if change.revision <= seen => {}
                    FeedItem::Change(change) => {
                        seen = change.revision;
                        let now = Instant::now();
                        for event in &change.events {
                            follow_event(&mut checks, event, now);
                        }
                    }
                    FeedItem::Lagged => continue 'subscribe,
                    // A shared backend hands the checks to another server: wait to get them back.
                    FeedItem::Closed => {
                        tracing::info!("health checks stopped on this server");
                        checks.reconcile(&[], Instant::now());
                        continue 'subscribe;
                    }
                },
                _ = sleep_until(next_due) => {
                    for job in checks.take_due(Instant::now()) {
                        let permits = permits.clone();
                        let results = results_tx.clone();
                        tokio::spawn(async move {
                            let Ok(_permit) = permits.acquire_owned().await else { return };
                            let (health, output) = probe(&job.check, &job.address, job.port).await;
                            let _ = results.send(Outcome { key: job.key, generation: job.generation, health, output });
                        });
                    }
                }
                Some(outcome) = results.recv() => {
                    let action = checks.record(&outcome.key, outcome.generation, outcome.health, outcome.output, Instant::now(), SystemTime::now());
                    apply(&*store, action).await;
                }
            }
        }
    }
}

fn follow_event(checks: &mut Checks, event: &Event, now: Instant) {
    match &event.current {
        Some(current) => checks.follow(current, now),
        None => {
            if let Some(prev) = &event.prev {
                checks.forget(&prev.key());
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn apply(store: &dyn Store, action: Action) {
    match action {
        Action::None => {}
        Action::SetHealth(update) => {
            let (service, id, health) = (
                update.key.service.clone(),
                update.key.id.clone(),
                update.health,
            );
            let output = update.output.clone();
            match store.write(Write::Health(update)).await {
                Ok(Written::Stored(stored)) => {
                    tracing::info!(%service, %id, ?health, %output, revision = stored.mod_revision, "health changed")
                }
                Ok(_) => {}
                // The instance changed since it was probed: the verdict is stale, and dropped.
                Err(signpost_store::Error::Conflict(reason)) => {
                    tracing::debug!(%service, %id, %reason, "health verdict dropped")
                }
                Err(e) => {
                    tracing::warn!(%service, %id, error = %e, "cannot record a health change")
                }
            }
        }
        Action::Evict(key, create_revision) => {
            let evict = Write::Delete {
                key: key.clone(),
                cause: RemovalCause::Unhealthy,
                condition: Condition::Registration(create_revision),
            };
            match store.write(evict).await {
                Ok(Written::Removed { .. }) => {
                    tracing::info!(service = %key.service, id = %key.id, "removed after staying critical too long");
                }
                // Gone already, or registered anew since: nothing to evict.
                Ok(_) | Err(signpost_store::Error::Conflict(_)) => {}
                Err(e) => {
                    tracing::warn!(service = %key.service, id = %key.id, error = %e, "cannot remove a critical instance")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_store::Probe;

    fn instance(id: &str, check: HealthCheck, health: Health) -> Instance {
        Instance {
            service: "svc".into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 80,
            check: Some(check),
            health,
            create_revision: 1,
            ..Instance::default()
        }
    }

    fn check(successes: u32, failures: u32, deregister: Option<u64>) -> HealthCheck {
        HealthCheck {
            probe: Probe::Tcp,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            deregister_critical_after: deregister.map(Duration::from_secs),
            successes_before_passing: successes,
            failures_before_critical: failures,
        }
    }

    fn health_of(action: &Action) -> Option<Health> {
        match action {
            Action::SetHealth(u) => Some(u.health),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn first_probes_spread_over_one_interval() {
        let mut checks = Checks::default();
        let now = Instant::now();
        for n in 0..1_000 {
            checks.follow(
                &instance(&n.to_string(), check(1, 1, None), Health::Critical),
                now,
            );
        }
        let mut per_second = [0u32; 10];
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let jobs = checks.take_due(Instant::now());
            let slot = (Instant::now() - now).as_secs() as usize - 1;
            per_second[slot] = jobs.len() as u32;
            for job in jobs {
                checks.record(
                    &job.key,
                    job.generation,
                    Health::Passing,
                    String::new(),
                    Instant::now(),
                    SystemTime::now(),
                );
            }
        }
        assert_eq!(
            per_second.iter().sum::<u32>(),
            1_000,
            "each check ran once in its first interval"
        );
        for (second, n) in per_second.iter().enumerate() {
            assert!(
                (50..=150).contains(n),
                "second {second}: {n} probes; expected about 100 of 1000 spread over 10 s"
            );
        }
        // And once per interval after that.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(checks.take_due(Instant::now()).len(), 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn hysteresis_counts_consecutive_results() {
        let mut checks = Checks::default();
        let key = instance("a", check(2, 3, None), Health::Critical).key();
        checks.follow(
            &instance("a", check(2, 3, None), Health::Critical),
            Instant::now(),
        );
        let generation = checks.tracked[&key].generation;
        let mut record = |health: Health| {
            checks.record(
                &key,
                generation,
                health,
                "out".into(),
                Instant::now(),
                SystemTime::now(),
            )
        };
        // Starts critical: one pass is not enough, two in a row are. The first verdict is
        // written all the same, for its output.
        assert_eq!(health_of(&record(Health::Passing)), Some(Health::Critical));
        assert_eq!(
            health_of(&record(Health::Critical)),
            None,
            "a failure resets the count"
        );
        assert_eq!(health_of(&record(Health::Passing)), None);
        assert_eq!(health_of(&record(Health::Passing)), Some(Health::Passing));
        // Passing → warning at once; critical only after three failures in a row.
        assert_eq!(health_of(&record(Health::Warning)), Some(Health::Warning));
        assert_eq!(health_of(&record(Health::Critical)), None);
        assert_eq!(health_of(&record(Health::Critical)), None);
        assert_eq!(health_of(&record(Health::Passing)), Some(Health::Passing));
        assert_eq!(health_of(&record(Health::Critical)), None);
        assert_eq!(health_of(&record(Health::Critical)), None);
        assert_eq!(health_of(&record(Health::Critical)), Some(Health::Critical));
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_critical_too_long_is_evicted() {
        let mut checks = Checks::default();
        let i = instance("a", check(1, 1, Some(30)), Health::Critical);
        checks.follow(&i, Instant::now());
        let generation = checks.tracked[&i.key()].generation;
        tokio::time::advance(Duration::from_secs(29)).await;
        let early = checks.record(
            &i.key(),
            generation,
            Health::Critical,
            String::new(),
            Instant::now(),
            SystemTime::now(),
        );
        assert_eq!(
            health_of(&early),
            Some(Health::Critical),
            "the first verdict is written, not yet the eviction"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let late = checks.record(
            &i.key(),
            generation,
            Health::Critical,
            String::new(),
            Instant::now(),
            SystemTime::now(),
        );
        assert_eq!(late, Action::Evict(i.key(), 1));
        assert_eq!(checks.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_updated_check_replaces_the_old_one_at_once() {
        let mut checks = Checks::default();
        let old = instance("a", check(1, 1, None), Health::Critical);
        checks.follow(&old, Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        let stale = checks.take_due(Instant::now());
        assert_eq!(stale.len(), 1);

        let mut faster = check(1, 1, None);
        faster.interval = Duration::from_secs(2);
        checks.follow(&instance("a", faster, Health::Critical), Instant::now());
        // The old probe's answer is dropped; the new check runs on its own interval.
        let dropped = checks.record(
            &old.key(),
            stale[0].generation,
            Health::Passing,
            String::new(),
            Instant::now(),
            SystemTime::now(),
        );
        assert_eq!(dropped, Action::None);
        tokio::time::advance(Duration::from_secs(2)).await;
        let jobs = checks.take_due(Instant::now());
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].check.interval, Duration::from_secs(2));

        // Deregistered: nothing more runs.
        checks.forget(&old.key());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(checks.take_due(Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_probe_is_not_piled_up() {
        let mut checks = Checks::default();
        let i = instance("a", check(1, 1, None), Health::Critical);
        checks.follow(&i, Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(checks.take_due(Instant::now()).len(), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            checks.take_due(Instant::now()).is_empty(),
            "still probing: skip this beat"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_failing_from_the_start_writes_its_first_output_once() {
        let mut checks = Checks::default();
        let i = instance("a", check(1, 1, None), Health::Critical);
        checks.follow(&i, Instant::now());
        let generation = checks.tracked[&i.key()].generation;
        let mut record = |output: &str| {
            checks.record(
                &i.key(),
                generation,
                Health::Critical,
                output.into(),
                Instant::now(),
                SystemTime::now(),
            )
        };
        match record("connection refused") {
            Action::SetHealth(update) => {
                assert_eq!(update.health, Health::Critical);
                assert_eq!(update.output, "connection refused");
            }
            other => panic!("the first verdict was not written: {other:?}"),
        }
        assert_eq!(
            record("connection refused"),
            Action::None,
            "a steady status is no store change"
        );

        // The store's copy, once it has the verdict, says so; following it keeps that.
        let mut checked = instance("a", check(1, 1, None), Health::Critical);
        checked.health_checked_at = Some(SystemTime::now());
        let mut fresh = Checks::default();
        fresh.follow(&checked, Instant::now());
        let generation = fresh.tracked[&checked.key()].generation;
        let again = fresh.record(
            &checked.key(),
            generation,
            Health::Critical,
            "connection refused".into(),
            Instant::now(),
            SystemTime::now(),
        );
        assert_eq!(
            again,
            Action::None,
            "a restarted checker writes nothing new"
        );
    }
}
