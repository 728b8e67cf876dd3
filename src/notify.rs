//! systemd notifications (DESIGN.md section 17) for `Type=notify` units: `READY=1` once
//! listening, `RELOADING=1` … `READY=1` around a reload, `STOPPING=1` on drain,
//! `WATCHDOG=1` while `WatchdogSec` is set, `MAINPID=` after a takeover.
//!
//! Each is one datagram to `$NOTIFY_SOCKET` (the `sd-notify` crate); without that
//! variable (not under systemd, tests) every call does nothing. A failed send is logged
//! at debug and never stops the gateway.

use sd_notify::NotifyState;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn send(what: &str, states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot send {what} to systemd");
    }
}

/// Listening: systemd considers the unit started.
pub fn ready() {
    send("READY=1", &[NotifyState::Ready]);
}

/// A reload begins; [`reloaded`] ends it. systemd wants the monotonic clock with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("RELOADING=1", &[NotifyState::Reloading, now]),
        Err(e) => tracing::debug!(error = %e, "cannot read the monotonic clock for RELOADING=1"),
    }
}

/// A reload ended (applied or refused: the gateway serves either way).
pub fn reloaded(applied: bool) {
    let status = if applied {
        "config reloaded"
    } else {
        "reload failed, running the previous config"
    };
    send("READY=1", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The drain begins.
pub fn stopping() {
    send("STOPPING=1", &[NotifyState::Stopping]);
}

/// After a takeover: this process is the service's main process now.
pub fn main_pid(pid: u32) {
    send("MAINPID", &[NotifyState::MainPid(pid)]);
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec` (systemd's advice), when it is
/// set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| (d / 2).max(Duration::from_millis(100)))
}

/// Send `WATCHDOG=1` every `interval` until `stop`. It runs on the gateway's runtime, so
/// a stalled runtime stops the pings and systemd restarts the unit.
pub async fn watchdog(interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => send("WATCHDOG=1", &[NotifyState::Watchdog]),
        }
    }
}
