//! Active health checks and drain (DESIGN.md section 13), against real upstreams on port
//! 0 through real TLS: `health_check` takes an upstream out after 3 failed checks and
//! back after 2 passes (a 5xx, a slow answer or a redirect fails; https for `wss://`);
//! `POST /v1/upstreams/drain` moves new sessions and requests elsewhere, lets in-flight
//! requests finish and closes live sessions with 1012 spread over `over`; `DELETE`
//! brings the upstream back; with every upstream out clients get 503.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::net::TcpListener;

const ADMIN_TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";
const LIMITS: &str = "[limits]\nhttp_rate_per_ip = \"1000/s\"\nhttp_burst_per_ip = 1000\n";

/// What `/healthz` answers.
const OK: u8 = 0;
const FAIL: u8 = 1;
const SLOW: u8 = 2;
const REDIRECT: u8 = 3;
const HUGE: u8 = 4;

/// A small HTTP app: `/healthz` as `mode` says, `/app/*` answers which app it is,
/// `/app/poll` answers after `release` (a long poll).
#[derive(Clone)]
struct App {
    addr: SocketAddr,
    name: &'static str,
    mode: Arc<AtomicU8>,
    app_requests: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
}

impl App {
    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

type Resp = hyper::Response<BoxBody<Bytes, Infallible>>;

fn answer(status: u16, body: impl Into<Bytes>) -> Resp {
    let mut r = hyper::Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r
}

async fn handle(req: hyper::Request<hyper::body::Incoming>, app: App) -> Result<Resp, Infallible> {
    if req.uri().path() == "/healthz" {
        return Ok(match app.mode.load(Ordering::Relaxed) {
            OK => answer(200, "ok"),
            SLOW => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                answer(200, "late")
            }
            REDIRECT => {
                let mut r = answer(302, "");
                r.headers_mut().insert("location", "/elsewhere".parse().unwrap());
                r
            }
            HUGE => {
                // A 2xx with an endless body: the check passes on the status, reads none of it.
                let chunks = futures_util::stream::repeat_with(|| Ok(hyper::body::Frame::data(Bytes::from(vec![b'x'; 65536]))));
                hyper::Response::new(http_body_util::StreamBody::new(chunks).boxed())
            }
            _ => answer(503, "sick"),
        });
    }
    app.app_requests.fetch_add(1, Ordering::Relaxed);
    if req.uri().path() == "/app/poll" {
        app.release.notified().await;
    }
    Ok(answer(200, app.name))
}

async fn app(name: &'static str, tls: Option<tokio_rustls::TlsAcceptor>) -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = App {
        addr: listener.local_addr().unwrap(),
        name,
        mode: Arc::default(),
        app_requests: Arc::default(),
        release: Arc::default(),
    };
    let a = app.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (a, tls) = (a.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, a.clone()));
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    None => http.serve_connection(hyper_util::rt::TokioIo::new(s), svc).await,
                    Some(acc) => {
                        let Ok(s) = acc.accept(s).await else { return };
                        http.serve_connection(hyper_util::rt::TokioIo::new(s), svc).await
                    }
                };
            });
        }
    });
    app
}

/// A gateway with `routes` and the admin API on.
async fn gateway(routes: &str) -> (Gw, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let line = format!("listen = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n", token_file.display());
    let gw = Gw::start_with("", &format!("{LIMITS}\n{routes}"), |t| {
        t.replacen("[admin]\nlisten = \"127.0.0.1:0\"\n", &format!("[admin]\n{line}"), 1)
    })
    .await;
    (gw, dir)
}

