#!/usr/bin/env bash
# The main job, on a fresh machine: bring up a real Kubernetes control plane on 127.0.0.1,
# run the keylimit operator and a sidecar in front of a real upstream, apply examples/,
# drive one key past its limit, and show the 429 and `kubectl get apikeys`.
#
# With KEYLIMIT_DEMO_KUBECONFIG=<file> it uses that cluster instead of starting one.
# KEEP=1 leaves everything running afterwards (the script prints how to stop it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
NS=demo
WORK=$(mktemp -d /tmp/keylimit-demo.XXXXXX)
PIDS=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # <url> <what>
  local deadline=$((SECONDS + 60))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "timed out waiting for $2 ($1); logs in $WORK" >&2; exit 1; }
    sleep 0.2
  done
}
cleanup() {
  if [[ "${KEEP:-0}" == 1 ]]; then
    echo "KEEP=1: processes ${PIDS[*]:-} still run; logs in $WORK. Stop with: kill ${PIDS[*]:-}; KEYLIMIT_CP_DIR=$WORK/cp bash hack/controlplane.sh down"
    return
  fi
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -z "${KEYLIMIT_DEMO_KUBECONFIG:-}" ]] && KEYLIMIT_CP_DIR="$WORK/cp" bash hack/controlplane.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "Installing what is missing (Debian packages, pinned Kubernetes binaries, keylimit)"
bash hack/install-deps.sh
bash hack/build-tools.sh
cargo build -q -p keylimit-operator -p keylimit-sidecar -p keylimit-e2e --bins
BIN="$ROOT/target/debug"

if [[ -n "${KEYLIMIT_DEMO_KUBECONFIG:-}" ]]; then
  export KUBECONFIG=$KEYLIMIT_DEMO_KUBECONFIG
else
  say "Starting etcd + kube-apiserver + kube-controller-manager on 127.0.0.1"
  export KEYLIMIT_CP_DIR="$WORK/cp"
  eval "$(bash hack/controlplane.sh up)"
fi
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/apikeys.keylimit.dev crd/ratelimitpolicies.keylimit.dev >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

say "Starting the operator"
OP_PORT=$(free_port)
# No webhook (and so no TLS port) in the demo: the sidecar reports over plain HTTP on
# loopback, which the operator refuses unless told otherwise. In a cluster reports go over TLS.
"$BIN/keylimit-operator" run --admin-addr "127.0.0.1:$OP_PORT" --lease-namespace "$NS" --identity demo-operator \
  --allow-plaintext-reports >"$WORK/operator.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$OP_PORT/readyz" "the operator"

say "kubectl apply -f examples/"
kubectl apply -n "$NS" -f examples/
kubectl wait -n "$NS" --for=condition=Ready --timeout=60s apikey/acme apikey/globex apikey/initech
say "A key pointed at a Secret that did not opt in (no keylimit.dev/secret=true label)"
kubectl create secret generic db-password -n "$NS" --from-literal=token=s3cret-database-password \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -n "$NS" -f - >/dev/null <<'KEY'
apiVersion: keylimit.dev/v1alpha1
kind: ApiKey
metadata: {name: sneaky}
spec:
  policyRef: {name: standard}
  secretRef: {name: db-password, key: token}
KEY
kubectl wait -n "$NS" --for=jsonpath='{.status.conditions[?(@.type=="Ready")].reason}'=SecretNotFound \
  --timeout=30s apikey/sneaky
kubectl get apikey sneaky -n "$NS" -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}'
echo

say "Starting an upstream app, and the keylimit sidecar in front of it"
UP_PORT=$(free_port)
mkdir -p "$WORK/www" && echo "hello from the app" >"$WORK/www/index.html"
python3 -m http.server "$UP_PORT" --bind 127.0.0.1 --directory "$WORK/www" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
# No kubelet here: keylimit-project writes the policy's ConfigMaps into a directory exactly
# the way kubelet's AtomicWriter updates a ConfigMap volume.
"$BIN/keylimit-project" --namespace "$NS" --policy standard --dir "$WORK/config" >"$WORK/project.log" 2>&1 &
PIDS+=($!)
# The operator takes reports only with a token bound to a pod injected for the policy (kubelet
# mounts exactly that). With no kubelet, a Pod object stands for the sidecar's pod.
for _ in $(seq 1 60); do
  kubectl apply -n "$NS" -f - >/dev/null 2>&1 <<'POD' && break
apiVersion: v1
kind: Pod
metadata: {name: demo-app, annotations: {keylimit.dev/policy: standard}}
spec: {serviceAccountName: default, containers: [{name: app, image: registry.invalid/app:1}]}
POD
  sleep 0.5 # the default ServiceAccount appears a moment after the namespace
done
POD_UID=$(kubectl get pod demo-app -n "$NS" -o jsonpath='{.metadata.uid}')
kubectl create token default -n "$NS" --audience keylimit --duration 1h \
  --bound-object-kind Pod --bound-object-name demo-app --bound-object-uid "$POD_UID" >"$WORK/token"
# Keys are hashed with the namespace's HMAC key (Secret keylimit-hash-key); the webhook
# projects it next to the policy, here it is written to a file the same way.
for _ in $(seq 1 60); do
  kubectl get secret keylimit-hash-key -n "$NS" -o jsonpath='{.data.key}' 2>/dev/null \
    | base64 -d >"$WORK/hash-key" && [ -s "$WORK/hash-key" ] && break
  sleep 0.5 # the operator creates it with the first policy
done
[ -s "$WORK/hash-key" ] || { echo "the operator never created keylimit-hash-key" >&2; exit 1; }
SC_PORT=$(free_port); SC_ADMIN=$(free_port)
"$BIN/keylimit-sidecar" --listen "127.0.0.1:$SC_PORT" --admin-listen "127.0.0.1:$SC_ADMIN" \
  --upstream "http://127.0.0.1:$UP_PORT" --config-dir "$WORK/config" --sidecar-name demo-sidecar \
  --hash-key-file "$WORK/hash-key" \
  --report-url "http://127.0.0.1:$OP_PORT/v1/reports" --report-token-file "$WORK/token" \
  >"$WORK/sidecar.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SC_ADMIN/readyz" "the sidecar"

KEY=$(kubectl get secret acme-key -n "$NS" -o jsonpath='{.data.key}' | base64 -d)
say "Calling the API with acme's key (policy: 5 a minute, all 5 at once allowed)"
for i in $(seq 1 9); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $KEY" "http://127.0.0.1:$SC_PORT/")
  echo "request $i -> $code"
done
say "The refused request, in full"
curl -s -i -H "X-API-Key: $KEY" "http://127.0.0.1:$SC_PORT/" || true
echo
say "A wrong key"
curl -s -i -H "X-API-Key: kl_not_a_real_key_000000000000" "http://127.0.0.1:$SC_PORT/" || true
echo

say "kubectl wait --for=condition=Exhausted apikey/acme"
kubectl wait -n "$NS" --for=condition=Exhausted --timeout=30s apikey/acme
say "kubectl get apikeys"
kubectl get apikeys -n "$NS"
say "kubectl get apikeys -o wide"
kubectl get apikeys -n "$NS" -o wide
say "kubectl get ratelimitpolicies"
kubectl get ratelimitpolicies -n "$NS"
say "Events"
kubectl get events -n "$NS" --field-selector involvedObject.name=acme \
  -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message
