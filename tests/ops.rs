//! Process integration (DESIGN.md section 17) against the binary: systemd notifications
//! on a real datagram socket, and `watch_config`.

mod common;
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::net::UnixDatagram;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// `wsgate run` in a child process, its stderr collected as it is written.
struct ChildGw {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl ChildGw {
    fn spawn(config: &Path, env: &[(&str, String)]) -> ChildGw {
        ChildGw::spawn_with(config, &["run", "--config"], env)
    }

    fn spawn_args(config: &Path, args: &[&str]) -> ChildGw {
        ChildGw::spawn_with(config, args, &[])
    }

    fn spawn_with(config: &Path, args: &[&str], env: &[(&str, String)]) -> ChildGw {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("RUNTIME_DIRECTORY")
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let text = stderr.clone();
        let log_file = config.with_file_name("gw.log");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut t = text.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
                let _ = std::fs::write(&log_file, t.as_bytes());
            }
        });
        ChildGw { child, stderr }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    /// The port of the first `wss://127.0.0.1:PORT` line.
    async fn port(&self, marker: &str) -> u16 {
        common::wait_for(&format!("{marker} on stderr"), Duration::from_secs(20), || async {
            let text = self.stderr.lock().unwrap().clone();
            let rest = text.lines().find_map(|l| l.split(marker).nth(1).map(str::to_string))?;
            rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
        })
        .await
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    async fn exit_code(mut self) -> Option<i32> {
        let status = common::wait_for("the gateway to exit", Duration::from_secs(20), || {
            let exited = self.child.try_wait().unwrap();
            async move { exited }
        })
        .await;
        status.code()
    }
}

impl Drop for ChildGw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The systemd side of `NOTIFY_SOCKET`: datagrams as systemd receives them.
struct Systemd {
    sock: UnixDatagram,
    path: PathBuf,
    watchdogs: usize,
}

impl Systemd {
    fn bind(dir: &Path) -> Systemd {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Systemd { sock, path, watchdogs: 0 }
    }

    /// The next message that is not a watchdog ping (those are counted).
    async fn next(&mut self) -> String {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok(n) = tokio::time::timeout(Duration::from_secs(20), self.sock.recv(&mut buf)).await else {
                let log = std::fs::read_to_string(self.path.with_file_name("gw.log")).unwrap_or_default();
                panic!("no notification within 20 s; the gateway's log so far:\n{log}");
            };
            let n = n.unwrap();
            let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
            if msg == "WATCHDOG=1\n" {
                self.watchdogs += 1;
            } else {
                return msg;
            }
        }
    }
}

fn write_config(dir: &Path, extra_server: &str) -> PathBuf {
    let path = dir.join("gw.toml");
    std::fs::write(&path, common::config_text(dir, extra_server, common::ECHO_ROUTE)).unwrap();
    path
}

#[tokio::test]
async fn systemd_hears_ready_reloading_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut systemd = Systemd::bind(dir.path());
    let socket = systemd.path.display().to_string();
    let gw = ChildGw::spawn(&config, &[("NOTIFY_SOCKET", socket), ("WATCHDOG_USEC", "200000".into())]);

    // READY=1 only once the listeners accept.
    assert_eq!(systemd.next().await, "READY=1\n");
    let port = gw.port("wss://127.0.0.1:").await;
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("READY=1 before listening");

    // SIGHUP: RELOADING=1 with the monotonic clock, then READY=1 with a status.
    gw.signal("-HUP");
    let reloading = systemd.next().await;
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading}");
    let usec: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {reloading}"));
    assert!(usec > 0);
    assert_eq!(systemd.next().await, "READY=1\nSTATUS=config reloaded\n");

    // A broken file: still READY=1 afterwards (the old config serves), saying so.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, "[server\nbroken").unwrap();
    gw.signal("-HUP");
    assert!(systemd.next().await.starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(systemd.next().await, "READY=1\nSTATUS=reload failed, running the previous config\n");
    std::fs::write(&config, good).unwrap();

    // WATCHDOG_USEC=200000: a ping every 100 ms.
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        let n = tokio::time::timeout(Duration::from_secs(5), systemd.sock.recv(&mut buf))
            .await
            .expect("no watchdog ping")
            .unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
    }

    // SIGTERM: STOPPING=1, then the drain, exit 0.
    gw.signal("-TERM");
    assert_eq!(systemd.next().await, "STOPPING=1\n");
    let log = gw.log();
    assert_eq!(gw.exit_code().await, Some(0), "{log}");
}

/// A gateway process with `[server] control_socket` (in `dir`) and `extra_server`, and
/// an `/open` route (no auth) to the echo; its config file, the route's URL and client
/// options that trust its certificate.
async fn open_gateway(dir: &Path, extra_server: &str) -> (ChildGw, PathBuf, (String, wsgate::client::Options)) {
    let extra = format!("control_socket = \"{}\"\n{extra_server}", dir.join("control.sock").display());
    let config = dir.join("gw.toml");
    let open_route = common::route("open", "/open", "builtin:echo", "none");
    std::fs::write(&config, common::config_text(dir, &extra, &open_route)).unwrap();
    let gw = ChildGw::spawn(&config, &[]);
    let port = gw.port("wss://127.0.0.1:").await;
    let tls = wsgate::tls::cli_client_config(Some(&dir.join("server.crt")), false).unwrap();
    let opts = wsgate::client::Options {
        tls: Some(tls),
        ..Default::default()
    };
    (gw, config, (format!("wss://localhost:{port}/open"), opts))
}

