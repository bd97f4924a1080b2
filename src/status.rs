//! Plugin statuses: the route vocabulary Keel reads, and parsing of `GET /v1/status`
//! bodies in both contract generations (v0 and v1, see `tkeel.md`).

use std::fmt;

/// A status in the route vocabulary (v0), the only one Keel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteStatus {
    Starting,
    Active,
    Stopping,
    Stopped,
    Failed,
}

impl RouteStatus {
    pub const ALL: [RouteStatus; 5] = [
        RouteStatus::Starting,
        RouteStatus::Active,
        RouteStatus::Stopping,
        RouteStatus::Stopped,
        RouteStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteStatus::Starting => "STARTING",
            RouteStatus::Active => "ACTIVE",
            RouteStatus::Stopping => "STOPPING",
            RouteStatus::Stopped => "STOPPED",
            RouteStatus::Failed => "FAILED",
        }
    }

    /// Parses the exact upper-case route spelling.
    pub fn from_route_str(s: &str) -> Option<RouteStatus> {
        RouteStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Keel lets traffic through only for `ACTIVE` and `STARTING`.
    pub fn passes_gate(self) -> bool {
        matches!(self, RouteStatus::Active | RouteStatus::Starting)
    }
}

impl fmt::Display for RouteStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a route's stored status string lets Keel send traffic.
pub fn status_str_passes_gate(s: &str) -> bool {
    s == "ACTIVE" || s == "STARTING"
}

/// Why a probe of one plugin failed: the `error_kind` of events and metrics.
///
/// The parse kinds (`bad_body`, `plugin_error`, `unknown_status`) come from
/// [`parse_status`]; the others from the transport (see `probe`). Every failed probe has
/// exactly one kind, and the spelling of [`ErrorKind::as_str`] is a public contract: alert
/// rules and dashboards match on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The TCP connection (or the name lookup before it) could not be made.
    Connect,
    /// The attempt did not finish (connect, headers and body) within the probe timeout.
    Timeout,
    /// The reply was not HTTP, or the connection broke in the middle of the answer.
    Protocol,
    /// Any non-2xx answer, 3xx included (redirects are never followed).
    HttpStatus,
    /// The body exceeded the cap and was abandoned unread.
    TooLarge,
    /// The body is not UTF-8, not JSON, not a JSON object, or a field has the wrong type.
    BadBody,
    /// The plugin answered but its own result code is not OK.
    PluginError,
    /// No status in the generation's vocabulary (missing, unknown, v1 `UNKNOWN`).
    UnknownStatus,
    /// The Dapr sidecar could not invoke the plugin (a 500 with an `ERR_*` error code).
    SidecarInvoke,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Protocol,
        ErrorKind::HttpStatus,
        ErrorKind::TooLarge,
        ErrorKind::BadBody,
        ErrorKind::PluginError,
        ErrorKind::UnknownStatus,
        ErrorKind::SidecarInvoke,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Protocol => "protocol",
            ErrorKind::HttpStatus => "http_status",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::BadBody => "bad_body",
            ErrorKind::PluginError => "plugin_error",
            ErrorKind::UnknownStatus => "unknown_status",
            ErrorKind::SidecarInvoke => "sidecar_invoke",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `/v1/status` body that does not report a usable status.
///
/// `kind` is one of [`ErrorKind::BadBody`], [`ErrorKind::PluginError`] or
/// [`ErrorKind::UnknownStatus`]; `detail` is a short sentence for people. Any text quoted
/// from the body in `detail` is cut to [`QUOTE_LIMIT`] characters with control characters
/// replaced, so a hostile plugin cannot flood or forge log lines through it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct StatusError {
    pub kind: ErrorKind,
    pub detail: String,
}

impl StatusError {
    fn new(kind: ErrorKind, detail: String) -> Self {
        StatusError { kind, detail }
    }
}

/// How many characters of plugin-supplied text a [`StatusError`] detail may quote.
pub const QUOTE_LIMIT: usize = 64;

