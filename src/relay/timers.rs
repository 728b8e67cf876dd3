//! What ends a session besides its peers: drain on shutdown, a reload that revokes it,
//! token expiry, a client that stops answering keep-alive pings, idleness. Also the
//! periodic progress event.

use super::{
    Control, Endpoint, Settings,
    frames::{Core, Event, PING_LEN, PING_PREFIX},
};
use crate::error::CloseReason;
use crate::wire::OP_PING;
use std::{future::Future, pin::Pin, task::Context};
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::{WaitForCancellationFuture, WaitForCancellationFutureOwned};

/// The deadlines of one session behind ONE timer, the `alarm`, set to the earliest of
/// them at the end of every round of the relay that goes on ([`Timers::arm`]). An
/// idle session holds one timer entry instead of six (memory per idle socket), and a
/// round reads the clock only when the alarm has rung or a deadline was just set.
pub(super) struct Timers {
    alarm: Pin<Box<Sleep>>,
    /// The alarm rang at the start of this round: the deadlines are compared with the time.
    rang: bool,
    /// The time, read at most once per round (when a deadline is compared).
    now: Option<Instant>,
    ping_at: Instant,
    expiry: Option<(Instant, CloseReason)>,
    /// Set once shutdown is signalled: the 1001 goes out at this point.
    drain_at: Option<Instant>,
    /// The upstream's drain: its point ends the session with 1012.
    pub(super) upstream_drain: Option<Box<dyn super::Due>>,
    generation: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    progress_at: Option<Instant>,
    started: Instant,
    last_activity: Instant,
    /// The deadline of the message being assembled, if any.
    assembly_at: Option<Instant>,
    /// A reload's re-check passed: the session goes on with its route's new rate and timers.
    pub(super) reloaded: bool,
}

impl Timers {
    pub(super) fn new(settings: &Settings, control: &Control<'_>) -> Timers {
        let now = Instant::now();
        let ping_at = now + settings.ping_interval;
        Timers {
            alarm: Box::pin(sleep_until(ping_at.min(now + settings.idle_timeout))),
            rang: false,
            now: None,
            ping_at,
            expiry: control.deadline,
            drain_at: None,
            upstream_drain: None,
            generation: control.policy.map(|p| Box::pin(p.generation().cancelled_owned())),
            progress_at: control.progress.map(|every| now + every),
            started: now,
            last_activity: now,
            assembly_at: None,
            reloaded: false,
        }
    }

    /// The time of this round (read once).
    fn now(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }

    /// `at` has come: checked only when the alarm rang (the alarm is never later than
    /// any deadline, so otherwise none has come), or when `fresh` (just set this round).
    fn passed(&mut self, at: Instant, fresh: bool) -> bool {
        (self.rang || fresh) && at <= self.now()
    }

    /// Go on with a reload's rate and timers: the idle timer counts from the last
    /// activity, the next ping comes one new interval from now.
    pub(super) fn apply(&mut self, limits: super::LiveLimits, settings: &mut Settings, core: &mut Core) {
        if (limits.message_rate, limits.message_burst) != (settings.message_rate, settings.message_burst) {
            settings.message_rate = limits.message_rate;
            settings.message_burst = limits.message_burst;
            core.reconfigure_rate(limits.message_rate, limits.message_burst);
        }
        // The idle deadline is read from `settings` when the alarm is set.
        settings.idle_timeout = limits.idle_timeout;
        if limits.ping_interval != settings.ping_interval {
            settings.ping_interval = limits.ping_interval;
            self.ping_at = self.now() + limits.ping_interval;
        }
    }

    /// A refresh message's token: the policy judges it; on success the expiry moves to
    /// the new token's (or goes, for a token without one).
    pub(super) fn refresh(&mut self, control: &Control<'_>, token: &str) -> Option<Event> {
        let judged = control.policy.map_or(Err(CloseReason::RefreshRefused), |p| p.refresh(token));
        match judged {
            Err(reason) => Some(Event::End(reason)),
            Ok(None) => {
                self.expiry = None;
                None
            }
            Ok(Some(at)) => {
                let reason = self.expiry.map_or(CloseReason::TokenExpired, |(_, r)| r);
                self.expiry = Some((at, reason));
                None
            }
        }
    }

    /// Frames went through: the idle timer starts again.
    pub(super) fn active(&mut self) {
        self.last_activity = Instant::now();
    }

