//! Circuit breaker and quarantine: the two ways hale keeps work away from an agent that is
//! alive but misbehaving.
//!
//! - The **breaker** opens on an error spike (errors the agent reports, counted over a
//!   sliding window; volatile), stays open for `open_ms`, then goes half-open: if the agent
//!   reports no error for one more window it closes, and an error while half-open opens
//!   it again. Its transitions are logged.
//! - **Quarantine** follows policy violations, reported by the agent itself, by another
//!   agent, or by the operator. Past `violations_max` within `window_ms`, or one marked
//!   critical, the agent is quarantined: it gets no work until the operator releases it.
//!   Violations and quarantine are logged.

use crate::Timestamp;
use crate::names::AgentName;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// `[supervision.breaker]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Errors within `window_ms` that open the breaker.
    pub errors_max: u32,
    pub window_ms: u64,
    /// How long it stays open before a half-open probe.
    pub open_ms: u64,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy { errors_max: 5, window_ms: 10_000, open_ms: 30_000 }
    }
}

/// `[supervision.quarantine]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuarantinePolicy {
    /// Violations within `window_ms` that quarantine the agent.
    pub violations_max: u32,
    pub window_ms: u64,
    /// What else happens to a managed agent's process.
    pub action: QuarantineAction,
}

impl Default for QuarantinePolicy {
    fn default() -> Self {
        QuarantinePolicy { violations_max: 3, window_ms: 3_600_000, action: QuarantineAction::Isolate }
    }
}

/// What quarantine does beyond isolating the agent. Isolation is always part of it: the
/// agent gets no work (the leases it holds go back), and its sessions, which stay open,
/// may checkpoint and heartbeat (nothing it did is lost) but not submit tasks or send
/// messages (ask and reply are sends). Release undoes all of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuarantineAction {
    /// Only isolation: the process keeps running.
    #[default]
    Isolate,
    /// SIGSTOP to the process group (SIGCONT on release); no detector declares the
    /// paused run down.
    Pause,
    /// Stop the agent as `hale stop` does (start it again on release).
    Stop,
}

impl QuarantineAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            QuarantineAction::Isolate => "isolate",
            QuarantineAction::Pause => "pause",
            QuarantineAction::Stop => "stop",
        }
    }

    /// The default, which the log leaves out (so older logs read as isolate).
    pub fn is_isolate(&self) -> bool {
        *self == QuarantineAction::Isolate
    }
}

/// Where a breaker is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Breaker {
    /// Work flows.
    #[default]
    Closed,
    /// No work until `until`.
    Open { until: Timestamp },
    /// Probing since `since`: closes after a window without errors.
    HalfOpen { since: Timestamp },
}

impl Breaker {
    pub fn name(&self) -> &'static str {
        match self {
            Breaker::Closed => "closed",
            Breaker::Open { .. } => "open",
            Breaker::HalfOpen { .. } => "half_open",
        }
    }
}

/// Who reported a violation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reporter {
    /// The agent reported itself (e.g. its guardrail caught its own output).
    Itself,
    /// Another agent (e.g. a fact-checker about a writer).
    Agent(AgentName),
    /// The operator.
    Operator,
    /// hale itself (a budget breach).
    Hale,
}

impl std::fmt::Display for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reporter::Itself => write!(f, "itself"),
            Reporter::Agent(agent) => write!(f, "agent {agent}"),
            Reporter::Operator => write!(f, "the operator"),
            Reporter::Hale => write!(f, "hale"),
        }
    }
}

/// How bad a violation is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Minor,
    /// One is enough to quarantine.
    Critical,
}

/// Why an agent is quarantined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    pub reason: String,
    pub by: Reporter,
    pub at: Timestamp,
    /// What was done to its process (undone on release).
    #[serde(default, skip_serializing_if = "QuarantineAction::is_isolate")]
    pub action: QuarantineAction,
}

/// The events that quarantine `agent` (`by`, for `reason`): `Quarantined` with the
/// policy's action, which needs a process hale runs (an agent that connects by itself is
/// only isolated), and for `stop`, the stop of its current run.
pub(crate) fn quarantine(
    context: &crate::decide::Context<'_>,
    agent: &AgentName,
    by: Reporter,
    reason: String,
) -> Vec<crate::event::Event> {
    use crate::event::Event;
    let managed = context.state.agent(agent.as_str()).is_some_and(|record| record.managed.is_some());
    let action = if managed { context.settings.quarantine.action } else { QuarantineAction::Isolate };
    let mut events = vec![Event::Quarantined { agent: agent.clone(), by, reason, action }];
    if action == QuarantineAction::Stop {
        let stop = crate::command::SupervisionCommand::Stop { agent: agent.clone() };
        events.extend(crate::supervision::decide(context, &stop).map(|decision| decision.events).unwrap_or_default());
    }
    events
}

/// The durable health record of one agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    #[serde(default)]
    pub breaker: Breaker,
    /// Times the breaker opened, over the agent's life.
    #[serde(default)]
    pub breaker_opened: u64,
    /// Recent violations (bounded by the policy's window when decided).
    #[serde(default)]
    pub violations: VecDeque<Timestamp>,
    #[serde(default)]
    pub quarantine: Option<Quarantine>,
}

