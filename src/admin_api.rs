//! The admin API (DESIGN.md section 9), on the admin listener, only when
//! `admin.token_file` is set: `Authorization: Bearer <token>` compared in constant time
//! (401 without it; the header is never logged), JSON in and out, bodies of at most
//! [`MAX_BODY`] bytes. Every action is logged at WARN with its target and counted in
//! `wsgate_admin_requests_total{action,result}`; every action that can end sessions makes
//! the live ones re-check at once.

use crate::cluster::Event;
use crate::gateway::Gateway;
use crate::incidents::{MAX_BAN, REVOCATION_WITHOUT_EXP, Refusal};
use crate::util::escape;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// When a refused token was last logged (Unix seconds).
static LAST_401_LOG: AtomicU64 = AtomicU64::new(0);

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Largest request body.
pub(crate) const MAX_BODY: usize = 4096;
/// Longest `jti` or `sub` accepted.
const MAX_NAME: usize = 256;
/// Shortest ban.
const MIN_BAN: Duration = Duration::from_secs(1);
/// Sessions listed per request, at most (`limit`).
const MAX_LISTED: usize = 1000;
const DEFAULT_LISTED: usize = 100;
/// A ban without `for`.
const DEFAULT_BAN: Duration = Duration::from_secs(3600);
/// Longest target shown in a log line.
const LOGGED_TARGET: usize = 128;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revocation {
    jti: String,
    exp: Option<u64>,
    /// The `[providers.NAME]` that issued the token (absent: `[jwt]`).
    provider: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Kick {
    sub: String,
    /// The `[providers.NAME]` whose user this is (absent: `[jwt]`).
    provider: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ban {
    cidr: String,
    #[serde(rename = "for")]
    duration: Option<String>,
}

/// `POST`/`DELETE /v1/upstreams/drain`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainOrder {
    route: String,
    /// The upstream as configured (as `GET /v1/upstreams` lists it).
    upstream: String,
    /// `POST`: the time over which its sessions are closed (default [`DEFAULT_DRAIN_OVER`]).
    over: Option<String>,
}

/// A drain without `over`.
const DEFAULT_DRAIN_OVER: Duration = Duration::from_secs(60);

/// An answer: status and JSON body.
type Answer = (StatusCode, serde_json::Value);

fn error(status: StatusCode, message: &str) -> Answer {
    (status, json!({ "error": message }))
}

pub(crate) async fn answer(gw: &Gateway, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (action, (status, body)) = route(gw, req).await;
    if status.is_client_error() && status != StatusCode::UNAUTHORIZED && action != "unknown" {
        tracing::warn!(action, status = status.as_u16(), "admin: request refused");
    }
    let result = match status.as_u16() {
        200..=299 => "ok",
        401 => "unauthorized",
        404 if action != "unknown" => "not_found",
        507 => "full",
        _ => "invalid",
    };
    gw.metrics.admin_request(action, result);
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        h.insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    resp
}

/// The action a request names (a fixed label) and its answer.
async fn route(gw: &Gateway, req: Request<Incoming>) -> (&'static str, Answer) {
    let rt = gw.runtime();
    let Some(token) = rt.admin_token.as_ref() else {
        return (
            "unknown",
            error(StatusCode::NOT_FOUND, "the admin API is off (admin.token_file is not set)"),
        );
    };
    let path = req.uri().path().to_string();
    let action = match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/revocations") => "revoke",
        (&Method::POST, "/v1/kick") => "kick",
        (&Method::POST, "/v1/bans") => "ban",
        (&Method::DELETE, p) if p.starts_with("/v1/bans/") => "unban",
        (&Method::GET, "/v1/sessions") => "sessions",
        (&Method::GET, "/v1/upstreams") => "upstreams",
        (&Method::POST, "/v1/upstreams/drain") => "drain",
        (&Method::DELETE, "/v1/upstreams/drain") => "undrain",
        _ => return ("unknown", error(StatusCode::NOT_FOUND, "no such action")),
    };
    if !authorized(&req, token.bytes()) {
        // At most one line a second: anyone who can reach the listener could flood the log.
        if LAST_401_LOG.fetch_max(unix_secs(), Ordering::Relaxed) < unix_secs() {
            tracing::warn!(action, "admin API request without a valid token");
        }
        return (action, error(StatusCode::UNAUTHORIZED, "a valid admin token is required"));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return (action, error(StatusCode::PAYLOAD_TOO_LARGE, "the body is larger than 4096 bytes"));
    }
    let query = req.uri().query().map(str::to_string);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return (action, error(StatusCode::PAYLOAD_TOO_LARGE, "the body is larger than 4096 bytes")),
    };
    let (answer, event) = match action {
        "revoke" => revoke(gw, &body),
        "kick" => kick(gw, &body),
        "ban" => ban(gw, &body),
        "unban" => unban(gw, &path["/v1/bans/".len()..]),
        "upstreams" => (upstreams(gw), None),
        "drain" => drain(gw, &body, true),
        "undrain" => drain(gw, &body, false),
        _ => (sessions(gw, query.as_deref()), None),
    };
    (action, share(gw, answer, event).await)
}

