//! Reload in place: new config, certificates, firewall rules and revocations apply
//! without dropping sessions; an invalid config changes nothing.

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn reload_under_traffic_loses_nothing_and_bad_config_changes_nothing() {
    let gw = Gw::echo().await;
    let text = config_text(gw.dir.path(), "", ECHO_ROUTE);
    let ws = gw.connect("/echo").await;
    let (mut tx, mut rx) = ws.split();
    // Traffic flows until every reload is done, then an end marker follows.
    let reloads_done = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicUsize::new(0));
    let done = reloads_done.clone();
    let sender = tokio::spawn(async move {
        let mut i = 0usize;
        while !done.load(Ordering::SeqCst) {
            tx.send(Message::text(format!("{i}"))).await.unwrap();
            i += 1;
            if i.is_multiple_of(50) {
                // Kept: paces the traffic so it spreads over the reloads instead of
                // piling up in the buffers (a rate, not a wait for anything).
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        tx.send(Message::text("end")).await.unwrap();
        (tx, i)
    });
    let counter = echoed.clone();
    let reader = tokio::spawn(async move {
        let mut i = 0usize;
        loop {
            match tokio::time::timeout(TIMEOUT, rx.next()).await.expect("echo stalled") {
                Some(Ok(Message::Text(t))) if t.as_str() == "end" => return (rx, i),
                Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), i.to_string()),
                other => panic!("{other:?}"),
            }
            i += 1;
            counter.store(i, Ordering::SeqCst);
        }
    });
    for _ in 0..5 {
        // Each reload lands while echoes are still arriving.
        let seen = echoed.load(Ordering::SeqCst);
        wait_until("more echoes between reloads", TIMEOUT, || async {
            echoed.load(Ordering::SeqCst) >= seen + 20
        })
        .await;
        let notes = gw
            .reload(&text.replace("[server]", "[server]\nidle_timeout = \"9m\""))
            .await
            .unwrap();
        assert!(notes.is_empty(), "{notes:?}");
    }
    reloads_done.store(true, Ordering::SeqCst);
    let (tx, sent) = sender.await.unwrap();
    let (rx, received) = reader.await.unwrap();
    assert_eq!(received, sent, "echoes lost");
    gw.wait_metric(r#"wsgate_config_reloads_total{result="success"}"#, 5.0).await;
    assert_eq!(
        gw.running.as_ref().unwrap().gateway.runtime().config.server.idle_timeout,
        Duration::from_secs(540)
    );

    // An invalid config is refused with its key and line, and nothing changes.
    let err = gw
        .reload(&text.replace("[server]", "[server]\nidle_timeout = \"forever\""))
        .await
        .unwrap_err();
    assert_eq!(err.key, "server.idle_timeout");
    assert!(err.line.is_some());
    let missing_cert = text
        .replace("server.crt", "missing.crt")
        .replace("self_signed_if_missing = true", "self_signed_if_missing = false");
    let err = gw.reload(&missing_cert).await.unwrap_err();
    assert_eq!(err.key, "tls.cert");
    gw.wait_metric(r#"wsgate_config_reloads_total{result="failure"}"#, 1.0).await;
    assert_eq!(
        gw.running.as_ref().unwrap().gateway.runtime().config.server.idle_timeout,
        Duration::from_secs(540)
    );
    let mut ws = tx.reunite(rx).unwrap();
    assert_eq!(roundtrip(&mut ws, "still here").await, "still here");
    let mut fresh = gw.connect("/echo").await;
    assert_eq!(roundtrip(&mut fresh, "new session").await, "new session");
    // A listener change is reported as needing a restart.
    let notes = gw.reload(&text.replace("127.0.0.1:0\"]", "127.0.0.1:1\"]")).await.unwrap();
    assert!(notes.iter().any(|n| n.contains("server.listen")), "{notes:?}");
}

#[tokio::test]
async fn renewed_certificate_is_served_to_the_next_client() {
    let gw = Gw::echo().await;
    let text = config_text(gw.dir.path(), "", ECHO_ROUTE);
    let (cert, key) = (gw.dir.path().join("server.crt"), gw.dir.path().join("server.key"));
    let old = std::fs::read_to_string(&cert).unwrap();
    let mut before = gw.connect("/echo").await;
    std::fs::remove_file(&cert).unwrap();
    std::fs::remove_file(&key).unwrap();
    wsgate::tls::write_self_signed(&cert, &key).unwrap();
    let new = std::fs::read_to_string(&cert).unwrap();
    assert_ne!(old, new);
    gw.reload(&text).await.unwrap();
    // Only the new certificate is trusted by this client: the handshake proves which one is served.
    let mut opts = gw.options(Some(gw.token("alice")));
    opts.tls = Some(wsgate::tls::cli_client_config(Some(&cert), false).unwrap());
    let (mut after, _) = wsgate::client::connect(&gw.url("/echo"), &opts).await.unwrap();
    assert_eq!(roundtrip(&mut after, "new cert").await, "new cert");
    assert_eq!(roundtrip(&mut before, "old session").await, "old session");
}

#[tokio::test]
async fn new_firewall_rules_and_revocations_close_live_sessions_with_1008() {
    let up = upstream(Behaviour::Echo).await;
    let revoked = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(revoked.path(), "# none yet\n").unwrap();
    let rest = route("app", "/app", &up.url(), "jwt");
    let gw = Gw::start_with("", &rest, |t| {
        t.replace(
            "audience = [\"wsgate\"]",
            &format!("audience = [\"wsgate\"]\nrevoked_jti_file = \"{}\"", revoked.path().display()),
        )
    })
    .await;
    let text = config_text(gw.dir.path(), "", &rest).replace(
        "audience = [\"wsgate\"]",
        &format!("audience = [\"wsgate\"]\nrevoked_jti_file = \"{}\"", revoked.path().display()),
    );
    let token_with_jti = |sub: &str, jti: &str| gw.token_with(sub, Duration::from_secs(600), &[("jti", jti)]);
    let connect = |src: &str, token: String| {
        let mut o = gw.options(Some(token));
        o.source = Some(src.parse().unwrap());
        let url = gw.url("/app");
        async move { wsgate::client::connect(&url, &o).await.map(|(ws, _)| ws) }
    };
    let mut denied = connect("127.0.0.21", token_with_jti("a", "j-a")).await.unwrap();
    let mut stolen = connect("127.0.0.22", token_with_jti("b", "j-stolen")).await.unwrap();
    let mut fine = connect("127.0.0.23", token_with_jti("c", "j-c")).await.unwrap();
    for ws in [&mut denied, &mut stolen, &mut fine] {
        assert_eq!(roundtrip(ws, "before").await, "before");
    }
    std::fs::write(revoked.path(), "j-stolen\n").unwrap();
    gw.reload(&format!("[firewall]\ndeny = [\"127.0.0.21\"]\n{text}")).await.unwrap();
    assert_eq!(close_code(&mut denied).await, (1008, "access revoked".into()));
    assert_eq!(close_code(&mut stolen).await, (1008, "access revoked".into()));
    assert_eq!(roundtrip(&mut fine, "after").await, "after");
    // New connections: the denied IP is cut before TLS; the revoked token gets 401.
    assert!(connect("127.0.0.21", token_with_jti("a", "j-a2")).await.is_err());
    assert!(
        matches!(connect("127.0.0.24", token_with_jti("b", "j-stolen")).await, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 401)
    );
    gw.wait_metric(r#"wsgate_auth_failures_total{route="app",reason="revoked"}"#, 1.0)
        .await;
    gw.wait_metric(r#"wsgate_closes_total{route="app",code="1008",initiator="gateway"}"#, 2.0)
        .await;
}

#[tokio::test]
async fn a_reload_that_removes_the_key_cuts_sessions_whose_token_no_longer_verifies() {
    let gw = Gw::echo().await;
    let text = config_text(gw.dir.path(), "", ECHO_ROUTE);
    let mut old = gw.connect("/echo").await;
    assert_eq!(roundtrip(&mut old, "before").await, "before");
    // The secret leaked: the operator replaces it and reloads.
    std::fs::write(gw.dir.path().join("jwt.secret"), "a-brand-new-secret-of-32-bytes-or-more\n").unwrap();
    gw.reload(&text).await.unwrap();
    assert_eq!(close_code(&mut old).await.0, 1008);
    // A token signed with the new secret works.
    let mut fresh = gw.connect("/echo").await;
    assert_eq!(roundtrip(&mut fresh, "after").await, "after");
    // A reload that changes nothing leaves a valid session alone.
    gw.reload(&text).await.unwrap();
    assert_eq!(roundtrip(&mut fresh, "still").await, "still");
    // Changing the audience cuts it.
    gw.reload(&text.replace("audience = [\"wsgate\"]", "audience = [\"other\"]"))
        .await
        .unwrap();
    assert_eq!(close_code(&mut fresh).await.0, 1008);
}

#[tokio::test]
async fn a_first_message_token_sent_after_a_reload_is_checked_against_the_new_keys() {
    let edit = |t: String| {
        t.replace(
            "audience = [\"wsgate\"]",
            "audience = [\"wsgate\"]\ntoken_sources = [\"first_message\"]",
        )
    };
    let gw = Gw::start_with("", ECHO_ROUTE, edit).await;
    let text = edit(config_text(gw.dir.path(), "", ECHO_ROUTE));
    let old_token = gw.token("alice");
    // The 101 comes before the token: the session is admitted under the old config.
    let (mut ws, _) = gw.try_connect("/echo", &gw.options(None)).await.unwrap();
    std::fs::write(gw.dir.path().join("jwt.secret"), "a-brand-new-secret-of-32-bytes-or-more\n").unwrap();
    gw.reload(&text).await.unwrap();
    ws.send(Message::text(old_token)).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1008);
}

/// Connect to `path` with `token` and extra headers.
async fn connect_with(gw: &Gw, path: &str, token: Option<String>, headers: &[(&str, &str)]) -> wsgate::client::ClientStream {
    let mut o = gw.options(token);
    o.headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    gw.try_connect(path, &o).await.unwrap().0
}

#[tokio::test]
async fn a_reload_that_tightens_require_claims_closes_live_sessions_that_no_longer_pass() {
    let up = upstream(Behaviour::Echo).await;
    let rest = format!(
        "{}require_claims = {{ scope = \"chat\" }}\n",
        route("app", "/app", &up.url(), "jwt")
    );
    let gw = Gw::start("", &rest).await;
    let text = config_text(gw.dir.path(), "", &rest);
    let token = |sub: &str, scope: &str| gw.token_with(sub, Duration::from_secs(600), &[("scope", scope)]);
    let mut chatter = connect_with(&gw, "/app", Some(token("a", "chat")), &[]).await;
    let mut admin = connect_with(&gw, "/app", Some(token("b", "chat admin")), &[]).await;
    for ws in [&mut chatter, &mut admin] {
        assert_eq!(roundtrip(ws, "before").await, "before");
    }
    // The route now needs `admin`: a new `chat`-only client gets 403, and so does the
    // live one (closed with 1008); the admin stays.
    gw.reload(&text.replace("scope = \"chat\"", "scope = \"admin\"")).await.unwrap();
    assert_eq!(close_code(&mut chatter).await, (1008, "access revoked".into()));
    assert_eq!(roundtrip(&mut admin, "after").await, "after");
    let refused = gw.refusal("/app", &gw.options(Some(token("c", "chat")))).await;
    assert_eq!(refused.status(), 403);
}

#[tokio::test]
async fn a_reload_that_narrows_allowed_origins_closes_live_sessions_from_other_origins() {
    let up = upstream(Behaviour::Echo).await;
    let rest = format!(
        "{}allowed_origins = [\"https://a.example\", \"https://b.example\"]\n",
        route("app", "/app", &up.url(), "jwt")
    );
    let gw = Gw::start("", &rest).await;
    let text = config_text(gw.dir.path(), "", &rest);
    let mut from_a = connect_with(&gw, "/app", Some(gw.token("a")), &[("Origin", "https://a.example")]).await;
    let mut from_b = connect_with(&gw, "/app", Some(gw.token("b")), &[("Origin", "https://b.example")]).await;
    let mut no_origin = connect_with(&gw, "/app", Some(gw.token("c")), &[]).await;
    for ws in [&mut from_a, &mut from_b, &mut no_origin] {
        assert_eq!(roundtrip(ws, "before").await, "before");
    }
    gw.reload(&text.replace(", \"https://b.example\"", "")).await.unwrap();
    assert_eq!(close_code(&mut from_b).await, (1008, "access revoked".into()));
    assert_eq!(roundtrip(&mut from_a, "after").await, "after");
    // Clients without an Origin stay as long as the route allows them.
    assert_eq!(roundtrip(&mut no_origin, "after").await, "after");
    gw.reload(
        &text
            .replace(", \"https://b.example\"", "")
            .replace("allowed_origins", "allow_missing_origin = false\nallowed_origins"),
    )
    .await
    .unwrap();
    assert_eq!(close_code(&mut no_origin).await, (1008, "access revoked".into()));
    assert_eq!(roundtrip(&mut from_a, "still").await, "still");
}

#[tokio::test]
async fn a_reload_that_turns_on_auth_closes_anonymous_sessions_on_that_route() {
    let up = upstream(Behaviour::Echo).await;
    let rest = format!(
        "{}{}",
        route("open", "/open", &up.url(), "none"),
        route("other", "/other", &up.url(), "none")
    );
    let gw = Gw::start("", &rest).await;
    let text = config_text(gw.dir.path(), "", &rest);
    let mut anonymous = connect_with(&gw, "/open", None, &[]).await;
    let mut elsewhere = connect_with(&gw, "/other", None, &[]).await;
    assert_eq!(roundtrip(&mut anonymous, "before").await, "before");
    gw.reload(&text.replacen("auth = \"none\"", "auth = \"jwt\"", 1)).await.unwrap();
    assert_eq!(close_code(&mut anonymous).await, (1008, "access revoked".into()));
    assert_eq!(roundtrip(&mut elsewhere, "after").await, "after");
    // A client with a token is admitted on the route now, and stays through a reload.
    let mut with_token = connect_with(&gw, "/open", Some(gw.token("a")), &[]).await;
    gw.reload(&text.replacen("auth = \"none\"", "auth = \"jwt\"", 1)).await.unwrap();
    assert_eq!(roundtrip(&mut with_token, "kept").await, "kept");
}
