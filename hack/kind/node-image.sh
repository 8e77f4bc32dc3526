#!/usr/bin/env bash
# Builds the kind node image for Kubernetes ${K8S_VERSION} entirely on this machine (no image
# registry is reachable here, so `kind build node-image` cannot run) and prints its tag,
# keylimit/kind-node:<k8s version>-<hash of every input>, as the last line on stdout.
# A warm run (tag present) only checks its inputs and prints the tag.
#
# What goes in, mirroring kind ${KIND_VERSION}'s images/base and pkg/build/nodeimage:
#  - a Debian rootfs (hack/kind/rootfs.sh) with systemd and the packages kind's base holds,
#    plus Debian's runc behind hack/kind/runc-wrapper (containerd's runc BinaryName);
#  - kind's own node files from the kind module (entrypoint, systemd units, kubelet drop-ins,
#    sysctls, /kind/bin scripts), our containerd 2.x config and bridge CNI conflist
#    (hack/kind/node);
#  - containerd, shim, ctr, crictl, CNI plugins, kubelet, kubeadm, kubectl (build-bins.sh);
#  - the images `kubeadm config images list` names for ${K8S_VERSION}, built here from the
#    same Go builds (FROM scratch; kube-proxy on a Debian rootfs for iptables/nft/conntrack)
#    and preloaded into the node's containerd.
# Preloading is done the way kind does it: run the node image with containerd started by
# hand, `ctr images import --no-unpack` the images, `docker commit`. This needs no privilege
# (no snapshot mounts; CRI unpacks an image the first time a container uses it) and the
# content lands under /var/lib/containerd in the image, which docker copies into the /var
# volume kind gives each node. Shipping tarballs for a oneshot import at boot would cost
# every cluster start the import time instead.
set -euo pipefail
KIND_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HACK_DIR="$(dirname "${KIND_DIR}")"
# shellcheck source=versions.sh
source "${KIND_DIR}/versions.sh"
CACHE_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}"
NODE_BIN="${CACHE_DIR}/kind/node-bin"
KIND_BIN="${CACHE_DIR}/kind/bin"
CP_BIN="${CACHE_DIR}/bin"
log() { printf '[node-image] %s\n' "$*" >&2; }
# Runs a command with its output kept back unless it fails (docker CLI 28 prints a deprecation
# notice for every legacy-builder build; dockerd 20.10 has no BuildKit here).
quiet() {
  local out
  if ! out="$("$@" 2>&1)"; then
    printf '%s\n' "${out}" >&2
    die "failed: $*"
  fi
}
die() { printf '[node-image] error: %s\n' "$*" >&2; exit 1; }
start=${SECONDS}
mkdir -p "${NODE_BIN}/.stamps"
export CGO_ENABLED=0

# Image names and tags exactly as `kubeadm config images list --kubernetes-version v1.37.2`
# prints them (checked below against the kubeadm we ship).
ETCD_IMAGE_TAG="${ETCD_NODE_VERSION#v}-0"
declare -A IMAGE=(
  [kube-apiserver]="registry.k8s.io/kube-apiserver:${K8S_VERSION}"
  [kube-controller-manager]="registry.k8s.io/kube-controller-manager:${K8S_VERSION}"
  [kube-scheduler]="registry.k8s.io/kube-scheduler:${K8S_VERSION}"
  [kube-proxy]="registry.k8s.io/kube-proxy:${K8S_VERSION}"
  [coredns]="registry.k8s.io/coredns/coredns:${COREDNS_VERSION}"
  [pause]="registry.k8s.io/pause:${PAUSE_VERSION}"
  [etcd]="registry.k8s.io/etcd:${ETCD_IMAGE_TAG}"
)
NODE_PACKAGES=systemd,systemd-sysv,dbus,iptables,nftables,iproute2,ethtool,socat,conntrack,ebtables,kmod,mount,util-linux,ca-certificates,procps,libseccomp2,runc,bash,jq,pigz,e2fsprogs
PROXY_PACKAGES=iptables,nftables,conntrack

