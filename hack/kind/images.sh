#!/usr/bin/env bash
# Builds every image the kind tier runs, pulling nothing:
#   keylimit/runtime-base:<hash>  FROM scratch: glibc, libgcc_s and whatever `ldd` says our
#                                 binaries need, taken from a Debian rootfs (rootfs.sh), plus
#                                 passwd/group with nonroot 65532, CA certificates, /tmp. No shell.
#   keylimit/operator:$TAG        the repo's Dockerfile, BINARIES=prebuilt, RUNTIME_BASE above
#   keylimit/sidecar:$TAG         idem
#   keylimit/testapp:$TAG         keylimit-testapp (tests/src/bin/testapp.rs) on runtime-base, with
#                                 keylimit-probe (the kind tier's in-cluster client) beside it
#   keylimit/redis:$TAG           Debian's redis-server and its libraries (rootfs.sh) on
#                                 runtime-base, user 65532
# TAG defaults to dev. Binaries come from `cargo build --release` (workspace release profile),
# except the sidecar, which is built as shipped by hack/build-sidecar.sh (fat LTO, glibc linked in).
# Sizes go to stdout and <cache>/kind/image-sizes.txt. Needs dockerd (hack/kind/docker.sh).
set -euo pipefail
KIND_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${KIND_DIR}/../.." && pwd)"
# shellcheck source=versions.sh
source "${KIND_DIR}/versions.sh"
TAG="${TAG:-dev}"
CACHE_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}/kind"
TARGET_DIR="${CARGO_TARGET_DIR:-${REPO_DIR}/target}"
# BuildKit is built into Debian's 20.10 CLI; the newer static CLI earlier on PATH needs buildx.
DOCKER=/usr/bin/docker
[[ -x "${DOCKER}" ]] || DOCKER=docker
export DOCKER_BUILDKIT=1
log() { printf '[images.sh] %s\n' "$*" >&2; }
die() { printf '[images.sh] error: %s\n' "$*" >&2; exit 1; }
"${DOCKER}" info >/dev/null 2>&1 || die "dockerd is not answering; run hack/kind/docker.sh"
mkdir -p "${CACHE_DIR}"
WORK="$(mktemp -d "${CACHE_DIR}/.images.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT
start=$SECONDS

# --- release binaries ---------------------------------------------------------------------------
log "cargo build --release (operator, testapp, probe) and hack/build-sidecar.sh (sidecar)..."
(cd "${REPO_DIR}" && cargo build -q --release -p keylimit-operator \
  && cargo build -q --release -p keylimit-e2e --bin keylimit-testapp --bin keylimit-probe)
SIDECAR_BIN="$("${REPO_DIR}/hack/build-sidecar.sh")"
bins=(keylimit-operator keylimit-sidecar keylimit-testapp keylimit-probe)
# bin_path <binary>: where cargo put it (the sidecar's profile has its own directory).
bin_path() {
  case "$1" in
    keylimit-sidecar) echo "${SIDECAR_BIN}" ;;
    *) echo "${TARGET_DIR}/release/$1" ;;
  esac
}
for b in "${bins[@]}"; do
  [[ -x "$(bin_path "${b}")" ]] || die "$(bin_path "${b}") missing after cargo build"
done

# --- runtime base -------------------------------------------------------------------------------
# Libraries the binaries link, by soname (the host is Debian too, but the files come from the
# rootfs so the base does not depend on what the host has installed).
sonames="$(for b in "${bins[@]}"; do ldd "$(bin_path "${b}")"; done \
  | awk '$1 !~ /^linux-vdso/ && $1 != "statically" { n = $1; sub(".*/", "", n); print n }' | sort -u)"
