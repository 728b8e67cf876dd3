//! Stages 5–7 inside hyper's service: route, upgrade validation, Origin, auth,
//! per-user cap, upstream connect. Also the `first_message` variant, where the client
//! authenticates after the 101 and the upstream is connected only then.
//!
//! The request stage reports to the connection through a shared [`Verdict`]: what it
//! learned about the client ([`Info`], for the log line) and the outcome.

use crate::auth::{Identity, fingerprint};
use crate::config::{AuthMode, Config, Route, TokenSource};
use crate::error::{AuthFailure, Reject};
use crate::gateway::{Gateway, Runtime};
use crate::limits::{IpSlot, UserSlot};

/// One session of a user, held for the session: the local count and, in cluster mode,
/// the lease that counts it across instances (both given back when dropped).
pub(crate) struct UserHold {
    _local: UserSlot,
    _lease: Option<crate::cluster::Lease>,
}

/// In cluster mode, the per-IP rate and cap across instances for `ip` (the local ones
/// have passed): one Redis call within `cluster.timeout`, before the 101. Without an
/// answer in time the local limits decide.
async fn hold_ip(
    gw: &Gateway,
    config: &Config,
    ip: IpAddr,
    started: Option<SharedIpCheck>,
) -> Result<Option<crate::cluster::Lease>, Reject> {
    let Some(c) = &gw.cluster else { return Ok(None) };
    let a = &config.limits.admission;
    let answer = match started {
        // Started with the TLS handshake: usually answered by now.
        Some(task) => task.await.unwrap_or(Err(())),
        None => {
            let label = gw.per_ip().key(ip).label();
            c.acquire_ip(&label, a.max_connections_per_ip, a.connection_rate, a.connection_burst, &gw.metrics)
                .await
        }
    };
    match answer {
        Ok(crate::cluster::IpAnswer::Taken(lease)) => Ok(Some(lease)),
        Ok(crate::cluster::IpAnswer::RateLimited) => Err(Reject::RateLimited),
        Ok(crate::cluster::IpAnswer::Full) => Err(Reject::IpConnLimit),
        Err(()) if c.on_failure == crate::config::OnFailure::Local => {
            // Alone, this instance holds its share of the cap (this connection counted)
            // and of the rate (a connection costs as many cells as there are instances).
            if gw.per_ip().open_count(ip) > c.local_share(a.max_connections_per_ip) {
                return Err(Reject::IpConnLimit);
            }
            if !gw.per_ip().charge_more(ip, c.live_instances() - 1) {
                return Err(Reject::RateLimited);
            }
            Ok(None)
        }
        Err(()) => unanswered(c),
    }
}

/// Redis could not be asked: `on_failure` decides (`local` and `open`: the instance's own
/// limits, which have passed; `closed`: 503).
fn unanswered<T>(c: &crate::cluster::Cluster) -> Result<Option<T>, Reject> {
    match c.on_failure {
        crate::config::OnFailure::Local | crate::config::OnFailure::Open => Ok(None),
        crate::config::OnFailure::Closed => Err(Reject::GlobalConnLimit),
    }
}

/// Take one of `sub`'s sessions: the local cap first (no Redis call when it is full),
/// then, in cluster mode, the cap across instances within `cluster.timeout`. When Redis
/// does not answer in time the local cap decides (the session is counted in Redis by the
/// next heartbeat).
async fn hold_user(gw: &Gateway, config: &Config, sub: &str) -> Result<UserHold, Reject> {
    let max = config.limits.max_connections_per_user;
    let local = gw.users.acquire(&sub.to_string(), max).ok_or(Reject::UserConnLimit)?;
    let lease = match &gw.cluster {
        None => None,
        Some(c) => match c.acquire_user(sub, max, &gw.metrics).await {
            Ok(Some(lease)) => Some(lease),
            Ok(None) => return Err(Reject::UserConnLimit),
            // Alone, this instance holds its share of the cap (this session counted).
            Err(()) if c.on_failure == crate::config::OnFailure::Local => {
                if gw.users.count(&sub.to_string()) > c.local_share(max) {
                    return Err(Reject::UserConnLimit);
                }
                None
            }
            Err(()) => unanswered(c)?,
        },
    };
    Ok(UserHold {
        _local: local,
        _lease: lease,
    })
}
use crate::tls::ClientCert;
use crate::upgrade::{self, Upgrade};
use crate::upstream::{self, ClientFacts, Connected};
use crate::util::lock;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};

