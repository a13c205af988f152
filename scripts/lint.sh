#!/usr/bin/env bash
# The lint gates: clippy -D warnings on the workspace (every target), on the binary as production
# images build it (no bench harness), and on the kernel programs for the BPF target. scripts/test.sh
# runs this beside the tests; run it alone after `scripts/setup.sh`.
#
# It checks in its own target directory (target/lint): a check shares no compiled dependency with a
# test build anyway, and its own directory means it never waits on the test run's lock.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked --target-dir target/lint -- -D warnings
echo "== cargo clippy -D warnings (the binary as production images build it: no bench harness)"
cargo clippy -p pipeline --no-default-features --bin tcplake --locked --target-dir target/lint \
  -- -D warnings
echo "== cargo clippy -D warnings (kernel programs, BPF target)"
RUSTFLAGS='--cfg bpf_target_arch="x86_64"' cargo +nightly clippy --locked -p probe-ebpf \
  --target bpfel-unknown-none -Z build-std=core --target-dir target/bpf-clippy -- -D warnings
echo "== lint: ok"
