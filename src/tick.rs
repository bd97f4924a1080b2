//! One tick, as phases: lease -> read the private state (`read_private`) -> gather routes
//! and probes (`gather`) -> plan ([`crate::plan::plan`], pure) -> fence (`fence`) -> write
//! (`write`) -> tally (`tally`) -> release.
//!
//! Invariants kept here:
//! - The tick owns its lease end to end: [`Ticker::tick`] takes it and releases it.
//! - Nothing is written unless this replica holds the lease, and the lease is confirmed
//!   (ETag unchanged) right before the write phase.
//! - A route is rewritten only through [`Store::update_fenced`] with the ETag it was read
//!   with and the lease as its fence, keeping every other field; on conflict it is re-read
//!   and only the status decision is re-applied, from this tick's observation. (The Dapr
//!   backend cannot fence a write in the store itself: there the fence is the confirm step
//!   and the write deadline, see ARCHITECTURE.md.)
//! - A route that is missing is never created; one that is malformed is never written.
//! - Probes still running at the probe deadline are not observations: no counter moves and
//!   no status changes for them.
//! - Under `--dry-run` no lease is taken and nothing is written: the counters live in memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::stream::{self, StreamExt};
use tokio::time::Instant;

use crate::decision::{decide, Counters, Decision, Observation, Thresholds};
use crate::events;
use crate::lease::{Acquire, Guard, Lease, LeaseError, TickKind};
use crate::metrics::metrics;
use crate::observations::{Interner, Text};
use crate::observer::Observer;
use crate::plan::{plan, Fleet, PlanInput, Rules, Seen};
use crate::probe::{ProbeOutcome, Prober};
use crate::registry::{invalid_id_reason, parse_ids, printable_id, REGISTRY_KEY};
use crate::route::{read_status, rewrite_status, route_key};
use crate::status::RouteStatus;
use crate::store::{read_each, Entry, Fence, Save, Store, StoreError, StoreKind, ABSENT_ETAG};

/// The consecutive counters' key in the private store: one JSON object, plugin id ->
/// `{"f": failures, "p": passing reports}`, only non-zero entries.
pub const COUNTERS_KEY: &str = "scrape_counters";

/// How many times a route write is attempted (conflicts and store errors alike).
const WRITE_ATTEMPTS: usize = 5;

/// Everything a tick needs; built once per process.
pub struct Ticker {
    pub store: Arc<dyn Store>,
    pub prober: Arc<Prober>,
    pub lease: Arc<Lease>,
    pub thresholds: Thresholds,
    pub concurrency: usize,
    rules: Rules,
    observer: Observer,
    dry_run: bool,
    state: Mutex<State>,
    /// The observations record this process wrote last (see
    /// [`crate::observations::RecordCache`]).
    record_cache: crate::observations::RecordCache,
}

/// What one replica remembers between its ticks.
#[derive(Default)]
struct State {
    /// The last tick held demotions: stand back from the next one.
    held_last_tick: bool,
    /// The last tick found the observer unhealthy: stand back while its check fails.
    observer_down: bool,
    /// `--dry-run`: the consecutive counters, never stored.
    dry_counters: HashMap<String, Counters>,
}

/// What a completed tick did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    pub tick: String,
    pub plugins: u64,
    pub probed_ok: u64,
    pub probe_failed: u64,
    pub cut_off: u64,
    pub routes_changed: u64,
    pub write_failed: u64,
    /// Guarded demotions the fleet guard held.
    pub held: u64,
    /// Plugins in E blocked for failures at tick start.
    pub blocked_for_failures: u64,
    /// The lease was found taken when the tick tried to release it.
    pub release_failed: bool,
    pub duration: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    PreviousTickRunning,
    LockHeld {
        holder: Option<String>,
    },
    AlreadyScraped,
    /// This replica stands back (it held demotions last tick, or its own check fails).
    StandingBack,
}

impl SkipReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            SkipReason::PreviousTickRunning => "previous_tick_running",
            SkipReason::LockHeld { .. } => "lock_held",
            SkipReason::AlreadyScraped => "already_scraped",
            SkipReason::StandingBack => "standing_back",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("registry unreadable: {0}")]
    Registry(String),
    #[error("lock lost: the scrape_state lease was taken before this tick finished; nothing more was written")]
    LockLost,
    #[error("observer unhealthy: {0}")]
    ObserverUnhealthy(String),
}

#[derive(Debug)]
pub enum TickOutcome {
    Completed(TickReport),
    Skipped(SkipReason),
    Failed(TickError),
}

/// One plugin that reached the probe step.
struct Candidate {
    id: String,
    /// The route's status as read, shared: a fleet has a handful of distinct statuses.
    current: Text,
    data: Vec<u8>,
    etag: String,
}

