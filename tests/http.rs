//! Plain HTTP on routes with `http = true` (DESIGN.md section 13), against a real hyper
//! upstream on port 0, through real TLS to the gateway, with raw request bytes: per
//! request admission on kept-alive connections, refusals with their status and reason,
//! request smuggling, streamed answers, timeouts, and pool reuse only after a clean
//! exchange.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use rustls_pki_types::ServerName;
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc},
};

// ---------------------------------------------------------------- the upstream app

/// A body fed by a channel: each message is one chunk on the wire.
struct Chan(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chan {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Clone, Default)]
struct AppState {
    /// (upstream connection's peer address, method, path) per request seen.
    seen: Arc<Mutex<Vec<(SocketAddr, String, String)>>>,
    /// `/app/stream` sends its second chunk once notified.
    release: Arc<Notify>,
    /// `/app/big` answers whose reader went away before the end.
    big_cut: Arc<std::sync::atomic::AtomicUsize>,
    /// Body bytes `/app/early` read after its answer.
    early: Arc<std::sync::atomic::AtomicUsize>,
}

struct App {
    addr: SocketAddr,
    state: AppState,
}

impl App {
    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
    fn seen(&self) -> Vec<(SocketAddr, String, String)> {
        self.state.seen.lock().unwrap().clone()
    }
}

type Resp = hyper::Response<BoxBody<Bytes, Infallible>>;

fn text(status: u16, body: impl Into<Bytes>) -> Resp {
    let mut r = hyper::Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r
}

async fn handle(req: hyper::Request<Incoming>, peer: SocketAddr, st: AppState) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    st.seen
        .lock()
        .unwrap()
        .push((peer, req.method().to_string(), req.uri().to_string()));
    Ok(match path.as_str() {
        "/app/headers" => {
            let mut out = format!("{} {}\n", req.method(), req.uri());
            for (n, v) in req.headers() {
                out.push_str(&format!("{}: {}\n", n, v.to_str().unwrap_or("?")));
            }
            let mut r = text(200, out);
            let h = r.headers_mut();
            h.insert("connection", "x-hop".parse().unwrap());
            h.insert("x-hop", "1".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("set-cookie", "sid=1; Path=/".parse().unwrap());
            r
        }
        "/app/upload" => match req.into_body().collect().await {
            Ok(b) => text(200, b.to_bytes().len().to_string()),
            Err(_) => text(400, "broken body"),
        },
        "/app/stream" => {
            let (tx, rx) = mpsc::channel(4);
            let release = st.release.clone();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first")).await;
                release.notified().await;
                let _ = tx.send(Bytes::from_static(b"second")).await;
            });
            hyper::Response::new(Chan(rx).boxed())
        }
        "/app/big" => {
            let (tx, rx) = mpsc::channel(2);
            let cut = st.big_cut.clone();
            // `?huge`: 256 MiB, more than the sockets between here and the client hold;
            // `?N`: N chunks.
            let chunks: usize = match req.uri().query() {
                Some("huge") => 4096,
                Some(n) => n.parse().unwrap_or(64),
                None => 64,
            };
            tokio::spawn(async move {
                for i in 0..chunks {
                    if tx.send(Bytes::from(vec![i as u8; 64 * 1024])).await.is_err() {
                        cut.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                }
            });
            hyper::Response::new(Chan(rx).boxed())
        }
        "/app/trickle" => {
            // A long poll that stays alive: a byte every 300 ms for 9 s.
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                for _ in 0..30 {
                    if tx.send(Bytes::from_static(b".")).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
            hyper::Response::new(Chan(rx).boxed())
        }
        "/app/late" => {
            // The head after 2 s, its body 2 s after the head (`http_timeout` 3 s: each
            // wait is under it, the whole exchange is over it).
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = tx.send(Bytes::from_static(b"late body")).await;
            });
            hyper::Response::new(Chan(rx).boxed())
        }
        "/app/pause" => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            text(200, "paused")
        }
        "/app/early" => {
            // Answered at once; the body read afterwards.
            let early = st.early.clone();
            let mut body = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Some(d) = frame.data_ref() {
                        early.fetch_add(d.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
            text(200, "early")
        }
        "/app/slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            text(200, "late")
        }
        _ => text(404, "no such page"),
    })
}

async fn app() -> App {
    app_on(None).await
}

/// The app behind TLS (an `https://` upstream for a `wss://` URL) with the certificate
/// `dir/app.crt`, signed by `dir/app-ca.pem`.
async fn tls_app(dir: &std::path::Path) -> App {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    write_ca_signed_server_cert(dir, "app");
    let certs = CertificateDer::pem_file_iter(dir.join("app.crt"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("app.key")).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    app_on(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
}

async fn app_on(tls: Option<tokio_rustls::TlsAcceptor>) -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::default();
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = listener.accept().await else { return };
            let st = st.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, peer, st.clone()));
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    None => http.serve_connection(hyper_util::rt::TokioIo::new(s), svc).await,
                    Some(acceptor) => {
                        let Ok(s) = acceptor.accept(s).await else { return };
                        http.serve_connection(hyper_util::rt::TokioIo::new(s), svc).await
                    }
                };
            });
        }
    });
    App { addr, state }
}

// ---------------------------------------------------------------- a raw client

