//! The network face of hale: the HTTP API and the WebSocket session endpoint.

pub(crate) mod convert;
mod error;
mod http;
pub(crate) mod task_convert;
mod tasks;
mod ws;

pub use error::ApiError;

use crate::engine::Engine;
use crate::sessions::Sessions;
use axum::Router;
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
    /// Becomes true when the server begins shutting down; sessions close on it.
    pub shutdown: watch::Receiver<bool>,
}

/// All routes.
pub fn router(state: AppState) -> Router {
    http::routes().route(hale_proto::SESSION_PATH, axum::routing::get(ws::upgrade)).with_state(state)
}
