//! A plugin simulator: a real HTTP/1.1 server on loopback answering
//! `GET /<plugin_id>/v1/status` for any number of plugin ids, each with a behaviour that
//! can be changed while it runs. The tests and the benchmark use it in place of real
//! plugins, so the worker's status URL template is [`PluginSim::url_template`]
//! (`http://127.0.0.1:<port>/{plugin_id}/v1/status`).
//!
//! It is written directly on a Tokio `TcpListener` with just enough HTTP to serve a
//! keep-alive client: a benchmark must find the worker's limit, not the simulator's.
//! Every canned answer is rendered to bytes once, when its behaviour is set, so serving a
//! request is one lookup under a short lock and one write. Each connection has its own
//! task, so a behaviour that stalls (a delay, a slowloris, a huge body) stalls only the
//! connection it answers on.
//!
//! Answers can also be framed the ways HTTP/1.1 allows and a careful client must survive
//! ([`Framing`]: chunked, `Connection: close`, until the end of the connection, folded
//! header lines, two framings at once), and the server can close idle keep-alive
//! connections at random moments or as a request arrives on one.
//!
//! Besides answers it keeps what tests need to check the client: requests per plugin id,
//! accepted TCP connections (connection reuse), requests in flight and their maximum
//! (concurrency bounds), and, when asked, the header lines of each request (which token
//! went where).
//!
//! The server stops when [`PluginSim::shutdown`] is called or the last handle is dropped;
//! open connections are closed with it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What the simulated plugin does when asked for its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// 200 `{"ret":0,"msg":"ok","status":<status>}` (the v0 contract).
    V0(String),
    /// 200 `{"res":{"ret":"OK","msg":"ok"},"status":<name>}` (the v1 contract).
    V1(String),
    /// This status code and body, as `application/json`.
    Raw { code: u16, body: Vec<u8> },
    /// Waits, then behaves as the inner behaviour.
    Delay(Duration, Box<Behavior>),
    /// Sends a status line, then one byte per second, forever.
    Slowloris,
    /// 200 with a body of this many bytes, delimited by closing the connection (no
    /// `Content-Length`, so the client can only cap it while streaming).
    Huge(u64),
    /// 200 whose JSON body has invalid UTF-8 inside a string.
    InvalidUtf8,
    /// Writes something that is not HTTP and closes.
    NotHttp,
    /// Resets the connection (RST) instead of answering.
    Reset,
    /// 200 headers announcing a 100-byte body, a few bytes of it, then close.
    Truncated,
    /// 302 to the same URL.
    RedirectLoop,
    /// 404 Not Found.
    Unknown404,
    /// The inner behaviour's answer (one with a status and a body) framed another way.
    Framed(Framing, Box<Behavior>),
}

/// How a [`Behavior::Framed`] answer is put on the wire: the ways HTTP/1.1 allows, and
/// the ways a careful client must survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`, in chunks of at most this many bytes (at least 1),
    /// the first with a chunk extension, and a trailer field after the last.
    Chunked(usize),
    /// `Content-Length` and `Connection: close`; the server closes after the answer.
    ConnectionClose,
    /// No length: the body ends when the server closes the connection.
    UntilClose,
    /// Obsolete line folding: `Content-Type` and `Content-Length` continued on an
    /// indented next line (RFC 9112 §5.2).
    FoldedHeaders,
    /// Both `Transfer-Encoding: chunked` (which frames the body) and a `Content-Length`
    /// that does not match it. The server keeps the connection open.
    ChunkedWithLength,
}

impl Behavior {
    /// A healthy v0 plugin reporting `status`.
    pub fn v0(status: &str) -> Behavior {
        Behavior::V0(status.to_owned())
    }

    /// A healthy v1 plugin reporting `status` (a v1 name such as `RUNNING`).
    pub fn v1(status: &str) -> Behavior {
        Behavior::V1(status.to_owned())
    }

    /// Status `code` with `body`.
    pub fn raw(code: u16, body: impl Into<Vec<u8>>) -> Behavior {
        Behavior::Raw {
            code,
            body: body.into(),
        }
    }

    /// `then`, after `delay`.
    pub fn delay(delay: Duration, then: Behavior) -> Behavior {
        Behavior::Delay(delay, Box::new(then))
    }

    /// `answer`'s status and body, framed by `framing`.
    pub fn framed(framing: Framing, answer: Behavior) -> Behavior {
        Behavior::Framed(framing, Box::new(answer))
    }
}