# --- binaries -----------------------------------------------------------------------------
# kube-apiserver and kube-controller-manager: hack/build-tools.sh; the node's own binaries:
# build-bins.sh; etcd ${ETCD_NODE_VERSION} and pause: here (only the node image uses them).
bash "${HACK_DIR}/build-tools.sh" >&2
bash "${KIND_DIR}/build-bins.sh" >&2
runc_wrapper="$(bash "${KIND_DIR}/runc-wrapper/build.sh")"

node_bin() { # <name> <module dir> <package> <stamp extra>
  local name=$1 dir=$2 pkg=$3 stamp
  stamp="${name} $(cat "${dir}"/go.mod "${dir}"/go.sum "${dir}"/*.go 2>/dev/null | sha256sum | cut -c1-16) $4 $(go env GOVERSION)"
  if [[ -x "${NODE_BIN}/${name}" && "$(cat "${NODE_BIN}/.stamps/${name}" 2>/dev/null)" == "${stamp}" ]]; then
    return 0
  fi
  log "building ${name}..."
  go -C "${dir}" build -trimpath -buildvcs=false -ldflags='-s -w' -o "${NODE_BIN}/${name}.tmp" "${pkg}"
  mv -f "${NODE_BIN}/${name}.tmp" "${NODE_BIN}/${name}"
  printf '%s\n' "${stamp}" > "${NODE_BIN}/.stamps/${name}"
}
node_bin etcd "${KIND_DIR}/etcd" go.etcd.io/etcd/server/v3 "${ETCD_NODE_VERSION}"
node_bin pause "${KIND_DIR}/pause" . "${PAUSE_VERSION}"
[[ "$(go -C "${KIND_DIR}/etcd" list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)" == "${ETCD_NODE_VERSION}" ]] \
  || die "hack/kind/etcd/go.mod does not pin etcd ${ETCD_NODE_VERSION} (versions.sh)"

want_images="$(printf '%s\n' "${IMAGE[@]}" | sort)"
got_images="$("${KIND_BIN}/kubeadm" config images list --kubernetes-version "${K8S_VERSION}" 2>/dev/null | sort)"
[[ "${want_images}" == "${got_images}" ]] \
  || die "kubeadm ${K8S_VERSION} wants other images than versions.sh gives:"$'\n'"${got_images}"

kind_src="$(go mod download -json "sigs.k8s.io/kind@${KIND_VERSION}" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
[[ -d "${kind_src}/images/base/files" ]] || die "kind ${KIND_VERSION} source not found in the module cache"
KIND_FILES="${kind_src}/images/base/files"

# --- base root filesystems ----------------------------------------------------------------
node_rootfs="$(bash "${KIND_DIR}/rootfs.sh" keylimit/kind-rootfs:node "${NODE_PACKAGES}" | tail -n1)"
proxy_rootfs="$(bash "${KIND_DIR}/rootfs.sh" keylimit/kind-rootfs:kube-proxy "${PROXY_PACKAGES}" | tail -n1)"

# --- the tag: a hash of every input -------------------------------------------------------
bins=(
  "${CP_BIN}/kube-apiserver" "${CP_BIN}/kube-controller-manager"
  "${KIND_BIN}"/{kube-scheduler,kube-proxy,kubelet,kubeadm,kubectl,coredns}
  "${KIND_BIN}"/{containerd,containerd-shim-runc-v2,ctr,crictl,bridge,host-local,loopback,portmap}
  "${NODE_BIN}/etcd" "${NODE_BIN}/pause" "${runc_wrapper}"
)
for b in "${bins[@]}"; do [[ -x "$b" ]] || die "missing binary $b"; done
hash="$( {
  sha256sum "${bins[@]}" | cut -d' ' -f1
  cat "${BASH_SOURCE[0]}" "${KIND_DIR}/versions.sh" \
    "${KIND_DIR}"/node/{Dockerfile,containerd-config.toml,10-keylimit-bridge.conflist,iptables-wrapper,default-storage.yaml}
  printf '%s\n' "${KIND_VERSION}" "${want_images}"
  docker image inspect --format '{{.Id}}' "${node_rootfs}" "${proxy_rootfs}"
} | sha256sum | cut -c1-12)"
TAG="keylimit/kind-node:${K8S_VERSION}-${hash}"
# One build at a time (a second caller waits, then finds the tag).
mkdir -p "${CACHE_DIR}/kind"
exec 9>"${CACHE_DIR}/kind/.node-image.lock"
flock 9
if docker image inspect "${TAG}" >/dev/null 2>&1; then
  log "${TAG} is up to date ($((SECONDS - start)) s)"
  printf '%s\n' "${TAG}"
  exit 0
