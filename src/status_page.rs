//! The read-only status page `run` serves next to `/metrics`: `GET /status` (HTML, no
//! JavaScript, no external assets) and `GET /status.json`, one row per registered plugin
//! (status, since, last probe outcome, error kind, consecutive failures, detail) and the
//! replica that completed the last tick and when.
//!
//! Every value is read from the store ([`crate::observations::load`]), never from this
//! replica's memory, so every replica shows the same page. What the page shows is the
//! store's content and nothing of the configuration: no URL, password or token can reach
//! it. A detail is the plugin's own text and is HTML-escaped like every other value.
//! Reads are shared: requests within [`CACHE_FOR`] of a load reuse it, and one load runs
//! at a time, so a page left open (or many) cannot multiply the store's work.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::observations::{self, PluginRow, StatusReport};
use crate::status::status_str_passes_gate;
use crate::store::Store;

/// How long one load of the store serves requests.
pub const CACHE_FOR: Duration = Duration::from_secs(1);

type Loaded = Arc<Result<StatusReport, String>>;

/// The page's state: the store once `run` has connected to it, and the last load.
#[derive(Default)]
pub struct StatusPage {
    store: OnceLock<Arc<dyn Store>>,
    last: Mutex<Option<(Instant, Loaded)>>,
}

impl StatusPage {
    pub fn new() -> Arc<StatusPage> {
        Arc::new(StatusPage::default())
    }

    /// Called once the store is connected; before that the page answers 503.
    pub fn set_store(&self, store: Arc<dyn Store>) {
        let _ = self.store.set(store);
    }

    async fn report(&self) -> Option<Loaded> {
        let store = self.store.get()?;
        let mut last = self.last.lock().await;
        if let Some((at, loaded)) = last.as_ref() {
            if at.elapsed() < CACHE_FOR {
                return Some(loaded.clone());
            }
        }
        let loaded: Loaded = Arc::new(
            observations::load(&**store)
                .await
                .map_err(|e| e.to_string()),
        );
        *last = Some((Instant::now(), loaded.clone()));
        Some(loaded)
    }
}

/// `/status` and `/status.json`.
pub fn router(page: Arc<StatusPage>) -> Router {
    Router::new()
        .route("/status", get(html))
        .route("/status.json", get(json))
        .with_state(page)
}

const NOT_CONNECTED: &str = "the store is not connected yet";

async fn html(State(page): State<Arc<StatusPage>>) -> Response {
    let (code, body) = match page.report().await {
        None => (StatusCode::SERVICE_UNAVAILABLE, render_error(NOT_CONNECTED)),
        Some(loaded) => match &*loaded {
            Ok(report) => (StatusCode::OK, render_html(report)),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, render_error(e)),
        },
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
        body,
    )
        .into_response()
}

