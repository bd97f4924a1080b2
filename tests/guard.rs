//! The mass-failure fleet guard and the observer's own health, against a real
//! `redis-server` and the plugin simulator. Plugins fail one by one through the
//! simulator's behaviours (503, timeout, reset); the shared simulator is never killed.
//! The observer's path is cut with a TCP proxy in front of the status host.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use keel_scraper::lease::TickKind;
use keel_scraper::observer::Observer;
use keel_scraper::store::{Save, StoreKind, ABSENT_ETAG};
use keel_scraper::tick::{TickOutcome, TickReport, Ticker};
use keel_test_support::sim::{Behavior, PluginSim};
use support::binary::{
    keel, raw_version, redis_ticker, route_status, seed_registry, seed_route, world, Capture,
    Events, ReplicaOptions, World,
};
use support::proxy::Proxy;
use support::redis_server::RedisServer;

const U: u32 = 2;

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

impl World {
    /// A replica with the guard at `share_milli`, a 30-tick window, U = 2.
    async fn ticker(&self, share_milli: u32) -> Ticker {
        let o = ReplicaOptions::new("guarded")
            .probe_timeout(Duration::from_millis(300))
            .thresholds(U, 1);
        redis_ticker(&self.server, &self.sim.url_template(), &o)
            .await
            .with_guard(share_milli, 30)
    }

    /// Registers `all` with `ACTIVE` routes; every plugin answers ACTIVE.
    async fn fleet(&self, all: &[String]) {
        self.fleet_at(all, |_| "ACTIVE").await;
    }

    /// Registers `all` with routes at `status(id)`; every plugin answers ACTIVE.
    async fn fleet_at(&self, all: &[String], status: impl Fn(&str) -> &'static str) {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        seed_registry(&*self.store, &refs).await;
        for id in all {
            seed_route(&*self.store, id, status(id)).await;
            self.sim.set(id.as_str(), Behavior::v0("ACTIVE"));
        }
    }

    /// Fails `ids` through a mix of the simulator's behaviours.
    fn fail(&self, ids: &[String]) {
        for (i, id) in ids.iter().enumerate() {
            let b = match i % 3 {
                0 => Behavior::raw(503, "unavailable"),
                1 => Behavior::Delay(Duration::from_secs(2), Box::new(Behavior::v0("ACTIVE"))),
                _ => Behavior::Reset,
            };
            self.sim.set(id.as_str(), b);
        }
    }

    fn status(&self, id: &str) -> String {
        route_status(&self.server, id).unwrap_or_else(|| format!("(no route for {id})"))
    }

    fn statuses(&self, ids: &[String]) -> BTreeMap<String, String> {
        ids.iter().map(|id| (id.clone(), self.status(id))).collect()
    }

    fn versions(&self, ids: &[String]) -> Vec<Option<i64>> {
        ids.iter()
            .map(|id| raw_version(&self.server, &format!("plugin_route_{id}")))
            .collect()
    }

    async fn counters(&self) -> BTreeMap<String, serde_json::Value> {
        match self
            .store
            .get(StoreKind::Private, "scrape_counters")
            .await
            .expect("read the counters")
        {
            Some(e) => serde_json::from_slice(&e.data).expect("counters are JSON"),
            None => BTreeMap::new(),
        }
    }
}

/// `127.0.0.1:<port>` of the simulator.
fn sim_host(sim: &PluginSim) -> String {
    let template = sim.url_template();
    let rest = template.strip_prefix("http://").unwrap_or(&template);
    rest.split('/').next().unwrap_or_default().to_owned()
}

/// One manual tick that must complete.
async fn tick(t: &Ticker) -> (TickReport, Events) {
    let capture = Capture::new();
    let outcome = capture.run(t.tick(TickKind::Manual(Utc::now()))).await;
    let events = capture.events();
    match outcome {
        TickOutcome::Completed(r) => {
            assert!(!r.release_failed, "the tick released its lease\n{events}");
            (r, events)
        }
        other => panic!("the tick did not complete: {other:?}\n{events}"),
    }
}

