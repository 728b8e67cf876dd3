//! Stage 9: relay frames between client and upstream until one side closes, a limit
//! trips, or the gateway shuts down.
//!
//! One task drives both WebSockets through a single `poll_fn` state machine, so:
//! - both directions flow at once (no deadlock when both peers write), while a
//!   direction whose receiver is slow stops reading from its sender (backpressure:
//!   at most one message plus the write buffer is held per direction);
//! - messages that are already readable are written as a batch and flushed once;
//! - the gateway can send a close frame to either side at any moment.
//!
//! Ping/pong are per hop, as RFC 6455 treats control frames: each hop answers a ping
//! itself at once (tungstenite does). Pings are also passed on so the far side sees
//! them, and the far side's pong to such a ping is absorbed (the sender already has
//! its answer). Unsolicited pongs (heartbeats) are passed on. The gateway's own
//! keep-alive pings to the client are answered by the client and never forwarded.

use crate::error::{CloseReason, Initiator};
use crate::limits::MessageRate;
use crate::metrics::{Direction, SessionMetrics};
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::{
    collections::VecDeque,
    future::poll_fn,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::{Instant, Sleep, sleep_until},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Error as WsError, Message,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};
use tokio_util::sync::CancellationToken;

/// Messages read from one side before the relay flushes and yields to other tasks.
const BATCH: usize = 64;
/// Pings passed on to a side and not yet answered, at most; beyond this a ping is
/// answered by the gateway only.
const MAX_FORWARDED_PINGS: usize = 8;

/// Timers and limits of one session.
#[derive(Clone, Debug)]
pub struct Settings {
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub close_timeout: Duration,
    /// Client → upstream message rate (pings count); excess is delayed by not reading.
    pub message_rate: crate::units::Rate,
    pub message_burst: u32,
    /// Held back by the rate without pause for this long → close 1008.
    pub rate_abuse_timeout: Duration,
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

/// How a session ended, for the access log and metrics.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The close code of the session (1005 when a peer closed without a code, 1006
    /// when a connection was lost without a close frame).
    pub code: u16,
    pub initiator: Initiator,
    /// Set when the gateway ended the session.
    pub reason: Option<CloseReason>,
    /// Data messages and payload bytes, indexed by [`Direction`].
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Client,
    Upstream,
}

enum Event {
    /// A peer sent a close frame (already answered by tungstenite).
    Closed(Side, Option<CloseFrame>),
    /// The gateway ends the session.
    End(CloseReason),
}

/// One direction's state: a message waiting for its receiver, and whether the
/// receiver has unflushed writes.
#[derive(Default)]
struct Flow {
    pending: Option<Message>,
    unflushed: bool,
    /// Pings passed on to this flow's receiver, waiting for its pong.
    forwarded_pings: VecDeque<Bytes>,
}

