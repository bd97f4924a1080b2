//! `/metrics` and the shipped rules and dashboard, checked by Prometheus' own tools against
//! a running worker (`run --backend redis` against a real `redis-server` and simulated
//! plugins on loopback):
//!
//! - `/metrics` negotiates as the reference Go client does: OpenMetrics to a scraper that
//!   asks for it, the classic text format 0.0.4 otherwise. `promtool check metrics` has no
//!   complaint about the classic answer; the OpenMetrics answer is read by promtool's
//!   OpenMetrics parser (`promtool tsdb create-blocks-from openmetrics`) and by a real
//!   Prometheus scrape.
//! - A real `prometheus` (temporary TSDB, free port, 1 s scrape and evaluation) scrapes the
//!   worker with the PromQL rules the chart renders for a 1 s schedule: after a few ticks
//!   every dashboard panel's query returns data through the HTTP API and the no-tick alert
//!   is silent; once the worker is stopped it fires within its window.
//!
//! Needs `prometheus`/`promtool` (Debian's `prometheus` package) and the chart renderer's
//! Python packages (tests/deploy/requirements.txt); `scripts/test` installs both.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_test_support::process::spawn_tied;
use keel_test_support::sim::{Behavior, PluginSim};
use serde_json::Value;
use support::binary::raw_put;
use support::live::{self, is, Worker};
use support::redis_server::{free_port, RedisServer};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Prometheus 2.42's scrape `Accept` header.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const JOB: &str = "keel-scraper";

/// Registers `good` (ACTIVE, answering) and `down` (ACTIVE, answering 404), so probe
/// failures and a route write happen.
fn seed(redis: &RedisServer, sim: &PluginSim) {
    sim.set("good", Behavior::v0("ACTIVE"));
    sim.set("down", Behavior::Unknown404);
    raw_put(
        redis,
        "plugins||all_registered_plugin",
        r#"{"good":"true","down":"true"}"#,
    );
    for id in ["good", "down"] {
        raw_put(
            redis,
            &format!("plugin_route_{id}"),
            r#"{"status":"ACTIVE","tkeel_version":"v0.2.0"}"#,
        );
    }
}

/// A worker that has completed a few ticks, one plugin failing.
fn ticking_worker(redis: &RedisServer, sim: &PluginSim) -> (Worker, String) {
    seed(redis, sim);
    let worker = Worker::spawn(
        &live::run_args(redis, sim, &["--probe-timeout", "1s"]),
        &[("SCRAPER_HOLDER_ID", "holder-a")],
    );
    let address = worker.listening_address();
    worker.wait_until(Duration::from_secs(15), "three completed ticks", |evs| {
        (evs.iter().filter(|e| is(e, "tick_completed")).count() >= 3).then_some(())
    });
    (worker, address)
}

