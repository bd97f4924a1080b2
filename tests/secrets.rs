//! No secret (the Redis password, `DAPR_API_TOKEN`) appears in anything the process
//! prints: every command (`once`, `run`, `routes`, `config`, `--help`), on the Redis and the
//! Dapr paths, succeeding and failing (wrong password, wrong token, unreachable store or
//! sidecar, invalid URL), with every log level on (`SCRAPER_LOG=trace`, so the libraries'
//! own logs are searched too). Stdout and stderr are searched whole.
//!
//! Each test also proves the secrets were really in use (the sidecar double and the
//! simulated plugin saw the token, Redis required the password), so an empty search cannot
//! pass by accident.

mod support;

use std::time::Duration;

use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::keel;
use support::live::{http_get, is, Worker};
use support::redis_server::{free_port, RedisServer};
use support::sidecar::{SidecarConfig, SidecarDouble};

/// A secret no log line could contain by chance.
fn secret(prefix: &str) -> String {
    let tail: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(20)
        .collect();
    format!("{prefix}{tail}")
}

/// Everything the processes printed, searched for secrets at the end of a test.
#[derive(Default)]
struct Printed {
    text: String,
    runs: usize,
}

impl Printed {
    fn add(&mut self, what: &str, output: String) {
        self.text
            .push_str(&format!("\n===== {what} =====\n{output}"));
        self.runs += 1;
    }

    fn assert_free_of(&self, secrets: &[&str]) {
        for s in secrets {
            if let Some(at) = self.text.find(s) {
                let from = self.text[..at].rfind("=====").unwrap_or(0);
                panic!(
                    "a secret was printed:\n{}",
                    &self.text[from..(at + s.len() + 200).min(self.text.len())]
                );
            }
        }
        // The search covered real output, libraries' trace logs included.
        assert!(
            self.text.lines().count() > 10 * self.runs && self.text.contains(r#""level":"TRACE""#),
            "too little output to search ({} lines from {} runs)",
            self.text.lines().count(),
            self.runs
        );
    }
}

/// Writes `key` in Dapr's `state.redis` layout (a HASH with `data` and `version`).
fn put(redis: &RedisServer, key: &str, data: &str) {
    redis.query::<()>(
        redis::cmd("HSET")
            .arg(key)
            .arg("data")
            .arg(data)
            .arg("version")
            .arg(1),
    );
}

/// Two plugins: `up` (healthy) and `down` (404), both routed ACTIVE.
fn seed(redis: &RedisServer, sim: &PluginSim) {
    sim.set("up", Behavior::v0("ACTIVE"));
    sim.set("down", Behavior::Unknown404);
    put(
        redis,
        "plugins||all_registered_plugin",
        r#"{"up":"true","down":"true"}"#,
    );
    for id in ["up", "down"] {
        put(
            redis,
            &format!("plugin_route_{id}"),
            r#"{"status":"ACTIVE"}"#,
        );
    }
}

/// Whether the server refuses a client that does not authenticate.
fn redis_refuses_without_the_password(redis: &RedisServer) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port())) else {
        return false;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(5)) else {
        return true;
    };
    redis::cmd("GET")
        .arg("x")
        .query::<Option<String>>(&mut conn)
        .is_err()
}

