//! The token parser: `Auth::authenticate`, which every request's bearer token (or a
//! session's `?access_token=`) goes through: the admin token, refresh tokens
//! (`hale_rt_…`, refused here) and HS256 JWTs, against a fixed admin token and signing key.
//!
//! Nothing may panic; only the admin token itself is the admin; an agent token names a
//! valid agent in the generation the server has for it (0 for every agent here).

#![no_main]

use hale_server::auth::{Auth, Principal, hash_refresh};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static AUTH: LazyLock<Auth> = LazyLock::new(hale_fuzz::auth);

fuzz_target!(|data: &[u8]| {
    // A header value reaches the parser only as a string.
    let Ok(token) = std::str::from_utf8(data) else { return };
    match AUTH.authenticate(token) {
        Ok(Principal::Admin) => assert_eq!(token, hale_fuzz::fixtures::ADMIN_TOKEN, "admin without the admin token"),
        Ok(Principal::Agent { agent, generation, .. }) => {
            assert_eq!(generation, 0, "a token of a generation the server does not have");
            assert!(hale_core::AgentName::new(agent.as_str()).is_ok());
        }
        Err(error) => {
            serde_json::to_string(&error.body).expect("error bodies serialize");
        }
    }
    assert_eq!(hash_refresh(token).len(), 64);
});
