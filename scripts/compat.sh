#!/usr/bin/env bash
# Reads a table sluice wrote with a Delta reader that is not delta-rs (deltalake2db + DuckDB,
# scripts/independent_read.py) and compares what it sees with `sluice sql` (tests/trino.rs).
#
#   bash scripts/compat.sh
#
# Installs the pinned Python packages when they are missing (pip).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
DELTALAKE2DB_VERSION=1.2.2
DUCKDB_VERSION=1.4.1

if ! python3 -c "
import deltalake2db, duckdb, pytz
from importlib.metadata import version
assert version('deltalake2db') == '$DELTALAKE2DB_VERSION' and duckdb.__version__ == '$DUCKDB_VERSION'
" 2>/dev/null; then
  echo "== installing deltalake2db $DELTALAKE2DB_VERSION and duckdb $DUCKDB_VERSION (pip)"
  python3 -m pip install --quiet "deltalake2db==$DELTALAKE2DB_VERSION" "duckdb==$DUCKDB_VERSION" pytz
fi

cargo test --release --test trino -- --ignored --nocapture
