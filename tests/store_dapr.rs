//! The `dapr` backend, against the sidecar double (a real Redis underneath): the store
//! conformance suite, byte-identical Redis contents with the `redis` backend, the API
//! token on the gRPC surface, the private component's key prefix, and clear errors.
//!
//! Where Dapr's documented semantics differ from the memory and Redis backends, the
//! conformance suite is told so through [`Caps`] (see [`dapr_caps`]), and the one case
//! whose premise Dapr rejects outright is replaced by a Dapr-specific test
//! ([`keys_containing_the_dapr_separator_are_refused_and_other_keys_are_opaque`]).

mod support;

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;
use keel_scraper::secret::Secret;
use keel_scraper::store::dapr::DaprStore;
use keel_scraper::store::redis::RedisStore;
use keel_scraper::store::{Concurrency, Save, Store, StoreError, StoreKind, ABSENT_ETAG};
use keel_test_support::process::bounded;
use support::conformance::{self, Caps};
use support::sidecar::{SidecarConfig, SidecarDouble};

/// Every test finishes within this, or fails.
const TEST_BOUND: Duration = Duration::from_secs(120);

/// Bound on one conformance case.
const CASE_BOUND: Duration = Duration::from_secs(60);

/// What real daprd on `state.redis` does differently (the same flags as
/// `real_caps` in tests/daprd_store.rs, which runs this suite over real daprd):
/// - `update_checks_existence: false`: ETag CAS accepts any ETag for an absent key, so
///   `update_existing` re-creates a key deleted since it was read (the tick undoes a
///   resurrected route itself).
/// - `reports_ttl: false`: `state.redis` returns no `ttlExpireTime` on a get, so a TTL
///   is invisible through Dapr; expiry itself is still checked.
/// - `delete_rejects_invalid_etag: false`: `state.redis` compares a delete's ETag with the
///   stored version as a string, so a non-integer ETag is a mismatch, not invalid.
fn dapr_caps() -> Caps {
    Caps {
        update_checks_existence: false,
        reports_ttl: false,
        delete_rejects_invalid_etag: false,
    }
}

/// Conformance cases whose premise Dapr rejects: `keys_are_opaque_text` stores a key
/// containing `||`, which Dapr refuses (`input key/keyPrefix ... can't contain '||'`)
/// because `||` separates its key prefix from the key.
const NOT_APPLICABLE_ON_DAPR: &[&str] = &["keys_are_opaque_text"];

async fn start() -> (SidecarDouble, DaprStore) {
    start_with(SidecarConfig::default(), None).await
}

async fn start_with(config: SidecarConfig, token: Option<&str>) -> (SidecarDouble, DaprStore) {
    let sidecar = SidecarDouble::start(config).await;
    let store = connect(&sidecar, token).await;
    (sidecar, store)
}

