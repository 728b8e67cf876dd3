//! Admission control: firewall, per-IP limits, auth bans, Origin, message rate,
//! slow handshakes. Clients use distinct loopback source addresses (127.0.0.0/8).

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use std::{net::IpAddr, sync::Arc, time::Duration};
use tokio_tungstenite::tungstenite::Message;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn from(gw: &Gw, src: &str, token: Option<String>) -> wsgate::client::Options {
    let mut o = gw.options(token);
    o.source = Some(ip(src));
    o
}

/// Connect from `src`; Ok on a session, Err(None) when TCP/TLS was cut, Err(Some(status)) on an HTTP refusal.
async fn attempt(gw: &Gw, path: &str, opts: &wsgate::client::Options) -> Result<wsgate::client::ClientStream, Option<u16>> {
    match tokio::time::timeout(TIMEOUT, wsgate::client::connect(&gw.url(path), opts))
        .await
        .expect("connect hung")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(Some(resp.status().as_u16())),
        Err(_) => Err(None),
    }
}

fn open_route(up: &Upstream) -> String {
    route("r", "/r", &up.url(), "none")
}

#[tokio::test]
async fn firewall_refuses_before_tls_and_deny_wins() {
    let up = upstream(Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let deny_file = dir.path().join("deny.txt");
    std::fs::write(&deny_file, "# blocklist\n127.0.0.3\n10.0.0.0/8 # private\n").unwrap();
    let fw = format!(
        "[firewall]\ndefault = \"deny\"\nallow = [\"127.0.0.0/24\"]\ndeny = [\"127.0.0.2\"]\ndeny_files = [\"{}\"]\n",
        deny_file.display()
    );
    let gw = Gw::start("", &format!("{fw}{}", open_route(&up))).await;
    assert_eq!(attempt(&gw, "/r", &from(&gw, "127.0.0.2", None)).await.err(), Some(None));
    assert_eq!(attempt(&gw, "/r", &from(&gw, "127.0.0.3", None)).await.err(), Some(None));
    // 127.0.1.1 matches no rule: the default (deny) applies.
    assert_eq!(attempt(&gw, "/r", &from(&gw, "127.0.1.1", None)).await.err(), Some(None));
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="firewall"}"#, 3.0).await;
    assert_eq!(up.requests(), 0);
    let mut ws = attempt(&gw, "/r", &from(&gw, "127.0.0.4", None)).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "allowed").await, "allowed");
}

#[tokio::test]
async fn ipv4_rules_hold_on_a_dual_stack_listener_and_ipv6_rules_work() {
    let up = upstream(Behaviour::Echo).await;
    let fw = "[firewall]\ndeny = [\"127.0.0.5\", \"::1\"]\n";
    let gw = Gw::start_with("", &format!("{fw}{}", open_route(&up)), |t| {
        t.replace("listen = [\"127.0.0.1:0\"]", "listen = [\"[::]:0\"]")
    })
    .await;
    assert!(gw.addr.is_ipv6());
    // Seen by the kernel as ::ffff:127.0.0.5 on the [::] socket.
    let url = format!("wss://localhost:{}/r", gw.addr.port());
    let o = from(&gw, "127.0.0.5", None);
    assert!(wsgate::client::connect(&url.replace("localhost", "127.0.0.1"), &o).await.is_err());
    let mut o6 = gw.options(None);
    o6.source = Some(ip("::1"));
    let r = wsgate::client::connect(&url.replace("localhost", "[::1]"), &o6).await;
    assert!(
        matches!(r, Err(tokio_tungstenite::tungstenite::Error::Io(_))),
        "{:?}",
        r.map(|_| ())
    );
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="firewall"}"#, 2.0).await;
    let (mut ws, _) = wsgate::client::connect(&url.replace("localhost", "127.0.0.1"), &from(&gw, "127.0.0.6", None))
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut ws, "v4 via v6 socket").await, "v4 via v6 socket");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn per_ip_rate_and_concurrency_limits() {
    let up = upstream(Behaviour::Echo).await;
    let limits = "[limits]\nconnection_rate_per_ip = \"1/min\"\nconnection_burst_per_ip = 3\nmax_connections_per_ip = 2\n";
    let gw = Gw::start("", &format!("{limits}{}", open_route(&up))).await;
    let a = attempt(&gw, "/r", &from(&gw, "127.0.0.7", None)).await.unwrap();
    let _b = attempt(&gw, "/r", &from(&gw, "127.0.0.7", None)).await.unwrap();
    // Third concurrent from the same IP: cut before TLS.
    assert_eq!(attempt(&gw, "/r", &from(&gw, "127.0.0.7", None)).await.err(), Some(None));
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="ip_conn_limit"}"#, 1.0)
        .await;
    // Another IP is unaffected.
    let _c = attempt(&gw, "/r", &from(&gw, "127.0.0.8", None)).await.unwrap();
    drop(a);
    // Its per-IP slot is freed as the session ends, right after its close is counted.
    wait_sessions_ended(&gw, "r", 1.0).await;
    // The burst of 3 is spent (the refused attempt used a token too): rate limited now.
    assert_eq!(attempt(&gw, "/r", &from(&gw, "127.0.0.7", None)).await.err(), Some(None));
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="rate_limited"}"#, 1.0)
        .await;
    assert_eq!(up.requests(), 3);
}

