//! Wiring: builds the store, prober and lease from [`Settings`] and runs the commands
//! (`run`, `once`, `routes`). The binary (`main.rs`) only parses, sets up logging and
//! maps results to exit codes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::{Backend, Settings};
use crate::decision::Thresholds;
use crate::events;
use crate::health::{self, Health};
use crate::lease::{Guard, Lease, LeaseError, TickKind};
use crate::probe::{ProbeSettings, Prober};
use crate::registry::{invalid_id_reason, parse_ids, REGISTRY_KEY};
use crate::route::{read_status, route_key};
use crate::secret::url_host_port;
use crate::store::dapr::DaprStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{read_each, Store, StoreError, StoreKind};
use crate::tick::{TickOutcome, Ticker};

/// Process exit codes (README: "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    LockHeld = 3,
    Interrupted = 130,
}

/// A failure that ends a command, with the message printed for the operator.
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

/// Builds the ticker for `store`.
pub fn ticker(s: &Settings, store: Arc<dyn Store>, prober: Prober) -> Ticker {
    let lease = Lease::new(
        store.clone(),
        s.holder_id.clone(),
        s.lease,
        s.schedule.interval(),
    )
    .with_foreign_ttl(s.foreign_lock_ttl);
    Ticker {
        store,
        prober: Arc::new(prober),
        lease: Arc::new(lease),
        thresholds: Thresholds {
            unhealthy: s.unhealthy_threshold,
            healthy: s.healthy_threshold,
        },
        concurrency: s.concurrency,
    }
}

/// `once`: one manual tick, then release the lock.
pub async fn once(s: &Settings) -> (Exit, Option<String>) {
    if let Err(e) = wait_for_sidecar(s, true).await {
        return (Exit::Failed, Some(e.to_string()));
    }
    let store = match build_store(s).await {
        Ok(st) => st,
        Err(e) => {
            return (
                Exit::Failed,
                Some(format!("cannot reach {}: {e}", store_endpoint(s))),
            )
        }
    };
    let prober = match build_prober(s) {
        Ok(p) => p,
        Err(e) => return (Exit::Failed, Some(e.to_string())),
    };
    once_with(&ticker(s, store, prober)).await
}

/// `once` on an existing ticker (the demo and tests use it).
pub async fn once_with(t: &Ticker) -> (Exit, Option<String>) {
    let (outcome, guard) = t.tick(TickKind::Manual(Utc::now())).await;
    let released = match &guard {
        Some(g) => release(t, g).await,
        None => true,
    };
    match outcome {
        TickOutcome::Completed(r) if r.write_failed > 0 => (
            Exit::Failed,
            Some(format!(
                "{} decided route writes still failed after retries (see route_write_failed)",
                r.write_failed
            )),
        ),
        TickOutcome::Completed(_) if !released => (
            Exit::Failed,
            Some("lock lost: the lease was taken before it could be released".into()),
        ),
        TickOutcome::Completed(_) => (Exit::Ok, None),
        TickOutcome::Skipped(reason) => (
            Exit::LockHeld,
            Some(format!(
                "skipped: the scrape_state lock is held by {}",
                match reason {
                    crate::tick::SkipReason::LockHeld { holder: Some(h) } => h,
                    _ => "another holder".into(),
                }
            )),
        ),
        TickOutcome::Failed(e) => (Exit::Failed, Some(e.to_string())),
    }
}

/// Releases a lease, logging the outcome. False when the lease was lost.
async fn release(t: &Ticker, g: &Guard) -> bool {
    match t.lease.release(g).await {
        Ok(()) => {
            events::LockReleased {
                holder: t.lease.holder().to_string(),
            }
            .emit();
            true
        }
        Err(LeaseError::Lost) => {
            events::LockLost {
                tick: g.kind.id(),
                holder: t.lease.holder().to_string(),
                alert: true,
            }
            .emit();
            false
        }
        Err(LeaseError::Store(e)) => {
            events::StoreError {
                store: t.store.store_name(StoreKind::Private).to_string(),
                operation: "release_lock".into(),
                error: e.to_string(),
            }
            .emit();
            false
        }
    }
}

