//! What the replicas of a scenario share: a real `redis-server` that requires the
//! suite's password, a plugin simulator on loopback, the journal, and the routes as the
//! Plugins plugin writes them, with every field a rewrite must keep.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_scraper::route::route_key;
use keel_scraper::store::{Entry, Save, Store, StoreKind, ABSENT_ETAG};
use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::figures::Scenario;
use crate::harness::{wait_until, Journal, Replica, Spec, DAPR_TOKEN, REDIS_PASSWORD};
use crate::support::binary::redis_store;
use crate::support::redis_server::RedisServer;

/// The registry key in the private store and its Redis key (`plugins` prefix).
pub const REGISTRY_KEY: &str = "all_registered_plugin";
pub const LOCK_REDIS_KEY: &str = "plugins||scrape_state";

/// Members every seeded route carries besides `status` and `register_addons`, with the
/// exact text a rewrite must keep: a field of a newer tKeel, odd number spellings, escapes.
const KEPT: &[(&str, &str)] = &[
    ("tkeel_version", r#""v0.4.0""#),
    (
        "x_future",
        r#"{"weights":[1,2.50,-0.0,1e3],"note":"caf\u00e9 \"q\" \\ end","nested":{"a":[null,true]}}"#,
    ),
    ("big", "123456789012345678901234567890"),
];

/// Registry ids built to escape the status URL or the Dapr app id. None may be requested.
pub fn escaping_ids() -> Vec<String> {
    vec![
        "../v1.0/state/x".into(),
        "a/b".into(),
        "a?b".into(),
        "%2e%2e".into(),
        "a#b".into(),
        "app.other-namespace".into(),
        "a b".into(),
        " lead".into(),
        "x".repeat(10_000),
        "plugïn".into(),
        "插件".into(),
        "a\nb".into(),
        "..".into(),
        String::new(),
        "a%2Fb".into(),
    ]
}

/// `prefix00`, `prefix01`, ...
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:02}")).collect()
}

/// The `register_addons` Plugins writes at registration.
pub fn seeded_addons(id: &str) -> String {
    serde_json::json!({ format!("{id}_created"): format!("{id}/v1/hook") }).to_string()
}

