//! A test double of the Dapr sidecar, on loopback: the fast path for Dapr-path tests.
//!
//! It reproduces the parts of the sidecar's API the worker uses, with the semantics and
//! status codes real daprd shows: tests/daprd_store.rs runs each observed fact on real
//! daprd (tests/support/daprd.rs) and on this double with the same assertions, and the
//! error bodies real daprd sent are answered from tests/fixtures/daprd/.
//!
//! - **gRPC** (`dapr.proto.runtime.v1.Dapr`): `GetState`, `GetBulkState`, `SaveState` and
//!   `DeleteState`. Every other method answers `UNIMPLEMENTED`. Rather than implementing
//!   the generated ~98-method server trait, one small tower service routes on the request
//!   path and runs each of the four through `tonic::server::Grpc` with the prost codec.
//!   Codes: ETag mismatch `ABORTED`; invalid ETag `INVALID_ARGUMENT`; a refused
//!   first-write save *without* an ETag and every other store error `INTERNAL`; an unknown
//!   store name `INVALID_ARGUMENT` (Dapr's `ERR_STATE_STORE_NOT_FOUND`); while the double
//!   is told to be unready, `UNAVAILABLE` (a real sidecar does not serve its API before its
//!   components are loaded).
//! - **Storage**: a real `redis-server` (started here unless a URL is given) through the
//!   project's own Redis backend, which writes Dapr's `state.redis` layout. Each component
//!   applies its key prefix the way Dapr would: the public component has `keyPrefix: none`
//!   (bare keys), the private one a fixed prefix (default `plugins`, lower-cased as Dapr
//!   does), so tests can read the exact Redis bytes the Dapr path produced.
//! - **HTTP**: `/v1.0/invoke/<id>/method/<method>` proxied to a configurable target (the
//!   plugin simulators), status and body passed through; an unreachable target answers 500
//!   with Dapr's JSON error body (`ERR_DIRECT_INVOKE`). `/v1.0/healthz/outbound` answers
//!   204, or 500 while the double is told to stay unready.
//! - **Token**: when configured, a gRPC call without the right `dapr-api-token` metadata
//!   answers `UNAUTHENTICATED` and an HTTP request without the right header 401; health
//!   checks are exempt, as in Dapr.
//!
//! The double counts calls per method (gRPC method name, `invoke`, `healthz`) and records
//! whether any request carried a token at all. It can be told to hang (`set_stalled`),
//! and it stops, open connections included, when dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Body as AxumBody;
use axum::extract::{Request as AxumRequest, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response as AxumResponse};
use dapr::dapr::proto::runtime::v1::{
    BulkStateItem, DeleteStateRequest, GetBulkStateRequest, GetBulkStateResponse, GetStateRequest,
    GetStateResponse, SaveStateRequest,
};
use keel_scraper::store::redis::RedisStore;
use keel_scraper::store::{read_each, Concurrency, Save, Store, StoreError, StoreKind};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::codegen::http;
use tonic::server::{NamedService, UnaryService};
use tonic::Status;

use super::redis_server::RedisServer;

/// Metadata / header name carrying the Dapr API token.
pub const TOKEN_HEADER: &str = "dapr-api-token";

/// The gRPC service name the double serves.
pub const DAPR_SERVICE: &str = "dapr.proto.runtime.v1.Dapr";

/// Maps a service invocation `(app_id, method)` to the URL the double forwards it to;
/// `None` means the app id cannot be resolved (Dapr answers `ERR_DIRECT_INVOKE`).
pub type InvokeTarget = Arc<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

