//! Routes with `refresh = true` (DESIGN.md section 15): client text messages of at most
//! [`MAX_REFRESH_MESSAGE`] bytes are held whole (in the decoder's assembly buffer, never
//! more than that) instead of streaming, and a message that is exactly a JSON object
//! with one member `"token"` holding a string is a refresh: it goes no further and
//! `process` stops behind it with [`Event::Refresh`], so nothing the client sent after
//! it is relayed before the session has judged it. Any other message goes on whole as
//! one frame under a gateway key, as a validated message does.
//!
//! The size is decided frame by frame from the headers, so a message is never cut
//! inside a frame: a first frame larger than the limit streams at once; a continuation
//! that would take the message past it first sends what was held as a non-final frame,
//! then streams. Compressed messages are judged on what they inflate to (their frames
//! are taken apart anyway): past the limit, what was held goes on to the receiver's
//! codec and the rest streams.
//!
//! Everything else (the rate, `max_fragments`, UTF-8, the message limit) applies to
//! these messages as to any other: a refresh pays like a message.

use super::{Core, Event, Side, Stop, validated::Mode};
use crate::wire::{self, OP_CONTINUATION, OP_TEXT};
use serde::Deserialize;

/// Client text messages up to this size (after inflation) are held and looked at;
/// larger ones are never refreshes and stream as always.
pub(crate) const MAX_REFRESH_MESSAGE: usize = 16 * 1024;

/// The only shape of a refresh: `{"token": "..."}`, no other member, no duplicate.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshMessage {
    token: String,
}

/// The token of a refresh message: `text` is a JSON object (whitespace around it and
/// between its tokens is JSON's own) with exactly one member, `"token"`, whose value
/// is a string. Anything else (other members, a duplicate `token`, a number, an array,
/// not JSON at all) is no refresh, and is relayed.
pub fn refresh_token(text: &[u8]) -> Option<String> {
    // serde reads a struct from a JSON array too (`["t"]`): only an object is a refresh.
    let first = text.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    if *first != b'{' {
        return None;
    }
    serde_json::from_slice::<RefreshMessage>(text).ok().map(|m| m.token)
}

impl Core {
    /// The session's route has `refresh = true`: client text messages are looked at.
    pub(in crate::relay) fn look_for_refreshes(&mut self) {
        self.dec[Side::Client as usize].refresh = true;
    }

    /// How a client data frame is handled on a route with `refresh = true`, given how
    /// validation would handle it (`mode`): a text message that may still be a refresh
    /// is held ([`Mode::Probe`]). Called only after [`Core::look_for_refreshes`].
    pub(super) fn probe_mode(&mut self, h: &wire::Header, mode: Mode) -> Mode {
        let coded = self.coded(Side::Client);
        let dec = &self.dec[Side::Client as usize];
        match h.opcode {
            // A frame larger than the limit is streamed from its header on.
            OP_TEXT if mode == Mode::Stream && (coded || h.len <= MAX_REFRESH_MESSAGE as u64) => Mode::Probe,
            OP_CONTINUATION if dec.mode == Mode::Probe => {
                if coded || dec.message_len.saturating_add(h.len) <= MAX_REFRESH_MESSAGE as u64 {
                    return Mode::Probe;
                }
                self.spill(false);
                Mode::Stream
            }
            _ => mode,
        }
    }

    /// The held start of a client message turns out too large to be a refresh: it goes
    /// on (a non-final text frame under a gateway key; into the codec when the
    /// direction has one) and the rest of the message streams behind it.
    pub(super) fn spill(&mut self, coded: bool) {
        let held = std::mem::take(&mut self.dec[Side::Client as usize].assembly);
        self.bytes[Side::Client as usize] += held.len() as u64;
        self.dec[Side::Client as usize].mode = Mode::Stream;
        if let Some(f) = self.dec[Side::Client as usize].frame.as_mut() {
            f.mode = Mode::Stream;
        }
        if coded {
            self.write_coded(Side::Client, &held);
            return;
        }
        let key = wire::new_mask();
        let (h, n) = wire::header(OP_TEXT, false, held.len(), Some(key));
        self.ready.extend_from_slice(&h[..n]);
        let start = self.ready.len();
        self.ready.extend_from_slice(&held);
        wire::apply_mask(&mut self.ready[start..], key);
    }

    /// Hold `piece` of a message that may be a refresh. In a direction with a codec,
    /// a message growing past the limit is spilled instead; returns whether it was.
    pub(super) fn hold(&mut self, piece: &[u8]) -> bool {
        let dec = &mut self.dec[Side::Client as usize];
        if dec.assembly.len() + piece.len() > MAX_REFRESH_MESSAGE {
            // Only reached with a codec: without one, `probe_mode` keeps frames within it.
            self.spill(true);
            self.write_coded(Side::Client, piece);
            self.bytes[Side::Client as usize] += piece.len() as u64;
            return true;
        }
        if dec.assembly.capacity() == 0 {
            dec.assembly.reserve_exact(piece.len().clamp(256, MAX_REFRESH_MESSAGE));
        }
        dec.assembly.extend_from_slice(piece);
        false
    }