/// SIGTERM closes the listening sockets at once, the copies kept for a takeover
/// included: a new connection is refused (its client tries another instance) while a
/// live session still drains, instead of waiting in the backlog to be reset at exit.
#[tokio::test]
async fn a_drain_refuses_new_connections_at_once_while_a_live_session_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _, (url, opts)) = open_gateway(dir.path(), "shutdown_grace = \"10s\"\nclose_timeout = \"3s\"").await;
    let port: u16 = url.split(':').nth(2).and_then(|p| p.split('/').next()?.parse().ok()).unwrap();
    let (mut live, _) = wsgate::client::connect(&url, &opts).await.expect("connected");
    assert_eq!(common::roundtrip(&mut live, "before").await, "before");

    // The session does not answer the gateway's close: the drain lasts close_timeout.
    gw.signal("-TERM");
    common::wait_for("the drain to start", Duration::from_secs(10), || async {
        gw.log().contains("draining").then_some(())
    })
    .await;
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert_eq!(
        refused.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "a connection during the drain: {refused:?}\n{}",
        gw.log()
    );
    assert!(!gw.log().contains("stopped"), "the drain ended already: {}", gw.log());
    drop(live);
    let log = gw.log();
    assert_eq!(gw.exit_code().await, Some(0), "{log}");
}

#[tokio::test]
async fn a_watchdog_for_another_pid_is_not_pinged_and_no_socket_is_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut systemd = Systemd::bind(dir.path());
    // WATCHDOG_PID names another process: the watchdog is not ours to ping.
    let env = [
        ("NOTIFY_SOCKET", systemd.path.display().to_string()),
        ("WATCHDOG_USEC", "100000".to_string()),
        ("WATCHDOG_PID", "1".to_string()),
    ];
    let gw = ChildGw::spawn(&config, &env);
    assert_eq!(systemd.next().await, "READY=1\n");
    gw.signal("-TERM");
    assert_eq!(systemd.next().await, "STOPPING=1\n");
    assert_eq!(gw.exit_code().await, Some(0));
    assert_eq!(systemd.watchdogs, 0);

    // No NOTIFY_SOCKET at all (not under systemd): runs, reloads and stops as before.
    let gw = ChildGw::spawn(&config, &[]);
    gw.port("wss://127.0.0.1:").await;
    gw.signal("-HUP");
    common::wait_for("the reload", Duration::from_secs(20), || async {
        gw.log().contains("reloaded").then_some(())
    })
    .await;
    assert!(!gw.log().contains("watchdog"), "{}", gw.log());
    gw.signal("-TERM");
    assert_eq!(gw.exit_code().await, Some(0));
}

/// A Kubernetes ConfigMap volume: `NAME -> ..data/NAME`, `..data -> ..VERSION/`, and an
/// update is a new `..VERSION/` and an atomic rename of a new `..data` symlink over the old.
struct ConfigMap {
    root: PathBuf,
    versions: usize,
}

impl ConfigMap {
    fn new(root: &Path, files: &[(&str, String)]) -> ConfigMap {
        std::fs::create_dir_all(root).unwrap();
        let mut cm = ConfigMap {
            root: root.to_path_buf(),
            versions: 0,
        };
        cm.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).unwrap();
        }
        cm
    }

    /// Write a new version and swap `..data` to it in one rename.
    fn update(&mut self, files: &[(&str, String)]) {
        self.versions += 1;
        let version = format!("..2026_12_07_00_00_{:02}.{}", self.versions, std::process::id());
        std::fs::create_dir(self.root.join(&version)).unwrap();
        for (name, text) in files {
            std::fs::write(self.root.join(&version).join(name), text).unwrap();
        }
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("..data")).unwrap();
    }
}

/// The watched gateway's config: `/open` without auth, the deny list from `deny_file`.
fn watched_config(dir: &Path, deny_file: &Path, extra_server: &str) -> String {
    let rest = format!(
        "{}\n[firewall]\ndeny_files = [\"{}\"]\n",
        common::route("open", "/open", "builtin:echo", "none"),
        deny_file.display()
    );
    common::config_text(dir, &format!("watch_config = true\n{extra_server}"), &rest)
}

/// Whether a wss client from `source` gets a session on `/open`.
async fn served(port: u16, tls: &Arc<rustls::ClientConfig>, source: &str) -> bool {
    let opts = wsgate::client::Options {
        tls: Some(tls.clone()),
        source: Some(source.parse().unwrap()),
        ..Default::default()
    };
    wsgate::client::connect(&format!("wss://localhost:{port}/open"), &opts)
        .await
        .is_ok()
}

fn reloads(result: &str) -> String {
    format!("wsgate_config_reloads_total{{result=\"{result}\"}}")
}

async fn reloads_count(admin: u16, result: &str) -> f64 {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    common::metric_value(&common::http_get(addr, "/metrics").await.1, &reloads(result))
}

/// Wait (at most `within`) for the next reload's outcome, as systemd hears it.
async fn next_reload(systemd: &mut Systemd, within: Duration) -> String {
    let started = std::time::Instant::now();
    let msg = tokio::time::timeout(within, systemd.next()).await.expect("no reload in time");
    assert!(msg.starts_with("RELOADING=1\n"), "{msg}");
    let left = within.saturating_sub(started.elapsed()).max(Duration::from_secs(5));
    tokio::time::timeout(left, systemd.next()).await.expect("reload did not end")
}

