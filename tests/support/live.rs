//! Driving a live `keel-scraper` process (`run`, or a `once` to be interfered with while it
//! works) and talking to it while it runs.
//!
//! * [`Worker`] starts the real binary as a [`Proc`] (only `PATH` and the environment
//!   given, stdout and stderr read line by line in background threads so the pipes never
//!   fill up and block it), lets a test wait, with a bound, for events or for its exit,
//!   sends it signals, and kills it when dropped, however the test ends.
//! * [`http_get`] asks its metrics and health server one question, bounded.
//!
//! Running a command to its end is [`super::binary::keel`]'s job; this module is for the
//! processes a test has to watch or act on while they run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use keel_test_support::process::{Proc, Spawn};
use serde_json::Value;

use keel_test_support::sim::PluginSim;

use super::binary::{redis_backend, Events, BIN};
use super::redis_server::RedisServer;

/// `run` on the `redis` backend against `redis` and the simulator, ticking every second,
/// without retries, on a free port; `extra` appended.
pub fn run_args(redis: &RedisServer, sim: &PluginSim, extra: &[&str]) -> Vec<String> {
    let (url, template) = (redis.url(), sim.url_template());
    let every_second = ["--listen", "127.0.0.1:0", "--schedule", "* * * * * *"];
    ["run"]
        .into_iter()
        .chain(redis_backend(&url, &template))
        .chain(every_second)
        .chain(["--retries", "0"])
        .chain(extra.iter().copied())
        .map(str::to_owned)
        .collect()
}

/// Whether `e` is the event named `name`.
pub fn is(e: &Value, name: &str) -> bool {
    e["event"] == name
}

/// A running `keel-scraper`.
pub struct Worker {
    proc: Proc,
}

impl Worker {
    /// Starts the binary with `args` and, besides `PATH`, only the environment given
    /// (nothing else from the shell that runs the tests leaks in).
    pub fn spawn<S: AsRef<str>>(args: &[S], env: &[(&str, &str)]) -> Worker {
        let proc = Spawn::new(BIN)
            .args(args.iter().map(|a| a.as_ref()))
            .envs(env.iter().copied())
            .capture()
            .start()
            .expect("start keel-scraper");
        Worker { proc }
    }

    /// The stdout lines printed so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.proc.stdout_lines()
    }

    /// The JSON lines printed on stdout so far, in order. Lenient ([`Events::lenient`]):
    /// with `SCRAPER_LOG=trace` the libraries' own lines, which carry no `event`, are
    /// mixed in.
    pub fn events(&self) -> Vec<Value> {
        Events::lenient(self.stdout_lines().iter().map(String::as_str)).0
    }

    /// Everything printed so far, stdout then stderr, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.proc.stdout_lines().join("\n"),
            self.proc.stderr_lines().join("\n")
        )
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
            !self.proc.reaped(),
            "the process already exited{}",
            self.dump()
        );
        self.proc.signal(signal);
    }

    /// Waits for the process to exit, then for its output to be read to the end.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let Some(status) = self.proc.wait_exit(timeout) else {
            panic!("the process did not exit within {timeout:?}{}", self.dump());
        };
        self.proc.join_readers();
        status
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
