"""Client certificates (mTLS) with Python's `ssl` module as the client and tokens bound to a
certificate (RFC 8705 `cnf.x5t#S256`) minted by PyJWT.

One gateway for this module. Its client CA and the client certificates of alice and bob are made
by `wsgate dev-client-cert` (the README's two commands), keys mode 0600. `client_auth = "optional"`
and three routes: /echo (`jwt+mtls`, forwards nothing), /m (`mtls`), /j (`jwt`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from wsgate_harness import Gateway, default_binary, render_config, toml_str
from wsgate_harness import counters as harness_counters

pytestmark = pytest.mark.timeout(60)

STEP = 10  # seconds allowed for any single network step

EXTRA_ROUTES = """
[[routes]]
name = "m"
path = "/m"
upstreams = ["builtin:echo"]
auth = "mtls"

[[routes]]
name = "j"
path = "/j"
upstreams = ["builtin:echo"]
auth = "jwt"
"""


@dataclass
class Env:
    gateway: Gateway
    dir: Path
    pki: Path
    secret: bytes

    def url(self, path: str) -> str:
        return f"wss://127.0.0.1:{self.gateway.port}{path}"

    def ssl_context(self, who: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.dir / "server.crt"))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if who is not None:
            ctx.load_cert_chain(str(self.pki / f"{who}.crt"), str(self.pki / f"{who}.key"))
        return ctx

    def x5t(self, who: str) -> str:
        """base64url SHA-256 of the DER certificate: the `x5t#S256` a bound token carries."""
        der = ssl.PEM_cert_to_DER_cert((self.pki / f"{who}.crt").read_text())
        return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()

    def token(self, sub: str, cnf: dict | None = None) -> str:
        now = int(time.time())
        claims = {"sub": sub, "iat": now, "exp": now + 300}
        if cnf is not None:
            claims["cnf"] = cnf
        return jwt.encode(claims, self.secret, algorithm="HS256")


def read_secret(path: Path) -> bytes:
    data = path.read_bytes()
    for end in (b"\r\n", b"\n"):
        if data.endswith(end):
            return data[: -len(end)]
    return data


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    binary = default_binary()
    if not binary.is_file():
        pytest.fail(f"wsgate binary not found at {binary}: build it (cargo build) or set WSGATE_BIN")
    tmp = tmp_path_factory.mktemp("wsgate-mtls")
    pki = tmp / "pki"
    for name in ("alice", "bob"):
        made = subprocess.run([str(binary), "dev-client-cert", "--name", name, "--dir", str(pki)],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30, cwd=str(tmp))
        assert made.returncode == 0, made.stderr.decode(errors="replace")
    for key in ("client-ca.key", "alice.key", "bob.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600, key
    config = tmp / "gateway.toml"
    text = render_config(tmp, auth="jwt+mtls", route_extra=EXTRA_ROUTES, limits_extra="auth_failures_per_ip = 0\n")
    text = text.replace(
        "self_signed_if_missing = true\n",
        f'self_signed_if_missing = true\nclient_ca = {toml_str(pki / "client-ca.crt")}\nclient_auth = "optional"\n',
    )
    config.write_text(text)
    gw = Gateway(binary, config, tmp / "wsgate.log")
    try:
        assert gw.port and gw.admin_port, gw.tail()
        yield Env(gateway=gw, dir=tmp, pki=pki, secret=read_secret(tmp / "jwt.secret"))
    finally:
        code = gw.stop()
        print(f"\nwsgate exited with {code}; log: {tmp / 'wsgate.log'}")


def ws_connect(env: Env, path: str, who: str | None, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(env.url(path), ssl=env.ssl_context(who), additional_headers=headers,
                   open_timeout=STEP, close_timeout=STEP, proxy=None, compression=None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 3 * STEP))


async def echo(env: Env, path: str, who: str | None, token: str | None = None) -> str:
    async with ws_connect(env, path, who, token) as ws:
        async with asyncio.timeout(STEP):
            await ws.send("hello")
            return await ws.recv()


async def refused(env: Env, path: str, who: str | None, token: str | None = None) -> int:
    try:
        async with ws_connect(env, path, who, token):
            pass
    except InvalidStatus as e:
        return e.response.status_code
    raise AssertionError("the gateway accepted the connection")


def counters(env: Env) -> dict:
    """{(metric, route, reason): value} from the admin /metrics endpoint."""
    names = ("wsgate_auth_failures_total", "wsgate_connections_rejected_total")
    return harness_counters(env.gateway.admin_port, names, timeout=STEP)


def changes(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def test_bound_token_with_its_certificate_is_served(env):
    token = env.token("alice", {"x5t#S256": env.x5t("alice")})
    assert run(echo(env, "/echo", "alice", token)) == "hello"


def test_bound_token_with_another_certificate_is_cert_binding(env):
    token = env.token("alice", {"x5t#S256": env.x5t("alice")})
    before = counters(env)
    assert run(refused(env, "/echo", "bob", token)) == 401
    diff = changes(before, counters(env))
    assert diff == {("wsgate_auth_failures_total", "echo", "cert_binding"): 1,
                    ("wsgate_connections_rejected_total", None, "auth"): 1}, diff


def test_stolen_bound_token_without_a_certificate_is_refused_on_a_jwt_route(env):
    token = env.token("alice", {"x5t#S256": env.x5t("alice")})
    assert run(refused(env, "/j", None, token)) == 401
    # An unbound token still works there, with or without a certificate.
    assert run(echo(env, "/j", None, env.token("carol"))) == "hello"
    assert run(echo(env, "/j", "bob", env.token("carol"))) == "hello"


def test_mtls_route_needs_a_certificate(env):
    before = counters(env)
    assert run(refused(env, "/m", None)) == 403
    assert changes(before, counters(env)) == {("wsgate_connections_rejected_total", None, "client_cert"): 1}
    assert run(echo(env, "/m", "alice")) == "hello"


def test_jwt_mtls_route_needs_both(env):
    assert run(refused(env, "/echo", None, env.token("alice"))) == 403
    assert run(refused(env, "/echo", "alice", None)) == 401
    assert run(echo(env, "/echo", "alice", env.token("alice"))) == "hello"


def test_certificate_from_another_ca_fails_the_handshake(env, tmp_path):
    binary = default_binary()
    made = subprocess.run([str(binary), "dev-client-cert", "--name", "mallory", "--dir", str(tmp_path)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert made.returncode == 0, made.stderr.decode(errors="replace")
    ctx = ssl.create_default_context(cafile=str(env.dir / "server.crt"))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_cert_chain(str(tmp_path / "mallory.crt"), str(tmp_path / "mallory.key"))

    async def attempt():
        async with connect(env.url("/m"), ssl=ctx, open_timeout=STEP, proxy=None, compression=None):
            pass

    # In TLS 1.3 the client's handshake is done before the server has read its
    # certificate: the server's alert then ends the stream before any HTTP answer,
    # which websockets reports as InvalidMessage caused by the end of the stream.
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError, OSError, InvalidMessage)) as e:
        run(attempt())
    assert not isinstance(e.value, (InvalidStatus, TimeoutError)), e.value
    if isinstance(e.value, InvalidMessage):
        assert isinstance(e.value.__cause__, (EOFError, ssl.SSLError, ConnectionError)), repr(e.value.__cause__)
