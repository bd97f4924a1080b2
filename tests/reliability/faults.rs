//! Scenarios 4 and 7: the store goes away under running replicas, and plugins answer in
//! every hostile way a status endpoint can.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use keel_test_support::sim::Behavior;

use crate::bounded;
use crate::figures::Scenario;
use crate::harness::{ms, slot_at_or_after, wait_until};
use crate::replicas::{settle_after, wait_ticking};
use crate::world::{flap_cycle, ids, Flapper, World};

const SECOND: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

// ---------------------------------------------------------------------------------------
// 4. Redis stopped for 5 s and restarted (persistence on, same port)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_ends_no_replica_and_scraping_resumes() {
    let mut sc = Scenario::start("4-redis-outage");
    bounded(Duration::from_secs(120), async {
        let mut w = World::start(true).await;
        let plugins = ids("o", 10);
        w.seed(&plugins, "ACTIVE").await;
        let flapping = plugins[5..].to_vec();
        let flapper = Flapper::start(
            &w.sim,
            &flapping,
            Duration::from_millis(1500),
            Duration::from_millis(50),
            flap_cycle(),
        );
        let mut replicas = w.spawn_replicas(&["r1", "r2", "r3"], "* * * * * *");
        let mut spare = w.spec("r4").schedule("* * * * * *").spawn(&w.journal);
        wait_ticking(&w.journal, &replicas).await;
        wait_until(
            Duration::from_secs(10),
            "three completed ticks",
            &w.journal,
            || (w.journal.count("tick_completed") >= 3).then_some(()),
        )
        .await;

        // Before: every route, with its version.
        let mut before = BTreeMap::new();
        for id in &plugins {
            let e = w
                .route(id)
                .await
                .unwrap_or_else(|| panic!("route {id} missing"));
            before.insert(id.clone(), e);
        }
        let store_errors_before = w.journal.count("store_error");
        // Down for 5 s, and back 300 ms before a tick fires: that tick must scrape.
        let down_at = Instant::now();
        let down_wall = Utc::now();
        tokio::task::block_in_place(|| w.redis.stop());
        let first_back = slot_at_or_after(
            down_wall + SECOND * 5 + chrono::TimeDelta::milliseconds(400),
            1,
        );
        // A fourth replica stopped with SIGTERM while Redis is down still exits promptly
        // and cleanly: releasing its lease fails, within bounds.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let stop_sent = Instant::now();
        let code = tokio::task::block_in_place(|| spare.terminate(&w.journal));
        assert_eq!(
            code,
            Some(0),
            "a replica stopped during the outage\n{}",
            w.journal.tail(20)
        );
        sc.figure("SIGTERM to exit during the outage", ms(stop_sent.elapsed()));
        crate::harness::sleep_until_wall(first_back - chrono::TimeDelta::milliseconds(350)).await;
        tokio::task::block_in_place(|| w.redis.restart());
        let (back_at, back_wall) = (Instant::now(), Utc::now());
        sc.figure("outage", ms(back_at.duration_since(down_at)));
        sc.figure(
            "Redis answering before the next tick",
            format!("{} ms", (first_back - back_wall).num_milliseconds()),
        );
        assert!(
            back_wall < first_back - chrono::TimeDelta::milliseconds(150),
            "Redis took too long to restart"
        );
        // The test's own connection saw the outage too: read through a fresh one.
        w.store = crate::support::binary::redis_store(&w.redis).await;

        // Nothing was lost with the restart: every route is there, at least as new.
        for id in &plugins {
            let after = w
                .route(id)
                .await
                .unwrap_or_else(|| panic!("the route of {id} was lost with the restart"));
            let old = &before[id];
            let (v_old, v_new): (u64, u64) = (
                old.etag.parse().unwrap_or_default(),
                after.etag.parse().unwrap_or_default(),
            );
            assert!(
                v_new > v_old || (v_new == v_old && after.data == old.data),
                "the route of {id} went back from version {v_old} to {v_new}"
            );
        }

        // Scraping resumes with the first tick after Redis answers again: that tick is
        // completed, and no replica fails it. (A deployment may run a single replica, so
        // every replica's store must be usable again on that tick, not just one of them.)
        let settle = first_back + SECOND * 2;
        settle_after(&w.journal, settle).await;
        let resumed = w
            .journal
            .named("tick_completed")
            .into_iter()
            .find(|e| e.tick() >= first_back)
            .unwrap_or_else(|| {
                panic!(
                    "no tick completed after Redis came back\n{}",
                    w.journal.tail(40)
                )
            });
        sc.figure(
            "recovery (Redis answering to first tick_completed)",
            ms(resumed.at.duration_since(back_at)),
        );
        let failed_after: Vec<String> = w
            .journal
            .named("tick_failed")
            .into_iter()
            .filter(|e| e.tick() >= first_back)
            .map(|e| {
                format!(
                    "{} {}: {}",
                    e.replica,
                    e.tick().format("%H:%M:%S"),
                    e.str("error")
                )
            })
            .collect();
        sc.figure(
            "replicas failing the first tick after Redis was back",
            failed_after.len(),
        );
        let store_errors = w.journal.count("store_error") - store_errors_before;
        let failed: BTreeSet<_> = w
            .journal
            .named("tick_failed")
            .iter()
            .filter(|e| e.tick() < first_back)
            .map(|e| e.tick())
            .collect();
        sc.figure("store_error events", store_errors);
        sc.figure("ticks failed during the outage", failed.len());
        for r in &replicas {
            assert!(
                !w.journal.of(&r.name, "store_error").is_empty(),
                "{} logged no store_error during the outage\n{}",
                r.name,
                w.journal.tail(30)
            );
        }
        assert_eq!(
            resumed.tick(),
            first_back,
            "the first tick after Redis was back ({first_back}) was not scraped\n{}",
            w.journal.tail(40)
        );
        assert!(
            failed_after.is_empty(),
            "ticks failed although Redis had been answering for {} ms: {failed_after:#?}",
            (first_back - back_wall).num_milliseconds()
        );

        // No replica exited; the routes settle to the truth, whole.
        for r in replicas.iter_mut() {
            assert!(
                r.is_running(),
                "{} exited during the outage\n{}",
                r.name,
                w.journal.tail(30)
            );
        }
        flapper
            .stop(&w.sim, &flapping, Behavior::v0("STOPPING"))
            .await;
        let settled = slot_at_or_after(Utc::now() + SECOND * 2, 1);
        settle_after(&w.journal, settled).await;
        let statuses = w.statuses(&plugins).await;
        for id in &plugins {
            let want = if flapping.contains(id) {
                "STOPPING"
            } else {
                "ACTIVE"
            };
            assert_eq!(statuses[id], want, "route of {id} after the outage");
        }
        let first = resumed.tick();
        let audit = w.journal.audit(first, settled, Duration::from_secs(1));
        sc.figure("ticks after recovery", audit.slots);
        sc.figure("duplicates after recovery", audit.duplicates.len());
        sc.figure("missed after recovery", audit.missed.len());
        audit.assert_exactly_once(&w.journal);

        for r in replicas.iter_mut() {
            assert_eq!(r.terminate(&w.journal), Some(0), "{} exit code", r.name);
        }
        w.figure_no_secrets(&mut sc);
    })
    .await;
    sc.pass();
}

