//! Client certificates (mTLS): required and optional modes, each route auth mode,
//! certificate-bound tokens, forwarded certificate headers, CRLs and their reload.

mod common;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::{path::Path, sync::Arc, time::Duration};
use tokio_tungstenite::tungstenite;

/// A test CA: its certificate and an issuer that signs leaves and CRLs.
struct Ca {
    der: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A client certificate and its key.
struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
}

impl Leaf {
    fn x5t(&self) -> String {
        wsgate::tls::ClientCert::from_verified(&self.chain).unwrap().x5t_s256()
    }
    fn sha256_hex(&self) -> String {
        wsgate::tls::ClientCert::from_verified(&self.chain).unwrap().fingerprint_hex()
    }
}

/// A client certificate for CN `cn` (and `sans`) with serial `serial`, signed by `ca`;
/// `edit` adjusts the parameters (validity, names).
fn leaf(ca: &Ca, cn: &str, sans: Vec<SanType>, serial: u64, edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = sans;
    p.serial_number = Some(SerialNumber::from(serial));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    edit(&mut p);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    Leaf {
        chain: vec![cert.der().clone()],
        key,
    }
}

fn simple(ca: &Ca, cn: &str, serial: u64) -> Leaf {
    leaf(ca, cn, vec![], serial, |_| {})
}

/// A CRL from `ca` revoking `serials`, PEM, valid for a day.
fn crl(ca: &Ca, serials: &[u64], number: u64) -> String {
    crl_by(&ca.issuer, serials, number, Duration::from_secs(86400))
}

/// A CRL signed by `issuer`, its `nextUpdate` `fresh_for` from now (in the past if zero:
/// a minute ago).
fn crl_by(issuer: &Issuer<'_, KeyPair>, serials: &[u64], number: u64, fresh_for: Duration) -> String {
    let now = std::time::SystemTime::now();
    let next = if fresh_for.is_zero() {
        now - Duration::from_secs(60)
    } else {
        now + fresh_for
    };
    let params = CertificateRevocationListParams {
        this_update: (now - Duration::from_secs(120)).into(),
        next_update: next.into(),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(*s),
                revocation_time: (now - Duration::from_secs(30)).into(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    params.signed_by(issuer).unwrap().pem().unwrap()
}

/// `[tls]` lines for client certificates: CA file, mode, optional CRL file.
fn tls_lines(pki: &Path, mode: &str, crl: bool) -> String {
    let mut t = format!(
        "self_signed_if_missing = true\nclient_ca = \"{}\"\nclient_auth = \"{mode}\"\n",
        pki.join("ca.pem").display()
    );
    if crl {
        t.push_str(&format!("client_crl_files = [\"{}\"]\n", pki.join("ca.crl").display()));
    }
    t
}

/// A gateway trusting `ca` for client certificates, with `routes`.
async fn gateway(ca: &Ca, pki: &Path, mode: &str, crl: bool, routes: &str) -> Gw {
    std::fs::write(pki.join("ca.pem"), &ca.pem).unwrap();
    let lines = tls_lines(pki, mode, crl);
    Gw::start_with("", routes, |t| t.replace("self_signed_if_missing = true\n", &lines)).await
}

/// Options presenting `leaf` (or no certificate), trusting the gateway's certificate.
fn opts(gw: &Gw, leaf: Option<&Leaf>, token: Option<String>) -> wsgate::client::Options {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_file_iter(gw.dir.path().join("server.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cc = match leaf {
        Some(l) => b
            .with_client_auth_cert(l.chain.clone(), PrivateKeyDer::try_from(l.key.serialize_der()).unwrap())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    wsgate::client::Options {
        token,
        tls: Some(Arc::new(cc)),
        ..Default::default()
    }
}

/// The outcome of a connection attempt: 101, an HTTP refusal, or a failed TLS handshake.
#[derive(Debug, PartialEq)]
enum Got {
    Open,
    Status(u16),
    TlsFailed,
}

async fn attempt(gw: &Gw, path: &str, o: &wsgate::client::Options) -> Got {
    match tokio::time::timeout(TIMEOUT, wsgate::client::connect(&gw.url(path), o))
        .await
        .expect("connect timed out")
    {
        Ok((mut ws, _)) => {
            assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
            Got::Open
        }
        Err(tungstenite::Error::Http(r)) => Got::Status(r.status().as_u16()),
        Err(_) => Got::TlsFailed,
    }
}

fn routes4() -> String {
    [
        route("m", "/m", "builtin:echo", "mtls"),
        route("jm", "/jm", "builtin:echo", "jwt+mtls"),
        route("j", "/j", "builtin:echo", "jwt"),
        route("open", "/open", "builtin:echo", "none"),
    ]
    .concat()
}

#[tokio::test]
async fn required_mode_refuses_every_client_without_a_valid_certificate_in_the_handshake() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let theirs = ca("another CA");
    let gw = gateway(&ours, pki.path(), "required", false, &routes4()).await;
    let alice = simple(&ours, "alice", 1);
    let expired = leaf(&ours, "old", vec![], 2, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let stranger = simple(&theirs, "alice", 3);
    // The other CA's certificate sent along as if it were an intermediate: still no path to our anchor.
    let mut stranger_chain = simple(&theirs, "alice", 4);
    stranger_chain.chain.push(theirs.der.clone());
    assert_eq!(attempt(&gw, "/open", &opts(&gw, None, None)).await, Got::TlsFailed);
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&expired), None)).await, Got::TlsFailed);
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&stranger), None)).await, Got::TlsFailed);
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&stranger_chain), None)).await, Got::TlsFailed);
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="tls_handshake"}"#, 4.0)
        .await;
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&alice), None)).await, Got::Open);
    assert_eq!(attempt(&gw, "/open", &opts(&gw, Some(&alice), None)).await, Got::Open);
}