#[tokio::test]
async fn watch_config_follows_a_configmap_symlink_swap_within_2s_and_ignores_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let cm_dir = dir.path().join("cm");
    let text = |deny: &str| {
        vec![
            ("gw.toml", watched_config(dir.path(), &cm_dir.join("deny.txt"), "")),
            ("deny.txt", format!("# blocklist\n{deny}")),
        ]
    };
    let mut cm = ConfigMap::new(&cm_dir, &text(""));
    let mut systemd = Systemd::bind(dir.path());
    let gw = ChildGw::spawn(&cm_dir.join("gw.toml"), &[("NOTIFY_SOCKET", systemd.path.display().to_string())]);
    assert_eq!(systemd.next().await, "READY=1\n");
    let port = gw.port("wss://127.0.0.1:").await;
    let admin = gw.port("metrics on http://127.0.0.1:").await;
    let tls = wsgate::tls::cli_client_config(Some(&dir.path().join("server.crt")), false).unwrap();
    assert!(served(port, &tls, "127.0.0.41").await);

    // The deny list changes in a new version: applied within 2 s of the swap.
    cm.update(&text("127.0.0.41\n"));
    let swapped = std::time::Instant::now();
    assert_eq!(
        next_reload(&mut systemd, Duration::from_secs(2)).await,
        "READY=1\nSTATUS=config reloaded\n"
    );
    assert!(swapped.elapsed() < Duration::from_secs(2), "{:?}", swapped.elapsed());
    assert!(!served(port, &tls, "127.0.0.41").await, "the new deny list did not apply");
    assert!(served(port, &tls, "127.0.0.42").await);
    assert_eq!(reloads_count(admin, "success").await, 1.0);

    // A broken config in the next version changes nothing, and is not retried in a loop.
    cm.update(&[("gw.toml", "[server\nbroken".to_string()), ("deny.txt", "127.0.0.42\n".into())]);
    assert_eq!(
        next_reload(&mut systemd, Duration::from_secs(2)).await,
        "READY=1\nSTATUS=reload failed, running the previous config\n"
    );
    assert!(served(port, &tls, "127.0.0.42").await, "a broken version changed the deny list");
    assert!(!served(port, &tls, "127.0.0.41").await);
    tokio::time::sleep(3 * wsgate::watch::POLL_INTERVAL).await; // kept: proves no retry happens
    assert_eq!(reloads_count(admin, "failure").await, 1.0);
    assert_eq!(reloads_count(admin, "success").await, 1.0);

    // Fixed again: applied.
    cm.update(&text(""));
    assert_eq!(
        next_reload(&mut systemd, Duration::from_secs(2)).await,
        "READY=1\nSTATUS=config reloaded\n"
    );
    assert!(served(port, &tls, "127.0.0.41").await);
    gw.signal("-TERM");
    assert_eq!(gw.exit_code().await, Some(0));
}

#[tokio::test]
async fn watch_config_sees_an_edited_named_file_once_and_a_swap_during_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let deny = dir.path().join("deny.txt");
    std::fs::write(&deny, "# nobody\n").unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, watched_config(dir.path(), &deny, "")).unwrap();
    let mut systemd = Systemd::bind(dir.path());
    let gw = ChildGw::spawn(&config, &[("NOTIFY_SOCKET", systemd.path.display().to_string())]);
    assert_eq!(systemd.next().await, "READY=1\n");
    let port = gw.port("wss://127.0.0.1:").await;
    let admin = gw.port("metrics on http://127.0.0.1:").await;
    let tls = wsgate::tls::cli_client_config(Some(&dir.path().join("server.crt")), false).unwrap();

    // An editor writing in three steps (truncate, two appends) within one poll: one reload.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&deny).unwrap();
        f.write_all(b"127.0.0.5").unwrap();
        f.flush().unwrap();
        f.write_all(b"1\n").unwrap();
    }
    assert_eq!(
        next_reload(&mut systemd, Duration::from_secs(2)).await,
        "READY=1\nSTATUS=config reloaded\n"
    );
    assert!(!served(port, &tls, "127.0.0.51").await);
    tokio::time::sleep(3 * wsgate::watch::POLL_INTERVAL).await; // kept: proves no second reload
    assert_eq!(reloads_count(admin, "success").await, 1.0);

    // Files changing while a reload reads them (here: right after its RELOADING=1): the
    // watcher's stamps predate the read, so it reloads again and ends on the newest files.
    std::fs::write(&deny, "127.0.0.52\n").unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(2), systemd.next()).await.unwrap();
    assert!(msg.starts_with("RELOADING=1\n"));
    std::fs::write(&deny, "127.0.0.53\n").unwrap();
    let mut done = systemd.next().await;
    if done.starts_with("READY=1") {
        done = next_reload(&mut systemd, Duration::from_secs(3)).await;
    }
    assert_eq!(done, "READY=1\nSTATUS=config reloaded\n");
    assert!(!served(port, &tls, "127.0.0.53").await, "the last version did not apply");
    assert!(served(port, &tls, "127.0.0.52").await);

    // Turned off (by the watcher's own reload): edits are no longer picked up.
    let off = watched_config(dir.path(), &deny, "").replace("watch_config = true", "watch_config = false");
    std::fs::write(&config, off).unwrap();
    assert_eq!(
        next_reload(&mut systemd, Duration::from_secs(2)).await,
        "READY=1\nSTATUS=config reloaded\n"
    );
    let before = reloads_count(admin, "success").await;
    std::fs::write(&deny, "127.0.0.54\n").unwrap();
    tokio::time::sleep(4 * wsgate::watch::POLL_INTERVAL).await; // kept: proves nothing happens
    assert_eq!(reloads_count(admin, "success").await, before);
    assert!(served(port, &tls, "127.0.0.54").await);
    gw.signal("-TERM");
    assert_eq!(gw.exit_code().await, Some(0));
}

/// The JSON lines on a child's stderr; each must be one flat object.
fn json_lines(log: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    log.lines()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(serde_json::Value::Object(o)) => {
                for (k, v) in &o {
                    assert!(!v.is_object() && !v.is_array(), "{k} is nested in {l}");
                }
                o
            }
            other => panic!("not a JSON object: {l} ({other:?})"),
        })
        .collect()
}

