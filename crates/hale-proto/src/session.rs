//! The session's frames: the requests an agent sends (`ClientFrame`) and the answers and
//! notices the server sends (`ServerFrame`), each a JSON object tagged by `type`.

use crate::{
    CheckpointBody, ErrorBody, HelloBody, HttpSubmitTask, LlmCallInfo, MessageInfo, ProgressBody, RecoveryPointInfo,
    RollbackTo, RolledBack, SendBody, Sent, TaskInfo, Welcome,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
        /// The run is in a call that may take this long (0: the call is over): the stall
        /// detectors do not count until it has passed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        busy_ms: Option<u64>,
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
        /// The reservation the model call's tokens settle (the tokens count as spent by
        /// the task and the agent either way).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reservation: Option<u64>,
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
    /// This session's agent has the outcome of task `task`, which it submitted: stop
    /// pushing it (answered `ok`; idempotent).
    TakeOutcome {
        id: u64,
        task: u64,
    },
    /// A fresh access token for this session (answered `ok`): a session lives only as long
    /// as its token, so a client renews it in band before it expires. The token must be
    /// for the same agent as the one that opened the session.
    Auth {
        id: u64,
        token: String,
    },
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
            | ClientFrame::TakeOutcome { id, .. }
            | ClientFrame::Auth { id, .. } => *id,
        }
    }
}

/// The frame types a client may send, for error messages.
pub const CLIENT_FRAME_TYPES: [&str; 19] = [
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
    "take_outcome",
    "auth",
];

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
    /// Unasked: a task this agent submitted has ended (completed, failed or cancelled).
    /// Every outcome not taken (`take_outcome`) is pushed again to each new session.
    TaskOutcome {
        #[serde(flatten)]
        task: Box<TaskInfo>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

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
    fn client_frame_types_are_the_frames_serde_reads() {
        // In declaration order; a ClientFrame added without a name here fails this test.
        assert_eq!(CLIENT_FRAME_TYPES.to_vec(), crate::variant_names::<ClientFrame>());
    }

    /// docs/protocol.md, section 1.2, lists every frame type: the requests, the answers and
    /// the frames that answer nothing.
    #[test]
    fn protocol_md_lists_every_frame_type() {
        let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md"));
        let requests = backticked(doc, "Request types:", "Answer types:");
        let answers = backticked(doc, "Answer types:", "\n\n");
        let unasked = backticked(doc, "answer no request and carry no `id`:", "They can arrive");
        assert_eq!(sorted(&requests), sorted(&CLIENT_FRAME_TYPES), "request types in docs/protocol.md 1.2");
        let mut server = [answers.clone(), unasked.clone()].concat();
        server.sort_unstable();
        server.dedup();
        assert_eq!(server.len(), answers.len() + unasked.len(), "a frame type listed twice in docs/protocol.md 1.2");
        assert_eq!(
            server,
            sorted(&crate::variant_names::<ServerFrame>()),
            "answer and unasked types in docs/protocol.md 1.2"
        );
    }

    fn sorted<'a>(names: &[&'a str]) -> Vec<&'a str> {
        let mut names = names.to_vec();
        names.sort_unstable();
        names
    }

    /// The `snake_case` names in backticks from `start` to the next `end`.
    fn backticked<'a>(doc: &'a str, start: &str, end: &str) -> Vec<&'a str> {
        let from = doc.find(start).unwrap_or_else(|| panic!("{start:?} is not in docs/protocol.md")) + start.len();
        let to = from + doc[from..].find(end).unwrap_or_else(|| panic!("{end:?} does not follow {start:?}"));
        doc[from..to]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|name| !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte == b'_'))
            .collect()
    }

    #[test]
    fn unknown_fields_are_refused() {
        let frame = serde_json::from_value::<ClientFrame>(json!({"type": "checkpoint", "id": 1, "patch": {}, "x": 1}));
        assert!(frame.is_err());
    }
}