/// The most violation times kept per agent: more than any sane `violations_max`.
pub const VIOLATIONS_KEPT: usize = 64;

impl HealthRecord {
    /// Violations within `window_ms` before `now`, counting one more at `now`.
    pub(crate) fn violations_with_one_more(&self, now: Timestamp, window_ms: u64) -> u32 {
        let recent = self.violations.iter().filter(|at| now.0.saturating_sub(at.0) < window_ms).count();
        recent as u32 + 1
    }

    pub(crate) fn record_violation(&mut self, at: Timestamp) {
        self.violations.push_back(at);
        while self.violations.len() > VIOLATIONS_KEPT {
            self.violations.pop_front();
        }
    }
}

/// Error reports of one agent within the breaker window. Volatile.
#[derive(Clone, Debug, Default)]
pub(crate) struct ErrorWindow {
    reports: VecDeque<Timestamp>,
}

impl ErrorWindow {
    /// Records an error at `now`; returns how many fall within `window_ms`.
    pub(crate) fn record(&mut self, now: Timestamp, window_ms: u64) -> u32 {
        self.reports.push_back(now);
        self.count(now, window_ms)
    }

    /// Errors within `window_ms` before `now` (and forgets older ones).
    pub(crate) fn count(&mut self, now: Timestamp, window_ms: u64) -> u32 {
        while self.reports.front().is_some_and(|at| now.0.saturating_sub(at.0) >= window_ms) {
            self.reports.pop_front();
        }
        self.reports.len() as u32
    }

    /// The last error, if any is still remembered.
    pub(crate) fn last(&self) -> Option<Timestamp> {
        self.reports.back().copied()
    }
}

/// `decide` for breakers, violations and quarantine.
pub(crate) fn decide(
    context: &crate::decide::Context<'_>,
    command: &crate::command::HealthCommand,
) -> Result<crate::command::Decision, crate::rejection::Rejection> {
    use crate::command::{Decision, HealthCommand};
    use crate::decide::{check_reason, known};
    use crate::event::Event;
    let crate::decide::Context { state, settings, now, .. } = *context;
    let events = match command {
        HealthCommand::OpenBreaker { agent, errors } => {
            let record = known(state, agent)?;
            if matches!(record.health.breaker, Breaker::Open { .. }) {
                return Ok(Decision::done(Vec::new()));
            }
            let until = Timestamp(now.0.saturating_add(settings.breaker.open_ms));
            vec![Event::BreakerOpened { agent: agent.clone(), errors: *errors, until }]
        }
        HealthCommand::HalfOpenBreaker { agent } => match known(state, agent)?.health.breaker {
            Breaker::Open { until } if until <= now => vec![Event::BreakerHalfOpened { agent: agent.clone() }],
            _ => Vec::new(),
        },
        HealthCommand::CloseBreaker { agent } => match known(state, agent)?.health.breaker {
            Breaker::HalfOpen { .. } => vec![Event::BreakerClosed { agent: agent.clone() }],
            _ => Vec::new(),
        },
        HealthCommand::ReportViolation { agent, by, severity, reason } => {
            let record = known(state, agent)?;
            // A quarantined agent may still confess, but not get others quarantined.
            if let Reporter::Agent(reporter) = by
                && reporter != agent
            {
                crate::decide::not_quarantined(state, reporter)?;
            }
            check_reason(reason)?;
            let mut events = vec![Event::ViolationReported {
                agent: agent.clone(),
                by: by.clone(),
                severity: *severity,
                reason: reason.clone(),
            }];
            let policy = &settings.quarantine;
            let count = record.health.violations_with_one_more(now, policy.window_ms);
            if record.health.quarantine.is_none() && (*severity == Severity::Critical || count >= policy.violations_max)
            {
                let why = match severity {
                    Severity::Critical => format!("critical violation: {reason}"),
                    Severity::Minor => format!("{count} violations within {} ms, the last: {reason}", policy.window_ms),
                };
                events.extend(quarantine(context, agent, by.clone(), why));
            }
            events
        }
        HealthCommand::Quarantine { agent, reason } => {
            let record = known(state, agent)?;
            check_reason(reason)?;
            if record.health.quarantine.is_some() {
                return Ok(Decision::done(Vec::new()));
            }
            quarantine(context, agent, Reporter::Operator, reason.clone())
        }
        HealthCommand::Release { agent } => {
            let record = known(state, agent)?;
            if record.health.quarantine.is_none() && record.health.violations.is_empty() {
                return Ok(Decision::done(Vec::new()));
            }
            let mut events = vec![Event::Released { agent: agent.clone() }];
            // What `stop` stopped starts again (pause is undone by the effect of Released).
            let stopped = record.health.quarantine.as_ref().is_some_and(|q| q.action == QuarantineAction::Stop);
            if stopped {
                let start = crate::command::SupervisionCommand::StartManaged { agent: agent.clone() };
                events.extend(
                    crate::supervision::decide(context, &start).map(|decision| decision.events).unwrap_or_default(),
                );
            }
            events
        }
    };
    Ok(Decision::done(events))
}
