//! One connection, stage by stage: TLS → upgrade request → auth → upstream → 101 →
//! relay. The inner functions chain the stages with `?` and return a [`Reject`]; the
//! outer [`handle`] is the one place that counts, logs and finishes a connection.

use crate::auth::fingerprint;
use crate::config::{AuthMode, ClientIpSource, Config, Route, TokenSource};
use crate::error::{CloseReason, Initiator, Reject};
use crate::relay::{self, Outcome};
use crate::server::{Gateway, Runtime};
use crate::upgrade;
use crate::upstream::{self, ClientFacts, Connected};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::{WebSocketStream, tungstenite::protocol::Role};

/// hyper refuses read buffers below this size.
const HYPER_MIN_BUF: usize = 8192;

/// What the connection learned, for its one log line.
#[derive(Default)]
struct Info {
    route: Option<String>,
    sub: Option<String>,
    token_fingerprint: Option<String>,
    client_ip: Option<IpAddr>,
}

/// A client admitted by the request stage: the connected upstream, waiting for the 101 to be written.
struct Admission {
    route_index: usize,
    upstream: Connected,
    on_upgrade: hyper::upgrade::OnUpgrade,
    expires_at: Option<u64>,
    /// The per-IP slot of a client behind a trusted proxy, held for the session.
    _ip_slot: Option<crate::limits::IpSlot>,
}

#[derive(Default)]
struct Slot {
    info: Info,
    result: Option<Result<Admission, Reject>>,
}

/// Run one accepted TCP connection to its end; logs and counts exactly once.
pub async fn handle(gw: Arc<Gateway>, rt: Arc<Runtime>, tcp: TcpStream, peer: SocketAddr, accepted: Instant, over_cap: bool) {
    let peer_ip = peer.ip().to_canonical();
    let slot = Arc::new(Mutex::new(Slot::default()));
    let result = serve(&gw, &rt, tcp, peer_ip, accepted, over_cap, &slot).await;
    let info = std::mem::take(&mut lock(&slot).info);
    let route = info.route.as_deref().unwrap_or("-");
    let client = info.client_ip.unwrap_or(peer_ip);
    match result {
        Ok(done) => log_session(&gw, &info, client, route, &done),
        Err(reject) => {
            gw.metrics.rejected(reject.label());
            if let Reject::Auth(failure) = &reject {
                gw.admission.auth_failed(client);
                gw.metrics.auth_failure(route, failure.label());
                tracing::warn!(
                    peer = %client,
                    route,
                    reason = failure.label(),
                    token = info.token_fingerprint.as_deref().unwrap_or("-"),
                    "authentication failed"
                );
            } else if reject.is_warning() {
                tracing::warn!(peer = %client, route, reason = reject.label(), detail = %reject, "rejected");
            } else {
                tracing::info!(peer = %client, route, reason = reject.label(), detail = %reject, "rejected");
            }
        }
    }
}

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A finished session.
struct Done {
    outcome: Outcome,
    duration: Duration,
}

fn log_session(gw: &Gateway, info: &Info, client: IpAddr, route: &str, done: &Done) {
    let o = &done.outcome;
    gw.metrics.closed(route, o.code, o.initiator.label());
    if let Some(kind) = o.reason.and_then(|r| r.error_kind()) {
        gw.metrics.error(kind);
    }
    gw.metrics.session_duration(route, done.duration.as_secs_f64());
    tracing::info!(
        peer = %client,
        route,
        sub = info.sub.as_deref().map(escape).as_deref().unwrap_or("-"),
        code = o.code,
        initiator = o.initiator.label(),
        reason = o.reason.and_then(|r| r.error_kind()).unwrap_or(if o.initiator == Initiator::Gateway { "shutdown" } else { "closed" }),
        duration_ms = done.duration.as_millis() as u64,
        bytes_in = o.bytes[0],
        bytes_out = o.bytes[1],
        messages_in = o.messages[0],
        messages_out = o.messages[1],
        "session closed"
    );
}

/// Escape a client-controlled string for a log line (no control characters, no newlines).
pub fn escape(s: &str) -> String {
    s.chars().take(256).flat_map(char::escape_debug).collect()
}