/// How to start a [`SidecarDouble`].
#[derive(Clone)]
pub struct SidecarConfig {
    /// Name of the public state store component (`keyPrefix: none`).
    pub public_store: String,
    /// Name of the private state store component.
    pub private_store: String,
    /// The private component's fixed `keyPrefix` (Dapr lower-cases it).
    pub private_key_prefix: String,
    /// The API token the sidecar requires; `None` accepts every call.
    pub api_token: Option<String>,
    /// Where service invocation goes; `None` makes every app unresolvable.
    pub invoke_target: Option<InvokeTarget>,
    /// Use this Redis instead of starting one (`redis://127.0.0.1:port`).
    pub redis_url: Option<String>,
    /// Stay unready (health 500, gRPC `UNAVAILABLE`) this long after start.
    pub ready_after: Duration,
    /// The sidecar fronts an app that never comes up: `/v1.0/healthz` answers 500 while
    /// `/v1.0/healthz/outbound` does not depend on it (as daprd with an `--app-port`
    /// nobody listens on).
    pub app_down: bool,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        SidecarConfig {
            public_store: "keel-public-store".to_string(),
            private_store: "keel-private-store".to_string(),
            private_key_prefix: "plugins".to_string(),
            api_token: None,
            invoke_target: None,
            redis_url: None,
            ready_after: Duration::ZERO,
            app_down: false,
        }
    }
}

impl SidecarConfig {
    pub fn with_token(mut self, token: &str) -> Self {
        self.api_token = Some(token.to_string());
        self
    }

    /// Service invocation of `<id>/method/<method>` goes to `<base>/<id>/<method>`: the
    /// layout of the plugin simulator, which serves `GET /<plugin_id>/v1/status`.
    pub fn with_invoke_base(mut self, base_url: &str) -> Self {
        let base = base_url.trim_end_matches('/').to_string();
        self.invoke_target = Some(Arc::new(move |id: &str, method: &str| {
            Some(format!("{base}/{id}/{method}"))
        }));
        self
    }

    /// Service invocation goes wherever `target(app_id, method)` says.
    pub fn with_invoke_target(
        mut self,
        target: impl Fn(&str, &str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.invoke_target = Some(Arc::new(target));
        self
    }

    pub fn with_redis_url(mut self, url: &str) -> Self {
        self.redis_url = Some(url.to_string());
        self
    }

    pub fn with_private_key_prefix(mut self, prefix: &str) -> Self {
        self.private_key_prefix = prefix.to_string();
        self
    }

    /// See [`SidecarConfig::app_down`].
    pub fn with_app_down(mut self) -> Self {
        self.app_down = true;
        self
    }

    pub fn ready_after(mut self, delay: Duration) -> Self {
        self.ready_after = delay;
        self
    }
}

/// State shared by both listeners and the test.
struct Shared {
    store: Arc<dyn Store>,
    components: HashMap<String, StoreKind>,
    token: Option<String>,
    invoke_target: Option<InvokeTarget>,
    http: reqwest::Client,
    /// `None`: unready until told otherwise; `Some(t)`: ready from `t` on.
    ready_at: Mutex<Option<Instant>>,
    calls: Mutex<HashMap<String, u64>>,
    saw_token: AtomicBool,
    /// While set, state calls never answer (a hung sidecar).
    stalled: AtomicBool,
    app_down: bool,
    /// Raw commands on the double's Redis, for what the store trait cannot express.
    raw: redis::Client,
    private_key_prefix: String,
}

impl Shared {
    fn count(&self, method: &str) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        *calls.entry(method.to_string()).or_default() += 1;
    }

    fn is_ready(&self) -> bool {
        let ready_at = self.ready_at.lock().unwrap_or_else(|e| e.into_inner());
        matches!(*ready_at, Some(t) if Instant::now() >= t)
    }

    /// Records that a token arrived, and says whether it is the right one (always true
    /// when the sidecar has no token configured).
    fn check_token(&self, presented: Option<&[u8]>) -> Result<(), &'static str> {
        if presented.is_some() {
            self.saw_token.store(true, Ordering::SeqCst);
        }
        match (&self.token, presented) {
            (None, _) => Ok(()),
            (Some(_), None) => Err("missing api token"),
            (Some(want), Some(got)) if want.as_bytes() == got => Ok(()),
            (Some(_), Some(_)) => Err("api token mismatch"),
        }
    }

    fn kind(&self, store_name: &str) -> Result<StoreKind, Status> {
        self.components.get(store_name).copied().ok_or_else(|| {
            // Dapr's ERR_STATE_STORE_NOT_FOUND.
            Status::invalid_argument(format!("state store {store_name} is not found"))
        })
    }
}