#[tokio::test]
async fn optional_mode_lets_each_route_decide() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let gw = gateway(&ours, pki.path(), "optional", false, &routes4()).await;
    let alice = simple(&ours, "alice", 1);
    let token = || Some(gw.token("alice"));
    // No certificate: mtls routes refuse with 403 (reason client_cert), the others serve.
    assert_eq!(attempt(&gw, "/m", &opts(&gw, None, None)).await, Got::Status(403));
    assert_eq!(attempt(&gw, "/jm", &opts(&gw, None, token())).await, Got::Status(403));
    assert_eq!(attempt(&gw, "/j", &opts(&gw, None, token())).await, Got::Open);
    assert_eq!(attempt(&gw, "/open", &opts(&gw, None, None)).await, Got::Open);
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="client_cert"}"#, 2.0)
        .await;
    // With a certificate: each mode works; a JWT-only route still works and still needs its token.
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&alice), None)).await, Got::Open);
    assert_eq!(attempt(&gw, "/jm", &opts(&gw, Some(&alice), token())).await, Got::Open);
    assert_eq!(attempt(&gw, "/jm", &opts(&gw, Some(&alice), None)).await, Got::Status(401));
    assert_eq!(attempt(&gw, "/j", &opts(&gw, Some(&alice), token())).await, Got::Open);
    assert_eq!(attempt(&gw, "/j", &opts(&gw, Some(&alice), None)).await, Got::Status(401));
    assert_eq!(attempt(&gw, "/open", &opts(&gw, Some(&alice), None)).await, Got::Open);
    // An invalid certificate fails the handshake even though it is optional.
    let expired = leaf(&ours, "old", vec![], 2, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    assert_eq!(attempt(&gw, "/j", &opts(&gw, Some(&expired), token())).await, Got::TlsFailed);
    // A client certificate refusal is not an auth failure: it does not count toward a ban.
    assert_eq!(gw.metric(r#"wsgate_auth_failures_total{route="m",reason="missing"}"#).await, 0.0);
}

#[tokio::test]
async fn certificate_bound_tokens_need_their_certificate() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let gw = gateway(&ours, pki.path(), "optional", false, &routes4()).await;
    let alice = simple(&ours, "alice", 1);
    let bob = simple(&ours, "bob", 2);
    let bound = |x5t: &str, extra: &str| {
        let cnf = format!(r#"{{"x5t#S256":"{x5t}"{extra}}}"#);
        Some(gw.token_with("alice", Duration::from_secs(600), &[("cnf", cnf.as_str())]))
    };
    assert_eq!(
        attempt(&gw, "/jm", &opts(&gw, Some(&alice), bound(&alice.x5t(), ""))).await,
        Got::Open
    );
    // Bound to alice's certificate, presented with bob's: 401.
    assert_eq!(
        attempt(&gw, "/jm", &opts(&gw, Some(&bob), bound(&alice.x5t(), ""))).await,
        Got::Status(401)
    );
    // The hex fingerprint is not the base64url thumbprint.
    assert_eq!(
        attempt(&gw, "/jm", &opts(&gw, Some(&alice), bound(&alice.sha256_hex(), ""))).await,
        Got::Status(401)
    );
    // A `cnf` with a member the gateway cannot check (a DPoP key) is refused, not ignored.
    let dpop = bound(&alice.x5t(), r#","jkt":"abc""#);
    assert_eq!(attempt(&gw, "/jm", &opts(&gw, Some(&alice), dpop)).await, Got::Status(401));
    let only_jkt = Some(gw.token_with("alice", Duration::from_secs(600), &[("cnf", r#"{"jkt":"abc"}"#)]));
    assert_eq!(attempt(&gw, "/jm", &opts(&gw, Some(&alice), only_jkt)).await, Got::Status(401));
    let not_object = Some(gw.token_with("alice", Duration::from_secs(600), &[("cnf", "[1]")]));
    assert_eq!(attempt(&gw, "/jm", &opts(&gw, Some(&alice), not_object)).await, Got::Status(401));
    // A stolen bound token on a JWT-only route: without the certificate it is refused,
    // with it it works.
    assert_eq!(
        attempt(&gw, "/j", &opts(&gw, None, bound(&alice.x5t(), ""))).await,
        Got::Status(401)
    );
    assert_eq!(
        attempt(&gw, "/j", &opts(&gw, Some(&alice), bound(&alice.x5t(), ""))).await,
        Got::Open
    );
    gw.wait_metric(r#"wsgate_auth_failures_total{route="jm",reason="cert_binding"}"#, 5.0)
        .await;
    gw.wait_metric(r#"wsgate_auth_failures_total{route="j",reason="cert_binding"}"#, 1.0)
        .await;
    // A 401 for a bound token says invalid_token, like any bad token.
    let r = gw.refusal("/jm", &opts(&gw, Some(&bob), bound(&alice.x5t(), ""))).await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer error=\"invalid_token\"");
}

#[tokio::test]
async fn identity_and_certificate_headers_reach_the_upstream_and_forged_copies_do_not() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let up = upstream(Behaviour::Echo).await;
    let forward = "forward_claims = { sub = \"x-wsgate-sub\", \"cert:fingerprint\" = \"x-client-cert-sha256\", \"cert:subject\" = \"x-client-cert-subject\" }\n";
    let routes = format!(
        "{}{forward}{}{forward}",
        route("m", "/m", &up.url(), "mtls"),
        route("j", "/j", &up.url(), "jwt")
    );
    let gw = gateway(&ours, pki.path(), "optional", false, &routes).await;
    let uri: rcgen::string::Ia5String = "spiffe://example.org/bot/7".try_into().unwrap();
    let bot = leaf(
        &ours,
        "bot, O=Admins",
        vec![SanType::DnsName("bot.example".try_into().unwrap()), SanType::URI(uri)],
        9,
        |_| {},
    );
    let mut o = opts(&gw, Some(&bot), None);
    o.headers = vec![
        ("X-Client-Cert-Sha256".into(), "forged".into()),
        ("x_client_cert_subject".into(), "CN=admin".into()),
        ("x-wsgate-sub".into(), "admin".into()),
    ];
    assert_eq!(attempt(&gw, "/m", &o).await, Got::Open);
    assert_eq!(up.header(0, "x-wsgate-sub").as_deref(), Some("spiffe://example.org/bot/7"));
    assert_eq!(up.header(0, "x-client-cert-sha256"), Some(bot.sha256_hex()));
    assert_eq!(up.header(0, "x-client-cert-subject").as_deref(), Some(r"CN=bot\, O=Admins"));
    let headers = up.log.lock().unwrap().requests[0].1.clone();
    assert!(
        !headers.iter().any(|(_, v)| v == "forged" || v == "CN=admin" || v == "admin"),
        "{headers:?}"
    );
    // A token claim named like a certificate field is never forwarded as one.
    let forged = gw.token_with("alice", Duration::from_secs(600), &[("cert:fingerprint", "forged")]);
    assert_eq!(attempt(&gw, "/j", &opts(&gw, None, Some(forged))).await, Got::Open);
    assert_eq!(up.header(1, "x-wsgate-sub").as_deref(), Some("alice"));
    assert_eq!(up.header(1, "x-client-cert-sha256"), None);
}

#[tokio::test]
async fn a_certificate_naming_no_usable_identity_is_refused_on_mtls_routes() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let gw = gateway(&ours, pki.path(), "optional", false, &routes4()).await;
    let evil = simple(&ours, "alice\n2026-01-01 INFO forged line\u{1b}[0m", 1);
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&evil), None)).await, Got::Status(403));
    // Names that read as another user's: zero-width space, right-to-left override,
    // no-break space.
    for hidden in ["alice\u{200B}", "\u{202E}ecila", "alice\u{A0}"] {
        let cert = simple(&ours, hidden, 1);
        assert_eq!(
            attempt(&gw, "/m", &opts(&gw, Some(&cert), None)).await,
            Got::Status(403),
            "{hidden:?}"
        );
    }
    let accented = simple(&ours, "Zoë Ünal", 1);
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&accented), None)).await, Got::Open);
    // The same certificate still serves a route that does not use it as the identity.
    assert_eq!(
        attempt(&gw, "/j", &opts(&gw, Some(&evil), Some(gw.token("alice")))).await,
        Got::Open
    );
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="client_cert"}"#, 4.0)
        .await;
}

