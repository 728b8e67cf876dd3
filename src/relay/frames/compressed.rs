//! Directions with permessage-deflate on either hop (DESIGN.md section 16): frames are
//! not relayed as they came, but taken apart and put together again. The sender's
//! payload is unmasked and, for a compressed message, inflated a bounded buffer at a
//! time; every limit and check (message size, UTF-8, validation, the rate) then sees
//! the real message. What goes on is written as new frames into [`Core::ready`]:
//! compressed for a receiver that agreed to it (messages under `compression_min_size`
//! go plain, the per-message RSV1 of RFC 7692), plain otherwise.
//!
//! Output is written as whole frames only, so the gateway's own frames (pongs, pings,
//! a close) may go between them; a message the sender fragmented goes on in fragments
//! cut where input arrived, not where the sender cut it. One call inflates at most
//! [`READY_LIMIT`] before it returns: the rest of the input waits in the read buffer
//! until the receiver has taken that, so a frame that inflates to gigabytes is held
//! a buffer at a time and reaches the message limit (1009) long before.

use super::{Core, Side, validated::Mode};
use crate::error::CloseReason;
use crate::relay::deflate::{CompressionBudget, Deflater, Inflater, TAIL};
use crate::wire::{self, OP_CONTINUATION, Violation};
use bytes::BytesMut;
use std::{cell::RefCell, sync::Arc};
use tokio::time::Instant;

/// Inflated output one call of `process` produces at most before it returns (the
/// receiver takes it before more is read).
pub(super) const READY_LIMIT: usize = 256 * 1024;
/// Inflation output buffer.
const INFLATE_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Inflation output, per worker thread: borrowed inside one synchronous call only.
    static OUT: RefCell<Vec<u8>> = RefCell::new(vec![0; INFLATE_CHUNK]);
}

/// Compression settings of a session: what was agreed with each hop.
#[derive(Clone, Debug)]
pub struct Compression {
    /// permessage-deflate as agreed with the client and with the upstream.
    pub hops: [Option<crate::extension::Deflate>; 2],
    /// 1..=9.
    pub level: u32,
    /// Messages the gateway sends that are smaller go uncompressed.
    pub min_size: usize,
    /// State taken per message (without context takeover) counts here.
    pub budget: Option<Arc<CompressionBudget>>,
    /// A compressed client message that holds per-message state must be complete this
    /// long after its first frame, else close 1001 (`limits.assembly_timeout`; `None`:
    /// no deadline, for benches and tests of the codec).
    pub message_timeout: Option<std::time::Duration>,
}

/// One direction's compression: the sender's messages inflated, the receiver's deflated.
pub(super) struct Codec {
    /// The sender's hop agreed to permessage-deflate.
    inflater: Option<Inflater>,
    /// The receiver's hop agreed to it.
    deflater: Option<Deflater>,
    min_size: usize,
    /// The receiver is the upstream: frames to it are masked.
    masked: bool,
    /// The metric measures the sender's hop (else the receiver's).
    measure_sender: bool,
    /// The message in progress came compressed.
    pub(super) inflating: bool,
    /// Its bytes on the wire so far.
    pub(super) wire_len: u64,
    out: OutMessage,
    /// `wsgate_compressed_bytes_total`: bytes on the measured hop's wire, and the same
    /// messages' payload; and what has been reported of them.
    pub(super) sizes: [u64; 2],
    pub(super) reported: [u64; 2],
}

/// The message being written to the receiver.
#[derive(Default)]
struct OutMessage {
    /// Its first frame has gone.
    started: bool,
    /// Whether it goes compressed: decided once `min_size` bytes (or its end) are in.
    compress: Option<bool>,
    /// What came before that decision.
    pending: Vec<u8>,
    opcode: u8,
}

impl Codec {
    /// The codec of the direction from `from`, when either hop agreed to compress.
    pub(super) fn new(c: &Compression, from: Side) -> Option<Codec> {
        let (sender, receiver) = (c.hops[from as usize], c.hops[from.other() as usize]);
        if sender.is_none() && receiver.is_none() {
            return None;
        }
        Some(Codec {
            inflater: sender.map(|h| Inflater::new(&h, c.budget.clone())),
            deflater: receiver.map(|h| Deflater::new(&h, c.level, c.budget.clone())),
            min_size: c.min_size,
            masked: from == Side::Client,
            // The client's hop when it has the extension: that is the egress it saves.
            measure_sender: if c.hops[Side::Client as usize].is_some() {
                from == Side::Client
            } else {
                from == Side::Upstream
            },
            inflating: false,
            wire_len: 0,
            out: OutMessage::default(),
            sizes: [0; 2],
            reported: [0; 2],
        })
    }

