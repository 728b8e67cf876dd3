//! JWT verification keys: the HS* secret, PEM public keys, and JWKS from a file or an
//! HTTPS URL (refreshed on a timer and on an unknown `kid`, rate-limited), given as
//! `jwks_url` or found by OIDC discovery (the issuer's `jwks_uri`, looked up again at
//! every fetch, the document's `issuer` checked each time).
//!
//! Every key carries its algorithm family and is only ever tried with algorithms of
//! that family: an RSA public key can never verify an HS256 token. Symmetric (`oct`)
//! keys in a JWKS are ignored: a key set is public material.

use crate::config::{ConfigError, Jwt, SecretSource};
use crate::util::lock;
use arc_swap::ArcSwap;
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm},
};
use std::fmt;
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Random bytes in a generated development secret.
const GENERATED_SECRET_LEN: usize = 32;
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Time allowed for one JWKS fetch.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Minimum time between two fetches triggered by unknown `kid`s.
pub(crate) const JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);

/// SHA-256 of a key's material in one canonical form, whatever file or JWKS it came
/// from: two providers holding the same key are found out by it.
pub(crate) type KeyFingerprint = [u8; 32];

/// One verification key.
pub(crate) struct Key {
    pub kid: Option<String>,
    /// Algorithms this key may verify (all of its family, or the JWK's `alg`).
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
    pub fingerprint: KeyFingerprint,
}

impl Key {
    fn new(kid: Option<String>, algorithms: Vec<Algorithm>, key: DecodingKey) -> Key {
        Key {
            fingerprint: key_fingerprint(&key),
            kid,
            algorithms,
            key,
        }
    }
}

/// The fingerprint of `key`. An RSA key is (n, e) without leading zeros, so a PEM file
/// (PKCS#1 or SPKI) and a JWK of the same key agree; an EC key is its point's x
/// coordinate (the same in uncompressed, compressed and hybrid form; a point and its
/// negation share it, which only makes the comparison stricter); an Ed25519 key is its
/// 32 bytes either way; a secret is what HMAC makes of it (HMAC-SHA-256 of a fixed
/// text), so `s` and `s` with zero bytes appended, or a long `s` and its SHA-256, which
/// HMAC treats as one key, are one key here too. The family is hashed in, so a secret
/// never equals a public key.
fn key_fingerprint(key: &DecodingKey) -> KeyFingerprint {
    use jsonwebtoken::{AlgorithmFamily, DecodingKeyKind};
    use x509_parser::prelude::FromDer;
    fn trimmed(b: &[u8]) -> &[u8] {
        let zeros = b.iter().take_while(|&&x| x == 0).count();
        &b[zeros..]
    }
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut part = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_be_bytes());
        ctx.update(b);
    };
    let family: &[u8] = match key.family() {
        AlgorithmFamily::Hmac => b"hmac",
        AlgorithmFamily::Rsa => b"rsa",
        AlgorithmFamily::Ec => b"ec",
        AlgorithmFamily::Ed => b"ed",
    };
    part(family);
    match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e } => {
            part(trimmed(n));
            part(trimmed(e));
        }
        DecodingKeyKind::SecretOrDer(der) if key.family() == AlgorithmFamily::Rsa => {
            match x509_parser::public_key::RSAPublicKey::from_der(der) {
                Ok((_, k)) => {
                    part(trimmed(k.modulus));
                    part(trimmed(k.exponent));
                }
                Err(_) => part(der),
            }
        }
        DecodingKeyKind::SecretOrDer(secret) if key.family() == AlgorithmFamily::Hmac => {
            let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
            part(aws_lc_rs::hmac::sign(&k, b"wsgate key fingerprint").as_ref());
        }
        DecodingKeyKind::SecretOrDer(point) if key.family() == AlgorithmFamily::Ec => {
            let x = match point.split_first() {
                Some((0x02 | 0x03, x)) => x,
                Some((_, xy)) => &xy[..xy.len() / 2],
                None => point,
            };
            part(x);
        }
        DecodingKeyKind::SecretOrDer(bytes) => part(bytes),
    }
    let digest = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

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
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether an unset variable's name may be echoed in an error: only a conventional name
/// (`WSGATE_JWT_SECRET`: upper case words joined by `_`). Anything else may be the secret
/// itself, pasted here by mistake (`sk_live_…`, or a base32 secret like `JBSWY3DPEHPK3PXP`).
fn is_conventional_env_name(s: &str) -> bool {
    s.len() <= 64
        && s.contains('_')
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.split('_')
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()))
}