/// One row of `routes`.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct RouteRow {
    pub plugin_id: String,
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `routes`: every registered plugin with its route status and, from the store, its
/// last observation (see src/observations.rs).
pub async fn routes(s: &Settings) -> Result<crate::observations::StatusReport, WorkerError> {
    wait_for_sidecar(s, false).await?;
    let store = build_store(s).await?;
    crate::observations::load(&*store)
        .await
        .map_err(|e| match e {
            crate::observations::ReportError::Store(e) => WorkerError::Store(e),
            other => WorkerError::Io(other.to_string()),
        })
}

/// The route table of `store`.
pub async fn route_table(store: &dyn Store) -> Result<Vec<RouteRow>, WorkerError> {
    let ids = match store.get(StoreKind::Private, REGISTRY_KEY).await? {
        Some(e) => parse_ids(&e.data).map_err(|e| WorkerError::Io(e.to_string()))?,
        None => Vec::new(),
    };
    let keys: Vec<String> = ids.iter().map(|id| route_key(id)).collect();
    let routes = read_each(store, StoreKind::Public, &keys, 16).await?;
    Ok(ids
        .into_iter()
        .zip(routes)
        .map(|(plugin_id, route)| {
            let (status, error) = match (invalid_id_reason(&plugin_id), route) {
                (Some(reason), _) => (None, Some(format!("invalid plugin id: {reason}"))),
                (None, Err(e)) => (None, Some(e.to_string())),
                (None, Ok(None)) => (None, None),
                (None, Ok(Some(e))) => match read_status(&e.data) {
                    Ok(st) => (Some(st), None),
                    Err(err) => (None, Some(err.to_string())),
                },
            };
            RouteRow {
                plugin_id,
                status,
                error,
            }
        })
        .collect())
}

