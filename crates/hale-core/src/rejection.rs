use crate::names::NameError;

/// Why the core refused a command. Nothing was changed or logged.
///
/// Each variant has a stable [`code`](Rejection::code) that clients match on; the
/// messages say what was wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A name or label was malformed.
    #[error("{0}")]
    InvalidName(#[from] NameError),
    /// No agent by this name has said hello.
    #[error("no agent named {agent:?}; an agent is registered by its first hello")]
    UnknownAgent { agent: String },
    /// The agent has never started a run, so no write can carry a valid incarnation.
    #[error("agent {agent:?} has no running incarnation; send hello first")]
    NotStarted { agent: String },
    /// The write or hello carries an incarnation older than the agent's current one: a
    /// newer run has started and this one is fenced off.
    #[error(
        "incarnation {given} of agent {agent:?} is stale: incarnation {current} has started since; this process must stop or say hello again without an incarnation"
    )]
    StaleIncarnation { agent: String, given: u64, current: u64 },
    /// A hello or a write names an incarnation that was never issued (higher than the
    /// agent's current one).
    #[error(
        "incarnation {given} of agent {agent:?} was never issued (the latest is {current}); say hello without an incarnation to start a new run"
    )]
    UnknownIncarnation { agent: String, given: u64, current: u64 },
    /// A checkpoint patch that is not a JSON object.
    #[error("a checkpoint patch must be a JSON object (an RFC 7396 merge patch); got {got}")]
    PatchNotObject { got: &'static str },
    /// A checkpoint patch over `patch_bytes_max`.
    #[error("the patch is {size} bytes; the limit is {max} bytes (limits.patch_bytes_max): send smaller increments")]
    PatchTooLarge { size: usize, max: usize },
    /// A checkpoint patch nested deeper than `patch_depth_max`.
    #[error("the patch nests {depth} levels deep; the limit is {max} (limits.patch_depth_max): flatten it")]
    PatchTooDeep { depth: usize, max: usize },
    /// The state after folding the patch would exceed `state_bytes_max`.
    #[error(
        "the state would grow to {size} bytes; the limit is {max} bytes (limits.state_bytes_max): delete members with null or keep bulk data elsewhere"
    )]
    StateTooLarge { size: usize, max: usize },
    /// `expected_version` did not match the current version.
    #[error("expected version {expected} but the state is at version {current}; fetch the state and reconcile")]
    VersionConflict { expected: u64, current: u64 },
    /// A rollback to a recovery point that does not exist.
    #[error("agent {agent:?} has no recovery point named {name:?}")]
    UnknownRecoveryPoint { agent: String, name: String },
    /// A rollback or read of a version no longer (or not yet) retained.
    #[error(
        "version {version} of agent {agent:?} is not retained: the history holds versions {oldest}..={newest} and those named by recovery points"
    )]
    VersionNotRetained { agent: String, version: u64, oldest: u64, newest: u64 },
    /// The agent already holds `recovery_points_max` recovery points.
    #[error(
        "agent {agent:?} already holds {max} recovery points (limits.recovery_points_max); reuse a name to replace one"
    )]
    TooManyRecoveryPoints { agent: String, max: usize },
    /// The incarnation was declared down (crashed, silent, stalled…): it is fenced off.
    #[error(
        "incarnation {incarnation} of agent {agent:?} was declared down ({cause}); this process must stop or say hello again without an incarnation"
    )]
    IncarnationDown { agent: String, incarnation: u64, cause: String },
    /// An operation on managed agents (e.g. `hale restart`) named one hale.toml does not declare.
    #[error(
        "agent {agent:?} is not managed by hale (no [[agent]] in hale.toml declares it), so hale does not start, stop or restart it"
    )]
    NotManaged { agent: String },
    /// A quarantined agent tried to submit a task or send a message (ask and reply are
    /// sends): it may only checkpoint, heartbeat and read until the operator releases it.
    #[error(
        "agent {agent:?} is quarantined ({reason}): it may checkpoint but not submit tasks or send messages until the operator runs `hale release {agent}`"
    )]
    Quarantined { agent: String, reason: String },
    /// A hello that would start a new run of an agent hale runs (its process must resume the
    /// run hale started for it).
    #[error(
        "agent {agent:?} is run by hale (hale.toml declares it): say hello with the incarnation in HALE_INCARNATION (now {current}); to run it by hand, remove it from hale.toml"
    )]
    ManagedByHale { agent: String, current: u64 },
    /// A heartbeat's progress over [`PROGRESS_BYTES_MAX`](crate::PROGRESS_BYTES_MAX).
    #[error("the progress report is {size} bytes; the limit is {max}: keep bulk data in checkpoints")]
    ProgressTooLarge { size: usize, max: usize },
    /// A start or restart of a managed agent asked of a hale that runs no agents.
    #[error("this hale runs no agents (`hale serve`), so it cannot start {agent:?}; run `hale up -c hale.toml`")]
    NotSupervising { agent: String },
    /// No task has this number.
    #[error("no task number {task}")]
    UnknownTask { task: u64 },
    /// A step, completion or failure from an incarnation that does not hold the task's
    /// lease: it was declared down, or the task was reassigned or has ended.
    #[error(
        "incarnation {incarnation} of agent {agent:?} does not hold the lease of task {task}; drop the work, its result would not count"
    )]
    LeaseLost { task: u64, agent: String, incarnation: u64 },
    /// A cancel of a task that has ended.
    #[error("task {task} has already ended ({status})")]
    TaskEnded { task: u64, status: String },
    /// A task that cannot be run as submitted.
    #[error("bad task: {reason}")]
    BadTask { reason: String },
    /// An intent for a step already committed, or a commit of it with another result.
    #[error("step {step:?} of task {task} is already done; use the result the task was handed")]
    StepDone { task: u64, step: String },
    /// A submission refused because the queue is saturated (retry after `retry_after_ms`).
    #[error(
        "hale is overloaded ({queued} queued tasks, mode {mode}): {priority} submissions are refused from {limit}; retry in {retry_after_ms} ms, or submit as critical if it is"
    )]
    Overloaded { priority: String, queued: u64, limit: u64, mode: String, retry_after_ms: u64 },
    /// A reservation that would take the agent or the task over its budget.
    #[error("the reservation would exceed the budget of {whose}: {detail}; spend less, or raise the budget")]
    OverBudget { whose: String, detail: String },
    /// A refresh that cannot be honoured.
    #[error("refresh refused for agent {agent:?}: {reason}")]
    RefreshRefused { agent: String, reason: String },
    /// A pool that hale.toml does not declare.
    #[error("no role pool named {role:?}; declare it with [[role]] in hale.toml")]
    UnknownRole { role: String },
    /// A violation or quarantine reason over the limit.
    #[error("the reason is {size} bytes; the limit is {max}: say it in a sentence")]
    ReasonTooLong { size: usize, max: usize },
    /// A progress fraction outside 0..=1.
    #[error("progress.fraction must be between 0 and 1, got {got}")]
    BadFraction { got: String },
    /// A message body over `message_bytes_max`.
    #[error(
        "the message body is {size} bytes; the limit is {max} bytes (limits.message_bytes_max): send a reference to bulk data instead"
    )]
    MessageTooLarge { size: usize, max: usize },
    /// A message that cannot be sent as given.
    #[error("bad message: {reason}")]
    BadMessage { reason: String },
    /// Nobody to deliver a message to.
    #[error("no recipient: {detail}")]
    NoRecipient { detail: String },
    /// The recipient's mailbox holds `mailbox_max` unacked messages.
    #[error(
        "the mailbox of agent {agent:?} is full ({max} unacked messages, limits.mailbox_max): retry once it has acked some"
    )]
    MailboxFull { agent: String, max: usize },
    /// An ack or reply naming a message that does not exist.
    #[error("unknown message: {detail}")]
    UnknownMessage { detail: String },
    /// Ending a conversation the agent takes no part in.
    #[error("agent {agent:?} takes no part in conversation {conversation:?}")]
    UnknownConversation { agent: String, conversation: String },
    /// A new conversation for an agent that already has `conversations_max` open.
    #[error(
        "agent {agent:?} already takes part in {max} open conversations (limits.conversations_max): end some with end_conversation"
    )]
    TooManyConversations { agent: String, max: usize },
    /// A node of the cluster said it is up under a name, or with a Raft node id, that
    /// another node already has.
    #[error(
        "node {node:?} (id {id}) cannot join: {by} already has that name or id; give every node of the cluster its own [cluster] name and node_id"
    )]
    NodeTaken { node: String, id: u64, by: String },
}

