//! Several hosts (DESIGN.md section 14): certificates chosen by SNI, routes by host, no
//! domain fronting (421), checked with a real TLS client that sets SNI and `Host`
//! independently.

mod common;

use common::*;
use rustls_pki_types::ServerName;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const EXPIRY: &str = "wsgate_tls_certificate_expiry_timestamp_seconds";
const MISDIRECTED: &str = r#"wsgate_connections_rejected_total{reason="misdirected"}"#;

/// A self-signed certificate for `names` expiring on 1 January of `year`, as `stem`.crt/.key in `dir`.
fn write_cert(dir: &Path, stem: &str, names: &[&str], year: i32) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{stem}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
}

fn certificates(dir: &Path, stems: &[&str]) -> String {
    stems
        .iter()
        .map(|s| {
            format!(
                "[[tls.certificates]]\ncert = \"{0}/{s}.crt\"\nkey = \"{0}/{s}.key\"\n",
                dir.display()
            )
        })
        .collect()
}

const ROUTES: &str = r#"
[[routes]]
name = "chat"
host = "chat.example.com"
path = "/ws"
upstreams = ["builtin:echo"]
auth = "none"
[[routes]]
name = "partners"
host = "*.partners.example.com"
path = "/ws"
upstreams = ["builtin:echo"]
auth = "jwt"
[[routes]]
name = "other"
path = "/ws"
upstreams = ["builtin:echo"]
auth = "jwt"
"#;

/// A gateway serving chat.example.com (first) and partners.example.com with
/// `*.partners.example.com`, from `certs`.
async fn two_hosts(certs: &Path) -> Gw {
    write_cert(certs, "chat", &["chat.example.com"], 2030);
    write_cert(certs, "partners", &["partners.example.com", "*.partners.example.com"], 2031);
    let list = certificates(certs, &["chat", "partners"]);
    Gw::start_with("", ROUTES, |t| {
        let t = t.replace("self_signed_if_missing = true\n", "");
        let start = t.find("cert = ").unwrap();
        let end = t.find("[admin]").unwrap();
        format!("{}{list}\n{}", &t[..start], &t[end..])
    })
    .await
}

/// TLS to the gateway with `sni` (`None`: by address, so no SNI is sent), accepting any
/// certificate: the names of the certificate served, and the stream.
async fn tls(gw: &Gw, sni: Option<&str>) -> (Vec<String>, tokio_rustls::client::TlsStream<TcpStream>) {
    let cc = wsgate::tls::cli_client_config(None, true).unwrap();
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let stream = tokio_rustls::TlsConnector::from(cc)
        .connect(name, TcpStream::connect(gw.addr).await.unwrap())
        .await
        .unwrap();
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let names = parsed
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    (names, stream)
}

