//! The `dapr` backend against a real Dapr sidecar (`daprd` in self-hosted mode, the
//! repository's own `components/` pointed at a password-protected `redis-server`), and
//! the sidecar double held to what the real sidecar does.
//!
//! - The store conformance suite runs over real daprd with the capability flags real
//!   daprd earns ([`real_caps`]); tests/store_dapr.rs runs the same suite, same flags, over
//!   the double.
//! - Each *fact* below is one observation of Dapr's `state.redis` behaviour through the
//!   raw gRPC / HTTP API. Every fact runs twice, on real daprd (`real::*`) and on the double
//!   (`double::*`): a fact that passes on daprd and fails on the double is a divergence of
//!   the double, fixed there.

mod support;

use keel_test_support::process::bounded;
use std::collections::HashMap;
use std::time::Duration;

use dapr::dapr::proto::common::v1::{state_options, Etag, StateItem, StateOptions};
use dapr::dapr::proto::runtime::v1::dapr_client::DaprClient;
use dapr::dapr::proto::runtime::v1::{
    DeleteStateRequest, GetBulkStateRequest, GetStateRequest, SaveStateRequest,
};
use keel_scraper::secret::Secret;
use keel_scraper::store::dapr::DaprStore;
use keel_scraper::store::Store;
use support::conformance::{self, Caps};
use support::daprd::{try_http, Daprd, PRIVATE_PREFIX, PRIVATE_STORE, PUBLIC_STORE};
use support::redis_server::RedisServer;
use support::sidecar::{fixtures, SidecarConfig, SidecarDouble};
use tonic::transport::Channel;
use tonic::Code;

/// Every test finishes within this, or fails.
const TEST_BOUND: Duration = Duration::from_secs(90);

/// Redis's error for a command on a key of another type, as daprd passes it on.
const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

/// The password of every test Redis: the sidecar must be told it.
const REDIS_PASSWORD: &str = "s3cret-redis-pw";

/// What real daprd on `state.redis` shows, as the conformance suite's flags:
/// - `update_checks_existence: false`: ETag CAS accepts any ETag for an absent key.
/// - `reports_ttl: false`: a get returns no `ttlExpireTime`: a TTL is invisible.
/// - `delete_rejects_invalid_etag: false`: the delete script compares ETags as strings.
pub fn real_caps() -> Caps {
    Caps {
        update_checks_existence: false,
        reports_ttl: false,
        delete_rejects_invalid_etag: false,
    }
}

/// A sidecar under test, real or double, with the Redis it stores in.
struct Target {
    redis: RedisServer,
    real: Option<Daprd>,
    double: Option<SidecarDouble>,
}

impl Target {
    fn redis() -> RedisServer {
        RedisServer::builder().with_password(REDIS_PASSWORD).start()
    }

    async fn real() -> Target {
        Self::real_with(|b| b).await
    }

    async fn real_with(
        configure: impl FnOnce(support::daprd::DaprdBuilder) -> support::daprd::DaprdBuilder,
    ) -> Target {
        let redis = Self::redis();
        let daprd = tokio::task::block_in_place(|| {
            configure(Daprd::builder("keel-scraper", &redis)).start()
        });
        Target {
            redis,
            real: Some(daprd),
            double: None,
        }
    }

    async fn double() -> Target {
        Self::double_with(|c| c).await
    }

    async fn double_with(configure: impl FnOnce(SidecarConfig) -> SidecarConfig) -> Target {
        let redis = Self::redis();
        let config = configure(SidecarConfig::default().with_redis_url(&redis.url()));
        let double = SidecarDouble::start(config).await;
        Target {
            redis,
            real: None,
            double: Some(double),
        }
    }

    fn grpc_endpoint(&self) -> String {
        match (&self.real, &self.double) {
            (Some(d), _) => d.grpc_endpoint(),
            (_, Some(d)) => d.grpc_endpoint(),
            _ => unreachable!("a target is real or a double"),
        }
    }

    fn http_port(&self) -> u16 {
        match (&self.real, &self.double) {
            (Some(d), _) => d.http_port(),
            (_, Some(d)) => d.http_port(),
            _ => unreachable!("a target is real or a double"),
        }
    }

    async fn client(&self) -> DaprClient<Channel> {
        DaprClient::connect(self.grpc_endpoint())
            .await
            .unwrap_or_else(|e| panic!("connect to the sidecar's gRPC port: {e}"))
    }

