#!/usr/bin/env bash
# Sets up a fresh machine and runs every quality gate and test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

# Clippy lints the workspace's own crates while the tests build: clippy-driver wraps rustc for them
# (as `cargo clippy` does, but compiling instead of only checking), so every dependency is compiled
# once rather than also checked a second time for the lints, minutes of a cold run. -D warnings makes
# any rustc or clippy warning an error, as `cargo clippy -- -D warnings` does; dependencies' lints are
# capped by cargo as always. Both cargo test invocations below use the same settings, so the second
# runs what the first built. (scripts/lint.sh runs the same gates with `cargo clippy`, standalone.)
RUSTC_WORKSPACE_WRAPPER=$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver || true)
# Without it the build would pass unlinted: say so and stop.
if [ -z "$RUSTC_WORKSPACE_WRAPPER" ]; then
  echo "test.sh: clippy-driver not found (rustup component add clippy)" >&2
  exit 1
fi
export RUSTC_WORKSPACE_WRAPPER
export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"
echo "== cargo test --no-run, linted by clippy -D warnings (every target)"
cargo test --workspace --all-targets --locked --no-run
echo "== clippy -D warnings (the binary as production images build it: no bench harness)"
# As a test build too: the same profile as above, so no dependency is compiled again.
cargo test -p pipeline --no-default-features --bin tcplake --locked --no-run
echo "== cargo clippy -D warnings (kernel programs, BPF target)"
RUSTFLAGS='--cfg bpf_target_arch="x86_64"' RUSTC_WORKSPACE_WRAPPER='' cargo +nightly clippy --locked \
  -p probe-ebpf --target bpfel-unknown-none -Z build-std=core --target-dir target/bpf-clippy \
  -- -D warnings

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
