//! A live session's admission, re-checked whenever the configuration changes or an
//! admin action arrives, as a new client would be checked: the firewall and bans,
//! revocations and kicks, its route's Origin policy, and whether its principal still
//! passes the route's auth mode and claims under the new config
//! ([`crate::auth::Methods::recheck`]). A session whose route was removed keeps going
//! on its credential alone (nothing in the new config speaks for it or against it).

use super::Session;
use crate::auth::Principal;
use crate::error::CloseReason;
use crate::gateway::Gateway;
use crate::util::lock;
use std::{net::IpAddr, sync::Mutex};
use tokio_util::sync::CancellationToken;

/// What a live session is re-checked by, for [`crate::relay::Policy`].
pub(crate) struct SessionPolicy<'a> {
    gw: &'a Gateway,
    /// The generation at admission, handed to the relay first (then the current one).
    admitted_under: Mutex<Option<CancellationToken>>,
    /// Boxed: read only on a re-check, so an idle session's future stays small.
    admitted: Box<Admitted>,
}

/// What the session was admitted as.
struct Admitted {
    /// The route's name: its policy is looked up by it in each new config.
    route: Box<str>,
    origin: Option<http::HeaderValue>,
    client_ip: Option<IpAddr>,
    principal: Option<Principal>,
    /// The certificate of a client whose route does not authenticate with it.
    cert: Option<std::sync::Arc<crate::tls::ClientCert>>,
    /// When the connection was accepted: a kick closes sessions accepted before it.
    started: std::time::Instant,
}

impl Session {
    /// The policy the relay re-checks this session by. `admitted_under`: the generation
    /// the connection was admitted under (a reload since then makes the relay re-check
    /// at once).
    pub(crate) fn policy<'a>(
        &mut self,
        gw: &'a Gateway,
        route: &str,
        admitted_under: CancellationToken,
        client_ip: Option<IpAddr>,
        started: std::time::Instant,
    ) -> SessionPolicy<'a> {
        SessionPolicy {
            gw,
            admitted_under: Mutex::new(Some(admitted_under)),
            admitted: Box::new(Admitted {
                route: route.into(),
                origin: self.origin.take(),
                client_ip,
                principal: self.principal.take().map(|p| *p),
                cert: self.cert.take(),
                started,
            }),
        }
    }
}

impl crate::relay::Policy for SessionPolicy<'_> {
    fn generation(&self) -> CancellationToken {
        let first = lock(&self.admitted_under).take();
        first.unwrap_or_else(|| self.gw.recheck_token())
    }

    fn live_limits(&self) -> Option<crate::relay::LiveLimits> {
        let rt = self.gw.runtime();
        let route = rt.config.routes.iter().find(|r| *r.name == *self.admitted.route)?;
        let l = rt.config.limits_of(route);
        Some(crate::relay::LiveLimits {
            message_rate: l.message_rate,
            message_burst: l.message_burst,
            idle_timeout: l.idle_timeout,
            ping_interval: l.ping_interval,
        })
    }

    fn check(&self) -> Option<CloseReason> {
        let rt = self.gw.runtime();
        let incidents = &self.gw.incidents;
        let a = &self.admitted;
        if a.client_ip.is_some_and(|ip| !rt.firewall.allows(ip) || incidents.is_banned(ip)) {
            return Some(CloseReason::AccessRevoked);
        }
        let route = rt.config.routes.iter().find(|r| *r.name == *a.route);
        if route.is_some_and(|r| crate::upgrade::origin_allowed(r, a.origin.as_ref()).is_err()) {
            tracing::info!(route = %a.route, reason = "origin", "a live session no longer passes its route's policy");
            return Some(CloseReason::AccessRevoked);
        }
        if let Some(p) = &a.principal
            && (incidents.is_revoked(p.revocation_key().as_deref()) || incidents.is_kicked(p.user_key().as_deref(), a.started))
        {
            return Some(CloseReason::AccessRevoked);
        }
        // Key rotation, a new CRL, a removed CA, a tightened auth mode or claims.
        let failed = rt.auth.recheck(route, a.principal.as_ref(), a.cert.as_ref()).err()?;
        tracing::info!(route = %a.route, reason = failed.label(), "a live session no longer passes its route's policy");
        Some(CloseReason::AccessRevoked)
    }
}
