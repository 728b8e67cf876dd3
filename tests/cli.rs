//! The command line as a user runs it: exit codes, `check`, `token`, `echo`, `run` + SIGTERM.

mod common;
use futures_util::{SinkExt, StreamExt};
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

fn write_config(dir: &std::path::Path, rest: &str) -> std::path::PathBuf {
    let path = dir.join("gw.toml");
    std::fs::write(&path, common::config_text(dir, "", rest)).unwrap();
    path
}

#[test]
fn check_accepts_the_shipped_config_and_warns_about_dev_settings() {
    let out = Command::new(BIN)
        .args(["check", "--config", "config/gateway.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("warning: tls.self_signed_if_missing"), "{stdout}");
}

#[test]
fn config_errors_name_key_and_line_and_exit_codes_follow_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = [\"127.0.0.1:0\"]\nidle_timeout = \"soon\"\n").unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":3: server.idle_timeout"), "{err}");
    let out = Command::new(BIN).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A secret pasted under an unknown key is never echoed.
    std::fs::write(&path, "[jwt]\nsecret = \"hunter2hunter2\"\n").unwrap();
    let out = Command::new(BIN).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":2:") && !err.contains("hunter2"), "{err}");
    // A missing secret variable is named, and nothing else.
    // (TLS files in the temp dir, so nothing depends on the working directory.)
    let tls = format!(
        "[tls]\ncert = \"{d}/c.pem\"\nkey = \"{d}/k.pem\"\nself_signed_if_missing = true\n",
        d = dir.path().display()
    );
    let routes = "[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"builtin:echo\"]\n";
    std::fs::write(&path, format!("{tls}[jwt]\nsecret_env = \"WSGATE_TEST_UNSET_VAR\"\n{routes}")).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WSGATE_TEST_UNSET_VAR is not set"), "{err}");
    // A missing Redis password file is reported by check, with its key.
    let cluster = format!(
        "[cluster]\nredis = \"redis://127.0.0.1:1/0\"\nredis_password_file = \"{}/missing.password\"\n",
        dir.path().display()
    );
    std::fs::write(&path, format!("{tls}{routes}{cluster}")).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cluster.redis_password_file") && err.contains("missing.password"),
        "{err}"
    );
    // Usage errors exit 2.
    assert_eq!(Command::new(BIN).arg("frobnicate").output().unwrap().status.code(), Some(2));
    assert_eq!(Command::new(BIN).args(["token"]).output().unwrap().status.code(), Some(2));
}

#[test]
fn token_prints_only_a_token_the_gateway_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), common::ECHO_ROUTE);
    let out = Command::new(BIN)
        .args(["token", "--sub", "carol", "--ttl", "5m", "--claim", "scope=echo", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.trim_end_matches('\n');
    assert_eq!(token.lines().count(), 1);
    assert_eq!(token.split('.').count(), 3);
    let cfg = wsgate::Config::load(&path).unwrap();
    let secret = wsgate::auth::load_secret(&cfg.jwt.secret, "t", false).unwrap();
    let id = wsgate::auth::Verifier::new(&cfg.jwt, &secret).verify_now(token).unwrap();
    assert_eq!(id.sub.as_deref(), Some("carol"));
    assert_eq!(id.claims["scope"], "echo");
    assert_eq!(id.claims["iss"], "wsgate-test");
}

/// A child's stderr, collected by a thread as it is written.
#[derive(Clone, Default)]
struct Stderr(Arc<Mutex<String>>);

impl Stderr {
    fn collect(child: &mut std::process::Child) -> Stderr {
        let stderr = child.stderr.take().unwrap();
        let out = Stderr::default();
        let text = out.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut t = text.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        out
    }

    /// Wait for a line holding `marker` followed by `host:port`; returns the port.
    async fn port(&self, marker: &str) -> u16 {
        common::wait_for(&format!("a line with {marker:?} on stderr"), Duration::from_secs(20), || async {
            port_after(&self.0.lock().unwrap(), marker)
        })
        .await
    }
}

/// The port at the end of the first line of `text` holding `marker`.
fn port_after(text: &str, marker: &str) -> Option<u16> {
    let rest = text.lines().find_map(|l| l.split(marker).nth(1))?;
    let port: String = rest
        .split(':')
        .next_back()
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    port.parse().ok()
}

#[tokio::test]
async fn echo_command_echoes() {
    let mut child = Command::new(BIN)
        .args(["echo", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let port = Stderr::collect(&mut child).port("ws://").await;
    let opts = wsgate::client::Options {
        token: None,
        protocols: vec![],
        headers: vec![],
        tls: None,
        ws_config: None,
        ..Default::default()
    };
    let (mut ws, _) = wsgate::client::connect(&format!("ws://127.0.0.1:{port}/"), &opts).await.unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    ws.send(Message::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 4123u16.into(),
        reason: "x".into(),
    })))
    .await
    .unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 4123),
        other => panic!("{other:?}"),
    }
    child.kill().unwrap();
    let _ = child.wait();
}

