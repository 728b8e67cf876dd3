//! OIDC discovery and token introspection against a real OpenID provider: the Node
//! package `oidc-provider` (tests/oidc, pinned by its package-lock.json; `npm ci` there
//! first, as scripts/test.sh does) over HTTPS with a test CA, on 127.0.0.1 port 0.

mod common;

use common::*;
use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
};

/// The secret the gateway introspects with (client "wsgate" of the provider).
const GATEWAY_SECRET: &str = "wsgate-test-secret";

/// One `oidc-provider` process, driven by lines on its stdin (see provider.mjs).
struct Idp {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    port: u16,
}

impl Idp {
    /// Start the provider with the certificate `dir/idp.crt` (signed by `dir/idp-ca.pem`).
    fn start(dir: &Path) -> Idp {
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
        assert!(
            here.join("node_modules/oidc-provider").exists(),
            "tests/oidc/node_modules is missing: run (cd tests/oidc && npm ci)"
        );
        write_ca_signed_server_cert(dir, "idp");
        let mut child = Command::new("node")
            .arg(here.join("provider.mjs"))
            .args(["idp.crt", "idp.key", "idp-ca.pem"].map(|f| dir.join(f)))
            .env("WSGATE_SECRET", GATEWAY_SECRET)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut idp = Idp {
            child,
            stdin,
            lines,
            port: 0,
        };
        let ready = idp.next_line();
        idp.port = ready.strip_prefix("READY ").and_then(|p| p.parse().ok()).expect(&ready);
        idp
    }

