//! Stages 5–7 inside hyper's service: route, upgrade validation, Origin, auth,
//! per-user cap, upstream connect. Also the `first_message` variant, where the client
//! authenticates after the 101 and the upstream is connected only then.

use crate::auth::{Identity, fingerprint};
use crate::config::{AuthMode, ClientIpSource, Config, Route, TokenSource};
use crate::conn::{Slot, lock};
use crate::error::{AuthFailure, Reject};
use crate::limits::{IpSlot, UserSlot};
use crate::server::{Gateway, Runtime};
use crate::upgrade;
use crate::upstream::{self, ClientFacts, Connected};
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

/// A client admitted by the request stage, waiting for the 101 to be written.
pub(crate) struct Admission {
    pub(crate) route_index: usize,
    /// `None` while the client still has to send its token as the first message.
    pub(crate) upstream: Option<Connected>,
    pub(crate) on_upgrade: hyper::upgrade::OnUpgrade,
    pub(crate) identity: Option<Identity>,
    pub(crate) pending: Option<PendingRequest>,
    /// The per-IP slot of a client behind a trusted proxy, held for the session.
    pub(crate) ip_slot: Option<IpSlot>,
    pub(crate) user_slot: Option<UserSlot>,
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
    pub(crate) slot: Arc<Mutex<Slot>>,
}

impl RequestCtx {
    /// hyper's service: answer the one request on this connection.
    pub(crate) async fn answer(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.admit(&mut req).await {
            Ok((resp, admission)) => {
                lock(&self.slot).result = Some(Ok(Box::new(admission)));
                resp
            }
            Err(reject) => {
                let resp = upgrade::refusal(&reject);
                lock(&self.slot).result = Some(Err(reject));
                resp
            }
        }
    }

    fn note(&self, f: impl FnOnce(&mut crate::conn::Info)) {
        f(&mut lock(&self.slot).info)
    }

    /// Stages 5–7 in order; the first refusal wins.
    async fn admit(&self, req: &mut Request<Incoming>) -> Result<(Response<Full<Bytes>>, Admission), Reject> {
        let config: &Config = &self.rt.config;
        let client_ip = client_ip(config, self.peer_ip, req.headers())?;
        self.note(|i| i.client_ip = Some(client_ip));
        if self.gw.is_draining() {
            return Err(Reject::Draining);
        }
        if self.over_cap {
            return Err(Reject::GlobalConnLimit);
        }
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        upgrade::check_path(&path)?;
        let route_index = config.route_index(&path).ok_or(Reject::NotFound)?;
        let route = &config.routes[route_index];
        self.note(|i| i.route = Some(route.name.clone()));
        let up = upgrade::validate(req)?;
        upgrade::check_origin(route, req.headers())?;
        if let Some(left) = self.gw.admission().banned(client_ip) {
            return Err(Reject::AuthBanned(left));
        }
        let ip_slot = self.proxied_client_checks(client_ip)?;

        let mut identity = None;
        let mut token = None;
        let mut user_slot = None;
        if route.auth == AuthMode::Jwt {
            let verifier = self.rt.verifier.as_ref().ok_or(Reject::Auth(AuthFailure::Missing))?;
            match verifier.find_token(req.headers(), query.as_deref()) {
                Some(found) => {
                    self.note(|i| i.token_fingerprint = Some(fingerprint(&found.token)));
                    let id = verifier.verify(&found.token).await.map_err(Reject::Auth)?;
                    self.note(|i| i.sub = id.sub.clone());
                    user_slot = authorize(&self.gw, config, route, &id)?;
                    identity = Some(id);
                    token = Some(found.token);
                }
                None if verifier.sources().contains(&TokenSource::FirstMessage) => {
                    // Answer the 101 now; the token comes as the first message.
                    let pending = PendingRequest {
                        path,
                        query,
                        headers: req.headers().clone(),
                        client_ip,
                        peer_ip: self.peer_ip,
                    };
                    let on_upgrade = hyper::upgrade::on(req);
                    let admission = Admission {
                        route_index,
                        upstream: None,
                        on_upgrade,
                        identity: None,
                        pending: Some(pending),
                        ip_slot,
                        user_slot: None,
                    };
                    return Ok((upgrade::switching_protocols(&up, None), admission));
                }
                None => return Err(Reject::Auth(AuthFailure::Missing)),
            }
        }

        let facts = facts(
            &self.rt,
            route,
            client_ip,
            self.peer_ip,
            &path,
            query.as_deref(),
            req.headers(),
            token.as_deref(),
            identity.as_ref(),
        );
        let upstream = connect_upstream(&self.gw, &self.rt, route_index, &facts).await?;
        let on_upgrade = hyper::upgrade::on(req);
        let resp = upgrade::switching_protocols(&up, upstream.protocol.clone());
        Ok((
            resp,
            Admission {
                route_index,
                upstream: Some(upstream),
                on_upgrade,
                identity,
                pending: None,
                ip_slot,
                user_slot,
            },
        ))
    }

