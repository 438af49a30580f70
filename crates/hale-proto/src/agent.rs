//! An agent's run and its state: `hello` and the welcome, checkpoints, recovery points,
//! rollback, heartbeats with progress, reported errors and violations, quarantine, and the
//! summaries the operator reads. The `Http*` bodies are the HTTP forms of the session's
//! requests: they name their `incarnation`, since there is no session to carry it.

use crate::{ConversationInfo, PendingReplyInfo};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// `hello`: who the agent is and which run it believes it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HelloBody {
    pub role: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `null` (or absent) starts a new run; a number resumes that run if it is current.
    #[serde(default)]
    pub incarnation: Option<u64>,
}

/// Everything an agent needs to resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Welcome {
    pub protocol: u32,
    pub agent: String,
    pub role: String,
    pub labels: BTreeMap<String, String>,
    /// The run this session belongs to; every write of the session carries it.
    pub incarnation: u64,
    /// True when the hello resumed the run it named; false when it started a new one.
    pub resumed: bool,
    pub version: u64,
    pub state: Value,
    pub recovery_points: Vec<RecoveryPointInfo>,
    /// The versions still retained for rollback by number, oldest first.
    pub history: Vec<u64>,
    /// The run's session id (`agent/incarnation`): the same across reconnects of the run.
    #[serde(default)]
    pub session: String,
    /// How many messages wait in the mailbox; they follow the welcome as `message` frames.
    #[serde(default)]
    pub unacked: u64,
    /// The conversations the agent takes part in.
    #[serde(default)]
    pub conversations: Vec<ConversationInfo>,
    /// The messages that still wait for the agent's reply.
    #[serde(default)]
    pub pending_replies: Vec<PendingReplyInfo>,
}

/// `checkpoint`: a JSON merge patch (RFC 7396) to fold into the state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    pub patch: Value,
    /// Refuse with `version_conflict` unless the state is at this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
}

/// `POST /v1/agents/{agent}/checkpoint`: the incarnation travels in the body since there
/// is no session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpCheckpoint {
    pub incarnation: u64,
    pub patch: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
}

/// The answer to an HTTP checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Checkpointed {
    pub version: u64,
}

/// A named recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecoveryPointInfo {
    pub name: String,
    pub version: u64,
    pub marked_at_ms: u64,
}

/// `POST /v1/agents/{agent}/recovery-points`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpRecoveryPoint {
    pub incarnation: u64,
    pub name: String,
}

/// What a rollback returns to: `{"version": 3}` or `{"point": "before-refactor"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RollbackTo {
    Version(u64),
    Point(String),
}

/// `POST /v1/agents/{agent}/rollback`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpRollback {
    pub incarnation: u64,
    pub to: RollbackTo,
}

/// The result of a rollback: the new version and its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolledBack {
    pub version: u64,
    pub target_version: u64,
    pub state: Value,
}

/// `GET /v1/agents/{agent}/state[?version=N]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentState {
    pub agent: String,
    pub incarnation: u64,
    pub version: u64,
    /// The current version; differs from `version` when an older one was asked for.
    pub current_version: u64,
    pub state: Value,
    pub recovery_points: Vec<RecoveryPointInfo>,
    pub history: Vec<u64>,
}

/// Progress reported with a heartbeat; every member is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ProgressBody {
    /// How far along, from 0 to 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The task being worked on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub fields: serde_json::Map<String, Value>,
}

/// `POST /v1/agents/{agent}/heartbeat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpHeartbeat {
    pub incarnation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressBody>,
    /// The run is in a call that may take this long (0: the call is over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_ms: Option<u64>,
}

/// One line of `GET /v1/agents`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentSummary {
    pub agent: String,
    pub role: String,
    pub labels: BTreeMap<String, String>,
    pub incarnation: u64,
    pub version: u64,
    /// Whether a WebSocket session of the current incarnation is open now.
    pub attached: bool,
    pub recovery_points: usize,
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
    /// Set if hale.toml declares the agent and hale runs its process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedSummary>,
    /// `alive`, `suspect` or `reconnecting` while the heartbeat detector watches the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_ms: Option<u64>,
    /// The latest progress (from the last heartbeat, or as last logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressBody>,
    /// Set if the current incarnation was declared down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<DownSummary>,
    /// The last incarnation declared down (the current one or an earlier one), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_down: Option<DownSummary>,
    /// `closed`, `open` or `half_open`.
    #[serde(default)]
    pub breaker: String,
    /// Set while the agent is quarantined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineSummary>,
}

/// The supervision side of a managed agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ManagedSummary {
    /// `declared`, `starting`, `running`, `backoff`, `failed`, `stopped` or (on a cluster,
    /// when no node may run it) `pending`.
    pub status: String,
    /// On a cluster: the node its current (or last) incarnation was placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why it is `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub restarts: u64,
    /// When the next restart is due, while backing off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_due_ms: Option<u64>,
}

/// Why and when an incarnation was declared down.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DownSummary {
    pub incarnation: u64,
    /// The detector: `process_exit`, `heartbeat`, `stall`, `group` or `operator`.
    pub detector: String,
    pub cause: String,
    pub at_ms: u64,
}

/// Why an agent is quarantined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QuarantineSummary {
    pub reason: String,
    /// `itself`, `agent NAME` or `the operator`.
    pub by: String,
    pub at_ms: u64,
    /// What was done to its process: `isolate`, `pause` or `stop` (see
    /// `[supervision.quarantine] action`).
    #[serde(default = "isolate")]
    pub action: String,
}

fn isolate() -> String {
    "isolate".into()
}

/// `POST /v1/agents/{agent}/errors`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpErrorReport {
    pub incarnation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /v1/agents/{agent}/violations` (by the operator, or `by` another agent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpViolation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default)]
    pub critical: bool,
    pub reason: String,
}

/// `POST /v1/agents/{agent}/quarantine`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpQuarantine {
    pub reason: String,
}
