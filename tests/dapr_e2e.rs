//! The production path end to end: the real `keel-scraper` binary with `--backend dapr`
//! against the sidecar double (gRPC state API over a real `redis-server`, HTTP service
//! invocation proxied to real plugin simulators), checked in raw Redis.
//!
//! Covered here: `once` changes exactly the routes whose status changed; what the Dapr
//! path writes is byte-identical to what the `redis` backend writes for the same tick; the
//! API token reaches the sidecar on both surfaces and nowhere else, never printed, and a
//! wrong one fails without writing; start-up waits for a slow sidecar and gives up on a
//! dead one naming the health endpoint (`once` and `routes`); the sidecar's own invoke
//! failure is told apart from a plugin's error status; a route deleted while its probe is
//! in flight (which Dapr's CAS write re-creates) is deleted again; the private
//! component's `keyPrefix`, not `--private-key-prefix`, decides where the registry is.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_scraper::store::redis::RedisStore;
use keel_scraper::store::{Store, StoreKind};
use keel_test_support::process::{bounded, free_port};
use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::{
    exists, keel, raw_version, route_status, seed, seed_registry, seed_route, Keel, Output,
};
use support::redis_server::RedisServer;
use support::sidecar::{SidecarConfig, SidecarDouble};

/// Every test finishes within this, or fails.
const TEST_BOUND: Duration = Duration::from_secs(60);

/// The holder id every run uses, so lock records compare across backends.
const HOLDER: &str = "e2e-replica";

/// A sidecar double (with its own Redis), the plugin simulator it invokes, and a store
/// on the double's Redis with the double's component names and prefix, for seeding the
/// way the Plugins plugin would through its own sidecar.
struct Rig {
    sidecar: SidecarDouble,
    sim: PluginSim,
    seeder: Arc<dyn Store>,
}

