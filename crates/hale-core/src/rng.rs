//! A small seeded random number generator, the core's only source of randomness.
//!
//! SplitMix64 (Steele, Lea and Flood, 2014), written out here rather than taken from a
//! crate: its output for a seed must never change between hale versions, or a log would
//! replay differently after an upgrade, and a general-purpose crate promises no such thing.

use serde::{Deserialize, Serialize};

/// A deterministic generator: the same seed always gives the same sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniformly distributed number in `0..=max`, without modulo bias.
    pub fn up_to(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            return self.next_u64();
        }
        let span = max + 1;
        // Reject the top partial block of 2^64 so every value is equally likely.
        let zone = u64::MAX - (u64::MAX % span) - 1;
        loop {
            let draw = self.next_u64();
            if draw <= zone {
                return draw % span;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_for_a_seed_never_changes() {
        // Reference values of SplitMix64 for seed 1234567.
        let mut rng = Rng::new(1234567);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(first, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn up_to_stays_in_range_and_covers_it() {
        let mut rng = Rng::new(7);
        let mut seen = [0u32; 7];
        for _ in 0..7_000 {
            let value = rng.up_to(6);
            seen[value as usize] += 1;
        }
        assert!(seen.iter().all(|&count| (800..1200).contains(&count)), "{seen:?}");
        assert_eq!(Rng::new(1).up_to(0), 0);
    }
}
