//! Each plugin's last observation (`scrape_observations`) and the last completed tick
//! (`scrape_last_tick`), against a real `redis-server` and simulated plugins on loopback:
//!
//! - A fenced save creates a key that does not exist yet, and lands only while the lock
//!   record is the holder's (memory and Redis, atomically).
//! - Real ticks keep, per plugin, the status, the since-time (the first tick this worker
//!   saw the status, else unknown), the last outcome, the error kind and the detail; the
//!   record is rewritten only when something changed; the last tick is recorded every tick.
//! - `routes` (table, `--json`, one plugin) shows it, escaping a plugin's control
//!   characters, and shows a missing or unreadable record as such.

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use keel_scraper::lease::TickKind;
use keel_scraper::observations::{self, Outcome, LAST_TICK_KEY, OBSERVATIONS_KEY};
use keel_scraper::store::memory::MemoryStore;
use keel_scraper::store::redis::RedisStore;
use keel_scraper::store::{Fence, Save, Store, StoreError, StoreKind, ABSENT_ETAG};
use keel_scraper::tick::{TickOutcome, Ticker};
use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::{
    keel, raw_json, raw_version, redis_store, redis_ticker, routes_json, seed_registry, seed_route,
    ticker, ReplicaOptions,
};
use support::redis_server::RedisServer;

async fn fenced_saves_create_and_follow_the_lock_record(store: Arc<dyn Store>) {
    assert!(store.fences_writes());
    let lock = br#"{"holder":"a"}"#;
    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", lock, ABSENT_ETAG),
        )
        .await
        .unwrap();
    let fence = Fence {
        key: "scrape_state".into(),
        etag: "1".into(),
        data: lock.to_vec(),
    };
    // Creates the absent key under the held lease.
    store
        .save_fenced(
            StoreKind::Private,
            Save::cas("scrape_observations", b"one", ABSENT_ETAG),
            &fence,
        )
        .await
        .expect("fenced create under a held lease");
    // The ETag rules still apply: creating it again is a conflict.
    let err = store
        .save_fenced(
            StoreKind::Private,
            Save::cas("scrape_observations", b"again", ABSENT_ETAG),
            &fence,
        )
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    store
        .save_fenced(
            StoreKind::Private,
            Save::cas("scrape_observations", b"two", "1"),
            &fence,
        )
        .await
        .expect("fenced update with the right ETag");

    // Another holder's record at the same version: refused, nothing written or created.
    store
        .delete(StoreKind::Private, "scrape_state", None)
        .await
        .unwrap();
    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", br#"{"holder":"b"}"#, ABSENT_ETAG),
        )
        .await
        .unwrap();
    for (key, etag) in [
        ("scrape_observations", "2"),
        ("scrape_last_tick", ABSENT_ETAG),
    ] {
        let err = store
            .save_fenced(StoreKind::Private, Save::cas(key, b"late", etag), &fence)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{key}: {err:?}");
    }
    let kept = store
        .get(StoreKind::Private, "scrape_observations")
        .await
        .unwrap()
        .expect("still there");
    assert_eq!(
        (kept.data.as_slice(), kept.etag.as_str()),
        (&b"two"[..], "2")
    );
    assert_eq!(
        store
            .get(StoreKind::Private, "scrape_last_tick")
            .await
            .unwrap(),
        None,
        "a refused create creates nothing"
    );
}