/// Parses a `GET /v1/status` body of either contract generation into the route vocabulary.
///
/// The rules (`tkeel.md`):
/// - The body must be UTF-8 JSON whose top level is an object, else `bad_body`.
/// - When the top level has `res`, `ret` or `status`: it is v1 when `res` is a JSON
///   object, else v0. Otherwise it is a wrapped reply (`{"code", "msg", "data"}`, tKeel's
///   HTTP generator): an object `data` is read as a v1 reply, whose missing `status` is
///   `bad_body`; a missing or `null` `data` is `bad_body`.
/// - v0: `ret` missing or `null` means 0; any other integer is `plugin_error`; a value that
///   is not an integer (string, boolean, `1.5`, ...) is `bad_body`. `status` must be exactly
///   one of `STARTING`, `ACTIVE`, `STOPPING`, `STOPPED`, `FAILED`; anything else, missing
///   included, is `unknown_status`.
/// - v1 (protobuf JSON, enums as names or numbers, defaults may be omitted): `res.ret`
///   missing or `null` means `OK`; `OK` / `0` passes. Every other result code is
///   `plugin_error`, *including names and numbers this worker does not know*: the plugin
///   did not say OK, and a newer contract adding codes must not turn into `bad_body`.
///   A `ret` of the wrong JSON type (boolean, object, array, non-integer number) is
///   `bad_body`. `status` is `WAIT_RUNNING`/1 -> `STARTING`, `ERR_REGISTER`/2 -> `FAILED`,
///   `RUNNING`/3 -> `ACTIVE`; missing, `null`, `UNKNOWN`/0, any other name or number, or a
///   value of another type is `unknown_status`.
/// - The result code is checked before the status: a plugin that reports an error is a
///   `plugin_error` whatever status it also sends.
///
/// Integral numbers written as floats (`0.0`, `3e0`) count as those integers. The parser
/// never panics on any input (a property test feeds it arbitrary bytes).
pub fn parse_status(body: &[u8]) -> Result<RouteStatus, StatusError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        StatusError::new(
            ErrorKind::BadBody,
            format!("body is not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    if let Some(status) = parse_common(text) {
        return Ok(status);
    }
    parse_general(text)
}

/// The answers nearly every plugin sends (`ret` 0 or `OK`, a known status), read without
/// building a JSON tree: the top level's `res`, `ret` and `status` are taken as raw text
/// and every other member is skipped. `None` hands the body to [`parse_general`], which
/// reads every other answer, and gives every error, exactly: so anything unusual (a
/// duplicate member, an escaped or unknown status, `ret` written as `0.0`, a non-object
/// `res`) takes that path. A unit property test checks that whenever this gives a status,
/// [`parse_general`] gives the same one.
fn parse_common(text: &str) -> Option<RouteStatus> {
    use serde_json::value::RawValue;
    #[derive(serde::Deserialize)]
    struct Top<'a> {
        #[serde(borrow, default)]
        res: Option<&'a RawValue>,
        #[serde(borrow, default)]
        ret: Option<&'a RawValue>,
        #[serde(borrow, default)]
        status: Option<&'a RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Res<'a> {
        #[serde(borrow, default)]
        ret: Option<&'a RawValue>,
    }
    // serde reads a struct from a JSON array too: only objects take this path.
    let is_object = |t: &str| t.trim_start().starts_with('{');
    // The members skipped here are not depth-limited as a JSON tree is: a body nested
    // deeply enough to fail the general path must take it.
    if !is_object(text) || nesting(text.as_bytes()) > SHALLOW {
        return None;
    }
    let top: Top<'_> = serde_json::from_str(text).ok()?;
    let status = top.status?.get();
    match top.res {
        // v0: `ret` absent, null or 0.
        None => {
            if !matches!(top.ret.map(RawValue::get), None | Some("0")) {
                return None;
            }
            match status {
                r#""STARTING""# => Some(RouteStatus::Starting),
                r#""ACTIVE""# => Some(RouteStatus::Active),
                r#""STOPPING""# => Some(RouteStatus::Stopping),
                r#""STOPPED""# => Some(RouteStatus::Stopped),
                r#""FAILED""# => Some(RouteStatus::Failed),
                _ => None,
            }
        }
        // v1: `res.ret` absent, null, 0 or OK.
        Some(res) if is_object(res.get()) => {
            let res: Res<'_> = serde_json::from_str(res.get()).ok()?;
            if !matches!(res.ret.map(RawValue::get), None | Some("0" | r#""OK""#)) {
                return None;
            }
            match status {
                r#""WAIT_RUNNING""# | "1" => Some(RouteStatus::Starting),
                r#""ERR_REGISTER""# | "2" => Some(RouteStatus::Failed),
                r#""RUNNING""# | "3" => Some(RouteStatus::Active),
                _ => None,
            }
        }
        Some(_) => None,
    }
}

/// The nesting [`parse_common`] reads; serde_json's tree stops at 128 levels.
const SHALLOW: usize = 32;

/// How deeply `[` and `{` nest in `json`, outside strings (any bytes: it only counts).
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// [`parse_status`] for any body, after the UTF-8 check: the body as a JSON tree.
fn parse_general(text: &str) -> Result<RouteStatus, StatusError> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| StatusError::new(ErrorKind::BadBody, format!("body is not JSON: {e}")))?;
    let serde_json::Value::Object(obj) = value else {
        return Err(StatusError::new(
            ErrorKind::BadBody,
            format!("body is JSON {} instead of an object", json_type(&value)),
        ));
    };
    if ["res", "ret", "status"]
        .iter()
        .any(|k| obj.contains_key(*k))
    {
        return match obj.get("res") {
            Some(serde_json::Value::Object(res)) => parse_v1(res, obj.get("status")),
            _ => parse_v0(&obj),
        };
    }
    parse_wrapped(&obj)
}

