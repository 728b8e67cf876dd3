//! permessage-deflate inside the frame path (RFC 7692, DESIGN.md section 16): raw
//! deflate (flate2 on zlib-rs) with the `00 00 ff ff` tail of section 7.2 stripped
//! and appended, and the memory budget of all sessions' deflate/inflate state.
//!
//! Inflation is stepwise into a caller's bounded buffer ([`Inflater::step`]), so what
//! a message inflates to is seen, counted and limited piece by piece, never held whole.
//! Without context takeover (the default) neither side keeps state between messages:
//! an [`Inflater`] or [`Deflater`] holds its zlib state only while a message is in
//! progress, and an idle session holds none.

use crate::extension::{Deflate, MAX_WINDOW_BITS};
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// zlib states kept per worker thread for the next message, at most: without context
/// takeover a state lives for one message, and allocating (and clearing) ~300 KiB of
/// deflate state per 300-byte message doubled the CPU per message. Spares belong to
/// threads, not sessions: an idle session still holds none.
const SPARES: usize = 2;

thread_local! {
    /// Deflaters by (level, window bits), reset before reuse.
    static SPARE_DEFLATERS: RefCell<Vec<(u32, u8, Box<Compress>)>> = const { RefCell::new(Vec::new()) };
    /// Inflaters (all use the largest window), reset before reuse.
    static SPARE_INFLATERS: RefCell<Vec<Decompress>> = const { RefCell::new(Vec::new()) };
}

fn spare_deflater(level: u32, bits: u8) -> Option<Box<Compress>> {
    SPARE_DEFLATERS
        .try_with(|s| {
            let mut s = s.try_borrow_mut().ok()?;
            let i = s.iter().position(|(l, b, _)| (*l, *b) == (level, bits))?;
            Some(s.swap_remove(i).2)
        })
        .ok()
        .flatten()
}

fn keep_deflater(level: u32, bits: u8, mut c: Box<Compress>) {
    c.reset();
    let _ = SPARE_DEFLATERS.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut()
            && s.len() < SPARES
        {
            s.push((level, bits, c));
        }
    });
}

fn spare_inflater() -> Option<Box<Decompress>> {
    SPARE_INFLATERS
        .try_with(|s| s.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten()
        .map(Box::new)
}

fn keep_inflater(mut d: Box<Decompress>) {
    d.reset(false);
    let _ = SPARE_INFLATERS.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut()
            && s.len() < SPARES
        {
            s.push(*d);
        }
    });
}

/// What RFC 7692 section 7.2.1 strips from the end of a compressed message, and
/// section 7.2.2 appends before inflating it.
pub(crate) const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Memory an inflater holds (its window and state), counted against the budget.
pub const INFLATE_MEMORY: usize = (1 << MAX_WINDOW_BITS) + (16 << 10);

/// Memory a deflater with a window of `bits` holds (zlib: window, hash chains and
/// pending buffer at memLevel 8), counted against the budget.
pub fn deflate_memory(bits: u8) -> usize {
    (1usize << (bits.min(MAX_WINDOW_BITS) + 2)) + (128 << 10) + (16 << 10)
}

/// What the deflate/inflate state of every session may hold together
/// (`limits.max_compression_memory`). A session that keeps state between messages
/// (context takeover) reserves it for its lifetime at the 101; one that does not
/// takes it per message while the message is in progress.
#[derive(Debug)]
pub struct CompressionBudget {
    used: AtomicUsize,
    /// A reload changes it in place: what live sessions hold stays counted.
    limit: AtomicUsize,
}

