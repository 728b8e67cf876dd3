//! A live session's admission, re-checked whenever the configuration changes or an
//! admin action arrives, as a new client would be checked: the firewall and bans,
//! revocations and kicks, its route's Origin policy, and whether its principal still
//! passes the route's auth mode and claims under the new config
//! ([`crate::auth::Methods::recheck`]). A session whose route was removed keeps going
//! on its credential alone (nothing in the new config speaks for it or against it).
//!
//! A client admitted by a forward or an introspection provider is also asked about again
//! by a timer of its own ([`recheck_timer`]): every `recheck` of its provider *as the
//! current runtime configures it* (looked up by name each round, so a reload's url,
//! timeout and recheck apply to live sessions). A reload that leaves no running provider
//! of that name and kind (removed, or no route uses it any more) closes the session with
//! 1008: its credential is a cookie or an opaque token that only that provider can vouch
//! for, and a gateway must not keep trusting what its operator stopped trusting.
//!
//! On a route with `refresh = true` the client may replace its token mid-session
//! ([`crate::relay::Policy::refresh`]): the new one is verified as at admission, must
//! name the same user, and then is the session's credential (re-checks, revocations and
//! the expiry follow it).

use super::Session;
use crate::auth::Principal;
use crate::config::{Config, Route};
use crate::error::{AuthFailure, CloseReason, RefreshRefusal};
use crate::gateway::{Gateway, Runtime};
use crate::util::lock;
use std::{
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock, Weak},
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
/// `denied` (with the reason it is logged with) and cancels the generation the relay
/// waits on, so it checks at once.
struct Rechecked {
    recheck: Recheck,
    /// `denied` (forward), `inactive` (introspection) or `provider_removed`.
    denied: OnceLock<&'static str>,
    /// The token last handed to the relay (a child of the gateway's generation).
    current: Mutex<Option<CancellationToken>>,
}

impl Rechecked {
    /// The session's provider no longer admits it: tell the relay.
    fn deny(&self, reason: &'static str) {
        let _ = self.denied.set(reason);
        if let Some(t) = lock(&self.current).as_ref() {
            t.cancel();
        }
    }
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
    /// What the provider's recheck timer shares with the relay (`None`: no timer, the
    /// session was not admitted by a forward or introspection provider).
    provided: Option<Arc<Rechecked>>,
    /// Ends the recheck timer with the session.
    _timer: Option<DropGuard>,
}

impl Session {
    /// The policy the relay re-checks this session by. `admitted_under`: the generation
    /// the connection was admitted under (a reload since then makes the relay re-check
    /// at once).
    pub(crate) fn policy<'a>(
        &mut self,
        gw: &'a Arc<Gateway>,
        route: &Route,
        admitted_under: CancellationToken,
        client_ip: Option<IpAddr>,
        started: std::time::Instant,
    ) -> SessionPolicy<'a> {
        let principal = self.principal.take().map(|p| *p);
        let (provided, timer) = match principal.as_ref().and_then(|p| recheck_timer(gw, p)) {
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
                provided,
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

/// What a provider session is asked about again.
enum Asking {
    /// What the forward endpoint was asked at admission (the client's passed headers).
    Forward(crate::auth::forward::Asked),
    /// The opaque token introspected at admission.
    Introspection(Arc<str>),
}

/// A running provider, as one round asks it.
enum Provider {
    Forward(Arc<crate::auth::forward::Checker>),
    Introspection(Arc<crate::auth::introspection::Introspector>),
}

impl Provider {
    /// Its `recheck` (`None`: live sessions are not asked again).
    fn every(&self) -> Option<Duration> {
        match self {
            Provider::Forward(c) => c.config().recheck,
            Provider::Introspection(i) => i.config().recheck,
        }
    }
}

/// A session admitted by a forward or an introspection provider: which provider (by
/// name: looked up in the current runtime at each round), what to ask, whom it admitted.
struct Recheck {
    provider: Box<str>,
    identity: Option<String>,
    asking: Asking,
}

impl Recheck {
    /// For a client admitted by a forward or an introspection provider of `rt`.
    fn of(rt: &Runtime, p: &Principal) -> Option<Recheck> {
        let provider = p.provider.as_deref()?;
        let asking = match p.credential.forward.as_deref() {
            Some(f) => Asking::Forward(f.asked.clone()),
            None if rt.auth.introspector(provider).is_some() => Asking::Introspection(p.credential.token.as_deref()?.into()),
            None => return None,
        };
        Some(Recheck {
            provider: provider.into(),
            identity: p.identity.clone(),
            asking,
        })
    }

    /// The auth failure reason a refusal is logged with.
    fn reason(&self) -> &'static str {
        match self.asking {
            Asking::Forward(_) => "denied",
            Asking::Introspection(_) => "inactive",
        }
    }

    /// The session's provider in `rt`, by name and kind (`None`: none runs there).
    fn provider(&self, rt: &Runtime) -> Option<Provider> {
        match self.asking {
            Asking::Forward(_) => rt.auth.forward(&self.provider).cloned().map(Provider::Forward),
            Asking::Introspection(_) => rt.auth.introspector(&self.provider).cloned().map(Provider::Introspection),
        }
    }

    /// Ask `provider` now (never its cache).
    async fn ask(&self, provider: &Provider) -> Round {
        use crate::auth::{forward::Answer, introspection::Verdict};
        let identity = self.identity.as_ref();
        match (provider, &self.asking) {
            (Provider::Forward(checker), Asking::Forward(asked)) => match checker.ask(asked).await {
                Ok(Answer::Allow { identity: now, .. }) if Some(&now) == identity => Round::Stands,
                Ok(_) => Round::Refused,
                Err(_) => Round::Unanswered,
            },
            (Provider::Introspection(introspector), Asking::Introspection(token)) => match introspector.recheck(token).await {
                Ok(Verdict::Active(a)) if Some(&a.identity) == identity => Round::Stands,
                Ok(_) => Round::Refused,
                Err(_) => Round::Unanswered,
            },
            // `provider` looks up the kind `asking` names.
            _ => Round::Refused,
        }
    }
}

