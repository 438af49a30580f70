//! Agent credentials, as the log knows them: per agent, a token generation and the hash
//! of its current refresh token. Access tokens are stateless (signed by the shell, which
//! holds the key); what makes one stop working before it expires is a new generation. The
//! shell hashes refresh tokens before they reach the core, so the log holds no secret.

use crate::Timestamp;
use crate::command::{Answer, CredentialCommand, Decision};
use crate::decide::Context;
use crate::event::Event;
use crate::names::AgentName;
use crate::rejection::Rejection;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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

/// `decide` for issuing, refreshing and revoking tokens. The answer carries the token
/// generation the shell must hold access tokens to, and whether this revoked them.
pub(crate) fn decide(context: &Context<'_>, command: &CredentialCommand) -> Result<Decision, Rejection> {
    let Context { state, now, .. } = *context;
    let generation = |agent: &AgentName| state.credential(agent).map_or(0, |credential| credential.generation);
    let revoke = |agent: &AgentName, reason: String| Decision {
        events: vec![Event::TokensRevoked { agent: agent.clone(), reason }],
        answer: Answer::Tokens { generation: generation(agent) + 1, revoked: true },
    };
    match command {
        CredentialCommand::Issue { agent, refresh_hash, expires_at } => Ok(Decision {
            events: vec![Event::TokensIssued {
                agent: agent.clone(),
                generation: generation(agent),
                refresh_hash: refresh_hash.clone(),
                expires_at: *expires_at,
            }],
            answer: Answer::Tokens { generation: generation(agent), revoked: false },
        }),
        CredentialCommand::Refresh { agent, presented_hash, refresh_hash, expires_at } => {
            let refused = |reason: &str| Rejection::RefreshRefused { agent: agent.to_string(), reason: reason.into() };
            let Some(credential) = state.credential(agent) else {
                return Err(refused("no refresh token was issued to this agent"));
            };
            if credential.previous_hash.as_deref() == Some(presented_hash.as_str()) {
                // A rotated-out token came back: someone holds a copy. End the chain.
                return Ok(revoke(agent, "a refresh token was used twice (copied?)".into()));
            }
            if credential.refresh_hash.as_deref() != Some(presented_hash.as_str()) {
                return Err(refused("the refresh token is not the current one (revoked, replaced or wrong)"));
            }
            if credential.refresh_expires_at.is_some_and(|expires| expires <= now) {
                return Err(refused(
                    "the refresh token has expired; ask the operator for new tokens (hale token issue)",
                ));
            }
            Ok(Decision {
                events: vec![Event::TokensRefreshed {
                    agent: agent.clone(),
                    refresh_hash: refresh_hash.clone(),
                    expires_at: *expires_at,
                }],
                answer: Answer::Tokens { generation: credential.generation, revoked: false },
            })
        }
        CredentialCommand::Revoke { agent, reason } => Ok(revoke(agent, reason.clone())),
    }
}

/// Folds a `TokensIssued`.
pub(crate) fn apply_issued(
    credentials: &mut BTreeMap<AgentName, Credential>,
    agent: AgentName,
    generation: u64,
    refresh_hash: String,
    expires_at: Timestamp,
) {
    let credential = credentials.entry(agent).or_default();
    credential.generation = credential.generation.max(generation);
    credential.previous_hash = None;
    credential.refresh_hash = Some(refresh_hash);
    credential.refresh_expires_at = Some(expires_at);
}

/// Folds a `TokensRefreshed`.
pub(crate) fn apply_refreshed(
    credentials: &mut BTreeMap<AgentName, Credential>,
    agent: AgentName,
    refresh_hash: String,
    expires_at: Timestamp,
) {
    let credential = credentials.entry(agent).or_default();
    credential.previous_hash = credential.refresh_hash.replace(refresh_hash);
    credential.refresh_expires_at = Some(expires_at);
}

/// Folds a `TokensRevoked`.
pub(crate) fn apply_revoked(credentials: &mut BTreeMap<AgentName, Credential>, agent: AgentName) {
    let credential = credentials.entry(agent).or_default();
    credential.generation += 1;
    credential.refresh_hash = None;
    credential.previous_hash = None;
    credential.refresh_expires_at = None;
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
        let issue = Command::Credentials(CredentialCommand::Issue {
            agent: a.clone(),
            refresh_hash: "h1".into(),
            expires_at: Timestamp(1_000),
        });
        assert_eq!(
            core.execute(&issue, Timestamp(0)).unwrap().answer,
            Answer::Tokens { generation: 0, revoked: false }
        );
        let refresh = |presented: &str, next: &str| {
            Command::Credentials(CredentialCommand::Refresh {
                agent: a.clone(),
                presented_hash: presented.into(),
                refresh_hash: next.into(),
                expires_at: Timestamp(2_000),
            })
        };
        core.execute(&refresh("h1", "h2"), Timestamp(10)).unwrap();
        assert_eq!(core.state().credential(&a).unwrap().refresh_hash.as_deref(), Some("h2"));
        // A wrong token is refused and changes nothing.
        assert_eq!(core.execute(&refresh("nope", "h3"), Timestamp(11)).unwrap_err().code(), "refresh_refused");
        // The rotated-out token comes back: the chain is revoked, the generation moves on.
        let reused = core.execute(&refresh("h1", "h3"), Timestamp(12)).unwrap();
        assert!(matches!(reused.events[..], [Event::TokensRevoked { .. }]), "{reused:?}");
        assert_eq!(
            reused.answer,
            Answer::Tokens { generation: 1, revoked: true },
            "the refresh is answered as a revoke"
        );
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
        let issue = Command::Credentials(CredentialCommand::Issue {
            agent: a.clone(),
            refresh_hash: "h4".into(),
            expires_at: Timestamp(100),
        });
        core.execute(&issue, Timestamp(20)).unwrap();
        assert_eq!(core.state().credential(&a).unwrap().generation, 1);
        let refused = core.execute(&refresh("h4", "h5"), Timestamp(100)).unwrap_err();
        assert!(refused.to_string().contains("expired"), "{refused}");
    }
}
