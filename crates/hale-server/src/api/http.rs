//! The HTTP API: the session operations for clients that keep no socket, and the reads
//! the CLI uses.

use super::openapi::{AgentPath, Answer};
use super::{ApiError, AppState, Route, ServerCode, wire};
use crate::auth::Principal;
use axum::Extension;
use axum::Json;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hale_core::AgentName;
use hale_core::{HealthCommand, SupervisionCommand};
use hale_proto::{
    AgentState, AgentSummary, Checkpointed, DownSummary, HelloBody, HttpCheckpoint, HttpError, HttpErrorReport,
    HttpHeartbeat, HttpQuarantine, HttpRecoveryPoint, HttpRollback, HttpViolation, ManagedSummary, ProgressBody,
    QuarantineSummary, RecoveryPointInfo, RolledBack, Welcome,
};
use serde::de::DeserializeOwned;
use std::collections::HashMap;

pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/healthz", healthz),
        Route::get("/readyz", readyz),
        Route::get("/v1/agents", list_agents),
        Route::get("/v1/agents/{agent}", agent_state),
        Route::get("/v1/agents/{agent}/state", agent_state_alias),
        Route::post("/v1/agents/{agent}/hello", hello),
        Route::post("/v1/agents/{agent}/checkpoint", checkpoint),
        Route::post("/v1/agents/{agent}/recovery-points", recovery_point),
        Route::post("/v1/agents/{agent}/rollback", rollback),
        Route::post("/v1/agents/{agent}/heartbeat", heartbeat),
        Route::post("/v1/agents/{agent}/restart", restart),
        Route::post("/v1/agents/{agent}/stop", stop),
        Route::post("/v1/agents/{agent}/errors", report_error),
        Route::post("/v1/agents/{agent}/violations", report_violation),
        Route::post("/v1/agents/{agent}/quarantine", quarantine),
        Route::post("/v1/agents/{agent}/release", release),
    ]
}

/// A JSON request body, read with a size bound and a time bound, parsed with typed errors.
/// Every body is a JSON object: serde would fill a struct's fields by position from an
/// array (`["r"]` as a hello), so anything else is refused here, before a handler runs.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(request, state).await?;
        if !wire::is_json_object(&bytes) {
            return Err(ApiError::bad_request(wire::NOT_AN_OBJECT));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|error| ApiError::bad_request(wire::describe_json_error(&error)))
    }
}

/// A request body, whole: at most `body_bytes_max` bytes (413), within `body_timeout`
/// (408), and well framed (400: shorter than its `Content-Length`, or a bad chunk).
pub(super) async fn read_body(request: Request, state: &AppState) -> Result<axum::body::Bytes, ApiError> {
    use futures_util::StreamExt;
    let limit = state.body_bytes_max;
    let too_large = || {
        ApiError::coded(
            StatusCode::PAYLOAD_TOO_LARGE,
            ServerCode::BodyTooLarge,
            format!("the request body is larger than {limit} bytes (body_bytes_max)"),
            false,
        )
    };
    // Refused before a byte of it is read when it says so itself.
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|declared| declared > limit as u64) {
        return Err(too_large());
    }
    // A body trickled in slowly holds a connection: it must arrive within the time.
    let timeout = state.body_timeout;
    let read = async {
        let mut stream = request.into_body().into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|error| {
                ApiError::bad_request(format!(
                    "the request body is malformed or ended early ({error}): send exactly Content-Length bytes,                      or well-formed chunks"
                ))
            })?;
            if bytes.len() + chunk.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(axum::body::Bytes::from(bytes))
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::coded(
            StatusCode::REQUEST_TIMEOUT,
            ServerCode::RequestTimeout,
            format!("the request body did not arrive within {} ms; send it in one go", timeout.as_millis()),
            true,
        )
    })?
}

#[utoipa::path(get, path = "/healthz", tag = "probes",
    responses((status = 200, description = "hale is up", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses((status = 200, description = "hale takes writes", body = String, content_type = "text/plain"),
        (status = 503, description = "the log failed or hale is shutting down", body = HttpError)))]
