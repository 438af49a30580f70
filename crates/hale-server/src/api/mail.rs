//! The HTTP routes of messaging: send, read the mailbox, ack, end a conversation (the
//! conversions are in `wire::mail`). Over a session the same operations are the `send`,
//! `ack` and `end_conversation` frames, and `ws` delivers the mailbox as `message` frames.

use super::http::{JsonBody, agent_name, respond};
use super::openapi::{AgentPath, Answer};
use super::wire::mail::{ack_command, end_command, send_command, summary, unacked};
use super::{ApiError, AppState, Route};
use crate::auth::Principal;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use hale_proto::{HttpAck, HttpEndConversation, HttpSend, Mailbox, Sent};

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
    let command = ack_command(agent_name(&agent)?, body.incarnation, body.seq);
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
