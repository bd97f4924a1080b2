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
//!
//! The HTTP exchange itself is [`client`]: a lean HTTP/1.1 client, because a
//! general-purpose one spent most of a tick's CPU on per-request machinery (see its docs).
//! [`hyper_client`] makes the same calls on hyper's connection-level client; it is not the
//! worker's path ([`HttpStack`]): the benchmark measures it beside ours, and the HTTP tests
//! run on both.

mod client;
mod hyper_client;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use reqwest::header::HeaderValue;
use reqwest::Url;
use tokio::time::{Instant, Sleep};

use client::{Client, ClientError, Conn, Endpoint, Head};
use hyper_client::{HyperClient, HyperConn, HyperHead, HyperRequest};

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
const DAPR_TOKEN_HEADER: &[u8] = b"dapr-api-token";

/// Sent with every status call.
const USER_AGENT: &str = concat!("keel-scraper/", env!("CARGO_PKG_VERSION"));

/// Stands for the plugin id while the fixed part of the request is built (see
/// [`Targets::Fixed`]): made only of characters the URL parser copies verbatim.
const ID_MARKER: &str = "keelpluginidmarker7q";

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
    /// The probe ran its course (retries included) and failed. Boxed: failures are rare,
    /// and a tick holds one outcome per plugin (at 50 000 plugins the inline failure
    /// would cost megabytes at the tick's peak).
    Failed(Box<ProbeFailure>),
    /// The deadline ended the probe before it had an answer, or before a due retry.
    /// Not an observation: no counter moves and no route changes for it.
    CutOff,
}

/// How the request for a plugin id is made.
#[derive(Clone)]
enum Targets {
    /// The id lands in the path or query only: the endpoint and the request bytes before
    /// and after the id are the same for every plugin, and were built once from the
    /// template. Used for ids made only of ASCII letters, digits, `-` and `_` (every valid
    /// plugin id), which the URL parser would copy verbatim: the bytes are the same as a
    /// parse of the whole URL would give.
    Fixed {
        endpoint: Arc<Endpoint>,
        head: Arc<FixedHead>,
    },
    /// Every id's URL is parsed and its request built on its own.
    PerId,
}

/// The request parts of a template around the plugin id, built once.
struct FixedHead {
    /// The request bytes before and after the id.
    before: Box<[u8]>,
    after: Box<[u8]>,
    /// For [`HttpStack::Hyper`]: the request target before and after the id, and the
    /// header fields.
    target_before: Box<str>,
    target_after: Box<str>,
    headers: hyper::HeaderMap,
}

/// Which HTTP/1.1 client makes the status calls. The worker uses [`HttpStack::Lean`];
/// the other is kept so the benchmark can compare them in the same run (README,
/// "Performance").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpStack {
    /// This crate's client (`src/probe/client.rs`).
    Lean,
    /// hyper's connection-level client, driven inside each probe's future.
    Hyper,
}

/// The client of a prober, with its pool.
#[derive(Clone)]
enum Http {
    Lean(Arc<Client>),
    Hyper(Arc<HyperClient>),
}

/// A connection with an answer's head read from it, and the head.
enum Exchange {
    Lean(Conn, Head),
    Hyper(HyperConn, HyperHead),
}

impl Exchange {
    fn status(&self) -> u16 {
        match self {
            Exchange::Lean(_, head) => head.status,
            Exchange::Hyper(_, head) => head.status,
        }
    }

    fn content_length(&self) -> Option<u64> {
        match self {
            Exchange::Lean(_, head) => head.content_length(),
            Exchange::Hyper(_, head) => head.content_length(),
        }
    }
}

