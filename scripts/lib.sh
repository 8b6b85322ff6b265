# Shell helpers shared by the scripts that start servers (sourced, not run).

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# free_ports N: N distinct free TCP ports on loopback, bound together so that none repeats
# (one free_port after another can get the port it was just given back).
free_ports() {
  python3 -c 'import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))' "$1"
}

# Succeeds when something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null
}

# stop_pid_file FILE [GRACE_SECONDS] [SIGNAL]: signals the process whose PID FILE holds
# (SIGTERM by default), gives it GRACE_SECONDS (10) to exit, then kills it; removes FILE.
stop_pid_file() {
  local file=$1 grace=${2:-10} signal=${3:-TERM}
  [ -f "$file" ] || return 0
  local pid
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((grace * 10))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# The independent Delta reader (scripts/independent_read.py): deltalake2db + DuckDB.
DELTALAKE2DB_VERSION=1.2.2
DUCKDB_VERSION=1.4.1

# Installs the independent reader's packages (pip) when these versions are missing.
install_independent_reader() {
  if ! python3 -c "
import deltalake2db, duckdb, pytz
from importlib.metadata import version
assert version('deltalake2db') == '$DELTALAKE2DB_VERSION' and duckdb.__version__ == '$DUCKDB_VERSION'
" 2>/dev/null; then
    echo "== installing deltalake2db $DELTALAKE2DB_VERSION and duckdb $DUCKDB_VERSION (pip)"
    python3 -m pip install --quiet "deltalake2db==$DELTALAKE2DB_VERSION" "duckdb==$DUCKDB_VERSION" pytz
  fi
}

# moto's S3 server, standing in for S3/MinIO in the end-to-end suites.
MOTO_VERSION=5.2.1

# Installs moto (pip) when this version is missing.
install_moto() {
  if ! python3 -c "import moto, flask, flask_cors; assert moto.__version__ == '$MOTO_VERSION'" 2>/dev/null; then
    echo "== installing moto $MOTO_VERSION (pip)"
    python3 -m pip install --quiet "moto[s3]==$MOTO_VERSION" flask flask-cors
  fi
}

# start_moto LOG: moto on a free loopback port, logging to LOG, with the bucket `lakehouse`.
# Sets MOTO_PID and MOTO_ENDPOINT (http://127.0.0.1:port).
start_moto() {
  local log=$1 port
  port=$(free_port)
  python3 -m moto.server -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
  MOTO_PID=$!
  for _ in $(seq 1 150); do
    if port_open "$port"; then
      curl -fsS -X PUT "http://127.0.0.1:$port/lakehouse" >/dev/null
      MOTO_ENDPOINT="http://127.0.0.1:$port"
      return 0
    fi
    sleep 0.2
  done
  echo "moto did not listen on 127.0.0.1:$port; see $log" >&2
  return 1
}
