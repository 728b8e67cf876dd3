//! The certificate the wss listeners serve, from files or from ACME: one
//! `ResolvesServerCert` whose certificate can be swapped while the listeners run.
//!
//! A swap changes what the next handshake gets; open sessions keep the TLS state they
//! negotiated. With ACME, the store also answers TLS-ALPN-01 (RFC 8737): a client that
//! offers `acme-tls/1` and nothing else gets the challenge certificate for its SNI name,
//! if one is pending, and no other certificate ever.

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A certificate chain with its key, and the leaf's facts the gateway needs.
pub struct Served {
    pub key: Arc<CertifiedKey>,
    /// notBefore / notAfter of the leaf, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// The leaf's subject alternative names: DNS names (lower case) and IP addresses.
    pub names: Vec<crate::config::AcmeIdentifier>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Served {
    /// Check that `key` belongs to the chain's leaf and read the leaf's validity and names.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Served, String> {
        if chain.is_empty() {
            return Err("no certificate in the chain".into());
        }
        let provider = super::server_provider();
        let key =
            CertifiedKey::from_der(chain, key, &provider).map_err(|e| format!("certificate and key do not form a usable pair: {e}"))?;
        let leaf = key.end_entity_cert().map_err(|e| e.to_string())?.as_ref().to_vec();
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| format!("unreadable certificate: {e}"))?;
        let validity = parsed.validity();
        let mut names = Vec::new();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        names.push(crate::config::AcmeIdentifier::Dns(d.to_ascii_lowercase()));
                    }
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        names.extend(ip.map(crate::config::AcmeIdentifier::Ip));
                    }
                    _ => {}
                }
            }
        }
        if names.is_empty() {
            // No subjectAltName: clients that still accept the subject's CN (OpenSSL's do)
            // reach us under it, so it is the name a request's Host is held to.
            let cn = parsed.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok());
            if let Some(cn) = cn
                .map(|c| c.trim_end_matches('.').to_ascii_lowercase())
                .filter(|c| !c.is_empty() && c.is_ascii())
            {
                names.push(match cn.parse::<std::net::IpAddr>() {
                    Ok(ip) => crate::config::AcmeIdentifier::Ip(ip),
                    Err(_) => crate::config::AcmeIdentifier::Dns(cn),
                });
            }
        }
        Ok(Served {
            key: Arc::new(key),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            names,
        })
    }

    /// Whether the leaf names `host` (lower case, no final dot, as
    /// [`crate::config::normalize_host`] returns it): a DNS name equal to it, a
    /// wildcard `*.rest` for exactly one label before `.rest` (RFC 6125 section 6.4.3;
    /// partial wildcards such as `w*.example.com` match nothing), or its IP address.
    pub fn names_host(&self, host: &str) -> bool {
        self.names_exactly(host) || self.names_by_wildcard(host)
    }

    fn names_exactly(&self, host: &str) -> bool {
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => self.names.contains(&crate::config::AcmeIdentifier::Ip(ip)),
            Err(_) => self.dns_names().any(|n| n == host),
        }
    }

    fn names_by_wildcard(&self, host: &str) -> bool {
        let Some((label, parent)) = host.split_once('.') else {
            return false;
        };
        !label.is_empty()
            && host.parse::<std::net::IpAddr>().is_err()
            && self
                .dns_names()
                .any(|n| n.strip_prefix("*.").is_some_and(|rest| rest == parent && rest.contains('.')))
    }

    fn dns_names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().filter_map(|n| match n {
            crate::config::AcmeIdentifier::Dns(d) => Some(d.as_str()),
            crate::config::AcmeIdentifier::Ip(_) => None,
        })
    }

    /// A short, bounded name for logs and the expiry gauge: the first DNS name (or
    /// address), else `"-"`.
    pub fn first_name(&self) -> String {
        self.names.first().map_or_else(|| "-".to_string(), |n| n.to_string())
    }

    /// Whether the leaf names every one of `wanted`.
    pub fn covers(&self, wanted: &[crate::config::AcmeIdentifier]) -> bool {
        wanted.iter().all(|w| self.names.contains(w))
    }
}

/// Most challenge certificates held at once: one per name of an order.
const MAX_CHALLENGES: usize = crate::config::MAX_ACME_DOMAINS;

/// The served certificates, swappable, and pending TLS-ALPN-01 challenge certificates.
///
/// The certificates in the order they are chosen: `[[tls.certificates]]` as written,
/// then `current` (`[tls]` cert/key, or ACME's). A client's SNI picks the first that
/// names it exactly, else the first that names it by a wildcard; without SNI, or
/// without a match, the first certificate is served.
#[derive(Default)]
pub struct CertStore {
    /// `[tls]` cert/key, or the certificate ACME issued.
    current: ArcSwapOption<Served>,
    /// `[[tls.certificates]]`, in order; replaced as a whole by a reload.
    files: ArcSwap<Vec<Arc<Served>>>,
    /// Beside `[tls.acme]`: the store the ACME task fills (it outlives reloads), whose
    /// certificate and challenges this one serves after its own files.
    acme: Option<Arc<CertStore>>,
    /// By the SNI name the validation server sends (for an IP address: its reverse
    /// name, RFC 8738 section 6).
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("current", &self.current.load())
            .field("files", &self.files.load())
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// A store serving `served` until something else is installed.
    pub fn with(served: Served) -> CertStore {
        let store = CertStore::default();
        store.install(served);
        store
    }

