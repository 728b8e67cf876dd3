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
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let text = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut t = text.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
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
            let n = tokio::time::timeout(Duration::from_secs(20), self.sock.recv(&mut buf))
                .await
                .expect("no notification within 20 s")
                .unwrap();
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
