//! WebSocket framing for the relay (RFC 6455 section 5): frame headers, masking,
//! streaming UTF-8 checks and close payloads.
//!
//! The relay forwards frames, not messages: it checks each frame's header against
//! the protocol and the size limits, unmasks and re-masks the payload in place, checks
//! text incrementally across fragments, and writes the frame on. Nothing here
//! allocates per frame.

use std::cell::RefCell;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The longest frame header: 2 bytes, a 64-bit length and a masking key.
pub const MAX_HEADER: usize = 14;
/// The longest control frame payload.
pub const MAX_CONTROL: usize = 125;

/// How a peer broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Close code 1002.
    Protocol,
    /// Close code 1009.
    TooBig,
    /// Close code 1007.
    Utf8,
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1: on the first frame of a message, "compressed" where permessage-deflate was
    /// agreed (RFC 7692); a violation everywhere else, which the caller checks.
    pub rsv1: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes the header takes, masking key included.
    pub header_len: usize,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Parse the frame header at the start of `buf`: `Ok(None)` when more bytes are needed.
/// Refuses RSV2 and RSV3 (no extension uses them), RSV1 on a control frame (RFC 7692
/// section 6.1), unknown opcodes, fragmented or long control frames and lengths with
/// the top bit set. RSV1 on a data frame is reported in [`Header::rsv1`]: whether it
/// is allowed depends on the session (permessage-deflate agreed, first frame).
pub fn parse(buf: &[u8]) -> Result<Option<Header>, Violation> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x30 != 0 {
        return Err(Violation::Protocol);
    }
    let fin = b0 & 0x80 != 0;
    let rsv1 = b0 & 0x40 != 0;
    let opcode = b0 & 0x0F;
    let short = b1 & 0x7F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG if fin && !rsv1 && usize::from(short) <= MAX_CONTROL => {}
        _ => return Err(Violation::Protocol),
    }
    let (len, mut at) = match short {
        126 => {
            let [_, _, a, b, ..] = *buf else { return Ok(None) };
            (u64::from(u16::from_be_bytes([a, b])), 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else { return Ok(None) };
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(Violation::Protocol);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let Some(key) = buf.get(at..at + 4) else { return Ok(None) };
        at += 4;
        Some([key[0], key[1], key[2], key[3]])
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        rsv1,
        opcode,
        mask,
        len,
        header_len: at,
    }))
}

/// XOR `buf` with `key` (the payload starts at key offset 0), eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let k = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ k).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// `key` as it applies from payload offset `offset` on.
pub fn rotate(key: [u8; 4], offset: usize) -> [u8; 4] {
    [key[offset % 4], key[(offset + 1) % 4], key[(offset + 2) % 4], key[(offset + 3) % 4]]
}

/// The XOR of two masking keys: unmasks with `a` and masks with `b` in one pass.
pub fn combine(a: [u8; 4], b: [u8; 4]) -> [u8; 4] {
    [a[0] ^ b[0], a[1] ^ b[1], a[2] ^ b[2], a[3] ^ b[3]]
}

thread_local! {
    /// Masking keys come from the system's CSPRNG in blocks, not one call per frame.
    static KEYS: RefCell<([u8; 256], usize)> = const { RefCell::new(([0; 256], 256)) };
}

/// A fresh masking key for a frame the gateway sends to an upstream (RFC 6455 10.3:
/// unpredictable, never the client's key).
pub fn new_mask() -> [u8; 4] {
    KEYS.with_borrow_mut(|(block, used)| {
        if *used + 4 > block.len() {
            if aws_lc_rs::rand::fill(block).is_err() {
                // The CSPRNG does not fail in practice; a time-derived key is still not
                // chosen by the client.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos();
                return t.to_ne_bytes();
            }
            *used = 0;
        }
        let k = [block[*used], block[*used + 1], block[*used + 2], block[*used + 3]];
        *used += 4;
        k
    })
}

/// The header of a frame with `len` payload bytes, masked with `mask` when given.
pub fn header(opcode: u8, fin: bool, len: usize, mask: Option<[u8; 4]>) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    h[0] = opcode | if fin { 0x80 } else { 0 };
    let m = if mask.is_some() { 0x80 } else { 0 };
    let mut at = match len {
        0..=125 => {
            h[1] = m | len as u8;
            2
        }
        126..=0xFFFF => {
            h[1] = m | 126;
            h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            h[1] = m | 127;
            h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    if let Some(k) = mask {
        h[at..at + 4].copy_from_slice(&k);
        at += 4;
    }
    (h, at)
}

/// Append a whole frame to `out`; `mask` for frames sent to an upstream.
pub fn put_frame(out: &mut bytes::BytesMut, opcode: u8, payload: &[u8], mask: bool) {
    let key = mask.then(new_mask);
    let (h, n) = header(opcode, true, payload.len(), key);
    out.extend_from_slice(&h[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(k) = key {
        apply_mask(&mut out[start..], k);
    }
}

/// The payload of a close frame: the code and the reason.
pub fn close_payload(code: u16, reason: &str) -> ([u8; MAX_CONTROL], usize) {
    let mut p = [0u8; MAX_CONTROL];
    p[..2].copy_from_slice(&code.to_be_bytes());
    // Reasons are the gateway's own short ASCII texts; cut at a char boundary anyway.
    let mut n = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(n) {
        n -= 1;
    }
    p[2..2 + n].copy_from_slice(&reason.as_bytes()[..n]);
    (p, 2 + n)
}

/// Close codes a peer may send (RFC 6455 7.4; 1004–1006 and 1015 never go on the wire).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Check an (unmasked) close payload; returns its code, if it has one.
pub fn check_close(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::Protocol),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !close_code_allowed(code) {
                return Err(Violation::Protocol);
            }
            std::str::from_utf8(reason).map_err(|_| Violation::Utf8)?;
            Ok(Some(code))
        }
    }
}

