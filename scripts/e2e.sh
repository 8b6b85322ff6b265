#!/usr/bin/env bash
# The end-to-end suite against real servers (tests/e2e.rs): an Apache Kafka broker (KRaft, with
# PLAINTEXT, SSL and SASL_SSL listeners; scripts/kafka.sh), moto's S3 server and an Apicurio
# schema registry (scripts/registry.sh) on loopback, on free ports; the `sluice` binary writing
# s3:// tables through faults.
#
#   bash scripts/e2e.sh                     # install what is missing, start, test, stop
#   SLUICE_E2E_SEED=123 bash scripts/e2e.sh # replay the random pauses of a failed run
#   SLUICE_E2E_KEEP_LOGS=1 bash scripts/e2e.sh kill_9   # one scenario, logs kept
#
# Installs when missing: Apache Kafka's and Apicurio Registry's jars (Maven Central, under
# $HOME/.cache/), moto and the
# independent Delta reader every fault scenario's tables are checked with (pip).
# Everything it starts is stopped by PID when it exits, also on failure; a failure prints the
# tail of every process log (the folder is kept and named at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
export PATH="$HOME/.cargo/bin:$PATH"

logs="$(mktemp -d /tmp/sluice-e2e.XXXXXX)"
pids=()

finish() {
  local status=$?
  for pid in "${pids[@]}" ${MOTO_PID:-}; do
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  # Writers and brokers the tests started, should the tests themselves have been killed: they
  # all carry this run's SLUICE_E2E_LOGS in their environment.
  for environ in /proc/[0-9]*/environ; do
    local pid=${environ#/proc/}
    pid=${pid%/environ}
    if [ "$pid" != "$$" ] && grep -qz "^SLUICE_E2E_LOGS=$logs\$" "$environ" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  if [ "$status" -ne 0 ]; then
    echo "== end-to-end suite failed (exit $status); process logs in $logs"
    for f in "$logs"/*.log; do
      [ -e "$f" ] || continue
      echo "---- $(basename "$f") (last 40 lines)"
      tail -n 40 "$f"
    done
    # Last, so that a truncated CI log still shows it: each panic's message, no backtrace.
    if [ -s "$logs/suite.out" ]; then
      echo "== why it failed"
      awk '/panicked at/ { show = 1; lines = 0 }
           /^stack backtrace:|^note: / { show = 0 }
           show && lines++ < 30 { print }' "$logs/suite.out"
    fi
  elif [ -z "${SLUICE_E2E_KEEP_LOGS:-}" ]; then
    rm -rf "$logs"
  fi
  exit "$status"
}
trap finish EXIT

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

bash scripts/kafka.sh install
bash scripts/registry.sh install
install_moto
install_independent_reader

echo "== building the suite"
cargo test --release --test e2e --no-run

# Stopped by finish() through MOTO_PID, also when it fails to start.
start_moto "$logs/moto.log"

# The shared broker; scenarios that restart a broker start their own with the same script.
if ! bash scripts/kafka.sh start "$logs/kafka"; then
  exit 1
fi
pids+=("$(cat "$logs/kafka/kafka.pid")" "$(cat "$logs/kafka/oidc.pid")")
ln -sf "$logs/kafka/kafka.log" "$logs/kafka.log"
# shellcheck disable=SC1091
source "$logs/kafka/kafka.env"

if ! bash scripts/registry.sh start "$logs/registry"; then
  exit 1
fi
pids+=("$(cat "$logs/registry/registry.pid")")
ln -sf "$logs/registry/registry.log" "$logs/registry.log"
# shellcheck disable=SC1091
source "$logs/registry/registry.env"
export SLUICE_E2E_REGISTRY="$REGISTRY_URL" SLUICE_E2E_REGISTRY_TLS="$REGISTRY_TLS_URL"
export SLUICE_E2E_REGISTRY_CA="$REGISTRY_CA"

# moto does not check credentials, but the S3 client wants some.
export AWS_ACCESS_KEY_ID=sluice-e2e AWS_SECRET_ACCESS_KEY=sluice-e2e AWS_REGION=us-east-1
export SLUICE_E2E_KAFKA_ENV="$logs/kafka/kafka.env"
export SLUICE_E2E_S3="$MOTO_ENDPOINT"
export SLUICE_E2E_BUCKET=lakehouse
export SLUICE_E2E_LOGS="$logs"
echo "== end-to-end suite: broker $KAFKA_PLAINTEXT, S3 $SLUICE_E2E_S3, registry $REGISTRY_URL, logs $logs"
cargo test --release --test e2e -- --ignored --test-threads=1 --nocapture "$@" 2>&1 | tee "$logs/suite.out"
