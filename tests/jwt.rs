//! JWT beyond HS256: asymmetric keys from PEM files and JWKS (file and HTTPS URL),
//! key-confusion attacks, claims policy, identity headers, per-user caps, revocation
//! and the first-message token source.

mod common;
use base64::Engine;
use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use std::{
    sync::{Arc, atomic::AtomicUsize, atomic::Ordering},
    time::Duration,
};
use tokio_tungstenite::tungstenite::Message;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"sub": sub, "exp": now() + 600, "iss": "wsgate-test", "aud": "wsgate"})
}

/// A fresh key pair: (private PEM for signing, public PEM for the gateway).
fn keypair(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    (kp.serialize_pem(), kp.public_key_pem())
}

fn sign(alg: Algorithm, private_pem: &str, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let key = match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512 => {
            EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap()
        }
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_secret(private_pem.as_bytes()),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

async fn app_gateway(jwt_extra: &str, route_extra: &str) -> (Gw, Upstream) {
    let up = upstream(Behaviour::Echo).await;
    // Attack tests fail on purpose many times from 127.0.0.1: no auth-failure ban here.
    let rest = format!(
        "[limits]\nauth_failures_per_ip = 0\n{}{route_extra}\n",
        route("app", "/app", &up.url(), "jwt")
    );
    let gw = Gw::start_with("", &rest, |t| {
        t.replace("audience = [\"wsgate\"]", &format!("audience = [\"wsgate\"]\n{jwt_extra}"))
    })
    .await;
    (gw, up)
}

#[tokio::test]
async fn asymmetric_keys_from_pem_files_and_key_confusion_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa_priv, rsa_pub) = keypair(&rcgen::PKCS_RSA_SHA256);
    let (ec_priv, ec_pub) = keypair(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (ed_priv, ed_pub) = keypair(&rcgen::PKCS_ED25519);
    let mut files = Vec::new();
    for (name, pem) in [("rsa.pem", &rsa_pub), ("ec.pem", &ec_pub), ("ed.pem", &ed_pub)] {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        files.push(format!("\"{}\"", p.display()));
    }
    let jwt = format!(
        "algorithms = [\"HS256\", \"RS256\", \"PS256\", \"ES256\", \"EdDSA\"]\npublic_key_files = [{}]\n",
        files.join(", ")
    );
    let (gw, up) = app_gateway(&jwt, "").await;
    for (alg, key) in [
        (Algorithm::RS256, &rsa_priv),
        (Algorithm::PS256, &rsa_priv),
        (Algorithm::ES256, &ec_priv),
        (Algorithm::EdDSA, &ed_priv),
    ] {
        let token = sign(alg, key, None, &claims("alice"));
        let (mut ws, _) = gw
            .try_connect("/app", &gw.options(Some(token)))
            .await
            .unwrap_or_else(|s| panic!("{alg:?}: {s}"));
        assert_eq!(roundtrip(&mut ws, "signed").await, "signed");
    }
    // HS/RS confusion: an HS256 token keyed with the RSA *public* key is not accepted.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("mallory"),
        &EncodingKey::from_secret(rsa_pub.as_bytes()),
    )
    .unwrap();
    assert_eq!(gw.refusal("/app", &gw.options(Some(forged))).await.status(), 401);
    gw.wait_metric(r#"wsgate_auth_failures_total{route="app",reason="bad_signature"}"#, 1.0)
        .await;
    // An algorithm outside the allowlist (RS384) is refused as such.
    let rs384 = sign(Algorithm::RS384, &rsa_priv, None, &claims("alice"));
    assert_eq!(gw.refusal("/app", &gw.options(Some(rs384))).await.status(), 401);
    gw.wait_metric(r#"wsgate_auth_failures_total{route="app",reason="algorithm"}"#, 1.0)
        .await;
    // crit headers and string exp are refused; jku is never fetched (nothing listens there).
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let crit = format!("{}.{}.sig", b64(json!({"alg": "RS256", "crit": ["exp"]})), b64(claims("a")));
    assert_eq!(gw.refusal("/app", &gw.options(Some(crit))).await.status(), 401);
    let mut string_exp = claims("a");
    string_exp["exp"] = json!((now() + 600).to_string());
    assert_eq!(
        gw.refusal("/app", &gw.options(Some(sign(Algorithm::ES256, &ec_priv, None, &string_exp))))
            .await
            .status(),
        401
    );
    let mut jku_header = Header::new(Algorithm::RS256);
    jku_header.jku = Some("https://127.0.0.1:1/evil.json".into());
    let jku = jsonwebtoken::encode(&jku_header, &claims("a"), &EncodingKey::from_rsa_pem(rsa_priv.as_bytes()).unwrap()).unwrap();
    let (_ws, _) = gw.try_connect("/app", &gw.options(Some(jku))).await.unwrap();
    assert_eq!(up.requests(), 5);
}

/// A tiny HTTPS server that serves whatever JWKS `doc` holds and counts requests.
async fn jwks_server(dir: &std::path::Path, doc: Arc<std::sync::Mutex<String>>, hits: Arc<AtomicUsize>) -> (u16, std::path::PathBuf) {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cert, key) = (dir.join("idp.crt"), dir.join("idp.key"));
    wsgate::tls::write_self_signed(&cert, &key).unwrap();
    let chain: Vec<CertificateDer> = CertificateDer::pem_file_iter(&cert).unwrap().map(Result::unwrap).collect();
    let sc = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(&key).unwrap())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, doc, hits) = (acceptor.clone(), doc.clone(), hits.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                hits.fetch_add(1, Ordering::SeqCst);
                let body = doc.lock().unwrap().clone();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, cert)
}

