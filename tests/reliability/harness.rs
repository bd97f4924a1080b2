//! Real `keel-scraper run` processes for the reliability suite, and what they say.
//!
//! * [`Spec`] builds the command line of one replica (`run`, `--listen 127.0.0.1:0`, its
//!   own `--holder-id`, JSON logs) with a clean environment that holds only `PATH`, the
//!   store settings and a `DAPR_API_TOKEN`, optionally under Debian's `faketime` to skew its
//!   wall clock from outside.
//! * [`Replica`] is the running process (a [`Proc`]: tied to the test process, killed
//!   when dropped). Its reader threads take its stdout and stderr line by line into a
//!   [`Journal`] shared by every replica of a scenario, so the test sees one merged,
//!   timestamped stream of events. A replica can be told to signal itself the moment a
//!   given event appears (a crash "in the middle of a tick" is then a matter of a pipe
//!   read, not of a sleep).
//! * [`Journal`] answers the questions the scenarios ask (which replica completed which
//!   tick, which events came from whom) and checks that nothing printed holds a secret.
//! * [`wait_until`] is the only way the suite waits for something: every wait is bounded
//!   and fails with the tail of the journal.

use std::collections::BTreeMap;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use keel_test_support::process::{self, chomp, lock, Proc, Spawn};
use serde_json::Value;

use crate::figures::Scenario;
use crate::support::binary::dapr_backend;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keel-scraper");

/// The password every Redis of the suite requires. No process may ever print it.
pub const REDIS_PASSWORD: &str = "rel-pw-5b8e1d07c4";

/// The `DAPR_API_TOKEN` every replica of the suite runs with. No process may ever print it.
pub const DAPR_TOKEN: &str = "rel-token-9c2f7a31e6";

/// How long a replica may take to exit after SIGTERM (its tick's grace included).
pub const EXIT_BOUND: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// The journal
// ---------------------------------------------------------------------------------------

/// One JSON event line of one replica.
#[derive(Clone, Debug)]
pub struct Ev {
    /// Arrival order over every replica of the journal.
    pub seq: usize,
    /// When the test read the line.
    pub at: Instant,
    /// The test's wall clock when it read the line.
    pub wall: DateTime<Utc>,
    pub replica: String,
    pub value: Value,
}

impl Ev {
    pub fn name(&self) -> &str {
        self.value["event"].as_str().unwrap_or_default()
    }

    pub fn str(&self, field: &str) -> &str {
        self.value[field].as_str().unwrap_or_default()
    }

    pub fn u64(&self, field: &str) -> u64 {
        self.value[field].as_u64().unwrap_or_default()
    }

    /// The event's `tick` as a time.
    pub fn tick(&self) -> DateTime<Utc> {
        parse_time(self.str("tick"))
            .unwrap_or_else(|| panic!("event without a readable tick: {}", self.value))
    }

    /// The event's own `timestamp` (the replica's wall clock).
    pub fn timestamp(&self) -> Option<DateTime<Utc>> {
        parse_time(self.str("timestamp"))
    }
}

pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[derive(Default)]
struct JournalInner {
    events: Vec<Ev>,
    /// Everything each process printed, by (replica, stream).
    output: BTreeMap<(String, &'static str), Vec<u8>>,
    /// Stdout lines that are not JSON event objects.
    non_json: Vec<(String, String)>,
}

/// Everything the replicas of one scenario printed, merged in arrival order.
#[derive(Default)]
pub struct Journal {
    inner: Mutex<JournalInner>,
}

impl Journal {
    pub fn new() -> Arc<Journal> {
        Arc::new(Journal::default())
    }

    /// Records one line; returns the parsed event when it is one.
    fn push(&self, replica: &str, stream: &'static str, line: &[u8]) -> Option<Value> {
        let mut inner = lock(&self.inner);
        let out = inner
            .output
            .entry((replica.to_owned(), stream))
            .or_default();
        out.extend_from_slice(line);
        out.push(b'\n');
        if stream != "stdout" {
            return None;
        }
        let text = String::from_utf8_lossy(line);
        if text.trim().is_empty() {
            return None;
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(v) if v["event"].is_string() && v["timestamp"].is_string() => {
                let seq = inner.events.len();
                inner.events.push(Ev {
                    seq,
                    at: Instant::now(),
                    wall: Utc::now(),
                    replica: replica.to_owned(),
                    value: v.clone(),
                });
                Some(v)
            }
            _ => {
                inner.non_json.push((replica.to_owned(), text.into_owned()));
                None
            }
        }
    }