/// tKeel's HTTP generator wraps a reply as `{"code": .., "msg": .., "data": {"@type": ..,
/// "res": {..}, "status": ..}}` (protojson: every field present). `code`, `msg` and
/// `@type` are ignored; `data` is read as a v1 reply.
fn parse_wrapped(
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<RouteStatus, StatusError> {
    use serde_json::Value;
    let data = match obj.get("data") {
        Some(Value::Object(data)) => data,
        None | Some(Value::Null) => {
            return Err(StatusError::new(
                ErrorKind::BadBody,
                "body has no res, ret, status or data".to_owned(),
            ))
        }
        Some(other) => {
            return Err(StatusError::new(
                ErrorKind::BadBody,
                format!("data is a JSON {} instead of an object", json_type(other)),
            ))
        }
    };
    let Some(status) = data.get("status") else {
        return Err(StatusError::new(
            ErrorKind::BadBody,
            "data has no status".to_owned(),
        ));
    };
    let empty = serde_json::Map::new();
    let res = match data.get("res") {
        Some(Value::Object(res)) => res,
        None | Some(Value::Null) => &empty,
        Some(other) => {
            return Err(StatusError::new(
                ErrorKind::BadBody,
                format!(
                    "data.res is a JSON {} instead of an object",
                    json_type(other)
                ),
            ))
        }
    };
    parse_v1(res, Some(status))
}

fn parse_v0(obj: &serde_json::Map<String, serde_json::Value>) -> Result<RouteStatus, StatusError> {
    use serde_json::Value;
    match obj.get("ret") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => match classify_number(n) {
            Num::Int(0) => {}
            Num::Int(_) | Num::OtherInt => {
                return Err(StatusError::new(
                    ErrorKind::PluginError,
                    format!("plugin reported ret {n}{}", msg_suffix(obj.get("msg"))),
                ));
            }
            Num::NotInt => {
                return Err(StatusError::new(
                    ErrorKind::BadBody,
                    format!("v0 ret {n} is not an integer"),
                ));
            }
        },
        Some(other) => {
            return Err(StatusError::new(
                ErrorKind::BadBody,
                format!(
                    "v0 ret is a JSON {} instead of an integer",
                    json_type(other)
                ),
            ));
        }
    }
    match obj.get("status") {
        None | Some(Value::Null) => Err(StatusError::new(
            ErrorKind::UnknownStatus,
            "v0 body has no status".to_owned(),
        )),
        Some(Value::String(s)) => RouteStatus::from_route_str(s).ok_or_else(|| {
            StatusError::new(
                ErrorKind::UnknownStatus,
                format!("status {} is not a v0 status", quote(s)),
            )
        }),
        Some(other) => Err(StatusError::new(
            ErrorKind::UnknownStatus,
            format!("v0 status is a JSON {} instead of a name", json_type(other)),
        )),
    }
}

