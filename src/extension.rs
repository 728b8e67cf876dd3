//! `Sec-WebSocket-Extensions`: permessage-deflate (RFC 7692) offers and answers, for
//! each hop on its own (DESIGN.md section 16). The client's offers are answered here
//! ([`answer_client`]); the gateway's own offer to an upstream and the check of the
//! upstream's answer are [`upstream_offer`] and [`accept_upstream`].
//!
//! What the gateway cannot honour it declines, offer by offer, never the request: a
//! `server_max_window_bits=8` (zlib's raw deflate has no 256-byte window), an unknown or
//! repeated parameter, a value out of range or malformed. A malformed header is read as
//! far as it parses; an offer that does not parse is declined, and the 101 then carries
//! no extension (the client is not refused: it may go on uncompressed).

use http::{HeaderMap, HeaderValue, header};

/// The extension's token.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";
/// The largest LZ77 window RFC 7692 knows, and the one the gateway inflates with.
pub const MAX_WINDOW_BITS: u8 = 15;
/// The smallest window zlib compresses with (it has no raw deflate with 8 bits).
pub const MIN_DEFLATE_WINDOW_BITS: u8 = 9;
/// Offers in one request the gateway looks at; a client listing more is read no further.
const MAX_OFFERS: usize = 16;

/// permessage-deflate as agreed on one hop, seen from the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// Window of the gateway's compressor towards this peer (9..=15).
    pub send_window_bits: u8,
    /// The gateway starts every message it compresses afresh (no back-references to
    /// earlier messages): its compressor is dropped between messages.
    pub send_no_context: bool,
    /// The peer starts every message afresh: the gateway keeps no inflate state between
    /// its messages. A peer that agreed to this and still refers back fails to inflate (1007).
    pub recv_no_context: bool,
}

impl Deflate {
    /// Whether this hop keeps deflate or inflate state between messages.
    pub fn keeps_state(&self) -> bool {
        !self.send_no_context || !self.recv_no_context
    }
}

/// One parsed offer (or answer): its parameters, `None` when one is malformed, repeated
/// or unknown.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Params {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    /// `Some(None)`: the parameter without a value (offers only).
    server_max_window_bits: Option<Option<u8>>,
    client_max_window_bits: Option<Option<u8>>,
}

/// The permessage-deflate elements of every `Sec-WebSocket-Extensions` line, in order:
/// each parsed, or `None` when malformed. Other extensions are skipped.
fn offers(headers: &HeaderMap) -> Vec<Option<Params>> {
    let mut out = Vec::new();
    for line in headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
        // Not ASCII: nothing in this line can be read.
        let Ok(line) = line.to_str() else { continue };
        for element in split_outside_quotes(line, ',') {
            let mut parts = split_outside_quotes(element, ';').into_iter();
            let name = parts.next().unwrap_or("").trim();
            if !name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
                continue;
            }
            if out.len() == MAX_OFFERS {
                return out;
            }
            out.push(params(parts));
        }
    }
    out
}

/// Split at `sep`, not inside a quoted string.
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The parameters of one element; `None` when one is unknown, repeated or malformed.
fn params<'a>(parts: impl Iterator<Item = &'a str>) -> Option<Params> {
    let mut p = Params::default();
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (part.trim(), None),
        };
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() && !p.server_no_context_takeover => p.server_no_context_takeover = true,
            "client_no_context_takeover" if value.is_none() && !p.client_no_context_takeover => p.client_no_context_takeover = true,
            "server_max_window_bits" if p.server_max_window_bits.is_none() => p.server_max_window_bits = Some(bits(value)?),
            "client_max_window_bits" if p.client_max_window_bits.is_none() => p.client_max_window_bits = Some(bits(value)?),
            _ => return None,
        }
    }
    Some(p)
}

/// A value, without the quotes of a quoted string (RFC 7692 section 7.1: a value may be
/// quoted; the values it defines are digits, so an escape is malformed).
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            (!inner.contains(['"', '\\'])).then_some(inner)
        }
        None => Some(v),
    }
}

