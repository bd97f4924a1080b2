//! Command line and environment: every option, validated at start.
//!
//! Each option is a flag that may come before or after the command and also reads the
//! environment variable named in the README. [`Settings`] is the validated result; the
//! `config` command prints it with the source of every value. Secrets (the Redis URL's
//! password, `DAPR_API_TOKEN`) are wrapped in [`Secret`] and print as `[redacted]`.
//!
//! An option is written once, as a field of [`Options`] with its clap attributes (and its
//! field in [`Settings`]): `config` lists the clap arguments themselves, showing the text
//! given (or clap's default) unless `Settings::shown` knows better. Inputs with no flag
//! are the rows of [`ENV_ONLY`].

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::schedule::Schedule;
use crate::secret::{redact_url, Secret};

#[derive(Parser, Debug)]
#[command(
    name = "keel-scraper",
    version,
    about = "Keeps tKeel plugin routes true: scrapes every registered plugin's /v1/status and writes changed route statuses"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub options: Options,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Tick on the schedule until SIGTERM or SIGINT.
    Run,
    /// One tick now, then release the lock (exit 0 ok, 1 failed, 3 lock held).
    Once,
    /// Print every registered plugin with its route status and last observation.
    Routes {
        /// One JSON array of rows ({"plugin_id", "status", "since", ...}) on stdout; with
        /// PLUGIN_ID, that plugin's row.
        #[arg(long)]
        json: bool,
        /// Print only this plugin, in full.
        plugin_id: Option<String>,
    },
    /// Print the effective configuration with the source of every value.
    Config,
    /// Run the real worker against simulated plugins and the embedded store.
    Demo,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Dapr,
    Redis,
    Memory,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Dapr => "dapr",
            Backend::Redis => "redis",
            Backend::Memory => "memory",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}; write a duration like 500ms, 2s or 1m"))
}

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// State backend.
    #[arg(
        long,
        global = true,
        env = "SCRAPER_BACKEND",
        value_enum,
        default_value = "dapr"
    )]
    pub backend: Backend,
    /// Redis URL for the redis backend (redis://[:password@]host:port[/db]).
    #[arg(long, global = true, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Public state store (component) name: the routes.
    #[arg(
        long,
        global = true,
        env = "KEEL_PUBLIC_STORE",
        default_value = "keel-public-store"
    )]
    pub public_store: String,
    /// Private state store (component) name: registry, lock, counters.
    #[arg(
        long,
        global = true,
        env = "KEEL_PRIVATE_STORE",
        default_value = "keel-private-store"
    )]
    pub private_store: String,
    /// Key prefix of private keys (redis backend only; under dapr the component decides).
    #[arg(
        long,
        global = true,
        env = "SCRAPER_PRIVATE_KEY_PREFIX",
        default_value = "plugins"
    )]
    pub private_key_prefix: String,
    /// Status URL template containing {plugin_id}.
    #[arg(long, global = true, env = "SCRAPER_STATUS_URL")]
    pub status_url: Option<String>,
    /// Cron schedule, 6 fields, seconds first.
    #[arg(
        long,
        global = true,
        env = "SCRAPER_SCHEDULE",
        default_value = "*/10 * * * * *"
    )]
    pub schedule: String,
    /// Timeout of one probe attempt.
    #[arg(long, global = true, env = "SCRAPER_PROBE_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub probe_timeout: Duration,
    /// Extra attempts after a failed probe.
    #[arg(long, global = true, env = "SCRAPER_RETRIES", default_value_t = 1)]
    pub retries: u32,
    /// Probes in flight at once.
    #[arg(long, global = true, env = "SCRAPER_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Consecutive failed probes that make a passing route FAILED.
    #[arg(
        long,
        global = true,
        env = "SCRAPER_UNHEALTHY_THRESHOLD",
        default_value_t = 2
    )]
    pub unhealthy_threshold: u32,
    /// Consecutive passing reports needed to let traffic through again.
    #[arg(
        long,
        global = true,
        env = "SCRAPER_HEALTHY_THRESHOLD",
        default_value_t = 1
    )]
    pub healthy_threshold: u32,
    /// Lease of the scrape_state lock (default: the schedule's shortest gap).
    #[arg(long, global = true, env = "SCRAPER_LEASE", value_parser = duration)]
    pub lease: Option<Duration>,
    /// Longest TTL a lock record this worker did not write can carry (the old scraper's
    /// `true`); such a record, its TTL invisible through Dapr, is taken over only after
    /// being seen unchanged for this plus one interval.
    #[arg(long, global = true, env = "SCRAPER_FOREIGN_LOCK_TTL", default_value = "31m", value_parser = duration)]
    pub foreign_lock_ttl: Duration,
    /// This replica's identity in the lock (default <POD_NAME or hostname>-<pid>-<4 hex>).
    #[arg(long, global = true, env = "SCRAPER_HOLDER_ID")]
    pub holder_id: Option<String>,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "SCRAPER_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: LogFormat,
    /// Dapr sidecar gRPC endpoint (default 127.0.0.1:$DAPR_GRPC_PORT, else 127.0.0.1:50001).
    #[arg(long, global = true, env = "DAPR_GRPC_ENDPOINT")]
    pub dapr_grpc_endpoint: Option<String>,
    /// Dapr sidecar HTTP endpoint (default 127.0.0.1:$DAPR_HTTP_PORT, else 127.0.0.1:3500).
    #[arg(long, global = true, env = "DAPR_HTTP_ENDPOINT")]
    pub dapr_http_endpoint: Option<String>,
    /// How long start-up waits for the sidecar.
    #[arg(long, global = true, env = "SCRAPER_SIDECAR_WAIT", default_value = "60s", value_parser = duration)]
    pub sidecar_wait: Duration,
    /// Address of the metrics and health server (run only).
    #[arg(
        long,
        global = true,
        env = "SCRAPER_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub listen: SocketAddr,
    /// Time a running tick gets to finish its writes on shutdown.
    #[arg(long, global = true, env = "SCRAPER_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Serve the read-only status page /status and /status.json (run only): true or false.
    #[arg(
        long,
        global = true,
        env = "SCRAPER_STATUS_PAGE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "true|false"
    )]
    pub status_page: bool,
    /// Fleet guard: most share of eligible plugins blocked for failures, in (0, 1]; 1 turns it off.
    #[arg(
        long,
        global = true,
        env = "SCRAPER_MAX_FAILED_SHARE",
        default_value = "0.5"
    )]
    pub max_failed_share: String,
    /// Fleet guard: how long a FAILED route counts as blocked for failures.
    #[arg(long, global = true, env = "SCRAPER_GUARD_WINDOW", default_value = "30m", value_parser = duration)]
    pub guard_window: Duration,
    /// Decide, log and count, but write no route and no store state and never take the lease.
    #[arg(long, global = true, env = "SCRAPER_DRY_RUN")]
    pub dry_run: bool,
}

