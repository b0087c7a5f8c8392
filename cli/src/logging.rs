//! Diagnostics on stderr: the tracing subscriber, in text for people or JSON for log
//! shippers (`--log-format`, or `log_format` in a broker's or agent's `--config`).
//!
//! Invariants:
//! - Colours (ANSI escapes) only when stderr is a terminal: journald, files and pipes
//!   get plain text.
//! - JSON is one object per line and nothing else on stderr, so each line parses.
//! - Logging never stops the program: lines that cannot be written are dropped
//!   ([`crate::output::QuietStderr`]).

use std::io::IsTerminal;
use std::path::Path;

use serde::Deserialize;

use crate::output;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, fields, spans.
    Json,
}

/// `log_format` from a broker's or agent's config file, if the file sets it. A file
/// that cannot be read or parsed yields None here: the command itself reads it next
/// and reports the error properly, with the path and exit status 2.
pub fn format_from_config(path: &Path) -> Option<LogFormat> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    let value = table
        .get("log_format")
        .or_else(|| table.get("log-format"))?;
    LogFormat::deserialize(value.clone()).ok()
}

/// Installs the global subscriber; `default_filter` applies unless `RUST_LOG` is set.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // A dead stderr (a log shipper that died, `2>&1 | head`) must not stop the
    // program: the default writer's errors make tracing-subscriber `eprintln!`, which
    // panics on a broken pipe in whatever task logged (the broker session, the signal
    // handler...). Lines that cannot be written are dropped instead.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(output::QuietStderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}
