//! The plugin registry: `all_registered_plugin` in the private store, written by the
//! Plugins plugin, a JSON object from plugin id to an opaque value (the design record
//! says `"true"`; an older scraper wrote statuses there). Only the ids matter here.

use std::collections::HashSet;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

/// The registry's key in the private store.
pub const REGISTRY_KEY: &str = "all_registered_plugin";

/// Longest plugin id this worker requests: a DNS label, like the Dapr app id it is.
pub const MAX_ID_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{REGISTRY_KEY} is not a JSON object of plugin ids: {0}")]
pub struct RegistryError(pub String);

/// Parses the registry's ids, in stored order, without duplicates.
pub fn parse_ids(data: &[u8]) -> Result<Vec<String>, RegistryError> {
    struct Ids(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Ids {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Ids;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ids, A::Error> {
                    let mut ids = Vec::with_capacity(map.size_hint().unwrap_or(16));
                    while let Some(id) = map.next_key::<String>()? {
                        map.next_value::<IgnoredAny>()?;
                        ids.push(id);
                    }
                    Ok(Ids(first_of_each(ids)))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Ids>(data)
        .map(|ids| ids.0)
        .map_err(|e| RegistryError(e.to_string()))
}

/// `ids` without repeats, each kept where it first appears. A registry rarely has any, so
/// the check only borrows the ids; a registry with repeats is rebuilt.
fn first_of_each(ids: Vec<String>) -> Vec<String> {
    let repeated = {
        let mut seen = HashSet::with_capacity(ids.len());
        ids.iter().any(|id| !seen.insert(id.as_str()))
    };
    if !repeated {
        return ids;
    }
    let mut seen = HashSet::with_capacity(ids.len());
    ids.into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

/// Why an id is never requested. Ids are interpolated into URLs (and Dapr reads a `.` in
/// an app id as `app.namespace`), so only 1 to 63 ASCII letters, digits, `-` and `_` pass.
pub fn invalid_id_reason(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("empty")
    } else if id.len() > MAX_ID_LEN {
        Some("longer than 63 characters")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Some("only ASCII letters, digits, '-' and '_' are allowed")
    } else {
        None
    }
}

/// An id made safe to log: control characters escaped and cut to a readable length.
pub fn printable_id(id: &str) -> String {
    const SHOWN: usize = 80;
    let mut out: String = id
        .chars()
        .take(SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    if id.chars().count() > SHOWN {
        out.push_str(&format!("... ({} bytes)", id.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_with_opaque_values() {
        let ids =
            parse_ids(br#"{"iothub":"true","rudder":"ACTIVE","x":{"y":1},"z":null}"#).unwrap();
        assert_eq!(ids, ["iothub", "rudder", "x", "z"]);
    }

    #[test]
    fn a_repeated_id_counts_once_where_it_first_appears() {
        let ids = parse_ids(br#"{"b":true,"a":true,"b":false,"c":true,"a":true}"#).unwrap();
        assert_eq!(ids, ["b", "a", "c"]);
        assert_eq!(first_of_each(vec!["x".into(), "y".into()]), ["x", "y"]);
    }

    #[test]
    fn empty_object_is_an_empty_registry() {
        assert!(parse_ids(b"{}").unwrap().is_empty());
    }

    #[test]
    fn malformed_registry_is_an_error() {
        for bad in [&b"[\"a\"]"[..], b"true", b"{\"a\":", b"", b"\xff"] {
            assert!(parse_ids(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn id_validation() {
        for ok in ["iothub", "a", "plugin_1-x", &"a".repeat(63)] {
            assert_eq!(invalid_id_reason(ok), None, "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "../v1.0/state/x",
            "a/b",
            "a?b",
            "%2e%2e",
            "a#b",
            "app.other-namespace",
            "a b",
            &long,
            "café",
            "a\nb",
        ] {
            assert!(invalid_id_reason(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn printable_id_escapes_and_truncates() {
        assert_eq!(printable_id("a\nb"), "a\\nb");
        let p = printable_id(&"x".repeat(10_000));
        assert!(p.len() < 120 && p.ends_with("(10000 bytes)"));
    }
}
