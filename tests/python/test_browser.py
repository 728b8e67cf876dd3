"""A real browser (headless Chromium) opens a WebSocket through wsgate.

Pieces, all on 127.0.0.1 with ephemeral ports:
  * a plain-ws "chat" upstream (Python `websockets` server) that selects the subprotocol "chat",
    echoes, and records the handshake it received;
  * a gateway: route /echo -> that upstream, auth = "jwt" (token sources include "protocol"),
    allowed_origins = the page server's origin only;
  * a page server (http.server) serving /case/NAME: a tiny page whose script runs
    `new WebSocket("wss://127.0.0.1:GW/echo", ["bearer." + TOKEN, "chat"])`, sends "hello" and
    reports what happened (open + ws.protocol, the echo, error, close code) to /result;
  * /usr/bin/chromium --headless with the page URL (scripts/setup-system.sh installs it). The
    gateway's self-signed certificate is trusted by pinning its SPKI hash
    (--ignore-certificate-errors-spki-list), not by ignoring all certificate errors.
The browser is killed (its whole process group) as soon as the page has reported, or after
BROWSER_WAIT seconds; servers and the gateway are stopped at the end of the module.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.server import serve

from wsgate_harness import Gateway, default_binary, render_config, stop_group, toml_str

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_WAIT = 30.0  # seconds for the page to report
STEP = 10.0

pytestmark = pytest.mark.timeout(90)


# --- the "chat" upstream ----------------------------------------------------------------------------


class ChatUpstream:
    """Plain-ws echo server on 127.0.0.1:0 that accepts only the subprotocol "chat"."""

    def __init__(self):
        self.handshakes: list[dict] = []  # request headers of each accepted handshake
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self.port = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(STEP):
            raise RuntimeError("chat upstream did not start")

    async def _handler(self, ws):
        self.handshakes.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        async for msg in ws:
            await ws.send(msg)

    async def _main(self):
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        async with serve(self._handler, "127.0.0.1", 0, subprotocols=["chat"], compression=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    def close(self):
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        self._thread.join(STEP)


# --- the page server --------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>pending</title></head><body>
<script>
const CASE = %(case)s;
const report = {case: CASE.name, events: []};
let sent = false;
function done() {
  if (sent) return;
  sent = true;
  document.title = "done";
  fetch("/result?" + new URLSearchParams({case: CASE.name, report: JSON.stringify(report)}));
}
function ev(type, extra) { report.events.push(Object.assign({type: type}, extra || {})); }
setTimeout(() => { ev("page_timeout"); done(); }, CASE.timeout_ms);
try {
  const ws = new WebSocket(CASE.url, CASE.protocols);
  ws.onopen = () => { ev("open", {protocol: ws.protocol, extensions: ws.extensions}); ws.send(CASE.message || "hello"); };
  ws.onmessage = (m) => { ev("message", {data: String(m.data)}); ws.close(1000, "done"); };
  ws.onerror = () => ev("error");
  ws.onclose = (c) => { ev("close", {code: c.code, reason: c.reason, wasClean: c.wasClean}); done(); };
} catch (e) {
  ev("exception", {message: String(e)});
  done();
}
</script></body></html>
"""


