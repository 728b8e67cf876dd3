//! Routes with `[routes.validate]`: how a client data message is handled (streamed,
//! assembled for validation, or skipped), the check of a whole message, and the
//! refusal (counted, logged, answered or ending the session).

use super::{Core, Event, Side, Stop};
use crate::config::OnInvalid;
use crate::error::CloseReason;
use crate::limits::IpKey;
use crate::validation::Invalid;
use crate::wire::{self, OP_BINARY, OP_CONTINUATION, OP_TEXT};
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What the assembly buffers of every session of a gateway may hold together, and what
/// one client may hold of it: beyond either, a session that needs more is closed with
/// 1013 (try again later) rather than let many half-sent messages exhaust memory, or
/// one client take the room every other client's messages need.
///
/// A client is its address key (IPv6 by `ipv6_prefix`) and, when known, its identity;
/// each holds at most `per_client` on its own, so neither many sockets from one
/// address nor one identity on many addresses takes more than one share. The map of
/// what each holds has an entry only while that client holds something: it is bounded
/// by the sessions assembling a message, never by the clients seen.
#[derive(Debug)]
pub struct AssemblyBudget {
    used: AtomicUsize,
    limit: usize,
    per_client: usize,
    held: Mutex<HashMap<Holder, usize>>,
}

/// How one session may hold assembly memory: under which budget, counted against
/// which client's share, and for how long a message may take to be whole.
#[derive(Debug)]
pub struct AssemblyShare {
    budget: Arc<AssemblyBudget>,
    holders: Vec<Holder>,
    /// A message being assembled must be complete this long after its first frame,
    /// else close 1001: a client cannot hold budget with a message it never finishes.
    pub(in crate::relay) timeout: std::time::Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Holder {
    Address(IpKey),
    Identity(Arc<str>),
}

impl AssemblyShare {
    /// A session of the client at `address` (already keyed by `ipv6_prefix`), with
    /// `identity` when it authenticated, under `budget`; messages whole within `timeout`.
    pub fn new(budget: Arc<AssemblyBudget>, address: Option<IpKey>, identity: Option<&str>, timeout: std::time::Duration) -> AssemblyShare {
        let holders = address
            .map(Holder::Address)
            .into_iter()
            .chain(identity.map(|i| Holder::Identity(i.into())))
            .collect();
        AssemblyShare { budget, holders, timeout }
    }

    fn take(&self, n: usize) -> bool {
        self.budget.take(n, &self.holders)
    }

