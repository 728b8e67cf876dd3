"""A real Django Channels app (daphne, Django 5.2 session login) behind wsgate with forward auth.

examples/django-channels/gateway.toml runs as shipped, with only its ports, file paths, the
provider's url and `recheck` rewritten. The app is tests/apps/django_channels: /login/ and
/logout/ (Django's session login), /ws-auth/ (the forward-auth endpoint: 200 + X-User-Id for a
logged-in session, 401 otherwise) and the consumer /ws/echo/, which answers each message with
the session user (scope["user"]) and every X-User-Id header that reached it.

Two daphne processes of the same app share one sqlite database (a temp dir, migrated and given
two users with manage.py at the start): "web" serves pages and sockets (the routes' upstream),
"auth" answers /ws-auth/ (the provider's url), so the auth endpoint can go down while the live
sockets stay on "web". Clients log in through the gateway (the "pages" route, http = true).

Needs Django, channels and daphne in .venv (scripts/setup-python.sh installs them, pinned in
tests/apps/django_channels/requirements.txt). Run:
    WSGATE_BIN=target/debug/wsgate .venv/bin/python -m pytest -q tests/python/test_django_channels.py
Every wait is bounded; every process started here is stopped by its PID (its own process group).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import connect

from wsgate_harness import REPO_ROOT, Gateway, default_binary, stop_group, toml_str

pytestmark = pytest.mark.timeout(120)

APP_DIR = REPO_ROOT / "tests" / "apps" / "django_channels"
EXAMPLE = REPO_ROOT / "examples" / "django-channels" / "gateway.toml"
STEP = 20  # seconds allowed for any single step
RECHECK = 1.0  # seconds: the test's recheck period
USERS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "josé": "jose-pw-3", "Дима": "dima-pw-4"}

ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
ENV["PYTHONUNBUFFERED"] = "1"
ENV["DJANGO_SETTINGS_MODULE"] = "wsapp.settings"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daphne:
    """`daphne wsapp.asgi:application` on a free loopback port, in its own process group."""

    def __init__(self, name: str, tmp: Path, env: dict, port: int | None = None):
        self.name, self.port = name, port or free_port()
        self.log = tmp / f"daphne-{name}-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "wsapp.asgi:application"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=str(APP_DIR), env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + STEP
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"daphne {name} did not listen on {self.port}: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)

    def stop(self):
        stop_group(self.proc)


def render_example_config(tmp: Path, web_port: int, auth_port: int) -> str:
    """examples/django-channels/gateway.toml with ports 0, files in tmp, the two daphnes and a
    short recheck; nothing else changed. (harness.render_example's list, less the JWT secret:
    the example has no [jwt].)"""
    text = EXAMPLE.read_text()
    replacements = [
        ('listen = ["127.0.0.1:8443"]', 'listen = ["127.0.0.1:0"]'),
        ('listen = "127.0.0.1:9090"', 'listen = "127.0.0.1:0"'),
        ('"certs/dev/server.crt"', toml_str(tmp / "server.crt")),
        ('"certs/dev/server.key"', toml_str(tmp / "server.key")),
        ('url = "http://127.0.0.1:8000/ws-auth/"', f'url = "http://127.0.0.1:{auth_port}/ws-auth/"'),
        ('recheck = "30s"', f'recheck = "{int(RECHECK * 1000)}ms"'),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, f"{EXAMPLE.relative_to(REPO_ROOT)} changed: expected {old!r} exactly once"
        text = text.replace(old, new)
    assert text.count('"ws://127.0.0.1:8000"') == 2
    text = text.replace('"ws://127.0.0.1:8000"', toml_str(f"ws://127.0.0.1:{web_port}"))
    cfg = tomllib.loads(text)
    # The contract the README and this test rely on, as shipped.
    p = cfg["providers"]["django"]
    assert p["kind"] == "forward" and p["identity_header"] == "x-user-id" and p["copy_headers"] == ["x-user-id"]
    sockets, pages = cfg["routes"]
    assert sockets["auth"] == "forward" and sockets["provider"] == "django" and sockets["path"] == "/ws/*"
    assert pages["http"] is True and pages["auth"] == "none" and pages["path"] == "/*"
    assert "jwt" not in cfg
    return text


class Browser:
    """A browser of the site: its cookie jar, and Origin on every POST (as browsers send it,
    same-origin too). Plain requests go through the gateway's "pages" route."""

    def __init__(self, stack: "Stack"):
        self.stack = stack
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    @property
    def cookie(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def request(self, method: str, path: str, form: dict | None = None) -> tuple[int, dict]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.stack.base + path, data=data, method=method)
        if method == "POST":
            req.add_header("Origin", self.stack.origin)
        if self.cookies:
            req.add_header("Cookie", self.cookie)
        try:
            with urllib.request.urlopen(req, context=self.stack.ctx, timeout=STEP) as resp:
                status, headers, body = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, e.headers, e.read()
        for line in headers.get_all("Set-Cookie") or []:
            name, _, rest = line.partition("=")
            value = rest.split(";", 1)[0]
            if value in ("", '""'):
                self.cookies.pop(name.strip(), None)  # deleted (expires in 1970)
            else:
                self.cookies[name.strip()] = value
        try:
            return status, json.loads(body or b"{}")
        except ValueError:
            return status, {"html": body[:200]}

    def logout(self):
        status, body = self.request("POST", "/logout/", {"csrfmiddlewaretoken": self.csrf})
        assert status == 200 and body == {"ok": True}, (status, body)
        assert "sessionid" not in self.cookies


