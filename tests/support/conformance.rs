//! The store conformance suite: the behaviour every [`Store`] backend must share, written
//! once and run against each (`store_memory`, `store_redis`, `store_dapr`).
//!
//! Every case is a `pub async fn(&dyn Store, &Caps)` that panics on a violation, so a
//! backend test can run one case alone or [`run_all`] (from an `Arc<dyn Store>`, pass
//! `&*store`). Cases use their own random keys, so they run concurrently on one store
//! (and on a Redis shared with other tests).
//!
//! The rules come from Dapr's `state.redis` (see the store module docs): the save rule with
//! ETags and first-write, TTLs, deletes, bulk reads. Where a backend documents a
//! difference it says so through [`Caps`] and the case asserts the documented behaviour
//! instead; nothing is skipped silently.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::Duration;

use futures::FutureExt;
use keel_scraper::store::{Concurrency, Entry, Save, Store, StoreError, StoreKind, ABSENT_ETAG};

/// How long a TTL case waits at most for a 1 s TTL to take effect.
const EXPIRY_DEADLINE: Duration = Duration::from_millis(3500);
/// Bound on one case; a hung store fails the case instead of the whole run hanging.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a backend documents as different from the memory and Redis backends.
#[derive(Clone, Debug)]
pub struct Caps {
    /// [`Store::update_existing`] fails with `Missing` on an absent key instead of
    /// re-creating it (false on Dapr: plain ETag CAS cannot check existence).
    pub update_checks_existence: bool,
    /// [`Entry::ttl`] tells the time left; when false a TTL is invisible on a get (Dapr
    /// on `state.redis` reports none) and only expiry itself is checked.
    pub reports_ttl: bool,
    /// A non-integer ETag on delete is `InvalidEtag`; when false it is a `Conflict`
    /// (Dapr's `state.redis` compares delete ETags as strings).
    pub delete_rejects_invalid_etag: bool,
}

impl Caps {
    /// The memory and Redis backends: every check as strict as it gets.
    pub fn full() -> Self {
        Caps {
            update_checks_existence: true,
            reports_ttl: true,
            delete_rejects_invalid_etag: true,
        }
    }
}

type CaseFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
/// One conformance case.
pub type CaseFn = for<'a> fn(&'a dyn Store, &'a Caps) -> CaseFuture<'a>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        /// Every case, by name: the single list [`run_all`] runs.
        pub fn cases() -> Vec<(&'static str, CaseFn)> {
            vec![$(
                (stringify!($name), {
                    fn boxed<'a>(store: &'a dyn Store, caps: &'a Caps) -> CaseFuture<'a> {
                        Box::pin($name(store, caps))
                    }
                    boxed as CaseFn
                }),
            )*]
        }
    };
}

cases![
    reports_whether_update_checks_existence,
    missing_key_reads_none,
    save_then_get_returns_bytes_and_etag_1,
    etag_increments_on_every_write,
    cas_with_right_etag_succeeds_and_wrong_etag_conflicts,
    absent_key_accepts_a_save_with_any_etag,
    first_write_with_absent_etag_on_existing_key_conflicts,
    first_write_without_etag_on_first_write_key_fails_not_conflicts,
    last_write_without_etag_succeeds_on_key_never_written_with_first_write,
    non_integer_etag_is_invalid,
    ttl_is_reported_and_expires,
    save_without_ttl_keeps_the_ttl,
    non_positive_ttl_removes_the_ttl,
    update_existing_on_absent_key,
    update_existing_conflicts_on_mismatch,
    update_existing_writes_bumps_version_and_keeps_other_keys,
    update_existing_keeps_the_ttl,
    delete_follows_the_etag_rule,
    bulk_get_preserves_order_and_reports_missing_keys,
    public_and_private_are_separate_namespaces,
    values_are_byte_exact,
    keys_are_opaque_text,
    concurrent_cas_writers_have_exactly_one_winner,
];

/// Runs every case concurrently (each on its own keys), then fails listing every case
/// that failed. Set `CONFORMANCE_ONLY=<part of a name>` to run a subset.
pub async fn run_all(store: &dyn Store, caps: &Caps) {
    run_all_except(store, caps, &[]).await;
}