#[tokio::test]
async fn repeated_auth_failures_ban_the_ip_with_429() {
    let up = upstream(Behaviour::Echo).await;
    let limits = "[limits]\nauth_failures_per_ip = 3\nauth_ban = \"10m\"\n";
    let gw = Gw::start("", &format!("{limits}{}", route("app", "/app", &up.url(), "jwt"))).await;
    for _ in 0..3 {
        assert_eq!(
            attempt(&gw, "/app", &from(&gw, "127.0.0.9", Some("bad.token.here".into())))
                .await
                .err(),
            Some(Some(401))
        );
    }
    let resp = gw.refusal("/app", &from(&gw, "127.0.0.9", Some(gw.token("alice")))).await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry > 500 && retry <= 600, "{retry}");
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="auth_banned"}"#, 1.0)
        .await;
    // Other clients still get in.
    let mut ws = attempt(&gw, "/app", &from(&gw, "127.0.0.10", Some(gw.token("bob")))).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "ok").await, "ok");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn origin_is_checked_per_route() {
    let up = upstream(Behaviour::Echo).await;
    let routes = format!(
        "{}allowed_origins = [\"https://app.example.com\"]\nallow_missing_origin = false\n{}allowed_origins = [\"*\"]\n{}",
        route("strict", "/strict", &up.url(), "none"),
        route("any", "/any", &up.url(), "none"),
        route("default", "/default", &up.url(), "none"),
    );
    let gw = Gw::start("", &routes).await;
    let with_origin = |o: &str| {
        let mut opts = gw.options(None);
        opts.headers = vec![("Origin".into(), o.into())];
        opts
    };
    assert!(gw.try_connect("/strict", &with_origin("HTTPS://App.Example.com:443")).await.is_ok());
    assert_eq!(gw.refusal("/strict", &with_origin("https://evil.example.com")).await.status(), 403);
    assert_eq!(gw.refusal("/strict", &with_origin("http://app.example.com")).await.status(), 403);
    assert_eq!(gw.refusal("/strict", &gw.options(None)).await.status(), 403);
    assert!(gw.try_connect("/any", &with_origin("https://whoever.example")).await.is_ok());
    // Default: no browser origin is allowed until listed; non-browser clients (no Origin) are.
    assert_eq!(gw.refusal("/default", &with_origin("https://app.example.com")).await.status(), 403);
    assert!(gw.try_connect("/default", &gw.options(None)).await.is_ok());
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="origin"}"#, 4.0).await;
    assert_eq!(up.requests(), 3);
}

