use crate::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Settings of the phi-accrual failure detector (Hayashibara et al., 2004).
///
/// phi is `-log10(P(a heartbeat arrives later than now))`, with inter-arrival times taken
/// as normally distributed with the mean and deviation of the recent window (the logistic
/// approximation Akka uses). phi 1 means a 10% chance the agent is merely late, phi 8 one in
/// a hundred million.
///
/// Defaults, against the two detectors this follows:
/// - `threshold` 8: Akka Cluster's default and Cassandra's `phi_convict_threshold`.
/// - `window` 1,000 intervals: Akka's `max-sample-size`; Cassandra also keeps 1,000.
/// - `min_std_deviation_ms` 100: Akka's; without a floor, a perfectly regular agent would
///   be declared down by the first slightly late beat.
/// - `acceptable_pause_ms` 1,000: Akka uses 3 s for cluster nodes whose GC pauses are
///   routine; agents beat every second and hale's target is detection within 3 s, so one
///   missed beat is tolerated. With 1 s beats jittered ±200 ms, `down` then comes about
///   2.6 s after the last beat, and a beat 1.2 s late still scores phi < 1.
/// - `suspect_threshold` 1: suspicion only stops new work being routed to the agent, so it
///   may come early.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhiConfig {
    pub threshold: f64,
    pub suspect_threshold: f64,
    pub window: usize,
    pub min_std_deviation_ms: u64,
    pub acceptable_pause_ms: u64,
    /// The expected interval before any has been seen (the agent's heartbeat interval).
    pub first_interval_ms: u64,
}

impl Default for PhiConfig {
    fn default() -> Self {
        PhiConfig {
            threshold: 8.0,
            suspect_threshold: 1.0,
            window: 1_000,
            min_std_deviation_ms: 100,
            acceptable_pause_ms: 1_000,
            first_interval_ms: 1_000,
        }
    }
}

/// The heartbeat history of one agent. Volatile: it lives in memory, never in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhiDetector {
    intervals: VecDeque<u64>,
    /// Exact running sums of the intervals and their squares.
    sum: u64,
    sum_squares: u128,
    last: Option<Timestamp>,
}

impl PhiDetector {
    /// A detector seeded, as Akka's is, with two intervals around the expected one
    /// (deviation a quarter of it), so the first beats are judged sensibly.
    pub fn new(config: &PhiConfig) -> PhiDetector {
        let mut detector = PhiDetector { intervals: VecDeque::new(), sum: 0, sum_squares: 0, last: None };
        let expected = config.first_interval_ms;
        detector.record(expected - expected / 4, config);
        detector.record(expected + expected / 4, config);
        detector
    }

    /// A heartbeat arrived at `now`.
    pub fn heartbeat(&mut self, now: Timestamp, config: &PhiConfig) {
        if let Some(last) = self.last {
            self.record(now.0.saturating_sub(last.0), config);
        }
        self.last = Some(now);
    }

    /// The suspicion level at `now`; 0 before the first heartbeat.
    pub fn phi(&self, now: Timestamp, config: &PhiConfig) -> f64 {
        let Some(last) = self.last else { return 0.0 };
        let elapsed = now.0.saturating_sub(last.0) as f64;
        let count = self.intervals.len() as f64;
        let mean = self.sum as f64 / count;
        let variance = (self.sum_squares as f64 / count - mean * mean).max(0.0);
        let deviation = variance.sqrt().max(config.min_std_deviation_ms as f64);
        let expected = mean + config.acceptable_pause_ms as f64;
        let y = (elapsed - expected) / deviation;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        if elapsed > expected { -(e / (1.0 + e)).log10() } else { -(1.0 - 1.0 / (1.0 + e)).log10() }
    }

    /// Whether the silence at `now` is still within the expected interval (mean plus the
    /// acceptable pause): phi is then below log10(2) ≈ 0.3, under any sensible threshold.
    /// A cheap test (no `exp`, no `log`) for the tick, which looks at every watched run.
    pub fn within_expected(&self, now: Timestamp, config: &PhiConfig) -> bool {
        let Some(last) = self.last else { return true };
        let count = self.intervals.len() as u64;
        if count == 0 {
            return false;
        }
        let expected = self.sum / count + config.acceptable_pause_ms;
        now.0.saturating_sub(last.0) < expected
    }

