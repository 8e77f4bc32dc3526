#!/usr/bin/env bash
# Builds, from pinned Go modules only, every binary the kind node image and the kind tier need:
#   kubelet kubeadm kubectl kube-scheduler kube-proxy  (k8s.io/kubernetes, via hack/k8s)
#   containerd containerd-shim-runc-v2 ctr             (containerd v2)
#   bridge host-local loopback portmap                 (CNI plugins)
#   crictl coredns kind
# into ${KEYLIMIT_CACHE:-~/.cache/keylimit}/kind/bin. kube-apiserver, kube-controller-manager and
# etcd come from hack/build-tools.sh (same cache). Idempotent: a binary whose stamp (name, version,
# wrapper go.sum, Go version) matches is skipped; FORCE=1 rebuilds.
set -euo pipefail
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=versions.sh
source "${HACK_DIR}/kind/versions.sh"
CACHE_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}"
BIN_DIR="${CACHE_DIR}/kind/bin"
STAMP_DIR="${BIN_DIR}/.stamps"
mkdir -p "${STAMP_DIR}"
export CGO_ENABLED=0
log() { printf '[kind-bins] %s\n' "$*" >&2; }

stamp_of() { # <name> <version> [module dir]
  local sum=none
  [[ -z "${3:-}" ]] || sum=$(cat "$3/go.mod" "$3/go.sum" | sha256sum | cut -d' ' -f1)
  printf '%s %s %s %s\n' "$1" "$2" "${sum}" "$(go env GOVERSION)"
}
fresh() { # <name> <stamp>
  [[ "${FORCE:-0}" != 1 && -x "${BIN_DIR}/$1" && "$(cat "${STAMP_DIR}/$1" 2>/dev/null)" == "$2" ]]
}

TMP_DIR="$(mktemp -d "${CACHE_DIR}/.kind-build.XXXXXX")"
trap 'rm -rf "${TMP_DIR}"' EXIT
start=$(date +%s)

# --- Kubernetes node binaries, same wrapper module and ldflags as hack/build-tools.sh ---------
k8s_mod="${HACK_DIR}/k8s"
names=() pkgs=()
for name in kubelet kubeadm kubectl kube-scheduler kube-proxy; do
  fresh "${name}" "$(stamp_of "${name}" "${K8S_VERSION}" "${k8s_mod}")" && continue
  names+=("${name}") pkgs+=("k8s.io/kubernetes/cmd/${name}")
done
if ((${#names[@]})); then
  ver=${K8S_VERSION#v}; major=${ver%%.*}; minor=${ver#*.}; minor=${minor%%.*}
  build_date=$(go -C "${k8s_mod}" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
  ldflags=(-s -w)
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    for kv in "gitVersion=${K8S_VERSION}" "gitMajor=${major}" "gitMinor=${minor}" \
              "gitTreeState=clean" "buildDate=${build_date}"; do
      ldflags+=(-X "${pkg}.${kv}")
    done
  done
  log "building ${names[*]} ${K8S_VERSION}..."
  go -C "${k8s_mod}" build -trimpath -buildvcs=false -tags=selinux,notest,grpcnotrace \
    -ldflags="${ldflags[*]}" -o "${TMP_DIR}/" "${pkgs[@]}"
  for name in "${names[@]}"; do
    mv -f "${TMP_DIR}/${name}" "${BIN_DIR}/${name}"
    stamp_of "${name}" "${K8S_VERSION}" "${k8s_mod}" > "${STAMP_DIR}/${name}"
  done
fi

# --- modules without replace directives: plain `go install pkg@version` ----------------------
install_pkg() { # <name> <version> <package@version> [ldflags...]
  local name=$1 version=$2 pkg=$3; shift 3
  fresh "${name}" "$(stamp_of "${name}" "${version}")" && return 0
  log "building ${name} ${version}..."
  GOBIN="${TMP_DIR}" go install -trimpath -tags "no_btrfs,no_devmapper,no_zfs" \
    -ldflags="-s -w $*" "${pkg}"
  mv -f "${TMP_DIR}/$(basename "${pkg%@*}")" "${BIN_DIR}/${name}"
  stamp_of "${name}" "${version}" > "${STAMP_DIR}/${name}"
}
cd_ver="-X github.com/containerd/containerd/v2/version.Version=${CONTAINERD_VERSION}"
install_pkg containerd "${CONTAINERD_VERSION}" \
  "github.com/containerd/containerd/v2/cmd/containerd@${CONTAINERD_VERSION}" "${cd_ver}"
install_pkg containerd-shim-runc-v2 "${CONTAINERD_VERSION}" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@${CONTAINERD_VERSION}" "${cd_ver}"
install_pkg ctr "${CONTAINERD_VERSION}" \
  "github.com/containerd/containerd/v2/cmd/ctr@${CONTAINERD_VERSION}" "${cd_ver}"
for p in main/bridge ipam/host-local main/loopback meta/portmap; do
  install_pkg "$(basename "$p")" "${CNI_PLUGINS_VERSION}" \
    "github.com/containernetworking/plugins/plugins/${p}@${CNI_PLUGINS_VERSION}"
done
install_pkg crictl "${CRICTL_VERSION}" "sigs.k8s.io/cri-tools/cmd/crictl@${CRICTL_VERSION}" \
  "-X sigs.k8s.io/cri-tools/pkg/version.Version=${CRICTL_VERSION}"
install_pkg coredns "${COREDNS_VERSION}" "github.com/coredns/coredns@${COREDNS_VERSION}"
install_pkg kind "${KIND_VERSION}" "sigs.k8s.io/kind@${KIND_VERSION}"

log "node binaries ready in ${BIN_DIR} ($(( $(date +%s) - start )) s)"