/// A JWKS document with one RSA key per (kid, public PEM).
fn jwks_doc(keys: &[(&str, &str)]) -> String {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|(kid, private_pem)| {
            let kp = rcgen::KeyPair::from_pem(private_pem).unwrap();
            let rsa = aws_lc_rs::rsa::KeyPair::from_pkcs8(&kp.serialize_der()).unwrap();
            use aws_lc_rs::signature::KeyPair as _;
            let pk = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(rsa.public_key());
            let enc = |b: &[u8]| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b.iter().skip_while(|x| **x == 0).copied().collect::<Vec<u8>>())
            };
            json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": enc(&pk.n), "e": enc(&pk.e)})
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

#[tokio::test]
async fn jwks_url_with_rotation_and_rate_limited_refetch() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, _) = keypair(&rcgen::PKCS_RSA_SHA256);
    let (k2, _) = keypair(&rcgen::PKCS_RSA_SHA256);
    let doc = Arc::new(std::sync::Mutex::new(jwks_doc(&[("k1", &k1)])));
    let hits = Arc::new(AtomicUsize::new(0));
    let (port, ca) = jwks_server(dir.path(), doc.clone(), hits.clone()).await;
    let jwt = format!(
        "algorithms = [\"RS256\"]\njwks_url = \"https://localhost:{port}/.well-known/jwks.json\"\njwks_ca = \"{}\"\njwks_refresh = \"1s\"\n",
        ca.display()
    );
    let (gw, _up) = app_gateway(&jwt, "").await;
    assert_eq!(hits.load(Ordering::SeqCst), 1, "fetched once at start");
    gw.wait_metric_min(r#"wsgate_jwks_refreshes_total{result="success"}"#, 1.0).await;
    let t1 = sign(Algorithm::RS256, &k1, Some("k1"), &claims("alice"));
    let (mut ws, _) = gw.try_connect("/app", &gw.options(Some(t1))).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "k1").await, "k1");
    // The IdP rotates in k2; a token with the new kid triggers one refetch and works.
    *doc.lock().unwrap() = jwks_doc(&[("k1", &k1), ("k2", &k2)]);
    let t2 = sign(Algorithm::RS256, &k2, Some("k2"), &claims("alice"));
    let (mut ws, _) = gw.try_connect("/app", &gw.options(Some(t2))).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "k2").await, "k2");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // A flood of random kids cannot hammer the IdP: refetches are rate limited.
    for i in 0..20 {
        let t = sign(Algorithm::RS256, &k2, Some(&format!("random-{i}")), &claims("mallory"));
        assert_eq!(gw.refusal("/app", &gw.options(Some(t))).await.status(), 401);
    }
    gw.wait_metric(r#"wsgate_auth_failures_total{route="app",reason="unknown_kid"}"#, 20.0)
        .await;
    assert!(hits.load(Ordering::SeqCst) <= 3, "{} fetches", hits.load(Ordering::SeqCst));
}

