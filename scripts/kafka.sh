#!/usr/bin/env bash
# One Apache Kafka broker in KRaft mode (broker and controller in one JVM), on loopback, for the
# suites that need a real cluster. No Docker: Kafka's own jars from Maven Central.
#
#   bash scripts/kafka.sh install          # once per machine: jars under $HOME/.cache/
#   bash scripts/kafka.sh start DIR        # new broker in DIR (certificates, users, ports)
#   bash scripts/kafka.sh restart DIR [S]  # kill -9, S seconds down, start again (same ports, log)
#   bash scripts/kafka.sh stop DIR         # stop it by its PID
#
# `start` writes DIR/kafka.env (sourceable) with what a client needs:
#   KAFKA_PLAINTEXT  127.0.0.1:port, no security
#   KAFKA_SSL        127.0.0.1:port, TLS with client certificates (ssl.client.auth=required)
#   KAFKA_SASL_SSL   127.0.0.1:port, TLS + SASL: SCRAM-SHA-512 or OAUTHBEARER (OIDC tokens)
#   KAFKA_CA         the CA that signed the broker's and the client's certificates (PEM)
#   KAFKA_OTHER_CA   a CA that signed nothing here (for "untrusted CA" tests)
#   KAFKA_CLIENT_CERT, KAFKA_CLIENT_KEY, KAFKA_CLIENT_KEY_PASSWORD  the SSL listener's client
#   KAFKA_SCRAM_USER, KAFKA_SCRAM_PASSWORD  the SASL_SSL listener's SCRAM user
#   KAFKA_OIDC_TOKEN_URL, KAFKA_OIDC_CLIENT_ID, KAFKA_OIDC_CLIENT_SECRET  an OIDC client of the
#                    token issuer (scripts/oidc_server.py) whose tokens the broker accepts
#   KAFKA_PID, KAFKA_OIDC_PID, KAFKA_LOG
# Certificates, keys and passwords are made at start time with openssl; none is committed.
set -euo pipefail

KAFKA_VERSION=4.1.1
# Kafka 4.1 logs through SLF4J 1.7; this binds it to the log4j2 core Kafka already pulls.
LOG4J_VERSION=2.24.3
HOME_DIR="${SLUICE_KAFKA_HOME:-$HOME/.cache/sluice-kafka-$KAFKA_VERSION}"
SCRIPTS="$(cd "$(dirname "$0")" && pwd)"
# Heap of the broker: small, the suites' topics hold a few hundred MB at most.
HEAP="${SLUICE_KAFKA_HEAP:-768m}"

# shellcheck source=scripts/lib.sh
source "$SCRIPTS/lib.sh"

die() {
  echo "kafka.sh: $*" >&2
  exit 1
}

install() {
  if [ -f "$HOME_DIR/libs/.complete" ]; then
    return 0
  fi
  command -v java >/dev/null || die "java is not installed (Kafka $KAFKA_VERSION needs Java 17+)"
  command -v mvn >/dev/null || die "mvn is not installed (the jars come from Maven Central)"
  python3 -c 'import cryptography' 2>/dev/null || python3 -m pip install --quiet cryptography
  echo "== installing Apache Kafka $KAFKA_VERSION from Maven Central into $HOME_DIR (once per machine)"
  mkdir -p "$HOME_DIR"
  cat >"$HOME_DIR/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sluice.test</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  rm -rf "$HOME_DIR/libs"
  (cd "$HOME_DIR" && mvn -B -q -Dstyle.color=never dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory=libs) || die "could not fetch Kafka's jars from Maven Central"
  touch "$HOME_DIR/libs/.complete"
}