[[ -n "${sonames}" ]] || die "ldd found no libraries: are the binaries dynamically linked?"
base_rootfs="$("${KIND_DIR}/rootfs.sh" keylimit/debian-base:"${DEBIAN_SUITE}" ca-certificates)"
rootfs_hash="$("${DOCKER}" image inspect --format '{{index .Config.Labels "dev.keylimit.rootfs"}}' "${base_rootfs}")"
base_hash="$( { printf '%s\n' "${rootfs_hash}" "${sonames}"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)"
RUNTIME_BASE="keylimit/runtime-base:${base_hash}"
if ! "${DOCKER}" image inspect "${RUNTIME_BASE}" >/dev/null 2>&1; then
  log "building ${RUNTIME_BASE} from ${base_rootfs} (libs: $(tr '\n' ' ' <<<"${sonames}"))"
  src="${WORK}/rootfs" dst="${WORK}/base/root"
  mkdir -p "${src}" "${dst}"
  # From the image itself (not rootfs.sh's tarball cache, which may have been cleared).
  cid="$("${DOCKER}" create --network none "${base_rootfs}" /bin/true)"
  "${DOCKER}" export "${cid}" | tar --numeric-owner -C "${src}" -xf - etc usr/lib usr/lib64 usr/share/doc
  "${DOCKER}" rm "${cid}" >/dev/null
  libdir=usr/lib/x86_64-linux-gnu
  mkdir -p "${dst}/${libdir}" "${dst}/usr/lib64" "${dst}/etc/ssl/certs" "${dst}/tmp" \
    "${dst}/home/nonroot" "${dst}/usr/share/doc"
  # Debian bookworm is merged-/usr: /lib and /lib64 are links into /usr.
  ln -s usr/lib "${dst}/lib"
  ln -s usr/lib64 "${dst}/lib64"
  for so in ${sonames} libnss_files.so.2 libnss_dns.so.2; do
    [[ -e "${src}/${libdir}/${so}" ]] || { [[ "${so}" == libnss_* ]] && continue; \
      die "${so} (needed by our binaries) is not in ${base_rootfs}; add its package in images.sh"; }
    cp -a "${src}/${libdir}/${so}" "${dst}/${libdir}/"
    # Follow soname links to the real file.
    real="$(readlink -f "${src}/${libdir}/${so}")"
    [[ "${real}" == "${src}/${libdir}/${so}" ]] || cp -a "${real}" "${dst}/${libdir}/"
  done
  cp -a "${src}/usr/lib64/ld-linux-x86-64.so.2" "${dst}/usr/lib64/"
  cp -a "${src}/etc/ssl/certs/ca-certificates.crt" "${dst}/etc/ssl/certs/"
  cp -aL "${src}/etc/os-release" "${dst}/etc/os-release"
  for pkg in libc6 libgcc-s1 ca-certificates; do # licences of what we ship
    [[ ! -d "${src}/usr/share/doc/${pkg}" ]] || cp -a "${src}/usr/share/doc/${pkg}" "${dst}/usr/share/doc/"
  done
  cat >"${dst}/etc/passwd" <<'PW'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PW
  cat >"${dst}/etc/group" <<'GR'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
GR
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"${dst}/etc/nsswitch.conf"
  chmod 1777 "${dst}/tmp"
  chown 65532:65532 "${dst}/home/nonroot"
  cat >"${WORK}/base/Dockerfile" <<EOF2
FROM scratch
COPY root/ /
LABEL dev.keylimit.runtime-base="${base_hash}" dev.keylimit.rootfs="${rootfs_hash}"
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /home/nonroot
EOF2
  "${DOCKER}" build -q -t "${RUNTIME_BASE}" "${WORK}/base" >/dev/null
fi
# Older runtime-base tags are only names now (images built on them keep their layers).
for old in $("${DOCKER}" image ls --format '{{.Repository}}:{{.Tag}}' keylimit/runtime-base); do
  [[ "${old}" == "${RUNTIME_BASE}" ]] || "${DOCKER}" rmi "${old}" >/dev/null 2>&1 || true
done

# --- operator and sidecar: the repo's Dockerfile with prebuilt binaries -------------------------
# A context of two files: the repo's target/ never goes to the daemon.
ctx="${WORK}/bins"
mkdir -p "${ctx}"
for b in "${bins[@]}"; do
  cp "$(bin_path "${b}")" "${ctx}/"