class Stack:
    """The app (two daphnes on one database) and the gateway. `gateway` is what conftest's
    failure hook attaches the log of."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.daphnes: dict[str, Daphne] = {}
        self.gateway = None
        self.env = dict(ENV, WSAPP_DB=str(tmp / "db.sqlite3"), WSAPP_SECRET_KEY="test-" + os.urandom(16).hex())
        try:
            self.manage("migrate", "--noinput", "-v", "0")
            for i, (user, password) in enumerate(USERS.items()):
                self.manage("createsuperuser", "--noinput", "--username", user, "--email", f"user{i}@example.com",
                            extra_env={"DJANGO_SUPERUSER_PASSWORD": password})
            self.daphnes["web"] = Daphne("web", tmp, self.env)
            self.start_auth()
            config = tmp / "gateway.toml"
            config.write_text(render_example_config(tmp, self.daphnes["web"].port, self.auth_port))
            self.gateway = Gateway(default_binary(), config, tmp / "wsgate.log")
        except BaseException:
            self.stop()
            raise
        self.base = f"https://127.0.0.1:{self.gateway.port}"
        self.origin = "https://127.0.0.1:8443"  # the example's allowed origin (the site's pages)
        self.ctx = ssl.create_default_context(cafile=str(tmp / "server.crt"))
        self.ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN

    def start_auth(self):
        """The "auth" daphne; again on the same port after a stop (the gateway's config names it)."""
        d = Daphne("auth", self.tmp, self.env, getattr(self, "auth_port", None))
        self.daphnes["auth"] = d
        self.auth_port = d.port

    def manage(self, *args: str, extra_env: dict | None = None):
        run = subprocess.run([sys.executable, "manage.py", *args], stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=60, cwd=str(APP_DIR), env=dict(self.env, **(extra_env or {})))
        assert run.returncode == 0, f"manage.py {args}: {run.stderr.decode(errors='replace')[-2000:]}"

    def stop(self):
        if self.gateway is not None:
            self.gateway.stop()
        for d in self.daphnes.values():
            d.stop()

    def login(self, user: str) -> "Browser":
        """A new browser logged in as `user` through the gateway, as a login form would."""
        b = Browser(self)
        status, body = b.request("GET", "/login/")
        assert status == 200 and body.get("csrf") and b.cookies.get("csrftoken"), (status, body, b.cookies)
        form = {"username": user, "password": USERS[user], "csrfmiddlewaretoken": body["csrf"]}
        status, body = b.request("POST", "/login/", form)
        assert status == 200 and body["ok"] and body["user"] == user, (status, body)
        assert b.cookies.get("sessionid"), f"no session cookie: {b.cookies}"
        b.csrf = body["csrf"]  # login() rotates the CSRF token
        return b

    def ws(self, cookie: str | None = None, origin: str | None = "default", headers: dict | None = None):
        h = dict(headers or {})
        if cookie:
            h["Cookie"] = cookie
        return connect(f"wss://127.0.0.1:{self.gateway.port}/ws/echo/", ssl=self.ctx, open_timeout=STEP,
                       origin=self.origin if origin == "default" else origin, additional_headers=h,
                       ping_interval=None)

    def status_of(self, **kw) -> int:
        async def go():
            try:
                async with self.ws(**kw):
                    return 101
            except websockets.InvalidStatus as e:
                return e.response.status_code
        return asyncio.run(go())

    def provider_results(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gateway.admin_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith('wsgate_provider_requests_total{') and 'provider="django"' in line:
                result = line.split('result="', 1)[1].split('"', 1)[0]
                out[result] = float(line.rsplit(" ", 1)[1])
        return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    binary = default_binary()
    if not binary.is_file():
        pytest.fail(f"wsgate binary not found at {binary}: build it (cargo build) or set WSGATE_BIN")
    s = Stack(tmp_path_factory.mktemp("django"))
    try:
        yield s
    finally:
        s.stop()


async def exchange(ws, text: str) -> dict:
    await ws.send(text)
    return json.loads(await asyncio.wait_for(ws.recv(), STEP))


async def closed_with(ws, within: float) -> int:
    """The close code the gateway sent, waiting at most `within` seconds."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), within)
    except websockets.ConnectionClosed as e:
        assert e.rcvd is not None, f"closed without a close frame: {e}"
        return e.rcvd.code


def test_readme_shows_the_example(stack):
    """The README's worked example is the config this test runs."""
    text = EXAMPLE.read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    provider = text[text.index("[providers.django]"):text.index("[[routes]]")].strip()
    routes = text[text.index("[[routes]]"):].strip()
    assert provider in readme and routes in readme, \
        "README.md must show examples/django-channels/gateway.toml's provider and routes as they are"


def test_login_through_the_gateway_keeps_djangos_csrf_check(stack):
    """Django's CSRF check works behind the gateway (CSRF_TRUSTED_ORIGINS names the site:
    Django sees the upstream address as Host); the gateway's Origin check comes first."""
    b = Browser(stack)
    status, body = b.request("POST", "/login/", {"username": "alice", "password": USERS["alice"]})
    assert status == 403 and "sessionid" not in b.cookies, "no CSRF token: Django refuses"
    status, body = b.request("GET", "/login/")
    form = {"username": "alice", "password": USERS["alice"], "csrfmiddlewaretoken": body["csrf"]}
    req = urllib.request.Request(stack.base + "/login/", data=urllib.parse.urlencode(form).encode(), method="POST",
                                 headers={"Origin": "https://evil.example", "Cookie": b.cookie})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, context=stack.ctx, timeout=STEP)
    assert refused.value.code == 403 and refused.value.headers.get("Server") != "daphne", "refused by the gateway"
    status, body = b.request("POST", "/login/", form)
    assert status == 200 and body["user"] == "alice" and "sessionid" in b.cookies, (status, body)


def test_an_upgrade_outside_ws_is_refused_by_the_app_and_breaks_nothing(stack):
    """An upgrade on another path goes to the "pages" route (auth = "none"): the app's
    catch-all refuses it with 403, which the gateway passes through (a 500 there would count
    as an upstream failure and put the route's upstream in back-off, login page included)."""
    async def go():
        for path in ("/nothing/", "/login/", "/ws-auth/") * 2:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(f"wss://127.0.0.1:{stack.gateway.port}{path}", ssl=stack.ctx,
                                   origin=stack.origin, open_timeout=STEP):
                    pass
            assert refused.value.response.status_code == 403, path

    asyncio.run(go())
    assert stack.login("bob").cookie  # the login page still answers


def test_without_a_session_the_upgrade_is_401(stack):
    assert stack.status_of() == 401
    assert stack.status_of(cookie="sessionid=forged0123456789abcdefghijklmnopqr") == 401
    before = stack.provider_results().get("deny", 0)
    assert stack.status_of(cookie="sessionid=x", headers={"X-User-Id": "alice"}) == 401
    assert stack.provider_results().get("deny", 0) >= before + 1


def test_the_app_sees_the_identity_the_gateway_vouched_for(stack):
    alice, bob = stack.login("alice").cookie, stack.login("bob").cookie
    # A browser page of another site: refused before the app is asked.
    asked = sum(stack.provider_results().values())
    assert stack.status_of(cookie=alice, origin="https://evil.example") == 403
    assert sum(stack.provider_results().values()) == asked

    async def go():
        # Forged identity headers in several spellings never reach the app.
        forged = {"X-User-Id": "mallory", "x_user_id": "mallory"}
        async with stack.ws(cookie=bob, headers=forged) as ws:
            for i in range(3):
                got = await exchange(ws, f"hello {i}")
                assert got == {"echo": f"hello {i}", "user": "bob", "x_user_id": ["bob"]}, got
        async with stack.ws(cookie=alice, headers={"X-User-Id": "bob"}) as ws:
            got = await exchange(ws, "hi")
            assert got == {"echo": "hi", "user": "alice", "x_user_id": ["alice"]}, got

    asyncio.run(go())
    assert stack.provider_results().get("allow", 0) >= 2


def test_non_ascii_names_are_sent_percent_encoded(stack):
    """The view percent-encodes the name: UTF-8 text the gateway takes as the identity
    (Django would write "josé" as Latin-1 bytes, and an identity that is not UTF-8 is 503)."""
    async def go():
        for user, sent in (("josé", "jos%C3%A9"), ("Дима", "%D0%94%D0%B8%D0%BC%D0%B0")):
            async with stack.ws(cookie=stack.login(user).cookie) as ws:
                got = await exchange(ws, "hi")
                assert got == {"echo": "hi", "user": user, "x_user_id": [sent]}, got

    asyncio.run(go())


def test_logout_closes_the_live_socket_with_1008(stack):
    browser = stack.login("alice")
    cookie = browser.cookie  # what the socket was opened with (replayed below)
    other = stack.login("alice").cookie  # a second session of the same user stays logged in

    async def go():
        async with stack.ws(cookie=cookie) as ws, stack.ws(cookie=other) as stays:
            assert (await exchange(ws, "before"))["user"] == "alice"
            # A few rechecks pass while logged in.
            await asyncio.sleep(2.5 * RECHECK)
            assert (await exchange(ws, "still"))["echo"] == "still"
            browser.logout()
            t0 = time.monotonic()
            code = await closed_with(ws, 5 * RECHECK + 5)
            assert code == 1008, code
            assert time.monotonic() - t0 < 4 * RECHECK + 2, "closed within a few recheck periods"
            assert (await exchange(stays, "other session"))["user"] == "alice"

    asyncio.run(go())
    # The logged-out cookie opens no new socket.
    assert stack.status_of(cookie=cookie) == 401


def test_auth_endpoint_down_refuses_new_sockets_and_keeps_live_ones(stack):
    cookie = stack.login("bob").cookie

    async def go():
        async with stack.ws(cookie=cookie) as ws:
            assert (await exchange(ws, "up"))["user"] == "bob"
            stack.daphnes["auth"].stop()
            errors = sum(v for k, v in stack.provider_results().items() if k in ("error", "timeout"))
            # New upgrades: 503 (auth_unavailable), never an admission.
            assert await asyncio.to_thread(stack.status_of, cookie=cookie) == 503
            # Rechecks fail while the live socket stays open and relays.
            await asyncio.sleep(3 * RECHECK)
            got = await exchange(ws, "still up")
            assert got == {"echo": "still up", "user": "bob", "x_user_id": ["bob"]}, got
            after = sum(v for k, v in stack.provider_results().items() if k in ("error", "timeout"))
            assert after >= errors + 2, (errors, after)
            # The endpoint comes back: new sockets are admitted again.
            stack.start_auth()
            deadline = time.monotonic() + STEP
            while await asyncio.to_thread(stack.status_of, cookie=cookie) != 101:
                assert time.monotonic() < deadline, "not admitted after the endpoint came back"
                await asyncio.sleep(0.2)
            assert (await exchange(ws, "after"))["echo"] == "after"

    asyncio.run(go())
