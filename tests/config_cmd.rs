//! `keel-scraper config` and the logging options, proven against the real binary:
//!
//! - `config` prints every option (every flag of `--help`, each clap option of `Options`,
//!   plus the rows of the environment-only inputs: the Dapr token and the log filter) with
//!   its effective value and its source, `flag`, `env` or `default`, and exits 0; secrets
//!   print as `[redacted]`.
//! - Invalid configuration exits 2 and names the option, for `config` and `run` alike.
//! - `--log-format pretty` is for people: not JSON, no colour codes when piped, the event
//!   names readable; `SCRAPER_LOG` filters the events, `RUST_LOG` only when it is unset.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::CommandFactory;
use keel_scraper::config::{Cli, EnvRole, ENV_ONLY};
use serde_json::Value;

use harness::{run_to_end, Finished};

/// Environment variables for one run.
type Env<'a> = &'a [(&'a str, &'a str)];

/// One row of `config`'s table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    option: String,
    env: String,
    value: String,
    source: String,
}

/// Parses `config`'s table by the header's column offsets (values may contain spaces).
fn parse_table(out: &Finished) -> Vec<Row> {
    let mut lines = out.stdout.iter();
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no output{}", out.dump()));
    let col = |name: &str| {
        header
            .find(name)
            .unwrap_or_else(|| panic!("no {name} column: {header}"))
    };
    let (env, value, source) = (col("ENV"), col("VALUE"), col("SOURCE"));
    assert!(
        header.starts_with("OPTION") && env < value && value < source,
        "{header}"
    );
    lines
        .map(|l| {
            let cell = |a: usize, b: usize| {
                l.get(a..b.min(l.len()))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            Row {
                option: cell(0, env),
                env: cell(env, value),
                value: cell(value, source),
                source: cell(source, l.len()),
            }
        })
        .collect()
}

fn config(args: &[&str], env: &[(&str, &str)]) -> Vec<Row> {
    let mut all = vec!["config"];
    all.extend_from_slice(args);
    let out = run_to_end(&all, env, Duration::from_secs(10));
    assert_eq!(out.code, Some(0), "{}", out.dump());
    parse_table(&out)
}

/// The long options `--help` lists, without `help` and `version`.
fn options_in_help() -> BTreeSet<String> {
    let out = run_to_end(&["--help"], &[], Duration::from_secs(10));
    assert_eq!(out.code, Some(0), "{}", out.dump());
    out.stdout
        .iter()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .split_once(", ")
                .filter(|(short, _)| short.starts_with('-'))
                .map_or(l, |(_, long)| long);
            let name = l.strip_prefix("--")?;
            Some(
                name.split([' ', '=', '<'])
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .filter(|n| !n.is_empty() && n != "help" && n != "version")
        .collect()
}

/// One option as clap defines it (`Options`): what `config` must list for it.
#[derive(Debug)]
struct ClapOption {
    id: String,
    long: String,
    env: String,
    /// Clap's default text, if it has one.
    default: Option<String>,
    /// False for a flag set without a value (`--dry-run`).
    takes_value: bool,
}

/// Every option of the command line, from the clap definitions the binary is built from.
fn clap_options() -> Vec<ClapOption> {
    let mut cmd = Cli::command();
    cmd.build();
    cmd.get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            if long == "help" || long == "version" {
                return None;
            }
            let env = arg
                .get_env()
                .and_then(|e| e.to_str())
                .unwrap_or_else(|| panic!("--{long} reads no environment variable"));
            let defaults = arg.get_default_values();
            Some(ClapOption {
                id: arg.get_id().to_string(),
                long: long.to_string(),
                env: env.to_string(),
                default: (!defaults.is_empty()).then(|| {
                    let texts: Vec<_> = defaults.iter().map(|d| d.to_string_lossy()).collect();
                    texts.join(",")
                }),
                takes_value: arg.get_action().takes_values(),
            })
        })
        .collect()
}

/// The rows `config` prints for the inputs only the environment sets.
fn env_only_rows() -> Vec<&'static str> {
    ENV_ONLY
        .iter()
        .filter_map(|input| match input.role {
            EnvRole::Row(option) => Some(option),
            _ => None,
        })
        .collect()
}

