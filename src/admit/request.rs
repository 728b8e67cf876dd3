//! The checks of an upgrade request that need no token, cheapest first.

use super::Admission;
use crate::config::Config;
use crate::error::Reject;
use crate::gateway::Runtime;
use crate::limits::IpSlot;
use crate::upgrade::{self, Upgrade};
use http::{Request, uri::PathAndQuery};
use hyper::body::Incoming;
use std::net::IpAddr;

/// The request after the checks that need no token: routed, validated, the client's
/// per-IP slot held.
pub(super) struct Checked {
    pub(super) route_index: usize,
    /// The request target's path and query, as sent (shares hyper's read buffer).
    pub(super) target: PathAndQuery,
    /// The `Host` as routed.
    pub(super) host: String,
    pub(super) client_ip: IpAddr,
    /// `None`: a plain request on a route with `http = true`.
    pub(super) upgrade: Option<Upgrade>,
    pub(super) ip_slot: Option<IpSlot>,
    /// The client's `Origin` (one at most: checked), for the live re-checks.
    pub(super) origin: Option<http::HeaderValue>,
}

impl Checked {
    pub(super) fn path(&self) -> &str {
        self.target.path()
    }

    pub(super) fn query(&self) -> Option<&str> {
        self.target.query()
    }
}

impl Admission {
    /// Client address, drain and cap, path, route, upgrade headers, Origin, ban, per-IP
    /// limits behind a proxy.
    pub(super) fn check(&self, rt: &Runtime, req: &Request<Incoming>) -> Result<Checked, Reject> {
        let config: &Config = &rt.config;
        let request_id = upgrade::request_id(config.server.is_trusted_proxy(self.peer_ip), req.headers());
        self.note(|i| i.request_id = Some(request_id));
        let client_ip = upgrade::client_ip(config, self.peer_ip, req.headers())?;
        self.note(|i| i.client_ip = Some(client_ip));
        if self.gw.is_draining() {
            return Err(Reject::Draining);
        }
        if self.over_cap {
            return Err(Reject::GlobalConnLimit);
        }
        let host = upgrade::request_host(req)?;
        if let Some(served) = self.sni_certificate.get()
            && !served.names_host(&host)
        {
            return Err(Reject::Misdirected);
        }
        // No path at all (an authority-form target): refused as a path without '/'.
        let Some(target) = req.uri().path_and_query().cloned() else {
            return Err(Reject::BadRequest("the path must start with '/'"));
        };
        let path = target.path();
        upgrade::check_path(path)?;
        let route_index = config.route_index(&host, path).ok_or(Reject::NotFound)?;
        let route = &config.routes[route_index];
        self.note(|i| i.route = rt.route_names.get(route_index).cloned());
        if self.plain && route.auth.uses_cert() {
            // Not an auth failure: it must not count toward the balancer's auth ban.
            return Err(Reject::BadRequest("a client-certificate route on a plain listener"));
        }
        self.note(|i| i.http = route.http.is_some());
        // A plain request on an `http` route is proxied: its method first (DESIGN.md
        // section 13: route, method, then admission).
        let upgrade = match (upgrade::validate(req), &route.http) {
            (Err(Reject::NotUpgrade), Some(policy)) => {
                if !policy.methods.contains(req.method()) {
                    return Err(Reject::MethodNotAllowed);
                }
                None
            }
            (r, _) => Some(r?),
        };
        upgrade::check_origin(route, req.headers())?;
        if let Some(left) = self.gw.per_ip().banned(client_ip) {
            return Err(Reject::AuthBanned(left));
        }
        // The TCP peer passed the pre-TLS checks; a client a trusted proxy names by
        // `X-Forwarded-For` gets them now. A plain request is charged to the client's
        // `http_rate_per_ip`, each one on a kept-alive connection.
        let ip_slot = if upgrade.is_none() {
            self.gw.check_http(rt, client_ip)?;
            None
        } else if client_ip == self.peer_ip {
            None
        } else {
            Some(self.gw.check_client(rt, client_ip)?)
        };
        Ok(Checked {
            route_index,
            target,
            host,
            client_ip,
            upgrade,
            ip_slot,
            origin: req.headers().get(http::header::ORIGIN).cloned(),
        })
    }
}
