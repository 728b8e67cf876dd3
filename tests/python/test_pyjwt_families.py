"""Tokens minted by PyJWT (an independent JOSE implementation) for every algorithm family wsgate verifies.

One gateway for this module: all 12 algorithms allowed, the HS* secret generated into a file, and
PEM public keys (SPKI) for RSA 2048 (RS* and PS*), P-256 (ES256), P-384 (ES384) and Ed25519 (EdDSA)
written by `cryptography`; /echo -> builtin:echo with auth = "jwt". Each algorithm must echo
through wss with `Authorization: Bearer`. Then the classic attacks, crafted with PyJWT (or by hand
where PyJWT refuses to produce them), must each get 401 and bump
`wsgate_auth_failures_total{route="echo",reason=...}` on the admin /metrics endpoint by exactly one.
The per-IP auth-failure ban is disabled (`auth_failures_per_ip = 0`) so the attacks cannot trip it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from wsgate_harness import counters, Gateway, default_binary, render_config, toml_str

pytestmark = pytest.mark.timeout(60)

STEP = 10  # seconds allowed for any single network step
ISSUER = "pyjwt-families"
AUDIENCE = "wsgate"
ALGORITHMS = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
              "ES256", "ES384", "EdDSA"]


@dataclass
class Env:
    gateway: Gateway
    dir: Path
    private: dict  # family -> private key object ("hmac" -> bytes)
    rsa_public_pem: bytes

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.gateway.port}/echo"

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.dir / "server.crt"))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return ctx

    def key_for(self, alg: str):
        if alg.startswith("HS"):
            return self.private["hmac"]
        if alg.startswith(("RS", "PS")):
            return self.private["rsa"]
        return self.private[alg]


def pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


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
    tmp = tmp_path_factory.mktemp("wsgate-pyjwt")
    private = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }
    key_files = []
    for name, key in private.items():
        path = tmp / f"{name.lower()}.pub.pem"
        path.write_bytes(pem_public(key))
        key_files.append(path)
    jwt_extra = (
        f"algorithms = [{', '.join(toml_str(a) for a in ALGORITHMS)}]\n"
        f"public_key_files = [{', '.join(toml_str(p) for p in key_files)}]\n"
        f'issuer = "{ISSUER}"\naudience = ["{AUDIENCE}"]\n'
    )
    config = tmp / "gateway.toml"
    config.write_text(render_config(tmp, auth="jwt", jwt_extra=jwt_extra, limits_extra="auth_failures_per_ip = 0\n"))
    gw = Gateway(binary, config, tmp / "wsgate.log")
    try:
        assert gw.port and gw.admin_port, gw.tail()
        private["hmac"] = read_secret(tmp / "jwt.secret")
        assert private["hmac"], "the gateway generated an empty secret"
        yield Env(gateway=gw, dir=tmp, private=private, rsa_public_pem=pem_public(private["rsa"]))
    finally:
        code = gw.stop()
        print(f"\nwsgate exited with {code}; log: {tmp / 'wsgate.log'}")



def claims(**overrides) -> dict:
    now = int(time.time())
    c = {"sub": "carol", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now - 5, "exp": now + 300}
    c.update(overrides)
    return {k: v for k, v in c.items() if v is not None}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def ws_connect(env: Env, token: str):
    return connect(env.url, ssl=env.ssl_context(), additional_headers={"Authorization": f"Bearer {token}"},
                   open_timeout=STEP, close_timeout=STEP, proxy=None, compression=None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 3 * STEP))


async def echo(env: Env, token: str, text: str) -> str:
    async with ws_connect(env, token) as ws:
        async with asyncio.timeout(STEP):
            await ws.send(text)
            return await ws.recv()


async def refused(env: Env, token: str) -> int:
    try:
        async with ws_connect(env, token):
            pass
    except InvalidStatus as e:
        return e.response.status_code
    raise AssertionError("the gateway accepted the token")


def auth_failures(env: Env) -> dict:
    """{(route, reason): value} from the admin /metrics endpoint."""
    found = counters(env.gateway.admin_port, ("wsgate_auth_failures_total",), timeout=STEP)
    return {(route, reason): v for (_, route, reason), v in found.items()}


def assert_rejected(env: Env, token: str, reason: str):
    before = auth_failures(env)
    status = run(refused(env, token))
    assert status == 401, f"expected 401 ({reason}), got {status}"
    after = auth_failures(env)
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    assert diff == {("echo", reason): 1}, f"expected one auth failure with reason {reason!r}; counter changes: {diff}"


# --- every algorithm family -------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_pyjwt_token_is_accepted(env, alg):
    token = jwt.encode(claims(), env.key_for(alg), algorithm=alg)
    assert json.loads(b64url_decode(token.split(".")[0]))["alg"] == alg
    text = f"hello via {alg}"
    assert run(echo(env, token, text)) == text


# --- attacks ----------------------------------------------------------------------------------------


def test_alg_none_is_algorithm(env):
    token = jwt.encode(claims(), None, algorithm="none")
    assert token.endswith("."), token  # PyJWT's unsecured JWS: empty signature
    assert_rejected(env, token, "algorithm")


def test_alg_none_handcrafted_with_signature_is_algorithm(env):
    # Some verifiers only check for an empty signature; keep a bogus one attached.
    head = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims()).encode())
    assert_rejected(env, f"{head}.{body}.{b64url(b'x' * 32)}", "algorithm")


def test_hs256_keyed_with_rsa_public_pem_is_bad_signature(env):
    # Key confusion: HS256 with the server's RSA public key PEM as the HMAC secret. PyJWT refuses
    # to HMAC with a PEM key (InvalidKeyError), which is itself the defence; so sign by hand.
    with pytest.raises(jwt.exceptions.InvalidKeyError):
        jwt.encode(claims(), env.rsa_public_pem, algorithm="HS256")
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims()).encode())
    mac = hmac.new(env.rsa_public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert_rejected(env, f"{head}.{body}.{b64url(mac)}", "bad_signature")


def test_expired_is_expired(env):
    now = int(time.time())
    token = jwt.encode(claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600), env.private["rsa"], algorithm="RS256")
    assert_rejected(env, token, "expired")


def test_nbf_in_future_is_not_yet_valid(env):
    now = int(time.time())
    token = jwt.encode(claims(nbf=now + 3600, exp=now + 7200), env.private["ES256"], algorithm="ES256")
    assert_rejected(env, token, "not_yet_valid")


def test_wrong_issuer_is_bad_issuer(env):
    token = jwt.encode(claims(iss="mallory"), env.private["EdDSA"], algorithm="EdDSA")
    assert_rejected(env, token, "bad_issuer")


def test_wrong_audience_is_bad_audience(env):
    token = jwt.encode(claims(aud=["someone-else"]), env.private["hmac"], algorithm="HS512")
    assert_rejected(env, token, "bad_audience")


@pytest.mark.parametrize("alg", ["HS256", "PS256", "ES384"])
def test_tampered_signature_is_bad_signature(env, alg):
    head, body, sig = jwt.encode(claims(), env.key_for(alg), algorithm=alg).split(".")
    raw = bytearray(b64url_decode(sig))
    raw[len(raw) // 2] ^= 0x01  # a whole byte in the middle: never just base64 padding bits
    assert_rejected(env, f"{head}.{body}.{b64url(bytes(raw))}", "bad_signature")


def string_exp_token(env) -> str:
    token = jwt.encode(claims(exp=str(int(time.time()) + 300)), env.private["rsa"], algorithm="RS256")
    assert isinstance(json.loads(b64url_decode(token.split(".")[1]))["exp"], str)
    return token


def test_string_exp_is_refused(env):
    before = auth_failures(env)
    assert run(refused(env, string_exp_token(env))) == 401
    after = auth_failures(env)
    assert sum(after.values()) - sum(before.values()) == 1


# jsonwebtoken reports a registered claim of the wrong type as missing; the gateway tells the two
# apart and labels a present-but-string exp "malformed".
def test_string_exp_reason_is_malformed(env):
    assert_rejected(env, string_exp_token(env), "malformed")


def test_crit_header_is_malformed(env):
    token = jwt.encode(claims(), env.private["hmac"], algorithm="HS256",
                       headers={"crit": ["x-wsgate-test"], "x-wsgate-test": True})
    assert_rejected(env, token, "malformed")


def test_valid_token_still_works_after_attacks(env):
    # No auth ban (auth_failures_per_ip = 0): the same client IP is still admitted.
    assert run(echo(env, jwt.encode(claims(), env.private["rsa"], algorithm="PS512"), "still here")) == "still here"
