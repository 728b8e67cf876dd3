//! Stage 9: relay frames between client and upstream until one side closes, a limit
//! trips, or the gateway shuts down.
//!
//! The relay works on frames, not messages ([`crate::wire`]): each frame read from one
//! side is checked (protocol, masking, fragmentation order, frame and message size,
//! UTF-8 of text across fragments), unmasked and re-masked in place, and written to
//! the other side in the same read buffer. A batch of frames costs one read and one
//! write; nothing is allocated per message and no message is reassembled.
//!
//! One task drives both sides through a single `poll_fn` state machine, so:
//! - both directions flow at once (no deadlock when both peers write), while a
//!   direction whose receiver is slow stops reading from its sender (backpressure:
//!   at most one read's worth of frames waits per direction);
//! - the gateway can send a close frame to either side at any moment: only whole
//!   frames are written, so a gateway frame never lands inside a relayed one.
//!
//! Closing passes through: a client's close (or its protocol violation) goes to the
//! upstream first, and what the upstream still sends reaches the client before the
//! client's close frame, so messages in flight are not lost.
//!
//! Ping/pong are per hop, as RFC 6455 treats control frames: each hop answers a ping
//! itself at once. Pings are also passed on so the far side sees them, and the far
//! side's pong to such a ping is absorbed (the sender already has its answer).
//! Unsolicited pongs (heartbeats) are passed on. The gateway's own keep-alive pings
//! to the client are answered by the client and never forwarded.

use crate::error::{CloseReason, Initiator};
use crate::limits::MessageRate;
use crate::metrics::SessionMetrics;
use crate::wire::{self, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, Utf8, Violation};
use bytes::{Buf, Bytes, BytesMut};
use std::{
    cell::RefCell,
    collections::VecDeque,
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    time::{Instant, Sleep, sleep_until},
};
use tokio_util::sync::CancellationToken;

/// Bytes read from a side at once.
const READ_CHUNK: usize = 16 * 1024;
/// Reads from one side per wake-up before the relay yields to other tasks.
const BATCH: usize = 16;
/// Pings passed on to a side and not yet answered, at most; beyond this a ping is
/// answered by the gateway only.
const MAX_FORWARDED_PINGS: usize = 8;
/// Pongs queued for a peer that does not read them: past this, stop reading from it.
const REPLY_LIMIT: usize = 4 * 1024;

thread_local! {
    /// The read buffer of the common case (no partial frame waiting): per worker thread,
    /// borrowed only inside one synchronous poll, so an idle session holds no buffer.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_CHUNK]);
}

/// Timers and limits of one session.
#[derive(Clone, Debug)]
pub struct Settings {
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub close_timeout: Duration,
    /// Client → upstream message rate (pings count); excess is delayed by not reading.
    pub message_rate: crate::config::Rate,
    pub message_burst: u32,
    /// Held back by the rate without pause for this long → close 1008.
    pub rate_abuse_timeout: Duration,
    /// Largest frame and message either side may send (1009 beyond).
    pub max_frame_size: usize,
    pub max_message_size: usize,
    /// Frames per client message; more → close 1009.
    pub max_fragments: u32,
}

impl Settings {
    /// Timers that do not fire and a rate that does not hold back: for measuring and
    /// testing the relay itself. Frames and messages up to `max_size`.
    pub fn unthrottled(max_size: usize) -> Settings {
        Settings {
            idle_timeout: Duration::from_secs(3600),
            ping_interval: Duration::from_secs(3600),
            close_timeout: Duration::from_secs(1),
            message_rate: crate::config::Rate {
                count: 1_000_000,
                per: Duration::from_secs(1),
            },
            message_burst: 1_000_000,
            rate_abuse_timeout: Duration::from_secs(3600),
            max_frame_size: max_size,
            max_message_size: max_size,
            max_fragments: u32::MAX,
        }
    }
}

/// Re-checks a live session against the current configuration after a reload
/// (firewall rules and revocations apply to open sessions too).
pub trait Policy: Sync {
    /// Cancelled when the configuration changes.
    fn generation(&self) -> CancellationToken;
    /// Why the session may no longer continue, if it may not.
    fn check(&self) -> Option<CloseReason>;
}

