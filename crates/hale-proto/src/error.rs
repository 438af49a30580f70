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
    /// With `not_leader`: the leader's address (`host:port`), if this node knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// The body of every HTTP error response: `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HttpError {
    pub error: ErrorBody,
}
