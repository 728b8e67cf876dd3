"""Real Socket.IO apps behind wsgate: two nodes on one `balance = "sticky"` route, over TLS, with JWTs.

Two implementations, each as two app nodes (two upstreams of the route in
examples/socketio/gateway.toml, run as shipped with only ports, file paths and the nodes'
addresses rewritten):
  - Node: tests/node/server.js (socket.io 4.8) and tests/node/client.js (socket.io-client 4.8,
    DEFAULT transports: polling first, then the upgrade), 20 clients in one node process;
  - Python: tests/python/socketio_app.py (python-socketio AsyncServer on aiohttp) and
    python-socketio's AsyncClient (default transports), 20 clients in this process.
Each client sends `Authorization: Bearer <its JWT>` on every poll and on the upgrade, keeps
the gateway's sticky cookie, connects, exchanges acked events, and must end on websocket.
No node may ever answer 400 (Engine.IO's "Session ID unknown" is one: a poll or an upgrade
that reached the other node), and both nodes must get clients.

Needs `npm ci` in tests/node (scripts/test.sh does it). Run:
    WSGATE_BIN=target/debug/wsgate .venv/bin/python -m pytest -q tests/python/test_socketio.py
Bounded: every wait has a timeout, node processes a subprocess timeout, each test pytest-timeout;
every process started here is stopped by its PID (its own process group).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import aiohttp
import jwt
import pytest
import socketio

from wsgate_harness import REPO_ROOT, Gateway, default_binary, render_example, stop_group, toml_str

pytestmark = pytest.mark.timeout(180)

NODE_DIR = REPO_ROOT / "tests" / "node"
EXAMPLE = REPO_ROOT / "examples" / "socketio" / "gateway.toml"
PY_APP = Path(__file__).resolve().parent / "socketio_app.py"
CLIENTS = 20
EVENTS = 6
STEP = 30  # seconds allowed for any single step
ISSUER, AUDIENCE = "wsgate-test", "wsgate"

ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
ENV["PYTHONUNBUFFERED"] = "1"


class AppNode:
    """One app node process on a free loopback port; it prints {"listening": PORT} first."""

    def __init__(self, argv: list[str], cwd: Path, log: Path):
        self.log_path = log
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err,
                                     cwd=str(cwd), env=ENV, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        with self._cond:
            self._cond.wait_for(lambda: self._port() is not None or self.proc.poll() is not None, STEP)
            port = self._port()
        if port is None:
            self.stop()
            raise AssertionError(f"{argv}: no listening line within {STEP}s; stdout {self.lines}; "
                                 f"stderr {log.read_text(errors='replace')[-2000:]}")
        self.port = port

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._cond.notify_all()

    def _port(self) -> int | None:
        for line in self.lines:
            if line.startswith("{") and '"listening"' in line:
                return int(json.loads(line)["listening"])
        return None

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self):
        stop_group(self.proc)
        self._err.close()


def render_example_config(tmp: Path, ports: list[int]) -> str:
    """examples/socketio/gateway.toml with ports 0, files in tmp and the two nodes; nothing else changed."""
    nodes = ('"ws://127.0.0.1:3001", "ws://127.0.0.1:3002"', f'"ws://127.0.0.1:{ports[0]}", "ws://127.0.0.1:{ports[1]}"')
    text = render_example(EXAMPLE, tmp, [nodes])
    route = tomllib.loads(text)["routes"][0]
    # The contract the README and these tests rely on, as shipped.
    assert route["http"] is True and route["balance"] == "sticky" and route["auth"] == "jwt"
    assert route["path"] == "/socket.io/*"
    return text


def secret_of(tmp: Path) -> bytes:
    data = (tmp / "jwt.secret").read_bytes()
    return data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data


def mint(secret: bytes, sub: str) -> str:
    now = int(time.time())
    claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}
    return jwt.encode(claims, secret, algorithm="HS256")


def http_requests(admin_port: int) -> dict[str, float]:
    """wsgate_http_requests_total{route="socketio"} by code."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for labels, value in re.findall(r'^wsgate_http_requests_total\{([^}]*)\}\s+(\S+)', text, re.M):
        d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if d.get("route") == "socketio":
            out[d["code"]] = float(value)
    return out


class Stack:
    """Two app nodes and the gateway in front of them. `gateway` is what conftest's failure hook reads."""

    def __init__(self, tmp: Path, node_argv):
        self.tmp = tmp
        self.nodes: list[AppNode] = []
        self.gateway = None
        try:
            for name in ("A", "B"):
                argv, cwd = node_argv(name)
                self.nodes.append(AppNode(argv, cwd, tmp / f"node-{name}.stderr"))
            config = tmp / "gateway.toml"
            config.write_text(render_example_config(tmp, [n.port for n in self.nodes]))
            self.gateway = Gateway(default_binary(), config, tmp / "wsgate.log")
        except BaseException:
            self.stop()
            raise
        self.url = f"https://127.0.0.1:{self.gateway.port}"
        self.cert = tmp / "server.crt"
        self.tokens = [mint(secret_of(tmp), f"user{i}") for i in range(CLIENTS)]

    def stop(self):
        if self.gateway is not None:
            self.gateway.stop()
        for n in self.nodes:
            n.stop()

    def check_nodes(self, bad_key: str, min_polls: int) -> list[dict]:
        """What both nodes saw: every client connected once, on websocket, no 400 anywhere, both used."""
        stats = [n.stats() for n in self.nodes]
        for s in stats:
            assert s[bad_key] == 0, f"node {s['name']} answered {s[bad_key]} unknown-session/400s: {s}"
        assert sum(s["connections"] for s in stats) == CLIENTS, stats
        assert sum(s["upgrades"] for s in stats) == CLIENTS, stats
        assert sorted(sub for s in stats for sub in s["subs"]) == sorted(f"user{i}" for i in range(CLIENTS)), \
            "each connection carries its token's sub as x-wsgate-sub (forward_claims)"
        assert all(s["connections"] > 0 for s in stats), f"sticky balancing put every client on one node: {stats}"
        assert sum(s["events"] for s in stats) == CLIENTS * EVENTS, stats
        codes = http_requests(self.gateway.admin_port)
        assert codes.get("2xx", 0) >= min_polls, f"too few polls went through wsgate as HTTP: {codes}"
        assert set(codes) == {"2xx"}, f"no plain request through wsgate was refused or failed: {codes}"
        return stats