fn all_are(statuses: &BTreeMap<String, String>, ids: &[String], status: &str) -> bool {
    ids.iter().all(|id| statuses[id] == status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_of_twenty_failing_are_held_for_five_ticks_and_nothing_needs_undoing() {
    let w = world().await;
    let fleet = ids("p", 20);
    w.fleet(&fleet).await;
    let t = w.ticker(500).await;
    let before = w.versions(&fleet);
    w.fail(&fleet);
    for n in 1..=5u32 {
        let (r, events) = tick(&t).await;
        assert_eq!(r.routes_changed, 0, "tick {n} wrote a route\n{events}");
        assert!(!events.has("plugin_status_changed"), "tick {n}\n{events}");
        if n < U {
            assert!(!events.has("demotions_held"), "tick {n}\n{events}");
            assert_eq!(r.held, 0);
        } else {
            let held = events.one("demotions_held");
            assert_eq!(held["count"], 20, "{held}");
            assert_eq!(held["limit"], 10, "{held}");
            assert_eq!(held["eligible"], 20, "{held}");
            assert_eq!(held["share"], "1", "{held}");
            assert_eq!(held["alert"], true, "{held}");
            assert_eq!(held["plugin_ids"], "p0,p1,p10,p11,p12", "{held}");
            let kinds = held["error_kinds"].as_str().unwrap_or_default();
            for k in ["http_status", "timeout"] {
                assert!(kinds.contains(k), "{held}");
            }
            assert_eq!(r.held, 20);
            assert_eq!(events.one("tick_completed")["held"], 20);
        }
        // The counters keep counting.
        let counters = w.counters().await;
        for id in &fleet {
            assert_eq!(counters[id]["f"], n, "tick {n}: {id}: {counters:?}");
        }
    }
    assert_eq!(w.versions(&fleet), before, "a route was written");
    assert!(all_are(&w.statuses(&fleet), &fleet, "ACTIVE"));

    // They recover: nothing to undo, the counts end.
    for id in &fleet {
        w.sim.set(id.as_str(), Behavior::v0("ACTIVE"));
    }
    let (r, events) = tick(&t).await;
    assert_eq!(r.routes_changed, 0, "{events}");
    assert!(!events.has("demotions_held"), "{events}");
    assert_eq!(w.versions(&fleet), before);
    assert!(w.counters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_guard_off_twenty_failing_are_all_blocked() {
    let w = world().await;
    let fleet = ids("p", 20);
    w.fleet(&fleet).await;
    let t = w.ticker(1000).await;
    w.fail(&fleet);
    for _ in 0..U {
        let (_, events) = tick(&t).await;
        assert!(!events.has("demotions_held"), "{events}");
    }
    assert!(all_are(&w.statuses(&fleet), &fleet, "FAILED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_deaths_are_blocked_and_more_past_the_limit_are_held() {
    let w = world().await;
    let fleet = ids("p", 20);
    w.fleet(&fleet).await;
    let t = w.ticker(500).await;

    // 2 of 20: blocked as today.
    let two = fleet[..2].to_vec();
    w.fail(&two);
    for _ in 0..U {
        tick(&t).await;
    }
    assert!(all_are(&w.statuses(&fleet), &two, "FAILED"));
    assert!(all_are(&w.statuses(&fleet), &fleet[2..], "ACTIVE"));

    // 6 more at once: 8 of 20 <= 10, blocked.
    let eight = fleet[..8].to_vec();
    w.fail(&eight[2..]);
    for _ in 0..U {
        let (_, events) = tick(&t).await;
        assert!(!events.has("demotions_held"), "{events}");
    }
    assert!(all_are(&w.statuses(&fleet), &eight, "FAILED"));

    // Then 4 more: 12 of 20 would exceed 10, held.
    let four = fleet[8..12].to_vec();
    w.fail(&four);
    tick(&t).await;
    let (r, events) = tick(&t).await;
    let held = events.one("demotions_held");
    assert_eq!(
        (held["count"].as_u64(), held["limit"].as_u64()),
        (Some(4), Some(10))
    );
    assert_eq!(held["share"], "0.6", "{held}");
    assert_eq!(r.blocked_for_failures, 8);
    assert!(all_are(&w.statuses(&fleet), &four, "ACTIVE"));
    assert!(all_are(&w.statuses(&fleet), &eight, "FAILED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_dead_plugins_age_out_of_the_guard() {
    let w = world().await;
    let dead = ids("dead", 10);
    let live = ids("live", 10);
    let all: Vec<String> = dead.iter().chain(&live).cloned().collect();
    w.fleet_at(&all, |id| {
        if id.starts_with("dead") {
            "FAILED"
        } else {
            "ACTIVE"
        }
    })
    .await;
    // The dead have failed for far longer than the window (30 ticks).
    let counters: BTreeMap<&str, serde_json::Value> = dead
        .iter()
        .map(|id| (id.as_str(), serde_json::json!({"f": 1000})))
        .collect();
    let data = serde_json::to_vec(&counters).expect("encode");
    w.store
        .save(
            StoreKind::Private,
            Save::cas("scrape_counters", &data, ABSENT_ETAG),
        )
        .await
        .expect("seed the counters");
    w.fail(&dead);
    let t = w.ticker(500).await;
    w.fail(&live[..1]);
    let mut held = false;
    for _ in 0..U {
        let (_, events) = tick(&t).await;
        held |= events.has("demotions_held");
    }
    assert!(!held, "a new death among the live was held");
    assert_eq!(w.status(&live[0]), "FAILED");
    assert!(all_are(&w.statuses(&live), &live[1..], "ACTIVE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_fleets_of_one_and_two_a_dead_plugin_is_blocked() {
    for n in [1, 2] {
        let w = world().await;
        let fleet = ids("p", n);
        w.fleet(&fleet).await;
        let t = w.ticker(500).await;
        w.fail(&fleet[..1]);
        for _ in 0..U {
            let (_, events) = tick(&t).await;
            assert!(!events.has("demotions_held"), "fleet of {n}\n{events}");
        }
        assert_eq!(w.status(&fleet[0]), "FAILED", "fleet of {n}");
        if n == 2 {
            assert_eq!(w.status(&fleet[1]), "ACTIVE");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_apply_during_a_held_tick() {
    let w = world().await;
    let fleet = ids("p", 20);
    w.fleet(&fleet).await;
    let t = w.ticker(500).await;
    w.fail(&fleet[..18]);
    w.sim
        .set("p18", Behavior::raw(200, r#"{"ret":1,"msg":"db down"}"#));
    tick(&t).await;
    w.sim.set("p19", Behavior::v0("STOPPED"));
    let (r, events) = tick(&t).await;
    assert_eq!(r.held, 18, "{events}");
    assert_eq!(events.one("demotions_held")["count"], 18);
    assert_eq!(w.status("p19"), "STOPPED", "{events}");
    // plugin_error is the plugin's own report: blocked after U ticks, never held.
    assert_eq!(w.status("p18"), "FAILED", "{events}");
    assert!(all_are(&w.statuses(&fleet), &fleet[..18], "ACTIVE"));
}

/// `once` through the binary, with the guard defaults.
async fn once(server: &RedisServer, status_url: &str) -> (Option<i32>, Events, String) {
    let (url, status_url) = (server.url(), status_url.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        keel()
            .redis(&url, &status_url)
            .args(["--probe-timeout", "300ms", "--retries", "0", "once"])
            .run()
    })
    .await
    .expect("run once");
    (out.code, out.events(), out.describe())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_status_host_is_the_observers_failure_not_the_plugins() {
    let w = world().await;
    let fleet = ids("p", 3);
    w.fleet(&fleet).await;
    let proxy = Proxy::start(&sim_host(&w.sim)).await;
    let status_url = format!("http://{}/{{plugin_id}}/v1/status", proxy.address());
    let before = w.versions(&fleet);

    proxy.close();
    for n in 1..=3 {
        let (code, events, out) = once(&w.server, &status_url).await;
        assert_eq!(code, Some(1), "tick {n}: {out}");
        let unhealthy = events.one("observer_unhealthy");
        assert_eq!(unhealthy["alert"], true);
        assert!(
            unhealthy["observer"]
                .as_str()
                .unwrap_or_default()
                .contains(&proxy.address()),
            "{unhealthy}"
        );
        let failed = events.one("tick_failed");
        assert!(
            failed["error"]
                .as_str()
                .unwrap_or_default()
                .starts_with("observer unhealthy: "),
            "{failed}"
        );
        assert!(!events.has("plugin_status_changed"), "{out}");
        assert!(w.counters().await.is_empty(), "tick {n}: a counter moved");
    }
    assert_eq!(w.versions(&fleet), before);

    proxy.open().await;
    let (code, events, out) = once(&w.server, &status_url).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(!events.has("observer_unhealthy"), "{out}");
    assert_eq!(events.one("tick_completed")["probed_ok"], 3);
    // A real death after it reopens is seen again.
    w.sim.set("p0", Behavior::raw(503, "down"));
    for _ in 0..U {
        let (code, _, out) = once(&w.server, &status_url).await;
        assert_eq!(code, Some(0), "{out}");
    }
    assert_eq!(w.status("p0"), "FAILED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blind_holder_stands_back_and_the_standby_scrapes() {
    let w = world().await;
    let fleet = ids("p", 10);
    w.fleet(&fleet).await;
    let proxy = Proxy::start(&sim_host(&w.sim)).await;
    let blind_url = format!("http://{}/{{plugin_id}}/v1/status", proxy.address());
    let o = |name: &str| {
        ReplicaOptions::new(name)
            .probe_timeout(Duration::from_millis(300))
            .lease(Duration::from_secs(1), Duration::from_secs(1))
            .thresholds(U, 1)
    };
    let observer = |url: &str| {
        Observer::for_template(url, false, "http://127.0.0.1:1", Duration::from_millis(300))
    };
    let blind = redis_ticker(&w.server, &blind_url, &o("blind"))
        .await
        .with_guard(500, 30)
        .with_observer(observer(&blind_url));
    let standby = redis_ticker(&w.server, &w.sim.url_template(), &o("standby"))
        .await
        .with_guard(500, 30)
        .with_observer(observer(&w.sim.url_template()));
    let before = w.versions(&fleet);
    proxy.close();
    // A plugin really dies meanwhile.
    w.sim.set("p9", Behavior::raw(503, "down"));

    // Each slot: the blind replica fires first (it would win every race).
    let start = Utc::now() + chrono::Duration::seconds(1);
    let mut standby_scraped_at = None;
    let mut blind_failed = 0;
    for n in 0..6i64 {
        let slot = chrono::DurationRound::duration_trunc(start, chrono::Duration::seconds(1))
            .expect("whole second")
            + chrono::Duration::seconds(n);
        let capture = Capture::new();
        let first = capture.run(blind.tick(TickKind::Scheduled(slot))).await;
        let second = capture.run(standby.tick(TickKind::Scheduled(slot))).await;
        let events = capture.events();
        if matches!(first, TickOutcome::Failed(_)) {
            blind_failed += 1;
            assert!(events.has("observer_unhealthy"), "{events}");
        }
        if n > 0 {
            assert!(
                matches!(first, TickOutcome::Skipped(ref r) if r.as_str() == "standing_back"),
                "slot {n}: the blind replica did not stand back: {first:?}\n{events}"
            );
        }
        if matches!(second, TickOutcome::Completed(_)) && standby_scraped_at.is_none() {
            standby_scraped_at = Some(n);
        }
    }
    let wrongly_demoted = fleet[..9]
        .iter()
        .filter(|id| w.status(id) != "ACTIVE")
        .count();
    println!(
        "standing back: routes wrongly demoted {wrongly_demoted}, ticks until the standby scraped {}, blind ticks failed {blind_failed}",
        standby_scraped_at.map_or(-1, |n| n + 1)
    );
    assert_eq!(wrongly_demoted, 0);
    assert_eq!(w.versions(&fleet[..9]), before[..9].to_vec());
    let waited = standby_scraped_at.expect("the standby scraped") + 1;
    assert!(waited <= 2, "the standby waited {waited} ticks");
    assert_eq!(w.status("p9"), "FAILED", "the real death was not blocked");
}

#[test]
fn max_failed_share_must_be_a_decimal_in_zero_to_one() {
    for bad in [
        "0", "0.0", "1.5", "2", "abc", "0.3333", "-0.5", "", ".", "1.", "0,5",
    ] {
        let out = keel()
            .args([format!("--max-failed-share={bad}").as_str(), "config"])
            .run();
        assert_eq!(out.code, Some(2), "{bad:?}: {}", out.describe());
        assert!(
            out.stderr
                .contains("--max-failed-share / SCRAPER_MAX_FAILED_SHARE"),
            "{bad:?}: {}",
            out.describe()
        );
    }
    for (good, shown) in [
        ("1", "1"),
        ("0.5", "0.5"),
        (".25", "0.25"),
        ("1.000", "1"),
        ("0.001", "0.001"),
    ] {
        let out = keel().args(["--max-failed-share", good, "config"]).run();
        assert_eq!(out.code, Some(0), "{good:?}: {}", out.describe());
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with("max-failed-share"))
            .unwrap_or_default()
            .to_owned();
        assert!(
            line.split_whitespace().nth(2) == Some(shown),
            "{good:?}: {line}"
        );
    }
    let out = keel().args(["--guard-window", "0s", "config"]).run();
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("--guard-window"), "{}", out.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_held_demotions_stands_back_from_the_next_tick_only() {
    let w = world().await;
    let fleet = ids("p", 20);
    w.fleet(&fleet).await;
    let o = ReplicaOptions::new("holder")
        .probe_timeout(Duration::from_millis(300))
        .lease(Duration::from_secs(2), Duration::from_secs(2))
        .thresholds(U, 1);
    let t = redis_ticker(&w.server, &w.sim.url_template(), &o)
        .await
        .with_guard(500, 30);
    for id in &fleet {
        w.sim.set(id.as_str(), Behavior::raw(503, "down"));
    }
    let start = chrono::DurationRound::duration_trunc(Utc::now(), chrono::Duration::seconds(1))
        .expect("whole second");
    let mut seen = Vec::new();
    for n in 1..=5i64 {
        let slot = start + chrono::Duration::seconds(2 * n);
        let capture = Capture::new();
        let outcome = capture.run(t.tick(TickKind::Scheduled(slot))).await;
        let events = capture.events();
        seen.push(match outcome {
            TickOutcome::Completed(r) if r.held > 0 => "held".to_owned(),
            TickOutcome::Completed(_) => "completed".to_owned(),
            TickOutcome::Skipped(r) => r.as_str().to_owned(),
            TickOutcome::Failed(e) => panic!("tick {n} failed: {e}\n{events}"),
        });
    }
    assert_eq!(
        seen,
        [
            "completed",
            "held",
            "standing_back",
            "held",
            "standing_back"
        ]
    );
    // `once` never stands back: a manual tick right after a held one runs.
    let (r, _) = tick(&t).await;
    assert_eq!(r.held, 20);
    let (r, _) = tick(&t).await;
    assert_eq!(r.held, 20);
    assert!(all_are(&w.statuses(&fleet), &fleet, "ACTIVE"));
}

/// The value of the unlabelled sample `name` in a `/metrics` text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_metrics_exist_at_zero_from_start_up_and_follow_a_held_tick() {
    use support::live::{http_get, is, run_args, Worker};
    let w = world().await;
    let fleet = ids("p", 3);
    let args = run_args(&w.server, &w.sim, &["--probe-timeout", "300ms"]);
    let worker = Worker::spawn(&args, &[]);
    let address = worker.listening_address();
    let (code, text) = http_get(&address, "/metrics");
    assert_eq!(code, 200, "{text}");
    for name in [
        "keel_scraper_demotions_held",
        "keel_scraper_demotions_held_total",
        "keel_scraper_plugins_blocked_for_failures",
        "keel_scraper_observer_unhealthy_total",
    ] {
        assert_eq!(
            sample(&text, name),
            Some(0.0),
            "{name} at start-up:\n{text}"
        );
    }
    // 3 of 3 failing: limit max(1, floor(0.5 x 3)) = 1, so the demotions are held.
    w.fleet(&fleet).await;
    for id in &fleet {
        w.sim.set(id.as_str(), Behavior::raw(503, "down"));
    }
    let held = worker.wait_event(Duration::from_secs(15), |e| is(e, "demotions_held"));
    assert_eq!(held["count"], 3, "{held}");
    let completed = worker.wait_event(Duration::from_secs(5), |e| {
        is(e, "tick_completed") && e["held"] == 3
    });
    assert_eq!(completed["routes_changed"], 0);
    let (_, text) = http_get(&address, "/metrics");
    assert_eq!(
        sample(&text, "keel_scraper_demotions_held"),
        Some(3.0),
        "{text}"
    );
    assert!(sample(&text, "keel_scraper_demotions_held_total").unwrap_or_default() >= 3.0);
    assert!(all_are(&w.statuses(&fleet), &fleet, "ACTIVE"));
}