/// Dapr refuses keys containing its prefix separator.
fn check_key(key: &str) -> Result<(), Status> {
    if key.contains("||") {
        return Err(Status::invalid_argument(format!(
            "input key/keyPrefix '{key}' can't contain '||'"
        )));
    }
    Ok(())
}

// Dapr's `state.redis` reports no `ttlExpireTime` on a get (real daprd, checked in
// tests/daprd_store.rs): through it a TTL is invisible, so the double reports none either.

// ---------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Adapts an async closure to tonic's `UnaryService`.
struct Unary<F>(F);

impl<Req, Resp, F, Fut> UnaryService<Req> for Unary<F>
where
    F: FnMut(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    type Response = Resp;
    type Future = Fut;

    fn call(&mut self, request: tonic::Request<Req>) -> Fut {
        (self.0)(request)
    }
}

/// Decodes `req` as `Req`, runs `handler`, encodes its answer: one unary gRPC call.
async fn unary<Req, Resp, H, Fut>(
    shared: Arc<Shared>,
    req: http::Request<tonic::body::Body>,
    handler: H,
) -> http::Response<tonic::body::Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    H: Fn(Arc<Shared>, Req) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send,
{
    let service = Unary(move |request: tonic::Request<Req>| {
        let shared = shared.clone();
        let handler = handler.clone();
        async move {
            handler(shared, request.into_inner())
                .await
                .map(tonic::Response::new)
        }
    });
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<Resp, Req>::default());
    grpc.unary(service, req).await
}

/// The gRPC surface: routes on the path, `UNIMPLEMENTED` for everything but four methods.
#[derive(Clone)]
struct DaprGrpc {
    shared: Arc<Shared>,
}

impl NamedService for DaprGrpc {
    const NAME: &'static str = DAPR_SERVICE;
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for DaprGrpc {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let method = req
                .uri()
                .path()
                .strip_prefix(&format!("/{DAPR_SERVICE}/"))
                .unwrap_or_default()
                .to_string();
            shared.count(&method);
            let presented = req.headers().get(TOKEN_HEADER).map(|v| v.as_bytes());
            if let Err(reason) = shared.check_token(presented) {
                return Ok(
                    Status::unauthenticated(format!("authentication error: {reason}")).into_http(),
                );
            }
            let implemented = matches!(
                method.as_str(),
                "GetState" | "GetBulkState" | "SaveState" | "DeleteState"
            );
            if !implemented {
                return Ok(Status::unimplemented(format!(
                    "the sidecar double does not implement {method:?}"
                ))
                .into_http());
            }
            if !shared.is_ready() {
                return Ok(Status::unavailable("the Dapr sidecar is not ready yet").into_http());
            }
            while shared.stalled.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let response = match method.as_str() {
                "GetState" => unary(shared, req, get_state).await,
                "GetBulkState" => unary(shared, req, get_bulk_state).await,
                "SaveState" => unary(shared, req, save_state).await,
                _ => unary(shared, req, delete_state).await,
            };
            Ok(response)
        })
    }
}

async fn get_state(shared: Arc<Shared>, req: GetStateRequest) -> Result<GetStateResponse, Status> {
    let kind = shared.kind(&req.store_name)?;
    check_key(&req.key)?;
    match shared.store.get(kind, &req.key).await {
        Ok(None) => Ok(GetStateResponse::default()),
        Ok(Some(entry)) => Ok(GetStateResponse {
            metadata: HashMap::new(),
            data: entry.data,
            etag: entry.etag,
        }),
        Err(err) => Err(Status::internal(format!(
            "fail to get {} from state store {}: {}",
            req.key,
            req.store_name,
            redis_text(&err)
        ))),
    }
}

