//! The `scrape_state` lease: which replica scrapes which tick.
//!
//! The record (JSON, private store, key `scrape_state`) holds the holder's id, the
//! newest scheduled tick scraped and, for people reading it, when the lease was taken.
//! Expiry is the store's TTL (`ttlInSeconds` = the lease), never a timestamp another
//! replica wrote. Rules:
//! - A replica takes the lock for scheduled tick T only if no other holder's lease is
//!   live and T is newer than the recorded tick; a manual tick (`once`) needs only the
//!   first, and neither checks nor advances the recorded tick.
//! - Taking it is a first-write save carrying the ETag just read (or [`ABSENT_ETAG`] when
//!   there is no record), so a lost race comes back as a conflict, not as an outage.
//! - A live record whose TTL the store shows is always respected, legacy or not: the
//!   store expires it.
//! - A live record the store shows *without* a TTL may still carry one: through Dapr on
//!   `state.redis` a get never reports a TTL. A `run` replica takes it over only after it
//!   has seen the same ETag and bytes unchanged, on its own clock, for longer than any TTL
//!   that record can carry: for this worker's own records the `lease_ms` they declare
//!   plus one interval; for anything else (the old Go scraper's bare `true`, saved with a
//!   30-minute TTL) the foreign lock TTL (`--foreign-lock-ttl`, default
//!   [`DEFAULT_FOREIGN_LOCK_TTL`]) plus one interval. A record that truly has no TTL (a
//!   crash between Dapr's save and its separate `EXPIRE`) is still recovered that way.
//! - Before writing, the holder confirms the record still carries its ETag (fencing by
//!   CAS); releasing clears the holder with a CAS and keeps the recorded tick readable for
//!   two intervals plus the lease, so a late replica still sees the tick was scraped.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::schedule::tick_id;
use crate::store::{Entry, Fence, Save, Store, StoreError, StoreKind, ABSENT_ETAG};

/// The lock's key in the private store.
pub const LOCK_KEY: &str = "scrape_state";

/// The longest TTL a lock record this worker did not write may carry: the old Go
/// scraper saved its `true` with a 30-minute TTL plus up to a minute of jitter.
pub const DEFAULT_FOREIGN_LOCK_TTL: Duration = Duration::from_secs(31 * 60);

/// Which tick a lock is taken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TickKind {
    /// A tick of the schedule, named by its slot.
    Scheduled(DateTime<Utc>),
    /// An operator's manual tick (`once`), named by the current time.
    Manual(DateTime<Utc>),
}

impl TickKind {
    pub fn time(self) -> DateTime<Utc> {
        match self {
            TickKind::Scheduled(t) | TickKind::Manual(t) => t,
        }
    }

