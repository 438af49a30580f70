use crate::names::{AgentName, PointName, RoleName};
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
    /// The agent this command concerns.
    pub fn agent(&self) -> &AgentName {
        match self {
            Command::Hello(hello) => &hello.agent,
            Command::Checkpoint { agent, .. }
            | Command::MarkRecoveryPoint { agent, .. }
            | Command::Rollback { agent, .. } => agent,
        }
    }
}