async fn connect(sidecar: &SidecarDouble, token: Option<&str>) -> DaprStore {
    DaprStore::connect(
        &sidecar.grpc_endpoint(),
        token.map(Secret::new),
        sidecar.public_store(),
        sidecar.private_store(),
    )
    .await
    .unwrap_or_else(|e| panic!("DaprStore::connect: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dapr_store_passes_the_conformance_suite_over_the_sidecar_double() {
    bounded(TEST_BOUND, async {
        let (_sidecar, store) = start().await;
        let caps = dapr_caps();
        let selected: Vec<_> = conformance::cases()
            .into_iter()
            .filter(|(name, _)| !NOT_APPLICABLE_ON_DAPR.contains(name))
            .collect();
        assert_eq!(
            selected.len() + NOT_APPLICABLE_ON_DAPR.len(),
            conformance::cases().len(),
            "a case listed as not applicable does not exist"
        );
        // Concurrently, as `conformance::run_all` does, each case on its own keys.
        let runs = selected.iter().map(|&(name, case)| {
            let store = &store as &dyn Store;
            let caps = &caps;
            async move {
                let run = tokio::time::timeout(CASE_BOUND, case(store, caps));
                let outcome = match AssertUnwindSafe(run).catch_unwind().await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(format!("timed out after {CASE_BOUND:?}")),
                    Err(panic) => Err(panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".to_string())),
                };
                match &outcome {
                    Ok(()) => eprintln!("conformance [dapr] {name} ... ok"),
                    Err(why) => eprintln!("conformance [dapr] {name} ... FAILED: {why}"),
                }
                (name, outcome.is_ok())
            }
        });
        let results = futures::future::join_all(runs).await;
        let failed: Vec<_> = results
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(name, _)| *name)
            .collect();
        assert!(
            failed.is_empty(),
            "conformance cases failed on dapr: {failed:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn keys_containing_the_dapr_separator_are_refused_and_other_keys_are_opaque() {
    bounded(TEST_BOUND, async {
        let (_sidecar, store) = start().await;
        for kind in [StoreKind::Public, StoreKind::Private] {
            let err = store
                .save(kind, Save::cas("a||b", b"x", ABSENT_ETAG))
                .await
                .expect_err("Dapr refuses keys containing its separator");
            match &err {
                StoreError::Failed { key, message, .. } => {
                    assert_eq!(key, "a||b");
                    assert!(message.contains("||"), "{err}");
                }
                other => panic!("expected Failed, got {other:?}"),
            }
            assert!(store.get(kind, "a||b").await.is_err());
            for key in ["with space", "ünï¢ødé", "{braces}", "*?[glob]"] {
                store
                    .save(kind, Save::cas(key, key.as_bytes(), ABSENT_ETAG))
                    .await
                    .unwrap_or_else(|e| panic!("save {key:?}: {e}"));
                let entry = store.get(kind, key).await.expect("get").expect("present");
                assert_eq!(entry.data, key.as_bytes());
            }
        }
    })
    .await;
}

/// As through real daprd: the TTL is set in Redis, but no get shows it.
#[tokio::test]
async fn a_ttl_is_set_but_never_shown_as_through_real_daprd() {
    bounded(TEST_BOUND, async {
        let (sidecar, store) = start().await;
        let kind = StoreKind::Private;
        store
            .save(
                kind,
                Save::cas("scrape_state", b"lease", ABSENT_ETAG).with_ttl(100),
            )
            .await
            .expect("save with TTL");
        let redis = sidecar.redis().expect("own redis");
        let ttl: i64 = redis.query(redis::cmd("TTL").arg("plugins||scrape_state"));
        assert!((97..=100).contains(&ttl), "Redis TTL {ttl}");
        let entry = store
            .get(kind, "scrape_state")
            .await
            .expect("get")
            .expect("present");
        assert_eq!(entry.ttl, None);
        let keys = ["scrape_state".to_string()];
        let bulk = store.bulk_get(kind, &keys).await.expect("bulk get");
        assert_eq!(bulk[0].as_ref().map(|e| e.ttl), Some(None));
    })
    .await;
}

#[tokio::test]
async fn a_value_written_through_dapr_is_byte_identical_in_redis_to_the_redis_backend() {
    bounded(TEST_BOUND, async {
        let (sidecar, dapr) = start().await;
        let redis_store = RedisStore::connect(
            sidecar.redis_url(),
            sidecar.public_store(),
            sidecar.private_store(),
            sidecar.private_key_prefix(),
        )
        .await
        .unwrap_or_else(|e| panic!("RedisStore::connect: {e}"));
        let redis = sidecar.redis().expect("the double started its own redis");
        let route = br#"{"status":"ACTIVE","version":"v1","addons":{"x":[1,2]},"note":"\u00e9"}"#;
        let route2 = br#"{"status":"UNHEALTHY","version":"v1"}"#;

        // The same sequence of writes through each backend, on two keys.
        for (backend, store, key) in [
            ("dapr", &dapr as &dyn Store, "plugin_route_via_dapr"),
            (
                "redis",
                &redis_store as &dyn Store,
                "plugin_route_via_redis",
            ),
        ] {
            store
                .save(StoreKind::Public, Save::cas(key, route, ABSENT_ETAG))
                .await
                .unwrap_or_else(|e| panic!("{backend}: create: {e}"));
            store
                .update_existing(StoreKind::Public, key, route2, "1")
                .await
                .unwrap_or_else(|e| panic!("{backend}: update: {e}"));
            store
                .save(
                    StoreKind::Private,
                    Save::cas(key, b"holder", ABSENT_ETAG).with_ttl(60),
                )
                .await
                .unwrap_or_else(|e| panic!("{backend}: private save: {e}"));
            store
                .save(
                    StoreKind::Private,
                    Save {
                        key: "legacy",
                        data: b"true",
                        etag: None,
                        concurrency: Concurrency::LastWrite,
                        ttl_seconds: None,
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("{backend}: last-write save: {e}"));
        }

        let via_dapr = redis.hgetall("plugin_route_via_dapr");
        assert_eq!(
            via_dapr,
            vec![
                ("data".to_string(), route2.to_vec()),
                ("first-write".to_string(), b"0".to_vec()),
                ("version".to_string(), b"2".to_vec()),
            ]
        );
        assert_eq!(via_dapr, redis.hgetall("plugin_route_via_redis"));
        let private_dapr = redis.hgetall("plugins||plugin_route_via_dapr");
        assert!(!private_dapr.is_empty());
        assert_eq!(
            private_dapr,
            redis.hgetall("plugins||plugin_route_via_redis")
        );
        for key in [
            "plugins||plugin_route_via_dapr",
            "plugins||plugin_route_via_redis",
        ] {
            let ttl: i64 = redis.query(redis::cmd("TTL").arg(key));
            assert!((55..=60).contains(&ttl), "{key}: TTL {ttl}");
        }
        assert_eq!(
            redis.hgetall("plugins||legacy"),
            vec![
                ("data".to_string(), b"true".to_vec()),
                ("version".to_string(), b"2".to_vec()),
            ]
        );

        // And each reads the other's writes identically.
        for key in ["plugin_route_via_dapr", "plugin_route_via_redis"] {
            let a = dapr.get(StoreKind::Public, key).await.expect("dapr get");
            let b = redis_store
                .get(StoreKind::Public, key)
                .await
                .expect("redis get");
            assert_eq!(a, b, "{key}");
        }
    })
    .await;
}

#[tokio::test]
async fn the_private_prefix_is_applied_and_the_public_store_is_bare() {
    bounded(TEST_BOUND, async {
        let (sidecar, store) = start().await;
        let redis = sidecar.redis().expect("own redis");
        store
            .save(
                StoreKind::Private,
                Save::cas("all_registered_plugin", b"{\"a\":\"x\"}", ABSENT_ETAG),
            )
            .await
            .expect("save private");
        store
            .save(
                StoreKind::Public,
                Save::cas("plugin_route_a", b"{}", ABSENT_ETAG),
            )
            .await
            .expect("save public");
        assert!(!redis.hgetall("plugins||all_registered_plugin").is_empty());
        assert!(redis.hgetall("all_registered_plugin").is_empty());
        assert!(!redis.hgetall("plugin_route_a").is_empty());
        assert!(redis.hgetall("plugins||plugin_route_a").is_empty());

        // Another component prefix: the component decides, not the worker.
        let (sidecar, store) = start_with(
            SidecarConfig::default().with_private_key_prefix("tenant-a"),
            None,
        )
        .await;
        let redis = sidecar.redis().expect("own redis");
        store
            .save(
                StoreKind::Private,
                Save::cas("scrape_state", b"x", ABSENT_ETAG),
            )
            .await
            .expect("save");
        assert!(!redis.hgetall("tenant-a||scrape_state").is_empty());
        assert!(redis.hgetall("plugins||scrape_state").is_empty());

        let located = store.locate(StoreKind::Private, "all_registered_plugin");
        assert_eq!(
            located,
            "key \"all_registered_plugin\" in component \"keel-private-store\" \
             (the component's keyPrefix decides the stored key)"
        );
        assert_eq!(store.backend(), "dapr");
        assert_eq!(store.store_name(StoreKind::Public), "keel-public-store");
        assert!(!store.update_checks_existence());
    })
    .await;
}

#[tokio::test]
async fn the_api_token_is_required_and_never_shown() {
    bounded(TEST_BOUND, async {
        let (sidecar, good) = start_with(
            SidecarConfig::default().with_token("t0ken-right"),
            Some("t0ken-right"),
        )
        .await;
        let redis = sidecar.redis().expect("own redis");

        for token in [None, Some("t0ken-wrong")] {
            let bad = connect(&sidecar, token).await;
            for result in [
                bad.get(StoreKind::Public, "plugin_route_a")
                    .await
                    .map(|_| ()),
                bad.save(
                    StoreKind::Public,
                    Save::cas("plugin_route_a", b"{}", ABSENT_ETAG),
                )
                .await,
                bad.ping().await,
            ] {
                let err = result.expect_err("the sidecar rejects the token");
                let text = err.to_string();
                eprintln!("{text}");
                assert!(matches!(err, StoreError::Failed { .. }), "{err:?}");
                assert!(text.contains("Dapr API token"), "{text}");
                assert!(text.contains("rejected"), "{text}");
                assert!(!text.contains("t0ken"), "the token leaked: {text}");
                assert!(!format!("{err:?}").contains("t0ken"));
            }
            assert!(!format!("{bad:?}").contains("t0ken"));
        }
        assert!(
            redis.hgetall("plugin_route_a").is_empty(),
            "a rejected call wrote"
        );

        good.save(
            StoreKind::Public,
            Save::cas("plugin_route_a", b"{}", ABSENT_ETAG),
        )
        .await
        .expect("the right token is accepted");
        good.ping().await.expect("ping with the right token");
        assert!(!redis.hgetall("plugin_route_a").is_empty());
        assert!(sidecar.saw_token());
    })
    .await;
}

#[tokio::test]
async fn no_token_is_sent_when_none_is_configured() {
    bounded(TEST_BOUND, async {
        let (sidecar, store) = start().await;
        store.ping().await.expect("ping");
        store
            .bulk_get(StoreKind::Public, &["a".to_string()])
            .await
            .expect("bulk");
        assert!(!sidecar.saw_token());
        assert_eq!(sidecar.calls("GetState"), 1);
        assert_eq!(sidecar.calls("GetBulkState"), 1);
    })
    .await;
}

#[tokio::test]
async fn errors_name_the_store_and_key_and_come_within_seconds() {
    bounded(TEST_BOUND, async {
        let sidecar = SidecarDouble::start(SidecarConfig::default()).await;

        // A component the sidecar does not have.
        let wrong = DaprStore::connect(
            &sidecar.grpc_endpoint(),
            None,
            "no-such-public",
            "no-such-private",
        )
        .await
        .expect("connect is lazy");
        let err = wrong
            .get(StoreKind::Private, "all_registered_plugin")
            .await
            .expect_err("unknown component");
        let text = err.to_string();
        eprintln!("{text}");
        assert!(text.contains("no-such-private"), "{text}");
        assert!(text.contains("all_registered_plugin"), "{text}");
        assert!(matches!(err, StoreError::Failed { .. }), "{err:?}");
        assert!(wrong.ping().await.is_err());
        let err = wrong
            .save(StoreKind::Public, Save::cas("plugin_route_a", b"{}", "1"))
            .await
            .expect_err("unknown component");
        assert!(
            matches!(err, StoreError::Failed { .. }),
            "not an ETag error: {err:?}"
        );

        // A sidecar that is up but not ready yet.
        let store = connect(&sidecar, None).await;
        store.ping().await.expect("ping");
        sidecar.set_ready(false);
        let err = store.ping().await.expect_err("not ready");
        assert!(err.to_string().contains(&sidecar.grpc_endpoint()), "{err}");
        sidecar.set_ready(true);
        store.ping().await.expect("ready again");

        // The sidecar goes away: calls fail fast, naming store, key and endpoint.
        let endpoint = sidecar.grpc_endpoint();
        drop(sidecar);
        let started = Instant::now();
        let err = store
            .bulk_get(
                StoreKind::Public,
                &["plugin_route_a".to_string(), "plugin_route_b".to_string()],
            )
            .await
            .expect_err("the sidecar is gone");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let text = err.to_string();
        eprintln!("{text}");
        assert!(text.contains("keel-public-store"), "{text}");
        assert!(text.contains("plugin_route_a"), "{text}");
        assert!(text.contains(&endpoint), "{text}");
        let err = store
            .save(
                StoreKind::Private,
                Save::cas("scrape_state", b"x", ABSENT_ETAG),
            )
            .await
            .expect_err("the sidecar is gone");
        assert!(err.to_string().contains("scrape_state"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn update_existing_re_creates_a_deleted_route_as_dapr_does() {
    bounded(TEST_BOUND, async {
        let (sidecar, store) = start().await;
        let kind = StoreKind::Public;
        store
            .save(
                kind,
                Save::cas("plugin_route_gone", b"{\"status\":\"ACTIVE\"}", ABSENT_ETAG),
            )
            .await
            .expect("create");
        let etag = store
            .get(kind, "plugin_route_gone")
            .await
            .expect("get")
            .expect("present")
            .etag;
        // Plugins deletes the route between the worker's read and its write ...
        store
            .delete(kind, "plugin_route_gone", None)
            .await
            .expect("delete");
        // ... and the CAS write carrying the old ETag re-creates it, as Dapr does.
        store
            .update_existing(
                kind,
                "plugin_route_gone",
                b"{\"status\":\"UNHEALTHY\"}",
                &etag,
            )
            .await
            .expect("Dapr accepts any ETag for an absent key");
        let entry = store
            .get(kind, "plugin_route_gone")
            .await
            .expect("get")
            .expect("re-created");
        assert_eq!(entry.etag, "1");
        // The caller can undo it with the new ETag.
        store
            .delete(kind, "plugin_route_gone", Some(&entry.etag))
            .await
            .expect("delete with the new ETag");
        assert!(sidecar
            .redis()
            .expect("own redis")
            .hgetall("plugin_route_gone")
            .is_empty());

        // An empty ETag is never a blind write.
        store
            .save(kind, Save::cas("plugin_route_kept", b"{}", ABSENT_ETAG))
            .await
            .expect("create");
        let err = store
            .update_existing(kind, "plugin_route_kept", b"blind", "")
            .await
            .expect_err("an empty ETag matches no stored version");
        assert!(err.is_conflict(), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn large_bulk_reads_are_split_into_calls_and_keep_the_order() {
    bounded(TEST_BOUND, async {
        let (sidecar, store) = start().await;
        let kind = StoreKind::Public;
        let keys: Vec<String> = (0..2100).map(|i| format!("plugin_route_{i}")).collect();
        for key in keys.iter().step_by(7) {
            store
                .save(kind, Save::cas(key, key.as_bytes(), ABSENT_ETAG))
                .await
                .expect("save");
        }
        let mut request = keys.clone();
        request.reverse();
        let got = store.bulk_get(kind, &request).await.expect("bulk get");
        assert_eq!(got.len(), request.len());
        for (key, item) in request.iter().zip(&got) {
            let i: usize = key["plugin_route_".len()..].parse().expect("index");
            match item {
                Some(entry) => {
                    assert_eq!(i % 7, 0, "{key} was never written");
                    assert_eq!(entry.data, key.as_bytes());
                }
                None => assert_ne!(i % 7, 0, "{key} is missing"),
            }
        }
        // 2100 keys: three calls of at most 1000 keys.
        assert_eq!(sidecar.calls("GetBulkState"), 3);
    })
    .await;
}

#[tokio::test]
async fn a_hung_sidecar_is_an_error_within_the_call_timeout() {
    bounded(TEST_BOUND, async {
        let (sidecar, store) = start().await;
        store.ping().await.expect("ping");
        sidecar.set_stalled(true);
        let started = Instant::now();
        let err = store
            .get(StoreKind::Private, "scrape_state")
            .await
            .expect_err("no answer");
        let waited = started.elapsed();
        assert!(
            waited >= keel_scraper::store::dapr::CALL_TIMEOUT - Duration::from_millis(100)
                && waited < keel_scraper::store::dapr::CALL_TIMEOUT + Duration::from_secs(2),
            "{waited:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("scrape_state") && text.contains("did not answer"),
            "{text}"
        );
        sidecar.set_stalled(false);
        store.ping().await.expect("answers again");
    })
    .await;
}
