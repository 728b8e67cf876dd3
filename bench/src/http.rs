//! `http`: plain HTTP/1.1 requests over kept-alive connections (a small GET, one request
//! in flight per connection, closed loop): requests/s, latency and server CPU per request.
//! `http-app` (hidden) is the app behind the targets: it answers every request head with
//! `200` and a fixed body, keep-alive, so the bench measures the proxy, not the app.

use crate::{
    client::{ConnArgs, Connector},
    util::{Padded, Window, histogram, merge, ms, print_result, record, sum},
};
use serde_json::json;
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Kept-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Measuring window, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Traffic before the window, seconds (not counted).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
}

/// The largest answer head read; a longer one is an error.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Default)]
struct Outcome {
    bad_status: u64,
    error: Option<String>,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.connections > 0, "--connections must be positive");
    let connector = Connector::new(&a.conn).await?;
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: wsgate-bench\r\n",
        connector.path()
    );
    if let Some(v) = connector.auth() {
        request.push_str(&format!("Authorization: {}\r\n", v.to_str()?));
    }
    for (k, v) in connector.headers() {
        request.push_str(&format!("{k}: {}\r\n", v.to_str()?));
    }
    request.push_str("\r\n");
    let request: Arc<[u8]> = Arc::from(request.into_bytes());

    let mut conns = Vec::with_capacity(a.connections);
    let mut connect_failures = 0u64;
    let mut connect_error = None;
    for _ in 0..a.connections {
        match tokio::time::timeout(Duration::from_secs(30), connector.connect_io()).await {
            Ok(Ok(io)) => conns.push(io),
            Ok(Err(e)) => {
                connect_failures += 1;
                connect_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(_) => {
                connect_failures += 1;
                connect_error.get_or_insert_with(|| "connect timed out (30 s)".into());
            }
        }
    }
    anyhow::ensure!(
        !conns.is_empty(),
        "no connection could be opened: {}",
        connect_error.unwrap_or_default()
    );

    let counters: Arc<[Padded]> = (0..conns.len()).map(|_| Padded::default()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(histogram()));
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, io)| {
            let (counters, stop, measuring, hist, request) =
                (counters.clone(), stop.clone(), measuring.clone(), hist.clone(), request.clone());
            tokio::spawn(async move { conn_loop(io, &request, &counters[i], &stop, &measuring, &hist).await })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let window = Window::start(&a.conn.cpu_pids);
    let (c0, t0) = (sum(&counters), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    let (c1, t1) = (sum(&counters), Instant::now());
    let measured = window.end().await;
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);

    let (mut errors, mut bad_status, mut first_error) = (0u64, 0u64, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(o)) => {
                bad_status += o.bad_status;
                if o.error.is_some() {
                    errors += 1;
                    first_error = first_error.or(o.error);
                }
            }
            _ => errors += 1,
        }
    }
    let secs = (t1 - t0).as_secs_f64();
    let requests = c1 - c0;
    let h = hist.lock().map(|h| h.clone()).unwrap_or_else(|_| histogram());
    print_result(
        "http",
        &a.conn.tags,
        merge(
            json!({
                "connections": a.connections,
                "duration_s": (secs * 100.0).round() / 100.0,
                "requests": requests,
                "per_s": (requests as f64 / secs).round(),
                "p50_ms": ms(&h, 0.5),
                "p99_ms": ms(&h, 0.99),
                "bad_status": bad_status,
                "errors": errors + bad_status,
                "connect_failures": connect_failures,
                "first_error": first_error.or(connect_error),
            }),
            measured.fields(requests),
        ),
    );
    Ok(())
}

/// One connection: send the request, read the whole answer, count a 2xx, repeat until `stop`.
async fn conn_loop<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    request: &[u8],
    counter: &Padded,
    stop: &AtomicBool,
    measuring: &AtomicBool,
    hist: &Mutex<hdrhistogram::Histogram<u64>>,
) -> Outcome {
    let mut o = Outcome::default();
    let mut local = histogram();
    let mut buf = Vec::with_capacity(4096);
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let status = match exchange(&mut io, request, &mut buf).await {
            Ok(s) => s,
            Err(e) => {
                o.error = Some(format!("{e:#}"));
                break;
            }
        };
        if (200..300).contains(&status) {
            counter.0.fetch_add(1, Ordering::Relaxed);
            if measuring.load(Ordering::Relaxed) {
                record(&mut local, start.elapsed());
            }
        } else {
            o.bad_status += 1;
            o.error.get_or_insert_with(|| format!("status {status}"));
            break;
        }
    }
    if let Ok(mut h) = hist.lock() {
        let _ = h.add(&local);
    }
    let _ = io.shutdown().await;
    o
}

/// Write one request and read its answer (head, then a `Content-Length` body); the status.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, request: &[u8], buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    io.write_all(request).await?;
    io.flush().await?;
    buf.clear();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        anyhow::ensure!(buf.len() < MAX_HEAD, "answer head over {MAX_HEAD} bytes");
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed by the server");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line"))?;
    let mut length = None;
    for line in head.split("\r\n") {
        let Some((k, v)) = line.split_once(':') else { continue };
        if k.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            anyhow::bail!("chunked answers are not read by this client");
        }
    }
    let length = length.ok_or_else(|| anyhow::anyhow!("answer without Content-Length (status {status})"))?;
    let mut have = buf.len() - head_end;
    while have < length {
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed inside the body");
        have += n;
    }
    anyhow::ensure!(have == length, "more bytes than the answer's Content-Length");
    Ok(status)
}

/// The app behind the HTTP row: every request head gets `200` with `size` bytes, kept alive.
pub async fn serve_app(listen: SocketAddr, size: usize) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let body = "x".repeat(size);
    let answer: Arc<[u8]> =
        Arc::from(format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {size}\r\n\r\n{body}").into_bytes());
    loop {
        let (mut tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut filled = 0usize;
            loop {
                let n = match tcp.read(&mut buf[filled..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                filled += n;
                // Answer every complete head (GETs carry no body); keep the rest.
                let mut answers = 0;
                while let Some(p) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.copy_within(p + 4..filled, 0);
                    filled -= p + 4;
                    answers += 1;
                }
                if filled == buf.len() {
                    return; // a head over 8 KiB: not ours
                }
                for _ in 0..answers {
                    if tcp.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}
