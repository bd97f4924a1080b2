//! Support for the scale benchmark: the `wrk` limit, sample statistics, the machine
//! description and the result table. Child processes and Redis come from the
//! `keel-test-support` crate, shared with the tests.

pub mod daprd;
pub mod wrk;

use std::fmt::Write as _;
use std::time::Duration;

/// Median, minimum and maximum of a non-empty sample.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for an empty sample.
    pub fn of(sample: &[f64]) -> Option<Stats> {
        let mut s: Vec<f64> = sample.to_vec();
        s.sort_by(f64::total_cmp);
        let (min, max) = (*s.first()?, *s.last()?);
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 1 {
            s[mid]
        } else {
            (s[mid - 1] + s[mid]) / 2.0
        };
        Some(Stats { median, min, max })
    }

    pub fn of_durations(sample: &[Duration]) -> Option<Stats> {
        Stats::of(&sample.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())
    }
}

/// What a row is checked against.
#[derive(Clone, Debug)]
pub enum Target {
    /// Informational only.
    None,
    /// The row's ratio must be at most this.
    RatioAtMost(f64),
    /// The row's worst value must be at most this many seconds.
    MaxAtMost(f64),
    /// The row's median must be at most this many seconds.
    MedianAtMost(f64),
    /// The row's worst value must be at most this many MiB.
    MibAtMost(f64),
}

/// How a row's values print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Mib,
    PerSecond,
    /// A share of the time, printed as a percentage.
    Fraction,
    /// A ratio of two figures, printed as a factor.
    Factor,
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub n: Option<usize>,
    pub unit: Unit,
    pub stats: Option<Stats>,
    /// The limit the value is compared with, in the row's unit.
    pub limit: Option<f64>,
    pub ratio: Option<f64>,
    pub target: Target,
    /// Set when the row could not be measured (the reason is printed).
    pub skipped: Option<String>,
    /// For a row merged from repetitions: in how many the target held, of how many.
    pub held: Option<(usize, usize)>,
}

impl Row {
    pub fn new(name: impl Into<String>, n: Option<usize>, unit: Unit, stats: Option<Stats>) -> Row {
        Row {
            name: name.into(),
            n,
            unit,
            stats,
            limit: None,
            ratio: None,
            target: Target::None,
            skipped: None,
            held: None,
        }
    }

    pub fn skipped(name: impl Into<String>, n: Option<usize>, why: impl Into<String>) -> Row {
        let mut row = Row::new(name, n, Unit::Seconds, None);
        row.skipped = Some(why.into());
        row
    }

    pub fn target(mut self, target: Target) -> Row {
        self.target = target;
        self
    }

    /// `Some(true)` when the row meets its target (in every repetition, for a merged
    /// row), `None` when it has none.
    pub fn pass(&self) -> Option<bool> {
        if let Some((held, of)) = self.held {
            return Some(held == of);
        }
        self.own_pass()
    }

    /// The target checked against this row's own figures.
    fn own_pass(&self) -> Option<bool> {
        let stats = self.stats?;
        match self.target {
            Target::None => None,
            Target::RatioAtMost(t) => Some(self.ratio? <= t),
            Target::MaxAtMost(t) | Target::MibAtMost(t) => Some(stats.max <= t),
            Target::MedianAtMost(t) => Some(stats.median <= t),
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::None => "-".into(),
            Target::RatioAtMost(t) => format!("ratio <= {t}"),
            Target::MaxAtMost(t) => format!("max <= {}", fmt_value(t, Unit::Seconds)),
            Target::MedianAtMost(t) => format!("median < {}", fmt_value(t, Unit::Seconds)),
            Target::MibAtMost(t) => format!("<= {t} MiB"),
        }
    }
}

fn fmt_value(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Seconds if v < 1e-3 => format!("{:.1} µs", v * 1e6),
        Unit::Seconds if v < 1.0 => format!("{:.1} ms", v * 1e3),
        Unit::Seconds => format!("{v:.3} s"),
        Unit::Mib => format!("{v:.1} MiB"),
        Unit::PerSecond => format!("{v:.0}/s"),
        Unit::Fraction => format!("{:.0}%", v * 100.0),
        Unit::Factor => format!("{v:.2} x"),
    }
}

