//! Child processes of the tests and the benchmark: the worker binary, `redis-server`,
//! `wrk`, `faketime`. One way to start them and one way to watch them.
//!
//! * Every child is tied to the test process ([`spawn_tied`]): it receives SIGKILL when
//!   the test process dies, however it dies, so a crashed or killed run leaves no server
//!   or replica behind. A [`Proc`] is also killed and reaped when dropped.
//! * One environment policy ([`Spawn::new`]): the child gets only `PATH` from the test
//!   process, plus what the test gives it, so no `SCRAPER_*`, `REDIS_URL` or `POD_NAME` of
//!   the machine running the tests leaks in.
//! * Output is read line by line on threads of its own ([`read_lines`]), so the pipes
//!   never fill up and block the child; a test sees each line as soon as it is complete,
//!   collected ([`Spawn::capture`]) or handed to a callback ([`Spawn::on_stdout`]).
//! * Every wait is bounded ([`Proc::wait_exit`], [`Spawn::run`], [`bounded`]).
//! * Signals go only to a child that has not been reaped yet, so its pid cannot belong to
//!   another process.

use std::ffi::OsStr;
use std::future::Future;
use std::io::{self, BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often the bounded waits look again.
const POLL: Duration = Duration::from_millis(10);

/// A poisoned lock only means another thread panicked while holding it; the data is still
/// what it was.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A port the kernel reports free on loopback right now (nothing listens on it once this
/// returns: a port to refuse connections, or to hand to a server).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("bind an ephemeral loopback port: {e}"))
}