async fn get_bulk_state(
    shared: Arc<Shared>,
    req: GetBulkStateRequest,
) -> Result<GetBulkStateResponse, Status> {
    let kind = shared.kind(&req.store_name)?;
    for key in &req.keys {
        check_key(key)?;
    }
    // Dapr reads each key on its own: a key it cannot read is reported in that item's
    // `error` and the call succeeds.
    let entries = read_each(shared.store.as_ref(), kind, &req.keys, 16)
        .await
        .map_err(|err| Status::internal(format!("failed getting bulk state: {err}")))?;
    let items = req
        .keys
        .into_iter()
        .zip(entries)
        .map(|(key, entry)| match entry {
            Ok(None) => BulkStateItem {
                key,
                ..Default::default()
            },
            Ok(Some(entry)) => BulkStateItem {
                key,
                metadata: HashMap::new(),
                data: entry.data,
                etag: entry.etag,
                error: String::new(),
            },
            Err(err) => BulkStateItem {
                key,
                error: redis_text(&err),
                ..Default::default()
            },
        })
        .collect();
    Ok(GetBulkStateResponse { items })
}

/// What daprd passes on from Redis for a failed read: for a key of another type, Redis's
/// own `WRONGTYPE` error (the text real daprd sent, tests/daprd_store.rs).
fn redis_text(err: &StoreError) -> String {
    match err {
        StoreError::Unreadable { .. } => {
            "WRONGTYPE Operation against a key holding the wrong kind of value".to_string()
        }
        other => other.to_string(),
    }
}

/// Maps a store error to the status Dapr answers with. An ETag failure is reported as
/// such only when the request carried an ETag; otherwise it is a plain store error.
fn store_status(prefix: String, err: StoreError, had_etag: bool) -> Status {
    match err {
        StoreError::Conflict { .. } if had_etag => Status::aborted(format!(
            "{prefix}: possible etag mismatch. error from state store: {err}"
        )),
        StoreError::InvalidEtag { ref etag, .. } => Status::invalid_argument(format!(
            "{prefix}: invalid etag value: {etag:?} is not an integer"
        )),
        other => Status::internal(format!("{prefix}: {other}")),
    }
}

async fn save_state(shared: Arc<Shared>, req: SaveStateRequest) -> Result<(), Status> {
    let kind = shared.kind(&req.store_name)?;
    for item in &req.states {
        check_key(&item.key)?;
    }
    let prefix = format!("failed saving state in state store {}", req.store_name);
    for item in &req.states {
        let etag = item.etag.as_ref().map(|e| e.value.as_str());
        let had_etag = etag.is_some_and(|e| !e.is_empty());
        // Only an explicit last-write (2) ignores the ETag. Without options, or with
        // unspecified concurrency, an ETag is checked like first-write's, but the key is
        // not marked first-write.
        let requested = item.options.map(|o| o.concurrency).unwrap_or(0);
        let unspecified = requested != 1 && requested != 2;
        let concurrency = match requested {
            1 => Concurrency::FirstWrite,
            _ if unspecified && had_etag => Concurrency::FirstWrite,
            _ => Concurrency::LastWrite,
        };
        let ttl_seconds = match item.metadata.get("ttlInSeconds") {
            None => None,
            Some(raw) => Some(raw.parse::<i64>().map_err(|_| {
                Status::internal(format!(
                    "{prefix}: incorrect value for metadata 'ttlInSeconds': {raw:?}"
                ))
            })?),
        };
        let save = Save {
            key: &item.key,
            data: &item.value,
            etag,
            concurrency,
            ttl_seconds,
        };
        // Emulated, not atomic (the worker always sends an explicit concurrency): a
        // first-write save, then the `first-write` field dropped again if it was new.
        let unmark = if unspecified && had_etag {
            let physical = match kind {
                StoreKind::Public => item.key.clone(),
                StoreKind::Private => format!("{}||{}", shared.private_key_prefix, item.key),
            };
            let mut conn = shared
                .raw
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| Status::internal(format!("{prefix}: {e}")))?;
            let marked: bool = redis::cmd("HEXISTS")
                .arg(&physical)
                .arg("first-write")
                .query_async(&mut conn)
                .await
                .unwrap_or(false);
            (!marked).then_some((conn, physical))
        } else {
            None
        };
        shared
            .store
            .save(kind, save)
            .await
            .map_err(|err| store_status(prefix.clone(), err, had_etag))?;
        if let Some((mut conn, physical)) = unmark {
            let _: Result<i64, _> = redis::cmd("HDEL")
                .arg(&physical)
                .arg("first-write")
                .query_async(&mut conn)
                .await;
        }
    }
    Ok(())
}

