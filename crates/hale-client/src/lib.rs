//! Rust client for hale.
//!
//! ```no_run
//! # async fn example() -> Result<(), hale_client::ClientError> {
//! use hale_client::{Agent, AgentOptions};
//! let agent = Agent::connect("ws://127.0.0.1:7700", AgentOptions::new("code-generator-1", "code-generator")).await?;
//! let welcome = agent.resume().await?;          // state, version, recovery points
//! let version = agent.checkpoint(serde_json::json!({"files_done": 12})).await?; // durable when it returns
//! agent.recovery_point("after-tests").await?;
//! # Ok(()) }
//! ```
//!
//! An [`Agent`] is a cheap handle to one session; clones share it, and requests from
//! several tasks are pipelined over the one socket. The session runs in a background task
//! that owns the socket, so reconnection (a later issue) can live there without changing
//! this API. [`Admin`] reads the HTTP API for tools such as the CLI.

mod admin;
mod agent;
mod error;
mod session;
mod tls;

pub use admin::{Admin, EventFilter};
pub use agent::{Agent, AgentOptions, Credentials, StepExtras, url_from_env};
pub use error::ClientError;
pub use hale_proto::{
    AgentState, AgentSummary, BudgetSpec, ConversationInfo, DownSummary, EventInfo, HttpSubmitTask, LlmCallInfo,
    ManagedSummary, MessageInfo, NodeSummary, PendingReplyInfo, ProgressBody, Recipient, RecoveryPointInfo, RollbackTo,
    RolledBack, RungSpec, SendBody, Sent, ShadowSpec, SpendBody, StepInfo, SystemStatus, TaskInfo, TaskSubmitted,
    TokenPair, Welcome,
};
pub use session::Reconnect;

/// Resolves when this process gets SIGTERM (what hale sends to stop an agent it runs):
/// the moment to checkpoint and [`Agent::close`].
pub async fn sigterm() -> std::io::Result<()> {
    let mut signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    signal.recv().await;
    Ok(())
}
