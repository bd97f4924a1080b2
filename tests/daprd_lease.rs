//! The `scrape_state` lease through a real daprd, where a get never shows a TTL: a live
//! lock is taken over only after it has been seen unchanged for longer than any TTL it
//! can carry (its own declared `lease_ms`, or `--foreign-lock-ttl` for the old scraper's
//! `true`), plus one interval. Short values throughout.

mod support;

use keel_test_support::process::bounded;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use keel_scraper::lease::{TickKind, DEFAULT_FOREIGN_LOCK_TTL};
use keel_scraper::secret::Secret;
use keel_scraper::store::dapr::DaprStore;
use keel_scraper::store::Store;
use keel_scraper::tick::{SkipReason, TickOutcome, Ticker};
use keel_test_support::sim::{Behavior, PluginSim};
use support::binary::{
    raw_data, seed_registry, seed_route, ticker, Capture, Events, ReplicaOptions,
};
use support::daprd::{Daprd, PRIVATE_PREFIX, PRIVATE_STORE, PUBLIC_STORE};
use support::redis_server::RedisServer;

const LOCK: &str = "plugins||scrape_state";
const TEST_BOUND: Duration = Duration::from_secs(60);

struct World {
    redis: RedisServer,
    daprd: Daprd,
    sim: PluginSim,
}

async fn world() -> World {
    assert_eq!(LOCK, format!("{PRIVATE_PREFIX}||scrape_state"));
    let redis = RedisServer::builder().with_password("lease-pw").start();
    let sim = PluginSim::start().expect("start the plugin simulator");
    sim.set("p", Behavior::v0("ACTIVE"));
    let daprd = tokio::task::block_in_place(|| {
        Daprd::builder("keel-scraper", &redis)
            .with_sim_endpoints(&sim.origin(), &["p"])
            .start()
    });
    let w = World { redis, daprd, sim };
    let store = w.store().await;
    seed_registry(&*store, &["p"]).await;
    seed_route(&*store, "p", "ACTIVE").await;
    w
}

impl World {
    async fn store(&self) -> Arc<dyn Store> {
        let store = DaprStore::connect(
            &self.daprd.grpc_endpoint(),
            None::<Secret>,
            PUBLIC_STORE,
            PRIVATE_STORE,
        )
        .await
        .unwrap_or_else(|e| panic!("DaprStore::connect: {e}"));
        Arc::new(store)
    }

    /// A replica on its own connection to the sidecar: lease 1 s, interval 1 s.
    async fn replica(&self, holder: &str, foreign_ttl: Duration) -> Ticker {
        let o = ReplicaOptions::new(holder)
            .lease(Duration::from_secs(1), Duration::from_secs(1))
            .foreign_lock_ttl(foreign_ttl);
        ticker(self.store().await, &self.daprd.invoke_template(), &o)
    }

    /// The old Go scraper's lock, as it wrote it through Dapr (a state hash holding
    /// `true`), with a TTL or without.
    fn write_old_scraper_lock(&self, ttl_seconds: Option<u64>) {
        self.redis.query::<()>(
            redis::cmd("HSET")
                .arg(LOCK)
                .arg("data")
                .arg("true")
                .arg("version")
                .arg(1)
                .arg("first-write")
                .arg(0),
        );
        if let Some(ttl) = ttl_seconds {
            self.redis
                .query::<()>(redis::cmd("EXPIRE").arg(LOCK).arg(ttl));
        }
    }
}

/// A whole-second slot `offset_s` seconds from now.
fn slot(offset_s: i64) -> DateTime<Utc> {
    Utc::now().trunc_subsecs(0) + chrono::Duration::seconds(offset_s)
}

/// One scheduled tick for a fresh slot, with its events; releases the lease if taken.
async fn tick(t: &Ticker, n: i64) -> (TickOutcome, Events) {
    let capture = Capture::new();
    let (outcome, guard) = capture
        .run(t.tick_keeping_lease(TickKind::Scheduled(slot(100 + n))))
        .await;
    if let Some(g) = guard {
        t.lease.release(&g).await.expect("release the lease");
    }
    (outcome, capture.events())
}

fn held(o: &TickOutcome) -> bool {
    matches!(o, TickOutcome::Skipped(SkipReason::LockHeld { .. }))
}

