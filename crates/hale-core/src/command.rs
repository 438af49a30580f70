use crate::health::{Reporter, Severity};
use crate::hooks::HookKind;
use crate::liveness::Progress;
use crate::names::{AgentName, ConversationId, HookName, PointName, RoleName};
use crate::supervision::{Cause, ProcessRef, Supervision};
use crate::tasks::{LlmCall, Mode, Spend, TaskSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Something a client or the shell asks the core to do. Commands are not logged; the
/// events they cause are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// An agent introduces itself: registers (or updates its role and labels) and either
    /// starts a new run or resumes the one it names.
    Hello(Hello),
    /// Fold a JSON merge patch into the agent's state, making a new version.
    Checkpoint {
        agent: AgentName,
        incarnation: u64,
        patch: Value,
        /// If given, the checkpoint is refused unless the current version is this one.
        expected_version: Option<u64>,
    },
    /// Name the current version so it can be rolled back to later, whatever the history
    /// bound has dropped since.
    MarkRecoveryPoint { agent: AgentName, incarnation: u64, name: PointName },
    /// Make a new version whose state is that of an earlier version or recovery point.
    Rollback { agent: AgentName, incarnation: u64, target: RollbackTarget },
    /// The shell read hale.toml: this agent is managed, supervised so.
    Declare { agent: AgentName, role: RoleName, labels: BTreeMap<String, String>, supervision: Supervision },
    /// Start a managed agent that was never started or was stopped (`hale up` sends it for
    /// every declared agent), or whose backoff is over (`tick` sends it).
    StartManaged { agent: AgentName },
    /// The shell spawned the process of a managed incarnation.
    ProcessStarted { agent: AgentName, incarnation: u64, process: ProcessRef },
    /// A detector (in the shell, or the core's own `tick`) found the incarnation down.
    ReportDown { agent: AgentName, incarnation: u64, cause: Cause },
    /// The operator's `hale restart`: restart now, and forget the restart window (this is
    /// how a `failed` agent is revived).
    Restart { agent: AgentName },
    /// Stop a managed agent and do not restart it (`hale stop`, or hale stopping).
    Stop { agent: AgentName },
    /// Log the progress of an incarnation (from `tick`, at a bounded rate).
    RecordProgress { agent: AgentName, incarnation: u64, progress: Progress },
    /// Open the breaker after `errors` errors within the window (from `tick`).
    OpenBreaker { agent: AgentName, errors: u32 },
    /// The open time is over: probe (from `tick`).
    HalfOpenBreaker { agent: AgentName },
    /// The probe window passed without errors (from `tick`).
    CloseBreaker { agent: AgentName },
    /// A policy violation by `agent`, reported `by` someone.
    ReportViolation { agent: AgentName, by: Reporter, severity: Severity, reason: String },
    /// The operator's `hale quarantine`.
    Quarantine { agent: AgentName, reason: String },
    /// The operator's `hale release`.
    Release { agent: AgentName },
    /// The shell read hale.toml: a pool of agents of `role`.
    DeclareRole { role: RoleName, min: u32, max: u32, supervision: Supervision },
    /// The pool of `role` has fewer healthy agents than its minimum: start a new instance
    /// (from `tick`).
    Recruit { role: RoleName },
    /// Queue a task (answered with its number; the same idempotency key, the same task).
    SubmitTask { spec: TaskSpec },
    /// Lease a pending task to an agent's incarnation, at rung `rung` of its fallback
    /// ladder (from `tick`).
    AssignTask {
        task: u64,
        agent: AgentName,
        incarnation: u64,
        #[serde(default)]
        rung: u32,
    },
    /// The lease holder is about to run a step with side effects.
    IntendStep { task: u64, agent: AgentName, incarnation: u64, name: String },
    /// The lease holder finished a step (with the model call behind it, and what would
    /// undo it).
    CommitStep {
        task: u64,
        agent: AgentName,
        incarnation: u64,
        name: String,
        result: Value,
        #[serde(default)]
        llm: Option<LlmCall>,
        #[serde(default)]
        compensation: Option<Value>,
    },
    /// The lease holder finished the task.
    CompleteTask { task: u64, agent: AgentName, incarnation: u64, result: Value },
    /// The lease holder gave up on this attempt (retried if attempts are left and `retry`).
    FailTask { task: u64, agent: AgentName, incarnation: u64, reason: String, retry: bool },
    /// Stop the task wherever it is.
    CancelTask { task: u64 },
    /// The task is past its deadline or wall-time budget, or out of attempts (from `tick`).
    ExpireTask { task: u64 },
    /// The system mode follows capacity (from `tick`).
    SetMode { mode: Mode, serving: u32, roles: u32 },
    /// The agent's run reserves spending before an expensive call (for `task`, if given).
    Reserve { agent: AgentName, incarnation: u64, task: Option<u64>, spend: Spend },
    /// New credentials for `agent`: the shell minted a refresh token and hands its hash.
    IssueTokens { agent: AgentName, refresh_hash: String, expires_at: crate::Timestamp },
    /// `agent` presents the refresh token hashing to `presented_hash` for a new one.
    RefreshTokens { agent: AgentName, presented_hash: String, refresh_hash: String, expires_at: crate::Timestamp },
    /// Every token of `agent` stops working (`hale token revoke`).
    RevokeTokens { agent: AgentName, reason: String },
    /// The agent's run reports what it spent (settling `reservation`, if given).
    ReportSpend { agent: AgentName, incarnation: u64, task: Option<u64>, reservation: Option<u64>, spend: Spend },
    /// The agent's run sends a message (in `conversation`, or a new one hale names).
    SendMessage {
        from: AgentName,
        incarnation: u64,
        to: Recipient,
        conversation: Option<ConversationId>,
        body: Value,
        reply_to: Option<u64>,
        expects_reply: bool,
        /// The same key from the same sender: the same message, sent once.
        key: Option<String>,
    },
    /// The agent's run has acted on message `seq` of its mailbox.
    AckMessage { agent: AgentName, incarnation: u64, seq: u64 },
    /// The agent ends a conversation it takes part in.
    EndConversation { agent: AgentName, incarnation: u64, conversation: ConversationId },
    /// The shell tried to deliver hook `hook` about event `seq` (of kind `kind`)
    /// `attempts` times: it succeeded, or it gave up with `error`.
    RecordHookOutcome { hook: HookName, kind: HookKind, seq: u64, attempts: u32, error: Option<String> },
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipient {
    Agent(AgentName),
    /// One agent of the role (see `mail`).
    Role(RoleName),
}

/// The `hello` of a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub agent: AgentName,
    pub role: RoleName,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The incarnation the agent believes it has. `None` starts a new run, which gets the
    /// next incarnation; `Some(n)` resumes run `n` if it is still the current one.
    pub incarnation: Option<u64>,
}

