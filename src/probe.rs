//! Calling every plugin's `GET /v1/status`: one shared HTTP client, bounded concurrency,
//! a per-attempt timeout, a capped body, retries with backoff, and one [`ErrorKind`] for
//! every failure.
//!
//! The tick hands [`Prober::probe_all`] the plugin ids it has already validated and the
//! instant at which probing must stop; it gets back one [`ProbeOutcome`] per id, in the
//! same order. A [`ProbeOutcome::CutOff`] is *not an observation*: the deadline ended the
//! probe before it had an answer, so the decision step must neither count it as a failure
//! nor change the route for it.
//!
//! Invariants this module keeps:
//! - One attempt (connect, request, headers and body) never outlives the probe timeout,
//!   nor the deadline; a whole probe costs at most `timeout * (retries + 1)` plus a few
//!   backoff delays of at most [`MAX_BACKOFF`] each (twice that with jitter).
//! - A body is read chunk by chunk and abandoned as soon as it passes [`BODY_LIMIT`].
//! - Redirects are never followed and no proxy is used: the request goes where the
//!   template says, or nowhere.
//! - The Dapr API token goes only to the sidecar's origin (same scheme, host and port) and
//!   never into a detail, error or `Debug` output.
//! - Nothing in here panics.

use std::fmt;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, Url};
use tokio::time::Instant;

use crate::secret::Secret;
pub use crate::status::ErrorKind;
use crate::status::{parse_status, RouteStatus};

/// The placeholder the status URL template must contain.
pub const PLUGIN_ID_PLACEHOLDER: &str = "{plugin_id}";

/// The largest body accepted; one byte more is [`ErrorKind::TooLarge`].
pub const BODY_LIMIT: usize = 64 * 1024;

/// First backoff delay before a retry (jitter adds up to as much again).
pub const MIN_BACKOFF: Duration = Duration::from_millis(25);

/// Largest backoff delay before a retry (jitter adds up to as much again).
pub const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// The header Dapr reads its API token from.
const DAPR_TOKEN_HEADER: HeaderName = HeaderName::from_static("dapr-api-token");

/// Error bodies at most this long (by `Content-Length`) are drained so the connection
/// can go back to the pool; longer or unsized ones are dropped with their connection.
const DRAIN_LIMIT: u64 = 4 * 1024;

/// How many characters of transport error text a detail keeps.
const DETAIL_LIMIT: usize = 160;

/// How the prober is configured. Built by the configuration layer; [`Prober::new`]
/// validates it.
#[derive(Clone, Debug)]
pub struct ProbeSettings {
    /// `http://` URL containing [`PLUGIN_ID_PLACEHOLDER`], replaced by the plugin id as
    /// plain text (the caller validates ids before they get here).
    pub url_template: String,
    /// Limit for one attempt: connect, request, response headers and the whole body.
    pub timeout: Duration,
    /// Extra attempts after the first, for transient failures only.
    pub retries: u32,
    /// Most probes in flight at once (at least 1).
    pub concurrency: usize,
    /// Sent as `dapr-api-token`, and only to [`ProbeSettings::sidecar_origin`].
    pub dapr_api_token: Option<Secret>,
    /// The sidecar's HTTP origin, `http://host:port` (the scheme may be left out). The
    /// token is sent to a request only when its scheme, host and port equal these.
    pub sidecar_origin: Option<String>,
    /// The template goes through Dapr service invocation: a 500 whose JSON body has an
    /// `errorCode` starting with `ERR_` is the sidecar's failure ([`ErrorKind::SidecarInvoke`]),
    /// not the plugin's.
    pub dapr_invoke: bool,
}

impl ProbeSettings {
    /// Settings with the worker's defaults (2 s timeout, 1 retry, concurrency 64), no
    /// token and no Dapr invocation.
    pub fn new(url_template: impl Into<String>) -> Self {
        ProbeSettings {
            url_template: url_template.into(),
            timeout: Duration::from_secs(2),
            retries: 1,
            concurrency: 64,
            dapr_api_token: None,
            sidecar_origin: None,
            dapr_invoke: false,
        }
    }
}

/// Settings [`Prober::new`] refuses. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum ProbeSetupError {
    #[error("the status URL template must contain {PLUGIN_ID_PLACEHOLDER}")]
    MissingPlaceholder,
    #[error("the status URL template is not a valid URL: {0}")]
    InvalidTemplate(String),
    #[error("the status URL template uses scheme {0:?}; only http is supported")]
    UnsupportedScheme(String),
    #[error("the Dapr sidecar origin is not a valid http origin: {0}")]
    InvalidSidecarOrigin(String),
    #[error("the Dapr API token is not a valid HTTP header value")]
    InvalidToken,
    #[error("the probe timeout must be greater than zero")]
    ZeroTimeout,
    #[error("the probe concurrency must be at least 1")]
    ZeroConcurrency,
    #[error("could not build the HTTP client: {0}")]
    Client(reqwest::Error),
}

