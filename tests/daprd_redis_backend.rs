//! The `redis` backend follows the facts of Dapr's `state.redis` where it claims Dapr's
//! layout, each checked side by side with a real daprd on the same Redis:
//! `--private-key-prefix` follows Dapr's `keyPrefix` rules (`none` = bare keys; the
//! strategies `appid` / `name` / `namespace` are refused with exit 2; any other prefix is
//! lower-cased), and strong consistency waits for replicas (`WAIT n 1000` after writes
//! when `INFO replication` showed n > 0 replicas at connect).

mod support;

use keel_test_support::process::bounded;
use std::time::{Duration, Instant};

use keel_scraper::secret::Secret;
use keel_scraper::store::dapr::DaprStore;
use keel_scraper::store::redis::RedisStore;
use keel_scraper::store::{Save, Store, StoreKind, ABSENT_ETAG};
use support::binary::{keel, routes_json};
use support::daprd::{Daprd, PRIVATE_STORE, PUBLIC_STORE};
use support::redis_server::RedisServer;

const PASSWORD: &str = "redis-backend-pw";
const TEST_BOUND: Duration = Duration::from_secs(60);

async fn dapr_store(daprd: &Daprd) -> DaprStore {
    DaprStore::connect(
        &daprd.grpc_endpoint(),
        None::<Secret>,
        PUBLIC_STORE,
        PRIVATE_STORE,
    )
    .await
    .unwrap_or_else(|e| panic!("DaprStore::connect: {e}"))
}

async fn redis_store(redis: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::connect(&redis.url(), PUBLIC_STORE, PRIVATE_STORE, prefix)
        .await
        .unwrap_or_else(|e| panic!("RedisStore::connect: {e}"))
}

