# Shell helpers shared by the scripts that start servers (sourced, not run).

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
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
