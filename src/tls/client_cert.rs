//! Client certificates (mTLS): the verifier built from `tls.client_ca` and
//! `tls.client_crl_files`, and what the gateway keeps of a verified certificate.
//!
//! Verification is rustls' own `WebPkiClientVerifier`, with these settings:
//! - every certificate of the chain (leaf and intermediates) is checked against the CRLs,
//!   and a certificate whose status no CRL covers is refused (as nginx does with
//!   `ssl_crl`): a CRL file must be given for each issuing CA once any is given;
//! - a CRL past its `nextUpdate` is refused too (fail closed: refresh CRLs and send SIGHUP);
//! - `client_auth = "optional"` admits clients without a certificate; one that presents
//!   a certificate that does not verify (expired, unknown CA, revoked) fails the handshake
//!   in both modes.
//!
//! A session keeps its chain and is re-verified against each new config's verifier,
//! at the time of its handshake, so a reload that revokes it or removes its CA closes it.

use crate::config::{ClientAuth, ClientTls, ConfigError, Located};
use base64::Engine;
use rustls::server::{WebPkiClientVerifier, danger::ClientCertVerifier};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime, pem::PemObject};
use std::{fmt, path::Path, sync::Arc};

/// Longest identity (SAN or CN) accepted from a certificate.
pub const MAX_IDENTITY: usize = 256;
/// Longest subject forwarded as a header; a longer one is not forwarded.
pub const MAX_SUBJECT: usize = 1024;

