//! Token introspection (`[providers.NAME] kind = "introspection"`, RFC 7662, DESIGN.md
//! section 15): an opaque token is judged by the issuer's endpoint.
//!
//! The gateway POSTs `token=<t>&token_type_hint=access_token` with HTTP Basic client
//! authentication (RFC 6749 section 2.3.1: id and secret form-encoded first) on a fresh
//! HTTPS connection, within `timeout`, reading at most [`MAX_ANSWER`] bytes. A 200 with a
//! JSON object whose `active` is `true` admits, after the claims are checked like a
//! JWT's (`exp`, `nbf`, `iss`, `aud`); `active: false` is a refusal (reason `inactive`).
//! Anything else (a timeout, another status, garbage, a huge answer) is
//! [`Unanswered`]: 503, never an admission.
//!
//! Answers may be kept `cache` long, never past the token's `exp`, in a bounded map keyed
//! by SHA-256 of the token ([`super::cache::AnswerCache`]); one request per token in
//! flight. The client secret and the token never reach a log, an error or `Debug`.

use super::cache::{AnswerCache, key_of};
use super::forward::{MAX_IDENTITY, Unanswered};
use crate::config::Introspection as IntrospectionConfig;
use crate::error::AuthFailure;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value};
use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// The largest answer read; more → 503.
pub const MAX_ANSWER: usize = 64 * 1024;
/// Larger answers are used but not kept (the cache holds at most 10,000 answers).
const MAX_CACHED_ANSWER: usize = 4 * 1024;

/// What the endpoint said about a token.
#[derive(Clone)]
pub enum Verdict {
    Active(Arc<Active>),
    /// Not active, or active with claims this provider refuses (the reason).
    Refused(AuthFailure),
}

/// An active token's claims.
pub struct Active {
    pub identity: String,
    /// The answer's members (`active` removed): what `require_claims` reads.
    pub claims: std::sync::Arc<Map<String, Value>>,
    pub exp: Option<u64>,
    pub jti: Option<String>,
}

/// One introspection provider at run time.
pub struct Introspector {
    requests: super::ProviderRequests,
    cfg: IntrospectionConfig,
    /// `Basic base64(id:secret)`, marked sensitive.
    authorization: HeaderValue,
    tls: tokio_rustls::TlsConnector,
    /// Verdicts with the size of the answer they came in.
    cache: AnswerCache<(Verdict, usize)>,
}

impl fmt::Debug for Introspector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Introspector")
            .field("name", &self.requests.name())
            .finish_non_exhaustive()
    }
}

impl Introspector {
    pub fn new(name: &str, cfg: &IntrospectionConfig, origin: &str) -> Result<Introspector, crate::config::ConfigError> {
        use base64::Engine;
        let secret = crate::keys::load_secret(&cfg.client_secret, origin, false)?;
        let credentials = format!("{}:{}", form_encode(cfg.client_id.as_bytes()), form_encode(secret.bytes()));
        let basic = base64::engine::general_purpose::STANDARD.encode(credentials);
        let mut authorization = HeaderValue::from_str(&format!("Basic {basic}")).map_err(|_| crate::config::ConfigError {
            file: origin.to_string(),
            line: None,
            key: format!("providers.{name}.client_id"),
            message: "cannot be sent in a header".into(),
        })?;
        authorization.set_sensitive(true);
        let tls = tokio_rustls::TlsConnector::from(crate::tls::upstream_client_config(cfg.ca_file.as_ref(), origin)?);
        Ok(Introspector {
            requests: super::ProviderRequests::new(name),
            cfg: cfg.clone(),
            authorization,
            tls,
            cache: AnswerCache::default(),
        })
    }

    pub fn config(&self) -> &IntrospectionConfig {
        &self.cfg
    }

    /// Count into these metrics from now on (set once, when the runtime starts).
    pub fn bind_metrics(&self, metrics: &crate::metrics::Metrics) {
        self.requests.bind(metrics);
    }

    fn count(&self, result: &'static str) {
        self.requests.count(result);
    }

