//! `GET /metrics`: Prometheus text (OpenMetrics 1.0) for scrapers.
//!
//! Who may read it is decided by `authenticate` in the parent module: the admin token;
//! or the token of `[server] metrics_token_file`, which reads metrics and nothing else
//! (scrapers cannot refresh an agent's short-lived JWT); or anyone, with
//! `[server] metrics_public = true`.

use super::{ApiError, AppState, ServerCode};
use crate::auth::Principal;
use crate::metrics::Gauges;
use axum::Extension;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The content type of the OpenMetrics text format, which Prometheus asks for and reads.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text (the admin token, the metrics token, or none when metrics_public)",
        body = String, content_type = "application/openmetrics-text")))]
pub async fn scrape(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
) -> Result<Response, ApiError> {
    if let Some(Extension(principal)) = principal {
        principal.require_admin("the metrics")?;
    }
    let local = app.nodes.as_ref().map(|nodes| nodes.name().clone());
    let gauges = app.engine.read_core(move |core| Gauges::read_on(core, local.as_ref())).await?;
    let metrics = app.metrics.clone();
    // Reads /proc (hale's and its agents' resource use) and the snapshot directory.
    let text = tokio::task::spawn_blocking(move || metrics.encode(&gauges)).await.map_err(|error| {
        ApiError::coded(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            ServerCode::Internal,
            format!("encoding the metrics failed: {error}"),
            true,
        )
    })?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}
