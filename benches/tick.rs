//! The scale benchmark: `cargo bench --bench tick`.
//!
//! In one run it starts its own `redis-server` and plugin simulator, seeds N plugins and
//! routes in the `redis` backend's layout (N = 1 000, 10 000, 50 000) with a tenth of the
//! plugins changing status before every tick, and measures:
//!
//! * full in-process ticks (lock, registry and route reads, probes, decisions, writes,
//!   counters, release), several per N, on the `redis` and the `memory` backend;
//! * whole `keel-scraper once` processes (the binary built with the benchmark), with the
//!   process's own peak RSS;
//! * the limit for the same work in the same run: N status GETs from `wrk` at the same
//!   concurrency against the same simulator, plus the same Redis reads and writes as raw
//!   pipelined commands;
//! * the old scraper's access pattern (one plugin at a time) at N = 1 000;
//! * N = 1 000 with 5% of the plugins slower than the probe timeout;
//! * how much CPU the simulator spends per request, to show it is not the bottleneck.
//!
//! It prints one table (README, "Performance", explains every row and the targets).
//! Every wait is bounded and every process it starts is killed when it ends.
//!
//! `KEEL_BENCH_SIZES=1000,10000` limits the sizes (the targets that need a missing size
//! are then skipped); `KEEL_BENCH_STRICT=1` makes a failed target exit with code 1.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::Utc;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use keel_scraper::config::{parse_cli, Env, Settings};
use keel_scraper::lease::TickKind;
use keel_scraper::probe::{ProbeOutcome, Prober};
use keel_scraper::registry::REGISTRY_KEY;
use keel_scraper::route::{read_status, rewrite_status, route_key};
use keel_scraper::sim::{Behavior, PluginSim};
use keel_scraper::store::memory::MemoryStore;
use keel_scraper::store::{Concurrency, Save, Store, StoreKind};
use keel_scraper::tick::{TickOutcome, TickReport, Ticker};
use keel_scraper::worker;

use support::procs::{on_path, RedisServer, Tied};
use support::{Row, Stats, Target, Unit};

/// The worker's default concurrency, used by the worker and the limit alike.
const CONCURRENCY: usize = 64;
/// Plugin `i` is `p00000`.. (a valid DNS label), in Rust and in the wrk script.
const LUA_ID_FORMAT: &str = "p%05d";
/// Ticks measured per N (after one unmeasured warm-up tick).
const TICKS: usize = 5;
/// `once` processes per N.
const ONCE_RUNS: usize = 3;
const ONCE_RUNS_AT_10K: usize = 5;
/// `wrk` and pipelined Redis runs per N.
const LIMIT_RUNS: usize = 3;
/// Length of one `wrk` run.
const WRK_SECONDS: u32 = 2;
/// The slow-plugin scenario: its probe timeout and how long slow plugins take.
const SLOW_TIMEOUT: Duration = Duration::from_millis(500);
const SLOW_ANSWER: Duration = Duration::from_secs(3);
/// Retries in every scenario (the worker's default).
const RETRIES: u32 = 1;
/// Bound on one `once` process.
const ONCE_LIMIT: Duration = Duration::from_secs(60);

fn plugin_id(i: usize) -> String {
    format!("p{i:05}")
}

/// A route as the Plugins plugin writes it (the worker rewrites only `status`).
fn route_json(id: &str) -> String {
    format!(
        r#"{{"status":"ACTIVE","tkeel_version":"v0.4.1","version":"0.4.1","register_addons":{{"device_created":"{id}/v1/addons/device_created"}},"secret":"tkeel-{id}"}}"#
    )
}

