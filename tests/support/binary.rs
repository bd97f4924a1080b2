//! Running the worker the way operators and other replicas do, and reading what it says.
//!
//! * [`keel`] runs the real `keel-scraper` binary with a clean environment and a bound
//!   on its run time, and returns its exit code, stdout and stderr ([`Output`]), killing
//!   it if it overstays. Its JSON event lines parse into [`serde_json::Value`]s.
//! * [`Capture`] records, in the same JSON line format, the events one in-process tick
//!   emits (the subscriber is attached to that future only, so tests running in
//!   parallel, or several tickers racing in one test, never mix their events).
//! * [`ReplicaOptions`] / [`redis_ticker`] build a real [`Ticker`] (Redis store,
//!   HTTP prober, lease) as one replica of the worker, and [`seed`] / [`raw_data`] /
//!   [`raw_version`] put and read Dapr-layout values in the test Redis.

use std::ffi::OsString;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_scraper::decision::Thresholds;
use keel_scraper::lease::Lease;
use keel_scraper::probe::{ProbeSettings, Prober};
use keel_scraper::store::redis::RedisStore;
use keel_scraper::store::{Save, Store, StoreKind, ABSENT_ETAG};
use keel_scraper::tick::Ticker;
use keel_test_support::process::Spawn;
use keel_test_support::sim::PluginSim;
use serde_json::Value;
use tracing::instrument::WithSubscriber;

use super::redis_server::RedisServer;

/// The path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keel-scraper");

/// Default bound on one run of the binary.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// A command line for the binary, built up and then run.
#[derive(Clone, Debug)]
pub struct Keel {
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    timeout: Duration,
}

/// `keel-scraper` with no arguments and an environment holding only `PATH`, so no
/// `SCRAPER_*`, `REDIS_URL` or `POD_NAME` of the machine running the tests leaks in.
pub fn keel() -> Keel {
    Keel {
        args: Vec::new(),
        envs: Vec::new(),
        timeout: RUN_TIMEOUT,
    }
}

/// `routes --json` against the `redis` backend at `redis_url`; more arguments may follow.
pub fn routes_json(redis_url: &str) -> Keel {
    keel().args([
        "routes",
        "--json",
        "--backend",
        "redis",
        "--redis-url",
        redis_url,
    ])
}

impl Keel {
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.envs.push((name.to_owned(), value.to_owned()));
        self
    }

    /// [`Keel::env`] for each `(name, value)`, in order.
    pub fn envs(self, envs: &[(&str, &str)]) -> Self {
        envs.iter()
            .fold(self, |keel, (name, value)| keel.env(name, value))
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `--backend redis --redis-url <url> --status-url <template>`.
    pub fn redis(self, url: &str, status_url: &str) -> Self {
        self.args(redis_backend(url, status_url))
    }

    /// Runs the binary to its end (or kills it at the timeout). Blocking.
    pub fn run(self) -> Output {
        let run = Spawn::new(BIN)
            .args(&self.args)
            .envs(self.envs.iter().map(|(n, v)| (n, v)))
            .run(self.timeout);
        Output {
            code: run.code(),
            stdout: run.stdout,
            stderr: run.stderr,
            pid: run.pid,
            elapsed: run.elapsed,
            timed_out: run.timed_out,
            args: self.args,
        }
    }

    /// [`Keel::run`] on the blocking pool, for async tests whose runtime must keep
    /// serving plugin simulators while the binary runs.
    pub async fn run_async(self) -> Output {
        tokio::task::spawn_blocking(move || self.run())
            .await
            .expect("the binary runner panicked")
    }
}

/// `--backend redis --redis-url <url> --status-url <template>`.
pub fn redis_backend<'a>(url: &'a str, status_url: &'a str) -> [&'a str; 6] {
    [
        "--backend",
        "redis",
        "--redis-url",
        url,
        "--status-url",
        status_url,
    ]
}

/// `--backend dapr` through a sidecar at these endpoints.
pub fn dapr_backend<'a>(grpc: &'a str, http: &'a str) -> [&'a str; 6] {
    [
        "--backend",
        "dapr",
        "--dapr-grpc-endpoint",
        grpc,
        "--dapr-http-endpoint",
        http,
    ]
}

