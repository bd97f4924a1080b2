//! What a tick writes to the routes, against a real `redis-server` and real plugin
//! simulators: only changed routes, every other field kept byte for byte, v0 and v1
//! mapped, missing and malformed routes left alone, CAS conflicts re-decided on the fresh
//! value, deleted routes never re-created, the thresholds end to end (counters shared by
//! replicas through the private store), the probe deadline, and probes under way before
//! a route read that holds the thread.

mod support;

use std::time::{Duration, Instant};

use chrono::Utc;
use keel_scraper::lease::TickKind;
use keel_scraper::store::{Save, StoreKind};
use keel_scraper::tick::{TickOutcome, TickReport, Ticker};
use keel_test_support::sim::{Behavior, PluginSim};
use support::binary::{
    exists, keel, raw_data, raw_json, raw_version, redis_store, redis_ticker, route_status, seed,
    seed_registry, seed_route, world, Capture, Events, ReplicaOptions, World,
};

impl World {
    async fn ticker(&self, o: &ReplicaOptions) -> Ticker {
        redis_ticker(&self.server, &self.sim.url_template(), o).await
    }

    fn version(&self, id: &str) -> Option<i64> {
        raw_version(&self.server, &format!("plugin_route_{id}"))
    }

    fn status(&self, id: &str) -> Option<String> {
        route_status(&self.server, id)
    }
}

/// One manual tick (as `once` runs it) that must complete; the lease is released.
async fn tick(t: &Ticker) -> (TickReport, Events) {
    let capture = Capture::new();
    let (outcome, guard) = capture
        .run(t.tick_keeping_lease(TickKind::Manual(Utc::now())))
        .await;
    if let Some(g) = guard {
        t.lease.release(&g).await.expect("release the lease");
    }
    let events = capture.events();
    match outcome {
        TickOutcome::Completed(r) => (r, events),
        other => panic!("the tick did not complete: {other:?}\n{events}"),
    }
}

