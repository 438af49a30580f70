//! From wire types to core commands, validating names on the way.

use super::ApiError;
use hale_core::health::{Reporter, Severity};
use hale_core::{AgentName, Command, Hello, PointName, Progress, RoleName, RollbackTarget};
use hale_proto::{HelloBody, ProgressBody, RollbackTo};
use serde_json::Value;

pub fn hello(agent: &str, body: HelloBody) -> Result<Command, ApiError> {
    Ok(Command::Hello(Hello {
        agent: AgentName::new(agent)?,
        role: RoleName::new(body.role)?,
        labels: body.labels,
        incarnation: body.incarnation,
    }))
}

pub fn checkpoint(agent: AgentName, incarnation: u64, patch: Value, expected_version: Option<u64>) -> Command {
    Command::Checkpoint { agent, incarnation, patch, expected_version }
}

pub fn recovery_point(agent: AgentName, incarnation: u64, name: String) -> Result<Command, ApiError> {
    Ok(Command::MarkRecoveryPoint { agent, incarnation, name: PointName::new(name)? })
}

pub fn rollback(agent: AgentName, incarnation: u64, to: RollbackTo) -> Result<Command, ApiError> {
    let target = match to {
        RollbackTo::Version(version) => RollbackTarget::Version(version),
        RollbackTo::Point(name) => RollbackTarget::Point(PointName::new(name)?),
    };
    Ok(Command::Rollback { agent, incarnation, target })
}

/// A violation reported over a session: about another agent if `about` names one, else
/// about the session's own agent (which reports itself).
pub fn violation(own: AgentName, about: Option<String>, critical: bool, reason: String) -> Result<Command, ApiError> {
    let (agent, by) = match about {
        Some(other) if other != own.as_str() => (AgentName::new(other)?, Reporter::Agent(own)),
        _ => (own, Reporter::Itself),
    };
    let severity = if critical { Severity::Critical } else { Severity::Minor };
    Ok(Command::ReportViolation { agent, by, severity, reason })
}

pub fn progress(body: ProgressBody) -> Progress {
    Progress { fraction: body.fraction, message: body.message, task: body.task, fields: body.fields }
}

/// A JSON parse error, said so a person can act on it.
pub fn describe_json_error(error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Eof => format!("malformed JSON: {error}"),
        Category::Data => format!("JSON of the wrong shape: {error}"),
        Category::Io => format!("unreadable request: {error}"),
    }
}
