//! Status calls on hyper's connection-level HTTP/1.1 client (`hyper::client::conn::http1`),
//! driven inside the probe's own future.
//!
//! hyper's connection is two halves: a `SendRequest` handle and a `Connection` future that
//! does the reading, writing and parsing. Usually the `Connection` is spawned as a task of
//! its own and requests reach it through a channel, which costs two cross-task wake-ups
//! per call. Here the probe polls both halves itself (see [`drive`]): the channel between
//! them is then a local hand-off within one task, and a pooled connection is the pair.
//!
//! It keeps the contract of the lean client ([`super::client`]): one `GET`, a body read
//! up to a cap, keep-alive connections pooled only after an answer read to its end, an
//! idle connection checked before reuse, `Connect` vs `Protocol` errors whose texts never
//! name the URL, and one resend on a fresh connection when a reused one answered nothing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, Connection, SendRequest};
use hyper::header::{HeaderMap, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::client::{ClientError, Endpoint, IdlePool, Pooled};

/// A request: its target (path and query) and its header fields, built once per template.
pub struct HyperRequest<'a> {
    pub target: [&'a str; 3],
    pub headers: &'a HeaderMap,
}

/// The head of an answer.
pub struct HyperHead {
    pub status: u16,
    content_length: Option<u64>,
    /// Keep-alive may follow: the answer did not also carry both `Transfer-Encoding` and
    /// `Content-Length` (RFC 9112 §6.3: close the connection after such an answer).
    reusable: bool,
}

impl HyperHead {
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }
}

/// One connection: the request handle and the connection future, polled by the caller.
pub struct HyperConn {
    endpoint: Arc<Endpoint>,
    sender: SendRequest<Empty<Bytes>>,
    /// `None` once the connection future finished (the connection is over).
    conn: Option<Driven>,
    /// Bytes read from the socket so far.
    read: Arc<AtomicU64>,
    body: Option<Incoming>,
}

/// hyper's connection future, polled by the probe that holds the connection.
type Driven = Pin<Box<Connection<TokioIo<Counted>, Empty<Bytes>>>>;

/// The client: hyper's HTTP/1.1 connections in a small pool, as [`super::client::Client`].
pub struct HyperClient {
    pool: IdlePool<HyperConn>,
    builder: Builder,
}

impl HyperClient {
    pub fn new(idle_max: usize) -> HyperClient {
        let mut builder = Builder::new();
        // RFC 9112 §5.2: a client replaces obsolete line folding with spaces.
        builder.allow_obsolete_multiline_headers_in_responses(true);
        HyperClient {
            pool: IdlePool::new(idle_max),
            builder,
        }
    }

    /// Sends `request` to `endpoint` and reads the answer's head. A request on a reused
    /// connection that got no byte of an answer is sent once more on a fresh connection.
    pub async fn send(
        &self,
        endpoint: &Arc<Endpoint>,
        request: &HyperRequest<'_>,
    ) -> Result<(HyperConn, HyperHead), ClientError> {
        if let Some(mut conn) = self.pool.take(endpoint) {
            let before = conn.read.load(Ordering::Relaxed);
            match exchange(&mut conn, request).await {
                Ok(head) => return Ok((conn, head)),
                Err(e) if conn.read.load(Ordering::Relaxed) > before => return Err(e),
                // Nothing came back: the server closed the idle connection as the request
                // went out. The request never reached a plugin that answered.
                Err(_) => {}
            }
        }
        let mut conn = self.connect(endpoint).await?;
        let head = exchange(&mut conn, request).await?;
        Ok((conn, head))
    }