#[tokio::test]
async fn jwks_file_keys_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, _) = keypair(&rcgen::PKCS_RSA_SHA256);
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks_doc(&[("file-key", &k1)])).unwrap();
    let (gw, _up) = app_gateway(&format!("algorithms = [\"RS256\"]\njwks_file = \"{}\"\n", path.display()), "").await;
    let t = sign(Algorithm::RS256, &k1, Some("file-key"), &claims("alice"));
    assert!(gw.try_connect("/app", &gw.options(Some(t))).await.is_ok());
    let wrong_kid = sign(Algorithm::RS256, &k1, Some("nope"), &claims("alice"));
    assert_eq!(gw.refusal("/app", &gw.options(Some(wrong_kid))).await.status(), 401);
}

#[tokio::test]
async fn claims_policy_identity_headers_user_cap_and_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let revoked = dir.path().join("revoked.txt");
    std::fs::write(&revoked, "# revoked token ids\nstolen-1\n").unwrap();
    let (gw, up) = app_gateway(
        &format!("revoked_jti_file = \"{}\"\n", revoked.display()),
        "require_claims = { scope = \"echo\" }\nforward_claims = { sub = \"x-wsgate-sub\", tenant = \"x-tenant\" }",
    )
    .await;
    let ok = gw.token_with("alice", Duration::from_secs(600), &[("scope", "read echo"), ("tenant", "acme")]);
    let mut opts = gw.options(Some(ok.clone()));
    opts.headers = vec![("X_WSGATE_SUB".into(), "root".into()), ("x-wsgate-sub".into(), "root".into())];
    let (mut ws, _) = gw.try_connect("/app", &opts).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "x").await, "x");
    let log = up.log.lock().unwrap().requests[0].1.clone();
    let subs: Vec<&String> = log
        .iter()
        .filter(|(k, _)| k.replace('_', "-") == "x-wsgate-sub")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(subs, vec!["alice"]);
    assert!(log.iter().any(|(k, v)| k == "x-tenant" && v == "acme"));
    // Missing scope → 403 forbidden.
    let no_scope = gw.token_with("bob", Duration::from_secs(600), &[("scope", "read")]);
    let resp = gw.refusal("/app", &gw.options(Some(no_scope))).await;
    assert_eq!(resp.status(), 403);
    gw.wait_metric(r#"wsgate_auth_failures_total{route="app",reason="forbidden"}"#, 1.0)
        .await;
    // Scope as an array works too.
    let arr = gw.token_with("carol", Duration::from_secs(600), &[("scope", r#"["echo"]"#)]);
    assert!(gw.try_connect("/app", &gw.options(Some(arr))).await.is_ok());
    // Revoked jti → 401 revoked.
    let stolen = gw.token_with("dave", Duration::from_secs(600), &[("scope", "echo"), ("jti", "stolen-1")]);
    assert_eq!(gw.refusal("/app", &gw.options(Some(stolen))).await.status(), 401);
    gw.wait_metric(r#"wsgate_auth_failures_total{route="app",reason="revoked"}"#, 1.0)
        .await;
    drop(ws);
}

#[tokio::test]
async fn per_user_cap_answers_429() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start(
        "",
        &format!("[limits]\nmax_connections_per_user = 2\n{}", route("app", "/app", &up.url(), "jwt")),
    )
    .await;
    let a = gw.try_connect("/app", &gw.options(Some(gw.token("erin")))).await.unwrap();
    let _b = gw.try_connect("/app", &gw.options(Some(gw.token("erin")))).await.unwrap();
    let resp = gw.refusal("/app", &gw.options(Some(gw.token("erin")))).await;
    assert_eq!(resp.status(), 429);
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="user_conn_limit"}"#, 1.0)
        .await;
    assert!(gw.try_connect("/app", &gw.options(Some(gw.token("frank")))).await.is_ok());
    drop(a);
    // The user slot is freed when the session ends, before its close is counted: one attempt.
    wait_sessions_ended(&gw, "app", 1.0).await;
    assert!(
        gw.try_connect("/app", &gw.options(Some(gw.token("erin")))).await.is_ok(),
        "user slot never freed"
    );
    assert_eq!(up.requests(), 4);
}

#[tokio::test]
async fn token_as_first_message() {
    let up = upstream(Behaviour::Echo).await;
    let rest = route("app", "/app", &up.url(), "jwt");
    let sources = "audience = [\"wsgate\"]\ntoken_sources = [\"authorization\", \"first_message\"]\nfirst_message_timeout = \"500ms\"";
    let gw = Gw::start_with("", &rest, |t| t.replace("audience = [\"wsgate\"]", sources)).await;
    // Raw token.
    let (mut ws, _) = gw.try_connect("/app", &gw.options(None)).await.unwrap();
    // A message sent right behind the token, in the same write, is relayed.
    ws.feed(Message::text(gw.token("alice"))).await.unwrap();
    ws.feed(Message::text("pipelined")).await.unwrap();
    ws.flush().await.unwrap();
    match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "pipelined"),
        other => panic!("{other:?}"),
    }
    assert_eq!(roundtrip(&mut ws, "after auth").await, "after auth");
    // JSON form.
    let (mut ws2, _) = gw.try_connect("/app", &gw.options(None)).await.unwrap();
    ws2.send(Message::text(json!({"token": gw.token("bob")}).to_string()))
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut ws2, "json").await, "json");
    // The token message never reached the upstream.
    let seen: Vec<String> = up
        .log
        .lock()
        .unwrap()
        .messages
        .iter()
        .filter_map(|m| m.to_text().ok().map(str::to_string))
        .collect();
    assert_eq!(seen, vec!["pipelined".to_string(), "after auth".to_string(), "json".to_string()]);
    // A bad token closes with 1008, and so does silence.
    let (mut bad, _) = gw.try_connect("/app", &gw.options(None)).await.unwrap();
    bad.send(Message::text("not-a-token")).await.unwrap();
    assert_eq!(close_code(&mut bad).await.0, 1008);
    let (mut silent, _) = gw.try_connect("/app", &gw.options(None)).await.unwrap();
    assert_eq!(close_code(&mut silent).await.0, 1008);
    gw.wait_metric(r#"wsgate_auth_failures_total{route="app",reason="malformed"}"#, 1.0)
        .await;
    gw.wait_metric(r#"wsgate_auth_failures_total{route="app",reason="missing"}"#, 1.0)
        .await;
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn a_reload_stops_the_old_key_sets_refresh_loop() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, _) = keypair(&rcgen::PKCS_RSA_SHA256);
    let doc = Arc::new(std::sync::Mutex::new(jwks_doc(&[("k1", &k1)])));
    let (old_hits, new_hits) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (old_port, ca) = jwks_server(dir.path(), doc.clone(), old_hits.clone()).await;
    let jwt = |port: u16| {
        format!(
            "algorithms = [\"RS256\"]\njwks_url = \"https://localhost:{port}/.well-known/jwks.json\"\njwks_ca = \"{}\"\njwks_refresh = \"1s\"\n",
            ca.display()
        )
    };
    let (gw, _up) = app_gateway(&jwt(old_port), "").await;
    // A live session keeps the first runtime (and its key set) alive across the reload.
    let t1 = sign(Algorithm::RS256, &k1, Some("k1"), &claims("alice"));
    let (mut ws, _) = gw.try_connect("/app", &gw.options(Some(t1))).await.unwrap();
    let new_dir = tempfile::tempdir().unwrap();
    let (new_port, new_ca) = jwks_server(new_dir.path(), doc.clone(), new_hits.clone()).await;
    let mut config = gw.config.clone();
    let url = config.jwt.jwks_url.as_mut().unwrap();
    url.url = format!("https://localhost:{new_port}/.well-known/jwks.json").parse().unwrap();
    url.ca = Some(wsgate::config::Located {
        value: new_ca,
        key: "jwt.jwks_ca".into(),
        line: None,
    });
    let gateway = gw.running.as_ref().unwrap().gateway.clone();
    gateway.reload(config).await.unwrap();
    assert!(new_hits.load(Ordering::SeqCst) >= 1, "the new key set was not fetched");
    // Refreshing every second, a loop left running would fetch the old URL 2-3 times.
    let before = old_hits.load(Ordering::SeqCst);
    // Three more refreshes of the new set span at least two refresh periods, in which a
    // surviving old loop would have fetched at least once.
    let fetched = new_hits.load(Ordering::SeqCst);
    wait_until("three refreshes of the new key set", TIMEOUT, || async {
        new_hits.load(Ordering::SeqCst) >= fetched + 3
    })
    .await;
    let stale = old_hits.load(Ordering::SeqCst) - before;
    assert_eq!(stale, 0, "the replaced key set was still refreshed {stale} times");
    assert!(new_hits.load(Ordering::SeqCst) >= 2, "the current key set is not refreshed");
    assert_eq!(roundtrip(&mut ws, "still here").await, "still here");
}

