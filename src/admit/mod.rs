//! Admission, stages 5–8: the one owner of the decision whether a client gets a
//! session. `conn` runs TLS, hyper and the relay; it asks [`Admission`] at three points
//! and gets an answer each time:
//!
//! 1. [`Admission::begin`] right after accept (cluster mode: the shared per-IP check of
//!    the TCP peer starts here and runs while TLS is negotiated);
//! 2. [`Admission::answer`], hyper's service for the upgrade request: route, upgrade
//!    headers, Origin, limits, authentication, per-user cap, upstream connect, the 101
//!    (or a refusal), kept as the verdict [`Admission::verdict`] returns;
//! 3. [`Admitted::complete`] after the 101: the `first_message` token when the route
//!    waits for one, and the upstream then; the result is a [`Session`] with the
//!    [`SessionPolicy`] the relay re-checks it by.
//!
//! # Layout
//!
//! - `mod.rs` (this file): [`Admission`], [`Admitted`], [`Session`], the order of the checks.
//! - `request.rs`: the checks that need no token (address, drain, path, route, upgrade
//!   headers, Origin, bans, per-IP limits behind a proxy).
//! - `shared_cap.rs`: [`SharedCap`]: a cap held locally and, in cluster mode, across
//!   instances, with `on_failure` applied in one place (per IP, per user).
//! - `upstream.rs`: what the upstream request carries, and choosing and connecting the
//!   upstream (balancing and sticky sessions land here).
//! - `first_message.rs`: the token sent as the first message after the 101.
//! - `session.rs`: [`SessionPolicy`], a live session's re-check after a reload or an
//!   admin action.
//!
//! - `plain.rs`: a plain request on a route with `http = true`: the same checks, then a
//!   proxied exchange instead of an upgrade; each request on a kept-alive connection is
//!   admitted on its own.

mod first_message;
mod plain;
mod request;
mod session;
mod shared_cap;
mod upstream;

pub(crate) use session::token_deadline;
pub(crate) use shared_cap::{SharedIpCheck, UserHold};

use crate::auth::{Outcome, Principal, Seen};
use crate::error::Reject;
use crate::gateway::{Gateway, Runtime};
use crate::limits::IpSlot;
use crate::proxy::Body;
use crate::tls::ClientCert;
use crate::upgrade;
use crate::upstream::Connected;
use crate::util::lock;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use request::Checked;
use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};
use tokio::io::{AsyncRead, AsyncWrite};

/// What the connection learned, for its one log line.
#[derive(Default)]
pub(crate) struct Info {
    /// `X-Request-Id` from a trusted proxy, else generated; sent upstream.
    pub(crate) request_id: Option<Arc<str>>,
    /// The upstream that answered (`host:port`).
    pub(crate) upstream: Option<Arc<str>>,
    pub(crate) route: Option<Arc<str>>,
    pub(crate) sub: Option<String>,
    /// The `[providers.NAME]` of the route that authenticated `sub` (`None`: `[jwt]`).
    pub(crate) provider: Option<String>,
    pub(crate) token_fingerprint: Option<Arc<str>>,
    pub(crate) client_ip: Option<IpAddr>,
    /// The request's route has `http = true` (a plain request there is proxied).
    pub(crate) http: bool,
}

/// What the request stage decided, and what it learned on the way.
#[derive(Default)]
struct Verdict {
    info: Info,
    result: Option<Result<Box<Admitted>, Reject>>,
}

/// The admission of one connection: created at accept, asked by hyper's service,
/// read by the connection once hyper is done.
pub(crate) struct Admission {
    gw: Arc<Gateway>,
    /// The runtime of the request being admitted: the newest at the start of each
    /// request ([`Admission::answer`]), so a kept-alive connection follows reloads (a
    /// revoked token, a removed key, a changed route apply to its next request). One
    /// request is admitted and served under one runtime throughout.
    rt: Mutex<Arc<Runtime>>,
    peer_ip: IpAddr,
    over_cap: bool,
    plain: bool,
    verdict: Mutex<Verdict>,
    /// The client certificate the TLS handshake verified.
    cert: std::sync::OnceLock<Arc<ClientCert>>,
    /// The server certificate of a client that sent SNI: `Host` must be one of its names.
    sni_certificate: std::sync::OnceLock<Arc<crate::tls::Served>>,
    /// Cluster mode: the shared per-IP check of the TCP peer, started at accept.
    shared_ip: Mutex<Option<SharedIpCheck>>,
    /// Cluster mode: the per-IP lease the first plain request took, held while the
    /// connection lives (an upgrade later on it takes it over).
    conn_lease: Mutex<Option<crate::cluster::Lease>>,
    /// The raw heads of this connection's requests, checked as hyper reads them.
    heads: Arc<crate::framing::Heads>,
    /// Plain requests answered so far on this connection.
    served: std::sync::atomic::AtomicUsize,
    /// The `http_timeout` of the last plain request's route (ms; 0 before any).
    http_timeout_ms: std::sync::atomic::AtomicU64,
}

