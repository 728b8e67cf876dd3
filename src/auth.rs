//! JWT authentication: where a token is found, how it is verified, and minting
//! development tokens with the configured secret.
//!
//! Keys are loaded once per config (at start and on reload), never per request.
//! Tokens and secrets never reach `Debug` output, logs or error messages: logs
//! carry [`fingerprint`] instead.

use crate::config::{ConfigError, Jwt, SecretSource, TokenSource};
use crate::error::AuthFailure;
use base64::Engine;
use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde_json::{Map, Value};
use std::fmt;

/// Secret key bytes; `Debug` never shows them.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes, redacted)", self.0.len())
    }
}

impl From<Vec<u8>> for Secret {
    fn from(v: Vec<u8>) -> Self {
        Secret(v)
    }
}

impl Secret {
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Load the HS* secret named by the config. With `generate` and `generate_if_missing`,
/// a missing file is created with 32 random bytes (hex encoded, mode 0600).
pub fn load_secret(src: &SecretSource, origin: &str, generate: bool) -> Result<Secret, ConfigError> {
    let bytes = match src {
        SecretSource::Env(name) => match std::env::var_os(&name.value) {
            Some(v) => v.into_encoded_bytes(),
            None => return Err(name.error(origin, format!("environment variable {} is not set", name.value))),
        },
        SecretSource::File { path, generate_if_missing } => {
            let p = &path.value;
            if !p.exists() && *generate_if_missing && generate {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| path.error(origin, format!("cannot create {}: {e}", dir.display())))?;
                }
                let mut raw = [0u8; 32];
                aws_lc_rs::rand::fill(&mut raw).map_err(|_| path.error(origin, "no randomness available"))?;
                let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                crate::fsutil::write_private(p, format!("{hex}\n").as_bytes())
                    .map_err(|e| path.error(origin, format!("cannot create {}: {e}", p.display())))?;
                tracing::warn!(file = %p.display(), "created a random development JWT secret");
            }
            let data = std::fs::read(p).map_err(|e| path.error(origin, format!("cannot read {}: {e}", p.display())))?;
            // A trailing newline is an artefact of editors and `echo`, not part of the secret.
            let end = data.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
            data[..end].to_vec()
        }
    };
    if bytes.is_empty() {
        let msg = "the JWT secret is empty";
        return Err(match src {
            SecretSource::Env(name) => name.error(origin, msg),
            SecretSource::File { path, .. } => path.error(origin, msg),
        });
    }
    Ok(Secret(bytes))
}

/// First 8 bytes of the token's SHA-256, hex: lets logs correlate a token without holding it.
pub fn fingerprint(token: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Who the client is, after a successful verification.
#[derive(Clone)]
pub struct Identity {
    pub sub: Option<String>,
    /// Expiry, seconds since the epoch.
    pub exp: Option<u64>,
    pub claims: Map<String, Value>,
    pub fingerprint: String,
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
    key: DecodingKey,
    validation: Validation,
    allowed: Vec<Algorithm>,
    /// Claims that must be present beyond the registered ones jsonwebtoken checks itself.
    extra_required: Vec<String>,
    sources: Vec<TokenSource>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.allowed)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

const REGISTERED: [&str; 5] = ["exp", "nbf", "aud", "iss", "sub"];

impl Verifier {
    pub fn new(cfg: &Jwt, secret: &Secret) -> Verifier {
        let mut validation = Validation::new(cfg.algorithms.first().copied().unwrap_or(Algorithm::HS256));
        validation.algorithms = cfg.algorithms.clone();
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let registered: Vec<&String> = cfg.required_claims.iter().filter(|c| REGISTERED.contains(&c.as_str())).collect();
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
        Verifier {
            key: DecodingKey::from_secret(&secret.0),
            validation,
            allowed: cfg.algorithms.clone(),
            extra_required: cfg
                .required_claims
                .iter()
                .filter(|c| !REGISTERED.contains(&c.as_str()))
                .cloned()
                .collect(),
            sources: cfg.token_sources.clone(),
        }
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

    /// Check signature, algorithm and claims.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        self.check_header(token)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
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
            ErrorKind::MissingRequiredClaim(_) => AuthFailure::MissingClaim,
            _ => AuthFailure::Malformed,
        })?;
        let claims = data.claims;
        if self.extra_required.iter().any(|c| !claims.contains_key(c)) {
            return Err(AuthFailure::MissingClaim);
        }
        let sub = match claims.get("sub") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(AuthFailure::Malformed),
        };
        let exp = match claims.get("exp") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                    .ok_or(AuthFailure::Malformed)?,
            ),
        };
        Ok(Identity {
            sub,
            exp,
            claims,
            fingerprint: fingerprint(token),
        })
    }

    /// Refuse `alg: none` (any spelling), algorithms outside the allowlist, and `crit`
    /// headers before any signature work, so each gets its own failure reason.
    fn check_header(&self, token: &str) -> Result<(), AuthFailure> {
        let head = token.split('.').next().ok_or(AuthFailure::Malformed)?;
        if head.len() > 4096 {
            return Err(AuthFailure::Malformed);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .map_err(|_| AuthFailure::Malformed)?;
        let header: Map<String, Value> = serde_json::from_slice(&raw).map_err(|_| AuthFailure::Malformed)?;
        let alg = header.get("alg").and_then(Value::as_str).ok_or(AuthFailure::Malformed)?;
        let allowed = self.allowed.iter().any(|a| format!("{a:?}") == alg);
        if !allowed {
            return Err(AuthFailure::Algorithm);
        }
        if header.contains_key("crit") {
            return Err(AuthFailure::Malformed);
        }
        Ok(())
    }
}

