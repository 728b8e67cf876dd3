//! One side of a session: its stream and the buffers around it.

use crate::limits::MessageRate;
use crate::wire::{self, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT};
use bytes::{Buf, BytesMut};
use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Room made in the read buffer for each read outside the relay loop (first message, closing).
const READ_RESERVE: usize = 4096;

/// Frames a client may send before its `first_message` token is complete.
pub(crate) const MAX_PRE_TOKEN_FRAMES: usize = 32;

/// One side of a session after its handshake: the stream, input read but not yet
/// relayed (the start of a header or of a control frame, or frames held back by the
/// message rate), relayed output the stream did not take yet, and the gateway's own
/// frames for it (pongs, pings, close). All three are empty, without capacity, while
/// idle.
pub struct Endpoint<S> {
    pub(super) io: S,
    pub(super) rx: BytesMut,
    /// Relayed frames; the sender of these is not read while any are left.
    pub(super) tx: BytesMut,
    /// Gateway frames, written when `tx` is empty (both hold whole frames only, so
    /// neither lands inside a frame of the other).
    pub(super) ctl: BytesMut,
    /// Frames sent to this side are masked: it is the upstream (the gateway is its client).
    pub(super) masked: bool,
    /// Written to since the last flush.
    dirty: bool,
    /// The relayed output ends inside a data frame (streamed through in pieces): gateway
    /// frames wait in `ctl` until the rest of it has been written.
    pub(super) open: bool,
    /// The client's message rate as [`Endpoint::first_text`] left it, and until when
    /// the token's frame holds reading back: the frames sent before a `first_message`
    /// token paid toward it, and the relay goes on from there.
    pub(super) paid: Option<Box<(MessageRate, Option<tokio::time::Instant>)>>,
}

impl<S> Endpoint<S> {
    /// The client side; `read_ahead` is what the client sent right behind its request.
    pub fn client(io: S, read_ahead: &[u8]) -> Self {
        Self::new(io, read_ahead, false)
    }

    /// The upstream side; `read_ahead` is what the upstream sent right behind its 101.
    pub fn upstream(io: S, read_ahead: &[u8]) -> Self {
        Self::new(io, read_ahead, true)
    }

    fn new(io: S, read_ahead: &[u8], masked: bool) -> Self {
        Endpoint {
            io,
            rx: BytesMut::from(read_ahead),
            tx: BytesMut::new(),
            ctl: BytesMut::new(),
            masked,
            dirty: false,
            open: false,
            paid: None,
        }
    }