/// What, besides the peers, can end a session.
pub struct Control<'a> {
    /// Cancelled on drain: the session closes with 1001 after a random part of `drain_spread`,
    /// so clients do not all reconnect at the same instant.
    pub shutdown: &'a CancellationToken,
    pub drain_spread: Duration,
    /// Token expiry.
    pub deadline: Option<(Instant, CloseReason)>,
    pub policy: Option<&'a dyn Policy>,
    /// Log a progress event this often (bytes and messages so far).
    pub progress: Option<Duration>,
}

impl<'a> Control<'a> {
    /// Only a shutdown token: no expiry, no policy, no progress events.
    pub fn new(shutdown: &'a CancellationToken) -> Control<'a> {
        Control {
            shutdown,
            drain_spread: Duration::ZERO,
            deadline: None,
            policy: None,
            progress: None,
        }
    }
}

/// How a session ended, for the access log and metrics.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The close code of the session (1005 when a peer closed without a code, 1006
    /// when a connection was lost without a close frame).
    pub code: u16,
    pub initiator: Initiator,
    /// Set when the gateway ended the session.
    pub reason: Option<CloseReason>,
    /// Data messages and payload bytes, indexed by [`crate::metrics::Direction`].
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
}

/// One side of a session after its handshake: the stream, input read but not yet
/// relayed (a partial frame, or frames held back by the message rate), relayed
/// output the stream did not take yet, and the gateway's own frames for it (pongs,
/// pings, close). All three are empty, without capacity, while idle.
pub struct Endpoint<S> {
    io: S,
    rx: BytesMut,
    /// Relayed frames; the sender of these is not read while any are left.
    tx: BytesMut,
    /// Gateway frames, written when `tx` is empty (both hold whole frames only, so
    /// neither lands inside a frame of the other).
    ctl: BytesMut,
    /// Frames sent to this side are masked: it is the upstream (the gateway is its client).
    masked: bool,
    /// Written to since the last flush.
    dirty: bool,
}

impl<S> Endpoint<S> {
    /// The client side; `read_ahead` is what the client sent right behind its request.
    pub fn client(io: S, read_ahead: &[u8]) -> Self {
        Self::new(io, read_ahead, false)
    }

    /// The upstream side; `read_ahead` is what the upstream sent right behind its 101.
    pub fn upstream(io: S, read_ahead: &[u8]) -> Self {
        Self::new(io, read_ahead, true)
    }

