//! The state store: one trait, three backends.
//!
//! Every backend follows Dapr's state semantics exactly (see `dapr.md` in the design
//! references): values are opaque bytes with a string ETag; a missing key reads as `None`;
//! a save succeeds iff the key is absent, or the ETag matches the stored version, or the
//! request has no ETag (or an empty one) and the key was never written with first-write
//! concurrency. A refused save *with* an ETag is [`StoreError::Conflict`]; a refused
//! first-write save *without* one is a plain [`StoreError::Failed`] store error,
//! exactly as Dapr reports it. A key that does not exist accepts a save with any ETag.
//!
//! Because plain CAS cannot say "update only if it still exists", the trait has a second
//! write, [`Store::update_existing`], used for routes: it fails with
//! [`StoreError::Missing`] when the key is gone. Backends that can check existence
//! atomically (memory, Redis) do; the Dapr backend cannot, says so through
//! [`Store::update_checks_existence`], and the tick undoes a resurrected route itself.

use std::time::Duration;

use async_trait::async_trait;

pub mod dapr;
pub mod memory;
pub mod redis;

/// Which of the two logical stores a key lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// Shared with Keel: `plugin_route_<id>`, keys stored bare (`keyPrefix: none`).
    Public,
    /// The Plugins plugin's own data: `all_registered_plugin`, `scrape_state`,
    /// `scrape_counters`, stored under the Plugins app id prefix.
    Private,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Public => "public",
            StoreKind::Private => "private",
        }
    }
}

/// One stored value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value bytes exactly as written.
    pub data: Vec<u8>,
    /// The version, as Dapr reports it (Redis: the decimal `version` field).
    pub etag: String,
    /// Time left before the store expires the key; `None` when the key has no TTL.
    pub ttl: Option<Duration>,
}

/// Dapr's concurrency option for a save.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrency {
    FirstWrite,
    LastWrite,
}

/// A save request, with Dapr's options.
#[derive(Clone, Copy, Debug)]
pub struct Save<'a> {
    pub key: &'a str,
    pub data: &'a [u8],
    /// `None` and `Some("")` both mean "no ETag" (Dapr treats them alike).
    pub etag: Option<&'a str>,
    pub concurrency: Concurrency,
    /// `ttlInSeconds` metadata: `None` leaves any existing TTL as it is, `Some(n)` with
    /// n > 0 sets it, `Some(n)` with n <= 0 removes it (Dapr's `EXPIRE` / `PERSIST`).
    pub ttl_seconds: Option<i64>,
}

impl<'a> Save<'a> {
    /// A first-write save carrying `etag`, without TTL metadata: the worker's usual write.
    pub fn cas(key: &'a str, data: &'a [u8], etag: &'a str) -> Self {
        Save {
            key,
            data,
            etag: Some(etag),
            concurrency: Concurrency::FirstWrite,
            ttl_seconds: None,
        }
    }

    pub fn with_ttl(mut self, seconds: i64) -> Self {
        self.ttl_seconds = Some(seconds);
        self
    }
}

/// An ETag no stored version can carry: a first-write save with it succeeds only when
/// the key is absent, and is refused as a conflict (not as an outage) when it exists.
pub const ABSENT_ETAG: &str = "-1";

/// The lease a route write depends on: the write lands only while the private-store
/// record `key` still holds exactly `etag` and `data` (the holder's own lock record).
/// Checking the bytes too matters: a record that expired and was re-created restarts at
/// version 1, so a version alone could match someone else's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub etag: String,
    pub data: Vec<u8>,
}

/// Store failures, each naming the store and key involved. Never carries a secret.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("ETag mismatch writing {key:?} in store {store:?}: it changed since it was read")]
    Conflict { store: String, key: String },
    #[error("{key:?} in store {store:?} no longer exists")]
    Missing { store: String, key: String },
    #[error(
        "write of {key:?} in store {store:?} refused: the lease it depended on is no longer held"
    )]
    Fenced { store: String, key: String },
    #[error("invalid ETag {etag:?} for {key:?} in store {store:?}: ETags are integers")]
    InvalidEtag {
        store: String,
        key: String,
        etag: String,
    },
    /// The key holds something that is not a state value (e.g. not a Dapr state hash):
    /// a fault of that one key, not of the store.
    #[error("{key:?} in store {store:?} is not a readable state value: {message}")]
    Unreadable {
        store: String,
        key: String,
        message: String,
    },
    #[error("store {store:?} failed to {operation} {key:?}: {message}")]
    Failed {
        store: String,
        operation: &'static str,
        key: String,
        message: String,
    },
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

