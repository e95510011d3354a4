//! The retry budget: retries of requests that reached an instance may add at most a share of
//! the requests themselves (plus a small floor per second), as Finagle's and linkerd's budgets
//! do, so that when a service fails as a whole the gateway does not multiply its load.
//!
//! A token bucket: each request deposits `ratio` of a token, each second deposits `per_second`
//! more, and a retry takes one. The bucket holds at most what ten seconds bring at the floor
//! rate plus a hundred tokens, so that a quiet spell cannot save up a storm.

use std::sync::Mutex;

use tokio::time::Instant;

/// How much retrying a budget allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetPolicy {
    /// Retries per request, on average (0.2: one retry for every five requests).
    pub ratio: f64,
    /// Retries per second allowed whatever the traffic, so that a quiet service still retries.
    pub per_second: f64,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        BudgetPolicy {
            ratio: 0.2,
            per_second: 10.0,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// One target's budget.
#[derive(Debug)]
pub(crate) struct Budget {
    policy: BudgetPolicy,
    bucket: Mutex<Bucket>,
}

impl Budget {
    pub(crate) fn new(policy: BudgetPolicy) -> Budget {
        Budget {
            policy,
            bucket: Mutex::new(Bucket {
                tokens: policy.per_second,
                refilled: Instant::now(),
            }),
        }
    }

    fn cap(&self) -> f64 {
        self.policy.per_second * 10.0 + 100.0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.policy.per_second).min(self.cap());
        bucket.refilled = now;
    }

    /// A request arrived.
    pub(crate) fn deposit(&self) {
        let now = Instant::now();
        let mut bucket = self.lock();
        self.refill(&mut bucket, now);
        bucket.tokens = (bucket.tokens + self.policy.ratio).min(self.cap());
    }

    /// Whether one retry may go; takes its token if so.
    pub(crate) fn withdraw(&self) -> bool {
        let now = Instant::now();
        let mut bucket = self.lock();
        self.refill(&mut bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_by_a_share_of_the_requests() {
        let budget = Budget::new(BudgetPolicy {
            ratio: 0.2,
            per_second: 0.0,
        });
        for _ in 0..1000 {
            budget.deposit();
        }
        // A thousand requests bring at most 100 tokens (the cap) and at least 100 (0.2 each).
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 100);
        // Five more requests: one more retry.
        for _ in 0..5 {
            budget.deposit();
        }
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_service_still_retries_at_the_floor_rate() {
        let budget = Budget::new(BudgetPolicy {
            ratio: 0.0,
            per_second: 2.0,
        });
        while budget.withdraw() {}
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(budget.withdraw());
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
        // Saving up is capped.
        tokio::time::advance(std::time::Duration::from_secs(3600)).await;
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 120);
    }
}