    fn new(io: S, read_ahead: &[u8], masked: bool) -> Self {
        Endpoint {
            io,
            rx: BytesMut::from(read_ahead),
            tx: BytesMut::new(),
            ctl: BytesMut::new(),
            masked,
            dirty: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Queue a whole frame the gateway sends to this side.
    fn put(&mut self, opcode: u8, payload: &[u8]) {
        wire::put_frame(&mut self.ctl, opcode, payload, self.masked);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Endpoint<S> {
    /// Write `data` behind anything already queued; what the stream does not take now
    /// is queued.
    fn send(&mut self, cx: &mut Context<'_>, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if !self.tx.is_empty() || !self.ctl.is_empty() {
            self.tx.extend_from_slice(data);
            return self.poll_drain(cx);
        }
        let mut off = 0;
        while off < data.len() {
            match Pin::new(&mut self.io).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    off += n;
                    self.dirty = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        self.tx.extend_from_slice(&data[off..]);
        Ok(())
    }

    /// Write queued output until it is gone or the stream pushes back.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.tx.is_empty() {
                if self.ctl.is_empty() {
                    break;
                }
                std::mem::swap(&mut self.tx, &mut self.ctl);
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.tx) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.tx.advance(n);
                    self.dirty = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
        // Idle sessions keep no buffer.
        if self.tx.capacity() > 0 {
            self.tx = BytesMut::new();
        }
        if self.ctl.capacity() > 0 {
            self.ctl = BytesMut::new();
        }
        Ok(())
    }

    /// Drain the queue, then flush the stream (TLS keeps records until flushed).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_drain(cx)?;
        if !self.tx.is_empty() || !self.ctl.is_empty() {
            return Poll::Pending;
        }
        if self.dirty {
            std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.dirty = false;
        }
        Poll::Ready(Ok(()))
    }

    async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Send a close frame (`None`: without a code) and wait for the peer's reply.
    pub async fn close(&mut self, frame: Option<(u16, &str)>) {
        match frame {
            Some((code, reason)) => {
                let (p, n) = wire::close_payload(code, reason);
                self.put(OP_CLOSE, &p[..n]);
            }
            None => self.put(OP_CLOSE, &[]),
        }
        if self.flush().await.is_ok() {
            self.read_until_close().await;
        }
    }

    /// Read and discard frames until a close frame or the end of the stream: messages
    /// that arrive after a close was sent cannot be delivered (RFC 6455 5.5.1).
    async fn read_until_close(&mut self) {
        let mut skip = 0u64;
        loop {
            loop {
                if skip > 0 {
                    let n = skip.min(self.rx.len() as u64);
                    self.rx.advance(n as usize);
                    skip -= n;
                    if skip > 0 {
                        break;
                    }
                }
                match wire::parse(&self.rx) {
                    Ok(Some(h)) if h.opcode == OP_CLOSE => return,
                    Ok(Some(h)) => {
                        self.rx.advance(h.header_len);
                        skip = h.len;
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            self.rx.reserve(4096);
            match self.io.read_buf(&mut self.rx).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// The client's first data message, for `first_message` authentication: pings are
    /// answered, pongs skipped; it must be text of at most `max` bytes. Frames behind it
    /// stay for the relay. `None` on anything else.
    pub async fn first_text(&mut self, max: usize) -> Option<String> {
        let mut text = Vec::new();
        let mut started = false;
        loop {
            match wire::parse(&self.rx) {
                Err(_) => return None,
                Ok(Some(h)) if h.len > max as u64 => return None,
                Ok(Some(h)) if self.rx.len() as u64 >= h.header_len as u64 + h.len => {
                    let mask = h.mask?; // a client's frames are masked
                    let mut frame = self.rx.split_to(h.header_len + h.len as usize);
                    let payload = &mut frame[h.header_len..];
                    wire::apply_mask(payload, mask);
                    match h.opcode {
                        OP_PING => {
                            self.put(OP_PONG, payload);
                            self.flush().await.ok()?;
                        }
                        OP_PONG => {}
                        OP_TEXT if !started => {
                            text.extend_from_slice(payload);
                            started = true;
                        }
                        OP_CONTINUATION if started && text.len() + payload.len() <= max => text.extend_from_slice(payload),
                        _ => return None,
                    }
                    // A control frame may come between the fragments (RFC 6455 5.4): only
                    // the final data frame ends the message.
                    if started && h.fin && !h.is_control() {
                        break;
                    }
                    continue;
                }
                Ok(_) => {}
            }
            self.rx.reserve(4096);
            if self.io.read_buf(&mut self.rx).await.ok()? == 0 {
                return None;
            }
        }
        if self.rx.is_empty() {
            self.rx = BytesMut::new();
        }
        String::from_utf8(text).ok()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Client = 0,
    Upstream = 1,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

enum Event {
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
struct Processed {
    /// `buf[..out]` is to be written to the other side.
    out: usize,
    /// Input bytes used up.
    used: usize,
    /// Bytes the next (incomplete) frame needs in all.
    need: usize,
    /// Set when processing must stop before the end of the input.
    stop: Option<Stop>,
}

enum Stop {
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
struct Core {
    dec: [Decoder; 2],
    /// Pings from a side passed on to the other, waiting for the other's pong.
    forwarded: [VecDeque<Bytes>; 2],
    max_frame: u64,
    max_message: u64,
    max_fragments: u32,
    counts: [u64; 2],
    bytes: [u64; 2],
    /// What has been added to the shared counters so far: they are updated once per
    /// wake-up, not per message, so sessions on other cores do not contend per message.
    reported: ([u64; 2], [u64; 2]),
    activity: bool,
    // Keep-alive pings from the gateway to the client.
    ping_seq: u64,
    ping_payload: Option<[u8; 15]>,
    // Client → upstream message rate.
    rate: MessageRate,
    /// Not reading from the client until this sleep fires.
    throttle: Option<Pin<Box<Sleep>>>,
    /// Since when the client has been held back without a pause.
    throttled_since: Option<Instant>,
    rate_abuse_timeout: Duration,
    /// The time of the current wake-up, read once per wake-up rather than per message.
    now: Option<Instant>,
}

/// Relay until the session ends; sends close frames as needed and returns how it ended.
pub async fn run<C, U>(
    client: &mut Endpoint<C>,
    upstream: &mut Endpoint<U>,
    settings: &Settings,
    metrics: &SessionMetrics,
    control: Control<'_>,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut core = Core::new(settings);
    let mut last_activity = Instant::now();
    let mut idle = Box::pin(sleep_until(last_activity + settings.idle_timeout));
    let mut ping = Box::pin(sleep_until(last_activity + settings.ping_interval));
    let mut expiry = control.deadline.map(|(at, reason)| (Box::pin(sleep_until(at)), reason));
    let cancelled = control.shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut drain: Option<Pin<Box<Sleep>>> = None;
    let mut generation = control.policy.map(|p| Box::pin(p.generation().cancelled_owned()));
    let mut progress = control.progress.map(|every| Box::pin(sleep_until(Instant::now() + every)));
    let started = Instant::now();

    let event = poll_fn(|cx| {
        core.now = None;
        if drain.is_none() && cancelled.as_mut().poll(cx).is_ready() {
            drain = Some(Box::pin(sleep_until(Instant::now() + jitter(control.drain_spread))));
        }
        if let Some(d) = drain.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::End(CloseReason::Shutdown));
            }
        }
        if let (Some(g), Some(policy)) = (generation.as_mut(), control.policy) {
            if g.as_mut().poll(cx).is_ready() {
                if let Some(reason) = policy.check() {
                    return Poll::Ready(Event::End(reason));
                }
                let mut next = Box::pin(policy.generation().cancelled_owned());
                let _ = next.as_mut().poll(cx);
                *g = next;
            }
        }
        if let (Some(p), Some(every)) = (progress.as_mut(), control.progress) {
            if p.as_mut().poll(cx).is_ready() {
                tracing::info!(
                    duration_ms = started.elapsed().as_millis() as u64,
                    bytes_in = core.bytes[0],
                    bytes_out = core.bytes[1],
                    messages_in = core.counts[0],
                    messages_out = core.counts[1],
                    "session progress"
                );
                p.as_mut().reset(Instant::now() + every);
                let _ = p.as_mut().poll(cx);
            }
        }
        if let Some((timer, reason)) = expiry.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::End(*reason));
            }
        }
        if poll_sleep(&mut ping, cx) {
            if core.ping_payload.is_some() {
                return Poll::Ready(Event::End(CloseReason::PingTimeout));
            }
            core.ping_seq += 1;
            let mut payload = *b"wsgate:\0\0\0\0\0\0\0\0";
            payload[7..].copy_from_slice(&core.ping_seq.to_be_bytes());
            core.ping_payload = Some(payload);
            client.put(OP_PING, &payload);
            ping.as_mut().reset(Instant::now() + settings.ping_interval);
            let _ = ping.as_mut().poll(cx);
        }
        if let Some(ev) = pump(&mut core, Side::Client, client, upstream, cx) {
            return Poll::Ready(ev);
        }
        if let Some(ev) = pump(&mut core, Side::Upstream, upstream, client, cx) {
            return Poll::Ready(ev);
        }
        if let Poll::Ready(Err(_)) = client.poll_flush(cx) {
            return Poll::Ready(Event::End(CloseReason::ClientIo));
        }
        if let Poll::Ready(Err(_)) = upstream.poll_flush(cx) {
            return Poll::Ready(Event::End(CloseReason::UpstreamReset));
        }
        if std::mem::take(&mut core.activity) {
            last_activity = Instant::now();
            core.report(metrics);
        }
        if poll_sleep(&mut idle, cx) {
            if last_activity.elapsed() >= settings.idle_timeout {
                return Poll::Ready(Event::End(CloseReason::IdleTimeout));
            }
            idle.as_mut().reset(last_activity + settings.idle_timeout);
            let _ = idle.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await;

    core.report(metrics);
    // Boxed: the closing handshakes need their state only at the end, not for the whole session.
    let (code, initiator, reason) = Box::pin(finish(&mut core, client, upstream, event, settings.close_timeout)).await;
    core.report(metrics); // what was relayed while closing
    Outcome {
        code,
        initiator,
        reason,
        messages: core.counts,
        bytes: core.bytes,
    }
}

/// A random duration in `[0, spread)`.
fn jitter(spread: Duration) -> Duration {
    let mut b = [0u8; 8];
    if spread.is_zero() || aws_lc_rs::rand::fill(&mut b).is_err() {
        return Duration::ZERO;
    }
    spread.mul_f64((u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64)
}

fn poll_sleep(s: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> bool {
    s.as_mut().poll(cx).is_ready()
}

/// Outcome of one read in [`pump`].
enum Read {
    /// Nothing to read now (or the receiver or the rate says wait).
    Wait,
    Again,
    Event(Event),
}

/// Move frames read from `from` (the peer on `side`) to `to` until `from` has nothing
/// ready, `to` pushes back, the rate holds the client back or the batch is used up.
fn pump<A, B>(core: &mut Core, side: Side, from: &mut Endpoint<A>, to: &mut Endpoint<B>, cx: &mut Context<'_>) -> Option<Event>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    for _ in 0..BATCH {
        if to.poll_drain(cx).is_err() {
            return Some(Event::End(write_error(side)));
        }
        if !to.tx.is_empty() {
            return None; // the receiver pushes back: stop reading from its sender
        }
        if from.ctl.len() > REPLY_LIMIT {
            // Pongs pile up for a peer that sends pings but does not read.
            if from.poll_drain(cx).is_err() {
                return Some(Event::End(lost(side)));
            }
            if from.ctl.len() > REPLY_LIMIT {
                return None;
            }
        }
        if side == Side::Client && core.throttled(cx) {
            return None;
        }
        let step = if from.rx.is_empty() {
            read_fresh(core, side, from, to, cx)
        } else {
            read_held(core, side, from, to, cx)
        };
        match step {
            Read::Again => {}
            Read::Wait => return None,
            Read::Event(ev) => return Some(ev),
        }
    }
    // Batch used up: come back after other tasks had their turn.
    cx.waker().wake_by_ref();
    None
}

/// The common case: nothing held from earlier reads. Read into the thread's scratch
/// buffer, relay the whole frames in it, and keep only a trailing partial frame.
fn read_fresh<A, B>(core: &mut Core, side: Side, from: &mut Endpoint<A>, to: &mut Endpoint<B>, cx: &mut Context<'_>) -> Read
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut relay_from = |buf: &mut Vec<u8>| {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut from.io).poll_read(cx, &mut rb) {
            Poll::Pending => {
                if side == Side::Client {
                    core.throttled_since = None; // the client paused: it is within the rate
                }
                return Read::Wait;
            }
            Poll::Ready(Err(_)) => return Read::Event(Event::End(lost(side))),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return Read::Event(Event::End(lost(side))),
            Poll::Ready(Ok(())) => {}
        }
        let data = rb.filled_mut();
        let p = core.process(side, data, &mut from.ctl, from.masked);
        if to.send(cx, &data[..p.out]).is_err() {
            return Read::Event(Event::End(write_error(side)));
        }
        from.rx.extend_from_slice(&data[p.used..]);
        match p.stop {
            Some(Stop::Event(ev)) => Read::Event(ev),
            Some(Stop::Throttle) | None => Read::Again,
        }
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => relay_from(&mut buf),
        // Not reached (polls do not nest); a private buffer keeps it correct anyway.
        Err(_) => relay_from(&mut vec![0; READ_CHUNK]),
    })
}

/// Input is held from earlier reads (a partial frame, or frames the rate held back):
/// relay what is whole, then read more behind it when a frame is still incomplete.
fn read_held<A, B>(core: &mut Core, side: Side, from: &mut Endpoint<A>, to: &mut Endpoint<B>, cx: &mut Context<'_>) -> Read
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let p = core.process(side, &mut from.rx, &mut from.ctl, from.masked);
    if to.send(cx, &from.rx[..p.out]).is_err() {
        return Read::Event(Event::End(write_error(side)));
    }
    from.rx.advance(p.used);
    if from.rx.is_empty() {
        from.rx = BytesMut::new();
    }
    match p.stop {
        Some(Stop::Event(ev)) => return Read::Event(ev),
        Some(Stop::Throttle) => return Read::Again,
        None if p.used > 0 => return Read::Again,
        None => {}
    }
    // The held frame is incomplete: check what has come of it, then read the rest
    // (bounded by the frame limit).
    if let Err(v) = core.check_partial(side, &from.rx) {
        return Read::Event(violation(side, v));
    }
    let want = p.need.saturating_sub(from.rx.len()).clamp(1024, 4 * READ_CHUNK);
    from.rx.reserve(want);
    match tokio_util::io::poll_read_buf(Pin::new(&mut from.io), cx, &mut from.rx) {
        Poll::Pending => {
            if side == Side::Client {
                core.throttled_since = None;
            }
            Read::Wait
        }
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Read::Event(Event::End(lost(side))),
        Poll::Ready(Ok(_)) => Read::Again,
    }
}

impl Core {
    fn new(settings: &Settings) -> Core {
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
    fn process(&mut self, from: Side, buf: &mut [u8], replies: &mut BytesMut, reply_masked: bool) -> Processed {
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
    fn check_partial(&mut self, from: Side, buf: &[u8]) -> Result<(), Violation> {
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
        let hl = h.header_len;
        let (head, payload) = frame.split_at_mut(hl);
        if !h.is_control() {
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
                    head[hl - 4..].copy_from_slice(&k);
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
            // Every data frame pays toward the message rate, final or not, empty or
            // not: a stream of empty fragments costs the client like messages do.
            if h.fin {
                self.counts[from as usize] += 1;
            }
            return Ok((true, self.charge(from)));
        }
        // Control frames: at most 125 bytes, read whole.
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
                head[hl - 4..].copy_from_slice(&k);
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
    fn throttled(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(sleep) = self.throttle.as_mut() else { return false };
        if sleep.as_mut().poll(cx).is_pending() {
            return true;
        }
        self.throttle = None;
        false
    }

    /// Add what was relayed since the last report to the shared counters.
    fn report(&mut self, metrics: &SessionMetrics) {
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

fn violation(from: Side, v: Violation) -> Event {
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
fn write_error(from: Side) -> CloseReason {
    lost(from.other())
}

fn lost(side: Side) -> CloseReason {
    match side {
        Side::Client => CloseReason::ClientIo,
        Side::Upstream => CloseReason::UpstreamReset,
    }
}

/// Complete the close handshakes after `event`; returns (code, initiator, gateway reason).
async fn finish<C, U>(
    core: &mut Core,
    client: &mut Endpoint<C>,
    upstream: &mut Endpoint<U>,
    event: Event,
    timeout: Duration,
) -> (u16, Initiator, Option<CloseReason>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    match event {
        // The client's close goes on to the upstream first. What the upstream sends
        // until its own close still reaches the client; then the client gets its own
        // frame back (RFC 6455 5.5.1) and the gateway, its server, ends the connection.
        Event::Closed {
            side: Side::Client,
            payload,
            len,
        } => {
            let frame = &payload[..len];
            close_upstream_first(core, client, upstream, frame, timeout).await;
            client.put(OP_CLOSE, frame);
            let _ = tokio::time::timeout(timeout, async {
                let _ = client.flush().await;
                let _ = client.io.shutdown().await;
            })
            .await;
            (close_code(frame), Initiator::Client, None)
        }
        // The upstream's close: answered at once, passed on to the client, whose
        // answer ends the client connection.
        Event::Closed {
            side: Side::Upstream,
            payload,
            len,
        } => {
            let frame = &payload[..len];
            client.put(OP_CLOSE, frame);
            upstream.put(OP_CLOSE, frame);
            let _ = tokio::time::timeout(timeout, async {
                tokio::join!(
                    async {
                        if client.flush().await.is_ok() {
                            client.read_until_close().await;
                            let _ = client.io.shutdown().await;
                        }
                    },
                    async {
                        let _ = upstream.flush().await;
                    }
                )
            })
            .await;
            (close_code(frame), Initiator::Upstream, None)
        }
        Event::End(reason) => {
            let (cc, uc) = reason.codes();
            let (cc, uc) = (u16::from(cc), u16::from(uc));
            let client_ok = !matches!(reason, CloseReason::ClientIo);
            let upstream_ok = !matches!(reason, CloseReason::UpstreamReset);
            let client_fault = matches!(
                reason,
                CloseReason::ClientProtocol | CloseReason::ClientInvalidUtf8 | CloseReason::ClientTooBig
            );
            if client_fault {
                // Nothing more is read from the client, but what the upstream sent
                // before it saw the close still reaches the client, ahead of its close.
                let (p, n) = wire::close_payload(uc, reason.text());
                close_upstream_first(core, client, upstream, &p[..n], timeout).await;
                let _ = tokio::time::timeout(timeout, async {
                    client.close(Some((cc, reason.text()))).await;
                    let _ = client.io.shutdown().await;
                })
                .await;
                return (cc, Initiator::Gateway, Some(reason));
            }
            let _ = tokio::time::timeout(timeout, async {
                tokio::join!(
                    async {
                        if client_ok {
                            client.close(Some((cc, reason.text()))).await;
                            let _ = client.io.shutdown().await;
                        }
                    },
                    async {
                        if upstream_ok {
                            upstream.close(Some((uc, reason.text()))).await;
                        }
                    }
                )
            })
            .await;
            let code = if client_ok { cc } else { 1006 };
            (code, Initiator::Gateway, Some(reason))
        }
    }
}

/// The code of a checked close payload; 1005 when it has none.
fn close_code(payload: &[u8]) -> u16 {
    wire::check_close(payload).ok().flatten().unwrap_or(1005)
}

/// Pass a close (payload `frame`) on to the upstream, then keep relaying what the
/// upstream still sends to the client until its own close, within `timeout`.
async fn close_upstream_first<C, U>(core: &mut Core, client: &mut Endpoint<C>, upstream: &mut Endpoint<U>, frame: &[u8], timeout: Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    upstream.put(OP_CLOSE, frame);
    let _ = tokio::time::timeout(timeout, relay_rest(core, Side::Upstream, upstream, client)).await;
}

/// Keep relaying what `from` sends until its close frame arrives, it breaks the
/// protocol or its connection ends: the close handshake passes through the gateway,
/// and messages `from` sent before it saw the close are not lost.
async fn relay_rest<A, B>(core: &mut Core, side: Side, from: &mut Endpoint<A>, to: &mut Endpoint<B>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    poll_fn(|cx| {
        core.now = None;
        if pump(core, side, from, to, cx).is_some() {
            return Poll::Ready(());
        }
        // `from` holds the close frame passed on to it; `to` what was relayed.
        if let Poll::Ready(Err(_)) = from.poll_flush(cx) {
            return Poll::Ready(());
        }
        if let Poll::Ready(Err(_)) = to.poll_flush(cx) {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
    let _ = to.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> Core {
        let mut s = Settings::unthrottled(1 << 16);
        s.max_message_size = 1 << 17;
        Core::new(&s)
    }

    fn frame(opcode: u8, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
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
    #[tokio::test]
    async fn a_ping_between_the_fragments_of_a_first_message_is_answered_and_skipped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (gateway_side, mut client) = tokio::io::duplex(4096);
        let mut ep = Endpoint::client(gateway_side, &[]);
        let k = Some([1, 2, 3, 4]);
        let mut wire_bytes = frame(OP_TEXT, false, b"{\"token\": \"ab", k);
        wire_bytes.extend(frame(OP_PING, true, b"hi", k));
        wire_bytes.extend(frame(OP_CONTINUATION, true, b"c\"}", k));
        wire_bytes.extend(frame(OP_TEXT, true, b"next", k));
        client.write_all(&wire_bytes).await.unwrap();
        let text = ep.first_text(1024).await;
        assert_eq!(text.as_deref(), Some("{\"token\": \"abc\"}"));
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(frames(&pong), vec![(OP_PONG, true, b"hi".to_vec())]);
        // The message behind the token is still there, whole.
        assert_eq!(frames(&ep.rx), vec![(OP_TEXT, true, b"next".to_vec())]);
    }

    fn frames(mut buf: &[u8]) -> Vec<(u8, bool, Vec<u8>)> {
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

#[cfg(test)]
mod pipe_tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::{
        WebSocketStream,
        tungstenite::{Message, protocol::Role},
    };

    /// Client ⇄ relay ⇄ the built-in echo, over in-memory pipes; returns the client
    /// WebSocket and the relay task.
    async fn session() -> (WebSocketStream<tokio::io::DuplexStream>, tokio::task::JoinHandle<Outcome>) {
        let (client_io, gw_client_io) = tokio::io::duplex(8 * 1024);
        let (gw_up_io, up_io) = tokio::io::duplex(16 * 1024);
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(16 * 1024)
            .max_write_buffer_size(2 << 20)
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20));
        let up = WebSocketStream::from_raw_socket(up_io, Role::Server, Some(config)).await;
        tokio::spawn(crate::echo::serve(up));
        let relay = tokio::spawn(async move {
            let settings = Settings::unthrottled(1 << 20);
            let metrics = crate::metrics::Metrics::new().session("t");
            let shutdown = CancellationToken::new();
            let (mut c, mut u) = (Endpoint::client(gw_client_io, &[]), Endpoint::upstream(gw_up_io, &[]));
            run(&mut c, &mut u, &settings, &metrics, Control::new(&shutdown)).await
        });
        (client, relay)
    }

    #[tokio::test]
    async fn frames_larger_than_a_read_cross_small_pipes() {
        let (mut client, relay) = session().await;
        let big: Vec<u8> = (0..250 * 1024).map(|i| (i % 253) as u8).collect();
        for _ in 0..3 {
            client.send(Message::binary(big.clone())).await.unwrap();
            let echo = tokio::time::timeout(Duration::from_secs(5), client.next())
                .await
                .expect("echo in time");
            assert_eq!(echo.unwrap().unwrap(), Message::binary(big.clone()));
        }
        client.close(None).await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
        assert_eq!((outcome.code, outcome.messages), (1005, [3, 3]));
        assert_eq!(outcome.bytes, [3 * big.len() as u64; 2]);
    }

    /// A client that floods pings and never reads is held back once its pongs fill a
    /// small queue: the gateway stops reading from it instead of buffering answers.
    #[tokio::test]
    async fn ping_flood_from_a_client_that_does_not_read_is_held_back() {
        let (client, relay) = session().await;
        let (mut tx, mut rx) = client.split();
        let mut sent = 0u32;
        let flood = async {
            for i in 0..100_000u32 {
                tx.send(Message::Ping(i.to_be_bytes().to_vec().into())).await.unwrap();
                sent += 1;
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(1), flood).await.is_err(),
            "all pings were taken: nothing held the client back"
        );
        assert!(sent < 20_000, "{sent} pings taken from a client that reads nothing");
        // Once the client reads, every ping is answered exactly once and the session still works.
        let reader = tokio::spawn(async move {
            let mut pongs = 0u32;
            loop {
                match rx.next().await {
                    Some(Ok(Message::Pong(_))) => pongs += 1,
                    Some(Ok(Message::Text(t))) => return (pongs, t.to_string()),
                    other => panic!("{other:?}"),
                }
            }
        });
        tx.send(Message::text("end")).await.unwrap();
        let (pongs, text) = tokio::time::timeout(Duration::from_secs(5), reader).await.unwrap().unwrap();
        assert_eq!(text, "end");
        assert!(pongs >= sent && pongs <= sent + 1, "{pongs} pongs for {sent} pings");
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), relay).await;
    }
}
