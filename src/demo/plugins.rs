//! The demo's plugins: a loopback HTTP/1.1 server answering `GET /<plugin_id>/v1/status`
//! with one of four behaviours (healthy v0, healthy v1, crashed, garbage), switchable while
//! it runs. Only what `demo` shows; the tests and the benchmark use the full simulator of
//! the `keel-test-support` crate.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What a demo plugin does when asked for its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plugin {
    /// 200 `{"ret":0,"msg":"ok","status":"ACTIVE"}` (the v0 contract).
    HealthyV0,
    /// 200 `{"res":{"ret":"OK","msg":"ok"},"status":"RUNNING"}` (the v1 contract).
    HealthyV1,
    /// Resets the connection instead of answering: the plugin crashed.
    Crashed,
    /// 200 with an HTML error page where the JSON should be.
    Garbage,
}

type Behaviours = Arc<Mutex<HashMap<String, Plugin>>>;

/// The running server; it stops, closing every connection, when dropped.
pub struct Plugins {
    addr: SocketAddr,
    behaviours: Behaviours,
    task: JoinHandle<()>,
}

impl Plugins {
    /// Listens on a free loopback port. Must be called within a Tokio runtime.
    pub fn start() -> io::Result<Plugins> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let behaviours = Behaviours::default();
        let task = tokio::spawn(accept(listener, Arc::clone(&behaviours)));
        Ok(Plugins {
            addr,
            behaviours,
            task,
        })
    }

    /// `http://127.0.0.1:<port>/{plugin_id}/v1/status`.
    pub fn url_template(&self) -> String {
        format!("http://{}/{{plugin_id}}/v1/status", self.addr)
    }

    /// Sets what plugin `id` does from its next request on (an unknown id answers 404).
    pub fn set(&self, id: &str, plugin: Plugin) {
        self.behaviours
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), plugin);
    }
}

impl Drop for Plugins {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, behaviours: Behaviours) {
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                connections.spawn(serve(stream, Arc::clone(&behaviours)));
            }
            // Out of descriptors or an aborted handshake: pause instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
        while connections.try_join_next().is_some() {}
    }
}

/// The longest request head read; a client sending more is disconnected.
const MAX_HEAD: usize = 16 * 1024;

/// Answers the requests of one keep-alive connection (the prober sends no bodies).
async fn serve(mut stream: TcpStream, behaviours: Behaviours) {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 && buf.len() + n <= MAX_HEAD => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let id = head
            .split(' ')
            .nth(1)
            .and_then(|path| path.strip_prefix('/'))
            .and_then(|path| path.strip_suffix("/v1/status"));
        let plugin = id.and_then(|id| {
            behaviours
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(id)
                .copied()
        });
        let body = match plugin {
            Some(Plugin::HealthyV0) => r#"{"ret":0,"msg":"ok","status":"ACTIVE"}"#,
            Some(Plugin::HealthyV1) => r#"{"res":{"ret":"OK","msg":"ok"},"status":"RUNNING"}"#,
            Some(Plugin::Garbage) => "<html>502 Bad Gateway</html>",
            Some(Plugin::Crashed) => {
                // Closing with a zero linger sends RST instead of FIN.
                let _ = stream.set_zero_linger();
                return;
            }
            None => "",
        };
        let reply = match plugin {
            Some(_) => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ),
            None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned(),
        };
        if stream.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}
