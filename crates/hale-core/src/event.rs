use crate::Timestamp;
use crate::health::{QuarantineAction, Reporter, Severity};
use crate::hooks::HookKind;
use crate::liveness::Progress;
use crate::names::{AgentName, ConversationId, HookName, NodeName, PointName, RoleName};
use crate::nodes::NodeInfo;
use crate::supervision::{Cause, ProcessRef, Supervision};
use crate::tasks::{Level, LlmCall, Mode, Outcome, Parent, Spend, TaskSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// A durable fact. The log is a sequence of these; the state is their fold.
///
/// The serde shape of this type is log format 1 (see `hale-store`): renaming a variant
/// or a field changes the disk format and needs a new format number and a conversion.
///
/// Externally tagged (`{"checkpointed": {...}}`) rather than internally: serde then
/// decodes in one pass instead of buffering every record, which matters for replay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// An agent was registered, or its role or labels changed.
    AgentRegistered {
        agent: AgentName,
        role: RoleName,
        labels: BTreeMap<String, String>,
    },
    /// A new run of the agent began; writes from earlier incarnations are refused from now on.
    IncarnationStarted {
        agent: AgentName,
        incarnation: u64,
    },
    /// A merge patch was folded into the agent's state, making `version`.
    Checkpointed {
        agent: AgentName,
        incarnation: u64,
        version: u64,
        patch: Value,
    },
    /// `version` was named `name`.
    RecoveryPointMarked {
        agent: AgentName,
        incarnation: u64,
        name: PointName,
        version: u64,
    },
    /// The state of `target_version` became the new `version`. The event carries that
    /// state, so replaying it never depends on how much history was retained.
    RolledBack {
        agent: AgentName,
        incarnation: u64,
        target_version: u64,
        version: u64,
        state: Value,
    },
    /// hale.toml declares the agent as managed (or changed how it is supervised).
    AgentDeclared {
        agent: AgentName,
        role: RoleName,
        labels: BTreeMap<String, String>,
        supervision: Supervision,
    },
    /// The process of a managed incarnation was spawned: kept so that a restarted hale can
    /// tell whether it is still the same process and adopt it.
    ProcessStarted {
        agent: AgentName,
        incarnation: u64,
        process: ProcessRef,
    },
    /// A detector declared the incarnation down. Its writes are refused from now on.
    AgentDown {
        agent: AgentName,
        incarnation: u64,
        cause: Cause,
    },
    /// A restart was decided: restart number `attempt` within the intensity window, due at
    /// `due` (the time of the decision for the first, later ones after a backoff).
    RestartScheduled {
        agent: AgentName,
        attempt: u32,
        due: Timestamp,
    },
    /// More than the allowed restarts within the window: no more restarts until the
    /// operator asks. This is the escalation.
    AgentFailed {
        agent: AgentName,
        restarts: u32,
        window_ms: u64,
    },
    /// The operator asked for a restart, which also forgets the restart window.
    RestartRequested {
        agent: AgentName,
    },
    /// Progress reported by heartbeats, logged when it changed and at a bounded rate.
    ProgressReported {
        agent: AgentName,
        incarnation: u64,
        progress: Progress,
    },
    /// An error spike opened the agent's circuit breaker until `until`.
    BreakerOpened {
        agent: AgentName,
        errors: u32,
        until: Timestamp,
    },
    /// The breaker's open time is over: probing.
    BreakerHalfOpened {
        agent: AgentName,
    },
    /// A probe window passed without errors.
    BreakerClosed {
        agent: AgentName,
    },
    /// A policy violation by the agent, reported by itself, another agent or the operator.
    ViolationReported {
        agent: AgentName,
        by: Reporter,
        severity: Severity,
        reason: String,
    },
    /// The agent gets no work, and may not submit or send, until released.
    Quarantined {
        agent: AgentName,
        by: Reporter,
        reason: String,
        /// What was done to its process; left out of the log when only isolated.
        #[serde(default, skip_serializing_if = "QuarantineAction::is_isolate")]
        action: QuarantineAction,
    },
    /// The operator released the agent from quarantine (its violations are forgotten).
    Released {
        agent: AgentName,
    },
    /// hale.toml declares a pool of interchangeable agents of `role`: hale keeps at least
    /// `min` healthy and starts at most `max`, each supervised as `supervision` says.
    RoleDeclared {
        role: RoleName,
        min: u32,
        max: u32,
        supervision: Supervision,
    },
    /// A task was accepted as number `task` (a run of a shadowed task, or a compensation,
    /// has a parent).
    TaskSubmitted {
        task: u64,
        spec: TaskSpec,
        #[serde(default)]
        parent: Option<Parent>,
        /// The agent that submitted it, if one did: it is told the outcome.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<AgentName>,
    },
    /// The agent that submitted `task` has taken its outcome: it is not pushed again.
    OutcomeTaken {
        agent: AgentName,
        task: u64,
    },
    /// The shadowed task runs as `children`, on distinct agents.
    TaskShadowed {
        task: u64,
        children: Vec<u64>,
    },
    /// The task was leased to `incarnation` of `agent`, as attempt `attempt`, at rung
    /// `rung` of its fallback ladder.
    TaskAssigned {
        task: u64,
        agent: AgentName,
        incarnation: u64,
        attempt: u32,
        #[serde(default)]
        rung: u32,
    },
    /// The holder is about to run a step with side effects.
    StepIntended {
        task: u64,
        attempt: u32,
        name: String,
    },
    /// A step of the task is done; its result survives the attempt.
    StepCommitted {
        task: u64,
        attempt: u32,
        name: String,
        result: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        llm: Option<LlmCall>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compensation: Option<Value>,
    },
    TaskCompleted {
        task: u64,
        result: Value,
        #[serde(default)]
        level: Level,
    },
    /// The attempt failed with attempts left: the task is pending again (from
    /// `not_before`, when it backs off).
    TaskRetried {
        task: u64,
        reason: String,
        #[serde(default)]
        not_before: Option<Timestamp>,
    },
    TaskFailed {
        task: u64,
        reason: String,
    },
    TaskCancelled {
        task: u64,
    },
    /// The task was aborted: task `child` undoes `step`; then the task ends as `outcome`.
    TaskCompensating {
        task: u64,
        #[serde(flatten)]
        outcome: Outcome,
        step: String,
        child: u64,
    },
    /// The compensation of `step` did not succeed; the ones before it still run.
    CompensationFailed {
        task: u64,
        step: String,
        reason: String,
    },
    /// How a quorum of a shadowed task's runs was reached (or missed).
    TaskArbitrated {
        task: u64,
        agreed: Vec<u64>,
        dissent: Vec<u64>,
    },
    /// The system mode changed: `serving` of `roles` roles have a healthy agent.
    ModeChanged {
        mode: Mode,
        serving: u32,
        roles: u32,
    },
    /// Spending reserved by a run, counted in the agent's period that began at `period`.
    BudgetReserved {
        reservation: u64,
        agent: AgentName,
        incarnation: u64,
        task: Option<u64>,
        spend: Spend,
        period: Timestamp,
    },
    /// Spending reported by a run (settling `reservation`).
    SpendReported {
        agent: AgentName,
        incarnation: u64,
        task: Option<u64>,
        reservation: Option<u64>,
        spend: Spend,
        period: Timestamp,
    },
    /// Credentials were issued to `agent`: the hash of its refresh token (access tokens
    /// of `generation` work).
    TokensIssued {
        agent: AgentName,
        generation: u64,
        refresh_hash: String,
        expires_at: Timestamp,
    },
    /// The refresh token was rotated.
    TokensRefreshed {
        agent: AgentName,
        refresh_hash: String,
        expires_at: Timestamp,
    },
    /// Every token of `agent` stopped working; its sessions end.
    TokensRevoked {
        agent: AgentName,
        reason: String,
    },
    /// The agent's run went over its budget or its task's: its tasks are redistributed.
    BudgetBreached {
        agent: AgentName,
        incarnation: u64,
        task: Option<u64>,
        detail: String,
    },
    /// Message `id` was put in `to`'s mailbox as `seq` (sent at the record's time).
    MessageSent {
        id: u64,
        seq: u64,
        from: AgentName,
        to: AgentName,
        conversation: ConversationId,
        body: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
        #[serde(default)]
        expects_reply: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// `agent` acted on message `seq` of its mailbox: it is not delivered again.
    MessageAcked {
        agent: AgentName,
        seq: u64,
    },
    /// The conversation ended: what its participants owed in it is no longer pending.
    ConversationEnded {
        conversation: ConversationId,
        by: AgentName,
    },
    /// Hook `hook` was told of event `seq` (a `kind` event), at the `attempts`-th try.
    HookDelivered {
        hook: HookName,
        kind: HookKind,
        seq: u64,
        attempts: u32,
    },
    /// Hook `hook` could not be told of event `seq` in `attempts` tries; the last said
    /// `error`. Nobody retries it: the event is in the log for whoever looks.
    HookFailed {
        hook: HookName,
        kind: HookKind,
        seq: u64,
        attempts: u32,
        error: String,
    },
    /// A node of the cluster is up: the first time, back after it was lost, or saying
    /// something new of itself (see `nodes`).
    NodeJoined {
        node: NodeName,
        info: NodeInfo,
    },
    /// The leader had not heard from the node for `silent_ms`: its agents were taken down
    /// with it (in the same decision).
    NodeLost {
        node: NodeName,
        silent_ms: u64,
    },
    /// `incarnation` of the managed agent runs on `node` (logged just before that
    /// incarnation starts).
    AgentPlaced {
        agent: AgentName,
        incarnation: u64,
        node: NodeName,
    },
    /// The managed agent is to start, but no node that is up may run it, for `reason`.
    AgentPending {
        agent: AgentName,
        reason: String,
    },
}

impl Event {
    /// Whether work may have become assignable: a task queued or freed, or an agent lost
    /// (its leases went back). The shell then runs [`Core::dispatch`](crate::Core::dispatch)
    /// at once rather than at the next tick.
    pub fn moves_work(&self) -> bool {
        matches!(
            self,
            Event::TaskSubmitted { .. }
                | Event::TaskRetried { .. }
                | Event::TaskCompleted { .. }
                | Event::TaskFailed { .. }
                | Event::TaskCancelled { .. }
                | Event::TaskCompensating { .. }
                | Event::AgentDown { .. }
                | Event::Quarantined { .. }
                | Event::BudgetBreached { .. }
                | Event::BreakerOpened { .. }
        )
    }

    /// The agent this event concerns (none for a role's declaration).
    pub fn agent(&self) -> Option<&AgentName> {
        Some(match self {
            Event::RoleDeclared { .. }
            | Event::TaskSubmitted { .. }
            | Event::TaskAssigned { .. }
            | Event::StepCommitted { .. }
            | Event::TaskCompleted { .. }
            | Event::TaskRetried { .. }
            | Event::TaskFailed { .. }
            | Event::TaskCancelled { .. }
            | Event::TaskShadowed { .. }
            | Event::StepIntended { .. }
            | Event::TaskCompensating { .. }
            | Event::CompensationFailed { .. }
            | Event::TaskArbitrated { .. }
            | Event::ModeChanged { .. }
            | Event::TokensIssued { .. }
            | Event::TokensRefreshed { .. }
            | Event::TokensRevoked { .. }
            | Event::MessageSent { .. }
            | Event::ConversationEnded { .. }
            | Event::HookDelivered { .. }
            | Event::HookFailed { .. }
            | Event::NodeJoined { .. }
            | Event::NodeLost { .. } => return None,
            Event::MessageAcked { agent, .. } | Event::OutcomeTaken { agent, .. } => agent,
            Event::BudgetReserved { agent, .. }
            | Event::SpendReported { agent, .. }
            | Event::BudgetBreached { agent, .. } => agent,
            Event::AgentRegistered { agent, .. }
            | Event::IncarnationStarted { agent, .. }
            | Event::Checkpointed { agent, .. }
            | Event::RecoveryPointMarked { agent, .. }
            | Event::RolledBack { agent, .. }
            | Event::AgentDeclared { agent, .. }
            | Event::ProcessStarted { agent, .. }
            | Event::AgentDown { agent, .. }
            | Event::RestartScheduled { agent, .. }
            | Event::AgentFailed { agent, .. }
            | Event::RestartRequested { agent }
            | Event::ProgressReported { agent, .. }
            | Event::BreakerOpened { agent, .. }
            | Event::BreakerHalfOpened { agent }
            | Event::BreakerClosed { agent }
            | Event::ViolationReported { agent, .. }
            | Event::Quarantined { agent, .. }
            | Event::Released { agent }
            | Event::AgentPlaced { agent, .. }
            | Event::AgentPending { agent, .. } => agent,
        })
    }

    /// A short stable name of the kind of event, e.g. `checkpointed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::AgentRegistered { .. } => "agent_registered",
            Event::IncarnationStarted { .. } => "incarnation_started",
            Event::Checkpointed { .. } => "checkpointed",
            Event::RecoveryPointMarked { .. } => "recovery_point_marked",
            Event::RolledBack { .. } => "rolled_back",
            Event::AgentDeclared { .. } => "agent_declared",
            Event::ProcessStarted { .. } => "process_started",
            Event::AgentDown { .. } => "agent_down",
            Event::RestartScheduled { .. } => "restart_scheduled",
            Event::AgentFailed { .. } => "agent_failed",
            Event::RestartRequested { .. } => "restart_requested",
            Event::ProgressReported { .. } => "progress_reported",
            Event::BreakerOpened { .. } => "breaker_opened",
            Event::BreakerHalfOpened { .. } => "breaker_half_opened",
            Event::BreakerClosed { .. } => "breaker_closed",
            Event::ViolationReported { .. } => "violation_reported",
            Event::Quarantined { .. } => "quarantined",
            Event::Released { .. } => "released",
            Event::RoleDeclared { .. } => "role_declared",
            Event::TaskSubmitted { .. } => "task_submitted",
            Event::OutcomeTaken { .. } => "outcome_taken",
            Event::TaskAssigned { .. } => "task_assigned",
            Event::StepCommitted { .. } => "step_committed",
            Event::TaskCompleted { .. } => "task_completed",
            Event::TaskRetried { .. } => "task_retried",
            Event::TaskFailed { .. } => "task_failed",
            Event::TaskCancelled { .. } => "task_cancelled",
            Event::TaskShadowed { .. } => "task_shadowed",
            Event::StepIntended { .. } => "step_intended",
            Event::TaskCompensating { .. } => "task_compensating",
            Event::CompensationFailed { .. } => "compensation_failed",
            Event::TaskArbitrated { .. } => "task_arbitrated",
            Event::ModeChanged { .. } => "mode_changed",
            Event::BudgetReserved { .. } => "budget_reserved",
            Event::SpendReported { .. } => "spend_reported",
            Event::BudgetBreached { .. } => "budget_breached",
            Event::TokensIssued { .. } => "tokens_issued",
            Event::TokensRefreshed { .. } => "tokens_refreshed",
            Event::TokensRevoked { .. } => "tokens_revoked",
            Event::MessageSent { .. } => "message_sent",
            Event::MessageAcked { .. } => "message_acked",
            Event::ConversationEnded { .. } => "conversation_ended",
            Event::HookDelivered { .. } => "hook_delivered",
            Event::HookFailed { .. } => "hook_failed",
            Event::NodeJoined { .. } => "node_joined",
            Event::NodeLost { .. } => "node_lost",
            Event::AgentPlaced { .. } => "agent_placed",
            Event::AgentPending { .. } => "agent_pending",
        }
    }
}

