//! The certificate the wss listeners serve, from files or from ACME: one
//! `ResolvesServerCert` whose certificate can be swapped while the listeners run.
//!
//! A swap changes what the next handshake gets; open sessions keep the TLS state they
//! negotiated. With ACME, the store also answers TLS-ALPN-01 (RFC 8737): a client that
//! offers `acme-tls/1` and nothing else gets the challenge certificate for its SNI name,
//! if one is pending, and no other certificate ever.

use arc_swap::ArcSwapOption;
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
        Ok(Served {
            key: Arc::new(key),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            names,
        })
    }

    /// Whether the leaf names every one of `wanted`.
    pub fn covers(&self, wanted: &[crate::config::AcmeIdentifier]) -> bool {
        wanted.iter().all(|w| self.names.contains(w))
    }
}

/// Most challenge certificates held at once: one per name of an order.
const MAX_CHALLENGES: usize = crate::config::MAX_ACME_DOMAINS;

/// The served certificate, swappable, and pending TLS-ALPN-01 challenge certificates.
#[derive(Default)]
pub struct CertStore {
    current: ArcSwapOption<Served>,
    /// By the SNI name the validation server sends (for an IP address: its reverse
    /// name, RFC 8738 section 6).
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("current", &self.current.load())
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

    /// Serve `served` from the next handshake on.
    pub fn install(&self, served: Served) {
        self.current.store(Some(Arc::new(served)));
    }

    /// The certificate served now; `None` before ACME's first issuance.
    pub fn current(&self) -> Option<Arc<Served>> {
        self.current.load_full()
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
        self.current.load().as_ref().map(|s| s.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
