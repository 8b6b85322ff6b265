#!/usr/bin/env bash
# A Hive Metastore 4 (the standalone metastore, Thrift) on loopback, on embedded Derby, for the
# Trino suite. No Docker: Apache Hive's and Hadoop's jars from Maven Central.
#
#   bash scripts/metastore.sh install                 # once per machine: under $HOME/.cache/
#   bash scripts/metastore.sh start DIR S3_ENDPOINT   # new metastore in DIR, on a free port
#   bash scripts/metastore.sh stop DIR                # stop it by its PID
#
# The settings are deploy/hive/metastore-site.xml, the file docker-compose.yml mounts, as
# shipped: only its ${env.*} values (the S3 endpoint) and the database differ (Derby in DIR
# here, PostgreSQL in compose). S3 credentials come from AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY in the caller's environment.
#
# `start` writes DIR/metastore.env (sourceable): METASTORE_URI (thrift://127.0.0.1:port),
# METASTORE_PID, METASTORE_LOG.
set -euo pipefail

HIVE_VERSION=4.0.1
# The Hadoop of the apache/hive:4.0.1 image; hadoop-aws brings the S3A file system (AWS SDK v1).
HADOOP_VERSION=3.3.6
# The SLF4J 1.7 API under the archive's log4j-slf4j-impl 2.18.
SLF4J_VERSION=1.7.36
HOME_DIR="${SLUICE_METASTORE_HOME:-$HOME/.cache/sluice-metastore-$HIVE_VERSION}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HEAP="${SLUICE_METASTORE_HEAP:-512m}"
# Hive 4 on Java 17 reflects into these packages.
OPENS=(java.base/java.lang java.base/java.lang.reflect java.base/java.io java.base/java.net
  java.base/java.nio java.base/java.util java.base/java.util.concurrent
  java.base/java.util.concurrent.atomic java.base/java.util.regex java.base/sun.nio.ch)

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

die() {
  echo "metastore.sh: $*" >&2
  exit 1
}

install() {
  if [ -f "$HOME_DIR/.complete" ]; then
    return 0
  fi
  command -v java >/dev/null || die "java is not installed (the metastore needs Java 17)"
  command -v mvn >/dev/null || die "mvn is not installed (the jars come from Maven Central)"
  echo "== installing Hive Metastore $HIVE_VERSION and Hadoop $HADOOP_VERSION's S3A from Maven Central into $HOME_DIR (once per machine)"
  rm -rf "$HOME_DIR"
  mkdir -p "$HOME_DIR"
  (cd "$HOME_DIR" && mvn -B -q -Dstyle.color=never dependency:copy \
    -Dartifact="org.apache.hive:hive-standalone-metastore-server:$HIVE_VERSION:tar.gz:bin" \
    -DoutputDirectory=.) || die "could not fetch the metastore from Maven Central"
  tar -xzf "$HOME_DIR/hive-standalone-metastore-server-$HIVE_VERSION-bin.tar.gz" -C "$HOME_DIR"
  rm "$HOME_DIR/hive-standalone-metastore-server-$HIVE_VERSION-bin.tar.gz"
  mv "$HOME_DIR/apache-hive-metastore-$HIVE_VERSION-bin" "$HOME_DIR/hive"
  # Hadoop is an optional dependency of the standalone metastore: its jars are not in the
  # archive, nor is the SLF4J API its log4j2 binding implements. Logging stays with log4j2.
  local no_logging='      <exclusions>
        <exclusion><groupId>org.slf4j</groupId><artifactId>*</artifactId></exclusion>
        <exclusion><groupId>ch.qos.reload4j</groupId><artifactId>*</artifactId></exclusion>
        <exclusion><groupId>log4j</groupId><artifactId>*</artifactId></exclusion>
      </exclusions>'
  cat >"$HOME_DIR/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sluice.test</groupId>
  <artifactId>metastore-hadoop</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.hadoop</groupId>
      <artifactId>hadoop-common</artifactId>
      <version>$HADOOP_VERSION</version>
$no_logging
    </dependency>
    <dependency>
      <groupId>org.apache.hadoop</groupId>
      <artifactId>hadoop-hdfs-client</artifactId>
      <version>$HADOOP_VERSION</version>
    </dependency>
    <dependency>
      <!-- Only for classes the metastore's Warehouse names (SnapshotException): no server. -->
      <groupId>org.apache.hadoop</groupId>
      <artifactId>hadoop-hdfs</artifactId>
      <version>$HADOOP_VERSION</version>
      <exclusions><exclusion><groupId>*</groupId><artifactId>*</artifactId></exclusion></exclusions>
    </dependency>
    <dependency>
      <groupId>org.apache.hadoop</groupId>
      <artifactId>hadoop-mapreduce-client-core</artifactId>
      <version>$HADOOP_VERSION</version>
$no_logging
    </dependency>
    <dependency>
      <groupId>org.apache.hadoop</groupId>
      <artifactId>hadoop-aws</artifactId>
      <version>$HADOOP_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  (cd "$HOME_DIR" && mvn -B -q -Dstyle.color=never dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory=hadoop) ||
    die "could not fetch Hadoop's jars from Maven Central"
  touch "$HOME_DIR/.complete"
}

