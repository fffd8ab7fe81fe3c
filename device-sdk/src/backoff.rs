//! Reconnect delays: exponential backoff with full jitter, bounded — the delay before
//! attempt `n` is uniform in `[0, min(max, base × 2ⁿ)]`, so a fleet that lost its hub
//! does not come back in lockstep.

use std::time::Duration;

use rand::Rng;

/// A backoff schedule.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at `base`, capped at `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The cap of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay, drawn from `rng`; advances the schedule.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// Back to the first delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn delays_grow_exponentially_stay_jittered_and_bounded() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut rng = StdRng::seed_from_u64(7);
        let ceilings: Vec<u64> = (0..10)
            .map(|_| {
                let ceiling = backoff.ceiling();
                let delay = backoff.next_delay(&mut rng);
                assert!(delay <= ceiling);
                ceiling.as_millis() as u64
            })
            .collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_spreads_a_fleet() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay(&mut rng)
            })
            .collect();
        let below_half = delays
            .iter()
            .filter(|d| **d < Duration::from_millis(500))
            .count();
        assert!(
            (350..650).contains(&below_half),
            "{below_half} of 1000 below half"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_loop_waits_the_schedule_in_paused_time() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut rng = StdRng::seed_from_u64(3);
        let start = tokio::time::Instant::now();
        let mut bound = Duration::ZERO;
        for _ in 0..5 {
            bound += backoff.ceiling();
            tokio::time::sleep(backoff.next_delay(&mut rng)).await;
        }
        let waited = start.elapsed();
        assert!(waited <= bound, "{waited:?} > {bound:?}");
    }
}