struct Relay<'a, C, U> {
    client: &'a mut WebSocketStream<C>,
    upstream: &'a mut WebSocketStream<U>,
    to_upstream: Flow,
    to_client: Flow,
    metrics: &'a SessionMetrics,
    counts: [u64; 2],
    bytes: [u64; 2],
    /// What has been added to the shared counters so far: they are updated once per
    /// wake-up, not per message, so sessions on other cores do not contend per message.
    reported: ([u64; 2], [u64; 2]),
    activity: bool,
    // Keep-alive pings from the gateway to the client.
    ping_seq: u64,
    ping_payload: Option<Bytes>,
    ping_due: bool,
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
    client: &mut WebSocketStream<C>,
    upstream: &mut WebSocketStream<U>,
    settings: &Settings,
    metrics: &SessionMetrics,
    control: Control<'_>,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut relay = Relay {
        client,
        upstream,
        to_upstream: Flow::default(),
        to_client: Flow::default(),
        metrics,
        counts: [0; 2],
        bytes: [0; 2],
        reported: ([0; 2], [0; 2]),
        activity: false,
        ping_seq: 0,
        ping_payload: None,
        ping_due: false,
        rate: MessageRate::new(settings.message_rate, settings.message_burst),
        throttle: None,
        throttled_since: None,
        rate_abuse_timeout: settings.rate_abuse_timeout,
        now: None,
    };
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
        relay.now = None;
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
                    bytes_in = relay.bytes[0],
                    bytes_out = relay.bytes[1],
                    messages_in = relay.counts[0],
                    messages_out = relay.counts[1],
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
        if let Some(ev) = relay.poll_pings(cx, &mut ping, settings.ping_interval) {
            return Poll::Ready(ev);
        }
        if let Some(ev) = relay.poll_flow(cx, Side::Client) {
            return Poll::Ready(ev);
        }
        if let Some(ev) = relay.poll_flow(cx, Side::Upstream) {
            return Poll::Ready(ev);
        }
        if std::mem::take(&mut relay.activity) {
            last_activity = Instant::now();
            relay.report();
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

    relay.report();
    let (counts, bytes) = (relay.counts, relay.bytes);
    let (code, initiator, reason) = finish(relay.client, relay.upstream, event, settings.close_timeout).await;
    Outcome {
        code,
        initiator,
        reason,
        messages: counts,
        bytes,
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

impl<C, U> Relay<'_, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// Send the gateway's keep-alive ping when due; end the session when the previous
    /// one went unanswered for a whole interval.
    fn poll_pings(&mut self, cx: &mut Context<'_>, timer: &mut Pin<Box<Sleep>>, interval: Duration) -> Option<Event> {
        if poll_sleep(timer, cx) {
            if self.ping_payload.is_some() {
                return Some(Event::End(CloseReason::PingTimeout));
            }
            self.ping_seq += 1;
            let mut payload = b"wsgate:".to_vec();
            payload.extend_from_slice(&self.ping_seq.to_be_bytes());
            self.ping_payload = Some(Bytes::from(payload));
            self.ping_due = true;
            timer.as_mut().reset(Instant::now() + interval);
            let _ = timer.as_mut().poll(cx);
        }
        if self.ping_due {
            if let Some(payload) = self.ping_payload.clone() {
                match Pin::new(&mut *self.client).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        self.ping_due = false;
                        if Pin::new(&mut *self.client).start_send(Message::Ping(payload)).is_err() {
                            return Some(Event::End(CloseReason::ClientIo));
                        }
                        self.to_client.unflushed = true;
                    }
                    Poll::Ready(Err(_)) => return Some(Event::End(CloseReason::ClientIo)),
                    Poll::Pending => {}
                }
            }
        }
        None
    }

    /// Move messages read from `from` to the other side until `from` has nothing
    /// ready, the receiver pushes back, or the batch is used up.
    fn poll_flow(&mut self, cx: &mut Context<'_>, from: Side) -> Option<Event> {
        for _ in 0..BATCH {
            let flow = match from {
                Side::Client => &mut self.to_upstream,
                Side::Upstream => &mut self.to_client,
            };
            if let Some(msg) = flow.pending.take() {
                match poll_send(self.receiver(from), cx, msg) {
                    Ok(None) => self.flow(from).unflushed = true,
                    Ok(Some(msg)) => {
                        self.flow(from).pending = Some(msg);
                        return self.poll_flush(cx, from);
                    }
                    Err(_) => return Some(Event::End(write_error(from))),
                }
            }
            if from == Side::Client && self.throttled(cx) {
                return self.poll_flush(cx, from);
            }
            let next = match from {
                Side::Client => Pin::new(&mut *self.client).poll_next(cx),
                Side::Upstream => Pin::new(&mut *self.upstream).poll_next(cx),
            };
            match next {
                Poll::Pending => {
                    if from == Side::Client {
                        self.throttled_since = None; // the client paused: it is within the rate
                    }
                    return self.poll_flush(cx, from);
                }
                Poll::Ready(None) => return Some(Event::End(lost(from))),
                Poll::Ready(Some(Err(e))) => return Some(Event::End(read_error(from, &e))),
                Poll::Ready(Some(Ok(msg))) => {
                    let rated = from == Side::Client && matches!(msg, Message::Text(_) | Message::Binary(_) | Message::Ping(_));
                    if let Some(ev) = self.accept(from, msg) {
                        return Some(ev);
                    }
                    if rated {
                        if let Some(ev) = self.charge() {
                            return Some(ev);
                        }
                    }
                }
            }
        }
        // Batch used up: flush, and come back after other tasks had their turn.
        cx.waker().wake_by_ref();
        self.poll_flush(cx, from)
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

    /// Charge one client message to the rate; start holding the client back when it is ahead.
    fn charge(&mut self) -> Option<Event> {
        let now = *self.now.get_or_insert_with(Instant::now);
        let until = self.rate.take(now)?;
        let since = *self.throttled_since.get_or_insert(now);
        if now.duration_since(since) >= self.rate_abuse_timeout {
            return Some(Event::End(CloseReason::RateAbuse));
        }
        self.throttle = Some(Box::pin(sleep_until(until)));
        None
    }

    /// Classify one message read from `from`; data and pings become the flow's pending message.
    fn accept(&mut self, from: Side, msg: Message) -> Option<Event> {
        let dir = match from {
            Side::Client => Direction::ClientToUpstream,
            Side::Upstream => Direction::UpstreamToClient,
        };
        match msg {
            Message::Text(ref t) => self.count(dir, t.len()),
            Message::Binary(ref b) => self.count(dir, b.len()),
            Message::Ping(ref p) => {
                self.activity = true;
                let flow = self.flow(from);
                if flow.forwarded_pings.len() >= MAX_FORWARDED_PINGS {
                    return None; // answered by this hop only
                }
                flow.forwarded_pings.push_back(p.clone());
            }
            Message::Pong(p) => {
                if from == Side::Client && self.ping_payload.as_ref() == Some(&p) {
                    self.ping_payload = None;
                    return None;
                }
                // A pong from `from` may answer a ping we passed on to it.
                let sent_to_from = match from {
                    Side::Client => &mut self.to_client.forwarded_pings,
                    Side::Upstream => &mut self.to_upstream.forwarded_pings,
                };
                if let Some(i) = sent_to_from.iter().position(|q| *q == p) {
                    sent_to_from.drain(..=i);
                    return None;
                }
                self.activity = true;
                self.flow(from).pending = Some(Message::Pong(p));
                return None;
            }
            Message::Close(frame) => return Some(Event::Closed(from, frame)),
            Message::Frame(_) => return None,
        }
        self.flow(from).pending = Some(msg);
        None
    }

    fn count(&mut self, dir: Direction, len: usize) {
        self.activity = true;
        self.counts[dir as usize] += 1;
        self.bytes[dir as usize] += len as u64;
    }

    /// Add what was relayed since the last report to the shared counters.
    fn report(&mut self) {
        for i in 0..2 {
            let (m, b) = (self.counts[i] - self.reported.0[i], self.bytes[i] - self.reported.1[i]);
            if m > 0 {
                self.metrics.messages[i].increment(m);
                self.metrics.bytes[i].increment(b);
            }
        }
        self.reported = (self.counts, self.bytes);
    }

    fn flow(&mut self, from: Side) -> &mut Flow {
        match from {
            Side::Client => &mut self.to_upstream,
            Side::Upstream => &mut self.to_client,
        }
    }

    fn receiver(&mut self, from: Side) -> Receiver<'_, C, U> {
        match from {
            Side::Client => Receiver::Upstream(self.upstream),
            Side::Upstream => Receiver::Client(self.client),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>, from: Side) -> Option<Event> {
        if !self.flow(from).unflushed {
            return None;
        }
        let r = match from {
            Side::Client => Pin::new(&mut *self.upstream).poll_flush(cx),
            Side::Upstream => Pin::new(&mut *self.client).poll_flush(cx),
        };
        match r {
            Poll::Ready(Ok(())) => {
                self.flow(from).unflushed = false;
                None
            }
            Poll::Ready(Err(_)) => Some(Event::End(write_error(from))),
            Poll::Pending => None,
        }
    }
}

