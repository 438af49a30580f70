//! Every error a client can see: a stable code, a message saying what to do, and whether
//! retrying the same request later can succeed.

use crate::engine::EngineError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hale_core::{NameError, Rejection};
use hale_proto::{ErrorBody, HttpError};
use hale_store::WriteError;

/// An error on its way to a client, over HTTP or a WebSocket session.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// The `Retry-After` of a 503, in seconds (1 unless the rejection says).
    pub retry_after_s: Option<u64>,
}

/// A code the server sends of its own; the core's are `Rejection::code`. Every code a
/// client can see has a section and a row in docs/errors.md, and the tests below hold
/// both lists to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(serde::Deserialize), serde(rename_all = "snake_case"))]
pub enum ServerCode {
    /// An HTTP body or query parameter hale cannot read.
    BadRequest,
    /// A session frame hale cannot read as a request.
    BadFrame,
    /// A session frame whose `type` is not a request's.
    UnknownFrameType,
    /// An HTTP body over `body_bytes_max`.
    BodyTooLarge,
    /// An HTTP request head with headers too large or too many (431).
    HeadersTooLarge,
    /// An HTTP body that did not arrive within `body_timeout_ms`.
    RequestTimeout,
    /// No endpoint has the path.
    NotFound,
    /// The endpoint does not take the method.
    MethodNotAllowed,
    /// A 415 from the HTTP framework.
    UnsupportedMediaType,
    /// A WebSocket handshake on a connection that cannot be upgraded.
    UpgradeRequired,
    /// A request before the session's `hello`.
    HelloRequired,
    /// A second `hello` on a session.
    HelloRepeated,
    /// No token.
    Unauthenticated,
    /// A token hale did not issue for agents.
    TokenInvalid,
    TokenExpired,
    TokenNotYetValid,
    TokenRevoked,
    /// A valid token, but not for this.
    Forbidden,
    /// A backup would replace a file.
    BackupExists,
    /// A backup that began did not finish.
    BackupFailed,
    /// A commit to the log failed; hale takes no more writes.
    LogUnavailable,
    /// This node of a cluster does not lead: the request must go to the leader.
    NotLeader,
    /// A cluster operation on a single node.
    NotClustered,
    /// A cluster operation the cluster refused (an init on a member, a join refused).
    ClusterRefused,
    ShuttingDown,
    /// Something failed inside hale.
    Internal,
}

impl ServerCode {
    /// The code as clients see it.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerCode::BadRequest => "bad_request",
            ServerCode::BadFrame => "bad_frame",
            ServerCode::UnknownFrameType => "unknown_frame_type",
            ServerCode::BodyTooLarge => "body_too_large",
            ServerCode::HeadersTooLarge => "headers_too_large",
            ServerCode::RequestTimeout => "request_timeout",
            ServerCode::NotFound => "not_found",
            ServerCode::MethodNotAllowed => "method_not_allowed",
            ServerCode::UnsupportedMediaType => "unsupported_media_type",
            ServerCode::UpgradeRequired => "upgrade_required",
            ServerCode::HelloRequired => "hello_required",
            ServerCode::HelloRepeated => "hello_repeated",
            ServerCode::Unauthenticated => "unauthenticated",
            ServerCode::TokenInvalid => "token_invalid",
            ServerCode::TokenExpired => "token_expired",
            ServerCode::TokenNotYetValid => "token_not_yet_valid",
            ServerCode::TokenRevoked => "token_revoked",
            ServerCode::Forbidden => "forbidden",
            ServerCode::BackupExists => "backup_exists",
            ServerCode::BackupFailed => "backup_failed",
            ServerCode::LogUnavailable => "log_unavailable",
            ServerCode::NotLeader => "not_leader",
            ServerCode::NotClustered => "not_clustered",
            ServerCode::ClusterRefused => "cluster_refused",
            ServerCode::ShuttingDown => "shutting_down",
            ServerCode::Internal => "internal",
        }
    }

    /// The body of an error with this code, for an answer that has no status of its own
    /// (the last line of a streamed answer).
    pub fn body(self, message: impl Into<String>, retryable: bool) -> ErrorBody {
        ErrorBody { code: self.as_str().to_string(), message: message.into(), retryable, leader: None }
    }
}

