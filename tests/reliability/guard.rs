//! Scenario 10: a blind holder stands back. Two `run` replicas on a 1 s schedule, each
//! probing the plugins through its own TCP proxy, the standby's clock 0.4 s behind so the
//! other fires first and wins every race; the first one's proxy is closed (its
//! path to the plugins cut, its store left up) while the other's stays open, and one plugin
//! really dies meanwhile. Figures: routes wrongly demoted (must be 0), ticks until the
//! standby scrapes (at most 2), and whether the real death was blocked by the standby.

use std::time::Duration;

use keel_test_support::sim::Behavior;

use crate::bounded;
use crate::figures::Scenario;
use crate::harness::{wait_until, Spec};
use crate::replicas::wait_ticking;
use crate::support::proxy::Proxy;
use crate::world::{ids, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blind_holder_stands_back_and_the_standby_scrapes() {
    let mut sc = Scenario::start("10-blind-holder-stands-back");
    bounded(Duration::from_secs(90), async {
        let w = World::start(false).await;
        let plugins = ids("g", 10);
        w.seed(&plugins, "ACTIVE").await;
        let sim_host = w.sim.url_template()["http://".len()..]
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let blind_proxy = Proxy::start(&sim_host).await;
        let standby_proxy = Proxy::start(&sim_host).await;
        let spec = |name: &str, proxy: &Proxy| {
            Spec::run(name)
                .redis(
                    &w.redis.url(),
                    &format!("http://{}/{{plugin_id}}/v1/status", proxy.address()),
                )
                .schedule("* * * * * *")
                .args(&[
                    "--max-failed-share",
                    "0.5",
                    "--probe-timeout",
                    "300ms",
                    "--retries",
                    "0",
                ])
        };
        // The standby's wall clock runs 0.4 s behind (faketime): the blind replica fires
        // first and would win every race for the lease.
        let replicas = vec![
            spec("blind", &blind_proxy).spawn(&w.journal),
            spec("standby", &standby_proxy)
                .faketime("-0.4")
                .spawn(&w.journal),
        ];
        wait_ticking(&w.journal, &replicas).await;

        // Cut the blind replica's path; a plugin really dies at the same time.
        blind_proxy.close();
        w.sim.set("g09", Behavior::raw(503, "down"));
        let cut = chrono::Utc::now();
        let first_after = crate::harness::slot_at_or_after(cut, 1);

        // The real death is blocked by the standby (U = 2 of its own observations).
        wait_until(Duration::from_secs(20), "g9 FAILED", &w.journal, || {
            w.journal
                .named("plugin_status_changed")
                .into_iter()
                .find(|e| e.str("plugin_id") == "g09" && e.str("to") == "FAILED")
        })
        .await;
        // A few more ticks of the blind replica standing back.
        tokio::time::sleep(Duration::from_secs(3)).await;

        let statuses = w.statuses(&plugins).await;
        let wrongly = plugins[..9]
            .iter()
            .filter(|id| statuses[*id] != "ACTIVE")
            .count();
        let standby_first = w
            .journal
            .of("standby", "tick_completed")
            .into_iter()
            .map(|e| e.tick())
            .find(|t| *t >= first_after)
            .expect("the standby completed a tick after the cut");
        let waited = (standby_first - first_after).num_seconds() + 1;
        let stood_back = w
            .journal
            .of("blind", "tick_skipped")
            .into_iter()
            .filter(|e| e.str("reason") == "standing_back")
            .count();
        let unhealthy = w.journal.of("blind", "observer_unhealthy").len();
        let blind_wrote = w
            .journal
            .of("blind", "plugin_status_changed")
            .into_iter()
            .filter(|e| e.wall >= cut)
            .count();
        let blind_completed = w
            .journal
            .of("blind", "tick_completed")
            .into_iter()
            .filter(|e| e.tick() >= first_after)
            .count();
        sc.figure("routes wrongly demoted", wrongly);
        sc.figure("ticks until the standby scraped", waited);
        sc.figure("blind replica observer_unhealthy ticks", unhealthy);
        sc.figure("blind replica ticks stood back", stood_back);
        sc.figure("real death blocked by", "standby");
        assert_eq!(wrongly, 0, "{statuses:?}\n{}", w.journal.tail(40));
        assert!(
            waited <= 2,
            "the standby waited {waited} ticks\n{}",
            w.journal.tail(40)
        );
        // Cut off, the blind replica completes no tick: each one it wins fails with
        // observer_unhealthy, and after it the replica stands back.
        assert_eq!(blind_completed, 0, "{}", w.journal.tail(40));
        assert!(
            unhealthy >= 1,
            "the blind replica never ticked\n{}",
            w.journal.tail(40)
        );
        assert!(
            stood_back >= 1,
            "the blind replica never stood back\n{}",
            w.journal.tail(40)
        );
        assert_eq!(
            blind_wrote,
            0,
            "the blind replica wrote a route\n{}",
            w.journal.tail(40)
        );
        assert_eq!(statuses["g09"], "FAILED");
        w.figure_no_secrets(&mut sc);
    })
    .await;
    sc.pass();
}
