//! Issuing, refreshing and revoking agents' tokens.

use super::http::{JsonBody, agent_name};
use super::openapi::{AgentPath, Answer};
use super::{ApiError, AppState, Route, ServerCode};
use crate::auth::{Auth, Principal, hash_refresh};
use crate::engine::Engine;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use hale_core::{AgentName, CredentialCommand, Timestamp};
use hale_proto::{HttpRefresh, HttpRevoke, TokenPair};

pub fn routes() -> Vec<Route> {
    vec![
        Route::post("/v1/agents/{agent}/tokens", issue),
        Route::post("/v1/agents/{agent}/tokens/revoke", revoke),
        Route::post("/v1/auth/refresh", refresh),
    ]
}

/// `hale token issue AGENT`: a new access token and refresh token (the previous refresh
/// token stops working; access tokens already out stay valid until they expire).
#[utoipa::path(post, path = "/v1/agents/{agent}/tokens", tag = "tokens", params(AgentPath),
    responses((status = 200, description = "a new pair; the previous refresh token stops working (admin)", body = TokenPair)))]
async fn issue(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
) -> Result<Json<TokenPair>, ApiError> {
    principal.require_admin("issuing tokens")?;
    Ok(Json(issue_tokens(&app.auth, &app.engine, &agent_name(&agent)?).await?))
}

/// Mints a pair for `agent` and logs its refresh token's hash (before the pair is handed
/// out, so the refresh token works as soon as anyone has it).
pub async fn issue_tokens(auth: &Auth, engine: &Engine, agent: &AgentName) -> Result<TokenPair, ApiError> {
    let minted = auth.mint(agent);
    let command = CredentialCommand::Issue {
        agent: agent.clone(),
        refresh_hash: minted.refresh_hash.clone(),
        expires_at: Timestamp(minted.refresh_expires_at_ms),
    };
    engine.execute(command).await?;
    Ok(TokenPair {
        agent: agent.to_string(),
        access_token: minted.access_token,
        access_expires_at_ms: minted.access_expires_at_ms,
        refresh_token: minted.refresh_token,
        refresh_expires_at_ms: minted.refresh_expires_at_ms,
    })
}

/// `hale token revoke AGENT`: every token of the agent stops working and its sessions end.
#[utoipa::path(post, path = "/v1/agents/{agent}/tokens/revoke", tag = "tokens", params(AgentPath),
    request_body(content = Option<HttpRevoke>, description = "optional: why"),
    responses((status = 200, description = "every token of the agent stopped working (admin)", body = Answer)))]
async fn revoke(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    request: axum::extract::Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require_admin("revoking tokens")?;
    let body = super::http::read_body(request, &app).await?;
    let agent = agent_name(&agent)?;
    // The body is optional: `{"reason": "..."}`, or nothing (empty or `null`).
    let body: HttpRevoke = if body.iter().all(u8::is_ascii_whitespace) || body.trim_ascii() == b"null" {
        HttpRevoke::default()
    } else if !super::wire::is_json_object(&body) {
        return Err(ApiError::bad_request(super::wire::NOT_AN_OBJECT));
    } else {
        serde_json::from_slice(&body)
            .map_err(|error| ApiError::bad_request(super::wire::describe_json_error(&error)))?
    };
    let reason = body.reason.unwrap_or_else(|| "revoked by the operator".into());
    let answer = app.engine.execute(CredentialCommand::Revoke { agent: agent.clone(), reason }).await?;
    hold_generation(&app, &agent, answer);
    Ok(Json(serde_json::json!({ "revoked": true })))
}

/// An agent trades its refresh token for a new pair (the old refresh token stops
/// working; presenting it again revokes everything).
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "tokens", request_body = HttpRefresh,
    responses((status = 200, description = "a new pair; the refresh token presented stops working", body = TokenPair)))]
async fn refresh(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<HttpRefresh>,
) -> Result<Json<TokenPair>, ApiError> {
    let agent = agent_name(&body.agent)?;
    let minted = app.auth.mint(&agent);
    let command = CredentialCommand::Refresh {
        agent: agent.clone(),
        presented_hash: hash_refresh(&body.refresh_token),
        refresh_hash: minted.refresh_hash.clone(),
        expires_at: Timestamp(minted.refresh_expires_at_ms),
    };
    let answer = app.engine.execute(command).await?;
    // A reused token revoked the chain instead of refreshing it.
    if hold_generation(&app, &agent, answer) {
        return Err(ApiError::coded(
            axum::http::StatusCode::UNAUTHORIZED,
            ServerCode::TokenRevoked,
            "this refresh token was already used, so it may have been copied: every token of the agent is revoked; ask the operator for new ones",
            false,
        ));
    }
    Ok(Json(TokenPair {
        agent: agent.to_string(),
        access_token: minted.access_token,
        access_expires_at_ms: minted.access_expires_at_ms,
        refresh_token: minted.refresh_token,
        refresh_expires_at_ms: minted.refresh_expires_at_ms,
    }))
}

/// Holds access tokens of `agent` to the generation the core answered; returns whether
/// the command revoked them.
fn hold_generation(app: &AppState, agent: &AgentName, answer: crate::engine::Response) -> bool {
    let crate::engine::Response::Answer(hale_core::Answer::Tokens { generation, revoked }) = answer else {
        return false;
    };
    app.auth.set_generation(agent, generation);
    revoked
}
