//! The tick's plan: pure code over the whole fleet's observations, no I/O.
//!
//! Each plugin's status is decided by [`decide`]; on top of that the plan applies two
//! fleet-level rules (README: "Mass-failure guard"):
//! - **The observer's own health.** When the worker's own path to the plugins is broken
//!   (its sidecar, or the one host serving every plugin), a guarded failure is not an
//!   observation: no counter moves and nothing is demoted for it.
//! - **The fleet guard.** With U = the unhealthy threshold and `f` a plugin's stored
//!   consecutive failure count, a plugin is *blocked for failures* when its route is
//!   `FAILED` with U <= f < U + W (W = the guard window in ticks). E = the plugins whose
//!   route passes the gate or is blocked for failures; B = the plugins in E blocked for
//!   failures plus this tick's guarded demotions. If B > max(1, floor(share x |E|))
//!   (exact, in integer thousandths), every guarded demotion is held: not written, its
//!   counters still counting.
//!
//! A *guarded failure* is any failed probe except `plugin_error` (the plugin's own report,
//! like a reported status: never held and still applied when the observer is unhealthy).
//!
//! Invariant (property-tested): B <= max(1, floor(share x |E|)) or the plan writes no
//! guarded demotion; reported statuses are decided exactly as [`decide`] decides them.

use crate::decision::{decide, Counters, Decision, Observation, Reason, Thresholds};
use crate::status::{status_str_passes_gate, ErrorKind, RouteStatus};

/// How many ids a held guard names in its event.
pub const HELD_IDS_SHOWN: usize = 5;

/// What this tick saw of one plugin whose route was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The plugin reported a status.
    Reported(RouteStatus),
    /// The probe ran its course and failed with this kind.
    Failed(ErrorKind),
    /// The probe was cut off at the deadline: no observation.
    CutOff,
}

impl Seen {
    /// A failed probe other than the plugin's own `plugin_error`.
    pub fn is_guarded_failure(self) -> bool {
        matches!(self, Seen::Failed(k) if k != ErrorKind::PluginError)
    }
}

/// One plugin going into the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanInput<'a> {
    pub id: &'a str,
    /// The route's stored status at tick start.
    pub current: &'a str,
    /// The stored consecutive counters at tick start.
    pub before: Counters,
    pub seen: Seen,
}

/// The fleet-level rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    pub thresholds: Thresholds,
    /// `--max-failed-share` in thousandths, 1..=1000; 1000 turns the guard off.
    pub max_failed_share_milli: u32,
    /// W: `--guard-window` over the schedule's interval, in ticks.
    pub window_ticks: u32,
}

impl Rules {
    /// The guard off (share 1), as a fleet of any size.
    pub fn unguarded(thresholds: Thresholds) -> Rules {
        Rules {
            thresholds,
            max_failed_share_milli: 1000,
            window_ticks: 0,
        }
    }

    /// Whether a plugin is blocked for failures: route `FAILED` with U <= f < U + W.
    pub fn blocked_for_failures(&self, current: &str, before: Counters) -> bool {
        let u = self.thresholds.unhealthy.max(1);
        current == RouteStatus::Failed.as_str()
            && before.failures >= u
            && before.failures < u.saturating_add(self.window_ticks)
    }

    /// max(1, floor(share x eligible)), exactly.
    pub fn limit(&self, eligible: u64) -> u64 {
        (u64::from(self.max_failed_share_milli) * eligible / 1000).max(1)
    }
}

/// What the plan decided for one plugin, in the order of the inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The observation the decision came from; `None` when there was none (cut off, or a
    /// guarded failure while the observer is unhealthy): the counters stay as they were.
    pub obs: Option<Observation>,
    pub decision: Decision,
    /// A guarded demotion the fleet guard held.
    pub held: bool,
}

/// The fleet guard's figures for this tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fleet {
    /// |E|.
    pub eligible: u64,
    /// B.
    pub blocked: u64,
    /// max(1, floor(share x |E|)).
    pub limit: u64,
    /// The plugins in E blocked for failures at tick start.
    pub blocked_for_failures: u64,
    /// Guarded demotions held (0 when the guard did not hold).
    pub held: u64,
    /// The first [`HELD_IDS_SHOWN`] held ids, in input order.
    pub held_ids: Vec<String>,
    /// The error kinds of the held demotions, sorted, each once.
    pub held_kinds: Vec<&'static str>,
}

