#!/usr/bin/env bash
# Runs tcplake as separate services on one machine: nats-server (JetStream), one capture, N aggregators
# (sharded by flow key) and M sinks (each writes its part of the one output: some nodes' event logs,
# some shards' flows), all on loopback. The stages are the monolith's code; only the edges between them
# are the broker.
#
#   deploy-split/run.sh                      live eBPF capture for 30 s (root), 2 aggregators
#   deploy-split/run.sh --source synthetic --events 2000000
#
# Environment: TCPLAKE_SHARDS (aggregators, default 2), TCPLAKE_SINKS (sink parts, default 2; every run
# into one output must keep the count, which the output records), TCPLAKE_OUT (default ./tcplake-data-split),
# NATS_PORT (default 4222), NATS_STORE (default <output>.nats-store), TCPLAKE_RUN_FOR (live capture, 30s).
# TCPLAKE_BROKER_PARTITIONS=P (P >= TCPLAKE_SHARDS) partitions the events stream (each aggregator reads its
# partitions' share; fixed when the streams are first created, docs/scaling.md); every process reads it
# from the environment.
# Extra arguments (the workload: source, events, duration...) go to the capture process. Logs go to $TCPLAKE_OUT/../split-logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

shards=${TCPLAKE_SHARDS:-2}
sinks=${TCPLAKE_SINKS:-2}
out=${TCPLAKE_OUT:-./tcplake-data-split}
port=${NATS_PORT:-4222}
# The broker state belongs to the output it feeds: rerun with the same output and the same workload
# arguments and the capture resumes (other capture settings are refused while the node's messages are
# on the broker); a new output starts a new stream history.
store=${NATS_STORE:-$out.nats-store}
logs=$(dirname "$out")/split-logs
mkdir -p "$logs"
# This script's own settings, not tcplake's: left in the environment, TCPLAKE_OUT would reach the capture
# process, which refuses an output setting (it writes none), and TCPLAKE_SHARDS the sink (it learns it).
run_for=${TCPLAKE_RUN_FOR:-30s}
unset TCPLAKE_OUT TCPLAKE_SHARDS TCPLAKE_SINKS TCPLAKE_RUN_FOR

scripts/setup.sh run
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  echo "split: installing nats-server" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi
nats=$(command -v nats-server || echo /usr/sbin/nats-server)
cargo build --release --locked -p pipeline --bin tcplake
bin=./target/release/tcplake

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--duration "$run_for")
fi
broker="nats://127.0.0.1:$port"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT

# JetStream reserves each stream's max_bytes (broker.max_bytes, 1 GiB by default) against its storage
# limit, by default most of the free disk: a stated limit lets this run on a nearly full disk.
mkdir -p "$store"
echo 'jetstream { max_file_store: 1TB }' >"$store/limits.conf"
"$nats" -c "$store/limits.conf" -js -a 127.0.0.1 -p "$port" -sd "$store" >"$logs/nats.log" 2>&1 &
nats_pid=$!
pids+=("$nats_pid")
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

# Each service serves /metrics on its own loopback port: capture 9477, sink part j 9470+j, aggregator i
# 9480+i. The arguments describe the workload: they go to capture only (the other services would refuse
# settings that do nothing for them). The sinks learn the shard count from the aggregators' batches.
sink_pids=()
for j in $(seq 0 $((sinks - 1))); do
  part=()
  if [ "$sinks" -gt 1 ]; then part=(--sink-part "$j/$sinks"); fi
  "$bin" --mode sink --broker "$broker" --out "$out" "${part[@]}" --metrics-addr "127.0.0.1:$((9470 + j))" >"$logs/sink-$j.out" 2>"$logs/sink-$j.log" &
  sink_pids+=("$!")
  pids+=("$!")
done
agg_pids=()
for i in $(seq 0 $((shards - 1))); do
  "$bin" --mode aggregate --broker "$broker" --shard "$i/$shards" --metrics-addr "127.0.0.1:$((9480 + i))" >"$logs/aggregate-$i.out" 2>"$logs/aggregate-$i.log" &
  agg_pids+=("$!")
  pids+=("$!")
done
echo "split: nats-server, $sinks sink(s) and $shards aggregators running (logs in $logs); capturing..."
# Capture in the foreground: Ctrl-C stops it, and the others then finish what they hold.
"$bin" --mode capture --broker "$broker" --metrics-addr 127.0.0.1:9477 "${args[@]}" | tee "$logs/capture.out"

# A finite source (synthetic, --events, --duration) ends the stream: the aggregators and the sink then
# finish by themselves. A capture stopped by a signal does not (it could be restarted), so whatever is
# still running after a grace period is told to stop: aggregators first, then the sinks.
for _ in $(seq 60); do
  kill -0 "${agg_pids[@]}" 2>/dev/null || break
  sleep 1
done
kill -TERM "${agg_pids[@]}" 2>/dev/null || true
sleep 1
kill -TERM "${sink_pids[@]}" 2>/dev/null || true
status=0
for p in "${sink_pids[@]}"; do wait "$p" || status=$?; done
cat "$logs"/sink-*.out
if [ "$status" -ne 0 ]; then
  echo "split: a sink failed (exit $status): see $logs/sink-*.log" >&2
  exit "$status"
fi
echo "split: output in $out (query it like the monolith's, see README.md)"
