//! Passive outlier detection: an endpoint whose calls keep failing with `UNAVAILABLE` or a
//! broken connection is taken out of the pick for a while, longer each time it comes back and
//! fails again, as Envoy's outlier detection does. Pure state, driven by the balancer.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// When an endpoint is ejected, and for how long. Set with
/// [`BalancedChannelBuilder::outlier_detection`](crate::BalancedChannelBuilder::outlier_detection).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierDetection {
    /// Failed calls in a row (`UNAVAILABLE`, or the connection broke under the call) that
    /// eject an endpoint. Default 5, as Envoy's `consecutive_5xx`. 0 turns ejection off.
    pub consecutive_failures: u32,
    /// The first ejection lasts this long; the n-th in a row lasts n times as long. Default 30 s.
    pub base_ejection: Duration,
    /// No ejection lasts longer than this. Default 300 s.
    pub max_ejection: Duration,
    /// The largest share of a channel's endpoints that may be ejected at once; one endpoint may
    /// always be. Default 0.5: outlier detection never takes out most of a service on its own
    /// judgement (Envoy's default is 10 %, which for a typical three-instance service also means
    /// one).
    pub max_ejected_share: f64,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_share: 0.5,
        }
    }
}

/// One endpoint's record.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive: u32,
    /// Ejections since the endpoint last stayed healthy for a whole `max_ejection`.
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Outlier {
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }

    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        self.ejected_until.filter(|until| *until > now)
    }

    pub fn success(&mut self) {
        self.consecutive = 0;
    }

    /// Records a failure; true when it should eject the endpoint now. The caller decides
    /// whether the share allows it, and calls [`Outlier::eject`] if so.
    pub fn failure(&mut self, policy: &OutlierDetection, now: Instant) -> bool {
        if self.is_ejected(now) {
            return false;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        policy.consecutive_failures > 0 && self.consecutive >= policy.consecutive_failures
    }

    /// Ejects the endpoint and says until when; `None` when it already is (two failures that
    /// crossed the threshold at once eject it once).
    pub fn eject(&mut self, policy: &OutlierDetection, now: Instant) -> Option<Instant> {
        if self.is_ejected(now) {
            return None;
        }
        // An endpoint that stayed out of trouble for a whole max ejection starts afresh.
        if let Some(last) = self.ejected_until
            && now.saturating_duration_since(last) > policy.max_ejection
        {
            self.ejections = 0;
        }
        self.ejections = self.ejections.saturating_add(1);
        let length = policy
            .base_ejection
            .saturating_mul(self.ejections)
            .min(policy.max_ejection);
        // A setting too large for the clock means "for good".
        let until = now
            .checked_add(length)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600));
        self.ejected_until = Some(until);
        self.consecutive = 0;
        Some(until)
    }
}

/// Records an answer on `own`, one of the records of a set (`all`, `own` among them). A
/// failure that crosses the threshold ejects `own` if the ejected share allows it; the answer
/// is when that ejection ends. No two records' locks are ever held at once.
pub fn record<'a>(
    policy: &OutlierDetection,
    own: &Mutex<Outlier>,
    all: impl IntoIterator<Item = &'a Mutex<Outlier>>,
    failed: bool,
    now: Instant,
) -> Option<Instant> {
    let lock = |m: &'a Mutex<Outlier>| m.lock().unwrap_or_else(|p| p.into_inner());
    let own_lock = || own.lock().unwrap_or_else(|p| p.into_inner());
    if !failed {
        own_lock().success();
        return None;
    }
    if !own_lock().failure(policy, now) {
        return None;
    }
    let (mut total, mut ejected) = (0, 0);
    for record in all {
        total += 1;
        if lock(record).is_ejected(now) {
            ejected += 1;
        }
    }
    if may_eject(policy, ejected, total) {
        own_lock().eject(policy, now)
    } else {
        None
    }
}

/// Whether one more ejection keeps the ejected share within the policy.
pub fn may_eject(policy: &OutlierDetection, ejected: usize, total: usize) -> bool {
    ejected == 0 || ((ejected + 1) as f64) <= policy.max_ejected_share * total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_for_longer_each_time() {
        let policy = OutlierDetection::default();
        let now = Instant::now();
        let mut o = Outlier::default();
        for _ in 0..4 {
            assert!(!o.failure(&policy, now));
        }
        o.success();
        for _ in 0..4 {
            assert!(!o.failure(&policy, now), "a success resets the count");
        }
        assert!(o.failure(&policy, now));
        assert_eq!(o.eject(&policy, now), Some(now + Duration::from_secs(30)));
        assert_eq!(o.eject(&policy, now), None, "already ejected");
        assert!(o.is_ejected(now + Duration::from_secs(29)));
        assert!(
            !o.failure(&policy, now),
            "an ejected endpoint is not counted"
        );

        let back = now + Duration::from_secs(31);
        assert!(!o.is_ejected(back));
        for _ in 0..4 {
            assert!(!o.failure(&policy, back));
        }
        assert!(o.failure(&policy, back));
        assert_eq!(o.eject(&policy, back), Some(back + Duration::from_secs(60)));

        // Each time it is back and ejected again, longer, up to the maximum.
        let mut at = back;
        let mut lengths = Vec::new();
        for _ in 0..12 {
            let until = o.ejected_until.unwrap_or(at);
            at = until + Duration::from_secs(1);
            let next = o.eject(&policy, at).unwrap_or(at);
            lengths.push((next - at).as_secs());
        }
        assert_eq!(&lengths[..3], [90, 120, 150]);
        assert!(lengths.iter().all(|&l| l <= 300), "{lengths:?}");
        assert_eq!(lengths.last(), Some(&300));
    }

    #[test]
    fn a_quiet_endpoint_starts_afresh() {
        let policy = OutlierDetection::default();
        let now = Instant::now();
        let mut o = Outlier::default();
        o.eject(&policy, now);
        let much_later = now + Duration::from_secs(30 + 301);
        assert_eq!(
            o.eject(&policy, much_later),
            Some(much_later + Duration::from_secs(30))
        );
    }

    #[test]
    fn the_ejected_share_is_bounded_but_one_may_always_go() {
        let policy = OutlierDetection::default();
        assert!(may_eject(&policy, 0, 1));
        assert!(may_eject(&policy, 0, 3));
        assert!(!may_eject(&policy, 1, 3));
        assert!(may_eject(&policy, 1, 4));
        assert!(!may_eject(&policy, 2, 4));
        let off = OutlierDetection {
            consecutive_failures: 0,
            ..policy
        };
        let mut o = Outlier::default();
        for _ in 0..100 {
            assert!(!o.failure(&off, Instant::now()));
        }
    }
}