/// A gateway running as a child process.
struct ChildGw {
    child: std::process::Child,
    port: u16,
    admin: std::net::SocketAddr,
    /// A token minted by `wsgate token`.
    token: String,
    /// Trusts the gateway's certificate.
    tls: Arc<rustls::ClientConfig>,
}

/// `wsgate run` on `path` in a child process, with a token for `sub`.
async fn spawn_gateway(dir: &std::path::Path, path: &std::path::Path, sub: &str) -> ChildGw {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Stderr::collect(&mut child);
    let port = stderr.port("wss://").await;
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], stderr.port("metrics on http://").await));
    let out = Command::new(BIN)
        .args(["token", "--sub", sub, "--config"])
        .arg(path)
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let tls = wsgate::tls::cli_client_config(Some(&dir.join("server.crt")), false).unwrap();
    ChildGw {
        child,
        port,
        admin,
        token,
        tls,
    }
}

#[tokio::test]
async fn run_serves_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), common::ECHO_ROUTE);
    let ChildGw {
        mut child,
        port,
        token,
        tls,
        ..
    } = spawn_gateway(dir.path(), &path, "dave").await;
    let opts = wsgate::client::Options {
        token: Some(token.trim().into()),
        protocols: vec![],
        headers: vec![],
        tls: Some(tls),
        ws_config: None,
        ..Default::default()
    };
    let (mut ws, _) = wsgate::client::connect(&format!("wss://localhost:{port}/echo"), &opts)
        .await
        .unwrap();
    assert_eq!(common::roundtrip(&mut ws, "through the binary").await, "through the binary");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(common::close_code(&mut ws).await.0, 1001);
    let status = common::wait_for("the gateway to exit", Duration::from_secs(15), || {
        let exited = child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sighup_reloads_and_a_bad_file_keeps_the_old_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), common::ECHO_ROUTE);
    let original = std::fs::read_to_string(&path).unwrap();
    let ChildGw {
        mut child,
        port,
        admin,
        token,
        tls,
    } = spawn_gateway(dir.path(), &path, "hup").await;
    let reloads = |result: &str| format!("wsgate_config_reloads_total{{result=\"{result}\"}}");
    let opts = |src: &str| wsgate::client::Options {
        token: Some(token.trim().into()),
        tls: Some(tls.clone()),
        source: Some(src.parse().unwrap()),
        ..Default::default()
    };
    let url = format!("wss://localhost:{port}/echo");
    let pid = child.id().to_string();
    let hup = || assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let (mut live, _) = wsgate::client::connect(&url, &opts("127.0.0.33")).await.unwrap();
    // A broken file: the gateway keeps running on the old config.
    std::fs::write(&path, "[server\nbroken").unwrap();
    hup();
    common::wait_metric_at(admin, &reloads("failure"), 1.0).await;
    assert!(child.try_wait().unwrap().is_none(), "gateway died on a bad reload");
    assert!(wsgate::client::connect(&url, &opts("127.0.0.31")).await.is_ok());
    // A good file with a new deny rule: applies to new connections.
    std::fs::write(&path, format!("[firewall]\ndeny = [\"127.0.0.31\"]\n{original}")).unwrap();
    hup();
    common::wait_metric_at(admin, &reloads("success"), 1.0).await;
    assert!(
        wsgate::client::connect(&url, &opts("127.0.0.31")).await.is_err(),
        "the new deny rule did not apply"
    );
    assert!(wsgate::client::connect(&url, &opts("127.0.0.32")).await.is_ok());
    assert_eq!(common::roundtrip(&mut live, "survived two reloads").await, "survived two reloads");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn check_warns_about_insecure_settings_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("short.secret");
    std::fs::write(&secret, "tooshort\n").unwrap();
    let text = format!(
        "[server]\nlisten = [\"0.0.0.0:0\"]\n[admin]\nlisten = \"0.0.0.0:0\"\n[tls]\ncert = \"{d}/c.pem\"\nkey = \"{d}/k.pem\"\nself_signed_if_missing = true\n\
         [jwt]\nsecret_file = \"{s}\"\nleeway = \"10m\"\n[[routes]]\nname = \"open\"\npath = \"/open\"\nupstreams = [\"builtin:echo\"]\nauth = \"none\"\nallowed_origins = [\"*\"]\n\
         [[routes]]\nname = \"jwt\"\npath = \"/jwt\"\nupstreams = [\"builtin:echo\"]\n",
        d = dir.path().display(),
        s = secret.display()
    );
    let path = dir.path().join("insecure.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for w in [
        "self_signed_if_missing",
        "jwt secret is 8 bytes",
        "admin.listen",
        "leeway",
        "auth = \"none\"",
        "allowed_origins = [\"*\"]",
        "firewall default",
    ] {
        assert!(stdout.contains(w), "missing warning {w:?}:\n{stdout}");
    }
    assert!(!stdout.contains("tooshort"));
    assert!(!dir.path().join("c.pem").exists(), "check must not write files");
}