    /// The final frame of a held client message is in: a refresh stops processing with
    /// its token; any other message goes on whole.
    pub(super) fn finish_probe(&mut self) -> Option<Stop> {
        let text = std::mem::take(&mut self.dec[Side::Client as usize].assembly);
        if let Some(token) = refresh_token(&text) {
            return Some(Stop::Event(Event::Refresh(token.into_boxed_str())));
        }
        self.put_message(Side::Client, OP_TEXT, &text);
        self.counts[Side::Client as usize] += 1;
        self.bytes[Side::Client as usize] += text.len() as u64;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{frame, frames, relay_in_steps};
    use super::super::{Compression, Settings};
    use super::*;
    use crate::wire::{OP_BINARY, OP_PING};
    use bytes::BytesMut;

    const KEY: Option<[u8; 4]> = Some([7, 1, 8, 2]);

    /// Opcode, fin, unmasked payload.
    type Frame = (u8, bool, Vec<u8>);

    /// A client → upstream core on a refresh route, with permessage-deflate agreed with
    /// the client when `deflate`.
    fn core(deflate: bool) -> Core {
        let mut s = Settings::unthrottled(1 << 20);
        if deflate {
            let hop = crate::extension::Deflate {
                send_window_bits: 15,
                send_no_context: true,
                recv_no_context: true,
            };
            s.compression = Some(Box::new(Compression {
                hops: [Some(hop), None],
                level: 1,
                min_size: 1 << 20,
                budget: None,
                message_timeout: None,
            }));
        }
        let mut c = Core::new(&s);
        c.look_for_refreshes();
        c
    }

    /// Feed `input` in pieces of `step` bytes as the pump would; what went on (frames,
    /// unmasked) and how it stopped, with the input left behind the stop.
    fn relay(c: &mut Core, input: &[u8], step: usize) -> (Vec<Frame>, Option<Stop>, usize) {
        let (out, stop, left) = relay_in_steps(c, Side::Client, input, step);
        (frames(&out), stop, left)
    }

    fn refreshed(stop: &Option<Stop>) -> Option<&str> {
        match stop {
            Some(Stop::Event(Event::Refresh(t))) => Some(t),
            _ => None,
        }
    }

    /// Whole data messages of `frames` (control frames left out): opcode and payload.
    fn messages(frames: &[Frame]) -> Vec<(u8, Vec<u8>)> {
        let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut open = false;
        for (op, fin, p) in frames.iter().filter(|f| f.0 < 8) {
            match open {
                true => out.last_mut().unwrap().1.extend_from_slice(p),
                false => out.push((*op, p.clone())),
            }
            open = !fin;
        }
        out
    }

    #[test]
    fn a_refresh_goes_nowhere_and_stops_what_follows() {
        for step in [1, 3, 7, 64, 1 << 16] {
            let mut c = core(false);
            let mut input = frame(OP_TEXT, true, b"before", KEY);
            input.extend(frame(OP_TEXT, true, br#" {"token": "t.o.k"} "#, KEY));
            let behind = frame(OP_TEXT, true, b"after", KEY);
            input.extend(&behind);
            let (out, stop, left) = relay(&mut c, &input, step);
            assert_eq!(refreshed(&stop), Some("t.o.k"), "step {step}");
            assert_eq!(messages(&out), vec![(OP_TEXT, b"before".to_vec())], "step {step}");
            assert_eq!(left, behind.len(), "step {step}: what follows waits for the verdict");
            assert_eq!(c.counts[0], 1, "a refresh is not a relayed message");
        }
    }

    #[test]
    fn other_small_messages_go_on_whole_and_large_ones_stream() {
        let mut c = core(false);
        let json = br#"{"token":"t","room":"a"}"#;
        let big = vec![b'x'; MAX_REFRESH_MESSAGE + 1];
        let mut input = frame(OP_TEXT, true, json, KEY);
        input.extend(frame(OP_BINARY, true, br#"{"token":"t"}"#, KEY));
        input.extend(frame(OP_TEXT, true, &big, KEY));
        let (out, stop, _) = relay(&mut c, &input, 1 << 20);
        assert!(stop.is_none());
        assert_eq!(
            messages(&out),
            vec![
                (OP_TEXT, json.to_vec()),
                (OP_BINARY, br#"{"token":"t"}"#.to_vec()),
                (OP_TEXT, big.clone())
            ]
        );
        assert_eq!((c.counts[0], c.bytes[0]), (3, (json.len() + 13 + big.len()) as u64));
        // The large frame streamed: its header went on before its payload was all in.
        let mut c = core(false);
        let f = frame(OP_TEXT, true, &big, KEY);
        let p = c.process(Side::Client, &mut f[..100].to_vec(), &mut BytesMut::new(), false);
        assert_eq!(p.out, 100);
    }

    #[test]
    fn a_fragmented_refresh_is_one_and_a_long_fragmented_message_spills() {
        let token = br#"{"token":"abc.def.ghi"}"#;
        let mut c = core(false);
        let mut input = frame(OP_TEXT, false, &token[..5], KEY);
        input.extend(frame(OP_PING, true, b"p", KEY));
        input.extend(frame(OP_CONTINUATION, false, b"", KEY));
        input.extend(frame(OP_CONTINUATION, true, &token[5..], KEY));
        let (out, stop, _) = relay(&mut c, &input, 5);
        assert_eq!(refreshed(&stop), Some("abc.def.ghi"));
        assert_eq!(out.iter().map(|f| f.0).collect::<Vec<_>>(), vec![OP_PING], "only the ping went on");
        // A small start, then a continuation that takes it past the limit: what was held
        // goes on first, the rest streams behind it, the message intact.
        let mut c = core(false);
        let head = b"{\"token\":\"".to_vec();
        let tail = vec![b'a'; MAX_REFRESH_MESSAGE];
        let mut input = frame(OP_TEXT, false, &head, KEY);
        input.extend(frame(OP_CONTINUATION, true, &tail, KEY));
        let (out, stop, _) = relay(&mut c, &input, 1000);
        assert!(stop.is_none());
        let whole: Vec<u8> = head.iter().chain(&tail).copied().collect();
        assert_eq!(messages(&out), vec![(OP_TEXT, whole.clone())]);
        assert_eq!((c.counts[0], c.bytes[0]), (1, whole.len() as u64));
    }

    #[test]
    fn a_compressed_refresh_is_judged_on_what_it_inflates_to() {
        use flate2::{Compress, FlushCompress};
        let deflate = |data: &[u8]| {
            let mut z = Compress::new(flate2::Compression::new(6), false);
            let mut out = Vec::with_capacity(data.len() + 64);
            z.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
            out.truncate(out.len() - 4);
            out
        };
        let compressed = |op: u8, fin: bool, payload: &[u8]| {
            let mut f = frame(op, fin, payload, KEY);
            f[0] |= 0x40;
            f
        };
        let z = deflate(br#"{"token":"z.z.z"}"#);
        let mut input = compressed(OP_TEXT, false, &z[..4]);
        input.extend(frame(OP_CONTINUATION, true, &z[4..], KEY));
        for step in [1, 7, 1 << 16] {
            let mut c = core(true);
            let (out, stop, _) = relay(&mut c, &input, step);
            assert_eq!(refreshed(&stop), Some("z.z.z"), "step {step}");
            assert!(out.is_empty());
        }
        // Small on the wire, past the limit inflated: relayed whole, not a refresh.
        let text = format!(r#"{{"token":"{}"}}"#, "a".repeat(MAX_REFRESH_MESSAGE));
        let mut c = core(true);
        let (out, stop, _) = relay(&mut c, &compressed(OP_TEXT, true, &deflate(text.as_bytes())), 1000);
        assert!(stop.is_none());
        assert_eq!(messages(&out), vec![(OP_TEXT, text.into_bytes())]);
        // Any other small message goes on.
        let mut c = core(true);
        let (out, stop, _) = relay(&mut c, &compressed(OP_TEXT, true, &deflate(b"hello")), 3);
        assert!(stop.is_none());
        assert_eq!(messages(&out), vec![(OP_TEXT, b"hello".to_vec())]);
    }

    #[tokio::test]
    async fn a_refresh_pays_toward_the_rate() {
        let mut s = Settings::unthrottled(1 << 16);
        s.message_rate = crate::config::Rate {
            count: 1,
            per: std::time::Duration::from_secs(1),
        };
        s.message_burst = 2; // one message passes at once, the next waits
        let mut c = Core::new(&s);
        c.look_for_refreshes();
        let mut one = frame(OP_TEXT, true, b"one", KEY);
        let p = c.process(Side::Client, &mut one, &mut BytesMut::new(), false);
        assert!(p.stop.is_none() && c.throttle.is_none());
        let mut refresh = frame(OP_TEXT, true, br#"{"token":"t"}"#, KEY);
        let p = c.process(Side::Client, &mut refresh, &mut BytesMut::new(), false);
        assert!(refreshed(&p.stop).is_some());
        assert!(c.throttle.is_some(), "the refresh was charged: the next read waits");
    }
}
