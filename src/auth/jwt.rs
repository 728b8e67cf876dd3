//! JWT authentication: where a token is found, how it is verified, the [`Principal`]
//! a verified token makes, and minting development tokens with the configured secret.
//!
//! Keys are loaded once per config (at start and on reload), never per request.
//! Tokens and secrets never reach `Debug` output, logs or error messages: logs
//! carry [`fingerprint`] instead.

use super::{Credential, Principal};
use crate::config::{ConfigError, Jwt, SecretSource, TokenSource};
use crate::error::AuthFailure;
use crate::keys::{Secret, load_secret};
use base64::Engine;
use http::HeaderMap;
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation, errors::ErrorKind};
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

/// First 8 bytes of the token's SHA-256, hex: lets logs correlate a token without holding it.
pub fn fingerprint(token: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    crate::util::hex(&d.as_ref()[..8])
}

/// Who the client is, after a successful verification.
#[derive(Clone)]
pub struct Identity {
    pub sub: Option<String>,
    /// The verified token, kept so a live session can be re-verified after a reload
    /// (a removed key or a changed issuer/audience cuts it). Never in `Debug`.
    /// Shared (`Arc`): a remembered token's sessions and the memo hold one copy.
    pub token: Arc<str>,
    /// Expiry, seconds since the epoch.
    pub exp: Option<u64>,
    /// Shared: a remembered token's identity is handed out without copying its claims.
    pub claims: Arc<Map<String, Value>>,
    pub fingerprint: Arc<str>,
    /// The key that verified the token.
    pub(crate) key: crate::keys::KeyFingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("sub", &self.sub)
            .field("exp", &self.exp)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// A token found in a request, with where it came from. `Debug` shows the fingerprint only.
pub struct FoundToken {
    pub token: String,
    pub source: TokenSource,
}

impl fmt::Debug for FoundToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FoundToken({:?}, fingerprint {})", self.source, fingerprint(&self.token))
    }
}

/// Verifies tokens with the keys and rules of one config.
pub struct Verifier {
    keys: crate::keys::KeyStore,
    validation: Validation,
    /// `validation` for each allowed algorithm alone, made once: cloning it per token
    /// (its issuer and audience sets) cost an allocation or three per request.
    by_alg: Vec<(Algorithm, Validation)>,
    allowed: Vec<Algorithm>,
    /// Claims that must be present beyond the registered ones jsonwebtoken checks itself.
    extra_required: Vec<String>,
    sources: Vec<TokenSource>,
    revoked: std::collections::HashSet<String>,
    /// The claim that names the user (`jwt.identity_claim`, default `sub`).
    identity_claim: String,
    /// Set explicitly in the config: a token without it is refused.
    identity_required: bool,
    /// Tokens this verifier accepted lately (see [`Memo`]).
    memo: std::sync::Mutex<Memo>,
}

/// Tokens verified lately, by their exact text: a client on a kept-alive connection
/// sends the same token with every request, and checking its signature and parsing its
/// claims again was the largest part of a plain request's CPU. At most [`MEMO_SIZE`]
/// entries (the oldest go first). A remembered token is used again only while it has
/// not expired (with the leeway), is not revoked and the key that verified it is still
/// held; everything after verification (the exclusive-key rule, certificate binding,
/// the route's claims) runs on every request as before. Only successes are kept, and
/// the memo belongs to one loaded config: a reload starts with none.
#[derive(Default)]
struct Memo {
    /// Each token's identity and the key store's generation it was verified under.
    by_token: std::collections::HashMap<Arc<str>, (Arc<Identity>, u64)>,
    order: std::collections::VecDeque<Arc<str>>,
}

/// Entries of a verifier's [`Memo`].
const MEMO_SIZE: usize = 1024;
/// Tokens longer than this are not remembered, which bounds the memo's memory (parsed
/// claims take several times their text).
const MEMO_MAX_TOKEN: usize = 2048;

impl Memo {
    fn get(&self, token: &str) -> Option<&(Arc<Identity>, u64)> {
        self.by_token.get(token)
    }

    fn put(&mut self, id: &Identity, generation: u64) {
        if id.token.len() > MEMO_MAX_TOKEN || self.by_token.contains_key(&*id.token) {
            return;
        }
        while self.by_token.len() >= MEMO_SIZE {
            let Some(old) = self.order.pop_front() else { break };
            self.by_token.remove(&old);
        }
        let key = id.token.clone();
        self.order.push_back(key.clone());
        self.by_token.insert(key, (Arc::new(id.clone()), generation));
    }

