//! The production path at scale: ticks through a real `daprd` (state over gRPC, status
//! calls through service invocation to one `HTTPEndpoint` per plugin), and in the same
//! run the limit of that path: the same N status calls through the same daprd at the same
//! concurrency from `wrk` on the invoke URL, plus the tick's state calls (registry get,
//! bulk get of every route) timed alone in process; then whole `keel-scraper once
//! --backend dapr` processes against the same daprd, with the worker's peak RSS.
//!
//! `KEEL_BENCH_DAPRD_SIZES` (default `1000,10000`) picks the sizes; the daprd is
//! `$KEEL_DAPRD`, else what `scripts/daprd --no-build` finds. Without one, the rows are
//! skipped saying how to get it. Every process is killed when its size is done.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keel_scraper::registry::REGISTRY_KEY;
use keel_scraper::route::route_key;
use keel_scraper::store::StoreKind;
use keel_test_support::sim::PluginSim;

use super::{wrk, Row, Stats, Target, Unit};
use crate::{check, full_tick, plugin_id, redis_conn, seed_redis, settings, Churn, Expect};
use keel_test_support::process::{free_port, Proc};
use keel_test_support::redis_server::RedisServer;

/// Measured ticks per size (after one warm-up).
const ROUNDS: usize = 3;
/// The lease of the ticks and `once` runs through daprd.
const LEASE: &str = "120s";
/// How long daprd may take to load its components and N endpoints.
const READY_LIMIT: Duration = Duration::from_secs(180);

/// The sizes to measure through daprd.
pub fn sizes() -> Vec<usize> {
    match std::env::var("KEEL_BENCH_DAPRD_SIZES") {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .filter_map(|s| s.trim().replace('_', "").parse().ok())
            .filter(|n| *n > 0 && *n <= 10_000)
            .collect(),
        _ => vec![1_000, 10_000],
    }
}

fn daprd_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KEEL_DAPRD") {
        return Ok(PathBuf::from(path));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/daprd");
    let out = Command::new(&script).arg("--no-build").output()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && path.is_file() {
        Ok(path)
    } else {
        bail!("no daprd built: run ./scripts/daprd")
    }
}

/// Every row of the daprd section, for each size.
pub fn rows(rt: &tokio::runtime::Runtime, sim: &PluginSim, dir: &Path, have_wrk: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    let bin = match daprd_binary() {
        Ok(bin) => bin,
        Err(e) => {
            rows.push(Row::skipped("tick through real daprd", None, e.to_string()));
            return rows;
        }
    };
    for n in sizes() {
        println!("measuring N = {n} through real daprd ...");
        match at_size(&bin, rt, sim, dir, have_wrk, n) {
            Ok(mut at) => rows.append(&mut at),
            Err(e) => rows.push(Row::skipped(
                "tick through real daprd",
                Some(n),
                format!("{e:#}"),
            )),
        }
    }
    rows
}

/// `GET path` on loopback `port`: the status code.
fn get(port: u16, path: &str) -> Result<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not an HTTP answer")
}

