//! Scenario 9 of the reliability suite: what must hold for *every* input, checked with
//! `proptest`.
//!
//! * The status parser never panics on any bytes; it accepts only UTF-8 JSON objects,
//!   fails with one of its three kinds, and its error detail stays short and free of
//!   control characters whatever the plugin sent (no log forging). Well-formed v0 and v1
//!   bodies parse to the status they carry.
//! * A route rewrite keeps every member of any JSON object: the output is the input with
//!   only `status` replaced, member for member and byte for byte; anything that is not an
//!   object with a string `status` is refused, never rewritten.
//! * The status decision never lets traffic through to a plugin whose last
//!   `--unhealthy-threshold` probes failed, whatever came before, whatever the thresholds
//!   and whatever status the route had; a failed probe never opens the gate; a blocking
//!   report closes it at once; reopening takes `--healthy-threshold` passing reports.
//! * Any registry id the worker accepts fills exactly one path segment of the status URL.

use keel_scraper::decision::{decide, Counters, Observation, Thresholds};
use keel_scraper::registry::invalid_id_reason;
use keel_scraper::route::{read_status, rewrite_status};
use keel_scraper::status::{parse_status, status_str_passes_gate, ErrorKind, RouteStatus};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// `cases` per property; failures are reported with their minimal input, not saved into
/// the source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------

/// Strings that stress escaping: quotes, backslashes, control characters, non-ASCII,
/// astral-plane characters, and plain ones.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_]{0,12}",
        "\\PC{0,24}",
        prop::collection::vec(any::<char>(), 0..16).prop_map(|v| v.into_iter().collect()),
        Just("\"\\/\u{0}\u{1f}\u{7f}\u{2028}😀".to_owned()),
    ]
}

fn any_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        Just(json!(0)),
        Just(json!(0.0)),
        Just(json!(-0.0)),
        Just(json!(3e0)),
        Just(json!(1.5)),
    ]
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any_number(),
        any_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any_text(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A value for a field of a status body: mostly of the expected shapes, sometimes not.
fn field(known: &'static [&'static str]) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => prop::sample::select(known).prop_map(|s| Some(Value::String(s.to_owned()))),
        2 => (-2i64..600).prop_map(|n| Some(json!(n))),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => any_json().prop_map(Some),
    ]
}

/// Bodies shaped like `/v1/status` answers of both generations, well-formed or not.
fn status_body() -> impl Strategy<Value = Value> {
    const V0: &[&str] = &[
        "STARTING", "ACTIVE", "STOPPING", "STOPPED", "FAILED", "active", "",
    ];
    const V1: &[&str] = &[
        "UNKNOWN",
        "WAIT_RUNNING",
        "ERR_REGISTER",
        "RUNNING",
        "running",
    ];
    const RET: &[&str] = &["OK", "BAD_REQEUST", "INTERNAL_ERROR", "ok", "0"];
    (
        any::<bool>(),
        field(RET),
        field(V0),
        field(V1),
        prop::option::of(any_text()),
        prop::collection::vec((any_text(), any_json()), 0..3),
    )
        .prop_map(|(v1, ret, v0_status, v1_status, msg, extra)| {
            let mut body: Map<String, Value> = extra.into_iter().collect();
            if v1 {
                let mut res = Map::new();
                if let Some(r) = ret {
                    res.insert("ret".into(), r);
                }
                if let Some(m) = &msg {
                    res.insert("msg".into(), Value::String(m.clone()));
                }
                body.insert("res".into(), Value::Object(res));
                match v1_status {
                    Some(s) => body.insert("status".into(), s),
                    None => body.remove("status"),
                };
            } else {
                body.remove("res");
                match ret {
                    Some(r) => body.insert("ret".into(), r),
                    None => body.remove("ret"),
                };
                if let Some(m) = &msg {
                    body.insert("msg".into(), Value::String(m.clone()));
                }
                match v0_status {
                    Some(s) => body.insert("status".into(), s),
                    None => body.remove("status"),
                };
            }
            Value::Object(body)
        })
}

fn any_route_status() -> impl Strategy<Value = RouteStatus> {
    prop::sample::select(RouteStatus::ALL.to_vec())
}

/// A route's stored status: the vocabulary, and strings outside it (a newer tKeel, a typo).
fn any_stored_status() -> impl Strategy<Value = String> {
    prop_oneof![
        any_route_status().prop_map(|s| s.as_str().to_owned()),
        Just(String::new()),
        Just("active".to_owned()),
        any_text(),
    ]
}

fn any_observation() -> impl Strategy<Value = Observation> {
    prop_oneof![
        2 => Just(Observation::ProbeFailed),
        3 => any_route_status().prop_map(Observation::Reported),
    ]
}

// ---------------------------------------------------------------------------------------
// The status parser
// ---------------------------------------------------------------------------------------

