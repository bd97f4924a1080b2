//! Route writes are fenced by the lease: on Redis and in memory the write lands only while
//! the lock record is still exactly the holder's (ETag and bytes), checked atomically.

mod support;

use std::sync::Arc;

use keel_scraper::store::memory::MemoryStore;
use keel_scraper::store::redis::RedisStore;
use keel_scraper::store::{Fence, Save, Store, StoreError, StoreKind, ABSENT_ETAG};
use support::redis_server::RedisServer;

async fn fenced_writes_follow_the_lock_record(store: Arc<dyn Store>) {
    assert!(store.fences_writes());
    let lock = br#"{"holder":"a"}"#;
    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", lock, ABSENT_ETAG),
        )
        .await
        .unwrap();
    store
        .save(
            StoreKind::Public,
            Save::cas("plugin_route_x", b"{\"status\":\"ACTIVE\"}", ABSENT_ETAG),
        )
        .await
        .unwrap();
    let fence = Fence {
        key: "scrape_state".into(),
        etag: "1".into(),
        data: lock.to_vec(),
    };

    // The lease holds: the write lands.
    store
        .update_fenced(
            StoreKind::Public,
            "plugin_route_x",
            b"{\"status\":\"FAILED\"}",
            "1",
            &fence,
        )
        .await
        .expect("fenced write under a held lease");

    // The lease expired and someone else's record took its place at the same version:
    // the bytes differ, the write is refused and the route is left as it was.
    store
        .delete(StoreKind::Private, "scrape_state", None)
        .await
        .unwrap();
    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", br#"{"holder":"b"}"#, ABSENT_ETAG),
        )
        .await
        .unwrap();
    let err = store
        .update_fenced(
            StoreKind::Public,
            "plugin_route_x",
            b"{\"status\":\"ACTIVE\"}",
            "2",
            &fence,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");

    // No lock record at all: refused too.
    store
        .delete(StoreKind::Private, "scrape_state", None)
        .await
        .unwrap();
    let err = store
        .update_fenced(
            StoreKind::Public,
            "plugin_route_x",
            b"{\"status\":\"ACTIVE\"}",
            "2",
            &fence,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");

    let route = store
        .get(StoreKind::Public, "plugin_route_x")
        .await
        .unwrap()
        .expect("route still there");
    assert_eq!(route.data, b"{\"status\":\"FAILED\"}");
    assert_eq!(route.etag, "2", "refused writes changed nothing");
}

#[tokio::test]
async fn memory_store_fences_route_writes() {
    fenced_writes_follow_the_lock_record(Arc::new(MemoryStore::new("pub", "priv"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_fences_route_writes() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), "pub", "priv", "plugins")
        .await
        .expect("connect");
    fenced_writes_follow_the_lock_record(Arc::new(store)).await;
}
