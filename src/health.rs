//! The state of one upstream of one route (DESIGN.md section 13), shared by the choice
//! ([`crate::admit`]), the admin API and the sessions on it:
//!
//! - passive health: transport failures in a row put it in back-off (section 5);
//! - active health (`health_check`): [`checker`] runs `GET path` every `interval`;
//!   [`ACTIVE_FAILURES`] failures in a row take it out (`down`), [`ACTIVE_PASSES`] passes
//!   in a row bring it back. Upstreams start in;
//! - drain (admin API): no new session or request; each live session on it gets 1012 at
//!   its own point of `over`, so clients reconnect elsewhere without a thundering herd.
//!
//! One [`Health`] per (route name, upstream as configured), kept across reloads that
//! keep that pair ([`adopt`]), so neither a drain nor a `down` is lifted by a reload.
//! Checker tasks belong to one config generation: a reload cancels them and starts
//! those of the new config, so routes and upstreams that go away take theirs along.

use crate::config::{HealthCheck, Route, Upstream};
use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    task::Context,
    time::Duration,
};
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Consecutive transport failures before an upstream is skipped.
pub const FAILURES_BEFORE_BACKOFF: u32 = 3;
/// First back-off; doubles with each further failure, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Failed active checks in a row that take an upstream out.
pub const ACTIVE_FAILURES: u32 = 3;
/// Passed active checks in a row that bring it back.
pub const ACTIVE_PASSES: u32 = 2;
/// Longest drain `over` the admin API accepts.
pub const MAX_DRAIN_OVER: Duration = Duration::from_secs(24 * 3600);
/// Bytes of a health check's response head read at most (the body is never read).
const CHECK_HEAD_BUFFER: usize = 16 * 1024;

/// What one upstream's state is now, as the admin API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
    Drained,
}

impl State {
    pub fn label(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Drained => "drained",
        }
    }
}

#[derive(Debug, Default)]
struct Active {
    failures: u32,
    passes: u32,
    down: bool,
}

/// A drain in force: the sessions live when it began get their points in order.
#[derive(Debug)]
struct Order {
    epoch: u64,
    started: Instant,
    over: Duration,
    /// Sessions live when the drain began.
    total: usize,
    /// Points handed out so far.
    next: usize,
}

#[derive(Debug, Default)]
struct Drain {
    epoch: u64,
    order: Option<Order>,
    /// Cancelled when a drain begins (then replaced): sessions wake to take their point.
    begun: CancellationToken,
}