async fn readyz(State(app): State<AppState>) -> Response {
    let durability = app.engine.durability();
    if let Some(reason) = durability.failed {
        return ApiError::coded(StatusCode::SERVICE_UNAVAILABLE, ServerCode::LogUnavailable, reason.to_string(), true)
            .into_response();
    }
    if *app.shutdown.borrow() {
        return ApiError::coded(
            StatusCode::SERVICE_UNAVAILABLE,
            ServerCode::ShuttingDown,
            "hale is shutting down",
            true,
        )
        .into_response();
    }
    "ready\n".into_response()
}

pub(super) fn agent_name(agent: &str) -> Result<AgentName, ApiError> {
    Ok(AgentName::new(agent)?)
}

#[utoipa::path(get, path = "/v1/agents", tag = "agents",
    responses((status = 200, description = "every agent, with its liveness (admin)", body = Vec<AgentSummary>)))]
async fn list_agents(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<AgentSummary>>, ApiError> {
    principal.require_admin("listing every agent")?;
    let sessions = app.sessions.clone();
    let agents = app
        .engine
        .read_core(move |core| core.state().agents().map(|record| summary(core, record, &sessions)).collect())
        .await?;
    Ok(Json(agents))
}

/// What `hale agents` shows of one agent: the log's view plus the volatile liveness.
fn summary(core: &hale_core::Core, record: &hale_core::AgentRecord, sessions: &crate::Sessions) -> AgentSummary {
    use hale_core::supervision::ManagedStatus;
    let live = core.liveness(record.name.as_str()).filter(|live| live.incarnation == record.incarnation);
    let progress = live.and_then(|live| live.progress.clone()).or_else(|| {
        record
            .progress
            .as_ref()
            .filter(|logged| logged.incarnation == record.incarnation)
            .map(|logged| logged.progress.clone())
    });
    AgentSummary {
        agent: record.name.to_string(),
        role: record.role.to_string(),
        labels: record.labels.clone(),
        incarnation: record.incarnation,
        version: record.version(),
        attached: sessions.is_attached(&record.name, record.incarnation),
        recovery_points: record.recovery_points.len(),
        registered_at_ms: record.registered_at.0,
        updated_at_ms: record.updated_at.0,
        managed: record.managed.as_ref().map(|managed| ManagedSummary {
            status: managed.status.name().to_string(),
            node: managed.node.as_ref().map(|node| node.to_string()),
            pending: match &managed.status {
                ManagedStatus::Pending { reason } => Some(reason.clone()),
                _ => None,
            },
            pid: managed.process.map(|process| process.pid),
            restarts: managed.restarts,
            restart_due_ms: match managed.status {
                ManagedStatus::Backoff { due, .. } => Some(due.0),
                _ => None,
            },
        }),
        health: live.map(|live| format!("{:?}", live.health).to_lowercase()),
        // While reconnecting after a restart of hale there has been no beat yet.
        last_heartbeat_ms: live
            .filter(|live| live.health != hale_core::Health::Reconnecting)
            .map(|live| live.last_beat.0),
        progress: progress.filter(|progress| *progress != hale_core::Progress::default()).map(|progress| {
            ProgressBody {
                fraction: progress.fraction,
                message: progress.message,
                task: progress.task,
                fields: progress.fields,
            }
        }),
        down: record.down.as_ref().filter(|down| down.incarnation == record.incarnation).map(down_summary),
        last_down: record.down.as_ref().map(down_summary),
        breaker: record.health.breaker.name().to_string(),
        quarantine: record.health.quarantine.as_ref().map(|quarantine| QuarantineSummary {
            reason: quarantine.reason.clone(),
            by: quarantine.by.to_string(),
            at_ms: quarantine.at.0,
            action: quarantine.action.as_str().to_string(),
        }),
    }
}

fn down_summary(down: &hale_core::Down) -> DownSummary {
    DownSummary {
        incarnation: down.incarnation,
        detector: down.cause.detector().to_string(),
        cause: down.cause.to_string(),
        at_ms: down.at.0,
    }
}

#[utoipa::path(post, path = "/v1/agents/{agent}/heartbeat", tag = "agents", params(AgentPath), request_body = HttpHeartbeat,
    responses((status = 200, description = "alive", body = Answer)))]
