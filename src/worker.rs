//! The commands `run`, `once` and `routes`, on top of the wiring (`wiring.rs`) and the
//! tick (`tick.rs`, which owns its lease). The binary (`main.rs`) only parses, sets up
//! logging and prints a [`CommandError`] with its exit code.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::Settings;
use crate::events;
use crate::health::{self, Health};
use crate::lease::TickKind;
use crate::registry::{parse_ids, REGISTRY_KEY};
use crate::route::route_key;
use crate::store::{read_each, Store, StoreError, StoreKind};
use crate::tick::{SkipReason, TickError, TickOutcome, Ticker};
pub use crate::wiring::WorkerError;
use crate::wiring::{build_prober, build_store, store_endpoint, ticker, wait_for_sidecar};

/// Process exit codes (README: "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    LockHeld = 3,
    Interrupted = 130,
}

/// Why a command did not succeed: the message printed for the operator, and
/// [`CommandError::exit`], the process exit code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Wiring(#[from] WorkerError),
    #[error("cannot reach {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        source: StoreError,
    },
    #[error("cannot listen on {address} (--listen / SCRAPER_LISTEN): {error}")]
    Listen { address: String, error: String },
    #[error("scheduler failed to start: {0}")]
    Scheduler(String),
    #[error(transparent)]
    Tick(TickError),
    #[error("{0} decided route writes still failed after retries (see route_write_failed)")]
    WritesFailed(u64),
    #[error("lock lost: the lease was taken before it could be released")]
    ReleaseLost,
    #[error("skipped: the scrape_state lock is held by {holder}")]
    LockHeld { holder: String },
    #[error("interrupted by {signal}{note}")]
    Interrupted { signal: String, note: &'static str },
    #[error("demo failed: {0}")]
    Demo(String),
    #[error("plugin {plugin_id:?} is not registered ({registered} registered plugins; `routes` lists them)")]
    NotRegistered {
        plugin_id: String,
        registered: usize,
    },
}

impl CommandError {
    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            CommandError::LockHeld { .. } => Exit::LockHeld,
            CommandError::Interrupted { .. } => Exit::Interrupted,
            _ => Exit::Failed,
        }
    }
}

/// The background tasks of `run` (health server, store pinger): aborted when dropped, so
/// every return path of `run` stops them.
#[derive(Default)]
pub struct Background(Vec<AbortHandle>);