/// [`run_all`] without the cases named in `skip` (for a backend where a case's premise
/// does not apply; say why next to the list). Every name in `skip` must exist.
pub async fn run_all_except(store: &dyn Store, caps: &Caps, skip: &[&str]) {
    let all = cases();
    for name in skip {
        assert!(
            all.iter().any(|(case, _)| case == name),
            "cannot skip {name:?}: no such conformance case"
        );
    }
    let only = std::env::var("CONFORMANCE_ONLY").ok();
    let selected: Vec<(&'static str, CaseFn)> = all
        .into_iter()
        .filter(|(name, _)| !skip.contains(name))
        .filter(|(name, _)| only.as_deref().is_none_or(|o| name.contains(o)))
        .collect();
    assert!(!selected.is_empty(), "no conformance case selected");
    let runs = selected.iter().map(|&(name, case)| async move {
        let run = AssertUnwindSafe(tokio::time::timeout(CASE_TIMEOUT, case(store, caps)));
        let outcome = match run.catch_unwind().await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(format!("timed out after {CASE_TIMEOUT:?}")),
            Err(panic) => Err(panic_text(panic)),
        };
        (name, outcome)
    });
    let results = futures::future::join_all(runs).await;
    let mut failures = Vec::new();
    for (name, outcome) in &results {
        match outcome {
            Ok(()) => eprintln!("conformance [{}] {name} ... ok", store.backend()),
            Err(why) => {
                eprintln!("conformance [{}] {name} ... FAILED: {why}", store.backend());
                failures.push(*name);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} conformance cases failed on the {} backend: {failures:?}",
        failures.len(),
        results.len(),
        store.backend()
    );
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "panicked".to_owned()
    }
}

// ----- helpers -------------------------------------------------------------------------

/// A fresh key for one case, unique across runs and processes.
pub fn fresh_key(case: &str) -> String {
    format!("conformance-{case}-{:016x}", fastrand::u64(..))
}

fn first_write(key: &str, data: &[u8], etag: Option<&str>) -> SaveOwned {
    SaveOwned {
        key: key.to_owned(),
        data: data.to_vec(),
        etag: etag.map(str::to_owned),
        concurrency: Concurrency::FirstWrite,
        ttl_seconds: None,
    }
}

fn last_write(key: &str, data: &[u8], etag: Option<&str>) -> SaveOwned {
    SaveOwned {
        concurrency: Concurrency::LastWrite,
        ..first_write(key, data, etag)
    }
}

/// An owned [`Save`], so cases can build requests without juggling lifetimes.
#[derive(Clone, Debug)]
struct SaveOwned {
    key: String,
    data: Vec<u8>,
    etag: Option<String>,
    concurrency: Concurrency,
    ttl_seconds: Option<i64>,
}

impl SaveOwned {
    fn ttl(mut self, seconds: i64) -> Self {
        self.ttl_seconds = Some(seconds);
        self
    }

    fn as_save(&self) -> Save<'_> {
        Save {
            key: &self.key,
            data: &self.data,
            etag: self.etag.as_deref(),
            concurrency: self.concurrency,
            ttl_seconds: self.ttl_seconds,
        }
    }

    async fn send(&self, store: &dyn Store, kind: StoreKind) -> Result<(), StoreError> {
        store.save(kind, self.as_save()).await
    }
}

/// Saves and fails the case when the store refuses.
async fn must_save(store: &dyn Store, kind: StoreKind, save: SaveOwned) {
    if let Err(e) = save.send(store, kind).await {
        panic!("save of {:?} ({save:?}) failed: {e}", save.key);
    }
}

async fn must_get(store: &dyn Store, kind: StoreKind, key: &str) -> Entry {
    match store.get(kind, key).await {
        Ok(Some(entry)) => entry,
        Ok(None) => panic!("{key:?} reads as absent, expected a value"),
        Err(e) => panic!("get {key:?} failed: {e}"),
    }
}

async fn get(store: &dyn Store, kind: StoreKind, key: &str) -> Option<Entry> {
    store
        .get(kind, key)
        .await
        .unwrap_or_else(|e| panic!("get {key:?} failed: {e}"))
}

async fn etag_of(store: &dyn Store, kind: StoreKind, key: &str) -> String {
    must_get(store, kind, key).await.etag
}

fn assert_conflict(result: Result<(), StoreError>, what: &str) {
    match result {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("{what}: expected Conflict, got {other:?}"),
    }
}