/// A gateway trusting a fresh CA with a CRL revoking serial 66 (`optional` mode, the
/// four routes), and the config text that reloads it.
async fn crl_gateway() -> (tempfile::TempDir, Ca, Gw, String) {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    std::fs::write(pki.path().join("ca.crl"), crl(&ours, &[66], 1)).unwrap();
    let gw = gateway(&ours, pki.path(), "optional", true, &routes4()).await;
    let text =
        config_text(gw.dir.path(), "", &routes4()).replace("self_signed_if_missing = true\n", &tls_lines(pki.path(), "optional", true));
    (pki, ours, gw, text)
}

#[tokio::test]
async fn crls_refuse_revoked_certificates_and_a_reload_closes_their_sessions() {
    let (pki, ours, gw, text) = crl_gateway().await;
    let alice = simple(&ours, "alice", 1);
    let carol = simple(&ours, "carol", 3);
    let revoked = simple(&ours, "mallory", 66);
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&revoked), None)).await, Got::TlsFailed);
    let (mut a, _) = wsgate::client::connect(&gw.url("/m"), &opts(&gw, Some(&alice), None))
        .await
        .unwrap();
    let (mut c, _) = wsgate::client::connect(&gw.url("/j"), &opts(&gw, Some(&carol), Some(gw.token("carol"))))
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut a, "before").await, "before");

    // A broken CRL file changes nothing.
    std::fs::write(
        pki.path().join("ca.crl"),
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let err = gw.reload(&text).await.unwrap_err();
    assert_eq!(err.key, "tls.client_crl_files");
    assert!(err.line.is_some());
    assert_eq!(roundtrip(&mut a, "after a bad reload").await, "after a bad reload");

    // A CRL revoking alice: her live session is closed with 1008; carol's stays.
    std::fs::write(pki.path().join("ca.crl"), crl(&ours, &[66, 1], 2)).unwrap();
    gw.reload(&text).await.unwrap();
    assert_eq!(close_code(&mut a).await.0, 1008);
    assert_eq!(roundtrip(&mut c, "still here").await, "still here");
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&alice), None)).await, Got::TlsFailed);

    // A CRL in DER works too.
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(crl(&ours, &[66], 3).as_bytes())
        .map(|c: rustls_pki_types::CertificateRevocationListDer| c.as_ref().to_vec())
        .unwrap();
    std::fs::write(pki.path().join("ca.crl"), der).unwrap();
    gw.reload(&text).await.unwrap();
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&alice), None)).await, Got::Open);
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&revoked), None)).await, Got::TlsFailed);
}