/// One HTTP/1.0 GET with extra request headers: status, headers (names lower-cased) and
/// body. Bounded by connect and read timeouts.
fn get(
    address: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let addr: SocketAddr = address.parse().expect("a socket address");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("read the answer to GET {path}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {response}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (code, headers, body.to_string())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn scrape(address: &str, accept: Option<&str>) -> (String, String) {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    let (code, headers, body) = get(address, "/metrics", &headers);
    assert_eq!(code, 200, "GET /metrics: {body}");
    let content_type = header(&headers, "content-type")
        .expect("a Content-Type")
        .to_string();
    (content_type, body)
}

/// Runs `promtool` with `args` and `stdin`: exit success and everything it printed.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package `prometheus`; scripts/test installs it)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool finished");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_negotiated_and_both_formats_pass_promtool() {
    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    let (worker, address) = ticking_worker(&redis, &sim);
    worker.wait_event(Duration::from_secs(10), |e| is(e, "plugin_probe_failed"));

    // No Accept (curl, promtool users), text/plain and */*: the classic format.
    for accept in [None, Some("text/plain"), Some("*/*")] {
        let (content_type, body) = scrape(&address, accept);
        assert_eq!(
            content_type, "text/plain; version=0.0.4; charset=utf-8",
            "Accept {accept:?}"
        );
        assert!(!body.contains("# EOF"), "classic text has no EOF:\n{body}");
        assert!(
            body.contains("# HELP keel_scraper_ticks_total ")
                && body.contains("# TYPE keel_scraper_ticks_total counter\n")
                && body.contains("# TYPE keel_scraper_probe_failures_total counter\n")
                && body.contains("keel_scraper_probe_failures_total{error_kind=\"http_status\"} "),
            "counters are named with _total in HELP and TYPE:\n{body}"
        );
        let (ok, complaints) = promtool(&["check", "metrics"], &body);
        assert!(
            ok && complaints.trim().is_empty(),
            "promtool check metrics complains about the classic answer:\n{complaints}\n{body}"
        );
    }

    // Prometheus' own Accept header: OpenMetrics.
    let (content_type, body) = scrape(&address, Some(PROMETHEUS_ACCEPT));
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics ends with EOF:\n{body}"
    );
    assert!(
        body.contains("# TYPE keel_scraper_ticks counter\n"),
        "{body}"
    );
    // promtool 2.42's `check metrics` reads only the classic format; its OpenMetrics
    // parser is the backfiller's, which needs a timestamp on every sample.
    let stamped: String = body
        .lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("{l}\n")
            } else {
                format!("{l} 1700000000\n")
            }
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("scrape.om");
    std::fs::write(&input, &stamped).expect("write the scrape");
    let (ok, said) = promtool(
        &[
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            input.to_str().expect("utf-8 path"),
            dir.path().join("blocks").to_str().expect("utf-8 path"),
        ],
        "",
    );
    assert!(
        ok,
        "promtool's OpenMetrics parser refuses the answer:\n{said}\n{body}"
    );
    // The same series in both formats. A tick replaces the plugins-by-status gauge while
    // it ends, so two scrapes may straddle that: compare pairs until one agrees.
    let series = |t: &str| -> Vec<String> {
        let mut s: Vec<String> = t
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').map(|(name, _)| name.to_string()))
            .collect();
        s.sort();
        s
    };
    let mut last = (Vec::new(), Vec::new());
    let agreed = (0..20).any(|_| {
        let classic = series(&scrape(&address, None).1);
        let open = series(&scrape(&address, Some(PROMETHEUS_ACCEPT)).1);
        let same = classic == open && !classic.is_empty();
        last = (classic, open);
        same
    });
    assert!(
        agreed,
        "classic and OpenMetrics carry different series:\n{:?}\n{:?}",
        last.0, last.1
    );
}

// --------------------------------------------------------------------------------------
// A real Prometheus