/// The fleet guard's options: `--max-failed-share` in thousandths, a non-zero window.
fn guard_settings(o: &Options) -> Result<u32, ConfigError> {
    if o.guard_window.is_zero() {
        return Err(ConfigError(
            "--guard-window / SCRAPER_GUARD_WINDOW must be more than 0, e.g. 30m".into(),
        ));
    }
    parse_share(&o.max_failed_share)
}

/// Parses `--max-failed-share`: a decimal in (0, 1] with at most three decimal places,
/// in thousandths.
pub fn parse_share(text: &str) -> Result<u32, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "--max-failed-share / SCRAPER_MAX_FAILED_SHARE {text:?} must be a decimal in (0, 1] with at most three decimal places, e.g. 0.5 (1 turns the fleet guard off)"
        ))
    };
    let t = text.trim();
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || frac.len() > 3 {
        return Err(bad());
    }
    if t.ends_with('.') {
        return Err(bad());
    }
    let int: u32 = if int.is_empty() {
        0
    } else if int.len() > 1 && int.trim_start_matches('0').len() > 1 {
        return Err(bad());
    } else {
        int.parse().map_err(|_| bad())?
    };
    let frac_milli: u32 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
    let milli = int
        .checked_mul(1000)
        .and_then(|m| m.checked_add(frac_milli))
        .ok_or_else(bad)?;
    if milli == 0 || milli > 1000 {
        return Err(bad());
    }
    Ok(milli)
}