/// What the connection learned, for its one log line.
#[derive(Default)]
pub(crate) struct Info {
    pub(crate) route: Option<String>,
    pub(crate) sub: Option<String>,
    pub(crate) token_fingerprint: Option<String>,
    pub(crate) client_ip: Option<IpAddr>,
}

/// Shared between the connection and hyper's service: what the request stage decided.
#[derive(Default)]
pub(crate) struct Verdict {
    pub(crate) info: Info,
    pub(crate) result: Option<Result<Box<Admitted>, Reject>>,
}

/// A client admitted by the request stage, waiting for the 101 to be written.
pub(crate) struct Admitted {
    pub(crate) route_index: usize,
    /// `None` while the client still has to send its token as the first message.
    pub(crate) upstream: Option<Connected>,
    pub(crate) on_upgrade: hyper::upgrade::OnUpgrade,
    pub(crate) identity: Option<Identity>,
    /// The verified client certificate, if the client presented one.
    pub(crate) cert: Option<Arc<ClientCert>>,
    pub(crate) pending: Option<PendingRequest>,
    /// The per-IP slot of a client behind a trusted proxy, held for the session.
    pub(crate) ip_slot: Option<IpSlot>,
    /// In cluster mode, the client's place under the per-IP cap across instances.
    pub(crate) ip_lease: Option<crate::cluster::Lease>,
    pub(crate) user_slot: Option<UserHold>,
}

/// What the upstream request needs when it is built after the 101 (`first_message`).
pub(crate) struct PendingRequest {
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    client_ip: IpAddr,
    peer_ip: IpAddr,
}

/// What the request stage needs; shared with hyper's service closure.
pub(crate) struct RequestCtx {
    pub(crate) gw: Arc<Gateway>,
    pub(crate) rt: Arc<Runtime>,
    pub(crate) peer_ip: IpAddr,
    pub(crate) over_cap: bool,
    pub(crate) verdict: Arc<Mutex<Verdict>>,
    /// The client certificate the TLS handshake verified.
    pub(crate) cert: Option<Arc<ClientCert>>,
    /// Cluster mode: the shared per-IP check of the TCP peer, started with the TLS
    /// handshake (see [`start_shared_ip_check`]).
    pub(crate) shared_ip: Mutex<Option<SharedIpCheck>>,
}

/// A shared per-IP check in flight.
pub(crate) type SharedIpCheck = tokio::task::JoinHandle<Result<crate::cluster::IpAnswer, ()>>;

/// In cluster mode, start the shared per-IP check of `peer` now, so that it runs while
/// TLS is negotiated; the request stage waits for its answer before the 101. `None`
/// without a cluster, or when the client is named later by `X-Forwarded-For`. (A task
/// whose answer is never read, after a failed handshake, drops its lease: given back.)
pub(crate) fn start_shared_ip_check(gw: &Arc<Gateway>, rt: &Runtime, peer: IpAddr) -> Option<SharedIpCheck> {
    let cluster = gw.cluster.clone()?;
    let server = &rt.config.server;
    if server.client_ip_source == crate::config::ClientIpSource::XForwardedFor && server.is_trusted_proxy(peer) {
        return None;
    }
    let a = rt.config.limits.admission.clone();
    let label = gw.per_ip().key(peer).label();
    let gw = gw.clone();
    Some(tokio::spawn(async move {
        cluster
            .acquire_ip(&label, a.max_connections_per_ip, a.connection_rate, a.connection_burst, &gw.metrics)
            .await
    }))
}

/// The request after the checks that need no token: routed, validated, the client's
/// per-IP slot held.
struct Checked {
    route_index: usize,
    path: String,
    query: Option<String>,
    client_ip: IpAddr,
    upgrade: Upgrade,
    ip_slot: Option<IpSlot>,
}

/// The auth stage's outcome.
enum Authenticated {
    /// A route with `auth = "none"`.
    Open,
    /// A route with `auth = "mtls"`: the certificate names the user.
    Cert { sub: String, user_slot: Option<UserHold> },
    /// A verified token, and the user's session slot.
    Token {
        identity: Identity,
        token: String,
        user_slot: Option<UserHold>,
    },
    /// No token in the request; it is to come as the first message after the 101.
    FirstMessage,
}

type Answer = (Response<Full<Bytes>>, Admitted);

