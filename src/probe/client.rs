//! A lean HTTP/1.1 client for status calls: one `GET`, a response head, a bounded body,
//! and keep-alive connections kept in a small pool.
//!
//! Why not a general-purpose client (README, "Performance", measures the choice in every
//! benchmark run against hyper's connection-level client, [`super::hyper_client`]): at
//! the worker's concurrency the cost of a status
//! call is per-request overhead, not bandwidth. A general stack hands every request to a
//! separate connection task through channels (two cross-task wake-ups per request), builds
//! header maps and parses the URL again for every call; profiled at 10 000 plugins that
//! was about three times the CPU per request of the load generator the benchmark uses as
//! the limit. Here the probe's own future owns the socket while it has it: it writes the
//! request bytes it was given, reads the answer into the connection's buffer and parses
//! the head in place, with no task, channel or header map in between.
//!
//! What it does, and keeps:
//! - Only what a status call needs: `GET`, no request body, no redirects (a 3xx is an
//!   answer like any other), no proxy, no TLS (the template must be `http`).
//! - Answers are framed by `Content-Length`, `Transfer-Encoding: chunked`, or the end of
//!   the connection; `1xx` heads are skipped; `204`/`304` have no body. Obsolete line
//!   folding in a head reads as spaces (RFC 9112 §5.2). An answer with both
//!   `Transfer-Encoding` and `Content-Length` is framed by the encoding and its connection
//!   is closed afterwards, never pooled (§6.1).
//! - A body is read only up to a caller's cap; one byte more is [`ClientError::TooLarge`],
//!   detected from `Content-Length` without reading, or while streaming otherwise.
//! - A connection goes back to the pool only after its answer was read exactly to the end,
//!   with keep-alive, and nothing unexpected after it. An idle connection is checked before
//!   reuse: if the server closed it (or sent something unasked) it is dropped, so a request
//!   never goes out on a connection already known to be dead. Idle connections expire
//!   after [`IDLE_TIMEOUT`]. The server may still close one just after that check: a
//!   request on a reused connection that got no byte of an answer is sent once more on a
//!   fresh connection, within the same call (see [`Client::send`]).
//! - Errors say which side failed: [`ClientError::Connect`] when no connection could be
//!   made (resolution, refusal), [`ClientError::Protocol`] when a connection was made and
//!   the exchange broke (not HTTP, reset, cut short). Their texts never name the URL.
//! - No timeouts here: the caller bounds every call as a whole (connect, head and body).
//!   Dropping a call's future drops its connection.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The longest response head accepted (status line and headers, 1xx heads included).
const MAX_HEAD: usize = 64 * 1024;

/// Most header lines in one response head.
const MAX_HEADERS: usize = 64;

/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1024;

/// The most bytes of trailer fields after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// Read buffer reserved per read.
const READ_CHUNK: usize = 8 * 1024;

/// Where a call goes: the host to connect to and the port. Pooled connections are
/// reused only for calls to an equal endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    host: Box<str>,
    /// The host as an address, when it is one (no name resolution then).
    ip: Option<IpAddr>,
    port: u16,
}

impl Endpoint {
    /// `host` as it appears in a URL (IPv6 in brackets), and the port.
    pub fn new(host: &str, port: u16) -> Endpoint {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Endpoint {
            host: host.into(),
            ip: bare.parse().ok(),
            port,
        }
    }
}

/// Why a call failed. The texts never contain the URL or a header value.
#[derive(Debug)]
pub enum ClientError {
    /// No connection could be made.
    Connect(String),
    /// A connection was made and the exchange broke.
    Protocol(String),
    /// The body is larger than the caller's cap.
    TooLarge,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(why) | ClientError::Protocol(why) => f.write_str(why),
            ClientError::TooLarge => f.write_str("body too large"),
        }
    }
}

/// How the body of an answer ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// The head of an answer.
#[derive(Clone, Debug)]
pub struct Head {
    pub status: u16,
    framing: Framing,
    keep_alive: bool,
}

impl Head {
    /// The announced body length, when the answer has one.
    pub fn content_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Chunked | Framing::Close => None,
        }
    }
}

/// An open connection, with what was read from it and not yet used.
pub struct Conn {
    endpoint: Arc<Endpoint>,
    stream: TcpStream,
    buf: BytesMut,
    /// The request being sent, assembled here so its buffer is reused.
    out: Vec<u8>,
    /// Some byte of the current answer was read (interim heads included).
    answered: bool,
}