async fn serve(
    gw: &Arc<Gateway>,
    rt: &Arc<Runtime>,
    tcp: TcpStream,
    peer_ip: IpAddr,
    accepted: Instant,
    over_cap: bool,
    slot: &Arc<Mutex<Slot>>,
) -> Result<Done, Reject> {
    let server = &rt.config.server;
    let deadline = accepted + server.handshake_timeout;
    let tls = match tokio::time::timeout_at(deadline, rt.tls.accept(tcp)).await {
        Err(_) => return Err(Reject::HandshakeTimeout),
        Ok(Err(_)) => return Err(Reject::TlsHandshake),
        Ok(Ok(tls)) => tls,
    };

    let ctx = Arc::new(RequestCtx {
        gw: gw.clone(),
        rt: rt.clone(),
        peer_ip,
        over_cap,
        slot: slot.clone(),
    });
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.answer(req).await) }
    });
    // Keep-alive stays on so hyper does not add `close` to the 101's `Connection`
    // header; every refusal carries `Connection: close`, so hyper closes after it and
    // never reads a pipelined second request.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))
        .max_buf_size(server.max_request_head.max(HYPER_MIN_BUF))
        .max_headers(100)
        .half_close(false);
    // The request stage itself is bounded (head timeout, upstream timeout); this guard
    // also bounds writing the answer to a client that never reads it.
    let guard =
        server.handshake_timeout + server.upstream_timeout * rt.config.routes.iter().map(|r| r.upstreams.len()).max().unwrap_or(1) as u32;
    let served = tokio::time::timeout(guard, builder.serve_connection(TokioIo::new(tls), service).with_upgrades()).await;

    let admitted = lock(slot).result.take();
    let admission = match (admitted, served) {
        (Some(Err(reject)), _) => return Err(reject),
        (Some(Ok(admission)), Ok(Ok(()))) => admission,
        (Some(Ok(mut admission)), _) => {
            // Admitted, but the 101 never reached the client: let the upstream know.
            let _ = tokio::time::timeout(server.close_timeout, admission.upstream.ws.close(None)).await;
            return Err(Reject::BadRequest("client left before the upgrade completed"));
        }
        (None, Ok(Err(e))) if e.is_parse_too_large() => return Err(Reject::HeadTooLarge),
        (None, Ok(Err(e))) if e.is_timeout() => return Err(Reject::HandshakeTimeout),
        (None, Ok(Err(e))) if e.is_parse() || e.is_parse_status() => return Err(Reject::BadRequest("unparsable request head")),
        (None, Ok(_)) => return Err(Reject::BadRequest("connection closed without a request")),
        (None, Err(_)) => return Err(Reject::HandshakeTimeout),
    };
    relay_session(gw, rt, admission, accepted).await
}

async fn relay_session(gw: &Arc<Gateway>, rt: &Arc<Runtime>, admission: Admission, accepted: Instant) -> Result<Done, Reject> {
    let Admission {
        route_index,
        upstream,
        on_upgrade,
        expires_at,
        _ip_slot,
    } = admission;
    let mut upstream_ws = upstream.ws;
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(_) => {
            let _ = tokio::time::timeout(rt.config.server.close_timeout, upstream_ws.close(None)).await;
            return Err(Reject::BadRequest("upgrade failed"));
        }
    };
    // Unwrap hyper's boxed IO back to the TLS stream: the relay then reads and writes it
    // directly, with whatever the client sent right behind its request head.
    let parts = upgraded
        .downcast::<TokioIo<TlsStream<TcpStream>>>()
        .map_err(|_| Reject::BadRequest("upgrade failed"))?;
    let mut client_ws =
        WebSocketStream::from_partially_read(parts.io.into_inner(), parts.read_buf.to_vec(), Role::Server, Some(rt.ws_config)).await;
    gw.metrics.handshake_done(accepted.elapsed().as_secs_f64());

    let route = &rt.config.routes[route_index];
    let session_metrics = gw.metrics.session(&route.name);
    session_metrics.active.increment(1.0);
    let started = Instant::now();
    let s = &rt.config.server;
    let l = &rt.config.limits;
    let settings = relay::Settings {
        message_rate: l.message_rate,
        message_burst: l.message_burst,
        rate_abuse_timeout: l.rate_abuse_timeout,
        idle_timeout: s.idle_timeout,
        ping_interval: s.ping_interval,
        close_timeout: s.close_timeout,
    };
    let deadline = expires_at
        .filter(|_| rt.config.jwt.close_on_expiry)
        .map(|exp| (expiry_instant(exp, rt.config.jwt.leeway), CloseReason::TokenExpired));
    let outcome = relay::run(
        &mut client_ws,
        &mut upstream_ws,
        &settings,
        &session_metrics,
        &gw.sessions,
        deadline,
    )
    .await;
    session_metrics.active.decrement(1.0);
    Ok(Done {
        outcome,
        duration: started.elapsed(),
    })
}

/// The monotonic instant at which a token with `exp` (seconds since the epoch) expires, plus `leeway`.
fn expiry_instant(exp: u64, leeway: Duration) -> Instant {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let remaining = (Duration::from_secs(exp) + leeway).saturating_sub(now_unix);
    Instant::now() + remaining.min(Duration::from_secs(10 * 365 * 86400))
}

/// What the request stage needs; shared with hyper's service closure.
struct RequestCtx {
    gw: Arc<Gateway>,
    rt: Arc<Runtime>,
    peer_ip: IpAddr,
    over_cap: bool,
    slot: Arc<Mutex<Slot>>,
}

impl RequestCtx {
    /// hyper's service: answer the one request on this connection.
    async fn answer(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.admit(&mut req).await {
            Ok((resp, admission)) => {
                lock(&self.slot).result = Some(Ok(admission));
                resp
            }
            Err(reject) => {
                let resp = upgrade::refusal(&reject);
                lock(&self.slot).result = Some(Err(reject));
                resp
            }
        }
    }

    fn note(&self, f: impl FnOnce(&mut Info)) {
        f(&mut lock(&self.slot).info)
    }

