//! Agents' tokens: the pair hale issues, the refresh and the revoke.

use serde::{Deserialize, Serialize};

/// An agent's tokens, as `POST /v1/agents/{agent}/tokens` and `/v1/auth/refresh` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenPair {
    pub agent: String,
    /// Sent as `Authorization: Bearer …`; short-lived.
    pub access_token: String,
    pub access_expires_at_ms: u64,
    /// Traded at `POST /v1/auth/refresh` for a new pair; each works once.
    pub refresh_token: String,
    pub refresh_expires_at_ms: u64,
}

/// `POST /v1/auth/refresh`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpRefresh {
    pub agent: String,
    pub refresh_token: String,
}

/// `POST /v1/agents/{agent}/tokens/revoke` (optional body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpRevoke {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
