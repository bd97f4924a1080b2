//! No secret (the Redis password, `DAPR_API_TOKEN`) appears in anything the process
//! prints: every command (`once`, `run`, `routes`, `config`, `--help`), on the Redis and the
//! Dapr paths, succeeding and failing (wrong password, wrong token, unreachable store or
//! sidecar, invalid URL), with every log level on (`SCRAPER_LOG=trace`, so the libraries'
//! own logs are searched too). Stdout and stderr are searched whole.
//!
//! Each test also proves the secrets were really in use (the sidecar double and the
//! simulated plugin saw the token, Redis required the password), so an empty search cannot
//! pass by accident.

#[path = "support/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;
#[path = "support/sidecar.rs"]
#[allow(dead_code)]
mod sidecar;

use std::time::Duration;

use keel_scraper::sim::{Behavior, PluginSim};
use redis_server::{free_port, RedisServer};
use serde_json::Value;
use sidecar::{SidecarConfig, SidecarDouble};

use harness::{http_get, is, run_to_end, Worker};

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
    let out = run_to_end(args, env, Duration::from_secs(20));
    printed.add(&label(args), out.all_output());
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
    printed.add(&label(args), format!("{}\n{metrics}", w.all_output()));
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

/// Running the real binary: a clean environment, output collected line by line, killed
/// on drop.
mod harness {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use serde_json::Value;

    pub fn is(e: &Value, name: &str) -> bool {
        e["event"] == name
    }

    type Lines = Arc<Mutex<Vec<String>>>;

    fn collect(stream: impl Read + Send + 'static) -> (Lines, JoinHandle<()>) {
        let lines: Lines = Arc::default();
        let sink = lines.clone();
        let handle = std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                buf.clear();
            }
        });
        (lines, handle)
    }

    fn snapshot(lines: &Lines) -> Vec<String> {
        lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn parse_events(lines: &[String]) -> Vec<Value> {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// A running `keel-scraper`.
    pub struct Worker {
        child: Child,
        stdout: Lines,
        stderr: Lines,
        readers: Vec<JoinHandle<()>>,
        exited: Option<ExitStatus>,
    }

    impl Worker {
        /// Starts the binary with `args` and only the environment given (nothing from the
        /// shell that runs the tests leaks in).
        pub fn spawn<S: AsRef<str>>(args: &[S], env: &[(&str, &str)]) -> Worker {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel-scraper"));
            cmd.env_clear()
                .args(args.iter().map(|a| a.as_ref()))
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("start keel-scraper");
            let (stdout, out_reader) = collect(child.stdout.take().expect("piped stdout"));
            let (stderr, err_reader) = collect(child.stderr.take().expect("piped stderr"));
            Worker {
                child,
                stdout,
                stderr,
                readers: vec![out_reader, err_reader],
                exited: None,
            }
        }

        pub fn stdout_lines(&self) -> Vec<String> {
            snapshot(&self.stdout)
        }

        pub fn events(&self) -> Vec<Value> {
            parse_events(&self.stdout_lines())
        }

        pub fn dump(&self) -> String {
            format!(
                "\n--- stdout ---\n{}\n--- stderr ---\n{}",
                snapshot(&self.stdout).join("\n"),
                snapshot(&self.stderr).join("\n")
            )
        }

        /// Everything printed so far, stdout then stderr.
        pub fn all_output(&self) -> String {
            self.dump()
        }

        /// Polls the events until `f` returns `Some`; panics with the output after `timeout`.
        pub fn wait_until<T>(
            &self,
            timeout: Duration,
            what: &str,
            f: impl Fn(&[Value]) -> Option<T>,
        ) -> T {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(v) = f(&self.events()) {
                    return v;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out after {timeout:?} waiting for {what}{}",
                    self.dump()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// The first event matching `pred`.
        pub fn wait_event(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
            self.wait_until(timeout, "an event", |evs| {
                evs.iter().find(|e| pred(e)).cloned()
            })
        }

        /// The metrics and health server's address, from the `listening` event.
        pub fn listening_address(&self) -> String {
            let e = self.wait_event(Duration::from_secs(10), |e| is(e, "listening"));
            e["address"]
                .as_str()
                .expect("listening names its address")
                .to_string()
        }

        /// Sends `signal` to the process, which must not have been reaped yet (so its pid
        /// cannot belong to another process).
        pub fn signal(&self, signal: libc::c_int) {
            assert!(
                self.exited.is_none(),
                "the process already exited{}",
                self.dump()
            );
            // SAFETY: kill(2) on our own child's pid; the child has not been reaped.
            let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
            assert_eq!(rc, 0, "kill({signal}) failed");
        }

        /// Waits for the process to exit, then for its output to be read to the end.
        pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
            let deadline = Instant::now() + timeout;
            let status = loop {
                if let Some(s) = self.exited {
                    break s;
                }
                if let Ok(Some(s)) = self.child.try_wait() {
                    self.exited = Some(s);
                    break s;
                }
                assert!(
                    Instant::now() < deadline,
                    "the process did not exit within {timeout:?}{}",
                    self.dump()
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            for r in self.readers.drain(..) {
                let _ = r.join();
            }
            status
        }
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            if self.exited.is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    /// A finished one-shot command.
    pub struct Finished {
        pub code: Option<i32>,
        pub stdout: Vec<String>,
        pub stderr: Vec<String>,
    }

    impl Finished {
        /// Everything printed, stdout then stderr.
        pub fn all_output(&self) -> String {
            format!(
                "--- stdout ---\n{}\n--- stderr ---\n{}",
                self.stdout.join("\n"),
                self.stderr.join("\n")
            )
        }
    }

    /// Runs a command to its end (bounded by `timeout`).
    pub fn run_to_end(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Finished {
        let mut w = Worker::spawn(args, env);
        let status = w.wait_exit(timeout);
        Finished {
            code: status.code(),
            stdout: snapshot(&w.stdout),
            stderr: snapshot(&w.stderr),
        }
    }

    /// `GET path` over HTTP/1.0 (the server closes the connection after answering): the
    /// status code and the body. Bounded by connect and read timeouts.
    pub fn http_get(address: &str, path: &str) -> (u16, String) {
        let addr: SocketAddr = address.parse().expect("a socket address");
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send the request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("read the answer to GET {path}: {e}"));
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {response}"));
        (code, body.to_string())
    }
}
