//! Scenarios 1, 2, 3 and 8: several replicas share the schedule; each tick is completed by
//! exactly one of them, through crashes (SIGKILL), graceful stops (SIGTERM) and skewed
//! wall clocks, on the `redis` backend and (1d) through the Dapr sidecar double.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use keel_test_support::sim::Behavior;
use serde_json::Value;

use crate::figures::Scenario;
use crate::harness::{
    ms, sleep_until_wall, slot_at_or_after, wait_first_fired, wait_more_ticks, wait_until, Journal,
    Replica, Spec, TickAudit, DAPR_TOKEN,
};
use crate::support::sidecar::{SidecarConfig, SidecarDouble};
use crate::world::{escaping_ids, ids, route_json, Flapper, World, LOCK_REDIS_KEY};

const SECOND: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// Waits until every replica has said something about a tick (it is scheduling).
pub async fn wait_ticking(journal: &Journal, replicas: &[Replica]) {
    let names: Vec<String> = replicas.iter().map(|r| r.name.clone()).collect();
    wait_until(
        Duration::from_secs(30),
        "every replica to take part in a tick",
        journal,
        || {
            let events = journal.events();
            names
                .iter()
                .all(|n| {
                    events.iter().any(|e| {
                        &e.replica == n
                            && matches!(e.name(), "tick_completed" | "tick_skipped" | "tick_failed")
                    })
                })
                .then_some(())
        },
    )
    .await;
}

/// Waits until tick `last` is completed, or until it is clearly not going to be (a few
/// seconds after its slot): the audit then reports it missed instead of a timeout.
pub async fn settle_after(journal: &Journal, last: DateTime<Utc>) {
    sleep_until_wall(last).await;
    let give_up = last + chrono::TimeDelta::seconds(4);
    wait_until(
        Duration::from_secs(15),
        "the last tick to settle",
        journal,
        || {
            (journal.completions().range(last..).next().is_some() || Utc::now() > give_up)
                .then_some(())
        },
    )
    .await;
}

/// Scenario 1's world: `n` plugins named `prefix`... and the ids built to escape the
/// status URL, every one registered with an ACTIVE route.
async fn world_with_escaping_ids(prefix: &str, n: usize) -> (World, Vec<String>, Vec<String>) {
    let w = World::start(false).await;
    let valid = ids(prefix, n);
    let escaping = escaping_ids();
    w.create_routes(&valid, "ACTIVE").await;
    w.create_routes(&escaping, "ACTIVE").await;
    let registry: Vec<String> = valid.iter().chain(&escaping).cloned().collect();
    w.set_registry(&registry).await;
    (w, valid, escaping)
}

/// The route of `id`, which must still exist.
async fn existing_route(w: &World, id: &str) -> keel_scraper::store::Entry {
    w.route(id)
        .await
        .unwrap_or_else(|| panic!("route {id:?} is gone"))
}

/// Once every replica ticks, audits the next `ticks` slots of a 1 s schedule: the first
/// and last slot, and who completed each.
async fn audit_next_ticks(
    journal: &Journal,
    replicas: &[Replica],
    ticks: i32,
) -> (DateTime<Utc>, DateTime<Utc>, TickAudit) {
    wait_ticking(journal, replicas).await;
    let first = slot_at_or_after(Utc::now() + SECOND, 1);
    let last = first + SECOND * (ticks - 1);
    settle_after(journal, last).await;
    (
        first,
        last,
        journal.audit(first, last, Duration::from_secs(1)),
    )
}

/// The replica that completed the latest two consecutive ticks, and the latest of them.
fn steady_holder(journal: &Journal, step: chrono::TimeDelta) -> Option<(String, DateTime<Utc>)> {
    let done = journal.completions();
    done.iter().rev().find_map(|(t, by)| match by.as_slice() {
        [one]
            if done
                .get(&(*t - step))
                .is_some_and(|prev| prev.as_slice() == [one.clone()]) =>
        {
            Some((one.clone(), *t))
        }
        _ => None,
    })
}

/// Waits until every replica ticks and one of them has completed two consecutive ticks
/// `step` apart (within `bound`); returns the later of them.
async fn wait_steady(
    journal: &Journal,
    replicas: &[Replica],
    step: chrono::TimeDelta,
    bound: Duration,
) -> DateTime<Utc> {
    wait_ticking(journal, replicas).await;
    let (_, latest) = wait_until(
        bound,
        "a holder completing two ticks in a row",
        journal,
        || steady_holder(journal, step),
    )
    .await;
    latest
}

