//! The consecutive counters (`scrape_counters`, private store) are the worker's own data:
//! an unreadable or malformed value is reported and the counts start again, and it never
//! stops a tick.

mod support;

use chrono::Utc;
use keel_scraper::lease::TickKind;
use keel_scraper::store::StoreKind;
use keel_scraper::tick::TickOutcome;
use keel_test_support::sim::{Behavior, PluginSim};
use support::binary::{
    redis_ticker, route_status, seed, seed_registry, seed_route, Capture, ReplicaOptions,
};
use support::redis_server::RedisServer;

async fn tick_once(capture: &Capture, t: &keel_scraper::tick::Ticker) -> TickOutcome {
    let (outcome, guard) = capture
        .run(t.tick_keeping_lease(TickKind::Manual(Utc::now())))
        .await;
    if let Some(g) = guard {
        t.lease.release(&g).await.expect("release");
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_foreign_counters_are_reported_and_the_count_starts_again() {
    let server = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    sim.set("a", Behavior::Unknown404);
    let t = redis_ticker(&server, &sim.url_template(), &ReplicaOptions::new("r1")).await;
    seed_registry(&*t.store, &["a"]).await;

    for (case, corrupt) in [("malformed JSON", true), ("not a state hash", false)] {
        for key in ["plugin_route_a", "plugins||scrape_counters"] {
            let _: () = server.query(redis::cmd("DEL").arg(key));
        }
        seed_route(&*t.store, "a", "ACTIVE").await;
        if corrupt {
            seed(&*t.store, StoreKind::Private, "scrape_counters", "{\"a\":").await;
        } else {
            let _: () = server.query(redis::cmd("SET").arg("plugins||scrape_counters").arg("x"));
        }
        let capture = Capture::new();
        let outcome = tick_once(&capture, &t).await;
        assert!(
            matches!(outcome, TickOutcome::Completed(_)),
            "{case}: {outcome:?}"
        );
        let events = capture.events();
        let errors = events.named("store_error");
        assert!(
            errors.iter().any(|e| e["operation"] == "read_counters"),
            "{case}: the unreadable counters are reported: {:?}",
            events.0
        );
        // One failure counted from zero: the route still passes the gate.
        assert_eq!(
            route_status(&server, "a").as_deref(),
            Some("ACTIVE"),
            "{case}"
        );
        // The next failure reaches the threshold of 2 from the restarted count.
        let capture = Capture::new();
        tick_once(&capture, &t).await;
        assert_eq!(
            route_status(&server, "a").as_deref(),
            Some("FAILED"),
            "{case}"
        );
    }
}
