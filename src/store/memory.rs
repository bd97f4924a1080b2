//! The embedded, in-process backend: Dapr's `state.redis` semantics without Redis.
//!
//! Used by `demo`, by tests and by anyone who wants to run the worker without external
//! services. It keeps exactly the state `state.redis` keeps per key (the value bytes, an
//! integer `version` and whether any write used first-write concurrency) plus an optional
//! expiry instant, and applies the same write rule (see the [`super`] module docs):
//!
//! * a save succeeds iff the key is absent, or the request's ETag equals the version, or
//!   the ETag counts as `0` (none, empty, or last-write concurrency) and the key was never
//!   written with first-write;
//! * a refused save carrying an ETag is [`StoreError::Conflict`]; a refused save without
//!   one is a plain [`StoreError::Failed`], as Dapr reports it;
//! * every successful write increments the version, so ETags are `"1"`, `"2"`, ...
//!
//! Expired keys read and write as absent: expiry is checked against the clock on every
//! access, and expired entries are dropped lazily (on access and by an occasional sweep),
//! so nothing depends on a background task.
//!
//! [`Store::update_existing`] checks existence and version under one lock, so it never
//! re-creates a deleted key ([`Store::update_checks_existence`] is true).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Concurrency, Entry, Fence, Save, Store, StoreError, StoreKind};

/// Writes between two sweeps of expired entries. A sweep is O(keys), so amortised over
/// this many writes it stays a small constant per write while bounding how long an
/// expired key nobody reads can occupy memory.
const SWEEP_EVERY_WRITES: u32 = 4096;

/// One stored key: the same fields `state.redis` keeps in its hash, plus the expiry.
#[derive(Debug)]
struct Item {
    data: Vec<u8>,
    /// Starts at 1 with the first write; the ETag is its decimal string.
    version: i64,
    /// Set once any write to the key used first-write concurrency (never cleared while
    /// the key lives, as Dapr's `first-write` hash field).
    first_write: bool,
    expires_at: Option<Instant>,
}

impl Item {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }

    fn entry(&self, now: Instant) -> Entry {
        Entry {
            data: self.data.clone(),
            etag: self.version.to_string(),
            ttl: self.expires_at.map(|at| at.saturating_duration_since(now)),
        }
    }
}

/// The keys of one logical store.
#[derive(Debug, Default)]
struct Space {
    items: HashMap<String, Item>,
    writes_since_sweep: u32,
}

impl Space {
    /// The live item under `key`; an expired one is removed and reads as absent.
    fn live(&mut self, key: &str, now: Instant) -> Option<&mut Item> {
        let expired = match self.items.get(key) {
            None => return None,
            Some(item) => !item.is_live(now),
        };
        if expired {
            self.items.remove(key);
            return None;
        }
        self.items.get_mut(key)
    }

    fn note_write(&mut self, now: Instant) {
        self.writes_since_sweep += 1;
        if self.writes_since_sweep >= SWEEP_EVERY_WRITES {
            self.writes_since_sweep = 0;
            self.items.retain(|_, item| item.is_live(now));
        }
    }
}

/// The embedded store. Cheap to share behind an `Arc`; every operation takes one short
/// lock on the logical store it touches.
#[derive(Debug)]
pub struct MemoryStore {
    public_name: String,
    private_name: String,
    public: Mutex<Space>,
    private: Mutex<Space>,
}

/// How a request's ETag takes part in the write rule.
enum Etag {
    /// No ETag, an empty one, or last-write concurrency: Dapr's `0`.
    None,
    /// An integer ETag the stored version must equal.
    Version(i64),
}

/// Parses an ETag the way Dapr does: empty means none, anything else must be an integer.
fn parse_etag(etag: Option<&str>) -> Result<Etag, String> {
    match etag {
        None | Some("") => Ok(Etag::None),
        Some(text) => text
            .parse::<i64>()
            .map(Etag::Version)
            .map_err(|_| text.to_owned()),
    }
}

/// Whether the lock record `fence` depends on is still exactly the holder's own.
fn fence_holds(private: &mut Space, fence: &Fence, now: Instant) -> bool {
    private
        .live(&fence.key, now)
        .is_some_and(|item| item.version.to_string() == fence.etag && item.data == fence.data)
}

impl MemoryStore {
    pub fn new(public_name: &str, private_name: &str) -> Self {
        MemoryStore {
            public_name: public_name.to_owned(),
            private_name: private_name.to_owned(),
            public: Mutex::new(Space::default()),
            private: Mutex::new(Space::default()),
        }
    }