    fn issuer(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// The next answer (the provider's own notices skipped).
    fn next_line(&self) -> String {
        loop {
            let line = self.lines.recv_timeout(TIMEOUT).expect("the provider answers");
            if !line.starts_with("oidc-provider ") {
                return line;
            }
        }
    }

    fn command(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        self.next_line()
    }

    /// A fresh access token: `"jwt"` (for the resource, signed) or `"opaque"`.
    fn token(&mut self, kind: &str) -> String {
        let got = self.command(kind);
        got.strip_prefix("TOKEN ").map(str::to_string).expect(&got)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop();
    }
}

fn discovery_config(dir: &Path, issuer: &str) -> String {
    format!(
        r#"
[providers.idp]
kind = "jwt"
issuer = "{issuer}"
discovery = true
algorithms = ["RS256"]
audience = ["wsgate"]
ca_file = "{ca}"

[[routes]]
name = "idp"
path = "/idp"
upstreams = ["builtin:echo"]
auth = "jwt"
provider = "idp"
"#,
        ca = dir.join("idp-ca.pem").display(),
    )
}

async fn admits(gw: &Gw, path: &str, token: &str) -> bool {
    match wsgate::client::connect(&gw.url(path), &gw.options(Some(token.to_string()))).await {
        Ok((mut ws, _)) => roundtrip(&mut ws, "hi").await == "hi",
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_the_keys_and_a_jwt_access_token_admits() {
    let idp_dir = tempfile::tempdir().unwrap();
    let mut idp = Idp::start(idp_dir.path());
    let rest = discovery_config(idp_dir.path(), &idp.issuer());
    let gw = Gw::start("", &rest).await;
    let token = idp.token("jwt");
    assert!(admits(&gw, "/idp", &token).await, "a JWT access token of the provider admits");
    let resp = gw.refusal("/idp", &gw.options(Some(idp.token("opaque")))).await;
    assert_eq!(resp.status(), 401, "an opaque token is not a JWT");

    // The document now names another issuer: the reload keeps the keys it had.
    assert_eq!(idp.command("swap"), "OK");
    let text = config_text(gw.dir.path(), "", &rest);
    let notes = gw.reload(&text).await.expect("the reload itself stands");
    assert!(
        notes.iter().any(|n| n.contains("providers.idp.issuer") && n.contains("issuer")),
        "{notes:?}"
    );
    assert!(admits(&gw, "/idp", &idp.token("jwt")).await, "the last good keys stay");

    // The provider is gone: the same.
    idp.stop();
    assert!(gw.reload(&text).await.is_ok());
    assert!(admits(&gw, "/idp", &token).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_that_differs_even_slightly_is_a_config_error_at_start() {
    let idp_dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(idp_dir.path());
    for issuer in [format!("https://127.0.0.1:{}", idp.port), format!("{}/", idp.issuer())] {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(dir.path(), "", &discovery_config(idp_dir.path(), &issuer));
        let config = wsgate::Config::from_toml_str(&text, "test.toml").unwrap();
        let Err(e) = wsgate::start(config).await else {
            panic!("{issuer}: started")
        };
        let e = e.downcast::<wsgate::config::ConfigError>().expect("a config error");
        assert_eq!(e.key, "providers.idp.issuer", "{e}");
        assert!(e.line.is_some() && e.message.contains("issuer"), "{e}");
    }
}

fn introspection_config(dir: &Path, url: &str, issuer: &str, upstream: &str, extra: &str) -> String {
    std::fs::write(dir.join("introspect.secret"), format!("{GATEWAY_SECRET}\n")).unwrap();
    format!(
        r#"
[providers.opaque]
kind = "introspection"
url = "{url}"
client_id = "wsgate"
client_secret_file = "{secret}"
ca_file = "{ca}"
issuer = "{issuer}"
timeout = "1s"
{extra}

[[routes]]
name = "opaque"
path = "/opaque"
upstreams = ["{upstream}"]
auth = "introspection"
provider = "opaque"
require_claims = {{ scope = "chat" }}
forward_claims = {{ client_id = "x-client-id", scope = "x-scope" }}
"#,
        secret = dir.join("introspect.secret").display(),
        ca = dir.join("idp-ca.pem").display(),
    )
}

const PROVIDER: &str = "wsgate_provider_requests_total{provider=\"opaque\",result=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_introspected_opaque_token_admits_with_its_identity_and_a_revoked_one_is_closed() {
    let idp_dir = tempfile::tempdir().unwrap();
    let mut idp = Idp::start(idp_dir.path());
    let url = format!("{}/token/introspection", idp.issuer());
    let up = upstream(Behaviour::Echo).await;
    let extra = "cache = \"30s\"\nrecheck = \"300ms\"";
    let gw = Gw::start("", &introspection_config(idp_dir.path(), &url, &idp.issuer(), &up.url(), extra)).await;

    let token = idp.token("opaque");
    let (mut ws, _) = wsgate::client::connect(&gw.url("/opaque"), &gw.options(Some(token.clone())))
        .await
        .expect("an active token admits");
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
    assert_eq!(
        up.header(0, "x-client-id").as_deref(),
        Some("app"),
        "the answer's claims go upstream"
    );
    assert_eq!(up.header(0, "x-scope").as_deref(), Some("chat"));
    assert!(up.header(0, "authorization").is_none(), "the token is not passed upstream");
    gw.wait_metric(&format!("{PROVIDER}\"allow\"}}"), 1.0).await;

    // A second client with the same token: the cached answer.
    let (mut again, _) = wsgate::client::connect(&gw.url("/opaque"), &gw.options(Some(token.clone())))
        .await
        .expect("admitted from the cache");
    assert_eq!(roundtrip(&mut again, "x").await, "x");
    gw.wait_metric(&format!("{PROVIDER}\"cache_hit\"}}"), 1.0).await;

    // An unknown token: inactive.
    let resp = gw
        .refusal("/opaque", &gw.options(Some("not-a-token-of-this-provider".into())))
        .await;
    assert_eq!(resp.status(), 401);
    gw.wait_metric("wsgate_auth_failures_total{route=\"opaque\",reason=\"inactive\"}", 1.0)
        .await;

    // Revoked at the provider: both sessions end within `recheck`.
    assert_eq!(idp.command(&format!("revoke {token}")), "REVOKED 200");
    assert_eq!(close_code(&mut ws).await.0, 1008);
    assert_eq!(close_code(&mut again).await.0, 1008);
    let resp = gw.refusal("/opaque", &gw.options(Some(token))).await;
    assert_eq!(resp.status(), 401, "the recheck's refusal replaced the kept answer (cache = 30s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_down_refuses_with_503_and_live_sessions_stay() {
    let idp_dir = tempfile::tempdir().unwrap();
    let mut idp = Idp::start(idp_dir.path());
    let url = format!("{}/token/introspection", idp.issuer());
    let gw = Gw::start(
        "",
        &introspection_config(idp_dir.path(), &url, &idp.issuer(), "builtin:echo", "recheck = \"200ms\""),
    )
    .await;
    let (mut ws, _) = wsgate::client::connect(&gw.url("/opaque"), &gw.options(Some(idp.token("opaque"))))
        .await
        .expect("admitted");
    let other = idp.token("opaque");
    idp.stop();
    let resp = gw.refusal("/opaque", &gw.options(Some(other))).await;
    assert_eq!(resp.status(), 503, "never admitted without an answer");
    gw.wait_metric_min(&format!("{PROVIDER}\"error\"}}"), 3.0).await;
    assert_eq!(
        roundtrip(&mut ws, "still here").await,
        "still here",
        "an unreachable provider ends no session"
    );
}

/// An HTTPS endpoint that answers every request in one hostile way.
async fn hostile_endpoint(dir: &Path, answer: &'static [u8], hang: bool) -> u16 {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = CertificateDer::pem_file_iter(dir.join("idp.crt"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("idp.key")).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else { return };
                let mut buf = vec![0u8; 16 * 1024];
                let _ = s.read(&mut buf).await;
                if hang {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    return;
                }
                let _ = s.write_all(answer).await;
                if answer.ends_with(b"\r\n\r\n") {
                    // A body that never ends, as long as anyone reads.
                    let chunk = vec![b' '; 64 * 1024];
                    while s.write_all(&chunk).await.is_ok() {}
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_slow_huge_or_refused_answers_are_503_and_never_admit() {
    let dir = tempfile::tempdir().unwrap();
    write_ca_signed_server_cert(dir.path(), "idp");
    let cases: [(&'static [u8], bool, &str); 5] = [
        (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\nhello",
            false,
            "error",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"active\": \"1\"}",
            false,
            "error",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n", false, "error"),
        (b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n", false, "error"),
        (b"", true, "timeout"),
    ];
    for (answer, hang, result) in cases {
        let port = hostile_endpoint(dir.path(), answer, hang).await;
        let url = format!("https://localhost:{port}/introspect");
        let gw = Gw::start(
            "",
            &introspection_config(dir.path(), &url, "https://idp.example", "builtin:echo", ""),
        )
        .await;
        let t0 = std::time::Instant::now();
        let resp = gw.refusal("/opaque", &gw.options(Some("some-opaque-token".into()))).await;
        assert_eq!(resp.status(), 503, "{}", String::from_utf8_lossy(answer));
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "bounded in time");
        gw.wait_metric(&format!("{PROVIDER}\"{result}\"}}"), 1.0).await;
        assert!(!gw.metrics_text().await.contains("some-opaque-token"));
        gw.stop().await;
    }
}
