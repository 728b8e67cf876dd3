//! permessage-deflate (RFC 7692, DESIGN.md section 16) against the running gateway, with a
//! raw client on a real TLS socket: negotiation, compressed and plain messages both ways,
//! bombs, back-references, the memory budget and the config keys.

mod common;
use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsgate::wire;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A client speaking raw frames.
struct Raw {
    io: Tls,
    head: String,
    buf: Vec<u8>,
}

impl Raw {
    async fn open(gw: &Gw, path: &str, offer: Option<&str>) -> Raw {
        let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(gw.tls());
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut io = connector.connect(name, tcp).await.unwrap();
        let ext = offer.map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n")).unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
        );
        io.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(TIMEOUT, io.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "no answer");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        let rest = buf[end + 4..].to_vec();
        Raw { io, head, buf: rest }
    }

    fn extension(&self) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-extensions:"))
            .map(str::trim)
    }

    async fn send(&mut self, opcode: u8, fin: bool, rsv1: bool, payload: &[u8]) {
        self.io.write_all(&masked_frame(opcode, fin, rsv1, payload)).await.unwrap();
    }

    /// The next frame: (first header byte, payload); `None` at the end of the stream.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Ok(Some(h)) = wire::parse(&self.buf) {
                let total = h.header_len + h.len as usize;
                if self.buf.len() >= total {
                    let b0 = self.buf[0];
                    let payload = self.buf[h.header_len..total].to_vec();
                    self.buf.drain(..total);
                    return Some((b0, payload));
                }
            }
            let mut chunk = vec![0u8; 65536];
            let n = tokio::time::timeout(TIMEOUT, self.io.read(&mut chunk)).await.ok()?.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Frames until a close: its code (1006 when the stream ends without one).
    async fn close_code(&mut self) -> u16 {
        while let Some((b0, p)) = self.frame().await {
            if b0 & 0x0f == wire::OP_CLOSE {
                return u16::from_be_bytes([p[0], p[1]]);
            }
        }
        1006
    }
}

