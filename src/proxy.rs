//! Plain HTTP on routes with `http = true` (DESIGN.md section 13): the exchange with
//! the upstream, after admission let the request through.
//!
//! - [`Pool`]: one per remote upstream of an `http` route. Connections are hyper's
//!   HTTP/1.1 client connections; at most `routes.http_max_connections` carry
//!   requests at once (a request waits for one within `http_timeout`), at most
//!   [`MAX_IDLE_PER_UPSTREAM`] per worker thread wait idle. A connection goes back to
//!   the pool only after a clean exchange: the request body sent whole, the answer read
//!   to its end.
//! - [`Limited`]: the client's body on its way up, cut at `max_body` (the upstream
//!   request is aborted and its connection dropped).
//! - [`Streamed`]: the upstream's answer on its way to the client, frame by frame
//!   (never held whole), ended with an error when no byte came for `http_timeout`.
//! - [`Body`]: what the gateway's HTTP service answers with: a short body of its own,
//!   an upstream's stream, or the built-in echo (the request body sent back).

use crate::config::{HttpPolicy, Upstream};
use crate::error::Reject;
use crate::upstream::UpstreamIo;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Idle connections kept per upstream and worker thread, so that a burst of up to 128
/// concurrent requests finds its connections again on the next one instead of
/// connecting anew (with 32, a load of 64 kept-alive clients spent a tenth of the
/// gateway's CPU in connect/close to the upstream). Each expires after [`IDLE_EXPIRY`].
pub(crate) const MAX_IDLE_PER_UPSTREAM: usize = 128;
/// An idle connection older than this is closed rather than reused.
const IDLE_EXPIRY: Duration = Duration::from_secs(60);
/// How long a pooled connection may take to become ready again.
const READY_WAIT: Duration = Duration::from_millis(50);
/// Bytes of an upstream's response head hyper buffers at most.
const UPSTREAM_HEAD_BUFFER: usize = 64 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What happened to a request body on its way up, shared with the answer's stream.
#[derive(Debug)]
pub(crate) struct Upload {
    too_large: AtomicBool,
    /// The client's body failed (an invalid chunk, the client gone).
    failed: AtomicBool,
    done: AtomicBool,
    /// Milliseconds after `start` of the last byte either way.
    last: AtomicU64,
    start: Instant,
}

impl Upload {
    fn new() -> Arc<Upload> {
        Arc::new(Upload {
            too_large: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            done: AtomicBool::new(false),
            last: AtomicU64::new(0),
            start: Instant::now(),
        })
    }

    fn touch(&self) {
        self.last.store(crate::util::millis_since(self.start), Ordering::Relaxed);
    }

    fn last_progress(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Sent whole, and nothing went wrong.
    fn clean(&self) -> bool {
        self.done.load(Ordering::Relaxed) && !self.too_large.load(Ordering::Relaxed) && !self.failed.load(Ordering::Relaxed)
    }

    /// Why the exchange failed on the client's side, if it did.
    fn client_fault(&self) -> Option<Reject> {
        if self.too_large.load(Ordering::Relaxed) {
            Some(Reject::BodyTooLarge)
        } else if self.failed.load(Ordering::Relaxed) {
            Some(Reject::BadRequest("invalid request body"))
        } else {
            None
        }
    }
}

/// The client's request body, cut at `max_body`.
pub(crate) struct Limited {
    inner: Incoming,
    left: u64,
    upload: Arc<Upload>,
}

impl Limited {
    /// The body of a request on a route with `policy`; 413 at once when its declared
    /// length is over `max_body`.
    pub(crate) fn new(inner: Incoming, policy: &HttpPolicy) -> Result<Limited, Reject> {
        if inner.size_hint().lower() > policy.max_body {
            return Err(Reject::BodyTooLarge);
        }
        let upload = Upload::new();
        if inner.is_end_stream() {
            upload.done.store(true, Ordering::Relaxed);
        }
        Ok(Limited {
            inner,
            left: policy.max_body,
            upload,
        })
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended: ended is sent whole.
        if self.inner.is_end_stream() {
            self.upload.done.store(true, Ordering::Relaxed);
        }
    }
}

impl HttpBody for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.upload.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err("request body over max_body".into())));
                    }
                    this.left -= n;
                }
                this.upload.touch();
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.upload.failed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                this.upload.done.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection waiting in the pool (in the list of the worker its driver task runs on).
struct Idle {
    sender: SendRequest<Limited>,
    since: Instant,
}

