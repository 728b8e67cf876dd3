//! The per-frame state machine of a session ([`Core`]): header checks (masking,
//! fragmentation order, frame, message and fragment limits), UTF-8 of text across
//! fragments, unmasking and re-masking in place, ping/pong bookkeeping, counting and
//! the client's message rate.

use super::{Settings, timers::PING_LEN};
use crate::error::CloseReason;
use crate::limits::MessageRate;
use crate::metrics::SessionMetrics;
use crate::wire::{self, OP_BINARY, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, Utf8, Violation};
use bytes::{Bytes, BytesMut};
use std::{collections::VecDeque, pin::Pin, task::Context, time::Duration};
use tokio::time::{Instant, Sleep, sleep_until};

/// Pings passed on to a side and not yet answered, at most; beyond this a ping is
/// answered by the gateway only.
const MAX_FORWARDED_PINGS: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Side {
    Client = 0,
    Upstream = 1,
}

impl Side {
    pub(super) fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

pub(super) enum Event {
    /// A peer sent a close frame (payload unmasked and checked).
    Closed {
        side: Side,
        payload: [u8; wire::MAX_CONTROL],
        len: usize,
    },
    /// The gateway ends the session.
    End(CloseReason),
}

/// Where processing a run of input stopped.
pub(super) struct Processed {
    /// `buf[..out]` is to be written to the other side.
    pub(super) out: usize,
    /// Input bytes used up.
    pub(super) used: usize,
    /// Bytes the next (incomplete) frame needs in all.
    pub(super) need: usize,
    /// Set when processing must stop before the end of the input.
    pub(super) stop: Option<Stop>,
}

pub(super) enum Stop {
    /// The message rate holds the client back: the rest of the input waits.
    Throttle,
    Event(Event),
}

/// Fragmentation state of one direction.
#[derive(Default)]
struct Decoder {
    /// A fragmented data message in progress: whether it is text.
    message: Option<bool>,
    /// Payload bytes of that message so far.
    message_len: u64,
    /// Frames of that message so far.
    fragments: u32,
    utf8: Utf8,
    /// A text frame still arriving: the UTF-8 state after its first `n` payload bytes,
    /// so invalid text is refused before the rest of the frame comes (fail fast).
    partial: Option<(Utf8, usize)>,
}

/// Everything of a session but the two streams.
pub(super) struct Core {
    dec: [Decoder; 2],
    /// Pings from a side passed on to the other, waiting for the other's pong.
    forwarded: [VecDeque<Bytes>; 2],
    max_frame: u64,
    max_message: u64,
    max_fragments: u32,
    pub(super) counts: [u64; 2],
    pub(super) bytes: [u64; 2],
    /// What has been added to the shared counters so far: they are updated once per
    /// wake-up, not per message, so sessions on other cores do not contend per message.
    reported: ([u64; 2], [u64; 2]),
    pub(super) activity: bool,
    // Keep-alive pings from the gateway to the client.
    pub(super) ping_seq: u64,
    pub(super) ping_payload: Option<[u8; PING_LEN]>,
    // Client → upstream message rate.
    rate: MessageRate,
    /// Not reading from the client until this sleep fires.
    throttle: Option<Pin<Box<Sleep>>>,
    /// Since when the client has been held back without a pause.
    pub(super) throttled_since: Option<Instant>,
    rate_abuse_timeout: Duration,
    /// The time of the current wake-up, read once per wake-up rather than per message.
    pub(super) now: Option<Instant>,
}

impl Core {
    pub(super) fn new(settings: &Settings) -> Core {
        Core {
            dec: Default::default(),
            forwarded: Default::default(),
            max_frame: settings.max_frame_size as u64,
            max_message: settings.max_message_size as u64,
            max_fragments: settings.max_fragments.max(1),
            counts: [0; 2],
            bytes: [0; 2],
            reported: ([0; 2], [0; 2]),
            activity: false,
            ping_seq: 0,
            ping_payload: None,
            rate: MessageRate::new(settings.message_rate, settings.message_burst),
            throttle: None,
            throttled_since: None,
            rate_abuse_timeout: settings.rate_abuse_timeout,
            now: None,
        }
    }

