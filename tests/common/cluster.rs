//! Cluster mode helpers: real `redis-server` processes (single, replica, Sentinel,
//! Redis Cluster) on free loopback ports, stopped when dropped, and gateways in
//! cluster mode on them.

use super::*;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Wait until a process just started (`what`) accepts connections on `port`.
fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20)); // kept: polling a process start
    }
}

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
        wait_for_port(port, "redis-server");
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
    instance_with_server("", cluster, dir, limits).await
}

/// Like [`instance_with`], with `server` lines in `[server]`. Every instance serves the
/// certificate in `dir` (made on first use), as instances behind one balancer do.
pub async fn instance_with_server(server: &str, cluster: &str, dir: &std::path::Path, limits: &str) -> Gw {
    let (shared_cert, shared_key) = (dir.join("shared.crt"), dir.join("shared.key"));
    if !shared_cert.exists() {
        wsgate::tls::write_self_signed(&shared_cert, &shared_key).unwrap();
    }
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let secret = dir.join("jwt.secret");
    let rest = format!("[limits]\n{limits}\n{ECHO_ROUTE}\n[cluster]\n{cluster}key_prefix = \"test\"\n");
    let admin = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n", token_file.display());
    Gw::start_with(server, &rest, |t| {
        // One certificate and one JWT secret for every instance, as a real cluster has.
        let own_dir = t
            .split("cert = \"")
            .nth(1)
            .and_then(|r| r.split("/server.crt").next())
            .unwrap()
            .to_string();
        std::fs::copy(&shared_cert, std::path::Path::new(&own_dir).join("server.crt")).unwrap();
        std::fs::copy(&shared_key, std::path::Path::new(&own_dir).join("server.key")).unwrap();
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

/// Whether a connection from `source` is served (an echo comes back). A session that a
/// ban arriving meanwhile closes (1008) is not served: that is the ban working.
pub async fn served(gw: &Gw, source: &str) -> bool {
    let o = from(gw, gw.token("probe"), source);
    match tokio::time::timeout(TIMEOUT, wsgate::client::connect(&gw.url("/echo"), &o)).await {
        Ok(Ok((mut ws, _))) => try_roundtrip(&mut ws, "p").await.is_ok_and(|t| t == "p"),
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

impl Redis {
    /// A replica of `master` on a free port.
    pub fn start_replica_of(master: &Redis) -> Redis {
        let port = free_port();
        Redis::spawn(
            port,
            &[
                "--port".into(),
                port.to_string().into(),
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port.to_string().into(),
            ],
        )
    }

    /// A Sentinel watching `master` under the name `name` (quorum 2, down after 1 s),
    /// its config file in `dir`.
    pub fn start_sentinel(dir: &std::path::Path, master: &Redis, name: &str) -> Redis {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {d}\nsentinel monitor {name} 127.0.0.1 {m} 2\n\
                 sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 5000\n\
                 sentinel parallel-syncs {name} 1\n",
                d = dir.display(),
                m = master.port
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel is needed (Debian's redis-server)");
        wait_for_port(port, "redis-sentinel");
        Redis { port, child }
    }

    /// A Redis Cluster node on a free port, its `nodes.conf` in `dir`.
    pub fn start_cluster_node(dir: &std::path::Path) -> Redis {
        let port = free_port();
        Redis::spawn(
            port,
            &[
                "--port".into(),
                port.to_string().into(),
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                format!("nodes-{port}.conf").into(),
                "--cluster-node-timeout".into(),
                "2000".into(),
                "--dir".into(),
                dir.into(),
            ],
        )
    }

    /// The role this server reports (`master`, `slave`).
    pub async fn role(&self) -> String {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port)).unwrap();
        let Ok(mut con) = client.get_multiplexed_async_connection().await else {
            return "down".into();
        };
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("role:"))
            .unwrap_or("unknown")
            .trim()
            .to_string()
    }
}

/// Three masters joined into one Redis Cluster (no replicas), once it reports `ok`.
pub async fn redis_cluster(dir: &std::path::Path) -> Vec<Redis> {
    let nodes: Vec<Redis> = (0..3).map(|_| Redis::start_cluster_node(dir)).collect();
    let mut create = Command::new("redis-cli");
    create.arg("--cluster").arg("create");
    for n in &nodes {
        create.arg(format!("127.0.0.1:{}", n.port));
    }
    let ok = create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("redis-cli is needed (Debian's redis-tools, with redis-server)")
        .success();
    assert!(ok, "redis-cli --cluster create failed");
    // Every node must agree before clients use it (else MOVED or CLUSTERDOWN answers).
    for port in nodes.iter().map(|n| n.port) {
        wait_until("every Redis Cluster node reports ok", TIMEOUT, || async move {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
            let Ok(mut con) = client.get_multiplexed_async_connection().await else {
                return false;
            };
            let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut con).await.unwrap_or_default();
            info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") && info.contains("cluster_slots_ok:16384")
        })
        .await;
    }
    nodes
}

/// A gateway in cluster mode with `cluster` lines, once it is connected to Redis.
pub async fn connected_instance(cluster: &str, dir: &std::path::Path, limits: &str) -> Gw {
    let gw = instance_with(cluster, dir, limits).await;
    wait_until("the instance connected to Redis", TIMEOUT, || async {
        gw.metric("wsgate_cluster_up").await == 1.0
    })
    .await;
    gw
}

/// HAProxy running `deploy/haproxy.cfg` (TCP mode, PROXY v2) in front of `backends`, on
/// a free loopback port; stopped when dropped.
pub struct Haproxy {
    pub port: u16,
    child: Child,
}

impl Haproxy {
    pub fn start(backends: &[&Gw]) -> Haproxy {
        let port = free_port();
        let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg");
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(cfg).env("WSGATE_LB", format!("127.0.0.1:{port}"));
        for (i, gw) in backends.iter().enumerate() {
            cmd.env(format!("WSGATE_{}", i + 1), gw.addr.to_string());
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy is needed (scripts/test.sh installs Debian's haproxy)");
        wait_for_port(port, "haproxy");
        Haproxy { port, child }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
