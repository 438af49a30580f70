//! Who is asking: the admin token, and agents' access and refresh tokens.
//!
//! * The admin token (the CLI, the admin API) is a random secret kept in the data
//!   directory (`admin.token`, mode 0600, made at first start) unless one is configured.
//!   It may act for any agent.
//! * An agent's access token is a JWT signed with HS256 by a key kept in the data
//!   directory (`signing.key`, 0600): `iss` "hale", `aud` "hale-agent", `sub` the agent,
//!   `iat`/`nbf`/`exp` (15 minutes), and `gen`, the agent's token generation. Only HS256
//!   is accepted, so `alg: none` and algorithm confusion fail at the header. A revoke moves
//!   the generation on, so older access tokens stop working at once.
//! * An agent's refresh token is an opaque random secret, `hale_rt_` + 64 hex digits,
//!   valid 30 days and rotated on every use. The log keeps only its SHA-256.

use crate::api::{ApiError, ServerCode};
use axum::http::StatusCode;
use hale_core::AgentName;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

const ISSUER: &str = "hale";
const AUDIENCE: &str = "hale-agent";
/// The admin token's file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
const SIGNING_KEY_FILE: &str = "signing.key";
const REFRESH_PREFIX: &str = "hale_rt_";

/// How the server authenticates, from hale.toml, flags and the environment.
#[derive(Clone)]
pub struct AuthConfig {
    /// The admin token; `None`: read or make `admin.token` in the data directory. Wiped
    /// from memory when dropped.
    pub admin_token: Option<Zeroizing<String>>,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("AuthConfig")
            .field("admin_token", &self.admin_token.as_ref().map(|_| ".."))
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .finish()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            admin_token: None,
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The operator: may do anything, and act for any agent.
    Admin,
    /// An agent's access token: acts for that agent only, until `expires_at` (s).
    Agent { agent: AgentName, generation: u64, expires_at: u64 },
}

impl Principal {
    /// Whether it may act for `agent`.
    pub fn may_act_for(&self, agent: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Agent { agent: own, .. } => own.as_str() == agent,
        }
    }

    /// Refuses unless it may act for `agent`.
    pub fn require_agent(&self, agent: &str) -> Result<(), ApiError> {
        if self.may_act_for(agent) {
            return Ok(());
        }
        Err(forbidden(format!("this token belongs to agent {:?}; it cannot act for agent {agent:?}", self.name())))
    }

    /// Refuses unless it is the admin token.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Agent { .. } => {
                Err(forbidden(format!("{what} needs the admin token; an agent's token acts for its own agent only")))
            }
        }
    }

    /// How long a session opened with this token may last: until the token expires (with
    /// the leeway tokens are checked with); the admin token does not expire.
    pub fn lifetime(&self) -> Option<std::time::Duration> {
        match self {
            Principal::Admin => None,
            Principal::Agent { expires_at, .. } => {
                Some(std::time::Duration::from_secs((expires_at + LEEWAY_S).saturating_sub(now_secs())))
            }
        }
    }

    /// Whether `other` speaks for the same party (a renewed token for the same agent).
    pub fn same_party(&self, other: &Principal) -> bool {
        match (self, other) {
            (Principal::Admin, Principal::Admin) => true,
            (Principal::Agent { agent, .. }, Principal::Agent { agent: other, .. }) => agent == other,
            _ => false,
        }
    }

    fn name(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Agent { agent, .. } => agent.as_str(),
        }
    }
}

pub(crate) fn forbidden(message: String) -> ApiError {
    ApiError::coded(StatusCode::FORBIDDEN, ServerCode::Forbidden, message, false)
}

fn unauthorized(code: ServerCode, message: impl Into<String>) -> ApiError {
    ApiError::coded(StatusCode::UNAUTHORIZED, code, message, false)
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
    #[serde(rename = "gen")]
    generation: u64,
}

/// A freshly minted pair.
#[derive(Clone, Debug)]
pub struct Minted {
    pub access_token: String,
    pub access_expires_at_ms: u64,
    pub refresh_token: String,
    pub refresh_hash: String,
    pub refresh_expires_at_ms: u64,
}

