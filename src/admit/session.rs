//! A live session's admission, re-checked whenever the configuration changes or an
//! admin action arrives, as a new client would be checked: the firewall and bans,
//! revocations and kicks, its route's Origin policy, and whether its principal still
//! passes the route's auth mode and claims under the new config
//! ([`crate::auth::Methods::recheck`]). A session whose route was removed keeps going
//! on its credential alone (nothing in the new config speaks for it or against it).
//!
//! On a route with `refresh = true` the client may replace its token mid-session
//! ([`crate::relay::Policy::refresh`]): the new one is verified as at admission, must
//! name the same user, and then is the session's credential (re-checks, revocations and
//! the expiry follow it).

use super::Session;
use crate::auth::Principal;
use crate::config::{Config, Route};
use crate::error::{AuthFailure, CloseReason, RefreshRefusal};
use crate::gateway::Gateway;
use crate::util::lock;
use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// What a live session is re-checked by, for [`crate::relay::Policy`].
pub(crate) struct SessionPolicy<'a> {
    gw: &'a Gateway,
    /// The generation at admission, handed to the relay first (then the current one).
    admitted_under: Mutex<Option<CancellationToken>>,
    /// Boxed: read only on a re-check, so an idle session's future stays small.
    admitted: Box<Admitted>,
}

/// A provider session's recheck timer and the relay meet here: a refusal sets
/// `denied` and cancels the generation the relay waits on, so it checks at once.
#[derive(Default)]
struct Rechecked {
    denied: AtomicBool,
    /// The auth failure reason a refusal is logged with (`denied`, `inactive`).
    reason: &'static str,
    /// The token last handed to the relay (a child of the gateway's generation).
    current: Mutex<Option<CancellationToken>>,
}

/// What the session was admitted as.
struct Admitted {
    /// The route's name: its policy is looked up by it in each new config.
    route: Box<str>,
    /// The route had `refresh = true` when the session started.
    refresh: bool,
    origin: Option<http::HeaderValue>,
    client_ip: Option<IpAddr>,
    /// Replaced by a refresh (`refresh = true`); otherwise as admitted.
    principal: Mutex<Option<Principal>>,
    /// The certificate of a client whose route does not authenticate with it.
    cert: Option<std::sync::Arc<crate::tls::ClientCert>>,
    /// When the connection was accepted: a kick closes sessions accepted before it.
    started: std::time::Instant,
    /// What the provider's recheck timer shares with the relay (`None`: no timer).
    forward: Option<Arc<Rechecked>>,
    /// Ends the recheck timer with the session.
    _timer: Option<DropGuard>,
}

impl Session {
    /// The policy the relay re-checks this session by. `admitted_under`: the generation
    /// the connection was admitted under (a reload since then makes the relay re-check
    /// at once).
    pub(crate) fn policy<'a>(
        &mut self,
        gw: &'a Gateway,
        route: &Route,
        admitted_under: CancellationToken,
        client_ip: Option<IpAddr>,
        started: std::time::Instant,
    ) -> SessionPolicy<'a> {
        let principal = self.principal.take().map(|p| *p);
        let (forward, timer) = match principal.as_ref().and_then(|p| recheck_timer(gw, p)) {
            Some((shared, guard)) => (Some(shared), Some(guard)),
            None => (None, None),
        };
        SessionPolicy {
            gw,
            admitted_under: Mutex::new(Some(admitted_under)),
            admitted: Box::new(Admitted {
                route: route.name.as_str().into(),
                refresh: route.refresh,
                origin: self.origin.take(),
                client_ip,
                principal: Mutex::new(principal),
                cert: self.cert.take(),
                started,
                forward,
                _timer: timer,
            }),
        }
    }
}

/// What one recheck round found.
enum Round {
    /// The provider still admits the same identity.
    Stands,
    /// A refusal (401/403, a redirect, an inactive token) or another identity.
    Refused,
    /// The provider gave no answer (it is asked again sooner).
    Unanswered,
}

/// One round of asking the session's provider again (never its cache).
type Ask = Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Round> + Send>> + Send + Sync>;

