//! The status decision: pure code, no I/O.
//!
//! Given a route's current status, the plugin's consecutive counters and this tick's
//! observation, decide whether the route's status changes. The rules (Keel passes
//! traffic only for `ACTIVE` and `STARTING`):
//! - A reported status that blocks traffic is written at once, and so is a move between
//!   the two passing statuses.
//! - Moving from a blocking status to a passing one needs `healthy_threshold`
//!   consecutive passing reports.
//! - After `unhealthy_threshold` consecutive failed probes a passing route becomes
//!   `FAILED`; a blocking status is left as it is.
//!
//! Invariant (property-tested): after `unhealthy_threshold` consecutive failures the
//! decided status never passes the gate.

use serde::{Deserialize, Serialize};

use crate::status::{status_str_passes_gate, RouteStatus};

/// Consecutive counters of one plugin, kept in the private store across ticks and
/// lock holders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Consecutive failed probes.
    #[serde(default, rename = "f", skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// Consecutive passing reports while the route blocks traffic.
    #[serde(default, rename = "p", skip_serializing_if = "is_zero")]
    pub passing_reports: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Counters {
    pub fn is_zero(&self) -> bool {
        self.failures == 0 && self.passing_reports == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub unhealthy: u32,
    pub healthy: u32,
}

/// What this tick observed of a plugin. A probe cut off by the tick deadline is not an
/// observation and never reaches the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    Reported(RouteStatus),
    ProbeFailed,
}

/// Why a status was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The plugin reported the status.
    Reported,
    /// The plugin reported a passing status `healthy_threshold` times in a row.
    HealthyThreshold,
    /// `unhealthy_threshold` consecutive probes failed.
    UnhealthyThreshold,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Reported => "reported",
            Reason::HealthyThreshold => "healthy_threshold",
            Reason::UnhealthyThreshold => "unhealthy_threshold",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The status to write, when it differs from the current one.
    pub write: Option<(RouteStatus, Reason)>,
    /// The plugin's counters after this observation.
    pub counters: Counters,
}