/// One upstream of one route.
#[derive(Debug, Default)]
pub struct Health {
    passive: Mutex<(u32, Option<Instant>)>,
    active: Mutex<Active>,
    drain: Mutex<Drain>,
    /// Live WebSocket sessions on this upstream (each holds a [`DrainWatch`]).
    sessions: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Health {
    /// Whether the upstream is out: in back-off after transport failures, or failing its
    /// active checks.
    pub fn is_down(&self) -> bool {
        lock(&self.active).down || lock(&self.passive).1.is_some_and(|until| until > Instant::now())
    }

    /// Whether the active checks have it out.
    pub fn is_checked_down(&self) -> bool {
        lock(&self.active).down
    }

    pub fn is_drained(&self) -> bool {
        lock(&self.drain).order.is_some()
    }

    /// Whether new sessions and requests may go to it.
    pub fn is_available(&self) -> bool {
        !self.is_drained() && !self.is_down()
    }

    pub fn state(&self) -> State {
        if self.is_drained() {
            State::Drained
        } else if self.is_down() {
            State::Down
        } else {
            State::Up
        }
    }

    /// A transport failure (passive health).
    pub fn failed(&self) {
        let mut s = lock(&self.passive);
        s.0 = s.0.saturating_add(1);
        if s.0 >= FAILURES_BEFORE_BACKOFF {
            let doublings = (s.0 - FAILURES_BEFORE_BACKOFF).min(8);
            let backoff = (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF);
            s.1 = Some(Instant::now() + backoff);
        }
    }

    pub fn succeeded(&self) {
        *lock(&self.passive) = (0, None);
    }

    /// One active check's result; returns the change of state, if any (`Some(true)`:
    /// back in).
    pub fn checked(&self, pass: bool) -> Option<bool> {
        let mut a = lock(&self.active);
        if pass {
            a.failures = 0;
            a.passes = a.passes.saturating_add(1);
            if a.down && a.passes >= ACTIVE_PASSES {
                a.down = false;
                return Some(true);
            }
        } else {
            a.passes = 0;
            a.failures = a.failures.saturating_add(1);
            if !a.down && a.failures >= ACTIVE_FAILURES {
                a.down = true;
                return Some(false);
            }
        }
        None
    }

    /// Forget the active checks' verdict (the route no longer has `health_check`).
    pub fn clear_checks(&self) {
        *lock(&self.active) = Active::default();
    }

    /// Begin a drain: each session live now gets its point in `over`. Returns false when
    /// it was drained already (the running drain keeps its points).
    pub fn drain(&self, over: Duration) -> bool {
        let mut d = lock(&self.drain);
        if d.order.is_some() {
            return false;
        }
        d.epoch = d.epoch.wrapping_add(1);
        d.order = Some(Order {
            epoch: d.epoch,
            started: Instant::now(),
            over: over.min(MAX_DRAIN_OVER),
            total: self.sessions.load(Ordering::Relaxed),
            next: 0,
        });
        std::mem::take(&mut d.begun).cancel();
        true
    }

    /// End a drain: sessions not yet closed stay. Returns whether it was drained.
    pub fn undrain(&self) -> bool {
        lock(&self.drain).order.take().is_some()
    }

    /// The next point of the drain in force (with its epoch), and the token of the next
    /// drain. Points are spread evenly: the k-th of n sessions closes at
    /// `(2k + 1) / 2n` of `over`; sessions beyond n (started meanwhile) at its end.
    fn ticket(&self) -> (Option<(u64, Instant)>, CancellationToken) {
        let mut d = lock(&self.drain);
        let begun = d.begun.clone();
        let Some(o) = d.order.as_mut() else {
            return (None, begun);
        };
        let k = o.next;
        o.next = o.next.saturating_add(1);
        let at = if k < o.total {
            let n = u32::try_from(o.total).unwrap_or(u32::MAX).max(1);
            let k = u32::try_from(k).unwrap_or(u32::MAX);
            o.started + o.over.mul_f64((2.0 * f64::from(k) + 1.0) / (2.0 * f64::from(n)))
        } else {
            o.started + o.over
        };
        (Some((o.epoch, at)), begun)
    }

    fn epoch_in_force(&self) -> Option<u64> {
        lock(&self.drain).order.as_ref().map(|o| o.epoch)
    }

    /// Live sessions on this upstream.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Watch for a drain, for one session on this upstream (counted while it lives).
    pub fn watch(self: &Arc<Self>) -> DrainWatch {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        let mut w = DrainWatch {
            health: self.clone(),
            begun: Box::pin(CancellationToken::new().cancelled_owned()),
            at: None,
        };
        w.take_ticket();
        w
    }
}

/// One session's view of its upstream's drain: ready at the session's point.
pub struct DrainWatch {
    health: Arc<Health>,
    begun: Pin<Box<WaitForCancellationFutureOwned>>,
    at: Option<(u64, Pin<Box<Sleep>>)>,
}

impl DrainWatch {
    fn take_ticket(&mut self) {
        let (at, begun) = self.health.ticket();
        self.begun = Box::pin(begun.cancelled_owned());
        self.at = at.map(|(epoch, at)| (epoch, Box::pin(sleep_until(at))));
    }
}

impl crate::relay::Due for DrainWatch {
    /// Whether the session's point in a drain in force has come.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> bool {
        // Bounded: each round either returns or takes a ticket from a newer drain.
        for _ in 0..4 {
            if let Some((epoch, sleep)) = self.at.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return false;
                }
                if self.health.epoch_in_force() == Some(*epoch) {
                    return true;
                }
                // Undrained (or drained anew) before this point: wait for the next drain.
                self.at = None;
            }
            if self.begun.as_mut().poll(cx).is_pending() {
                return false;
            }
            self.take_ticket();
        }
        false
    }
}

