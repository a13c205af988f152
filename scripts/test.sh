#!/usr/bin/env bash
# Sets up a fresh machine and runs every quality gate and test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo clippy -D warnings (the binary as production images build it: no bench harness)"
cargo clippy -p pipeline --no-default-features --bin tcplake --locked -- -D warnings
echo "== cargo clippy -D warnings (kernel programs, BPF target)"
RUSTFLAGS='--cfg bpf_target_arch="x86_64"' cargo +nightly clippy --locked -p probe-ebpf \
  --target bpfel-unknown-none -Z build-std=core --target-dir target/bpf-clippy -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: one failing binary must not hide the results of the others.
status=0
faults=target/tmp/fault-report.tsv   # rows appended by the fault tests (tests/it/common::report_fault)
rm -f "$faults"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
if [ -s "$faults" ]; then
  echo "== fault suite (each row: a fault injected on loopback, and the output compared afterwards)"
  sort "$faults" | awk -F'\t' '{ printf "  %-90s %s\n", $1, $2 }'
fi
# One closing line with the totals over every test binary (cargo prints one line per binary), also
# when some failed; the exit status is cargo's.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