/// `Authorization: Bearer <token>`, exactly one header, compared in constant time.
fn authorized(req: &Request<Incoming>, token: &[u8]) -> bool {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return false;
    };
    let Some(given) = v.as_bytes().strip_prefix(b"Bearer ") else {
        return false;
    };
    aws_lc_rs::constant_time::verify_slices_are_equal(given.trim_ascii(), token).is_ok()
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Answer> {
    serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad JSON body: {e}")))
}

fn name(value: &str, what: &str) -> Result<(), Answer> {
    if value.is_empty() || value.len() > MAX_NAME {
        return Err(error(StatusCode::BAD_REQUEST, &format!("{what} must be 1 to {MAX_NAME} bytes")));
    }
    Ok(())
}

/// `provider` names a `[providers.NAME]` of the running config (absent: `[jwt]`): any
/// kind for a kick (forward and introspection sessions have users too), a jwt provider
/// for a revocation (it names a JWT's `jti`).
fn provider(gw: &Gateway, provider: Option<&str>, jwt_only: bool) -> Result<(), Answer> {
    let Some(p) = provider else { return Ok(()) };
    let config = &gw.runtime().config;
    if config.providers.contains_key(p) {
        return Ok(());
    }
    let other_kind = config.forward_providers.contains_key(p) || config.introspection_providers.contains_key(p);
    match (other_kind, jwt_only) {
        (true, false) => Ok(()),
        (true, true) => Err(error(
            StatusCode::BAD_REQUEST,
            "a revocation names a provider of kind jwt (absent: [jwt]); kick the user of a forward or introspection provider",
        )),
        (false, _) => Err(error(
            StatusCode::BAD_REQUEST,
            "provider must name a [providers.NAME] of the config (absent: [jwt])",
        )),
    }
}

fn full() -> Answer {
    error(
        StatusCode::INSUFFICIENT_STORAGE,
        "too many entries; let some expire or lift some first",
    )
}

/// An action taken here, and what to announce to the other instances.
type Taken = (Answer, Option<Event>);

/// In cluster mode, announce a successful action to every instance; the answer says
/// whether it reached Redis (`"shared"`).
async fn share(gw: &Gateway, (status, mut body): Answer, event: Option<Event>) -> Answer {
    if let (Some(cluster), Some(event), true) = (&gw.cluster, event, status.is_success()) {
        let shared = cluster.publish(event, &gw.metrics).await;
        body["shared"] = serde_json::Value::Bool(shared);
    }
    (status, body)
}

fn revoke(gw: &Gateway, body: &[u8]) -> Taken {
    let r: Revocation = match parse(body) {
        Ok(r) => r,
        Err(a) => return (a, None),
    };
    if let Err(a) = name(&r.jti, "jti").and_then(|()| provider(gw, r.provider.as_deref(), true)) {
        return (a, None);
    }
    // Keyed by provider: another provider's token with the same `jti` stays valid.
    let key = crate::auth::scoped(r.provider.as_deref(), &r.jti);
    // A verifier accepts the token until its `exp` plus the leeway: the revocation lasts
    // that long, here and on every instance, whatever `exp` was sent.
    let config = &gw.runtime().config;
    let leeway = config
        .providers
        .values()
        .map(|p| p.leeway)
        .fold(config.jwt.leeway, Duration::max)
        .as_secs();
    let until = r.exp.map(|e| e.saturating_add(leeway));
    if gw.incidents.revoke(&key, until) == Err(Refusal::Full) {
        return (full(), None);
    }
    gw.recheck_sessions();
    tracing::warn!(
        action = "revoke",
        jti = %escape(&r.jti, LOGGED_TARGET),
        provider = r.provider.as_deref().unwrap_or("-"),
        exp = ?r.exp,
        "admin: token revoked"
    );
    // Bounded like a ban: Redis keeps scores as doubles, and the entry must expire.
    let now = crate::cluster::unix_now();
    let exp = until.unwrap_or(now + REVOCATION_WITHOUT_EXP.as_secs()).min(now + MAX_BAN.as_secs());
    let event = Event::Revoke { jti: key, exp };
    (
        (StatusCode::OK, json!({ "revoked": r.jti, "provider": r.provider, "exp": r.exp })),
        Some(event),
    )
}