/// Why one probe failed, after all its attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeFailure {
    pub kind: ErrorKind,
    /// A short sentence for people; never contains the token or the full URL.
    pub detail: String,
    /// The HTTP status of the last answer, when there was one.
    pub http_status: Option<u16>,
    /// Dapr's `errorCode` for [`ErrorKind::SidecarInvoke`].
    pub dapr_error_code: Option<String>,
    /// Attempts made (0 only when no request could be built).
    pub attempts: u32,
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (after {} attempt{})",
            self.kind,
            self.detail,
            self.attempts,
            if self.attempts == 1 { "" } else { "s" }
        )
    }
}

/// The result of probing one plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The plugin reported this status (already mapped to the route vocabulary).
    Reported(RouteStatus),
    /// The probe ran its course (retries included) and failed.
    Failed(ProbeFailure),
    /// The deadline ended the probe before it had an answer, or before a due retry.
    /// Not an observation: no counter moves and no route changes for it.
    CutOff,
}

/// The status prober. Cheap to share by reference; clones share the connection pool.
#[derive(Clone)]
pub struct Prober {
    client: reqwest::Client,
    template: Box<str>,
    timeout: Duration,
    retries: u32,
    concurrency: usize,
    /// The token as a ready header value, present only when a sidecar origin is known.
    token: Option<HeaderValue>,
    sidecar: Option<Origin>,
    dapr_invoke: bool,
    backoff: ExponentialBuilder,
}

impl fmt::Debug for Prober {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prober")
            .field("template", &self.template)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("concurrency", &self.concurrency)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("sidecar", &self.sidecar)
            .field("dapr_invoke", &self.dapr_invoke)
            .finish()
    }
}

/// An HTTP origin, normalised by the URL parser so it compares with a request URL.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    fn parse(text: &str) -> Result<Origin, ProbeSetupError> {
        let bad = |why: &str| ProbeSetupError::InvalidSidecarOrigin(why.to_owned());
        let owned;
        let text = if text.contains("://") {
            text
        } else {
            owned = format!("http://{text}");
            &owned
        };
        let url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "http" {
            return Err(bad("only http is supported"));
        }
        let host = url.host_str().ok_or_else(|| bad("no host"))?.to_owned();
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
        Ok(Origin {
            scheme: url.scheme().to_owned(),
            host,
            port,
        })
    }

    fn matches(&self, url: &Url) -> bool {
        url.scheme() == self.scheme
            && url.host_str() == Some(self.host.as_str())
            && url.port_or_known_default() == Some(self.port)
    }
}

