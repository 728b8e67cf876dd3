//! `chat`: a JSON chat workload with or without permessage-deflate (RFC 7692): bytes on
//! the wire per message, server CPU per message, and idle memory per socket.
//!
//! The client is a small raw WebSocket client of its own (tungstenite has no
//! permessage-deflate): TCP with byte counters under TLS, the upgrade with or without
//! the offer, and messages of ~300 bytes of realistic JSON, each echoed and compared.
//! With `--deflate` it compresses what it sends as a browser does after the server's
//! `client_no_context_takeover` (each message on its own), or with its context kept
//! when the server did not ask for that.
//!
//! Modes: messages (`--messages` per connection, one in flight each) report wire bytes
//! both ways per message and server CPU per message; `--idle` opens the sockets, sends
//! one message on each, and reports the server's RSS growth per socket.

use crate::util::{CpuMark, merge, print_result, round1, round3, rss_tree_kb};
use anyhow::{Context, bail};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::json;
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context as Cx, Poll},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use wsgate::wire;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub conn: crate::client::ConnArgs,
    /// Connections.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Messages per connection (one in flight).
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Offer permessage-deflate.
    #[arg(long)]
    pub deflate: bool,
    /// Idle mode: hold `--connections` sockets (one message each) and report the server's
    /// RSS growth per socket (`--rss-pid`).
    #[arg(long)]
    pub idle: bool,
    #[arg(long = "rss-pid")]
    pub rss_pids: Vec<u32>,
}

/// Bytes through the TCP sockets (TLS records included), both ways.
#[derive(Default)]
struct Wire {
    read: AtomicU64,
    written: AtomicU64,
}

struct Counted {
    tcp: TcpStream,
    wire: Arc<Wire>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Cx<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        self.wire.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Cx<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            self.wire.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Cx<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Cx<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

type Io = tokio_rustls::client::TlsStream<Counted>;

struct Conn {
    io: Io,
    buf: Vec<u8>,
    /// The server agreed to permessage-deflate; whether it asked for no context takeover.
    deflate: Option<bool>,
    tx: Option<Compress>,
    rx: Decompress,
}

/// A chat message of about 300 bytes of JSON.
pub fn chat_message(conn: usize, i: usize) -> Vec<u8> {
    const NAMES: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];
    const TEXTS: [&str; 4] = [
        "Hey, did you see the deploy notes for today? The gateway compresses messages now.",
        "Lunch at 12:30? The usual place, I booked a table for five.",
        "Can someone review PR #4812 before the standup? It touches the billing export.",
        "Thanks! Works on my side too, closing the ticket.",
    ];
    format!(
        r#"{{"type":"message","id":"m-{conn:04}-{i:08}","room":"team-{}","user":{{"id":{},"name":"{}","avatar":"https://cdn.example.com/u/{}.png"}},"text":"{}","ts":{},"reactions":[],"thread":null,"client":"web/2.14.1"}}"#,
        conn % 8,
        1000 + (i + conn) % 5,
        NAMES[(i + conn) % 5],
        1000 + (i + conn) % 5,
        TEXTS[i % 4],
        1_765_000_000_000u64 + i as u64
    )
    .into_bytes()
}

async fn open(a: &crate::client::ConnArgs, tls: &tokio_rustls::TlsConnector, deflate: bool, wire: Arc<Wire>) -> anyhow::Result<Conn> {
    let url = a.url.strip_prefix("wss://").context("--url must be wss://")?;
    let (hostport, path) = url.split_once('/').map_or((url, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let tcp = TcpStream::connect(hostport).await.context("TCP connect")?;
    tcp.set_nodelay(true)?;
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h).to_string();
    let name = rustls::pki_types::ServerName::try_from(host.clone())?;
    let mut io = tls.connect(name, Counted { tcp, wire }).await.context("TLS")?;
    let auth = a
        .token
        .as_ref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let ext = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}{ext}\r\n"
    );
    io.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 2048];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            bail!("no answer to the upgrade");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 101") {
        bail!("upgrade refused: {}", head.lines().next().unwrap_or(""));
    }
    let agreed = head
        .lines()
        .find_map(|l| l.strip_prefix("sec-websocket-extensions:"))
        .filter(|v| v.contains("permessage-deflate"))
        .map(|v| v.contains("client_no_context_takeover"));
    let rest = buf[end + 4..].to_vec();
    Ok(Conn {
        io,
        buf: rest,
        deflate: agreed,
        tx: None,
        rx: Decompress::new(false),
    })
}

impl Conn {
    async fn send(&mut self, msg: &[u8]) -> anyhow::Result<()> {
        let (payload, rsv1) = match self.deflate {
            Some(fresh) => {
                if fresh || self.tx.is_none() {
                    self.tx = Some(Compress::new(Compression::new(6), false));
                }
                let c = self.tx.as_mut().context("compressor")?;
                let mut out = Vec::with_capacity(msg.len() + 64);
                c.compress_vec(msg, &mut out, FlushCompress::Sync)?;
                out.truncate(out.len().saturating_sub(4)); // 00 00 ff ff
                (out, true)
            }
            None => (msg.to_vec(), false),
        };
        let key = wire::new_mask();
        let (mut h, n) = wire::header(wire::OP_TEXT, true, payload.len(), Some(key));
        if rsv1 {
            h[0] |= 0x40;
        }
        let mut frame = h[..n].to_vec();
        let at = frame.len();
        frame.extend_from_slice(&payload);
        wire::apply_mask(&mut frame[at..], key);
        self.io.write_all(&frame).await?;
        Ok(())
    }

