//! The `keel-scraper` binary: parse, set up logging, run a command, map to an exit code.

use std::process::ExitCode;

use keel_scraper::config::{parse_cli, Command, ProcessEnv, Settings};
use keel_scraper::telemetry::{self, LogTarget};
use keel_scraper::worker::{self, CommandError, Exit};

/// Arenas glibc's allocator may keep unless the operator says otherwise.
const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`], unless `MALLOC_ARENA_MAX` is set (then
/// glibc follows it). By default glibc gives each thread that allocates its own arena and
/// keeps what each frees for that arena alone: the runtime's threads, the probes and the
/// store's reads allocate on different threads, and at 50 000 plugins the peak RSS of
/// `once` was 46 MiB against 41 MiB with two arenas (README, Performance).
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` only changes the allocator's tuning; called first thing in
        // `main`, before any thread of ours exists. It returns 0 when it refuses, which
        // leaves glibc's default in place: nothing to handle.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    let (cli, matches) = match parse_cli(std::env::args_os()) {
        Ok(p) => p,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let settings = match Settings::from_options(&cli.options, &ProcessEnv) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keel-scraper: {e}");
            return ExitCode::from(Exit::Usage as u8);
        }
    };
    let target = match cli.command {
        Command::Routes { .. } | Command::Config => LogTarget::Stderr,
        _ => LogTarget::Stdout,
    };
    telemetry::init(settings.log_format, target);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keel-scraper: cannot start the async runtime: {e}");
            return ExitCode::from(Exit::Failed as u8);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => worker::run(&settings, signal()).await,
            Command::Once => tokio::select! {
                r = worker::once(&settings) => r,
                signal = signal() => Err(CommandError::Interrupted { signal, note: "; the lease expires by its TTL" }),
            },
            Command::Demo => tokio::select! {
                r = keel_scraper::demo::run(&settings) => r,
                signal = signal() => Err(CommandError::Interrupted { signal, note: "" }),
            },
            Command::Routes { json, plugin_id } => worker::routes(&settings)
                .await
                .and_then(|report| print_routes(&report, json, plugin_id.as_deref())),
            Command::Config => {
                print_config(&settings, &matches);
                Ok(())
            }
        }
    });
    // Let the runtime's tasks wind down without waiting on blocked I/O.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::from(Exit::Ok as u8),
        Err(e) => {
            eprintln!("keel-scraper: {e}");
            ExitCode::from(e.exit() as u8)
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers at once (so a signal during start-up is
/// caught too) and resolves with the signal's name when one arrives.
fn signal() -> impl std::future::Future<Output = String> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers the process can still be killed; never resolve.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM".into(),
            _ = int.recv() => "SIGINT".into(),
        }
    }
}

/// Writes command output to stdout. A closed pipe (`| head`) is not an error worth a
/// panic: the reader has what it wanted.
fn write_stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `routes`: the table, one plugin in full, or either as JSON. Text output escapes every
/// control character a plugin's own text may carry.
fn print_routes(
    report: &keel_scraper::observations::StatusReport,
    json: bool,
    plugin_id: Option<&str>,
) -> Result<(), CommandError> {
    use keel_scraper::observations::{render_one, render_table};
    let encode = |v: Result<String, serde_json::Error>| match v {
        Ok(text) => text + "\n",
        // Serializing strings, numbers and options cannot fail; say so loudly if it does.
        Err(e) => {
            eprintln!("keel-scraper: cannot encode the route table: {e}");
            String::new()
        }
    };
    let out = match plugin_id {
        None if json => encode(serde_json::to_string(&report.plugins)),
        None => render_table(report),
        Some(id) => match report.plugins.iter().find(|r| r.plugin_id == id) {
            None => {
                return Err(CommandError::NotRegistered {
                    plugin_id: id.to_string(),
                    registered: report.plugins.len(),
                })
            }
            Some(row) if json => encode(serde_json::to_string(row)),
            Some(row) => render_one(report, row),
        },
    };
    write_stdout(&out);
    Ok(())
}

fn print_config(settings: &Settings, matches: &clap::ArgMatches) {
    use std::fmt::Write;
    let rows = settings.effective(matches, &ProcessEnv);
    let w1 = rows.iter().map(|r| r.option.len()).max().unwrap_or(0);
    let w2 = rows.iter().map(|r| r.env.len()).max().unwrap_or(0);
    let w3 = rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<w1$}  {:<w2$}  {:<w3$}  SOURCE",
        "OPTION", "ENV", "VALUE"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<w1$}  {:<w2$}  {:<w3$}  {}",
            r.option, r.env, r.value, r.source
        );
    }
    write_stdout(&out);
}
