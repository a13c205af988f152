#!/usr/bin/env bash
# Runs tcplake as one process (capture, aggregate and sink joined in memory): the counterpart of
# deploy-split/run.sh, taking the same arguments, so the two deployments can be compared on one machine.
#
#   deploy-monolith/run.sh                   live eBPF capture for 30 s (root)
#   deploy-monolith/run.sh --source synthetic --events 2000000
#
# Environment: TCPLAKE_OUT (default ./tcplake-data-monolith), TCPLAKE_RUN_FOR (live capture, 30s).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${TCPLAKE_OUT:-./tcplake-data-monolith}
scripts/setup.sh run
cargo build --release --locked -p pipeline --bin tcplake
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--duration "${TCPLAKE_RUN_FOR:-30s}")
fi
exec ./target/release/tcplake --mode monolith --out "$out" "${args[@]}"