/// Find a token in one source. Values are returned as sent; nothing is logged here.
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
        TokenSource::Protocol => protocols(headers).find_map(|p| p.strip_prefix("bearer.").filter(|t| !t.is_empty()).map(str::to_string)),
        TokenSource::Query(name) => query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_string())
        }),
        TokenSource::Cookie(name) => headers.get_all(http::header::COOKIE).iter().find_map(|v| {
            v.to_str().ok()?.split(';').find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name && !v.is_empty()).then(|| v.trim_matches('"').to_string())
            })
        }),
    }
}

/// The entries of every `Sec-WebSocket-Protocol` header, trimmed.
pub fn protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
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
    jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(&secret.0)).map_err(|e| format!("cannot sign: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    fn setup() -> (Jwt, Secret) {
        let cfg = Config::from_toml_str("[jwt]\nissuer = \"me\"\naudience = [\"wsgate\"]\n", "t").unwrap();
        (cfg.jwt, Secret(b"0123456789abcdef0123456789abcdef".to_vec()))
    }

    #[test]
    fn minted_token_verifies_and_debug_hides_secrets() {
        let (jwt, secret) = setup();
        let v = Verifier::new(&jwt, &secret);
        let t = mint(&jwt, &secret, "alice", Duration::from_secs(60), &[("scope".into(), "echo".into())]).unwrap();
        let id = v.verify(&t).unwrap();
        assert_eq!(id.sub.as_deref(), Some("alice"));
        assert_eq!(id.claims["scope"], "echo");
        assert!(!format!("{secret:?}{id:?}{v:?}").contains("0123456789"));
        let found = FoundToken {
            token: t.clone(),
            source: TokenSource::Authorization,
        };
        assert!(!format!("{found:?}").contains(&t));
    }

    #[test]
    fn failures_are_classified() {
        let (jwt, secret) = setup();
        let v = Verifier::new(&jwt, &secret);
        let expired = mint(&jwt, &secret, "a", Duration::ZERO, &[("exp".into(), "1000".into())]).unwrap();
        assert_eq!(v.verify(&expired).unwrap_err(), AuthFailure::Expired);
        let other = mint(
            &jwt,
            &Secret(b"another-secret-another-secret-xx".to_vec()),
            "a",
            Duration::from_secs(60),
            &[],
        )
        .unwrap();
        assert_eq!(v.verify(&other).unwrap_err(), AuthFailure::BadSignature);
        let wrong_iss = mint(&jwt, &secret, "a", Duration::from_secs(60), &[("iss".into(), "\"x\"".into())]).unwrap();
        assert_eq!(v.verify(&wrong_iss).unwrap_err(), AuthFailure::BadIssuer);
        let wrong_aud = mint(&jwt, &secret, "a", Duration::from_secs(60), &[("aud".into(), "\"x\"".into())]).unwrap();
        assert_eq!(v.verify(&wrong_aud).unwrap_err(), AuthFailure::BadAudience);
        assert_eq!(v.verify("garbage").unwrap_err(), AuthFailure::Malformed);
        // alg none, hand made.
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"sub":"a","exp":99999999999}"#)
        );
        assert_eq!(v.verify(&none).unwrap_err(), AuthFailure::Algorithm);
        let string_exp = mint(
            &jwt,
            &secret,
            "a",
            Duration::from_secs(60),
            &[("exp".into(), "\"99999999999\"".into())],
        )
        .unwrap();
        assert!(v.verify(&string_exp).is_err());
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
