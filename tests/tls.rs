//! TLS on both hops: minimum version, ALPN, and certificate checks on `wss://` upstreams.

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// A wss echo upstream with a fresh self-signed certificate; returns its port and cert path.
async fn tls_echo_upstream(dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    let (cert, key) = (dir.join("up.crt"), dir.join("up.key"));
    wsgate::tls::write_self_signed(&cert, &key).unwrap();
    let chain: Vec<CertificateDer> = CertificateDer::pem_file_iter(&cert).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let sc = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, cert)
}

#[tokio::test]
async fn wss_upstream_certificate_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (port, cert) = tls_echo_upstream(dir.path()).await;
    let url = format!("wss://localhost:{port}");
    let routes = format!(
        "{}{}upstream_ca = \"{}\"\n",
        route("unverified", "/unverified", &url, "none"),
        route("trusted", "/trusted", &url, "none"),
        cert.display()
    );
    let gw = Gw::start("", &routes).await;
    // Not signed by a webpki root: refused before the 101.
    assert_eq!(gw.refusal("/unverified", &gw.options(None)).await.status(), 502);
    // With the configured CA it is trusted.
    let (mut ws, _) = gw.try_connect("/trusted", &gw.options(None)).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "over two TLS hops").await, "over two TLS hops");
}

#[tokio::test]
async fn min_version_and_alpn_are_enforced() {
    let gw = Gw::start("", ECHO_ROUTE).await;
    let dir = gw.dir.path().to_path_buf();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("server.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = |versions: &[&'static rustls::SupportedProtocolVersion], alpn: Vec<Vec<u8>>| {
        let mut cc = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        cc.alpn_protocols = alpn;
        tokio_rustls::TlsConnector::from(Arc::new(cc))
    };
    let name = || rustls_pki_types::ServerName::try_from("localhost").unwrap();
    // Default minimum 1.2: a TLS 1.2 client is served; ALPN answers http/1.1.
    let tls = client(&[&rustls::version::TLS12], vec![b"h2".to_vec(), b"http/1.1".to_vec()])
        .connect(name(), TcpStream::connect(gw.addr).await.unwrap())
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // The server's suite order wins: AES-128-GCM even from clients that list AES-256 first
    // (rustls' default order), for both TLS versions; AES-256 still when it is all a client has.
    use rustls::CipherSuite::*;
    assert_eq!(
        tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
    );
    let tls13 = client(&[&rustls::version::TLS13], vec![b"http/1.1".to_vec()])
        .connect(name(), TcpStream::connect(gw.addr).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        tls13.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(TLS13_AES_128_GCM_SHA256)
    );
    let mut only256 = rustls::crypto::aws_lc_rs::default_provider();
    only256.cipher_suites.retain(|s| s.suite() == TLS13_AES_256_GCM_SHA384);
    let cc256 = rustls::ClientConfig::builder_with_provider(Arc::new(only256))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let tls256 = tokio_rustls::TlsConnector::from(Arc::new(cc256))
        .connect(name(), TcpStream::connect(gw.addr).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        tls256.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(TLS13_AES_256_GCM_SHA384)
    );
    // A client that only speaks h2 is refused at the TLS layer.
    assert!(
        client(&[&rustls::version::TLS13], vec![b"h2".to_vec()])
            .connect(name(), TcpStream::connect(gw.addr).await.unwrap())
            .await
            .is_err()
    );

    let dir13 = tempfile::tempdir().unwrap();
    let text = config_text(dir13.path(), "", ECHO_ROUTE).replace(
        "self_signed_if_missing = true",
        "self_signed_if_missing = true\nmin_version = \"1.3\"",
    );
    let running = wsgate::start(wsgate::Config::from_toml_str(&text, "t").unwrap()).await.unwrap();
    let mut roots13 = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir13.path().join("server.crt")).unwrap() {
        roots13.add(c.unwrap()).unwrap();
    }
    let cc12 = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots13)
        .with_no_client_auth();
    let r = tokio_rustls::TlsConnector::from(Arc::new(cc12))
        .connect(name(), TcpStream::connect(running.wss_addrs[0]).await.unwrap())
        .await;
    assert!(r.is_err(), "TLS 1.2 accepted with min_version 1.3");
    wait_metric_at(
        running.admin_addr,
        r#"wsgate_connections_rejected_total{reason="tls_handshake"}"#,
        1.0,
    )
    .await;
    running.shutdown();
    running.wait().await;
}

#[tokio::test]
async fn the_expiry_gauge_follows_the_certificate_file_across_a_reload() {
    const EXPIRY: &str = "wsgate_tls_certificate_expiry_timestamp_seconds";
    let gw = Gw::echo().await;
    let pem = std::fs::read(gw.dir.path().join("server.crt")).unwrap();
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let not_after = parsed.parse_x509().unwrap().validity().not_after.timestamp();
    assert_eq!(gw.metric(EXPIRY).await, not_after as f64);

    // A certificate expiring 2031-01-01 00:00:00 UTC, swapped in by a reload.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2031, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(gw.dir.path().join("next.crt"), cert.pem()).unwrap();
    std::fs::write(gw.dir.path().join("next.key"), key.serialize_pem()).unwrap();
    let mut cfg = gw.config.clone();
    cfg.tls.cert.value = gw.dir.path().join("next.crt");
    cfg.tls.key.value = gw.dir.path().join("next.key");
    gw.reload_config(cfg).await.unwrap();
    assert_eq!(gw.metric(EXPIRY).await, 1_924_992_000.0);
}