/// `run`: tick on the schedule until `shutdown` resolves (SIGTERM / SIGINT).
pub async fn run<F>(s: &Settings, shutdown: F) -> (Exit, Option<String>)
where
    F: Future<Output = String>,
{
    tokio::pin!(shutdown);
    let interval = s.schedule.interval();
    let health = Health::new(interval);
    let listener = match health::bind(s.listen).await {
        Ok(l) => l,
        Err(e) => {
            return (
                Exit::Failed,
                Some(format!(
                    "cannot listen on {} (--listen / SCRAPER_LISTEN): {e}",
                    s.listen
                )),
            )
        }
    };
    let address = listener
        .local_addr()
        .map_or_else(|_| s.listen.to_string(), |a| a.to_string());
    events::Listening { address }.emit();
    // Status page hook: served from the start, reading the store once it is connected.
    let status_page = s.status_page.then(crate::status_page::StatusPage::new);
    let server = tokio::spawn(health::serve(listener, health.clone(), status_page.clone()));

    // Start-up: the sidecar wait and the store connection, both interruptible.
    let setup = async {
        wait_for_sidecar(s, true).await?;
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            match build_store(s).await {
                Ok(st) => return Ok::<_, WorkerError>(st),
                Err(e) => {
                    events::StoreError {
                        store: store_endpoint(s),
                        operation: "connect".into(),
                        error: e.to_string(),
                    }
                    .emit();
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
                }
            }
        }
    };
    let store = tokio::select! {
        r = setup => match r {
            Ok(st) => st,
            Err(e) => { server.abort(); return (Exit::Failed, Some(e.to_string())) }
        },
        signal = &mut shutdown => {
            events::ShutdownStarted { signal }.emit();
            events::ShutdownCompleted { tick_cancelled: false }.emit();
            server.abort();
            return (Exit::Ok, None);
        }
    };
    if let Some(page) = &status_page {
        page.set_store(store.clone());
    }
    let prober = match build_prober(s) {
        Ok(p) => p,
        Err(e) => return (Exit::Failed, Some(e.to_string())),
    };
    let ticker = Arc::new(ticker(s, store.clone(), prober));

    // Readiness: ping the store every half interval.
    let pinger = {
        let (store, health) = (store.clone(), health.clone());
        let every = (interval / 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                if store.ping().await.is_ok() {
                    health.store_answered();
                }
                tokio::time::sleep(every).await;
            }
        })
    };

    // The schedule fires into a channel; the loop below owns all tick state.
    let (tx, mut fires) = mpsc::channel::<chrono::DateTime<Utc>>(16);
    let mut scheduler = match start_scheduler(s, tx).await {
        Ok(sc) => sc,
        Err(e) => return (Exit::Failed, Some(e)),
    };
    // Live until the first fire is owed (plus two intervals).
    let now = Utc::now();
    let first_in = s
        .schedule
        .next_after(now)
        .and_then(|next| (next - now).to_std().ok())
        .unwrap_or(interval);
    health.loop_attempted_next_in(first_in);
    let mut running: Option<JoinHandle<(TickOutcome, Option<Guard>)>> = None;
    let signal = loop {
        tokio::select! {
            signal = &mut shutdown => break signal,
            Some(fired) = fires.recv() => {
                let next_in = s
                    .schedule
                    .next_after(fired)
                    .and_then(|next| (next - fired).to_std().ok())
                    .unwrap_or(interval);
                health.loop_attempted_next_in(next_in);
                let slot = s.schedule.slot_at(fired);
                if running.as_ref().is_some_and(|h| !h.is_finished()) {
                    events::TickSkipped {
                        tick: crate::schedule::tick_id(slot),
                        reason: "previous_tick_running".into(),
                        holder: None,
                    }
                    .emit();
                    continue;
                }
                if let Some(h) = running.take() {
                    // Finished: collecting it cannot block.
                    let _ = h.await;
                }
                let t = ticker.clone();
                running = Some(tokio::spawn(async move {
                    let (outcome, guard) = t.tick(TickKind::Scheduled(slot)).await;
                    // Release at once: the record keeps this tick readable for late
                    // replicas, and any replica may take the next one.
                    if let Some(g) = &guard {
                        release(&t, g).await;
                    }
                    (outcome, guard)
                }));
            }
        }
    };

    events::ShutdownStarted { signal }.emit();
    // Stop scheduling, then give a running tick the grace to finish its writes.
    let _ = scheduler.shutdown().await;
    let mut tick_cancelled = false;
    if let Some(mut h) = running.take() {
        if tokio::time::timeout(s.shutdown_grace, &mut h)
            .await
            .is_err()
        {
            h.abort();
            // Wait for the abort to land, so no write of that tick follows the release.
            let _ = h.await;
            tick_cancelled = true;
        }
    }
    // The lease is taken inside the tick; the lease keeps the newest guard, so even a
    // cancelled tick's lease is released here.
    if let Some(g) = ticker.lease.held() {
        // A lease that moved on since is not ours to release; say nothing more then.
        if let Ok(()) = ticker.lease.release(&g).await {
            events::LockReleased {
                holder: ticker.lease.holder().to_string(),
            }
            .emit();
        }
    }
    crate::metrics::metrics().lock_held(false);
    pinger.abort();
    server.abort();
    events::ShutdownCompleted { tick_cancelled }.emit();
    (Exit::Ok, None)
}

async fn start_scheduler(
    s: &Settings,
    tx: mpsc::Sender<chrono::DateTime<Utc>>,
) -> Result<JobScheduler, String> {
    let err =
        |e: tokio_cron_scheduler::JobSchedulerError| format!("scheduler failed to start: {e}");
    let scheduler = JobScheduler::new().await.map_err(err)?;
    let job = Job::new_async(s.schedule.text(), move |_id, _sched| {
        let tx = tx.clone();
        Box::pin(async move {
            // A full channel means the loop is far behind; dropping the fire is right.
            let _ = tx.try_send(Utc::now());
        })
    })
    .map_err(err)?;
    scheduler.add(job).await.map_err(err)?;
    scheduler.start().await.map_err(err)?;
    Ok(scheduler)
}
