//! Upstream pools: round robin, failover before the 101, passive health, /readyz.

mod common;
use common::*;
use std::sync::{Arc, atomic::AtomicUsize, atomic::Ordering};
use std::time::Duration;

/// An upstream that accepts TCP and closes at once (its handshake always fails); counts attempts.
async fn broken_upstream() -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", l.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    (url, hits)
}

#[tokio::test]
async fn round_robin_with_failover_and_backoff() {
    let a = upstream(Behaviour::Echo).await;
    let b = upstream(Behaviour::Echo).await;
    let (broken, hits) = broken_upstream().await;
    let rest = format!(
        "[[routes]]\nname = \"pool\"\npath = \"/pool\"\nupstreams = [\"{}\", \"{}\", \"{broken}\"]\nauth = \"none\"\n",
        a.url(),
        b.url()
    );
    let gw = Gw::start("", &rest).await;
    for i in 0..12 {
        let (mut ws, _) = gw
            .try_connect("/pool", &gw.options(None))
            .await
            .unwrap_or_else(|s| panic!("attempt {i}: {s}"));
        assert_eq!(roundtrip(&mut ws, "x").await, "x");
    }
    // Spread over both healthy upstreams; the broken one was tried until its back-off began.
    assert!(a.requests() >= 4 && b.requests() >= 4, "{} / {}", a.requests(), b.requests());
    assert_eq!(a.requests() + b.requests(), 12);
    assert_eq!(hits.load(Ordering::SeqCst), 3, "broken upstream still tried during back-off");
    // Every client got a session: failures happened before the 101.
    assert_eq!(
        gw.metric(r#"wsgate_connections_rejected_total{reason="upstream_unavailable"}"#)
            .await,
        0.0
    );
    assert_eq!(http_get(gw.admin, "/readyz").await.0, 200);
}

#[tokio::test]
async fn readyz_reports_a_route_without_reachable_upstreams() {
    let (broken, hits) = broken_upstream().await;
    let gw = Gw::start("", &route("lonely", "/lonely", &broken, "none")).await;
    assert_eq!(http_get(gw.admin, "/readyz").await.0, 200);
    // The back-off starts at the third failure, so it cannot end within 1 s of this.
    let t0 = std::time::Instant::now();
    for _ in 0..3 {
        assert_eq!(gw.refusal("/lonely", &gw.options(None)).await.status(), 502);
    }
    assert_eq!(
        http_get(gw.admin, "/readyz").await,
        (503, "no reachable upstream for a route\n".to_string())
    );
    // In back-off: refused at once without touching the upstream, 502 as when it was
    // tried (503 is for drained or checked-down upstreams).
    assert_eq!(gw.refusal("/lonely", &gw.options(None)).await.status(), 502);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    // After the back-off (1 s) /readyz turns ready again and the upstream is tried again.
    wait_until("the back-off to end", TIMEOUT, || async {
        http_get(gw.admin, "/readyz").await.0 == 200
    })
    .await;
    assert!(t0.elapsed() >= Duration::from_secs(1), "back-off ended after {:?}", t0.elapsed());
    assert_eq!(gw.refusal("/lonely", &gw.options(None)).await.status(), 502);
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}

/// The back-off itself, on tokio's paused clock (no sockets involved, so nothing
/// auto-advances the clock behind the test's back).
#[tokio::test(start_paused = true)]
async fn backoff_starts_at_the_third_failure_doubles_and_a_success_clears_it() {
    use tokio::time::advance;
    use wsgate::health::{FIRST_BACKOFF, Health, MAX_BACKOFF};
    let h = Health::default();
    h.failed();
    h.failed();
    assert!(!h.is_down(), "down before the third failure");
    h.failed();
    assert!(h.is_down());
    advance(FIRST_BACKOFF - Duration::from_millis(1)).await;
    assert!(h.is_down(), "back-off ended early");
    advance(Duration::from_millis(1)).await;
    assert!(!h.is_down(), "back-off outlasted {FIRST_BACKOFF:?}");
    // The fourth failure in a row doubles it.
    h.failed();
    advance(FIRST_BACKOFF * 2 - Duration::from_millis(1)).await;
    assert!(h.is_down(), "second back-off did not double");
    advance(Duration::from_millis(1)).await;
    assert!(!h.is_down());
    // It never exceeds MAX_BACKOFF however many failures follow.
    for _ in 0..40 {
        h.failed();
    }
    advance(MAX_BACKOFF).await;
    assert!(!h.is_down(), "back-off exceeded {MAX_BACKOFF:?}");
    // One success clears the count: the next failure alone does not start a back-off.
    h.failed();
    assert!(h.is_down());
    h.succeeded();
    assert!(!h.is_down());
    h.failed();
    assert!(!h.is_down(), "a success did not reset the failure count");
}

/// An application that refuses every upgrade with `403` and a short body; counts requests.
async fn refusing_upstream() -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", l.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let body = "no such room\n";
                let resp = format!(
                    "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Secret-Hop: 1\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (url, hits)
}

#[tokio::test]
async fn an_application_4xx_passes_through_without_failover_or_health_effect() {
    let (refusing, hits) = refusing_upstream().await;
    let spare = upstream(Behaviour::Echo).await;
    let rest = format!(
        "[[routes]]\nname = \"app\"\npath = \"/app\"\nupstreams = [\"{refusing}\", \"{}\"]\nauth = \"none\"\n",
        spare.url()
    );
    let gw = Gw::start("", &rest).await;
    // Round robin alternates between the two. An attempt that starts at the refusing app
    // gets its 403 and body (no failover to the spare); the others reach the spare. Without
    // the fix every attempt succeeded by failing over, and the app went into back-off.
    let mut refused = 0;
    for _ in 0..10 {
        let opts = gw.options(None);
        match tokio::time::timeout(TIMEOUT, wsgate::client::connect(&gw.url("/app"), &opts))
            .await
            .expect("connect timed out")
        {
            Ok((mut ws, _)) => assert_eq!(roundtrip(&mut ws, "x").await, "x"),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 403);
                assert_eq!(resp.body().as_deref(), Some(&b"no such room\n"[..]));
                assert!(resp.headers().get("x-secret-hop").is_none());
                refused += 1;
            }
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }
    assert_eq!(refused, 5, "round robin: half the attempts start at the refusing app");
    assert_eq!(hits.load(Ordering::SeqCst), 5, "the refusing app was put in back-off or retried");
    assert_eq!(spare.requests(), 5, "a 4xx failed over to the spare");
    assert_eq!(http_get(gw.admin, "/readyz").await.0, 200, "a client's 4xx took the route down");
    gw.wait_metric(r#"wsgate_connections_rejected_total{reason="upstream_refused"}"#, 5.0)
        .await;
}