impl ApiError {
    /// An error with one of the server's own codes.
    pub fn coded(status: StatusCode, code: ServerCode, message: impl Into<String>, retryable: bool) -> ApiError {
        ApiError::with_code(status, code.as_str(), message, retryable)
    }

    fn with_code(status: StatusCode, code: &'static str, message: impl Into<String>, retryable: bool) -> ApiError {
        ApiError {
            status,
            body: ErrorBody { code: code.to_string(), message: message.into(), retryable, leader: None },
            retry_after_s: None,
        }
    }

    /// The request is malformed: not JSON of the expected shape, or a query parameter
    /// that does not parse.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::coded(StatusCode::BAD_REQUEST, ServerCode::BadRequest, message, false)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::coded(StatusCode::NOT_FOUND, ServerCode::NotFound, message, false)
    }
}

impl From<NameError> for ApiError {
    fn from(error: NameError) -> ApiError {
        ApiError::from(Rejection::from(error))
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> ApiError {
        let status = match &rejection {
            Rejection::InvalidName(_)
            | Rejection::PatchNotObject { .. }
            | Rejection::PatchTooDeep { .. }
            | Rejection::BadFraction { .. }
            | Rejection::ReasonTooLong { .. }
            | Rejection::BadTask { .. }
            | Rejection::BadMessage { .. } => StatusCode::BAD_REQUEST,
            Rejection::RefreshRefused { .. } => StatusCode::UNAUTHORIZED,
            Rejection::Quarantined { .. } => StatusCode::FORBIDDEN,
            Rejection::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::UnknownAgent { .. }
            | Rejection::UnknownRecoveryPoint { .. }
            | Rejection::UnknownRole { .. }
            | Rejection::UnknownTask { .. }
            | Rejection::NoRecipient { .. }
            | Rejection::UnknownMessage { .. }
            | Rejection::UnknownConversation { .. } => StatusCode::NOT_FOUND,
            Rejection::MailboxFull { .. } | Rejection::TooManyConversations { .. } => StatusCode::TOO_MANY_REQUESTS,
            Rejection::NotStarted { .. }
            | Rejection::StaleIncarnation { .. }
            | Rejection::UnknownIncarnation { .. }
            | Rejection::VersionConflict { .. }
            | Rejection::TooManyRecoveryPoints { .. }
            | Rejection::IncarnationDown { .. }
            | Rejection::NotManaged { .. }
            | Rejection::ManagedByHale { .. }
            | Rejection::NotSupervising { .. }
            | Rejection::LeaseLost { .. }
            | Rejection::TaskEnded { .. }
            | Rejection::StepDone { .. }
            | Rejection::OverBudget { .. }
            | Rejection::NodeTaken { .. } => StatusCode::CONFLICT,
            Rejection::PatchTooLarge { .. }
            | Rejection::StateTooLarge { .. }
            | Rejection::ProgressTooLarge { .. }
            | Rejection::MessageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::VersionNotRetained { .. } => StatusCode::GONE,
        };
        let retry_after_ms = match &rejection {
            Rejection::Overloaded { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        };
        let retryable = retry_after_ms.is_some() || matches!(rejection, Rejection::MailboxFull { .. });
        let mut error = ApiError::with_code(status, rejection.code(), rejection.to_string(), retryable);
        error.retry_after_s = retry_after_ms.map(|ms| ms.div_ceil(1000).max(1));
        error
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::Rejected(rejection) => rejection.into(),
            EngineError::Log(WriteError::Failed(_)) => {
                ApiError::coded(StatusCode::SERVICE_UNAVAILABLE, ServerCode::LogUnavailable, error.to_string(), true)
            }
            EngineError::Log(WriteError::NotLeader { ref leader }) => {
                let leader = leader.as_deref().map(str::to_string);
                let mut answer =
                    ApiError::coded(StatusCode::SERVICE_UNAVAILABLE, ServerCode::NotLeader, error.to_string(), true);
                answer.body.leader = leader;
                answer
            }
            EngineError::Log(WriteError::Stopped) | EngineError::ShuttingDown => ApiError::coded(
                StatusCode::SERVICE_UNAVAILABLE,
                ServerCode::ShuttingDown,
                "hale is shutting down; retry against the next instance",
                true,
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(HttpError { error: self.body })).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            let seconds = self.retry_after_s.unwrap_or(1);
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hale_core::AgentName;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    const ERRORS_MD: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md"));

    /// `pattern => sample` for every kind of rejection. The patterns make one `match`
    /// without a wildcard, so a new `Rejection` does not compile until it is listed here
    /// with a sample; each sample is checked to be of its pattern's kind.
    macro_rules! one_of_each {
        ($($pattern:pat => $sample:expr),* $(,)?) => {{
            fn listed(rejection: &Rejection) {
                match rejection {
                    $($pattern => {})*
                }
            }
            let samples: Vec<Rejection> = vec![$($sample),*];
            let patterns: Vec<fn(&Rejection) -> bool> = vec![$(|rejection| matches!(rejection, $pattern)),*];
            for (sample, pattern) in samples.iter().zip(&patterns) {
                listed(sample);
                assert!(pattern(sample), "{sample:?} is listed under another kind's pattern");
            }
            samples
        }};
    }

    fn every_rejection() -> Vec<Rejection> {
        let a = || "a".to_string();
        one_of_each![
            Rejection::InvalidName(_) => Rejection::InvalidName(AgentName::new("").unwrap_err()),
            Rejection::UnknownAgent { .. } => Rejection::UnknownAgent { agent: a() },
            Rejection::NotStarted { .. } => Rejection::NotStarted { agent: a() },
            Rejection::StaleIncarnation { .. } => Rejection::StaleIncarnation { agent: a(), given: 1, current: 2 },
            Rejection::UnknownIncarnation { .. } => Rejection::UnknownIncarnation { agent: a(), given: 3, current: 2 },
            Rejection::PatchNotObject { .. } => Rejection::PatchNotObject { got: "an array" },
            Rejection::PatchTooLarge { .. } => Rejection::PatchTooLarge { size: 2, max: 1 },
            Rejection::PatchTooDeep { .. } => Rejection::PatchTooDeep { depth: 2, max: 1 },
            Rejection::StateTooLarge { .. } => Rejection::StateTooLarge { size: 2, max: 1 },
            Rejection::VersionConflict { .. } => Rejection::VersionConflict { expected: 1, current: 2 },
            Rejection::UnknownRecoveryPoint { .. } => Rejection::UnknownRecoveryPoint { agent: a(), name: "p".into() },
            Rejection::VersionNotRetained { .. } => {
                Rejection::VersionNotRetained { agent: a(), version: 1, oldest: 2, newest: 3 }
            },
            Rejection::TooManyRecoveryPoints { .. } => Rejection::TooManyRecoveryPoints { agent: a(), max: 1 },
            Rejection::IncarnationDown { .. } => {
                Rejection::IncarnationDown { agent: a(), incarnation: 1, cause: "stopped".into() }
            },
            Rejection::NotManaged { .. } => Rejection::NotManaged { agent: a() },
            Rejection::ManagedByHale { .. } => Rejection::ManagedByHale { agent: a(), current: 1 },
            Rejection::Quarantined { .. } => Rejection::Quarantined { agent: a(), reason: "r".into() },
            Rejection::ProgressTooLarge { .. } => Rejection::ProgressTooLarge { size: 2, max: 1 },
            Rejection::NotSupervising { .. } => Rejection::NotSupervising { agent: a() },
            Rejection::UnknownTask { .. } => Rejection::UnknownTask { task: 1 },
            Rejection::LeaseLost { .. } => Rejection::LeaseLost { task: 1, agent: a(), incarnation: 1 },
            Rejection::TaskEnded { .. } => Rejection::TaskEnded { task: 1, status: "completed".into() },
            Rejection::BadTask { .. } => Rejection::BadTask { reason: "x".into() },
            Rejection::StepDone { .. } => Rejection::StepDone { task: 1, step: "s".into() },
            Rejection::Overloaded { .. } => Rejection::Overloaded {
                priority: "background".into(),
                queued: 2,
                limit: 1,
                mode: "optimal".into(),
                retry_after_ms: 1500,
            },
            Rejection::OverBudget { .. } => Rejection::OverBudget { whose: "task 1".into(), detail: "x".into() },
            Rejection::NodeTaken { .. } => Rejection::NodeTaken { node: "node-2".into(), id: 2, by: "node-1".into() },
            Rejection::RefreshRefused { .. } => Rejection::RefreshRefused { agent: a(), reason: "x".into() },
            Rejection::UnknownRole { .. } => Rejection::UnknownRole { role: "r".into() },
            Rejection::ReasonTooLong { .. } => Rejection::ReasonTooLong { size: 2, max: 1 },
            Rejection::BadFraction { .. } => Rejection::BadFraction { got: "2".into() },
            Rejection::MessageTooLarge { .. } => Rejection::MessageTooLarge { size: 2, max: 1 },
            Rejection::BadMessage { .. } => Rejection::BadMessage { reason: "x".into() },
            Rejection::NoRecipient { .. } => Rejection::NoRecipient { detail: "x".into() },
            Rejection::MailboxFull { .. } => Rejection::MailboxFull { agent: a(), max: 1 },
            Rejection::UnknownMessage { .. } => Rejection::UnknownMessage { detail: "x".into() },
            Rejection::UnknownConversation { .. } => {
                Rejection::UnknownConversation { agent: a(), conversation: "c".into() }
            },
            Rejection::TooManyConversations { .. } => Rejection::TooManyConversations { agent: a(), max: 1 },
        ]
    }

    /// Every `ServerCode`, named as clients see it: serde's list of variants is complete by
    /// construction, and each name must be what `as_str` says.
    fn server_codes() -> Vec<&'static str> {
        let names = hale_proto::variant_names::<ServerCode>();
        for name in &names {
            let code: ServerCode = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(code.as_str(), *name, "ServerCode::{code:?}.as_str()");
        }
        names
    }

    /// Every `.rs` file under `dir`, with its text.
    fn sources(dir: &Path, found: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, found);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                found.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
            }
        }
    }

    /// Every error body is built in this file, from a rejection's code or a `ServerCode`,
    /// so the two lists above are every code hale sends.
    #[test]
    fn every_error_body_is_built_from_a_listed_code() {
        let mut files = Vec::new();
        sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        for (path, text) in &files {
            let built = text.contains(concat!("ErrorBody", " {"));
            assert!(!built || path.ends_with("api/error.rs"), "{path} builds an ErrorBody; use ApiError::coded");
        }
    }

    /// docs/errors.md: the codes with a `### code` section, and the summary table's rows
    /// by code (status, retryable, seen on).
    fn documented() -> (BTreeSet<&'static str>, BTreeMap<&'static str, Vec<&'static str>>) {
        let codes = &ERRORS_MD[..ERRORS_MD.find("\n## Startup errors").expect("a Startup errors section")];
        let sections = codes.lines().filter_map(|line| line.strip_prefix("### ")).map(str::trim).collect();
        let mut rows = BTreeMap::new();
        for line in codes.lines().filter(|line| line.starts_with("| [`")) {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            let code = cells[0].trim_start_matches("[`").split('`').next().unwrap();
            assert!(cells[0].ends_with(&format!("(#{code})")), "the row of {code} links elsewhere: {line}");
            rows.insert(code, cells[1..].to_vec());
        }
        (sections, rows)
    }

    #[test]
    fn every_code_has_a_section_and_a_row_in_errors_md_and_no_other_code_does() {
        let rejections: BTreeSet<String> = every_rejection().iter().map(|r| r.code().to_string()).collect();
        let server: BTreeSet<String> = server_codes().into_iter().map(str::to_string).collect();
        let sent: BTreeSet<&str> = rejections.iter().chain(&server).map(String::as_str).collect();
        let (sections, rows) = documented();
        let no_section: Vec<_> = sent.iter().filter(|code| !sections.contains(*code)).collect();
        let no_row: Vec<_> = sent.iter().filter(|code| !rows.contains_key(*code)).collect();
        assert!(
            no_section.is_empty() && no_row.is_empty(),
            "docs/errors.md has no section for {no_section:?} and no summary row for {no_row:?}"
        );
        let never_sent: Vec<_> = sections.iter().chain(rows.keys()).filter(|code| !sent.contains(*code)).collect();
        assert!(never_sent.is_empty(), "docs/errors.md describes codes hale does not send: {never_sent:?}");
    }

    #[test]
    fn the_summary_rows_of_rejections_have_the_status_and_retryable_they_are_sent_with() {
        let (_, rows) = documented();
        for rejection in every_rejection() {
            let code = rejection.code();
            let error = ApiError::from(rejection);
            let Some(row) = rows.get(code) else { continue };
            assert_eq!(row[0], error.status.as_str(), "HTTP status of {code}");
            let retryable = if error.body.retryable { "yes" } else { "no" };
            assert_eq!(row[1], retryable, "retryable of {code}");
        }
    }
}