/// What one run of the binary did.
#[derive(Clone, Debug)]
pub struct Output {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub pid: u32,
    pub elapsed: Duration,
    pub timed_out: bool,
    args: Vec<OsString>,
}

impl Output {
    /// Everything about the run, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "keel-scraper {:?}\nexit code {:?} after {:?}{}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.args,
            self.code,
            self.elapsed,
            if self.timed_out {
                " (killed at the timeout)"
            } else {
                ""
            },
            self.stdout,
            self.stderr
        )
    }

    /// Asserts the exit code, showing the whole run when it differs.
    pub fn assert_code(&self, expected: i32) -> &Self {
        assert!(
            !self.timed_out,
            "the binary overstayed\n{}",
            self.describe()
        );
        assert_eq!(self.code, Some(expected), "{}", self.describe());
        self
    }

    /// Every stdout line parsed as JSON; panics (failing the test) on a line that is not
    /// a JSON object with `timestamp`, `level` and `event`.
    pub fn events(&self) -> Events {
        Events::parse(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON event lines: {e}\n{}", self.describe()))
    }

    /// The JSON lines on stderr, skipping plain-text lines (the final message).
    pub fn stderr_events(&self) -> Events {
        Events(
            self.stderr
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(Value::is_object)
                .collect(),
        )
    }
}

/// Parsed JSON event lines.
#[derive(Clone, Debug, Default)]
pub struct Events(pub Vec<Value>);

impl Events {
    /// Parses JSON lines strictly: each non-empty line must be an object with string
    /// `timestamp`, `level` and `event` members at top level.
    pub fn parse(text: &str) -> Result<Events, String> {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let value: Value = serde_json::from_str(line)
                .map_err(|e| format!("line {line:?} is not JSON: {e}"))?;
            for member in ["timestamp", "level", "event"] {
                if !value.get(member).is_some_and(Value::is_string) {
                    return Err(format!("line {line:?} has no string {member:?}"));
                }
            }
            out.push(value);
        }
        Ok(Events(out))
    }

    /// Keeps every line that is JSON, in order, and skips the others (plain text, an empty
    /// line, a line cut short when the process was killed). Unlike [`Events::parse`] it
    /// does not require `event` members: a live process's stdout with
    /// `SCRAPER_LOG=trace` also carries the libraries' own lines, which have none.
    pub fn lenient<'a>(lines: impl IntoIterator<Item = &'a str>) -> Events {
        Events(
            lines
                .into_iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect(),
        )
    }

    /// The events named `name`, in order.
    pub fn named(&self, name: &str) -> Vec<&Value> {
        self.0.iter().filter(|e| e["event"] == name).collect()
    }

    /// The only event named `name`; panics when there is not exactly one.
    pub fn one(&self, name: &str) -> &Value {
        let found = self.named(name);
        assert_eq!(found.len(), 1, "expected one {name:?} event in\n{self}");
        found[0]
    }

    /// The events named `name` about plugin `plugin_id`.
    pub fn for_plugin(&self, name: &str, plugin_id: &str) -> Vec<&Value> {
        self.named(name)
            .into_iter()
            .filter(|e| e["plugin_id"] == plugin_id)
            .collect()
    }

    pub fn has(&self, name: &str) -> bool {
        !self.named(name).is_empty()
    }
}

impl std::fmt::Display for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Records the events of the futures it is attached to, as the binary's JSON lines.
#[derive(Clone)]
pub struct Capture {
    buffer: Arc<Mutex<Vec<u8>>>,
    dispatch: tracing::Dispatch,
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    pub fn new() -> Capture {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_target(false)
            .with_current_span(false)
            .with_span_list(false)
            // The worker's own events only: library debug lines carry no `event`.
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "keel_scraper::events=debug",
            ))
            .with_writer(move || CaptureWriter(writer.clone()))
            .finish();
        Capture {
            buffer,
            dispatch: tracing::Dispatch::new(subscriber),
        }
    }

    /// Runs `fut` with this capture as its subscriber (only while it is polled).
    pub async fn run<F: std::future::Future>(&self, fut: F) -> F::Output {
        fut.with_subscriber(self.dispatch.clone()).await
    }

    /// The events recorded so far.
    pub fn events(&self) -> Events {
        let text = String::from_utf8_lossy(&self.buffer.lock().unwrap_or_else(|p| p.into_inner()))
            .into_owned();
        Events::parse(&text).unwrap_or_else(|e| panic!("captured events: {e}"))
    }
}

