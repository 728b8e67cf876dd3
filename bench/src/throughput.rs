//! `throughput`: N connections, each keeping K messages in flight (closed loop).
//! Every echo is compared with what was sent; the rate counts echoes received
//! inside the measuring window (after the warm-up).

use crate::{
    client::{ConnArgs, Connector, Ws},
    util::{Padded, Window, merge, payload, print_result, round1, sum},
};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::json;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Payload bytes per message (binary, or JSON text with `--json`).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Send JSON text messages of `--size` bytes (`{"type":"chat","room":...,"text":...}`),
    /// for routes with `[routes.validate]`.
    #[arg(long)]
    pub json: bool,
    /// Messages each connection keeps in flight.
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
    /// Measuring window, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Traffic before the window, seconds (not counted).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
}

#[derive(Default)]
struct Outcome {
    received: u64,
    mismatches: u64,
    error: Option<String>,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.connections > 0 && a.inflight > 0, "--connections and --inflight must be positive");
    let connector = Connector::new(&a.conn).await?;
    let (conns, connect_failures, connect_error) = crate::connect_all(&connector, a.connections, 16).await;
    anyhow::ensure!(
        !conns.is_empty(),
        "no connection could be opened: {}",
        connect_error.unwrap_or_default()
    );

    let counters: Arc<[Padded]> = (0..conns.len()).map(|_| Padded::default()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Distinct payloads per connection, reused (cloning Bytes does not allocate).
    let pool_len = (a.inflight + 1).max(256.min((4 << 20) / a.size.max(1))).max(2);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let pool: Vec<Message> = (0..pool_len as u64)
                .map(|j| {
                    if a.json {
                        json_message(i as u64, j, a.size)
                    } else {
                        Message::Binary(payload(i as u64, j, a.size))
                    }
                })
                .collect();
            let (counters, stop) = (counters.clone(), stop.clone());
            tokio::spawn(async move { conn_loop(ws, pool, a.inflight, &counters[i], &stop).await })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    let window = Window::start(&a.conn.cpu_pids);
    let (c0, t0) = (sum(&counters), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    let (c1, t1) = (sum(&counters), Instant::now());
    let measured = window.end().await;
    stop.store(true, Ordering::Relaxed);

    let mut total = Outcome::default();
    let mut unfinished = 0u64;
    let mut errors = 0u64;
    let drain_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for t in tasks {
        match tokio::time::timeout_at(drain_deadline, t).await {
            Ok(Ok(o)) => {
                total.received += o.received;
                total.mismatches += o.mismatches;
                if o.error.is_some() {
                    errors += 1;
                    total.error = total.error.or(o.error);
                }
            }
            _ => unfinished += 1,
        }
    }
    let secs = (t1 - t0).as_secs_f64();
    let msgs = c1 - c0;
    let rate = msgs as f64 / secs;
    print_result(
        "throughput",
        &a.conn.tags,
        merge(
            json!({
                "connections": a.connections,
                "size": a.size,
                "inflight": a.inflight,
                "duration_s": (secs * 100.0).round() / 100.0,
                "msgs": msgs,
                "msgs_per_s": rate.round(),
                "mb_per_s": round1(rate * a.size as f64 / 1e6),
                "echoes_verified": total.received,
                "mismatches": total.mismatches,
                "errors": errors + unfinished,
                "connect_failures": connect_failures,
                "first_error": total.error.or(connect_error),
            }),
            measured.fields(msgs),
        ),
    );
    Ok(())
}

/// One connection: prime K messages, then send one per echo until `stop`, then
/// collect the outstanding echoes. Replies already readable are handled together
/// and answered with one flush.
async fn conn_loop(mut ws: Ws, pool: Vec<Message>, inflight: usize, counter: &Padded, stop: &AtomicBool) -> Outcome {
    let mut o = Outcome::default();
    let n = pool.len() as u64;
    let mut sent = 0u64;
    for _ in 0..inflight {
        if let Err(e) = ws.feed(pool[(sent % n) as usize].clone()).await {
            o.error = Some(e.to_string());
            return o;
        }
        sent += 1;
    }
    if let Err(e) = ws.flush().await {
        o.error = Some(e.to_string());
        return o;
    }
    loop {
        let mut first = Some(ws.next().await);
        let stopping = stop.load(Ordering::Relaxed);
        let mut batch = 0u64;
        loop {
            let next = match first.take() {
                Some(x) => x,
                None => match ws.next().now_or_never() {
                    Some(x) => x,
                    None => break,
                },
            };
            match next {
                Some(Ok(m @ (Message::Binary(_) | Message::Text(_)))) => {
                    if m != pool[(o.received % n) as usize] {
                        o.mismatches += 1;
                    }
                    o.received += 1;
                    batch += 1;
                    if !stopping {
                        if let Err(e) = ws.feed(pool[(sent % n) as usize].clone()).await {
                            o.error = Some(e.to_string());
                            return o;
                        }
                        sent += 1;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(f))) => {
                    o.error = Some(format!("closed by the server: {f:?}"));
                    return o;
                }
                Some(Err(e)) => {
                    o.error = Some(e.to_string());
                    return o;
                }
                None => {
                    o.error = Some("connection lost".into());
                    return o;
                }
            }
        }
        counter.0.fetch_add(batch, Ordering::Relaxed);
        if let Err(e) = ws.flush().await {
            o.error = Some(e.to_string());
            return o;
        }
        if stopping && o.received >= sent {
            break;
        }
    }
    crate::close(ws).await;
    o
}

/// A JSON chat message of exactly `size` bytes (at least the fixed part), different for
/// every (connection, index) pair.
fn json_message(conn: u64, index: u64, size: usize) -> Message {
    let head = format!(r#"{{"type":"chat","room":"r{conn}","text":"{index:x}"#);
    let pad = size.saturating_sub(head.len() + 2);
    Message::text(format!("{head}{}\"}}", "x".repeat(pad)))
}