/// Waits (bounded) until the simulator has received a request for every id, then gives
/// the tick's route read, which runs beside the probes and starts just after them (a few
/// milliseconds here), 300 ms to be done: what a caller changes next comes after the
/// routes were read. Callers delay their probes well beyond that.
async fn wait_for_requests(sim: &PluginSim, ids: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ids.iter().any(|id| sim.requests(id) == 0) {
        assert!(Instant::now() < deadline, "no probe arrived for {ids:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_routes_whose_status_changes_are_written() {
    let w = world().await;
    let s = &*w.store;
    seed_registry(s, &["steady", "steady-v1", "starting", "stopping"]).await;
    seed_route(s, "steady", "ACTIVE").await;
    seed_route(s, "steady-v1", "ACTIVE").await;
    seed_route(s, "starting", "STARTING").await;
    seed_route(s, "stopping", "ACTIVE").await;
    w.sim.set("steady", Behavior::v0("ACTIVE"));
    w.sim.set("steady-v1", Behavior::v1("RUNNING"));
    w.sim.set("starting", Behavior::v0("ACTIVE"));
    w.sim.set("stopping", Behavior::v0("STOPPING"));
    let t = w.ticker(&ReplicaOptions::new("replica-a")).await;

    let (report, events) = tick(&t).await;
    assert_eq!(report.plugins, 4, "{events}");
    assert_eq!(report.probed_ok, 4, "{events}");
    assert_eq!(report.routes_changed, 2, "{events}");
    // Unchanged routes keep their version (ETag): they were not written at all.
    assert_eq!(w.version("steady"), Some(1));
    assert_eq!(w.version("steady-v1"), Some(1));
    assert_eq!(w.version("starting"), Some(2));
    assert_eq!(w.version("stopping"), Some(2));
    assert_eq!(w.status("starting").as_deref(), Some("ACTIVE"));
    assert_eq!(w.status("stopping").as_deref(), Some("STOPPING"));
    let changed: Vec<_> = events.named("plugin_status_changed");
    assert_eq!(changed.len(), 2, "{events}");
    let starting = events.for_plugin("plugin_status_changed", "starting");
    assert_eq!(starting[0]["from"], "STARTING");
    assert_eq!(starting[0]["to"], "ACTIVE");
    assert_eq!(starting[0]["reason"], "reported");
    let stopping = events.for_plugin("plugin_status_changed", "stopping");
    assert_eq!(stopping[0]["from"], "ACTIVE");
    assert_eq!(stopping[0]["to"], "STOPPING");

    // The next tick observes the same statuses: nothing is written.
    let (report, events) = tick(&t).await;
    assert_eq!(report.routes_changed, 0, "{events}");
    assert!(!events.has("plugin_status_changed"), "{events}");
    for (id, version) in [
        ("steady", 1),
        ("steady-v1", 1),
        ("starting", 2),
        ("stopping", 2),
    ] {
        assert_eq!(w.version(id), Some(version), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_route_keeps_every_other_field_byte_for_byte() {
    let w = world().await;
    let s = &*w.store;
    seed_registry(s, &["iothub"]).await;
    // As Go's encoding/json writes it (`&` as \u0026), with fields this worker does not
    // know, number spellings a re-encoder would change, and `status` in the middle.
    let before = concat!(
        r#"{"tkeel_version":"v0.4.0","status":"ACTIVE","#,
        r#""register_addons":{"device_created":"iothub/v1/hook?a=1\u0026b=2"},"#,
        r#""future_field":{"nested":[1,2.50,-0.0,1.0e3,null,true]},"#,
        r#""big":123456789012345678901234567890,"esc":"caf\u00e9 \"q\"\n","#,
        r#""empty":{},"list":[ 1 , 2 ],"zzz_last":"end"}"#
    );
    seed(s, StoreKind::Public, "plugin_route_iothub", before).await;
    w.sim.set("iothub", Behavior::v0("STOPPED"));
    let t = w.ticker(&ReplicaOptions::new("replica-a")).await;

    let (report, events) = tick(&t).await;
    assert_eq!(report.routes_changed, 1, "{events}");
    let after = raw_data(&w.server, "plugin_route_iothub").expect("the route exists");
    assert_eq!(
        String::from_utf8_lossy(&after),
        before.replace(r#""status":"ACTIVE""#, r#""status":"STOPPED""#),
        "only the status may change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v0_and_v1_statuses_map_to_the_route_vocabulary() {
    let w = world().await;
    let s = &*w.store;
    // (plugin, route before, behaviour, route after, error_kind when the probe fails)
    let cases: Vec<(&str, &str, Behavior, &str, Option<&str>)> = vec![
        (
            "v1-running",
            "STARTING",
            Behavior::v1("RUNNING"),
            "ACTIVE",
            None,
        ),
        (
            "v1-wait",
            "ACTIVE",
            Behavior::v1("WAIT_RUNNING"),
            "STARTING",
            None,
        ),
        (
            "v1-err",
            "ACTIVE",
            Behavior::v1("ERR_REGISTER"),
            "FAILED",
            None,
        ),
        (
            "v1-numbers",
            "STARTING",
            Behavior::raw(200, r#"{"res":{"ret":0,"msg":"ok"},"status":3}"#),
            "ACTIVE",
            None,
        ),
        (
            "v1-defaults",
            "STARTING",
            Behavior::raw(200, r#"{"res":{},"status":"RUNNING"}"#),
            "ACTIVE",
            None,
        ),
        (
            "v1-unknown",
            "ACTIVE",
            Behavior::v1("UNKNOWN"),
            "ACTIVE",
            Some("unknown_status"),
        ),
        (
            "v1-bad-ret",
            "ACTIVE",
            Behavior::raw(
                200,
                r#"{"res":{"ret":"INTERNAL_ERROR","msg":"x"},"status":"RUNNING"}"#,
            ),
            "ACTIVE",
            Some("plugin_error"),
        ),
        (
            "v0-stopping",
            "ACTIVE",
            Behavior::v0("STOPPING"),
            "STOPPING",
            None,
        ),
        (
            "v0-starting",
            "ACTIVE",
            Behavior::v0("STARTING"),
            "STARTING",
            None,
        ),
        (
            "v0-failed",
            "STARTING",
            Behavior::v0("FAILED"),
            "FAILED",
            None,
        ),
        (
            "v0-no-ret",
            "STARTING",
            Behavior::raw(200, r#"{"status":"ACTIVE"}"#),
            "ACTIVE",
            None,
        ),
        (
            "v0-v1-word",
            "ACTIVE",
            Behavior::raw(200, r#"{"ret":0,"status":"RUNNING"}"#),
            "ACTIVE",
            Some("unknown_status"),
        ),
        (
            "v0-ret-error",
            "ACTIVE",
            Behavior::raw(200, r#"{"ret":-1,"msg":"boom","status":"ACTIVE"}"#),
            "ACTIVE",
            Some("plugin_error"),
        ),
    ];
    let ids: Vec<&str> = cases.iter().map(|c| c.0).collect();
    seed_registry(s, &ids).await;
    for (id, before, behavior, _, _) in &cases {
        seed_route(s, id, before).await;
        w.sim.set(*id, behavior.clone());
    }
    let t = w.ticker(&ReplicaOptions::new("replica-a")).await;

    let (report, events) = tick(&t).await;
    let failing = cases.iter().filter(|c| c.4.is_some()).count() as u64;
    assert_eq!(report.probe_failed, failing, "{events}");
    assert_eq!(report.probed_ok, cases.len() as u64 - failing, "{events}");
    for (id, _, _, after, kind) in &cases {
        assert_eq!(w.status(id).as_deref(), Some(*after), "{id}\n{events}");
        let failed = events.for_plugin("plugin_probe_failed", id);
        match kind {
            Some(kind) => {
                assert_eq!(failed.len(), 1, "{id}\n{events}");
                assert_eq!(failed[0]["error_kind"], *kind, "{id}");
            }
            None => assert!(failed.is_empty(), "{id}\n{events}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_plugin_without_route_is_skipped_and_never_created() {
    let w = world().await;
    let s = &*w.store;
    seed_registry(s, &["present", "ghost"]).await;
    seed_route(s, "present", "ACTIVE").await;
    w.sim.set("present", Behavior::v0("STOPPED"));
    // Whatever the plugin would say, its route must not appear.
    w.sim.set("ghost", Behavior::v0("STOPPED"));
    let t = w.ticker(&ReplicaOptions::new("replica-a")).await;

    for _ in 0..2 {
        let (report, events) = tick(&t).await;
        assert_eq!(report.plugins, 2, "{events}");
        assert_eq!(
            events.for_plugin("route_missing", "ghost").len(),
            1,
            "{events}"
        );
        assert!(events
            .for_plugin("plugin_status_changed", "ghost")
            .is_empty());
        assert!(
            !exists(&w.server, "plugin_route_ghost"),
            "a missing route was created"
        );
    }
    // Routes are read while the plugins are probed, so "ghost" may have been asked for
    // its status; what it said must have changed nothing.
    assert!(w.sim.requests("ghost") <= 2);
    assert_eq!(w.status("present").as_deref(), Some("STOPPED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_route_is_logged_and_left_byte_identical_while_others_proceed() {
    let w = world().await;
    let s = &*w.store;
    let malformed = [
        (
            "truncated",
            r#"{"status":"ACTIVE","tkeel_version":"v0.4.0""#,
        ),
        ("no-status", r#"{"tkeel_version":"v0.4.0"}"#),
        ("status-number", r#"{"status":3}"#),
        ("array", r#"["ACTIVE"]"#),
        ("not-json", "ACTIVE"),
    ];
    let mut ids: Vec<&str> = malformed.iter().map(|m| m.0).collect();
    ids.push("healthy");
    seed_registry(s, &ids).await;
    for (id, data) in malformed {
        seed(s, StoreKind::Public, &format!("plugin_route_{id}"), data).await;
        w.sim.set(id, Behavior::v0("STOPPED"));
    }
    seed_route(s, "healthy", "ACTIVE").await;
    w.sim.set("healthy", Behavior::v0("STOPPED"));
    let t = w.ticker(&ReplicaOptions::new("replica-a")).await;

    let (report, events) = tick(&t).await;
    for (id, data) in malformed {
        let key = format!("plugin_route_{id}");
        assert_eq!(
            events.for_plugin("route_invalid", id).len(),
            1,
            "{id}\n{events}"
        );
        assert_eq!(
            raw_data(&w.server, &key).as_deref(),
            Some(data.as_bytes()),
            "{id}"
        );
        assert_eq!(raw_version(&w.server, &key), Some(1), "{id} was written");
    }
    assert_eq!(report.routes_changed, 1, "{events}");
    assert_eq!(w.status("healthy").as_deref(), Some("STOPPED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_key_that_is_not_a_dapr_state_hash_is_skipped_while_other_plugins_proceed() {
    let w = world().await;
    let s = &*w.store;
    seed_registry(s, &["dead", "list-key", "hash-without-version"]).await;
    seed_route(s, "dead", "ACTIVE").await;
    // Written around Dapr: a list, and a hash lacking `version`. Dapr's bulk get reports
    // such keys one by one; they must not blind the tick to every other route. (A plain
    // string is not among them: Dapr, and the redis backend with it, reads it with GET.)
    w.server.query::<()>(
        redis::cmd("RPUSH")
            .arg("plugin_route_list-key")
            .arg(r#"{"status":"ACTIVE"}"#),
    );
    w.server.query::<()>(
        redis::cmd("HSET")
            .arg("plugin_route_hash-without-version")
            .arg("data")
            .arg(r#"{"status":"ACTIVE"}"#),
    );
    w.sim.set("dead", Behavior::raw(503, "{}"));
    let t = w
        .ticker(&ReplicaOptions::new("replica-a").thresholds(1, 1))
        .await;

    let capture = Capture::new();
    let (outcome, guard) = capture
        .run(t.tick_keeping_lease(TickKind::Manual(Utc::now())))
        .await;
    if let Some(g) = guard {
        t.lease.release(&g).await.expect("release");
    }
    let events = capture.events();
    assert!(
        matches!(outcome, TickOutcome::Completed(_)),
        "one odd route key failed the whole tick: {outcome:?}\n{events}"
    );
    // The dead plugin's route stops passing traffic, as it would without the odd keys.
    assert_eq!(w.status("dead").as_deref(), Some("FAILED"), "{events}");
    for id in ["list-key", "hash-without-version"] {
        assert_eq!(
            events.for_plugin("route_invalid", id).len(),
            1,
            "{id}\n{events}"
        );
    }
    assert_eq!(
        w.server.query::<Vec<String>>(
            redis::cmd("LRANGE")
                .arg("plugin_route_list-key")
                .arg(0)
                .arg(-1)
        ),
        vec![r#"{"status":"ACTIVE"}"#.to_owned()]
    );
    assert_eq!(
        w.server.hgetall("plugin_route_hash-without-version"),
        vec![("data".to_owned(), br#"{"status":"ACTIVE"}"#.to_vec())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_conflict_rereads_the_route_and_reapplies_the_decision_on_the_fresh_value() {
    let w = world().await;
    let s = &*w.store;
    let ids = ["edited", "agreed", "stopped-meanwhile", "corrupted"];
    seed_registry(s, &ids).await;
    for id in ids {
        seed_route(s, id, "ACTIVE").await;
    }
    let slow = |then: Behavior| Behavior::delay(Duration::from_millis(1500), then);
    w.sim.set("edited", slow(Behavior::v0("STOPPED")));
    w.sim.set("agreed", slow(Behavior::v0("STOPPED")));
    w.sim.set("corrupted", slow(Behavior::v0("STOPPED")));
    // One failed probe reaches the threshold of 1: the tick decides FAILED for it.
    w.sim
        .set("stopped-meanwhile", slow(Behavior::raw(503, "{}")));
    let o = ReplicaOptions::new("replica-a")
        .probe_timeout(Duration::from_secs(5))
        .thresholds(1, 1);
    let t = w.ticker(&o).await;

    // The Plugins plugin, on its own connection, rewrites every route after the tick
    // read them and while it waits for the probes.
    let other = redis_store(&w.server).await;
    let theirs = [
        (
            "edited",
            r#"{"status":"ACTIVE","tkeel_version":"v0.5.0","register_addons":{"added":"x/v1/y"},"owner":"plugins"}"#,
        ),
        (
            "agreed",
            r#"{"status":"STOPPED","tkeel_version":"v0.5.0","note":"stopped by an operator"}"#,
        ),
        (
            "stopped-meanwhile",
            r#"{"status":"STOPPED","tkeel_version":"v0.5.0"}"#,
        ),
        ("corrupted", r#"{"status":"ACTIVE","tkeel_version":"#),
    ];
    let capture = Capture::new();
    let meddle = async {
        wait_for_requests(&w.sim, &ids).await;
        for (id, data) in theirs {
            let key = format!("plugin_route_{id}");
            let current = other
                .get(StoreKind::Public, &key)
                .await
                .expect("read the route")
                .expect("the route exists");
            other
                .save(
                    StoreKind::Public,
                    Save::cas(&key, data.as_bytes(), &current.etag),
                )
                .await
                .expect("the other writer's CAS save");
        }
    };
    let ((outcome, guard), ()) = tokio::join!(
        capture.run(t.tick_keeping_lease(TickKind::Manual(Utc::now()))),
        meddle
    );
    let events = capture.events();
    let TickOutcome::Completed(report) = outcome else {
        panic!("the tick did not complete: {outcome:?}\n{events}");
    };
    t.lease
        .release(&guard.expect("a completed tick holds the lease"))
        .await
        .expect("release");
    let stored = |id: &str| {
        String::from_utf8_lossy(&raw_data(&w.server, &format!("plugin_route_{id}")).unwrap())
            .into_owned()
    };

    assert!(
        !events
            .for_plugin("route_write_conflict", "edited")
            .is_empty(),
        "{events}"
    );
    // Their fields, our decided status, in one more version.
    assert_eq!(
        stored("edited"),
        theirs[0]
            .1
            .replace(r#""status":"ACTIVE""#, r#""status":"STOPPED""#)
    );
    assert_eq!(w.version("edited"), Some(3));
    // The fresh value already says what the probe said: nothing left to write.
    assert_eq!(stored("agreed"), theirs[1].1);
    assert_eq!(
        w.version("agreed"),
        Some(2),
        "a route needing no change was written"
    );
    // Failed probes never override a blocking status someone else set meanwhile.
    assert_eq!(stored("stopped-meanwhile"), theirs[2].1);
    assert_eq!(w.version("stopped-meanwhile"), Some(2));
    // A route that became malformed is left as it is.
    assert_eq!(stored("corrupted"), theirs[3].1);
    assert_eq!(w.version("corrupted"), Some(2));
    assert!(
        !events.for_plugin("route_invalid", "corrupted").is_empty(),
        "{events}"
    );

    assert_eq!(report.routes_changed, 1, "{events}");
    assert_eq!(events.named("plugin_status_changed").len(), 1, "{events}");
    assert_eq!(
        events.for_plugin("plugin_status_changed", "edited")[0]["from"],
        "ACTIVE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_deleted_while_the_tick_runs_is_not_recreated() {
    let w = world().await;
    let s = &*w.store;
    seed_registry(s, &["doomed", "failing"]).await;
    seed_route(s, "doomed", "ACTIVE").await;
    seed_route(s, "failing", "ACTIVE").await;
    w.sim.set(
        "doomed",
        Behavior::delay(Duration::from_millis(1500), Behavior::v0("STOPPED")),
    );
    // A probe failing at the threshold decides FAILED: that write must not land either.
    w.sim.set(
        "failing",
        Behavior::delay(Duration::from_millis(1500), Behavior::raw(503, "{}")),
    );
    let t = w
        .ticker(
            &ReplicaOptions::new("replica-a")
                .probe_timeout(Duration::from_secs(5))
                .thresholds(1, 1),
        )
        .await;

    let other = redis_store(&w.server).await;
    let capture = Capture::new();
    let delete = async {
        wait_for_requests(&w.sim, &["doomed", "failing"]).await;
        for id in ["doomed", "failing"] {
            other
                .delete(StoreKind::Public, &format!("plugin_route_{id}"), None)
                .await
                .expect("delete the route");
        }
    };
    let ((outcome, guard), ()) = tokio::join!(
        capture.run(t.tick_keeping_lease(TickKind::Manual(Utc::now()))),
        delete
    );
    let events = capture.events();
    assert!(
        matches!(outcome, TickOutcome::Completed(_)),
        "{outcome:?}\n{events}"
    );
    t.lease
        .release(&guard.expect("lease"))
        .await
        .expect("release");

    for id in ["doomed", "failing"] {
        assert!(
            !exists(&w.server, &format!("plugin_route_{id}")),
            "{id} was re-created\n{events}"
        );
        assert_eq!(
            events.for_plugin("route_missing", id).len(),
            1,
            "{id}\n{events}"
        );
    }
    assert!(!events.has("plugin_status_changed"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_threshold_two_fails_a_route_on_the_second_failed_probe_across_replicas() {
    let w = world().await;
    let s = &*w.store;
    seed_registry(s, &["flaky"]).await;
    seed_route(s, "flaky", "ACTIVE").await;
    w.sim.set("flaky", Behavior::raw(503, "{}"));
    let once = |holder: &str| {
        keel().redis(&w.server.url(), &w.sim.url_template()).args([
            "once",
            "--unhealthy-threshold",
            "2",
            "--retries",
            "0",
            "--holder-id",
            holder,
        ])
    };

    let first = once("replica-a").run_async().await;
    first.assert_code(0);
    let events = first.events();
    let failed = events.for_plugin("plugin_probe_failed", "flaky");
    assert_eq!(failed.len(), 1, "{}", first.describe());
    assert_eq!(failed[0]["error_kind"], "http_status");
    assert_eq!(failed[0]["consecutive_failures"], 1);
    assert_eq!(
        w.status("flaky").as_deref(),
        Some("ACTIVE"),
        "one failure is below the threshold"
    );
    // The count lives in the private store, under the Plugins prefix.
    let counters =
        raw_json(&w.server, "plugins||scrape_counters").expect("plugins||scrape_counters exists");
    assert!(counters.get("flaky").is_some(), "{counters}");
    assert!(
        !exists(&w.server, "scrape_counters"),
        "counters must be a private key"
    );

    // Another replica (another process, another holder) continues the count.
    let second = once("replica-b").run_async().await;
    second.assert_code(0);
    let events = second.events();
    assert_eq!(
        events.for_plugin("plugin_probe_failed", "flaky")[0]["consecutive_failures"],
        2
    );
    let changed = events.for_plugin("plugin_status_changed", "flaky");
    assert_eq!(changed.len(), 1, "{}", second.describe());
    assert_eq!(changed[0]["from"], "ACTIVE");
    assert_eq!(changed[0]["to"], "FAILED");
    assert_eq!(changed[0]["reason"], "unhealthy_threshold");
    assert_eq!(events.one("tick_completed")["holder"], "replica-b");
    assert_eq!(w.status("flaky").as_deref(), Some("FAILED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_threshold_two_needs_two_passing_reports_to_leave_failed() {
    let w = world().await;
    let s = &*w.store;
    seed_registry(s, &["recovering"]).await;
    seed_route(s, "recovering", "FAILED").await;
    w.sim.set("recovering", Behavior::v0("ACTIVE"));
    let once = |holder: &str| {
        keel().redis(&w.server.url(), &w.sim.url_template()).args([
            "once",
            "--healthy-threshold",
            "2",
            "--holder-id",
            holder,
        ])
    };

    let first = once("replica-a").run_async().await;
    first.assert_code(0);
    assert!(
        !first.events().has("plugin_status_changed"),
        "{}",
        first.describe()
    );
    assert_eq!(w.status("recovering").as_deref(), Some("FAILED"));
    assert_eq!(w.version("recovering"), Some(1));
    let counters = raw_json(&w.server, "plugins||scrape_counters").expect("counters saved");
    assert!(counters.get("recovering").is_some(), "{counters}");

    let second = once("replica-b").run_async().await;
    second.assert_code(0);
    let events = second.events();
    let changed = events.for_plugin("plugin_status_changed", "recovering");
    assert_eq!(changed.len(), 1, "{}", second.describe());
    assert_eq!(changed[0]["from"], "FAILED");
    assert_eq!(changed[0]["to"], "ACTIVE");
    assert_eq!(changed[0]["reason"], "healthy_threshold");
    assert_eq!(w.status("recovering").as_deref(), Some("ACTIVE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_running_at_the_deadline_is_cut_off_without_moving_counter_or_status() {
    let w = world().await;
    let s = &*w.store;
    seed_registry(s, &["slow", "fast"]).await;
    seed_route(s, "slow", "ACTIVE").await;
    seed_route(s, "fast", "ACTIVE").await;
    let o = ReplicaOptions::new("replica-a")
        .lease(Duration::from_secs(1), Duration::from_secs(1))
        .probe_timeout(Duration::from_secs(5))
        .thresholds(2, 1);
    let t = w.ticker(&o).await;

    // One real failure first: a second one would make the route FAILED.
    w.sim.set("slow", Behavior::raw(503, "{}"));
    w.sim.set("fast", Behavior::v0("ACTIVE"));
    let (report, events) = tick(&t).await;
    assert_eq!(report.probe_failed, 1, "{events}");
    let counters_before = raw_data(&w.server, "plugins||scrape_counters").expect("counters saved");

    // Now the slow plugin answers (a blocking status) only after 3 s.
    w.sim.set(
        "slow",
        Behavior::delay(Duration::from_secs(3), Behavior::v0("STOPPED")),
    );
    w.sim.set("fast", Behavior::v0("STOPPING"));
    let started = Instant::now();
    let (report, events) = tick(&t).await;
    let wall = started.elapsed();

    assert_eq!(report.cut_off, 1, "{events}");
    assert_eq!(report.probe_failed, 0, "{events}");
    assert_eq!(report.probed_ok, 1, "{events}");
    assert_eq!(events.one("probes_cut_off")["plugins"], 1);
    assert!(
        events.for_plugin("plugin_probe_failed", "slow").is_empty(),
        "{events}"
    );
    assert!(
        events
            .for_plugin("plugin_status_changed", "slow")
            .is_empty(),
        "{events}"
    );
    assert_eq!(w.status("slow").as_deref(), Some("ACTIVE"));
    assert_eq!(w.version("slow"), Some(1));
    assert_eq!(
        raw_data(&w.server, "plugins||scrape_counters").as_deref(),
        Some(counters_before.as_slice()),
        "a cut-off probe moved the counters"
    );
    // The others' decided writes still land.
    assert_eq!(w.status("fast").as_deref(), Some("STOPPING"));
    // Probing stopped at lease - lease/5 = 800 ms: the tick ends inside the 1 s lease.
    assert!(
        report.duration < Duration::from_secs(1),
        "tick took {:?}",
        report.duration
    );
    assert!(
        wall < Duration::from_millis(1500),
        "tick and release took {wall:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_cuts_off_probes_at_the_deadline_and_finishes_inside_the_lease() {
    let w = world().await;
    let s = &*w.store;
    seed_registry(s, &["slow", "fast"]).await;
    seed_route(s, "slow", "ACTIVE").await;
    seed_route(s, "fast", "STARTING").await;
    w.sim.set(
        "slow",
        Behavior::delay(Duration::from_secs(3), Behavior::v0("STOPPED")),
    );
    w.sim.set("fast", Behavior::v0("ACTIVE"));

    let out = keel()
        .redis(&w.server.url(), &w.sim.url_template())
        .args([
            "once",
            "--lease",
            "1s",
            "--probe-timeout",
            "5s",
            "--holder-id",
            "replica-a",
        ])
        .run_async()
        .await;
    out.assert_code(0);
    let events = out.events();
    assert_eq!(
        events.one("probes_cut_off")["plugins"],
        1,
        "{}",
        out.describe()
    );
    let done = events.one("tick_completed");
    assert!(
        done["duration_ms"].as_u64().unwrap() < 1000,
        "{}",
        out.describe()
    );
    assert_eq!(done["probed_ok"], 1);
    assert_eq!(done["probe_failed"], 0);
    assert_eq!(w.status("slow").as_deref(), Some("ACTIVE"));
    assert_eq!(w.status("fast").as_deref(), Some("ACTIVE"));
    assert!(!events.has("plugin_probe_failed"), "{}", out.describe());
}

/// A memory store whose bulk read of the routes holds the calling thread for a while
/// before it reads (as the embedded store's synchronous read does at scale), and notes
/// how many status calls the simulator had received by then.
struct SlowBulkRead {
    inner: std::sync::Arc<keel_scraper::store::memory::MemoryStore>,
    sim: std::sync::Arc<PluginSim>,
    requests_seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait::async_trait]
impl keel_scraper::store::Store for SlowBulkRead {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn store_name(&self, kind: StoreKind) -> &str {
        self.inner.store_name(kind)
    }

    fn locate(&self, kind: StoreKind, key: &str) -> String {
        self.inner.locate(kind, key)
    }

    async fn get(
        &self,
        kind: StoreKind,
        key: &str,
    ) -> Result<Option<keel_scraper::store::Entry>, keel_scraper::store::StoreError> {
        self.inner.get(kind, key).await
    }

    async fn bulk_get(
        &self,
        kind: StoreKind,
        keys: &[String],
    ) -> Result<Vec<Option<keel_scraper::store::Entry>>, keel_scraper::store::StoreError> {
        if kind == StoreKind::Public {
            // Blocks this thread, as a synchronous read does: nothing else runs on it.
            std::thread::sleep(Duration::from_millis(500));
            self.requests_seen.store(
                self.sim.total_requests(),
                std::sync::atomic::Ordering::SeqCst,
            );
        }
        self.inner.bulk_get(kind, keys).await
    }

    async fn save(
        &self,
        kind: StoreKind,
        save: Save<'_>,
    ) -> Result<(), keel_scraper::store::StoreError> {
        self.inner.save(kind, save).await
    }

    async fn update_existing(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
    ) -> Result<(), keel_scraper::store::StoreError> {
        self.inner.update_existing(kind, key, data, etag).await
    }

    async fn delete(
        &self,
        kind: StoreKind,
        key: &str,
        etag: Option<&str>,
    ) -> Result<(), keel_scraper::store::StoreError> {
        self.inner.delete(kind, key, etag).await
    }

    fn update_checks_existence(&self) -> bool {
        self.inner.update_checks_existence()
    }

    async fn ping(&self) -> Result<(), keel_scraper::store::StoreError> {
        self.inner.ping().await
    }
}

/// The probes are under way before the route read first runs: a store that holds the
/// tick's thread through its bulk read (the embedded one reads synchronously) does not
/// hold the probes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_under_way_before_a_synchronous_route_read_runs() {
    let sim = std::sync::Arc::new(PluginSim::start().expect("simulator"));
    let ids = ["a", "b", "c"];
    let inner = std::sync::Arc::new(keel_scraper::store::memory::MemoryStore::new("pub", "priv"));
    seed_registry(&*inner, &ids).await;
    for id in ids {
        sim.set(id, Behavior::v0("ACTIVE"));
        seed_route(&*inner, id, "ACTIVE").await;
    }
    let requests_seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let store = std::sync::Arc::new(SlowBulkRead {
        inner,
        sim: sim.clone(),
        requests_seen: requests_seen.clone(),
    });
    let t = support::binary::ticker(store, &sim.url_template(), &ReplicaOptions::new("a"));
    let (report, _) = tick(&t).await;
    assert_eq!(report.probed_ok, 3, "{report:?}");
    assert_eq!(
        requests_seen.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "every probe had been answered while the route read held the tick's thread"
    );
}