    pub fn id(self) -> String {
        tick_id(self.time())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    holder: Option<String>,
    /// Newest scheduled tick scraped, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tick: Option<String>,
    /// For people: when the lease was taken or released, on the writer's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_ms: Option<u64>,
}

enum Parsed {
    Ours(Record),
    /// Not a record of this worker (the old scraper's `true`): held by someone unknown.
    Foreign,
}

fn parse(data: &[u8]) -> Parsed {
    match serde_json::from_slice::<Record>(data) {
        Ok(r) => Parsed::Ours(r),
        Err(_) => Parsed::Foreign,
    }
}

fn recorded_tick(r: &Record) -> Option<DateTime<Utc>> {
    r.tick
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// A held lease.
#[derive(Clone, Debug)]
pub struct Guard {
    pub kind: TickKind,
    /// The record's ETag after our save: the fence every later step checks.
    pub etag: String,
    /// When the acquiring step began (before the lock was read): deadlines count from here.
    pub started: Instant,
    /// The record bytes we wrote: with the ETag, what fences every route write.
    record: Vec<u8>,
    /// The tick recorded in the record we wrote (kept on release).
    recorded: Option<String>,
    pub takeover: bool,
}

impl Guard {
    /// The fence for writes made under this lease: they land only while the lock record
    /// is still exactly the one this holder wrote.
    pub fn fence(&self) -> Fence {
        Fence {
            key: LOCK_KEY.to_string(),
            etag: self.etag.clone(),
            data: self.record.clone(),
        }
    }
}

/// Outcome of trying to take the lock.
#[derive(Clone, Debug)]
pub enum Acquire {
    Acquired(Guard),
    /// Another holder's lease is live (`holder` is None for a foreign record).
    Held {
        holder: Option<String>,
    },
    /// The scheduled tick is not newer than the recorded one.
    AlreadyScraped {
        recorded: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the scrape_state lease was taken by another holder before this one finished")]
    Lost,
}

/// What a `run` replica remembers of a live record that has no TTL.
#[derive(Debug)]
struct Watch {
    etag: String,
    data: Vec<u8>,
    since: Instant,
}

pub struct Lease {
    store: Arc<dyn Store>,
    holder: String,
    lease: Duration,
    interval: Duration,
    /// The longest TTL a foreign record can carry (`--foreign-lock-ttl`).
    foreign_ttl: Duration,
    watch: Mutex<Option<Watch>>,
    /// The newest lease this process holds, set the moment it is taken, so a shutdown can
    /// release it even when the tick that took it was cancelled.
    held: std::sync::Mutex<Option<Guard>>,
}

impl Lease {
    pub fn new(
        store: Arc<dyn Store>,
        holder: String,
        lease: Duration,
        interval: Duration,
    ) -> Lease {
        Lease {
            store,
            holder,
            lease,
            interval,
            foreign_ttl: DEFAULT_FOREIGN_LOCK_TTL,
            watch: Mutex::new(None),
            held: std::sync::Mutex::new(None),
        }
    }

    /// The longest TTL a record this worker did not write can carry (default
    /// [`DEFAULT_FOREIGN_LOCK_TTL`]).
    pub fn with_foreign_ttl(mut self, foreign_ttl: Duration) -> Lease {
        self.foreign_ttl = foreign_ttl;
        self
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// A store TTL covering `d`: whole seconds, rounded up (so the store never expires a
    /// lease before its holder's own deadline), at least 1.
    fn ttl_seconds(d: Duration) -> i64 {
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
    }

    /// How long a live record without a visible TTL must be seen unchanged before it may
    /// be taken over: longer than any TTL it can carry, plus one interval.
    fn takeover_after(&self, record: Option<&Record>) -> Duration {
        let ttl = match record.and_then(|r| r.lease_ms) {
            Some(ms) => Duration::from_millis(ms),
            // Not ours, or ours without a declared lease: the longest foreign TTL.
            None => self.foreign_ttl,
        };
        // The store's TTL is whole seconds, rounded up from the lease.
        let ttl = Duration::from_secs(u64::try_from(Self::ttl_seconds(ttl)).unwrap_or(u64::MAX));
        ttl.saturating_add(self.interval)
    }

    /// Whether a live record without TTL has been seen unchanged for longer than `after`.
    async fn stale_without_ttl(&self, entry: &Entry, after: Duration) -> bool {
        let mut watch = self.watch.lock().await;
        match watch.as_ref() {
            Some(w) if w.etag == entry.etag && w.data == entry.data => w.since.elapsed() > after,
            _ => {
                *watch = Some(Watch {
                    etag: entry.etag.clone(),
                    data: entry.data.clone(),
                    since: Instant::now(),
                });
                false
            }
        }
    }

    /// Tries to take the lock for `kind`.
    pub async fn acquire(&self, kind: TickKind) -> Result<Acquire, StoreError> {
        let started = Instant::now();
        let current = self.store.get(StoreKind::Private, LOCK_KEY).await?;
        let mut takeover = false;
        let mut recorded: Option<String> = None;
        if let Some(entry) = &current {
            let (live_holder, record) = match parse(&entry.data) {
                Parsed::Ours(r) => {
                    let other = r.holder.as_ref().filter(|h| *h != &self.holder).cloned();
                    (other.map(Some), Some(r))
                }
                Parsed::Foreign => (Some(None), None),
            };
            if let Some(holder) = live_holder {
                let after = self.takeover_after(record.as_ref());
                let may_take_over = matches!(kind, TickKind::Scheduled(_))
                    && entry.ttl.is_none()
                    && self.stale_without_ttl(entry, after).await;
                if !may_take_over {
                    return Ok(Acquire::Held { holder });
                }
                takeover = true;
            }
            recorded = record.as_ref().and_then(|r| r.tick.clone());
            if let (TickKind::Scheduled(t), Some(r)) = (kind, &record) {
                if let Some(prev) = recorded_tick(r) {
                    if prev >= t {
                        return Ok(Acquire::AlreadyScraped {
                            recorded: r.tick.clone().unwrap_or_default(),
                        });
                    }
                }
            }
        }
        let new_recorded = match kind {
            TickKind::Scheduled(t) => Some(tick_id(t)),
            TickKind::Manual(_) => recorded,
        };
        let record = Record {
            holder: Some(self.holder.clone()),
            tick: new_recorded.clone(),
            since: Some(tick_id(Utc::now())),
            lease_ms: Some(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)),
        };
        let data = self.encode(&record)?;
        let etag = current.as_ref().map_or(ABSENT_ETAG, |e| e.etag.as_str());
        let save = Save::cas(LOCK_KEY, &data, etag).with_ttl(Self::ttl_seconds(self.lease));
        match self.store.save(StoreKind::Private, save).await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => return Ok(Acquire::Held { holder: None }),
            Err(e) => return Err(e),
        }
        *self.watch.lock().await = None;
        // Dapr's SaveState returns no ETag: read it back; this also proves we hold it.
        match self.store.get(StoreKind::Private, LOCK_KEY).await? {
            Some(e) if e.data == data => {
                let guard = Guard {
                    kind,
                    etag: e.etag,
                    started,
                    record: e.data,
                    recorded: new_recorded,
                    takeover,
                };
                self.set_held(Some(guard.clone()));
                Ok(Acquire::Acquired(guard))
            }
            other => Ok(Acquire::Held {
                holder: other.and_then(|e| match parse(&e.data) {
                    Parsed::Ours(r) => r.holder,
                    Parsed::Foreign => None,
                }),
            }),
        }
    }

    fn set_held(&self, guard: Option<Guard>) {
        // A poisoned lock only means another thread panicked while holding it; the
        // Option inside is still a valid value to replace.
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        *held = guard;
    }

    /// The record's bytes. Strings and integers always serialize; if that ever failed,
    /// the lock is not written rather than written empty.
    fn encode(&self, record: &Record) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(record).map_err(|e| StoreError::Failed {
            store: self.store.store_name(StoreKind::Private).to_string(),
            operation: "encode",
            key: LOCK_KEY.to_string(),
            message: e.to_string(),
        })
    }

    /// Forgets the held lease (it was found lost).
    pub fn forget(&self) {
        self.set_held(None);
    }

    /// The newest lease this process took and has not released or lost.
    pub fn held(&self) -> Option<Guard> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Confirms the record still carries our ETag (nobody took the lease since).
    pub async fn confirm(&self, guard: &Guard) -> Result<(), LeaseError> {
        let ours = match self.store.get(StoreKind::Private, LOCK_KEY).await? {
            Some(e) if e.etag == guard.etag => matches!(
                parse(&e.data),
                Parsed::Ours(r) if r.holder.as_deref() == Some(&self.holder)
            ),
            _ => false,
        };
        if ours {
            Ok(())
        } else {
            self.set_held(None);
            Err(LeaseError::Lost)
        }
    }

    /// Releases the lease: clears the holder, keeps the recorded tick readable.
    pub async fn release(&self, guard: &Guard) -> Result<(), LeaseError> {
        let record = Record {
            holder: None,
            tick: guard.recorded.clone(),
            since: Some(tick_id(Utc::now())),
            lease_ms: None,
        };
        let data = self.encode(&record)?;
        let keep = self.interval * 2 + self.lease;
        let save = Save::cas(LOCK_KEY, &data, &guard.etag).with_ttl(Self::ttl_seconds(keep));
        let result = self.store.save(StoreKind::Private, save).await;
        if !matches!(result, Err(StoreError::Failed { .. })) {
            // Released, or found taken: either way this process no longer holds it.
            self.set_held(None);
        }
        match result {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict { .. }) => Err(LeaseError::Lost),
            Err(e) => Err(e.into()),
        }
    }
}
