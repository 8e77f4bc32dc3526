#!/usr/bin/env bash
# Side-by-side load test on loopback: upstream direct, through keylimit-sidecar, and through
# nginx doing the same job (map of valid keys + limit_req per key). Bounded: DURATION per run.
#
#   hack/loadtest/run.sh            # needs wrk and nginx (apt-get install -y wrk nginx-light)
#   DURATION=10s CONNS=32 KEYS=1000 hack/loadtest/run.sh
#   SHORT=1 hack/loadtest/run.sh    # CI smoke (hack/test.sh): 1 s per target; fails when a
#                                   # target answers anything but 2xx, never on a timing
#
# CPU split on a 2-core machine: core 0 runs the proxy under test and the upstream, core 1 runs
# wrk, so each proxy gets the same single core (sidecar: one tokio worker; nginx: one worker).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DURATION="${DURATION:-10s}"
[[ -n "${SHORT:-}" ]] && DURATION=1s
CONNS="${CONNS:-32}"
KEYS="${KEYS:-1000}"
UP_PORT=18081 SIDECAR_PORT=18080 ADMIN_PORT=18090 NGINX_PORT=18082
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
# shellcheck source=hack/loadtest/lib.sh
. "$(dirname "$0")/lib.sh"
lt_init load

echo "building the sidecar (as shipped: hack/build-sidecar.sh)..." >&2
BIN="$("$ROOT/hack/build-sidecar.sh")"

KEY="$LT_KEY"
lt_start_proxies "$KEYS" "$UP_PORT" "$NGINX_PORT" "$SIDECAR_PORT" "$ADMIN_PORT" "$BIN"

# wrk --latency prints the percentile table; report 50% and 99% and Requests/sec.
run() {
  local name=$1 port=$2 out
  out="$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "X-API-Key: $KEY" "http://127.0.0.1:$port/")"
  local rps p50 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  printf '%-10s %12s %10s %10s %8s\n' "$name" "$rps" "$p50" "$p99" "${non2xx:-0}"
  echo "$name $rps" >>"$WORK/rps"
  if [[ "${non2xx:-0}" != 0 ]] || ! awk -v r="$rps" 'BEGIN { exit !(r > 0) }'; then
    echo "$name: ${non2xx:-0} non-2xx answers, $rps req/s: the comparison is void" >&2
    exit 1
  fi
}
printf '%-10s %12s %10s %10s %8s\n' target req/s p50 p99 non2xx
run direct $UP_PORT
run sidecar $SIDECAR_PORT
run nginx $NGINX_PORT
awk '{r[$1]=$2} END {printf "sidecar/nginx = %.2fx   sidecar/direct = %.2fx   nginx/direct = %.2fx\n", r["sidecar"]/r["nginx"], r["sidecar"]/r["direct"], r["nginx"]/r["direct"]}' "$WORK/rps"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); duration $DURATION, $CONNS connections, $KEYS keys"
