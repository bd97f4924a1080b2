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

/// `p0`, `p1`, ... `p{n-1}`.
fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("p{i}")).collect()
}

/// Probes `ids` (a 30 s deadline) and checks every one was reported ACTIVE.
async fn all_active(p: &Prober, ids: &[String]) {
    let got = p
        .probe_all(ids, Instant::now() + Duration::from_secs(30))
        .await;
    assert!(
        got.iter()
            .all(|o| *o == ProbeOutcome::Reported(RouteStatus::Active)),
        "{got:?}"
    );
}

fn failed(outcome: ProbeOutcome) -> ProbeFailure {
    match outcome {
        ProbeOutcome::Failed(failure) => *failure,
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

const DAPR_ERROR: &str = r#"{"errorCode":"ERR_DIRECT_INVOKE","message":"fail to invoke, id: a, err: connection refused"}"#;

/// One way a probe fails: the plugin's behaviour, the prober's settings, and what the
/// failure must be. Only what a case names is checked (`None`: not checked).
struct Failing {
    /// The plugin id it is served under (and the case's name in messages).
    id: &'static str,
    behavior: Behavior,
    /// A status URL template of its own (a closed port, a name that does not resolve)
    /// instead of the simulator's.
    template: Option<String>,
    retries: u32,
    timeout: Duration,
    dapr_invoke: bool,
    kind: ErrorKind,
    /// `Some(None)`: the failure carries no HTTP status.
    http_status: Option<Option<u16>>,
    attempts: Option<u32>,
    /// Requests the plugin received.
    requests: Option<u64>,
    /// `Some(None)`: the failure carries no Dapr error code.
    dapr_error_code: Option<Option<&'static str>>,
    /// How long the probe may take.
    took: Option<std::ops::Range<Duration>>,
    /// Text the failure's detail must not contain.
    detail_without: Option<&'static str>,
}

/// Probing `id` with `behavior` fails with `kind` (no retries, the default timeout).
fn failing(id: &'static str, behavior: Behavior, kind: ErrorKind) -> Failing {
    Failing {
        id,
        behavior,
        template: None,
        retries: 0,
        timeout: settings(String::new()).timeout,
        dapr_invoke: false,
        kind,
        http_status: None,
        attempts: None,
        requests: None,
        dapr_error_code: None,
        took: None,
        detail_without: None,
    }
}

impl Failing {
    fn template(mut self, template: String) -> Self {
        self.template = Some(template);
        self
    }
    fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
    fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    fn dapr_invoke(mut self) -> Self {
        self.dapr_invoke = true;
        self
    }
    fn http_status(mut self, status: Option<u16>) -> Self {
        self.http_status = Some(status);
        self
    }
    fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }
    fn requests(mut self, requests: u64) -> Self {
        self.requests = Some(requests);
        self
    }
    fn dapr_error_code(mut self, code: Option<&'static str>) -> Self {
        self.dapr_error_code = Some(code);
        self
    }
    fn took(mut self, took: std::ops::Range<Duration>) -> Self {
        self.took = Some(took);
        self
    }
    fn detail_without(mut self, text: &'static str) -> Self {
        self.detail_without = Some(text);
        self
    }

    /// Probes the case's plugin on `sim` and checks the failure.
    async fn check(self, sim: &PluginSim) {
        let id = self.id;
        sim.set(id, self.behavior.clone());
        let template = self.template.clone().unwrap_or_else(|| sim.url_template());
        let p = prober(ProbeSettings {
            retries: self.retries,
            timeout: self.timeout,
            dapr_invoke: self.dapr_invoke,
            ..settings(template)
        });
        let started = Instant::now();
        let f = failed(p.probe_one(id).await);
        let took = started.elapsed();
        assert_eq!(f.kind, self.kind, "{id}: {f}");
        if let Some(status) = self.http_status {
            assert_eq!(f.http_status, status, "{id}: {f}");
        }
        if let Some(attempts) = self.attempts {
            assert_eq!(f.attempts, attempts, "{id}: {f}");
        }
        if let Some(requests) = self.requests {
            assert_eq!(sim.requests(id), requests, "{id}: requests received");
        }
        if let Some(code) = self.dapr_error_code {
            assert_eq!(f.dapr_error_code.as_deref(), code, "{id}: {f}");
        }
        if let Some(range) = self.took {
            assert!(
                range.contains(&took),
                "{id}: took {took:?}, not in {range:?}"
            );
        }
        if let Some(text) = self.detail_without {
            assert!(
                !f.detail.contains(text),
                "{id}: {text} in details: {}",
                f.detail
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_has_its_error_kind_and_only_transient_ones_are_retried() {
    bounded(TEST_BOUND, async {
        let closed = format!("http://127.0.0.1:{}/{{plugin_id}}/v1/status", free_port());
        let unresolvable = "http://no-such-plugin.invalid:8080/{plugin_id}/v1/status";
        let slow = Behavior::delay(Duration::from_secs(5), Behavior::v0("ACTIVE"));
        let ms = Duration::from_millis;
        use ErrorKind::*;
        let mut cases = vec![
            // Nothing listens, or no such host: connect (retried); no URL in the details.
            failing("closed-port", Behavior::v0("ACTIVE"), Connect)
                .template(closed)
                .retries(2)
                .attempts(3)
                .http_status(None)
                .detail_without("127.0.0.1"),
            failing("unresolvable", Behavior::v0("ACTIVE"), Connect)
                .template(unresolvable.to_owned()),
            // timeout * (retries + 1) plus one backoff delay of at most 2 * 100 ms.
            failing("slow", slow, Timeout)
                .timeout(ms(200))
                .retries(1)
                .attempts(2)
                .requests(2)
                .took(ms(400)..ms(400 + 200 + 300)),
            failing("loris", Behavior::Slowloris, Timeout)
                .timeout(ms(300))
                .took(Duration::ZERO..Duration::from_secs(1)),
            failing("garbage", Behavior::NotHttp, Protocol).http_status(None),
            failing("reset", Behavior::Reset, Protocol)
                .retries(1)
                .attempts(2)
                .requests(2),
            failing("cut", Behavior::Truncated, Protocol),
            // Non-2xx is http_status; only 5xx and 429 are retried.
            failing("missing", Behavior::Unknown404, HttpStatus)
                .retries(2)
                .http_status(Some(404))
                .attempts(1)
                .requests(1),
            failing("unavailable", Behavior::raw(503, "{}"), HttpStatus)
                .retries(2)
                .http_status(Some(503))
                .attempts(3)
                .requests(3),
            failing("busy", Behavior::raw(429, ""), HttpStatus)
                .retries(2)
                .http_status(Some(429))
                .attempts(3)
                .requests(3),
            // Redirects are neither followed nor retried.
            failing("loop", Behavior::RedirectLoop, HttpStatus)
                .retries(2)
                .http_status(Some(302))
                .requests(1),
            // Cut at the cap without reading the rest, and not retried.
            failing("huge", Behavior::Huge(10 * 1024 * 1024), TooLarge)
                .timeout(Duration::from_secs(20))
                .retries(2)
                .attempts(1)
                .took(Duration::ZERO..Duration::from_secs(2)),
            // A plugin reporting an error: plugin_error, not retried.
            failing(
                "v0-error",
                Behavior::raw(200, r#"{"ret":3,"msg":"db down","status":"ACTIVE"}"#),
                PluginError,
            )
            .retries(1)
            .attempts(1),
            failing(
                "v1-error",
                Behavior::raw(
                    200,
                    r#"{"res":{"ret":"INTERNAL_ERROR"},"status":"RUNNING"}"#,
                ),
                PluginError,
            )
            .retries(1)
            .attempts(1),
            // A status outside the vocabulary.
            failing("v0-weird", Behavior::v0("WEIRD"), UnknownStatus),
            failing("v1-unknown", Behavior::v1("UNKNOWN"), UnknownStatus),
            failing(
                "v1-number",
                Behavior::raw(200, r#"{"res":{},"status":9}"#),
                UnknownStatus,
            ),
            // In Dapr mode a 500 with an `ERR_` code is the sidecar's, and is retried.
            failing(
                "sidecar-error",
                Behavior::raw(500, DAPR_ERROR),
                SidecarInvoke,
            )
            .dapr_invoke()
            .retries(1)
            .dapr_error_code(Some("ERR_DIRECT_INVOKE"))
            .http_status(Some(500))
            .attempts(2)
            .requests(2),
            // The same 500 is http_status when not going through Dapr.
            failing("direct-500", Behavior::raw(500, DAPR_ERROR), HttpStatus)
                .http_status(Some(500))
                .dapr_error_code(None),
        ];
        // Bodies that are not JSON objects: bad_body, not retried.
        cases.extend(
            [
                ("utf8", Behavior::InvalidUtf8),
                ("array", Behavior::raw(200, r#"[{"status":"ACTIVE"}]"#)),
                ("text", Behavior::raw(200, "ACTIVE")),
            ]
            .map(|(id, behavior)| {
                failing(id, behavior, BadBody)
                    .retries(2)
                    .attempts(1)
                    .requests(1)
            }),
        );
        // In Dapr mode, only a 500 with an error code is the sidecar's.
        cases.extend(
            [
                ("plain", 500, "internal error"),
                ("other-code", 500, r#"{"errorCode":"OOPS"}"#),
                ("not-object", 500, r#"["ERR_DIRECT_INVOKE"]"#),
                ("code-as-number", 500, r#"{"errorCode":5}"#),
                ("503", 503, DAPR_ERROR),
            ]
            .map(|(id, code, body)| {
                failing(id, Behavior::raw(code, body), HttpStatus)
                    .dapr_invoke()
                    .http_status(Some(code))
                    .dapr_error_code(None)
            }),
        );
        let sim = sim();
        for case in cases {
            case.check(&sim).await;
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
        all_active(&p, &ids(60)).await;
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
        let ids = ids(200);
        all_active(&p, &ids).await;
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
        let ids = ids(300);
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
        let ids = ids(10);
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