    /// Records output of a process that is not a replica (a `once`, `config`...).
    pub fn record_output(&self, who: &str, stream: &'static str, bytes: &[u8]) {
        lock(&self.inner)
            .output
            .entry((who.to_owned(), stream))
            .or_default()
            .extend_from_slice(bytes);
    }

    pub fn events(&self) -> Vec<Ev> {
        lock(&self.inner).events.clone()
    }

    /// Events named `name`, in arrival order.
    pub fn named(&self, name: &str) -> Vec<Ev> {
        lock(&self.inner)
            .events
            .iter()
            .filter(|e| e.name() == name)
            .cloned()
            .collect()
    }

    /// Events named `name` from `replica`.
    pub fn of(&self, replica: &str, name: &str) -> Vec<Ev> {
        self.named(name)
            .into_iter()
            .filter(|e| e.replica == replica)
            .collect()
    }

    pub fn count(&self, name: &str) -> usize {
        lock(&self.inner)
            .events
            .iter()
            .filter(|e| e.name() == name)
            .count()
    }

    /// The last `n` lines of every replica, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let inner = lock(&self.inner);
        let start = inner.events.len().saturating_sub(n);
        let mut out = String::new();
        for e in &inner.events[start..] {
            out.push_str(&format!("  [{}] {}\n", e.replica, e.value));
        }
        for (replica, line) in inner.non_json.iter().rev().take(5) {
            out.push_str(&format!("  [{replica}] (not JSON) {line}\n"));
        }
        for ((replica, stream), bytes) in &inner.output {
            if *stream == "stderr" && !bytes.is_empty() {
                let text = String::from_utf8_lossy(bytes);
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(5);
                out.push_str(&format!(
                    "  [{replica}] stderr: {}\n",
                    lines[from..].join(" | ")
                ));
            }
        }
        out
    }

    /// Stdout lines that were not JSON events (the worker prints only events there).
    pub fn non_json(&self) -> Vec<(String, String)> {
        lock(&self.inner).non_json.clone()
    }

    /// Checks that no byte any process printed contains one of `secrets`; returns how
    /// many bytes were scanned.
    pub fn assert_no_secrets(&self, secrets: &[&str]) -> usize {
        let inner = lock(&self.inner);
        let mut scanned = 0;
        for ((who, stream), bytes) in &inner.output {
            scanned += bytes.len();
            for secret in secrets {
                let needle = secret.as_bytes();
                if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                    let from = at.saturating_sub(120);
                    let to = (at + needle.len() + 40).min(bytes.len());
                    panic!(
                        "{who} printed a secret on {stream}: ...{}...",
                        String::from_utf8_lossy(&bytes[from..to])
                    );
                }
            }
        }
        scanned
    }

    /// Every `tick_completed`, by tick, with the replicas that completed it.
    pub fn completions(&self) -> BTreeMap<DateTime<Utc>, Vec<String>> {
        let mut out: BTreeMap<DateTime<Utc>, Vec<String>> = BTreeMap::new();
        for e in self.named("tick_completed") {
            out.entry(e.tick()).or_default().push(e.replica.clone());
        }
        out
    }

    /// Audits the ticks `from, from + step, ...` up to `to` (inclusive).
    pub fn audit(&self, from: DateTime<Utc>, to: DateTime<Utc>, step: Duration) -> TickAudit {
        let done = self.completions();
        let step =
            chrono::Duration::from_std(step).unwrap_or_else(|_| chrono::Duration::seconds(1));
        let mut audit = TickAudit::default();
        let mut slot = from;
        while slot <= to {
            audit.slots += 1;
            match done.get(&slot).map(Vec::as_slice) {
                None | Some([]) => audit.missed.push(slot),
                Some([one]) => {
                    *audit.by_replica.entry(one.clone()).or_default() += 1;
                }
                Some(many) => {
                    for r in many {
                        *audit.by_replica.entry(r.clone()).or_default() += 1;
                    }
                    audit.duplicates.push((slot, many.to_vec()));
                }
            }
            slot += step;
        }
        // A tick between the slots would be a tick named by a wrong slot.
        audit.off_slot = done
            .keys()
            .filter(|t| **t >= from && **t <= to)
            .filter(|t| ((**t - from).num_milliseconds() % step.num_milliseconds()) != 0)
            .copied()
            .collect();
        audit
    }
}