/// Build the client certificate verifier for `[tls] client_ca` (and CRLs), or `None`
/// when no `client_ca` is set.
pub fn client_verifier(
    client: Option<&ClientTls>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    origin: &str,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, ConfigError> {
    let Some(c) = client else { return Ok(None) };
    let mut roots = rustls::RootCertStore::empty();
    let anchors = super::load_certs(&c.ca, origin)?;
    for cert in &anchors {
        roots
            .add(cert.clone())
            .map_err(|e| c.ca.error(origin, format!("unusable CA certificate: {e}")))?;
    }
    let mut crls = Vec::new();
    for f in &c.crl_files {
        crls.extend(load_crls(f, &anchors, origin)?);
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if !crls.is_empty() {
        builder = builder.with_crls(crls).enforce_revocation_expiration();
    }
    if c.auth == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    let at = c.crl_files.first().unwrap_or(&c.ca);
    builder
        .build()
        .map(Some)
        .map_err(|e| at.error(origin, format!("client certificate verification setup failed: {e}")))
}

/// Largest CRL file read (a CA's CRL with a million entries is about 40 MB).
const MAX_CRL_FILE: u64 = 64 << 20;

/// The CRLs in one file: PEM (one or more `X509 CRL` blocks) or a single DER CRL. Each
/// is parsed and checked now, so a bad file is reported with its key and line and a
/// reload with it changes nothing: a CRL signed by a `client_ca` anchor's name must carry
/// that anchor's signature, and one past its `nextUpdate` is refused (it would make every
/// certificate it covers fail). A CRL of an intermediate CA cannot be checked here (the
/// intermediate is not known before a client sends it): it is checked at each handshake.
fn load_crls(
    f: &Located<std::path::PathBuf>,
    anchors: &[CertificateDer<'static>],
    origin: &str,
) -> Result<Vec<CertificateRevocationListDer<'static>>, ConfigError> {
    let path: &Path = &f.value;
    let bytes =
        crate::fsutil::read_limited(path, MAX_CRL_FILE).map_err(|e| f.error(origin, format!("cannot read CRL {}: {e}", path.display())))?;
    let is_pem = bytes.trim_ascii_start().starts_with(b"-----BEGIN");
    let crls: Vec<CertificateRevocationListDer<'static>> = if is_pem {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| f.error(origin, format!("invalid PEM CRL in {}: {e:?}", path.display())))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if crls.is_empty() {
        return Err(f.error(origin, format!("no CRL found in {}", path.display())));
    }
    let anchors: Vec<_> = anchors
        .iter()
        .filter_map(|a| x509_parser::parse_x509_certificate(a.as_ref()).ok().map(|(_, x)| x))
        .collect();
    for crl in &crls {
        let Ok((_, parsed)) = x509_parser::parse_x509_crl(crl.as_ref()) else {
            return Err(f.error(origin, format!("not a valid CRL (PEM or DER): {}", path.display())));
        };
        check_crl(&parsed, &anchors).map_err(|why| f.error(origin, format!("{}: {why}", path.display())))?;
    }
    Ok(crls)
}

/// A CRL's signature (when a `client_ca` anchor has its issuer's name) and freshness.
fn check_crl(
    crl: &x509_parser::revocation_list::CertificateRevocationList<'_>,
    anchors: &[x509_parser::certificate::X509Certificate<'_>],
) -> Result<(), String> {
    let issuer = anchors.iter().filter(|a| a.subject() == crl.issuer()).collect::<Vec<_>>();
    if !issuer.is_empty() && !issuer.iter().any(|a| crl.verify_signature(a.public_key()).is_ok()) {
        return Err("the CRL is not signed by the client_ca certificate it names as its issuer".into());
    }
    if let Some(next) = crl.next_update()
        && next.timestamp() < UnixTime::now().as_secs() as i64
    {
        return Err(format!("the CRL is past its nextUpdate ({next}): fetch a fresh one"));
    }
    Ok(())
}

/// What the gateway keeps of a verified client certificate: the chain (to re-verify it
/// after a reload), its SHA-256, the identity and the subject. `Debug` shows the
/// fingerprint and the escaped identity only.
pub struct ClientCert {
    /// Leaf first, then the intermediates the client sent.
    chain: Vec<CertificateDer<'static>>,
    sha256: [u8; 32],
    identity: Option<String>,
    subject: Option<http::HeaderValue>,
    /// When the handshake verified it: later checks verify at this time, so a reload
    /// applies new anchors and CRLs without turning expiry into a revocation.
    verified_at: UnixTime,
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCert")
            .field("sha256", &self.fingerprint_hex())
            .field("identity", &self.identity.as_deref().map(|i| crate::util::escape(i, MAX_IDENTITY)))
            .finish_non_exhaustive()
    }
}

impl ClientCert {
    /// From the chain rustls verified (leaf first). `None` for an empty chain.
    pub fn from_verified(chain: &[CertificateDer<'_>]) -> Option<ClientCert> {
        let leaf = chain.first()?;
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(d.as_ref());
        let (identity, subject) = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
            Ok((_, x)) => (identity_of(&x), subject_of(&x)),
            Err(_) => (None, None),
        };
        Some(ClientCert {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            sha256,
            identity,
            subject,
            verified_at: UnixTime::now(),
        })
    }

    /// The user this certificate names: its first URI SAN, else its first DNS SAN, else
    /// its CN. `None` when that value is empty, longer than [`MAX_IDENTITY`] or holds a
    /// control character (never a fallback to the next kind).
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// SHA-256 of the DER leaf, lower-case hex (`cert:fingerprint`).
    pub fn fingerprint_hex(&self) -> String {
        crate::util::hex(&self.sha256)
    }

    /// The subject as an RFC 4514 string, every byte outside printable ASCII and every
    /// special character escaped (`cert:subject`); `None` when over [`MAX_SUBJECT`].
    pub fn subject_header(&self) -> Option<&http::HeaderValue> {
        self.subject.as_ref()
    }

    /// Whether `x5t` (a `cnf` `x5t#S256` value: base64url SHA-256 of the DER leaf, RFC 8705)
    /// names this certificate. Padding is tolerated; anything else that is not the
    /// canonical encoding of these 32 bytes does not match.
    pub fn matches_x5t_s256(&self, x5t: &str) -> bool {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        b64.decode(x5t.trim_end_matches('=')).is_ok_and(|d| d == self.sha256)
    }

    /// The `x5t#S256` of this certificate (tests and token minting).
    pub fn x5t_s256(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.sha256)
    }

    /// Whether `verifier` (a reloaded config's) still accepts this chain, at the time of the
    /// original handshake: the CA is still trusted and no CRL revokes any of the chain.
    pub fn still_trusted(&self, verifier: &dyn ClientCertVerifier) -> bool {
        let Some((leaf, rest)) = self.chain.split_first() else {
            return false;
        };
        verifier.verify_client_cert(leaf, rest, self.verified_at).is_ok()
    }
}