/// A window-bits value: absent (`None`), or 8..=15 written as a decimal without a
/// leading zero (RFC 7692 section 7.1.2); anything else is malformed.
fn bits(value: Option<&str>) -> Option<Option<u8>> {
    let Some(v) = value else { return Some(None) };
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u8 = v.parse().ok()?;
    (8..=MAX_WINDOW_BITS).contains(&n).then_some(Some(n))
}

/// The gateway's answer to the client's offers on a route with `compression = true`:
/// the first offer it can honour, as agreed, and the header value for the 101; `None`
/// when the client offered none it can.
///
/// With `context_takeover = false` the answer always carries both
/// `server_no_context_takeover` and `client_no_context_takeover` (RFC 7692 lets a
/// server add them to any offer): no state is kept between messages on either side.
pub fn answer_client(headers: &HeaderMap, context_takeover: bool) -> Option<(Deflate, HeaderValue)> {
    offers(headers).into_iter().flatten().find_map(|p| {
        let send_window_bits = match p.server_max_window_bits {
            Some(Some(n)) if n < MIN_DEFLATE_WINDOW_BITS => return None, // declined: no such window
            Some(Some(n)) => n,
            Some(None) => return None, // a value is required in an offer (RFC 7692 7.1.2.1)
            None => MAX_WINDOW_BITS,
        };
        let d = Deflate {
            send_window_bits,
            send_no_context: !context_takeover || p.server_no_context_takeover,
            recv_no_context: !context_takeover || p.client_no_context_takeover,
        };
        let mut answer = String::from(PERMESSAGE_DEFLATE);
        if d.send_no_context {
            answer.push_str("; server_no_context_takeover");
        }
        if d.recv_no_context {
            answer.push_str("; client_no_context_takeover");
        }
        if p.server_max_window_bits.is_some() {
            answer.push_str(&format!("; server_max_window_bits={send_window_bits}"));
        }
        HeaderValue::from_str(&answer).ok().map(|v| (d, v))
    })
}

/// The gateway's offer to an upstream (`upstream_compression = true`): without context
/// takeover it asks the upstream to start every message afresh, so the gateway keeps no
/// inflate state between its messages. No `client_max_window_bits`: the upstream may
/// not limit the gateway's window.
pub fn upstream_offer(context_takeover: bool) -> HeaderValue {
    HeaderValue::from_static(if context_takeover {
        PERMESSAGE_DEFLATE
    } else {
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    })
}

/// Why an upstream's answer is refused (the upstream connection fails, as RFC 6455
/// 9.1 asks of a client given an extension it did not offer or cannot use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the upstream answered with an extension the gateway did not offer or cannot use")]
pub struct BadAnswer;

