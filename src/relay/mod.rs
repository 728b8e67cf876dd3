//! Stage 9: relay frames between client and upstream until one side closes, a limit
//! trips, or the gateway shuts down.
//!
//! The relay works on frames, not messages ([`crate::wire`]), and streams them: a data
//! frame's header is checked (protocol, masking, fragmentation order, frame and message
//! size) and goes on at once, and its payload follows in pieces as they are read,
//! unmasked and re-masked in place at the running offset, text checked as UTF-8 across
//! pieces and fragments. A session holds at most one read (16 KiB) per direction, however
//! large its frames; nothing is allocated per message and no message is reassembled.
//! Control frames (at most 125 bytes) go on whole.
//!
//! One task drives both sides through a single `poll_fn` state machine, so:
//! - both directions flow at once (no deadlock when both peers write), while a
//!   direction whose receiver is slow stops reading from its sender (backpressure:
//!   at most one read's worth of frames waits per direction);
//! - the gateway's own frames for a side (pongs, keep-alive pings, a close) wait until
//!   the data frame being relayed to that side is complete, so none lands inside it.
//!   When that frame can never be completed (its sender broke the protocol inside it,
//!   or went away), the receiver's connection is ended without a close frame: it sees
//!   the frame cut short and never takes it as a message.
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
//!
//! # Layout
//!
//! - `mod.rs` (this file): the public surface, [`Settings`], [`Control`], [`Policy`],
//!   [`Outcome`], and [`run`], the session's state machine at the top level.
//! - `endpoint.rs`: [`Endpoint`], one buffered side: queued output, gateway frames,
//!   flushing, the close handshake, and [`Endpoint::first_text`] for `first_message` auth.
//! - `timers.rs`: what ends a session besides the peers: drain, reloads, token expiry,
//!   keep-alive pings, idle timeout, progress events.
//! - `pump.rs`: moving bytes from one side's socket through the frame checks to the
//!   other side, with backpressure and the message rate.
//! - `frames.rs`: the per-frame state machine (`Core`): header checks, fragmentation,
//!   size limits, UTF-8, masking, ping/pong bookkeeping, counting and rate charging.
//! - `closing.rs`: the close handshakes once the session ends.
//! - `deflate.rs`: permessage-deflate's inflater and deflater (flate2 on zlib-rs) and
//!   the memory budget of their state; `frames/compressed.rs`: directions where either
//!   hop agreed to it, whose frames are taken apart, inflated a bounded buffer at a
//!   time, checked, and put together again for the receiver.
//! - `frames/refresh.rs`: routes with `refresh = true`, whose small client text messages
//!   are held whole; one that is `{"token": "..."}` stops the pump with its token, which
//!   `run` hands to [`Policy::refresh`] (the expiry timer follows the verdict).

mod closing;
pub mod deflate;
mod endpoint;
mod frames;
mod pump;
mod timers;

pub use endpoint::Endpoint;
pub use frames::{AssemblyBudget, AssemblyShare, Compression, refresh_token};

use crate::error::{CloseReason, Initiator};
use crate::metrics::SessionMetrics;
use frames::{Core, Event, Side};
use std::{future::poll_fn, task::Poll, time::Duration};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// Largest frame a client may send (1009 beyond). Upstream frames are bounded by
    /// the message limit only.
    pub max_frame_size: usize,
    /// Largest message either side may send, however it is fragmented (1009 beyond).
    pub max_message_size: usize,
    /// Frames per client message; more → close 1009.
    pub max_fragments: u32,
    /// Checks on client messages (a route with `[routes.validate]`): its text messages
    /// are assembled and checked before they go on instead of streaming.
    pub validator: Option<std::sync::Arc<crate::validation::Validator>>,
    /// The gateway-wide budget for validated messages being assembled, this client's
    /// share of it, and how long a message may take (`None`: unbounded, for benches).
    pub assembly: Option<std::sync::Arc<AssemblyShare>>,
    /// permessage-deflate as agreed with each hop (`None`: with neither; frames stream
    /// as they came and RSV1 is a violation).
    /// Boxed: most sessions have none, and the session future stays small.
    pub compression: Option<Box<Compression>>,
}