fn kick(gw: &Gateway, body: &[u8]) -> Taken {
    let k: Kick = match parse(body) {
        Ok(k) => k,
        Err(a) => return (a, None),
    };
    if let Err(a) = name(&k.sub, "sub").and_then(|()| provider(gw, k.provider.as_deref(), false)) {
        return (a, None);
    }
    // Keyed by provider: `alice` of another provider is another user.
    let user = crate::auth::scoped(k.provider.as_deref(), &k.sub);
    let Ok(live) = gw.incidents.kick(&user) else {
        return (full(), None);
    };
    gw.recheck_sessions();
    tracing::warn!(
        action = "kick",
        sub = %escape(&k.sub, LOGGED_TARGET),
        provider = k.provider.as_deref().unwrap_or("-"),
        sessions = live,
        "admin: user kicked"
    );
    let event = Event::Kick { sub: user };
    (
        (StatusCode::OK, json!({ "kicked": k.sub, "provider": k.provider, "sessions": live })),
        Some(event),
    )
}

fn ban(gw: &Gateway, body: &[u8]) -> Taken {
    let b: Ban = match parse(body) {
        Ok(b) => b,
        Err(a) => return (a, None),
    };
    let Some(net) = crate::config::parse_ip_rule(b.cidr.trim()).map(crate::incidents::canonical) else {
        return (error(StatusCode::BAD_REQUEST, "cidr must be an address or a CIDR range"), None);
    };
    let d = match b.duration.as_deref().map(str::parse::<humantime::Duration>) {
        None => DEFAULT_BAN,
        Some(Ok(d)) if *d >= MIN_BAN && *d <= MAX_BAN => *d,
        Some(_) => {
            let msg = "for must be a duration from 1s to 365d (\"1h\", \"30m\")";
            return (error(StatusCode::BAD_REQUEST, msg), None);
        }
    };
    if gw.incidents.ban(net, d) == Err(Refusal::Full) {
        return (full(), None);
    }
    gw.recheck_sessions();
    tracing::warn!(action = "ban", cidr = %net, seconds = d.as_secs(), "admin: range banned");
    let event = Event::Ban {
        cidr: net.to_string(),
        until: crate::cluster::unix_now() + d.as_secs(),
    };
    (
        (StatusCode::OK, json!({ "banned": net.to_string(), "seconds": d.as_secs() })),
        Some(event),
    )
}

fn unban(gw: &Gateway, raw: &str) -> Taken {
    let text = crate::util::percent_decode(raw);
    let Some(net) = crate::config::parse_ip_rule(text.trim()).map(crate::incidents::canonical) else {
        let msg = "the path must end in an address or a CIDR range (slash raw or %2F)";
        return (error(StatusCode::BAD_REQUEST, msg), None);
    };
    // Lifted here and announced even when unknown here: another instance may hold it.
    let known = gw.incidents.unban(net);
    if !known && gw.cluster.is_none() {
        return (error(StatusCode::NOT_FOUND, "no such ban"), None);
    }
    tracing::warn!(action = "unban", cidr = %net, "admin: ban lifted");
    let event = Event::Unban { cidr: net.to_string() };
    (
        (StatusCode::OK, json!({ "unbanned": net.to_string(), "known_here": known })),
        Some(event),
    )
}

