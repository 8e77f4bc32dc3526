# shellcheck shell=bash
# Shared by the load scripts (run.sh, compare.sh, callgrind.sh): a work directory removed on
# exit with every process started, the benchmark policy in kubelet's `..data` layout (a plain
# directory would measure the reload path, not the request path), and an nginx upstream that
# answers from memory. Keys: key-N with material "loadtest-key-N-0123456789abcdef".

# lt_init <name>: sets WORK, PIDS and NGINX; cleans up on exit.
lt_init() {
  WORK="$(mktemp -d "/tmp/keylimit-$1.XXXXXX")"
  PIDS=()
  trap lt_cleanup EXIT
  NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
  [ -x "$NGINX" ] || { echo "nginx missing: apt-get install -y nginx-light" >&2; exit 1; }
}

lt_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}

# lt_config <keys>: $WORK/config holds policy.json (one rate that never refuses) the way
# kubelet lays out a ConfigMap volume.
lt_config() {
  local data="$WORK/config/..2026_01_01_00_00_00.1"
  mkdir -p "$data"
  python3 - "$data" "$1" <<'PY'
import hashlib, json, sys
out, n = sys.argv[1], int(sys.argv[2])
keys = [{"name": f"key-{i}",
         "sha256": hashlib.sha256(f"loadtest-key-{i}-0123456789abcdef".encode()).hexdigest()}
        for i in range(n)]
doc = {"apiVersion": "dataplane.keylimit.dev/v1",
       "policy": {"name": "load", "namespace": "bench", "generation": 1,
                  "limits": {"rates": [{"name": "second", "requests": 1000000,
                                        "periodSeconds": 1, "burst": 1000000}]}},
       "keys": sorted(keys, key=lambda k: k["name"])}
json.dump(doc, open(f"{out}/policy.json", "w"))
PY
  ln -s ..2026_01_01_00_00_00.1 "$WORK/config/..data"
  ln -s ..data/policy.json "$WORK/config/policy.json"
}

# lt_upstream <port> [cpu list]: nginx answering `200 ok` with keep-alive that never ends.
lt_upstream() {
  cat >"$WORK/upstream.conf" <<CONF
daemon off; worker_processes 1; pid $WORK/upstream.pid; error_log $WORK/upstream.err;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:$1; keepalive_requests 10000000;
    location / { return 200 "ok\n"; } } }
CONF
  taskset -c "${2:-0-1}" "$NGINX" -c "$WORK/upstream.conf" -p "$WORK" &
  PIDS+=($!)
}
