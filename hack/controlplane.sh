#!/usr/bin/env bash
# A real, local Kubernetes control plane: etcd + kube-apiserver +
# kube-controller-manager as processes on 127.0.0.1 (no kubelet, no scheduler:
# pods are admitted and stored but never run).
#
#   hack/controlplane.sh up     start it; prints `export KUBECONFIG=...` on stdout
#   hack/controlplane.sh env    print the export line of a running one
#   hack/controlplane.sh down   stop it and remove its state dir (safe to repeat)
#
# Binaries come from hack/build-tools.sh. Environment:
#   KEYLIMIT_CP_DIR   state dir (certs, data, logs, pids); default /tmp/keylimit-cp
#   KEYLIMIT_CACHE    build cache; binaries in $KEYLIMIT_CACHE/bin
#   KEYLIMIT_BIN_DIR  override the binaries' dir
#   CP_TIMEOUT        seconds to wait for each component; default 120
#
# Only stdout carries the export line, so `eval "$(hack/controlplane.sh up)"`
# works; progress goes to stderr. Everything binds to 127.0.0.1 only.
set -euo pipefail

CP_DIR="${KEYLIMIT_CP_DIR:-/tmp/keylimit-cp}"
[[ "${CP_DIR}" == /* ]] || CP_DIR="${PWD}/${CP_DIR}"
CP_DIR="${CP_DIR%/}"
[[ -n "${CP_DIR}" ]] || { echo "KEYLIMIT_CP_DIR must not be /" >&2; exit 2; }
CACHE_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}"
BIN_DIR="${KEYLIMIT_BIN_DIR:-${CACHE_DIR}/bin}"
TIMEOUT="${CP_TIMEOUT:-120}"
readonly CP_DIR CACHE_DIR BIN_DIR TIMEOUT
# A file that marks the dir as ours: `down` never deletes a dir without it.
readonly MARKER=".keylimit-controlplane"
# Components in start order; stopped in reverse.
readonly COMPONENTS=(etcd kube-apiserver kube-controller-manager)
readonly SERVICE_CIDR=10.0.0.0/24
readonly SERVICE_IP=10.0.0.1

log() { printf '[controlplane] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
  sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

# ---------------------------------------------------------------------------
# processes

# The pid recorded for a component, if that process is still alive and is ours
# (its command line names our state dir: guards against pid reuse).
live_pid() { # <component>
  local f="${CP_DIR}/$1.pid" pid state cmdline
  [[ -f "${f}" ]] || return 1
  pid=$(<"${f}")
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/${pid}/cmdline" ]] || return 1
  # A zombie (exited, not yet reaped by its parent) counts as gone.
  state=$(sed -e 's/^.*) //' "/proc/${pid}/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ "${state}" != Z ]] || return 1
  # While a process is inside execve (nohup exec'ing a 100 MB binary from a cold page cache
  # takes a while after a long build), /proc/<pid>/cmdline reads empty. That is the process
  # starting, not gone: it read as "exited during startup" with an empty log, twice.
  cmdline=$(tr '\0' ' ' < "/proc/${pid}/cmdline" 2>/dev/null) || return 1
  if [[ -n "${cmdline}" ]]; then
    grep -qF -- "${CP_DIR}/" <<<"${cmdline}" || return 1
  fi
  printf '%s\n' "${pid}"
}

# Poll until a pid is gone or the deadline (seconds) passes.
wait_gone() { # <component> <seconds>
  local deadline=$((SECONDS + $2))
  while live_pid "$1" >/dev/null; do
    (( SECONDS < deadline )) || return 1
    sleep 0.2
  done
}

stop_component() { # <component>
  local name=$1 pid
  pid=$(live_pid "${name}") || { rm -f "${CP_DIR}/${name}.pid"; return 0; }
  log "stopping ${name} (pid ${pid})"
  kill -TERM "${pid}" 2>/dev/null || true
  if ! wait_gone "${name}" 20; then
    log "${name} did not exit after SIGTERM; sending SIGKILL"
    kill -KILL "${pid}" 2>/dev/null || true
    wait_gone "${name}" 10 || die "${name} (pid ${pid}) would not die"
  fi
  rm -f "${CP_DIR}/${name}.pid"
}

start_component() { # <component> <args...>
  local name=$1; shift
  log "starting ${name}"
  # stdin from /dev/null and output to a log, so the caller's pipes are not
  # held open. Not setsid: the processes stay in the caller's process group.
  nohup "${BIN_DIR}/${name}" "$@" </dev/null >"${CP_DIR}/${name}.log" 2>&1 &
  local pid=$! deadline=$((SECONDS + 10))
  printf '%s\n' "${pid}" > "${CP_DIR}/${name}.pid"
  # Until the forked shell has exec'd the binary, its cmdline is this script's, which
  # live_pid rightly does not recognise; a check in that window read as "exited during
  # startup" on a busy machine. Wait for the exec (or the process's end) first.
  while [[ -r "/proc/${pid}/cmdline" ]] \
    && ! tr '\0' ' ' < "/proc/${pid}/cmdline" 2>/dev/null | grep -F -- "${BIN_DIR}/${name}" >/dev/null; do
    (( SECONDS < deadline )) || break
    sleep 0.05
  done
}

# curl arguments that make its output the HTTP status code alone.
readonly HTTP_CODE=(--output /dev/null --write-out '%{http_code}')

# Poll a URL until curl's output contains <want>, failing early if <component>
# dies.
wait_for() { # <component> <want> <curl args...>
  local name=$1 want=$2 deadline=$((SECONDS + TIMEOUT)) body
  shift 2
  while :; do
    live_pid "${name}" >/dev/null || fail_with_log "${name} exited during startup"
    body=$(curl --silent --max-time 5 "$@" 2>/dev/null) || body=""
    [[ "${body}" == *"${want}"* ]] && return 0
    (( SECONDS < deadline )) || fail_with_log "${name} not ready after ${TIMEOUT}s (last answer: ${body:0:200})" "${name}"
    sleep 0.25
  done
}

fail_with_log() { # <message> [component]
  local name=${2:-} c
  log "ERROR: $1"
  for c in "${COMPONENTS[@]}"; do
    [[ -z "${name}" || "${c}" == "${name}" ]] || continue
    if [[ -s "${CP_DIR}/${c}.log" ]]; then
      log "--- last lines of ${CP_DIR}/${c}.log"
      tail -n 25 "${CP_DIR}/${c}.log" >&2
    fi
  done
  exit 1
}

# ---------------------------------------------------------------------------
# ports, certificates, kubeconfigs

# Prints <n> distinct free TCP ports on 127.0.0.1. Holding all sockets open
# until every port is chosen keeps them distinct.
free_ports() { # <n>
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
  else
    # Fallback: random high ports that nothing answers on.
    local -a ports=()
    local p tries=0
    while (( ${#ports[@]} < $1 )); do
      (( tries++ < 1000 )) || die "could not find free ports"
      p=$(( 20000 + RANDOM % 30000 ))
      [[ " ${ports[*]} " != *" ${p} "* ]] || continue
      if ! (exec 3<>"/dev/tcp/127.0.0.1/${p}") 2>/dev/null; then ports+=("${p}"); fi
    done
    printf '%s\n' "${ports[*]}"
  fi
}

# Signs a certificate with our CA. Keys are ECDSA P-256 (cheap to generate).
issue_cert() { # <basename> <subject> <extensions> [ca basename]
  local base="${CP_DIR}/pki/$1" ca="${CP_DIR}/pki/${4:-ca}"
  openssl ecparam -name prime256v1 -genkey -noout -out "${base}.key" 2>/dev/null
  openssl req -new -key "${base}.key" -subj "$2" -out "${base}.csr" 2>/dev/null
  printf '%s\n' "$3" > "${base}.ext"
  openssl x509 -req -in "${base}.csr" -CA "${ca}.crt" -CAkey "${ca}.key" \
    -CAcreateserial -days 365 -sha256 -extfile "${base}.ext" -out "${base}.crt" 2>/dev/null
  rm -f "${base}.csr" "${base}.ext"
}

make_pki() {
  local pki="${CP_DIR}/pki"
  mkdir -p "${pki}"
  chmod 700 "${pki}"
  openssl ecparam -name prime256v1 -genkey -noout -out "${pki}/ca.key" 2>/dev/null
  openssl req -x509 -new -key "${pki}/ca.key" -subj "/CN=keylimit-local-ca" -days 365 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "${pki}/ca.crt" 2>/dev/null

  local server_ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
  local client_ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

  issue_cert apiserver "/CN=kube-apiserver" "${server_ext}
subjectAltName=IP:127.0.0.1,IP:::1,IP:${SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  issue_cert controller-manager-serving "/CN=kube-controller-manager" "${server_ext}
subjectAltName=IP:127.0.0.1,DNS:localhost"
  issue_cert admin "/O=system:masters/CN=admin" "${client_ext}"
  issue_cert controller-manager "/CN=system:kube-controller-manager" "${client_ext}"

  # Front-proxy (aggregation layer) CA and client: kubeadm's layout. Without
  # it, delegated authentication in kube-controller-manager logs errors.
  openssl ecparam -name prime256v1 -genkey -noout -out "${pki}/front-proxy-ca.key" 2>/dev/null
  openssl req -x509 -new -key "${pki}/front-proxy-ca.key" -subj "/CN=keylimit-front-proxy-ca" \
    -days 365 -sha256 -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "${pki}/front-proxy-ca.crt" 2>/dev/null
  issue_cert front-proxy-client "/CN=front-proxy-client" "${client_ext}" front-proxy-ca

  # Service-account token signing key pair (RSA).
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "${pki}/sa.key" 2>/dev/null
  openssl pkey -in "${pki}/sa.key" -pubout -out "${pki}/sa.pub" 2>/dev/null
  chmod 600 "${pki}"/*.key
}

b64() { base64 < "$1" | tr -d '\n'; }

write_kubeconfig() { # <file> <user> <cert basename> <server url>
  local pki="${CP_DIR}/pki"
  umask 077
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: keylimit-local
  cluster:
    server: $4
    certificate-authority-data: $(b64 "${pki}/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(b64 "${pki}/$3.crt")
    client-key-data: $(b64 "${pki}/$3.key")
contexts:
- name: keylimit-local
  context:
    cluster: keylimit-local
    user: $2
current-context: keylimit-local
EOF
}

export_line() { printf 'export KUBECONFIG=%s\n' "${CP_DIR}/kubeconfig"; }

# ---------------------------------------------------------------------------
# subcommands

any_running() {
  local c
  for c in "${COMPONENTS[@]}"; do
    live_pid "${c}" >/dev/null && return 0
  done
  return 1
}

stop_all() {
  local i
  for (( i = ${#COMPONENTS[@]} - 1; i >= 0; i-- )); do
    stop_component "${COMPONENTS[i]}"
  done
}

cmd_down() {
  if [[ ! -e "${CP_DIR}" ]]; then
    log "nothing to stop: ${CP_DIR} does not exist"
    return 0
  fi
  if [[ ! -f "${CP_DIR}/${MARKER}" ]]; then
    # An empty dir (e.g. from mktemp -d) is fine to remove; anything else is
    # not ours.
    if [[ -d "${CP_DIR}" && -z "$(ls -A "${CP_DIR}")" ]]; then
      rmdir "${CP_DIR}"
      return 0
    fi
    die "${CP_DIR} exists but was not made by this script (no ${MARKER}); not touching it"
  fi
  stop_all
  rm -rf "${CP_DIR}"
  log "stopped; removed ${CP_DIR}"
}

cmd_env() {
  if [[ ! -f "${CP_DIR}/kubeconfig" ]] || ! live_pid kube-apiserver >/dev/null; then
    die "no control plane running in ${CP_DIR} (run: $0 up)"
  fi
  export_line
}

cmd_up() {
  local start=${SECONDS} c
  for c in "${COMPONENTS[@]}"; do
    [[ -x "${BIN_DIR}/${c}" ]] || die "${BIN_DIR}/${c} missing: run hack/build-tools.sh first"
  done
  command -v openssl >/dev/null 2>&1 || die "openssl is required"
  command -v curl >/dev/null 2>&1 || die "curl is required"

  # An existing empty dir (e.g. made with mktemp -d) is simply used.
  if [[ -e "${CP_DIR}" ]] && ! [[ -d "${CP_DIR}" && -z "$(ls -A "${CP_DIR}")" ]]; then
    if [[ -f "${CP_DIR}/${MARKER}" ]] && any_running; then
      if [[ -f "${CP_DIR}/kubeconfig" ]] && live_pid kube-apiserver >/dev/null \
          && live_pid kube-controller-manager >/dev/null; then
        log "already up in ${CP_DIR}"
        export_line
        return 0
      fi
      log "a partial control plane is running in ${CP_DIR}; restarting it"
    fi
    cmd_down
  fi

  mkdir -p "${CP_DIR}"
  touch "${CP_DIR}/${MARKER}"
  # From here on, a failure stops whatever was started; the dir (with logs)
  # stays for inspection until `down` or the next `up`.
  trap 'rc=$?; if (( rc != 0 )); then log "up failed; stopping (logs kept in ${CP_DIR}; \`$0 down\` removes them)"; stop_all || true; fi' EXIT

  local etcd_client etcd_peer api_port kcm_port
  read -r etcd_client etcd_peer api_port kcm_port <<< "$(free_ports 4)"
  local api_url="https://127.0.0.1:${api_port}"
  local pki="${CP_DIR}/pki"

  make_pki
  log "certificates ready ($((SECONDS - start))s)"

  # --- etcd: plain HTTP on loopback, throwaway data, no fsync.
  start_component etcd \
    --name=keylimit \
    --data-dir="${CP_DIR}/etcd-data" \
    --listen-client-urls="http://127.0.0.1:${etcd_client}" \
    --advertise-client-urls="http://127.0.0.1:${etcd_client}" \
    --listen-peer-urls="http://127.0.0.1:${etcd_peer}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${etcd_peer}" \
    --initial-cluster="keylimit=http://127.0.0.1:${etcd_peer}" \
    --unsafe-no-fsync=true \
    --log-level=warn
  wait_for etcd '"health":"true"' "http://127.0.0.1:${etcd_client}/health"
  log "etcd healthy on 127.0.0.1:${etcd_client} ($((SECONDS - start))s)"

  # --- kube-apiserver. Endpoints may not hold a loopback IP, so the reconciler
  # of the `kubernetes` Service's endpoints is off (no pods run here anyway).
  write_kubeconfig "${CP_DIR}/kubeconfig" admin admin "${api_url}"
  write_kubeconfig "${CP_DIR}/controller-manager.kubeconfig" \
    system:kube-controller-manager controller-manager "${api_url}"
  mkdir -p "${CP_DIR}/apiserver-certs" "${CP_DIR}/controller-manager-certs"
  start_component kube-apiserver \
    --etcd-servers="http://127.0.0.1:${etcd_client}" \
    --cert-dir="${CP_DIR}/apiserver-certs" \
    --tls-cert-file="${pki}/apiserver.crt" \
    --tls-private-key-file="${pki}/apiserver.key" \
    --client-ca-file="${pki}/ca.crt" \
    --secure-port="${api_port}" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --allow-privileged=true \
    --authorization-mode=RBAC \
    --enable-admission-plugins=NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,PodSecurity \
    --service-account-issuer="${api_url}/" \
    --service-account-key-file="${pki}/sa.pub" \
    --service-account-signing-key-file="${pki}/sa.key" \
    --requestheader-client-ca-file="${pki}/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="${pki}/front-proxy-client.crt" \
    --proxy-client-key-file="${pki}/front-proxy-client.key" \
    --profiling=false
  wait_for kube-apiserver 200 "${HTTP_CODE[@]}" --cacert "${pki}/ca.crt" \
    --cert "${pki}/admin.crt" --key "${pki}/admin.key" "${api_url}/readyz"
  log "kube-apiserver ready on ${api_url} ($((SECONDS - start))s)"

  # --- kube-controller-manager: only what an apiserver-only cluster needs.
  # Each controller acts as its own kube-system ServiceAccount (as kubeadm
  # sets it up): the bootstrapped system:kube-controller-manager role alone
  # may not delete arbitrary objects (garbage collector, namespace deletion),
  # publish kube-root-ca.crt or aggregate ClusterRoles.
  start_component kube-controller-manager \
    --kubeconfig="${CP_DIR}/controller-manager.kubeconfig" \
    --authentication-kubeconfig="${CP_DIR}/controller-manager.kubeconfig" \
    --authorization-kubeconfig="${CP_DIR}/controller-manager.kubeconfig" \
    --controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,clusterrole-aggregation-controller \
    --service-account-private-key-file="${pki}/sa.key" \
    --root-ca-file="${pki}/ca.crt" \
    --use-service-account-credentials=true \
    --leader-elect=false \
    --bind-address=127.0.0.1 \
    --secure-port="${kcm_port}" \
    --cert-dir="${CP_DIR}/controller-manager-certs" \
    --tls-cert-file="${pki}/controller-manager-serving.crt" \
    --tls-private-key-file="${pki}/controller-manager-serving.key"
  wait_for kube-controller-manager 200 "${HTTP_CODE[@]}" --cacert "${pki}/ca.crt" \
    "https://127.0.0.1:${kcm_port}/healthz"
  log "kube-controller-manager healthy on 127.0.0.1:${kcm_port} ($((SECONDS - start))s)"

  # The serviceaccount controller creates `default` in every namespace.
  wait_for kube-controller-manager 200 "${HTTP_CODE[@]}" --cacert "${pki}/ca.crt" \
    --cert "${pki}/admin.crt" --key "${pki}/admin.key" \
    "${api_url}/api/v1/namespaces/default/serviceaccounts/default"

  cat > "${CP_DIR}/info" <<EOF
KEYLIMIT_CP_APISERVER=${api_url}
KEYLIMIT_CP_ETCD=http://127.0.0.1:${etcd_client}
KEYLIMIT_CP_CONTROLLER_MANAGER=https://127.0.0.1:${kcm_port}
EOF
  trap - EXIT
  log "control plane up in $((SECONDS - start))s (state, logs and pids in ${CP_DIR})"
  export_line
}

main() {
  [[ $# -eq 1 ]] || usage
  case "$1" in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    -h|--help|help) usage ;;
    *) usage ;;
  esac
}

main "$@"