/// How a live session's provider is asked again, and how often (`recheck`), for a
/// client admitted by a forward or an introspection provider.
fn recheck_of(gw: &Gateway, p: &Principal) -> Option<(Ask, std::time::Duration, &'static str)> {
    use crate::auth::{forward::Answer, introspection::Verdict};
    let rt = gw.runtime();
    let provider = p.provider.as_deref()?;
    let identity = p.identity.clone();
    if let Some(fwd) = p.credential.forward.as_deref() {
        let checker = rt.auth.forward(provider)?.clone();
        let every = checker.config().recheck?;
        let asked = fwd.asked.clone();
        let ask: Ask = Box::new(move || {
            let (checker, asked, identity) = (checker.clone(), asked.clone(), identity.clone());
            Box::pin(async move {
                match checker.ask(&asked).await {
                    Ok(Answer::Allow { identity: now, .. }) if Some(&now) == identity.as_ref() => Round::Stands,
                    Ok(_) => Round::Refused,
                    Err(_) => Round::Unanswered,
                }
            })
        });
        return Some((ask, every, "denied"));
    }
    let introspector = rt.auth.introspector(provider)?.clone();
    let every = introspector.config().recheck?;
    let token: Arc<str> = p.credential.token.as_deref()?.into();
    let ask: Ask = Box::new(move || {
        let (introspector, token, identity) = (introspector.clone(), token.clone(), identity.clone());
        Box::pin(async move {
            match introspector.recheck(&token).await {
                Ok(Verdict::Active(a)) if Some(&a.identity) == identity.as_ref() => Round::Stands,
                Ok(_) => Round::Refused,
                Err(_) => Round::Unanswered,
            }
        })
    });
    Some((ask, every, "inactive"))
}

/// For a client admitted by a forward or introspection provider with `recheck`: a task
/// that asks the provider again every `recheck`. A refusal ends the session with 1008;
/// a provider that cannot answer leaves it alone and is asked again sooner
/// ([`crate::auth::forward::retry_after`]).
fn recheck_timer(gw: &Gateway, p: &Principal) -> Option<(Arc<Rechecked>, DropGuard)> {
    let (ask, every, reason) = recheck_of(gw, p)?;
    let shared = Arc::new(Rechecked {
        reason,
        ..Rechecked::default()
    });
    let stop = CancellationToken::new();
    let (task_shared, task_stop) = (shared.clone(), stop.clone());
    tokio::spawn(async move {
        let rounds = async {
            let mut wait = every;
            loop {
                tokio::time::sleep(wait).await;
                match ask().await {
                    Round::Stands => wait = every,
                    Round::Refused => return,
                    Round::Unanswered => wait = crate::auth::forward::retry_after(every),
                }
            }
        };
        tokio::select! {
            () = task_stop.cancelled() => {}
            () = rounds => {
                task_shared.denied.store(true, Ordering::SeqCst);
                if let Some(t) = lock(&task_shared.current).as_ref() {
                    t.cancel();
                }
            }
        }
    });
    Some((shared, stop.drop_guard()))
}

