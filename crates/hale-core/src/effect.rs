use crate::names::{AgentName, RoleName};

/// Something the shell must do because of an event, once that event is durable.
///
/// Effects are drained with [`Core::poll_effect`](crate::Core::poll_effect) after live
/// commands; replay produces none (what a past event asked for was done at the time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Start the process of this incarnation of a managed agent. A process of an earlier
    /// incarnation still running must be stopped first, so two never run at once.
    /// `role` tells the shell which template to use for an agent a pool recruited.
    Spawn { agent: AgentName, role: RoleName, incarnation: u64 },
    /// Stop the process of this incarnation: SIGTERM to its group, grace, SIGKILL.
    Stop { agent: AgentName, incarnation: u64 },
    /// Close the sessions of this incarnation: it was superseded or declared down.
    Fence { agent: AgentName, incarnation: u64, reason: String },
    /// Ask a suspect agent to prove it is alive (it answers with a heartbeat).
    Challenge { agent: AgentName, incarnation: u64 },
    /// The agent failed for good (restart intensity exceeded): tell a human.
    Escalate { agent: AgentName, restarts: u32, window_ms: u64 },
    /// Hand task `task` to the sessions of this incarnation (its lease is logged).
    OfferTask { agent: AgentName, incarnation: u64, task: u64 },
    /// Tell the holder of a cancelled task to stop working on it.
    CancelTask { agent: AgentName, incarnation: u64, task: u64 },
    /// End every live session of the agent (its tokens were revoked).
    EndSessions { agent: AgentName, reason: String },
    /// New mail, or the outcome of a task it submitted, for `agent`: its sessions should
    /// deliver what they have not yet.
    DeliverMail { agent: AgentName },
    /// Quarantine with `action = "pause"`: SIGSTOP to the process group of this run.
    Pause { agent: AgentName, incarnation: u64 },
    /// Released from a paused quarantine: SIGCONT to the process group of this run.
    Resume { agent: AgentName, incarnation: u64 },
}
