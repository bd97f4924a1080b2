//! Child processes of the benchmark: `redis-server`, `wrk` and the worker binary.
//!
//! Every child is tied to this process with `PR_SET_PDEATHSIG`, so a benchmark that is
//! killed leaves nothing behind, and is killed and reaped on drop otherwise. All children
//! are spawned from the main thread, which lives as long as the process (the death
//! signal follows the thread that forked, not the process).

use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A port the kernel reports free on loopback right now.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind an ephemeral loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Whether `program` can be found on `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Spawns `cmd` so that it receives SIGKILL when this process dies.
pub fn spawn_tied(cmd: &mut Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: runs in the forked child before exec, where only async-signal-safe calls
    // are allowed. prctl, getppid and _exit are plain system calls that neither allocate
    // nor lock. If the parent died before prctl took effect, the child exits at once.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// A child that is killed and reaped when dropped, unless it was already reaped.
pub struct Tied {
    child: Option<Child>,
    /// The child leads its own process group, and the whole group is killed.
    group: bool,
}

impl Tied {
    pub fn spawn(cmd: &mut Command) -> Result<Tied> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = spawn_tied(cmd).with_context(|| format!("cannot run {program}"))?;
        Ok(Tied {
            child: Some(child),
            group: false,
        })
    }

    /// Spawns `cmd` as the leader of a new process group, so that killing it also kills
    /// what it started (a wrapper such as GNU `time` and the program it runs).
    pub fn spawn_group(cmd: &mut Command) -> Result<Tied> {
        cmd.process_group(0);
        let mut tied = Tied::spawn(cmd)?;
        tied.group = true;
        Ok(tied)
    }

    fn kill(&self, pid: libc::pid_t) {
        let target = if self.group { -pid } else { pid };
        // SAFETY: kill(2) on our own child (or its group) that has not been reaped yet,
        // so the id cannot belong to another process.
        unsafe {
            libc::kill(target, libc::SIGKILL);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the child to exit, at most `limit` (then kills it and fails). Returns
    /// the exit code, the wall time since `started`, its CPU time and the highest
    /// `VmHWM` (KiB) seen while polling `/proc/<pid>/status` of the child and its
    /// children. (`ru_maxrss` is not used: for a child forked from this process it also
    /// counts this process's memory image before `execve`.)
    pub fn wait_measured(&mut self, started: Instant, limit: Duration) -> Result<Exited> {
        let child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("the child was already reaped"))?;
        let pid = child.id() as libc::pid_t;
        let deadline = Instant::now() + limit;
        let mut hwm_kib = 0u64;
        loop {
            hwm_kib = hwm_kib.max(tree_hwm_kib(pid));
            let mut status: libc::c_int = 0;
            // SAFETY: an all-zero rusage is a valid value of this plain C struct.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 on our own unreaped child, writing into the two locals above.
            let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if reaped == pid {
                let elapsed = started.elapsed();
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    -1
                };
                let cpu = |t: libc::timeval| {
                    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
                };
                return Ok(Exited {
                    code,
                    elapsed,
                    cpu: cpu(usage.ru_utime) + cpu(usage.ru_stime),
                    hwm_kib,
                });
            }
            if reaped < 0 {
                bail!("wait4({pid}) failed: {}", io::Error::last_os_error());
            }
            if Instant::now() >= deadline {
                self.kill(pid);
                // SAFETY: a blocking wait on our own, still unreaped child.
                unsafe {
                    libc::waitpid(pid, &mut status, 0);
                }
                bail!("process {pid} did not finish within {limit:?}; killed");
            }
            thread::sleep(Duration::from_micros(500));
        }
    }
}

impl Drop for Tied {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.kill(child.id() as libc::pid_t);
            let _ = child.wait();
        }
    }
}

/// How a measured child ended.
#[derive(Clone, Copy, Debug)]
pub struct Exited {
    pub code: i32,
    pub elapsed: Duration,
    /// User plus system CPU time of the child.
    pub cpu: Duration,
    pub hwm_kib: u64,
}

fn vm_hwm_kib(pid: libc::pid_t) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The largest `VmHWM` of `pid` and its direct children (a wrapper's child is the
/// program it runs), 0 when none can be read.
fn tree_hwm_kib(pid: libc::pid_t) -> u64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<libc::pid_t>().ok())
        .chain([pid])
        .filter_map(vm_hwm_kib)
        .max()
        .unwrap_or(0)
}

/// Runs `cmd` to completion within `limit`, returning its stdout and how it ended
/// (stderr is added to the error when it fails).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<(String, Exited)> {
    let dir = tempfile::tempdir().context("temp dir for a child's output")?;
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    let mut child = Tied::spawn(cmd)?;
    let exited = child.wait_measured(Instant::now(), limit)?;
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if exited.code != 0 {
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        bail!(
            "exit code {}: {}{}",
            exited.code,
            stdout.trim(),
            stderr.trim()
        );
    }
    Ok((stdout, exited))
}

/// A `redis-server` on a free loopback port with its own temporary directory, without
/// persistence. Killed on drop.
pub struct RedisServer {
    _dir: tempfile::TempDir,
    port: u16,
    child: Tied,
}

impl RedisServer {
    pub fn start() -> Result<RedisServer> {
        let mut last_error = anyhow!("no attempt made");
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("keel-bench-redis-")
                .tempdir()?;
            let port = free_port()?;
            let mut cmd = Command::new("redis-server");
            cmd.arg("--port")
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1", "--daemonize", "no", "--save", ""])
                .args(["--appendonly", "no", "--loglevel", "warning"])
                .arg("--dir")
                .arg(dir.path())
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = Tied::spawn(&mut cmd)?;
            let server = RedisServer {
                _dir: dir,
                port,
                child,
            };
            match server.wait_ready(Duration::from_secs(10)) {
                Ok(()) => return Ok(server),
                Err(e) => last_error = e,
            }
        }
        Err(last_error.context("redis-server did not start"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    fn wait_ready(&self, limit: Duration) -> Result<()> {
        let client = redis::Client::open(self.url())?;
        let deadline = Instant::now() + limit;
        loop {
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
                bail!(
                    "redis-server on port {} did not answer PING within {limit:?}",
                    self.port
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}
