//! The Dapr sidecar double answers like Dapr: the state methods with Dapr's status codes
//! over a real Redis in Dapr's layout, every other method `UNIMPLEMENTED`, service
//! invocation passed through (or Dapr's 500 when the target is down), readiness that can
//! be toggled, and the API token enforced on both surfaces except for health checks.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use dapr::dapr::proto::common::v1::{state_options, Etag, StateItem, StateOptions};
use dapr::dapr::proto::runtime::v1::dapr_client::DaprClient;
use dapr::dapr::proto::runtime::v1::{
    DeleteStateRequest, GetBulkStateRequest, GetMetadataRequest, GetStateRequest,
    PublishEventRequest, SaveStateRequest,
};
use keel_scraper::store::StoreKind;
use keel_test_support::process::{bounded, free_port};
use support::sidecar::{SidecarConfig, SidecarDouble};
use tonic::transport::Channel;
use tonic::Code;

/// Every test finishes within this, or fails.
const TEST_BOUND: Duration = Duration::from_secs(60);

async fn client(sidecar: &SidecarDouble) -> DaprClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(sidecar.grpc_endpoint())
        .expect("endpoint parses")
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the sidecar double");
    DaprClient::new(channel)
}

/// A request carrying `token` as `dapr-api-token` when given.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("dapr-api-token", token.parse().expect("ascii token"));
    }
    request
}

fn options(concurrency: state_options::StateConcurrency) -> Option<StateOptions> {
    Some(StateOptions {
        concurrency: concurrency as i32,
        consistency: state_options::StateConsistency::ConsistencyStrong as i32,
    })
}

fn save_request(
    store: &str,
    key: &str,
    value: &[u8],
    etag: Option<&str>,
    concurrency: state_options::StateConcurrency,
) -> SaveStateRequest {
    SaveStateRequest {
        store_name: store.to_string(),
        states: vec![StateItem {
            key: key.to_string(),
            value: value.to_vec(),
            etag: etag.map(|e| Etag {
                value: e.to_string(),
            }),
            metadata: HashMap::new(),
            options: options(concurrency),
        }],
    }
}

fn get_request(store: &str, key: &str) -> GetStateRequest {
    GetStateRequest {
        store_name: store.to_string(),
        key: key.to_string(),
        ..Default::default()
    }
}

const FIRST: state_options::StateConcurrency =
    state_options::StateConcurrency::ConcurrencyFirstWrite;
const LAST: state_options::StateConcurrency = state_options::StateConcurrency::ConcurrencyLastWrite;

/// A plain HTTP client for the double's HTTP surface (no proxy, bounded).
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build reqwest client")
}

/// A stand-in app on loopback: `/a/v1/status` answers 200 JSON, `/b/v1/status` 503 text.
/// Records whether any request reached it carrying a Dapr token.
struct App {
    base: String,
    saw_token: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_app() -> App {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let saw_token = Arc::new(AtomicBool::new(false));
    let seen = saw_token.clone();
    let app = axum::Router::new()
        .route(
            "/a/v1/status",
            get(|| async {
                (
                    [("content-type", "application/json")],
                    r#"{"res":{"ret":0,"msg":"ok"},"status":"ACTIVE"}"#,
                )
                    .into_response()
            }),
        )
        .route(
            "/b/v1/status",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "plugin b is down").into_response() }),
        )
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let seen = seen.clone();
                async move {
                    if req.headers().contains_key("dapr-api-token") {
                        seen.store(true, Ordering::SeqCst);
                    }
                    next.run(req).await
                }
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind app");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    App {
        base,
        saw_token,
        task,
    }
}

#[tokio::test]
async fn methods_other_than_the_four_state_calls_are_unimplemented() {
    bounded(TEST_BOUND, async {
        let sidecar = SidecarDouble::start(SidecarConfig::default()).await;
        let mut client = client(&sidecar).await;

        let err = client
            .get_metadata(GetMetadataRequest::default())
            .await
            .expect_err("GetMetadata is not served");
        assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

        let err = client
            .publish_event(PublishEventRequest::default())
            .await
            .expect_err("PublishEvent is not served");
        assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

        // The state calls themselves are served.
        client
            .get_state(get_request(sidecar.public_store(), "k"))
            .await
            .expect("GetState is served");

        assert_eq!(sidecar.calls("GetMetadata"), 1);
        assert_eq!(sidecar.calls("PublishEvent"), 1);
        assert_eq!(sidecar.calls("GetState"), 1);
    })
    .await;
}

