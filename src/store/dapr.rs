//! The production backend: Dapr state through the sidecar's gRPC API.
//!
//! In Kubernetes the worker never talks to Redis itself; it talks to its Dapr sidecar,
//! which owns the state store components. This backend speaks the sidecar's
//! `dapr.proto.runtime.v1.Dapr` service through the generated tonic client of the `dapr`
//! crate (the crate's high-level client has no bulk get and hides its tonic client).
//!
//! Semantics are Dapr's own, which the [`Store`] trait was written after:
//! - `GetState` of a missing key answers empty data and an empty ETag: that is `None`.
//! - Every save is one `SaveState` item with `StateOptions { concurrency, consistency:
//!   strong }`, the ETag when one is given, and `ttlInSeconds` metadata when a TTL applies.
//! - gRPC `ABORTED` is an ETag mismatch ([`StoreError::Conflict`]); `INVALID_ARGUMENT`
//!   about the ETag is [`StoreError::InvalidEtag`]; everything else, including a refused
//!   first-write save *without* an ETag (Dapr reports it as `INTERNAL`), is
//!   [`StoreError::Failed`] naming the store and key.
//! - Dapr cannot check that a key still exists before writing it: a key deleted between
//!   read and write is re-created by a CAS write. [`Store::update_checks_existence`] is
//!   therefore `false`, and the caller undoes a resurrected route itself.
//! - The physical Redis key is decided by each component's `keyPrefix` metadata, not by
//!   this process; [`Store::locate`] says so.
//!
//! The Dapr API token, when configured, is added to every call by [`TokenInterceptor`]
//! and never appears in a log line, an error or `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use dapr::dapr::proto::common::v1::{state_options, Etag, StateItem, StateOptions};
use dapr::dapr::proto::runtime::v1::dapr_client::DaprClient;
use dapr::dapr::proto::runtime::v1::{
    DeleteStateRequest, GetBulkStateRequest, GetStateRequest, SaveStateRequest,
};
use futures::{StreamExt, TryStreamExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::{Concurrency, Entry, Save, Store, StoreError, StoreKind, ABSENT_ETAG};
use crate::secret::Secret;

/// The gRPC metadata (and HTTP header) name Dapr reads its API token from.
pub const API_TOKEN_METADATA: &str = "dapr-api-token";

/// Response metadata in which Dapr state stores report when a key with a TTL expires.
pub const TTL_EXPIRE_TIME_METADATA: &str = "ttlExpireTime";

/// Request metadata that sets (n > 0) or removes (n <= 0) a key's TTL.
pub const TTL_IN_SECONDS_METADATA: &str = "ttlInSeconds";

/// How long a single call may take before it fails; an outage must surface within seconds
/// so a tick gives up (and its lease expires) instead of hanging.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long establishing the HTTP/2 connection to the sidecar may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Keys per `GetBulkState` call: a few hundred kilobytes of routes per message, well
/// under the sidecar's default 4 MiB limit.
pub const BULK_CHUNK: usize = 1000;

/// `GetBulkState` calls in flight at once for one [`Store::bulk_get`].
pub const BULK_CONCURRENCY: usize = 4;

/// The sidecar's own parallelism when a store has no native bulk read.
const BULK_PARALLELISM: i32 = 16;

/// Largest response accepted from the sidecar. A single value may be large (a registry
/// of many plugins); the sidecar enforces its own limit on what it sends.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// The key [`Store::ping`] reads: a plain read of a key nobody writes proves that the
/// sidecar answers and that its private store component is loaded.
const PING_KEY: &str = "keel-scraper-ping";

/// Adds `dapr-api-token` to every request when a token is configured.
///
/// The token is parsed once into a metadata value; `Debug` never shows it.
#[derive(Clone)]
pub struct TokenInterceptor {
    token: Option<MetadataValue<Ascii>>,
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert(API_TOKEN_METADATA, token.clone());
        }
        Ok(request)
    }
}

impl fmt::Debug for TokenInterceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenInterceptor")
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

type Client = DaprClient<InterceptedService<Channel, TokenInterceptor>>;

/// The Dapr state backend. Cheap to share: the underlying channel multiplexes calls.
#[derive(Clone)]
pub struct DaprStore {
    client: Client,
    /// The endpoint as the operator gave it, for error messages.
    endpoint: String,
    public_store: String,
    private_store: String,
    /// Kept only to scrub it from any message the sidecar sends back.
    token: Option<Secret>,
}