/// Invalid configuration: names the option and what to do. Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Where a value came from, for `config`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    Default,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::Default => "default",
        }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub backend: Backend,
    pub redis_url: Option<Secret>,
    pub public_store: String,
    pub private_store: String,
    pub private_key_prefix: String,
    pub status_url: String,
    pub schedule: Schedule,
    pub probe_timeout: Duration,
    pub retries: u32,
    pub concurrency: usize,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub lease: Duration,
    pub foreign_lock_ttl: Duration,
    pub holder_id: String,
    pub log_format: LogFormat,
    pub dapr_grpc_endpoint: String,
    pub dapr_http_endpoint: String,
    pub dapr_api_token: Option<Secret>,
    pub sidecar_wait: Duration,
    pub listen: SocketAddr,
    pub shutdown_grace: Duration,
    pub status_page: bool,
    /// `--max-failed-share` in thousandths (1..=1000).
    pub max_failed_share_milli: u32,
    pub guard_window: Duration,
    pub dry_run: bool,
}

/// One line of `config` output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Effective {
    pub option: String,
    pub env: String,
    pub value: String,
    pub source: &'static str,
}

/// The environment the process reads, injectable for tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// Parses arguments (clap reads the environment for flags itself); usage errors are
/// clap's, with exit code 2.
pub fn parse_cli<I, T>(args: I) -> Result<(Cli, ArgMatches), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    Ok((cli, matches))
}

