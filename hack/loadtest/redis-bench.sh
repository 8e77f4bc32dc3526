#!/usr/bin/env bash
# Redis-mode decisions per second for one sidecar process vs `redis-benchmark -t incr` (one
# round trip per operation) on the same machine, at 1, 8 and 32 concurrent clients, back to
# back in each round (sidecar/benches/redis.rs says what is printed).
#
#   hack/loadtest/redis-bench.sh                 # needs redis-server + redis-benchmark
#   SECS=10 ROUNDS=5 WORKERS=2 hack/loadtest/redis-bench.sh
#   SHORT=1 hack/loadtest/redis-bench.sh         # CI smoke: 0.2 s per level, no timings asserted
#
# SECS: seconds per round (default 5). ROUNDS: rounds per level (default 3; medians reported).
# LEVELS: concurrency levels (default 1,8,32). WORKERS: tokio workers of the bench process
# (default 1, like a sidecar pinned to one core). REDIS_PORT: use an already running Redis
# instead of starting one.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
command -v redis-server >/dev/null || { echo "redis-server missing: hack/install-deps.sh" >&2; exit 1; }
command -v redis-benchmark >/dev/null || { echo "redis-benchmark missing: apt-get install -y redis-tools" >&2; exit 1; }
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
cd "$ROOT"
if [[ -n "${SHORT:-}" ]]; then
  exec cargo test -q -p keylimit-sidecar --bench redis
fi
exec cargo bench -q -p keylimit-sidecar --bench redis
