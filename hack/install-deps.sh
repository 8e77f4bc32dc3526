#!/usr/bin/env bash
# Debian packages the tests need, and cargo-fuzz. Idempotent: installs only what is missing.
set -euo pipefail
need=()
for pkg in openssl redis-server redis-tools prometheus wrk nginx-light; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${need[@]}"
fi
echo "system packages present: openssl redis-server redis-tools prometheus wrk nginx-light"

# cargo-fuzz for hack/fuzz.sh (built from crates.io; the fuzz build itself uses stable Rust).
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
echo "cargo-fuzz present: $(cargo fuzz --version)"
