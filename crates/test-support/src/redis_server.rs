//! A real `redis-server` per test: its own free loopback port, its own temporary
//! directory, killed when the test ends, however it ends.
//!
//! ```ignore
//! let server = RedisServer::start();                      // no persistence, no password
//! let server = RedisServer::builder().with_password("pw").with_persistence().start();
//! let url = server.url();                                 // redis://:pw@127.0.0.1:PORT/
//! let hash: Vec<(String, Vec<u8>)> = server.query(redis::cmd("HGETALL").arg("k"));
//! ```
//!
//! Never the Redis that may already run on 6379: every server binds a port the kernel
//! just handed out. [`RedisServer::stop`] and [`RedisServer::restart`] (same port, same
//! directory, so with persistence the data survives) simulate outages; `pause`/`resume`
//! (SIGSTOP/SIGCONT) simulate a Redis that hangs.

use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

pub use crate::process::free_port;
use crate::process::{Proc, Spawn};

/// How long a server may take to answer `PING` after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on any single command the helpers send.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Options for a server, then [`RedisServerBuilder::start`].
#[derive(Clone, Debug, Default)]
pub struct RedisServerBuilder {
    password: Option<String>,
    persistence: bool,
    extra_args: Vec<String>,
}

impl RedisServerBuilder {
    /// Requires `AUTH <password>` (`requirepass`); [`RedisServer::url`] carries it.
    pub fn with_password(mut self, password: &str) -> Self {
        self.password = Some(password.to_owned());
        self
    }

    /// Append-only file in the server's directory, fsynced on every write, so data
    /// survives [`RedisServer::stop`], [`RedisServer::kill`] and [`RedisServer::restart`].
    pub fn with_persistence(mut self) -> Self {
        self.persistence = true;
        self
    }

    /// Any other `redis-server` option, e.g. `["--maxclients", "100"]`.
    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Spawns the server and waits until it answers `PING`. Panics (failing the test)
    /// with the server's log when it does not come up within ten seconds.
    pub fn start(self) -> RedisServer {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`RedisServerBuilder::start`], returning what went wrong instead of panicking.
    pub fn try_start(self) -> io::Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("keel-redis-").tempdir()?;
        let mut server = RedisServer {
            dir,
            port: 0,
            options: self,
            proc: None,
        };
        // The port is free when the kernel hands it out, but another process may grab it
        // before redis-server binds it: then try another one.
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(e) => last_error = e,
            }
        }
        Err(io::Error::other(format!(
            "redis-server did not start: {last_error}"
        )))
    }
}

/// A running (or deliberately stopped) `redis-server`. Killed on drop.
pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
    options: RedisServerBuilder,
    proc: Option<Proc>,
}

impl RedisServer {
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// A server with neither password nor persistence.
    pub fn start() -> RedisServer {
        Self::builder().start()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, as error messages should name it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The URL to connect with, carrying the password if there is one.
    pub fn url(&self) -> String {
        match &self.options.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    pub fn password(&self) -> Option<&str> {
        self.options.password.as_deref()
    }

    /// The server's working directory (AOF files, `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Graceful shutdown (SIGTERM: with persistence, the AOF is flushed), waiting for the
    /// process to exit; SIGKILL if it does not within ten seconds.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate(STOP_TIMEOUT);
        }
    }

    /// A crash: SIGKILL, then reap the process.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Stops the server if it runs, then starts it again on the same port with the same
    /// directory and options, and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let mut last_error = String::new();
        // The old socket is closed, but give the port a few chances to become bindable.
        for _ in 0..20 {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) => {
                    last_error = e;
                    thread::sleep(Duration::from_millis(250));
                }
            }
        }
        panic!(
            "redis-server did not restart on port {}: {last_error}",
            self.port
        );
    }

    /// SIGSTOP: the server keeps its socket open but answers nothing (a hung Redis).
    pub fn pause(&self) {
        if let Some(proc) = &self.proc {
            proc.signal(libc::SIGSTOP);
        }
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        if let Some(proc) = &self.proc {
            proc.signal(libc::SIGCONT);
        }
    }

    /// A client for raw commands (with the password, if any).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("the test server's URL parses")
    }

    /// A synchronous connection with bounded connect and read times.
    pub fn conn(&self) -> redis::Connection {
        let conn = self
            .client()
            .get_connection_with_timeout(COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to test redis on {}: {e}", self.port));
        conn.set_read_timeout(Some(COMMAND_TIMEOUT))
            .expect("set a read timeout");
        conn.set_write_timeout(Some(COMMAND_TIMEOUT))
            .expect("set a write timeout");
        conn
    }

    /// An async connection, for tests that issue many raw commands.
    pub async fn async_conn(&self) -> redis::aio::MultiplexedConnection {
        let client = self.client();
        let connecting = client.get_multiplexed_async_connection();
        tokio::time::timeout(COMMAND_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| panic!("connect to test redis on {}: timed out", self.port))
            .unwrap_or_else(|e| panic!("connect to test redis on {}: {e}", self.port))
    }

    /// Runs one raw command on a fresh synchronous connection and converts the reply.
    /// Blocking, but on loopback and bounded: fine inside async tests.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let mut conn = self.conn();
        cmd.query(&mut conn)
            .unwrap_or_else(|e| panic!("raw command on test redis {}: {e}", self.port))
    }

    /// The fields of a HASH, as (field, value bytes), sorted by field.
    pub fn hgetall(&self, key: &str) -> Vec<(String, Vec<u8>)> {
        let mut fields: Vec<(String, Vec<u8>)> = self.query(redis::cmd("HGETALL").arg(key));
        fields.sort();
        fields
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let persistence: &[&str] = if self.options.persistence {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let password = self
            .options
            .password
            .iter()
            .flat_map(|p| ["--requirepass", p.as_str()]);
        // Tied to the test process: a crashed run leaves no redis-server behind.
        let proc = Spawn::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(["--daemonize", "no", "--save", ""])
            .args(persistence)
            .args(password)
            .args(&self.options.extra_args)
            .current_dir(self.dir.path())
            .start()
            .map_err(|e| format!("cannot run redis-server (is it installed?): {e}"))?;
        self.proc = Some(proc);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = self.client();
        loop {
            if let Some(proc) = &mut self.proc {
                if let Some(status) = proc.status() {
                    self.proc = None;
                    return Err(format!(
                        "redis-server on port {} exited ({status}); log:\n{}",
                        self.port,
                        self.log()
                    ));
                }
            }
            let answered = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .and_then(|mut conn| {
                    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
                    redis::cmd("PING").query::<String>(&mut conn)
                });
            if answered.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}; \
                     log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
