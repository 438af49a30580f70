//! Messaging on the wire: the conversions between the core's mail and hale-proto, and the
//! HTTP routes (send, read the mailbox, ack, end a conversation). Over a session the same
//! operations are the `send`, `ack` and `end_conversation` frames, and `ws` delivers the
//! mailbox as `message` frames.

use super::http::{JsonBody, agent_name, respond};
use super::openapi::{AgentPath, Answer};
use super::{ApiError, AppState, Route};
use crate::auth::Principal;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use hale_core::mail::Message;
use hale_core::{AgentName, Command, ConversationId, RoleName, State as CoreState};
use hale_proto::{
    ConversationInfo, HttpAck, HttpEndConversation, HttpSend, Mailbox, MessageInfo, PendingReplyInfo, SendBody, Sent,
};

/// Messages one read returns at most (a session reads again while there are more).
pub const READ_BATCH_MAX: usize = 256;

pub fn routes() -> Vec<Route> {
    vec![
        Route::post("/v1/agents/{agent}/messages", send),
        Route::get("/v1/agents/{agent}/mailbox", mailbox),
        Route::post("/v1/agents/{agent}/mailbox/ack", ack),
        Route::post("/v1/agents/{agent}/conversations/{conversation}/end", end_conversation),
    ]
}

/// The command for a send by `from`'s run `incarnation`.
pub fn send_command(from: AgentName, incarnation: u64, message: SendBody) -> Result<Command, ApiError> {
    let to = match message.to {
        hale_proto::Recipient::Agent(agent) => hale_core::Recipient::Agent(AgentName::new(agent)?),
        hale_proto::Recipient::Role(role) => hale_core::Recipient::Role(RoleName::new(role)?),
    };
    let conversation = message.conversation.map(ConversationId::new).transpose()?;
    Ok(Command::SendMessage {
        from,
        incarnation,
        to,
        conversation,
        body: message.body,
        reply_to: message.reply_to,
        expects_reply: message.expects_reply,
        key: message.key,
    })
}

/// The command to end `conversation`.
pub fn end_command(agent: AgentName, incarnation: u64, conversation: String) -> Result<Command, ApiError> {
    Ok(Command::EndConversation { agent, incarnation, conversation: ConversationId::new(conversation)? })
}

/// A mailbox message on the wire.
pub fn message_info(message: &Message) -> MessageInfo {
    MessageInfo {
        seq: message.seq,
        message: message.id,
        from: message.from.to_string(),
        conversation: message.conversation.to_string(),
        body: message.body.clone(),
        reply_to: message.reply_to,
        expects_reply: message.expects_reply,
        sent_at_ms: message.sent_at.0,
    }
}

/// `agent`'s unacked messages after `after` (at most `limit`).
pub fn unacked(state: &CoreState, agent: &str, after: u64, limit: usize) -> Vec<MessageInfo> {
    let Some(mailbox) = state.mail().mailbox(agent) else { return Vec::new() };
    mailbox.unacked_after(after).take(limit).map(|message| message_info(message)).collect()
}

/// `agent`'s mailbox without its messages: what the welcome carries.
pub fn summary(state: &CoreState, agent: &AgentName) -> Mailbox {
    let mail = state.mail();
    let Some(mailbox) = mail.mailbox(agent.as_str()) else {
        return Mailbox {
            agent: agent.to_string(),
            last_seq: 0,
            unacked: 0,
            messages: Vec::new(),
            conversations: Vec::new(),
            pending_replies: Vec::new(),
        };
    };
    let conversations = mailbox
        .conversations()
        .filter_map(|id| {
            let talk = mail.conversation(id.as_str())?;
            Some(ConversationInfo {
                id: id.to_string(),
                participants: talk.participants.iter().map(ToString::to_string).collect(),
                started_at_ms: talk.started_at.0,
                last_at_ms: talk.last_at.0,
                messages: talk.messages,
            })
        })
        .collect();
    let pending_replies = mailbox
        .pending_replies()
        .map(|pending| PendingReplyInfo {
            message: pending.message,
            seq: pending.seq,
            from: pending.from.to_string(),
            conversation: pending.conversation.to_string(),
            sent_at_ms: pending.sent_at.0,
        })
        .collect();
    Mailbox {
        agent: agent.to_string(),
        last_seq: mailbox.last_seq(),
        unacked: mailbox.unacked_len() as u64,
        messages: Vec::new(),
        conversations,
        pending_replies,
    }
}

#[utoipa::path(post, path = "/v1/agents/{agent}/messages", tag = "messages", params(AgentPath), request_body = HttpSend,
    responses((status = 200, description = "durable (or the first send with the same key)", body = Sent)))]
async fn send(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpSend>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    let command = send_command(agent_name(&agent)?, body.incarnation, body.message)?;
    respond(app.engine.execute(command).await?)
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct MailboxQuery {
    /// Only messages after this sequence number.
    #[serde(default)]
    after: u64,
    /// At most this many (and at most 256).
    limit: Option<usize>,
}

/// `GET /v1/agents/{agent}/mailbox[?after=SEQ&limit=N]`.
#[utoipa::path(get, path = "/v1/agents/{agent}/mailbox", tag = "messages", params(AgentPath, MailboxQuery),
    responses((status = 200, description = "the unacked messages, the conversations and the pending replies", body = Mailbox)))]
async fn mailbox(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    Query(query): Query<MailboxQuery>,
) -> Result<Json<Mailbox>, ApiError> {
    principal.require_agent(&agent)?;
    let name = agent_name(&agent)?;
    let limit = query.limit.unwrap_or(READ_BATCH_MAX).min(READ_BATCH_MAX);
    let found = app
        .engine
        .read(move |state| {
            state.agent(name.as_str())?;
            let mut mailbox = summary(state, &name);
            mailbox.messages = unacked(state, name.as_str(), query.after, limit);
            Some(mailbox)
        })
        .await?;
    found.map(Json).ok_or_else(|| ApiError::from(hale_core::Rejection::UnknownAgent { agent }))
}

#[utoipa::path(post, path = "/v1/agents/{agent}/mailbox/ack", tag = "messages", params(AgentPath), request_body = HttpAck,
    responses((status = 200, description = "acked up to `seq`", body = Answer)))]
async fn ack(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpAck>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    let command = Command::AckMessage { agent: agent_name(&agent)?, incarnation: body.incarnation, seq: body.seq };
    respond(app.engine.execute(command).await?)
}

#[utoipa::path(post, path = "/v1/agents/{agent}/conversations/{conversation}/end", tag = "messages",
    params(AgentPath, ("conversation" = String, Path, description = "The conversation's id.")), request_body = HttpEndConversation,
    responses((status = 200, description = "ended", body = Answer)))]
async fn end_conversation(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((agent, conversation)): Path<(String, String)>,
    JsonBody(body): JsonBody<HttpEndConversation>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    respond(app.engine.execute(end_command(agent_name(&agent)?, body.incarnation, conversation)?).await?)
}
