//! Live token refresh on `first_message` routes (`refresh = true`, DESIGN.md section 15),
//! against the running gateway and a recording echo upstream: a refresh extends the
//! session and is never relayed; a foreign, expired or forged one closes with 1008;
//! other messages go on as always; fragmented and compressed refreshes count too.

mod common;
use common::*;
use flate2::{Compress, FlushCompress};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};
use wsgate::wire;

const LEEWAY: u64 = 30; // the default `leeway`

/// Tokens come from the `Authorization` header or as the first message.
fn first_message_sources(config: String) -> String {
    let sources = "audience = [\"wsgate\"]\ntoken_sources = [\"authorization\", \"first_message\"]";
    config.replace("audience = [\"wsgate\"]", sources)
}

/// A gateway whose route `/app` (to a recording echo upstream) refreshes.
async fn start() -> (Gw, Upstream) {
    let up = upstream(Behaviour::Echo).await;
    let rest = format!("{}refresh = true\n", route("app", "/app", &up.url(), "jwt"));
    let gw = Gw::start_with("", &rest, first_message_sources).await;
    (gw, up)
}

/// A token for `sub` that the gateway takes as lapsing `secs` from now (leeway included).
fn lapsing(gw: &Gw, sub: &str, secs: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let exp = (now + secs - LEEWAY).to_string();
    gw.token_with(sub, Duration::ZERO, &[("exp", &exp)])
}

fn refresh(token: &str) -> Message {
    Message::text(json!({ "token": token }).to_string())
}

/// A session on `/app` admitted with `token`.
async fn session(gw: &Gw, token: &str) -> wsgate::client::ClientStream {
    let (mut ws, _) = gw.try_connect("/app", &gw.options(None)).await.unwrap();
    ws.send(Message::text(token)).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "admitted").await, "admitted");
    ws
}

#[tokio::test]
async fn a_refresh_extends_the_session_past_the_first_token_and_is_not_relayed() {
    let (gw, up) = start().await;
    let first = lapsing(&gw, "alice", 2);
    let mut ws = session(&gw, &first).await;
    let t0 = Instant::now();
    let second = lapsing(&gw, "alice", 5);
    ws.send(refresh(&second)).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "refreshed").await, "refreshed");
    gw.wait_metric(r#"wsgate_token_refreshes_total{route="app",result="ok"}"#, 1.0)
        .await;
    // Past the first token's expiry the session goes on ...
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(t0.elapsed())).await;
    assert_eq!(roundtrip(&mut ws, "after the first exp").await, "after the first exp");
    // ... and ends at the second's, with the usual code.
    assert_eq!(close_code(&mut ws).await, (4401, "token expired".into()));
    let lasted = t0.elapsed();
    assert!(lasted > Duration::from_secs(4) && lasted < Duration::from_secs(7), "{lasted:?}");
    let seen = up.texts();
    assert_eq!(seen, ["admitted", "refreshed", "after the first exp"], "no token went upstream");
    assert!(!gw.metrics_text().await.contains(&second));
}

