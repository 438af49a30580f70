//! Tasks: a submission (with its shadow runs, fallback ladder and budget), the holder's
//! steps, completion and failure, reservations and spending, and a task as the API shows it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/tasks`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpSubmitTask {
    pub role: String,
    /// `critical`, `high`, `normal` (default) or `background`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    #[serde(default)]
    pub payload: Value,
    /// Fails the task if it has not ended by then (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Wait before a retry the agent asked for, doubled for each further attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
    /// Lower rungs, in order, for when no healthy agent serves `role`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<RungSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
}

/// Run a task on several agents at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    pub count: u32,
    /// Equal results needed; absent: the first valid result wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<u32>,
}

/// A lower rung of a fallback ladder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RungSpec {
    pub role: String,
    /// `optimal`, `good_enough` or `minimal`.
    pub level: String,
}

/// Spending limits; absent ones are unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
    /// Running time from the first assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_ms: Option<u64>,
}

/// The answer to a submit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskSubmitted {
    pub task: u64,
    /// False when an earlier task with the same idempotency key was returned.
    pub new: bool,
}

/// A task as `GET /v1/tasks[/{task}]` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskInfo {
    pub task: u64,
    pub role: String,
    pub priority: String,
    /// `pending`, `running`, `shadowed`, `compensating`, `completed`, `failed` or
    /// `cancelled`.
    pub status: String,
    /// Running: the agent holding it. Completed or failed: the agent that ran its last
    /// attempt (the one that completed it), if any ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Running: the holder's incarnation (its lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<u64>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub steps: Vec<StepInfo>,
    pub submitted_at_ms: u64,
    pub updated_at_ms: u64,
    /// The level of the result, or of the running attempt: `optimal`, `good_enough` or
    /// `minimal` (the rung of the fallback ladder whose role ran it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// The role of the rung the current or last attempt ran at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran_as: Option<String>,
    /// `shadow` (a run of task `parent_task`) or `compensation` (undoes `compensates`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_task: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensates: Option<String>,
    /// The runs of a shadowed task, or the compensation running now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<u64>,
    /// A retry backing off until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<RungSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
    #[serde(default)]
    pub spent: SpendBody,
    #[serde(default)]
    pub reserved: SpendBody,
    /// Quorum: the runs that agreed and the ones that did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreed: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dissent: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compensation_errors: Vec<String>,
}

/// One step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepInfo {
    pub name: String,
    /// `done`, `intent` (begun by the attempt holding the lease) or `uncertain` (begun by
    /// an attempt that was lost before it said done: reconcile, do not repeat blindly).
    #[serde(default = "done")]
    pub state: String,
    pub result: Value,
    pub attempt: u32,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmCallInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Value>,
}

fn done() -> String {
    "done".to_string()
}

/// The model call behind a step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LlmCallInfo {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_out: Option<u64>,
}

/// `POST /v1/tasks/{task}/steps`, `/complete` and `/fail`: from the lease holder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpTaskWrite {
    pub agent: String,
    pub incarnation: u64,
    /// The step's name (`steps` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The step's or the task's result (`steps`, `complete`).
    #[serde(default)]
    pub result: Value,
    /// Why the attempt failed (`fail` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Retry the task if it has attempts left (`fail` only; default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<bool>,
    /// The model call behind the step (`steps` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmCallInfo>,
    /// What undoes the step (`steps` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Value>,
    /// The reservation the model call's tokens settle (`steps` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<u64>,
}

/// `POST /v1/agents/{agent}/reservations` and `/spend`: from the agent's run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpSpend {
    pub incarnation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<u64>,
    /// The reservation this spending settles (`spend` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<u64>,
    #[serde(default)]
    pub tokens: u64,
    #[serde(default)]
    pub cost: u64,
}

/// Tokens and cost units, spent or reserved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpendBody {
    #[serde(default)]
    pub tokens: u64,
    #[serde(default)]
    pub cost: u64,
}

/// The answer to a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reserved {
    pub reservation: u64,
}
