//! The wire names of an enum's variants, read from serde, so that a list of names kept by
//! hand (`CLIENT_FRAME_TYPES`, the codes a server sends) can be held equal to its type by
//! a test: a variant added without being listed then fails the test.

use serde::de::{self, DeserializeOwned, IntoDeserializer};
use std::fmt;

/// The names serde reads for the variants of `T`, renames applied, in declaration order:
/// for an enum that is externally tagged (serde's default, unit variants included) or
/// internally tagged by `type` (the frames). Empty for any other type.
///
/// serde hands its whole list of names to the deserializer's error when it meets a name
/// that is not one of them (`de::Error::unknown_variant`); this offers it such a name,
/// with an error type that keeps the list. So the answer is serde's own, and has every
/// variant serde can read, without a value of each.
pub fn variant_names<T: DeserializeOwned>() -> Vec<&'static str> {
    let externally = T::deserialize(IntoDeserializer::<Listed>::into_deserializer(NO_SUCH_VARIANT));
    if let Err(Listed::Variants(names)) = externally {
        return names.to_vec();
    }
    let by_type = de::value::MapDeserializer::<_, Listed>::new(std::iter::once(("type", NO_SUCH_VARIANT)));
    match T::deserialize(by_type) {
        Err(Listed::Variants(names)) => names.to_vec(),
        _ => Vec::new(),
    }
}

/// A name no variant has.
const NO_SUCH_VARIANT: &str = "\u{0}no such variant";

/// The error serde raises while reading the name: the list of names, or anything else.
#[derive(Debug)]
enum Listed {
    Variants(&'static [&'static str]),
    Other(String),
}

impl de::Error for Listed {
    fn custom<M: fmt::Display>(message: M) -> Listed {
        Listed::Other(message.to_string())
    }

    fn unknown_variant(_variant: &str, expected: &'static [&'static str]) -> Listed {
        Listed::Variants(expected)
    }
}

impl fmt::Display for Listed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listed::Variants(names) => write!(f, "one of {}", names.join(", ")),
            Listed::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Listed {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    #[allow(dead_code)]
    enum External {
        Plain,
        #[serde(rename = "agent.down")]
        Renamed,
        WithFields {
            a: u32,
        },
        Newtype(String),
    }

    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
    #[allow(dead_code)]
    enum ByType {
        First { id: u64 },
        SecondOne {},
    }

    #[derive(Deserialize)]
    #[serde(tag = "kind")]
    #[allow(dead_code)]
    enum ByOtherTag {
        A,
    }

    #[test]
    fn names_come_from_serde_with_renames_in_declaration_order() {
        assert_eq!(variant_names::<External>(), ["plain", "agent.down", "with_fields", "newtype"]);
        assert_eq!(variant_names::<ByType>(), ["first", "second_one"]);
    }

    #[test]
    fn anything_else_has_no_names() {
        assert!(variant_names::<ByOtherTag>().is_empty());
        assert!(variant_names::<String>().is_empty());
        assert!(variant_names::<u64>().is_empty());
    }
}
