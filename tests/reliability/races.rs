//! Scenarios 5 and 6: the Plugins plugin writes the same keys as the worker while ticks
//! run. Its edits of `register_addons` must never be lost to a status rewrite, and a
//! plugin it unregisters must never get its route back.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_scraper::route::route_key;
use keel_scraper::store::{Save, Store, StoreError, StoreKind};
use keel_test_support::sim::Behavior;
use serde_json::value::RawValue;

use crate::bounded;
use crate::figures::Scenario;
use crate::harness::{slot_at_or_after, wait_until, Journal};
use crate::replicas::{settle_after, wait_ticking};
use crate::support::binary::redis_store;
use crate::world::{check_route, flap_cycle, ids, seeded_addons, Flapper, World, REGISTRY_KEY};

const SECOND: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

// ---------------------------------------------------------------------------------------
// 5. A concurrent editor of register_addons
// ---------------------------------------------------------------------------------------

/// What the editor did.
#[derive(Default)]
struct EditorReport {
    edits: u64,
    conflicts: u64,
    /// Reads that showed an older `register_addons` than the editor's last write.
    lost: Vec<String>,
    /// The last `register_addons` written to each route.
    last: HashMap<String, String>,
}

/// Rewrites `data` with `register_addons` replaced and every other member's text kept.
fn with_addons(data: &[u8], addons: &str) -> Vec<u8> {
    let members: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(data).unwrap_or_else(|e| panic!("route is not JSON: {e}"));
    let mut out = String::from("{");
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let value = if k == "register_addons" {
            addons
        } else {
            v.get()
        };
        out.push_str(&format!(
            "{}:{value}",
            serde_json::to_string(k).unwrap_or_default()
        ));
    }
    out.push('}');
    out.into_bytes()
}

fn addons_of(data: &[u8]) -> String {
    let raw: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(data).unwrap_or_else(|e| panic!("route is not JSON: {e}"));
    raw.get("register_addons")
        .map(|v| v.get().to_owned())
        .unwrap_or_default()
}

