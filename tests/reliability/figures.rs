//! The figures each scenario measured, printed where a plain `cargo test` shows them.
//!
//! Each scenario holds a [`Scenario`] and adds figures as it measures them. When the
//! scenario ends, passing or failing, its rows go to the process's standard error as
//! `reliability|<scenario>|<figure>|<value>`. They are written to the stderr file
//! descriptor directly, not through `eprintln!`, which the test harness captures: the
//! figures are part of the suite's result, not debugging output. When the last scenario of
//! [`SCENARIOS`] ends, the whole table is printed once more as a summary.

use std::fmt::Display;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Every scenario of the suite, in the order of the summary table. A scenario not listed
/// here still prints its own rows; the summary waits for all of these.
pub const SCENARIOS: &[&str] = &[
    "1-three-replicas-redis",
    "1d-three-replicas-dapr",
    "2-sigkill-holder",
    "2p-sigstop-holder",
    "2n-network-stall-holder",
    "3-sigterm-holder",
    "4-redis-outage",
    "5-concurrent-editor",
    "6-unregister-while-ticking",
    "7-hostile-plugins",
    "8-clock-skew",
    "8b-clock-skew-short-lease",
    "s-secrets-in-one-shot-commands",
];

struct Finished {
    name: &'static str,
    verdict: &'static str,
    rows: Vec<(String, String)>,
}

static FINISHED: Mutex<Vec<Finished>> = Mutex::new(Vec::new());

/// One scenario's figures; printed when dropped.
pub struct Scenario {
    name: &'static str,
    started: Instant,
    rows: Vec<(String, String)>,
    passed: bool,
}

impl Scenario {
    pub fn start(name: &'static str) -> Scenario {
        Scenario {
            name,
            started: Instant::now(),
            rows: Vec::new(),
            passed: false,
        }
    }

    /// Runs scenario `name`: `body` within `bound_secs` seconds ([`crate::bounded`]),
    /// then [`Scenario::pass`] when it returns.
    pub async fn run(name: &'static str, bound_secs: u64, body: impl AsyncFnOnce(&mut Scenario)) {
        let mut sc = Scenario::start(name);
        crate::bounded(Duration::from_secs(bound_secs), body(&mut sc)).await;
        sc.pass();
    }

    /// Marks the scenario passed: called as its last statement, so a scenario that
    /// panicked or was cut off by its time bound is reported `FAIL`.
    pub fn pass(&mut self) {
        self.passed = true;
    }

    /// Records a figure (a later value for the same name replaces the earlier one).
    pub fn figure(&mut self, name: &str, value: impl Display) {
        let value = value.to_string();
        match self.rows.iter_mut().find(|(n, _)| n == name) {
            Some(row) => row.1 = value,
            None => self.rows.push((name.to_owned(), value)),
        }
    }
}

fn write_stderr(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let verdict = if self.passed && !std::thread::panicking() {
            "pass"
        } else {
            "FAIL"
        };
        self.figure(
            "duration",
            format!("{:.1} s", self.started.elapsed().as_secs_f64()),
        );
        self.figure("result", verdict);
        let mut text = String::new();
        for (figure, value) in &self.rows {
            text.push_str(&format!("reliability|{}|{figure}|{value}\n", self.name));
        }
        write_stderr(&text);
        let mut finished = FINISHED.lock().unwrap_or_else(|e| e.into_inner());
        finished.push(Finished {
            name: self.name,
            verdict,
            rows: std::mem::take(&mut self.rows),
        });
        if SCENARIOS
            .iter()
            .all(|s| finished.iter().any(|f| f.name == *s))
        {
            write_stderr(&summary(&finished));
        }
    }
}

fn summary(finished: &[Finished]) -> String {
    let width = SCENARIOS.iter().map(|s| s.len()).max().unwrap_or(10);
    let mut out = format!(
        "reliability|==== summary ====\nreliability|{:<width$} | result | figures\n",
        "scenario"
    );
    for name in SCENARIOS {
        let Some(f) = finished.iter().find(|f| f.name == *name) else {
            continue;
        };
        let figures = f
            .rows
            .iter()
            .filter(|(n, _)| n != "result")
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        out.push_str(&format!(
            "reliability|{:<width$} | {:<6} | {figures}\n",
            f.name, f.verdict
        ));
    }
    out
}
