//! The live dashboard: one HTML page, a stylesheet and a script, compiled into the binary
//! (no build step, nothing fetched from elsewhere, so it works offline).
//!
//! These paths are served without a token: they hold no data. The page asks the API for
//! everything with the admin token, which it takes from the URL fragment (`/#token=…`,
//! which browsers never send to the server) or from a form, and keeps in sessionStorage.

use super::Route;
use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("../../assets/dashboard.html");
const STYLE: &str = include_str!("../../assets/dashboard.css");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");

/// The paths served without a token (with the probes and the refresh).
pub const PUBLIC_PATHS: [&str; 3] = ["/", "/assets/dashboard.css", "/assets/dashboard.js"];

/// Only this origin's own files and API; no inline script, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

pub fn routes() -> Vec<Route> {
    vec![Route::get(PUBLIC_PATHS[0], page), Route::get(PUBLIC_PATHS[1], style), Route::get(PUBLIC_PATHS[2], script)]
}

#[utoipa::path(get, path = "/", tag = "dashboard",
    responses((status = 200, description = "the dashboard's page", body = String, content_type = "text/html")))]
async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

#[utoipa::path(get, path = "/assets/dashboard.css", tag = "dashboard",
    responses((status = 200, description = "its stylesheet", body = String, content_type = "text/css")))]
async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

#[utoipa::path(get, path = "/assets/dashboard.js", tag = "dashboard",
    responses((status = 200, description = "its script", body = String, content_type = "text/javascript")))]
async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
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