#[tokio::test]
async fn json_access_log_is_flat_with_request_id_upstream_route_and_code() {
    use futures_util::SinkExt;
    let up = common::upstream(common::Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let text = common::config_text(
        dir.path(),
        "trusted_proxies = [\"127.0.0.13/32\"]",
        &common::route("r", "/r", &up.url(), "none"),
    )
    .replace("[log]\nlevel = \"warn\"", "[log]\nformat = \"json\"\nlevel = \"info\"");
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, text).unwrap();
    let mut systemd = Systemd::bind(dir.path());
    let gw = ChildGw::spawn(&config, &[("NOTIFY_SOCKET", systemd.path.display().to_string())]);
    assert_eq!(systemd.next().await, "READY=1\n");
    let port = common::wait_for("the listener in the JSON log", Duration::from_secs(20), || async {
        json_lines(&gw.log()).iter().find_map(|o| {
            let m = o.get("message")?.as_str()?;
            m.strip_prefix("listening on wss://127.0.0.1:")?.parse::<u16>().ok()
        })
    })
    .await;
    let tls = wsgate::tls::cli_client_config(Some(&dir.path().join("server.crt")), false).unwrap();
    let session = |source: &str, id: &str| {
        let opts = wsgate::client::Options {
            tls: Some(tls.clone()),
            source: Some(source.parse().unwrap()),
            headers: vec![("X-Request-Id".into(), id.into())],
            ..Default::default()
        };
        async move {
            let (mut ws, _) = wsgate::client::connect(&format!("wss://localhost:{port}/r"), &opts).await.unwrap();
            assert_eq!(common::roundtrip(&mut ws, "hi").await, "hi");
            ws.send(tokio_tungstenite::tungstenite::Message::Close(Some(
                tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: 1000u16.into(),
                    reason: "".into(),
                },
            )))
            .await
            .unwrap();
            let _ = common::close_code(&mut ws).await;
        }
    };
    let closed = |id: String| {
        let gw = &gw;
        async move {
            common::wait_for(&format!("the session line of {id}"), Duration::from_secs(20), || async {
                json_lines(&gw.log()).into_iter().find(|o| {
                    o.get("message").and_then(|m| m.as_str()) == Some("session closed")
                        && o.get("request_id").and_then(|v| v.as_str()) == Some(id.as_str())
                })
            })
            .await
        }
    };

    // A trusted proxy's id is kept, sent upstream, and logged with the upstream chosen.
    session("127.0.0.13", "lb-7f3a.1_x").await;
    assert_eq!(up.header(0, "x-request-id").as_deref(), Some("lb-7f3a.1_x"));
    let line = closed("lb-7f3a.1_x".into()).await;
    assert_eq!(line["route"], "r");
    assert_eq!(line["upstream"], up.addr.to_string().as_str());
    assert_eq!(line["code"], 1000);
    assert_eq!(line["peer"], "127.0.0.13");
    assert_eq!(line["level"], "INFO");

    // A client's own id is replaced by a generated one, upstream and in the log alike.
    session("127.0.0.14", "forged-by-client").await;
    let sent = up.header(1, "x-request-id").unwrap();
    assert_ne!(sent, "forged-by-client");
    assert!(sent.len() == 32 && sent.bytes().all(|b| b.is_ascii_hexdigit()), "{sent}");
    closed(sent).await;
    // A proxy's id with a character outside A-Za-z0-9._- is replaced too.
    session("127.0.0.13", "a{b}").await;
    assert_ne!(up.header(2, "x-request-id").as_deref(), Some("a{b}"));
    // 128 characters are kept from a proxy, 129 are not; quotes never reach the log.
    let (longest, too_long) = ("p".repeat(128), "p".repeat(129));
    session("127.0.0.13", &longest).await;
    assert_eq!(up.header(3, "x-request-id").as_deref(), Some(longest.as_str()));
    session("127.0.0.13", &too_long).await;
    let sent = up.header(4, "x-request-id").unwrap();
    assert!(sent.len() == 32 && sent.bytes().all(|b| b.is_ascii_hexdigit()), "{sent}");
    session("127.0.0.13", "x\",\"level\":\"ERROR").await;
    assert!(up.header(5, "x-request-id").unwrap().bytes().all(|b| b.is_ascii_hexdigit()));

    // A refused request (404) is one flat line with its id and status.
    let opts = wsgate::client::Options {
        tls: Some(tls.clone()),
        source: Some("127.0.0.13".parse().unwrap()),
        headers: vec![("X-Request-Id".into(), "lb-404".into())],
        ..Default::default()
    };
    assert!(
        wsgate::client::connect(&format!("wss://localhost:{port}/nowhere"), &opts)
            .await
            .is_err()
    );
    let refused = common::wait_for("the refusal line", Duration::from_secs(20), || async {
        json_lines(&gw.log())
            .into_iter()
            .find(|o| o.get("request_id").and_then(|v| v.as_str()) == Some("lb-404"))
    })
    .await;
    assert_eq!(refused["status"], 404);
    assert_eq!(refused["reason"], "not_found");
    assert!(!gw.log().contains("forged-by-client"), "a client's id reached the log");
    assert!(
        !gw.log().contains(&too_long) && !gw.log().contains("\"level\":\"ERROR"),
        "{}",
        gw.log()
    );
    gw.signal("-TERM");
    assert_eq!(gw.exit_code().await, Some(0));
}

