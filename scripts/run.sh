#!/usr/bin/env bash
# Sets up and runs tcplake on its embedded defaults (monolith, synthetic workload, ./tcplake-data).
# Extra arguments go to tcplake, e.g. scripts/run.sh --events 5000000 --window 60
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked -p pipeline --bin tcplake
./target/release/tcplake "$@"

out=${TCPLAKE_OUT:-./tcplake-data}
for arg in "$@"; do [[ ${prev:-} == --out ]] && out=$arg; prev=$arg; done
echo
echo "Top talkers in $out, straight from the Parquet files with DuckDB:"
python3 - "$out" <<'PY'
import sys, duckdb
out = sys.argv[1]
print(duckdb.sql(f"""
    SELECT comm, remote_addr, remote_port, sum(bytes_sent + bytes_received) AS bytes, count(*) AS flow_windows
    FROM read_parquet('{out}/flows/**/*.parquet', hive_partitioning = true)
    GROUP BY ALL ORDER BY bytes DESC LIMIT 5"""))
PY