impl CompressionBudget {
    pub fn new(limit: usize) -> CompressionBudget {
        CompressionBudget {
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    /// A reload changed `limits.max_compression_memory`: state held beyond the new
    /// limit stays until its sessions or messages end; nothing new is taken meanwhile.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes counted now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether `n` more bytes fit now (without taking them).
    pub fn has_room(&self, n: usize) -> bool {
        self.used().checked_add(n).is_some_and(|t| t <= self.limit.load(Ordering::Relaxed))
    }

    fn take(&self, n: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(n).filter(|t| *t <= limit))
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Take `n` bytes for as long as the returned reservation lives; `None` when they do
    /// not fit (two sessions racing for the last room: one gets it).
    pub fn reserve(self: &Arc<Self>, n: usize) -> Option<Reservation> {
        self.take(n).then(|| Reservation { budget: self.clone(), n })
    }
}

/// Bytes of the [`CompressionBudget`], given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<CompressionBudget>,
    n: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.n);
    }
}

/// What a session's deflate state reserves for its whole life at the 101: the state a
/// hop keeps between messages. Zero without context takeover.
pub fn session_memory(hop: &Deflate) -> usize {
    let mut n = 0;
    if !hop.send_no_context {
        n += deflate_memory(hop.send_window_bits);
    }
    if !hop.recv_no_context {
        n += INFLATE_MEMORY;
    }
    n
}

/// What one message in progress may hold on a hop without context takeover (checked
/// for room at the 101, taken per message).
pub fn message_memory(hop: &Deflate) -> usize {
    deflate_memory(hop.send_window_bits) + INFLATE_MEMORY
}

/// The budget has no room for a message's state: 1013 (inflating), or the message goes
/// uncompressed (deflating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoRoom;

/// The compressed data does not inflate (1007).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt;

/// Inflation of one peer's messages.
pub(crate) struct Inflater {
    /// The peer starts each message afresh: drop the state after each.
    no_context: bool,
    state: Option<Box<Decompress>>,
    /// Budget taken for the state of the message in progress (without context takeover).
    held: Option<Reservation>,
    budget: Option<Arc<CompressionBudget>>,
    /// The peer ended its deflate stream (a final block) inside this message.
    ended: bool,
}

impl Inflater {
    pub(crate) fn new(hop: &Deflate, budget: Option<Arc<CompressionBudget>>) -> Inflater {
        Inflater {
            no_context: hop.recv_no_context,
            state: None,
            held: None,
            budget,
            ended: false,
        }
    }

    /// A compressed message starts: make the state ready.
    pub(crate) fn begin(&mut self) -> Result<(), NoRoom> {
        if self.state.is_none() {
            if self.no_context
                && let Some(b) = &self.budget
            {
                self.held = Some(b.reserve(INFLATE_MEMORY).ok_or(NoRoom)?);
            }
            self.state = Some(spare_inflater().unwrap_or_else(|| Box::new(Decompress::new_with_window_bits(false, MAX_WINDOW_BITS))));
        }
        self.ended = false;
        Ok(())
    }

    /// Inflate from `input` into `out`: returns the input used and the output written.
    /// Stops when `out` is full, so a bomb yields its output a buffer at a time.
    pub(crate) fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize), Corrupt> {
        let Some(d) = self.state.as_mut() else { return Err(Corrupt) };
        if self.ended {
            // Data after the final block of the peer's stream.
            return if input.is_empty() { Ok((0, 0)) } else { Err(Corrupt) };
        }
        let (i0, o0) = (d.total_in(), d.total_out());
        let status = d.decompress(input, out, FlushDecompress::None).map_err(|_| Corrupt)?;
        let used = (d.total_in() - i0) as usize;
        let wrote = (d.total_out() - o0) as usize;
        if status == Status::StreamEnd {
            self.ended = true;
            if used < input.len() {
                return Err(Corrupt);
            }
        }
        Ok((used, wrote))
    }

    /// Whether the state of a message in progress is taken from the budget for that
    /// message (no context takeover), rather than reserved for the whole session.
    pub(crate) fn holds_per_message(&self) -> bool {
        self.no_context && self.budget.is_some()
    }

    /// The peer ended its deflate stream (a final block) in this message: no tail
    /// follows it (section 7.2.3.1 of the RFC leaves BFINAL to the sender).
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// The message is over (or the session ends): without context takeover, or after
    /// the peer ended its stream, the state goes.
    pub(crate) fn end(&mut self) {
        if self.no_context || self.ended {
            if let Some(d) = self.state.take() {
                keep_inflater(d);
            }
            self.held = None;
        }
        self.ended = false;
    }
}

