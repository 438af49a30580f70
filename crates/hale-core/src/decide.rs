use crate::Timestamp;
use crate::command::{Command, Hello, RollbackTarget};
use crate::event::Event;
use crate::health::{Breaker, Reporter, Severity};
use crate::limits::Limits;
use crate::limits::PATCH_DEPTH_MAX;
use crate::liveness::{LivenessSettings, PROGRESS_BYTES_MAX, Progress};
use crate::merge::{json_depth, json_size, merged_size};
use crate::names::{AgentName, validate_labels};
use crate::rejection::Rejection;
use crate::state::{AgentRecord, State};
use crate::supervision::{self, Cause, ManagedStatus, RestartPlan};
use crate::{budget, credentials, mail, tasks};
use serde_json::Value;

pub(crate) fn decide(
    state: &State,
    limits: &Limits,
    settings: &LivenessSettings,
    command: &Command,
    now: Timestamp,
    seed: u64,
) -> Result<Vec<Event>, Rejection> {
    match command {
        Command::SubmitTask { .. }
        | Command::AssignTask { .. }
        | Command::CommitStep { .. }
        | Command::CompleteTask { .. }
        | Command::FailTask { .. }
        | Command::CancelTask { .. }
        | Command::ExpireTask { .. }
        | Command::IntendStep { .. } => tasks::decide_task(state, &settings.tasks, command, now),
        Command::SetMode { mode, serving, roles } => {
            if state.mode() == *mode {
                return Ok(Vec::new());
            }
            Ok(vec![Event::ModeChanged { mode: *mode, serving: *serving, roles: *roles }])
        }
        Command::Reserve { .. } | Command::ReportSpend { .. } => budget::decide(state, settings, command, now),
        Command::IssueTokens { .. } | Command::RefreshTokens { .. } | Command::RevokeTokens { .. } => {
            credentials::decide(state, command, now)
        }
        Command::SendMessage { .. } | Command::AckMessage { .. } | Command::EndConversation { .. } => {
            mail::decide(state, limits, command)
        }
        Command::RecordHookOutcome { hook, kind, seq, attempts, error } => {
            let (hook, kind, seq, attempts) = (hook.clone(), *kind, *seq, (*attempts).max(1));
            Ok(vec![match error {
                None => Event::HookDelivered { hook, kind, seq, attempts },
                Some(error) => {
                    check_reason(error)?;
                    Event::HookFailed { hook, kind, seq, attempts, error: error.clone() }
                }
            }])
        }
        Command::DeclareRole { role, min, max, supervision } => {
            let unchanged = state.roles().any(|(name, pool)| {
                name == role && pool.min == *min && pool.max == *max && pool.supervision == *supervision
            });
            if unchanged {
                return Ok(Vec::new());
            }
            Ok(vec![Event::RoleDeclared { role: role.clone(), min: *min, max: *max, supervision: supervision.clone() }])
        }
        Command::Recruit { role } => {
            let Some((_, pool)) = state.roles().find(|(name, _)| *name == role) else {
                return Err(Rejection::UnknownRole { role: role.to_string() });
            };
            let total = state.agents().filter(|record| record.role == *role && record.managed.is_some()).count();
            if total as u32 >= pool.max {
                return Ok(Vec::new());
            }
            let agent = (1..)
                .map(|n| supervision::instance_name(role, n))
                .find(|name| state.agent(name.as_str()).is_none())
                .expect("some instance number is free");
            Ok(vec![
                Event::AgentDeclared {
                    agent: agent.clone(),
                    role: role.clone(),
                    labels: std::collections::BTreeMap::from([("pool".to_string(), role.to_string())]),
                    supervision: pool.supervision.clone(),
                },
                Event::IncarnationStarted { agent, incarnation: 1 },
            ])
        }
        Command::OpenBreaker { agent, errors } => {
            let record = known(state, agent)?;
            if matches!(record.health.breaker, Breaker::Open { .. }) {
                return Ok(Vec::new());
            }
            let until = Timestamp(now.0.saturating_add(settings.breaker.open_ms));
            Ok(vec![Event::BreakerOpened { agent: agent.clone(), errors: *errors, until }])
        }
        Command::HalfOpenBreaker { agent } => {
            let record = known(state, agent)?;
            match record.health.breaker {
                Breaker::Open { until } if until <= now => Ok(vec![Event::BreakerHalfOpened { agent: agent.clone() }]),
                _ => Ok(Vec::new()),
            }
        }
        Command::CloseBreaker { agent } => {
            let record = known(state, agent)?;
            match record.health.breaker {
                Breaker::HalfOpen { .. } => Ok(vec![Event::BreakerClosed { agent: agent.clone() }]),
                _ => Ok(Vec::new()),
            }
        }
        Command::ReportViolation { agent, by, severity, reason } => {
            let record = known(state, agent)?;
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
                events.push(Event::Quarantined { agent: agent.clone(), by: by.clone(), reason: why });
            }
            Ok(events)
        }
        Command::Quarantine { agent, reason } => {
            let record = known(state, agent)?;
            check_reason(reason)?;
            if record.health.quarantine.is_some() {
                return Ok(Vec::new());
            }
            Ok(vec![Event::Quarantined { agent: agent.clone(), by: Reporter::Operator, reason: reason.clone() }])
        }
        Command::Release { agent } => {
            let record = known(state, agent)?;
            if record.health.quarantine.is_none() && record.health.violations.is_empty() {
                return Ok(Vec::new());
            }
            Ok(vec![Event::Released { agent: agent.clone() }])
        }
        Command::Declare { agent, role, labels, supervision } => {
            validate_labels(labels)?;
            let unchanged = state.agent(agent.as_str()).is_some_and(|record| {
                record.role == *role
                    && record.labels == *labels
                    && record.managed.as_ref().is_some_and(|managed| managed.spec == *supervision)
            });
            if unchanged {
                return Ok(Vec::new());
            }
            Ok(vec![Event::AgentDeclared {
                agent: agent.clone(),
                role: role.clone(),
                labels: labels.clone(),
                supervision: supervision.clone(),
            }])
        }
        Command::StartManaged { agent } => {
            let record = managed(state, agent)?;
            let status = &record.managed.as_ref().expect("checked by managed()").status;
            let due = match status {
                ManagedStatus::Declared | ManagedStatus::Stopped => true,
                ManagedStatus::Backoff { due, .. } => *due <= now,
                _ => false,
            };
            if !due {
                return Ok(Vec::new());
            }
            Ok(vec![Event::IncarnationStarted { agent: agent.clone(), incarnation: record.incarnation + 1 }])
        }
        Command::ProcessStarted { agent, incarnation, process } => {
            let record = managed(state, agent)?;
            let starting = record.managed.as_ref().is_some_and(|managed| managed.status == ManagedStatus::Starting);
            if *incarnation != record.incarnation || !starting {
                // A spawn that a newer decision overtook: nothing to record.
                return Ok(Vec::new());
            }
            Ok(vec![Event::ProcessStarted { agent: agent.clone(), incarnation: *incarnation, process: *process }])
        }
        Command::ReportDown { agent, incarnation, cause } => decide_down(state, agent, *incarnation, cause, now, seed),
        Command::Restart { agent } => {
            let record = managed(state, agent)?;
            let managed = record.managed.as_ref().expect("checked by managed()");
            let mut events = vec![Event::RestartRequested { agent: agent.clone() }];
            if managed.is_live() && record.down.as_ref().is_none_or(|down| down.incarnation != record.incarnation) {
                events.push(Event::AgentDown {
                    agent: agent.clone(),
                    incarnation: record.incarnation,
                    cause: Cause::Operator,
                });
            }
            events.push(Event::IncarnationStarted { agent: agent.clone(), incarnation: record.incarnation + 1 });
            Ok(events)
        }
        Command::Stop { agent } => {
            let record = managed(state, agent)?;
            let managed = record.managed.as_ref().expect("checked by managed()");
            let down = record.down.as_ref().is_some_and(|down| down.incarnation == record.incarnation);
            match &managed.status {
                ManagedStatus::Starting | ManagedStatus::Running if !down => Ok(vec![Event::AgentDown {
                    agent: agent.clone(),
                    incarnation: record.incarnation,
                    cause: Cause::Stopped,
                }]),
                // Waiting to restart: the stop cancels the restart.
                ManagedStatus::Backoff { .. } => Ok(vec![Event::AgentDown {
                    agent: agent.clone(),
                    incarnation: record.incarnation,
                    cause: Cause::Stopped,
                }]),
                _ => Ok(Vec::new()),
            }
        }
        Command::RecordProgress { agent, incarnation, progress } => {
            running(state, agent, *incarnation)?;
            check_progress(progress)?;
            Ok(vec![Event::ProgressReported {
                agent: agent.clone(),
                incarnation: *incarnation,
                progress: progress.clone(),
            }])
        }
        Command::Hello(hello) => decide_hello(state, hello),
        Command::Checkpoint { agent, incarnation, patch, expected_version } => {
            let record = stopping_or_running(state, agent, *incarnation)?;
            if let Some(expected) = expected_version
                && *expected != record.version()
            {
                return Err(Rejection::VersionConflict { expected: *expected, current: record.version() });
            }
            if !patch.is_object() {
                return Err(Rejection::PatchNotObject { got: json_kind(patch) });
            }
            let depth = json_depth(patch);
            let depth_max = limits.patch_depth_max.min(PATCH_DEPTH_MAX);
            if depth > depth_max {
                return Err(Rejection::PatchTooDeep { depth, max: depth_max });
            }
            let patch_size = json_size(patch);
            if patch_size > limits.patch_bytes_max {
                return Err(Rejection::PatchTooLarge { size: patch_size, max: limits.patch_bytes_max });
            }
            let state_size = merged_size(record.state(), patch);
            if state_size > limits.state_bytes_max {
                return Err(Rejection::StateTooLarge { size: state_size, max: limits.state_bytes_max });
            }
            Ok(vec![Event::Checkpointed {
                agent: agent.clone(),
                incarnation: *incarnation,
                version: record.version() + 1,
                patch: patch.clone(),
            }])
        }
        Command::MarkRecoveryPoint { agent, incarnation, name } => {
            let record = running(state, agent, *incarnation)?;
            let replaces = record.recovery_points.contains_key(name);
            if !replaces && record.recovery_points.len() >= limits.recovery_points_max {
                return Err(Rejection::TooManyRecoveryPoints {
                    agent: agent.to_string(),
                    max: limits.recovery_points_max,
                });
            }
            Ok(vec![Event::RecoveryPointMarked {
                agent: agent.clone(),
                incarnation: *incarnation,
                name: name.clone(),
                version: record.version(),
            }])
        }
        Command::Rollback { agent, incarnation, target } => {
            let record = running(state, agent, *incarnation)?;
            let (target_version, target_state) = match target {
                RollbackTarget::Point(name) => {
                    let point = record.recovery_points.get(name).ok_or_else(|| Rejection::UnknownRecoveryPoint {
                        agent: agent.to_string(),
                        name: name.to_string(),
                    })?;
                    (point.version, point.state.clone())
                }
                RollbackTarget::Version(version) => {
                    let state = record.retained_state(*version)?;
                    (*version, state)
                }
            };
            Ok(vec![Event::RolledBack {
                agent: agent.clone(),
                incarnation: *incarnation,
                target_version,
                version: record.version() + 1,
                state: Value::clone(&target_state),
            }])
        }
    }
}

