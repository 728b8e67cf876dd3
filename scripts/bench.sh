#!/usr/bin/env bash
# The bench command: wsgate against nginx and against a direct wss echo, on loopback.
#
#   scripts/bench.sh                  # full run: 3 repeats of 5 s measurements (about 8 minutes)
#   BENCH_QUICK=1 scripts/bench.sh    # smoke run: 1 repeat of 1 s measurements (about 1.5 minutes)
#
# Environment (defaults in brackets, quick-mode defaults after the slash):
#   BENCH_REPEAT [3/1]          runs of each measurement per target; the table shows medians
#   BENCH_DURATION [5/1]        seconds measured per throughput, latency and handshake run
#   BENCH_WARMUP [1/0.5]        seconds of traffic before each measuring window
#   BENCH_HOLD [3/1]            seconds the idle sockets are held before the echo check
#   BENCH_IDLE_COUNTS ["1000 9000"]  idle socket counts
#   BENCH_TARGETS ["direct wsgate nginx"]
#   BENCH_TESTS ["tp16 tp1 hs hsr lat many http fwd idle features hosts chat"]  measurements to run (a subset for focused A/B runs)
#   BENCH_MANY [4000/1000]      sockets of the many-sockets row, each sending 1 msg/s
#   BENCH_MANY_DURATION [20/3]  seconds measured in the many-sockets row
#   BENCH_SKIP_BUILD=1          use the binaries already in target/release
#
# Three targets stand in front of ONE plain-ws echo backend (`wsgate echo`, its own process):
#   direct  `wsgate-bench tls-echo`: an echo that speaks wss itself, the ceiling
#   wsgate  `wsgate run`: route /echo → ws://echo with JWT (HS256) auth, limits and firewall
#   nginx   Debian's nginx as a TLS 1.3 WebSocket reverse proxy with the same certificate
# Measurements (targets interleaved, each repeated): throughput at 16 and 1 messages in flight
# (64 connections × 64 B), handshakes/s with 32 concurrent clients (full TLS handshakes, and
# resumed ones for returning clients), p99 latency at 5000 msg/s
# over 64 connections (open loop), many mostly idle sockets (`many`: BENCH_MANY sockets at 1 msg/s
# each, open loop: p99 and CPU per message), plain HTTP requests/s through an `http = true` route (`http`:
# 64 kept-alive TLS connections, one small GET in flight each, to `wsgate-bench http-app`, its
# own process, which answers 200 with 64 bytes; nginx proxies the same app with upstream
# keepalive; no direct target), and idle memory per socket at 1000 and 9000 sockets (server
# RSS, nginx master + workers, with the target restarted fresh for each reading).
# Forward auth (`fwd`, wsgate only: nginx's auth_request has no identity, cache or recheck of its
# own to compare): handshakes/s as in the `hs` row (same client, 32 concurrent, same wsgate
# process, interleaved with it) on two `auth = "forward"` routes whose endpoint is
# `wsgate-bench auth-app` (its own process, hyper: 200 with `x-user-id: bench` for the cookie
# `session=bench`, else 401), the client sending that cookie: one provider with `cache = "30s"`
# (every client carries the same cookie, so after the first check each handshake is a cache hit)
# and one with `cache = "0s"` (one HTTP round trip to the endpoint per connection), against the
# JWT route of the `hs` row.
# Features (wsgate only, restarted with client_ca and two more routes): JSON throughput through
# a route with [routes.validate] (config/chat.schema.json) against the same messages on a
# route without it, and handshakes/s with a client certificate on an `auth = "mtls"` route
# against the JWT route without one. Hosts (wsgate only): handshakes/s with SNI and Host
# `localhost`, with two certificates ([[tls.certificates]]) and 50 more routes over 10 hosts,
# against the one-certificate, one-route config. Chat (wsgate only): ~300-byte JSON chat
# messages echoed over 32 connections (`wsgate-bench chat`, its own permessage-deflate client)
# without compression, with it (the default: no context takeover) and on a route with
# `context_takeover = true`: bytes on the wire per message (TCP, TLS included) and server CPU
# per message; and server memory per idle socket at 1000 sockets with and without it.
#
# Kernel crossings: the throughput and many-sockets rows also give each target's system calls
# per message (`perf stat -e raw_syscalls:sys_enter` on its processes, when perf is installed
# and may attach; else left out) and context switches per message (/proc, every thread).
#
# Output: the table on stdout and in target/bench/results.md, every RESULT line in
# target/bench/raw.txt, server and client logs in target/bench/logs/.
# Installs nginx with apt-get when it is missing (needs root). Only loopback addresses are used;
# every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ${BENCH_QUICK:-0} == 1 ]]; then
  REPEAT=${BENCH_REPEAT:-1} DURATION=${BENCH_DURATION:-1} WARMUP=${BENCH_WARMUP:-0.5} HOLD=${BENCH_HOLD:-1}