fn normalize_endpoint(e: &str) -> String {
    let e = e.trim().trim_end_matches('/');
    if e.starts_with("http://") || e.starts_with("https://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

fn default_holder_id(env: &dyn Env) -> String {
    let host = env
        .var("POD_NAME")
        .or_else(|| env.var("HOSTNAME"))
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keel-scraper".to_string());
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// The lease (default: the schedule's shortest gap) and the foreign lock TTL, both at
/// least a second.
fn lease_setting(o: &Options, schedule: &Schedule) -> Result<Duration, ConfigError> {
    let lease = o.lease.unwrap_or_else(|| schedule.interval());
    if lease < Duration::from_secs(1) {
        return Err(ConfigError(format!(
            "--lease / SCRAPER_LEASE is {}; it must be at least 1s (store TTLs are whole seconds)",
            humantime::format_duration(lease)
        )));
    }
    if o.foreign_lock_ttl < Duration::from_secs(1) {
        return Err(ConfigError(format!(
            "--foreign-lock-ttl / SCRAPER_FOREIGN_LOCK_TTL is {}; it must be at least 1s \
             (the longest TTL a lock record this worker did not write can carry, e.g. 31m)",
            humantime::format_duration(o.foreign_lock_ttl)
        )));
    }
    Ok(lease)
}

/// The Redis URL: required by the redis backend, a `redis://` (or `rediss://`,
/// `unix://`) URL whenever given.
fn redis_url_setting(o: &Options) -> Result<Option<Secret>, ConfigError> {
    match (o.backend, &o.redis_url) {
        (Backend::Redis, None) => Err(ConfigError(
            "--redis-url / REDIS_URL is required with --backend redis, e.g. redis://127.0.0.1:6379"
                .into(),
        )),
        (_, Some(u)) => {
            if !(u.starts_with("redis://")
                || u.starts_with("rediss://")
                || u.starts_with("unix://"))
            {
                return Err(ConfigError(format!(
                    "--redis-url / REDIS_URL {:?} is not a redis:// URL",
                    redact_url(u)
                )));
            }
            Ok(Some(Secret::new(u.clone())))
        }
        (_, None) => Ok(None),
    }
}

/// A sidecar endpoint: the one given, else 127.0.0.1 on the port Dapr injects as
/// `port_var`, else on `default_port`.
fn endpoint(given: &Option<String>, env: &dyn Env, port_var: &str, default_port: &str) -> String {
    normalize_endpoint(&given.clone().unwrap_or_else(|| {
        format!(
            "127.0.0.1:{}",
            env.var(port_var).unwrap_or_else(|| default_port.into())
        )
    }))
}

/// The status URL template (default: through the sidecar's HTTP endpoint): an http(s)
/// URL containing `{plugin_id}`.
fn status_url_setting(o: &Options, dapr_http_endpoint: &str) -> Result<String, ConfigError> {
    let status_url = o.status_url.clone().unwrap_or_else(|| {
        format!("{dapr_http_endpoint}/v1.0/invoke/{{plugin_id}}/method/v1/status")
    });
    if !status_url.contains("{plugin_id}") {
        return Err(ConfigError(format!(
            "--status-url / SCRAPER_STATUS_URL {status_url:?} must contain {{plugin_id}}, e.g. http://127.0.0.1:3500/v1.0/invoke/{{plugin_id}}/method/v1/status"
        )));
    }
    if !(status_url.starts_with("http://") || status_url.starts_with("https://")) {
        return Err(ConfigError(format!(
            "--status-url / SCRAPER_STATUS_URL {status_url:?} must start with http:// or https://"
        )));
    }
    Ok(status_url)
}

/// Counts of at least 1, a probe timeout above 0 and store names that are not empty.
fn check_counts_and_stores(o: &Options) -> Result<(), ConfigError> {
    for (name, v) in [
        ("--concurrency / SCRAPER_CONCURRENCY", o.concurrency as u64),
        (
            "--unhealthy-threshold / SCRAPER_UNHEALTHY_THRESHOLD",
            o.unhealthy_threshold.into(),
        ),
        (
            "--healthy-threshold / SCRAPER_HEALTHY_THRESHOLD",
            o.healthy_threshold.into(),
        ),
    ] {
        if v == 0 {
            return Err(ConfigError(format!("{name} must be at least 1")));
        }
    }
    if o.probe_timeout.is_zero() {
        return Err(ConfigError(
            "--probe-timeout / SCRAPER_PROBE_TIMEOUT must be more than 0".into(),
        ));
    }
    for (name, v) in [
        ("--public-store / KEEL_PUBLIC_STORE", &o.public_store),
        ("--private-store / KEEL_PRIVATE_STORE", &o.private_store),
    ] {
        if v.trim().is_empty() {
            return Err(ConfigError(format!("{name} must not be empty")));
        }
    }
    Ok(())
}

/// The private key prefix, without `||`; the redis backend applies it as Dapr applies a
/// component's keyPrefix (`none` for bare keys).
fn private_key_prefix_setting(o: &Options) -> Result<String, ConfigError> {
    if o.private_key_prefix.contains("||") {
        return Err(ConfigError(
            "--private-key-prefix / SCRAPER_PRIVATE_KEY_PREFIX must not contain \"||\"".into(),
        ));
    }
    match o.backend {
        Backend::Redis => match crate::store::redis::KeyPrefix::parse(&o.private_key_prefix) {
            Ok(crate::store::redis::KeyPrefix::Bare) => Ok("none".to_owned()),
            Ok(crate::store::redis::KeyPrefix::Fixed(prefix)) => Ok(prefix),
            Err(why) => Err(ConfigError(format!(
                "--private-key-prefix / SCRAPER_PRIVATE_KEY_PREFIX {why}"
            ))),
        },
        _ => Ok(o.private_key_prefix.clone()),
    }
}

/// The holder id given (not empty), else `<POD_NAME or hostname>-<pid>-<4 hex>`.
fn holder_id_setting(o: &Options, env: &dyn Env) -> Result<String, ConfigError> {
    match &o.holder_id {
        Some(h) if h.trim().is_empty() => Err(ConfigError(
            "--holder-id / SCRAPER_HOLDER_ID must not be empty".into(),
        )),
        Some(h) => Ok(h.clone()),
        None => Ok(default_holder_id(env)),
    }
}

/// What an input read only from the environment (no flag, no clap argument) does in
/// `config`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum EnvRole {
    /// A row of its own, named so; its value is `env` when one of the variables is set.
    Row(&'static str),
    /// Feeds the default of this clap option (by id), whose source then reads `env`.
    SourceOf(&'static str),
    /// Feeds the default of this clap option (by id), which stays a default.
    DefaultOf(&'static str),
}

/// An environment-only input: its variables (the first set wins) and its role.
#[derive(Copy, Clone, Debug)]
pub struct EnvInput {
    pub vars: &'static [&'static str],
    pub role: EnvRole,
}

/// Every input read only from the environment; the options are the clap arguments of
/// [`Options`], and `config` lists both.
pub const ENV_ONLY: &[EnvInput] = &[
    EnvInput {
        vars: &["DAPR_API_TOKEN"],
        role: EnvRole::Row("dapr-api-token"),
    },
    EnvInput {
        vars: &["SCRAPER_LOG", "RUST_LOG"],
        role: EnvRole::Row("log-filter"),
    },
    EnvInput {
        vars: &["DAPR_GRPC_PORT"],
        role: EnvRole::SourceOf("dapr_grpc_endpoint"),
    },
    EnvInput {
        vars: &["DAPR_HTTP_PORT"],
        role: EnvRole::SourceOf("dapr_http_endpoint"),
    },
    EnvInput {
        vars: &["POD_NAME"],
        role: EnvRole::DefaultOf("holder_id"),
    },
];

impl EnvInput {
    /// The value of the first of its variables that is set, with that variable's name.
    fn lookup(&self, env: &dyn Env) -> Option<(String, &'static str)> {
        self.vars
            .iter()
            .find_map(|name| env.var(name).map(|v| (v, *name)))
    }
}

/// The matches holding option `id`: the command's own, else the subcommand's when the
/// flag came after the command.
fn matches_of<'a>(matches: &'a ArgMatches, id: &str) -> Option<&'a ArgMatches> {
    if matches.value_source(id).is_some() {
        return Some(matches);
    }
    matches.subcommand().map(|(_, sub)| sub).filter(|sub| {
        sub.try_get_raw(id).ok().flatten().is_some() && sub.value_source(id).is_some()
    })
}

/// Where option `id`'s value came from.
fn source_of(matches: &ArgMatches, id: &str) -> Source {
    match matches_of(matches, id).and_then(|m| m.value_source(id)) {
        Some(ValueSource::CommandLine) => Source::Flag,
        Some(ValueSource::EnvVariable) => Source::Env,
        _ => Source::Default,
    }
}

/// Option `id`'s text as given (or clap's default), `(unset)` when there is none.
fn raw_of(matches: &ArgMatches, id: &str) -> String {
    let raw = matches_of(matches, id).and_then(|m| m.try_get_raw(id).ok().flatten());
    match raw {
        Some(values) => values
            .map(|v| v.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(","),
        None => "(unset)".into(),
    }
}

impl Settings {
    pub fn from_options(o: &Options, env: &dyn Env) -> Result<Settings, ConfigError> {
        let schedule = Schedule::parse(&o.schedule)
            .map_err(|e| ConfigError(format!("--schedule / SCRAPER_SCHEDULE: {e}")))?;
        let lease = lease_setting(o, &schedule)?;
        let redis_url = redis_url_setting(o)?;
        let dapr_grpc_endpoint = endpoint(&o.dapr_grpc_endpoint, env, "DAPR_GRPC_PORT", "50001");
        let dapr_http_endpoint = endpoint(&o.dapr_http_endpoint, env, "DAPR_HTTP_PORT", "3500");
        let status_url = status_url_setting(o, &dapr_http_endpoint)?;
        check_counts_and_stores(o)?;
        let private_key_prefix = private_key_prefix_setting(o)?;
        let max_failed_share_milli = guard_settings(o)?;
        let holder_id = holder_id_setting(o, env)?;
        Ok(Settings {
            backend: o.backend,
            redis_url,
            public_store: o.public_store.clone(),
            private_store: o.private_store.clone(),
            private_key_prefix,
            status_url,
            schedule,
            probe_timeout: o.probe_timeout,
            retries: o.retries,
            concurrency: o.concurrency,
            unhealthy_threshold: o.unhealthy_threshold,
            healthy_threshold: o.healthy_threshold,
            lease,
            foreign_lock_ttl: o.foreign_lock_ttl,
            holder_id,
            log_format: o.log_format,
            dapr_grpc_endpoint,
            dapr_http_endpoint,
            dapr_api_token: env.var("DAPR_API_TOKEN").map(Secret::new),
            sidecar_wait: o.sidecar_wait,
            listen: o.listen,
            shutdown_grace: o.shutdown_grace,
            status_page: o.status_page,
            max_failed_share_milli,
            guard_window: o.guard_window,
            dry_run: o.dry_run,
        })
    }

    /// Every option with its effective value and source, secrets redacted: first the clap
    /// arguments of [`Options`] in their order, then the rows of [`ENV_ONLY`].
    pub fn effective(&self, matches: &ArgMatches, env: &dyn Env) -> Vec<Effective> {
        let cmd = Cli::command();
        let options = cmd.get_arguments().filter_map(|arg| {
            let (long, var) = (arg.get_long()?, arg.get_env()?.to_str()?);
            let id = arg.get_id().as_str();
            let mut source = source_of(matches, id);
            let fed = |i: &EnvInput| {
                matches!(i.role, EnvRole::SourceOf(of) if of == id) && i.lookup(env).is_some()
            };
            if source == Source::Default && ENV_ONLY.iter().any(fed) {
                source = Source::Env;
            }
            Some(Effective {
                option: long.to_string(),
                env: var.to_string(),
                value: self.shown(id).unwrap_or_else(|| raw_of(matches, id)),
                source: source.as_str(),
            })
        });
        let rows = ENV_ONLY.iter().filter_map(|input| match input.role {
            EnvRole::Row(option) => {
                let found = input.lookup(env);
                Some(Effective {
                    option: option.to_string(),
                    env: input.vars[0].to_string(),
                    source: found
                        .as_ref()
                        .map_or(Source::Default, |_| Source::Env)
                        .as_str(),
                    value: self.env_only_shown(option, found.map(|(v, _)| v)),
                })
            }
            EnvRole::SourceOf(_) | EnvRole::DefaultOf(_) => None,
        });
        options.chain(rows).collect()
    }

    /// The effective value of clap option `id` where its raw text would be wrong: secrets
    /// redacted, durations in the project's format, defaults that depend on other options
    /// or the environment, values normalised by validation. `None`: the raw text is right.
    fn shown(&self, id: &str) -> Option<String> {
        let d = |v: Duration| Some(humantime::format_duration(v).to_string());
        match id {
            "redis_url" => Some(
                self.redis_url
                    .as_ref()
                    .map_or_else(|| "(unset)".into(), |u| redact_url(u.expose())),
            ),
            "private_key_prefix" => Some(self.private_key_prefix.clone()),
            "status_url" => Some(self.status_url.clone()),
            "schedule" => Some(self.schedule.text().to_string()),
            "probe_timeout" => d(self.probe_timeout),
            "retries" => Some(self.retries.to_string()),
            "concurrency" => Some(self.concurrency.to_string()),
            "unhealthy_threshold" => Some(self.unhealthy_threshold.to_string()),
            "healthy_threshold" => Some(self.healthy_threshold.to_string()),
            "lease" => d(self.lease),
            "foreign_lock_ttl" => d(self.foreign_lock_ttl),
            "holder_id" => Some(self.holder_id.clone()),
            "dapr_grpc_endpoint" => Some(self.dapr_grpc_endpoint.clone()),
            "dapr_http_endpoint" => Some(self.dapr_http_endpoint.clone()),
            "sidecar_wait" => d(self.sidecar_wait),
            "listen" => Some(self.listen.to_string()),
            "shutdown_grace" => d(self.shutdown_grace),
            "max_failed_share" => Some(crate::plan::share_text(self.max_failed_share_milli.into())),
            "guard_window" => d(self.guard_window),
            _ => None,
        }
    }

    /// The value shown for an environment-only row, given the value found (if any).
    fn env_only_shown(&self, option: &str, found: Option<String>) -> String {
        match option {
            "dapr-api-token" if self.dapr_api_token.is_some() => "[redacted]".into(),
            "log-filter" => found.unwrap_or_else(|| crate::DEFAULT_LOG_FILTER.to_string()),
            // A row without a formatter of its own never prints what it read.
            _ => "(unset)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn settings(
        args: &[&str],
        env: &[(&'static str, &'static str)],
    ) -> Result<Settings, ConfigError> {
        let (cli, _) = parse_cli(std::iter::once("keel-scraper").chain(args.iter().copied()))
            .map_err(|e| ConfigError(e.to_string()))?;
        Settings::from_options(&cli.options, &MapEnv(env.iter().copied().collect()))
    }

    #[test]
    fn options_may_come_after_the_command() {
        let s = settings(&["once", "--backend", "memory", "--retries", "3"], &[]).unwrap();
        assert_eq!(s.backend, Backend::Memory);
        assert_eq!(s.retries, 3);
    }

    #[test]
    fn defaults_follow_the_sidecar_ports_and_the_schedule() {
        let s = settings(
            &["--backend", "memory", "run"],
            &[("DAPR_HTTP_PORT", "3601"), ("POD_NAME", "pod-a")],
        )
        .unwrap();
        assert_eq!(s.dapr_http_endpoint, "http://127.0.0.1:3601");
        assert_eq!(s.dapr_grpc_endpoint, "http://127.0.0.1:50001");
        assert_eq!(
            s.status_url,
            "http://127.0.0.1:3601/v1.0/invoke/{plugin_id}/method/v1/status"
        );
        assert_eq!(s.lease, Duration::from_secs(10));
        assert!(
            s.holder_id
                .starts_with(&format!("pod-a-{}-", std::process::id())),
            "{}",
            s.holder_id
        );
        assert_eq!(s.holder_id.rsplit('-').next().unwrap().len(), 4);
    }

    #[test]
    fn endpoints_accept_with_or_without_scheme() {
        let s = settings(
            &[
                "run",
                "--dapr-grpc-endpoint",
                "localhost:1",
                "--dapr-http-endpoint",
                "http://localhost:2/",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.dapr_grpc_endpoint, "http://localhost:1");
        assert_eq!(s.dapr_http_endpoint, "http://localhost:2");
    }

    #[test]
    fn bad_values_name_the_option() {
        let cases: &[(&[&str], &str)] = &[
            (&["run", "--schedule", "* * * * *"], "--schedule"),
            (&["run", "--status-url", "http://x/status"], "--status-url"),
            (&["run", "--lease", "500ms"], "--lease"),
            (&["run", "--backend", "redis"], "--redis-url"),
            (&["run", "--concurrency", "0"], "--concurrency"),
        ];
        for (args, needle) in cases {
            let err = settings(args, &[]).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        // Clap rejects an unknown backend itself.
        assert!(parse_cli(["keel-scraper", "run", "--backend", "etcd"]).is_err());
    }

    #[test]
    fn token_and_password_never_print() {
        let s = settings(
            &[
                "run",
                "--backend",
                "redis",
                "--redis-url",
                "redis://:pa55word@h:6379",
            ],
            &[("DAPR_API_TOKEN", "t0ken")],
        )
        .unwrap();
        let (_, m) = parse_cli([
            "keel-scraper",
            "run",
            "--backend",
            "redis",
            "--redis-url",
            "redis://:pa55word@h:6379",
        ])
        .unwrap();
        let env = MapEnv([("DAPR_API_TOKEN", "t0ken")].into_iter().collect());
        let printed = format!(
            "{s:?} {}",
            serde_json::to_string(&s.effective(&m, &env)).unwrap()
        );
        assert!(
            !printed.contains("pa55word") && !printed.contains("t0ken"),
            "{printed}"
        );
    }

    #[test]
    fn sources_are_reported() {
        let (cli, m) = parse_cli(["keel-scraper", "config", "--retries", "4"]).unwrap();
        let env = MapEnv(HashMap::new());
        let s = Settings::from_options(&cli.options, &env).unwrap();
        let eff = s.effective(&m, &env);
        let get = |o: &str| eff.iter().find(|e| e.option == o).unwrap().clone();
        assert_eq!(get("retries").source, "flag");
        assert_eq!(get("retries").value, "4");
        assert_eq!(get("backend").source, "default");
    }
}