#[tokio::test]
async fn memory_store_fences_saves_and_creates() {
    fenced_saves_create_and_follow_the_lock_record(Arc::new(MemoryStore::new("pub", "priv"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_fences_saves_and_creates() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), "pub", "priv", "plugins")
        .await
        .expect("connect");
    fenced_saves_create_and_follow_the_lock_record(Arc::new(store)).await;
}

/// One scheduled tick named `slot`, its lease released after.
async fn tick(t: &Ticker, slot: DateTime<Utc>) {
    let outcome = t.tick(TickKind::Scheduled(slot)).await;
    assert!(
        matches!(outcome, TickOutcome::Completed(_)),
        "tick {slot}: {outcome:?}"
    );
}

fn rfc(t: DateTime<Utc>) -> String {
    observations::rfc3339(t.timestamp())
}

/// The stored `scrape_observations` record of a memory store.
async fn stored_record(store: &MemoryStore) -> keel_scraper::store::Entry {
    store
        .get(StoreKind::Private, OBSERVATIONS_KEY)
        .await
        .unwrap()
        .expect("a record")
}

/// A process keeps the record it wrote last between its ticks and merges into it while
/// the stored record is still those bytes. The records it writes are byte for byte those
/// of a worker that decodes the stored record every tick (a fresh ticker each tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_kept_between_ticks_writes_what_decoding_it_would() {
    let sim = PluginSim::start().expect("simulator");
    let ids = ["a", "b", "c", "d"];
    for id in ids {
        sim.set(id, Behavior::v0("ACTIVE"));
    }
    let stores = [
        Arc::new(MemoryStore::new("pub", "priv")),
        Arc::new(MemoryStore::new("pub", "priv")),
    ];
    for store in &stores {
        seed_registry(&**store, &ids).await;
        for id in ids {
            seed_route(&**store, id, "ACTIVE").await;
        }
    }
    let options = ReplicaOptions::new("replica-a")
        .thresholds(2, 1)
        .probe_timeout(Duration::from_secs(1));
    let kept = ticker(stores[0].clone(), &sim.url_template(), &options);
    let base = Utc::now().trunc_subsecs(0);
    // A status change, a failure, a recovery, a quiet tick: each step changes the record
    // or leaves it alone.
    let steps: [&[(&str, Behavior)]; 5] = [
        &[("b", Behavior::v0("STOPPED"))],
        &[("c", Behavior::Reset)],
        &[],
        &[
            ("c", Behavior::v0("ACTIVE")),
            ("d", Behavior::v0("STOPPED")),
        ],
        &[("b", Behavior::v0("ACTIVE"))],
    ];
    for (k, step) in steps.iter().enumerate() {
        for (id, behavior) in step.iter() {
            sim.set(*id, behavior.clone());
        }
        let slot = base + chrono::Duration::seconds(10 * (k as i64 + 1));
        tick(&kept, slot).await;
        tick(
            &ticker(stores[1].clone(), &sim.url_template(), &options),
            slot,
        )
        .await;
        let (a, b) = (
            stored_record(&stores[0]).await,
            stored_record(&stores[1]).await,
        );
        assert_eq!(
            String::from_utf8_lossy(&a.data),
            String::from_utf8_lossy(&b.data),
            "step {k}"
        );
        assert_eq!(a.etag, b.etag, "step {k}: both rewrote it, or neither did");
    }
}

/// A record another replica wrote since is decoded, not taken from the copy this process
/// kept: its since-times carry over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_written_by_another_replica_is_read_not_the_kept_one() {
    let sim = PluginSim::start().expect("simulator");
    sim.set("a", Behavior::v0("ACTIVE"));
    sim.set("b", Behavior::v0("STOPPED"));
    let store = Arc::new(MemoryStore::new("pub", "priv"));
    seed_registry(&*store, &["a", "b"]).await;
    seed_route(&*store, "a", "ACTIVE").await;
    seed_route(&*store, "b", "ACTIVE").await;
    let t = ticker(
        store.clone(),
        &sim.url_template(),
        &ReplicaOptions::new("replica-a").probe_timeout(Duration::from_secs(1)),
    );
    let base = Utc::now().trunc_subsecs(0);
    tick(&t, base).await;
    let first = stored_record(&store).await;
    let mut rec = observations::decode(&first.data).expect("decodes");
    assert_eq!(
        rec.plugins["a"].since, None,
        "already ACTIVE when first seen"
    );
    // Another replica knew better: `a` has been ACTIVE since an hour before.
    let earlier = base.timestamp() - 3600;
    if let Some(k) = rec.plugins.get_mut("a") {
        k.since = Some(earlier);
    }
    rec.holder = "replica-b".into();
    store
        .save(
            StoreKind::Private,
            Save::cas(OBSERVATIONS_KEY, &observations::encode(&rec), &first.etag),
        )
        .await
        .unwrap();
    // `b` comes back: the record is rewritten, and `a` keeps the stored since-time.
    sim.set("b", Behavior::v0("ACTIVE"));
    let second = base + chrono::Duration::seconds(10);
    tick(&t, second).await;
    let after = observations::decode(&stored_record(&store).await.data).expect("decodes");
    assert_eq!(after.holder, "replica-a", "rewritten by this tick");
    assert_eq!(after.plugins["a"].since, Some(earlier));
    assert_eq!(after.plugins["b"].since, Some(second.timestamp()));
}

