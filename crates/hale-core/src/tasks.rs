//! Durable tasks (issue 4, first part; not wired into the shell yet): submitted work for a
//! role, queued by priority, leased to one incarnation of one agent at a time, with
//! committed steps that survive the loss of the agent.
//!
//! A lease belongs to an incarnation. When that incarnation is declared down (or its agent
//! is quarantined), the fold of that event takes the lease back at once: the task is
//! pending again, with its committed steps, or failed if it has used its attempts. There
//! is no visibility timeout to wait out, and a late write from the old incarnation finds
//! no lease (`lease_lost`).

use crate::Timestamp;
use crate::names::{AgentName, RoleName};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// How urgent a task is. Critical work is assigned before anything else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Critical,
    High,
    #[default]
    Normal,
    Background,
}

/// What a client submits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub role: RoleName,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub payload: Value,
    /// After this, the task fails wherever it is.
    #[serde(default)]
    pub deadline: Option<Timestamp>,
    /// Attempts before the task fails (an attempt ends when its agent fails it or is
    /// declared down holding it).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// A second submit with the same key returns the first task.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

fn default_max_attempts() -> u32 {
    3
}

/// Where a task is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for an agent.
    Pending,
    /// Leased to `incarnation` of `agent`, as attempt number `attempt`.
    Running {
        agent: AgentName,
        incarnation: u64,
        attempt: u32,
    },
    Completed {
        result: Value,
    },
    Failed {
        reason: String,
    },
    Cancelled,
}

impl TaskStatus {
    /// Whether the task has ended.
    pub fn is_final(&self) -> bool {
        matches!(self, TaskStatus::Completed { .. } | TaskStatus::Failed { .. } | TaskStatus::Cancelled)
    }
}

/// A committed step: its result survives the attempt that made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub result: Value,
    pub attempt: u32,
    pub at: Timestamp,
}

/// One task, as the log says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: u64,
    pub spec: TaskSpec,
    pub status: TaskStatus,
    /// Attempts started so far.
    pub attempts: u32,
    /// Committed steps, in commit order.
    pub steps: Vec<Step>,
    pub submitted_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Every task, with the indexes assignment needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tasks {
    tasks: BTreeMap<u64, Task>,
    next_id: u64,
    by_key: BTreeMap<String, u64>,
    /// Pending tasks in assignment order: priority, then submission.
    pending: BTreeSet<(Priority, u64)>,
    /// Leases per agent, so that assignment, a down and a resume look at the agent's
    /// tasks only, not at every task ever submitted.
    leases: BTreeMap<AgentName, BTreeSet<u64>>,
    /// Deadlines of tasks that have not ended, soonest first.
    deadlines: BTreeSet<(Timestamp, u64)>,
}

impl Tasks {
    /// The task `id`.
    pub fn get(&self, id: u64) -> Option<&Task> {
        self.tasks.get(&id)
    }

    /// Every task, by id.
    pub fn all(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values()
    }

    /// The task submitted with `key`, if any.
    pub fn by_key(&self, key: &str) -> Option<&Task> {
        self.by_key.get(key).and_then(|id| self.tasks.get(id))
    }

    /// The id the next submitted task gets.
    pub fn next_id(&self) -> u64 {
        self.next_id + 1
    }

    /// Pending tasks in the order they are assigned.
    pub fn pending(&self) -> impl Iterator<Item = &Task> {
        self.pending.iter().filter_map(|(_, id)| self.tasks.get(id))
    }

    /// Tasks leased to `agent` (any incarnation).
    pub fn running_on<'a>(&'a self, agent: &'a AgentName) -> impl Iterator<Item = &'a Task> + 'a {
        self.leases.get(agent).into_iter().flatten().filter_map(|id| self.tasks.get(id))
    }

    /// How many leases `agent` holds.
    pub fn load(&self, agent: &AgentName) -> usize {
        self.leases.get(agent).map_or(0, BTreeSet::len)
    }

    /// Tasks that have not ended and whose deadline is `now` or earlier.
    pub fn past_deadline(&self, now: Timestamp) -> impl Iterator<Item = u64> + '_ {
        self.deadlines.range(..=(now, u64::MAX)).map(|(_, id)| *id)
    }

    pub(crate) fn submit(&mut self, id: u64, spec: TaskSpec, at: Timestamp) {
        self.next_id = self.next_id.max(id);
        if let Some(key) = &spec.idempotency_key {
            self.by_key.insert(key.clone(), id);
        }
        self.pending.insert((spec.priority, id));
        if let Some(deadline) = spec.deadline {
            self.deadlines.insert((deadline, id));
        }
        let task = Task {
            id,
            spec,
            status: TaskStatus::Pending,
            attempts: 0,
            steps: Vec::new(),
            submitted_at: at,
            updated_at: at,
        };
        self.tasks.insert(id, task);
    }

    pub(crate) fn set_status(&mut self, id: u64, status: TaskStatus, at: Timestamp) {
        let Some(task) = self.tasks.get_mut(&id) else { return };
        self.pending.remove(&(task.spec.priority, id));
        if let TaskStatus::Running { agent, .. } = &task.status
            && let Some(held) = self.leases.get_mut(agent)
        {
            held.remove(&id);
            if held.is_empty() {
                self.leases.remove(agent);
            }
        }
        match &status {
            TaskStatus::Pending => {
                self.pending.insert((task.spec.priority, id));
            }
            TaskStatus::Running { agent, .. } => {
                self.leases.entry(agent.clone()).or_default().insert(id);
            }
            _ => {
                if let Some(deadline) = task.spec.deadline {
                    self.deadlines.remove(&(deadline, id));
                }
            }
        }
        if let TaskStatus::Running { attempt, .. } = &status {
            task.attempts = *attempt;
        }
        task.status = status;
        task.updated_at = at;
    }

    pub(crate) fn commit_step(&mut self, id: u64, step: Step) {
        if let Some(task) = self.tasks.get_mut(&id) {
            task.updated_at = step.at;
            task.steps.retain(|existing| existing.name != step.name);
            task.steps.push(step);
        }
    }

    /// Takes back every lease of `agent`'s `incarnation` (it was declared down, or the
    /// agent quarantined): each task is pending again, or failed if out of attempts.
    pub(crate) fn release_leases(&mut self, agent: &AgentName, incarnation: Option<u64>, why: &str, at: Timestamp) {
        let held: Vec<(u64, u32, u32)> = self
            .running_on(agent)
            .filter_map(|task| match &task.status {
                TaskStatus::Running { agent: holder, incarnation: leased, attempt }
                    if holder == agent && incarnation.is_none_or(|incarnation| incarnation == *leased) =>
                {
                    Some((task.id, *attempt, task.spec.max_attempts))
                }
                _ => None,
            })
            .collect();
        for (id, attempt, max_attempts) in held {
            let status = if attempt >= max_attempts {
                TaskStatus::Failed { reason: format!("out of attempts ({attempt}); the last ended: {why}") }
            } else {
                TaskStatus::Pending
            };
            self.set_status(id, status, at);
        }
    }
}