/// No environment: the settings come from the arguments alone.
struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Worker settings as `keel-scraper once <args>` would build them.
fn settings(args: &[String]) -> Result<Settings> {
    let mut argv = vec!["keel-scraper".to_owned(), "once".to_owned()];
    argv.extend(args.iter().cloned());
    let (cli, _) = parse_cli(argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    Settings::from_options(&cli.options, &NoEnv).map_err(|e| anyhow::anyhow!("{e}"))
}

fn worker_args(backend: &str, redis_url: &str, template: &str, timeout: Duration) -> Vec<String> {
    let mut args = vec![
        "--backend".to_owned(),
        backend.to_owned(),
        "--status-url".to_owned(),
        template.to_owned(),
        "--concurrency".to_owned(),
        CONCURRENCY.to_string(),
        "--retries".to_owned(),
        RETRIES.to_string(),
        "--probe-timeout".to_owned(),
        humantime::format_duration(timeout).to_string(),
        "--holder-id".to_owned(),
        "keel-bench".to_owned(),
        "--log-format".to_owned(),
        "json".to_owned(),
    ];
    if backend == "redis" {
        args.extend(["--redis-url".to_owned(), redis_url.to_owned()]);
    }
    args
}

/// Flips a tenth of the plugins before every tick: group `k % 10` (ids `i % 10 == g`,
/// minus any excluded ones) toggles between `ACTIVE` and `STOPPED`.
struct Churn {
    groups: Vec<Vec<String>>,
    stopped: Vec<bool>,
    next: usize,
}

impl Churn {
    fn new(n: usize, exclude: impl Fn(usize) -> bool) -> Churn {
        let mut groups = vec![Vec::new(); 10];
        for i in (0..n).filter(|i| !exclude(*i)) {
            groups[i % 10].push(plugin_id(i));
        }
        Churn {
            groups,
            stopped: vec![false; 10],
            next: 0,
        }
    }

    /// Changes the next group in the simulator; returns how many routes must change.
    fn step(&mut self, sim: &PluginSim) -> u64 {
        let g = self.next % self.groups.len();
        self.next += 1;
        self.stopped[g] = !self.stopped[g];
        let status = if self.stopped[g] { "STOPPED" } else { "ACTIVE" };
        sim.set_many(self.groups[g].iter().cloned(), Behavior::v0(status));
        self.groups[g].len() as u64
    }

    /// The status every plugin's route must have once a tick has seen the last step.
    fn expected(&self) -> HashMap<&str, &'static str> {
        let mut out = HashMap::new();
        for (g, ids) in self.groups.iter().enumerate() {
            for id in ids {
                out.insert(
                    id.as_str(),
                    if self.stopped[g] { "STOPPED" } else { "ACTIVE" },
                );
            }
        }
        out
    }
}

/// A full tick as `once` runs it: take the lock, scrape, release. Fails unless it
/// completed and released.
async fn full_tick(t: &Ticker) -> Result<(Duration, TickReport)> {
    let started = Instant::now();
    let (outcome, guard) = t.tick(TickKind::Manual(Utc::now())).await;
    if let Some(g) = &guard {
        t.lease.release(g).await.context("release the lease")?;
    }
    let took = started.elapsed();
    match outcome {
        TickOutcome::Completed(report) => Ok((took, report)),
        other => bail!("the tick did not complete: {other:?}"),
    }
}

/// Expected counts of one tick; `None` skips a check.
#[derive(Clone, Copy)]
struct Expect {
    probed_ok: Option<u64>,
    probe_failed: Option<u64>,
    changed: Option<u64>,
}

fn check(report: &TickReport, expect: Expect) -> Result<()> {
    let wrong = |what: &str, want: Option<u64>, got: u64| {
        want.is_some_and(|w| w != got)
            .then(|| format!("{what}: expected {}, got {got}", want.unwrap_or_default()))
    };
    let problems: Vec<String> = [
        wrong("probed ok", expect.probed_ok, report.probed_ok),
        wrong("probes failed", expect.probe_failed, report.probe_failed),
        wrong("routes changed", expect.changed, report.routes_changed),
        wrong("writes failed", Some(0), report.write_failed),
        wrong("probes cut off", Some(0), report.cut_off),
    ]
    .into_iter()
    .flatten()
    .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "the tick did not do the expected work: {}",
            problems.join("; ")
        )
    }
}