/// A client admitted by the request stage, waiting for the 101 to be written.
pub(crate) struct Admitted {
    route_index: usize,
    /// `None` while the client still has to send its token as the first message.
    upstream: Option<Connected>,
    /// hyper's hand-over of the connection once the 101 is written.
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    principal: Option<Principal>,
    cert: Option<Arc<ClientCert>>,
    pending: Option<first_message::Pending>,
    holds: Holds,
    /// The client's `Origin`, checked again when the route's policy changes.
    origin: Option<http::HeaderValue>,
    /// permessage-deflate as agreed with the client in the 101.
    deflate: Option<crate::extension::Deflate>,
}

/// What an admitted client holds for its session, given back when dropped.
#[derive(Default)]
struct Holds {
    /// The per-IP slot of a client behind a trusted proxy.
    _ip_slot: Option<IpSlot>,
    /// In cluster mode, the client's place under the per-IP cap across instances.
    _ip_lease: Option<crate::cluster::Lease>,
    user: Option<UserHold>,
    /// The deflate/inflate state the session keeps between messages (context takeover),
    /// under `limits.max_compression_memory`.
    _compression: Option<crate::relay::deflate::Reservation>,
}

/// A session ready to relay: the upstream connected, the principal known.
pub(crate) struct Session {
    pub(crate) route_index: usize,
    pub(crate) upstream: Connected,
    pub(crate) principal: Option<Box<Principal>>,
    /// The certificate of a client on a route that does not authenticate with it.
    cert: Option<Arc<ClientCert>>,
    /// The client's `Origin`, checked again when the route's policy changes.
    pub(super) origin: Option<http::HeaderValue>,
    /// permessage-deflate as agreed with the client (the upstream's is in `upstream`).
    pub(crate) deflate: Option<crate::extension::Deflate>,
    _holds: Holds,
}

type Answer = (Response<Full<Bytes>>, Admitted);

/// What the request stage answers one request with.
enum Answered {
    /// A 101 (the session follows) or, with `first_message`, a 101 that waits for the token.
    Upgrade(Box<Answer>),
    /// A plain request proxied (its answer streams).
    Http(Response<Body>),
}

