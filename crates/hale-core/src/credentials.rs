//! Agent credentials, as the log knows them: per agent, a token generation and the hash
//! of its current refresh token. Access tokens are stateless (signed by the shell, which
//! holds the key); what makes one stop working before it expires is a new generation. The
//! shell hashes refresh tokens before they reach the core, so the log holds no secret.

use crate::Timestamp;
use crate::command::Command;
use crate::event::Event;
use crate::names::AgentName;
use crate::rejection::Rejection;
use crate::state::State;
use serde::{Deserialize, Serialize};

/// One agent's credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// Access tokens carry the generation they were issued in; a revoke moves it on.
    pub generation: u64,
    /// The hash of the refresh token that works now, if any.
    pub refresh_hash: Option<String>,
    /// The hash it replaced: presenting it again means the token was copied (revoke).
    pub previous_hash: Option<String>,
    pub refresh_expires_at: Option<Timestamp>,
}

/// `decide` for `IssueTokens`, `RefreshTokens` and `RevokeTokens`.
pub(crate) fn decide(state: &State, command: &Command, now: Timestamp) -> Result<Vec<Event>, Rejection> {
    match command {
        Command::IssueTokens { agent, refresh_hash, expires_at } => {
            let generation = state.credential(agent).map_or(0, |credential| credential.generation);
            Ok(vec![Event::TokensIssued {
                agent: agent.clone(),
                generation,
                refresh_hash: refresh_hash.clone(),
                expires_at: *expires_at,
            }])
        }
        Command::RefreshTokens { agent, presented_hash, refresh_hash, expires_at } => {
            let refused = |reason: &str| Rejection::RefreshRefused { agent: agent.to_string(), reason: reason.into() };
            let Some(credential) = state.credential(agent) else {
                return Err(refused("no refresh token was issued to this agent"));
            };
            if credential.previous_hash.as_deref() == Some(presented_hash.as_str()) {
                // A rotated-out token came back: someone holds a copy. End the chain.
                return Ok(vec![Event::TokensRevoked {
                    agent: agent.clone(),
                    reason: "a refresh token was used twice (copied?)".into(),
                }]);
            }
            if credential.refresh_hash.as_deref() != Some(presented_hash.as_str()) {
                return Err(refused("the refresh token is not the current one (revoked, replaced or wrong)"));
            }
            if credential.refresh_expires_at.is_some_and(|expires| expires <= now) {
                return Err(refused(
                    "the refresh token has expired; ask the operator for new tokens (hale token issue)",
                ));
            }
            Ok(vec![Event::TokensRefreshed {
                agent: agent.clone(),
                refresh_hash: refresh_hash.clone(),
                expires_at: *expires_at,
            }])
        }
        Command::RevokeTokens { agent, reason } => {
            Ok(vec![Event::TokensRevoked { agent: agent.clone(), reason: reason.clone() }])
        }
        _ => unreachable!("credentials::decide gets token commands only"),
    }
}

/// Folds a credential event.
pub(crate) fn apply(credentials: &mut std::collections::BTreeMap<AgentName, Credential>, event: Event) {
    match event {
        Event::TokensIssued { agent, generation, refresh_hash, expires_at } => {
            let credential = credentials.entry(agent).or_default();
            credential.generation = credential.generation.max(generation);
            credential.previous_hash = None;
            credential.refresh_hash = Some(refresh_hash);
            credential.refresh_expires_at = Some(expires_at);
        }
        Event::TokensRefreshed { agent, refresh_hash, expires_at } => {
            let credential = credentials.entry(agent).or_default();
            credential.previous_hash = credential.refresh_hash.replace(refresh_hash);
            credential.refresh_expires_at = Some(expires_at);
        }
        Event::TokensRevoked { agent, .. } => {
            let credential = credentials.entry(agent).or_default();
            credential.generation += 1;
            credential.refresh_hash = None;
            credential.previous_hash = None;
            credential.refresh_expires_at = None;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use crate::*;

    fn name(text: &str) -> AgentName {
        AgentName::new(text).unwrap()
    }

    #[test]
    fn refresh_tokens_rotate_a_reused_one_revokes_and_expiry_is_refused() {
        let mut core = Core::new(Limits::default());
        let a = name("a");
        let issue = Command::IssueTokens { agent: a.clone(), refresh_hash: "h1".into(), expires_at: Timestamp(1_000) };
        core.execute(&issue, Timestamp(0)).unwrap();
        let refresh = |presented: &str, next: &str| Command::RefreshTokens {
            agent: a.clone(),
            presented_hash: presented.into(),
            refresh_hash: next.into(),
            expires_at: Timestamp(2_000),
        };
        core.execute(&refresh("h1", "h2"), Timestamp(10)).unwrap();
        assert_eq!(core.state().credential(&a).unwrap().refresh_hash.as_deref(), Some("h2"));
        // A wrong token is refused and changes nothing.
        assert_eq!(core.execute(&refresh("nope", "h3"), Timestamp(11)).unwrap_err().code(), "refresh_refused");
        // The rotated-out token comes back: the chain is revoked, the generation moves on.
        let events = core.execute(&refresh("h1", "h3"), Timestamp(12)).unwrap();
        assert!(matches!(events[..], [Event::TokensRevoked { .. }]), "{events:?}");
        assert_eq!(core.state().credential(&a).unwrap().generation, 1);
        assert_eq!(core.execute(&refresh("h2", "h3"), Timestamp(13)).unwrap_err().code(), "refresh_refused");
        assert_eq!(
            core.poll_effect(),
            Some(Effect::EndSessions {
                agent: a.clone(),
                reason: "tokens revoked: a refresh token was used twice (copied?)".into()
            })
        );
        // Re-issued tokens keep the new generation; an expired refresh token is refused.
        let issue = Command::IssueTokens { agent: a.clone(), refresh_hash: "h4".into(), expires_at: Timestamp(100) };
        core.execute(&issue, Timestamp(20)).unwrap();
        assert_eq!(core.state().credential(&a).unwrap().generation, 1);
        let refused = core.execute(&refresh("h4", "h5"), Timestamp(100)).unwrap_err();
        assert!(refused.to_string().contains("expired"), "{refused}");
    }
}