/// One warm-up tick, then `ticks` measured ones, each after a churn step.
async fn measure_ticks(
    t: &Ticker,
    sim: &PluginSim,
    churn: &mut Churn,
    ticks: usize,
    expect: impl Fn(u64) -> Expect,
) -> Result<Vec<Duration>> {
    let mut took = Vec::with_capacity(ticks);
    for k in 0..=ticks {
        let changes = churn.step(sim);
        let (d, report) = full_tick(t).await?;
        check(&report, expect(changes))?;
        if k > 0 {
            took.push(d);
        }
    }
    Ok(took)
}

async fn redis_conn(url: &str) -> Result<MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// Empties Redis and writes the registry and N routes in `state.redis`'s layout.
async fn seed_redis(conn: &mut MultiplexedConnection, n: usize) -> Result<()> {
    redis::cmd("FLUSHDB").query_async::<()>(conn).await?;
    let registry: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (plugin_id(i), "true".into())).collect();
    redis::cmd("HSET")
        .arg(format!("plugins||{REGISTRY_KEY}"))
        .arg("data")
        .arg(serde_json::to_vec(&registry)?)
        .arg("version")
        .arg(1)
        .query_async::<()>(conn)
        .await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let id = plugin_id(i);
            pipe.cmd("HSET")
                .arg(route_key(&id))
                .arg("data")
                .arg(route_json(&id))
                .arg("version")
                .arg(1)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// The same registry and routes in a fresh embedded store.
async fn seed_memory(n: usize) -> Result<Arc<MemoryStore>> {
    let store = Arc::new(MemoryStore::new("keel-public-store", "keel-private-store"));
    fn plain<'a>(key: &'a str, data: &'a [u8]) -> Save<'a> {
        Save {
            key,
            data,
            etag: None,
            concurrency: Concurrency::LastWrite,
            ttl_seconds: None,
        }
    }
    let registry: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (plugin_id(i), "true".into())).collect();
    let registry = serde_json::to_vec(&registry)?;
    store
        .save(StoreKind::Private, plain(REGISTRY_KEY, &registry))
        .await?;
    for i in 0..n {
        let id = plugin_id(i);
        let (key, data) = (route_key(&id), route_json(&id));
        store
            .save(StoreKind::Public, plain(&key, data.as_bytes()))
            .await?;
    }
    Ok(store)
}

/// Checks that every route in Redis carries the status the churn implies.
async fn verify_routes(conn: &mut MultiplexedConnection, churn: &Churn) -> Result<()> {
    let expected = churn.expected();
    let ids: Vec<&str> = expected.keys().copied().collect();
    let mut wrong = 0usize;
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HGET").arg(route_key(id)).arg("data");
        }
        let data: Vec<Vec<u8>> = pipe.query_async(conn).await?;
        for (id, d) in chunk.iter().zip(data) {
            if read_status(&d).ok().as_deref() != expected.get(id).copied() {
                wrong += 1;
            }
        }
    }
    if wrong > 0 {
        bail!(
            "{wrong} of {} routes do not carry the status their plugin reports",
            ids.len()
        );
    }
    Ok(())
}

