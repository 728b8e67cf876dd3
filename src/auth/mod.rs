//! Stage 6, authentication: every method turns what the client presented into one
//! [`Principal`], and a live session asks [`Methods::recheck`] whether its principal
//! still holds under the current configuration (reload, key rotation, a tightened
//! route policy).
//!
//! # Layout
//!
//! - `mod.rs` (this file): [`Principal`], [`Methods`] (every method of one config),
//!   the dispatch by the route's `auth` and the route policy (`require_claims`).
//! - `jwt.rs`: JWT: token sources, verification ([`Verifier`]), minting dev tokens.
//! - `mtls.rs`: the identity a verified client certificate names.
//!
//! A new method (OIDC discovery, introspection, forward auth: `[providers.NAME]`) is
//! its config table, one module here returning a [`Principal`], its arm in
//! [`Methods::authenticate`] / [`Methods::recheck`], and its reasons in `error.rs`.

mod cache;
pub mod forward;
pub mod introspection;
mod jwt;
mod mtls;

pub use crate::keys::{Secret, load_secret};
pub use jwt::{FoundToken, Identity, Verifier, claims_grant, fingerprint, jti_text, mint, read_revoked, token_from_message};
pub(crate) use jwt::{check_binding, claim_header_value};

use crate::config::{AuthMode, Config, ConfigError, Route, TokenSource};
use crate::error::{AuthFailure, RefreshRefusal, Reject};
use crate::tls::ClientCert;
use http::HeaderMap;
use rustls::server::danger::ClientCertVerifier;
use serde_json::{Map, Value};
use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

/// A provider's name and the `wsgate_provider_requests_total` series its requests count
/// into (bound once, when the runtime starts).
pub(crate) struct ProviderRequests {
    name: String,
    metrics: std::sync::OnceLock<crate::metrics::Metrics>,
}

impl ProviderRequests {
    pub(crate) fn new(name: &str) -> ProviderRequests {
        ProviderRequests {
            name: name.to_string(),
            metrics: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn bind(&self, metrics: &crate::metrics::Metrics) {
        let _ = self.metrics.set(metrics.clone());
    }

    pub(crate) fn count(&self, result: &'static str) {
        if let Some(m) = self.metrics.get() {
            m.provider_request(&self.name, result);
        }
    }
}

/// Who the client is, whatever the method: what admission, logs, caps, forwarding and
/// the live re-checks read. `Debug` never shows the credential.
pub struct Principal {
    /// The user: logs, per-user caps, kicks (`None`: a token without an identity claim).
    pub identity: Option<String>,
    /// The `[providers.NAME]` that verified the token (`None`: `[jwt]`, or a
    /// certificate): `alice` of two providers are two users.
    pub provider: Option<String>,
    /// Claims the route policy and `forward_claims` read (a certificate's identity is
    /// `sub`). Dropped once the session relays ([`Principal::for_session`]).
    pub claims: Arc<Map<String, Value>>,
    /// When the credential stops being valid, seconds since the epoch.
    pub expires_at: Option<u64>,
    /// The token id revocations name.
    pub jti: Option<String>,
    /// What the client presented, kept to re-check it under each new config.
    pub credential: Credential,
}

/// What a client authenticated with.
#[derive(Default)]
pub struct Credential {
    /// A verified bearer token. Never in `Debug`.
    pub token: Option<Arc<str>>,
    /// The verified client certificate, whether or not the route authenticates with it.
    pub cert: Option<Arc<ClientCert>>,
    /// The route authenticated with the certificate (`mtls`, `jwt+mtls`).
    pub cert_authenticates: bool,
    /// What a forward auth endpoint was asked (the client's cookie: never in `Debug`),
    /// to ask again on `recheck`, and the answer's `copy_headers` for the upstream.
    pub forward: Option<Box<ForwardCredential>>,
}

/// A client admitted by a forward auth endpoint.
pub struct ForwardCredential {
    pub asked: forward::Asked,
    pub copies: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("identity", &self.identity)
            .field("expires_at", &self.expires_at)
            .field("token", &self.credential.token.as_deref().map(fingerprint))
            .field("cert", &self.credential.cert.as_ref().map(|c| c.fingerprint_hex()))
            .finish_non_exhaustive()
    }
}

impl Principal {
    /// The key of this user under per-user caps: the identity for `[jwt]`, the
    /// provider and the identity otherwise (NUL-separated; a `[jwt]` identity that
    /// starts with NUL is escaped, so no identity of one provider reads as another's).
    pub fn user_key(&self) -> Option<String> {
        Some(scoped(self.provider.as_deref(), self.identity.as_deref()?))
    }

