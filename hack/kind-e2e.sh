#!/usr/bin/env bash
# The kind path, for machines with a Docker engine (our CI machines have none; there
# hack/test.sh runs the same suite against a local kube-apiserver instead).
#
# Creates a kind cluster, builds and loads both images, installs the Helm chart exactly as the
# README's install section says, deploys a sample workload that gets the sidecar injected, checks
# a real request path through the injected sidecar, then runs the same end-to-end suite
# (tests/tests/*.rs) against the kind apiserver.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CLUSTER=${KIND_CLUSTER:-keylimit}
TAG=${TAG:-dev}
NS=keylimit-system

command -v docker >/dev/null || { echo "kind needs a Docker engine; use hack/test.sh here" >&2; exit 1; }
command -v kind >/dev/null || { echo "install kind (go install sigs.k8s.io/kind@v0.31.0)" >&2; exit 1; }

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --image "kindest/node:v1.37.2" --wait 120s
fi
export KUBECONFIG=${KUBECONFIG:-$HOME/.kube/config}
kubectl config use-context "kind-$CLUSTER"

docker build --target operator -t "keylimit/operator:$TAG" .
docker build --target sidecar -t "keylimit/sidecar:$TAG" .
kind load docker-image --name "$CLUSTER" "keylimit/operator:$TAG" "keylimit/sidecar:$TAG"

helm upgrade --install keylimit charts/keylimit --namespace "$NS" --create-namespace \
  --set image.tag="$TAG" --set sidecar.image.tag="$TAG" --wait --timeout 180s
kubectl -n "$NS" rollout status deploy/keylimit-operator --timeout=120s

# A sample workload, opted in by label + annotation.
kubectl create namespace shop --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace shop keylimit.dev/inject=enabled --overwrite
kubectl apply -n shop -f examples/
kubectl apply -n shop -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  replicas: 1
  selector: {matchLabels: {app: api}}
  template:
    metadata:
      labels: {app: api}
      annotations: {keylimit.dev/policy: standard}
    spec:
      securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: app
          image: registry.k8s.io/e2e-test-images/agnhost:2.53
          args: ["netexec", "--http-port=8080"]
          ports: [{name: http, containerPort: 8080}]
          securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http}]
YAML
kubectl -n shop rollout status deploy/api --timeout=180s
kubectl -n shop get pod -l app=api -o jsonpath='{.items[0].spec.initContainers[*].name}' | grep -q keylimit-sidecar

KEY=$(kubectl -n shop get secret acme-key -o jsonpath='{.data.key}' | base64 -d)
kubectl -n shop port-forward svc/api 18080:80 >/tmp/keylimit-pf.log 2>&1 &
PF=$!
trap 'kill $PF 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -fs -o /dev/null -H "X-API-Key: $KEY" http://127.0.0.1:18080/ && break; sleep 0.2; done
codes=$(for _ in $(seq 1 9); do curl -s -o /dev/null -w '%{http_code} ' -H "X-API-Key: $KEY" http://127.0.0.1:18080/; done)
echo "status codes through the injected sidecar: $codes"
[[ $codes == *429* ]] || { echo "expected a 429 through the injected sidecar" >&2; exit 1; }
kubectl -n shop wait --for=condition=Exhausted apikey/acme --timeout=30s
kubectl -n shop get apikeys

# The same suite as hack/test.sh, against the kind apiserver.
kubectl apply --server-side -f crds/
cargo build -p keylimit-operator -p keylimit-sidecar -p keylimit-e2e --bins
cargo test -p keylimit-e2e --tests -- --ignored --test-threads=3
