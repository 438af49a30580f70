//! `decide`: which domain a command belongs to, and the guards every domain shares.

use crate::Timestamp;
use crate::command::{Command, Decision};
use crate::limits::{Limits, PATCH_DEPTH_MAX};
use crate::liveness::{LivenessSettings, PROGRESS_BYTES_MAX, Progress};
use crate::merge::json_depth;
use crate::names::AgentName;
use crate::rejection::Rejection;
use crate::state::{AgentRecord, State};
use crate::supervision::Cause;
use crate::{agents, budget, credentials, health, hooks, mail, supervision, tasks};

/// What every domain's `decide` may read: the state, the limits and settings, the time of
/// the decision and the seed of the restart jitter.
pub(crate) struct Context<'a> {
    pub state: &'a State,
    pub limits: &'a Limits,
    pub settings: &'a LivenessSettings,
    pub now: Timestamp,
    pub seed: u64,
}

pub(crate) fn decide(context: &Context<'_>, command: &Command) -> Result<Decision, Rejection> {
    match command {
        Command::Agent(command) => agents::decide(context, command),
        Command::Supervision(command) => supervision::decide(context, command),
        Command::Health(command) => health::decide(context, command),
        Command::Task(command) => tasks::decide(context, command),
        Command::Mail(command) => mail::decide(context, command),
        Command::Budget(command) => budget::decide(context, command),
        Command::Credentials(command) => credentials::decide(context, command),
        Command::Hook(command) => hooks::decide(command),
    }
}

/// The agent, if it exists and `incarnation` is its current run.
pub(crate) fn running<'s>(state: &'s State, agent: &AgentName, incarnation: u64) -> Result<&'s AgentRecord, Rejection> {
    let record = known(state, agent)?;
    if record.incarnation == 0 {
        return Err(Rejection::NotStarted { agent: agent.to_string() });
    }
    if incarnation < record.incarnation {
        return Err(Rejection::StaleIncarnation {
            agent: agent.to_string(),
            given: incarnation,
            current: record.incarnation,
        });
    }
    if incarnation > record.incarnation {
        return Err(Rejection::UnknownIncarnation {
            agent: agent.to_string(),
            given: incarnation,
            current: record.incarnation,
        });
    }
    if let Some(down) = &record.down
        && down.incarnation == incarnation
    {
        return Err(Rejection::IncarnationDown {
            agent: agent.to_string(),
            incarnation,
            cause: down.cause.to_string(),
        });
    }
    Ok(record)
}

/// Like [`running`], but a run stopped on purpose (`hale stop`, hale stopping) may still
/// checkpoint: it was sent SIGTERM to save its last state and close. No newer run can
/// exist without a new incarnation, which fences it as always.
pub(crate) fn stopping_or_running<'s>(
    state: &'s State,
    agent: &AgentName,
    incarnation: u64,
) -> Result<&'s AgentRecord, Rejection> {
    match running(state, agent, incarnation) {
        Err(Rejection::IncarnationDown { .. })
            if state.agent(agent.as_str()).and_then(|record| record.down.as_ref()).map(|down| &down.cause)
                == Some(&Cause::Stopped) =>
        {
            Ok(state.agent(agent.as_str()).expect("running found it"))
        }
        other => other,
    }
}

/// Refuses if `agent` is quarantined: it may not reach others (submit, send) until
/// released.
pub(crate) fn not_quarantined(state: &State, agent: &AgentName) -> Result<(), Rejection> {
    match state.agent(agent.as_str()).and_then(|record| record.health.quarantine.as_ref()) {
        Some(quarantine) => Err(Rejection::Quarantined { agent: agent.to_string(), reason: quarantine.reason.clone() }),
        None => Ok(()),
    }
}

/// The agent, if it exists.
pub(crate) fn known<'s>(state: &'s State, agent: &AgentName) -> Result<&'s AgentRecord, Rejection> {
    state.agent(agent.as_str()).ok_or_else(|| Rejection::UnknownAgent { agent: agent.to_string() })
}

/// The agent, if hale.toml declares it.
pub(crate) fn managed<'s>(state: &'s State, agent: &AgentName) -> Result<&'s AgentRecord, Rejection> {
    let record = known(state, agent)?;
    if record.managed.is_none() {
        return Err(Rejection::NotManaged { agent: agent.to_string() });
    }
    Ok(record)
}

/// The largest reason text of a violation or quarantine.
pub const REASON_BYTES_MAX: usize = 1024;

pub(crate) fn check_reason(reason: &str) -> Result<(), Rejection> {
    if reason.len() > REASON_BYTES_MAX {
        return Err(Rejection::ReasonTooLong { size: reason.len(), max: REASON_BYTES_MAX });
    }
    Ok(())
}

pub(crate) fn check_progress(progress: &Progress) -> Result<(), Rejection> {
    if let Some(fraction) = progress.fraction
        && !(0.0..=1.0).contains(&fraction)
    {
        return Err(Rejection::BadFraction { got: fraction.to_string() });
    }
    // Progress is logged, so it must decode again: the same depth bound as patches.
    let depth = progress.fields.values().map(json_depth).max().unwrap_or(0) + 1;
    if depth > PATCH_DEPTH_MAX {
        return Err(Rejection::PatchTooDeep { depth, max: PATCH_DEPTH_MAX });
    }
    let size = serde_json::to_vec(progress).map_or(usize::MAX, |bytes| bytes.len());
    if size > PROGRESS_BYTES_MAX {
        return Err(Rejection::ProgressTooLarge { size, max: PROGRESS_BYTES_MAX });
    }
    Ok(())
}
