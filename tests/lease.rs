//! The `scrape_state` lock against a real `redis-server`: replicas racing for the same
//! scheduled tick, the recorded tick, manual ticks, release, legacy and TTL-less records,
//! and a lost first-write race reported as "held" (exit 3), never as an outage (exit 1).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use keel_scraper::lease::{TickKind, LOCK_KEY};
use keel_scraper::schedule::tick_id;
use keel_scraper::store::{Entry, Save, Store, StoreError, StoreKind, ABSENT_ETAG};
use keel_scraper::tick::{SkipReason, TickOutcome, Ticker};
use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::{
    keel, pttl, raw_data, raw_json, raw_version, redis_store, redis_ticker, seed_registry,
    seed_route, ticker, Capture, Events, ReplicaOptions,
};
use support::redis_server::RedisServer;

/// The lock's Redis key under the default private prefix.
const LOCK: &str = "plugins||scrape_state";

struct World {
    server: RedisServer,
    sim: PluginSim,
}

/// A Redis with one registered plugin (`p`, route ACTIVE, answering ACTIVE).
async fn world() -> World {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().expect("start the plugin simulator");
    seed_registry(&*store, &["p"]).await;
    seed_route(&*store, "p", "ACTIVE").await;
    World { server, sim }
}

impl World {
    /// A replica with its own connection, 10 s lease and interval.
    async fn replica(&self, holder: &str) -> Ticker {
        redis_ticker(
            &self.server,
            &self.sim.url_template(),
            &ReplicaOptions::new(holder),
        )
        .await
    }

    /// A replica with a 1 s lease, a 1 s schedule interval and a 1 s foreign lock TTL.
    async fn fast_replica(&self, holder: &str) -> Ticker {
        let o = ReplicaOptions::new(holder)
            .lease(Duration::from_secs(1), Duration::from_secs(1))
            .foreign_lock_ttl(Duration::from_secs(1));
        redis_ticker(&self.server, &self.sim.url_template(), &o).await
    }

    fn record(&self) -> Value {
        raw_json(&self.server, LOCK).expect("scrape_state exists")
    }

    /// Writes the lock hash as Dapr's `state.redis` does (first-write, version 1).
    fn write_raw_lock(&self, data: &str, ttl_seconds: Option<u64>) {
        self.server.query::<()>(redis::cmd("DEL").arg(LOCK));
        self.server.query::<()>(
            redis::cmd("HSET")
                .arg(LOCK)
                .arg("data")
                .arg(data)
                .arg("version")
                .arg(1)
                .arg("first-write")
                .arg(0),
        );
        if let Some(ttl) = ttl_seconds {
            self.server
                .query::<()>(redis::cmd("EXPIRE").arg(LOCK).arg(ttl));
        }
    }
}

/// A whole-second slot `offset_s` seconds from now.
fn slot(offset_s: i64) -> DateTime<Utc> {
    Utc::now().trunc_subsecs(0) + chrono::Duration::seconds(offset_s)
}

/// Runs one tick with its events captured; releases the lease when the tick got it.
async fn tick(t: &Ticker, kind: TickKind) -> (TickOutcome, Events) {
    let capture = Capture::new();
    let (outcome, guard) = capture.run(t.tick_keeping_lease(kind)).await;
    if let Some(g) = guard {
        t.lease.release(&g).await.expect("release the lease");
    }
    (outcome, capture.events())
}

/// One tick, not released.
async fn tick_and_hold(t: &Ticker, kind: TickKind) -> TickOutcome {
    t.tick_keeping_lease(kind).await.0
}

fn completed(o: &TickOutcome) -> bool {
    matches!(o, TickOutcome::Completed(_))
}

fn held(o: &TickOutcome) -> bool {
    matches!(o, TickOutcome::Skipped(SkipReason::LockHeld { .. }))
}