/// The Redis part of the limit: the tick's reads (registry, counters, N routes) and its
/// writes (a tenth of the routes, `HSET` + `HINCRBY` as the update script does, on
/// shadow keys) as raw commands, each set in one pipeline on one connection.
async fn redis_limit(conn: &mut MultiplexedConnection, n: usize) -> Result<Duration> {
    let data = route_json("p00000");
    let started = Instant::now();
    let mut reads = redis::pipe();
    for key in [REGISTRY_KEY, "scrape_counters"] {
        reads
            .cmd("HMGET")
            .arg(format!("plugins||{key}"))
            .arg("data")
            .arg("version");
    }
    for i in 0..n {
        reads
            .cmd("HMGET")
            .arg(route_key(&plugin_id(i)))
            .arg("data")
            .arg("version");
    }
    let replies: Vec<redis::Value> = reads.query_async(conn).await?;
    let mut writes = redis::pipe();
    for i in (0..n).step_by(10) {
        let key = format!("bench_limit_{}", plugin_id(i));
        writes
            .cmd("HSET")
            .arg(&key)
            .arg("data")
            .arg(&data)
            .arg("first-write")
            .arg("0")
            .ignore()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("version")
            .arg(1)
            .ignore();
    }
    writes.query_async::<()>(conn).await?;
    let took = started.elapsed();
    if replies.len() != n + 2 {
        bail!(
            "the pipelined reads returned {} replies for {} keys",
            replies.len(),
            n + 2
        );
    }
    Ok(took)
}

/// The old scraper's access pattern: take the lock, read the registry, then one plugin
/// at a time read its route, call its status and CAS-write the route when it differs.
async fn old_pattern(store: &dyn Store, prober: &Prober, n: usize) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let lock = Save::cas("scrape_state", b"true", "-1").with_ttl(1800);
    store.save(StoreKind::Private, lock).await?;
    store.get(StoreKind::Private, REGISTRY_KEY).await?;
    let mut changed = 0;
    for i in 0..n {
        let id = plugin_id(i);
        let key = route_key(&id);
        let Some(route) = store.get(StoreKind::Public, &key).await? else {
            bail!("route {key} is missing");
        };
        let current = read_status(&route.data)?;
        if let ProbeOutcome::Reported(status) = prober.probe_one(&id).await {
            if status.as_str() != current {
                let data = rewrite_status(&route.data, status)?;
                store
                    .update_existing(StoreKind::Public, &key, &data, &route.etag)
                    .await?;
                changed += 1;
            }
        }
    }
    let took = started.elapsed();
    store
        .delete(StoreKind::Private, "scrape_state", None)
        .await?;
    Ok((took, changed))
}

/// Runs `keel-scraper once` to completion, measuring its wall time and peak RSS.
/// Its log lines go to /dev/null; its stderr to a file in `dir`, shown if it fails.
fn once_process(bin: &Path, args: &[String], dir: &Path) -> Result<support::procs::Exited> {
    let stderr_path = dir.join("once.stderr");
    let mut cmd = Command::new(bin);
    cmd.arg("once")
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path)?);
    let started = Instant::now();
    let mut child = Tied::spawn(&mut cmd)?;
    let exited = child.wait_measured(started, ONCE_LIMIT)?;
    if exited.code != 0 {
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        bail!(
            "keel-scraper once exited with code {}: {}",
            exited.code,
            stderr.trim()
        );
    }
    Ok(exited)
}

/// Everything measured for one N.
#[derive(Default)]
struct Sized {
    redis_ticks: Option<Stats>,
    memory_ticks: Option<Stats>,
    once: Option<Stats>,
    once_rss_mib: Option<Stats>,
    once_hwm_mib: Option<Stats>,
    http_limit: Option<Stats>,
    redis_limit: Option<Stats>,
    /// Requests per CPU-second the simulator sustained under wrk.
    sim_capacity: Option<Stats>,
    /// CPU seconds per request: wrk's, and the worker's during redis ticks.
    wrk_cpu_per_request: Option<f64>,
    worker_cpu_per_probe: Option<f64>,
}

struct Bench {
    worker_rt: tokio::runtime::Runtime,
    _sim_rt: tokio::runtime::Runtime,
    sim: PluginSim,
    redis: RedisServer,
    bin: &'static Path,
    tmp: tempfile::TempDir,
    have_wrk: bool,
}

