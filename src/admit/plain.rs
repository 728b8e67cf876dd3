//! A plain request on a route with `http = true` (DESIGN.md section 13): after the
//! checks every request gets (route, method, Origin, bans, `http_rate_per_ip`), its
//! token, revocations and the declared body size, then one of the route's upstreams
//! and the proxied exchange. Each request on a kept-alive connection passes here on
//! its own; no session slot is held (the per-user cap counts WebSocket sessions).

use super::request::Checked;
use super::{Admission, shared_cap, upstream};
use crate::auth::Outcome;
use crate::error::{AuthFailure, Reject};
use crate::gateway::Runtime;
use crate::proxy::{self, Body};
use crate::util::lock;
use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::Arc;

impl Admission {
    pub(super) async fn http(&self, rt: &Runtime, req: Request<Incoming>, checked: Checked) -> Result<Response<Body>, Reject> {
        let route = &rt.config.routes[checked.route_index];
        let Some(policy) = route.http.as_ref() else {
            return Err(Reject::NotUpgrade);
        };
        let ms = u64::try_from(policy.timeout.as_millis()).unwrap_or(u64::MAX);
        self.http_timeout_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
        // Cluster mode: the first request on the connection takes the per-IP lease the
        // accept started, held while the connection lives.
        let started = lock(&self.shared_ip).take().filter(|_| checked.client_ip == self.peer_ip);
        if started.is_some() {
            let lease = shared_cap::hold_ip(&self.gw, &rt.config, checked.client_ip, started).await?;
            *lock(&self.conn_lease) = lease;
        }
        let principal = match self.authenticate(rt, route, &req, &checked, false).await? {
            Outcome::Anonymous => None,
            Outcome::Authenticated(p) => Some(p),
            // A token sent as the first WebSocket message has no place in a plain request.
            Outcome::Deferred => return Err(Reject::Auth(AuthFailure::Missing)),
        };
        if let Some(p) = &principal
            && self.gw.incidents.is_revoked(p.revocation_key().as_deref())
        {
            return Err(Reject::Auth(AuthFailure::Revoked));
        }
        let (parts, body) = req.into_parts();
        let body = proxy::Limited::new(body, policy)?;
        let request_id = self.with_info(|i| i.request_id.clone());
        let mut facts = upstream::facts(
            rt,
            route,
            (checked.client_ip, self.peer_ip),
            (checked.path(), checked.query()),
            &parts.headers,
            principal.as_ref(),
            self.cert().map(Arc::as_ref),
        );
        facts.request_id = request_id.as_deref();
        let sticky = upstream::sticky_choice(rt, checked.route_index, &parts.headers);
        let (index, lease) = upstream::checkout_http(rt, checked.route_index, sticky).await?;
        let set_cookie = upstream::sticky_cookie(rt, checked.route_index, sticky, index, !self.plain);
        let target = &route.upstreams[index];
        let Some(lease) = lease else {
            self.note(|i| i.upstream = Some(crate::upstream::target_label(target).into()));
            return Ok(with_cookie(proxy::echo(body), set_cookie));
        };
        self.note(|i| i.upstream = Some(lease.label()));
        let base = match target {
            crate::config::Upstream::Remote { path, .. } => path.as_deref(),
            crate::config::Upstream::BuiltinEcho => None,
        };
        // The client's target as it came, when nothing in it changes (no path of the
        // upstream's own, no query that could carry a token copy): not copied again. An
        // empty one (`http://host#x` leaves none) is written as `/` by the general way.
        let same = http::Uri::from(checked.target.clone());
        let uri = if base.is_none() && checked.query().is_none() && same.path().starts_with('/') {
            same
        } else {
            crate::upstream::upstream_path(route, base, &facts)
                .parse()
                .map_err(|_| Reject::BadRequest("request target not forwardable"))?
        };
        let head = crate::upstream::http_request_head(&parts.method, lease.host_header(), uri, &facts);
        let resp = proxy::exchange(lease, head, body, (policy.timeout, rt.config.server.upstream_timeout)).await;
        if let Err(e) = &resp {
            tracing::info!(route = %route.name, upstream = index, reason = e.label(), "plain request not answered by the upstream");
        }
        resp.map(|r| with_cookie(r, set_cookie))
    }
}

/// The answer with the gateway's sticky cookie added (the app's own cookies kept).
fn with_cookie(mut resp: Response<Body>, cookie: Option<http::HeaderValue>) -> Response<Body> {
    if let Some(c) = cookie {
        resp.headers_mut().append(http::header::SET_COOKIE, c);
    }
    resp
}
