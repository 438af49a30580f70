//! JSON merge patch (RFC 7396) and the byte size of a JSON value.

use serde_json::{Map, Value};

/// Applies `patch` to `target` as RFC 7396 says: an object patch merges member by member,
/// `null` members delete, anything else replaces the target wholesale.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_members) = target else { unreachable!("made an object above") };
    for (key, value) in patch_members {
        if value.is_null() {
            target_members.remove(key);
        } else {
            match target_members.get_mut(key) {
                Some(existing) => merge_patch(existing, value),
                None => {
                    let mut fresh = Value::Null;
                    merge_patch(&mut fresh, value);
                    target_members.insert(key.clone(), fresh);
                }
            }
        }
    }
}

/// The length of `merge_patch(target, patch)` serialized as compact JSON, computed
/// without building the merged value (the core checks state limits with it before
/// anything is changed).
pub fn merged_size(target: &Value, patch: &Value) -> usize {
    let Value::Object(patch_members) = patch else {
        return json_size(patch);
    };
    let empty = Map::new();
    let target_members = target.as_object().unwrap_or(&empty);
    let mut size = 2; // the braces
    let mut members = 0usize;
    let mut member = |key: &str, value_size: usize| {
        size += string_size(key) + 1 + value_size;
        members += 1;
    };
    for (key, value) in target_members {
        if !patch_members.contains_key(key) {
            member(key, json_size(value));
        }
    }
    for (key, value) in patch_members {
        if value.is_null() {
            continue;
        }
        let merged = match target_members.get(key) {
            Some(existing) => merged_size(existing, value),
            None => merged_size(&Value::Null, value),
        };
        member(key, merged);
    }
    size + members.saturating_sub(1) // the commas
}

fn string_size(text: &str) -> usize {
    let mut count = Count(0);
    serde_json::to_writer(&mut count, text).expect("serializing a string to a counter");
    count.0
}

struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How deeply `value` nests: 0 for a scalar, 1 for an empty or flat array or object.
pub fn json_depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(members) => 1 + members.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The length of `value` serialized as compact JSON, computed without allocating it.
pub fn json_size(value: &Value) -> usize {
    let mut count = Count(0);
    // Writing a `Value` to a sink that never fails cannot fail.
    serde_json::to_writer(&mut count, value).expect("serializing a JSON value to a counter");
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The examples of RFC 7396, appendix A.
    #[test]
    fn rfc_7396_examples() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (json!({"a":"b","b":"c"}), json!({"a":null}), json!({"b":"c"})),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (json!({"a":{"b":"c"}}), json!({"a":{"b":"d","c":null}}), json!({"a":{"b":"d"}})),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (json!({}), json!({"a":{"bb":{"ccc":null}}}), json!({"a":{"bb":{}}})),
        ];
        for (target, patch, expected) in cases {
            let mut merged = target.clone();
            merge_patch(&mut merged, &patch);
            assert_eq!(merged, expected, "{target} + {patch}");
        }
    }

    proptest::proptest! {
        /// `merged_size` is exactly the size of the merged value, for any pair.
        #[test]
        fn merged_size_is_exact(target in value_strategy(), patch in value_strategy()) {
            let mut merged = target.clone();
            merge_patch(&mut merged, &patch);
            proptest::prop_assert_eq!(merged_size(&target, &patch), json_size(&merged));
        }
    }

    fn value_strategy() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            "[a-c\"\\\\é]{0,4}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::btree_map("[a-d\"]{1,2}", inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn size_matches_serialization() {
        let value = json!({"a": [1, 2, {"b": "ünïcode"}], "c": null});
        assert_eq!(json_size(&value), serde_json::to_vec(&value).unwrap().len());
    }
}