/// What a rollback returns to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackTarget {
    /// A version still within the agent's retained history (or named by a recovery point).
    Version(u64),
    /// A named recovery point.
    Point(PointName),
}

impl Command {
    /// The agent this command concerns (none for commands about a role).
    pub fn agent(&self) -> Option<&AgentName> {
        Some(match self {
            Command::DeclareRole { .. }
            | Command::Recruit { .. }
            | Command::SubmitTask { .. }
            | Command::CancelTask { .. }
            | Command::ExpireTask { .. }
            | Command::SetMode { .. }
            | Command::IssueTokens { .. }
            | Command::RefreshTokens { .. }
            | Command::RevokeTokens { .. }
            | Command::RecordHookOutcome { .. } => return None,
            Command::AssignTask { agent, .. }
            | Command::IntendStep { agent, .. }
            | Command::Reserve { agent, .. }
            | Command::ReportSpend { agent, .. }
            | Command::CommitStep { agent, .. }
            | Command::CompleteTask { agent, .. }
            | Command::FailTask { agent, .. }
            | Command::AckMessage { agent, .. }
            | Command::EndConversation { agent, .. } => agent,
            Command::SendMessage { from, .. } => from,
            Command::Hello(hello) => &hello.agent,
            Command::Checkpoint { agent, .. }
            | Command::MarkRecoveryPoint { agent, .. }
            | Command::Rollback { agent, .. }
            | Command::Declare { agent, .. }
            | Command::StartManaged { agent }
            | Command::ProcessStarted { agent, .. }
            | Command::ReportDown { agent, .. }
            | Command::Restart { agent }
            | Command::Stop { agent }
            | Command::RecordProgress { agent, .. }
            | Command::OpenBreaker { agent, .. }
            | Command::HalfOpenBreaker { agent }
            | Command::CloseBreaker { agent }
            | Command::ReportViolation { agent, .. }
            | Command::Quarantine { agent, .. }
            | Command::Release { agent } => agent,
        })
    }
}