fn parse_v1(
    res: &serde_json::Map<String, serde_json::Value>,
    status: Option<&serde_json::Value>,
) -> Result<RouteStatus, StatusError> {
    use serde_json::Value;
    let plugin_error = |code: &str| {
        StatusError::new(
            ErrorKind::PluginError,
            format!(
                "plugin reported res.ret {code}{}",
                msg_suffix(res.get("msg"))
            ),
        )
    };
    match res.get("ret") {
        None | Some(Value::Null) => {}
        Some(Value::String(name)) => {
            if name != "OK" {
                return Err(plugin_error(&quote(name)));
            }
        }
        Some(Value::Number(n)) => match classify_number(n) {
            Num::Int(0) => {}
            Num::Int(400) => return Err(plugin_error("BAD_REQEUST (400)")),
            Num::Int(500) => return Err(plugin_error("INTERNAL_ERROR (500)")),
            Num::Int(_) | Num::OtherInt => return Err(plugin_error(&n.to_string())),
            Num::NotInt => {
                return Err(StatusError::new(
                    ErrorKind::BadBody,
                    format!("v1 res.ret {n} is not an integer"),
                ));
            }
        },
        Some(other) => {
            return Err(StatusError::new(
                ErrorKind::BadBody,
                format!(
                    "v1 res.ret is a JSON {} instead of a name or number",
                    json_type(other)
                ),
            ));
        }
    }
    let unknown = |what: String| StatusError::new(ErrorKind::UnknownStatus, what);
    let number = match status {
        None | Some(Value::Null) => return Err(unknown("v1 status UNKNOWN (absent)".to_owned())),
        Some(Value::String(name)) => match name.as_str() {
            "WAIT_RUNNING" => return Ok(RouteStatus::Starting),
            "ERR_REGISTER" => return Ok(RouteStatus::Failed),
            "RUNNING" => return Ok(RouteStatus::Active),
            "UNKNOWN" => return Err(unknown("v1 status UNKNOWN".to_owned())),
            _ => {
                return Err(unknown(format!(
                    "status {} is not a v1 status",
                    quote(name)
                )))
            }
        },
        Some(Value::Number(n)) => n,
        Some(other) => {
            return Err(unknown(format!(
                "v1 status is a JSON {} instead of a name or number",
                json_type(other)
            )))
        }
    };
    match classify_number(number) {
        Num::Int(1) => Ok(RouteStatus::Starting),
        Num::Int(2) => Ok(RouteStatus::Failed),
        Num::Int(3) => Ok(RouteStatus::Active),
        Num::Int(0) => Err(unknown("v1 status UNKNOWN (0)".to_owned())),
        _ => Err(unknown(format!("v1 status {number} is out of range"))),
    }
}

/// A JSON number seen as a protobuf/Go integer field.
enum Num {
    /// An integer that fits `i64` (floats with no fraction included).
    Int(i64),
    /// An integer outside `i64` (huge `u64`, or an integral float beyond `i64`).
    OtherInt,
    /// Has a fraction.
    NotInt,
}

