//! Secrets in the one-shot commands: `config`, `once` and `routes`, on their success and
//! on their error paths (a wrong Redis password, an unreachable Redis, a wrong Dapr token),
//! never print the Redis password or the Dapr API token, right or wrong. The replicas of
//! every other scenario are checked the same way at their end.

use std::time::Duration;

use crate::bounded;
use crate::figures::Scenario;
use crate::harness::{run_once, DAPR_TOKEN, REDIS_PASSWORD};
use crate::support::redis_server::free_port;
use crate::support::sidecar::{SidecarConfig, SidecarDouble};
use crate::world::{ids, World};

const WRONG_PASSWORD: &str = "rel-wrong-pw-71aa0c";
const WRONG_TOKEN: &str = "rel-wrong-token-3fd0b2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_commands_never_print_a_secret() {
    let mut sc = Scenario::start("s-secrets-in-one-shot-commands");
    bounded(Duration::from_secs(90), async {
        let w = World::start(false).await;
        let plugins = ids("s", 3);
        w.seed(&plugins, "ACTIVE").await;
        let j = &*w.journal;
        let status_url = w.sim.url_template();
        let url = w.redis.url();
        let redis_env = |url: &str, token: &str| -> Vec<(String, String)> {
            vec![
                ("SCRAPER_BACKEND".into(), "redis".into()),
                ("REDIS_URL".into(), url.into()),
                ("SCRAPER_STATUS_URL".into(), status_url.clone()),
                ("DAPR_API_TOKEN".into(), token.into()),
            ]
        };
        let run = |who: &str, args: &[&str], env: &[(String, String)]| {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            tokio::task::block_in_place(|| run_once(j, who, args, &env))
        };
        let mut runs = 0;

        let (code, out, err) = run("config", &["config"], &redis_env(&url, DAPR_TOKEN));
        runs += 1;
        assert_eq!(code, Some(0), "config: {out}{err}");
        assert!(
            out.contains(&format!("127.0.0.1:{}", w.redis.port())),
            "config shows the Redis host: {out}"
        );

        let (code, out, err) = run("once", &["once"], &redis_env(&url, DAPR_TOKEN));
        runs += 1;
        assert_eq!(code, Some(0), "once: {out}{err}");

        let (code, out, err) = run(
            "routes",
            &["routes", "--json"],
            &redis_env(&url, DAPR_TOKEN),
        );
        runs += 1;
        assert_eq!(code, Some(0), "routes: {out}{err}");
        let rows: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("routes --json: {e}: {out}"));
        assert_eq!(rows.as_array().map(Vec::len), Some(plugins.len()), "{out}");

        // A wrong password: exit 1, naming the host, printing neither password.
        let wrong = url.replace(REDIS_PASSWORD, WRONG_PASSWORD);
        let (code, out, err) = run(
            "once-wrong-password",
            &["once"],
            &redis_env(&wrong, DAPR_TOKEN),
        );
        runs += 1;
        assert_eq!(code, Some(1), "once with a wrong password: {out}{err}");
        assert!(
            err.contains(&w.redis.endpoint()),
            "the error names the Redis host and port: {err}"
        );

        // Nothing listening: exit 1, naming the host.
        let port = free_port();
        let closed = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/");
        let (code, out, err) = run(
            "once-unreachable",
            &["once"],
            &redis_env(&closed, DAPR_TOKEN),
        );
        runs += 1;
        assert_eq!(code, Some(1), "once against a closed port: {out}{err}");
        assert!(
            err.contains(&format!("127.0.0.1:{port}")),
            "the error names the Redis host and port: {err}"
        );

        // Through the sidecar double, with the right token and with a wrong one.
        let sidecar = SidecarDouble::start(
            SidecarConfig::default()
                .with_token(DAPR_TOKEN)
                .with_redis_url(&url)
                .with_invoke_base(&w.sim.origin()),
        )
        .await;
        let dapr_env = |token: &str| -> Vec<(String, String)> {
            vec![
                ("SCRAPER_BACKEND".into(), "dapr".into()),
                ("DAPR_GRPC_ENDPOINT".into(), sidecar.grpc_endpoint()),
                ("DAPR_HTTP_ENDPOINT".into(), sidecar.http_endpoint()),
                ("DAPR_API_TOKEN".into(), token.into()),
                ("SCRAPER_SIDECAR_WAIT".into(), "5s".into()),
            ]
        };
        let (code, out, err) = run("config-dapr", &["config"], &dapr_env(DAPR_TOKEN));
        runs += 1;
        assert_eq!(code, Some(0), "config (dapr): {out}{err}");
        let (code, out, err) = run("once-dapr", &["once"], &dapr_env(DAPR_TOKEN));
        runs += 1;
        assert_eq!(code, Some(0), "once through the sidecar: {out}{err}");
        let (code, out, err) = run("once-dapr-wrong-token", &["once"], &dapr_env(WRONG_TOKEN));
        runs += 1;
        assert_eq!(code, Some(1), "once with a wrong token: {out}{err}");
        assert!(
            err.to_lowercase().contains("token"),
            "the failure names the token as the cause: {err}"
        );

        sc.figure("one-shot runs", runs);
        sc.figure(
            "bytes scanned for secrets",
            j.assert_no_secrets(&[REDIS_PASSWORD, DAPR_TOKEN, WRONG_PASSWORD, WRONG_TOKEN]),
        );
        drop(sidecar);
    })
    .await;
    sc.pass();
}
