//! Forward auth (`[providers.NAME] kind = "forward"`): a real hyper auth endpoint that
//! checks a session cookie, a real TLS gateway, an upstream that logs its handshake.

mod common;

use common::*;
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

const OK: u8 = 0;
const LOGGED_OUT: u8 = 1;
const FAILING: u8 = 2;
const HANGING: u8 = 3;
const HUGE: u8 = 4;
const REDIRECT: u8 = 5;

#[derive(Default)]
struct Auth {
    mode: AtomicU8,
    calls: AtomicUsize,
    seen: Mutex<Vec<http::HeaderMap>>,
}

/// The app's auth endpoint: 200 with `x-user-id: alice` and `x-user-roles: admin` for
/// the cookie `session=good`, else 401 with a `WWW-Authenticate` of its own.
async fn auth_endpoint() -> (SocketAddr, Arc<Auth>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Auth::default());
    let st = state.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let st = st.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let st = st.clone();
                    async move {
                        st.calls.fetch_add(1, Ordering::SeqCst);
                        st.seen.lock().unwrap().push(req.headers().clone());
                        let logged_in = req
                            .headers()
                            .get_all(http::header::COOKIE)
                            .iter()
                            .any(|v| v.to_str().unwrap_or("").contains("session=good"));
                        let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")));
                        match st.mode.load(Ordering::SeqCst) {
                            HANGING => tokio::time::sleep(Duration::from_secs(30)).await,
                            FAILING => *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR,
                            REDIRECT => {
                                *resp.status_mut() = http::StatusCode::FOUND;
                                resp.headers_mut()
                                    .insert(http::header::LOCATION, "/login?next=%2Fapp".parse().unwrap());
                            }
                            HUGE => {
                                resp.headers_mut().insert("x-user-id", "alice".parse().unwrap());
                                resp.headers_mut().insert("x-big", "a".repeat(20_000).parse().unwrap());
                            }
                            mode if mode == OK && logged_in => {
                                resp.headers_mut().insert("x-user-id", "alice".parse().unwrap());
                                resp.headers_mut().insert("x-user-roles", "admin".parse().unwrap());
                            }
                            _ => {
                                *resp.status_mut() = http::StatusCode::UNAUTHORIZED;
                                resp.headers_mut()
                                    .insert(http::header::WWW_AUTHENTICATE, "Cookie realm=\"app\"".parse().unwrap());
                            }
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

fn forward_config(auth: SocketAddr, upstream: &str, extra: &str) -> String {
    format!(
        r#"
[providers.app]
kind = "forward"
url = "http://{auth}/ws-auth"
identity_header = "x-user-id"
copy_headers = ["x-user-id", "x-user-roles"]
timeout = "300ms"
{extra}

[[routes]]
name = "app"
path = "/app"
upstreams = ["{upstream}"]
auth = "forward"
provider = "app"
"#
    )
}

fn with_cookie(gw: &Gw, cookie: &str, extra: &[(&str, &str)]) -> wsgate::client::Options {
    let mut o = gw.options(None);
    o.headers.push(("cookie".into(), cookie.into()));
    for (k, v) in extra {
        o.headers.push(((*k).into(), (*v).into()));
    }
    o
}

#[tokio::test]
async fn admitted_with_identity_and_copies_and_no_client_copies() {
    let (auth, state) = auth_endpoint().await;
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &forward_config(auth, &up.url(), "")).await;
    let forged = [
        ("x-user-id", "mallory"),
        ("X_User_Roles", "root"),
        ("x-forwarded-uri", "/evil"),
        ("x-original-method", "DELETE"),
        ("x-forwarded-host", "evil.example"),
    ];
    let opts = with_cookie(&gw, "session=good", &forged);
    let url = format!("{}?room=1", gw.url("/app"));
    let (mut ws, _) = wsgate::client::connect(&url, &opts).await.expect("admitted");
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");

    assert_eq!(up.header(0, "x-user-id").as_deref(), Some("alice"));
    assert_eq!(up.header(0, "x-user-roles").as_deref(), Some("admin"));
    assert!(
        up.header(0, "cookie").is_some_and(|c| c.contains("session=good")),
        "the app reads its own cookie"
    );
    let headers = up.log.lock().unwrap().requests[0].1.clone();
    for (k, v) in &headers {
        assert!(
            !["mallory", "root", "/evil", "DELETE", "evil.example"].contains(&v.as_str()),
            "{k}: {v} reached upstream"
        );
    }

    let seen = state.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.get("x-forwarded-uri").unwrap(), "/app?room=1");
    assert_eq!(seen.get("x-original-method").unwrap(), "GET");
    assert_eq!(seen.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(seen.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(seen.get("x-forwarded-host").unwrap(), "localhost");
    assert_eq!(seen.get_all("x-forwarded-uri").iter().count(), 1);
    assert!(
        seen.get("x-user-id").is_none() && seen.get("x_user_roles").is_none(),
        "only pass_headers go to the endpoint"
    );
    gw.wait_metric("wsgate_provider_requests_total{provider=\"app\",result=\"allow\"}", 1.0)
        .await;
}

#[tokio::test]
async fn refusals_pass_through_and_failures_are_503() {
    let (auth, state) = auth_endpoint().await;
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &forward_config(auth, &up.url(), "")).await;

    let resp = gw.refusal("/app", &with_cookie(&gw, "session=bad", &[])).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers().get("www-authenticate").unwrap(), "Cookie realm=\"app\"");

    for (mode, result) in [(FAILING, "error"), (HANGING, "timeout"), (HUGE, "error")] {
        state.mode.store(mode, Ordering::SeqCst);
        let resp = gw.refusal("/app", &with_cookie(&gw, "session=good", &[])).await;
        assert_eq!(resp.status(), 503, "mode {mode}");
        let series = format!("wsgate_provider_requests_total{{provider=\"app\",result=\"{result}\"}}");
        assert!(gw.metric(&series).await >= 1.0, "{series}");
    }
    assert_eq!(up.requests(), 0, "nothing reached the upstream");
    let text = gw.metrics_text().await;
    assert!(!text.contains("session=good"), "no cookie in metrics");
}

