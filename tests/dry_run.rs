//! `--dry-run`: decide, log and count, but write no route and no store state and never
//! take the lease. Two ticks against a fleet with changes leave every byte of Redis as it
//! was, and the events say what would have been written.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use keel_scraper::lease::TickKind;
use keel_scraper::tick::TickOutcome;
use keel_test_support::sim::{Behavior, PluginSim};
use support::binary::{
    keel, redis_store, redis_ticker, seed_registry, seed_route, Capture, ReplicaOptions,
};
use support::redis_server::RedisServer;

/// Every key with its `DUMP` (type, value and encoding) and whether it has a TTL.
fn snapshot(server: &RedisServer) -> BTreeMap<Vec<u8>, (Vec<u8>, bool)> {
    let keys: Vec<Vec<u8>> = server.query(redis::cmd("KEYS").arg("*"));
    keys.into_iter()
        .map(|k| {
            let dump: Vec<u8> = server.query(redis::cmd("DUMP").arg(&k));
            let ttl: i64 = server.query(redis::cmd("PTTL").arg(&k));
            (k, (dump, ttl >= 0))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dry_ticks_change_no_byte_and_say_what_they_would_write() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let sim = PluginSim::start().expect("simulator");
    seed_registry(&*store, &["dies", "stops", "recovers", "steady"]).await;
    for (id, status) in [
        ("dies", "ACTIVE"),
        ("stops", "ACTIVE"),
        ("recovers", "FAILED"),
        ("steady", "ACTIVE"),
    ] {
        seed_route(&*store, id, status).await;
    }
    sim.set("dies", Behavior::raw(503, "down"));
    sim.set("stops", Behavior::v0("STOPPED"));
    sim.set("recovers", Behavior::v0("ACTIVE"));
    sim.set("steady", Behavior::v0("ACTIVE"));
    let before = snapshot(&server);

    let o = ReplicaOptions::new("dry").thresholds(2, 1);
    let t = redis_ticker(&server, &sim.url_template(), &o)
        .await
        .with_dry_run(true);
    let mut would = Vec::new();
    for n in 1..=2 {
        let capture = Capture::new();
        let outcome = capture.run(t.tick(TickKind::Manual(Utc::now()))).await;
        let events = capture.events();
        assert!(
            matches!(outcome, TickOutcome::Completed(_)),
            "tick {n}: {outcome:?}\n{events}"
        );
        assert!(!events.has("lock_acquired"), "{events}");
        assert!(!events.has("plugin_status_changed"), "{events}");
        let f = events.for_plugin("plugin_probe_failed", "dies");
        assert_eq!(f.len(), 1);
        // The counts live in memory: the second failure is the second in a row.
        assert_eq!(f[0]["consecutive_failures"], n, "{events}");
        for e in events.named("plugin_status_would_change") {
            would.push((
                n,
                e["plugin_id"].as_str().unwrap_or_default().to_owned(),
                e["from"].as_str().unwrap_or_default().to_owned(),
                e["to"].as_str().unwrap_or_default().to_owned(),
                e["reason"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    would.sort();
    let s = |x: &str| x.to_owned();
    assert_eq!(
        would,
        vec![
            (1, s("recovers"), s("FAILED"), s("ACTIVE"), s("reported")),
            (1, s("stops"), s("ACTIVE"), s("STOPPED"), s("reported")),
            (
                2,
                s("dies"),
                s("ACTIVE"),
                s("FAILED"),
                s("unhealthy_threshold")
            ),
            (2, s("recovers"), s("FAILED"), s("ACTIVE"), s("reported")),
            (2, s("stops"), s("ACTIVE"), s("STOPPED"), s("reported")),
        ]
    );
    assert_eq!(snapshot(&server), before, "a dry run changed Redis");

    // The flag through the binary: `once --dry-run` takes no lease and writes nothing.
    let url = server.url();
    let template = sim.url_template();
    let out = tokio::task::spawn_blocking(move || {
        keel()
            .redis(&url, &template)
            .args(["--dry-run", "once"])
            .timeout(Duration::from_secs(30))
            .run()
    })
    .await
    .expect("run once");
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let events = out.events();
    assert!(!events.has("lock_acquired"), "{events}");
    assert_eq!(
        events.named("plugin_status_would_change").len(),
        2,
        "{events}"
    );
    assert_eq!(snapshot(&server), before, "once --dry-run changed Redis");
}
