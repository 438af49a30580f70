//! `decide` for managed agents (declare, start, process started, down, restart, stop) and
//! role pools.

use super::{Cause, ManagedStatus, RestartPlan, instance_name, plan_restart, siblings};
use crate::Timestamp;
use crate::command::{Answer, Decision, SupervisionCommand};
use crate::decide::{Context, known, managed};
use crate::event::Event;
use crate::names::{AgentName, validate_labels};
use crate::rejection::Rejection;
use crate::state::State;
use std::collections::BTreeMap;

pub(crate) fn decide(context: &Context<'_>, command: &SupervisionCommand) -> Result<Decision, Rejection> {
    let mut decision = decide_unplaced(context, command)?;
    // On a cluster, every incarnation this starts is placed on a node (or waits for one).
    decision.events = crate::nodes::place(context.state, std::mem::take(&mut decision.events));
    Ok(decision)
}

fn decide_unplaced(context: &Context<'_>, command: &SupervisionCommand) -> Result<Decision, Rejection> {
    let Context { state, now, seed, .. } = *context;
    let events = match command {
        SupervisionCommand::NodeUp { node, info } => crate::nodes::node_up(state, node, info)?,
        SupervisionCommand::NodeLost { node, silent_ms } => {
            crate::nodes::node_lost(state, node, *silent_ms, now, seed)?
        }
        SupervisionCommand::Declare { agent, role, labels, supervision } => {
            validate_labels(labels)?;
            let unchanged = state.agent(agent.as_str()).is_some_and(|record| {
                record.role == *role
                    && record.labels == *labels
                    && record.managed.as_ref().is_some_and(|managed| managed.spec == *supervision)
            });
            if unchanged {
                return Ok(Decision::done(Vec::new()));
            }
            vec![Event::AgentDeclared {
                agent: agent.clone(),
                role: role.clone(),
                labels: labels.clone(),
                supervision: supervision.clone(),
            }]
        }
        SupervisionCommand::StartManaged { agent } => {
            let record = managed(state, agent)?;
            let status = &record.managed.as_ref().expect("checked by managed()").status;
            let due = match status {
                ManagedStatus::Declared | ManagedStatus::Stopped | ManagedStatus::Pending { .. } => true,
                ManagedStatus::Backoff { due, .. } => *due <= now,
                _ => false,
            };
            if !due {
                return Ok(Decision::done(Vec::new()));
            }
            vec![Event::IncarnationStarted { agent: agent.clone(), incarnation: record.incarnation + 1 }]
        }
        SupervisionCommand::ProcessStarted { agent, incarnation, process } => {
            let record = managed(state, agent)?;
            let starting = record.managed.as_ref().is_some_and(|managed| managed.status == ManagedStatus::Starting);
            if *incarnation != record.incarnation || !starting {
                // A spawn that a newer decision overtook: nothing to record.
                return Ok(Decision::done(Vec::new()));
            }
            vec![Event::ProcessStarted { agent: agent.clone(), incarnation: *incarnation, process: *process }]
        }
        SupervisionCommand::ReportDown { agent, incarnation, cause } => {
            down(state, agent, *incarnation, cause, now, seed)?
        }
        SupervisionCommand::Restart { agent } => {
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
            let incarnation = record.incarnation + 1;
            events.push(Event::IncarnationStarted { agent: agent.clone(), incarnation });
            return Ok(Decision { events, answer: Answer::Restarted { incarnation } });
        }
        SupervisionCommand::Stop { agent } => {
            let record = managed(state, agent)?;
            let managed = record.managed.as_ref().expect("checked by managed()");
            let down = record.down.as_ref().is_some_and(|down| down.incarnation == record.incarnation);
            let stops = match &managed.status {
                ManagedStatus::Starting | ManagedStatus::Running => !down,
                // Waiting to restart: the stop cancels the restart.
                ManagedStatus::Backoff { .. } => true,
                _ => false,
            };
            if !stops {
                return Ok(Decision::done(Vec::new()));
            }
            vec![Event::AgentDown { agent: agent.clone(), incarnation: record.incarnation, cause: Cause::Stopped }]
        }
        SupervisionCommand::DeclareRole { role, min, max, supervision } => {
            let unchanged = state.roles().any(|(name, pool)| {
                name == role && pool.min == *min && pool.max == *max && pool.supervision == *supervision
            });
            if unchanged {
                return Ok(Decision::done(Vec::new()));
            }
            vec![Event::RoleDeclared { role: role.clone(), min: *min, max: *max, supervision: supervision.clone() }]
        }
        SupervisionCommand::Recruit { role } => {
            let Some((_, pool)) = state.roles().find(|(name, _)| *name == role) else {
                return Err(Rejection::UnknownRole { role: role.to_string() });
            };
            let total = state.agents().filter(|record| record.role == *role && record.managed.is_some()).count();
            if total as u32 >= pool.max {
                return Ok(Decision::done(Vec::new()));
            }
            let agent = (1..)
                .map(|n| instance_name(role, n))
                .find(|name| state.agent(name.as_str()).is_none())
                .expect("some instance number is free");
            vec![
                Event::AgentDeclared {
                    agent: agent.clone(),
                    role: role.clone(),
                    labels: BTreeMap::from([("pool".to_string(), role.to_string())]),
                    supervision: pool.supervision.clone(),
                },
                Event::IncarnationStarted { agent, incarnation: 1 },
            ]
        }
    };
    Ok(Decision::done(events))
}

/// An incarnation found down: log it with its cause and, for a managed agent, decide the
/// restart (its own, and its group's). Reports about an incarnation that is no longer
/// current, or already down, change nothing: detectors may race each other.
pub(crate) fn down(
    state: &State,
    agent: &AgentName,
    incarnation: u64,
    cause: &Cause,
    now: Timestamp,
    seed: u64,
) -> Result<Vec<Event>, Rejection> {
    let record = known(state, agent)?;
    let already_down = record.down.as_ref().is_some_and(|down| down.incarnation == incarnation);
    if incarnation != record.incarnation || incarnation == 0 || already_down {
        return Ok(Vec::new());
    }
    let mut events = vec![Event::AgentDown { agent: agent.clone(), incarnation, cause: cause.clone() }];
    let Some(managed) = &record.managed else {
        return Ok(events);
    };
    match plan_restart(managed, agent, incarnation, cause, now, seed) {
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
                for sibling in siblings(group, agent, state.managed()) {
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