#[tokio::test]
async fn a_cached_answer_saves_the_second_call() {
    let (auth, state) = auth_endpoint().await;
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &forward_config(auth, &up.url(), "cache = \"30s\"")).await;
    for _ in 0..2 {
        let opts = with_cookie(&gw, "session=good", &[]);
        let (mut ws, _) = wsgate::client::connect(&gw.url("/app"), &opts).await.expect("admitted");
        assert_eq!(roundtrip(&mut ws, "x").await, "x");
    }
    assert_eq!(state.calls.load(Ordering::SeqCst), 1);
    gw.wait_metric("wsgate_provider_requests_total{provider=\"app\",result=\"cache_hit\"}", 1.0)
        .await;
    // Another cookie is another key.
    let resp = gw.refusal("/app", &with_cookie(&gw, "session=other", &[])).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(state.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn logout_closes_the_socket_and_an_unreachable_endpoint_does_not() {
    let (auth, state) = auth_endpoint().await;
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &forward_config(auth, &up.url(), "recheck = \"200ms\"")).await;
    let opts = with_cookie(&gw, "session=good", &[]);
    let (mut ws, _) = wsgate::client::connect(&gw.url("/app"), &opts).await.expect("admitted");

    state.mode.store(FAILING, Ordering::SeqCst);
    let before = state.calls.load(Ordering::SeqCst);
    wait_until("two failed rechecks", TIMEOUT, || async {
        state.calls.load(Ordering::SeqCst) >= before + 2
    })
    .await;
    assert_eq!(roundtrip(&mut ws, "still here").await, "still here");

    state.mode.store(LOGGED_OUT, Ordering::SeqCst);
    let (code, _) = close_code(&mut ws).await;
    assert_eq!(code, 1008);
}

/// One plain HTTP/1.1 GET over TLS to the gateway; the answer's head, as text.
async fn plain_get(gw: &Gw, path: &str, cookie: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(gw.tls()).connect(name, tcp).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut buf)).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    text.split_once("\r\n\r\n").map_or(text.clone(), |(h, _)| h.to_string())
}

