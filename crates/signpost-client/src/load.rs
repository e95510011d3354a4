//! An endpoint's load, the signal of the power-of-two-choices pick: calls in flight times a
//! peak-EWMA latency estimate. Shared by the balanced channel's endpoints and by any other
//! balancer over Signpost (the gateway's HTTP pools), so both weigh load the same way.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Peak-EWMA latency, as in Finagle and linkerd: a slower sample is taken at once, a faster one
/// blends in, and without samples the estimate decays towards zero so that an endpoint that was
/// slow once is tried again.
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
        if rtt > ewma.nanos {
            ewma.nanos = rtt;
        } else {
            let elapsed = now.saturating_duration_since(ewma.stamp).as_nanos() as f64;
            let keep = (-elapsed / self.decay_nanos).exp();
            ewma.nanos = ewma.nanos * keep + rtt * (1.0 - keep);
        }
        ewma.stamp = now;
    }

    /// A new connection starts with a fresh estimate: the old one described another process.
    pub fn reset(&self) {
        let mut ewma = self.lock();
        ewma.nanos = DEFAULT_RTT.as_nanos() as f64;
        ewma.stamp = Instant::now();
    }
}
