//! The relay allocates nothing per message: frames are checked and re-masked in the
//! read buffer and written on from there. Counted with dhat's allocator over
//! in-memory pipes, with raw-frame peers that allocate nothing themselves.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use wsgate::{relay, wire};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const PAYLOAD: usize = 64;
const PER_BATCH: usize = 100;

/// An upstream that echoes every frame back unmasked, from preallocated buffers.
async fn raw_echo(mut io: DuplexStream) {
    let mut pending = Vec::with_capacity(1 << 20);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(1 << 20);
    loop {
        let n = match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while let Ok(Some(h)) = wire::parse(&pending[at..]) {
            let total = h.header_len + h.len as usize;
            if pending.len() - at < total {
                break;
            }
            let payload = &mut pending[at + h.header_len..at + total];
            if let Some(k) = h.mask {
                wire::apply_mask(payload, k);
            }
            let (head, hl) = wire::header(h.opcode, h.fin, payload.len(), None);
            out.extend_from_slice(&head[..hl]);
            out.extend_from_slice(payload);
            at += total;
        }
        pending.drain(..at);
        if io.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

#[test]
fn relaying_allocates_nothing_per_message() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (mut client, gw_client) = tokio::io::duplex(64 * 1024);
        let (gw_up, up) = tokio::io::duplex(64 * 1024);
        tokio::spawn(raw_echo(up));
        tokio::spawn(async move {
            let mut settings = relay::Settings::unthrottled(1 << 20);
            let metrics = wsgate::metrics::Metrics::new().session("alloc");
            let shutdown = tokio_util::sync::CancellationToken::new();
            let mut control = relay::Control::new(&shutdown);
            control.progress = Some(Duration::from_secs(3600));
            let (mut c, mut u) = (relay::Endpoint::client(gw_client, &[]), relay::Endpoint::upstream(gw_up, &[]));
            relay::run(&mut c, &mut u, &mut settings, &metrics, &mut control).await
        });
        // A batch of masked binary frames, as a client sends them.
        let mut batch = Vec::new();
        for i in 0..PER_BATCH {
            let key = [i as u8, 7, 13, 42];
            let (h, n) = wire::header(wire::OP_BINARY, true, PAYLOAD, Some(key));
            batch.extend_from_slice(&h[..n]);
            let start = batch.len();
            batch.extend((0..PAYLOAD).map(|j| (i + j) as u8));
            wire::apply_mask(&mut batch[start..], key);
        }
        let expect = PER_BATCH * (2 + PAYLOAD);
        let mut back = vec![0u8; expect];
        let mut round = async |batches: usize| {
            for _ in 0..batches {
                client.write_all(&batch).await.unwrap();
                client.read_exact(&mut back).await.unwrap();
                // The echo is the payload, unmasked, in order.
                assert!(back[2..2 + PAYLOAD].iter().enumerate().all(|(j, b)| *b == j as u8));
            }
        };
        round(20).await; // warm-up: thread-local buffers, timers, metric handles
        let before = dhat::HeapStats::get();
        round(100).await;
        let after = dhat::HeapStats::get();
        let messages = 100 * PER_BATCH;
        let blocks = after.total_blocks - before.total_blocks;
        eprintln!("{blocks} allocations while relaying {messages} messages each way");
        assert!(blocks <= 10, "{blocks} allocations while relaying {messages} messages each way");
    });
}
