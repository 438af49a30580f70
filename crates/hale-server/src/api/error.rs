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

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>, retryable: bool) -> ApiError {
        ApiError {
            status,
            body: ErrorBody { code: code.to_string(), message: message.into(), retryable },
            retry_after_s: None,
        }
    }

    /// The request is malformed: not JSON of the expected shape, or a query parameter
    /// that does not parse.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message, false)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message, false)
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
            | Rejection::OverBudget { .. } => StatusCode::CONFLICT,
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
        let mut error = ApiError::new(status, rejection.code(), rejection.to_string(), retryable);
        error.retry_after_s = retry_after_ms.map(|ms| ms.div_ceil(1000).max(1));
        error
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::Rejected(rejection) => rejection.into(),
            EngineError::Log(WriteError::Failed(_)) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "log_unavailable", error.to_string(), true)
            }
            EngineError::Log(WriteError::Stopped) | EngineError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
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
