//! Exponential backoff with jitter, capped: the one retry schedule of every reconnect loop.

use std::time::Duration;

/// Retry delays: each attempt waits between half and all of a doubling ceiling, capped at `max`.
/// The random half spreads a crowd of clients that lost the registry at the same moment.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // Half fixed, half random: never a zero wait, still spread out.
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Call after a success, so the next failure starts small again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        for (n, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(100 * (1 << n)).min(Duration::from_secs(2));
            assert!(
                *d >= ceiling / 2 && *d <= ceiling,
                "attempt {n}: {d:?} vs ceiling {ceiling:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
        let distinct: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay())
            .collect();
        assert!(distinct.len() > 10, "jitter spreads clients out");
    }
}