    fn forget(&mut self, token: &str) {
        if self.by_token.remove(token).is_some() {
            self.order.retain(|t| &**t != token);
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.allowed)
            .field("sources", &self.sources)
            .field("keys", &self.keys)
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

const REGISTERED: [&str; 5] = ["exp", "nbf", "aud", "iss", "sub"];
/// Longest token accepted, and longest header part in it (base64): larger is malformed.
const MAX_TOKEN: usize = 16 * 1024;
const MAX_HEADER_PART: usize = 4096;
/// Longest `kid` looked up.
const MAX_KID: usize = 256;

/// Read a revocation list: one `jti` per line, `#` comments.
pub fn read_revoked(path: &std::path::Path) -> Result<std::collections::HashSet<String>, String> {
    let text = crate::fsutil::read_text(path, crate::fsutil::MAX_LIST_FILE).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// A stand-in for a secret file not generated yet: SHA-256 of a random value drawn
/// once per process and the file's path.
fn standin_secret(path: &std::path::Path) -> Vec<u8> {
    static SALT: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let salt = SALT.get_or_init(|| {
        let mut b = [0u8; 32];
        // (were random bytes ever missing, a fixed salt still gives one stand-in per path)
        let _ = aws_lc_rs::rand::fill(&mut b);
        b
    });
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(salt);
    ctx.update(path.as_os_str().as_encoded_bytes());
    ctx.finish().as_ref().to_vec()
}

impl Verifier {
    /// Build from `[jwt]` with an already loaded secret (tests, benchmarks).
    pub fn new(cfg: &Jwt, secret: &Secret) -> Verifier {
        let keys = crate::keys::KeyStore::load(
            &Jwt {
                public_key_files: vec![],
                jwks_file: None,
                jwks_url: None,
                ..cfg.clone()
            },
            Some(secret),
            "-",
        )
        .unwrap_or_else(|_| unreachable!("no files to read"));
        Verifier::with_keys(cfg, keys, Default::default())
    }

    /// Load every key source and the revocation list named by `[jwt]`.
    pub fn load(cfg: &Jwt, origin: &str, create_dev_files: bool) -> Result<Verifier, ConfigError> {
        let secret = if cfg.uses_secret() {
            let pending =
                matches!(&cfg.secret, SecretSource::File { path, generate_if_missing: true } if !create_dev_files && !path.value.exists());
            // `check` before the first run: the secret will be generated; verify with a
            // stand-in, one per file (two providers naming one file share a key; two
            // files never look like one).
            Some(if pending {
                let SecretSource::File { path, .. } = &cfg.secret else {
                    unreachable!("matched above")
                };
                Secret::from(standin_secret(&path.value))
            } else {
                load_secret(&cfg.secret, origin, create_dev_files)?
            })
        } else {
            None
        };
        let keys = crate::keys::KeyStore::load(cfg, secret.as_ref(), origin)?;
        let revoked = match &cfg.revoked_jti_file {
            None => Default::default(),
            Some(f) => read_revoked(&f.value).map_err(|m| f.error(origin, m))?,
        };
        Ok(Verifier::with_keys(cfg, keys, revoked))
    }

    fn with_keys(cfg: &Jwt, keys: crate::keys::KeyStore, revoked: std::collections::HashSet<String>) -> Verifier {
        let mut validation = Validation::new(cfg.algorithms.first().copied().unwrap_or(Algorithm::HS256));
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // jsonwebtoken compares `iss` and `aud` only when the token has them: a configured
        // issuer or audience must also make the claim required, or a token minted for
        // another service (same IdP or secret, no `iss`/`aud`) would pass.
        let mut registered: Vec<&str> = cfg
            .required_claims
            .iter()
            .map(String::as_str)
            .filter(|c| REGISTERED.contains(c))
            .collect();
        if cfg.issuer.is_some() && !registered.contains(&"iss") {
            registered.push("iss");
        }
        if !cfg.audience.is_empty() && !registered.contains(&"aud") {
            registered.push("aud");
        }
        validation.set_required_spec_claims(&registered);
        match &cfg.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        if cfg.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&cfg.audience);
        }
        let by_alg = cfg
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = validation.clone();
                v.algorithms = vec![alg];
                (alg, v)
            })
            .collect();
        Verifier {
            keys,
            validation,
            by_alg,
            allowed: cfg.algorithms.clone(),
            extra_required: cfg
                .required_claims
                .iter()
                .filter(|c| !REGISTERED.contains(&c.as_str()))
                .cloned()
                .collect(),
            sources: cfg.token_sources.clone(),
            revoked,
            identity_claim: cfg.identity_claim().to_string(),
            identity_required: cfg.identity_claim.is_some(),
            memo: std::sync::Mutex::default(),
        }
    }

    pub fn keys(&self) -> &crate::keys::KeyStore {
        &self.keys
    }

    /// Whether `jti` is on the revocation list.
    pub fn is_revoked(&self, jti: Option<&str>) -> bool {
        jti.is_some_and(|j| self.revoked.contains(j))
    }

    /// The first token found in the request, trying the configured sources in order.
    pub fn find_token(&self, headers: &HeaderMap, query: Option<&str>) -> Option<FoundToken> {
        self.sources
            .iter()
            .find_map(|s| find_in(s, headers, query).map(|token| FoundToken { token, source: s.clone() }))
    }

    /// The configured token sources.
    pub fn sources(&self) -> &[TokenSource] {
        &self.sources
    }

    /// Check algorithm, key, signature and claims. An unknown `kid` triggers one
    /// (rate-limited) JWKS refetch before it is refused.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        if let Some(id) = self.remembered(token) {
            return Ok(id);
        }
        let generation = self.keys.generation();
        let (alg, kid) = self.check_header(token)?;
        let verified = match self.verify_with_keys(token, alg, kid.as_deref()) {
            Err(AuthFailure::UnknownKid) if Box::pin(self.keys.refetch_for_unknown_kid()).await => {
                self.verify_with_keys(token, alg, kid.as_deref())
            }
            other => other,
        };
        if let Ok(id) = &verified {
            crate::util::lock(&self.memo).put(id, generation);
        }
        verified
    }

    /// `token` as verified before, if it still stands: not expired (leeway included),
    /// not revoked, and the keys unchanged since (a JWKS refresh that drops a key,
    /// renames its `kid` or narrows its `alg` makes every remembered token verify
    /// afresh). One that no longer stands is forgotten, and verified afresh by the
    /// caller (which then gives the precise reason).
    fn remembered(&self, token: &str) -> Option<Identity> {
        let id = {
            let mut memo = crate::util::lock(&self.memo);
            let (id, generation) = memo.get(token)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let stands = *generation == self.keys.generation()
                && id.exp.is_none_or(|exp| exp.saturating_add(self.validation.leeway) > now)
                && !self.is_revoked(jti_text(&id.claims).as_deref());
            if !stands {
                memo.forget(token);
                return None;
            }
            id.clone()
        };
        Some((*id).clone())
    }

    /// Whether a live session's token still passes under this (reloaded) config:
    /// key, signature, issuer, audience, required claims and revocation. Expiry is
    /// left to `close_on_expiry`, so an expired token alone does not fail here.
    pub fn still_valid(&self, token: &str) -> Result<(), AuthFailure> {
        match self.verify_now(token) {
            Err(f) if f != AuthFailure::Expired => Err(f),
            _ => Ok(()),
        }
    }

    /// [`Verifier::verify`] without any network access: a token remembered and still
    /// standing is not checked again, one verified here is remembered. For checks made
    /// inside a live session (a refresh), where waiting on a JWKS refetch would stall
    /// the relay: an unknown `kid` is refused at once.
    pub fn verify_offline(&self, token: &str) -> Result<Identity, AuthFailure> {
        if let Some(id) = self.remembered(token) {
            return Ok(id);
        }
        let generation = self.keys.generation();
        let verified = self.verify_now(token);
        if let Ok(id) = &verified {
            crate::util::lock(&self.memo).put(id, generation);
        }
        verified
    }

    /// Verification without any network access (no JWKS refetch).
    pub fn verify_now(&self, token: &str) -> Result<Identity, AuthFailure> {
        let (alg, kid) = self.check_header(token)?;
        self.verify_with_keys(token, alg, kid.as_deref())
    }

    fn verify_with_keys(&self, token: &str, alg: Algorithm, kid: Option<&str>) -> Result<Identity, AuthFailure> {
        let made;
        let validation = match self.by_alg.iter().find(|(a, _)| *a == alg) {
            Some((_, v)) => v,
            None => {
                let mut v = self.validation.clone();
                v.algorithms = vec![alg];
                made = v;
                &made
            }
        };
        let outcome = self
            .keys
            .try_keys(alg, kid, |key| jsonwebtoken::decode::<Map<String, Value>>(token, key, validation))
            .map_err(|l| match l {
                crate::keys::Lookup::UnknownKid => AuthFailure::UnknownKid,
                crate::keys::Lookup::NoKey => AuthFailure::Algorithm,
            })?;
        let (data, key) = outcome.map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_) => AuthFailure::BadSignature,
            ErrorKind::ExpiredSignature => AuthFailure::Expired,
            ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
            ErrorKind::InvalidIssuer => AuthFailure::BadIssuer,
            ErrorKind::InvalidAudience => AuthFailure::BadAudience,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::UnsupportedAlgorithm => AuthFailure::Algorithm,
            // jsonwebtoken reports a registered claim of the wrong type (`"exp": "123"`) as missing.
            ErrorKind::MissingRequiredClaim(c) if payload_has(token, c) => AuthFailure::Malformed,
            ErrorKind::MissingRequiredClaim(_) => AuthFailure::MissingClaim,
            _ => AuthFailure::Malformed,
        })?;
        let claims = data.claims;
        if self.extra_required.iter().any(|c| !claims.contains_key(c)) {
            return Err(AuthFailure::MissingClaim);
        }
        // RFC 7519 4.1.1: `iss` is one StringOrURI. jsonwebtoken also accepts an array and
        // matches any member, so `["other-idp", "ours"]` would pass a configured issuer.
        if claims.get("iss").is_some_and(|v| !v.is_string()) {
            return Err(AuthFailure::BadIssuer);
        }
        let sub = match claims.get(&self.identity_claim) {
            None if self.identity_required => return Err(AuthFailure::MissingClaim),
            None => None,
            // As for a certificate: an empty name, or one longer than an admin can name
            // in a kick, is no identity (its sessions could not be kicked).
            Some(v) => Some(
                claim_text(v)
                    .filter(|s| !s.is_empty() && s.len() <= crate::tls::MAX_IDENTITY)
                    .ok_or(AuthFailure::Malformed)?,
            ),
        };
        let exp = match claims.get("exp") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                    .ok_or(AuthFailure::Malformed)?,
            ),
        };
        // A `jti` that is neither a string nor a number could never match the
        // revocation list: refused rather than let through unrevocable.
        if claims.get("jti").is_some_and(|j| claim_text(j).is_none()) {
            return Err(AuthFailure::Malformed);
        }
        if self.is_revoked(jti_text(&claims).as_deref()) {
            return Err(AuthFailure::Revoked);
        }
        Ok(Identity {
            sub,
            token: token.into(),
            exp,
            claims: Arc::new(claims),
            fingerprint: fingerprint(token).into(),
            key,
        })
    }

    /// Whether this verifier's issuer and audience rules accept `claims` (keys and
    /// times aside).
    pub(crate) fn accepts_claims(&self, claims: &Map<String, Value>) -> bool {
        let v = &self.validation;
        let iss_ok = v
            .iss
            .as_ref()
            .is_none_or(|set| claims.get("iss").and_then(Value::as_str).is_some_and(|i| set.contains(i)));
        let aud_ok = !v.validate_aud
            || v.aud.as_ref().is_none_or(|set| match claims.get("aud") {
                Some(Value::String(a)) => set.contains(a),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).any(|x| set.contains(x)),
                _ => false,
            });
        iss_ok && aud_ok
    }

    /// Whether this verifier pins strictly more of a token than `other`: an issuer or
    /// an audience where `other` pins none, and nothing `other` pins that it does not.
    /// A token both accept was evidently made for the one that pins more.
    pub(crate) fn pins_more_than(&self, other: &Verifier) -> bool {
        let pins = |v: &Validation| (v.iss.is_some(), v.validate_aud && v.aud.is_some());
        let (a, b) = (pins(&self.validation), pins(&other.validation));
        (a.0 || !b.0) && (a.1 || !b.1) && a != b
    }

    /// Whether no token can pass both this verifier and `other` whatever keys they
    /// share: both name an issuer and the issuers differ (a token has one `iss`, and
    /// it is then required), or both name audiences and none is common (a token made
    /// for both services is meant for both).
    pub fn separated_from(&self, other: &Verifier) -> bool {
        fn disjoint(a: Option<&std::collections::HashSet<String>>, b: Option<&std::collections::HashSet<String>>) -> bool {
            matches!((a, b), (Some(a), Some(b)) if a.is_disjoint(b))
        }
        let (a, b) = (&self.validation, &other.validation);
        disjoint(a.iss.as_ref(), b.iss.as_ref()) || (a.validate_aud && b.validate_aud && disjoint(a.aud.as_ref(), b.aud.as_ref()))
    }

    /// Refuse `alg: none` (any spelling), algorithms outside the allowlist, and `crit`
    /// headers before any signature work, so each gets its own failure reason.
    /// `jku`, `x5u`, `x5c` and `jwk` headers are never looked at; `kid` is only a lookup key.
    fn check_header(&self, token: &str) -> Result<(Algorithm, Option<String>), AuthFailure> {
        let head = token.split('.').next().ok_or(AuthFailure::Malformed)?;
        if head.len() > MAX_HEADER_PART || token.len() > MAX_TOKEN {
            return Err(AuthFailure::Malformed);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .map_err(|_| AuthFailure::Malformed)?;
        let header: Map<String, Value> = serde_json::from_slice(&raw).map_err(|_| AuthFailure::Malformed)?;
        let name = header.get("alg").and_then(Value::as_str).ok_or(AuthFailure::Malformed)?;
        let alg = self
            .allowed
            .iter()
            .copied()
            .find(|a| format!("{a:?}") == name)
            .ok_or(AuthFailure::Algorithm)?;
        if header.contains_key("crit") {
            return Err(AuthFailure::Malformed);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) if k.len() <= MAX_KID => Some(k.clone()),
            Some(_) => return Err(AuthFailure::Malformed),
        };
        Ok((alg, kid))
    }
}

