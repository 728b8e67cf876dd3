//! JWT on the upgrade request and on live sessions.

mod common;
use base64::Engine;
use common::*;
use std::time::Duration;

async fn gw_with_upstream() -> (Gw, Upstream) {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &route("app", "/app", &up.url(), "jwt")).await;
    (gw, up)
}

#[tokio::test]
async fn missing_and_bad_tokens_get_401_and_never_reach_upstream() {
    let (gw, up) = gw_with_upstream().await;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let good = gw.token("alice");
    // One signature character changed, away from the end: the last character of a
    // base64url signature carries padding bits, and a change there may make the
    // encoding invalid (malformed) rather than the signature wrong.
    let at = good.len() - 5;
    let mut tampered = good.clone();
    let swap = if &good[at..=at] == "A" { "B" } else { "A" };
    tampered.replace_range(at..=at, swap);
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing"),
        (Some("not-a-jwt".into()), "malformed"),
        (Some(tampered), "bad_signature"),
        (Some(gw.token_with("a", Duration::ZERO, &[("exp", "1000")])), "expired"),
        (
            Some(gw.token_with("a", Duration::from_secs(60), &[("nbf", "99999999999")])),
            "not_yet_valid",
        ),
        (
            Some(gw.token_with("a", Duration::from_secs(60), &[("iss", "\"evil\"")])),
            "bad_issuer",
        ),
        (
            Some(gw.token_with("a", Duration::from_secs(60), &[("aud", "\"other\"")])),
            "bad_audience",
        ),
        (
            Some(format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"sub":"a","exp":99999999999}"#))),
            "algorithm",
        ),
    ];
    for (token, reason) in &cases {
        let resp = gw.refusal("/app", &gw.options(token.clone())).await;
        assert_eq!(resp.status(), 401, "{reason}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer error=\"invalid_token\"", "{reason}");
        gw.wait_metric(&format!(r#"wsgate_auth_failures_total{{route="app",reason="{reason}"}}"#), 1.0)
            .await;
    }
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="auth"}"#, cases.len() as f64)
        .await;
    assert_eq!(up.requests(), 0);
    // The good token works.
    let (mut ws, _) = gw.try_connect("/app", &gw.options(Some(good))).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "ok").await, "ok");
}

/// A user the admin API can name: an empty `sub`, or one longer than a kick takes (256
/// bytes), would make sessions no kick reaches; refused like such a certificate name.
#[tokio::test]
async fn an_empty_or_overlong_sub_is_no_identity() {
    let (gw, up) = gw_with_upstream().await;
    for sub in [String::new(), "u".repeat(257)] {
        let resp = gw.refusal("/app", &gw.options(Some(gw.token(&sub)))).await;
        assert_eq!(resp.status(), 401, "sub of {} bytes", sub.len());
    }
    gw.wait_metric(r#"wsgate_auth_failures_total{route="app",reason="malformed"}"#, 2.0)
        .await;
    assert_eq!(up.requests(), 0);
    let (mut ws, _) = gw.try_connect("/app", &gw.options(Some(gw.token(&"u".repeat(256))))).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "ok").await, "ok");
}

#[tokio::test]
async fn token_in_subprotocol_is_removed_and_app_protocol_answered() {
    let (gw, up) = gw_with_upstream().await;
    let mut opts = gw.options(None);
    opts.protocols = vec![format!("bearer.{}", gw.token("alice")), "chat".into()];
    let (mut ws, resp) = gw.try_connect("/app", &opts).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
    assert_eq!(roundtrip(&mut ws, "x").await, "x");
    assert_eq!(up.header(0, "sec-websocket-protocol").as_deref(), Some("chat"));
}

#[tokio::test]
async fn token_in_cookie_is_accepted_and_stripped() {
    let (gw, up) = gw_with_upstream().await;
    let mut opts = gw.options(None);
    opts.headers = vec![("Cookie".into(), format!("theme=dark; wsgate_token={}", gw.token("alice")))];
    let (mut ws, _) = gw.try_connect("/app", &opts).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "x").await, "x");
    assert_eq!(up.header(0, "cookie").as_deref(), Some("theme=dark"));
}

#[tokio::test]
async fn forward_token_passes_it_as_bearer() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &format!("{}forward_token = true\n", route("app", "/app", &up.url(), "jwt"))).await;
    let token = gw.token("alice");
    let mut opts = gw.options(None);
    // Browsers fail a connection whose offered protocols all go unanswered, so a client
    // using the protocol source offers an application protocol too.
    opts.protocols = vec![format!("bearer.{token}"), "chat".into()];
    let (_ws, _) = gw.try_connect("/app", &opts).await.unwrap();
    assert_eq!(up.header(0, "authorization"), Some(format!("Bearer {token}")));
}

/// One upstream behind a route that forwards the verified token and an open route:
/// the upstream cannot tell the two requests apart, so a client's own `Authorization`
/// (forged, revoked, refused elsewhere) must not reach it through the open route.
#[tokio::test]
async fn a_client_authorization_never_passes_where_another_route_forwards_tokens() {
    let up = upstream(Behaviour::Echo).await;
    let routes = format!(
        "{}forward_token = true\n{}",
        route("app", "/app", &up.url(), "jwt"),
        route("open", "/open", &up.url(), "none")
    );
    let gw = Gw::start("", &routes).await;
    let mut opts = gw.options(None);
    opts.headers = vec![("Authorization".into(), "Bearer forged.by.client".into())];
    let (_ws, _) = gw.try_connect("/open", &opts).await.unwrap();
    assert_eq!(up.header(0, "authorization"), None);
    let token = gw.token("alice");
    let (_ws2, _) = gw.try_connect("/app", &gw.options(Some(token.clone()))).await.unwrap();
    assert_eq!(up.header(1, "authorization"), Some(format!("Bearer {token}")));
}

#[tokio::test]
async fn session_closes_4401_when_the_token_expires() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &route("app", "/app", &up.url(), "jwt")).await;
    // Leeway is 30s by default; mint a token that expired 29s ago so it lapses in about 1s.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = (now - 29).to_string();
    let token = gw.token_with("alice", Duration::ZERO, &[("exp", &exp)]);
    let (mut ws, _) = gw.try_connect("/app", &gw.options(Some(token))).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "still valid").await, "still valid");
    let t0 = std::time::Instant::now();
    assert_eq!(close_code(&mut ws).await, (4401, "token expired".into()));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(up.first_close().await.map(|c| c.0), Some(4401));
    gw.wait_metric(r#"wsgate_closes_total{route="app",code="4401",initiator="gateway"}"#, 1.0)
        .await;
}
