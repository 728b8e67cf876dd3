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

/// The timers of one session, all registered with the waker of the relay's `poll_fn`.
pub(super) struct Timers {
    idle: Pin<Box<Sleep>>,
    ping: Pin<Box<Sleep>>,
    expiry: Option<(Pin<Box<Sleep>>, CloseReason)>,
    /// Set once shutdown is signalled: the 1001 goes out when it fires.
    drain: Option<Pin<Box<Sleep>>>,
    /// The upstream's drain: its point ends the session with 1012.
    pub(super) upstream_drain: Option<Box<dyn super::Due>>,
    generation: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    progress: Option<Pin<Box<Sleep>>>,
    started: Instant,
    last_activity: Instant,
    /// Armed for the deadline of the message being assembled, if any.
    assembly: Option<Pin<Box<Sleep>>>,
    /// A reload's re-check passed: the session goes on with its route's new rate and timers.
    pub(super) reloaded: bool,
}

impl Timers {
    pub(super) fn new(settings: &Settings, control: &Control<'_>) -> Timers {
        let now = Instant::now();
        Timers {
            idle: Box::pin(sleep_until(now + settings.idle_timeout)),
            ping: Box::pin(sleep_until(now + settings.ping_interval)),
            expiry: control.deadline.map(|(at, reason)| (Box::pin(sleep_until(at)), reason)),
            drain: None,
            upstream_drain: None,
            generation: control.policy.map(|p| Box::pin(p.generation().cancelled_owned())),
            progress: control.progress.map(|every| Box::pin(sleep_until(now + every))),
            started: now,
            last_activity: now,
            assembly: None,
            reloaded: false,
        }
    }

    /// Go on with a reload's rate and timers: the idle timer counts from the last
    /// activity, the next ping comes one new interval from now.
    pub(super) fn apply(&mut self, cx: &mut Context<'_>, limits: super::LiveLimits, settings: &mut Settings, core: &mut Core) {
        if (limits.message_rate, limits.message_burst) != (settings.message_rate, settings.message_burst) {
            settings.message_rate = limits.message_rate;
            settings.message_burst = limits.message_burst;
            core.reconfigure_rate(limits.message_rate, limits.message_burst);
        }
        if limits.idle_timeout != settings.idle_timeout {
            settings.idle_timeout = limits.idle_timeout;
            rearm(&mut self.idle, self.last_activity + limits.idle_timeout, cx);
        }
        if limits.ping_interval != settings.ping_interval {
            settings.ping_interval = limits.ping_interval;
            rearm(&mut self.ping, Instant::now() + limits.ping_interval, cx);
        }
    }

    /// A refresh message's token: the policy judges it; on success the expiry moves to
    /// the new token's (or goes, for a token without one).
    pub(super) fn refresh(&mut self, cx: &mut Context<'_>, control: &Control<'_>, token: &str) -> Option<Event> {
        let judged = control.policy.map_or(Err(CloseReason::RefreshRefused), |p| p.refresh(token));
        match judged {
            Err(reason) => Some(Event::End(reason)),
            Ok(None) => {
                self.expiry = None;
                None
            }
            Ok(Some(at)) => {
                match &mut self.expiry {
                    Some((timer, _)) => rearm(timer, at, cx),
                    slot => {
                        let mut timer = Box::pin(sleep_until(at));
                        let _ = timer.as_mut().poll(cx);
                        *slot = Some((timer, CloseReason::TokenExpired));
                    }
                }
                None
            }
        }
    }

    /// Frames went through: the idle timer starts again.
    pub(super) fn active(&mut self) {
        self.last_activity = Instant::now();
    }

    /// Drain, reloads, expiry and progress events.
    pub(super) fn poll_control(
        &mut self,
        cx: &mut Context<'_>,
        control: &Control<'_>,
        cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
        core: &Core,
    ) -> Option<Event> {
        if self.drain.is_none() && cancelled.poll(cx).is_ready() {
            self.drain = Some(Box::pin(sleep_until(Instant::now() + crate::util::jitter(control.drain_spread))));
        }
        if self.drain.as_mut().is_some_and(|d| fired(d, cx)) {
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
        if let (Some(p), Some(every)) = (self.progress.as_mut(), control.progress)
            && fired(p, cx)
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
            rearm(p, Instant::now() + every, cx);
        }
        let (timer, reason) = self.expiry.as_mut()?;
        fired(timer, cx).then_some(Event::End(*reason))
    }

    /// Ping the client every `ping_interval`; a ping still unanswered at the next one ends the session.
    pub(super) fn poll_keepalive<C>(
        &mut self,
        cx: &mut Context<'_>,
        settings: &Settings,
        core: &mut Core,
        client: &mut Endpoint<C>,
    ) -> Option<Event> {
        if !fired(&mut self.ping, cx) {
            return None;
        }
        if client.open {
            // A frame to the client is in progress: a ping would have to wait behind it,
            // and the client could not answer in time through no fault of its own.
            rearm(&mut self.ping, Instant::now() + settings.ping_interval, cx);
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
        rearm(&mut self.ping, Instant::now() + settings.ping_interval, cx);
        None
    }

    /// A client message that holds shared memory (assembled for validation, or inflated
    /// with state taken from the compression budget) and is not complete by its
    /// deadline ends the session (1001): that memory is not held for a client that
    /// stalls or trickles.
    pub(super) fn poll_assembly(&mut self, cx: &mut Context<'_>, settings: &Settings, core: &Core) -> Option<Event> {
        let timeout = (settings.assembly.as_ref().map(|share| share.timeout))
            .into_iter()
            .chain(settings.compression.as_ref().and_then(|c| c.message_timeout))
            .min();
        let Some(deadline) = core.assembly_started.zip(timeout).map(|(at, timeout)| at + timeout) else {
            self.assembly = None;
            return None;
        };
        match &mut self.assembly {
            Some(sleep) if sleep.deadline() == deadline => {}
            Some(sleep) => sleep.as_mut().reset(deadline),
            slot => *slot = Some(Box::pin(sleep_until(deadline))),
        }
        let sleep = self.assembly.as_mut()?;
        fired(sleep, cx).then_some(Event::End(CloseReason::MessageStalled))
    }

    /// No frame either way for `idle_timeout` ends the session.
    pub(super) fn poll_idle(&mut self, cx: &mut Context<'_>, settings: &Settings) -> Option<Event> {
        if fired(&mut self.idle, cx) {
            if self.last_activity.elapsed() >= settings.idle_timeout {
                return Some(Event::End(CloseReason::IdleTimeout));
            }
            rearm(&mut self.idle, self.last_activity + settings.idle_timeout, cx);
        }
        None
    }
}

fn fired(s: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> bool {
    s.as_mut().poll(cx).is_ready()
}

/// Set the timer to `at` and register it with the waker again.
fn rearm(s: &mut Pin<Box<Sleep>>, at: Instant, cx: &mut Context<'_>) {
    s.as_mut().reset(at);
    let _ = s.as_mut().poll(cx);
}