fi

log "building ${TAG}..."
work="$(mktemp -d "${CACHE_DIR}/kind/.node-image.XXXXXX")"
builder="keylimit-node-build-$$"
cleanup() {
  docker rm -f -v "${builder}" >/dev/null 2>&1 || true
  rm -rf "${work}"
}
trap cleanup EXIT

# --- component images ---------------------------------------------------------------------
scratch_image() { # <name> <binary> <path in image> <user>
  local name=$1 bin=$2 path=$3 user=$4 ctx="${work}/img-$1"
  mkdir -p "${ctx}"
  cp "${bin}" "${ctx}/${name}"
  cat > "${ctx}/Dockerfile" <<EOF
FROM scratch
COPY ${name} ${path}
ENV PATH=/usr/local/bin:/usr/bin:/bin
USER ${user}
ENTRYPOINT ["${path}"]
EOF
  quiet docker build -q -t "${IMAGE[${name}]}" "${ctx}"
}
# Static pods run as root like upstream's; pause (65535) and coredns (65532) keep upstream's
# users. coredns binds :53 as non-root through containerd's enable_unprivileged_ports.
scratch_image kube-apiserver "${CP_BIN}/kube-apiserver" /usr/local/bin/kube-apiserver 0:0
scratch_image kube-controller-manager "${CP_BIN}/kube-controller-manager" /usr/local/bin/kube-controller-manager 0:0
scratch_image kube-scheduler "${KIND_BIN}/kube-scheduler" /usr/local/bin/kube-scheduler 0:0
scratch_image etcd "${NODE_BIN}/etcd" /usr/local/bin/etcd 0:0
scratch_image coredns "${KIND_BIN}/coredns" /coredns 65532:65532
scratch_image pause "${NODE_BIN}/pause" /pause 65535:65535

ctx="${work}/img-kube-proxy"
mkdir -p "${ctx}"
cp "${KIND_BIN}/kube-proxy" "${KIND_DIR}/node/iptables-wrapper" "${ctx}/"
cat > "${ctx}/Dockerfile" <<EOF
FROM ${proxy_rootfs}
COPY kube-proxy /usr/local/bin/kube-proxy
COPY iptables-wrapper /usr/sbin/iptables-wrapper
RUN for t in iptables ip6tables; do \\
      update-alternatives --install /usr/sbin/\$t \$t /usr/sbin/iptables-wrapper 100 \\
        --slave /usr/sbin/\$t-restore \$t-restore /usr/sbin/iptables-wrapper \\
        --slave /usr/sbin/\$t-save \$t-save /usr/sbin/iptables-wrapper; \\
    done
ENTRYPOINT ["/usr/local/bin/kube-proxy"]
EOF
quiet docker build -q -t "${IMAGE[kube-proxy]}" "${ctx}"
log "component images built ($((SECONDS - start)) s)"

# --- node root filesystem additions -------------------------------------------------------
root="${work}/node/rootfs"
mkdir -p "${root}"/{usr/local/bin,usr/local/sbin,usr/bin,opt/cni/bin,kind/bin,kind/manifests} \
  "${root}"/etc/{containerd,cni/net.d,default,sysctl.d,systemd/system/kubelet.service.d}