fn decide_hello(state: &State, hello: &Hello) -> Result<Vec<Event>, Rejection> {
    validate_labels(&hello.labels)?;
    let mut events = Vec::new();
    let current = state.agent(hello.agent.as_str());
    // A managed agent's role and labels are hale.toml's: its hello does not change them.
    let registration_changed = current
        .is_none_or(|record| record.managed.is_none() && (record.role != hello.role || record.labels != hello.labels));
    let incarnation = current.map_or(0, |record| record.incarnation);
    let start_new_run = match hello.incarnation {
        // Only hale starts runs of the agents it runs: a process that says hello without
        // its incarnation would make hale replace it, and its replacement do the same.
        None if current.is_some_and(|record| record.managed.is_some()) => {
            return Err(Rejection::ManagedByHale { agent: hello.agent.to_string(), current: incarnation });
        }
        None => true,
        Some(given) if given == incarnation && given > 0 => {
            if let Some(down) = current.and_then(|record| record.down.as_ref())
                && down.incarnation == given
            {
                return Err(Rejection::IncarnationDown {
                    agent: hello.agent.to_string(),
                    incarnation: given,
                    cause: down.cause.to_string(),
                });
            }
            false
        }
        Some(given) if given < incarnation => {
            return Err(Rejection::StaleIncarnation { agent: hello.agent.to_string(), given, current: incarnation });
        }
        Some(given) => {
            return Err(Rejection::UnknownIncarnation { agent: hello.agent.to_string(), given, current: incarnation });
        }
    };
    if registration_changed {
        events.push(Event::AgentRegistered {
            agent: hello.agent.clone(),
            role: hello.role.clone(),
            labels: hello.labels.clone(),
        });
    }
    if start_new_run {
        events.push(Event::IncarnationStarted { agent: hello.agent.clone(), incarnation: incarnation + 1 });
    }
    Ok(events)
}

