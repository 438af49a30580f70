//! The wire format of hale's session protocol, shared by the server and the clients.
//!
//! Frames are JSON objects with a `type` and, on requests, a client-chosen `id` that the
//! response echoes. The HTTP API carries the same operations with bodies of its own (no
//! `type` or `id`; writes name their `incarnation`, since there is no session). See
//! docs/protocol.md for the full description with examples.
//!
//! Names travel as plain strings and are validated by the server, so a bad name gets the
//! typed `invalid_name` error rather than a generic parse failure. These types are the
//! wire format: the core's types may change without changing them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The protocol version this crate speaks; sent in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The path of the WebSocket endpoint.
pub const SESSION_PATH: &str = "/v1/session";

/// A request frame from an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    Hello {
        id: u64,
        agent: String,
        #[serde(flatten)]
        body: HelloBody,
    },
    Checkpoint {
        id: u64,
        #[serde(flatten)]
        body: CheckpointBody,
    },
    RecoveryPoint {
        id: u64,
        name: String,
    },
    Rollback {
        id: u64,
        to: RollbackTo,
    },
    /// I am alive, and this is how far I got. Answered with `heartbeat_ack` at once
    /// (heartbeats are not logged one by one). Also the answer to a `challenge`.
    Heartbeat {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<ProgressBody>,
    },
    /// An error the agent ran into (a failed tool call, a refusal…). Counted for the
    /// circuit breaker; answered with `ok` at once (not logged one by one).
    ReportError {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// A policy violation by `agent` (this session's own agent if omitted). Logged;
    /// enough of them quarantine the agent. Answered with `ok` once durable.
    ReportViolation {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
        #[serde(default)]
        critical: bool,
        reason: String,
    },
    /// A step of a task this run holds is about to run its side effects (durable when
    /// answered `ok`). If the run is lost before `commit_step`, the next attempt gets the
    /// step as `uncertain`.
    IntendStep {
        id: u64,
        task: u64,
        name: String,
    },
    /// A step of a task this run holds is done (durable when answered `ok`).
    CommitStep {
        id: u64,
        task: u64,
        name: String,
        #[serde(default)]
        result: Value,
        /// The model call behind the step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        llm: Option<LlmCallInfo>,
        /// What undoes the step if the task is aborted (handed to a compensation task).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compensation: Option<Value>,
    },
    /// Submit a task (answered `submitted` once durable), e.g. an orchestrator handing
    /// out work.
    Submit {
        id: u64,
        task: HttpSubmitTask,
    },
    /// Reserve spending before an expensive call (answered `reserved`).
    Reserve {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<u64>,
        #[serde(default)]
        tokens: u64,
        #[serde(default)]
        cost: u64,
    },
    /// Report what was spent (settling `reservation`, if given).
    ReportSpend {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reservation: Option<u64>,
        #[serde(default)]
        tokens: u64,
        #[serde(default)]
        cost: u64,
    },
    /// The task this run holds is done.
    Complete {
        id: u64,
        task: u64,
        #[serde(default)]
        result: Value,
    },
    /// This attempt at the task failed (retried while attempts are left, unless `retry` is false).
    Fail {
        id: u64,
        task: u64,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry: Option<bool>,
    },
    /// Send a message to an agent or a role (answered `sent` once durable).
    Send {
        id: u64,
        #[serde(flatten)]
        message: SendBody,
    },
    /// This session's agent has acted on message `seq` of its mailbox (answered `ok`).
    Ack {
        id: u64,
        seq: u64,
    },
    /// End a conversation this agent takes part in (answered `ok`).
    EndConversation {
        id: u64,
        conversation: String,
    },
    /// A fresh access token for this session (answered `ok`): a session lives only as long
    /// as its token, so a client renews it in band before it expires. The token must be
    /// for the same agent as the one that opened the session.
    Auth {
        id: u64,
        token: String,
    },
}

/// A message to send: `to` is `{"agent": "writer-1"}` or `{"role": "writer"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    pub to: Recipient,
    /// The conversation it belongs to; hale starts a new one (`c-N`) if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    #[serde(default)]
    pub body: Value,
    /// The message this one answers (it is no longer pending for the sender).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    /// The sender waits for an answer.
    #[serde(default)]
    pub expects_reply: bool,
    /// An idempotency key: a send retried with the same key sends nothing new and is
    /// answered with the first message (`new: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Recipient {
    Agent(String),
    Role(String),
}