/// Starts the simulator, then a double configured by `config` (given the simulator);
/// invocation goes to the simulator unless `config` routes it elsewhere.
async fn rig_with(config: impl FnOnce(&PluginSim) -> SidecarConfig) -> Rig {
    let sim = PluginSim::start().expect("start the plugin simulator");
    let mut config = config(&sim);
    if config.invoke_target.is_none() {
        config = config.with_invoke_base(&sim.origin());
    }
    let sidecar = SidecarDouble::start(config).await;
    let seeder = RedisStore::connect(
        sidecar.redis_url(),
        sidecar.public_store(),
        sidecar.private_store(),
        sidecar.private_key_prefix(),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to the double's redis: {e}"));
    Rig {
        sidecar,
        sim,
        seeder: Arc::new(seeder),
    }
}

async fn rig() -> Rig {
    rig_with(|_| SidecarConfig::default()).await
}

impl Rig {
    fn redis(&self) -> &RedisServer {
        self.sidecar
            .redis()
            .expect("the double started its own redis")
    }

    /// `keel-scraper <command> --backend dapr` pointed at the double (the gRPC endpoint
    /// without a scheme, the HTTP one with it: both spellings are accepted), the default
    /// status URL (Dapr invocation through the double), no retries.
    fn keel(&self, command: &str) -> Keel {
        keel()
            .arg(command)
            .args(["--backend", "dapr", "--dapr-grpc-endpoint"])
            .arg(format!("127.0.0.1:{}", self.sidecar.grpc_port()))
            .arg("--dapr-http-endpoint")
            .arg(self.sidecar.http_endpoint())
            .args(["--holder-id", HOLDER, "--retries", "0"])
    }

    fn once(&self) -> Keel {
        self.keel("once")
    }

    fn status(&self, id: &str) -> Option<String> {
        route_status(self.redis(), id)
    }

    fn version(&self, id: &str) -> Option<i64> {
        raw_version(self.redis(), &format!("plugin_route_{id}"))
    }

    /// The Redis key of `key` in the private component.
    fn private_key(&self, key: &str) -> String {
        self.sidecar.redis_key(StoreKind::Private, key)
    }

    /// How many gRPC state calls reached the double (any of the four methods).
    fn state_calls(&self) -> u64 {
        ["GetState", "GetBulkState", "SaveState", "DeleteState"]
            .iter()
            .map(|m| self.sidecar.calls(m))
            .sum()
    }
}

/// Every key of a Redis server with its hash fields, sorted.
fn snapshot(server: &RedisServer) -> BTreeMap<String, Vec<(String, Vec<u8>)>> {
    let keys: Vec<String> = server.query(redis::cmd("KEYS").arg("*"));
    keys.into_iter()
        .map(|key| {
            let fields = server.hgetall(&key);
            (key, fields)
        })
        .collect()
}

/// Neither stdout nor stderr of `out` contains `secret`.
fn assert_not_printed(out: &Output, secret: &str) {
    assert!(
        !out.stdout.contains(secret) && !out.stderr.contains(secret),
        "a secret was printed\n{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------------------
// Routes through the sidecar
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_through_the_sidecar_changes_exactly_the_routes_whose_status_changed() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let s = &*rig.seeder;
        seed_registry(s, &["steady", "starting", "stopping", "running-v1"]).await;
        seed_route(s, "steady", "ACTIVE").await;
        seed_route(s, "starting", "STARTING").await;
        seed_route(s, "stopping", "ACTIVE").await;
        seed_route(s, "running-v1", "STARTING").await;
        rig.sim.set("steady", Behavior::v0("ACTIVE"));
        rig.sim.set("starting", Behavior::v0("ACTIVE"));
        rig.sim.set("stopping", Behavior::v0("STOPPING"));
        rig.sim.set("running-v1", Behavior::v1("RUNNING"));

        let out = rig.once().run_async().await;
        out.assert_code(0);
        let events = out.events();
        let done = events.one("tick_completed");
        assert_eq!(done["plugins"], 4, "{events}");
        assert_eq!(done["probed_ok"], 4, "{events}");
        assert_eq!(done["routes_changed"], 3, "{events}");

        // Raw Redis: the new statuses, and the unchanged route was not written at all.
        assert_eq!(rig.status("steady").as_deref(), Some("ACTIVE"));
        assert_eq!(rig.version("steady"), Some(1));
        for (id, status) in [
            ("starting", "ACTIVE"),
            ("stopping", "STOPPING"),
            ("running-v1", "ACTIVE"),
        ] {
            assert_eq!(rig.status(id).as_deref(), Some(status), "{id}\n{events}");
            assert_eq!(rig.version(id), Some(2), "{id}");
        }
        let stopping = events.for_plugin("plugin_status_changed", "stopping");
        assert_eq!(stopping.len(), 1, "{events}");
        assert_eq!(stopping[0]["from"], "ACTIVE");
        assert_eq!(stopping[0]["to"], "STOPPING");
        assert!(events
            .for_plugin("plugin_status_changed", "steady")
            .is_empty());

        // The status calls went through Dapr service invocation on the double, one per
        // plugin, and the state through its gRPC API.
        assert_eq!(
            rig.sidecar.calls("invoke"),
            4,
            "{:?}",
            rig.sidecar.all_calls()
        );
        for id in ["steady", "starting", "stopping", "running-v1"] {
            assert_eq!(rig.sim.requests(id), 1, "{id}");
        }
        assert!(rig.sidecar.calls("SaveState") >= 3);
        // The lock was taken and released in the private component.
        assert!(exists(rig.redis(), &rig.private_key("scrape_state")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_through_dapr_leaves_redis_byte_identical_to_the_same_tick_through_redis() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let direct = RedisServer::start();
        let direct_store: Arc<dyn Store> = Arc::new(
            RedisStore::connect(
                &direct.url(),
                rig.sidecar.public_store(),
                rig.sidecar.private_store(),
                rig.sidecar.private_key_prefix(),
            )
            .await
            .unwrap_or_else(|e| panic!("connect to the second redis: {e}")),
        );
        // As Go's encoding/json writes it (`&` as \u0026), with fields the worker does not
        // know, a number spelling a re-encoder would change, and `status` in the middle.
        let go_route = r#"{"tkeel_version":"v0.4.0","status":"STARTING","register_addons":{"hook":"a\u0026b"},"weight":1.50,"extra":[1,{"x":null}]}"#;
        // The identical seed, in the identical order, in both Redis servers.
        for store in [&rig.seeder, &direct_store] {
            let s = &**store;
            seed_registry(s, &["go-style", "steady", "stopping", "broken"]).await;
            seed(s, StoreKind::Public, "plugin_route_go-style", go_route).await;
            seed_route(s, "steady", "ACTIVE").await;
            seed_route(s, "stopping", "ACTIVE").await;
            seed_route(s, "broken", "ACTIVE").await;
        }
        rig.sim.set("go-style", Behavior::v0("ACTIVE"));
        rig.sim.set("steady", Behavior::v0("ACTIVE"));
        rig.sim.set("stopping", Behavior::v1("ERR_REGISTER"));
        rig.sim.set("broken", Behavior::raw(500, r#"{"error":"boom"}"#));

        let via_dapr = rig.once().run_async().await;
        via_dapr.assert_code(0);
        let via_redis = keel()
            .redis(&direct.url(), &rig.sim.url_template())
            .args(["once", "--holder-id", HOLDER, "--retries", "0"])
            .run_async()
            .await;
        via_redis.assert_code(0);
        assert_eq!(rig.sidecar.calls("invoke"), 4, "the dapr run probed through the sidecar");

        // The tick did change things (so the comparison is not of two untouched seeds).
        assert_eq!(rig.status("go-style").as_deref(), Some("ACTIVE"));
        assert_eq!(rig.status("stopping").as_deref(), Some("FAILED"));
        assert_eq!(rig.version("steady"), Some(1));

        let a = snapshot(rig.redis());
        let b = snapshot(&direct);
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "the same keys exist after both ticks"
        );
        for id in ["go-style", "steady", "stopping", "broken"] {
            let key = format!("plugin_route_{id}");
            assert_eq!(a[&key], b[&key], "{key}: HGETALL differs between dapr and redis");
        }
        // Every other route byte is kept on the Dapr path too.
        let expected = go_route.replace("STARTING", "ACTIVE");
        assert_eq!(
            a["plugin_route_go-style"],
            vec![
                ("data".to_string(), expected.into_bytes()),
                ("first-write".to_string(), b"0".to_vec()),
                ("version".to_string(), b"2".to_vec()),
            ]
        );
        // The failure counters (private store) are identical too.
        let counters = rig.private_key("scrape_counters");
        assert!(a.contains_key(&counters), "no counters written: {a:?}");
        assert_eq!(a[&counters], b[&counters]);
        // The lock record holds a wall-clock time; its layout and version must match.
        let lock = rig.private_key("scrape_state");
        let shape = |fields: &[(String, Vec<u8>)]| -> Vec<(String, Option<Vec<u8>>)> {
            fields
                .iter()
                .map(|(f, v)| (f.clone(), (f != "data").then(|| v.clone())))
                .collect()
        };
        assert_eq!(shape(&a[&lock]), shape(&b[&lock]));
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The API token
// ---------------------------------------------------------------------------------------

const TOKEN: &str = "e2e-T0ken-7f3a9c1b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_reaches_the_sidecar_on_both_surfaces_and_no_other_host_and_is_never_printed() {
    bounded(TEST_BOUND, async {
        let rig = rig_with(|_| SidecarConfig::default().with_token(TOKEN)).await;
        let s = &*rig.seeder;
        seed_registry(s, &["alpha", "broken"]).await;
        seed_route(s, "alpha", "STARTING").await;
        seed_route(s, "broken", "ACTIVE").await;
        rig.sim.set("alpha", Behavior::v0("ACTIVE"));
        rig.sim
            .set("broken", Behavior::raw(503, r#"{"msg":"overloaded"}"#));
        rig.sim.record_requests(true);

        // Status calls through the sidecar (the default status URL).
        let out = rig.once().env("DAPR_API_TOKEN", TOKEN).run_async().await;
        out.assert_code(0);
        assert_not_printed(&out, TOKEN);
        // The double refuses gRPC and invocation without the token: the writes and the
        // invocations it served carried it.
        assert!(rig.sidecar.saw_token());
        assert_eq!(rig.sidecar.calls("unauthorized"), 0, "{}", out.describe());
        assert_eq!(rig.sidecar.calls("invoke"), 2, "{}", out.describe());
        assert_eq!(
            rig.status("alpha").as_deref(),
            Some("ACTIVE"),
            "{}",
            out.describe()
        );
        let failed = out.events().one("plugin_probe_failed").clone();
        assert_eq!(failed["error_kind"], "http_status");

        // A custom status URL straight at the simulator: not the sidecar's origin.
        rig.sim.set("alpha", Behavior::v0("STOPPING"));
        let invokes_before = rig.sidecar.calls("invoke");
        let out = rig
            .once()
            .args(["--status-url", &rig.sim.url_template()])
            .env("DAPR_API_TOKEN", TOKEN)
            .run_async()
            .await;
        out.assert_code(0);
        assert_not_printed(&out, TOKEN);
        assert_eq!(
            rig.sidecar.calls("invoke"),
            invokes_before,
            "probes bypassed the sidecar"
        );
        // State still went through the token-checking gRPC surface.
        assert_eq!(
            rig.status("alpha").as_deref(),
            Some("STOPPING"),
            "{}",
            out.describe()
        );

        let recorded = rig.sim.recorded();
        assert_eq!(recorded.len(), 4, "two probes per run: {recorded:?}");
        for request in &recorded {
            assert_eq!(
                request.header("dapr-api-token"),
                None,
                "the simulator received the token: {request:?}"
            );
            assert!(
                request.headers.iter().all(|(_, v)| !v.contains(TOKEN)),
                "{request:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_exits_1_saying_it_was_rejected_and_writes_nothing() {
    bounded(TEST_BOUND, async {
        let rig = rig_with(|_| SidecarConfig::default().with_token(TOKEN)).await;
        let s = &*rig.seeder;
        seed_registry(s, &["alpha"]).await;
        seed_route(s, "alpha", "STARTING").await;
        rig.sim.set("alpha", Behavior::v0("ACTIVE"));
        let before = snapshot(rig.redis());
        let wrong = "wrong-T0ken-0d2e4f";

        let out = rig.once().env("DAPR_API_TOKEN", wrong).run_async().await;
        out.assert_code(1);
        assert_not_printed(&out, wrong);
        assert_not_printed(&out, TOKEN);
        let message = out.stderr.to_lowercase();
        assert!(
            message.contains("token") && message.contains("reject"),
            "the message must say the token was rejected\n{}",
            out.describe()
        );
        assert!(rig.state_calls() > 0, "the gRPC surface was reached");
        assert_eq!(snapshot(rig.redis()), before, "nothing may be written");
        assert_eq!(rig.sim.total_requests(), 0, "nothing may be probed");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Waiting for the sidecar
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_waits_for_a_sidecar_that_becomes_ready_late() {
    bounded(TEST_BOUND, async {
        let rig = rig_with(|_| SidecarConfig::default().ready_after(Duration::from_secs(2))).await;
        let s = &*rig.seeder;
        seed_registry(s, &["alpha"]).await;
        seed_route(s, "alpha", "STARTING").await;
        rig.sim.set("alpha", Behavior::v0("ACTIVE"));
        // Re-armed now, so seeding time does not eat into the unready window.
        rig.sidecar.set_ready_after(Duration::from_secs(2));

        let out = rig.once().run_async().await;
        // Unready, the double answers every state call UNAVAILABLE: exit 0 means the
        // worker waited before its first one.
        out.assert_code(0);
        assert!(
            out.elapsed >= Duration::from_millis(1500),
            "it cannot have waited\n{}",
            out.describe()
        );
        let events = out.events();
        let waiting = events.named("sidecar_waiting");
        assert!(!waiting.is_empty(), "{events}");
        for w in &waiting {
            assert_eq!(w["endpoint"], rig.sidecar.http_endpoint().as_str(), "{w}");
        }
        let position = |name: &str| events.0.iter().position(|e| e["event"] == name);
        assert!(
            position("sidecar_waiting") < position("lock_acquired"),
            "{events}"
        );
        assert_eq!(rig.status("alpha").as_deref(), Some("ACTIVE"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_gives_up_on_a_sidecar_that_never_becomes_ready_naming_the_health_endpoint() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let s = &*rig.seeder;
        seed_registry(s, &["alpha"]).await;
        seed_route(s, "alpha", "STARTING").await;
        rig.sidecar.set_ready(false);
        let before = snapshot(rig.redis());

        let started = Instant::now();
        let out = rig
            .once()
            .args(["--sidecar-wait", "2s"])
            .timeout(Duration::from_secs(20))
            .run_async()
            .await;
        out.assert_code(1);
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "it must give up soon after --sidecar-wait\n{}",
            out.describe()
        );
        assert!(
            out.elapsed >= Duration::from_millis(1800),
            "{}",
            out.describe()
        );
        let endpoint = format!(
            "127.0.0.1:{}/v1.0/healthz/outbound",
            rig.sidecar.http_port()
        );
        assert!(out.stderr.contains(&endpoint), "{}", out.describe());
        assert!(out.events().has("sidecar_waiting"), "{}", out.describe());
        assert_eq!(rig.state_calls(), 0, "{:?}", rig.sidecar.all_calls());
        assert_eq!(rig.sim.total_requests(), 0);
        assert_eq!(snapshot(rig.redis()), before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_waits_for_the_sidecar_and_gives_up_naming_the_health_endpoint() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let s = &*rig.seeder;
        seed_registry(s, &["alpha", "beta"]).await;
        seed_route(s, "alpha", "ACTIVE").await;
        seed_route(s, "beta", "FAILED").await;

        rig.sidecar.set_ready(false);
        let out = rig
            .keel("routes")
            .args(["--json", "--sidecar-wait", "1s"])
            .timeout(Duration::from_secs(20))
            .run_async()
            .await;
        out.assert_code(1);
        let endpoint = format!(
            "127.0.0.1:{}/v1.0/healthz/outbound",
            rig.sidecar.http_port()
        );
        assert!(out.stderr.contains(&endpoint), "{}", out.describe());
        assert_eq!(rig.state_calls(), 0, "{:?}", rig.sidecar.all_calls());

        rig.sidecar.set_ready_after(Duration::from_secs(2));
        let out = rig.keel("routes").arg("--json").run_async().await;
        out.assert_code(0);
        assert!(
            out.stderr_events().has("sidecar_waiting"),
            "{}",
            out.describe()
        );
        let rows: Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("routes --json: {e}\n{}", out.describe()));
        let rows: Vec<Value> = rows
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| serde_json::json!({"plugin_id": r["plugin_id"], "status": r["status"]}))
            .collect();
        assert_eq!(
            Value::Array(rows),
            serde_json::json!([
                {"plugin_id": "alpha", "status": "ACTIVE"},
                {"plugin_id": "beta", "status": "FAILED"},
            ])
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Invocation failures
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_invoke_failure_is_sidecar_invoke_and_a_plugins_error_status_is_http_status() {
    bounded(TEST_BOUND, async {
        let closed = free_port();
        let rig = rig_with(|sim| {
            let origin = sim.origin();
            SidecarConfig::default().with_invoke_target(move |id, method| match id {
                // Resolved to an address nothing listens on.
                "unreachable" => Some(format!("http://127.0.0.1:{closed}/{id}/{method}")),
                // Not resolvable at all.
                "unknown-app" => None,
                _ => Some(format!("{origin}/{id}/{method}")),
            })
        })
        .await;
        let s = &*rig.seeder;
        let ids = [
            "unreachable",
            "unknown-app",
            "sick",
            "crashing",
            "own-code",
            "fine",
        ];
        seed_registry(s, &ids).await;
        for id in ids {
            seed_route(s, id, "ACTIVE").await;
        }
        rig.sim
            .set("sick", Behavior::raw(503, r#"{"msg":"overloaded"}"#));
        rig.sim
            .set("crashing", Behavior::raw(500, r#"{"error":"boom"}"#));
        // A plugin's own error code that is not Dapr's (`ERR_` prefix) stays the plugin's.
        rig.sim.set(
            "own-code",
            Behavior::raw(500, r#"{"errorCode":"E_DB","message":"x"}"#),
        );
        rig.sim.set("fine", Behavior::v0("STOPPING"));

        let out = rig.once().run_async().await;
        out.assert_code(0);
        let events = out.events();
        let failure = |id: &str| -> Value {
            let found = events.for_plugin("plugin_probe_failed", id);
            assert_eq!(found.len(), 1, "{id}\n{events}");
            found[0].clone()
        };
        for id in ["unreachable", "unknown-app"] {
            let f = failure(id);
            assert_eq!(f["error_kind"], "sidecar_invoke", "{f}");
            assert_eq!(f["dapr_error_code"], "ERR_DIRECT_INVOKE", "{f}");
        }
        for (id, code) in [("sick", 503), ("crashing", 500), ("own-code", 500)] {
            let f = failure(id);
            assert_eq!(f["error_kind"], "http_status", "{f}");
            assert_eq!(f["http_status"], code, "{f}");
            assert!(f["dapr_error_code"].is_null(), "{f}");
        }
        assert_eq!(rig.sim.requests("unreachable"), 0);
        assert_eq!(rig.sim.requests("unknown-app"), 0);
        // The others still went through: the tick is not held up by the failures.
        assert_eq!(rig.status("fine").as_deref(), Some("STOPPING"));
        assert_eq!(events.one("tick_completed")["probe_failed"], 5, "{events}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The delete race
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_deleted_while_its_probe_is_in_flight_is_deleted_again_after_dapr_recreates_it() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let s = &*rig.seeder;
        seed_registry(s, &["doomed", "kept"]).await;
        seed_route(s, "doomed", "ACTIVE").await;
        seed_route(s, "kept", "ACTIVE").await;
        // Both answers are held back, so the test can act between read and write.
        let delay = Duration::from_secs(2);
        rig.sim
            .set("doomed", Behavior::delay(delay, Behavior::v0("STOPPING")));
        rig.sim
            .set("kept", Behavior::delay(delay, Behavior::v0("STOPPING")));

        let run = tokio::spawn(rig.once().args(["--probe-timeout", "5s"]).run_async());

        // Both probes are in flight; the routes are read beside them (the probes are
        // started first): that read, a few milliseconds, gets a quarter of the probes'
        // delay to be done. The assertion after the delete checks both probes were still
        // in flight.
        let deadline = Instant::now() + Duration::from_secs(15);
        while rig.sim.in_flight() < 2 {
            assert!(Instant::now() < deadline, "the probes never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(delay / 4).await;
        // Plugins unregisters `doomed` and deletes its route, as its sidecar would write
        // them (a new registry value and version; the route key removed).
        let redis = rig.redis();
        let registry = rig.private_key("all_registered_plugin");
        redis.query::<redis::Value>(
            redis::cmd("HSET")
                .arg(&registry)
                .arg("data")
                .arg(r#"{"kept":"true"}"#),
        );
        redis.query::<redis::Value>(redis::cmd("HINCRBY").arg(&registry).arg("version").arg(1));
        redis.query::<redis::Value>(redis::cmd("DEL").arg("plugin_route_doomed"));
        assert_eq!(
            rig.sim.in_flight(),
            2,
            "the deletes must land while both probes are still in flight"
        );

        let out = run.await.expect("the runner task");
        out.assert_code(0);
        let events = out.events();
        // Dapr's CAS write did re-create the deleted route...
        assert_eq!(
            events.for_plugin("plugin_status_changed", "doomed").len(),
            1,
            "{events}"
        );
        // ...and the worker deleted it again.
        assert_eq!(
            events
                .for_plugin("route_resurrection_undone", "doomed")
                .len(),
            1,
            "{events}"
        );
        assert!(
            !exists(redis, "plugin_route_doomed"),
            "the deleted route is back\n{events}"
        );

        // Control: still registered, written the same way, kept.
        assert!(events
            .for_plugin("route_resurrection_undone", "kept")
            .is_empty());
        assert_eq!(rig.status("kept").as_deref(), Some("STOPPING"));
        assert_eq!(rig.version("kept"), Some(2));
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Key prefixes
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_empty_names_the_private_component_whose_key_prefix_decides_the_key() {
    bounded(TEST_BOUND, async {
        // The worker's private component without `keyPrefix: plugins`: Dapr prefixes
        // with the worker's own app id, while Plugins wrote under `plugins`.
        let rig = rig_with(|_| {
            let mut config = SidecarConfig::default().with_private_key_prefix("keel-scraper");
            config.private_store = "scraper-private".to_string();
            config
        })
        .await;
        let plugins_side = RedisStore::connect(
            rig.sidecar.redis_url(),
            rig.sidecar.public_store(),
            rig.sidecar.private_store(),
            "plugins",
        )
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
        seed_registry(&plugins_side, &["alpha"]).await;
        seed_route(&plugins_side, "alpha", "ACTIVE").await;
        rig.sim.set("alpha", Behavior::v0("STOPPING"));

        let runs = [
            rig.once().args(["--private-store", "scraper-private"]),
            // Pointing --private-key-prefix at where the registry is changes nothing:
            // under dapr the component decides.
            rig.once().args([
                "--private-store",
                "scraper-private",
                "--private-key-prefix",
                "plugins",
            ]),
        ];
        for run in runs {
            let out = run.run_async().await;
            out.assert_code(0);
            let events = out.events();
            let empty = events.one("registry_empty");
            assert_eq!(empty["store"], "scraper-private", "{empty}");
            assert_eq!(empty["key"], "all_registered_plugin", "{empty}");
            let location = empty["location"].as_str().unwrap_or_default();
            assert!(
                location.contains("scraper-private") && location.contains("keyPrefix"),
                "{empty}"
            );
            assert_eq!(events.one("tick_completed")["plugins"], 0, "{events}");
        }
        assert_eq!(rig.sim.total_requests(), 0);
        assert_eq!(rig.version("alpha"), Some(1));
        // The worker's own keys went where the component put them.
        assert!(exists(rig.redis(), "keel-scraper||scrape_state"));
        assert!(!exists(rig.redis(), "plugins||scrape_state"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_prefix_does_not_apply_under_dapr() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let s = &*rig.seeder;
        seed_registry(s, &["alpha"]).await;
        seed_route(s, "alpha", "STARTING").await;
        rig.sim.set("alpha", Behavior::v0("ACTIVE"));

        let out = rig
            .once()
            .args(["--private-key-prefix", "elsewhere"])
            .run_async()
            .await;
        out.assert_code(0);
        rig.sim.set("alpha", Behavior::v0("STOPPING"));
        let from_env = rig
            .once()
            .env("SCRAPER_PRIVATE_KEY_PREFIX", "elsewhere")
            .run_async()
            .await;
        from_env.assert_code(0);

        for out in [&out, &from_env] {
            let events = out.events();
            assert!(!events.has("registry_empty"), "{events}");
            assert_eq!(events.one("tick_completed")["plugins"], 1, "{events}");
            assert_eq!(
                events.one("tick_completed")["routes_changed"],
                1,
                "{events}"
            );
        }
        assert_eq!(rig.status("alpha").as_deref(), Some("STOPPING"));
        let keys: Vec<String> = rig.redis().query(redis::cmd("KEYS").arg("*"));
        assert!(
            keys.iter().all(|k| !k.starts_with("elsewhere")),
            "the flag was applied: {keys:?}"
        );
        assert!(keys.contains(&rig.private_key("scrape_state")), "{keys:?}");
    })
    .await;
}
