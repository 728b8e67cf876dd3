//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` (the process
//! runs), `/readyz` (accepting traffic; 503 while draining), and, when
//! `admin.token_file` is set, the admin API under `/v1/` (DESIGN.md section 9): revoke a
//! token, kick a user, ban or unban an address range, list live sessions.

use crate::gateway::Gateway;
use crate::limits::IpKey;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::{convert::Infallible, time::Duration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A request head (the first, or the next on a kept-alive connection) must be in this
/// soon: health checks and scrapers send theirs in one packet.
const HEAD_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection is closed this long after it was accepted, whatever it is doing.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Concurrent admin connections, at most.
const MAX_ADMIN_CONNECTIONS: usize = 256;
/// Concurrent admin connections from one client address (IPv6: its `ipv6_prefix`).
const MAX_ADMIN_CONNECTIONS_PER_IP: usize = 8;

/// The admin listener's connections, oldest first. A full listener never turns a new
/// connection away while an older one sits idle (waiting for a request head, between
/// requests, or writing an answer): an idle one is closed to make room: of the same
/// address when that address is at its cap, else the oldest idle one of the address that
/// holds the most connections. So partial request heads cannot starve health checks,
/// scrapes or the admin API: an address at its cap only displaces its own connections,
/// a full listener displaces one of the busiest address, and only connections inside a request
/// (an answer being computed, an admin API body being read) are never displaced.
#[derive(Default)]
struct Connections {
    inner: Mutex<ConnectionsInner>,
}

#[derive(Default)]
struct ConnectionsInner {
    next: u64,
    /// By age: the address key, whether a request is being answered, how to close it.
    open: BTreeMap<u64, (IpKey, bool, CancellationToken)>,
    /// Open connections per address; an address with none has no entry.
    per_ip: HashMap<IpKey, usize>,
}

/// One admitted admin connection; dropping it gives its place back.
struct Slot {
    connections: Arc<Connections>,
    id: u64,
    closed: CancellationToken,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnectionsInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Make room for a connection from `key` (closing the oldest idle one if needed);
    /// `None` when every connection in the way is inside a request.
    fn admit(self: &Arc<Self>, key: IpKey) -> Option<Slot> {
        let mut c = self.lock();
        let own_full = c.per_ip.get(&key).is_some_and(|n| *n >= MAX_ADMIN_CONNECTIONS_PER_IP);
        if own_full || c.open.len() >= MAX_ADMIN_CONNECTIONS {
            let idle = c.open.iter().filter(|(_, (k, busy, _))| !busy && (!own_full || *k == key));
            // A full listener takes the room from the address holding the most connections
            // (its oldest idle one): a client with one connection still sending its head is
            // displaced only by a flood from as many addresses as the listener holds, not by
            // a few addresses opening connections faster than it sends.
            let victim = idle
                .max_by_key(|(id, (k, _, _))| (c.per_ip.get(k).copied().unwrap_or(0), std::cmp::Reverse(**id)))
                .map(|(id, _)| *id)?;
            c.remove(victim);
        }
        let (id, closed) = (c.next, CancellationToken::new());
        c.next += 1;
        c.open.insert(id, (key, false, closed.clone()));
        *c.per_ip.entry(key).or_default() += 1;
        Some(Slot {
            connections: self.clone(),
            id,
            closed,
        })
    }

    fn set_busy(&self, id: u64, busy: bool) {
        if let Some(e) = self.lock().open.get_mut(&id) {
            e.1 = busy;
        }
    }
}

impl ConnectionsInner {
    /// Forget a connection and close it (a no-op when it is already gone).
    fn remove(&mut self, id: u64) {
        let Some((key, _, closed)) = self.open.remove(&id) else { return };
        closed.cancel();
        if let Some(n) = self.per_ip.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&key);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.lock().remove(self.id);
    }
}

/// Marks a connection as inside a request while it lives.
struct Busy(Arc<Slot>);

impl Busy {
    fn new(slot: Arc<Slot>) -> Busy {
        slot.connections.set_busy(slot.id, true);
        Busy(slot)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.connections.set_busy(self.0.id, false);
    }
}

pub(crate) async fn serve(gw: Arc<Gateway>, listener: TcpListener, stop: CancellationToken) {
    let connections = Arc::new(Connections::default());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { crate::util::accept_failed("admin", &e).await; continue; }
            },
        };
        let Some(slot) = connections.admit(gw.per_ip().key(peer.ip())) else {
            continue; // every connection in the way is answering a request: this one is dropped
        };
        let slot = Arc::new(slot);
        let gw = gw.clone();
        tokio::spawn(async move {
            let closed = slot.closed.clone();
            let in_service = slot.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let gw = gw.clone();
                let busy = Busy::new(in_service.clone());
                async move {
                    let resp = if req.uri().path().starts_with("/v1/") {
                        crate::admin_api::answer(&gw, req).await
                    } else {
                        answer(&gw, &req)
                    };
                    drop(busy);
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = closed.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
            }
            drop(slot);
        });
    }
}

fn answer(gw: &Gateway, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", gw.render_metrics()),
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") if gw.is_draining() => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n".to_string()),
        (&Method::GET, "/readyz") if !gw.is_ready() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "no reachable upstream for a route\n".to_string(),
        ),
        (&Method::GET, "/readyz") if !gw.has_cluster_state() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "cluster state not loaded yet (no Redis sync, no state file)\n".to_string(),
        ),
        (&Method::GET, "/readyz") => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
    resp
}