/// The server's secrets and the agents' current token generations. The admin token is
/// wiped from memory on drop; the signing key's copies inside jsonwebtoken's
/// `EncodingKey`/`DecodingKey` are not (that crate keeps them in plain `Vec`s).
pub struct Auth {
    admin_token: Zeroizing<String>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    config: AuthConfig,
    random: SystemRandom,
    /// The token generation of each agent, as the log says (kept in step by the token
    /// routes and by the fold at start).
    generations: RwLock<HashMap<AgentName, u64>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth { .. }")
    }
}

/// Why the secrets could not be read or made.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct SecretError {
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

impl Auth {
    /// Reads the secrets from `data_dir`, making any that are missing (mode 0600).
    pub fn open(data_dir: &Path, config: AuthConfig) -> Result<Auth, SecretError> {
        let random = SystemRandom::new();
        let admin_token = match &config.admin_token {
            Some(token) => token.clone(),
            None => read_or_make(&data_dir.join(ADMIN_TOKEN_FILE), &random)?,
        };
        let key = read_or_make(&data_dir.join(SIGNING_KEY_FILE), &random)?;
        Ok(Auth::with_secret_token(admin_token, &key, config))
    }

    /// A node of a cluster: the agents' token signing key, and the admin token unless one
    /// is configured, are derived from the cluster secret (HMAC-SHA256 of a label of each),
    /// so a token any node issued works on every node, as clients that follow the leader
    /// need. The admin token is written to `admin.token` for the CLI on this machine.
    /// Whoever holds the cluster secret could already write the log, so this gives them
    /// nothing more.
    pub fn open_clustered(data_dir: &Path, config: AuthConfig, cluster_secret: &str) -> Result<Auth, SecretError> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, cluster_secret.as_bytes());
        let derive = |label: &str| Zeroizing::new(hex(ring::hmac::sign(&key, label.as_bytes()).as_ref()));
        let signing_key = derive("hale agent token signing key v1");
        let admin_token = match &config.admin_token {
            Some(token) => token.clone(),
            None => {
                let token = derive("hale admin token v1");
                write_secret(&data_dir.join(ADMIN_TOKEN_FILE), &token)?;
                token
            }
        };
        Ok(Auth::with_secret_token(admin_token, &signing_key, config))
    }

    /// An `Auth` with the given admin token and JWT signing key, touching no files (for
    /// fuzzing and tests: `fuzz/fuzz_targets/token.rs` authenticates arbitrary tokens
    /// against a fixed key). [`Auth::open`] reads or makes the secrets, then builds this.
    pub fn with_secrets(admin_token: String, signing_key: &str, config: AuthConfig) -> Auth {
        Auth::with_secret_token(Zeroizing::new(admin_token), signing_key, config)
    }

    fn with_secret_token(admin_token: Zeroizing<String>, signing_key: &str, config: AuthConfig) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_S;
        Auth {
            admin_token,
            encoding: EncodingKey::from_secret(signing_key.as_bytes()),
            decoding: DecodingKey::from_secret(signing_key.as_bytes()),
            validation,
            config,
            random: SystemRandom::new(),
            generations: RwLock::new(HashMap::new()),
        }
    }

    /// The admin token (for in-process callers such as the demo and the benches).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Records `agent`'s token generation as the log has it.
    pub fn set_generation(&self, agent: &AgentName, generation: u64) {
        // Generations only move on: an answer that arrives after a later revoke must not
        // bring older tokens back.
        let mut generations = self.generations.write().expect("generations lock");
        let known = generations.entry(agent.clone()).or_default();
        *known = (*known).max(generation);
    }

    /// `agent`'s token generation as this server knows it.
    pub fn generation_of(&self, agent: &AgentName) -> u64 {
        self.generation(agent)
    }

    fn generation(&self, agent: &AgentName) -> u64 {
        self.generations.read().expect("generations lock").get(agent).copied().unwrap_or(0)
    }

    /// Who presents `token`: the admin, or the agent its access token names.
    pub fn authenticate(&self, token: &str) -> Result<Principal, ApiError> {
        if same_secret(token, &self.admin_token) {
            return Ok(Principal::Admin);
        }
        if token.starts_with(REFRESH_PREFIX) {
            return Err(unauthorized(
                ServerCode::TokenInvalid,
                "this is a refresh token: exchange it at POST /v1/auth/refresh for an access token",
            ));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            match error.kind() {
                ErrorKind::ExpiredSignature => unauthorized(
                    ServerCode::TokenExpired,
                    "the access token has expired; refresh it (POST /v1/auth/refresh)",
                ),
                ErrorKind::ImmatureSignature => {
                    unauthorized(ServerCode::TokenNotYetValid, "the access token is not valid yet")
                }
                ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => {
                    unauthorized(ServerCode::TokenInvalid, "the access token was not issued by hale for agents")
                }
                _ => unauthorized(
                    ServerCode::TokenInvalid,
                    format!("the token is not valid ({error}); use a token hale issued"),
                ),
            }
        })?;
        let claims = data.claims;
        let agent = AgentName::new(claims.sub)
            .map_err(|_| unauthorized(ServerCode::TokenInvalid, "the token names no valid agent"))?;
        if claims.generation != self.generation(&agent) {
            return Err(unauthorized(
                ServerCode::TokenRevoked,
                format!("the tokens of agent {:?} were revoked; ask the operator for new ones", agent.as_str()),
            ));
        }
        Ok(Principal::Agent { agent, generation: claims.generation, expires_at: claims.exp })
    }

    /// A new access token for `agent` in the current generation, and when it expires (ms).
    pub fn mint_access(&self, agent: &AgentName) -> (String, u64) {
        let now = now_secs();
        let exp = now + self.config.access_ttl.as_secs().max(1);
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: agent.to_string(),
            iat: now,
            nbf: now,
            exp,
            jti: self.random_hex(8),
            generation: self.generation(agent),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing does not fail");
        (token, exp * 1000)
    }

    /// A new access token and a new refresh token (with its hash, for the log).
    pub fn mint(&self, agent: &AgentName) -> Minted {
        let (access_token, access_expires_at_ms) = self.mint_access(agent);
        let refresh_token = format!("{REFRESH_PREFIX}{}", self.random_hex(32));
        Minted {
            access_token,
            access_expires_at_ms,
            refresh_hash: hash_refresh(&refresh_token),
            refresh_token,
            refresh_expires_at_ms: (now_secs() + self.config.refresh_ttl.as_secs()) * 1000,
        }
    }

    fn random_hex(&self, bytes: usize) -> String {
        let mut buffer = vec![0u8; bytes];
        self.random.fill(&mut buffer).expect("the system random source works");
        hex(&buffer)
    }
}