/// One TLS connection to the gateway, read by hand.
struct Client {
    s: tokio_rustls::client::TlsStream<TcpStream>,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The gateway's sticky cookie among the answer's `Set-Cookie` headers.
    fn sticky(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, v)| n == "set-cookie" && v.starts_with("wsgate_sticky="))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Client {
    async fn connect(gw: &Gw) -> Client {
        let connector = tokio_rustls::TlsConnector::from(gw.tls());
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let s = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        Client { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// More bytes; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut b = [0u8; 16384];
        let n = tokio::time::timeout(TIMEOUT, self.s.read(&mut b))
            .await
            .expect("no answer in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&b[..n]);
        n > 0
    }

    async fn head(&mut self) -> Option<(u16, Vec<(String, String)>)> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).to_string();
                self.buf.drain(..i + 4);
                let mut lines = head.split("\r\n");
                let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
                let headers = lines
                    .filter_map(|l| {
                        l.split_once(':')
                            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                    })
                    .collect();
                return Some((status, headers));
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[..i]).to_string();
                self.buf.drain(..i + 2);
                return l;
            }
            assert!(self.fill().await, "stream ended inside a chunk line");
        }
    }

    async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "stream ended inside a body");
        }
        self.buf.drain(..n).collect()
    }

    /// One chunk of a chunked body (empty: the last).
    async fn chunk(&mut self) -> Vec<u8> {
        let size = usize::from_str_radix(self.line().await.split(';').next().unwrap().trim(), 16).unwrap();
        let data = self.exact(size).await;
        if size == 0 {
            // Trailers, then the empty line.
            while !self.line().await.is_empty() {}
        } else {
            assert_eq!(self.exact(2).await, b"\r\n");
        }
        data
    }

    /// The next whole answer (`None`: the connection ended first). `head_request`: no body.
    async fn answer_to(&mut self, head_request: bool) -> Option<Answer> {
        let (status, headers) = self.head().await?;
        let mut a = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request || status == 204 || status == 304 {
            return Some(a);
        }
        if a.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let c = self.chunk().await;
                if c.is_empty() {
                    break;
                }
                a.body.extend(c);
            }
        } else if let Some(n) = a.header("content-length").and_then(|v| v.parse().ok()) {
            a.body = self.exact(n).await;
        } else {
            while self.fill().await {}
            a.body = std::mem::take(&mut self.buf);
        }
        Some(a)
    }

    async fn answer(&mut self) -> Option<Answer> {
        self.answer_to(false).await
    }

    /// Whether the gateway closed the connection with nothing more to read.
    async fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n").into_bytes()
}

// ---------------------------------------------------------------- the gateway

const LIMITS: &str = "[limits]\nhttp_rate_per_ip = \"1000/s\"\nhttp_burst_per_ip = 1000\n";

/// A JWT route with `http = true` to the app at `url`, with `extra` keys.
fn http_route(name: &str, path: &str, url: &str, extra: &str) -> String {
    format!("[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nupstreams = [\"{url}\"]\nauth = \"jwt\"\nhttp = true\n{extra}\n")
}

fn routes(app: &App, extra: &str) -> String {
    let app_route = http_route(
        "app",
        "/app/*",
        &app.url(),
        &format!("max_body = \"1KiB\"\nhttp_timeout = \"1s\"\nallowed_origins = [\"https://good.example\"]\n{extra}"),
    );
    format!(
        r#"{LIMITS}
{app_route}
[[routes]]
name = "ws"
path = "/ws"
upstreams = ["builtin:echo"]
auth = "none"

[[routes]]
name = "echo"
path = "/e"
upstreams = ["builtin:echo"]
auth = "none"
http = true
http_methods = ["GET", "POST"]
"#
    )
}

fn bearer(gw: &Gw) -> String {
    format!("Authorization: Bearer {}\r\n", gw.token("alice"))
}

fn rejected(reason: &str) -> String {
    format!("wsgate_connections_rejected_total{{reason=\"{reason}\"}}")
}