    /// The next data message, inflated when it came compressed.
    async fn recv(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Ok(Some(h)) = wire::parse(&self.buf) {
                let total = h.header_len + h.len as usize;
                if self.buf.len() >= total {
                    let payload: Vec<u8> = self.buf[h.header_len..total].to_vec();
                    self.buf.drain(..total);
                    if h.is_control() {
                        continue;
                    }
                    if !h.fin {
                        bail!("fragmented echo (not expected for short messages)");
                    }
                    if !h.rsv1 {
                        return Ok(payload);
                    }
                    if self.deflate == Some(true) {
                        self.rx = Decompress::new(false);
                    }
                    let mut input = payload;
                    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
                    let mut out = Vec::with_capacity(4096);
                    self.rx.decompress_vec(&input, &mut out, FlushDecompress::Sync)?;
                    return Ok(out);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let cc = wsgate::tls::cli_client_config(a.conn.ca.as_deref(), a.conn.insecure).map_err(anyhow::Error::msg)?;
    let mut cc = (*cc).clone();
    cc.resumption = rustls::client::Resumption::disabled();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cc));
    let wire = Arc::new(Wire::default());
    if a.idle {
        return idle(a, &tls, wire).await;
    }
    let mut conns = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        conns.push(open(&a.conn, &tls, a.deflate, wire.clone()).await?);
    }
    let agreed = conns.iter().all(|c| c.deflate.is_some());
    if a.deflate && !agreed {
        bail!("the server did not agree to permessage-deflate");
    }
    let (r0, w0) = (wire.read.load(Ordering::Relaxed), wire.written.load(Ordering::Relaxed));
    let mark = CpuMark::now(&a.conn.cpu_pids);
    let t0 = Instant::now();
    let messages = a.messages;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(ci, mut c)| {
            tokio::spawn(async move {
                let mut payload = 0u64;
                for i in 0..messages {
                    let m = chat_message(ci, i);
                    c.send(&m).await?;
                    let back = c.recv().await?;
                    anyhow::ensure!(back == m, "echo differs");
                    payload += m.len() as u64;
                }
                anyhow::Ok(payload)
            })
        })
        .collect();
    let mut payload = 0u64;
    for t in tasks {
        payload += t.await??;
    }
    let wall = t0.elapsed();
    let later = CpuMark::now(&a.conn.cpu_pids);
    let total = (a.connections * a.messages) as u64;
    let (read, written) = (wire.read.load(Ordering::Relaxed) - r0, wire.written.load(Ordering::Relaxed) - w0);
    let fields = json!({
        "deflate": agreed,
        "messages": total,
        "payload_bytes_per_msg": round1(payload as f64 / total as f64),
        "wire_up_per_msg": round1(written as f64 / total as f64),
        "wire_down_per_msg": round1(read as f64 / total as f64),
        "wire_per_msg": round1((read + written) as f64 / total as f64 / 2.0),
        "wire_ratio": round3((read + written) as f64 / 2.0 / payload as f64),
        "msgs_per_s": round1(total as f64 / wall.as_secs_f64().max(1e-9)),
    });
    print_result("chat", &a.conn.tags, merge(fields, mark.fields(&later, total)));
    Ok(())
}

async fn idle(a: Args, tls: &tokio_rustls::TlsConnector, wire: Arc<Wire>) -> anyhow::Result<()> {
    let rss = |pids: &[u32]| -> Option<u64> { pids.iter().map(|&p| rss_tree_kb(p)).sum() };
    // Warm-up: the allocator's first arenas are not charged to the sockets.
    for i in 0..16 {
        let mut c = open(&a.conn, tls, a.deflate, wire.clone()).await?;
        let m = chat_message(i, 0);
        c.send(&m).await?;
        c.recv().await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(&a.rss_pids);
    let mut held = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let mut c = open(&a.conn, tls, a.deflate, wire.clone()).await?;
        let m = chat_message(i, 1);
        c.send(&m).await?;
        anyhow::ensure!(c.recv().await? == m, "echo differs");
        held.push(c);
    }
    let agreed = held.iter().all(|c| c.deflate.is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss(&a.rss_pids);
    let per = match (before, after) {
        (Some(b), Some(a)) => json!(round1(a.saturating_sub(b) as f64 / held.len().max(1) as f64)),
        _ => json!(null),
    };
    let fields = json!({"deflate": agreed, "count": held.len(), "kb_per_socket": per});
    print_result("chat-idle", &a.conn.tags, fields);
    drop(held);
    Ok(())
}
