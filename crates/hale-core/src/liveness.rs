//! Volatile liveness: heartbeats, the phi-accrual detector, suspicion, stalls.
//!
//! None of this is logged beat by beat. The table is rebuilt from nothing after a restart
//! of hale: agents that were heartbeating before get a grace period to reconnect (see
//! [`Core::begin_grace`](crate::Core::begin_grace)). What is durable is what the detectors
//! conclude (an `AgentDown` event with its cause) and progress, logged at a bounded rate.

use crate::Timestamp;
use crate::health::{BreakerPolicy, QuarantinePolicy};
use crate::policy::{PhiConfig, PhiDetector};
use crate::supervision::StallPolicy;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The largest progress report accepted, in bytes of JSON.
pub const PROGRESS_BYTES_MAX: usize = 8 * 1024;
/// The longest call a run may declare with `busy_ms` (a day); a longer one counts as a day.
pub const BUSY_MS_MAX: u64 = 24 * 60 * 60 * 1000;

/// What an agent says about its work with each heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Progress {
    /// How far along, from 0 to 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The task being worked on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Anything else the agent wants to show.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub fields: Map<String, Value>,
}

/// Whether the detector trusts an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Beats arrive as expected.
    Alive,
    /// phi crossed the suspect threshold: no new work goes to it, and it was challenged.
    Suspect,
    /// hale restarted and the agent has not beaten since; it has until the grace ends.
    Reconnecting,
}

/// The heartbeat side of one agent's current incarnation.
#[derive(Clone, Debug)]
pub struct Liveness {
    pub incarnation: u64,
    pub health: Health,
    /// The last heartbeat (or, in grace, when the grace began).
    pub last_beat: Timestamp,
    /// The latest progress reported.
    pub progress: Option<Progress>,
    /// Heartbeats in a row with no sign of work since the one before, while the run holds
    /// a task's lease (a run that holds none is idle, and waiting is not stalling).
    pub unchanged_beats: u32,
    /// The last sign of work: a checkpoint, a step, a lease taken or given back, changed
    /// progress; or a beat while idle or in a declared long call (or the first beat).
    pub last_activity: Timestamp,
    /// Until when the run said it is in a long call (a heartbeat's `busy_ms`): the stall
    /// detectors do not count until then.
    pub busy_until: Option<Timestamp>,
    pub(crate) detector: PhiDetector,
    pub(crate) config: PhiConfig,
    pub(crate) stall: StallPolicy,
    /// `progress` differs from what was last logged.
    pub(crate) progress_unlogged: bool,
    pub(crate) progress_logged_at: Option<Timestamp>,
    /// Set while waiting for the first beat after a hale restart.
    pub(crate) grace_until: Option<Timestamp>,
}

impl Liveness {
    pub(crate) fn new(incarnation: u64, now: Timestamp, config: PhiConfig, stall: StallPolicy) -> Liveness {
        Liveness {
            incarnation,
            health: Health::Alive,
            last_beat: now,
            progress: None,
            unchanged_beats: 0,
            last_activity: now,
            busy_until: None,
            detector: PhiDetector::new(&config),
            config,
            stall,
            progress_unlogged: false,
            progress_logged_at: None,
            grace_until: None,
        }
    }

    /// Watches the run afresh from `now`, as after its first beat: for a run that hale
    /// paused, the silence was hale's doing. One that was waiting to reconnect gets a whole
    /// grace again.
    pub(crate) fn restart_watch(&mut self, now: Timestamp, grace_ms: u64) {
        self.last_beat = now;
        self.last_activity = now;
        self.unchanged_beats = 0;
        self.health = Health::Alive;
        self.detector = PhiDetector::new(&self.config);
        if self.grace_until.is_some() {
            self.grace_until = Some(Timestamp(now.0.saturating_add(grace_ms)));
        }
    }

    /// Records one heartbeat at `now`, from a run that holds a task's lease if `holding`.
    /// Whether the run is stalled is judged from the leases it holds and the work it shows
    /// (steps, checkpoints, changed progress), never from what the progress says.
    pub(crate) fn beat(&mut self, now: Timestamp, progress: Option<Progress>, holding: bool) {
        if self.grace_until.take().is_some() {
            // The gap spans hale's own restart; it says nothing about the agent.
            self.detector = PhiDetector::new(&self.config);
            self.last_activity = now;
        }
        self.detector.heartbeat(now, &self.config);
        self.last_beat = now;
        self.health = Health::Alive;
        let changed = progress.as_ref().is_some_and(|progress| self.progress.as_ref() != Some(progress));
        if changed {
            self.progress = progress;
            self.progress_unlogged = true;
        }
        if changed || !holding || self.busy(now) {
            self.worked(now);
        } else {
            self.unchanged_beats += 1;
        }
    }

    /// The run showed work at `now`: the stall counts start again.
    pub(crate) fn worked(&mut self, now: Timestamp) {
        self.unchanged_beats = 0;
        self.last_activity = now;
    }

    /// Whether the run is in a long call it declared, at `now`.
    pub fn busy(&self, now: Timestamp) -> bool {
        self.busy_until.is_some_and(|until| now < until)
    }

    /// The current phi at `now`.
    pub fn phi(&self, now: Timestamp) -> f64 {
        self.detector.phi(now, &self.config)
    }

    /// phi at `now` for the tick's decisions: 0 while the silence is within the expected
    /// interval (phi is below 0.3 there, and the thresholds are above it), so the tick over
    /// thousands of runs computes phi only for the ones that are late.
    pub(crate) fn phi_if_late(&self, now: Timestamp) -> f64 {
        const BELOW: f64 = std::f64::consts::LOG10_2;
        let thresholds_above = self.config.suspect_threshold > BELOW && self.config.threshold > BELOW;
        if thresholds_above && self.detector.within_expected(now, &self.config) {
            return 0.0;
        }
        self.phi(now)
    }

    /// Whether progress should be logged now: it changed, and the last log of it is at
    /// least `interval_ms` old.
    pub(crate) fn progress_due(&self, now: Timestamp, interval_ms: u64) -> bool {
        self.progress_unlogged && self.progress_logged_at.is_none_or(|at| now.0.saturating_sub(at.0) >= interval_ms)
    }
}

/// Settings of the detectors, the breaker and quarantine, from `[supervision]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LivenessSettings {
    pub detector: PhiConfig,
    /// How long agents have to reconnect after hale restarts.
    pub reconnect_grace_ms: u64,
    /// At most one progress event per agent per this interval.
    pub progress_log_ms: u64,
    pub breaker: BreakerPolicy,
    pub quarantine: QuarantinePolicy,
    /// The task queue: leases per agent, load shedding, budget breaches.
    pub tasks: crate::tasks::TaskSettings,
}

impl Default for LivenessSettings {
    fn default() -> Self {
        LivenessSettings {
            detector: PhiConfig::default(),
            reconnect_grace_ms: 10_000,
            progress_log_ms: 10_000,
            breaker: BreakerPolicy::default(),
            quarantine: QuarantinePolicy::default(),
            tasks: crate::tasks::TaskSettings::default(),
        }
    }
}