else
  REPEAT=${BENCH_REPEAT:-3} DURATION=${BENCH_DURATION:-5} WARMUP=${BENCH_WARMUP:-1} HOLD=${BENCH_HOLD:-3}
fi
IDLE_COUNTS=${BENCH_IDLE_COUNTS:-"1000 9000"}
if [[ ${BENCH_QUICK:-0} == 1 ]]; then
  MANY=${BENCH_MANY:-1000} MANY_DURATION=${BENCH_MANY_DURATION:-3}
else
  MANY=${BENCH_MANY:-4000} MANY_DURATION=${BENCH_MANY_DURATION:-20}
fi
# Messages per connection in each chat run (32 connections, one in flight each).
CHAT_MESSAGES=$((${DURATION%.*} * 400))
TARGETS=${BENCH_TARGETS:-"direct wsgate nginx"}
TESTS=" ${BENCH_TESTS:-tp16 tp1 hs hsr lat many http fwd idle features hosts chat} "
wants() { [[ $TESTS == *" $1 "* ]]; }
SOURCES=$(seq -s, -f '127.0.0.%g' 1 20)

OUT=target/bench
LOGS=$OUT/logs
RAW=$OUT/raw.txt
WSGATE=target/release/wsgate
BENCH=target/release/wsgate-bench

say() { printf '%s\n' "$*" >&2; }
die() {
  say "bench: $*"
  exit 1
}

# --- nginx ----------------------------------------------------------------------------------
NGINX=$(command -v nginx || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
if [[ -z $NGINX ]]; then
  say "bench: installing Debian's nginx"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq nginx >/dev/null
  NGINX=/usr/sbin/nginx
  [[ -x $NGINX ]] || die "nginx did not install"
fi

# --- build ----------------------------------------------------------------------------------
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  say "bench: cargo build --release -p wsgate -p wsgate-bench"
  cargo build --release --quiet -p wsgate -p wsgate-bench
fi
[[ -x $WSGATE && -x $BENCH ]] || die "missing $WSGATE or $BENCH"

# Every socket is a file descriptor: 9000 proxied sockets are 18000 in wsgate and nginx.
ulimit -n "$(ulimit -Hn)"

mkdir -p "$OUT"
rm -rf "$LOGS"
mkdir -p "$LOGS"
: >"$RAW"
WORK=$(mktemp -d /tmp/wsgate-bench.XXXXXX)

# --- processes ------------------------------------------------------------------------------
declare -A PID=()

children_of() { ps -o pid= --ppid "$1" 2>/dev/null || true; }

stop() {
  local name=$1 pid=${PID[$1]:-} kids i
  [[ -n $pid ]] || return 0
  kids=$(children_of "$pid")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # nginx workers leave with their master; make sure (they are ours, by id).
  for i in $kids; do kill -KILL "$i" 2>/dev/null || true; done
  unset "PID[$name]"
}

cleanup() {
  local name
  for name in "${!PID[@]}"; do stop "$name"; done
  [[ -f $WORK/nginx/error.log ]] && cp "$WORK/nginx/error.log" "$LOGS/nginx-error.log"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {
  local port=$1 pid=$2 i
  for ((i = 0; i < 200; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  return 1
}

port_of() {
  case $1 in
    echo) echo "$ECHO_PORT" ;;
    app) echo "$APP_PORT" ;;
    direct) echo "$DIRECT_PORT" ;;
    wsgate) echo "$WSGATE_PORT" ;;
    nginx) echo "$NGINX_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
    auth) echo "$AUTH_PORT" ;;
  esac
}

