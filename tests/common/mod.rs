//! Test harness: a gateway started in-process on 127.0.0.1 port 0 with a config built
//! in code, real TLS, a programmable upstream, token minting and metric scraping.
#![allow(dead_code)]

pub mod cluster;

use futures_util::{SinkExt, StreamExt};
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::tungstenite::{
    self, Message,
    handshake::server::{Request, Response},
    http::HeaderValue,
    protocol::{CloseFrame, frame::coding::CloseCode},
};
use wsgate::{Config, client::ClientStream};

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A running gateway with its temp dir (certificate, secret).
pub struct Gw {
    pub running: Option<wsgate::Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: Config,
    tls: Arc<rustls::ClientConfig>,
}

/// Config text for a gateway: `[server]`, `[tls]`, `[admin]` and `[jwt]` are filled in;
/// `extra_server` lands in `[server]`, `rest` after (limits, routes).
pub fn config_text(dir: &std::path::Path, extra_server: &str, rest: &str) -> String {
    let d = dir.display();
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
{extra_server}

[tls]
cert = "{d}/server.crt"
key = "{d}/server.key"
self_signed_if_missing = true

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn"

[jwt]
secret_file = "{d}/jwt.secret"
generate_secret_if_missing = true
issuer = "wsgate-test"
audience = ["wsgate"]

{rest}
"#
    )
}

/// The usual route set: `/echo` (JWT) to the built-in echo.
pub const ECHO_ROUTE: &str = r#"
[[routes]]
name = "echo"
path = "/echo"
upstreams = ["builtin:echo"]
auth = "jwt"
"#;

pub fn route(name: &str, path: &str, upstream: &str, auth: &str) -> String {
    format!("[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nupstreams = [\"{upstream}\"]\nauth = \"{auth}\"\n")
}

impl Gw {
    pub async fn start(extra_server: &str, rest: &str) -> Gw {
        Gw::start_with(extra_server, rest, |t| t).await
    }

    /// Like [`Gw::start`], with a last edit of the whole config text.
    pub async fn start_with(extra_server: &str, rest: &str, edit: impl FnOnce(String) -> String) -> Gw {
        let _ = tracing_init();
        let dir = tempfile::tempdir().unwrap();
        let text = edit(config_text(dir.path(), extra_server, rest));
        let config = Config::from_toml_str(&text, "test.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        let running = wsgate::start(config.clone()).await.unwrap();
        // A gateway serving other certificates (`[[tls.certificates]]`) is checked by its tests.
        let server_crt = dir.path().join("server.crt");
        let tls = wsgate::tls::cli_client_config(server_crt.exists().then_some(server_crt.as_path()), !server_crt.exists()).unwrap();
        Gw {
            addr: running.wss_addrs[0],
            admin: running.admin_addr,
            running: Some(running),
            dir,
            config,
            tls,
        }
    }

    pub async fn echo() -> Gw {
        Gw::start("", ECHO_ROUTE).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("wss://localhost:{}{path}", self.addr.port())
    }

    pub fn options(&self, token: Option<String>) -> wsgate::client::Options {
        wsgate::client::Options {
            token,
            protocols: vec![],
            headers: vec![],
            tls: Some(self.tls.clone()),
            ws_config: None,
            ..Default::default()
        }
    }

    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    pub fn secret_path(&self) -> PathBuf {
        self.dir.path().join("jwt.secret")
    }

    pub fn token(&self, sub: &str) -> String {
        self.token_with(sub, Duration::from_secs(600), &[])
    }

    pub fn token_with(&self, sub: &str, ttl: Duration, claims: &[(&str, &str)]) -> String {
        let secret = wsgate::auth::load_secret(&self.config.jwt.secret, "test", true).unwrap();
        let claims: Vec<(String, String)> = claims.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        wsgate::auth::mint(&self.config.jwt, &secret, sub, ttl, &claims).unwrap()
    }

    /// Connect to `path` with a valid token.
    pub async fn connect(&self, path: &str) -> ClientStream {
        let opts = self.options(Some(self.token("alice")));
        tokio::time::timeout(TIMEOUT, wsgate::client::connect(&self.url(path), &opts))
            .await
            .unwrap()
            .unwrap()
            .0
    }

    /// Connect with `opts`; the HTTP status of a refusal, or the stream.
    pub async fn try_connect(
        &self,
        path: &str,
        opts: &wsgate::client::Options,
    ) -> Result<(ClientStream, tungstenite::handshake::client::Response), u16> {
        match tokio::time::timeout(TIMEOUT, wsgate::client::connect(&self.url(path), opts))
            .await
            .expect("connect timed out")
        {
            Ok(x) => Ok(x),
            Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }

    /// Status of a refused connection attempt, with its headers.
    pub async fn refusal(&self, path: &str, opts: &wsgate::client::Options) -> tungstenite::http::Response<Option<Vec<u8>>> {
        match tokio::time::timeout(TIMEOUT, wsgate::client::connect(&self.url(path), opts))
            .await
            .expect("connect timed out")
        {
            Ok(_) => panic!("connection to {path} was accepted"),
            Err(tungstenite::Error::Http(resp)) => *resp,
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }

    /// Reload the running gateway with config `text` (as SIGHUP does with the file).
    pub async fn reload(&self, text: &str) -> Result<Vec<String>, wsgate::config::ConfigError> {
        self.reload_config(Config::from_toml_str(text, "reload.toml")?).await
    }

    /// Reload the running gateway with `cfg` (its files are read again).
    pub async fn reload_config(&self, cfg: Config) -> Result<Vec<String>, wsgate::config::ConfigError> {
        self.running.as_ref().unwrap().gateway.reload(cfg).await
    }

    /// The Prometheus text from the admin listener.
    pub async fn metrics_text(&self) -> String {
        http_get(self.admin, "/metrics").await.1
    }

    /// The value of one series, e.g. `wsgate_connections_rejected_total{reason="auth"}`; 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        metric_value(&text, series)
    }

    /// Wait until `series` reaches `want` (metrics are recorded when a connection ends).
    pub async fn wait_metric(&self, series: &str, want: f64) {
        wait_metric_at(self.admin, series, want).await
    }

    /// Wait until `series` reaches at least `min` (for counters that keep rising).
    pub async fn wait_metric_min(&self, series: &str, min: f64) {
        let reached = poll_until(TIMEOUT, || async { (self.metric(series).await >= min).then_some(()) }).await;
        if reached.is_none() {
            panic!("{series} never reached {min}\n{}", self.metrics_text().await);
        }
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            tokio::time::timeout(TIMEOUT, r.wait()).await.expect("drain took too long");
        }
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.shutdown();
        }
    }
}

