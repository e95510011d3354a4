//! The one retry schedule and the one jitter source of every Signpost crate: the client's
//! reconnect loops, the server's health checker and watch streams, the store's etcd follower
//! and member failover all wait by these, so that a crowd of them that failed together does not
//! come back together.
//!
//! Randomness is [fastrand](https://docs.rs/fastrand)'s (already the client's, for its power of
//! two choices): jitter needs spread, not secrecy.

use std::time::Duration;

/// A random fraction in [0, 1): how far into an interval something starts.
pub fn jitter() -> f64 {
    fastrand::f64()
}

/// `interval` shortened by up to a quarter, differently each time: so that things that fell due
/// together (streams idle since the same moment) spread out over the next interval.
pub fn spread(interval: Duration) -> Duration {
    interval - (interval / 4).mul_f64(jitter())
}

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
        half + half.mul_f64(jitter())
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
    fn a_spread_interval_is_three_quarters_to_all_of_it_and_varies() {
        let interval = Duration::from_secs(4);
        let spread: Vec<Duration> = (0..100).map(|_| spread(interval)).collect();
        assert!(
            spread
                .iter()
                .all(|d| *d >= Duration::from_secs(3) && *d <= interval)
        );
        let distinct: std::collections::BTreeSet<&Duration> = spread.iter().collect();
        assert!(distinct.len() > 50, "{} distinct of 100", distinct.len());
    }

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
