"""pytest fixtures: one wsgate gateway per test session, JWT auth on /echo, loopback only.

Binary: $WSGATE_BIN (default target/debug/wsgate). Run with the venv from scripts/setup-python.sh:
    .venv/bin/python -m pytest tests/python
The gateway's config, self-signed cert (server.crt), generated HS256 secret (jwt.secret) and
log (wsgate.log) live in a pytest temp dir; a failing test prints the tail of the gateway log.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsgate_harness import Gateway, default_binary, render_config  # noqa: E402

ISSUER = "wsgate-test"
AUDIENCE = "wsgate"


@dataclass
class GatewayInfo:
    gateway: Gateway
    config: Path
    dir: Path
    port: int
    token: str  # minted by `wsgate token --sub alice`
    admin_port: int = 0

    @property
    def echo_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/echo"

    @property
    def cert(self) -> Path:
        return self.dir / "server.crt"

    def secret(self) -> bytes:
        """The HS256 secret: the secret file's bytes without a trailing newline."""
        data = (self.dir / "jwt.secret").read_bytes()
        if data.endswith(b"\r\n"):
            return data[:-2]
        if data.endswith(b"\n"):
            return data[:-1]
        return data

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts exactly the gateway's self-signed certificate (hostname/IP checked as usual)."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        # Belt and braces: accept the pinned leaf itself as the trust anchor whatever its CA/keyUsage bits.
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return ctx


@pytest.fixture(scope="session")
def gateway(tmp_path_factory) -> GatewayInfo:
    binary = default_binary()
    if not binary.is_file():
        pytest.fail(f"wsgate binary not found at {binary}: build it (cargo build) or set WSGATE_BIN")
    tmp = tmp_path_factory.mktemp("wsgate")
    config = tmp / "gateway.toml"
    jwt_extra = f'issuer = "{ISSUER}"\naudience = ["{AUDIENCE}"]\n'
    config.write_text(render_config(tmp, auth="jwt", jwt_extra=jwt_extra))
    gw = Gateway(binary, config, tmp / "wsgate.log")
    try:
        minted = subprocess.run(
            [str(binary), "token", "--sub", "alice", "--config", str(config)],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=30, cwd=str(tmp),
        )
        if minted.returncode != 0:
            pytest.fail(f"`wsgate token` exited {minted.returncode}: {minted.stderr.decode(errors='replace')}")
        token = minted.stdout.decode().strip()
        assert token.count(".") == 2, f"`wsgate token` printed no JWT on stdout: {minted.stdout!r}"
        yield GatewayInfo(gateway=gw, config=config, dir=tmp, port=gw.port, token=token, admin_port=gw.admin_port)
    finally:
        code = gw.stop()
        print(f"\nwsgate exited with {code}; log: {tmp / 'wsgate.log'}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failing test, attach the tail of the gateway's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    # Any fixture that carries a started gateway (GatewayInfo here, the per-module envs
    # of test_pyjwt_families and test_browser) gets its log attached.
    for value in getattr(item, "funcargs", {}).values():
        gw = getattr(value, "gateway", None)
        if gw is not None and hasattr(gw, "tail"):
            report.sections.append(("wsgate log (tail)", gw.tail()))
            return