start() {
  local name=$1
  case $name in
    echo) "$WSGATE" echo --listen "127.0.0.1:$ECHO_PORT" >>"$LOGS/echo.log" 2>&1 & ;;
    app) "$BENCH" http-app --listen "127.0.0.1:$APP_PORT" --size 64 >>"$LOGS/app.log" 2>&1 & ;;
    direct) "$BENCH" tls-echo --listen "127.0.0.1:$DIRECT_PORT" --cert "$CERT" --key "$KEY" >>"$LOGS/direct.log" 2>&1 & ;;
    wsgate) "$WSGATE" run --config "$WSGATE_CONFIG" >>"$LOGS/wsgate.log" 2>&1 & ;;
    nginx) "$NGINX" -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" >>"$LOGS/nginx.log" 2>&1 & ;;
    auth) "$BENCH" auth-app --listen "127.0.0.1:$AUTH_PORT" --cookie "$AUTH_COOKIE" --user bench >>"$LOGS/auth.log" 2>&1 & ;;
    redis) redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >>"$LOGS/redis.log" 2>&1 & ;;
  esac
  PID[$name]=$!
  wait_port "$(port_of "$name")" "${PID[$name]}" || die "$name did not start (see $LOGS/$name.log)"
}

restart() {
  stop "$1"
  start "$1"
}