    /// Firewall and per-IP limits for a client identified by `X-Forwarded-For` behind a
    /// trusted proxy (the TCP peer was checked before TLS in every other case).
    fn proxied_client_checks(&self, client_ip: IpAddr) -> Result<Option<IpSlot>, Reject> {
        if client_ip == self.peer_ip {
            return Ok(None);
        }
        if !self.rt.config.firewall.allows(client_ip) {
            return Err(Reject::Firewall);
        }
        self.gw.admission().admit(client_ip).map(Some)
    }
}

/// Route claims and the per-user cap, after the token verified.
fn authorize(gw: &Gateway, config: &Config, route: &Route, id: &Identity) -> Result<Option<UserSlot>, Reject> {
    if !crate::auth::claims_grant(&route.require_claims, &id.claims) {
        return Err(Reject::Auth(AuthFailure::Forbidden));
    }
    match &id.sub {
        Some(sub) => gw
            .users
            .acquire(sub, config.limits.max_connections_per_user)
            .map(Some)
            .ok_or(Reject::UserConnLimit),
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
    identity: Option<&'a Identity>,
) -> ClientFacts<'a> {
    let jwt = route.auth == AuthMode::Jwt;
    ClientFacts {
        ip: client_ip,
        peer: peer_ip,
        peer_trusted: is_trusted(&rt.config, peer_ip),
        path,
        query,
        headers,
        forward_token: token.filter(|_| route.forward_token),
        token_sources: match &rt.verifier {
            Some(v) if jwt => v.sources(),
            _ => &[],
        },
        claims: identity.map(|i| &i.claims),
        forward_claims: &route.forward_claims,
    }
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
    slot: &Mutex<Slot>,
) -> Result<(Connected, Option<Identity>, Option<UserSlot>), Reject> {
    let route = &rt.config.routes[route_index];
    let result = async {
        let verifier = rt.verifier.as_ref().ok_or(Reject::Auth(AuthFailure::Missing))?;
        let wait = rt.config.jwt.first_message_timeout;
        let text = match tokio::time::timeout(wait, client.first_text(MAX_TOKEN_MESSAGE)).await {
            Ok(Some(t)) => t,
            _ => return Err(Reject::Auth(AuthFailure::Missing)),
        };
        let token = crate::auth::token_from_message(&text).ok_or(Reject::Auth(AuthFailure::Malformed))?;
        lock(slot).info.token_fingerprint = Some(fingerprint(&token));
        let id = verifier.verify(&token).await.map_err(Reject::Auth)?;
        lock(slot).info.sub = id.sub.clone();
        let user_slot = authorize(gw, &rt.config, route, &id)?;
        let facts = facts(
            rt,
            route,
            pending.client_ip,
            pending.peer_ip,
            &pending.path,
            pending.query.as_deref(),
            &pending.headers,
            Some(&token),
            Some(&id),
        );
        let upstream = connect_upstream(gw, rt, route_index, &facts).await?;
        Ok((upstream, Some(id), user_slot))
    }
    .await;
    if let Err(reject) = &result {
        let (code, reason) = match reject {
            Reject::UpstreamUnavailable | Reject::UpstreamTimeout => (1011, "upstream unavailable"),
            Reject::UpstreamRefused(_) => (1008, "refused by the application"),
            Reject::UserConnLimit => (1008, "too many sessions for this user"),
            _ => (1008, "authentication failed"),
        };
        let _ = tokio::time::timeout(rt.config.server.close_timeout, client.close(Some((code, reason)))).await;
    }
    result
}

