//! Graceful shutdown of `run`, proven with the real binary and real signals against a real
//! `redis-server` and simulated plugins:
//!
//! - SIGTERM (and SIGINT alike): scheduling stops, `shutdown_started` and
//!   `shutdown_completed` are logged, the lease is released (the raw `scrape_state` record
//!   has no holder), exit 0.
//! - A signal that arrives mid-tick lets the tick finish its writes within
//!   `--shutdown-grace`; a tick slower than the grace is cancelled, and the process still
//!   exits 0 promptly and frees the lease.
//! - Another replica takes the very next tick: no tick is missed, none is scraped twice.
//! - A signal during start-up (the store unreachable) also ends cleanly.

mod support;

use std::time::{Duration, Instant};

use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::{raw_seed, route_status};
use support::live::{is, run_args, Worker};
use support::redis_server::{free_port, RedisServer};

/// The raw `scrape_state` record (the lease) and its remaining TTL in milliseconds.
fn lock_record(redis: &RedisServer) -> (Value, i64) {
    let data: Vec<u8> = redis.query(redis::cmd("HGET").arg("plugins||scrape_state").arg("data"));
    let record = serde_json::from_slice(&data).unwrap_or_else(|_| {
        panic!(
            "scrape_state is not JSON: {}",
            String::from_utf8_lossy(&data)
        )
    });
    let pttl: i64 = redis.query(redis::cmd("PTTL").arg("plugins||scrape_state"));
    (record, pttl)
}

/// Index of the first event named `name`, panicking with the output when there is none.
fn index_of(w: &Worker, events: &[Value], name: &str) -> usize {
    events
        .iter()
        .position(|e| is(e, name))
        .unwrap_or_else(|| panic!("no {name} event{}", w.dump()))
}

fn completed_ticks(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| is(e, "tick_completed"))
        .filter_map(|e| e["tick"].as_str().map(str::to_string))
        .collect()
}

fn parse_tick(t: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(t)
        .unwrap_or_else(|e| panic!("tick id {t:?}: {e}"))
        .with_timezone(&chrono::Utc)
}

