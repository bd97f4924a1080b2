//! The production path end to end on a real Dapr sidecar: the real `keel-scraper` binary
//! with `--backend dapr` next to a real `daprd` (self-hosted, the repository's own
//! `components/` pointed at a password-protected `redis-server`), plugins reached through
//! real service invocation (`HTTPEndpoint` resources pointing at plugin simulators, and one
//! plugin as a real Dapr app behind its own daprd), checked in raw Redis.

mod support;

use keel_test_support::process::bounded;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_scraper::store::redis::RedisStore;
use keel_scraper::store::Store;
use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::{exists, keel, raw_version, route_status, seed_registry, seed_route, Keel};
use support::daprd::{try_http, Daprd, DaprdBuilder, PRIVATE_PREFIX, PRIVATE_STORE, PUBLIC_STORE};
use support::live::{http_get, is, Worker};
use support::redis_server::{free_port, RedisServer};

const TEST_BOUND: Duration = Duration::from_secs(120);
const HOLDER: &str = "e2e-replica";
const PASSWORD: &str = "e2e-redis-pw";
const TOKEN: &str = "e2e-Dapr-T0ken-5d1c";

/// A Redis, the plugin simulator, a seeder writing as the Plugins plugin would through
/// its own sidecar (same layout; see tests/daprd_store.rs), and sidecars next to workers.
struct Rig {
    redis: RedisServer,
    sim: PluginSim,
    seeder: Arc<dyn Store>,
}

async fn rig() -> Rig {
    let redis = RedisServer::builder().with_password(PASSWORD).start();
    let sim = PluginSim::start().expect("start the plugin simulator");
    let seeder = seeder(&redis).await;
    Rig { redis, sim, seeder }
}

async fn seeder(redis: &RedisServer) -> Arc<dyn Store> {
    Arc::new(
        RedisStore::connect(&redis.url(), PUBLIC_STORE, PRIVATE_STORE, PRIVATE_PREFIX)
            .await
            .unwrap_or_else(|e| panic!("connect the seeder: {e}")),
    )
}

impl Rig {
    /// A worker's sidecar with one `HTTPEndpoint` per simulated plugin in `ids`.
    fn sidecar(&self, ids: &[&str]) -> DaprdBuilder {
        Daprd::builder("keel-scraper", &self.redis).with_sim_endpoints(&self.sim.origin(), ids)
    }

    fn status(&self, id: &str) -> Option<String> {
        route_status(&self.redis, id)
    }
}

/// `keel-scraper <command> --backend dapr` next to `daprd`, found as the injector tells a
/// pod's app: `DAPR_HTTP_PORT` / `DAPR_GRPC_PORT` (and `DAPR_API_TOKEN` when the sidecar
/// has one); the status URL is the default, Dapr service invocation.
fn worker(daprd: &Daprd, command: &str) -> Keel {
    let mut k =
        keel()
            .arg(command)
            .args(["--backend", "dapr", "--holder-id", HOLDER, "--retries", "0"]);
    for (name, value) in daprd.worker_env() {
        k = k.env(&name, &value);
    }
    k
}

