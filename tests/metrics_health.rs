//! `run`'s metrics and health server, and the `"alert"` flag of the events, proven against
//! the real binary: a real `redis-server` in Dapr's layout, simulated plugins on loopback,
//! `--listen 127.0.0.1:0`, and the JSON events the process prints on stdout.
//!
//! - `/metrics` values move after real ticks (ticks, durations, probe failures, route
//!   writes, plugins by status, lock held, last completed tick).
//! - `/healthz` is 200 while starting (the sidecar wait), while ticking and through a store
//!   outage; 503 when the scheduler stops firing (its wall clock frozen with libfaketime),
//!   and 200 again once it fires; and it does not flap in the long gap of an irregular
//!   schedule.
//! - `/readyz` follows the store: 200, 503 once Redis is stopped, 200 after it restarts.
//! - `plugin_status_changed` carries `"alert": true` exactly when a route leaves a
//!   gate-passing status for a blocking one; `tick_failed` and `lock_lost` always do.

mod support;

use std::time::{Duration, Instant};

use chrono::Timelike;
use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::{keel, raw_put, raw_seed, route_status, Events};
use support::live::{self, http_get, is, Worker};
use support::redis_server::{free_port, RedisServer};

/// Common `run` arguments against `redis` and the simulator, ticking every second.
fn run_args(redis: &RedisServer, sim: &PluginSim) -> Vec<String> {
    live::run_args(redis, sim, &["--probe-timeout", "1s"])
}

/// The value of one series in a Prometheus text exposition (labels in any order).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    wanted.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, mut got) = match series.split_once('{') {
                Some((n, rest)) => (
                    n,
                    rest.trim_end_matches('}')
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                        .collect::<Vec<_>>(),
                ),
                None => (series, Vec::new()),
            };
            got.sort();
            (n == name && got == wanted).then(|| value.parse().ok())?
        })
}

fn scrape(address: &str) -> String {
    let (code, body) = http_get(address, "/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");
    body
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_after_real_ticks() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    sim.set("good", Behavior::v0("ACTIVE"));
    sim.set("down", Behavior::Unknown404);
    sim.set("stopper", Behavior::v0("STOPPED"));
    raw_seed(
        &redis,
        &["good", "down", "stopper", "ghost"],
        &[
            ("good", "ACTIVE"),
            ("down", "ACTIVE"),
            ("stopper", "ACTIVE"),
        ],
    );
    let mut args = run_args(&redis, &sim);
    args.extend(["--lease".into(), "3s".into()]);
    let holder = Worker::spawn(&args, &[("SCRAPER_HOLDER_ID", "holder")]);
    let address = holder.listening_address();
    holder.wait_event(Duration::from_secs(10), |e| is(e, "tick_completed"));
    // "down" needs two failed probes to become FAILED (the default unhealthy threshold).
    holder.wait_event(Duration::from_secs(10), |e| {
        is(e, "plugin_status_changed") && e["plugin_id"] == "down"
    });
    holder.wait_until(
        Duration::from_secs(10),
        "a tick after FAILED was written",
        |evs| {
            let changed = evs
                .iter()
                .position(|e| is(e, "plugin_status_changed") && e["plugin_id"] == "down")?;
            evs[changed..]
                .iter()
                .any(|e| is(e, "tick_completed"))
                .then_some(())
        },
    );

    // The gauge of plugins by status is replaced at the end of each tick: poll until the
    // settled statuses show (a scrape may land between a clear and a set).
    let text = eventually(Duration::from_secs(5), "plugins by route status", || {
        let text = scrape(&address);
        let by = |s: &str| metric(&text, "keel_scraper_plugins", &[("status", s)]);
        (by("ACTIVE") == Some(1.0)
            && by("STOPPED") == Some(1.0)
            && by("FAILED") == Some(1.0)
            && by("missing") == Some(1.0))
        .then_some(text)
    });
    let completed_logged = holder
        .events()
        .iter()
        .filter(|e| is(e, "tick_completed"))
        .count() as f64;
    let get = |name: &str, labels: &[(&str, &str)]| {
        metric(&text, name, labels)
            .unwrap_or_else(|| panic!("{name}{labels:?} missing from:\n{text}"))
    };
    let completed = get("keel_scraper_ticks_total", &[("outcome", "completed")]);
    assert!(
        completed >= 2.0 && completed >= completed_logged,
        "completed ticks {completed}, logged {completed_logged}"
    );
    assert_eq!(
        get("keel_scraper_ticks_total", &[("outcome", "failed")]),
        0.0
    );
    let durations = get("keel_scraper_tick_duration_seconds_count", &[]);
    assert!(
        (durations - completed).abs() <= 1.0,
        "tick durations {durations} vs completed {completed}"
    );
    assert!(get("keel_scraper_tick_duration_seconds_sum", &[]) > 0.0);
    // Three plugins with a route are probed on every tick; the one without is not.
    let probes = get("keel_scraper_probe_duration_seconds_count", &[]);
    assert!(
        probes >= 3.0 * completed,
        "probes {probes} for {completed} ticks"
    );
    let failures = get(
        "keel_scraper_probe_failures_total",
        &[("error_kind", "http_status")],
    );
    assert!(
        failures >= completed && failures <= probes,
        "http_status failures {failures}"
    );
    assert!(metric(
        &text,
        "keel_scraper_probe_failures_total",
        &[("error_kind", "connect")]
    )
    .is_none());
    assert_eq!(
        get("keel_scraper_route_writes_total", &[("outcome", "written")]),
        2.0,
        "stopper and down, once each"
    );
    // Every tick releases its lease when it ends.
    assert_eq!(get("keel_scraper_lock_held", &[]), 0.0);
    let last = get("keel_scraper_last_tick_completed_timestamp_seconds", &[]);
    let age = now_unix() - last;
    assert!(
        (-1.0..5.0).contains(&age),
        "last completed tick {age:.1} s ago"
    );
    assert_eq!(route_status(&redis, "stopper").as_deref(), Some("STOPPED"));
    assert_eq!(route_status(&redis, "down").as_deref(), Some("FAILED"));

    // Every metric is prefixed; every stdout line is one JSON event.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            line.starts_with("keel_scraper_"),
            "unprefixed series: {line}"
        );
    }
    for w in [&holder] {
        for line in w.stdout_lines() {
            let e: Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
            assert!(
                e["timestamp"].is_string() && e["level"].is_string() && e["event"].is_string(),
                "{line}"
            );
        }
    }
}