/// Dapr's `state.redis` delete compares the ETag with the stored version *as a string*
/// and never parses it: a non-integer ETag deletes an absent key and is a mismatch
/// (`ABORTED`) on an existing one, never `INVALID_ARGUMENT`. The Redis backend rejects
/// such an ETag up front, so the double settles that case itself.
async fn delete_state(shared: Arc<Shared>, req: DeleteStateRequest) -> Result<(), Status> {
    let kind = shared.kind(&req.store_name)?;
    check_key(&req.key)?;
    let etag = req.etag.as_ref().map(|e| e.value.as_str());
    let had_etag = etag.is_some_and(|e| !e.is_empty());
    let prefix = format!("failed deleting state with key {}", req.key);
    match shared.store.delete(kind, &req.key, etag).await {
        Ok(()) => Ok(()),
        Err(StoreError::InvalidEtag { .. }) => match shared.store.get(kind, &req.key).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(Status::aborted(format!(
                "{prefix}: possible etag mismatch. error from state store: failed to delete {}",
                req.key
            ))),
            Err(err) => Err(Status::internal(format!("{prefix}: {err}"))),
        },
        Err(err) => Err(store_status(prefix, err, had_etag)),
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// Error bodies real daprd sent (tests/fixtures/daprd/README.md), answered byte for byte.
pub mod fixtures {
    pub const INVOKE_UNKNOWN_APP: &str = include_str!("../fixtures/daprd/invoke-unknown-app.json");
    pub const INVOKE_CONNECTION_REFUSED: &str =
        include_str!("../fixtures/daprd/invoke-connection-refused.json");
    pub const HEALTHZ_APP_NOT_READY: &str =
        include_str!("../fixtures/daprd/healthz-app-not-ready.json");
    pub const UNAUTHORIZED: &str = include_str!("../fixtures/daprd/unauthorized.txt");

    /// A fixture with its `{app_id}`, `{url}` and `{addr}` filled in.
    pub fn render(fixture: &str, app_id: &str, url: &str, addr: &str) -> String {
        fixture
            .replace("{app_id}", app_id)
            .replace("{url}", url)
            .replace("{addr}", addr)
    }
}

fn json_response(status: StatusCode, body: String) -> AxumResponse {
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

fn dapr_error(status: StatusCode, code: &str, message: &str) -> AxumResponse {
    let body = serde_json::json!({ "errorCode": code, "message": message }).to_string();
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

/// One handler for every path: the HTTP surface is three routes, matched by hand.
async fn http_entry(State(shared): State<Arc<Shared>>, req: AxumRequest) -> AxumResponse {
    let path = req.uri().path().to_string();
    let presented = req
        .headers()
        .get(TOKEN_HEADER)
        .map(|v| v.as_bytes().to_vec());

    if path == "/v1.0/healthz/outbound" || path == "/v1.0/healthz" {
        shared.count("healthz");
        if presented.is_some() {
            shared.saw_token.store(true, Ordering::SeqCst);
        }
        let app_ok = path == "/v1.0/healthz/outbound" || !shared.app_down;
        return if shared.is_ready() && app_ok {
            StatusCode::NO_CONTENT.into_response()
        } else if shared.is_ready() {
            json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                fixtures::HEALTHZ_APP_NOT_READY.to_string(),
            )
        } else {
            dapr_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_HEALTH_NOT_READY",
                "dapr is not ready",
            )
        };
    }

    if shared.check_token(presented.as_deref()).is_err() {
        shared.count("unauthorized");
        // Dapr's HTTP token check answers a plain-text 401 (Go's `http.Error`).
        let mut response = (StatusCode::UNAUTHORIZED, fixtures::UNAUTHORIZED).into_response();
        response.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return response;
    }

    let Some(rest) = path.strip_prefix("/v1.0/invoke/") else {
        shared.count("not_found");
        return dapr_error(StatusCode::NOT_FOUND, "ERR_NOT_FOUND", "no such route");
    };
    let Some((app_id, method)) = rest.split_once("/method/") else {
        shared.count("not_found");
        return dapr_error(StatusCode::NOT_FOUND, "ERR_NOT_FOUND", "no such route");
    };
    shared.count("invoke");
    let (app_id, method) = (app_id.to_string(), method.to_string());
    invoke(&shared, &app_id, &method, req).await
}

/// Forwards the request (method, query and body; not the caller's headers, so never its
/// token) to the app and passes its status, content type and body back.
async fn invoke(shared: &Shared, app_id: &str, method: &str, req: AxumRequest) -> AxumResponse {
    let failed = |err: String| {
        dapr_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_DIRECT_INVOKE",
            &format!("failed to invoke, id: {app_id}, err: {err}"),
        )
    };
    let target = shared
        .invoke_target
        .as_ref()
        .and_then(|target| target(app_id, method));
    let Some(mut url) = target else {
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            fixtures::render(fixtures::INVOKE_UNKNOWN_APP, app_id, "", ""),
        );
    };
    if let Some(query) = req.uri().query() {
        url.push('?');
        url.push_str(query);
    }
    let http_method = req.method().clone();
    let body = match axum::body::to_bytes(req.into_body(), 16 * 1024 * 1024).await {
        Ok(body) => body,
        Err(err) => return failed(format!("cannot read the request body: {err}")),
    };
    let forward = shared.http.request(http_method, &url).body(body);
    let response = match forward.send().await {
        Ok(response) => response,
        Err(err) if err.is_connect() && error_chain(&err).contains("refused") => {
            let addr = reqwest::Url::parse(&url)
                .ok()
                .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
                .unwrap_or_default();
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                fixtures::render(fixtures::INVOKE_CONNECTION_REFUSED, app_id, &url, &addr),
            );
        }
        Err(err) => return failed(error_chain(&err)),
    };
    let status = StatusCode::from_u16(response.status().as_u16())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = response.headers().get("content-type").cloned();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(err) => return failed(error_chain(&err)),
    };
    let mut out = AxumResponse::new(AxumBody::from(body));
    *out.status_mut() = status;
    if let Some(content_type) = content_type {
        if let Ok(value) = HeaderValue::from_bytes(content_type.as_bytes()) {
            out.headers_mut().insert("content-type", value);
        }
    }
    out
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}

