//! The live dashboard: one HTML page, a stylesheet and a script, compiled into the binary
//! (no build step, nothing fetched from elsewhere, so it works offline).
//!
//! These paths are served without a token: they hold no data. The page asks the API for
//! everything with the admin token, which it takes from the URL fragment (`/#token=…`,
//! which browsers never send to the server) or from a form, and keeps in sessionStorage.

use super::AppState;
use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const PAGE: &str = include_str!("../../assets/dashboard.html");
const STYLE: &str = include_str!("../../assets/dashboard.css");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");

/// The paths served without a token (with the probes and the refresh).
pub const PUBLIC_PATHS: [&str; 3] = ["/", "/assets/dashboard.css", "/assets/dashboard.js"];

/// Only this origin's own files and API; no inline script, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(PUBLIC_PATHS[0], get(|| async { asset("text/html; charset=utf-8", PAGE) }))
        .route(PUBLIC_PATHS[1], get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route(PUBLIC_PATHS[2], get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
