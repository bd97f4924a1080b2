//! The process helper against real child processes: the environment policy, output read
//! line by line, bounded waits, signals, kill on drop.

use std::time::{Duration, Instant};

use keel_test_support::process::{bounded, free_port, Proc, Spawn};

/// Whether process `pid` exists and has not ended (a zombie waiting to be reaped by
/// someone else counts as ended).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[test]
fn a_child_sees_only_path_and_what_it_was_given() {
    std::env::var_os("PATH").expect("the tests run with a PATH");
    let run = Spawn::new("env")
        .env("KEEL_A", "1")
        .envs([("KEEL_B", "two words")])
        .run(Duration::from_secs(10));
    assert_eq!(run.code(), Some(0), "{run:?}");
    let mut names: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["KEEL_A", "KEEL_B", "PATH"], "{}", run.stdout);
    assert!(run.stdout.contains("KEEL_B=two words\n"), "{}", run.stdout);
}

#[test]
fn output_is_collected_whole_from_both_streams() {
    let run = Spawn::new("sh")
        .args([
            "-c",
            "echo one; echo err >&2; printf 'two\\nno newline'; exit 3",
        ])
        .run(Duration::from_secs(10));
    assert_eq!(run.code(), Some(3));
    assert!(!run.timed_out);
    assert_eq!(run.stdout, "one\ntwo\nno newline");
    assert_eq!(run.stderr, "err\n");
}

#[test]
fn a_run_that_overstays_its_bound_is_killed() {
    let started = Instant::now();
    let run = Spawn::new("sleep")
        .arg("30")
        .run(Duration::from_millis(300));
    assert!(run.timed_out, "{run:?}");
    assert_eq!(run.code(), None, "ended by SIGKILL");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!alive(run.pid), "reaped");
}

#[test]
fn lines_reach_the_callback_as_they_are_printed() {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut proc = Spawn::new("sh")
        // `sleep` outlives `sh` by at most 8 s, holding the pipe.
        .args(["-c", "echo first; sleep 8"])
        .on_stdout(move |line| {
            let _ = tx.send(line.to_vec());
        })
        .start()
        .expect("start sh");
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the first line, before the process ends");
    assert_eq!(line, b"first\n");
    assert!(proc.is_running());
    // Its own child still holds the pipe: dropping the handle must not wait for it.
    let dropped = Instant::now();
    drop(proc);
    assert!(
        dropped.elapsed() < Duration::from_secs(5),
        "{:?}",
        dropped.elapsed()
    );
}

#[test]
fn a_signal_reaches_the_child_and_waits_are_bounded() {
    let mut proc = Spawn::new("sleep").arg("30").start().expect("start sleep");
    assert_eq!(
        proc.wait_exit(Duration::from_millis(200)),
        None,
        "still running"
    );
    proc.signal(libc::SIGTERM);
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .expect("exited after SIGTERM");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert!(proc.reaped());
    // Once reaped, signals go nowhere (the pid may belong to another process by now).
    proc.signal(libc::SIGKILL);
}

#[test]
fn a_dropped_child_is_killed_and_reaped() {
    let proc = Spawn::new("sleep").arg("30").start().expect("start sleep");
    let pid = proc.pid();
    assert!(alive(pid));
    drop(proc);
    assert!(!alive(pid), "sleep {pid} outlived its handle");
}

#[test]
fn a_group_is_killed_whole() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "sleep 30 & wait"])
        .stdin(std::process::Stdio::null());
    let mut proc = Proc::spawn_group(cmd).expect("start sh");
    let started = Instant::now();
    let grandchild = loop {
        let children = keel_test_support::process::children(proc.pid());
        if let Some(&pid) = children.first() {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sh started no child"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    proc.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The grandchild is not ours to reap: it is gone once init reaps it.
    while alive(grandchild) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(grandchild), "the group's other member survived");
}

#[test]
fn a_free_port_refuses_connections() {
    let port = free_port();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn a_body_that_overstays_its_bound_fails() {
    let finished = bounded(Duration::from_secs(5), async { 7 }).await;
    assert_eq!(finished, 7);
    let overstayed = tokio::spawn(bounded(
        Duration::from_millis(50),
        tokio::time::sleep(Duration::from_secs(30)),
    ))
    .await;
    let panic = overstayed
        .expect_err("the bound fails the body")
        .into_panic();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("did not finish within 50ms"), "{message}");
}