impl fmt::Debug for DaprStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaprStore")
            .field("endpoint", &self.endpoint)
            .field("public_store", &self.public_store)
            .field("private_store", &self.private_store)
            .field("token", &self.token)
            .finish()
    }
}

/// `http://` prepended when the endpoint has no scheme; `https://` is refused because this
/// build talks plain HTTP/2 to a sidecar on the loopback interface.
fn endpoint_uri(grpc_endpoint: &str) -> Result<String, String> {
    let trimmed = grpc_endpoint.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err("the Dapr gRPC endpoint is empty".to_string());
    }
    if let Some(rest) = trimmed.strip_prefix("http://") {
        return Ok(format!("http://{rest}"));
    }
    if trimmed.starts_with("https://") {
        return Err(format!(
            "the Dapr gRPC endpoint {trimmed:?} uses https, but the sidecar is reached over \
             plain HTTP/2 (use host:port or http://host:port)"
        ));
    }
    if trimmed.contains("://") {
        return Err(format!(
            "the Dapr gRPC endpoint {trimmed:?} has an unsupported scheme (use host:port or \
             http://host:port)"
        ));
    }
    Ok(format!("http://{trimmed}"))
}

impl DaprStore {
    /// Prepares a client for the sidecar at `grpc_endpoint` (`host:port`, with or without
    /// `http://`). The connection is made lazily, on the first call, so start-up does not
    /// depend on the order in which the sidecar and the worker come up; every call is
    /// bounded by [`CALL_TIMEOUT`] and connecting by [`CONNECT_TIMEOUT`].
    ///
    /// Async so that it runs inside the Tokio runtime the channel spawns its worker task
    /// on; polled outside one it returns an error instead of panicking. It does not wait
    /// for the sidecar: use [`Store::ping`] (or the sidecar's health endpoint) for that.
    pub async fn connect(
        grpc_endpoint: &str,
        token: Option<Secret>,
        public_store: &str,
        private_store: &str,
    ) -> Result<DaprStore, StoreError> {
        let setup_error = |message: String| StoreError::Failed {
            store: format!("{public_store}, {private_store}"),
            operation: "connect to the Dapr sidecar at",
            key: grpc_endpoint.to_string(),
            message,
        };
        let uri = endpoint_uri(grpc_endpoint).map_err(setup_error)?;
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| setup_error(format!("invalid Dapr gRPC endpoint {uri:?}: {e}")))?
            .timeout(CALL_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let token_value = match &token {
            None => None,
            Some(secret) => Some(secret.expose().parse::<MetadataValue<Ascii>>().map_err(
                |_| {
                    setup_error(
                        "the Dapr API token is not a valid gRPC metadata value \
                         (printable ASCII only)"
                            .to_string(),
                    )
                },
            )?),
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(setup_error(
                "no Tokio runtime is running to drive the connection".to_string(),
            ));
        }
        let channel = endpoint.connect_lazy();
        let client = DaprClient::with_interceptor(channel, TokenInterceptor { token: token_value })
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        Ok(DaprStore {
            client,
            endpoint: grpc_endpoint.to_string(),
            public_store: public_store.to_string(),
            private_store: private_store.to_string(),
            token,
        })
    }

    fn name(&self, kind: StoreKind) -> &str {
        match kind {
            StoreKind::Public => &self.public_store,
            StoreKind::Private => &self.private_store,
        }
    }

    /// Removes the token from text that came back from the sidecar, in case a proxy or a
    /// future sidecar echoes request metadata into an error.
    fn scrub(&self, text: String) -> String {
        match &self.token {
            Some(secret) if !secret.expose().is_empty() && text.contains(secret.expose()) => {
                text.replace(secret.expose(), "[redacted]")
            }
            _ => text,
        }
    }