/// The status prober. Cheap to share by reference; clones share the connection pool.
#[derive(Clone)]
pub struct Prober {
    client: Http,
    idle_max: usize,
    targets: Targets,
    template: Arc<str>,
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
        // Idle connections kept per host: one per probe slot, since a connection goes back
        // to the pool as soon as its answer is read. When the plugin id is part of the
        // host, every plugin is its own host and an idle connection per plugin would hold
        // one socket per plugin between ticks (tens of thousands at scale), so none is kept.
        let idle_per_host = if placeholder_in_authority(&settings.url_template) {
            0
        } else {
            settings.concurrency
        };
        let targets = fixed_targets(&settings.url_template, token.as_ref(), sidecar.as_ref());
        let retries = settings.retries;
        Ok(Prober {
            client: Http::Lean(Arc::new(Client::new(idle_per_host))),
            idle_max: idle_per_host,
            targets,
            template: settings.url_template.into(),
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

    /// The same prober on another HTTP client, with a pool of its own (for measuring).
    pub fn with_http_stack(mut self, stack: HttpStack) -> Prober {
        self.client = match stack {
            HttpStack::Lean => Http::Lean(Arc::new(Client::new(self.idle_max))),
            HttpStack::Hyper => Http::Hyper(Arc::new(HyperClient::new(self.idle_max))),
        };
        self
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
        self.drive(ids, deadline)
            .await
            .into_iter()
            .map(|(outcome, _)| outcome)
            .collect()
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
        self.drive(ids, deadline).await
    }

    /// The concurrency bound this prober applies.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Runs the probes in one task of their own, bounded by `buffer_unordered`: one
    /// outcome and duration per id, in the order of `ids`.
    ///
    /// The task matters for speed, not correctness: every probe's future owns its socket,
    /// so the task running them is woken for every answer. On a runtime worker that wake-up
    /// is local; on a caller blocked in `Runtime::block_on` (as `once` is) it would come
    /// from another thread, a futex round trip per answer (measured: a context switch per
    /// two probes and a sixth more CPU). Dropping this future aborts the task, so
    /// cancelling a tick still stops its probes; a probe task that panicked leaves its
    /// probes [`ProbeOutcome::CutOff`].
    ///
    /// Memory: at tens of thousands of plugins the results are a large part of a tick's
    /// peak, so they are written where they belong as they come in (one vector, handed
    /// back as is), and the ids the task must own are copied into one buffer rather than
    /// one allocation each.
    async fn drive<S>(&self, ids: &[S], deadline: Instant) -> Vec<(ProbeOutcome, Duration)>
    where
        S: AsRef<str> + Sync,
    {
        let owned = IdList::new(ids);
        let count = owned.len();
        let prober = self.clone();
        let work = async move {
            let prober = &prober;
            let ids = &owned;
            let mut out = vec![(ProbeOutcome::CutOff, Duration::ZERO); ids.len()];
            // Indices, not `(usize, &S)` pairs: a closure taking a borrowed argument makes
            // the future's type higher-ranked, and it could then not be spawned.
            let mut results = futures::stream::iter(0..ids.len())
                .map(|i| async move {
                    let started = Instant::now();
                    let outcome = prober.probe(ids.get(i), Some(deadline)).await;
                    (i, outcome, started.elapsed())
                })
                .buffer_unordered(prober.concurrency);
            while let Some((i, outcome, took)) = results.next().await {
                if let Some(slot) = out.get_mut(i) {
                    *slot = (outcome, took);
                }
            }
            out
        };
        let results = match tokio::runtime::Handle::try_current() {
            // A probe task that panicked leaves its probes without an observation.
            Ok(runtime) => AbortOnDrop(runtime.spawn(work)).join().await.ok(),
            // Not on a Tokio runtime (spawning would panic): run here.
            Err(_) => Some(work.await),
        };
        results.unwrap_or_else(|| vec![(ProbeOutcome::CutOff, Duration::ZERO); count])
    }

    /// One probe: attempts with backoff between them, within the deadline.
    async fn probe(&self, plugin_id: &str, deadline: Option<Instant>) -> ProbeOutcome {
        let request = match self.request_for(plugin_id) {
            Ok(request) => request,
            Err(failure) => return ProbeOutcome::Failed(Box::new(failure.finish(0))),
        };
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
            let failure = match self.attempt(&request, until).await {
                Attempt::Answered(status) => return ProbeOutcome::Reported(status),
                Attempt::Elapsed if cut_by_deadline => return ProbeOutcome::CutOff,
                Attempt::Elapsed => Failure::new(
                    ErrorKind::Timeout,
                    format!("no complete answer within {:?}", self.timeout),
                ),
                Attempt::Failed(failure) => failure,
            };
            if attempts > self.retries || !failure.is_transient() {
                return ProbeOutcome::Failed(Box::new(failure.finish(attempts)));
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

    /// Where the probe of `plugin_id` goes and the request it sends.
    fn request_for<'a>(&'a self, plugin_id: &'a str) -> Result<Request<'a>, Failure> {
        if let Targets::Fixed { endpoint, head } = &self.targets {
            if copied_verbatim(plugin_id) {
                return Ok(Request {
                    endpoint: Arc::clone(endpoint),
                    head: RequestHead::Around(head, plugin_id),
                });
            }
        }
        let url = self.url_for(plugin_id)?;
        let endpoint = endpoint_of(&url).ok_or_else(|| {
            Failure::new(
                ErrorKind::Connect,
                "the status URL for this plugin id has no host".to_owned(),
            )
        })?;
        let send_token = self
            .sidecar
            .as_ref()
            .is_some_and(|origin| origin.matches(&url));
        let token = self.token.as_ref().filter(|_| send_token);
        Ok(Request {
            endpoint: Arc::new(endpoint),
            head: RequestHead::Whole(request_head(&url, token)),
        })
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

    /// One request, bounded by `until` as a whole (connect, head, body): one timer for
    /// all of it.
    async fn attempt(&self, request: &Request<'_>, until: Option<Instant>) -> Attempt {
        let timer = until.map(tokio::time::sleep_until);
        tokio::pin!(timer);
        // Each phase's future is pinned in a scope of its own, so the states of the
        // phases share their room in this future.
        let exchange = {
            let sent = std::pin::pin!(self.send(request));
            match bounded(timer.as_mut(), sent).await {
                None => return Attempt::Elapsed,
                Some(Err(e)) => return Attempt::Failed(client_failure(e)),
                Some(Ok(answer)) => answer,
            }
        };
        if !(200..300).contains(&exchange.status()) {
            return Attempt::Failed(Box::pin(self.non_success(exchange, timer)).await);
        }
        let body = std::pin::pin!(self.read_body(exchange, BODY_LIMIT, parse_status));
        match bounded(timer, body).await {
            None => Attempt::Elapsed,
            Some(Err(e)) => Attempt::Failed(client_failure(e)),
            Some(Ok(Ok(status))) => Attempt::Answered(status),
            Some(Ok(Err(e))) => Attempt::Failed(Failure::new(e.kind, e.detail)),
        }
    }

    /// Classifies a non-2xx answer: the sidecar's own invoke failure in Dapr mode, else
    /// `http_status`. The status code is already known, so a body that cannot be read
    /// in time does not change the kind.
    async fn non_success(&self, exchange: Exchange, timer: Pin<&mut Option<Sleep>>) -> Failure {
        let code = exchange.status();
        let reason = reqwest::StatusCode::from_u16(code)
            .ok()
            .and_then(|c| c.canonical_reason());
        let mut failure = Failure::new(
            ErrorKind::HttpStatus,
            match reason {
                Some(reason) => format!("HTTP {code} {reason}"),
                None => format!("HTTP {code}"),
            },
        );
        failure.http_status = Some(code);
        if self.dapr_invoke && code == 500 {
            let body = std::pin::pin!(self.read_body(exchange, BODY_LIMIT, dapr_error_code));
            if let Some(Ok(Some(error_code))) = bounded(timer, body).await {
                failure.kind = ErrorKind::SidecarInvoke;
                failure.detail =
                    format!("the Dapr sidecar could not invoke the plugin: {error_code}");
                failure.dapr_error_code = Some(error_code);
            }
        } else if exchange.content_length().is_some_and(|n| n <= DRAIN_LIMIT) {
            // Small error bodies are read so the keep-alive connection is reused; the
            // content is not needed.
            let drained = std::pin::pin!(self.read_body(exchange, DRAIN_LIMIT as usize, |_| ()));
            let _ = bounded(timer, drained).await;
        }
        failure
    }

    /// Sends the request and reads the answer's head, on this prober's client.
    async fn send(&self, request: &Request<'_>) -> Result<Exchange, ClientError> {
        match &self.client {
            Http::Lean(client) => {
                let (conn, head) = client.send(&request.endpoint, request.head.parts()).await?;
                Ok(Exchange::Lean(conn, head))
            }
            Http::Hyper(client) => {
                Box::pin(async move {
                    let parsed;
                    let hyper_request = match &request.head {
                        RequestHead::Around(fixed, id) => HyperRequest {
                            target: [&fixed.target_before, id, &fixed.target_after],
                            headers: &fixed.headers,
                        },
                        RequestHead::Whole(head) => {
                            parsed = hyper_parts(head).ok_or_else(|| {
                                ClientError::Protocol("the request could not be built".to_owned())
                            })?;
                            HyperRequest {
                                target: [&parsed.0, "", ""],
                                headers: &parsed.1,
                            }
                        }
                    };
                    let (conn, head) = client.send(&request.endpoint, &hyper_request).await?;
                    Ok(Exchange::Hyper(conn, head))
                })
                .await
            }
        }
    }

    /// Reads the body of an answer, at most `limit` bytes, into `use_body`.
    async fn read_body<T>(
        &self,
        exchange: Exchange,
        limit: usize,
        use_body: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, ClientError> {
        match (&self.client, exchange) {
            (Http::Lean(client), Exchange::Lean(conn, head)) => {
                client.read_body(conn, &head, limit, use_body).await
            }
            (Http::Hyper(client), Exchange::Hyper(conn, head)) => {
                Box::pin(client.read_body(conn, &head, limit, use_body)).await
            }
            // An exchange always comes from this prober's own client.
            _ => Err(ClientError::Protocol(
                "the answer came from another client".to_owned(),
            )),
        }
    }
}

/// The request target and header fields of a request head, for hyper.
fn hyper_parts(head: &[u8]) -> Option<(String, hyper::HeaderMap)> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(head).ok()?;
    let target = request.path?.to_owned();
    let mut map = hyper::HeaderMap::with_capacity(request.headers.len());
    for h in request.headers.iter() {
        let name = hyper::header::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let mut value = hyper::header::HeaderValue::from_bytes(h.value).ok()?;
        if name.as_str() == "dapr-api-token" {
            value.set_sensitive(true);
        }
        map.append(name, value);
    }
    Some((target, map))
}

/// A spawned task that is aborted when this handle is dropped before it finished.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Plugin ids copied into one buffer, for a task that must own them.
struct IdList {
    text: String,
    /// Where each id ends in `text`.
    ends: Vec<usize>,
}

impl IdList {
    fn new<S: AsRef<str>>(ids: &[S]) -> IdList {
        let mut text = String::with_capacity(ids.iter().map(|s| s.as_ref().len()).sum());
        let mut ends = Vec::with_capacity(ids.len());
        for id in ids {
            text.push_str(id.as_ref());
            ends.push(text.len());
        }
        IdList { text, ends }
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    /// Id `i` (empty past the end).
    fn get(&self, i: usize) -> &str {
        let start = match i.checked_sub(1) {
            Some(prev) => self.ends.get(prev).copied().unwrap_or(0),
            None => 0,
        };
        let end = self.ends.get(i).copied().unwrap_or(start);
        self.text.get(start..end).unwrap_or("")
    }
}

/// One probe's request: where it goes and its head.
struct Request<'a> {
    endpoint: Arc<Endpoint>,
    head: RequestHead<'a>,
}

/// A request head, either around a plugin id or whole.
enum RequestHead<'a> {
    /// The template's fixed parts with the id between them.
    Around(&'a FixedHead, &'a str),
    Whole(Vec<u8>),
}

impl RequestHead<'_> {
    fn parts(&self) -> [&[u8]; 3] {
        match self {
            RequestHead::Around(fixed, id) => [&fixed.before, id.as_bytes(), &fixed.after],
            RequestHead::Whole(head) => [head, &[], &[]],
        }
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

/// Awaits `fut` until `timer` fires (forever when there is none); `None` when it fired
/// first. The future is polled before the timer, as `tokio::time::timeout` does.
async fn bounded<F: std::future::Future>(
    timer: Pin<&mut Option<Sleep>>,
    fut: Pin<&mut F>,
) -> Option<F::Output> {
    match timer.as_pin_mut() {
        None => Some(fut.await),
        Some(timer) => tokio::select! {
            biased;
            out = fut => Some(out),
            () = timer => None,
        },
    }
}

/// Maps a client error: the connection could not be made (`connect`), or it was made and
/// the exchange broke (`protocol`: not HTTP, reset, EOF in the head or body), or the body
/// passed [`BODY_LIMIT`]. The client's texts never name the URL.
fn client_failure(error: ClientError) -> Failure {
    match error {
        ClientError::Connect(why) => Failure::new(
            ErrorKind::Connect,
            format!("could not connect: {}", clip(&why)),
        ),
        ClientError::Protocol(why) => Failure::new(
            ErrorKind::Protocol,
            format!("the answer broke off or is not HTTP: {}", clip(&why)),
        ),
        ClientError::TooLarge => Failure::new(
            ErrorKind::TooLarge,
            format!("body larger than {BODY_LIMIT} bytes"),
        ),
    }
}

/// `text` cut to [`DETAIL_LIMIT`] characters, control characters blanked.
fn clip(text: &str) -> String {
    text.chars()
        .take(DETAIL_LIMIT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Whether the URL parser copies `id` into a path or query unchanged: ASCII letters,
/// digits, `-` and `_` only (no dot, so no `.`/`..` segment; nothing to percent-encode).
fn copied_verbatim(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The host and port a URL connects to.
fn endpoint_of(url: &Url) -> Option<Endpoint> {
    Some(Endpoint::new(url.host_str()?, url.port_or_known_default()?))
}

/// The request head for `url`: `GET`, `Host` as the URL names it, the user agent, and the
/// token when given.
fn request_head(url: &Url, token: Option<&HeaderValue>) -> Vec<u8> {
    let host = url.host_str().unwrap_or_default();
    let mut head = Vec::with_capacity(128 + url.as_str().len());
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(url.path().as_bytes());
    if let Some(query) = url.query() {
        head.push(b'?');
        head.extend_from_slice(query.as_bytes());
    }
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(host.as_bytes());
    if let Some(port) = url.port() {
        head.extend_from_slice(format!(":{port}").as_bytes());
    }
    head.extend_from_slice(b"\r\nuser-agent: ");
    head.extend_from_slice(USER_AGENT.as_bytes());
    head.extend_from_slice(b"\r\naccept: */*\r\n");
    if let Some(token) = token {
        head.extend_from_slice(DAPR_TOKEN_HEADER);
        head.extend_from_slice(b": ");
        head.extend_from_slice(token.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The fixed request parts of a template whose placeholder appears once, in the path or
/// query; [`Targets::PerId`] for any other template.
fn fixed_targets(template: &str, token: Option<&HeaderValue>, sidecar: Option<&Origin>) -> Targets {
    if template.matches(PLUGIN_ID_PLACEHOLDER).count() != 1
        || template.contains(ID_MARKER)
        || placeholder_in_authority(template)
    {
        return Targets::PerId;
    }
    let Ok(url) = Url::parse(&template.replace(PLUGIN_ID_PLACEHOLDER, ID_MARKER)) else {
        return Targets::PerId;
    };
    let Some(endpoint) = endpoint_of(&url) else {
        return Targets::PerId;
    };
    let send_token = sidecar.is_some_and(|origin| origin.matches(&url));
    let head = request_head(&url, token.filter(|_| send_token));
    let marker = ID_MARKER.as_bytes();
    let mut found = head
        .windows(marker.len())
        .enumerate()
        .filter(|(_, w)| *w == marker)
        .map(|(i, _)| i);
    // Exactly once, and in the request target (a fragment is never sent).
    let (Some(at), None) = (found.next(), found.next()) else {
        return Targets::PerId;
    };
    let Some((target, headers)) = hyper_parts(&head) else {
        return Targets::PerId;
    };
    let Some((target_before, target_after)) = target.split_once(ID_MARKER) else {
        return Targets::PerId;
    };
    Targets::Fixed {
        endpoint: Arc::new(endpoint),
        head: Arc::new(FixedHead {
            before: head[..at].into(),
            after: head[at + marker.len()..].into(),
            target_before: target_before.into(),
            target_after: target_after.into(),
            headers,
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every probe's future is moved into the probe set when it starts, so its size is a
    /// cost per status call: the attempt's phases share their room and the rare paths
    /// (hyper, chunked and close-delimited bodies, non-2xx answers) are boxed. It was
    /// 3 KiB before; this fails if a change lays the phases side by side again.
    #[test]
    fn a_probes_future_stays_small() {
        let prober = Prober::new(ProbeSettings::new(
            "http://127.0.0.1:9/{plugin_id}/v1/status",
        ))
        .expect("a prober");
        let probe = prober.probe("p", None);
        assert!(
            std::mem::size_of_val(&probe) <= 1536,
            "a probe's future is {} bytes",
            std::mem::size_of_val(&probe)
        );
    }
}
