//! TLS: the server config for the wss listeners, client configs for `wss://`
//! upstreams and the `client` command, the self-signed development certificate, and
//! client certificates (mTLS, `client_cert`).

mod certs;
mod client_cert;
pub use certs::{ACME_TLS_ALPN, CertStore, Served, normalize_sni};
pub use client_cert::{ClientCert, DevClientCert, MAX_IDENTITY, MAX_SUBJECT, client_verifier, write_dev_client_cert};

use crate::config::{Config, ConfigError, Located, TlsVersion};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::aws_lc_rs,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use std::{path::Path, sync::Arc};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// The server's suites, AES-128-GCM first: as strong in practice (Mozilla's "modern"
/// profile lists it first), and its SHA-256 key schedule runs on the CPU's SHA
/// extensions where SHA-384 does not; SHA-384 was 7% of the gateway's CPU per
/// handshake in the profile. The server's order wins (`ignore_client_order`).
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite::*;
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            TLS13_AES_128_GCM_SHA256 | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

/// Build the server TLS config from `[tls]`, creating a self-signed development
/// certificate first when the files are missing and `self_signed_if_missing` is set.
/// `client_auth` is the verifier of client certificates ([`client_verifier`]), if any.
///
/// The certificate is served from a [`CertStore`]: with files, a new store holding
/// them; with `[tls.acme]`, `acme` (the store the ACME task fills, which outlives
/// reloads) or a new empty one. The config offers `acme-tls/1` only with ACME.
///
/// With `create` false (`wsgate check`), missing development files are not written:
/// a throw-away certificate is generated in memory so the rest can still be checked.
pub fn server_config(
    cfg: &Config,
    create: bool,
    client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    acme: Option<Arc<CertStore>>,
) -> Result<(Arc<ServerConfig>, Arc<CertStore>), ConfigError> {
    let t = &cfg.tls;
    let origin = &cfg.origin;
    let files = t
        .certificates
        .iter()
        .map(|c| listed_certificate(c, origin))
        .collect::<Result<Vec<_>, _>>()?;
    let store = match (&t.acme, files.is_empty()) {
        (Some(_), true) => acme.unwrap_or_default(),
        (Some(_), false) => Arc::new(CertStore::beside_acme(acme.unwrap_or_default(), files)),
        (None, true) => Arc::new(CertStore::with(file_certificate(cfg, create)?)),
        (None, false) => {
            let store = CertStore::default();
            store.install_files(files);
            Arc::new(store)
        }
    };
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(server_provider())
        .with_protocol_versions(versions)
        .map_err(|e| t.cert.error(origin, format!("TLS setup failed: {e}")))?;
    let builder = match client_auth {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut sc = builder.with_cert_resolver(store.clone());
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    if t.acme.is_some() {
        sc.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    sc.ignore_client_order = true;
    // Resumption for returning clients: stateless tickets plus a bounded session cache.
    sc.ticketer = aws_lc_rs::Ticketer::new().map_err(|e| t.cert.error(origin, format!("TLS ticketer: {e}")))?;
    sc.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok((Arc::new(sc), store))
}

/// A private key as the server's crypto provider signs with it.
pub fn load_signing_key(key: PrivateKeyDer<'static>) -> Result<Arc<dyn rustls::sign::SigningKey>, String> {
    server_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))
}

/// The certificate and key named by `tls.cert` and `tls.key` (created first for
/// development when allowed), checked to belong together.
fn file_certificate(cfg: &Config, create: bool) -> Result<Served, ConfigError> {
    let t = &cfg.tls;
    let origin = &cfg.origin;
    let missing = !t.cert.value.exists() && !t.key.value.exists();
    let (certs, key) = if t.self_signed_if_missing && missing && !create {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).map_err(|e| t.cert.error(origin, e.to_string()))?;
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| t.key.error(origin, e.to_string()))?;
        (vec![ck.cert.der().clone()], key)
    } else {
        if t.self_signed_if_missing && missing {
            write_self_signed(&t.cert.value, &t.key.value)
                .map_err(|e| t.cert.error(origin, format!("cannot create a self-signed certificate: {e}")))?;
            tracing::warn!(cert = %t.cert.value.display(), "created a self-signed development certificate; use a real one in production");
        }
        let certs = load_certs(&t.cert, origin)?;
        let key = read_key(&t.key.value).map_err(|e| t.key.error(origin, e))?;
        (certs, key)
    };
    Served::new(certs, key).map_err(|e| t.key.error(origin, e))
}

