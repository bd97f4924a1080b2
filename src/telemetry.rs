//! Log subscriber setup, in one place.

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::DEFAULT_LOG_FILTER;

/// Where log lines go: commands that print data (`routes`, `config`) log to stderr so
/// their stdout stays machine-readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

/// The filter from `SCRAPER_LOG`, else `RUST_LOG`, else the default.
pub fn filter() -> EnvFilter {
    let spec = ["SCRAPER_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_string());
    EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER))
}

/// Installs the global subscriber. JSON: one object per line with `timestamp`, `level`,
/// `event` and the event's fields at top level.
pub fn init(format: LogFormat, target: LogTarget) {
    let writer = match target {
        LogTarget::Stdout => BoxMakeWriter::new(std::io::stdout),
        LogTarget::Stderr => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(writer);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_target(false)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder
            .with_target(false)
            .with_ansi(
                target == LogTarget::Stderr || std::io::IsTerminal::is_terminal(&std::io::stdout()),
            )
            .try_init(),
    };
    // A subscriber already installed (tests, the demo) is fine: keep it.
    let _ = result;
}
