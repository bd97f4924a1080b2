//! Prometheus metrics, all prefixed `keel_scraper_`, served as text on `GET /metrics`
//! in the format the scraper asks for ([`negotiate`]).
//! Updated from event emit sites (see [`crate::events`]), with two exceptions, both in
//! `tick.rs`: the probe duration histogram (observed per probe, which has no event of
//! its own when it succeeds) and the per-status plugin gauge (set from the tick's tally).

mod exposition;
pub use exposition::{negotiate, to_classic, Format};

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// A running total exposed as an untyped sample under its full name: the OpenMetrics
/// counter family `demotions_held` would clash with the gauge of the same name, so
/// `keel_scraper_demotions_held_total` is its own (unknown-typed) family.
#[derive(Clone, Debug, Default)]
struct Total(Counter);

impl prometheus_client::encoding::EncodeMetric for Total {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Unknown
    }
}

pub struct Metrics {
    registry: Registry,
    ticks: Family<Labels, Counter>,
    tick_duration: Histogram,
    probe_duration: Histogram,
    probe_failures: Family<Labels, Counter>,
    route_writes: Family<Labels, Counter>,
    plugins: Family<Labels, Gauge>,
    lock_held: Gauge,
    last_tick_completed: Gauge<f64, AtomicU64>,
    lease: Gauge<f64, AtomicU64>,
    store_errors: Family<Labels, Counter>,
    demotions_held: Gauge,
    demotions_held_total: Total,
    blocked_for_failures: Gauge,
    observer_unhealthy: Counter,
}

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keel_scraper");
        let ticks = Family::<Labels, Counter>::default();
        registry.register(
            "ticks",
            "Ticks by outcome (completed, skipped, failed)",
            ticks.clone(),
        );
        let tick_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "tick_duration_seconds",
            "Duration of completed ticks",
            tick_duration.clone(),
        );
        let probe_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "probe_duration_seconds",
            "Duration of /v1/status probes, retries included",
            probe_duration.clone(),
        );
        let probe_failures = Family::<Labels, Counter>::default();
        registry.register(
            "probe_failures",
            "Failed probes by error_kind",
            probe_failures.clone(),
        );
        let route_writes = Family::<Labels, Counter>::default();
        registry.register(
            "route_writes",
            "Route writes by outcome (written, conflict, failed, resurrection_undone)",
            route_writes.clone(),
        );
        let plugins = Family::<Labels, Gauge>::default();
        registry.register(
            "plugins",
            "Registered plugins by route status after the last completed tick",
            plugins.clone(),
        );
        let lock_held = Gauge::default();
        registry.register(
            "lock_held",
            "1 while this replica holds the scrape_state lease",
            lock_held.clone(),
        );
        let last_tick_completed = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_tick_completed_timestamp_seconds",
            "Unix time of the last tick completed by this replica",
            last_tick_completed.clone(),
        );
        let lease = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "lease_seconds",
            "The lease this replica last took the scrape_state lock with",
            lease.clone(),
        );
        let store_errors = Family::<Labels, Counter>::default();
        registry.register(
            "store_errors",
            "Store or sidecar operations that failed, by operation",
            store_errors.clone(),
        );
        let (demotions_held, demotions_held_total, blocked_for_failures, observer_unhealthy) =
            register_guard(&mut registry);
        // Make the outcome series exist from the start, so rate() and absent() work.
        for o in ["completed", "skipped", "failed"] {
            let _ = ticks.get_or_create(&label("outcome", o));
        }
        Metrics {
            registry,
            ticks,
            tick_duration,
            probe_duration,
            probe_failures,
            route_writes,
            plugins,
            lock_held,
            last_tick_completed,
            lease,
            store_errors,
            demotions_held,
            demotions_held_total,
            blocked_for_failures,
            observer_unhealthy,
        }
    }

    pub fn tick_outcome(&self, outcome: &str) {
        self.ticks.get_or_create(&label("outcome", outcome)).inc();
    }

    pub fn tick_completed(&self, duration_ms: u64) {
        self.tick_outcome("completed");
        self.tick_duration.observe(duration_ms as f64 / 1000.0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_tick_completed.set(now);
    }

    pub fn probe_duration(&self, seconds: f64) {
        self.probe_duration.observe(seconds);
    }

    pub fn probe_failure(&self, kind: &str) {
        self.probe_failures
            .get_or_create(&label("error_kind", kind))
            .inc();
    }

    pub fn route_write(&self, outcome: &str) {
        self.route_writes
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    pub fn lock_held(&self, held: bool) {
        self.lock_held.set(i64::from(held));
    }

    pub fn lease_taken(&self, lease_ms: u64) {
        self.lease.set(lease_ms as f64 / 1000.0);
    }

    pub fn store_error(&self, operation: &str) {
        self.store_errors
            .get_or_create(&label("operation", operation))
            .inc();
    }

    pub fn demotions_held(&self, n: u64) {
        self.demotions_held
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn demotions_held_total(&self, n: u64) {
        self.demotions_held_total.0.inc_by(n);
    }

    pub fn observer_unhealthy(&self) {
        self.observer_unhealthy.inc();
    }

    pub fn blocked_for_failures(&self, n: u64) {
        self.blocked_for_failures
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Replaces the per-status plugin gauge with this tick's counts.
    pub fn plugins_by_status(&self, counts: &[(&str, i64)]) {
        self.plugins.clear();
        for (status, n) in counts {
            self.plugins.get_or_create(&label("status", status)).set(*n);
        }
    }

    /// The text exposition in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics { .. } => out,
            Format::Classic => to_classic(&out),
        }
    }
}

/// The fleet guard's and the observer's metrics (README: "Mass-failure guard").
fn register_guard(registry: &mut Registry) -> (Gauge, Total, Gauge, Counter) {
    let demotions_held = Gauge::default();
    registry.register(
        "demotions_held",
        "Guarded demotions the fleet guard held in this replica's last tick",
        demotions_held.clone(),
    );
    let demotions_held_total = Total::default();
    registry.register(
        "demotions_held_total",
        "Guarded demotions the fleet guard held, all ticks",
        demotions_held_total.clone(),
    );
    let blocked_for_failures = Gauge::default();
    registry.register(
        "plugins_blocked_for_failures",
        "Plugins blocked for failures at the start of this replica's last tick",
        blocked_for_failures.clone(),
    );
    let observer_unhealthy = Counter::default();
    registry.register(
        "observer_unhealthy",
        "Ticks whose failed probes were the observer's own (sidecar or status host unreachable)",
        observer_unhealthy.clone(),
    );
    (
        demotions_held,
        demotions_held_total,
        blocked_for_failures,
        observer_unhealthy,
    )
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