impl Bench {
    fn conn(&self) -> Result<MultiplexedConnection> {
        self.worker_rt.block_on(redis_conn(&self.redis.url()))
    }

    fn ticker(&self, args: &[String], store: Option<Arc<dyn Store>>) -> Result<Ticker> {
        let s = settings(args)?;
        self.worker_rt.block_on(async {
            let store = match store {
                Some(st) => st,
                None => worker::build_store(&s).await?,
            };
            let prober = worker::build_prober(&s)?;
            Ok(worker::ticker(&s, store, prober))
        })
    }

    fn args(&self, backend: &str, timeout: Duration) -> Vec<String> {
        worker_args(
            backend,
            &self.redis.url(),
            &self.sim.url_template(),
            timeout,
        )
    }

    /// Every measurement at size `n`.
    fn size(&self, n: usize) -> Result<Sized> {
        let mut out = Sized::default();
        let mut conn = self.conn()?;
        self.sim.clear_all();
        self.worker_rt.block_on(seed_redis(&mut conn, n))?;
        let mut churn = Churn::new(n, |_| false);
        let full = |changes| Expect {
            probed_ok: Some(n as u64),
            probe_failed: Some(0),
            changed: Some(changes),
        };

        // In-process ticks, redis backend, with the worker threads' CPU time.
        let t = self.ticker(&self.args("redis", Duration::from_secs(2)), None)?;
        let cpu_before = support::thread_cpu_seconds("bench-worker");
        let ticks = self
            .worker_rt
            .block_on(measure_ticks(&t, &self.sim, &mut churn, TICKS, full))?;
        let cpu = support::thread_cpu_seconds("bench-worker") - cpu_before;
        out.worker_cpu_per_probe = Some(cpu / ((TICKS + 1) * n) as f64);
        out.redis_ticks = Stats::of_durations(&ticks);
        drop(t);
        self.worker_rt.block_on(verify_routes(&mut conn, &churn))?;

        // Whole processes.
        let runs = if n == 10_000 {
            ONCE_RUNS_AT_10K
        } else {
            ONCE_RUNS
        };
        let args = self.args("redis", Duration::from_secs(2));
        let (mut times, mut rss, mut hwm) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            churn.step(&self.sim);
            let exited = once_process(self.bin, &args, self.tmp.path())?;
            times.push(exited.elapsed);
            rss.push(exited.max_rss_kib as f64 / 1024.0);
            hwm.push(exited.hwm_kib as f64 / 1024.0);
        }
        self.worker_rt.block_on(verify_routes(&mut conn, &churn))?;
        out.once = Stats::of_durations(&times);
        out.once_rss_mib = Stats::of(&rss);
        out.once_hwm_mib = Stats::of(&hwm);

        // The limit: HTTP from wrk, Redis as raw pipelined commands.
        let mut redis_runs = Vec::new();
        for _ in 0..LIMIT_RUNS {
            redis_runs.push(self.worker_rt.block_on(redis_limit(&mut conn, n))?);
        }
        out.redis_limit = Stats::of_durations(&redis_runs);
        if self.have_wrk {
            let (mut runs, mut capacity, mut wrk_cpu) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..LIMIT_RUNS {
                let sim_before = support::thread_cpu_seconds("bench-sim");
                let run = support::wrk::timed(
                    self.tmp.path(),
                    &self.sim.origin(),
                    n,
                    CONCURRENCY,
                    LUA_ID_FORMAT,
                    WRK_SECONDS,
                )?;
                let sim_cpu = support::thread_cpu_seconds("bench-sim") - sim_before;
                if run.requests < n as u64 || run.errors > 0 {
                    bail!(
                        "wrk got {} answers in {:?} with {} errors",
                        run.requests,
                        run.duration,
                        run.errors
                    );
                }
                runs.push(run.time_for(n));
                capacity.push(run.requests as f64 / sim_cpu.max(1e-9));
                wrk_cpu.push(run.cpu.as_secs_f64() / run.requests as f64);
            }
            out.http_limit = Stats::of_durations(&runs);
            out.sim_capacity = Stats::of(&capacity);
            out.wrk_cpu_per_request = Stats::of(&wrk_cpu).map(|s| s.median);
        }