/// Whether `program` can be found on `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Runs a test's (or a scenario's) body, failing it when it overstays `bound`: every wait
/// inside should be bounded too, this is the last line of defence. Dropping the body kills
/// the processes it started.
pub async fn bounded<T>(bound: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(bound, body)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {bound:?}"))
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` with `PR_SET_PDEATHSIG` = SIGKILL, forked from one thread that lives as
/// long as the test process.
///
/// The death signal follows the *thread* that forked, not the process: tests run on
/// short-lived threads (and may start a process from a runtime worker), so forking from
/// them would kill the child as soon as that thread ended. Forking from this thread ties
/// the child's life to the test process.
pub fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (prctl, getppid, _exit): no allocation, no locks.
    // If the parent died before prctl took effect, the child exits instead of leaking.
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
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("tied-spawner".to_owned())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the spawner thread: {e}"));
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    lock(spawner)
        .send((cmd, tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// Reads `pipe` to its end on a thread of its own (named `name`), handing `each` every
/// line as it completes, its `\n` included (the last line may have none).
pub fn read_lines<R: Read + Send + 'static>(
    pipe: R,
    name: &str,
    mut each: impl FnMut(&[u8]) + Send + 'static,
) -> JoinHandle<()> {
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                each(&line);
                line.clear();
            }
        })
        .unwrap_or_else(|e| panic!("cannot start a reader thread: {e}"))
}

/// `line` without its line ending.
pub fn chomp(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

/// What one pipe delivered so far, shared with the thread reading it.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything read so far.
    pub fn bytes(&self) -> Vec<u8> {
        lock(&self.0).clone()
    }

    /// Everything read so far, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }

    /// The lines read so far, trailing whitespace trimmed.
    pub fn lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect()
    }
}

/// What a reader thread does with each line.
type OnLine = Box<dyn FnMut(&[u8]) + Send>;

/// Where one of the child's output streams goes.
enum Sink {
    Null,
    Capture,
    Lines(OnLine),
}

/// A command line to start as a [`Proc`].
pub struct Spawn {
    cmd: Command,
    name: String,
    stdout: Sink,
    stderr: Sink,
    group: bool,
}

impl Spawn {
    /// `program` with the one environment policy: only `PATH` of the test process, plus
    /// what [`Spawn::env`] adds. Stdin is empty; stdout and stderr are discarded unless
    /// captured or read.
    pub fn new(program: impl AsRef<OsStr>) -> Spawn {
        let mut cmd = Command::new(program.as_ref());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null());
        Spawn {
            name: Path::new(program.as_ref())
                .file_name()
                .unwrap_or(program.as_ref())
                .to_string_lossy()
                .into_owned(),
            cmd,
            stdout: Sink::Null,
            stderr: Sink::Null,
            group: false,
        }
    }

    /// The name reader threads and messages use (default: the program's file name).
    pub fn name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(name, value);
        self
    }

    /// [`Spawn::env`] for each `(name, value)`, in order.
    pub fn envs<I, K, V>(mut self, envs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.cmd.envs(envs);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cmd.current_dir(dir);
        self
    }

    /// Collects stdout and stderr ([`Proc::stdout`], [`Proc::stderr`]).
    pub fn capture(mut self) -> Self {
        self.stdout = Sink::Capture;
        self.stderr = Sink::Capture;
        self
    }

    /// Hands every stdout line to `each` as it is read (see [`read_lines`]).
    pub fn on_stdout(mut self, each: impl FnMut(&[u8]) + Send + 'static) -> Self {
        self.stdout = Sink::Lines(Box::new(each));
        self
    }

    /// Hands every stderr line to `each` as it is read (see [`read_lines`]).
    pub fn on_stderr(mut self, each: impl FnMut(&[u8]) + Send + 'static) -> Self {
        self.stderr = Sink::Lines(Box::new(each));
        self
    }

    /// Starts the child as the leader of a new process group, so that killing it also
    /// kills what it started (a wrapper such as GNU `time` and the program it runs).
    pub fn group(mut self) -> Self {
        self.group = true;
        self
    }

    /// Starts the child, tied to the test process.
    pub fn start(self) -> io::Result<Proc> {
        let Spawn {
            mut cmd,
            name,
            stdout,
            stderr,
            group,
        } = self;
        let piped = |sink: &Sink| match sink {
            Sink::Null => Stdio::null(),
            Sink::Capture | Sink::Lines(_) => Stdio::piped(),
        };
        cmd.stdout(piped(&stdout)).stderr(piped(&stderr));
        let mut proc = Proc::spawn_with(cmd, &name, group)?;
        let out = proc.child.as_mut().and_then(|c| c.stdout.take());
        let err = proc.child.as_mut().and_then(|c| c.stderr.take());
        proc.read(out, stdout, "stdout");
        proc.read(err, stderr, "stderr");
        Ok(proc)
    }

    /// Starts the child, captures its output and waits for it to exit, at most `bound`
    /// (then kills it). Panics when it cannot be started.
    pub fn run(self, bound: Duration) -> Finished {
        let name = self.name.clone();
        let started = Instant::now();
        let mut proc = self
            .capture()
            .start()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
        let status = proc.wait_exit(bound);
        let timed_out = status.is_none();
        let status = match status {
            Some(status) => Some(status),
            None => proc.kill(),
        };
        proc.join_readers();
        Finished {
            status,
            timed_out,
            stdout: proc.stdout(),
            stderr: proc.stderr(),
            pid: proc.pid(),
            elapsed: started.elapsed(),
        }
    }
}

/// How a child run with [`Spawn::run`] ended, and everything it printed.
#[derive(Clone, Debug)]
pub struct Finished {
    /// `None` only when it could not even be reaped after the kill.
    pub status: Option<ExitStatus>,
    /// It overstayed its bound and was killed.
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub pid: u32,
    pub elapsed: Duration,
}

impl Finished {
    /// The exit code; `None` when a signal ended it.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

/// A running child (or one that ended): killed and reaped when dropped.
pub struct Proc {
    /// `None` once reaped by [`Proc::wait_measured`].
    child: Option<Child>,
    pid: u32,
    name: String,
    /// The child leads its own process group, and the whole group is signalled.
    group: bool,
    status: Option<ExitStatus>,
    stdout: Captured,
    stderr: Captured,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Starts `cmd` (built by the caller, stdio and environment included), tied to the
    /// test process.
    pub fn spawn(cmd: Command) -> io::Result<Proc> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        Proc::spawn_with(cmd, &name, false)
    }

    /// [`Proc::spawn`] as the leader of a new process group ([`Spawn::group`]).
    pub fn spawn_group(cmd: Command) -> io::Result<Proc> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        Proc::spawn_with(cmd, &name, true)
    }

    fn spawn_with(mut cmd: Command, name: &str, group: bool) -> io::Result<Proc> {
        if group {
            cmd.process_group(0);
        }
        let child =
            spawn_tied(cmd).map_err(|e| io::Error::new(e.kind(), format!("{name}: {e}")))?;
        Ok(Proc {
            pid: child.id(),
            child: Some(child),
            name: name.to_owned(),
            group,
            status: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            readers: Vec::new(),
        })
    }

    fn read<R: Read + Send + 'static>(&mut self, pipe: Option<R>, sink: Sink, stream: &str) {
        let Some(pipe) = pipe else { return };
        let name = format!("{}-{stream}", self.name);
        let reader = match sink {
            Sink::Null => return,
            Sink::Capture => {
                let into = if stream == "stdout" {
                    self.stdout.clone()
                } else {
                    self.stderr.clone()
                };
                read_lines(pipe, &name, move |line| {
                    lock(&into.0).extend_from_slice(line)
                })
            }
            Sink::Lines(each) => read_lines(pipe, &name, each),
        };
        self.readers.push(reader);
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it exited, once it has (and was reaped).
    pub fn status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.status = Some(status);
            }
        }
        self.status
    }

    /// Whether it still runs (it is reaped as soon as it is seen to have exited).
    pub fn is_running(&mut self) -> bool {
        self.status().is_none() && self.child.is_some()
    }

    /// Whether it was seen to exit and reaped (only this type reaps it).
    pub fn reaped(&self) -> bool {
        self.status.is_some() || self.child.is_none()
    }

    /// Sends `signal` to the child (to its group with [`Spawn::group`]); nothing once it
    /// was reaped, so the pid cannot belong to another process.
    pub fn signal(&self, signal: libc::c_int) {
        if self.reaped() {
            return;
        }
        let pid = self.pid as libc::pid_t;
        let target = if self.group { -pid } else { pid };
        // SAFETY: kill(2) on our own child (or its group), which has not been reaped.
        unsafe {
            libc::kill(target, signal);
        }
    }

    /// Waits for it to exit, at most `bound`; `None` when it still runs.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.status() {
                return Some(status);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// SIGKILL, then reaps it; how it ended.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.is_running() {
            self.signal(libc::SIGKILL);
            if let Some(child) = self.child.as_mut() {
                self.status = child.wait().ok();
            }
        }
        self.status
    }

    /// SIGTERM (after SIGCONT: a stopped process cannot act on it), waiting at most
    /// `bound` for it to exit, then SIGKILL; how it ended.
    pub fn terminate(&mut self, bound: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        match self.wait_exit(bound) {
            Some(status) => Some(status),
            None => self.kill(),
        }
    }

    /// Waits until its output has been read to the end (after it exited: its pipes are
    /// then closed, unless a child of its own still holds them, which this waits for).
    pub fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Captured stdout so far ([`Spawn::capture`]).
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// Captured stderr so far ([`Spawn::capture`]).
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Captured stdout lines so far, trailing whitespace trimmed.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lines()
    }

    /// Captured stderr lines so far, trailing whitespace trimmed.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lines()
    }

    /// Waits for the child to exit, at most `limit` (then kills it and fails). Returns the
    /// exit code, the wall time since `started`, its CPU time and the highest `VmHWM`
    /// (KiB) seen while polling `/proc/<pid>/status` of the child and its children.
    /// (`ru_maxrss` is not used: for a child forked from this process it also counts this
    /// process's memory image before `execve`.)
    pub fn wait_measured(&mut self, started: Instant, limit: Duration) -> io::Result<Exited> {
        if self.child.is_none() || self.status.is_some() {
            return Err(io::Error::other(format!(
                "{} was already reaped",
                self.name
            )));
        }
        let pid = self.pid as libc::pid_t;
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
                // Reaped here: the Child must not be waited for (or signalled) again.
                self.child = None;
                self.status = Some(ExitStatus::from_raw(status));
                let cpu = |t: libc::timeval| {
                    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
                };
                return Ok(Exited {
                    code: if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else {
                        -1
                    },
                    elapsed: started.elapsed(),
                    cpu: cpu(usage.ru_utime) + cpu(usage.ru_stime),
                    hwm_kib,
                });
            }
            if reaped < 0 {
                return Err(io::Error::other(format!(
                    "wait4({pid}) failed: {}",
                    io::Error::last_os_error()
                )));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(io::Error::other(format!(
                    "{} (pid {pid}) did not finish within {limit:?}; killed",
                    self.name
                )));
            }
            thread::sleep(Duration::from_micros(500));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        // The readers end by themselves when the pipes close: with the process, or later
        // when a child it started and that still holds them ends. Not joined here, so a
        // drop never waits on such a child.
    }
}

/// How a measured child ended ([`Proc::wait_measured`]).
#[derive(Clone, Copy, Debug)]
pub struct Exited {
    pub code: i32,
    pub elapsed: Duration,
    /// User plus system CPU time of the child.
    pub cpu: Duration,
    pub hwm_kib: u64,
}

/// The peak resident set (`VmHWM`, KiB) of process `pid`.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The pids of `pid`'s direct children.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// The largest `VmHWM` of `pid` and its direct children (a wrapper's child is the program
/// it runs), 0 when none can be read.
fn tree_hwm_kib(pid: libc::pid_t) -> u64 {
    let pid = pid.unsigned_abs();
    children(pid)
        .into_iter()
        .chain([pid])
        .filter_map(vm_hwm_kib)
        .max()
        .unwrap_or(0)
}