/// The principal a verified token makes; `cert` is the client certificate presented
/// with it, if any (`cert_authenticates`: the route needs it, `jwt+mtls`).
pub(super) fn principal(id: Identity, cert: Option<std::sync::Arc<crate::tls::ClientCert>>, cert_authenticates: bool) -> Principal {
    Principal {
        provider: None,
        jti: jti_text(&id.claims),
        identity: id.sub,
        claims: id.claims,
        expires_at: id.exp,
        credential: Credential {
            token: Some(id.token),
            cert,
            cert_authenticates,
            forward: None,
        },
    }
}

/// The token's `jti` as text: a string as it is, a number as its decimal text (so a
/// numeric `jti` can be revoked like any other); other types have no usable `jti`.
pub fn jti_text(claims: &Map<String, Value>) -> Option<String> {
    claim_text(claims.get("jti")?)
}

/// A string claim as it is, a number as its decimal text; other types have no text.
fn claim_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether the token's payload holds `claim` at all (whatever its type).
fn payload_has(token: &str, claim: &str) -> bool {
    token
        .split('.')
        .nth(1)
        .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|raw| serde_json::from_slice::<Map<String, Value>>(&raw).ok())
        .is_some_and(|m| m.contains_key(claim))
}

/// Check a route's `require_claims`: equality, membership for arrays, and membership
/// in the space-separated OAuth scope strings `scope` and `scp` only (RFC 8693 4.2);
/// any other string claim must match exactly (`role: "x admin"` is not `admin`).
pub fn claims_grant(required: &[(String, String)], claims: &Map<String, Value>) -> bool {
    required.iter().all(|(name, want)| match claims.get(name) {
        Some(Value::String(s)) if name == "scope" || name == "scp" => s.split(' ').any(|p| p == want),
        Some(Value::String(s)) => s == want,
        Some(Value::Array(items)) => items.iter().any(|i| match i {
            Value::String(s) => s == want,
            Value::Number(n) => n.to_string() == *want,
            _ => false,
        }),
        Some(Value::Bool(b)) => b.to_string() == *want,
        Some(Value::Number(n)) => n.to_string() == *want,
        _ => false,
    })
}

