//! systemd notifications (DESIGN.md section 17) for `Type=notify` units: `READY=1` once
//! listening, `RELOADING=1` … `READY=1` around a reload, `STOPPING=1` on drain,
//! `WATCHDOG=1` while `WatchdogSec` is set, `MAINPID=` after a takeover.
//!
//! Each is one datagram to `$NOTIFY_SOCKET` (the states and the watchdog setting come
//! from the `sd-notify` crate); without that variable (not under systemd, tests) every
//! call does nothing. The datagram is sent without blocking: a service manager that
//! does not read (a full queue) costs a lost message, never a stalled runtime thread.
//! A failed send is logged at debug and never stops the gateway.

use sd_notify::NotifyState;
use std::io::ErrorKind;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A full queue is retried this many times, [`RETRY_PAUSE`] apart, for the messages
/// that change the unit's state (not for watchdog pings, sent again soon anyway).
const RETRIES: u32 = 20;
const RETRY_PAUSE: Duration = Duration::from_millis(5);

fn send(what: &str, states: &[NotifyState<'_>]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    let retries = if what == "WATCHDOG=1" { 0 } else { RETRIES };
    if let Err(e) = send_to(&path, msg.as_bytes(), retries) {
        tracing::debug!(error = %e, "cannot send {what} to systemd");
    }
}

fn send_to(path: &std::ffi::OsStr, msg: &[u8], retries: u32) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    for attempt in 0..=retries {
        match sock.send_to_addr(msg, &addr) {
            Ok(n) if n == msg.len() => return Ok(()),
            Ok(_) => return Err(std::io::Error::new(ErrorKind::WriteZero, "incomplete datagram")),
            Err(e) if e.kind() == ErrorKind::WouldBlock && attempt < retries => std::thread::sleep(RETRY_PAUSE),
            Err(e) => return Err(e),
        }
    }
    Err(ErrorKind::WouldBlock.into())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_manager_that_does_not_read_costs_messages_not_a_stalled_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let started = std::time::Instant::now();
        let sent = (0..200).filter(|_| send_to(path.as_os_str(), b"WATCHDOG=1\n", 0).is_ok()).count();
        assert!(sent > 0 && sent < 200, "{sent}");
        // A state change waits a bounded while for room, then gives up.
        assert!(send_to(path.as_os_str(), b"READY=1\n", RETRIES).is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
        assert!(send_to(path.as_os_str(), b"READY=1\n", RETRIES).is_ok());
    }
}
