//! Routes with `[routes.validate]`: how a client data message is handled (streamed,
//! assembled for validation, or skipped), the check of a whole message, and the
//! refusal (counted, logged, answered or ending the session).

use super::{Core, Event, Side, Stop};
use crate::config::OnInvalid;
use crate::error::CloseReason;
use crate::validation::Invalid;
use crate::wire::{self, OP_BINARY, OP_CONTINUATION, OP_TEXT};
use bytes::BytesMut;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What the assembly buffers of every session of a gateway may hold together: beyond
/// it, a session that needs more is closed with 1013 (try again later) rather than let
/// many half-sent messages exhaust memory.
#[derive(Debug)]
pub struct AssemblyBudget {
    used: AtomicUsize,
    limit: usize,
}

impl AssemblyBudget {
    pub fn new(limit: usize) -> AssemblyBudget {
        AssemblyBudget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.release_assembly();
    }
}

/// Rejected messages a session logs at INFO; later ones are logged at DEBUG, so a client
/// cannot flood the log (they are all counted).
const LOGGED_REJECTIONS: u32 = 8;

/// How the frames of a data message are handled.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(super) enum Mode {
    /// Streamed through in pieces (every message of a route without validation).
    #[default]
    Stream,
    /// Assembled for validation: nothing goes on until the message is whole and valid.
    Assemble,
    /// Refused (a binary message with `on_invalid = "reply"`): read and dropped.
    Skip,
}

impl Core {
    /// Give the budget back what this session's assembly buffer held.
    fn release_assembly(&mut self) {
        if let Some(b) = &self.budget {
            b.give_back(std::mem::take(&mut self.held));
        }
    }

    /// Whether a message from `from` is being assembled for validation (its memory is
    /// held until it is whole): pings and pongs then do not count as activity.
    pub(super) fn assembling(&self, from: Side) -> bool {
        self.dec[from as usize].mode == Mode::Assemble
    }

    /// How the message a data frame from `from` starts or continues is handled: streamed,
    /// unless the route validates client messages. A binary message on a route that
    /// refuses them ends the session here, before any of it is read, with
    /// `on_invalid = "close"`.
    pub(super) fn message_mode(&mut self, from: Side, h: &wire::Header) -> Result<Mode, CloseReason> {
        let Some(v) = self.validator.as_ref().filter(|_| from == Side::Client) else {
            return Ok(Mode::Stream);
        };
        match h.opcode {
            OP_CONTINUATION => Ok(self.dec[from as usize].mode),
            OP_TEXT if v.checks_text() => Ok(Mode::Assemble),
            OP_BINARY if !v.allows_binary() => match v.on_invalid() {
                OnInvalid::Reply => Ok(Mode::Skip), // answered when the message is complete
                OnInvalid::Close => {
                    let _ = self.reject(Invalid::binary(), None); // counted and logged; the session ends
                    Err(CloseReason::InvalidMessage(crate::error::MessageRejection::Binary))
                }
            },
            _ => Ok(Mode::Stream),
        }
    }

    /// The final frame of an assembled message is in: check the message, and put it in
    /// `ready` as one frame under a fresh gateway key, or refuse it. The assembly buffer
    /// is freed either way.
    pub(super) fn finish_message(&mut self, from: Side, replies: &mut BytesMut) -> Option<Stop> {
        let text = std::mem::take(&mut self.dec[from as usize].assembly);
        self.release_assembly(); // `text` is freed before this returns
        let checked = match &self.validator {
            Some(v) => v.check(&text),
            None => Ok(()),
        };
        match checked {
            Ok(()) => {
                wire::put_frame(&mut self.ready, OP_TEXT, &text, true);
                self.counts[from as usize] += 1;
                self.bytes[from as usize] += text.len() as u64;
                None
            }
            Err(invalid) => self.reject(invalid, Some(replies)),
        }
    }

    /// Count and log a refused client message; with `on_invalid = "reply"` queue the error
    /// message for the client (`replies`), else end the session.
    /// Without `replies` the session ends in either mode. Returns `None` when answered.
    pub(super) fn reject(&mut self, invalid: Invalid, replies: Option<&mut BytesMut>) -> Option<Stop> {
        let Some(v) = self.validator.as_ref() else {
            return Some(Stop::Event(Event::End(CloseReason::InvalidMessage(invalid.reason))));
        };
        let i = invalid.reason.index();
        self.rejected[i] += 1;
        let (reason, keyword) = (invalid.reason.label(), &*invalid.keyword);
        let pointer = crate::escape(&invalid.pointer, 128);
        if self.rejected.iter().sum::<u64>() <= u64::from(LOGGED_REJECTIONS) {
            tracing::info!(route = %v.route, reason, pointer, keyword, "client message rejected");
        } else {
            tracing::debug!(route = %v.route, reason, pointer, keyword, "client message rejected");
        }
        match (v.on_invalid(), replies) {
            (OnInvalid::Reply, Some(replies)) => {
                // Waits in the client's queue like a pong: never inside a frame to it.
                wire::put_frame(replies, OP_TEXT, &invalid.reply(), false);
                None
            }
            _ => Some(Stop::Event(Event::End(CloseReason::InvalidMessage(invalid.reason)))),
        }
    }
}

/// Make room for `n` more bytes in an assembly buffer: doubling as data arrives (never
/// ahead of it, so a client announcing a large frame and stalling holds only what it
/// sent), capped at the message limit, and taken from `budget` first. Returns the bytes
/// added to the buffer's capacity, or `None` when the budget has no room for them.
pub(super) fn grow(buf: &mut Vec<u8>, n: usize, max: usize, budget: Option<&AssemblyBudget>) -> Option<usize> {
    let need = buf.len() + n;
    if need <= buf.capacity() {
        return Some(0);
    }
    let want = need.max(buf.capacity() * 2).min(max.max(need));
    let added = want - buf.capacity();
    if budget.is_some_and(|b| !b.take(added)) {
        return None;
    }
    buf.reserve_exact(want - buf.len());
    // The allocator may round up: what it gave beyond `want` is not counted.
    Some(added)
}
