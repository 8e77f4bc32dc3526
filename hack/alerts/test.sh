#!/usr/bin/env bash
# Checks and unit-tests the chart's PrometheusRule with promtool (Debian's prometheus package):
# renders the rules with `helm template` so what is tested is exactly what the chart installs,
# runs `promtool check rules` and `promtool test rules` (hack/alerts/tests.yaml), and fails if
# an alert lacks a firing or a quiet test.
set -euo pipefail
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="$(cd "${HACK_DIR}/.." && pwd)"
HELM="${HELM:-${KEYLIMIT_CACHE:-${HOME}/.cache/keylimit}/bin/helm}"

if ! command -v promtool >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq prometheus
fi
[[ -x "${HELM}" ]] || { echo "no helm at ${HELM}: run hack/build-tools.sh" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
"${HELM}" template kl "${REPO}/charts/keylimit" -n kl-system \
  --set metrics.alerts.enabled=true --show-only templates/prometheusrule.yaml \
  >"${work}/prometheusrule.yaml"
# promtool reads a rule file (`groups:`), i.e. the PrometheusRule's spec, dedented.
awk '/^spec:/{on=1; next} on && /^[^ ]/{on=0} on{sub(/^  /, ""); print}' \
  "${work}/prometheusrule.yaml" >"${work}/rules.yaml"
cp "${HACK_DIR}/alerts/tests.yaml" "${work}/tests.yaml"

promtool check rules "${work}/rules.yaml"

# Every alert of the chart needs a test where it fires and one where it stays quiet
# (`exp_alerts: []`), and the tests may name only alerts the chart has.
alerts=$(awk '/^ *- alert: /{print $3}' "${work}/rules.yaml" | sort -u)
[[ -n "${alerts}" ]] || { echo "no alerts rendered" >&2; exit 1; }
awk '
  /^ *alertname: /{name=$2; next}
  name != "" && /^ *exp_alerts: *\[\] *$/{print "quiet " name; name=""; next}
  name != "" && /^ *exp_alerts: *$/{print "fires " name; name=""; next}
' "${work}/tests.yaml" | sort -u >"${work}/cases"
missing=0
for a in ${alerts}; do
  for kind in fires quiet; do
    grep -qx "${kind} ${a}" "${work}/cases" || { echo "no '${kind}' test for alert ${a}" >&2; missing=1; }
  done
done
for t in $(awk '{print $2}' "${work}/cases" | sort -u); do
  grep -qx "${t}" <<<"${alerts}" || { echo "tests.yaml tests ${t}, which the chart does not define" >&2; missing=1; }
done
((missing == 0)) || exit 1

promtool test rules "${work}/tests.yaml"
echo "alerts: $(wc -w <<<"${alerts}") alerts checked and unit-tested"