/// Two providers holding one key (the same RSA key as a PEM file and in a JWKS, or
/// served by two JWKS URLs), with nothing apart in issuer or audience, would each
/// accept the other's tokens. Static keys: a config error naming the key's line.
/// Fetched keys: every such token is refused. Issuers apart: each passes on its own.
#[tokio::test]
async fn providers_sharing_a_key_are_refused_unless_issuers_tell_them_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = keypair(&rcgen::PKCS_RSA_SHA256);
    let pem = dir.path().join("a.pem");
    std::fs::write(&pem, &public).unwrap();
    let jwks = dir.path().join("b.json");
    std::fs::write(&jwks, jwks_doc(&[("k", &private)])).unwrap();
    let routes = "[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"builtin:echo\"]\nprovider = \"a\"\n\
                  [[routes]]\nname = \"b\"\npath = \"/b\"\nupstreams = [\"builtin:echo\"]\nprovider = \"b\"\n";
    let text = |a: &str, b: &str| {
        format!(
            "[providers.a]\nkind = \"jwt\"\nalgorithms = [\"RS256\"]\n{a}\n\n[providers.b]\nkind = \"jwt\"\nalgorithms = [\"RS256\"]\n{b}\n\n{routes}",
        )
    };
    let files = |extra_a: &str, extra_b: &str| {
        let t = text(
            &format!("public_key_files = [\"{}\"]\n{extra_a}", pem.display()),
            &format!("jwks_file = \"{}\"\n{extra_b}", jwks.display()),
        );
        let c = wsgate::Config::from_toml_str(&t, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        wsgate::auth::Methods::load(&c, None, false).map(|_| ())
    };
    let e = files("", "").unwrap_err();
    assert_eq!((e.key.as_str(), e.line), ("providers.b.jwks_file", Some(10)), "{e}");
    assert!(e.message.contains("[providers.a]") && e.message.contains("issuer"), "{e}");
    let e = files("issuer = \"https://a.test\"", "").unwrap_err();
    assert!(e.message.contains("apart"), "one issuer alone tells nothing apart: {e}");
    files("issuer = \"https://a.test\"", "issuer = \"https://b.test\"").unwrap();
    files("audience = [\"a\"]", "audience = [\"b\"]").unwrap();
    assert!(
        files("audience = [\"a\", \"c\"]", "audience = [\"b\", \"c\"]").is_err(),
        "a shared audience"
    );

    // The same key served by two JWKS URLs: seen only once fetched, so refused per token.
    let doc = Arc::new(std::sync::Mutex::new(jwks_doc(&[("k", &private)])));
    let hits = Arc::new(AtomicUsize::new(0));
    let (port, ca) = jwks_server(dir.path(), doc.clone(), hits.clone()).await;
    let url = |path: &str, issuer: &str| {
        format!(
            "jwks_url = \"https://localhost:{port}/{path}\"\njwks_ca = \"{}\"\n{issuer}",
            ca.display()
        )
    };
    let claims_of = |iss: Option<&str>| {
        let mut c = json!({"sub": "alice", "exp": now() + 600});
        if let Some(i) = iss {
            c["iss"] = json!(i);
        }
        c
    };
    let gw = Gw::start(
        "",
        &format!(
            "[limits]\nauth_failures_per_ip = 0\n{}",
            text(&url("a.json", ""), &url("b.json", ""))
        ),
    )
    .await;
    let token = sign(Algorithm::RS256, &private, Some("k"), &claims_of(None));
    assert_eq!(status(&gw, "/a", token.clone()).await, 401);
    assert_eq!(status(&gw, "/b", token).await, 401);
    gw.wait_metric(r#"wsgate_auth_failures_total{route="a",reason="bad_signature"}"#, 1.0)
        .await;

    let apart = text(
        &url("a.json", "issuer = \"https://a.test\"\n"),
        &url("b.json", "issuer = \"https://b.test\"\n"),
    );
    let gw = Gw::start("", &format!("[limits]\nauth_failures_per_ip = 0\n{apart}")).await;
    let of_a = sign(Algorithm::RS256, &private, Some("k"), &claims_of(Some("https://a.test")));
    let of_b = sign(Algorithm::RS256, &private, Some("k"), &claims_of(Some("https://b.test")));
    assert_eq!(status(&gw, "/a", of_a.clone()).await, 101);
    assert_eq!(status(&gw, "/b", of_b.clone()).await, 101);
    assert_eq!(status(&gw, "/b", of_a).await, 401);
    assert_eq!(status(&gw, "/a", of_b).await, 401);

    // A provider without an issuer whose JWKS takes in a's key: a's tokens (they carry
    // a's issuer, which a pins) still pass on a's routes and never on b's; b keeps
    // tokens only a would never accept (no issuer).
    let one_sided = text(&url("a.json", "issuer = \"https://a.test\"\n"), &url("b.json", ""));
    let gw = Gw::start("", &format!("[limits]\nauth_failures_per_ip = 0\n{one_sided}")).await;
    let of_a = sign(Algorithm::RS256, &private, Some("k"), &claims_of(Some("https://a.test")));
    let bare = sign(Algorithm::RS256, &private, Some("k"), &claims_of(None));
    assert_eq!(status(&gw, "/a", of_a.clone()).await, 101);
    assert_eq!(status(&gw, "/b", of_a).await, 401);
    assert_eq!(status(&gw, "/a", bare.clone()).await, 401);
    assert_eq!(status(&gw, "/b", bare).await, 101);

    // Audiences apart, but a token made for both: neither route takes it.
    let both = text(
        &url("a.json", "audience = [\"chat\"]\n"),
        &url("b.json", "audience = [\"partners\"]\n"),
    );
    let gw = Gw::start("", &format!("[limits]\nauth_failures_per_ip = 0\n{both}")).await;
    let mut c = claims_of(None);
    c["aud"] = json!(["chat", "partners"]);
    let spanning = sign(Algorithm::RS256, &private, Some("k"), &c);
    c["aud"] = json!("chat");
    let chat = sign(Algorithm::RS256, &private, Some("k"), &c);
    assert_eq!(status(&gw, "/a", spanning.clone()).await, 401);
    assert_eq!(status(&gw, "/b", spanning).await, 401);
    assert_eq!(status(&gw, "/a", chat.clone()).await, 101);
    assert_eq!(status(&gw, "/b", chat).await, 401);

    // The same JWKS URL for both, nothing apart: refused at load.
    let same = text(&url("a.json", ""), &url("a.json", ""));
    let c = wsgate::Config::from_toml_str(&common::config_text(dir.path(), "", &same), "t.toml").unwrap();
    let e = wsgate::auth::Methods::load(&c, None, false).map(|_| ()).unwrap_err();
    assert!(e.key.starts_with("providers.b") && e.message.contains("[providers.a]"), "{e}");
}

async fn status(gw: &Gw, path: &str, token: String) -> u16 {
    match gw.try_connect(path, &gw.options(Some(token))).await {
        Ok(_) => 101,
        Err(s) => s,
    }
}
