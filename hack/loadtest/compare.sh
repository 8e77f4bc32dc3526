#!/usr/bin/env bash
# Throughput of two sidecar builds side by side in one run, e.g. before and after a change to
# the request path:
#
#   hack/loadtest/compare.sh <sidecar binary A> <sidecar binary B> [rounds]
#
# Each sidecar runs with one tokio worker pinned to core 0, next to an nginx upstream (also on
# core 0, keep-alive, answering from memory); wrk runs on core 1 with one valid key. The rounds
# alternate A and B so drifting machine load hits both alike; the median req/s of each and
# their ratio are printed (NGINX_TOO=1 adds nginx doing the same job), and each proxy's CPU time
# per request (user + system, from /proc: what a core's worth of req/s comes from, whichever
# side of the run is the bottleneck). UP_CORE=1 moves the upstream to wrk's core, leaving the
# proxy alone on core 0. Config: 1,000 keys in kubelet's `..data` layout. Needs wrk and nginx
# (apt-get install -y wrk nginx-light).
set -euo pipefail

A="${1:?sidecar binary A}"
B="${2:?sidecar binary B}"
ROUNDS="${3:-3}"
DURATION="${DURATION:-5s}"
CONNS="${CONNS:-32}"
UP_PORT=18281 A_PORT=18280 B_PORT=18282 N_PORT=18283 A_ADMIN=18290 B_ADMIN=18292
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
# shellcheck source=hack/loadtest/lib.sh
. "$(dirname "$0")/lib.sh"
lt_init compare
lt_config 1000
lt_upstream "$UP_PORT" "${UP_CORE:-0}"
# With NGINX_TOO=1, a third target: nginx doing the sidecar's job the way its best users would
# (one worker on core 0; a map of the same 1,000 keys, unknown -> 401; limit_req per key that
# never refuses, like the sidecar's limit here; upstream keep-alive with keepalive_requests
# raised on both sides so it never reconnects; the same forwarded headers).
if [ "${NGINX_TOO:-0}" = 1 ]; then
  {
    echo "daemon off; worker_processes 1; pid $WORK/proxy.pid; error_log $WORK/proxy.err;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; map_hash_max_size 65536; map_hash_bucket_size 128;"
    echo "  map \$http_x_api_key \$key_name { default \"\";"
    for i in $(seq 0 999); do echo "    \"loadtest-key-$i-0123456789abcdef\" key-$i;"; done
    echo "  }"
    echo "  limit_req_zone \$key_name zone=perkey:16m rate=1000000r/s;"
    echo "  upstream app { server 127.0.0.1:$UP_PORT; keepalive 64; keepalive_requests 10000000; }"
    echo "  server { listen 127.0.0.1:$N_PORT; keepalive_requests 10000000;"
    echo "    location / {"
    echo "      if (\$key_name = \"\") { return 401 '{\"error\":\"invalid_key\"}'; }"
    echo "      limit_req zone=perkey burst=1000000 nodelay;"
    echo "      proxy_http_version 1.1; proxy_set_header Connection \"\";"
    echo "      proxy_set_header X-KeyLimit-Key \$key_name;"
    echo "      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;"
    echo "      proxy_pass http://app; } } }"
  } >"$WORK/proxy.conf"
  taskset -c 0 "$NGINX" -c "$WORK/proxy.conf" -p "$WORK" & PIDS+=($!)
  N_MASTER=$!
fi
for side in A B; do
  bin=${!side}; port_var=${side}_PORT; admin_var=${side}_ADMIN
  TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 "$bin" --listen "127.0.0.1:${!port_var}" \
    --admin-listen "127.0.0.1:${!admin_var}" --upstream "http://127.0.0.1:$UP_PORT" \
    --config-dir "$WORK/config" --log-format text >"$WORK/$side.log" 2>&1 & PIDS+=($!)
  declare "${side}_PID=$!"
done
KEY="loadtest-key-7-0123456789abcdef"
ports="$A_PORT $B_PORT"; [ "${NGINX_TOO:-0}" = 1 ] && ports="$ports $N_PORT"
for port in $ports; do
  for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $KEY" "http://127.0.0.1:$port/")" = 200 ] && break
    sleep 0.1
  done
done
[ "${NGINX_TOO:-0}" = 1 ] && N_PID=$(pgrep -P "$N_MASTER" | head -1)
# CPU time (user + system, in clock ticks) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# run <port> <label>: one wrk round into $WORK/rps, with the proxy's CPU microseconds per
# request. A round with any non-2xx answer voids the comparison: a proxy answering errors fast
# would otherwise look like a fast proxy.
run() {
  local out non2xx pid_var=${2}_PID before after requests
  before=$(ticks "${!pid_var}")
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" -H "X-API-Key: $KEY" "http://127.0.0.1:$1/")
  after=$(ticks "${!pid_var}")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  if [ -n "$non2xx" ]; then
    echo "$2 (port $1): $non2xx non-2xx answers: the comparison is void" >&2
    return 1
  fi
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  echo "$2 $(awk '/Requests\/sec/ {print $2}' <<<"$out") $(( (after - before) * 1000000 / $(getconf CLK_TCK) * 100 / requests ))" >>"$WORK/rps"
}
for i in $(seq 1 "$ROUNDS"); do
  run "$A_PORT" A
  run "$B_PORT" B
  if [ "${NGINX_TOO:-0}" = 1 ]; then run "$N_PORT" N; fi
done
cat "$WORK/rps"
python3 - "$WORK/rps" <<'PY'
import statistics, sys
r = {"A": [], "B": [], "N": []}
cpu = {"A": [], "B": [], "N": []}
for line in open(sys.argv[1]):
    k, v, c = line.split()
    r[k].append(float(v))
    cpu[k].append(int(c) / 100)
a, b = statistics.median(r["A"]), statistics.median(r["B"])
ca, cb = statistics.median(cpu["A"]), statistics.median(cpu["B"])
print(f"median req/s: A {a:.0f}  B {b:.0f}  B/A = {b / a:.3f}")
print(f"median CPU per request: A {ca:.2f} us  B {cb:.2f} us  B/A = {cb / ca:.3f}")
if r["N"]:
    n, cn = statistics.median(r["N"]), statistics.median(cpu["N"])
    print(f"median req/s: nginx {n:.0f}  A/nginx = {a / n:.3f}  B/nginx = {b / n:.3f}")
    print(f"median CPU per request: nginx {cn:.2f} us  A/nginx = {ca / cn:.3f}  B/nginx = {cb / cn:.3f}")
PY
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load $(cut -d' ' -f1-3 /proc/loadavg)"
