//! The network face of hale: the HTTP API and the WebSocket session endpoint.

mod backups;
pub(crate) mod convert;
mod dashboard;
mod error;
pub mod events;
mod http;
pub(crate) mod mail;
mod metrics;
pub(crate) mod task_convert;
mod tasks;
pub(crate) mod tokens;
mod ws;

pub use error::ApiError;
pub use ws::decode_frame;

use crate::auth::Auth;
use crate::engine::Engine;
use crate::sessions::Sessions;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
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
}

/// All routes; every one but the probes, the refresh and the dashboard's files needs a
/// token (`/metrics` may take its own token, or none when `metrics_public`).
pub fn router(state: AppState) -> Router {
    http::routes()
        .merge(tokens::routes())
        .route("/metrics", axum::routing::get(metrics::scrape))
        .merge(backups::routes())
        .merge(events::routes())
        .merge(dashboard::routes())
        .route(hale_proto::SESSION_PATH, axum::routing::get(ws::upgrade))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Finds who is asking (`Authorization: Bearer TOKEN`, or `?access_token=` on the
/// WebSocket path, for clients that cannot set headers) and hands it to the handler.
async fn authenticate(State(app): State<AppState>, mut request: Request, next: Next) -> Result<Response, ApiError> {
    let path = request.uri().path();
    if matches!(path, "/healthz" | "/readyz" | "/v1/auth/refresh") || dashboard::PUBLIC_PATHS.contains(&path) {
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
        return Err(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "this endpoint needs a token (Authorization: Bearer TOKEN): the CLI finds the admin token in the data \
             directory; an agent gets its own from `hale token issue AGENT`, or in HALE_TOKEN when hale runs it",
            false,
        ));
    };
    let principal = app.auth.authenticate(&token)?;
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}