/// Decides one plugin's route status. `current` is the route's stored status string
/// (anything other than `ACTIVE`/`STARTING` blocks traffic).
pub fn decide(current: &str, before: Counters, obs: Observation, th: Thresholds) -> Decision {
    let current_passes = status_str_passes_gate(current);
    match obs {
        Observation::Reported(reported) => {
            let mut counters = Counters::default();
            let write = if reported.as_str() == current {
                None
            } else if !reported.passes_gate() || current_passes {
                Some((reported, Reason::Reported))
            } else {
                // Blocking -> passing: wait for enough consecutive passing reports.
                let seen = before.passing_reports.saturating_add(1);
                if seen >= th.healthy.max(1) {
                    let reason = if th.healthy > 1 {
                        Reason::HealthyThreshold
                    } else {
                        Reason::Reported
                    };
                    Some((reported, reason))
                } else {
                    counters.passing_reports = seen;
                    None
                }
            };
            Decision { write, counters }
        }
        Observation::ProbeFailed => {
            let failures = before.failures.saturating_add(1);
            let write = (current_passes && failures >= th.unhealthy.max(1))
                .then_some((RouteStatus::Failed, Reason::UnhealthyThreshold));
            Decision {
                write,
                counters: Counters {
                    failures,
                    passing_reports: 0,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation::*;
    use RouteStatus::*;

    const TH: Thresholds = Thresholds {
        unhealthy: 2,
        healthy: 1,
    };

    fn c(failures: u32, passing_reports: u32) -> Counters {
        Counters {
            failures,
            passing_reports,
        }
    }

    /// (current, counters before, observation, thresholds, expected write, counters after)
    type Row = (
        &'static str,
        Counters,
        Observation,
        Thresholds,
        Option<(RouteStatus, Reason)>,
        Counters,
    );

    #[test]
    fn decision_table() {
        // (current, counters before, observation, thresholds, expected write, counters after)
        let h3 = Thresholds {
            unhealthy: 3,
            healthy: 3,
        };
        let rows: Vec<Row> = vec![
            // Same status: nothing to write, counters reset.
            ("ACTIVE", c(1, 0), Reported(Active), TH, None, c(0, 0)),
            // Blocking reports are written at once.
            (
                "ACTIVE",
                c(0, 0),
                Reported(Stopping),
                TH,
                Some((Stopping, Reason::Reported)),
                c(0, 0),
            ),
            (
                "STARTING",
                c(0, 0),
                Reported(Failed),
                TH,
                Some((Failed, Reason::Reported)),
                c(0, 0),
            ),
            (
                "STOPPED",
                c(0, 0),
                Reported(Failed),
                h3,
                Some((Failed, Reason::Reported)),
                c(0, 0),
            ),
            // Moves between the passing statuses are written at once, whatever the threshold.
            (
                "STARTING",
                c(0, 0),
                Reported(Active),
                h3,
                Some((Active, Reason::Reported)),
                c(0, 0),
            ),
            (
                "ACTIVE",
                c(0, 0),
                Reported(Starting),
                h3,
                Some((Starting, Reason::Reported)),
                c(0, 0),
            ),
            // Blocking -> passing needs `healthy` consecutive reports.
            (
                "FAILED",
                c(0, 0),
                Reported(Active),
                TH,
                Some((Active, Reason::Reported)),
                c(0, 0),
            ),
            ("FAILED", c(0, 0), Reported(Active), h3, None, c(0, 1)),
            ("FAILED", c(0, 1), Reported(Starting), h3, None, c(0, 2)),
            (
                "FAILED",
                c(0, 2),
                Reported(Active),
                h3,
                Some((Active, Reason::HealthyThreshold)),
                c(0, 0),
            ),
            // A blocking report in between restarts the count.
            (
                "FAILED",
                c(0, 2),
                Reported(Stopped),
                h3,
                Some((Stopped, Reason::Reported)),
                c(0, 0),
            ),
            // Unknown stored statuses block traffic.
            ("", c(0, 0), Reported(Active), h3, None, c(0, 1)),
            (
                "WEIRD",
                c(0, 0),
                Reported(Stopped),
                TH,
                Some((Stopped, Reason::Reported)),
                c(0, 0),
            ),
            // Failures count up; at the threshold a passing route becomes FAILED.
            ("ACTIVE", c(0, 0), ProbeFailed, TH, None, c(1, 0)),
            (
                "ACTIVE",
                c(1, 0),
                ProbeFailed,
                TH,
                Some((Failed, Reason::UnhealthyThreshold)),
                c(2, 0),
            ),
            (
                "STARTING",
                c(1, 0),
                ProbeFailed,
                TH,
                Some((Failed, Reason::UnhealthyThreshold)),
                c(2, 0),
            ),
            (
                "ACTIVE",
                c(5, 0),
                ProbeFailed,
                TH,
                Some((Failed, Reason::UnhealthyThreshold)),
                c(6, 0),
            ),
            // A blocking status is left as it is.
            ("STOPPED", c(7, 0), ProbeFailed, TH, None, c(8, 0)),
            ("FAILED", c(1, 0), ProbeFailed, TH, None, c(2, 0)),
            // A failure breaks a run of passing reports.
            ("FAILED", c(0, 2), ProbeFailed, h3, None, c(1, 0)),
            // A successful report resets the failure count.
            ("ACTIVE", c(1, 0), Reported(Active), TH, None, c(0, 0)),
        ];
        for (i, (current, before, obs, th, write, after)) in rows.into_iter().enumerate() {
            let d = decide(current, before, obs, th);
            assert_eq!(d.write, write, "row {i}: write");
            assert_eq!(d.counters, after, "row {i}: counters");
        }
    }

    #[test]
    fn unhealthy_threshold_of_one_fails_on_the_first_failed_probe() {
        let th = Thresholds {
            unhealthy: 1,
            healthy: 1,
        };
        let d = decide("ACTIVE", Counters::default(), ProbeFailed, th);
        assert_eq!(d.write, Some((Failed, Reason::UnhealthyThreshold)));
    }

    #[test]
    fn counters_serialize_compactly_and_read_back() {
        let json = serde_json::to_string(&c(2, 0)).unwrap();
        assert_eq!(json, r#"{"f":2}"#);
        let back: Counters = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c(2, 0));
    }
}