/// Compares two secrets in time that does not depend on where they differ (their
/// SHA-256 digests, so their lengths do not show either).
pub(crate) fn same_secret(given: &str, expected: &str) -> bool {
    let given = ring::digest::digest(&ring::digest::SHA256, given.as_bytes());
    let expected = ring::digest::digest(&ring::digest::SHA256, expected.as_bytes());
    given.as_ref().iter().zip(expected.as_ref()).fold(0u8, |differ, (a, b)| differ | (a ^ b)) == 0
}

/// The SHA-256 of a refresh token, as the log keeps it.
pub fn hash_refresh(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Clock skew tolerated when checking a token's `nbf` and `exp`, in seconds.
const LEEWAY_S: u64 = 5;

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Reads a secret file, or makes one of 32 random bytes (hex) readable by the owner only.
/// Writes `secret` to `path` (mode 0600) unless the file already holds it.
fn write_secret(path: &Path, secret: &str) -> Result<(), SecretError> {
    if std::fs::read_to_string(path).is_ok_and(|text| text.trim() == secret) {
        return Ok(());
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let written = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).and_then(
        |mut file| file.write_all(Zeroizing::new(format!("{secret}\n")).as_bytes()).and_then(|()| file.sync_all()),
    );
    written.map_err(|source| SecretError { what: "writing", path: path.to_path_buf(), source })
}

fn read_or_make(path: &Path, random: &SystemRandom) -> Result<Zeroizing<String>, SecretError> {
    match std::fs::read_to_string(path).map(Zeroizing::new) {
        Ok(text) if !text.trim().is_empty() => return Ok(Zeroizing::new(text.trim().to_string())),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(SecretError { what: "reading", path: path.to_path_buf(), source }),
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    random.fill(&mut *bytes).expect("the system random source works");
    let secret = Zeroizing::new(hex(&*bytes));
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let made = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).and_then(|mut file| {
        file.write_all(Zeroizing::new(format!("{}\n", *secret)).as_bytes()).and_then(|()| file.sync_all())
    });
    made.map_err(|source| SecretError { what: "creating", path: path.to_path_buf(), source })?;
    Ok(secret)
}
