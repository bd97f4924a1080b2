//! The observer's own health through Dapr, with the sidecar double: the sidecar's HTTP
//! port closed (a TCP proxy in front of it; the gRPC state API left up) for 3 ticks moves
//! no counter and demotes nothing, each tick fails with `observer_unhealthy`; after it
//! reopens the ticks are normal and a real death is blocked. And a fleet failing at once
//! through the sidecar is held, with the observer healthy.

mod support;

use chrono::Utc;
use keel_scraper::config::{parse_cli, Env, Settings};
use keel_scraper::lease::TickKind;
use keel_scraper::store::StoreKind;
use keel_scraper::tick::{TickError, TickOutcome};
use keel_scraper::wiring;
use keel_test_support::sim::{Behavior, PluginSim};
use support::binary::{seed_registry, seed_route, Capture};
use support::proxy::Proxy;
use support::sidecar::{SidecarConfig, SidecarDouble};

struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_sidecar_http_port_is_the_observers_failure() {
    let sim = PluginSim::start().expect("simulator");
    let base = sim.url_template().replace("/{plugin_id}/v1/status", "");
    let sidecar = SidecarDouble::start(SidecarConfig::default().with_invoke_base(&base)).await;
    let proxy = Proxy::start(&sidecar.http_endpoint()["http://".len()..]).await;
    let http = format!("http://{}", proxy.address());
    let (cli, _) = parse_cli([
        "keel-scraper",
        "--backend",
        "dapr",
        "--dapr-grpc-endpoint",
        &sidecar.grpc_endpoint(),
        "--dapr-http-endpoint",
        &http,
        "--probe-timeout",
        "300ms",
        "--retries",
        "0",
        "once",
    ])
    .expect("arguments");
    let settings = Settings::from_options(&cli.options, &NoEnv).expect("settings");
    let store = wiring::build_store(&settings).await.expect("store");
    let prober = wiring::build_prober(&settings).expect("prober");
    let t = wiring::ticker(&settings, store.clone(), prober);

    let ids = ["a", "b", "c"];
    seed_registry(&*store, &ids).await;
    for id in ids {
        seed_route(&*store, id, "ACTIVE").await;
        sim.set(id, Behavior::v0("ACTIVE"));
    }
    let counters = || async {
        store
            .get(StoreKind::Private, "scrape_counters")
            .await
            .expect("read the counters")
            .map(|e| e.data)
    };
    let routes = || async {
        let mut out = Vec::new();
        for id in ids {
            let e = store
                .get(StoreKind::Public, &format!("plugin_route_{id}"))
                .await
                .expect("read a route")
                .expect("the route exists");
            out.push(e.etag);
        }
        out
    };
    let before = routes().await;

    proxy.close();
    for n in 1..=3 {
        let capture = Capture::new();
        let outcome = capture.run(t.tick(TickKind::Manual(Utc::now()))).await;
        let events = capture.events();
        assert!(
            matches!(
                outcome,
                TickOutcome::Failed(TickError::ObserverUnhealthy(_))
            ),
            "tick {n}: {outcome:?}\n{events}"
        );
        let unhealthy = events.one("observer_unhealthy");
        assert_eq!(unhealthy["alert"], true);
        assert!(
            unhealthy["observer"]
                .as_str()
                .unwrap_or_default()
                .contains("Dapr sidecar"),
            "{unhealthy}"
        );
        assert!(events.one("tick_failed")["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("observer unhealthy: "));
        assert!(!events.has("plugin_status_changed"), "{events}");
        assert_eq!(counters().await, None, "tick {n}: a counter moved");
    }
    assert_eq!(routes().await, before, "a route was written");

    proxy.open().await;
    sim.set("a", Behavior::raw(503, "down"));
    for n in 1..=2 {
        let capture = Capture::new();
        let outcome = capture.run(t.tick(TickKind::Manual(Utc::now()))).await;
        let events = capture.events();
        assert!(
            matches!(outcome, TickOutcome::Completed(_)),
            "tick {n} after reopening: {outcome:?}\n{events}"
        );
        assert!(!events.has("observer_unhealthy"), "{events}");
    }
    let a = store
        .get(StoreKind::Public, "plugin_route_a")
        .await
        .expect("read")
        .expect("exists");
    let status: serde_json::Value = serde_json::from_slice(&a.data).expect("json");
    assert_eq!(status["status"], "FAILED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_dapr_a_fleet_failing_at_once_is_held_and_the_observer_stays_healthy() {
    let sim = PluginSim::start().expect("simulator");
    let base = sim.url_template().replace("/{plugin_id}/v1/status", "");
    let sidecar = SidecarDouble::start(SidecarConfig::default().with_invoke_base(&base)).await;
    let (cli, _) = parse_cli([
        "keel-scraper",
        "--backend",
        "dapr",
        "--dapr-grpc-endpoint",
        &sidecar.grpc_endpoint(),
        "--dapr-http-endpoint",
        &sidecar.http_endpoint(),
        "--probe-timeout",
        "300ms",
        "--retries",
        "0",
        "once",
    ])
    .expect("arguments");
    let settings = Settings::from_options(&cli.options, &NoEnv).expect("settings");
    assert_eq!(settings.max_failed_share_milli, 500, "the default share");
    let store = wiring::build_store(&settings).await.expect("store");
    let prober = wiring::build_prober(&settings).expect("prober");
    let t = wiring::ticker(&settings, store.clone(), prober);
    let ids: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    seed_registry(&*store, &refs).await;
    for id in &ids {
        seed_route(&*store, id, "ACTIVE").await;
        sim.set(id.as_str(), Behavior::raw(503, "down"));
    }
    for n in 1..=3 {
        let capture = Capture::new();
        let outcome = capture.run(t.tick(TickKind::Manual(Utc::now()))).await;
        let events = capture.events();
        let TickOutcome::Completed(r) = outcome else {
            panic!("tick {n}: {outcome:?}\n{events}");
        };
        assert!(!events.has("observer_unhealthy"), "tick {n}\n{events}");
        assert!(!events.has("plugin_status_changed"), "tick {n}\n{events}");
        assert_eq!(r.held, if n >= 2 { 10 } else { 0 }, "tick {n}\n{events}");
    }
    for id in &ids {
        let e = store
            .get(StoreKind::Public, &format!("plugin_route_{id}"))
            .await
            .expect("read")
            .expect("exists");
        let route: serde_json::Value = serde_json::from_slice(&e.data).expect("json");
        assert_eq!(route["status"], "ACTIVE", "{id}");
    }
    assert!(sidecar.calls("invoke") >= 30);
}