/// Certificate binding (RFC 8705): a token with a `cnf` claim is accepted only with the
/// certificate it names in `x5t#S256` (base64url SHA-256 of the DER leaf), on any route.
/// A `cnf` that is not an object, lacks `x5t#S256`, or has members the gateway cannot
/// check (`jwk`, `jkt`, ...: proof of a key it never sees) is refused too: ignoring them
/// would accept a stolen proof-of-possession token as a bearer token.
pub(crate) fn check_binding(claims: &Map<String, Value>, cert: Option<&crate::tls::ClientCert>) -> Result<(), AuthFailure> {
    let Some(cnf) = claims.get("cnf") else { return Ok(()) };
    let Value::Object(cnf) = cnf else {
        return Err(AuthFailure::CertBinding);
    };
    if cnf.keys().any(|k| k != X5T_S256) {
        return Err(AuthFailure::CertBinding);
    }
    match (cnf.get(X5T_S256), cert) {
        (Some(Value::String(x5t)), Some(c)) if c.matches_x5t_s256(x5t) => Ok(()),
        _ => Err(AuthFailure::CertBinding),
    }
}

/// The `cnf` member naming a certificate by its SHA-256 thumbprint (RFC 8705 section 3.1).
pub(super) const X5T_S256: &str = "x5t#S256";