/// A test CA and a server certificate signed by it for `localhost` and 127.0.0.1, for
/// servers started outside the test (Redis, Pebble): writes `dir/{name}-ca.pem`,
/// `dir/{name}.crt` and `dir/{name}.key`.
pub fn write_ca_signed_server_cert(dir: &std::path::Path, name: &str) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("test {name} CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join(format!("{name}-ca.pem")), ca_cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

/// A loopback port free now (for servers started outside the test: Redis, Pebble).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How often the wait helpers look again.
pub const POLL: Duration = Duration::from_millis(10);

/// Poll `f` every [`POLL`] until it yields `Some`, for at most `timeout` (real time, so a
/// paused tokio clock cannot end the wait early); `None` on timeout.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Poll `f` until it yields `Some` and return the value; panics naming `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(timeout, f)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Poll `f` until it is true; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Wait until `series` on the admin listener `admin` reaches `want`, then check it is
/// exactly `want` (a counter that overshoots is a failure too).
pub async fn wait_metric_at(admin: SocketAddr, series: &str, want: f64) {
    let scrape = || async move { metric_value(&http_get(admin, "/metrics").await.1, series) };
    match poll_until(TIMEOUT, || async move { Some(scrape().await).filter(|v| *v >= want) }).await {
        Some(v) => assert_eq!(v, want, "{series}"),
        None => panic!(
            "{series} = {}, want {want}\n{}",
            scrape().await,
            http_get(admin, "/metrics").await.1
        ),
    }
}

/// The sum of every series whose text starts with `prefix`, e.g. all closes of a route:
/// `wsgate_closes_total{route="r",`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Wait until the sessions of `route` that ended (closes counted, any code) reach `n`.
pub async fn wait_sessions_ended(gw: &Gw, route: &str, n: f64) {
    let prefix = format!("wsgate_closes_total{{route=\"{route}\",");
    wait_until(&format!("{n} closed sessions on route {route}"), TIMEOUT, || async {
        metric_sum(&gw.metrics_text().await, &prefix) >= n
    })
    .await;
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "", "").await
}

/// One plain HTTP/1.1 request (`headers`: whole lines, each ending in CRLF); returns
/// (status, body).
pub async fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let length = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}{length}\r\n{body}").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn tracing_init() -> Result<(), ()> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init()
        .map_err(|_| ())
}

/// Send a text message and wait for the next text message.
pub async fn roundtrip(ws: &mut ClientStream, text: &str) -> String {
    try_roundtrip(ws, text).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`roundtrip`], with what came instead of a text reply as the error.
pub async fn try_roundtrip(ws: &mut ClientStream, text: &str) -> Result<String, String> {
    ws.send(Message::text(text)).await.map_err(|e| format!("send failed: {e}"))?;
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .map_err(|_| "no reply in time".to_string())?
        {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return Err(format!("expected a text reply, got {other:?}")),
        }
    }
}

