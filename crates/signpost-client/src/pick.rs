//! Which endpoint takes a call: pure rules over the endpoints whose connection is up, so that
//! they can be tested without sockets.
//!
//! In order: (1) the *healthy* set is the connected endpoints that the registry calls healthy and
//! outlier detection has not ejected; (2) if it holds less than `panic_threshold` of every known
//! endpoint, the balancer panics and uses every connected endpoint instead, so that a wrong
//! health verdict or a wave of ejections cannot pile all calls onto the few left (a connection
//! that is down is never used: that is a fact, not a verdict); (3) a client that names its zone
//! keeps to the endpoints of that zone while they are at least `zone_min_share` of the zone's
//! known endpoints; (4) power of two choices: two endpoints drawn in proportion to their weight,
//! and the one with the lower load cost wins — unless the costs are within `TIE_FACTOR` of each
//! other, when the first draw wins, so that under even load the shares follow the weights.

/// Costs closer than this factor count as even: the weighted draw decides. Loopback latencies
/// of equal instances differ by 1.5x often enough to skew weighted shares by 10 points; an
/// instance that is really slower is slower by far more.
const TIE_FACTOR: f64 = 3.0;

/// What the picker knows of one connected endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub weight: u32,
    /// In the client's zone (always false when the client names none).
    pub local: bool,
    /// The registry calls it PASSING or WARNING.
    pub healthy: bool,
    pub ejected: bool,
}

/// The thresholds of the pick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub panic_threshold: f64,
    pub zone_min_share: f64,
}

/// Counts over every endpoint the channel knows, connected or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Known {
    pub all: usize,
    pub local: usize,
}

/// The outcome of a pick: the index into the candidates, and whether the balancer panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Picked {
    pub index: usize,
    pub panic: bool,
}

/// Picks one of `candidates`; `None` when there is none. `cost(i)` is candidate `i`'s load
/// cost (its latency estimate times its calls in flight plus one), asked only of the two drawn;
/// `random` returns a number in [0, 1).
pub fn pick(
    candidates: &[Candidate],
    known: Known,
    policy: &Policy,
    cost: impl Fn(usize) -> f64,
    random: &mut impl FnMut() -> f64,
) -> Option<Picked> {
    if candidates.is_empty() {
        return None;
    }
    let healthy: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].healthy && !candidates[i].ejected)
        .collect();
    // Panic only when it changes something: every connected endpoint is not already healthy.
    // Panic only when it changes something (not every connected endpoint is healthy), and a
    // threshold of 0 turns it off: then nothing unhealthy is ever picked.
    let panic = policy.panic_threshold > 0.0
        && healthy.len() < candidates.len()
        && ((healthy.len() as f64) < policy.panic_threshold * known.all as f64
            || healthy.is_empty());
    let mut set = if panic {
        (0..candidates.len()).collect()
    } else {
        healthy
    };
    if known.local > 0 {
        let local: Vec<usize> = set
            .iter()
            .copied()
            .filter(|&i| candidates[i].local)
            .collect();
        if !local.is_empty() && local.len() as f64 >= policy.zone_min_share * known.local as f64 {
            set = local;
        }
    }
    let index = power_of_two(candidates, &set, cost, random)?;
    Some(Picked { index, panic })
}

fn power_of_two(
    candidates: &[Candidate],
    set: &[usize],
    cost: impl Fn(usize) -> f64,
    random: &mut impl FnMut() -> f64,
) -> Option<usize> {
    let first = weighted(candidates, set, None, random)?;
    let Some(second) = weighted(candidates, set, Some(first), random) else {
        return Some(first);
    };
    let (a, b) = (cost(first), cost(second));
    Some(if b * TIE_FACTOR < a { second } else { first })
}