// ---------------------------------------------------------------------------------------
// Connections that die with the double
// ---------------------------------------------------------------------------------------

/// Cuts every connection of one double at once. A client keeps its HTTP/2 (or keep-alive
/// HTTP/1) connection open after a call, and the servers run each connection in its own
/// task; without this a dropped double would go on answering on those connections.
#[derive(Default)]
struct KillSwitch {
    killed: AtomicBool,
    /// The waker of each open connection's last read or write, to wake it when killed.
    wakers: Mutex<Vec<Weak<Mutex<Option<Waker>>>>>,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in wakers.iter().filter_map(Weak::upgrade) {
            if let Some(waker) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                waker.wake();
            }
        }
    }
}

/// A listener whose connections fail as soon as its [`KillSwitch`] is thrown.
struct KillableListener {
    inner: TcpListener,
    switch: Arc<KillSwitch>,
}

impl KillableListener {
    async fn accept_killable(&mut self) -> (KillableStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, addr)) => {
                    let _ = tcp.set_nodelay(true);
                    let waker = Arc::new(Mutex::new(None));
                    let mut wakers = self.switch.wakers.lock().unwrap_or_else(|e| e.into_inner());
                    wakers.retain(|w| w.strong_count() > 0);
                    wakers.push(Arc::downgrade(&waker));
                    let stream = KillableStream {
                        inner: tcp,
                        switch: self.switch.clone(),
                        waker,
                    };
                    return (stream, addr);
                }
                // Too many open files and the like: wait and go on, as servers do.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillableStream, SocketAddr) {
        self.accept_killable().await
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

