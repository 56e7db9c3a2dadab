//! Installs the tracing subscriber: JSON (one object per line) or text, on stdout, filtered
//! by `[log] level` (a `RUST_LOG`-style filter). Access lines share the format and the filter
//! but are written by `access` itself.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The format chosen at start-up; JSON before `init` runs.
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or(LogFormat::Json)
}

/// Installs the global subscriber. A second call (tests) leaves the first in place.
pub fn init(log: &Log) {
    let _already_set = FORMAT.set(log.format);
    let filter = EnvFilter::builder().parse_lossy(&log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _already_set = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
