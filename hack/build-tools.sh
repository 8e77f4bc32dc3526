#!/usr/bin/env bash
# Builds the local Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager) and helm from pinned Go modules into
# ${KEYLIMIT_CACHE:-$HOME/.cache/keylimit}/bin. Needs only Go and the Go module
# proxy: no prebuilt downloads.
#
# Idempotent: each binary has a stamp file recording what it was built from;
# a binary whose stamp matches is skipped. FORCE=1 rebuilds everything.
#
# Pinned versions live here and in hack/k8s/go.mod, hack/etcd/go.mod.
set -euo pipefail

readonly K8S_VERSION=v1.37.2
readonly ETCD_VERSION=v3.6.16
readonly HELM_VERSION=v3.22.0

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly HACK_DIR
CACHE_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}"
readonly BIN_DIR="${CACHE_DIR}/bin"
readonly STAMP_DIR="${BIN_DIR}/.stamps"

export CGO_ENABLED=0

log() { printf '[build-tools] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

now() { date +%s; }
elapsed() { local s=$(( $(now) - $1 )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

command -v go >/dev/null 2>&1 || die "go is not installed"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum is not installed"

mkdir -p "${BIN_DIR}" "${STAMP_DIR}"

# What a binary is built from: the pinned version plus the wrapper module's
# go.mod/go.sum (so a bumped dependency rebuilds), plus the go major version.
recipe() { # <name> <version> [module dir]
  local name=$1 version=$2 moddir=${3:-} sum=none
  if [[ -n "${moddir}" ]]; then
    sum=$(cat "${moddir}/go.mod" "${moddir}/go.sum" | sha256sum | cut -d' ' -f1)
  fi
  printf '%s %s %s %s\n' "${name}" "${version}" "${sum}" "$(go env GOVERSION)"
}

up_to_date() { # <name> <recipe>
  local name=$1 want=$2
  [[ "${FORCE:-0}" != 1 ]] || return 1
  [[ -x "${BIN_DIR}/${name}" && -f "${STAMP_DIR}/${name}" ]] || return 1
  [[ "$(cat "${STAMP_DIR}/${name}")" == "${want}" ]]
}

# Move a freshly built binary into place, then record its stamp.
install_bin() { # <built file> <name> <recipe>
  mv -f "$1" "${BIN_DIR}/$2"
  printf '%s\n' "$3" > "${STAMP_DIR}/$2"
}

TMP_DIR="$(mktemp -d "${CACHE_DIR}/.build.XXXXXX")"
readonly TMP_DIR
trap 'rm -rf "${TMP_DIR}"' EXIT

total_start=$(now)
log "go: $(go version); cache: ${BIN_DIR}; GOMAXPROCS/cores: $(nproc)"

# --- kube-apiserver, kube-controller-manager -------------------------------
build_k8s() {
  local moddir="${HACK_DIR}/k8s" modver
  modver=$(go -C "${moddir}" list -m -f '{{.Version}}' k8s.io/kubernetes)
  [[ "${modver}" == "${K8S_VERSION}" ]] \
    || die "hack/k8s/go.mod pins k8s.io/kubernetes ${modver}, script expects ${K8S_VERSION}"

  local -a names=() pkgs=()
  local name
  for name in kube-apiserver kube-controller-manager; do
    if up_to_date "${name}" "$(recipe "${name}" "${K8S_VERSION}" "${moddir}")"; then
      log "${name} ${K8S_VERSION}: up to date, skipping"
    else
      names+=("${name}")
      pkgs+=("k8s.io/kubernetes/cmd/${name}")
    fi
  done
  [[ ${#names[@]} -gt 0 ]] || return 0

  local ver=${K8S_VERSION#v} major minor build_date
  major=${ver%%.*}
  minor=${ver#*.}; minor=${minor%%.*}
  # The release's commit time, as recorded by the module proxy: deterministic.
  build_date=$(go -C "${moddir}" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)

  # Same -X keys as upstream hack/lib/version.sh sets, for both packages.
  local -a ldflags=(-s -w)
  local pkg kv
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    for kv in "gitVersion=${K8S_VERSION}" "gitMajor=${major}" "gitMinor=${minor}" \
              "gitTreeState=clean" "buildDate=${build_date}"; do
      ldflags+=("-X" "${pkg}.${kv}")
    done
  done

  local start
  start=$(now)
  log "building ${names[*]} ${K8S_VERSION} (cold builds take a long while on 2 cores)..."
  # One invocation for both so the go tool shares and parallelises the work.
  # Tags as upstream's non-debug builds (hack/lib/golang.sh).
  go -C "${moddir}" build -trimpath -buildvcs=false -tags=selinux,notest,grpcnotrace \
    -ldflags="${ldflags[*]}" -o "${TMP_DIR}/" "${pkgs[@]}"
  for name in "${names[@]}"; do
    install_bin "${TMP_DIR}/${name}" "${name}" "$(recipe "${name}" "${K8S_VERSION}" "${moddir}")"
  done
  log "built ${names[*]} in $(elapsed "${start}")"
}

# --- etcd ------------------------------------------------------------------
build_etcd() {
  local moddir="${HACK_DIR}/etcd" name=etcd modver want
  modver=$(go -C "${moddir}" list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
  [[ "${modver}" == "${ETCD_VERSION}" ]] \
    || die "hack/etcd/go.mod pins etcd server ${modver}, script expects ${ETCD_VERSION}"
  want=$(recipe "${name}" "${ETCD_VERSION}" "${moddir}")
  if up_to_date "${name}" "${want}"; then
    log "etcd ${ETCD_VERSION}: up to date, skipping"
    return 0
  fi
  local start
  start=$(now)
  log "building etcd ${ETCD_VERSION}..."
  go -C "${moddir}" build -trimpath -buildvcs=false -ldflags="-s -w" \
    -o "${TMP_DIR}/etcd" go.etcd.io/etcd/server/v3
  install_bin "${TMP_DIR}/etcd" "${name}" "${want}"
  log "built etcd in $(elapsed "${start}")"
}

# --- helm ------------------------------------------------------------------
build_helm() {
  local name=helm want
  want=$(recipe "${name}" "${HELM_VERSION}")
  if up_to_date "${name}" "${want}"; then
    log "helm ${HELM_VERSION}: up to date, skipping"
    return 0
  fi
  local start
  start=$(now)
  log "building helm ${HELM_VERSION}..."
  # Version and default Capabilities.KubeVersion as helm's Makefile sets them
  # (helm v3.22 is built against client-go v0.37 => 1.37).
  local -a ldflags=(-s -w
    -X "helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
    -X "helm.sh/helm/v3/internal/version.metadata="
    -X "helm.sh/helm/v3/internal/version.gitTreeState=clean"
    -X "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"
    -X "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37"
    -X "helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
    -X "helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37")
  # go install pkg@version runs outside any module, so no go.mod is involved.
  GOBIN="${TMP_DIR}" go install -trimpath -ldflags="${ldflags[*]}" \
    "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
  install_bin "${TMP_DIR}/helm" "${name}" "${want}"
  log "built helm in $(elapsed "${start}")"
}

build_etcd
build_k8s
build_helm

log "all tools ready in ${BIN_DIR} (total $(elapsed "${total_start}"))"
# sed reads all of etcd's output: `head -1` would close the pipe early and, under
# pipefail, fail the script with SIGPIPE (exit 141) when etcd writes its second line.
"${BIN_DIR}/etcd" --version | sed -n 1p >&2
"${BIN_DIR}/kube-apiserver" --version >&2
"${BIN_DIR}/kube-controller-manager" --version >&2
"${BIN_DIR}/helm" version --short >&2