#[tokio::test]
async fn a_login_redirect_passes_to_a_plain_request_and_is_401_for_an_upgrade() {
    let (auth, state) = auth_endpoint().await;
    let gw = Gw::start(
        "",
        &forward_config(auth, "builtin:echo", "").replace("provider = \"app\"", "provider = \"app\"\nhttp = true"),
    )
    .await;
    state.mode.store(REDIRECT, Ordering::SeqCst);

    let head = plain_get(&gw, "/app", "session=none").await;
    assert!(head.starts_with("HTTP/1.1 302"), "{head}");
    assert!(head.to_ascii_lowercase().contains("location: /login?next=%2fapp"), "{head}");

    let resp = gw.refusal("/app", &with_cookie(&gw, "session=none", &[])).await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("location").is_none());

    // A logged-in browser's request passes to the app.
    state.mode.store(OK, Ordering::SeqCst);
    let head = plain_get(&gw, "/app", "session=good").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// The admin API kicks a forward provider's user by name (`"provider"` names any kind of
/// provider for a kick); a revocation, which names a JWT's `jti`, takes a jwt provider only.
#[tokio::test]
async fn an_admin_kick_names_the_forward_provider() {
    const ADMIN_TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";
    let (auth, _state) = auth_endpoint().await;
    let up = upstream(Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let line = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n", token_file.display());
    let gw = Gw::start_with("", &forward_config(auth, &up.url(), ""), |t| {
        t.replacen("[admin]\nlisten = \"127.0.0.1:0\"\n", &line, 1)
    })
    .await;
    let admin = |method: &'static str, path: &'static str, body: &'static str| {
        let addr = gw.admin;
        async move {
            let head = format!("Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n");
            let (status, text) = http_request(addr, method, path, &head, body).await;
            (
                status,
                serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
            )
        }
    };
    let (mut ws, _) = wsgate::client::connect(&gw.url("/app"), &with_cookie(&gw, "session=good", &[]))
        .await
        .expect("admitted");
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
    let (status, body) = admin("GET", "/v1/sessions?provider=app", "").await;
    assert_eq!((status, body["sessions"][0]["sub"].as_str()), (200, Some("alice")), "{body}");

    // [jwt]'s alice is another user: nothing closed.
    let (status, body) = admin("POST", "/v1/kick", r#"{"sub":"alice"}"#).await;
    assert_eq!((status, body["sessions"].as_u64()), (200, Some(0)), "{body}");
    let (status, body) = admin("POST", "/v1/revocations", r#"{"jti":"j-1","provider":"app"}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(roundtrip(&mut ws, "still").await, "still");

    let (status, body) = admin("POST", "/v1/kick", r#"{"sub":"alice","provider":"app"}"#).await;
    assert_eq!((status, body["sessions"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(close_code(&mut ws).await.0, 1008);
}

/// A live session's recheck asks the provider as the current config has it: a reload
/// that moves the endpoint (and turns `recheck` on for a session admitted without it)
/// sends the next rounds to the new endpoint, whose refusal closes the session.
#[tokio::test]
async fn a_reload_moves_live_rechecks_to_the_new_endpoint() {
    let (old, old_state) = auth_endpoint().await;
    let (new, new_state) = auth_endpoint().await;
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &forward_config(old, &up.url(), "")).await;
    let opts = with_cookie(&gw, "session=good", &[]);
    let (mut ws, _) = wsgate::client::connect(&gw.url("/app"), &opts).await.expect("admitted");
    assert_eq!(old_state.calls.load(Ordering::SeqCst), 1);

    let text = config_text(gw.dir.path(), "", &forward_config(new, &up.url(), "recheck = \"200ms\""));
    gw.reload(&text).await.expect("reload");
    wait_until("a recheck at the new endpoint", TIMEOUT, || async {
        new_state.calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(old_state.calls.load(Ordering::SeqCst), 1, "the old endpoint is not asked again");
    assert_eq!(roundtrip(&mut ws, "still here").await, "still here");

    new_state.mode.store(LOGGED_OUT, Ordering::SeqCst);
    let (code, _) = close_code(&mut ws).await;
    assert_eq!(code, 1008);
}

/// A reload that removes the session's provider (and so its route) closes the session:
/// nothing can vouch for its cookie any more. Sessions of other routes stay.
#[tokio::test]
async fn a_reload_that_removes_the_provider_closes_its_sessions() {
    let (auth, _state) = auth_endpoint().await;
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &format!("{}{ECHO_ROUTE}", forward_config(auth, &up.url(), ""))).await;
    let opts = with_cookie(&gw, "session=good", &[]);
    let (mut ws, _) = wsgate::client::connect(&gw.url("/app"), &opts).await.expect("admitted");
    let mut other = gw.connect("/echo").await;

    gw.reload(&config_text(gw.dir.path(), "", ECHO_ROUTE)).await.expect("reload");
    let (code, _) = close_code(&mut ws).await;
    assert_eq!(code, 1008);
    assert_eq!(roundtrip(&mut other, "jwt").await, "jwt", "a JWT session is not the provider's");
}

/// The endpoint hears the scheme the client used: `http` on a `listen_plain` listener.
#[tokio::test]
async fn x_forwarded_proto_is_http_on_a_plain_listener() {
    let (auth, state) = auth_endpoint().await;
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("listen_plain = [\"127.0.0.1:0\"]", &forward_config(auth, &up.url(), "")).await;
    let plain = gw.running.as_ref().unwrap().plain_addrs[0];
    let mut opts = wsgate::client::Options::default();
    opts.headers.push(("cookie".into(), "session=good".into()));
    let (mut ws, _) = wsgate::client::connect(&format!("ws://{plain}/app"), &opts)
        .await
        .expect("admitted on the plain listener");
    assert_eq!(roundtrip(&mut ws, "plain").await, "plain");
    let (mut wss, _) = wsgate::client::connect(&gw.url("/app"), &with_cookie(&gw, "session=good", &[]))
        .await
        .expect("admitted over TLS");
    assert_eq!(roundtrip(&mut wss, "tls").await, "tls");

    let seen = state.seen.lock().unwrap().clone();
    let protos: Vec<_> = seen.iter().map(|h| h.get("x-forwarded-proto").unwrap().clone()).collect();
    assert_eq!(protos, ["http", "https"]);
}

/// A forward auth answer carries no claims: `require_claims` on a forward route is a
/// config error naming the key and its line (it would otherwise never be checked).
#[test]
fn require_claims_on_a_forward_route_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let routes = forward_config("127.0.0.1:9".parse().unwrap(), "builtin:echo", "")
        .replace("provider = \"app\"", "provider = \"app\"\nrequire_claims = { role = \"admin\" }");
    let text = config_text(dir.path(), "", &routes);
    let e = wsgate::Config::from_toml_str(&text, "t.toml").unwrap_err();
    let line = text.lines().position(|l| l.starts_with("require_claims")).unwrap() + 1;
    assert_eq!((e.key.as_str(), e.line), ("routes.require_claims", Some(line)), "{e}");
    assert!(e.message.contains("no claims"), "{e}");
    // Without it the route loads.
    let text = config_text(dir.path(), "", &forward_config("127.0.0.1:9".parse().unwrap(), "builtin:echo", ""));
    wsgate::Config::from_toml_str(&text, "t.toml").unwrap();
}

/// The trust anchors of forward, introspection and discovery providers are watched for
/// reload (`watch_config`) like every other file the config names.
#[test]
fn provider_ca_files_are_watched() {
    let dir = tempfile::tempdir().unwrap();
    let rest = r#"
[providers.app]
kind = "forward"
url = "https://auth.example/ws-auth"
identity_header = "x-user-id"
ca_file = "/cm/forward-ca.pem"

[providers.opaque]
kind = "introspection"
url = "https://idp.example/introspect"
client_id = "wsgate"
client_secret_file = "/cm/introspect.secret"
ca_file = "/cm/introspect-ca.pem"

[providers.oidc]
kind = "jwt"
issuer = "https://idp.example"
discovery = true
algorithms = ["RS256"]
audience = ["chat"]
ca_file = "/cm/discovery-ca.pem"

[[routes]]
name = "app"
path = "/app"
upstreams = ["builtin:echo"]
auth = "forward"
provider = "app"

[[routes]]
name = "opaque"
path = "/opaque"
upstreams = ["builtin:echo"]
auth = "introspection"
provider = "opaque"

[[routes]]
name = "oidc"
path = "/oidc"
upstreams = ["builtin:echo"]
provider = "oidc"
"#;
    let text = config_text(dir.path(), "watch_config = true", rest);
    let c = wsgate::Config::from_toml_str(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    let files = c.watched_files();
    for f in [
        "/cm/forward-ca.pem",
        "/cm/introspect-ca.pem",
        "/cm/introspect.secret",
        "/cm/discovery-ca.pem",
    ] {
        assert!(files.iter().any(|p| p == std::path::Path::new(f)), "{f} not in {files:?}");
    }
}
