//! Before the 101: routing, upgrade validation, head limits, timeouts, upstream
//! failures, and the request the upstream sees.

mod common;
use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Open TLS to the gateway and send raw bytes; returns everything the gateway answered.
async fn raw_exchange(gw: &Gw, request: &[u8]) -> String {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(gw.tls()).connect(name, tcp).await.unwrap();
    tls.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut buf))
        .await
        .expect("gateway kept the connection open");
    String::from_utf8_lossy(&buf).to_string()
}

fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn plain_request_gets_426_and_unknown_path_404() {
    let gw = Gw::echo().await;
    let resp = raw_exchange(&gw, b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("upgrade: websocket"), "{resp}");
    let resp = raw_exchange(&gw, b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let resp = raw_exchange(&gw, upgrade_request("/nope/deeper", "").as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="not_found"}"#, 2.0)
        .await;
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="bad_request"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn malformed_upgrades_get_400_and_the_body_never_echoes_input() {
    let gw = Gw::start("", &route("open", "/open", "builtin:echo", "none")).await;
    let bad_key = "GET /open HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: <script>evil</script>\r\n\r\n";
    let resp = raw_exchange(&gw, bad_key.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(!resp.contains("evil"), "{resp}");
    let garbage = raw_exchange(&gw, b"\x00\x01GARBAGE\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let post = upgrade_request("/open", "").replacen("GET", "POST", 1);
    assert!(raw_exchange(&gw, post.as_bytes()).await.starts_with("HTTP/1.1 400"));
    let v8 = upgrade_request("/open", "").replace("Version: 13", "Version: 8");
    let resp = raw_exchange(&gw, v8.as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 426") && resp.to_ascii_lowercase().contains("sec-websocket-version: 13"),
        "{resp}"
    );
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="bad_request"}"#, 4.0)
        .await;
}

#[tokio::test]
async fn pipelined_request_behind_a_refusal_is_never_served() {
    let gw = Gw::echo().await;
    // No token → 401, and the second request on the same connection must not be read.
    let two = format!(
        "{}{}",
        upgrade_request("/echo", ""),
        "GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n"
    );
    let resp = raw_exchange(&gw, two.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    assert_eq!(resp.matches("HTTP/1.1").count(), 1, "{resp}");
}

#[tokio::test]
async fn oversized_head_gets_431() {
    let gw = Gw::start("max_request_head = \"8KiB\"", ECHO_ROUTE).await;
    let big = upgrade_request("/echo", &format!("X-Big: {}\r\n", "a".repeat(20_000)));
    let resp = raw_exchange(&gw, big.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="bad_request"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn slow_handshakes_are_cut_at_handshake_timeout() {
    let gw = Gw::start("handshake_timeout = \"400ms\"", ECHO_ROUTE).await;
    // 1. TCP only, no TLS ClientHello.
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(TIMEOUT, tcp.read(&mut buf))
        .await
        .expect("not cut")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        t0.elapsed() >= Duration::from_millis(350) && t0.elapsed() < Duration::from_secs(3),
        "{:?}",
        t0.elapsed()
    );
    // 2. TLS done, request head dripped one byte at a time and never finished.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(gw.tls()).connect(name, tcp).await.unwrap();
    let t0 = std::time::Instant::now();
    let head = upgrade_request("/echo", "");
    let mut cut = false;
    for b in head.as_bytes().iter().take(60) {
        if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
            cut = true;
            break;
        }
        // Kept: a client dripping its request head slowly is the point of this case.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !cut {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut rest)).await.expect("not cut");
    }
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="handshake_timeout"}"#, 2.0)
        .await;
}

#[tokio::test]
async fn upstream_down_gets_502_and_hanging_upstream_504() {
    // A port with nothing listening: bind, learn the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let hang = upstream(Behaviour::Hang).await;
    let routes = format!(
        "{}{}",
        route("down", "/down", &format!("ws://{dead}"), "none"),
        route("hang", "/hang", &hang.url(), "none")
    );
    let gw = Gw::start("upstream_timeout = \"300ms\"", &routes).await;
    let opts = gw.options(None);
    assert_eq!(gw.refusal("/down", &opts).await.status(), 502);
    assert_eq!(gw.refusal("/hang", &opts).await.status(), 504);
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="upstream_unavailable"}"#, 1.0)
        .await;
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="upstream_timeout"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn upstream_sees_a_clean_request_and_chosen_protocol_returns() {
    let up = upstream(Behaviour::Echo).await;
    let routes = format!(
        "{}{}",
        route("chat", "/chat/*", &format!("{}/app", up.url()), "jwt"),
        route("plain", "/plain", &up.url(), "jwt")
    );
    let gw = Gw::start("", &routes).await;
    let mut opts = gw.options(Some(gw.token("alice")));
    opts.protocols = vec!["superchat".into(), "chat".into()];
    opts.headers = vec![
        ("X-Forwarded-For".into(), "6.6.6.6".into()),
        ("X-Forwarded-Proto".into(), "http".into()),
        ("Keep-Alive".into(), "timeout=5".into()),
        ("X-App".into(), "kept".into()),
    ];
    let (mut ws, resp) = gw.try_connect("/chat/room1?x=1&y=2", &opts).await.unwrap();
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "chat");
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
    let (uri, headers) = up.log.lock().unwrap().requests[0].clone();
    assert_eq!(uri, "/app/room1?x=1&y=2");
    let get = |n: &str| headers.iter().filter(|(k, _)| k == n).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert_eq!(get("x-forwarded-for"), vec!["127.0.0.1".to_string()]);
    assert_eq!(get("x-forwarded-proto"), vec!["https".to_string()]);
    assert!(get("keep-alive").is_empty());
    assert_eq!(get("x-app"), vec!["kept".to_string()]);
    assert!(get("authorization").is_empty(), "the token went upstream");
    assert_eq!(get("sec-websocket-protocol"), vec!["superchat, chat".to_string()]);

    // Token in the query: removed from the upstream URL; path without upstream path kept.
    let token = gw.token("bob");
    let (_ws, _) = gw
        .try_connect(&format!("/plain?a=1&access_token={token}&b=2"), &gw.options(None))
        .await
        .unwrap();
    assert_eq!(up.log.lock().unwrap().requests[1].0, "/plain?a=1&b=2");
}

#[tokio::test]
async fn headers_named_in_connection_are_dropped() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &route("open", "/open", &up.url(), "none")).await;
    let req = upgrade_request("/open", "X-Secret-Hop: drop me\r\nX-Kept: yes\r\n")
        .replace("Connection: Upgrade", "Connection: Upgrade, X-Secret-Hop");
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(gw.tls()).connect(name, tcp).await.unwrap();
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(TIMEOUT, tls.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    assert_eq!(up.header(0, "x-secret-hop"), None);
    assert_eq!(up.header(0, "x-kept").as_deref(), Some("yes"));
}

#[tokio::test]
async fn global_connection_cap_answers_503() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("max_connections = 2", &route("r", "/r", &up.url(), "none")).await;
    let _a = gw.connect("/r").await;
    let _b = gw.connect("/r").await;
    let resp = gw.refusal("/r", &gw.options(None)).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="global_conn_limit"}"#, 1.0)
        .await;
    assert_eq!(up.requests(), 2, "the refused connection reached the upstream");
    drop(_a);
    // A slot frees up once a session ends (right after its close is counted): one attempt.
    wait_sessions_ended(&gw, "r", 1.0).await;
    assert!(gw.try_connect("/r", &gw.options(None)).await.is_ok(), "slot never freed");
}

