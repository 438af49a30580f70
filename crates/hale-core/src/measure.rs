//! The resource and health-probe detectors: the shell measures (resident memory and CPU
//! time of a managed agent's process group, from /proc; the outcome of an HTTP probe), the
//! core decides. Thresholds and windows are applied here, with time as an argument, so the
//! simulation sees exactly what the live run does.
//!
//! Measurements are volatile, like heartbeats: a sample a second per agent is not logged.
//! What the detectors conclude is (`ReportDown` from `tick`, logged as `AgentDown` with a
//! `resource` or `health_probe` cause).

use crate::Timestamp;
use crate::supervision::Cause;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// The CPU window when hale.toml names none.
pub const CPU_WINDOW_MS_DEFAULT: u64 = 10_000;

/// What a managed agent may use before it is declared down (`[agent.resources]` and
/// `[agent.health]` of hale.toml). Logged with its supervision spec, so a replay decides
/// as the live run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Resident memory of the process group, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes_max: Option<u64>,
    /// CPU of the process group averaged over `cpu_window_ms`, in percent of one core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_percent_max: Option<u32>,
    /// The window CPU is averaged over; 0 for [`CPU_WINDOW_MS_DEFAULT`].
    #[serde(skip_serializing_if = "is_zero")]
    pub cpu_window_ms: u64,
    /// Failed health probes in a row that declare the agent down (none: not probed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_failures_max: Option<u32>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl Thresholds {
    /// No threshold is set: nothing to watch.
    pub fn is_unset(&self) -> bool {
        *self == Thresholds::default()
    }

    fn cpu_window_ms(&self) -> u64 {
        match self.cpu_window_ms {
            0 => CPU_WINDOW_MS_DEFAULT,
            ms => ms,
        }
    }
}

/// One reading the shell took of a managed agent's current run (sent to the leader by the
/// node that runs it, on a cluster).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measurement {
    /// Resident memory of its process group, and the CPU time the group has used so far.
    Usage { rss_bytes: u64, cpu_ms: u64 },
    /// One health probe: passed (`None`) or failed, saying how.
    Probe { failure: Option<String> },
}

/// The detectors' memory of one run. Volatile.
#[derive(Clone, Debug)]
pub(crate) struct Measured {
    pub(crate) incarnation: u64,
    /// CPU time readings `(when, cpu_ms)` spanning at least the window, oldest first.
    cpu: VecDeque<(Timestamp, u64)>,
    probe_failures: u32,
    /// What the detectors concluded, once: the run is down for this.
    pub(crate) verdict: Option<Cause>,
    /// The verdict was handed to `tick`'s caller.
    pub(crate) reported: bool,
}

impl Measured {
    pub(crate) fn new(incarnation: u64) -> Measured {
        Measured { incarnation, cpu: VecDeque::new(), probe_failures: 0, verdict: None, reported: false }
    }