# --- certificate, secret, ports -------------------------------------------------------------
CERT=$WORK/server.crt KEY=$WORK/server.key
"$BENCH" self-signed --cert "$CERT" --key "$KEY"
(umask 077 && head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$WORK/jwt.secret")
read -r ECHO_PORT DIRECT_PORT WSGATE_PORT ADMIN_PORT NGINX_PORT REDIS_PORT APP_PORT AUTH_PORT < <("$BENCH" free-ports 8)
# The session cookie of the forward-auth rows (what auth-app admits).
AUTH_COOKIE=session=bench

# --- wsgate config --------------------------------------------------------------------------
# write_wsgate_config FILE SECURITY: SECURITY=1 includes the firewall and the per-IP, per-user
# and message-rate limits (generous: they must cost their checks, never refuse the bench).
write_wsgate_config() {
  local file=$1 security=$2 c=''
  [[ $security == 1 ]] || c='# '
  cat >"$file" <<EOF
# Generated by scripts/bench.sh: wsgate in front of the bench's echo backend.
[server]
listen = ["127.0.0.1:$WSGATE_PORT"]
handshake_timeout = "5s"
max_request_head = "16KiB"
idle_timeout = "5m"
ping_interval = "30s"
max_connections = 20000
shutdown_grace = "2s"
upstream_timeout = "10s"

[tls]
cert = "$CERT"
key = "$KEY"
self_signed_if_missing = false
min_version = "1.3"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[log]
format = "text"
level = "warn"

[limits]
max_message_size = "1MiB"
max_frame_size = "256KiB"
# --- security limits (firewall/limits issue): commented out when this build's \`wsgate check\` refuses them
${c}connection_rate_per_ip = "50000/s"
${c}connection_burst_per_ip = 50000
${c}max_connections_per_ip = 20000
${c}ipv6_prefix = 64
${c}message_rate = "1000000/s"
${c}message_burst = 1000000
${c}max_connections_per_user = 20000
${c}auth_failures_per_ip = 1000
${c}auth_failure_window = "1m"
${c}auth_ban = "10s"
${c}http_rate_per_ip = "1000000/s"
${c}http_burst_per_ip = 1000000

# --- firewall (firewall/limits issue): a few deny rules, none matching 127.0.0.0/8
${c}[firewall]
${c}default = "allow"
${c}allow = []
${c}deny = ["10.0.0.0/8", "172.16.0.0/12", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]

[jwt]
algorithms = ["HS256"]
secret_file = "$WORK/jwt.secret"
issuer = "wsgate-bench"
audience = ["wsgate"]
leeway = "30s"
required_claims = ["exp", "sub"]
token_sources = ["authorization"]
close_on_expiry = true

[[routes]]
name = "echo"
path = "/echo"
upstreams = ["ws://127.0.0.1:$ECHO_PORT"]
auth = "jwt"
forward_token = false

# The HTTP row: plain requests through the same admission (JWT, firewall, per-IP rate).
[[routes]]
name = "http"
path = "/http"
upstreams = ["ws://127.0.0.1:$APP_PORT"]
auth = "jwt"
http = true

# The chat rows: permessage-deflate keeping its context between messages.
[[routes]]
name = "keep"
path = "/keep"
upstreams = ["ws://127.0.0.1:$ECHO_PORT"]
auth = "jwt"
context_takeover = true
EOF
  # The forward-auth rows: the same echo behind the app's own endpoint (auth-app).
  wants fwd && cat >>"$file" <<EOF

[providers.appcache]
kind = "forward"
url = "http://127.0.0.1:$AUTH_PORT/ws-auth"
identity_header = "x-user-id"
copy_headers = ["x-user-id"]
cache = "30s"
timeout = "2s"

[providers.appnocache]
kind = "forward"
url = "http://127.0.0.1:$AUTH_PORT/ws-auth"
identity_header = "x-user-id"
copy_headers = ["x-user-id"]
cache = "0s"
timeout = "2s"

[[routes]]
name = "fwd_cache"
path = "/fwd-cache"
upstreams = ["ws://127.0.0.1:$ECHO_PORT"]
auth = "forward"
provider = "appcache"

[[routes]]
name = "fwd_nocache"
path = "/fwd-nocache"
upstreams = ["ws://127.0.0.1:$ECHO_PORT"]
auth = "forward"
provider = "appnocache"
EOF
  return 0
}

WSGATE_CONFIG=$WORK/wsgate.toml
SECURITY=included
write_wsgate_config "$WSGATE_CONFIG" 1
if ! "$WSGATE" check --config "$WSGATE_CONFIG" >"$LOGS/wsgate-check.log" 2>&1; then
  say "bench: NOTE: this wsgate build refuses the [firewall] / per-IP / message-rate keys; running without them:"
  grep -v '^warning' "$LOGS/wsgate-check.log" | head -3 | sed 's/^/bench:   /' >&2
  SECURITY="not supported by this build ($(grep -m1 -o 'config error: .*' "$LOGS/wsgate-check.log" | cut -c1-120))"
  write_wsgate_config "$WSGATE_CONFIG" 0
  "$WSGATE" check --config "$WSGATE_CONFIG" >>"$LOGS/wsgate-check.log" 2>&1 || die "wsgate check fails on the bench config: $(tail -3 "$LOGS/wsgate-check.log")"
fi
TOKEN=$("$WSGATE" token --sub bench --ttl 2h --config "$WSGATE_CONFIG")

# --- nginx config ---------------------------------------------------------------------------
# worker_rlimit_nofile 40000, or the hard limit when lower (raising it past the hard limit
# needs CAP_SYS_RESOURCE, which containers often lack; nginx would only log an alert).
NOFILE=40000
[[ $(ulimit -Hn) == unlimited ]] || ((NOFILE <= $(ulimit -Hn))) || NOFILE=$(ulimit -Hn)
mkdir -p "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<EOF
# Generated by scripts/bench.sh: nginx as a TLS-terminating WebSocket reverse proxy.
worker_processes auto;
worker_rlimit_nofile $NOFILE;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
daemon off;

events {
    worker_connections 20000;
}

http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;

    upstream http_app {
        server 127.0.0.1:$APP_PORT;
        keepalive 64;
        keepalive_requests 10000000;
    }

    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      close;
    }

    server {
        listen 127.0.0.1:$NGINX_PORT ssl;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_timeout 1h;

        location /echo {
            proxy_pass http://127.0.0.1:$ECHO_PORT;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }

        # The HTTP row: the same app as wsgate's http route, upstream connections kept alive,
        # client connections too for the whole run (nginx closes one after 1000 requests by default).
        location /http {
            keepalive_requests 10000000;
            keepalive_timeout 300s;
            proxy_pass http://http_app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto https;
        }
    }
}
EOF
"$NGINX" -t -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" >"$LOGS/nginx-t.log" 2>&1 ||
  die "nginx -t failed: $(tail -3 "$LOGS/nginx-t.log")"

# --- runs -----------------------------------------------------------------------------------
url_of() { echo "wss://${URL_HOST:-127.0.0.1}:$(port_of "$1")${URL_PATH:-/echo}"; }
field() { grep -o "\"$1\":[^,}]*" <<<"$2" | head -1 | cut -d: -f2- | tr -d '"'; }