/// Load the HS* secret named by the config. With `generate` and `generate_if_missing`,
/// a missing file is created with 32 random bytes (hex encoded, mode 0600).
pub fn load_secret(src: &SecretSource, origin: &str, generate: bool) -> Result<Secret, ConfigError> {
    let bytes = match src {
        SecretSource::Env(name) => match std::env::var_os(&name.value) {
            Some(v) => v.into_encoded_bytes(),
            None if is_conventional_env_name(&name.value) => {
                return Err(name.error(origin, format!("environment variable {} is not set", name.value)));
            }
            None => return Err(name.error(origin, "the environment variable it names is not set (name not shown)")),
        },
        SecretSource::File { path, generate_if_missing } => {
            let p = &path.value;
            if !p.exists() && *generate_if_missing && generate {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| path.error(origin, format!("cannot create {}: {e}", dir.display())))?;
                }
                let mut raw = [0u8; GENERATED_SECRET_LEN];
                aws_lc_rs::rand::fill(&mut raw).map_err(|_| path.error(origin, "no randomness available"))?;
                let hex = crate::util::hex(&raw);
                crate::fsutil::write_private(p, format!("{hex}\n").as_bytes())
                    .map_err(|e| path.error(origin, format!("cannot create {}: {e}", p.display())))?;
                tracing::warn!(file = %p.display(), "created a random development JWT secret");
            }
            let data = crate::fsutil::read_limited(p, crate::fsutil::MAX_KEY_FILE)
                .map_err(|e| path.error(origin, format!("cannot read {}: {e}", p.display())))?;
            // A trailing newline is an artefact of editors and `echo`, not part of the secret.
            let end = data.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
            data[..end].to_vec()
        }
    };
    if bytes.is_empty() {
        let msg = "the secret is empty";
        return Err(match src {
            SecretSource::Env(name) => name.error(origin, msg),
            SecretSource::File { path, .. } => path.error(origin, msg),
        });
    }
    Ok(Secret(bytes))
}

/// All keys of one config.
pub struct KeyStore {
    fixed: Vec<Key>,
    jwks: ArcSwap<Vec<Key>>,
    remote: Option<Remote>,
    has_jwks: bool,
    /// Bumped at every change of the JWKS keys: what was verified under other keys is
    /// verified again (the JWT memo).
    generation: std::sync::atomic::AtomicU64,
}

struct Remote {
    /// The JWKS, or (`discovery`) the discovery document.
    url: http::Uri,
    /// The issuer the discovery document must name exactly (`None`: `url` is the JWKS).
    discovery: Option<String>,
    /// The discovery document's `jwks_uri` of the last good lookup.
    jwks_uri: Mutex<Option<http::Uri>>,
    /// When a fetch last succeeded.
    fetched: Mutex<Option<Instant>>,
    tls: Arc<rustls::ClientConfig>,
    /// When an unknown `kid` last caused a fetch (scheduled refreshes do not count).
    last_kid_refetch: Mutex<Option<Instant>>,
    fetch_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("fixed", &self.fixed.len())
            .field("jwks", &self.jwks.load().len())
            .finish()
    }
}

fn family_algs(alg: Algorithm) -> Vec<Algorithm> {
    alg.family().algorithms().to_vec()
}

