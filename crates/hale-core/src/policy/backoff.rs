use crate::Rng;
use serde::{Deserialize, Serialize};

/// When to restart an agent that stopped: the first restart is immediate, later ones wait
/// a random time up to an exponentially growing bound ("full jitter", as in the AWS
/// architecture blog's comparison of backoff strategies), so agents that failed together
/// do not come back together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// The bound of the second restart's wait; each later restart doubles it.
    pub base_ms: u64,
    /// The bound never grows past this.
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base_ms: 100, max_ms: 30_000 }
    }
}

impl Backoff {
    /// The wait before restart number `attempt` (1 for the first restart since the agent
    /// last ran healthily): 0 for the first, then uniform in `0..=min(max, base·2^(n-2))`.
    pub fn delay_ms(&self, attempt: u32, rng: &mut Rng) -> u64 {
        if attempt <= 1 {
            return 0;
        }
        rng.up_to(self.bound_ms(attempt))
    }

    /// The upper bound of the wait before restart number `attempt`.
    pub fn bound_ms(&self, attempt: u32) -> u64 {
        if attempt <= 1 {
            return 0;
        }
        let doublings = (attempt - 2).min(63);
        self.base_ms.saturating_mul(1u64 << doublings).min(self.max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;
    use proptest::prelude::{prop_assert, prop_assert_eq, proptest};

    #[test]
    fn first_restart_is_immediate_then_bounds_double_up_to_the_cap() {
        let backoff = Backoff { base_ms: 100, max_ms: 1_000 };
        let bounds: Vec<u64> = (1..=7).map(|attempt| backoff.bound_ms(attempt)).collect();
        assert_eq!(bounds, [0, 100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(backoff.delay_ms(1, &mut Rng::new(3)), 0);
        assert_eq!(backoff.bound_ms(u32::MAX), 1_000);
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let backoff = Backoff { base_ms: 1_000, max_ms: 1_000 };
        let mut rng = Rng::new(42);
        let delays: Vec<u64> = (0..1_000).map(|_| backoff.delay_ms(2, &mut rng)).collect();
        let low = delays.iter().filter(|&&d| d < 250).count();
        let high = delays.iter().filter(|&&d| d >= 750).count();
        assert!(low > 150 && high > 150, "not spread: {low} below 250 ms, {high} from 750 ms");
    }

    proptest! {
        #[test]
        fn delays_stay_within_their_bound_and_replay_identically(seed: u64, attempt in 0u32..80, base in 0u64..10_000, max in 0u64..100_000) {
            let backoff = Backoff { base_ms: base, max_ms: max };
            let delay = backoff.delay_ms(attempt, &mut Rng::new(seed));
            prop_assert!(delay <= backoff.bound_ms(attempt));
            prop_assert!(delay <= max);
            prop_assert_eq!(delay, backoff.delay_ms(attempt, &mut Rng::new(seed)));
        }
    }
}
