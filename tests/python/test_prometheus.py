"""A real Prometheus scrapes the gateway's admin listener and loads deploy/wsgate.rules.yml.

Starts Debian's /usr/bin/prometheus (scripts/setup-system.sh installs it) on a free loopback port
with a 1s scrape and evaluation interval, drives traffic through the gateway, and checks through
Prometheus's HTTP API that the target is up, the traffic shows in the counters and every wsgate
rule is loaded and evaluates without error. Prometheus is always stopped at the end.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import websockets

from wsgate_harness import REPO_ROOT

RULES = REPO_ROOT / "deploy" / "wsgate.rules.yml"
WAIT = 30.0  # seconds for each condition


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port: int, path: str, **params):
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body.get("status") == "success", body
    return body["data"]


def wait_for(what: str, check, prom: subprocess.Popen, log: Path):
    """Poll check() until it returns something truthy; fail after WAIT seconds with the last state."""
    deadline = time.monotonic() + WAIT
    last = None
    while time.monotonic() < deadline:
        if prom.poll() is not None:
            pytest.fail(f"prometheus exited with {prom.returncode} while waiting for {what}:\n{tail(log)}")
        try:
            result = check()
            if result:
                return result
            last = "condition not met yet"
        except (OSError, ValueError, AssertionError, KeyError) as e:
            last = repr(e)
        time.sleep(0.5)
    pytest.fail(f"timed out after {WAIT}s waiting for {what}; last: {last}\nprometheus log:\n{tail(log)}")


def tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop(prom: subprocess.Popen) -> None:
    if prom.poll() is None:
        prom.send_signal(signal.SIGTERM)
        try:
            prom.wait(15)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)


def rule_names(kind: str) -> set[str]:
    """`alert:` or `record:` names in deploy/wsgate.rules.yml (no YAML library needed)."""
    return set(re.findall(rf"^\s*- {kind}:\s*(\S+)", RULES.read_text(), re.M))


@pytest.mark.timeout(180)
def test_prometheus_scrapes_gateway_and_loads_rules(gateway, tmp_path):
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).is_file(), "prometheus not installed: run scripts/setup-system.sh"
    alerts, records = rule_names("alert"), rule_names("record")
    assert {"WsgateDown", "WsgateRejectionSpike", "WsgateAuthFailureSpike", "WsgateUpstreamUnavailable",
            "WsgateConfigReloadFailed"} <= alerts, alerts

    port = free_port()
    config = tmp_path / "prometheus.yml"
    # JSON is valid YAML.
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "wsgate",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{gateway.admin_port}"]}],
        }],
    }, indent=2))
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as log_file:
        prom = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
             "--log.level=info"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(tmp_path),
        )
    try:
        def ready():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        wait_for("/-/ready", ready, prom, log)

        asyncio.run(drive_traffic(gateway))

        def target_up():
            targets = api(port, "/api/v1/targets")["activeTargets"]
            ours = [t for t in targets if t["labels"].get("job") == "wsgate"]
            assert len(ours) == 1, targets
            assert ours[0]["health"] == "up", ours[0]
            return ours[0]
        target = wait_for("the wsgate target to be up", target_up, prom, log)
        assert target["scrapeUrl"] == f"http://127.0.0.1:{gateway.admin_port}/metrics"

        def accepted():
            result = api(port, "/api/v1/query", query="wsgate_connections_accepted_total")["result"]
            assert len(result) == 1, result
            assert result[0]["metric"]["job"] == "wsgate", result
            value = float(result[0]["value"][1])
            return value if value > 0 else None
        assert wait_for("wsgate_connections_accepted_total > 0", accepted, prom, log) >= 2

        def messages():
            result = api(port, "/api/v1/query", query='sum(wsgate_messages_total{route="echo"})')["result"]
            return result and float(result[0]["value"][1]) >= 6
        wait_for("the echoed messages in wsgate_messages_total", messages, prom, log)

        def rules_evaluated():
            groups = api(port, "/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            loaded_alerts = {r["name"] for r in rules if r["type"] == "alerting"}
            loaded_records = {r["name"] for r in rules if r["type"] == "recording"}
            assert loaded_alerts == alerts and loaded_records == records, (loaded_alerts, loaded_records)
            broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
            assert not broken, f"rules failing to evaluate: {broken}"
            return all(r["health"] == "ok" for r in rules)
        wait_for("every wsgate rule loaded and evaluated", rules_evaluated, prom, log)

        # The recording rules see the gateway's series (labels line up with the scrape job).
        def recorded():
            result = api(port, "/api/v1/query", query='wsgate:connections_accepted:rate5m{job="wsgate"}')["result"]
            return len(result) == 1
        wait_for("wsgate:connections_accepted:rate5m to be recorded", recorded, prom, log)

        # A healthy gateway raises no wsgate alert (WsgateDown in particular).
        firing = [a for a in api(port, "/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == "WsgateDown"]
        assert not firing, firing
    finally:
        stop(prom)
    assert prom.returncode is not None


async def drive_traffic(gateway) -> None:
    """Two authenticated sessions with three echoed messages each."""
    headers = {"Authorization": f"Bearer {gateway.token}"}
    for i in range(2):
        async with websockets.connect(gateway.echo_url, ssl=gateway.ssl_context(), additional_headers=headers,
                                      open_timeout=10) as ws:
            for j in range(3):
                msg = f"prometheus {i}.{j}"
                await ws.send(msg)
                assert await asyncio.wait_for(ws.recv(), 10) == msg