#[tokio::test]
async fn message_rate_delays_without_dropping() {
    let gw = Gw::start("", &format!("[limits]\nmessage_rate = \"20/s\"\nmessage_burst = 5\n{ECHO_ROUTE}")).await;
    let ws = gw.connect("/echo").await;
    let (mut tx, mut rx) = ws.split();
    let n = 40;
    let t0 = std::time::Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            tx.send(Message::text(format!("{i}"))).await.unwrap();
        }
        tx
    });
    for i in 0..n {
        match tokio::time::timeout(TIMEOUT, rx.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), i.to_string()),
            other => panic!("{other:?}"),
        }
    }
    let elapsed = t0.elapsed();
    // 5 at once, then 35 more at 20/s: at least 1.75 s.
    assert!(elapsed >= Duration::from_millis(1700), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    drop(sender.await.unwrap());
}

#[tokio::test]
async fn client_flooding_far_beyond_the_rate_is_closed_1008() {
    let gw = Gw::start(
        "",
        &format!("[limits]\nmessage_rate = \"10/s\"\nmessage_burst = 1\nrate_abuse_timeout = \"500ms\"\n{ECHO_ROUTE}"),
    )
    .await;
    let ws = gw.connect("/echo").await;
    let (mut tx, mut rx) = ws.split();
    tokio::spawn(async move {
        for _ in 0..500 {
            if tx.send(Message::text("flood")).await.is_err() {
                return;
            }
        }
    });
    let code = loop {
        match tokio::time::timeout(TIMEOUT, rx.next()).await.expect("not closed") {
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 1008);
    gw.wait_metric(r#"wsgate_closes_total{route="echo",code="1008",initiator="gateway"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn slowloris_cannot_starve_real_clients() {
    let gw = Gw::start(
        "handshake_timeout = \"2s\"",
        &format!("[limits]\nmax_connections_per_ip = 20\nconnection_burst_per_ip = 200\nconnection_rate_per_ip = \"200/s\"\n{ECHO_ROUTE}"),
    )
    .await;
    // The attacker opens 60 connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..60 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.11:0".parse().unwrap()).unwrap();
        if let Ok(c) = s.connect(gw.addr).await {
            idle.push(c);
        }
    }
    // Real clients keep getting through meanwhile.
    for i in 0..5 {
        let mut ws = attempt(&gw, "/echo", &from(&gw, "127.0.0.12", Some(gw.token("real"))))
            .await
            .expect("real client starved");
        assert_eq!(roundtrip(&mut ws, &format!("real {i}")).await, format!("real {i}"));
    }
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="ip_conn_limit"}"#, 40.0)
        .await;
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="handshake_timeout"}"#, 20.0)
        .await;
    drop(idle);
}

#[tokio::test]
async fn forwarded_client_ip_is_used_behind_a_trusted_proxy() {
    let up = upstream(Behaviour::Echo).await;
    let server = "client_ip_source = \"x_forwarded_for\"\ntrusted_proxies = [\"127.0.0.13/32\"]";
    let gw = Gw::start(server, &format!("[firewall]\ndeny = [\"203.0.113.0/24\"]\n{}", open_route(&up))).await;
    let mut proxied = from(&gw, "127.0.0.13", None);
    proxied.headers = vec![("X-Forwarded-For".into(), "198.51.100.7, 127.0.0.13".into())];
    let _ws = attempt(&gw, "/r", &proxied).await.unwrap();
    assert_eq!(
        up.header(0, "x-forwarded-for").as_deref(),
        Some("198.51.100.7, 127.0.0.13, 127.0.0.13")
    );
    // The forwarded client is denied by the firewall: the proxy gets an HTTP 403.
    proxied.headers = vec![("X-Forwarded-For".into(), "203.0.113.9".into())];
    assert_eq!(attempt(&gw, "/r", &proxied).await.err(), Some(Some(403)));
    // A hop the gateway cannot read is a 400, never skipped (the proxy is not the client).
    proxied.headers = vec![("X-Forwarded-For".into(), "unknown".into())];
    assert_eq!(attempt(&gw, "/r", &proxied).await.err(), Some(Some(400)));
    // `ip:port` is read, and every header line counts: the proxy appended a second one.
    proxied.headers = vec![
        ("X-Forwarded-For".into(), "203.0.113.9".into()),
        ("X-Forwarded-For".into(), "198.51.100.8:4711".into()),
    ];
    let _ws3 = attempt(&gw, "/r", &proxied).await.unwrap();
    assert_eq!(
        up.header(1, "x-forwarded-for").as_deref(),
        Some("203.0.113.9, 198.51.100.8, 127.0.0.13")
    );
    // An untrusted peer's X-Forwarded-For is ignored and replaced.
    let mut direct = from(&gw, "127.0.0.14", None);
    direct.headers = vec![("X-Forwarded-For".into(), "203.0.113.9".into())];
    let _ws2 = attempt(&gw, "/r", &direct).await.unwrap();
    assert_eq!(up.header(2, "x-forwarded-for").as_deref(), Some("127.0.0.14"));
}