impl Fleet {
    /// B / |E| in thousandths (what the share would have reached).
    pub fn share_milli(&self) -> u64 {
        (self.blocked * 1000)
            .checked_div(self.eligible)
            .unwrap_or(0)
    }
}

/// The whole tick's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub plugins: Vec<Planned>,
    pub fleet: Fleet,
}

/// Plans one tick. `observer_healthy` false: guarded failures are not observations.
pub fn plan(inputs: &[PlanInput<'_>], rules: Rules, observer_healthy: bool) -> Plan {
    let th = rules.thresholds;
    let mut plugins: Vec<Planned> = inputs
        .iter()
        .map(|p| {
            let obs = match p.seen {
                Seen::CutOff => None,
                Seen::Failed(_) if p.seen.is_guarded_failure() && !observer_healthy => None,
                Seen::Failed(_) => Some(Observation::ProbeFailed),
                Seen::Reported(s) => Some(Observation::Reported(s)),
            };
            let decision = match obs {
                Some(obs) => decide(p.current, p.before, obs, th),
                None => Decision {
                    write: None,
                    counters: p.before,
                },
            };
            Planned {
                obs,
                decision,
                held: false,
            }
        })
        .collect();

    let mut fleet = Fleet::default();
    let mut demotions = Vec::new();
    for (i, (p, planned)) in inputs.iter().zip(&plugins).enumerate() {
        if p.seen == Seen::CutOff {
            continue;
        }
        let blocked = rules.blocked_for_failures(p.current, p.before);
        if status_str_passes_gate(p.current) || blocked {
            fleet.eligible += 1;
        }
        if blocked {
            fleet.blocked_for_failures += 1;
        }
        if p.seen.is_guarded_failure() && is_demotion(&planned.decision) {
            demotions.push(i);
        }
    }
    fleet.blocked = fleet.blocked_for_failures + demotions.len() as u64;
    fleet.limit = rules.limit(fleet.eligible);
    if fleet.blocked > fleet.limit && !demotions.is_empty() {
        fleet.held = demotions.len() as u64;
        for &i in &demotions {
            let (input, planned) = (&inputs[i], &mut plugins[i]);
            planned.decision.write = None;
            planned.held = true;
            if fleet.held_ids.len() < HELD_IDS_SHOWN {
                fleet.held_ids.push(input.id.to_string());
            }
            if let Seen::Failed(k) = input.seen {
                fleet.held_kinds.push(k.as_str());
            }
        }
        fleet.held_kinds.sort_unstable();
        fleet.held_kinds.dedup();
    }
    Plan { plugins, fleet }
}

/// Thousandths as a short decimal: 500 -> `0.5`, 1000 -> `1`, 333 -> `0.333`.
pub fn share_text(milli: u64) -> String {
    let frac = format!("{:03}", milli % 1000);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{}", milli / 1000)
    } else {
        format!("{}.{frac}", milli / 1000)
    }
}

