#!/usr/bin/env bash
# The kind tier: keylimit in real pods. Everything is built on this machine (no image registry
# is reachable): the node image and control-plane images (hack/kind/node-image.sh), the
# keylimit images (hack/kind/images.sh), the cluster (hack/kind/cluster.sh). Then the chart is
# installed with helm exactly as docs/install.md says, and tests/kind/main.rs runs against it.
#
#   bash hack/kind/e2e.sh            # from hack/test.sh, after the local-control-plane suite
#   KEEP_CLUSTER=1 bash hack/kind/e2e.sh   # leave the cluster up afterwards (warm re-runs)
#   PUBLIC_IMAGES=1 bash hack/kind/e2e.sh  # with registry access: kindest/node and the
#                                          # Dockerfile's public bases instead of local builds
#   KIND_ONLY=operator_leader bash hack/kind/e2e.sh  # only the tests matching a filter, one at
#                                                    # a time (re-running one scenario)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
CACHE_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}"
TAG=${KEYLIMIT_IMAGE_TAG:-dev}
export KEYLIMIT_IMAGE_TAG=${TAG}
step() { printf '\n== kind: %s (%ss)\n' "$*" "${SECONDS}"; }

step "Go-built tools and node binaries"
bash hack/build-tools.sh
bash hack/kind/build-bins.sh
# The pinned kubectl v1.37.2 (build-bins.sh) and helm first: the host's kubectl may be outside
# the cluster's version skew (a v1.32 kubectl here could not parse the tests' JSON manifests).
export PATH="${CACHE_DIR}/kind/bin:${CACHE_DIR}/bin:${PATH}"

if [[ "${PUBLIC_IMAGES:-0}" == 1 ]]; then
  # shellcheck source=versions.sh
  source hack/kind/versions.sh
  export PUBLIC_IMAGES KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:${K8S_VERSION}}"
fi

step "Docker engine"
bash hack/kind/docker.sh

step "keylimit images"
bash hack/kind/images.sh

step "cluster"
bash hack/kind/cluster.sh up
KUBECONFIG="$(bash hack/kind/cluster.sh kubeconfig)"
export KUBECONFIG
if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
  trap 'bash hack/kind/cluster.sh down || true' EXIT
fi
bash hack/kind/cluster.sh load "keylimit/operator:${TAG}" "keylimit/sidecar:${TAG}" \
  "keylimit/testapp:${TAG}" "keylimit/redis:${TAG}"

step "helm install"
helm upgrade --install keylimit charts/keylimit --namespace keylimit-system --create-namespace \
  --set image.tag="${TAG}" --set image.pullPolicy=Never \
  --set sidecar.image.tag="${TAG}" --set sidecar.image.pullPolicy=Never \
  --wait --timeout 180s
kubectl -n keylimit-system rollout status deploy/keylimit-operator --timeout=120s

dump() {
  kubectl get nodes,pods -A -o wide || true
  kubectl -n keylimit-system logs -l app.kubernetes.io/name=keylimit --prefix --tail=80 || true
}
trap 'dump; if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then bash hack/kind/cluster.sh down || true; fi' ERR

if [[ -n "${KIND_ONLY:-}" ]]; then
  step "kind tier: only ${KIND_ONLY}"
  cargo test -p keylimit-e2e --features kind --test kind -- "${KIND_ONLY}" --test-threads=1 --nocapture
  exit 0
fi
step "kind tier: workloads (side by side)"
cargo test -p keylimit-e2e --features kind --test kind -- workload_ --test-threads=3 --nocapture
step "kind tier: operator disruptions (one at a time)"
cargo test -p keylimit-e2e --features kind --test kind -- operator_ --test-threads=1 --nocapture
step "kind tier done"