fn classify_number(n: &serde_json::Number) -> Num {
    if let Some(i) = n.as_i64() {
        return Num::Int(i);
    }
    if n.as_u64().is_some() {
        return Num::OtherInt;
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f.fract() == 0.0 => {
            // Casting a float that is integral and within i64's range is exact; the range
            // check keeps the saturating cast from inventing a value.
            if f >= i64::MIN as f64 && f < i64::MAX as f64 {
                Num::Int(f as i64)
            } else {
                Num::OtherInt
            }
        }
        _ => Num::NotInt,
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// `": <msg>"` when the plugin sent a string `msg`, else nothing.
fn msg_suffix(msg: Option<&serde_json::Value>) -> String {
    match msg {
        Some(serde_json::Value::String(m)) if !m.is_empty() => format!(": {}", quote(m)),
        _ => String::new(),
    }
}

/// Quotes plugin-supplied text for a detail: at most [`QUOTE_LIMIT`] characters, control
/// characters replaced by `?`, an ellipsis when cut.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(QUOTE_LIMIT * 4) + 4);
    out.push('"');
    for (i, c) in s.chars().enumerate() {
        if i == QUOTE_LIMIT {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Member values, the usual ones and the unusual ones beside them.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("0".to_owned()),
            Just("-0".to_owned()),
            Just("0.0".to_owned()),
            Just("1".to_owned()),
            Just("2".to_owned()),
            Just("3".to_owned()),
            Just("3e0".to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just(r#""OK""#.to_owned()),
            Just(r#""ok""#.to_owned()),
            Just(r#""ACTIVE""#.to_owned()),
            Just(r#""\u0041CTIVE""#.to_owned()),
            Just(r#""STOPPED""#.to_owned()),
            Just(r#""STARTING""#.to_owned()),
            Just(r#""STOPPING""#.to_owned()),
            Just(r#""FAILED""#.to_owned()),
            Just(r#""RUNNING""#.to_owned()),
            Just(r#""WAIT_RUNNING""#.to_owned()),
            Just(r#""ERR_REGISTER""#.to_owned()),
            Just(r#""UNKNOWN""#.to_owned()),
            Just("[]".to_owned()),
            Just(r#"[0,"ACTIVE"]"#.to_owned()),
            Just("{}".to_owned()),
            Just(r#"{"ret":0}"#.to_owned()),
            Just(r#"{"ret":"OK","msg":"fine"}"#.to_owned()),
            Just(r#"{"ret":0,"ret":7}"#.to_owned()),
            Just(r#"{"ret":400}"#.to_owned()),
            Just(r#"{"msg":"x"}"#.to_owned()),
            Just(r#"{"status":"RUNNING"}"#.to_owned()),
        ]
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("res"),
            Just("ret"),
            Just("status"),
            Just("data"),
            Just("msg"),
            Just("code"),
            Just("Status"),
        ]
    }

    /// Objects of those members (duplicates included), with or without spaces, and now
    /// and then something that is not an object or not JSON.
    fn body() -> impl Strategy<Value = String> {
        let members = proptest::collection::vec((key(), value()), 0..6);
        (members, any::<bool>(), 0u8..8).prop_map(|(members, spaced, shape)| {
            let sep = if spaced { ", " } else { "," };
            let inner: Vec<String> = members
                .iter()
                .map(|(k, v)| {
                    if spaced {
                        format!("\"{k}\" : {v}")
                    } else {
                        format!("\"{k}\":{v}")
                    }
                })
                .collect();
            let object = format!("{{{}}}", inner.join(sep));
            match shape {
                0 => format!("  {object}\n"),
                1 => format!("[{object}]"),
                2 => format!("{object} x"),
                3 => object.trim_end_matches('}').to_owned(),
                4 => format!(r#"{{"data":{object}}}"#),
                _ => object,
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// The fast path never disagrees with the general one: when it reads a status,
        /// the general path reads the same one.
        #[test]
        fn the_common_shapes_read_as_the_general_path_reads_them(text in body()) {
            if let Some(status) = parse_common(&text) {
                prop_assert_eq!(parse_general(&text), Ok(status), "{}", text);
            }
        }
    }

    /// A member nested deeper than the general path's recursion limit: both paths give
    /// the same answer.
    #[test]
    fn deep_nesting_reads_alike_on_both_paths() {
        for depth in [30, 31, 32, 33, 100, 127, 128, 129, 200, 5000] {
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            for body in [
                format!(r#"{{"x":{nested},"status":"ACTIVE"}}"#),
                format!(r#"{{"res":{{"y":{nested}}},"status":"RUNNING"}}"#),
            ] {
                if depth <= 30 {
                    assert!(parse_common(&body).is_some(), "depth {depth} is read here");
                }
                if let Some(status) = parse_common(&body) {
                    assert_eq!(parse_general(&body), Ok(status), "depth {depth}");
                }
            }
        }
    }

    /// The shapes the fast path exists for do take it (else it would cost, not save).
    #[test]
    fn the_usual_answers_take_the_fast_path() {
        for (body, status) in [
            (
                r#"{"ret":0,"msg":"ok","status":"ACTIVE"}"#,
                RouteStatus::Active,
            ),
            (r#"{"status":"STOPPED"}"#, RouteStatus::Stopped),
            (
                r#"{"res":{"ret":0,"msg":"ok"},"status":"RUNNING"}"#,
                RouteStatus::Active,
            ),
            (r#"{"res":{"ret":"OK"},"status":1}"#, RouteStatus::Starting),
            (
                r#" { "res" : { } , "status" : "ERR_REGISTER" } "#,
                RouteStatus::Failed,
            ),
        ] {
            assert_eq!(parse_common(body), Some(status), "{body}");
            assert_eq!(parse_status(body.as_bytes()), Ok(status), "{body}");
        }
        // Unusual ones are left to the general path, which reads them the same way.
        for body in [
            r#"{"ret":0.0,"status":"ACTIVE"}"#,
            r#"{"status":"\u0041CTIVE"}"#,
            r#"{"status":"STOPPED","status":"ACTIVE"}"#,
        ] {
            assert_eq!(parse_common(body), None, "{body}");
            assert_eq!(
                parse_status(body.as_bytes()).map_err(|e| e.kind),
                Ok(RouteStatus::Active),
                "{body}"
            );
        }
    }
}