    /// Whether phi at `now` has reached the suspicion threshold.
    pub fn is_suspect(&self, now: Timestamp, config: &PhiConfig) -> bool {
        self.phi(now, config) >= config.suspect_threshold
    }

    /// Whether phi at `now` has reached the threshold for `down`.
    pub fn is_down(&self, now: Timestamp, config: &PhiConfig) -> bool {
        self.phi(now, config) >= config.threshold
    }

    fn record(&mut self, interval: u64, config: &PhiConfig) {
        self.intervals.push_back(interval);
        self.sum += interval;
        self.sum_squares += u128::from(interval) * u128::from(interval);
        while self.intervals.len() > config.window.max(2) {
            let dropped = self.intervals.pop_front().expect("not empty");
            self.sum -= dropped;
            self.sum_squares -= u128::from(dropped) * u128::from(dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    /// Beats every second with uniform ±`jitter_ms`, from a seed; returns the detector and
    /// the time of the last beat.
    fn beating(config: &PhiConfig, beats: u64, jitter_ms: u64, seed: u64) -> (PhiDetector, Timestamp) {
        let mut rng = Rng::new(seed);
        let mut detector = PhiDetector::new(config);
        let mut now = 0u64;
        for _ in 0..beats {
            now += 1_000 - jitter_ms + rng.up_to(2 * jitter_ms);
            detector.heartbeat(Timestamp(now), config);
        }
        (detector, Timestamp(now))
    }

    #[test]
    fn no_heartbeat_yet_means_no_suspicion() {
        let config = PhiConfig::default();
        assert_eq!(PhiDetector::new(&config).phi(Timestamp(1_000_000), &config), 0.0);
    }

    #[test]
    fn within_expected_means_phi_is_below_every_sensible_threshold() {
        let config = PhiConfig::default();
        for seed in 0..20 {
            let (detector, last) = beating(&config, 60, 200, seed);
            for silence in (0..5_000).step_by(7) {
                let now = Timestamp(last.0 + silence);
                if detector.within_expected(now, &config) {
                    let phi = detector.phi(now, &config);
                    assert!(phi < std::f64::consts::LOG10_2, "seed {seed}, {silence} ms: phi {phi}");
                }
            }
            // And it stops being within once the silence is long: the tick then computes phi.
            assert!(!detector.within_expected(Timestamp(last.0 + 3_000), &config));
        }
    }

    #[test]
    fn phi_grows_with_silence() {
        let config = PhiConfig::default();
        let (detector, last) = beating(&config, 60, 200, 1);
        let phis: Vec<f64> = (0..=6).map(|s| detector.phi(Timestamp(last.0 + s * 500), &config)).collect();
        assert!(phis.windows(2).all(|pair| pair[0] <= pair[1]), "{phis:?}");
    }

    #[test]
    fn a_silent_agent_is_down_within_three_seconds_and_suspect_before() {
        let config = PhiConfig::default();
        for seed in 0..50 {
            let (detector, last) = beating(&config, 60, 200, seed);
            let down_after = (0..10_000).find(|ms| detector.is_down(Timestamp(last.0 + ms), &config)).unwrap();
            let suspect_after = (0..10_000).find(|ms| detector.is_suspect(Timestamp(last.0 + ms), &config)).unwrap();
            assert!(down_after <= 3_000, "seed {seed}: down only after {down_after} ms of silence");
            assert!(suspect_after < down_after, "seed {seed}");
            assert!(suspect_after > 1_200, "seed {seed}: suspect after {suspect_after} ms, inside normal jitter");
        }
    }

    #[test]
    fn jittered_beats_never_look_down() {
        let config = PhiConfig::default();
        let mut rng = Rng::new(99);
        let mut detector = PhiDetector::new(&config);
        let mut now = 0u64;
        for _ in 0..10_000 {
            let next = now + 800 + rng.up_to(400);
            // Look just before each beat lands: the worst moment.
            assert!(!detector.is_down(Timestamp(next - 1), &config), "false down at {next}");
            now = next;
            detector.heartbeat(Timestamp(now), &config);
        }
    }

    #[test]
    fn the_window_is_bounded() {
        let config = PhiConfig { window: 10, ..PhiConfig::default() };
        let (detector, _) = beating(&config, 1_000, 0, 5);
        assert_eq!(detector.intervals.len(), 10);
        assert_eq!(detector.sum, 10_000);
    }
}