/// One of `set` (but `except`) drawn with probability proportional to its weight. A weight of 0
/// counts as 1: an instance registered with no weight still gets calls.
fn weighted(
    candidates: &[Candidate],
    set: &[usize],
    except: Option<usize>,
    random: &mut impl FnMut() -> f64,
) -> Option<usize> {
    let weight = |i: usize| u64::from(candidates[i].weight.max(1));
    let total: u64 = set
        .iter()
        .filter(|&&i| Some(i) != except)
        .map(|&i| weight(i))
        .sum();
    if total == 0 {
        return None;
    }
    let mut target = (random() * total as f64) as u64;
    for &i in set.iter().filter(|&&i| Some(i) != except) {
        let w = weight(i);
        if target < w {
            return Some(i);
        }
        target -= w;
    }
    set.iter().rev().copied().find(|&i| Some(i) != except)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A candidate and its cost.
    fn c(weight: u32, cost: f64) -> (Candidate, f64) {
        let candidate = Candidate {
            weight,
            local: false,
            healthy: true,
            ejected: false,
        };
        (candidate, cost)
    }

    fn pick_in(
        cands: &[(Candidate, f64)],
        known: Known,
        rng: &mut fastrand::Rng,
    ) -> Option<Picked> {
        let candidates: Vec<Candidate> = cands.iter().map(|(c, _)| *c).collect();
        pick(&candidates, known, &POLICY, |i| cands[i].1, &mut || {
            rng.f64()
        })
    }

    const POLICY: Policy = Policy {
        panic_threshold: 0.5,
        zone_min_share: 0.5,
    };

    fn shares(candidates: &[(Candidate, f64)], known: Known, n: usize) -> Vec<f64> {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = vec![0usize; candidates.len()];
        for _ in 0..n {
            let p = pick_in(candidates, known, &mut rng).unwrap();
            counts[p.index] += 1;
        }
        counts.iter().map(|&k| k as f64 / n as f64).collect()
    }

    fn known(all: usize) -> Known {
        Known { all, local: 0 }
    }

    #[test]
    fn even_load_follows_the_weights() {
        let s = shares(&[c(100, 1.0), c(100, 1.1), c(200, 0.9)], known(3), 20_000);
        assert!((s[0] - 0.25).abs() < 0.02, "{s:?}");
        assert!((s[1] - 0.25).abs() < 0.02, "{s:?}");
        assert!((s[2] - 0.50).abs() < 0.02, "{s:?}");
    }

    #[test]
    fn a_costly_endpoint_loses_every_comparison() {
        let s = shares(&[c(100, 1.0), c(100, 1.0), c(100, 40.0)], known(3), 10_000);
        assert_eq!(s[2], 0.0, "{s:?}");
    }

    #[test]
    fn unhealthy_and_ejected_endpoints_are_avoided_until_panic() {
        let mut cands = [c(100, 1.0), c(100, 1.0), c(100, 1.0), c(100, 1.0)];
        cands[0].0.ejected = true;
        cands[1].0.healthy = false;
        let s = shares(&cands, known(4), 5_000);
        assert_eq!((s[0], s[1]), (0.0, 0.0), "{s:?}");
        // One of four left healthy: below the threshold, spread over every connected one.
        cands[2].0.healthy = false;
        let mut rng = fastrand::Rng::with_seed(1);
        let p = pick_in(&cands, known(4), &mut rng).unwrap();
        assert!(p.panic);
        let s = shares(&cands, known(4), 8_000);
        assert!(s.iter().all(|&x| x > 0.2), "{s:?}");
    }

    #[test]
    fn unconnected_endpoints_count_towards_panic_but_are_never_picked() {
        // Two connected and healthy, two more known but down: 2/4 is not below one half.
        let cands = [c(100, 1.0), c(100, 1.0)];
        let mut rng = fastrand::Rng::with_seed(3);
        let p = pick_in(&cands, known(4), &mut rng).unwrap();
        assert!(!p.panic);
        assert!(pick_in(&[], known(4), &mut rng).is_none());
    }

    #[test]
    fn the_local_zone_is_preferred_while_enough_of_it_is_up() {
        let mut cands = [c(100, 1.0), c(100, 1.0), c(100, 1.0), c(100, 1.0)];
        cands[0].0.local = true;
        cands[1].0.local = true;
        let zoned = Known { all: 4, local: 2 };
        let s = shares(&cands, zoned, 5_000);
        assert_eq!(s[2] + s[3], 0.0, "{s:?}");
        // One of two local instances left (the other is not connected): 1/2 still enough.
        let s = shares(&cands[1..], zoned, 5_000);
        assert_eq!(s[0], 1.0, "{s:?}");
        // No local one connected: spill over.
        let s = shares(&cands[2..], zoned, 5_000);
        assert!(s[0] > 0.4 && s[1] > 0.4, "{s:?}");
        // Too few of the zone left: spread over every zone.
        let three_local = Known { all: 5, local: 3 };
        let s = shares(&cands[1..], three_local, 9_000);
        assert!(s.iter().all(|&x| x > 0.25), "{s:?}");
    }

    #[test]
    fn a_panic_threshold_of_zero_never_picks_an_unhealthy_endpoint() {
        let mut cands = [c(100, 1.0), c(100, 1.0)];
        cands[0].0.ejected = true;
        cands[1].0.healthy = false;
        let candidates: Vec<Candidate> = cands.iter().map(|(c, _)| *c).collect();
        let off = Policy {
            panic_threshold: 0.0,
            ..POLICY
        };
        assert!(pick(&candidates, known(2), &off, |_| 1.0, &mut || 0.3).is_none());
        assert!(pick(&candidates, known(2), &POLICY, |_| 1.0, &mut || 0.3).is_some());
    }

    #[test]
    fn zero_weights_still_get_calls() {
        let s = shares(&[c(0, 1.0), c(0, 1.0)], known(2), 4_000);
        assert!(s[0] > 0.4 && s[1] > 0.4, "{s:?}");
    }
}