/// The answer to a send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sent {
    /// The message's id, unique across hale.
    pub message: u64,
    /// The agent it went to (for a role, the one chosen).
    pub to: String,
    /// Its sequence number in the recipient's mailbox.
    pub seq: u64,
    pub conversation: String,
    /// False when an earlier send with the same key was found.
    pub new: bool,
}

/// A message delivered from a mailbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessageInfo {
    pub seq: u64,
    pub message: u64,
    pub from: String,
    pub conversation: String,
    pub body: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    #[serde(default)]
    pub expects_reply: bool,
    pub sent_at_ms: u64,
}

/// A conversation the agent takes part in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConversationInfo {
    pub id: String,
    pub participants: Vec<String>,
    pub started_at_ms: u64,
    pub last_at_ms: u64,
    pub messages: u64,
}

/// A message that waits for the agent's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PendingReplyInfo {
    pub message: u64,
    pub seq: u64,
    pub from: String,
    pub conversation: String,
    pub sent_at_ms: u64,
}

/// `GET /v1/agents/{agent}/mailbox`: the unacked messages (after `after`, at most
/// `limit`), the open conversations and the pending replies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Mailbox {
    pub agent: String,
    /// The last sequence number given out.
    pub last_seq: u64,
    pub unacked: u64,
    pub messages: Vec<MessageInfo>,
    pub conversations: Vec<ConversationInfo>,
    pub pending_replies: Vec<PendingReplyInfo>,
}

/// `POST /v1/agents/{agent}/messages`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpSend {
    pub incarnation: u64,
    #[serde(flatten)]
    pub message: SendBody,
}

/// `POST /v1/agents/{agent}/mailbox/ack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpAck {
    pub incarnation: u64,
    pub seq: u64,
}

/// `POST /v1/agents/{agent}/conversations/{conversation}/end`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpEndConversation {
    pub incarnation: u64,
}

impl ClientFrame {
    /// The request id.
    pub fn id(&self) -> u64 {
        match self {
            ClientFrame::Hello { id, .. }
            | ClientFrame::Checkpoint { id, .. }
            | ClientFrame::RecoveryPoint { id, .. }
            | ClientFrame::Rollback { id, .. }
            | ClientFrame::Heartbeat { id, .. }
            | ClientFrame::ReportError { id, .. }
            | ClientFrame::ReportViolation { id, .. }
            | ClientFrame::CommitStep { id, .. }
            | ClientFrame::IntendStep { id, .. }
            | ClientFrame::Reserve { id, .. }
            | ClientFrame::Submit { id, .. }
            | ClientFrame::ReportSpend { id, .. }
            | ClientFrame::Complete { id, .. }
            | ClientFrame::Fail { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::Ack { id, .. }
            | ClientFrame::EndConversation { id, .. }
            | ClientFrame::Auth { id, .. } => *id,
        }
    }
}

/// The frame types a client may send, for error messages.
pub const CLIENT_FRAME_TYPES: [&str; 18] = [
    "hello",
    "checkpoint",
    "recovery_point",
    "rollback",
    "heartbeat",
    "report_error",
    "report_violation",
    "intend_step",
    "commit_step",
    "submit",
    "reserve",
    "report_spend",
    "complete",
    "fail",
    "send",
    "ack",
    "end_conversation",
    "auth",
];

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

/// What a rollback returns to: `{"version": 3}` or `{"point": "before-refactor"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RollbackTo {
    Version(u64),
    Point(String),
}

/// A response or notice from the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        id: u64,
        #[serde(flatten)]
        welcome: Welcome,
    },
    Checkpointed {
        id: u64,
        version: u64,
    },
    RecoveryPointMarked {
        id: u64,
        #[serde(flatten)]
        point: RecoveryPointInfo,
    },
    RolledBack {
        id: u64,
        #[serde(flatten)]
        rolled_back: RolledBack,
    },
    Error {
        /// The id of the request this answers, if one could be read from it.
        id: Option<u64>,
        #[serde(flatten)]
        error: ErrorBody,
    },
    HeartbeatAck {
        id: u64,
    },
    /// The answer to `report_error` and `report_violation`.
    Ok {
        id: u64,
    },
    /// A task was accepted (`new`) or an earlier one with the same key returned.
    Submitted {
        id: u64,
        task: u64,
        new: bool,
    },
    /// Unasked: the agent's tokens were revoked or it was quarantined; the server closes
    /// the session after this (code 4003).
    SessionEnded {
        reason: String,
    },
    /// A reservation was made.
    Reserved {
        id: u64,
        reservation: u64,
    },
    /// Unasked: the detector suspects this agent; answer with a heartbeat.
    Challenge {},
    /// Unasked: this incarnation was superseded or declared down. The server closes the
    /// session after this frame; the process should stop (a managed agent is replaced).
    Fenced {
        incarnation: u64,
        reason: String,
    },
    /// Unasked: a task leased to this run, with the steps earlier attempts committed.
    Task {
        #[serde(flatten)]
        task: Box<TaskInfo>,
    },
    /// Unasked: a task this run holds was cancelled; stop working on it.
    TaskCancelled {
        task: u64,
    },
    /// The answer to `send`.
    Sent {
        id: u64,
        #[serde(flatten)]
        sent: Sent,
    },
    /// Unasked: a message from the agent's mailbox. Every unacked one is delivered again
    /// to each new session, in `seq` order: drop a `seq` already handled.
    Message {
        #[serde(flatten)]
        message: Box<MessageInfo>,
    },
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

