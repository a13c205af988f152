#!/usr/bin/env bash
# Runs the cargo-fuzz targets (fuzz/): the broker wire codec and the config/flag parser, each for
# SECONDS (default 60). A crash is saved under fuzz/artifacts/<target>/; copy it to
# fuzz/regressions/<target>/ and `cargo test --test it fuzz_regressions` replays it on every CI run.
#
#   scripts/fuzz.sh [SECONDS=60] [TARGET...]
#
# Not part of scripts/test.sh: libFuzzer needs every dependency rebuilt with coverage instrumentation
# (nightly, -Cpasses=sancov), about 20 minutes on 2 cores before the first input runs. CI replays the
# corpus, the regressions and 35 000 deterministic mutations through the same code instead.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wire config)
if ! cargo fuzz --version 2>/dev/null | grep -q '0\.13\.2'; then
  cargo install cargo-fuzz@0.13.2 --locked
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
# The same dependency versions as the main workspace (newest releases may need a newer rustc).
[ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
cd fuzz
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "corpus/$t" "regressions/$t"
  echo "== fuzzing $t for ${seconds}s"
  # libFuzzer adds new inputs to the first directory: work/ (untracked); the committed seeds and
  # regressions are read at start.
  cargo +nightly fuzz run "$t" "work/$t" "corpus/$t" "regressions/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -max_len=65536
done
