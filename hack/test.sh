#!/usr/bin/env bash
# Runs every test keylimit has, on a fresh machine with Rust and Go:
#   formatting, clippy, CRD freshness, unit tests, the fuzz targets (hack/fuzz.sh), then the
#   end-to-end suite against a real kube-apiserver + etcd + kube-controller-manager built from
#   pinned Go modules and started on 127.0.0.1 (hack/build-tools.sh, hack/controlplane.sh),
#   then the kind tier: Docker (Debian's docker.io, installed and started if missing), a kind
#   node image and every image built on this machine, and tests/kind/main.rs in real pods.
# Binaries are cached in ${KEYLIMIT_CACHE:-~/.cache/keylimit}; nothing built lands in the repo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Each step prints the free space where the build writes: a full disk otherwise shows up as a
# linker "Bus error" or an LLVM "IO failure" deep inside a test build (it did, once).
free_gb() { df -Pk "${CARGO_TARGET_DIR:-target}" 2>/dev/null | awk 'NR==2 { printf "%d", $4 / 1048576 }'; }
step() { printf '\n== %s (%ss, %s GB free)\n' "$*" "${SECONDS}" "$(free_gb)"; }

# A clean clone gains nothing from incremental state: it only costs disk (5.6 GB) and time.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The whole run peaks near ${KEYLIMIT_MIN_FREE_GB} GB of new files (target/, the kind images, the
# fuzz build on first use). Stop now, with the reason, rather than 20 minutes in.
KEYLIMIT_MIN_FREE_GB="${KEYLIMIT_MIN_FREE_GB:-12}"
mkdir -p "${CARGO_TARGET_DIR:-target}"
if [ "$(free_gb)" -lt "${KEYLIMIT_MIN_FREE_GB}" ]; then
  echo "hack/test.sh: only $(free_gb) GB free under ${CARGO_TARGET_DIR:-target}; the suite needs about ${KEYLIMIT_MIN_FREE_GB} GB (set KEYLIMIT_MIN_FREE_GB to override)" >&2
  df -h "${CARGO_TARGET_DIR:-target}" >&2
  exit 1
fi

step "system packages"
bash hack/install-deps.sh

step "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p keylimit-e2e --features kind --all-targets -- -D warnings

step "CRDs are generated from the Rust types"
cargo run -q -p keylimit-operator -- crd --out crds --out charts/keylimit/crds
git diff --exit-code -- crds charts/keylimit/crds || {
  echo "crds/ is stale: run 'cargo run -p keylimit-operator -- crd --out crds --out charts/keylimit/crds'" >&2
  exit 1
}

step "unit and integration tests"
cargo test --workspace

step "benchmarks in short mode: they must run, no timing is asserted"
# Criterion's decision bench (hot key, 1M keys in random order), the Redis store bench (its
# exact-count check holds), and the load script side by side with nginx (every answer 2xx).
cargo bench -p keylimit-sidecar --bench decision -- --warm-up-time 0.1 --measurement-time 0.2
cargo test -p keylimit-sidecar --bench redis
SHORT=1 bash hack/loadtest/run.sh
SHORT=1 bash hack/loadtest/openloop.sh
SHORT=1 bash hack/loadtest/idle-rss.sh

step "fuzz targets, 20s each (hack/fuzz.sh)"
bash hack/fuzz.sh 20

step "Kubernetes control plane (build once, then cached)"
bash hack/build-tools.sh

step "alert rules: promtool check and unit tests on the chart's rendered PrometheusRule"
bash hack/alerts/test.sh
export KEYLIMIT_CP_DIR="${KEYLIMIT_CP_DIR:-$(mktemp -d /tmp/keylimit-cp.XXXXXX)}"
trap 'bash hack/controlplane.sh down || true' EXIT
eval "$(bash hack/controlplane.sh up)"
kubectl version
kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established --timeout=60s crd/apikeys.keylimit.dev crd/ratelimitpolicies.keylimit.dev

step "end-to-end suite"
cargo build -p keylimit-operator -p keylimit-sidecar -p keylimit-e2e -p kubectl-keylimit --bins
cargo test -p keylimit-e2e --tests -- --ignored --test-threads=3

step "operator at 1,000 ApiKeys: counts, not timings (tests/src/bin/scale.rs)"
# Cold start, a quiet window, a burst of 1,000 spec changes and a restart, on the same control
# plane: <= 1.05 status writes per key, <= 64 apiserver connections, <= 8 ConfigMap writes for
# the burst, 0 writes while nothing changes or after a restart.
"${CARGO_TARGET_DIR:-target}/debug/keylimit-scale" --keys 1000 --assert
bash hack/controlplane.sh down || true

step "kind tier: real pods on a kind cluster built here (hack/kind/e2e.sh)"
bash hack/kind/e2e.sh

step "done"