RUN=0
# measure TARGET TEST SUBCOMMAND [ARGS...]: one run; its RESULT line goes to raw.txt.
measure() {
  local target=$1 test=$2 out line summary
  shift 2
  RUN=$((RUN + 1))
  out=$("$BENCH" "$@" --url "$(url_of "$target")" --ca "$CERT" --token "$TOKEN" \
    --tag "target=$target" --tag "test=$test" --tag "run=$RUN" </dev/null 2>>"$LOGS/bench-client.log") || true
  line=$(grep '^RESULT ' <<<"$out" | tail -1 || true)
  if [[ -z $line ]]; then
    say "  [$RUN] $test $target: FAILED (see $LOGS/bench-client.log)"
    return 0
  fi
  printf '%s\n' "$line" >>"$RAW"
  case $1 in
    throughput) summary="$(field msgs_per_s "$line") msg/s, $(field mismatches "$line") mismatches, $(field errors "$line") errors" ;;
    latency) summary="p50 $(field p50_ms "$line") ms, p99 $(field p99_ms "$line") ms, p99.9 $(field p999_ms "$line") ms, lost $(field lost "$line")" ;;
    handshakes) summary="$(field per_s "$line")/s, p99 $(field p99_ms "$line") ms, failed $(field failed "$line")" ;;
    http) summary="$(field per_s "$line") req/s, p99 $(field p99_ms "$line") ms, errors $(field errors "$line")" ;;
  esac
  case $1 in
    throughput | latency | handshakes | http)
      summary+="; server CPU $(field server_cpu_pct "$line")% ($(field server_cpu_us_per_unit "$line") µs each), client $(field client_cpu_pct "$line")%"
      [[ $1 == throughput || $1 == latency ]] &&
        summary+=", per message $(field server_syscalls_per_unit "$line") syscalls, $(field server_ctx_per_unit "$line") context switches"
      ;;
    idle) summary="$(field kb_per_socket "$line") KB/socket, $(field echoed "$line")/$(field count "$line") echoed, opened in $(field open_s "$line") s" ;;
    chat) if [[ $* == *--idle* ]]; then
        summary="$(field kb_per_socket "$line") KB/socket, deflate $(field deflate "$line")"
      else
        summary="$(field wire_per_msg "$line") B/msg on the wire ($(field wire_ratio "$line") of payload), server $(field server_cpu_us_per_unit "$line") µs/msg, deflate $(field deflate "$line")"
      fi ;;
  esac
  say "  [$RUN] $test $target: $summary"
}

say "bench: repeat=$REPEAT duration=${DURATION}s warmup=${WARMUP}s targets: $TARGETS; security config: $SECURITY"
start echo
wants http && start app
wants fwd && start auth
for t in $TARGETS; do start "$t"; done

for ((r = 1; r <= REPEAT; r++)); do
  say "bench: round $r/$REPEAT"
  wants tp16 && for t in $TARGETS; do
    measure "$t" tp16 throughput --connections 64 --size 64 --inflight 16 --duration "$DURATION" --warmup "$WARMUP" \
      --cpu-pid "${PID[$t]}"
  done
  wants tp1 && for t in $TARGETS; do
    measure "$t" tp1 throughput --connections 64 --size 64 --inflight 1 --duration "$DURATION" --warmup "$WARMUP" \
      --cpu-pid "${PID[$t]}"
  done
  wants hs && for t in $TARGETS; do
    measure "$t" hs handshakes --concurrency 32 --duration "$DURATION" --warmup "$WARMUP" --sources "$SOURCES" \
      --cpu-pid "${PID[$t]}"
  done
  # Forward auth (wsgate only): the hs measurement on the forward routes, cookie sent.
  wants fwd && [[ " $TARGETS " == *" wsgate "* ]] && for variant in cache nocache; do
    URL_PATH=/fwd-$variant measure wsgate "fwd-$variant" handshakes --header "cookie: $AUTH_COOKIE" --concurrency 32 \
      --duration "$DURATION" --warmup "$WARMUP" --sources "$SOURCES" --cpu-pid "${PID[wsgate]}"
  done
  # Returning clients: each client keeps its TLS session (tickets or the session cache).
  wants hsr && for t in $TARGETS; do
    measure "$t" hsr handshakes --resume --concurrency 32 --duration "$DURATION" --warmup "$WARMUP" --sources "$SOURCES" \
      --cpu-pid "${PID[$t]}"
  done
  wants lat && for t in $TARGETS; do
    measure "$t" lat latency --connections 64 --rate 5000 --duration "$DURATION" --warmup "$WARMUP" \
      --cpu-pid "${PID[$t]}"
  done
  # Many sockets, mostly idle: each sends one message a second (what delays a message when
  # thousands of sockets wait).
  wants many && for t in $TARGETS; do
    measure "$t" many latency --connections "$MANY" --rate "$MANY" --duration "$MANY_DURATION" --warmup "$WARMUP" \
      --sources "$SOURCES" --cpu-pid "${PID[$t]}"
  done
  # Plain HTTP: only wsgate and nginx proxy it (direct is a WebSocket echo).
  wants http && for t in $TARGETS; do
    [[ $t == direct ]] && continue
    URL_PATH=/http measure "$t" http http --connections 64 --duration "$DURATION" --warmup "$WARMUP" \
      --cpu-pid "${PID[$t]}"
  done