/// `keel_scraper_lock_held` is 1 exactly while this replica holds the lease: during a
/// tick, from taking the lock to releasing it, and 0 after (or while another holds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_held_is_1_during_a_tick_and_0_once_it_is_released() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    // A slow plugin keeps the tick open long enough to scrape it mid-tick; a 3 s schedule
    // leaves time to scrape between ticks.
    sim.set(
        "a",
        Behavior::delay(Duration::from_millis(1500), Behavior::v0("ACTIVE")),
    );
    raw_seed(&redis, &["a"], &[("a", "ACTIVE")]);
    let mut args = run_args(&redis, &sim);
    let set = |args: &mut Vec<String>, flag: &str, value: &str| {
        let at = args.iter().position(|a| a == flag).expect("flag present");
        args[at + 1] = value.to_string();
    };
    set(&mut args, "--schedule", "*/3 * * * * *");
    set(&mut args, "--probe-timeout", "2500ms");
    let w = Worker::spawn(&args, &[("SCRAPER_HOLDER_ID", "first")]);
    let address = w.listening_address();
    assert_eq!(
        metric(&scrape(&address), "keel_scraper_lock_held", &[]),
        Some(0.0),
        "before any tick"
    );
    w.wait_event(Duration::from_secs(10), |e| is(e, "lock_acquired"));
    assert_eq!(
        metric(&scrape(&address), "keel_scraper_lock_held", &[]),
        Some(1.0),
        "mid-tick{}",
        w.dump()
    );
    w.wait_event(Duration::from_secs(10), |e| is(e, "lock_released"));
    let text = scrape(&address);
    assert_eq!(
        metric(&text, "keel_scraper_lock_held", &[]),
        Some(0.0),
        "after the release:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_200_while_start_up_waits_for_the_sidecar() {
    // Nothing listens on these ports: start-up waits for the sidecar for a minute.
    let (http, grpc) = (free_port(), free_port());
    let w = Worker::spawn(
        &[
            "run",
            "--backend",
            "dapr",
            "--dapr-http-endpoint",
            &format!("127.0.0.1:{http}"),
            "--dapr-grpc-endpoint",
            &format!("127.0.0.1:{grpc}"),
            "--sidecar-wait",
            "60s",
            "--schedule",
            "* * * * * *",
        ],
        // The listen address from the environment this time.
        &[("SCRAPER_LISTEN", "127.0.0.1:0")],
    );
    let address = w.listening_address();
    w.wait_event(Duration::from_secs(10), |e| {
        is(e, "sidecar_waiting") && e["attempt"].as_u64() >= Some(2)
    });
    let (code, body) = http_get(&address, "/healthz");
    assert_eq!(code, 200, "liveness while waiting for the sidecar: {body}");
    let (code, _) = http_get(&address, "/readyz");
    assert_eq!(code, 503, "not ready before the sidecar ever answered");
    let (code, body) = http_get(&address, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("keel_scraper_ticks_total"), "{body}");
    assert!(w
        .events()
        .iter()
        .all(|e| !is(e, "tick_started") && !is(e, "lock_acquired")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_store_and_healthz_stays_ok_through_an_outage() {
    let mut redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    raw_seed(&redis, &["a"], &[("a", "ACTIVE")]);
    let w = Worker::spawn(&run_args(&redis, &sim), &[]);
    let address = w.listening_address();
    w.wait_event(Duration::from_secs(10), |e| is(e, "tick_completed"));
    eventually(Duration::from_secs(5), "/readyz 200 with redis up", || {
        (http_get(&address, "/readyz").0 == 200).then_some(())
    });
    assert_eq!(http_get(&address, "/healthz").0, 200, "live while ticking");

    redis.stop();
    let stopped = Instant::now();
    eventually(
        Duration::from_secs(6),
        "/readyz 503 with redis stopped",
        || (http_get(&address, "/readyz").0 == 503).then_some(()),
    );
    // The store has been unreachable for over an interval: ticks fail, loudly.
    w.wait_event(Duration::from_secs(10), |e| is(e, "tick_failed"));
    assert!(stopped.elapsed() > Duration::from_secs(1));
    // Failed ticks are attempts: the loop is alive.
    assert_eq!(
        http_get(&address, "/healthz").0,
        200,
        "live through a store outage"
    );
    let text = scrape(&address);
    assert!(
        metric(&text, "keel_scraper_ticks_total", &[("outcome", "failed")]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    let store_errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("keel_scraper_store_errors_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(store_errors >= 1.0, "store errors counted:\n{text}");
    let failed = w.wait_event(Duration::from_secs(1), |e| is(e, "tick_failed"));
    assert_eq!(failed["alert"], true, "{failed}");
    assert!(w.events().iter().any(|e| is(e, "store_error")));

    redis.restart();
    eventually(
        Duration::from_secs(10),
        "/readyz 200 after redis restarted",
        || (http_get(&address, "/readyz").0 == 200).then_some(()),
    );
    assert_eq!(http_get(&address, "/healthz").0, 200);
}

/// The libfaketime preload library, when installed (`scripts/test` installs it).
fn libfaketime() -> Option<std::path::PathBuf> {
    let dirs = [
        "/usr/lib/x86_64-linux-gnu/faketime",
        "/usr/lib/aarch64-linux-gnu/faketime",
        "/usr/lib/faketime",
        "/usr/local/lib/faketime",
    ];
    dirs.iter()
        .map(|d| std::path::Path::new(d).join("libfaketimeMT.so.1"))
        .find(|p| p.exists())
}

/// The scheduler fires from the wall clock. Frozen (libfaketime, with the monotonic clock
/// left real so the health ages still grow), it never fires: the loop stalls, and
/// `/healthz` must say so. Unfrozen, it fires again and `/healthz` recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_the_scheduler_stops_firing_and_recovers_when_it_fires_again() {
    let lib = libfaketime().expect("libfaketime is required for this test (apt-get install faketime; scripts/test installs it)");
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    raw_seed(&redis, &["a"], &[("a", "ACTIVE")]);
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = dir.path().join("faketime");
    std::fs::write(&clock, "2020-01-01 00:00:00\n").expect("write the frozen time");
    let w = Worker::spawn(
        &run_args(&redis, &sim),
        &[
            ("LD_PRELOAD", lib.to_str().unwrap_or_default()),
            (
                "FAKETIME_TIMESTAMP_FILE",
                clock.to_str().unwrap_or_default(),
            ),
            ("FAKETIME_CACHE_DURATION", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let address = w.listening_address();
    assert_eq!(http_get(&address, "/healthz").0, 200, "live while starting");
    // Ready means the store connected, and the loop starts right after.
    eventually(Duration::from_secs(10), "/readyz 200", || {
        (http_get(&address, "/readyz").0 == 200).then_some(())
    });
    let (code, body) = eventually(
        Duration::from_secs(8),
        "/healthz 503 with the scheduler stalled",
        || {
            let r = http_get(&address, "/healthz");
            (r.0 == 503).then_some(r)
        },
    );
    assert_eq!(code, 503, "{body}");
    assert!(
        w.events().iter().all(|e| !is(e, "lock_acquired")),
        "no tick can have run: {}",
        w.dump()
    );
    assert_eq!(
        http_get(&address, "/readyz").0,
        200,
        "the store still answers"
    );

    std::fs::write(&clock, "+0\n").expect("unfreeze the clock");
    w.wait_event(Duration::from_secs(10), |e| is(e, "tick_completed"));
    assert_eq!(
        http_get(&address, "/healthz").0,
        200,
        "live again once the loop attempts ticks"
    );
}

/// `*/10`-style schedules are regular, but `A,A+1 * * * * *` fires twice a minute, one
/// second apart: its interval (the shortest gap) is 1 s, then it is silent for 59 s. The
/// loop is not stalled during that silence, so liveness must not fail (Kubernetes would
/// restart a healthy pod every minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_stays_200_through_the_long_gap_of_an_irregular_schedule() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    raw_seed(&redis, &["a"], &[("a", "ACTIVE")]);
    // Fire 30 s from now, so the 6 s observed below fall in the silent gap.
    let first = (chrono::Utc::now().second() + 30) % 59;
    let schedule = format!("{},{} * * * * *", first, first + 1);
    let mut args = run_args(&redis, &sim);
    let at = args
        .iter()
        .position(|a| a == "* * * * * *")
        .expect("schedule argument");
    args[at] = schedule;
    let w = Worker::spawn(&args, &[]);
    let address = w.listening_address();
    eventually(Duration::from_secs(10), "/readyz 200", || {
        (http_get(&address, "/readyz").0 == 200).then_some(())
    });
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        let (code, body) = http_get(&address, "/healthz");
        assert_eq!(
            code,
            200,
            "/healthz {code} ({}) {:.1} s into a gap the schedule itself has",
            body.trim(),
            start.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        w.events().iter().all(|e| !is(e, "lock_acquired")),
        "the schedule fired inside the window: {}",
        w.dump()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_status_changed_carries_alert_only_when_a_route_leaves_the_gate() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    // (plugin, route before, what it reports, route after, alert)
    let cases: &[(&str, &str, Behavior, &str, bool)] = &[
        ("dead", "ACTIVE", Behavior::Unknown404, "FAILED", true),
        (
            "stopping",
            "ACTIVE",
            Behavior::v0("STOPPING"),
            "STOPPING",
            true,
        ),
        (
            "crashed",
            "STARTING",
            Behavior::v0("FAILED"),
            "FAILED",
            true,
        ),
        (
            "warming",
            "ACTIVE",
            Behavior::v0("STARTING"),
            "STARTING",
            false,
        ),
        (
            "ready",
            "STARTING",
            Behavior::v1("RUNNING"),
            "ACTIVE",
            false,
        ),
        ("back", "FAILED", Behavior::v0("ACTIVE"), "ACTIVE", false),
        ("worse", "STOPPED", Behavior::v0("FAILED"), "FAILED", false),
    ];
    for (id, _, behavior, _, _) in cases {
        sim.set(*id, behavior.clone());
    }
    let ids: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let routes: Vec<(&str, &str)> = cases.iter().map(|c| (c.0, c.1)).collect();
    raw_seed(&redis, &ids, &routes);
    let out = keel()
        .args([
            "once",
            "--backend",
            "redis",
            "--redis-url",
            &redis.url(),
            "--status-url",
            &sim.url_template(),
            "--retries",
            "0",
            "--unhealthy-threshold",
            "1",
        ])
        .timeout(Duration::from_secs(20))
        .run();
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let changes: Vec<Value> = Events::lenient(out.stdout.lines())
        .0
        .into_iter()
        .filter(|e| is(e, "plugin_status_changed"))
        .collect();
    assert_eq!(changes.len(), cases.len(), "{}", out.describe());
    for (id, from, _, to, alert) in cases {
        let e = changes
            .iter()
            .find(|e| e["plugin_id"] == *id)
            .unwrap_or_else(|| panic!("no change for {id}: {}", out.describe()));
        assert_eq!(
            (e["from"].as_str(), e["to"].as_str()),
            (Some(*from), Some(*to)),
            "{e}"
        );
        assert_eq!(e["alert"], *alert, "{id} {from} -> {to}: {e}");
        assert_eq!(route_status(&redis, id).as_deref(), Some(*to));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tick_failed_carries_alert_when_the_registry_is_malformed() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    raw_put(
        &redis,
        "plugins||all_registered_plugin",
        "[\"not\", \"an object\"]",
    );
    let out = keel()
        .args([
            "once",
            "--backend",
            "redis",
            "--redis-url",
            &redis.url(),
            "--status-url",
            &sim.url_template(),
        ])
        .timeout(Duration::from_secs(20))
        .run();
    assert_eq!(out.code, Some(1), "{}", out.describe());
    let failed = Events::lenient(out.stdout.lines())
        .0
        .into_iter()
        .find(|e| is(e, "tick_failed"))
        .unwrap_or_else(|| panic!("no tick_failed: {}", out.describe()));
    assert_eq!(failed["alert"], true, "{failed}");
    assert_eq!(failed["level"], "ERROR", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("all_registered_plugin"),
        "{failed}"
    );
    assert_eq!(sim.total_requests(), 0);
}

/// Another holder takes `scrape_state` while the tick is probing: the tick must notice at
/// its fence, write nothing, and page (`lock_lost` and `tick_failed`, both alerting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_lost_carries_alert_and_the_tick_writes_nothing() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    sim.set(
        "slow",
        Behavior::delay(Duration::from_millis(1500), Behavior::v0("STOPPED")),
    );
    raw_seed(&redis, &["slow"], &[("slow", "ACTIVE")]);
    let mut w = Worker::spawn(
        &[
            "once",
            "--backend",
            "redis",
            "--redis-url",
            &redis.url(),
            "--status-url",
            &sim.url_template(),
            "--lease",
            "5s",
            "--probe-timeout",
            "4s",
            "--retries",
            "0",
        ],
        &[],
    );
    w.wait_event(Duration::from_secs(10), |e| is(e, "lock_acquired"));
    eventually(Duration::from_secs(5), "the probe in flight", || {
        (sim.in_flight() > 0).then_some(())
    });
    // An intruder's record, with a newer version: the holder's ETag no longer matches.
    redis.query::<()>(
        redis::cmd("HSET")
            .arg("plugins||scrape_state")
            .arg("data")
            .arg(r#"{"holder":"intruder"}"#),
    );
    redis.query::<i64>(
        redis::cmd("HINCRBY")
            .arg("plugins||scrape_state")
            .arg("version")
            .arg(1),
    );
    let status = w.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", w.dump());
    let events = w.events();
    let lost = events
        .iter()
        .find(|e| is(e, "lock_lost"))
        .unwrap_or_else(|| panic!("no lock_lost: {}", w.dump()));
    assert_eq!(lost["alert"], true, "{lost}");
    let failed = events
        .iter()
        .find(|e| is(e, "tick_failed"))
        .unwrap_or_else(|| panic!("no tick_failed: {}", w.dump()));
    assert_eq!(failed["alert"], true, "{failed}");
    assert!(
        events.iter().all(|e| !is(e, "plugin_status_changed")),
        "{}",
        w.dump()
    );
    assert_eq!(
        route_status(&redis, "slow").as_deref(),
        Some("ACTIVE"),
        "nothing written after the lease was lost"
    );
}