@pytest.fixture
def node_bin() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (20+) not found: the Socket.IO tests need it")
    if not (NODE_DIR / "node_modules" / "socket.io" / "package.json").is_file():
        pytest.fail("tests/node/node_modules missing: run `npm ci` in tests/node (scripts/test.sh does)")
    return node


def test_readme_shows_the_example_route():
    """The README's Socket.IO config is the one these tests run."""
    text = EXAMPLE.read_text()
    route = text[text.index("[[routes]]"):].strip()
    readme = (REPO_ROOT / "README.md").read_text()
    assert route in readme, "README.md must show examples/socketio/gateway.toml's [[routes]] block as it is"


def test_socketio_node_default_transports_through_sticky_route(tmp_path, node_bin):
    stack = Stack(tmp_path, lambda name: ([node_bin, str(NODE_DIR / "server.js"), "--name", name], NODE_DIR))
    try:
        tokens = tmp_path / "tokens.json"
        tokens.write_text(json.dumps(stack.tokens))
        run = subprocess.run(
            [node_bin, str(NODE_DIR / "client.js"), "--url", stack.url, "--ca", str(stack.cert),
             "--tokens", str(tokens), "--events", str(EVENTS)],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=120, cwd=str(NODE_DIR), env=ENV,
        )
        out = run.stdout.decode(errors="replace").strip().splitlines()
        assert out, f"client.js printed nothing (exit {run.returncode}): {run.stderr.decode(errors='replace')[-2000:]}"
        summary = json.loads(out[-1])
        failed = [r for r in summary.get("results", []) if r["error"] or r["final_transport"] != "websocket"]
        assert run.returncode == 0 and summary["ok"], f"clients failed: {failed or summary}"
        results = summary["results"]
        assert len(results) == CLIENTS
        for r in results:
            assert r["first_transport"] == "polling" and r["upgraded"], r  # the default: HTTP long-polling, then the upgrade
            assert r["final_transport"] == "websocket", r
            assert r["acks"] == EVENTS, r
            assert len(set(r["nodes"])) == 1, f"one client's answers came from two nodes: {r}"
        # At least the handshake poll and the CONNECT packet's POST of each client went as HTTP.
        stack.check_nodes("unknown_sid", min_polls=2 * CLIENTS)
        for n in stack.nodes:
            assert n.stats()["connection_errors"] == {}, n.stats()
    finally:
        stack.stop()


async def python_client(i: int, url: str, token: str, ctx: ssl.SSLContext) -> dict:
    # unsafe=True: aiohttp's jar keeps no cookie for an IP address host otherwise (the sticky cookie).
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), cookie_jar=aiohttp.CookieJar(unsafe=True))
    sio = socketio.AsyncClient(reconnection=False, http_session=session)
    welcome: asyncio.Future = asyncio.get_running_loop().create_future()
    sio.on("welcome", lambda data: welcome.done() or welcome.set_result(data))
    result = {"client": i, "nodes": [], "final_transport": None, "acks": 0}
    try:
        await sio.connect(url, headers={"Authorization": f"Bearer {token}"}, wait_timeout=STEP)  # default transports
        result["nodes"].append((await asyncio.wait_for(welcome, STEP))["node"])
        for n in range(1, EVENTS + 1):
            if n == EVENTS // 2 + 1:
                deadline = time.monotonic() + STEP
                while sio.transport() != "websocket" and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            data = {"client": i, "n": n}
            ack = await sio.call("echo", data, timeout=STEP)
            assert ack["data"] == data and ack["n"] == n, ack
            result["nodes"].append(ack["node"])
            result["acks"] += 1
        result["final_transport"] = sio.transport()
    finally:
        await sio.disconnect()
        await session.close()
    return result


def test_python_socketio_default_transports_through_sticky_route(tmp_path):
    stack = Stack(tmp_path, lambda name: ([sys.executable, str(PY_APP), "--name", name], tmp_path))
    try:
        ctx = ssl.create_default_context(cafile=str(stack.cert))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN

        async def all_clients():
            return await asyncio.wait_for(
                asyncio.gather(*(python_client(i, stack.url, t, ctx) for i, t in enumerate(stack.tokens))), 120)

        results = asyncio.run(all_clients())
        for r in results:
            assert r["acks"] == EVENTS and r["final_transport"] == "websocket", r
            assert len(set(r["nodes"])) == 1, f"one client's answers came from two nodes: {r}"
        # python-engineio's client upgrades right after its handshake poll: one HTTP request
        # each at least, then the upgrade, which a 400 would show had it reached the other node.
        stack.check_nodes("bad_requests", min_polls=CLIENTS)
    finally:
        stack.stop()