/// One request as the simulator saw it (kept only while recording is on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The request target as sent (path and query).
    pub target: String,
    /// The plugin id the target named, if it was a status path.
    pub plugin_id: Option<String>,
    /// Header lines in order, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The most requests kept while recording, so a long run cannot exhaust memory.
pub const RECORD_LIMIT: usize = 100_000;

/// A running simulator. Clones are handles to the same server; it stops when the last
/// one is dropped or on [`PluginSim::shutdown`].
#[derive(Clone)]
pub struct PluginSim {
    shared: Arc<Shared>,
    stopper: Arc<Stopper>,
    addr: SocketAddr,
}

impl std::fmt::Debug for PluginSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSim")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl PluginSim {
    /// Starts a simulator on a free loopback port; every plugin answers v0 `ACTIVE` until
    /// told otherwise. Must be called within a Tokio runtime.
    pub fn start() -> io::Result<PluginSim> {
        PluginSim::start_at(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts a simulator on `addr` (e.g. to bring a stopped one back on its old port).
    pub fn start_at(addr: SocketAddr) -> io::Result<PluginSim> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            io::Error::other(format!("the plugin simulator needs a Tokio runtime: {e}"))
        })?;
        let listener = {
            let _entered = runtime.enter();
            listen(addr)?
        };
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                default: Arc::new(Reply::prepare(&Behavior::v0("ACTIVE"))),
                overrides: HashMap::new(),
                counts: HashMap::new(),
            }),
            total: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            recorded: Mutex::new(Vec::new()),
            idle_close_min_us: AtomicU64::new(0),
            idle_close_max_us: AtomicU64::new(0),
            drop_on_reuse: AtomicU64::new(0),
        });
        let task = runtime.spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(PluginSim {
            shared,
            stopper: Arc::new(Stopper {
                task: Mutex::new(Some(task)),
            }),
            addr,
        })
    }

    /// The address the simulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The status URL template for the worker: `http://127.0.0.1:<port>/{plugin_id}/v1/status`.
    pub fn url_template(&self) -> String {
        format!("http://{}/{{plugin_id}}/v1/status", self.addr)
    }

    /// Sets what plugin `id` does from its next request on.
    pub fn set(&self, id: impl Into<String>, behavior: Behavior) {
        let reply = Arc::new(Reply::prepare(&behavior));
        self.shared.state().overrides.insert(id.into(), reply);
    }

    /// Sets one behaviour for many ids at once (rendered once, shared by all of them):
    /// the cheap way to flip a tenth of 50 000 plugins between ticks.
    pub fn set_many<I, S>(&self, ids: I, behavior: Behavior)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let reply = Arc::new(Reply::prepare(&behavior));
        let mut state = self.shared.state();
        for id in ids {
            state.overrides.insert(id.into(), Arc::clone(&reply));
        }
    }

    /// What every id without its own behaviour does.
    pub fn set_default(&self, behavior: Behavior) {
        let reply = Arc::new(Reply::prepare(&behavior));
        self.shared.state().default = reply;
    }

    /// Returns plugin `id` to the default behaviour.
    pub fn clear(&self, id: &str) {
        self.shared.state().overrides.remove(id);
    }

    /// Returns every plugin to the default behaviour.
    pub fn clear_all(&self) {
        self.shared.state().overrides.clear();
    }

    /// Status requests received for plugin `id`.
    pub fn requests(&self, id: &str) -> u64 {
        self.shared.state().counts.get(id).copied().unwrap_or(0)
    }

    /// Requests received, on any path.
    pub fn total_requests(&self) -> u64 {
        self.shared.total.load(Ordering::Relaxed)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Requests received and not yet fully answered.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::Relaxed)
    }

    /// Zeroes every counter (requests, connections, the in-flight maximum).
    pub fn reset_counters(&self) {
        self.shared.state().counts.clear();
        self.shared.total.store(0, Ordering::Relaxed);
        self.shared.connections.store(0, Ordering::Relaxed);
        self.shared.max_in_flight.store(
            self.shared.in_flight.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// Starts or stops keeping every request's target and headers (at most
    /// [`RECORD_LIMIT`]).
    pub fn record_requests(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
    }

    /// The requests recorded so far.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.recorded).clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_recorded(&self) {
        lock(&self.shared.recorded).clear();
    }

    /// Closes idle keep-alive connections at random moments: after an answer, a
    /// connection waits for the next request a random time between `min` and `max`, then
    /// the server closes it. `None` keeps idle connections open (the default).
    pub fn close_idle_connections(&self, range: Option<(Duration, Duration)>) {
        let (min, max) = range.map_or((0, 0), |(a, b)| (micros(a).max(1), micros(b.max(a)).max(1)));
        self.shared.idle_close_min_us.store(min, Ordering::Relaxed);
        self.shared.idle_close_max_us.store(max, Ordering::Relaxed);
    }

    /// The next `n` requests that arrive on a connection which already served one are
    /// read and then answered with nothing: the server closes the connection, as one that
    /// closed an idle connection just as the request went out would. (The requests count.)
    pub fn drop_requests_on_reused_connections(&self, n: u64) {
        self.shared.drop_on_reuse.store(n, Ordering::Relaxed);
    }

    /// Stops listening and closes every connection. Idempotent.
    pub fn shutdown(&self) {
        self.stopper.stop();
    }

    /// [`PluginSim::shutdown`], returning once the listener is closed.
    pub async fn stop(&self) {
        let task = lock(&self.stopper.task).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Aborts the server task when the last handle goes.
struct Stopper {
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Stopper {
    fn stop(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// State shared by the handles and the server tasks.
struct Shared {
    state: Mutex<State>,
    total: AtomicU64,
    connections: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    recording: AtomicBool,
    recorded: Mutex<Vec<RecordedRequest>>,
    /// Idle connections close after a random time in this range (0: never).
    idle_close_min_us: AtomicU64,
    idle_close_max_us: AtomicU64,
    /// Requests on reused connections still to be dropped unanswered.
    drop_on_reuse: AtomicU64,
}

struct State {
    default: Arc<Reply>,
    overrides: HashMap<String, Arc<Reply>>,
    counts: HashMap<String, u64>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Counts a request for `id` and returns its reply, under one short lock.
    fn reply_for(&self, id: &str) -> Arc<Reply> {
        let mut state = self.state();
        match state.counts.get_mut(id) {
            Some(n) => *n += 1,
            None => {
                state.counts.insert(id.to_owned(), 1);
            }
        }
        Arc::clone(state.overrides.get(id).unwrap_or(&state.default))
    }

    /// How long an idle connection may wait for its next request, when idle connections
    /// are being closed.
    fn idle_limit(&self) -> Option<Duration> {
        let max = self.idle_close_max_us.load(Ordering::Relaxed);
        if max == 0 {
            return None;
        }
        let min = self.idle_close_min_us.load(Ordering::Relaxed).min(max);
        Some(Duration::from_micros(fastrand::u64(min..=max)))
    }

    /// Whether this request (on a connection that already served one) is to be dropped.
    fn drop_reused(&self) -> bool {
        self.drop_on_reuse
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(self)
    }
}

/// One request being answered; leaving (even by cancellation) decrements the count.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A poisoned lock only means another thread panicked while holding it; the data (plain
/// counters and maps) is still usable, and the simulator must not panic in turn.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A behaviour rendered for serving.
enum Reply {
    /// A complete response, written as is.
    Fixed(Bytes),
    /// A complete response, after which the server closes the connection.
    FixedClose(Bytes),
    Delay(Duration, Arc<Reply>),
    Slowloris,
    Huge(u64),
    NotHttp,
    Reset,
    Truncated,
    RedirectLoop,
}

impl Reply {
    fn prepare(behavior: &Behavior) -> Reply {
        match behavior {
            Behavior::V0(status) => Reply::json(
                200,
                format!(r#"{{"ret":0,"msg":"ok","status":{}}}"#, json_string(status)).as_bytes(),
            ),
            Behavior::V1(status) => Reply::json(
                200,
                format!(
                    r#"{{"res":{{"ret":"OK","msg":"ok"}},"status":{}}}"#,
                    json_string(status)
                )
                .as_bytes(),
            ),
            Behavior::Raw { code, body } => Reply::json(*code, body),
            Behavior::Delay(delay, then) => Reply::Delay(*delay, Arc::new(Reply::prepare(then))),
            Behavior::Slowloris => Reply::Slowloris,
            Behavior::Huge(size) => Reply::Huge(*size),
            Behavior::InvalidUtf8 => Reply::json(
                200,
                b"{\"ret\":0,\"msg\":\"ok\",\"status\":\"AC\xff\xfeTIVE\"}",
            ),
            Behavior::NotHttp => Reply::NotHttp,
            Behavior::Reset => Reply::Reset,
            Behavior::Truncated => Reply::Truncated,
            Behavior::RedirectLoop => Reply::RedirectLoop,
            Behavior::Unknown404 => Reply::Fixed(Bytes::from_static(NOT_FOUND)),
            Behavior::Framed(framing, answer) => match Reply::prepare(answer) {
                Reply::Fixed(bytes) | Reply::FixedClose(bytes) => reframe(&bytes, *framing),
                // Only an answer with a status and a body can be framed otherwise.
                other => other,
            },
        }
    }

    fn json(code: u16, body: &[u8]) -> Reply {
        let mut out = Vec::with_capacity(body.len() + 96);
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {code} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                reason(code),
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body);
        Reply::Fixed(Bytes::from(out))
    }
}

/// A rendered answer (`Reply::json`'s layout) framed by `framing`.
fn reframe(rendered: &[u8], framing: Framing) -> Reply {
    let Some(end) = find(rendered, b"\r\n\r\n") else {
        return Reply::Fixed(Bytes::copy_from_slice(rendered));
    };
    let status_line = &rendered[..find(rendered, b"\r\n").unwrap_or(end)];
    let body = &rendered[end + 4..];
    let mut out = Vec::with_capacity(rendered.len() + 128);
    out.extend_from_slice(status_line);
    out.extend_from_slice(b"\r\n");
    let chunked = |out: &mut Vec<u8>, size: usize| {
        for (i, chunk) in body.chunks(size.max(1)).enumerate() {
            let ext = if i == 0 { ";sim=1" } else { "" };
            out.extend_from_slice(format!("{:x}{ext}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\nx-sim-trailer: done\r\n\r\n");
    };
    match framing {
        Framing::Chunked(size) => {
            out.extend_from_slice(
                b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
            );
            chunked(&mut out, size);
            Reply::Fixed(Bytes::from(out))
        }
        Framing::ConnectionClose => {
            out.extend_from_slice(
                format!(
                    "content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(body);
            Reply::FixedClose(Bytes::from(out))
        }
        Framing::UntilClose => {
            out.extend_from_slice(b"content-type: application/json\r\n\r\n");
            out.extend_from_slice(body);
            Reply::FixedClose(Bytes::from(out))
        }
        Framing::FoldedHeaders => {
            out.extend_from_slice(
                format!(
                    "content-type: application/\r\n  json\r\ncontent-length:\r\n\t{}\r\nx-note: one\r\n two\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(body);
            Reply::Fixed(Bytes::from(out))
        }
        Framing::ChunkedWithLength => {
            out.extend_from_slice(
                format!(
                    "content-type: application/json\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n",
                    body.len() + 7
                )
                .as_bytes(),
            );
            chunked(&mut out, 8);
            Reply::Fixed(Bytes::from(out))
        }
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

const NOT_FOUND: &[u8] =
    b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\nnot found";
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
/// Bytes of a [`Behavior::Huge`] body.
static FILLER: [u8; 64 * 1024] = [b'x'; 64 * 1024];
/// The longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// The longest request body accepted (the client sends none; this only keeps framing).
const MAX_REQUEST_BODY: usize = 64 * 1024;

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the set (when this task is aborted) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                connections.spawn(serve_connection(stream, Arc::clone(&shared)));
            }
            // Out of descriptors or an aborted handshake: pause instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
        while connections.try_join_next().is_some() {}
    }
}

/// A parsed request head: byte offsets into the read buffer.
struct Head {
    /// Length of the head, blank line included.
    len: usize,
    target: std::ops::Range<usize>,
    /// Header lines, without the request line and the blank line.
    header_lines: std::ops::Range<usize>,
    content_length: usize,
    close: bool,
}

enum Parsed {
    Complete(Head),
    Partial,
    Invalid,
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    let mut served = 0u64;
    loop {
        // Answer every complete request already buffered (pipelining included).
        loop {
            let head = match parse_head(&buf) {
                Parsed::Complete(head) => head,
                Parsed::Partial => break,
                Parsed::Invalid => {
                    let _ = stream.write_all(BAD_REQUEST).await;
                    return;
                }
            };
            let whole = head.len + head.content_length;
            if buf.len() < whole {
                break;
            }
            shared.total.fetch_add(1, Ordering::Relaxed);
            let target = String::from_utf8_lossy(&buf[head.target.clone()]);
            let path = target.split('?').next().unwrap_or_default();
            let plugin_id = path
                .strip_prefix('/')
                .and_then(|p| p.strip_suffix("/v1/status"))
                .filter(|id| !id.is_empty() && !id.contains('/'));
            if shared.recording.load(Ordering::Relaxed) {
                record(&shared, &buf[head.header_lines.clone()], &target, plugin_id);
            }
            let reply = match plugin_id {
                Some(id) => shared.reply_for(id),
                None => Arc::new(Reply::Fixed(Bytes::from_static(NOT_FOUND))),
            };
            let location = matches!(*reply, Reply::RedirectLoop).then(|| target.to_string());
            drop(target);
            buf.advance(whole);
            if served > 0 && shared.drop_reused() {
                return;
            }
            served += 1;
            let in_flight = shared.enter();
            let keep = answer(&mut stream, &reply, location.as_deref()).await;
            drop(in_flight);
            if !keep || head.close {
                return;
            }
        }
        if buf.len() > MAX_HEAD + MAX_REQUEST_BODY {
            return;
        }
        let idle = buf.is_empty() && served > 0;
        let read = stream.read_buf(&mut buf);
        let got = match shared.idle_limit().filter(|_| idle) {
            // Idle between requests: the server may close the connection meanwhile.
            Some(limit) => match tokio::time::timeout(limit, read).await {
                Ok(got) => got,
                Err(_) => return,
            },
            None => read.await,
        };
        match got {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn record(shared: &Shared, header_lines: &[u8], target: &str, plugin_id: Option<&str>) {
    let text = String::from_utf8_lossy(header_lines);
    let headers = text
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let mut recorded = lock(&shared.recorded);
    if recorded.len() < RECORD_LIMIT {
        recorded.push(RecordedRequest {
            target: target.to_owned(),
            plugin_id: plugin_id.map(str::to_owned),
            headers,
        });
    }
}

/// Writes the reply; `false` when the connection must close afterwards.
async fn answer(stream: &mut TcpStream, reply: &Reply, location: Option<&str>) -> bool {
    let mut reply = reply;
    while let Reply::Delay(delay, then) = reply {
        tokio::time::sleep(*delay).await;
        reply = then;
    }
    match reply {
        Reply::Fixed(bytes) => stream.write_all(bytes).await.is_ok(),
        Reply::FixedClose(bytes) => {
            if stream.write_all(bytes).await.is_ok() {
                let _ = stream.shutdown().await;
            }
            false
        }
        // Unreachable after the loop above; answering nothing is the harmless choice.
        Reply::Delay(..) => false,
        Reply::Slowloris => {
            if stream.write_all(b"HTTP/1.1 200 OK\r\n").await.is_err() {
                return false;
            }
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if stream.write_all(b"x").await.is_err() {
                    return false;
                }
            }
        }
        Reply::Huge(size) => {
            let head =
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return false;
            }
            let mut left = *size;
            while left > 0 {
                let n = usize::try_from(left).map_or(FILLER.len(), |l| l.min(FILLER.len()));
                if stream.write_all(&FILLER[..n]).await.is_err() {
                    return false;
                }
                left -= n as u64;
            }
            false
        }
        Reply::NotHttp => {
            let _ = stream
                .write_all(b"SSH-2.0-OpenSSH_9.6\r\nthis is not an HTTP server\r\n")
                .await;
            let _ = stream.shutdown().await;
            false
        }
        Reply::Reset => {
            // Closing with a zero linger sends RST instead of FIN.
            let _ = stream.set_zero_linger();
            false
        }
        Reply::Truncated => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"ret\":0,")
                .await;
            let _ = stream.shutdown().await;
            false
        }
        Reply::RedirectLoop => {
            let head = format!(
                "HTTP/1.1 302 Found\r\nlocation: {}\r\ncontent-length: 0\r\n\r\n",
                location.unwrap_or("/")
            );
            stream.write_all(head.as_bytes()).await.is_ok()
        }
    }
}

/// Parses a request head just far enough to route it and keep the connection framed.
fn parse_head(buf: &[u8]) -> Parsed {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Parsed::Invalid
        } else {
            Parsed::Partial
        };
    };
    let len = end + 4;
    let Some(line_end) = find(&buf[..len], b"\r\n") else {
        return Parsed::Invalid;
    };
    let request_line = &buf[..line_end];
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Invalid;
    };
    let target_start = method.len() + 1;
    let mut close = version != b"HTTP/1.1";
    let mut content_length = 0usize;
    let header_lines = (line_end + 2).min(end)..end;
    for line in buf[header_lines.clone()].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            match std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
            {
                Some(n) if n <= MAX_REQUEST_BODY => content_length = n,
                _ => return Parsed::Invalid,
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if value.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    Parsed::Complete(Head {
        len,
        target: target_start..target_start + target.len(),
        header_lines,
        content_length,
        close,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
