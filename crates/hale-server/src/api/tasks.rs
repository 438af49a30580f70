//! The HTTP routes of tasks, budgets and the system status.

use super::http::{JsonBody, agent_name, respond};
use super::openapi::{AgentPath, Answer, TaskPath};
use super::{ApiError, AppState, Route, wire};
use crate::auth::Principal;
use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use hale_core::TaskCommand;
use hale_proto::{
    HttpSpend, HttpSubmitTask, HttpTaskWrite, Reserved, RoleStatus, SystemStatus, TaskInfo, TaskSubmitted,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/status", status),
        Route::get("/v1/agents/{agent}/tasks", agent_tasks),
        Route::post("/v1/agents/{agent}/reservations", reserve),
        Route::post("/v1/agents/{agent}/spend", report_spend),
        Route::post("/v1/tasks", submit_task),
        Route::get("/v1/tasks", list_tasks),
        Route::get("/v1/tasks/{task}", get_task),
        Route::post("/v1/tasks/{task}/cancel", cancel_task),
        Route::post("/v1/tasks/{task}/intents", intend_step),
        Route::post("/v1/tasks/{task}/steps", commit_step),
        Route::post("/v1/tasks/{task}/complete", complete_task),
        Route::post("/v1/tasks/{task}/fail", fail_task),
    ]
}

/// The query of `GET /v1/tasks`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Documents the query; the handler reads it for typed errors.
struct TasksQuery {
    /// Only tasks in this status (`pending`, `running`, `completed`, …).
    status: Option<String>,
    /// Only tasks for this role.
    role: Option<String>,
    /// At most this many, newest first (default 1000).
    limit: Option<u64>,
}

fn task_number(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::bad_request(format!("task {text:?} is not a task number")))
}

#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", request_body = HttpSubmitTask,
    responses((status = 200, description = "durable (or the earlier task with the same idempotency key)", body = TaskSubmitted)))]
async fn submit_task(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonBody(body): JsonBody<HttpSubmitTask>,
) -> Result<Response, ApiError> {
    // Any agent may hand out work (an orchestrator does), unless it is quarantined; the
    // principal is not the role.
    let by = match principal {
        Principal::Admin => None,
        Principal::Agent { agent, .. } => Some(agent),
    };
    respond(app.engine.execute(wire::submit(body, by)?).await?)
}

/// `GET /v1/tasks[?status=running&role=coder&limit=100]`, newest first.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(TasksQuery),
    responses((status = 200, description = "tasks, newest first (admin)", body = Vec<TaskInfo>)))]
async fn list_tasks(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Vec<TaskInfo>>, ApiError> {
    principal.require_admin("listing every task")?;
    let limit = match query.get("limit") {
        Some(text) => {
            text.parse::<usize>().map_err(|_| ApiError::bad_request(format!("limit {text:?} is not a number")))?
        }
        None => 1_000,
    };
    let status = query.get("status").cloned();
    let role = query.get("role").cloned();
    let found = app
        .engine
        .read(move |state| {
            state
                .tasks()
                .all()
                .rev()
                .filter(|task| status.as_deref().is_none_or(|wanted| task.status.word() == wanted))
                .filter(|task| role.as_deref().is_none_or(|wanted| task.spec.role.as_str() == wanted))
                .take(limit)
                .map(wire::tasks::task_info)
                .collect()
        })
        .await?;
    Ok(Json(found))
}

/// The query of `GET /v1/tasks/{task}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Documents the query; the handler reads it for typed errors.
struct TaskQuery {
    /// Wait up to this many seconds (at most 300) for the task to end before answering
    /// (a long poll); the answer is the task as it is then, ended or not.
    wait: Option<f64>,
}

/// The longest `?wait=` of `GET /v1/tasks/{task}`.
const WAIT_MAX_SECONDS: f64 = 300.0;

#[utoipa::path(get, path = "/v1/tasks/{task}", tag = "tasks", params(TaskPath, TaskQuery),
    responses((status = 200, description = "the task (admin, the agent that submitted it, or an agent that held it; to another agent, unknown_task as for a task that does not exist)", body = TaskInfo)))]