done

# Idle memory: each reading on a freshly started target, so memory freed by earlier runs and
# kept by the allocator does not hide the cost of new sockets.
wants idle && for ((r = 1; r <= REPEAT; r++)); do
  for n in $IDLE_COUNTS; do
    for t in $TARGETS; do
      restart "$t"
      measure "$t" "idle-$n" idle --count "$n" --hold "$HOLD" --sources "$SOURCES" --rss-pid "${PID[$t]}"
    done
  done
done

# Chat: JSON messages of ~300 B with and without permessage-deflate (wsgate only).
if wants chat && [[ " $TARGETS " == *" wsgate "* ]]; then
  say "bench: chat (permessage-deflate)"
  for ((r = 1; r <= REPEAT; r++)); do
    for variant in plain deflate keep; do
      args=(--connections 32 --messages "$CHAT_MESSAGES" --cpu-pid "${PID[wsgate]}")
      [[ $variant == plain ]] || args+=(--deflate)
      path=/echo
      [[ $variant == keep ]] && path=/keep
      URL_PATH=$path measure wsgate "chat-$variant" chat "${args[@]}"
    done
  done
  for ((r = 1; r <= REPEAT; r++)); do
    for variant in plain deflate; do
      restart wsgate
      args=(--idle --connections 1000 --rss-pid "${PID[wsgate]}")
      [[ $variant == plain ]] || args+=(--deflate)
      measure wsgate "chat-idle-$variant" chat "${args[@]}"
    done
  done
fi

# Features: one wsgate with client certificates accepted (optional) and two more routes.
if wants features && [[ " $TARGETS " == *" wsgate "* ]]; then
  say "bench: features (wsgate restarted with client_ca, a validated route and an mtls route)"
  "$WSGATE" dev-client-cert --name bench --dir "$WORK/pki" >>"$LOGS/wsgate-check.log" 2>&1 ||
    die "wsgate dev-client-cert failed (see $LOGS/wsgate-check.log)"
  FEATURES_CONFIG=$WORK/wsgate-features.toml
  sed "s|^min_version = \"1.3\"\$|&\nclient_ca = \"$WORK/pki/client-ca.crt\"\nclient_auth = \"optional\"|" \
    "$WSGATE_CONFIG" >"$FEATURES_CONFIG"
  cat >>"$FEATURES_CONFIG" <<EOF

[[routes]]
name = "json"
path = "/json"
upstreams = ["ws://127.0.0.1:$ECHO_PORT"]
auth = "jwt"

[routes.validate]
schema_file = "$(pwd)/config/chat.schema.json"

[[routes]]
name = "mtls"
path = "/mtls"
upstreams = ["ws://127.0.0.1:$ECHO_PORT"]
auth = "mtls"
EOF
  "$WSGATE" check --config "$FEATURES_CONFIG" >>"$LOGS/wsgate-check.log" 2>&1 ||
    die "wsgate check fails on the features config: $(tail -3 "$LOGS/wsgate-check.log")"
  WSGATE_CONFIG=$FEATURES_CONFIG restart wsgate
  CLIENT_CERT=(--cert "$WORK/pki/bench.crt" --key "$WORK/pki/bench.key")
  for ((r = 1; r <= REPEAT; r++)); do
    for path in /echo /json; do
      test=feat-json-plain
      [[ $path == /json ]] && test=feat-json-valid
      URL_PATH=$path measure wsgate "$test" throughput --json --connections 64 --size 64 --inflight 16 \
        --duration "$DURATION" --warmup "$WARMUP" --cpu-pid "${PID[wsgate]}"
    done
    measure wsgate feat-hs-plain handshakes --concurrency 32 --duration "$DURATION" --warmup "$WARMUP" \
      --sources "$SOURCES" --cpu-pid "${PID[wsgate]}"
    URL_PATH=/mtls measure wsgate feat-hs-mtls handshakes "${CLIENT_CERT[@]}" --concurrency 32 \
      --duration "$DURATION" --warmup "$WARMUP" --sources "$SOURCES" --cpu-pid "${PID[wsgate]}"
  done
  # Cluster mode: the same config with [cluster] on a local redis-server (one Redis call for
  # the client address and one for the user per connection).
  if command -v redis-server >/dev/null 2>&1; then
    start redis
    CLUSTER_CONFIG=$WORK/wsgate-cluster.toml
    { cat "$FEATURES_CONFIG"; printf '\n[cluster]\nredis = "redis://127.0.0.1:%s/0"\ntimeout = "50ms"\n' "$REDIS_PORT"; } >"$CLUSTER_CONFIG"
    WSGATE_CONFIG=$CLUSTER_CONFIG restart wsgate
    for ((r = 1; r <= REPEAT; r++)); do
      measure wsgate feat-hs-cluster handshakes --concurrency 32 --duration "$DURATION" --warmup "$WARMUP" \
        --sources "$SOURCES" --cpu-pid "${PID[wsgate]}"
    done
    stop redis
  else
    say "bench: redis-server missing: no cluster-mode row (scripts/setup-system.sh installs it)"
  fi