        // The memory backend, same churn against the same simulator.
        let memory = self.worker_rt.block_on(seed_memory(n))?;
        self.sim.clear_all();
        let mut churn = Churn::new(n, |_| false);
        let t = self.ticker(&self.args("memory", Duration::from_secs(2)), Some(memory))?;
        let ticks = self
            .worker_rt
            .block_on(measure_ticks(&t, &self.sim, &mut churn, TICKS, full))?;
        out.memory_ticks = Stats::of_durations(&ticks);
        Ok(out)
    }

    /// The old scraper's pattern at `n`, and the worker's tick at the same size.
    fn old_pattern(&self, n: usize) -> Result<Stats> {
        let mut conn = self.conn()?;
        self.sim.clear_all();
        self.worker_rt.block_on(seed_redis(&mut conn, n))?;
        let mut churn = Churn::new(n, |_| false);
        let s = settings(&self.args("redis", Duration::from_secs(2)))?;
        let took = self.worker_rt.block_on(async {
            let store = worker::build_store(&s).await?;
            let prober = worker::build_prober(&s)?;
            let mut took = Vec::new();
            for k in 0..=LIMIT_RUNS {
                let expected = churn.step(&self.sim);
                let (d, changed) = old_pattern(&*store, &prober, n).await?;
                if changed != expected {
                    bail!("the old pattern changed {changed} routes, expected {expected}");
                }
                if k > 0 {
                    took.push(d);
                }
            }
            Ok::<_, anyhow::Error>(took)
        })?;
        Stats::of_durations(&took).context("no old-pattern runs")
    }

    /// N = `n` with 5% of the plugins slower than the probe timeout.
    fn slow(&self, n: usize) -> Result<Stats> {
        let mut conn = self.conn()?;
        self.sim.clear_all();
        self.worker_rt.block_on(seed_redis(&mut conn, n))?;
        let is_slow = |i: usize| i % 20 == 10;
        let slow: Vec<String> = (0..n).filter(|i| is_slow(*i)).map(plugin_id).collect();
        let slow_count = slow.len() as u64;
        self.sim
            .set_many(slow, Behavior::delay(SLOW_ANSWER, Behavior::v0("ACTIVE")));
        let mut churn = Churn::new(n, is_slow);
        let t = self.ticker(&self.args("redis", SLOW_TIMEOUT), None)?;
        let ticks = self.worker_rt.block_on(measure_ticks(
            &t,
            &self.sim,
            &mut churn,
            LIMIT_RUNS,
            |_| Expect {
                probed_ok: Some(n as u64 - slow_count),
                probe_failed: Some(slow_count),
                changed: None,
            },
        ))?;
        self.sim.clear_all();
        Stats::of_durations(&ticks).context("no slow ticks")
    }
}

fn sizes() -> Vec<usize> {
    let default = vec![1_000, 10_000, 50_000];
    match std::env::var("KEEL_BENCH_SIZES") {
        Ok(v) if !v.trim().is_empty() => {
            let parsed: Vec<usize> = v
                .split(',')
                .filter_map(|s| s.trim().replace('_', "").parse().ok())
                .filter(|n| *n > 0 && *n < 100_000)
                .collect();
            if parsed.is_empty() {
                default
            } else {
                parsed
            }
        }
        _ => default,
    }
}

/// The in-process worker formats its log lines exactly as the binary does (JSON), into
/// a sink: the tick's cost includes its events, without flooding the table.
fn install_log_sink() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            keel_scraper::DEFAULT_LOG_FILTER,
        ))
        .with_writer(std::io::sink)
        .json()
        .flatten_event(true)
        .with_target(false)
        .with_current_span(false)
        .with_span_list(false)
        .try_init();
}

