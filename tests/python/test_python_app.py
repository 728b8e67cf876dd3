"""The README walkthrough "Put wsgate in front of an existing app", run for real.

examples/python-app: app.py (a plain `websockets` server answering "Server received: <message>"),
client.py (sends an HS256 token {"user_id": N} as its first message, then its messages) and
gateway.toml (first_message token source, identity_claim = "user_id"). Each test starts the app,
the gateway and the clients as separate processes, all on loopback with ephemeral ports: the app
with --port 0 (it prints the port it got), the gateway on a copy of the example's gateway.toml
whose ports, file paths and upstream are rewritten into tmp_path (every other key as shipped).

Run: WSGATE_BIN=target/debug/wsgate .venv/bin/python -m pytest -q tests/python/test_python_app.py
Bounded: every wait has a timeout, client processes a subprocess timeout, each test pytest-timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import jwt
import pytest

from wsgate_harness import REPO_ROOT, Gateway, default_binary, render_example, toml_str

pytestmark = pytest.mark.timeout(120)

EXAMPLE = REPO_ROOT / "examples" / "python-app"
STEP = 30  # seconds allowed for any single step (a client run, a process start, a log line)
APP_LISTEN_RE = re.compile(r"^listening on ws://127\.0\.0\.1:(\d+)$")

# Loopback only: no environment proxy for the clients.
ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
ENV["PYTHONUNBUFFERED"] = "1"


class Lines:
    """Collects a process's output lines in a thread; wait_for() blocks until a condition holds."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def wait_for(self, pred, what: str, timeout: float = STEP) -> list[str]:
        with self._cond:
            self._cond.wait_for(lambda: pred(self.lines) or self.eof, timeout)
            if not pred(self.lines):
                raise AssertionError(f"{what}: not seen within {timeout}s (eof={self.eof}); lines: {self.lines}")
            return list(self.lines)

    def snapshot(self) -> list[str]:
        with self._cond:
            return list(self.lines)


class App:
    """examples/python-app/app.py on a free loopback port; its stdout is the log of what reached it."""

    def __init__(self, tmp: Path):
        self.stderr_path = tmp / "app.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(EXAMPLE / "app.py"), "--host", "127.0.0.1", "--port", "0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                cwd=str(tmp), env=ENV, start_new_session=True,
            )
        self.out = Lines(self.proc.stdout)
        try:
            lines = self.out.wait_for(lambda ls: any(APP_LISTEN_RE.match(l) for l in ls), "app listening line")
        except AssertionError as e:
            self.stop()
            raise AssertionError(f"{e}\napp stderr:\n{self.stderr_path.read_text(errors='replace')}") from None
        self.port = int(next(APP_LISTEN_RE.match(l) for l in lines if APP_LISTEN_RE.match(l)).group(1))

    def log(self) -> list[str]:
        """What the app printed after it started listening: one line per connection and per message."""
        lines = self.out.snapshot()
        return lines[next(i for i, l in enumerate(lines) if APP_LISTEN_RE.match(l)) + 1:]

    def wait_for_message(self, message: str) -> list[str]:
        self.out.wait_for(lambda ls: f"received {message!r}" in ls, f"app receiving {message!r}")
        return self.log()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def render_example_config(tmp: Path, app_port: int, max_connections_per_user: int | None = None) -> str:
    """examples/python-app/gateway.toml with ports 0, files in tmp and the app's port; nothing else changed."""
    extra = [('"ws://127.0.0.1:8765"', toml_str(f"ws://127.0.0.1:{app_port}"))]
    if max_connections_per_user is not None:
        extra.append(("max_connections_per_user = 2", f"max_connections_per_user = {max_connections_per_user}"))
    text = render_example(EXAMPLE / "gateway.toml", tmp, extra)
    cfg = tomllib.loads(text)
    # The contract the walkthrough relies on, as shipped in the example.
    assert cfg["jwt"]["token_sources"] == ["first_message"]
    assert cfg["jwt"]["identity_claim"] == "user_id"
    assert cfg["jwt"]["required_claims"] == ["user_id"]
    assert cfg["routes"][0]["auth"] == "jwt" and cfg["routes"][0]["path"] == "/"
    assert cfg["routes"][0]["upstreams"] == [f"ws://127.0.0.1:{app_port}"]
    assert cfg["server"]["listen"] == ["127.0.0.1:0"] and cfg["admin"]["listen"] == "127.0.0.1:0"
    return text


