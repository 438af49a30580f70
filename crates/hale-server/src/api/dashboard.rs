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

#[cfg(test)]
mod tests {
    use super::SCRIPT;

    /// The script picks events by kind: the timeline's kinds, the ones left out of "Recent
    /// events", and the `case`s that fold a failure. A name that is not a kind of the log
    /// (renamed, or mistyped) would leave that part of the page quietly empty.
    #[test]
    fn the_script_names_only_kinds_the_log_has() {
        let kinds = hale_proto::variant_names::<hale_core::Event>();
        let between = |start: &str, end: &str| {
            let from = SCRIPT.find(start).unwrap_or_else(|| panic!("{start:?} is not in dashboard.js")) + start.len();
            &SCRIPT[from..from + SCRIPT[from..].find(end).unwrap()]
        };
        let quoted = |text: &'static str| text.split('"').skip(1).step_by(2).collect::<Vec<_>>();
        let timeline = quoted(between("const TIMELINE_KINDS = [", "]"));
        let noisy = quoted(between("const NOISY_KINDS = new Set([", "]"));
        let cases: Vec<&str> = between("switch (event.kind) {", "\n  }\n")
            .lines()
            .filter_map(|line| line.trim().strip_prefix("case \"")?.strip_suffix("\":"))
            .collect();
        assert!(!timeline.is_empty() && !noisy.is_empty() && !cases.is_empty());
        for name in timeline.iter().chain(&noisy).chain(&cases) {
            assert!(kinds.contains(name), "dashboard.js names {name:?}, which is no event kind: {kinds:?}");
        }
    }
}