    /// Check and transform the whole frames at the start of `buf` in place; the frames
    /// to pass on are compacted to `buf[..out]`. Replies to the sender (pongs) go to
    /// `replies`; `reply_masked` when the sender is the upstream.
    pub(super) fn process(&mut self, from: Side, buf: &mut [u8], replies: &mut BytesMut, reply_masked: bool) -> Processed {
        let (mut r, mut w) = (0usize, 0usize);
        loop {
            let stop = |w, r, ev| Processed {
                out: w,
                used: r,
                need: 0,
                stop: Some(Stop::Event(ev)),
            };
            let h = match wire::parse(&buf[r..]) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    return Processed {
                        out: w,
                        used: r,
                        need: wire::MAX_HEADER,
                        stop: None,
                    };
                }
                Err(v) => return stop(w, r, violation(from, v)),
            };
            if let Err(v) = self.check(from, &h) {
                return stop(w, r, violation(from, v));
            }
            // Within the frame limit (checked), so it fits in memory.
            let total = h.header_len + h.len as usize;
            if buf.len() - r < total {
                return Processed {
                    out: w,
                    used: r,
                    need: total,
                    stop: None,
                };
            }
            let (forward, step) = match self.frame(from, h, &mut buf[r..r + total], replies, reply_masked) {
                Ok(x) => x,
                Err(v) => return stop(w, r, violation(from, v)),
            };
            if forward {
                if w != r {
                    buf.copy_within(r..r + total, w);
                }
                w += total;
            }
            r += total;
            if step.is_some() {
                return Processed {
                    out: w,
                    used: r,
                    need: 0,
                    stop: step,
                };
            }
        }
    }

    /// UTF-8 check of the part of an incomplete text frame at the start of `buf` not
    /// checked yet (the header is already checked by [`Core::process`]).
    pub(super) fn check_partial(&mut self, from: Side, buf: &[u8]) -> Result<(), Violation> {
        let Ok(Some(h)) = wire::parse(buf) else { return Ok(()) };
        let dec = &mut self.dec[from as usize];
        let text = match h.opcode {
            OP_TEXT => true,
            OP_CONTINUATION => dec.message == Some(true),
            _ => false,
        };
        if !text {
            return Ok(());
        }
        let payload = &buf[h.header_len.min(buf.len())..];
        let (mut state, mut done) = dec.partial.take().unwrap_or((dec.utf8, 0));
        let mut chunk = [0u8; 1024];
        while done < payload.len() {
            let n = (payload.len() - done).min(chunk.len());
            let piece = &mut chunk[..n];
            piece.copy_from_slice(&payload[done..done + n]);
            if let Some(k) = h.mask {
                wire::apply_mask(piece, wire::rotate(k, done));
            }
            state.feed(piece, false)?;
            done += n;
        }
        dec.partial = Some((state, done));
        Ok(())
    }

    /// Masking, size and fragmentation rules for a header from `from`.
    fn check(&self, from: Side, h: &wire::Header) -> Result<(), Violation> {
        // A client masks every frame; a server masks none (RFC 6455 5.1).
        if h.mask.is_some() != (from == Side::Client) {
            return Err(Violation::Protocol);
        }
        if h.is_control() {
            return Ok(());
        }
        let dec = &self.dec[from as usize];
        if (h.opcode == OP_CONTINUATION) != dec.message.is_some() {
            return Err(Violation::Protocol); // a continuation with no message, or a new message inside one
        }
        if h.len > self.max_frame || dec.message_len.saturating_add(h.len) > self.max_message {
            return Err(Violation::TooBig);
        }
        // Thousands of (empty) fragments are one message too many: 1009.
        if from == Side::Client && h.opcode == OP_CONTINUATION && dec.fragments >= self.max_fragments {
            return Err(Violation::TooBig);
        }
        Ok(())
    }

    /// Handle one whole frame (header checked) in place. Returns whether to pass it on,
    /// and whether processing must stop after it.
    fn frame(
        &mut self,
        from: Side,
        h: wire::Header,
        frame: &mut [u8],
        replies: &mut BytesMut,
        reply_masked: bool,
    ) -> Result<(bool, Option<Stop>), Violation> {
        let (head, payload) = frame.split_at_mut(h.header_len);
        if h.is_control() {
            return self.control_frame(from, h, head, payload, replies, reply_masked);
        }
        self.data_frame(from, h, head, payload)?;
        Ok((true, self.charge(from)))
    }

    /// A data frame: check text, re-mask client frames with the gateway's key, count.
    fn data_frame(&mut self, from: Side, h: wire::Header, head: &mut [u8], payload: &mut [u8]) -> Result<(), Violation> {
        let dec = &mut self.dec[from as usize];
        dec.partial = None;
        let text = match h.opcode {
            OP_TEXT => true,
            OP_BINARY => false,
            _ => dec.message == Some(true),
        };
        match h.mask {
            // Client → upstream: unmask, check text, mask again with the gateway's key.
            Some(m) => {
                let k = wire::new_mask();
                if text {
                    wire::apply_mask(payload, m);
                    dec.utf8.feed(payload, h.fin)?;
                    wire::apply_mask(payload, k);
                } else {
                    wire::apply_mask(payload, wire::combine(m, k));
                }
                set_key(head, k);
            }
            // Upstream → client: frames go on unmasked as they came.
            None if text => dec.utf8.feed(payload, h.fin)?,
            None => {}
        }
        if h.fin {
            dec.message = None;
            dec.message_len = 0;
            dec.fragments = 0;
        } else {
            dec.message = Some(text);
            dec.message_len += h.len;
            dec.fragments += 1;
        }
        self.activity = true;
        self.bytes[from as usize] += h.len;
        // Every data frame pays toward the message rate (see `frame`), final or not,
        // empty or not: a stream of empty fragments costs the client like messages do.
        if h.fin {
            self.counts[from as usize] += 1;
        }
        Ok(())
    }

    /// A ping, pong or close (at most 125 bytes, read whole). Returns whether to pass it
    /// on, and whether processing must stop after it.
    fn control_frame(
        &mut self,
        from: Side,
        h: wire::Header,
        head: &mut [u8],
        payload: &mut [u8],
        replies: &mut BytesMut,
        reply_masked: bool,
    ) -> Result<(bool, Option<Stop>), Violation> {
        let mut copy = [0u8; wire::MAX_CONTROL];
        let body = &mut copy[..payload.len()];
        body.copy_from_slice(payload);
        if let Some(m) = h.mask {
            wire::apply_mask(body, m);
        }
        let forward = match h.opcode {
            OP_PING => {
                self.activity = true;
                wire::put_frame(replies, OP_PONG, body, reply_masked); // answered at this hop
                let passed = &mut self.forwarded[from as usize];
                let forward = passed.len() < MAX_FORWARDED_PINGS;
                if forward {
                    passed.push_back(Bytes::copy_from_slice(body));
                }
                forward
            }
            OP_PONG => {
                if from == Side::Client && self.ping_payload.as_ref().is_some_and(|p| p[..] == *body) {
                    self.ping_payload = None;
                    return Ok((false, None));
                }
                // A pong from `from` may answer a ping passed on to it.
                let passed = &mut self.forwarded[from.other() as usize];
                if let Some(i) = passed.iter().position(|q| q[..] == *body) {
                    passed.drain(..=i);
                    return Ok((false, self.charge(from)));
                }
                self.activity = true;
                true
            }
            _ => {
                wire::check_close(body)?;
                let mut payload = [0u8; wire::MAX_CONTROL];
                payload[..body.len()].copy_from_slice(body);
                let ev = Event::Closed {
                    side: from,
                    payload,
                    len: body.len(),
                };
                return Ok((false, Some(Stop::Event(ev))));
            }
        };
        if forward {
            if let Some(m) = h.mask {
                let k = wire::new_mask();
                wire::apply_mask(payload, wire::combine(m, k));
                set_key(head, k);
            }
        }
        // Every ping and unsolicited pong pays toward the message rate, forwarded or not.
        Ok((forward, self.charge(from)))
    }

    /// Charge one client message (or ping) to the rate; start holding the client back
    /// when it is ahead, and end the session when it keeps pushing.
    fn charge(&mut self, from: Side) -> Option<Stop> {
        if from != Side::Client {
            return None;
        }
        let now = *self.now.get_or_insert_with(Instant::now);
        let until = self.rate.take(now)?;
        let since = *self.throttled_since.get_or_insert(now);
        if now.duration_since(since) >= self.rate_abuse_timeout {
            return Some(Stop::Event(Event::End(CloseReason::RateAbuse)));
        }
        self.throttle = Some(Box::pin(sleep_until(until)));
        Some(Stop::Throttle)
    }

    /// Whether reading from the client must wait for the message rate; registers the timer.
    pub(super) fn throttled(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(sleep) = self.throttle.as_mut() else { return false };
        if sleep.as_mut().poll(cx).is_pending() {
            return true;
        }
        self.throttle = None;
        false
    }

    /// Add what was relayed since the last report to the shared counters.
    pub(super) fn report(&mut self, metrics: &SessionMetrics) {
        for i in 0..2 {
            let (m, b) = (self.counts[i] - self.reported.0[i], self.bytes[i] - self.reported.1[i]);
            if m > 0 || b > 0 {
                metrics.messages[i].increment(m);
                metrics.bytes[i].increment(b);
            }
        }
        self.reported = (self.counts, self.bytes);
    }
}