/// A predicate that matches `event` on whichever replica sees it first, and then never
/// again on any replica sharing `once`.
fn first_of(once: &Arc<AtomicBool>, event: &'static str) -> impl Fn(&Value) -> bool + Send {
    let once = Arc::clone(once);
    move |v: &Value| v["event"] == event && !once.swap(true, Ordering::SeqCst)
}

fn index_of(replicas: &[Replica], name: &str) -> usize {
    replicas
        .iter()
        .position(|r| r.name == name)
        .unwrap_or_else(|| panic!("no replica named {name}"))
}

/// A world whose `n` plugins, named `prefix`..., have ACTIVE routes and answer ACTIVE
/// (after `answer_after`, when given).
async fn seeded_world(
    prefix: &str,
    n: usize,
    answer_after: Option<Duration>,
) -> (World, Vec<String>) {
    let w = World::start(false).await;
    let plugins = ids(prefix, n);
    w.seed(&plugins, "ACTIVE").await;
    if let Some(delay) = answer_after {
        w.sim
            .set_default(Behavior::delay(delay, Behavior::v0("ACTIVE")));
    }
    (w, plugins)
}

/// The end of every scenario: [`stop_all`], then the secrets figure.
fn finish(replicas: &mut [Replica], w: &World, sc: &mut Scenario) {
    stop_all(replicas, &w.journal);
    w.figure_no_secrets(sc);
}

/// Stops every replica with SIGTERM and checks each exits 0 and printed only JSON events.
fn stop_all(replicas: &mut [Replica], journal: &Journal) {
    for r in replicas.iter_mut() {
        if r.is_running() {
            let code = r.terminate(journal);
            assert_eq!(
                code,
                Some(0),
                "replica {} exit code\n{}",
                r.name,
                journal.tail(20)
            );
        }
    }
    assert!(
        journal.non_json().is_empty(),
        "stdout lines that are not JSON events: {:?}",
        journal.non_json()
    );
}

