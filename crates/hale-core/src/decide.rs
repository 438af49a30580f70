use crate::Timestamp;
use crate::command::{Command, Hello, RollbackTarget};
use crate::event::Event;
use crate::limits::Limits;
use crate::limits::PATCH_DEPTH_MAX;
use crate::merge::{json_depth, json_size, merged_size};
use crate::names::{AgentName, validate_labels};
use crate::rejection::Rejection;
use crate::state::{AgentRecord, State};
use serde_json::Value;

pub(crate) fn decide(
    state: &State,
    limits: &Limits,
    command: &Command,
    _now: Timestamp,
) -> Result<Vec<Event>, Rejection> {
    match command {
        Command::Hello(hello) => decide_hello(state, hello),
        Command::Checkpoint { agent, incarnation, patch, expected_version } => {
            let record = running(state, agent, *incarnation)?;
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
    let registration_changed = current.is_none_or(|record| record.role != hello.role || record.labels != hello.labels);
    let incarnation = current.map_or(0, |record| record.incarnation);
    let start_new_run = match hello.incarnation {
        None => true,
        Some(given) if given == incarnation && given > 0 => false,
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
fn running<'s>(state: &'s State, agent: &AgentName, incarnation: u64) -> Result<&'s AgentRecord, Rejection> {
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
    Ok(record)
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
