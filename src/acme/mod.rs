//! Automatic certificates (DESIGN.md section 12): ACME (RFC 8555) with the
//! TLS-ALPN-01 challenge (RFC 8737, and RFC 8738 for IP addresses) answered on the wss
//! listeners themselves, through the [`CertStore`] they serve from.
//!
//! At start the cached certificate for the configured names is served at once, without
//! contacting the ACME server. One task then keeps it fresh: it orders when there is
//! none, and again `renew_before` the expiry (at most two thirds into the lifetime, so
//! short-lived certificates are not renewed in a loop). A new certificate is installed
//! like a reload: the next handshake gets it, open sessions keep theirs. A failed order
//! keeps the current certificate, is logged (the problem's type and detail, never a
//! key) and counted, and is retried after a jittered back-off (1 minute doubling to
//! 1 hour), so a fleet restarted together does not hammer the CA in step.
//!
//! | file | concern |
//! |------|---------|
//! | `mod.rs` | the task: schedule, back-off, one order |
//! | `cache.rs` | account and certificate files in `cache_dir`, checks on the directory |
//! | `https.rs` | HTTPS for the ACME client, with deadlines and size caps |

mod cache;
mod https;

use crate::config::{Acme, AcmeIdentifier};
use crate::tls::{CertStore, Served};
use cache::Cache;
use futures_util::FutureExt;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio_util::sync::CancellationToken;

/// First retry after a failed order; each further failure doubles it.
const BACKOFF_MIN: Duration = Duration::from_secs(60);
/// Longest wait between failed orders.
const BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// Budget of one whole order (account, challenges, finalize, download).
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest single sleep: the schedule is re-read from the wall clock at least this
/// often, so a suspended machine or a clock step cannot make the task oversleep.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// Longest ACME error text logged (the server's words, escaped).
const MAX_LOGGED_ERROR: usize = 512;
/// How long the order's authorizations and its certificate are polled for.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));
/// A certificate valid from no later than this ahead of our clock is served.
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// An issued certificate must be valid at least this long.
const MIN_REMAINING: Duration = Duration::from_secs(10);
const ACCOUNT_DOES_NOT_EXIST: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

pub(crate) use cache::check_cache_dir;

/// Directory URLs of servers whose certificates no browser trusts (staging and test
/// CAs, anything on this host): `check` warns.
pub(crate) fn is_test_directory(url: &str) -> bool {
    let host = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| {
            u.host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase())
        })
        .unwrap_or_default();
    ["staging", "test", "pebble"].iter().any(|w| host.contains(w))
        || host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The certificate task of one gateway.
pub(crate) struct AcmeTask {
    acme: Acme,
    cache: Cache,
    store: Arc<CertStore>,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for AcmeTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeTask")
            .field("domains", &self.acme.domains)
            .finish_non_exhaustive()
    }
}

impl AcmeTask {
    /// Set up the task for `acme`, talking to the CA with `tls`, filling `store`, and
    /// serve the cached certificate at once when it covers the configured names and has
    /// not expired.
    pub(crate) fn new(acme: Acme, store: Arc<CertStore>, tls: Arc<rustls::ClientConfig>) -> Result<AcmeTask, String> {
        let cache = Cache::new(&acme)?;
        let task = AcmeTask {
            cache,
            store,
            tls: tokio_rustls::TlsConnector::from(tls),
            acme,
        };
        match task.cache.load_certificate() {
            Ok(Some(served)) if !served.covers(&task.acme.domains) => {
                tracing::warn!(file = %task.cache.certificate_path().display(), "the cached certificate does not cover tls.acme.domains; ordering a new one");
            }
            Ok(Some(served)) if served.not_before > unix_now() + CLOCK_SKEW.as_secs() as i64 => {
                tracing::warn!(file = %task.cache.certificate_path().display(), "the cached certificate is not valid yet; ordering a new one");
            }
            Ok(Some(served)) if served.not_after <= unix_now() => {
                tracing::warn!(file = %task.cache.certificate_path().display(), "the cached certificate has expired; ordering a new one");
            }
            Ok(Some(served)) => {
                tracing::info!(
                    file = %task.cache.certificate_path().display(),
                    expires = %rfc3339(served.not_after),
                    "serving the cached ACME certificate"
                );
                task.store.install(served);
            }
            Ok(None) => {
                tracing::info!(domains = %task.names(), "no cached certificate yet: ordering one; until it is issued only the ACME challenge is answered")
            }
            Err(e) => tracing::warn!(error = %e, "ignoring the cached certificate; ordering a new one"),
        }
        Ok(task)
    }

