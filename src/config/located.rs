//! Config errors that name the file, the line and the key, and values that remember
//! the line they came from so loading errors later can point at it too.

use std::fmt;

/// A config error: which file, which line, which key, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}: {}", self.file, line, self.key, self.message),
            None => write!(f, "{}: {}: {}", self.file, self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A value with the config line it came from, so later loading errors can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub key: String,
    pub line: Option<usize>,
}

impl<T> Located<T> {
    /// An error about this value, for the config file `file`.
    pub fn error(&self, file: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            line: self.line,
            key: self.key.clone(),
            message: message.into(),
        }
    }
}

/// Turn a TOML/serde error into a [`ConfigError`] without echoing the source line
/// (it could hold a secret pasted where it does not belong).
pub(super) fn toml_error(src: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let (line, key) = match e.span() {
        Some(span) => (Some(line_of(src, span.start)), key_at(src, span.start)),
        None => (None, "(file)".to_string()),
    };
    ConfigError {
        file: origin.to_string(),
        line,
        key,
        message: e.message().trim().to_string(),
    }
}

/// The 1-based line of byte `offset`.
pub(super) fn line_of(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Best-effort `table.key` name for the config position `offset`, from the text around it.
fn key_at(src: &str, offset: usize) -> String {
    let offset = offset.min(src.len());
    let line_start = src[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = src[line_start..].lines().next().unwrap_or("");
    let key: String = match line.split_once('=') {
        Some((k, _)) => k.trim().to_string(),
        None => line.trim().trim_matches(|c| c == '[' || c == ']').to_string(),
    };
    let table = src[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .filter(|t| !t.is_empty());
    let key: String = key.chars().filter(|c| !c.is_control()).take(64).collect();
    // An error always names something: the table, or the file, when no key can be read.
    match table {
        Some(t) if key.trim().is_empty() => t,
        Some(t) if !line.trim_start().starts_with('[') => format!("{t}.{key}"),
        _ if key.trim().is_empty() => "(file)".to_string(),
        _ => key,
    }
}

/// The line of `leaf` inside `[table]` (or the first `[[table]]`), by scanning the text.
pub(super) fn find_key_line(src: &str, table: &str, leaf: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        } else if current == table && t.split_once('=').is_some_and(|(k, _)| k.trim() == leaf) {
            return Some(i + 1);
        }
    }
    None
}
