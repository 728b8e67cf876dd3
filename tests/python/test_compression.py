"""permessage-deflate (RFC 7692, DESIGN.md section 16) end to end: the Python `websockets`
client and server negotiate it with the gateway, each hop on its own; a raw client sends what
no library would (a bomb, RSV1 where it is not allowed, back-references across messages).

Routes: /echo (compression on, the default; messages up to 1 MiB), /plain (compression = false),
/json (validated JSON), /up (upstream_compression = true, to a `websockets` server that
compresses).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import struct
import threading
import time
import urllib.request
import zlib

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from wsgate_harness import Gateway, default_binary, render_config

pytestmark = pytest.mark.timeout(120)
STEP = 10

# An upstream that compresses: records the extension it agreed to with the gateway.
UPSTREAM_SEEN: list[str] = []


def start_upstream() -> tuple[int, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = {}

    async def handler(ws):
        UPSTREAM_SEEN.append(ws.response.headers.get("Sec-WebSocket-Extensions", ""))
        async for msg in ws:
            await ws.send(msg)

    async def main():
        async with serve(handler, "127.0.0.1", 0, compression="deflate", max_size=None) as server:
            port["p"] = server.sockets[0].getsockname()[1]
            ready.set()
            await asyncio.Future()

    threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True).start()
    assert ready.wait(STEP)
    return port["p"], loop


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    binary = default_binary()
    if not binary.is_file():
        pytest.fail(f"wsgate binary not found at {binary}: build it (cargo build) or set WSGATE_BIN")
    tmp = tmp_path_factory.mktemp("wsgate-compression")
    up_port, _ = start_upstream()
    routes = f"""
[routes.limits]
max_message_size = "1MiB"

[[routes]]
name = "plain"
path = "/plain"
upstreams = ["builtin:echo"]
auth = "none"
compression = false

[[routes]]
name = "json"
path = "/json"
upstreams = ["builtin:echo"]
auth = "none"

[routes.validate]
json = true

