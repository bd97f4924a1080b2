//! Every event the worker can emit, as a type with one emit site.
//!
//! `emit()` writes the log line (one JSON object per line under `--log-format json`,
//! with `timestamp`, `level`, `event` and the fields at top level) and updates the
//! matching metric in the same place, so logs and metrics never drift apart. The
//! [`CATALOG`] lists every event with its level, fields and whether it can page an
//! operator; the README's event catalog is checked against it by a test.

use crate::metrics::{metrics, Metrics};

/// An event's entry in the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSpec {
    pub name: &'static str,
    pub level: &'static str,
    /// `always`, `never` or `when ...`: when the event carries `"alert": true`.
    pub alert: &'static str,
    pub fields: &'static [&'static str],
    pub meaning: &'static str,
}

/// Updates the metric that belongs to an event. Every event implements it, so adding an
/// event forces a decision about its metric.
trait Meter {
    fn meter(&self, _m: &Metrics) {}
}

macro_rules! events {
    ($(
        $(#[doc = $doc:literal])+
        $ty:ident = $name:literal, $level:ident, alert: $alert:literal {
            $( $field:ident : $fty:ty ),* $(,)?
        }
    )*) => {
        $(
            $(#[doc = $doc])+
            #[derive(Debug, Clone, PartialEq)]
            pub struct $ty { $( pub $field: $fty, )* }

            impl $ty {
                pub const NAME: &'static str = $name;

                /// Writes the log line and updates the metric.
                pub fn emit(&self) {
                    self.meter(metrics());
                    tracing::event!(
                        target: "keel_scraper::events",
                        tracing::Level::$level,
                        event = $name,
                        $( $field = &self.$field, )*
                    );
                }
            }
        )*

        /// Every event the worker can emit.
        pub const CATALOG: &[EventSpec] = &[
            $( EventSpec {
                name: $name,
                level: stringify!($level),
                alert: $alert,
                fields: &[ $( stringify!($field) ),* ],
                meaning: concat!($( $doc ),+),
            }, )*
        ];
    };
}

events! {
    /// A scheduled or manual tick began (the lock is being taken).
    TickStarted = "tick_started", DEBUG, alert: "never" { tick: String, holder: String }
    /// A tick finished: every decided write was attempted.
    TickCompleted = "tick_completed", INFO, alert: "never" {
        tick: String, holder: String, plugins: u64, probed_ok: u64, probe_failed: u64,
        routes_changed: u64, write_failed: u64, held: u64, blocked_for_failures: u64,
        duration_ms: u64,
    }
    /// A tick did not run here: `previous_tick_running`, `lock_held` (another holder's lease is live), `already_scraped` (the tick was scraped by another replica) or `standing_back` (this replica held demotions last tick, or its own check still fails after `observer_unhealthy`).
    TickSkipped = "tick_skipped", INFO, alert: "never" { tick: String, reason: String, holder: Option<String> }
    /// A tick could not run or finish (store unreachable, registry unreadable, lock lost, observer unhealthy).
    TickFailed = "tick_failed", ERROR, alert: "always" { tick: String, error: String, alert: bool }
    /// This replica took the scrape_state lease.
    LockAcquired = "lock_acquired", INFO, alert: "never" { tick: String, holder: String, lease_ms: u64, takeover: bool }
    /// This replica released the lease: at the end of every tick it took (`run`, `once`, `demo`), and on a graceful stop for a tick cancelled mid-way.
    LockReleased = "lock_released", INFO, alert: "never" { holder: String }
    /// The holder found its lease taken before it finished; it wrote nothing more.
    LockLost = "lock_lost", ERROR, alert: "always" { tick: String, holder: String, alert: bool }
    /// A route's status was written.
    PluginStatusChanged = "plugin_status_changed", WARN, alert: "when `from` passes the gate and `to` does not" {
        plugin_id: String, from: String, to: String, reason: String, alert: bool,
    }
    /// A plugin's `/v1/status` probe failed (after retries).
    PluginProbeFailed = "plugin_probe_failed", WARN, alert: "never" {
        plugin_id: String, error_kind: String, consecutive_failures: u64, detail: String,
        http_status: Option<u64>, dapr_error_code: Option<String>,
    }
    /// The fleet guard held this tick's guarded demotions: `count` routes would have become FAILED, bringing B to `share` of E (`eligible` plugins) above `limit`; `plugin_ids` names the first few, `error_kinds` the kinds seen. Pages every tick until the failures end or `--max-failed-share 1`.
    DemotionsHeld = "demotions_held", WARN, alert: "always" {
        tick: String, count: u64, plugin_ids: String, share: String, limit: u64, eligible: u64,
        error_kinds: String, alert: bool,
    }
    /// The worker's own path to the plugins is broken (`observer`: its sidecar or the one status host): this tick's failed probes were not observations, the tick failed.
    ObserverUnhealthy = "observer_unhealthy", ERROR, alert: "always" { tick: String, observer: String, error: String, alert: bool }
    /// `--dry-run`: this route's status would have been written; nothing was.
    PluginStatusWouldChange = "plugin_status_would_change", INFO, alert: "never" {
        plugin_id: String, from: String, to: String, reason: String,
    }
    /// Probes still running at the tick's probe deadline were cut off; they count as no observation.
    ProbesCutOff = "probes_cut_off", WARN, alert: "never" { tick: String, plugins: u64 }
    /// A route changed between read and write; it is re-read and the decision re-applied.
    RouteWriteConflict = "route_write_conflict", INFO, alert: "never" { plugin_id: String, attempt: u64 }
    /// A decided route write still failed after retries.
    RouteWriteFailed = "route_write_failed", ERROR, alert: "never" { plugin_id: String, error: String }
    /// A registered plugin has no route (or it was deleted during the tick); it is skipped, never created.
    RouteMissing = "route_missing", WARN, alert: "never" { plugin_id: String }
    /// A route's stored value is malformed or unreadable; it is left as it is and the other plugins proceed.
    RouteInvalid = "route_invalid", WARN, alert: "never" { plugin_id: String, error: String }
    /// A route deleted during the tick was re-created by a write (Dapr cannot refuse that) and deleted again.
    RouteResurrectionUndone = "route_resurrection_undone", WARN, alert: "never" { plugin_id: String }
    /// The registry is missing or empty; `location` shows the exact stored key (a wrong key prefix shows here).
    RegistryEmpty = "registry_empty", WARN, alert: "never" { store: String, key: String, location: String }
    /// A registry id that is not 1 to 63 ASCII letters, digits, `-` or `_`; it is never requested.
    InvalidPluginId = "invalid_plugin_id", WARN, alert: "never" { plugin_id: String, reason: String }
    /// A store (or sidecar) operation failed.
    StoreError = "store_error", ERROR, alert: "never" { store: String, operation: String, error: String }
    /// Start-up is waiting for the Dapr sidecar to answer.
    SidecarWaiting = "sidecar_waiting", INFO, alert: "never" { endpoint: String, attempt: u64, error: String }
    /// The metrics and health server listens on `address`.
    Listening = "listening", INFO, alert: "never" { address: String }
    /// A signal arrived: scheduling stopped, a running tick gets the shutdown grace.
    ShutdownStarted = "shutdown_started", INFO, alert: "never" { signal: String }
    /// Shutdown finished; the process exits.
    ShutdownCompleted = "shutdown_completed", INFO, alert: "never" { tick_cancelled: bool }
}

impl Meter for TickStarted {}
impl Meter for TickCompleted {
    fn meter(&self, m: &Metrics) {
        m.tick_completed(self.duration_ms);
        m.demotions_held(self.held);
        m.blocked_for_failures(self.blocked_for_failures);
    }
}
impl Meter for DemotionsHeld {
    fn meter(&self, m: &Metrics) {
        m.demotions_held_total(self.count);
    }
}
impl Meter for ObserverUnhealthy {
    fn meter(&self, m: &Metrics) {
        m.observer_unhealthy();
        m.demotions_held(0);
    }
}
impl Meter for PluginStatusWouldChange {}
impl Meter for TickSkipped {
    fn meter(&self, m: &Metrics) {
        m.tick_outcome("skipped");
        // Skipped because another replica holds the lease or scraped the tick: this one
        // does not hold it (a tick still running here keeps its lease).
        if self.reason != "previous_tick_running" {
            m.lock_held(false);
        }
    }
}
impl Meter for TickFailed {
    fn meter(&self, m: &Metrics) {
        m.tick_outcome("failed");
    }
}
impl Meter for LockAcquired {
    fn meter(&self, m: &Metrics) {
        m.lock_held(true);
        m.lease_taken(self.lease_ms);
    }
}
impl Meter for LockReleased {
    fn meter(&self, m: &Metrics) {
        m.lock_held(false);
    }
}
impl Meter for LockLost {
    fn meter(&self, m: &Metrics) {
        m.lock_held(false);
    }
}
impl Meter for PluginStatusChanged {
    fn meter(&self, m: &Metrics) {
        m.route_write("written");
    }
}
impl Meter for PluginProbeFailed {
    fn meter(&self, m: &Metrics) {
        m.probe_failure(&self.error_kind);
    }
}
impl Meter for ProbesCutOff {}
impl Meter for RouteWriteConflict {
    fn meter(&self, m: &Metrics) {
        m.route_write("conflict");
    }
}
impl Meter for RouteWriteFailed {
    fn meter(&self, m: &Metrics) {
        m.route_write("failed");
    }
}
impl Meter for RouteMissing {}
impl Meter for RouteInvalid {}
impl Meter for RouteResurrectionUndone {
    fn meter(&self, m: &Metrics) {
        m.route_write("resurrection_undone");
    }
}
impl Meter for RegistryEmpty {}
impl Meter for InvalidPluginId {}
impl Meter for StoreError {
    fn meter(&self, m: &Metrics) {
        m.store_error(&self.operation);
    }
}
impl Meter for SidecarWaiting {}
impl Meter for Listening {}
impl Meter for ShutdownStarted {}
impl Meter for ShutdownCompleted {
    fn meter(&self, m: &Metrics) {
        // Whatever happened to a cancelled tick's lease, this process holds none now.
        m.lock_held(false);
    }
}

/// The README's event catalog table, rendered from [`CATALOG`].
pub fn catalog_markdown() -> String {
    let mut out =
        String::from("| event | level | alert | fields | meaning |\n|---|---|---|---|---|\n");
    for e in CATALOG {
        let fields = e
            .fields
            .iter()
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            e.name,
            e.level,
            e.alert,
            fields,
            e.meaning.trim()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_names_are_unique_snake_case() {
        let mut names: Vec<_> = CATALOG.iter().map(|e| e.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CATALOG.len());
        for n in names {
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{n}"
            );
        }
    }

    #[test]
    fn alerting_events_carry_the_alert_field() {
        for e in CATALOG {
            assert_eq!(
                e.alert != "never",
                e.fields.contains(&"alert"),
                "{}",
                e.name
            );
        }
    }
}