#[tokio::test]
async fn long_sessions_log_progress_and_logs_never_hold_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gw.log");
    let text = common::config_text(dir.path(), "", common::ECHO_ROUTE).replace(
        "level = \"warn\"",
        &format!(
            "level = \"info\"\nformat = \"json\"\nfile = \"{}\"\nprogress_interval = \"1s\"",
            log.display()
        ),
    );
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let port: u16 = common::wait_for("a listen line in the log file", Duration::from_secs(20), || async {
        let text = log_text();
        let rest = text.split("wss://127.0.0.1:").nth(1)?;
        rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
    })
    .await;
    let count = |what: &str| log_text().lines().filter(|l| l.contains(what)).count();
    let token = String::from_utf8(
        Command::new(BIN)
            .args(["token", "--sub", "longrunner", "--config"])
            .arg(&path)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let token = token.trim().to_string();
    let tls = wsgate::tls::cli_client_config(Some(&dir.path().join("server.crt")), false).unwrap();
    let opts = wsgate::client::Options {
        token: Some(token.clone()),
        tls: Some(tls.clone()),
        ..Default::default()
    };
    let (mut ws, _) = wsgate::client::connect(&format!("wss://localhost:{port}/echo"), &opts)
        .await
        .unwrap();
    assert_eq!(common::roundtrip(&mut ws, "tick").await, "tick");
    // progress_interval is 1s: two progress lines for the open session.
    common::wait_until("two session progress lines", common::TIMEOUT, || async {
        count("session progress") >= 2
    })
    .await;
    // A failed attempt with a token in the query string.
    let bad = wsgate::client::Options {
        tls: Some(tls),
        ..Default::default()
    };
    let _ = wsgate::client::connect(&format!("wss://localhost:{port}/echo?access_token={token}x"), &bad).await;
    ws.close(None).await.unwrap();
    let _ = common::close_code(&mut ws).await;
    common::wait_until("the session's and the failed attempt's log lines", common::TIMEOUT, || async {
        count("session closed") >= 1 && count("authentication failed") >= 1
    })
    .await;
    child.kill().unwrap();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let progress: Vec<&str> = text.lines().filter(|l| l.contains("session progress")).collect();
    assert!(progress.len() >= 2, "{text}");
    for line in &progress {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
        // One flat object (DESIGN 17): the fields beside the message, no span object.
        assert_eq!(v["bytes_in"], 4, "{line}");
        assert_eq!(v["route"], "echo", "{line}");
        assert!(v["request_id"].as_str().is_some_and(|id| id.len() == 32), "{line}");
    }
    assert!(text.contains("\"sub\":\"longrunner\""), "{text}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!text.contains(&token[..40]), "a token reached the log");
    assert!(!text.contains('\u{1b}'), "ANSI colours in a log file");
}

/// The README's two commands: `dev-client-cert` makes a client CA and a certificate, and
/// `client --cert --key` uses it on an mTLS route.
#[tokio::test]
async fn dev_client_cert_and_client_cert_flags_open_an_mtls_route() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let make = |name: &str| {
        Command::new(BIN)
            .args(["dev-client-cert", "--name", name, "--dir"])
            .arg(&pki)
            .output()
            .unwrap()
    };
    let out = make("alice");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("client-ca.crt"));
    #[cfg(unix)]
    for key in ["client-ca.key", "alice.key"] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(pki.join(key)).unwrap().permissions().mode() & 0o777,
            0o600,
            "{key}"
        );
    }
    // Never overwrites; refuses names that are paths.
    assert_eq!(make("alice").status.code(), Some(1));
    assert_eq!(make("../etc/x").status.code(), Some(1));
    assert_eq!(make(".hidden").status.code(), Some(1));
    let ca = pki.join("client-ca.crt");
    let text = common::config_text(dir.path(), "", &common::route("m", "/m", "builtin:echo", "mtls")).replace(
        "self_signed_if_missing = true\n",
        &format!("self_signed_if_missing = true\nclient_ca = \"{}\"\n", ca.display()),
    );
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let gw = spawn_gateway(dir.path(), &path, "x").await;
    let (port, server_crt) = (gw.port, dir.path().join("server.crt"));
    let client = move |cert: bool| {
        let mut c = Command::new(BIN);
        c.args(["client", &format!("wss://localhost:{port}/m"), "--ca"]).arg(&server_crt);
        if cert {
            c.arg("--cert").arg(pki.join("alice.crt")).arg("--key").arg(pki.join("alice.key"));
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"hello over mtls\n").unwrap();
        child.wait_with_output().unwrap()
    };
    let with = tokio::task::spawn_blocking(move || (client(true), client(false))).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&with.0.stdout).trim(),
        "hello over mtls",
        "{}",
        String::from_utf8_lossy(&with.0.stderr)
    );
    assert!(
        String::from_utf8_lossy(&with.1.stderr).contains("refused: HTTP 403"),
        "{}",
        String::from_utf8_lossy(&with.1.stderr)
    );
    let mut child = gw.child;
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn check_validates_tls_acme_and_warns_about_a_staging_server() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("acme");
    let write = |directory: &str| {
        let text = format!(
            "[tls.acme]\ndirectory_url = \"{directory}\"\ncontact = [\"mailto:ops@example.com\"]\ndomains = [\"ws.example.com\", \"192.0.2.7\"]\n\
             cache_dir = \"{}\"\n[[routes]]\nname = \"e\"\npath = \"/e\"\nupstreams = [\"builtin:echo\"]\nauth = \"none\"\n",
            cache.display()
        );
        let path = dir.path().join("acme.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let check = |path: &std::path::Path| {
        let out = Command::new(BIN).args(["check", "--config"]).arg(path).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    // Staging: valid, with a warning; the missing cache directory is not created by check.
    let (code, out) = check(&write("https://acme-staging-v02.api.letsencrypt.org/directory"));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("warning: tls.acme.directory_url") && out.contains("staging"), "{out}");
    assert!(!cache.exists(), "check must not create the cache directory");
    // Production: no such warning.
    let prod = write("https://acme-v02.api.letsencrypt.org/directory");
    let (code, out) = check(&prod);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("staging"), "{out}");
    // A cache directory others can write, or a file in its place: refused, key named.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(&cache).unwrap();
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (code, out) = check(&prod);
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains("tls.acme.cache_dir") && out.contains("writable by other users"),
            "{out}"
        );
        std::fs::remove_dir(&cache).unwrap();
    }
    std::fs::write(&cache, "not a directory").unwrap();
    let (code, out) = check(&prod);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("tls.acme.cache_dir") && out.contains("not a directory"), "{out}");
}

