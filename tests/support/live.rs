//! Driving a live `keel-scraper` process (`run`, or a `once` to be interfered with while it
//! works) and talking to it while it runs.
//!
//! * [`Worker`] starts the real binary with only the environment given, reads its stdout
//!   and stderr line by line in background threads (so the pipes never fill up and block
//!   it), lets a test wait, with a bound, for events or for its exit, sends it signals,
//!   and kills it when dropped, however the test ends.
//! * [`http_get`] asks its metrics and health server one question, bounded.
//!
//! Running a command to its end is [`super::binary::keel`]'s job; this module is for the
//! processes a test has to watch or act on while they run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use keel_test_support::sim::PluginSim;

use super::binary::{Events, BIN};
use super::redis_server::RedisServer;

/// `run` on the `redis` backend against `redis` and the simulator, ticking every second,
/// without retries, on a free port; `extra` appended.
pub fn run_args(redis: &RedisServer, sim: &PluginSim, extra: &[&str]) -> Vec<String> {
    let (url, template) = (redis.url(), sim.url_template());
    let base = [
        "run",
        "--backend",
        "redis",
        "--redis-url",
        &url,
        "--status-url",
        &template,
        "--listen",
        "127.0.0.1:0",
        "--schedule",
        "* * * * * *",
        "--retries",
        "0",
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// Whether `e` is the event named `name`.
pub fn is(e: &Value, name: &str) -> bool {
    e["event"] == name
}

/// The lines one pipe delivered so far, shared with the thread reading it.
type Lines = Arc<Mutex<Vec<String>>>;

/// Reads `stream` to its end on a thread of its own, one line at a time (trailing
/// whitespace trimmed), so every line is visible to the test as soon as it is complete.
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
    /// shell that runs the tests leaks in, not even `PATH`).
    pub fn spawn<S: AsRef<str>>(args: &[S], env: &[(&str, &str)]) -> Worker {
        let mut cmd = Command::new(BIN);
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

    /// The stdout lines printed so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        snapshot(&self.stdout)
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
            snapshot(&self.stdout).join("\n"),
            snapshot(&self.stderr).join("\n")
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
