#!/usr/bin/env bash
# cluster.sh up|down|kubeconfig|load <image>...
# A one-node kind cluster (name: $KIND_CLUSTER, default keylimit) from the node image that
# hack/kind/node-image.sh builds here; nothing is pulled.
#   up          ensure dockerd (docker.sh) and the node image, create the cluster if it is
#               missing, unhealthy or from another node image, and wait (bounded) until the
#               node and kube-system's coredns and kube-proxy pods are Ready. Fast when the
#               cluster is already healthy.
#   down        delete the cluster.
#   kubeconfig  print the path of the cluster's kubeconfig (written by `up`).
#   load IMG..  copy local docker images into the node (kind load docker-image).
# Timeouts: KIND_WAIT (kind create --wait, default 180s), READY_TIMEOUT (each kubectl wait,
# default 180s).
set -euo pipefail
KIND_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}"
KIND_BIN="${CACHE_DIR}/kind/bin"
NAME="${KIND_CLUSTER:-keylimit}"
if [[ "${NAME}" == keylimit ]]; then
  KUBECONFIG_FILE="${CACHE_DIR}/kind/kubeconfig"
else
  KUBECONFIG_FILE="${CACHE_DIR}/kind/kubeconfig-${NAME}"
fi
READY_TIMEOUT="${READY_TIMEOUT:-180s}"
log() { printf '[cluster.sh] %s\n' "$*" >&2; }
die() { printf '[cluster.sh] error: %s\n' "$*" >&2; exit 1; }
start=${SECONDS}
kind() { "${KIND_BIN}/kind" "$@"; }
kubectl() { "${KIND_BIN}/kubectl" --kubeconfig "${KUBECONFIG_FILE}" "$@"; }
node_container() { printf '%s-control-plane' "${NAME}"; }

cluster_exists() { kind get clusters 2>/dev/null | grep -qx "${NAME}"; }

# Healthy: the node container runs the wanted image and the apiserver answers /readyz.
cluster_healthy() { # <node image tag>
  local running image
  running="$(docker inspect --format '{{.State.Running}}' "$(node_container)" 2>/dev/null)" || return 1
  [[ "${running}" == true ]] || return 1
  image="$(docker inspect --format '{{.Config.Image}}' "$(node_container)")"
  if [[ "${image}" != "$1" ]]; then
    log "cluster ${NAME} runs ${image}, not $1"
    return 1
  fi
  kind get kubeconfig --name "${NAME}" > "${KUBECONFIG_FILE}.tmp" 2>/dev/null || return 1
  mv -f "${KUBECONFIG_FILE}.tmp" "${KUBECONFIG_FILE}"
  kubectl get --raw /readyz --request-timeout=10s >/dev/null 2>&1
}

wait_ready() {
  kubectl wait --for=condition=Ready node --all --timeout="${READY_TIMEOUT}" >&2
  # The bridge conflist in the node image hands out 10.244.0.0/24: the node must own it.
  # kube-controller-manager assigns it shortly after it starts, which can be after kind's
  # own wait returns (the node is Ready as soon as kubelet sees the static CNI config).
  local cidr deadline=$((SECONDS + 60))
  until cidr="$(kubectl get node "$(node_container)" -o jsonpath='{.spec.podCIDR}')" && [[ -n "${cidr}" ]]; do
    ((SECONDS < deadline)) || die "node has no podCIDR after 60 s"
    sleep 1
  done
  [[ "${cidr}" == 10.244.0.0/24 ]] \
    || die "node podCIDR is ${cidr}, but the node image's CNI config serves 10.244.0.0/24"
  local app
  for app in kube-dns kube-proxy; do
    # The pods may not exist yet right after `kind create` returns.
    local deadline=$((SECONDS + 60))
    until [[ -n "$(kubectl -n kube-system get pods -l "k8s-app=${app}" -o name 2>/dev/null)" ]]; do
      ((SECONDS < deadline)) || die "no ${app} pods in kube-system after 60 s"
      sleep 1
    done
    kubectl -n kube-system wait --for=condition=Ready pod -l "k8s-app=${app}" \
      --timeout="${READY_TIMEOUT}" >&2
  done
}

diagnose() {
  local node
  node="$(node_container)"
  log "--- diagnostics for ${node} ---"
  docker logs "${node}" 2>&1 | tail -n 30 >&2 || true
  docker exec "${node}" journalctl --no-pager -n 60 -u containerd -u kubelet >&2 2>/dev/null || true
  docker exec "${node}" crictl ps -a >&2 2>/dev/null || true
}

up() {
  bash "${KIND_DIR}/docker.sh"
  local image
  # KIND_NODE_IMAGE (e.g. kindest/node:v1.37.2, with a registry at hand) skips the local build.
  image="${KIND_NODE_IMAGE:-$(bash "${KIND_DIR}/node-image.sh" | tail -n1)}"
  [[ -x "${KIND_BIN}/kind" ]] || bash "${KIND_DIR}/build-bins.sh" >&2
  if cluster_exists; then
    if cluster_healthy "${image}"; then
      wait_ready
      log "cluster ${NAME} already up ($((SECONDS - start)) s); KUBECONFIG=${KUBECONFIG_FILE}"
      return 0
    fi
    log "recreating cluster ${NAME}"
    kind delete cluster --name "${NAME}" >&2
  fi
  log "creating cluster ${NAME} from ${image}..."
  local config="${KIND_DIR}/node/kind-config.yaml"
  if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
    # A public node image has kindnet but not our bridge conflist: keep kind's default CNI.
    config="$(mktemp)"
    sed 's/disableDefaultCNI: true/disableDefaultCNI: false/' "${KIND_DIR}/node/kind-config.yaml" >"${config}"
  fi
  if ! kind create cluster --name "${NAME}" --image "${image}" --config "${config}" \
      --wait "${KIND_WAIT:-180s}" --retain --kubeconfig "${KUBECONFIG_FILE}" >&2; then
    diagnose
    die "kind create cluster failed (node container kept for inspection; cluster.sh down removes it)"
  fi
  if ! wait_ready; then
    diagnose
    die "cluster ${NAME} did not become ready"
  fi
  log "cluster ${NAME} up in $((SECONDS - start)) s; KUBECONFIG=${KUBECONFIG_FILE}"
}

case "${1:-}" in
  up) up ;;
  down)
    if [[ -x "${KIND_BIN}/kind" ]] && cluster_exists; then
      kind delete cluster --name "${NAME}" >&2
    fi
    rm -f "${KUBECONFIG_FILE}"
    log "cluster ${NAME} down ($((SECONDS - start)) s)"
    ;;
  kubeconfig)
    [[ -s "${KUBECONFIG_FILE}" ]] || die "no kubeconfig for ${NAME}; run: hack/kind/cluster.sh up"
    printf '%s\n' "${KUBECONFIG_FILE}"
    ;;
  load)
    shift
    (($#)) || die "usage: cluster.sh load <image>..."
    kind load docker-image --name "${NAME}" "$@" >&2
    log "loaded $* into ${NAME} ($((SECONDS - start)) s)"
    ;;
  *) die "usage: cluster.sh up|down|kubeconfig|load <image>..." ;;
esac