    /// Drain, reloads, expiry and progress events. The first call of a round: it
    /// notes whether the alarm rang.
    pub(super) fn poll_control(
        &mut self,
        cx: &mut Context<'_>,
        control: &Control<'_>,
        cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
        core: &Core,
    ) -> Option<Event> {
        self.now = None;
        self.rang = self.alarm.as_mut().poll(cx).is_ready();
        let fresh_drain = self.drain_at.is_none() && cancelled.poll(cx).is_ready();
        if fresh_drain {
            self.drain_at = Some(self.now() + crate::util::jitter(control.drain_spread));
        }
        if let Some(at) = self.drain_at
            && self.passed(at, fresh_drain)
        {
            return Some(Event::End(CloseReason::Shutdown));
        }
        if self.upstream_drain.as_mut().is_some_and(|d| d.poll_due(cx)) {
            return Some(Event::End(CloseReason::UpstreamDrained));
        }
        if let (Some(g), Some(policy)) = (self.generation.as_mut(), control.policy) {
            while g.as_mut().poll(cx).is_ready() {
                // The next generation is taken before the check: a reload that lands while
                // this check reads the config cancels it, and the session checks again.
                let next = Box::pin(policy.generation().cancelled_owned());
                if let Some(reason) = policy.check() {
                    return Some(Event::End(reason));
                }
                self.reloaded = true;
                *g = next;
            }
        }
        if let (Some(at), Some(every)) = (self.progress_at, control.progress)
            && self.passed(at, false)
        {
            tracing::info!(
                request_id = control.log_as.0,
                route = control.log_as.1,
                duration_ms = self.started.elapsed().as_millis() as u64,
                bytes_in = core.bytes[0],
                bytes_out = core.bytes[1],
                messages_in = core.counts[0],
                messages_out = core.counts[1],
                "session progress"
            );
            self.progress_at = Some(self.now() + every);
        }
        // An expiry a refresh set in the past makes the alarm due at once (`arm`).
        let (at, reason) = self.expiry?;
        self.passed(at, false).then_some(Event::End(reason))
    }

    /// Ping the client every `ping_interval`; a ping still unanswered at the next one ends the session.
    pub(super) fn poll_keepalive<C>(&mut self, settings: &Settings, core: &mut Core, client: &mut Endpoint<C>) -> Option<Event> {
        if !self.passed(self.ping_at, false) {
            return None;
        }
        self.ping_at = self.now() + settings.ping_interval;
        if client.open {
            // A frame to the client is in progress: a ping would have to wait behind it,
            // and the client could not answer in time through no fault of its own.
            return None;
        }
        if core.ping_payload.is_some() {
            return Some(Event::End(CloseReason::PingTimeout));
        }
        core.ping_seq += 1;
        let mut payload = [0u8; PING_LEN];
        payload[..PING_PREFIX.len()].copy_from_slice(PING_PREFIX);
        payload[PING_PREFIX.len()..].copy_from_slice(&core.ping_seq.to_be_bytes());
        core.ping_payload = Some(payload);
        client.put(OP_PING, &payload);
        None
    }

    /// A client message that holds shared memory (assembled for validation, or inflated
    /// with state taken from the compression budget) and is not complete by its
    /// deadline ends the session (1001): that memory is not held for a client that
    /// stalls or trickles.
    pub(super) fn poll_assembly(&mut self, settings: &Settings, core: &Core) -> Option<Event> {
        let timeout = (settings.assembly.as_ref().map(|share| share.timeout))
            .into_iter()
            .chain(settings.compression.as_ref().and_then(|c| c.message_timeout))
            .min();
        let deadline = core.assembly_started.zip(timeout).map(|(at, timeout)| at + timeout);
        let fresh = deadline != self.assembly_at;
        self.assembly_at = deadline;
        let at = deadline?;
        self.passed(at, fresh).then_some(Event::End(CloseReason::MessageStalled))
    }

    /// No frame either way for `idle_timeout` ends the session.
    pub(super) fn poll_idle(&mut self, settings: &Settings) -> Option<Event> {
        let idle_at = self.last_activity + settings.idle_timeout;
        self.passed(idle_at, false).then_some(Event::End(CloseReason::IdleTimeout))
    }

    /// The end of a round that goes on: the alarm is set to the earliest deadline, and
    /// moved only when it rang or must ring sooner (activity moves the idle deadline later
    /// on every frame; an alarm that rings early is simply set again). Otherwise the poll
    /// at the round's start registered the waker: one poll a round.
    pub(super) fn arm(&mut self, cx: &mut Context<'_>, settings: &Settings) {
        let next = [self.expiry.map(|(at, _)| at), self.drain_at, self.progress_at, self.assembly_at]
            .into_iter()
            .flatten()
            .fold((self.last_activity + settings.idle_timeout).min(self.ping_at), Instant::min);
        if self.rang || next < self.alarm.deadline() {
            self.alarm.as_mut().reset(next);
            if self.alarm.as_mut().poll(cx).is_ready() {
                // Already due (a deadline set in the past): another round handles it.
                cx.waker().wake_by_ref();
            }
        }
    }
}