async fn heartbeat(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpHeartbeat>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    let progress = body.progress.map(wire::progress);
    app.engine.heartbeat(agent_name(&agent)?, body.incarnation, progress, body.busy_ms).await?;
    Ok(Json(serde_json::json!({ "ok": true })).into_response())
}

/// An error the agent ran into, for its breaker (volatile).
#[utoipa::path(post, path = "/v1/agents/{agent}/errors", tag = "agents", params(AgentPath), request_body = HttpErrorReport,
    responses((status = 200, description = "counted for the breaker", body = Answer)))]
async fn report_error(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpErrorReport>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    app.engine.report_error(agent_name(&agent)?, body.incarnation).await?;
    Ok(Json(serde_json::json!({ "ok": true })).into_response())
}

/// A policy violation of the agent, by the operator or (`by`) another agent.
#[utoipa::path(post, path = "/v1/agents/{agent}/violations", tag = "agents", params(AgentPath), request_body = HttpViolation,
    responses((status = 200, description = "logged", body = Answer)))]
async fn report_violation(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpViolation>,
) -> Result<Response, ApiError> {
    use hale_core::health::Reporter;
    // An agent reports as itself: it cannot speak for the operator or another agent.
    let by = match (&principal, body.by) {
        (Principal::Agent { agent: own, .. }, Some(by)) if by != own.as_str() => {
            return Err(ApiError::coded(
                StatusCode::FORBIDDEN,
                ServerCode::Forbidden,
                format!("this token belongs to agent {:?}; it cannot report as {by:?}", own.as_str()),
                false,
            ));
        }
        (Principal::Agent { agent: own, .. }, _) if own.as_str() == agent => Reporter::Itself,
        (Principal::Agent { agent: own, .. }, _) => Reporter::Agent(own.clone()),
        (Principal::Admin, Some(by)) if by == agent => Reporter::Itself,
        (Principal::Admin, Some(by)) => Reporter::Agent(agent_name(&by)?),
        (Principal::Admin, None) => Reporter::Operator,
    };
    app.engine.execute(wire::violation(agent_name(&agent)?, by, body.critical, body.reason)).await?;
    Ok(Json(serde_json::json!({ "ok": true })).into_response())
}

/// `hale quarantine AGENT --reason`.
#[utoipa::path(post, path = "/v1/agents/{agent}/quarantine", tag = "operator", params(AgentPath), request_body = HttpQuarantine,
    responses((status = 200, description = "quarantined (admin)", body = Answer)))]
async fn quarantine(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpQuarantine>,
) -> Result<Response, ApiError> {
    principal.require_admin("quarantine")?;
    app.engine.execute(HealthCommand::Quarantine { agent: agent_name(&agent)?, reason: body.reason }).await?;
    Ok(Json(serde_json::json!({ "quarantined": true })).into_response())
}

/// `hale release AGENT`.
#[utoipa::path(post, path = "/v1/agents/{agent}/release", tag = "operator", params(AgentPath),
    responses((status = 200, description = "released from quarantine (admin)", body = Answer)))]
async fn release(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
) -> Result<Response, ApiError> {
    principal.require_admin("release")?;
    app.engine.execute(HealthCommand::Release { agent: agent_name(&agent)? }).await?;
    Ok(Json(serde_json::json!({ "released": true })).into_response())
}

/// `hale stop AGENT`: stop a managed agent and do not restart it.
#[utoipa::path(post, path = "/v1/agents/{agent}/stop", tag = "operator", params(AgentPath),
    responses((status = 200, description = "stopped; not restarted (admin)", body = Answer)))]
async fn stop(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
) -> Result<Response, ApiError> {
    principal.require_admin("stop")?;
    app.engine.execute(SupervisionCommand::Stop { agent: agent_name(&agent)? }).await?;
    Ok(Json(serde_json::json!({ "stopped": true })).into_response())
}

/// `hale restart AGENT`: restart now and forget the restart window.
#[utoipa::path(post, path = "/v1/agents/{agent}/restart", tag = "operator", params(AgentPath),
    responses((status = 200, description = "restarted (admin)", body = Answer)))]
