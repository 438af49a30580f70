//! What a client or the shell asks the core to do, by domain, and what the core answers.
//!
//! Commands are not logged; the events they cause are. Each domain has its own `decide`
//! (`agents`, `supervision`, `health`, `tasks`, `mail`, `budget`, `credentials`, `hooks`),
//! and every decision comes back as a [`Decision`]: the events to log and the [`Answer`]
//! to give once they are durable. The shell never rebuilds an answer from the events.

use crate::Timestamp;
use crate::event::Event;
use crate::health::{Reporter, Severity};
use crate::hooks::HookKind;
use crate::liveness::Progress;
use crate::names::{AgentName, ConversationId, HookName, NodeName, PointName, RoleName};
use crate::nodes::NodeInfo;
use crate::supervision::{Cause, ProcessRef, Supervision};
use crate::tasks::{LlmCall, Mode, Spend, TaskSpec};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Something a client or the shell asks the core to do, by domain.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// An agent's registration, runs, state versions and progress.
    Agent(AgentCommand),
    /// Managed agents' processes and restarts, and role pools.
    Supervision(SupervisionCommand),
    /// Circuit breakers, policy violations and quarantine.
    Health(HealthCommand),
    /// The task queue.
    Task(TaskCommand),
    /// Mailboxes and conversations.
    Mail(MailCommand),
    /// Reservations and spending.
    Budget(BudgetCommand),
    /// Agents' refresh tokens and token generations.
    Credentials(CredentialCommand),
    /// Outcomes of failure hooks.
    Hook(HookCommand),
}

/// An agent's registration, runs, state versions and progress.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentCommand {
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
    /// Log the progress of an incarnation (from `tick`, at a bounded rate).
    RecordProgress { agent: AgentName, incarnation: u64, progress: Progress },
}

/// Managed agents' processes and restarts, and role pools.
#[derive(Clone, Debug, PartialEq)]
pub enum SupervisionCommand {
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
    /// A node of the cluster is up (it renewed its lease with the leader) and says this of
    /// itself.
    NodeUp { node: NodeName, info: NodeInfo },
    /// The leader has not heard from the node for `silent_ms`, its node timeout.
    NodeLost { node: NodeName, silent_ms: u64 },
    /// The shell read hale.toml: a pool of agents of `role`.
    DeclareRole { role: RoleName, min: u32, max: u32, supervision: Supervision },
    /// The pool of `role` has fewer healthy agents than its minimum: start a new instance
    /// (from `tick`).
    Recruit { role: RoleName },
}

/// Circuit breakers, policy violations and quarantine.
#[derive(Clone, Debug, PartialEq)]
pub enum HealthCommand {
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
}

/// The task queue.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskCommand {
    /// Queue a task (answered with its number; the same idempotency key, the same task).
    /// `by` is the agent that submits it, if an agent does (a quarantined one may not);
    /// it is not logged.
    Submit { spec: TaskSpec, by: Option<AgentName> },
    /// Lease a pending task to an agent's incarnation, at rung `rung` of its fallback
    /// ladder (from `tick`).
    Assign { task: u64, agent: AgentName, incarnation: u64, rung: u32 },
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
        llm: Option<LlmCall>,
        compensation: Option<Value>,
        /// The reservation the model call's tokens settle, if one was made for it.
        reservation: Option<u64>,
    },
    /// The lease holder finished the task.
    Complete { task: u64, agent: AgentName, incarnation: u64, result: Value },
    /// The lease holder gave up on this attempt (retried if attempts are left and `retry`).
    Fail { task: u64, agent: AgentName, incarnation: u64, reason: String, retry: bool },
    /// Stop the task wherever it is.
    Cancel { task: u64 },
    /// The agent that submitted `task` has the outcome: stop pushing it (idempotent).
    TakeOutcome { agent: AgentName, incarnation: u64, task: u64 },
    /// The task is past its deadline or wall-time budget, or out of attempts (from `tick`).
    Expire { task: u64 },
    /// The system mode follows capacity (from `tick`).
    SetMode { mode: Mode, serving: u32, roles: u32 },
}