/// A route as the Plugins plugin writes it.
pub fn route_json(id: &str, status: &str) -> String {
    let mut out = format!(
        r#"{{"status":"{status}","register_addons":{}"#,
        seeded_addons(id)
    );
    for (k, v) in KEPT {
        out.push_str(&format!(r#","{k}":{v}"#));
    }
    out.push('}');
    out
}

/// Checks a stored route: a JSON object whose members are exactly the seeded ones, every
/// kept member byte for byte, `register_addons` equal to `addons`, and a status in the
/// route vocabulary. Returns the status.
pub fn check_route(data: &[u8], addons: &str) -> Result<String, String> {
    let text = String::from_utf8_lossy(data);
    let members: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(data).map_err(|e| format!("not a JSON object ({e}): {text}"))?;
    let mut want: Vec<&str> = KEPT.iter().map(|(k, _)| *k).collect();
    want.extend(["status", "register_addons"]);
    want.sort_unstable();
    let have: Vec<&str> = members.keys().map(String::as_str).collect();
    if have != want {
        return Err(format!("members {have:?}, expected {want:?}: {text}"));
    }
    for (k, v) in KEPT {
        if members[*k].get() != *v {
            return Err(format!(
                "member {k} changed to {}: {text}",
                members[*k].get()
            ));
        }
    }
    if members["register_addons"].get() != addons {
        return Err(format!(
            "register_addons is {}, expected {addons}: {text}",
            members["register_addons"].get()
        ));
    }
    let status: String = serde_json::from_str(members["status"].get())
        .map_err(|_| format!("status is not a string: {text}"))?;
    if !["STARTING", "ACTIVE", "STOPPING", "STOPPED", "FAILED"].contains(&status.as_str()) {
        return Err(format!(
            "status {status:?} is outside the route vocabulary: {text}"
        ));
    }
    Ok(status)
}

pub struct World {
    pub redis: RedisServer,
    pub store: Arc<dyn Store>,
    pub sim: PluginSim,
    pub journal: Arc<Journal>,
}

impl World {
    /// A password-protected Redis (with an append-only file when `persistence`), a store
    /// on it and a simulator answering `ACTIVE` for every plugin.
    pub async fn start(persistence: bool) -> World {
        let mut builder = RedisServer::builder().with_password(REDIS_PASSWORD);
        if persistence {
            builder = builder.with_persistence();
        }
        let redis = tokio::task::block_in_place(|| builder.start());
        let store = redis_store(&redis).await;
        let sim = PluginSim::start().unwrap_or_else(|e| panic!("start the plugin simulator: {e}"));
        World {
            redis,
            store,
            sim,
            journal: Journal::new(),
        }
    }

    /// A replica on this world's Redis, probing this world's simulator. The scenarios
    /// that fail most of the fleet on purpose (hostile plugins, a holder killed among
    /// failing plugins) test other things than the fleet guard: it is off here
    /// (`SCRAPER_MAX_FAILED_SHARE=1`; a `--max-failed-share` flag overrides it), and the
    /// guard's own scenario (`guard.rs`) sets it.
    pub fn spec(&self, name: &str) -> Spec {
        Spec::run(name)
            .redis(&self.redis.url(), &self.sim.url_template())
            .env("SCRAPER_MAX_FAILED_SHARE", "1")
    }

    /// Writes the registry: exactly `ids`, values `"true"` as Plugins writes them.
    pub async fn set_registry(&self, ids: &[String]) {
        let map: serde_json::Map<String, Value> = ids
            .iter()
            .map(|id| (id.clone(), Value::String("true".into())))
            .collect();
        let data = Value::Object(map).to_string();
        let etag = self
            .store
            .get(StoreKind::Private, REGISTRY_KEY)
            .await
            .unwrap_or_else(|e| panic!("read the registry: {e}"))
            .map_or(ABSENT_ETAG.to_owned(), |e| e.etag);
        self.store
            .save(
                StoreKind::Private,
                Save::cas(REGISTRY_KEY, data.as_bytes(), &etag),
            )
            .await
            .unwrap_or_else(|e| panic!("write the registry: {e}"));
    }

    /// Creates each route with `status` (first write, as Plugins does).
    pub async fn create_routes(&self, ids: &[String], status: &str) {
        for id in ids {
            let data = route_json(id, status);
            self.store
                .save(
                    StoreKind::Public,
                    Save::cas(&route_key(id), data.as_bytes(), ABSENT_ETAG),
                )
                .await
                .unwrap_or_else(|e| panic!("create the route of {id:?}: {e}"));
        }
    }

    /// Registry and routes for `ids`.
    pub async fn seed(&self, ids: &[String], status: &str) {
        self.create_routes(ids, status).await;
        self.set_registry(ids).await;
    }

    pub async fn route(&self, id: &str) -> Option<Entry> {
        self.store
            .get(StoreKind::Public, &route_key(id))
            .await
            .unwrap_or_else(|e| panic!("read the route of {id}: {e}"))
    }

    /// Every route of `ids` checked with [`check_route`] against the seeded addons;
    /// panics naming the first that is missing or inconsistent. Returns the statuses.
    pub async fn statuses(&self, ids: &[String]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for id in ids {
            let entry = self
                .route(id)
                .await
                .unwrap_or_else(|| panic!("the route of {id} is gone\n{}", self.journal.tail(30)));
            let status = check_route(&entry.data, &seeded_addons(id))
                .unwrap_or_else(|e| panic!("the route of {id} is inconsistent: {e}"));
            out.insert(id.clone(), status);
        }
        out
    }
}

impl World {
    /// One replica per name on this world, each firing on `cron`.
    pub fn spawn_replicas(&self, names: &[&str], cron: &str) -> Vec<Replica> {
        names
            .iter()
            .map(|n| self.spec(n).schedule(cron).spawn(&self.journal))
            .collect()
    }

    /// Checks that nothing any process printed holds the Redis password or the Dapr API
    /// token, and records the bytes scanned as the `bytes scanned for secrets` figure.
    pub fn figure_no_secrets(&self, sc: &mut Scenario) {
        sc.figure(
            "bytes scanned for secrets",
            self.journal
                .assert_no_secrets(&[REDIS_PASSWORD, DAPR_TOKEN]),
        );
    }

    /// Waits (20 s at most) until as many `plugin_status_changed` to `FAILED` were logged
    /// as there are `ids`.
    pub async fn wait_all_failed(&self, ids: &[String]) {
        wait_until(
            Duration::from_secs(20),
            "every route FAILED",
            &self.journal,
            || {
                let failed = self
                    .journal
                    .named("plugin_status_changed")
                    .iter()
                    .filter(|e| e.str("to") == "FAILED")
                    .count();
                (failed >= ids.len()).then_some(())
            },
        )
        .await;
    }

    /// Panics naming the routes of `ids` that are not `FAILED` (the new holder, having
    /// seen only failing answers, must have left none passing).
    pub async fn assert_none_passing(&self, ids: &[String]) {
        let statuses = self.statuses(ids).await;
        let passing: Vec<_> = statuses.iter().filter(|(_, s)| *s != "FAILED").collect();
        assert!(
            passing.is_empty(),
            "the new holder left routes passing: {passing:?}"
        );
    }

    /// Polls every route of `ids` every 50 ms until `window` has passed since `since`;
    /// returns those seen with a status other than `FAILED`, each with the first such
    /// status.
    pub async fn watch_stale(
        &self,
        ids: &[String],
        since: Instant,
        window: Duration,
    ) -> BTreeMap<String, String> {
        let mut stale: BTreeMap<String, String> = BTreeMap::new();
        while since.elapsed() < window {
            for (id, status) in self.statuses(ids).await {
                if status != "FAILED" {
                    stale.entry(id).or_insert(status);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stale
    }
}

/// Plugins whose reported status changes on a period, each a step apart, while ticks run.
pub struct Flapper {
    stop: Arc<AtomicBool>,
    task: JoinHandle<u64>,
}

/// The statuses (and one failing answer) plugins flap through.
pub fn flap_cycle() -> Vec<Behavior> {
    vec![
        Behavior::v0("ACTIVE"),
        Behavior::v0("STOPPED"),
        Behavior::v1("WAIT_RUNNING"),
        Behavior::raw(500, r#"{"ret":-1,"msg":"down"}"#),
        Behavior::v1("RUNNING"),
        Behavior::v0("FAILED"),
    ]
}

impl Flapper {
    /// Every `period`, plugin `i` moves to step `(round + i)` of `cycle`, answering after
    /// `delay`.
    pub fn start(
        sim: &PluginSim,
        ids: &[String],
        period: Duration,
        delay: Duration,
        cycle: Vec<Behavior>,
    ) -> Flapper {
        let stop = Arc::new(AtomicBool::new(false));
        let (sim, ids, flag) = (sim.clone(), ids.to_vec(), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            let mut round = 0u64;
            while !flag.load(Ordering::SeqCst) {
                for (i, id) in ids.iter().enumerate() {
                    let step = (round as usize + i) % cycle.len();
                    sim.set(id.clone(), Behavior::delay(delay, cycle[step].clone()));
                }
                round += 1;
                tokio::time::sleep(period).await;
            }
            round
        });
        Flapper { stop, task }
    }

    /// Stops flapping and leaves every plugin answering `last`; returns the rounds.
    pub async fn stop(self, sim: &PluginSim, ids: &[String], last: Behavior) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let rounds = self.task.await.unwrap_or(0);
        sim.set_many(ids.iter().cloned(), last);
        rounds
    }
}

/// A TCP relay in front of Redis for one replica, whose client-to-Redis direction can be
/// held: bytes the replica sends while it is held wait in the relay and reach Redis, in
/// order, only when it is let go. A network stall (or a partition that heals) between one
/// replica and the store, with the store and every other replica unaffected.
pub struct StallProxy {
    port: u16,
    held: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl StallProxy {
    pub async fn start(redis_port: u16) -> StallProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind the relay: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("relay address: {e}"))
            .port();
        let (held, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let mut watch = watch.clone();
                connections.spawn(async move {
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                    else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let forward = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_rx.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if watch.wait_for(|held| !held).await.is_err()
                                || server_tx.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    };
                    let backward = tokio::io::copy(&mut server_rx, &mut client_tx);
                    tokio::select! {
                        _ = forward => {}
                        _ = backward => {}
                    }
                });
            }
        });
        StallProxy { port, held, task }
    }

    /// The Redis URL through the relay, with the suite's password.
    pub fn url(&self) -> String {
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/", self.port)
    }

    /// A handle that holds or releases the relay from any thread.
    pub fn switch(&self) -> tokio::sync::watch::Sender<bool> {
        self.held.clone()
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