class Stack:
    """App + gateway for one test. `gateway` is what conftest's failure hook attaches the log of."""

    def __init__(self, tmp: Path):
        self.dir = tmp
        self.app: App | None = None
        self.gateway: Gateway | None = None
        self._procs: list[subprocess.Popen] = []

    def start(self, max_connections_per_user: int | None = None) -> "Stack":
        binary = default_binary()
        if not binary.is_file():
            pytest.fail(f"wsgate binary not found at {binary}: build it (cargo build) or set WSGATE_BIN")
        self.app = App(self.dir)
        config = self.dir / "gateway.toml"
        config.write_text(render_example_config(self.dir, self.app.port, max_connections_per_user))
        self.gateway = Gateway(binary, config, self.dir / "wsgate.log")
        return self

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.gateway.port}/"

    def secret(self) -> bytes:
        return (self.dir / "jwt.secret").read_bytes().rstrip()

    def client_cmd(self, *messages: str, user_id: int = 42, secret_file: Path | None = None, hold: bool = False):
        cmd = [sys.executable, str(EXAMPLE / "client.py"), "--url", self.url, "--ca", str(self.dir / "server.crt"),
               "--secret-file", str(secret_file or self.dir / "jwt.secret"), "--user-id", str(user_id)]
        return cmd + (["--hold"] if hold else []) + list(messages)

    def run_client(self, *messages: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.client_cmd(*messages, **kw), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=STEP, cwd=str(self.dir), env=ENV)

    def hold_client(self, message: str, **kw):
        """A client that stays connected after its reply until its stdin is closed."""
        err = open(self.dir / f"holder-{len(self._procs)}.stderr", "wb")
        proc = subprocess.Popen(self.client_cmd(message, hold=True, **kw), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, cwd=str(self.dir), env=ENV)
        err.close()
        self._procs.append(proc)
        out = Lines(proc.stdout)
        out.wait_for(lambda ls: f"Server received: {message}" in ls, "holder's reply")
        return proc

    def gateway_log(self) -> str:
        return self.gateway.log_path.read_text(errors="replace")

    def wait_gateway_log(self, pattern: str) -> str:
        """Polls the gateway's log file for a regex (the harness writes each line as it comes)."""
        deadline = time.monotonic() + STEP
        while True:
            text = self.gateway_log()
            if re.search(pattern, text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway log has no {pattern!r} within {STEP}s:\n{self.gateway.tail()}")
            time.sleep(0.05)

    def metrics(self) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.gateway.admin_port}/metrics", timeout=STEP) as r:
            return r.read().decode()

    def stop(self):
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        if self.gateway is not None:
            self.gateway.stop()
        if self.app is not None:
            self.app.stop()


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample (labels matched as a subset); 0 when absent."""
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def test_walkthrough_reply_and_the_token_never_reaches_the_app(stack):
    stack.start()
    done = stack.run_client("Hello", "second message")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Server received: Hello", "Server received: second message"]

    # The app saw one connection and exactly the two real messages: the token message stayed in wsgate.
    log = stack.app.wait_for_message("second message")
    assert log == ["connection /", "received 'Hello'", "received 'second message'"]
    token = jwt.encode({"user_id": 42}, stack.secret(), algorithm="HS256")  # what client.py sent (no iat: deterministic)
    assert not any(token in line for line in log)
    gw_log = stack.wait_gateway_log(r'session closed .*route="app" .*sub="42" code=1000')
    assert token not in gw_log, "tokens never appear in the gateway's log"


def test_bad_token_is_closed_1008_before_the_app_sees_anything(stack, tmp_path):
    stack.start()
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-gateway-secret-not-the-gateway-secret\n")
    refused = stack.run_client("must not arrive", secret_file=wrong)
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert refused.stdout == ""
    assert refused.stderr.strip() == "closed: 1008 authentication failed"

    # A good session afterwards: the app's log shows it alone. A connection the gateway had made for the
    # refused client would be logged by the app during its handshake, so before this one.
    ok = stack.run_client("after")
    assert ok.returncode == 0 and ok.stdout == "Server received: after\n", ok.stderr
    assert stack.app.wait_for_message("after") == ["connection /", "received 'after'"]

    stack.wait_gateway_log(r'authentication failed .*route="app" .*reason="bad_signature"')
    m = stack.metrics()
    assert metric(m, "wsgate_auth_failures_total", route="app", reason="bad_signature") == 1
    assert metric(m, "wsgate_upstream_connect_duration_seconds_count", route="app") == 1  # the good one only


def test_per_user_cap_is_keyed_by_user_id(stack):
    stack.start(max_connections_per_user=1)
    holder = stack.hold_client("first", user_id=42)  # user 42's one allowed session, kept open

    second = stack.run_client("refused", user_id=42)
    assert second.returncode == 1, (second.stdout, second.stderr)
    assert second.stdout == ""
    assert second.stderr.strip() == "closed: 1008 too many sessions for this user"

    other = stack.run_client("from 43", user_id=43)
    assert other.returncode == 0, other.stderr
    assert other.stdout == "Server received: from 43\n"

    assert stack.app.wait_for_message("from 43") == [
        "connection /", "received 'first'", "connection /", "received 'from 43'",
    ]

    holder.stdin.close()
    assert holder.wait(STEP) == 0
    log = stack.wait_gateway_log(r'session closed .*sub="42" code=1000')
    assert re.search(r'rejected .*route="app" .*reason="user_conn_limit"', log)
    assert re.search(r'session closed .*sub="43" code=1000', log)
    assert metric(stack.metrics(), "wsgate_connections_rejected_total", reason="user_conn_limit") == 1
    assert "received 'refused'" not in stack.app.log()


def test_check_accepts_the_example_and_warns_that_exp_is_not_required(tmp_path):
    """`wsgate check` as the README shows it, on the example file itself (from an empty folder:
    check creates nothing, and the development files are made on first `run`)."""
    done = subprocess.run([str(default_binary()), "check", "--config", str(EXAMPLE / "gateway.toml")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=STEP, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'warning: jwt.required_claims does not hold "exp": tokens that never expire are accepted' in done.stdout
    assert done.stdout.rstrip().endswith(": ok")
    assert list(tmp_path.iterdir()) == []
