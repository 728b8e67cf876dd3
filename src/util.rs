//! Small helpers shared by several stages: one copy of each.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// How long an accept loop pauses after `accept()` fails (out of descriptors or
/// memory), instead of spinning.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Lock a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a plain read or update), so a poisoned lock is used as is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A client- or file-controlled string made safe for a log line or an error message:
/// at most `max` characters, control characters and quotes escaped.
pub fn escape(s: &str, max: usize) -> String {
    s.chars().take(max).flat_map(char::escape_debug).collect()
}

/// A host as written in a URL or header, without the brackets of an IPv6 literal.
pub(crate) fn unbracket(host: &str) -> &str {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// Pause an accept loop after a failed `accept()`, logging why.
pub(crate) async fn accept_failed(listener: &str, e: &std::io::Error) {
    tracing::error!(listener, error = %e, "accept failed");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// A random duration in `[0, spread)`.
pub(crate) fn jitter(spread: std::time::Duration) -> std::time::Duration {
    let mut b = [0u8; 8];
    if spread.is_zero() || aws_lc_rs::rand::fill(&mut b).is_err() {
        return std::time::Duration::ZERO;
    }
    spread.mul_f64((u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64)
}
