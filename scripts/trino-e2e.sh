#!/usr/bin/env bash
# The Trino suite: a real Trino reads what the real `sluice run` writes, and every query of the
# sql/ library gives the same rows there as in `sluice sql` (scripts/trino_e2e.py has the checks).
#
#   bash scripts/trino-e2e.sh                      # install what is missing, start, test, stop
#   SLUICE_TRINO_KEEP_LOGS=1 bash scripts/trino-e2e.sh   # keep the logs of a passing run
#
# Starts on free loopback ports, and stops by PID when it exits (also on failure):
#   moto's S3 server, one Apache Kafka broker (scripts/kafka.sh), a Hive Metastore 4.0.1 on
#   embedded Derby (scripts/metastore.sh, with deploy/hive/metastore-site.xml), and one Trino 476
#   coordinator (scripts/trino.sh) with two catalogs made from the shipped files:
#     delta       trino/catalog/delta.properties               (Hive Metastore)
#     delta_file  trino/catalog-file-metastore/delta.properties (Trino's file metastore)
# Installs when missing (once per machine, under $HOME/.cache/): Kafka, the metastore and Hadoop's
# S3A jars, Trino's server and CLI from Maven Central; moto from PyPI. Trino 476 runs on the
# Temurin JDK under /usr/lib/jvm (TRINO_JAVA_HOME); everything else on the default Java 17.
# A failure prints the tail of every server log; the folder is kept and named at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
export PATH="$HOME/.cargo/bin:$PATH"

work="$(mktemp -d /tmp/sluice-trino.XXXXXX)"

finish() {
  local status=$?
  bash scripts/trino.sh stop "$work/trino" 2>/dev/null || true
  bash scripts/metastore.sh stop "$work/metastore" 2>/dev/null || true
  bash scripts/kafka.sh stop "$work/kafka" 2>/dev/null || true
  if [ -n "${MOTO_PID:-}" ]; then
    kill -9 "$MOTO_PID" 2>/dev/null || true
    wait "$MOTO_PID" 2>/dev/null || true
  fi
  # Writers and producers the checks started, should the checks themselves have been killed.
  pkill -9 -f -- "--config $work/" 2>/dev/null || true
  if [ "$status" -ne 0 ]; then
    echo "== Trino suite failed (exit $status); logs in $work"
    for f in "$work"/*.log "$work"/trino/server.log "$work"/metastore/metastore.log \
      "$work"/kafka/kafka.log; do
      [ -e "$f" ] || continue
      echo "---- $f (last 40 lines)"
      tail -n 40 "$f"
    done
    # Last, so that a truncated CI log still shows it.
    if [ -s "$work/checks.out" ]; then
      echo "== why it failed"
      grep -A 20 '^FAILED' "$work/checks.out" || tail -n 20 "$work/checks.out"
    fi
  elif [ -z "${SLUICE_TRINO_KEEP_LOGS:-}" ]; then
    rm -rf "$work"
  fi
  exit "$status"
}
trap finish EXIT

# shellcheck source=scripts/lib.sh
source scripts/lib.sh


started=$(date +%s)
bash scripts/kafka.sh install
bash scripts/metastore.sh install
bash scripts/trino.sh install
install_moto
echo "== building sluice"
cargo build --release --bin sluice
echo "== installed and built in $(($(date +%s) - started)) s"

# moto does not check credentials, but every S3 client wants some.
export AWS_ACCESS_KEY_ID=sluice-trino AWS_SECRET_ACCESS_KEY=sluice-trino AWS_REGION=us-east-1

# Stopped by finish() through MOTO_PID, also when it fails to start.
start_moto "$work/moto.log"
export S3_ENDPOINT="$MOTO_ENDPOINT"

bash scripts/kafka.sh start "$work/kafka" >/dev/null
# shellcheck disable=SC1091
source "$work/kafka/kafka.env"

bash scripts/metastore.sh start "$work/metastore" "$S3_ENDPOINT"
# shellcheck disable=SC1091
source "$work/metastore/metastore.env"
export HIVE_METASTORE_URI="$METASTORE_URI"

bash scripts/trino.sh start "$work/trino" \
  delta=trino/catalog/delta.properties \
  delta_file=trino/catalog-file-metastore/delta.properties
# shellcheck disable=SC1091
source "$work/trino/trino.env"
echo "== servers up in $(($(date +%s) - started)) s: Trino $TRINO_URL, metastore $METASTORE_URI, Kafka $KAFKA_PLAINTEXT, S3 $S3_ENDPOINT"

SLUICE_BIN="$CARGO_TARGET_DIR/release/sluice" \
  TRINO_URL="$TRINO_URL" \
  TRINO_CLI="bash $repo/scripts/trino.sh cli $work/trino" \
  KAFKA_BROKERS="$KAFKA_PLAINTEXT" \
  SLUICE_TRINO_WORK="$work" \
  SLUICE_REPO="$repo" \
  python3 scripts/trino_e2e.py 2>&1 | tee "$work/checks.out"
echo "== Trino suite passed in $(($(date +%s) - started)) s"