class PageServer:
    """Serves /case/NAME pages and collects their /result reports."""

    def __init__(self):
        self.cases: dict[str, dict] = {}
        self.results: dict[str, dict] = {}
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path.startswith("/case/"):
                    case = outer.cases.get(url.path[len("/case/"):])
                    if case is None:
                        return self._send(404, b"no such case")
                    # JSON inside <script>: escape "<" so no "</script>" can end it early.
                    data = json.dumps(case).replace("<", "\\u003c")
                    return self._send(200, (PAGE % {"case": data}).encode(), "text/html; charset=utf-8")
                if url.path == "/result":
                    q = urllib.parse.parse_qs(url.query)
                    name, report = q.get("case", [""])[0], q.get("report", ["{}"])[0]
                    with outer.cond:
                        outer.results[name] = json.loads(report)
                        outer.cond.notify_all()
                    return self._send(204, b"")
                return self._send(404, b"not found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def wait_result(self, name: str, timeout: float) -> dict | None:
        with self.cond:
            self.cond.wait_for(lambda: name in self.results, timeout)
            return self.results.get(name)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(STEP)


# --- the browser ------------------------------------------------------------------------------------


def spki_hash(cert_pem: bytes) -> str:
    """base64(sha256(SubjectPublicKeyInfo)), the form --ignore-certificate-errors-spki-list takes."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def run_page(page_url: str, pages: PageServer, name: str, profile: Path, spki: str, log: Path) -> dict:
    """Open page_url in headless Chromium, wait for its report, always kill the browser."""
    profile.mkdir(parents=True, exist_ok=True)
    args = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-extensions", "--no-proxy-server", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", f"--ignore-certificate-errors-spki-list={spki}",
        page_url,
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + BROWSER_WAIT
        result = None
        while time.monotonic() < deadline:
            result = pages.wait_result(name, 0.25)
            if result is not None or proc.poll() is not None:
                break
        if result is None:
            result = pages.wait_result(name, 1.0)  # a report racing an exit
        if result is None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"the page reported nothing within {BROWSER_WAIT}s "
                        f"(chromium {'exited ' + str(proc.returncode) if proc.poll() is not None else 'still running'})"
                        f"; chromium log:\n{tail}")
        return result
    finally:
        if proc.poll() is None:
            stop_group(proc, STEP)
        else:
            try:  # helpers left behind by a browser that exited on its own
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- fixtures ---------------------------------------------------------------------------------------


@dataclass
class Env:
    gateway: Gateway
    dir: Path
    upstream: ChatUpstream
    pages: PageServer  # the allowed origin
    foreign: PageServer  # another origin, not in allowed_origins
    spki: str
    secret: bytes

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.gateway.port}/echo"

    def token(self, **overrides) -> str:
        now = int(time.time())
        claims = {"sub": "browser", "iat": now, "exp": now + 300}
        claims.update(overrides)
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def open(self, name: str, protocols: list[str], server: PageServer | None = None, message: str | None = None) -> dict:
        server = server or self.pages
        server.cases[name] = {"name": name, "url": self.ws_url, "protocols": protocols, "timeout_ms": 20000}
        if message is not None:
            server.cases[name]["message"] = message
        return run_page(f"{server.origin}/case/{name}", server, name, self.dir / f"chromium-{name}",
                        self.spki, self.dir / "chromium.log")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gateway.admin_port}/metrics", timeout=STEP) as r:
            return r.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for m in re.finditer(rf'^{re.escape(name)}(?:\{{([^}}]*)\}})?\s+(\S+)', text, re.M):
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.fail("/usr/bin/chromium missing: run scripts/setup-system.sh")
    binary = default_binary()
    if not binary.is_file():
        pytest.fail(f"wsgate binary not found at {binary}: build it (cargo build) or set WSGATE_BIN")
    tmp = tmp_path_factory.mktemp("wsgate-browser")
    stack = []
    try:
        upstream = ChatUpstream()
        stack.append(upstream.close)
        pages = PageServer()
        stack.append(pages.close)
        foreign = PageServer()
        stack.append(foreign.close)
        config = tmp / "gateway.toml"
        config.write_text(render_config(
            tmp, auth="jwt", upstreams=[f"ws://127.0.0.1:{upstream.port}"],
            route_extra=f"allowed_origins = [{toml_str(pages.origin)}]\n",
        ))
        gw = Gateway(binary, config, tmp / "wsgate.log")
        stack.append(gw.stop)
        assert gw.port and gw.admin_port, gw.tail()
        secret = (tmp / "jwt.secret").read_bytes().rstrip(b"\r\n")
        yield Env(gateway=gw, dir=tmp, upstream=upstream, pages=pages, foreign=foreign,
                  spki=spki_hash((tmp / "server.crt").read_bytes()), secret=secret)
    finally:
        for close in reversed(stack):
            close()



def events(result: dict, kind: str) -> list[dict]:
    return [e for e in result.get("events", []) if e["type"] == kind]


# --- tests ------------------------------------------------------------------------------------------


def test_browser_token_in_subprotocol_gets_chat_and_echo(env):
    before = len(env.upstream.handshakes)
    result = env.open("ok", ["bearer." + env.token(), "chat"])
    opened = events(result, "open")
    assert opened, f"the browser never opened the WebSocket: {result}"
    assert opened[0]["protocol"] == "chat", result
    assert [e["data"] for e in events(result, "message")] == ["hello"], result
    closed = events(result, "close")
    assert closed and closed[0]["code"] == 1000 and closed[0]["wasClean"], result
    assert not events(result, "error"), result
    # The upstream saw the browser's Origin and the application protocol, never the token.
    assert len(env.upstream.handshakes) == before + 1
    seen = env.upstream.handshakes[-1]
    assert "bearer." not in seen.get("sec-websocket-protocol", ""), seen
    assert "chat" in seen.get("sec-websocket-protocol", ""), seen


def test_browser_bad_token_never_opens(env):
    before = env.metrics()
    bad = env.token()
    bad = jwt.encode(jwt.decode(bad, env.secret, algorithms=["HS256"]), b"not the gateway secret, 32+ bytes long", algorithm="HS256")
    result = env.open("bad_token", ["bearer." + bad, "chat"])
    assert not events(result, "open"), result
    assert events(result, "error"), result
    closed = events(result, "close")
    assert closed and closed[0]["code"] == 1006 and not closed[0]["wasClean"], result
    after = env.metrics()
    name = "wsgate_auth_failures_total"
    assert metric(after, name, route="echo", reason="bad_signature") == \
        metric(before, name, route="echo", reason="bad_signature") + 1, after
    assert metric(after, "wsgate_connections_rejected_total", reason="auth") == \
        metric(before, "wsgate_connections_rejected_total", reason="auth") + 1


def test_browser_foreign_origin_is_refused(env):
    before = env.metrics()
    upstream_before = len(env.upstream.handshakes)
    result = env.open("foreign", ["bearer." + env.token(), "chat"], server=env.foreign)
    assert not events(result, "open"), result
    closed = events(result, "close")
    assert closed and closed[0]["code"] == 1006, result
    after = env.metrics()
    name = "wsgate_connections_rejected_total"
    assert metric(after, name, reason="origin") == metric(before, name, reason="origin") + 1
    # Refused before auth and before any upstream connection.
    assert metric(after, "wsgate_auth_failures_total") == metric(before, "wsgate_auth_failures_total")
    assert len(env.upstream.handshakes) == upstream_before


def test_browser_negotiates_permessage_deflate(env):
    """Chromium offers permessage-deflate; the gateway answers it on the client hop (the
    upstream hop stays plain) and a JSON message of a few KB goes both ways compressed."""
    before = env.metrics()
    message = json.dumps([{"type": "message", "room": "general", "user": f"user-{i}",
                           "text": "The quick brown fox jumps over the lazy dog."} for i in range(40)])
    result = env.open("deflate", ["bearer." + env.token(), "chat"], message=message)
    opened = events(result, "open")
    assert opened, result
    assert opened[0]["extensions"].startswith("permessage-deflate"), result
    assert "client_no_context_takeover" in opened[0]["extensions"], result
    assert [e["data"] for e in events(result, "message")] == [message], "the echo, whole"
    closed = events(result, "close")
    assert closed and closed[0]["code"] == 1000 and closed[0]["wasClean"], result
    assert "sec-websocket-extensions" not in env.upstream.handshakes[-1], "each hop on its own"
    after = env.metrics()
    name = "wsgate_compressed_bytes_total"
    for d in ("client_to_upstream", "upstream_to_client"):
        wire = metric(after, name, route="echo", direction=d, form="wire") - metric(before, name, route="echo", direction=d, form="wire")
        payload = metric(after, name, route="echo", direction=d, form="payload") - metric(before, name, route="echo", direction=d, form="payload")
        assert payload == len(message) and 0 < wire < payload / 3, (d, wire, payload)