/// The option whose default an environment-only input feeds.
fn fed_by<'a>(options: &'a [ClapOption], id: &str) -> &'a ClapOption {
    options
        .iter()
        .find(|o| o.id == id)
        .unwrap_or_else(|| panic!("ENV_ONLY feeds {id}, which is no option"))
}

/// Every option: (name in `config`, the value this test sets, the value `config` prints
/// for it). Its environment variable is clap's.
const OPTIONS: &[(&str, &str, &str)] = &[
    ("backend", "memory", "memory"),
    (
        "redis-url",
        "redis://127.0.0.1:6390/0",
        "redis://127.0.0.1:6390/0",
    ),
    ("public-store", "pub-a", "pub-a"),
    ("private-store", "priv-a", "priv-a"),
    ("private-key-prefix", "plug", "plug"),
    (
        "status-url",
        "http://127.0.0.1:8080/{plugin_id}/v1/status",
        "http://127.0.0.1:8080/{plugin_id}/v1/status",
    ),
    ("schedule", "*/5 * * * * *", "*/5 * * * * *"),
    ("probe-timeout", "3s", "3s"),
    ("retries", "4", "4"),
    ("concurrency", "8", "8"),
    ("unhealthy-threshold", "3", "3"),
    ("healthy-threshold", "2", "2"),
    ("lease", "7s", "7s"),
    ("foreign-lock-ttl", "45m", "45m"),
    ("holder-id", "pod-x", "pod-x"),
    ("log-format", "pretty", "pretty"),
    (
        "dapr-grpc-endpoint",
        "127.0.0.1:50011",
        "http://127.0.0.1:50011",
    ),
    (
        "dapr-http-endpoint",
        "127.0.0.1:3511",
        "http://127.0.0.1:3511",
    ),
    ("sidecar-wait", "30s", "30s"),
    ("listen", "127.0.0.1:9191", "127.0.0.1:9191"),
    ("shutdown-grace", "3s", "3s"),
    ("status-page", "false", "false"),
    ("max-failed-share", "0.25", "0.25"),
    ("guard-window", "5m", "5m"),
    // A flag without a value: set as `--dry-run` (clap says it takes none).
    ("dry-run", "true", "true"),
];

/// Defaults `config` prints in the project's format rather than as clap's text.
const DEFAULTS_REFORMATTED: &[(&str, &str)] = &[("sidecar-wait", "1m")];

fn row<'a>(rows: &'a [Row], option: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.option == option)
        .unwrap_or_else(|| panic!("config does not print {option}: {rows:#?}"))
}

/// This test's (value set, value shown) for a clap option.
fn set_and_shown(option: &ClapOption) -> (&'static str, &'static str) {
    OPTIONS
        .iter()
        .find(|o| o.0 == option.long)
        .map(|o| (o.1, o.2))
        .unwrap_or_else(|| panic!("--{} is not in this test's OPTIONS", option.long))
}