    fn names(&self) -> String {
        self.acme.domains.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
    }

    /// Keep the certificate fresh until `stop`.
    /// `counted` learns each order's result (true: issued).
    pub(crate) async fn run(self, counted: impl Fn(bool) + Send + Sync + 'static, stop: CancellationToken) {
        let mut failures = 0u32;
        let mut next = self.store.current().map_or(UNIX_EPOCH, |c| renew_at(&c, self.acme.renew_before));
        loop {
            let now = SystemTime::now();
            if let Ok(wait) = next.duration_since(now)
                && !wait.is_zero()
            {
                tokio::select! {
                    _ = tokio::time::sleep(wait.min(MAX_SLEEP)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
            // A panic inside the ACME crate (on input the CA controls) is a failed order,
            // not the end of renewals.
            let order = std::panic::AssertUnwindSafe(tokio::time::timeout(ORDER_TIMEOUT, self.order())).catch_unwind();
            let result = tokio::select! {
                r = order => match r {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(format!("the order took longer than {} s", ORDER_TIMEOUT.as_secs())),
                    Err(_) => Err("the ACME client panicked on the server's answer".to_string()),
                },
                _ = stop.cancelled() => return,
            };
            match result {
                Ok(served) => {
                    failures = 0;
                    counted(true);
                    next = next_renewal(&served, self.acme.renew_before, SystemTime::now());
                    tracing::info!(
                        domains = %self.names(),
                        expires = %rfc3339(served.not_after),
                        renews = %rfc3339(secs(next)),
                        "ACME certificate issued and installed"
                    );
                    self.store.install(served);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    counted(false);
                    let retry = backoff(failures);
                    next = SystemTime::now() + retry;
                    let current = self.store.current().map(|c| rfc3339(c.not_after));
                    tracing::error!(
                        domains = %self.names(),
                        error = %crate::util::escape(&e, MAX_LOGGED_ERROR),
                        retry_in_s = retry.as_secs(),
                        serving = current.as_deref().unwrap_or("no certificate"),
                        "ACME order failed; the current certificate stays"
                    );
                }
            }
        }
    }

    /// One order, start to finish: the certificate, installed nowhere yet, but cached.
    async fn order(&self) -> Result<Served, String> {
        let account = self.account(false).await?;
        let identifiers: Vec<Identifier> = self
            .acme
            .domains
            .iter()
            .map(|d| match d {
                AcmeIdentifier::Dns(n) => Identifier::Dns(n.clone()),
                AcmeIdentifier::Ip(ip) => Identifier::Ip(*ip),
            })
            .collect();
        let new_order = NewOrder::new(&identifiers);
        let mut order = match account.new_order(&new_order).await {
            // The server forgot the account (a test CA restarted, an account deactivated):
            // register again, once.
            Err(instant_acme::Error::Api(p)) if p.r#type.as_deref() == Some(ACCOUNT_DOES_NOT_EXIST) => {
                tracing::warn!("the ACME server does not know the cached account; creating a new one");
                self.account(true).await?.new_order(&new_order).await.map_err(describe)?
            }
            r => r.map_err(describe)?,
        };
        let mut challenges = Challenges {
            store: &self.store,
            sni: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(describe)?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => return Err(format!("authorization for {} is {other:?}", authz.identifier())),
            }
            let id = authz.identifier().identifier.clone();
            if !identifiers.contains(&id) || authz.identifier().wildcard {
                return Err(format!(
                    "the ACME server asked to validate {}, which is not in tls.acme.domains",
                    crate::util::escape(&authz.identifier().to_string(), 256)
                ));
            }
            let mut challenge = authz
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| format!("the ACME server offers no tls-alpn-01 challenge for {}", display_id(&id)))?;
            let digest = challenge.key_authorization().digest();
            let (sni, cert) = challenge_certificate(&id, digest.as_ref())?;
            challenges.add(sni, cert)?;
            challenge.set_ready().await.map_err(describe)?;
        }
        let status = order.poll_ready(&POLL).await.map_err(describe)?;
        if status != OrderStatus::Ready {
            return Err(self.failed_challenges(&mut order, status).await);
        }
        drop(challenges);
        let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
        let names: Vec<String> = self.acme.domains.iter().map(|d| d.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).map_err(|e| format!("cannot build the request: {e}"))?;
        let csr = params
            .serialize_request(&key)
            .map_err(|e| format!("cannot build the request: {e}"))?;
        order.finalize_csr(csr.der()).await.map_err(describe)?;
        let chain_pem = order.poll_certificate(&POLL).await.map_err(describe)?;
        let chain = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the ACME server sent an unreadable certificate chain: {e:?}"))?;
        let private = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| format!("key encoding: {e}"))?;
        let served = Served::new(chain, private).map_err(|e| format!("the issued certificate is unusable: {e}"))?;
        if served.not_before > unix_now() + CLOCK_SKEW.as_secs() as i64 {
            return Err("the ACME server issued a certificate that is not valid yet".into());
        }
        if served.not_after <= unix_now() + MIN_REMAINING.as_secs() as i64 {
            return Err("the ACME server issued a certificate that expires within 10 seconds".into());
        }
        if !served.covers(&self.acme.domains) {
            return Err("the issued certificate does not cover every name in tls.acme.domains".into());
        }
        if let Err(e) = self.cache.save_certificate(&chain_pem, &key.serialize_pem()) {
            // Served anyway; the next restart orders again.
            tracing::error!(error = %e, "cannot cache the issued certificate");
        }
        Ok(served)
    }

    /// The order did not become ready: say which challenge failed and why.
    async fn failed_challenges(&self, order: &mut instant_acme::Order, status: OrderStatus) -> String {
        let mut reasons = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(authz)) = authorizations.next().await {
            for c in &authz.challenges {
                if let Some(p) = &c.error {
                    reasons.push(format!("{}: {}", authz.identifier(), describe_problem(p)));
                }
            }
        }
        if reasons.is_empty() {
            format!("the order is {status:?}")
        } else {
            format!("the order is {status:?}: {}", reasons.join("; "))
        }
    }

    /// The cached account for this directory, or a new one (cached at once).
    async fn account(&self, fresh: bool) -> Result<Account, String> {
        let http = || Box::new(https::Https::new(self.tls.clone()));
        if !fresh {
            match self.cache.load_account() {
                Ok(Some(creds)) => return Account::builder_with_http(http()).from_credentials(creds).await.map_err(describe),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "ignoring the cached ACME account; creating a new one"),
            }
        }
        let contact: Vec<&str> = self.acme.contact.iter().map(String::as_str).collect();
        let (account, creds): (Account, AccountCredentials) = Account::builder_with_http(http())
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.acme.directory_url.value.clone(),
                None,
            )
            .await
            .map_err(describe)?;
        self.cache.save_account(&creds)?;
        tracing::info!(directory = %self.acme.directory_url.value, "ACME account created");
        Ok(account)
    }
}