impl crate::relay::Policy for SessionPolicy<'_> {
    fn generation(&self) -> CancellationToken {
        let first = lock(&self.admitted_under).take();
        let generation = first.unwrap_or_else(|| self.gw.recheck_token());
        let Some(f) = &self.admitted.forward else { return generation };
        let child = generation.child_token();
        *lock(&f.current) = Some(child.clone());
        // A refusal that came before the relay held this token.
        if f.denied.load(Ordering::SeqCst) {
            child.cancel();
        }
        child
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
        if let Some(f) = a.forward.as_ref().filter(|f| f.denied.load(Ordering::SeqCst)) {
            tracing::info!(route = %a.route, reason = f.reason, "the auth provider no longer admits a live session");
            return Some(CloseReason::AccessRevoked);
        }
        if a.client_ip.is_some_and(|ip| !rt.firewall.allows(ip) || incidents.is_banned(ip)) {
            return Some(CloseReason::AccessRevoked);
        }
        let route = rt.config.routes.iter().find(|r| *r.name == *a.route);
        if route.is_some_and(|r| crate::upgrade::origin_allowed(r, a.origin.as_ref()).is_err()) {
            tracing::info!(route = %a.route, reason = "origin", "a live session no longer passes its route's policy");
            return Some(CloseReason::AccessRevoked);
        }
        let principal = lock(&a.principal);
        if let Some(p) = principal.as_ref()
            && (incidents.is_revoked(p.revocation_key().as_deref()) || incidents.is_kicked(p.user_key().as_deref(), a.started))
        {
            return Some(CloseReason::AccessRevoked);
        }
        // Key rotation, a new CRL, a removed CA, a tightened auth mode or claims.
        let failed = rt.auth.recheck(route, principal.as_ref(), a.cert.as_ref()).err()?;
        tracing::info!(route = %a.route, reason = failed.label(), "a live session no longer passes its route's policy");
        Some(CloseReason::AccessRevoked)
    }

    fn refreshes(&self) -> bool {
        self.admitted.refresh
    }

    fn refresh(&self, token: &str) -> Result<Option<Instant>, CloseReason> {
        let rt = self.gw.runtime();
        let a = &self.admitted;
        let route = rt.config.routes.iter().find(|r| *r.name == *a.route);
        let mut principal = lock(&a.principal);
        // A removed route, or an anonymous session, has nothing to refresh.
        let judged = match (route, principal.as_ref()) {
            (Some(route), Some(current)) => rt.auth.refresh(route, current, token).map(|new| (route, new)),
            _ => Err(RefreshRefusal::NotAllowed),
        };
        // Revoked through the admin API (or the cluster) as well as by the file.
        let judged = judged.and_then(|(route, new)| {
            if self.gw.incidents.is_revoked(new.revocation_key().as_deref()) {
                return Err(RefreshRefusal::Auth(AuthFailure::Revoked));
            }
            Ok((route, new))
        });
        let result = judged.as_ref().map_or_else(|r| r.label(), |_| "ok");
        self.gw.metrics.token_refresh(&a.route, result);
        let token_fingerprint = crate::auth::fingerprint(token);
        match judged {
            Ok((route, new)) => {
                let deadline = token_deadline(&rt.config, route, new.expires_at);
                tracing::debug!(route = %a.route, token_fingerprint, exp = new.expires_at, "token refreshed");
                *principal = Some(new);
                Ok(deadline)
            }
            Err(refusal) => {
                tracing::info!(route = %a.route, reason = refusal.label(), token_fingerprint, "token refresh refused");
                Err(CloseReason::RefreshRefused)
            }
        }
    }
}

/// When a session on `route` whose token expires at `exp` (seconds since the epoch)
/// must end: `exp` plus the leeway, when its verifier has `close_on_expiry`.
pub(crate) fn token_deadline(config: &Config, route: &Route, exp: Option<u64>) -> Option<Instant> {
    let jwt = config.jwt_of(route);
    exp.filter(|_| jwt.close_on_expiry).map(|exp| expiry_instant(exp, jwt.leeway))
}

/// The monotonic instant at which a token with `exp` (seconds since the epoch) expires, plus `leeway`.
pub(crate) fn expiry_instant(exp: u64, leeway: Duration) -> Instant {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // `exp` comes from the token: saturate instead of overflowing near u64::MAX.
    let remaining = Duration::from_secs(exp).saturating_add(leeway).saturating_sub(now_unix);
    Instant::now() + remaining.min(Duration::from_secs(10 * 365 * 86400))
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn expiry_at_the_edge_of_the_integer_range_does_not_panic() {
        let far = super::expiry_instant(u64::MAX, std::time::Duration::from_secs(u64::MAX));
        assert!(far > tokio::time::Instant::now() + std::time::Duration::from_secs(86400));
        let past = super::expiry_instant(0, std::time::Duration::ZERO);
        assert!(past <= tokio::time::Instant::now());
    }
}