/// For a client admitted by a forward or an introspection provider: a task that asks
/// the provider again every `recheck` ([`rounds`]). A refusal, or a reload that leaves
/// no such provider, ends the session with 1008; a provider that cannot answer leaves it
/// alone and is asked again sooner ([`crate::auth::forward::retry_after`]).
fn recheck_timer(gw: &Arc<Gateway>, p: &Principal) -> Option<(Arc<Rechecked>, DropGuard)> {
    let recheck = Recheck::of(&gw.runtime(), p)?;
    let shared = Arc::new(Rechecked {
        recheck,
        denied: OnceLock::new(),
        current: Mutex::new(None),
    });
    let stop = CancellationToken::new();
    let (weak, task_shared, task_stop) = (Arc::downgrade(gw), shared.clone(), stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = task_stop.cancelled() => {}
            denied = rounds(weak, &task_shared.recheck) => {
                if let Some(reason) = denied {
                    task_shared.deny(reason);
                }
            }
        }
    });
    Some((shared, stop.drop_guard()))
}

/// The recheck rounds of one session: every `recheck` of its provider as the current
/// runtime has it (a reload wakes the wait: the provider is looked up again and its new
/// `recheck` counts from the last answer). Ends with the reason to close the session
/// (`None`: the gateway is gone).
async fn rounds(gw: Weak<Gateway>, r: &Recheck) -> Option<&'static str> {
    let mut last = Instant::now();
    let mut retry = false;
    loop {
        let g = gw.upgrade()?;
        // Taken before the runtime is read: a reload after this read ends the wait.
        let reloaded = g.recheck_token();
        let provider = r.provider(&g.runtime());
        drop(g);
        let Some(provider) = provider else {
            return Some("provider_removed");
        };
        let due = provider.every().map(|every| {
            let wait = if retry { crate::auth::forward::retry_after(every) } else { every };
            last + wait
        });
        let due = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = reloaded.cancelled() => continue,
            () = due => {}
        }
        match r.ask(&provider).await {
            Round::Stands => retry = false,
            Round::Refused => return Some(r.reason()),
            Round::Unanswered => retry = true,
        }
        last = Instant::now();
    }
}

impl crate::relay::Policy for SessionPolicy<'_> {
    fn generation(&self) -> CancellationToken {
        let first = lock(&self.admitted_under).take();
        let generation = first.unwrap_or_else(|| self.gw.recheck_token());
        let Some(f) = &self.admitted.provided else { return generation };
        let child = generation.child_token();
        *lock(&f.current) = Some(child.clone());
        // A refusal that came before the relay held this token.
        if f.denied.get().is_some() {
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
        if let Some(f) = &a.provided {
            // A reload that left no such provider: nothing vouches for the session any more.
            let reason = f
                .denied
                .get()
                .copied()
                .or_else(|| f.recheck.provider(&rt).is_none().then_some("provider_removed"));
            if let Some(reason) = reason {
                tracing::info!(route = %a.route, provider = %f.recheck.provider, reason, "the auth provider no longer admits a live session");
                return Some(CloseReason::AccessRevoked);
            }
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