/// A claim as a header value: strings as they are, other JSON values as JSON text.
pub(crate) fn claim_header_value(v: &Value) -> Option<http::HeaderValue> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        other => other.to_string(),
    };
    http::HeaderValue::from_str(&text).ok()
}

/// Extract a token from a first message: raw, or JSON `{"token": "..."}`.
pub fn token_from_message(text: &str) -> Option<String> {
    let t = text.trim();
    if t.starts_with('{') {
        let v: Value = serde_json::from_str(t).ok()?;
        return v.get("token").and_then(Value::as_str).map(str::to_string).filter(|s| !s.is_empty());
    }
    (!t.is_empty()).then(|| t.to_string())
}

/// Find a token in one source. Values are returned as sent; nothing is logged here.
/// The first token found in `sources` (an introspection provider's own sources).
pub(crate) fn find_token_in(sources: &[TokenSource], headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    sources.iter().find_map(|s| find_in(s, headers, query))
}

fn find_in(source: &TokenSource, headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    match source {
        TokenSource::Authorization => headers.get_all(http::header::AUTHORIZATION).iter().find_map(|v| {
            let v = v.to_str().ok()?.trim();
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
                .filter(|t| !t.is_empty())
        }),
        TokenSource::Protocol => {
            crate::util::protocols(headers).find_map(|p| p.strip_prefix("bearer.").filter(|t| !t.is_empty()).map(str::to_string))
        }
        TokenSource::Query(name) => query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_string())
        }),
        TokenSource::FirstMessage => None,
        TokenSource::Cookie(name) => headers.get_all(http::header::COOKIE).iter().find_map(|v| {
            v.to_str().ok()?.split(';').find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                // An empty value (`name=""` too) is no token: later sources still get a turn.
                let v = v.trim().trim_matches('"');
                (k == name && !v.is_empty()).then(|| v.to_string())
            })
        }),
    }
}