    /// One `GetBulkState` call; the result has one item per key of `keys`, in order.
    async fn bulk_get_chunk(
        &self,
        kind: StoreKind,
        keys: &[String],
    ) -> Result<Vec<Option<Entry>>, StoreError> {
        let store = self.name(kind);
        let Some(first) = keys.first() else {
            return Ok(Vec::new());
        };
        let request = GetBulkStateRequest {
            store_name: store.to_string(),
            keys: keys.to_vec(),
            parallelism: BULK_PARALLELISM,
            metadata: HashMap::new(),
        };
        let response = self
            .client
            .clone()
            .get_bulk_state(request)
            .await
            .map_err(|s| {
                let what = match keys.len() {
                    1 => first.clone(),
                    n => format!("{first} (and {} more keys)", n - 1),
                };
                self.map_status(s, store, "bulk get", &what, None)
            })?
            .into_inner();
        // Dapr may answer in any order (its fallback reads keys in parallel): match by key.
        let mut by_key = HashMap::with_capacity(response.items.len());
        for item in response.items {
            if !item.error.is_empty() {
                // A per-key error in an answered bulk read is that key's fault (e.g. a
                // value that is not a state hash); the caller re-reads keys one by one.
                return Err(StoreError::Unreadable {
                    store: store.to_string(),
                    key: item.key.clone(),
                    message: format!(
                        "the Dapr sidecar at {} reported a state store error for this key: {}",
                        self.endpoint,
                        self.scrub(item.error)
                    ),
                });
            }
            by_key.insert(item.key.clone(), item);
        }
        keys.iter()
            .map(|key| match by_key.get(key) {
                Some(item) => Ok(entry(item.data.clone(), item.etag.clone(), &item.metadata)),
                None => Err(StoreError::Failed {
                    store: store.to_string(),
                    operation: "bulk get",
                    key: key.clone(),
                    message: format!(
                        "the Dapr sidecar at {} returned no item for this key",
                        self.endpoint
                    ),
                }),
            })
            .collect()
    }

    /// Maps a gRPC status to the store error it means (see the module docs).
    fn map_status(
        &self,
        status: Status,
        store: &str,
        operation: &'static str,
        key: &str,
        etag: Option<&str>,
    ) -> StoreError {
        let detail = self.scrub(status_detail(&status));
        let failed = |message: String| StoreError::Failed {
            store: store.to_string(),
            operation,
            key: key.to_string(),
            message,
        };
        match status.code() {
            Code::Aborted => StoreError::Conflict {
                store: store.to_string(),
                key: key.to_string(),
            },
            Code::InvalidArgument => match etag {
                Some(etag) if detail.to_ascii_lowercase().contains("etag") => {
                    StoreError::InvalidEtag {
                        store: store.to_string(),
                        key: key.to_string(),
                        etag: etag.to_string(),
                    }
                }
                _ => failed(format!(
                    "the Dapr sidecar at {} rejected the request as invalid (is a state store \
                     component named {store:?} loaded?): {detail}",
                    self.endpoint
                )),
            },
            Code::Unauthenticated => failed(format!(
                "the Dapr sidecar at {} rejected the Dapr API token (missing or wrong; check \
                 DAPR_API_TOKEN)",
                self.endpoint
            )),
            Code::Internal => failed(format!(
                "the Dapr sidecar at {} reported a state store error: {detail}",
                self.endpoint
            )),
            Code::Unavailable | Code::Unknown => failed(format!(
                "the Dapr sidecar at {} is unreachable or not serving: {detail}",
                self.endpoint
            )),
            Code::DeadlineExceeded | Code::Cancelled => failed(format!(
                "the Dapr sidecar at {} did not answer within {}: {detail}",
                self.endpoint,
                humantime::format_duration(CALL_TIMEOUT)
            )),
            Code::Unimplemented => failed(format!(
                "the Dapr sidecar at {} does not implement this call: {detail}",
                self.endpoint
            )),
            other => failed(format!(
                "the Dapr sidecar at {} answered gRPC {other:?}: {detail}",
                self.endpoint
            )),
        }
    }
}

/// The status message followed by its source chain: transport failures carry the useful
/// part ("connection refused") in the sources.
fn status_detail(status: &Status) -> String {
    let mut detail = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let text = err.to_string();
        if !text.is_empty() && !detail.contains(&text) {
            if !detail.is_empty() {
                detail.push_str(": ");
            }
            detail.push_str(&text);
        }
        source = err.source();
    }
    if detail.is_empty() {
        detail = format!("gRPC {:?}", status.code());
    }
    detail
}

/// The time left before `ttlExpireTime` (RFC 3339); `None` when absent or unreadable.
/// An expiry already past reads as zero: the store has not yet removed the key.
fn ttl_from_metadata(metadata: &HashMap<String, String>) -> Option<Duration> {
    let raw = metadata.get(TTL_EXPIRE_TIME_METADATA)?;
    match chrono::DateTime::parse_from_rfc3339(raw) {
        Ok(expires) => {
            let left = expires.with_timezone(&chrono::Utc) - chrono::Utc::now();
            Some(left.to_std().unwrap_or(Duration::ZERO))
        }
        Err(err) => {
            tracing::debug!(value = %raw, error = %err, "ignoring unreadable ttlExpireTime");
            None
        }
    }
}

