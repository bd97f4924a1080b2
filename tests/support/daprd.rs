//! A real Dapr sidecar (`daprd`, built from Dapr's Go module by `scripts/daprd`) per test,
//! run in self-hosted mode the way an operator runs it next to the worker:
//!
//! ```text
//! daprd --app-id ID --resources-path DIR --dapr-http-port P --dapr-grpc-port G
//!       --dapr-internal-grpc-port I --metrics-port M --dapr-listen-addresses 127.0.0.1
//! ```
//!
//! `DIR` holds the repository's own `components/` with `redisHost` / `redisPassword`
//! rewritten to the test's (password-protected) `redis-server`, plus one `HTTPEndpoint`
//! resource per simulated plugin (name = plugin id, `baseUrl` = its simulator), so the
//! worker reaches plugins through real service invocation.
//!
//! Every port comes from the free-port helper, the process is tied to the test process
//! (killed with it, and on drop), starting waits for `/v1.0/healthz/outbound` with a bound,
//! and the sidecar's log is printed when the test fails (a panic while it is alive).
//!
//! The binary: `$KEEL_DAPRD` (set by `scripts/test`), else what `scripts/daprd --no-build`
//! finds in the cache. Neither: the test fails saying to run `./scripts/daprd`.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::redis_server::{free_port, RedisServer};
use keel_test_support::process::spawn_tied;

/// How long a sidecar may take to load its components and answer outbound health.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The repository's component names (components/*.yaml).
pub const PUBLIC_STORE: &str = "keel-public-store";
pub const PRIVATE_STORE: &str = "keel-private-store";
/// The private component's `keyPrefix` in components/keel-private-store.yaml.
pub const PRIVATE_PREFIX: &str = "plugins";

/// The path of the daprd binary the tests run, or a panic saying how to get one.
pub fn daprd_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(find_daprd)
        .clone()
        .unwrap_or_else(|why| panic!("{why}"))
}

fn find_daprd() -> Result<PathBuf, String> {
    let how = "The Dapr-path tests run a real Dapr sidecar. Get it with `./scripts/daprd` \
               (builds daprd from Dapr's Go module into the user cache; needs Go; the first \
               build takes a while) or run the whole suite with `./scripts/test`, which does \
               it for you";
    if let Some(path) = std::env::var_os("KEEL_DAPRD") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "KEEL_DAPRD={} is not a file. {how}.",
                path.display()
            ))
        };
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/daprd");
    let out = Command::new(&script)
        .arg("--no-build")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}. {how}.", script.display()))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no daprd found ({}). {how}.",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// One `HTTPEndpoint` resource: `/v1.0/invoke/<name>/method/<m>` goes to `<base_url>/<m>`.
#[derive(Clone, Debug)]
pub struct HttpEndpoint {
    pub name: String,
    pub base_url: String,
}

/// How to start a [`Daprd`].
#[derive(Clone, Debug)]
pub struct DaprdBuilder {
    app_id: String,
    redis_host: String,
    redis_password: String,
    private_prefix: Option<String>,
    token: Option<String>,
    endpoints: Vec<HttpEndpoint>,
    app_port: Option<u16>,
    extra_args: Vec<String>,
    extra_resources: Vec<(String, String)>,
    internal_on_all_addresses: bool,
}

impl DaprdBuilder {
    /// A sidecar for `app_id` whose components point at `redis`.
    pub fn new(app_id: &str, redis: &RedisServer) -> DaprdBuilder {
        DaprdBuilder {
            app_id: app_id.to_owned(),
            redis_host: redis.endpoint(),
            redis_password: redis.password().unwrap_or_default().to_owned(),
            private_prefix: None,
            token: None,
            endpoints: Vec::new(),
            app_port: None,
            extra_args: Vec::new(),
            extra_resources: Vec::new(),
            internal_on_all_addresses: false,
        }
    }

    /// `DAPR_API_TOKEN` in the sidecar's environment: every API call must carry it.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Overrides the private component's `keyPrefix` (components/ pins `plugins`).
    pub fn with_private_prefix(mut self, prefix: &str) -> Self {
        self.private_prefix = Some(prefix.to_owned());
        self
    }

    /// One `HTTPEndpoint` per `(name, base_url)`.
    pub fn with_endpoint(mut self, name: &str, base_url: &str) -> Self {
        self.endpoints.push(HttpEndpoint {
            name: name.to_owned(),
            base_url: base_url.to_owned(),
        });
        self
    }

    /// One `HTTPEndpoint` per plugin id, each at `<origin>/<id>`: the plugin simulator's
    /// layout (it serves `GET /<id>/v1/status`).
    pub fn with_sim_endpoints<S: AsRef<str>>(mut self, origin: &str, ids: &[S]) -> Self {
        let origin = origin.trim_end_matches('/');
        for id in ids {
            let id = id.as_ref();
            self = self.with_endpoint(id, &format!("{origin}/{id}"));
        }
        self
    }

