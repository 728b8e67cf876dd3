//! The per-frame state machine of a session ([`Core`]): header checks (masking,
//! fragmentation order, frame, message and fragment limits), UTF-8 of text across
//! fragments, unmasking and re-masking in place, ping/pong bookkeeping, counting and
//! the client's message rate.
//!
//! On a route with `[routes.validate]`, client text messages are the one exception to
//! streaming: their frames are unmasked into an assembly buffer (bounded by the message
//! limit, freed after each message) instead of going on, and the whole message is
//! checked when its final frame arrives. A valid message then goes on as one frame
//! under a gateway key ([`Core::ready`]); an invalid one ends the session or is answered
//! with an error message, and never reaches the upstream. Refused binary messages are
//! skipped the same way. Control frames between the fragments are handled as always.
//! On a route with `refresh = true`, client text messages of at most 16 KiB are held
//! the same way to be looked at for a refresh token (`refresh.rs`).

use super::Settings;
use crate::error::CloseReason;
use crate::limits::MessageRate;
use crate::metrics::SessionMetrics;
use crate::validation::{Invalid, Validator};
use crate::wire::{self, OP_BINARY, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, Utf8, Violation};
use bytes::{Bytes, BytesMut};
pub use compressed::Compression;
pub use refresh::refresh_token;
use std::{collections::VecDeque, pin::Pin, sync::Arc, task::Context, time::Duration};
use tokio::time::{Instant, Sleep, sleep_until};
pub use validated::{AssemblyBudget, AssemblyShare};
use validated::{Mode, grow};

/// Prefix of the gateway's keep-alive ping payload; a big-endian sequence number follows.
pub(super) const PING_PREFIX: &[u8; 7] = b"wsgate:";
/// Length of the keep-alive ping payload.
pub(super) const PING_LEN: usize = PING_PREFIX.len() + 8;
/// Pongs and error replies queued for a peer that does not read them: past this, stop
/// reading from it.
pub(super) const REPLY_LIMIT: usize = 4 * 1024;

mod compressed;
mod refresh;
mod validated;

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
    /// A client message that is a refresh (`refresh = true`): its token, for the session
    /// to judge before anything the client sent after it is processed. Never relayed.
    Refresh(Box<str>),
}

/// Where processing a run of input stopped.
pub(super) struct Processed {
    /// `buf[..out]` is to be written to the other side.
    pub(super) out: usize,
    /// Input bytes used up.
    pub(super) used: usize,
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
    /// The data frame being relayed: its header has gone on, its payload follows in
    /// pieces as they arrive.
    frame: Option<InFrame>,
    /// How the message in progress is handled (validated routes, client side).
    mode: Mode,
    /// The text message being assembled for validation; empty, without capacity,
    /// between messages.
    assembly: Vec<u8>,
    /// Client side of a route with `refresh = true`: small text messages are held and
    /// looked at (`refresh.rs`). Here rather than in `Core`, where it would cost the
    /// session future 8 bytes.
    refresh: bool,
}