/// Load a PEM public key, detecting RSA, EC or Ed25519. A private key is refused (its
/// RSA form would load and then verify nothing).
pub(crate) fn pem_key(data: &[u8]) -> Option<Key> {
    if data.windows(b"PRIVATE KEY".len()).any(|w| w == b"PRIVATE KEY") {
        return None;
    }
    type Parse = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
    let tries: [(Parse, Algorithm); 3] = [
        (DecodingKey::from_rsa_pem, Algorithm::RS256),
        (DecodingKey::from_ec_pem, Algorithm::ES256),
        (DecodingKey::from_ed_pem, Algorithm::EdDSA),
    ];
    tries
        .iter()
        .find_map(|(f, alg)| f(data).ok().map(|key| Key::new(None, family_algs(*alg), key)))
}

/// Keys of a JWKS document; keys that are symmetric, for encryption, or unparsable are skipped.
pub(crate) fn jwks_keys(set: &JwkSet) -> Vec<Key> {
    set.keys
        .iter()
        .filter_map(|jwk| {
            let family_alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                _ => return None,
            };
            if jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|u| !matches!(u, jsonwebtoken::jwk::PublicKeyUse::Signature))
            {
                return None;
            }
            let algorithms = match jwk.common.key_algorithm {
                None => family_algs(family_alg),
                Some(ka) => {
                    let alg = key_alg(ka)?;
                    if alg.family() != family_alg.family() {
                        return None;
                    }
                    vec![alg]
                }
            };
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some(Key::new(jwk.common.key_id.clone(), algorithms, key))
        })
        .collect()
}