/// Put the masking key `k` in a masked frame header (its last four bytes).
fn set_key(head: &mut [u8], k: [u8; 4]) {
    let at = head.len() - 4;
    head[at..].copy_from_slice(&k);
}

pub(super) fn violation(from: Side, v: Violation) -> Event {
    Event::End(match (from, v) {
        (Side::Client, Violation::Protocol) => CloseReason::ClientProtocol,
        (Side::Client, Violation::Utf8) => CloseReason::ClientInvalidUtf8,
        (Side::Client, Violation::TooBig) => CloseReason::ClientTooBig,
        (Side::Upstream, Violation::Protocol) => CloseReason::UpstreamProtocol,
        (Side::Upstream, Violation::Utf8) => CloseReason::UpstreamInvalidUtf8,
        (Side::Upstream, Violation::TooBig) => CloseReason::UpstreamTooBig,
    })
}

/// Writing to the receiver of `from`'s frames failed.
pub(super) fn write_error(from: Side) -> CloseReason {
    lost(from.other())
}

pub(super) fn lost(side: Side) -> CloseReason {
    match side {
        Side::Client => CloseReason::ClientIo,
        Side::Upstream => CloseReason::UpstreamReset,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::wire::OP_CLOSE;

    fn core() -> Core {
        let mut s = Settings::unthrottled(1 << 16);
        s.max_message_size = 1 << 17;
        Core::new(&s)
    }

    pub(crate) fn frame(opcode: u8, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let (h, n) = wire::header(opcode, fin, payload.len(), mask);
        let mut f = h[..n].to_vec();
        let start = f.len();
        f.extend_from_slice(payload);
        if let Some(k) = mask {
            wire::apply_mask(&mut f[start..], k);
        }
        f
    }

    /// Unmask every frame in `buf` and return (opcode, fin, payload) of each.
    /// Unmask every frame in `buf` and return (opcode, fin, payload) of each.
    pub(crate) fn frames(mut buf: &[u8]) -> Vec<(u8, bool, Vec<u8>)> {
        let mut out = vec![];
        while let Some(h) = wire::parse(buf).unwrap() {
            let mut p = buf[h.header_len..h.header_len + h.len as usize].to_vec();
            if let Some(k) = h.mask {
                wire::apply_mask(&mut p, k);
            }
            out.push((h.opcode, h.fin, p));
            buf = &buf[h.header_len + h.len as usize..];
        }
        assert!(buf.is_empty());
        out
    }

    #[tokio::test]
    async fn client_frames_are_remasked_and_counted() {
        let mut c = core();
        let key = [1, 2, 3, 4];
        let mut input = frame(OP_TEXT, false, "héllo ".as_bytes(), Some(key));
        input.extend(frame(OP_PING, true, b"p", Some(key)));
        input.extend(frame(OP_CONTINUATION, true, "wörld".as_bytes(), Some(key)));
        input.extend(frame(OP_BINARY, true, &[0, 255], Some(key)));
        let partial = frame(OP_BINARY, true, &[7; 300], Some(key));
        input.extend(&partial[..100]);
        let mut replies = BytesMut::new();
        let p = c.process(Side::Client, &mut input, &mut replies, false);
        assert!(p.stop.is_none());
        assert_eq!(p.need, partial.len());
        let out = &input[..p.out];
        assert_eq!(
            frames(out),
            vec![
                (OP_TEXT, false, "héllo ".as_bytes().to_vec()),
                (OP_PING, true, b"p".to_vec()),
                (OP_CONTINUATION, true, "wörld".as_bytes().to_vec()),
                (OP_BINARY, true, vec![0, 255]),
            ]
        );
        // Every frame to the upstream carries a gateway key, not the client's.
        let mut rest = out;
        while let Some(h) = wire::parse(rest).unwrap() {
            assert!(h.mask.is_some_and(|k| k != key));
            rest = &rest[h.header_len + h.len as usize..];
        }
        assert_eq!(frames(&replies), vec![(OP_PONG, true, b"p".to_vec())]);
        assert_eq!(c.counts[0], 2, "two messages; the ping is no message");
        assert_eq!(c.bytes[0], ("héllo wörld".len() + 2) as u64);
    }

    #[tokio::test]
    async fn violations_stop_at_the_bad_frame() {
        let cases: Vec<(Vec<u8>, Side, CloseReason)> = vec![
            (frame(OP_TEXT, true, b"x", None), Side::Client, CloseReason::ClientProtocol), // unmasked
            (
                frame(OP_TEXT, true, b"x", Some([1; 4])),
                Side::Upstream,
                CloseReason::UpstreamProtocol,
            ), // masked
            (
                frame(OP_CONTINUATION, true, b"x", None),
                Side::Upstream,
                CloseReason::UpstreamProtocol,
            ),
            (
                frame(OP_TEXT, true, &[0xC0, 0x80], None),
                Side::Upstream,
                CloseReason::UpstreamInvalidUtf8,
            ),
            (
                frame(OP_BINARY, true, &vec![0; 70_000], None),
                Side::Upstream,
                CloseReason::UpstreamTooBig,
            ),
            (frame(OP_CLOSE, true, &[3], Some([1; 4])), Side::Client, CloseReason::ClientProtocol),
        ];
        for (bad, side, want) in cases {
            let mut c = core();
            let mut input = frame(OP_BINARY, true, b"ok", if side == Side::Client { Some([5; 4]) } else { None });
            let good = input.len();
            input.extend(bad);
            let p = c.process(side, &mut input, &mut BytesMut::new(), false);
            assert_eq!((p.out, p.used), (good, good));
            match p.stop {
                Some(Stop::Event(Event::End(r))) => assert_eq!(r, want),
                _ => panic!("no violation for {want:?}"),
            }
        }
        // A message split over frames is held to the message limit.
        let mut c = core();
        let mut input = frame(OP_BINARY, false, &vec![0; 60_000], None);
        input.extend(frame(OP_CONTINUATION, false, &vec![0; 60_000], None));
        input.extend(frame(OP_CONTINUATION, true, &vec![0; 60_000], None));
        let p = c.process(Side::Upstream, &mut input, &mut BytesMut::new(), true);
        assert!(matches!(p.stop, Some(Stop::Event(Event::End(CloseReason::UpstreamTooBig)))));
    }

    /// Empty fragments, unforwarded pings and unsolicited pongs all pay toward the
    /// message rate; a message with more than `max_fragments` frames gets 1009.
    #[tokio::test]
    async fn every_frame_pays_and_fragments_are_capped() {
        let k = Some([7; 4]);
        let throttled = |input: &mut Vec<u8>| {
            let mut s = Settings::unthrottled(1 << 16);
            s.message_rate = crate::units::Rate {
                count: 1,
                per: Duration::from_secs(1),
            };
            s.message_burst = 3;
            let mut c = Core::new(&s);
            let p = c.process(Side::Client, input, &mut BytesMut::new(), false);
            (matches!(p.stop, Some(Stop::Throttle)), p.used)
        };
        let empty_fragments: Vec<u8> = std::iter::once(frame(OP_TEXT, false, b"", k))
            .chain((0..20).map(|_| frame(OP_CONTINUATION, false, b"", k)))
            .flatten()
            .collect();
        let pings: Vec<u8> = (0..20).flat_map(|_| frame(OP_PING, true, b"p", k)).collect();
        let pongs: Vec<u8> = (0..20).flat_map(|_| frame(OP_PONG, true, b"q", k)).collect();
        for (name, mut input) in [("empty fragments", empty_fragments), ("pings", pings), ("pongs", pongs)] {
            let total = input.len();
            let (held, used) = throttled(&mut input);
            assert!(held && used < total, "{name}: {used} of {total} bytes read without paying");
        }
        let mut s = Settings::unthrottled(1 << 16);
        s.max_fragments = 4;
        let mut c = Core::new(&s);
        let mut ok: Vec<u8> = frame(OP_BINARY, false, b"a", k);
        for _ in 0..2 {
            ok.extend(frame(OP_CONTINUATION, false, b"b", k));
        }
        ok.extend(frame(OP_CONTINUATION, true, b"c", k));
        let p = c.process(Side::Client, &mut ok, &mut BytesMut::new(), false);
        assert!(p.stop.is_none(), "4 frames are allowed");
        let mut bad: Vec<u8> = frame(OP_BINARY, false, b"a", k);
        for _ in 0..4 {
            bad.extend(frame(OP_CONTINUATION, false, b"", k));
        }
        let p = c.process(Side::Client, &mut bad, &mut BytesMut::new(), false);
        assert!(matches!(p.stop, Some(Stop::Event(Event::End(CloseReason::ClientTooBig)))));
    }

    /// Invalid text is refused while its frame is still arriving, valid text split
    /// inside a code point is not.
    #[tokio::test]
    async fn text_frames_fail_fast_before_they_complete() {
        let key = [3, 1, 4, 1];
        let mut bad = "é".repeat(300).into_bytes();
        bad[101] = 0xFF;
        let f = frame(OP_TEXT, true, &bad, Some(key));
        let mut c = core();
        let mut head = f[..80].to_vec();
        let p = c.process(Side::Client, &mut head, &mut BytesMut::new(), false);
        assert_eq!((p.used, p.stop.is_none()), (0, true), "incomplete: nothing to do yet");
        assert_eq!(c.check_partial(Side::Client, &head), Ok(()), "the first 72 payload bytes are valid");
        assert_eq!(c.check_partial(Side::Client, &f[..200]), Err(Violation::Utf8));

        let good = "€".repeat(400).into_bytes();
        let f = frame(OP_TEXT, true, &good, Some(key));
        let mut c = core();
        for cut in [9, 10, 11, 500, 1000] {
            assert_eq!(c.check_partial(Side::Client, &f[..cut]), Ok(()), "cut at {cut}");
        }
        let mut whole = f.clone();
        let p = c.process(Side::Client, &mut whole, &mut BytesMut::new(), false);
        assert!(p.stop.is_none() && p.used == f.len());
        assert!(c.dec[0].partial.is_none(), "the check starts afresh for the next frame");
    }

    /// Arbitrary bytes from either side never panic the codec, and what it reports
    /// stays inside its input: `out <= used <= len`, with whole frames passed on.
    #[tokio::test]
    async fn arbitrary_input_never_panics() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..5_000 {
            let side = if round % 2 == 0 { Side::Client } else { Side::Upstream };
            let mut input = Vec::new();
            // A mix of plausible frames (valid or with random header bits) and noise.
            for _ in 0..(next() % 6) {
                let r = next();
                let len = [0, 1, 125, 126, 300, 70_000][(r % 6) as usize];
                let opcode = [OP_TEXT, OP_BINARY, OP_CONTINUATION, OP_PING, OP_PONG, OP_CLOSE, 3, 11][((r >> 8) % 8) as usize];
                let mask = (side == Side::Client) != (r >> 16 & 7 == 0);
                let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let mut f = frame(opcode, r >> 20 & 3 != 0, &payload, mask.then_some([r as u8, 1, 2, 3]));
                if r >> 24 & 7 == 0 {
                    f[0] ^= 1 << (next() % 8); // flip a header bit
                }
                input.extend(f);
                if r >> 28 & 3 == 0 {
                    input.extend((0..next() % 20).map(|_| next() as u8));
                }
            }
            input.truncate(input.len().saturating_sub((next() % 4) as usize));
            let len = input.len();
            let mut c = core();
            let p = c.process(side, &mut input, &mut BytesMut::new(), side == Side::Upstream);
            assert!(p.out <= p.used && p.used <= len, "out {} used {} len {len}", p.out, p.used);
            // What is passed on parses as whole frames.
            let mut rest = &input[..p.out];
            while !rest.is_empty() {
                let h = wire::parse(rest).unwrap().expect("whole frames only");
                rest = &rest[h.header_len + h.len as usize..];
            }
        }
    }

    #[tokio::test]
    async fn pongs_to_passed_on_pings_are_absorbed() {
        let mut c = core();
        let mut ping = frame(OP_PING, true, b"hi", Some([9; 4]));
        let p = c.process(Side::Client, &mut ping, &mut BytesMut::new(), false);
        assert_eq!(p.out, ping.len());
        let mut pong = frame(OP_PONG, true, b"hi", None);
        let p = c.process(Side::Upstream, &mut pong, &mut BytesMut::new(), true);
        assert_eq!(p.out, 0, "the client already has its pong");
        let mut pong = frame(OP_PONG, true, b"heartbeat", None);
        let p = c.process(Side::Upstream, &mut pong, &mut BytesMut::new(), true);
        assert_eq!(p.out, pong.len(), "unsolicited pongs pass");
    }
}