/// A decided write.
struct PendingWrite {
    cand: Candidate,
    obs: Observation,
    before: Counters,
    decision: Decision,
}

/// The private state a tick starts from.
struct Private {
    ids: Vec<String>,
    counters_entry: Option<Entry>,
    counters: HashMap<String, Counters>,
}

/// Each route's read, in the order of the keys.
type RouteReads = Box<dyn Iterator<Item = Result<Option<Entry>, StoreError>> + Send>;

/// The routes read and the probes made.
struct Gathered {
    candidates: Vec<(Candidate, ProbeOutcome)>,
    /// Route statuses of plugins that never reach the plan (`missing`, `invalid`).
    statuses: HashMap<String, i64>,
    /// Why the observer is unhealthy, when it is.
    observer_unhealthy: Option<String>,
}

/// The plan turned into work: what to write and what to keep.
struct Planned {
    pending: Vec<PendingWrite>,
    counters: HashMap<String, Counters>,
    statuses: HashMap<String, i64>,
    fleet: Fleet,
    /// This tick's observations (hook 1/3), when they are recorded.
    observed: Option<crate::observations::Recorder>,
}

fn emit_store_error(store: &dyn Store, kind: StoreKind, operation: &str, e: &StoreError) {
    events::StoreError {
        store: store.store_name(kind).to_string(),
        operation: operation.to_string(),
        error: e.to_string(),
    }
    .emit();
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Ticker {
    /// A ticker with the fleet guard off, no own check and writes on.
    pub fn new(
        store: Arc<dyn Store>,
        prober: Arc<Prober>,
        lease: Arc<Lease>,
        thresholds: Thresholds,
        concurrency: usize,
    ) -> Ticker {
        Ticker {
            store,
            prober,
            lease,
            thresholds,
            concurrency,
            rules: Rules::unguarded(thresholds),
            observer: Observer::None,
            dry_run: false,
            state: Mutex::new(State::default()),
            record_cache: crate::observations::RecordCache::default(),
        }
    }

    /// Sets the fleet guard: `max_failed_share_milli` in 1..=1000, the window in ticks.
    pub fn with_guard(mut self, max_failed_share_milli: u32, window_ticks: u32) -> Ticker {
        self.rules = Rules {
            thresholds: self.thresholds,
            max_failed_share_milli: max_failed_share_milli.clamp(1, 1000),
            window_ticks,
        };
        self
    }

    /// Sets the observer whose health the tick checks.
    pub fn with_observer(mut self, observer: Observer) -> Ticker {
        self.observer = observer;
        self
    }

    /// `--dry-run`: decide, log and count; no lease, no write, counters in memory.
    pub fn with_dry_run(mut self, dry_run: bool) -> Ticker {
        self.dry_run = dry_run;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock left plain flags and counts: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one tick, lease included: takes the lease, scrapes, releases it, and logs the
    /// outcome.
    pub async fn tick(&self, kind: TickKind) -> TickOutcome {
        let (mut outcome, guard) = self.tick_keeping_lease(kind).await;
        if let Some(g) = guard {
            let released = self.release(&g).await;
            if let TickOutcome::Completed(r) = &mut outcome {
                r.release_failed = !released;
            }
        }
        outcome
    }

    /// [`Ticker::tick`] without the release: the lease is still held when the tick
    /// completed, and returned. For tests of the lease; release it with
    /// [`Ticker::release`].
    pub async fn tick_keeping_lease(&self, kind: TickKind) -> (TickOutcome, Option<Guard>) {
        let tick = kind.id();
        let holder = self.lease.holder().to_string();
        events::TickStarted {
            tick: tick.clone(),
            holder: holder.clone(),
        }
        .emit();
        if self.dry_run {
            let result = self.scrape(None, Instant::now(), &tick).await;
            return (self.finish(&tick, &holder, result), None);
        }
        if matches!(kind, TickKind::Scheduled(_)) && self.stands_back().await {
            return (self.skip(tick, SkipReason::StandingBack, None), None);
        }
        let guard = match self.lease.acquire(kind).await {
            Ok(Acquire::Acquired(g)) => g,
            Ok(Acquire::Held { holder: by }) => {
                let reason = SkipReason::LockHeld { holder: by.clone() };
                return (self.skip(tick, reason, by), None);
            }
            Ok(Acquire::AlreadyScraped { .. }) => {
                return (self.skip(tick, SkipReason::AlreadyScraped, None), None);
            }
            Err(e) => {
                emit_store_error(&*self.store, StoreKind::Private, "acquire_lock", &e);
                return (self.fail(&tick, TickError::Store(e)), None);
            }
        };
        events::LockAcquired {
            tick: tick.clone(),
            holder: holder.clone(),
            lease_ms: millis(self.lease.lease()),
            takeover: guard.takeover,
        }
        .emit();
        let result = self.scrape(Some(&guard), guard.started, &tick).await;
        if matches!(result, Err(TickError::LockLost)) {
            events::LockLost {
                tick: tick.clone(),
                holder,
                alert: true,
            }
            .emit();
            return (self.fail(&tick, TickError::LockLost), None);
        }
        (self.finish(&tick, &holder, result), Some(guard))
    }

    /// Whether this replica skips its lease attempt this tick (README: "Standing back").
    async fn stands_back(&self) -> bool {
        let (held, down) = {
            let st = self.state();
            (st.held_last_tick, st.observer_down)
        };
        if held {
            self.state().held_last_tick = false;
            return true;
        }
        if down {
            if self.observer.check().await.is_err() {
                return true;
            }
            self.state().observer_down = false;
        }
        false
    }

    fn skip(&self, tick: String, reason: SkipReason, holder: Option<String>) -> TickOutcome {
        events::TickSkipped {
            tick,
            reason: reason.as_str().into(),
            holder,
        }
        .emit();
        TickOutcome::Skipped(reason)
    }

    fn finish(
        &self,
        tick: &str,
        holder: &str,
        result: Result<TickReport, TickError>,
    ) -> TickOutcome {
        match result {
            Ok(report) => {
                events::TickCompleted {
                    tick: tick.to_string(),
                    holder: holder.to_string(),
                    plugins: report.plugins,
                    probed_ok: report.probed_ok,
                    probe_failed: report.probe_failed,
                    routes_changed: report.routes_changed,
                    write_failed: report.write_failed,
                    held: report.held,
                    blocked_for_failures: report.blocked_for_failures,
                    duration_ms: millis(report.duration),
                }
                .emit();
                TickOutcome::Completed(report)
            }
            Err(e) => self.fail(tick, e),
        }
    }

    fn fail(&self, tick: &str, e: TickError) -> TickOutcome {
        events::TickFailed {
            tick: tick.to_string(),
            error: e.to_string(),
            alert: true,
        }
        .emit();
        TickOutcome::Failed(e)
    }

    /// Releases a lease, logging the outcome. False when it was lost or the store failed.
    pub async fn release(&self, g: &Guard) -> bool {
        match self.lease.release(g).await {
            Ok(()) => {
                events::LockReleased {
                    holder: self.lease.holder().to_string(),
                }
                .emit();
                true
            }
            Err(LeaseError::Lost) => {
                events::LockLost {
                    tick: g.kind.id(),
                    holder: self.lease.holder().to_string(),
                    alert: true,
                }
                .emit();
                false
            }
            Err(LeaseError::Store(e)) => {
                emit_store_error(&*self.store, StoreKind::Private, "release_lock", &e);
                false
            }
        }
    }

    /// On shutdown: releases a lease still held (a tick cancelled mid-way keeps one). A
    /// lease that moved on since is not ours to release; nothing is said then.
    pub async fn release_on_shutdown(&self) {
        if let Some(g) = self.lease.held() {
            if let Ok(()) = self.lease.release(&g).await {
                events::LockReleased {
                    holder: self.lease.holder().to_string(),
                }
                .emit();
            }
        }
    }

    fn deadlines(&self, started: Instant) -> (Instant, Instant) {
        let lease = self.lease.lease();
        // Probing stops a fifth of the lease before it ends, leaving that for writes;
        // writes stop shortly before the lease ends so none lands after it.
        let probe_deadline = started + lease - lease / 5;
        let write_deadline = started + lease - (lease / 20).min(Duration::from_millis(250));
        (probe_deadline, write_deadline)
    }

    /// The tick's phases, after the lease (none under `--dry-run`).
    async fn scrape(
        &self,
        guard: Option<&Guard>,
        started: Instant,
        tick: &str,
    ) -> Result<TickReport, TickError> {
        let (probe_deadline, write_deadline) = self.deadlines(started);
        let mut private = self.read_private().await?;
        let registered = private.ids.len() as u64;
        // The registry's ids move on: into the probes' list and then, one by one, into
        // the plugins that reach the plan (no copy of each id).
        let valid = valid_ids(std::mem::take(&mut private.ids));
        // The observations' previous record is read while the plugins are probed (not
        // under `--dry-run`, which records none).
        let (gathered, prepared) = tokio::join!(self.gather(valid, probe_deadline), async {
            match guard {
                Some(_) => Some(crate::observations::prepare(&*self.store).await),
                None => None,
            }
        });
        let gathered = gathered?;
        let mut report = TickReport {
            tick: tick.to_string(),
            plugins: registered,
            ..TickReport::default()
        };
        let observer_unhealthy = gathered.observer_unhealthy.clone();
        // Observations hook (1/3): what each plugin answered, taken as the plan hands each
        // plugin on (see src/observations.rs). Neither a dry run nor a blind observer
        // records any.
        let record = guard.is_some() && observer_unhealthy.is_none();
        let Planned {
            pending,
            counters,
            statuses,
            fleet,
            observed,
        } = self.plan(tick, &private, gathered, &mut report, record);
        let results = match guard {
            Some(guard) => {
                self.fence(guard).await?;
                self.write(pending, &guard.fence(), write_deadline).await
            }
            None => dry_writes(pending),
        };
        let after = self
            .tally(&mut report, &private, results, counters, statuses)
            .await?;
        if let (Some(guard), Some(observed), Some(prepared)) = (guard, observed, prepared) {
            // Observations hook (3/3): the last observation of every plugin and this tick
            // as the last completed, both fenced by the lease.
            crate::observations::save(
                &*self.store,
                &guard.fence(),
                &crate::observations::LastTick {
                    tick: tick.to_string(),
                    holder: self.lease.holder().to_string(),
                    completed_at: crate::observations::rfc3339(chrono::Utc::now().timestamp()),
                },
                guard.kind.time().timestamp(),
                crate::observations::seen(observed.finish(), &after),
                prepared,
                &self.record_cache,
            )
            .await;
        }
        report.duration = started.elapsed();
        self.remember(&fleet, observer_unhealthy.is_some());
        if let Some(why) = observer_unhealthy {
            events::ObserverUnhealthy {
                tick: tick.to_string(),
                observer: self.observer.describe(),
                error: why.clone(),
                alert: true,
            }
            .emit();
            return Err(TickError::ObserverUnhealthy(why));
        }
        Ok(report)
    }

    fn remember(&self, fleet: &Fleet, observer_down: bool) {
        let mut st = self.state();
        st.held_last_tick = fleet.held > 0;
        st.observer_down = observer_down;
    }

    /// Phase 1: the registry and the counters, from the private store (the counters
    /// from memory under `--dry-run`).
    async fn read_private(&self) -> Result<Private, TickError> {
        let store = &*self.store;
        let keys: &[String] = &[REGISTRY_KEY.to_string(), COUNTERS_KEY.to_string()];
        let keys = if self.dry_run { &keys[..1] } else { keys };
        let mut private = read_each(store, StoreKind::Private, keys, 2)
            .await
            .inspect_err(|e| emit_store_error(store, StoreKind::Private, "read_registry", e))?
            .into_iter();
        let registry = match private.next() {
            Some(Ok(entry)) => entry,
            Some(Err(e)) => return Err(TickError::Registry(e.to_string())),
            None => None,
        };
        let ids = match &registry {
            Some(e) => parse_ids(&e.data).map_err(|e| TickError::Registry(e.to_string()))?,
            None => Vec::new(),
        };
        if ids.is_empty() {
            events::RegistryEmpty {
                store: store.store_name(StoreKind::Private).to_string(),
                key: REGISTRY_KEY.to_string(),
                location: store.locate(StoreKind::Private, REGISTRY_KEY),
            }
            .emit();
        }
        if self.dry_run {
            let counters = self.state().dry_counters.clone();
            return Ok(Private {
                ids,
                counters_entry: None,
                counters,
            });
        }
        // The counters are this worker's own; an unreadable value is reported and the
        // counts start again (the next save replaces it).
        let counters_entry = match private.next() {
            Some(Ok(entry)) => entry,
            Some(Err(e)) => {
                emit_store_error(store, StoreKind::Private, "read_counters", &e);
                None
            }
            None => None,
        };
        let counters = match &counters_entry {
            None => HashMap::new(),
            Some(e) => serde_json::from_slice(&e.data).unwrap_or_else(|err| {
                events::StoreError {
                    store: store.store_name(StoreKind::Private).to_string(),
                    operation: "read_counters".into(),
                    error: format!(
                        "{COUNTERS_KEY} is not a counters object ({err}); the counts start again"
                    ),
                }
                .emit();
                HashMap::new()
            }),
        };
        Ok(Private {
            ids,
            counters_entry,
            counters,
        })
    }

    /// Phase 2: routes (in bulk, public store) are read while the plugins are probed:
    /// every valid registered id is probed, so neither waits for the other. A failed read
    /// still fails the tick before anything is decided or written. Then the observer's
    /// own health, when a probe failed.
    async fn gather(
        &self,
        valid: Vec<String>,
        probe_deadline: Instant,
    ) -> Result<Gathered, TickError> {
        let store = &*self.store;
        let read_routes = async {
            // The keys are freed as soon as the routes are in.
            let route_keys: Vec<String> = valid.iter().map(|id| route_key(id)).collect();
            // The bulk read's entries as they came, one `Result` per key only when one
            // key needs reading alone (at 50 000 plugins a copy of the list is megabytes).
            let routes: RouteReads = match store.bulk_get(StoreKind::Public, &route_keys).await {
                Ok(entries) => Box::new(entries.into_iter().map(Ok)),
                Err(StoreError::Unreadable { .. }) => Box::new(
                    read_each(store, StoreKind::Public, &route_keys, self.concurrency)
                        .await?
                        .into_iter(),
                ),
                Err(e) => return Err(e),
            };
            Ok(routes)
        };
        // The probes first: their first poll hands them to their own task, so they are
        // under way before a store that reads synchronously (the embedded one) holds
        // this thread for the whole bulk read.
        let (timed, routes) = tokio::join!(
            self.prober.probe_all_timed(&valid, probe_deadline),
            read_routes,
        );
        let routes =
            routes.inspect_err(|e| emit_store_error(store, StoreKind::Public, "read_routes", e))?;
        let m = metrics();
        let mut candidates = Vec::with_capacity(valid.len());
        let mut texts = Interner::default();
        let mut statuses: HashMap<String, i64> = HashMap::new();
        for ((id, route), (outcome, took)) in valid.into_iter().zip(routes).zip(timed) {
            if !matches!(outcome, ProbeOutcome::CutOff) {
                m.probe_duration(took.as_secs_f64());
            }
            let entry = match route {
                Ok(Some(entry)) => entry,
                Ok(None) => {
                    events::RouteMissing { plugin_id: id }.emit();
                    *statuses.entry("missing".into()).or_default() += 1;
                    continue;
                }
                // One unreadable key: that route is left alone, the others proceed.
                Err(e) => {
                    route_invalid(&id, &e.to_string());
                    *statuses.entry("invalid".into()).or_default() += 1;
                    continue;
                }
            };
            match read_status(&entry.data) {
                Ok(current) => candidates.push((
                    Candidate {
                        id,
                        current: texts.get(&current),
                        data: entry.data,
                        etag: entry.etag,
                    },
                    outcome,
                )),
                Err(e) => {
                    route_invalid(&id, &e.to_string());
                    *statuses.entry("invalid".into()).or_default() += 1;
                }
            }
        }
        let observer_unhealthy = self.observe_self(&candidates).await;
        Ok(Gathered {
            candidates,
            statuses,
            observer_unhealthy,
        })
    }

    /// Why the observer is unhealthy this tick, if a guarded failure gives reason to ask.
    /// Through Dapr any guarded failure asks; with one status host a `connect` failure
    /// does. The own check then decides (a connect failure of one request to a host that
    /// accepts connections again is the plugin's).
    async fn observe_self(&self, candidates: &[(Candidate, ProbeOutcome)]) -> Option<String> {
        let mut failures = candidates.iter().filter_map(|(_, o)| match o {
            ProbeOutcome::Failed(f) if f.kind != crate::status::ErrorKind::PluginError => Some(f),
            _ => None,
        });
        let ask = match &self.observer {
            Observer::None => false,
            Observer::Sidecar { .. } => failures.next().is_some(),
            Observer::SingleHost { .. } => failures.any(|f| self.observer.blames(f)),
        };
        if !ask {
            return None;
        }
        self.observer.check().await.err()
    }

    /// Phase 3: the plan over the whole fleet (pure, [`plan`]), then its events.
    fn plan(
        &self,
        tick: &str,
        private: &Private,
        gathered: Gathered,
        report: &mut TickReport,
        record: bool,
    ) -> Planned {
        let Gathered {
            candidates,
            mut statuses,
            observer_unhealthy,
        } = gathered;
        let befores: Vec<Counters> = candidates
            .iter()
            .map(|(c, _)| private.counters.get(&c.id).copied().unwrap_or_default())
            .collect();
        let inputs: Vec<PlanInput> = candidates
            .iter()
            .zip(&befores)
            .map(|((c, outcome), before)| PlanInput {
                id: &c.id,
                current: &c.current,
                before: *before,
                seen: match outcome {
                    ProbeOutcome::Reported(s) => Seen::Reported(*s),
                    ProbeOutcome::Failed(f) => Seen::Failed(f.kind),
                    ProbeOutcome::CutOff => Seen::CutOff,
                },
            })
            .collect();
        let decided = plan(&inputs, self.rules, observer_unhealthy.is_none());
        drop(inputs);
        let mut counters = HashMap::new();
        let mut pending = Vec::new();
        let mut observed =
            record.then(|| crate::observations::Recorder::with_capacity(candidates.len()));
        for (((cand, outcome), before), planned) in
            candidates.into_iter().zip(befores).zip(decided.plugins)
        {
            match &outcome {
                ProbeOutcome::Reported(_) => report.probed_ok += 1,
                ProbeOutcome::Failed(f) => {
                    report.probe_failed += 1;
                    events::PluginProbeFailed {
                        plugin_id: cand.id.clone(),
                        error_kind: f.kind.as_str().to_string(),
                        consecutive_failures: u64::from(planned.decision.counters.failures),
                        detail: f.detail.clone(),
                        http_status: f.http_status.map(u64::from),
                        dapr_error_code: f.dapr_error_code.clone(),
                    }
                    .emit();
                }
                ProbeOutcome::CutOff => report.cut_off += 1,
            }
            match (planned.obs, planned.decision.write) {
                (Some(obs), Some(_)) => {
                    if let Some(rows) = observed.as_mut() {
                        rows.push(cand.id.clone(), cand.current.clone(), &outcome);
                    }
                    pending.push(PendingWrite {
                        cand,
                        obs,
                        before,
                        decision: planned.decision,
                    });
                }
                _ => {
                    if !planned.decision.counters.is_zero() {
                        counters.insert(cand.id.clone(), planned.decision.counters);
                    }
                    if let Some(rows) = observed.as_mut() {
                        rows.push(cand.id, cand.current.clone(), &outcome);
                    }
                    match statuses.get_mut(&*cand.current) {
                        Some(n) => *n += 1,
                        None => {
                            statuses.insert(cand.current.to_string(), 1);
                        }
                    }
                }
            }
        }
        report.held = decided.fleet.held;
        report.blocked_for_failures = decided.fleet.blocked_for_failures;
        announce_fleet(tick, report, &decided.fleet);
        Planned {
            pending,
            counters,
            statuses,
            fleet: decided.fleet,
            observed,
        }
    }

    /// The fence: confirms the lease before anything is written.
    async fn fence(&self, guard: &Guard) -> Result<(), TickError> {
        match self.lease.confirm(guard).await {
            Ok(()) => Ok(()),
            Err(LeaseError::Lost) => Err(TickError::LockLost),
            Err(LeaseError::Store(e)) => {
                emit_store_error(&*self.store, StoreKind::Private, "confirm_lock", &e);
                Err(TickError::Store(e))
            }
        }
    }

    /// Phase 4: the decided writes, concurrently.
    async fn write(
        &self,
        pending: Vec<PendingWrite>,
        fence: &Fence,
        deadline: Instant,
    ) -> Vec<(String, WriteResult)> {
        stream::iter(pending)
            .map(|p| async move {
                let id = p.cand.id.clone();
                (id, self.write_route(p, fence, deadline).await)
            })
            .buffer_unordered(self.concurrency.max(1))
            .collect()
            .await
    }

    /// Phase 5: the write results into the report, the counters saved (kept in memory
    /// under `--dry-run`), the per-status gauge set.
    async fn tally(
        &self,
        report: &mut TickReport,
        private: &Private,
        results: Vec<(String, WriteResult)>,
        mut new_counters: HashMap<String, Counters>,
        mut statuses: HashMap<String, i64>,
    ) -> Result<WritesLeft, TickError> {
        if results
            .iter()
            .any(|(_, r)| matches!(r, WriteResult::Fenced))
        {
            // The lease ended under us: what landed before did so under our lease;
            // nothing more is written, counters included.
            self.lease.forget();
            return Err(TickError::LockLost);
        }
        // Observations hook (2/3): the route status each decided write left.
        let after: WritesLeft = results
            .iter()
            .filter_map(|(id, r)| match r {
                WriteResult::Written { status, .. } => {
                    Some((id.clone(), Some((status.as_str().to_string(), true))))
                }
                WriteResult::Unchanged { status, .. } => {
                    Some((id.clone(), Some((status.clone(), false))))
                }
                WriteResult::Gone | WriteResult::Fenced => Some((id.clone(), None)),
                WriteResult::Failed { .. } => None,
            })
            .collect();
        let mut written = Vec::new();
        for (id, result) in results {
            let (status, counters) = match result {
                WriteResult::Written { status, counters } => {
                    report.routes_changed += 1;
                    written.push(id.clone());
                    (Some(status.as_str().to_string()), counters)
                }
                WriteResult::Unchanged { status, counters } => (Some(status), counters),
                WriteResult::Gone | WriteResult::Fenced => continue,
                WriteResult::Failed { before } => {
                    report.write_failed += 1;
                    (None, before)
                }
            };
            if let Some(status) = status {
                *statuses.entry(status).or_default() += 1;
            }
            if !counters.is_zero() {
                new_counters.insert(id, counters);
            }
        }
        if !self.store.update_checks_existence() && !written.is_empty() {
            // An undone write changed nothing that stays: do not count it as a change.
            let undone = self.undo_resurrections(&written).await;
            report.routes_changed -= undone.min(report.routes_changed);
        }
        if self.dry_run {
            self.state().dry_counters = new_counters;
        } else {
            self.save_counters(private.counters_entry.as_ref(), &new_counters)
                .await;
        }
        let mut counts: Vec<(&str, i64)> = statuses.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        counts.sort();
        metrics().plugins_by_status(&counts);
        Ok(after)
    }

    /// Writes one decided route, re-reading and re-deciding on conflict.
    async fn write_route(&self, p: PendingWrite, fence: &Fence, deadline: Instant) -> WriteResult {
        let store = &*self.store;
        let PendingWrite {
            cand,
            obs,
            before,
            mut decision,
        } = p;
        let key = route_key(&cand.id);
        let mut current = cand.current.to_string();
        let mut data = cand.data;
        let mut etag = cand.etag;
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(10))
            .with_max_delay(Duration::from_millis(200))
            .with_jitter()
            .with_max_times(WRITE_ATTEMPTS)
            .build();
        let mut last_error = String::new();
        for attempt in 1..=WRITE_ATTEMPTS {
            let Some((status, reason)) = decision.write else {
                return WriteResult::Unchanged {
                    status: current,
                    counters: decision.counters,
                };
            };
            if Instant::now() >= deadline {
                last_error = "the lease deadline passed before the write".into();
                break;
            }
            let new_data = match rewrite_status(&data, status) {
                Ok(d) => d,
                Err(e) => {
                    route_invalid(&cand.id, &e.to_string());
                    return WriteResult::Gone;
                }
            };
            match store
                .update_fenced(StoreKind::Public, &key, &new_data, &etag, fence)
                .await
            {
                Err(StoreError::Fenced { .. }) => return WriteResult::Fenced,
                Ok(()) => {
                    status_changed(&cand.id, &current, status, reason);
                    return WriteResult::Written {
                        status,
                        counters: decision.counters,
                    };
                }
                Err(StoreError::Missing { .. }) => {
                    events::RouteMissing {
                        plugin_id: cand.id.clone(),
                    }
                    .emit();
                    return WriteResult::Gone;
                }
                Err(e) => {
                    if e.is_conflict() {
                        events::RouteWriteConflict {
                            plugin_id: cand.id.clone(),
                            attempt: attempt as u64,
                        }
                        .emit();
                    } else {
                        emit_store_error(store, StoreKind::Public, "write_route", &e);
                    }
                    last_error = e.to_string();
                    if let Some(d) = delays.next() {
                        tokio::time::sleep(
                            d.min(deadline.saturating_duration_since(Instant::now())),
                        )
                        .await;
                    }
                    // Re-read and re-decide from this tick's observation only.
                    match self.reread(&cand.id, &key).await {
                        Reread::Gone => return WriteResult::Gone,
                        Reread::Failed(e) => last_error = e,
                        Reread::Fresh(fresh, s) => {
                            current = s;
                            data = fresh.data;
                            etag = fresh.etag;
                            decision = decide(&current, before, obs, self.thresholds);
                        }
                    }
                }
            }
        }
        events::RouteWriteFailed {
            plugin_id: cand.id.clone(),
            error: last_error,
        }
        .emit();
        WriteResult::Failed { before }
    }

    /// Reads a route again after a failed write.
    async fn reread(&self, id: &str, key: &str) -> Reread {
        let store = &*self.store;
        match store.get(StoreKind::Public, key).await {
            Ok(None) => {
                events::RouteMissing {
                    plugin_id: id.to_string(),
                }
                .emit();
                Reread::Gone
            }
            Ok(Some(fresh)) => match read_status(&fresh.data) {
                Ok(s) => Reread::Fresh(fresh, s),
                Err(err) => {
                    route_invalid(id, &err.to_string());
                    Reread::Gone
                }
            },
            Err(e) => {
                emit_store_error(store, StoreKind::Public, "read_route", &e);
                Reread::Failed(e.to_string())
            }
        }
    }

    /// Dapr lets a CAS write re-create a route deleted after it was read. Read each
    /// written route back, re-read the registry, and delete (with the ETag just read) the
    /// routes of plugins that are no longer registered.
    async fn undo_resurrections(&self, written: &[String]) -> u64 {
        let store = &*self.store;
        let registry = match store.get(StoreKind::Private, REGISTRY_KEY).await {
            Ok(r) => r,
            Err(e) => {
                emit_store_error(store, StoreKind::Private, "read_registry", &e);
                return 0;
            }
        };
        let registered: HashSet<String> = registry
            .and_then(|e| parse_ids(&e.data).ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let gone: Vec<&String> = written
            .iter()
            .filter(|id| !registered.contains(*id))
            .collect();
        let mut undone = 0;
        for id in gone {
            let key = route_key(id);
            match store.get(StoreKind::Public, &key).await {
                Ok(Some(e)) => match store.delete(StoreKind::Public, &key, Some(&e.etag)).await {
                    Ok(()) => {
                        undone += 1;
                        events::RouteResurrectionUndone {
                            plugin_id: id.clone(),
                        }
                        .emit()
                    }
                    Err(err) => emit_store_error(store, StoreKind::Public, "delete_route", &err),
                },
                Ok(None) => {}
                Err(err) => emit_store_error(store, StoreKind::Public, "read_route", &err),
            }
        }
        undone
    }

    /// Saves the counters (sorted by plugin id, non-zero entries only) when they changed,
    /// with CAS on the ETag read at the start of the tick.
    async fn save_counters(&self, stored: Option<&Entry>, counters: &HashMap<String, Counters>) {
        let store = &*self.store;
        if stored.is_none() && counters.is_empty() {
            return;
        }
        let sorted: BTreeMap<&String, &Counters> = counters.iter().collect();
        let data = match serde_json::to_vec(&sorted) {
            Ok(data) => data,
            // Strings and integers always serialize; never write a partial value if not.
            Err(e) => {
                events::StoreError {
                    store: store.store_name(StoreKind::Private).to_string(),
                    operation: "write_counters".into(),
                    error: format!("cannot encode the counters: {e}"),
                }
                .emit();
                return;
            }
        };
        if stored.is_some_and(|e| e.data == data) {
            return;
        }
        let etag = stored.map_or(ABSENT_ETAG, |e| e.etag.as_str());
        if let Err(e) = store
            .save(StoreKind::Private, Save::cas(COUNTERS_KEY, &data, etag))
            .await
        {
            emit_store_error(store, StoreKind::Private, "write_counters", &e);
        }
    }
}

/// The valid registry ids; the invalid ones are reported and never requested.
fn valid_ids(ids: Vec<String>) -> Vec<String> {
    let mut valid = Vec::with_capacity(ids.len());
    for id in ids {
        match invalid_id_reason(&id) {
            None => valid.push(id),
            Some(reason) => events::InvalidPluginId {
                plugin_id: printable_id(&id),
                reason: reason.to_string(),
            }
            .emit(),
        }
    }
    valid
}

fn status_changed(id: &str, from: &str, to: RouteStatus, reason: crate::decision::Reason) {
    events::PluginStatusChanged {
        plugin_id: id.to_string(),
        from: from.to_string(),
        to: to.as_str().to_string(),
        reason: reason.as_str().to_string(),
        alert: crate::status::status_str_passes_gate(from) && !to.passes_gate(),
    }
    .emit();
}

/// The plan's tick-wide events: probes cut off at the deadline, demotions held.
fn announce_fleet(tick: &str, report: &TickReport, fleet: &Fleet) {
    if report.cut_off > 0 {
        events::ProbesCutOff {
            tick: tick.to_string(),
            plugins: report.cut_off,
        }
        .emit();
    }
    if fleet.held > 0 {
        events::DemotionsHeld {
            tick: tick.to_string(),
            count: fleet.held,
            plugin_ids: fleet.held_ids.join(","),
            share: crate::plan::share_text(fleet.share_milli()),
            limit: fleet.limit,
            eligible: fleet.eligible,
            error_kinds: fleet.held_kinds.join(","),
            alert: true,
        }
        .emit();
    }
}

fn route_invalid(id: &str, error: &str) {
    events::RouteInvalid {
        plugin_id: id.to_string(),
        error: error.to_string(),
    }
    .emit();
}

/// `--dry-run`'s write phase: says what would be written, writes nothing.
fn dry_writes(pending: Vec<PendingWrite>) -> Vec<(String, WriteResult)> {
    pending
        .into_iter()
        .map(|p| {
            if let Some((status, reason)) = p.decision.write {
                events::PluginStatusWouldChange {
                    plugin_id: p.cand.id.clone(),
                    from: p.cand.current.to_string(),
                    to: status.as_str().to_string(),
                    reason: reason.as_str().to_string(),
                }
                .emit();
            }
            let result = WriteResult::Unchanged {
                status: p.cand.current.to_string(),
                counters: p.decision.counters,
            };
            (p.cand.id, result)
        })
        .collect()
}

/// Per plugin with a decided write: the status the write left and whether it was written
/// (`None`: the route is gone). For the observations record.
type WritesLeft = HashMap<String, Option<(String, bool)>>;

/// A route read again after a failed write.
enum Reread {
    Fresh(Entry, String),
    Gone,
    Failed(String),
}

enum WriteResult {
    Written {
        status: RouteStatus,
        counters: Counters,
    },
    Unchanged {
        status: String,
        counters: Counters,
    },
    Gone,
    /// Refused because the lease is no longer held.
    Fenced,
    Failed {
        before: Counters,
    },
}
