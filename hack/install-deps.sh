#!/usr/bin/env bash
# Debian packages the tests need. Idempotent: installs only what is missing.
set -euo pipefail
need=()
for pkg in openssl redis-server redis-tools; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${need[@]}"
fi
echo "system packages present: openssl redis-server redis-tools"
