//! `/v1/status` bodies of both contract generations parse to the route vocabulary, and every
//! other body fails with the one `error_kind` the contract gives it.

use keel_scraper::status::{parse_status, ErrorKind, RouteStatus, QUOTE_LIMIT};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use ErrorKind::{BadBody, PluginError, UnknownStatus};
use RouteStatus::{Active, Failed, Starting, Stopped, Stopping};

fn kind_of(body: &[u8]) -> Result<RouteStatus, ErrorKind> {
    parse_status(body).map_err(|e| e.kind)
}

fn check(table: &[(&str, Result<RouteStatus, ErrorKind>)]) {
    for (body, want) in table {
        assert_eq!(
            kind_of(body.as_bytes()),
            *want,
            "body {body}: got {:?}",
            parse_status(body.as_bytes())
        );
    }
}

#[test]
fn error_kind_spellings_are_the_public_contract() {
    let spelled: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        spelled,
        [
            "connect",
            "timeout",
            "protocol",
            "http_status",
            "too_large",
            "bad_body",
            "plugin_error",
            "unknown_status",
            "sidecar_invoke"
        ]
    );
    for kind in ErrorKind::ALL {
        assert_eq!(kind.to_string(), kind.as_str());
    }
}

#[test]
fn a_body_that_is_not_a_json_object_is_bad_body() {
    check(&[
        ("", Err(BadBody)),
        ("   ", Err(BadBody)),
        ("not json", Err(BadBody)),
        ("{\"status\":\"ACTIVE\"", Err(BadBody)),
        ("{\"status\":\"ACTIVE\"} trailing", Err(BadBody)),
        ("[]", Err(BadBody)),
        ("[{\"status\":\"ACTIVE\"}]", Err(BadBody)),
        ("[0,\"ACTIVE\"]", Err(BadBody)),
        ("\"ACTIVE\"", Err(BadBody)),
        ("42", Err(BadBody)),
        ("null", Err(BadBody)),
        ("true", Err(BadBody)),
    ]);
}

#[test]
fn invalid_utf8_is_bad_body() {
    let inside_string = b"{\"ret\":0,\"status\":\"AC\xff\xfeTIVE\"}";
    assert_eq!(kind_of(inside_string), Err(BadBody));
    let outside = b"\xef\xbb\xbf{\"status\":\"ACTIVE\"}\xc3";
    assert_eq!(kind_of(outside), Err(BadBody));
    let err = parse_status(inside_string).unwrap_err();
    assert!(err.detail.contains("UTF-8"), "{}", err.detail);
}