    fn give_back(&self, n: usize) {
        self.budget.give_back(n, &self.holders)
    }
}

impl AssemblyBudget {
    /// A budget of `limit` bytes, of which one client may hold `per_client`.
    pub fn new(limit: usize, per_client: usize) -> AssemblyBudget {
        AssemblyBudget {
            used: AtomicUsize::new(0),
            limit,
            per_client,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Clients holding something now (the size of the per-client map).
    pub fn holders(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Holder, usize>> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self, n: usize, holders: &[Holder]) -> bool {
        let mut held = self.lock();
        let fits = |h: &Holder| {
            held.get(h)
                .copied()
                .unwrap_or(0)
                .checked_add(n)
                .is_some_and(|t| t <= self.per_client)
        };
        if !holders.iter().all(fits) {
            return false;
        }
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok();
        if taken {
            for h in holders {
                *held.entry(h.clone()).or_default() += n;
            }
        }
        taken
    }

    fn give_back(&self, n: usize, holders: &[Holder]) {
        if n == 0 {
            return;
        }
        let mut held = self.lock();
        for h in holders {
            if let Some(v) = held.get_mut(h) {
                *v = v.saturating_sub(n);
                if *v == 0 {
                    held.remove(h);
                }
            }
        }
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
    /// Held whole while it may be a refresh (`refresh = true`, `refresh.rs`): at most
    /// `MAX_REFRESH_MESSAGE` bytes, then relayed as one frame unless it is one.
    Probe,
}

impl Core {
    /// Give the budget back what this session's assembly buffer held.
    fn release_assembly(&mut self) {
        if let Some(share) = &self.assembly {
            share.give_back(std::mem::take(&mut self.held));
        }
    }

    /// Whether a message from `from` is being assembled for validation (its memory is
    /// held until it is whole): pings and pongs then do not count as activity.
    pub(super) fn assembling(&self, from: Side) -> bool {
        matches!(self.dec[from as usize].mode, Mode::Assemble | Mode::Probe)
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
        self.assembly_started = None;
        if self.dec[from as usize].refresh
            && text.len() <= super::refresh::MAX_REFRESH_MESSAGE
            && let Some(token) = super::refresh::refresh_token(&text)
        {
            return Some(Stop::Event(Event::Refresh(token.into_boxed_str())));
        }
        let checked = match &self.validator {
            Some(v) => v.check(&text),
            None => Ok(()),
        };
        match checked {
            Ok(()) => {
                self.put_message(from, OP_TEXT, &text);
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
/// sent), capped at the message limit, and taken from the session's `share` first. Returns the bytes
/// added to the buffer's capacity, or `None` when the budget has no room for them.
pub(super) fn grow(buf: &mut Vec<u8>, n: usize, max: usize, share: Option<&AssemblyShare>) -> Option<usize> {
    let need = buf.len() + n;
    if need <= buf.capacity() {
        return Some(0);
    }
    let want = need.max(buf.capacity() * 2).min(max.max(need));
    let added = want - buf.capacity();
    if share.is_some_and(|s| !s.take(added)) {
        return None;
    }
    buf.reserve_exact(want - buf.len());
    // The allocator may round up: what it gave beyond `want` is not counted.
    Some(added)
}

#[cfg(test)]
mod budget_tests {
    use super::*;
    use std::net::IpAddr;

    fn owner(ip: &str, identity: Option<&str>) -> Vec<Holder> {
        let address = IpKey::new(ip.parse::<IpAddr>().unwrap(), 64);
        std::iter::once(Holder::Address(address))
            .chain(identity.map(|i| Holder::Identity(i.into())))
            .collect()
    }

    #[test]
    fn a_client_holds_at_most_its_share_by_address_and_by_identity() {
        let b = AssemblyBudget::new(400, 100);
        let a1 = owner("192.0.2.1", None);
        assert!(b.take(60, &a1) && b.take(40, &a1));
        assert!(!b.take(1, &a1), "past the address's share");
        // IPv6 clients share their /64.
        let v6a = owner("2001:db8::1", None);
        let v6b = owner("2001:db8::2", None);
        assert!(b.take(100, &v6a));
        assert!(!b.take(1, &v6b));
        // One identity on two addresses holds one share.
        let (u1, u2) = (owner("192.0.2.7", Some("mallory")), owner("192.0.2.8", Some("mallory")));
        assert!(b.take(70, &u1));
        assert!(!b.take(31, &u2));
        assert!(b.take(30, &u2));
        assert_eq!(b.used(), 300);
        // Given back, the room is there again and the entries are gone.
        b.give_back(100, &a1);
        b.give_back(100, &v6a);
        b.give_back(70, &u1);
        b.give_back(30, &u2);
        assert_eq!((b.used(), b.holders()), (0, 0));
    }

    #[test]
    fn the_gateway_wide_limit_still_holds_and_the_map_does_not_grow_with_clients() {
        let b = AssemblyBudget::new(1000, 100);
        let mut held = Vec::new();
        for i in 0..10u32 {
            let o = owner(&std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string(), None);
            assert!(b.take(100, &o));
            held.push(o);
        }
        assert!(!b.take(1, &owner("10.9.9.9", None)), "past the gateway-wide limit");
        assert_eq!(b.holders(), 10);
        for o in &held {
            b.give_back(100, o);
        }
        for i in 0..100_000u32 {
            let o = owner(&std::net::Ipv4Addr::from(0x0b00_0000 + i).to_string(), Some("u"));
            assert!(b.take(10, &o));
            b.give_back(10, &o);
        }
        assert_eq!((b.used(), b.holders()), (0, 0));
    }
}
