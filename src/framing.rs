//! Request framing as the client sent it: the raw request heads hyper parses, checked
//! for what hyper accepts but a proxy must refuse (DESIGN.md section 13), and the
//! client connection's last activity.
//!
//! hyper's server already refuses (400, connection closed): obsolete line folding and
//! bare CR (httparse), `Content-Length` values that differ or are not one number
//! (`5, 5`), `Transfer-Encoding` whose final coding is not `chunked`, or on HTTP/1.0,
//! and an invalid chunk size (a body error). It accepts, and hides from the request it
//! hands over: `Content-Length` together with `Transfer-Encoding` (it drops the length
//! and closes after the response), the same `Content-Length` twice (one is dropped),
//! and a bare LF as a line end. [`Guarded`] sees the bytes before hyper does, parses
//! each head with the same parser (httparse) and queues a [`HeadCheck`] per head, in
//! order; the request stage takes one per request it serves and refuses a request
//! whose head was not clean with 400 and `Connection: close`.
//!
//! To find the next head the guard follows the body framing (a length or chunks)
//! itself. Once it cannot (a head it refuses, a framing it cannot follow, an upgrade),
//! it stops: every later request on the connection is refused, which is safe, since
//! the connection closes after a refusal.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Header lines parsed per head; hyper's server takes fewer (`conn`'s limit), so a
/// head hyper parses is parsed here too.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 4096;
/// Heads waiting for the request stage at most; beyond it the guard stops following.
const MAX_QUEUED: usize = 16;

/// What the guard found in one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadCheck {
    Clean,
    /// Refused with 400: why (a fixed text, never client input).
    Refused(&'static str),
}

/// Shared between the guarded stream (which reads) and the request stage (which asks).
#[derive(Debug)]
pub(crate) struct Heads {
    checks: Mutex<VecDeque<HeadCheck>>,
    /// A byte was read or written since the watchdog last looked (no clock read per
    /// read and write: the watchdog, which looks at least every head timeout, dates it).
    active: AtomicBool,
    /// Heads read whole; answers whose bodies hyper dropped (taken whole, or abandoned);
    /// answers written out (the first flush that completed after that). While every
    /// head read has its answer written and no request body is still coming, the
    /// connection waits for the next head.
    read: AtomicU64,
    ended: AtomicU64,
    answered: AtomicU64,
    /// A request body is still coming (the guard follows it), possibly after its answer.
    in_body: AtomicBool,
    /// Milliseconds after `start` when the last answer was written out or the last
    /// request body came whole, whichever was later (0: neither yet): when the wait for
    /// the next head began.
    waiting_since: AtomicU64,
    start: Instant,
}

impl Heads {
    pub(crate) fn new() -> Arc<Heads> {
        Arc::new(Heads {
            checks: Mutex::default(),
            active: AtomicBool::new(false),
            read: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            in_body: AtomicBool::new(false),
            waiting_since: AtomicU64::new(0),
            start: Instant::now(),
        })
    }

    /// When the connection began (the first head is due `head_timeout` after it).
    pub(crate) fn start(&self) -> Instant {
        self.start
    }

    /// A flush of the client connection completed: an answer whose body ended before it
    /// is now written out, and the wait for the next head begins (unless a request
    /// body is still coming). Not at the body's end: hyper and TLS may still hold its
    /// last bytes for a client slow to read them.
    fn flushed(&self) {
        let ended = self.ended.load(Ordering::Relaxed);
        if ended > self.answered.load(Ordering::Relaxed) {
            self.waiting_since
                .fetch_max(crate::util::millis_since(self.start), Ordering::Relaxed);
            self.answered.store(ended, Ordering::Relaxed);
        }
    }

    /// Whether the guard is inside a request body; the end of one is when the wait for
    /// the next head begins, if its answer was written out before.
    fn set_in_body(&self, in_body: bool) {
        if self.in_body.load(Ordering::Relaxed) != in_body {
            if !in_body {
                self.waiting_since
                    .fetch_max(crate::util::millis_since(self.start), Ordering::Relaxed);
            }
            self.in_body.store(in_body, Ordering::Relaxed);
        }
    }