fn is_demotion(d: &Decision) -> bool {
    matches!(
        d.write,
        Some((RouteStatus::Failed, Reason::UnhealthyThreshold))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorKind::*;
    use RouteStatus::*;

    const TH: Thresholds = Thresholds {
        unhealthy: 2,
        healthy: 1,
    };

    fn rules(share_milli: u32, window: u32) -> Rules {
        Rules {
            thresholds: TH,
            max_failed_share_milli: share_milli,
            window_ticks: window,
        }
    }

    fn c(f: u32) -> Counters {
        Counters {
            failures: f,
            passing_reports: 0,
        }
    }

    /// `n` plugins `ACTIVE` with `f` failures before, all seeing `seen`.
    fn fleet(
        ids: &mut Vec<String>,
        n: usize,
        current: &'static str,
        f: u32,
        seen: Seen,
    ) -> Vec<(usize, &'static str, Counters, Seen)> {
        let start = ids.len();
        for i in 0..n {
            ids.push(format!("p{}", start + i));
        }
        (start..start + n)
            .map(|i| (i, current, c(f), seen))
            .collect()
    }

    fn inputs<'a>(
        ids: &'a [String],
        rows: &[(usize, &'static str, Counters, Seen)],
    ) -> Vec<PlanInput<'a>> {
        rows.iter()
            .map(|&(i, current, before, seen)| PlanInput {
                id: &ids[i],
                current,
                before,
                seen,
            })
            .collect()
    }

    fn demoted(p: &Plan) -> usize {
        p.plugins
            .iter()
            .filter(|x| is_demotion(&x.decision))
            .count()
    }

    /// (name, groups of (count, current, f before, seen), share, window, observer healthy,
    ///  expected: demotions written, held, |E|, B, limit)
    type Row = (
        &'static str,
        Vec<(usize, &'static str, u32, Seen)>,
        u32,
        u32,
        bool,
        (usize, u64, u64, u64, u64),
    );

    #[test]
    fn guard_table() {
        let timeout = Seen::Failed(Timeout);
        let ok = Seen::Reported(Active);
        let rows: Vec<Row> = vec![
            // 20 ACTIVE all failing at their second failure: 20 > 10, held.
            (
                "all fail",
                vec![(20, "ACTIVE", 1, timeout)],
                500,
                180,
                true,
                (0, 20, 20, 20, 10),
            ),
            // The guard off: all 20 blocked.
            (
                "share 1",
                vec![(20, "ACTIVE", 1, timeout)],
                1000,
                180,
                true,
                (20, 0, 20, 20, 20),
            ),
            // 2 of 20: blocked as today.
            (
                "2 of 20",
                vec![(2, "ACTIVE", 1, timeout), (18, "ACTIVE", 0, ok)],
                500,
                180,
                true,
                (2, 0, 20, 2, 10),
            ),
            // 8 of 20 at once: 8 <= 10, blocked.
            (
                "8 of 20",
                vec![(8, "ACTIVE", 1, timeout), (12, "ACTIVE", 0, ok)],
                500,
                180,
                true,
                (8, 0, 20, 8, 10),
            ),
            // Then 4 more with the 8 blocked for failures: 12 > 10, held.
            (
                "8 then 4",
                vec![
                    (8, "FAILED", 2, timeout),
                    (4, "ACTIVE", 1, timeout),
                    (8, "ACTIVE", 0, ok),
                ],
                500,
                180,
                true,
                (0, 4, 20, 12, 10),
            ),
            // 10 long dead (past the window) and 10 live, one new death: blocked.
            (
                "long dead age out",
                vec![
                    (10, "FAILED", 500, timeout),
                    (1, "ACTIVE", 1, timeout),
                    (9, "ACTIVE", 0, ok),
                ],
                500,
                180,
                true,
                (1, 0, 10, 1, 5),
            ),
            // The same 10 dead still inside the window: 11 > 10, held.
            (
                "recent dead count",
                vec![
                    (10, "FAILED", 3, timeout),
                    (1, "ACTIVE", 1, timeout),
                    (9, "ACTIVE", 0, ok),
                ],
                500,
                180,
                true,
                (0, 1, 20, 11, 10),
            ),
            // A fleet of one and of two: a dead plugin is blocked (limit at least 1).
            (
                "fleet of 1",
                vec![(1, "ACTIVE", 1, timeout)],
                500,
                180,
                true,
                (1, 0, 1, 1, 1),
            ),
            (
                "fleet of 2",
                vec![(1, "ACTIVE", 1, timeout), (1, "ACTIVE", 0, ok)],
                500,
                180,
                true,
                (1, 0, 2, 1, 1),
            ),
            // Exactly at the limit is not above it.
            (
                "at the limit",
                vec![(10, "ACTIVE", 1, timeout), (10, "ACTIVE", 0, ok)],
                500,
                180,
                true,
                (10, 0, 20, 10, 10),
            ),
            // Thousandths are exact: 0.333 x 3 = 0.999 -> floor 0 -> limit 1.
            (
                "thousandths",
                vec![(2, "ACTIVE", 1, timeout), (1, "ACTIVE", 0, ok)],
                333,
                180,
                true,
                (0, 2, 3, 2, 1),
            ),
            // plugin_error is the plugin's own report: never held.
            (
                "plugin_error",
                vec![(20, "ACTIVE", 1, Seen::Failed(PluginError))],
                500,
                180,
                true,
                (20, 0, 20, 0, 10),
            ),
            // Admin-stopped plugins are in neither E nor B.
            (
                "stopped out of E",
                vec![
                    (10, "STOPPED", 3, timeout),
                    (1, "ACTIVE", 1, timeout),
                    (1, "ACTIVE", 0, ok),
                ],
                500,
                180,
                true,
                (1, 0, 2, 1, 1),
            ),
            // Cut-off probes are in neither E nor B.
            (
                "cut off",
                vec![
                    (30, "ACTIVE", 1, Seen::CutOff),
                    (1, "ACTIVE", 1, timeout),
                    (1, "ACTIVE", 0, ok),
                ],
                500,
                180,
                true,
                (1, 0, 2, 1, 1),
            ),
            // The observer unhealthy: no guarded failure is an observation.
            (
                "observer",
                vec![(20, "ACTIVE", 1, Seen::Failed(Connect))],
                1000,
                180,
                false,
                (0, 0, 20, 0, 20),
            ),
            // Window 0: no plugin is blocked for failures.
            (
                "window 0",
                vec![(10, "FAILED", 2, timeout), (1, "ACTIVE", 1, timeout)],
                500,
                0,
                true,
                (1, 0, 1, 1, 1),
            ),
        ];
        for (name, groups, share, window, healthy, want) in rows {
            let mut ids = Vec::new();
            let mut all = Vec::new();
            for (n, current, f, seen) in groups {
                all.extend(fleet(&mut ids, n, current, f, seen));
            }
            let input = inputs(&ids, &all);
            let p = plan(&input, rules(share, window), healthy);
            let got = (
                demoted(&p),
                p.fleet.held,
                p.fleet.eligible,
                p.fleet.blocked,
                p.fleet.limit,
            );
            assert_eq!(got, want, "{name}: (demoted, held, |E|, B, limit)");
            assert_eq!(
                p.plugins.iter().filter(|x| x.held).count() as u64,
                p.fleet.held,
                "{name}: held flags"
            );
        }
    }

    #[test]
    fn shares_print_short() {
        for (milli, text) in [
            (500, "0.5"),
            (1000, "1"),
            (333, "0.333"),
            (50, "0.05"),
            (0, "0"),
        ] {
            assert_eq!(share_text(milli), text);
        }
    }

    #[test]
    fn held_demotions_keep_counting_and_reports_still_apply() {
        let ids: Vec<String> = (0..22).map(|i| format!("p{i}")).collect();
        let mut input: Vec<PlanInput> = ids[..20]
            .iter()
            .map(|id| PlanInput {
                id,
                current: "ACTIVE",
                before: c(1),
                seen: Seen::Failed(Timeout),
            })
            .collect();
        input.push(PlanInput {
            id: &ids[20],
            current: "ACTIVE",
            before: c(0),
            seen: Seen::Reported(Stopped),
        });
        input.push(PlanInput {
            id: &ids[21],
            current: "FAILED",
            before: c(0),
            seen: Seen::Reported(Active),
        });
        let p = plan(&input, rules(500, 180), true);
        assert_eq!(p.fleet.held, 20);
        for x in &p.plugins[..20] {
            assert!(x.held);
            assert_eq!(x.decision.write, None);
            assert_eq!(x.decision.counters, c(2));
        }
        assert_eq!(
            p.plugins[20].decision.write,
            Some((Stopped, Reason::Reported))
        );
        assert_eq!(
            p.plugins[21].decision.write,
            Some((Active, Reason::Reported))
        );
        assert_eq!(p.fleet.held_ids, vec!["p0", "p1", "p2", "p3", "p4"]);
        assert_eq!(p.fleet.held_kinds, vec!["timeout"]);
        assert_eq!(p.fleet.share_milli(), 20 * 1000 / 21);
    }

    #[test]
    fn an_unhealthy_observer_moves_no_counter_but_applies_reports() {
        let input = [
            PlanInput {
                id: "a",
                current: "ACTIVE",
                before: c(1),
                seen: Seen::Failed(Connect),
            },
            PlanInput {
                id: "b",
                current: "ACTIVE",
                before: c(0),
                seen: Seen::Reported(Stopping),
            },
            PlanInput {
                id: "c",
                current: "ACTIVE",
                before: c(1),
                seen: Seen::Failed(PluginError),
            },
        ];
        let p = plan(&input, rules(1000, 0), false);
        assert_eq!(p.plugins[0].obs, None);
        assert_eq!(p.plugins[0].decision.counters, c(1));
        assert_eq!(p.plugins[0].decision.write, None);
        assert_eq!(
            p.plugins[1].decision.write,
            Some((Stopping, Reason::Reported))
        );
        assert_eq!(
            p.plugins[2].decision.write,
            Some((Failed, Reason::UnhealthyThreshold))
        );
    }
}