    /// The verdict on a new client's token: from the cache when `cache` allows (never
    /// past `exp`), else asked (once per token in flight).
    pub async fn check(&self, token: &str) -> Result<Verdict, Unanswered> {
        let key = key_of([token.as_bytes()]);
        let ask = || async { self.ask(token).await };
        let keep = |(v, size): &(Verdict, usize)| {
            let now = Instant::now();
            match v {
                _ if *size > MAX_CACHED_ANSWER || self.cfg.cache.is_zero() => None,
                Verdict::Active(a) => match a.exp {
                    None => Some(now + self.cfg.cache),
                    Some(exp) => {
                        let left = Duration::from_secs(exp.saturating_sub(unix_now()));
                        Some(now + self.cfg.cache.min(left))
                    }
                },
                Verdict::Refused(_) => Some(now + self.cfg.cache),
            }
        };
        let (answer, shared) = self.cache.get_or_ask(key, ask, keep).await;
        if shared && answer.is_ok() {
            self.count("cache_hit");
        }
        answer.map(|(v, _)| v)
    }

    /// Ask again about a live session's token (never from the cache). A refusal also
    /// replaces a kept answer: a revoked token admits no new client from the cache.
    pub async fn recheck(&self, token: &str) -> Result<Verdict, Unanswered> {
        let answer = self.ask(token).await;
        if let Ok((v @ Verdict::Refused(_), size)) = &answer
            && !self.cfg.cache.is_zero()
        {
            self.cache
                .store(key_of([token.as_bytes()]), (v.clone(), *size), Instant::now() + self.cfg.cache);
        }
        answer.map(|(v, _)| v)
    }

    /// Ask the endpoint now. With the verdict, the answer's size.
    pub async fn ask(&self, token: &str) -> Result<(Verdict, usize), Unanswered> {
        let result = match tokio::time::timeout(self.cfg.timeout, self.exchange(token)).await {
            Err(_) => Err(Unanswered::Timeout),
            Ok(r) => r,
        };
        let result = result.and_then(|body| self.judge(&body).map(|v| (v, body.len())));
        self.count(match &result {
            Ok((Verdict::Active(_), _)) => "allow",
            Ok((Verdict::Refused(_), _)) => "deny",
            Err(u) => u.label(),
        });
        result
    }

    async fn exchange(&self, token: &str) -> Result<Vec<u8>, Unanswered> {
        use http_body_util::{BodyExt, Full, Limited};
        let url = &self.cfg.url;
        let host = url.host().map(crate::util::unbracket).ok_or(Unanswered::Error)?;
        let port = url.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(|_| Unanswered::Error)?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|_| Unanswered::Error)?;
        let stream = self.tls.connect(name, tcp).await.map_err(|_| Unanswered::Error)?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(super::forward::MAX_ANSWER_HEAD)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|_| Unanswered::Error)?;
        let task = tokio::spawn(conn);
        let _end = AbortOnDrop(task);
        let body = format!("token={}&token_type_hint=access_token", form_encode(token.as_bytes()));
        let mut req = super::forward::endpoint_request(url, http::Method::POST, Full::new(bytes::Bytes::from(body)))?;
        let h = req.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        h.insert(header::AUTHORIZATION, self.authorization.clone());
        let resp = sender.send_request(req).await.map_err(|_| Unanswered::Error)?;
        if resp.status() != StatusCode::OK {
            if matches!(resp.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                tracing::warn!(provider = %self.requests.name(), status = resp.status().as_u16(), "the introspection endpoint refused the gateway's client credentials (503)");
            }
            return Err(Unanswered::Error);
        }
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|_| Unanswered::Error)?;
        Ok(body.to_bytes().to_vec())
    }

    /// The verdict an answer carries; `Err` for an answer that is not RFC 7662's.
    fn judge(&self, body: &[u8]) -> Result<Verdict, Unanswered> {
        // A member named twice (`{"active": false, "active": true}`) makes the answer
        // ambiguous: unreadable, never the last copy's word.
        let Ok(UniqueObject(mut claims)) = serde_json::from_slice::<UniqueObject>(body) else {
            return Err(Unanswered::Error);
        };
        match claims.remove("active") {
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => return Ok(Verdict::Refused(AuthFailure::Inactive)),
            _ => return Err(Unanswered::Error),
        }
        // A refresh token is active too (RFC 7662 answers for any token the server
        // issued), but it is no bearer credential: refused like an inactive one.
        let refresh = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .is_some_and(|t| t.eq_ignore_ascii_case("refresh_token") || t.eq_ignore_ascii_case("refresh"))
        };
        if refresh("token_type") || refresh("token_use") {
            return Ok(Verdict::Refused(AuthFailure::Inactive));
        }
        Ok(match self.active(claims) {
            Ok(a) => Verdict::Active(Arc::new(a)),
            Err(f) => Verdict::Refused(f),
        })
    }

    /// An active token's claims checked like a JWT's: `exp`, `nbf`, `iss`, `aud`, and
    /// an identity.
    fn active(&self, claims: Map<String, Value>) -> Result<Active, AuthFailure> {
        let now = unix_now();
        let time = |name: &str| -> Result<Option<u64>, AuthFailure> {
            match claims.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or(AuthFailure::Malformed),
            }
        };
        let exp = time("exp")?;
        if exp.is_some_and(|e| e <= now) {
            return Err(AuthFailure::Expired);
        }
        if time("nbf")?.is_some_and(|n| n > now) {
            return Err(AuthFailure::NotYetValid);
        }
        if let Some(iss) = &self.cfg.issuer
            && claims.get("iss").and_then(Value::as_str) != Some(iss.as_str())
        {
            return Err(AuthFailure::BadIssuer);
        }
        if !self.cfg.audience.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => self.cfg.audience.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.cfg.audience.iter().any(|w| w == a)),
                _ => false,
            };
            if !ok {
                return Err(AuthFailure::BadAudience);
            }
        }
        let identity = self.identity(&claims)?;
        let jti = claims.get("jti").and_then(Value::as_str).map(str::to_string);
        Ok(Active {
            identity,
            exp,
            jti,
            claims: claims.into(),
        })
    }

    /// `identity_claim`, else the first of `sub`, `username`, `client_id` the answer
    /// has: a string or a number, non-empty, without control characters. A claim that is
    /// there but unusable refuses the token (`malformed`), never falls back to the next
    /// one: users whose `sub` is broken must not all become their client's one identity.
    fn identity(&self, claims: &Map<String, Value>) -> Result<String, AuthFailure> {
        let present = |name: &str| claims.get(name).filter(|v| !v.is_null());
        let found = match &self.cfg.identity_claim {
            Some(c) => present(c),
            None => ["sub", "username", "client_id"].into_iter().find_map(present),
        };
        let text = match found.ok_or(AuthFailure::MissingClaim)? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(AuthFailure::Malformed),
        };
        if text.is_empty() || text.len() > MAX_IDENTITY || text.chars().any(char::is_control) {
            return Err(AuthFailure::Malformed);
        }
        Ok(text)
    }
}

