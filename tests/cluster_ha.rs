//! Cluster mode through Redis failures (DESIGN.md section 7, its highly available
//! part): Sentinel failover, a Redis Cluster, cold starts during an outage with and
//! without a state file, shared auth bans, revocations that outlast their token's
//! leeway, and the breaker's recovery. Real `redis-server` processes on free loopback
//! ports (`scripts/test.sh` installs them).

mod common;
use common::cluster::*;
use common::*;
use std::time::{Duration, Instant};

fn mode(m: &str) -> String {
    format!(r#"wsgate_cluster_mode{{mode="{m}"}}"#)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Whether `sub` gets a session on `gw` (an echo comes back); the session is kept open
/// in `held` when it does.
async fn session(gw: &Gw, sub: &str, held: &mut Vec<wsgate::client::ClientStream>) -> bool {
    match gw.try_connect("/echo", &gw.options(Some(gw.token(sub)))).await {
        Ok((mut ws, _)) => {
            assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
            held.push(ws);
            true
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_revocation_lasts_its_tokens_exp_plus_leeway_across_resyncs() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let a = instance(&redis, dir.path()).await;
    let b = instance(&redis, dir.path()).await;
    // A token that expires in 2 s: verifiers accept it for the 30 s leeway after that.
    let token = a.token_with("mallory", Duration::from_secs(2), &[("jti", "short-1")]);
    let exp = unix_now() + 2;
    let (status, _) = admin(a.admin, "POST", "/v1/revocations", &format!(r#"{{"jti":"short-1","exp":{exp}}}"#)).await;
    assert_eq!(status, 200);
    // Two resyncs (every 5 s) later the token is past its exp but within the leeway:
    // still refused on both instances (before, Redis dropped it at exp and the resync
    // lifted it here).
    tokio::time::sleep(Duration::from_secs(11)).await; // kept: the time the revocation must outlast
    for gw in [&a, &b] {
        assert_eq!(gw.try_connect("/echo", &gw.options(Some(token.clone()))).await.err(), Some(401));
    }
    b.wait_metric(r#"wsgate_auth_failures_total{route="echo",reason="revoked"}"#, 1.0)
        .await;
    let score: Option<f64> = {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.port)).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("ZSCORE")
            .arg("test:revoked")
            .arg("short-1")
            .query_async(&mut con)
            .await
            .unwrap()
    };
    assert_eq!(score, Some((exp + 30) as f64), "kept in Redis until exp + leeway");
}

#[tokio::test]
async fn an_auth_ban_on_one_instance_refuses_the_address_on_the_others_within_a_second() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let limits = "auth_failures_per_ip = 3\nauth_ban = \"10m\"";
    let a = instance_limited(&redis, dir.path(), limits).await;
    let b = instance_limited(&redis, dir.path(), limits).await;
    let bad = |gw: &Gw| {
        let mut o = gw.options(Some("not.a.token".into()));
        o.source = Some("127.0.0.31".parse().unwrap());
        o
    };
    assert!(served(&b, "127.0.0.31").await);
    for _ in 0..3 {
        assert_eq!(a.try_connect("/echo", &bad(&a)).await.err(), Some(401));
    }
    let banned_at = Instant::now();
    assert_eq!(a.try_connect("/echo", &bad(&a)).await.err(), Some(429));
    // The guesser moves to the other instance: refused there too, within a second.
    let refused_on_b = poll_until(Duration::from_secs(1), || async {
        let o = from(&b, b.token("guesser"), "127.0.0.31");
        (b.try_connect("/echo", &o).await.err() == Some(429)).then_some(())
    })
    .await;
    assert!(refused_on_b.is_some(), "the auth ban did not reach the other instance");
    assert!(banned_at.elapsed() < Duration::from_secs(2));
    assert!(served(&b, "127.0.0.32").await, "only the guesser's address is refused");
    b.wait_metric_min(r#"wsgate_connections_rejected_total{reason="auth_banned"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn a_cold_start_during_an_outage_uses_the_state_file_and_is_not_ready_without_one() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("cluster-state.json");
    let url = format!("redis = \"redis://127.0.0.1:{}/0\"\n", redis.port);
    let with_state = format!("{url}state_file = \"{}\"\n", state.display());
    let limits = "max_connections_per_user = 4";
    // Two instances live: the file remembers that the cap is shared by two.
    let a = connected_instance(&with_state, dir.path(), limits).await;
    let a2 = connected_instance(&url, dir.path(), limits).await;
    let (status, _) = admin(a.admin, "POST", "/v1/bans", r#"{"cidr":"127.0.0.41","for":"1h"}"#).await;
    assert_eq!(status, 200);
    let (status, _) = admin(a.admin, "POST", "/v1/revocations", r#"{"jti":"cold-1","exp":4102444800}"#).await;
    assert_eq!(status, 200);
    wait_until(
        "the state file holds the ban, the revocation and two instances",
        TIMEOUT,
        || async {
            std::fs::read_to_string(&state)
                .is_ok_and(|t| t.contains("127.0.0.41/32") && t.contains("cold-1") && t.contains("\"instances\":2"))
        },
    )
    .await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o600);
    a.stop().await;
    a2.stop().await;
    redis.kill();

    // Started while Redis is down, with the file: ready, and refusing what the cluster refuses.
    let b = instance_with(&with_state, dir.path(), limits).await;
    let (ready, _) = http_get(b.admin, "/readyz").await;
    assert_eq!(ready, 200);
    assert!(!served(&b, "127.0.0.41").await, "the banned address is refused");
    let revoked = b.token_with("eve", Duration::from_secs(600), &[("jti", "cold-1")]);
    assert_eq!(b.try_connect("/echo", &b.options(Some(revoked))).await.err(), Some(401));
    // Its share of the per-user cap: 4 / 2 instances, not the whole cap.
    let mut held = Vec::new();
    let admitted = {
        let mut n = 0;
        for _ in 0..4 {
            n += usize::from(session(&b, "frank", &mut held).await);
        }
        n
    };
    assert_eq!(admitted, 2);

    // Without a file and without Redis: not ready, and no share of a cap is granted.
    let other = tempfile::tempdir().unwrap();
    let c = instance_with(&url, other.path(), limits).await;
    let (ready, body) = http_get(c.admin, "/readyz").await;
    assert_eq!(ready, 503, "{body}");
    assert!(body.contains("cluster state"), "{body}");
    assert_eq!(c.try_connect("/echo", &c.options(Some(c.token("grace")))).await.err(), Some(503));
    // Redis back: synced, ready, and the cap is shared again.
    let _redis = Redis::start_on(redis.port);
    wait_until("the instance synced with Redis", TIMEOUT, || async {
        http_get(c.admin, "/readyz").await.0 == 200
    })
    .await;
    c.wait_metric(&mode("shared"), 1.0).await;
    assert!(session(&c, "grace", &mut held).await);
}

#[tokio::test]
async fn after_redis_resumes_every_instance_is_shared_again_within_five_seconds_busy_or_idle() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let busy = instance_limited(&redis, dir.path(), "max_connections_per_user = 50").await;
    let idle = instance_limited(&redis, dir.path(), "max_connections_per_user = 50").await;
    let before = busy.metric(r#"wsgate_cluster_ops_total{op="admit",result="timeout"}"#).await;
    redis.signal("STOP");
    // While the breaker is open, handshakes use the fallback at once: of 20, at most the
    // first few wait for Redis (the breaker opens after 3 failures in a row).
    let mut held = Vec::new();
    for i in 0..20 {
        assert!(session(&busy, &format!("u{i}"), &mut held).await);
    }
    let waited = busy.metric(r#"wsgate_cluster_ops_total{op="admit",result="timeout"}"#).await - before;
    assert!(waited <= 4.0, "{waited} handshakes waited for the hung Redis");
    busy.wait_metric(&mode("local"), 1.0).await;
    idle.wait_metric(&mode("local"), 1.0).await;
    redis.signal("CONT");
    let resumed = Instant::now();
    for gw in [&busy, &idle] {
        gw.wait_metric(&mode("shared"), 1.0).await;
    }
    assert!(
        resumed.elapsed() < Duration::from_secs(5),
        "shared again after {:?}",
        resumed.elapsed()
    );
    // Every Redis call is timed, the connect path's included.
    let text = busy.metrics_text().await;
    assert!(
        metric_value(&text, r#"wsgate_cluster_op_duration_seconds_count{op="admit"}"#) >= 3.0,
        "admits not observed"
    );
}

#[tokio::test]
async fn sentinel_failover_keeps_sessions_bans_kicks_and_caps_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Redis::start();
    let replica = Redis::start_replica_of(&master);
    let sentinels: Vec<Redis> = (0..3).map(|_| Redis::start_sentinel(dir.path(), &master, "wsgate")).collect();
    let list = sentinels
        .iter()
        .map(|s| format!("\"redis://127.0.0.1:{}\"", s.port))
        .collect::<Vec<_>>()
        .join(", ");
    let cluster = format!("sentinels = [{list}]\nsentinel_master = \"wsgate\"\n");
    let limits = "max_connections_per_user = 2";
    let a = connected_instance(&cluster, dir.path(), limits).await;
    let b = connected_instance(&cluster, dir.path(), limits).await;
    // The cap holds across instances through Sentinel's master.
    let mut held = Vec::new();
    assert!(session(&a, "ivan", &mut held).await);
    assert!(session(&b, "ivan", &mut held).await);
    assert!(!session(&a, "ivan", &mut held).await);
    let mut judy = a.connect("/echo").await;
    assert_eq!(roundtrip(&mut judy, "before").await, "before");

    // The master dies; Sentinel promotes the replica.
    master.kill();
    wait_until("the replica is promoted", Duration::from_secs(30), || async {
        replica.role().await == "master"
    })
    .await;
    for gw in [&a, &b] {
        gw.wait_metric(&mode("shared"), 1.0).await;
    }
    // Sessions stayed up.
    assert_eq!(roundtrip(&mut judy, "after").await, "after");
    assert_eq!(roundtrip(&mut held[0], "after").await, "after");
    // Bans and kicks keep propagating through the new master.
    let (status, body) = admin(a.admin, "POST", "/v1/bans", r#"{"cidr":"127.0.0.51","for":"5m"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(true)), "{body}");
    wait_until("the ban reached the other instance", Duration::from_secs(2), || async {
        !served(&b, "127.0.0.51").await
    })
    .await;
    let mut on_b = b.connect("/echo").await; // sub "alice"
    let (status, body) = admin(a.admin, "POST", "/v1/kick", r#"{"sub":"alice"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(true)), "{body}");
    assert_eq!(close_code(&mut on_b).await.0, 1008);
    // The cap still holds: ivan's two sessions are counted on the new master.
    assert!(!session(&b, "ivan", &mut held).await);
    drop(sentinels);
}

#[tokio::test]
async fn a_redis_cluster_shares_caps_kicks_and_bans_without_crossslot_errors() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = redis_cluster(dir.path()).await;
    let seeds = nodes
        .iter()
        .map(|n| format!("\"redis://127.0.0.1:{}\"", n.port))
        .collect::<Vec<_>>()
        .join(", ");
    let cluster = format!("redis_cluster = [{seeds}]\n");
    let limits = "max_connections_per_user = 2";
    let a = connected_instance(&cluster, dir.path(), limits).await;
    let b = connected_instance(&cluster, dir.path(), limits).await;
    // Per-user caps for users whose keys land in different slots.
    let mut held = Vec::new();
    for user in ["kim", "lee", "max", "ned"] {
        assert!(session(&a, user, &mut held).await, "{user}");
        assert!(session(&b, user, &mut held).await, "{user}");
        assert!(!session(&a, user, &mut held).await, "{user} over the cap");
    }
    // Kicks and bans reach the other instance.
    let mut on_b = b.connect("/echo").await;
    let (status, body) = admin(a.admin, "POST", "/v1/kick", r#"{"sub":"alice"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(true)), "{body}");
    assert_eq!(close_code(&mut on_b).await.0, 1008);
    let (status, _) = admin(b.admin, "POST", "/v1/bans", r#"{"cidr":"127.0.0.62","for":"5m"}"#).await;
    assert_eq!(status, 200);
    wait_until("the ban reached the other instance", Duration::from_secs(2), || async {
        !served(&a, "127.0.0.62").await
    })
    .await;
    // Heartbeats ran (each key its own slot) and nothing failed.
    tokio::time::sleep(Duration::from_secs(6)).await; // kept: one heartbeat period must pass
    for gw in [&a, &b] {
        let text = gw.metrics_text().await;
        assert!(
            metric_value(&text, r#"wsgate_cluster_ops_total{op="heartbeat",result="ok"}"#) >= 2.0,
            "{text}"
        );
        for op in ["admit", "heartbeat", "ban", "revoke"] {
            let errors = metric_value(&text, &format!(r#"wsgate_cluster_ops_total{{op="{op}",result="error"}}"#));
            assert_eq!(errors, 0.0, "{op}");
        }
    }
    // No node ever answered CROSSSLOT (Redis counts every error reply by its kind).
    for node in &nodes {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", node.port)).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let stats: String = redis::cmd("INFO").arg("errorstats").query_async(&mut con).await.unwrap();
        assert!(!stats.contains("CROSSSLOT"), "{stats}");
    }
}

#[tokio::test]
async fn three_instances_behind_haproxy_with_proxy_v2_share_caps_bans_and_client_addresses() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let server = "client_ip_source = \"proxy_protocol\"\ntrusted_proxies = [\"127.0.0.1/32\"]";
    let cluster = format!("redis = \"redis://127.0.0.1:{}/0\"\n", redis.port);
    let limits = "max_connections_per_user = 3";
    let mut gws = Vec::new();
    for _ in 0..3 {
        let gw = instance_with_server(server, &cluster, dir.path(), limits).await;
        gw.wait_metric("wsgate_cluster_up", 1.0).await;
        gws.push(gw);
    }
    let lb = Haproxy::start(&[&gws[0], &gws[1], &gws[2]]);
    let url = format!("wss://localhost:{}/echo", lb.port);
    let via_lb = |sub: &str, source: &str| {
        let mut o = gws[0].options(Some(gws[0].token(sub)));
        o.source = Some(source.parse().unwrap());
        o
    };
    // HAProxy spreads the sessions (leastconn); the user's cap holds across all three.
    let mut held = Vec::new();
    for i in 0..3 {
        let (mut ws, _) = wsgate::client::connect(&url, &via_lb("olga", &format!("127.0.0.7{i}")))
            .await
            .unwrap();
        assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
        held.push(ws);
    }
    let over = wsgate::client::connect(&url, &via_lb("olga", "127.0.0.74")).await;
    assert!(matches!(over, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 429));
    let spread = {
        let mut n = 0;
        for gw in &gws {
            n += usize::from(gw.metric(r#"wsgate_connections_active{route="echo"}"#).await > 0.0);
        }
        n
    };
    assert!(spread >= 2, "sessions landed on {spread} instance(s)");
    // Each instance sees the client's own address: a ban of one client's address on one
    // instance refuses that client through the balancer, whichever instance it reaches.
    let (status, _) = admin(gws[1].admin, "POST", "/v1/bans", r#"{"cidr":"127.0.0.80","for":"5m"}"#).await;
    assert_eq!(status, 200);
    for _ in 0..3 {
        let banned = wsgate::client::connect(&url, &via_lb("pete", "127.0.0.80")).await;
        assert!(banned.is_err(), "a banned address got through");
    }
    let (mut ok, _) = wsgate::client::connect(&url, &via_lb("pete", "127.0.0.81")).await.unwrap();
    assert_eq!(roundtrip(&mut ok, "fine").await, "fine");
    // Each instance logs the client's own address, not HAProxy's.
    let mut seen = Vec::new();
    for gw in &gws {
        let (_, sessions) = admin(gw.admin, "GET", "/v1/sessions?sub=olga", "").await;
        for s in sessions["sessions"].as_array().into_iter().flatten() {
            seen.push(s["client_ip"].as_str().unwrap_or_default().to_string());
        }
    }
    seen.sort();
    assert_eq!(seen, ["127.0.0.70", "127.0.0.71", "127.0.0.72"]);
}