    /// What revocations of this token's `jti` are kept under (scoped by provider).
    pub fn revocation_key(&self) -> Option<String> {
        Some(scoped(self.provider.as_deref(), self.jti.as_deref()?))
    }

    /// A session keeps its credential (to re-check it) and identity, not every claim.
    pub fn for_session(mut self) -> Principal {
        self.claims = Arc::default();
        self
    }
}

/// `name` (an identity, a `jti`) as seen by `provider` (`None`: `[jwt]`): per-user caps,
/// kicks and revocations are keyed by it, so `alice` of two providers are two users and
/// revoking one provider's `jti` leaves another's alone. `[jwt]`'s names are kept as they
/// are (one that starts with NUL is escaped); a provider's are `\0NAME\0name`, and
/// provider names never hold NUL, so no name of one reads as another's.
pub fn scoped(provider: Option<&str>, name: &str) -> String {
    match (provider, name.starts_with('\0')) {
        (Some(p), _) => format!("\0{p}\0{name}"),
        (None, true) => format!("\0\0{name}"),
        (None, false) => name.to_string(),
    }
}

/// What authentication of an upgrade request decided.
pub enum Outcome {
    /// A route with `auth = "none"`.
    Anonymous,
    Authenticated(Principal),
    /// No token in the request: it is to come as the first message after the 101.
    Deferred,
}

/// What authentication saw of a refused client, for the log line (never the token).
#[derive(Default)]
pub struct Seen {
    /// Shared with the verified identity (computed once per remembered token).
    pub token_fingerprint: Option<Arc<str>>,
    pub identity: Option<String>,
}

/// Every authentication method of one configuration.
pub struct Methods {
    jwt: Option<Verifier>,
    /// `[providers.NAME]` that routes use, by name: each with its own keys.
    providers: std::collections::BTreeMap<String, Verifier>,
    /// `[providers.NAME]` of kind forward that routes use, by name.
    forwards: std::collections::BTreeMap<String, Arc<forward::Checker>>,
    /// `[providers.NAME]` of kind introspection that routes use, by name.
    introspectors: std::collections::BTreeMap<String, Arc<introspection::Introspector>>,
    /// The verifier of client certificates (`tls.client_ca`): live sessions re-check
    /// their certificate against the one of each new config.
    client_certs: Option<Arc<dyn ClientCertVerifier>>,
    /// When a token was last refused for a key two providers hold (Unix seconds).
    ambiguity_logged: AtomicU64,
}

/// Seconds between two log lines about tokens refused for a shared key.
const AMBIGUITY_LOG_EVERY: u64 = 60;

impl fmt::Debug for Methods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Methods")
            .field("jwt", &self.jwt)
            .field("providers", &self.providers)
            .field("forwards", &self.forwards.keys().collect::<Vec<_>>())
            .field("introspectors", &self.introspectors.keys().collect::<Vec<_>>())
            .field("client_certs", &self.client_certs.is_some())
            .finish()
    }
}

