"""End-to-end tests of wsgate with the Python `websockets` client (wss + JWT on route /echo).

Run: .venv/bin/python -m pytest tests/python      (WSGATE_BIN=target/release/wsgate to pick a binary)
The `gateway` fixture (conftest.py) starts one gateway for the session: self-signed cert, HS256
secret generated into a file, issuer "wsgate-test", audience ["wsgate"], /echo -> builtin:echo.
Every step is bounded: open/close timeouts on the client, asyncio.timeout around each exchange,
and pytest-timeout around each test.
"""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import AUDIENCE, ISSUER

pytestmark = pytest.mark.timeout(60)

STEP = 10  # seconds allowed for any single network step


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 3 * STEP))


def ws_connect(gateway, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    return connect(
        gateway.echo_url,
        ssl=gateway.ssl_context(),
        additional_headers=headers,
        open_timeout=STEP,
        close_timeout=STEP,
        proxy=None,  # never go through an environment proxy: loopback only
        compression=None,
        max_size=16 * 1024 * 1024,
    )


def pyjwt_token(gateway, **overrides) -> str:
    now = int(time.time())
    claims = {"sub": "bob", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now - 5, "exp": now + 300}
    claims.update(overrides)
    return jwt.encode(claims, gateway.secret(), algorithm="HS256")


async def echo_roundtrip(gateway, token: str):
    async with ws_connect(gateway, token) as ws:
        text = "hello, wsgate \u2713 \U0001f600"
        binary = bytes(range(256)) * 4
        async with asyncio.timeout(STEP):
            await ws.send(text)
            got_text = await ws.recv()
            await ws.send(binary)
            got_binary = await ws.recv()
        assert isinstance(got_text, str) and got_text == text
        assert isinstance(got_binary, bytes) and got_binary == binary
        await ws.close(1000, "bye")
        await asyncio.wait_for(ws.wait_closed(), STEP)
        # The close handshake completed and the peer answered with our code.
        assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == 1000
        assert ws.protocol.close_rcvd is not None, "no close frame came back"
        assert ws.protocol.close_rcvd.code == 1000
        assert ws.close_code == 1000


async def expect_refused(gateway, token: str | None) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(gateway, token):
            pass
    return info.value


def assert_401(exc: InvalidStatus):
    assert exc.response.status_code == 401, f"expected 401, got {exc.response.status_code}"
    challenge = exc.response.headers.get("WWW-Authenticate", "")
    assert challenge.startswith("Bearer"), f"WWW-Authenticate: {challenge!r}"


def test_cli_token_echo_text_binary_and_close(gateway):
    run(echo_roundtrip(gateway, gateway.token))


def test_no_token_is_401(gateway):
    assert_401(run(expect_refused(gateway, None)))


def test_pyjwt_token_with_shared_secret_is_accepted(gateway):
    run(echo_roundtrip(gateway, pyjwt_token(gateway)))


def test_wrong_issuer_is_401(gateway):
    assert_401(run(expect_refused(gateway, pyjwt_token(gateway, iss="someone-else"))))


@pytest.mark.parametrize("claim", ["iss", "aud"])
def test_token_without_configured_issuer_or_audience_is_401(gateway, claim):
    # The gateway has an issuer and an audience configured: a token minted by the same
    # secret for another service, without the claim at all, must not pass.
    now = int(time.time())
    claims = {"sub": "bob", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    del claims[claim]
    token = jwt.encode(claims, gateway.secret(), algorithm="HS256")
    assert_401(run(expect_refused(gateway, token)))


def test_expired_token_is_401(gateway):
    now = int(time.time())
    # Well past the default 30 s leeway.
    token = pyjwt_token(gateway, iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    assert_401(run(expect_refused(gateway, token)))