const EVIL: &str = "<script>alert(1)</script>\u{1b}[31mred\u{1b}[0m";

fn row<'a>(rows: &'a Value, id: &str) -> &'a Value {
    rows.as_array()
        .and_then(|a| a.iter().find(|r| r["plugin_id"] == id))
        .unwrap_or_else(|| panic!("no row for {id}: {rows}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_keep_each_plugins_last_observation_and_routes_shows_it() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().expect("simulator");
    sim.set("good", Behavior::v0("ACTIVE"));
    sim.set("dying", Behavior::v0("ACTIVE"));
    sim.set("stopper", Behavior::v0("STOPPED"));
    let evil_body = serde_json::json!({ "ret": 1, "msg": EVIL, "status": "ACTIVE" }).to_string();
    sim.set("evil", Behavior::raw(200, evil_body));
    seed_registry(&*store, &["good", "dying", "stopper", "evil"]).await;
    for id in ["good", "dying", "stopper", "evil"] {
        seed_route(&*store, id, "ACTIVE").await;
    }
    let t = redis_ticker(
        &server,
        &sim.url_template(),
        &ReplicaOptions::new("replica-a")
            .thresholds(2, 1)
            .probe_timeout(Duration::from_secs(1)),
    )
    .await;
    let base = Utc::now().trunc_subsecs(0);
    let slot = |k: i64| base + chrono::Duration::seconds(10 * k);

    // Tick 1: stopper's STOPPED is written (since = tick 1); good and dying were already
    // ACTIVE when first seen (since unknown); evil failed once.
    tick(&t, slot(1)).await;
    let obs_key = format!("plugins||{OBSERVATIONS_KEY}");
    let last_key = format!("plugins||{LAST_TICK_KEY}");
    let v1 = raw_version(&server, &obs_key).expect("the record was created");
    let rec =
        observations::decode(&serde_json::to_vec(&raw_json(&server, &obs_key).unwrap()).unwrap())
            .expect("decodes");
    assert_eq!(rec.tick, slot(1).timestamp());
    assert_eq!(rec.holder, "replica-a");
    assert_eq!(rec.plugins["good"].since, None);
    assert_eq!(rec.plugins["stopper"].since, Some(slot(1).timestamp()));
    assert_eq!(&*rec.plugins["stopper"].status, "STOPPED");
    match &rec.plugins["evil"].outcome {
        Outcome::Failed { error_kind, detail } => {
            assert_eq!(&**error_kind, "plugin_error");
            // The probe already replaces a plugin's control characters; the markup stays.
            let d = detail.as_deref().unwrap_or_default();
            assert!(d.contains("<script>alert(1)</script>?[31mred"), "{d:?}");
            assert!(!d.contains('\u{1b}'), "{d:?}");
        }
        other => panic!("evil: {other:?}"),
    }

    // Tick 2: evil's second failure makes it FAILED (since = tick 2).
    tick(&t, slot(2)).await;
    let v2 = raw_version(&server, &obs_key).unwrap();
    assert!(v2 > v1, "something changed: rewritten");

    // Tick 3: nothing changes (evil is blocked, left alone): the record is not rewritten,
    // the last tick is.
    tick(&t, slot(3)).await;
    assert_eq!(
        raw_version(&server, &obs_key),
        Some(v2),
        "unchanged: not rewritten"
    );
    let last = raw_json(&server, &last_key).expect("last tick recorded");
    assert_eq!(last["tick"], rfc(slot(3)));
    assert_eq!(last["holder"], "replica-a");

    // dying dies: two failed probes, FAILED at tick 5.
    sim.set("dying", Behavior::Reset);
    tick(&t, slot(4)).await;
    tick(&t, slot(5)).await;

    let out = routes_json(&server.url()).run_async().await;
    out.assert_code(0);
    let rows: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON array");
    let counters = raw_json(&server, "plugins||scrape_counters").expect("counters");
    let expect = |id: &str, status: &str, since: &str, outcome: &str, kind: Value| {
        let failures = counters[id]["f"].as_u64().unwrap_or(0);
        let r = row(&rows, id);
        assert_eq!(
            (
                &r["status"],
                &r["since"],
                &r["last_outcome"],
                &r["error_kind"],
                &r["consecutive_failures"],
                &r["observation"],
            ),
            (
                &Value::from(status),
                &Value::from(since),
                &Value::from(outcome),
                &kind,
                &Value::from(failures),
                &Value::from("present"),
            ),
            "{id}: {r}"
        );
    };
    expect("good", "ACTIVE", "unknown", "reported", Value::Null);
    expect("stopper", "STOPPED", &rfc(slot(1)), "reported", Value::Null);
    expect(
        "evil",
        "FAILED",
        &rfc(slot(2)),
        "failed",
        "plugin_error".into(),
    );
    expect(
        "dying",
        "FAILED",
        &rfc(slot(5)),
        "failed",
        "protocol".into(),
    );
    assert!(counters["dying"]["f"].as_u64() >= Some(2), "{counters}");
    let evil_failures = counters["evil"]["f"].as_u64().unwrap_or(0);
    assert!(
        row(&rows, "evil")["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("<script>alert(1)</script>"),
        "JSON carries the plugin's own text"
    );

    // Whatever the record holds (written by another version, or by hand), `routes`
    // never passes a control character to the terminal: plant some.
    let mut rec =
        observations::decode(&serde_json::to_vec(&raw_json(&server, &obs_key).unwrap()).unwrap())
            .unwrap();
    if let Some(k) = rec.plugins.get_mut("evil") {
        k.outcome = Outcome::Failed {
            error_kind: "plugin_error".into(),
            detail: Some(format!("plugin reported ret 1: {EVIL}").into()),
        };
    }
    server.query::<()>(
        redis::cmd("HSET")
            .arg(&obs_key)
            .arg("data")
            .arg(observations::encode(&rec)),
    );
    let out = routes_json(&server.url()).run_async().await;
    out.assert_code(0);
    assert!(!out.stdout.contains('\u{1b}'), "JSON escapes ESC itself");
    assert!(out.stdout.contains("\\u001b[31mred"), "{}", out.stdout);

    // The table: one line per plugin, control characters escaped.
    let out = keel()
        .args(["routes", "--backend", "redis", "--redis-url", &server.url()])
        .run_async()
        .await;
    out.assert_code(0);
    assert!(!out.stdout.contains('\u{1b}'), "{}", out.stdout);
    assert!(out.stdout.contains("\\u{1b}[31mred"), "{}", out.stdout);
    assert!(out.stdout.starts_with("PLUGIN"), "{}", out.stdout);
    let dying = out
        .stdout
        .lines()
        .find(|l| l.starts_with("dying "))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    let dying_failures = format!(" {} ", counters["dying"]["f"]);
    for needle in [
        "FAILED",
        &rfc(slot(5)),
        "failed (protocol)",
        &dying_failures,
    ] {
        assert!(dying.contains(needle), "{needle:?} in {dying:?}");
    }

    // One plugin in full, as text and as JSON.
    let out = keel()
        .args([
            "routes",
            "evil",
            "--backend",
            "redis",
            "--redis-url",
            &server.url(),
        ])
        .run_async()
        .await;
    out.assert_code(0);
    assert!(!out.stdout.contains('\u{1b}'), "{}", out.stdout);
    for needle in [
        "plugin:               evil",
        "status:               FAILED",
        &format!("since:                {}", rfc(slot(2))),
        "error kind:           plugin_error",
        &format!("consecutive failures: {evil_failures}"),
        "detail:               plugin reported ret 1: <script>alert(1)</script>\\u{1b}[31mred",
        &format!("last completed tick:  {} by replica-a at ", rfc(slot(5))),
    ] {
        assert!(out.stdout.contains(needle), "{needle:?} in\n{}", out.stdout);
    }
    let out = keel()
        .args([
            "routes",
            "--json",
            "dying",
            "--backend",
            "redis",
            "--redis-url",
            &server.url(),
        ])
        .run_async()
        .await;
    out.assert_code(0);
    let one: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(&one, row(&rows, "dying"));
    let out = keel()
        .args([
            "routes",
            "nosuch",
            "--backend",
            "redis",
            "--redis-url",
            &server.url(),
        ])
        .run_async()
        .await;
    out.assert_code(1);
    assert!(
        out.stderr.contains("\"nosuch\" is not registered"),
        "{}",
        out.describe()
    );

    // An unreadable record shows as such, never as a made-up value; the next tick
    // replaces it and the since-times start again (unknown, or the tick that sees a change).
    server.query::<()>(redis::cmd("HSET").arg(&obs_key).arg("data").arg("not json"));
    let out = routes_json(&server.url()).run_async().await;
    out.assert_code(0);
    let rows: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON array");
    let r = row(&rows, "dying");
    assert_eq!(r["observation"], "unreadable", "{r}");
    assert!(
        r["observation_error"]
            .as_str()
            .unwrap_or_default()
            .contains("not JSON"),
        "{r}"
    );
    assert_eq!(
        (&r["since"], &r["last_outcome"]),
        (&Value::Null, &Value::Null),
        "{r}"
    );
    assert_eq!(r["status"], "FAILED", "the route itself still shows");

    tick(&t, slot(6)).await;
    let rec =
        observations::decode(&serde_json::to_vec(&raw_json(&server, &obs_key).unwrap()).unwrap())
            .expect("replaced by a valid record");
    assert_eq!(rec.tick, slot(6).timestamp());
    assert_eq!(
        rec.plugins["dying"].since, None,
        "since starts again: unknown"
    );
}

/// Through Dapr (the sidecar double storing in a real Redis with Dapr's key prefixes) the
/// hook's fenced save is a plain first-write save: the record is created under the
/// private store's prefix and `routes` reads it back through the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_dapr_the_record_is_written_and_read_back() {
    use keel_scraper::store::dapr::DaprStore;
    use support::sidecar::{SidecarConfig, SidecarDouble};

    let server = RedisServer::start();
    let sidecar =
        SidecarDouble::start(SidecarConfig::default().with_redis_url(&server.url())).await;
    let store: Arc<dyn Store> = Arc::new(
        DaprStore::connect(
            &sidecar.grpc_endpoint(),
            None,
            sidecar.public_store(),
            sidecar.private_store(),
        )
        .await
        .expect("connect through the sidecar double"),
    );
    assert!(!store.fences_writes());
    let sim = PluginSim::start().expect("simulator");
    sim.set("a", Behavior::v0("STOPPED"));
    seed_registry(&*store, &["a"]).await;
    seed_route(&*store, "a", "ACTIVE").await;
    let t = support::binary::ticker(
        store.clone(),
        &sim.url_template(),
        &ReplicaOptions::new("via-dapr"),
    );
    let slot = Utc::now().trunc_subsecs(0);
    tick(&t, slot).await;

    let entry = store
        .get(StoreKind::Private, OBSERVATIONS_KEY)
        .await
        .expect("read through the sidecar")
        .expect("the record exists");
    let rec = observations::decode(&entry.data).expect("decodes");
    assert_eq!(&*rec.plugins["a"].status, "STOPPED");
    assert_eq!(rec.plugins["a"].since, Some(slot.timestamp()));
    let report = observations::load(&*store).await.expect("load");
    assert_eq!(report.plugins[0].since.as_deref(), Some(rfc(slot).as_str()));
    assert_eq!(
        report.last_tick.as_ref().map(|l| l.holder.as_str()),
        Some("via-dapr")
    );
}