impl Methods {
    /// Load what `config`'s routes need (keys, secrets, revocation files).
    pub fn load(
        config: &Config,
        client_certs: Option<Arc<dyn ClientCertVerifier>>,
        create_dev_files: bool,
    ) -> Result<Methods, ConfigError> {
        let uses = |provider: Option<&str>| config.routes.iter().any(|r| r.auth.uses_jwt() && r.provider.as_deref() == provider);
        let jwt = if uses(None) {
            Some(Verifier::load(&config.jwt, &config.origin, create_dev_files)?)
        } else {
            None
        };
        let mut providers = std::collections::BTreeMap::new();
        for (name, cfg) in &config.providers {
            if uses(Some(name)) {
                providers.insert(name.clone(), Verifier::load(cfg, &config.origin, create_dev_files)?);
            }
        }
        let mut forwards = std::collections::BTreeMap::new();
        for (name, cfg) in &config.forward_providers {
            if config
                .routes
                .iter()
                .any(|r| r.auth == AuthMode::Forward && r.provider.as_deref() == Some(name))
            {
                forwards.insert(name.clone(), Arc::new(forward::Checker::new(name, cfg, &config.origin)?));
            }
        }
        let mut introspectors = std::collections::BTreeMap::new();
        for (name, cfg) in &config.introspection_providers {
            if config
                .routes
                .iter()
                .any(|r| r.auth == AuthMode::Introspection && r.provider.as_deref() == Some(name))
            {
                introspectors.insert(name.clone(), Arc::new(introspection::Introspector::new(name, cfg, &config.origin)?));
            }
        }
        let methods = Methods {
            jwt,
            providers,
            forwards,
            introspectors,
            client_certs,
            ambiguity_logged: AtomicU64::new(0),
        };
        methods.refuse_shared_keys(config)?;
        Ok(methods)
    }

    /// Two verifiers in use that hold the same key, and that neither issuer nor
    /// audience tells apart, would each accept the other's tokens (`alice` of one
    /// provider passing on the other's routes): a config error. Keys fetched later
    /// (JWKS URLs) are checked per token by [`Methods::exclusive_key`].
    fn refuse_shared_keys(&self, config: &Config) -> Result<(), ConfigError> {
        let all: Vec<_> = self.verifiers().collect();
        for (i, (a_name, a)) in all.iter().enumerate() {
            let ours = a.keys().fingerprints();
            let jwt_of = |n: Option<&str>| n.map_or(&config.jwt, |n| &config.providers[n]);
            let remote = |j: &crate::config::Jwt| {
                let url = j.jwks_url.as_ref().map(|u| u.url.to_string());
                (url, j.jwks_file.as_ref().map(|f| f.value.clone()))
            };
            let (url_a, file_a) = remote(jwt_of(*a_name));
            for (b_name, b) in &all[i + 1..] {
                let (url_b, file_b) = remote(jwt_of(*b_name));
                let same_source = (url_a.is_some() && url_a == url_b) || (file_a.is_some() && file_a == file_b);
                if a.separated_from(b) || !(same_source || b.keys().fingerprints().iter().any(|f| ours.contains(f))) {
                    continue;
                }
                let section = |n: Option<&str>| n.map_or_else(|| "[jwt]".to_string(), |n| format!("[providers.{n}]"));
                let (key, line) = key_place(b_name.map_or(&config.jwt, |n| &config.providers[n]), *b_name);
                return Err(ConfigError {
                    file: config.origin.clone(),
                    line,
                    key,
                    message: format!(
                        "verifies with a key {} also holds, and neither issuer nor audience tells their tokens \
                         apart: each would accept the other's; give each its own keys, or distinct `issuer`s",
                        section(*a_name)
                    ),
                });
            }
        }
        Ok(())
    }

