#!/usr/bin/env bash
# Sets up, builds and runs tcplake on its embedded defaults: monolith mode, live eBPF capture of this
# machine's TCP traffic, 10 s windows, Delta Lake tables (Parquet) into ./tcplake-data. Needs root (it loads eBPF programs).
#
# With no arguments it captures for 30 s (TCPLAKE_RUN_FOR to change) while generating a little loopback
# HTTP traffic so a first run has something to show (TCPLAKE_DEMO_TRAFFIC=0 to turn that off), then
# prints the top talkers with DuckDB. With arguments, they go to tcplake as they are, e.g.
#   scripts/run.sh --duration 5m --port 443
#   scripts/run.sh --source synthetic --events 5000000
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh run
cargo build --release --locked -p pipeline --bin tcplake

args=("$@")
demo_pid=""
if [ ${#args[@]} -eq 0 ]; then
  args=(--duration "${TCPLAKE_RUN_FOR:-30s}")
  if [ "${TCPLAKE_DEMO_TRAFFIC:-1}" != 0 ]; then
    python3 - <<'PY' &
import http.server, threading, time, urllib.request
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
srv.RequestHandlerClass.log_message = lambda *a: None
threading.Thread(target=srv.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{srv.server_address[1]}/"
time.sleep(2)  # let tcplake attach first
end = time.time() + 600
while time.time() < end:
    try:
        urllib.request.urlopen(url).read()
    except Exception:
        pass
    time.sleep(0.05)
PY
    demo_pid=$!
    trap '[ -n "$demo_pid" ] && kill "$demo_pid" 2>/dev/null || true' EXIT
    echo "run: capturing for ${TCPLAKE_RUN_FOR:-30s} with demo loopback HTTP traffic (Ctrl-C stops early)"
  fi
fi
./target/release/tcplake "${args[@]}"

out=${TCPLAKE_OUT:-./tcplake-data}
prev=""
for arg in "${args[@]}"; do [ "$prev" = --out ] && out=$arg; prev=$arg; done
echo
echo "Top processes by bytes in $out: the flows Delta table, read with DuckDB's delta_scan:"
python3 - "$out" <<'PY'
import glob, os, sys, duckdb
import duckdb_extension_delta as delta
out = sys.argv[1]
if not os.path.isdir(f"{out}/flows/_delta_log"):
    sys.exit(f"no flows table under {out} yet")
ext = glob.glob(os.path.join(os.path.dirname(delta.__file__), "extensions", "*", "delta.duckdb_extension"))[0]
con = duckdb.connect()
con.load_extension(ext)
print(con.sql(f"""
    SELECT comm, pid, sum(bytes_sent) AS sent, sum(bytes_received) AS received,
           sum(connections_opened) AS opened, sum(resets) AS resets, sum(retransmits) AS retransmits,
           max(rtt_p99_us) AS worst_rtt_p99_us
    FROM delta_scan('{os.path.abspath(out)}/flows')
    GROUP BY ALL ORDER BY sent + received DESC LIMIT 10"""))
PY
