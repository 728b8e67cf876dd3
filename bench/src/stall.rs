//! `stall`: memory held for large frames in progress. N clients each send the header
//! and a part of one large binary frame, then stall; the server's resident memory is
//! read before the clients connect and once they have all sent their part.
//!
//! A server that holds frames whole keeps every part received (and room for the rest);
//! one that streams frames through keeps only its read buffers.

use crate::{
    client::ConnArgs,
    client::Connector,
    util::{payload, print_result, round1, rss_tree_kb},
};
use anyhow::Context;
use serde_json::json;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Clients.
    #[arg(long, default_value_t = 24)]
    pub count: usize,
    /// Payload bytes of the frame each client starts.
    #[arg(long, default_value_t = 900 * 1024)]
    pub frame_size: usize,
    /// Payload bytes of it each client sends before it stalls.
    #[arg(long, default_value_t = 450 * 1024)]
    pub send: usize,
    /// Server process whose VmRSS (with its children's) is read (repeatable).
    #[arg(long = "rss-pid")]
    pub rss_pids: Vec<u32>,
    /// Seconds to wait after the last part was sent before reading RSS.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
}

fn rss(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&p| rss_tree_kb(p)).sum()
}

/// The header of a masked binary frame with `len` payload bytes, and its key.
fn header(len: usize, key: [u8; 4]) -> Vec<u8> {
    let (h, n) = wsgate::wire::header(wsgate::wire::OP_BINARY, true, len, Some(key));
    h[..n].to_vec()
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.send <= a.frame_size, "--send is larger than --frame-size");
    let connector = Connector::new(&a.conn).await?;
    // Warm the server up (one-off start-up allocations), then take the baseline.
    let (warm, _, err) = crate::connect_all(&connector, 4, 4).await;
    anyhow::ensure!(!warm.is_empty(), "warm-up: no connection: {}", err.unwrap_or_default());
    for ws in warm {
        crate::close(ws).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss(&a.rss_pids);

    let (mut open, failed, first_error) = crate::connect_all(&connector, a.count, 8).await;
    let key = [0x5A, 0xC3, 0x0F, 0x96];
    let mut part = header(a.frame_size, key);
    let start = part.len();
    part.extend_from_slice(&payload(0, 0, a.send));
    wsgate::wire::apply_mask(&mut part[start..], key);
    for ws in &mut open {
        // The raw stream under the WebSocket: the frame is written by hand, and never finished.
        let io = ws.get_mut();
        tokio::time::timeout(Duration::from_secs(30), async {
            io.write_all(&part).await?;
            io.flush().await
        })
        .await
        .context("sending a part timed out: the server does not read it")??;
    }
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let rss_stalled = rss(&a.rss_pids);
    let growth = match (rss_before, rss_stalled) {
        (Some(b), Some(s)) => Some(s as i64 - b as i64),
        _ => None,
    };
    let per_client = growth.filter(|_| !open.is_empty()).map(|g| round1(g as f64 / open.len() as f64));
    print_result(
        "stall",
        &a.conn.tags,
        json!({
            "count": a.count,
            "opened": open.len(),
            "connect_failures": failed,
            "frame_size": a.frame_size,
            "sent": a.send,
            "rss_before_kb": rss_before,
            "rss_stalled_kb": rss_stalled,
            "rss_growth_kb": growth,
            "kb_per_client": per_client,
            "first_error": first_error,
        }),
    );
    drop(open);
    Ok(())
}
