//! `idle`: open N idle sockets from several source addresses, report `READY n`,
//! hold them, then check that each one still echoes a message.
//!
//! With `--rss-pid`, the server's resident memory (the process and its children)
//! is read before the sockets open and again once they are all open, and the
//! difference per socket is reported.

use crate::{
    client::{ConnArgs, Connector, Ws},
    util::{payload, print_result, round1, rss_tree_kb},
};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::{
    io::Write,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::{
    io::AsyncBufReadExt,
    sync::{Semaphore, mpsc, watch},
};
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sockets to open.
    #[arg(long)]
    pub count: usize,
    /// Connection attempts in progress at once while opening.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Hold the sockets this many seconds after READY, then check. Without it, hold
    /// until a line (or end of file) on stdin, or SIGINT/SIGTERM.
    #[arg(long)]
    pub hold: Option<f64>,
    /// Also write the number of open sockets to this file when all are open.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Server process whose VmRSS (with its children's) is read before and at READY (repeatable).
    #[arg(long = "rss-pid")]
    pub rss_pids: Vec<u32>,
    /// Connections opened, echoed and closed before the first RSS reading, so one-off
    /// start-up allocations of the server are not charged to the sockets.
    #[arg(long, default_value_t = 16)]
    pub warmup_connections: usize,
    /// Seconds to wait after the last socket opened before reading RSS.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
}

fn rss(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| rss_tree_kb(p)).sum()
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Hold,
    Check,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let connector = Connector::new(&a.conn).await?;
    const SIZE: usize = 32;

    // Warm the server up, then take the baseline.
    if a.warmup_connections > 0 {
        let (warm, _, err) = crate::connect_all(&connector, a.warmup_connections, 16).await;
        anyhow::ensure!(
            !warm.is_empty(),
            "warm-up: no connection could be opened: {}",
            err.unwrap_or_default()
        );
        for mut ws in warm {
            let msg = payload(u64::MAX, 0, SIZE);
            ws.send(Message::Binary(msg)).await?;
            let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            crate::close(ws).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rss_before = rss(&a.rss_pids);

    // Open the sockets; each task then waits for the check, answering pings meanwhile.
    let started = Instant::now();
    let (phase_tx, phase_rx) = watch::channel(Phase::Hold);
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let permits = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(a.count);
    for i in 0..a.count {
        let permit = permits.clone().acquire_owned().await?;
        let (connector, opened_tx, phase_rx) = (connector.clone(), opened_tx.clone(), phase_rx.clone());
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(30), connector.connect()).await;
            drop(permit);
            match r {
                Ok(Ok(ws)) => {
                    let _ = opened_tx.send(Ok(()));
                    hold_then_check(ws, i as u64, SIZE, phase_rx).await
                }
                Ok(Err(e)) => {
                    let _ = opened_tx.send(Err(format!("{e:#}")));
                    (false, false)
                }
                Err(_) => {
                    let _ = opened_tx.send(Err("connect timed out (30 s)".into()));
                    (false, false)
                }
            }
        }));
    }
    drop(opened_tx);
    let (mut opened, mut failed, mut first_error) = (0usize, 0usize, None);
    for _ in 0..a.count {
        match opened_rx.recv().await.unwrap_or_else(|| Err("connection task failed".into())) {
            Ok(()) => opened += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let open_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let rss_ready = rss(&a.rss_pids);
    println!("READY {opened}");
    let _ = std::io::stdout().flush();
    if let Some(f) = &a.ready_file {
        std::fs::write(f, format!("{opened}\n"))?;
    }

    let held = Instant::now();
    match a.hold {
        Some(s) => tokio::time::sleep(Duration::from_secs_f64(s)).await,
        None => wait_for_go().await,
    }
    let held_s = held.elapsed().as_secs_f64();

    let _ = phase_tx.send(Phase::Check);
    let (mut open_at_check, mut echoed) = (0usize, 0usize);
    for t in tasks {
        if let Ok((open, echo)) = t.await {
            open_at_check += open as usize;
            echoed += echo as usize;
        }
    }
    let per_socket = match (rss_before, rss_ready) {
        (Some(b), Some(r)) if opened > 0 => Some(round1((r as f64 - b as f64) / opened as f64)),
        _ => None,
    };
    print_result(
        "idle",
        &a.conn.tags,
        json!({
            "count": a.count,
            "opened": opened,
            "connect_failures": failed,
            "open_s": (open_s * 100.0).round() / 100.0,
            "held_s": (held_s * 10.0).round() / 10.0,
            "open_at_check": open_at_check,
            "echoed": echoed,
            "rss_before_kb": rss_before,
            "rss_ready_kb": rss_ready,
            "kb_per_socket": per_socket,
            "first_error": first_error,
        }),
    );
    Ok(())
}

/// Returns (still open when the check began, echoed its message).
async fn hold_then_check(mut ws: Ws, id: u64, size: usize, mut phase: watch::Receiver<Phase>) -> (bool, bool) {
    // Hold: keep reading so the server's keep-alive pings are answered.
    loop {
        if *phase.borrow() == Phase::Check {
            break;
        }
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return (false, false),
                Some(Ok(_)) => {}
            },
            r = phase.changed() => if r.is_err() { return (false, false) },
        }
    }
    let msg = payload(id, 1, size);
    if ws.send(Message::Binary(msg.clone())).await.is_err() {
        return (true, false);
    }
    let echoed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => return b == msg,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                _ => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    crate::close(ws).await;
    (true, echoed)
}

/// Wait for a line or end of file on stdin, or SIGINT/SIGTERM.
async fn wait_for_go() {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            tokio::select! {
                _ = lines.next_line() => {}
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
    }
    let _ = lines.next_line().await;
}
