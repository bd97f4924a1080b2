//! The `run` command's small HTTP server: `/metrics`, `/healthz`, `/readyz`, and the
//! status page (`/status`, `/status.json`, see [`crate::status_page`]).
//!
//! - `/healthz` (liveness): 200 while starting (the sidecar wait included) and while the
//!   scheduler loop attempts ticks (a skipped tick counts) within three intervals; 503 when
//!   the loop has stalled.
//! - `/readyz` (readiness): 200 when the store (or sidecar) answered within the last
//!   interval, 503 otherwise.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::metrics::{metrics, negotiate};

/// Liveness and readiness state, shared by the loop, the store pinger and the server.
pub struct Health {
    epoch: Instant,
    interval: Duration,
    /// Milliseconds since `epoch` until which the loop counts as live (the next fire it
    /// owes plus two intervals), plus one; 0 = still starting.
    live_until: AtomicU64,
    /// Milliseconds since `epoch` of the last store answer, plus one; 0 = never.
    last_store_ok: AtomicU64,
}

impl Health {
    pub fn new(interval: Duration) -> Arc<Health> {
        Arc::new(Health {
            epoch: Instant::now(),
            interval,
            live_until: AtomicU64::new(0),
            last_store_ok: AtomicU64::new(0),
        })
    }

    fn now_mark(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// The scheduler loop attempted a tick (or has just started looping), on a regular
    /// schedule: the next fire is due within one interval.
    pub fn loop_attempted(&self) {
        self.loop_attempted_next_in(self.interval);
    }

    /// The scheduler loop attempted a tick and owes the next one in `next_fire_in`. It
    /// stays live until then plus two intervals, so the long gaps of an irregular schedule
    /// (`0,1 * * * * *`) never look like a stall.
    pub fn loop_attempted_next_in(&self, next_fire_in: Duration) {
        let grace = next_fire_in + self.interval * 2;
        let until = self
            .now_mark()
            .saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX / 2));
        self.live_until.store(until, Ordering::Relaxed);
    }

    /// The store or sidecar answered.
    pub fn store_answered(&self) {
        self.last_store_ok.store(self.now_mark(), Ordering::Relaxed);
    }

    fn age(&self, mark: u64) -> Option<Duration> {
        (mark != 0).then(|| Duration::from_millis(self.now_mark().saturating_sub(mark)))
    }

    pub fn live(&self) -> bool {
        match self.live_until.load(Ordering::Relaxed) {
            0 => true,
            until => self.now_mark() <= until,
        }
    }

    pub fn ready(&self) -> bool {
        match self.age(self.last_store_ok.load(Ordering::Relaxed)) {
            None => false,
            // A ping every half interval; allow one interval plus a second of slack.
            Some(age) => age <= self.interval + Duration::from_secs(1),
        }
    }
}

async fn healthz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "scheduler loop stalled\n")
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store not answering\n")
    }
}

/// `/metrics` in the format the scraper's `Accept` asks for: OpenMetrics when it asks for
/// it (Prometheus does), the classic text format 0.0.4 otherwise.
async fn metrics_text(headers: HeaderMap) -> impl IntoResponse {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let format = negotiate(Some(&accept));
    (
        [(header::CONTENT_TYPE, format.content_type())],
        metrics().render(format),
    )
}

/// Binds the server; the caller logs `listening` with the bound address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until the process ends; with `status`, also `/status` and `/status.json`.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    status: Option<Arc<crate::status_page::StatusPage>>,
) -> std::io::Result<()> {
    let mut app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health);
    // Status page hook: read-only, from the store (src/status_page.rs); off with
    // `--status-page false`.
    if let Some(page) = status {
        app = app.merge(crate::status_page::router(page));
    }
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_when_the_loop_stalls_for_three_intervals() {
        let h = Health::new(Duration::from_secs(2));
        assert!(h.live(), "starting counts as live");
        h.loop_attempted();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(h.live());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!h.live(), "7 s without an attempt on a 2 s schedule");
        h.loop_attempted();
        assert!(h.live());
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_gap_of_an_irregular_schedule_is_not_a_stall() {
        // `0,1 * * * * *`: shortest gap 1 s, then 59 s of silence.
        let h = Health::new(Duration::from_secs(1));
        h.loop_attempted_next_in(Duration::from_secs(59));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(h.live());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!h.live(), "the owed fire is two intervals late");
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_needs_a_recent_store_answer() {
        let h = Health::new(Duration::from_secs(2));
        assert!(!h.ready(), "not ready before the store answered");
        h.store_answered();
        assert!(h.ready());
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!h.ready());
    }
}
