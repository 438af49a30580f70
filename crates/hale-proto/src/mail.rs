//! Messages between agents: sending to an agent or a role, mailboxes, acks and
//! conversations.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A message to send: `to` is `{"agent": "writer-1"}` or `{"role": "writer"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    pub to: Recipient,
    /// The conversation it belongs to; hale starts a new one (`c-N`) if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    #[serde(default)]
    pub body: Value,
    /// The message this one answers (it is no longer pending for the sender).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    /// The sender waits for an answer.
    #[serde(default)]
    pub expects_reply: bool,
    /// An idempotency key: a send retried with the same key sends nothing new and is
    /// answered with the first message (`new: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Recipient {
    Agent(String),
    Role(String),
}

/// The answer to a send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sent {
    /// The message's id, unique across hale.
    pub message: u64,
    /// The agent it went to (for a role, the one chosen).
    pub to: String,
    /// Its sequence number in the recipient's mailbox.
    pub seq: u64,
    pub conversation: String,
    /// False when an earlier send with the same key was found.
    pub new: bool,
}

/// A message delivered from a mailbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessageInfo {
    pub seq: u64,
    pub message: u64,
    pub from: String,
    pub conversation: String,
    pub body: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    #[serde(default)]
    pub expects_reply: bool,
    pub sent_at_ms: u64,
}

/// A conversation the agent takes part in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConversationInfo {
    pub id: String,
    pub participants: Vec<String>,
    pub started_at_ms: u64,
    pub last_at_ms: u64,
    pub messages: u64,
}

/// A message that waits for the agent's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PendingReplyInfo {
    pub message: u64,
    pub seq: u64,
    pub from: String,
    pub conversation: String,
    pub sent_at_ms: u64,
}

/// `GET /v1/agents/{agent}/mailbox`: the unacked messages (after `after`, at most
/// `limit`), the open conversations and the pending replies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Mailbox {
    pub agent: String,
    /// The last sequence number given out.
    pub last_seq: u64,
    pub unacked: u64,
    pub messages: Vec<MessageInfo>,
    pub conversations: Vec<ConversationInfo>,
    pub pending_replies: Vec<PendingReplyInfo>,
}

/// `POST /v1/agents/{agent}/messages`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpSend {
    pub incarnation: u64,
    #[serde(flatten)]
    pub message: SendBody,
}

/// `POST /v1/agents/{agent}/mailbox/ack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpAck {
    pub incarnation: u64,
    pub seq: u64,
}

/// `POST /v1/agents/{agent}/conversations/{conversation}/end`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpEndConversation {
    pub incarnation: u64,
}
