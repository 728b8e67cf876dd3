"""Several hosts on one gateway (DESIGN.md section 14) with real clients: Python `ssl` with SNI,
the `websockets` client, and headless Chromium (a page on one host opening sockets to both).

Names under example.test are never resolved: Python connects to 127.0.0.1 with the name as SNI
and Host, Chromium maps them with --host-resolver-rules. Both certificates are self-signed and
trusted by pinning (Python: each as its own CA; Chromium: both SPKI hashes).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect

from test_browser import CHROMIUM, BROWSER_WAIT, STEP, PageServer, events, metric, spki_hash
from wsgate_harness import Gateway, default_binary, toml_str

pytestmark = pytest.mark.timeout(120)

CHAT = "chat.example.test"
PARTNERS = "partners.example.test"


def write_cert(tmp: Path, stem: str, names: list[str]) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp / f"{stem}.crt"


class Env:
    def __init__(self, tmp: Path, gw: Gateway, pages: PageServer, certs: dict[str, Path]):
        self.tmp, self.gw, self.pages, self.certs = tmp, gw, pages, certs

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        for path in self.certs.values():
            ctx.load_verify_locations(path)
        return ctx

    def metrics(self) -> str:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gw.admin_port}/metrics", timeout=STEP) as r:
            return r.read().decode()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    binary = default_binary()
    if not binary.is_file():
        pytest.fail(f"wsgate binary not found at {binary}: build it (cargo build) or set WSGATE_BIN")
    tmp = tmp_path_factory.mktemp("wsgate-hosts")
    certs = {"chat": write_cert(tmp, "chat", [CHAT]), "partners": write_cert(tmp, "partners", [PARTNERS, f"*.{PARTNERS}"])}
    pages = PageServer()
    page_origin = f"http://{CHAT}:{pages.port}"
    routes = "".join(
        f"""
[[routes]]
name = "{name}"
host = "{host}"
path = "/ws"
upstreams = ["builtin:echo"]
auth = "none"
allowed_origins = [{toml_str(page_origin)}]
"""
        for name, host in (("chat", CHAT), ("partners", f"*.{PARTNERS}"), ("partners-apex", PARTNERS))
    )
    config = tmp / "gateway.toml"
    config.write_text(f"""\
[server]
listen = ["127.0.0.1:0"]
[[tls.certificates]]
cert = {toml_str(tmp / "chat.crt")}
key = {toml_str(tmp / "chat.key")}
[[tls.certificates]]
cert = {toml_str(tmp / "partners.crt")}
key = {toml_str(tmp / "partners.key")}
[admin]
listen = "127.0.0.1:0"
[jwt]
secret_file = {toml_str(tmp / "jwt.secret")}
generate_secret_if_missing = true
{routes}""")
    gw = Gateway(binary, config, tmp / "wsgate.log")
    try:
        yield Env(tmp, gw, pages, certs)
    finally:
        gw.stop()
        pages.close()


def upgrade(env: Env, sni: str | None, host: str) -> tuple[str, int]:
    """TLS with `sni` (None: no SNI), then an upgrade request with `Host: host`: the certificate's
    first name and the status."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", env.gw.port), timeout=STEP) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
            san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
            tls.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            head = b""
            while b"\r\n" not in head:
                chunk = tls.recv(1024)
                if not chunk:
                    break
                head += chunk
            return san.value.get_values_for_type(x509.DNSName)[0], int(head.split(b" ")[1])


def test_python_ssl_sni_picks_the_certificate_and_a_fronted_host_gets_421(env):
    assert upgrade(env, CHAT, CHAT) == (CHAT, 101)
    assert upgrade(env, f"eu.{PARTNERS}", f"eu.{PARTNERS}") == (PARTNERS, 101)
    assert upgrade(env, PARTNERS, f"{PARTNERS.upper()}.:443") == (PARTNERS, 101)
    # Without SNI: the first certificate, and Host alone routes.
    assert upgrade(env, None, PARTNERS) == (CHAT, 101)
    # Domain fronting: SNI names one certificate, Host another's name.
    before = metric(env.metrics(), "wsgate_connections_rejected_total", reason="misdirected")
    assert upgrade(env, CHAT, PARTNERS) == (CHAT, 421)
    assert upgrade(env, PARTNERS, CHAT) == (PARTNERS, 421)
    assert upgrade(env, f"a.b.{PARTNERS}", f"a.b.{PARTNERS}") == (CHAT, 421)
    after = metric(env.metrics(), "wsgate_connections_rejected_total", reason="misdirected")
    assert after == before + 3


def test_websockets_client_verifies_each_host_certificate(env):
    async def echo(name: str) -> str:
        async with connect(f"wss://{name}:{env.gw.port}/ws", ssl=env.context(), host="127.0.0.1",
                           port=env.gw.port, open_timeout=STEP) as ws:
            await ws.send(f"hi {name}")
            return await asyncio.wait_for(ws.recv(), STEP)

    async def main():
        return [await echo(n) for n in (CHAT, PARTNERS, f"eu.{PARTNERS}")]

    assert asyncio.run(main()) == [f"hi {CHAT}", f"hi {PARTNERS}", f"hi eu.{PARTNERS}"]
    text = env.metrics()
    for route in ("chat", "partners", "partners-apex"):
        assert metric(text, "wsgate_closes_total", route=route) >= 1, route


def run_browser(env: Env, name: str, url: str) -> dict:
    env.pages.cases[name] = {"name": name, "url": url, "protocols": [], "timeout_ms": 20000}
    profile = env.tmp / f"chromium-{name}"
    profile.mkdir(exist_ok=True)
    spki = ",".join(spki_hash(p.read_bytes()) for p in env.certs.values())
    args = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-extensions", "--no-proxy-server", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", f"--ignore-certificate-errors-spki-list={spki}",
        f"--host-resolver-rules=MAP {CHAT} 127.0.0.1, MAP *.example.test 127.0.0.1",
        f"http://{CHAT}:{env.pages.port}/case/{name}",
    ]
    with open(env.tmp / "chromium.log", "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + BROWSER_WAIT
        result = None
        while result is None and time.monotonic() < deadline and proc.poll() is None:
            result = env.pages.wait_result(name, 0.25)
        result = result or env.pages.wait_result(name, 1.0)
        if result is None:
            pytest.fail(f"the page reported nothing; chromium log tail:\n{(env.tmp / 'chromium.log').read_text()[-3000:]}")
        return result
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium missing: run scripts/setup-system.sh")
def test_a_page_on_one_host_opens_sockets_to_both(env):
    for name, host in (("same-host", CHAT), ("other-host", f"eu.{PARTNERS}")):
        result = run_browser(env, name, f"wss://{host}:{env.gw.port}/ws")
        assert [e["data"] for e in events(result, "message")] == ["hello"], result
        closed = events(result, "close")
        assert closed and closed[0]["code"] == 1000, result
