#!/usr/bin/env bash
# Makes a working Docker engine on this machine, idempotently:
#  - installs Debian's docker.io (dockerd 20.10) and debootstrap when missing;
#  - builds the runc wrapper (hack/kind/runc-wrapper) and registers it as dockerd's default
#    runtime in /etc/docker/daemon.json (other keys kept). Our capability bounding set lacks
#    CAP_SYS_RESOURCE, so `docker run --privileged` (every kind node) fails with stock runc:
#    "unable to apply caps: operation not permitted"; the wrapper drops what we cannot grant;
#  - starts dockerd in the background when none runs (log in the cache dir), or reloads it
#    (SIGHUP) when daemon.json changed under a running daemon, and waits (bounded) until it
#    answers with our default runtime. The host's cgroup mounts are left as they are.
# The docker CLI first on PATH may be newer than dockerd 20.10 (API 1.41); it negotiates the
# API version down, which is checked at the end.
set -euo pipefail
KIND_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}/kind"
WRAPPER=/usr/local/libexec/keylimit/runc-wrapper
RUNTIME_NAME=keylimit-runc
DAEMON_JSON=/etc/docker/daemon.json
WAIT_SECONDS=${DOCKER_WAIT_SECONDS:-60}
log() { printf '[docker.sh] %s\n' "$*" >&2; }
die() { printf '[docker.sh] error: %s\n' "$*" >&2; exit 1; }
if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
mkdir -p "${CACHE_DIR}"

# --- packages ---------------------------------------------------------------------------------
need=()
for pkg in docker.io debootstrap; do
  dpkg -s "${pkg}" >/dev/null 2>&1 || need+=("${pkg}")
done
if ((${#need[@]})); then
  log "installing ${need[*]} with apt-get..."
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
[[ -x /usr/sbin/runc || -x /usr/bin/runc ]] || die "runc missing after installing docker.io"
command -v dockerd >/dev/null || die "dockerd missing after installing docker.io"

# --- runc wrapper -----------------------------------------------------------------------------
built="$("${KIND_DIR}/runc-wrapper/build.sh")"
if ! cmp -s "${built}" "${WRAPPER}"; then
  # Copy then rename: the old binary may be executing right now.
  "${SUDO[@]}" mkdir -p "$(dirname "${WRAPPER}")"
  "${SUDO[@]}" install -m 0755 "${built}" "${WRAPPER}.new"
  "${SUDO[@]}" mv -f "${WRAPPER}.new" "${WRAPPER}"
  log "installed ${WRAPPER}"
fi

# --- daemon.json: merge our runtime in, keep every other key ----------------------------------
command -v python3 >/dev/null || die "python3 is needed to merge ${DAEMON_JSON}"
new_json="$(python3 - "${DAEMON_JSON}" "${RUNTIME_NAME}" "${WRAPPER}" <<'PY'
import json, os, sys
path, name, wrapper = sys.argv[1:4]
cfg = {}
if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path) as f:
        try:
            cfg = json.load(f)
        except ValueError as e:
            sys.exit(f"{path} is not valid JSON ({e}); fix or remove it")
cfg.setdefault("runtimes", {})[name] = {"path": wrapper}
cfg["default-runtime"] = name
print(json.dumps(cfg, indent=2, sort_keys=True))
PY
)"
daemon_json_changed=0
if [[ "$(cat "${DAEMON_JSON}" 2>/dev/null)" != "${new_json}" ]]; then
  "${SUDO[@]}" mkdir -p "$(dirname "${DAEMON_JSON}")"
  printf '%s\n' "${new_json}" | "${SUDO[@]}" tee "${DAEMON_JSON}.new" >/dev/null
  "${SUDO[@]}" mv -f "${DAEMON_JSON}.new" "${DAEMON_JSON}"
  daemon_json_changed=1
  log "wrote ${DAEMON_JSON} (default runtime ${RUNTIME_NAME})"
fi

# --- dockerd ----------------------------------------------------------------------------------
docker_ok() { "${SUDO[@]}" docker info >/dev/null 2>&1; }
runtime_ok() {
  [[ "$("${SUDO[@]}" docker info --format '{{.DefaultRuntime}}' 2>/dev/null)" == "${RUNTIME_NAME}" ]]
}
dockerd_pid() { # the pid in docker.pid if that process is alive
  local pid
  pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
  [[ -n "${pid}" ]] && "${SUDO[@]}" kill -0 "${pid}" 2>/dev/null && printf '%s\n' "${pid}"
}
start_dockerd() {
  # A dockerd that died (crash, kill -9) leaves docker.pid behind and the next one refuses to
  # start; a live one must not get a second instance.
  [[ -n "$(dockerd_pid || true)" ]] || "${SUDO[@]}" rm -f /var/run/docker.pid
  log "starting dockerd (log: ${CACHE_DIR}/dockerd.log)..."
  # setsid + nohup: dockerd outlives this script and its terminal. 8>&-: it must not inherit
  # (and so hold forever) the lock below.
  "${SUDO[@]}" setsid nohup dockerd --host unix:///var/run/docker.sock \
    >>"${CACHE_DIR}/dockerd.log" 2>&1 </dev/null 8>&- &
  started_pid=$!
}
started_pid=
# One docker.sh at a time: two concurrent callers would both start a dockerd.
exec 8>"${CACHE_DIR}/docker.sh.lock"
flock -w $((WAIT_SECONDS * 2)) 8 || die "another docker.sh holds ${CACHE_DIR}/docker.sh.lock"
if docker_ok && ((daemon_json_changed)); then
  # runtimes and default-runtime are reloadable: SIGHUP keeps running containers. daemon.json
  # always names our runtime in both keys together: dockerd 20.10 panics on a reload whose
  # default-runtime is missing from runtimes.
  pid="$(dockerd_pid || true)"
  [[ -n "${pid}" ]] || die "dockerd answers but /var/run/docker.pid names no live process; restart it to load ${DAEMON_JSON}"
  log "reloading dockerd (pid ${pid}) for ${DAEMON_JSON}"
  "${SUDO[@]}" kill -HUP "${pid}"
fi
deadline=$((SECONDS + WAIT_SECONDS))
until runtime_ok; do
  # Not answering and no live dockerd (never started, or died): start one. Otherwise it is
  # starting up or reloading: wait. (The one we started may not have written docker.pid yet.)
  if [[ -z "$(dockerd_pid || true)" ]] && ! { [[ -n "${started_pid}" ]] && kill -0 "${started_pid}" 2>/dev/null; }; then
    [[ -z "${started_pid}" ]] || die "dockerd exited during start-up; see ${CACHE_DIR}/dockerd.log"
    start_dockerd
  fi
  ((SECONDS < deadline)) || die "dockerd not answering with default runtime ${RUNTIME_NAME} within ${WAIT_SECONDS}s; see ${CACHE_DIR}/dockerd.log"
  sleep 0.5
done
log "dockerd $("${SUDO[@]}" docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}}), client {{.Client.Version}}') ready, default runtime ${RUNTIME_NAME}"