#[tokio::test]
async fn a_reload_that_replaces_the_client_ca_closes_the_sessions_it_authenticated() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let gw = gateway(&ours, pki.path(), "optional", false, &routes4()).await;
    let alice = simple(&ours, "alice", 1);
    let (mut m, _) = wsgate::client::connect(&gw.url("/m"), &opts(&gw, Some(&alice), None))
        .await
        .unwrap();
    let (mut j, _) = wsgate::client::connect(&gw.url("/j"), &opts(&gw, None, Some(gw.token("bob"))))
        .await
        .unwrap();
    // The client CA file now holds another CA: alice's certificate no longer verifies.
    std::fs::write(pki.path().join("ca.pem"), ca("new CA").pem).unwrap();
    let text =
        config_text(gw.dir.path(), "", &routes4()).replace("self_signed_if_missing = true\n", &tls_lines(pki.path(), "optional", false));
    gw.reload(&text).await.unwrap();
    assert_eq!(close_code(&mut m).await.0, 1008);
    assert_eq!(roundtrip(&mut j, "token sessions stay").await, "token sessions stay");
}

#[tokio::test]
async fn unknown_revocation_status_is_refused_when_crls_are_configured() {
    // A chain through an intermediate: the CRL covers the root's issuance only, so the
    // leaf's status (issued by the intermediate) is unknown, and that is a refusal.
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
    ip.distinguished_name.push(DnType::CommonName, "intermediate");
    ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ikey = KeyPair::generate().unwrap();
    let icert = ip.signed_by(&ikey, &ours.issuer).unwrap();
    let inter = Ca {
        der: icert.der().clone(),
        pem: icert.pem(),
        issuer: Issuer::new(ip, ikey),
    };
    std::fs::write(pki.path().join("ca.crl"), crl(&ours, &[], 1)).unwrap();
    let gw = gateway(&ours, pki.path(), "optional", true, &routes4()).await;
    let mut dave = simple(&inter, "dave", 5);
    dave.chain.push(inter.der.clone());
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&dave), None)).await, Got::TlsFailed);
    // With the intermediate's CRL too, the chain verifies.
    let both = format!("{}{}", crl(&ours, &[], 2), crl(&inter, &[], 1));
    std::fs::write(pki.path().join("ca.crl"), both).unwrap();
    let text =
        config_text(gw.dir.path(), "", &routes4()).replace("self_signed_if_missing = true\n", &tls_lines(pki.path(), "optional", true));
    gw.reload(&text).await.unwrap();
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&dave), None)).await, Got::Open);
}

