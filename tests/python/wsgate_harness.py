"""Start and stop a wsgate gateway for tests (shared by conftest.py and tests/conformance/run_autobahn.py).

Writes a config TOML into a temp dir (self-signed cert, generated JWT secret, ephemeral ports),
runs `wsgate run --config FILE`, drains its stdout/stderr into a log file and waits for the
`wss://127.0.0.1:PORT` line to learn the port. Python 3.8+, standard library only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PORT_RE = re.compile(r"wss://127\.0\.0\.1:(\d+)")
ADMIN_RE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


_SERIES_RE = re.compile(r'^(wsgate_\w+)\{([^}]*)\}\s+(\S+)', re.M)
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def counters(admin_port: int, names: tuple[str, ...], timeout: float = 10.0) -> dict:
    """{(metric, route, reason): value} of the labelled series of `names` on /metrics."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out = {}
    for name, labels, value in _SERIES_RE.findall(text):
        if name in names:
            d = dict(_LABEL_RE.findall(labels))
            out[(name, d.get("route"), d.get("reason"))] = float(value)
    return out


def default_binary() -> Path:
    """$WSGATE_BIN, else target/debug/wsgate (relative paths are taken from the repo root)."""
    p = Path(os.environ.get("WSGATE_BIN", "target/debug/wsgate"))
    return p if p.is_absolute() else REPO_ROOT / p


def toml_str(value) -> str:
    """A TOML basic string (escaping is the same as JSON's for what we put in)."""
    s = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def render_config(tmp: Path, *, auth: str = "none", jwt_extra: str = "", limits_extra: str = "",
                  server_extra: str = "", upstreams=("builtin:echo",), route_extra: str = "") -> str:
    """The config of one route "echo" on /echo; `upstreams` and `route_extra` (TOML lines) shape that route."""
    upstream_list = ", ".join(toml_str(u) for u in upstreams)
    return f"""\
[server]
listen = ["127.0.0.1:0"]
{server_extra}
[tls]
cert = {toml_str(tmp / "server.crt")}
key = {toml_str(tmp / "server.key")}
self_signed_if_missing = true

[admin]
listen = "127.0.0.1:0"

[jwt]
secret_file = {toml_str(tmp / "jwt.secret")}
generate_secret_if_missing = true
{jwt_extra}
[limits]
max_message_size = "16MiB"
max_frame_size = "16MiB"
{limits_extra}
[[routes]]
name = "echo"
path = "/echo"
upstreams = [{upstream_list}]
auth = {toml_str(auth)}
{route_extra}"""



def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session=True), then
    SIGKILL after `grace` seconds. Safe to call on a process that has already exited."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def render_example(path: Path, tmp: Path, extra: list[tuple[str, str]]) -> str:
    """An example gateway.toml as shipped, with its listeners on port 0, its certificate and
    secret files in `tmp`, and the `extra` replacements; each string to replace must occur
    exactly once (else the example changed under the test)."""
    text = path.read_text()
    replacements = [
        ('listen = ["127.0.0.1:8443"]', 'listen = ["127.0.0.1:0"]'),
        ('listen = "127.0.0.1:9090"', 'listen = "127.0.0.1:0"'),
        ('"certs/dev/server.crt"', toml_str(tmp / "server.crt")),
        ('"certs/dev/server.key"', toml_str(tmp / "server.key")),
        ('"certs/dev/jwt.secret"', toml_str(tmp / "jwt.secret")),
        *extra,
    ]
    for old, new in replacements:
        assert text.count(old) == 1, f"{path.relative_to(REPO_ROOT)} changed: expected {old!r} exactly once"
        text = text.replace(old, new)
    return text

class Gateway:
    """A running `wsgate run` process. Use as a context manager or call stop()."""

    def __init__(self, binary: Path, config: Path, log_path: Path, start_timeout: float = 30.0):
        self.binary = Path(binary)
        self.config = Path(config)
        self.log_path = Path(log_path)
        self.port: int | None = None
        self.admin_port: int | None = None
        self._port_found = threading.Event()
        self._lock = threading.Lock()
        self._tail: list[str] = []
        if not self.binary.is_file():
            raise FileNotFoundError(f"wsgate binary not found: {self.binary} (build it, or set WSGATE_BIN / --wsgate)")
        env = dict(os.environ, NO_COLOR="1")
        env.setdefault("RUST_LOG", "info")
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(
            [str(self.binary), "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=str(self.config.parent), env=env, start_new_session=True,
        )
        # Both streams are drained for the whole life of the process, so the pipes never fill up.
        self._readers = [
            threading.Thread(target=self._drain, args=(s, n), daemon=True)
            for s, n in ((self.proc.stderr, "stderr"), (self.proc.stdout, "stdout"))
        ]
        for t in self._readers:
            t.start()
        deadline = time.monotonic() + start_timeout
        while not self._port_found.wait(0.05):
            if self.proc.poll() is not None:
                self._join_readers()
                self.stop()
                raise RuntimeError(f"wsgate exited with {self.proc.returncode} before listening:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"wsgate printed no wss:// and metrics lines within {start_timeout}s:\n{self.tail()}")

    def _drain(self, stream, name):
        for raw in iter(stream.readline, b""):
            line = ANSI_RE.sub("", raw.decode("utf-8", "replace")).rstrip("\n")
            with self._lock:
                self._log.write(f"[{name}] {line}\n")
                self._log.flush()
                self._tail = (self._tail + [line])[-40:]
            if self.admin_port is None:
                m = ADMIN_RE.search(line)
                if m:
                    self.admin_port = int(m.group(1))
                    self._port_found.set()
            if self.port is None:
                m = PORT_RE.search(line)
                if m:
                    self.port = int(m.group(1))

    def _join_readers(self, timeout: float = 2.0):
        for t in self._readers:
            t.join(timeout)

    def tail(self) -> str:
        with self._lock:
            return "\n".join(self._tail)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit code. Safe to call twice."""
        stop_group(self.proc, grace)
        self._join_readers()
        with self._lock:
            if not self._log.closed:
                self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
