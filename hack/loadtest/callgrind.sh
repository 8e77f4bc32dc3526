#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a figure machine noise does
# not move, for before/after comparisons of the request path.
#
#   hack/loadtest/callgrind.sh [sidecar binary] [requests]
#
# The sidecar runs under valgrind with one tokio worker in front of an nginx upstream (not
# instrumented); a client sends `requests` keep-alive requests with a valid key after a warm-up,
# with the counters zeroed in between, so start-up and config loading are not counted. The config
# directory uses kubelet's `..data` layout. Needs valgrind and nginx (apt-get install -y valgrind
# nginx-light).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="${1:-${CARGO_TARGET_DIR:-$ROOT/target}/$(rustc -vV | sed -n 's/^host: //p')/sidecar/keylimit-sidecar}"
REQUESTS="${2:-2000}"
KEYS="${KEYS:-1000}"
UP_PORT=18181 SIDECAR_PORT=18180 ADMIN_PORT=18190
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install -y valgrind" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no sidecar binary at $BIN (hack/build-sidecar.sh)" >&2; exit 1; }
# shellcheck source=hack/loadtest/lib.sh
. "$(dirname "$0")/lib.sh"
lt_init callgrind
lt_config "$KEYS"
lt_upstream "$UP_PORT"

TOKIO_WORKER_THREADS=1 RUST_LOG=warn valgrind --tool=callgrind --quiet \
  --callgrind-out-file="$WORK/cg.out.%p" --dump-instr=no --separate-threads=no --collect-atstart=yes \
  "$BIN" --listen 127.0.0.1:$SIDECAR_PORT --admin-listen 127.0.0.1:$ADMIN_PORT \
  --upstream http://127.0.0.1:$UP_PORT --config-dir "$WORK/config" --log-format text \
  >"$WORK/sidecar.log" 2>&1 & PIDS+=($!)
VG_PID=$!

python3 - "$SIDECAR_PORT" "$REQUESTS" "$VG_PID" <<'PY'
import socket, subprocess, sys, time
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
req = (b"GET /v1/orders/42?expand=items HTTP/1.1\r\nHost: app\r\n"
       b"X-API-Key: loadtest-key-7-0123456789abcdef\r\nUser-Agent: bench\r\n"
       b"Accept: application/json\r\n\r\n")
deadline = time.time() + 120
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("sidecar did not come up")
        time.sleep(0.2)
def one():
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection closed")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        body += s.recv(65536)
    return status
# Warm-up until the config is loaded and the upstream connection pooled.
for _ in range(200):
    st = one()
if st != 200:
    sys.exit(f"warm-up ended with status {st}")
subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
for _ in range(n):
    st = one()
    if st != 200:
        sys.exit(f"status {st}")
subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
PY

# The dump after the measured requests is the file with the highest part number.
dump="$(ls -1 "$WORK"/cg.out.* | sort -V | tail -n 1)"
ir="$(awk '/^summary:/ {print $2}' "$dump")"
[ -n "$ir" ] || { echo "no callgrind summary in $dump" >&2; exit 1; }
echo "requests=$REQUESTS keys=$KEYS instructions=$ir per_request=$((ir / REQUESTS))"
# KEEP_DUMP=<file> keeps the dump for callgrind_annotate.
if [ -n "${KEEP_DUMP:-}" ]; then cp "$dump" "$KEEP_DUMP"; fi