#[tokio::test]
async fn check_names_the_key_and_line_of_a_bad_ca_or_crl_and_warns_about_unused_optional() {
    let pki = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let load = |tls: &str, routes: &str| {
        let text = config_text(dir.path(), "", routes).replace("self_signed_if_missing = true\n", tls);
        let cfg = wsgate::Config::from_toml_str(&text, "check.toml").unwrap();
        (wsgate::check::warnings(&cfg), wsgate::gateway::Runtime::load(cfg, false).err())
    };
    // Missing CA file.
    let (_, err) = load(&tls_lines(pki.path(), "optional", false), &routes4());
    let err = err.expect("a missing CA file is an error");
    assert_eq!(err.key, "tls.client_ca");
    assert!(err.line.is_some(), "{err}");
    // A CA file with no certificate in it.
    std::fs::write(pki.path().join("ca.pem"), "not a certificate\n").unwrap();
    let err = load(&tls_lines(pki.path(), "optional", false), &routes4()).1.unwrap();
    assert_eq!(err.key, "tls.client_ca");
    // A valid CA, a missing CRL, then a CRL that is not one.
    std::fs::write(pki.path().join("ca.pem"), ca("x").pem).unwrap();
    let err = load(&tls_lines(pki.path(), "optional", true), &routes4()).1.unwrap();
    assert_eq!((err.key.as_str(), err.line.is_some()), ("tls.client_crl_files", true), "{err}");
    std::fs::write(pki.path().join("ca.crl"), [0x30u8, 0x03, 0x02, 0x01, 0x01]).unwrap();
    let err = load(&tls_lines(pki.path(), "optional", true), &routes4()).1.unwrap();
    assert_eq!(err.key, "tls.client_crl_files");
    // Optional client certificates with no route that uses them: a warning.
    let (w, err) = load(&tls_lines(pki.path(), "optional", false), ECHO_ROUTE);
    assert!(err.is_none(), "{err:?}");
    assert!(w.iter().any(|w| w.contains("client_auth = \"optional\"")), "{w:?}");
    let (w, _) = load(&tls_lines(pki.path(), "optional", false), &routes4());
    assert!(!w.iter().any(|w| w.contains("client_auth")), "{w:?}");
    // An mtls route without client_ca, and client_auth without client_ca: config errors.
    let text = config_text(dir.path(), "", &routes4());
    let err = wsgate::Config::from_toml_str(&text, "check.toml").unwrap_err();
    assert_eq!(err.key, "tls.client_ca");
    let text = config_text(dir.path(), "", ECHO_ROUTE).replace("self_signed_if_missing = true\n", "client_auth = \"required\"\n");
    let err = wsgate::Config::from_toml_str(&text, "check.toml").unwrap_err();
    assert_eq!((err.key.as_str(), err.line), ("tls.client_auth", Some(9)));
    // Claims required on a route whose identity is a certificate (it has no claims).
    let bad = format!("{}require_claims = {{ scope = \"x\" }}\n", route("m", "/m", "builtin:echo", "mtls"));
    let text = config_text(dir.path(), "", &bad).replace("self_signed_if_missing = true\n", &tls_lines(pki.path(), "optional", false));
    let err = wsgate::Config::from_toml_str(&text, "check.toml").unwrap_err();
    assert_eq!(err.key, "routes.require_claims");
    // An unknown cert: key in forward_claims.
    let bad = format!(
        "{}forward_claims = {{ \"cert:serial\" = \"x-serial\" }}\n",
        route("m", "/m", "builtin:echo", "mtls")
    );
    let text = config_text(dir.path(), "", &bad).replace("self_signed_if_missing = true\n", &tls_lines(pki.path(), "optional", false));
    let err = wsgate::Config::from_toml_str(&text, "check.toml").unwrap_err();
    assert_eq!(err.key, "routes.forward_claims");
}