/// A JSON object whose members are each named once.
struct UniqueObject(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object, each member once")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<UniqueObject, A::Error> {
                let mut members = Map::new();
                while let Some((name, value)) = access.next_entry::<String, Value>()? {
                    if members.contains_key(&name) {
                        return Err(serde::de::Error::custom("a member named twice"));
                    }
                    members.insert(name, value);
                }
                Ok(UniqueObject(members))
            }
        }
        d.deserialize_map(Members)
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `application/x-www-form-urlencoded` of `bytes`: unreserved characters kept, space
/// as `+`, everything else `%XX`.
fn form_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Located, SecretSource};

    fn introspector(issuer: Option<&str>, audience: &[&str], identity_claim: Option<&str>) -> Introspector {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret:/\n").unwrap();
        let cfg = IntrospectionConfig {
            url: "https://idp.example/introspect".parse().unwrap(),
            client_id: "wsgate gw".into(),
            client_secret: SecretSource::File {
                path: Located {
                    value: file,
                    key: "providers.i.client_secret_file".into(),
                    line: None,
                },
                generate_if_missing: false,
            },
            cache: Duration::from_secs(60),
            recheck: None,
            timeout: Duration::from_secs(1),
            ca_file: None,
            issuer: issuer.map(str::to_string),
            audience: audience.iter().map(|a| a.to_string()).collect(),
            identity_claim: identity_claim.map(str::to_string),
            token_sources: vec![crate::config::TokenSource::Authorization],
        };
        Introspector::new("i", &cfg, "<inline>").unwrap()
    }

    fn judge(i: &Introspector, body: &str) -> Result<Verdict, Unanswered> {
        i.judge(body.as_bytes())
    }

    fn refused(v: Result<Verdict, Unanswered>) -> Option<AuthFailure> {
        match v {
            Ok(Verdict::Refused(f)) => Some(f),
            _ => None,
        }
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode(b"a b+c/=%\xff~"), "a+b%2Bc%2F%3D%25%FF~");
    }

    #[test]
    fn answers_judged_like_jwt_claims() {
        let i = introspector(Some("https://idp.example"), &["chat"], None);
        let later = unix_now() + 600;
        let ok = format!(
            r#"{{"active": true, "iss": "https://idp.example", "aud": ["x", "chat"], "client_id": "app", "exp": {later}, "scope": "chat"}}"#
        );
        match judge(&i, &ok) {
            Ok(Verdict::Active(a)) => {
                assert_eq!(a.identity, "app", "client_id when there is no sub or username");
                assert!(a.claims.get("scope").is_some() && a.claims.get("active").is_none());
            }
            _ => panic!("active"),
        }
        assert_eq!(refused(judge(&i, r#"{"active": false}"#)), Some(AuthFailure::Inactive));
        assert_eq!(
            refused(judge(&i, &ok.replace("idp.example\"", "idp.example/\""))),
            Some(AuthFailure::BadIssuer)
        );
        assert_eq!(
            refused(judge(&i, &ok.replace("\"chat\"]", "\"other\"]"))),
            Some(AuthFailure::BadAudience)
        );
        assert_eq!(refused(judge(&i, &ok.replace(&later.to_string(), "1"))), Some(AuthFailure::Expired));
        assert_eq!(
            refused(judge(&i, &ok.replace(&later.to_string(), "\"soon\""))),
            Some(AuthFailure::Malformed)
        );
        assert_eq!(
            refused(judge(&i, &ok.replace("\"client_id\": \"app\"", "\"client_id\": \"\""))),
            Some(AuthFailure::Malformed)
        );
        assert_eq!(
            refused(judge(&i, &ok.replace("\"client_id\": \"app\", ", ""))),
            Some(AuthFailure::MissingClaim)
        );
        // A sub that is there decides, usable or not: never the client's identity instead.
        let with_sub = |sub: &str| ok.replace("\"client_id\"", &format!("\"sub\": {sub}, \"client_id\""));
        assert!(matches!(judge(&i, &with_sub("777")), Ok(Verdict::Active(a)) if a.identity == "777"));
        for bad in [
            r#""ali\u0000ce""#,
            r#""""#,
            "[1]",
            "true",
            &format!("\"{}\"", "x".repeat(MAX_IDENTITY + 1)),
        ] {
            assert_eq!(refused(judge(&i, &with_sub(bad))), Some(AuthFailure::Malformed), "{bad}");
        }
        // A refresh token is active but no bearer credential.
        for t in [r#""token_type": "refresh_token""#, r#""token_use": "Refresh_Token""#] {
            let answer = ok.replace("\"scope\"", &format!("{t}, \"scope\""));
            assert_eq!(refused(judge(&i, &answer)), Some(AuthFailure::Inactive), "{t}");
        }
        assert!(matches!(
            judge(&i, &ok.replace("\"scope\"", "\"token_type\": \"Bearer\", \"scope\"")),
            Ok(Verdict::Active(_))
        ));
        // A member named twice is ambiguous: unreadable, whichever copy comes last.
        for dup in [
            r#"{"active": false, "active": true, "sub": "a"}"#,
            r#"{"active": true, "sub": "a", "sub": "b"}"#,
        ] {
            assert_eq!(judge(&i, dup).err(), Some(Unanswered::Error), "{dup}");
        }
        for garbage in ["", "[]", "{}", r#"{"active": "true"}"#, r#"{"active": 1}"#, "<html>"] {
            assert_eq!(judge(&i, garbage).err(), Some(Unanswered::Error), "{garbage}");
        }
        let named = introspector(None, &[], Some("email"));
        assert!(matches!(judge(&named, r#"{"active": true, "sub": "u1", "email": "a@b"}"#), Ok(Verdict::Active(a)) if a.identity == "a@b"));
        assert_eq!(
            refused(judge(&named, r#"{"active": true, "sub": "u1"}"#)),
            Some(AuthFailure::MissingClaim)
        );
    }

    #[test]
    fn the_secret_is_never_in_debug() {
        let i = introspector(None, &[], None);
        assert!(!format!("{i:?}").contains("Basic"));
        assert!(i.authorization.is_sensitive());
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode("wsgate+gw:s3cret%3A%2F");
        assert_eq!(
            i.authorization.to_str().unwrap(),
            format!("Basic {basic}"),
            "id and secret form-encoded first"
        );
    }
}