impl Rejection {
    /// The stable machine-readable code of this rejection, e.g. `stale_incarnation`.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::InvalidName(_) => "invalid_name",
            Rejection::UnknownAgent { .. } => "unknown_agent",
            Rejection::NotStarted { .. } => "not_started",
            Rejection::StaleIncarnation { .. } => "stale_incarnation",
            Rejection::UnknownIncarnation { .. } => "unknown_incarnation",
            Rejection::PatchNotObject { .. } => "patch_not_object",
            Rejection::PatchTooLarge { .. } => "patch_too_large",
            Rejection::PatchTooDeep { .. } => "patch_too_deep",
            Rejection::StateTooLarge { .. } => "state_too_large",
            Rejection::VersionConflict { .. } => "version_conflict",
            Rejection::UnknownRecoveryPoint { .. } => "unknown_recovery_point",
            Rejection::VersionNotRetained { .. } => "version_not_retained",
            Rejection::TooManyRecoveryPoints { .. } => "too_many_recovery_points",
            Rejection::IncarnationDown { .. } => "incarnation_down",
            Rejection::NotManaged { .. } => "not_managed",
            Rejection::ManagedByHale { .. } => "managed_by_hale",
            Rejection::Quarantined { .. } => "quarantined",
            Rejection::ProgressTooLarge { .. } => "progress_too_large",
            Rejection::BadFraction { .. } => "bad_fraction",
            Rejection::ReasonTooLong { .. } => "reason_too_long",
            Rejection::UnknownRole { .. } => "unknown_role",
            Rejection::NotSupervising { .. } => "not_supervising",
            Rejection::UnknownTask { .. } => "unknown_task",
            Rejection::LeaseLost { .. } => "lease_lost",
            Rejection::TaskEnded { .. } => "task_ended",
            Rejection::BadTask { .. } => "bad_task",
            Rejection::StepDone { .. } => "step_done",
            Rejection::Overloaded { .. } => "overloaded",
            Rejection::OverBudget { .. } => "over_budget",
            Rejection::RefreshRefused { .. } => "refresh_refused",
            Rejection::MessageTooLarge { .. } => "message_too_large",
            Rejection::BadMessage { .. } => "bad_message",
            Rejection::NoRecipient { .. } => "no_recipient",
            Rejection::MailboxFull { .. } => "mailbox_full",
            Rejection::UnknownMessage { .. } => "unknown_message",
            Rejection::UnknownConversation { .. } => "unknown_conversation",
            Rejection::TooManyConversations { .. } => "too_many_conversations",
            Rejection::NodeTaken { .. } => "node_taken",
        }
    }
}