fn key_alg(ka: KeyAlgorithm) -> Option<Algorithm> {
    Some(match ka {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Why a key lookup found nothing usable.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A `kid` was given, a JWKS is configured, and no key has it.
    UnknownKid,
    /// No key of the token's algorithm family.
    NoKey,
}

impl KeyStore {
    /// Load keys from the `[jwt]` sources. `secret` is the HS* key, when HS* is allowed.
    pub fn load(cfg: &Jwt, secret: Option<&Secret>, origin: &str) -> Result<KeyStore, ConfigError> {
        let mut fixed = Vec::new();
        if let Some(s) = secret {
            let hs: Vec<Algorithm> = cfg
                .algorithms
                .iter()
                .copied()
                .filter(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac)
                .collect();
            fixed.push(Key::new(None, hs, DecodingKey::from_secret(s.bytes())));
        }
        for file in &cfg.public_key_files {
            let data = crate::fsutil::read_limited(&file.value, crate::fsutil::MAX_KEY_FILE)
                .map_err(|e| file.error(origin, format!("cannot read {}: {e}", file.value.display())))?;
            let key = pem_key(&data).ok_or_else(|| {
                file.error(
                    origin,
                    format!("{}: not an RSA, EC or Ed25519 public key in PEM", file.value.display()),
                )
            })?;
            fixed.push(key);
        }
        let mut jwks = Vec::new();
        if let Some(file) = &cfg.jwks_file {
            let data = crate::fsutil::read_limited(&file.value, crate::fsutil::MAX_KEY_FILE)
                .map_err(|e| file.error(origin, format!("cannot read {}: {e}", file.value.display())))?;
            let set: JwkSet =
                serde_json::from_slice(&data).map_err(|e| file.error(origin, format!("{}: not a JWKS: {e}", file.value.display())))?;
            jwks.extend(jwks_keys(&set));
        }
        let remote = match &cfg.jwks_url {
            None => None,
            Some(u) => {
                let tls = crate::tls::upstream_client_config(u.ca.as_ref(), origin)?;
                Some(Remote {
                    url: u.url.clone(),
                    discovery: u.discovery.as_ref().map(|d| d.value.clone()),
                    jwks_uri: Mutex::new(None),
                    fetched: Mutex::new(None),
                    tls,
                    last_kid_refetch: Mutex::new(None),
                    fetch_lock: tokio::sync::Mutex::new(()),
                })
            }
        };
        let has_jwks = cfg.jwks_file.is_some() || remote.is_some();
        Ok(KeyStore {
            fixed,
            jwks: ArcSwap::from_pointee(jwks),
            remote,
            has_jwks,
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Fetch the JWKS URL now (at start and on the refresh timer). On failure the
    /// last good set stays in use.
    pub async fn refresh(&self) -> Result<usize, String> {
        let Some(remote) = &self.remote else { return Ok(0) };
        let _one_at_a_time = remote.fetch_lock.lock().await;
        let jwks_url = match &remote.discovery {
            None => remote.url.clone(),
            Some(issuer) => {
                let doc = fetch(&remote.url, remote.tls.clone())
                    .await
                    .map_err(|e| format!("discovery document {}: {e}", remote.url))?;
                let uri = discovered_jwks_uri(&doc, issuer).map_err(|e| format!("discovery document {}: {e}", remote.url))?;
                *lock(&remote.jwks_uri) = Some(uri.clone());
                uri
            }
        };
        let body = fetch(&jwks_url, remote.tls.clone())
            .await
            .map_err(|e| format!("JWKS {jwks_url}: {e}"))?;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("JWKS {jwks_url}: not a JWKS: {e}"))?;
        let keys = jwks_keys(&set);
        let n = keys.len();
        self.jwks.store(Arc::new(keys));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        *lock(&remote.fetched) = Some(Instant::now());
        Ok(n)
    }

    /// Whether a fetch succeeded within `d` (the first fetch of a loop is then skipped:
    /// discovery at start or on reload just made it).
    pub fn fetched_within(&self, d: Duration) -> bool {
        self.remote
            .as_ref()
            .and_then(|r| *lock(&r.fetched))
            .is_some_and(|t| t.elapsed() < d)
    }

    /// Whether the keys come by OIDC discovery.
    pub fn discovers(&self) -> bool {
        self.remote.as_ref().is_some_and(|r| r.discovery.is_some())
    }

    /// Start from another store's JWKS keys (a reload while the IdP is down keeps the
    /// last good set instead of none).
    pub fn adopt_jwks(&self, from: &KeyStore) {
        self.jwks.store(from.jwks.load_full());
        if let (Some(to), Some(from)) = (&self.remote, &from.remote) {
            let uri = lock(&from.jwks_uri).clone();
            *lock(&to.jwks_uri) = uri;
        }
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The JWKS URL, if any.
    pub fn remote_url(&self) -> Option<&http::Uri> {
        self.remote.as_ref().map(|r| &r.url)
    }

    /// Changes whenever the JWKS keys change.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn has_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Whether a key with `fingerprint` is among these keys now (fixed or JWKS).
    pub fn holds(&self, fingerprint: &KeyFingerprint) -> bool {
        self.fixed
            .iter()
            .chain(self.jwks.load().iter())
            .any(|k| k.fingerprint == *fingerprint)
    }

    /// The fingerprints of every key held now.
    pub fn fingerprints(&self) -> Vec<KeyFingerprint> {
        self.fixed.iter().chain(self.jwks.load().iter()).map(|k| k.fingerprint).collect()
    }

    /// Try `f` on every key that may verify a token with `alg` and `kid`: the first
    /// success wins, else the first error. `Err(Lookup)` when there is no such key.
    pub fn try_keys<T, E>(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
        mut f: impl FnMut(&DecodingKey) -> Result<T, E>,
    ) -> Result<Result<(T, KeyFingerprint), E>, Lookup> {
        let jwks = self.jwks.load();
        let fixed = self.fixed.iter().filter(|k| k.algorithms.contains(&alg));
        let from_jwks = jwks
            .iter()
            .filter(|k| k.algorithms.contains(&alg) && (kid.is_none() || k.kid.as_deref() == kid));
        let mut first_err = None;
        for key in fixed.chain(from_jwks) {
            match f(&key.key) {
                Ok(v) => return Ok(Ok((v, key.fingerprint))),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Ok(Err(e)),
            None if kid.is_some() && self.has_jwks => Err(Lookup::UnknownKid),
            None => Err(Lookup::NoKey),
        }
    }

    /// Refetch on an unknown `kid`, at most once per [`JWKS_MIN_REFETCH`]. Returns
    /// whether a fetch happened and succeeded.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let Some(remote) = &self.remote else { return false };
        {
            let mut last = remote.last_kid_refetch.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < JWKS_MIN_REFETCH) {
                return false;
            }
            *last = Some(Instant::now());
        }
        match self.refresh().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refetch failed; keeping the last good key set");
                false
            }
        }
    }
}

/// The `jwks_uri` of an OIDC discovery document whose `issuer` is exactly `issuer`
/// (an https URL with a host). The errors name what failed, never echo the document.
fn discovered_jwks_uri(doc: &[u8], issuer: &str) -> Result<http::Uri, String> {
    #[derive(serde::Deserialize)]
    struct Discovery {
        issuer: Option<serde_json::Value>,
        jwks_uri: Option<serde_json::Value>,
    }
    let d: Discovery = serde_json::from_slice(doc).map_err(|_| "not a JSON object".to_string())?;
    match d.issuer.as_ref().and_then(serde_json::Value::as_str) {
        Some(i) if i == issuer => {}
        Some(_) => return Err(format!("its \"issuer\" is not \"{issuer}\" (they must be equal exactly)")),
        None => return Err("no \"issuer\" string".to_string()),
    }
    let uri = d
        .jwks_uri
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .ok_or("no \"jwks_uri\" string")?;
    let url: http::Uri = uri.parse().map_err(|_| "its \"jwks_uri\" is not a URL".to_string())?;
    if url.scheme_str() != Some("https")
        || url.host().is_none_or(str::is_empty)
        || url.authority().is_some_and(|a| a.as_str().contains('@'))
    {
        return Err("its \"jwks_uri\" is not an https:// URL with a host".to_string());
    }
    Ok(url)
}

/// GET an https URL with a bounded time and body size.
pub(crate) async fn fetch(url: &http::Uri, tls: Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    let work = async {
        let host = url.host().map(crate::util::unbracket).ok_or("URL has no host")?.to_string();
        let port = url.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, url.authority().map_or(host.as_str(), |a| a.as_str()))
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(JWKS_FETCH_TIMEOUT, work)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Fetch the store's JWKS URL once now, then every `every` until `until` is cancelled
/// (the next reload) or `owner` is gone; `report` hears whether each fetch worked. A
/// failed refresh keeps the last good key set.
pub(crate) async fn keep_fresh<T: Send + Sync + 'static>(
    owner: &Arc<T>,
    store: impl for<'a> Fn(&'a T) -> Option<&'a KeyStore> + Send + 'static,
    every: Duration,
    report: impl Fn(bool) + Send + 'static,
    until: tokio_util::sync::CancellationToken,
) {
    let Some(keys) = store(owner).filter(|k| k.has_remote()) else {
        return;
    };
    let fresh = keys.fetched_within(JWKS_MIN_REFETCH);
    match if fresh { Ok(0) } else { keys.refresh().await } {
        Ok(_) if fresh => {}
        Ok(n) => {
            report(true);
            tracing::info!(keys = n, "JWKS loaded");
        }
        Err(e) => {
            report(false);
            tracing::error!(error = %e, "JWKS fetch failed; the last good keys (if any) stay in use, tokens signed by other keys are refused until a fetch succeeds");
        }
    }
    let weak = Arc::downgrade(owner);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = until.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let Some(owner) = weak.upgrade() else { return };
            if let Some(keys) = store(&owner) {
                match keys.refresh().await {
                    Ok(_) => report(true),
                    Err(e) => {
                        report(false);
                        tracing::warn!(error = %e, "JWKS refresh failed; keeping the last good key set");
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discovery_document_must_name_our_issuer_exactly_and_an_https_jwks_uri() {
        let issuer = "https://idp.example";
        let doc = |i: &str, j: &str| format!("{{\"issuer\": {i}, \"jwks_uri\": {j}}}");
        let ok = discovered_jwks_uri(doc("\"https://idp.example\"", "\"https://keys.example/jwks\"").as_bytes(), issuer);
        assert_eq!(ok.map(|u| u.to_string()).ok().as_deref(), Some("https://keys.example/jwks"));
        for (i, j) in [
            ("\"https://idp.example/\"", "\"https://keys.example/jwks\""),
            ("\"https://IDP.example\"", "\"https://keys.example/jwks\""),
            ("[\"https://idp.example\"]", "\"https://keys.example/jwks\""),
            ("null", "\"https://keys.example/jwks\""),
            ("\"https://idp.example\"", "\"http://keys.example/jwks\""),
            ("\"https://idp.example\"", "\"https://u:p@keys.example/jwks\""),
            ("\"https://idp.example\"", "42"),
        ] {
            let e = discovered_jwks_uri(doc(i, j).as_bytes(), issuer).unwrap_err();
            assert!(!e.contains("keys.example"), "no echo of the document: {e}");
        }
        assert!(discovered_jwks_uri(b"<html>", issuer).is_err());
    }

    #[test]
    fn one_key_in_any_form_has_one_fingerprint() {
        let fp = |k: DecodingKey| key_fingerprint(&k);
        // EC: uncompressed, compressed and hybrid forms of one point.
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw().to_vec();
        assert_eq!(raw[0], 4);
        let (x, y) = raw[1..].split_at(32);
        let odd = y[31] & 1;
        let compressed = [&[2 | odd][..], x].concat();
        let hybrid = [&[6 | odd][..], x, y].concat();
        let pem = pem_key(kp.public_key_pem().as_bytes()).unwrap();
        assert_eq!(pem.fingerprint, fp(DecodingKey::from_ec_der(&raw)));
        assert_eq!(pem.fingerprint, fp(DecodingKey::from_ec_der(&compressed)));
        assert_eq!(pem.fingerprint, fp(DecodingKey::from_ec_der(&hybrid)));
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_ne!(pem.fingerprint, fp(DecodingKey::from_ec_der(other.public_key_raw())));
        // HMAC: trailing zero bytes, and a key longer than a block and its SHA-256.
        let s = [b'k'; 40];
        assert_eq!(
            fp(DecodingKey::from_secret(&s)),
            fp(DecodingKey::from_secret(&[&s[..], &[0, 0]].concat()))
        );
        let long = [b'L'; 100];
        let hashed = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &long);
        assert_eq!(fp(DecodingKey::from_secret(&long)), fp(DecodingKey::from_secret(hashed.as_ref())));
        assert_ne!(fp(DecodingKey::from_secret(&s)), fp(DecodingKey::from_secret(&[b'j'; 40])));
        // A secret never equals a public key with the same bytes.
        assert_ne!(fp(DecodingKey::from_secret(&raw)), pem.fingerprint);
        // A private key is no public key.
        assert!(pem_key(kp.serialize_pem().as_bytes()).is_none());
        let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        assert!(pem_key(rsa.serialize_pem().as_bytes()).is_none());
        assert!(pem_key(rsa.public_key_pem().as_bytes()).is_some());
    }

    #[test]
    fn an_unset_secret_variable_is_named_only_when_its_name_is_conventional() {
        let load = |name: &str| {
            let src = SecretSource::Env(crate::config::Located {
                value: name.into(),
                key: "jwt.secret_env".into(),
                line: Some(2),
            });
            let e = load_secret(&src, "t.toml", false).map(|_| ()).unwrap_err();
            assert_eq!(e.key, "jwt.secret_env");
            e.to_string()
        };
        assert!(load("WSGATE_TEST_UNSET_SECRET_1").contains("WSGATE_TEST_UNSET_SECRET_1"));
        for pasted in ["JBSWY3DPEHPK3PXP", "sk_live_abc", "ABC__DEF", "_SECRET_", "A_b"] {
            let shown = load(pasted);
            assert!(!shown.contains(pasted), "{pasted} shown in {shown}");
        }
    }
}