#[tokio::test]
async fn a_resumed_tls_session_keeps_its_certificate_identity() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let up = upstream(Behaviour::Echo).await;
    let routes = format!("{}forward_claims = {{ sub = \"x-sub\" }}\n", route("m", "/m", &up.url(), "mtls"));
    let gw = gateway(&ours, pki.path(), "optional", false, &routes).await;
    let alice = simple(&ours, "alice", 1);
    let o = opts(&gw, Some(&alice), None);
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (mut ws, _) = wsgate::client::connect(&gw.url("/m"), &o).await.unwrap();
        assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
        if let wsgate::upstream::UpstreamIo::Tls(s) = ws.get_ref() {
            kinds.push(s.get_ref().1.handshake_kind());
        }
        ws.close(None).await.unwrap();
        let _ = close_code(&mut ws).await;
    }
    assert_eq!(kinds, [Some(rustls::HandshakeKind::Full), Some(rustls::HandshakeKind::Resumed)]);
    assert_eq!(up.header(1, "x-sub").as_deref(), Some("alice"));
}

#[tokio::test]
async fn a_reload_that_removes_client_certificates_closes_only_the_sessions_they_authenticated() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let gw = gateway(&ours, pki.path(), "optional", false, &routes4()).await;
    let alice = simple(&ours, "alice", 1);
    let (mut m, _) = wsgate::client::connect(&gw.url("/m"), &opts(&gw, Some(&alice), None))
        .await
        .unwrap();
    let (mut j, _) = wsgate::client::connect(&gw.url("/j"), &opts(&gw, Some(&alice), Some(gw.token("alice"))))
        .await
        .unwrap();
    let only_jwt = format!(
        "{}{}",
        route("j", "/j", "builtin:echo", "jwt"),
        route("open", "/open", "builtin:echo", "none")
    );
    gw.reload(&config_text(gw.dir.path(), "", &only_jwt)).await.unwrap();
    assert_eq!(close_code(&mut m).await.0, 1008);
    assert_eq!(
        roundtrip(&mut j, "a token session with a certificate stays").await,
        "a token session with a certificate stays"
    );
}