#[tokio::test]
async fn listen_plain_serves_ws_and_refuses_client_certificate_routes() {
    use common::Gw;
    let up = common::upstream(common::Behaviour::Echo).await;
    let ca_dir = tempfile::tempdir().unwrap();
    let dev = wsgate::tls::write_dev_client_cert(ca_dir.path(), "alice").unwrap();
    let routes = format!(
        "{}{}{}",
        common::route("open", "/open", &up.url(), "none"),
        common::ECHO_ROUTE,
        common::route("certs", "/certs", "builtin:echo", "mtls"),
    );
    let ca = dev.ca_cert.display().to_string();
    let gw = Gw::start_with("listen_plain = [\"127.0.0.1:0\"]", &routes, |t| {
        t.replace(
            "self_signed_if_missing = true",
            &format!("self_signed_if_missing = true\nclient_ca = \"{ca}\"\nclient_auth = \"optional\""),
        )
    })
    .await;
    let plain = gw.running.as_ref().unwrap().plain_addrs[0];
    assert_ne!(plain, gw.addr);
    let ws_opts = |token: Option<String>| wsgate::client::Options {
        token,
        ..Default::default()
    };
    // ws:// on the plain listener: the same admission (a JWT route needs its token).
    let (mut ws, _) = wsgate::client::connect(&format!("ws://{plain}/open"), &ws_opts(None))
        .await
        .unwrap();
    assert_eq!(common::roundtrip(&mut ws, "plain").await, "plain");
    assert!(up.header(0, "x-request-id").is_some());
    let refused = wsgate::client::connect(&format!("ws://{plain}/echo"), &ws_opts(None)).await;
    assert!(refused.is_err());
    let (mut ws2, _) = wsgate::client::connect(&format!("ws://{plain}/echo"), &ws_opts(Some(gw.token("bob"))))
        .await
        .unwrap();
    assert_eq!(common::roundtrip(&mut ws2, "jwt").await, "jwt");
    // A client-certificate route is refused on it (400), and counts no auth failure
    // against the balancer's address.
    let status = match wsgate::client::connect(&format!("ws://{plain}/certs"), &ws_opts(None)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        other => panic!("{:?}", other.map(|_| ())),
    };
    assert_eq!(status, 400);
    assert_eq!(
        gw.metric("wsgate_auth_failures_total{route=\"certs\",reason=\"missing\"}").await,
        0.0
    );
    // TLS on the plain listener is not spoken: a wss:// client fails its handshake.
    let opts = wsgate::client::Options {
        tls: Some(gw.tls()),
        ..Default::default()
    };
    assert!(
        wsgate::client::connect(&format!("wss://localhost:{}/open", plain.port()), &opts)
            .await
            .is_err()
    );
    // The wss listener is unchanged.
    let mut ws3 = gw.connect("/echo").await;
    assert_eq!(common::roundtrip(&mut ws3, "tls").await, "tls");
}

#[test]
fn check_warns_about_a_reachable_plain_listener_without_trusted_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let warns = |server: &str| {
        let text = common::config_text(dir.path(), server, common::ECHO_ROUTE);
        let cfg = wsgate::Config::from_toml_str(&text, "t.toml").unwrap();
        wsgate::check::warnings(&cfg)
            .into_iter()
            .filter(|w| w.contains("listen_plain"))
            .count()
    };
    assert_eq!(warns(""), 0);
    assert_eq!(warns("listen_plain = [\"127.0.0.1:8080\", \"[::1]:8080\"]"), 0);
    assert_eq!(warns("listen_plain = [\"0.0.0.0:8080\"]"), 1);
    assert_eq!(warns("listen_plain = [\"10.0.0.5:8080\"]\ntrusted_proxies = [\"10.0.0.0/24\"]"), 0);
}

/// A stranger (uid 65534) that reaches the control socket anyway (the test opens its
/// mode up): it sends a well-formed request and reports how many bytes came back.
fn stranger_asks(socket: &Path) -> Option<String> {
    let script = format!(
        "import os,socket\nos.setgid(65534)\nos.setuid(65534)\ns=socket.socket(socket.AF_UNIX)\ns.settimeout(5)\n\
         s.connect({:?})\ntry:\n  s.sendall(b'wsgate takeover 1\\n')\n  msg,anc,fl,ad=s.recvmsg(4096,4096)\n  print(len(msg),len(anc))\n\
         except (BrokenPipeError, ConnectionResetError):\n  print(0,0)\n",
        socket.display().to_string()
    );
    let out = Command::new("python3").args(["-c", &script]).output().ok()?;
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Clients opening sessions in a loop (each must echo) while a hand-over happens.
struct Prober {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Prober {
    fn start(url: &str, opts: &wsgate::client::Options) -> Prober {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop2, url, opts) = (stop.clone(), url.to_string(), opts.clone());
        let task = tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                match wsgate::client::connect(&url, &opts).await {
                    Ok((mut ws, _)) => match tokio::time::timeout(Duration::from_secs(5), common::roundtrip(&mut ws, "probe")).await {
                        Ok(t) if t == "probe" => ok += 1,
                        other => failed.push(format!("{other:?}")),
                    },
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        });
        Prober { stop, task }
    }

    /// Probe the new process alone for a moment, then check no attempt failed.
    async fn finish(self) {
        let before = tokio::time::Instant::now();
        while before.elapsed() < Duration::from_millis(500) {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(50)).await; // kept: lets the prober run against the new process
        }
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (ok, mut failed) = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the prober did not stop")
            .unwrap();
        let failures = failed.len();
        failed.truncate(20);
        assert_eq!(failures, 0, "{failures} connections of {} failed: {failed:?}", ok + failures);
        assert!(ok >= 10, "only {ok} probes");
    }
}

