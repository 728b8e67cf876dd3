//! The admin API (DESIGN.md section 9) on one instance: token check, revoke, kick,
//! ban/unban, the session list, bounded bodies, and the effect of each action on live
//! sessions and new connections.

mod common;
use common::*;
use std::net::SocketAddr;
use std::time::Duration;

const ADMIN_TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";

/// A gateway with the echo route and the admin API on (its token in a file).
async fn gateway(extra: &str) -> (Gw, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let line = format!("listen = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n", token_file.display());
    let gw = Gw::start_with("", &format!("{extra}\n{ECHO_ROUTE}"), |t| {
        t.replacen("[admin]\nlisten = \"127.0.0.1:0\"\n", &format!("[admin]\n{line}"), 1)
    })
    .await;
    (gw, dir)
}

/// One request to the admin listener, with the admin token when given; (status, body).
async fn call(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    http_request(addr, method, path, &format!("{auth}Content-Type: application/json\r\n"), body).await
}

async fn admin(gw: &Gw, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = call(gw.admin, method, path, Some(ADMIN_TOKEN), body).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

async fn connect_as(gw: &Gw, token: String, source: Option<&str>) -> wsgate::client::ClientStream {
    let mut o = gw.options(Some(token));
    o.source = source.map(|s| s.parse().unwrap());
    gw.try_connect("/echo", &o).await.unwrap_or_else(|s| panic!("refused with {s}")).0
}

#[tokio::test]
async fn the_api_is_off_without_a_token_file() {
    let gw = Gw::echo().await;
    let (status, _) = call(gw.admin, "POST", "/v1/kick", Some(ADMIN_TOKEN), r#"{"sub":"alice"}"#).await;
    assert_eq!(status, 404);
    assert_eq!(http_get(gw.admin, "/healthz").await.0, 200);
}

#[tokio::test]
async fn every_action_needs_the_token() {
    let (gw, _dir) = gateway("").await;
    for token in [None, Some("wrong"), Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])] {
        let (status, body) = call(gw.admin, "POST", "/v1/kick", token, r#"{"sub":"alice"}"#).await;
        assert_eq!(status, 401, "{token:?}");
        assert!(!body.contains(ADMIN_TOKEN));
    }
    let (status, _) = call(gw.admin, "GET", "/v1/sessions", Some("wrong"), "").await;
    assert_eq!(status, 401);
    assert_eq!(admin(&gw, "POST", "/v1/kick", r#"{"sub":"nobody"}"#).await.0, 200);
    gw.wait_metric(r#"wsgate_admin_requests_total{action="kick",result="unauthorized"}"#, 3.0)
        .await;
    assert_eq!(gw.metric(r#"wsgate_admin_requests_total{action="kick",result="ok"}"#).await, 1.0);
}

#[tokio::test]
async fn a_revoked_token_closes_its_sessions_and_is_refused_from_then_on() {
    let (gw, _dir) = gateway("").await;
    let revoked = gw.token_with("alice", Duration::from_secs(600), &[("jti", "j-1")]);
    let other = gw.token_with("alice", Duration::from_secs(600), &[("jti", "j-2")]);
    let mut a = connect_as(&gw, revoked.clone(), None).await;
    let mut b = connect_as(&gw, other, None).await;
    assert_eq!(roundtrip(&mut a, "x").await, "x");
    let (status, body) = admin(&gw, "POST", "/v1/revocations", r#"{"jti":"j-1","exp":4102444800}"#).await;
    assert_eq!((status, body["revoked"].as_str()), (200, Some("j-1")));
    assert_eq!(close_code(&mut a).await.0, 1008);
    assert_eq!(roundtrip(&mut b, "still").await, "still");
    assert_eq!(gw.refusal("/echo", &gw.options(Some(revoked))).await.status(), 401);
    gw.wait_metric(r#"wsgate_auth_failures_total{route="echo",reason="revoked"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn a_kick_closes_every_session_of_the_user_and_no_other() {
    let (gw, _dir) = gateway("").await;
    let mut a1 = connect_as(&gw, gw.token("alice"), None).await;
    let mut a2 = connect_as(&gw, gw.token("alice"), None).await;
    let mut b = connect_as(&gw, gw.token("bob"), None).await;
    let (status, body) = admin(&gw, "POST", "/v1/kick", r#"{"sub":"alice"}"#).await;
    assert_eq!((status, body["sessions"].as_u64()), (200, Some(2)));
    assert_eq!(close_code(&mut a1).await.0, 1008);
    assert_eq!(close_code(&mut a2).await.0, 1008);
    assert_eq!(roundtrip(&mut b, "bob stays").await, "bob stays");
    // A kick is not a ban: alice may come back.
    let mut again = connect_as(&gw, gw.token("alice"), None).await;
    assert_eq!(roundtrip(&mut again, "back").await, "back");
}

#[tokio::test]
async fn a_ban_refuses_before_tls_and_closes_live_sessions_until_lifted() {
    let (gw, _dir) = gateway("").await;
    let mut banned = connect_as(&gw, gw.token("alice"), Some("127.0.0.5")).await;
    let mut other = connect_as(&gw, gw.token("bob"), Some("127.0.0.6")).await;
    // Written as an IPv4-mapped IPv6 address, it bans the IPv4 client it names.
    let (status, body) = admin(&gw, "POST", "/v1/bans", r#"{"cidr":"::ffff:127.0.0.5","for":"10m"}"#).await;
    assert_eq!((status, body["seconds"].as_u64()), (200, Some(600)));
    assert_eq!(body["banned"], "127.0.0.5/32");
    assert_eq!(close_code(&mut banned).await.0, 1008);
    assert_eq!(roundtrip(&mut other, "ok").await, "ok");
    let mut o = gw.options(Some(gw.token("alice")));
    o.source = Some("127.0.0.5".parse().unwrap());
    let refused = tokio::time::timeout(TIMEOUT, wsgate::client::connect(&gw.url("/echo"), &o))
        .await
        .unwrap();
    assert!(
        !matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(_)) | Ok(_)),
        "a banned address must not reach TLS or HTTP"
    );
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="firewall"}"#, 1.0).await;
    // Lifted (the slash of the range escaped), then lifting again finds nothing.
    assert_eq!(admin(&gw, "DELETE", "/v1/bans/127.0.0.5%2F32", "").await.0, 200);
    assert_eq!(admin(&gw, "DELETE", "/v1/bans/127.0.0.5/32", "").await.0, 404);
    let mut back = connect_as(&gw, gw.token("alice"), Some("127.0.0.5")).await;
    assert_eq!(roundtrip(&mut back, "back").await, "back");
}

#[tokio::test]
async fn sessions_are_listed_with_their_counts_and_filters() {
    let (gw, _dir) = gateway("").await;
    let mut a = connect_as(&gw, gw.token("alice"), Some("127.0.0.7")).await;
    let _b = connect_as(&gw, gw.token("bob"), None).await;
    assert_eq!(roundtrip(&mut a, "hello").await, "hello");
    let listed = wait_for("alice's message counted in the list", TIMEOUT, || async {
        let (status, body) = admin(&gw, "GET", "/v1/sessions?sub=alice", "").await;
        assert_eq!(status, 200);
        let s = body["sessions"].as_array().unwrap().clone();
        (s.len() == 1 && s[0]["messages"][0].as_u64() == Some(1)).then_some(s)
    })
    .await;
    let s = &listed[0];
    assert_eq!(s["route"], "echo");
    assert_eq!(s["client_ip"], "127.0.0.7");
    assert_eq!(s["bytes"][0].as_u64(), Some(5));
    let (_, all) = admin(&gw, "GET", "/v1/sessions", "").await;
    assert_eq!(all["sessions"].as_array().unwrap().len(), 2);
    let (_, one) = admin(&gw, "GET", "/v1/sessions?limit=1", "").await;
    assert_eq!(
        (one["sessions"].as_array().unwrap().len(), one["truncated"].as_bool()),
        (1, Some(true))
    );
    let (_, none) = admin(&gw, "GET", "/v1/sessions?route=other", "").await;
    assert!(none["sessions"].as_array().unwrap().is_empty());
    drop(a);
    wait_until("alice's session unlisted", TIMEOUT, || async {
        admin(&gw, "GET", "/v1/sessions?sub=alice", "").await.1["sessions"]
            .as_array()
            .is_some_and(|s| s.is_empty())
    })
    .await;
}

#[tokio::test]
async fn bad_requests_get_a_clear_answer() {
    let (gw, _dir) = gateway("").await;
    let big = format!(r#"{{"sub":"{}"}}"#, "x".repeat(5000));
    assert_eq!(admin(&gw, "POST", "/v1/kick", &big).await.0, 413);
    for (path, body) in [
        ("/v1/kick", "not json"),
        ("/v1/kick", r#"{"sub":"a","extra":1}"#),
        ("/v1/kick", r#"{"sub":""}"#),
        ("/v1/revocations", r#"{"exp":1}"#),
        ("/v1/bans", r#"{"cidr":"nonsense"}"#),
        ("/v1/bans", r#"{"cidr":"10.0.0.0/8","for":"0s"}"#),
        ("/v1/bans", r#"{"cidr":"10.0.0.0/8","for":"400d"}"#),
        ("/v1/bans", r#"{"cidr":"10.0.0.0/8","for":"500ms"}"#),
    ] {
        let (status, body_out) = admin(&gw, "POST", path, body).await;
        assert_eq!(status, 400, "{path} {body}: {body_out}");
        assert!(body_out["error"].is_string());
    }
    assert_eq!(admin(&gw, "GET", "/v1/sessions?limit=0", "").await.0, 400);
    assert_eq!(admin(&gw, "GET", "/v1/sessions?who=x", "").await.0, 400);
    assert_eq!(admin(&gw, "POST", "/v1/nothing", "{}").await.0, 404);
    assert_eq!(admin(&gw, "GET", "/v1/kick", "").await.0, 404);
    gw.wait_metric(r#"wsgate_admin_requests_total{action="ban",result="invalid"}"#, 4.0)
        .await;
    // A body declared larger than the limit is refused at once, not waited for.
    let started = std::time::Instant::now();
    let (status, _) = http_request(
        gw.admin,
        "POST",
        "/v1/kick",
        &format!("Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 999999999\r\n"),
        "",
    )
    .await;
    assert_eq!(status, 413);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_short_admin_token_is_a_config_error_and_an_exposed_api_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.token");
    std::fs::write(&short, "too-short\n").unwrap();
    let base = config_text(dir.path(), "", ECHO_ROUTE);
    let text = base.replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n", short.display()),
        1,
    );
    let cfg = wsgate::Config::from_toml_str(&text, "t.toml").unwrap();
    let Err(e) = wsgate::gateway::Runtime::load(cfg, true) else {
        panic!("a short admin token was accepted")
    };
    assert_eq!((e.key.as_str(), e.line.is_some()), ("admin.token_file", true));
    assert!(!e.to_string().contains("too-short"), "{e}");
    // Two lines cannot be sent in one header.
    std::fs::write(&short, format!("{}\n{}\n", "a".repeat(32), "b".repeat(32))).unwrap();
    let cfg = wsgate::Config::from_toml_str(&text, "t.toml").unwrap();
    assert!(wsgate::gateway::Runtime::load(cfg, true).is_err());
    let exposed = text.replace("listen = \"127.0.0.1:0\"\ntoken_file", "listen = \"0.0.0.0:0\"\ntoken_file");
    let cfg = wsgate::Config::from_toml_str(&exposed, "t.toml").unwrap();
    let warnings = wsgate::check::warnings(&cfg);
    assert!(warnings.iter().any(|w| w.contains("admin API")), "{warnings:?}");
}

/// A TCP connection to `addr` from `src` that sends the start of a request head and
/// never the rest.
async fn partial_head(addr: SocketAddr, src: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut tcp = sock.connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    tcp
}

/// Whether the gateway has closed `tcp` (EOF or reset) within `within`.
async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {} // an answer (408) before the close
        }
    }
}

/// Issue 28, item 2: partial request heads, from one address or from many, do not keep
/// health checks, scrapes or the admin API from being answered at once; a partial head
/// is closed after the head timeout.
#[tokio::test]
async fn partial_request_heads_cannot_starve_the_admin_listener() {
    let (gw, _dir) = gateway("").await;
    let mut held = Vec::new();
    // From the address the health checks come from: more than the old 64-connection cap.
    for _ in 0..70 {
        held.push(partial_head(gw.admin, "127.0.0.1").await);
    }
    // And from 40 other addresses, 8 each: more than the listener holds in all.
    for a in 0..40 {
        for _ in 0..8 {
            held.push(partial_head(gw.admin, &format!("127.0.1.{}", a + 1)).await);
        }
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let started = std::time::Instant::now();
        let (status, _) = http_get(gw.admin, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(started.elapsed() < Duration::from_secs(2), "{path} took {:?}", started.elapsed());
    }
    let started = std::time::Instant::now();
    assert_eq!(admin(&gw, "GET", "/v1/sessions", "").await.0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the admin API took {:?}",
        started.elapsed()
    );
    // A partial head alone (nothing displaces it) is closed after the head timeout.
    drop(held);
    let mut lone = partial_head(gw.admin, "127.0.2.1").await;
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut lone, Duration::from_secs(8)).await,
        "a partial head was never closed"
    );
    assert!(started.elapsed() >= Duration::from_secs(2), "closed after {:?}", started.elapsed());
}

/// Issue 28, item 2: a flood of new connections from a few dozen addresses, faster than
/// the listener holds them, does not displace a client that is still sending its request
/// head: a full listener takes the room from the address holding the most connections.
#[tokio::test]
async fn a_connection_flood_from_many_addresses_does_not_displace_a_slow_health_check() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, _dir) = gateway("").await;
    let mut held = Vec::new();
    // The listener full: 32 addresses, 8 partial heads each.
    for a in 0..32 {
        for _ in 0..8 {
            held.push(partial_head(gw.admin, &format!("127.0.3.{}", a + 1)).await);
        }
    }
    // A health check connects (its head not sent yet) ...
    let mut check = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ... while as many new connections again arrive from other addresses.
    for a in 0..32 {
        for _ in 0..8 {
            held.push(partial_head(gw.admin, &format!("127.0.4.{}", a + 1)).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    check
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), check.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "the health check got {answer:?}");
}

/// Kicks and revocations are keyed by provider and identity (DESIGN 14/15): `alice` of
/// `[jwt]` and `alice` of `[providers.partners]` are two users, and a `jti` revoked for
/// one provider leaves the other's token with the same `jti` alone.
#[tokio::test]
async fn kicks_and_revocations_name_a_provider_and_touch_no_other() {
    let secret = tempfile::tempdir().unwrap();
    let partners = format!(
        "[providers.partners]\nkind = \"jwt\"\nsecret_file = \"{}/p.secret\"\ngenerate_secret_if_missing = true\n\
         issuer = \"https://partners.test\"\n\n\
         [[routes]]\nname = \"partners\"\npath = \"/partners\"\nupstreams = [\"builtin:echo\"]\nprovider = \"partners\"\n",
        secret.path().display()
    );
    let (gw, _dir) = gateway(&partners).await;
    let cfg = &gw.config.providers["partners"];
    let key = wsgate::auth::load_secret(&cfg.secret, "test", true).unwrap();
    let mint = |jti: &str| {
        let extra = [("jti".to_string(), jti.to_string())];
        wsgate::auth::mint(cfg, &key, "alice", Duration::from_secs(600), &extra).unwrap()
    };
    let connect = |path: &'static str, token: String| {
        let o = gw.options(Some(token));
        let gw = &gw;
        async move { gw.try_connect(path, &o).await.unwrap_or_else(|s| panic!("refused with {s}")).0 }
    };
    let mut ours = connect("/echo", gw.token_with("alice", Duration::from_secs(600), &[("jti", "j-1")])).await;
    let mut theirs = connect("/partners", mint("j-1")).await;
    // An echo means the relay runs: the session is listed (that happens right after the 101).
    assert_eq!(roundtrip(&mut ours, "ours").await, "ours");
    assert_eq!(roundtrip(&mut theirs, "theirs").await, "theirs");

    let (status, body) = admin(&gw, "GET", "/v1/sessions?sub=alice&provider=partners", "").await;
    assert_eq!(status, 200);
    assert_eq!(body["sessions"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["sessions"][0]["provider"], "partners");
    assert_eq!(admin(&gw, "POST", "/v1/kick", r#"{"sub":"alice","provider":"nope"}"#).await.0, 400);

    // The partners' j-1 is revoked: that session ends, [jwt]'s j-1 stays.
    let (status, body) = admin(&gw, "POST", "/v1/revocations", r#"{"jti":"j-1","provider":"partners"}"#).await;
    assert_eq!((status, body["provider"].as_str()), (200, Some("partners")));
    assert_eq!(close_code(&mut theirs).await.0, 1008);
    assert_eq!(roundtrip(&mut ours, "still").await, "still");
    assert_eq!(gw.refusal("/partners", &gw.options(Some(mint("j-1")))).await.status(), 401);

    // A kick of the partners' alice closes hers only; [jwt]'s alice is another user.
    drop(theirs);
    let mut theirs = connect("/partners", mint("j-2")).await;
    // (the revoked session is listed until its closing handshake is over)
    for _ in 0..100 {
        let (_, body) = admin(&gw, "GET", "/v1/sessions?provider=partners", "").await;
        if body["sessions"].as_array().map(Vec::len) == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = admin(&gw, "POST", "/v1/kick", r#"{"sub":"alice","provider":"partners"}"#).await;
    assert_eq!((status, body["sessions"].as_u64()), (200, Some(1)));
    assert_eq!(close_code(&mut theirs).await.0, 1008);
    assert_eq!(roundtrip(&mut ours, "stays").await, "stays");
    // And a kick without a provider is [jwt]'s alice.
    drop(theirs);
    let mut theirs = connect("/partners", mint("j-3")).await;
    assert_eq!(admin(&gw, "POST", "/v1/kick", r#"{"sub":"alice"}"#).await.1["sessions"], 1);
    assert_eq!(close_code(&mut ours).await.0, 1008);
    assert_eq!(roundtrip(&mut theirs, "partners stay").await, "partners stay");
}
