//! `latency`: open loop at a fixed total rate spread over N connections.
//!
//! Message g (over all connections) is *intended* to be sent at t0 + g/R, on
//! connection g mod N. A pacer thread sleeps until each intended time and wakes
//! that connection's task, which sends every message that is due. Latency is
//! measured from the intended time, not the actual send, so a server that stalls
//! is charged for the messages that queue behind the stall (coordinated omission
//! corrected). The pacer's own lateness is reported as `send_lag`.

use crate::{
    client::{ConnArgs, Connector, Ws},
    util::{Window, histogram, merge, ms, num, print_result, record},
};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Total messages per second over all connections.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Measuring window, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Traffic before the window, seconds (not recorded).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Payload bytes per message (at least 16: intended time, connection, sequence).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
}

/// The intended send time of global message `g`, in ns after t0 (integer math, so
/// the pacer and the tasks agree exactly).
#[derive(Clone, Copy)]
struct Schedule {
    /// Rate in messages per 1000 s.
    rate_milli: u128,
}

impl Schedule {
    fn at(self, g: u64) -> u64 {
        (g as u128 * 1_000_000_000_000 / self.rate_milli) as u64
    }
}

struct Outcome {
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    sent: u64,
    received: u64,
    mismatches: u64,
    error: Option<String>,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.size >= 16, "--size must be at least 16");
    anyhow::ensure!(a.rate >= 0.001 && a.connections > 0, "--rate and --connections must be positive");
    let connector = Connector::new(&a.conn).await?;
    let (conns, connect_failures, connect_error) = crate::connect_all(&connector, a.connections, 16).await;
    anyhow::ensure!(
        !conns.is_empty(),
        "no connection could be opened: {}",
        connect_error.unwrap_or_default()
    );
    let n = conns.len() as u64;
    let sched = Schedule {
        rate_milli: (a.rate * 1000.0).round() as u128,
    };
    let total = ((a.warmup + a.duration) * a.rate).floor() as u64;
    let warmup_ns = (a.warmup * 1e9) as u64;
    let t0 = Instant::now() + Duration::from_millis(100);
    let deadline = t0 + Duration::from_secs_f64(a.warmup + a.duration + 10.0);

    let notifies: Arc<[Notify]> = (0..n).map(|_| Notify::new()).collect();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, ws)| {
            let notifies = notifies.clone();
            let size = a.size;
            tokio::spawn(async move {
                let job = Job {
                    c: c as u64,
                    n,
                    total,
                    sched,
                    t0,
                    warmup_ns,
                    size,
                    deadline,
                };
                job.run(ws, &notifies[c]).await
            })
        })
        .collect();

    let cpu_pids = a.conn.cpu_pids.clone();
    let (window_start, window_end) = (
        t0 + Duration::from_secs_f64(a.warmup),
        t0 + Duration::from_secs_f64(a.warmup + a.duration),
    );
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        let window = Window::start(&cpu_pids);
        tokio::time::sleep_until(window_end.into()).await;
        window.end().await
    });

    let pacer_notifies = notifies.clone();
    let pacer = std::thread::spawn(move || {
        crate::util::tighten_timer_slack();
        for g in 0..total {
            let target = t0 + Duration::from_nanos(sched.at(g));
            let now = Instant::now();
            if target > now {
                std::thread::sleep(target - now);
            }
            pacer_notifies[(g % n) as usize].notify_one();
        }
    });

    let mut latency = histogram();
    let mut send_lag = histogram();
    let (mut sent, mut received, mut mismatches, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(o) => {
                latency.add(&o.latency).ok();
                send_lag.add(&o.send_lag).ok();
                sent += o.sent;
                received += o.received;
                mismatches += o.mismatches;
                if o.error.is_some() {
                    errors += 1;
                    first_error = first_error.or(o.error);
                }
            }
            Err(e) => {
                errors += 1;
                first_error = first_error.or(Some(e.to_string()));
            }
        }
    }
    let _ = pacer.join();
    let cpu = match cpu.await {
        Ok(measured) => measured.fields((a.duration * a.rate) as u64),
        Err(_) => Default::default(),
    };
    print_result(
        "latency",
        &a.conn.tags,
        merge(
            json!({
                "connections": n,
                "rate": a.rate,
                "size": a.size,
                "duration_s": a.duration,
                "samples": latency.len(),
                "p50_ms": num(ms(&latency, 0.5)),
                "p90_ms": num(ms(&latency, 0.9)),
                "p99_ms": num(ms(&latency, 0.99)),
                "p999_ms": num(ms(&latency, 0.999)),
                "max_ms": num(ms(&latency, 1.0)),
                "send_lag_p50_ms": num(ms(&send_lag, 0.5)),
                "send_lag_p99_ms": num(ms(&send_lag, 0.99)),
                "sent": sent,
                "lost": sent.saturating_sub(received),
                "mismatches": mismatches,
                "errors": errors,
                "connect_failures": connect_failures,
                "first_error": first_error.or(connect_error),
            }),
            cpu,
        ),
    );
    Ok(())
}