fn sessions(gw: &Gateway, query: Option<&str>) -> Answer {
    let (mut sub, mut provider, mut route, mut limit) = (None, None, None, DEFAULT_LISTED);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = crate::util::percent_decode(&v.replace('+', " "));
        match k {
            "sub" => sub = Some(v),
            "provider" => provider = Some(v),
            "route" => route = Some(v),
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LISTED).contains(&n) => limit = n,
                _ => return error(StatusCode::BAD_REQUEST, "limit must be 1 to 1000"),
            },
            _ => return error(StatusCode::BAD_REQUEST, "the filters are sub, provider, route and limit"),
        }
    }
    let (list, truncated) = gw.incidents.sessions(sub.as_deref(), provider.as_deref(), route.as_deref(), limit);
    tracing::warn!(
        action = "sessions",
        sub = %sub.as_deref().map_or_else(|| "-".into(), |s| escape(s, LOGGED_TARGET)),
        route = %route.as_deref().map_or_else(|| "-".into(), |r| escape(r, LOGGED_TARGET)),
        listed = list.len(),
        "admin: sessions listed"
    );
    (StatusCode::OK, json!({ "sessions": list, "truncated": truncated }))
}

/// `POST /v1/upstreams/drain` (`drain`) or `DELETE` (undrain): answered 202 at once;
/// the sessions close at their points ([`crate::health`]). 404 for a route or upstream
/// the running config does not have; in cluster mode it is announced to every instance.
fn drain(gw: &Gateway, body: &[u8], drain: bool) -> Taken {
    let d: DrainOrder = match parse(body) {
        Ok(d) => d,
        Err(a) => return (a, None),
    };
    if let Err(a) = name(&d.route, "route").and_then(|()| name(&d.upstream, "upstream")) {
        return (a, None);
    }
    let over = match (drain, d.over.as_deref().map(str::parse::<humantime::Duration>)) {
        (false, _) | (true, None) => DEFAULT_DRAIN_OVER,
        (true, Some(Ok(o))) if *o <= crate::health::MAX_DRAIN_OVER => *o,
        (true, Some(_)) => {
            return (
                error(StatusCode::BAD_REQUEST, "over must be a duration from 0s to 24h (\"5m\", \"30s\")"),
                None,
            );
        }
    };
    let Some(changed) = gw.set_drain(&d.route, &d.upstream, drain.then_some(over)) else {
        return (
            error(
                StatusCode::NOT_FOUND,
                "no such route, or no such upstream on it (name it as GET /v1/upstreams lists it)",
            ),
            None,
        );
    };
    let route = escape(&d.route, LOGGED_TARGET);
    let upstream = escape(&d.upstream, LOGGED_TARGET);
    let over_ms = u64::try_from(over.as_millis()).unwrap_or(u64::MAX);
    if drain {
        tracing::warn!(action = "drain", %route, %upstream, over_ms, changed, "admin: upstream drained");
        let event = Event::Drain {
            route: d.route.clone(),
            upstream: d.upstream.clone(),
            over_ms,
        };
        let body = json!({ "drained": d.upstream, "route": d.route, "over_ms": over_ms, "changed": changed });
        ((StatusCode::ACCEPTED, body), Some(event))
    } else {
        tracing::warn!(action = "undrain", %route, %upstream, changed, "admin: upstream back in");
        let event = Event::Undrain {
            route: d.route.clone(),
            upstream: d.upstream.clone(),
        };
        let body = json!({ "undrained": d.upstream, "route": d.route, "changed": changed });
        ((StatusCode::OK, body), Some(event))
    }
}

/// `GET /v1/upstreams`: every route's upstreams, as configured, with their state (`up`;
/// `down` while in back-off after failures or failing its `health_check`; `drained`),
/// whether it is healthy (drain aside), live sessions and in-flight plain requests
/// (DESIGN.md section 13).
fn upstreams(gw: &Gateway) -> Answer {
    let rt = gw.runtime();
    let mut list = Vec::new();
    for (r, route) in rt.config.routes.iter().enumerate() {
        for (i, u) in route.upstreams.iter().enumerate() {
            let health = &rt.health[r][i];
            let load = rt.balancers[r].load(i);
            list.push(json!({
                "route": route.name,
                "upstream": crate::balance::configured_url(u),
                "index": i,
                "state": health.state().label(),
                "healthy": !health.is_down(),
                "sessions": load.map_or(0, |l| l.sessions()),
                "in_flight": load.map_or(0, |l| l.in_flight()),
            }));
        }
    }
    tracing::info!(action = "upstreams", listed = list.len(), "admin: upstreams listed");
    (StatusCode::OK, json!({ "upstreams": list }))
}