/// Pending challenge certificates of one order, withdrawn from the store when it ends,
/// however it ends.
struct Challenges<'a> {
    store: &'a CertStore,
    sni: Vec<String>,
}

impl Challenges<'_> {
    fn add(&mut self, sni: String, cert: Arc<CertifiedKey>) -> Result<(), String> {
        self.store.add_challenge(&sni, cert)?;
        self.sni.push(sni);
        Ok(())
    }
}

impl Drop for Challenges<'_> {
    fn drop(&mut self) {
        for s in &self.sni {
            self.store.remove_challenge(s);
        }
    }
}

fn display_id(id: &Identifier) -> String {
    id.authorized(false).to_string()
}

/// The SNI name a validation server sends for `id`, and the self-signed certificate
/// with the `acmeIdentifier` extension it must get (RFC 8737 section 3).
fn challenge_certificate(id: &Identifier, digest: &[u8]) -> Result<(String, Arc<CertifiedKey>), String> {
    let (sni, san) = match id {
        Identifier::Dns(name) => (
            name.to_ascii_lowercase(),
            rcgen::SanType::DnsName(name.clone().try_into().map_err(|e| format!("{e}"))?),
        ),
        Identifier::Ip(ip) => (reverse_name(*ip), rcgen::SanType::IpAddress(*ip)),
        other => return Err(format!("cannot answer a challenge for {}", display_id(other))),
    };
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![san];
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("cannot build the challenge certificate: {e}"))?;
    let private = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| format!("key encoding: {e}"))?;
    // Not `Served::new`: webpki refuses to parse a certificate with an unknown critical
    // extension, which the acmeIdentifier extension is; the key is ours, made above.
    let signer = crate::tls::load_signing_key(private)?;
    Ok((sni, Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer))))
}