    /// `--app-port`: the sidecar fronts an app listening there (a Dapr app).
    pub fn with_app_port(mut self, port: u16) -> Self {
        self.app_port = Some(port);
        self
    }

    /// The internal gRPC port (sidecar-to-sidecar calls) on every address instead of
    /// loopback only: mDNS announces the host's interface address, so a Dapr app other
    /// sidecars invoke must listen there.
    pub fn reachable_by_other_sidecars(mut self) -> Self {
        self.internal_on_all_addresses = true;
        self
    }

    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Another resource file (`name`, YAML text) in the resources path.
    pub fn with_resource(mut self, name: &str, yaml: &str) -> Self {
        self.extra_resources
            .push((name.to_owned(), yaml.to_owned()));
        self
    }

    /// Writes the resources, spawns daprd and waits for outbound health. Panics with the
    /// sidecar's log when it does not come up within [`READY_TIMEOUT`].
    pub fn start(self) -> Daprd {
        let mut daprd = self.spawn();
        if let Err(why) = daprd.wait_outbound(READY_TIMEOUT) {
            panic!("daprd did not become ready: {why}\n{}", daprd.log_section());
        }
        daprd
    }

    /// Writes the resources and spawns daprd without waiting for it.
    pub fn spawn(self) -> Daprd {
        let mut daprd = self.prepare();
        daprd.spawn_process();
        daprd
    }

    /// Writes the resources and picks the ports, but starts nothing: [`Daprd::launch`]
    /// does (a worker can then be started first, pointed at the ports).
    pub fn prepare(self) -> Daprd {
        let dir = tempfile::Builder::new()
            .prefix("keel-daprd-")
            .tempdir()
            .expect("create a temp dir for daprd");
        let resources = dir.path().join("resources");
        std::fs::create_dir(&resources).expect("create the resources dir");
        write_components(&self, &resources);
        for endpoint in &self.endpoints {
            let yaml = http_endpoint_yaml(endpoint);
            let file = resources.join(format!("endpoint-{}.yaml", endpoint.name));
            std::fs::write(file, yaml).expect("write an HTTPEndpoint resource");
        }
        for (name, yaml) in &self.extra_resources {
            std::fs::write(resources.join(name), yaml).expect("write a resource");
        }
        Daprd {
            dir,
            options: self,
            http_port: free_port(),
            grpc_port: free_port(),
            internal_grpc_port: free_port(),
            metrics_port: free_port(),
            child: None,
            starts: 0,
        }
    }
}

/// Copies components/*.yaml into `dir` with the Redis address and password replaced (and
/// the private prefix, when overridden); the rest of each file is kept as it is.
fn write_components(options: &DaprdBuilder, dir: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("components");
    let mut files: Vec<_> = std::fs::read_dir(&source)
        .expect("read components/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "components/ has no YAML files");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a component");
        let private = text.contains(&format!("name: {PRIVATE_STORE}"));
        let rewritten = rewrite_metadata(&text, |name| match name {
            "redisHost" => Some(options.redis_host.clone()),
            "redisPassword" => Some(options.redis_password.clone()),
            "keyPrefix" if private => options.private_prefix.clone(),
            _ => None,
        });
        let name = file.file_name().expect("a file name");
        std::fs::write(dir.join(name), rewritten).expect("write a component");
    }
}

/// In a component's `spec.metadata` list (`- name: N` then `value: V`), replaces the value
/// of every `N` for which `replace` answers. Values are written as quoted YAML strings.
pub fn rewrite_metadata(text: &str, replace: impl Fn(&str) -> Option<String>) -> String {
    let mut out = Vec::new();
    let mut pending: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- name:") {
            pending = replace(name.trim());
            out.push(line.to_owned());
            continue;
        }
        if let (Some(value), Some(_)) = (&pending, trimmed.strip_prefix("value:")) {
            let indent = &line[..line.len() - trimmed.len()];
            out.push(format!("{indent}value: {}", yaml_quote(value)));
            pending = None;
            continue;
        }
        out.push(line.to_owned());
    }
    out.join("\n") + "\n"
}

fn yaml_quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

fn http_endpoint_yaml(endpoint: &HttpEndpoint) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: HTTPEndpoint\nmetadata:\n  name: {}\nspec:\n  \
         baseUrl: {}\n",
        endpoint.name,
        yaml_quote(&endpoint.base_url)
    )
}

/// A running (or deliberately killed) daprd. Killed on drop; its log is printed then if
/// the test is failing.
pub struct Daprd {
    dir: tempfile::TempDir,
    options: DaprdBuilder,
    http_port: u16,
    grpc_port: u16,
    internal_grpc_port: u16,
    metrics_port: u16,
    child: Option<Child>,
    starts: u32,
}

