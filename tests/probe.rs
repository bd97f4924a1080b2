//! The prober against real HTTP servers on loopback (the plugin simulator): every
//! `error_kind`, retries, deadlines, the concurrency bound, connection reuse and where the
//! Dapr API token may go.

use std::time::Duration;

use keel_scraper::probe::{
    ErrorKind, ProbeFailure, ProbeOutcome, ProbeSettings, ProbeSetupError, Prober, BODY_LIMIT,
};
use keel_scraper::secret::Secret;
use keel_scraper::status::RouteStatus;
use keel_test_support::process::{bounded, free_port};
use keel_test_support::sim::{Behavior, PluginSim};
use tokio::time::Instant;

const TOKEN: &str = "tok-3f9c1e-never-print-me";

/// Every test's body runs under this bound, so a hang fails instead of blocking CI.
const TEST_BOUND: Duration = Duration::from_secs(60);

fn settings(template: String) -> ProbeSettings {
    ProbeSettings {
        timeout: Duration::from_secs(3),
        retries: 0,
        concurrency: 8,
        ..ProbeSettings::new(template)
    }
}

fn prober(settings: ProbeSettings) -> Prober {
    Prober::new(settings).expect("valid probe settings")
}

fn sim() -> PluginSim {
    PluginSim::start().expect("the simulator starts")
}

