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
use support::binary::{dapr_backend, keel, raw_put, redis_backend};
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

/// Two plugins: `up` (healthy) and `down` (404), both routed ACTIVE.
fn seed(redis: &RedisServer, sim: &PluginSim) {
    sim.set("up", Behavior::v0("ACTIVE"));
    sim.set("down", Behavior::Unknown404);
    raw_put(
        redis,
        "plugins||all_registered_plugin",
        r#"{"up":"true","down":"true"}"#,
    );
    for id in ["up", "down"] {
        raw_put(
            redis,
            &format!("plugin_route_{id}"),
            r#"{"status":"ACTIVE"}"#,
        );
    }
}

/// A fresh password and token, a Redis that requires the password, and the two plugins
/// of [`seed`].
fn setup() -> (String, String, RedisServer, PluginSim) {
    let password = secret("pw");
    let redis = RedisServer::builder().with_password(&password).start();
    let sim = PluginSim::start().expect("simulator");
    seed(&redis, &sim);
    (password, secret("tok"), redis, sim)
}

/// The environment of every run: `token` as `DAPR_API_TOKEN`, every log level on.
fn run_env(token: &str) -> [(&'static str, &str); 2] {
    [("DAPR_API_TOKEN", token), ("SCRAPER_LOG", "trace")]
}

/// A sidecar double on `redis` that requires `token` and invokes `sim`.
async fn sidecar(redis: &RedisServer, token: &str, sim: &PluginSim) -> SidecarDouble {
    SidecarDouble::start(
        SidecarConfig::default()
            .with_redis_url(&redis.url())
            .with_token(token)
            .with_invoke_base(&sim.origin()),
    )
    .await
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
fn label(args: &[String]) -> String {
    args.iter()
        .map(|a| if a.contains('@') { "<url>" } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a one-shot command, records its output and returns its exit code.
fn one_shot(printed: &mut Printed, args: &[String], env: &[(&str, &str)]) -> Option<i32> {
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

/// One one-shot run: its arguments, its environment and the exit code it must end with.
type Run<'a> = (Vec<String>, &'a [(&'a str, &'a str)], i32);

/// `parts` joined into one command line.
fn argv(parts: &[&[&str]]) -> Vec<String> {
    parts
        .iter()
        .flat_map(|p| p.iter())
        .map(|a| a.to_string())
        .collect()
}

/// `run` with `store`'s options, ticking every second, its server on a free port.
fn run_every_second(store: &[&str]) -> Vec<String> {
    argv(&[
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--schedule",
            "* * * * * *",
        ],
        store,
    ])
}

/// Runs each one-shot command, recording its output, and checks its exit code.
fn one_shots(printed: &mut Printed, runs: &[Run]) {
    for (args, env, code) in runs {
        let got = one_shot(printed, args, env);
        assert_eq!(got, Some(*code), "{}: {}", label(args), printed.text);
    }
}

/// Runs `run` until an event matching `until`, scrapes `/metrics`, stops it with SIGTERM
/// and records everything it printed (the metrics included).
fn run_briefly(
    printed: &mut Printed,
    args: &[String],
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
    let (password, token, redis, sim) = setup();
    let url = redis.url();
    let template = sim.url_template();
    // The token is configured but has no sidecar to go to on this path.
    let common = ["--backend", "redis", "--status-url", &template];
    let env = run_env(&token);
    let env_url = [
        ("DAPR_API_TOKEN", token.as_str()),
        ("SCRAPER_LOG", "trace"),
        ("REDIS_URL", url.as_str()),
    ];
    let flag = ["--redis-url", url.as_str()];
    let mut printed = Printed::default();

    // Each command with the URL as a flag and as `REDIS_URL`.
    let mut runs: Vec<Run> = Vec::new();
    for cmd in [&["once"][..], &["routes"], &["config"]] {
        runs.push((argv(&[cmd, &common, &flag]), &env, 0));
        runs.push((argv(&[cmd, &common]), &env_url, 0));
    }
    runs.push((argv(&[&["routes"], &common, &["--json"]]), &env_url, 0));
    runs.push((argv(&[&["routes"], &common, &["--json"], &flag]), &env, 0));
    runs.push((argv(&[&["--help"]]), &env_url, 0));
    runs.push((argv(&[&["run", "--help"]]), &env_url, 0));
    one_shots(&mut printed, &runs);

    let args = run_every_second(&common);
    run_briefly(&mut printed, &args, &env_url, |e| is(e, "tick_completed"));

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
    let (password, token, redis, sim) = setup();
    let double = sidecar(&redis, &token, &sim).await;
    let grpc = double.grpc_endpoint();
    let http = double.http_endpoint();
    let common = dapr_backend(&grpc, &http);
    let env = run_env(&token);
    let mut printed = Printed::default();

    let runs: Vec<Run> = vec![
        (argv(&[&["once"], &common]), &env, 0),
        (argv(&[&["routes"], &common, &["--json"]]), &env, 0),
        (argv(&[&["config"], &common]), &env, 0),
    ];
    one_shots(&mut printed, &runs);
    let args = run_every_second(&common);
    run_briefly(&mut printed, &args, &env, |e| is(e, "tick_completed"));

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
    let (password, token, redis, sim) = setup();
    let wrong_password = secret("wrongpw");
    let wrong_token = secret("wrongtok");
    let template = sim.url_template();
    let env = run_env(&token);
    let mut printed = Printed::default();

    // The sidecar that will refuse the token.
    let double = sidecar(&redis, &token, &sim).await;
    let (grpc, http) = (double.grpc_endpoint(), double.http_endpoint());
    let wrong_env = run_env(&wrong_token);
    let dapr = dapr_backend(&grpc, &http);
    // No sidecar at all: start-up gives up after --sidecar-wait.
    let (h, g) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let no_sidecar = [&dapr_backend(&g, &h)[..], &["--sidecar-wait", "1s"]].concat();

    // Redis refuses the password, or is not there at all.
    let wrong = format!("redis://:{wrong_password}@127.0.0.1:{}/", redis.port());
    let closed = format!("redis://:{password}@127.0.0.1:{}/", free_port());
    let stores = [&wrong, &closed].map(|url| redis_backend(url, &template));
    let mut runs: Vec<Run> = Vec::new();
    for store in &stores {
        for cmd in [&["once"][..], &["routes", "--json"]] {
            runs.push((argv(&[cmd, store]), &env, 1));
        }
    }
    // Not a Redis URL: refused at start, exit 2, the URL named without its password.
    let http_url = format!("http://:{password}@127.0.0.1:6379/");
    for cmd in ["config", "once"] {
        runs.push((
            argv(&[&[cmd], &["--backend", "redis", "--redis-url", &http_url]]),
            &env,
            2,
        ));
    }
    // The sidecar refuses the token.
    for cmd in ["once", "routes"] {
        runs.push((argv(&[&[cmd], &dapr]), &wrong_env, 1));
    }
    runs.push((argv(&[&["once"], &no_sidecar]), &env, 1));
    one_shots(&mut printed, &runs);

    for store in &stores {
        let a = argv(&[&["run"], store, &["--listen", "127.0.0.1:0"]]);
        run_briefly(&mut printed, &a, &env, |e| is(e, "store_error"));
    }
    let args = run_every_second(&dapr);
    run_briefly(&mut printed, &args, &wrong_env, |e| {
        is(e, "tick_failed") || is(e, "store_error")
    });
    assert!(double.saw_token(), "the wrong token reached the sidecar");

    printed.assert_free_of(&[&password, &wrong_password, &token, &wrong_token]);
}