fn assert_failed(result: Result<(), StoreError>, what: &str) {
    match result {
        Err(StoreError::Failed { .. }) => {}
        other => panic!("{what}: expected a plain store failure (Failed), got {other:?}"),
    }
}

fn assert_invalid(result: Result<(), StoreError>, etag: &str, what: &str) {
    match result {
        Err(StoreError::InvalidEtag { etag: e, .. }) if e == etag => {}
        other => panic!("{what}: expected InvalidEtag {etag:?}, got {other:?}"),
    }
}

/// Polls until `key` reads as absent; fails the case if it is still there at `deadline`.
async fn wait_until_absent(
    store: &dyn Store,
    kind: StoreKind,
    key: &str,
    since: tokio::time::Instant,
) {
    loop {
        if get(store, kind, key).await.is_none() {
            return;
        }
        if since.elapsed() > EXPIRY_DEADLINE {
            panic!("{key:?} still present {EXPIRY_DEADLINE:?} after a 1 s TTL was set");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_ttl_within(entry: &Entry, max: Duration, what: &str) {
    match entry.ttl {
        Some(left) if left > Duration::ZERO && left <= max => {}
        other => panic!("{what}: expected a TTL in (0, {max:?}], got {other:?}"),
    }
}

// ----- cases -----------------------------------------------------------------------------

/// The backend's own claim matches what the suite was told to check.
pub async fn reports_whether_update_checks_existence(store: &dyn Store, caps: &Caps) {
    assert_eq!(
        store.update_checks_existence(),
        caps.update_checks_existence,
        "Store::update_checks_existence disagrees with the capabilities under test"
    );
}

pub async fn missing_key_reads_none(store: &dyn Store, _caps: &Caps) {
    let key = fresh_key("missing");
    for kind in [StoreKind::Public, StoreKind::Private] {
        assert_eq!(get(store, kind, &key).await, None, "{kind:?}");
    }
}

pub async fn save_then_get_returns_bytes_and_etag_1(store: &dyn Store, _caps: &Caps) {
    let key = fresh_key("save-get");
    must_save(
        store,
        StoreKind::Public,
        first_write(&key, b"{\"status\":\"ACTIVE\"}", None),
    )
    .await;
    let entry = must_get(store, StoreKind::Public, &key).await;
    assert_eq!(entry.data, b"{\"status\":\"ACTIVE\"}");
    assert_eq!(entry.etag, "1");
    assert_eq!(entry.ttl, None, "a save without TTL metadata leaves no TTL");
}

pub async fn etag_increments_on_every_write(store: &dyn Store, _caps: &Caps) {
    let key = fresh_key("etag-inc");
    let kind = StoreKind::Private;
    must_save(store, kind, last_write(&key, b"a", None)).await;
    assert_eq!(etag_of(store, kind, &key).await, "1");
    must_save(store, kind, last_write(&key, b"b", None)).await;
    assert_eq!(etag_of(store, kind, &key).await, "2");
    must_save(store, kind, first_write(&key, b"c", Some("2"))).await;
    assert_eq!(etag_of(store, kind, &key).await, "3");
    store
        .update_existing(kind, &key, b"d", "3")
        .await
        .expect("update_existing with the current ETag");
    let entry = must_get(store, kind, &key).await;
    assert_eq!(
        (entry.etag.as_str(), entry.data.as_slice()),
        ("4", &b"d"[..])
    );
}

pub async fn cas_with_right_etag_succeeds_and_wrong_etag_conflicts(
    store: &dyn Store,
    _caps: &Caps,
) {
    let key = fresh_key("cas");
    let kind = StoreKind::Public;
    must_save(store, kind, first_write(&key, b"v1", Some(ABSENT_ETAG))).await;
    must_save(store, kind, first_write(&key, b"v2", Some("1"))).await;
    for wrong in ["1", "3", "99", "0"] {
        assert_conflict(
            first_write(&key, b"lost", Some(wrong))
                .send(store, kind)
                .await,
            &format!("first-write save with stale ETag {wrong:?}"),
        );
    }
    let entry = must_get(store, kind, &key).await;
    assert_eq!(
        entry.data, b"v2",
        "a refused save must not change the value"
    );
    assert_eq!(
        entry.etag, "2",
        "a refused save must not change the version"
    );
    must_save(store, kind, first_write(&key, b"v3", Some("2"))).await;
    assert_eq!(must_get(store, kind, &key).await.data, b"v3");
}

pub async fn absent_key_accepts_a_save_with_any_etag(store: &dyn Store, _caps: &Caps) {
    for (i, etag) in [ABSENT_ETAG, "5", "1", "0", "-7"].into_iter().enumerate() {
        for (concurrency, save) in [
            (
                "first-write",
                first_write as fn(&str, &[u8], Option<&str>) -> SaveOwned,
            ),
            ("last-write", last_write),
        ] {
            let key = fresh_key(&format!("absent-any-{i}"));
            save(&key, b"created", Some(etag))
                .send(store, StoreKind::Private)
                .await
                .unwrap_or_else(|e| {
                    panic!("{concurrency} save with ETag {etag:?} on an absent key: {e}")
                });
            let entry = must_get(store, StoreKind::Private, &key).await;
            assert_eq!(
                (entry.etag.as_str(), entry.data.as_slice()),
                ("1", &b"created"[..])
            );
        }
    }
}

pub async fn first_write_with_absent_etag_on_existing_key_conflicts(
    store: &dyn Store,
    _caps: &Caps,
) {
    let kind = StoreKind::Private;
    // Whether or not the existing key was written with first-write, "-1" never matches.
    let fw = fresh_key("absent-etag-fw");
    must_save(store, kind, first_write(&fw, b"held", Some(ABSENT_ETAG))).await;
    assert_conflict(
        first_write(&fw, b"steal", Some(ABSENT_ETAG))
            .send(store, kind)
            .await,
        "create-if-absent on a first-write key",
    );
    let lw = fresh_key("absent-etag-lw");
    must_save(store, kind, last_write(&lw, b"legacy", None)).await;
    assert_conflict(
        first_write(&lw, b"steal", Some(ABSENT_ETAG))
            .send(store, kind)
            .await,
        "create-if-absent on a last-write key",
    );
    assert_eq!(must_get(store, kind, &fw).await.data, b"held");
    assert_eq!(must_get(store, kind, &lw).await.data, b"legacy");
}

pub async fn first_write_without_etag_on_first_write_key_fails_not_conflicts(
    store: &dyn Store,
    _caps: &Caps,
) {
    let kind = StoreKind::Public;
    let key = fresh_key("fw-no-etag");
    must_save(store, kind, first_write(&key, b"first", None)).await;
    assert_failed(
        first_write(&key, b"second", None).send(store, kind).await,
        "first-write save without ETag on a first-write key",
    );
    assert_failed(
        first_write(&key, b"second", Some(""))
            .send(store, kind)
            .await,
        "first-write save with an empty ETag on a first-write key",
    );
    // Last-write counts the ETag as 0 as well, so the first-write flag refuses it too.
    assert_failed(
        last_write(&key, b"second", None).send(store, kind).await,
        "last-write save without ETag on a first-write key",
    );
    let entry = must_get(store, kind, &key).await;
    assert_eq!(
        (entry.etag.as_str(), entry.data.as_slice()),
        ("1", &b"first"[..])
    );
}

pub async fn last_write_without_etag_succeeds_on_key_never_written_with_first_write(
    store: &dyn Store,
    _caps: &Caps,
) {
    let kind = StoreKind::Private;
    let key = fresh_key("lw");
    for (n, data) in [b"a", b"b", b"c"].iter().enumerate() {
        must_save(store, kind, last_write(&key, *data, None)).await;
        let entry = must_get(store, kind, &key).await;
        assert_eq!(entry.etag, (n + 1).to_string());
        assert_eq!(entry.data, *data);
    }
    // Last-write ignores a stale ETag entirely (Dapr counts it as 0).
    must_save(store, kind, last_write(&key, b"d", Some("1"))).await;
    // A first-write save without ETag on a key with no first-write flag is accepted and
    // sets the flag; from then on saves without ETag are refused.
    must_save(store, kind, first_write(&key, b"e", None)).await;
    assert_eq!(etag_of(store, kind, &key).await, "5");
    assert_failed(
        last_write(&key, b"f", None).send(store, kind).await,
        "last-write save after a first-write save",
    );
}

pub async fn non_integer_etag_is_invalid(store: &dyn Store, caps: &Caps) {
    let kind = StoreKind::Public;
    let key = fresh_key("invalid-etag");
    let absent = fresh_key("invalid-etag-absent");
    must_save(store, kind, first_write(&key, b"kept", None)).await;
    for etag in ["abc", "1.5", " 1", "0x1"] {
        assert_invalid(
            first_write(&key, b"x", Some(etag)).send(store, kind).await,
            etag,
            "first-write save on an existing key",
        );
        assert_invalid(
            first_write(&absent, b"x", Some(etag))
                .send(store, kind)
                .await,
            etag,
            "first-write save on an absent key",
        );
        assert_invalid(
            store.update_existing(kind, &key, b"x", etag).await,
            etag,
            "update_existing",
        );
        let deleted = store.delete(kind, &key, Some(etag)).await;
        if caps.delete_rejects_invalid_etag {
            assert_invalid(deleted, etag, "delete");
        } else {
            assert_conflict(deleted, "delete with a non-integer ETag");
        }
    }
    let entry = must_get(store, kind, &key).await;
    assert_eq!(
        (entry.etag.as_str(), entry.data.as_slice()),
        ("1", &b"kept"[..])
    );
    assert_eq!(
        get(store, kind, &absent).await,
        None,
        "an invalid save created a key"
    );
}

pub async fn ttl_is_reported_and_expires(store: &dyn Store, caps: &Caps) {
    let kind = StoreKind::Private;
    let key = fresh_key("ttl");
    let since = tokio::time::Instant::now();
    must_save(
        store,
        kind,
        first_write(&key, b"lease", Some(ABSENT_ETAG)).ttl(1),
    )
    .await;
    let entry = must_get(store, kind, &key).await;
    if caps.reports_ttl {
        assert_ttl_within(&entry, Duration::from_secs(1), "right after a 1 s TTL");
    } else {
        assert_eq!(entry.ttl, None, "this store was said to show no TTL");
    }
    wait_until_absent(store, kind, &key, since).await;
    // An expired key is absent for writes too: create-if-absent succeeds, versions restart.
    must_save(store, kind, first_write(&key, b"again", Some(ABSENT_ETAG))).await;
    let entry = must_get(store, kind, &key).await;
    assert_eq!((entry.etag.as_str(), entry.ttl), ("1", None));
}

pub async fn save_without_ttl_keeps_the_ttl(store: &dyn Store, caps: &Caps) {
    let kind = StoreKind::Private;
    let key = fresh_key("ttl-keep");
    let since = tokio::time::Instant::now();
    must_save(
        store,
        kind,
        first_write(&key, b"a", Some(ABSENT_ETAG)).ttl(1),
    )
    .await;
    must_save(store, kind, first_write(&key, b"b", Some("1"))).await;
    let entry = must_get(store, kind, &key).await;
    assert_eq!(entry.data, b"b");
    if caps.reports_ttl {
        assert_ttl_within(&entry, Duration::from_secs(1), "after a save without TTL");
    }
    wait_until_absent(store, kind, &key, since).await;
}

pub async fn non_positive_ttl_removes_the_ttl(store: &dyn Store, caps: &Caps) {
    let kind = StoreKind::Private;
    let zero = fresh_key("ttl-zero");
    let negative = fresh_key("ttl-negative");
    for (key, ttl) in [(&zero, 0), (&negative, -1)] {
        must_save(store, kind, first_write(key, b"a", None).ttl(1)).await;
        must_save(store, kind, first_write(key, b"b", Some("1")).ttl(ttl)).await;
        if caps.reports_ttl {
            assert_eq!(
                must_get(store, kind, key).await.ttl,
                None,
                "ttl {ttl} keeps a TTL"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for key in [&zero, &negative] {
        let entry = must_get(store, kind, key).await;
        assert_eq!(
            (entry.etag.as_str(), entry.data.as_slice()),
            ("2", &b"b"[..])
        );
    }
}

pub async fn update_existing_on_absent_key(store: &dyn Store, caps: &Caps) {
    let kind = StoreKind::Public;
    let never = fresh_key("update-never");
    let deleted = fresh_key("update-deleted");
    must_save(store, kind, first_write(&deleted, b"route", None)).await;
    store.delete(kind, &deleted, None).await.expect("delete");
    if caps.update_checks_existence {
        for key in [&never, &deleted] {
            match store.update_existing(kind, key, b"resurrected", "1").await {
                Err(StoreError::Missing { key: k, .. }) => assert_eq!(&k, key),
                other => {
                    panic!("update_existing on an absent key: expected Missing, got {other:?}")
                }
            }
            assert_eq!(
                get(store, kind, key).await,
                None,
                "update_existing created {key:?}"
            );
        }
    } else {
        // Dapr's documented semantics: a key that does not exist accepts a write with any
        // ETag, so the update re-creates a deleted key; the caller must check afterwards.
        store
            .update_existing(kind, &deleted, b"resurrected", "1")
            .await
            .expect("update_existing on a deleted key (re-creates it on this backend)");
        let entry = must_get(store, kind, &deleted).await;
        assert_eq!(
            (entry.etag.as_str(), entry.data.as_slice()),
            ("1", &b"resurrected"[..])
        );
    }
}

pub async fn update_existing_conflicts_on_mismatch(store: &dyn Store, _caps: &Caps) {
    let kind = StoreKind::Public;
    let key = fresh_key("update-conflict");
    must_save(store, kind, first_write(&key, b"v1", None)).await;
    must_save(store, kind, first_write(&key, b"v2", Some("1"))).await;
    for stale in ["1", "3", ABSENT_ETAG] {
        assert_conflict(
            store.update_existing(kind, &key, b"lost", stale).await,
            &format!("update_existing with ETag {stale:?}"),
        );
    }
    let entry = must_get(store, kind, &key).await;
    assert_eq!(
        (entry.etag.as_str(), entry.data.as_slice()),
        ("2", &b"v2"[..])
    );
}

pub async fn update_existing_writes_bumps_version_and_keeps_other_keys(
    store: &dyn Store,
    _caps: &Caps,
) {
    let kind = StoreKind::Public;
    let target = fresh_key("update-target");
    let neighbour = fresh_key("update-neighbour");
    must_save(store, kind, last_write(&target, b"old", None)).await;
    must_save(store, kind, last_write(&neighbour, b"other", None)).await;
    store
        .update_existing(kind, &target, b"new", "1")
        .await
        .expect("update_existing with the current ETag");
    let entry = must_get(store, kind, &target).await;
    assert_eq!(
        (entry.etag.as_str(), entry.data.as_slice()),
        ("2", &b"new"[..])
    );
    let other = must_get(store, kind, &neighbour).await;
    assert_eq!(
        (other.etag.as_str(), other.data.as_slice()),
        ("1", &b"other"[..])
    );
    // The update is a first-write write: saves without an ETag are refused afterwards.
    assert_failed(
        last_write(&target, b"blind", None).send(store, kind).await,
        "save without ETag after update_existing",
    );
    // The private key of the same name is untouched (and absent).
    assert_eq!(get(store, StoreKind::Private, &target).await, None);
}

pub async fn update_existing_keeps_the_ttl(store: &dyn Store, caps: &Caps) {
    let kind = StoreKind::Public;
    let key = fresh_key("update-ttl");
    let since = tokio::time::Instant::now();
    must_save(store, kind, first_write(&key, b"a", None).ttl(1)).await;
    store
        .update_existing(kind, &key, b"b", "1")
        .await
        .expect("update_existing with the current ETag");
    if caps.reports_ttl {
        assert_ttl_within(
            &must_get(store, kind, &key).await,
            Duration::from_secs(1),
            "after update_existing",
        );
    }
    wait_until_absent(store, kind, &key, since).await;
}

pub async fn delete_follows_the_etag_rule(store: &dyn Store, _caps: &Caps) {
    let kind = StoreKind::Private;
    let key = fresh_key("delete");
    must_save(store, kind, first_write(&key, b"a", None)).await;
    must_save(store, kind, first_write(&key, b"b", Some("1"))).await;
    for wrong in ["1", "3", ABSENT_ETAG] {
        assert_conflict(
            store.delete(kind, &key, Some(wrong)).await,
            &format!("delete with ETag {wrong:?}"),
        );
    }
    assert_eq!(
        etag_of(store, kind, &key).await,
        "2",
        "a refused delete removed the key"
    );
    store
        .delete(kind, &key, Some("2"))
        .await
        .expect("delete with the right ETag");
    assert_eq!(get(store, kind, &key).await, None);

    let blind = fresh_key("delete-blind");
    must_save(store, kind, first_write(&blind, b"a", None)).await;
    store
        .delete(kind, &blind, None)
        .await
        .expect("delete without ETag");
    assert_eq!(get(store, kind, &blind).await, None);

    let absent = fresh_key("delete-absent");
    store
        .delete(kind, &absent, None)
        .await
        .expect("delete of an absent key");
    store
        .delete(kind, &absent, Some("7"))
        .await
        .expect("delete of an absent key with an ETag");
}

pub async fn bulk_get_preserves_order_and_reports_missing_keys(store: &dyn Store, _caps: &Caps) {
    let kind = StoreKind::Public;
    assert_eq!(
        store.bulk_get(kind, &[]).await.expect("empty bulk get"),
        vec![]
    );
    // Enough keys to span several chunks of any batching backend, every third one absent.
    let base = fresh_key("bulk");
    let keys: Vec<String> = (0..2500).map(|i| format!("{base}-{i}")).collect();
    // Index i mod 3: 0 never written, 1 last-write, 2 first-write.
    for (i, key) in keys.iter().enumerate() {
        let value = format!("value-{i}");
        match i % 3 {
            0 => {}
            1 => must_save(store, kind, last_write(key, value.as_bytes(), None)).await,
            _ => must_save(store, kind, first_write(key, value.as_bytes(), None)).await,
        }
    }
    // Write some twice, so ETags differ between keys.
    for key in keys.iter().skip(1).step_by(9) {
        must_save(store, kind, last_write(key, b"rewritten", None)).await;
    }
    let mut request = keys.clone();
    request.reverse();
    request.push(keys[1].clone()); // a repeated key reads twice
    let got = store.bulk_get(kind, &request).await.expect("bulk get");
    assert_eq!(got.len(), request.len(), "one item per requested key");
    for (key, item) in request.iter().zip(&got) {
        let i: usize = key
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("index");
        let single = get(store, kind, key).await;
        assert_eq!(item, &single, "bulk and single reads of {key:?} differ");
        match (i % 3, item) {
            (0, None) => {}
            (0, Some(_)) => panic!("{key:?} was never written but reads as present"),
            (_, None) => panic!("{key:?} missing from bulk get"),
            // Keys 1, 10, 19, ... were written twice.
            (_, Some(entry)) if i % 9 == 1 => assert_eq!(
                (entry.etag.as_str(), entry.data.as_slice()),
                ("2", &b"rewritten"[..])
            ),
            (_, Some(entry)) => {
                assert_eq!(entry.etag, "1");
                assert_eq!(entry.data, format!("value-{i}").as_bytes());
            }
        }
    }
}

pub async fn public_and_private_are_separate_namespaces(store: &dyn Store, _caps: &Caps) {
    let key = fresh_key("namespaces");
    must_save(store, StoreKind::Public, first_write(&key, b"public", None)).await;
    assert_eq!(get(store, StoreKind::Private, &key).await, None);
    must_save(
        store,
        StoreKind::Private,
        first_write(&key, b"private", Some(ABSENT_ETAG)),
    )
    .await;
    must_save(
        store,
        StoreKind::Private,
        first_write(&key, b"private2", Some("1")),
    )
    .await;
    assert_eq!(
        must_get(store, StoreKind::Public, &key).await.data,
        b"public"
    );
    let private = must_get(store, StoreKind::Private, &key).await;
    assert_eq!(
        (private.etag.as_str(), private.data.as_slice()),
        ("2", &b"private2"[..])
    );
    let both = [key.clone()];
    let public_bulk = store
        .bulk_get(StoreKind::Public, &both)
        .await
        .expect("bulk");
    assert_eq!(
        public_bulk[0].as_ref().map(|e| e.data.as_slice()),
        Some(&b"public"[..])
    );
    store
        .delete(StoreKind::Public, &key, None)
        .await
        .expect("delete");
    assert_eq!(get(store, StoreKind::Public, &key).await, None);
    assert_eq!(
        must_get(store, StoreKind::Private, &key).await.data,
        b"private2"
    );
    assert_ne!(
        store.locate(StoreKind::Public, &key),
        store.locate(StoreKind::Private, &key),
        "locate must tell the two stores apart"
    );
}

pub async fn values_are_byte_exact(store: &dyn Store, _caps: &Caps) {
    let kind = StoreKind::Public;
    let mut all_bytes: Vec<u8> = (0..=255u8).collect();
    all_bytes.extend_from_slice(b"\0\r\n\xff\xfe");
    let large: Vec<u8> = (0..1_048_576u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let values: [(&str, &[u8]); 5] = [
        ("empty", b""),
        ("non-utf8", b"\xc3\x28\xa0\xa1\xf0\x28\x8c\x28"),
        ("every-byte", &all_bytes),
        ("json-ish", b"{\"status\":\"ACTIVE\",\"x\":\"\\u0000\"}"),
        ("one-mib", &large),
    ];
    let mut keys = Vec::new();
    for (name, value) in values {
        let key = fresh_key(&format!("bytes-{name}"));
        must_save(store, kind, first_write(&key, value, Some(ABSENT_ETAG))).await;
        let entry = must_get(store, kind, &key).await;
        assert!(
            entry.data == value,
            "{name}: value changed on the way through the store"
        );
        assert_eq!(entry.etag, "1", "{name}");
        keys.push(key);
    }
    let got = store.bulk_get(kind, &keys).await.expect("bulk get");
    for ((name, value), item) in values.iter().zip(got) {
        let entry = item.unwrap_or_else(|| panic!("{name}: missing from bulk get"));
        assert!(entry.data == *value, "{name}: value changed in bulk get");
    }
    // Updates are byte exact as well, and an empty update empties the value.
    store
        .update_existing(kind, &keys[1], b"", "1")
        .await
        .expect("update to an empty value");
    assert_eq!(must_get(store, kind, &keys[1]).await.data, b"");
}

/// Keys are text the store does not interpret. (No `||` here: Dapr refuses keys that
/// contain its prefix separator, and no backend needs them.)
pub async fn keys_are_opaque_text(store: &dyn Store, _caps: &Caps) {
    let base = fresh_key("opaque");
    for (i, suffix) in ["a|b", "with space", "ünï¢ødé", "{braces}", "*?[glob]"]
        .iter()
        .enumerate()
    {
        let key = format!("{base}-{i}-{suffix}");
        for kind in [StoreKind::Public, StoreKind::Private] {
            must_save(
                store,
                kind,
                first_write(&key, suffix.as_bytes(), Some(ABSENT_ETAG)),
            )
            .await;
            assert_eq!(must_get(store, kind, &key).await.data, suffix.as_bytes());
        }
        // A glob-like key reads itself only.
        assert_eq!(
            get(store, StoreKind::Public, &format!("{base}-{i}-")).await,
            None
        );
    }
}

pub async fn concurrent_cas_writers_have_exactly_one_winner(store: &dyn Store, _caps: &Caps) {
    let kind = StoreKind::Private;
    let key = fresh_key("race");
    must_save(store, kind, first_write(&key, b"start", Some(ABSENT_ETAG))).await;
    let writers: Vec<SaveOwned> = (0..16)
        .map(|i| first_write(&key, format!("writer-{i}").as_bytes(), Some("1")))
        .collect();
    let results = futures::future::join_all(writers.iter().map(|w| w.send(store, kind))).await;
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.is_ok().then_some(i))
        .collect();
    assert_eq!(winners.len(), 1, "CAS on the same ETag: {results:?}");
    for (i, result) in results.iter().enumerate() {
        if i != winners[0] {
            assert!(
                matches!(result, Err(StoreError::Conflict { .. })),
                "losing writer {i}: expected Conflict, got {result:?}"
            );
        }
    }
    let entry = must_get(store, kind, &key).await;
    assert_eq!(entry.etag, "2");
    assert_eq!(entry.data, format!("writer-{}", winners[0]).as_bytes());

    // The same race through update_existing.
    let updates: Vec<Vec<u8>> = (0..16)
        .map(|i| format!("update-{i}").into_bytes())
        .collect();
    let results = futures::future::join_all(
        updates
            .iter()
            .map(|data| store.update_existing(kind, &key, data, "2")),
    )
    .await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(results
        .iter()
        .all(|r| r.is_ok() || matches!(r, Err(StoreError::Conflict { .. }))));
    assert_eq!(etag_of(store, kind, &key).await, "3");
}
