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
    for _ in 0..3 {
        assert_eq!(gw.refusal("/lonely", &gw.options(None)).await.status(), 502);
    }
    assert_eq!(
        http_get(gw.admin, "/readyz").await,
        (503, "no reachable upstream for a route\n".to_string())
    );
    // In back-off: refused at once without touching the upstream.
    assert_eq!(gw.refusal("/lonely", &gw.options(None)).await.status(), 502);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    // After the back-off it is tried again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(http_get(gw.admin, "/readyz").await.0, 200);
    assert_eq!(gw.refusal("/lonely", &gw.options(None)).await.status(), 502);
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}