/// A connection an [`IdlePool`] can keep.
pub trait Pooled {
    /// The endpoint it is connected to.
    fn endpoint(&self) -> &Arc<Endpoint>;
    /// Whether it may carry another request (checked without waiting).
    fn still_open(&mut self) -> bool;
}

/// Idle keep-alive connections: one list, searched from its most recently used end, with
/// one bound for all endpoints (0: no connection outlives its call). A prober pools
/// connections only when the plugin id is not part of the host, so all its calls go to
/// the one endpoint of its template, and a map keyed by endpoint would only add hashing
/// to every call. Both HTTP clients keep their connections in one.
pub struct IdlePool<C> {
    idle: Mutex<Vec<(C, Instant)>>,
    max: usize,
}

impl<C: Pooled> IdlePool<C> {
    pub fn new(max: usize) -> IdlePool<C> {
        IdlePool {
            idle: Mutex::new(Vec::new()),
            max,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    fn idle(&self) -> MutexGuard<'_, Vec<(C, Instant)>> {
        // A poisoned lock means a panic elsewhere while holding it; the list is still
        // consistent (every operation on it is a single push or remove).
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection to `endpoint` that is still open, if there is one; the stale
    /// ones met on the way are dropped.
    pub fn take(&self, endpoint: &Arc<Endpoint>) -> Option<C> {
        if self.max == 0 {
            return None;
        }
        loop {
            let (mut conn, since) = {
                let mut idle = self.idle();
                let at = idle.iter().rposition(|(conn, _)| {
                    Arc::ptr_eq(conn.endpoint(), endpoint) || **conn.endpoint() == **endpoint
                })?;
                idle.swap_remove(at)
            };
            if since.elapsed() < IDLE_TIMEOUT && conn.still_open() {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for reuse while there is room.
    pub fn put(&self, conn: C) {
        if self.max == 0 {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < self.max {
            idle.push((conn, Instant::now()));
        }
    }
}

/// The client: a pool of idle keep-alive connections ([`IdlePool`]). Cheap to share.
pub struct Client {
    pool: IdlePool<Conn>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("idle_max", &self.pool.max())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client keeping at most `idle_max` idle connections (0: no connection outlives
    /// its call).
    pub fn new(idle_max: usize) -> Client {
        Client {
            pool: IdlePool::new(idle_max),
        }
    }

    /// Sends a request whose head is the concatenation of `head` to `endpoint` and reads
    /// the answer's head. The body is then read with [`Client::read_body`] or dropped with
    /// the connection.
    ///
    /// A request on a reused connection that got no byte of an answer (the server closed
    /// the idle connection as the request went out: the check before reuse cannot see a
    /// close that is still on its way) is sent once more on a fresh connection. A `GET`
    /// may be repeated, and nothing came back, so no answer is lost or counted twice.
    pub async fn send(
        &self,
        endpoint: &Arc<Endpoint>,
        head: [&[u8]; 3],
    ) -> Result<(Conn, Head), ClientError> {
        if let Some(mut conn) = self.pool.take(endpoint) {
            match conn.exchange(head).await {
                Ok(answer) => return Ok((conn, answer)),
                Err(Exchange::Answered(e)) => return Err(e),
                Err(Exchange::Unanswered(_)) => {}
            }
        }
        let mut conn = connect(endpoint).await?;
        match conn.exchange(head).await {
            Ok(answer) => Ok((conn, answer)),
            Err(Exchange::Answered(e) | Exchange::Unanswered(e)) => Err(e),
        }
    }

    /// Reads the body of `head` from `conn`, at most `limit` bytes, and hands it to
    /// `use_body` (where it lies, without copying it when it came in one piece). The
    /// connection goes back to the pool when the answer ended cleanly and may be reused.
    pub async fn read_body<T>(
        &self,
        mut conn: Conn,
        head: &Head,
        limit: usize,
        use_body: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, ClientError> {
        let out = match head.framing {
            Framing::Length(n) => {
                let n = usize::try_from(n).map_err(|_| ClientError::TooLarge)?;
                if n > limit {
                    return Err(ClientError::TooLarge);
                }
                conn.fill(n).await?;
                let out = use_body(&conn.buf[..n]);
                conn.buf.advance(n);
                out
            }
            // The other framings are boxed: kept inline, their states would enlarge
            // every probe's future, which is moved on each spawn into the probe set.
            Framing::Chunked => use_body(&Box::pin(conn.read_chunked(limit)).await?),
            Framing::Close => {
                Box::pin(conn.read_to_close(limit)).await?;
                return Ok(use_body(&conn.buf));
            }
        };
        if head.keep_alive && conn.buf.is_empty() {
            self.pool.put(conn);
        }
        Ok(out)
    }
}

impl Endpoint {
    /// The addresses to try, in order (resolved when the host is a name).
    pub async fn addrs(&self) -> Result<Vec<SocketAddr>, ClientError> {
        Ok(match self.ip {
            Some(ip) => vec![SocketAddr::new(ip, self.port)],
            None => tokio::net::lookup_host((&*self.host, self.port))
                .await
                .map_err(|e| ClientError::Connect(format!("could not resolve the host: {e}")))?
                .collect(),
        })
    }
}

async fn connect(endpoint: &Arc<Endpoint>) -> Result<Conn, ClientError> {
    let addrs = endpoint.addrs().await?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Requests are single small writes: never wait to coalesce them.
                let _ = stream.set_nodelay(true);
                return Ok(Conn {
                    endpoint: Arc::clone(endpoint),
                    stream,
                    buf: BytesMut::with_capacity(READ_CHUNK),
                    out: Vec::new(),
                    answered: false,
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(ClientError::Connect(match last {
        Some(e) => e.to_string(),
        None => "the host resolved to no address".to_owned(),
    }))
}

/// How an exchange failed: after some of the answer came back, or before any of it.
enum Exchange {
    Answered(ClientError),
    Unanswered(ClientError),
}

fn protocol(what: &str, e: &io::Error) -> ClientError {
    ClientError::Protocol(format!("{what}: {e}"))
}

impl Pooled for Conn {
    fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// An idle connection is open when reading it would block: nothing was sent on it
    /// since its last answer, not even the end of the stream.
    fn still_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl Conn {
    /// Writes the request and reads the answer's head.
    async fn exchange(&mut self, head: [&[u8]; 3]) -> Result<Head, Exchange> {
        self.out.clear();
        for part in head {
            self.out.extend_from_slice(part);
        }
        if let Err(e) = self.stream.write_all(&self.out).await {
            return Err(Exchange::Unanswered(protocol(
                "the request could not be sent",
                &e,
            )));
        }
        let empty = self.buf.is_empty();
        self.read_head().await.map_err(|e| {
            if empty && self.buf.is_empty() && !self.answered {
                Exchange::Unanswered(e)
            } else {
                Exchange::Answered(e)
            }
        })
    }

    /// Reads more into the buffer; `false` at the end of the stream.
    async fn read_more(&mut self) -> Result<bool, ClientError> {
        self.buf.reserve(READ_CHUNK);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(protocol("the connection broke", &e)),
        }
    }

    /// Reads until the buffer holds at least `n` bytes.
    async fn fill(&mut self, n: usize) -> Result<(), ClientError> {
        while self.buf.len() < n {
            if !self.read_more().await? {
                return Err(ClientError::Protocol(
                    "the connection closed before the body was complete".to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// Reads and parses the answer's head, skipping interim (1xx) heads, and leaves the
    /// bytes after it in the buffer.
    async fn read_head(&mut self) -> Result<Head, ClientError> {
        self.answered = false;
        loop {
            match parse_head(&self.buf)? {
                Some((len, head)) => {
                    self.answered = true;
                    self.buf.advance(len);
                    match head {
                        Some(head) => return Ok(head),
                        None => continue, // an interim answer; the real one follows
                    }
                }
                None if self.buf.len() > MAX_HEAD => {
                    return Err(ClientError::Protocol(format!(
                        "the answer's head is longer than {MAX_HEAD} bytes"
                    )))
                }
                None => {
                    if !self.read_more().await? {
                        return Err(ClientError::Protocol(if self.buf.is_empty() {
                            "the connection closed without an answer".to_owned()
                        } else {
                            "the connection closed in the middle of the answer's head".to_owned()
                        }));
                    }
                }
            }
        }
    }

    /// Reads until the server closes, failing once the body passes `limit`. The body is
    /// left in the buffer.
    async fn read_to_close(&mut self, limit: usize) -> Result<(), ClientError> {
        loop {
            if self.buf.len() > limit {
                return Err(ClientError::TooLarge);
            }
            if !self.read_more().await? {
                return Ok(());
            }
        }
    }

    /// Decodes a chunked body, failing once its data passes `limit`.
    async fn read_chunked(&mut self, limit: usize) -> Result<Vec<u8>, ClientError> {
        let mut body = Vec::new();
        loop {
            let line_end = self.line_end(MAX_CHUNK_LINE).await?;
            let size = parse_chunk_size(&self.buf[..line_end])?;
            self.buf.advance(line_end + 2);
            if size == 0 {
                break;
            }
            let size = usize::try_from(size).map_err(|_| ClientError::TooLarge)?;
            if body.len().saturating_add(size) > limit {
                return Err(ClientError::TooLarge);
            }
            self.fill(size + 2).await?;
            body.extend_from_slice(&self.buf[..size]);
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(ClientError::Protocol(
                    "a chunk of the body is not followed by CRLF".to_owned(),
                ));
            }
            self.buf.advance(size + 2);
        }
        // Trailer fields, up to the empty line.
        let mut trailers = 0usize;
        loop {
            let line_end = self.line_end(MAX_TRAILERS).await?;
            self.buf.advance(line_end + 2);
            if line_end == 0 {
                return Ok(body);
            }
            trailers += line_end + 2;
            if trailers > MAX_TRAILERS {
                return Err(ClientError::Protocol(
                    "the body's trailer fields are too long".to_owned(),
                ));
            }
        }
    }

    /// The position of the next CRLF in the buffer, reading as needed; a line longer
    /// than `max` is a protocol error.
    async fn line_end(&mut self, max: usize) -> Result<usize, ClientError> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.buf[searched..].windows(2).position(|w| w == b"\r\n") {
                return Ok(searched + i);
            }
            searched = self.buf.len().saturating_sub(1);
            if self.buf.len() > max {
                return Err(ClientError::Protocol(
                    "a line of the chunked body is too long".to_owned(),
                ));
            }
            if !self.read_more().await? {
                return Err(ClientError::Protocol(
                    "the connection closed before the body was complete".to_owned(),
                ));
            }
        }
    }
}

/// Parses one response head at the start of `buf`: `None` when incomplete, else its
/// length and the head (`None` for an interim 1xx answer).
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Option<Head>)>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    // RFC 9112 §5.2: a client replaces obsolete line folding (a header line continued on
    // the next line, which starts with a space or tab) by spaces. httparse then leaves the
    // CRLF and the indentation in the value; every value read below is split into tokens
    // that are trimmed of ASCII whitespace, which CR and LF are, so it reads as spaces.
    let parsed = httparse::ParserConfig::default()
        .allow_obsolete_multiline_headers_in_responses(true)
        .parse_response(&mut response, buf);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(ClientError::Protocol(format!(
                "the answer is not HTTP/1.x: {e}"
            )))
        }
    };
    let status = response.code.unwrap_or(0);
    if (100..200).contains(&status) {
        if status == 101 {
            return Err(ClientError::Protocol(
                "the server switched protocols unasked".to_owned(),
            ));
        }
        return Ok(Some((len, None)));
    }
    let http11 = response.version == Some(1);
    let mut keep_alive = http11;
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).unwrap_or("");
            let n: u64 = text.trim().parse().map_err(|_| {
                ClientError::Protocol("the answer's Content-Length is not a number".to_owned())
            })?;
            if length.is_some_and(|m| m != n) {
                return Err(ClientError::Protocol(
                    "the answer has conflicting Content-Length headers".to_owned(),
                ));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides: chunked, or the body runs to the end of the stream.
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                    keep_alive = true;
                }
            }
        }
    }
    let framing = if status == 204 || status == 304 {
        Framing::Length(0)
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    // A close-delimited body ends the connection; an answer framed by both
    // Transfer-Encoding and Content-Length may be an attempt at response splitting, and
    // RFC 9112 §6.1 says to close the connection after it (the encoding decides the body).
    if framing == Framing::Close || (chunked.is_some() && length.is_some()) {
        keep_alive = false;
    }
    Ok(Some((
        len,
        Some(Head {
            status,
            framing,
            keep_alive,
        }),
    )))
}

/// The size of a chunk from its size line (hex digits, then optional extensions).
fn parse_chunk_size(line: &[u8]) -> Result<u64, ClientError> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let bad = || ClientError::Protocol("a chunk size of the body is not hexadecimal".to_owned());
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad());
    }
    let text = std::str::from_utf8(digits).map_err(|_| bad())?;
    u64::from_str_radix(text, 16).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> (usize, Option<Head>) {
        parse_head(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn framing_follows_the_headers() {
        let (_, h) = head("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n");
        let h = h.unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (200, Framing::Length(12), true)
        );

        let (_, h) = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
        );
        let h = h.unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));

        // Folded lines read as spaces.
        let (_, h) = head(
            "HTTP/1.1 200 OK\r\nX-Long: a\r\n  b\r\nContent-Length:\r\n 12\r\nConnection: keep-alive,\r\n\tclose\r\n\r\n",
        );
        let h = h.unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(12), false));

        let (_, h) = head("HTTP/1.1 200 OK\r\n\r\n");
        let h = h.unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));

        let (_, h) = head("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(h.unwrap().framing, Framing::Length(0));

        let (_, h) = head("HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n");
        assert!(!h.unwrap().keep_alive);
        let (_, h) = head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\ncontent-length: 2\r\n\r\n");
        assert!(h.unwrap().keep_alive);
        let (_, h) = head("HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 2\r\n\r\n");
        assert!(!h.unwrap().keep_alive);
    }

    #[test]
    fn interim_heads_are_skipped_and_bad_heads_are_protocol_errors() {
        let (len, h) = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n");
        assert_eq!((len, h.is_none()), (25, true));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le")
            .unwrap()
            .is_none());
        for bad in [
            "SSH-2.0-OpenSSH_9.6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad.as_bytes()), Err(ClientError::Protocol(_))),
                "{bad}"
            );
        }
    }

    /// A loopback server that answers each request on a connection with the next of
    /// `answers` (then closes it), and counts connections.
    async fn server(
        answers: Vec<&'static [u8]>,
    ) -> (Arc<Endpoint>, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for answer in answers {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (Arc::new(Endpoint::new("127.0.0.1", port)), accepted)
    }

    const GET: [&[u8]; 3] = [b"GET /a/v1/status HTTP/1.1\r\nhost: x\r\n\r\n", b"", b""];

    async fn call(
        client: &Client,
        endpoint: &Arc<Endpoint>,
        limit: usize,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let (conn, head) = client.send(endpoint, GET).await?;
        let status = head.status;
        let body = client.read_body(conn, &head, limit, <[u8]>::to_vec).await?;
        Ok((status, body))
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_and_the_connection_is_reused() {
        let chunked: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;x=y\r\n{\"st\r\n5\r\natus\"\r\n0\r\ntrailer: t\r\n\r\n";
        let (endpoint, accepted) = server(vec![chunked, chunked]).await;
        let client = Client::new(4);
        for _ in 0..2 {
            let (status, body) = call(&client, &endpoint, 1024).await.unwrap();
            assert_eq!((status, body.as_slice()), (200, &b"{\"status\""[..]));
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let answer: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let (endpoint, _) = server(vec![answer]).await;
        let (status, body) = call(&Client::new(4), &endpoint, 1024).await.unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"{}"[..]));
    }

    #[tokio::test]
    async fn a_chunked_body_over_the_cap_is_too_large() {
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n";
        let (endpoint, _) = server(vec![answer]).await;
        let got = call(&Client::new(4), &endpoint, 15).await;
        assert!(matches!(got, Err(ClientError::TooLarge)), "{got:?}");
        let (endpoint, _) = server(vec![answer]).await;
        assert_eq!(
            call(&Client::new(4), &endpoint, 16).await.unwrap().1.len(),
            16
        );
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_reused() {
        // One answer per connection, then the server closes it.
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let (endpoint, accepted) = server(vec![answer]).await;
        let client = Client::new(4);
        for _ in 0..3 {
            call(&client, &endpoint, 1024).await.unwrap();
            // Let the close reach this side before the next call.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_closed_without_an_answer_is_a_protocol_error() {
        let (endpoint, _) = server(vec![]).await;
        let got = call(&Client::new(4), &endpoint, 1024).await;
        assert!(matches!(got, Err(ClientError::Protocol(_))), "{got:?}");
    }

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(parse_chunk_size(b"1a").unwrap(), 26);
        assert_eq!(parse_chunk_size(b"A;name=value").unwrap(), 10);
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b"zz").is_err());
        assert!(parse_chunk_size(b"ffffffffffffffffff").is_err());
    }
}
