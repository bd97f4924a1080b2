//! A TCP proxy on loopback that can refuse connections (closed: nothing listens on its
//! port, every connection through it is cut) and open again on the same port.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A TCP proxy in front of one address that can refuse connections (closed: nothing
/// listens on its port) and open again on the same port.
pub struct Proxy {
    port: u16,
    target: String,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Proxy {
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let p = Proxy {
            port,
            target: target.to_owned(),
            tasks: Arc::new(Mutex::new(JoinSet::new())),
        };
        p.serve(listener);
        p
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn serve(&self, listener: TcpListener) {
        // A poisoned lock only means a test already panicked.
        let target = self.target.clone();
        let tasks = self.tasks.clone();
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let target = target.clone();
                    tasks
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(&target).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                            }
                        });
                }
            });
    }

    /// Closes the port and every connection through it.
    pub fn close(&self) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort_all();
    }

    pub async fn open(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.address()).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebind {}: {e}", self.port);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.serve(listener);
    }
}
