#!/usr/bin/env bash
# rootfs.sh <image-tag> [comma-separated extra packages]
# Builds a Debian ${DEBIAN_SUITE} (versions.sh) root filesystem with `debootstrap
# --variant=minbase` plus the extra packages, from the Debian mirror the host's apt uses
# (DEBIAN_MIRROR overrides), cleans it (apt lists and caches, docs, man pages, logs), caches it
# as <cache>/kind/rootfs/<tag>-<hash>.tar and `docker import`s it as <image-tag>. The hash
# covers suite, mirror, packages and this script; the image carries it as the label
# dev.keylimit.rootfs, so a warm run (tag present with the same label) only inspects and prints.
# Prints the tag on stdout. Needs root (debootstrap) and a running dockerd (docker.sh).
set -euo pipefail
KIND_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
source "${KIND_DIR}/versions.sh"
log() { printf '[rootfs.sh] %s\n' "$*" >&2; }
die() { printf '[rootfs.sh] error: %s\n' "$*" >&2; exit 1; }
[[ $# -ge 1 && $# -le 2 && -n "$1" ]] || die "usage: rootfs.sh <image-tag> [pkg1,pkg2,...]"
tag=$1
# Normalise the package list (sorted, unique, no blanks) so "a,b" and "b,a" share a cache entry.
packages="$(tr ', ' '\n\n' <<<"${2:-}" | sed '/^$/d' | sort -u | paste -sd, -)"
if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
CACHE_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}/kind/rootfs"
mkdir -p "${CACHE_DIR}"

# The mirror serving ${DEBIAN_SUITE} in the host's apt sources (one-line and deb822 formats).
host_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    awk -v suite="${DEBIAN_SUITE}" '
      $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                    if ($(i+1) == suite) { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    awk -v suite="${DEBIAN_SUITE}" '
      function flush() { if (uris != "" && types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ")) { split(uris, u, " "); print u[1]; exit } uris = suites = types = "" }
      /^[ \t]*$/ { flush(); next }
      /^URIs:/   { sub(/^URIs:[ \t]*/, ""); uris = $0 }
      /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
      /^Types:/  { sub(/^Types:[ \t]*/, ""); types = $0 }
      END { flush() }' "$f"
  done
}
mirror="${DEBIAN_MIRROR:-$(host_mirror | head -n1)}"
[[ -n "${mirror}" ]] || die "no apt source for suite ${DEBIAN_SUITE} in /etc/apt/sources.list*; set DEBIAN_MIRROR"

hash="$( { printf '%s\n' "${DEBIAN_SUITE}" "${mirror}" "${packages}"; cat "${BASH_SOURCE[0]}"; } \
  | sha256sum | cut -c1-16)"
tarball="${CACHE_DIR}/$(tr -c 'A-Za-z0-9._-' '_' <<<"${tag}" | sed 's/_$//')-${hash}.tar"

image_current() {
  [[ "$(docker image inspect --format '{{index .Config.Labels "dev.keylimit.rootfs"}}' "${tag}" 2>/dev/null)" == "${hash}" ]]
}
if image_current; then printf '%s\n' "${tag}"; exit 0; fi

# One builder per cache entry; a second caller waits and then finds the tarball.
exec 9>"${tarball}.lock"
flock 9
if [[ ! -s "${tarball}" ]]; then
  command -v debootstrap >/dev/null || die "debootstrap missing; run hack/kind/docker.sh first"
  start=$SECONDS
  work="$(mktemp -d "${CACHE_DIR}/.build.XXXXXX")"
  trap '"${SUDO[@]}" rm -rf "${work}"' EXIT
  log "debootstrap ${DEBIAN_SUITE} minbase${packages:+ + ${packages}} from ${mirror}..."
  if ! "${SUDO[@]}" debootstrap --variant=minbase --components=main \
      ${packages:+--include="${packages}"} "${DEBIAN_SUITE}" "${work}/root" "${mirror}" \
      >"${work}/debootstrap.log" 2>&1; then
    tail -n 30 "${work}/debootstrap.log" >&2
    [[ ! -f "${work}/root/debootstrap/debootstrap.log" ]] || tail -n 30 "${work}/root/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (above)"
  fi
  r="${work}/root"
  # Keep copyright files (licences), drop the rest of the docs and every cache.
  "${SUDO[@]}" find "${r}/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  "${SUDO[@]}" find "${r}/usr/share/doc" -mindepth 1 -type d -empty -delete
  "${SUDO[@]}" rm -rf "${r}/var/lib/apt/lists/"* "${r}/var/cache/apt/"* "${r}/var/cache/debconf/"*-old \
    "${r}/usr/share/man/"* "${r}/usr/share/info/"* "${r}/usr/share/lintian" "${r}/var/log/"* \
    "${r}/tmp/"* "${r}/var/tmp/"* "${r}/debootstrap"
  "${SUDO[@]}" tar --numeric-owner --xattrs -C "${r}" -cf "${tarball}.tmp" .
  "${SUDO[@]}" mv -f "${tarball}.tmp" "${tarball}"
  # Older builds of the same tag (other hash) are dead weight now.
  # Exactly <tag>-<16 hex>.tar, so tag "a" never deletes the tarball of tag "a-b".
  for old in "${tarball%-*}"-????????????????.tar; do
    [[ "${old}" == "${tarball}" || ! -f "${old}" || ! "${old##*-}" =~ ^[0-9a-f]{16}\.tar$ ]] \
      || rm -f "${old}" "${old}.lock"
  done
  log "rootfs tarball $(du -h "${tarball}" | cut -f1) in $((SECONDS - start)) s: ${tarball}"
fi
if ! image_current; then
  docker import --change "LABEL dev.keylimit.rootfs=${hash}" \
    --change "LABEL dev.keylimit.rootfs.packages=${packages:-none}" \
    "${tarball}" "${tag}" >/dev/null || die "docker import of ${tarball} failed"
fi
printf '%s\n' "${tag}"