impl Drop for DrainWatch {
    fn drop(&mut self) {
        self.health.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The states of one route's upstreams, by upstream index.
pub type ByUpstream = Vec<Arc<Health>>;

/// The state of every upstream of `routes`, taking over `old`'s for each (route name,
/// upstream as configured) it already had: drains and verdicts survive a reload.
/// Upstreams of routes without `health_check` forget any active verdict.
pub fn adopt(routes: &[Route], old: Option<(&[Route], &[ByUpstream])>) -> Vec<ByUpstream> {
    routes
        .iter()
        .map(|r| {
            r.upstreams
                .iter()
                .map(|u| {
                    let url = crate::balance::configured_url(u);
                    let kept = old.and_then(|(routes, health)| {
                        let ri = routes.iter().position(|o| o.name == r.name)?;
                        let ui = routes[ri].upstreams.iter().position(|o| crate::balance::configured_url(o) == url)?;
                        health.get(ri)?.get(ui).cloned()
                    });
                    let h = kept.unwrap_or_default();
                    if r.health_check.is_none() {
                        h.clear_checks();
                    }
                    h
                })
                .collect()
        })
        .collect()
}

/// Start one checker task per upstream of each route with `health_check` (the built-in
/// echo is never checked); they end when `until` is cancelled.
pub fn start_checkers(
    routes: &[Route],
    connectors: &[Option<tokio_rustls::TlsConnector>],
    health: &[ByUpstream],
    metrics: &crate::metrics::Metrics,
    until: &CancellationToken,
) {
    for (r, route) in routes.iter().enumerate() {
        let Some(check) = &route.health_check else { continue };
        for (i, upstream) in route.upstreams.iter().enumerate() {
            if matches!(upstream, Upstream::BuiltinEcho) {
                continue;
            }
            let task = Checker {
                route: route.name.clone(),
                index: i,
                upstream: upstream.clone(),
                tls: connectors.get(r).cloned().flatten(),
                check: check.clone(),
                health: health[r][i].clone(),
                metrics: metrics.clone(),
            };
            tokio::spawn(task.run(until.clone()));
        }
    }
}

/// The active checks of one upstream.
struct Checker {
    route: String,
    index: usize,
    upstream: Upstream,
    tls: Option<tokio_rustls::TlsConnector>,
    check: HealthCheck,
    health: Arc<Health>,
    metrics: crate::metrics::Metrics,
}

impl Checker {
    async fn run(self, until: CancellationToken) {
        // A random start inside the first interval: many upstreams are not all checked at once.
        let mut next = Instant::now() + crate::util::jitter(self.check.interval);
        loop {
            tokio::select! {
                _ = until.cancelled() => return,
                _ = sleep_until(next) => {}
            }
            next = Instant::now() + self.check.interval;
            let outcome = tokio::select! {
                _ = until.cancelled() => return,
                r = tokio::time::timeout(self.check.timeout, probe(&self.upstream, self.tls.as_ref(), &self.check.path)) => {
                    r.unwrap_or(Err("timeout"))
                }
            };
            let pass = outcome.is_ok();
            match self.health.checked(pass) {
                Some(true) => tracing::warn!(route = %self.route, upstream = self.index, "health check: upstream back in"),
                Some(false) => tracing::warn!(
                    route = %self.route,
                    upstream = self.index,
                    reason = outcome.err().unwrap_or("-"),
                    "health check: upstream taken out"
                ),
                None => {}
            }
            self.metrics.health_check(&self.route, self.index, pass);
        }
    }
}

/// One check: `GET path` on a new connection (TLS for `wss://`, with the route's
/// trust anchors); a pass is a 2xx. Redirects are not followed (a failure); the body is
/// never read.
async fn probe(upstream: &Upstream, tls: Option<&tokio_rustls::TlsConnector>, path: &str) -> Result<(), &'static str> {
    let Upstream::Remote { host, port, .. } = upstream else {
        return Ok(());
    };
    let io = crate::upstream::open(upstream, tls).await.map_err(|_| "connect")?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(CHECK_HEAD_BUFFER)
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|_| "http")?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "wsgate-health-check")
        .header(http::header::CONNECTION, "close")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|_| "request")?;
    let mut conn = std::pin::pin!(conn);
    let mut response = std::pin::pin!(sender.send_request(req));
    let resp = tokio::select! {
        biased;
        r = &mut response => r,
        _ = &mut conn => response.await,
    }
    .map_err(|_| "response")?;
    if resp.status().is_success() { Ok(()) } else { Err("status") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::Due;

    #[test]
    fn three_failures_take_it_out_and_two_passes_bring_it_back() {
        let h = Health::default();
        assert!(h.is_available());
        assert_eq!(h.checked(false), None);
        assert_eq!(h.checked(false), None);
        assert_eq!(h.checked(true), None); // a pass breaks the run
        assert_eq!(h.checked(false), None);
        assert_eq!(h.checked(false), None);
        assert_eq!(h.checked(false), Some(false));
        assert_eq!(h.state(), State::Down);
        assert_eq!(h.checked(true), None);
        assert_eq!(h.checked(false), None); // a failure breaks the run back
        assert_eq!(h.checked(true), None);
        assert_eq!(h.checked(true), Some(true));
        assert_eq!(h.state(), State::Up);
        h.drain(Duration::from_secs(1));
        assert_eq!(h.state(), State::Drained);
        assert!(!h.is_available());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_points_are_spread_evenly_and_an_undrain_cancels_the_rest() {
        let h = Arc::new(Health::default());
        let mut watches: Vec<DrainWatch> = (0..4).map(|_| h.watch()).collect();
        assert_eq!(h.sessions(), 4);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(watches.iter_mut().all(|w| !w.poll_due(&mut cx)));
        assert!(h.drain(Duration::from_secs(8)));
        assert!(!h.drain(Duration::from_secs(1)), "a second drain keeps the first's points");
        assert!(watches.iter_mut().all(|w| !w.poll_due(&mut cx)));
        // Points at 1 s, 3 s, 5 s, 7 s.
        let mut due = Vec::new();
        for step in 1..=8 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let n = watches.iter_mut().map(|w| w.poll_due(&mut cx)).filter(|&due| due).count();
            due.push(n);
            if step == 5 {
                assert!(h.undrain());
            }
        }
        assert_eq!(due, [1, 1, 2, 2, 3, 0, 0, 0]);
        drop(watches);
        assert_eq!(h.sessions(), 0);
    }
}