enum Receiver<'a, C, U> {
    Client(&'a mut WebSocketStream<C>),
    Upstream(&'a mut WebSocketStream<U>),
}

/// Try to hand `msg` to the receiver: `Ok(None)` when queued, `Ok(Some(msg))` when it
/// must wait (backpressure).
fn poll_send<C, U>(rx: Receiver<'_, C, U>, cx: &mut Context<'_>, msg: Message) -> Result<Option<Message>, WsError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    fn send<S: Sink<Message, Error = WsError> + Unpin>(s: &mut S, cx: &mut Context<'_>, msg: Message) -> Result<Option<Message>, WsError> {
        match Pin::new(&mut *s).poll_ready(cx) {
            Poll::Pending => Ok(Some(msg)),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Ready(Ok(())) => Pin::new(s).start_send(msg).map(|()| None),
        }
    }
    match rx {
        Receiver::Client(s) => send(s, cx, msg),
        Receiver::Upstream(s) => send(s, cx, msg),
    }
}

/// Writing to the receiver of `from`'s messages failed.
fn write_error(from: Side) -> CloseReason {
    match from {
        Side::Client => CloseReason::UpstreamReset,
        Side::Upstream => CloseReason::ClientIo,
    }
}

fn lost(side: Side) -> CloseReason {
    match side {
        Side::Client => CloseReason::ClientIo,
        Side::Upstream => CloseReason::UpstreamReset,
    }
}

