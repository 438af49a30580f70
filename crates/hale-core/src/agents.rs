//! `decide` for an agent's registration, runs, state versions and progress.

use crate::command::{AgentCommand, Answer, Decision, Hello, RollbackTarget};
use crate::decide::{Context, check_progress, running, stopping_or_running};
use crate::event::Event;
use crate::limits::PATCH_DEPTH_MAX;
use crate::merge::{json_depth, json_size, merged_size};
use crate::names::validate_labels;
use crate::rejection::Rejection;
use crate::state::State;
use serde_json::Value;

pub(crate) fn decide(context: &Context<'_>, command: &AgentCommand) -> Result<Decision, Rejection> {
    let Context { state, limits, now, .. } = *context;
    match command {
        AgentCommand::Hello(hello) => hello_decision(state, hello),
        AgentCommand::Checkpoint { agent, incarnation, patch, expected_version } => {
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
            let version = record.version() + 1;
            Ok(Decision {
                events: vec![Event::Checkpointed {
                    agent: agent.clone(),
                    incarnation: *incarnation,
                    version,
                    patch: patch.clone(),
                }],
                answer: Answer::Checkpointed { version },
            })
        }
        AgentCommand::MarkRecoveryPoint { agent, incarnation, name } => {
            let record = running(state, agent, *incarnation)?;
            let replaces = record.recovery_points.contains_key(name);
            if !replaces && record.recovery_points.len() >= limits.recovery_points_max {
                return Err(Rejection::TooManyRecoveryPoints {
                    agent: agent.to_string(),
                    max: limits.recovery_points_max,
                });
            }
            let version = record.version();
            Ok(Decision {
                events: vec![Event::RecoveryPointMarked {
                    agent: agent.clone(),
                    incarnation: *incarnation,
                    name: name.clone(),
                    version,
                }],
                answer: Answer::RecoveryPointMarked { name: name.clone(), version, marked_at: now },
            })
        }
        AgentCommand::Rollback { agent, incarnation, target } => {
            let record = running(state, agent, *incarnation)?;
            let (target_version, target_state) = match target {
                RollbackTarget::Point(name) => {
                    let point = record.recovery_points.get(name).ok_or_else(|| Rejection::UnknownRecoveryPoint {
                        agent: agent.to_string(),
                        name: name.to_string(),
                    })?;
                    (point.version, point.state.clone())
                }
                RollbackTarget::Version(version) => (*version, record.retained_state(*version)?),
            };
            let version = record.version() + 1;
            Ok(Decision {
                events: vec![Event::RolledBack {
                    agent: agent.clone(),
                    incarnation: *incarnation,
                    target_version,
                    version,
                    state: Value::clone(&target_state),
                }],
                answer: Answer::RolledBack { version, target_version, state: target_state },
            })
        }
        AgentCommand::RecordProgress { agent, incarnation, progress } => {
            running(state, agent, *incarnation)?;
            check_progress(progress)?;
            Ok(Decision::done(vec![Event::ProgressReported {
                agent: agent.clone(),
                incarnation: *incarnation,
                progress: progress.clone(),
            }]))
        }
    }
}

fn hello_decision(state: &State, hello: &Hello) -> Result<Decision, Rejection> {
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
    let incarnation = if start_new_run { incarnation + 1 } else { incarnation };
    if start_new_run {
        events.push(Event::IncarnationStarted { agent: hello.agent.clone(), incarnation });
    }
    let answer = Answer::Welcome { agent: hello.agent.clone(), incarnation, resumed: !start_new_run };
    Ok(Decision { events, answer })
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
