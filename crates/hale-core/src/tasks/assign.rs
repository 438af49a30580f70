//! Which pending task goes to which agent.

use super::decide::shadow_siblings_on;
use super::index::Tasks;
use crate::Timestamp;
use crate::command::{Command, TaskCommand};
use crate::names::{AgentName, RoleName};
use crate::state::State;
use std::collections::{BTreeMap, BTreeSet};

/// A healthy agent's current run, with the leases it holds.
pub(crate) struct Candidate<'a> {
    pub agent: &'a AgentName,
    pub incarnation: u64,
    pub load: usize,
}

/// What [`plan`] decided.
pub(crate) struct Planned {
    pub commands: Vec<Command>,
    /// Roles of rungs that had no healthy agent when a task asked.
    pub unserved: Vec<RoleName>,
}

/// Assignments for the pending tasks, in priority order: each goes to the least-loaded
/// healthy agent with room (another agent than the one whose attempt just ended, if one
/// has room), at the highest rung of its ladder that has a healthy agent at all. A rung
/// with no healthy agent is passed over only once `unserved_long` says it has had none for
/// the grace: a crashed agent that comes back within it gets the task. A rung whose agents
/// are all busy is waited for, not skipped: falling back is for missing capacity, not for
/// a queue. Runs of a shadowed task go to distinct agents.
pub(crate) fn plan(
    state: &State,
    tasks: &Tasks,
    healthy: &mut BTreeMap<&RoleName, Vec<Candidate<'_>>>,
    capacity: usize,
    now: Timestamp,
    unserved_long: &dyn Fn(&RoleName) -> bool,
) -> Planned {
    let mut commands = Vec::new();
    let mut unserved = Vec::new();
    // Runs of shadowed tasks placed in this pass, which the state does not show yet.
    let mut placed: BTreeSet<(u64, AgentName)> = BTreeSet::new();
    // Room left in all: once none is, the rest of the queue waits (a long queue is not
    // walked on every pass).
    let mut room: usize = healthy.values().flatten().map(|candidate| capacity.saturating_sub(candidate.load)).sum();
    for task in tasks.assignable(now) {
        if room == 0 {
            break;
        }
        if task.due().is_some_and(|due| due <= now) {
            continue;
        }
        for rung in 0..task.spec.rungs() {
            let role = task.spec.rung(rung).expect("within the ladder").role;
            let Some(agents) = healthy.get_mut(&role).filter(|agents| !agents.is_empty()) else {
                let passed_over = unserved_long(&role);
                if !unserved.contains(&role) {
                    unserved.push(role);
                }
                if passed_over {
                    continue;
                }
                break;
            };
            // A retry goes elsewhere when it can: the last attempt's agent may be the
            // reason it failed.
            let last = task.last_holder.as_ref().filter(|_| task.attempts > 0);
            let chosen = agents
                .iter_mut()
                .filter(|candidate| candidate.load < capacity)
                .filter(|candidate| !shadow_siblings_on(state, task, candidate.agent))
                .filter(|candidate| {
                    task.parent
                        .as_ref()
                        .is_none_or(|parent| !placed.contains(&(parent.task(), candidate.agent.clone())))
                })
                .min_by_key(|candidate| (last == Some(candidate.agent), candidate.load));
            if let Some(chosen) = chosen {
                chosen.load += 1;
                room -= 1;
                if let Some(parent) = &task.parent {
                    placed.insert((parent.task(), chosen.agent.clone()));
                }
                commands.push(Command::Task(TaskCommand::Assign {
                    task: task.id,
                    agent: chosen.agent.clone(),
                    incarnation: chosen.incarnation,
                    rung,
                }));
            }
            break;
        }
    }
    Planned { commands, unserved }
}
