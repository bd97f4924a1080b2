//! `run`'s status page, loaded in a real headless Chromium from a running worker
//! (`run --backend redis` against a real `redis-server` and the plugin simulator) after real
//! ticks in which one plugin died:
//!
//! - the table in the page shows the right status, since-time, last outcome and reason
//!   (error kind, detail) for each plugin, and the replica that completed the last tick;
//! - a plugin's own text (`<script>`, ANSI escapes) is text on the page, never markup;
//! - the Redis password appears nowhere on the page or in `/status.json`;
//! - a standby replica (which never ticks) shows the same table: it reads the store;
//! - `--status-page false` switches both endpoints off (404) and leaves `/metrics`;
//! - a screenshot of the page is saved under `target/` (the README shows a copy).
//!
//! Chromium runs with a temporary profile, in its own process group, bounded in time, and
//! is killed (the whole group) when the test drops it.

mod support;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::raw_put;
use support::live::{self, http_get, is, Worker};
use support::redis_server::RedisServer;

const PASSWORD: &str = "s3cret-status-page-pw";
const EVIL: &str = "<script>document.title='pwned'</script>\u{1b}[31mred\u{1b}[0m";

/// One headless Chromium run; the process group is killed on drop.
struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// Runs chromium with `args` after the headless flags, waits at most `timeout` for it
    /// to exit and returns its stdout.
    fn run(args: &[&str], timeout: Duration) -> String {
        let profile = tempfile::tempdir().expect("a temporary profile directory");
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .env_clear()
        .env("HOME", profile.path())
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
        let mut child = keel_test_support::process::spawn_tied(cmd)
            .expect("start chromium (Debian package `chromium`; scripts/test installs it)");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            out
        });
        let mut run = Chromium {
            child,
            _profile: profile,
        };
        let deadline = Instant::now() + timeout;
        loop {
            match run.child.try_wait() {
                Ok(Some(status)) => {
                    assert!(status.success(), "chromium {args:?} exited with {status}");
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => panic!("chromium {args:?} did not finish within {timeout:?}"),
            }
        }
        // The group may still hold helpers that keep the pipe open: end them first.
        run.kill_group();
        reader.join().unwrap_or_default()
    }

    fn kill_group(&self) {
        // SAFETY: kill(2) on the process group our own child leads (process_group(0)).
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.kill_group();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The cells of the table row of `plugin` in the DOM Chromium dumped: (class, text).
fn cells(dom: &str, plugin: &str) -> Vec<(String, String)> {
    let start = dom
        .find(&format!("<tr data-plugin=\"{plugin}\">"))
        .unwrap_or_else(|| panic!("no row for {plugin} in the page:\n{dom}"));
    let row = &dom[start..];
    let row = &row[..row.find("</tr>").unwrap_or(row.len())];
    row.split("<td class=\"")
        .skip(1)
        .map(|td| {
            let (class, rest) = td.split_once("\">").unwrap_or((td, ""));
            let text = rest.split("</td>").next().unwrap_or_default();
            (class.to_string(), unescape(text))
        })
        .collect()
}

fn cell(cells: &[(String, String)], class: &str) -> String {
    cells
        .iter()
        .find(|(c, _)| c.split(' ').next() == Some(class))
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| panic!("no {class} cell in {cells:?}"))
}

/// The tick (its name) in which `plugin_status_changed` moved `plugin` to `to`.
fn tick_of_change(events: &[Value], plugin: &str, to: &str) -> Option<String> {
    let mut current = None;
    for e in events {
        if is(e, "lock_acquired") {
            current = e["tick"].as_str().map(str::to_string);
        }
        if is(e, "plugin_status_changed") && e["plugin_id"] == plugin && e["to"] == to {
            return current;
        }
    }
    None
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png")
}