    /// A token of `provider` is refused when another verifier in use holds the key that
    /// verified it and would accept it too (its issuer and audience rules), unless this
    /// one pins more of it (an issuer or audience the other leaves open: the token was
    /// made for this one). Keys two JWKS URLs both serve are found only once fetched;
    /// so a JWKS that takes in another provider's key cannot refuse that provider's
    /// tokens on its own routes when that provider names its issuer.
    fn exclusive_key(&self, provider: Option<&str>, verifier: &Verifier, id: &jwt::Identity) -> Result<(), AuthFailure> {
        for (other, v) in self.verifiers() {
            if other != provider && v.keys().holds(&id.key) && v.accepts_claims(&id.claims) && !verifier.pins_more_than(v) {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if self.ambiguity_logged.load(Ordering::Relaxed) + AMBIGUITY_LOG_EVERY <= now {
                    self.ambiguity_logged.store(now, Ordering::Relaxed);
                    tracing::error!(
                        provider = provider.unwrap_or("[jwt]"),
                        other = other.unwrap_or("[jwt]"),
                        "tokens refused: signed with a key another provider holds too, which would accept them \
                         as well (give each provider its own keys, or distinct issuers); logged once a minute"
                    );
                }
                return Err(AuthFailure::BadSignature);
            }
        }
        Ok(())
    }

    /// The `[jwt]` verifier, when a route uses it.
    pub fn jwt(&self) -> Option<&Verifier> {
        self.jwt.as_ref()
    }

    /// The verifier of `provider` (`None`: `[jwt]`), when a route uses it.
    pub fn verifier(&self, provider: Option<&str>) -> Option<&Verifier> {
        match provider {
            None => self.jwt.as_ref(),
            Some(name) => self.providers.get(name),
        }
    }

    /// Every verifier in use: `[jwt]` as `None`, then the providers by name.
    pub fn verifiers(&self) -> impl Iterator<Item = (Option<&str>, &Verifier)> {
        self.jwt
            .iter()
            .map(|v| (None, v))
            .chain(self.providers.iter().map(|(n, v)| (Some(n.as_str()), v)))
    }

    /// The forward auth provider `name`, when a route uses it.
    pub fn forward(&self, name: &str) -> Option<&Arc<forward::Checker>> {
        self.forwards.get(name)
    }

    /// The introspection provider `name`, when a route uses it.
    pub fn introspector(&self, name: &str) -> Option<&Arc<introspection::Introspector>> {
        self.introspectors.get(name)
    }

    /// Count provider checks into `metrics` (once per runtime).
    pub fn bind_metrics(&self, metrics: &crate::metrics::Metrics) {
        for f in self.forwards.values() {
            f.bind_metrics(metrics);
        }
        for i in self.introspectors.values() {
            i.bind_metrics(metrics);
        }
    }

    /// The client certificate verifier, when `tls.client_ca` is set.
    pub fn client_certs(&self) -> Option<&Arc<dyn ClientCertVerifier>> {
        self.client_certs.as_ref()
    }

    /// Authenticate an upgrade request on `route`: the client certificate the route
    /// needs, then its token (found, verified, bound to the certificate when it says
    /// so), then the route's policy.
    pub async fn authenticate(
        &self,
        route: &Route,
        headers: &HeaderMap,
        query: Option<&str>,
        cert: Option<&Arc<ClientCert>>,
        requested: &forward::Requested<'_>,
        seen: &mut Seen,
    ) -> Result<Outcome, Reject> {
        if route.auth.uses_cert() && cert.is_none() {
            return Err(Reject::ClientCert);
        }
        let principal = match route.auth {
            AuthMode::None => return Ok(Outcome::Anonymous),
            AuthMode::Mtls => {
                let p = mtls::principal(cert).ok_or(Reject::ClientCert)?;
                seen.identity.clone_from(&p.identity);
                p
            }
            AuthMode::Jwt | AuthMode::JwtMtls => {
                let verifier = self.verifier(route.provider.as_deref()).ok_or(Reject::Auth(AuthFailure::Missing))?;
                let Some(found) = verifier.find_token(headers, query) else {
                    if verifier.sources().contains(&TokenSource::FirstMessage) {
                        return Ok(Outcome::Deferred);
                    }
                    return Err(Reject::Auth(AuthFailure::Missing));
                };
                self.token(route, &found.token, cert, seen).await?
            }
            AuthMode::Forward => {
                let p = self.forwarded(route, headers, requested).await?;
                seen.identity.clone_from(&p.identity);
                p
            }
            AuthMode::Introspection => self.introspected(route, headers, query, seen).await?,
        };
        check_policy(route, &principal).map_err(Reject::Auth)?;
        Ok(Outcome::Authenticated(principal))
    }