impl Background {
    /// Runs `task` until this guard is dropped.
    pub fn spawn<F>(&mut self, task: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.push(tokio::spawn(task).abort_handle());
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// `once`: one manual tick (the tick takes and releases the lease).
pub async fn once(s: &Settings) -> Result<(), CommandError> {
    wait_for_sidecar(s, true).await?;
    let store = build_store(s)
        .await
        .map_err(|source| CommandError::Unreachable {
            endpoint: store_endpoint(s),
            source,
        })?;
    let prober = build_prober(s)?;
    once_with(&ticker(s, store, prober)).await
}

/// `once` on an existing ticker (the demo and tests use it).
pub async fn once_with(t: &Ticker) -> Result<(), CommandError> {
    match t.tick(TickKind::Manual(Utc::now())).await {
        TickOutcome::Completed(r) if r.write_failed > 0 => {
            Err(CommandError::WritesFailed(r.write_failed))
        }
        TickOutcome::Completed(r) if r.release_failed => Err(CommandError::ReleaseLost),
        TickOutcome::Completed(_) => Ok(()),
        TickOutcome::Skipped(reason) => Err(CommandError::LockHeld {
            holder: match reason {
                SkipReason::LockHeld { holder: Some(h) } => h,
                _ => "another holder".into(),
            },
        }),
        TickOutcome::Failed(e) => Err(CommandError::Tick(e)),
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
pub async fn routes(s: &Settings) -> Result<crate::observations::StatusReport, CommandError> {
    wait_for_sidecar(s, false).await?;
    let store = build_store(s).await.map_err(WorkerError::from)?;
    crate::observations::load(&*store)
        .await
        .map_err(|e| match e {
            crate::observations::ReportError::Store(e) => WorkerError::Store(e).into(),
            other => WorkerError::Io(other.to_string()).into(),
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
            let (status, error) = crate::route::shown_status(&plugin_id, route);
            RouteRow {
                plugin_id,
                status,
                error,
            }
        })
        .collect())
}

/// `run`: tick on the schedule until `shutdown` resolves (SIGTERM / SIGINT).
pub async fn run<F>(s: &Settings, shutdown: F) -> Result<(), CommandError>
where
    F: Future<Output = String>,
{
    tokio::pin!(shutdown);
    let interval = s.schedule.interval();
    let health = Health::new(interval);
    let mut background = Background::default();
    // Status page hook: served from the start, reading the store once it is connected.
    let status_page = s.status_page.then(crate::status_page::StatusPage::new);
    serve_health(s, &health, status_page.clone(), &mut background).await?;
    let store = tokio::select! {
        r = connect(s) => r?,
        signal = &mut shutdown => {
            events::ShutdownStarted { signal }.emit();
            events::ShutdownCompleted { tick_cancelled: false }.emit();
            return Ok(());
        }
    };
    if let Some(page) = &status_page {
        page.set_store(store.clone());
    }
    let prober = build_prober(s)?;
    let ticker = Arc::new(ticker(s, store.clone(), prober));
    background.spawn(ping(store, health.clone(), interval));

    // The schedule fires into a channel; the loop below owns all tick state.
    let (tx, fires) = mpsc::channel::<chrono::DateTime<Utc>>(16);
    let mut scheduler = start_scheduler(s, tx)
        .await
        .map_err(CommandError::Scheduler)?;
    // Live until the first fire is owed (plus two intervals).
    let now = Utc::now();
    let first_in = s
        .schedule
        .next_after(now)
        .and_then(|next| (next - now).to_std().ok())
        .unwrap_or(interval);
    health.loop_attempted_next_in(first_in);
    let (signal, running) = tick_loop(s, &health, &ticker, fires, shutdown).await;

    events::ShutdownStarted { signal }.emit();
    // Stop scheduling, then give a running tick the grace to finish its writes.
    let _ = scheduler.shutdown().await;
    let mut tick_cancelled = false;
    if let Some(mut h) = running {
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
    // A cancelled tick still holds its lease: the tick's own release never ran.
    ticker.release_on_shutdown().await;
    drop(background);
    events::ShutdownCompleted { tick_cancelled }.emit();
    Ok(())
}

/// Binds the metrics and health server and runs it under `background`.
async fn serve_health(
    s: &Settings,
    health: &Arc<Health>,
    status_page: Option<Arc<crate::status_page::StatusPage>>,
    background: &mut Background,
) -> Result<(), CommandError> {
    let listener = health::bind(s.listen)
        .await
        .map_err(|e| CommandError::Listen {
            address: s.listen.to_string(),
            error: e.to_string(),
        })?;
    let address = listener
        .local_addr()
        .map_or_else(|_| s.listen.to_string(), |a| a.to_string());
    events::Listening { address }.emit();
    background.spawn(health::serve(listener, health.clone(), status_page));
    Ok(())
}

/// Start-up: the sidecar wait, then the store connection, retried with backoff.
async fn connect(s: &Settings) -> Result<Arc<dyn Store>, CommandError> {
    wait_for_sidecar(s, true).await?;
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        match build_store(s).await {
            Ok(st) => return Ok(st),
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
}

/// Readiness: pings the store every half interval.
async fn ping(store: Arc<dyn Store>, health: Arc<Health>, interval: Duration) {
    let every = (interval / 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        if store.ping().await.is_ok() {
            health.store_answered();
        }
        tokio::time::sleep(every).await;
    }
}

/// Ticks on each fire until `shutdown`; gives the signal and the tick still running.
async fn tick_loop<F>(
    s: &Settings,
    health: &Health,
    ticker: &Arc<Ticker>,
    mut fires: mpsc::Receiver<chrono::DateTime<Utc>>,
    mut shutdown: std::pin::Pin<&mut F>,
) -> (String, Option<JoinHandle<TickOutcome>>)
where
    F: Future<Output = String>,
{
    let interval = s.schedule.interval();
    let mut running: Option<JoinHandle<TickOutcome>> = None;
    loop {
        tokio::select! {
            signal = &mut shutdown => return (signal, running),
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
                        reason: SkipReason::PreviousTickRunning.as_str().into(),
                        holder: None,
                    }
                    .emit();
                    continue;
                }
                if let Some(h) = running.take() {
                    // Finished: collecting it cannot block.
                    let _ = h.await;
                }
                // The tick releases its lease at once: the record keeps this tick
                // readable for late replicas, and any replica may take the next one.
                let t = ticker.clone();
                running = Some(tokio::spawn(async move {
                    t.tick(TickKind::Scheduled(slot)).await
                }));
            }
        }
    }
}

async fn start_scheduler(
    s: &Settings,
    tx: mpsc::Sender<chrono::DateTime<Utc>>,
) -> Result<JobScheduler, String> {
    let err = |e: tokio_cron_scheduler::JobSchedulerError| e.to_string();
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