impl Daprd {
    pub fn builder(app_id: &str, redis: &RedisServer) -> DaprdBuilder {
        DaprdBuilder::new(app_id, redis)
    }

    pub fn app_id(&self) -> &str {
        &self.options.app_id
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    pub fn internal_grpc_port(&self) -> u16 {
        self.internal_grpc_port
    }

    /// `http://127.0.0.1:<http port>`.
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// `http://127.0.0.1:<grpc port>`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// The invoke URL template the worker's `--status-url` takes through this sidecar.
    pub fn invoke_template(&self) -> String {
        format!(
            "{}/v1.0/invoke/{{plugin_id}}/method/v1/status",
            self.http_endpoint()
        )
    }

    /// The environment a worker next to this sidecar gets (as the injector sets it).
    pub fn worker_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("DAPR_HTTP_PORT".to_owned(), self.http_port.to_string()),
            ("DAPR_GRPC_PORT".to_owned(), self.grpc_port.to_string()),
        ];
        if let Some(token) = &self.options.token {
            env.push(("DAPR_API_TOKEN".to_owned(), token.clone()));
        }
        env
    }

    pub fn token(&self) -> Option<&str> {
        self.options.token.as_deref()
    }

    pub fn resources_dir(&self) -> PathBuf {
        self.dir.path().join("resources")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daprd.log")
    }

    /// Everything the sidecar logged so far (all of its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL (a crash), then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a prepared sidecar (or a killed one) and waits for outbound health.
    pub fn launch(&mut self) {
        self.restart();
    }

    /// Starts the sidecar again on the same ports with the same resources; waits for it.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_process();
        if let Err(why) = self.wait_outbound(READY_TIMEOUT) {
            panic!("daprd did not come back: {why}\n{}", self.log_section());
        }
    }

    /// `GET path` on the sidecar's HTTP port, with `headers`: status and body. Bounded.
    pub fn http_get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        http_request(self.http_port, "GET", path, headers)
    }

    /// Waits until `/v1.0/healthz/outbound` answers 204, at most `timeout`.
    pub fn wait_outbound(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("daprd exited ({status})"));
                }
            } else {
                return Err("daprd is not running".to_owned());
            }
            match try_http(self.http_port, "GET", "/v1.0/healthz/outbound", &[]) {
                Ok((204, _)) => return Ok(()),
                Ok((code, body)) => last = format!("{code} {body}"),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "/v1.0/healthz/outbound on port {} did not answer 204 within {timeout:?} \
                     (last: {last})",
                    self.http_port
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log, framed for a failure message.
    pub fn log_section(&self) -> String {
        format!(
            "--- daprd {} log ({}) ---\n{}\n--- end of daprd {} log ---",
            self.options.app_id,
            self.log_path().display(),
            self.log(),
            self.options.app_id
        )
    }

    fn spawn_process(&mut self) {
        let bin = daprd_binary();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the daprd log");
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.dir.path())
            .args(["--app-id", &self.options.app_id])
            .arg("--resources-path")
            .arg(self.resources_dir())
            .args(["--dapr-http-port", &self.http_port.to_string()])
            .args(["--dapr-grpc-port", &self.grpc_port.to_string()])
            .args([
                "--dapr-internal-grpc-port",
                &self.internal_grpc_port.to_string(),
            ])
            .args(["--metrics-port", &self.metrics_port.to_string()])
            .args(["--metrics-listen-address", "127.0.0.1"])
            .args(["--dapr-listen-addresses", "127.0.0.1"]);
        if !self.options.internal_on_all_addresses {
            cmd.args(["--dapr-internal-grpc-listen-address", "127.0.0.1"]);
        }
        cmd.args(["--log-level", "info"]);
        if let Some(port) = self.options.app_port {
            cmd.args(["--app-port", &port.to_string()])
                .args(["--app-channel-address", "127.0.0.1"]);
        }
        if let Some(token) = &self.options.token {
            cmd.env("DAPR_API_TOKEN", token);
        }
        cmd.args(&self.options.extra_args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log);
        self.starts += 1;
        let child =
            spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot run daprd {}: {e}", bin.display()));
        self.child = Some(child);
    }
}

impl Drop for Daprd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.log_section());
        }
    }
}

/// One HTTP/1.0 request to `127.0.0.1:port` (the server closes after answering): status
/// and body. Bounded by connect and read timeouts.
pub fn try_http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    use std::io::Write;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {response:?}"))?;
    Ok((code, body.to_owned()))
}

/// [`try_http`] that panics on a transport failure.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    try_http(port, method, path, headers).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}
