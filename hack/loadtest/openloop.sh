#!/usr/bin/env bash
# Open-loop latency on loopback: the upstream direct, through keylimit-sidecar, and through nginx
# doing the same job (lib.sh's fair setup: 1,000-key map + limit_req per key, upstream
# keepalive, keepalive_requests raised on both sides, the same forwarded headers). Requests are
# sent at a fixed rate whatever the answers do, and latency counts from each request's intended
# send time (tests/src/bin/openloop.rs), so queueing shows. "added" = proxy minus direct, from
# the same round.
#
#   hack/loadtest/openloop.sh                       # RATES="5000 15000", DURATION=10s, RUNS=1
#   RUNS=3 RATES="5000 15000" DURATION=10s hack/loadtest/openloop.sh   # medians of 3 rounds
#   SIDECAR_BIN=... OPENLOOP_BIN=... hack/loadtest/openloop.sh   # given binaries, no build
#   SHORT=1 hack/loadtest/openloop.sh   # CI smoke (hack/test.sh): 1 s per target at 1000 req/s;
#                                       # fails on errors or non-2xx, never on a timing
#
# CPU split as in run.sh: core 0 runs the proxy under test and the upstream (sidecar: one tokio
# worker; nginx: one worker), core 1 runs the generator, which keeps its core busy on purpose
# (it polls instead of sleeping on millisecond timers).
#
# Disturbance, per row: other0_ms is the CPU time core 0 gave to anything but the target's
# proxy and upstream during the round (/proc/stat minus their own time; 10 ms ticks), rq1_ms
# how long the generator was runnable but not running (its schedstat). A build or a test
# cluster elsewhere on the machine shows up there; a round with tens of ms of either measured
# the neighbours as much as the proxy.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
RATES="${RATES:-5000 15000}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-1s}"
RUNS="${RUNS:-1}"
DRAIN="${DRAIN:-5s}"
if [[ -n "${SHORT:-}" ]]; then RATES=1000 DURATION=1s WARMUP=200ms RUNS=1; fi
CONNS="${CONNS:-32}"
KEYS="${KEYS:-1000}"
UP_PORT=18181 SIDECAR_PORT=18180 ADMIN_PORT=18190 NGINX_PORT=18182
# shellcheck source=hack/loadtest/lib.sh
. "$(dirname "$0")/lib.sh"
lt_init openloop

# SIDECAR_BIN / OPENLOOP_BIN: measure given binaries (e.g. built from a fixed commit) as is.
if [[ -z "${SIDECAR_BIN:-}" ]]; then
  echo "building the sidecar (as shipped: hack/build-sidecar.sh)..." >&2
  SIDECAR_BIN="$("$ROOT/hack/build-sidecar.sh")"
fi
if [[ -z "${OPENLOOP_BIN:-}" ]]; then
  echo "building the generator (release)..." >&2
  cargo build --release -q -p keylimit-e2e --bin openloop --manifest-path "$ROOT/Cargo.toml"
fi
BIN="$SIDECAR_BIN"
GEN="${OPENLOOP_BIN:-$ROOT/target/release/openloop}"

KEY="$LT_KEY"
lt_start_proxies "$KEYS" "$UP_PORT" "$NGINX_PORT" "$SIDECAR_PORT" "$ADMIN_PORT" "$BIN"
# lt_start_proxies started the upstream master, the nginx master and the sidecar, in this order.
UP_W="$(pgrep -P "${PIDS[0]}" | xargs)" NGINX_W="$(pgrep -P "${PIDS[1]}" | xargs)" SIDECAR_PID="${PIDS[2]}"

