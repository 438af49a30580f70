//! The wire format of hale's session protocol, shared by the server and the clients.
//!
//! Frames are JSON objects with a `type` and, on requests, a client-chosen `id` that the
//! response echoes. The HTTP API carries the same operations with bodies of its own (no
//! `type` or `id`; writes name their `incarnation`, since there is no session). See
//! docs/protocol.md for the full description with examples.
//!
//! Names travel as plain strings and are validated by the server, so a bad name gets the
//! typed `invalid_name` error rather than a generic parse failure. These types are the
//! wire format: the core's types may change without changing them.
//!
//! The types live in one module per domain and are re-exported here, so users name them
//! from the crate root: `session` (the frames and the list of client frame types), `agent`
//! (a run and its state), `tasks`, `mail`, `tokens`, `admin` (status, events, hooks,
//! backups) and `error`. `variant_names` reads an enum's wire names from serde, for the
//! tests that hold the lists of names kept by hand equal to their types.

mod admin;
mod agent;
mod error;
mod mail;
mod session;
mod tasks;
mod tokens;
mod variants;

pub use admin::*;
pub use agent::*;
pub use error::*;
pub use mail::*;
pub use session::*;
pub use tasks::*;
pub use tokens::*;
pub use variants::variant_names;

/// The protocol version this crate speaks; sent in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The path of the WebSocket endpoint.
pub const SESSION_PATH: &str = "/v1/session";