// ---------------------------------------------------------------------------------------
// 7. Hostile plugins
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_fail_with_their_error_kind_within_bounds() {
    let mut sc = Scenario::start("7-hostile-plugins");
    bounded(Duration::from_secs(120), async {
        let w = World::start(false).await;
        const MIB: u64 = 1024 * 1024;
        let huge: Vec<String> = ids("h-huge-", 4);
        let mut hostile: Vec<(String, Behavior, &[&str])> = vec![
            ("h-slowloris".into(), Behavior::Slowloris, &["timeout"]),
            ("h-utf8".into(), Behavior::InvalidUtf8, &["bad_body"]),
            ("h-not-http".into(), Behavior::NotHttp, &["protocol"]),
            ("h-reset".into(), Behavior::Reset, &["protocol", "connect"]),
            (
                "h-redirect".into(),
                Behavior::RedirectLoop,
                &["http_status"],
            ),
        ];
        for id in &huge {
            hostile.push((id.clone(), Behavior::Huge(10 * MIB), &["too_large"]));
        }
        let good = vec!["g-v0".to_string(), "g-v1".to_string()];
        w.sim.set("g-v1", Behavior::v1("RUNNING"));
        for (id, b, _) in &hostile {
            w.sim.set(id.clone(), b.clone());
        }
        let hostile_ids: Vec<String> = hostile.iter().map(|(id, _, _)| id.clone()).collect();
        let everyone: Vec<String> = good.iter().chain(&hostile_ids).cloned().collect();
        w.create_routes(&everyone, "ACTIVE").await;
        w.set_registry(&good).await;

        let lease_ms = 4000;
        let mut replica = w
            .spec("r1")
            .schedule("*/4 * * * * *")
            .args(&["--probe-timeout", "1s", "--retries", "1"])
            .spawn(&w.journal);
        let base = wait_until(
            Duration::from_secs(15),
            "a tick with only good plugins",
            &w.journal,
            || w.journal.named("tick_completed").first().cloned(),
        )
        .await;
        let baseline = replica
            .vm_hwm_kib()
            .unwrap_or_else(|| panic!("no VmHWM for the worker"));

        // Now every hostile plugin is registered, for four ticks.
        w.set_registry(&everyone).await;
        let hostile_from = base.tick() + SECOND * 4;
        let hostile_to = hostile_from + SECOND * 12;
        settle_after(&w.journal, hostile_to).await;
        let peak = replica
            .vm_hwm_kib()
            .unwrap_or_else(|| panic!("no VmHWM for the worker"));

        let ticks: Vec<_> = w
            .journal
            .named("tick_completed")
            .into_iter()
            .filter(|e| e.tick() >= hostile_from && e.tick() <= hostile_to)
            .collect();
        assert_eq!(
            ticks.len(),
            4,
            "ticks with hostile plugins\n{}",
            w.journal.tail(40)
        );
        let longest = ticks
            .iter()
            .map(|e| e.u64("duration_ms"))
            .max()
            .unwrap_or_default();
        sc.figure("ticks with hostile plugins", ticks.len());
        sc.figure(
            "longest tick",
            format!("{longest} ms (deadline {lease_ms} ms)"),
        );
        for t in &ticks {
            assert!(
                t.u64("duration_ms") < lease_ms,
                "a tick overran its lease: {}",
                t.value
            );
            assert_eq!(t.u64("probe_failed"), hostile.len() as u64, "{}", t.value);
        }
        assert_eq!(w.journal.count("tick_failed"), 0, "{}", w.journal.tail(30));
        assert_eq!(
            w.journal.count("probes_cut_off"),
            0,
            "{}",
            w.journal.tail(30)
        );

        let mut kinds_seen = Vec::new();
        for (id, _, kinds) in &hostile {
            let failures = w.journal.named("plugin_probe_failed");
            let mine: Vec<_> = failures
                .iter()
                .filter(|e| e.str("plugin_id") == id)
                .collect();
            assert!(
                mine.len() >= 4,
                "{id} failed {} times in 4 ticks",
                mine.len()
            );
            for e in &mine {
                assert!(
                    kinds.contains(&e.str("error_kind")),
                    "{id}: error_kind {} (expected {kinds:?}): {}",
                    e.str("error_kind"),
                    e.value
                );
            }
            kinds_seen.push(format!("{id}={}", mine[0].str("error_kind")));
            if id == "h-redirect" {
                assert!(
                    mine.iter().all(|e| e.u64("http_status") == 302),
                    "{}",
                    mine[0].value
                );
            }
        }
        sc.figure("error kinds", kinds_seen.join(" "));
        // Redirects are not followed: one request per attempt at most.
        let redirect_requests = w.sim.requests("h-redirect");
        let ticks_run = w
            .journal
            .named("lock_acquired")
            .iter()
            .filter(|e| e.tick() >= hostile_from)
            .count() as u64;
        sc.figure(
            "requests to the redirect loop",
            format!("{redirect_requests} in {ticks_run} ticks"),
        );
        assert!(
            redirect_requests <= 2 * ticks_run,
            "the redirect loop got {redirect_requests} requests in {ticks_run} ticks (2 attempts \
             each at most): redirects were followed"
        );

        let statuses = w.statuses(&everyone).await;
        for id in &hostile_ids {
            assert_eq!(statuses[id], "FAILED", "route of {id}");
        }
        for id in &good {
            assert_eq!(statuses[id], "ACTIVE", "route of {id}");
        }

        // 40 MiB offered per tick, 160 MiB over the run: the worker's peak stays put.
        let growth = peak.saturating_sub(baseline);
        sc.figure(
            "worker VmHWM",
            format!(
                "{} KiB before, {} KiB after (+{} KiB; hostile bodies offered {} MiB)",
                baseline,
                peak,
                growth,
                4 * 10 * ticks.len()
            ),
        );
        assert!(
            growth < 16 * 1024,
            "the worker's peak memory grew by {growth} KiB with hostile plugins"
        );

        assert_eq!(replica.terminate(&w.journal), Some(0));
        w.figure_no_secrets(&mut sc);
    })
    .await;
    sc.pass();
}
