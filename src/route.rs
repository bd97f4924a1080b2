//! Routes: `plugin_route_<id>` in the public store, read by Keel.
//!
//! A route is a JSON object written by the Plugins plugin. This worker changes only its
//! `status`: every other member is copied back byte for byte (keys, values, number
//! spellings, unknown fields), so a rewrite never loses anything Plugins or a newer tKeel
//! put there.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::status::RouteStatus;

/// The public-store key of a plugin's route.
pub fn route_key(plugin_id: &str) -> String {
    format!("plugin_route_{plugin_id}")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route is not a JSON object: {0}")]
    NotAnObject(String),
    #[error("route has no \"status\" member")]
    NoStatus,
    #[error("route \"status\" is not a string")]
    StatusNotString,
}

/// The members of a JSON object, in order, values kept raw.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push((key, value));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

fn members(data: &[u8]) -> Result<Members<'_>, RouteError> {
    serde_json::from_slice::<Members<'_>>(data).map_err(|e| RouteError::NotAnObject(e.to_string()))
}

fn status_of(members: &Members<'_>) -> Result<String, RouteError> {
    let raw = members
        .0
        .iter()
        .rev() // with duplicate keys the last one wins, as in most JSON readers
        .find(|(k, _)| k == "status")
        .map(|(_, v)| *v)
        .ok_or(RouteError::NoStatus)?;
    serde_json::from_str::<String>(raw.get()).map_err(|_| RouteError::StatusNotString)
}

/// A registered plugin's route as `routes` and the status page show it: its status, or
/// why there is none to show (an invalid id, an unreadable or malformed route; a missing
/// route is neither).
pub fn shown_status(
    plugin_id: &str,
    route: Result<Option<crate::store::Entry>, crate::store::StoreError>,
) -> (Option<String>, Option<String>) {
    match (crate::registry::invalid_id_reason(plugin_id), route) {
        (Some(reason), _) => (None, Some(format!("invalid plugin id: {reason}"))),
        (None, Err(e)) => (None, Some(e.to_string())),
        (None, Ok(None)) => (None, None),
        (None, Ok(Some(e))) => match read_status(&e.data) {
            Ok(st) => (Some(st), None),
            Err(err) => (None, Some(err.to_string())),
        },
    }
}

/// The stored status string of a route (it may be outside the route vocabulary).
pub fn read_status(data: &[u8]) -> Result<String, RouteError> {
    // The hot path reads only `status` and skips the other members without keeping them;
    // anything unusual (no status, a non-string one, duplicate keys) takes the full path,
    // which gives the precise error or the last duplicate.
    #[derive(serde::Deserialize)]
    struct StatusOnly<'a> {
        #[serde(borrow)]
        status: Option<Cow<'a, str>>,
    }
    // serde would also read a struct from a JSON array: only objects take the fast path.
    let is_object = data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    match serde_json::from_slice::<StatusOnly<'_>>(data) {
        Ok(StatusOnly {
            status: Some(status),
        }) if is_object => Ok(status.into_owned()),
        _ => status_of(&members(data)?),
    }
}

/// The route with its `status` set to `status` and every other member kept as it was.
pub fn rewrite_status(data: &[u8], status: RouteStatus) -> Result<Vec<u8>, RouteError> {
    let members = members(data)?;
    status_of(&members)?;
    let mut out = Vec::with_capacity(data.len() + 8);
    out.push(b'{');
    for (i, (key, value)) in members.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, key.as_ref());
        out.push(b':');
        if key == "status" {
            out.push(b'"');
            out.extend_from_slice(status.as_str().as_bytes());
            out.push(b'"');
        } else {
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    out.push(b'}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_status_of_a_plugins_route() {
        let r = br#"{"status":"ACTIVE","tkeel_version":"v0.2.0","register_addons":{"device_created":"iothub/v1/hook"}}"#;
        assert_eq!(read_status(r).unwrap(), "ACTIVE");
    }

    #[test]
    fn rewrite_keeps_every_other_member_byte_for_byte() {
        let r = br#"{"register_addons":{"a":"x/y"},"status":"ACTIVE","n":1.0e3,"big":123456789012345678901234567890,"esc":"\u00e9\n","unknown":[1,{"z":null}]}"#;
        let out = rewrite_status(r, RouteStatus::Failed).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"register_addons":{"a":"x/y"},"status":"FAILED","n":1.0e3,"big":123456789012345678901234567890,"esc":"\u00e9\n","unknown":[1,{"z":null}]}"#
        );
    }

    #[test]
    fn malformed_routes_are_errors_not_rewrites() {
        assert!(matches!(
            read_status(b"not json"),
            Err(RouteError::NotAnObject(_))
        ));
        assert!(matches!(
            read_status(br#"["ACTIVE"]"#),
            Err(RouteError::NotAnObject(_))
        ));
        assert!(matches!(
            read_status(br#"{"status":"A","status":"STOPPED"}"#).as_deref(),
            Ok("STOPPED")
        ));
        assert!(matches!(
            read_status(b"[1,2]"),
            Err(RouteError::NotAnObject(_))
        ));
        assert!(matches!(
            read_status(br#"{"x":1}"#),
            Err(RouteError::NoStatus)
        ));
        assert!(matches!(
            read_status(br#"{"status":3}"#),
            Err(RouteError::StatusNotString)
        ));
        assert!(rewrite_status(br#"{"x":1}"#, RouteStatus::Active).is_err());
        assert!(rewrite_status(b"{\"status\":\"ACTIVE\"", RouteStatus::Active).is_err());
    }

    #[test]
    fn route_key_is_bare() {
        assert_eq!(route_key("iothub"), "plugin_route_iothub");
    }
}
