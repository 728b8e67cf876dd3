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

/// A name reduced to its letters and digits, lower case: how proxies and frameworks
/// conflate header and parameter names (case; CGI maps `-`, `.`, `~` alike to `_`).
pub(crate) fn name_key(name: &str) -> impl Iterator<Item = u8> + '_ {
    name.bytes().filter(u8::is_ascii_alphanumeric).map(|b| b.to_ascii_lowercase())
}

/// Longest [`name_key`] kept on the stack by [`name_key_in`]; every key the gateway
/// compares against by its own lists is shorter.
pub(crate) const NAME_KEY_MAX: usize = 64;

/// [`name_key`] of `name` written into `buf`: `None` when it is longer than the buffer
/// (then it equals no key of at most [`NAME_KEY_MAX`] bytes).
pub(crate) fn name_key_in<'b>(name: &str, buf: &'b mut [u8; NAME_KEY_MAX]) -> Option<&'b [u8]> {
    let mut n = 0;
    for b in name_key(name) {
        *buf.get_mut(n)? = b;
        n += 1;
    }
    Some(&buf[..n])
}

/// Header names compared the way proxies and frameworks conflate them ([`name_key`]).
pub(crate) fn same_header(a: &str, b: &str) -> bool {
    name_key(a).eq(name_key(b))
}

/// `bytes` in lower-case hex, in one allocation (digests, fingerprints, random ids).
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    // Hex digits are ASCII: never the empty fallback.
    String::from_utf8(out).unwrap_or_default()
}

/// `bytes` in lower-case hex written into `out` (two digits a byte; `out` is that long).
pub(crate) fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// Milliseconds since `start`, for a time kept in an `AtomicU64` relative to it.
pub(crate) fn millis_since(start: tokio::time::Instant) -> u64 {
    start.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
}

/// An address as a header value: IPv4 written digit by digit (the per-request common case,
/// without the formatting machinery), IPv4-mapped IPv6 as IPv4, other IPv6 in RFC 5952 text.
pub(crate) fn ip_header_value(ip: std::net::IpAddr) -> Option<http::HeaderValue> {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            let mut buf = [0u8; 15];
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            http::HeaderValue::from_bytes(&buf[..n]).ok()
        }
        v6 => http::HeaderValue::from_str(&v6.to_string()).ok(),
    }
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

/// The port written in a URL authority (`host`, `host:port`, `[v6]:port`): `Ok(None)`
/// when there is none, `Err` when it is empty, zero or not a number up to 65535 (a
/// parser that drops such a port would silently use the default one instead).
pub(crate) fn authority_port(authority: &str) -> Result<Option<u16>, ()> {
    let port = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']').ok_or(())?.1 {
            "" => return Ok(None),
            rest => rest.strip_prefix(':').ok_or(())?,
        }
    } else {
        match authority.rsplit_once(':') {
            None => return Ok(None),
            Some((_, p)) => p,
        }
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(Some(p)),
        _ => Err(()),
    }
}

/// The byte `b[i..i + 3]` encodes when it is a `%XX` escape.
pub(crate) fn escaped_byte(b: &[u8], i: usize) -> Option<u8> {
    let hex = |c: u8| (c as char).to_digit(16);
    match b.get(i..i + 3)? {
        [b'%', h, l] => Some((hex(*h)? * 16 + hex(*l)?) as u8),
        _ => None,
    }
}

/// Percent-decode once; invalid escapes stay as they are, invalid UTF-8 is replaced.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match escaped_byte(b, i) {
            Some(c) => {
                out.push(c);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The entries of every `Sec-WebSocket-Protocol` header, trimmed.
pub(crate) fn protocols(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// `AsyncRead` and `AsyncWrite` for an enum whose every variant holds one stream: each
/// call goes to the stream of the variant at hand (static dispatch, no boxing).
macro_rules! delegate_io {
    ($ty:ident { $($variant:ident),+ $(,)? }) => {
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(io) => std::pin::Pin::new(io).poll_read(cx, buf),)+
                }
            }
        }

        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(io) => std::pin::Pin::new(io).poll_write(cx, buf),)+
                }
            }
            fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(io) => std::pin::Pin::new(io).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(io) => std::pin::Pin::new(io).poll_shutdown(cx),)+
                }
            }
            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(io) => std::pin::Pin::new(io).poll_write_vectored(cx, bufs),)+
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $($ty::$variant(io) => io.is_write_vectored(),)+
                }
            }
        }
    };
}
pub(crate) use delegate_io;

#[cfg(test)]
mod authority_tests {
    use super::authority_port;

    #[test]
    fn a_written_port_is_valid_or_refused_never_dropped() {
        assert_eq!(authority_port("acme.example"), Ok(None));
        assert_eq!(authority_port("acme.example:14000"), Ok(Some(14000)));
        assert_eq!(authority_port("[::1]"), Ok(None));
        assert_eq!(authority_port("[::1]:443"), Ok(Some(443)));
        for bad in [
            "acme.example:",
            "acme.example:70000",
            "acme.example:0",
            "acme.example:+1",
            "[::1]:",
            "[::1",
            "[::1]x",
        ] {
            assert_eq!(authority_port(bad), Err(()), "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xab, 0xff, 0x10]), "000fabff10");
        assert_eq!(super::hex(&[]), "");
    }

    #[test]
    fn an_address_header_value_is_the_address_text() {
        for text in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "192.168.1.10",
            "1.20.255.3",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = text.parse().unwrap();
            assert_eq!(super::ip_header_value(ip).unwrap(), text);
        }
        let mapped: std::net::IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        assert_eq!(super::ip_header_value(mapped).unwrap(), "203.0.113.9");
    }
}