    /// A store serving `files` first, then the certificate of `acme` (the ACME task's
    /// store), and answering its challenges. A reload builds a new one, so the running
    /// one is never changed by a reload that fails.
    pub fn beside_acme(acme: Arc<CertStore>, files: Vec<Served>) -> CertStore {
        let store = CertStore {
            acme: Some(acme),
            ..CertStore::default()
        };
        store.install_files(files);
        store
    }

    /// The store the ACME task fills: the one this store serves beside its files, or
    /// this store itself.
    pub fn acme_store(self: &Arc<Self>) -> Arc<CertStore> {
        self.acme.clone().unwrap_or_else(|| self.clone())
    }

    /// Serve `served` from the next handshake on.
    pub fn install(&self, served: Served) {
        self.current.store(Some(Arc::new(served)));
    }

    /// The certificate served now from `[tls]` or ACME; `None` before ACME's first
    /// issuance, or when only `[[tls.certificates]]` are served.
    pub fn current(&self) -> Option<Arc<Served>> {
        match &self.acme {
            Some(acme) => acme.current(),
            None => self.current.load_full(),
        }
    }

    /// Serve `files` (`[[tls.certificates]]`, in order) from the next handshake on.
    pub fn install_files(&self, files: Vec<Served>) {
        self.files.store(Arc::new(files.into_iter().map(Arc::new).collect()));
    }

    /// Every certificate, in the order they are chosen.
    pub fn all(&self) -> Vec<Arc<Served>> {
        let mut all: Vec<Arc<Served>> = self.files.load().iter().cloned().collect();
        all.extend(self.current());
        all
    }

    /// The certificate a client with this SNI name gets (`None`: no SNI); `None` when
    /// there is no certificate yet (ACME before its first issuance).
    pub fn for_sni(&self, sni: Option<&str>) -> Option<Arc<Served>> {
        let files = self.files.load();
        let current = self.current();
        let mut all = files.iter().chain(current.as_ref());
        if let Some(name) = sni.map(normalize_sni) {
            let pick = all
                .clone()
                .find(|s| s.names_exactly(&name))
                .or_else(|| all.clone().find(|s| s.names_by_wildcard(&name)));
            if let Some(s) = pick {
                return Some(s.clone());
            }
        }
        all.next().cloned()
    }

    /// Answer TLS-ALPN-01 for `sni` with `cert` until [`CertStore::remove_challenge`].
    pub fn add_challenge(&self, sni: &str, cert: Arc<CertifiedKey>) -> Result<(), String> {
        let mut map = crate::util::lock(&self.challenges);
        if map.len() >= MAX_CHALLENGES && !map.contains_key(sni) {
            return Err("too many pending challenges".into());
        }
        map.insert(sni.to_ascii_lowercase(), cert);
        Ok(())
    }

    pub fn remove_challenge(&self, sni: &str) {
        crate::util::lock(&self.challenges).remove(&sni.to_ascii_lowercase());
    }

    fn challenge(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(acme) = &self.acme {
            return acme.challenge(sni);
        }
        crate::util::lock(&self.challenges).get(&sni.to_ascii_lowercase()).cloned()
    }
}

/// Whether the client's handshake is for TLS-ALPN-01: it offers `acme-tls/1` and not
/// `http/1.1` (a validation server offers `acme-tls/1` alone, RFC 8737 section 3). It
/// gets a challenge certificate or nothing, so `acme-tls/1` is negotiated only with a
/// challenge certificate. A client that also offers `http/1.1` is an ordinary client.
pub(super) fn wants_challenge<'a>(offered: impl Iterator<Item = &'a [u8]>) -> bool {
    let (mut acme, mut http) = (false, false);
    for p in offered {
        acme |= p == ACME_TLS_ALPN;
        http |= p == b"http/1.1";
    }
    acme && !http
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if hello.alpn().is_some_and(wants_challenge) {
            return self.challenge(hello.server_name()?);
        }
        self.for_sni(hello.server_name()).map(|s| s.key.clone())
    }
}

