#!/usr/bin/env bash
# Installs everything tcplake's build and tests need on a fresh Debian machine of this kind.
# Idempotent: every step checks before it installs, so reruns take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*" >&2; }

# Rust components used by the quality gates.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

# DuckDB, the users' query tool: the tests read tcplake's output with the Python package, as users do.
PYTHON=${TCPLAKE_TEST_PYTHON:-python3}
DUCKDB_VERSION=1.5.5
if ! "$PYTHON" -c "import duckdb, sys; sys.exit(duckdb.__version__ != '$DUCKDB_VERSION')" 2>/dev/null; then
  say "installing duckdb==$DUCKDB_VERSION for $PYTHON"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "duckdb==$DUCKDB_VERSION"
fi
say "ok"