/// Issue 28, item 5: every hop reaches the upstream in the one form the gateway itself
/// reads (bans, `X-Real-IP`): no port, no brackets, IPv4-mapped made IPv4, IPv6 in its
/// canonical text; a hop that is no address becomes `unknown`.
#[tokio::test]
async fn forwarded_hops_reach_the_upstream_in_one_canonical_form() {
    let up = upstream(Behaviour::Echo).await;
    let server = "client_ip_source = \"x_forwarded_for\"\ntrusted_proxies = [\"127.0.0.13/32\"]";
    let gw = Gw::start(server, &open_route(&up)).await;
    let mut proxied = from(&gw, "127.0.0.13", None);
    let cases: [(&[&str], &str); 5] = [
        (&["198.51.100.7:4444"], "198.51.100.7, 127.0.0.13"),
        (&["::ffff:198.51.100.8"], "198.51.100.8, 127.0.0.13"),
        (&["[::FFFF:198.51.100.9]:80"], "198.51.100.9, 127.0.0.13"),
        (
            &["unknown, [2001:DB8:0:0::1]:443", " 2001:db8:0000::2 , 198.51.100.10"],
            "unknown, 2001:db8::1, 2001:db8::2, 198.51.100.10, 127.0.0.13",
        ),
        (&["[2001:db8::3]"], "2001:db8::3, 127.0.0.13"),
    ];
    let real_ip = ["198.51.100.7", "198.51.100.8", "198.51.100.9", "198.51.100.10", "2001:db8::3"];
    for (i, ((lines, want), real)) in cases.iter().zip(real_ip).enumerate() {
        proxied.headers = lines.iter().map(|l| ("X-Forwarded-For".to_string(), l.to_string())).collect();
        let _ws = attempt(&gw, "/r", &proxied).await.unwrap_or_else(|e| panic!("{lines:?}: {e:?}"));
        assert_eq!(up.header(i, "x-forwarded-for").as_deref(), Some(*want), "{lines:?}");
        assert_eq!(up.header(i, "x-real-ip").as_deref(), Some(real), "{lines:?}");
    }
}

#[test]
fn limiter_state_stays_bounded_under_many_distinct_clients() {
    use wsgate::{config::AdmissionLimits, limits::PerIp};
    let settings = AdmissionLimits {
        connection_rate: "100/s".parse().unwrap(),
        connection_burst: 5,
        http_rate: wsgate::config::DEFAULT_HTTP_RATE,
        http_burst: 2,
        max_connections_per_ip: 10,
        ipv6_prefix: 64,
        auth_failures_per_ip: 3,
        auth_failure_window: Duration::from_millis(200),
        auth_ban: Duration::from_millis(200),
    };
    let adm = Arc::new(PerIp::new(settings));
    for i in 0..120_000u32 {
        let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        drop(adm.admit(a).unwrap());
        if i % 2 == 0 {
            adm.auth_failed(a);
        }
    }
    let (rate, open, fails) = adm.tracked();
    assert!(rate >= 100_000, "{rate}");
    assert_eq!(open, 0);
    assert_eq!(fails, 60_000);
    // Kept: the window and the ban must pass on the real clock (the limiter reads
    // std::time::Instant, which no test clock controls).
    std::thread::sleep(Duration::from_millis(300));
    adm.prune();
    let (rate, open, fails) = adm.tracked();
    assert!(rate < 100, "rate limiter still tracks {rate} keys");
    assert_eq!((open, fails), (0, 0));
}