[[routes]]
name = "up"
path = "/up"
upstreams = ["ws://127.0.0.1:{up_port}"]
auth = "none"
upstream_compression = true
"""
    config = tmp / "gateway.toml"
    limits = 'message_rate = "100000/s"\nmessage_burst = 100000\n'
    config.write_text(render_config(tmp, auth="none", limits_extra=limits) + routes)
    g = Gateway(binary, config, tmp / "wsgate.log")
    g.dir = tmp
    yield g
    g.stop()


def ctx(g) -> ssl.SSLContext:
    c = ssl.create_default_context(cafile=str(g.dir / "server.crt"))
    c.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return c


def ws(g, path, compression="deflate"):
    return connect(f"wss://127.0.0.1:{g.port}{path}", ssl=ctx(g), compression=compression,
                   open_timeout=STEP, close_timeout=STEP, proxy=None, max_size=None)


def chat(i: int) -> str:
    """A realistic chat message of ~300 bytes of JSON."""
    return json.dumps({
        "type": "message", "id": f"msg-{i:08d}", "room": "general",
        "user": {"id": 1000 + i % 7, "name": ["alice", "bob", "carol"][i % 3], "avatar": "https://cdn.example.com/a/1.png"},
        "text": "Hey, did you see the deploy notes for today? The gateway now compresses messages.",
        "ts": 1765000000 + i, "reactions": [], "thread": None,
    })


def metrics(g) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{g.admin_port}/metrics", timeout=STEP) as r:
        return r.read().decode()


def series(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_websockets_negotiates_and_exchanges_messages(gw):
    async def go():
        async with ws(gw, "/echo") as c:
            ext = c.response.headers.get("Sec-WebSocket-Extensions", "")
            assert ext.startswith("permessage-deflate"), ext
            assert "server_no_context_takeover" in ext and "client_no_context_takeover" in ext
            msgs = [chat(i) for i in range(50)] + ["hi", "", "é" * 1000, "x" * 255, "y" * 256]
            for m in msgs:
                await c.send(m)
                assert await asyncio.wait_for(c.recv(), STEP) == m
            await c.send(os.urandom(5000))  # incompressible binary
            assert len(await asyncio.wait_for(c.recv(), STEP)) == 5000
    asyncio.run(go())
    text = metrics(gw)
    for d in ("client_to_upstream", "upstream_to_client"):
        wire = series(text, "wsgate_compressed_bytes_total", route="echo", direction=d, form="wire")
        payload = series(text, "wsgate_compressed_bytes_total", route="echo", direction=d, form="payload")
        assert 0 < wire < 0.9 * payload, (d, wire, payload)


def test_no_extension_where_compression_is_off_or_not_offered(gw):
    async def go():
        async with ws(gw, "/plain") as c:
            assert "Sec-WebSocket-Extensions" not in c.response.headers
            await c.send(chat(1))
            assert await c.recv() == chat(1)
        async with ws(gw, "/echo", compression=None) as c:
            assert "Sec-WebSocket-Extensions" not in c.response.headers
            await c.send(chat(2))
            assert await c.recv() == chat(2)
    asyncio.run(go())


def test_a_large_message_streams_across_frames(gw):
    """A 900 KiB message in 30 fragments, compressed by the client, echoed whole."""
    body = "".join(chat(i) for i in range(3000))[: 900 * 1024]
    parts = [body[i:i + 30 * 1024] for i in range(0, len(body), 30 * 1024)]

    async def go():
        async with ws(gw, "/echo") as c:
            await c.send(parts)
            assert await asyncio.wait_for(c.recv(), STEP) == body
    asyncio.run(go())


def test_invalid_json_that_came_compressed_is_refused_with_1007(gw):
    async def go():
        async with ws(gw, "/json") as c:
            assert "permessage-deflate" in c.response.headers.get("Sec-WebSocket-Extensions", "")
            await c.send(chat(1))
            assert await c.recv() == chat(1)
            await c.send("{not json" + " " * 400)
            with pytest.raises(ConnectionClosed) as e:
                await asyncio.wait_for(c.recv(), STEP)
            assert e.value.rcvd.code == 1007
    asyncio.run(go())


def test_each_hop_negotiates_on_its_own(gw):
    UPSTREAM_SEEN.clear()

    async def go():
        for compression in (None, "deflate"):
            async with ws(gw, "/up", compression=compression) as c:
                for i in range(5):
                    await c.send(chat(i))
                    assert await asyncio.wait_for(c.recv(), STEP) == chat(i)
    asyncio.run(go())
    assert len(UPSTREAM_SEEN) == 2 and all(s.startswith("permessage-deflate") for s in UPSTREAM_SEEN), UPSTREAM_SEEN
    assert all("server_no_context_takeover" in s for s in UPSTREAM_SEEN)


# A raw client: frames the libraries would never send.

class Raw:
    def __init__(self, g, path="/echo", offer="permessage-deflate; client_max_window_bits"):
        sock = socket.create_connection(("127.0.0.1", g.port), timeout=STEP)
        self.s = ctx(g).wrap_socket(sock, server_hostname="127.0.0.1")
        key = base64.b64encode(os.urandom(16)).decode()
        ext = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
        self.s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.s.recv(4096)
            assert chunk, head
            head += chunk
        self.head, self.buf = head.split(b"\r\n\r\n", 1)
        assert self.head.startswith(b"HTTP/1.1 101"), self.head

    def send(self, opcode, payload, fin=True, rsv1=False):
        b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
        n = len(payload)
        h = bytes([b0, 0x80 | n]) if n < 126 else (
            bytes([b0, 0x80 | 126]) + struct.pack(">H", n) if n < 65536 else bytes([b0, 0x80 | 127]) + struct.pack(">Q", n))
        key = os.urandom(4)
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 100_000 else \
            (int.from_bytes(payload, "big") ^ int.from_bytes((key * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
        self.s.sendall(h + key + masked)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def frame(self):
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        n, at = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, at = struct.unpack(">H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, at = struct.unpack(">Q", self.buf[2:10])[0], 10
        self._need(at + n)
        payload, self.buf = self.buf[at:at + n], self.buf[at + n:]
        return b0, payload

    def close_code(self) -> int:
        """Read frames until a close; its code."""
        while True:
            b0, p = self.frame()
            if b0 & 0x0F == 0x8:
                return struct.unpack(">H", p[:2])[0]


def deflate(data: bytes, c=None) -> bytes:
    c = c or zlib.compressobj(6, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")


def test_raw_compressed_and_plain_messages_and_answers(gw):
    r = Raw(gw)
    assert b"permessage-deflate" in r.head
    msg = chat(7).encode()
    r.send(0x1, deflate(msg), rsv1=True)
    b0, p = r.frame()
    assert b0 & 0x40, "a 300-byte answer goes compressed"
    assert inflate(p) == msg
    r.send(0x1, b"tiny")  # uncompressed in a compressed session: per-message RSV1
    b0, p = r.frame()
    assert (b0 & 0x40, p) == (0, b"tiny"), "under compression_min_size: plain"
    # A compressed message in three fragments, RSV1 on the first only, a ping between.
    z = deflate(msg * 3)
    r.send(0x1, z[:10], fin=False, rsv1=True)
    r.send(0x9, b"p")
    r.send(0x0, z[10:20], fin=False)
    r.send(0x0, z[20:])
    got = b""
    while True:
        b0, p = r.frame()
        if b0 & 0x0F == 0xA:
            continue
        got += p
        if b0 & 0x80:
            break
    assert inflate(got) == msg * 3


@pytest.mark.parametrize("name, frames, code", [
    ("RSV1 on a continuation", [(0x1, b"a", False, False), (0x0, b"b", True, True)], 1002),
    ("RSV1 on a ping", [(0x9, b"p", True, True)], 1002),
    ("RSV1 on a close", [(0x8, b"\x03\xe8", True, True)], 1002),
    ("data that does not inflate", [(0x2, b"\xff\xff\xff\xff", True, True)], 1007),
    ("a final block, then more", [(0x2, zlib.compressobj(6, zlib.DEFLATED, -15).compress(b"x") + b"\x03\x00" + b"\x01", True, True)], 1007),
])
def test_raw_violations(gw, name, frames, code):
    r = Raw(gw)
    for op, payload, fin, rsv1 in frames:
        r.send(op, payload, fin=fin, rsv1=rsv1)
    assert r.close_code() == code, name


def test_rsv1_without_the_extension_is_1002(gw):
    r = Raw(gw, offer=None)
    assert b"permessage-deflate" not in r.head
    r.send(0x1, deflate(b"hello"), rsv1=True)
    assert r.close_code() == 1002


def test_back_references_across_messages_fail_cleanly(gw):
    """The client agreed to client_no_context_takeover and still refers to its last message."""
    r = Raw(gw)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    msg = chat(3).encode()
    r.send(0x1, deflate(msg, c), rsv1=True)
    assert inflate(r.frame()[1]) == msg
    r.send(0x1, deflate(msg, c), rsv1=True)  # all back-references into the first message
    assert r.close_code() == 1007


def rss_hwm_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_bomb_is_closed_with_1009_before_it_is_held(gw):
    """64 KiB on the wire that inflate to 64 MiB: closed at the 1 MiB message limit, the peak
    RSS of the gateway barely moves (the output is inflated 16 KiB at a time)."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    z = bomb.compress(b"\0" * (64 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)
    z = z[:-4]
    assert len(z) < 80 * 1024
    before = rss_hwm_kib(gw.proc.pid)
    for fragmented in (False, True):
        r = Raw(gw)
        if fragmented:  # spread across fragments: the limit counts the whole message
            for i in range(0, len(z), 4096):
                last = i + 4096 >= len(z)
                r.send(0x2 if i == 0 else 0x0, z[i:i + 4096], fin=last, rsv1=i == 0)
        else:
            r.send(0x2, z, rsv1=True)
        assert r.close_code() == 1009
    grown = rss_hwm_kib(gw.proc.pid) - before
    print(f"bomb: peak RSS grew by {grown} KiB")
    assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB"


def test_window_bits_offers(gw):
    r = Raw(gw, offer="permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10")
    head = r.head.decode().lower()
    assert "server_max_window_bits=10" in head, head
    msg = chat(1).encode()
    r.send(0x1, deflate(msg), rsv1=True)
    b0, p = r.frame()
    assert zlib.decompressobj(-10).decompress(p + b"\x00\x00\xff\xff") == msg
    r = Raw(gw, offer="permessage-deflate; server_max_window_bits=8")
    assert b"permessage-deflate" not in r.head, "8 bits cannot be honoured: declined"
    r = Raw(gw, offer="permessage-deflate; bogus=1; x")
    assert b"permessage-deflate" not in r.head, "malformed: answered without the extension"