async fn restart(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
) -> Result<Response, ApiError> {
    principal.require_admin("restart")?;
    respond(app.engine.execute(SupervisionCommand::Restart { agent: agent_name(&agent)? }).await?)
}

#[utoipa::path(get, path = "/v1/agents/{agent}", tag = "agents", params(AgentPath, StateQuery),
    responses((status = 200, description = "the agent's state (at `version`, if given)", body = AgentState)))]
async fn agent_state(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<AgentState>, ApiError> {
    principal.require_agent(&agent)?;
    let agent = agent_name(&agent)?;
    let version = match query.get("version") {
        None => None,
        Some(text) => {
            Some(text.parse::<u64>().map_err(|_| ApiError::bad_request(format!("version {text:?} is not a number")))?)
        }
    };
    let found = app
        .engine
        .read(move |state| -> Result<AgentState, ApiError> {
            let record = state
                .agent(agent.as_str())
                .ok_or_else(|| hale_core::Rejection::UnknownAgent { agent: agent.to_string() })?;
            let version = version.unwrap_or(record.version());
            let at_version = record.retained_state(version)?;
            Ok(AgentState {
                agent: record.name.to_string(),
                incarnation: record.incarnation,
                version,
                current_version: record.version(),
                state: serde_json::Value::clone(&at_version),
                recovery_points: wire::recovery_points(record),
                history: record.history().collect(),
            })
        })
        .await??;
    Ok(Json(found))
}

/// `GET /v1/agents/{agent}/state`: the same as `GET /v1/agents/{agent}`.
#[utoipa::path(get, path = "/v1/agents/{agent}/state", tag = "agents", params(AgentPath, StateQuery),
    responses((status = 200, description = "the agent's state (at `version`, if given)", body = AgentState)))]
async fn agent_state_alias(
    app: State<AppState>,
    principal: Extension<Principal>,
    agent: Path<String>,
    query: Query<HashMap<String, String>>,
) -> Result<Json<AgentState>, ApiError> {
    agent_state(app, principal, agent, query).await
}

/// The query of `GET /v1/agents/{agent}[/state]`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct StateQuery {
    /// An older version of the state, still retained (see `history`).
    version: Option<u64>,
}

#[utoipa::path(post, path = "/v1/agents/{agent}/hello", tag = "agents", params(AgentPath), request_body = HelloBody,
    responses((status = 200, description = "the run to resume or a new one", body = Welcome)))]
async fn hello(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HelloBody>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    let command = wire::hello(&agent, body)?;
    respond(app.engine.execute(command).await?)
}

#[utoipa::path(post, path = "/v1/agents/{agent}/checkpoint", tag = "agents", params(AgentPath), request_body = HttpCheckpoint,
    responses((status = 200, description = "durable", body = Checkpointed)))]
async fn checkpoint(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpCheckpoint>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    let command = wire::checkpoint(agent_name(&agent)?, body.incarnation, body.patch, body.expected_version);
    respond(app.engine.execute(command).await?)
}

#[utoipa::path(post, path = "/v1/agents/{agent}/recovery-points", tag = "agents", params(AgentPath), request_body = HttpRecoveryPoint,
    responses((status = 200, description = "marked", body = RecoveryPointInfo)))]
async fn recovery_point(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpRecoveryPoint>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    let command = wire::recovery_point(agent_name(&agent)?, body.incarnation, body.name)?;
    respond(app.engine.execute(command).await?)
}

#[utoipa::path(post, path = "/v1/agents/{agent}/rollback", tag = "agents", params(AgentPath), request_body = HttpRollback,
    responses((status = 200, description = "rolled back", body = RolledBack)))]
async fn rollback(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpRollback>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    let command = wire::rollback(agent_name(&agent)?, body.incarnation, body.to)?;
    respond(app.engine.execute(command).await?)
}

/// Answers an HTTP write with what the engine answered, once it is durable.
pub(super) fn respond(response: crate::engine::Response) -> Result<Response, ApiError> {
    Ok(wire::body(response))
}
