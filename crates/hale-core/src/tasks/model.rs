//! What a task is: its spec as submitted, where it is, and the steps it committed.

use crate::Timestamp;
use crate::names::{AgentName, RoleName};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How urgent a task is. Critical work is assigned before anything else and is never shed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Critical,
    High,
    #[default]
    Normal,
    Background,
}

/// The quality a result was produced at: the label of the rung of the fallback ladder
/// whose role ran the attempt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    #[default]
    Optimal,
    GoodEnough,
    Minimal,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Optimal => "optimal",
            Level::GoodEnough => "good-enough",
            Level::Minimal => "minimal",
        })
    }
}

/// A lower rung of a fallback ladder: used when no healthy agent serves the rungs above.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rung {
    pub role: RoleName,
    pub level: Level,
}

/// Run the task on `count` distinct agents at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shadow {
    pub count: u32,
    /// `None`: the first valid result wins. `Some(k)`: `k` equal results win, and the
    /// results that differ are recorded.
    #[serde(default)]
    pub quorum: Option<u32>,
}

/// Limits on what a task (or an agent) may spend. Absent limits are unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub cost: Option<u64>,
    /// Running time from the first assignment (tasks only).
    #[serde(default)]
    pub wall_ms: Option<u64>,
}

/// What was spent or reserved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spend {
    pub tokens: u64,
    pub cost: u64,
}

impl Spend {
    pub fn plus(self, other: Spend) -> Spend {
        Spend { tokens: self.tokens.saturating_add(other.tokens), cost: self.cost.saturating_add(other.cost) }
    }

    pub fn minus(self, other: Spend) -> Spend {
        Spend { tokens: self.tokens.saturating_sub(other.tokens), cost: self.cost.saturating_sub(other.cost) }
    }

    /// Which limit of `budget` this spend is over, if any.
    pub fn over(self, budget: &Budget) -> Option<String> {
        if let Some(max) = budget.tokens
            && self.tokens > max
        {
            return Some(format!("{} tokens of {max}", self.tokens));
        }
        if let Some(max) = budget.cost
            && self.cost > max
        {
            return Some(format!("{} cost units of {max}", self.cost));
        }
        None
    }
}

/// What a client submits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The role that serves the task at its best (`optimal`).
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
    /// Wait before a retry the agent asked for: this, doubled for every further attempt
    /// (at most an hour). A lost agent's tasks are not delayed: they move at once.
    #[serde(default)]
    pub retry_backoff_ms: u64,
    /// Run on several agents at once.
    #[serde(default)]
    pub shadow: Option<Shadow>,
    /// Lower rungs, in order, for when no healthy agent serves `role`.
    #[serde(default)]
    pub fallback: Vec<Rung>,
    #[serde(default)]
    pub budget: Option<Budget>,
}

fn default_max_attempts() -> u32 {
    3
}

impl TaskSpec {
    /// A plain spec: `role`, normal priority, three attempts, nothing else.
    pub fn new(role: RoleName, payload: Value) -> TaskSpec {
        TaskSpec {
            role,
            priority: Priority::Normal,
            payload,
            deadline: None,
            max_attempts: default_max_attempts(),
            idempotency_key: None,
            retry_backoff_ms: 0,
            shadow: None,
            fallback: Vec::new(),
            budget: None,
        }
    }

    /// The rung `index` of the ladder: 0 is `role` at `optimal`.
    pub fn rung(&self, index: u32) -> Option<Rung> {
        match index {
            0 => Some(Rung { role: self.role.clone(), level: Level::Optimal }),
            n => self.fallback.get(n as usize - 1).cloned(),
        }
    }

    /// How many rungs the ladder has.
    pub fn rungs(&self) -> u32 {
        1 + self.fallback.len() as u32
    }
}

/// The wait before retry `attempt + 1`, after attempt `attempt` failed.
pub fn retry_delay(base_ms: u64, attempt: u32) -> u64 {
    const MAX_MS: u64 = 3_600_000;
    base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(20)).min(MAX_MS.max(base_ms))
}

/// How an aborted task ends once its compensations are done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Failed { reason: String },
    Cancelled,
}