    /// When the next request head must be whole, if the connection is waiting for one
    /// (no request in progress: every answer written out, no body still coming):
    /// `within` after that wait began (or the start). A head dribbled in does not move it.
    pub(crate) fn head_due(&self, within: Duration) -> Option<Instant> {
        let waiting = self.answered.load(Ordering::Relaxed) >= self.read.load(Ordering::Relaxed) && !self.in_body.load(Ordering::Relaxed);
        waiting.then(|| self.start + Duration::from_millis(self.waiting_since.load(Ordering::Relaxed)) + within)
    }

    /// Whether a byte moved either way since the last call.
    pub(crate) fn take_activity(&self) -> bool {
        self.active.swap(false, Ordering::Relaxed)
    }

    /// The check of the next request head hyper hands over. No check queued means the
    /// guard lost the framing: refused.
    pub(crate) fn next(&self) -> HeadCheck {
        crate::util::lock(&self.checks)
            .pop_front()
            .unwrap_or(HeadCheck::Refused("request framing not followed"))
    }

    fn push(&self, check: HeadCheck) -> bool {
        let mut q = crate::util::lock(&self.checks);
        if q.len() >= MAX_QUEUED {
            return false;
        }
        q.push_back(check);
        self.read.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn touch(&self) {
        self.active.store(true, Ordering::Relaxed);
    }
}

/// An answer's body as hyper writes it; dropped (taken whole, or abandoned), it tells
/// [`Heads`] the answer ended, counted as written out at the next completed flush.
pub(crate) struct Answering<B> {
    body: B,
    heads: Arc<Heads>,
}

impl<B> Answering<B> {
    pub(crate) fn new(body: B, heads: Arc<Heads>) -> Answering<B> {
        Answering { body, heads }
    }
}

impl<B> Drop for Answering<B> {
    fn drop(&mut self) {
        self.heads.ended.fetch_add(1, Ordering::Relaxed);
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Answering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Where the guard is in the client's byte stream.
#[derive(Debug)]
enum State {
    /// Reading a head (bytes so far in `buf`).
    Head,
    /// A body of a known length: bytes left.
    Body(u64),
    /// A chunk-size line (in `buf`).
    ChunkSize,
    /// Chunk data: bytes left, then CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data: how many of its bytes were seen.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, until an empty one.
    Trailers,
    /// Not followed any more.
    Lost,
}

/// The scanner: a state and one bounded line or head buffer.
#[derive(Debug)]
struct Scanner {
    state: State,
    buf: Vec<u8>,
    max_head: usize,
}

impl Scanner {
    fn feed(&mut self, mut data: &[u8], heads: &Heads) {
        while !data.is_empty() {
            match self.state {
                State::Lost => return,
                State::Head => {
                    // Empty lines before a request line are skipped (as httparse does).
                    if self.buf.is_empty() {
                        let skip = data.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let end = find_head_end(&self.buf, data);
                    let take = end.unwrap_or(data.len());
                    if self.buf.len() + take > self.max_head {
                        // hyper refuses a head this large itself (431).
                        self.lose("request head too large");
                        return;
                    }
                    if end.is_some() && self.buf.is_empty() {
                        // The whole head in this read (the usual case): checked where it lies.
                        self.head_done(&data[..take], heads);
                        data = &data[take..];
                        continue;
                    }
                    self.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if end.is_some() {
                        let head = std::mem::take(&mut self.buf);
                        self.head_done(&head, heads);
                        self.buf = head;
                        self.buf.clear();
                    }
                }
                State::Body(left) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = if left == n { State::Head } else { State::Body(left - n) };
                }
                State::ChunkSize | State::Trailers => {
                    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                        if self.buf.len() + data.len() > MAX_LINE {
                            self.lose("chunk line too long");
                        } else {
                            self.buf.extend_from_slice(data);
                        }
                        return;
                    };
                    if self.buf.len() + nl > MAX_LINE {
                        self.lose("chunk line too long");
                        return;
                    }
                    self.buf.extend_from_slice(&data[..nl]);
                    data = &data[nl + 1..];
                    let line = std::mem::take(&mut self.buf);
                    self.line_done(&line);
                    self.buf = line;
                    self.buf.clear();
                }
                State::ChunkData(left) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = if left == n {
                        State::ChunkEnd(0)
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::ChunkEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if data[0] != want {
                        self.lose("invalid chunk");
                        return;
                    }
                    data = &data[1..];
                    self.state = if seen == 0 { State::ChunkEnd(1) } else { State::ChunkSize };
                }
            }
        }
    }

    /// Inside a request body (a length or chunks still to come).
    fn in_body(&self) -> bool {
        matches!(
            self.state,
            State::Body(_) | State::ChunkSize | State::ChunkData(_) | State::ChunkEnd(_) | State::Trailers
        )
    }

    fn lose(&mut self, why: &'static str) {
        tracing::debug!(reason = why, "request framing no longer followed");
        self.state = State::Lost;
        self.buf = Vec::new();
    }

    /// A chunk-size line or a trailer line, without its LF.
    fn line_done(&mut self, line: &[u8]) {
        let Some(line) = line.strip_suffix(b"\r") else {
            return self.lose("chunk line without CRLF");
        };
        if matches!(self.state, State::Trailers) {
            if line.is_empty() {
                self.state = State::Head;
            }
            return;
        }
        // chunk-size [ chunk-ext ]: hex digits, then optional whitespace and `;ext`.
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let rest = &line[digits..];
        if digits == 0 || digits > 16 || !(rest.is_empty() || matches!(rest[0], b';' | b' ' | b'\t')) {
            return self.lose("invalid chunk size");
        }
        let size = std::str::from_utf8(&line[..digits])
            .ok()
            .and_then(|s| u64::from_str_radix(s, 16).ok());
        self.state = match size {
            Some(0) => State::Trailers,
            Some(n) => State::ChunkData(n),
            None => return self.lose("invalid chunk size"),
        };
    }

    /// A whole head (up to and including its empty line): check it, queue the check,
    /// and follow its body.
    fn head_done(&mut self, head: &[u8], heads: &Heads) {
        let (check, body) = check_head(head);
        if !heads.push(check) {
            return self.lose("too many queued heads");
        }
        match (check, body) {
            (HeadCheck::Clean, Some(Framing::Length(0))) => self.state = State::Head,
            (HeadCheck::Clean, Some(Framing::Length(n))) => self.state = State::Body(n),
            (HeadCheck::Clean, Some(Framing::Chunked)) => self.state = State::ChunkSize,
            _ => self.lose("head refused or not followed"),
        }
    }
}

/// The index in `data` just past the end of a head whose first bytes are `buf`: past
/// an empty line (`\n\n` or `\n\r\n`, as httparse ends a head).
fn find_head_end(buf: &[u8], data: &[u8]) -> Option<usize> {
    // The byte `back` places before `data[i]`, looking into `buf` before `data` starts.
    let before = |i: usize, back: usize| match i.checked_sub(back) {
        Some(j) => data.get(j).copied(),
        None => buf.len().checked_sub(back - i).and_then(|j| buf.get(j).copied()),
    };
    memchr::memchr_iter(b'\n', data)
        .find(|&i| before(i, 1) == Some(b'\n') || (before(i, 1) == Some(b'\r') && before(i, 2) == Some(b'\n')))
        .map(|i| i + 1)
}

/// How the body after a head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// Check one raw head; the framing of its body when the guard can follow it.
fn check_head(head: &[u8]) -> (HeadCheck, Option<Framing>) {
    // Line ends: every LF after a CR, every CR before an LF (RFC 9112 2.2: a bare CR
    // or LF must not be taken as a line end by a proxy).
    for i in memchr::memchr2_iter(b'\r', b'\n', head) {
        if head[i] == b'\r' {
            if head.get(i + 1) != Some(&b'\n') {
                return (HeadCheck::Refused("bare CR in the request head"), None);
            }
            continue;
        }
        if i == 0 || head[i - 1] != b'\r' {
            return (HeadCheck::Refused("bare LF in the request head"), None);
        }
        // obs-fold: a line that starts with whitespace continues the one before.
        if matches!(head.get(i + 1), Some(b' ' | b'\t')) {
            return (HeadCheck::Refused("obsolete line folding"), None);
        }
    }
    // Header slots left uninitialised (128 of them per head would be 4 KiB to clear).
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        // hyper refuses these itself (400 or 431); nothing to follow.
        _ => return (HeadCheck::Refused("unparsable request head"), None),
    }
    let mut lengths = 0usize;
    let mut length = None;
    let mut te = false;
    let mut chunked_last = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            let v = h.value.trim_ascii();
            length = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked_last = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    if te && lengths > 0 {
        return (HeadCheck::Refused("Content-Length with Transfer-Encoding"), None);
    }
    if lengths > 1 {
        return (HeadCheck::Refused("several Content-Length values"), None);
    }
    if te {
        // Not chunked last: hyper refuses it.
        return (HeadCheck::Clean, chunked_last.then_some(Framing::Chunked));
    }
    match (lengths, length) {
        (0, _) => (HeadCheck::Clean, Some(Framing::Length(0))),
        (_, Some(n)) => (HeadCheck::Clean, Some(Framing::Length(n))),
        // Not one number: hyper refuses it.
        (_, None) => (HeadCheck::Refused("invalid Content-Length"), None),
    }
}

/// The client's stream, watched on its way to hyper.
pub(crate) struct Guarded<S> {
    inner: S,
    scanner: Scanner,
    heads: Arc<Heads>,
}

impl<S> Guarded<S> {
    /// `max_head`: the longest head hyper accepts (its read buffer).
    pub(crate) fn new(inner: S, heads: Arc<Heads>, max_head: usize) -> Guarded<S> {
        Guarded {
            inner,
            scanner: Scanner {
                state: State::Head,
                buf: Vec::new(),
                max_head,
            },
            heads,
        }
    }

