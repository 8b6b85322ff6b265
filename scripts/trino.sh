#!/usr/bin/env bash
# One Trino coordinator (that is also its own worker) on loopback, for the Trino suite. No
# Docker: Trino's server archive and CLI from Maven Central, at the version docker-compose.yml
# runs (move both together).
#
#   bash scripts/trino.sh install                  # once per machine: under $HOME/.cache/
#   bash scripts/trino.sh start DIR CATALOG_FILE...  # new server in DIR, on a free port
#   bash scripts/trino.sh cli DIR [ARGS...]          # the Trino CLI against the server in DIR
#   bash scripts/trino.sh stop DIR                   # stop it by its PID
#
# Each CATALOG_FILE is NAME=PATH: the catalog file at PATH is used as shipped, under the catalog
# name NAME. Its ${ENV:...} values come from the caller's environment.
# `start` writes DIR/trino.env (sourceable): TRINO_URL, TRINO_PID, TRINO_LOG.
set -euo pipefail

TRINO_VERSION=476
HOME_DIR="${SLUICE_TRINO_HOME:-$HOME/.cache/sluice-trino-$TRINO_VERSION}"
# Trino 476 needs Java 24 or newer; the machine's default Java 17 stays for everything else.
TRINO_JAVA_HOME="${TRINO_JAVA_HOME:-/usr/lib/jvm/temurin-25-jdk-amd64}"
# Heap of the server: beside a writer, a broker and a metastore on 2 cores and 24 GiB.
HEAP="${SLUICE_TRINO_HEAP:-2G}"

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

die() {
  echo "trino.sh: $*" >&2
  exit 1
}

install() {
  if [ -f "$HOME_DIR/.complete" ]; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn is not installed (Trino comes from Maven Central)"
  echo "== installing Trino $TRINO_VERSION (server with its delta_lake plugin, CLI) from Maven Central into $HOME_DIR (once per machine)"
  rm -rf "$HOME_DIR"
  mkdir -p "$HOME_DIR"
  # The plugin's own archive (trino-delta-lake:zip) is not served here: take it from the full
  # server archive, with the launcher and the core libraries, and leave the other plugins.
  (cd "$HOME_DIR" && mvn -B -q -Dstyle.color=never dependency:copy \
    -Dartifact="io.trino:trino-server:$TRINO_VERSION:tar.gz" -DoutputDirectory=. &&
    mvn -B -q -Dstyle.color=never dependency:copy \
      -Dartifact="io.trino:trino-cli:$TRINO_VERSION:jar:executable" -DoutputDirectory=.) ||
    die "could not fetch Trino from Maven Central"
  # The archive hard-links jars shared between plugins: unpack it whole, keep what is used.
  local archive="$HOME_DIR/trino-server-$TRINO_VERSION.tar.gz" full="$HOME_DIR/full"
  mkdir -p "$full" "$HOME_DIR/plugin"
  tar -xzf "$archive" -C "$full" --strip-components=1
  mv "$full/bin" "$full/lib" "$HOME_DIR/"
  mv "$full/plugin/delta-lake" "$HOME_DIR/plugin/"
  rm -rf "$full" "$archive"
  mv "$HOME_DIR/trino-cli-$TRINO_VERSION-executable.jar" "$HOME_DIR/trino-cli.jar"
  touch "$HOME_DIR/.complete"
}

java_home() {
  [ -x "$TRINO_JAVA_HOME/bin/java" ] ||
    die "no Java at $TRINO_JAVA_HOME (Trino $TRINO_VERSION needs Java 24+; set TRINO_JAVA_HOME)"
  echo "$TRINO_JAVA_HOME"
}

start() {
  local dir=$1
  shift
  install
  [ -e "$dir/trino.env" ] && die "$dir already holds a Trino server"
  mkdir -p "$dir/etc/catalog" "$dir/data"
  dir=$(cd "$dir" && pwd)
  for catalog in "$@"; do
    local name=${catalog%%=*} path=${catalog#*=}
    [ -f "$path" ] || die "no catalog file $path"
    cp "$path" "$dir/etc/catalog/$name.properties"
  done
  local port
  port=$(free_port)
  cat >"$dir/etc/node.properties" <<EOF
node.environment=sluice_test
node.id=$(python3 -c 'import uuid; print(uuid.uuid4())')
node.data-dir=$dir/data
node.internal-address=127.0.0.1
EOF
  cat >"$dir/etc/config.properties" <<EOF
coordinator=true
node-scheduler.include-coordinator=true
http-server.http.port=$port
discovery.uri=http://127.0.0.1:$port
query.max-memory=1GB
query.max-memory-per-node=1GB
EOF
  cat >"$dir/etc/jvm.config" <<EOF
-server
-Xmx$HEAP
-XX:+UseG1GC
-XX:+ExitOnOutOfMemoryError
-Djdk.attach.allowAttachSelf=true
-Dfile.encoding=UTF-8
EOF
  cat >"$dir/etc/log.properties" <<EOF
io.trino=INFO
EOF
  local log="$dir/server.log"
  # `launcher run` replaces itself with the server's JVM: the PID is the server's.
  ulimit -n 65536 2>/dev/null || ulimit -n 4096 2>/dev/null || true
  JAVA_HOME="$(java_home)" PATH="$(java_home)/bin:$PATH" setsid "$HOME_DIR/bin/launcher" run \
    --etc-dir "$dir/etc" --data-dir "$dir/data" >"$log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$dir/trino.pid"
  cat >"$dir/trino.env" <<EOF
TRINO_URL=http://127.0.0.1:$port
TRINO_PID=$pid
TRINO_LOG=$log
EOF
  # Ready when the coordinator says it is no longer starting (its catalogs are loaded).
  for _ in $(seq 1 1800); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 60 "$log" >&2
      die "Trino exited while starting; log $log"
    fi
    if curl -fsS "http://127.0.0.1:$port/v1/info" 2>/dev/null | grep -q '"starting":false'; then
      return 0
    fi
    sleep 0.1
  done
  tail -n 60 "$log" >&2
  die "Trino did not start within 180 s; log $log"
}

cli() {
  local dir=$1
  shift
  # shellcheck disable=SC1091
  source "$dir/trino.env"
  "$(java_home)/bin/java" -jar "$HOME_DIR/trino-cli.jar" --server "$TRINO_URL" --user sluice "$@"
}

stop() {
  stop_pid_file "$1/trino.pid" 30
}

case "${1:-}" in
install) install ;;
start)
  [ $# -ge 2 ] || die "usage: trino.sh start DIR NAME=CATALOG_FILE..."
  shift
  start "$@"
  ;;
cli)
  [ $# -ge 2 ] || die "usage: trino.sh cli DIR [ARGS...]"
  shift
  cli "$@"
  ;;
stop)
  [ $# -eq 2 ] || die "usage: trino.sh stop DIR"
  stop "$2"
  ;;
*) die "usage: trino.sh install | start DIR NAME=CATALOG_FILE... | cli DIR [ARGS...] | stop DIR" ;;
esac