    /// Ask the route's forward auth endpoint (or its cache) about this client.
    async fn forwarded(&self, route: &Route, headers: &HeaderMap, requested: &forward::Requested<'_>) -> Result<Principal, Reject> {
        let checker = route
            .provider
            .as_deref()
            .and_then(|n| self.forwards.get(n))
            .ok_or(Reject::AuthUnavailable)?;
        let asked = forward::Asked::new(checker.config(), headers, requested).ok_or(Reject::AuthUnavailable)?;
        // Boxed (here and for introspection and a JWKS refetch): a network exchange's
        // future, only when there is one, not inline in every request's future.
        match Box::pin(checker.check(&asked)).await {
            Ok(forward::Answer::Allow { identity, copies }) => Ok(Principal {
                identity: Some(identity),
                provider: route.provider.clone(),
                claims: Arc::default(),
                expires_at: None,
                jti: None,
                credential: Credential {
                    forward: Some(Box::new(ForwardCredential { asked, copies })),
                    ..Credential::default()
                },
            }),
            // A login page for a browser's request; an upgrade cannot follow it.
            Ok(forward::Answer::Deny { status, .. }) if status.is_redirection() && requested.upgrade => {
                Err(Reject::Denied(Box::new(crate::error::Denied {
                    status: http::StatusCode::UNAUTHORIZED,
                    www_authenticate: None,
                    location: None,
                })))
            }
            Ok(forward::Answer::Deny {
                status,
                www_authenticate,
                location,
            }) => Err(Reject::Denied(Box::new(crate::error::Denied {
                status,
                www_authenticate,
                location,
            }))),
            Err(_) => Err(Reject::AuthUnavailable),
        }
    }

    /// Ask the route's introspection endpoint (or its cache) about the client's token.
    async fn introspected(&self, route: &Route, headers: &HeaderMap, query: Option<&str>, seen: &mut Seen) -> Result<Principal, Reject> {
        let introspector = route
            .provider
            .as_deref()
            .and_then(|n| self.introspectors.get(n))
            .ok_or(Reject::AuthUnavailable)?;
        let token = jwt::find_token_in(&introspector.config().token_sources, headers, query).ok_or(Reject::Auth(AuthFailure::Missing))?;
        seen.token_fingerprint = Some(fingerprint(&token).into());
        match Box::pin(introspector.check(&token)).await {
            Ok(introspection::Verdict::Active(a)) => {
                seen.identity = Some(a.identity.clone());
                Ok(Principal {
                    identity: Some(a.identity.clone()),
                    provider: route.provider.clone(),
                    claims: a.claims.clone(),
                    expires_at: a.exp,
                    jti: a.jti.clone(),
                    credential: Credential {
                        token: Some(token.into()),
                        ..Credential::default()
                    },
                })
            }
            Ok(introspection::Verdict::Refused(f)) => Err(Reject::Auth(f)),
            Err(_) => Err(Reject::AuthUnavailable),
        }
    }

    /// Authenticate a token sent as the first message on `route` (`first_message`).
    pub async fn authenticate_message(
        &self,
        route: &Route,
        text: &str,
        cert: Option<&Arc<ClientCert>>,
        seen: &mut Seen,
    ) -> Result<Principal, Reject> {
        let token = token_from_message(text).ok_or(Reject::Auth(AuthFailure::Malformed))?;
        let principal = self.token(route, &token, cert, seen).await?;
        check_policy(route, &principal).map_err(Reject::Auth)?;
        Ok(principal)
    }