/// What every parse result must satisfy, whatever the input.
fn check_parse(body: &[u8]) -> Result<(), TestCaseError> {
    match parse_status(body) {
        Ok(_) => {
            let v: Value = serde_json::from_slice(body).map_err(|e| {
                TestCaseError::fail(format!("accepted a body that is not JSON: {e}"))
            })?;
            prop_assert!(v.is_object(), "accepted a body that is not an object: {v}");
        }
        Err(e) => {
            prop_assert!(
                matches!(
                    e.kind,
                    ErrorKind::BadBody | ErrorKind::PluginError | ErrorKind::UnknownStatus
                ),
                "parse error of a transport kind: {:?}",
                e.kind
            );
            prop_assert!(
                !e.detail.chars().any(char::is_control),
                "control characters reach the log through the detail: {:?}",
                e.detail
            );
            prop_assert!(
                e.detail.chars().count() <= 300,
                "a plugin inflates the detail to {} characters",
                e.detail.chars().count()
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn the_status_parser_never_panics_on_any_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_parse(&body)?;
    }

    #[test]
    fn the_status_parser_never_panics_on_status_shaped_bodies(
        body in status_body(),
        pretty in any::<bool>(),
        cut in prop::option::of(any::<prop::sample::Index>()),
        flip in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
    ) {
        let mut bytes = if pretty {
            serde_json::to_vec_pretty(&body).unwrap_or_default()
        } else {
            serde_json::to_vec(&body).unwrap_or_default()
        };
        check_parse(&bytes)?;
        if let Some((at, byte)) = flip {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
                check_parse(&bytes)?;
            }
        }
        if let Some(at) = cut {
            if !bytes.is_empty() {
                bytes.truncate(at.index(bytes.len()));
                check_parse(&bytes)?;
            }
        }
    }

    #[test]
    fn well_formed_bodies_parse_to_the_status_they_carry(
        status in any_route_status(),
        v1_by_number in any::<bool>(),
        msg in any_text(),
        extra in prop::collection::vec(("x_[a-z]{1,6}", any_json()), 0..3),
    ) {
        let mut v0: Map<String, Value> = extra.iter().cloned().collect();
        v0.insert("ret".into(), json!(0));
        v0.insert("msg".into(), Value::String(msg.clone()));
        v0.insert("status".into(), Value::String(status.as_str().to_owned()));
        prop_assert_eq!(parse_status(Value::Object(v0).to_string().as_bytes()), Ok(status));

        let v1 = match status {
            RouteStatus::Active => Some(("RUNNING", 3)),
            RouteStatus::Starting => Some(("WAIT_RUNNING", 1)),
            RouteStatus::Failed => Some(("ERR_REGISTER", 2)),
            RouteStatus::Stopping | RouteStatus::Stopped => None,
        };
        if let Some((name, number)) = v1 {
            let mut body: Map<String, Value> = extra.into_iter().collect();
            body.insert("res".into(), json!({"ret": "OK", "msg": msg}));
            body.insert(
                "status".into(),
                if v1_by_number { json!(number) } else { json!(name) },
            );
            prop_assert_eq!(parse_status(Value::Object(body).to_string().as_bytes()), Ok(status));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Route rewrites
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn a_rewrite_keeps_every_member_of_any_route(
        members in prop::collection::vec((any_text(), any_json()), 0..8),
        stored in any_text(),
        new in any_route_status(),
        pretty in any::<bool>(),
    ) {
        let mut route: Map<String, Value> = members.into_iter().collect();
        route.insert("status".into(), Value::String(stored));
        let input = if pretty {
            serde_json::to_string_pretty(&route).unwrap_or_default()
        } else {
            serde_json::to_string(&route).unwrap_or_default()
        };
        let output = rewrite_status(input.as_bytes(), new)
            .map_err(|e| TestCaseError::fail(format!("refused a valid route: {e}\n{input}")))?;
        let mut expected = route.clone();
        expected.insert("status".into(), Value::String(new.as_str().to_owned()));
        if pretty {
            // Compare what a reader sees in both texts (numbers go through the same parse).
            let mut want: Value = serde_json::from_str(&input)
                .map_err(|e| TestCaseError::fail(format!("the input is not JSON: {e}")))?;
            want["status"] = Value::String(new.as_str().to_owned());
            let got: Value = serde_json::from_slice(&output)
                .map_err(|e| TestCaseError::fail(format!("the rewrite is not JSON: {e}")))?;
            prop_assert_eq!(got, want);
        } else {
            // Member for member, byte for byte: only the status text differs.
            prop_assert_eq!(
                String::from_utf8_lossy(&output),
                serde_json::to_string(&expected).unwrap_or_default()
            );
        }
        prop_assert_eq!(read_status(&output), Ok(new.as_str().to_owned()));
    }

    #[test]
    fn anything_but_a_route_is_refused_not_rewritten(value in any_json(), new in any_route_status()) {
        let input = value.to_string();
        let has_string_status = value.get("status").is_some_and(Value::is_string);
        let result = rewrite_status(input.as_bytes(), new);
        prop_assert_eq!(result.is_ok(), value.is_object() && has_string_status, "{}", input);
    }

    #[test]
    fn rewrites_never_panic_on_any_bytes(
        body in prop::collection::vec(any::<u8>(), 0..256),
        new in any_route_status(),
    ) {
        if let Ok(out) = rewrite_status(&body, new) {
            prop_assert!(read_status(&body).is_ok(), "rewrote something that is not a route");
            let v: Value = serde_json::from_slice(&out)
                .map_err(|e| TestCaseError::fail(format!("the rewrite is not JSON: {e}")))?;
            prop_assert!(v.is_object());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The status decision
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn the_gate_stays_shut_after_unhealthy_threshold_failed_probes(
        start in any_stored_status(),
        failures in 0u32..10,
        passing in 0u32..10,
        unhealthy in 1u32..6,
        healthy in 1u32..6,
        history in prop::collection::vec(any_observation(), 0..40),
    ) {
        let th = Thresholds { unhealthy, healthy };
        let mut status = start;
        let mut counters = Counters { failures, passing_reports: passing };
        let mut failed_in_a_row = 0u32;
        for obs in history {
            let was_passing = status_str_passes_gate(&status);
            let d = decide(&status, counters, obs, th);
            if let Some((s, _)) = d.write {
                prop_assert_ne!(s.as_str(), status.as_str(), "a write that changes nothing");
                if obs == Observation::ProbeFailed {
                    prop_assert!(!s.passes_gate(), "a failed probe opened the gate ({} -> {})", status, s);
                }
                if !was_passing && s.passes_gate() {
                    prop_assert!(
                        matches!(obs, Observation::Reported(r) if r.passes_gate()),
                        "the gate opened without a passing report"
                    );
                }
                status = s.as_str().to_owned();
            }
            if let Observation::Reported(r) = obs {
                if !r.passes_gate() {
                    prop_assert_eq!(status.as_str(), r.as_str(), "a blocking report was not applied at once");
                }
            }
            counters = d.counters;
            failed_in_a_row = if obs == Observation::ProbeFailed { failed_in_a_row + 1 } else { 0 };
            if failed_in_a_row >= unhealthy {
                prop_assert!(
                    !status_str_passes_gate(&status),
                    "traffic passes ({}) after {} failed probes in a row (threshold {})",
                    status, failed_in_a_row, unhealthy
                );
            }
        }
    }

    #[test]
    fn reopening_the_gate_takes_healthy_threshold_passing_reports(
        blocked in prop::sample::select(vec!["STOPPING", "STOPPED", "FAILED", "", "UNKNOWN"]),
        unhealthy in 1u32..6,
        healthy in 1u32..6,
        history in prop::collection::vec(any_observation(), 0..40),
    ) {
        let th = Thresholds { unhealthy, healthy };
        let mut status = blocked.to_owned();
        let mut counters = Counters::default();
        let mut passing_in_a_row = 0u32;
        for obs in history {
            let was_passing = status_str_passes_gate(&status);
            let d = decide(&status, counters, obs, th);
            passing_in_a_row = match obs {
                Observation::Reported(r) if r.passes_gate() && !was_passing => passing_in_a_row + 1,
                _ => 0,
            };
            if let Some((s, _)) = d.write {
                if !was_passing && s.passes_gate() {
                    prop_assert!(
                        passing_in_a_row >= healthy,
                        "reopened after {} passing reports (threshold {})",
                        passing_in_a_row,
                        healthy
                    );
                    passing_in_a_row = 0;
                }
                status = s.as_str().to_owned();
            }
            counters = d.counters;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Registry ids in URLs
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn an_accepted_id_fills_exactly_one_path_segment(
        id in prop_oneof![
            "[a-zA-Z0-9_-]{1,70}",
            "\\PC{0,20}",
            prop::collection::vec(prop::sample::select(vec!['a', '.', '/', '%', '?', '#', ' ', '\\', '-', '_', '\n', 'é']), 0..12)
                .prop_map(|v| v.into_iter().collect::<String>()),
        ],
    ) {
        let template = "http://127.0.0.1:3500/v1.0/invoke/{plugin_id}/method/v1/status";
        if invalid_id_reason(&id).is_none() {
            let url = reqwest::Url::parse(&template.replace("{plugin_id}", &id))
                .map_err(|e| TestCaseError::fail(format!("{id:?}: {e}")))?;
            prop_assert_eq!(url.host_str(), Some("127.0.0.1"));
            prop_assert_eq!(url.port(), Some(3500));
            prop_assert_eq!(url.query(), None);
            prop_assert_eq!(url.fragment(), None);
            let segments: Vec<&str> = url.path_segments().map(Iterator::collect).unwrap_or_default();
            prop_assert_eq!(segments, vec!["v1.0", "invoke", id.as_str(), "method", "v1", "status"]);
            prop_assert!(!id.contains('.'), "a '.' names another namespace in Dapr: {:?}", id);
        }
    }
}