    /// The stream itself (after an upgrade: the relay reads it directly).
    pub(crate) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                this.heads.touch();
                this.scanner.feed(new, &this.heads);
                this.heads.set_in_body(this.scanner.in_body());
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.heads.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            self.heads.flushed();
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.heads.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(input: &[&[u8]]) -> Vec<HeadCheck> {
        let heads = Heads::new();
        let mut s = Scanner {
            state: State::Head,
            buf: Vec::new(),
            max_head: 8192,
        };
        for part in input {
            s.feed(part, &heads);
        }
        let mut out = Vec::new();
        while let Some(c) = crate::util::lock(&heads.checks).pop_front() {
            out.push(c);
        }
        out
    }

    #[test]
    fn pipelined_requests_are_followed_through_their_bodies() {
        let input: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /POST /b HTTP/1.1\r\nHost: x\r\n\
            Transfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(checks(&[input]), [HeadCheck::Clean; 3]);
        // Byte by byte: the same.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(checks(&bytes), [HeadCheck::Clean; 3]);
        // Split in two at every place: the same.
        for k in 1..input.len() {
            assert_eq!(checks(&[&input[..k], &input[k..]]), [HeadCheck::Clean; 3], "split at {k}");
        }
    }

    #[test]
    fn heads_hyper_would_take_but_a_proxy_must_not_are_refused() {
        for (head, why) in [
            (
                &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                "Content-Length with Transfer-Encoding",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                "Content-Length with Transfer-Encoding",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                "several Content-Length values",
            ),
            (b"GET / HTTP/1.1\nHost: x\r\n\r\n", "bare LF in the request head"),
            (b"GET / HTTP/1.1\r\nHost: x\n\n", "bare LF in the request head"),
            (b"GET / HTTP/1.1\r\nHost: x\rY: z\r\n\r\n", "bare CR in the request head"),
            (b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n c\r\n\r\n", "obsolete line folding"),
        ] {
            assert_eq!(checks(&[head]), [HeadCheck::Refused(why)], "{}", String::from_utf8_lossy(head));
            // Split in two at every place (a head read whole, or gathered across reads): the same.
            for k in 1..head.len() {
                assert_eq!(checks(&[&head[..k], &head[k..]]), [HeadCheck::Refused(why)], "split at {k}");
            }
        }
        // After a refused head nothing more is followed: a request behind it is refused too.
        let heads = Heads::new();
        let mut s = Scanner {
            state: State::Head,
            buf: Vec::new(),
            max_head: 8192,
        };
        s.feed(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            &heads,
        );
        assert!(matches!(heads.next(), HeadCheck::Refused(_)));
        assert!(matches!(heads.next(), HeadCheck::Refused(_)));
    }

    #[test]
    fn an_invalid_chunk_stops_the_guard() {
        let out = checks(&[b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"]);
        assert_eq!(out, [HeadCheck::Clean]);
    }
}