/// Which scheduled ticks were completed, and by whom.
#[derive(Debug, Default)]
pub struct TickAudit {
    pub slots: usize,
    pub missed: Vec<DateTime<Utc>>,
    /// Ticks completed by more than one replica (or twice by one).
    pub duplicates: Vec<(DateTime<Utc>, Vec<String>)>,
    pub off_slot: Vec<DateTime<Utc>>,
    pub by_replica: BTreeMap<String, usize>,
}

impl TickAudit {
    /// `r1:12 r2:18` for the figures.
    pub fn holders(&self) -> String {
        self.by_replica
            .iter()
            .map(|(r, n)| format!("{r}:{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The `ticks`, `duplicates`, `missed` and `ticks by replica` figures, in that order.
    pub fn figures(&self, sc: &mut Scenario) {
        sc.figure("ticks", self.slots);
        sc.figure("duplicates", self.duplicates.len());
        sc.figure("missed", self.missed.len());
        sc.figure("ticks by replica", self.holders());
    }

    pub fn assert_exactly_once(&self, journal: &Journal) {
        assert!(
            self.duplicates.is_empty() && self.missed.is_empty() && self.off_slot.is_empty(),
            "every tick must be completed by exactly one replica: duplicates {:?}, missed {:?}, \
             ticks named off the schedule {:?}\n{}",
            self.duplicates,
            self.missed,
            self.off_slot,
            journal.tail(60)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Polls `check` every 20 ms until it returns `Some`, for at most `bound`; panics with
/// `what` and the journal's tail when it does not.
pub async fn wait_until<T>(
    bound: Duration,
    what: &str,
    journal: &Journal,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("waited {bound:?} for {what}\n{}", journal.tail(40));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (10 s at most) until one of `fired` has fired; returns its index, when it fired
/// and the event that fired it.
pub async fn wait_first_fired(
    journal: &Journal,
    fired: &[Fired],
    what: &str,
) -> (usize, Instant, Value) {
    wait_until(Duration::from_secs(10), what, journal, || {
        fired
            .iter()
            .enumerate()
            .find_map(|(i, f)| f.get().map(|(at, event)| (i, at, event)))
    })
    .await
}

/// Waits (15 s at most) until `replica` has completed `more` ticks beyond those it had
/// completed when called.
pub async fn wait_more_ticks(journal: &Journal, replica: &str, more: usize, what: &str) {
    let seen = journal.of(replica, "tick_completed").len();
    wait_until(Duration::from_secs(15), what, journal, || {
        (journal.of(replica, "tick_completed").len() >= seen + more).then_some(())
    })
    .await;
}

/// `123 ms`, for the figures.
pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Sleeps until the wall clock reads `t` (returns at once when it is past).
pub async fn sleep_until_wall(t: DateTime<Utc>) {
    if let Ok(d) = (t - Utc::now()).to_std() {
        tokio::time::sleep(d).await;
    }
}

/// The first slot of a schedule firing every `every` whole seconds that is at or after
/// `t` (whole seconds, UTC, as the worker names ticks).
pub fn slot_at_or_after(t: DateTime<Utc>, every: u64) -> DateTime<Utc> {
    let every = i64::try_from(every).unwrap_or(1).max(1);
    let secs = t.timestamp();
    let whole = secs + i64::from(t.timestamp_subsec_nanos() > 0);
    let up = (whole + every - 1).div_euclid(every) * every;
    DateTime::from_timestamp(up, 0).unwrap_or(t)
}

// ---------------------------------------------------------------------------------------
// Replicas
// ---------------------------------------------------------------------------------------

/// The command line of one replica.
#[derive(Clone, Debug)]
pub struct Spec {
    name: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    faketime: Option<String>,
}

impl Spec {
    /// `keel-scraper run --listen 127.0.0.1:0 --holder-id <name> --log-format json`, with
    /// `DAPR_API_TOKEN` set (it must never be printed, whatever the backend).
    pub fn run(name: &str) -> Spec {
        Spec {
            name: name.to_owned(),
            args: [
                "run",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--holder-id",
                name,
            ]
            .map(String::from)
            .to_vec(),
            envs: vec![("DAPR_API_TOKEN".into(), DAPR_TOKEN.into())],
            faketime: None,
        }
    }

    /// The `redis` backend on `redis_url` (passed as `REDIS_URL`, as a Deployment would),
    /// probing `status_url`.
    pub fn redis(mut self, redis_url: &str, status_url: &str) -> Spec {
        self.envs.push(("REDIS_URL".into(), redis_url.into()));
        self.args(&["--backend", "redis", "--status-url", status_url])
    }

    /// The `dapr` backend through a sidecar at these endpoints (status calls go through its
    /// service invocation, the default).
    pub fn dapr(self, grpc: &str, http: &str) -> Spec {
        self.args(&dapr_backend(grpc, http))
    }

    pub fn schedule(self, cron: &str) -> Spec {
        self.args(&["--schedule", cron])
    }

    /// Sets an environment variable of the replica (a flag of the same option wins).
    pub fn env(mut self, name: &str, value: &str) -> Spec {
        self.envs.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn args(mut self, args: &[&str]) -> Spec {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Runs the replica under `faketime -f <offset>` (e.g. `+0.6`), the monotonic clock
    /// left alone, so only its wall clock (cron slots, TTL-free reasoning) is skewed.
    pub fn faketime(mut self, offset: &str) -> Spec {
        self.faketime = Some(offset.to_owned());
        self
    }

    pub fn spawn(self, journal: &Arc<Journal>) -> Replica {
        let spawn = match &self.faketime {
            // faketime forks the program; setpriv ties the worker's life to faketime's
            // (which is tied to this process), so no worker outlives the suite.
            Some(offset) => Spawn::new("faketime")
                .args(["-f", offset, "setpriv", "--pdeathsig", "KILL", BIN])
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            None => Spawn::new(BIN),
        };
        let worker_pid = Arc::new(AtomicU32::new(0));
        let triggers: Arc<Mutex<Vec<Trigger>>> = Arc::default();
        let on_line = |stream| on_line(stream, &self.name, journal, &triggers, &worker_pid);
        let proc = spawn
            .name(&self.name)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .on_stdout(on_line("stdout"))
            .on_stderr(on_line("stderr"))
            .start()
            .unwrap_or_else(|e| panic!("cannot start replica {} ({BIN}): {e}", self.name));
        if self.faketime.is_none() {
            worker_pid.store(proc.pid(), Ordering::SeqCst);
        }
        let mut replica = Replica {
            name: self.name,
            proc,
            worker_pid,
            triggers,
            faked: self.faketime.is_some(),
        };
        if replica.faked {
            replica.resolve_worker_pid();
        }
        replica
    }
}

/// Signal a replica sends itself when an event matches.
/// Something a replica's reader thread does the moment an event matches, given the
/// worker's pid.
type Action = Box<dyn FnOnce(u32) + Send>;

struct Trigger {
    matches: Box<dyn Fn(&Value) -> bool + Send>,
    action: Action,
    fired: Fired,
}

/// When a trigger fired.
#[derive(Clone, Default)]
pub struct Fired(Arc<Mutex<Option<(Instant, Value)>>>);

impl Fired {
    pub fn get(&self) -> Option<(Instant, Value)> {
        lock(&self.0).clone()
    }
}

/// What a replica's reader thread does with each line of `stream`: journal it and, on an
/// event, fire the first trigger that matches.
fn on_line(
    stream: &'static str,
    name: &str,
    journal: &Arc<Journal>,
    triggers: &Arc<Mutex<Vec<Trigger>>>,
    pid: &Arc<AtomicU32>,
) -> impl FnMut(&[u8]) + Send + 'static {
    let (name, journal, triggers, pid) = (
        name.to_owned(),
        Arc::clone(journal),
        Arc::clone(triggers),
        Arc::clone(pid),
    );
    move |line| {
        let Some(event) = journal.push(&name, stream, chomp(line)) else {
            return;
        };
        let mut triggers = lock(&triggers);
        if let Some(i) = triggers.iter().position(|t| (t.matches)(&event)) {
            let t = triggers.remove(i);
            (t.action)(pid.load(Ordering::SeqCst));
            *lock(&t.fired.0) = Some((Instant::now(), event));
        }
    }
}

/// A running `keel-scraper run` (killed on drop).
pub struct Replica {
    pub name: String,
    proc: Proc,
    worker_pid: Arc<AtomicU32>,
    triggers: Arc<Mutex<Vec<Trigger>>>,
    faked: bool,
}

impl Replica {
    /// Under faketime the worker is faketime's child: find its pid.
    fn resolve_worker_pid(&mut self) {
        let parent = self.proc.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(&pid) = process::children(parent).first() {
                self.worker_pid.store(pid, Ordering::SeqCst);
                return;
            }
            if let Some(status) = self.proc.status() {
                panic!(
                    "faketime exited ({status}) before starting replica {}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "faketime did not start replica {} within 10 s",
                self.name
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The worker's own pid.
    pub fn pid(&self) -> u32 {
        self.worker_pid.load(Ordering::SeqCst)
    }

    /// Sends `signal` to the worker now.
    pub fn signal(&self, signal: libc::c_int) {
        if self.proc.reaped() {
            return;
        }
        // SAFETY: kill(2) on the worker we started and have not reaped.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, signal);
        }
    }

    /// Sends `signal` to the worker from the reader thread the moment an event matching
    /// `matches` is read (the next one; earlier events do not count).
    pub fn signal_on(
        &self,
        signal: libc::c_int,
        matches: impl Fn(&Value) -> bool + Send + 'static,
    ) -> Fired {
        self.on_event(matches, move |pid| {
            if pid != 0 {
                // SAFETY: kill(2) on the worker's pid; the process is ours and, as its
                // pipe is still open (the event was just read from it), not yet reaped.
                unsafe {
                    libc::kill(pid as libc::pid_t, signal);
                }
            }
        })
    }

    /// Runs `action` (given the worker's pid) from the reader thread the moment an event
    /// matching `matches` is read.
    pub fn on_event(
        &self,
        matches: impl Fn(&Value) -> bool + Send + 'static,
        action: impl FnOnce(u32) + Send + 'static,
    ) -> Fired {
        let fired = Fired::default();
        lock(&self.triggers).push(Trigger {
            matches: Box::new(matches),
            action: Box::new(action),
            fired: fired.clone(),
        });
        fired
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Waits for the process to exit, at most `bound`; `None` when it is still running.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(bound)
    }

    /// SIGTERM, then the exit code; panics (with the journal) when it does not exit within
    /// [`EXIT_BOUND`].
    pub fn terminate(&mut self, journal: &Journal) -> Option<i32> {
        self.signal(libc::SIGTERM);
        match self.wait_exit(EXIT_BOUND) {
            Some(s) => s.code(),
            None => panic!(
                "replica {} did not exit within {EXIT_BOUND:?} of SIGTERM\n{}",
                self.name,
                journal.tail(30)
            ),
        }
    }

    /// The worker's peak resident set (`VmHWM`), in KiB.
    pub fn vm_hwm_kib(&self) -> Option<u64> {
        process::vm_hwm_kib(self.pid())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // Under faketime the worker is not the child: kill it first. The child itself is
        // killed, and its readers joined, when `proc` drops.
        if self.is_running() {
            self.signal(libc::SIGKILL);
        }
    }
}

/// Runs a one-shot command of the binary (`config`, `once`, `routes`) with a clean
/// environment plus `envs`, bounded by 30 s; records its output in `journal` under `who`
/// and returns (exit code, stdout, stderr).
pub fn run_once(
    journal: &Journal,
    who: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let run = Spawn::new(BIN)
        .args(args)
        .envs(envs.iter().copied())
        .run(Duration::from_secs(30));
    journal.record_output(who, "stdout", run.stdout.as_bytes());
    journal.record_output(who, "stderr", run.stderr.as_bytes());
    assert!(!run.timed_out, "{who}: {BIN} {args:?} overstayed 30 s");
    (run.code(), run.stdout, run.stderr)
}