impl RequestCtx {
    /// hyper's service: answer the one request on this connection.
    pub(crate) async fn answer(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.admit(&mut req).await {
            Ok((resp, admitted)) => {
                lock(&self.verdict).result = Some(Ok(Box::new(admitted)));
                resp
            }
            Err(reject) => {
                let resp = upgrade::refusal(&reject);
                lock(&self.verdict).result = Some(Err(reject));
                resp
            }
        }
    }

    fn note(&self, f: impl FnOnce(&mut Info)) {
        f(&mut lock(&self.verdict).info)
    }

    /// Stages 5–7 in order; the first refusal wins.
    async fn admit(&self, req: &mut Request<Incoming>) -> Result<Answer, Reject> {
        let checked = self.check(req)?;
        let started = lock(&self.shared_ip).take().filter(|_| checked.client_ip == self.peer_ip);
        let ip_lease = hold_ip(&self.gw, &self.rt.config, checked.client_ip, started).await?;
        let route = &self.rt.config.routes[checked.route_index];
        let mut cert_sub = None;
        let (identity, token, user_slot) = match self.authenticate(route, req, checked.query.as_deref()).await? {
            Authenticated::Open => (None, None, None),
            Authenticated::Cert { sub, user_slot } => {
                cert_sub = Some(sub);
                (None, None, user_slot)
            }
            Authenticated::Token {
                identity,
                token,
                user_slot,
            } => (Some(identity), Some(token), user_slot),
            Authenticated::FirstMessage => {
                return Ok(first_message_pending(req, checked, ip_lease, self.peer_ip, self.cert.clone()));
            }
        };
        let cert_claims = cert_sub.map(sub_claims);
        let facts = facts(
            &self.rt,
            route,
            checked.client_ip,
            self.peer_ip,
            &checked.path,
            checked.query.as_deref(),
            req.headers(),
            token.as_deref(),
            identity.as_ref().map(|i| &i.claims).or(cert_claims.as_ref()),
            self.cert.as_deref(),
        );
        let upstream = connect_upstream(&self.gw, &self.rt, checked.route_index, &facts).await?;
        let resp = upgrade::switching_protocols(&checked.upgrade, upstream.protocol.clone());
        let admitted = Admitted {
            route_index: checked.route_index,
            upstream: Some(upstream),
            on_upgrade: hyper::upgrade::on(req),
            identity,
            cert: self.cert.clone(),
            pending: None,
            ip_slot: checked.ip_slot,
            ip_lease,
            user_slot,
        };
        Ok((resp, admitted))
    }

    /// The checks that need no token, cheapest first: client address, drain and cap,
    /// path, route, upgrade headers, Origin, ban, per-IP limits behind a proxy.
    fn check(&self, req: &Request<Incoming>) -> Result<Checked, Reject> {
        let config: &Config = &self.rt.config;
        let client_ip = upgrade::client_ip(config, self.peer_ip, req.headers())?;
        self.note(|i| i.client_ip = Some(client_ip));
        if self.gw.is_draining() {
            return Err(Reject::Draining);
        }
        if self.over_cap {
            return Err(Reject::GlobalConnLimit);
        }
        let path = req.uri().path().to_string();
        upgrade::check_path(&path)?;
        let route_index = config.route_index(&path).ok_or(Reject::NotFound)?;
        let route = &config.routes[route_index];
        self.note(|i| i.route = Some(route.name.clone()));
        let upgrade = upgrade::validate(req)?;
        upgrade::check_origin(route, req.headers())?;
        if let Some(left) = self.gw.per_ip().banned(client_ip) {
            return Err(Reject::AuthBanned(left));
        }
        // The TCP peer passed the pre-TLS checks; a client a trusted proxy names by
        // `X-Forwarded-For` gets them now.
        let ip_slot = if client_ip == self.peer_ip {
            None
        } else {
            Some(self.gw.check_client(&self.rt, client_ip)?)
        };
        Ok(Checked {
            route_index,
            path,
            query: req.uri().query().map(str::to_string),
            client_ip,
            upgrade,
            ip_slot,
        })
    }

