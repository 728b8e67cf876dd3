//! Cluster mode helpers: real `redis-server` processes (single, replica, Sentinel,
//! Redis Cluster) on free loopback ports, stopped when dropped, and gateways in
//! cluster mode on them.

use super::*;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789abcdef";

/// A `redis-server` on a free loopback port, stopped when dropped.
pub struct Redis {
    pub port: u16,
    pub child: Child,
}

impl Redis {
    /// Start `redis-server` with `args` (its ports among them) and wait until `port` answers.
    pub fn spawn(port: u16, args: &[std::ffi::OsString]) -> Redis {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed (scripts/test.sh installs Debian's redis-server)");
        let deadline = Instant::now() + TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20)); // kept: polling a process start
        }
        Redis { port, child }
    }

    pub fn start_on(port: u16) -> Redis {
        Redis::spawn(port, &["--port".into(), port.to_string().into()])
    }

    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    /// A TLS-only `redis-server` whose certificate (for 127.0.0.1) is signed by a CA
    /// written to `dir/redis-ca.pem`.
    pub fn start_tls(dir: &std::path::Path) -> Redis {
        write_ca_signed_server_cert(dir, "redis");
        let port = free_port();
        let args: Vec<std::ffi::OsString> = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string().into(),
            "--tls-cert-file".into(),
            dir.join("redis.crt").into(),
            "--tls-key-file".into(),
            dir.join("redis.key").into(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        Redis::spawn(port, &args)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway in cluster mode on `redis`, with the admin API on, once it is connected.
pub async fn instance(redis: &Redis, dir: &std::path::Path) -> Gw {
    instance_limited(redis, dir, "").await
}

/// Like [`instance`], with `[limits]` lines.
pub async fn instance_limited(redis: &Redis, dir: &std::path::Path, limits: &str) -> Gw {
    let cluster = format!("redis = \"redis://127.0.0.1:{}/0\"\n", redis.port);
    let gw = instance_with(&cluster, dir, limits).await;
    wait_until("the instance connected to Redis", TIMEOUT, || async {
        gw.metric("wsgate_cluster_up").await == 1.0
    })
    .await;
    gw
}

/// A gateway with `cluster` lines in `[cluster]` and the admin API on.
pub async fn instance_with(cluster: &str, dir: &std::path::Path, limits: &str) -> Gw {
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let secret = dir.join("jwt.secret");
    let rest = format!("[limits]\n{limits}\n{ECHO_ROUTE}\n[cluster]\n{cluster}key_prefix = \"test\"\n");
    let admin = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n", token_file.display());
    Gw::start_with("", &rest, |t| {
        // One JWT secret for every instance, as a real cluster has.
        let t = t.replacen("[admin]\nlisten = \"127.0.0.1:0\"\n", &admin, 1);
        let own = t
            .split("secret_file = \"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_string();
        t.replace(&own, &secret.display().to_string())
    })
    .await
}

pub async fn admin(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n");
    let (status, text) = http_request(addr, method, path, &auth, body).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

pub fn from(gw: &Gw, token: String, source: &str) -> wsgate::client::Options {
    let mut o = gw.options(Some(token));
    o.source = Some(source.parse().unwrap());
    o
}

/// Whether a connection from `source` is served (an echo comes back).
pub async fn served(gw: &Gw, source: &str) -> bool {
    let o = from(gw, gw.token("probe"), source);
    match tokio::time::timeout(TIMEOUT, wsgate::client::connect(&gw.url("/echo"), &o)).await {
        Ok(Ok((mut ws, _))) => roundtrip(&mut ws, "p").await == "p",
        _ => false,
    }
}

impl Redis {
    /// Send a signal to the server (`STOP` hangs it, `CONT` resumes it).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    pub async fn dbsize(&self) -> i64 {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port)).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("DBSIZE").query_async(&mut con).await.unwrap()
    }
}