/// Check the upstream's `Sec-WebSocket-Extensions` against the gateway's offer: no
/// extension (`Ok(None)`), or permessage-deflate once, with parameters an answer may
/// carry.
pub fn accept_upstream(headers: &HeaderMap, offered: bool, context_takeover: bool) -> Result<Option<Deflate>, BadAnswer> {
    let mut found = None;
    for line in headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
        let line = line.to_str().map_err(|_| BadAnswer)?;
        for element in split_outside_quotes(line, ',') {
            let mut parts = split_outside_quotes(element, ';').into_iter();
            let name = parts.next().unwrap_or("").trim();
            if name.is_empty() && element.trim().is_empty() {
                continue;
            }
            if !offered || !name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) || found.is_some() {
                return Err(BadAnswer);
            }
            let p = params(parts).ok_or(BadAnswer)?;
            // The gateway offered no client_max_window_bits; a server window is any 8..=15
            // (the gateway inflates with 15) but must have a value.
            if p.client_max_window_bits.is_some() || p.server_max_window_bits == Some(None) {
                return Err(BadAnswer);
            }
            found = Some(Deflate {
                send_window_bits: MAX_WINDOW_BITS,
                send_no_context: !context_takeover || p.client_no_context_takeover,
                recv_no_context: p.server_no_context_takeover,
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(lines: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for l in lines {
            m.append(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_str(l).unwrap());
        }
        m
    }

    fn answer(lines: &[&str], takeover: bool) -> Option<(Deflate, String)> {
        answer_client(&h(lines), takeover).map(|(d, v)| (d, v.to_str().unwrap().to_string()))
    }

    #[test]
    fn a_browser_offer_is_answered_without_context_takeover() {
        let (d, v) = answer(&["permessage-deflate; client_max_window_bits"], false).unwrap();
        assert_eq!(v, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        assert_eq!((d.send_window_bits, d.send_no_context, d.recv_no_context), (15, true, true));
        assert!(!d.keeps_state());
        // With context takeover on, only what was asked for.
        let (d, v) = answer(&["permessage-deflate; client_max_window_bits"], true).unwrap();
        assert_eq!(v, "permessage-deflate");
        assert!(d.keeps_state());
        let (_, v) = answer(&["permessage-deflate; server_no_context_takeover"], true).unwrap();
        assert_eq!(v, "permessage-deflate; server_no_context_takeover");
    }

    #[test]
    fn window_bits_are_honoured_or_the_offer_declined() {
        let (d, v) = answer(&["permessage-deflate; server_max_window_bits=10"], false).unwrap();
        assert_eq!(d.send_window_bits, 10);
        assert!(v.ends_with("; server_max_window_bits=10"), "{v}");
        let (d, _) = answer(&["permessage-deflate; server_max_window_bits=\"12\""], false).unwrap();
        assert_eq!(d.send_window_bits, 12, "a quoted value");
        // 8 cannot be honoured: that offer is declined, the next one taken.
        assert_eq!(answer(&["permessage-deflate; server_max_window_bits=8"], false), None);
        let (d, _) = answer(
            &["permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9"],
            false,
        )
        .unwrap();
        assert_eq!(d.send_window_bits, 9);
        // Offers on several lines are one list.
        let (d, _) = answer(
            &[
                "x-webkit-deflate-frame",
                "permessage-deflate; server_max_window_bits=8",
                "permessage-deflate",
            ],
            false,
        )
        .unwrap();
        assert_eq!(d.send_window_bits, 15);
    }

    #[test]
    fn malformed_offers_are_declined() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=1e1",
            "permessage-deflate; server_max_window_bits=\"1\\0\"",
            "permessage-deflate; client_max_window_bits=99",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; mystery",
            "permessage-deflate; =",
            "deflate-frame",
            "",
        ] {
            assert_eq!(answer(&[bad], false), None, "{bad}");
        }
        assert_eq!(answer(&[], false), None);
        assert!(
            answer(&["PerMessage-Deflate ; Client_Max_Window_Bits = 10"], false).is_some(),
            "case and spaces"
        );
    }

    #[test]
    fn upstream_answers_are_checked_against_the_offer() {
        let ok = accept_upstream(
            &h(&["permessage-deflate; server_no_context_takeover; client_no_context_takeover"]),
            true,
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!ok.keeps_state());
        let keeps = accept_upstream(&h(&["permessage-deflate"]), true, false).unwrap().unwrap();
        assert!(
            keeps.send_no_context && !keeps.recv_no_context,
            "the upstream keeps its context: so must the inflater"
        );
        assert_eq!(accept_upstream(&h(&[]), true, false), Ok(None));
        for bad in [
            "permessage-deflate; client_max_window_bits=10",
            "permessage-deflate, permessage-deflate",
            "permessage-deflate; server_max_window_bits",
            "x-other",
            "permessage-deflate; bogus",
        ] {
            assert_eq!(accept_upstream(&h(&[bad]), true, false), Err(BadAnswer), "{bad}");
        }
        assert_eq!(
            accept_upstream(&h(&["permessage-deflate"]), false, false),
            Err(BadAnswer),
            "not offered"
        );
        assert_eq!(
            accept_upstream(&h(&["permessage-deflate; server_max_window_bits=8"]), true, false)
                .unwrap()
                .map(|d| d.recv_no_context),
            Some(false)
        );
    }
}
