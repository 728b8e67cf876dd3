//! The upstream of an admitted client: what its request carries ([`facts`]), and
//! choosing and connecting one of the route's upstreams ([`connect`]).

use crate::auth::Principal;
use crate::config::{AuthMode, Route, Upstream};
use crate::error::Reject;
use crate::gateway::{Gateway, Runtime};
use crate::tls::ClientCert;
use crate::upstream::{self, ClientFacts, Connected};
use http::HeaderMap;
use std::net::IpAddr;
use tokio::time::Instant;

/// What the upstream request is built from. `(client, peer)` addresses, `(path, query)`.
pub(super) fn facts<'a>(
    rt: &'a Runtime,
    route: &'a Route,
    (client_ip, peer_ip): (IpAddr, IpAddr),
    (path, query): (&'a str, Option<&'a str>),
    headers: &'a HeaderMap,
    principal: Option<&'a Principal>,
    cert: Option<&'a ClientCert>,
) -> ClientFacts<'a> {
    // An `mtls` route reads no token, but removes every copy before the upstream: an
    // unverified token must not travel next to the identity the gateway vouches for.
    // A forward route's app reads its own session cookie: nothing is stripped for it.
    let strips_tokens = !matches!(route.auth, AuthMode::None | AuthMode::Forward);
    let token = principal.and_then(|p| p.credential.token.as_deref());
    ClientFacts {
        ip: client_ip,
        peer: peer_ip,
        peer_trusted: rt.config.server.is_trusted_proxy(peer_ip),
        path,
        query,
        headers,
        forward_token: token.filter(|_| route.forward_token),
        token_sources: if strips_tokens { rt.config.token_sources_of(route) } else { &[] },
        claims: principal.map(|p| &*p.claims),
        cert,
        forward_claims: &route.forward_claims,
        identity_headers: &rt.identity_headers,
        request_id: None,
        gateway_cookie: route.sticky_cookie.as_deref(),
        copied: principal
            .and_then(|p| p.credential.forward.as_deref())
            .map_or(&[], |f| f.copies.as_slice()),
    }
}

/// The upstream a request's sticky cookie names, when the route is `sticky` and the
/// cookie is valid.
pub(super) fn sticky_choice(rt: &Runtime, route_index: usize, headers: &HeaderMap) -> Option<usize> {
    let route = &rt.config.routes[route_index];
    let name = route.sticky_cookie.as_deref()?;
    rt.balancers[route_index].read_cookie(crate::balance::cookie(headers, name)?)
}

/// `Set-Cookie` for a `sticky` route whose client was not already on upstream `index`.
pub(super) fn sticky_cookie(rt: &Runtime, route_index: usize, had: Option<usize>, index: usize, secure: bool) -> Option<http::HeaderValue> {
    let name = rt.config.routes[route_index].sticky_cookie.as_deref()?;
    if had == Some(index) {
        return None;
    }
    let value = rt.balancers[route_index].cookie_value(index)?;
    let secure = if secure { "; Secure" } else { "" };
    http::HeaderValue::from_str(&format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax{secure}")).ok()
}

/// The answer so far once an upstream that is out is skipped: 502 when it is out only
/// in back-off after its own transport failures, as when it was last tried (DESIGN.md
/// section 5); a drained or checked-down one leaves `last` (503 when every one is out).
fn skipped(health: &crate::health::Health, last: Reject) -> Reject {
    if health.is_drained() || health.is_checked_down() {
        last
    } else {
        Reject::UpstreamUnavailable
    }
}

/// Try the route's upstreams in the balancer's order (`sticky`: the cookie's first),
/// skipping those down or drained (all of them: [`Reject::NoUpstream`], 503, or 502
/// when one is out only for its transport failures), each
/// under `upstream_timeout`; the first that completes its handshake wins, and
/// its session is counted on it.
pub(super) async fn connect(gw: &Gateway, rt: &Runtime, route_index: usize, facts: &ClientFacts<'_>) -> Result<Connected, Reject> {
    let route = &rt.config.routes[route_index];
    let balancer = &rt.balancers[route_index];
    // Every upstream out (down, in back-off, drained): 503, nothing tried.
    let mut last = Reject::NoUpstream;
    for idx in balancer.order(sticky_choice(rt, route_index, facts.headers)) {
        let health = &rt.health[route_index][idx];
        if !health.is_available() {
            last = skipped(health, last);
            continue;
        }
        let target = &route.upstreams[idx];
        let upstream_path = match target {
            Upstream::Remote { path, .. } => path.as_deref(),
            Upstream::BuiltinEcho => None,
        };
        let url = upstream::url_for(target, &upstream::upstream_path(route, upstream_path, facts));
        let mut request = upstream::build_request(&url, facts)?;
        let room = crate::relay::deflate::deflate_memory(crate::extension::MAX_WINDOW_BITS) + crate::relay::deflate::INFLATE_MEMORY;
        if route.compression.upstream && gw.compression.has_room(room) {
            // Each hop negotiates on its own: the client's offer never goes upstream.
            let offer = crate::extension::upstream_offer(route.compression.context_takeover);
            request.headers_mut().insert(http::header::SEC_WEBSOCKET_EXTENSIONS, offer);
        }
        let t0 = Instant::now();
        let timeout = rt.config.server.upstream_timeout;
        match upstream::connect(target, rt.connectors[route_index].as_ref(), request, rt.ws_config, timeout).await {
            Ok(mut c) => {
                health.succeeded();
                gw.metrics.upstream_connect(&route.name, t0.elapsed().as_secs_f64());
                c.load = balancer.hold(idx);
                c.drain = Some(Box::new(health.watch()));
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

/// A connection to one of an `http` route's upstreams for a plain request, in the
/// balancer's order (`sticky`: the one `sticky` names first), skipping upstreams that
/// are down or drained (all of them: [`Reject::NoUpstream`], 503); a connect failure tries the next (nothing was sent yet). `None`: the
/// built-in echo answers. The request is counted on its upstream while it runs.
pub(super) async fn checkout_http(
    rt: &Runtime,
    route_index: usize,
    sticky: Option<usize>,
) -> Result<(usize, Option<crate::proxy::Lease>), Reject> {
    let route = &rt.config.routes[route_index];
    let Some(policy) = &route.http else {
        return Err(Reject::NotUpgrade);
    };
    let balancer = &rt.balancers[route_index];
    let mut last = Reject::NoUpstream;
    for idx in balancer.order(sticky) {
        let health = &rt.health[route_index][idx];
        if !health.is_available() {
            last = skipped(health, last); // down or drained: no new request
            continue;
        }
        let Some(pool) = rt.http_pools.get(route_index).and_then(|p| p.get(idx)) else {
            continue;
        };
        let Some(pool) = pool else { return Ok((idx, None)) };
        match pool.checkout(policy.timeout, rt.config.server.upstream_timeout).await {
            Ok(mut lease) => {
                health.succeeded();
                lease.load = balancer.hold(idx);
                return Ok((idx, Some(lease)));
            }
            Err(crate::proxy::Checkout::Transport(e)) => {
                health.failed();
                tracing::warn!(route = %route.name, upstream = idx, reason = e.label(), "upstream attempt failed");
                last = e;
            }
            Err(crate::proxy::Checkout::Busy(e)) => {
                tracing::warn!(route = %route.name, upstream = idx, reason = e.label(), "upstream pool full");
                last = e;
            }
        }
    }
    Err(last)
}
