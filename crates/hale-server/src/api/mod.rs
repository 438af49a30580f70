//! The network face of hale: the HTTP API and the WebSocket session endpoint.

mod backups;
pub mod cluster;
mod dashboard;
mod error;
pub mod events;
mod hooks;
mod http;
pub(crate) mod mail;
mod metrics;
pub(crate) mod openapi;
mod tasks;
pub(crate) mod tokens;
pub(crate) mod wire;
mod ws;

pub use error::{ApiError, ServerCode};
pub use ws::decode_frame;

use crate::auth::Auth;
use crate::engine::Engine;
use crate::sessions::Sessions;
use axum::Router;
use axum::extract::{Request, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use std::sync::Arc;
use tokio::sync::watch;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub sessions: Arc<Sessions>,
    pub frame_bytes_max: usize,
    pub body_bytes_max: usize,
    pub session_in_flight_max: usize,
    pub auth: Arc<Auth>,
    /// How long a request body may take to arrive.
    pub body_timeout: std::time::Duration,
    /// Becomes true when the server begins shutting down; sessions close on it.
    pub shutdown: watch::Receiver<bool>,
    /// Counters and histograms for `GET /metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Who besides the admin may scrape `GET /metrics`.
    pub metrics_access: Arc<crate::metrics::MetricsAccess>,
    /// Online backups of the log.
    pub backups: Arc<crate::backup::Backups>,
    /// The log's database, which `GET /v1/events` reads over a read-only connection.
    pub log_path: std::path::PathBuf,
    /// The keys that open sealed records (encryption at rest), for the events it reads.
    pub keys: Option<Arc<hale_store::Keyring>>,
    /// The failure hooks of hale.toml, for `GET /v1/hooks`.
    pub hooks: Arc<crate::hooks::Hooks>,
    /// This node's Raft, when it is a node of a cluster.
    pub cluster: Option<cluster::ClusterControl>,
    /// This node's part in running agents across the cluster (on a cluster).
    pub nodes: Option<Arc<crate::nodes::Nodes>>,
    /// On a node of a cluster: how far the committed records are copied into the events
    /// table that the events API reads (`hale_cluster::store::mirror`).
    pub events_copied: Option<tokio::sync::watch::Receiver<u64>>,
}

/// One route: a method, a path and its handler. The router is built from [`routes`] and
/// nothing else, so that list is every route hale answers; a test holds it equal to the
/// paths of the OpenAPI document (`GET /v1/openapi.json`).
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<AppState>,
}

impl Route {
    pub fn get<H: Handler<T, AppState>, T: 'static>(path: &'static str, handler: H) -> Route {
        Route { method: Method::GET, path, handler: axum::routing::on(MethodFilter::GET, handler) }
    }

    pub fn post<H: Handler<T, AppState>, T: 'static>(path: &'static str, handler: H) -> Route {
        Route { method: Method::POST, path, handler: axum::routing::on(MethodFilter::POST, handler) }
    }
}

/// The paths served without a token: the probes, the refresh (its body is the credential),
/// the OpenAPI document and the dashboard's files (none holds data).
pub const OPEN_PATHS: [&str; 7] = [
    "/healthz",
    "/readyz",
    "/v1/auth/refresh",
    openapi::PATH,
    dashboard::PUBLIC_PATHS[0],
    dashboard::PUBLIC_PATHS[1],
    dashboard::PUBLIC_PATHS[2],
];

/// Every route hale answers.
pub fn routes() -> Vec<Route> {
    let mut routes = Vec::new();
    routes.extend(http::routes());
    routes.extend(tasks::routes());
    routes.extend(mail::routes());
    routes.extend(tokens::routes());
    routes.push(Route::get("/metrics", metrics::scrape));
    routes.extend(backups::routes());
    routes.extend(cluster::routes());
    routes.extend(events::routes());
    routes.push(Route::get("/v1/hooks", hooks::list));
    routes.extend(dashboard::routes());
    routes.push(Route::get(hale_proto::SESSION_PATH, ws::upgrade));
    routes.push(Route::get(openapi::PATH, openapi::document));
    routes
}