/// UTF-8 check of a text message that arrives in pieces: a code point may be split
/// between frames, so up to three trailing bytes are carried to the next piece.
#[derive(Default, Debug, Clone, Copy)]
pub struct Utf8 {
    carry: [u8; 4],
    len: u8,
}

impl Utf8 {
    /// Check the next piece; `last` when it ends the message.
    pub fn feed(&mut self, mut data: &[u8], last: bool) -> Result<(), Violation> {
        if self.len > 0 {
            let need = match self.carry[0] {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => return Err(Violation::Utf8),
            };
            while usize::from(self.len) < need && !data.is_empty() {
                self.carry[usize::from(self.len)] = data[0];
                self.len += 1;
                data = &data[1..];
            }
            let held = &self.carry[..usize::from(self.len)];
            match std::str::from_utf8(held) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_some() => return Err(Violation::Utf8),
                Err(_) => {} // still incomplete: `data` is empty
            }
        }
        if let Err(e) = std::str::from_utf8(data) {
            if e.error_len().is_some() {
                return Err(Violation::Utf8);
            }
            let rest = &data[e.valid_up_to()..];
            self.carry[..rest.len()].copy_from_slice(rest);
            self.len = rest.len() as u8;
        }
        if last && self.len > 0 {
            self.len = 0;
            return Err(Violation::Utf8);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for len in [0usize, 1, 125, 126, 0xFFFF, 0x10000, 1 << 20] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let (h, n) = header(OP_BINARY, len % 2 == 0, len, mask);
                let p = parse(&h[..n]).unwrap().unwrap();
                assert_eq!(
                    (p.len, p.mask, p.header_len, p.opcode, p.fin),
                    (len as u64, mask, n, OP_BINARY, len % 2 == 0)
                );
                // one byte short of the header: not yet a header
                assert_eq!(parse(&h[..n - 1]).unwrap(), None);
            }
        }
    }

    #[test]
    fn bad_headers_are_violations() {
        assert!(parse(&[0x82 | 0x40, 0]).unwrap().unwrap().rsv1, "RSV1 on data: the session decides");
        assert_eq!(parse(&[0x82 | 0x20, 0]), Err(Violation::Protocol)); // RSV2
        assert_eq!(parse(&[0x82 | 0x10, 0]), Err(Violation::Protocol)); // RSV3
        assert_eq!(parse(&[0x89 | 0x40, 0]), Err(Violation::Protocol)); // RSV1 on a ping
        assert_eq!(parse(&[0x88 | 0x40, 0]), Err(Violation::Protocol)); // RSV1 on a close
        assert_eq!(parse(&[0x83, 0]), Err(Violation::Protocol)); // reserved opcode
        assert_eq!(parse(&[0x8B, 0]), Err(Violation::Protocol)); // reserved control opcode
        assert_eq!(parse(&[0x09, 0]), Err(Violation::Protocol)); // fragmented ping
        assert_eq!(parse(&[0x89, 126, 0, 126]), Err(Violation::Protocol)); // long ping
        let mut h = [0x82u8, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse(&h), Err(Violation::Protocol)); // 64-bit length with the top bit
        h[2] = 0;
        assert!(parse(&h).unwrap().is_some());
    }

    #[test]
    fn masking_is_its_own_inverse_at_every_length() {
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).collect();
            let mut b = orig.clone();
            apply_mask(&mut b, [9, 8, 7, 6]);
            for (i, (x, o)) in b.iter().zip(&orig).enumerate() {
                assert_eq!(*x, o ^ [9, 8, 7, 6][i % 4]);
            }
            apply_mask(&mut b, combine([9, 8, 7, 6], [1, 2, 3, 4]));
            apply_mask(&mut b, [1, 2, 3, 4]);
            assert_eq!(b, orig);
        }
        assert_ne!(new_mask(), new_mask(), "fresh keys differ");
    }

    #[test]
    fn utf8_split_across_pieces() {
        let s = "aé€𝄞z".as_bytes();
        for cut1 in 0..s.len() {
            for cut2 in cut1..s.len() {
                let mut u = Utf8::default();
                u.feed(&s[..cut1], false).unwrap();
                u.feed(&s[cut1..cut2], false).unwrap();
                u.feed(&s[cut2..], true).unwrap();
            }
        }
        let mut u = Utf8::default();
        assert_eq!(u.feed(&[0xF0, 0x9D], true), Err(Violation::Utf8), "truncated at the end");
        let mut u = Utf8::default();
        u.feed(&[0xE0], false).unwrap();
        assert_eq!(
            u.feed(&[0x80], false),
            Err(Violation::Utf8),
            "overlong, caught before the next piece"
        );
        let mut u = Utf8::default();
        assert_eq!(u.feed(&[0xED, 0xA0, 0x80], false), Err(Violation::Utf8), "surrogate");
    }

    #[test]
    fn close_payloads() {
        assert_eq!(check_close(&[]), Ok(None));
        assert_eq!(check_close(&[3]), Err(Violation::Protocol));
        assert_eq!(check_close(&1000u16.to_be_bytes()), Ok(Some(1000)));
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(check_close(&bad.to_be_bytes()), Err(Violation::Protocol), "{bad}");
        }
        assert_eq!(check_close(&[0x03, 0xE8, 0xFF]), Err(Violation::Utf8));
        let (p, n) = close_payload(1001, "going away");
        assert_eq!(check_close(&p[..n]), Ok(Some(1001)));
        assert_eq!(&p[2..n], b"going away");
    }
}
