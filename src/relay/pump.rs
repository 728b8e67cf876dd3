//! Moving bytes from one side to the other: read, run the frames through [`Core`],
//! write what passes, with backpressure from the receiver and the client's message rate.

use super::{
    Endpoint,
    frames::{Core, Event, REPLY_LIMIT, Side, Stop, lost, write_error},
};
use bytes::{Buf, BytesMut};
use std::{
    cell::RefCell,
    pin::Pin,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from a side at once.
const READ_CHUNK: usize = 16 * 1024;
/// Reads from one side per wake-up before the relay yields to other tasks.
const BATCH: usize = 16;

thread_local! {
    /// The read buffer of the common case (no partial frame waiting): per worker thread,
    /// borrowed only inside one synchronous poll, so an idle session holds no buffer.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_CHUNK]);
}

/// Outcome of one read in [`pump`].
enum Read {
    /// Nothing to read now (or the receiver or the rate says wait).
    Wait,
    Again,
    Event(Event),
}

/// Move frames read from `from` (the peer on `side`) to `to` until `from` has nothing
/// ready, `to` pushes back, the rate holds the client back or the batch is used up.
pub(super) fn pump<A, B>(core: &mut Core, side: Side, from: &mut Endpoint<A>, to: &mut Endpoint<B>, cx: &mut Context<'_>) -> Option<Event>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    for _ in 0..BATCH {
        if to.poll_drain(cx).is_err() {
            return Some(Event::End(write_error(side)));
        }
        if !to.tx.is_empty() {
            return None; // the receiver pushes back: stop reading from its sender
        }
        if from.ctl.len() > REPLY_LIMIT {
            // Pongs pile up for a peer that sends pings but does not read.
            if from.poll_drain(cx).is_err() {
                return Some(Event::End(lost(side)));
            }
            if from.ctl.len() > REPLY_LIMIT {
                return None;
            }
        }
        if side == Side::Client && core.throttled(cx) {
            return None;
        }
        let step = if from.rx.is_empty() {
            read_fresh(core, side, from, to, cx)
        } else {
            read_held(core, side, from, to, cx)
        };
        match step {
            Read::Again => {}
            Read::Wait => return None,
            Read::Event(ev) => return Some(ev),
        }
    }
    // Batch used up: come back after other tasks had their turn.
    cx.waker().wake_by_ref();
    None
}

/// The common case: nothing held from earlier reads. Read into the thread's scratch
/// buffer, relay what it holds (data frames in pieces), and keep only the start of a
/// header or of a control frame at its end.
fn read_fresh<A, B>(core: &mut Core, side: Side, from: &mut Endpoint<A>, to: &mut Endpoint<B>, cx: &mut Context<'_>) -> Read
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut relay_from = |buf: &mut Vec<u8>| {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut from.io).poll_read(cx, &mut rb) {
            Poll::Pending => {
                if side == Side::Client {
                    core.throttled_since = None; // the client paused: it is within the rate
                }
                return Read::Wait;
            }
            Poll::Ready(Err(_)) => return Read::Event(Event::End(lost(side))),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return Read::Event(Event::End(lost(side))),
            Poll::Ready(Ok(())) => {}
        }
        let data = rb.filled_mut();
        let p = core.process(side, data, &mut from.ctl, from.masked);
        if pass_on(core, side, to, cx, &data[..p.out]).is_err() || pass_ready(core, side, to, cx).is_err() {
            return Read::Event(Event::End(write_error(side)));
        }
        from.rx.extend_from_slice(&data[p.used..]);
        match p.stop {
            Some(Stop::Event(ev)) => Read::Event(ev),
            Some(Stop::Throttle) | None => Read::Again,
        }
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => relay_from(&mut buf),
        // Not reached (polls do not nest); a private buffer keeps it correct anyway.
        Err(_) => relay_from(&mut vec![0; READ_CHUNK]),
    })
}

/// Input is held from earlier reads (a partial frame, or frames the rate held back):
/// relay what can go on, then read more behind it when a header or a control frame is
/// still incomplete.
fn read_held<A, B>(core: &mut Core, side: Side, from: &mut Endpoint<A>, to: &mut Endpoint<B>, cx: &mut Context<'_>) -> Read
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let p = core.process(side, &mut from.rx, &mut from.ctl, from.masked);
    if pass_on(core, side, to, cx, &from.rx[..p.out]).is_err() || pass_ready(core, side, to, cx).is_err() {
        return Read::Event(Event::End(write_error(side)));
    }
    from.rx.advance(p.used);
    if from.rx.is_empty() {
        from.rx = BytesMut::new();
    }
    match p.stop {
        Some(Stop::Event(ev)) => return Read::Event(ev),
        Some(Stop::Throttle) => return Read::Again,
        None if p.used > 0 => return Read::Again,
        None => {}
    }
    // What is held is the start of a frame header or of a control frame (data frames
    // stream through): read more behind it, one chunk at most.
    from.rx.reserve(READ_CHUNK);
    match tokio_util::io::poll_read_buf(Pin::new(&mut from.io), cx, &mut from.rx) {
        Poll::Pending => {
            if side == Side::Client {
                core.throttled_since = None;
            }
            Read::Wait
        }
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Read::Event(Event::End(lost(side))),
        Poll::Ready(Ok(_)) => Read::Again,
    }
}

/// Write a validated message `process` left in [`Core::ready`] (right behind what it
/// returned), then free it.
fn pass_ready<B>(core: &mut Core, side: Side, to: &mut Endpoint<B>, cx: &mut Context<'_>) -> std::io::Result<()>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    if core.ready.is_empty() {
        return Ok(());
    }
    let ready = std::mem::take(&mut core.ready);
    pass_on(core, side, to, cx, &ready)
}

/// Write what `side` relayed to `to`. `to` learns first whether that ends inside a data
/// frame: the gateway's own frames for it (pongs, pings, a close) then wait until the
/// frame is complete, so none lands inside it.
fn pass_on<B>(core: &Core, side: Side, to: &mut Endpoint<B>, cx: &mut Context<'_>, data: &[u8]) -> std::io::Result<()>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let was_open = std::mem::replace(&mut to.open, core.in_frame(side));
    if was_open && !to.open && !to.ctl.is_empty() {
        // Gateway frames were held for `to`, and its sender may have stopped reading
        // because of them (`REPLY_LIMIT`): poll again once they are written.
        cx.waker().wake_by_ref();
    }
    to.send(cx, data)
}