classpath() {
  local cp=""
  for jar in "$HOME_DIR"/libs/*.jar; do
    cp="${cp:+$cp:}$jar"
  done
  echo "$cp"
}

# A CA, the broker's certificate (SAN 127.0.0.1 and localhost), a client certificate whose key
# is encrypted with a password, and an unrelated CA.
make_certificates() {
  local tls=$1
  mkdir -p "$tls"
  (
    cd "$tls"
    local days=7
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days $days \
      -subj "/CN=sluice test CA" 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.pem -days $days \
      -subj "/CN=an unrelated CA" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout broker.key -out broker.csr \
      -subj "/CN=127.0.0.1" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out broker.crt \
      -days $days -extfile broker.ext 2>/dev/null
    # Kafka's PEM key store: the PKCS#8 key, then the certificate chain, in one file.
    openssl pkcs8 -topk8 -nocrypt -in broker.key -out broker.p8
    cat broker.p8 broker.crt ca.pem >broker.pem
    openssl rand -hex 16 >client.pass
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -aes256 \
      -pass "file:client.pass" -out client.key 2>/dev/null
    openssl req -new -key client.key -passin "file:client.pass" -out client.csr \
      -subj "/CN=sluice-client" 2>/dev/null
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem \
      -days $days 2>/dev/null
    rm -f ./*.csr ./*.srl broker.ext
    chmod 600 ./*.key ./*.p8 ./*.pass broker.pem
  )
}

write_config() {
  local dir=$1 plaintext=$2 ssl=$3 sasl=$4 controller=$5 oidc=$6
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$plaintext,SSL://127.0.0.1:$ssl,SASL_SSL://127.0.0.1:$sasl,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$plaintext,SSL://127.0.0.1:$ssl,SASL_SSL://127.0.0.1:$sasl
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false

ssl.keystore.type=PEM
ssl.keystore.location=$dir/tls/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$dir/tls/ca.pem
listener.name.ssl.ssl.client.auth=required
listener.name.sasl_ssl.ssl.client.auth=none
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512,OAUTHBEARER
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;
listener.name.sasl_ssl.oauthbearer.sasl.server.callback.handler.class=org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler
# Kafka 4.1's default validator (DefaultJwtValidator, built without a key resolver) checks no
# signature at all: a token from any issuer passes. Name the broker's validator explicitly.
sasl.oauthbearer.jwt.validator.class=org.apache.kafka.common.security.oauthbearer.BrokerJwtValidator
sasl.oauthbearer.jwks.endpoint.url=http://127.0.0.1:$oidc/jwks
sasl.oauthbearer.expected.audience=kafka
EOF
  cat >"$dir/log4j2.properties" <<EOF
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
EOF
}

# Starts the JVM of the broker in DIR (configured already) and waits for it to serve.
launch() {
  local dir=$1
  # shellcheck disable=SC1091
  source "$dir/kafka.env"
  local log="$dir/kafka.log"
  # The token issuer first: the broker reads its keys when it starts.
  local oidc_port=${KAFKA_OIDC_TOKEN_URL#http://127.0.0.1:}
  oidc_port=${oidc_port%%/*}
  if ! { [ -n "${KAFKA_OIDC_PID:-}" ] && kill -0 "$KAFKA_OIDC_PID" 2>/dev/null; }; then
    OIDC_CLIENT_SECRET="$KAFKA_OIDC_CLIENT_SECRET" setsid python3 "$SCRIPTS/oidc_server.py" \
      --port "$oidc_port" --client-id "$KAFKA_OIDC_CLIENT_ID" >>"$dir/oidc.log" 2>&1 </dev/null &
    echo "$!" >"$dir/oidc.pid"
    sed -i "s/^KAFKA_OIDC_PID=.*/KAFKA_OIDC_PID=$!/" "$dir/kafka.env"
    for _ in $(seq 1 100); do
      grep -q "serving on" "$dir/oidc.log" 2>/dev/null && break
      sleep 0.1
    done
    grep -q "serving on" "$dir/oidc.log" || die "the token issuer did not start; log $dir/oidc.log"
  fi
  echo "---- start $(date -u +%FT%TZ)" >>"$log"
  # setsid: the broker is not in the caller's process group, so a Ctrl-C of the suite does not
  # reach it before the suite's own cleanup does.
  setsid java -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dorg.apache.kafka.sasl.oauthbearer.allowed.urls="http://127.0.0.1:$oidc_port/jwks" \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -cp "$(classpath)" kafka.Kafka "$dir/server.properties" >>"$log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$dir/kafka.pid"
  sed -i "s/^KAFKA_PID=.*/KAFKA_PID=$pid/" "$dir/kafka.env"
  local starts
  starts=$(grep -c -- '^---- start' "$log")
  for _ in $(seq 1 600); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$log" >&2
      die "the broker in $dir exited while starting; log $log"
    fi
    # The n-th "Kafka Server started" of the log belongs to the n-th start.
    if [ "$(grep -c 'Kafka Server started' "$log")" -ge "$starts" ]; then
      return 0
    fi
    sleep 0.1
  done
  tail -n 40 "$log" >&2
  die "the broker in $dir did not start within 60 s; log $log"
}