// ---------------------------------------------------------------------------------------
// 1. Three replicas, a 1 s schedule, 30 ticks
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_complete_every_tick_exactly_once() {
    Scenario::run("1-three-replicas-redis", 150, async |sc| {
        let (w, valid, escaping) = world_with_escaping_ids("p", 8).await;
        w.sim.record_requests(true);
        let flapping = &valid[4..];
        let flapper = Flapper::start(
            &w.sim,
            flapping,
            Duration::from_millis(2500),
            Duration::ZERO,
            vec![
                Behavior::v0("ACTIVE"),
                Behavior::v0("STOPPED"),
                Behavior::v1("WAIT_RUNNING"),
            ],
        );

        let mut replicas = w.spawn_replicas(&["r1", "r2", "r3"], "* * * * * *");
        let (first, last, audit) = audit_next_ticks(&w.journal, &replicas, 30).await;
        audit.figures(sc);
        sc.figure("lock_lost events", w.journal.count("lock_lost"));
        sc.figure("tick_failed events", w.journal.count("tick_failed"));
        // How late after its slot each tick took the lock (the scheduler's firing delay).
        let mut late: Vec<i64> = w
            .journal
            .named("lock_acquired")
            .iter()
            .filter(|e| e.tick() >= first && e.tick() <= last)
            .filter_map(|e| e.timestamp().map(|t| (t - e.tick()).num_milliseconds()))
            .collect();
        late.sort_unstable();
        if let (Some(min), Some(max)) = (late.first(), late.last()) {
            sc.figure(
                "lock taken after the slot (min/median/max)",
                format!("{min}/{}/{max} ms", late[late.len() / 2]),
            );
        }
        audit.assert_exactly_once(&w.journal);
        assert_eq!(audit.slots, 30);

        // Security: no id built to escape the URL was requested, each was logged, and the
        // Dapr token never went to a plugin.
        let targets: HashSet<String> = valid.iter().map(|id| format!("/{id}/v1/status")).collect();
        let recorded = w.sim.recorded();
        let escaped: Vec<&str> = recorded
            .iter()
            .map(|r| r.target.as_str())
            .filter(|t| !targets.contains(*t))
            .collect();
        sc.figure("status requests", recorded.len());
        sc.figure("escaping ids requested", escaped.len());
        assert!(
            escaped.is_empty(),
            "requests outside the registered ids: {escaped:?}"
        );
        assert!(
            recorded
                .iter()
                .all(|r| r.header("dapr-api-token").is_none()),
            "the Dapr API token was sent to a plugin"
        );
        let logged: HashSet<String> = w
            .journal
            .named("invalid_plugin_id")
            .iter()
            .map(|e| e.str("plugin_id").to_owned())
            .collect();
        assert_eq!(
            logged.len(),
            escaping.len(),
            "each escaping id is logged as invalid_plugin_id: {logged:?}"
        );
        for id in &escaping {
            let route = existing_route(&w, id).await;
            assert_eq!(
                (route.etag.as_str(), route.data.as_slice()),
                ("1", route_json(id, "ACTIVE").as_bytes()),
                "the route of the invalid id {id:?} was written"
            );
        }

        // Routes end consistent and true.
        flapper
            .stop(&w.sim, flapping, Behavior::v0("STOPPED"))
            .await;
        let settled = slot_at_or_after(Utc::now() + SECOND * 2, 1);
        settle_after(&w.journal, settled).await;
        let statuses = w.statuses(&valid).await;
        for id in &valid {
            let want = if flapping.contains(id) {
                "STOPPED"
            } else {
                "ACTIVE"
            };
            assert_eq!(statuses[id], want, "route of {id}");
        }
        finish(&mut replicas, &w, sc);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 1d. The same through the Dapr sidecar double (state and service invocation)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dapr_replicas_complete_every_tick_exactly_once() {
    Scenario::run("1d-three-replicas-dapr", 120, async |sc| {
        let (w, valid, escaping) = world_with_escaping_ids("d", 6).await;
        w.sim.set(valid[0].clone(), Behavior::v0("STOPPED"));
        w.sim.set(valid[1].clone(), Behavior::v1("WAIT_RUNNING"));

        // The sidecar records every app id it is asked to invoke.
        let invoked: Arc<Mutex<Vec<String>>> = Arc::default();
        let origin = w.sim.origin();
        let record = Arc::clone(&invoked);
        let sidecar = SidecarDouble::start(
            SidecarConfig::default()
                .with_token(DAPR_TOKEN)
                .with_redis_url(&w.redis.url())
                .with_invoke_target(move |app_id, method| {
                    record
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(app_id.to_owned());
                    Some(format!("{origin}/{app_id}/{method}"))
                }),
        )
        .await;

        let mut replicas: Vec<Replica> = ["d1", "d2", "d3"]
            .iter()
            .map(|n| {
                Spec::run(n)
                    .dapr(&sidecar.grpc_endpoint(), &sidecar.http_endpoint())
                    .schedule("* * * * * *")
                    .spawn(&w.journal)
            })
            .collect();
        let (_, _, audit) = audit_next_ticks(&w.journal, &replicas, 15).await;
        audit.figures(sc);
        sc.figure("lock_lost events", w.journal.count("lock_lost"));
        audit.assert_exactly_once(&w.journal);

        let invoked = invoked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let outside: Vec<&String> = invoked.iter().filter(|id| !valid.contains(id)).collect();
        sc.figure("invocations", invoked.len());
        sc.figure("escaping ids invoked", outside.len());
        sc.figure(
            "sidecar requests outside /v1.0/invoke",
            sidecar.calls("not_found"),
        );
        sc.figure(
            "sidecar requests refused for the token",
            sidecar.calls("unauthorized"),
        );
        assert!(
            outside.is_empty(),
            "app ids invoked outside the registry: {outside:?}"
        );
        assert_eq!(
            sidecar.calls("not_found"),
            0,
            "a status URL escaped /v1.0/invoke/<id>"
        );
        assert_eq!(
            sidecar.calls("unauthorized"),
            0,
            "a call went without the token"
        );
        assert!(sidecar.saw_token());
        for id in &escaping {
            let route = existing_route(&w, id).await;
            assert_eq!(
                route.etag, "1",
                "the route of the invalid id {id:?} was written"
            );
        }
        let statuses = w.statuses(&valid).await;
        assert_eq!(statuses[&valid[0]], "STOPPED");
        assert_eq!(statuses[&valid[1]], "STARTING");
        assert_eq!(statuses[&valid[2]], "ACTIVE");

        finish(&mut replicas, &w, sc);
        drop(sidecar);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. SIGKILL the lock holder in the middle of a tick
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_mid_tick_is_taken_over_after_its_lease() {
    Scenario::run("2-sigkill-holder", 120, async |sc| {
        let probe_delay = Duration::from_millis(300);
        let (w, plugins) = seeded_world("k", 120, Some(probe_delay)).await;
        let step = chrono::TimeDelta::seconds(2);
        let mut replicas = w.spawn_replicas(&["r1", "r2", "r3"], "*/2 * * * * *");
        let steady = wait_steady(&w.journal, &replicas, step, Duration::from_secs(30)).await;

        // Every plugin now stops: the next tick writes all 120 routes. Whoever writes the
        // first of them is killed on the spot, in the middle of its write phase.
        w.sim
            .set_default(Behavior::delay(probe_delay, Behavior::v0("STOPPED")));
        let once = Arc::new(AtomicBool::new(false));
        let fired: Vec<_> = replicas
            .iter()
            .map(|r| r.signal_on(libc::SIGKILL, first_of(&once, "plugin_status_changed")))
            .collect();
        let (victim, killed_at, _) = wait_first_fired(
            &w.journal,
            &fired,
            "the holder's first route write after the plugins stopped",
        )
        .await;
        let victim_name = replicas[victim].name.clone();
        let exited =
            tokio::task::block_in_place(|| replicas[victim].wait_exit(Duration::from_secs(5)));
        assert!(exited.is_some(), "the killed replica did not die");
        let killed_tick = w
            .journal
            .of(&victim_name, "lock_acquired")
            .last()
            .map(|e| e.tick())
            .unwrap_or_else(|| panic!("the victim never acquired the lock"));
        assert!(killed_tick > steady);

        // Right after the crash: every route is whole, either its old or its new status.
        let snapshot = w.statuses(&plugins).await;
        let written = snapshot.values().filter(|s| *s == "STOPPED").count();
        let stray: Vec<_> = snapshot
            .iter()
            .filter(|(_, s)| *s != "STOPPED" && *s != "ACTIVE")
            .collect();
        assert!(
            stray.is_empty(),
            "routes neither old nor new after the crash: {stray:?}"
        );
        sc.figure(
            "routes written by the killed tick before it died",
            format!("{written}/{}", plugins.len()),
        );

        // The victim's lease ends by its TTL: read how long it has left.
        let (record, left): (Option<Vec<u8>>, i64) = tokio::task::block_in_place(|| {
            let mut conn = w.redis.conn();
            redis::pipe()
                .cmd("HGET")
                .arg(LOCK_REDIS_KEY)
                .arg("data")
                .cmd("PTTL")
                .arg(LOCK_REDIS_KEY)
                .query(&mut conn)
                .unwrap_or_else(|e| panic!("read the lock: {e}"))
        });
        let record: Value = serde_json::from_slice(&record.unwrap_or_default())
            .unwrap_or_else(|e| panic!("the lock record is not JSON: {e}"));
        assert_eq!(
            record["holder"],
            victim_name.as_str(),
            "the lock after the kill: {record}"
        );
        assert!(left > 0, "the victim's lease has no TTL ({left})");
        let expired = Utc::now() + chrono::TimeDelta::milliseconds(left);
        let expired_at = Instant::now() + Duration::from_millis(left.unsigned_abs());
        let takeover = wait_until(
            Duration::from_secs(10),
            "another replica to complete a tick",
            &w.journal,
            || {
                w.journal
                    .named("tick_completed")
                    .into_iter()
                    .find(|e| e.replica != victim_name && e.tick() > killed_tick)
            },
        )
        .await;
        let acquired = w
            .journal
            .named("lock_acquired")
            .into_iter()
            .find(|e| e.replica != victim_name && e.tick() > killed_tick)
            .unwrap_or_else(|| panic!("no lock_acquired for the take-over"));
        let first_after_expiry = slot_at_or_after(expired, 2);
        let taken_at = acquired
            .timestamp()
            .unwrap_or_else(|| panic!("lock_acquired without timestamp"));
        assert!(
            taken_at >= expired - chrono::TimeDelta::milliseconds(20),
            "{} took the lease at {taken_at} while the victim's ran to {expired}",
            acquired.replica
        );
        let done = w.journal.completions();
        let mut missed = 0;
        let mut slot = killed_tick;
        while slot < takeover.tick() {
            missed += usize::from(!done.contains_key(&slot));
            slot += step;
        }
        sc.figure("killed tick", killed_tick.format("%H:%M:%S"));
        sc.figure(
            "victim's lease ran out after the kill",
            format!(
                "{} (lease 2000 ms)",
                ms(expired_at.duration_since(killed_at))
            ),
        );
        sc.figure(
            "take-over delay (kill to another replica's lock_acquired)",
            ms(acquired.at.duration_since(killed_at)),
        );
        sc.figure("ticks missed (killed tick included)", missed);
        assert!(
            takeover.tick() <= first_after_expiry,
            "the first tick after the lease expired ({first_after_expiry}) was not scraped; \
             the next scrape was {}\n{}",
            takeover.tick(),
            w.journal.tail(40)
        );

        // The new holder finishes the job: every route STOPPED, none twice, none torn.
        let settled = slot_at_or_after(Utc::now(), 2) + step;
        settle_after(&w.journal, settled).await;
        let after = w.statuses(&plugins).await;
        let active: Vec<_> = after.iter().filter(|(_, s)| *s != "STOPPED").collect();
        assert!(
            active.is_empty(),
            "routes not rewritten after the take-over: {active:?}"
        );
        let done = w.journal.completions();
        let duplicates: Vec<_> = done.iter().filter(|(_, by)| by.len() > 1).collect();
        sc.figure("duplicates", duplicates.len());
        assert!(
            duplicates.is_empty(),
            "ticks completed twice: {duplicates:?}"
        );
        assert!(
            !done.contains_key(&killed_tick) || done[&killed_tick] == [victim_name.clone()],
            "the killed tick was scraped again"
        );

        finish(&mut replicas, &w, sc);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2p, 2n. The lock holder cut off in the middle of its writes, past its lease
// ---------------------------------------------------------------------------------------

/// How scenarios 2p and 2n cut the holder off in the middle of its writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CutOff {
    /// SIGSTOP, then SIGCONT (a stalled VM, CPU starvation).
    Pause,
    /// Its connection to Redis stalls, then heals (a partition).
    Network,
}

/// A holder cut off past its lease (`cut`) must not write anything decided from its stale
/// tick once it is back: by then another replica holds the lease and has observed newer
/// answers. Two replicas on a 2 s schedule over 120 plugins named `prefix`...
async fn a_holder_cut_off_mid_write_lands_nothing_stale(
    sc: &mut Scenario,
    prefix: &str,
    cut: CutOff,
) {
    let delay = Duration::from_millis(300);
    let (w, plugins) = seeded_world(prefix, 120, Some(delay)).await;
    let failing = || Behavior::delay(delay, Behavior::raw(500, r#"{"ret":-1,"msg":"down"}"#));
    let step = chrono::TimeDelta::seconds(2);
    let mut proxies = Vec::new();
    let mut replicas = Vec::new();
    for name in ["r1", "r2"] {
        let spec = match cut {
            CutOff::Pause => w.spec(name),
            CutOff::Network => {
                let proxy = crate::world::StallProxy::start(w.redis.port()).await;
                let spec = Spec::run(name)
                    .redis(&proxy.url(), &w.sim.url_template())
                    // Every plugin fails on purpose: the fleet guard is not under test.
                    .env("SCRAPER_MAX_FAILED_SHARE", "1");
                proxies.push(proxy);
                spec
            }
        };
        replicas.push(spec.schedule("*/2 * * * * *").spawn(&w.journal));
    }
    wait_steady(&w.journal, &replicas, step, Duration::from_secs(30)).await;

    // Every plugin fails until every route is FAILED.
    w.sim.set_default(failing());
    w.wait_all_failed(&plugins).await;

    // They all answer ACTIVE: the next tick writes 120 routes back to ACTIVE. Its holder
    // is cut off right after its first write; the plugins fail again at once.
    let once = Arc::new(AtomicBool::new(false));
    let armed = w.journal.events().len();
    w.sim
        .set_default(Behavior::delay(delay, Behavior::v0("ACTIVE")));
    let first_write = || first_of(&once, "plugin_status_changed");
    let fired: Vec<_> = match cut {
        CutOff::Pause => replicas
            .iter()
            .map(|r| r.signal_on(libc::SIGSTOP, first_write()))
            .collect(),
        CutOff::Network => replicas
            .iter()
            .zip(&proxies)
            .map(|(r, p)| {
                let switch = p.switch();
                r.on_event(first_write(), move |_| {
                    let _ = switch.send(true);
                })
            })
            .collect(),
    };
    let (victim, cut_at, _) = wait_first_fired(
        &w.journal,
        &fired,
        "the holder's first write back to ACTIVE",
    )
    .await;
    w.sim.set_default(failing());
    let victim_name = replicas[victim].name.clone();
    let written_before = w.journal.events()[armed..]
        .iter()
        .filter(|e| e.replica == victim_name && e.name() == "plugin_status_changed")
        .count();

    // The other replica takes over after the lease and sees two failing ticks: every
    // route is FAILED again.
    let other = replicas[1 - victim].name.clone();
    wait_more_ticks(&w.journal, &other, 2, "two ticks by the other replica").await;
    w.assert_none_passing(&plugins).await;

    // The old holder comes back. Nothing it decided before it was cut off may land now.
    let back_at = Instant::now();
    let seq_at_back = w.journal.events().len();
    match cut {
        CutOff::Pause => replicas[victim].signal(libc::SIGCONT),
        CutOff::Network => {
            let _ = proxies[victim].switch().send(false);
        }
    }
    let stale = w
        .watch_stale(&plugins, back_at, Duration::from_millis(1500))
        .await;
    match cut {
        CutOff::Pause => {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for e in &w.journal.events()[seq_at_back..] {
                if e.replica == victim_name {
                    *counts.entry(e.name().to_owned()).or_default() += 1;
                }
            }
            sc.figure("paused for", ms(back_at.duration_since(cut_at)));
            sc.figure(
                "routes the holder wrote before the pause",
                format!("{written_before}/{}", plugins.len()),
            );
            sc.figure("stale routes after it resumed", stale.len());
            sc.figure(
                "its events after resuming",
                counts
                    .iter()
                    .map(|(n, c)| format!("{n}:{c}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        CutOff::Network => {
            sc.figure("stalled for", ms(back_at.duration_since(cut_at)));
            sc.figure("stale routes after the network healed", stale.len());
            sc.figure(
                "its store errors while cut off",
                w.journal.of(&victim_name, "store_error").len(),
            );
        }
    }
    assert!(
        stale.is_empty(),
        "once back, the holder cut off before its lease ran out ({}) wrote routes decided \
         before, against {} newer failing ticks: {} routes turned passing again, e.g. {:?}\n{}",
        if cut == CutOff::Pause {
            "paused"
        } else {
            "its connection stalled"
        },
        2,
        stale.len(),
        stale.iter().take(5).collect::<Vec<_>>(),
        w.journal.tail(20)
    );

    finish(&mut replicas, &w, sc);
}

/// A holder paused past its lease (SIGSTOP) writes nothing stale once it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_lease_writes_nothing_stale() {
    Scenario::run("2p-sigstop-holder", 120, async |sc| {
        a_holder_cut_off_mid_write_lands_nothing_stale(sc, "z", CutOff::Pause).await
    })
    .await;
}

/// The same through the network: the holder's connection to Redis stalls in the middle of
/// its writes (a partition that heals later), its lease runs out, another replica takes
/// over and sees newer answers; when the connection comes back, the writes it had sent
/// must not land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_from_redis_mid_write_lands_nothing_stale() {
    Scenario::run("2n-network-stall-holder", 120, async |sc| {
        a_holder_cut_off_mid_write_lands_nothing_stale(sc, "n", CutOff::Network).await
    })
    .await;
}

/// Waits for the next tick completed after `after`, lets the holder idle a moment (the
/// middle of the interval), then stops it with SIGTERM. Checks it exits 0 having released
/// the lease. Returns the holder's name, its last tick and when the signal was sent.
async fn sigterm_holder_between_ticks(
    replicas: &mut [Replica],
    journal: &Journal,
    after: DateTime<Utc>,
) -> (String, DateTime<Utc>, Instant) {
    let last = wait_until(
        Duration::from_secs(10),
        "the holder's next tick",
        journal,
        || {
            journal
                .named("tick_completed")
                .into_iter()
                .find(|e| e.tick() > after)
        },
    )
    .await;
    // The scheduler may fire the next tick as little as 0.5 s after this one (it polls
    // twice a second): stop the holder right away, well inside the interval.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let i = index_of(replicas, &last.replica);
    let sent = Instant::now();
    replicas[i].signal(libc::SIGTERM);
    let status = tokio::task::block_in_place(|| replicas[i].wait_exit(crate::harness::EXIT_BOUND));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{} did not exit 0 after SIGTERM\n{}",
        last.replica,
        journal.tail(20)
    );
    assert!(
        !journal.of(&last.replica, "lock_released").is_empty(),
        "{} stopped without releasing its lease",
        last.replica
    );
    (last.replica.clone(), last.tick(), sent)
}

/// The tick `slot`, once completed: (replica, its lock_acquired event's arrival).
async fn completed(journal: &Journal, slot: DateTime<Utc>) -> (String, Instant) {
    let by = wait_until(
        Duration::from_secs(10),
        &format!("tick {slot} to be completed"),
        journal,
        || {
            journal
                .completions()
                .get(&slot)
                .and_then(|by| by.first().cloned())
        },
    )
    .await;
    let acquired = journal
        .of(&by, "lock_acquired")
        .into_iter()
        .find(|e| e.tick() == slot)
        .unwrap_or_else(|| panic!("{by} completed {slot} without lock_acquired"));
    (by, acquired.at)
}

// ---------------------------------------------------------------------------------------
// 3. SIGTERM the lock holder
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stopped_with_sigterm_hands_the_next_tick_over() {
    Scenario::run("3-sigterm-holder", 120, async |sc| {
        let (w, plugins) = seeded_world("t", 10, Some(Duration::from_millis(300))).await;
        let mut replicas = w.spawn_replicas(&["r1", "r2", "r3"], "* * * * * *");
        let start = wait_steady(&w.journal, &replicas, SECOND, Duration::from_secs(20)).await;

        // Between ticks: the holder releases; the next tick is another replica's.
        let (first, last, sent) =
            sigterm_holder_between_ticks(&mut replicas, &w.journal, start).await;
        let (by, at) = completed(&w.journal, last + SECOND).await;
        assert_ne!(by, first, "the stopped replica scraped after SIGTERM");
        sc.figure(
            "hand-over 1 (SIGTERM between ticks to next lock_acquired)",
            ms(at.duration_since(sent)),
        );

        // In the middle of a tick: the holder finishes it, releases, and the next tick is
        // another replica's.
        let once = Arc::new(AtomicBool::new(false));
        let fired: Vec<_> = replicas
            .iter()
            .map(|r| r.signal_on(libc::SIGTERM, first_of(&once, "lock_acquired")))
            .collect();
        let (i, sent, event) = wait_first_fired(&w.journal, &fired, "the next lock_acquired").await;
        let second = replicas[i].name.clone();
        let its_tick = crate::harness::parse_time(event["tick"].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("lock_acquired without tick: {event}"));
        let status =
            tokio::task::block_in_place(|| replicas[i].wait_exit(crate::harness::EXIT_BOUND));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{second} exit\n{}",
            w.journal.tail(20)
        );
        assert!(
            w.journal
                .of(&second, "tick_completed")
                .iter()
                .any(|e| e.tick() == its_tick),
            "{second} did not finish the tick it was stopped in"
        );
        let shutdown = w.journal.of(&second, "shutdown_completed");
        assert_eq!(
            shutdown.first().map(|e| e.value["tick_cancelled"].clone()),
            Some(Value::Bool(false))
        );
        assert!(!w.journal.of(&second, "lock_released").is_empty());
        let (by, at) = completed(&w.journal, its_tick + SECOND).await;
        assert!(
            by != first && by != second,
            "tick after the second stop scraped by {by}"
        );
        sc.figure(
            "hand-over 2 (SIGTERM mid-tick to next lock_acquired)",
            ms(at.duration_since(sent)),
        );

        let end = its_tick + SECOND * 4;
        settle_after(&w.journal, end).await;
        let audit = w.journal.audit(start, end, Duration::from_secs(1));
        audit.figures(sc);
        audit.assert_exactly_once(&w.journal);
        w.statuses(&plugins).await;

        finish(&mut replicas, &w, sc);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 8. Clock skew, from outside the worker
// ---------------------------------------------------------------------------------------

/// Fails, with what to do, when Debian's `faketime` is not installed.
fn require_faketime() {
    let found = std::process::Command::new("faketime")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "scenario 8 skews replica clocks with Debian's `faketime`, which is not installed: \
         run the README's test command (it installs it), or `apt-get install faketime`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_skewed_clocks_still_scrape_each_tick_once() {
    require_faketime();
    Scenario::run("8-clock-skew", 150, async |sc| {
        let (w, _) = seeded_world("c", 10, Some(Duration::from_millis(100))).await;
        // Clocks 0, +0.3 s and +0.6 s: a third of the 2 s interval apart at most.
        let skews: [(&str, &str, i64); 3] =
            [("c0", "+0.0", 0), ("c3", "+0.3", 300), ("c6", "+0.6", 600)];
        let mut replicas: Vec<Replica> = skews
            .iter()
            .map(|(n, offset, _)| {
                w.spec(n)
                    .schedule("*/2 * * * * *")
                    .faketime(offset)
                    .spawn(&w.journal)
            })
            .collect();
        wait_ticking(&w.journal, &replicas).await;

        let step = chrono::TimeDelta::seconds(2);
        let start = slot_at_or_after(Utc::now() + step, 2);
        settle_after(&w.journal, start + step * 4).await;
        let (_, last, _) =
            sigterm_holder_between_ticks(&mut replicas, &w.journal, start + step * 3).await;
        settle_after(&w.journal, last + step * 5).await;
        let (_, last, _) =
            sigterm_holder_between_ticks(&mut replicas, &w.journal, last + step * 4).await;
        let end = last + step * 4;
        settle_after(&w.journal, end).await;

        // The skew is real: each replica's own timestamps lead the test's clock by its offset.
        let events = w.journal.events();
        let mut measured = BTreeMap::new();
        for (name, _, want_ms) in skews {
            let lead = events
                .iter()
                .filter(|e| e.replica == name)
                .filter_map(|e| e.timestamp().map(|t| (t - e.wall).num_milliseconds()))
                .max()
                .unwrap_or_else(|| panic!("{name} printed no event"));
            assert!(
                (lead - want_ms).abs() <= 150,
                "faketime did not skew {name}'s clock by {want_ms} ms (measured {lead} ms)"
            );
            measured.insert(name, lead);
        }
        sc.figure(
            "measured clock lead (c0 c3 c6)",
            measured
                .values()
                .map(|v| format!("{v} ms"))
                .collect::<Vec<_>>()
                .join(" "),
        );

        let audit = w.journal.audit(start, end, Duration::from_secs(2));
        audit.figures(sc);
        sc.figure(
            "already_scraped skips",
            w.journal
                .named("tick_skipped")
                .iter()
                .filter(|e| e.str("reason") == "already_scraped")
                .count(),
        );
        audit.assert_exactly_once(&w.journal);
        assert!(
            audit.by_replica.len() >= 3,
            "the ticks did not move between all three clocks: {}",
            audit.holders()
        );

        finish(&mut replicas, &w, sc);
    })
    .await;
}

/// The same promise with a `--lease` shorter than the interval (the option allows any
/// lease of at least 1 s): a replica whose clock is a quarter of the interval behind must
/// still find the tick it fires for already scraped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lease_still_scrapes_each_tick_once_under_skew() {
    require_faketime();
    Scenario::run("8b-clock-skew-short-lease", 90, async |sc| {
        let (w, _) = seeded_world("b", 4, None).await;
        // A 6 s schedule, a 1 s lease; b15's clock is 1.5 s behind (a quarter of 6 s).
        let mut replicas: Vec<Replica> = [("b0", "+0.0"), ("b15", "-1.5")]
            .iter()
            .map(|(n, offset)| {
                w.spec(n)
                    .schedule("*/6 * * * * *")
                    .args(&["--lease", "1s"])
                    .faketime(offset)
                    .spawn(&w.journal)
            })
            .collect();
        wait_ticking(&w.journal, &replicas).await;
        let step = chrono::TimeDelta::seconds(6);
        let start = slot_at_or_after(Utc::now() + chrono::TimeDelta::seconds(1), 6);
        let end = start + step * 2;
        settle_after(&w.journal, end + chrono::TimeDelta::seconds(2)).await;

        let audit = w.journal.audit(start, end, Duration::from_secs(6));
        audit.figures(sc);
        audit.assert_exactly_once(&w.journal);

        finish(&mut replicas, &w, sc);
    })
    .await;
}