#[tokio::test]
async fn a_foreign_expired_or_forged_refresh_closes_1008_and_is_not_relayed() {
    let (gw, up) = start().await;
    let alice = gw.token("alice");
    let forged = {
        let mut t = gw.token("alice").into_bytes();
        let last = t.len() - 2;
        t[last] = if t[last] == b'A' { b'B' } else { b'A' };
        String::from_utf8(t).unwrap()
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let expired = gw.token_with("alice", Duration::ZERO, &[("exp", &(now - 2 * LEEWAY).to_string())]);
    let cases = [
        (gw.token("bob"), "other_identity"),
        (forged, "bad_signature"),
        (expired, "expired"),
        ("not-a-token".to_string(), "malformed"),
    ];
    for (token, result) in &cases {
        let mut ws = session(&gw, &alice).await;
        ws.send(refresh(token)).await.unwrap();
        ws.send(Message::text("behind the refresh")).await.unwrap();
        assert_eq!(close_code(&mut ws).await, (1008, "token refresh refused".into()), "{result}");
        let series = format!(r#"wsgate_token_refreshes_total{{route="app",result="{result}"}}"#);
        gw.wait_metric(&series, 1.0).await;
    }
    let seen = up.texts();
    assert!(seen.iter().all(|m| m == "admitted"), "{seen:?}");
    // Counted as each session ends on its worker, just after the client reads the close.
    gw.wait_metric(r#"wsgate_closes_total{route="app",code="1008",initiator="gateway"}"#, 4.0)
        .await;
}

#[tokio::test]
async fn messages_that_are_not_exactly_a_refresh_are_relayed() {
    let (gw, up) = start().await;
    let mut ws = session(&gw, &gw.token("alice")).await;
    let token = gw.token("alice");
    let others = [
        json!({ "token": token, "room": "a" }).to_string(),
        json!({ "token": 5 }).to_string(),
        json!([{ "token": token }]).to_string(),
        format!(r#"{{"token":"{token}","token":"{token}"}}"#),
        format!(r#"{{"token":"{token}"}} trailing"#),
        token.clone(),
    ];
    for m in &others {
        assert_eq!(&roundtrip(&mut ws, m).await, m);
    }
    // A binary message is never a refresh.
    let bin = json!({ "token": token }).to_string().into_bytes();
    ws.send(Message::binary(bin.clone())).await.unwrap();
    match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(b))) => assert_eq!(b.as_ref(), bin.as_slice()),
        other => panic!("{other:?}"),
    }
    // A text message over 16 KiB streams as always, whatever it holds.
    let big = json!({ "token": "x".repeat(20_000) }).to_string();
    assert_eq!(roundtrip(&mut ws, &big).await, big);
    assert_eq!(up.texts().len(), 1 + others.len() + 1);
    assert_eq!(gw.metric(r#"wsgate_token_refreshes_total{route="app",result="ok"}"#).await, 0.0);
}

#[tokio::test]
async fn a_fragmented_refresh_is_a_refresh() {
    let (gw, up) = start().await;
    let mut ws = session(&gw, &lapsing(&gw, "alice", 2)).await;
    let text = json!({ "token": lapsing(&gw, "alice", 600) }).to_string().into_bytes();
    let cut = text.len() / 2;
    let frames = [
        Frame::message(text[..10].to_vec(), OpCode::Data(Data::Text), false),
        Frame::message(text[10..cut].to_vec(), OpCode::Data(Data::Continue), false),
        Frame::message(text[cut..].to_vec(), OpCode::Data(Data::Continue), true),
    ];
    for f in frames {
        ws.send(Message::Frame(f)).await.unwrap();
    }
    gw.wait_metric(r#"wsgate_token_refreshes_total{route="app",result="ok"}"#, 1.0)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(roundtrip(&mut ws, "still here").await, "still here");
    assert_eq!(up.texts(), ["admitted", "still here"]);
}

/// Raw deflate of one message, the tail stripped (RFC 7692 7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut z = Compress::new(flate2::Compression::new(6), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    z.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    out.truncate(out.len() - 4);
    out
}

/// A session admitted by its `Authorization` header (one admitted by a first message
/// never negotiates compression: the token is read before the relay inflates anything).
#[tokio::test]
async fn a_compressed_refresh_is_seen_inflated() {
    let (gw, up) = start().await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut io = tokio_rustls::TlsConnector::from(gw.tls()).connect(name, tcp).await.unwrap();
    let req = format!(
        "GET /app HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: permessage-deflate\r\nAuthorization: Bearer {}\r\n\r\n",
        lapsing(&gw, "alice", 2)
    );
    io.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(TIMEOUT, io.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101") && head.contains("permessage-deflate"), "{head}");
    // The refresh, compressed and in two frames; then a message behind it.
    let z = deflate(json!({ "token": lapsing(&gw, "alice", 600) }).to_string().as_bytes());
    let mut out = masked_frame(wire::OP_TEXT, false, true, &z[..z.len() / 2]);
    out.extend(masked_frame(wire::OP_CONTINUATION, true, false, &z[z.len() / 2..]));
    out.extend(masked_frame(wire::OP_TEXT, true, true, &deflate(b"after")));
    io.write_all(&out).await.unwrap();
    gw.wait_metric(r#"wsgate_token_refreshes_total{route="app",result="ok"}"#, 1.0)
        .await;
    wait_until("the message behind the refresh at the upstream", TIMEOUT, || async {
        up.texts() == ["after"]
    })
    .await;
    // Past the first token's expiry the socket is still open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    io.write_all(&masked_frame(wire::OP_TEXT, true, true, &deflate(b"later")))
        .await
        .unwrap();
    wait_until("a later message at the upstream", TIMEOUT, || async {
        up.texts() == ["after", "later"]
    })
    .await;
}

/// `/app` as in [`start`], with `require_claims = { scope = "chat" }`.
fn scoped_route(up: &Upstream, refresh: bool) -> String {
    let app = route("app", "/app", &up.url(), "jwt");
    format!("{app}refresh = {refresh}\nrequire_claims = {{ scope = \"chat\" }}\n")
}

#[tokio::test]
async fn a_refresh_meets_the_route_policy_revocations_and_reloads() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start_with("", &scoped_route(&up, true), first_message_sources).await;
    let chat = |jti: &str| gw.token_with("alice", Duration::from_secs(600), &[("scope", "chat"), ("jti", jti)]);
    // Without the claims the route requires.
    let mut ws = session(&gw, &chat("j-1")).await;
    ws.send(refresh(&gw.token("alice"))).await.unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1008);
    gw.wait_metric(r#"wsgate_token_refreshes_total{route="app",result="forbidden"}"#, 1.0)
        .await;
    // Revoked through the admin side (not the revocation file).
    let incidents = &gw.running.as_ref().unwrap().gateway.incidents;
    incidents.revoke("j-2", None).unwrap();
    let mut ws = session(&gw, &chat("j-1")).await;
    ws.send(refresh(&chat("j-2"))).await.unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1008);
    gw.wait_metric(r#"wsgate_token_refreshes_total{route="app",result="revoked"}"#, 1.0)
        .await;
    // A good one passes; after a reload that turns refresh off, refreshes end the session.
    let mut ws = session(&gw, &chat("j-1")).await;
    ws.send(refresh(&chat("j-3"))).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "ok").await, "ok");
    gw.wait_metric(r#"wsgate_token_refreshes_total{route="app",result="ok"}"#, 1.0)
        .await;
    let off = first_message_sources(config_text(gw.dir.path(), "", &scoped_route(&up, false)));
    gw.reload(&off).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "after the reload").await, "after the reload");
    ws.send(refresh(&chat("j-4"))).await.unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1008);
    gw.wait_metric(r#"wsgate_token_refreshes_total{route="app",result="not_allowed"}"#, 1.0)
        .await;
    let seen = up.texts();
    assert!(seen.iter().all(|m| !m.contains("token")), "{seen:?}");
}

/// A message held to be looked at that never ends holds its memory only until the idle
/// timeout: pings meanwhile do not keep the session alive.
#[tokio::test]
async fn a_held_message_that_never_ends_is_closed_when_idle() {
    let up = upstream(Behaviour::Echo).await;
    let limits = "[routes.limits]\nidle_timeout = \"1s\"\n";
    let rest = format!("{}refresh = true\n{limits}", route("app", "/app", &up.url(), "jwt"));
    let gw = Gw::start_with("", &rest, first_message_sources).await;
    let mut ws = session(&gw, &gw.token("alice")).await;
    let start = Frame::message(b"{\"token\":\"".to_vec(), OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(start)).await.unwrap();
    let t0 = Instant::now();
    let (tx, mut rx) = ws.split();
    let pinger = tokio::spawn(async move {
        let mut tx = tx;
        while tx.send(Message::Ping(b"keep".to_vec().into())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let code = loop {
        match tokio::time::timeout(TIMEOUT, rx.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            Some(Ok(_)) => continue,
            _ => break 1006,
        }
    };
    pinger.abort();
    assert_eq!(code, 1001);
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(up.texts(), ["admitted"]);
}
