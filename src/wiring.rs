//! Wiring: builds the store, the prober and the ticker from [`Settings`], and waits for
//! the Dapr sidecar. The commands (`worker.rs`, `demo.rs`) use it; nothing here runs a
//! tick.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;

use crate::config::{Backend, Settings};
use crate::decision::Thresholds;
use crate::events;
use crate::lease::Lease;
use crate::observer::Observer;
use crate::probe::{ProbeSettings, Prober};
use crate::secret::url_host_port;
use crate::store::dapr::DaprStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{Store, StoreError};
use crate::tick::Ticker;

/// A failure while wiring the worker, with the message printed for the operator.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the Dapr sidecar at {endpoint} did not become ready within {waited}: {last_error}")]
    SidecarNotReady {
        endpoint: String,
        waited: String,
        last_error: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Probe(String),
    #[error("{0}")]
    Io(String),
}

/// Builds the configured store backend.
pub async fn build_store(s: &Settings) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match s.backend {
        Backend::Memory => Arc::new(MemoryStore::new(&s.public_store, &s.private_store)),
        Backend::Redis => {
            // Validated at start: the redis backend always has a URL.
            let url = s.redis_url.as_ref().map(|u| u.expose()).unwrap_or_default();
            Arc::new(
                RedisStore::connect(
                    url,
                    &s.public_store,
                    &s.private_store,
                    &s.private_key_prefix,
                )
                .await?,
            )
        }
        Backend::Dapr => Arc::new(
            DaprStore::connect(
                &s.dapr_grpc_endpoint,
                s.dapr_api_token.clone(),
                &s.public_store,
                &s.private_store,
            )
            .await?,
        ),
    })
}

/// Builds the prober; the Dapr API token goes only to the sidecar's origin.
pub fn build_prober(s: &Settings) -> Result<Prober, WorkerError> {
    Prober::new(ProbeSettings {
        url_template: s.status_url.clone(),
        timeout: s.probe_timeout,
        retries: s.retries,
        concurrency: s.concurrency,
        dapr_api_token: s.dapr_api_token.clone(),
        sidecar_origin: Some(s.dapr_http_endpoint.clone()),
        // Status calls through the sidecar: its own failures are told apart.
        dapr_invoke: status_via_sidecar(s),
    })
    .map_err(|e| WorkerError::Probe(e.to_string()))
}

/// Where the store lives, for messages (never a password).
pub fn store_endpoint(s: &Settings) -> String {
    match s.backend {
        Backend::Memory => "the embedded store".into(),
        Backend::Redis => format!(
            "redis at {}",
            s.redis_url
                .as_ref()
                .map_or_else(String::new, |u| url_host_port(u.expose()))
        ),
        Backend::Dapr => format!("the Dapr sidecar at {}", s.dapr_grpc_endpoint),
    }
}

/// Whether status calls go through the sidecar's service invocation.
pub fn status_via_sidecar(s: &Settings) -> bool {
    s.status_url
        .starts_with(&format!("{}/", s.dapr_http_endpoint))
}

/// Waits for the sidecar's outbound readiness (`GET /v1.0/healthz/outbound`, served
/// without a token), with backoff, up to `--sidecar-wait`. No-op for other backends.
pub async fn wait_for_sidecar(s: &Settings, probes: bool) -> Result<(), WorkerError> {
    let needed = s.backend == Backend::Dapr || (probes && status_via_sidecar(s));
    if !needed {
        return Ok(());
    }
    let url = format!("{}/v1.0/healthz/outbound", s.dapr_http_endpoint);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| WorkerError::Io(format!("cannot build an HTTP client: {e}")))?;
    let deadline = Instant::now() + s.sidecar_wait;
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let error = match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("HTTP {}", r.status().as_u16()),
            Err(e) if e.is_connect() => "connection refused".to_string(),
            Err(e) if e.is_timeout() => "timed out".to_string(),
            Err(_) => "request failed".to_string(),
        };
        events::SidecarWaiting {
            endpoint: s.dapr_http_endpoint.clone(),
            attempt,
            error: error.clone(),
        }
        .emit();
        let now = Instant::now();
        if now >= deadline {
            return Err(WorkerError::SidecarNotReady {
                endpoint: url,
                waited: humantime::format_duration(s.sidecar_wait).to_string(),
                last_error: error,
            });
        }
        let d = delays.next().unwrap_or(Duration::from_secs(1));
        tokio::time::sleep(d.min(deadline - now)).await;
    }
}

/// Builds the ticker for `store`: the lease, the thresholds, the fleet guard, the
/// observer's own check and `--dry-run`.
pub fn ticker(s: &Settings, store: Arc<dyn Store>, prober: Prober) -> Ticker {
    let interval = s.schedule.interval();
    let lease = Lease::new(store.clone(), s.holder_id.clone(), s.lease, interval)
        .with_foreign_ttl(s.foreign_lock_ttl);
    // W: whole intervals in the window.
    let window_ticks = s.guard_window.as_millis() / interval.as_millis().max(1);
    let observer = Observer::for_template(
        &s.status_url,
        status_via_sidecar(s),
        &s.dapr_http_endpoint,
        s.probe_timeout,
    );
    Ticker::new(
        store,
        Arc::new(prober),
        Arc::new(lease),
        Thresholds {
            unhealthy: s.unhealthy_threshold,
            healthy: s.healthy_threshold,
        },
        s.concurrency,
    )
    .with_guard(
        s.max_failed_share_milli,
        u32::try_from(window_ticks).unwrap_or(u32::MAX),
    )
    .with_observer(observer)
    .with_dry_run(s.dry_run)
}