install -m 0755 "${KIND_FILES}/usr/local/bin/entrypoint" "${root}/usr/local/bin/"
install -m 0755 "${KIND_FILES}"/kind/bin/*.sh "${root}/kind/bin/"
install -m 0644 "${KIND_FILES}/kind/README.txt" "${root}/kind/"
install -m 0644 "${KIND_FILES}"/etc/systemd/system/{kubelet.service,kubelet.slice,containerd.service,undo-mount-hacks.service} \
  "${root}/etc/systemd/system/"
install -m 0644 "${KIND_FILES}"/etc/systemd/system/kubelet.service.d/*.conf "${root}/etc/systemd/system/kubelet.service.d/"
install -m 0644 "${KIND_FILES}/etc/crictl.yaml" "${root}/etc/"
install -m 0644 "${KIND_FILES}/etc/default/kubelet" "${root}/etc/default/"
install -m 0644 "${KIND_FILES}"/etc/sysctl.d/*.conf "${root}/etc/sysctl.d/"
install -m 0644 "${KIND_DIR}/node/containerd-config.toml" "${root}/etc/containerd/config.toml"
install -m 0644 "${KIND_DIR}/node/10-keylimit-bridge.conflist" "${root}/etc/cni/net.d/"
install -m 0644 "${KIND_DIR}/node/default-storage.yaml" "${root}/kind/manifests/"
install -m 0755 "${KIND_BIN}"/{containerd,containerd-shim-runc-v2,ctr,crictl} "${root}/usr/local/bin/"
install -m 0755 "${runc_wrapper}" "${root}/usr/local/sbin/runc-wrapper"
install -m 0755 "${KIND_BIN}"/{kubelet,kubeadm,kubectl} "${root}/usr/bin/"
install -m 0755 "${KIND_BIN}"/{bridge,host-local,loopback,portmap} "${root}/opt/cni/bin/"
printf '%s\n' "${K8S_VERSION}" > "${root}/kind/version"
cp "${KIND_DIR}/node/Dockerfile" "${work}/node/"
quiet docker build -q --build-arg "BASE=${node_rootfs}" -t "${TAG}-base" "${work}/node"
log "node base built ($((SECONDS - start)) s)"

# --- preload the images into the node's containerd, then commit ---------------------------
# containerd is the build container's main process (its output goes to `docker logs`): when
# the import is done, SIGTERM stops it cleanly (bolt database closed) and the container exits,
# so nothing is left half-written when it is committed.
docker run -d --name "${builder}" --entrypoint bash "${TAG}-base" \
  -c 'containerd; status=$?; rm -rf /run/containerd /var/lib/containerd/tmpmounts; exit ${status}' >/dev/null
deadline=$((SECONDS + 60))
until docker exec "${builder}" ctr version >/dev/null 2>&1; do
  ((SECONDS < deadline)) || { docker logs "${builder}" >&2; die "containerd did not start in the build container"; }
  sleep 0.5
done
docker save "${IMAGE[@]}" | docker exec -i "${builder}" ctr --namespace=k8s.io images import \
  --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests - >/dev/null 2>&1
imported="$(docker exec "${builder}" ctr --namespace=k8s.io images list -q 2>/dev/null)"
missing="$(comm -23 <(printf '%s\n' "${want_images}") <(sort <<<"${imported}"))"
[[ -z "${missing}" ]] || die "not in the node's containerd after the import: ${missing}"
docker exec "${builder}" pkill -TERM -x containerd
[[ "$(timeout 60 docker wait "${builder}")" == 0 ]] \
  || { docker logs "${builder}" 2>&1 | tail -n 20 >&2; die "containerd in the build container did not stop cleanly"; }
docker commit \
  --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' \
  --change 'CMD []' \
  --change "LABEL dev.keylimit.kind-node=${hash}" \
  "${builder}" "${TAG}" >/dev/null
docker rm -v "${builder}" >/dev/null
docker rmi "${TAG}-base" >/dev/null
# Older node images (about 0.5 GB of preloaded images each) go; one a container still uses
# (a running cluster) is refused by docker and stays.
docker images --format '{{.Repository}}:{{.Tag}}' keylimit/kind-node | grep -vxF "${TAG}" \
  | xargs -r docker rmi >/dev/null 2>&1 || true
size="$(docker image inspect --format '{{.Size}}' "${TAG}")"
log "built ${TAG} ($((size / 1000000)) MB) in $((SECONDS - start)) s"
printf '%s\n' "${TAG}"