#[tokio::test]
async fn a_chain_through_a_cross_signed_intermediate_is_as_trusted_as_its_signer() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let stranger_root = ca("stranger root");
    // Another organisation's CA key, cross-signed once by a third CA and once by ours.
    let mut tp = CertificateParams::new(Vec::<String>::new()).unwrap();
    tp.distinguished_name.push(DnType::CommonName, "their CA");
    tp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    tp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let tkey = KeyPair::generate().unwrap();
    let by_stranger = tp.signed_by(&tkey, &stranger_root.issuer).unwrap().der().clone();
    let by_us = tp.signed_by(&tkey, &ours.issuer).unwrap().der().clone();
    let theirs = Ca {
        der: by_stranger.clone(),
        pem: String::new(),
        issuer: Issuer::new(tp, tkey),
    };
    let gw = gateway(&ours, pki.path(), "required", false, &routes4()).await;
    let mut via_stranger = simple(&theirs, "alice", 7);
    via_stranger.chain.extend([by_stranger, stranger_root.der.clone()]);
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&via_stranger), None)).await, Got::TlsFailed);
    // Our CA vouched for theirs: its certificates chain to our anchor (trust is transitive,
    // as in any X.509 deployment: do not cross-sign a CA whose names you do not control).
    let mut via_us = simple(&theirs, "alice", 8);
    via_us.chain.push(by_us);
    assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&via_us), None)).await, Got::Open);
}

