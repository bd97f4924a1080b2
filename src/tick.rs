//! One tick: lease -> registry -> routes and probes (concurrently) -> decisions -> fence ->
//! route writes -> counters.
//!
//! Invariants kept here:
//! - Nothing is written unless this replica holds the lease, and the lease is confirmed
//!   (ETag unchanged) right before the write phase.
//! - A route is rewritten only through [`Store::update_fenced`] with the ETag it was read
//!   with and the lease as its fence, keeping every other field; on conflict it is re-read and only the status
//!   decision is re-applied, from this tick's observation.
//! - A route that is missing is never created; one that is malformed is never written.
//! - Probes still running at the probe deadline are not observations: no counter moves and
//!   no status changes for them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::stream::{self, StreamExt};
use tokio::time::Instant;

use crate::decision::{decide, Counters, Decision, Observation, Thresholds};
use crate::events;
use crate::lease::{Acquire, Guard, Lease, LeaseError, TickKind};
use crate::metrics::metrics;
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
    pub duration: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    PreviousTickRunning,
    LockHeld { holder: Option<String> },
    AlreadyScraped,
}

impl SkipReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            SkipReason::PreviousTickRunning => "previous_tick_running",
            SkipReason::LockHeld { .. } => "lock_held",
            SkipReason::AlreadyScraped => "already_scraped",
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
    current: String,
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

fn emit_store_error(store: &dyn Store, kind: StoreKind, operation: &str, e: &StoreError) {
    events::StoreError {
        store: store.store_name(kind).to_string(),
        operation: operation.to_string(),
        error: e.to_string(),
    }
    .emit();
}