    /// Stages 5–7 in order; the first refusal wins.
    async fn admit(&self, req: &mut Request<Incoming>) -> Result<(Response<Full<Bytes>>, Admission), Reject> {
        let config: &Config = &self.rt.config;
        let client_ip = client_ip(config, self.peer_ip, req.headers());
        self.note(|i| i.client_ip = Some(client_ip));
        if self.gw.is_draining() {
            return Err(Reject::Draining);
        }
        if self.over_cap {
            return Err(Reject::GlobalConnLimit);
        }
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let route_index = config.route_index(&path).ok_or(Reject::NotFound)?;
        let route = &config.routes[route_index];
        self.note(|i| i.route = Some(route.name.clone()));
        let up = upgrade::validate(req)?;
        upgrade::check_origin(route, req.headers())?;
        if let Some(left) = self.gw.admission.banned(client_ip) {
            return Err(Reject::AuthBanned(left));
        }
        let ip_slot = self.proxied_client_checks(client_ip)?;

        let mut token = None;
        let mut expires_at = None;
        if route.auth == AuthMode::Jwt {
            let verifier = self.rt.verifier.as_ref().ok_or(Reject::Auth(crate::error::AuthFailure::Missing))?;
            let found = verifier
                .find_token(req.headers(), query.as_deref())
                .ok_or(Reject::Auth(crate::error::AuthFailure::Missing))?;
            let fp = fingerprint(&found.token);
            self.note(|i| i.token_fingerprint = Some(fp));
            let identity = verifier.verify(&found.token).map_err(Reject::Auth)?;
            expires_at = identity.exp;
            self.note(|i| i.sub = identity.sub.clone());
            token = Some(found.token);
        }

        let no_sources: &[TokenSource] = &[];
        let facts = ClientFacts {
            ip: client_ip,
            peer: self.peer_ip,
            peer_trusted: is_trusted(config, self.peer_ip),
            path: &path,
            query: query.as_deref(),
            headers: req.headers(),
            forward_token: token.as_deref().filter(|_| route.forward_token),
            token_sources: match (&self.rt.verifier, route.auth) {
                (Some(v), AuthMode::Jwt) => v.sources(),
                _ => no_sources,
            },
        };
        let upstream = self.connect_upstream(route_index, route, &facts).await?;
        let on_upgrade = hyper::upgrade::on(req);
        Ok((
            upgrade::switching_protocols(&up, upstream.protocol.clone()),
            Admission {
                route_index,
                upstream,
                on_upgrade,
                expires_at,
                _ip_slot: ip_slot,
            },
        ))
    }

    /// Firewall and per-IP limits for a client identified by `X-Forwarded-For` behind a
    /// trusted proxy (the TCP peer was checked before TLS in every other case).
    fn proxied_client_checks(&self, client_ip: IpAddr) -> Result<Option<crate::limits::IpSlot>, Reject> {
        if client_ip == self.peer_ip {
            return Ok(None);
        }
        if !self.rt.config.firewall.allows(client_ip) {
            return Err(Reject::Firewall);
        }
        self.gw.admission.admit(client_ip).map(Some)
    }

    /// Try the route's upstreams round robin, each under `upstream_timeout`; the first
    /// that completes its handshake wins.
    async fn connect_upstream(&self, route_index: usize, route: &Route, facts: &ClientFacts<'_>) -> Result<Connected, Reject> {
        let n = route.upstreams.len();
        let start = self.rt.next_upstream[route_index].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut last = Reject::UpstreamUnavailable;
        for i in 0..n {
            let target = &route.upstreams[(start + i) % n];
            let upstream_path = match target {
                crate::config::Upstream::Remote { path, .. } => path.as_deref(),
                crate::config::Upstream::BuiltinEcho => None,
            };
            let url = upstream::url_for(target, &upstream::upstream_path(route, upstream_path, facts));
            let request = upstream::build_request(&url, facts)?;
            let t0 = Instant::now();
            let timeout = self.rt.config.server.upstream_timeout;
            match upstream::connect(
                target,
                self.rt.connectors[route_index].as_ref(),
                request,
                self.rt.ws_config,
                timeout,
            )
            .await
            {
                Ok(c) => {
                    self.gw.metrics.upstream_connect(&route.name, t0.elapsed().as_secs_f64());
                    return Ok(c);
                }
                Err(e) => {
                    tracing::warn!(route = %route.name, upstream = i, reason = e.label(), "upstream attempt failed");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// Whether the TCP peer is one of `trusted_proxies`.
fn is_trusted(config: &Config, peer: IpAddr) -> bool {
    config.server.trusted_proxies.iter().any(|n| n.contains(&peer))
}

/// The client's IP: the peer, or with `client_ip_source = "x_forwarded_for"` and a
/// trusted peer, the right-most `X-Forwarded-For` address that is not a trusted proxy.
fn client_ip(config: &Config, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
    if config.server.client_ip_source != ClientIpSource::XForwardedFor || !is_trusted(config, peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|a| a.to_canonical())
        .collect();
    hops.into_iter().rev().find(|a| !is_trusted(config, *a)).unwrap_or(peer)
}