    async fn store(&self) -> DaprStore {
        DaprStore::connect(
            &self.grpc_endpoint(),
            None::<Secret>,
            PUBLIC_STORE,
            PRIVATE_STORE,
        )
        .await
        .unwrap_or_else(|e| panic!("DaprStore::connect: {e}"))
    }

    fn http(&self, path: &str) -> (u16, String) {
        try_http(self.http_port(), "GET", path, &[]).unwrap_or_else(|e| panic!("{e}"))
    }
}

fn options(concurrency: Option<state_options::StateConcurrency>) -> Option<StateOptions> {
    concurrency.map(|c| StateOptions {
        concurrency: c as i32,
        consistency: state_options::StateConsistency::ConsistencyStrong as i32,
    })
}

fn item(
    key: &str,
    value: &[u8],
    etag: Option<&str>,
    concurrency: Option<state_options::StateConcurrency>,
    metadata: &[(&str, &str)],
) -> StateItem {
    StateItem {
        key: key.to_owned(),
        value: value.to_vec(),
        etag: etag.map(|e| Etag {
            value: e.to_owned(),
        }),
        metadata: metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        options: options(concurrency),
    }
}

async fn save(client: &mut DaprClient<Channel>, store: &str, item: StateItem) -> Result<(), Code> {
    client
        .save_state(SaveStateRequest {
            store_name: store.to_owned(),
            states: vec![item],
        })
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

async fn get(
    client: &mut DaprClient<Channel>,
    store: &str,
    key: &str,
) -> Result<(Vec<u8>, String, HashMap<String, String>), tonic::Status> {
    client
        .get_state(GetStateRequest {
            store_name: store.to_owned(),
            key: key.to_owned(),
            ..Default::default()
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.data, r.etag, r.metadata)
        })
}

// ----- the facts -----------------------------------------------------------------------

/// `state.redis` sets a TTL with a separate `EXPIRE` but never reports it: no
/// `ttlExpireTime` on a get or a bulk get. Through Dapr on Redis a TTL is invisible.
async fn a_ttl_is_set_in_redis_but_never_reported(t: Target) {
    let mut client = t.client().await;
    let key = "scrape_state";
    let ttl_item = item(key, b"lease", None, None, &[("ttlInSeconds", "100")]);
    save(&mut client, PRIVATE_STORE, ttl_item)
        .await
        .expect("save with ttlInSeconds");
    let redis_ttl: i64 = t
        .redis
        .query(redis::cmd("TTL").arg(format!("{PRIVATE_PREFIX}||{key}")));
    assert!((95..=100).contains(&redis_ttl), "Redis TTL {redis_ttl}");
    let (data, etag, metadata) = get(&mut client, PRIVATE_STORE, key).await.expect("get");
    assert_eq!((data.as_slice(), etag.as_str()), (&b"lease"[..], "1"));
    assert!(
        !metadata.contains_key("ttlExpireTime"),
        "a get reported a TTL: {metadata:?}"
    );
    let bulk = client
        .get_bulk_state(GetBulkStateRequest {
            store_name: PRIVATE_STORE.to_owned(),
            keys: vec![key.to_owned()],
            parallelism: 0,
            metadata: HashMap::new(),
        })
        .await
        .expect("bulk get")
        .into_inner();
    assert_eq!(bulk.items.len(), 1);
    assert!(
        !bulk.items[0].metadata.contains_key("ttlExpireTime"),
        "a bulk get reported a TTL: {:?}",
        bulk.items[0].metadata
    );
    // And the dapr backend, reading through it, sees no TTL either.
    let entry = t
        .store()
        .await
        .get(keel_scraper::store::StoreKind::Private, key)
        .await
        .expect("DaprStore get")
        .expect("present");
    assert_eq!(entry.ttl, None);
}

/// A key that is not a hash: `HGETALL` fails, `state.redis` falls back to `GET` and
/// returns the string with an empty ETag.
async fn a_plain_string_key_reads_with_get_and_an_empty_etag(t: Target) {
    let () = t.redis.query(
        redis::cmd("SET")
            .arg("plugin_route_plain")
            .arg("legacy-bytes"),
    );
    let mut client = t.client().await;
    let (data, etag, _) = get(&mut client, PUBLIC_STORE, "plugin_route_plain")
        .await
        .expect("a string key is readable");
    assert_eq!(data, b"legacy-bytes");
    assert_eq!(etag, "", "a string key has no version");
    // A write over it succeeds whatever the ETag (the script sees no version) and turns
    // it into a state hash at version 1.
    save(
        &mut client,
        PUBLIC_STORE,
        item("plugin_route_plain", b"new", Some("5"), None, &[]),
    )
    .await
    .expect("a write over a string key");
    assert_eq!(
        t.redis.hgetall("plugin_route_plain"),
        vec![
            ("data".to_owned(), b"new".to_vec()),
            ("version".to_owned(), b"1".to_vec()),
        ]
    );
}

