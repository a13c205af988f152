#!/usr/bin/env bash
# Sets up a fresh machine and runs every quality gate and test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo test: build"
cargo test --workspace --locked --no-run

# The lints (scripts/lint.sh: clippy on every target, the production binary and the kernel programs)
# run beside the tests at the lowest CPU priority: they use the cycles the tests spend waiting on
# servers, the kernel and timers, and take almost none from the tests when both want the CPU. A cold
# check of every dependency is minutes of CPU, which this hides inside the test run.
lint_log=$(mktemp)
log=$(mktemp)
trap 'rm -f "$log" "$lint_log"' EXIT
nice -n 19 scripts/lint.sh >"$lint_log" 2>&1 &
lint_pid=$!

echo "== cargo test"
# --no-fail-fast: one failing binary must not hide the results of the others.
status=0
faults=target/tmp/fault-report.tsv   # rows appended by the fault tests (tests/it/common::report_fault)
rm -f "$faults"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
if [ -s "$faults" ]; then
  echo "== fault suite (each row: a fault injected on loopback, and the output compared afterwards)"
  sort "$faults" | awk -F'\t' '{ printf "  %-90s %s\n", $1, $2 }'
fi

lint_status=0
wait "$lint_pid" || lint_status=$?
cat "$lint_log"
if [ "$lint_status" -ne 0 ]; then
  echo "== lint FAILED (exit $lint_status): see the clippy output above"
  [ "$status" -ne 0 ] || status=$lint_status
fi
# One closing line with the totals over every test binary (cargo prints one line per binary), also
# when some failed; the exit status is cargo's, or the lint's when only the lint failed.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