/// `cmdstat_wait` calls so far (`INFO commandstats`).
fn wait_calls(redis: &RedisServer) -> u64 {
    let info: String = redis.query(redis::cmd("INFO").arg("commandstats"));
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_wait:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_case_prefix_is_lower_cased_as_daprd_does() {
    bounded(TEST_BOUND, async {
        let redis = RedisServer::builder().with_password(PASSWORD).start();
        let daprd = tokio::task::block_in_place(|| {
            Daprd::builder("keel-scraper", &redis)
                .with_private_prefix("Plugins")
                .start()
        });
        let through_dapr = dapr_store(&daprd).await;
        through_dapr
            .save(
                StoreKind::Private,
                Save::cas("all_registered_plugin", b"{\"a\":\"1\"}", ABSENT_ETAG),
            )
            .await
            .expect("save through daprd");
        // Real daprd wrote it under the lower-cased prefix.
        assert!(!redis.hgetall("plugins||all_registered_plugin").is_empty());
        assert!(redis.hgetall("Plugins||all_registered_plugin").is_empty());

        // The redis backend with the same spelling reads the same key.
        let direct = redis_store(&redis, "Plugins").await;
        assert_eq!(
            direct.redis_key(StoreKind::Private, "all_registered_plugin"),
            "plugins||all_registered_plugin"
        );
        let a = direct
            .get(StoreKind::Private, "all_registered_plugin")
            .await
            .expect("get");
        let b = through_dapr
            .get(StoreKind::Private, "all_registered_plugin")
            .await
            .expect("get");
        assert_eq!(a, b);
        assert!(a.is_some());

        // And `routes` on the redis backend sees the registry (it was empty before).
        let out = routes_json(&redis.url())
            .args(["--private-key-prefix", "Plugins"])
            .run_async()
            .await;
        out.assert_code(0);
        let rows: serde_json::Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
        // The registry's one plugin, with no route (the other members are its observation).
        let rows = rows.as_array().expect("an array of rows");
        assert_eq!(rows.len(), 1, "{}", out.describe());
        assert_eq!(rows[0]["plugin_id"], "a");
        assert_eq!(rows[0]["status"], serde_json::Value::Null);
        assert!(!out.stdout.contains(PASSWORD) && !out.stderr.contains(PASSWORD));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_none_means_bare_keys_as_daprd_does() {
    bounded(TEST_BOUND, async {
        let redis = RedisServer::builder().with_password(PASSWORD).start();
        let daprd = tokio::task::block_in_place(|| {
            Daprd::builder("keel-scraper", &redis)
                .with_private_prefix("none")
                .start()
        });
        dapr_store(&daprd)
            .await
            .save(
                StoreKind::Private,
                Save::cas("scrape_counters", b"{}", ABSENT_ETAG),
            )
            .await
            .expect("save through daprd");
        assert!(
            !redis.hgetall("scrape_counters").is_empty(),
            "daprd: bare key"
        );
        let direct = redis_store(&redis, "none").await;
        assert_eq!(
            direct.redis_key(StoreKind::Private, "scrape_counters"),
            "scrape_counters"
        );
        let entry = direct
            .get(StoreKind::Private, "scrape_counters")
            .await
            .expect("get")
            .expect("the bare key daprd wrote");
        assert_eq!(entry.data, b"{}");
    })
    .await;
}

#[test]
fn prefix_strategies_the_redis_backend_cannot_apply_exit_2_naming_the_option() {
    for strategy in ["appid", "name", "namespace", "AppId"] {
        let out = keel()
            .args(["routes", "--backend", "redis"])
            .args(["--redis-url", "redis://127.0.0.1:1/"])
            .args(["--private-key-prefix", strategy])
            .run();
        out.assert_code(2);
        assert!(
            out.stderr.contains("--private-key-prefix") && out.stderr.contains("strategy"),
            "{}",
            out.describe()
        );
    }
}

/// A primary with one replica (both password-protected), the replica in sync.
fn primary_with_replica() -> (RedisServer, RedisServer) {
    let primary = RedisServer::builder().with_password(PASSWORD).start();
    let port = primary.port().to_string();
    let replica = RedisServer::builder()
        .with_password(PASSWORD)
        .with_args(&["--replicaof", "127.0.0.1", &port, "--masterauth", PASSWORD])
        .start();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info: String = primary.query(redis::cmd("INFO").arg("replication"));
        let replica_info: String = replica.query(redis::cmd("INFO").arg("replication"));
        if info.contains("connected_slaves:1") && replica_info.contains("master_link_status:up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not sync:\n{info}\n{replica_info}\n{}",
            replica.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (primary, replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_replicas_as_daprd_does() {
    bounded(TEST_BOUND, async {
        let (primary, replica) = tokio::task::block_in_place(primary_with_replica);

        // Real daprd: a strong-consistency save is followed by one WAIT.
        let daprd =
            tokio::task::block_in_place(|| Daprd::builder("keel-scraper", &primary).start());
        let through_dapr = dapr_store(&daprd).await;
        let before = wait_calls(&primary);
        through_dapr
            .save(
                StoreKind::Public,
                Save::cas("plugin_route_d", b"d", ABSENT_ETAG),
            )
            .await
            .expect("save through daprd");
        assert_eq!(wait_calls(&primary) - before, 1, "daprd sent one WAIT");

        // The redis backend saw the replica at connect and does the same.
        let direct = redis_store(&primary, "plugins").await;
        assert_eq!(direct.replicas(), 1);
        let before = wait_calls(&primary);
        for i in 0..5 {
            let key = format!("plugin_route_r{i}");
            direct
                .save(StoreKind::Public, Save::cas(&key, b"r", ABSENT_ETAG))
                .await
                .expect("save");
            // WAIT returned: the replica has it already.
            let on_replica: Vec<(String, Vec<u8>)> = replica.hgetall(&key);
            assert!(
                !on_replica.is_empty(),
                "{key} not on the replica after the save"
            );
        }
        direct
            .update_existing(StoreKind::Public, "plugin_route_r0", b"r2", "1")
            .await
            .expect("update");
        assert_eq!(wait_calls(&primary) - before, 6, "one WAIT per write");

        // Without replicas at connect: no WAIT.
        let alone = RedisServer::builder().with_password(PASSWORD).start();
        let direct = redis_store(&alone, "plugins").await;
        assert_eq!(direct.replicas(), 0);
        direct
            .save(
                StoreKind::Public,
                Save::cas("plugin_route_x", b"x", ABSENT_ETAG),
            )
            .await
            .expect("save");
        assert_eq!(wait_calls(&alone), 0);
    })
    .await;
}