/// The status of an upgrade request with these head lines (`Host` included or not).
async fn status(gw: &Gw, sni: Option<&str>, target: &str, head: &str) -> u16 {
    let (_, mut s) = tls(gw, sni).await;
    let req = format!(
        "GET {target} HTTP/1.1\r\n{head}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut chunk)).await.unwrap().unwrap_or(0);
        assert!(n > 0, "closed before an answer: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf)[9..12].parse().unwrap()
}

fn host(h: &str) -> String {
    format!("Host: {h}\r\n")
}

#[tokio::test]
async fn sni_picks_the_certificate_that_names_it_and_the_first_serves_the_rest() {
    let certs = tempfile::tempdir().unwrap();
    let gw = two_hosts(certs.path()).await;
    let chat = vec!["DNSName(chat.example.com)".to_string()];
    let partners = vec![
        "DNSName(partners.example.com)".to_string(),
        "DNSName(*.partners.example.com)".to_string(),
    ];
    assert_eq!(tls(&gw, Some("chat.example.com")).await.0, chat);
    assert_eq!(tls(&gw, Some("CHAT.Example.com")).await.0, chat);
    assert_eq!(tls(&gw, Some("partners.example.com")).await.0, partners);
    assert_eq!(tls(&gw, Some("eu.partners.example.com")).await.0, partners);
    // A wildcard covers one label: two labels, or none, get the first certificate.
    assert_eq!(tls(&gw, Some("a.eu.partners.example.com")).await.0, chat);
    assert_eq!(tls(&gw, Some("example.com")).await.0, chat);
    assert_eq!(tls(&gw, None).await.0, chat);

    // Each certificate has its expiry series; the unlabelled one is the soonest.
    let text = gw.metrics_text().await;
    let year = |y: i32| rcgen::date_time_ymd(y, 1, 1).unix_timestamp() as f64;
    assert_eq!(metric_value(&text, EXPIRY), year(2030), "{text}");
    assert_eq!(metric_value(&text, &format!("{EXPIRY}{{certificate=\"0\"}}")), year(2030));
    assert_eq!(metric_value(&text, &format!("{EXPIRY}{{certificate=\"1\"}}")), year(2031));

    // A reload swaps them: partners first, one certificate fewer.
    let mut cfg = gw.config.clone();
    cfg.tls.certificates.reverse();
    cfg.tls.certificates.truncate(1);
    gw.reload_config(cfg).await.unwrap();
    assert_eq!(tls(&gw, None).await.0, partners);
    assert_eq!(tls(&gw, Some("chat.example.com")).await.0, partners);
    let text = gw.metrics_text().await;
    assert_eq!(metric_value(&text, EXPIRY), year(2031));
    assert!(text.contains(&format!("{EXPIRY}{{certificate=\"1\"}} NaN")), "{text}");
}

#[tokio::test]
async fn routes_match_the_host_and_a_host_the_session_certificate_does_not_name_is_misdirected() {
    let certs = tempfile::tempdir().unwrap();
    let gw = two_hosts(certs.path()).await;
    let chat = Some("chat.example.com");
    // The chat route needs no token; the others do (401 tells them apart).
    assert_eq!(status(&gw, chat, "/ws", &host("chat.example.com")).await, 101);
    assert_eq!(status(&gw, chat, "/ws", &host("Chat.Example.COM.:443")).await, 101);
    assert_eq!(
        status(&gw, Some("eu.partners.example.com"), "/ws", &host("eu.partners.example.com")).await,
        401
    );
    // The partners certificate names partners.example.com, which only the catch-all serves.
    assert_eq!(
        status(&gw, Some("partners.example.com"), "/ws", &host("partners.example.com")).await,
        401
    );

    // Domain fronting: SNI for one name, Host for another the certificate does not name.
    assert_eq!(status(&gw, chat, "/ws", &host("eu.partners.example.com")).await, 421);
    assert_eq!(
        status(&gw, Some("eu.partners.example.com"), "/ws", &host("chat.example.com")).await,
        421
    );
    // SNI naming no certificate gets the first; Host must still be one of its names.
    assert_eq!(status(&gw, Some("evil.test"), "/ws", &host("chat.example.com")).await, 101);
    assert_eq!(status(&gw, Some("evil.test"), "/ws", &host("evil.test")).await, 421);
    // Two labels under a one-label wildcard are no name of it.
    assert_eq!(
        status(&gw, Some("eu.partners.example.com"), "/ws", &host("a.eu.partners.example.com")).await,
        421
    );
    // An address as Host with SNI: not a name of the certificate.
    assert_eq!(status(&gw, chat, "/ws", &host("127.0.0.1")).await, 421);
    wait_metric_at(gw.admin, MISDIRECTED, 5.0).await;

    // Without SNI (a client by address) there is no such check: Host routes.
    assert_eq!(status(&gw, None, "/ws", &host("chat.example.com")).await, 101);
    assert_eq!(status(&gw, None, "/ws", &host("eu.partners.example.com")).await, 401);

    // No Host, two, one that is not a host, or a request target naming another: 400.
    assert_eq!(status(&gw, chat, "/ws", "").await, 400);
    assert_eq!(status(&gw, chat, "/ws", &format!("{0}{0}", host("chat.example.com"))).await, 400);
    assert_eq!(status(&gw, chat, "/ws", &host("chat.example.com@evil.test")).await, 400);
    assert_eq!(status(&gw, chat, "/ws", &host("chat.example.com:x")).await, 400);
    assert_eq!(status(&gw, chat, "https://evil.test/ws", &host("chat.example.com")).await, 400);
    assert_eq!(
        status(&gw, chat, "https://chat.example.com/ws", &host("chat.example.com")).await,
        101
    );
    assert_eq!(gw.metric(MISDIRECTED).await, 5.0);
}

#[tokio::test]
async fn a_single_certificate_also_refuses_a_host_it_does_not_name() {
    // The usual test gateway: one self-signed certificate for localhost and 127.0.0.1.
    let gw = Gw::start("", &route("open", "/ws", "builtin:echo", "none")).await;
    assert_eq!(
        status(&gw, Some("localhost"), "/ws", &host(&format!("localhost:{}", gw.addr.port()))).await,
        101
    );
    assert_eq!(status(&gw, Some("localhost"), "/ws", &host("chat.example.com")).await, 421);
    assert_eq!(status(&gw, None, "/ws", &host("chat.example.com")).await, 101);
    // And real clients still connect as before.
    let mut ws = gw.connect("/ws").await;
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
}

#[test]
fn check_warns_about_a_route_host_no_certificate_names() {
    let certs = tempfile::tempdir().unwrap();
    write_cert(certs.path(), "chat", &["chat.example.com", "*.apps.example.com"], 2030);
    let text = format!(
        "{}\n{}",
        certificates(certs.path(), &["chat"]),
        ROUTES.replace("*.partners", "*.apps").replace("\"jwt\"", "\"none\"")
            + "[[routes]]\nname = \"nowhere\"\nhost = \"nowhere.example.com\"\npath = \"/x\"\nupstreams = [\"builtin:echo\"]\nauth = \"none\"\n"
    );
    let text = text.replacen("[[tls.certificates]]", "[tls]\n[[tls.certificates]]", 1);
    let cfg = wsgate::Config::from_toml_str(&text, "t.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let rt = wsgate::gateway::Runtime::load(cfg, false).unwrap();
    let warnings = wsgate::check::host_warnings(&rt.config, &rt.certs);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("\"nowhere\"") && warnings[0].contains("nowhere.example.com"),
        "{warnings:?}"
    );
}
