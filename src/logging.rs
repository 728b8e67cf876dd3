//! tracing setup: text or JSON, level from config (RUST_LOG overrides), colours only
//! on a terminal, optional log file.
//!
//! JSON is one flat object per line (DESIGN.md section 17): the event's fields beside
//! `timestamp`, `level` and `message`, no nested `fields`, `span` or `spans` objects. A
//! session's lines are joined by `request_id` (its access-log line and its refusal or
//! close carry it).

use crate::config::{Log, LogFormat};
use std::io::IsTerminal;
use tracing_subscriber::{EnvFilter, fmt, fmt::writer::BoxMakeWriter};

/// Install the global subscriber. `Err` names what was wrong (e.g. an unwritable file).
pub fn init(log: &Log) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .map_err(|e| format!("log.level: {e}"))?;
    let builder = fmt().with_env_filter(filter).with_target(false);
    // One writer type for a file and stderr, so the format is chosen in one place.
    let (writer, ansi) = match &log.file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("log.file: cannot open {}: {e}", path.display()))?;
            (BoxMakeWriter::new(std::sync::Mutex::new(file)), false)
        }
        None => (BoxMakeWriter::new(std::io::stderr), std::io::stderr().is_terminal()),
    };
    let b = builder.with_ansi(ansi).with_writer(writer);
    let result = match log.format {
        LogFormat::Json => b
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => b.try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// Minimal logging before the config is read (errors of `check`, `token`, `echo`).
pub fn init_default() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