#[tokio::test]
async fn admin_endpoints() {
    let gw = Gw::echo().await;
    assert_eq!(http_get(gw.admin, "/healthz").await.0, 200);
    assert_eq!(http_get(gw.admin, "/readyz").await.0, 200);
    assert_eq!(http_get(gw.admin, "/other").await.0, 404);
    let (status, body) = http_get(gw.admin, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "wsgate_connections_accepted_total",
        "wsgate_build_info",
        "wsgate_config_reloads_total",
    ] {
        assert!(body.contains(&format!("# HELP {name}")), "{name} has no HELP\n{body}");
    }
    // No label ever holds an IP, a user or a path.
    let mut ws = gw.connect("/echo").await;
    assert_eq!(roundtrip(&mut ws, "x").await, "x");
    ws.close(None).await.unwrap();
    let _ = close_code(&mut ws).await;
    gw.wait_metric(r#"wsgate_closes_total{route="echo",code="1005",initiator="client"}"#, 1.0)
        .await;
    let text = gw.metrics_text().await;
    assert!(
        !text.contains("127.0.0.1") && !text.contains("alice") && !text.contains("/echo"),
        "{text}"
    );
}

#[tokio::test]
async fn dot_segments_and_encoded_slashes_never_reach_an_open_route() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &route("public", "/public/*", &up.url(), "none")).await;
    for path in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/%252e%252e/admin",
        "/public/a%2fb",
        "/public/a%5Cb",
        "/public//admin",
    ] {
        let resp = raw_exchange(&gw, upgrade_request(path, "").as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
    }
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="bad_request"}"#, 7.0)
        .await;
    assert!(up.log.lock().unwrap().requests.is_empty(), "a refused path reached the upstream");
    let (mut ws, _) = gw.try_connect("/public/room", &gw.options(None)).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "ok").await, "ok");
}

#[tokio::test]
async fn query_token_copies_and_client_forwarding_headers_are_stripped() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &route("plain", "/plain", &up.url(), "jwt")).await;
    let token = gw.token("bob");
    let mut opts = gw.options(None);
    opts.headers = vec![
        ("Forwarded".into(), "for=6.6.6.6".into()),
        ("X-Real-IP".into(), "6.6.6.6".into()),
        ("X-Forwarded-Host".into(), "evil.example".into()),
        ("X-Original-URL".into(), "/admin".into()),
    ];
    let path = format!("/plain?access_token={token}&ACCESS_TOKEN=forged&access%5Ftoken=forged2&keep=1");
    let (mut ws, _) = gw.try_connect(&path, &opts).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
    let (uri, headers) = up.log.lock().unwrap().requests[0].clone();
    assert_eq!(uri, "/plain?keep=1");
    let get = |n: &str| headers.iter().filter(|(k, _)| k == n).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert!(get("forwarded").is_empty() && get("x-forwarded-host").is_empty() && get("x-original-url").is_empty());
    assert_eq!(get("x-real-ip"), vec!["127.0.0.1".to_string()]);
}