#[tokio::test]
async fn takeover_hands_the_listeners_over_refusing_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let text = common::config_text(
        dir.path(),
        &format!("shutdown_grace = \"2s\"\ncontrol_socket = \"{}\"", socket.display()),
        &format!(
            "[limits]\nconnection_rate_per_ip = \"1000/s\"\nconnection_burst_per_ip = 1000\nmax_connections_per_ip = 100\n{}",
            common::route("open", "/open", "builtin:echo", "none")
        ),
    );
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, text).unwrap();
    let old = ChildGw::spawn(&config, &[]);
    let port = old.port("wss://127.0.0.1:").await;
    let tls = wsgate::tls::cli_client_config(Some(&dir.path().join("server.crt")), false).unwrap();
    let url = format!("wss://localhost:{port}/open");
    let opts = wsgate::client::Options {
        tls: Some(tls.clone()),
        ..Default::default()
    };
    let (mut live, _) = wsgate::client::connect(&url, &opts).await.unwrap();
    assert_eq!(common::roundtrip(&mut live, "before").await, "before");
    common::wait_until("the control socket", Duration::from_secs(10), || async { socket.exists() }).await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);

    // A peer of another user gets nothing, even with the file opened up to it.
    if std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        // (python3 does the setuid; without it this part is skipped.)
        if let Some(answer) = stranger_asks(&socket) {
            // The gateway closes the connection without a byte or a descriptor.
            assert_eq!(answer.trim(), "0 0", "a stranger got: {answer}");
            common::wait_until("the refusal in the log", Duration::from_secs(10), || async {
                old.log().contains("a peer of another user")
            })
            .await;
        }
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Garbage from our own user: refused, still serving.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
    }
    assert_eq!(common::roundtrip(&mut live, "after strangers").await, "after strangers");

    // Clients keep connecting through the hand-over; none may be refused or reset.
    let prober = Prober::start(&url, &opts);
    // A reload racing the takeover changes nothing about it.
    old.signal("-HUP");
    let new = ChildGw::spawn_args(&config, &["run", "--takeover", "--config"]);
    common::wait_for("the new process to take over", Duration::from_secs(20), || async {
        new.log().contains("took over the listeners").then_some(())
    })
    .await;
    // The old process drains: the live session ends with 1001, the process exits 0.
    assert_eq!(common::close_code(&mut live).await.0, 1001);
    let log = old.log();
    assert_eq!(old.exit_code().await, Some(0), "{log}");
    prober.finish().await;
    let (mut ws, _) = wsgate::client::connect(&url, &opts).await.unwrap();
    assert_eq!(common::roundtrip(&mut ws, "new").await, "new");
    new.signal("-TERM");
    assert_eq!(new.exit_code().await, Some(0));
}

#[tokio::test]
async fn a_takeover_that_fails_leaves_the_old_process_serving() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let (old, config, (url, opts)) = open_gateway(dir.path(), "").await;
    let (mut live, _) = wsgate::client::connect(&url, &opts).await.unwrap();
    common::wait_until("the control socket", Duration::from_secs(10), || async { socket.exists() }).await;
    // The new process receives the listeners, then cannot load its certificate: it exits
    // without confirming, and the old process goes on serving.
    let cert = std::fs::read(dir.path().join("server.crt")).unwrap();
    std::fs::write(dir.path().join("server.crt"), "not a certificate").unwrap();
    let new = ChildGw::spawn_args(&config, &["run", "--takeover", "--config"]);
    let code = new.exit_code().await;
    assert_ne!(code, Some(0));
    std::fs::write(dir.path().join("server.crt"), cert).unwrap();
    common::wait_until("the old process to log the failed takeover", Duration::from_secs(10), || async {
        old.log().contains("takeover refused or failed")
    })
    .await;
    assert_eq!(common::roundtrip(&mut live, "still here").await, "still here");
    let (mut ws, _) = wsgate::client::connect(&url, &opts).await.unwrap();
    assert_eq!(common::roundtrip(&mut ws, "new client").await, "new client");
    // And a second takeover, now with a good certificate, works.
    let new = ChildGw::spawn_args(&config, &["run", "--takeover", "--config"]);
    common::wait_for("the takeover", Duration::from_secs(20), || async {
        new.log().contains("took over the listeners").then_some(())
    })
    .await;
    assert_eq!(common::close_code(&mut live).await.0, 1001);
    assert_eq!(old.exit_code().await, Some(0));
    new.signal("-TERM");
    assert_eq!(new.exit_code().await, Some(0));
}

/// A process this test did not start (the gateway's successor): killed if the test
/// fails, and waited for by its pid.
struct Successor(u32);

impl Successor {
    fn from_main_pid(msg: &str) -> Successor {
        let pid = msg
            .strip_prefix("MAINPID=")
            .and_then(|r| r.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("not MAINPID=: {msg:?}"));
        Successor(pid)
    }

    fn signal(&self, sig: &str) {
        assert!(Command::new("kill").args([sig, &self.0.to_string()]).status().unwrap().success());
    }