    /// Reads the body, at most `limit` bytes, and hands it to `use_body`; the connection
    /// goes back to the pool when the answer ended cleanly with keep-alive.
    pub async fn read_body<T>(
        &self,
        mut conn: HyperConn,
        head: &HyperHead,
        limit: usize,
        use_body: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, ClientError> {
        if head
            .content_length
            .is_some_and(|n| usize::try_from(n).map_or(true, |n| n > limit))
        {
            return Err(ClientError::TooLarge);
        }
        let Some(mut body) = conn.body.take() else {
            return Ok(use_body(&[]));
        };
        let mut first: Option<Bytes> = None;
        let mut rest: Vec<u8> = Vec::new();
        let mut len = 0usize;
        loop {
            let frame = drive(&mut conn.conn, body.frame()).await;
            match frame {
                None => break,
                Some(Err(e)) => return Err(hyper_error("the body could not be read", &e)),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers
                    };
                    len = len.saturating_add(data.len());
                    if len > limit {
                        return Err(ClientError::TooLarge);
                    }
                    match &first {
                        None if rest.is_empty() => first = Some(data),
                        _ => {
                            if let Some(f) = first.take() {
                                rest.extend_from_slice(&f);
                            }
                            rest.extend_from_slice(&data);
                        }
                    }
                }
            }
        }
        drop(body);
        let out = match &first {
            Some(data) => use_body(data),
            None => use_body(&rest),
        };
        if head.reusable {
            self.checkin(conn);
        }
        Ok(out)
    }

    async fn connect(&self, endpoint: &Arc<Endpoint>) -> Result<HyperConn, ClientError> {
        let stream = connect_tcp(endpoint).await?;
        let read = Arc::new(AtomicU64::new(0));
        let io = TokioIo::new(Counted {
            stream,
            read: Arc::clone(&read),
        });
        let (sender, conn) = self
            .builder
            .handshake(io)
            .await
            .map_err(|e| hyper_error("the connection could not be set up", &e))?;
        Ok(HyperConn {
            endpoint: Arc::clone(endpoint),
            sender,
            conn: Some(Box::pin(conn)),
            read,
            body: None,
        })
    }

    fn checkin(&self, mut conn: HyperConn) {
        // Let the connection take in the end of the answer: one that is to close (the
        // server said so, or sent more than it was asked) finishes here.
        if self.pool.max() > 0 && conn.still_open() {
            self.pool.put(conn);
        }
    }
}

impl Pooled for HyperConn {
    fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Polls the connection once without waiting: it is open when it has not finished
    /// and is ready for another request.
    fn still_open(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if conn.as_mut().poll(&mut cx).is_ready() {
            self.conn = None;
            return false;
        }
        self.sender.is_ready()
    }
}

/// Sends the request and waits for the head, polling the connection meanwhile.
async fn exchange(
    conn: &mut HyperConn,
    request: &HyperRequest<'_>,
) -> Result<HyperHead, ClientError> {
    let [a, b, c] = request.target;
    let mut target = String::with_capacity(a.len() + b.len() + c.len());
    target.push_str(a);
    target.push_str(b);
    target.push_str(c);
    let uri = Uri::from_maybe_shared(target)
        .map_err(|_| ClientError::Protocol("the request target is not a valid URI".to_owned()))?;
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = uri;
    *req.headers_mut() = request.headers.clone();
    let sent = conn.sender.send_request(req);
    let response = drive(&mut conn.conn, sent)
        .await
        .map_err(|e| hyper_error("the exchange broke", &e))?;
    let headers = response.headers();
    let content_length = match headers.get(CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ClientError::Protocol("the answer's Content-Length is not a number".to_owned())
                })?,
        ),
    };
    let both = content_length.is_some() && headers.contains_key(TRANSFER_ENCODING);
    let head = HyperHead {
        status: response.status().as_u16(),
        content_length: content_length.filter(|_| !both),
        reusable: !both,
    };
    conn.body = Some(response.into_body());
    Ok(head)
}

/// Awaits `fut` while polling the connection future, so the connection makes progress
/// within the caller's task. Once the connection finishes it is not polled again; `fut`
/// then completes on its own (hyper fails what the connection left unanswered).
async fn drive<F: Future>(conn: &mut Option<Driven>, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if let Some(c) = conn.as_mut() {
            if c.as_mut().poll(cx).is_ready() {
                *conn = None;
                return fut.as_mut().poll(cx);
            }
        }
        Poll::Pending
    })
    .await
}

async fn connect_tcp(endpoint: &Endpoint) -> Result<TcpStream, ClientError> {
    let addrs: Vec<SocketAddr> = endpoint.addrs().await?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(ClientError::Connect(match last {
        Some(e) => e.to_string(),
        None => "the host resolved to no address".to_owned(),
    }))
}

fn hyper_error(what: &str, e: &hyper::Error) -> ClientError {
    ClientError::Protocol(format!("{what}: {e}"))
}

/// A socket that counts the bytes read from it.
struct Counted {
    stream: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let out = Pin::new(&mut self.stream).poll_read(cx, buf);
        let got = buf.filled().len().saturating_sub(before);
        if got > 0 {
            self.read.fetch_add(got as u64, Ordering::Relaxed);
        }
        out
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