#[cfg(test)]
mod tests {
    //! `Event::kind` and `HookKind::ALL` are names kept by hand beside serde's: the log,
    //! `GET /v1/events?kind=`, the dashboard and hale.toml's hooks use them. These tests
    //! hold them equal to the names serde reads, taking serde's own list of variants, so an
    //! event or hook kind added without a name, or named differently, fails here.

    use super::*;
    use serde::de::{self, DeserializeOwned, IntoDeserializer};
    use serde_json::json;

    /// One event of every kind, in the log's JSON (format 1), so that it reads on whatever
    /// the Rust types become as long as the format holds.
    fn one_of_each() -> Vec<Value> {
        let supervision = serde_json::to_value(Supervision::default()).unwrap();
        let spend = json!({"tokens": 10, "cost": 1});
        vec![
            json!({"agent_registered": {"agent": "a", "role": "r", "labels": {}}}),
            json!({"incarnation_started": {"agent": "a", "incarnation": 1}}),
            json!({"checkpointed": {"agent": "a", "incarnation": 1, "version": 1, "patch": {}}}),
            json!({"recovery_point_marked": {"agent": "a", "incarnation": 1, "name": "p", "version": 1}}),
            json!({"rolled_back": {"agent": "a", "incarnation": 1, "target_version": 1, "version": 2, "state": {}}}),
            json!({"agent_declared": {"agent": "a", "role": "r", "labels": {}, "supervision": supervision}}),
            json!({"process_started": {"agent": "a", "incarnation": 1, "process": {"pid": 7, "start_ticks": 9}}}),
            json!({"agent_down": {"agent": "a", "incarnation": 1, "cause": "stopped"}}),
            json!({"restart_scheduled": {"agent": "a", "attempt": 1, "due": 5}}),
            json!({"agent_failed": {"agent": "a", "restarts": 3, "window_ms": 1000}}),
            json!({"restart_requested": {"agent": "a"}}),
            json!({"progress_reported": {"agent": "a", "incarnation": 1, "progress": {}}}),
            json!({"breaker_opened": {"agent": "a", "errors": 5, "until": 5}}),
            json!({"breaker_half_opened": {"agent": "a"}}),
            json!({"breaker_closed": {"agent": "a"}}),
            json!({"violation_reported": {"agent": "a", "by": "operator", "severity": "minor", "reason": "x"}}),
            json!({"quarantined": {"agent": "a", "by": "operator", "reason": "x"}}),
            json!({"released": {"agent": "a"}}),
            json!({"role_declared": {"role": "r", "min": 1, "max": 2, "supervision": supervision}}),
            json!({"task_submitted": {"task": 1, "spec": {"role": "r"}}}),
            json!({"outcome_taken": {"agent": "a", "task": 1}}),
            json!({"task_shadowed": {"task": 1, "children": [2, 3]}}),
            json!({"task_assigned": {"task": 1, "agent": "a", "incarnation": 1, "attempt": 1}}),
            json!({"step_intended": {"task": 1, "attempt": 1, "name": "s"}}),
            json!({"step_committed": {"task": 1, "attempt": 1, "name": "s", "result": null}}),
            json!({"task_completed": {"task": 1, "result": null}}),
            json!({"task_retried": {"task": 1, "reason": "x"}}),
            json!({"task_failed": {"task": 1, "reason": "x"}}),
            json!({"task_cancelled": {"task": 1}}),
            json!({"task_compensating": {"task": 1, "outcome": "cancelled", "step": "s", "child": 2}}),
            json!({"compensation_failed": {"task": 1, "step": "s", "reason": "x"}}),
            json!({"task_arbitrated": {"task": 1, "agreed": [2], "dissent": [3]}}),
            json!({"mode_changed": {"mode": "degraded", "serving": 1, "roles": 2}}),
            json!({"budget_reserved": {
                "reservation": 1, "agent": "a", "incarnation": 1, "task": null, "spend": spend, "period": 0
            }}),
            json!({"spend_reported": {
                "agent": "a", "incarnation": 1, "task": null, "reservation": 1, "spend": spend, "period": 0
            }}),
            json!({"tokens_issued": {"agent": "a", "generation": 1, "refresh_hash": "h", "expires_at": 5}}),
            json!({"tokens_refreshed": {"agent": "a", "refresh_hash": "h", "expires_at": 5}}),
            json!({"tokens_revoked": {"agent": "a", "reason": "x"}}),
            json!({"budget_breached": {"agent": "a", "incarnation": 1, "task": null, "detail": "x"}}),
            json!({"message_sent": {
                "id": 1, "seq": 1, "from": "a", "to": "b", "conversation": "c-1", "body": null
            }}),
            json!({"message_acked": {"agent": "a", "seq": 1}}),
            json!({"conversation_ended": {"conversation": "c-1", "by": "a"}}),
            json!({"hook_delivered": {"hook": "h", "kind": "agent.down", "seq": 1, "attempts": 1}}),
            json!({"hook_failed": {"hook": "h", "kind": "agent.down", "seq": 1, "attempts": 6, "error": "x"}}),
            json!({"node_joined": {"node": "n", "info": {"id": 1, "address": "127.0.0.1:1"}}}),
            json!({"node_lost": {"node": "n", "silent_ms": 3000}}),
            json!({"agent_placed": {"agent": "a", "incarnation": 1, "node": "n"}}),
            json!({"agent_pending": {"agent": "a", "reason": "x"}}),
        ]
    }

