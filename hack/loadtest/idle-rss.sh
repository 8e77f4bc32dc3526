#!/usr/bin/env bash
# Idle memory of the shipped sidecar (profile `sidecar`) with a small config (lib.sh's policy with KEYS keys,
# default 10): start it, wait for its admin /readyz, send 100 requests over one keep-alive
# connection, then print VmRSS (resident now) and VmHWM (peak resident) from /proc, with the
# anonymous/file split (file = the binary's own pages). Twice: with tokio's default worker count
# (one per CPU: $(nproc) here) and with TOKIO_WORKER_THREADS=1. nginx doing the same job
# (lib.sh's proxy config, one worker) is measured the same way, master and worker, for context.
#
#   hack/loadtest/idle-rss.sh           # issue 15's target: idle RSS with a small config <= 8 MB
#   SIDECAR_BIN=path/to/keylimit-sidecar hack/loadtest/idle-rss.sh   # a given binary, no build
#   SHORT=1 hack/loadtest/idle-rss.sh   # CI (hack/test.sh): the same run; fails only if a
#                                       # request is not answered 200, never on a size
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
KEYS="${KEYS:-10}"
UP_PORT=18281 SIDECAR_PORT=18280 ADMIN_PORT=18290 NGINX_PORT=18282
# shellcheck source=hack/loadtest/lib.sh
. "$(dirname "$0")/lib.sh"
lt_init idle-rss

# SIDECAR_BIN: measure a given binary (e.g. built from a fixed commit) as is.
if [[ -z "${SIDECAR_BIN:-}" ]]; then
  echo "building the sidecar (as shipped: hack/build-sidecar.sh)..." >&2
  SIDECAR_BIN="$("$ROOT/hack/build-sidecar.sh")"
fi
BIN="$SIDECAR_BIN"

KEY="loadtest-key-0-0123456789abcdef"
lt_config "$KEYS"
lt_upstream "$UP_PORT"
lt_nginx_proxy "$KEYS" "$NGINX_PORT" "$UP_PORT"
lt_wait_ok $UP_PORT "$KEY"

# mem <label> <pid>: one line from /proc/<pid>/status, in MiB.
mem() {
  awk -v l="$1" '
    /^(VmRSS|VmHWM|RssAnon|RssFile|Threads):/ { v[$1] = $2 }
    END { printf "%-28s VmRSS %6.2f MiB  VmHWM %6.2f MiB  (anon %6.2f, file %6.2f)  threads %s\n",
          l, v["VmRSS:"] / 1024, v["VmHWM:"] / 1024, v["RssAnon:"] / 1024, v["RssFile:"] / 1024, v["Threads:"] }
  ' "/proc/$2/status"
}

# hundred <port>: 100 GETs on one keep-alive connection; fails unless all are 200.
hundred() {
  local n
  n=$(for _ in $(seq 1 100); do echo "url = \"http://127.0.0.1:$1/\""; echo "output = /dev/null"; done |
    curl -s -K - -H "X-API-Key: $KEY" -w '%{http_code}\n' | grep -c '^200$' || true)
  [[ $n == 100 ]] || { echo "port $1: $n of 100 requests answered 200" >&2; exit 1; }
}

sidecar() { # sidecar <label> [env...]: start, wait ready, measure, send 100, measure, stop
  local label=$1 pid ready=0
  shift
  env "$@" RUST_LOG=warn "$BIN" --listen 127.0.0.1:$SIDECAR_PORT \
    --admin-listen 127.0.0.1:$ADMIN_PORT --upstream http://127.0.0.1:$UP_PORT \
    --config-dir "$WORK/config" --log-format text &
  pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 100); do # bounded: 10 s
    if curl -sf -o /dev/null "http://127.0.0.1:$ADMIN_PORT/readyz"; then ready=1; break; fi
    sleep 0.1
  done
  [[ $ready == 1 ]] || { echo "sidecar ($label) not ready after 10 s" >&2; exit 1; }
  mem "sidecar $label, ready" "$pid"
  hundred $SIDECAR_PORT
  mem "sidecar $label, +100 req" "$pid"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

echo "keys: $KEYS; binary: $(du -h "$BIN" | cut -f1) on disk"
sidecar "default workers"
sidecar "1 worker" TOKIO_WORKER_THREADS=1

"$NGINX" -c "$WORK/proxy.conf" -p "$WORK" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
lt_wait_ok $NGINX_PORT "$KEY"
hundred $NGINX_PORT
mem "nginx master" "$NGINX_PID"
for w in $(cat "/proc/$NGINX_PID/task/$NGINX_PID/children"); do mem "nginx worker" "$w"; done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg)"