/// All routes; every one but the probes, the refresh, the OpenAPI document and the
/// dashboard's files needs a token (`/metrics` may take its own token, or none when
/// `metrics_public`).
pub fn router(state: AppState) -> Router {
    // Two routes on one path (GET and POST /v1/tasks) merge into one method router.
    let router = routes().into_iter().fold(Router::new(), |router, route| router.route(route.path, route.handler));
    router
        .fallback(|| async { ApiError::not_found("no such endpoint; see docs/protocol.md for the API") })
        .method_not_allowed_fallback(|| async {
            ApiError::coded(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                ServerCode::MethodNotAllowed,
                "this endpoint does not take that method",
                false,
            )
        })
        .layer(axum::middleware::from_fn(stale_reads))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(axum::middleware::map_response(json_errors))
        // Outermost: a request is in flight on its connection from here (limits.rs).
        .layer(axum::middleware::from_fn(crate::limits::track_requests))
        .with_state(state)
}

/// The request header with which a read accepts a stale answer from a node of a cluster
/// that does not lead (`Hale-Read: stale-ok`), and the response header that says the
/// answer was one (`Hale-Read: stale`): the committed state as this node last took it
/// in, which may be behind the leader's.
pub const READ_HEADER: &str = "hale-read";

/// Serves reads that accept a stale answer (see [`READ_HEADER`]): anywhere else they go to
/// the leader, linearizably.
async fn stale_reads(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let accepts = request.method() == axum::http::Method::GET
        && request.headers().get(READ_HEADER).is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"stale-ok"));
    if !accepts {
        return next.run(request).await;
    }
    let scope = crate::engine::STALE_READ.scope(std::cell::Cell::new(false), async move {
        let response = next.run(request).await;
        (response, crate::engine::STALE_READ.with(std::cell::Cell::get))
    });
    let (mut response, stale) = scope.await;
    if stale {
        response.headers_mut().insert(READ_HEADER, axum::http::HeaderValue::from_static("stale"));
    }
    response
}

/// Bodies of axum's own rejections read at most (they are one line).
const REJECTION_BYTES_MAX: usize = 16 * 1024;

/// Every error a client sees has the one documented body, `{"error": {"code", "message",
/// "retryable"}}`. hale's handlers answer so; axum's extractors do not when they refuse
/// a request before a handler runs (a path segment that is not UTF-8, a query of the
/// wrong shape, a GET of /v1/session that is no WebSocket upgrade), so their plain-text
/// answers are rewritten here, keeping the status, the message and headers such as `Allow`.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, REJECTION_BYTES_MAX).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let code = match status.as_u16() {
        400 => ServerCode::BadRequest,
        404 => ServerCode::NotFound,
        405 => ServerCode::MethodNotAllowed,
        413 => ServerCode::BodyTooLarge,
        415 => ServerCode::UnsupportedMediaType,
        426 => ServerCode::UpgradeRequired,
        _ if status.is_server_error() => ServerCode::Internal,
        _ => ServerCode::BadRequest,
    };
    let mut answer = ApiError::coded(status, code, message, status.is_server_error()).into_response();
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    answer.headers_mut().extend(parts.headers);
    answer
}

/// Finds who is asking (`Authorization: Bearer TOKEN`, or `?access_token=` on the
/// WebSocket path, for clients that cannot set headers) and hands it to the handler.
async fn authenticate(State(app): State<AppState>, mut request: Request, next: Next) -> Result<Response, ApiError> {
    let path = request.uri().path();
    if OPEN_PATHS.contains(&path) {
        return Ok(next.run(request).await);
    }
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
        .map(|token| token.trim().to_string());
    if path == "/metrics" {
        let access = &app.metrics_access;
        let metrics_token =
            |given: &str| access.token.as_deref().is_some_and(|own| crate::auth::same_secret(given, own));
        if access.public || header.as_deref().is_some_and(metrics_token) {
            return Ok(next.run(request).await);
        }
    }
    let query = (path == hale_proto::SESSION_PATH)
        .then(|| request.uri().query())
        .flatten()
        .and_then(|query| query.split('&').find_map(|pair| pair.strip_prefix("access_token=")))
        .map(str::to_string);
    let Some(token) = header.or(query) else {
        return Err(ApiError::coded(
            axum::http::StatusCode::UNAUTHORIZED,
            ServerCode::Unauthenticated,
            "this endpoint needs a token (Authorization: Bearer TOKEN): the CLI finds the admin token in the data \
             directory; an agent gets its own from `hale token issue AGENT`, or in HALE_TOKEN when hale runs it",
            false,
        ));
    };
    let principal = app.auth.authenticate(&token)?;
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}