    /// Whether a frame with RSV1 may come from this direction's sender (the first frame
    /// of a message only; the caller checks that).
    pub(super) fn accepts_rsv1(&self) -> bool {
        self.inflater.is_some()
    }

    /// Take `data` of the message in progress for the receiver: held until the
    /// compression decision, then compressed (or not) into `pending`, which goes out as
    /// one frame per piece of input ([`Codec::flush`]) or at the end of the message.
    fn write(&mut self, data: &[u8]) {
        match self.out.compress {
            None => {
                self.out.pending.extend_from_slice(data);
                if self.out.pending.len() >= self.min_size.max(1) {
                    self.decide(true);
                }
            }
            Some(true) => {
                if let Some(d) = self.deflater.as_mut() {
                    d.put(data, &mut self.out.pending);
                }
            }
            Some(false) => self.out.pending.extend_from_slice(data),
        }
    }

    /// Decide whether the message goes compressed; what is pending is compressed then.
    fn decide(&mut self, compress: bool) {
        let compress = compress && self.deflater.as_mut().is_some_and(|d| d.begin().is_ok());
        self.out.compress = Some(compress);
        if compress && let Some(d) = self.deflater.as_mut() {
            let plain = std::mem::take(&mut self.out.pending);
            d.put(&plain, &mut self.out.pending);
        }
    }

    /// What is pending goes out as a frame: a non-final one after a piece of input
    /// (nothing when nothing is ready), the final one when the message ends.
    fn flush(&mut self, fin: bool, ready: &mut BytesMut) {
        if fin {
            if self.out.compress.is_none() {
                let big = self.out.pending.len() >= self.min_size;
                self.decide(big);
            }
            if let (Some(true), Some(d)) = (self.out.compress, self.deflater.as_mut()) {
                d.finish(&mut self.out.pending);
            }
        } else if self.out.compress.is_none() || self.out.pending.is_empty() {
            return;
        }
        let payload = std::mem::take(&mut self.out.pending);
        let opcode = if self.out.started { OP_CONTINUATION } else { self.out.opcode };
        let rsv1 = !self.out.started && self.out.compress == Some(true);
        put_frame(ready, opcode, fin, rsv1, &payload, self.masked);
        self.out.started = true;
        if !self.measure_sender {
            self.sizes[0] += payload.len() as u64;
        }
        if fin {
            self.out = OutMessage::default();
        }
    }
}

