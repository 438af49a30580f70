//! `GET /v1/hooks`: the failure hooks of hale.toml and how their deliveries went.

use super::{ApiError, AppState};
use crate::auth::Principal;
use axum::extract::State;
use axum::{Extension, Json};

/// Each hook's counters and last delivery and failure since this hale started (the log
/// has every outcome: `GET /v1/events?kind=hook_delivered,hook_failed`).
#[utoipa::path(get, path = "/v1/hooks", tag = "operations",
    responses((status = 200, description = "every hook of hale.toml, with its counters (admin token)",
        body = Vec<hale_proto::HookStatus>)))]
pub(super) async fn list(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<hale_proto::HookStatus>>, ApiError> {
    principal.require_admin("reading the hooks")?;
    Ok(Json(app.hooks.status()))
}