    async fn token(&self, route: &Route, token: &str, cert: Option<&Arc<ClientCert>>, seen: &mut Seen) -> Result<Principal, Reject> {
        let verifier = self.verifier(route.provider.as_deref()).ok_or(Reject::Auth(AuthFailure::Missing))?;
        // A remembered token's fingerprint comes with its identity; a refused token's is
        // computed for the log line only then.
        let id = match verifier.verify(token).await {
            Ok(id) => id,
            Err(f) => {
                seen.token_fingerprint = Some(fingerprint(token).into());
                return Err(Reject::Auth(f));
            }
        };
        seen.token_fingerprint = Some(id.fingerprint.clone());
        self.exclusive_key(route.provider.as_deref(), verifier, &id).map_err(Reject::Auth)?;
        seen.identity.clone_from(&id.sub);
        check_binding(&id.claims, cert.map(Arc::as_ref)).map_err(Reject::Auth)?;
        let mut principal = jwt::principal(id, cert.cloned(), route.auth.uses_cert());
        principal.provider.clone_from(&route.provider);
        Ok(principal)
    }

    /// A live session's new token (`refresh = true` on `route`, its route in the current
    /// config): verified as at admission by the provider that verified `current`
    /// (signature, expiry with the leeway, issuer, audience, required claims, the
    /// revocation list, the exclusive-key rule, the certificate binding, the route's
    /// `require_claims`), without network access, and naming the same user as
    /// `current`. Returns the principal the session goes on with.
    pub fn refresh(&self, route: &Route, current: &Principal, token: &str) -> Result<Principal, RefreshRefusal> {
        let issued_by = current.provider.as_deref();
        if !(route.refresh && route.auth.uses_jwt() && route.provider.as_deref() == issued_by) {
            return Err(RefreshRefusal::NotAllowed);
        }
        let verifier = self.verifier(issued_by).ok_or(RefreshRefusal::NotAllowed)?;
        let id = verifier.verify_offline(token).map_err(RefreshRefusal::Auth)?;
        self.exclusive_key(issued_by, verifier, &id).map_err(RefreshRefusal::Auth)?;
        let cert = current.credential.cert.clone();
        check_binding(&id.claims, cert.as_deref()).map_err(RefreshRefusal::Auth)?;
        // Without an identity there is no telling whose token it is.
        if current.identity.is_none() || id.sub != current.identity {
            return Err(RefreshRefusal::OtherIdentity);
        }
        if !claims_grant(&route.require_claims, &id.claims) {
            return Err(RefreshRefusal::Auth(AuthFailure::Forbidden));
        }
        let mut principal = jwt::principal(id, cert, current.credential.cert_authenticates);
        principal.provider.clone_from(&current.provider);
        Ok(principal.for_session())
    }

