#!/usr/bin/env bash
# The lint gates: clippy -D warnings on the workspace (every target), on the binary as production
# images build it (no bench harness), and on the kernel programs for the BPF target: the same gates
# scripts/test.sh applies while it builds the tests, for running alone (after `scripts/setup.sh`).
#
# It checks in its own target directory (target/lint), so a check never invalidates a test build.
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