/// Polls `f` every 20 ms until it holds, or panics with `what` after `timeout`.
fn eventually(timeout: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A replica stops cleanly on `signal` between ticks: logs, exits 0, and leaves no
/// lease behind (each tick releases its lease when it ends).
fn stops_cleanly_on(signal: libc::c_int, name: &str) {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    raw_seed(&redis, &["a"], &[("a", "ACTIVE")]);
    // A lease longer than the interval: only a release can free it before it expires.
    let mut w = Worker::spawn(
        &run_args(&redis, &sim, &["--lease", "5s", "--holder-id", "replica-1"]),
        &[],
    );
    w.wait_until(Duration::from_secs(10), "two released ticks", |evs| {
        (completed_ticks(evs).len() >= 2
            && evs.iter().filter(|e| is(e, "lock_released")).count() >= 2)
            .then_some(())
    });
    let (before, _) = lock_record(&redis);
    assert!(
        before["holder"].is_null(),
        "a finished tick releases its lease: {before}"
    );

    w.signal(signal);
    let status = w.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", w.dump());
    let events = w.events();
    let started = index_of(&w, &events, "shutdown_started");
    let completed = index_of(&w, &events, "shutdown_completed");
    assert!(started < completed, "{}", w.dump());
    assert_eq!(events[started]["signal"], name);
    assert_eq!(events[completed]["tick_cancelled"], false);
    // Every completed tick released its lease under this holder.
    let released: Vec<_> = events.iter().filter(|e| is(e, "lock_released")).collect();
    assert!(
        released.len() >= completed_ticks(&events).len()
            && released.iter().all(|e| e["holder"] == "replica-1"),
        "{}",
        w.dump()
    );
    assert_eq!(
        completed,
        events.len() - 1,
        "shutdown_completed is the last event{}",
        w.dump()
    );

    let (record, pttl) = lock_record(&redis);
    assert!(
        record["holder"].is_null(),
        "the lease has no holder after the stop: {record}"
    );
    let last = completed_ticks(&events).pop().expect("a completed tick");
    assert_eq!(
        record["tick"],
        last.as_str(),
        "the scraped tick stays recorded: {record}"
    );
    assert!(pttl > 0, "the released record still expires (PTTL {pttl})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_logs_shutdown_releases_the_lock_and_exits_0() {
    stops_cleanly_on(libc::SIGTERM, "SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_behaves_like_sigterm() {
    stops_cleanly_on(libc::SIGINT, "SIGINT");
}

/// Starts a replica whose first tick probes one plugin that answers after `delay`
/// (reporting STOPPED, so the tick has a route to write), and signals it mid-probe.
/// `grace` is given as `--shutdown-grace`, or through `SCRAPER_SHUTDOWN_GRACE` when
/// `grace_from_env`.
fn signal_mid_tick(
    redis: &RedisServer,
    sim: &PluginSim,
    delay: Duration,
    grace: &str,
    grace_from_env: bool,
) -> (Worker, Instant) {
    sim.set("slow", Behavior::delay(delay, Behavior::v0("STOPPED")));
    raw_seed(redis, &["slow"], &[("slow", "ACTIVE")]);
    let mut extra = vec!["--lease", "6s", "--probe-timeout", "5s"];
    let mut env = Vec::new();
    if grace_from_env {
        env.push(("SCRAPER_SHUTDOWN_GRACE", grace));
    } else {
        extra.extend(["--shutdown-grace", grace]);
    }
    let w = Worker::spawn(&run_args(redis, sim, &extra), &env);
    w.wait_event(Duration::from_secs(10), |e| is(e, "lock_acquired"));
    eventually(Duration::from_secs(5), "the probe in flight", || {
        sim.in_flight() > 0
    });
    w.signal(libc::SIGTERM);
    (w, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_tick_lets_the_tick_finish_its_writes_then_exits_0() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    let (mut w, signalled) =
        signal_mid_tick(&redis, &sim, Duration::from_millis(1500), "5s", false);
    let status = w.wait_exit(Duration::from_secs(8));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", w.dump());
    let events = w.events();
    let started = index_of(&w, &events, "shutdown_started");
    let changed = index_of(&w, &events, "plugin_status_changed");
    let tick_done = index_of(&w, &events, "tick_completed");
    let released = index_of(&w, &events, "lock_released");
    let completed = index_of(&w, &events, "shutdown_completed");
    assert!(
        started < changed && changed < tick_done && tick_done < released && released < completed,
        "{}",
        w.dump()
    );
    assert_eq!(events[completed]["tick_cancelled"], false);
    assert_eq!(
        route_status(&redis, "slow").as_deref(),
        Some("STOPPED"),
        "the running tick's write landed"
    );
    assert!(
        took >= Duration::from_millis(500),
        "the process waited for the tick ({took:?})"
    );
    let (record, _) = lock_record(&redis);
    assert!(
        record["holder"].is_null(),
        "released after the tick: {record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_slower_than_the_grace_is_cancelled_and_the_process_still_exits_0_promptly() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    let (mut w, signalled) = signal_mid_tick(&redis, &sim, Duration::from_secs(4), "200ms", true);
    let status = w.wait_exit(Duration::from_secs(5));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", w.dump());
    assert!(
        took < Duration::from_millis(1500),
        "exit {took:?} after SIGTERM with a 200ms grace"
    );
    let events = w.events();
    let completed = index_of(&w, &events, "shutdown_completed");
    assert_eq!(events[completed]["tick_cancelled"], true, "{}", w.dump());
    assert!(
        events
            .iter()
            .all(|e| !is(e, "tick_completed") && !is(e, "plugin_status_changed")),
        "{}",
        w.dump()
    );
    assert_eq!(
        route_status(&redis, "slow").as_deref(),
        Some("ACTIVE"),
        "a cancelled tick writes nothing more"
    );
}

/// The cancelled tick held the lease: the process must still release it, or no replica
/// can take the next ticks until the lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_tick_still_releases_the_lease() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    let (mut w, _) = signal_mid_tick(&redis, &sim, Duration::from_secs(4), "200ms", true);
    let status = w.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", w.dump());
    let (record, pttl) = lock_record(&redis);
    assert!(
        record["holder"].is_null(),
        "the lease is still held after the process exited (PTTL {pttl} ms): {record}{}",
        w.dump()
    );
    assert!(
        w.events().iter().any(|e| is(e, "lock_released")),
        "{}",
        w.dump()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_takes_the_very_next_tick_after_the_holder_stops() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    raw_seed(&redis, &["a"], &[("a", "ACTIVE")]);
    // The lease outlives several ticks: only the release lets the other replica in at once.
    let args = |id: &str| run_args(&redis, &sim, &["--lease", "5s", "--holder-id", id]);
    let mut first = Worker::spawn(&args("first"), &[]);
    first.wait_event(Duration::from_secs(10), |e| is(e, "tick_completed"));
    let second = Worker::spawn(&args("second"), &[]);
    second.wait_event(Duration::from_secs(10), |e| {
        is(e, "tick_completed") || is(e, "tick_skipped")
    });
    // Signal right after the first completed a tick: the next fire is most of a second away.
    let seen = completed_ticks(&first.events()).len();
    first.wait_until(Duration::from_secs(10), "another completed tick", |evs| {
        (completed_ticks(evs).len() > seen).then_some(())
    });
    first.signal(libc::SIGTERM);
    assert_eq!(
        first.wait_exit(Duration::from_secs(5)).code(),
        Some(0),
        "{}",
        first.dump()
    );
    let first_ticks = completed_ticks(&first.events());
    let last = parse_tick(
        first_ticks
            .last()
            .expect("the first replica completed ticks"),
    );
    assert!(
        first.events().iter().any(|e| is(e, "lock_released")),
        "{}",
        first.dump()
    );

    let next = second.wait_event(Duration::from_secs(5), |e| {
        e["tick"].as_str().is_some_and(|t| parse_tick(t) > last)
            && (is(e, "tick_completed") || is(e, "tick_skipped") || is(e, "tick_failed"))
    });
    assert_eq!(
        next["event"],
        "tick_completed",
        "the standby's first tick after the stop: {next}{}",
        second.dump()
    );
    let took = parse_tick(next["tick"].as_str().unwrap_or_default());
    assert_eq!(
        took - last,
        chrono::Duration::seconds(1),
        "tick {last} by the first, then {took} by the second"
    );
    let second_ticks = completed_ticks(&second.events());
    assert!(
        first_ticks.iter().all(|t| !second_ticks.contains(t)),
        "a tick scraped twice: {first_ticks:?} {second_ticks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_exits_0() {
    // Nothing listens there: start-up retries the connection until the signal.
    let url = format!("redis://127.0.0.1:{}/", free_port());
    let mut w = Worker::spawn(
        &[
            "run",
            "--backend",
            "redis",
            "--redis-url",
            &url,
            "--status-url",
            "http://127.0.0.1:1/{plugin_id}",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    w.wait_event(Duration::from_secs(10), |e| {
        is(e, "store_error") && e["operation"] == "connect"
    });
    w.signal(libc::SIGTERM);
    assert_eq!(
        w.wait_exit(Duration::from_secs(5)).code(),
        Some(0),
        "{}",
        w.dump()
    );
    let events = w.events();
    assert_eq!(
        events[index_of(&w, &events, "shutdown_started")]["signal"],
        "SIGTERM"
    );
    assert_eq!(
        events[index_of(&w, &events, "shutdown_completed")]["tick_cancelled"],
        false
    );
}
