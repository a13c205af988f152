#!/usr/bin/env bash
# Installs everything tcplake's build and tests need on a fresh Debian machine of this kind.
# Idempotent: every step checks before it installs, so reruns take seconds.
#   scripts/setup.sh        everything the tests need (the default)
#   scripts/setup.sh run    only what building and running tcplake needs
#   scripts/setup.sh bench  everything the tests need, plus the capture benchmark's real workload and
#                           floor (nginx, ab, iperf3, bpftrace; see docs/results.md)
set -euo pipefail
cd "$(dirname "$0")/.."
purpose=${1:-test}
bench=false
if [ "$purpose" = bench ]; then bench=true; purpose=test; fi

say() { printf 'setup: %s\n' "$*" >&2; }

# Rust components used by the quality gates.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

# eBPF toolchain (see docs/operations.md): the kernel programs build with nightly + rust-src and link with
# bpf-linker 0.10.1 (newer releases need an LLVM this toolchain does not ship).
if command -v rustup >/dev/null 2>&1; then
  rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
  rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src' \
    || rustup component add rust-src --toolchain nightly
  rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^clippy' \
    || rustup component add clippy --toolchain nightly
fi
if ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.1'; then
  say "installing bpf-linker 0.10.1 (about 3 minutes)"
  cargo install bpf-linker@0.10.1 --locked
fi

# The eBPF tests make their own network namespace and drop packets with nftables; the split-mode tests
# need nats-server (Debian's 2.9: its systemd unit is not used, the tests start their own on loopback).
if [ "$(id -u)" = 0 ] && [ "$purpose" = test ]; then
  missing=()
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v nft >/dev/null 2>&1 || missing+=(nftables)
  # The split-mode tests join the stages with a real NATS JetStream broker.
  command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
  # setpriv (privilege tests), systemd-analyze (checks deploy-monolith's unit offline).
  command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
  # patch(1): the test S3 server is built from its crate with one patch (below).
  command -v patch >/dev/null 2>&1 || missing+=(patch)
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
# The capture benchmark (cargo bench --bench ebpf_overhead): an off-the-shelf HTTP server and load
# generator, a bulk-transfer tool, and bpftrace as the floor (attached to the same tracepoints, counting).
if [ "$(id -u)" = 0 ] && [ "$bench" = true ]; then
  missing=()
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
  command -v ab >/dev/null 2>&1 || missing+=(apache2-utils)
  command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
  command -v bpftrace >/dev/null 2>&1 || missing+=(bpftrace)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
# bpftrace (the capture benchmark's floor) attaches through tracefs.
if [ "$(id -u)" = 0 ]; then
  mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing || true
fi

# DuckDB, the users' query tool: the tests read tcplake's output with the Python package, as users do.
PYTHON=${TCPLAKE_TEST_PYTHON:-python3}
DUCKDB_VERSION=1.5.5
# httpfs comes from PyPI too (DuckDB's own extension download is not reachable here); its version must
# match DuckDB's exactly.
# The Delta extension reads tcplake's tables (delta_scan), loaded by path the same way.
# pytz: DuckDB's Python client needs it to return TIMESTAMP WITH TIME ZONE values (window_start, ts).
if ! "$PYTHON" -c "import duckdb, duckdb_extension_httpfs, duckdb_extension_delta, pytz, sys; sys.exit(duckdb.__version__ != '$DUCKDB_VERSION')" 2>/dev/null; then
  say "installing duckdb==$DUCKDB_VERSION, its httpfs and delta extensions and pytz for $PYTHON"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "duckdb==$DUCKDB_VERSION" "duckdb-extension-httpfs==$DUCKDB_VERSION" \
    "duckdb-extension-delta==$DUCKDB_VERSION" "pytz==2025.2"
fi

# The lake's other readers, tested rather than assumed: the deltalake Python package (delta-rs), Polars,
# and Spark reading the current snapshot's files (Java 17 is on the machine; Delta for Spark needs
# Maven jars, which are not reachable here).
if [ "$purpose" = test ] && ! "$PYTHON" -c "import deltalake, pyarrow, polars, pyspark, sys; sys.exit(deltalake.__version__ != '1.6.6' or polars.__version__ != '2.1.0' or pyspark.__version__ != '4.3.0')" 2>/dev/null; then
  say "installing deltalake, pyarrow, polars and pyspark for $PYTHON (about 2 minutes)"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "deltalake==1.6.6" "pyarrow==26.0.1" "polars==2.1.0" "pyspark==4.3.0"
fi

# prometheus-client: its parser checks tcplake's /metrics the way a Prometheus scrape would.
# PyYAML: tests/it/deploy.rs parses the Kubernetes manifests with it.
if [ "$purpose" = test ] && ! "$PYTHON" -c "import prometheus_client, yaml" 2>/dev/null; then
  say "installing prometheus-client and PyYAML for $PYTHON"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "prometheus-client==0.26.0" "PyYAML==6.0.3"
fi

# A real S3-compatible server for the object-store tests (0.14.1: later releases need a newer rustc),
# patched to decide conditional writes atomically as S3 does (scripts/s3s-fs-atomic-conditional-put.patch:
# upstream checks `If-None-Match` and then writes, so two writers of one Delta table could both commit
# the same version). The stamp next to the binary names the patch it was built with.
s3s_patch=scripts/s3s-fs-atomic-conditional-put.patch
s3s_stamp="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs.patch-$(sha256sum "$s3s_patch" | cut -c1-16)"
if [ "$purpose" = test ] && ! { [ -e "$s3s_stamp" ] && s3s-fs --version 2>/dev/null | grep -q '0\.14\.1'; }; then
  say "installing s3s-fs 0.14.1 with $s3s_patch (about 5 CPU-minutes)"
  src=$(mktemp -d)
  curl -fsSL --retry 3 https://static.crates.io/crates/s3s-fs/s3s-fs-0.14.1.crate -o "$src/s3s-fs.crate"
  echo "aa2cc3c6802533066591b45ace771fbc30fa33fd393d5909f9a7efd2a75cb15b  $src/s3s-fs.crate" | sha256sum -c --quiet
  tar -xzf "$src/s3s-fs.crate" -C "$src"
  patch -s -d "$src/s3s-fs-0.14.1" -p1 < "$s3s_patch"
  cargo install --path "$src/s3s-fs-0.14.1" --features binary --locked --force
  rm -f "${CARGO_HOME:-$HOME/.cargo}"/bin/s3s-fs.patch-*
  touch "$s3s_stamp"
  rm -rf "$src"
fi
say "ok"