/// A run's arguments for the search report, URLs (which may carry a password) left out.
fn label(args: &[&str]) -> String {
    args.iter()
        .map(|a| if a.contains('@') { "<url>" } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a one-shot command, records its output and returns its exit code.
fn one_shot(printed: &mut Printed, args: &[&str], env: &[(&str, &str)]) -> Option<i32> {
    let out = keel()
        .args(args)
        .envs(env)
        .timeout(Duration::from_secs(20))
        .run();
    assert!(!out.timed_out, "{} overstayed", label(args));
    // Not `describe()`: the command line may carry a password.
    let lines = |text: &str| text.lines().collect::<Vec<_>>().join("\n");
    printed.add(
        &label(args),
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            lines(&out.stdout),
            lines(&out.stderr)
        ),
    );
    out.code
}

/// Runs `run` until an event matching `until`, scrapes `/metrics`, stops it with SIGTERM
/// and records everything it printed (the metrics included).
fn run_briefly(
    printed: &mut Printed,
    args: &[&str],
    env: &[(&str, &str)],
    until: impl Fn(&Value) -> bool,
) {
    let mut w = Worker::spawn(args, env);
    let address = w.listening_address();
    w.wait_event(Duration::from_secs(15), until);
    let (_, metrics) = http_get(&address, "/metrics");
    w.signal(libc::SIGTERM);
    let status = w.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", w.dump());
    printed.add(&label(args), format!("{}\n{metrics}", w.dump()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_printed_on_the_redis_path() {
    let password = secret("pw");
    let token = secret("tok");
    let redis = RedisServer::builder().with_password(&password).start();
    let sim = PluginSim::start().expect("simulator");
    seed(&redis, &sim);
    let url = redis.url();
    let template = sim.url_template();
    // The token is configured but has no sidecar to go to on this path.
    let common = ["--backend", "redis", "--status-url", &template];
    let env = [("DAPR_API_TOKEN", token.as_str()), ("SCRAPER_LOG", "trace")];
    let env_url = [
        ("DAPR_API_TOKEN", token.as_str()),
        ("SCRAPER_LOG", "trace"),
        ("REDIS_URL", url.as_str()),
    ];
    let with = |cmd: &'static str, more: &[&'static str]| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend(common.iter().map(|s| s.to_string()));
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let mut printed = Printed::default();

    let args = with("once", &[]);
    let mut flag_args: Vec<&str> = args.iter().map(String::as_str).collect();
    flag_args.extend(["--redis-url", &url]);
    assert_eq!(
        one_shot(&mut printed, &flag_args, &env),
        Some(0),
        "{}",
        printed.text
    );
    let env_args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(
        one_shot(&mut printed, &env_args, &env_url),
        Some(0),
        "{}",
        printed.text
    );

    let args = with(
        "run",
        &["--listen", "127.0.0.1:0", "--schedule", "* * * * * *"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_briefly(&mut printed, &args, &env_url, |e| is(e, "tick_completed"));

    for cmd in [
        with("routes", &[]),
        with("routes", &["--json"]),
        with("config", &[]),
    ] {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        assert_eq!(
            one_shot(&mut printed, &args, &env_url),
            Some(0),
            "{}",
            printed.text
        );
        let mut flag_args = args.clone();
        flag_args.extend(["--redis-url", &url]);
        assert_eq!(
            one_shot(&mut printed, &flag_args, &env),
            Some(0),
            "{}",
            printed.text
        );
    }
    for help in [&["--help"][..], &["run", "--help"][..]] {
        assert_eq!(
            one_shot(&mut printed, help, &env_url),
            Some(0),
            "{}",
            printed.text
        );
    }

    assert!(
        redis_refuses_without_the_password(&redis),
        "the password was really required"
    );
    assert!(
        printed.text.contains("[redacted]"),
        "config shows that secrets are set"
    );
    printed.assert_free_of(&[&password, &token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_printed_on_the_dapr_path() {
    let password = secret("pw");
    let token = secret("tok");
    let redis = RedisServer::builder().with_password(&password).start();
    let sim = PluginSim::start().expect("simulator");
    seed(&redis, &sim);
    let double = SidecarDouble::start(
        SidecarConfig::default()
            .with_redis_url(&redis.url())
            .with_token(&token)
            .with_invoke_base(&sim.origin()),
    )
    .await;
    let grpc = double.grpc_endpoint();
    let http = double.http_endpoint();
    let common = [
        "--backend",
        "dapr",
        "--dapr-grpc-endpoint",
        &grpc,
        "--dapr-http-endpoint",
        &http,
    ];
    let env = [("DAPR_API_TOKEN", token.as_str()), ("SCRAPER_LOG", "trace")];
    let args = |cmd: &'static str, more: &[&'static str]| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend(common.iter().map(|s| s.to_string()));
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let mut printed = Printed::default();

    for cmd in [
        args("once", &[]),
        args("routes", &["--json"]),
        args("config", &[]),
    ] {
        let a: Vec<&str> = cmd.iter().map(String::as_str).collect();
        assert_eq!(
            one_shot(&mut printed, &a, &env),
            Some(0),
            "{}",
            printed.text
        );
    }
    let a = args(
        "run",
        &["--listen", "127.0.0.1:0", "--schedule", "* * * * * *"],
    );
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run_briefly(&mut printed, &a, &env, |e| is(e, "tick_completed"));

    assert!(double.saw_token(), "the token was sent to the sidecar");
    assert!(
        double.calls("invoke") >= 2,
        "status calls went through the sidecar: {:?}",
        double.all_calls()
    );
    printed.assert_free_of(&[&password, &token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_printed_when_the_store_or_the_sidecar_refuses_or_is_unreachable() {
    let password = secret("pw");
    let wrong_password = secret("wrongpw");
    let token = secret("tok");
    let wrong_token = secret("wrongtok");
    let redis = RedisServer::builder().with_password(&password).start();
    let sim = PluginSim::start().expect("simulator");
    seed(&redis, &sim);
    let template = sim.url_template();
    let env = [("DAPR_API_TOKEN", token.as_str()), ("SCRAPER_LOG", "trace")];
    let mut printed = Printed::default();

    // Redis refuses the password, or is not there at all.
    let wrong = format!("redis://:{wrong_password}@127.0.0.1:{}/", redis.port());
    let closed = format!("redis://:{password}@127.0.0.1:{}/", free_port());
    for url in [&wrong, &closed] {
        for cmd in [&["once"][..], &["routes", "--json"][..]] {
            let mut a = cmd.to_vec();
            a.extend([
                "--backend",
                "redis",
                "--redis-url",
                url,
                "--status-url",
                &template,
            ]);
            assert_eq!(
                one_shot(&mut printed, &a, &env),
                Some(1),
                "{}",
                printed.text
            );
        }
        run_briefly(
            &mut printed,
            &[
                "run",
                "--backend",
                "redis",
                "--redis-url",
                url,
                "--status-url",
                &template,
                "--listen",
                "127.0.0.1:0",
            ],
            &env,
            |e| is(e, "store_error"),
        );
    }
    // Not a Redis URL: refused at start, exit 2, the URL named without its password.
    let http_url = format!("http://:{password}@127.0.0.1:6379/");
    let mut a = vec!["config", "--backend", "redis", "--redis-url", &http_url];
    assert_eq!(
        one_shot(&mut printed, &a, &env),
        Some(2),
        "{}",
        printed.text
    );
    a[0] = "once";
    assert_eq!(
        one_shot(&mut printed, &a, &env),
        Some(2),
        "{}",
        printed.text
    );

    // The sidecar refuses the token.
    let double = SidecarDouble::start(
        SidecarConfig::default()
            .with_redis_url(&redis.url())
            .with_token(&token)
            .with_invoke_base(&sim.origin()),
    )
    .await;
    let (grpc, http) = (double.grpc_endpoint(), double.http_endpoint());
    let wrong_env = [
        ("DAPR_API_TOKEN", wrong_token.as_str()),
        ("SCRAPER_LOG", "trace"),
    ];
    let dapr = [
        "--backend",
        "dapr",
        "--dapr-grpc-endpoint",
        &grpc,
        "--dapr-http-endpoint",
        &http,
    ];
    for cmd in [&["once"][..], &["routes"][..]] {
        let mut a = cmd.to_vec();
        a.extend(dapr);
        assert_eq!(
            one_shot(&mut printed, &a, &wrong_env),
            Some(1),
            "{}",
            printed.text
        );
    }
    let mut a = vec![
        "run",
        "--listen",
        "127.0.0.1:0",
        "--schedule",
        "* * * * * *",
    ];
    a.extend(dapr);
    run_briefly(&mut printed, &a, &wrong_env, |e| {
        is(e, "tick_failed") || is(e, "store_error")
    });
    assert!(double.saw_token(), "the wrong token reached the sidecar");

    // No sidecar at all: start-up gives up after --sidecar-wait.
    let (h, g) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let a = [
        "once",
        "--backend",
        "dapr",
        "--dapr-http-endpoint",
        &h,
        "--dapr-grpc-endpoint",
        &g,
        "--sidecar-wait",
        "1s",
    ];
    assert_eq!(
        one_shot(&mut printed, &a, &env),
        Some(1),
        "{}",
        printed.text
    );

    printed.assert_free_of(&[&password, &wrong_password, &token, &wrong_token]);
}