    /// Whether a live session still passes under this (reloaded) config, as a new
    /// client would on `route` (its route in the new config; `None`: the route is
    /// gone, and only the credential is checked): the certificate presented still
    /// verifies (CA kept, not revoked), the route's auth mode is still met, the token
    /// still verifies (key, issuer, audience, revocation list; expiry is left to
    /// `close_on_expiry`), is still bound to the certificate, and still has the claims
    /// the route requires.
    pub fn recheck(&self, route: Option<&Route>, principal: Option<&Principal>, cert: Option<&Arc<ClientCert>>) -> Result<(), AuthFailure> {
        let cert = principal.and_then(|p| p.credential.cert.as_ref()).or(cert);
        let needs_cert = route.is_some_and(|r| r.auth.uses_cert()) || principal.is_some_and(|p| p.credential.cert_authenticates);
        // Without any client CA now, only sessions that need the certificate end.
        if let Some(c) = cert {
            match &self.client_certs {
                Some(v) if !c.still_trusted(v.as_ref()) => return Err(AuthFailure::CertBinding),
                None if needs_cert => return Err(AuthFailure::CertBinding),
                _ => {}
            }
        }
        let token = principal.and_then(|p| p.credential.token.as_deref());
        let jti = principal.and_then(|p| p.jti.as_deref());
        let issued_by = principal.and_then(|p| p.provider.as_deref());
        let Some(route) = route else {
            return match (token, self.verifier(issued_by)) {
                (Some(_), Some(v)) if v.is_revoked(jti) => Err(AuthFailure::Revoked),
                (Some(t), Some(v)) => v.still_valid(t),
                _ => Ok(()),
            };
        };
        // A route that needs authentication now: an anonymous session ends (it holds no
        // place under the per-user cap and no identity to kick).
        if route.auth != AuthMode::None && principal.is_none() {
            return Err(AuthFailure::Missing);
        }
        // As at admission: `mtls` needs a certificate that names someone, `jwt+mtls` a
        // certificate (the token names the user).
        match route.auth {
            AuthMode::Mtls if cert.and_then(|c| c.identity()).is_none() => return Err(AuthFailure::CertBinding),
            AuthMode::JwtMtls if cert.is_none() => return Err(AuthFailure::CertBinding),
            _ => {}
        }
        // A forward or introspection session is asked again by its own timer
        // (`recheck`); here only whether the route still sends it to the same provider.
        if matches!(route.auth, AuthMode::Forward | AuthMode::Introspection) {
            let held = principal.is_some_and(|p| match route.auth {
                AuthMode::Forward => p.credential.forward.is_some(),
                _ => p.credential.token.is_some(),
            });
            return if held && route.provider.as_deref() == issued_by {
                Ok(())
            } else {
                Err(AuthFailure::BadIssuer)
            };
        }
        if !route.auth.uses_jwt() {
            return Ok(());
        }
        // A route now verified by another provider: the session's token is not its.
        if route.provider.as_deref() != issued_by {
            return Err(AuthFailure::BadIssuer);
        }
        let (Some(token), Some(v)) = (token, self.verifier(issued_by)) else {
            return Err(AuthFailure::Missing);
        };
        if v.is_revoked(jti) {
            return Err(AuthFailure::Revoked);
        }
        match v.verify_now(token) {
            Ok(id) => {
                self.exclusive_key(issued_by, v, &id)?;
                check_binding(&id.claims, cert.map(Arc::as_ref))?;
                if claims_grant(&route.require_claims, &id.claims) {
                    Ok(())
                } else {
                    Err(AuthFailure::Forbidden)
                }
            }
            // Expiry is `close_on_expiry`'s to act on (and its leeway).
            Err(AuthFailure::Expired) => Ok(()),
            Err(f) => Err(f),
        }
    }
}

/// Where a verifier's keys are configured, for an error: its first key file, its JWKS
/// file, its secret, else its table.
fn key_place(j: &crate::config::Jwt, provider: Option<&str>) -> (String, Option<usize>) {
    use crate::config::SecretSource;
    let secret = match &j.secret {
        SecretSource::Env(l) => (l.key.clone(), l.line),
        SecretSource::File { path, .. } => (path.key.clone(), path.line),
    };
    j.public_key_files
        .first()
        .or(j.jwks_file.as_ref())
        .map(|l| (l.key.clone(), l.line))
        .or(j.uses_secret().then_some(secret))
        .unwrap_or_else(|| (provider.map_or_else(|| "jwt".to_string(), |n| format!("providers.{n}")), None))
}

/// The route's policy on an authenticated principal: `require_claims`.
fn check_policy(route: &Route, principal: &Principal) -> Result<(), AuthFailure> {
    if !claims_grant(&route.require_claims, &principal.claims) {
        return Err(AuthFailure::Forbidden);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(provider: Option<&str>, identity: &str) -> Principal {
        Principal {
            identity: Some(identity.to_string()),
            provider: provider.map(str::to_string),
            claims: Arc::default(),
            expires_at: None,
            jti: None,
            credential: Credential::default(),
        }
    }

    #[test]
    fn user_keys_of_different_providers_never_meet() {
        let keys = [
            principal(None, "alice").user_key(),
            principal(Some("partners"), "alice").user_key(),
            principal(Some("other"), "alice").user_key(),
            principal(None, "\0partners\0alice").user_key(),
            principal(Some("partners"), "\0alice").user_key(),
            principal(None, "\0\0alice").user_key(),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(keys[0].as_deref(), Some("alice"), "[jwt] users keep their key");
    }
}
