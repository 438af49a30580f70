//! The one place where wire types (hale-proto) become core commands and core answers and
//! state become wire types. The WebSocket session and the HTTP routes both come through
//! here, so an operation means the same on both, with the same defaults and the same
//! checks of names.
//!
//! * commands in: one function per operation, from the names and bodies on the wire;
//! * answers out: [`frame`] for a session, [`body`] for HTTP;
//! * state out: [`welcome`], [`recovery_points`]; tasks in `tasks`, mail in `mail`.

pub mod mail;
pub mod tasks;

use super::ApiError;
use crate::engine::{EngineError, Response as EngineResponse};
use axum::Json;
use axum::response::IntoResponse;
use hale_core::health::{Reporter, Severity};
use hale_core::{
    AgentCommand, AgentName, AgentRecord, Answer, BudgetCommand, Command, HealthCommand, Hello, PointName, Progress,
    RoleName, RollbackTarget, State, TaskCommand,
};
use hale_proto::{
    Checkpointed, HelloBody, LlmCallInfo, ProgressBody, RecoveryPointInfo, RollbackTo, RolledBack, Sent, ServerFrame,
    Welcome,
};
use serde_json::Value;

// ---- Commands in --------------------------------------------------------------------------

pub fn hello(agent: &str, body: HelloBody) -> Result<Command, ApiError> {
    Ok(Hello {
        agent: AgentName::new(agent)?,
        role: RoleName::new(body.role)?,
        labels: body.labels,
        incarnation: body.incarnation,
    }
    .into())
}

pub fn checkpoint(agent: AgentName, incarnation: u64, patch: Value, expected_version: Option<u64>) -> Command {
    AgentCommand::Checkpoint { agent, incarnation, patch, expected_version }.into()
}

pub fn recovery_point(agent: AgentName, incarnation: u64, name: String) -> Result<Command, ApiError> {
    Ok(AgentCommand::MarkRecoveryPoint { agent, incarnation, name: PointName::new(name)? }.into())
}

pub fn rollback(agent: AgentName, incarnation: u64, to: RollbackTo) -> Result<Command, ApiError> {
    let target = match to {
        RollbackTo::Version(version) => RollbackTarget::Version(version),
        RollbackTo::Point(name) => RollbackTarget::Point(PointName::new(name)?),
    };
    Ok(AgentCommand::Rollback { agent, incarnation, target }.into())
}

/// A violation of `agent` reported `by` someone (who may report is the caller's check).
pub fn violation(agent: AgentName, by: Reporter, critical: bool, reason: String) -> Command {
    let severity = if critical { Severity::Critical } else { Severity::Minor };
    HealthCommand::ReportViolation { agent, by, severity, reason }.into()
}

/// A violation reported over a session: about another agent if `about` names one, else
/// about the session's own agent (which reports itself).
pub fn session_violation(
    own: AgentName,
    about: Option<String>,
    critical: bool,
    reason: String,
) -> Result<Command, ApiError> {
    let (agent, by) = match about {
        Some(other) if other != own.as_str() => (AgentName::new(other)?, Reporter::Agent(own)),
        _ => (own, Reporter::Itself),
    };
    Ok(violation(agent, by, critical, reason))
}

pub fn progress(body: ProgressBody) -> Progress {
    Progress { fraction: body.fraction, message: body.message, task: body.task, fields: body.fields }
}

pub fn intend_step(task: u64, agent: AgentName, incarnation: u64, name: String) -> Command {
    TaskCommand::IntendStep { task, agent, incarnation, name }.into()
}

/// A committed step, with the model call behind it and what would undo it.
pub struct Step {
    pub name: String,
    pub result: Value,
    pub llm: Option<LlmCallInfo>,
    pub compensation: Option<Value>,
    pub reservation: Option<u64>,
}

pub fn commit_step(task: u64, agent: AgentName, incarnation: u64, step: Step) -> Command {
    let Step { name, result, llm, compensation, reservation } = step;
    let llm = llm.map(tasks::llm);
    TaskCommand::CommitStep { task, agent, incarnation, name, result, llm, compensation, reservation }.into()
}

pub fn complete(task: u64, agent: AgentName, incarnation: u64, result: Value) -> Command {
    TaskCommand::Complete { task, agent, incarnation, result }.into()
}

/// A failed attempt: retried while attempts are left unless `retry` is false.
pub fn fail(task: u64, agent: AgentName, incarnation: u64, reason: Option<String>, retry: Option<bool>) -> Command {
    let reason = reason.unwrap_or_else(|| "failed by the agent".into());
    TaskCommand::Fail { task, agent, incarnation, reason, retry: retry.unwrap_or(true) }.into()
}

/// A task submitted by `by` (an agent), or by the operator (`None`).
pub fn submit(task: hale_proto::HttpSubmitTask, by: Option<AgentName>) -> Result<Command, ApiError> {
    Ok(TaskCommand::Submit { spec: tasks::spec(task)?, by }.into())
}

pub fn reserve(agent: AgentName, incarnation: u64, task: Option<u64>, tokens: u64, cost: u64) -> Command {
    BudgetCommand::Reserve { agent, incarnation, task, spend: tasks::spend(tokens, cost) }.into()
}