/// Dapr reports a missing key as empty data with an empty ETag.
fn entry(data: Vec<u8>, etag: String, metadata: &HashMap<String, String>) -> Option<Entry> {
    if data.is_empty() && etag.is_empty() {
        return None;
    }
    Some(Entry {
        data,
        etag,
        ttl: ttl_from_metadata(metadata),
    })
}

fn state_options(concurrency: Concurrency) -> StateOptions {
    let concurrency = match concurrency {
        Concurrency::FirstWrite => state_options::StateConcurrency::ConcurrencyFirstWrite,
        Concurrency::LastWrite => state_options::StateConcurrency::ConcurrencyLastWrite,
    };
    StateOptions {
        concurrency: concurrency as i32,
        consistency: state_options::StateConsistency::ConsistencyStrong as i32,
    }
}

/// `None` and `Some("")` both mean "no ETag".
fn non_empty(etag: Option<&str>) -> Option<&str> {
    etag.filter(|e| !e.is_empty())
}

#[async_trait]
impl Store for DaprStore {
    fn backend(&self) -> &'static str {
        "dapr"
    }

    fn store_name(&self, kind: StoreKind) -> &str {
        self.name(kind)
    }

    fn locate(&self, kind: StoreKind, key: &str) -> String {
        format!(
            "key {key:?} in component {:?} (the component's keyPrefix decides the stored key)",
            self.name(kind)
        )
    }

    async fn get(&self, kind: StoreKind, key: &str) -> Result<Option<Entry>, StoreError> {
        let store = self.name(kind);
        let request = GetStateRequest {
            store_name: store.to_string(),
            key: key.to_string(),
            consistency: state_options::StateConsistency::ConsistencyStrong as i32,
            metadata: HashMap::new(),
        };
        let response = self
            .client
            .clone()
            .get_state(request)
            .await
            .map_err(|s| self.map_status(s, store, "get", key, None))?
            .into_inner();
        Ok(entry(response.data, response.etag, &response.metadata))
    }

    /// One `GetBulkState` per [`BULK_CHUNK`] keys, [`BULK_CONCURRENCY`] at a time, so no
    /// message nears the sidecar's size limit however many routes there are.
    async fn bulk_get(
        &self,
        kind: StoreKind,
        keys: &[String],
    ) -> Result<Vec<Option<Entry>>, StoreError> {
        let mut calls = Vec::with_capacity(keys.len().div_ceil(BULK_CHUNK));
        for chunk in keys.chunks(BULK_CHUNK) {
            calls.push(self.bulk_get_chunk(kind, chunk));
        }
        let chunks: Vec<Vec<Option<Entry>>> = futures::stream::iter(calls)
            .buffered(BULK_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(chunks.into_iter().flatten().collect())
    }

    async fn save(&self, kind: StoreKind, save: Save<'_>) -> Result<(), StoreError> {
        let store = self.name(kind);
        let etag = non_empty(save.etag);
        let mut metadata = HashMap::new();
        if let Some(ttl) = save.ttl_seconds {
            metadata.insert(TTL_IN_SECONDS_METADATA.to_string(), ttl.to_string());
        }
        let request = SaveStateRequest {
            store_name: store.to_string(),
            states: vec![StateItem {
                key: save.key.to_string(),
                value: save.data.to_vec(),
                etag: etag.map(|value| Etag {
                    value: value.to_string(),
                }),
                metadata,
                options: Some(state_options(save.concurrency)),
            }],
        };
        self.client
            .clone()
            .save_state(request)
            .await
            .map_err(|s| self.map_status(s, store, "save", save.key, etag))?;
        Ok(())
    }

    /// Dapr has no "update only if it exists": this is the same first-write save carrying
    /// the ETag, so a key deleted since it was read is re-created (see
    /// [`Store::update_checks_existence`]). An empty ETag would mean "no ETag" to Dapr, a
    /// blind write; it is sent as [`ABSENT_ETAG`] instead, which no stored version
    /// matches, so an existing key answers a conflict as on the other backends.
    async fn update_existing(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
    ) -> Result<(), StoreError> {
        let etag = if etag.is_empty() { ABSENT_ETAG } else { etag };
        self.save(kind, Save::cas(key, data, etag)).await
    }

    async fn delete(
        &self,
        kind: StoreKind,
        key: &str,
        etag: Option<&str>,
    ) -> Result<(), StoreError> {
        let store = self.name(kind);
        let etag = non_empty(etag);
        let concurrency = if etag.is_some() {
            Concurrency::FirstWrite
        } else {
            Concurrency::LastWrite
        };
        let request = DeleteStateRequest {
            store_name: store.to_string(),
            key: key.to_string(),
            etag: etag.map(|value| Etag {
                value: value.to_string(),
            }),
            options: Some(state_options(concurrency)),
            metadata: HashMap::new(),
        };
        self.client
            .clone()
            .delete_state(request)
            .await
            .map_err(|s| self.map_status(s, store, "delete", key, etag))?;
        Ok(())
    }

    /// Always `false`: Dapr's ETag CAS accepts any ETag for a key that does not exist, so a
    /// write cannot refuse to re-create a key deleted since it was read.
    fn update_checks_existence(&self) -> bool {
        false
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let store = &self.private_store;
        let request = GetStateRequest {
            store_name: store.clone(),
            key: PING_KEY.to_string(),
            consistency: state_options::StateConsistency::ConsistencyEventual as i32,
            metadata: HashMap::new(),
        };
        self.client
            .clone()
            .get_state(request)
            .await
            .map_err(|s| self.map_status(s, store, "ping", PING_KEY, None))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_accepted_with_or_without_scheme() {
        assert_eq!(
            endpoint_uri("127.0.0.1:50001").as_deref(),
            Ok("http://127.0.0.1:50001")
        );
        assert_eq!(
            endpoint_uri("http://localhost:50001/").as_deref(),
            Ok("http://localhost:50001")
        );
        assert!(endpoint_uri("https://localhost:50001").is_err());
        assert!(endpoint_uri("unix:///var/run/dapr.sock").is_err());
        assert!(endpoint_uri("  ").is_err());
    }

    #[test]
    fn missing_keys_read_as_none() {
        assert_eq!(entry(Vec::new(), String::new(), &HashMap::new()), None);
        let present = entry(Vec::new(), "3".into(), &HashMap::new());
        assert_eq!(present.map(|e| e.etag), Some("3".to_string()));
    }

    #[test]
    fn ttl_comes_from_ttl_expire_time() {
        let mut metadata = HashMap::new();
        assert_eq!(ttl_from_metadata(&metadata), None);
        let expires = chrono::Utc::now() + chrono::Duration::seconds(100);
        metadata.insert(
            TTL_EXPIRE_TIME_METADATA.to_string(),
            expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        let ttl = ttl_from_metadata(&metadata).unwrap_or_default();
        assert!(
            ttl > Duration::from_secs(95) && ttl <= Duration::from_secs(100),
            "{ttl:?}"
        );
        metadata.insert(
            TTL_EXPIRE_TIME_METADATA.to_string(),
            "2000-01-01T00:00:00Z".to_string(),
        );
        assert_eq!(ttl_from_metadata(&metadata), Some(Duration::ZERO));
        metadata.insert(TTL_EXPIRE_TIME_METADATA.to_string(), "soon".to_string());
        assert_eq!(ttl_from_metadata(&metadata), None);
    }

    #[tokio::test]
    async fn debug_output_never_shows_the_token() {
        let store = DaprStore::connect(
            "127.0.0.1:1",
            Some(Secret::new("s3cr3t-token")),
            "public",
            "private",
        )
        .await;
        let text = format!("{store:?}");
        assert!(!text.contains("s3cr3t-token"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
    }

    #[tokio::test]
    async fn an_unreachable_sidecar_fails_fast_naming_store_and_key() {
        // Port 1 on loopback is closed: the call must fail quickly, not hang.
        let store = DaprStore::connect(
            "http://127.0.0.1:1",
            Some(Secret::new("s3cr3t-token")),
            "pub-store",
            "priv-store",
        )
        .await
        .map_err(|e| e.to_string());
        let Ok(store) = store else {
            panic!("connect failed: {store:?}");
        };
        let started = std::time::Instant::now();
        let err = store
            .get(StoreKind::Public, "plugin_route_a")
            .await
            .expect_err("nothing listens on port 1");
        assert!(started.elapsed() < CALL_TIMEOUT + Duration::from_secs(1));
        let text = err.to_string();
        eprintln!("{text}");
        assert!(
            text.contains("pub-store") && text.contains("plugin_route_a"),
            "{text}"
        );
        assert!(text.contains("127.0.0.1:1"), "{text}");
        assert!(!text.contains("s3cr3t-token"), "{text}");
    }

    #[test]
    fn connect_outside_a_runtime_is_an_error_not_a_panic() {
        let result = futures::executor::block_on(DaprStore::connect(
            "127.0.0.1:50001",
            None,
            "public",
            "private",
        ));
        assert!(result.is_err());
    }
}