    /// The live keys of one logical store, sorted, for `demo` output and tests.
    pub fn keys(&self, kind: StoreKind) -> Vec<String> {
        let now = Instant::now();
        let mut space = self.space(kind);
        space.items.retain(|_, item| item.is_live(now));
        let mut keys: Vec<String> = space.items.keys().cloned().collect();
        keys.sort_unstable();
        keys
    }

    /// Every live entry of one logical store, sorted by key.
    pub fn dump(&self, kind: StoreKind) -> Vec<(String, Entry)> {
        let now = Instant::now();
        let space = self.space(kind);
        let mut all: Vec<(String, Entry)> = space
            .items
            .iter()
            .filter(|(_, item)| item.is_live(now))
            .map(|(key, item)| (key.clone(), item.entry(now)))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn space(&self, kind: StoreKind) -> MutexGuard<'_, Space> {
        let lock = match kind {
            StoreKind::Public => &self.public,
            StoreKind::Private => &self.private,
        };
        // A poisoned lock only means another thread panicked while holding it. Every
        // mutation below completes without panicking points between reading and writing
        // an item, so the map is consistent and can keep serving.
        lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn name(&self, kind: StoreKind) -> &str {
        match kind {
            StoreKind::Public => &self.public_name,
            StoreKind::Private => &self.private_name,
        }
    }

    /// Rewrites a live `key` at version `wanted` in an already locked space.
    fn update_in(
        &self,
        space: &mut Space,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        wanted: Option<i64>,
        now: Instant,
    ) -> Result<(), StoreError> {
        let Some(item) = space.live(key, now) else {
            return Err(StoreError::Missing {
                store: self.name(kind).to_owned(),
                key: key.to_owned(),
            });
        };
        if wanted != Some(item.version) {
            return Err(self.conflict(kind, key));
        }
        let next = self.next_version(kind, "update", key, item.version)?;
        item.data.clear();
        item.data.extend_from_slice(data);
        item.version = next;
        item.first_write = true;
        space.note_write(now);
        Ok(())
    }

    /// Dapr's save rule (see [`Store::save`]) in an already locked space.
    fn save_in(
        &self,
        space: &mut Space,
        kind: StoreKind,
        save: Save<'_>,
        now: Instant,
    ) -> Result<(), StoreError> {
        // Dapr ignores the ETag entirely under last-write concurrency (it counts as 0, even
        // when it is not an integer), but still reports a refusal as a mismatch when one
        // was sent.
        let has_etag = save.etag.is_some_and(|e| !e.is_empty());
        let etag = match save.concurrency {
            Concurrency::LastWrite => Etag::None,
            Concurrency::FirstWrite => {
                parse_etag(save.etag).map_err(|e| self.invalid(kind, save.key, e))?
            }
        };
        let first_write = save.concurrency == Concurrency::FirstWrite;
        let expires_at = |current: Option<Instant>| match save.ttl_seconds {
            None => current,
            // A TTL too far out for the clock to represent never runs out: no expiry.
            Some(secs) if secs > 0 => now.checked_add(Duration::from_secs(secs.unsigned_abs())),
            Some(_) => None,
        };
        match space.live(save.key, now) {
            None => {
                space.items.insert(
                    save.key.to_owned(),
                    Item {
                        data: save.data.to_vec(),
                        version: 1,
                        first_write,
                        expires_at: expires_at(None),
                    },
                );
            }
            Some(item) => {
                let accepted = match etag {
                    Etag::Version(v) if v == item.version => true,
                    // An explicit "0" is Dapr's "no ETag" too.
                    Etag::Version(0) | Etag::None => !item.first_write,
                    Etag::Version(_) => false,
                };
                if !accepted {
                    if has_etag {
                        return Err(self.conflict(kind, save.key));
                    }
                    return Err(StoreError::Failed {
                        store: self.name(kind).to_owned(),
                        operation: "save",
                        key: save.key.to_owned(),
                        message: "the key exists and was written with first-write \
                                  concurrency; a save without an ETag cannot replace it"
                            .to_owned(),
                    });
                }
                let next = self.next_version(kind, "save", save.key, item.version)?;
                item.data.clear();
                item.data.extend_from_slice(save.data);
                item.version = next;
                item.first_write |= first_write;
                item.expires_at = expires_at(item.expires_at);
            }
        }
        space.note_write(now);
        Ok(())
    }

    fn conflict(&self, kind: StoreKind, key: &str) -> StoreError {
        StoreError::Conflict {
            store: self.name(kind).to_owned(),
            key: key.to_owned(),
        }
    }

    /// The version after `current`; refuses the write when it would overflow, as Redis
    /// refuses `HINCRBY` past `i64::MAX`.
    fn next_version(
        &self,
        kind: StoreKind,
        operation: &'static str,
        key: &str,
        current: i64,
    ) -> Result<i64, StoreError> {
        current.checked_add(1).ok_or_else(|| StoreError::Failed {
            store: self.name(kind).to_owned(),
            operation,
            key: key.to_owned(),
            message: "the version would overflow".to_owned(),
        })
    }

    fn invalid(&self, kind: StoreKind, key: &str, etag: String) -> StoreError {
        StoreError::InvalidEtag {
            store: self.name(kind).to_owned(),
            key: key.to_owned(),
            etag,
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn store_name(&self, kind: StoreKind) -> &str {
        self.name(kind)
    }

    fn locate(&self, kind: StoreKind, key: &str) -> String {
        format!("key {key:?} of the in-process store {:?}", self.name(kind))
    }

    async fn get(&self, kind: StoreKind, key: &str) -> Result<Option<Entry>, StoreError> {
        let now = Instant::now();
        let mut space = self.space(kind);
        Ok(space.live(key, now).map(|item| item.entry(now)))
    }

    async fn bulk_get(
        &self,
        kind: StoreKind,
        keys: &[String],
    ) -> Result<Vec<Option<Entry>>, StoreError> {
        let now = Instant::now();
        let space = self.space(kind);
        // Read-only pass: expired entries read as absent and are left to the sweep, so a
        // large bulk read never mutates the map.
        Ok(keys
            .iter()
            .map(|key| {
                space
                    .items
                    .get(key.as_str())
                    .filter(|item| item.is_live(now))
                    .map(|item| item.entry(now))
            })
            .collect())
    }

    async fn save(&self, kind: StoreKind, save: Save<'_>) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut space = self.space(kind);
        self.save_in(&mut space, kind, save, now)
    }

    async fn save_fenced(
        &self,
        kind: StoreKind,
        save: Save<'_>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        // As in `update_fenced`: the private space stays locked through the write.
        let mut private = self.space(StoreKind::Private);
        if !fence_holds(&mut private, fence, now) {
            return Err(StoreError::Fenced {
                store: self.name(kind).to_owned(),
                key: save.key.to_owned(),
            });
        }
        match kind {
            StoreKind::Private => self.save_in(&mut private, kind, save, now),
            StoreKind::Public => {
                let mut public = self.space(StoreKind::Public);
                self.save_in(&mut public, kind, save, now)
            }
        }
    }

    async fn update_existing(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
    ) -> Result<(), StoreError> {
        // An empty ETag is a version no key can have: the update is refused as a conflict.
        let wanted = match parse_etag(Some(etag)).map_err(|e| self.invalid(kind, key, e))? {
            Etag::Version(v) => Some(v),
            Etag::None => None,
        };
        let now = Instant::now();
        let mut space = self.space(kind);
        self.update_in(&mut space, kind, key, data, wanted, now)
    }

    async fn update_fenced(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        let wanted = match parse_etag(Some(etag)).map_err(|e| self.invalid(kind, key, e))? {
            Etag::Version(v) => Some(v),
            Etag::None => None,
        };
        let now = Instant::now();
        // The private space stays locked through the write, so the fence check and the
        // write are one step (always private before public: no lock-order inversion).
        let mut private = self.space(StoreKind::Private);
        if !fence_holds(&mut private, fence, now) {
            return Err(StoreError::Fenced {
                store: self.name(kind).to_owned(),
                key: key.to_owned(),
            });
        }
        match kind {
            StoreKind::Private => self.update_in(&mut private, kind, key, data, wanted, now),
            StoreKind::Public => {
                let mut public = self.space(StoreKind::Public);
                self.update_in(&mut public, kind, key, data, wanted, now)
            }
        }
    }

    fn fences_writes(&self) -> bool {
        true
    }

    async fn delete(
        &self,
        kind: StoreKind,
        key: &str,
        etag: Option<&str>,
    ) -> Result<(), StoreError> {
        let etag = parse_etag(etag).map_err(|e| self.invalid(kind, key, e))?;
        let now = Instant::now();
        let mut space = self.space(kind);
        let Some(item) = space.live(key, now) else {
            return Ok(());
        };
        match etag {
            // Dapr deletes unconditionally without an ETag, and with an explicit "0".
            Etag::None | Etag::Version(0) => {}
            Etag::Version(v) if v == item.version => {}
            Etag::Version(_) => return Err(self.conflict(kind, key)),
        }
        space.items.remove(key);
        Ok(())
    }

    fn update_checks_existence(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