/// Whether the TCP peer is one of `trusted_proxies`.
fn is_trusted(config: &Config, peer: IpAddr) -> bool {
    config.server.trusted_proxies.iter().any(|n| n.contains(&peer))
}

/// The client's IP: the peer, or with `client_ip_source = "x_forwarded_for"` and a
/// trusted peer, the right-most `X-Forwarded-For` hop that is not a trusted proxy. Every
/// header line counts (joined in order); a hop may be `ip`, `ip:port`, `[v6]` or
/// `[v6]:port`. An unparsable right-most untrusted hop (`unknown`, garbage) is a 400,
/// never skipped, and a trusted proxy's own address is never taken as the client's: a
/// trusted peer that names no untrusted hop is refused too.
/// Public for tests (`tests/properties.rs`).
pub fn client_ip(config: &Config, peer: IpAddr, headers: &HeaderMap) -> Result<IpAddr, Reject> {
    if config.server.client_ip_source != ClientIpSource::XForwardedFor || !is_trusted(config, peer) {
        return Ok(peer);
    }
    let mut lines = headers.get_all("x-forwarded-for").iter().peekable();
    if lines.peek().is_none() {
        return Err(Reject::BadRequest("no X-Forwarded-For from a trusted proxy"));
    }
    let mut hops = Vec::new();
    for line in lines {
        let line = line.to_str().map_err(|_| Reject::BadRequest("unreadable X-Forwarded-For"))?;
        hops.extend(line.split(','));
    }
    for hop in hops.iter().rev() {
        let ip = parse_hop(hop).ok_or(Reject::BadRequest("unparsable X-Forwarded-For hop"))?;
        if !is_trusted(config, ip) {
            return Ok(ip);
        }
    }
    Err(Reject::BadRequest("X-Forwarded-For names only trusted proxies"))
}

/// One `X-Forwarded-For` hop: `ip`, `ip:port`, `[v6]` or `[v6]:port`, canonical.
/// Public for tests (`tests/properties.rs`).
pub fn parse_hop(hop: &str) -> Option<IpAddr> {
    let h = hop.trim();
    let ip = h
        .parse::<IpAddr>()
        .ok()
        .or_else(|| h.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            h.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml_str(
            "[server]\nclient_ip_source = \"x_forwarded_for\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::1/128\"]\n",
            "t",
        )
        .unwrap()
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", l.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_hops_are_parsed_joined_and_never_skipped() {
        let c = config();
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let ip = |lines: &[&str]| client_ip(&c, proxy, &xff(lines));
        assert_eq!(ip(&["198.51.100.7"]).unwrap(), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            ip(&["198.51.100.7:4711, 10.0.0.2"]).unwrap(),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(ip(&["[2001:db8::1]:443"]).unwrap(), "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(ip(&["[2001:db8::2]"]).unwrap(), "2001:db8::2".parse::<IpAddr>().unwrap());
        assert_eq!(ip(&["::ffff:198.51.100.9"]).unwrap(), "198.51.100.9".parse::<IpAddr>().unwrap());
        // A proxy that appends a second line: the right-most untrusted hop is on it.
        assert_eq!(ip(&["6.6.6.6", "198.51.100.8"]).unwrap(), "198.51.100.8".parse::<IpAddr>().unwrap());
        for bad in [
            &["unknown"][..],
            &["198.51.100.7, garbage"],
            &["10.0.0.3"],
            &[""],
            &["1.2.3.4, unknown, 10.0.0.2"],
        ] {
            assert!(matches!(ip(bad), Err(Reject::BadRequest(_))), "{bad:?}");
        }
        assert!(matches!(client_ip(&c, proxy, &HeaderMap::new()), Err(Reject::BadRequest(_))));
        // An untrusted peer's header is ignored.
        let direct: IpAddr = "192.0.2.5".parse().unwrap();
        assert_eq!(client_ip(&c, direct, &xff(&["unknown"])).unwrap(), direct);
    }
}