/// Edits every route's `register_addons` in a loop, as Plugins does: read, change,
/// compare-and-set with the ETag read (first-write), re-read and retry on conflict.
async fn edit_until(
    store: Arc<dyn Store>,
    ids: Vec<String>,
    stop: Arc<AtomicBool>,
) -> EditorReport {
    let mut report = EditorReport {
        last: ids
            .iter()
            .map(|id| (id.clone(), seeded_addons(id)))
            .collect(),
        ..EditorReport::default()
    };
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        for id in &ids {
            let key = route_key(id);
            loop {
                let entry = store
                    .get(StoreKind::Public, &key)
                    .await
                    .unwrap_or_else(|e| panic!("editor read {key}: {e}"))
                    .unwrap_or_else(|| panic!("editor: {key} is gone"));
                let seen = addons_of(&entry.data);
                if seen != report.last[id] {
                    report
                        .lost
                        .push(format!("{id}: wrote {} then read {seen}", report.last[id]));
                    report.last.insert(id.clone(), seen);
                }
                n += 1;
                let addons = format!(r#"{{"{id}_created":"{id}/v1/hook","edit":{n}}}"#);
                let data = with_addons(&entry.data, &addons);
                match store
                    .save(StoreKind::Public, Save::cas(&key, &data, &entry.etag))
                    .await
                {
                    Ok(()) => {
                        report.edits += 1;
                        report.last.insert(id.clone(), addons);
                        break;
                    }
                    Err(StoreError::Conflict { .. }) => report.conflicts += 1,
                    Err(e) => panic!("editor write {key}: {e}"),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    report
}

/// The last status written to each route, in lease order: a replica's writes belong to
/// the tick it last acquired, and ticks are ordered by the lease.
fn last_written(journal: &Journal) -> BTreeMap<String, String> {
    let mut tick_of: HashMap<String, DateTime<Utc>> = HashMap::new();
    let mut last: BTreeMap<String, (DateTime<Utc>, usize, String)> = BTreeMap::new();
    for e in journal.events() {
        match e.name() {
            "lock_acquired" => {
                tick_of.insert(e.replica.clone(), e.tick());
            }
            "plugin_status_changed" => {
                let tick = tick_of
                    .get(&e.replica)
                    .copied()
                    .unwrap_or_else(|| panic!("a write outside any tick: {}", e.value));
                let key = (tick, e.seq, e.str("to").to_owned());
                let id = e.str("plugin_id").to_owned();
                if last.get(&id).is_none_or(|k| (k.0, k.1) < (key.0, key.1)) {
                    last.insert(id, key);
                }
            }
            _ => {}
        }
    }
    last.into_iter().map(|(id, (_, _, s))| (id, s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_editor_loses_no_edit() {
    let mut sc = Scenario::start("5-concurrent-editor");
    bounded(Duration::from_secs(120), async {
        let w = World::start(false).await;
        let plugins = ids("e", 20);
        w.seed(&plugins, "ACTIVE").await;
        let flapper = Flapper::start(
            &w.sim,
            &plugins,
            Duration::from_millis(900),
            Duration::from_millis(150),
            flap_cycle(),
        );
        let mut replicas = w.spawn_replicas(&["r1", "r2"], "* * * * * *");
        wait_ticking(&w.journal, &replicas).await;

        let stop = Arc::new(AtomicBool::new(false));
        let editor = tokio::spawn(edit_until(
            redis_store(&w.redis).await,
            plugins.clone(),
            Arc::clone(&stop),
        ));
        let from = slot_at_or_after(Utc::now(), 1);
        let to = from + SECOND * 19;
        settle_after(&w.journal, to).await;
        stop.store(true, Ordering::SeqCst);
        let report = editor
            .await
            .unwrap_or_else(|e| panic!("the editor panicked: {e}"));

        // Settle: plugins stop flapping, two more ticks decide the final statuses.
        flapper
            .stop(&w.sim, &plugins, Behavior::v0("STOPPED"))
            .await;
        let settled = slot_at_or_after(Utc::now() + SECOND * 2, 1);
        settle_after(&w.journal, settled).await;
        for r in replicas.iter_mut() {
            assert_eq!(r.terminate(&w.journal), Some(0), "{} exit code", r.name);
        }

        let audit = w.journal.audit(from, to, Duration::from_secs(1));
        let conflicts = w.journal.count("route_write_conflict");
        sc.figure("ticks", audit.slots);
        sc.figure("edits", report.edits);
        sc.figure("editor conflicts retried", report.conflicts);
        sc.figure("worker conflicts retried", conflicts);
        sc.figure(
            "worker status writes",
            w.journal.count("plugin_status_changed"),
        );
        sc.figure(
            "worker writes failed",
            w.journal.count("route_write_failed"),
        );
        sc.figure("lost", report.lost.len());
        audit.assert_exactly_once(&w.journal);
        assert!(report.lost.is_empty(), "edits lost: {:?}", report.lost);
        assert!(
            report.edits > 0 && conflicts > 0,
            "the race was not exercised: {} edits, {conflicts} worker conflicts",
            report.edits
        );

        // Every route ends with the editor's last addons and the worker's last status.
        let decided = last_written(&w.journal);
        for id in &plugins {
            let entry = w
                .route(id)
                .await
                .unwrap_or_else(|| panic!("route {id} is gone"));
            let status = check_route(&entry.data, &report.last[id])
                .unwrap_or_else(|e| panic!("route {id}: {e}"));
            assert_eq!(
                Some(&status),
                decided.get(id),
                "route {id}: status vs the worker's last write"
            );
            assert_eq!(status, "STOPPED", "route {id} after settling");
        }
        w.figure_no_secrets(&mut sc);
    })
    .await;
    sc.pass();
}

// ---------------------------------------------------------------------------------------
// 6. Plugins unregistered while ticks run
// ---------------------------------------------------------------------------------------

/// Removes `ids` from the registry with compare-and-set, retrying on conflict.
async fn unregister(store: &dyn Store, ids: &[String]) {
    for _ in 0..50 {
        let entry = store
            .get(StoreKind::Private, REGISTRY_KEY)
            .await
            .unwrap_or_else(|e| panic!("read the registry: {e}"))
            .unwrap_or_else(|| panic!("the registry is gone"));
        let mut map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&entry.data).unwrap_or_else(|e| panic!("registry: {e}"));
        for id in ids {
            map.remove(id);
        }
        let data = serde_json::Value::Object(map).to_string();
        match store
            .save(
                StoreKind::Private,
                Save::cas(REGISTRY_KEY, data.as_bytes(), &entry.etag),
            )
            .await
        {
            Ok(()) => return,
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => panic!("write the registry: {e}"),
        }
    }
    panic!("could not unregister {ids:?}: 50 conflicts in a row");
}

/// Deletes each route, then adds it to `watched` (never before: the watcher would see
/// the route that is still there).
async fn delete_routes(store: &dyn Store, ids: &[String], watched: &std::sync::Mutex<Vec<String>>) {
    for id in ids {
        store
            .delete(StoreKind::Public, &route_key(id), None)
            .await
            .unwrap_or_else(|e| panic!("delete the route of {id}: {e}"));
        watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_plugins_never_get_their_routes_back() {
    let mut sc = Scenario::start("6-unregister-while-ticking");
    bounded(Duration::from_secs(120), async {
        let w = World::start(false).await;
        let plugins = ids("u", 30);
        w.seed(&plugins, "ACTIVE").await;
        let probe_delay = Duration::from_millis(300);
        w.sim
            .set_default(Behavior::delay(probe_delay, Behavior::v0("ACTIVE")));
        let mut replicas = w.spawn_replicas(&["r1", "r2"], "* * * * * *");
        wait_ticking(&w.journal, &replicas).await;

        // A watcher checks, every few milliseconds, that no deleted route exists.
        let deleted: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (deleted, stop) = (Arc::clone(&deleted), Arc::clone(&stop));
            let mut conn = w.redis.async_conn().await;
            tokio::spawn(async move {
                let (mut checks, mut seen) = (0u64, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let keys: Vec<String> = deleted
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .map(|id| route_key(id))
                        .collect();
                    for key in keys {
                        let exists: i64 = redis::cmd("EXISTS")
                            .arg(&key)
                            .query_async(&mut conn)
                            .await
                            .unwrap_or_else(|e| panic!("watcher EXISTS {key}: {e}"));
                        checks += 1;
                        if exists != 0 {
                            seen.push(key);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (checks, seen)
            })
        };

        // Eight batches of three plugins. Each batch reports STOPPED, so the next tick
        // decides to write their routes; 120 ms after that tick took the lock (it has read
        // the routes and is waiting 300 ms for the probes) the Plugins side unregisters them,
        // so the writes meet routes that are gone.
        let batches: Vec<Vec<String>> = plugins[..24].chunks(3).map(<[String]>::to_vec).collect();
        for (i, batch) in batches.iter().enumerate() {
            w.sim.set_many(
                batch.iter().cloned(),
                Behavior::delay(probe_delay, Behavior::v0("STOPPED")),
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            let seen = w.journal.count("lock_acquired");
            let tick = wait_until(Duration::from_secs(5), "the next tick", &w.journal, || {
                w.journal.named("lock_acquired").get(seen).map(|e| e.tick())
            })
            .await;
            tokio::time::sleep(Duration::from_millis(120)).await;
            match i % 3 {
                // Route first, then the registry entry.
                0 => {
                    delete_routes(&*w.store, batch, &deleted).await;
                    unregister(&*w.store, batch).await;
                }
                // Registry entry first, then the route.
                1 => {
                    unregister(&*w.store, batch).await;
                    delete_routes(&*w.store, batch, &deleted).await;
                }
                // Route now, registry entry only after the tick.
                _ => {
                    delete_routes(&*w.store, batch, &deleted).await;
                    wait_until(
                        Duration::from_secs(5),
                        "the tick to end",
                        &w.journal,
                        || {
                            w.journal
                                .named("tick_completed")
                                .iter()
                                .any(|e| e.tick() == tick)
                                .then_some(())
                        },
                    )
                    .await;
                    unregister(&*w.store, batch).await;
                }
            }
        }
        let last = slot_at_or_after(Utc::now() + SECOND * 3, 1);
        settle_after(&w.journal, last).await;
        stop.store(true, Ordering::SeqCst);
        let (checks, recreated) = watcher
            .await
            .unwrap_or_else(|e| panic!("the watcher panicked: {e}"));

        let gone: Vec<String> = deleted.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let refused = w
            .journal
            .named("route_missing")
            .iter()
            .filter(|e| gone.iter().any(|id| id == e.str("plugin_id")))
            .count();
        sc.figure("plugins unregistered mid-tick", gone.len());
        sc.figure("existence checks", checks);
        sc.figure("route_missing for them (writes refused)", refused);
        sc.figure("re-created", recreated.len());
        assert!(
            recreated.is_empty(),
            "deleted routes re-created: {recreated:?}\n{}",
            w.journal.tail(30)
        );
        for id in &gone {
            assert!(
                w.route(id).await.is_none(),
                "the route of {id} exists again"
            );
        }
        let never_refused: Vec<&String> = gone
            .iter()
            .filter(|id| {
                w.journal
                    .named("route_missing")
                    .iter()
                    .all(|e| e.str("plugin_id") != id.as_str())
            })
            .collect();
        assert!(
            never_refused.is_empty(),
            "no write met the deleted routes of {never_refused:?}: the race was not exercised\n{}",
            w.journal.tail(30)
        );
        let remaining: Vec<String> = plugins[24..].to_vec();
        let statuses = w.statuses(&remaining).await;
        assert!(statuses.values().all(|s| s == "ACTIVE"), "{statuses:?}");

        for r in replicas.iter_mut() {
            assert_eq!(r.terminate(&w.journal), Some(0), "{} exit code", r.name);
        }
        w.figure_no_secrets(&mut sc);
    })
    .await;
    sc.pass();
}
