//! An endpoint's load, the signal of the power-of-two-choices pick: calls in flight times a
//! peak-EWMA latency estimate. Shared by the balanced channel's endpoints and by any other
//! balancer over Signpost (the gateway's HTTP pools), so both weigh load the same way.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Peak-EWMA latency, after Finagle and linkerd: a slower sample rises to the top fast, a faster
/// one blends in, and without samples the estimate decays towards zero so that an endpoint that
/// was slow once is tried again.
///
/// Unlike theirs, a slower sample is not taken whole but blended by the time since the last one
/// over [`RISE_FRACTION`] of the decay: after a quiet spell it is taken nearly whole (a rarely
/// called slow instance stays out), while one late answer among many quick ones (a scheduler
/// stall on a busy host) barely moves it. Taken whole, every stall shut its endpoint out for about
/// a second, and an endpoint with twice the weight sees twice the stalls: on a loaded 2-core host
/// a weight-200 instance got 0.43 of the calls instead of 0.5. Blended by time, the estimate does
/// not depend on how often an endpoint is called.
#[derive(Debug)]
struct Ewma {
    nanos: f64,
    stamp: Instant,
}

/// An endpoint's load: calls in flight and the latency estimate.
#[derive(Debug)]
pub struct Load {
    pending: AtomicU32,
    ewma: Mutex<Ewma>,
    decay_nanos: f64,
}

/// A new endpoint's latency estimate before its first answer: low enough that it is tried at
/// once, and not zero, so that the calls in flight on it still weigh.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// How fast the latency estimate forgets, for every balancer over Signpost. linkerd and Finagle
/// use 10 s; with weights drawn first, a peak would then keep an endpoint out of its share for
/// many seconds (the weights test missed its shares by up to 11 points at 10 s, within 2 at
/// 2 s), while at 2 s a 20 ms-slower instance still gets about 1 call in 600.
pub const DECAY: Duration = Duration::from_secs(2);

/// A slower sample is blended in over this fraction of the decay (2 s decay: 400 ms), so a
/// latency that lasts that long is believed and one stall of a call is not: a stall of S blends
/// in about S/400 ms of itself, so one under ~30 ms stays within the 3x that counts as even.
const RISE_FRACTION: f64 = 0.2;

/// Latencies below this count as this much in the cost: between instances that all answer
/// within a millisecond, the difference is scheduling noise (a busy core, a GC pause in a
/// neighbour), and the weights should decide. With a 1 µs floor, equal loopback greeters under a
/// parallel test run got 18 % and 44 % where 33 % each was due.
const LATENCY_FLOOR_NANOS: f64 = 1_000_000.0;

