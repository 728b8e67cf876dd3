//! The echo backend: every text and binary message comes back unchanged; close
//! frames are answered with the same code (tungstenite does that). Serves the
//! `builtin:echo` upstream in process and the standalone `wsgate echo` command.

use futures_util::{FutureExt, SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::{
    io::{AsyncRead, AsyncWrite, DuplexStream},
    net::TcpListener,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};

/// Bytes buffered in each direction of the in-process pipe to the built-in echo.
const PIPE_BUFFER: usize = 16 * 1024;
/// Messages echoed before one flush, at most.
const BATCH: usize = 64;

/// Echo messages on an established WebSocket until it closes. Replies are batched:
/// every message already readable is queued before one flush.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocketStream<S>) {
    while let Some(Ok(msg)) = ws.next().await {
        if !echo_one(&mut ws, msg).await {
            return;
        }
        for _ in 0..BATCH {
            match ws.next().now_or_never() {
                Some(Some(Ok(msg))) => {
                    if !echo_one(&mut ws, msg).await {
                        return;
                    }
                }
                Some(_) => return,
                None => break,
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
}

async fn echo_one<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, msg: Message) -> bool {
    match msg {
        Message::Text(_) | Message::Binary(_) => ws.feed(msg).await.is_ok(),
        _ => true,
    }
}

/// Start the built-in echo behind an in-memory pipe; returns the client end.
/// The server side performs a real WebSocket handshake, so the upstream path is
/// exercised exactly as for a remote backend.
pub fn spawn_in_memory(config: WebSocketConfig) -> DuplexStream {
    let (client, server) = tokio::io::duplex(PIPE_BUFFER);
    tokio::spawn(async move {
        if let Ok(ws) = tokio_tungstenite::accept_async_with_config(server, Some(config)).await {
            serve(ws).await;
        }
    });
    client
}

/// Read and write buffer of the standalone echo server.
const STANDALONE_BUFFER: usize = 8 * 1024;

/// The standalone echo server (`wsgate echo --listen ADDR`), plain ws.
pub async fn run(listener: TcpListener) -> std::io::Result<()> {
    let config = WebSocketConfig::default()
        .read_buffer_size(STANDALONE_BUFFER)
        .write_buffer_size(STANDALONE_BUFFER);
    loop {
        let (tcp, _peer): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                crate::util::accept_failed("echo", &e).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            if let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await {
                serve(ws).await;
            }
        });
    }
}