/// The agent, if it exists and `incarnation` is its current run.
pub(crate) fn running<'s>(state: &'s State, agent: &AgentName, incarnation: u64) -> Result<&'s AgentRecord, Rejection> {
    let record = state.agent(agent.as_str()).ok_or_else(|| Rejection::UnknownAgent { agent: agent.to_string() })?;
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
fn stopping_or_running<'s>(
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

/// The largest reason text of a violation or quarantine.
pub const REASON_BYTES_MAX: usize = 1024;

fn check_reason(reason: &str) -> Result<(), Rejection> {
    if reason.len() > REASON_BYTES_MAX {
        return Err(Rejection::ReasonTooLong { size: reason.len(), max: REASON_BYTES_MAX });
    }
    Ok(())
}

/// The agent, if it exists.
pub(crate) fn known<'s>(state: &'s State, agent: &AgentName) -> Result<&'s AgentRecord, Rejection> {
    state.agent(agent.as_str()).ok_or_else(|| Rejection::UnknownAgent { agent: agent.to_string() })
}

/// The agent, if hale.toml declares it.
fn managed<'s>(state: &'s State, agent: &AgentName) -> Result<&'s AgentRecord, Rejection> {
    let record = state.agent(agent.as_str()).ok_or_else(|| Rejection::UnknownAgent { agent: agent.to_string() })?;
    if record.managed.is_none() {
        return Err(Rejection::NotManaged { agent: agent.to_string() });
    }
    Ok(record)
}