fi

# Hosts: certificates chosen by SNI, routing by host, the 421 check, against one certificate.
if wants hosts && [[ " $TARGETS " == *" wsgate "* ]]; then
  say "bench: hosts (2 certificates and 50 routes over 10 hosts vs 1 certificate and 1 route)"
  "$BENCH" self-signed --cert "$WORK/second.crt" --key "$WORK/second.key"
  HOSTS_CONFIG=$WORK/wsgate-hosts.toml
  {
    grep -v -e '^cert = ' -e '^key = ' "$WSGATE_CONFIG"
    printf '\n[[tls.certificates]]\ncert = "%s"\nkey = "%s"\n' "$CERT" "$KEY"
    printf '\n[[tls.certificates]]\ncert = "%s"\nkey = "%s"\n' "$WORK/second.crt" "$WORK/second.key"
    for h in $(seq 0 9); do
      for r in $(seq 0 4); do
        printf '\n[[routes]]\nname = "h%s_r%s"\nhost = "h%s.bench.test"\npath = "/r%s"\nupstreams = ["ws://127.0.0.1:%s"]\nauth = "jwt"\n' \
          "$h" "$r" "$h" "$r" "$ECHO_PORT"
      done
    done
  } >"$HOSTS_CONFIG"
  "$WSGATE" check --config "$HOSTS_CONFIG" >>"$LOGS/wsgate-check.log" 2>&1 ||
    die "wsgate check fails on the hosts config: $(tail -3 "$LOGS/wsgate-check.log")"
  for ((r = 1; r <= REPEAT; r++)); do
    for variant in one hosts; do
      config=$WSGATE_CONFIG
      [[ $variant == hosts ]] && config=$HOSTS_CONFIG
      WSGATE_CONFIG=$config restart wsgate
      URL_HOST=localhost measure wsgate "hs-$variant" handshakes --concurrency 32 --duration "$DURATION" \
        --warmup "$WARMUP" --sources "$SOURCES" --cpu-pid "${PID[wsgate]}"
    done
  done
fi

for t in $TARGETS; do stop "$t"; done
stop echo
stop app
stop auth
[[ -f $LOGS/auth.log ]] && say "bench: $(tail -1 "$LOGS/auth.log")"

# --- report ---------------------------------------------------------------------------------
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
git diff --quiet HEAD 2>/dev/null || commit="$commit + uncommitted changes"
{
  echo "# wsgate benchmark"
  echo
  echo "- $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, $($WSGATE --version), $("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
  echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(uname -r); client and servers share the cores"
  echo "- $REPEAT run(s) per cell, ${DURATION} s measured after ${WARMUP} s warm-up; idle sockets held ${HOLD} s; TLS 1.3, a full handshake per connection (no resumption); every echo byte-compared"
  echo "- wsgate: JWT (HS256) on the route, [limits] sizes; firewall and per-IP/per-user/message-rate limits: $SECURITY"
  echo "- memory: server VmRSS at READY minus before (nginx: master + workers), per socket; socket buffers are kernel memory and not included"
  echo
  "$BENCH" report --raw "$RAW"
} >"$OUT/results.md"
echo
cat "$OUT/results.md"
say "bench: table in $OUT/results.md, RESULT lines in $RAW, logs in $LOGS/"