/// The idle connections whose driver tasks run on one worker thread (aligned: two
/// workers' lists never share a cache line, so returning a connection on one thread does
/// not stall the other).
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<Vec<Idle>>);

/// The connections to one remote upstream.
pub struct Pool {
    upstream: Upstream,
    /// Its `Host` header and its name in the access log, made once.
    host: http::HeaderValue,
    label: Arc<str>,
    tls: Option<tokio_rustls::TlsConnector>,
    /// By worker ([`crate::workers::current`], modulo their number): a request is only
    /// lent a connection whose driver runs on its own thread. (The number comes from the
    /// config this pool was made under; a reload that changes `server.workers`, which
    /// takes effect only at a restart, can make two workers share a list: still correct,
    /// a connection is safe to use from any thread, only a little slower.)
    idle: Box<[Shard]>,
    busy: Arc<Semaphore>,
}

impl Pool {
    /// A pool of at most `max_busy` connections carrying a request at once
    /// (`routes.http_max_connections`), for a gateway of `workers` worker threads.
    pub fn new(upstream: Upstream, tls: Option<tokio_rustls::TlsConnector>, max_busy: usize, workers: usize) -> Pool {
        Pool {
            host: crate::upstream::host_header(&upstream),
            label: crate::upstream::target_label(&upstream).into(),
            upstream,
            tls,
            // Worker numbers are 1..=N; 0 is any other thread.
            idle: (0..=workers.max(1)).map(|_| Shard::default()).collect(),
            busy: Arc::new(Semaphore::new(max_busy.clamp(1, Semaphore::MAX_PERMITS))),
        }
    }