fn completed(o: &TickOutcome) -> bool {
    matches!(o, TickOutcome::Completed(_))
}

/// Ticks every 250 ms for `span`, asserting every tick finds the lock held.
async fn held_throughout(t: &Ticker, span: Duration, first: i64, what: &str) -> i64 {
    let start = Instant::now();
    let mut n = first;
    while start.elapsed() < span {
        let (o, events) = tick(t, n).await;
        assert!(
            held(&o),
            "{what}: taken over after {:?}: {o:?}\n{events}",
            start.elapsed()
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_scraper_true_is_respected_until_its_ttl_ends_then_taken_normally() {
    bounded(TEST_BOUND, async {
        let w = world().await;
        w.write_old_scraper_lock(Some(3));
        let since = Instant::now();
        let b = w.replica("replica-b", Duration::from_secs(10)).await;
        // Its TTL (3 s) is invisible through Dapr and shorter than the foreign TTL
        // (10 s): held while Redis keeps it, taken as an absent lock once it expired.
        let mut n = 0;
        let taken_at = loop {
            let (o, events) = tick(&b, n).await;
            n += 1;
            if completed(&o) {
                assert_eq!(events.one("lock_acquired")["takeover"], false, "{events}");
                break since.elapsed();
            }
            assert!(held(&o), "{o:?}\n{events}");
            assert!(
                raw_data(&w.redis, LOCK).is_some(),
                "the expired lock was reported held"
            );
            assert!(since.elapsed() < Duration::from_secs(8), "never taken");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            taken_at >= Duration::from_millis(2500),
            "taken before its TTL ended: {taken_at:?}"
        );
        assert_eq!(w.sim.requests("p"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_foreign_ttl_a_true_with_a_30_minute_ttl_is_never_taken_over() {
    bounded(TEST_BOUND, async {
        let w = world().await;
        w.write_old_scraper_lock(Some(1800));
        let b = w.replica("replica-b", DEFAULT_FOREIGN_LOCK_TTL).await;
        // Well past this replica's lease + interval (2 s), which was the old rule.
        held_throughout(&b, Duration::from_secs(4), 0, "a live 30-minute true").await;
        assert_eq!(raw_data(&w.redis, LOCK).as_deref(), Some(&b"true"[..]));
        assert_eq!(w.sim.requests("p"), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_true_without_a_ttl_is_taken_over_after_the_foreign_ttl_plus_one_interval() {
    bounded(TEST_BOUND, async {
        let w = world().await;
        w.write_old_scraper_lock(None);
        let b = w.replica("replica-b", Duration::from_secs(2)).await;
        let since = Instant::now();
        // Foreign TTL 2 s + interval 1 s: held for 3 s of unchanged observation.
        let n = held_throughout(&b, Duration::from_millis(2700), 0, "a true without TTL").await;
        let wait = Duration::from_millis(3300).saturating_sub(since.elapsed());
        tokio::time::sleep(wait).await;
        let (o, events) = tick(&b, n).await;
        assert!(completed(&o), "not taken over after 3.3 s: {o:?}\n{events}");
        assert_eq!(events.one("lock_acquired")["takeover"], true, "{events}");
        assert_eq!(w.sim.requests("p"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_record_with_a_longer_lease_is_never_taken_over() {
    bounded(TEST_BOUND, async {
        let w = world().await;
        // Replica A runs with a 6 s lease and holds the lock (not released).
        let o =
            ReplicaOptions::new("replica-a").lease(Duration::from_secs(6), Duration::from_secs(1));
        let a = ticker(w.store().await, &w.daprd.invoke_template(), &o);
        let (outcome, guard) = a.tick_keeping_lease(TickKind::Scheduled(slot(50))).await;
        assert!(completed(&outcome), "{outcome:?}");
        let guard = guard.expect("A holds the lease");
        // B (lease 1 s, interval 1 s) sees no TTL through Dapr; under the old rule it
        // took over after 2 s. A's record declares 6 s: B waits that plus an interval.
        let b = w.replica("replica-b", DEFAULT_FOREIGN_LOCK_TTL).await;
        held_throughout(&b, Duration::from_secs(4), 0, "a live 6 s lease").await;
        a.lease
            .confirm(&guard)
            .await
            .expect("A still holds its lease");
    })
    .await;
}