#[test]
fn config_prints_every_option_with_its_value_and_source() {
    // Every option of --help is a clap option and in the table above, so the three runs
    // cover them all.
    let options = clap_options();
    let help = options_in_help();
    let defined: BTreeSet<String> = options.iter().map(|o| o.long.clone()).collect();
    let listed: BTreeSet<String> = OPTIONS.iter().map(|o| o.0.to_string()).collect();
    assert_eq!(help, defined, "--help options vs the clap options");
    assert_eq!(help, listed, "--help options vs the options this test sets");

    // All from flags.
    let mut args = Vec::new();
    for option in &options {
        args.push(format!("--{}", option.long));
        if option.takes_value {
            args.push(set_and_shown(option).0.to_string());
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let rows = config(&args, &[]);
    // Exactly one row per option and per environment-only row, nothing else.
    let mut names: Vec<&str> = options.iter().map(|o| o.long.as_str()).collect();
    names.extend(env_only_rows());
    let printed: Vec<&str> = rows.iter().map(|r| r.option.as_str()).collect();
    assert_eq!(
        printed.iter().copied().collect::<BTreeSet<_>>(),
        names.iter().copied().collect::<BTreeSet<_>>(),
        "config's rows vs the clap options and ENV_ONLY's rows"
    );
    assert_eq!(
        printed.len(),
        names.len(),
        "a row printed twice: {printed:?}"
    );
    for option in &options {
        let r = row(&rows, &option.long);
        assert_eq!(
            (r.env.as_str(), r.value.as_str(), r.source.as_str()),
            (option.env.as_str(), set_and_shown(option).1, "flag"),
            "{r:?}"
        );
    }
    assert_eq!(row(&rows, "dapr-api-token").source, "default");
    assert_eq!(row(&rows, "log-filter").source, "default");
    for name in env_only_rows() {
        assert_eq!(row(&rows, name).source, "default", "{name}");
    }

    // All from the environment, plus the two options that only exist there.
    let mut env: Vec<(&str, &str)> = options
        .iter()
        .map(|o| (o.env.as_str(), set_and_shown(o).0))
        .collect();
    env.extend([("DAPR_API_TOKEN", "t0ken-config"), ("SCRAPER_LOG", "debug")]);
    let rows = config(&[], &env);
    for option in &options {
        let r = row(&rows, &option.long);
        assert_eq!(
            (r.env.as_str(), r.value.as_str(), r.source.as_str()),
            (option.env.as_str(), set_and_shown(option).1, "env"),
            "{r:?}"
        );
    }
    let token = row(&rows, "dapr-api-token");
    assert_eq!(
        (token.value.as_str(), token.source.as_str()),
        ("[redacted]", "env")
    );
    let filter = row(&rows, "log-filter");
    assert_eq!(
        (filter.value.as_str(), filter.source.as_str()),
        ("debug", "env")
    );

    // Nothing set: defaults, and a flag beats its environment variable.
    let rows = config(&[], &[]);
    for option in &options {
        assert_eq!(
            row(&rows, &option.long).source,
            "default",
            "{}",
            option.long
        );
    }
    // Every default clap knows is the one printed (durations in the project's format).
    for option in &options {
        let Some(default) = &option.default else {
            continue;
        };
        let shown = DEFAULTS_REFORMATTED
            .iter()
            .find(|(name, _)| *name == option.long)
            .map_or(default.as_str(), |(_, shown)| shown);
        assert_eq!(
            row(&rows, &option.long).value,
            shown,
            "default of {}",
            option.long
        );
    }
    let expected_defaults = [
        ("backend", "dapr"),
        ("redis-url", "(unset)"),
        ("schedule", "*/10 * * * * *"),
        ("lease", "10s"),
        ("probe-timeout", "2s"),
        ("retries", "1"),
        ("listen", "0.0.0.0:9090"),
        ("shutdown-grace", "10s"),
        ("status-page", "true"),
        ("max-failed-share", "0.5"),
        ("guard-window", "30m"),
        ("dry-run", "false"),
        (
            "status-url",
            "http://127.0.0.1:3500/v1.0/invoke/{plugin_id}/method/v1/status",
        ),
        ("dapr-api-token", "(unset)"),
        ("log-filter", "info,tokio_cron_scheduler=warn"),
    ];
    for (name, value) in expected_defaults {
        assert_eq!(row(&rows, name).value, value, "default of {name}");
    }
    let rows = config(
        &["--retries", "4"],
        &[
            ("SCRAPER_RETRIES", "7"),
            ("DAPR_HTTP_PORT", "3601"),
            ("DAPR_GRPC_PORT", "50099"),
            ("POD_NAME", "pod-config"),
        ],
    );
    let retries = row(&rows, "retries");
    assert_eq!(
        (retries.value.as_str(), retries.source.as_str()),
        ("4", "flag")
    );
    // The sidecar port variable Dapr injects counts as the environment.
    let http = row(&rows, "dapr-http-endpoint");
    assert_eq!(
        (http.value.as_str(), http.source.as_str()),
        ("http://127.0.0.1:3601", "env")
    );
    let grpc = row(&rows, "dapr-grpc-endpoint");
    assert_eq!(
        (grpc.value.as_str(), grpc.source.as_str()),
        ("http://127.0.0.1:50099", "env")
    );
    // So does every input ENV_ONLY says feeds an option's source; one that feeds only a
    // default (the pod name in the holder id) leaves it a default.
    for input in ENV_ONLY {
        match input.role {
            EnvRole::SourceOf(id) => {
                let r = row(&rows, &fed_by(&options, id).long);
                assert_eq!(r.source, "env", "{:?} set: {r:?}", input.vars);
            }
            EnvRole::DefaultOf(id) => {
                let r = row(&rows, &fed_by(&options, id).long);
                assert_eq!(r.source, "default", "{:?} set: {r:?}", input.vars);
            }
            EnvRole::Row(_) => {}
        }
    }
    let holder = row(&rows, "holder-id");
    assert!(holder.value.starts_with("pod-config-"), "{holder:?}");
    // The status URL's default follows the sidecar endpoint.
    assert_eq!(
        row(&rows, "status-url").value,
        "http://127.0.0.1:3601/v1.0/invoke/{plugin_id}/method/v1/status"
    );
}

#[test]
fn config_redacts_the_redis_password_and_the_dapr_token() {
    let out = run_to_end(
        &[
            "config",
            "--backend",
            "redis",
            "--redis-url",
            "redis://:Hunter2pw@127.0.0.1:6390/0",
        ],
        &[("DAPR_API_TOKEN", "T0kenValue9")],
        Duration::from_secs(10),
    );
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let all = format!("{}{}", out.stdout.join("\n"), out.stderr.join("\n"));
    assert!(
        !all.contains("Hunter2pw") && !all.contains("T0kenValue9"),
        "{all}"
    );
    let rows = parse_table(&out);
    assert_eq!(
        row(&rows, "redis-url").value,
        "redis://:[redacted]@127.0.0.1:6390/0"
    );
    assert_eq!(row(&rows, "dapr-api-token").value, "[redacted]");
}

#[test]
fn invalid_configuration_exits_2_and_names_the_option() {
    let cases: &[(&[&str], Env, &str)] = &[
        (&["config", "--schedule", "* * * * *"], &[], "--schedule"),
        (
            &["config", "--schedule", "every minute please"],
            &[],
            "--schedule",
        ),
        (
            &["config"],
            &[("SCRAPER_SCHEDULE", "61 * * * * *")],
            "SCRAPER_SCHEDULE",
        ),
        (&["config", "--lease", "500ms"], &[], "--lease"),
        (&["config", "--lease", "0s"], &[], "--lease"),
        (
            &["config", "--status-url", "http://127.0.0.1:8080/v1/status"],
            &[],
            "--status-url",
        ),
        (
            &["config"],
            &[("SCRAPER_STATUS_URL", "http://127.0.0.1:8080/status")],
            "SCRAPER_STATUS_URL",
        ),
        (&["config"], &[("SCRAPER_BACKEND", "etcd")], "--backend"),
        (&["config", "--backend", "redis"], &[], "--redis-url"),
        (
            &["config", "--probe-timeout", "soon"],
            &[],
            "--probe-timeout",
        ),
        (&["config", "--concurrency", "0"], &[], "--concurrency"),
        (&["config", "--listen", "everywhere"], &[], "--listen"),
        (&["config", "--log-format", "xml"], &[], "--log-format"),
        (&["config", "--status-page", "maybe"], &[], "--status-page"),
        (
            &["run", "--lease", "500ms", "--listen", "127.0.0.1:0"],
            &[],
            "--lease",
        ),
        (
            &["once", "--backend", "memory", "--schedule", "* * *"],
            &[],
            "--schedule",
        ),
    ];
    for (args, env, option) in cases {
        let out = run_to_end(args, env, Duration::from_secs(10));
        assert_eq!(out.code, Some(2), "{args:?} {env:?}{}", out.dump());
        let stderr = out.stderr.join("\n");
        assert!(
            stderr.contains(option),
            "{args:?} {env:?}: stderr does not name {option}:\n{stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?} {env:?}: nothing is printed as configuration or events{}",
            out.dump()
        );
    }
}

/// `once` on the embedded store: an empty registry (`registry_empty`, WARN), one tick
/// (`tick_started` DEBUG, `tick_completed` INFO).
fn once_memory(extra: &[&str], env: &[(&str, &str)]) -> Finished {
    // Status calls would go through the sidecar by default, and start-up would wait for it.
    let mut args = vec![
        "once",
        "--backend",
        "memory",
        "--status-url",
        "http://127.0.0.1:9/{plugin_id}/v1/status",
    ];
    args.extend_from_slice(extra);
    let out = run_to_end(&args, env, Duration::from_secs(10));
    assert_eq!(out.code, Some(0), "{}", out.dump());
    out
}

fn json_events(out: &Finished) -> Vec<String> {
    out.stdout
        .iter()
        .map(|l| {
            let e: Value =
                serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}"));
            e["event"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

#[test]
fn pretty_logs_are_readable_text_with_the_event_names() {
    for (args, env) in [
        (&["--log-format", "pretty"][..], &[][..]),
        (&[][..], &[("SCRAPER_LOG_FORMAT", "pretty")][..]),
    ] {
        let out = once_memory(args, env);
        assert!(out.stdout.len() >= 2, "{}", out.dump());
        for line in &out.stdout {
            assert!(
                serde_json::from_str::<Value>(line).is_err(),
                "a JSON line in pretty output: {line}"
            );
            assert!(
                !line.contains('\u{1b}'),
                "colour codes in piped output: {line:?}"
            );
        }
        let text = out.stdout.join("\n");
        for needle in ["tick_completed", "registry_empty", "INFO", "WARN"] {
            assert!(
                text.contains(needle),
                "pretty output lacks {needle}:\n{text}"
            );
        }
    }
    // The default is JSON, one event per line.
    let out = once_memory(&[], &[]);
    assert!(
        json_events(&out).contains(&"tick_completed".to_string()),
        "{}",
        out.dump()
    );
}

#[test]
fn scraper_log_filters_events_and_rust_log_applies_only_when_it_is_unset() {
    // (environment, tick_started (DEBUG), tick_completed (INFO), registry_empty (WARN))
    let cases: &[(Env, bool, bool, bool)] = &[
        (&[], false, true, true),
        (&[("SCRAPER_LOG", "warn")], false, false, true),
        (&[("RUST_LOG", "warn")], false, false, true),
        (
            &[("SCRAPER_LOG", "info"), ("RUST_LOG", "warn")],
            false,
            true,
            true,
        ),
        (
            &[("SCRAPER_LOG", "warn"), ("RUST_LOG", "debug")],
            false,
            false,
            true,
        ),
        (&[("SCRAPER_LOG", "debug")], true, true, true),
        (&[("RUST_LOG", "debug")], true, true, true),
        (
            &[("SCRAPER_LOG", ""), ("RUST_LOG", "warn")],
            false,
            false,
            true,
        ),
        (&[("SCRAPER_LOG", "error")], false, false, false),
    ];
    for (env, debug, info, warn) in cases {
        let out = once_memory(&[], env);
        let events = json_events(&out);
        let has = |name: &str| events.iter().any(|e| e == name);
        assert_eq!(
            (
                has("tick_started"),
                has("tick_completed"),
                has("registry_empty")
            ),
            (*debug, *info, *warn),
            "{env:?}{}",
            out.dump()
        );
    }
}

/// Running the real binary to its end (the shared runner: `PATH` and the environment
/// given, output collected, bounded), its output as lines.
mod harness {
    use std::time::Duration;

    use keel_test_support::process::Spawn;

    pub struct Finished {
        pub code: Option<i32>,
        pub stdout: Vec<String>,
        pub stderr: Vec<String>,
    }

    impl Finished {
        pub fn dump(&self) -> String {
            format!(
                "\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.stdout.join("\n"),
                self.stderr.join("\n")
            )
        }
    }

    /// Runs `keel-scraper args` with only the environment given; killed after `timeout`.
    pub fn run_to_end(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Finished {
        let run = Spawn::new(env!("CARGO_BIN_EXE_keel-scraper"))
            .args(args)
            .envs(env.iter().copied())
            .run(timeout);
        let lines = |text: &str| text.lines().map(str::to_string).collect();
        let finished = Finished {
            code: run.code(),
            stdout: lines(&run.stdout),
            stderr: lines(&run.stderr),
        };
        assert!(
            !run.timed_out,
            "{args:?} did not exit within {timeout:?}{}",
            finished.dump()
        );
        finished
    }
}