    /// Connections waiting idle now.
    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(|s| crate::util::lock(&s.0).len()).sum()
    }

    /// This thread's idle connections.
    fn shard(&self) -> &Mutex<Vec<Idle>> {
        &self.idle[crate::workers::current() % self.idle.len()].0
    }

    /// A connection for one exchange: a pooled one that is still ready, else a new one
    /// (connected within `connect_timeout`). Waits at most `wait` for a free place.
    pub async fn checkout(self: &Arc<Self>, wait: Duration, connect_timeout: Duration) -> Result<Lease, Checkout> {
        // A free place at once (the usual case) needs no timer.
        let permit = match self.busy.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Checkout::Busy(Reject::UpstreamUnavailable)),
            Err(tokio::sync::TryAcquireError::NoPermits) => match tokio::time::timeout(wait, self.busy.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return Err(Checkout::Busy(Reject::UpstreamUnavailable)),
                // Every place taken (long polls held open): the upstream itself did nothing wrong.
                Err(_) => return Err(Checkout::Busy(Reject::UpstreamTimeout)),
            },
        };
        loop {
            // The most recently returned first.
            let next = crate::util::lock(self.shard()).pop();
            let Some(Idle { mut sender, since }) = next else { break };
            if sender.is_closed() || since.elapsed() > IDLE_EXPIRY {
                continue;
            }
            if sender.is_ready() || matches!(tokio::time::timeout(READY_WAIT, sender.ready()).await, Ok(Ok(()))) {
                return Ok(Lease {
                    sender: Some(sender),
                    pool: self.clone(),
                    _permit: permit,
                    reusable: false,
                    reused: true,
                    load: None,
                });
            }
        }
        let sender = tokio::time::timeout(connect_timeout, Box::pin(self.connect()))
            .await
            .map_err(|_| Checkout::Transport(Reject::UpstreamTimeout))?
            .map_err(Checkout::Transport)?;
        Ok(Lease {
            sender: Some(sender),
            pool: self.clone(),
            _permit: permit,
            reusable: false,
            reused: false,
            load: None,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Limited>, Reject> {
        let io: UpstreamIo = crate::upstream::open(&self.upstream, self.tls.as_ref()).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(UPSTREAM_HEAD_BUFFER)
            .handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|_| Reject::UpstreamUnavailable)?;
        // Ends when the upstream closes, or once the sender is dropped (a connection
        // not reused, or evicted from the pool).
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

/// Why [`Pool::checkout`] lent no connection.
#[derive(Debug)]
pub enum Checkout {
    /// No free place within the wait: the pool is full of exchanges in progress. Not the
    /// upstream's failure (clients holding long polls must not mark it down for others).
    Busy(Reject),
    /// Connecting failed: counts against the upstream's health.
    Transport(Reject),
}

/// One connection lent for one exchange; back to the pool on drop only when marked
/// reusable (a clean exchange).
pub struct Lease {
    sender: Option<SendRequest<Limited>>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
    reusable: bool,
    /// Taken from the pool (not new): the tests' and the logs' view of reuse.
    pub reused: bool,
    /// The request counted on its upstream (`least_sessions`, the admin API).
    pub load: Option<crate::balance::RequestHeld>,
}

impl Lease {
    /// The `Host` header its upstream is asked with.
    pub fn host_header(&self) -> &http::HeaderValue {
        &self.pool.host
    }

    /// Its upstream as the access log names it.
    pub fn label(&self) -> Arc<str> {
        self.pool.label.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take().filter(|s| self.reusable && !s.is_closed()) {
            let since = Instant::now();
            let mut idle = crate::util::lock(self.pool.shard());
            // Full: the oldest makes room.
            let evicted = (idle.len() >= MAX_IDLE_PER_UPSTREAM).then(|| idle.remove(0));
            idle.push(Idle { sender, since });
            drop(idle);
            drop(evicted);
        }
    }
}

/// Send the request on `lease` and wait for the answer's head, for at most `timeout`
/// without a byte either way (504). The answer streams back as a [`Streamed`]. A pooled
/// connection that turns out closed before the request went out on it (the upstream
/// closed it while idle) is replaced once by a new one (within `connect_timeout`):
/// nothing was sent, so nothing is sent twice.
pub(crate) async fn exchange(
    mut lease: Lease,
    head: http::request::Parts,
    body: Limited,
    (timeout, connect_timeout): (Duration, Duration),
) -> Result<Response<Body>, Reject> {
    // Its progress counts from now: a wait for a place in the pool or a connect came
    // before, and is not the upstream's time to answer.
    let upload = body.upload.clone();
    upload.touch();
    let mut req = http::Request::from_parts(head, body);
    let resp = loop {
        let Some(sender) = lease.sender.as_mut() else {
            return Err(Reject::UpstreamUnavailable);
        };
        let send = sender.try_send_request(req);
        match within(send, &upload, timeout).await? {
            Ok(resp) => break resp,
            Err(mut e) => match e.take_message() {
                Some(unsent) if lease.reused => {
                    tracing::debug!("a pooled upstream connection closed before the request went out: one new one");
                    let sender = tokio::time::timeout(connect_timeout, Box::pin(lease.pool.connect()))
                        .await
                        .map_err(|_| Reject::UpstreamTimeout)??;
                    lease.sender = Some(sender);
                    lease.reused = false;
                    req = unsent;
                }
                _ => {
                    tracing::debug!(error = %e.error(), "upstream exchange failed");
                    return Err(upload.client_fault().unwrap_or(Reject::UpstreamUnavailable));
                }
            },
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Nothing asked for an upgrade: a broken upstream.
        return Err(Reject::UpstreamUnavailable);
    }
    let (mut parts, incoming) = resp.into_parts();
    crate::upstream::strip_response_hop_by_hop(&mut parts.headers);
    let streamed = Streamed::new(incoming, lease, upload, timeout);
    Ok(Response::from_parts(parts, Body::Upstream(Box::new(streamed))))
}

/// `fut`, unless no byte moved either way for `timeout` (the client's fault when its
/// body failed, else 504).
async fn within<T>(fut: impl Future<Output = T>, upload: &Upload, timeout: Duration) -> Result<T, Reject> {
    tokio::pin!(fut);
    loop {
        let deadline = upload.last_progress() + timeout;
        tokio::select! {
            r = &mut fut => return Ok(r),
            () = tokio::time::sleep_until(deadline) => {
                if upload.last_progress() + timeout <= Instant::now() {
                    return Err(upload.client_fault().unwrap_or(Reject::UpstreamTimeout));
                }
            }
        }
    }
}

/// The built-in echo on an `http` route: 200, the request body sent back.
pub(crate) fn echo(body: Limited) -> Response<Body> {
    let mut resp = Response::new(Body::Echo(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
    resp
}

/// The upstream's answer body on its way to the client.
pub(crate) struct Streamed {
    inner: Incoming,
    lease: Option<Lease>,
    upload: Arc<Upload>,
    idle: Duration,
    /// Since when the answer has waited for the upstream: set on the first wait after
    /// the head or a byte (no clock read for an answer that never waits).
    waiting: Option<Instant>,
    /// `idle` after `waiting`; made on the first wait for the upstream (a short answer read
    /// whole at once never needs one), moved only when a byte came meanwhile.
    timer: Option<Pin<Box<Sleep>>>,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Streamed {
    fn new(inner: Incoming, lease: Lease, upload: Arc<Upload>, idle: Duration) -> Streamed {
        let mut s = Streamed {
            timer: None,
            waiting: None,
            inner,
            lease: Some(lease),
            upload,
            idle,
            on_end: None,
        };
        // An empty answer (HEAD, 204, 304) may never be polled: it is complete now.
        if s.inner.is_end_stream() {
            s.finish(true);
        }
        s
    }

    /// Run `f` once the answer has ended (or was dropped).
    pub(crate) fn on_end(&mut self, f: Box<dyn FnOnce() + Send + Sync>) {
        self.on_end = Some(f);
    }

    /// Give the connection back (clean end) or drop it.
    fn finish(&mut self, clean: bool) {
        if let Some(mut lease) = self.lease.take() {
            lease.reusable = clean && self.upload.clean();
        }
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        // hyper stops polling an answer that says it has ended (its length read): that
        // is a clean end. Any other drop (the client left, an error) is not.
        let clean = self.inner.is_end_stream();
        self.finish(clean);
        if let Some(f) = self.on_end.take() {
            f();
        }
    }
}

impl HttpBody for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => {
                // No byte from the upstream for `idle` (a client's upload does not extend it).
                let deadline = *this.waiting.get_or_insert_with(Instant::now) + this.idle;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.finish(false);
                    return Poll::Ready(Some(Err("no byte from the upstream within http_timeout".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Every answer of the gateway's HTTP service.
pub(crate) enum Body {
    /// The gateway's own (a 101, a refusal).
    Full(Full<Bytes>),
    Upstream(Box<Streamed>),
    Echo(Limited),
}

impl From<Full<Bytes>> for Body {
    fn from(b: Full<Bytes>) -> Body {
        Body::Full(b)
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            Body::Upstream(s) => Pin::new(s.as_mut()).poll_frame(cx),
            Body::Echo(l) => Pin::new(l).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_end_stream(),
            Body::Upstream(s) => s.is_end_stream(),
            Body::Echo(l) => l.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => b.size_hint(),
            Body::Upstream(s) => s.size_hint(),
            Body::Echo(l) => l.size_hint(),
        }
    }
}