    /// Queue a whole frame the gateway sends to this side.
    pub(super) fn put(&mut self, opcode: u8, payload: &[u8]) {
        wire::put_frame(&mut self.ctl, opcode, payload, self.masked);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Endpoint<S> {
    /// Write `data` behind anything already queued; what the stream does not take now
    /// is queued.
    pub(super) fn send(&mut self, cx: &mut Context<'_>, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if !self.tx.is_empty() || !self.ctl.is_empty() {
            self.tx.extend_from_slice(data);
            return self.poll_drain(cx);
        }
        let mut off = 0;
        while off < data.len() {
            match Pin::new(&mut self.io).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    off += n;
                    self.dirty = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        self.tx.extend_from_slice(&data[off..]);
        Ok(())
    }

    /// Write queued output until it is gone or the stream pushes back.
    pub(super) fn poll_drain(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.tx.is_empty() {
                if self.ctl.is_empty() || self.open {
                    break;
                }
                std::mem::swap(&mut self.tx, &mut self.ctl);
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.tx) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.tx.advance(n);
                    self.dirty = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
        // Idle sessions keep no buffer.
        if self.tx.capacity() > 0 {
            self.tx = BytesMut::new();
        }
        if self.ctl.is_empty() && self.ctl.capacity() > 0 {
            self.ctl = BytesMut::new();
        }
        Ok(())
    }

    /// Drain the queue, then flush the stream (TLS keeps records until flushed).
    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_drain(cx)?;
        // Gateway frames held behind an unfinished relayed frame wait for its sender.
        if !self.tx.is_empty() || (!self.ctl.is_empty() && !self.open) {
            return Poll::Pending;
        }
        if self.dirty {
            std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.dirty = false;
        }
        Poll::Ready(Ok(()))
    }

    pub(super) async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Send a close frame (`None`: without a code) and wait for the peer's reply.
    pub async fn close(&mut self, frame: Option<(u16, &str)>) {
        self.close_skipping(frame, 0).await;
    }

    /// [`Endpoint::close`] after a frame from this peer was refused part-way: the first
    /// `skip` bytes it sends (the rest of that frame's payload) are not frames, and
    /// must not be read as a header that swallows its close.
    pub(super) async fn close_skipping(&mut self, frame: Option<(u16, &str)>, skip: u64) {
        if self.open {
            self.cut().await;
            return;
        }
        match frame {
            Some((code, reason)) => {
                let (p, n) = wire::close_payload(code, reason);
                self.put(OP_CLOSE, &p[..n]);
            }
            None => self.put(OP_CLOSE, &[]),
        }
        if self.flush().await.is_ok() {
            self.read_until_close(skip).await;
        }
    }

    /// End the connection without a close frame: the relayed frame in progress was cut
    /// short (its sender broke the protocol or went away, or time ran out), and a close
    /// frame behind it would be read as its payload. What was relayed is flushed; the
    /// peer sees the connection end inside the frame, so it never takes the frame as a
    /// message.
    pub(super) async fn cut(&mut self) {
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }

    /// Read and discard frames until a close frame or the end of the stream: messages
    /// that arrive after a close was sent cannot be delivered (RFC 6455 5.5.1). The
    /// first `skip` bytes are the rest of a frame's payload.
    pub(super) async fn read_until_close(&mut self, mut skip: u64) {
        loop {
            loop {
                if skip > 0 {
                    let n = skip.min(self.rx.len() as u64);
                    self.rx.advance(n as usize);
                    skip -= n;
                    if skip > 0 {
                        break;
                    }
                }
                match wire::parse(&self.rx) {
                    Ok(Some(h)) if h.opcode == OP_CLOSE => return,
                    Ok(Some(h)) => {
                        self.rx.advance(h.header_len);
                        skip = h.len;
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            self.rx.reserve(READ_RESERVE);
            match self.io.read_buf(&mut self.rx).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// The client's first data message, for `first_message` authentication: pings are
    /// answered, pongs skipped; it must be text of at most `max` bytes, in at most
    /// `MAX_PRE_TOKEN_FRAMES` frames (controls included: an unauthenticated client
    /// cannot keep the gateway busy with pings). Frames behind it stay for the relay.
    /// `None` on anything else.
    ///
    /// Every frame pays toward the client's message rate (`rate`, `burst`), as in the
    /// relay: past it, nothing more is read until the rate allows (backpressure; the
    /// caller's `first_message_timeout` bounds the wait), and the relay goes on with
    /// what was paid here.
    pub async fn first_text(&mut self, max: usize, rate: crate::config::Rate, burst: u32) -> Option<String> {
        let mut paid = (MessageRate::new(rate, burst), None);
        let text = self.first_text_paying(max, &mut paid).await;
        self.paid = Some(Box::new(paid));
        text
    }

    async fn first_text_paying(&mut self, max: usize, (rate, wait): &mut (MessageRate, Option<tokio::time::Instant>)) -> Option<String> {
        let mut text = Vec::new();
        let mut started = false;
        let mut frames = 0;
        loop {
            match wire::parse(&self.rx) {
                Err(_) => return None,
                // No extension is agreed on a route that waits for its token: RSV1 is a violation.
                Ok(Some(h)) if h.rsv1 || h.len > max as u64 => return None,
                Ok(Some(h)) if self.rx.len() as u64 >= h.header_len as u64 + h.len => {
                    let mask = h.mask?; // a client's frames are masked
                    frames += 1;
                    if frames > MAX_PRE_TOKEN_FRAMES {
                        return None;
                    }
                    let mut frame = self.rx.split_to(h.header_len + h.len as usize);
                    let payload = &mut frame[h.header_len..];
                    wire::apply_mask(payload, mask);
                    match h.opcode {
                        OP_PING => {
                            self.put(OP_PONG, payload);
                            self.flush().await.ok()?;
                        }
                        OP_PONG => {}
                        OP_TEXT if !started => {
                            text.extend_from_slice(payload);
                            started = true;
                        }
                        OP_CONTINUATION if started && text.len() + payload.len() <= max => text.extend_from_slice(payload),
                        _ => return None,
                    }
                    // A control frame may come between the fragments (RFC 6455 5.4): only
                    // the final data frame ends the message.
                    let done = started && h.fin && !h.is_control();
                    // The frame is paid for; past the rate, the next one waits. After the
                    // token, the relay does that wait (the token is checked meanwhile).
                    *wait = rate.take(tokio::time::Instant::now());
                    if let (Some(until), false) = (*wait, done) {
                        tokio::time::sleep_until(until).await;
                    }
                    if done {
                        break;
                    }
                    continue;
                }
                Ok(_) => {}
            }
            self.rx.reserve(READ_RESERVE);
            if self.io.read_buf(&mut self.rx).await.ok()? == 0 {
                return None;
            }
        }
        if self.rx.is_empty() {
            self.rx = BytesMut::new();
        }
        String::from_utf8(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::frames::tests::{frame, frames};

    const UNLIMITED: crate::config::Rate = crate::config::Rate {
        count: 1_000_000,
        per: std::time::Duration::from_secs(1),
    };

    #[tokio::test]
    async fn frames_before_a_first_message_token_are_capped() {
        use tokio::io::AsyncWriteExt;
        let (gateway_side, mut client) = tokio::io::duplex(1 << 16);
        let mut ep = Endpoint::client(gateway_side, &[]);
        let k = Some([1, 2, 3, 4]);
        let mut wire_bytes = Vec::new();
        for _ in 0..MAX_PRE_TOKEN_FRAMES {
            wire_bytes.extend(frame(OP_PONG, true, b"", k));
        }
        wire_bytes.extend(frame(OP_TEXT, true, b"token", k));
        client.write_all(&wire_bytes).await.unwrap();
        assert_eq!(
            ep.first_text(1024, UNLIMITED, 1).await,
            None,
            "the token came after the frame budget"
        );
        let (gateway_side, mut client) = tokio::io::duplex(1 << 16);
        let mut ep = Endpoint::client(gateway_side, &[]);
        let mut wire_bytes = Vec::new();
        for _ in 0..MAX_PRE_TOKEN_FRAMES - 1 {
            wire_bytes.extend(frame(OP_PONG, true, b"", k));
        }
        wire_bytes.extend(frame(OP_TEXT, true, b"token", k));
        client.write_all(&wire_bytes).await.unwrap();
        assert_eq!(ep.first_text(1024, UNLIMITED, 1).await.as_deref(), Some("token"));
    }

    #[tokio::test]
    async fn a_ping_between_the_fragments_of_a_first_message_is_answered_and_skipped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (gateway_side, mut client) = tokio::io::duplex(4096);
        let mut ep = Endpoint::client(gateway_side, &[]);
        let k = Some([1, 2, 3, 4]);
        let mut wire_bytes = frame(OP_TEXT, false, b"{\"token\": \"ab", k);
        wire_bytes.extend(frame(OP_PING, true, b"hi", k));
        wire_bytes.extend(frame(OP_CONTINUATION, true, b"c\"}", k));
        wire_bytes.extend(frame(OP_TEXT, true, b"next", k));
        client.write_all(&wire_bytes).await.unwrap();
        let text = ep.first_text(1024, UNLIMITED, 1).await;
        assert_eq!(text.as_deref(), Some("{\"token\": \"abc\"}"));
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(frames(&pong), vec![(OP_PONG, true, b"hi".to_vec())]);
        // The message behind the token is still there, whole.
        assert_eq!(frames(&ep.rx), vec![(OP_TEXT, true, b"next".to_vec())]);
    }
}