async fn json(State(page): State<Arc<StatusPage>>) -> Response {
    let (code, body) = match page.report().await {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": NOT_CONNECTED }).to_string(),
        ),
        Some(loaded) => match &*loaded {
            Ok(report) => (
                StatusCode::OK,
                serde_json::to_string(report).unwrap_or_else(|e| {
                    serde_json::json!({ "error": format!("cannot encode: {e}") }).to_string()
                }),
            ),
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": e }).to_string(),
            ),
        },
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// `text` safe as HTML text and attribute content.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#1b1f23}\
h1{font-size:1.3em}table{border-collapse:collapse}\
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f6f8fa}td.detail{max-width:40em;overflow-wrap:anywhere}\
td.pass{color:#116329;font-weight:600}td.blocked{color:#a40e26;font-weight:600}\
td.none{color:#6e7781;font-style:italic}p.note{color:#57606a}\
td.plugin,td.since,td.status{white-space:nowrap}";

fn head(out: &mut String) {
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\">\
         <title>keel-scraper status</title><style>{STYLE}</style></head><body>\
         <h1>keel-scraper: plugin routes</h1>"
    );
}

fn render_error(error: &str) -> String {
    let mut out = String::new();
    head(&mut out);
    let _ = writeln!(
        out,
        "<p id=\"error\">The status cannot be read: {}</p></body></html>",
        escape_html(error)
    );
    out
}

/// A cell: the value, or what is missing in grey italics.
fn cell(out: &mut String, class: &str, value: Option<&str>, missing: &str) {
    match value {
        Some(v) => {
            let _ = write!(
                out,
                "<td class=\"{class}\">{}</td>",
                escape_html(&observations::escape_control(v))
            );
        }
        None => {
            let _ = write!(
                out,
                "<td class=\"{class} none\">{}</td>",
                escape_html(missing)
            );
        }
    }
}

fn no_observation(row: &PluginRow) -> String {
    match (row.observation, &row.observation_error) {
        ("unreadable", Some(e)) => format!("observations unreadable: {e}"),
        ("omitted", _) => "omitted (record over its size budget)".into(),
        _ => "no observation".into(),
    }
}

/// The page for `report`.
pub fn render_html(report: &StatusReport) -> String {
    let mut out = String::new();
    head(&mut out);
    match (&report.last_tick, &report.last_tick_error) {
        (Some(t), _) => {
            let _ = write!(
                out,
                "<p id=\"last-tick\">Last tick <b class=\"tick\">{}</b> completed by \
                 <b class=\"holder\">{}</b> at <b class=\"completed-at\">{}</b>.</p>",
                escape_html(&t.tick),
                escape_html(&t.holder),
                escape_html(&t.completed_at)
            );
        }
        (None, Some(e)) => {
            let _ = write!(
                out,
                "<p id=\"last-tick\">Last completed tick unreadable: {}</p>",
                escape_html(e)
            );
        }
        (None, None) => {
            out.push_str("<p id=\"last-tick\">No completed tick recorded yet.</p>");
        }
    }
    match (report.observations, &report.observations_error) {
        ("unreadable", Some(e)) => {
            let _ = write!(
                out,
                "<p class=\"note\">Observations unreadable: {}</p>",
                escape_html(e)
            );
        }
        ("missing", _) => out.push_str("<p class=\"note\">No observations recorded yet.</p>"),
        _ => {}
    }
    if report.details_dropped {
        out.push_str(
            "<p class=\"note\">Details were dropped to keep the observations under their size budget.</p>",
        );
    }
    out.push_str(
        "<table id=\"plugins\"><thead><tr><th>plugin</th><th>status</th><th>since</th>\
         <th>last probe</th><th>error kind</th><th>consecutive failures</th><th>detail</th>\
         </tr></thead><tbody>",
    );
    for row in &report.plugins {
        let _ = write!(
            out,
            "<tr data-plugin=\"{}\"><td class=\"plugin\">{}</td>",
            escape_html(&row.plugin_id),
            escape_html(&row.plugin_id)
        );
        match (&row.status, &row.error) {
            (Some(s), _) => {
                let class = if status_str_passes_gate(s) {
                    "status pass"
                } else {
                    "status blocked"
                };
                cell(&mut out, class, Some(s), "");
            }
            (None, Some(e)) => cell(&mut out, "status", None, &format!("unreadable: {e}")),
            (None, None) => cell(&mut out, "status", None, "no route"),
        }
        let none = no_observation(row);
        cell(&mut out, "since", row.since.as_deref(), &none);
        let outcome = row
            .last_outcome
            .as_ref()
            .map(|o| match &row.reported_status {
                Some(s) => format!("{o} {s}"),
                None => o.clone(),
            });
        cell(&mut out, "outcome", outcome.as_deref(), &none);
        cell(&mut out, "kind", row.error_kind.as_deref(), "");
        let failures = row.consecutive_failures.map(|f| f.to_string());
        let counters = row
            .counters_error
            .as_ref()
            .map_or_else(String::new, |e| format!("unreadable: {e}"));
        cell(&mut out, "failures", failures.as_deref(), &counters);
        cell(&mut out, "detail", row.detail.as_deref(), "");
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    let _ = writeln!(
        out,
        "<p class=\"note\">{} registered plugins. Read from the store at every load \
         (at most once a second); the same on every replica. Also as \
         <a href=\"status.json\">JSON</a>.</p></body></html>",
        report.plugins.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observations::LastTick;

    fn row(id: &str, detail: &str) -> PluginRow {
        PluginRow {
            plugin_id: id.into(),
            status: Some("FAILED".into()),
            error: None,
            observation: "present",
            observation_error: None,
            observed_tick: Some("2026-12-01T20:00:00Z".into()),
            since: Some("2026-12-01T20:00:00Z".into()),
            last_outcome: Some("failed".into()),
            reported_status: None,
            error_kind: Some("plugin_error".into()),
            detail: Some(detail.into()),
            consecutive_failures: Some(3),
            counters_error: None,
        }
    }

    #[test]
    fn a_plugins_text_is_escaped_on_the_page() {
        let report = StatusReport {
            last_tick: Some(LastTick {
                tick: "2026-12-01T20:00:00Z".into(),
                holder: "<b>pod</b>".into(),
                completed_at: "2026-12-01T20:00:01Z".into(),
            }),
            last_tick_error: None,
            observations: "present",
            observations_error: None,
            details_dropped: false,
            plugins: vec![row(
                "p",
                "plugin reported ret 1: <script>alert(1)</script> \u{1b}[31m\"'&",
            )],
        };
        let page = render_html(&report);
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<b>pod"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt; \\u{1b}[31m&quot;&#39;&amp;"),
            "{page}"
        );
        assert!(
            page.contains("<td class=\"status blocked\">FAILED</td>"),
            "{page}"
        );
    }

    #[test]
    fn missing_values_say_so() {
        let mut r = row("p", "");
        r.observation = "missing";
        r.since = None;
        r.last_outcome = None;
        r.detail = None;
        r.error_kind = None;
        r.consecutive_failures = None;
        r.counters_error = Some("scrape_counters is not a counters object".into());
        let report = StatusReport {
            last_tick: None,
            last_tick_error: None,
            observations: "present",
            observations_error: None,
            details_dropped: false,
            plugins: vec![r],
        };
        let page = render_html(&report);
        assert!(page.contains("No completed tick recorded yet."), "{page}");
        assert!(
            page.contains("<td class=\"since none\">no observation</td>"),
            "{page}"
        );
        assert!(
            page.contains("unreadable: scrape_counters is not"),
            "{page}"
        );
    }
}