impl Default for Capture {
    fn default() -> Self {
        Capture::new()
    }
}

/// The store names the worker uses by default.
pub const PUBLIC: &str = "keel-public-store";
pub const PRIVATE: &str = "keel-private-store";

/// Connects a Redis store with the default names and the `plugins` private prefix.
pub async fn redis_store(server: &RedisServer) -> Arc<dyn Store> {
    let store = RedisStore::connect(&server.url(), PUBLIC, PRIVATE, "plugins")
        .await
        .unwrap_or_else(|e| panic!("connect to test redis {}: {e}", server.endpoint()));
    Arc::new(store)
}

/// A test Redis, a store on it and a plugin simulator: the ground of the in-process tick
/// tests (each test file adds the methods it needs).
pub struct World {
    pub server: RedisServer,
    pub store: Arc<dyn Store>,
    pub sim: PluginSim,
}

pub async fn world() -> World {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().expect("start the plugin simulator");
    World { server, store, sim }
}

/// One replica of the worker, as `run` or `once` would build it.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    pub holder: String,
    pub lease: Duration,
    pub interval: Duration,
    pub probe_timeout: Duration,
    pub retries: u32,
    pub unhealthy: u32,
    pub healthy: u32,
    pub concurrency: usize,
    /// `--foreign-lock-ttl`.
    pub foreign_lock_ttl: Duration,
}

impl ReplicaOptions {
    /// The worker's defaults for a `*/10` schedule, no retries, under `holder`.
    pub fn new(holder: &str) -> ReplicaOptions {
        ReplicaOptions {
            holder: holder.to_owned(),
            lease: Duration::from_secs(10),
            interval: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(2),
            retries: 0,
            unhealthy: 2,
            healthy: 1,
            concurrency: 16,
            foreign_lock_ttl: keel_scraper::lease::DEFAULT_FOREIGN_LOCK_TTL,
        }
    }

    pub fn foreign_lock_ttl(mut self, ttl: Duration) -> Self {
        self.foreign_lock_ttl = ttl;
        self
    }

    pub fn lease(mut self, lease: Duration, interval: Duration) -> Self {
        self.lease = lease;
        self.interval = interval;
        self
    }

    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    pub fn thresholds(mut self, unhealthy: u32, healthy: u32) -> Self {
        self.unhealthy = unhealthy;
        self.healthy = healthy;
        self
    }
}

/// A ticker on `store` probing `status_url`.
pub fn ticker(store: Arc<dyn Store>, status_url: &str, o: &ReplicaOptions) -> Ticker {
    let prober = Prober::new(ProbeSettings {
        timeout: o.probe_timeout,
        retries: o.retries,
        concurrency: o.concurrency,
        ..ProbeSettings::new(status_url)
    })
    .unwrap_or_else(|e| panic!("prober for {status_url}: {e}"));
    let lease = Lease::new(store.clone(), o.holder.clone(), o.lease, o.interval)
        .with_foreign_ttl(o.foreign_lock_ttl);
    Ticker::new(
        store,
        Arc::new(prober),
        Arc::new(lease),
        Thresholds {
            unhealthy: o.unhealthy,
            healthy: o.healthy,
        },
        o.concurrency,
    )
}

/// A ticker with its own Redis connection, as a separate replica would have.
pub async fn redis_ticker(server: &RedisServer, status_url: &str, o: &ReplicaOptions) -> Ticker {
    ticker(redis_store(server).await, status_url, o)
}

/// Creates `key` (first-write, no TTL) the way the Plugins plugin would through Dapr.
pub async fn seed(store: &dyn Store, kind: StoreKind, key: &str, data: &str) {
    store
        .save(kind, Save::cas(key, data.as_bytes(), ABSENT_ETAG))
        .await
        .unwrap_or_else(|e| panic!("seed {key}: {e}"));
}