/// Append a frame with `payload` to `out`, with RSV1 when `rsv1`, masked under a fresh
/// key when `masked`.
fn put_frame(out: &mut BytesMut, opcode: u8, fin: bool, rsv1: bool, payload: &[u8], masked: bool) {
    let key = masked.then(wire::new_mask);
    let (mut h, n) = wire::header(opcode, fin, payload.len(), key);
    if rsv1 {
        h[0] |= 0x40;
    }
    out.extend_from_slice(&h[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(k) = key {
        wire::apply_mask(&mut out[start..], k);
    }
}

impl Core {
    /// A data message from `from` starts in a direction with a codec (`rsv1`: it came
    /// compressed).
    pub(super) fn start_coded(&mut self, from: Side, opcode: u8, rsv1: bool) -> Result<(), CloseReason> {
        let Some(c) = self.codec.as_deref_mut().and_then(|a| a[from as usize].as_mut()) else {
            return Ok(());
        };
        c.inflating = rsv1;
        c.wire_len = 0;
        c.out.opcode = opcode;
        if rsv1 && let Some(i) = c.inflater.as_mut() {
            i.begin().map_err(|_| CloseReason::Overloaded)?;
            if from == Side::Client && i.holds_per_message() {
                self.assembly_started = Some(*self.now.get_or_insert_with(Instant::now));
            }
        }
        Ok(())
    }

    /// The next piece of the frame in progress, in a direction with a codec: unmasked,
    /// inflated when the message came compressed, and handed on as plain bytes. Returns
    /// the input bytes used: fewer than `buf` holds when the output limit is reached
    /// (the rest is masked again, as it came, for the next call).
    pub(super) fn coded_payload(&mut self, from: Side, buf: &mut [u8]) -> Result<usize, CloseReason> {
        let dec = &mut self.dec[from as usize];
        let Some(f) = dec.frame.as_mut() else { return Ok(0) };
        let n = usize::try_from(f.left).unwrap_or(usize::MAX).min(buf.len());
        let at = usize::from(f.offset);
        let key = f.keys.map(|(m, _)| m);
        let piece = &mut buf[..n];
        if let Some(m) = key {
            wire::apply_mask(piece, wire::rotate(m, at));
        }
        let inflating = self
            .codec
            .as_deref()
            .and_then(|a| a[from as usize].as_ref())
            .is_some_and(|c| c.inflating);
        let used = if inflating {
            self.inflate(from, piece, false)?
        } else {
            self.plain(from, piece)?;
            n
        };
        if used < n
            && let Some(m) = key
        {
            // Not taken this time: as it was, for the next call.
            wire::apply_mask(&mut piece[used..], wire::rotate(m, at + used));
        }
        let dec = &mut self.dec[from as usize];
        let mut ends_message = false;
        if let Some(f) = dec.frame.as_mut() {
            f.left -= used as u64;
            f.offset = ((at + used) % 4) as u8;
            ends_message = f.fin && f.left == 0;
        }
        let streamed = dec.frame.is_some_and(|f| f.mode == Mode::Stream);
        if let Some(c) = self.codec.as_deref_mut().and_then(|a| a[from as usize].as_mut()) {
            c.wire_len += used as u64;
            if c.measure_sender {
                c.sizes[0] += used as u64;
            }
            // What this piece gave goes on now, as one frame; the last piece of the
            // message waits for its end (the tail may add to it).
            if streamed && !ends_message {
                c.flush(false, &mut self.ready);
            }
        }
        Ok(used)
    }

    /// Inflate `input` (all of it when `drain`, as the tail is), handing each buffer of
    /// output on; stops early, after some input, once [`READY_LIMIT`] is waiting. What
    /// waits for the receiver goes on as a frame once it reaches the frame cap (the
    /// smaller of `READY_LIMIT` and `max_frame_size`): a highly compressed message is
    /// never passed on as one frame the size of the message.
    fn inflate(&mut self, from: Side, input: &[u8], drain: bool) -> Result<usize, CloseReason> {
        let cap = READY_LIMIT.min(usize::try_from(self.max_frame).unwrap_or(usize::MAX)).max(1);
        OUT.with(|cell| {
            let mut own;
            let mut borrowed = cell.try_borrow_mut();
            let out: &mut [u8] = match borrowed.as_deref_mut() {
                Ok(v) => v,
                Err(_) => {
                    own = vec![0; INFLATE_CHUNK];
                    &mut own
                }
            };
            let mut used = 0;
            loop {
                let mut pending = self.pending(from);
                if pending >= cap
                    && let Some(c) = self.codec.as_deref_mut().and_then(|a| a[from as usize].as_mut())
                {
                    c.flush(false, &mut self.ready);
                    pending = c.out.pending.len();
                }
                if !drain && used > 0 && self.ready.len() + pending >= READY_LIMIT {
                    return Ok(used);
                }
                // Room up to the cap (all of the buffer when what is pending could not go).
                let room = match cap.checked_sub(pending) {
                    Some(r) if r > 0 => r.min(out.len()),
                    _ => out.len(),
                };
                let Some(i) = self
                    .codec
                    .as_deref_mut()
                    .and_then(|a| a[from as usize].as_mut())
                    .and_then(|c| c.inflater.as_mut())
                else {
                    return Ok(used);
                };
                let rest = &input[used..];
                let (u, wrote) = if rest.is_empty() && drain && i.ended() {
                    (0, 0)
                } else {
                    i.step(rest, &mut out[..room]).map_err(|_| bad(from, Violation::Utf8))?
                };
                used += u;
                self.plain(from, &out[..wrote])?;
                let full = wrote == room;
                if used == input.len() && !full {
                    return Ok(used);
                }
                if !full && u == 0 {
                    return Ok(used); // no progress possible (not reached with zlib)
                }
            }
        })
    }

    /// Bytes of the message in progress from `from` waiting to go to the receiver.
    fn pending(&self, from: Side) -> usize {
        self.codec
            .as_deref()
            .and_then(|a| a[from as usize].as_ref())
            .map_or(0, |c| c.out.pending.len())
    }

    /// Plain bytes of the message in progress: counted against the message limit, text
    /// checked, then assembled for validation, dropped (refused) or written on.
    fn plain(&mut self, from: Side, data: &[u8]) -> Result<(), CloseReason> {
        let max_message = self.max_message;
        let dec = &mut self.dec[from as usize];
        let Some(f) = dec.frame else { return Ok(()) };
        dec.message_len += data.len() as u64;
        if dec.message_len > max_message {
            return Err(bad(from, Violation::TooBig));
        }
        if f.text {
            dec.utf8.feed(data, false).map_err(|v| bad(from, v))?;
        }
        let Some(c) = self.codec.as_deref_mut().and_then(|a| a[from as usize].as_mut()) else {
            return Ok(());
        };
        c.sizes[1] += data.len() as u64;
        match f.mode {
            Mode::Probe => {
                self.hold(data);
            }
            Mode::Assemble => {
                let share = self.assembly.as_deref();
                self.held += super::grow(&mut dec.assembly, data.len(), max_message as usize, share).ok_or(CloseReason::Overloaded)?;
                dec.assembly.extend_from_slice(data);
            }
            Mode::Skip => {}
            Mode::Stream => {
                c.write(data);
                self.bytes[from as usize] += data.len() as u64;
            }
        }
        Ok(())
    }

    /// The final frame of a message in a direction with a codec is in: the tail of a
    /// compressed message is inflated, the text check completed, and the message ends
    /// for the receiver (its last frame), unless it is held for validation.
    pub(super) fn finish_coded(&mut self, from: Side, mode: Mode) -> Result<(), CloseReason> {
        let inflating = self
            .codec
            .as_deref()
            .and_then(|a| a[from as usize].as_ref())
            .is_some_and(|c| c.inflating);
        if inflating {
            let mut tail_used = 0;
            while tail_used < TAIL.len() {
                let ended = self
                    .codec
                    .as_deref()
                    .and_then(|a| a[from as usize].as_ref())
                    .and_then(|c| c.inflater.as_ref())
                    .is_none_or(Inflater::ended);
                if ended {
                    break;
                }
                let u = self.inflate(from, &TAIL[tail_used..], true)?;
                if u == 0 {
                    break;
                }
                tail_used += u;
            }
            // Whatever zlib still holds.
            self.inflate(from, &[], true)?;
        }
        let dec = &mut self.dec[from as usize];
        if dec.frame.is_some_and(|f| f.text) {
            dec.utf8.feed(&[], true).map_err(|v| bad(from, v))?;
        }
        let Some(c) = self.codec.as_deref_mut().and_then(|a| a[from as usize].as_mut()) else {
            return Ok(());
        };
        if let Some(i) = c.inflater.as_mut() {
            i.end();
        }
        if from == Side::Client {
            self.assembly_started = None;
        }
        c.inflating = false;
        c.wire_len = 0;
        if mode == Mode::Stream {
            c.flush(true, &mut self.ready);
        }
        Ok(())
    }

    /// A whole message the gateway passes on itself (a validated one) to the receiver
    /// of `from`'s messages: compressed when that hop agreed and it is large enough.
    pub(super) fn put_message(&mut self, from: Side, opcode: u8, payload: &[u8]) {
        match self.codec.as_deref_mut().and_then(|a| a[from as usize].as_mut()) {
            Some(c) => {
                c.out = OutMessage {
                    opcode,
                    ..OutMessage::default()
                };
                c.write(payload);
                c.flush(true, &mut self.ready);
            }
            None => wire::put_frame(&mut self.ready, opcode, payload, from == Side::Client),
        }
    }

    /// Plain bytes of the message in progress from `from`, handed to its receiver's side
    /// of the codec (a held message that turned out not to be a refresh).
    pub(super) fn write_coded(&mut self, from: Side, data: &[u8]) {
        if let Some(c) = self.codec.as_deref_mut().and_then(|a| a[from as usize].as_mut()) {
            c.write(data);
        }
    }

    /// Whether `from`'s direction takes frames apart (a codec on either hop).
    pub(super) fn coded(&self, from: Side) -> bool {
        self.codec.as_deref().is_some_and(|a| a[from as usize].is_some())
    }

    /// A frame header from `from` against the extension: RSV1 only on the first frame
    /// of a message, only from a hop that agreed to compress; the wire bytes of a
    /// compressed message are held to the message limit too (an endless run of empty
    /// deflate blocks inflates to nothing).
    pub(super) fn check_coded(&self, from: Side, h: &wire::Header) -> Result<(), Violation> {
        let codec = self.codec.as_deref().and_then(|a| a[from as usize].as_ref());
        if h.rsv1 && (h.opcode == OP_CONTINUATION || !codec.is_some_and(Codec::accepts_rsv1)) {
            return Err(Violation::Protocol);
        }
        if let Some(c) = codec
            && (h.rsv1 || (h.opcode == OP_CONTINUATION && c.inflating))
        {
            let wire_len = if h.opcode == OP_CONTINUATION { c.wire_len } else { 0 };
            if wire_len.saturating_add(h.len) > self.max_message.saturating_add(self.max_message / 64 + 1024) {
                return Err(Violation::TooBig);
            }
        }
        Ok(())
    }
}

fn bad(from: Side, v: Violation) -> CloseReason {
    match super::violation(from, v) {
        super::Event::End(reason) => reason,
        _ => CloseReason::ClientProtocol,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{frame, frames};
    use super::super::{Settings, Stop};
    use super::*;
    use crate::extension::Deflate;
    use crate::wire::OP_TEXT;
    use flate2::{Compress, FlushCompress};

    fn hop() -> Deflate {
        Deflate {
            send_window_bits: 15,
            send_no_context: true,
            recv_no_context: true,
        }
    }

    /// Settings whose client hop agreed to permessage-deflate (the upstream's did not).
    fn settings(max: usize) -> Settings {
        let mut s = Settings::unthrottled(max);
        s.compression = Some(Box::new(Compression {
            hops: [Some(hop()), None],
            level: 1,
            min_size: 16,
            budget: None,
            message_timeout: None,
        }));
        s
    }

    /// A core with [`settings`].
    fn core(max: usize) -> Core {
        Core::new(&settings(max))
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(flate2::Compression::new(6), false);
        let mut out = Vec::with_capacity(data.len() + 1024);
        c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - 4);
        out
    }

    fn inflate(data: &[u8]) -> Vec<u8> {
        let mut d = flate2::Decompress::new(false);
        let mut input = data.to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync).unwrap();
        out
    }

    /// Run `input` through the core in pieces of `step` bytes, as the pump would; returns
    /// what went on and how it stopped.
    fn relay(c: &mut Core, side: Side, input: &[u8], step: usize) -> (Vec<u8>, Option<Stop>) {
        let (out, stop, _) = super::super::tests::relay_in_steps(c, side, input, step);
        (out, stop)
    }

    #[tokio::test]
    async fn compressed_messages_in_any_pieces_go_on_plain() {
        let text = r#"{"type":"chat","text":"héllo wörld, héllo wörld"}"#.repeat(50);
        let z = deflate(text.as_bytes());
        let key = Some([1, 2, 3, 4]);
        let mut input = frame(OP_TEXT, false, &z[..z.len() / 3], key);
        input[0] |= 0x40;
        input.extend(frame(crate::wire::OP_PING, true, b"p", key));
        input.extend(frame(OP_CONTINUATION, true, &z[z.len() / 3..], key));
        for step in [1, 7, 100, 1 << 20] {
            let mut c = core(1 << 20);
            let (out, stop) = relay(&mut c, Side::Client, &input, step);
            assert!(stop.is_none(), "step {step}");
            let got: Vec<u8> = frames(&out)
                .into_iter()
                .filter(|(op, _, _)| *op != crate::wire::OP_PING)
                .flat_map(|(_, _, p)| p)
                .collect();
            assert_eq!(got, text.as_bytes(), "step {step}");
            // Every frame to the upstream is masked, none has RSV1 (its hop has no extension).
            let mut rest = &out[..];
            while let Some(h) = crate::wire::parse(rest).unwrap() {
                assert!(h.mask.is_some() && !h.rsv1);
                rest = &rest[h.header_len + h.len as usize..];
            }
            assert_eq!((c.counts[0], c.bytes[0]), (1, text.len() as u64));
            let codec = c.codec.as_deref().unwrap()[0].as_ref().unwrap();
            assert_eq!(codec.sizes, [z.len() as u64, text.len() as u64]);
        }
    }

    #[tokio::test]
    async fn plain_upstream_messages_go_to_the_client_compressed_when_large() {
        let big = "abcabcabc ".repeat(3000);
        let mut input = frame(OP_TEXT, true, big.as_bytes(), None);
        input.extend(frame(OP_TEXT, true, b"short", None));
        let mut c = core(1 << 20);
        let (out, stop) = relay(&mut c, Side::Upstream, &input, 4096);
        assert!(stop.is_none());
        let mut rest = &out[..];
        let (mut first, mut msgs) = (Vec::new(), Vec::new());
        let mut rsv1 = Vec::new();
        while let Some(h) = crate::wire::parse(rest).unwrap() {
            let p = &rest[h.header_len..h.header_len + h.len as usize];
            assert!(h.mask.is_none());
            if h.opcode != OP_CONTINUATION {
                rsv1.push(h.rsv1);
            } else {
                assert!(!h.rsv1, "RSV1 on the first frame only");
            }
            first.extend_from_slice(p);
            if h.fin {
                msgs.push(std::mem::take(&mut first));
            }
            rest = &rest[h.header_len + h.len as usize..];
        }
        assert_eq!(rsv1, [true, false], "the short one goes plain");
        assert_eq!(inflate(&msgs[0]), big.as_bytes());
        assert!(msgs[0].len() < big.len() / 20);
        assert_eq!(msgs[1], b"short");
    }

    /// A frame that inflates to far more than the limit: each call holds at most about
    /// READY_LIMIT of output, and the message limit ends it with 1009.
    #[tokio::test]
    async fn a_bomb_is_inflated_a_bounded_piece_at_a_time() {
        let zeros = vec![0u8; 8 << 20];
        let z = deflate(&zeros);
        let mut input = frame(crate::wire::OP_BINARY, true, &z, Some([9, 9, 9, 9]));
        input[0] |= 0x40;
        let mut c = core(4 << 20);
        let mut held = input;
        let mut peak = 0;
        let stop = loop {
            let p = c.process(Side::Client, &mut held, &mut BytesMut::new(), false);
            peak = peak.max(c.ready.len());
            c.ready.clear();
            held.drain(..p.used);
            if let Some(s) = p.stop {
                break s;
            }
            assert!(p.used > 0, "progress");
        };
        assert!(matches!(stop, Stop::Event(super::super::Event::End(CloseReason::ClientTooBig))));
        assert!(peak <= READY_LIMIT + INFLATE_CHUNK + 64, "{peak} held at once");
    }

    /// A bomb that stays under the message limit (so no 1009 ends it): each call still
    /// hands at most about READY_LIMIT of output on, the rest of the frame waiting in
    /// the read buffer, and the message arrives whole in the end. Found by the red-team
    /// pass: a step that filled the output buffer never checked what was waiting, so one
    /// call inflated the whole message (up to max_message_size) into memory at once.
    #[tokio::test]
    async fn a_bomb_under_the_limit_is_handed_on_a_bounded_piece_at_a_time() {
        let zeros = vec![0u8; 3 << 20];
        let z = deflate(&zeros);
        let mut input = frame(crate::wire::OP_BINARY, true, &z, Some([9, 9, 9, 9]));
        input[0] |= 0x40;
        let mut s = settings(4 << 20);
        s.max_frame_size = 100_000;
        let mut c = Core::new(&s);
        let mut held = input;
        let (mut peak, mut total) = (0, 0);
        while !held.is_empty() {
            let p = c.process(Side::Client, &mut held, &mut BytesMut::new(), false);
            assert!(p.stop.is_none());
            assert!(p.used > 0, "progress");
            let pending = c.codec.as_deref().unwrap()[0].as_ref().unwrap().out.pending.len();
            peak = peak.max(c.ready.len() + pending);
            for (_, _, p) in frames(&std::mem::take(&mut c.ready)) {
                // No frame to the upstream larger than max_frame_size.
                assert!(p.len() <= 100_000, "a frame of {}", p.len());
                total += p.len();
            }
            held.drain(..p.used);
        }
        assert_eq!(total, zeros.len());
        assert!(peak <= READY_LIMIT + INFLATE_CHUNK + 64, "{peak} held at once");
    }

    #[tokio::test]
    async fn rsv1_where_it_is_not_allowed() {
        let key = Some([1, 1, 1, 1]);
        // From the upstream, whose hop has no extension.
        let mut up = frame(OP_TEXT, true, b"x", None);
        up[0] |= 0x40;
        let mut c = core(1 << 20);
        let p = c.process(Side::Upstream, &mut up, &mut BytesMut::new(), true);
        assert!(matches!(
            p.stop,
            Some(Stop::Event(super::super::Event::End(CloseReason::UpstreamProtocol)))
        ));
        // On a continuation.
        let mut cont = frame(OP_TEXT, false, b"a", key);
        let mut second = frame(OP_CONTINUATION, true, b"b", key);
        second[0] |= 0x40;
        cont.extend(second);
        let mut c = core(1 << 20);
        let p = c.process(Side::Client, &mut cont, &mut BytesMut::new(), false);
        assert!(matches!(
            p.stop,
            Some(Stop::Event(super::super::Event::End(CloseReason::ClientProtocol)))
        ));
    }
}