start() {
  local dir=$1
  install
  [ -e "$dir/kafka.env" ] && die "$dir already holds a broker (use restart)"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  make_certificates "$dir/tls"
  local plaintext ssl sasl controller oidc password
  read -r plaintext ssl sasl controller oidc < <(free_ports 5)
  password=$(openssl rand -hex 16)
  write_config "$dir" "$plaintext" "$ssl" "$sasl" "$controller" "$oidc"
  cat >"$dir/kafka.env" <<EOF
KAFKA_PLAINTEXT=127.0.0.1:$plaintext
KAFKA_SSL=127.0.0.1:$ssl
KAFKA_SASL_SSL=127.0.0.1:$sasl
KAFKA_CA=$dir/tls/ca.pem
KAFKA_OTHER_CA=$dir/tls/other-ca.pem
KAFKA_CLIENT_CERT=$dir/tls/client.pem
KAFKA_CLIENT_KEY=$dir/tls/client.key
KAFKA_CLIENT_KEY_PASSWORD=$(cat "$dir/tls/client.pass")
KAFKA_SCRAM_USER=sluice
KAFKA_SCRAM_PASSWORD=$password
KAFKA_OIDC_TOKEN_URL=http://127.0.0.1:$oidc/token
KAFKA_OIDC_CLIENT_ID=sluice
KAFKA_OIDC_CLIENT_SECRET=$(openssl rand -hex 16)
KAFKA_LOG=$dir/kafka.log
KAFKA_PID=
KAFKA_OIDC_PID=
EOF
  chmod 600 "$dir/kafka.env"
  # The SCRAM credential is part of the cluster metadata written at format time.
  java -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$(classpath)" \
    kafka.tools.StorageTool format --config "$dir/server.properties" \
    --cluster-id "$(java -cp "$(classpath)" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)" \
    --add-scram "SCRAM-SHA-512=[name=sluice,password=$password]" >"$dir/format.log" 2>&1 ||
    {
      cat "$dir/format.log" >&2
      die "formatting the broker's storage failed"
    }
  launch "$dir"
}

stop() {
  local dir=$1 signal=${2:-TERM}
  stop_broker "$dir" "$signal"
  if [ -f "$dir/oidc.pid" ]; then
    kill -9 "$(cat "$dir/oidc.pid")" 2>/dev/null || true
    rm -f "$dir/oidc.pid"
  fi
}

stop_broker() {
  # A clean stop flushes its log; after 30 s it is killed anyway.
  stop_pid_file "$1/kafka.pid" 30 "$2"
}

case "${1:-}" in
install) install ;;
start)
  [ $# -eq 2 ] || die "usage: kafka.sh start DIR"
  start "$2"
  ;;
restart)
  [ $# -ge 2 ] || die "usage: kafka.sh restart DIR [SECONDS_DOWN]"
  stop_broker "$2" KILL
  # A broker that is down: its ports refuse connections for this long.
  python3 -c "import time; time.sleep(float('${3:-0}'))"
  launch "$(cd "$2" && pwd)"
  ;;
stop)
  [ $# -eq 2 ] || die "usage: kafka.sh stop DIR"
  stop "$2"
  ;;
*) die "usage: kafka.sh install | start DIR | restart DIR [SECONDS_DOWN] | stop DIR" ;;
esac