/// A data frame in progress. Frames are streamed, never held whole: a session's memory
/// is bounded by its read buffer, not by the frame size.
#[derive(Clone, Copy, Debug)]
struct InFrame {
    /// Payload bytes still to come.
    left: u64,
    /// Payload bytes relayed so far, modulo 4: where the masking keys stand.
    offset: u8,
    /// Client frames: the client's masking key and the gateway's, which replaces it.
    keys: Option<([u8; 4], [u8; 4])>,
    text: bool,
    fin: bool,
    mode: Mode,
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
    /// Checks on client messages (routes with `[routes.validate]`).
    validator: Option<Arc<Validator>>,
    /// What every session's assembly buffers may hold together, and this session's share.
    assembly: Option<Arc<AssemblyShare>>,
    held: usize,
    /// When the client message in progress that holds shared memory started: one being
    /// assembled for validation, or a compressed one whose inflate state is taken from
    /// the compression budget for the message (no context takeover). It must be
    /// complete `assembly_timeout` later, or a client that never finishes its messages
    /// would hold what other sessions need; `None` while none is.
    pub(super) assembly_started: Option<Instant>,
    /// Validated client messages, each whole as one frame under a gateway key, and what
    /// followed them in the same call: written to the upstream right after the output
    /// `process` returned (so a read full of small messages is one write, not one each).
    pub(super) ready: BytesMut,
    /// Client messages refused, by [`crate::error::MessageRejection::index`], and what
    /// has been reported of them.
    rejected: [u64; 4],
    rejected_reported: [u64; 4],
    /// permessage-deflate, by sending side: its messages inflated and/or deflated for
    /// the receiver (`None`: neither hop agreed to it; frames stream as they came).
    /// Boxed, both directions in one: most sessions have none.
    codec: Option<Box<[Option<compressed::Codec>; 2]>>,
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
            validator: settings.validator.clone(),
            assembly: settings.assembly.clone(),
            held: 0,
            assembly_started: None,
            ready: BytesMut::new(),
            rejected: [0; 4],
            rejected_reported: [0; 4],
            codec: settings
                .compression
                .as_deref()
                .map(|c| Box::new([compressed::Codec::new(c, Side::Client), compressed::Codec::new(c, Side::Upstream)])),
        }
    }

    /// Check and transform the frames at the start of `buf` in place; what passes on is
    /// compacted to `buf[..out]`, then to [`Core::ready`] once a validated message is in it. Data frames stream: their header and whatever part of
    /// their payload is in `buf` go on at once, the rest follows with the next call.
    /// Control frames go on whole (they wait for all of their at most 125 bytes).
    /// Replies to the sender (pongs) go to `replies`; `reply_masked` when the sender is
    /// the upstream.
    pub(super) fn process(&mut self, from: Side, buf: &mut [u8], replies: &mut BytesMut, reply_masked: bool) -> Processed {
        let (mut r, mut w) = (0usize, 0usize);
        let done = |w, r, stop| Processed { out: w, used: r, stop };
        loop {
            if self.dec[from as usize].frame.is_some() {
                let (n, passed) = match self.payload(from, &mut buf[r..]) {
                    Ok(x) => x,
                    Err(reason) => return done(w, r, Some(Stop::Event(Event::End(reason)))),
                };
                if passed {
                    w = self.emit(buf, r..r + n, w);
                }
                r += n;
                if self.dec[from as usize].frame.is_some_and(|f| f.left > 0) {
                    return done(w, r, None); // the rest of the payload is still to come
                }
                let stop = self.end_frame(from, replies);
                // Error replies past the backlog limit: the rest of `buf` waits until the
                // client has read them (many tiny invalid messages in one read would
                // otherwise queue a reply each).
                if stop.is_some() || replies.len() > REPLY_LIMIT {
                    return done(w, r, stop);
                }
                continue;
            }
            let h = match wire::parse(&buf[r..]) {
                Ok(Some(h)) => h,
                Ok(None) => return done(w, r, None),
                Err(v) => return done(w, r, Some(Stop::Event(violation(from, v)))),
            };
            if let Err(v) = self.check(from, &h) {
                return done(w, r, Some(Stop::Event(violation(from, v))));
            }
            if !h.is_control() {
                let mode = match self.message_mode(from, &h) {
                    Ok(mode) => mode,
                    Err(reason) => return done(w, r, Some(Stop::Event(Event::End(reason)))),
                };
                let mode = if self.dec[from as usize].refresh {
                    self.probe_mode(&h, mode)
                } else {
                    mode
                };
                if h.opcode != OP_CONTINUATION
                    && let Err(reason) = self.start_coded(from, h.opcode, h.rsv1)
                {
                    return done(w, r, Some(Stop::Event(Event::End(reason))));
                }
                let head = &mut buf[r..r + h.header_len];
                self.start_frame(from, &h, head, mode);
                if mode == Mode::Assemble && h.opcode != OP_CONTINUATION && self.assembly.is_some() {
                    // The message's memory is held from now: it must be whole in time.
                    self.assembly_started = Some(*self.now.get_or_insert_with(Instant::now));
                }
                if mode == Mode::Stream && !self.coded(from) {
                    w = self.emit(buf, r..r + h.header_len, w);
                }
                r += h.header_len;
                continue;
            }
            // A control frame: at most 125 bytes, handled whole.
            let total = h.header_len + h.len as usize;
            if buf.len() - r < total {
                return done(w, r, None);
            }
            let (forward, step) = match self.control_frame(from, h, &mut buf[r..r + total], replies, reply_masked) {
                Ok(x) => x,
                Err(v) => return done(w, r, Some(Stop::Event(violation(from, v)))),
            };
            if forward {
                w = self.emit(buf, r..r + total, w);
            }
            r += total;
            if step.is_some() {
                return done(w, r, step);
            }
        }
    }

    /// Pass `buf[from]` on: compacted to `buf[w..]` (returns the new end of the output), or,
    /// once a validated message waits in `ready`, appended behind it so the order of
    /// what goes on is kept while one call relays many validated messages.
    fn emit(&mut self, buf: &mut [u8], from: std::ops::Range<usize>, w: usize) -> usize {
        if self.ready.is_empty() {
            let n = from.len();
            buf.copy_within(from, w);
            w + n
        } else {
            self.ready.extend_from_slice(&buf[from]);
            w
        }
    }

    /// Payload bytes of the data frame in progress from `from` not yet relayed: after a
    /// refusal inside that frame, the bytes its sender still owes before its next frame.
    pub(super) fn frame_left(&self, from: Side) -> u64 {
        self.dec[from as usize].frame.map_or(0, |f| f.left)
    }

    /// Whether a data frame from `from` is partly relayed: its receiver must get the rest
    /// of it before any frame of the gateway's.
    pub(super) fn in_frame(&self, from: Side) -> bool {
        self.dec[from as usize].frame.is_some_and(|f| f.mode == Mode::Stream) && !self.coded(from)
    }

    /// Masking, size and fragmentation rules for a header from `from`.
    fn check(&self, from: Side, h: &wire::Header) -> Result<(), Violation> {
        // A client masks every frame; a server masks none (RFC 6455 5.1).
        if h.mask.is_some() != (from == Side::Client) {
            return Err(Violation::Protocol);
        }
        self.check_coded(from, h)?;
        if h.is_control() {
            return Ok(());
        }
        let dec = &self.dec[from as usize];
        if (h.opcode == OP_CONTINUATION) != dec.message.is_some() {
            return Err(Violation::Protocol); // a continuation with no message, or a new message inside one
        }
        // `max_frame_size` bounds client frames only (browsers send a message as one
        // frame); the message limit bounds both sides, however a message is fragmented.
        // Both hold before any byte of the frame goes on.
        // A compressed frame's size is its wire size: what it inflates to is counted as
        // it inflates (`compressed.rs`).
        let deflated = h.rsv1
            || (h.opcode == OP_CONTINUATION
                && self
                    .codec
                    .as_deref()
                    .and_then(|a| a[from as usize].as_ref())
                    .is_some_and(|c| c.inflating));
        if (from == Side::Client && h.len > self.max_frame) || (!deflated && dec.message_len.saturating_add(h.len) > self.max_message) {
            return Err(Violation::TooBig);
        }
        // Thousands of (empty) fragments are one message too many: 1009.
        if from == Side::Client && h.opcode == OP_CONTINUATION && dec.fragments >= self.max_fragments {
            return Err(Violation::TooBig);
        }
        Ok(())
    }

    /// A data frame's header (checked) goes on: a client frame gets the gateway's key.
    fn start_frame(&mut self, from: Side, h: &wire::Header, head: &mut [u8], mode: Mode) {
        let dec = &mut self.dec[from as usize];
        let text = match h.opcode {
            OP_TEXT => true,
            OP_BINARY => false,
            _ => dec.message == Some(true),
        };
        let keys = h.mask.map(|m| {
            let k = wire::new_mask();
            set_key(head, k);
            (m, k)
        });
        dec.frame = Some(InFrame {
            left: h.len,
            offset: 0,
            keys,
            text,
            fin: h.fin,
            mode,
        });
    }

    /// The next piece of the frame in progress, from the start of `buf`: check text,
    /// unmask and re-mask at the running offset. Returns the bytes taken and whether they
    /// go on (a message held for validation is kept or dropped instead); the frame is
    /// over when they were its last.
    fn payload(&mut self, from: Side, buf: &mut [u8]) -> Result<(usize, bool), CloseReason> {
        let max_message = self.max_message as usize;
        let bad = |v| match violation(from, v) {
            Event::End(reason) => reason,
            _ => CloseReason::ClientProtocol, // violation() only ends sessions
        };
        if self.coded(from) {
            return self.coded_payload(from, buf).map(|n| (n, false));
        }
        let dec = &mut self.dec[from as usize];
        let Some(f) = dec.frame.as_mut() else { return Ok((0, false)) };
        let n = usize::try_from(f.left).unwrap_or(usize::MAX).min(buf.len());
        let piece = &mut buf[..n];
        let last = f.fin && n as u64 == f.left; // the message ends with this piece
        let at = usize::from(f.offset);
        match f.mode {
            Mode::Stream => {}
            Mode::Assemble => {
                if let Some((m, _)) = f.keys {
                    wire::apply_mask(piece, wire::rotate(m, at));
                }
                dec.utf8.feed(piece, last).map_err(bad)?;
                self.held += grow(&mut dec.assembly, n, max_message, self.assembly.as_deref()).ok_or(CloseReason::Overloaded)?;
                dec.assembly.extend_from_slice(piece);
            }
            Mode::Probe => {
                if let Some((m, _)) = f.keys {
                    wire::apply_mask(piece, wire::rotate(m, at));
                }
                dec.utf8.feed(piece, last).map_err(bad)?;
                // `probe_mode` keeps such a message within `MAX_REFRESH_MESSAGE`.
                dec.assembly.extend_from_slice(piece);
            }
            Mode::Skip => {}
        }
        let passed = f.mode == Mode::Stream;
        match f.keys {
            _ if !passed => {}
            // Client → upstream: unmask, check text, mask again with the gateway's key.
            Some((m, k)) if f.text => {
                wire::apply_mask(piece, wire::rotate(m, at));
                dec.utf8.feed(piece, last).map_err(bad)?;
                wire::apply_mask(piece, wire::rotate(k, at));
            }
            Some((m, k)) => wire::apply_mask(piece, wire::rotate(wire::combine(m, k), at)),
            // Upstream → client: frames go on unmasked as they came.
            None if f.text => dec.utf8.feed(piece, last).map_err(bad)?,
            None => {}
        }
        f.left -= n as u64;
        f.offset = ((at + n) % 4) as u8;
        dec.message_len += n as u64;
        if passed {
            self.bytes[from as usize] += n as u64;
        }
        Ok((n, passed))
    }

    /// The frame in progress has all gone on: the fragmentation state moves on, a final
    /// frame counts as a message, and every data frame, final or not, empty or not, pays
    /// toward the message rate (a stream of empty fragments costs the client like
    /// messages do).
    fn end_frame(&mut self, from: Side, replies: &mut BytesMut) -> Option<Stop> {
        let ending = self.dec[from as usize].frame.filter(|f| f.fin);
        if let Some(f) = ending
            && self.coded(from)
            && let Err(reason) = self.finish_coded(from, f.mode)
        {
            return Some(Stop::Event(Event::End(reason)));
        }
        let dec = &mut self.dec[from as usize];
        let f = dec.frame.take()?;
        // As when frames were held whole, a frame counts against the idle timeout when it
        // is complete: a frame that never ends does not keep a session alive. A message
        // held for validation counts only when it is whole, so its memory is held at most
        // `idle_timeout` past the last activity, pings or not.
        self.activity |= f.fin || !matches!(f.mode, Mode::Assemble | Mode::Probe);
        if f.fin {
            dec.message = None;
            dec.message_len = 0;
            dec.fragments = 0;
            dec.mode = Mode::Stream;
            let refused = match f.mode {
                Mode::Stream => {
                    self.counts[from as usize] += 1;
                    None
                }
                Mode::Assemble => self.finish_message(from, replies),
                Mode::Probe => self.finish_probe(),
                Mode::Skip => self.reject(Invalid::binary(), Some(replies)),
            };
            if let Some(Stop::Event(Event::Refresh(token))) = refused {
                // A refresh pays like a message; the rate's verdict on it comes first.
                return match self.charge(from) {
                    Some(Stop::Event(ev)) => Some(Stop::Event(ev)),
                    _ => Some(Stop::Event(Event::Refresh(token))),
                };
            }
            if refused.is_some() {
                return refused; // the session ends: nothing left to charge
            }
        } else {
            dec.message = Some(f.text);
            dec.mode = f.mode;
            dec.fragments += 1;
        }
        self.charge(from)
    }

    /// A ping, pong or close (at most 125 bytes, read whole). Returns whether to pass it
    /// on, and whether processing must stop after it.
    fn control_frame(
        &mut self,
        from: Side,
        h: wire::Header,
        frame: &mut [u8],
        replies: &mut BytesMut,
        reply_masked: bool,
    ) -> Result<(bool, Option<Stop>), Violation> {
        let (head, payload) = frame.split_at_mut(h.header_len);
        let mut copy = [0u8; wire::MAX_CONTROL];
        let body = &mut copy[..payload.len()];
        body.copy_from_slice(payload);
        if let Some(m) = h.mask {
            wire::apply_mask(body, m);
        }
        let forward = match h.opcode {
            OP_PING => {
                self.activity |= !self.assembling(from);
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
                self.activity |= !self.assembling(from);
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
        if forward && let Some(m) = h.mask {
            let k = wire::new_mask();
            wire::apply_mask(payload, wire::combine(m, k));
            set_key(head, k);
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

    /// The route's message rate changed (a reload): go on under the new one.
    pub(super) fn reconfigure_rate(&mut self, rate: crate::config::Rate, burst: u32) {
        self.rate.reconfigure(rate, burst);
    }

    /// Go on from the message rate a client paid into before the relay started (the
    /// frames before its `first_message` token), not reading before `wait` if set.
    pub(super) fn continue_rate(&mut self, paid: MessageRate, wait: Option<Instant>) {
        self.rate = paid;
        self.throttle = wait.map(|until| Box::pin(sleep_until(until)));
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
                if let Some(live) = &metrics.live {
                    live.add(i, m, b);
                }
            }
        }
        self.reported = (self.counts, self.bytes);
        if let Some(counters) = &metrics.rejected {
            for (i, c) in counters.iter().enumerate() {
                c.increment(self.rejected[i] - self.rejected_reported[i]);
            }
            self.rejected_reported = self.rejected;
        }
        if let (Some(counters), Some(codecs)) = (&metrics.compressed, self.codec.as_deref_mut()) {
            for (codec, by_form) in codecs.iter_mut().zip(counters.iter()) {
                if let Some(c) = codec.as_mut() {
                    for (form, counter) in by_form.iter().enumerate() {
                        counter.increment(c.sizes[form] - c.reported[form]);
                    }
                    c.reported = c.sizes;
                }
            }
        }
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

    /// Run `input` from `side` through the core in pieces of `step` bytes, as the pump
    /// would: what went on, how it stopped, and how many input bytes were left behind
    /// the stop (or held at the end).
    pub(crate) fn relay_in_steps(c: &mut Core, side: Side, input: &[u8], step: usize) -> (Vec<u8>, Option<Stop>, usize) {
        let (mut out, mut held, mut at) = (Vec::new(), Vec::new(), 0);
        loop {
            let end = (at + step).min(input.len());
            held.extend_from_slice(&input[at..end]);
            at = end;
            loop {
                let p = c.process(side, &mut held, &mut BytesMut::new(), side == Side::Upstream);
                out.extend_from_slice(&held[..p.out]);
                out.extend_from_slice(&std::mem::take(&mut c.ready));
                held.drain(..p.used);
                if p.stop.is_some() {
                    return (out, p.stop, held.len() + input.len() - at);
                }
                if p.used == 0 {
                    break;
                }
            }
            if at == input.len() {
                return (out, None, held.len());
            }
        }
    }

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
        let whole = input.len();
        let partial = frame(OP_BINARY, true, &[7; 300], Some(key));
        input.extend(&partial[..100]);
        let mut replies = BytesMut::new();
        let p = c.process(Side::Client, &mut input, &mut replies, false);
        assert!(p.stop.is_none());
        assert_eq!((p.used, p.out), (input.len(), input.len()), "the partial frame streams on at once");
        let (h, n) = wire::header(OP_BINARY, true, 300, None);
        let streamed = wire::parse(&input[whole..p.out]).unwrap().unwrap();
        assert_eq!((streamed.len, streamed.header_len), (300, n + 4));
        assert_eq!(input[whole] & 0x0F, h[0] & 0x0F);
        let mut piece = input[whole + streamed.header_len..p.out].to_vec();
        wire::apply_mask(&mut piece, streamed.mask.unwrap());
        assert_eq!(piece, vec![7; 100 - streamed.header_len]);
        let out = &input[..whole];
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
        assert_eq!(c.bytes[0], ("héllo wörld".len() + 2 + 92) as u64, "bytes count as they go on");
        assert_eq!(c.counts[0], 2, "a frame in progress is no message yet");
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
                frame(OP_BINARY, true, &vec![0; 140_000], None),
                Side::Upstream,
                CloseReason::UpstreamTooBig,
            ), // over the message limit
            (
                frame(OP_BINARY, true, &vec![0; 70_000], Some([2; 4])),
                Side::Client,
                CloseReason::ClientTooBig,
            ), // over the (client) frame limit
            (frame(OP_CLOSE, true, &[3], Some([1; 4])), Side::Client, CloseReason::ClientProtocol),
        ];
        for (bad, side, want) in cases {
            let mut c = core();
            let mut input = frame(OP_BINARY, true, b"ok", if side == Side::Client { Some([5; 4]) } else { None });
            let good = input.len();
            input.extend(bad);
            let p = c.process(side, &mut input, &mut BytesMut::new(), false);
            // Limits hold before any byte of the frame goes on; text is checked as it
            // streams, so the header of the bad text frame has gone on.
            let head = if want == CloseReason::UpstreamInvalidUtf8 { 2 } else { 0 };
            assert_eq!((p.out, p.used), (good + head, good + head), "{want:?}");
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
            s.message_rate = crate::config::Rate {
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

    /// Feed `input` to a fresh core in pieces cut at `cuts` (what is not used stays for
    /// the next piece, as in the pump); returns what went on and where it stopped.
    fn relay_in_pieces(c: &mut Core, side: Side, input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<Stop>) {
        let (mut out, mut held) = (Vec::new(), Vec::new());
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let cut = cut.clamp(at, input.len());
            held.extend_from_slice(&input[at..cut]);
            at = cut;
            let p = c.process(side, &mut held, &mut BytesMut::new(), side == Side::Upstream);
            out.extend_from_slice(&held[..p.out]);
            held.drain(..p.used);
            if p.stop.is_some() {
                return (out, p.stop);
            }
            // Frames stream: at most a header or a control frame waits for more input.
            assert!(held.len() < wire::MAX_HEADER + wire::MAX_CONTROL, "{} bytes held", held.len());
        }
        (out, None)
    }

    /// Invalid text is refused in the piece where it arrives, before the rest of its
    /// frame: what went on before stays gone, the rest never goes.
    #[tokio::test]
    async fn invalid_text_is_refused_mid_frame() {
        let key = [3, 1, 4, 1];
        let mut bad = "é".repeat(30_000).into_bytes();
        bad[30_001] = 0xFF;
        let f = frame(OP_TEXT, true, &bad, Some(key));
        let mut c = core();
        let (out, stop) = relay_in_pieces(&mut c, Side::Client, &f, &[16_384, 32_768, 49_152]);
        assert!(matches!(stop, Some(Stop::Event(Event::End(CloseReason::ClientInvalidUtf8)))));
        assert_eq!(out.len(), 16_384, "the first piece went on, the one with the bad byte did not");
        assert!(c.in_frame(Side::Client), "the frame to the upstream is cut short");
        assert_eq!(c.counts[0], 0);
        // A code point cut by the end of the message is invalid too, caught with the last piece.
        let mut c = core();
        let f = frame(OP_TEXT, true, &"€".as_bytes()[..2], Some(key));
        let (out, stop) = relay_in_pieces(&mut c, Side::Client, &f, &[1, 2, 3, 4, 5, 6, 7]);
        assert!(matches!(stop, Some(Stop::Event(Event::End(CloseReason::ClientInvalidUtf8)))));
        assert!(out.len() < f.len());
    }

    /// Random frame sequences cut into random pieces relay to the same frames whatever
    /// the cuts: the same bytes from the upstream, the same payloads (under the
    /// gateway's keys) from the client; text with multi-byte characters split inside a
    /// code point, across pieces and across the frames of a message; messages and bytes
    /// counted exactly.
    #[tokio::test]
    async fn any_split_of_valid_frames_relays_the_same_frames() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let text = "aé€𝄞z".repeat(60);
        for round in 0..3_000 {
            let side = if round % 2 == 0 { Side::Client } else { Side::Upstream };
            let key = |r: u64| (side == Side::Client).then_some([r as u8, (r >> 8) as u8, 7, 99]);
            let (mut input, mut messages, mut bytes) = (Vec::new(), 0u64, 0u64);
            for _ in 0..1 + next() % 5 {
                // One message: text or binary, in one to four frames cut at any byte
                // offset (inside a code point too), a ping or a pong now and then between.
                let is_text = next() % 2 == 0;
                let len = (next() % 600) as usize;
                let body: Vec<u8> = if is_text {
                    let mut end = len.min(text.len());
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.as_bytes()[..end].to_vec()
                } else {
                    (0..len).map(|_| next() as u8).collect()
                };
                let parts = 1 + (next() % 4) as usize;
                let mut cuts: Vec<usize> = (1..parts).map(|_| (next() as usize) % (body.len() + 1)).collect();
                cuts.sort();
                let mut from = 0;
                for (i, cut) in cuts.iter().copied().chain(std::iter::once(body.len())).enumerate() {
                    let op = match (i, is_text) {
                        (0, true) => OP_TEXT,
                        (0, false) => OP_BINARY,
                        _ => OP_CONTINUATION,
                    };
                    input.extend(frame(op, cut == body.len() && i == parts - 1, &body[from..cut], key(next())));
                    from = cut;
                    if next() % 5 == 0 {
                        input.extend(frame(OP_PONG, true, b"beat", key(next())));
                    }
                }
                messages += 1;
                bytes += body.len() as u64;
            }
            let pieces = (next() % 12) as usize;
            let mut cuts: Vec<usize> = (0..pieces).map(|_| (next() as usize) % (input.len() + 1)).collect();
            if round % 7 == 0 {
                cuts = (1..input.len()).collect(); // one byte at a time
            }
            cuts.sort();
            let mut c = core();
            let (out, stop) = relay_in_pieces(&mut c, side, &input, &cuts);
            assert!(stop.is_none(), "round {round}: stopped");
            match side {
                Side::Upstream => assert_eq!(out, input, "round {round}: upstream bytes go on unchanged"),
                Side::Client => assert_eq!(frames(&out), frames(&input), "round {round}"),
            }
            assert_eq!(
                (c.counts[side as usize], c.bytes[side as usize]),
                (messages, bytes),
                "round {round}"
            );
            assert!(!c.in_frame(side));
        }
    }

    /// Arbitrary bytes from either side never panic the codec, and what it reports
    /// stays inside its input: `out <= used <= len`, with whole headers passed on.
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
            // What is passed on parses as frames, whole but for a data frame in progress at the end.
            let mut rest = &input[..p.out];
            while !rest.is_empty() {
                let h = wire::parse(rest).unwrap().expect("whole headers only");
                let total = h.header_len + h.len as usize;
                if total > rest.len() {
                    assert!(!h.is_control() && c.in_frame(side), "only a data frame in progress is cut");
                    break;
                }
                rest = &rest[total..];
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