# other0_ticks <pid>...: core 0's busy ticks (user, nice, system) minus those of these
# processes (utime + stime of all their threads), i.e. what everything else ran on core 0.
other0_ticks() {
  local p busy own=0
  busy=$(awk '$1 == "cpu0" { print $2 + $3 + $4 }' /proc/stat)
  for p in "$@"; do
    own=$((own + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
  done
  echo $((busy - own))
}

# field <line> <key>: the value of key=value in the generator's result line.
field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }

void=0
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-4s %-8s %6s %9s %9s %9s %9s %9s %10s %10s %7s %7s %7s %7s\n' \
  run target rate achieved p50_us p99_us p99.9_us max_us +p50_us +p99_us queued errors other0_ms rq1_ms
for run in $(seq 1 "$RUNS"); do
  for rate in $RATES; do
    for target in direct sidecar nginx; do
      case $target in
        direct) port=$UP_PORT core0=$UP_W ;;
        sidecar) port=$SIDECAR_PORT core0="$SIDECAR_PID $UP_W" ;;
        nginx) port=$NGINX_PORT core0="$NGINX_W $UP_W" ;;
      esac
      # shellcheck disable=SC2086 # pid lists
      other_before=$(other0_ticks $core0)
      line="$(taskset -c 1 "$GEN" --rate "$rate" --duration "$DURATION" --warmup "$WARMUP" \
        --drain "$DRAIN" --conns "$CONNS" --label "$target" -H "X-API-Key: $KEY" "http://127.0.0.1:$port/" \
        2>"$WORK/gen.err")" || { cat "$WORK/gen.err" >&2; exit 1; }
      # shellcheck disable=SC2086 # pid lists
      other0=$(( ($(other0_ticks $core0) - other_before) * 1000 / $(getconf CLK_TCK) ))
      errors=$(field "$line" errors) non2xx=$(field "$line" non2xx)
      p50=$(field "$line" p50_us) p99=$(field "$line" p99_us)
      if [[ $target == direct ]]; then d50=$p50 d99=$p99; a50=- a99=-; else
        a50=$(awk -v a="$p50" -v b="$d50" 'BEGIN { printf "%+.1f", a - b }')
        a99=$(awk -v a="$p99" -v b="$d99" 'BEGIN { printf "%+.1f", a - b }')
      fi
      printf '%-4s %-8s %6s %9s %9s %9s %9s %9s %10s %10s %7s %7s %7s %7s\n' "$run" "$target" "$rate" \
        "$(field "$line" achieved)" "$p50" "$p99" "$(field "$line" p999_us)" \
        "$(field "$line" max_us)" "$a50" "$a99" "$(field "$line" queued)" "$((errors + non2xx))" \
        "$other0" "$(field "$line" runq_ms)"
      echo "$target $rate $p50 $p99 $(field "$line" p999_us) $a50 $a99" >>"$WORK/results"
      if [[ $errors != 0 || $non2xx != 0 ]]; then
        # Keep going so the other targets are still measured; the script fails at the end.
        cat "$WORK/gen.err" >&2
        echo "$target at $rate req/s: $errors errors (unanswered $DRAIN after the last send" \
          "count too), $non2xx non-2xx: this row is void" >&2
        void=1
      fi
    done
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

if [[ $RUNS -gt 1 ]]; then
  echo "medians of $RUNS rounds (added: median of each round's proxy minus that round's direct):"
  printf '%-8s %6s %9s %9s %9s %10s %10s\n' target rate p50_us p99_us p99.9_us +p50_us +p99_us
  for rate in $RATES; do
    for target in direct sidecar nginx; do
      med() { awk -v t="$target" -v r="$rate" -v c="$1" '$1 == t && $2 == r { print $c }' \
        "$WORK/results" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
      printf '%-8s %6s %9s %9s %9s %10s %10s\n' "$target" "$rate" "$(med 3)" "$(med 4)" \
        "$(med 5)" "$(med 6)" "$(med 7)"
    done
  done
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $DURATION per target after $WARMUP warm-up, $CONNS connections, $KEYS keys"
if [[ $void != 0 ]]; then echo "some rows had errors or non-2xx answers (see above)" >&2; exit 1; fi