#[test]
fn v0_statuses_parse_to_themselves() {
    check(&[
        (r#"{"ret":0,"msg":"ok","status":"STARTING"}"#, Ok(Starting)),
        (r#"{"ret":0,"msg":"ok","status":"ACTIVE"}"#, Ok(Active)),
        (r#"{"ret":0,"msg":"ok","status":"STOPPING"}"#, Ok(Stopping)),
        (r#"{"ret":0,"msg":"ok","status":"STOPPED"}"#, Ok(Stopped)),
        (r#"{"ret":0,"msg":"ok","status":"FAILED"}"#, Ok(Failed)),
    ]);
}

#[test]
fn v0_ret_missing_or_null_means_zero() {
    check(&[
        (r#"{"status":"ACTIVE"}"#, Ok(Active)),
        (r#"{"ret":null,"status":"STOPPED"}"#, Ok(Stopped)),
        (r#"{"ret":0.0,"status":"ACTIVE"}"#, Ok(Active)),
        (r#"{"ret":-0,"status":"ACTIVE"}"#, Ok(Active)),
    ]);
}

#[test]
fn v0_nonzero_ret_is_plugin_error_whatever_the_status() {
    check(&[
        (
            r#"{"ret":1,"msg":"boom","status":"ACTIVE"}"#,
            Err(PluginError),
        ),
        (r#"{"ret":-1,"status":"ACTIVE"}"#, Err(PluginError)),
        (r#"{"ret":500}"#, Err(PluginError)),
        (r#"{"ret":1e3,"status":"ACTIVE"}"#, Err(PluginError)),
        (
            r#"{"ret":18446744073709551615,"status":"ACTIVE"}"#,
            Err(PluginError),
        ),
        (r#"{"ret":2,"status":"NOPE"}"#, Err(PluginError)),
    ]);
    let err = parse_status(br#"{"ret":7,"msg":"disk full","status":"ACTIVE"}"#).unwrap_err();
    assert!(
        err.detail.contains('7') && err.detail.contains("disk full"),
        "{}",
        err.detail
    );
}

#[test]
fn v0_ret_that_is_not_an_integer_is_bad_body() {
    check(&[
        (r#"{"ret":"0","status":"ACTIVE"}"#, Err(BadBody)),
        (r#"{"ret":0.5,"status":"ACTIVE"}"#, Err(BadBody)),
        (r#"{"ret":true,"status":"ACTIVE"}"#, Err(BadBody)),
        (r#"{"ret":[],"status":"ACTIVE"}"#, Err(BadBody)),
        (r#"{"ret":{},"status":"ACTIVE"}"#, Err(BadBody)),
    ]);
}

#[test]
fn v0_status_outside_the_vocabulary_is_unknown_status() {
    check(&[
        (r#"{"ret":0,"msg":"ok"}"#, Err(UnknownStatus)),
        (r#"{"ret":0,"status":null}"#, Err(UnknownStatus)),
        (r#"{"ret":0,"status":"active"}"#, Err(UnknownStatus)),
        (r#"{"ret":0,"status":" ACTIVE"}"#, Err(UnknownStatus)),
        (r#"{"ret":0,"status":"RUNNING"}"#, Err(UnknownStatus)),
        (r#"{"ret":0,"status":"UNKNOWN"}"#, Err(UnknownStatus)),
        (r#"{"ret":0,"status":""}"#, Err(UnknownStatus)),
        (r#"{"ret":0,"status":3}"#, Err(UnknownStatus)),
        (r#"{"ret":0,"status":true}"#, Err(UnknownStatus)),
        (r#"{"ret":0,"status":["ACTIVE"]}"#, Err(UnknownStatus)),
    ]);
}

#[test]
fn wrapped_v1_replies_are_read_from_data() {
    let wrapped = |code: &str, data: &str| format!(r#"{{"code":{code},"msg":"ok","data":{data}}}"#);
    let status_response = |res: &str, status: &str| {
        format!(
            r#"{{"@type":"type.googleapis.com/openapi.v1.StatusResponse","res":{res},"status":{status}}}"#
        )
    };
    let ok = r#"{"ret":"OK","msg":"ok"}"#;
    let rows: Vec<(String, Result<RouteStatus, ErrorKind>)> = vec![
        // Number and string `code`, both ignored.
        (wrapped("0", &status_response(ok, r#""RUNNING""#)), Ok(Active)),
        (wrapped(r#""io.tkeel.SUCCESS""#, &status_response(ok, r#""RUNNING""#)), Ok(Active)),
        (wrapped("200", &status_response(ok, r#""WAIT_RUNNING""#)), Ok(Starting)),
        (wrapped("0", &status_response(ok, r#""ERR_REGISTER""#)), Ok(Failed)),
        (wrapped("0", &status_response(ok, "3")), Ok(Active)),
        (wrapped("0", &status_response(ok, r#""UNKNOWN""#)), Err(UnknownStatus)),
        (wrapped("0", &status_response(ok, "null")), Err(UnknownStatus)),
        // The v1 result code inside still counts.
        (
            wrapped("0", &status_response(r#"{"ret":"INTERNAL_ERROR","msg":"db"}"#, r#""RUNNING""#)),
            Err(PluginError),
        ),
        (wrapped("0", &status_response("[]", r#""RUNNING""#)), Err(BadBody)),
        // A data without status, a missing or null data: bad_body.
        (wrapped("0", r#"{"@type":"x","res":{"ret":"OK"}}"#), Err(BadBody)),
        (wrapped("0", "null"), Err(BadBody)),
        (r#"{"code":0,"msg":"ok"}"#.to_owned(), Err(BadBody)),
        (wrapped("0", r#""RUNNING""#), Err(BadBody)),
        // Nothing at all: no res, ret, status or data.
        (r#"{}"#.to_owned(), Err(BadBody)),
        // Any key order, indented, with a trailing newline.
        (
            "{\n  \"data\": {\n    \"status\": \"RUNNING\",\n    \"res\": {\"msg\": \"ok\", \"ret\": \"OK\"},\n    \"@type\": \"type.googleapis.com/openapi.v1.StatusResponse\"\n  },\n  \"msg\": \"ok\",\n  \"code\": 0\n}\n".to_owned(),
            Ok(Active),
        ),
        // A top-level res, ret or status is parsed as before, whatever data says.
        (r#"{"status":"ACTIVE","data":{"status":"ERR_REGISTER"}}"#.to_owned(), Ok(Active)),
        (r#"{"ret":0,"data":{"status":"RUNNING"}}"#.to_owned(), Err(UnknownStatus)),
    ];
    for (body, want) in rows {
        assert_eq!(
            kind_of(body.as_bytes()),
            want,
            "body {body}: got {:?}",
            parse_status(body.as_bytes())
        );
    }
}

#[test]
fn indented_plain_replies_with_a_trailing_newline_parse() {
    check(&[
        (
            "{\n  \"ret\": 0,\n  \"status\": \"ACTIVE\"\n}\n",
            Ok(Active),
        ),
        (
            "{\n  \"status\": \"RUNNING\",\n  \"res\": {\"ret\": \"OK\"}\n}\n",
            Ok(Active),
        ),
    ]);
}

#[test]
fn res_that_is_not_an_object_means_v0() {
    check(&[
        (r#"{"res":null,"status":"ACTIVE"}"#, Ok(Active)),
        (r#"{"res":"OK","status":"STOPPED"}"#, Ok(Stopped)),
        (r#"{"res":[],"status":"RUNNING"}"#, Err(UnknownStatus)),
        (r#"{"res":1,"ret":3,"status":"ACTIVE"}"#, Err(PluginError)),
    ]);
}

#[test]
fn v1_statuses_by_name_map_to_the_route_vocabulary() {
    check(&[
        (
            r#"{"res":{"ret":"OK","msg":"ok"},"status":"RUNNING"}"#,
            Ok(Active),
        ),
        (
            r#"{"res":{"ret":"OK"},"status":"WAIT_RUNNING"}"#,
            Ok(Starting),
        ),
        (
            r#"{"res":{"ret":"OK"},"status":"ERR_REGISTER"}"#,
            Ok(Failed),
        ),
    ]);
}

#[test]
fn v1_statuses_by_number_map_to_the_route_vocabulary() {
    check(&[
        (r#"{"res":{"ret":0},"status":3}"#, Ok(Active)),
        (r#"{"res":{"ret":0},"status":1}"#, Ok(Starting)),
        (r#"{"res":{"ret":0},"status":2}"#, Ok(Failed)),
        (r#"{"res":{"ret":0},"status":3.0}"#, Ok(Active)),
    ]);
}

#[test]
fn v1_ret_missing_or_null_or_zero_means_ok() {
    check(&[
        (r#"{"res":{},"status":"RUNNING"}"#, Ok(Active)),
        (r#"{"res":{"msg":"ok"},"status":"RUNNING"}"#, Ok(Active)),
        (r#"{"res":{"ret":null},"status":"RUNNING"}"#, Ok(Active)),
        (r#"{"res":{"ret":0},"status":"RUNNING"}"#, Ok(Active)),
    ]);
}

#[test]
fn v1_ret_not_ok_is_plugin_error_known_or_not() {
    check(&[
        (
            r#"{"res":{"ret":"BAD_REQEUST"},"status":"RUNNING"}"#,
            Err(PluginError),
        ),
        (
            r#"{"res":{"ret":"INTERNAL_ERROR"},"status":"RUNNING"}"#,
            Err(PluginError),
        ),
        (
            r#"{"res":{"ret":400},"status":"RUNNING"}"#,
            Err(PluginError),
        ),
        (
            r#"{"res":{"ret":500},"status":"RUNNING"}"#,
            Err(PluginError),
        ),
        // Unknown names and numbers: the plugin did not say OK.
        (
            r#"{"res":{"ret":"BAD_REQUEST"},"status":"RUNNING"}"#,
            Err(PluginError),
        ),
        (
            r#"{"res":{"ret":"ok"},"status":"RUNNING"}"#,
            Err(PluginError),
        ),
        (r#"{"res":{"ret":""},"status":"RUNNING"}"#, Err(PluginError)),
        (r#"{"res":{"ret":7},"status":"RUNNING"}"#, Err(PluginError)),
        (r#"{"res":{"ret":-1},"status":"RUNNING"}"#, Err(PluginError)),
        // The result code is checked first.
        (
            r#"{"res":{"ret":500},"status":"UNKNOWN"}"#,
            Err(PluginError),
        ),
    ]);
    let err = parse_status(br#"{"res":{"ret":500,"msg":"db down"},"status":3}"#).unwrap_err();
    assert!(
        err.detail.contains("INTERNAL_ERROR") && err.detail.contains("db down"),
        "{}",
        err.detail
    );
}

#[test]
fn v1_ret_of_the_wrong_type_is_bad_body() {
    check(&[
        (r#"{"res":{"ret":true},"status":"RUNNING"}"#, Err(BadBody)),
        (r#"{"res":{"ret":0.5},"status":"RUNNING"}"#, Err(BadBody)),
        (r#"{"res":{"ret":{}},"status":"RUNNING"}"#, Err(BadBody)),
        (r#"{"res":{"ret":["OK"]},"status":"RUNNING"}"#, Err(BadBody)),
    ]);
}

#[test]
fn v1_unknown_missing_or_out_of_range_status_is_unknown_status() {
    check(&[
        (r#"{"res":{"ret":"OK"}}"#, Err(UnknownStatus)),
        (r#"{"res":{"ret":"OK"},"status":null}"#, Err(UnknownStatus)),
        (
            r#"{"res":{"ret":"OK"},"status":"UNKNOWN"}"#,
            Err(UnknownStatus),
        ),
        (r#"{"res":{"ret":"OK"},"status":0}"#, Err(UnknownStatus)),
        (r#"{"res":{"ret":"OK"},"status":4}"#, Err(UnknownStatus)),
        (r#"{"res":{"ret":"OK"},"status":-1}"#, Err(UnknownStatus)),
        (r#"{"res":{"ret":"OK"},"status":2.5}"#, Err(UnknownStatus)),
        (
            r#"{"res":{"ret":"OK"},"status":18446744073709551615}"#,
            Err(UnknownStatus),
        ),
        (
            r#"{"res":{"ret":"OK"},"status":"ACTIVE"}"#,
            Err(UnknownStatus),
        ),
        (
            r#"{"res":{"ret":"OK"},"status":"running"}"#,
            Err(UnknownStatus),
        ),
        (r#"{"res":{"ret":"OK"},"status":true}"#, Err(UnknownStatus)),
        (r#"{"res":{"ret":"OK"},"status":{}}"#, Err(UnknownStatus)),
    ]);
}

#[test]
fn details_quote_plugin_text_short_and_without_control_characters() {
    let long = "A".repeat(10_000);
    let body = format!(r#"{{"ret":0,"status":"{long}\n\u001b[31m"}}"#);
    let err = parse_status(body.as_bytes()).unwrap_err();
    assert_eq!(err.kind, UnknownStatus);
    assert!(
        err.detail.chars().count() < QUOTE_LIMIT + 64,
        "{}",
        err.detail
    );
    assert!(
        !err.detail.chars().any(char::is_control),
        "{:?}",
        err.detail
    );

    let body = r#"{"ret":0,"status":"X\n\u001b[31m"}"#;
    let err = parse_status(body.as_bytes()).unwrap_err();
    assert!(
        !err.detail.chars().any(char::is_control),
        "{:?}",
        err.detail
    );
}

#[test]
fn deeply_nested_json_is_bad_body_not_a_crash() {
    let body = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(kind_of(body.as_bytes()), Err(BadBody));
}

// ---- properties ----

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[A-Z_a-z0-9 ]{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("ACTIVE"),
            Just("RUNNING"),
            Just("OK"),
            Just("UNKNOWN"),
            Just("STOPPED")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("res".to_owned()),
                    Just("ret".to_owned()),
                    Just("status".to_owned()),
                    Just("msg".to_owned()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn v0_status() -> impl Strategy<Value = RouteStatus> {
    prop::sample::select(RouteStatus::ALL.to_vec())
}

/// Extra fields a plugin may add; never `res`, `ret` or `status`.
fn extras() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("x[a-z]{0,6}|msg|tkeel_version", any_json(), 0..4)
        .prop_map(|m| m.into_iter().collect())
}

fn v1_status() -> impl Strategy<Value = (Value, RouteStatus)> {
    prop_oneof![
        Just((json!("RUNNING"), Active)),
        Just((json!(3), Active)),
        Just((json!("WAIT_RUNNING"), Starting)),
        Just((json!(1), Starting)),
        Just((json!("ERR_REGISTER"), Failed)),
        Just((json!(2), Failed)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_panics_on_any_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_status(&body);
    }

    #[test]
    fn never_panics_on_any_json(value in any_json()) {
        let body = value.to_string();
        let result = parse_status(body.as_bytes());
        if !value.is_object() {
            prop_assert_eq!(result.map_err(|e| e.kind), Err(BadBody));
        }
    }

    #[test]
    fn never_panics_on_json_with_corrupted_bytes(
        value in any_json(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut body = value.to_string().into_bytes();
        for (at, byte) in flips {
            if !body.is_empty() {
                let i = at.index(body.len());
                body[i] = byte;
            }
        }
        let _ = parse_status(&body);
    }

    #[test]
    fn valid_v0_bodies_parse_to_their_status(
        status in v0_status(),
        ret in prop_oneof![Just(None), Just(Some(json!(0))), Just(Some(Value::Null))],
        mut fields in extras(),
    ) {
        fields.insert("status".into(), json!(status.as_str()));
        if let Some(ret) = ret {
            fields.insert("ret".into(), ret);
        }
        let body = Value::Object(fields).to_string();
        prop_assert_eq!(parse_status(body.as_bytes()), Ok(status));
    }

    #[test]
    fn v0_bodies_with_nonzero_ret_are_plugin_errors(
        status in v0_status(),
        ret in any::<i64>().prop_filter("non-zero", |r| *r != 0),
        mut fields in extras(),
    ) {
        fields.insert("status".into(), json!(status.as_str()));
        fields.insert("ret".into(), json!(ret));
        let body = Value::Object(fields).to_string();
        prop_assert_eq!(parse_status(body.as_bytes()).map_err(|e| e.kind), Err(PluginError));
    }

    #[test]
    fn valid_v1_bodies_parse_to_the_mapped_status(
        (status, want) in v1_status(),
        ret in prop_oneof![Just(None), Just(Some(json!("OK"))), Just(Some(json!(0))), Just(Some(Value::Null))],
        msg in prop::option::of("[a-z ]{0,10}"),
        with_status in any::<bool>(),
        mut fields in extras(),
    ) {
        let mut res = Map::new();
        if let Some(ret) = ret {
            res.insert("ret".into(), ret);
        }
        if let Some(msg) = msg {
            res.insert("msg".into(), json!(msg));
        }
        fields.insert("res".into(), Value::Object(res));
        if with_status {
            fields.insert("status".into(), status);
            let body = Value::Object(fields).to_string();
            prop_assert_eq!(parse_status(body.as_bytes()), Ok(want));
        } else {
            // No status means UNKNOWN: never a passing route.
            let body = Value::Object(fields).to_string();
            prop_assert_eq!(parse_status(body.as_bytes()).map_err(|e| e.kind), Err(UnknownStatus));
        }
    }

    #[test]
    fn v1_bodies_with_ret_not_ok_are_plugin_errors(
        (status, _) in v1_status(),
        ret in prop_oneof![
            Just(json!("BAD_REQEUST")),
            Just(json!("INTERNAL_ERROR")),
            Just(json!(400)),
            Just(json!(500)),
            any::<i64>().prop_filter("non-zero", |r| *r != 0).prop_map(Value::from),
        ],
        mut fields in extras(),
    ) {
        fields.insert("res".into(), json!({"ret": ret}));
        fields.insert("status".into(), status);
        let body = Value::Object(fields).to_string();
        prop_assert_eq!(parse_status(body.as_bytes()).map_err(|e| e.kind), Err(PluginError));
    }
}
