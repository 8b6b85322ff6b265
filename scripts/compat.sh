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

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
install_independent_reader

cargo test --release --test trino -- --ignored --nocapture