    /// Stage 6: the client certificate the route needs, then the token: found, verified,
    /// bound to the certificate when it says so; then the route's claims and the user cap.
    async fn authenticate(&self, route: &Route, req: &Request<Incoming>, query: Option<&str>) -> Result<Authenticated, Reject> {
        if route.auth.uses_cert() && self.cert.is_none() {
            return Err(Reject::ClientCert);
        }
        match route.auth {
            AuthMode::None => return Ok(Authenticated::Open),
            AuthMode::Mtls => {
                // `uses_cert` above: the certificate is there; it must name someone.
                let sub = self.cert.as_ref().and_then(|c| c.identity()).ok_or(Reject::ClientCert)?.to_string();
                self.note(|i| i.sub = Some(sub.clone()));
                let user_slot = hold_user(&self.gw, &self.rt.config, &sub).await?;
                return Ok(Authenticated::Cert {
                    sub,
                    user_slot: Some(user_slot),
                });
            }
            AuthMode::Jwt | AuthMode::JwtMtls => {}
        }
        let verifier = self.rt.verifier.as_ref().ok_or(Reject::Auth(AuthFailure::Missing))?;
        let Some(found) = verifier.find_token(req.headers(), query) else {
            if verifier.sources().contains(&TokenSource::FirstMessage) {
                return Ok(Authenticated::FirstMessage);
            }
            return Err(Reject::Auth(AuthFailure::Missing));
        };
        self.note(|i| i.token_fingerprint = Some(fingerprint(&found.token)));
        let identity = verifier.verify(&found.token).await.map_err(Reject::Auth)?;
        self.note(|i| i.sub = identity.sub.clone());
        crate::auth::check_binding(&identity.claims, self.cert.as_deref()).map_err(Reject::Auth)?;
        let user_slot = authorize(&self.gw, &self.rt.config, route, &identity).await?;
        Ok(Authenticated::Token {
            identity,
            token: found.token,
            user_slot,
        })
    }
}

/// Answer the 101 now; the token comes as the first message, and the upstream is
/// connected only after it verifies.
fn first_message_pending(
    req: &mut Request<Incoming>,
    checked: Checked,
    ip_lease: Option<crate::cluster::Lease>,
    peer_ip: IpAddr,
    cert: Option<Arc<ClientCert>>,
) -> Answer {
    let resp = upgrade::switching_protocols(&checked.upgrade, None);
    let pending = PendingRequest {
        path: checked.path,
        query: checked.query,
        headers: req.headers().clone(),
        client_ip: checked.client_ip,
        peer_ip,
    };
    let admitted = Admitted {
        route_index: checked.route_index,
        upstream: None,
        on_upgrade: hyper::upgrade::on(req),
        identity: None,
        cert,
        pending: Some(pending),
        ip_slot: checked.ip_slot,
        ip_lease,
        user_slot: None,
    };
    (resp, admitted)
}

/// Route claims and the per-user cap, after the token verified.
async fn authorize(gw: &Gateway, config: &Config, route: &Route, id: &Identity) -> Result<Option<UserHold>, Reject> {
    // Revoked through the admin API (the file's list is checked by the verifier).
    if gw.incidents.is_revoked(crate::auth::jti_text(&id.claims).as_deref()) {
        return Err(Reject::Auth(AuthFailure::Revoked));
    }
    if !crate::auth::claims_grant(&route.require_claims, &id.claims) {
        return Err(Reject::Auth(AuthFailure::Forbidden));
    }
    match &id.sub {
        Some(sub) => hold_user(gw, config, sub).await.map(Some),
        None => Ok(None),
    }
}

#[allow(clippy::too_many_arguments)]
fn facts<'a>(
    rt: &'a Runtime,
    route: &'a Route,
    client_ip: IpAddr,
    peer_ip: IpAddr,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
    token: Option<&'a str>,
    claims: Option<&'a serde_json::Map<String, serde_json::Value>>,
    cert: Option<&'a ClientCert>,
) -> ClientFacts<'a> {
    // An `mtls` route reads no token, but removes every copy before the upstream: an
    // unverified token must not travel next to the identity the gateway vouches for.
    let strips_tokens = route.auth != crate::config::AuthMode::None;
    ClientFacts {
        ip: client_ip,
        peer: peer_ip,
        peer_trusted: rt.config.server.is_trusted_proxy(peer_ip),
        path,
        query,
        headers,
        forward_token: token.filter(|_| route.forward_token),
        token_sources: if strips_tokens { &rt.config.jwt.token_sources } else { &[] },
        claims,
        cert,
        forward_claims: &route.forward_claims,
        identity_headers: &rt.identity_headers,
    }
}

