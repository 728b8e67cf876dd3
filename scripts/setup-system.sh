#!/usr/bin/env bash
# Installs the Debian packages the tests need, when they are missing (idempotent, quiet):
#   prometheus  promtool: checks /metrics, deploy/wsgate.rules.yml (+ its unit tests) and the dashboard
#               queries; prometheus: tests/python/test_prometheus.py scrapes a live gateway with it
#   chromium    headless browser for tests/python/test_browser.py (WebSocket from a real page: Origin,
#               `bearer.<token>` subprotocol, the upstream's chosen protocol)
#   redis-server  tests/cluster.rs starts its own on a free loopback port (cluster mode)
#   haproxy     tests/cluster_ha.rs runs deploy/haproxy.cfg (TCP mode, PROXY v2) in front of three
#               instances on free loopback ports
#   nodejs npm  Node 18+ for the Socket.IO apps of tests/node (only when no node/npm is installed)
#   pebble      Let's Encrypt's test ACME server: tests/acme.rs starts its own on free loopback
#               ports, its validation authority pointed at the gateway's listener ([tls.acme])
set -euo pipefail
need=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  need+=(prometheus)
fi
if [[ ! -x /usr/bin/chromium ]]; then
  need+=(chromium)
fi
if ! command -v redis-server >/dev/null 2>&1; then
  need+=(redis-server)
fi
if ! command -v pebble >/dev/null 2>&1; then
  need+=(pebble)
fi
if ! command -v haproxy >/dev/null 2>&1; then
  need+=(haproxy)
fi
# Node 18+ and npm: tests/python/test_socketio.py runs real Socket.IO servers and clients
# (tests/node). Debian's nodejs (18 on bookworm) when none is installed.
if ! command -v node >/dev/null 2>&1; then
  need+=(nodejs)
fi
if ! command -v npm >/dev/null 2>&1; then
  need+=(npm)
fi
if ((${#need[@]})); then
  echo "setup-system: installing ${need[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The package starts a system Prometheus on :9090 where systemd runs, which is also wsgate's
  # default admin port; the tests start their own Prometheus, so stop the one we just installed.
  if [[ -d /run/systemd/system ]] && systemctl is-active --quiet prometheus 2>/dev/null; then
    echo "setup-system: stopping and disabling prometheus.service (it would hold port 9090)" >&2
    "${sudo_cmd[@]}" systemctl disable --now --quiet prometheus
  fi
fi