/// Connect through a fake L4 proxy: TCP from `src`, the raw PROXY `header`, then TLS and the upgrade.
async fn via_proxy(gw: &Gw, src: &str, header: &[u8]) -> Result<wsgate::client::ClientStream, Option<u16>> {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut tcp = sock.connect(gw.addr).await.map_err(|_| None)?;
    tcp.write_all(header).await.map_err(|_| None)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(gw.tls())
        .connect(name, tcp)
        .await
        .map_err(|_| None)?;
    let io = wsgate::upstream::UpstreamIo::Tls(Box::new(tls));
    match tokio::time::timeout(TIMEOUT, tokio_tungstenite::client_async(gw.url("/r"), io))
        .await
        .expect("hung")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(Some(r.status().as_u16())),
        Err(_) => Err(None),
    }
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_from_trusted_proxies_only() {
    let up = upstream(Behaviour::Echo).await;
    let server = "client_ip_source = \"proxy_protocol\"\ntrusted_proxies = [\"127.0.0.40/32\"]";
    let gw = Gw::start(server, &format!("[firewall]\ndeny = [\"203.0.113.66\"]\n{}", open_route(&up))).await;
    // v1 from the trusted proxy: the upstream sees the client's address.
    let mut ws = via_proxy(&gw, "127.0.0.40", b"PROXY TCP4 203.0.113.5 127.0.0.1 40000 443\r\n")
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut ws, "v1").await, "v1");
    assert_eq!(up.header(0, "x-forwarded-for").as_deref(), Some("203.0.113.5"));
    // v2 (binary), IPv6 client.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x21, 0, 36]);
    v2.extend_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v2.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    v2.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
    let mut ws = via_proxy(&gw, "127.0.0.40", &v2).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "v2").await, "v2");
    assert_eq!(up.header(1, "x-forwarded-for").as_deref(), Some("2001:db8::7"));
    // The firewall judges the client the header names.
    assert_eq!(
        via_proxy(&gw, "127.0.0.40", b"PROXY TCP4 203.0.113.66 127.0.0.1 40000 443\r\n")
            .await
            .err(),
        Some(None)
    );
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="firewall"}"#, 1.0).await;
    // An untrusted peer is refused, header or not; so is a garbled header.
    assert!(
        via_proxy(&gw, "127.0.0.41", b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 443\r\n")
            .await
            .is_err()
    );
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="firewall"}"#, 2.0).await;
    assert!(via_proxy(&gw, "127.0.0.40", b"PROXY TCP9 nonsense here\r\n").await.is_err());
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="bad_request"}"#, 1.0)
        .await;
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn a_proxy_header_naming_no_client_gets_the_proxys_own_limits() {
    let up = upstream(Behaviour::Echo).await;
    let server = "client_ip_source = \"proxy_protocol\"\ntrusted_proxies = [\"127.0.0.42/32\"]";
    let limits = "[limits]\nmax_connections_per_ip = 1\n";
    let gw = Gw::start(server, &format!("{limits}{}", open_route(&up))).await;
    // UNKNOWN (v1) names no client: the proxy's address is the client, capped at 1.
    let unknown = b"PROXY UNKNOWN\r\n";
    let mut first = via_proxy(&gw, "127.0.0.42", unknown).await.unwrap();
    assert_eq!(roundtrip(&mut first, "one").await, "one");
    assert_eq!(via_proxy(&gw, "127.0.0.42", unknown).await.err(), Some(None));
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="ip_conn_limit"}"#, 1.0)
        .await;
    // A v2 LOCAL header (a health check) likewise.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    assert_eq!(via_proxy(&gw, "127.0.0.42", &local).await.err(), Some(None));
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="ip_conn_limit"}"#, 2.0)
        .await;
    // A real client behind the same proxy has its own count.
    let mut other = via_proxy(&gw, "127.0.0.42", b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 443\r\n")
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut other, "two").await, "two");
}