/// One `[[tls.certificates]]`, checked like `tls.cert`/`tls.key`.
fn listed_certificate(c: &crate::config::CertificateFiles, origin: &str) -> Result<Served, ConfigError> {
    let certs = load_certs(&c.cert, origin)?;
    let key = read_key(&c.key.value).map_err(|e| c.key.error(origin, e))?;
    Served::new(certs, key).map_err(|e| c.key.error(origin, e))
}

fn pem_error(what: &str, path: &Path, e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("cannot read {what} {}: {io}", path.display()),
        rustls_pki_types::pem::Error::NoItemsFound => format!("no PEM {what} found in {}", path.display()),
        other => format!("invalid PEM {what} in {}: {other:?}", path.display()),
    }
}

/// The PEM certificates in `path` (at most [`crate::fsutil::MAX_KEY_FILE`] bytes, a
/// regular file).
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = crate::fsutil::read_limited(path, crate::fsutil::MAX_KEY_FILE)
        .map_err(|e| format!("cannot read certificate {}: {e}", path.display()))?;
    CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("certificate", path, e))
}

/// The PEM private key in `path` (bounded like [`read_certs`]).
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let data = crate::fsutil::read_limited(path, crate::fsutil::MAX_KEY_FILE)
        .map_err(|e| format!("cannot read private key {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| pem_error("private key", path, e))
}

fn load_certs(loc: &Located<std::path::PathBuf>, origin: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let path = &loc.value;
    let certs = read_certs(path).map_err(|e| loc.error(origin, e))?;
    if certs.is_empty() {
        return Err(loc.error(origin, format!("no PEM certificate found in {}", path.display())));
    }
    Ok(certs)
}

/// Create a self-signed certificate for localhost, 127.0.0.1 and ::1 (key file mode 0600).
pub fn write_self_signed(cert: &Path, key: &Path) -> std::io::Result<()> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).map_err(std::io::Error::other)?;
    for p in [cert, key] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
    }
    crate::fsutil::write_private(key, ck.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(cert, ck.cert.pem())
}

/// Client config for `wss://` upstreams: webpki roots plus an optional CA file.
pub fn upstream_client_config(extra_ca: Option<&Located<std::path::PathBuf>>, origin: &str) -> Result<Arc<ClientConfig>, ConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = extra_ca {
        for cert in load_certs(ca, origin)? {
            roots
                .add(cert)
                .map_err(|e| ca.error(origin, format!("unusable CA certificate: {e}")))?;
        }
    }
    client_config(roots).map_err(|e| ConfigError {
        file: origin.into(),
        line: None,
        key: "tls".into(),
        message: e,
    })
}

fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, String> {
    let mut cc = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cc))
}

/// The verifier of client certificates for `[tls]`, with the server's crypto provider.
pub fn client_auth(cfg: &Config) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, ConfigError> {
    client_verifier(cfg.tls.client.as_ref(), server_provider(), &cfg.origin)
}

/// Client config for the `client` command and tests: webpki roots, or only `ca` when given,
/// or no verification at all when `insecure`.
pub fn cli_client_config(ca: Option<&Path>, insecure: bool) -> Result<Arc<ClientConfig>, String> {
    cli_client_config_with_cert(ca, insecure, None)
}

/// Like [`cli_client_config`], presenting a client certificate (PEM chain, PEM key) when given.
pub fn cli_client_config_with_cert(ca: Option<&Path>, insecure: bool, cert: Option<(&Path, &Path)>) -> Result<Arc<ClientConfig>, String> {
    let identity = match cert {
        None => None,
        Some((chain, key)) => {
            let certs = read_certs(chain)?;
            let key = read_key(key)?;
            Some((certs, key))
        }
    };
    let with_identity = |b: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>| match identity {
        Some((certs, key)) => b
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("client certificate and key do not form a usable pair: {e}")),
        None => Ok(b.with_no_client_auth()),
    };
    if insecure {
        let b = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())));
        let mut cc = with_identity(b)?;
        cc.alpn_protocols = vec![b"http/1.1".to_vec()];
        return Ok(Arc::new(cc));
    }
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("unusable CA certificate in {}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cc = with_identity(b)?;
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cc))
}

/// `--insecure`: accepts any server certificate (still checks handshake signatures).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
