//! The `redis` backend against a real `redis-server`: the store conformance suite, the
//! exact Dapr `state.redis` layout checked with raw commands, secrets kept out of every
//! error, and recovery from outages.

mod support;

use std::time::{Duration, Instant};

use keel_scraper::store::redis::{RedisOptions, RedisStore, BULK_CHUNK};
use keel_scraper::store::{Concurrency, Save, Store, StoreError, StoreKind, ABSENT_ETAG};
use support::conformance::{self, Caps};
use support::redis_server::{free_port, RedisServer};

const PUBLIC: &str = "keel-public-store";
const PRIVATE: &str = "keel-private-store";

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url(), PUBLIC, PRIVATE, "plugins")
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.endpoint()))
}

fn bytes(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn field(name: &str, value: &str) -> (String, Vec<u8>) {
    (name.to_owned(), bytes(value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_conformance_suite() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    conformance::run_all(&store, &Caps::full()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_daprs_hash_layout_under_the_right_keys() {
    let server = RedisServer::start();
    let store = connect(&server).await;

    store
        .save(
            StoreKind::Private,
            Save::cas("x", b"\x00lease\xff", ABSENT_ETAG),
        )
        .await
        .expect("first-write save");
    assert_eq!(
        server.query::<String>(redis::cmd("TYPE").arg("plugins||x")),
        "hash"
    );
    assert_eq!(
        server.hgetall("plugins||x"),
        vec![
            ("data".to_owned(), b"\x00lease\xff".to_vec()),
            field("first-write", "0"),
            field("version", "1"),
        ]
    );
    assert_eq!(server.query::<i64>(redis::cmd("EXISTS").arg("x")), 0);

    let last_write = Save {
        key: "plugin_route_echo",
        data: b"{\"status\":\"ACTIVE\"}",
        etag: None,
        concurrency: Concurrency::LastWrite,
        ttl_seconds: None,
    };
    store
        .save(StoreKind::Public, last_write)
        .await
        .expect("save");
    store
        .save(StoreKind::Public, last_write)
        .await
        .expect("save");
    // Public keys are bare; last-write saves never add the first-write field.
    assert_eq!(
        server.hgetall("plugin_route_echo"),
        vec![
            field("data", "{\"status\":\"ACTIVE\"}"),
            field("version", "2")
        ]
    );
    store
        .update_existing(
            StoreKind::Public,
            "plugin_route_echo",
            b"{\"status\":\"FAILED\"}",
            "2",
        )
        .await
        .expect("update");
    assert_eq!(
        server.hgetall("plugin_route_echo"),
        vec![
            field("data", "{\"status\":\"FAILED\"}"),
            field("first-write", "0"),
            field("version", "3"),
        ]
    );
    assert_eq!(
        store.locate(StoreKind::Private, "all_registered_plugin"),
        "plugins||all_registered_plugin"
    );
    assert_eq!(
        store.locate(StoreKind::Public, "plugin_route_echo"),
        "plugin_route_echo"
    );
    assert_eq!(store.store_name(StoreKind::Public), PUBLIC);
    assert_eq!(store.store_name(StoreKind::Private), PRIVATE);
    assert_eq!(store.backend(), "redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_key_prefix_is_configurable() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), PUBLIC, PRIVATE, "tkeel-plugins")
        .await
        .expect("connect");
    store
        .save(
            StoreKind::Private,
            Save::cas("all_registered_plugin", b"{}", ABSENT_ETAG),
        )
        .await
        .expect("save");
    assert_eq!(
        server.hgetall("tkeel-plugins||all_registered_plugin"),
        vec![
            field("data", "{}"),
            field("first-write", "0"),
            field("version", "1")
        ]
    );
    assert_eq!(
        store.locate(StoreKind::Private, "all_registered_plugin"),
        "tkeel-plugins||all_registered_plugin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_written_by_dapr_reads_back_with_its_version_as_etag() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let _: () = server.query(
        redis::cmd("HSET")
            .arg("plugin_route_echo")
            .arg("data")
            .arg(b"{\"status\":\"STARTING\"}".as_slice())
            .arg("version")
            .arg("7"),
    );
    let _: () = server.query(
        redis::cmd("HSET")
            .arg("plugins||all_registered_plugin")
            .arg("data")
            .arg("{\"echo\":1}")
            .arg("version")
            .arg("12")
            .arg("first-write")
            .arg("0"),
    );
    let entry = store
        .get(StoreKind::Public, "plugin_route_echo")
        .await
        .expect("get")
        .expect("present");
    assert_eq!(entry.etag, "7");
    assert_eq!(entry.data, b"{\"status\":\"STARTING\"}");
    assert_eq!(entry.ttl, None);
    let registry = store
        .bulk_get(StoreKind::Private, &["all_registered_plugin".to_owned()])
        .await
        .expect("bulk get");
    assert_eq!(registry[0].as_ref().map(|e| e.etag.as_str()), Some("12"));

    let stale = store
        .save(
            StoreKind::Public,
            Save::cas("plugin_route_echo", b"{}", "6"),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    store
        .save(
            StoreKind::Public,
            Save::cas("plugin_route_echo", b"{\"status\":\"ACTIVE\"}", "7"),
        )
        .await
        .expect("CAS on Dapr's version");
    assert_eq!(
        server.hgetall("plugin_route_echo"),
        vec![
            field("data", "{\"status\":\"ACTIVE\"}"),
            field("first-write", "0"),
            field("version", "8"),
        ]
    );
    // Dapr had set no first-write flag on the route, so a save without ETag was allowed
    // before; the registry had one, so it is refused there as a plain failure.
    let blind = store
        .save(
            StoreKind::Private,
            Save {
                key: "all_registered_plugin",
                data: b"{}",
                etag: None,
                concurrency: Concurrency::FirstWrite,
                ttl_seconds: None,
            },
        )
        .await;
    assert!(matches!(blind, Err(StoreError::Failed { .. })), "{blind:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_is_applied_in_redis_itself() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", b"holder", ABSENT_ETAG).with_ttl(100),
        )
        .await
        .expect("save with TTL");
    let ttl: i64 = server.query(redis::cmd("TTL").arg("plugins||scrape_state"));
    assert!((1..=100).contains(&ttl), "TTL in Redis: {ttl}");
    let entry = store
        .get(StoreKind::Private, "scrape_state")
        .await
        .expect("get")
        .expect("present");
    let left = entry.ttl.expect("Entry.ttl reports the TTL");
    assert!(
        left > Duration::from_secs(90) && left <= Duration::from_secs(100),
        "{left:?}"
    );

    store
        .save(
            StoreKind::Private,
            Save::cas("scrape_state", b"holder", "1").with_ttl(0),
        )
        .await
        .expect("save removing the TTL");
    let ttl: i64 = server.query(redis::cmd("TTL").arg("plugins||scrape_state"));
    assert_eq!(ttl, -1, "ttl 0 must PERSIST the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_are_not_dapr_hashes() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let _: () = server.query(redis::cmd("SET").arg("plain").arg("string"));
    let _: () = server.query(redis::cmd("RPUSH").arg("listed").arg("x"));
    let _: () = server.query(redis::cmd("HSET").arg("no_version").arg("data").arg("x"));

    // A plain string reads as Dapr's `state.redis` reads it (GET after HGETALL fails):
    // the string, with an empty ETag.
    let plain = store
        .get(StoreKind::Public, "plain")
        .await
        .expect("a string key is readable")
        .expect("present");
    assert_eq!(
        (plain.data.as_slice(), plain.etag.as_str()),
        (&b"string"[..], "")
    );

    // Other keys fail naming the key, in single and in bulk reads, as that key's fault
    // (Unreadable), not as a store outage.
    for key in ["listed", "no_version"] {
        match store.get(StoreKind::Public, key).await {
            Err(StoreError::Unreadable {
                key: k, message, ..
            }) => {
                assert_eq!(k, key);
                assert!(message.contains("not a Dapr state hash"), "{message}");
            }
            other => panic!("get {key}: expected Unreadable, got {other:?}"),
        }
    }
    let keys = vec!["a".to_owned(), "listed".to_owned()];
    match store.bulk_get(StoreKind::Public, &keys).await {
        Err(StoreError::Unreadable { key, .. }) => assert_eq!(key, "listed"),
        other => panic!("bulk get: expected Unreadable naming the key, got {other:?}"),
    }
    // Read one by one, only the odd key fails.
    let each = keel_scraper::store::read_each(&store, StoreKind::Public, &keys, 4)
        .await
        .expect("the store itself answers");
    assert!(matches!(each[0], Ok(None)), "{:?}", each[0]);
    assert!(
        matches!(each[1], Err(StoreError::Unreadable { .. })),
        "{:?}",
        each[1]
    );

    // A save treats a non-hash key as absent and replaces it (Dapr's rule).
    store
        .save(
            StoreKind::Public,
            Save::cas("plain", b"now a hash", ABSENT_ETAG),
        )
        .await
        .expect("save over a string key");
    assert_eq!(
        server.hgetall("plain"),
        vec![
            field("data", "now a hash"),
            field("first-write", "0"),
            field("version", "1")
        ]
    );
}

/// 50 000 keys are read by a handful of script calls (a few in flight at a time), not by
/// one call per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_get_of_50000_keys_is_a_few_script_calls() {
    const N: usize = 50_000;
    let server = RedisServer::start();
    let store = connect(&server).await;
    let mut conn = server.async_conn().await;
    let mut pipe = redis::pipe();
    for i in 0..N {
        if i % 10 != 0 {
            pipe.cmd("HSET")
                .arg(format!("plugin_route_p{i}"))
                .arg("data")
                .arg(format!("{{\"status\":\"ACTIVE\",\"n\":{i}}}"))
                .arg("version")
                .arg(i % 7 + 1)
                .ignore();
        }
    }
    let _: () = pipe.query_async(&mut conn).await.expect("seed");
    let keys: Vec<String> = (0..N).map(|i| format!("plugin_route_p{i}")).collect();

    let _: () = server.query(redis::cmd("CONFIG").arg("RESETSTAT"));
    let started = Instant::now();
    let entries = tokio::time::timeout(
        Duration::from_secs(60),
        store.bulk_get(StoreKind::Public, &keys),
    )
    .await
    .expect("bulk get in bounded time")
    .expect("bulk get");
    eprintln!("bulk_get of {N} keys: {:?}", started.elapsed());

    assert_eq!(entries.len(), N);
    for (i, entry) in entries.iter().enumerate() {
        if i % 10 == 0 {
            assert!(entry.is_none(), "key {i}");
        } else {
            let entry = entry.as_ref().unwrap_or_else(|| panic!("key {i} missing"));
            assert_eq!(entry.etag, (i % 7 + 1).to_string());
            assert_eq!(
                entry.data,
                format!("{{\"status\":\"ACTIVE\",\"n\":{i}}}").as_bytes()
            );
        }
    }
    let stats: String = server.query(redis::cmd("INFO").arg("commandstats"));
    let calls = |command: &str| -> u64 {
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    eprintln!(
        "{}",
        stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let evalsha = calls("evalsha");
    assert_eq!(
        evalsha as usize,
        N.div_ceil(BULK_CHUNK),
        "script calls for one bulk get:\n{stats}"
    );
    assert_eq!(
        calls("hgetall") + calls("get"),
        0,
        "no per-key reads from the client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_appears_in_errors_or_debug_output() {
    const PASSWORD: &str = "Sup3r-s3cret-pw";
    const WRONG: &str = "Wr0ng-pa55word";
    let server = RedisServer::builder().with_password(PASSWORD).start();
    let endpoint = server.endpoint();

    // Wrong password.
    let url = format!("redis://:{WRONG}@{endpoint}/");
    let err = RedisStore::connect(&url, PUBLIC, PRIVATE, "plugins")
        .await
        .expect_err("a wrong password must not connect");
    eprintln!("wrong password: {err}");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(WRONG) && !text.contains(PASSWORD), "{text}");
        assert!(
            text.contains(&endpoint),
            "the error names host and port: {text}"
        );
    }

    // Right password, wrong user syntax variants are scrubbed too (user:password form).
    let url = format!("redis://default:{WRONG}@{endpoint}/");
    let err = RedisStore::connect(&url, PUBLIC, PRIVATE, "plugins")
        .await
        .expect_err("a wrong password must not connect");
    let text = format!("{err} {err:?}");
    assert!(!text.contains(WRONG), "{text}");

    // No password at all against a server that requires one.
    let url = format!("redis://{endpoint}/");
    let err = RedisStore::connect(&url, PUBLIC, PRIVATE, "plugins")
        .await
        .expect_err("no password must not connect");
    assert!(err.to_string().contains(&endpoint), "{err}");

    // The right password connects; neither Debug nor errors during an outage show it.
    let mut server = server;
    let store = connect(&server).await;
    assert!(!format!("{store:?}").contains(PASSWORD), "{store:?}");
    store.ping().await.expect("ping");
    server.stop();
    let err = store
        .get(StoreKind::Public, "k")
        .await
        .expect_err("Redis is down");
    let text = format!("{err} {err:?}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(text.contains(&endpoint), "{text}");
    let err = store.ping().await.expect_err("Redis is down");
    assert!(!format!("{err} {err:?}").contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_an_unreachable_redis_fails_fast_naming_host_and_port() {
    // Nothing listens on a port the kernel just reported free.
    let port = free_port();
    let url = format!("redis://:pw-in-url@127.0.0.1:{port}/0");
    let started = Instant::now();
    let err = RedisStore::connect(&url, PUBLIC, PRIVATE, "plugins")
        .await
        .expect_err("nothing listens there");
    let elapsed = started.elapsed();
    eprintln!("unreachable ({elapsed:?}): {err}");
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
    let text = format!("{err} {err:?}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("pw-in-url"), "{text}");

    // A Redis that accepts connections but never answers (paused) is bounded as well.
    let server = RedisServer::start();
    server.pause();
    let options = RedisOptions {
        timeout: Duration::from_secs(1),
        ..RedisOptions::default()
    };
    let started = Instant::now();
    let err = RedisStore::connect_with(&server.url(), PUBLIC, PRIVATE, "plugins", options)
        .await
        .expect_err("a hung Redis must not connect");
    eprintln!("hung: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains(&server.endpoint()), "{err}");
    server.resume();

    // A malformed URL is refused without repeating it.
    for url in [
        "not a url :pw-in-url",
        "redis://:pw-in-url@host:99999",
        "http://:pw-in-url@h:1",
    ] {
        let err = RedisStore::connect(url, PUBLIC, PRIVATE, "plugins")
            .await
            .expect_err("malformed URL");
        eprintln!("malformed: {err}");
        assert!(!format!("{err} {err:?}").contains("pw-in-url"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_by_itself_after_redis_restarts() {
    let mut server = RedisServer::builder().with_persistence().start();
    let store = connect(&server).await;
    store
        .save(
            StoreKind::Public,
            Save::cas("plugin_route_a", b"before", ABSENT_ETAG),
        )
        .await
        .expect("save");

    server.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let err = store
            .get(StoreKind::Public, "plugin_route_a")
            .await
            .expect_err("Redis is down");
        eprintln!("outage ({:?}): {err}", started.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "outage error took {:?}",
            started.elapsed()
        );
        assert!(matches!(err, StoreError::Failed { .. }), "{err:?}");
        assert!(store.ping().await.is_err());
    }

    server.restart();
    // The restarted Redis has an empty script cache: reads and writes reload the scripts.
    let deadline = Instant::now() + Duration::from_secs(15);
    let entry = loop {
        match store.get(StoreKind::Public, "plugin_route_a").await {
            Ok(entry) => break entry,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet recovered: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the store did not recover after Redis restarted: {e}"),
        }
    };
    let entry = entry.expect("persisted across the restart");
    assert_eq!(
        (entry.etag.as_str(), entry.data.as_slice()),
        ("1", &b"before"[..])
    );
    store
        .save(
            StoreKind::Public,
            Save::cas("plugin_route_a", b"after", "1"),
        )
        .await
        .expect("save after recovery");
    store
        .update_existing(StoreKind::Public, "plugin_route_a", b"updated", "2")
        .await
        .expect("update after recovery");
    store
        .delete(StoreKind::Public, "plugin_route_a", Some("3"))
        .await
        .expect("delete after recovery");
    store.ping().await.expect("ping after recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_an_error_within_the_timeout_and_then_recovers() {
    let server = RedisServer::start();
    let options = RedisOptions {
        timeout: Duration::from_secs(1),
        ..RedisOptions::default()
    };
    let store = RedisStore::connect_with(&server.url(), PUBLIC, PRIVATE, "plugins", options)
        .await
        .expect("connect");
    server.pause();
    let started = Instant::now();
    let err = store
        .bulk_get(StoreKind::Public, &["a".to_owned(), "b".to_owned()])
        .await
        .expect_err("Redis is paused");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains(&server.endpoint()), "{err}");
    server.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.ping().await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet recovered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery after the pause: {e}"),
        }
    }
    assert_eq!(store.get(StoreKind::Public, "a").await, Ok(None));
}

/// `SCRIPT FLUSH` (or a failover to a replica without the scripts) is repaired in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_scripts_are_reloaded() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    store
        .save(StoreKind::Public, Save::cas("k", b"v", ABSENT_ETAG))
        .await
        .expect("save");
    let _: () = server.query(redis::cmd("SCRIPT").arg("FLUSH"));
    let got = store
        .bulk_get(StoreKind::Public, &["k".to_owned(), "missing".to_owned()])
        .await
        .expect("bulk get after SCRIPT FLUSH");
    assert_eq!(got[0].as_ref().map(|e| e.etag.as_str()), Some("1"));
    assert_eq!(got[1], None);
    // A bulk read of several chunks, their script calls in flight together, each finding
    // the script gone.
    let _: () = server.query(redis::cmd("SCRIPT").arg("FLUSH"));
    let mut keys: Vec<String> = (0..3 * BULK_CHUNK).map(|i| format!("none{i}")).collect();
    keys.push("k".to_owned());
    let got = store
        .bulk_get(StoreKind::Public, &keys)
        .await
        .expect("a bulk read of several chunks after SCRIPT FLUSH");
    assert_eq!(got.len(), keys.len());
    assert!(got[..3 * BULK_CHUNK].iter().all(Option::is_none));
    assert_eq!(
        got[3 * BULK_CHUNK].as_ref().map(|e| e.data.as_slice()),
        Some(&b"v"[..])
    );
    let _: () = server.query(redis::cmd("SCRIPT").arg("FLUSH"));
    store
        .save(StoreKind::Public, Save::cas("k", b"w", "1"))
        .await
        .expect("save after SCRIPT FLUSH");
    let _: () = server.query(redis::cmd("SCRIPT").arg("FLUSH"));
    store
        .update_existing(StoreKind::Public, "k", b"x", "2")
        .await
        .expect("update after SCRIPT FLUSH");
    let _: () = server.query(redis::cmd("SCRIPT").arg("FLUSH"));
    store
        .delete(StoreKind::Public, "k", Some("3"))
        .await
        .expect("delete after SCRIPT FLUSH");
    assert!(server.hgetall("k").is_empty());
}
