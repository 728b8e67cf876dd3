//! Thread per core (`[server] workers`, issue 30): connections are served on worker
//! threads, spread so that none holds far more than another, and counted per worker in
//! `wsgate_worker_connections`.

mod common;
use common::*;

/// What a worker may hold beyond the least loaded one (`workers::AHEAD_SLACK`), plus the
/// one connection it may accept while it is still waiting when it gets ahead.
const MOST_AHEAD: f64 = 17.0;

async fn per_worker(gw: &Gw, workers: usize) -> Vec<f64> {
    let text = gw.metrics_text().await;
    let series: Vec<&str> = text.lines().filter(|l| l.starts_with("wsgate_worker_connections{")).collect();
    assert_eq!(series.len(), workers, "one series per worker: {series:?}");
    (1..=workers)
        .map(|w| metric_value(&text, &format!("wsgate_worker_connections{{worker=\"{w}\"}}")))
        .collect()
}

#[tokio::test]
async fn sessions_are_spread_over_the_workers_and_counted_while_they_live() {
    let gw = Gw::start("workers = 2", ECHO_ROUTE).await;
    let mut sessions = Vec::new();
    for i in 0..40 {
        let opts = gw.options(Some(gw.token(&format!("user{i}"))));
        let (mut ws, _) = gw.try_connect("/echo", &opts).await.unwrap_or_else(|s| panic!("refused with {s}"));
        assert_eq!(roundtrip(&mut ws, &format!("m{i}")).await, format!("m{i}"));
        sessions.push(ws);
    }
    let open = per_worker(&gw, 2).await;
    assert_eq!(open.iter().sum::<f64>(), 40.0, "{open:?}");
    let spread = open.iter().cloned().fold(f64::MIN, f64::max) - open.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread <= MOST_AHEAD, "one worker holds far more: {open:?}");
    // Every session still relays after the others connected (none stranded on a worker).
    for (i, ws) in sessions.iter_mut().enumerate() {
        assert_eq!(roundtrip(ws, &format!("again {i}")).await, format!("again {i}"));
    }
    drop(sessions);
    wait_until("the workers' counts to drop to 0", TIMEOUT, || async {
        per_worker(&gw, 2).await.iter().sum::<f64>() == 0.0
    })
    .await;
}

#[tokio::test]
async fn one_worker_serves_every_session() {
    let gw = Gw::start("workers = 1", ECHO_ROUTE).await;
    let mut a = gw.connect("/echo").await;
    let mut b = gw.connect("/echo").await;
    assert_eq!(roundtrip(&mut a, "a").await, "a");
    assert_eq!(roundtrip(&mut b, "b").await, "b");
    assert_eq!(per_worker(&gw, 1).await, [2.0]);
}

#[test]
fn the_worker_count_is_bounded_and_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "workers = 5000", ECHO_ROUTE);
    let err = wsgate::config::Config::from_toml_str(&text, "w.toml").unwrap_err().to_string();
    assert!(err.contains("server.workers") && err.contains("at most 1024"), "{err}");
    let text = config_text(dir.path(), "workers = -1", ECHO_ROUTE);
    let err = wsgate::config::Config::from_toml_str(&text, "w.toml").unwrap_err().to_string();
    assert!(err.contains("workers"), "{err}");
}

#[tokio::test]
async fn changing_the_worker_count_on_reload_says_it_needs_a_restart() {
    let gw = Gw::start("workers = 2", ECHO_ROUTE).await;
    let text = config_text(gw.dir.path(), "workers = 1", ECHO_ROUTE);
    let notes = gw.reload(&text).await.expect("reloaded");
    assert!(notes.iter().any(|n| n.contains("server.workers")), "{notes:?}");
    // The running workers stay: both still counted.
    let mut ws = gw.connect("/echo").await;
    assert_eq!(roundtrip(&mut ws, "x").await, "x");
    per_worker(&gw, 2).await;
}