async fn get_task(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(task): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<TaskInfo>, ApiError> {
    let task = task_number(&task)?;
    let wait = match query.get("wait") {
        None => None,
        Some(text) => match text.parse::<f64>() {
            Ok(seconds) if (0.0..=WAIT_MAX_SECONDS).contains(&seconds) => Some(Duration::from_secs_f64(seconds)),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "wait={text:?} is not a number of seconds from 0 to {WAIT_MAX_SECONDS}"
                )));
            }
        },
    };
    // Subscribed before the first read, so an end between the two is not missed.
    let mut ends = app.engine.subscribe_events();
    let deadline = wait.map(|wait| tokio::time::Instant::now() + wait);
    loop {
        let found = app
            .engine
            .read(move |state| {
                state.tasks().get(task).map(|found| {
                    let may_read = [found.last_holder.clone(), found.submitted_by.clone()];
                    (may_read, found.status.is_final(), wire::tasks::task_info(found))
                })
            })
            .await?;
        // The operator sees every task; an agent the ones it submitted, holds or held.
        // Another agent's task is answered as one that does not exist, so an agent's token
        // cannot learn which task numbers are taken.
        let unknown = || hale_core::Rejection::UnknownTask { task };
        let (may_read, ended, info) = found.ok_or_else(unknown)?;
        let allowed = matches!(principal, Principal::Admin)
            || may_read.iter().flatten().any(|agent| principal.may_act_for(agent.as_str()));
        if !allowed {
            return Err(unknown().into());
        }
        let Some(deadline) = deadline.filter(|_| !ended) else { return Ok(Json(info)) };
        // Until an event about this task ends it (a lagging subscription reads again).
        let ended_now = async {
            loop {
                match ends.recv().await {
                    Ok(durable) if task_ended(&durable.event, task) => return,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        if tokio::time::timeout_at(deadline, ended_now).await.is_err() {
            // Out of time: answer with the task as it is now.
            let info = app.engine.read(move |state| state.tasks().get(task).map(wire::tasks::task_info)).await?;
            return info.map(Json).ok_or_else(|| unknown().into());
        }
    }
}

/// Whether `event` ends task `task`.
fn task_ended(event: &hale_core::Event, task: u64) -> bool {
    use hale_core::Event;
    matches!(event, Event::TaskCompleted { task: ended, .. } | Event::TaskFailed { task: ended, .. } | Event::TaskCancelled { task: ended } if *ended == task)
}

/// The tasks leased to the agent's current run: how an agent without a session asks for work.
#[utoipa::path(get, path = "/v1/agents/{agent}/tasks", tag = "tasks", params(AgentPath),
    responses((status = 200, description = "the tasks leased to the agent's current run", body = Vec<TaskInfo>)))]
async fn agent_tasks(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
) -> Result<Json<Vec<TaskInfo>>, ApiError> {
    principal.require_agent(&agent)?;
    let agent = agent_name(&agent)?;
    let found = app
        .engine
        .read(move |state| {
            let incarnation = state.agent(agent.as_str()).map_or(0, |record| record.incarnation);
            state
                .tasks()
                .running_on(&agent)
                .filter(|task| task.holder().is_some_and(|(_, held)| held == incarnation))
                .map(wire::tasks::task_info)
                .collect()
        })
        .await?;
    Ok(Json(found))
}

#[utoipa::path(post, path = "/v1/tasks/{task}/cancel", tag = "tasks", params(TaskPath),
    responses((status = 200, description = "cancelled (admin)", body = Answer)))]
async fn cancel_task(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(task): Path<String>,
) -> Result<Response, ApiError> {
    principal.require_admin("cancelling a task")?;
    respond(app.engine.execute(TaskCommand::Cancel { task: task_number(&task)? }).await?)
}

#[utoipa::path(post, path = "/v1/tasks/{task}/intents", tag = "tasks", params(TaskPath), request_body = HttpTaskWrite,
    responses((status = 200, description = "the intent is durable", body = Answer)))]
async fn intend_step(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(task): Path<String>,
    JsonBody(body): JsonBody<HttpTaskWrite>,
) -> Result<Response, ApiError> {
    principal.require_agent(&body.agent)?;
    let name = body.name.ok_or_else(|| ApiError::bad_request("an intent needs the step's name"))?;
    let command = wire::intend_step(task_number(&task)?, agent_name(&body.agent)?, body.incarnation, name);
    respond(app.engine.execute(command).await?)
}

#[utoipa::path(post, path = "/v1/tasks/{task}/steps", tag = "tasks", params(TaskPath), request_body = HttpTaskWrite,
    responses((status = 200, description = "the step is durable", body = Answer)))]
async fn commit_step(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(task): Path<String>,
    JsonBody(body): JsonBody<HttpTaskWrite>,
) -> Result<Response, ApiError> {
    principal.require_agent(&body.agent)?;
    let name = body.name.ok_or_else(|| ApiError::bad_request("a step needs a name"))?;
    let step = wire::Step {
        name,
        result: body.result,
        llm: body.llm,
        compensation: body.compensation,
        reservation: body.reservation,
    };
    let command = wire::commit_step(task_number(&task)?, agent_name(&body.agent)?, body.incarnation, step);
    respond(app.engine.execute(command).await?)
}