fn already_scraped(o: &TickOutcome) -> bool {
    matches!(o, TickOutcome::Skipped(SkipReason::AlreadyScraped))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_scrape_each_scheduled_tick_exactly_once() {
    let w = world().await;
    const ROUNDS: i64 = 6;
    // When each replica fires, in ms after the slot: two at once (racing the
    // first-write save), one while the winner's tick runs, one after it released.
    const FIRE_AT_MS: [u64; 4] = [0, 0, 60, 600];
    let mut replicas = Vec::new();
    for i in 0..FIRE_AT_MS.len() {
        replicas.push(Arc::new(w.replica(&format!("replica-{i}")).await));
    }
    // The winner's tick lasts a while, so the third replica finds the lease live.
    let slow = |status: &str| Behavior::delay(Duration::from_millis(200), Behavior::v0(status));
    let base = slot(0);
    let mut reasons = Vec::new();
    for round in 0..ROUNDS {
        // Each round the plugin flips its status, so the round's winner writes once.
        w.sim.set(
            "p",
            slow(if round % 2 == 0 { "STOPPING" } else { "ACTIVE" }),
        );
        let version_before = raw_version(&w.server, "plugin_route_p").unwrap();
        let requests_before = w.sim.requests("p");
        let this_slot = base + chrono::Duration::seconds(10 * round);
        // A different replica fires first each round.
        let mut order: Vec<u64> = FIRE_AT_MS.to_vec();
        order.rotate_left(round as usize % FIRE_AT_MS.len());
        let tasks: Vec<_> = replicas
            .iter()
            .zip(order)
            .map(|(t, fire_at)| {
                let t = t.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(fire_at)).await;
                    let capture = Capture::new();
                    let (outcome, guard) = capture
                        .run(t.tick_keeping_lease(TickKind::Scheduled(this_slot)))
                        .await;
                    // The winner lets its lease go (as it would expire before the next slot).
                    if let Some(g) = guard {
                        t.lease.release(&g).await.expect("release");
                    }
                    (outcome, capture.events())
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("a replica task panicked"));
        }
        let winners = outcomes.iter().filter(|(o, _)| completed(o)).count();
        let all: String = outcomes
            .iter()
            .map(|(o, e)| format!("{o:?}\n{e}"))
            .collect();
        assert_eq!(
            winners, 1,
            "round {round}: exactly one replica scrapes the tick\n{all}"
        );
        for (o, events) in &outcomes {
            if completed(o) {
                continue;
            }
            assert!(
                held(o) || already_scraped(o),
                "round {round}: {o:?}\n{events}"
            );
            let skipped = events.one("tick_skipped");
            assert_eq!(skipped["tick"], tick_id(this_slot));
            reasons.push(skipped["reason"].as_str().unwrap_or_default().to_owned());
        }
        assert_eq!(
            w.sim.requests("p") - requests_before,
            1,
            "round {round}: probes"
        );
        assert_eq!(
            raw_version(&w.server, "plugin_route_p").unwrap(),
            version_before + 1,
            "round {round}: route writes"
        );
        assert_eq!(w.record()["tick"], tick_id(this_slot));
    }
    for r in &reasons {
        assert!(r == "lock_held" || r == "already_scraped", "{r}");
    }
    // Both ways of losing happened: the lease was live, and the tick was already done.
    assert!(reasons.iter().any(|r| r == "lock_held"), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r == "already_scraped"),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_tick_not_newer_than_the_recorded_one_is_skipped_already_scraped() {
    let w = world().await;
    let a = w.replica("replica-a").await;
    let b = w.replica("replica-b").await;
    let t = slot(0);

    let (o, events) = tick(&a, TickKind::Scheduled(t)).await;
    assert!(completed(&o), "{o:?}\n{events}");
    assert_eq!(w.record()["tick"], tick_id(t));
    assert_eq!(w.sim.requests("p"), 1);

    for (who, at) in [(&b, t), (&b, t - chrono::Duration::seconds(10)), (&a, t)] {
        let (o, events) = tick(who, TickKind::Scheduled(at)).await;
        assert!(
            already_scraped(&o),
            "{} at {at}: {o:?}\n{events}",
            who.lease.holder()
        );
        let skipped = events.one("tick_skipped");
        assert_eq!(skipped["reason"], "already_scraped");
        assert_eq!(skipped["tick"], tick_id(at));
        assert!(!events.has("tick_completed"), "{events}");
    }
    assert_eq!(w.sim.requests("p"), 1, "a skipped tick probed");
    assert_eq!(
        w.record()["tick"],
        tick_id(t),
        "a skipped tick moved the recorded tick"
    );

    let next = t + chrono::Duration::seconds(10);
    let (o, events) = tick(&b, TickKind::Scheduled(next)).await;
    assert!(completed(&o), "{o:?}\n{events}");
    assert_eq!(w.record()["tick"], tick_id(next));
    assert_eq!(w.sim.requests("p"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_tick_neither_checks_nor_advances_the_recorded_tick() {
    let w = world().await;
    let a = w.replica("replica-a").await;
    let b = w.replica("replica-b").await;

    // A recorded tick in the future does not stop an operator's manual tick...
    let future = slot(3600);
    assert!(completed(&tick(&a, TickKind::Scheduled(future)).await.0));
    let (o, events) = tick(&b, TickKind::Manual(Utc::now())).await;
    assert!(
        completed(&o),
        "a manual tick checked the recorded tick: {o:?}\n{events}"
    );
    assert_eq!(w.record()["tick"], tick_id(future));

    // ...and a manual tick does not advance it: the next scheduled tick still runs.
    w.server.query::<()>(redis::cmd("DEL").arg(LOCK));
    let past = slot(-3600);
    assert!(completed(&tick(&a, TickKind::Scheduled(past)).await.0));
    let (o, events) = tick(&b, TickKind::Manual(Utc::now())).await;
    assert!(completed(&o), "{o:?}\n{events}");
    assert_eq!(
        w.record()["tick"],
        tick_id(past),
        "a manual tick advanced the recorded tick"
    );
    let (o, events) = tick(
        &a,
        TickKind::Scheduled(past + chrono::Duration::seconds(10)),
    )
    .await;
    assert!(
        completed(&o),
        "the scheduled tick after a manual one was skipped: {o:?}\n{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_clears_the_holder_and_keeps_the_recorded_tick_with_a_ttl() {
    let w = world().await;
    let a = w.replica("replica-a").await;
    let b = w.replica("replica-b").await;
    let t = slot(0);

    let (outcome, guard) = a.tick_keeping_lease(TickKind::Scheduled(t)).await;
    assert!(completed(&outcome), "{outcome:?}");
    let guard = guard.expect("a completed tick holds the lease");
    // Held: our holder id, the tick, a TTL of at most the lease, first-write.
    let record = w.record();
    assert_eq!(record["holder"], "replica-a");
    assert_eq!(record["tick"], tick_id(t));
    let ttl = pttl(&w.server, LOCK);
    assert!(ttl > 0 && ttl <= 10_000, "lease TTL {ttl} ms");
    let fields: Vec<String> = w.server.hgetall(LOCK).into_iter().map(|(f, _)| f).collect();
    assert!(
        fields.contains(&"first-write".to_owned()),
        "the lock is a first-write save: {fields:?}"
    );
    assert!(held(&tick_and_hold(&b, TickKind::Manual(Utc::now())).await));

    a.lease.release(&guard).await.expect("release");
    let record = w.record();
    assert!(
        record["holder"].is_null(),
        "release keeps a holder: {record}"
    );
    assert_eq!(
        record["tick"],
        tick_id(t),
        "release lost the recorded tick: {record}"
    );
    let ttl = pttl(&w.server, LOCK);
    // Readable for at least one interval (10 s), and still expiring.
    assert!(ttl > 10_000, "released record TTL {ttl} ms");

    // Another holder may take it at once, and the recorded tick still protects T.
    let (o, events) = tick(&b, TickKind::Scheduled(t)).await;
    assert!(already_scraped(&o), "{o:?}\n{events}");
    let (o, events) = tick(&b, TickKind::Manual(Utc::now())).await;
    assert!(completed(&o), "{o:?}\n{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_legacy_true_lock_with_a_ttl_counts_as_held() {
    let w = world().await;
    w.write_raw_lock("true", Some(120));
    let b = w.fast_replica("replica-b").await;

    let started = Instant::now();
    let (o, events) = tick(&b, TickKind::Scheduled(slot(1))).await;
    assert!(held(&o), "{o:?}\n{events}");
    assert_eq!(events.one("tick_skipped")["reason"], "lock_held");
    assert!(held(&tick(&b, TickKind::Manual(Utc::now())).await.0));

    let out = keel()
        .redis(&w.server.url(), &w.sim.url_template())
        .args(["once", "--holder-id", "operator"])
        .run_async()
        .await;
    out.assert_code(3);

    // Even watched for longer than lease + interval, a record with a TTL is respected.
    let wait = Duration::from_millis(2300).saturating_sub(started.elapsed());
    tokio::time::sleep(wait).await;
    let (o, events) = tick(&b, TickKind::Scheduled(slot(2))).await;
    assert!(
        held(&o),
        "a live record with a TTL was taken over: {o:?}\n{events}"
    );
    assert_eq!(raw_data(&w.server, LOCK).as_deref(), Some(&b"true"[..]));
    assert_eq!(raw_version(&w.server, LOCK), Some(1));
    assert_eq!(w.sim.requests("p"), 0);
}

/// Takes over `data` (a record written without TTL and without a declared lease) only
/// after the foreign lock TTL + interval of unchanged observation, and never by a manual
/// tick.
async fn takeover_of_a_record_without_ttl(data: &str) {
    let w = world().await;
    w.write_raw_lock(data, None);
    let b = w.fast_replica("replica-b").await;
    let c = w.fast_replica("replica-c").await;
    let start = Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);

    // First sight: the watch starts.
    let (o, events) = tick(&b, TickKind::Scheduled(slot(1))).await;
    assert!(held(&o), "{o:?}\n{events}");

    // Before lease + interval (2 s): still held, for scheduled and manual ticks.
    tokio::time::sleep_until(at(1000).into()).await;
    assert!(
        held(&tick(&b, TickKind::Scheduled(slot(2))).await.0),
        "taken over after 1 s"
    );
    assert!(held(&tick(&c, TickKind::Manual(Utc::now())).await.0));
    let out = keel()
        .redis(&w.server.url(), &w.sim.url_template())
        .args([
            "once",
            "--lease",
            "1s",
            "--schedule",
            "* * * * * *",
            "--holder-id",
            "operator",
        ])
        .run_async()
        .await;
    out.assert_code(3);

    // The record changes (its ETag moves): observation starts again. Without that, 2.3 s
    // after first sight would be past lease + interval.
    tokio::time::sleep_until(at(1300).into()).await;
    w.server
        .query::<()>(redis::cmd("HINCRBY").arg(LOCK).arg("version").arg(1));
    tokio::time::sleep_until(at(2300).into()).await;
    let reset = Instant::now();
    assert!(
        held(&tick(&b, TickKind::Scheduled(slot(3))).await.0),
        "a record whose ETag changed was taken over on the old observation"
    );
    assert!(held(&tick(&c, TickKind::Manual(Utc::now())).await.0));

    // Manual ticks never take it over, however long it has been seen unchanged.
    tokio::time::sleep_until((reset + Duration::from_millis(2300)).into()).await;
    let (o, events) = tick(&c, TickKind::Manual(Utc::now())).await;
    assert!(
        held(&o),
        "a manual tick took over a lock without TTL: {o:?}\n{events}"
    );
    let out = keel()
        .redis(&w.server.url(), &w.sim.url_template())
        .args([
            "once",
            "--lease",
            "1s",
            "--schedule",
            "* * * * * *",
            "--holder-id",
            "operator",
        ])
        .run_async()
        .await;
    out.assert_code(3);

    // A scheduled tick after lease + interval of unchanged observation takes it over.
    let (o, events) = tick(&b, TickKind::Scheduled(slot(5))).await;
    assert!(
        completed(&o),
        "no takeover after lease + interval: {o:?}\n{events}"
    );
    assert_eq!(events.one("lock_acquired")["takeover"], true, "{events}");
    assert_eq!(w.sim.requests("p"), 1);
    // The record is ours now, and expires by a TTL again.
    assert!(w.record()["holder"].is_null(), "released after the tick");
    assert!(pttl(&w.server, LOCK) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_record_without_ttl_or_lease_is_taken_over_only_after_foreign_ttl_plus_interval_unchanged(
) {
    takeover_of_a_record_without_ttl(
        r#"{"holder":"crashed-replica","tick":"2020-01-01T00:00:00Z"}"#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_true_lock_without_ttl_is_taken_over_only_after_foreign_ttl_plus_interval_unchanged()
{
    takeover_of_a_record_without_ttl("true").await;
}

/// A store that lets another holder take the lock right after this replica read it:
/// the replica's save then races a record it has not seen.
struct LockTakenAfterRead {
    inner: Arc<dyn Store>,
    intruder: Arc<dyn Store>,
    /// Set by the test; the next read of the lock lets the intruder in, once.
    armed: Arc<AtomicBool>,
}

const INTRUDER_RECORD: &str = r#"{"holder":"replica-x","tick":"2020-01-01T00:00:00Z"}"#;

#[async_trait]
impl Store for LockTakenAfterRead {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn store_name(&self, kind: StoreKind) -> &str {
        self.inner.store_name(kind)
    }

    fn locate(&self, kind: StoreKind, key: &str) -> String {
        self.inner.locate(kind, key)
    }

    async fn get(&self, kind: StoreKind, key: &str) -> Result<Option<Entry>, StoreError> {
        let read = self.inner.get(kind, key).await?;
        if kind == StoreKind::Private && key == LOCK_KEY && self.armed.swap(false, Ordering::SeqCst)
        {
            let etag = read.as_ref().map_or(ABSENT_ETAG, |e| e.etag.as_str());
            self.intruder
                .save(
                    StoreKind::Private,
                    Save::cas(LOCK_KEY, INTRUDER_RECORD.as_bytes(), etag).with_ttl(60),
                )
                .await
                .expect("the intruder takes the lock");
        }
        Ok(read)
    }

    async fn bulk_get(
        &self,
        kind: StoreKind,
        keys: &[String],
    ) -> Result<Vec<Option<Entry>>, StoreError> {
        self.inner.bulk_get(kind, keys).await
    }

    async fn save(&self, kind: StoreKind, save: Save<'_>) -> Result<(), StoreError> {
        self.inner.save(kind, save).await
    }

    async fn update_existing(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
    ) -> Result<(), StoreError> {
        self.inner.update_existing(kind, key, data, etag).await
    }

    async fn delete(
        &self,
        kind: StoreKind,
        key: &str,
        etag: Option<&str>,
    ) -> Result<(), StoreError> {
        self.inner.delete(kind, key, etag).await
    }

    fn update_checks_existence(&self) -> bool {
        self.inner.update_checks_existence()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_taken_between_read_and_save_comes_back_as_held_not_as_a_store_error() {
    let w = world().await;
    let armed = Arc::new(AtomicBool::new(false));
    let store: Arc<dyn Store> = Arc::new(LockTakenAfterRead {
        inner: redis_store(&w.server).await,
        intruder: redis_store(&w.server).await,
        armed: armed.clone(),
    });
    let b = ticker(
        store,
        &w.sim.url_template(),
        &ReplicaOptions::new("replica-b"),
    );
    let a = w.replica("replica-a").await;
    // The replica reads no record (its save carries the "absent" ETag), or a released
    // one (its save carries the ETag just read); the intruder saves first either way.
    for existing in [false, true] {
        for kind in [TickKind::Scheduled(slot(0)), TickKind::Manual(Utc::now())] {
            w.server.query::<()>(redis::cmd("DEL").arg(LOCK));
            if existing {
                assert!(completed(&tick(&a, TickKind::Scheduled(slot(-60))).await.0));
            }
            let requests = w.sim.requests("p");
            armed.store(true, Ordering::SeqCst);
            let (o, events) = tick(&b, kind).await;
            assert!(!armed.load(Ordering::SeqCst), "the lock was never read");
            assert!(
                held(&o),
                "existing record {existing}, {kind:?}: {o:?}\n{events}"
            );
            assert!(!events.has("tick_failed"), "{events}");
            assert_eq!(events.one("tick_skipped")["reason"], "lock_held");
            assert_eq!(
                raw_data(&w.server, LOCK).as_deref(),
                Some(INTRUDER_RECORD.as_bytes()),
                "the winner's record was overwritten"
            );
            assert_eq!(w.sim.requests("p"), requests, "the loser probed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_once_processes_exit_0_or_3_never_1() {
    let w = world().await;
    // A slow plugin keeps the winner's lease live while the others start.
    w.sim.set(
        "p",
        Behavior::delay(Duration::from_millis(1500), Behavior::v0("ACTIVE")),
    );
    let runs: Vec<_> = (0..5)
        .map(|i| {
            keel()
                .redis(&w.server.url(), &w.sim.url_template())
                .args(["once", "--holder-id", &format!("operator-{i}")])
                .run_async()
        })
        .collect();
    let outputs = futures::future::join_all(runs).await;
    let codes: Vec<Option<i32>> = outputs.iter().map(|o| o.code).collect();
    for o in &outputs {
        assert!(
            matches!(o.code, Some(0) | Some(3)),
            "a lost lock race must exit 3, not 1: {}",
            o.describe()
        );
        if o.code == Some(3) {
            assert!(o.stderr.contains("lock"), "{}", o.describe());
        }
    }
    assert!(codes.contains(&Some(0)), "{codes:?}");
    assert!(codes.contains(&Some(3)), "{codes:?}");
}