struct KillableStream {
    inner: tokio::net::TcpStream,
    switch: Arc<KillSwitch>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl KillableStream {
    /// Fails once killed; otherwise remembers who to wake when it is.
    fn check(&self, cx: &Context<'_>) -> std::io::Result<()> {
        if self.switch.killed.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the sidecar double was stopped",
            ));
        }
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        Ok(())
    }
}

impl tokio::io::AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for KillableStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

// ---------------------------------------------------------------------------------------
// The double
// ---------------------------------------------------------------------------------------

/// A running sidecar double. Both listeners stop, and the Redis it started is killed, when
/// it is dropped.
pub struct SidecarDouble {
    shared: Arc<Shared>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    redis_url: String,
    redis: Option<RedisServer>,
    public_store: String,
    private_store: String,
    private_key_prefix: String,
    /// Cuts open connections when the double is dropped.
    switch: Arc<KillSwitch>,
    tasks: Vec<JoinHandle<()>>,
}

impl SidecarDouble {
    /// Starts Redis (unless `config.redis_url` is set), then both listeners on free
    /// loopback ports. Panics on failure: it is test support.
    pub async fn start(config: SidecarConfig) -> SidecarDouble {
        let (redis, redis_url) = match &config.redis_url {
            Some(url) => (None, url.clone()),
            None => {
                let server = RedisServer::start();
                let url = server.url();
                (Some(server), url)
            }
        };
        // Dapr lower-cases fixed key prefixes.
        let private_key_prefix = config.private_key_prefix.to_lowercase();
        let store = RedisStore::connect(
            &redis_url,
            &config.public_store,
            &config.private_store,
            &private_key_prefix,
        )
        .await
        .unwrap_or_else(|e| panic!("sidecar double cannot reach redis at {redis_url}: {e}"));

        let mut components = HashMap::new();
        components.insert(config.public_store.clone(), StoreKind::Public);
        components.insert(config.private_store.clone(), StoreKind::Private);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_else(|e| panic!("sidecar double cannot build its HTTP client: {e}"));
        let shared = Arc::new(Shared {
            store: Arc::new(store),
            components,
            token: config.api_token.clone(),
            invoke_target: config.invoke_target.clone(),
            http,
            ready_at: Mutex::new(Some(Instant::now() + config.ready_after)),
            calls: Mutex::new(HashMap::new()),
            saw_token: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            app_down: config.app_down,
            raw: redis::Client::open(redis_url.as_str())
                .unwrap_or_else(|e| panic!("sidecar double: bad redis URL: {e}")),
            private_key_prefix: private_key_prefix.clone(),
        });

        let grpc_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("sidecar double cannot bind its gRPC port: {e}"));
        let grpc_addr = grpc_listener
            .local_addr()
            .unwrap_or_else(|e| panic!("gRPC listener has no address: {e}"));
        let http_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("sidecar double cannot bind its HTTP port: {e}"));
        let http_addr = http_listener
            .local_addr()
            .unwrap_or_else(|e| panic!("HTTP listener has no address: {e}"));

        let switch = Arc::new(KillSwitch::default());
        let grpc_service = DaprGrpc {
            shared: shared.clone(),
        };
        let grpc_listener = KillableListener {
            inner: grpc_listener,
            switch: switch.clone(),
        };
        let incoming = futures::stream::unfold(grpc_listener, |mut listener| async move {
            let (stream, _) = listener.accept_killable().await;
            Some((Ok::<_, std::io::Error>(stream), listener))
        });
        let grpc_task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(grpc_service)
                .serve_with_incoming(incoming)
                .await;
            if let Err(err) = result {
                eprintln!("sidecar double gRPC server stopped: {err}");
            }
        });

        let app = axum::Router::new()
            .fallback(http_entry)
            .with_state(shared.clone());
        let http_listener = KillableListener {
            inner: http_listener,
            switch: switch.clone(),
        };
        let http_task = tokio::spawn(async move {
            if let Err(err) = axum::serve(http_listener, app).await {
                eprintln!("sidecar double HTTP server stopped: {err}");
            }
        });

        SidecarDouble {
            shared,
            grpc_addr,
            http_addr,
            redis_url,
            redis,
            public_store: config.public_store,
            private_store: config.private_store,
            private_key_prefix,
            switch,
            tasks: vec![grpc_task, http_task],
        }
    }

    /// `http://127.0.0.1:<port>` of the gRPC listener.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_addr.port()
    }

    /// `http://127.0.0.1:<port>` of the HTTP listener.
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn http_port(&self) -> u16 {
        self.http_addr.port()
    }

    /// The Redis the double stores into.
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// The Redis server the double started, if it started one.
    pub fn redis(&self) -> Option<&RedisServer> {
        self.redis.as_ref()
    }

    pub fn public_store(&self) -> &str {
        &self.public_store
    }

    pub fn private_store(&self) -> &str {
        &self.private_store
    }

    /// The private component's key prefix, as Dapr applies it (lower case).
    pub fn private_key_prefix(&self) -> &str {
        &self.private_key_prefix
    }

    /// The Redis key Dapr uses for `key` in the given component.
    pub fn redis_key(&self, kind: StoreKind, key: &str) -> String {
        match kind {
            StoreKind::Public => key.to_string(),
            StoreKind::Private => format!("{}||{key}", self.private_key_prefix),
        }
    }

    /// How many calls arrived for `method`: a gRPC method name (`GetState`, ...,
    /// including unimplemented ones), `invoke`, `healthz`, `unauthorized` or `not_found`.
    pub fn calls(&self, method: &str) -> u64 {
        let calls = self.shared.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.get(method).copied().unwrap_or(0)
    }

    /// Every counter, by method.
    pub fn all_calls(&self) -> HashMap<String, u64> {
        self.shared
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether any request, on either surface, carried a `dapr-api-token` (right or wrong).
    pub fn saw_token(&self) -> bool {
        self.shared.saw_token.load(Ordering::SeqCst)
    }

    /// Ready now (`true`) or unready until told otherwise (`false`).
    pub fn set_ready(&self, ready: bool) {
        let mut ready_at = self
            .shared
            .ready_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *ready_at = ready.then(Instant::now);
    }

    /// Unready for `delay` from now, then ready.
    pub fn set_ready_after(&self, delay: Duration) {
        let mut ready_at = self
            .shared
            .ready_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *ready_at = Some(Instant::now() + delay);
    }

    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// While `true`, the four state methods accept calls but do not answer (until set
    /// back to `false`): a hung sidecar, for timeout tests.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::SeqCst);
    }
}

impl Drop for SidecarDouble {
    /// Stops accepting and fails every open connection, so the sidecar is gone at once,
    /// as if its process had died.
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.switch.kill();
    }
}
