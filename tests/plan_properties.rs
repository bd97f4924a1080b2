//! Property test of the tick's plan over random fleets and outcomes: after any tick,
//! B <= max(1, floor(share x |E|)) or the tick wrote no guarded demotion; reported
//! statuses (and `plugin_error`) are decided exactly as `decide` decides them; a held or
//! unobserved failure writes nothing and keeps counting (or keeps the count) as specified.

use keel_scraper::decision::{decide, Counters, Observation, Reason, Thresholds};
use keel_scraper::plan::{plan, PlanInput, Rules, Seen};
use keel_scraper::status::{ErrorKind, RouteStatus};
use proptest::prelude::*;

const CURRENT: [&str; 7] = [
    "ACTIVE", "STARTING", "FAILED", "STOPPED", "STOPPING", "", "WEIRD",
];

fn seen() -> impl Strategy<Value = Seen> {
    prop_oneof![
        (0..RouteStatus::ALL.len()).prop_map(|i| Seen::Reported(RouteStatus::ALL[i])),
        (0..ErrorKind::ALL.len()).prop_map(|i| Seen::Failed(ErrorKind::ALL[i])),
        Just(Seen::CutOff),
    ]
}

fn plugin() -> impl Strategy<Value = (usize, u32, u32, Seen)> {
    (0..CURRENT.len(), 0u32..60, 0u32..4, seen())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn the_guard_bounds_b_and_reports_are_decided_as_decide_decides(
        fleet in prop::collection::vec(plugin(), 0..40),
        share in 1u32..=1000,
        window in 0u32..40,
        unhealthy in 1u32..5,
        healthy in 1u32..4,
        observer_healthy in any::<bool>(),
    ) {
        let th = Thresholds { unhealthy, healthy };
        let rules = Rules { thresholds: th, max_failed_share_milli: share, window_ticks: window };
        let ids: Vec<String> = (0..fleet.len()).map(|i| format!("p{i}")).collect();
        let inputs: Vec<PlanInput> = fleet
            .iter()
            .zip(&ids)
            .map(|(&(c, f, p, seen), id)| PlanInput {
                id,
                current: CURRENT[c],
                before: Counters { failures: f, passing_reports: p },
                seen,
            })
            .collect();
        let out = plan(&inputs, rules, observer_healthy);
        prop_assert_eq!(out.plugins.len(), inputs.len());

        // E and B from the definitions, independently of the plan.
        let mut eligible = 0u64;
        let mut blocked = 0u64;
        let mut demotions_written = 0u64;
        for (p, planned) in inputs.iter().zip(&out.plugins) {
            if p.seen == Seen::CutOff {
                continue;
            }
            let f = p.before.failures;
            let bff = p.current == "FAILED" && f >= unhealthy && f < unhealthy + window;
            if bff || p.current == "ACTIVE" || p.current == "STARTING" {
                eligible += 1;
            }
            if bff {
                blocked += 1;
            }
            let guarded = matches!(p.seen, Seen::Failed(k) if k != ErrorKind::PluginError);
            if guarded
                && planned.decision.write == Some((RouteStatus::Failed, Reason::UnhealthyThreshold))
            {
                demotions_written += 1;
            }
        }
        let limit = (u64::from(share) * eligible / 1000).max(1);
        prop_assert!(
            demotions_written == 0 || blocked + demotions_written <= limit,
            "B {} > limit {} with {} guarded demotions written",
            blocked + demotions_written, limit, demotions_written
        );
        prop_assert_eq!(out.fleet.eligible, eligible);
        prop_assert_eq!(out.fleet.limit, limit);

        for (p, planned) in inputs.iter().zip(&out.plugins) {
            match p.seen {
                Seen::Reported(s) => {
                    prop_assert_eq!(planned.decision, decide(p.current, p.before, Observation::Reported(s), th));
                    prop_assert!(!planned.held);
                }
                Seen::Failed(ErrorKind::PluginError) => {
                    prop_assert_eq!(planned.decision, decide(p.current, p.before, Observation::ProbeFailed, th));
                    prop_assert!(!planned.held);
                }
                Seen::Failed(_) if !observer_healthy => {
                    prop_assert_eq!(planned.decision.write, None);
                    prop_assert_eq!(planned.decision.counters, p.before);
                }
                Seen::Failed(_) => {
                    let d = decide(p.current, p.before, Observation::ProbeFailed, th);
                    prop_assert_eq!(planned.decision.counters, d.counters);
                    if planned.held {
                        prop_assert_eq!(planned.decision.write, None);
                        prop_assert!(d.write.is_some());
                    } else {
                        prop_assert_eq!(planned.decision.write, d.write);
                    }
                }
                Seen::CutOff => {
                    prop_assert_eq!(planned.decision.write, None);
                    prop_assert_eq!(planned.decision.counters, p.before);
                }
            }
        }
    }
}