#[tokio::test]
async fn a_refused_first_write_save_without_etag_is_internal_and_with_one_aborted() {
    bounded(TEST_BOUND, async {
        let sidecar = SidecarDouble::start(SidecarConfig::default()).await;
        let mut client = client(&sidecar).await;
        let store = sidecar.public_store().to_string();

        client
            .save_state(save_request(&store, "plugin_route_x", b"v1", None, FIRST))
            .await
            .expect("a first-write save of an absent key succeeds");

        let err = client
            .save_state(save_request(&store, "plugin_route_x", b"v2", None, FIRST))
            .await
            .expect_err("a first-write key refuses a save without an ETag");
        assert_eq!(err.code(), Code::Internal, "{err:?}");

        let err = client
            .save_state(save_request(
                &store,
                "plugin_route_x",
                b"v2",
                Some("-1"),
                FIRST,
            ))
            .await
            .expect_err("no stored version is -1");
        assert_eq!(err.code(), Code::Aborted, "{err:?}");

        // Nothing of the refused writes landed.
        let got = client
            .get_state(get_request(&store, "plugin_route_x"))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(got.data, b"v1");
        assert_eq!(got.etag, "1");
    })
    .await;
}

#[tokio::test]
async fn a_wrong_etag_is_aborted_and_the_right_one_succeeds() {
    bounded(TEST_BOUND, async {
        let sidecar = SidecarDouble::start(SidecarConfig::default()).await;
        let mut client = client(&sidecar).await;
        let store = sidecar.public_store().to_string();

        client
            .save_state(save_request(&store, "k", b"one", None, LAST))
            .await
            .expect("save");
        let etag = client
            .get_state(get_request(&store, "k"))
            .await
            .expect("get")
            .into_inner()
            .etag;
        assert_eq!(etag, "1");

        let err = client
            .save_state(save_request(&store, "k", b"two", Some("7"), FIRST))
            .await
            .expect_err("stale ETag");
        assert_eq!(err.code(), Code::Aborted, "{err:?}");
        assert!(err.message().contains("etag mismatch"), "{err:?}");

        let err = client
            .delete_state(DeleteStateRequest {
                store_name: store.clone(),
                key: "k".into(),
                etag: Some(Etag { value: "7".into() }),
                ..Default::default()
            })
            .await
            .expect_err("stale ETag on delete");
        assert_eq!(err.code(), Code::Aborted, "{err:?}");

        client
            .save_state(save_request(&store, "k", b"two", Some(&etag), FIRST))
            .await
            .expect("the current ETag is accepted");
        let got = client
            .get_state(get_request(&store, "k"))
            .await
            .expect("get")
            .into_inner();
        assert_eq!((got.data.as_slice(), got.etag.as_str()), (&b"two"[..], "2"));

        client
            .delete_state(DeleteStateRequest {
                store_name: store.clone(),
                key: "k".into(),
                etag: Some(Etag { value: "2".into() }),
                ..Default::default()
            })
            .await
            .expect("delete with the current ETag");
        let got = client
            .get_state(get_request(&store, "k"))
            .await
            .expect("get")
            .into_inner();
        assert!(got.data.is_empty() && got.etag.is_empty(), "{got:?}");
    })
    .await;
}

