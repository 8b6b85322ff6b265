#!/usr/bin/env bash
# One Apicurio Registry on loopback (in-memory storage, no auth), for the schema registry
# suite: its Confluent-compatible API is what sluice's `[registry]` speaks. No Docker: the
# registry's runnable archive from Maven Central.
#
#   bash scripts/registry.sh install     # once per machine: under $HOME/.cache/
#   bash scripts/registry.sh start DIR   # new registry in DIR, on free ports
#   bash scripts/registry.sh stop DIR    # stop it by its PID
#
# `start` writes DIR/registry.env (sourceable): REGISTRY_URL (the Confluent API's base, as
# `[registry] url` takes it), REGISTRY_TLS_URL (the same over HTTPS, with a certificate for
# 127.0.0.1 made at start time) and REGISTRY_CA (the PEM of the CA that signed it, for
# `[registry] ca_file`), REGISTRY_PID, REGISTRY_LOG.
set -euo pipefail

APICURIO_VERSION=3.3.3
HOME_DIR="${SLUICE_APICURIO_HOME:-$HOME/.cache/sluice-apicurio-$APICURIO_VERSION}"
# Apicurio 3.3 is compiled for Java 21 (class files 65): the machine's default Java 17
# refuses it. The Temurin JDK beside it runs it; everything else keeps Java 17.
APICURIO_JAVA_HOME="${APICURIO_JAVA_HOME:-/usr/lib/jvm/temurin-25-jdk-amd64}"
HEAP="${SLUICE_APICURIO_HEAP:-512m}"

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

die() {
  echo "registry.sh: $*" >&2
  exit 1
}

install() {
  if [ -f "$HOME_DIR/.complete" ]; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn is not installed (Apicurio comes from Maven Central)"
  echo "== installing Apicurio Registry $APICURIO_VERSION from Maven Central into $HOME_DIR (once per machine)"
  rm -rf "$HOME_DIR"
  mkdir -p "$HOME_DIR"
  # The plain jar is thin; the `all` archive is the runnable Quarkus application.
  (cd "$HOME_DIR" && mvn -B -q -Dstyle.color=never dependency:copy \
    -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" -DoutputDirectory=.) ||
    die "could not fetch Apicurio Registry from Maven Central"
  local archive="$HOME_DIR/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz"
  tar -xzf "$archive" -C "$HOME_DIR"
  rm -f "$archive"
  [ -f "$HOME_DIR/quarkus-run.jar" ] || die "the archive holds no quarkus-run.jar"
  touch "$HOME_DIR/.complete"
}

# A CA and a server certificate for 127.0.0.1, made at start time (nothing is committed).
make_certificates() {
  local tls=$1
  mkdir -p "$tls"
  (
    cd "$tls"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 7 \
      -subj "/CN=sluice registry test CA" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout registry.key -out registry.csr \
      -subj "/CN=127.0.0.1" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >registry.ext
    openssl x509 -req -in registry.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
      -out registry.crt -days 7 -extfile registry.ext 2>/dev/null
    rm -f ./*.csr ./*.srl registry.ext
    chmod 600 ./*.key
  )
}

start() {
  local dir=$1
  install
  [ -x "$APICURIO_JAVA_HOME/bin/java" ] ||
    die "no Java at $APICURIO_JAVA_HOME (Apicurio $APICURIO_VERSION needs Java 21+; set APICURIO_JAVA_HOME)"
  [ -e "$dir/registry.env" ] && die "$dir already holds a registry"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  command -v openssl >/dev/null || die "openssl is not installed (it makes the TLS certificate)"
  make_certificates "$dir/tls"
  local port management tls_port
  read -r port management tls_port < <(free_ports 3)
  local log="$dir/registry.log"
  # Quarkus writes its work files in the working directory: keep them in DIR. No subshell:
  # $! must be the JVM's PID, and nothing but the JVM may hold the caller's stdout.
  cd "$dir"
  setsid "$APICURIO_JAVA_HOME/bin/java" "-Xmx$HEAP" \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$port" \
    -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port="$management" \
    -Dquarkus.http.ssl-port="$tls_port" \
    -Dquarkus.http.ssl.certificate.files="$dir/tls/registry.crt" \
    -Dquarkus.http.ssl.certificate.key-files="$dir/tls/registry.key" \
    -jar "$HOME_DIR/quarkus-run.jar" >"$log" 2>&1 </dev/null &
  local pid=$!
  cd - >/dev/null
  echo "$pid" >"$dir/registry.pid"
  cat >"$dir/registry.env" <<EOF
REGISTRY_URL=http://127.0.0.1:$port/apis/ccompat/v7
REGISTRY_TLS_URL=https://127.0.0.1:$tls_port/apis/ccompat/v7
REGISTRY_CA=$dir/tls/ca.pem
REGISTRY_PID=$pid
REGISTRY_LOG=$log
EOF
  for _ in $(seq 1 1200); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$log" >&2
      die "the registry exited while starting; log $log"
    fi
    if curl -fsS "http://127.0.0.1:$port/apis/registry/v3/system/info" >/dev/null 2>&1 &&
      curl -fsS --cacert "$dir/tls/ca.pem" \
        "https://127.0.0.1:$tls_port/apis/registry/v3/system/info" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  tail -n 40 "$log" >&2
  die "the registry did not start within 120 s; log $log"
}

stop() {
  stop_pid_file "$1/registry.pid" 20
}

case "${1:-}" in
install) install ;;
start)
  [ $# -eq 2 ] || die "usage: registry.sh start DIR"
  start "$2"
  ;;
stop)
  [ $# -eq 2 ] || die "usage: registry.sh stop DIR"
  stop "$2"
  ;;
*) die "usage: registry.sh install | start DIR | stop DIR" ;;
esac
