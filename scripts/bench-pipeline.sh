#!/usr/bin/env bash
# The pipeline's CPU per event against pyarrow's Parquet writer, measured in one run on the same rows.
#   scripts/bench-pipeline.sh [EVENTS]    (default 3000000; needs scripts/setup.sh first)
# 1. tcplake end to end (synthetic source, seed 1: generate, aggregate, write events/ and flows/ as
#    Delta tables) pinned to one core, then on every core; best of three each.
# 2. pyarrow (bench/pyarrow_writer.py) writing the same event rows from memory on one thread, with its
#    defaults and with tcplake's settings.
# Prints events/s for each and the two ratios docs/results.md reports.
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-3000000}
cargo build --release --locked -p pipeline >&2
bin=${CARGO_TARGET_DIR:-target}/release/tcplake
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
best() { # best wall seconds of three runs of tcplake with the given cpu list
  local cpus=$1 best=
  for _ in 1 2 3; do
    rm -rf "$tmp/out"
    local t0 t1
    t0=$(date +%s.%N)
    taskset -c "$cpus" "$bin" --source synthetic --seed 1 --events "$events" --out "$tmp/out" --summary json >/dev/null 2>&1
    t1=$(date +%s.%N)
    best=$(python3 -c "b='$best'; t=$t1-$t0; print(t if not b else min(float(b), t))")
  done
  echo "$best"
}
all=$(python3 -c "import os; print(','.join(str(c) for c in sorted(os.sched_getaffinity(0))))")
one=$(best 0)
many=$(best "$all")
py=$(taskset -c 0 python3 bench/pyarrow_writer.py "$tmp/out" 3)
python3 - "$events" "$one" "$many" "$py" "$all" <<'PY'
import json, sys
events, one, many, py, cpus = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
r1, rn = events / one, events / many
d, t = py["pyarrow_defaults_zstd"], py["tcplake_settings"]
print(f"tcplake end to end, one core:   {r1:,.0f} events/s")
print(f"tcplake end to end, cores {cpus}: {rn:,.0f} events/s ({rn / r1:.2f}x one core)")
print(f"pyarrow write only, one thread, defaults + zstd:    {d['rows_per_sec']:,.0f} rows/s ({d['bytes']:,} bytes)")
print(f"pyarrow write only, one thread, tcplake's settings: {t['rows_per_sec']:,.0f} rows/s ({t['bytes']:,} bytes)")
print(f"tcplake one core / pyarrow: {r1 / d['rows_per_sec']:.2f}x (defaults), {r1 / t['rows_per_sec']:.2f}x (same settings)")
PY