#[tokio::test]
async fn a_forged_or_stale_crl_is_a_config_error_and_a_reload_with_it_changes_nothing() {
    let (pki, ours, gw, text) = crl_gateway().await;
    let alice = simple(&ours, "alice", 1);
    let (mut a, _) = wsgate::client::connect(&gw.url("/m"), &opts(&gw, Some(&alice), None))
        .await
        .unwrap();
    // Our CA's name, another key: the signature does not verify.
    let forger = Issuer::from_ca_cert_der(&ours.der, KeyPair::generate().unwrap()).unwrap();
    let stale = crl_by(&ours.issuer, &[66], 2, Duration::ZERO);
    for (bad, says) in [
        (crl_by(&forger, &[1], 2, Duration::from_secs(86400)), "not signed"),
        (stale, "nextUpdate"),
    ] {
        std::fs::write(pki.path().join("ca.crl"), bad).unwrap();
        let err = gw.reload(&text).await.unwrap_err();
        assert_eq!(err.key, "tls.client_crl_files");
        assert!(err.to_string().contains(says), "{err}");
        // `check` and a start refuse it too.
        let cfg = wsgate::Config::from_toml_str(&text, "t.toml").unwrap();
        assert!(wsgate::gateway::Runtime::load(cfg, false).is_err());
        // Nothing changed: the session and new handshakes go on.
        assert_eq!(roundtrip(&mut a, "still").await, "still");
        assert_eq!(attempt(&gw, "/m", &opts(&gw, Some(&alice), None)).await, Got::Open);
    }
    // A CRL file that is not a regular file is refused, not read forever.
    let text_zero = text.replace(&pki.path().join("ca.crl").display().to_string(), "/dev/zero");
    let err = gw.reload(&text_zero).await.unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[tokio::test]
async fn an_mtls_route_removes_tokens_before_the_upstream() {
    let up = upstream(Behaviour::Echo).await;
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let routes = route("m", "/m", &up.url(), "mtls");
    let gw = gateway(&ours, pki.path(), "optional", false, &routes).await;
    let alice = simple(&ours, "alice", 1);
    let mut o = opts(&gw, Some(&alice), Some(gw.token("bob")));
    o.headers = vec![("cookie".into(), "wsgate_token=x; keep=1".into())];
    assert_eq!(attempt(&gw, "/m?access_token=abc&k=1", &o).await, Got::Open);
    assert_eq!(up.header(0, "authorization"), None);
    assert_eq!(up.header(0, "cookie").as_deref(), Some("keep=1"));
    let uri = up.log.lock().unwrap().requests[0].0.clone();
    assert_eq!(uri, "/m?k=1");
}

#[tokio::test]
async fn a_reload_holds_certificate_sessions_to_their_routes_new_auth_as_admission_would() {
    let pki = tempfile::tempdir().unwrap();
    let ours = ca("our client CA");
    let gw = gateway(&ours, pki.path(), "optional", false, &routes4()).await;
    let text = |routes: &str| {
        let lines = tls_lines(pki.path(), "optional", false);
        config_text(gw.dir.path(), "", routes).replace("self_signed_if_missing = true\n", &lines)
    };
    let alice = simple(&ours, "alice", 1);
    // A certificate naming no usable user: enough for `jwt+mtls` (the token names the user).
    let nameless = simple(&ours, "alice\u{200B}", 2);
    let (mut anonymous, _) = wsgate::client::connect(&gw.url("/open"), &opts(&gw, Some(&alice), None))
        .await
        .unwrap();
    let (mut bound, _) = wsgate::client::connect(&gw.url("/jm"), &opts(&gw, Some(&nameless), Some(gw.token("bob"))))
        .await
        .unwrap();
    // A reload that changes nothing leaves both alone.
    gw.reload(&text(&routes4())).await.unwrap();
    assert_eq!(roundtrip(&mut bound, "kept").await, "kept");
    assert_eq!(roundtrip(&mut anonymous, "kept").await, "kept");
    // The open route now authenticates with certificates: the anonymous session holds no
    // identity and no place under the per-user cap, so it ends.
    gw.reload(&text(&routes4().replace(
        "name = \"open\"\npath = \"/open\"\nupstreams = [\"builtin:echo\"]\nauth = \"none\"",
        "name = \"open\"\npath = \"/open\"\nupstreams = [\"builtin:echo\"]\nauth = \"mtls\"",
    )))
    .await
    .unwrap();
    assert_eq!(close_code(&mut anonymous).await, (1008, "access revoked".into()));
    assert_eq!(roundtrip(&mut bound, "still").await, "still");
}