impl Settings {
    /// The limits and timers `config` sets for `route`'s sessions (its
    /// `[routes.limits]`, else the global ones), with the route's message checks
    /// (`validator`) and the client's share of the assembly budget (`assembly`, for a
    /// validated route).
    pub fn from_config(
        config: &crate::config::Config,
        route: &crate::config::Route,
        validator: Option<std::sync::Arc<crate::validation::Validator>>,
        assembly: Option<std::sync::Arc<AssemblyShare>>,
    ) -> Settings {
        let r = config.limits_of(route);
        Settings {
            message_rate: r.message_rate,
            message_burst: r.message_burst,
            rate_abuse_timeout: config.limits.rate_abuse_timeout,
            idle_timeout: r.idle_timeout,
            ping_interval: r.ping_interval,
            close_timeout: config.server.close_timeout,
            max_frame_size: r.max_frame_size,
            max_message_size: r.max_message_size,
            max_fragments: r.max_fragments,
            validator,
            assembly,
            compression: None,
        }
    }

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
            validator: None,
            assembly: None,
            compression: None,
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
    /// After a passing check: the rates and timers the session goes on with (its
    /// route's, as reloaded); `None` keeps them.
    fn live_limits(&self) -> Option<LiveLimits> {
        None
    }
    /// Whether the session's route has `refresh = true` (DESIGN.md section 15): client
    /// text messages of at most 16 KiB are then held whole, and one that is exactly
    /// `{"token": "..."}` goes to [`Policy::refresh`] instead of the upstream.
    fn refreshes(&self) -> bool {
        false
    }
    /// A refresh message's token (`refresh = true`): on success the session goes on
    /// with it, until the returned instant (`None`: no expiry); on failure the session
    /// ends with the reason. Called inside the relay's poll: it must not block.
    fn refresh(&self, _token: &str) -> Result<Option<Instant>, CloseReason> {
        Err(CloseReason::RefreshRefused)
    }
}

/// Ready when the session must end because its upstream is drained (admin API): the
/// session then closes with 1012 to both peers.
pub trait Due: Send + Sync {
    fn poll_due(&mut self, cx: &mut std::task::Context<'_>) -> bool;
}

/// What a reload changes in a live session: the message rate and the timers. Sizes
/// stay as the session started (a frame may be half read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveLimits {
    pub message_rate: crate::config::Rate,
    pub message_burst: u32,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
}

/// What, besides the peers, can end a session.
pub struct Control<'a> {
    /// Cancelled on drain: the session closes with 1001 after a random part of `drain_spread`,
    /// so clients do not all reconnect at the same instant.
    pub shutdown: &'a CancellationToken,
    pub drain_spread: Duration,
    /// The upstream's drain (admin API): its point closes the session with 1012.
    pub upstream_drain: Option<Box<dyn Due>>,
    /// Token expiry.
    pub deadline: Option<(Instant, CloseReason)>,
    pub policy: Option<&'a dyn Policy>,
    /// Log a progress event this often (bytes and messages so far).
    pub progress: Option<Duration>,
    /// What a progress event is logged with: the session's `request_id` and `route`
    /// (flat JSON lines carry no span, so these join it to the session's other lines).
    pub log_as: (&'a str, &'a str),
}

