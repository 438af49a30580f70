//! What the operator reads and asks for: the system's status, the event log, failure
//! hooks and backups.

use crate::ErrorBody;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `GET /v1/status`: what the whole system can do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SystemStatus {
    /// `optimal`, `degraded` or `minimal`.
    pub mode: String,
    /// Roles with a healthy agent, of all roles hale knows.
    pub serving: u32,
    pub roles: u32,
    /// Per role: agents, healthy agents, leases held, tasks waiting.
    pub per_role: Vec<RoleStatus>,
    /// Tasks waiting for an agent, and the queue limits per priority.
    pub queued: u64,
    pub shed_background_at: u64,
    pub shed_normal_at: u64,
    pub shed_high_at: u64,
    pub tasks_by_status: std::collections::BTreeMap<String, u64>,
    /// Agents by state: a managed agent's supervision status (`running`, `backoff`,
    /// `failed`, …), an attached agent's liveness (`alive`, `suspect`, `down`,
    /// `disconnected`, …), `quarantined` before either.
    #[serde(default)]
    pub agents_by_state: std::collections::BTreeMap<String, u64>,
    /// Recoveries (an agent declared down, then a later run of it speaking) in the last
    /// hour this hale has been up, and their time to recovery.
    #[serde(default)]
    pub recoveries_last_hour: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mttr_p50_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mttr_p99_seconds: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoleStatus {
    pub role: String,
    pub agents: u32,
    pub healthy: u32,
    pub leases: u32,
    pub queued: u32,
}

/// One event of the log, as `GET /v1/events` and `GET /v1/events/stream` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventInfo {
    /// Its sequence number in the log; `after=seq` resumes after it.
    pub seq: u64,
    /// When it was logged, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The kind, e.g. `agent_down` (`damaged` for a record that cannot be read).
    pub kind: String,
    /// The agent it concerns, if any (the sender of a message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// One line for people; its wording may change.
    pub summary: String,
    /// The event's fields as the log holds them (`null` for a damaged record).
    pub event: Value,
}

/// One failure hook of hale.toml, as `GET /v1/hooks` shows it. The counters and the last
/// outcomes are since this hale started; every outcome is also in the log
/// (`hook_delivered`, `hook_failed`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HookStatus {
    pub name: String,
    /// The event kinds it is called on (`agent.down`, …).
    pub on: Vec<String>,
    /// `webhook URL` or `command ARGV…`.
    pub target: String,
    /// Deliveries waiting for their turn.
    pub queued: u64,
    pub delivered: u64,
    /// Deliveries given up after every retry.
    pub failed: u64,
    /// Deliveries dropped unsent because the hook's queue was full.
    pub dropped: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivered: Option<HookOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed: Option<HookOutcome>,
}

/// How one delivery of a hook ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HookOutcome {
    /// The event it was about.
    pub seq: u64,
    pub kind: String,
    /// When it ended, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub attempts: u32,
    /// Why the last attempt failed (for a failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/backups`: where the server writes the backup, an absolute path on its machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpBackup {
    pub path: String,
}

/// One line of the answer to `POST /v1/backups` (newline-delimited JSON): progress lines
/// while the copy runs, then exactly one `done` or `error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BackupLine {
    Progress { pages_done: u64, pages_total: u64 },
    Done(BackupDone),
    Error(ErrorBody),
}

/// A finished backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BackupDone {
    pub path: String,
    pub bytes: u64,
    pub pages: u64,
    /// Records in the backup and the last one's sequence number: the log as it was
    /// committed when the backup began.
    pub records: u64,
    pub last_seq: u64,
    pub elapsed_ms: u64,
}

/// `POST /v1/cluster/join`: ask the cluster a member of which listens at `address` to add
/// this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClusterJoin {
    /// `host:port` of any member; the request follows it to the leader.
    pub address: String,
}

/// `POST /v1/cluster/leave`: a member leaves the cluster (`hale cluster leave`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClusterLeave {
    /// The member to remove (default: the node asked). One that is down can be removed
    /// through any other member.
    #[serde(default)]
    pub node_id: Option<u64>,
}

/// `GET /v1/cluster`: this node's view of its cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterInfo {
    pub node_id: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shut down`.
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub members: Vec<ClusterMember>,
}

/// `GET /v1/nodes`: one node of a cluster, as the log and the leader see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeSummary {
    /// Its `[cluster] name`.
    pub name: String,
    pub node_id: u64,
    pub address: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// `up` or `lost`.
    pub status: String,
    /// When it came up, or was declared lost.
    pub since_ms: u64,
    /// In Raft: `leader`, `voter` (a follower), `learner`, or `none` (not a member).
    pub raft: String,
    /// The managed agents placed on it that are starting or running.
    pub agents: Vec<String>,
    /// On the leader: how long ago the node last renewed its lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heard_ms_ago: Option<u64>,
}

/// A member of the cluster, as a node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterMember {
    pub node_id: u64,
    pub address: String,
    pub voter: bool,
    /// On the leader: the last log index the member is known to hold, and how far behind
    /// the leader's log that is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
}