/// The reverse-DNS name of `ip`, which TLS-ALPN-01 for an IP address sends as SNI
/// (RFC 8738 section 6).
pub(crate) fn reverse_name(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        std::net::IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// When to renew `served`: `renew_before` its expiry, but not before two thirds of its
/// lifetime have passed (a `renew_before` longer than a short-lived certificate's whole
/// lifetime would otherwise renew it again at once, forever).
pub(crate) fn renew_at(served: &Served, renew_before: Duration) -> SystemTime {
    let lifetime = served.not_after.saturating_sub(served.not_before).max(0) as u64;
    let before = renew_before.as_secs().min(lifetime * 2 / 3);
    UNIX_EPOCH + Duration::from_secs((served.not_after.max(0) as u64).saturating_sub(before))
}

/// When to renew a certificate just issued at `now`: [`renew_at`], but no sooner than a
/// third of its remaining life from now (a CA that backdates `notBefore` beyond a short
/// lifetime would otherwise get a new order at once, again and again).
pub(crate) fn next_renewal(served: &Served, renew_before: Duration, now: SystemTime) -> SystemTime {
    let remaining = Duration::from_secs((served.not_after - secs(now)).max(0) as u64);
    renew_at(served, renew_before).max(now + remaining / 3)
}

/// Wait after the `failures`-th failed order in a row: 1 minute doubling up to 1 hour,
/// each drawn from its upper half at random.
pub(crate) fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    base / 2 + crate::util::jitter(base / 2)
}

/// An instant-acme error for the log: a problem document as its type and detail.
fn describe(e: instant_acme::Error) -> String {
    match e {
        instant_acme::Error::Api(p) => describe_problem(&p),
        other => other.to_string(),
    }
}

fn describe_problem(p: &instant_acme::Problem) -> String {
    let mut s = format!(
        "{} ({})",
        p.detail.as_deref().unwrap_or("no detail"),
        p.r#type.as_deref().unwrap_or("no problem type")
    );
    for sub in p.subproblems.iter().take(8) {
        s.push_str(&format!("; {sub}"));
    }
    s
}

