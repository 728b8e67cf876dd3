//! `[tls.acme]` against a real ACME server: Debian's `pebble` (Let's Encrypt's test
//! CA), started here on free loopback ports with its own CA for its HTTPS, and its
//! validation authority's `tlsPort` pointed at the gateway's listener, so every
//! certificate is issued only after a real TLS-ALPN-01 validation (Pebble's
//! always-valid mode stays off). `scripts/test.sh` installs `pebble`.

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const ISSUED: &str = "wsgate_acme_orders_total{result=\"issued\"}";
const FAILED: &str = "wsgate_acme_orders_total{result=\"failed\"}";
const EXPIRY: &str = "wsgate_tls_certificate_expiry_timestamp_seconds";
/// Longer than the first order takes on a loaded machine.
const ORDER_WAIT: Duration = Duration::from_secs(60);

/// A Pebble on free loopback ports, stopped when dropped.
struct Pebble {
    child: Option<Child>,
    port: u16,
    management: u16,
    dir: PathBuf,
}

impl Pebble {
    /// Start Pebble in `dir`, validating TLS-ALPN-01 on `tls_port` and issuing
    /// certificates valid for `validity`. Its HTTPS CA is written to `dir/pebble-ca.pem`.
    fn start(dir: &Path, tls_port: u16, validity: Duration) -> Pebble {
        write_ca_signed_server_cert(dir, "pebble");
        let (port, management, http_port) = (free_port(), free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("pebble.crt"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity.as_secs(),
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            // No random 0-15 s validation delays; a fresh authorization for every order
            // (so a renewal is validated again, not reused).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env_remove("PEBBLE_VA_ALWAYS_VALID")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("pebble is needed (scripts/test.sh installs Debian's pebble)");
        let deadline = Instant::now() + TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() || std::net::TcpStream::connect(("127.0.0.1", management)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "pebble did not start:\n{}",
                std::fs::read_to_string(dir.join("pebble.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20)); // kept: polling a process start
        }
        Pebble {
            child: Some(child),
            port,
            management,
            dir: dir.to_path_buf(),
        }
    }

    /// Pebble's issuing root (new at every start), written to `dir/pebble-root.pem`.
    async fn root(&self) -> PathBuf {
        let body = https_get(
            SocketAddr::from(([127, 0, 0, 1], self.management)),
            "/roots/0",
            &self.dir.join("pebble-ca.pem"),
        )
        .await;
        assert!(body.contains("BEGIN CERTIFICATE"), "{body}");
        let path = self.dir.join("pebble-root.pem");
        std::fs::write(&path, body).unwrap();
        path
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

/// GET over HTTPS trusting `ca` only; the body.
async fn https_get(addr: SocketAddr, path: &str, ca: &Path) -> String {
    let tls = wsgate::tls::cli_client_config(Some(ca), false).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out)).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(text)
}

/// The gateway's config: ACME from `pebble` for localhost and 127.0.0.1, echo on `/echo`.
fn acme_config(dir: &Path, port: u16, pebble_port: u16, renew_before: &str) -> wsgate::Config {
    let d = dir.display();
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:{port}"]

[tls.acme]
directory_url = "https://127.0.0.1:{pebble_port}/dir"
contact = ["mailto:ops@example.com"]
domains = ["localhost", "127.0.0.1"]
cache_dir = "{d}/acme"
renew_before = "{renew_before}"
ca_file = "{d}/pebble-ca.pem"

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn"

{route}
"#,
        route = route("echo", "/echo", "builtin:echo", "none")
    );
    wsgate::Config::from_toml_str(&text, "acme.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn metric(admin: SocketAddr, series: &str) -> f64 {
    metric_value(&http_get(admin, "/metrics").await.1, series)
}

async fn wait_metric_min(admin: SocketAddr, series: &str, min: f64, within: Duration) {
    let reached = poll_until(within, || async move { (metric(admin, series).await >= min).then_some(()) }).await;
    assert!(
        reached.is_some(),
        "{series} never reached {min}\n{}",
        http_get(admin, "/metrics").await.1
    );
}

/// The certificate the gateway serves to an ordinary client (ALPN http/1.1) for
/// `host`, verified against `root`: its DER.
async fn served_certificate(addr: SocketAddr, host: &str, root: &Path) -> Result<Vec<u8>, String> {
    let tls = wsgate::tls::cli_client_config(Some(root), false)?;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let s = tokio::time::timeout(TIMEOUT, tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let certs = s.get_ref().1.peer_certificates().ok_or("no certificate")?;
    Ok(certs[0].as_ref().to_vec())
}

fn not_after(der: &[u8]) -> i64 {
    x509_parser::parse_x509_certificate(der).unwrap().1.validity().not_after.timestamp()
}

async fn echo_client(addr: SocketAddr, host: &str, root: &Path) -> wsgate::client::ClientStream {
    let opts = wsgate::client::Options {
        tls: Some(wsgate::tls::cli_client_config(Some(root), false).unwrap()),
        ..Default::default()
    };
    let url = format!("wss://{host}:{}/echo", addr.port());
    tokio::time::timeout(TIMEOUT, wsgate::client::connect(&url, &opts))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .0
}

async fn echo(ws: &mut wsgate::client::ClientStream, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(TIMEOUT, ws.next()).await.expect("no echo").unwrap().unwrap();
    assert_eq!(got.into_text().unwrap().as_str(), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_issuance_passes_the_real_challenge_and_a_restart_serves_the_cache_without_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut pebble = Pebble::start(dir.path(), port, Duration::from_secs(3600));
    let config = acme_config(dir.path(), port, pebble.port, "30m");
    let running = wsgate::start(config.clone()).await.unwrap();
    let addr = running.wss_addrs[0];
    wait_metric_min(running.admin_addr, ISSUED, 1.0, ORDER_WAIT).await;
    assert_eq!(metric(running.admin_addr, FAILED).await, 0.0);
    let root = pebble.root().await;

    // Pebble validated both names over TLS-ALPN-01 on our listener (no always-valid mode).
    let log = pebble.log();
    assert!(!log.contains("ALWAYS_VALID") && !log.contains("always valid"), "{log}");
    assert!(log.matches("set VALID by completed challenge").count() >= 2, "{log}");
    // The certificate names both, chains to Pebble's root, and the gauge shows its expiry.
    let by_name = served_certificate(addr, "localhost", &root).await.unwrap();
    let mut ws = echo_client(addr, "127.0.0.1", &root).await;
    echo(&mut ws, "over an issued certificate").await;
    assert_eq!(metric(running.admin_addr, EXPIRY).await, not_after(&by_name) as f64);
    drop(ws);

    // The cache: one directory (0700), account and certificate files (0600).
    let cache = dir.path().join("acme");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o700);
        let files: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 2, "{files:?}");
        for f in &files {
            assert_eq!(std::fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600, "{f:?}");
        }
    }

    // Restart with Pebble gone: the cached certificate is served at once, no order made.
    running.shutdown();
    tokio::time::timeout(TIMEOUT, running.wait()).await.unwrap();
    pebble.stop();
    let running = wsgate::start(config).await.unwrap();
    let again = served_certificate(running.wss_addrs[0], "localhost", &root).await.unwrap();
    assert_eq!(again, by_name, "the restarted gateway serves the cached certificate");
    let mut ws = echo_client(running.wss_addrs[0], "localhost", &root).await;
    echo(&mut ws, "after a restart without the CA").await;
    assert_eq!(metric(running.admin_addr, ISSUED).await, 0.0);
    assert_eq!(metric(running.admin_addr, FAILED).await, 0.0);
    assert_eq!(metric(running.admin_addr, EXPIRY).await, not_after(&by_name) as f64);
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_swaps_the_certificate_while_a_session_keeps_echoing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // 30 s certificates with renew_before longer than their life: renewed a third of the
    // way in (about every 10 s), never in a loop.
    let pebble = Pebble::start(dir.path(), port, Duration::from_secs(30));
    let running = wsgate::start(acme_config(dir.path(), port, pebble.port, "1h")).await.unwrap();
    let (addr, admin) = (running.wss_addrs[0], running.admin_addr);
    wait_metric_min(admin, ISSUED, 1.0, ORDER_WAIT).await;
    let root = pebble.root().await;
    let first = served_certificate(addr, "localhost", &root).await.unwrap();
    let mut ws = echo_client(addr, "localhost", &root).await;
    echo(&mut ws, "before the renewal").await;

    // The session keeps echoing while the certificate is renewed underneath it.
    let deadline = Instant::now() + ORDER_WAIT;
    let mut n = 0;
    while metric(admin, ISSUED).await < 2.0 {
        assert!(Instant::now() < deadline, "no renewal\n{}", pebble.log());
        n += 1;
        echo(&mut ws, &format!("message {n} during the renewal")).await;
        tokio::time::sleep(Duration::from_millis(100)).await; // kept: paces the session's traffic
    }
    echo(&mut ws, "after the renewal").await;
    let second = served_certificate(addr, "localhost", &root).await.unwrap();
    assert_ne!(second, first, "the next handshake gets the renewed certificate");
    assert!(not_after(&second) > not_after(&first));
    assert!(metric(admin, EXPIRY).await >= not_after(&second) as f64);
    assert_eq!(metric(admin, FAILED).await, 0.0);
    // Not renewed in a loop: at most one more order within the next two seconds.
    let issued = metric(admin, ISSUED).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // kept: watching that nothing happens
    assert!(metric(admin, ISSUED).await <= issued + 1.0);
    ws.close(None).await.unwrap();
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_keeps_the_current_certificate_and_counts_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // 45 s certificates renewed after about 15 s: the failure comes long before the expiry.
    let mut pebble = Pebble::start(dir.path(), port, Duration::from_secs(45));
    let running = wsgate::start(acme_config(dir.path(), port, pebble.port, "1h")).await.unwrap();
    let (addr, admin) = (running.wss_addrs[0], running.admin_addr);
    wait_metric_min(admin, ISSUED, 1.0, ORDER_WAIT).await;
    let root = pebble.root().await;
    let current = served_certificate(addr, "localhost", &root).await.unwrap();
    let mut ws = echo_client(addr, "localhost", &root).await;
    pebble.stop();

    wait_metric_min(admin, FAILED, 1.0, ORDER_WAIT).await;
    assert_eq!(metric(admin, ISSUED).await, 1.0);
    let still = served_certificate(addr, "localhost", &root).await.unwrap();
    assert_eq!(still, current, "a failed renewal keeps the current certificate");
    assert_eq!(metric(admin, EXPIRY).await, not_after(&current) as f64);
    echo(&mut ws, "the session outlives the failed renewal").await;
    // The next attempt waits out a back-off of at least 30 s: no retry storm.
    tokio::time::sleep(Duration::from_secs(2)).await; // kept: watching that nothing happens
    assert_eq!(metric(admin, FAILED).await, 1.0);
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_first_certificate_handshakes_fail_cleanly_and_the_gauge_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // No ACME server on this port: every order fails.
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("pebble-ca.pem"), ca.cert.pem()).unwrap();
    let mut config = acme_config(dir.path(), 0, free_port(), "30d");
    config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    let running = wsgate::start(config).await.unwrap();
    let (addr, admin) = (running.wss_addrs[0], running.admin_addr);
    wait_metric_min(admin, FAILED, 1.0, ORDER_WAIT).await;
    assert_eq!(metric(admin, EXPIRY).await, 0.0);
    assert!(http_get(admin, "/metrics").await.1.contains(&format!("{EXPIRY} 0")));

    // An ordinary client: a TLS alert, no certificate, no HTTP.
    let insecure = wsgate::tls::cli_client_config(None, true).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let err = tokio_rustls::TlsConnector::from(insecure.clone()).connect(name.clone(), tcp).await;
    assert!(err.is_err(), "a handshake completed without a certificate");
    // A validation-server lookalike (acme-tls/1 only) with no challenge pending: refused too.
    let mut acme_only = (*insecure).clone();
    acme_only.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let err = tokio_rustls::TlsConnector::from(Arc::new(acme_only)).connect(name, tcp).await;
    assert!(err.is_err(), "acme-tls/1 got a certificate with no challenge pending");
    wait_metric_min(admin, "wsgate_connections_rejected_total{reason=\"tls_handshake\"}", 2.0, TIMEOUT).await;
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_client_offering_acme_tls_among_others_gets_the_real_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pebble = Pebble::start(dir.path(), port, Duration::from_secs(3600));
    let running = wsgate::start(acme_config(dir.path(), port, pebble.port, "30d")).await.unwrap();
    wait_metric_min(running.admin_addr, ISSUED, 1.0, ORDER_WAIT).await;
    let root = pebble.root().await;
    let mut cfg = (*wsgate::tls::cli_client_config(Some(&root), false).unwrap()).clone();
    cfg.alpn_protocols = vec![b"acme-tls/1".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(running.wss_addrs[0]).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let s = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    // Verified against Pebble's root (so not a challenge certificate), and spoken as HTTP.
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(b"http/1.1".as_slice()));
    // acme-tls/1 with a protocol the gateway does not speak: acme-tls/1 would be the only
    // one in common, so this is a validation attempt, and none is pending: refused.
    let mut h2 = (*wsgate::tls::cli_client_config(Some(&root), false).unwrap()).clone();
    h2.alpn_protocols = vec![b"acme-tls/1".to_vec(), b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(running.wss_addrs[0]).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    assert!(tokio_rustls::TlsConnector::from(Arc::new(h2)).connect(name, tcp).await.is_err());
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_serving_the_acme_certificate_and_switching_sources_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pebble = Pebble::start(dir.path(), port, Duration::from_secs(3600));
    let config = acme_config(dir.path(), port, pebble.port, "30m");
    let running = wsgate::start(config.clone()).await.unwrap();
    let (addr, admin) = (running.wss_addrs[0], running.admin_addr);
    wait_metric_min(admin, ISSUED, 1.0, ORDER_WAIT).await;
    let root = pebble.root().await;
    let issued = served_certificate(addr, "localhost", &root).await.unwrap();

    // A reload (another renew_before: noted as needing a restart) keeps the ACME store.
    let mut changed = config.clone();
    changed.tls.acme.as_mut().unwrap().renew_before = Duration::from_secs(7200);
    let notes = running.gateway.reload(changed).await.unwrap();
    assert!(notes.iter().any(|n| n.contains("[tls.acme] changed")), "{notes:?}");
    assert_eq!(served_certificate(addr, "localhost", &root).await.unwrap(), issued);
    let mut ws = echo_client(addr, "localhost", &root).await;
    echo(&mut ws, "after the reload").await;

    // Certificate files instead of [tls.acme] on a reload: refused, the ACME certificate stays.
    let mut files = config.clone();
    files.tls.acme = None;
    files.tls.cert.value = dir.path().join("files.crt");
    files.tls.key.value = dir.path().join("files.key");
    files.tls.self_signed_if_missing = true;
    let e = running.gateway.reload(files).await.unwrap_err();
    assert_eq!(e.key, "tls.acme");
    assert!(e.message.contains("restart"), "{e}");
    assert_eq!(served_certificate(addr, "localhost", &root).await.unwrap(), issued);
    running.shutdown();

    // And the other way: a gateway on files does not take [tls.acme] on a reload.
    let gw = Gw::echo().await;
    let e = gw.reload_config(config).await.unwrap_err();
    assert_eq!(e.key, "tls.acme");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_file_others_could_have_written_is_not_trusted() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut pebble = Pebble::start(dir.path(), port, Duration::from_secs(3600));
    let config = acme_config(dir.path(), port, pebble.port, "30d");
    let running = wsgate::start(config.clone()).await.unwrap();
    wait_metric_min(running.admin_addr, ISSUED, 1.0, ORDER_WAIT).await;
    let root = pebble.root().await;
    running.shutdown();
    tokio::time::timeout(TIMEOUT, running.wait()).await.unwrap();
    pebble.stop();

    // The cached certificate made readable by others: not served after a restart (and
    // with the CA gone, nothing is until an order succeeds).
    let cached = std::fs::read_dir(dir.path().join("acme"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("certificate-"))
        .unwrap();
    std::fs::set_permissions(&cached, std::fs::Permissions::from_mode(0o644)).unwrap();
    let running = wsgate::start(config.clone()).await.unwrap();
    assert!(served_certificate(running.wss_addrs[0], "localhost", &root).await.is_err());
    wait_metric_min(running.admin_addr, FAILED, 1.0, ORDER_WAIT).await;
    assert_eq!(metric(running.admin_addr, EXPIRY).await, 0.0);
    running.shutdown();
    tokio::time::timeout(TIMEOUT, running.wait()).await.unwrap();

    // A cache directory that belongs to another user refuses to start (as root, the
    // only user that can hand a directory to another).
    std::fs::set_permissions(&cached, std::fs::Permissions::from_mode(0o600)).unwrap();
    if std::os::unix::fs::chown(dir.path().join("acme"), Some(65534), None).is_ok() {
        let e = wsgate::start(config).await.err().expect("a foreign cache directory was accepted");
        assert!(e.to_string().contains("another user"), "{e}");
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_checked_again_before_each_use_and_an_account_of_another_ca_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pebble = Pebble::start(dir.path(), port, Duration::from_secs(30));
    let running = wsgate::start(acme_config(dir.path(), port, pebble.port, "1h")).await.unwrap();
    let admin = running.admin_addr;
    wait_metric_min(admin, ISSUED, 1.0, ORDER_WAIT).await;
    let cache = dir.path().join("acme");
    let account = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("account-"))
        .unwrap();

    // The account file now names another CA's directory: not used; a new account is made.
    let mut creds: serde_json::Value = serde_json::from_slice(&std::fs::read(&account).unwrap()).unwrap();
    creds["directory"] = "https://127.0.0.1:1/dir".into();
    std::fs::write(&account, creds.to_string()).unwrap();
    wait_metric_min(admin, ISSUED, 2.0, ORDER_WAIT).await;
    assert_eq!(
        pebble.log().matches("There are now 2 accounts in memory").count(),
        1,
        "{}",
        pebble.log()
    );
    let reread: serde_json::Value = serde_json::from_slice(&std::fs::read(&account).unwrap()).unwrap();
    assert_eq!(reread["directory"], format!("https://127.0.0.1:{}/dir", pebble.port));

    // The directory made writable by others while running: the next renewal refuses to
    // use it (counted as failed), and the current certificate stays.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    wait_metric_min(admin, FAILED, 1.0, ORDER_WAIT).await;
    assert!(metric(admin, EXPIRY).await > 0.0);
    running.shutdown();
}