impl<'a> Control<'a> {
    /// Only a shutdown token: no expiry, no policy, no progress events.
    pub fn new(shutdown: &'a CancellationToken) -> Control<'a> {
        Control {
            shutdown,
            drain_spread: Duration::ZERO,
            upstream_drain: None,
            deadline: None,
            policy: None,
            progress: None,
            log_as: ("-", "-"),
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
/// Relay until the session ends; sends close frames as needed and returns how it ended.
pub async fn run<C, U>(
    client: &mut Endpoint<C>,
    upstream: &mut Endpoint<U>,
    settings: &mut Settings,
    metrics: &SessionMetrics,
    control: &mut Control<'_>,
) -> Outcome
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut core = Core::new(settings);
    if control.policy.is_some_and(|p| p.refreshes()) {
        core.look_for_refreshes();
    }
    if let Some(paid) = client.paid.take() {
        let (rate, wait) = *paid;
        core.continue_rate(rate, wait); // what the frames before a `first_message` token paid
    }
    let mut timers = timers::Timers::new(settings, control);
    timers.upstream_drain = control.upstream_drain.take();
    let cancelled = control.shutdown.cancelled();
    tokio::pin!(cancelled);

    let event = poll_fn(|cx| {
        core.now = None;
        if let Some(ev) = timers.poll_control(cx, control, cancelled.as_mut(), &core) {
            return Poll::Ready(ev);
        }
        if std::mem::take(&mut timers.reloaded)
            && let Some(limits) = control.policy.and_then(|p| p.live_limits())
        {
            timers.apply(limits, settings, &mut core);
        }
        if let Some(ev) = timers.poll_keepalive(settings, &mut core, client) {
            return Poll::Ready(ev);
        }
        match pump::pump(&mut core, Side::Client, client, upstream, cx) {
            Some(Event::Refresh(token)) => {
                if let Some(ev) = timers.refresh(control, &token) {
                    return Poll::Ready(ev);
                }
                // What the client sent behind the refresh waits in its buffer: come back for it.
                cx.waker().wake_by_ref();
            }
            Some(ev) => return Poll::Ready(ev),
            None => {}
        }
        if let Some(ev) = pump::pump(&mut core, Side::Upstream, upstream, client, cx) {
            return Poll::Ready(ev);
        }
        if let Poll::Ready(Err(_)) = client.poll_flush(cx) {
            return Poll::Ready(Event::End(CloseReason::ClientIo));
        }
        if let Poll::Ready(Err(_)) = upstream.poll_flush(cx) {
            return Poll::Ready(Event::End(CloseReason::UpstreamReset));
        }
        if std::mem::take(&mut core.activity) {
            timers.active();
            core.report(metrics);
        }
        if let Some(ev) = timers.poll_assembly(settings, &core) {
            return Poll::Ready(ev);
        }
        if let Some(ev) = timers.poll_idle(settings) {
            return Poll::Ready(ev);
        }
        timers.arm(cx, settings);
        Poll::Pending
    })
    .await;

    core.report(metrics);
    // Boxed: the closing handshakes need their state only at the end, not for the whole session.
    let (code, initiator, reason) = Box::pin(closing::finish(&mut core, client, upstream, event, settings.close_timeout)).await;
    core.report(metrics); // what was relayed while closing
    Outcome {
        code,
        initiator,
        reason,
        messages: core.counts,
        bytes: core.bytes,
    }
}

#[cfg(test)]
mod pipe_tests {
    use super::*;
    use crate::relay::frames::tests::{frame, frames};
    use crate::wire;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
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
            let mut settings = Settings::unthrottled(1 << 20);
            let metrics = crate::metrics::Metrics::new().session("t");
            let shutdown = CancellationToken::new();
            let (mut c, mut u) = (Endpoint::client(gw_client_io, &[]), Endpoint::upstream(gw_up_io, &[]));
            run(&mut c, &mut u, &mut settings, &metrics, &mut Control::new(&shutdown)).await
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

    /// Poll `f`, letting every other task run between polls (the test runtime has one
    /// thread); false when it still cannot complete: everything else waits on it.
    async fn completes_when_others_run<F: std::future::Future>(f: F) -> bool {
        const TURNS: usize = 64;
        let mut f = std::pin::pin!(f);
        for _ in 0..TURNS {
            if futures_util::FutureExt::now_or_never(f.as_mut()).is_some() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        false
    }

    /// A client that floods pings and never reads is held back once its pongs fill a
    /// small queue: the gateway stops reading from it instead of buffering answers.
    /// The flood ends when a ping cannot be written even after the relay and the echo
    /// had every chance to run, that is when the relay no longer reads from the client.
    #[tokio::test]
    async fn ping_flood_from_a_client_that_does_not_read_is_held_back() {
        let (client, relay) = session().await;
        let (mut tx, mut rx) = client.split();
        let mut sent = 0u32;
        while sent < 100_000 && completes_when_others_run(tx.send(Message::Ping(sent.to_be_bytes().to_vec().into()))).await {
            sent += 1;
        }
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

    /// Client ⇄ relay ⇄ upstream over roomy in-memory pipes, both peers speaking raw
    /// frames: returns the client's end, the upstream's end and the relay task.
    fn raw_session(max_size: usize) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<Outcome>) {
        const PIPE: usize = 2 << 20;
        let (client_io, gw_client_io) = tokio::io::duplex(PIPE);
        let (gw_up_io, up_io) = tokio::io::duplex(PIPE);
        let relay = tokio::spawn(async move {
            let mut settings = Settings::unthrottled(max_size);
            let metrics = crate::metrics::Metrics::new().session("t");
            let shutdown = CancellationToken::new();
            let (mut c, mut u) = (Endpoint::client(gw_client_io, &[]), Endpoint::upstream(gw_up_io, &[]));
            run(&mut c, &mut u, &mut settings, &metrics, &mut Control::new(&shutdown)).await
        });
        (client_io, up_io, relay)
    }

    /// A frame streams to the client in pieces; the pong to a ping the client sends
    /// meanwhile waits until the frame is complete, never lands inside it.
    #[tokio::test]
    async fn a_pong_waits_for_the_frame_in_progress_to_end() {
        let (mut client, mut up, relay) = raw_session(1 << 20);
        let big = 200 * 1024;
        let (h, n) = wire::header(wire::OP_BINARY, true, big, None);
        up.write_all(&h[..n]).await.unwrap();
        up.write_all(&vec![1u8; big / 2]).await.unwrap();
        let mut first = vec![0u8; n + big / 2];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(first[..n], h[..n], "the header went on before the frame was complete");
        client
            .write_all(&frame(wire::OP_PING, true, b"p", Some([1, 2, 3, 4])))
            .await
            .unwrap();
        // The ping is passed on to the upstream (2 header bytes, a key, 1 byte): the gateway has read it.
        let mut ping = [0u8; 7];
        up.read_exact(&mut ping).await.unwrap();
        assert_eq!(frames(&ping), vec![(wire::OP_PING, true, b"p".to_vec())]);
        assert!(
            !completes_when_others_run(client.read_u8()).await,
            "nothing may reach the client inside the frame"
        );
        up.write_all(&vec![2u8; big - big / 2]).await.unwrap();
        let mut rest = vec![0u8; big - big / 2 + 3];
        client.read_exact(&mut rest).await.unwrap();
        assert!(rest[..big - big / 2].iter().all(|b| *b == 2));
        assert_eq!(frames(&rest[big - big / 2..]), vec![(wire::OP_PONG, true, b"p".to_vec())]);
        drop((client, up));
        let outcome = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
        assert_eq!(outcome.messages, [0, 1]);
        assert_eq!(outcome.bytes, [0, big as u64]);
    }

    /// Invalid UTF-8 deep inside a large text frame: the part before it has gone on to
    /// the upstream already; the client gets 1007, and the upstream's connection ends
    /// inside the frame (no close frame can follow a cut frame), so it never takes the
    /// frame as a message.
    #[tokio::test]
    async fn invalid_utf8_mid_stream_closes_1007_and_cuts_the_frame() {
        let (mut client, mut up, relay) = raw_session(1 << 20);
        let mut text = "é".repeat(300 * 1024).into_bytes();
        text[300 * 1024 + 1] = 0xFF;
        let f = frame(wire::OP_TEXT, true, &text, Some([9, 8, 7, 6]));
        client.write_all(&f).await.unwrap();
        let mut at_upstream = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), up.read_to_end(&mut at_upstream))
            .await
            .unwrap()
            .unwrap();
        let h = wire::parse(&at_upstream).unwrap().unwrap();
        let payload = at_upstream.len() - h.header_len;
        assert!(
            h.len == text.len() as u64 && payload > 64 * 1024,
            "{payload} bytes streamed before the cut"
        );
        assert!(payload <= 300 * 1024, "nothing from the bad byte on");
        let mut got = at_upstream[h.header_len..].to_vec();
        wire::apply_mask(&mut got, h.mask.unwrap());
        assert_eq!(got, text[..payload], "the part before the bad byte, re-masked");
        drop(up); // the upstream goes away as it would after a broken frame
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        let closes = frames(&back);
        assert_eq!(closes.len(), 1);
        assert_eq!(
            (closes[0].0, u16::from_be_bytes([closes[0].2[0], closes[0].2[1]])),
            (wire::OP_CLOSE, 1007)
        );
        let outcome = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
        assert_eq!((outcome.code, outcome.messages), (1007, [0, 0]));
    }

    /// A frame refused inside its payload (autobahn 6.12.1: one byte, 0x80): the rest of
    /// that payload is skipped, not read as a header, so the client's close reply right
    /// behind it is found and the connection ends at once, not after `close_timeout`.
    #[tokio::test]
    async fn the_close_behind_a_refused_frame_is_found() {
        let (mut client, mut up, relay) = raw_session(1 << 20);
        let key = Some([1, 2, 3, 4]);
        // 0x80 masked with 0x01 is 0x81: read as a header, it would swallow the close.
        client.write_all(&frame(wire::OP_TEXT, true, &[0x80], key)).await.unwrap();
        let mut close = [0u8; 4];
        client.read_exact(&mut close).await.unwrap();
        assert_eq!((close[0] & 0x0f, u16::from_be_bytes([close[2], close[3]])), (wire::OP_CLOSE, 1007));
        let mut rest = vec![0u8; usize::from(close[1])];
        client.read_exact(&mut rest[..usize::from(close[1]) - 2]).await.unwrap();
        client
            .write_all(&frame(wire::OP_CLOSE, true, &1000u16.to_be_bytes(), key))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(back.is_empty(), "{back:?}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "ended after {:?}",
            started.elapsed()
        );
        drop(up.read_to_end(&mut Vec::new()).await);
        let outcome = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
        assert_eq!(outcome.code, 1007);
    }

    /// The same from the upstream: the client has part of the frame, so it gets no close
    /// frame (it would be read as payload) but the end of its connection, and the
    /// session is recorded as 1006 with the upstream's fault as the reason.
    #[tokio::test]
    async fn invalid_utf8_mid_stream_from_the_upstream_cuts_the_client() {
        let (mut client, mut up, relay) = raw_session(1 << 20);
        let mut text = "é".repeat(100 * 1024).into_bytes();
        text[100 * 1024 + 1] = 0xFF;
        up.write_all(&frame(wire::OP_TEXT, true, &text, None)).await.unwrap();
        let mut at_client = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut at_client))
            .await
            .unwrap()
            .unwrap();
        let h = wire::parse(&at_client).unwrap().unwrap();
        let payload = &at_client[h.header_len..];
        assert!(h.len == text.len() as u64 && payload.len() <= 100 * 1024);
        assert_eq!(payload, &text[..payload.len()], "a prefix of the frame, and nothing behind it");
        let outcome = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
        assert_eq!((outcome.code, outcome.reason), (1006, Some(CloseReason::UpstreamInvalidUtf8)));
    }
}
