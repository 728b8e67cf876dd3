//! `handshakes`: C workers, each repeating connect + TLS + upgrade + one echo +
//! close. Counts iterations that *finish* inside the measuring window, so workers
//! straddling its edges do not bias the rate.

use crate::{
    client::{ConnArgs, Connector, tls_info},
    util::{Window, histogram, merge, ms, num, payload, print_result, record},
};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Measuring window, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Iterations before the window, seconds (not counted).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Payload bytes of the one echoed message.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
}

struct Outcome {
    ok: u64,
    /// Counted iterations whose TLS handshake resumed a session (`--resume`).
    resumed: u64,
    failed: u64,
    total: Histogram<u64>,
    upgrade: Histogram<u64>,
    first_error: Option<String>,
    tls: Option<String>,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let connector = Connector::new(&a.conn).await?;
    let start = Instant::now();
    let window_start = start + Duration::from_secs_f64(a.warmup);
    let window_end = window_start + Duration::from_secs_f64(a.duration);
    let workers: Vec<_> = (0..a.concurrency)
        .map(|w| {
            let connector = connector.clone();
            let size = a.size;
            tokio::spawn(async move { worker(&connector, w as u64, size, window_start, window_end).await })
        })
        .collect();
    let cpu_pids = a.conn.cpu_pids.clone();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        let window = Window::start(&cpu_pids);
        tokio::time::sleep_until(window_end.into()).await;
        window.end().await
    });
    let mut total = histogram();
    let mut upgrade = histogram();
    let (mut ok, mut failed, mut resumed) = (0u64, 0u64, 0u64);
    let (mut first_error, mut tls) = (None, None);
    for w in workers {
        if let Ok(o) = w.await {
            ok += o.ok;
            resumed += o.resumed;
            failed += o.failed;
            total.add(&o.total).ok();
            upgrade.add(&o.upgrade).ok();
            first_error = first_error.or(o.first_error);
            tls = tls.or(o.tls);
        }
    }
    let cpu = match cpu.await {
        Ok(measured) => measured.fields(ok),
        Err(_) => Default::default(),
    };
    print_result(
        "handshakes",
        &a.conn.tags,
        merge(
            json!({
                "concurrency": a.concurrency,
                "duration_s": a.duration,
                "ok": ok,
                "resumed": resumed,
                "resumed_pct": if ok > 0 { (resumed as f64 * 100.0 / ok as f64).round() } else { 0.0 },
                "failed": failed,
                "per_s": (ok as f64 / a.duration).round(),
                "p50_ms": num(ms(&total, 0.5)),
                "p99_ms": num(ms(&total, 0.99)),
                "upgrade_p50_ms": num(ms(&upgrade, 0.5)),
                "upgrade_p99_ms": num(ms(&upgrade, 0.99)),
                "tls": tls,
                "first_error": first_error,
            }),
            cpu,
        ),
    );
    Ok(())
}

async fn worker(connector: &Arc<Connector>, w: u64, size: usize, window_start: Instant, window_end: Instant) -> Outcome {
    let mut o = Outcome {
        ok: 0,
        resumed: 0,
        failed: 0,
        total: histogram(),
        upgrade: histogram(),
        first_error: None,
        tls: None,
    };
    let msg = payload(w, 0, size);
    while Instant::now() < window_end {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let mut ws = connector.connect().await?;
            let up = t.elapsed();
            let resumed = crate::client::resumed(&ws);
            if o.tls.is_none() {
                o.tls = tls_info(&ws);
            }
            ws.send(Message::Binary(msg.clone())).await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) if b == msg => break,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(other)) => anyhow::bail!("unexpected reply {other:?}"),
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("connection lost before the echo"),
                }
            }
            crate::close(ws).await;
            anyhow::Ok((up, resumed))
        })
        .await;
        let end = Instant::now();
        let counted = end >= window_start && end <= window_end;
        match r {
            Ok(Ok((up, resumed))) => {
                if counted {
                    o.ok += 1;
                    o.resumed += u64::from(resumed);
                    record(&mut o.total, end - t);
                    record(&mut o.upgrade, up);
                }
            }
            Ok(Err(e)) => {
                if counted {
                    o.failed += 1;
                }
                o.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(_) => {
                if counted {
                    o.failed += 1;
                }
                o.first_error.get_or_insert_with(|| "iteration timed out (10 s)".into());
            }
        }
    }
    o
}
