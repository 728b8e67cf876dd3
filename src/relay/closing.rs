//! Ending a session: the close handshakes with both peers, passing a peer's close
//! through and delivering what is still in flight before it.

use super::{
    Endpoint,
    frames::{Core, Event, Side},
    pump::pump,
};
use crate::error::{CLOSE_ABNORMAL, CLOSE_NO_STATUS, CloseReason, Initiator};
use crate::wire::{self, OP_CLOSE};
use std::{future::poll_fn, task::Poll, time::Duration};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Complete the close handshakes after `event`; returns (code, initiator, gateway reason).
pub(super) async fn finish<C, U>(
    core: &mut Core,
    client: &mut Endpoint<C>,
    upstream: &mut Endpoint<U>,
    event: Event,
    timeout: Duration,
) -> (u16, Initiator, Option<CloseReason>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    match event {
        Event::Closed {
            side: Side::Client,
            payload,
            len,
        } => client_closed(core, client, upstream, &payload[..len], timeout).await,
        Event::Closed {
            side: Side::Upstream,
            payload,
            len,
        } => upstream_closed(client, upstream, &payload[..len], timeout).await,
        Event::End(reason) if is_client_fault(reason) => client_fault(core, client, upstream, reason, timeout).await,
        Event::End(reason) => gateway_ends(core, client, upstream, reason, timeout).await,
        // `run` judges refreshes and goes on; one is never how a session ends.
        Event::Refresh(_) => gateway_ends(core, client, upstream, CloseReason::RefreshRefused, timeout).await,
    }
}

/// The client's close goes on to the upstream first. What the upstream sends until its
/// own close still reaches the client; then the client gets its own frame back (RFC 6455
/// 5.5.1) and the gateway, its server, ends the connection.
async fn client_closed<C, U>(
    core: &mut Core,
    client: &mut Endpoint<C>,
    upstream: &mut Endpoint<U>,
    frame: &[u8],
    timeout: Duration,
) -> (u16, Initiator, Option<CloseReason>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    close_upstream_first(core, client, upstream, frame, timeout).await;
    client.put(OP_CLOSE, frame); // held back, and the connection cut, if a frame to it is unfinished
    let _ = tokio::time::timeout(timeout, client.cut()).await;
    (close_code(frame), Initiator::Client, None)
}

/// The upstream's close: answered at once, passed on to the client, whose answer ends
/// the client connection.
async fn upstream_closed<C, U>(
    client: &mut Endpoint<C>,
    upstream: &mut Endpoint<U>,
    frame: &[u8],
    timeout: Duration,
) -> (u16, Initiator, Option<CloseReason>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    client.put(OP_CLOSE, frame);
    upstream.put(OP_CLOSE, frame);
    let _ = tokio::time::timeout(timeout, async {
        tokio::join!(
            async {
                if client.open {
                    client.cut().await;
                } else if client.flush().await.is_ok() {
                    client.read_until_close(0).await;
                    let _ = client.io.shutdown().await;
                }
            },
            async {
                if upstream.open {
                    upstream.cut().await;
                } else {
                    let _ = upstream.flush().await;
                }
            }
        )
    })
    .await;
    (close_code(frame), Initiator::Upstream, None)
}

/// The client broke the protocol or a limit. Nothing more is read from it, but what the
/// upstream sent before it saw the close still reaches the client, ahead of its close.
async fn client_fault<C, U>(
    core: &mut Core,
    client: &mut Endpoint<C>,
    upstream: &mut Endpoint<U>,
    reason: CloseReason,
    timeout: Duration,
) -> (u16, Initiator, Option<CloseReason>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cc, uc) = reason.codes();
    let (p, n) = wire::close_payload(u16::from(uc), reason.text());
    close_upstream_first(core, client, upstream, &p[..n], timeout).await;
    // A frame to the client still unfinished: its connection is cut, without a code.
    let code = if client.open { CLOSE_ABNORMAL } else { u16::from(cc) };
    let _ = tokio::time::timeout(timeout, async {
        // The rest of the refused frame's payload is not frames: skipped, so the
        // client's close behind it is found.
        client
            .close_skipping(Some((u16::from(cc), reason.text())), core.frame_left(Side::Client))
            .await;
        let _ = client.io.shutdown().await;
    })
    .await;
    (code, Initiator::Gateway, Some(reason))
}

/// The gateway ends the session (timeouts, shutdown, policy, a lost peer, an upstream
/// fault): both peers that are still there get a close with the reason, at once.
async fn gateway_ends<C, U>(
    core: &Core,
    client: &mut Endpoint<C>,
    upstream: &mut Endpoint<U>,
    reason: CloseReason,
    timeout: Duration,
) -> (u16, Initiator, Option<CloseReason>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cc, uc) = reason.codes();
    let (cc, uc) = (u16::from(cc), u16::from(uc));
    let client_ok = !matches!(reason, CloseReason::ClientIo);
    let upstream_ok = !matches!(reason, CloseReason::UpstreamReset);
    // A frame to the client still unfinished: its connection is cut, without a code.
    let client_told = client_ok && !client.open;
    let _ = tokio::time::timeout(timeout, async {
        tokio::join!(
            async {
                if client_ok {
                    client.close(Some((cc, reason.text()))).await;
                    let _ = client.io.shutdown().await;
                }
            },
            async {
                if upstream_ok {
                    upstream
                        .close_skipping(Some((uc, reason.text())), core.frame_left(Side::Upstream))
                        .await;
                }
            }
        )
    })
    .await;
    let code = if client_told { cc } else { CLOSE_ABNORMAL };
    (code, Initiator::Gateway, Some(reason))
}

/// The client broke the protocol or a limit (as opposed to a timeout, a policy or a lost peer).
fn is_client_fault(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::ClientProtocol | CloseReason::ClientInvalidUtf8 | CloseReason::ClientTooBig | CloseReason::InvalidMessage(_)
    )
}

/// The code of a checked close payload; 1005 when it has none.
fn close_code(payload: &[u8]) -> u16 {
    wire::check_close(payload).ok().flatten().unwrap_or(CLOSE_NO_STATUS)
}

/// Pass a close (payload `frame`) on to the upstream, then keep relaying what the
/// upstream still sends to the client until its own close, within `timeout`.
async fn close_upstream_first<C, U>(core: &mut Core, client: &mut Endpoint<C>, upstream: &mut Endpoint<U>, frame: &[u8], timeout: Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if upstream.open {
        // The client's frame in progress was cut short: no close frame can follow it.
        let _ = tokio::time::timeout(timeout, upstream.cut()).await;
    } else {
        upstream.put(OP_CLOSE, frame);
    }
    let _ = tokio::time::timeout(timeout, relay_rest(core, Side::Upstream, upstream, client)).await;
}

/// Keep relaying what `from` sends until its close frame arrives, it breaks the
/// protocol or its connection ends: the close handshake passes through the gateway,
/// and messages `from` sent before it saw the close are not lost.
async fn relay_rest<A, B>(core: &mut Core, side: Side, from: &mut Endpoint<A>, to: &mut Endpoint<B>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    poll_fn(|cx| {
        core.now = None;
        if pump(core, side, from, to, cx).is_some() {
            return Poll::Ready(());
        }
        // `from` holds the close frame passed on to it; `to` what was relayed.
        if let Poll::Ready(Err(_)) = from.poll_flush(cx) {
            return Poll::Ready(());
        }
        if let Poll::Ready(Err(_)) = to.poll_flush(cx) {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
    let _ = to.flush().await;
}