/// `run` next to `daprd` ticking every second, as a live process.
fn run_worker(daprd: &Daprd, holder: &str, extra: &[&str]) -> Worker {
    let mut args = vec![
        "run",
        "--backend",
        "dapr",
        "--holder-id",
        holder,
        "--retries",
        "0",
        "--schedule",
        "* * * * * *",
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let env = daprd.worker_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    Worker::spawn(&args, &env)
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

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_and_routes_through_real_daprd_write_exactly_what_the_redis_backend_writes() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let ids = ["go-style", "steady", "stopping", "broken", "running-v1"];
        let daprd = blocking(|| rig.sidecar(&ids).start());
        let direct = RedisServer::start();
        let direct_store = seeder(&direct).await;
        let go_route = r#"{"tkeel_version":"v0.4.0","status":"STARTING","register_addons":{"hook":"a\u0026b"},"weight":1.50}"#;
        for store in [&rig.seeder, &direct_store] {
            let s = &**store;
            seed_registry(s, &ids).await;
            support::binary::seed(s, keel_scraper::store::StoreKind::Public, "plugin_route_go-style", go_route).await;
            seed_route(s, "steady", "ACTIVE").await;
            seed_route(s, "stopping", "ACTIVE").await;
            seed_route(s, "broken", "ACTIVE").await;
            seed_route(s, "running-v1", "STARTING").await;
        }
        rig.sim.set("go-style", Behavior::v0("ACTIVE"));
        rig.sim.set("steady", Behavior::v0("ACTIVE"));
        rig.sim.set("stopping", Behavior::v0("STOPPING"));
        rig.sim.set("broken", Behavior::raw(500, r#"{"error":"boom"}"#));
        rig.sim.set("running-v1", Behavior::v1("RUNNING"));

        let via_dapr = worker(&daprd, "once").run_async().await;
        via_dapr.assert_code(0);
        let events = via_dapr.events();
        let done = events.one("tick_completed");
        assert_eq!(done["plugins"], 5, "{events}");
        assert_eq!(done["routes_changed"], 3, "{events}");
        // Every status call went through daprd's service invocation to the simulator.
        for id in ids {
            assert_eq!(rig.sim.requests(id), 1, "{id}");
        }
        let via_redis = keel()
            .redis(&direct.url(), &rig.sim.url_template())
            .args(["once", "--holder-id", HOLDER, "--retries", "0"])
            .run_async()
            .await;
        via_redis.assert_code(0);

        assert_eq!(rig.status("go-style").as_deref(), Some("ACTIVE"));
        assert_eq!(rig.status("stopping").as_deref(), Some("STOPPING"));
        assert_eq!(rig.status("running-v1").as_deref(), Some("ACTIVE"));
        assert_eq!(raw_version(&rig.redis, "plugin_route_steady"), Some(1));
        let a = snapshot(&rig.redis);
        let b = snapshot(&direct);
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for id in ids {
            let key = format!("plugin_route_{id}");
            assert_eq!(a[&key], b[&key], "{key}: the bytes differ between dapr and redis");
        }
        let counters = format!("{PRIVATE_PREFIX}||scrape_counters");
        assert_eq!(a[&counters], b[&counters]);

        // `routes` reads the same through daprd.
        let routes = worker(&daprd, "routes").arg("--json").run_async().await;
        routes.assert_code(0);
        let rows: Value = serde_json::from_str(routes.stdout.trim()).expect("one JSON array");
        let statuses: BTreeMap<String, Value> = rows
            .as_array()
            .expect("an array")
            .iter()
            .map(|r| (r["plugin_id"].as_str().unwrap_or_default().to_owned(), r["status"].clone()))
            .collect();
        assert_eq!(statuses["stopping"], "STOPPING");
        assert_eq!(statuses["broken"], "ACTIVE");
        assert_eq!(statuses.len(), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_invocation_failures_get_their_error_kind_and_the_code_daprd_sent() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let closed = free_port();
        let daprd = blocking(|| {
            rig.sidecar(&["silent", "boom"])
                .with_endpoint("refused", &format!("http://127.0.0.1:{closed}/refused"))
                .start()
        });
        seed_registry(&*rig.seeder, &["refused", "silent", "boom"]).await;
        for id in ["refused", "silent", "boom"] {
            seed_route(&*rig.seeder, id, "ACTIVE").await;
        }
        rig.sim.set(
            "silent",
            Behavior::delay(Duration::from_secs(5), Behavior::v0("ACTIVE")),
        );
        rig.sim.set(
            "boom",
            Behavior::raw(500, r#"{"error":"plugin's own body"}"#),
        );

        let out = worker(&daprd, "once")
            .args(["--probe-timeout", "1s"])
            .run_async()
            .await;
        out.assert_code(0);
        let events = out.events();
        let failed = |id: &str| -> Value {
            let all = events.for_plugin("plugin_probe_failed", id);
            assert_eq!(all.len(), 1, "{id}: {events}");
            all[0].clone()
        };
        let refused = failed("refused");
        assert_eq!(refused["error_kind"], "sidecar_invoke", "{refused}");
        assert_eq!(refused["dapr_error_code"], "ERR_DIRECT_INVOKE", "{refused}");
        assert_eq!(refused["http_status"], 500, "{refused}");
        let silent = failed("silent");
        assert_eq!(silent["error_kind"], "timeout", "{silent}");
        let boom = failed("boom");
        assert_eq!(boom["error_kind"], "http_status", "{boom}");
        assert_eq!(boom["http_status"], 500, "{boom}");
        assert!(
            boom["dapr_error_code"].is_null(),
            "a plugin's own 500 is not Dapr's: {boom}"
        );
    })
    .await;
}

/// Each scheduled tick of `events` (from all replicas) as `tick id -> holders`.
fn completions(workers: &[&Worker]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in workers {
        for e in w.events() {
            if is(&e, "tick_completed") {
                out.entry(e["tick"].as_str().unwrap_or_default().to_owned())
                    .or_default()
                    .push(e["holder"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    out
}

/// When `e` was logged (its `timestamp`, on the machine's clock).
fn logged_at(e: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap_or_default())
        .unwrap_or_else(|err| panic!("an event without a timestamp ({err}): {e}"))
        .with_timezone(&chrono::Utc)
}

/// Every `plugin_status_changed` of all replicas as `plugin id -> statuses written`, in
/// the order they were written.
fn written_statuses(workers: &[&Worker]) -> BTreeMap<String, Vec<String>> {
    let mut changes: Vec<(chrono::DateTime<chrono::Utc>, String, String)> = workers
        .iter()
        .flat_map(|w| w.events())
        .filter(|e| is(e, "plugin_status_changed"))
        .map(|e| {
            let id = e["plugin_id"].as_str().unwrap_or_default().to_owned();
            let to = e["to"].as_str().unwrap_or_default().to_owned();
            (logged_at(&e), id, to)
        })
        .collect();
    changes.sort();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, id, to) in changes {
        out.entry(id).or_default().push(to);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_each_with_its_own_daprd_complete_every_tick_exactly_once_and_survive_a_sigkill(
) {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let ids = ["a", "b", "c"];
        seed_registry(&*rig.seeder, &ids).await;
        for id in ids {
            seed_route(&*rig.seeder, id, "ACTIVE").await;
            // Slow enough that a tick holds the lease for a while.
            rig.sim.set(
                id,
                Behavior::delay(Duration::from_millis(300), Behavior::v0("ACTIVE")),
            );
        }
        let sidecars: Vec<Daprd> = blocking(|| (0..3).map(|_| rig.sidecar(&ids).start()).collect());
        let mut workers: Vec<Worker> = sidecars
            .iter()
            .enumerate()
            .map(|(i, d)| run_worker(d, &format!("replica-{i}"), &["--lease", "2s"]))
            .collect();
        // 30 consecutive ticks completed, after all three are up.
        let refs: Vec<&Worker> = workers.iter().collect();
        for w in &refs {
            w.listening_address();
        }
        // Statuses change during the window (each move written at once by the decision:
        // between the passing statuses, or to a blocking one), so routes are rewritten by
        // whichever replica holds the tick.
        let slow = |status: &str| Behavior::delay(Duration::from_millis(300), Behavior::v0(status));
        let flips: [(usize, &[(&str, &str)]); 3] = [
            (6, &[("a", "STARTING"), ("c", "STARTING")]),
            (12, &[("a", "ACTIVE"), ("b", "STOPPING")]),
            (18, &[("c", "STOPPING")]),
        ];
        let mut flipped = 0;
        let start = Instant::now();
        let window = loop {
            let done = completions(&refs);
            let ticks: Vec<&String> = done.keys().collect();
            while flipped < flips.len() && ticks.len() >= flips[flipped].0 {
                for (id, status) in flips[flipped].1 {
                    rig.sim.set(*id, slow(status));
                }
                flipped += 1;
            }
            if ticks.len() >= 32 {
                break done;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "ticks: {ticks:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for (tick, holders) in &window {
            assert_eq!(holders.len(), 1, "tick {tick} completed by {holders:?}");
        }
        // No gap: 30 consecutive seconds, each completed (the first may predate all three).
        let secs: Vec<i64> = window
            .keys()
            .map(|t| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .expect("a tick id")
                    .timestamp()
            })
            .collect();
        let tail = &secs[secs.len() - 30..];
        assert_eq!(tail[29] - tail[0], 29, "ticks missed: {secs:?}");
        let holders: BTreeSet<&String> = window.values().flatten().collect();
        assert!(!holders.is_empty());
        let settled = [("a", "ACTIVE"), ("b", "STOPPING"), ("c", "STOPPING")];
        for (id, status) in settled {
            assert_eq!(rig.status(id).as_deref(), Some(status), "{id}");
        }

        // SIGKILL whoever is in a tick now; another replica takes the ticks over once the
        // killed holder's lease (2 s, a store TTL daprd set) has ended.
        let victim = loop {
            let found = workers.iter().position(|w| {
                let evs = w.events();
                let started = evs.iter().rposition(|e| is(e, "lock_acquired"));
                let done = evs.iter().rposition(|e| is(e, "tick_completed"));
                matches!((started, done), (Some(s), Some(d)) if s > d)
                    || matches!((started, done), (Some(_), None))
            });
            if let Some(i) = found {
                break i;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let victim_id = format!("replica-{victim}");
        workers[victim].signal(libc::SIGKILL);
        let killed_at = Instant::now();
        let killed_wall = chrono::Utc::now();
        // The killed holder's lease as the store holds it: its record and the TTL left.
        let lock_key = format!("{PRIVATE_PREFIX}||scrape_state");
        let asked = chrono::Utc::now();
        let left_ms = support::binary::pttl(&rig.redis, &lock_key);
        let record = support::binary::raw_json(&rig.redis, &lock_key);
        assert!(
            left_ms > 0 && record.as_ref().is_some_and(|r| r["holder"] == victim_id.as_str()),
            "{victim_id} did not hold a live lease when killed: ttl {left_ms} ms, {record:?}"
        );
        // The lease ended no earlier than this (PTTL was read after `asked`).
        let lease_end = asked + chrono::Duration::milliseconds(left_ms);
        workers[victim].wait_exit(Duration::from_secs(5));
        let victim_took = workers[victim]
            .events()
            .iter()
            .rev()
            .find(|e| is(e, "lock_acquired"))
            .map(logged_at)
            .expect("the victim's lock_acquired");
        let before: usize = completions(&workers.iter().collect::<Vec<_>>()).len();
        let survivors: Vec<&Worker> = workers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, w)| w)
            .collect();
        loop {
            let after = completions(&survivors);
            let newer = after.len() + completions(&[&workers[victim]]).len();
            if newer > before + 2 {
                break;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(15),
                "no take-over after the holder was killed{}",
                survivors[0].dump()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let all = completions(&workers.iter().collect::<Vec<_>>());
        for (tick, holders) in &all {
            assert_eq!(holders.len(), 1, "tick {tick} completed twice: {holders:?}");
        }
        // The take-over: no other replica completed a tick while the killed holder's lease
        // was live, and one took the lock after it ended, within the lease (2 s) + one
        // interval (1 s) + a margin of the kill.
        let survivor_events: Vec<Value> = survivors.iter().flat_map(|w| w.events()).collect();
        let during: Vec<&Value> = survivor_events
            .iter()
            .filter(|e| is(e, "tick_completed"))
            .filter(|e| (victim_took..lease_end).contains(&logged_at(e)))
            .collect();
        assert!(
            during.is_empty(),
            "ticks completed while {victim_id}'s lease was live (until {lease_end}): {during:?}"
        );
        let take_over = survivor_events
            .iter()
            .filter(|e| is(e, "lock_acquired"))
            .map(logged_at)
            .filter(|t| *t > killed_wall)
            .min()
            .expect("a survivor took the lock");
        assert!(
            take_over >= lease_end,
            "taken over at {take_over}, before the lease ended at {lease_end}"
        );
        let bound = chrono::Duration::milliseconds(2_000 + 1_000 + 1_000);
        assert!(
            take_over - killed_wall <= bound,
            "taken over {:?} after the kill (lease left {left_ms} ms), later than lease + interval + 1 s",
            (take_over - killed_wall).to_std()
        );

        eprintln!(
            "{victim_id} killed with {left_ms} ms of lease left; taken over {} ms after the kill",
            (take_over - killed_wall).num_milliseconds()
        );

        // After the run, every route's Redis bytes are exactly what the `redis` backend
        // writes for the same changes: replay the statuses written through daprd, step by
        // step, with `once --backend redis` on a Redis seeded alike.
        let written = written_statuses(&workers.iter().collect::<Vec<_>>());
        drop(workers);
        let expected: BTreeMap<String, Vec<String>> = [
            ("a", vec!["STARTING", "ACTIVE"]),
            ("b", vec!["STOPPING"]),
            ("c", vec!["STARTING", "STOPPING"]),
        ]
        .into_iter()
        .map(|(id, s)| (id.to_owned(), s.into_iter().map(str::to_owned).collect()))
        .collect();
        assert_eq!(written, expected, "each change written exactly once");
        let direct = RedisServer::start();
        let direct_store = seeder(&direct).await;
        seed_registry(&*direct_store, &ids).await;
        for id in ids {
            seed_route(&*direct_store, id, "ACTIVE").await;
        }
        let steps = written.values().map(Vec::len).max().unwrap_or(0);
        for step in 0..steps {
            for (id, statuses) in &written {
                let status = &statuses[step.min(statuses.len() - 1)];
                rig.sim.set(id.as_str(), Behavior::v0(status));
            }
            let replay = keel()
                .redis(&direct.url(), &rig.sim.url_template())
                .args(["once", "--holder-id", HOLDER, "--retries", "0"])
                .run_async()
                .await;
            replay.assert_code(0);
        }
        assert_eq!(
            stored_routes(&direct, &ids),
            stored_routes(&rig.redis, &ids)
        );
        for id in ids {
            let key = format!("plugin_route_{id}");
            assert_eq!(
                rig.redis.hgetall(&key),
                direct.hgetall(&key),
                "{key}: the bytes differ between dapr and redis"
            );
        }
    })
    .await;
}

/// Each route's stored status and version, for a readable first difference.
fn stored_routes(server: &RedisServer, ids: &[&str]) -> Vec<(String, Option<String>, Option<i64>)> {
    ids.iter()
        .map(|id| {
            let key = format!("plugin_route_{id}");
            (
                (*id).to_owned(),
                route_status(server, id),
                raw_version(server, &key),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_deleted_while_its_probe_is_in_flight_is_deleted_again_through_real_daprd() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let daprd = blocking(|| rig.sidecar(&["doomed", "kept"]).start());
        seed_registry(&*rig.seeder, &["doomed", "kept"]).await;
        seed_route(&*rig.seeder, "doomed", "ACTIVE").await;
        seed_route(&*rig.seeder, "kept", "ACTIVE").await;
        let delay = Duration::from_secs(2);
        rig.sim
            .set("doomed", Behavior::delay(delay, Behavior::v0("STOPPING")));
        rig.sim
            .set("kept", Behavior::delay(delay, Behavior::v0("STOPPING")));
        let run = tokio::spawn(
            worker(&daprd, "once")
                .args(["--probe-timeout", "5s"])
                .run_async(),
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while rig.sim.in_flight() < 2 {
            assert!(Instant::now() < deadline, "the probes never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The routes are read beside the probes (the probes are started first): give
        // that read, a few milliseconds, a quarter of the probes' delay to be done, so
        // the delete below comes after the route was read. The assertion after the
        // delete checks both probes were still in flight.
        tokio::time::sleep(delay / 4).await;
        let registry = format!("{PRIVATE_PREFIX}||all_registered_plugin");
        rig.redis.query::<redis::Value>(
            redis::cmd("HSET")
                .arg(&registry)
                .arg("data")
                .arg(r#"{"kept":"true"}"#),
        );
        rig.redis
            .query::<redis::Value>(redis::cmd("HINCRBY").arg(&registry).arg("version").arg(1));
        rig.redis
            .query::<redis::Value>(redis::cmd("DEL").arg("plugin_route_doomed"));
        assert_eq!(
            rig.sim.in_flight(),
            2,
            "the deletes landed while both probes were in flight"
        );
        let out = run.await.expect("the runner task");
        out.assert_code(0);
        let events = out.events();
        assert_eq!(
            events
                .for_plugin("route_resurrection_undone", "doomed")
                .len(),
            1,
            "{events}"
        );
        assert!(
            !exists(&rig.redis, "plugin_route_doomed"),
            "the deleted route is back\n{events}"
        );
        assert!(events
            .for_plugin("route_resurrection_undone", "kept")
            .is_empty());
        assert_eq!(rig.status("kept").as_deref(), Some("STOPPING"));
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// A plugin as a real Dapr app behind its own daprd
// ---------------------------------------------------------------------------------------

/// A plugin app serving `GET /v1/status` (what its sidecar forwards) with a v0 ACTIVE
/// answer, on its own thread; the returned port is where it listens.
fn start_status_app() -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the app");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let body = r#"{"ret":0,"msg":"ok","status":"ACTIVE"}"#;
                let reply = if head.starts_with("GET /v1/status") {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = stream.write_all(reply.as_bytes());
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_is_a_dapr_app_is_probed_sidecar_to_sidecar_over_mdns() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        let app_port = start_status_app();
        let mut app_sidecar = blocking(|| {
            Daprd::builder("dapr-app-plugin", &rig.redis)
                .with_app_port(app_port)
                .reachable_by_other_sidecars()
                .start()
        });
        let daprd = blocking(|| rig.sidecar(&[]).start());
        seed_registry(&*rig.seeder, &["dapr-app-plugin"]).await;
        seed_route(&*rig.seeder, "dapr-app-plugin", "STARTING").await;
        // mDNS needs a few seconds to resolve a new app id the first time.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = try_http(
                daprd.http_port(),
                "GET",
                "/v1.0/invoke/dapr-app-plugin/method/v1/status",
                &[],
            );
            if matches!(answer, Ok((200, _))) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "mDNS never resolved the app: {answer:?}\n{}",
                app_sidecar.log_section()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let out = worker(&daprd, "once").run_async().await;
        out.assert_code(0);
        assert_eq!(
            rig.status("dapr-app-plugin").as_deref(),
            Some("ACTIVE"),
            "{}",
            out.describe()
        );

        // The app's sidecar dies: its caller retries the call itself, so under the
        // default --probe-timeout (2 s) the failure may surface as a timeout.
        app_sidecar.kill();
        let out = worker(&daprd, "once").run_async().await;
        out.assert_code(0);
        let events = out.events();
        let failed = events.for_plugin("plugin_probe_failed", "dapr-app-plugin");
        assert_eq!(failed.len(), 1, "{events}");
        let kind = failed[0]["error_kind"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            kind == "timeout" || kind == "sidecar_invoke",
            "{}",
            failed[0]
        );
        eprintln!(
            "a dead Dapr app surfaced as error_kind={kind}: {}",
            failed[0]
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Sidecar lifecycle and the token
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_daprd_waits_then_works_and_survives_a_sidecar_crash() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        seed_registry(&*rig.seeder, &["p"]).await;
        seed_route(&*rig.seeder, "p", "STARTING").await;
        rig.sim.set("p", Behavior::v0("ACTIVE"));
        let mut daprd = rig.sidecar(&["p"]).prepare();
        let worker = run_worker(&daprd, "replica-a", &[]);
        let address = worker.listening_address();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(worker.events().iter().all(|e| !is(e, "tick_completed")));
        assert_eq!(blocking(|| http_get(&address, "/readyz")).0, 503);
        blocking(|| daprd.launch());
        worker.wait_until(Duration::from_secs(15), "a completed tick", |evs| {
            evs.iter().find(|e| is(e, "tick_completed")).cloned()
        });
        assert_eq!(rig.status("p").as_deref(), Some("ACTIVE"));
        assert_eq!(blocking(|| http_get(&address, "/readyz")).0, 200);

        // SIGKILL daprd mid-run: /readyz turns 503 within one interval + 1 s.
        daprd.kill();
        let gone = Instant::now();
        loop {
            if blocking(|| http_get(&address, "/readyz")).0 == 503 {
                break;
            }
            assert!(
                gone.elapsed() < Duration::from_secs(2),
                "/readyz still 200{}",
                worker.dump()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        blocking(|| daprd.restart());
        let back = chrono::Utc::now();
        // The first tick starting at least 1 s after outbound health answered completes.
        let first_after =
            worker.wait_until(Duration::from_secs(15), "a tick after the restart", |evs| {
                evs.iter()
                    .filter(|e| is(e, "tick_completed"))
                    .find(|e| {
                        e["tick"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .is_some_and(|t| t >= back + chrono::Duration::seconds(1))
                    })
                    .cloned()
            });
        let tick = first_after["tick"].as_str().unwrap_or_default().to_owned();
        let evs = worker.events();
        let skipped_or_failed_at_that_tick = evs
            .iter()
            .any(|e| e["tick"] == tick && (is(e, "tick_failed") || is(e, "tick_skipped")));
        assert!(!skipped_or_failed_at_that_tick, "{}", worker.dump());
        assert!(exists(&rig.redis, "plugin_route_p"), "the route was lost");
        assert_eq!(rig.status("p").as_deref(), Some("ACTIVE"));
        assert_eq!(blocking(|| http_get(&address, "/readyz")).0, 200);
        drop(worker);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_reaches_daprd_on_every_call_and_never_a_plugin_and_a_wrong_one_writes_nothing() {
    bounded(TEST_BOUND, async {
        let rig = rig().await;
        seed_registry(&*rig.seeder, &["p"]).await;
        seed_route(&*rig.seeder, "p", "STARTING").await;
        rig.sim.set("p", Behavior::v0("ACTIVE"));
        rig.sim.record_requests(true);
        let daprd = blocking(|| rig.sidecar(&["p"]).with_token(TOKEN).start());

        // The right token: state and invocation both work (daprd refuses every API call
        // without it), and the plugin never sees it.
        let out = worker(&daprd, "once").run_async().await;
        out.assert_code(0);
        assert_eq!(rig.status("p").as_deref(), Some("ACTIVE"));
        let recorded = rig.sim.recorded();
        assert_eq!(recorded.len(), 1, "one probe through daprd");
        assert!(
            recorded
                .iter()
                .all(|r| r.header("dapr-api-token").is_none()),
            "{recorded:?}"
        );
        assert!(!out.stdout.contains(TOKEN) && !out.stderr.contains(TOKEN));

        // A wrong token: `once` exits 1, nothing written.
        rig.redis
            .query::<()>(redis::cmd("DEL").arg("plugin_route_p"));
        seed_route(&*rig.seeder, "p", "STARTING").await;
        let before = snapshot(&rig.redis);
        let out = keel()
            .args(["once", "--backend", "dapr", "--holder-id", HOLDER])
            .env("DAPR_HTTP_PORT", &daprd.http_port().to_string())
            .env("DAPR_GRPC_PORT", &daprd.grpc_port().to_string())
            .env("DAPR_API_TOKEN", "wrong-token")
            .run_async()
            .await;
        out.assert_code(1);
        assert!(
            out.stdout.contains("token") || out.stderr.contains("token"),
            "{}",
            out.describe()
        );
        assert!(!out.stdout.contains("wrong-token") && !out.stderr.contains("wrong-token"));
        assert_eq!(
            snapshot(&rig.redis),
            before,
            "a wrong token wrote something"
        );

        // `run` with the wrong token keeps retrying and says why.
        let env = [
            ("DAPR_HTTP_PORT", daprd.http_port().to_string()),
            ("DAPR_GRPC_PORT", daprd.grpc_port().to_string()),
            ("DAPR_API_TOKEN", "wrong-token".to_owned()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (*a, b.as_str())).collect();
        let mut w = Worker::spawn(
            &[
                "run",
                "--backend",
                "dapr",
                "--schedule",
                "* * * * * *",
                "--listen",
                "127.0.0.1:0",
            ],
            &env,
        );
        w.wait_until(Duration::from_secs(10), "two failed ticks", |evs| {
            let failed: Vec<_> = evs.iter().filter(|e| is(e, "tick_failed")).collect();
            (failed.len() >= 2).then_some(())
        });
        let dump = w.dump();
        assert!(dump.contains("token"), "{dump}");
        assert!(!dump.contains("wrong-token"));
        assert_eq!(rig.status("p").as_deref(), Some("STARTING"));
        w.signal(libc::SIGTERM);
        w.wait_exit(Duration::from_secs(10));
    })
    .await;
}

/// The README's "Running locally with `dapr run`": daprd with the flags `dapr run` passes
/// (`--app-id keel-scraper --resources-path ./components --metrics-port 9091`, here on free
/// ports and the test's Redis), the worker given `DAPR_HTTP_PORT` / `DAPR_GRPC_PORT` as
/// `dapr run` does, and nothing else: a working pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_dapr_run_recipe_makes_a_working_pair() {
    bounded(TEST_BOUND, async {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("read README.md");
        let recipe =
            "dapr run --app-id keel-scraper --resources-path ./components --metrics-port 9091";
        assert!(
            readme.contains(recipe),
            "the README's recipe changed; update this test"
        );
        let rig = rig().await;
        seed_registry(&*rig.seeder, &["p"]).await;
        seed_route(&*rig.seeder, "p", "STARTING").await;
        rig.sim.set("p", Behavior::v0("ACTIVE"));
        // `dapr run` adds no HTTPEndpoint; a plugin is reached as configured by the
        // operator: here, an HTTPEndpoint beside the components.
        let daprd = blocking(|| rig.sidecar(&["p"]).start());
        let worker = run_worker(&daprd, "local", &[]);
        worker.wait_until(Duration::from_secs(15), "a completed tick", |evs| {
            evs.iter().find(|e| is(e, "tick_completed")).cloned()
        });
        assert_eq!(rig.status("p").as_deref(), Some("ACTIVE"));
        drop(worker);
    })
    .await;
}