/// The claims an `mtls` route forwards: the certificate's identity as `sub`.
fn sub_claims(sub: String) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("sub".to_string(), serde_json::Value::String(sub));
    m
}

/// Try the route's upstreams round robin, each under `upstream_timeout`; the first
/// that completes its handshake wins.
async fn connect_upstream(gw: &Gateway, rt: &Runtime, route_index: usize, facts: &ClientFacts<'_>) -> Result<Connected, Reject> {
    let route = &rt.config.routes[route_index];
    let n = route.upstreams.len();
    let start = rt.next_upstream[route_index].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut last = Reject::UpstreamUnavailable;
    for i in 0..n {
        let idx = (start + i) % n;
        let health = &rt.health[route_index][idx];
        if health.is_down() {
            continue; // in back-off after repeated failures
        }
        let target = &route.upstreams[idx];
        let upstream_path = match target {
            crate::config::Upstream::Remote { path, .. } => path.as_deref(),
            crate::config::Upstream::BuiltinEcho => None,
        };
        let url = upstream::url_for(target, &upstream::upstream_path(route, upstream_path, facts));
        let request = upstream::build_request(&url, facts)?;
        let t0 = Instant::now();
        let timeout = rt.config.server.upstream_timeout;
        match upstream::connect(target, rt.connectors[route_index].as_ref(), request, rt.ws_config, timeout).await {
            Ok(c) => {
                health.succeeded();
                gw.metrics.upstream_connect(&route.name, t0.elapsed().as_secs_f64());
                return Ok(c);
            }
            // A 4xx is the application's answer to this client, not a fault of the
            // upstream: no failover, no back-off, passed through.
            Err(e @ Reject::UpstreamRefused(_)) => {
                tracing::info!(route = %route.name, upstream = idx, reason = e.label(), "upstream refused the upgrade");
                return Err(e);
            }
            Err(e) => {
                health.failed();
                tracing::warn!(route = %route.name, upstream = idx, reason = e.label(), "upstream attempt failed");
                last = e;
            }
        }
    }
    Err(last)
}

/// Largest `first_message` token message.
const MAX_TOKEN_MESSAGE: usize = 16 * 1024;

/// The `first_message` flow after the 101: wait for the token, verify it, then connect
/// the upstream. Any failure closes the client with 1008 (auth) or 1011 (upstream).
pub(crate) async fn first_message<S: AsyncRead + AsyncWrite + Unpin>(
    gw: &Gateway,
    rt: &Runtime,
    route_index: usize,
    client: &mut crate::relay::Endpoint<S>,
    pending: PendingRequest,
    cert: Option<&ClientCert>,
    verdict: &Mutex<Verdict>,
) -> Result<(Connected, Option<Identity>, Option<UserHold>), Reject> {
    let route = &rt.config.routes[route_index];
    let result = async {
        let verifier = rt.verifier.as_ref().ok_or(Reject::Auth(AuthFailure::Missing))?;
        let wait = rt.config.jwt.first_message_timeout;
        let l = &rt.config.limits;
        let first = client.first_text(MAX_TOKEN_MESSAGE, l.message_rate, l.message_burst);
        let text = match tokio::time::timeout(wait, first).await {
            Ok(Some(t)) => t,
            _ => return Err(Reject::Auth(AuthFailure::Missing)),
        };
        let token = crate::auth::token_from_message(&text).ok_or(Reject::Auth(AuthFailure::Malformed))?;
        lock(verdict).info.token_fingerprint = Some(fingerprint(&token));
        let id = verifier.verify(&token).await.map_err(Reject::Auth)?;
        lock(verdict).info.sub = id.sub.clone();
        crate::auth::check_binding(&id.claims, cert).map_err(Reject::Auth)?;
        let user_slot = authorize(gw, &rt.config, route, &id).await?;
        let facts = facts(
            rt,
            route,
            pending.client_ip,
            pending.peer_ip,
            &pending.path,
            pending.query.as_deref(),
            &pending.headers,
            Some(&token),
            Some(&id.claims),
            cert,
        );
        let upstream = connect_upstream(gw, rt, route_index, &facts).await?;
        Ok((upstream, Some(id), user_slot))
    }
    .await;
    if let Err(reject) = &result {
        let close = reject.close_after_upgrade();
        let _ = tokio::time::timeout(rt.config.server.close_timeout, client.close(Some(close))).await;
    }
    result
}
