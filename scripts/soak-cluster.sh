#!/usr/bin/env bash
# Soak of cluster mode through a Redis outage (issue 27; not part of the tests):
# three wsgate instances in cluster mode on one redis-server, SOCKETS sockets each
# (JWT route, per-user and per-IP leases in Redis), RATE messages/s per instance for
# DURATION seconds; a third of the way in, Redis is killed (SIGKILL) and restarted empty.
#
#   scripts/soak-cluster.sh            # 3 × 1,000 sockets, 1,000 msg/s each, 300 s
#   SOAK_SOCKETS=200 SOAK_DURATION=60 scripts/soak-cluster.sh   # a short run
#
# Reports: messages sent and lost and sessions dropped per instance (wsgate-bench's
# open-loop `latency` RESULT lines), how long each instance took to show
# wsgate_cluster_up 1 again after Redis restarted, and each instance's RSS every 30 s.
# Needs target/release/{wsgate,wsgate-bench} (built here), redis-server and curl.
# Loopback only; every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SOCKETS=${SOAK_SOCKETS:-1000}
RATE=${SOAK_RATE:-1000}
DURATION=${SOAK_DURATION:-300}
cargo build --release --locked --quiet -p wsgate -p wsgate-bench
WSGATE=target/release/wsgate
BENCH=target/release/wsgate-bench
WORK=$(mktemp -d)
PIDS=()
REDIS_PID=
cleanup() {
  for p in "${PIDS[@]}" $REDIS_PID; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

read -r REDIS_PORT P1 P2 P3 A1 A2 A3 < <("$BENCH" free-ports 7)
PORTS=("$P1" "$P2" "$P3")
ADMINS=("$A1" "$A2" "$A3")
start_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 200); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return
    sleep 0.05
  done
  echo "redis-server did not start" >&2
  exit 1
}
start_redis

"$BENCH" self-signed --cert "$WORK/server.crt" --key "$WORK/server.key"
head -c 32 /dev/urandom | base64 >"$WORK/jwt.secret"
for i in 0 1 2; do
  cat >"$WORK/gw$i.toml" <<CONF
[server]
listen = ["127.0.0.1:${PORTS[$i]}"]

[tls]
cert = "$WORK/server.crt"
key = "$WORK/server.key"

[admin]
listen = "127.0.0.1:${ADMINS[$i]}"

[log]
level = "warn"

[limits]
connection_rate_per_ip = "2000/s"
connection_burst_per_ip = 2000
max_connections_per_ip = 5000
max_connections_per_user = 5000

[jwt]
secret_file = "$WORK/jwt.secret"
issuer = "soak"
audience = ["soak"]

[[routes]]
name = "soak"
path = "/soak"
upstreams = ["builtin:echo"]
auth = "jwt"

[cluster]
redis = "redis://127.0.0.1:$REDIS_PORT/0"
key_prefix = "soak"
CONF
  "$WSGATE" run --config "$WORK/gw$i.toml" >"$WORK/gw$i.log" 2>&1 &
  PIDS+=($!)
done
GW_PIDS=("${PIDS[@]}")
for i in 0 1 2; do
  for _ in $(seq 200); do
    [[ "$(curl -fsS "http://127.0.0.1:${ADMINS[$i]}/metrics" 2>/dev/null | grep -E '^wsgate_cluster_up ' | awk '{print $2}')" == 1 ]] && break
    sleep 0.05
  done
done

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
echo "start: RSS KiB ${GW_PIDS[0]}=$(rss "${GW_PIDS[0]}") ${GW_PIDS[1]}=$(rss "${GW_PIDS[1]}") ${GW_PIDS[2]}=$(rss "${GW_PIDS[2]}")"

# One client process per instance, each from its own ten source addresses.
CLIENTS=()
for i in 0 1 2; do
  token=$("$WSGATE" token --sub "soak$i" --ttl 2h --config "$WORK/gw$i.toml")
  sources=$(seq -s, -f "127.0.$((i + 1)).%g" 1 10)
  "$BENCH" latency --url "wss://localhost:${PORTS[$i]}/soak" --ca "$WORK/server.crt" --token "$token" \
    --sources "$sources" --connections "$SOCKETS" --rate "$RATE" --warmup 3 --duration "$DURATION" \
    --tag "instance=gw$i" >"$WORK/client$i.out" 2>&1 &
  CLIENTS+=($!)
done

# A third of the way in: Redis killed and restarted empty.
sleep $((3 + DURATION / 3))
echo "Redis: SIGKILL and restart empty at $(date +%T)"
kill -9 "$REDIS_PID"
wait "$REDIS_PID" 2>/dev/null || true
sleep 2
start_redis
restarted=$(date +%s.%N)
for i in 0 1 2; do
  while [[ "$(curl -fsS "http://127.0.0.1:${ADMINS[$i]}/metrics" 2>/dev/null | grep -E '^wsgate_cluster_up ' | awk '{print $2}')" != 1 ]]; do
    sleep 0.1
  done
  echo "gw$i: wsgate_cluster_up back to 1 after $(echo "$(date +%s.%N) - $restarted" | bc -l | cut -c1-5) s"
done

# RSS every 30 s until the clients finish.
while kill -0 "${CLIENTS[0]}" 2>/dev/null || kill -0 "${CLIENTS[1]}" 2>/dev/null || kill -0 "${CLIENTS[2]}" 2>/dev/null; do
  echo "$(date +%T) RSS KiB gw0=$(rss "${GW_PIDS[0]}") gw1=$(rss "${GW_PIDS[1]}") gw2=$(rss "${GW_PIDS[2]}")"
  sleep 30
done
wait "${CLIENTS[@]}" || true
for i in 0 1 2; do
  grep -E '^RESULT' "$WORK/client$i.out" || { echo "client $i:"; tail -5 "$WORK/client$i.out"; }
  echo "gw$i: $(curl -fsS "http://127.0.0.1:${ADMINS[$i]}/metrics" | grep -E '^wsgate_closes_total|^wsgate_cluster_ops_total\{op="(admit|heartbeat|sync)"' | tr '\n' ' ')"
done