struct Job {
    c: u64,
    n: u64,
    total: u64,
    sched: Schedule,
    t0: Instant,
    warmup_ns: u64,
    size: usize,
    deadline: Instant,
}

impl Job {
    fn message(&self, i: u64, intended_ns: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(self.size);
        b.put_u64_le(intended_ns);
        b.put_u32_le(self.c as u32);
        b.put_u32_le(i as u32);
        for k in 16..self.size {
            b.put_u8(k as u8);
        }
        b.freeze()
    }

    fn check(&self, b: &[u8], expected_seq: u64) -> Option<u64> {
        if b.len() != self.size {
            return None;
        }
        let intended = u64::from_le_bytes(b[0..8].try_into().ok()?);
        let conn = u32::from_le_bytes(b[8..12].try_into().ok()?);
        let seq = u32::from_le_bytes(b[12..16].try_into().ok()?);
        let tail_ok = b[16..].iter().enumerate().all(|(k, &x)| x == (k + 16) as u8);
        (conn as u64 == self.c && seq == expected_seq as u32 && tail_ok).then_some(intended)
    }

    async fn run(self, mut ws: Ws, notify: &Notify) -> Outcome {
        let mine = if self.c < self.total {
            (self.total - self.c).div_ceil(self.n)
        } else {
            0
        };
        let mut o = Outcome {
            latency: histogram(),
            send_lag: histogram(),
            sent: 0,
            received: 0,
            mismatches: 0,
            error: None,
        };
        let deadline = tokio::time::Instant::from_std(self.deadline);
        while o.sent < mine || o.received < o.sent {
            tokio::select! {
                biased;
                m = ws.next() => match m {
                    Some(Ok(Message::Binary(b))) => {
                        let now = Instant::now();
                        match self.check(&b, o.received) {
                            Some(intended) => {
                                if intended >= self.warmup_ns {
                                    record(&mut o.latency, now.saturating_duration_since(self.t0 + Duration::from_nanos(intended)));
                                }
                            }
                            None => o.mismatches += 1,
                        }
                        o.received += 1;
                    }
                    Some(Ok(Message::Text(_))) => {
                        o.mismatches += 1;
                        o.received += 1;
                    }
                    Some(Ok(Message::Close(f))) => {
                        o.error = Some(format!("closed by the server: {f:?}"));
                        return o;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        o.error = Some(e.to_string());
                        return o;
                    }
                    None => {
                        o.error = Some("connection lost".into());
                        return o;
                    }
                },
                _ = notify.notified(), if o.sent < mine => {
                    let now = Instant::now();
                    let elapsed = now.saturating_duration_since(self.t0).as_nanos() as u64;
                    while o.sent < mine {
                        let intended = self.sched.at(o.sent * self.n + self.c);
                        if intended > elapsed {
                            break;
                        }
                        if intended >= self.warmup_ns {
                            record(&mut o.send_lag, Duration::from_nanos(elapsed - intended));
                        }
                        if let Err(e) = ws.feed(Message::Binary(self.message(o.sent, intended))).await {
                            o.error = Some(e.to_string());
                            return o;
                        }
                        o.sent += 1;
                    }
                    if let Err(e) = ws.flush().await {
                        o.error = Some(e.to_string());
                        return o;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    o.error = Some("timed out waiting for echoes".into());
                    return o;
                }
            }
        }
        crate::close(ws).await;
        o
    }
}