/// The store every backend implements. Object safe: the worker holds an `Arc<dyn Store>`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `memory`, `redis` or `dapr`.
    fn backend(&self) -> &'static str;

    /// The configured name of the logical store (a Dapr component name).
    fn store_name(&self, kind: StoreKind) -> &str;

    /// Where `key` physically lives, for operators: the full Redis key on `redis`, the
    /// component and the note that its `keyPrefix` decides on `dapr`.
    fn locate(&self, kind: StoreKind, key: &str) -> String;

    async fn get(&self, kind: StoreKind, key: &str) -> Result<Option<Entry>, StoreError>;

    /// Reads many keys in one round trip where the backend can; the result has one item
    /// per key, in order. A key holding something that is not a state value fails the
    /// call with [`StoreError::Unreadable`] naming it; see [`read_each`].
    async fn bulk_get(
        &self,
        kind: StoreKind,
        keys: &[String],
    ) -> Result<Vec<Option<Entry>>, StoreError>;

    /// A save with Dapr's exact semantics (see the module docs).
    async fn save(&self, kind: StoreKind, save: Save<'_>) -> Result<(), StoreError>;

    /// Rewrites an existing key if its version is still `etag` (first-write, no TTL
    /// change). `Missing` when the key is gone, `Conflict` when it changed. On backends
    /// where [`Store::update_checks_existence`] is false, a key deleted since it was read
    /// may be re-created (Dapr's own semantics); the caller must check afterwards.
    async fn update_existing(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
    ) -> Result<(), StoreError>;

    /// [`Store::update_existing`] that lands only while `fence` holds. Where
    /// [`Store::fences_writes`] is true the check and the write are one atomic step, so a
    /// holder paused past its lease cannot land a write after another replica took over.
    /// Elsewhere (Dapr: no multi-key atomic write) the default runs the plain update and
    /// the caller's lease confirmation before the write phase is the only fence.
    async fn update_fenced(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        let _ = fence;
        self.update_existing(kind, key, data, etag).await
    }

    /// [`Store::save`] that lands only while `fence` holds: for the worker's own keys
    /// (e.g. `scrape_observations`) that a holder may have to create, which
    /// [`Store::update_fenced`] cannot. Where [`Store::fences_writes`] is true the fence
    /// check and the save are one atomic step; elsewhere (Dapr) the default runs the plain
    /// save, and the caller's lease confirmation before the write phase is the only fence.
    async fn save_fenced(
        &self,
        kind: StoreKind,
        save: Save<'_>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        let _ = fence;
        self.save(kind, save).await
    }

    /// Whether [`Store::update_fenced`] and [`Store::save_fenced`] check the fence
    /// atomically with the write.
    fn fences_writes(&self) -> bool {
        false
    }

    /// Deletes `key` if absent, if `etag` matches, or unconditionally when `etag` is None.
    async fn delete(
        &self,
        kind: StoreKind,
        key: &str,
        etag: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Whether [`Store::update_existing`] refuses to re-create a deleted key atomically.
    fn update_checks_existence(&self) -> bool;

    /// A cheap round trip proving the store (or sidecar) answers; for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Reads `keys` with one bulk read, and when one key's value is unreadable, again one key
/// at a time, so a single odd key costs only itself. Each item is that key's own result.
/// Fails as a whole only when the store itself fails (every key failing counts as that).
pub async fn read_each(
    store: &dyn Store,
    kind: StoreKind,
    keys: &[String],
    concurrency: usize,
) -> Result<Vec<Result<Option<Entry>, StoreError>>, StoreError> {
    use futures::stream::{self, StreamExt};
    match store.bulk_get(kind, keys).await {
        Ok(entries) => return Ok(entries.into_iter().map(Ok).collect()),
        Err(StoreError::Unreadable { .. }) => {}
        Err(e) => return Err(e),
    }
    // Indices, not borrowed keys, keep the future spawnable (no higher-ranked closure).
    let items: Vec<Result<Option<Entry>, StoreError>> = stream::iter(0..keys.len())
        .map(|i| async move {
            match keys.get(i) {
                Some(key) => store.get(kind, key).await,
                None => Ok(None),
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    let any_ok = items.iter().any(Result::is_ok);
    if !any_ok {
        if let Some(Err(e)) = items
            .iter()
            .find(|r| !matches!(r, Err(StoreError::Unreadable { .. })))
        {
            return Err(e.clone());
        }
    }
    Ok(items)
}