/// An SNI name as certificates compare it: lower case, without a final dot.
pub fn normalize_sni(sni: &str) -> String {
    sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with `cn` as its subject and `sans` as DNS names.
    fn cert(cn: &str, sans: Vec<String>) -> Served {
        let mut p = rcgen::CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&key).unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        Served::new(vec![c.der().clone()], der).unwrap()
    }

    #[test]
    fn a_certificate_without_subject_alt_names_is_named_by_its_common_name() {
        let dns = |n: &str| crate::config::AcmeIdentifier::Dns(n.into());
        assert_eq!(cert("Chat.Example.Test.", vec![]).names, [dns("chat.example.test")]);
        assert_eq!(
            cert("127.0.0.1", vec![]).names,
            [crate::config::AcmeIdentifier::Ip("127.0.0.1".parse().unwrap())]
        );
        // With subjectAltNames the CN is not a name (RFC 6125).
        assert_eq!(cert("other.test", vec!["a.test".into()]).names, [dns("a.test")]);
    }

    #[test]
    fn a_client_offering_acme_tls_without_http_is_a_validation_server() {
        let acme: &[u8] = ACME_TLS_ALPN;
        let http: &[u8] = b"http/1.1";
        let h2: &[u8] = b"h2";
        assert!(wants_challenge([acme].into_iter()));
        assert!(wants_challenge([acme, acme].into_iter()));
        // acme-tls/1 would be the only protocol in common: no ordinary certificate.
        assert!(wants_challenge([acme, h2].into_iter()));
        assert!(!wants_challenge([acme, http].into_iter()));
        assert!(!wants_challenge([http, acme].into_iter()));
        assert!(!wants_challenge(std::iter::empty()));
        assert!(!wants_challenge([b"acme-tls/1x".as_slice()].into_iter()));
    }

    #[test]
    fn the_served_certificate_knows_its_names_and_expiry_and_debug_shows_no_key() {
        let ck = rcgen::generate_simple_self_signed(vec!["ws.example.com".to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let served = Served::new(vec![ck.cert.der().clone()], key).unwrap();
        assert!(served.not_after > served.not_before);
        use crate::config::AcmeIdentifier::*;
        assert!(served.covers(&[Dns("ws.example.com".into()), Ip("127.0.0.1".parse().unwrap())]));
        assert!(!served.covers(&[Dns("other.example.com".into())]));
        let store = CertStore::with(served);
        let debug = format!("{store:?}");
        assert!(!debug.contains("PRIVATE") && debug.contains("ws.example.com"), "{debug}");
        // A key that is not the leaf's is refused.
        let other = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
        let wrong = PrivateKeyDer::try_from(other.signing_key.serialize_der()).unwrap();
        assert!(Served::new(vec![ck.cert.der().clone()], wrong).is_err());
    }

    fn served(names: &[&str]) -> Served {
        let ck = rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        Served::new(vec![ck.cert.der().clone()], key).unwrap()
    }

    #[test]
    fn sni_prefers_an_exact_name_over_a_wildcard_and_acme_sits_after_the_files() {
        let store = CertStore::default();
        assert!(store.for_sni(Some("a.example.com")).is_none());
        store.install(served(&["acme.example.com"]));
        store.install_files(vec![
            served(&["first.example.com"]),
            served(&["*.example.com"]),
            served(&["chat.example.com"]),
        ]);
        let pick = |sni: Option<&str>| store.for_sni(sni).unwrap().first_name();
        assert_eq!(pick(Some("chat.example.com")), "chat.example.com");
        assert_eq!(pick(Some("Chat.Example.com.")), "chat.example.com");
        assert_eq!(pick(Some("other.example.com")), "*.example.com");
        assert_eq!(pick(Some("acme.example.com")), "acme.example.com");
        assert_eq!(pick(Some("a.b.example.com")), "first.example.com");
        assert_eq!(pick(None), "first.example.com");
        assert_eq!(store.all().len(), 4);
        // A wildcard never covers its parent, two labels, an address or a partial label.
        let w = served(&["*.example.com", "w*.test.com", "127.0.0.1"]);
        assert!(w.names_host("x.example.com") && w.names_host("127.0.0.1"));
        for host in ["example.com", "a.b.example.com", ".example.com", "wx.test.com", "127.0.0.2"] {
            assert!(!w.names_host(host), "{host}");
        }
    }

    #[test]
    fn beside_acme_the_files_come_first_and_the_acme_store_serves_the_rest() {
        let acme = Arc::new(CertStore::default());
        let store = Arc::new(CertStore::beside_acme(acme.clone(), vec![served(&["files.example.com"])]));
        assert!(Arc::ptr_eq(&store.acme_store(), &acme));
        assert_eq!(store.all().len(), 1, "ACME has issued nothing yet");
        acme.install(served(&["acme.example.com"]));
        let pick = |sni: Option<&str>| store.for_sni(sni).unwrap().first_name();
        assert_eq!(pick(Some("acme.example.com")), "acme.example.com");
        assert_eq!(pick(None), "files.example.com");
        assert_eq!(store.current().unwrap().first_name(), "acme.example.com");
        // Challenges are the ACME store's.
        acme.add_challenge("acme.example.com", served(&["x"]).key).unwrap();
        assert!(store.challenge("acme.example.com").is_some());
    }
}