/// A key that is neither a hash nor a string cannot be read: `GetState` fails, while
/// `GetBulkState` succeeds and reports it in that item's `error` (the others are read).
async fn a_bulk_get_reports_an_unreadable_key_in_its_item(t: Target) {
    let mut client = t.client().await;
    save(
        &mut client,
        PUBLIC_STORE,
        item("plugin_route_ok", b"ok", None, None, &[]),
    )
    .await
    .expect("save");
    let () = t
        .redis
        .query(redis::cmd("RPUSH").arg("plugin_route_list").arg("x"));
    let single = get(&mut client, PUBLIC_STORE, "plugin_route_list")
        .await
        .expect_err("a list is not readable");
    assert_eq!(single.code(), Code::Internal, "{single:?}");
    assert_eq!(
        single.message(),
        format!("fail to get plugin_route_list from state store {PUBLIC_STORE}: {WRONGTYPE}")
    );
    let keys = ["plugin_route_ok", "plugin_route_list", "plugin_route_none"];
    let bulk = client
        .get_bulk_state(GetBulkStateRequest {
            store_name: PUBLIC_STORE.to_owned(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            parallelism: 0,
            metadata: HashMap::new(),
        })
        .await
        .expect("a bulk get with one unreadable key still succeeds")
        .into_inner();
    let by_key: HashMap<_, _> = bulk.items.iter().map(|i| (i.key.as_str(), i)).collect();
    assert_eq!(by_key.len(), 3, "{bulk:?}");
    let ok = by_key["plugin_route_ok"];
    assert_eq!(
        (ok.data.as_slice(), ok.etag.as_str(), ok.error.as_str()),
        (&b"ok"[..], "1", "")
    );
    let bad = by_key["plugin_route_list"];
    assert_eq!(
        bad.error, WRONGTYPE,
        "the item carries the store's error: {bad:?}"
    );
    assert!(bad.data.is_empty());
    let none = by_key["plugin_route_none"];
    assert!(none.data.is_empty() && none.etag.is_empty() && none.error.is_empty());
}

/// Only an explicit `last-write` concurrency makes Dapr ignore an ETag: with no options,
/// or unspecified concurrency, a wrong ETag is still a mismatch (`ABORTED`); a
/// non-integer one is invalid (`INVALID_ARGUMENT`) unless last-write.
async fn only_explicit_last_write_ignores_the_etag(t: Target) {
    use state_options::StateConcurrency::{
        ConcurrencyFirstWrite, ConcurrencyLastWrite, ConcurrencyUnspecified,
    };
    let mut client = t.client().await;
    let key = "plugin_route_cc";
    save(&mut client, PUBLIC_STORE, item(key, b"v1", None, None, &[]))
        .await
        .expect("create");
    for (concurrency, what) in [
        (None, "no options"),
        (Some(ConcurrencyUnspecified), "unspecified"),
        (Some(ConcurrencyFirstWrite), "first-write"),
    ] {
        let wrong = item(key, b"x", Some("7"), concurrency, &[]);
        assert_eq!(
            save(&mut client, PUBLIC_STORE, wrong).await,
            Err(Code::Aborted),
            "{what} with a wrong ETag"
        );
        let invalid = item(key, b"x", Some("not-a-number"), concurrency, &[]);
        assert_eq!(
            save(&mut client, PUBLIC_STORE, invalid).await,
            Err(Code::InvalidArgument),
            "{what} with a non-integer ETag"
        );
    }
    // Unspecified concurrency with the right ETag succeeds and sets no first-write field.
    let right = item(key, b"v2", Some("1"), Some(ConcurrencyUnspecified), &[]);
    save(&mut client, PUBLIC_STORE, right)
        .await
        .expect("the right ETag");
    for etag in ["7", "not-a-number"] {
        let last = item(key, b"v3", Some(etag), Some(ConcurrencyLastWrite), &[]);
        save(&mut client, PUBLIC_STORE, last)
            .await
            .unwrap_or_else(|c| panic!("last-write ignores ETag {etag:?}: {c:?}"));
    }
    assert_eq!(
        t.redis.hgetall(key),
        vec![
            ("data".to_owned(), b"v3".to_vec()),
            ("version".to_owned(), b"4".to_vec()),
        ]
    );
}

/// Delete: a wrong ETag is a mismatch, a non-integer one too (compared as a string), no
/// ETag deletes, and an absent key deletes whatever the ETag.
async fn delete_compares_the_etag_as_a_string(t: Target) {
    let mut client = t.client().await;
    let key = "plugin_route_del";
    save(&mut client, PUBLIC_STORE, item(key, b"v", None, None, &[]))
        .await
        .expect("create");
    let delete = |etag: Option<&str>| DeleteStateRequest {
        store_name: PUBLIC_STORE.to_owned(),
        key: key.to_owned(),
        etag: etag.map(|e| Etag {
            value: e.to_owned(),
        }),
        options: None,
        metadata: HashMap::new(),
    };
    for etag in ["2", "x"] {
        let err = client
            .delete_state(delete(Some(etag)))
            .await
            .expect_err("a wrong ETag does not delete");
        assert_eq!(err.code(), Code::Aborted, "ETag {etag:?}: {err:?}");
    }
    client
        .delete_state(delete(Some("1")))
        .await
        .expect("the right ETag deletes");
    client
        .delete_state(delete(Some("x")))
        .await
        .expect("an absent key deletes with any ETag");
}

/// `/v1.0/healthz/outbound` answers 204 once the API can serve outbound calls, with or
/// without an app; `/v1.0/healthz` also waits for the app, so with an app port nobody
/// listens on it is not healthy while outbound is.
async fn healthz_waits_for_the_app_and_outbound_does_not(t: Target) {
    assert_eq!(t.http("/v1.0/healthz/outbound").0, 204);
    let (code, body) = t.http("/v1.0/healthz");
    assert_eq!(code, 500, "healthz with an app that never came up: {body}");
    assert_eq!(body, fixtures::HEALTHZ_APP_NOT_READY);
}

/// The invocation and token error bodies, byte for byte as the fixtures real daprd sent:
/// an HTTPEndpoint refusing connections, an app id nobody resolves, a missing token.
async fn invocation_and_token_error_bodies_are_the_fixtures(t: Target, closed: u16) {
    let token = [("dapr-api-token", TOKEN)];
    let get = |path: &str, headers: &[(&str, &str)]| {
        try_http(t.http_port(), "GET", path, headers).unwrap_or_else(|e| panic!("{e}"))
    };
    let (code, body) = get("/v1.0/invoke/refused/method/v1/status", &token);
    assert_eq!(code, 500, "{body}");
    let url = format!("http://127.0.0.1:{closed}/refused/v1/status");
    let addr = format!("127.0.0.1:{closed}");
    assert_eq!(
        body,
        fixtures::render(fixtures::INVOKE_CONNECTION_REFUSED, "refused", &url, &addr)
    );
    let (code, body) = get("/v1.0/invoke/nobody/method/v1/status", &token);
    assert_eq!(code, 500, "{body}");
    assert_eq!(
        body,
        fixtures::render(fixtures::INVOKE_UNKNOWN_APP, "nobody", "", "")
    );
    for headers in [&[][..], &[("dapr-api-token", "wrong")][..]] {
        let (code, body) = get("/v1.0/invoke/refused/method/v1/status", headers);
        assert_eq!((code, body.as_str()), (401, fixtures::UNAUTHORIZED));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_invocation_and_token_error_bodies_are_the_fixtures() {
    bounded(TEST_BOUND, async {
        let closed = dead_app_port();
        let t = Target::real_with(|b| {
            b.with_token(TOKEN)
                .with_endpoint("refused", &format!("http://127.0.0.1:{closed}/refused"))
        })
        .await;
        invocation_and_token_error_bodies_are_the_fixtures(t, closed).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_invocation_and_token_error_bodies_are_the_fixtures() {
    bounded(TEST_BOUND, async {
        let closed = dead_app_port();
        let t = Target::double_with(|c| {
            c.with_token(TOKEN).with_invoke_target(move |id, method| {
                (id == "refused").then(|| format!("http://127.0.0.1:{closed}/refused/{method}"))
            })
        })
        .await;
        invocation_and_token_error_bodies_are_the_fixtures(t, closed).await;
    })
    .await;
}

const TOKEN: &str = "t0ken-for-the-fixtures";

/// The same without an app port: both answer 204.
async fn without_an_app_both_health_checks_pass(t: Target) {
    assert_eq!(t.http("/v1.0/healthz/outbound").0, 204);
    assert_eq!(t.http("/v1.0/healthz").0, 204);
}

/// A closed port that daprd is told the app listens on.
fn dead_app_port() -> u16 {
    support::redis_server::free_port()
}

macro_rules! on_both {
    ($($fact:ident),* $(,)?) => {
        mod real {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $fact() {
                    bounded(TEST_BOUND, async { super::$fact(Target::real().await).await }).await;
                }
            )*
        }
        mod double {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $fact() {
                    bounded(TEST_BOUND, async { super::$fact(Target::double().await).await }).await;
                }
            )*
        }
    };
}

on_both![
    a_ttl_is_set_in_redis_but_never_reported,
    a_plain_string_key_reads_with_get_and_an_empty_etag,
    a_bulk_get_reports_an_unreadable_key_in_its_item,
    only_explicit_last_write_ignores_the_etag,
    delete_compares_the_etag_as_a_string,
    without_an_app_both_health_checks_pass,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_healthz_waits_for_the_app_and_outbound_does_not() {
    bounded(TEST_BOUND, async {
        let port = dead_app_port();
        let t = Target::real_with(|b| b.with_app_port(port)).await;
        healthz_waits_for_the_app_and_outbound_does_not(t).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_healthz_waits_for_the_app_and_outbound_does_not() {
    bounded(TEST_BOUND, async {
        let t = Target::double_with(|c| c.with_app_down()).await;
        healthz_waits_for_the_app_and_outbound_does_not(t).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dapr_store_passes_the_conformance_suite_on_real_daprd() {
    bounded(TEST_BOUND, async {
        let t = Target::real().await;
        let store = t.store().await;
        // `keys_are_opaque_text` stores a key containing `||`, which Dapr refuses.
        conformance::run_all_except(&store, &real_caps(), &["keys_are_opaque_text"]).await;
    })
    .await;
}

/// The API token: set on daprd, a call without it or with a wrong one is refused
/// (`UNAUTHENTICATED` on gRPC, 401 on HTTP), health checks stay open, the right one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_token_is_required_on_every_api_call_but_health() {
    bounded(TEST_BOUND, async {
        let t = Target::real_with(|b| b.with_token("t0ken-right")).await;
        for token in [None, Some("t0ken-wrong")] {
            let store = DaprStore::connect(
                &t.grpc_endpoint(),
                token.map(Secret::new),
                PUBLIC_STORE,
                PRIVATE_STORE,
            )
            .await
            .expect("connect");
            let err = store
                .get(keel_scraper::store::StoreKind::Public, "plugin_route_a")
                .await
                .expect_err("refused");
            let text = err.to_string();
            assert!(text.contains("rejected the Dapr API token"), "{text}");
            assert!(!text.contains("t0ken"), "the token leaked: {text}");
        }
        let store = DaprStore::connect(
            &t.grpc_endpoint(),
            Some(Secret::new("t0ken-right")),
            PUBLIC_STORE,
            PRIVATE_STORE,
        )
        .await
        .expect("connect");
        store
            .get(keel_scraper::store::StoreKind::Public, "plugin_route_a")
            .await
            .expect("the right token works");
        assert_eq!(t.http("/v1.0/healthz/outbound").0, 204);
        let (code, body) = t.http("/v1.0/invoke/x/method/v1/status");
        assert_eq!(code, 401, "{body}");
    })
    .await;
}

/// Without a built daprd the tests are told where to get it; without Go, how to get Go.
#[test]
fn scripts_daprd_says_what_is_missing() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/daprd");
    let empty = tempfile::tempdir().expect("a temp dir");
    let path = std::env::var("PATH").unwrap_or_default();
    let out = std::process::Command::new(script)
        .arg("--no-build")
        .env("XDG_CACHE_HOME", empty.path())
        .env("PATH", &path)
        .output()
        .expect("run scripts/daprd");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no daprd"),
        "{out:?}"
    );
    // No `go` on PATH (only the tools the script needs before it looks for Go): exit 1
    // saying how to get Go.
    let bin = tempfile::tempdir().expect("a temp dir");
    for tool in ["dirname", "sed"] {
        let found = std::process::Command::new("/bin/sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .expect("look up a tool");
        let target = String::from_utf8_lossy(&found.stdout).trim().to_owned();
        std::os::unix::fs::symlink(&target, bin.path().join(tool)).expect("link a tool");
    }
    let out = std::process::Command::new("/bin/bash")
        .arg(script)
        .arg("--no-build")
        .env("PATH", bin.path())
        .output()
        .expect("run scripts/daprd");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'go' command is missing") && stderr.contains("go.dev"),
        "{stderr}"
    );
}
