# shellcheck shell=bash
# Shared by the load scripts (run.sh, openloop.sh, idle-rss.sh, compare.sh, callgrind.sh): a work directory removed on
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
# kubelet lays out a ConfigMap volume. LIMIT_HEADERS=Draft|OnRefusal sets the policy's
# response.limitHeaders (default Full: five limit headers on every response; nginx sends none).
lt_config() {
  local data="$WORK/config/..2026_01_01_00_00_00.1"
  mkdir -p "$data"
  python3 - "$data" "$1" "${LIMIT_HEADERS:-Full}" <<'PY'
import hashlib, json, sys
out, n, headers = sys.argv[1], int(sys.argv[2]), sys.argv[3]
keys = [{"name": f"key-{i}",
         "sha256": hashlib.sha256(f"loadtest-key-{i}-0123456789abcdef".encode()).hexdigest()}
        for i in range(n)]
doc = {"apiVersion": "dataplane.keylimit.dev/v1",
       "policy": {"name": "load", "namespace": "bench", "generation": 1,
                  "limits": {"rates": [{"name": "second", "requests": 1000000,
                                        "periodSeconds": 1, "burst": 1000000}]},
                  "response": {"message": "Keys Temporarily Exhausted",
                               "limitHeaders": headers}},
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

# lt_nginx_proxy <keys> <listen port> <upstream port>: writes $WORK/proxy.conf, nginx doing the
# sidecar's job the way its best users would: unknown key -> 401 (a `map` of the valid keys),
# limit_req per key, upstream keepalive, keepalive_requests raised on both sides (the default
# 1000 would reconnect every 1,000 requests), and the forwarded headers the sidecar sets.
# Run it with: "$NGINX" -c "$WORK/proxy.conf" -p "$WORK".
lt_nginx_proxy() {
  local keys=$1 port=$2 up=$3 i
  for ((i = 0; i < keys; i++)); do
    echo "    \"loadtest-key-$i-0123456789abcdef\" 1;"
  done >"$WORK/keys.map"
  cat >"$WORK/proxy.conf" <<CONF
daemon off; worker_processes 1; pid $WORK/proxy.pid; error_log $WORK/proxy.err;
events { worker_connections 4096; }
http { access_log off; map_hash_max_size 65536; map_hash_bucket_size 128;
  map \$http_x_api_key \$key_ok {
    default 0;
$(cat "$WORK/keys.map")
  }
  limit_req_zone \$http_x_api_key zone=perkey:16m rate=1000000r/s;
  upstream app { server 127.0.0.1:$up; keepalive 64; keepalive_requests 10000000; }
  server { listen 127.0.0.1:$port; keepalive_requests 10000000;
    location / {
      if (\$key_ok = 0) { return 401 '{"error":"invalid_key"}'; }
      limit_req zone=perkey burst=1000000 nodelay;
      proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-KeyLimit-Key \$http_x_api_key;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_pass http://app; } } }
CONF
}

# lt_wait_ok <port> <key>: bounded wait (10 s) for a port to answer an HTTP request.
lt_wait_ok() {
  for _ in $(seq 1 100); do
    if curl -s -o /dev/null -H "X-API-Key: $2" "http://127.0.0.1:$1/"; then return 0; fi
    sleep 0.1
  done
  echo "port $1 did not come up" >&2
  exit 1
}

# The tested key: key-0 of lt_config's keys.
LT_KEY="loadtest-key-0-0123456789abcdef"

# lt_start_proxies <keys> <upstream port> <nginx port> <sidecar port> <admin port> <sidecar bin>:
# the upstream, nginx doing the sidecar's job (lt_nginx_proxy) and the sidecar, all on core 0
# (one nginx worker, one tokio worker), then checks both proxies: the tested key gets 200 and a
# wrong key 401. The load generator belongs on core 1.
lt_start_proxies() {
  local keys=$1 up=$2 nginx_port=$3 sidecar_port=$4 admin_port=$5 bin=$6 port code
  lt_config "$keys"
  lt_upstream "$up" 0
  lt_nginx_proxy "$keys" "$nginx_port" "$up"
  taskset -c 0 "$NGINX" -c "$WORK/proxy.conf" -p "$WORK" & PIDS+=($!)
  TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 "$bin" --listen "127.0.0.1:$sidecar_port" \
    --admin-listen "127.0.0.1:$admin_port" --upstream "http://127.0.0.1:$up" \
    --config-dir "$WORK/config" --log-format text & PIDS+=($!)
  lt_wait_ok "$up" "$LT_KEY"; lt_wait_ok "$nginx_port" "$LT_KEY"; lt_wait_ok "$sidecar_port" "$LT_KEY"
  for port in "$sidecar_port" "$nginx_port"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $LT_KEY" "http://127.0.0.1:$port/")
    [[ $code == 200 ]] || { echo "port $port: the tested key got $code, not 200" >&2; exit 1; }
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'X-API-Key: wrong' "http://127.0.0.1:$port/")
    [[ $code == 401 ]] || { echo "port $port: a wrong key got $code, not 401" >&2; exit 1; }
  done
}