#[tokio::test]
async fn an_invalid_etag_and_an_unknown_store_are_invalid_argument() {
    bounded(TEST_BOUND, async {
        let sidecar = SidecarDouble::start(SidecarConfig::default()).await;
        let mut client = client(&sidecar).await;

        let err = client
            .save_state(save_request(
                sidecar.public_store(),
                "k",
                b"v",
                Some("not-a-number"),
                FIRST,
            ))
            .await
            .expect_err("ETags are integers");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("etag"), "{err:?}");

        let err = client
            .get_state(get_request("no-such-store", "k"))
            .await
            .expect_err("unknown store");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("no-such-store"), "{err:?}");
        assert!(!err.message().contains("etag"), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn state_lands_in_redis_in_dapr_layout_under_each_component_prefix() {
    bounded(TEST_BOUND, async {
        let sidecar =
            SidecarDouble::start(SidecarConfig::default().with_private_key_prefix("Plugins")).await;
        let mut client = client(&sidecar).await;
        let redis = sidecar.redis().expect("the double started its own redis");

        client
            .save_state(save_request(
                sidecar.public_store(),
                "plugin_route_a",
                b"{\"status\":\"ACTIVE\"}",
                None,
                LAST,
            ))
            .await
            .expect("save public");
        client
            .save_state(save_request(
                sidecar.private_store(),
                "all_registered_plugin",
                b"{\"a\":1}",
                Some("-1"),
                FIRST,
            ))
            .await
            .expect("save private");

        // Public: the bare key. Private: the prefix, lower-cased as Dapr does.
        assert_eq!(sidecar.private_key_prefix(), "plugins");
        assert_eq!(
            redis.hgetall("plugin_route_a"),
            vec![
                ("data".to_string(), b"{\"status\":\"ACTIVE\"}".to_vec()),
                ("version".to_string(), b"1".to_vec()),
            ]
        );
        assert_eq!(
            redis.hgetall("plugins||all_registered_plugin"),
            vec![
                ("data".to_string(), b"{\"a\":1}".to_vec()),
                ("first-write".to_string(), b"0".to_vec()),
                ("version".to_string(), b"1".to_vec()),
            ]
        );
        assert!(redis.hgetall("all_registered_plugin").is_empty());
        assert_eq!(
            sidecar.redis_key(StoreKind::Private, "scrape_state"),
            "plugins||scrape_state"
        );
    })
    .await;
}

#[tokio::test]
async fn missing_keys_read_empty_and_a_ttl_is_set_but_not_reported() {
    bounded(TEST_BOUND, async {
        let sidecar = SidecarDouble::start(SidecarConfig::default()).await;
        let mut client = client(&sidecar).await;
        let store = sidecar.private_store().to_string();

        let missing = client
            .get_state(get_request(&store, "nothing"))
            .await
            .expect("a missing key is not an error")
            .into_inner();
        assert!(missing.data.is_empty() && missing.etag.is_empty());
        assert!(missing.metadata.is_empty());

        let mut request = save_request(&store, "scrape_state", b"lease", Some("-1"), FIRST);
        request.states[0]
            .metadata
            .insert("ttlInSeconds".into(), "100".into());
        client.save_state(request).await.expect("save with TTL");
        client
            .save_state(save_request(&store, "no_ttl", b"x", None, LAST))
            .await
            .expect("save without TTL");

        let got = client
            .get_state(get_request(&store, "scrape_state"))
            .await
            .expect("get")
            .into_inner();
        // As real daprd on state.redis: the TTL is set, but never reported.
        assert!(
            !got.metadata.contains_key("ttlExpireTime"),
            "{:?}",
            got.metadata
        );
        let ttl = sidecar
            .redis()
            .expect("own redis")
            .query::<i64>(redis::cmd("TTL").arg("plugins||scrape_state"));
        assert!((90..=100).contains(&ttl), "{ttl}");

        let no_ttl = client
            .get_state(get_request(&store, "no_ttl"))
            .await
            .expect("get")
            .into_inner();
        assert!(!no_ttl.metadata.contains_key("ttlExpireTime"));

        let bulk = client
            .get_bulk_state(GetBulkStateRequest {
                store_name: store.clone(),
                keys: vec!["no_ttl".into(), "nothing".into(), "scrape_state".into()],
                ..Default::default()
            })
            .await
            .expect("bulk")
            .into_inner();
        let keys: Vec<_> = bulk.items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["no_ttl", "nothing", "scrape_state"]);
        assert_eq!(bulk.items[0].data, b"x");
        assert!(bulk.items[1].data.is_empty() && bulk.items[1].etag.is_empty());
        assert_eq!(bulk.items[2].etag, "1");
        assert!(bulk.items.iter().all(|i| i.error.is_empty()));
    })
    .await;
}

#[tokio::test]
async fn service_invocation_passes_status_and_body_through() {
    bounded(TEST_BOUND, async {
        let app = start_app().await;
        let sidecar =
            SidecarDouble::start(SidecarConfig::default().with_invoke_base(&app.base)).await;
        let http = http();

        let ok = http
            .get(format!(
                "{}/v1.0/invoke/a/method/v1/status",
                sidecar.http_endpoint()
            ))
            .send()
            .await
            .expect("invoke a");
        assert_eq!(ok.status().as_u16(), 200);
        assert_eq!(
            ok.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        assert_eq!(
            ok.text().await.expect("body"),
            r#"{"res":{"ret":0,"msg":"ok"},"status":"ACTIVE"}"#
        );

        let down = http
            .get(format!(
                "{}/v1.0/invoke/b/method/v1/status",
                sidecar.http_endpoint()
            ))
            .send()
            .await
            .expect("invoke b");
        assert_eq!(down.status().as_u16(), 503);
        assert_eq!(down.text().await.expect("body"), "plugin b is down");

        // A path the app does not serve: the app's own 404, not a sidecar error.
        let missing = http
            .get(format!(
                "{}/v1.0/invoke/c/method/v1/status",
                sidecar.http_endpoint()
            ))
            .send()
            .await
            .expect("invoke c");
        assert_eq!(missing.status().as_u16(), 404);

        assert_eq!(sidecar.calls("invoke"), 3);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_app_gets_dapr_500_with_err_direct_invoke() {
    bounded(TEST_BOUND, async {
        let port = free_port();
        let sidecar = SidecarDouble::start(
            SidecarConfig::default().with_invoke_base(&format!("http://127.0.0.1:{port}")),
        )
        .await;
        let response = http()
            .get(format!(
                "{}/v1.0/invoke/gone/method/v1/status",
                sidecar.http_endpoint()
            ))
            .send()
            .await
            .expect("the sidecar answers even when the app does not");
        assert_eq!(response.status().as_u16(), 500);
        let body: serde_json::Value =
            serde_json::from_str(&response.text().await.expect("body")).expect("JSON body");
        assert_eq!(body["errorCode"], "ERR_DIRECT_INVOKE", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("gone"),
            "{body}"
        );

        // An app id the target cannot resolve is the same sidecar error.
        let sidecar =
            SidecarDouble::start(SidecarConfig::default().with_invoke_target(|_, _| None)).await;
        let response = http()
            .get(format!(
                "{}/v1.0/invoke/nobody/method/v1/status",
                sidecar.http_endpoint()
            ))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status().as_u16(), 500);
        assert!(response
            .text()
            .await
            .expect("body")
            .contains("ERR_DIRECT_INVOKE"));
    })
    .await;
}

async fn health(sidecar: &SidecarDouble) -> u16 {
    http()
        .get(format!("{}/v1.0/healthz/outbound", sidecar.http_endpoint()))
        .send()
        .await
        .expect("health answers")
        .status()
        .as_u16()
}

#[tokio::test]
async fn readiness_can_be_delayed_and_toggled() {
    bounded(TEST_BOUND, async {
        let sidecar =
            SidecarDouble::start(SidecarConfig::default().ready_after(Duration::from_millis(700)))
                .await;
        assert_eq!(health(&sidecar).await, 500);
        let mut client = client(&sidecar).await;
        let err = client
            .get_state(get_request(sidecar.public_store(), "k"))
            .await
            .expect_err("not ready yet");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");

        let started = Instant::now();
        while health(&sidecar).await != 204 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client
            .get_state(get_request(sidecar.public_store(), "k"))
            .await
            .expect("ready now");

        sidecar.set_ready(false);
        assert_eq!(health(&sidecar).await, 500);
        assert!(!sidecar.is_ready());
        sidecar.set_ready(true);
        assert_eq!(health(&sidecar).await, 204);
        sidecar.set_ready_after(Duration::from_secs(3600));
        assert_eq!(health(&sidecar).await, 500);
        assert!(sidecar.calls("healthz") >= 4);
    })
    .await;
}

#[tokio::test]
async fn the_api_token_is_enforced_on_both_surfaces_except_health() {
    bounded(TEST_BOUND, async {
        let app = start_app().await;
        let sidecar = SidecarDouble::start(
            SidecarConfig::default()
                .with_token("right-token")
                .with_invoke_base(&app.base),
        )
        .await;
        let mut client = client(&sidecar).await;
        let store = sidecar.public_store().to_string();

        for token in [None, Some("wrong-token")] {
            let err = client
                .get_state(with_token(get_request(&store, "k"), token))
                .await
                .expect_err("rejected");
            assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
            assert!(!err.message().contains("right-token"), "{err:?}");
            let err = client
                .save_state(with_token(
                    save_request(&store, "k", b"v", None, LAST),
                    token,
                ))
                .await
                .expect_err("rejected");
            assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        }
        // Nothing was written by the rejected calls.
        let redis = sidecar.redis().expect("own redis");
        assert!(redis.hgetall("k").is_empty());

        client
            .save_state(with_token(
                save_request(&store, "k", b"v", None, LAST),
                Some("right-token"),
            ))
            .await
            .expect("the right token is accepted");
        assert_eq!(redis.hgetall("k").len(), 2);

        let http = http();
        let url = format!("{}/v1.0/invoke/a/method/v1/status", sidecar.http_endpoint());
        let none = http.get(&url).send().await.expect("answer");
        assert_eq!(none.status().as_u16(), 401);
        assert_eq!(none.text().await.expect("body").trim(), "invalid api token");
        let wrong = http
            .get(&url)
            .header("dapr-api-token", "wrong-token")
            .send()
            .await
            .expect("answer");
        assert_eq!(wrong.status().as_u16(), 401);
        let right = http
            .get(&url)
            .header("dapr-api-token", "right-token")
            .send()
            .await
            .expect("answer");
        assert_eq!(right.status().as_u16(), 200);
        // The sidecar does not pass the caller's token on to the app.
        assert!(!app.saw_token.load(std::sync::atomic::Ordering::SeqCst));

        // Health checks need no token.
        assert_eq!(health(&sidecar).await, 204);
        assert!(sidecar.saw_token());
        assert_eq!(sidecar.calls("invoke"), 1);
        assert_eq!(sidecar.calls("unauthorized"), 2);
    })
    .await;
}

#[tokio::test]
async fn without_a_configured_token_every_call_passes_and_none_is_recorded() {
    bounded(TEST_BOUND, async {
        let sidecar = SidecarDouble::start(SidecarConfig::default()).await;
        let mut client = client(&sidecar).await;
        client
            .get_state(get_request(sidecar.public_store(), "k"))
            .await
            .expect("no token needed");
        assert_eq!(health(&sidecar).await, 204);
        assert!(!sidecar.saw_token());
        client
            .get_state(with_token(
                get_request(sidecar.public_store(), "k"),
                Some("anything"),
            ))
            .await
            .expect("a token is ignored when none is configured");
        assert!(sidecar.saw_token());
    })
    .await;
}

#[tokio::test]
async fn a_dropped_double_stops_answering_even_on_open_connections() {
    bounded(TEST_BOUND, async {
        let app = start_app().await;
        let sidecar =
            SidecarDouble::start(SidecarConfig::default().with_invoke_base(&app.base)).await;
        let mut client = client(&sidecar).await;
        let http = http();
        let invoke = format!("{}/v1.0/invoke/a/method/v1/status", sidecar.http_endpoint());
        client
            .get_state(get_request(sidecar.public_store(), "k"))
            .await
            .expect("served");
        assert_eq!(
            http.get(&invoke).send().await.expect("served").status(),
            200
        );

        drop(sidecar);

        // The same (kept-alive) connections now fail, and new ones are refused.
        let err = client
            .get_state(get_request("keel-public-store", "k"))
            .await
            .expect_err("the sidecar is gone");
        assert!(
            matches!(err.code(), Code::Unavailable | Code::Unknown),
            "{err:?}"
        );
        assert!(http.get(&invoke).send().await.is_err());
    })
    .await;
}
