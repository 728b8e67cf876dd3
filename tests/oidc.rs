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