    #[test]
    fn every_event_kind_is_the_name_serde_gives_it() {
        let mut kinds = Vec::new();
        for sample in one_of_each() {
            let name = sample.as_object().and_then(|map| map.keys().next()).unwrap().clone();
            let event: Event = serde_json::from_value(sample).unwrap_or_else(|error| panic!("{name}: {error}"));
            assert_eq!(event.kind(), name);
            let written = serde_json::to_value(&event).unwrap();
            assert_eq!(written.as_object().map(|map| map.keys().collect::<Vec<_>>()), Some(vec![&name]));
            kinds.push(event.kind());
        }
        // A new event needs a sample above (and so a name in `kind`) before this passes.
        assert_eq!(kinds, variant_names::<Event>());
    }

    #[test]
    fn hook_kinds_all_is_every_kind_serde_reads() {
        let listed: Vec<&str> = HookKind::ALL.iter().map(|kind| kind.as_str()).collect();
        assert_eq!(listed, variant_names::<HookKind>());
    }

    /// The names serde reads for the variants of the externally tagged enum `T`, in
    /// declaration order: serde lists them all in the error it raises for an unknown name.
    /// (`hale_proto::variant_names` does the same; hale-core does not depend on it.)
    fn variant_names<T: DeserializeOwned>() -> Vec<&'static str> {
        match T::deserialize(IntoDeserializer::<Listed>::into_deserializer("\u{0}no such variant")) {
            Err(Listed::Variants(names)) => names.to_vec(),
            other => panic!("not an externally tagged enum: {:?}", other.err()),
        }
    }

    #[derive(Debug)]
    enum Listed {
        Variants(&'static [&'static str]),
        Other(String),
    }

    impl de::Error for Listed {
        fn custom<M: std::fmt::Display>(message: M) -> Listed {
            Listed::Other(message.to_string())
        }

        fn unknown_variant(_variant: &str, expected: &'static [&'static str]) -> Listed {
            Listed::Variants(expected)
        }
    }

    impl std::fmt::Display for Listed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Listed::Variants(names) => write!(f, "one of {}", names.join(", ")),
                Listed::Other(message) => f.write_str(message),
            }
        }
    }

    impl std::error::Error for Listed {}
}