async fn admin(gw: &Gw, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n");
    let (status, text) = http_request(gw.admin, method, path, &auth, body).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// The `GET /v1/upstreams` entry of upstream `index` of `route`.
async fn listed(gw: &Gw, route: &str, index: usize) -> serde_json::Value {
    let (status, v) = admin(gw, "GET", "/v1/upstreams", "").await;
    assert_eq!(status, 200);
    v["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["route"] == route && u["index"] == index)
        .cloned()
        .unwrap_or_else(|| panic!("{route}/{index} not listed: {v}"))
}

async fn wait_state(gw: &Gw, route: &str, index: usize, state: &str) {
    wait_until(&format!("{route}/{index} is {state}"), TIMEOUT, || async {
        listed(gw, route, index).await["state"] == state
    })
    .await;
}

fn drain_body(route: &str, upstream: &str, over: &str) -> String {
    format!(r#"{{"route":"{route}","upstream":"{upstream}","over":"{over}"}}"#)
}

/// One plain request through the gateway on a new TLS connection: (status, headers, body).
async fn request(gw: &Gw, path: &str, cookie: Option<&str>) -> (u16, http::HeaderMap, String) {
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(gw.tls()).connect(name, tcp).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", "localhost");
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = tokio::time::timeout(
        TIMEOUT,
        sender.send_request(req.body(http_body_util::Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("no answer in time")
    .unwrap();
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(TIMEOUT, body.collect()).await.unwrap().unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&body).to_string())
}

fn checks(route: &str, index: usize, result: &str) -> String {
    format!("wsgate_upstream_health_checks_total{{route=\"{route}\",upstream=\"{index}\",result=\"{result}\"}}")
}

#[tokio::test]
async fn a_failing_health_check_takes_an_upstream_out_after_3_failures_and_2_passes_bring_it_back() {
    let (a, b) = (app("a", None).await, app("b", None).await);
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath = \"/app/*\"\nupstreams = [\"{}\", \"{}\"]\nauth = \"none\"\nhttp = true\n\
         health_check = {{ path = \"/healthz\", interval = \"200ms\", timeout = \"150ms\" }}\n",
        a.url(),
        b.url()
    );
    let (gw, _dir) = gateway(&routes).await;
    gw.wait_metric_min(&checks("app", 0, "pass"), 2.0).await;
    assert_eq!(listed(&gw, "app", 0).await["state"], "up");
    // Each way to fail: a 5xx, an answer slower than `timeout`, a redirect (not followed).
    for mode in [FAIL, SLOW, REDIRECT] {
        let fails_before = gw.metric(&checks("app", 0, "fail")).await;
        a.mode.store(mode, Ordering::Relaxed);
        wait_state(&gw, "app", 0, "down").await;
        let fails = gw.metric(&checks("app", 0, "fail")).await - fails_before;
        assert!(fails >= 3.0, "mode {mode}: out after {fails} failures");
        let entry = listed(&gw, "app", 0).await;
        assert_eq!(entry["healthy"], false);
        gw.wait_metric(r#"wsgate_upstream_up{route="app",upstream="0"}"#, 0.0).await;
        // Out: every request goes to b.
        let before = a.app_requests.load(Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(request(&gw, "/app/x", None).await.2, "b");
        }
        assert_eq!(a.app_requests.load(Ordering::Relaxed), before);
        // Back in after passes.
        let passes_before = gw.metric(&checks("app", 0, "pass")).await;
        a.mode.store(OK, Ordering::Relaxed);
        wait_state(&gw, "app", 0, "up").await;
        let passes = gw.metric(&checks("app", 0, "pass")).await - passes_before;
        assert!(passes >= 2.0, "mode {mode}: back after {passes} passes");
        gw.wait_metric(r#"wsgate_upstream_up{route="app",upstream="0"}"#, 1.0).await;
    }
    // A 2xx with an endless body passes, and the check does not hang on the body.
    a.mode.store(HUGE, Ordering::Relaxed);
    let passes = gw.metric(&checks("app", 0, "pass")).await;
    gw.wait_metric_min(&checks("app", 0, "pass"), passes + 3.0).await;
    assert_eq!(listed(&gw, "app", 0).await["state"], "up");
    a.mode.store(OK, Ordering::Relaxed);
    // Both out: 503 with Retry-After, nothing forwarded.
    a.mode.store(FAIL, Ordering::Relaxed);
    b.mode.store(FAIL, Ordering::Relaxed);
    wait_state(&gw, "app", 0, "down").await;
    wait_state(&gw, "app", 1, "down").await;
    let (status, headers, _) = request(&gw, "/app/x", None).await;
    assert_eq!(status, 503);
    assert!(headers.get("retry-after").is_some(), "{headers:?}");
    assert_eq!(
        http_get(gw.admin, "/readyz").await.0,
        503,
        "a route with no upstream in is not ready"
    );
    // A reload that removes health_check forgets the verdict; the checkers stop.
    let plain = routes.replace(
        "health_check = { path = \"/healthz\", interval = \"200ms\", timeout = \"150ms\" }\n",
        "",
    );
    let mut cfg = gw.config.clone();
    cfg.routes = wsgate::Config::from_toml_str(&plain, "t").unwrap().routes;
    gw.reload_config(cfg).await.unwrap();
    assert_eq!(listed(&gw, "app", 0).await["state"], "up");
    let total = gw.metric(&checks("app", 0, "fail")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(gw.metric(&checks("app", 0, "fail")).await, total, "a checker outlived its config");
}

#[tokio::test]
async fn a_wss_upstream_is_checked_over_https_with_the_routes_trust_anchors() {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let dir = tempfile::tempdir().unwrap();
    write_ca_signed_server_cert(dir.path(), "app");
    let certs = CertificateDer::pem_file_iter(dir.path().join("app.crt"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.path().join("app.key")).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let a = app("a", Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath = \"/app/*\"\nupstreams = [\"wss://localhost:{}\"]\nupstream_ca = \"{}\"\nauth = \"none\"\nhttp = true\n\
         health_check = {{ path = \"/healthz\", interval = \"200ms\", timeout = \"150ms\" }}\n",
        a.addr.port(),
        dir.path().join("app-ca.pem").display()
    );
    let (gw, _d) = gateway(&routes).await;
    gw.wait_metric_min(&checks("app", 0, "pass"), 2.0).await;
    assert_eq!(gw.metric(&checks("app", 0, "fail")).await, 0.0);
    a.mode.store(FAIL, Ordering::Relaxed);
    wait_state(&gw, "app", 0, "down").await;
}

#[test]
fn bad_health_check_keys_are_config_errors_naming_key_and_line() {
    let route = |hc: &str| {
        format!("[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"ws://127.0.0.1:1\"]\nauth = \"none\"\nhealth_check = {{ {hc} }}\n")
    };
    for (hc, key) in [
        ("path = \"healthz\"", "routes.health_check.path"),
        ("path = \"//evil.example/x\"", "routes.health_check.path"),
        ("path = \"/a b\"", "routes.health_check.path"),
        ("path = \"/a\\r\\nHost: x\"", "routes.health_check.path"),
        ("path = \"/h\", interval = \"0s\"", "routes.health_check.interval"),
        ("path = \"/h\", interval = \"2h\"", "routes.health_check.interval"),
        ("path = \"/h\", timeout = \"0s\"", "routes.health_check.timeout"),
        ("path = \"/h\", interval = \"1s\", timeout = \"1s\"", "routes.health_check.timeout"),
    ] {
        let text = route(hc);
        let e = wsgate::Config::from_toml_str(&text, "t.toml").expect_err(&text);
        assert_eq!((e.key.as_str(), e.line), (key, Some(6)), "{e}\n{text}");
    }
    for (hc, key) in [("path = \"/h\", every = \"1s\"", "every"), ("interval = \"1s\"", "path")] {
        let e = wsgate::Config::from_toml_str(&route(hc), "t.toml").expect_err(hc);
        assert!(e.to_string().contains(key), "{e}");
    }
    let c = wsgate::Config::from_toml_str(&route("path = \"/healthz?full=1\""), "t.toml").unwrap();
    let h = c.routes[0].health_check.as_ref().unwrap();
    assert_eq!(
        (h.path.as_str(), h.interval, h.timeout),
        ("/healthz?full=1", Duration::from_secs(5), Duration::from_secs(2))
    );
}

#[tokio::test]
async fn a_drain_moves_new_sessions_and_closes_live_ones_with_1012_spread_over_over() {
    let (a, b) = (upstream(Behaviour::Echo).await, upstream(Behaviour::Echo).await);
    let routes = format!(
        "[[routes]]\nname = \"ws\"\npath = \"/ws\"\nupstreams = [\"{}\", \"{}\"]\nauth = \"none\"\n",
        a.url(),
        b.url()
    );
    let (gw, _dir) = gateway(&routes).await;
    // b drained (nothing on it): the ten sessions all go to a.
    let (status, v) = admin(&gw, "POST", "/v1/upstreams/drain", &drain_body("ws", &b.url(), "0s")).await;
    assert_eq!((status, &v["changed"]), (202, &serde_json::Value::Bool(true)), "{v}");
    let mut on_a = Vec::new();
    for _ in 0..10 {
        let mut ws = gw.connect("/ws").await;
        assert_eq!(roundtrip(&mut ws, "x").await, "x");
        on_a.push(ws);
    }
    assert_eq!((a.requests(), b.requests()), (10, 0));
    let entry = listed(&gw, "ws", 1).await;
    assert_eq!((&entry["state"], &entry["healthy"]), (&"drained".into(), &true.into()), "{entry}");
    assert_eq!(listed(&gw, "ws", 0).await["sessions"], 10);
    gw.wait_metric(r#"wsgate_upstream_up{route="ws",upstream="1"}"#, 0.0).await;
    // b back; a drained over 2 s: answered at once.
    let (status, _) = admin(&gw, "DELETE", "/v1/upstreams/drain", &drain_body("ws", &b.url(), "0s")).await;
    assert_eq!(status, 200);
    let started = Instant::now();
    let (status, v) = admin(&gw, "POST", "/v1/upstreams/drain", &drain_body("ws", &a.url(), "2s")).await;
    assert_eq!(status, 202, "{v}");
    assert!(started.elapsed() < Duration::from_millis(500), "the drain was not answered at once");
    // New sessions go to b while a's sessions close.
    let mut fresh = gw.connect("/ws").await;
    assert_eq!(roundtrip(&mut fresh, "new").await, "new");
    assert_eq!((a.requests(), b.requests()), (10, 1));
    let closes = futures_util::future::join_all(on_a.into_iter().map(|mut ws| async move {
        let (code, reason) = close_code(&mut ws).await;
        (code, reason, started.elapsed())
    }))
    .await;
    let mut times: Vec<Duration> = closes
        .iter()
        .map(|(code, reason, t)| {
            assert_eq!(*code, 1012, "{reason}");
            *t
        })
        .collect();
    times.sort();
    // Points at 0.1 s, 0.3 s, … 1.9 s: spread, not a herd.
    assert!(times[0] >= Duration::from_millis(50), "first close at {:?}", times[0]);
    assert!(times[9] <= Duration::from_secs(3), "last close at {:?}", times[9]);
    assert!(times[9] - times[0] >= Duration::from_millis(1200), "closes not spread: {times:?}");
    for w in times.windows(4) {
        assert!(w[3] - w[0] >= Duration::from_millis(200), "four closes within 200 ms: {times:?}");
    }
    assert_eq!(a.first_close().await.map(|c| c.0), Some(1012), "the upstream side gets 1012 too");
    gw.wait_metric(r#"wsgate_closes_total{route="ws",code="1012",initiator="gateway"}"#, 10.0)
        .await;
    assert_eq!(roundtrip(&mut fresh, "still").await, "still");
    // Both out: 503 with Retry-After.
    admin(&gw, "POST", "/v1/upstreams/drain", &drain_body("ws", &b.url(), "10s")).await;
    let refused = gw.refusal("/ws", &gw.options(None)).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    assert_eq!(
        http_get(gw.admin, "/readyz").await.0,
        200,
        "a drain alone never makes the instance unready"
    );
    // Undrained: sessions come back; the session on b was left alone by undraining it.
    admin(&gw, "DELETE", "/v1/upstreams/drain", &drain_body("ws", &b.url(), "")).await;
    let (status, _) = admin(&gw, "DELETE", "/v1/upstreams/drain", &drain_body("ws", &a.url(), "")).await;
    assert_eq!(status, 200);
    assert_eq!(roundtrip(&mut fresh, "kept").await, "kept");
    let mut back = gw.connect("/ws").await;
    assert_eq!(roundtrip(&mut back, "back").await, "back");
    // A drain survives a reload that keeps the upstream.
    admin(&gw, "POST", "/v1/upstreams/drain", &drain_body("ws", &a.url(), "1m")).await;
    gw.reload_config(gw.config.clone()).await.unwrap();
    assert_eq!(listed(&gw, "ws", 0).await["state"], "drained");
}

#[tokio::test]
async fn a_drained_upstream_finishes_in_flight_requests_and_sticky_clients_move_with_a_new_cookie() {
    let (a, b) = (app("a", None).await, app("b", None).await);
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath = \"/app/*\"\nupstreams = [\"{}\", \"{}\"]\nauth = \"none\"\nhttp = true\nbalance = \"sticky\"\n",
        a.url(),
        b.url()
    );
    let (gw, _dir) = gateway(&routes).await;
    let (_, headers, first) = request(&gw, "/app/x", None).await;
    let cookie = headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let (mine, other) = if first == "a" { (&a, &b) } else { (&b, &a) };
    // A long poll in flight on the cookie's upstream when it is drained.
    let poll = tokio::time::timeout(TIMEOUT, request(&gw, "/app/poll", Some(&cookie)));
    let released = async {
        wait_until("the poll reached its upstream", TIMEOUT, || async {
            mine.app_requests.load(Ordering::Relaxed) == 2
        })
        .await;
        let (status, _) = admin(&gw, "POST", "/v1/upstreams/drain", &drain_body("app", &mine.url(), "5m")).await;
        assert_eq!(status, 202);
        assert_eq!(listed(&gw, "app", if first == "a" { 0 } else { 1 }).await["in_flight"], 1);
        // The cookie's upstream is drained: the client moves and gets a new cookie.
        let (status, headers, body) = request(&gw, "/app/x", Some(&cookie)).await;
        assert_eq!((status, body.as_str()), (200, other.name));
        let moved = headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
        assert_ne!(moved, cookie);
        let (_, headers, body) = request(&gw, "/app/x", Some(&moved)).await;
        assert_eq!(body, other.name);
        assert!(headers.get("set-cookie").is_none());
        mine.release.notify_one();
    };
    let (polled, ()) = tokio::join!(poll, released);
    let (status, _, body) = polled.expect("the in-flight request did not finish");
    assert_eq!(
        (status, body.as_str()),
        (200, mine.name),
        "the in-flight request finished on the drained upstream"
    );
    // Back in: the old cookie is honoured again.
    admin(&gw, "DELETE", "/v1/upstreams/drain", &drain_body("app", &mine.url(), "")).await;
    assert_eq!(request(&gw, "/app/x", Some(&cookie)).await.2, mine.name);
}

#[tokio::test]
async fn drain_bodies_are_checked_and_unknown_targets_are_404() {
    let (gw, _dir) = gateway(ECHO_ROUTE).await;
    let no_token = http_request(
        gw.admin,
        "POST",
        "/v1/upstreams/drain",
        "",
        &drain_body("echo", "builtin:echo", "1s"),
    )
    .await;
    assert_eq!(no_token.0, 401);
    for (body, want) in [
        ("", 400),
        ("{", 400),
        ("[]", 400),
        (r#"{"route":"echo"}"#, 400),
        (r#"{"route":"echo","upstream":"builtin:echo","over":"1s","extra":1}"#, 400),
        (r#"{"route":"echo","upstream":"builtin:echo","over":"25h"}"#, 400),
        (r#"{"route":"echo","upstream":"builtin:echo","over":"-1s"}"#, 400),
        (r#"{"route":"echo","upstream":"builtin:echo","over":"99999999999999999999d"}"#, 400),
        (r#"{"route":"echo","upstream":"builtin:echo","over":5}"#, 400),
        (r#"{"route":"","upstream":"builtin:echo"}"#, 400),
        (r#"{"route":"nope","upstream":"builtin:echo"}"#, 404),
        (r#"{"route":"echo","upstream":"ws://127.0.0.1:1"}"#, 404),
        (r#"{"route":"echo","upstream":"BUILTIN:ECHO"}"#, 404),
    ] {
        let (status, v) = admin(&gw, "POST", "/v1/upstreams/drain", body).await;
        assert_eq!(status, want, "{body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    let huge = format!(r#"{{"route":"{}","upstream":"builtin:echo"}}"#, "r".repeat(5000));
    assert_eq!(admin(&gw, "POST", "/v1/upstreams/drain", &huge).await.0, 413);
    assert_eq!(listed(&gw, "echo", 0).await["state"], "up");
    // 24 h is the longest drain; a drain without `over` takes the default.
    let (status, v) = admin(&gw, "POST", "/v1/upstreams/drain", &drain_body("echo", "builtin:echo", "24h")).await;
    assert_eq!((status, v["over_ms"].as_u64()), (202, Some(86_400_000)), "{v}");
    let (status, v) = admin(&gw, "POST", "/v1/upstreams/drain", r#"{"route":"echo","upstream":"builtin:echo"}"#).await;
    assert_eq!((status, &v["changed"]), (202, &false.into()), "a second drain keeps the first: {v}");
    gw.wait_metric(r#"wsgate_admin_requests_total{action="drain",result="invalid"}"#, 11.0)
        .await;
    gw.wait_metric(r#"wsgate_admin_requests_total{action="drain",result="not_found"}"#, 3.0)
        .await;
}