/// `/status.json`, or None while the replica is still connecting to the store (503).
fn status_json(address: &str) -> Option<Value> {
    let (code, body) = http_get(address, "/status.json");
    if code == 503 {
        return None;
    }
    assert_eq!(code, 200, "GET /status.json: {body}");
    Some(
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status.json is JSON: {e}: {body}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_chromium_shows_why_each_plugin_is_blocked_and_since_when() {
    let redis = RedisServer::builder().with_password(PASSWORD).start();
    let sim = PluginSim::start().expect("simulator");
    sim.set("billing", Behavior::v0("ACTIVE"));
    sim.set("device-hub", Behavior::v0("ACTIVE"));
    sim.set("rule-engine", Behavior::v1("ERR_REGISTER"));
    sim.set(
        "alarm-center",
        Behavior::raw(
            200,
            serde_json::json!({ "ret": 7, "msg": EVIL, "status": "ACTIVE" }).to_string(),
        ),
    );
    let ids = ["alarm-center", "billing", "device-hub", "rule-engine"];
    let registry: serde_json::Map<String, Value> = ids
        .iter()
        .map(|id| (id.to_string(), Value::String("true".into())))
        .collect();
    raw_put(
        &redis,
        "plugins||all_registered_plugin",
        &Value::Object(registry).to_string(),
    );
    for id in ids {
        raw_put(
            &redis,
            &format!("plugin_route_{id}"),
            &serde_json::json!({ "status": "ACTIVE", "tkeel_version": "v0.4.0" }).to_string(),
        );
    }

    // Two of four plugins fail on purpose: the fleet guard is not under test here.
    let args = live::run_args(
        &redis,
        &sim,
        &["--probe-timeout", "1s", "--max-failed-share", "1"],
    );
    let holder = Worker::spawn(&args, &[("SCRAPER_HOLDER_ID", "replica-a")]);
    let address = holder.listening_address();
    // A few healthy ticks, then device-hub dies: two failed probes make it FAILED.
    holder.wait_until(Duration::from_secs(20), "two completed ticks", |evs| {
        (evs.iter().filter(|e| is(e, "tick_completed")).count() >= 2).then_some(())
    });
    sim.set("device-hub", Behavior::Reset);
    let died = holder.wait_until(Duration::from_secs(20), "device-hub FAILED", |evs| {
        tick_of_change(evs, "device-hub", "FAILED")
    });
    // The tick after the one that wrote it: the observations of that tick were saved.
    holder.wait_until(Duration::from_secs(20), "a later completed tick", |evs| {
        evs.iter()
            .any(|e| is(e, "tick_completed") && e["tick"].as_str() > Some(died.as_str()))
            .then_some(())
    });
    let events = holder.events();
    let blocked = tick_of_change(&events, "rule-engine", "FAILED").expect("rule-engine written");
    let alarm = tick_of_change(&events, "alarm-center", "FAILED").expect("alarm-center written");

    let url = format!("http://{address}/status");
    let dom = Chromium::run(&["--dump-dom", &url], Duration::from_secs(60));
    assert!(dom.contains("<table id=\"plugins\">"), "{dom}");

    let row = cells(&dom, "device-hub");
    assert_eq!(cell(&row, "status"), "FAILED", "{row:?}");
    assert_eq!(
        cell(&row, "since"),
        died,
        "since the tick that wrote FAILED: {row:?}"
    );
    assert_eq!(cell(&row, "outcome"), "failed", "{row:?}");
    assert_eq!(cell(&row, "kind"), "protocol", "{row:?}");
    assert!(cell(&row, "detail").len() > 3, "a reason: {row:?}");
    let failures: u32 = cell(&row, "failures").parse().expect("a number");
    assert!(failures >= 2, "{row:?}");

    let row = cells(&dom, "rule-engine");
    assert_eq!(cell(&row, "status"), "FAILED", "{row:?}");
    assert_eq!(cell(&row, "since"), blocked, "{row:?}");
    assert_eq!(
        cell(&row, "outcome"),
        "reported FAILED",
        "it reported ERR_REGISTER: {row:?}"
    );
    assert_eq!(cell(&row, "failures"), "0", "{row:?}");

    let row = cells(&dom, "alarm-center");
    assert_eq!(cell(&row, "status"), "FAILED", "{row:?}");
    assert_eq!(cell(&row, "since"), alarm, "{row:?}");
    assert_eq!(cell(&row, "kind"), "plugin_error", "{row:?}");
    let detail = cell(&row, "detail");
    assert!(
        detail.contains("<script>document.title='pwned'</script>"),
        "the plugin's text shows as text: {detail:?}"
    );
    assert!(!detail.contains('\u{1b}'), "{detail:?}");

    let row = cells(&dom, "billing");
    assert_eq!(cell(&row, "status"), "ACTIVE", "{row:?}");
    assert_eq!(
        cell(&row, "since"),
        "unknown",
        "already ACTIVE when first seen: {row:?}"
    );
    assert_eq!(cell(&row, "outcome"), "reported ACTIVE", "{row:?}");

    // The plugin's markup never became an element: no script ran, none is in the DOM.
    assert!(!dom.contains("<script"), "{dom}");
    assert!(dom.contains("<title>keel-scraper status</title>"), "{dom}");
    assert!(
        dom.contains("completed by <b class=\"holder\">replica-a</b>"),
        "{dom}"
    );
    assert!(!dom.contains(PASSWORD), "the Redis password is on the page");
    let (_, json_text) = http_get(&address, "/status.json");
    assert!(!json_text.contains(PASSWORD), "{json_text}");

    // A standby that never ticks (a yearly schedule) shows the same table: it reads the
    // store. Both read the same store; retry while the holder's ticks move the counters.
    let mut standby_args = live::run_args(&redis, &sim, &[]);
    let at = standby_args
        .iter()
        .position(|a| a == "* * * * * *")
        .expect("the schedule argument");
    standby_args[at] = "0 0 0 1 1 *".into();
    let standby = Worker::spawn(&standby_args, &[("SCRAPER_HOLDER_ID", "replica-b")]);
    let standby_address = standby.listening_address();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (a, b) = (status_json(&address), status_json(&standby_address));
        if let (Some(a), Some(b)) = (&a, &b) {
            if a["plugins"] == b["plugins"] && a["plugins"].as_array().is_some_and(|p| p.len() == 4)
            {
                assert_eq!(b["last_tick"]["holder"], "replica-a", "{b}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the standby's page differs:\n{a:?}\n{b:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !standby.events().iter().any(|e| is(e, "lock_acquired")),
        "the standby never ticked"
    );

    // The screenshot, under target/.
    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    Chromium::run(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,420",
            &url,
        ],
        Duration::from_secs(60),
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 10_000, "a real picture, {} bytes", png.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_can_be_switched_off() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    sim.set("p1", Behavior::v0("ACTIVE"));
    raw_put(&redis, "plugins||all_registered_plugin", r#"{"p1":"true"}"#);
    raw_put(&redis, "plugin_route_p1", r#"{"status":"ACTIVE"}"#);
    let off = Worker::spawn(
        &live::run_args(&redis, &sim, &["--status-page", "false"]),
        &[("SCRAPER_HOLDER_ID", "off-replica")],
    );
    let address = off.listening_address();
    off.wait_event(Duration::from_secs(20), |e| is(e, "tick_completed"));
    for path in ["/status", "/status.json"] {
        assert_eq!(http_get(&address, path).0, 404, "{path}");
    }
    assert_eq!(http_get(&address, "/metrics").0, 200);

    let on = Worker::spawn(
        &live::run_args(&redis, &sim, &[]),
        &[("SCRAPER_HOLDER_ID", "on-replica")],
    );
    // This replica never wins a tick while `off` runs: it only has to reach the store.
    let address = on.listening_address();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, body) = loop {
        let (code, body) = http_get(&address, "/status");
        if code != 503 || Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("<tr data-plugin=\"p1\">"), "{body}");
    assert!(body.starts_with("<!DOCTYPE html>"), "{body}");
    assert!(!body.contains("<script"), "no JavaScript: {body}");
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "no external assets: {body}"
    );
}