/// The zlib-rs level for `compression_level`. zlib-rs' (and zlib-ng's) level 1 is a
/// "quick" strategy with static Huffman codes only, which leaves a 300-byte JSON message
/// at 92% of its size; zlib's own level 1 builds codes per block. Level 1 here is that:
/// zlib-rs' level 2 (74% for the same message, still the fast match finder).
fn zlib_level(level: u32) -> u32 {
    level.clamp(2, 9)
}

/// Compression of the messages the gateway sends to one peer.
pub(crate) struct Deflater {
    no_context: bool,
    level: u32,
    window_bits: u8,
    state: Option<Box<Compress>>,
    held: Option<Reservation>,
    budget: Option<Arc<CompressionBudget>>,
}

impl Deflater {
    pub(crate) fn new(hop: &Deflate, level: u32, budget: Option<Arc<CompressionBudget>>) -> Deflater {
        Deflater {
            no_context: hop.send_no_context,
            level: level.clamp(1, 9),
            window_bits: hop
                .send_window_bits
                .clamp(crate::extension::MIN_DEFLATE_WINDOW_BITS, MAX_WINDOW_BITS),
            state: None,
            held: None,
            budget,
        }
    }

    /// A message to compress starts; `NoRoom`: send it uncompressed.
    pub(crate) fn begin(&mut self) -> Result<(), NoRoom> {
        if self.state.is_none() {
            if self.no_context
                && let Some(b) = &self.budget
            {
                self.held = Some(b.reserve(deflate_memory(self.window_bits)).ok_or(NoRoom)?);
            }
            let (level, bits) = (zlib_level(self.level), self.window_bits);
            self.state = Some(
                spare_deflater(level, bits)
                    .unwrap_or_else(|| Box::new(Compress::new_with_window_bits(flate2::Compression::new(level), false, bits))),
            );
        }
        Ok(())
    }

    /// Compress `input` onto the end of `out` (what zlib has ready; more may follow).
    pub(crate) fn put(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.run(input, out, FlushCompress::None);
    }

