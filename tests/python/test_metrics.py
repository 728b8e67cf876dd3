"""The admin listener's /metrics output passes `promtool check metrics` after real traffic.

promtool comes from Debian's prometheus package (scripts/setup-system.sh installs it).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request

import websockets


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_metrics_pass_promtool_after_traffic(gateway):
    async def traffic():
        headers = {"Authorization": f"Bearer {gateway.token}"}
        async with websockets.connect(gateway.echo_url, ssl=gateway.ssl_context(), additional_headers=headers,
                                      open_timeout=10) as ws:
            await ws.send("metrics please")
            assert await asyncio.wait_for(ws.recv(), 10) == "metrics please"
        # And one refusal, so the rejection and auth-failure series exist.
        try:
            async with websockets.connect(gateway.echo_url, ssl=gateway.ssl_context(), open_timeout=10):
                raise AssertionError("connected without a token")
        except websockets.exceptions.InvalidStatus as e:
            assert e.response.status_code == 401

    asyncio.run(traffic())
    text = scrape(gateway.admin_port)
    for name in ("wsgate_connections_accepted_total", "wsgate_messages_total", "wsgate_closes_total",
                 "wsgate_auth_failures_total", "wsgate_handshake_duration_seconds_bucket",
                 "wsgate_connections_max", "process_open_fds", "process_max_fds", "process_resident_memory_bytes",
                 "process_cpu_seconds_total", "process_start_time_seconds"):
        assert name in text, name
    promtool = shutil.which("promtool")
    assert promtool, "promtool not installed: run scripts/setup-system.sh"
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