fn unix_now() -> i64 {
    secs(SystemTime::now())
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(not_before: i64, not_after: i64) -> Served {
        let ck = rcgen::generate_simple_self_signed(vec!["a.example".to_string()]).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let mut s = Served::new(vec![ck.cert.der().clone()], key).unwrap();
        s.not_before = not_before;
        s.not_after = not_after;
        s
    }

    #[test]
    fn renewal_starts_renew_before_the_expiry_but_never_in_the_first_third() {
        let day = 86_400;
        let s = served(0, 90 * day);
        let at = |before: u64| secs(renew_at(&s, Duration::from_secs(before)));
        assert_eq!(at(30 * day as u64), 60 * day);
        // Longer than two thirds of the lifetime: renewed a third of the way in.
        assert_eq!(at(89 * day as u64), 30 * day);
        assert_eq!(at(365 * day as u64), 30 * day);
        let short = served(1000, 1060);
        assert_eq!(secs(renew_at(&short, Duration::from_secs(3600))), 1020);
        assert_eq!(secs(renew_at(&short, Duration::from_secs(10))), 1050);
        // A certificate whose dates make no sense renews at its expiry, no earlier.
        let odd = served(2000, 1000);
        assert_eq!(secs(renew_at(&odd, Duration::from_secs(3600))), 1000);
    }

    #[test]
    fn a_certificate_backdated_beyond_its_lifetime_is_not_renewed_at_once() {
        // Issued now (t = 10,000), valid 60 s, notBefore backdated an hour.
        let s = served(10_000 - 3600, 10_060);
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert!(renew_at(&s, Duration::from_secs(30 * 86_400)) < now);
        assert_eq!(secs(next_renewal(&s, Duration::from_secs(30 * 86_400), now)), 10_020);
        // The usual case is renew_at itself.
        let s = served(10_000, 10_000 + 90 * 86_400);
        assert_eq!(
            next_renewal(&s, Duration::from_secs(30 * 86_400), now),
            renew_at(&s, Duration::from_secs(30 * 86_400))
        );
    }

    #[test]
    fn back_off_doubles_from_a_minute_to_an_hour_with_jitter() {
        for (failures, base) in [(1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (40, 3600), (u32::MAX, 3600)] {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..50 {
                let d = backoff(failures).as_secs_f64();
                assert!(d >= base as f64 / 2.0 && d <= base as f64, "{failures}: {d}");
                seen.insert(d.to_bits());
            }
            assert!(seen.len() > 1, "no jitter for {failures}");
        }
    }

    #[test]
    fn reverse_names_follow_rfc_8738() {
        assert_eq!(reverse_name("127.0.0.1".parse().unwrap()), "1.0.0.127.in-addr.arpa");
        assert_eq!(
            reverse_name("2001:db8::1".parse().unwrap()),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
    }

    #[test]
    fn staging_and_test_servers_are_recognised() {
        assert!(is_test_directory("https://acme-staging-v02.api.letsencrypt.org/directory"));
        assert!(is_test_directory("https://127.0.0.1:14000/dir"));
        assert!(is_test_directory("https://localhost:14000/dir"));
        assert!(is_test_directory("https://[::1]:14000/dir"));
        assert!(is_test_directory("https://api.test4.buypass.no/acme/directory"));
        assert!(!is_test_directory("https://acme-v02.api.letsencrypt.org/directory"));
        assert!(!is_test_directory("https://acme.zerossl.com/v2/DV90"));
    }

    #[test]
    fn a_challenge_certificate_names_the_identifier_and_carries_the_digest() {
        let digest = [7u8; 32];
        let (sni, ck) = challenge_certificate(&Identifier::Ip("127.0.0.1".parse().unwrap()), &digest).unwrap();
        assert_eq!(sni, "1.0.0.127.in-addr.arpa");
        let der = ck.end_entity_cert().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        // id-pe-acmeIdentifier, critical, an OCTET STRING of the SHA-256 digest.
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert_eq!(&ext.value[2..], &digest);
        let (sni, _) = challenge_certificate(&Identifier::Dns("ws.example.com".into()), &digest).unwrap();
        assert_eq!(sni, "ws.example.com");
    }
}
