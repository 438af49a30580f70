//! Typed errors: the body of a session's `error` frame and of every HTTP error response.

use serde::{Deserialize, Serialize};

/// A typed error. `code` is stable and documented in docs/errors.md.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    /// Whether the same request may succeed if sent again later, unchanged.
    pub retryable: bool,
}

/// The body of every HTTP error response: `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HttpError {
    pub error: ErrorBody,
}
