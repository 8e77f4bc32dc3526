#!/usr/bin/env bash
# Builds the sidecar as shipped and prints the binary's path on stdout:
# - profile `sidecar` (fat LTO, one codegen unit: Cargo.toml);
# - glibc linked in statically (static-pie, so ASLR stays). A dynamically linked sidecar keeps
#   about 1 MiB of libc, libm and ld.so pages resident; linked in, only the parts it calls are
#   mapped (idle RSS 7.2-7.3 MiB instead of 8.2-8.7 MiB, docs/benchmarks.md). glibc 2.34+
#   has its files and dns NSS modules built in, so name lookups (a Redis host) still work.
# --target is explicit so the flag reaches only the sidecar's own crates: build scripts and
# proc macros are host artifacts that cannot be linked statically.
#
#   BIN="$(hack/build-sidecar.sh)"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build -q --profile sidecar --target "${TRIPLE}" -p keylimit-sidecar --bin keylimit-sidecar \
  --manifest-path "${ROOT}/Cargo.toml" >&2
echo "${CARGO_TARGET_DIR:-${ROOT}/target}/${TRIPLE}/sidecar/keylimit-sidecar"
