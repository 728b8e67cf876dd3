"""The deployment kit under deploy/ is valid: rules, rule unit tests, dashboard queries, production config.

Needs promtool (Debian's prometheus package; scripts/setup-system.sh installs it) and the wsgate
binary ($WSGATE_BIN, default target/debug/wsgate). Nothing here needs systemd or root.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from wsgate_harness import REPO_ROOT, default_binary

DEPLOY = REPO_ROOT / "deploy"
PROD_CONFIG = DEPLOY / "wsgate.prod.toml"
RULES = DEPLOY / "wsgate.rules.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"

# The production paths the config names, replaced by temp files in the check below.
PROD_CERT = "/etc/wsgate/tls/fullchain.pem"
PROD_KEY = "/etc/wsgate/tls/privkey.pem"
PROD_DENY = "/etc/wsgate/deny.txt"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not installed: run scripts/setup-system.sh"
    return path


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, **kw)


def output(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"


def contract_metrics() -> set[str]:
    """Metric names from src/metrics.rs (the DESIGN.md section 4 contract)."""
    src = (REPO_ROOT / "src" / "metrics.rs").read_text()
    names = set(re.findall(r'pub const [A-Z_]+: &str = "(wsgate_[a-z_]+)";', src))
    assert len(names) >= 13, f"could not read the metric names from src/metrics.rs: {names}"
    return names


def metric_names_in(expr: str) -> set[str]:
    """wsgate_* metric names an expression reads, histogram suffixes removed."""
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bwsgate_[a-z_]+\b", expr)}


# --- Prometheus rules and scrape config -------------------------------------------------------

def test_rules_pass_promtool_check():
    p = run([promtool(), "check", "rules", RULES])
    assert p.returncode == 0, output(p)


def test_rule_unit_tests_pass():
    p = run([promtool(), "test", "rules", DEPLOY / "wsgate.rules.test.yml"])
    assert p.returncode == 0, output(p)


def test_prometheus_config_passes_promtool_check():
    p = run([promtool(), "check", "config", DEPLOY / "prometheus.yml"])
    assert p.returncode == 0, output(p)


def test_rules_only_read_contract_metrics():
    known = contract_metrics()
    exprs = re.findall(r"^\s*expr:\s*(.+(?:\n\s{10,}.+)*)", RULES.read_text(), re.M)
    assert exprs, "no expr found in the rules file"
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert used <= known, f"rules read metrics wsgate does not export: {sorted(used - known)}"


def test_rules_alert_on_upstreams_and_plain_http():
    """Issue 23: the per-upstream and plain HTTP series have alerts (their promtool cases are in the test file)."""
    text = RULES.read_text()
    tests = (DEPLOY / "wsgate.rules.test.yml").read_text()
    for metric in ("wsgate_upstream_up", "wsgate_http_requests_total"):
        assert metric in text, f"no rule reads {metric}"
    for alert in ("WsgateUpstreamDown", "WsgateRouteUpstreamsAllDown", "WsgateHttp5xxHigh"):
        assert f"alert: {alert}" in text, f"missing alert {alert}"
        assert f"alertname: {alert}" in tests, f"no promtool test case for {alert}"


# --- Grafana dashboard ------------------------------------------------------------------------

def dashboard_exprs(node) -> list[str]:
    """Every `expr` in the dashboard, wherever it sits (panels, rows, nested panels)."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                found.append(v)
            else:
                found.extend(dashboard_exprs(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(dashboard_exprs(v))
    return found


def as_promql(expr: str) -> str:
    """Replace Grafana's variables with values Prometheus accepts."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?", "5m", expr)
    expr = re.sub(r"\$\{(\w+)(:\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", ".*", expr)
    return expr


def test_dashboard_is_importable_json():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    route = {v["name"]: v for v in dash["templating"]["list"]}["route"]
    assert "label_values(wsgate_connections_active, route)" in json.dumps(route["query"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p["targets"], p["title"]


def test_dashboard_queries_parse_and_read_contract_metrics(tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dash["panels"])
    assert len(exprs) >= 12, exprs
    used = set().union(*(metric_names_in(e) for e in exprs))
    known = contract_metrics()
    assert used <= known, f"dashboard reads metrics wsgate does not export: {sorted(used - known)}"
    for needed in ("wsgate_connections_active", "wsgate_connections_accepted_total",
                   "wsgate_connections_rejected_total", "wsgate_auth_failures_total", "wsgate_messages_total",
                   "wsgate_bytes_total", "wsgate_closes_total", "wsgate_errors_total",
                   "wsgate_handshake_duration_seconds", "wsgate_connection_duration_seconds",
                   "wsgate_upstream_connect_duration_seconds", "wsgate_config_reloads_total",
                   "wsgate_cluster_up", "wsgate_cluster_mode", "wsgate_cluster_ops_total",
                   "wsgate_cluster_op_duration_seconds", "wsgate_admin_requests_total",
                   "wsgate_connections_max", "wsgate_compressed_bytes_total",
                   "wsgate_http_requests_total", "wsgate_http_request_duration_seconds",
                   "wsgate_upstream_sessions", "wsgate_upstream_up"):
        assert needed in used, f"no panel shows {needed}"
    text = "\n".join(exprs)
    for needed in ("process_open_fds", "process_max_fds", "process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert needed in text, f"no panel shows {needed}"
    # One recording rule per expression: `promtool check rules` parses each with Prometheus's parser.
    # JSON is YAML, so no YAML library is needed.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": as_promql(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps(rules, indent=2))
    p = run([promtool(), "check", "rules", path])
    assert p.returncode == 0, output(p) + "\n" + path.read_text()
    assert f"{len(exprs)} rules found" in p.stdout, output(p)


# --- Production config and systemd unit -------------------------------------------------------

def write_cert(cert: Path, key: Path) -> None:
    """A throwaway self-signed EC certificate for localhost."""
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
         .sign(k, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))


def test_production_config_passes_wsgate_check(tmp_path):
    binary = default_binary()
    assert binary.is_file(), f"wsgate binary not found at {binary}: build it (cargo build) or set WSGATE_BIN"
    text = PROD_CONFIG.read_text()
    for path in (PROD_CERT, PROD_KEY, PROD_DENY):
        assert f'"{path}"' in text, f"{PROD_CONFIG.name} no longer names {path}"
    write_cert(tmp_path / "fullchain.pem", tmp_path / "privkey.pem")
    (tmp_path / "deny.txt").write_text("# test blocklist\n203.0.113.0/24\n2001:db8::/32\n")
    config = tmp_path / "wsgate.toml"
    config.write_text(text.replace(PROD_CERT, str(tmp_path / "fullchain.pem"))
                      .replace(PROD_KEY, str(tmp_path / "privkey.pem"))
                      .replace(PROD_DENY, str(tmp_path / "deny.txt")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_JWT")}
    env["WSGATE_JWT_SECRET"] = secrets.token_hex(32)
    p = run([binary, "check", "--config", config], env=env, cwd=tmp_path)
    assert p.returncode == 0, output(p)
    assert "warning" not in (p.stdout + p.stderr).lower(), f"the production config should be warning-free\n{output(p)}"
    # Without the secret in the environment the same config is refused (secret_env is really used).
    del env["WSGATE_JWT_SECRET"]
    p = run([binary, "check", "--config", config], env=env, cwd=tmp_path)
    assert p.returncode != 0 and "WSGATE_JWT_SECRET" in p.stderr, output(p)


def test_production_config_with_acme_passes_wsgate_check(tmp_path):
    """The commented [tls.acme] block of the production config, switched on as its comment says."""
    binary = default_binary()
    text = PROD_CONFIG.read_text()
    block = re.search(r"^# \[tls\.acme\]\n(?:# .+\n)+", text, re.M)
    assert block, f"{PROD_CONFIG.name} has no commented [tls.acme] block"
    acme = "\n".join(line[2:] for line in block.group(0).splitlines()) + "\n"
    assert 'cache_dir = "/var/lib/wsgate/acme"' in acme
    cache = tmp_path / "acme"
    acme = acme.replace("/var/lib/wsgate/acme", str(cache))
    # Remove the file settings the comment says to remove; the [tls.acme] table goes last in [tls].
    text = re.sub(r'^(cert|key|self_signed_if_missing) = .*\n', "", text, flags=re.M)
    text = text.replace(block.group(0), acme).replace(PROD_DENY, str(tmp_path / "deny.txt"))
    (tmp_path / "deny.txt").write_text("203.0.113.0/24\n")
    config = tmp_path / "wsgate.toml"
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_JWT")}
    env["WSGATE_JWT_SECRET"] = secrets.token_hex(32)
    p = run([binary, "check", "--config", config], env=env, cwd=tmp_path)
    assert p.returncode == 0, output(p)
    assert "warning" not in (p.stdout + p.stderr).lower(), output(p)
    assert not cache.exists(), "check must not create the cache directory"
    # The unit gives the gateway a private, writable /var/lib/wsgate for that cache.
    unit = unit_settings()
    assert unit["StateDirectory"] == ["wsgate"] and unit["StateDirectoryMode"] == ["0700"]


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min|m|h)?", duration.strip())
    assert m, duration
    return int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "wsgate.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            settings.setdefault(k.strip(), []).append(v.strip())
    return settings


def test_systemd_unit_matches_production_config():
    unit = unit_settings()
    prod = tomllib.loads(PROD_CONFIG.read_text())
    server = prod["server"]
    assert unit["ExecStart"] == ["/usr/local/bin/wsgate run --config /etc/wsgate/wsgate.toml"]
    assert "/bin/kill -HUP $MAINPID" in unit["ExecReload"]
    # wsgate sends READY=1, RELOADING=1/READY=1, STOPPING=1 and WATCHDOG=1 (src/notify.rs).
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] in (["main"], ["all"])
    assert 2 <= seconds(unit["WatchdogSec"][0]) <= 120, unit["WatchdogSec"]
    assert unit["CapabilityBoundingSet"] == unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    # systemd must not SIGKILL a gateway that is still draining within shutdown_grace.
    drain = seconds(server["shutdown_grace"]) + seconds(server.get("close_timeout", "3s"))
    assert seconds(unit["TimeoutStopSec"][0]) > drain, (unit["TimeoutStopSec"], drain)
    # Each session holds a client and an upstream socket.
    assert int(unit["LimitNOFILE"][0]) >= 2 * server["max_connections"]
    assert prod["admin"]["listen"].startswith("127.0.0.1:")
    assert prod["tls"]["self_signed_if_missing"] is False