/// First URI SAN, else first DNS SAN, else the first CN; refused when not a clean string.
fn identity_of(x: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let sans: Vec<&GeneralName> = match x.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.iter().collect(),
        Ok(None) => Vec::new(),
        // A broken or duplicated SAN extension: no identity rather than a guess.
        Err(_) => return None,
    };
    let uri = sans.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let dns = || {
        sans.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
    };
    let cn = || x.subject().iter_common_name().next().map(|cn| cn.as_str().ok());
    let chosen = match uri.or_else(dns) {
        Some(v) => v,
        None => cn()??,
    };
    let clean = !chosen.is_empty() && chosen.len() <= MAX_IDENTITY && !chosen.chars().any(hides_itself);
    clean.then(|| chosen.to_string())
}

/// Characters that make one identity look like another: control characters, whitespace
/// other than a plain space (no-break, ideographic, ...), and invisible format
/// characters (soft hyphen, zero-width, bidirectional overrides, word joiners, BOM).
/// `alice\u{200B}` would count as another user for the per-user cap but read as alice.
fn hides_itself(c: char) -> bool {
    c.is_control()
        || (c.is_whitespace() && c != ' ')
        || matches!(c, '\u{AD}' | '\u{34F}' | '\u{61C}' | '\u{115F}' | '\u{1160}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
            | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}' | '\u{E0000}'..='\u{E007F}')
}

/// The subject as an RFC 4514 string (last RDN first), made a header value.
fn subject_of(x: &x509_parser::certificate::X509Certificate<'_>) -> Option<http::HeaderValue> {
    let rdns: Vec<String> = x
        .subject()
        .iter_rdn()
        .map(|rdn| rdn.iter().map(attribute).collect::<Vec<_>>().join("+"))
        .collect();
    let text = rdns.into_iter().rev().collect::<Vec<_>>().join(",");
    if text.len() > MAX_SUBJECT {
        return None;
    }
    http::HeaderValue::from_str(&text).ok()
}

/// One `type=value` of RFC 4514: known short names, else the dotted OID; string values
/// escaped, other values as `#` and the hex of their DER.
fn attribute(a: &x509_parser::x509::AttributeTypeAndValue<'_>) -> String {
    use x509_parser::oid_registry as oids;
    let oid = a.attr_type();
    let name = [
        (oids::OID_X509_COMMON_NAME, "CN"),
        (oids::OID_X509_LOCALITY_NAME, "L"),
        (oids::OID_X509_STATE_OR_PROVINCE_NAME, "ST"),
        (oids::OID_X509_ORGANIZATION_NAME, "O"),
        (oids::OID_X509_ORGANIZATIONAL_UNIT, "OU"),
        (oids::OID_X509_COUNTRY_NAME, "C"),
        (oids::OID_X509_STREET_ADDRESS, "STREET"),
        (oids::OID_DOMAIN_COMPONENT, "DC"),
    ]
    .iter()
    .find(|(o, _)| o == oid)
    .map_or_else(|| oid.to_id_string(), |(_, n)| (*n).to_string());
    match a.as_str() {
        Ok(v) => format!("{name}={}", escape_rfc4514(v)),
        Err(_) => {
            let der = crate::util::hex(a.attr_value().data);
            format!("{name}=#{der}")
        }
    }
}

/// RFC 4514 section 2.4 escaping, plus every byte outside printable ASCII as `\XX`, so the
/// result is always a valid header value and a CN cannot pose as another RDN.
fn escape_rfc4514(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.len().saturating_sub(1);
    for (i, c) in v.char_indices() {
        let special =
            matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\') || (i == 0 && (c == '#' || c == ' ')) || (i == last && c == ' ');
        if special {
            out.push('\\');
            out.push(c);
        } else if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\{b:02X}"));
            }
        }
    }
    out
}