/// Read until a close frame (or the end); returns its code and reason (1006 if none came).
pub async fn close_code(ws: &mut ClientStream) -> (u16, String) {
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.expect("no close in time") {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return (1006, String::new()),
        }
    }
}

/// What a test upstream does with a session.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behaviour {
    /// Echo text and binary.
    Echo,
    /// Echo, but drop the TCP connection after this many messages.
    DieAfter(usize),
    /// Send one binary message of this many bytes, then echo.
    SendBig(usize),
    /// Close with this code right after the handshake.
    CloseWith(u16),
    /// Never read (backpressure tests); the test flips `UpstreamLog::reading` to resume.
    Stall,
    /// Accept TCP but never answer the handshake.
    Hang,
}

/// What a test upstream saw.
#[derive(Default)]
pub struct UpstreamLog {
    pub requests: Vec<(String, Vec<(String, String)>)>,
    pub messages: Vec<Message>,
    pub closes: Vec<Option<(u16, String)>>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<UpstreamLog>>,
    pub resume: Arc<tokio::sync::Notify>,
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
    pub fn requests(&self) -> usize {
        self.log.lock().unwrap().requests.len()
    }
    /// Wait until the upstream has received a close frame; the first one's code and reason
    /// (`None` for a close frame without a code).
    pub async fn first_close(&self) -> Option<(u16, String)> {
        wait_for("a close frame at the upstream", TIMEOUT, || async {
            self.log.lock().unwrap().closes.first().cloned()
        })
        .await
    }
    /// The text messages received, in order.
    pub fn texts(&self) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.messages
            .iter()
            .filter_map(|m| match m {
                Message::Text(t) => Some(t.to_string()),
                _ => None,
            })
            .collect()
    }
    pub fn header(&self, i: usize, name: &str) -> Option<String> {
        self.log
            .lock()
            .unwrap()
            .requests
            .get(i)?
            .1
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

/// Start a test upstream on 127.0.0.1:0. It chooses subprotocol "chat" when offered.
pub async fn upstream(behaviour: Behaviour) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(UpstreamLog::default()));
    let resume = Arc::new(tokio::sync::Notify::new());
    let (log2, resume2) = (log.clone(), resume.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (log, resume) = (log2.clone(), resume2.clone());
            tokio::spawn(async move { upstream_session(tcp, behaviour, log, resume).await });
        }
    });
    Upstream { addr, log, resume }
}

async fn upstream_session(tcp: TcpStream, behaviour: Behaviour, log: Arc<Mutex<UpstreamLog>>, resume: Arc<tokio::sync::Notify>) {
    if behaviour == Behaviour::Hang {
        // Hold the connection, answering nothing, until the gateway gives up on it.
        let (mut tcp, mut buf) = (tcp, [0u8; 1024]);
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
        return;
    }
    let log2 = log.clone();
    #[allow(clippy::result_large_err)] // the signature tungstenite asks for
    let callback = move |req: &Request, mut resp: Response| {
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect();
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        log2.lock().unwrap().requests.push((req.uri().to_string(), headers));
        if offered.split(',').any(|p| p.trim() == "chat") {
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("chat"));
        }
        Ok(resp)
    };
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await else {
        return;
    };
    match behaviour {
        Behaviour::CloseWith(code) => {
            let _ = ws
                .close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: "upstream says bye".into(),
                }))
                .await;
        }
        Behaviour::SendBig(n) => {
            let _ = ws.send(Message::binary(vec![7u8; n])).await;
        }
        Behaviour::Stall => resume.notified().await,
        _ => {}
    }
    let mut seen = 0;
    while let Some(Ok(msg)) = ws.next().await {
        match &msg {
            Message::Close(f) => {
                log.lock()
                    .unwrap()
                    .closes
                    .push(f.as_ref().map(|f| (u16::from(f.code), f.reason.to_string())));
            }
            Message::Text(_) | Message::Binary(_) => {
                log.lock().unwrap().messages.push(msg.clone());
                seen += 1;
                if let Behaviour::DieAfter(n) = behaviour
                    && seen >= n
                {
                    return; // drops the TCP connection without a close frame
                }
                if ws.send(msg).await.is_err() {
                    return;
                }
            }
            Message::Ping(_) => log.lock().unwrap().messages.push(msg.clone()),
            _ => {}
        }
    }
}

/// A client frame on the wire (masked), compressed (RSV1) when `rsv1`.
pub fn masked_frame(opcode: u8, fin: bool, rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let key = [0x12, 0x34, 0x56, 0x78];
    let (mut h, n) = wsgate::wire::header(opcode, fin, payload.len(), Some(key));
    if rsv1 {
        h[0] |= 0x40;
    }
    let mut f = h[..n].to_vec();
    let start = f.len();
    f.extend_from_slice(payload);
    wsgate::wire::apply_mask(&mut f[start..], key);
    f
}
