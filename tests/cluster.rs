//! Cluster mode, first part (DESIGN.md section 7): admin bans, revocations and kicks made
//! on one instance reach every instance through a real `redis-server` (started here on
//! a free loopback port; `scripts/test.sh` installs it).

mod common;
use common::cluster::*;
use common::*;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn an_action_on_one_instance_reaches_every_instance_within_a_second() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let gws = [
        instance(&redis, dir.path()).await,
        instance(&redis, dir.path()).await,
        instance(&redis, dir.path()).await,
    ];

    // Kicks: alice's sessions on the two other instances close; p99 (here the worst of
    // 10 rounds) under a second from the request.
    let mut worst = Duration::ZERO;
    for round in 0..10 {
        let mut a = gws[1].connect("/echo").await;
        let mut b = gws[2].connect("/echo").await;
        assert_eq!(roundtrip(&mut a, "x").await, "x");
        let started = Instant::now();
        let (status, body) = admin(gws[round % 3].admin, "POST", "/v1/kick", r#"{"sub":"alice"}"#).await;
        assert_eq!((status, body["shared"].as_bool()), (200, Some(true)), "{body}");
        assert_eq!(close_code(&mut a).await.0, 1008);
        assert_eq!(close_code(&mut b).await.0, 1008);
        worst = worst.max(started.elapsed());
    }
    assert!(worst < Duration::from_secs(1), "slowest kick took {worst:?}");

    // A ban on one instance refuses the range on the others.
    assert!(served(&gws[2], "127.0.0.9").await);
    let (status, body) = admin(gws[0].admin, "POST", "/v1/bans", r#"{"cidr":"127.0.0.9","for":"5m"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(true)));
    for gw in &gws[1..] {
        wait_until("the ban reached the instance", Duration::from_secs(1), || async {
            !served(gw, "127.0.0.9").await
        })
        .await;
    }
    assert!(served(&gws[1], "127.0.0.10").await, "only the banned address is refused");

    // A revocation on one instance refuses the token on the others.
    let token = gws[0].token_with("carol", Duration::from_secs(600), &[("jti", "stolen-1")]);
    let mut live = gws[2].try_connect("/echo", &gws[2].options(Some(token.clone()))).await.unwrap().0;
    let (status, _) = admin(gws[1].admin, "POST", "/v1/revocations", r#"{"jti":"stolen-1","exp":4102444800}"#).await;
    assert_eq!(status, 200);
    assert_eq!(close_code(&mut live).await.0, 1008);
    for gw in &gws {
        wait_until("the revocation reached the instance", Duration::from_secs(1), || async {
            gw.try_connect("/echo", &gw.options(Some(token.clone()))).await.err() == Some(401)
        })
        .await;
    }

    // Lifted on a third instance, the ban is gone everywhere.
    let (status, _) = admin(gws[2].admin, "DELETE", "/v1/bans/127.0.0.9%2F32", "").await;
    assert_eq!(status, 200);
    for gw in &gws {
        wait_until("the unban reached the instance", Duration::from_secs(1), || async {
            served(gw, "127.0.0.9").await
        })
        .await;
    }
}

#[tokio::test]
async fn without_redis_actions_hold_locally_and_sharing_resumes_when_it_returns() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let a = instance(&redis, dir.path()).await;
    let b = instance(&redis, dir.path()).await;
    redis.kill();
    wait_until("the instance saw Redis go", TIMEOUT, || async {
        a.metric("wsgate_cluster_up").await == 0.0
    })
    .await;
    // The action is taken here, and the answer says it was not shared.
    let (status, body) = admin(a.admin, "POST", "/v1/bans", r#"{"cidr":"127.0.0.11","for":"5m"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(false)));
    assert!(!served(&a, "127.0.0.11").await);
    assert!(served(&b, "127.0.0.12").await, "the other instance keeps serving");
    // Redis back (empty): both reconnect by themselves and share again.
    let _redis = Redis::start_on(redis.port);
    for gw in [&a, &b] {
        wait_until("the instance reconnected", TIMEOUT, || async {
            gw.metric("wsgate_cluster_up").await == 1.0
        })
        .await;
    }
    // The ban made while Redis was away is written at the reconnect and reaches b.
    wait_until("the kept ban reached the other instance", wsgate::cluster::RESYNC * 2, || async {
        !served(&b, "127.0.0.11").await
    })
    .await;
    let (status, body) = admin(a.admin, "POST", "/v1/bans", r#"{"cidr":"127.0.0.12","for":"5m"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(true)));
    wait_until("the ban reached the other instance", Duration::from_secs(1), || async {
        !served(&b, "127.0.0.12").await
    })
    .await;
    assert!(
        b.metric(r#"wsgate_cluster_ops_total{op="sync",result="ok"}"#).await >= 2.0,
        "synced at each connect"
    );
}

#[tokio::test]
async fn rediss_verifies_the_server_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start_tls(dir.path());
    let url = format!("redis = \"rediss://127.0.0.1:{}/0\"\n", redis.port);
    // Trusted through redis_ca: connected, and actions are shared.
    let ca = format!("redis_ca = \"{}\"\n", dir.path().join("redis-ca.pem").display());
    let trusting = instance_with(&format!("{url}{ca}"), dir.path(), "").await;
    wait_until("connected over TLS", TIMEOUT, || async {
        trusting.metric("wsgate_cluster_up").await == 1.0
    })
    .await;
    let (status, body) = admin(trusting.admin, "POST", "/v1/kick", r#"{"sub":"nobody"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(true)));
    // The same server against the system's roots: refused, never used.
    let strict = instance_with(&url, dir.path(), "").await;
    let (status, body) = admin(strict.admin, "POST", "/v1/kick", r#"{"sub":"nobody"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(false)));
    assert_eq!(strict.metric("wsgate_cluster_up").await, 0.0);
    assert!(strict.metric(r#"wsgate_cluster_ops_total{op="revoke",result="error"}"#).await >= 1.0);
}

#[tokio::test]
async fn odd_scores_in_redis_do_not_stop_the_sync_and_missed_unbans_are_repaired() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let a = instance(&redis, dir.path()).await;
    let b = instance(&redis, dir.path()).await;
    // Members written by hand with scores that are no Unix time.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.port)).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ZADD")
        .arg("test:revoked")
        .arg("1e17")
        .arg("odd")
        .arg("inf")
        .arg("odder")
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg("test:bans")
        .arg("-5")
        .arg("nonsense")
        .query_async(&mut con)
        .await
        .unwrap();
    let (status, body) = admin(a.admin, "POST", "/v1/bans", r#"{"cidr":"127.0.0.21","for":"5m"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(true)));
    wait_until("the ban reached the other instance", Duration::from_secs(1), || async {
        !served(&b, "127.0.0.21").await
    })
    .await;
    // Past a resync, both are still connected.
    tokio::time::sleep(wsgate::cluster::RESYNC + Duration::from_secs(1)).await; // kept: a resync must pass
    assert_eq!(b.metric("wsgate_cluster_up").await, 1.0);
    assert_eq!(a.metric("wsgate_cluster_up").await, 1.0);
    // An unban that b never hears of (published straight to Redis without an event) is
    // repaired by b's next resync.
    let _: () = redis::cmd("ZREM")
        .arg("test:bans")
        .arg("127.0.0.21/32")
        .query_async(&mut con)
        .await
        .unwrap();
    wait_until("the resync lifted the ban", wsgate::cluster::RESYNC * 2, || async {
        served(&b, "127.0.0.21").await
    })
    .await;
    wait_until("on both instances", wsgate::cluster::RESYNC * 2, || async {
        served(&a, "127.0.0.21").await
    })
    .await;
}

#[tokio::test]
async fn a_users_cap_holds_across_instances_and_comes_back_after_redis_restarts_empty() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let limits = "max_connections_per_user = 6";
    let gws = [
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
    ];
    // 18 attempts spread over three instances: exactly 6 sessions.
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..18 {
        let gw = &gws[i % 3];
        match gw.try_connect("/echo", &gw.options(Some(gw.token("alice")))).await {
            Ok((ws, _)) => open.push(ws),
            Err(429) => refused += 1,
            Err(s) => panic!("status {s}"),
        }
    }
    assert_eq!((open.len(), refused), (6, 12));
    // One leaves: its place is free on any instance.
    drop(open.pop());
    let gw = &gws[2];
    let back = wait_for("the lease was given back", TIMEOUT, || async {
        gw.try_connect("/echo", &gw.options(Some(gw.token("alice"))))
            .await
            .ok()
            .map(|(ws, _)| ws)
    })
    .await;
    open.push(back);
    assert_eq!(open.len(), 6);
    // Redis restarted empty: the instances assert their live counts again, so within
    // 15 s the cap holds across instances again; the sessions stay up throughout.
    let port = redis.port;
    redis.kill();
    let _redis = Redis::start_on(port);
    let restarted = Instant::now();
    let gw = &gws[1];
    wait_until("the counts were asserted again", Duration::from_secs(15), || async {
        match gw.try_connect("/echo", &gw.options(Some(gw.token("alice")))).await {
            Ok((ws, _)) => {
                drop(ws); // counted before the heartbeat: let it go and try again
                tokio::time::sleep(Duration::from_millis(200)).await; // kept: pacing the retries
                false
            }
            Err(status) => status == 429,
        }
    })
    .await;
    assert!(restarted.elapsed() < Duration::from_secs(15));
    for ws in &mut open {
        assert_eq!(roundtrip(ws, "still up").await, "still up");
    }
}

/// Attempts from `source`, spread over `gws`: the connections that opened.
async fn attempts(gws: &[Gw], n: usize, source: &str) -> Vec<wsgate::client::ClientStream> {
    let mut open = Vec::new();
    for i in 0..n {
        let gw = &gws[i % gws.len()];
        let o = from(gw, gw.token(&format!("u{i}")), source);
        if let Ok(Ok((ws, _))) = tokio::time::timeout(TIMEOUT, wsgate::client::connect(&gw.url("/echo"), &o)).await {
            open.push(ws);
        }
    }
    open
}

#[tokio::test]
async fn the_per_ip_cap_and_rate_hold_across_instances() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    // The cap: 6 per address across three instances (the rate out of the way).
    let limits = "max_connections_per_ip = 6\nconnection_rate_per_ip = \"1000/s\"\nconnection_burst_per_ip = 1000";
    let gws = [
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
    ];
    let open = attempts(&gws, 18, "127.0.0.41").await;
    assert_eq!(open.len(), 6, "18 attempts over 3 instances");
    gws[0]
        .wait_metric_min(r#"wsgate_connections_rejected_total{reason="ip_conn_limit"}"#, 1.0)
        .await;
    assert_eq!(attempts(&gws, 3, "127.0.0.43").await.len(), 3, "another address has its own count");
    drop(open);
    // The rate: a burst of 3, then 3 a minute, across three instances.
    let limits = "max_connections_per_ip = 100\nconnection_rate_per_ip = \"3/min\"\nconnection_burst_per_ip = 3";
    let gws = [
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
    ];
    let started = Instant::now();
    let admitted = attempts(&gws, 9, "127.0.0.42").await.len();
    // Within burst + rate × time (the attempts take well under a minute: at most one more).
    let allowed = 3 + (started.elapsed().as_secs_f64() / 20.0).floor() as usize;
    assert!((3..=allowed).contains(&admitted), "{admitted} admitted, at most {allowed}");
}

#[tokio::test]
async fn on_failure_decides_while_redis_is_away() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis = \"redis://127.0.0.1:{}/0\"\n", redis.port);
    let closed = instance_with(&format!("{url}on_failure = \"closed\"\n"), dir.path(), "").await;
    let local = instance_with(&url, dir.path(), "").await;
    let mode = |m: &str| format!(r#"wsgate_cluster_mode{{mode="{m}"}}"#);
    for gw in [&closed, &local] {
        gw.wait_metric(&mode("shared"), 1.0).await;
    }
    assert_eq!(
        closed
            .try_connect("/echo", &closed.options(Some(closed.token("a"))))
            .await
            .map(|_| ()),
        Ok(())
    );
    redis.kill();
    closed.wait_metric(&mode("closed"), 1.0).await;
    local.wait_metric(&mode("local"), 1.0).await;
    assert_eq!(closed.metric(&mode("shared")).await, 0.0);
    // closed: new connections get 503; local: the instance's own limits admit them.
    assert_eq!(
        closed.try_connect("/echo", &closed.options(Some(closed.token("a")))).await.err(),
        Some(503)
    );
    assert!(local.try_connect("/echo", &local.options(Some(local.token("a")))).await.is_ok());
    // Redis back: shared again, by itself.
    let _redis = Redis::start_on(redis.port);
    closed.wait_metric(&mode("shared"), 1.0).await;
    assert!(closed.try_connect("/echo", &closed.options(Some(closed.token("a")))).await.is_ok());
}

#[tokio::test]
async fn a_hung_redis_leaves_the_local_limits_in_charge_until_it_resumes() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let gw = instance_limited(&redis, dir.path(), "max_connections_per_user = 5").await;
    let mode = |m: &str| format!(r#"wsgate_cluster_mode{{mode="{m}"}}"#);
    redis.signal("STOP");
    // Connections keep being served meanwhile: no handshake waits for the hung Redis
    // longer than `timeout` (20 ms) and a little (bounded here at a second, for slow CI).
    for i in 0..5 {
        let started = Instant::now();
        let mut ws = gw
            .try_connect("/echo", &gw.options(Some(gw.token(&format!("h{i}")))))
            .await
            .unwrap()
            .0;
        assert!(started.elapsed() < Duration::from_secs(1), "handshake took {:?}", started.elapsed());
        assert_eq!(roundtrip(&mut ws, "up").await, "up");
    }
    gw.wait_metric(&mode("local"), 1.0).await;
    gw.wait_metric("wsgate_cluster_up", 0.0).await;
    redis.signal("CONT");
    gw.wait_metric(&mode("shared"), 1.0).await;
    gw.wait_metric("wsgate_cluster_up", 1.0).await;
}

#[tokio::test]
async fn redis_keeps_only_a_handful_of_keys_after_many_clients_came_and_went() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let limits = "connection_rate_per_ip = \"1000/s\"\nconnection_burst_per_ip = 100";
    let gws = [
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
    ];
    // 400 connections from 200 addresses, each closed again.
    for i in 0..400usize {
        let gw = &gws[i % 2];
        let source = format!("127.0.{}.{}", 1 + i / 200, 1 + i % 200);
        let mut ws = gw
            .try_connect("/echo", &from(gw, gw.token(&format!("c{i}")), &source))
            .await
            .unwrap()
            .0;
        assert_eq!(roundtrip(&mut ws, "x").await, "x");
        drop(ws);
    }
    // Leases are given back when connections end and rate keys expire with their bucket:
    // only a handful of keys stay.
    wait_until("Redis emptied", TIMEOUT, || async { redis.dbsize().await <= 5 }).await;
}

#[tokio::test]
async fn a_killed_instances_leases_are_released_within_45_seconds() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let limits = "max_connections_per_user = 1\nconnection_rate_per_ip = \"1000/s\"\nconnection_burst_per_ip = 1000";
    let survivor = instance_limited(&redis, dir.path(), limits).await;
    // A second instance as its own process, sharing the secret and Redis.
    let proc_dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let rest = format!(
        "[limits]\n{limits}\n{ECHO_ROUTE}\n[cluster]\nredis = \"redis://127.0.0.1:{}/0\"\nkey_prefix = \"test\"\n",
        redis.port
    );
    let text = config_text(proc_dir.path(), "", &rest)
        .replacen("listen = [\"127.0.0.1:0\"]", &format!("listen = [\"127.0.0.1:{port}\"]"), 1)
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{admin_port}\""), 1)
        .replace(
            &proc_dir.path().join("jwt.secret").display().to_string(),
            &dir.path().join("jwt.secret").display().to_string(),
        );
    let config = proc_dir.path().join("gw.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    wait_until("the process instance joined the cluster", TIMEOUT, || async {
        std::net::TcpStream::connect(admin).is_ok() && wait_metric_value(admin, "wsgate_cluster_up").await == 1.0
    })
    .await;
    // alice's one session lives on the process instance.
    let tls = wsgate::tls::cli_client_config(Some(&proc_dir.path().join("server.crt")), false).unwrap();
    let opts = wsgate::client::Options {
        token: Some(survivor.token("alice")),
        tls: Some(tls),
        ..Default::default()
    };
    let (mut ws, _) = wsgate::client::connect(&format!("wss://localhost:{port}/echo"), &opts)
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut ws, "held").await, "held");
    let alice = || survivor.options(Some(survivor.token("alice")));
    assert_eq!(survivor.try_connect("/echo", &alice()).await.err(), Some(429));
    // The process dies without giving anything back.
    child.kill().unwrap();
    let _ = child.wait();
    let killed = Instant::now();
    let back = wait_for("the dead instance's lease expired", Duration::from_secs(45), || async {
        tokio::time::sleep(Duration::from_millis(200)).await; // kept: paces the retries
        wsgate::client::connect(&survivor.url("/echo"), &alice()).await.ok()
    })
    .await;
    drop(back);
    assert!(killed.elapsed() <= Duration::from_secs(45));
}