    /// Until it has exited (gone, or a zombie of an init that does not reap).
    async fn exited(&self) {
        let stat = format!("/proc/{}/stat", self.0);
        common::wait_until("the successor to exit", Duration::from_secs(20), || async {
            std::fs::read_to_string(&stat).map_or(true, |s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        })
        .await;
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// A gateway config with a short drain, room for the prober, `/open` without auth.
fn upgrade_config(dir: &Path, extra_server: &str) -> PathBuf {
    let text = common::config_text(
        dir,
        &format!("shutdown_grace = \"2s\"\n{extra_server}"),
        &format!(
            "[limits]\nconnection_rate_per_ip = \"1000/s\"\nconnection_burst_per_ip = 1000\nmax_connections_per_ip = 100\n{}",
            common::route("open", "/open", "builtin:echo", "none")
        ),
    );
    let config = dir.join("gw.toml");
    std::fs::write(&config, text).unwrap();
    config
}

fn client_opts(dir: &Path) -> wsgate::client::Options {
    let tls = wsgate::tls::cli_client_config(Some(&dir.join("server.crt")), false).unwrap();
    wsgate::client::Options {
        tls: Some(tls),
        ..Default::default()
    }
}

#[tokio::test]
async fn sigusr2_starts_the_new_binary_in_the_unit_which_takes_over_and_becomes_main_pid() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let config = upgrade_config(dir.path(), &format!("control_socket = \"{}\"", socket.display()));
    let mut systemd = Systemd::bind(dir.path());
    let env = [
        ("NOTIFY_SOCKET", systemd.path.display().to_string()),
        ("WATCHDOG_USEC", "400000".to_string()),
    ];
    let old = ChildGw::spawn(&config, &env);
    let old_pid = old.child.id();
    assert_eq!(systemd.next().await, "READY=1\n");
    let port = old.port("wss://127.0.0.1:").await;
    let url = format!("wss://localhost:{port}/open");
    let opts = client_opts(dir.path());
    let (mut live, _) = wsgate::client::connect(&url, &opts).await.unwrap();
    assert_eq!(common::roundtrip(&mut live, "before").await, "before");
    common::wait_until("the control socket", Duration::from_secs(10), || async { socket.exists() }).await;

    // A peer that connects and says nothing holds the control socket (for at most 2 s),
    // so the successor waits and a second SIGUSR2 meets an upgrade in progress.
    let stall = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let prober = Prober::start(&url, &opts);
    old.signal("-USR2");
    common::wait_until("the successor to start", Duration::from_secs(10), || async {
        old.log().contains("upgrade: started the new binary")
    })
    .await;
    old.signal("-USR2");
    common::wait_until("the second SIGUSR2 to be refused", Duration::from_secs(10), || async {
        old.log().contains("SIGUSR2 refused: an upgrade is already in progress")
    })
    .await;
    drop(stall);

    // The successor is the unit's main process now; it pings the watchdog.
    let main_pid = systemd.next().await;
    let new = Successor::from_main_pid(&main_pid);
    assert_ne!(new.0, old_pid);
    assert_eq!(systemd.next().await, "READY=1\n");
    // The old process drains: the live session ends with 1001, the process exits 0,
    // and it sent no STOPPING=1 (the unit is not stopping).
    assert_eq!(common::close_code(&mut live).await.0, 1001);
    let log = old.log();
    let old_log = old.stderr.clone();
    let mut old = old;
    let status = common::wait_for("the old process to exit", Duration::from_secs(20), || {
        let exited = old.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert_eq!(status.code(), Some(0), "{log}");
    // What is queued may be the old process's; what comes after is the successor's.
    let mut buf = [0u8; 64];
    while systemd.sock.try_recv(&mut buf).is_ok() {}
    for _ in 0..3 {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), systemd.sock.recv(&mut buf))
            .await
            .expect("the successor does not ping the watchdog")
            .unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
    }
    prober.finish().await;
    let (mut ws, _) = wsgate::client::connect(&url, &opts).await.unwrap();
    assert_eq!(common::roundtrip(&mut ws, "new").await, "new");
    assert!(!old_log.lock().unwrap().contains("upgrade failed"));

    // The successor answers SIGUSR2 the same way, and stops on SIGTERM as the unit.
    new.signal("-TERM");
    assert_eq!(systemd.next().await, "STOPPING=1\n");
    new.exited().await;
}

#[tokio::test]
async fn sigusr2_with_a_broken_config_or_no_control_socket_leaves_the_old_process_serving() {
    let dir = tempfile::tempdir().unwrap();
    // No control_socket in the file: systemd's RuntimeDirectory= gives the default.
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let config = upgrade_config(dir.path(), "");
    let mut systemd = Systemd::bind(dir.path());
    let env = [
        ("NOTIFY_SOCKET", systemd.path.display().to_string()),
        ("RUNTIME_DIRECTORY", run_dir.display().to_string()),
    ];
    let old = ChildGw::spawn(&config, &env);
    assert_eq!(systemd.next().await, "READY=1\n");
    let port = old.port("wss://127.0.0.1:").await;
    let socket = run_dir.join("control.sock");
    common::wait_until("the default control socket", Duration::from_secs(10), || async { socket.exists() }).await;
    let url = format!("wss://localhost:{port}/open");
    let opts = client_opts(dir.path());
    let (mut live, _) = wsgate::client::connect(&url, &opts).await.unwrap();

    // The config is broken on disk: the successor exits at once, the old one serves on.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, "[server\nbroken").unwrap();
    old.signal("-USR2");
    common::wait_until("the failed upgrade in the log", Duration::from_secs(20), || async {
        old.log().contains("upgrade failed, still serving: the new process exited")
    })
    .await;
    assert!(old.log().contains("config error"), "{}", old.log());
    assert_eq!(common::roundtrip(&mut live, "still here").await, "still here");
    let (mut ws, _) = wsgate::client::connect(&url, &opts).await.unwrap();
    assert_eq!(common::roundtrip(&mut ws, "new client").await, "new client");
    let mut buf = [0u8; 256];
    // kept: proves systemd hears nothing (no MAINPID=) from a failed successor
    let heard = tokio::time::timeout(Duration::from_millis(300), systemd.sock.recv(&mut buf)).await;
    assert!(
        heard.is_err(),
        "systemd heard {:?}",
        heard.map(|n| String::from_utf8_lossy(&buf[..n.unwrap()]).to_string())
    );

    // Fixed: the next SIGUSR2 upgrades (the successor finds the same default socket).
    std::fs::write(&config, good).unwrap();
    old.signal("-USR2");
    let new = Successor::from_main_pid(&systemd.next().await);
    assert_eq!(common::close_code(&mut live).await.0, 1001);
    assert_eq!(old.exit_code().await, Some(0));
    let (mut ws, _) = wsgate::client::connect(&url, &opts).await.unwrap();
    assert_eq!(common::roundtrip(&mut ws, "upgraded").await, "upgraded");
    new.signal("-TERM");
    new.exited().await;

    // No control socket at all (not configured, not under systemd): logged, still serving.
    let lone = ChildGw::spawn(&config, &[]);
    let port = lone.port("wss://127.0.0.1:").await;
    lone.signal("-USR2");
    common::wait_until("the refusal in the log", Duration::from_secs(10), || async {
        lone.log().contains("upgrade not started, still serving: no control socket")
    })
    .await;
    let (mut ws, _) = wsgate::client::connect(&format!("wss://localhost:{port}/open"), &opts)
        .await
        .unwrap();
    assert_eq!(common::roundtrip(&mut ws, "alone").await, "alone");
    lone.signal("-TERM");
    assert_eq!(lone.exit_code().await, Some(0));
}

#[tokio::test]
async fn a_planted_control_socket_hands_nothing_over_and_is_never_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let config = upgrade_config(dir.path(), &format!("control_socket = \"{}\"", socket.display()));
    // Another user (uid 65534) serves a socket, and a symlink to it is planted at the
    // control socket's path: `run --takeover` must not take "listeners" from it.
    if root {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let evil_dir = dir.path().join("evil");
        std::fs::create_dir(&evil_dir).unwrap();
        std::fs::set_permissions(&evil_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let evil = evil_dir.join("evil.sock");
        let script = format!(
            "import os,socket\nos.setgid(65534)\nos.setuid(65534)\ns=socket.socket(socket.AF_UNIX)\ns.bind({:?})\n\
             os.chmod({:?},0o777)\ns.listen(1)\ns.settimeout(20)\nc,_=s.accept()\nc.recv(64)\nc.sendall(b'wss 127.0.0.1:1\\n')\n",
            evil.display().to_string(),
            evil.display().to_string()
        );
        if let Ok(mut server) = Command::new("python3").args(["-c", &script]).stderr(Stdio::null()).spawn() {
            common::wait_until("the stranger's socket", Duration::from_secs(10), || async { evil.exists() }).await;
            std::os::unix::fs::symlink(&evil, &socket).unwrap();
            let taker = ChildGw::spawn_args(&config, &["run", "--takeover", "--config"]);
            let log = taker.stderr.clone();
            assert_eq!(taker.exit_code().await, Some(1));
            let log = log.lock().unwrap().clone();
            assert!(log.contains("is served by another user (uid 65534)"), "{log}");
            let _ = server.kill();
            let _ = server.wait();
            std::fs::remove_file(&socket).unwrap();
        }
    }
    // A symlink (or any file) at the path is not replaced by a starting gateway: it
    // serves without a control socket, says so, and SIGUSR2 changes nothing.
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, "keep me").unwrap();
    std::os::unix::fs::symlink(&target, &socket).unwrap();
    let gw = ChildGw::spawn(&config, &[]);
    let port = gw.port("wss://127.0.0.1:").await;
    common::wait_until("the refusal to replace the symlink", Duration::from_secs(10), || async {
        gw.log().contains("exists and is not a socket")
    })
    .await;
    gw.signal("-USR2");
    common::wait_until("the refused upgrade", Duration::from_secs(10), || async {
        gw.log().contains("upgrade not started, still serving: no control socket")
    })
    .await;
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    let opts = client_opts(dir.path());
    let (mut ws, _) = wsgate::client::connect(&format!("wss://localhost:{port}/open"), &opts)
        .await
        .unwrap();
    assert_eq!(common::roundtrip(&mut ws, "serving").await, "serving");
    gw.signal("-TERM");
    assert_eq!(gw.exit_code().await, Some(0));
}

#[tokio::test]
async fn a_successor_takes_over_only_from_the_gateway_that_started_it() {
    // Two gateways with one control socket (an operator's mistake): the second one
    // started has the path. SIGUSR2 to the first must not hand the second's listeners
    // to the first's successor.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let config = upgrade_config(dir.path(), &format!("control_socket = \"{}\"", socket.display()));
    let first = ChildGw::spawn(&config, &[]);
    first.port("wss://127.0.0.1:").await;
    common::wait_until("the first control socket", Duration::from_secs(10), || async {
        first.log().contains("control socket: `kill -USR2`")
    })
    .await;
    let second = ChildGw::spawn(&config, &[]);
    let second_port = second.port("wss://127.0.0.1:").await;
    common::wait_until("the second control socket", Duration::from_secs(10), || async {
        second.log().contains("control socket: `kill -USR2`")
    })
    .await;
    first.signal("-USR2");
    common::wait_until("the refused successor", Duration::from_secs(20), || async {
        first.log().contains("upgrade failed, still serving: the new process exited")
    })
    .await;
    assert!(first.log().contains("not by the gateway that started this one"), "{}", first.log());
    assert!(!second.log().contains("takeover: the new process accepts"), "{}", second.log());
    let opts = client_opts(dir.path());
    let (mut ws, _) = wsgate::client::connect(&format!("wss://localhost:{second_port}/open"), &opts)
        .await
        .unwrap();
    assert_eq!(common::roundtrip(&mut ws, "second").await, "second");
    for gw in [first, second] {
        gw.signal("-TERM");
        assert_eq!(gw.exit_code().await, Some(0));
    }
}