/// Seeds the registry with `ids` (values `"true"`, as Plugins writes them; the stored
/// object lists the ids in sorted order).
pub async fn seed_registry(store: &dyn Store, ids: &[&str]) {
    let map: serde_json::Map<String, Value> = ids
        .iter()
        .map(|id| ((*id).to_owned(), Value::String("true".into())))
        .collect();
    seed(
        store,
        StoreKind::Private,
        "all_registered_plugin",
        &Value::Object(map).to_string(),
    )
    .await;
}

/// Seeds `plugin_route_<id>` with `{"status":<status>,...}` and a few other fields.
pub async fn seed_route(store: &dyn Store, id: &str, status: &str) {
    let route = format!(
        r#"{{"status":"{status}","tkeel_version":"v0.4.0","register_addons":{{"{id}_created":"{id}/v1/hook"}}}}"#
    );
    seed(
        store,
        StoreKind::Public,
        &format!("plugin_route_{id}"),
        &route,
    )
    .await;
}

/// Writes `redis_key` in Dapr's `state.redis` layout (a HASH with `data` and `version` 1)
/// with raw Redis commands.
pub fn raw_put(server: &RedisServer, redis_key: &str, data: &str) {
    server.query::<()>(
        redis::cmd("HSET")
            .arg(redis_key)
            .arg("data")
            .arg(data)
            .arg("version")
            .arg(1),
    );
}

/// Registers `ids` in the private store (under the Plugins app id's prefix) and gives each
/// `(id, status)` a route as Plugins writes one, with raw Redis commands.
pub fn raw_seed(server: &RedisServer, ids: &[&str], routes: &[(&str, &str)]) {
    let registry: serde_json::Map<String, serde_json::Value> = ids
        .iter()
        .map(|id| (id.to_string(), serde_json::Value::String("true".into())))
        .collect();
    raw_put(
        server,
        "plugins||all_registered_plugin",
        &serde_json::Value::Object(registry).to_string(),
    );
    for (id, status) in routes {
        raw_put(
            server,
            &format!("plugin_route_{id}"),
            &serde_json::json!({ "status": status, "tkeel_version": "v0.2.0" }).to_string(),
        );
    }
}

/// The `data` field of a Dapr state hash, read with raw Redis commands.
pub fn raw_data(server: &RedisServer, redis_key: &str) -> Option<Vec<u8>> {
    server
        .hgetall(redis_key)
        .into_iter()
        .find(|(f, _)| f == "data")
        .map(|(_, v)| v)
}

/// The `data` field parsed as JSON.
pub fn raw_json(server: &RedisServer, redis_key: &str) -> Option<Value> {
    raw_data(server, redis_key).map(|d| {
        serde_json::from_slice(&d).unwrap_or_else(|e| {
            panic!(
                "{redis_key} holds no JSON ({e}): {:?}",
                String::from_utf8_lossy(&d)
            )
        })
    })
}

/// The `version` field of a Dapr state hash (the ETag), or `None` when the key is gone.
pub fn raw_version(server: &RedisServer, redis_key: &str) -> Option<i64> {
    server
        .hgetall(redis_key)
        .into_iter()
        .find(|(f, _)| f == "version")
        .map(|(_, v)| {
            String::from_utf8_lossy(&v)
                .parse()
                .unwrap_or_else(|e| panic!("{redis_key} version: {e}"))
        })
}

/// A route's status as stored, read with raw Redis commands.
pub fn route_status(server: &RedisServer, id: &str) -> Option<String> {
    raw_json(server, &format!("plugin_route_{id}"))
        .map(|v| v["status"].as_str().unwrap_or_default().to_owned())
}

/// Whether a Redis key exists at all.
pub fn exists(server: &RedisServer, redis_key: &str) -> bool {
    server.query::<i64>(redis::cmd("EXISTS").arg(redis_key)) == 1
}

/// The key's remaining time to live in milliseconds (-1: none, -2: no key).
pub fn pttl(server: &RedisServer, redis_key: &str) -> i64 {
    server.query(redis::cmd("PTTL").arg(redis_key))
}