fn at_size(
    bin: &Path,
    rt: &tokio::runtime::Runtime,
    sim: &PluginSim,
    dir: &Path,
    have_wrk: bool,
    n: usize,
) -> Result<Vec<Row>> {
    let redis = RedisServer::builder()
        .with_args(&["--loglevel", "warning"])
        .try_start()?;
    let redis_addr = redis
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let resources = dir.join(format!("daprd-{n}"));
    std::fs::create_dir_all(&resources)?;
    let components = Path::new(env!("CARGO_MANIFEST_DIR")).join("components");
    for name in ["keel-public-store.yaml", "keel-private-store.yaml"] {
        let text = std::fs::read_to_string(components.join(name))?;
        std::fs::write(
            resources.join(name),
            text.replace("localhost:6379", &redis_addr),
        )?;
    }
    // One file, one YAML document per plugin.
    let mut endpoints = String::new();
    for i in 0..n {
        let id = plugin_id(i);
        endpoints.push_str(&format!(
            "---\napiVersion: dapr.io/v1alpha1\nkind: HTTPEndpoint\nmetadata:\n  name: {id}\nspec:\n  baseUrl: {}/{id}\n",
            sim.origin()
        ));
    }
    std::fs::write(resources.join("endpoints.yaml"), endpoints)?;
    let (http, grpc) = (free_port(), free_port());
    let log = std::fs::File::create(dir.join(format!("daprd-{n}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.args(["--app-id", "keel-scraper", "--resources-path"])
        .arg(&resources)
        .args(["--dapr-http-port", &http.to_string()])
        .args(["--dapr-grpc-port", &grpc.to_string()])
        .args(["--dapr-internal-grpc-port", &free_port().to_string()])
        .args(["--metrics-port", &free_port().to_string()])
        .args([
            "--dapr-listen-addresses",
            "127.0.0.1",
            "--log-level",
            "warn",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let _daprd = Proc::spawn(cmd)?;
    let started = Instant::now();
    while get(http, "/v1.0/healthz/outbound").ok() != Some(204) {
        if started.elapsed() > READY_LIMIT {
            bail!("daprd with {n} HTTPEndpoints not ready within {READY_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready = started.elapsed();
    // The last endpoint must be loaded: invoke it.
    let last = format!("/v1.0/invoke/{}/method/v1/status", plugin_id(n - 1));
    while get(http, &last).ok() != Some(200) {
        if started.elapsed() > READY_LIMIT {
            bail!("daprd did not load all {n} HTTPEndpoints within {READY_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "  daprd ready in {:.1} s, all {n} endpoints in {:.1} s",
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    sim.clear_all();
    let mut conn = rt.block_on(redis_conn(&redis.url()))?;
    rt.block_on(seed_redis(&mut conn, n))?;
    let args: Vec<String> = vec![
        "--backend".into(),
        "dapr".into(),
        "--dapr-grpc-endpoint".into(),
        format!("127.0.0.1:{grpc}"),
        "--dapr-http-endpoint".into(),
        format!("http://127.0.0.1:{http}"),
        "--concurrency".into(),
        crate::CONCURRENCY.to_string(),
        "--retries".into(),
        crate::RETRIES.to_string(),
        "--holder-id".into(),
        "keel-bench".into(),
        // Invocation through daprd slows with the number of HTTPEndpoints it holds (at
        // 10 000 a tick takes seconds): a lease long enough that the probe deadline (a
        // fifth of the lease before its end) never cuts a tick short.
        "--lease".into(),
        LEASE.into(),
        "--log-format".into(),
        "json".into(),
    ];
    let s = settings(&args)?;
    let store = rt.block_on(keel_scraper::wiring::build_store(&s))?;
    let prober = keel_scraper::wiring::build_prober(&s)?;
    let ticker = keel_scraper::wiring::ticker(&s, store.clone(), prober);
    let mut churn = Churn::new(n, |_| false);
    let (mut ticks, mut limits, mut state) = (Vec::new(), Vec::new(), Vec::new());
    let keys: Vec<String> = (0..n).map(|i| route_key(&plugin_id(i))).collect();
    for round in 0..=ROUNDS {
        let changes = churn.step(sim);
        let (took, report) = rt.block_on(full_tick(&ticker))?;
        check(
            &report,
            Expect {
                probed_ok: Some(n as u64),
                probe_failed: Some(0),
                changed: Some(changes),
            },
        )
        .context("tick through daprd")?;
        // The tick's state reads alone: the registry, then every route in bulk.
        let t0 = Instant::now();
        rt.block_on(async {
            store.get(StoreKind::Private, REGISTRY_KEY).await?;
            store.bulk_get(StoreKind::Public, &keys).await
        })?;
        let state_took = t0.elapsed();
        if round == 0 {
            continue;
        }
        ticks.push(took);
        state.push(state_took);
        if have_wrk {
            let run = wrk::timed(
                dir,
                &format!("http://127.0.0.1:{http}"),
                n,
                crate::CONCURRENCY,
                "v1.0/invoke/p%05d/method",
                crate::WRK_SECONDS,
            )?;
            if run.errors > 0 {
                bail!("wrk through daprd: {} errors", run.errors);
            }
            limits.push(run.time_for(n));
        }
    }
    // Whole `once` processes (the binary with the same flags) against the same daprd,
    // each after a churn step, with the worker's own peak RSS.
    let bin = Path::new(env!("CARGO_BIN_EXE_keel-scraper"));
    let (mut onces, mut rss, mut hwm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        churn.step(sim);
        let run = crate::once_process(bin, &args, dir).context("`once` through daprd")?;
        onces.push(run.elapsed);
        rss.extend(run.max_rss_kib.map(|k| k as f64 / 1024.0));
        hwm.push(run.hwm_kib as f64 / 1024.0);
    }
    rt.block_on(crate::verify_routes(&mut conn, &churn))
        .context("routes after `once` through daprd")?;
    let tick = Stats::of_durations(&ticks).context("no ticks")?;
    let state = Stats::of_durations(&state).context("no state reads")?;
    let mut rows = Vec::new();
    match Stats::of_durations(&limits) {
        Some(limit) => {
            let total = limit.median + state.median;
            let mut row = Row::new(
                "tick through real daprd / limit",
                Some(n),
                Unit::Seconds,
                Some(tick),
            );
            row.limit = Some(total);
            row.ratio = Some(tick.median / total);
            if n >= 10_000 {
                row = row.target(Target::RatioAtMost(1.5));
            }
            rows.push(row);
            rows.push(Row::new(
                "  limit: N invokes through daprd (wrk)",
                Some(n),
                Unit::Seconds,
                Some(limit),
            ));
        }
        None => rows.push(Row::new(
            "tick through real daprd (no wrk: no limit)",
            Some(n),
            Unit::Seconds,
            Some(tick),
        )),
    }
    rows.push(Row::new(
        "  limit: state reads through daprd alone",
        Some(n),
        Unit::Seconds,
        Some(state),
    ));
    rows.push(Row::new(
        "whole `once` process through real daprd",
        Some(n),
        Unit::Seconds,
        Stats::of_durations(&onces),
    ));
    if let Some(rss) = Stats::of(&rss) {
        rows.push(Row::new(
            "peak RSS of `once` through daprd (GNU time)",
            Some(n),
            Unit::Mib,
            Some(rss),
        ));
    }
    rows.push(Row::new(
        "peak RSS of `once` through daprd (VmHWM polled)",
        Some(n),
        Unit::Mib,
        Stats::of(&hwm),
    ));
    Ok(rows)
}