impl Admission {
    /// Admission of a connection from `peer_ip`, accepted under `rt` (`over_cap`: past
    /// `max_connections`, refused with 503 once its request is read).
    /// `plain`: the connection came in on a `listen_plain` listener (no TLS, so no
    /// client certificate: a route that needs one refuses it).
    pub(crate) fn begin(gw: &Arc<Gateway>, rt: &Arc<Runtime>, peer_ip: IpAddr, (over_cap, plain): (bool, bool)) -> Admission {
        Admission {
            plain,
            shared_ip: Mutex::new(shared_cap::start_ip_check(gw, rt, peer_ip)),
            gw: gw.clone(),
            rt: Mutex::new(rt.clone()),
            peer_ip,
            over_cap,
            verdict: Mutex::default(),
            cert: std::sync::OnceLock::new(),
            sni_certificate: std::sync::OnceLock::new(),
            conn_lease: Mutex::default(),
            heads: crate::framing::Heads::new(),
            served: std::sync::atomic::AtomicUsize::new(0),
            http_timeout_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The `http_timeout` of the plain exchange on this connection (zero before any).
    pub(crate) fn http_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.http_timeout_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The raw request heads of this connection, for the stream that feeds hyper.
    pub(crate) fn heads(&self) -> Arc<crate::framing::Heads> {
        self.heads.clone()
    }

    /// Plain requests answered (proxied) on this connection so far.
    pub(crate) fn served(&self) -> usize {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The client certificate TLS verified (set once, before the request is read).
    pub(crate) fn set_cert(&self, cert: Option<Arc<ClientCert>>) {
        if let Some(c) = cert {
            let _ = self.cert.set(c);
        }
    }

    /// The certificate served to a client that sent SNI (set once, before the request is read).
    pub(crate) fn set_sni_certificate(&self, served: Option<Arc<crate::tls::Served>>) {
        if let Some(s) = served {
            let _ = self.sni_certificate.set(s);
        }
    }

    fn cert(&self) -> Option<&Arc<ClientCert>> {
        self.cert.get()
    }

    /// hyper's service: answer one request on this connection. An upgrade or a refusal
    /// is the last request (the verdict the connection reads); a proxied plain request
    /// leaves the connection open for the next one.
    pub(crate) async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let t0 = tokio::time::Instant::now();
        // The newest runtime, loaded once for the request and passed down by reference
        // (its count is shared by every connection: one increment per request, not one
        // per stage); kept for the session when it changed.
        let rt = self.gw.runtime();
        {
            let mut current = lock(&self.rt);
            if !Arc::ptr_eq(&current, &rt) {
                *current = rt.clone();
            }
        }
        let plain = !upgrade::wants_websocket(req.headers());
        self.note(|i| {
            i.route = None;
            i.http = false;
        });
        // hyper hides what a proxy must refuse (a length next to chunked, a length
        // twice, a bare LF): the raw head, checked before hyper read it, decides first.
        let result = match self.heads.next() {
            crate::framing::HeadCheck::Refused(why) => Err(Reject::BadRequest(why)),
            crate::framing::HeadCheck::Clean => self.admit(&rt, req).await,
        };
        let (resp, counted) = match result {
            Ok(Answered::Upgrade(answer)) => {
                let (resp, admitted) = *answer;
                lock(&self.verdict).result = Some(Ok(Box::new(admitted)));
                (resp.map(Body::from), false)
            }
            Ok(Answered::Http(resp)) => {
                self.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (resp, true)
            }
            Err(reject) => {
                let resp = upgrade::refusal(&reject);
                lock(&self.verdict).result = Some(Err(reject));
                (resp.map(Body::from), plain)
            }
        };
        let series = self.with_info(|i| i.route.clone().filter(|_| i.http)).map(|name| {
            match rt.route_names.iter().position(|n| Arc::ptr_eq(n, &name)) {
                Some(index) => rt.http_series[index].get_or_init(|| self.gw.metrics.http_route(&name)).clone(),
                None => self.gw.metrics.http_route(&name),
            }
        });
        match series {
            Some(series) if counted => self.count_http(series, resp, t0),
            _ => resp,
        }
    }

    /// `wsgate_http_requests_total` now, the duration once the answer has ended. An
    /// answered request is logged then, one line each (a refusal is logged with the
    /// connection's end, once).
    fn count_http(
        &self,
        metrics: Arc<crate::metrics::HttpRouteMetrics>,
        mut resp: Response<Body>,
        t0: tokio::time::Instant,
    ) -> Response<Body> {
        let status = resp.status().as_u16();
        metrics.request(status);
        let answered = !matches!(resp.body(), Body::Full(_));
        let (request_id, client, upstream) = self.with_info(|i| (i.request_id.clone(), i.client_ip, i.upstream.clone()));
        let done = move || {
            let took = t0.elapsed();
            metrics.duration(took.as_secs_f64());
            if answered {
                tracing::info!(
                    request_id = request_id.as_deref().unwrap_or("-"),
                    peer = %client.map_or_else(|| "-".to_string(), |c| c.to_string()),
                    route = &*metrics.route,
                    upstream = upstream.as_deref().unwrap_or("-"),
                    status,
                    duration_ms = took.as_millis() as u64,
                    "http request"
                );
            }
        };
        match resp.body_mut() {
            Body::Upstream(s) => s.on_end(Box::new(done)),
            _ => done(),
        }
        resp
    }

    /// What the request stage decided (`None`: it never ran to the end).
    pub(crate) fn verdict(&self) -> Option<Result<Box<Admitted>, Reject>> {
        lock(&self.verdict).result.take()
    }

    /// What the connection learned, for its log line.
    pub(crate) fn info(&self) -> Info {
        std::mem::take(&mut lock(&self.verdict).info)
    }

    /// Read what was learned so far (the session's log span, its registration).
    pub(crate) fn with_info<T>(&self, f: impl FnOnce(&Info) -> T) -> T {
        f(&lock(&self.verdict).info)
    }

    /// The route's authentication of one request (an upgrade or a plain request),
    /// noting in the access log what it saw: the token's fingerprint, the identity and
    /// the provider.
    async fn authenticate(
        &self,
        rt: &Runtime,
        route: &crate::config::Route,
        req: &Request<Incoming>,
        checked: &Checked,
        upgrade: bool,
    ) -> Result<Outcome, Reject> {
        let mut seen = Seen::default();
        let requested = crate::auth::forward::Requested {
            client_ip: checked.client_ip,
            host: &checked.host,
            path: checked.path(),
            query: checked.query(),
            method: req.method(),
            upgrade,
            tls: !self.plain,
        };
        let query = checked.query();
        let outcome = rt
            .auth
            .authenticate(route, req.headers(), query, self.cert(), &requested, &mut seen)
            .await;
        self.note(|i| {
            i.token_fingerprint = seen.token_fingerprint;
            i.sub = seen.identity;
            i.provider.clone_from(&route.provider);
        });
        outcome
    }

    /// The runtime the current request is admitted under (see the field).
    pub(crate) fn rt(&self) -> Arc<Runtime> {
        lock(&self.rt).clone()
    }

    fn note(&self, f: impl FnOnce(&mut Info)) {
        f(&mut lock(&self.verdict).info)
    }

    /// Stages 5–7 in order; the first refusal wins.
    async fn admit(&self, rt: &Arc<Runtime>, mut req: Request<Incoming>) -> Result<Answered, Reject> {
        let mut checked = self.check(rt, &req)?;
        let Some(upgrade) = checked.upgrade.take() else {
            return self.http(rt, req, checked).await.map(Answered::Http);
        };
        let req = &mut req;
        let held = lock(&self.conn_lease).take();
        let ip_lease = match held {
            Some(lease) => Some(lease),
            None => {
                let started = lock(&self.shared_ip).take().filter(|_| checked.client_ip == self.peer_ip);
                shared_cap::hold_ip(&self.gw, &rt.config, checked.client_ip, started).await?
            }
        };
        let route = &rt.config.routes[checked.route_index];
        let principal = match self.authenticate(rt, route, req, &checked, true).await? {
            Outcome::Anonymous => None,
            Outcome::Authenticated(p) => Some(p),
            Outcome::Deferred => {
                let pending = first_message::Pending::new(req.headers().clone(), &checked, self.peer_ip);
                let resp = upgrade::switching_protocols(&upgrade, None);
                let admitted = self.admitted(req, checked, ip_lease, (None, None), Some(pending), None);
                return Ok(Answered::Upgrade(Box::new((resp, admitted))));
            }
        };
        let user = authorize(&self.gw, &rt.config, route, principal.as_ref()).await?;
        let request_id = self.with_info(|i| i.request_id.clone());
        let mut facts = upstream::facts(
            rt,
            route,
            (checked.client_ip, self.peer_ip),
            (checked.path(), checked.query()),
            req.headers(),
            principal.as_ref(),
            self.cert().map(Arc::as_ref),
        );
        facts.request_id = request_id.as_deref();
        let connected = upstream::connect(&self.gw, rt, checked.route_index, &facts).await?;
        self.note(|i| i.upstream = Some(Arc::from(&*connected.target)));
        let mut resp = upgrade::switching_protocols(&upgrade, connected.protocol.clone());
        let had = upstream::sticky_choice(rt, checked.route_index, req.headers());
        let index = connected.load.as_ref().map(crate::balance::SessionHeld::index);
        if let Some(c) = index.and_then(|i| upstream::sticky_cookie(rt, checked.route_index, had, i, !self.plain)) {
            resp.headers_mut().append(http::header::SET_COOKIE, c);
        }
        let upstream_state = connected.deflate.as_ref().map_or(0, crate::relay::deflate::session_memory);
        let negotiated = negotiate(&self.gw, route, req.headers(), upstream_state);
        let mut admitted = self.admitted(req, checked, ip_lease, (Some(connected), principal), None, user);
        if let Some((d, answer, reservation)) = negotiated {
            resp.headers_mut().insert(http::header::SEC_WEBSOCKET_EXTENSIONS, answer);
            admitted.deflate = Some(d);
            admitted.holds._compression = reservation;
        } else if upstream_state > 0 {
            // The upstream keeps its context (it did not agree to server_no_context_takeover):
            // counted when there is room; the session goes on either way (the 101 is due).
            admitted.holds._compression = self.gw.compression.reserve(upstream_state);
        }
        Ok(Answered::Upgrade(Box::new((resp, admitted))))
    }

    /// The admitted client: what the checks held for it (`checked`, the shared per-IP
    /// lease, the user's place) and what it is admitted with.
    fn admitted(
        &self,
        req: &mut Request<Incoming>,
        checked: Checked,
        ip_lease: Option<crate::cluster::Lease>,
        (upstream, principal): (Option<Connected>, Option<Principal>),
        pending: Option<first_message::Pending>,
        user: Option<UserHold>,
    ) -> Admitted {
        Admitted {
            route_index: checked.route_index,
            upstream,
            on_upgrade: Some(hyper::upgrade::on(req)),
            principal,
            cert: self.cert().cloned(),
            pending,
            holds: Holds {
                _ip_slot: checked.ip_slot,
                _ip_lease: ip_lease,
                user,
                _compression: None,
            },
            origin: checked.origin,
            deflate: None,
        }
    }
}

/// permessage-deflate with the client (DESIGN.md section 16): on a route with
/// `compression = true`, the first offer the gateway can honour, while
/// `limits.max_compression_memory` has room for the session's state (reserved now,
/// with `upstream_state` the upstream hop keeps, when it keeps state between messages;
/// else one message's worth must fit). `None`: the 101 carries no extension.
fn negotiate(
    gw: &Gateway,
    route: &crate::config::Route,
    headers: &http::HeaderMap,
    upstream_state: usize,
) -> Option<(
    crate::extension::Deflate,
    http::HeaderValue,
    Option<crate::relay::deflate::Reservation>,
)> {
    if !route.compression.client {
        return None;
    }
    let (d, answer) = crate::extension::answer_client(headers, route.compression.context_takeover)?;
    if !gw.compression.has_room(crate::relay::deflate::message_memory(&d)) {
        tracing::debug!(route = %route.name, "compression memory full: session goes uncompressed");
        return None;
    }
    let reservation = match crate::relay::deflate::session_memory(&d) + upstream_state {
        0 => None,
        n => Some(gw.compression.reserve(n)?),
    };
    Some((d, answer, reservation))
}

impl Admitted {
    /// After the 101: the `first_message` token when the route waits for one, then
    /// its upstream. A failure closes the client (1008 auth, 1011 upstream).
    pub(crate) async fn complete<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        admission: &Admission,
        client: &mut crate::relay::Endpoint<S>,
    ) -> Result<Session, Reject> {
        let Admitted {
            route_index,
            upstream,
            principal,
            cert,
            pending,
            mut holds,
            origin,
            deflate,
            ..
        } = self;
        let (upstream, principal) = match (upstream, pending) {
            (Some(u), _) => (u, principal),
            (None, Some(pending)) => {
                let (u, p, user) = first_message::complete(admission, route_index, client, pending, cert.as_ref()).await?;
                holds.user = user;
                (u, Some(p))
            }
            (None, None) => return Err(Reject::BadRequest("no upstream")),
        };
        Ok(Session {
            route_index,
            upstream,
            principal: principal.map(|p| Box::new(p.for_session())),
            cert,
            origin,
            deflate,
            _holds: holds,
        })
    }

    /// hyper's hand-over of the connection, once (`None` the second time).
    pub(crate) fn take_upgrade(&mut self) -> Option<hyper::upgrade::OnUpgrade> {
        self.on_upgrade.take()
    }

    /// The upstream connected before the 101, to be told when the 101 never arrives.
    pub(crate) fn upstream_mut(&mut self) -> Option<&mut Connected> {
        self.upstream.as_mut()
    }
}

/// After authentication: revocations through the admin API (the file's list is checked
/// by the verifier), then the user's session under the per-user cap: the route's own
/// when it overrides `max_connections_per_user` (counted on this route alone), else
/// the global one.
async fn authorize(
    gw: &Gateway,
    config: &crate::config::Config,
    route: &crate::config::Route,
    principal: Option<&Principal>,
) -> Result<Option<UserHold>, Reject> {
    let Some(p) = principal else { return Ok(None) };
    if gw.incidents.is_revoked(p.revocation_key().as_deref()) {
        return Err(Reject::Auth(crate::error::AuthFailure::Revoked));
    }
    let Some(user) = p.user_key() else { return Ok(None) };
    let limits = config.limits_of(route);
    // `\0@` starts no other key: a `[jwt]` identity starting with NUL is escaped as
    // `\0\0…`, a provider's starts with `\0` and the provider's name (no `@`).
    let key = if limits.user_cap_per_route {
        format!("\0@{}\0{user}", route.name)
    } else {
        user
    };
    shared_cap::hold_user(gw, limits.max_connections_per_user, &key).await.map(Some)
}