/// Mailboxes and conversations.
#[derive(Clone, Debug, PartialEq)]
pub enum MailCommand {
    /// The agent's run sends a message (in `conversation`, or a new one hale names).
    Send {
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
    Ack { agent: AgentName, incarnation: u64, seq: u64 },
    /// The agent ends a conversation it takes part in.
    EndConversation { agent: AgentName, incarnation: u64, conversation: ConversationId },
}

/// Reservations and spending.
#[derive(Clone, Debug, PartialEq)]
pub enum BudgetCommand {
    /// The agent's run reserves spending before an expensive call (for `task`, if given).
    Reserve { agent: AgentName, incarnation: u64, task: Option<u64>, spend: Spend },
    /// The agent's run reports what it spent (settling `reservation`, if given).
    ReportSpend { agent: AgentName, incarnation: u64, task: Option<u64>, reservation: Option<u64>, spend: Spend },
}

/// Agents' refresh tokens and token generations.
#[derive(Clone, Debug, PartialEq)]
pub enum CredentialCommand {
    /// New credentials for `agent`: the shell minted a refresh token and hands its hash.
    Issue { agent: AgentName, refresh_hash: String, expires_at: Timestamp },
    /// `agent` presents the refresh token hashing to `presented_hash` for a new one.
    Refresh { agent: AgentName, presented_hash: String, refresh_hash: String, expires_at: Timestamp },
    /// Every token of `agent` stops working (`hale token revoke`).
    Revoke { agent: AgentName, reason: String },
}

/// Outcomes of failure hooks.
#[derive(Clone, Debug, PartialEq)]
pub enum HookCommand {
    /// The shell tried to deliver hook `hook` about event `seq` (of kind `kind`)
    /// `attempts` times: it succeeded, or it gave up with `error`.
    RecordOutcome { hook: HookName, kind: HookKind, seq: u64, attempts: u32, error: Option<String> },
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recipient {
    Agent(AgentName),
    /// One agent of the role (see `mail`).
    Role(RoleName),
}

/// The `hello` of a session.
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    pub agent: AgentName,
    pub role: RoleName,
    pub labels: BTreeMap<String, String>,
    /// The incarnation the agent believes it has. `None` starts a new run, which gets the
    /// next incarnation; `Some(n)` resumes run `n` if it is still the current one.
    pub incarnation: Option<u64>,
}

/// What a rollback returns to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RollbackTarget {
    /// A version still within the agent's retained history (or named by a recovery point).
    Version(u64),
    /// A named recovery point.
    Point(PointName),
}

/// What the core decided: the events to log, in order, and the answer to give once they
/// are durable. A decision with no events changed nothing (a repeat, or a no-op).
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub events: Vec<Event>,
    pub answer: Answer,
}

impl Decision {
    /// Events whose answer is only that they were carried out.
    pub fn done(events: Vec<Event>) -> Decision {
        Decision { events, answer: Answer::Done }
    }

    /// A decision that logs nothing and answers `answer`.
    pub fn answer(answer: Answer) -> Decision {
        Decision { events: Vec::new(), answer }
    }
}

/// What a command that was carried out answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// Carried out (it may have changed nothing).
    Done,
    /// A hello: run `incarnation` of `agent` is the session's; `resumed` if the hello
    /// resumed it rather than starting it.
    Welcome { agent: AgentName, incarnation: u64, resumed: bool },
    /// The operator's restart started run `incarnation`.
    Restarted { incarnation: u64 },
    /// A checkpoint made `version`.
    Checkpointed { version: u64 },
    /// `version` is named `name`, as of `marked_at`.
    RecoveryPointMarked { name: PointName, version: u64, marked_at: Timestamp },
    /// A rollback made `version`, whose state is that of `target_version`.
    RolledBack { version: u64, target_version: u64, state: Arc<Value> },
    /// A task was accepted as `task` (`new`), or an earlier one with the same idempotency
    /// key was found.
    TaskSubmitted { task: u64, new: bool },
    /// Spending was reserved as number `reservation`.
    Reserved { reservation: u64 },
    /// A message was sent (`new`), or an earlier send with the same key was found.
    Sent { message: u64, to: AgentName, seq: u64, conversation: ConversationId, new: bool },
    /// The agent's tokens are at `generation`; `revoked` if this command revoked them
    /// (a revoke, or a refresh token presented twice).
    Tokens { generation: u64, revoked: bool },
}

macro_rules! domain {
    ($($variant:ident($domain:ty)),* $(,)?) => {
        $(impl From<$domain> for Command {
            fn from(command: $domain) -> Command {
                Command::$variant(command)
            }
        })*
    };
}

domain! {
    Agent(AgentCommand),
    Supervision(SupervisionCommand),
    Health(HealthCommand),
    Task(TaskCommand),
    Mail(MailCommand),
    Budget(BudgetCommand),
    Credentials(CredentialCommand),
    Hook(HookCommand),
}

impl From<Hello> for Command {
    fn from(hello: Hello) -> Command {
        Command::Agent(AgentCommand::Hello(hello))
    }
}