impl Load {
    pub fn new(decay: Duration) -> Load {
        Load {
            pending: AtomicU32::new(0),
            ewma: Mutex::new(Ewma {
                nanos: DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
            }),
            decay_nanos: (decay.as_nanos() as f64).max(1.0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ewma> {
        self.ewma.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn decayed(&self, ewma: &Ewma, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(ewma.stamp).as_nanos() as f64;
        ewma.nanos * (-elapsed / self.decay_nanos).exp()
    }

    pub fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed);
        let estimate = self.decayed(&self.lock(), now).max(LATENCY_FLOOR_NANOS);
        estimate * f64::from(pending + 1)
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.decayed(&self.lock(), now) as u64)
    }

    /// A call begins: in flight until [`Load::end`].
    pub fn start(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// A call (or its stream of answers) is over.
    pub fn end(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
    }

    /// An answer's head (or the giving up on one) came `rtt` after the call began.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut ewma = self.lock();
        let elapsed = now.saturating_duration_since(ewma.stamp).as_nanos() as f64;
        let over = if rtt > ewma.nanos {
            self.decay_nanos * RISE_FRACTION
        } else {
            self.decay_nanos
        };
        let keep = (-elapsed / over).exp();
        ewma.nanos = ewma.nanos * keep + rtt * (1.0 - keep);
        ewma.stamp = now;
    }

    /// A new connection starts with a fresh estimate: the old one described another process.
    pub fn reset(&self) {
        let mut ewma = self.lock();
        ewma.nanos = DEFAULT_RTT.as_nanos() as f64;
        ewma.stamp = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Calls every `every`, each answering in `fast`, but every `nth` in `slow`; the estimate
    /// after `calls` calls.
    fn after(every: Duration, calls: u32, fast: Duration, slow: Duration, nth: u32) -> Duration {
        let load = Load::new(Duration::from_secs(2));
        let mut now = Instant::now();
        for i in 1..=calls {
            now += every;
            let rtt = if i % nth == 0 { slow } else { fast };
            load.observe(rtt, now);
        }
        load.estimate(now)
    }

    #[test]
    fn one_late_answer_among_many_quick_ones_barely_moves_the_estimate() {
        // A 10 ms stall in 4 ms-spaced 200 µs answers.
        let estimate = after(4 * MS, 501, Duration::from_micros(200), 10 * MS, 500);
        assert!(estimate < 2 * MS, "{estimate:?}");
    }

    #[test]
    fn a_late_answer_after_a_quiet_spell_is_taken_nearly_whole() {
        let load = Load::new(Duration::from_secs(2));
        let start = Instant::now();
        load.observe(20 * MS, start + Duration::from_secs(2));
        let estimate = load.estimate(start + Duration::from_secs(2));
        assert!(estimate > 19 * MS, "{estimate:?}");
    }

    #[test]
    fn an_instance_that_turns_slow_is_believed_within_a_fraction_of_a_second() {
        let load = Load::new(Duration::from_secs(2));
        let mut now = Instant::now();
        for _ in 0..500 {
            now += 2 * MS;
            load.observe(Duration::from_micros(200), now);
        }
        // A serial caller: ten 20 ms answers, 200 ms, put it past 3x the 1 ms floor that quick
        // ones count as, so it loses every comparison.
        for _ in 0..10 {
            now += 20 * MS;
            load.observe(20 * MS, now);
        }
        let estimate = load.estimate(now);
        assert!(estimate > 5 * MS, "{estimate:?}");
    }

    #[test]
    fn weighted_shares_hold_when_stalls_hit_whichever_endpoint_was_called() {
        // One caller pausing 2 ms between calls, answers in 200 µs but one in 1,000 stalled 20 ms
        // (a busy host's scheduler): the stalls land on whichever endpoint was called, twice as
        // often on the weight-200 one. Taking each stall whole gave it 0.44 of the calls.
        use crate::pick::{Candidate, Known, Policy, pick};
        let weights = [100, 100, 200];
        let loads: Vec<Load> = weights
            .iter()
            .map(|_| Load::new(Duration::from_secs(2)))
            .collect();
        let candidates: Vec<Candidate> = weights
            .iter()
            .map(|&weight| Candidate {
                weight,
                local: false,
                healthy: true,
                ejected: false,
            })
            .collect();
        let policy = Policy {
            panic_threshold: 0.5,
            zone_min_share: 0.5,
        };
        let known = Known { all: 3, local: 0 };
        let mut rng = fastrand::Rng::with_seed(11);
        let mut now = Instant::now();
        let mut counts = [0u32; 3];
        for _ in 0..20_000 {
            let cost = |i: usize| loads[i].cost(now);
            let picked = pick(&candidates, known, &policy, cost, &mut || rng.f64());
            let Some(picked) = picked else {
                panic!("three healthy candidates and no pick");
            };
            counts[picked.index] += 1;
            let rtt = if rng.u32(0..1_000) == 0 {
                20 * MS
            } else {
                Duration::from_micros(200)
            };
            now += rtt;
            loads[picked.index].observe(rtt, now);
            now += 2 * MS;
        }
        let share = f64::from(counts[2]) / 20_000.0;
        assert!((share - 0.5).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn without_answers_the_estimate_decays() {
        let load = Load::new(Duration::from_secs(2));
        let start = Instant::now();
        load.observe(20 * MS, start + Duration::from_secs(1));
        let later = load.estimate(start + Duration::from_secs(5));
        assert!(later < 3 * MS, "{later:?}");
    }
}