/// Merges the rows of independent repetitions (each the same rows in the same order):
/// a row's figure is the median of the repetitions' medians, its spread the lowest and
/// highest of those medians (the worst value for a row checked by its worst), its ratio
/// the median of theirs, and its target holds only if it held in every repetition.
pub fn merge(sets: &[Vec<Row>]) -> anyhow::Result<Vec<Row>> {
    let Some(first) = sets.first() else {
        anyhow::bail!("no repetition to merge");
    };
    let mut out = Vec::with_capacity(first.len());
    for (i, row) in first.iter().enumerate() {
        let same: Vec<&Row> = sets.iter().filter_map(|set| set.get(i)).collect();
        if same.len() != sets.len() || same.iter().any(|r| r.name != row.name || r.n != row.n) {
            anyhow::bail!("the repetitions measured different rows at {:?}", row.name);
        }
        let mut merged = row.clone();
        let medians: Vec<f64> = same
            .iter()
            .filter_map(|r| r.stats.map(|s| s.median))
            .collect();
        let worst: Vec<f64> = same.iter().filter_map(|r| r.stats.map(|s| s.max)).collect();
        merged.stats = Stats::of(&medians).map(|m| match row.target {
            Target::MaxAtMost(_) | Target::MibAtMost(_) => Stats {
                max: worst.iter().copied().fold(m.max, f64::max),
                ..m
            },
            _ => m,
        });
        let of = |f: fn(&Row) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = same.iter().filter_map(|r| f(r)).collect();
            Stats::of(&v).map(|s| s.median)
        };
        merged.limit = of(|r| r.limit);
        merged.ratio = of(|r| r.ratio);
        let checked: Vec<bool> = same.iter().filter_map(|r| r.own_pass()).collect();
        // A repetition that could not check the target does not count as holding it.
        merged.held =
            (!checked.is_empty()).then(|| (checked.iter().filter(|p| **p).count(), same.len()));
        out.push(merged);
    }
    Ok(out)
}

/// The result table, one line per row.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "measurement",
        "N",
        "median",
        "spread",
        "limit",
        "ratio",
        "target",
        "result",
    ];
    let mut lines: Vec<[String; 8]> = Vec::new();
    for r in rows {
        let n = r.n.map_or("-".into(), |n| n.to_string());
        if let Some(why) = &r.skipped {
            lines.push([
                r.name.clone(),
                n,
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                r.target_text(),
                format!("SKIPPED ({why})"),
            ]);
            continue;
        }
        let (median, spread) = match r.stats {
            Some(s) => (
                fmt_value(s.median, r.unit),
                format!("{}..{}", fmt_value(s.min, r.unit), fmt_value(s.max, r.unit)),
            ),
            None => ("-".into(), "-".into()),
        };
        lines.push([
            r.name.clone(),
            n,
            median,
            spread,
            r.limit.map_or("-".into(), |l| fmt_value(l, r.unit)),
            r.ratio.map_or("-".into(), |x| format!("{x:.2}")),
            r.target_text(),
            match (r.pass(), r.held) {
                (None, _) => "-".into(),
                (Some(true), _) => "PASS".into(),
                (Some(false), Some((held, of))) => format!("FAIL (held in {held} of {of})"),
                (Some(false), None) => "FAIL".into(),
            },
        ]);
    }
    let mut widths = header.map(str::len);
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut put = |cells: &[String]| {
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str(" | ");
            }
            let _ = write!(line, "{cell:<w$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    put(&header.map(String::from));
    put(&widths.map(|w| "-".repeat(w)));
    for l in &lines {
        put(l);
    }
    out
}

/// `nproc`, the CPU model, memory and the kernel, for the record.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_owned(), |(_, m)| m.trim().to_owned());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores (nproc), CPU {model}, {} GiB RAM, Linux {}",
        mem_kib / (1024 * 1024),
        kernel.trim()
    )
}

/// Scheduler time of a set of threads, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sched {
    /// Time spent running on a CPU.
    pub run: f64,
    /// Time spent runnable, waiting for a CPU.
    pub wait: f64,
}

impl Sched {
    /// The time between `earlier` and this reading.
    pub fn since(self, earlier: Sched) -> Sched {
        Sched {
            run: self.run - earlier.run,
            wait: self.wait - earlier.wait,
        }
    }

    /// Running or wanting to run: what a thread that is the bottleneck does all the time.
    pub fn busy(self) -> f64 {
        self.run + self.wait
    }
}

/// Scheduler time so far of this process's threads whose name starts with `prefix`, from
/// `/proc/self/task/*/schedstat` (nanoseconds on the CPU, then waiting on a run queue).
pub fn thread_sched(prefix: &str) -> Sched {
    let mut total = Sched::default();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return total;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let text = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let mut fields = text
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0) as f64 / 1e9);
        total.run += fields.next().unwrap_or(0.0);
        total.wait += fields.next().unwrap_or(0.0);
    }
    total
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