fn run() -> Result<bool> {
    let bin: &'static Path = Path::new(env!("CARGO_BIN_EXE_keel-scraper"));
    install_log_sink();
    println!("keel-scraper scale benchmark");
    println!("machine: {}", support::machine());
    println!("load average at start: {}", support::load_average());
    if !on_path("redis-server") {
        bail!("redis-server is not installed (Debian: apt-get install redis-server); nothing can be measured");
    }
    let have_wrk = on_path("wrk");
    if !have_wrk {
        println!(
            "NOTE: wrk is not installed (Debian: apt-get install wrk): the HTTP limit and \
             every row compared with it are skipped"
        );
    }
    let worker_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-worker")
        .build()?;
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("bench-sim")
        .build()?;
    let sim = {
        let _entered = sim_rt.enter();
        PluginSim::start().context("start the plugin simulator")?
    };
    let redis = RedisServer::start()?;
    let bench = Bench {
        worker_rt,
        _sim_rt: sim_rt,
        sim,
        redis,
        bin,
        tmp: tempfile::tempdir()?,
        have_wrk,
    };
    println!(
        "redis-server pid {} at {}, simulator at {}, worker binary {}",
        bench.redis.pid().unwrap_or(0),
        bench.redis.url(),
        bench.sim.origin(),
        bin.display()
    );

    let sizes = sizes();
    let mut results: Vec<(usize, Sized)> = Vec::new();
    for &n in &sizes {
        println!("measuring N = {n} ...");
        results.push((n, bench.size(n).with_context(|| format!("N = {n}"))?));
    }
    println!("measuring the old access pattern and slow plugins at N = 1000 ...");
    let old = bench.old_pattern(1_000)?;
    let slow = bench.slow(1_000)?;
    let rows = rows(&results, old, slow, have_wrk);
    println!("load average at end: {}", support::load_average());
    println!();
    print!("{}", support::table(&rows));
    let failed: Vec<&Row> = rows.iter().filter(|r| r.pass() == Some(false)).collect();
    let passed = rows.iter().filter(|r| r.pass() == Some(true)).count();
    println!();
    println!("{passed} targets met, {} missed", failed.len());
    for r in &failed {
        println!(
            "  missed: {} (N = {})",
            r.name,
            r.n.map_or("-".into(), |n| n.to_string())
        );
    }
    Ok(failed.is_empty())
}

