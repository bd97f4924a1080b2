//! The embedded `memory` backend: the store conformance suite, plus what only it offers
//! (listing keys for `demo`, following the tokio clock for TTLs).

mod support;

use std::time::Duration;

use keel_scraper::store::memory::MemoryStore;
use keel_scraper::store::{Save, Store, StoreError, StoreKind, ABSENT_ETAG};
use support::conformance::{self, Caps};

fn store() -> MemoryStore {
    MemoryStore::new("keel-public-store", "keel-private-store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_conformance_suite() {
    let store = store();
    conformance::run_all(&store, &Caps::full()).await;
}

#[tokio::test]
async fn names_and_locations_say_which_store() {
    let store = store();
    assert_eq!(store.backend(), "memory");
    assert_eq!(store.store_name(StoreKind::Public), "keel-public-store");
    assert_eq!(store.store_name(StoreKind::Private), "keel-private-store");
    let located = store.locate(StoreKind::Private, "all_registered_plugin");
    assert!(located.contains("all_registered_plugin"), "{located}");
    assert!(located.contains("keel-private-store"), "{located}");
    assert!(store.update_checks_existence());
    store.ping().await.expect("ping");
}

#[tokio::test]
async fn keys_and_dump_list_live_keys_sorted_per_store() {
    let store = store();
    for key in ["plugin_route_b", "plugin_route_a"] {
        store
            .save(StoreKind::Public, Save::cas(key, b"{}", ABSENT_ETAG))
            .await
            .expect("save");
    }
    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", b"x", ABSENT_ETAG),
        )
        .await
        .expect("save");
    assert_eq!(
        store.keys(StoreKind::Public),
        vec!["plugin_route_a".to_owned(), "plugin_route_b".to_owned()]
    );
    assert_eq!(
        store.keys(StoreKind::Private),
        vec!["scrape_state".to_owned()]
    );
    let dump = store.dump(StoreKind::Public);
    assert_eq!(dump.len(), 2);
    assert_eq!(dump[0].0, "plugin_route_a");
    assert_eq!(
        (dump[0].1.etag.as_str(), dump[0].1.data.as_slice()),
        ("1", &b"{}"[..])
    );
    store
        .delete(StoreKind::Public, "plugin_route_a", Some("1"))
        .await
        .expect("delete");
    assert_eq!(
        store.keys(StoreKind::Public),
        vec!["plugin_route_b".to_owned()]
    );
}

/// Expired keys vanish from reads, writes and listings alike.
#[tokio::test]
async fn expired_keys_are_absent_everywhere() {
    let store = store();
    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", b"holder", ABSENT_ETAG).with_ttl(1),
        )
        .await
        .expect("save with TTL");
    let entry = store
        .get(StoreKind::Private, "scrape_state")
        .await
        .expect("get")
        .expect("present before its TTL ran out");
    assert!(entry.ttl.is_some_and(|t| t <= Duration::from_secs(1)));
    assert_eq!(
        store.keys(StoreKind::Private),
        vec!["scrape_state".to_owned()]
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        store.get(StoreKind::Private, "scrape_state").await,
        Ok(None)
    );
    assert!(store.keys(StoreKind::Private).is_empty());
    assert!(store.dump(StoreKind::Private).is_empty());
    // Expired means absent for writes: update_existing says Missing, not Conflict.
    assert!(matches!(
        store
            .update_existing(StoreKind::Private, "scrape_state", b"x", "1")
            .await,
        Err(StoreError::Missing { .. })
    ));
}

/// Many writes after many expiries (the periodic sweep runs): expired keys are gone and
/// every live one is kept.
#[tokio::test]
async fn sweeping_expired_keys_keeps_live_ones() {
    let store = store();
    for i in 0..5000 {
        let key = format!("k{i}");
        let save = Save::cas(&key, b"v", ABSENT_ETAG);
        let save = if i % 2 == 0 { save.with_ttl(1) } else { save };
        store.save(StoreKind::Public, save).await.expect("save");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Enough writes to trigger a sweep.
    for i in 0..5000 {
        let key = format!("fresh{i}");
        store
            .save(StoreKind::Public, Save::cas(&key, b"v", ABSENT_ETAG))
            .await
            .expect("save");
    }
    let keys = store.keys(StoreKind::Public);
    assert_eq!(keys.len(), 2500 + 5000);
    assert!(keys
        .iter()
        .all(|k| k.starts_with("fresh") || k[1..].parse::<u32>().is_ok_and(|n| n % 2 == 1)));
    let odd = store
        .get(StoreKind::Public, "k1")
        .await
        .expect("get")
        .expect("a key without TTL survives");
    assert_eq!(odd.etag, "1");
}