/// A named recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecoveryPointInfo {
    pub name: String,
    pub version: u64,
    pub marked_at_ms: u64,
}

/// The result of a rollback: the new version and its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolledBack {
    pub version: u64,
    pub target_version: u64,
    pub state: Value,
}

/// A typed error. `code` is stable and documented in docs/errors.md.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    /// Whether the same request may succeed if sent again later, unchanged.
    pub retryable: bool,
}

/// The body of every HTTP error response: `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HttpError {
    pub error: ErrorBody,
}

// ---- HTTP-only bodies ---------------------------------------------------------------------

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

/// `POST /v1/agents/{agent}/recovery-points`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpRecoveryPoint {
    pub incarnation: u64,
    pub name: String,
}

/// `POST /v1/agents/{agent}/rollback`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpRollback {
    pub incarnation: u64,
    pub to: RollbackTo,
}

/// The answer to an HTTP checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Checkpointed {
    pub version: u64,
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

/// Why an agent is quarantined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QuarantineSummary {
    pub reason: String,
    /// `itself`, `agent NAME` or `the operator`.
    pub by: String,
    pub at_ms: u64,
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

/// The supervision side of a managed agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ManagedSummary {
    /// `declared`, `starting`, `running`, `backoff`, `failed` or `stopped`.
    pub status: String,
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

/// `POST /v1/agents/{agent}/heartbeat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpHeartbeat {
    pub incarnation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressBody>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_have_the_documented_shape() {
        let frame: ClientFrame = serde_json::from_value(json!({
            "type": "hello", "id": 1, "agent": "a", "role": "r", "incarnation": null
        }))
        .unwrap();
        assert_eq!(
            frame,
            ClientFrame::Hello {
                id: 1,
                agent: "a".into(),
                body: HelloBody { role: "r".into(), labels: BTreeMap::new(), incarnation: None }
            }
        );
        let frame: ClientFrame =
            serde_json::from_value(json!({"type": "rollback", "id": 2, "to": {"point": "p"}})).unwrap();
        assert_eq!(frame, ClientFrame::Rollback { id: 2, to: RollbackTo::Point("p".into()) });
        let out = serde_json::to_value(ServerFrame::Checkpointed { id: 3, version: 4 }).unwrap();
        assert_eq!(out, json!({"type": "checkpointed", "id": 3, "version": 4}));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let frame = serde_json::from_value::<ClientFrame>(json!({"type": "checkpoint", "id": 1, "patch": {}, "x": 1}));
        assert!(frame.is_err());
    }
}

// ---- Tasks -------------------------------------------------------------------------------

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

/// Tokens and cost units, spent or reserved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpendBody {
    #[serde(default)]
    pub tokens: u64,
    #[serde(default)]
    pub cost: u64,
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

/// The answer to a submit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskSubmitted {
    pub task: u64,
    /// False when an earlier task with the same idempotency key was returned.
    pub new: bool,
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

/// The answer to a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reserved {
    pub reservation: u64,
}

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

// ---- Tokens --------------------------------------------------------------------------------

/// An agent's tokens, as `POST /v1/agents/{agent}/tokens` and `/v1/auth/refresh` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenPair {
    pub agent: String,
    /// Sent as `Authorization: Bearer …`; short-lived.
    pub access_token: String,
    pub access_expires_at_ms: u64,
    /// Traded at `POST /v1/auth/refresh` for a new pair; each works once.
    pub refresh_token: String,
    pub refresh_expires_at_ms: u64,
}

/// `POST /v1/auth/refresh`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpRefresh {
    pub agent: String,
    pub refresh_token: String,
}

/// `POST /v1/agents/{agent}/tokens/revoke` (optional body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpRevoke {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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