/// Files written by [`write_dev_client_cert`].
#[derive(Debug)]
pub struct DevClientCert {
    pub ca_cert: std::path::PathBuf,
    /// Whether the CA was created now (else the existing one signed).
    pub ca_created: bool,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Development only: a client CA in `dir` (`client-ca.crt`, `client-ca.key`, created if
/// missing) and a client certificate for `name` signed by it (`NAME.crt`, `NAME.key`;
/// CN = `name`, client-auth usage, valid 90 days). Keys are written mode 0600 and never
/// replaced. `name` is letters, digits, `.`, `_`, `-`, not starting with a dot.
pub fn write_dev_client_cert(dir: &Path, name: &str) -> Result<DevClientCert, String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name != "client-ca";
    if !valid {
        return Err("--name: use letters, digits, '.', '_' and '-' (at most 64, not starting with '.')".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (ca_cert, ca_key) = (dir.join("client-ca.crt"), dir.join("client-ca.key"));
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    if cert.exists() || key.exists() {
        return Err(format!(
            "{} or its key already exists; remove them or pick another --name",
            cert.display()
        ));
    }
    let ca_created = !ca_cert.exists() && !ca_key.exists();
    let e = |e: rcgen::Error| e.to_string();
    if ca_created {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, "wsgate development client CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        p.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let k = rcgen::KeyPair::generate().map_err(e)?;
        let c = p.self_signed(&k).map_err(e)?;
        crate::fsutil::write_private(&ca_key, k.serialize_pem().as_bytes()).map_err(|x| format!("{}: {x}", ca_key.display()))?;
        std::fs::write(&ca_cert, c.pem()).map_err(|x| format!("{}: {x}", ca_cert.display()))?;
    }
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|x| format!("cannot read {}: {x}", p.display()));
    let ca_signer = rcgen::KeyPair::from_pem(&read(&ca_key)?).map_err(e)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read(&ca_cert)?, ca_signer).map_err(e)?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    // From a day ago (clock skew), for 90 days.
    p.not_before = (std::time::SystemTime::now() - std::time::Duration::from_secs(86400)).into();
    p.not_after = p.not_before + std::time::Duration::from_secs(91 * 86400);
    let k = rcgen::KeyPair::generate().map_err(e)?;
    let c = p.signed_by(&k, &issuer).map_err(e)?;
    crate::fsutil::write_private(&key, k.serialize_pem().as_bytes()).map_err(|x| format!("{}: {x}", key.display()))?;
    std::fs::write(&cert, c.pem()).map_err(|x| format!("{}: {x}", cert.display()))?;
    Ok(DevClientCert {
        ca_cert,
        ca_created,
        cert,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(params: rcgen::CertificateParams) -> ClientCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let c = params.self_signed(&key).unwrap();
        ClientCert::from_verified(&[c.der().clone()]).unwrap()
    }

    fn with_cn(sans: Vec<String>, cn: &str) -> rcgen::CertificateParams {
        let mut p = rcgen::CertificateParams::new(sans).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p
    }

    #[test]
    fn identity_prefers_uri_then_dns_then_cn() {
        let mut p = with_cn(vec!["device-1.example".into()], "cn-name");
        p.subject_alt_names
            .push(rcgen::SanType::URI("spiffe://example/bot".try_into().unwrap()));
        assert_eq!(cert(p).identity(), Some("spiffe://example/bot"));
        assert_eq!(
            cert(with_cn(vec!["device-1.example".into()], "cn-name")).identity(),
            Some("device-1.example")
        );
        assert_eq!(cert(with_cn(vec![], "alice")).identity(), Some("alice"));
    }

    #[test]
    fn control_characters_or_oversized_names_give_no_identity() {
        assert_eq!(cert(with_cn(vec![], "alice\n\u{1b}[31mroot")).identity(), None);
        assert_eq!(cert(with_cn(vec![], &"a".repeat(MAX_IDENTITY + 1))).identity(), None);
        assert_eq!(cert(with_cn(vec![], "")).identity(), None);
        let c = cert(with_cn(vec![], "bad\r\nx-injected: 1"));
        assert!(!format!("{c:?}").contains('\n'));
    }

    #[test]
    fn subject_is_escaped_rfc4514_and_a_valid_header() {
        let mut p = with_cn(vec![], "x, O=Admin\r\né");
        p.distinguished_name.push(rcgen::DnType::OrganizationName, "Acme");
        let c = cert(p);
        let s = c.subject_header().unwrap().to_str().unwrap();
        assert_eq!(s, r"O=Acme,CN=x\, O=Admin\0D\0A\C3\A9");
    }

    #[test]
    fn thumbprint_matches_only_this_certificate() {
        let a = cert(with_cn(vec![], "a"));
        let b = cert(with_cn(vec![], "b"));
        assert!(a.matches_x5t_s256(&a.x5t_s256()));
        assert!(a.matches_x5t_s256(&format!("{}=", a.x5t_s256())));
        assert!(!a.matches_x5t_s256(&b.x5t_s256()));
        assert!(!a.matches_x5t_s256(&a.fingerprint_hex()));
        assert!(!a.matches_x5t_s256(""));
        assert_eq!(a.fingerprint_hex().len(), 64);
    }
}