    /// The message ends: flush, and strip the tail (section 7.2.1).
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        self.run(&[], out, FlushCompress::Sync);
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        } else {
            // A sync flush always ends in the tail; an empty block keeps the message valid if not.
            out.push(0x00);
        }
        if self.no_context {
            if let Some(c) = self.state.take() {
                keep_deflater(zlib_level(self.level), self.window_bits, c);
            }
            self.held = None;
        }
    }

    fn run(&mut self, mut input: &[u8], out: &mut Vec<u8>, flush: FlushCompress) {
        let Some(c) = self.state.as_mut() else { return };
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(input.len() / 2 + 256);
            }
            let before_in = c.total_in();
            let room = out.capacity() - out.len();
            let before = out.len();
            if c.compress_vec(input, out, flush).is_err() {
                return; // not reached with valid arguments: the message then ends uncompressed-short
            }
            input = &input[(c.total_in() - before_in) as usize..];
            let wrote = out.len() - before;
            // Done when the input is in and zlib did not fill the room it had.
            if input.is_empty() && wrote < room {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(no_context: bool) -> Deflate {
        Deflate {
            send_window_bits: 15,
            send_no_context: no_context,
            recv_no_context: no_context,
        }
    }

    fn inflate_all(i: &mut Inflater, msg: &[u8]) -> Result<Vec<u8>, Corrupt> {
        i.begin().unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 100];
        let mut input = msg;
        loop {
            let (used, wrote) = i.step(input, &mut buf)?;
            out.extend_from_slice(&buf[..wrote]);
            input = &input[used..];
            if input.is_empty() && wrote < buf.len() {
                break;
            }
        }
        let mut t = 0;
        loop {
            let input = if i.ended() { &[][..] } else { &TAIL[t..] };
            let (used, wrote) = i.step(input, &mut buf)?;
            t += used;
            out.extend_from_slice(&buf[..wrote]);
            if (t == TAIL.len() || i.ended()) && wrote < buf.len() {
                break;
            }
        }
        i.end();
        Ok(out)
    }

    #[test]
    fn round_trip_with_and_without_context() {
        for no_context in [true, false] {
            let mut d = Deflater::new(&hop(no_context), 1, None);
            let mut i = Inflater::new(&hop(no_context), None);
            let msg = br#"{"type":"chat","room":"general","text":"hello hello hello hello"}"#.repeat(20);
            for _ in 0..3 {
                d.begin().unwrap();
                let mut wire = Vec::new();
                d.put(&msg, &mut wire);
                d.finish(&mut wire);
                assert!(!wire.ends_with(&TAIL));
                assert!(wire.len() < msg.len() / 4, "{} of {}", wire.len(), msg.len());
                assert_eq!(inflate_all(&mut i, &wire).unwrap(), msg);
            }
            assert_eq!(d.state.is_none(), no_context, "no state kept between messages");
            assert_eq!(i.state.is_none(), no_context);
        }
    }

    #[test]
    fn level_1_shrinks_a_short_json_message() {
        let msg = br#"{"type":"message","id":"msg-00000003","room":"general","user":{"id":1003,"name":"alice","avatar":"https://cdn.example.com/a/1.png"},"text":"Hey, did you see the deploy notes for today? The gateway now compresses messages.","ts":1765000003,"reactions":[],"thread":null}"#;
        let mut d = Deflater::new(&hop(true), 1, None);
        d.begin().unwrap();
        let mut out = Vec::new();
        d.put(msg, &mut out);
        d.finish(&mut out);
        assert!(out.len() * 100 < msg.len() * 80, "{} of {}", out.len(), msg.len());
    }

    #[test]
    fn back_references_to_an_earlier_message_fail_without_context() {
        // The sender keeps its context although it agreed not to.
        let mut d = Deflater::new(&hop(false), 6, None);
        let mut i = Inflater::new(&hop(true), None);
        let msg = b"the quick brown fox jumps over the lazy dog, again and again".repeat(4);
        let mut first = Vec::new();
        d.begin().unwrap();
        d.put(&msg, &mut first);
        d.finish(&mut first);
        assert_eq!(inflate_all(&mut i, &first).unwrap(), msg);
        let mut second = Vec::new();
        d.put(&msg, &mut second);
        d.finish(&mut second);
        assert_eq!(inflate_all(&mut i, &second), Err(Corrupt));
        assert_eq!(inflate_all(&mut i, &[0xff, 0xff, 0xff]), Err(Corrupt), "not deflate");
    }

    #[test]
    fn the_budget_bounds_state_and_is_given_back() {
        let budget = Arc::new(CompressionBudget::new(INFLATE_MEMORY + 10));
        let mut a = Inflater::new(&hop(true), Some(budget.clone()));
        let mut b = Inflater::new(&hop(true), Some(budget.clone()));
        a.begin().unwrap();
        assert_eq!(b.begin(), Err(NoRoom));
        a.end();
        assert_eq!(budget.used(), 0);
        b.begin().unwrap();
        drop(b);
        assert_eq!(budget.used(), 0);
        let r = budget.reserve(INFLATE_MEMORY).unwrap();
        assert!(budget.reserve(INFLATE_MEMORY).is_none());
        drop(r);
        assert!(budget.has_room(INFLATE_MEMORY));
    }
}