#[cfg(unix)]
#[test]
fn check_refuses_a_cache_directory_others_could_replace() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let check = |cache: &std::path::Path| {
        let text = format!(
            "[tls.acme]\ndomains = [\"ws.example.com\"]\ncache_dir = \"{}\"\n[[routes]]\nname = \"e\"\npath = \"/e\"\nupstreams = [\"builtin:echo\"]\nauth = \"none\"\n",
            cache.display()
        );
        let path = dir.path().join("acme.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let mkdir = |p: &std::path::Path, mode: u32| {
        std::fs::create_dir_all(p).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // A private directory two levels below one every user can write.
    let open = dir.path().join("open");
    mkdir(&open, 0o777);
    mkdir(&open.join("mid"), 0o755);
    mkdir(&open.join("mid/cache"), 0o700);
    let (code, err) = check(&open.join("mid/cache"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("tls.acme.cache_dir") && err.contains("other users can write"), "{err}");
    // A symbolic link in such a directory to a private one: the link could be swapped.
    mkdir(&dir.path().join("good/cache"), 0o700);
    std::os::unix::fs::symlink(dir.path().join("good/cache"), open.join("link")).unwrap();
    let (code, err) = check(&open.join("link"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("other users can write"), "{err}");
    // The private directory itself, in private parents: accepted.
    let (code, err) = check(&dir.path().join("good/cache"));
    assert_eq!(code, Some(0), "{err}");
    // A link another user owns in a sticky directory (like /tmp), even behind one of
    // ours: its owner could repoint it. (Only root can hand a link to another user.)
    let sticky = dir.path().join("sticky");
    mkdir(&sticky, 0o1777);
    let theirs = sticky.join("theirs");
    std::os::unix::fs::symlink(dir.path().join("good/cache"), &theirs).unwrap();
    if std::os::unix::fs::lchown(&theirs, Some(65534), None).is_ok() {
        let (code, err) = check(&theirs);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("belongs to another user") && err.contains("repoint"), "{err}");
        let ours = dir.path().join("ours");
        std::os::unix::fs::symlink(&theirs, &ours).unwrap();
        let (code, err) = check(&ours);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("repoint"), "{err}");
    }
}

#[test]
fn check_and_run_name_a_provider_whose_oidc_discovery_fails() {
    let dir = tempfile::tempdir().unwrap();
    let rest = "[providers.idp]\nkind = \"jwt\"\nissuer = \"https://127.0.0.1:1\"\ndiscovery = true\nalgorithms = [\"RS256\"]\n\n\
                [[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"builtin:echo\"]\nprovider = \"idp\"\n";
    let path = write_config(dir.path(), rest);
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("providers.idp.issuer: OIDC discovery failed: discovery document"),
        "{err}"
    );
    let out = Command::new(BIN).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no keys, no start");
}