fn failed(outcome: ProbeOutcome) -> ProbeFailure {
    match outcome {
        ProbeOutcome::Failed(failure) => failure,
        other => panic!("expected a failed probe, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_plugins_of_both_generations_are_reported() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("a", Behavior::v0("ACTIVE"));
        sim.set("b", Behavior::v0("STOPPED"));
        sim.set("c", Behavior::v1("RUNNING"));
        sim.set("d", Behavior::v1("WAIT_RUNNING"));
        sim.set("e", Behavior::v1("ERR_REGISTER"));
        let p = prober(settings(sim.url_template()));
        let got = p
            .probe_all(
                &["a", "b", "c", "d", "e"],
                Instant::now() + Duration::from_secs(10),
            )
            .await;
        assert_eq!(
            got,
            [
                ProbeOutcome::Reported(RouteStatus::Active),
                ProbeOutcome::Reported(RouteStatus::Stopped),
                ProbeOutcome::Reported(RouteStatus::Active),
                ProbeOutcome::Reported(RouteStatus::Starting),
                ProbeOutcome::Reported(RouteStatus::Failed),
            ]
        );
        assert_eq!(sim.requests("a"), 1);
        assert_eq!(
            p.probe_one("e").await,
            ProbeOutcome::Reported(RouteStatus::Failed)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_connect_and_is_retried() {
    bounded(TEST_BOUND, async {
        let template = format!("http://127.0.0.1:{}/{{plugin_id}}/v1/status", free_port());
        let p = prober(ProbeSettings {
            retries: 2,
            ..settings(template)
        });
        let f = failed(p.probe_one("a").await);
        assert_eq!(f.kind, ErrorKind::Connect, "{f}");
        assert_eq!(f.attempts, 3);
        assert_eq!(f.http_status, None);
        assert!(
            !f.detail.contains("127.0.0.1"),
            "no URL in details: {}",
            f.detail
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_does_not_resolve_is_connect() {
    bounded(TEST_BOUND, async {
        let p = prober(settings(
            "http://no-such-plugin.invalid:8080/{plugin_id}/v1/status".to_owned(),
        ));
        let f = failed(p.probe_one("a").await);
        assert_eq!(f.kind, ErrorKind::Connect, "{f}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_slower_than_the_timeout_is_timeout_after_every_attempt() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set(
            "slow",
            Behavior::delay(Duration::from_secs(5), Behavior::v0("ACTIVE")),
        );
        let p = prober(ProbeSettings {
            timeout: Duration::from_millis(200),
            retries: 1,
            ..settings(sim.url_template())
        });
        let started = Instant::now();
        let f = failed(p.probe_one("slow").await);
        let took = started.elapsed();
        assert_eq!(f.kind, ErrorKind::Timeout, "{f}");
        assert_eq!(f.attempts, 2);
        assert_eq!(sim.requests("slow"), 2);
        // timeout * (retries + 1) plus one backoff delay of at most 2 * 100 ms.
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(took < Duration::from_millis(400 + 200 + 300), "{took:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_cut_at_the_timeout() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("loris", Behavior::Slowloris);
        let p = prober(ProbeSettings {
            timeout: Duration::from_millis(300),
            ..settings(sim.url_template())
        });
        let started = Instant::now();
        let f = failed(p.probe_one("loris").await);
        assert_eq!(f.kind, ErrorKind::Timeout, "{f}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_goes_away_is_connect_and_can_come_back() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        let addr = sim.addr();
        // One retry: the first attempt may still go out on the pooled keep-alive
        // connection the server just closed (`protocol`); the retry must then find
        // nothing listening.
        let p = prober(ProbeSettings {
            retries: 1,
            ..settings(sim.url_template())
        });
        assert_eq!(
            p.probe_one("a").await,
            ProbeOutcome::Reported(RouteStatus::Active)
        );

        sim.stop().await;
        let f = failed(p.probe_one("a").await);
        assert_eq!(f.kind, ErrorKind::Connect, "{f}");

        let back = PluginSim::start_at(addr).expect("restart on the same port");
        back.set("a", Behavior::v0("STOPPED"));
        assert_eq!(
            p.probe_one("a").await,
            ProbeOutcome::Reported(RouteStatus::Stopped)
        );

        // Dropping the last handle stops the server too.
        let clone = back.clone();
        drop(back);
        assert_eq!(
            p.probe_one("a").await,
            ProbeOutcome::Reported(RouteStatus::Stopped)
        );
        drop(clone);
        // The server task is aborted asynchronously: poll until the port refuses.
        let mut last = None;
        for _ in 0..50 {
            let outcome = p.probe_one("a").await;
            if let ProbeOutcome::Failed(f) = &outcome {
                if f.kind == ErrorKind::Connect {
                    last = None;
                    break;
                }
            }
            last = Some(outcome);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            last, None,
            "the port still answers after the last handle went"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_is_not_http_is_protocol() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("garbage", Behavior::NotHttp);
        let p = prober(settings(sim.url_template()));
        let f = failed(p.probe_one("garbage").await);
        assert_eq!(f.kind, ErrorKind::Protocol, "{f}");
        assert_eq!(f.http_status, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_connection_is_protocol_and_is_retried() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("reset", Behavior::Reset);
        let p = prober(ProbeSettings {
            retries: 1,
            ..settings(sim.url_template())
        });
        let f = failed(p.probe_one("reset").await);
        assert_eq!(f.kind, ErrorKind::Protocol, "{f}");
        assert_eq!(f.attempts, 2);
        assert_eq!(sim.requests("reset"), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_is_protocol() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("cut", Behavior::Truncated);
        let p = prober(settings(sim.url_template()));
        let f = failed(p.probe_one("cut").await);
        assert_eq!(f.kind, ErrorKind::Protocol, "{f}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_2xx_is_http_status_and_only_5xx_is_retried() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("missing", Behavior::Unknown404);
        sim.set("unavailable", Behavior::raw(503, "{}"));
        sim.set("busy", Behavior::raw(429, ""));
        let p = prober(ProbeSettings {
            retries: 2,
            ..settings(sim.url_template())
        });

        let f = failed(p.probe_one("missing").await);
        assert_eq!(
            (f.kind, f.http_status, f.attempts),
            (ErrorKind::HttpStatus, Some(404), 1)
        );
        assert_eq!(sim.requests("missing"), 1);

        let f = failed(p.probe_one("unavailable").await);
        assert_eq!(
            (f.kind, f.http_status, f.attempts),
            (ErrorKind::HttpStatus, Some(503), 3)
        );
        assert_eq!(sim.requests("unavailable"), 3);

        let f = failed(p.probe_one("busy").await);
        assert_eq!(
            (f.kind, f.http_status, f.attempts),
            (ErrorKind::HttpStatus, Some(429), 3)
        );
        assert_eq!(sim.requests("busy"), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_is_http_status_and_is_not_followed() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("loop", Behavior::RedirectLoop);
        let p = prober(ProbeSettings {
            retries: 2,
            ..settings(sim.url_template())
        });
        let f = failed(p.probe_one("loop").await);
        assert_eq!(
            (f.kind, f.http_status),
            (ErrorKind::HttpStatus, Some(302)),
            "{f}"
        );
        assert_eq!(
            sim.requests("loop"),
            1,
            "redirects are neither followed nor retried"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_body_is_too_large_without_being_read() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("huge", Behavior::Huge(10 * 1024 * 1024));
        let p = prober(ProbeSettings {
            timeout: Duration::from_secs(20),
            retries: 2,
            ..settings(sim.url_template())
        });
        let started = Instant::now();
        let f = failed(p.probe_one("huge").await);
        assert_eq!(f.kind, ErrorKind::TooLarge, "{f}");
        assert_eq!(f.attempts, 1, "too_large is not retried");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

/// A `{"status":"ACTIVE","pad":"xx..."}` body of exactly `len` bytes.
fn padded_body(len: usize) -> Vec<u8> {
    let head = br#"{"status":"ACTIVE","pad":""#;
    let tail = br#""}"#;
    let mut body = head.to_vec();
    body.resize(len - tail.len(), b'x');
    body.extend_from_slice(tail);
    assert_eq!(body.len(), len);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_cap_is_exactly_64_kib() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("at-limit", Behavior::raw(200, padded_body(BODY_LIMIT)));
        sim.set(
            "over-limit",
            Behavior::raw(200, padded_body(BODY_LIMIT + 1)),
        );
        let p = prober(settings(sim.url_template()));
        assert_eq!(
            p.probe_one("at-limit").await,
            ProbeOutcome::Reported(RouteStatus::Active)
        );
        let f = failed(p.probe_one("over-limit").await);
        assert_eq!(f.kind, ErrorKind::TooLarge, "{f}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_json_objects_are_bad_body_and_not_retried() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("utf8", Behavior::InvalidUtf8);
        sim.set("array", Behavior::raw(200, r#"[{"status":"ACTIVE"}]"#));
        sim.set("text", Behavior::raw(200, "ACTIVE"));
        let p = prober(ProbeSettings {
            retries: 2,
            ..settings(sim.url_template())
        });
        for id in ["utf8", "array", "text"] {
            let f = failed(p.probe_one(id).await);
            assert_eq!(f.kind, ErrorKind::BadBody, "{id}: {f}");
            assert_eq!(f.attempts, 1, "{id}");
            assert_eq!(sim.requests(id), 1, "{id}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_reporting_an_error_is_plugin_error() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set(
            "v0",
            Behavior::raw(200, r#"{"ret":3,"msg":"db down","status":"ACTIVE"}"#),
        );
        sim.set(
            "v1",
            Behavior::raw(
                200,
                r#"{"res":{"ret":"INTERNAL_ERROR"},"status":"RUNNING"}"#,
            ),
        );
        let p = prober(ProbeSettings {
            retries: 1,
            ..settings(sim.url_template())
        });
        for id in ["v0", "v1"] {
            let f = failed(p.probe_one(id).await);
            assert_eq!(
                (f.kind, f.attempts),
                (ErrorKind::PluginError, 1),
                "{id}: {f}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_outside_the_vocabulary_is_unknown_status() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("v0", Behavior::v0("WEIRD"));
        sim.set("v1", Behavior::v1("UNKNOWN"));
        sim.set("v1-number", Behavior::raw(200, r#"{"res":{},"status":9}"#));
        let p = prober(settings(sim.url_template()));
        for id in ["v0", "v1", "v1-number"] {
            let f = failed(p.probe_one(id).await);
            assert_eq!(f.kind, ErrorKind::UnknownStatus, "{id}: {f}");
        }
    })
    .await;
}

const DAPR_ERROR: &str = r#"{"errorCode":"ERR_DIRECT_INVOKE","message":"fail to invoke, id: a, err: connection refused"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_error_is_sidecar_invoke_in_dapr_mode_and_is_retried() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("a", Behavior::raw(500, DAPR_ERROR));
        let p = prober(ProbeSettings {
            dapr_invoke: true,
            retries: 1,
            ..settings(sim.url_template())
        });
        let f = failed(p.probe_one("a").await);
        assert_eq!(f.kind, ErrorKind::SidecarInvoke, "{f}");
        assert_eq!(f.dapr_error_code.as_deref(), Some("ERR_DIRECT_INVOKE"));
        assert_eq!(f.http_status, Some(500));
        assert_eq!(f.attempts, 2);
        assert_eq!(sim.requests("a"), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_500_is_http_status_when_not_going_through_dapr() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("a", Behavior::raw(500, DAPR_ERROR));
        let p = prober(settings(sim.url_template()));
        let f = failed(p.probe_one("a").await);
        assert_eq!(
            (f.kind, f.http_status),
            (ErrorKind::HttpStatus, Some(500)),
            "{f}"
        );
        assert_eq!(f.dapr_error_code, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_dapr_mode_only_a_500_with_an_err_code_is_the_sidecars() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set("plain", Behavior::raw(500, "internal error"));
        sim.set("other-code", Behavior::raw(500, r#"{"errorCode":"OOPS"}"#));
        sim.set("not-object", Behavior::raw(500, r#"["ERR_DIRECT_INVOKE"]"#));
        sim.set("code-as-number", Behavior::raw(500, r#"{"errorCode":5}"#));
        sim.set("503", Behavior::raw(503, DAPR_ERROR));
        let p = prober(ProbeSettings {
            dapr_invoke: true,
            ..settings(sim.url_template())
        });
        for (id, code) in [
            ("plain", 500),
            ("other-code", 500),
            ("not-object", 500),
            ("code-as-number", 500),
            ("503", 503),
        ] {
            let f = failed(p.probe_one(id).await);
            assert_eq!(
                (f.kind, f.http_status),
                (ErrorKind::HttpStatus, Some(code)),
                "{id}: {f}"
            );
            assert_eq!(f.dapr_error_code, None, "{id}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_in_flight_never_exceed_the_concurrency() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set_default(Behavior::delay(
            Duration::from_millis(40),
            Behavior::v0("ACTIVE"),
        ));
        let p = prober(ProbeSettings {
            concurrency: 6,
            ..settings(sim.url_template())
        });
        let ids: Vec<String> = (0..60).map(|i| format!("p{i}")).collect();
        let got = p
            .probe_all(&ids, Instant::now() + Duration::from_secs(30))
            .await;
        assert!(got
            .iter()
            .all(|o| *o == ProbeOutcome::Reported(RouteStatus::Active)));
        assert_eq!(sim.total_requests(), 60);
        let max = sim.max_in_flight();
        assert!(max <= 6, "{max} in flight with concurrency 6");
        assert!(max >= 3, "probes ran concurrently ({max} at most)");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_across_probes_and_calls() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        let p = prober(ProbeSettings {
            concurrency: 4,
            ..settings(sim.url_template())
        });
        let ids: Vec<String> = (0..200).map(|i| format!("p{i}")).collect();
        let got = p
            .probe_all(&ids, Instant::now() + Duration::from_secs(30))
            .await;
        assert!(got
            .iter()
            .all(|o| *o == ProbeOutcome::Reported(RouteStatus::Active)));
        let first = sim.connections();
        assert!(
            first <= 8,
            "200 probes at concurrency 4 opened {first} connections"
        );
        p.probe_all(&ids, Instant::now() + Duration::from_secs(30))
            .await;
        let second = sim.connections();
        assert!(
            second <= 8,
            "a second round opened new connections: {second} in total"
        );
        assert_eq!(sim.total_requests(), 400);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_probes_reuse_one_or_two_connections() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        let p = prober(settings(sim.url_template()));
        for i in 0..100 {
            let outcome = p.probe_one(&format!("p{i}")).await;
            assert_eq!(outcome, ProbeOutcome::Reported(RouteStatus::Active));
        }
        let opened = sim.connections();
        assert!(
            opened <= 3,
            "100 sequential probes opened {opened} connections"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_idle_connection_is_kept_when_every_plugin_is_its_own_host() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        // The id lands in the authority (here: the host), so each plugin is a host.
        let template = format!("http://{{plugin_id}}:{}/x/v1/status", sim.addr().port());
        let p = prober(settings(template));
        for _ in 0..5 {
            assert_eq!(
                p.probe_one("127.0.0.1").await,
                ProbeOutcome::Reported(RouteStatus::Active)
            );
        }
        assert_eq!(sim.requests("x"), 5);
        assert_eq!(sim.connections(), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_to_the_sidecar_origin() {
    bounded(TEST_BOUND, async {
        let sidecar = sim();
        sidecar.record_requests(true);
        let p = prober(ProbeSettings {
            dapr_api_token: Some(Secret::new(TOKEN)),
            sidecar_origin: Some(sidecar.origin()),
            ..settings(sidecar.url_template())
        });
        assert_eq!(
            p.probe_one("a").await,
            ProbeOutcome::Reported(RouteStatus::Active)
        );
        let seen = sidecar.recorded();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].header("dapr-api-token"), Some(TOKEN));

        // The origin may be given without a scheme, as DAPR_HTTP_ENDPOINT allows.
        sidecar.clear_recorded();
        let p = prober(ProbeSettings {
            dapr_api_token: Some(Secret::new(TOKEN)),
            sidecar_origin: Some(sidecar.addr().to_string()),
            ..settings(sidecar.url_template())
        });
        p.probe_one("a").await;
        assert_eq!(sidecar.recorded()[0].header("dapr-api-token"), Some(TOKEN));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_goes_to_another_origin() {
    bounded(TEST_BOUND, async {
        let sidecar = sim();
        let elsewhere = sim();
        elsewhere.record_requests(true);
        // Same host and scheme, another port: another origin.
        let p = prober(ProbeSettings {
            dapr_api_token: Some(Secret::new(TOKEN)),
            sidecar_origin: Some(sidecar.origin()),
            retries: 1,
            ..settings(elsewhere.url_template())
        });
        elsewhere.set("b", Behavior::raw(503, ""));
        p.probe_one("a").await;
        p.probe_one("b").await;
        let seen = elsewhere.recorded();
        assert_eq!(seen.len(), 3, "one probe and two attempts");
        for request in &seen {
            assert_eq!(request.header("dapr-api-token"), None, "{request:?}");
            assert!(
                !request.headers.iter().any(|(_, v)| v.contains(TOKEN)),
                "{request:?}"
            );
        }
        assert_eq!(sidecar.total_requests(), 0);

        // A token without a known sidecar origin goes nowhere.
        elsewhere.clear_recorded();
        let p = prober(ProbeSettings {
            dapr_api_token: Some(Secret::new(TOKEN)),
            sidecar_origin: None,
            ..settings(elsewhere.url_template())
        });
        p.probe_one("a").await;
        assert_eq!(elsewhere.recorded()[0].header("dapr-api-token"), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_appears_in_failures_or_debug_output() {
    bounded(TEST_BOUND, async {
        let sidecar = sim();
        sidecar.set("sidecar-error", Behavior::raw(500, DAPR_ERROR));
        sidecar.set("down", Behavior::raw(503, TOKEN));
        sidecar.set("garbage", Behavior::NotHttp);
        let settings = ProbeSettings {
            dapr_api_token: Some(Secret::new(TOKEN)),
            sidecar_origin: Some(sidecar.origin()),
            dapr_invoke: true,
            ..settings(sidecar.url_template())
        };
        assert!(!format!("{settings:?}").contains(TOKEN));
        let p = prober(settings);
        assert!(!format!("{p:?}").contains(TOKEN));
        let mut outcomes = Vec::new();
        for id in ["sidecar-error", "down", "garbage"] {
            outcomes.push(p.probe_one(id).await);
        }
        for outcome in &outcomes {
            assert!(matches!(outcome, ProbeOutcome::Failed(_)), "{outcome:?}");
            let f = failed(outcome.clone());
            assert!(!format!("{outcome:?} {f}").contains(TOKEN), "{outcome:?}");
        }

        let closed = format!("http://127.0.0.1:{}", free_port());
        let p = prober(ProbeSettings {
            dapr_api_token: Some(Secret::new(TOKEN)),
            sidecar_origin: Some(closed.clone()),
            ..ProbeSettings::new(format!("{closed}/{{plugin_id}}/v1/status"))
        });
        let outcome = p.probe_one("a").await;
        assert!(!format!("{outcome:?}").contains(TOKEN));

        let err = Prober::new(ProbeSettings {
            dapr_api_token: Some(Secret::new(format!("{TOKEN}\n"))),
            sidecar_origin: Some(closed),
            ..ProbeSettings::new(sidecar.url_template())
        })
        .unwrap_err();
        assert!(matches!(err, ProbeSetupError::InvalidToken));
        assert!(!format!("{err} {err:?}").contains(TOKEN));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_cut_by_the_deadline_is_cut_off_not_failed() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        sim.set(
            "slow",
            Behavior::delay(Duration::from_secs(10), Behavior::v0("ACTIVE")),
        );
        sim.set("flaky", Behavior::raw(503, ""));
        let p = prober(ProbeSettings {
            timeout: Duration::from_secs(20),
            retries: 3,
            ..settings(sim.url_template())
        });
        let started = Instant::now();
        let got = p
            .probe_all(&["slow", "a"], Instant::now() + Duration::from_millis(300))
            .await;
        assert_eq!(
            got,
            [
                ProbeOutcome::CutOff,
                ProbeOutcome::Reported(RouteStatus::Active)
            ]
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );

        // A retry that cannot happen before the deadline: the probe did not run its
        // course, so it is no observation either.
        let got = p
            .probe_one_until("flaky", Instant::now() + Duration::from_millis(15))
            .await;
        assert_eq!(got, ProbeOutcome::CutOff);
        assert_eq!(sim.requests("flaky"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_not_started_by_the_deadline_send_nothing() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        let p = prober(settings(sim.url_template()));
        let got = p.probe_all(&["a", "b", "c"], Instant::now()).await;
        assert_eq!(got, vec![ProbeOutcome::CutOff; 3]);
        assert_eq!(sim.total_requests(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_plugins_fewer_than_the_concurrency_do_not_hold_up_the_others() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        let slow = ["p10", "p50", "p90"];
        for id in slow {
            sim.set(
                id,
                Behavior::delay(Duration::from_secs(30), Behavior::v0("ACTIVE")),
            );
        }
        // The others answer in 5 ms each: 300 of them through 8 slots take ~0.2 s.
        sim.set_default(Behavior::delay(
            Duration::from_millis(5),
            Behavior::v0("ACTIVE"),
        ));
        let timeout = Duration::from_millis(500);
        let p = prober(ProbeSettings {
            timeout,
            retries: 1,
            concurrency: 8,
            ..settings(sim.url_template())
        });
        let ids: Vec<String> = (0..300).map(|i| format!("p{i}")).collect();
        let started = Instant::now();
        let got = p
            .probe_all_timed(&ids, Instant::now() + Duration::from_secs(30))
            .await;
        let took = started.elapsed();
        for (id, (outcome, _)) in ids.iter().zip(&got) {
            if slow.contains(&id.as_str()) {
                let f = failed(outcome.clone());
                assert_eq!((f.kind, f.attempts), (ErrorKind::Timeout, 2), "{id}");
            } else {
                assert_eq!(
                    *outcome,
                    ProbeOutcome::Reported(RouteStatus::Active),
                    "{id}"
                );
            }
        }
        // timeout * (retries + 1) + 0.5 s, as the performance target says.
        assert!(took < timeout * 2 + Duration::from_millis(500), "{took:?}");
        let slowest_fast = ids
            .iter()
            .zip(&got)
            .filter(|(id, _)| !slow.contains(&id.as_str()))
            .map(|(_, (_, d))| *d)
            .max()
            .unwrap_or_default();
        assert!(slowest_fast < timeout, "{slowest_fast:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_come_back_in_the_order_of_the_ids() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        let statuses = ["ACTIVE", "STOPPED", "STARTING", "FAILED", "STOPPING"];
        let mut ids = Vec::new();
        let mut want = Vec::new();
        for i in 0..40u64 {
            let id = format!("p{i}");
            let status = statuses[(i % 5) as usize];
            // Later ids answer sooner, so completion order is the reverse of id order.
            sim.set(
                id.clone(),
                Behavior::delay(Duration::from_millis(80 - 2 * i), Behavior::v0(status)),
            );
            ids.push(id);
            want.push(ProbeOutcome::Reported(
                RouteStatus::from_route_str(status).expect("a route status"),
            ));
        }
        let p = prober(ProbeSettings {
            concurrency: 10,
            ..settings(sim.url_template())
        });
        let got = p
            .probe_all(&ids, Instant::now() + Duration::from_secs(30))
            .await;
        assert_eq!(got, want);
    })
    .await;
}

#[test]
fn settings_the_prober_refuses() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ok = "http://127.0.0.1:3500/v1.0/invoke/{plugin_id}/method/v1/status";
        let refuse = |s: ProbeSettings| Prober::new(s).expect_err("refused");
        assert!(matches!(
            refuse(ProbeSettings::new("http://127.0.0.1:3500/v1/status")),
            ProbeSetupError::MissingPlaceholder
        ));
        assert!(matches!(
            refuse(ProbeSettings::new(
                "https://example.com/{plugin_id}/v1/status"
            )),
            ProbeSetupError::UnsupportedScheme(_)
        ));
        assert!(matches!(
            refuse(ProbeSettings::new("not a url {plugin_id}")),
            ProbeSetupError::InvalidTemplate(_)
        ));
        assert!(matches!(
            refuse(ProbeSettings {
                concurrency: 0,
                ..ProbeSettings::new(ok)
            }),
            ProbeSetupError::ZeroConcurrency
        ));
        assert!(matches!(
            refuse(ProbeSettings {
                timeout: Duration::ZERO,
                ..ProbeSettings::new(ok)
            }),
            ProbeSetupError::ZeroTimeout
        ));
        assert!(matches!(
            refuse(ProbeSettings {
                sidecar_origin: Some("https://127.0.0.1:3500".into()),
                ..ProbeSettings::new(ok)
            }),
            ProbeSetupError::InvalidSidecarOrigin(_)
        ));
        assert!(Prober::new(ProbeSettings::new(ok)).is_ok());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prober_can_be_shared_across_spawned_tasks() {
    bounded(TEST_BOUND, async {
        let sim = sim();
        let p = std::sync::Arc::new(prober(settings(sim.url_template())));
        let ids: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let p = std::sync::Arc::clone(&p);
                let ids = ids.clone();
                tokio::spawn(async move { p.probe_all(&ids, deadline).await })
            })
            .collect();
        for task in tasks {
            let got = task.await.expect("the task completes");
            assert_eq!(got, vec![ProbeOutcome::Reported(RouteStatus::Active); 10]);
        }
        assert_eq!(sim.total_requests(), 30);
    })
    .await;
}
