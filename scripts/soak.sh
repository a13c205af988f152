#!/usr/bin/env bash
# Soak benchmark: tcplake (monolith, synthetic source paced to a fixed rate) for MINUTES, RSS sampled
# every 10 s. Passes when memory is flat after a one-minute warm-up: the median RSS of the second half
# is within 10 % of the first half's, and the least-squares trend over the run adds less than 10 %.
# (Medians and trend, not peaks: open Parquet files buffer a row group each, so RSS is a sawtooth and a
# single peak says little about growth. Peaks are printed too.) Not part of CI (it runs for minutes).
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
import statistics
a, b = statistics.median(first), statistics.median(second)
warm = [(t, r) for t, r in rows if t >= 60]
ts, rs = [t for t, _ in warm], [r for _, r in warm]
mt, mr = statistics.mean(ts), statistics.mean(rs)
slope = sum((t - mt) * (r - mr) for t, r in warm) / sum((t - mt) ** 2 for t in ts)
trend = slope * (ts[-1] - ts[0]) / mr
median_change = (b - a) / a
print(f"soak: {minutes} min at {rate} events/s, {s['events']} events, {s['kernel_drops']} dropped; "
      f"median RSS {a/1024:.1f} MiB (first half) -> {b/1024:.1f} MiB (second half), {median_change:+.1%}; "
      f"trend over the run {trend:+.1%}; peaks {max(first)/1024:.1f} / {max(second)/1024:.1f} MiB; "
      f"samples in {path}")
ok = abs(median_change) <= 0.10 and trend <= 0.10
sys.exit(0 if ok else "soak: memory not flat within 10 %")
PY