pub fn report_spend(
    agent: AgentName,
    incarnation: u64,
    task: Option<u64>,
    reservation: Option<u64>,
    tokens: u64,
    cost: u64,
) -> Command {
    BudgetCommand::ReportSpend { agent, incarnation, task, reservation, spend: tasks::spend(tokens, cost) }.into()
}

/// A JSON parse error, said so a person can act on it.
/// What a body or frame that is not a JSON object is told.
pub const NOT_AN_OBJECT: &str =
    "expected a JSON object ({...}); an array, string, number, boolean or null is not a request";

/// Whether `bytes` can be a JSON object: its first character after whitespace is `{`
/// (whether the rest parses is the parser's to say). serde fills a struct's fields by
/// position from an array, and an internally tagged enum takes `["type", ...]`, so this is
/// checked before either.
pub fn is_json_object(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().first() == Some(&b'{')
}

pub fn describe_json_error(error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Eof => format!("malformed JSON: {error}"),
        Category::Data => format!("JSON of the wrong shape: {error}"),
        Category::Io => format!("unreadable request: {error}"),
    }
}

// ---- Answers out --------------------------------------------------------------------------

/// The frame a session answers request `id` with.
pub fn frame(id: u64, outcome: Result<EngineResponse, EngineError>) -> ServerFrame {
    let answer = match outcome {
        Ok(EngineResponse::Welcome(welcome)) => return ServerFrame::Welcome { id, welcome: *welcome },
        Ok(EngineResponse::Answer(answer)) => answer,
        Err(error) => return ServerFrame::Error { id: Some(id), error: ApiError::from(error).body },
    };
    match answer {
        Answer::Done | Answer::Tokens { .. } | Answer::Restarted { .. } => ServerFrame::Ok { id },
        Answer::Welcome { .. } => unreachable!("the engine turns a welcome into its wire form"),
        Answer::Checkpointed { version } => ServerFrame::Checkpointed { id, version },
        Answer::RecoveryPointMarked { name, version, marked_at } => {
            ServerFrame::RecoveryPointMarked { id, point: recovery_point_info(&name, version, marked_at) }
        }
        Answer::RolledBack { version, target_version, state } => ServerFrame::RolledBack {
            id,
            rolled_back: RolledBack { version, target_version, state: Value::clone(&state) },
        },
        Answer::TaskSubmitted { task, new } => ServerFrame::Submitted { id, task, new },
        Answer::Reserved { reservation } => ServerFrame::Reserved { id, reservation },
        Answer::Sent { message, to, seq, conversation, new } => ServerFrame::Sent {
            id,
            sent: Sent { message, to: to.to_string(), seq, conversation: conversation.to_string(), new },
        },
    }
}

/// The body an HTTP route answers with.
pub fn body(response: EngineResponse) -> axum::response::Response {
    let answer = match response {
        EngineResponse::Welcome(welcome) => return Json(*welcome).into_response(),
        EngineResponse::Answer(answer) => answer,
    };
    match answer {
        Answer::Done | Answer::Tokens { .. } => Json(serde_json::json!({ "ok": true })).into_response(),
        Answer::Restarted { incarnation } => {
            Json(serde_json::json!({ "restarted": true, "incarnation": incarnation })).into_response()
        }
        Answer::Welcome { .. } => unreachable!("the engine turns a welcome into its wire form"),
        Answer::Checkpointed { version } => Json(Checkpointed { version }).into_response(),
        Answer::RecoveryPointMarked { name, version, marked_at } => {
            Json(recovery_point_info(&name, version, marked_at)).into_response()
        }
        Answer::RolledBack { version, target_version, state } => {
            Json(RolledBack { version, target_version, state: Value::clone(&state) }).into_response()
        }
        Answer::TaskSubmitted { task, new } => Json(hale_proto::TaskSubmitted { task, new }).into_response(),
        Answer::Reserved { reservation } => Json(hale_proto::Reserved { reservation }).into_response(),
        Answer::Sent { message, to, seq, conversation, new } => {
            Json(Sent { message, to: to.to_string(), seq, conversation: conversation.to_string(), new }).into_response()
        }
    }
}

// ---- State out ----------------------------------------------------------------------------

/// Everything an agent needs to resume, from its record and its mailbox.
pub fn welcome(state: &State, record: &AgentRecord, resumed: bool) -> Welcome {
    let mailbox = mail::summary(state, &record.name);
    Welcome {
        protocol: hale_proto::PROTOCOL_VERSION,
        agent: record.name.to_string(),
        role: record.role.to_string(),
        labels: record.labels.clone(),
        incarnation: record.incarnation,
        resumed,
        version: record.version(),
        state: Value::clone(record.state()),
        recovery_points: recovery_points(record),
        history: record.history().collect(),
        session: format!("{}/{}", record.name, record.incarnation),
        unacked: mailbox.unacked,
        conversations: mailbox.conversations,
        pending_replies: mailbox.pending_replies,
    }
}

/// The agent's recovery points, in name order.
pub fn recovery_points(record: &AgentRecord) -> Vec<RecoveryPointInfo> {
    record
        .recovery_points
        .iter()
        .map(|(name, point)| recovery_point_info(name, point.version, point.marked_at))
        .collect()
}

fn recovery_point_info(name: &PointName, version: u64, marked_at: hale_core::Timestamp) -> RecoveryPointInfo {
    RecoveryPointInfo { name: name.to_string(), version, marked_at_ms: marked_at.0 }
}