/// A `prometheus` server on a free loopback port with a temporary TSDB, killed on drop.
struct Prometheus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("rules.yaml"), rules).expect("write the rules");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n",
            rules = dir.path().join("rules.yaml").display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write the config");
        let (ok, said) = promtool(
            &["check", "config", config_path.to_str().expect("utf-8 path")],
            "",
        );
        assert!(ok, "promtool check config:\n{said}");
        let address = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("prometheus.log")).expect("log file"),
            ));
        let child = spawn_tied(cmd).expect("start prometheus (Debian package `prometheus`)");
        let server = Prometheus {
            child,
            address,
            _dir: dir,
        };
        server.wait(Duration::from_secs(30), "Prometheus ready", || {
            let addr: SocketAddr = server.address.parse().ok()?;
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
            (get(&server.address, "/-/ready", &[]).0 == 200).then_some(())
        });
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Polls `f` every 200 ms; panics with Prometheus' log after `timeout`.
    fn wait<T>(&self, timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\n--- prometheus log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `GET /api/v1/<path>`: the `data` member of a successful answer.
    fn api(&self, path: &str) -> Value {
        let (code, _, body) = get(&self.address, &format!("/api/v1/{path}"), &[]);
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET /api/v1/{path}: {e}: {code} {body}"));
        assert_eq!(v["status"], "success", "GET /api/v1/{path}: {body}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("query?query={}", encode(promql)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Alerts in state `firing` named `name`.
    fn firing(&self, name: &str) -> Vec<Value> {
        self.api("alerts")["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but unreserved characters (a query parameter's value).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The objects of `kind` the chart renders with `values`, by Helm's engine
/// (tests/deploy/render_chart.py).
fn render_chart(kind: &str, values: &Value) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(Path::new(REPO).join("tests/deploy/render_chart.py"))
        .arg(kind)
        .arg(values.to_string())
        .output()
        .expect("run python3 tests/deploy/render_chart.py");
    assert!(
        out.status.success(),
        "rendering the chart failed (pip install -r tests/deploy/requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the renderer prints JSON")
}

/// Every query of every panel of the shipped dashboard, with its variables set for this
/// Prometheus: `$job`, and `$__rate_interval` as Grafana would set it for a 1 s scrape.
fn dashboard_queries() -> Vec<(String, String)> {
    let path: PathBuf = Path::new(REPO).join("charts/keel-scraper/files/grafana-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expr");
            out.push((
                panel["title"].as_str().unwrap_or_default().to_string(),
                expr.replace("$job", JOB).replace("$__rate_interval", "10s"),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_worker_every_panel_has_data_and_the_no_tick_alert_fires_when_it_stops(
) {
    // The rules as the chart renders them for the worker's 1 s schedule.
    let rendered = render_chart(
        "PrometheusRule",
        &serde_json::json!({
            "worker": {"schedule": "* * * * * *"},
            "rules": {"jobLabel": JOB, "prometheus": {"enabled": true}},
        }),
    );
    assert_eq!(rendered.len(), 1, "one PrometheusRule");
    let spec = &rendered[0]["spec"];
    let no_tick = spec["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["alert"] == "KeelScraperNoTickCompleted")
        .expect("the no-tick rule")
        .clone();
    // Three 1 s intervals (the lease plus two intervals is the same).
    let expr = no_tick["expr"].as_str().expect("expr");
    assert!(
        expr.contains("> 3)") && expr.contains(&format!("job=\"{JOB}\"")),
        "no-tick rule for a 1 s schedule: {expr}"
    );
    let window = Duration::from_secs(3);
    let rules_yaml = serde_json::to_string(spec).expect("JSON is YAML");

    let redis = RedisServer::start();
    let sim = PluginSim::start().expect("simulator");
    let (mut worker, address) = ticking_worker(&redis, &sim);
    let prometheus = Prometheus::start(&address, &rules_yaml);

    // The target is scraped in OpenMetrics and understood: up, counter metadata.
    prometheus.wait(Duration::from_secs(20), "the worker scraped and up", || {
        let up = prometheus.query(&format!("up{{job=\"{JOB}\"}}"));
        (up.len() == 1 && up[0]["value"][1] == "1").then_some(())
    });
    let metadata = prometheus.api(&format!(
        "targets/metadata?match_target={}&metric=keel_scraper_ticks",
        encode(&format!("{{job=\"{JOB}\"}}"))
    ));
    assert_eq!(
        metadata[0]["type"], "counter",
        "Prometheus read the OpenMetrics counter family: {metadata}"
    );

    // Enough samples for the 10 s rate windows.
    std::thread::sleep(Duration::from_secs(6));
    let queries = dashboard_queries();
    assert!(queries.len() >= 12, "dashboard queries: {queries:?}");
    for (title, promql) in &queries {
        let result = prometheus.wait(Duration::from_secs(15), title, || {
            let r = prometheus.query(promql);
            (!r.is_empty()).then_some(r)
        });
        assert!(!result.is_empty(), "{title}: {promql}");
    }
    let latest = prometheus.query(
        &dashboard_queries()
            .into_iter()
            .find(|(t, _)| t == "Replica that completed the last tick")
            .expect("the last-tick panel")
            .1,
    );
    assert_eq!(
        latest.len(),
        1,
        "one replica completed the last tick: {latest:?}"
    );
    assert_eq!(latest[0]["metric"]["instance"], address.as_str());
    let lease = prometheus.query(&format!("keel_scraper_lease_seconds{{job=\"{JOB}\"}}"));
    assert_eq!(
        lease.first().map(|s| s["value"][1].clone()),
        Some(Value::from("1")),
        "the lease of a 1 s schedule: {lease:?}"
    );

    // Ticking: the no-tick alert is silent.
    assert!(
        prometheus.firing("KeelScraperNoTickCompleted").is_empty(),
        "no-tick alert fires while the worker ticks: {}",
        prometheus.api("alerts")
    );

    // Stop the worker: the alert fires within its window (plus a scrape and an
    // evaluation interval, and a second of slack).
    worker.signal(libc::SIGTERM);
    worker.wait_exit(Duration::from_secs(15));
    let stopped = Instant::now();
    prometheus.wait(
        window + Duration::from_secs(10),
        "KeelScraperNoTickCompleted firing",
        || (!prometheus.firing("KeelScraperNoTickCompleted").is_empty()).then_some(()),
    );
    let took = stopped.elapsed();
    eprintln!("KeelScraperNoTickCompleted fired {took:?} after the worker stopped");
    assert!(
        took <= window + Duration::from_secs(3),
        "the no-tick alert fired {took:?} after the worker stopped; window {window:?}"
    );
}
