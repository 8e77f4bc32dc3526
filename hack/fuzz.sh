#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for a bounded time:
#   bash hack/fuzz.sh [seconds per target, default 20]
# Fails on any crash, panic, failed property, timeout or out-of-memory, after running every
# target. A failing input is kept in fuzz/artifacts/<target>/; replay it with
#   cargo fuzz run --sanitizer none <target> fuzz/artifacts/<target>/<file>
# Each run starts from fuzz/seeds/<target>/ (committed, tiny) plus fuzz/corpus/<target>/
# (what earlier local runs found; ignored by git, so CI starts from the seeds alone).
#
# Built with the stable compiler and no sanitizer: the code under test forbids unsafe code, so
# AddressSanitizer would mostly watch the dependencies, needs nightly and costs 4-6x the
# executions. Debug assertions and overflow checks are on (cargo-fuzz's default without -O).
# FUZZ_SANITIZER=address switches to nightly and ASan (rustup installs nightly if missing).
# The build goes to the keylimit cache, not the work tree: CI's fresh clone reuses it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs="${1:-20}"
[[ $secs =~ ^[1-9][0-9]*$ ]] || {
  echo "usage: $0 [seconds per target]" >&2
  exit 2
}
targets=(dataplane_parse path_normalize key_extraction usage_scan upstream_answer)
sanitizer="${FUZZ_SANITIZER:-none}"
target_dir="${KEYLIMIT_CACHE:-$HOME/.cache/keylimit}/fuzz-target"

cargo fuzz --version >/dev/null 2>&1 || bash hack/install-deps.sh
toolchain=stable
if [[ $sanitizer != none ]]; then
  toolchain=nightly
  rustup run nightly rustc --version >/dev/null 2>&1 ||
    rustup toolchain install nightly --profile minimal --no-self-update
fi
fuzz=(cargo "+$toolchain" fuzz)
opts=(--fuzz-dir fuzz --sanitizer "$sanitizer" --target-dir "$target_dir")

# Not a member of the main workspace, so `cargo fmt --all` in hack/test.sh does not see it.
rustfmt --edition 2021 --check fuzz/fuzz_targets/*.rs
# The fuzz workspace builds the same crate versions as the main one: its lock file is a copy.
cp Cargo.lock fuzz/Cargo.lock
start=$SECONDS
"${fuzz[@]}" build "${opts[@]}"
echo "fuzz: targets built in $((SECONDS - start))s ($toolchain, sanitizer $sanitizer)"

logs="$(mktemp -d /tmp/keylimit-fuzz.XXXXXX)"
failed=()
passed=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="$logs/$t.log"
  rc=0
  # -timeout: one input running 10 s is a hang; -rss_limit_mb: well inside a 2-core,
  # 24 GiB machine that also runs the build of others.
  "${fuzz[@]}" run "${opts[@]}" "$t" \
    "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  if ((rc == 0)); then
    passed=$((passed + 1))
    echo "fuzz: $t: ${execs:-?} executions in ${secs}s (${rate:-?}/s), corpus $corpus inputs"
  else
    failed+=("$t")
    echo "fuzz: $t FAILED (exit $rc) after ${execs:-?} executions:" >&2
    # The failed property and the input, without the backtrace libFuzzer prints between.
    grep -A6 -E "panicked at|^==[0-9]+== ?ERROR|^SUMMARY" "$log" >&2 || tail -n 40 "$log" >&2
    sed -n '/^Reproduce with:/,/^Minimize/p' "$log" >&2
  fi
done
rm -rf "$logs"

echo "fuzz: $passed passed, ${#failed[@]} failed"
((${#failed[@]} == 0))
