//! The `keel-scraper` binary: parse, set up logging, run a command, map to an exit code.

use std::process::ExitCode;

use keel_scraper::config::{parse_cli, Command, ProcessEnv, Settings};
use keel_scraper::telemetry::{self, LogTarget};
use keel_scraper::worker::{self, CommandError, Exit};

fn main() -> ExitCode {
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
            Command::Routes { json } => worker::routes(&settings)
                .await
                .map(|rows| print_routes(&rows, json)),
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

fn print_routes(rows: &[worker::RouteRow], json: bool) {
    use std::fmt::Write;
    let mut out = String::new();
    if json {
        match serde_json::to_string(rows) {
            Ok(text) => out = text + "\n",
            // Serializing strings and options cannot fail; say so loudly if it ever does.
            Err(e) => eprintln!("keel-scraper: cannot encode the route table: {e}"),
        }
    } else {
        let width = rows
            .iter()
            .map(|r| r.plugin_id.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(out, "{:<width$}  STATUS", "PLUGIN");
        for r in rows {
            let status = match (&r.status, &r.error) {
                (Some(s), _) => s.clone(),
                (None, Some(e)) => format!("(unreadable: {e})"),
                (None, None) => "(no route)".into(),
            };
            let _ = writeln!(out, "{:<width$}  {status}", r.plugin_id);
        }
    }
    write_stdout(&out);
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