fn rows(results: &[(usize, Sized)], old: Stats, slow: Stats, have_wrk: bool) -> Vec<Row> {
    let no_wrk = "wrk not installed";
    let mut rows = Vec::new();
    let get = |n: usize| results.iter().find(|(m, _)| *m == n).map(|(_, s)| s);
    for (n, s) in results {
        let n = *n;
        let limit = match (s.http_limit, s.redis_limit) {
            (Some(h), Some(r)) => Some(h.median + r.median),
            _ => None,
        };
        rows.push(Row::new(
            "limit: HTTP (N / wrk's rate at c64)",
            Some(n),
            Unit::Seconds,
            s.http_limit,
        ));
        rows.push(Row::new(
            "limit: Redis (pipelined raw commands)",
            Some(n),
            Unit::Seconds,
            s.redis_limit,
        ));
        let tick = Row::new(
            "tick in process (redis)",
            Some(n),
            Unit::Seconds,
            s.redis_ticks,
        );
        rows.push(match limit {
            Some(l) => {
                let row = tick.against(l);
                if n == 10_000 {
                    row.target(Target::RatioAtMost(2.0))
                } else {
                    row
                }
            }
            None if have_wrk => tick,
            None => Row::skipped("tick in process (redis) vs limit", Some(n), no_wrk),
        });
        let memory = Row::new(
            "tick in process (memory) vs HTTP limit",
            Some(n),
            Unit::Seconds,
            s.memory_ticks,
        );
        rows.push(match s.http_limit {
            Some(h) => memory.against(h.median).target(Target::RatioAtMost(1.2)),
            None => Row::skipped("tick in process (memory) vs HTTP limit", Some(n), no_wrk),
        });
        let once = Row::new(
            "whole `once` process (redis)",
            Some(n),
            Unit::Seconds,
            s.once,
        );
        rows.push(match limit {
            Some(l) if n == 10_000 => once.against(l).target(Target::MedianAtMost(1.0)),
            Some(l) => once.against(l),
            None if n == 10_000 => once.target(Target::MedianAtMost(1.0)),
            None => once,
        });
        let rss = Row::new(
            "peak RSS of `once` (ru_maxrss)",
            Some(n),
            Unit::Mib,
            s.once_rss_mib,
        );
        rows.push(if n == 50_000 {
            rss.target(Target::MibAtMost(64.0))
        } else {
            rss
        });
        rows.push(Row::new(
            "peak RSS of `once` (VmHWM polled)",
            Some(n),
            Unit::Mib,
            s.once_hwm_mib,
        ));
        if let (Some(cap), Some(t)) = (s.sim_capacity, s.redis_ticks) {
            let worker_rate = n as f64 / t.median;
            let mut row = Row::new(
                "simulator capacity (req/CPU-s) vs worker req/s",
                Some(n),
                Unit::PerSecond,
                Some(cap),
            );
            row.limit = Some(worker_rate);
            row.ratio = Some(cap.median / worker_rate);
            rows.push(row.target(Target::RatioAtLeast(2.0)));
        }
        if let (Some(w), Some(k)) = (s.wrk_cpu_per_request, s.worker_cpu_per_probe) {
            let mut row = Row::new(
                "CPU per request: worker (redis tick) vs wrk",
                Some(n),
                Unit::Seconds,
                Stats::of(&[k]),
            );
            row.limit = Some(w);
            row.ratio = Some(k / w);
            rows.push(row);
        }
    }
    match (
        get(10_000).and_then(|s| s.redis_ticks),
        get(50_000).and_then(|s| s.redis_ticks),
    ) {
        (Some(a), Some(b)) => {
            let mut row = Row::new(
                "growth: tick(50 000) / tick(10 000)",
                Some(50_000),
                Unit::Seconds,
                Some(b),
            );
            row.limit = Some(a.median);
            row.ratio = Some(b.median / a.median);
            rows.push(row.target(Target::RatioAtMost(5.5)));
        }
        _ => rows.push(Row::skipped(
            "growth: tick(50 000) / tick(10 000)",
            None,
            "needs N = 10 000 and 50 000",
        )),
    }
    let old_row = Row::new(
        "old access pattern (one at a time, redis)",
        Some(1_000),
        Unit::Seconds,
        Some(old),
    );
    rows.push(match get(1_000).and_then(|s| s.redis_ticks) {
        Some(t) => {
            let mut row = old_row;
            row.limit = Some(t.median);
            row.ratio = Some(old.median / t.median);
            row.name = "old access pattern; ratio = speed-up of the tick".into();
            row
        }
        None => old_row,
    });
    let bound = SLOW_TIMEOUT.as_secs_f64() * f64::from(RETRIES + 1) + 0.5;
    let mut slow_row = Row::new(
        "tick, 5% plugins slower than the timeout",
        Some(1_000),
        Unit::Seconds,
        Some(slow),
    );
    slow_row.limit = Some(bound);
    slow_row.ratio = Some(slow.max / bound);
    rows.push(slow_row.target(Target::MaxAtMost(bound)));
    rows
}

fn main() -> ExitCode {
    let strict = std::env::var("KEEL_BENCH_STRICT").is_ok_and(|v| v == "1");
    match run() {
        Ok(all_met) if all_met || !strict => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
