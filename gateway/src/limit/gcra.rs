//! GCRA, the generic cell rate algorithm (ITU-T I.371; the "virtual scheduling" form): one
//! number per key, the theoretical arrival time (TAT) of the next cell. A rate of `n` per `w` is
//! an emission interval `T = w / n`; a burst `b` lets `b` cells arrive at once (tolerance
//! `τ = T·(b − 1)`). A cell at `now` is admitted when `max(TAT, now) ≤ now + τ`, and then
//! `TAT = max(TAT, now) + T`. Pure arithmetic on microseconds and an injected clock, so the local
//! limiter and the Redis script (which runs the same steps on Redis' `TIME`) are tested here.

use std::time::Duration;

/// One policy's parameters, in microseconds (exact: Lua's doubles hold integers below 2^53,
/// about 285 years of microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval `T`.
    pub interval_us: u64,
    /// Tolerance `τ = T·(burst − 1)`.
    pub tolerance_us: u64,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted: the new TAT to store, and how many more cells would be admitted now.
    Allow { tat: u64, remaining: u64 },
    /// Refused (nothing consumed): a retry this many microseconds later is admitted.
    Deny { retry_after_us: u64 },
}

impl Gcra {
    /// `count` cells per `per`, bursts of `burst`. `None` for a zero rate, a zero burst, or an
    /// interval under 1 µs or beyond 2^53 µs (rates Weir cannot keep exactly).
    pub fn new(count: u64, per: Duration, burst: u64) -> Option<Gcra> {
        if count == 0 || burst == 0 {
            return None;
        }
        let per_us = u64::try_from(per.as_micros()).ok()?;
        let interval_us = per_us / count;
        let tolerance_us = interval_us.checked_mul(burst - 1)?;
        let limit = 1u64 << 53;
        (interval_us >= 1 && interval_us < limit && tolerance_us < limit).then_some(Gcra { interval_us, tolerance_us })
    }

    /// Checks one cell at `now_us` against the stored `tat` (0 for a key never seen).
    pub fn check(&self, tat: u64, now_us: u64) -> Decision {
        let start = tat.max(now_us);
        let horizon = now_us.saturating_add(self.tolerance_us);
        if start > horizon {
            return Decision::Deny { retry_after_us: start - horizon };
        }
        let tat = start.saturating_add(self.interval_us);
        // Further cells admitted at this instant: k with tat + (k − 1)·T ≤ now + τ.
        let remaining = if tat <= horizon { (horizon - tat) / self.interval_us + 1 } else { 0 };
        Decision::Allow { tat, remaining }
    }

    /// Microseconds until a key at `tat` is back to its full burst (`RateLimit` `t=`).
    pub fn reset_after_us(&self, tat: u64, now_us: u64) -> u64 {
        tat.saturating_sub(now_us)
    }

    /// How long a stored TAT matters: past `tat` the key is as good as new, so it may expire.
    pub fn ttl_us(&self, tat: u64, now_us: u64) -> u64 {
        self.reset_after_us(tat, now_us).max(1)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const S: u64 = 1_000_000;

    /// Runs `n` checks at `now`, storing each admitted TAT; the decisions.
    fn burst_at(g: &Gcra, tat: &mut u64, now: u64, n: usize) -> Vec<Decision> {
        (0..n)
            .map(|_| {
                let d = g.check(*tat, now);
                if let Decision::Allow { tat: t, .. } = d {
                    *tat = t;
                }
                d
            })
            .collect()
    }

    #[test]
    fn a_burst_is_admitted_at_once_then_one_cell_per_interval() {
        // 1 per hour, burst 10: ten now, the eleventh an hour later, not before.
        let g = Gcra::new(1, Duration::from_secs(3600), 10).unwrap();
        let mut tat = 0;
        let now = 1_000 * S;
        let d = burst_at(&g, &mut tat, now, 11);
        let remaining: Vec<u64> = d[..10]
            .iter()
            .map(|d| match d {
                Decision::Allow { remaining, .. } => *remaining,
                Decision::Deny { .. } => panic!("refused inside the burst"),
            })
            .collect();
        assert_eq!(remaining, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]);
        assert_eq!(d[10], Decision::Deny { retry_after_us: 3600 * S });
        // Denials consume nothing: the same answer a minute later, minus the minute.
        assert_eq!(g.check(tat, now + 60 * S), Decision::Deny { retry_after_us: 3540 * S });
        // The advertised retry time is honest: one microsecond early is refused, on time admitted.
        assert!(matches!(g.check(tat, now + 3600 * S - 1), Decision::Deny { retry_after_us: 1 }));
        assert!(matches!(g.check(tat, now + 3600 * S), Decision::Allow { remaining: 0, .. }));
        assert_eq!(g.reset_after_us(tat, now), 36_000 * S);
    }

    #[test]
    fn a_steady_rate_at_the_limit_is_always_admitted() {
        let g = Gcra::new(20, Duration::from_secs(1), 40).unwrap();
        assert_eq!(g.interval_us, 50_000);
        let mut tat = 0;
        for i in 0..10_000u64 {
            let d = g.check(tat, 5 * S + i * 50_000);
            let Decision::Allow { tat: t, .. } = d else { panic!("cell {i} refused at the exact rate") };
            tat = t;
        }
        // Twice the rate for long enough exhausts the burst, then admits every other cell.
        let start = 5 * S + 10_000 * 50_000;
        let admitted = (0..200u64).filter(|i| {
            let d = g.check(tat, start + i * 25_000);
            if let Decision::Allow { tat: t, .. } = d {
                tat = t;
                true
            } else {
                false
            }
        });
        let n = admitted.count();
        assert!((100 + 39..=100 + 41).contains(&n), "{n} of 200 cells at twice the rate");
    }

    #[test]
    fn rates_it_cannot_keep_exactly_are_refused() {
        assert!(Gcra::new(0, Duration::from_secs(1), 1).is_none());
        assert!(Gcra::new(1, Duration::from_secs(1), 0).is_none());
        assert!(Gcra::new(2_000_000, Duration::from_secs(1), 1).is_none(), "interval under 1 µs");
        assert!(Gcra::new(1, Duration::from_secs(300 * 365 * 86_400), 1).is_none(), "beyond 2^53 µs");
        assert!(Gcra::new(10_000, Duration::from_secs(86_400), 10_000).is_some());
    }
}