/// Mint a token with the configured secret, issuer and audience (for development and tests).
pub fn mint(cfg: &Jwt, secret: &Secret, sub: &str, ttl: std::time::Duration, extra: &[(String, String)]) -> Result<String, String> {
    let alg = cfg.algorithms.first().copied().ok_or("no algorithm configured in jwt.algorithms")?;
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = Map::new();
    claims.insert("sub".into(), Value::String(sub.into()));
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + ttl.as_secs()).into());
    if let Some(iss) = &cfg.issuer {
        claims.insert("iss".into(), Value::String(iss.clone()));
    }
    match cfg.audience.as_slice() {
        [] => {}
        [one] => {
            claims.insert("aud".into(), Value::String(one.clone()));
        }
        many => {
            claims.insert("aud".into(), Value::Array(many.iter().cloned().map(Value::String).collect()));
        }
    }
    for (k, v) in extra {
        // Numbers, booleans, arrays and objects keep their JSON type; anything else is a string.
        let value = serde_json::from_str::<Value>(v)
            .ok()
            .filter(|v| !v.is_string())
            .unwrap_or_else(|| Value::String(v.clone()));
        claims.insert(k.clone(), value);
    }
    jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.bytes())).map_err(|e| format!("cannot sign: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    fn setup() -> (Jwt, Secret) {
        let cfg = Config::from_toml_str("[jwt]\nissuer = \"me\"\naudience = [\"wsgate\"]\n", "t").unwrap();
        (cfg.jwt, Secret::from(b"0123456789abcdef0123456789abcdef".to_vec()))
    }

    #[test]
    fn minted_token_verifies_and_debug_hides_secrets() {
        let (jwt, secret) = setup();
        let v = Verifier::new(&jwt, &secret);
        let t = mint(&jwt, &secret, "alice", Duration::from_secs(60), &[("scope".into(), "echo".into())]).unwrap();
        let id = v.verify_now(&t).unwrap();
        assert_eq!(id.sub.as_deref(), Some("alice"));
        assert_eq!(id.claims["scope"], "echo");
        assert!(!format!("{secret:?}{id:?}{v:?}").contains("0123456789"));
        let found = FoundToken {
            token: t.clone(),
            source: TokenSource::Authorization,
        };
        assert!(!format!("{found:?}").contains(&t));
    }

    #[tokio::test]
    async fn a_remembered_token_is_used_again_only_while_it_stands_and_the_memo_is_bounded() {
        let cfg = Config::from_toml_str("[jwt]\nissuer = \"me\"\naudience = [\"wsgate\"]\nleeway = \"0s\"\n", "t").unwrap();
        let secret = Secret::from(b"0123456789abcdef0123456789abcdef".to_vec());
        let v = Verifier::new(&cfg.jwt, &secret);
        let t = mint(&cfg.jwt, &secret, "alice", Duration::from_secs(1), &[]).unwrap();
        assert_eq!(v.verify(&t).await.unwrap().sub.as_deref(), Some("alice"));
        assert!(v.remembered(&t).is_some(), "a verified token is remembered");
        assert_eq!(v.verify(&t).await.unwrap().sub.as_deref(), Some("alice"));
        // A change of the JWKS keys: remembered tokens are verified afresh.
        v.keys().adopt_jwks(Verifier::new(&cfg.jwt, &secret).keys());
        assert!(v.remembered(&t).is_none(), "remembered across a change of keys");
        assert_eq!(v.verify(&t).await.unwrap().sub.as_deref(), Some("alice"));
        assert!(v.remembered(&t).is_some());
        // Failures are never remembered.
        assert!(v.verify("garbage").await.is_err());
        assert!(v.remembered("garbage").is_none());
        // Past its expiry the remembered token no longer stands: verified afresh, refused.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(v.verify(&t).await.unwrap_err(), AuthFailure::Expired);
        assert!(v.remembered(&t).is_none());
        // Bounded: the oldest go first.
        let first = mint(&cfg.jwt, &secret, "u0", Duration::from_secs(60), &[]).unwrap();
        v.verify(&first).await.unwrap();
        for i in 1..(MEMO_SIZE + 10) {
            let t = mint(&cfg.jwt, &secret, &format!("u{i}"), Duration::from_secs(60), &[]).unwrap();
            v.verify(&t).await.unwrap();
        }
        let memo = crate::util::lock(&v.memo);
        assert_eq!((memo.by_token.len(), memo.order.len()), (MEMO_SIZE, MEMO_SIZE));
        assert!(memo.get(&first).is_none());
    }

    #[test]
    fn failures_are_classified() {
        let (jwt, secret) = setup();
        let v = Verifier::new(&jwt, &secret);
        let expired = mint(&jwt, &secret, "a", Duration::ZERO, &[("exp".into(), "1000".into())]).unwrap();
        assert_eq!(v.verify_now(&expired).unwrap_err(), AuthFailure::Expired);
        let other = mint(
            &jwt,
            &Secret::from(b"another-secret-another-secret-xx".to_vec()),
            "a",
            Duration::from_secs(60),
            &[],
        )
        .unwrap();
        assert_eq!(v.verify_now(&other).unwrap_err(), AuthFailure::BadSignature);
        let wrong_iss = mint(&jwt, &secret, "a", Duration::from_secs(60), &[("iss".into(), "\"x\"".into())]).unwrap();
        assert_eq!(v.verify_now(&wrong_iss).unwrap_err(), AuthFailure::BadIssuer);
        // `iss` is one string: an array naming ours among others is not our issuer.
        let array_iss = mint(
            &jwt,
            &secret,
            "a",
            Duration::from_secs(60),
            &[("iss".into(), "[\"x\", \"me\"]".into())],
        )
        .unwrap();
        assert_eq!(v.verify_now(&array_iss).unwrap_err(), AuthFailure::BadIssuer);
        let wrong_aud = mint(&jwt, &secret, "a", Duration::from_secs(60), &[("aud".into(), "\"x\"".into())]).unwrap();
        assert_eq!(v.verify_now(&wrong_aud).unwrap_err(), AuthFailure::BadAudience);
        assert_eq!(v.verify_now("garbage").unwrap_err(), AuthFailure::Malformed);
        // alg none, hand made.
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"sub":"a","exp":99999999999}"#)
        );
        assert_eq!(v.verify_now(&none).unwrap_err(), AuthFailure::Algorithm);
        let string_exp = mint(
            &jwt,
            &secret,
            "a",
            Duration::from_secs(60),
            &[("exp".into(), "\"99999999999\"".into())],
        )
        .unwrap();
        assert!(v.verify_now(&string_exp).is_err());
    }

    #[test]
    fn a_secret_env_name_that_may_be_a_secret_is_never_echoed() {
        let src = |v: &str| {
            SecretSource::Env(crate::config::Located {
                value: v.to_string(),
                key: "jwt.secret_env".into(),
                line: Some(3),
            })
        };
        let e = load_secret(&src("sk_live_51HxSECRETvalue"), "t", false).unwrap_err();
        assert!(!e.to_string().contains("51HxSECRET"), "{e}");
        let e = load_secret(&src("WSGATE_TEST_UNSET_VAR_X"), "t", false).unwrap_err();
        assert!(e.to_string().contains("WSGATE_TEST_UNSET_VAR_X"), "{e}");
    }

    #[test]
    fn configured_issuer_and_audience_are_required_claims() {
        let (jwt, secret) = setup();
        let v = Verifier::new(&jwt, &secret);
        let no_iss = mint(
            &Jwt {
                issuer: None,
                ..jwt.clone()
            },
            &secret,
            "a",
            Duration::from_secs(60),
            &[],
        )
        .unwrap();
        assert_eq!(v.verify_now(&no_iss).unwrap_err(), AuthFailure::MissingClaim);
        let no_aud = mint(
            &Jwt {
                audience: vec![],
                ..jwt.clone()
            },
            &secret,
            "a",
            Duration::from_secs(60),
            &[],
        )
        .unwrap();
        assert_eq!(v.verify_now(&no_aud).unwrap_err(), AuthFailure::MissingClaim);
        let both = mint(&jwt, &secret, "a", Duration::from_secs(60), &[]).unwrap();
        assert!(v.verify_now(&both).is_ok());
    }

    #[test]
    fn only_scope_strings_are_split_on_spaces() {
        let claims = |v: Value| serde_json::from_value::<Map<String, Value>>(v).unwrap();
        let need = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let c = claims(serde_json::json!({"role": "x admin", "scope": "read echo", "scp": "a b", "roles": ["admin"], "n": 7}));
        assert!(!claims_grant(&need("role", "admin"), &c));
        assert!(claims_grant(&need("role", "x admin"), &c));
        assert!(claims_grant(&need("scope", "echo"), &c));
        assert!(claims_grant(&need("scp", "b"), &c));
        assert!(claims_grant(&need("roles", "admin"), &c));
        assert!(claims_grant(&need("n", "7"), &c));
        assert!(!claims_grant(&need("missing", "x"), &c));
    }

    #[test]
    fn numeric_jti_can_be_revoked() {
        let (jwt, secret) = setup();
        let v = Verifier::with_keys(
            &jwt,
            crate::keys::KeyStore::load(&jwt, Some(&secret), "-").unwrap(),
            ["12345".to_string(), "abc".to_string()].into_iter().collect(),
        );
        let numeric = mint(&jwt, &secret, "a", Duration::from_secs(60), &[("jti".into(), "12345".into())]).unwrap();
        assert_eq!(v.verify_now(&numeric).unwrap_err(), AuthFailure::Revoked);
        let text = mint(&jwt, &secret, "a", Duration::from_secs(60), &[("jti".into(), "abc".into())]).unwrap();
        assert_eq!(v.verify_now(&text).unwrap_err(), AuthFailure::Revoked);
        let other = mint(&jwt, &secret, "a", Duration::from_secs(60), &[("jti".into(), "123456".into())]).unwrap();
        assert!(v.verify_now(&other).is_ok());
        for odd in ["[\"abc\"]", "{\"id\":\"abc\"}", "true"] {
            let t = mint(&jwt, &secret, "a", Duration::from_secs(60), &[("jti".into(), odd.into())]).unwrap();
            assert_eq!(v.verify_now(&t).unwrap_err(), AuthFailure::Malformed, "jti {odd}");
        }
    }

    #[test]
    fn sub_must_be_a_string() {
        // RFC 7519 4.1.2: `sub` is a StringOrURI; jsonwebtoken refuses a number there.
        // Another identity_claim may be a number (see below).
        let (jwt, secret) = setup();
        let v = Verifier::new(&jwt, &secret);
        let t = mint(&jwt, &secret, "x", Duration::from_secs(60), &[("sub".into(), "42".into())]).unwrap();
        assert_eq!(v.verify_now(&t).map(|i| i.sub), Err(AuthFailure::Malformed));
    }

    #[test]
    fn identity_claim_names_the_user_and_is_required_when_set() {
        let cfg = Config::from_toml_str("[jwt]\nrequired_claims = [\"exp\"]\nidentity_claim = \"user_id\"\n", "t").unwrap();
        let secret = Secret::from(b"0123456789abcdef0123456789abcdef".to_vec());
        let v = Verifier::new(&cfg.jwt, &secret);
        let numeric = mint(
            &cfg.jwt,
            &secret,
            "ignored",
            Duration::from_secs(60),
            &[("user_id".into(), "42".into())],
        )
        .unwrap();
        assert_eq!(v.verify_now(&numeric).unwrap().sub.as_deref(), Some("42"));
        let text = mint(
            &cfg.jwt,
            &secret,
            "ignored",
            Duration::from_secs(60),
            &[("user_id".into(), "bob".into())],
        )
        .unwrap();
        assert_eq!(v.verify_now(&text).unwrap().sub.as_deref(), Some("bob"));
        let without = mint(&cfg.jwt, &secret, "alice", Duration::from_secs(60), &[]).unwrap();
        assert_eq!(v.verify_now(&without).unwrap_err(), AuthFailure::MissingClaim);
        let object = mint(
            &cfg.jwt,
            &secret,
            "a",
            Duration::from_secs(60),
            &[("user_id".into(), "{\"a\":1}".into())],
        )
        .unwrap();
        assert_eq!(v.verify_now(&object).unwrap_err(), AuthFailure::Malformed);
        // Unset: `sub`, and a token without it has no user (when `sub` is not required).
        let cfg = Config::from_toml_str("[jwt]\nrequired_claims = [\"exp\"]\n", "t").unwrap();
        let v = Verifier::new(&cfg.jwt, &secret);
        let t = mint(&cfg.jwt, &secret, "alice", Duration::from_secs(60), &[]).unwrap();
        assert_eq!(v.verify_now(&t).unwrap().sub.as_deref(), Some("alice"));
    }

    #[test]
    fn token_sources() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().unwrap());
        h.insert("sec-websocket-protocol", "chat, bearer.xyz".parse().unwrap());
        h.insert("cookie", "a=1; wsgate_token=ck".parse().unwrap());
        assert_eq!(find_in(&TokenSource::Authorization, &h, None).as_deref(), Some("abc"));
        assert_eq!(find_in(&TokenSource::Protocol, &h, None).as_deref(), Some("xyz"));
        assert_eq!(
            find_in(&TokenSource::Cookie("wsgate_token".into()), &h, None).as_deref(),
            Some("ck")
        );
        assert_eq!(
            find_in(&TokenSource::Query("access_token".into()), &h, Some("x=1&access_token=q")).as_deref(),
            Some("q")
        );
        assert_eq!(find_in(&TokenSource::Query("access_token".into()), &h, Some("x=1")), None);
    }
}