# The conf folder first (metastore-site.xml, log4j2), then Hive's jars, then Hadoop's: where
# both ship a library, the metastore's version wins.
classpath() {
  local conf=$1 cp=$1
  for jar in "$HOME_DIR"/hive/lib/*.jar "$HOME_DIR"/hadoop/*.jar; do
    cp="$cp:$jar"
  done
  echo "$cp"
}

java_options() {
  local dir=$1 endpoint=$2
  local options=(-Xmx"$HEAP" -Djava.awt.headless=true)
  for package in "${OPENS[@]}"; do
    options+=(--add-opens "$package=ALL-UNNAMED")
  done
  options+=(
    -Dlog4j2.configurationFile="$dir/conf/metastore-log4j2.properties"
    -Djavax.jdo.option.ConnectionDriverName=org.apache.derby.jdbc.EmbeddedDriver
    -Djavax.jdo.option.ConnectionURL="jdbc:derby:$dir/metastore_db;create=true"
    -Dderby.stream.error.file="$dir/derby.log"
    # Synchronous logging: the asynchronous kind needs the LMAX disruptor, not in the archive.
    -Dmetastore.async.log.enabled=false
  )
  printf '%s\n' "${options[@]}"
}

start() {
  local dir=$1 endpoint=$2
  install
  [ -e "$dir/metastore.env" ] && die "$dir already holds a metastore"
  mkdir -p "$dir/conf"
  dir=$(cd "$dir" && pwd)
  cp "$ROOT/deploy/hive/metastore-site.xml" "$dir/conf/metastore-site.xml"
  cat >"$dir/conf/metastore-log4j2.properties" <<EOF
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = %d{ISO8601} %p [%t] %c{2}: %m%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.datanucleus.name = DataNucleus
logger.datanucleus.level = WARN
EOF
  local port
  port=$(free_port)
  local options
  mapfile -t options < <(java_options "$dir" "$endpoint")
  # The schema first, to completion: embedded Derby allows one JVM at a time.
  S3_ENDPOINT="$endpoint" METASTORE_HOME="$HOME_DIR/hive" java "${options[@]}" -cp "$(classpath "$dir/conf")" \
    org.apache.hadoop.hive.metastore.tools.schematool.MetastoreSchemaTool \
    -initSchema -dbType derby >"$dir/schema.log" 2>&1 </dev/null || {
    tail -n 40 "$dir/schema.log" >&2
    die "creating the metastore schema failed; log $dir/schema.log"
  }
  local log="$dir/metastore.log"
  S3_ENDPOINT="$endpoint" METASTORE_HOME="$HOME_DIR/hive" setsid java "${options[@]}" \
    -cp "$(classpath "$dir/conf")" org.apache.hadoop.hive.metastore.HiveMetaStore -p "$port" \
    >"$log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$dir/metastore.pid"
  cat >"$dir/metastore.env" <<EOF
METASTORE_URI=thrift://127.0.0.1:$port
METASTORE_PID=$pid
METASTORE_LOG=$log
EOF
  for _ in $(seq 1 1200); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$log" >&2
      die "the metastore exited while starting; log $log"
    fi
    if port_open "$port"; then
      return 0
    fi
    sleep 0.1
  done
  tail -n 40 "$log" >&2
  die "the metastore did not listen on 127.0.0.1:$port within 120 s; log $log"
}

stop() {
  stop_pid_file "$1/metastore.pid" 10
}

case "${1:-}" in
install) install ;;
start)
  [ $# -eq 3 ] || die "usage: metastore.sh start DIR S3_ENDPOINT"
  start "$2" "$3"
  ;;
stop)
  [ $# -eq 2 ] || die "usage: metastore.sh stop DIR"
  stop "$2"
  ;;
*) die "usage: metastore.sh install | start DIR S3_ENDPOINT | stop DIR" ;;
esac