/// Raw deflate of one message with the tail stripped (RFC 7692 7.2.1), with `c`'s context.
fn deflate_with(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    while out.capacity() == out.len() {
        out.reserve(out.len());
        c.compress_vec(&[], &mut out, FlushCompress::Sync).unwrap();
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn deflate(data: &[u8]) -> Vec<u8> {
    deflate_with(&mut Compress::new(Compression::new(6), false), data)
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
    out
}

fn chat(i: usize) -> String {
    format!(
        r#"{{"type":"message","id":"msg-{i:08}","room":"general","user":{{"id":{},"name":"alice","avatar":"https://cdn.example.com/a/1.png"}},"text":"Hey, did you see the deploy notes for today? The gateway now compresses messages.","ts":{},"reactions":[],"thread":null,"client":"web/2.14.1 (Linux x86_64)"}}"#,
        1000 + i % 7,
        1_765_000_000 + i
    )
}

const ROUTES: &str = r#"
[limits]
max_message_size = "1MiB"

[[routes]]
name = "echo"
path = "/echo"
upstreams = ["builtin:echo"]
auth = "none"

[[routes]]
name = "plain"
path = "/plain"
upstreams = ["builtin:echo"]
auth = "none"
compression = false

[[routes]]
name = "keep"
path = "/keep"
upstreams = ["builtin:echo"]
auth = "none"
context_takeover = true
"#;

#[tokio::test]
async fn negotiated_messages_go_compressed_small_ones_plain() {
    let gw = Gw::start("", ROUTES).await;
    let mut c = Raw::open(&gw, "/echo", Some("permessage-deflate; client_max_window_bits")).await;
    assert_eq!(
        c.extension(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    for i in 0..20 {
        let msg = chat(i);
        c.send(wire::OP_TEXT, true, true, &deflate(msg.as_bytes())).await;
        let (b0, p) = c.frame().await.unwrap();
        assert_eq!(b0, 0x80 | 0x40 | wire::OP_TEXT, "one compressed frame");
        assert_eq!(inflate(&p), msg.as_bytes());
        assert!(p.len() * 100 < msg.len() * 80, "{} of {}", p.len(), msg.len());
    }
    c.send(wire::OP_BINARY, true, false, b"tiny").await;
    assert_eq!(c.frame().await.unwrap(), (0x80 | wire::OP_BINARY, b"tiny".to_vec()));
    // A compressed message in fragments, a ping between them.
    let z = deflate(chat(1).repeat(10).as_bytes());
    c.send(wire::OP_TEXT, false, true, &z[..5]).await;
    c.send(wire::OP_PING, true, false, b"p").await;
    c.send(wire::OP_CONTINUATION, true, false, &z[5..]).await;
    let mut got = Vec::new();
    loop {
        let (b0, p) = c.frame().await.unwrap();
        if b0 & 0x0f == wire::OP_PONG {
            continue;
        }
        got.extend_from_slice(&p);
        if b0 & 0x80 != 0 {
            break;
        }
    }
    assert_eq!(inflate(&got), chat(1).repeat(10).as_bytes());
    c.send(wire::OP_CLOSE, true, false, &1000u16.to_be_bytes()).await;
    assert_eq!(c.close_code().await, 1000);
    let text = gw.metrics_text().await;
    let wire_in = metric_value(
        &text,
        r#"wsgate_compressed_bytes_total{route="echo",direction="client_to_upstream",form="wire"}"#,
    );
    let payload_in = metric_value(
        &text,
        r#"wsgate_compressed_bytes_total{route="echo",direction="client_to_upstream",form="payload"}"#,
    );
    assert!(wire_in > 0.0 && wire_in < payload_in, "{wire_in} {payload_in}");
    gw.stop().await;
}

#[tokio::test]
async fn without_the_extension_nothing_changes() {
    let gw = Gw::start("", ROUTES).await;
    let mut c = Raw::open(&gw, "/plain", Some("permessage-deflate")).await;
    assert_eq!(c.extension(), None, "compression = false");
    c.send(wire::OP_TEXT, true, true, &deflate(b"hello")).await;
    assert_eq!(c.close_code().await, 1002, "RSV1 without the extension");
    let mut c = Raw::open(&gw, "/echo", None).await;
    assert_eq!(c.extension(), None, "not offered");
    c.send(wire::OP_TEXT, true, false, b"hello").await;
    assert_eq!(c.frame().await.unwrap(), (0x80 | wire::OP_TEXT, b"hello".to_vec()));
    assert!(!gw.metrics_text().await.contains("wsgate_compressed_bytes_total{"));
    gw.stop().await;
}

#[tokio::test]
async fn violations_close_with_the_right_code() {
    let gw = Gw::start("", ROUTES).await;
    let offer = Some("permessage-deflate");
    // RSV1 on a continuation frame.
    let mut c = Raw::open(&gw, "/echo", offer).await;
    c.send(wire::OP_TEXT, false, false, b"a").await;
    c.send(wire::OP_CONTINUATION, true, true, b"b").await;
    assert_eq!(c.close_code().await, 1002);
    // RSV1 on a ping.
    let mut c = Raw::open(&gw, "/echo", offer).await;
    c.send(wire::OP_PING, true, true, b"p").await;
    assert_eq!(c.close_code().await, 1002);
    // Data that does not inflate.
    let mut c = Raw::open(&gw, "/echo", offer).await;
    c.send(wire::OP_BINARY, true, true, &[0xff; 8]).await;
    assert_eq!(c.close_code().await, 1007);
    // Text that inflates to invalid UTF-8.
    let mut c = Raw::open(&gw, "/echo", offer).await;
    c.send(wire::OP_TEXT, true, true, &deflate(&[b'a', 0xff, b'b'])).await;
    assert_eq!(c.close_code().await, 1007);
    // A client that agreed to client_no_context_takeover and refers to its last message.
    let mut c = Raw::open(&gw, "/echo", offer).await;
    let mut z = Compress::new(Compression::new(6), false);
    let msg = chat(3);
    c.send(wire::OP_TEXT, true, true, &deflate_with(&mut z, msg.as_bytes())).await;
    assert_eq!(inflate(&c.frame().await.unwrap().1), msg.as_bytes());
    c.send(wire::OP_TEXT, true, true, &deflate_with(&mut z, msg.as_bytes())).await;
    assert_eq!(c.close_code().await, 1007);
    gw.stop().await;
}

/// 64 MiB of zeros deflate to ~64 KiB: as one frame and spread over 4 KiB fragments,
/// closed with 1009 at the 1 MiB message limit.
#[tokio::test]
async fn a_bomb_is_closed_at_the_message_limit() {
    let gw = Gw::start("", ROUTES).await;
    let mut z = Compress::new(Compression::new(9), false);
    let mut bomb = Vec::with_capacity(128 << 10);
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        z.compress_vec(&zeros, &mut bomb, FlushCompress::None).unwrap();
    }
    bomb.reserve(1024);
    z.compress_vec(&[], &mut bomb, FlushCompress::Sync).unwrap();
    assert!(bomb.len() < 80 << 10, "{}", bomb.len());
    let mut c = Raw::open(&gw, "/echo", Some("permessage-deflate")).await;
    c.send(wire::OP_BINARY, true, true, &bomb).await;
    assert_eq!(c.close_code().await, 1009);
    let mut c = Raw::open(&gw, "/echo", Some("permessage-deflate")).await;
    for (i, piece) in bomb.chunks(4096).enumerate() {
        let last = (i + 1) * 4096 >= bomb.len();
        let op = if i == 0 { wire::OP_BINARY } else { wire::OP_CONTINUATION };
        c.send(op, last, i == 0, piece).await;
    }
    assert_eq!(c.close_code().await, 1009);
    gw.stop().await;
}

/// With context takeover the client may refer back to earlier messages, and the state
/// each session keeps is reserved from `max_compression_memory`: past it, new sessions
/// are answered without the extension.
#[tokio::test]
async fn context_takeover_and_the_memory_budget() {
    let gw = Gw::start_with("", ROUTES, |t| {
        t.replace("[limits]\n", "[limits]\nmax_compression_memory = \"700KiB\"\n")
    })
    .await;
    let mut z = Compress::new(Compression::new(6), false);
    let mut a = Raw::open(&gw, "/keep", Some("permessage-deflate")).await;
    assert_eq!(a.extension(), Some("permessage-deflate"));
    let mut inflater = Decompress::new(false);
    for i in 0..3 {
        let msg = chat(i);
        a.send(wire::OP_TEXT, true, true, &deflate_with(&mut z, msg.as_bytes())).await;
        let (b0, mut p) = a.frame().await.unwrap();
        assert_ne!(b0 & 0x40, 0);
        p.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(4096);
        inflater.decompress_vec(&p, &mut out, FlushDecompress::Sync).unwrap();
        assert_eq!(out, msg.as_bytes(), "the gateway keeps its context too");
    }
    let b = Raw::open(&gw, "/keep", Some("permessage-deflate")).await;
    assert_eq!(b.extension(), Some("permessage-deflate"), "~350 KiB each: two fit");
    let c = Raw::open(&gw, "/keep", Some("permessage-deflate")).await;
    assert_eq!(c.extension(), None, "the budget is full");
    drop((a, b));
    let d = wait_for("budget given back", TIMEOUT, || {
        let gw = &gw;
        async move {
            let r = Raw::open(gw, "/keep", Some("permessage-deflate")).await;
            if r.extension().is_some() { Some(r) } else { None }
        }
    })
    .await;
    drop((c, d));
    gw.stop().await;
}

#[test]
fn bad_compression_keys_name_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    for (bad, key) in [
        ("compression_level = 0", "routes.compression_level"),
        ("compression_level = 10", "routes.compression_level"),
        ("compression_level = -1", "routes.compression_level"),
    ] {
        let text = config_text(dir.path(), "", &format!("{}{bad}\n", route("r", "/r", "builtin:echo", "none")));
        let e = wsgate::Config::from_toml_str(&text, "t.toml").unwrap_err();
        let line = text.lines().position(|l| l == bad).unwrap() + 1;
        assert_eq!((e.key.as_str(), e.line), (key, Some(line)), "{bad}: {e}");
    }
    let text = config_text(
        dir.path(),
        "",
        &format!("{}compression_min_size = \"lots\"\n", route("r", "/r", "builtin:echo", "none")),
    );
    assert!(wsgate::Config::from_toml_str(&text, "t.toml").is_err());
    let text = config_text(
        dir.path(),
        "",
        &format!(
            "{}compression = false\ncompression_level = 9\ncompression_min_size = \"1KiB\"\ncontext_takeover = true\nupstream_compression = true\n",
            route("r", "/r", "builtin:echo", "none")
        ),
    );
    let c = wsgate::Config::from_toml_str(&text, "t.toml").unwrap();
    let r = &c.routes[0].compression;
    assert_eq!(
        (r.client, r.level, r.min_size, r.context_takeover, r.upstream),
        (false, 9, 1024, true, true)
    );
}

#[test]
fn check_warns_about_costly_compression_settings() {
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        "{}context_takeover = true\ncompression_level = 9\n{}",
        route("keep", "/keep", "builtin:echo", "none"),
        route("plain", "/plain", "builtin:echo", "none")
    );
    let cfg = wsgate::Config::from_toml_str(&config_text(dir.path(), "", &routes), "t.toml").unwrap();
    let w = wsgate::check::warnings(&cfg);
    assert!(w.iter().any(|w| w.contains("\"keep\" has context_takeover = true")), "{w:?}");
    assert!(w.iter().any(|w| w.contains("\"keep\" has compression_level = 9")), "{w:?}");
    assert!(!w.iter().any(|w| w.contains("\"plain\" has co")), "{w:?}");
}

/// A compressed client message holds inflate state taken from `max_compression_memory`
/// while it is in progress: one that is not complete `assembly_timeout` after its first
/// frame ends the session (1001), so clients that never finish their messages cannot
/// hold the budget other sessions compress with. A slow message inside the deadline
/// goes through.
#[tokio::test]
async fn a_compressed_message_left_unfinished_is_closed_at_the_deadline() {
    let gw = Gw::start_with("", ROUTES, |t| t.replace("[limits]\n", "[limits]\nassembly_timeout = \"1s\"\n")).await;
    let offer = Some("permessage-deflate");
    let z = deflate(chat(1).as_bytes());
    let (first, rest) = z.split_at(z.len() / 2);
    // Finished in time, in two fragments 300 ms apart.
    let mut c = Raw::open(&gw, "/echo", offer).await;
    c.send(wire::OP_TEXT, false, true, first).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    c.send(wire::OP_CONTINUATION, true, false, rest).await;
    let (_, echoed) = c.frame().await.unwrap();
    assert_eq!(inflate(&echoed), chat(1).as_bytes());
    // Never finished.
    let t0 = std::time::Instant::now();
    c.send(wire::OP_TEXT, false, true, first).await;
    assert_eq!(c.close_code().await, 1001);
    let took = t0.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(900) && took < std::time::Duration::from_secs(5),
        "{took:?}"
    );
    gw.stop().await;
}