/// An incarnation found down: log it with its cause and, for a managed agent, decide the
/// restart (its own, and its group's). Reports about an incarnation that is no longer
/// current, or already down, change nothing: detectors may race each other.
fn decide_down(
    state: &State,
    agent: &AgentName,
    incarnation: u64,
    cause: &Cause,
    now: Timestamp,
    seed: u64,
) -> Result<Vec<Event>, Rejection> {
    let record = state.agent(agent.as_str()).ok_or_else(|| Rejection::UnknownAgent { agent: agent.to_string() })?;
    let already_down = record.down.as_ref().is_some_and(|down| down.incarnation == incarnation);
    if incarnation != record.incarnation || incarnation == 0 || already_down {
        return Ok(Vec::new());
    }
    let mut events = vec![Event::AgentDown { agent: agent.clone(), incarnation, cause: cause.clone() }];
    let Some(managed) = &record.managed else {
        return Ok(events);
    };
    match supervision::plan_restart(managed, agent, incarnation, cause, now, seed) {
        RestartPlan::None => {}
        RestartPlan::GiveUp { restarts, window_ms } => {
            events.push(Event::AgentFailed { agent: agent.clone(), restarts, window_ms });
        }
        RestartPlan::Restart { attempt, due } => {
            events.push(Event::RestartScheduled { agent: agent.clone(), attempt, due });
            if due <= now {
                events.push(Event::IncarnationStarted { agent: agent.clone(), incarnation: incarnation + 1 });
            }
            if let Some(group) = &managed.spec.group {
                for sibling in supervision::siblings(group, agent, state.managed()) {
                    let sibling_incarnation = state.agent(sibling.as_str()).map_or(0, |record| record.incarnation);
                    events.push(Event::AgentDown {
                        agent: sibling.clone(),
                        incarnation: sibling_incarnation,
                        cause: Cause::SiblingFailed { sibling: agent.clone() },
                    });
                    events.push(Event::IncarnationStarted { agent: sibling, incarnation: sibling_incarnation + 1 });
                }
            }
        }
    }
    Ok(events)
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

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