#[tokio::test]
async fn requests_on_a_kept_alive_connection_are_admitted_each_on_its_own_and_headers_are_cleaned() {
    let app = app().await;
    let gw = Gw::start("", &routes(&app, "")).await;
    let auth = bearer(&gw);
    let mut c = Client::connect(&gw).await;
    let extra = format!(
        "{auth}Cookie: wsgate_token=stolen; keep=1\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\nX-App: kept\r\n"
    );
    c.send(&get("/app/headers?access_token=t&q=1", &extra)).await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let seen = a.text().to_ascii_lowercase();
    assert!(seen.starts_with("get /app/headers?q=1\n"), "{seen}");
    assert!(seen.contains("x-app: kept"), "{seen}");
    assert!(seen.contains("cookie: keep=1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-real-ip: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: https"), "{seen}");
    for gone in ["authorization", "wsgate_token", "6.6.6.6", "x-drop", "connection:", "keep-alive"] {
        assert!(!seen.contains(gone), "{gone} reached the upstream: {seen}");
    }
    // The upstream's hop-by-hop headers stop at the gateway; its cookie passes.
    assert_eq!(a.header("set-cookie"), Some("sid=1; Path=/"));
    assert!(a.header("x-hop").is_none() && a.header("keep-alive").is_none(), "{:?}", a.headers);

    // The second request on the same connection, with its own token: admitted again,
    // on the same upstream connection (a clean exchange put it back in the pool).
    c.send(&get("/app/headers", &auth)).await;
    assert_eq!(c.answer().await.unwrap().status, 200);
    let seen = app.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, seen[1].0, "the pooled connection was not reused");

    // A third with a bad token: 401 although the first two passed, and the connection
    // closes (a request pipelined behind it is never read).
    let mut bad = get("/app/headers", "Authorization: Bearer nope\r\n");
    bad.extend(get("/app/headers", &auth));
    c.send(&bad).await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.status, 401);
    assert_eq!(a.header("connection"), Some("close"));
    assert!(c.closed().await);
    assert_eq!(app.seen().len(), 2);
    gw.wait_metric(&rejected("auth"), 1.0).await;
    gw.wait_metric(r#"wsgate_http_requests_total{route="app",code="2xx"}"#, 2.0).await;
    gw.wait_metric(r#"wsgate_http_requests_total{route="app",code="4xx"}"#, 1.0).await;
    assert!(
        gw.metrics_text()
            .await
            .contains("wsgate_http_request_duration_seconds_count{route=\"app\"} 3")
    );

    // Host/SNI: every request on the connection is checked (421 on the second).
    let mut c = Client::connect(&gw).await;
    c.send(&get("/app/headers", &auth)).await;
    assert_eq!(c.answer().await.unwrap().status, 200);
    c.send(&format!("GET /app/headers HTTP/1.1\r\nHost: chat.example.com\r\n{auth}\r\n").into_bytes())
        .await;
    assert_eq!(c.answer().await.unwrap().status, 421);
    assert!(c.closed().await);
    gw.wait_metric(&rejected("misdirected"), 1.0).await;
}

#[tokio::test]
async fn a_token_or_sticky_cookie_behind_a_comma_or_space_in_a_cookie_pair_never_reaches_the_upstream() {
    // Found by the red-team pass (rt23): the gateway split `Cookie` on `;` only, so
    // `a=1, wsgate_token=x` passed whole; RFC 2109 parsers and Python's `http.cookies`
    // read a `wsgate_token` cookie in it (a token the gateway never verified).
    let app = app().await;
    let gw = Gw::start("", &routes(&app, "balance = \"sticky\"")).await;
    let auth = bearer(&gw);
    let mut c = Client::connect(&gw).await;
    let extra = format!(
        "{auth}Cookie: a=1, wsgate_token=forged; b=2 wsgate_token=forged2; c=3,\tWSGATE_TOKEN=forged3; keep=1\r\nCookie: d=4, wsgate_sticky=forged4\r\n"
    );
    c.send(&get("/app/headers", &extra)).await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let seen = a.text().to_ascii_lowercase();
    assert!(seen.contains("cookie: keep=1\n"), "{seen}");
    for gone in ["forged", "wsgate_token", "wsgate_sticky"] {
        assert!(!seen.contains(gone), "{gone} reached the upstream: {seen}");
    }
}

#[tokio::test]
async fn refusals_have_their_status_and_reason() {
    let app = app().await;
    let gw = Gw::start("", &routes(&app, "")).await;
    let auth = bearer(&gw);
    let one = |req: Vec<u8>| {
        let gw = &gw;
        async move {
            let mut c = Client::connect(gw).await;
            c.send(&req).await;
            let a = c.answer().await.unwrap();
            assert!(c.closed().await, "connection left open after {}", a.status);
            a.status
        }
    };
    // Without `http = true`: 426, as before.
    assert_eq!(one(get("/ws", "")).await, 426);
    gw.wait_metric(&rejected("bad_request"), 1.0).await;
    // A method outside http_methods: 405, before authentication.
    assert_eq!(one(b"DELETE /app/headers HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()).await, 405);
    gw.wait_metric(&rejected("method_not_allowed"), 1.0).await;
    // No token, a foreign Origin.
    assert_eq!(one(get("/app/headers", "")).await, 401);
    assert_eq!(
        one(get("/app/headers", &format!("{auth}Origin: https://evil.example\r\n"))).await,
        403
    );
    gw.wait_metric(&rejected("origin"), 1.0).await;
    // A declared body over max_body: 413 before anything goes upstream.
    let big = format!("POST /app/upload HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 2000\r\n\r\n");
    assert_eq!(one(big.into_bytes()).await, 413);
    gw.wait_metric(&rejected("body_too_large"), 1.0).await;
    // A path the upstream could read otherwise.
    assert_eq!(one(get("/app/%2e%2e/admin", &auth)).await, 400);
    assert!(app.seen().is_empty(), "{:?}", app.seen());
    gw.wait_metric(r#"wsgate_http_requests_total{route="app",code="4xx"}"#, 4.0).await;

    // The built-in echo answers a plain POST with its body.
    let mut c = Client::connect(&gw).await;
    c.send(b"POST /e HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    let a = c.answer().await.unwrap();
    assert_eq!((a.status, a.text().as_str()), (200, "hello"));
}

#[tokio::test]
async fn odd_request_targets_reach_routing_and_the_upstream_as_before() {
    let app = app().await;
    let url = app.url();
    let config = format!(
        "{LIMITS}\n{}\n{}",
        http_route("late", "/app/late", &url, "http_timeout = \"3s\""),
        http_route("root", "/", &url, "")
    );
    let gw = Gw::start("", &config).await;
    let auth = bearer(&gw);
    // An authority-form target (no path at all): 400, the connection closed, nothing upstream.
    let mut c = Client::connect(&gw).await;
    c.send(b"GET localhost HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.status, 400);
    assert!(c.closed().await);
    // An absolute-form target whose path is empty once its fragment is cut: `/` upstream.
    let mut c = Client::connect(&gw).await;
    c.send(format!("GET http://localhost#x HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n").as_bytes())
        .await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.status, 404, "{}", a.text());
    assert_eq!(app.seen().last().map(|s| s.2.clone()).as_deref(), Some("/"));
    // `http_timeout` counts from the answer's head, then from each of its bytes: a head
    // after 2 s and its body 2 s later (4 s in all, each wait under 3 s) arrive whole.
    c.send(&get("/app/late", &auth)).await;
    let a = c.answer().await.unwrap();
    assert_eq!((a.status, a.text().as_str()), (200, "late body"));
    assert_eq!(app.seen().len(), 2);
}

/// Between plain requests a kept-alive connection waits for its next request head no
/// longer than `handshake_timeout`, counted from the end of the last answer: a head
/// dripped slowly is cut, and so is a connection left silent. A request in progress is
/// not: neither an upstream slower than that to answer, nor an answer streamed for longer.
#[tokio::test]
async fn a_kept_alive_connection_waits_for_its_next_head_no_longer_than_handshake_timeout() {
    let app = app().await;
    let url = app.url();
    let config = format!(
        "{LIMITS}\n{}\n{}",
        http_route("late", "/app/late", &url, "http_timeout = \"3s\""),
        http_route("app", "/app/*", &url, "http_timeout = \"3s\"")
    );
    let gw = Gw::start("handshake_timeout = \"1s\"", &config).await;
    let auth = bearer(&gw);
    let mut c = Client::connect(&gw).await;
    // The upstream's head comes after 2 s, its body 2 s later: the connection stays.
    c.send(&get("/app/late", &auth)).await;
    let a = c.answer().await.unwrap();
    assert_eq!((a.status, a.text().as_str()), (200, "late body"));
    // An answer streamed for 1.5 s (its second chunk held): the connection stays.
    c.send(&get("/app/stream", &auth)).await;
    assert_eq!(c.head().await.unwrap().0, 200);
    assert_eq!(c.chunk().await, b"first");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.state.release.notify_one();
    assert_eq!(c.chunk().await, b"second");
    assert!(c.chunk().await.is_empty());
    // Then silence: cut about 1 s after the end of the answer.
    let t0 = std::time::Instant::now();
    assert!(c.closed().await, "a silent kept-alive connection stayed");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(3),
        "cut after {waited:?}"
    );
    // A next head dripped a byte every 100 ms: cut before it is whole.
    let mut c = Client::connect(&gw).await;
    c.send(&get("/app/headers", &auth)).await;
    assert_eq!(c.answer().await.unwrap().status, 200);
    let t0 = std::time::Instant::now();
    let mut cut = false;
    for b in get("/app/headers", &auth).iter().take(40) {
        if c.s.write_all(&[*b]).await.is_err() || c.s.flush().await.is_err() {
            cut = true;
            break;
        }
        // Kept: a client dripping its request head slowly is the point of this case.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut || c.closed().await, "a dripped head was not cut");
    assert!(t0.elapsed() < Duration::from_millis(3500), "cut after {:?}", t0.elapsed());
    assert_eq!(app.seen().len(), 3, "the dripped head reached the upstream");
}

/// The wait for the next head starts once the last answer is written out and the last
/// request body came whole, not before: a client slow to read the end of a large answer
/// gets all of it, and a body still uploading after an early answer is not cut.
#[tokio::test]
async fn the_wait_for_the_next_head_starts_after_the_answer_is_written_and_the_body_is_in() {
    let app = app().await;
    let url = app.url();
    let config = format!(
        "{LIMITS}\n{}",
        http_route("app", "/app/*", &url, "http_timeout = \"5s\"\nmax_body = \"4MiB\"")
    );
    let gw = Gw::start("handshake_timeout = \"1s\"", &config).await;
    let auth = bearer(&gw);
    // Answers around what the sockets and buffers between the gateway and a client
    // that does not read hold (the client's receive buffer made small): for some of
    // them the last frame leaves the upstream's body while its bytes still wait in the
    // gateway. The client reads 2 s later, all of it.
    let reads = (46..58).map(|chunks: usize| {
        let (gw, auth) = (&gw, &auth);
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(8 * 1024).unwrap();
            let tcp = socket.connect(gw.addr).await.unwrap();
            let s = tokio_rustls::TlsConnector::from(gw.tls())
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            let mut c = Client { s, buf: Vec::new() };
            c.send(&get(&format!("/app/big?{chunks}"), auth)).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let a = c.answer().await.expect("answer cut");
            (chunks, a.body.len())
        }
    });
    for (chunks, got) in futures_util::future::join_all(reads).await {
        assert_eq!(got, chunks * 64 * 1024, "answer of {chunks} chunks cut short");
    }
    // A body sent over 2 s (32 KiB every 250 ms) to an upstream that answered at once:
    // uploaded whole, and the connection serves the next request.
    let mut c = Client::connect(&gw).await;
    let total = 8 * 32 * 1024;
    c.send(format!("POST /app/early HTTP/1.1\r\nHost: localhost\r\nContent-Length: {total}\r\n{auth}\r\n").as_bytes())
        .await;
    let chunk = vec![b'x'; 32 * 1024];
    for _ in 0..8 {
        c.send(&chunk).await;
        // Kept: a body arriving slowly after its answer is the point of this case.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let a = c.answer().await.expect("no answer");
    assert_eq!((a.status, a.text().as_str()), (200, "early"));
    wait_until("the body uploaded whole", TIMEOUT, || async {
        app.state.early.load(std::sync::atomic::Ordering::Relaxed) == total
    })
    .await;
    c.send(&get("/app/headers", &auth)).await;
    assert_eq!(c.answer().await.map(|a| a.status), Some(200));
}

/// A request that waited for a place in a full pool still has all of `http_timeout` for
/// its upstream to answer: the wait is not charged to the upstream.
#[tokio::test]
async fn time_spent_waiting_for_a_pool_place_is_not_the_upstreams_time_to_answer() {
    let app = app().await;
    let url = app.url();
    let config = format!(
        "{LIMITS}\n{}",
        http_route("app", "/app/*", &url, "http_timeout = \"2s\"\nhttp_max_connections = 1")
    );
    let gw = Gw::start("", &config).await;
    let auth = bearer(&gw);
    // A takes the only place for 1.5 s; B waits about 1.4 s for it, then its upstream
    // answers in 1.5 s: 2.9 s in all, each wait under 2 s.
    let mut a = Client::connect(&gw).await;
    let mut b = Client::connect(&gw).await;
    a.send(&get("/app/pause", &auth)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.send(&get("/app/pause", &auth)).await;
    let (ra, rb) = tokio::join!(a.answer(), b.answer());
    assert_eq!(ra.map(|r| r.status), Some(200));
    assert_eq!(rb.map(|r| (r.status, r.text())), Some((200, "paused".to_string())));
}

#[tokio::test]
async fn a_chunked_body_over_max_body_aborts_the_upstream_request_and_its_connection_is_not_reused() {
    let app = app().await;
    let gw = Gw::start("", &routes(&app, "")).await;
    let auth = bearer(&gw);
    let mut c = Client::connect(&gw).await;
    c.send(&get("/app/headers", &auth)).await;
    assert_eq!(c.answer().await.unwrap().status, 200);
    // A chunked upload under the limit: passes, on the same upstream connection.
    let chunk = format!("200\r\n{}\r\n", "a".repeat(0x200));
    c.send(format!("POST /app/upload HTTP/1.1\r\nHost: localhost\r\n{auth}Transfer-Encoding: chunked\r\n\r\n{chunk}0\r\n\r\n").as_bytes())
        .await;
    let a = c.answer().await.unwrap();
    assert_eq!((a.status, a.text().as_str()), (200, "512"));
    // Over the limit midway: 413, the connection closes.
    c.send(
        format!("POST /app/upload HTTP/1.1\r\nHost: localhost\r\n{auth}Transfer-Encoding: chunked\r\n\r\n{chunk}{chunk}{chunk}0\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.status, 413, "{}", a.text());
    assert!(c.closed().await);
    gw.wait_metric(&rejected("body_too_large"), 1.0).await;
    // The next request goes on a new upstream connection.
    let mut c = Client::connect(&gw).await;
    c.send(&get("/app/headers", &auth)).await;
    assert_eq!(c.answer().await.unwrap().status, 200);
    let seen = app.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[0].0, seen[1].0);
    assert_eq!(seen[1].0, seen[2].0);
    assert_ne!(seen[2].0, seen[3].0, "an aborted upstream connection was reused");
}

#[tokio::test]
async fn answers_stream_without_being_held_and_a_silent_upstream_gets_504() {
    let app = app().await;
    let gw = Gw::start("", &routes(&app, "")).await;
    let auth = bearer(&gw);
    let mut c = Client::connect(&gw).await;
    c.send(&get("/app/stream", &auth)).await;
    let (status, headers) = c.head().await.unwrap();
    assert_eq!(status, 200);
    assert!(
        headers.iter().any(|(n, v)| n == "transfer-encoding" && v == "chunked"),
        "{headers:?}"
    );
    // The first chunk arrives while the upstream still holds the second.
    assert_eq!(c.chunk().await, b"first");
    app.state.release.notify_one();
    assert_eq!(c.chunk().await, b"second");
    assert!(c.chunk().await.is_empty());

    // 4 MiB, sent by the upstream 64 KiB at a time.
    c.send(&get("/app/big", &auth)).await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.body.len(), 64 * 64 * 1024);
    assert!(a.body.chunks(64 * 1024).enumerate().all(|(i, ch)| ch.iter().all(|&b| b == i as u8)));

    // No byte from the upstream within http_timeout (1 s): 504.
    c.send(&get("/app/slow", &auth)).await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.status, 504);
    gw.wait_metric(&rejected("upstream_timeout"), 1.0).await;
    gw.wait_metric(r#"wsgate_http_requests_total{route="app",code="5xx"}"#, 1.0).await;
}

/// Each way of framing one request twice, with a request pipelined behind it: one 400,
/// the connection closed, and nothing reaches the upstream.
#[tokio::test]
async fn request_smuggling_is_refused_and_nothing_behind_it_is_read() {
    let app = app().await;
    let gw = Gw::start("", &routes(&app, "")).await;
    let auth = bearer(&gw);
    let h = format!("Host: localhost\r\n{auth}");
    let cases: Vec<(&str, String)> = vec![
        (
            "CL then TE",
            format!("POST /app/upload HTTP/1.1\r\n{h}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE then CL",
            format!("POST /app/upload HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        ),
        (
            "CL twice, same value",
            format!("POST /app/upload HTTP/1.1\r\n{h}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "CL twice, different values",
            format!("POST /app/upload HTTP/1.1\r\n{h}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ),
        (
            "CL list",
            format!("POST /app/upload HTTP/1.1\r\n{h}Content-Length: 5, 5\r\n\r\nhello"),
        ),
        ("obs-fold", format!("GET /app/headers HTTP/1.1\r\n{h}X-A: b\r\n c\r\n\r\n")),
        ("bare LF", format!("GET /app/headers HTTP/1.1\n{h}\r\n")),
        ("bare CR", format!("GET /app/headers HTTP/1.1\r\n{h}X-A: b\rX-B: c\r\n\r\n")),
        (
            "TE not chunked",
            format!("POST /app/upload HTTP/1.1\r\n{h}Transfer-Encoding: gzip\r\n\r\n"),
        ),
        (
            "TE chunked twice",
            format!("POST /app/upload HTTP/1.1\r\n{h}Transfer-Encoding: chunked, identity\r\n\r\n"),
        ),
    ];
    for (what, req) in &cases {
        let mut c = Client::connect(&gw).await;
        let mut bytes = req.clone().into_bytes();
        bytes.extend(get("/app/headers", &auth));
        c.send(&bytes).await;
        let a = c.answer().await;
        assert_eq!(a.as_ref().map(|a| a.status), Some(400), "{what}: {a:?}");
        assert!(c.closed().await, "{what}: connection left open");
        assert!(app.seen().is_empty(), "{what}: reached the upstream: {:?}", app.seen());
    }
    gw.wait_metric(&rejected("bad_request"), cases.len() as f64).await;

    // An invalid chunk size: the exchange fails, the client gets 400 at most, the
    // connection closes, and the request behind it is never read.
    let mut c = Client::connect(&gw).await;
    let mut bytes = format!("POST /app/upload HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").into_bytes();
    bytes.extend(get("/app/headers", &auth));
    c.send(&bytes).await;
    if let Some(a) = c.answer().await {
        assert_eq!(a.status, 400, "{a:?}");
    }
    assert!(c.closed().await);
    assert!(app.seen().iter().all(|(_, m, _)| m == "POST"), "{:?}", app.seen());
}

#[tokio::test]
async fn the_http_rate_per_ip_is_charged_per_request() {
    let app = app().await;
    let text = routes(&app, "").replace(LIMITS, "[limits]\nhttp_rate_per_ip = \"1/min\"\nhttp_burst_per_ip = 2\n");
    let gw = Gw::start("", &text).await;
    let auth = bearer(&gw);
    let mut c = Client::connect(&gw).await;
    for _ in 0..2 {
        c.send(&get("/app/headers", &auth)).await;
        assert_eq!(c.answer().await.unwrap().status, 200);
    }
    c.send(&get("/app/headers", &auth)).await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.status, 429);
    assert!(c.closed().await);
    gw.wait_metric(&rejected("rate_limited"), 1.0).await;
    // WebSocket upgrades are not charged to it.
    let mut ws = gw.connect("/ws").await;
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
}

#[test]
fn bad_http_keys_are_config_errors_naming_key_and_line() {
    let route =
        |extra: &str| format!("[[routes]]\nname = \"a\"\npath = \"/a/*\"\nupstreams = [\"ws://127.0.0.1:1\"]\nauth = \"none\"\n{extra}\n");
    for (text, key, line) in [
        (route("http_methods = [\"GET\"]"), "routes.http_methods", 6),
        (route("http = true\nhttp_methods = [\"get\"]"), "routes.http_methods", 7),
        (route("http = true\nhttp_methods = []"), "routes.http_methods", 7),
        (route("http = true\nhttp_methods = [\"CONNECT\"]"), "routes.http_methods", 7),
        (route("http = true\nhttp_timeout = \"0s\""), "routes.http_timeout", 7),
        (route("max_body = \"1KiB\""), "routes.max_body", 6),
        (route("http_max_connections = 8"), "routes.http_max_connections", 6),
        (route("http = true\nhttp_max_connections = 0"), "routes.http_max_connections", 7),
        (
            route("http = true\nhttp_max_connections = 100000"),
            "routes.http_max_connections",
            7,
        ),
        ("[limits]\nhttp_rate_per_ip = \"0/s\"\n".to_string(), "limits.http_rate_per_ip", 2),
        ("[limits]\nhttp_burst_per_ip = 0\n".to_string(), "limits.http_burst_per_ip", 2),
    ] {
        let e = wsgate::Config::from_toml_str(&text, "t.toml").expect_err(&text);
        assert_eq!((e.key.as_str(), e.line), (key, Some(line)), "{e}\n{text}");
    }
    let c = wsgate::Config::from_toml_str(&route("http = true"), "t.toml").unwrap();
    let p = c.routes[0].http.as_ref().unwrap();
    assert_eq!(
        p.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        ["GET", "POST", "OPTIONS", "HEAD"]
    );
    assert_eq!((p.max_body, p.timeout, p.max_connections), (1 << 20, Duration::from_secs(60), 1024));
    assert!(
        wsgate::Config::from_toml_str(&route(""), "t.toml").unwrap().routes[0]
            .http
            .is_none()
    );
}

#[tokio::test]
async fn a_wss_upstream_gets_https_and_an_upgrade_may_follow_plain_requests_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let app = tls_app(dir.path()).await;
    let text = format!(
        "{LIMITS}\n[[routes]]\nname = \"app\"\npath = \"/app/*\"\nupstreams = [\"wss://localhost:{}\"]\nupstream_ca = \"{}\"\nauth = \"none\"\nhttp = true\n\n\
         [[routes]]\nname = \"echo\"\npath = \"/e\"\nupstreams = [\"builtin:echo\"]\nauth = \"none\"\nhttp = true\n",
        app.addr.port(),
        dir.path().join("app-ca.pem").display()
    );
    let gw = Gw::start("", &text).await;
    let mut c = Client::connect(&gw).await;
    c.send(&get("/app/headers", "")).await;
    let a = c.answer().await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(a.text().starts_with("GET /app/headers\n"), "{}", a.text());
    assert_eq!(app.seen().len(), 1);

    // A plain request, then the upgrade, on one connection: the session relays.
    c.send(b"POST /e HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nhi").await;
    assert_eq!(c.answer().await.unwrap().text(), "hi");
    c.send(&get(
        "/e",
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    ))
    .await;
    let (status, _) = c.head().await.unwrap();
    assert_eq!(status, 101);
    // One masked text frame "ping"; the echo sends it back unmasked.
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 4];
    frame.extend(mask);
    frame.extend(b"ping".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    c.send(&frame).await;
    assert_eq!(c.exact(6).await, [0x81, 4, b'p', b'i', b'n', b'g']);
}

const ADMIN_TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";

#[tokio::test]
async fn sticky_keeps_a_client_on_its_upstream_a_forged_cookie_is_ignored_and_the_admin_api_lists_upstreams() {
    let (a, b) = (app().await, app().await);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let text = format!(
        "{LIMITS}\n[[routes]]\nname = \"app\"\npath = \"/app/*\"\nupstreams = [\"{}\", \"{}\"]\nauth = \"none\"\nhttp = true\nbalance = \"sticky\"\n",
        a.url(),
        b.url()
    );
    let gw = Gw::start_with("", &text, |t| {
        t.replacen(
            "[admin]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n", token_file.display()),
            1,
        )
    })
    .await;
    let mut c = Client::connect(&gw).await;
    // No cookie: balanced, and a signed cookie that names no address.
    c.send(&get("/app/headers", "")).await;
    let first = c.answer().await.unwrap();
    let cookie = first.sticky().unwrap().to_string();
    assert_eq!(first.header("set-cookie"), Some("sid=1; Path=/"), "the app's own cookie passes");
    assert!(
        cookie.starts_with("wsgate_sticky=") && cookie.contains("HttpOnly") && cookie.contains("Secure"),
        "{cookie}"
    );
    assert!(!cookie.contains("127.0.0.1"), "{cookie}");
    let value = cookie.split(';').next().unwrap().to_string();
    let on_a = a.seen().len() == 1;
    // With the cookie: every request lands on the same upstream, no new cookie, and the
    // cookie never reaches the upstream.
    for _ in 0..6 {
        c.send(&get("/app/headers", &format!("Cookie: {value}; app=1\r\n"))).await;
        let r = c.answer().await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.sticky().is_none(), "{:?}", r.headers);
        assert!(
            !r.text().contains("wsgate_sticky") && r.text().contains("cookie: app=1"),
            "{}",
            r.text()
        );
    }
    let (mine, other) = if on_a { (&a, &b) } else { (&b, &a) };
    assert_eq!((mine.seen().len(), other.seen().len()), (7, 0));
    // A forged or foreign cookie is ignored: the request is balanced and gets a new one.
    for forged in [
        "wsgate_sticky=AAEAAAAAAAAAAAAAAAAAAAAAAA",
        "wsgate_sticky=garbage",
        "wsgate_sticky=",
    ] {
        c.send(&get("/app/headers", &format!("Cookie: {forged}\r\n"))).await;
        let r = c.answer().await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.sticky().is_some(), "{forged}");
    }

    // The admin API lists both, with the long poll in flight on its upstream.
    c.send(&get("/app/stream", &format!("Cookie: {value}\r\n"))).await;
    let (status, _) = c.head().await.unwrap();
    assert_eq!(status, 200);
    let (code, body) = http_request(
        gw.admin,
        "GET",
        "/v1/upstreams",
        &format!("Authorization: Bearer {ADMIN_TOKEN}\r\n"),
        "",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = v["upstreams"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    for (i, app) in [&a, &b].into_iter().enumerate() {
        assert_eq!(list[i]["route"], "app");
        assert_eq!(list[i]["upstream"], format!("ws://{}", app.addr));
        assert_eq!(list[i]["index"], i);
        assert_eq!(list[i]["state"], "up");
        assert_eq!(list[i]["healthy"], true);
        assert_eq!(list[i]["sessions"], 0);
        let busy = std::ptr::eq(app, mine);
        assert_eq!(list[i]["in_flight"], u64::from(busy), "{body}");
    }
    let (code, _) = http_request(gw.admin, "GET", "/v1/upstreams", "", "").await;
    assert_eq!(code, 401);
    mine.state.release.notify_one();
}

#[tokio::test]
async fn a_sticky_upgrade_lands_where_the_cookie_says_and_sessions_count_for_least_sessions() {
    let (a, b) = (upstream(Behaviour::Echo).await, upstream(Behaviour::Echo).await);
    let text = format!(
        "[[routes]]\nname = \"ws\"\npath = \"/ws\"\nupstreams = [\"{}\", \"{}\"]\nauth = \"none\"\nbalance = \"sticky\"\n",
        a.url(),
        b.url()
    );
    let gw = Gw::start("", &text).await;
    let upgrade = |cookie: &str| {
        get(
            "/ws",
            &format!(
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{cookie}"
            ),
        )
    };
    // The first upgrade: a cookie on the 101, and its session counted on its upstream.
    let mut first = Client::connect(&gw).await;
    first.send(&upgrade("")).await;
    let (status, headers) = first.head().await.unwrap();
    assert_eq!(status, 101);
    let cookie = headers
        .iter()
        .find(|(n, v)| n == "set-cookie" && v.starts_with("wsgate_sticky="))
        .map(|(_, v)| v.split(';').next().unwrap().to_string())
        .expect("no sticky cookie on the 101");
    let first_on_a = a.requests() == 1;
    // With the cookie: the same upstream each time, although it holds more sessions.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&gw).await;
        c.send(&upgrade(&format!("Cookie: {cookie}\r\n"))).await;
        let (status, headers) = c.head().await.unwrap();
        assert_eq!(status, 101);
        assert!(!headers.iter().any(|(n, _)| n == "set-cookie"), "{headers:?}");
        held.push(c);
    }
    let (mine, other) = if first_on_a { (&a, &b) } else { (&b, &a) };
    assert_eq!((mine.requests(), other.requests()), (4, 0));
    let index = if first_on_a { 0 } else { 1 };
    gw.wait_metric(&format!("wsgate_upstream_sessions{{route=\"ws\",upstream=\"{index}\"}}"), 4.0)
        .await;
    gw.wait_metric(&format!("wsgate_upstream_up{{route=\"ws\",upstream=\"{}\"}}", 1 - index), 1.0)
        .await;
    assert!(mine.header(1, "cookie").is_none(), "the sticky cookie reached the upstream");
    // Without a cookie: the least loaded upstream.
    let mut c = Client::connect(&gw).await;
    c.send(&upgrade("")).await;
    assert_eq!(c.head().await.unwrap().0, 101);
    assert_eq!(other.requests(), 1);
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_dropped_and_the_upstream_exchange_ends() {
    let app = app().await;
    let gw = Gw::start("handshake_timeout = \"1s\"\nupstream_timeout = \"1s\"\n", &routes(&app, "")).await;
    let auth = bearer(&gw);
    let mut c = Client::connect(&gw).await;
    c.send(&get("/app/big?huge", &auth)).await;
    // Never read: the answer (256 MiB) cannot all be written, nothing moves on the client
    // connection, and the gateway ends it (handshake + upstream + http timeouts, 3 s).
    let t0 = std::time::Instant::now();
    wait_until("the upstream's answer cut", Duration::from_secs(8), || async {
        app.state.big_cut.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    assert!(t0.elapsed() >= Duration::from_secs(2), "cut after {:?}", t0.elapsed());
    drop(c);
}

#[tokio::test]
async fn clients_filling_the_pool_with_long_polls_do_not_mark_the_upstream_down_for_others() {
    let app = app().await;
    // Requests that find every place of the pool taken wait `http_timeout` and get 504;
    // that is charged to the request, not to the upstream: a full pool is not a failing
    // upstream, and the next request once places free up is served.
    let text = format!(
        "[limits]\nhttp_rate_per_ip = \"10000/s\"\nhttp_burst_per_ip = 10000\nmax_connections_per_ip = 1000\n\
         connection_rate_per_ip = \"10000/s\"\nconnection_burst_per_ip = 10000\n\
         [[routes]]\nname = \"app\"\npath = \"/app/*\"\nupstreams = [\"{}\"]\nauth = \"none\"\nhttp = true\nhttp_timeout = \"2s\"\nhttp_max_connections = 16\n",
        app.url()
    );
    let gw = Gw::start("", &text).await;
    let mut holders = Vec::new();
    for _ in 0..16 {
        let mut c = Client::connect(&gw).await;
        c.send(&get("/app/trickle", "")).await;
        holders.push(c);
    }
    // Every place taken (the app holds them all, each answer still streaming).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while app.seen().len() < 16 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} long polls reached the app",
            app.seen().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Four more (more than the failures that put an upstream in back-off) wait for a
    // place and time out.
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(&gw).await;
        c.send(&get("/app/headers", "")).await;
        waiting.push(c);
    }
    for c in &mut waiting {
        assert_eq!(c.answer().await.map(|a| a.status), Some(504));
    }
    assert_eq!(app.seen().len(), 16, "a waiting request reached the app");
    // The long polls end (their clients leave); the upstream is still in: the next
    // client is served at once.
    drop(holders);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = Client::connect(&gw).await;
    c.send(&get("/app/headers", "")).await;
    assert_eq!(c.answer().await.map(|a| a.status), Some(200));
}

/// `server.sticky_key_file`: gateways given the same file (other instances, or the
/// process after a restart or binary upgrade) honour each other's sticky cookies; one
/// with its own key balances such a client anew. A key file that is too short is a
/// config error naming the key.
#[tokio::test]
async fn instances_sharing_a_sticky_key_file_honour_each_others_cookies() {
    let (a, b) = (app().await, app().await);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("sticky.key");
    std::fs::write(&key_file, "0123456789abcdef0123456789abcdef-shared\n").unwrap();
    let text = format!(
        "{LIMITS}\n[[routes]]\nname = \"app\"\npath = \"/app/*\"\nupstreams = [\"{}\", \"{}\"]\nauth = \"none\"\nhttp = true\nbalance = \"sticky\"\n",
        a.url(),
        b.url()
    );
    let with_key = |t: String| {
        t.replacen(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n",
            &format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\nsticky_key_file = \"{}\"\n",
                key_file.display()
            ),
            1,
        )
    };
    let one = Gw::start_with("", &text, with_key).await;
    let two = Gw::start_with("", &text, with_key).await;
    let own = Gw::start("", &text).await;
    // `wsgate check` says what a per-process key means for sticky routes.
    let warned = |cfg: &wsgate::config::Config| wsgate::check::warnings(cfg).iter().any(|w| w.contains("sticky_key_file"));
    assert!(warned(&own.config));
    assert!(!warned(&one.config));
    let mut c = Client::connect(&one).await;
    c.send(&get("/app/headers", "")).await;
    let cookie = c.answer().await.unwrap().sticky().unwrap().to_string();
    let value = cookie.split(';').next().unwrap().to_string();
    let on_a = a.seen().len() == 1;
    // The other instance with the same key: same upstream, no new cookie, every time.
    for _ in 0..4 {
        let mut c = Client::connect(&two).await;
        c.send(&get("/app/headers", &format!("Cookie: {value}\r\n"))).await;
        let r = c.answer().await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.sticky().is_none(), "instance two did not honour the cookie: {:?}", r.headers);
    }
    let (mine, other) = if on_a { (&a, &b) } else { (&b, &a) };
    assert_eq!((mine.seen().len(), other.seen().len()), (5, 0));
    // A process with its own key: the cookie is foreign, the client gets a new one.
    let mut c = Client::connect(&own).await;
    c.send(&get("/app/headers", &format!("Cookie: {value}\r\n"))).await;
    assert!(c.answer().await.unwrap().sticky().is_some());
    // Too short a secret.
    std::fs::write(&key_file, "short\n").unwrap();
    let config = wsgate::config::Config::from_toml_str(&with_key(common::config_text(dir.path(), "", &text)), "test.toml").unwrap();
    let e = wsgate::start(config)
        .await
        .err()
        .expect("a short sticky key was accepted")
        .to_string();
    assert!(e.contains("sticky_key_file") && e.contains("at least 32 bytes"), "{e}");
}

/// A kept-alive connection follows reloads: each request is admitted under the config
/// in force when it comes, not the one its connection was accepted under (a route that
/// now needs a token refuses the next request on the same connection).
#[tokio::test]
async fn a_kept_alive_connection_is_admitted_under_the_newest_config() {
    let app = app().await;
    let routes = |auth: &str| {
        format!(
            "{LIMITS}\n[[routes]]\nname = \"app\"\npath = \"/app/*\"\nupstreams = [\"{}\"]\nauth = \"{auth}\"\nhttp = true\n",
            app.url()
        )
    };
    let gw = Gw::start("", &routes("none")).await;
    let mut c = Client::connect(&gw).await;
    c.send(&get("/app/headers", "")).await;
    assert_eq!(c.answer().await.map(|a| a.status), Some(200));
    gw.reload(&common::config_text(gw.dir.path(), "", &routes("jwt"))).await.unwrap();
    c.send(&get("/app/headers", "")).await;
    assert_eq!(
        c.answer().await.map(|a| a.status),
        Some(401),
        "the old config admitted a request after the reload"
    );
    assert_eq!(app.seen().len(), 1);
}