/// Map a read error from `side` to why the gateway ends the session.
fn read_error(side: Side, e: &WsError) -> CloseReason {
    let client = side == Side::Client;
    match e {
        WsError::Capacity(_) if client => CloseReason::ClientTooBig,
        WsError::Capacity(_) => CloseReason::UpstreamTooBig,
        WsError::Utf8(_) if client => CloseReason::ClientInvalidUtf8,
        WsError::Utf8(_) => CloseReason::UpstreamInvalidUtf8,
        WsError::Protocol(p)
            if !matches!(
                p,
                tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake
            ) =>
        {
            if client {
                CloseReason::ClientProtocol
            } else {
                CloseReason::UpstreamProtocol
            }
        }
        _ => lost(side),
    }
}

/// Complete the close handshakes after `event`; returns (code, initiator, gateway reason).
async fn finish<C, U>(
    client: &mut WebSocketStream<C>,
    upstream: &mut WebSocketStream<U>,
    event: Event,
    timeout: Duration,
) -> (u16, Initiator, Option<CloseReason>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    match event {
        Event::Closed(side, frame) => {
            let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
            let initiator = if side == Side::Client {
                Initiator::Client
            } else {
                Initiator::Upstream
            };
            let _ = tokio::time::timeout(timeout, async {
                match side {
                    Side::Client => tokio::join!(drain(client), close_and_drain(upstream, frame)),
                    Side::Upstream => tokio::join!(close_and_drain(client, frame), drain(upstream)),
                }
            })
            .await;
            (code, initiator, None)
        }
        Event::End(reason) => {
            let (cc, uc) = reason.codes();
            let frame = |code: CloseCode| {
                Some(CloseFrame {
                    code,
                    reason: reason.text().into(),
                })
            };
            let client_ok = !matches!(reason, CloseReason::ClientIo);
            let upstream_ok = !matches!(reason, CloseReason::UpstreamReset);
            let _ = tokio::time::timeout(timeout, async {
                tokio::join!(
                    async {
                        if client_ok {
                            close_and_drain(client, frame(cc)).await
                        }
                    },
                    async {
                        if upstream_ok {
                            close_and_drain(upstream, frame(uc)).await
                        }
                    }
                )
            })
            .await;
            let code = if client_ok { u16::from(cc) } else { 1006 };
            (code, Initiator::Gateway, Some(reason))
        }
    }
}

/// Send a close frame and read until the peer's reply (or the end of the stream).
async fn close_and_drain<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, frame: Option<CloseFrame>) {
    if ws.send(Message::Close(frame)).await.is_ok() {
        drain(ws).await;
    }
}

/// Read until the stream ends, which also flushes any queued close reply. Messages
/// that arrive after a close was sent cannot be delivered (RFC 6455 5.5.1).
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) {
    let _ = ws.flush().await;
    while let Some(Ok(_)) = ws.next().await {}
}
