#!/usr/bin/env bash
# Soak benchmark: tcplake (monolith, synthetic source paced to a fixed rate) for MINUTES, RSS sampled
# every 10 s. Passes when memory is flat: the highest RSS of the second half is within 10 % of the
# highest RSS of the first half after a one-minute warm-up. Not part of CI (it runs for minutes).
#
#   scripts/soak.sh [MINUTES=10] [EVENTS_PER_SEC=200000] [REPORT=soak-report.tsv]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
rate=${2:-200000}
report=${3:-soak-report.tsv}
cargo build --release -q -p pipeline
bin=target/release/tcplake
out=$(mktemp -d "${TMPDIR:-/tmp}/tcplake-soak.XXXXXX")
trap 'rm -rf "$out"' EXIT
events=$((minutes * 60 * rate))
"$bin" --source synthetic --events "$events" --rate "$rate" --out "$out/data" \
    --max-file-age 30s --summary json >"$out/summary.json" &
pid=$!
printf 'elapsed_s\trss_kib\n' >"$report"
start=$(date +%s)
while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$rss" ] && printf '%s\t%s\n' "$(($(date +%s) - start))" "$rss" >>"$report"
    sleep 10
done
wait "$pid"
python3 - "$report" "$minutes" "$rate" "$out/summary.json" <<'PY'
import json, sys
path, minutes, rate, summary = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = [tuple(map(int, l.split('\t'))) for l in open(path).read().splitlines()[1:]]
half = minutes * 30
first = [r for t, r in rows if 60 <= t < half]
second = [r for t, r in rows if t >= half]
s = json.load(open(summary))
if not first or not second:
    sys.exit(f"soak: too few samples ({len(rows)}) for a verdict")
a, b = max(first), max(second)
growth = (b - a) / a
print(f"soak: {minutes} min at {rate} events/s, {s['events']} events; peak RSS first half "
      f"{a/1024:.1f} MiB, second half {b/1024:.1f} MiB ({growth:+.1%}); samples in {path}")
sys.exit(0 if growth <= 0.10 else "soak: RSS grew more than 10 %")
PY