impl Prober {
    /// Validates the settings and builds the one HTTP client every probe shares
    /// (keep-alive pool, no redirects, no proxy, no client-side retries).
    pub fn new(settings: ProbeSettings) -> Result<Prober, ProbeSetupError> {
        if !settings.url_template.contains(PLUGIN_ID_PLACEHOLDER) {
            return Err(ProbeSetupError::MissingPlaceholder);
        }
        if settings.timeout.is_zero() {
            return Err(ProbeSetupError::ZeroTimeout);
        }
        if settings.concurrency == 0 {
            return Err(ProbeSetupError::ZeroConcurrency);
        }
        let sample = settings
            .url_template
            .replace(PLUGIN_ID_PLACEHOLDER, "plugin");
        let sample =
            Url::parse(&sample).map_err(|e| ProbeSetupError::InvalidTemplate(e.to_string()))?;
        if sample.scheme() != "http" {
            return Err(ProbeSetupError::UnsupportedScheme(
                sample.scheme().to_owned(),
            ));
        }
        let sidecar = settings
            .sidecar_origin
            .as_deref()
            .map(Origin::parse)
            .transpose()?;
        let token = match (&settings.dapr_api_token, &sidecar) {
            (Some(secret), Some(_)) => {
                let mut value = HeaderValue::from_str(secret.expose())
                    .map_err(|_| ProbeSetupError::InvalidToken)?;
                value.set_sensitive(true);
                Some(value)
            }
            // Without a known sidecar origin there is nowhere the token may go.
            _ => None,
        };
        // Idle connections kept per host. Twice the concurrency: hyper returns a
        // connection to the pool from a separate task, so a new request can race it and
        // open one more; with room for those extras the pool settles instead of churning.
        // When the plugin id is part of the host, every plugin is its own host and an idle
        // connection per plugin would hold one socket per plugin between ticks (tens of
        // thousands at scale), so none is kept.
        let idle_per_host = if placeholder_in_authority(&settings.url_template) {
            0
        } else {
            settings.concurrency.saturating_mul(2)
        };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(idle_per_host)
            .user_agent(concat!("keel-scraper/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ProbeSetupError::Client)?;
        let retries = settings.retries;
        Ok(Prober {
            client,
            template: settings.url_template.into_boxed_str(),
            timeout: settings.timeout,
            retries,
            concurrency: settings.concurrency,
            token,
            sidecar,
            dapr_invoke: settings.dapr_invoke,
            backoff: ExponentialBuilder::new()
                .with_jitter()
                .with_min_delay(MIN_BACKOFF)
                .with_max_delay(MAX_BACKOFF)
                .with_max_times(usize::try_from(retries).unwrap_or(usize::MAX)),
        })
    }

    /// Probes one plugin with no deadline: never [`ProbeOutcome::CutOff`].
    pub async fn probe_one(&self, plugin_id: &str) -> ProbeOutcome {
        self.probe(plugin_id, None).await
    }

    /// Probes one plugin, giving up (with [`ProbeOutcome::CutOff`]) at `deadline`.
    pub async fn probe_one_until(&self, plugin_id: &str, deadline: Instant) -> ProbeOutcome {
        self.probe(plugin_id, Some(deadline)).await
    }

    /// Probes every id with at most `concurrency` probes in flight; the result has one
    /// outcome per id, in the order of `ids`. Probes not finished by `deadline` (or not
    /// started by then) are [`ProbeOutcome::CutOff`]. Slow plugins hold only their own
    /// slot: the others keep flowing through the remaining ones.
    pub async fn probe_all<S>(&self, ids: &[S], deadline: Instant) -> Vec<ProbeOutcome>
    where
        S: AsRef<str> + Sync,
    {
        let mut out = vec![ProbeOutcome::CutOff; ids.len()];
        self.drive(ids, deadline, |i, outcome, _| {
            if let Some(slot) = out.get_mut(i) {
                *slot = outcome;
            }
        })
        .await;
        out
    }

    /// [`Prober::probe_all`], also giving how long each probe took (for the probe
    /// duration histogram). A probe never started because of the deadline takes zero.
    pub async fn probe_all_timed<S>(
        &self,
        ids: &[S],
        deadline: Instant,
    ) -> Vec<(ProbeOutcome, Duration)>
    where
        S: AsRef<str> + Sync,
    {
        let mut out = vec![(ProbeOutcome::CutOff, Duration::ZERO); ids.len()];
        self.drive(ids, deadline, |i, outcome, took| {
            if let Some(slot) = out.get_mut(i) {
                *slot = (outcome, took);
            }
        })
        .await;
        out
    }

    /// The concurrency bound this prober applies.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Runs the probes on the calling task (the connections themselves are driven by the
    /// client's own tasks), bounded by `buffer_unordered`, and hands each result to `put`.
    async fn drive<S, F>(&self, ids: &[S], deadline: Instant, mut put: F)
    where
        S: AsRef<str> + Sync,
        F: FnMut(usize, ProbeOutcome, Duration),
    {
        // Indices, not `(usize, &S)` pairs: a closure taking a borrowed argument makes the
        // future's type higher-ranked, and it could then not be spawned as a task.
        let mut results = futures::stream::iter(0..ids.len())
            .map(|i| async move {
                let started = Instant::now();
                let id = ids.get(i).map_or("", |s| s.as_ref());
                let outcome = self.probe(id, Some(deadline)).await;
                (i, outcome, started.elapsed())
            })
            .buffer_unordered(self.concurrency);
        while let Some((i, outcome, took)) = results.next().await {
            put(i, outcome, took);
        }
    }

    /// One probe: attempts with backoff between them, within the deadline.
    async fn probe(&self, plugin_id: &str, deadline: Option<Instant>) -> ProbeOutcome {
        let url = match self.url_for(plugin_id) {
            Ok(url) => url,
            Err(failure) => return ProbeOutcome::Failed(failure.finish(0)),
        };
        let send_token = self.token.is_some()
            && self
                .sidecar
                .as_ref()
                .is_some_and(|origin| origin.matches(&url));
        let mut attempts: u32 = 0;
        let mut backoff = None;
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return ProbeOutcome::CutOff;
            }
            // `None` when the timeout is too large to represent: the deadline (if any)
            // is then the only limit.
            let own_end = now.checked_add(self.timeout);
            let (until, cut_by_deadline) = match (own_end, deadline) {
                (Some(end), Some(d)) if d < end => (Some(d), true),
                (Some(end), _) => (Some(end), false),
                (None, d) => (d, d.is_some()),
            };
            attempts = attempts.saturating_add(1);
            let failure = match self.attempt(&url, send_token, until).await {
                Attempt::Answered(status) => return ProbeOutcome::Reported(status),
                Attempt::Elapsed if cut_by_deadline => return ProbeOutcome::CutOff,
                Attempt::Elapsed => Failure::new(
                    ErrorKind::Timeout,
                    format!("no complete answer within {:?}", self.timeout),
                ),
                Attempt::Failed(failure) => failure,
            };
            if attempts > self.retries || !failure.is_transient() {
                return ProbeOutcome::Failed(failure.finish(attempts));
            }
            let delay = backoff
                .get_or_insert_with(|| self.backoff.build())
                .next()
                .unwrap_or(MAX_BACKOFF);
            if let Some(d) = deadline {
                // A retry that cannot even start before the deadline is a cut-off: the
                // probe did not run its configured course.
                if Instant::now().checked_add(delay).is_none_or(|at| at >= d) {
                    return ProbeOutcome::CutOff;
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    fn url_for(&self, plugin_id: &str) -> Result<Url, Failure> {
        let text = self.template.replace(PLUGIN_ID_PLACEHOLDER, plugin_id);
        let url = Url::parse(&text).map_err(|e| {
            Failure::new(
                ErrorKind::Connect,
                format!("the status URL for this plugin id is invalid: {e}"),
            )
        })?;
        if url.scheme() != "http" {
            return Err(Failure::new(
                ErrorKind::Connect,
                "the status URL for this plugin id is not http".to_owned(),
            ));
        }
        Ok(url)
    }

    /// One request, bounded by `until` as a whole (connect, headers, body).
    async fn attempt(&self, url: &Url, send_token: bool, until: Option<Instant>) -> Attempt {
        let mut request = reqwest::Request::new(Method::GET, url.clone());
        if send_token {
            if let Some(token) = &self.token {
                request
                    .headers_mut()
                    .insert(DAPR_TOKEN_HEADER, token.clone());
            }
        }
        let mut response = match within(until, self.client.execute(request)).await {
            None => return Attempt::Elapsed,
            Some(Err(e)) => return Attempt::Failed(transport_failure(&e)),
            Some(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            return Attempt::Failed(self.non_success(response, until).await);
        }
        match within(until, read_capped(&mut response)).await {
            None => Attempt::Elapsed,
            Some(Err(failure)) => Attempt::Failed(failure),
            Some(Ok(body)) => match parse_status(&body) {
                Ok(status) => Attempt::Answered(status),
                Err(e) => Attempt::Failed(Failure::new(e.kind, e.detail)),
            },
        }
    }

    /// Classifies a non-2xx answer: the sidecar's own invoke failure in Dapr mode, else
    /// `http_status`. The status code is already known, so a body that cannot be read
    /// in time does not change the kind.
    async fn non_success(
        &self,
        mut response: reqwest::Response,
        until: Option<Instant>,
    ) -> Failure {
        let code = response.status();
        let mut failure = Failure::new(
            ErrorKind::HttpStatus,
            match code.canonical_reason() {
                Some(reason) => format!("HTTP {} {reason}", code.as_u16()),
                None => format!("HTTP {}", code.as_u16()),
            },
        );
        failure.http_status = Some(code.as_u16());
        if self.dapr_invoke && code == reqwest::StatusCode::INTERNAL_SERVER_ERROR {
            if let Some(Ok(body)) = within(until, read_capped(&mut response)).await {
                if let Some(error_code) = dapr_error_code(&body) {
                    failure.kind = ErrorKind::SidecarInvoke;
                    failure.detail =
                        format!("the Dapr sidecar could not invoke the plugin: {error_code}");
                    failure.dapr_error_code = Some(error_code);
                }
            }
        } else if response.content_length().is_some_and(|n| n <= DRAIN_LIMIT) {
            // Small error bodies are drained so the keep-alive connection is reused; the
            // content is not needed.
            let _ = within(until, read_capped(&mut response)).await;
        }
        failure
    }
}

/// The result of one attempt.
enum Attempt {
    Answered(RouteStatus),
    Failed(Failure),
    /// The attempt's time (its timeout, or the deadline) ran out.
    Elapsed,
}

/// A failed attempt, before the attempt count is known.
struct Failure {
    kind: ErrorKind,
    detail: String,
    http_status: Option<u16>,
    dapr_error_code: Option<String>,
}

impl Failure {
    fn new(kind: ErrorKind, detail: String) -> Self {
        Failure {
            kind,
            detail,
            http_status: None,
            dapr_error_code: None,
        }
    }

    /// Worth another attempt: the cause may be gone a moment later. A plugin's own answer
    /// (its body, its status vocabulary, a 4xx or 3xx) will not change by asking again.
    fn is_transient(&self) -> bool {
        match self.kind {
            ErrorKind::Connect
            | ErrorKind::Timeout
            | ErrorKind::Protocol
            | ErrorKind::SidecarInvoke => true,
            ErrorKind::HttpStatus => self.http_status.is_some_and(|c| c >= 500 || c == 429),
            ErrorKind::TooLarge
            | ErrorKind::BadBody
            | ErrorKind::PluginError
            | ErrorKind::UnknownStatus => false,
        }
    }

    fn finish(self, attempts: u32) -> ProbeFailure {
        ProbeFailure {
            kind: self.kind,
            detail: self.detail,
            http_status: self.http_status,
            dapr_error_code: self.dapr_error_code,
            attempts,
        }
    }
}

/// Awaits `fut` until `until` (forever when `None`); `None` when time ran out.
async fn within<F: std::future::Future>(until: Option<Instant>, fut: F) -> Option<F::Output> {
    match until {
        Some(at) => tokio::time::timeout_at(at, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Reads the body chunk by chunk, stopping as soon as it passes [`BODY_LIMIT`]. A body
/// that arrives in one chunk (the usual case) is returned without copying.
async fn read_capped(response: &mut reqwest::Response) -> Result<Bytes, Failure> {
    let too_large = || {
        Failure::new(
            ErrorKind::TooLarge,
            format!("body larger than {BODY_LIMIT} bytes"),
        )
    };
    if response
        .content_length()
        .is_some_and(|n| n > BODY_LIMIT as u64)
    {
        return Err(too_large());
    }
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut total: usize = 0;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return Err(transport_failure(&e)),
        };
        total = total.saturating_add(chunk.len());
        if total > BODY_LIMIT {
            return Err(too_large());
        }
        match first.take() {
            None if rest.is_empty() => first = Some(chunk),
            earlier => {
                if let Some(earlier) = earlier {
                    rest.reserve(earlier.len() + chunk.len());
                    rest.extend_from_slice(&earlier);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(rest)))
}

/// Maps a transport error: the connection could not be made (`connect`), or it was made
/// and the exchange broke (`protocol`: not HTTP, reset, EOF in headers or body). The
/// detail is the innermost cause only: the outer layers print the URL.
fn transport_failure(error: &reqwest::Error) -> Failure {
    let kind = if error.is_timeout() {
        ErrorKind::Timeout
    } else if error.is_connect() || error.is_builder() {
        ErrorKind::Connect
    } else {
        ErrorKind::Protocol
    };
    let prefix = match kind {
        ErrorKind::Connect => "could not connect",
        ErrorKind::Timeout => "timed out",
        _ => "the answer broke off or is not HTTP",
    };
    Failure::new(kind, format!("{prefix}: {}", innermost(error)))
}

/// The innermost cause's message, cut to [`DETAIL_LIMIT`] characters.
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    // Bounded: error chains are short, but never trust a cycle.
    for _ in 0..16 {
        match cause.source() {
            Some(next) => cause = next,
            None => break,
        }
    }
    let text = if std::ptr::addr_eq(cause, error) {
        // No source at all: say only what kind it was, since the top-level message
        // carries the URL.
        "no further detail".to_owned()
    } else {
        cause.to_string()
    };
    text.chars()
        .take(DETAIL_LIMIT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Whether the plugin id lands in the URL's authority (host or port) rather than its path.
fn placeholder_in_authority(template: &str) -> bool {
    let rest = template
        .find("://")
        .and_then(|i| template.get(i + 3..))
        .unwrap_or(template);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest.get(..end)
        .is_some_and(|authority| authority.contains(PLUGIN_ID_PLACEHOLDER))
}

/// Dapr's error code from a sidecar error body (`{"errorCode":"ERR_...","message":...}`),
/// when the body is such an object.
fn dapr_error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = value.as_object()?.get("errorCode")?.as_str()?;
    if !code.starts_with("ERR_") {
        return None;
    }
    Some(
        code.chars()
            .take(64)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
    )
}