/// One series from a gateway's /metrics (0 when absent or unreachable).
async fn wait_metric_value(admin: SocketAddr, series: &str) -> f64 {
    metric_value(&http_get(admin, "/metrics").await.1, series)
}

#[tokio::test]
async fn alone_an_instance_holds_its_share_of_a_cap_and_of_the_rate() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let limits = "max_connections_per_user = 3\nconnection_rate_per_ip = \"3/min\"\nconnection_burst_per_ip = 6";
    let gws = [
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
    ];
    // Every instance has seen the three at its next heartbeat.
    tokio::time::sleep(wsgate::cluster::RESYNC + Duration::from_secs(1)).await; // kept: a heartbeat must pass
    redis.kill();
    let gw = &gws[0];
    gw.wait_metric(r#"wsgate_cluster_mode{mode="local"}"#, 1.0).await;
    // A third of 3: one session of alice here, the second refused.
    let alice = || gw.options(Some(gw.token("alice")));
    let _one = gw.try_connect("/echo", &alice()).await.unwrap();
    assert_eq!(gw.try_connect("/echo", &alice()).await.err(), Some(429));
    // A third of the rate: a burst of 6 cells, each connection costs 3 here.
    let mut admitted = 0;
    for user in ["u1", "u2", "u3"] {
        let o = from(gw, gw.token(user), "127.0.0.52");
        if let Ok(Ok(_)) = tokio::time::timeout(TIMEOUT, wsgate::client::connect(&gw.url("/echo"), &o)).await {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2);
}

#[tokio::test]
async fn a_call_that_times_out_but_runs_later_leaves_no_lease_behind() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let limits = "max_connections_per_ip = 1\nconnection_rate_per_ip = \"1000/s\"\nconnection_burst_per_ip = 1000";
    let gw = instance_limited(&redis, dir.path(), limits).await;
    let peer = instance_limited(&redis, dir.path(), limits).await;
    // Redis busy for a while: the gateway's call (20 ms budget) times out, and Redis runs
    // it afterwards.
    let port = redis.port;
    let busy = tokio::spawn(async move {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
        // The script runs longer than redis-rs' default 500 ms response timeout on a
        // loaded machine: this connection waits for it as long as it takes.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut con = client.get_multiplexed_async_connection_with_config(&config).await.unwrap();
        let _: i64 = redis::cmd("EVAL")
            .arg("local i = 0 while i < 20000000 do i = i + 1 end return 1")
            .arg(0)
            .query_async(&mut con)
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(30)).await; // kept: let the busy script start
    let o = from(&gw, gw.token("t1"), "127.0.0.61");
    let first = wsgate::client::connect(&gw.url("/echo"), &o).await;
    busy.await.unwrap();
    assert!(gw.metric(r#"wsgate_cluster_ops_total{op="admit",result="timeout"}"#).await >= 1.0);
    drop(first);
    // Once that connection is gone, the address may connect again anywhere: the late
    // lease was given back behind the late call.
    wait_until("the address admitted again", TIMEOUT, || async {
        tokio::time::sleep(Duration::from_millis(100)).await; // kept: paces the retries
        served(&peer, "127.0.0.61").await
    })
    .await;
}

#[tokio::test]
async fn alone_with_more_instances_than_the_burst_an_instance_still_admits() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let limits = "connection_rate_per_ip = \"100/s\"\nconnection_burst_per_ip = 1";
    let gws = [
        instance_limited(&redis, dir.path(), limits).await,
        instance_limited(&redis, dir.path(), limits).await,
    ];
    tokio::time::sleep(wsgate::cluster::RESYNC + Duration::from_secs(1)).await; // kept: a heartbeat must pass
    redis.kill();
    gws[0].wait_metric(r#"wsgate_cluster_mode{mode="local"}"#, 1.0).await;
    // Its share of 100/s is 50/s: a connection every half second passes.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await; // kept: the rate is the test
        assert!(served(&gws[0], "127.0.0.62").await);
    }
}

/// Auth-failure bans are made by clients, one per banned address, and each is kept while
/// Redis is away like an admin's action: a flood of them must not push out a revocation
/// made meanwhile (the resync after the reconnect would lift it here too, and no other
/// instance would ever get it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_auth_bans_while_redis_is_away_does_not_undo_a_revocation() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let limits = "auth_failures_per_ip = 1\nconnection_rate_per_ip = \"100000/s\"\nconnection_burst_per_ip = 100000";
    let gw = std::sync::Arc::new(instance_limited(&redis, dir.path(), limits).await);
    redis.kill();
    wait_until("the instance saw Redis go", TIMEOUT, || async {
        gw.metric("wsgate_cluster_up").await == 0.0
    })
    .await;
    let token = gw.token_with("dave", Duration::from_secs(600), &[("jti", "j-dave")]);
    let (status, body) = admin(gw.admin, "POST", "/v1/revocations", r#"{"jti":"j-dave"}"#).await;
    assert_eq!((status, body["shared"].as_bool()), (200, Some(false)));
    assert_eq!(gw.refusal("/echo", &from(&gw, token.clone(), "127.0.0.20")).await.status(), 401);
    // More auth bans than actions are kept (10 000), each from its own address.
    const BANS: u32 = 10_050;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (gw, next) = (gw.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= BANS {
                        return;
                    }
                    let n = 0x10000 + i; // 127.1.0.0 onwards
                    let source = format!("127.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
                    assert_eq!(gw.refusal("/echo", &from(&gw, "bad".into(), &source)).await.status(), 401);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let _redis = Redis::start_on(redis.port);
    wait_until("the instance reconnected", TIMEOUT, || async {
        gw.metric("wsgate_cluster_up").await == 1.0
    })
    .await;
    // Past a resync: what Redis does not hold and is not kept to be written is lifted.
    let synced = gw.metric(r#"wsgate_cluster_ops_total{op="sync",result="ok"}"#).await;
    wait_until("a resync after the reconnect", wsgate::cluster::RESYNC * 3, || async {
        gw.metric(r#"wsgate_cluster_ops_total{op="sync",result="ok"}"#).await > synced
    })
    .await;
    let resp = gw.refusal("/echo", &from(&gw, token, "127.0.0.21")).await;
    assert_eq!(resp.status(), 401, "the revocation made while Redis was away still holds");
}

/// The state `GET /v1/upstreams` gives the built-in echo of route `echo` on `gw`.
async fn echo_state(gw: &Gw) -> String {
    let (status, v) = admin(gw.admin, "GET", "/v1/upstreams", "").await;
    assert_eq!(status, 200);
    v["upstreams"][0]["state"].as_str().unwrap_or("?").to_string()
}

#[tokio::test]
async fn a_drain_on_one_instance_applies_on_every_instance_and_so_does_its_undrain() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let a = instance(&redis, dir.path()).await;
    let b = instance(&redis, dir.path()).await;
    let mut live = b.connect("/echo").await;
    assert_eq!(roundtrip(&mut live, "x").await, "x");
    let body = r#"{"route":"echo","upstream":"builtin:echo","over":"1s"}"#;
    let (status, v) = admin(a.admin, "POST", "/v1/upstreams/drain", body).await;
    assert_eq!((status, v["shared"].as_bool()), (202, Some(true)), "{v}");
    // On the other instance: its live session gets 1012 within `over`, and new ones 503.
    let started = Instant::now();
    assert_eq!(close_code(&mut live).await.0, 1012);
    assert!(started.elapsed() < Duration::from_secs(2), "closed after {:?}", started.elapsed());
    assert_eq!(echo_state(&b).await, "drained");
    assert_eq!(b.try_connect("/echo", &b.options(Some(b.token("alice")))).await.err(), Some(503));
    // An instance that starts now learns it from Redis.
    let c = instance(&redis, dir.path()).await;
    wait_until("the new instance holds the drain", TIMEOUT, || async {
        echo_state(&c).await == "drained"
    })
    .await;
    // Undrained on another instance: back everywhere.
    let (status, v) = admin(b.admin, "DELETE", "/v1/upstreams/drain", body).await;
    assert_eq!((status, v["shared"].as_bool()), (200, Some(true)), "{v}");
    for gw in [&a, &b, &c] {
        wait_until("the undrain reached the instance", Duration::from_secs(1), || async {
            echo_state(gw).await == "up"
        })
        .await;
        let mut ws = gw.connect("/echo").await;
        assert_eq!(roundtrip(&mut ws, "back").await, "back");
    }
}
