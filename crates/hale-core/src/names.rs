//! Validated names: agents, roles and recovery points share one alphabet so they are safe
//! in URLs, file names and log lines without escaping.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Longest name accepted, in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// Most labels one agent may carry.
pub const LABELS_MAX: usize = 32;
/// Longest label key, in bytes.
pub const LABEL_KEY_BYTES_MAX: usize = 64;
/// Longest label value, in bytes.
pub const LABEL_VALUE_BYTES_MAX: usize = 256;

/// Why a name or a label was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    /// The name is longer than [`NAME_BYTES_MAX`].
    #[error("{kind} name is {len} bytes long; the limit is {NAME_BYTES_MAX}")]
    TooLong { kind: &'static str, len: usize },
    /// The name has a character outside `A-Z a-z 0-9 . _ -`, or starts with `.` or `-`.
    #[error(
        "{kind} name {name:?} may only contain letters, digits, '.', '_' and '-', and must start with a letter, digit or '_'"
    )]
    BadCharacter { kind: &'static str, name: String },
    /// Too many labels, or a label key or value too long or badly formed.
    #[error("{0}")]
    Label(String),
}

fn check(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(NameError::TooLong { kind, len: name.len() });
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let first_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || !name.chars().all(ok_char) {
        return Err(NameError::BadCharacter { kind, name: name.chars().take(NAME_BYTES_MAX).collect() });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Checks `name` and wraps it.
            pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
                let name = name.into();
                check($kind, &name)?;
                Ok($ty(name))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(name: String) -> Result<Self, NameError> {
                $ty::new(name)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The unique name of an agent, e.g. `code-generator-1`.
    AgentName,
    "agent"
);
name_type!(
    /// The role an agent plays, e.g. `code-generator`; tasks are routed by role.
    RoleName,
    "role"
);
name_type!(
    /// The name of a recovery point, e.g. `before-refactor`.
    PointName,
    "recovery point"
);
name_type!(
    /// The name of a failure hook of hale.toml, e.g. `pager`.
    HookName,
    "hook"
);
name_type!(
    /// The id of a conversation between agents, e.g. `review-42` (hale makes `c-N` when
    /// a sender names none).
    ConversationId,
    "conversation"
);

name_type!(
    /// The name of a node of a hale cluster, e.g. `node-1` (`[cluster] name`).
    NodeName,
    "node"
);

/// Checks a label set: at most [`LABELS_MAX`] entries, keys named like agents and at most
/// [`LABEL_KEY_BYTES_MAX`] bytes, values at most [`LABEL_VALUE_BYTES_MAX`] bytes.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), NameError> {
    if labels.len() > LABELS_MAX {
        return Err(NameError::Label(format!("{} labels given; the limit is {LABELS_MAX}", labels.len())));
    }
    for (key, value) in labels {
        if key.len() > LABEL_KEY_BYTES_MAX {
            return Err(NameError::Label(format!(
                "label key of {} bytes; the limit is {LABEL_KEY_BYTES_MAX}",
                key.len()
            )));
        }
        check("label key", key)?;
        if value.len() > LABEL_VALUE_BYTES_MAX {
            return Err(NameError::Label(format!(
                "label {key:?} has a value of {} bytes; the limit is {LABEL_VALUE_BYTES_MAX}",
                value.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for name in ["a", "code-generator-1", "_x", "A.b_c-9"] {
            assert!(AgentName::new(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(AgentName::new(""), Err(NameError::Empty { kind: "agent" }));
        assert!(matches!(AgentName::new("a/b"), Err(NameError::BadCharacter { .. })));
        assert!(matches!(AgentName::new("-a"), Err(NameError::BadCharacter { .. })));
        assert!(matches!(AgentName::new("é"), Err(NameError::BadCharacter { .. })));
        assert!(matches!(AgentName::new("a".repeat(129)), Err(NameError::TooLong { len: 129, .. })));
    }

    #[test]
    fn names_deserialize_through_validation() {
        assert!(serde_json::from_str::<AgentName>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<AgentName>("\"not ok\"").is_err());
    }

    #[test]
    fn label_limits() {
        let mut labels = BTreeMap::new();
        labels.insert("zone".to_string(), "eu".to_string());
        assert!(validate_labels(&labels).is_ok());
        labels.insert("big".to_string(), "x".repeat(LABEL_VALUE_BYTES_MAX + 1));
        assert!(validate_labels(&labels).is_err());
        let many: BTreeMap<_, _> = (0..=LABELS_MAX).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_labels(&many).is_err());
    }
}