#[utoipa::path(post, path = "/v1/tasks/{task}/complete", tag = "tasks", params(TaskPath), request_body = HttpTaskWrite,
    responses((status = 200, description = "completed", body = Answer)))]
async fn complete_task(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(task): Path<String>,
    JsonBody(body): JsonBody<HttpTaskWrite>,
) -> Result<Response, ApiError> {
    principal.require_agent(&body.agent)?;
    let command = wire::complete(task_number(&task)?, agent_name(&body.agent)?, body.incarnation, body.result);
    respond(app.engine.execute(command).await?)
}

#[utoipa::path(post, path = "/v1/tasks/{task}/fail", tag = "tasks", params(TaskPath), request_body = HttpTaskWrite,
    responses((status = 200, description = "the attempt failed", body = Answer)))]
async fn fail_task(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(task): Path<String>,
    JsonBody(body): JsonBody<HttpTaskWrite>,
) -> Result<Response, ApiError> {
    principal.require_agent(&body.agent)?;
    let command = wire::fail(task_number(&task)?, agent_name(&body.agent)?, body.incarnation, body.reason, body.retry);
    respond(app.engine.execute(command).await?)
}

#[utoipa::path(post, path = "/v1/agents/{agent}/reservations", tag = "tasks", params(AgentPath), request_body = HttpSpend,
    responses((status = 200, description = "reserved", body = Reserved)))]
async fn reserve(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpSpend>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    if body.reservation.is_some() {
        return Err(ApiError::bad_request("a reservation names no reservation; report spending to /spend"));
    }
    let command = wire::reserve(agent_name(&agent)?, body.incarnation, body.task, body.tokens, body.cost);
    respond(app.engine.execute(command).await?)
}

#[utoipa::path(post, path = "/v1/agents/{agent}/spend", tag = "tasks", params(AgentPath), request_body = HttpSpend,
    responses((status = 200, description = "counted", body = Answer)))]
async fn report_spend(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<HttpSpend>,
) -> Result<Response, ApiError> {
    principal.require_agent(&agent)?;
    let (task, reservation) = (body.task, body.reservation);
    let command = wire::report_spend(agent_name(&agent)?, body.incarnation, task, reservation, body.tokens, body.cost);
    respond(app.engine.execute(command).await?)
}

/// `GET /v1/status`: the system mode, capacity per role and the queue.
#[utoipa::path(get, path = "/v1/status", tag = "operations",
    responses((status = 200, description = "the system mode, capacity per role and the queue (admin)", body = SystemStatus)))]
async fn status(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<SystemStatus>, ApiError> {
    principal.require_admin("the system status")?;
    let found = app
        .engine
        .read_core(|core| {
            let state = core.state();
            let settings = core.task_settings();
            let mut per_role: BTreeMap<String, RoleStatus> = BTreeMap::new();
            for record in state.agents() {
                let row = per_role.entry(record.role.to_string()).or_insert_with(|| RoleStatus {
                    role: record.role.to_string(),
                    agents: 0,
                    healthy: 0,
                    leases: 0,
                    queued: 0,
                });
                row.agents += 1;
                row.leases += state.tasks().load(&record.name) as u32;
                if core.can_take_tasks(&record.name) {
                    row.healthy += 1;
                }
            }
            let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
            for task in state.tasks().all() {
                *by_status.entry(task.status.word().to_string()).or_default() += 1;
            }
            for task in state.tasks().pending() {
                let role = task.spec.role.to_string();
                per_role
                    .entry(role.clone())
                    .or_insert_with(|| RoleStatus { role, agents: 0, healthy: 0, leases: 0, queued: 0 })
                    .queued += 1;
            }
            let (serving, roles) = core.serving();
            SystemStatus {
                mode: state.mode().to_string(),
                serving,
                roles,
                per_role: per_role.into_values().collect(),
                queued: state.tasks().queued() as u64,
                shed_background_at: settings.shed_background_at,
                shed_normal_at: settings.shed_normal_at,
                shed_high_at: settings.shed_high_at,
                tasks_by_status: by_status,
                agents_by_state: crate::metrics::Gauges::read(core).agents_by_state(),
                recoveries_last_hour: 0,
                mttr_p50_seconds: None,
                mttr_p99_seconds: None,
            }
        })
        .await?;
    let (recoveries, p50, p99) = app.metrics.recent_recoveries(crate::clock::now());
    Ok(Json(SystemStatus { recoveries_last_hour: recoveries, mttr_p50_seconds: p50, mttr_p99_seconds: p99, ..found }))
}