done
for target in operator sidecar; do
  log "building keylimit/${target}:${TAG}"
  if [[ "${PUBLIC_IMAGES:-0}" == 1 ]]; then
    # With a registry at hand: the same Dockerfile with its public defaults (rust builder,
    # distroless runtime) and the repo as context (.dockerignore keeps target/ out).
    "${DOCKER}" build -q -f "${REPO_DIR}/Dockerfile" --target "${target}" \
      -t "keylimit/${target}:${TAG}" "${REPO_DIR}" >/dev/null
    continue
  fi
  "${DOCKER}" build -q -f "${REPO_DIR}/Dockerfile" --target "${target}" \
    --build-arg BINARIES=prebuilt --build-arg RUNTIME_BASE="${RUNTIME_BASE}" \
    -t "keylimit/${target}:${TAG}" "${ctx}" >/dev/null
done

# --- testapp ------------------------------------------------------------------------------------
log "building keylimit/testapp:${TAG}"
"${DOCKER}" build -q -f - -t "keylimit/testapp:${TAG}" "${ctx}" >/dev/null <<EOF2
FROM ${RUNTIME_BASE}
COPY keylimit-testapp keylimit-probe /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keylimit-testapp"]
EOF2

# --- redis --------------------------------------------------------------------------------------
# Debian's redis-server and exactly the libraries it links, copied from its rootfs onto
# runtime-base: the same shape as our images (no shell, 65532) at a tenth of the rootfs size.
redis_rootfs="$("${KIND_DIR}/rootfs.sh" keylimit/debian-redis:"${DEBIAN_SUITE}" redis-server)"
redis_libs="$("${DOCKER}" run --rm --network none --entrypoint /bin/sh "${redis_rootfs}" -c \
  'ldd /usr/bin/redis-server' | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')"
grep -q libc.so.6 <<<"${redis_libs}" || die "ldd of redis-server in ${redis_rootfs} gave no libraries"
log "building keylimit/redis:${TAG} ($(wc -l <<<"${redis_libs}") libraries)"
mkdir -p "${WORK}/redis"
{
  printf 'FROM %s AS src\nFROM %s\n' "${redis_rootfs}" "${RUNTIME_BASE}"
  # COPY follows a symlinked source, so every soname lands as a regular file. libc and friends
  # come from the redis rootfs too, so redis always runs with the glibc it was resolved against.
  for lib in ${redis_libs}; do
    printf 'COPY --from=src %s /usr/lib/x86_64-linux-gnu/\n' "${lib}"
  done
  # /usr/bin/redis-server links to redis-check-rdb, which picks its mode from argv[0]: copied
  # under the server's name.
  cat <<'EOF2'
COPY --from=src /usr/bin/redis-server /usr/bin/redis-server
COPY --from=src /usr/share/doc/redis-server/copyright /usr/share/doc/redis-server/copyright
USER 65532:65532
EXPOSE 6379
# No persistence and no protected mode: a throwaway store for tests, reached over the pod
# network. Nothing is written, so a read-only root filesystem works.
ENTRYPOINT ["/usr/bin/redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--bind", "0.0.0.0", "--port", "6379"]
EOF2
} >"${WORK}/redis/Dockerfile"
"${DOCKER}" build -q -t "keylimit/redis:${TAG}" "${WORK}/redis" >/dev/null

# --- sizes --------------------------------------------------------------------------------------
sizes="$(for img in "${RUNTIME_BASE}" "keylimit/operator:${TAG}" "keylimit/sidecar:${TAG}" \
  "keylimit/testapp:${TAG}" "keylimit/redis:${TAG}"; do
  "${DOCKER}" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "${img}"
done)"
printf '%s\n' "${sizes}" | tee "${CACHE_DIR}/image-sizes.txt"
log "images ready in $((SECONDS - start)) s"
