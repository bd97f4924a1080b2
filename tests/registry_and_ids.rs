//! The registry and identities, through the real binary against a real `redis-server`:
//! an empty or missing registry says exactly where it looked; ids that are not safe to put
//! in a URL are logged and never requested; the default holder id is
//! `<POD_NAME or hostname>-<pid>-<4 hex>`.

mod support;

use keel_scraper::store::{Save, StoreKind};
use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::{
    keel, raw_version, redis_store, route_status, seed, seed_registry, seed_route, Output,
};
use support::redis_server::RedisServer;

/// Whether any string member of `event` contains `needle`.
fn mentions(event: &Value, needle: &str) -> bool {
    event.as_object().is_some_and(|o| {
        o.values()
            .any(|v| v.as_str().is_some_and(|s| s.contains(needle)))
    })
}

fn registry_empty(out: &Output) -> Value {
    out.assert_code(0);
    out.events().one("registry_empty").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_registry_logs_the_store_the_key_and_the_full_redis_key() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().unwrap();
    let once = || {
        keel()
            .redis(&server.url(), &sim.url_template())
            .args(["once", "--holder-id", "replica-a"])
    };

    // Missing, then present but empty.
    for present in [false, true] {
        if present {
            seed(&*store, StoreKind::Private, "all_registered_plugin", "{}").await;
        }
        let out = once().run_async().await;
        let e = registry_empty(&out);
        assert_eq!(e["store"], "keel-private-store", "{e}");
        assert_eq!(e["key"], "all_registered_plugin", "{e}");
        assert!(
            mentions(&e, "plugins||all_registered_plugin"),
            "the full Redis key: {e}"
        );
    }

    // A registry under `plugins` read with another prefix: the wrong prefix shows.
    server.query::<()>(redis::cmd("DEL").arg("plugins||all_registered_plugin"));
    seed_registry(&*store, &["iothub"]).await;
    seed_route(&*store, "iothub", "ACTIVE").await;
    let out = once()
        .args([
            "--private-key-prefix",
            "other",
            "--private-store",
            "my-private-store",
        ])
        .run_async()
        .await;
    let e = registry_empty(&out);
    assert_eq!(e["store"], "my-private-store", "{e}");
    assert_eq!(e["key"], "all_registered_plugin", "{e}");
    assert!(
        mentions(&e, "other||all_registered_plugin"),
        "the full Redis key: {e}"
    );
    assert!(!mentions(&e, "plugins||"), "{e}");

    // With the right prefix the registry is found and nothing is said about it.
    let out = once().run_async().await;
    out.assert_code(0);
    assert!(!out.events().has("registry_empty"), "{}", out.describe());
    assert_eq!(out.events().one("tick_completed")["plugins"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_plugin_ids_are_logged_and_never_requested_while_valid_ones_are_probed() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().unwrap();
    let long_invalid = "x".repeat(64);
    let long_valid = "y".repeat(63);
    let invalid: Vec<&str> = vec![
        "../v1.0/state/x",
        "a/b",
        "a?b",
        "%2e%2e",
        "a#b",
        "app.other-namespace",
        "a b",
        &long_invalid,
        "café",
        "插件",
        "a\nb",
        "",
    ];
    let valid: Vec<&str> = vec!["good-1", "good_2", "GOOD3", &long_valid];
    let mut registry = serde_json::Map::new();
    for id in invalid.iter().chain(&valid) {
        registry.insert((*id).to_owned(), Value::String("true".into()));
        // Every id has a route, so nothing but the id itself can stop the request.
        store
            .save(
                StoreKind::Public,
                Save::cas(
                    &format!("plugin_route_{id}"),
                    br#"{"status":"ACTIVE"}"#,
                    "-1",
                ),
            )
            .await
            .unwrap();
    }
    seed(
        &*store,
        StoreKind::Private,
        "all_registered_plugin",
        &Value::Object(registry).to_string(),
    )
    .await;
    // A request that got through would write STOPPED to its route.
    sim.set_default(Behavior::v0("STOPPED"));
    sim.record_requests(true);

    let out = keel()
        .redis(&server.url(), &sim.url_template())
        .args(["once", "--holder-id", "replica-a"])
        .run_async()
        .await;
    out.assert_code(0);
    let events = out.events();

    let logged = events.named("invalid_plugin_id");
    assert_eq!(logged.len(), invalid.len(), "{}", out.describe());
    for id in [
        "../v1.0/state/x",
        "a/b",
        "a?b",
        "%2e%2e",
        "a#b",
        "app.other-namespace",
        "a b",
        "café",
    ] {
        assert!(
            logged.iter().any(|e| e["plugin_id"] == id),
            "{id:?} not logged\n{}",
            out.describe()
        );
    }

    let recorded = sim.recorded();
    let mut requested: Vec<String> = recorded.iter().map(|r| r.target.clone()).collect();
    requested.sort();
    let mut expected: Vec<String> = valid.iter().map(|id| format!("/{id}/v1/status")).collect();
    expected.sort();
    assert_eq!(requested, expected, "only valid ids may be requested");
    assert_eq!(sim.total_requests(), valid.len() as u64);

    let done = events.one("tick_completed");
    assert_eq!(done["probed_ok"], valid.len(), "{done}");
    assert_eq!(done["probe_failed"], 0, "{done}");
    for id in &valid {
        assert_eq!(
            route_status(&server, id).as_deref(),
            Some("STOPPED"),
            "{id}"
        );
    }
    for id in &invalid {
        assert_eq!(
            raw_version(&server, &format!("plugin_route_{id}")),
            Some(1),
            "{id:?} was written"
        );
    }
}

/// `<prefix>-<pid>-<4 lowercase hex digits>`.
fn assert_holder_format(holder: &str, prefix: &str, pid: u32) {
    let rest = holder
        .strip_prefix(&format!("{prefix}-{pid}-"))
        .unwrap_or_else(|| panic!("holder {holder:?} does not start with {prefix}-{pid}-"));
    assert_eq!(rest.len(), 4, "{holder:?}");
    assert!(
        rest.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{holder:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_holder_id_is_pod_name_pid_and_four_hex_digits() {
    let server = RedisServer::start();
    let sim = PluginSim::start().unwrap();
    let once = || {
        keel()
            .redis(&server.url(), &sim.url_template())
            .arg("once")
            .env("POD_NAME", "keel-scraper-7d9f8-x2k4q")
    };

    let mut suffixes = Vec::new();
    for _ in 0..3 {
        let out = once().run_async().await;
        out.assert_code(0);
        let holder = out.events().one("tick_completed")["holder"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_holder_format(&holder, "keel-scraper-7d9f8-x2k4q", out.pid);
        suffixes.push(holder[holder.len() - 4..].to_owned());
    }
    // Random: three equal suffixes by chance happen once in 2^32 runs.
    assert!(
        suffixes.iter().any(|s| *s != suffixes[0]),
        "the 4 hex digits are not random: {suffixes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_in_the_pod_of_a_running_replica_does_not_take_its_lease() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().unwrap();
    seed_registry(&*store, &["p"]).await;
    seed_route(&*store, "p", "ACTIVE").await;
    // A replica in the pod holds a live lease. Were the default holder id the pod name
    // alone, a `once` in that pod would take this lease for its own.
    let record = r#"{"holder":"keel-scraper-0","tick":"2026-01-01T00:00:00Z"}"#;
    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", record.as_bytes(), "-1").with_ttl(60),
        )
        .await
        .unwrap();

    // `kubectl exec ... keel-scraper once` in the same pod: same POD_NAME.
    let out = keel()
        .redis(&server.url(), &sim.url_template())
        .arg("once")
        .env("POD_NAME", "keel-scraper-0")
        .run_async()
        .await;
    out.assert_code(3);
    assert_eq!(sim.total_requests(), 0);
    assert_eq!(route_status(&server, "p").as_deref(), Some("ACTIVE"));
}