/// Where a task is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for an agent (after `not_before` on the task, if set).
    Pending,
    /// Leased to `incarnation` of `agent`, as attempt number `attempt`.
    Running {
        agent: AgentName,
        incarnation: u64,
        attempt: u32,
    },
    /// A shadowed task: its `children` run it on distinct agents; hale arbitrates.
    Shadowed {
        children: Vec<u64>,
    },
    /// Aborted: the compensation of `step` runs as task `child`, then the ones committed
    /// before it; then the task ends as `outcome` says.
    Compensating {
        #[serde(flatten)]
        outcome: Outcome,
        step: String,
        child: u64,
    },
    Completed {
        result: Value,
        #[serde(default)]
        level: Level,
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

    /// A word for it: `pending`, `running`, …
    pub fn word(&self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running { .. } => "running",
            TaskStatus::Shadowed { .. } => "shadowed",
            TaskStatus::Compensating { .. } => "compensating",
            TaskStatus::Completed { .. } => "completed",
            TaskStatus::Failed { .. } => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }
}

/// Where a step is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Committed with its result.
    #[default]
    Done,
    /// Begun (its side effect may or may not have happened) by the attempt that holds the
    /// lease.
    Intent,
    /// Begun by an attempt that ended before it said `done`: the next attempt must find out
    /// whether the side effect happened instead of repeating it blindly.
    Uncertain,
}

/// The model call behind a step, so a rerun can tell whether it would match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LlmCall {
    pub model: String,
    #[serde(default)]
    pub model_version: Option<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub prompt_hash: Option<String>,
    #[serde(default)]
    pub tokens_in: Option<u64>,
    #[serde(default)]
    pub tokens_out: Option<u64>,
}

/// A step of a task: its result survives the attempt that made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    #[serde(default)]
    pub state: StepState,
    pub result: Value,
    pub attempt: u32,
    pub at: Timestamp,
    /// The rung of the ladder the attempt ran at (its compensation runs there too).
    #[serde(default)]
    pub rung: u32,
    #[serde(default)]
    pub llm: Option<LlmCall>,
    /// What the role needs to undo this step, if the task is aborted.
    #[serde(default)]
    pub compensation: Option<Value>,
}

/// Why a task has a parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Parent {
    /// One of the runs of a shadowed task.
    Shadow { task: u64 },
    /// Undoes `step` of the aborted task.
    Compensation { task: u64, step: String },
}

impl Parent {
    pub fn task(&self) -> u64 {
        match self {
            Parent::Shadow { task } | Parent::Compensation { task, .. } => *task,
        }
    }
}

/// How a quorum was reached.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Arbitration {
    /// The runs whose results won.
    pub agreed: Vec<u64>,
    /// Runs that completed with another result.
    pub dissent: Vec<u64>,
}

/// One task, as the log says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: u64,
    pub spec: TaskSpec,
    pub status: TaskStatus,
    /// Attempts started so far.
    pub attempts: u32,
    /// Steps, in the order they were first recorded.
    pub steps: Vec<Step>,
    pub submitted_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default)]
    pub parent: Option<Parent>,
    /// Not assigned before this (a retry backing off).
    #[serde(default)]
    pub not_before: Option<Timestamp>,
    /// The rung of the ladder of the current or last attempt.
    #[serde(default)]
    pub rung: u32,
    /// The agent of the current or last attempt.
    #[serde(default)]
    pub last_holder: Option<AgentName>,
    /// When the first attempt started (wall-time budgets count from here).
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    /// Why the last attempt ended, if it did not complete.
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub spent: Spend,
    /// Reserved and not yet reported.
    #[serde(default)]
    pub reserved: Spend,
    #[serde(default)]
    pub arbitration: Option<Arbitration>,
    /// Compensations that did not succeed (the task still ends, and says so).
    #[serde(default)]
    pub compensation_errors: Vec<String>,
    /// The agent that submitted it, if one did: its outcome is pushed to that agent's
    /// sessions until the agent takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<AgentName>,
    /// The submitter took the outcome.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outcome_taken: bool,
}

impl Task {
    /// Whether the agent that submitted it has an outcome to take.
    pub fn outcome_owed(&self) -> bool {
        self.submitted_by.is_some() && !self.outcome_taken && self.status.is_final()
    }

    /// The agent and incarnation holding the lease, if running.
    pub fn holder(&self) -> Option<(&AgentName, u64)> {
        match &self.status {
            TaskStatus::Running { agent, incarnation, .. } => Some((agent, *incarnation)),
            _ => None,
        }
    }

    /// Pending and out of attempts: the next tick fails it.
    pub fn exhausted(&self) -> bool {
        self.status == TaskStatus::Pending && self.attempts >= self.spec.max_attempts
    }

    /// When the task must end: its deadline or the end of its wall-time budget.
    pub fn due(&self) -> Option<Timestamp> {
        let wall = self
            .spec
            .budget
            .and_then(|budget| budget.wall_ms)
            .zip(self.started_at)
            .map(|(wall, started)| Timestamp(started.0.saturating_add(wall)));
        match (self.spec.deadline, wall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
