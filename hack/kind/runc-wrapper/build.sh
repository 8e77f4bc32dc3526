#!/usr/bin/env bash
# Builds the runc wrapper (main.go here) as a static binary into
# ${KEYLIMIT_CACHE:-~/.cache/keylimit}/kind/runc-wrapper/runc-wrapper and prints that path.
# Rebuilds only when main.go, go.mod or the Go version change. Used by hack/kind/docker.sh
# (host dockerd's default runtime) and by the node image (containerd's runc BinaryName).
set -euo pipefail
SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}/kind/runc-wrapper"
OUT="${OUT_DIR}/runc-wrapper"
command -v go >/dev/null || { echo "runc-wrapper/build.sh: go not found on PATH" >&2; exit 1; }
mkdir -p "${OUT_DIR}"
stamp="$(cat "${SRC_DIR}/main.go" "${SRC_DIR}/go.mod" | sha256sum | cut -d' ' -f1) $(go env GOVERSION)"
if [[ ! -x "${OUT}" || "$(cat "${OUT}.stamp" 2>/dev/null)" != "${stamp}" ]]; then
  CGO_ENABLED=0 go -C "${SRC_DIR}" build -trimpath -buildvcs=false -ldflags='-s -w' -o "${OUT}.tmp" .
  mv -f "${OUT}.tmp" "${OUT}"
  printf '%s\n' "${stamp}" > "${OUT}.stamp"
fi
printf '%s\n' "${OUT}"