    /// Takes in `measurement`, read at `now`, and concludes if a threshold is crossed:
    /// memory over its maximum at one reading; CPU over its maximum averaged over a whole
    /// window; `probe_failures_max` failed probes in a row.
    pub(crate) fn record(&mut self, now: Timestamp, measurement: Measurement, thresholds: &Thresholds) {
        if self.verdict.is_some() {
            return;
        }
        match measurement {
            Measurement::Usage { rss_bytes, cpu_ms } => {
                if let Some(limit) = thresholds.memory_bytes_max
                    && rss_bytes > limit
                {
                    self.verdict = Some(Cause::ResourceExceeded { resource: "memory".into(), value: rss_bytes, limit });
                    return;
                }
                let Some(limit) = thresholds.cpu_percent_max else { return };
                let window_ms = thresholds.cpu_window_ms();
                // A clock that stepped back restarts the window rather than dividing by a
                // negative span.
                if self.cpu.back().is_some_and(|(at, used)| *at > now || *used > cpu_ms) {
                    self.cpu.clear();
                }
                self.cpu.push_back((now, cpu_ms));
                while self.cpu.len() > 2 && now.0.saturating_sub(self.cpu[1].0.0) >= window_ms {
                    self.cpu.pop_front();
                }
                let (first_at, first_ms) = self.cpu[0];
                let span_ms = now.0.saturating_sub(first_at.0);
                if span_ms < window_ms {
                    return;
                }
                let percent = cpu_ms.saturating_sub(first_ms) * 100 / span_ms.max(1);
                if percent > u64::from(limit) {
                    self.verdict =
                        Some(Cause::ResourceExceeded { resource: "cpu".into(), value: percent, limit: limit.into() });
                }
            }
            Measurement::Probe { failure: None } => self.probe_failures = 0,
            Measurement::Probe { failure: Some(last) } => {
                self.probe_failures += 1;
                if thresholds.probe_failures_max.is_some_and(|max| self.probe_failures >= max) {
                    self.verdict = Some(Cause::HealthProbe { failures: self.probe_failures, last });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn usage(rss_mb: u64, cpu_ms: u64) -> Measurement {
        Measurement::Usage { rss_bytes: rss_mb * MIB, cpu_ms }
    }

    #[test]
    fn memory_over_its_maximum_is_a_verdict_at_once_and_at_the_maximum_is_not() {
        let thresholds = Thresholds { memory_bytes_max: Some(100 * MIB), ..Thresholds::default() };
        let mut measured = Measured::new(1);
        measured.record(Timestamp(1_000), usage(100, 0), &thresholds);
        assert_eq!(measured.verdict, None);
        measured.record(Timestamp(2_000), usage(101, 0), &thresholds);
        assert_eq!(
            measured.verdict,
            Some(Cause::ResourceExceeded { resource: "memory".into(), value: 101 * MIB, limit: 100 * MIB })
        );
    }

    #[test]
    fn cpu_is_judged_over_a_whole_window_only() {
        let thresholds = Thresholds { cpu_percent_max: Some(50), cpu_window_ms: 10_000, ..Thresholds::default() };
        let mut measured = Measured::new(1);
        // A full core for 9 s: not yet a whole window.
        for second in 0..=9 {
            measured.record(Timestamp(second * 1_000), usage(1, second * 1_000), &thresholds);
        }
        assert_eq!(measured.verdict, None);
        measured.record(Timestamp(10_000), usage(1, 10_000), &thresholds);
        assert_eq!(measured.verdict, Some(Cause::ResourceExceeded { resource: "cpu".into(), value: 100, limit: 50 }));
    }

    #[test]
    fn a_burst_shorter_than_the_window_averages_out() {
        let thresholds = Thresholds { cpu_percent_max: Some(50), cpu_window_ms: 10_000, ..Thresholds::default() };
        let mut measured = Measured::new(1);
        // 3 s of a full core, then idle: 30% over any 10 s window.
        let mut used = 0;
        for second in 0..=30 {
            if (10..13).contains(&second) {
                used += 1_000;
            }
            measured.record(Timestamp(second * 1_000), usage(1, used), &thresholds);
        }
        assert_eq!(measured.verdict, None);
    }

    #[test]
    fn a_clock_stepping_back_restarts_the_window_instead_of_judging() {
        let thresholds = Thresholds { cpu_percent_max: Some(50), ..Thresholds::default() };
        let mut measured = Measured::new(1);
        measured.record(Timestamp(20_000), usage(1, 0), &thresholds);
        measured.record(Timestamp(5_000), usage(1, 100), &thresholds);
        measured.record(Timestamp(15_000), usage(1, 200), &thresholds);
        assert_eq!(measured.verdict, None, "10 s at 1% is well under 50%");
    }

    #[test]
    fn probes_count_failures_in_a_row_and_a_pass_resets_them() {
        let thresholds = Thresholds { probe_failures_max: Some(3), ..Thresholds::default() };
        let mut measured = Measured::new(1);
        let fail = |why: &str| Measurement::Probe { failure: Some(why.into()) };
        measured.record(Timestamp(1), fail("HTTP 500"), &thresholds);
        measured.record(Timestamp(2), fail("HTTP 500"), &thresholds);
        measured.record(Timestamp(3), Measurement::Probe { failure: None }, &thresholds);
        measured.record(Timestamp(4), fail("HTTP 500"), &thresholds);
        measured.record(Timestamp(5), fail("timed out"), &thresholds);
        assert_eq!(measured.verdict, None);
        measured.record(Timestamp(6), fail("connection refused"), &thresholds);
        assert_eq!(measured.verdict, Some(Cause::HealthProbe { failures: 3, last: "connection refused".into() }));
    }
}
