//! The real `keel-scraper` binary against a real `redis-server` and plugin simulators:
//! exit codes, options before and after the command and from the environment, the JSON
//! event lines of `once`, `routes --json`, and `demo`.

mod support;

use std::time::Duration;

use keel_scraper::store::redis::RedisStore;
use keel_scraper::store::{Save, StoreKind};
use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::{json, Value};
use support::binary::{
    exists, keel, raw_data, raw_version, redis_store, route_status, routes_json, seed,
    seed_registry, seed_route, PRIVATE, PUBLIC,
};
use support::redis_server::{free_port, RedisServer};
use support::sidecar::{SidecarConfig, SidecarDouble};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_exits_0_and_prints_json_events_with_the_documented_fields() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().unwrap();
    seed_registry(&*store, &["ok", "broken"]).await;
    seed_route(&*store, "ok", "STARTING").await;
    seed_route(&*store, "broken", "ACTIVE").await;
    sim.set("ok", Behavior::v0("ACTIVE"));
    sim.set("broken", Behavior::raw(500, r#"{"error":"boom"}"#));

    let out = keel()
        .redis(&server.url(), &sim.url_template())
        .args(["once", "--holder-id", "replica-a", "--retries", "0"])
        .run_async()
        .await;
    out.assert_code(0);
    // Every stdout line is a JSON object with timestamp, level and event (checked by
    // `events()`), and the fields sit at top level.
    let events = out.events();
    for e in &events.0 {
        let ts = e["timestamp"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(ts)
            .unwrap_or_else(|err| panic!("timestamp {ts}: {err}"));
        assert!(e.get("fields").is_none(), "fields must be flattened: {e}");
    }

    let done = events.one("tick_completed");
    for field in [
        "tick",
        "holder",
        "plugins",
        "probed_ok",
        "probe_failed",
        "routes_changed",
        "duration_ms",
    ] {
        assert!(
            done.get(field).is_some(),
            "tick_completed lacks {field}: {done}"
        );
    }
    let tick = done["tick"].as_str().unwrap();
    let parsed =
        chrono::DateTime::parse_from_rfc3339(tick).unwrap_or_else(|e| panic!("tick {tick}: {e}"));
    assert!(
        tick.ends_with('Z') && !tick.contains('.'),
        "tick is UTC, whole seconds: {tick}"
    );
    assert_eq!(parsed.offset().local_minus_utc(), 0);
    assert_eq!(done["holder"], "replica-a");
    assert_eq!(done["plugins"], 2);
    assert_eq!(done["probed_ok"], 1);
    assert_eq!(done["probe_failed"], 1);
    assert_eq!(done["routes_changed"], 1);
    assert!(done["duration_ms"].is_u64(), "{done}");
    assert_eq!(done["level"], "INFO");

    let changed = events.one("plugin_status_changed");
    assert_eq!(changed["plugin_id"], "ok");
    assert_eq!(changed["from"], "STARTING");
    assert_eq!(changed["to"], "ACTIVE");
    assert_eq!(changed["reason"], "reported");

    let failed = events.one("plugin_probe_failed");
    assert_eq!(failed["plugin_id"], "broken");
    assert_eq!(failed["error_kind"], "http_status");
    assert_eq!(failed["consecutive_failures"], 1);

    assert_eq!(route_status(&server, "ok").as_deref(), Some("ACTIVE"));
    assert_eq!(route_status(&server, "broken").as_deref(), Some("ACTIVE"));
    assert!(
        out.stderr_events().0.is_empty(),
        "once logs to stdout\n{}",
        out.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_with_an_empty_or_missing_registry_exits_0() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().unwrap();
    let once = || {
        keel()
            .redis(&server.url(), &sim.url_template())
            .args(["once", "--holder-id", "replica-a"])
    };

    let out = once().run_async().await;
    out.assert_code(0);
    assert_eq!(out.events().one("tick_completed")["plugins"], 0);

    seed(&*store, StoreKind::Private, "all_registered_plugin", "{}").await;
    let out = once().run_async().await;
    out.assert_code(0);
    assert_eq!(out.events().one("tick_completed")["plugins"], 0);
    assert_eq!(sim.total_requests(), 0);
}

/// Every output of `out` must leave `secret` out.
fn assert_no_secret(out: &support::binary::Output, secret: &str) {
    assert!(
        !out.stdout.contains(secret) && !out.stderr.contains(secret),
        "the password leaked\n{}",
        out.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_exits_1_naming_host_and_port_never_the_password() {
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    for url in [
        format!("redis://:s3cr3t-pa55@{endpoint}/"),
        format!("redis://default:s3cr3t-pa55@{endpoint}/0"),
    ] {
        for command in [&["once"][..], &["routes", "--json"][..]] {
            let out = keel()
                .redis(&url, "http://127.0.0.1:1/{plugin_id}/v1/status")
                .args(command)
                .timeout(Duration::from_secs(20))
                .run_async()
                .await;
            out.assert_code(1);
            assert!(
                out.stderr.contains(&endpoint),
                "the message must name {endpoint}\n{}",
                out.describe()
            );
            assert_no_secret(&out, "s3cr3t-pa55");
        }
    }

    // A real server refusing the password: still exit 1, still no password.
    let server = RedisServer::builder().with_password("right-pw").start();
    let url = format!("redis://:wr0ng-pw@{}/", server.endpoint());
    let out = keel()
        .redis(&url, "http://127.0.0.1:1/{plugin_id}/v1/status")
        .arg("once")
        .timeout(Duration::from_secs(20))
        .run_async()
        .await;
    out.assert_code(1);
    assert!(
        out.stderr.contains(&server.endpoint()),
        "{}",
        out.describe()
    );
    assert_no_secret(&out, "wr0ng-pw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_registry_fails_once_with_exit_1_and_writes_no_route_or_counter() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().unwrap();
    seed_route(&*store, "a", "ACTIVE").await;
    seed_route(&*store, "b", "STARTING").await;
    sim.set("a", Behavior::raw(503, "{}"));
    sim.set("b", Behavior::v0("ACTIVE"));
    let routes_before = [
        raw_data(&server, "plugin_route_a"),
        raw_data(&server, "plugin_route_b"),
    ];

    for (i, registry) in [
        r#"{"a":"true","b":"#,
        r#"["a","b"]"#,
        r#""a,b""#,
        "not json",
    ]
    .into_iter()
    .enumerate()
    {
        server.query::<()>(redis::cmd("DEL").arg("plugins||all_registered_plugin"));
        seed(
            &*store,
            StoreKind::Private,
            "all_registered_plugin",
            registry,
        )
        .await;
        let out = keel()
            .redis(&server.url(), &sim.url_template())
            .args([
                "once",
                "--holder-id",
                &format!("replica-{i}"),
                "--unhealthy-threshold",
                "1",
            ])
            .run_async()
            .await;
        out.assert_code(1);
        assert!(
            out.stderr.contains("all_registered_plugin"),
            "name the registry\n{}",
            out.describe()
        );
        assert!(!out.events().has("tick_completed"), "{}", out.describe());
        assert_eq!(
            [
                raw_data(&server, "plugin_route_a"),
                raw_data(&server, "plugin_route_b")
            ],
            routes_before,
            "{registry}: a route was written"
        );
        assert_eq!(raw_version(&server, "plugin_route_a"), Some(1));
        assert_eq!(raw_version(&server, "plugin_route_b"), Some(1));
        assert!(
            !exists(&server, "plugins||scrape_counters"),
            "{registry}: counters were written"
        );
    }
    assert_eq!(sim.total_requests(), 0, "a plugin was probed");
}

#[test]
fn invalid_configuration_exits_2_naming_the_option() {
    let redis = ["--backend", "redis", "--redis-url", "redis://127.0.0.1:1/"];
    // (arguments, environment, the option the message must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["once", "--backend", "etcd"], vec![], "--backend"),
        (vec!["once"], vec![("SCRAPER_BACKEND", "etcd")], "--backend"),
        (
            [&redis[..], &["once", "--schedule", "*/5 * * * *"]].concat(),
            vec![],
            "--schedule",
        ),
        (
            [&redis[..], &["once", "--schedule", "a b c d e f"]].concat(),
            vec![],
            "--schedule",
        ),
        (
            [
                &redis[..],
                &["once", "--status-url", "http://127.0.0.1:3500/v1/status"],
            ]
            .concat(),
            vec![],
            "--status-url",
        ),
        (
            [&redis[..], &["once"]].concat(),
            vec![("SCRAPER_STATUS_URL", "http://x/status")],
            "--status-url",
        ),
        (
            [&redis[..], &["once", "--lease", "500ms"]].concat(),
            vec![],
            "--lease",
        ),
        (
            [&redis[..], &["once", "--lease", "0s"]].concat(),
            vec![],
            "--lease",
        ),
        (vec!["once", "--backend", "redis"], vec![], "--redis-url"),
        (
            vec!["routes", "--json"],
            vec![("SCRAPER_BACKEND", "redis")],
            "--redis-url",
        ),
    ];
    for (args, envs, option) in cases {
        let mut cmd = keel().args(&args).timeout(Duration::from_secs(10));
        for (k, v) in &envs {
            cmd = cmd.env(k, v);
        }
        let out = cmd.run();
        out.assert_code(2);
        assert!(
            out.stderr.contains(option),
            "{args:?} {envs:?}: the message must name {option}\n{}",
            out.describe()
        );
        assert!(
            out.stdout.trim().is_empty(),
            "usage errors go to stderr\n{}",
            out.describe()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_exits_3_while_another_holder_holds_the_lock() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().unwrap();
    seed_registry(&*store, &["p"]).await;
    seed_route(&*store, "p", "ACTIVE").await;
    sim.set("p", Behavior::v0("STOPPED"));
    let record = r#"{"holder":"replica-x","tick":"2026-01-01T00:00:00Z"}"#;
    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", record.as_bytes(), "-1").with_ttl(60),
        )
        .await
        .unwrap();

    let out = keel()
        .redis(&server.url(), &sim.url_template())
        .args(["once", "--holder-id", "operator"])
        .run_async()
        .await;
    out.assert_code(3);
    assert!(
        out.stderr.contains("replica-x"),
        "say who holds it\n{}",
        out.describe()
    );
    assert_eq!(out.events().one("tick_skipped")["reason"], "lock_held");
    assert_eq!(
        raw_data(&server, "plugins||scrape_state").as_deref(),
        Some(record.as_bytes())
    );
    assert_eq!(route_status(&server, "p").as_deref(), Some("ACTIVE"));
    assert_eq!(sim.total_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_are_read_before_and_after_the_command_and_from_the_environment() {
    let server = RedisServer::start();
    let sim = PluginSim::start().unwrap();
    // The registry under a non-default prefix: found only if that option is read too.
    let other: RedisStore = RedisStore::connect(&server.url(), PUBLIC, PRIVATE, "other")
        .await
        .unwrap();
    seed_registry(&other, &["up", "down"]).await;
    seed_route(&other, "up", "ACTIVE").await;
    seed_route(&other, "down", "ACTIVE").await;
    sim.set("up", Behavior::v0("ACTIVE"));
    sim.set("down", Behavior::raw(503, "{}"));
    let url = server.url();
    let template = sim.url_template();
    let flags = |holder: &'static str| -> Vec<String> {
        [
            "--backend",
            "redis",
            "--redis-url",
            url.as_str(),
            "--status-url",
            template.as_str(),
            "--private-key-prefix",
            "other",
            "--unhealthy-threshold",
            "1",
            "--retries",
            "0",
            "--holder-id",
            holder,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (before, after) = (flags("h-before"), flags("h-after"));
    let mixed = flags("h-mixed");
    let runs = vec![
        ("h-before", keel().args(&before).arg("once")),
        ("h-after", keel().arg("once").args(&after)),
        (
            "h-mixed",
            keel().args(&mixed[..6]).arg("once").args(&mixed[6..]),
        ),
        (
            "h-env",
            keel()
                .arg("once")
                .env("SCRAPER_BACKEND", "redis")
                .env("REDIS_URL", &url)
                .env("SCRAPER_STATUS_URL", &template)
                .env("SCRAPER_PRIVATE_KEY_PREFIX", "other")
                .env("SCRAPER_UNHEALTHY_THRESHOLD", "1")
                .env("SCRAPER_RETRIES", "0")
                .env("SCRAPER_HOLDER_ID", "h-env")
                .env("SCRAPER_LOG_FORMAT", "json"),
        ),
    ];
    for (holder, cmd) in runs {
        // Reset the failing plugin's route so each run has a decision to make.
        server.query::<()>(
            redis::cmd("HSET")
                .arg("plugin_route_down")
                .arg("data")
                .arg(r#"{"status":"ACTIVE"}"#),
        );
        server.query::<()>(redis::cmd("DEL").arg("other||scrape_counters"));
        let out = cmd.run_async().await;
        out.assert_code(0);
        let events = out.events();
        let done = events.one("tick_completed");
        assert_eq!(done["holder"], holder, "{}", out.describe());
        assert_eq!(done["plugins"], 2, "{}", out.describe());
        assert_eq!(
            done["probed_ok"],
            1,
            "the status URL option was not used\n{}",
            out.describe()
        );
        assert_eq!(
            sim.requests("down") as usize,
            sim.requests("up") as usize,
            "--retries 0"
        );
        assert_eq!(
            route_status(&server, "down").as_deref(),
            Some("FAILED"),
            "{}",
            out.describe()
        );
    }
    assert!(
        !exists(&server, "plugins||scrape_state"),
        "the default prefix was used"
    );

    // The log format from the environment: pretty lines are not JSON.
    let out = keel()
        .arg("once")
        .env("SCRAPER_BACKEND", "redis")
        .env("REDIS_URL", &url)
        .env("SCRAPER_STATUS_URL", &template)
        .env("SCRAPER_LOG_FORMAT", "pretty")
        .run_async()
        .await;
    out.assert_code(0);
    assert!(out.stdout.contains("tick_completed"), "{}", out.describe());
    assert!(
        out.stdout
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_err()),
        "SCRAPER_LOG_FORMAT=pretty was ignored\n{}",
        out.describe()
    );
}

/// Stdout must be exactly one line holding one JSON array.
fn one_json_array(out: &support::binary::Output) -> Value {
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must be one JSON array\n{}",
        out.describe()
    );
    let rows: Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}\n{}", out.describe()));
    assert!(rows.is_array(), "{}", out.describe());
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_json_prints_one_array_on_stdout_and_logs_on_stderr() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    seed(
        &*store,
        StoreKind::Private,
        "all_registered_plugin",
        r#"{"a":"true","missing":"true","c":"true"}"#,
    )
    .await;
    seed_route(&*store, "a", "ACTIVE").await;
    seed_route(&*store, "c", "FAILED").await;

    let out = routes_json(&server.url()).run_async().await;
    out.assert_code(0);
    let rows = one_json_array(&out);
    let mut sorted = rows.as_array().cloned().unwrap_or_default();
    sorted.sort_by_key(|r| r["plugin_id"].as_str().unwrap_or_default().to_owned());
    // No tick ran: no observation, and it says so instead of showing a made-up value.
    for r in &sorted {
        assert_eq!(
            (&r["observation"], &r["since"], &r["last_outcome"]),
            (&json!("missing"), &Value::Null, &Value::Null),
            "{r}"
        );
    }
    let routes: Vec<Value> = sorted
        .iter()
        .map(|r| json!({"plugin_id": r["plugin_id"], "status": r["status"]}))
        .collect();
    assert_eq!(
        Value::Array(routes),
        json!([
            {"plugin_id": "a", "status": "ACTIVE"},
            {"plugin_id": "c", "status": "FAILED"},
            {"plugin_id": "missing", "status": null},
        ])
    );

    // The same options after the command and `--json` before it.
    let out = keel()
        .args([
            "--backend",
            "redis",
            "--redis-url",
            &server.url(),
            "routes",
            "--json",
        ])
        .run_async()
        .await;
    out.assert_code(0);
    assert_eq!(one_json_array(&out), rows);

    // On the dapr backend with a sidecar slow to become ready, `routes` logs while it
    // waits: those lines go to stderr, and stdout is still the one array.
    let sidecar = SidecarDouble::start(
        SidecarConfig::default()
            .with_redis_url(&server.url())
            .ready_after(Duration::from_millis(800)),
    )
    .await;
    let out = keel()
        .args(["routes", "--json", "--backend", "dapr"])
        .args(["--dapr-grpc-endpoint", &sidecar.grpc_endpoint()])
        .args(["--dapr-http-endpoint", &sidecar.http_endpoint()])
        .run_async()
        .await;
    out.assert_code(0);
    assert_eq!(one_json_array(&out), rows, "{}", out.describe());
    assert!(
        out.stderr_events().has("sidecar_waiting"),
        "the wait was not logged on stderr\n{}",
        out.describe()
    );
}

#[test]
fn demo_exits_0_within_30_seconds_and_prints_the_route_table() {
    let out = keel().arg("demo").timeout(Duration::from_secs(40)).run();
    out.assert_code(0);
    assert!(
        out.elapsed < Duration::from_secs(30),
        "demo took {:?}",
        out.elapsed
    );
    // The last table printed is the routes after the run: one row per simulated plugin.
    let after = out
        .stdout
        .rsplit("routes after")
        .next()
        .filter(|_| out.stdout.contains("routes after"))
        .unwrap_or_else(|| panic!("no route table\n{}", out.describe()));
    let statuses = ["ACTIVE", "STARTING", "STOPPING", "STOPPED", "FAILED"];
    let row = |id: &str| -> String {
        after
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}\n{}", out.describe()))
            .to_owned()
    };
    for id in ["iothub", "rudder", "console", "tenant-admin"] {
        let r = row(id);
        assert!(statuses.iter().any(|s| r.contains(s)), "{r}");
    }
    assert!(row("iothub").contains("ACTIVE"));
    assert!(row("rudder").contains("ACTIVE"));
    // The plugin that dies midway no longer passes the gate.
    assert!(row("console").contains("FAILED"), "{}", out.describe());
}