impl Ticker {
    /// Runs one tick and logs its outcome. On success the lease is still held (the
    /// caller decides whether to release it) and is returned with the outcome.
    pub async fn tick(&self, kind: TickKind) -> (TickOutcome, Option<Guard>) {
        let tick = kind.id();
        let holder = self.lease.holder().to_string();
        events::TickStarted {
            tick: tick.clone(),
            holder: holder.clone(),
        }
        .emit();
        let guard = match self.lease.acquire(kind).await {
            Ok(Acquire::Acquired(g)) => g,
            Ok(Acquire::Held { holder: by }) => {
                let reason = SkipReason::LockHeld { holder: by.clone() };
                events::TickSkipped {
                    tick,
                    reason: reason.as_str().into(),
                    holder: by,
                }
                .emit();
                return (TickOutcome::Skipped(reason), None);
            }
            Ok(Acquire::AlreadyScraped { .. }) => {
                let reason = SkipReason::AlreadyScraped;
                events::TickSkipped {
                    tick,
                    reason: reason.as_str().into(),
                    holder: None,
                }
                .emit();
                return (TickOutcome::Skipped(reason), None);
            }
            Err(e) => {
                emit_store_error(&*self.store, StoreKind::Private, "acquire_lock", &e);
                return (self.fail(&tick, TickError::Store(e)), None);
            }
        };
        events::LockAcquired {
            tick: tick.clone(),
            holder: holder.clone(),
            lease_ms: u64::try_from(self.lease.lease().as_millis()).unwrap_or(u64::MAX),
            takeover: guard.takeover,
        }
        .emit();
        let outcome = match self.scrape(&guard, &tick).await {
            Ok(report) => {
                events::TickCompleted {
                    tick: tick.clone(),
                    holder,
                    plugins: report.plugins,
                    probed_ok: report.probed_ok,
                    probe_failed: report.probe_failed,
                    routes_changed: report.routes_changed,
                    write_failed: report.write_failed,
                    duration_ms: u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
                }
                .emit();
                TickOutcome::Completed(report)
            }
            Err(TickError::LockLost) => {
                events::LockLost {
                    tick: tick.clone(),
                    holder,
                    alert: true,
                }
                .emit();
                return (self.fail(&tick, TickError::LockLost), None);
            }
            Err(e) => self.fail(&tick, e),
        };
        (outcome, Some(guard))
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

    fn deadlines(&self, guard: &Guard) -> (Instant, Instant) {
        let lease = self.lease.lease();
        // Probing stops a fifth of the lease before it ends, leaving that for writes;
        // writes stop shortly before the lease ends so none lands after it.
        let probe_deadline = guard.started + lease - lease / 5;
        let write_deadline = guard.started + lease - (lease / 20).min(Duration::from_millis(250));
        (probe_deadline, write_deadline)
    }

    async fn scrape(&self, guard: &Guard, tick: &str) -> Result<TickReport, TickError> {
        let store = &*self.store;
        let (probe_deadline, write_deadline) = self.deadlines(guard);

        // Registry and counters, from the private store.
        let keys = [REGISTRY_KEY.to_string(), COUNTERS_KEY.to_string()];
        let mut private = read_each(store, StoreKind::Private, &keys, 2)
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
        let stored_counters: HashMap<String, Counters> = match &counters_entry {
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

        let mut valid = Vec::with_capacity(ids.len());
        for id in &ids {
            match invalid_id_reason(id) {
                None => valid.push(id.as_str()),
                Some(reason) => events::InvalidPluginId {
                    plugin_id: printable_id(id),
                    reason: reason.to_string(),
                }
                .emit(),
            }
        }

        // Routes (in bulk, public store) are read while the plugins are probed: every valid
        // registered id is probed, so neither waits for the other. A failed read still
        // fails the tick before anything is decided or written.
        let route_keys: Vec<String> = valid.iter().map(|id| route_key(id)).collect();
        let (routes, timed) = tokio::join!(
            read_each(store, StoreKind::Public, &route_keys, self.concurrency),
            self.prober.probe_all_timed(&valid, probe_deadline),
        );
        let routes =
            routes.inspect_err(|e| emit_store_error(store, StoreKind::Public, "read_routes", e))?;
        let m = metrics();
        let mut candidates = Vec::with_capacity(valid.len());
        let mut statuses: HashMap<String, i64> = HashMap::new();
        for ((id, route), (outcome, took)) in valid.iter().zip(routes).zip(timed) {
            if !matches!(outcome, ProbeOutcome::CutOff) {
                m.probe_duration(took.as_secs_f64());
            }
            let route = match route {
                Ok(route) => route,
                Err(e) => {
                    // One unreadable key: that route is left alone, the others proceed.
                    events::RouteInvalid {
                        plugin_id: id.to_string(),
                        error: e.to_string(),
                    }
                    .emit();
                    *statuses.entry("invalid".into()).or_default() += 1;
                    continue;
                }
            };
            let Some(entry) = route else {
                events::RouteMissing {
                    plugin_id: id.to_string(),
                }
                .emit();
                *statuses.entry("missing".into()).or_default() += 1;
                continue;
            };
            match read_status(&entry.data) {
                Ok(current) => candidates.push((
                    Candidate {
                        id: id.to_string(),
                        current,
                        data: entry.data,
                        etag: entry.etag,
                    },
                    outcome,
                )),
                Err(e) => {
                    events::RouteInvalid {
                        plugin_id: id.to_string(),
                        error: e.to_string(),
                    }
                    .emit();
                    *statuses.entry("invalid".into()).or_default() += 1;
                }
            }
        }

        // Observations hook (1/3): what each plugin answered, before the decisions below
        // consume it (see src/observations.rs).
        let observed = crate::observations::observed(
            candidates
                .iter()
                .map(|(c, o)| (c.id.as_str(), c.current.as_str(), o)),
        );

        let mut report = TickReport {
            tick: tick.to_string(),
            plugins: ids.len() as u64,
            ..TickReport::default()
        };
        let mut new_counters: HashMap<String, Counters> = HashMap::new();
        let mut pending = Vec::new();
        for (cand, outcome) in candidates {
            let before = stored_counters.get(&cand.id).copied().unwrap_or_default();
            let obs = match outcome {
                ProbeOutcome::Reported(s) => {
                    report.probed_ok += 1;
                    Observation::Reported(s)
                }
                ProbeOutcome::Failed(f) => {
                    report.probe_failed += 1;
                    events::PluginProbeFailed {
                        plugin_id: cand.id.clone(),
                        error_kind: f.kind.as_str().to_string(),
                        consecutive_failures: u64::from(before.failures) + 1,
                        detail: f.detail.clone(),
                        http_status: f.http_status.map(u64::from),
                        dapr_error_code: f.dapr_error_code.clone(),
                    }
                    .emit();
                    Observation::ProbeFailed
                }
                ProbeOutcome::CutOff => {
                    report.cut_off += 1;
                    if !before.is_zero() {
                        new_counters.insert(cand.id.clone(), before);
                    }
                    *statuses.entry(cand.current.clone()).or_default() += 1;
                    continue;
                }
            };
            let decision = decide(&cand.current, before, obs, self.thresholds);
            if decision.write.is_some() {
                pending.push(PendingWrite {
                    cand,
                    obs,
                    before,
                    decision,
                });
            } else {
                if !decision.counters.is_zero() {
                    new_counters.insert(cand.id.clone(), decision.counters);
                }
                *statuses.entry(cand.current).or_default() += 1;
            }
        }
        if report.cut_off > 0 {
            events::ProbesCutOff {
                tick: tick.to_string(),
                plugins: report.cut_off,
            }
            .emit();
        }

        // Fence: confirm the lease before writing anything.
        match self.lease.confirm(guard).await {
            Ok(()) => {}
            Err(LeaseError::Lost) => return Err(TickError::LockLost),
            Err(LeaseError::Store(e)) => {
                emit_store_error(store, StoreKind::Private, "confirm_lock", &e);
                return Err(TickError::Store(e));
            }
        }

        let fence = guard.fence();
        let fence = &fence;
        let results: Vec<(String, WriteResult)> = stream::iter(pending)
            .map(|p| async move {
                let id = p.cand.id.clone();
                (id, self.write_route(p, fence, write_deadline).await)
            })
            .buffer_unordered(self.concurrency.max(1))
            .collect()
            .await;

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
        let after: HashMap<String, Option<(String, bool)>> = results
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
            match result {
                WriteResult::Written { status, counters } => {
                    report.routes_changed += 1;
                    *statuses.entry(status.as_str().into()).or_default() += 1;
                    if !counters.is_zero() {
                        new_counters.insert(id.clone(), counters);
                    }
                    written.push(id);
                }
                WriteResult::Unchanged { status, counters } => {
                    *statuses.entry(status).or_default() += 1;
                    if !counters.is_zero() {
                        new_counters.insert(id, counters);
                    }
                }
                WriteResult::Gone | WriteResult::Fenced => {}
                WriteResult::Failed { before } => {
                    report.write_failed += 1;
                    if !before.is_zero() {
                        new_counters.insert(id, before);
                    }
                }
            }
        }

        if !store.update_checks_existence() && !written.is_empty() {
            // An undone write changed nothing that stays: do not count it as a change.
            let undone = self.undo_resurrections(&written).await;
            report.routes_changed -= undone.min(report.routes_changed);
        }

        self.save_counters(counters_entry.as_ref(), &new_counters)
            .await;

        // Observations hook (3/3): the last observation of every plugin and this tick as
        // the last completed, both fenced by the lease.
        crate::observations::save(
            store,
            fence,
            &crate::observations::LastTick {
                tick: tick.to_string(),
                holder: self.lease.holder().to_string(),
                completed_at: crate::observations::rfc3339(chrono::Utc::now().timestamp()),
            },
            guard.kind.time().timestamp(),
            crate::observations::seen(observed, &after),
        )
        .await;

        let mut counts: Vec<(&str, i64)> = statuses.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        counts.sort();
        metrics().plugins_by_status(&counts);
        report.duration = guard.started.elapsed();
        Ok(report)
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
        let mut current = cand.current;
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
                    events::RouteInvalid {
                        plugin_id: cand.id.clone(),
                        error: e.to_string(),
                    }
                    .emit();
                    return WriteResult::Gone;
                }
            };
            match store
                .update_fenced(StoreKind::Public, &key, &new_data, &etag, fence)
                .await
            {
                Err(StoreError::Fenced { .. }) => return WriteResult::Fenced,
                Ok(()) => {
                    events::PluginStatusChanged {
                        plugin_id: cand.id.clone(),
                        from: current.clone(),
                        to: status.as_str().to_string(),
                        reason: reason.as_str().to_string(),
                        alert: crate::status::status_str_passes_gate(&current)
                            && !status.passes_gate(),
                    }
                    .emit();
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
                    match store.get(StoreKind::Public, &key).await {
                        Ok(None) => {
                            events::RouteMissing {
                                plugin_id: cand.id.clone(),
                            }
                            .emit();
                            return WriteResult::Gone;
                        }
                        Ok(Some(fresh)) => match read_status(&fresh.data) {
                            Ok(s) => {
                                current = s;
                                data = fresh.data;
                                etag = fresh.etag;
                                decision = decide(&current, before, obs, self.thresholds);
                            }
                            Err(err) => {
                                events::RouteInvalid {
                                    plugin_id: cand.id.clone(),
                                    error: err.to_string(),
                                }
                                .emit();
                                return WriteResult::Gone;
                            }
                        },
                        Err(e) => {
                            emit_store_error(store, StoreKind::Public, "read_route", &e);
                            last_error = e.to_string();
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
