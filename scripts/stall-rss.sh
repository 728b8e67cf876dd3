#!/usr/bin/env bash
# Memory a gateway holds for large frames in progress: 24 clients each send half of a
# 900 KiB frame and stall; prints the gateway's VmRSS growth (a RESULT line per upstream).
# Light (no load on the cores): one gateway, 24 connections, a few seconds.
#
#   scripts/stall-rss.sh [path/to/wsgate]    # default target/release/wsgate
#
# Needs target/release/wsgate-bench (cargo build --release -p wsgate-bench). Runs twice:
# with the in-process builtin:echo upstream (its buffers count in the gateway's RSS) and
# with a separate `wsgate echo` process (only the gateway counts). Loopback only; every
# process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WSGATE=${1:-target/release/wsgate}
BENCH=target/release/wsgate-bench
COUNT=${STALL_COUNT:-24}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

read -r GW_PORT ADMIN_PORT ECHO_PORT < <("$BENCH" free-ports 3)
"$WSGATE" echo --listen "127.0.0.1:$ECHO_PORT" >"$WORK/echo.log" 2>&1 &
PIDS+=($!)

for upstream in builtin:echo "ws://127.0.0.1:$ECHO_PORT"; do
  cat >"$WORK/wsgate.toml" <<CONF
[server]
listen = ["127.0.0.1:$GW_PORT"]
ping_interval = "5m"

[tls]
cert = "$WORK/server.crt"
key = "$WORK/server.key"
self_signed_if_missing = true

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[log]
level = "warn"

[limits]
max_message_size = "1MiB"
max_frame_size = "1MiB"

[[routes]]
name = "stall"
path = "/stall"
upstreams = ["$upstream"]
auth = "none"
CONF
  "$WSGATE" run --config "$WORK/wsgate.toml" >"$WORK/wsgate.log" 2>&1 &
  gw=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$BENCH" stall --url "wss://127.0.0.1:$GW_PORT/stall" --insecure --count "$COUNT" \
    --frame-size $((900 * 1024)) --send $((450 * 1024)) --rss-pid "$gw" --settle "${STALL_SETTLE:-1}" --tag "upstream=$upstream"
  kill "$gw"
  wait "$gw" 2>/dev/null || true
done
