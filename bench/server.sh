# Sourced by the NBD benchmarks: the one server they run at a time, on
# the Unix socket "$sock", with its pid in "$server_pid".
server_pid=""

# Stops the server (SIGTERM, then waits) and removes its socket.
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
  rm -f "$sock"
}

# Waits (10 s at most) for the server's socket to appear.
wait_socket() {
  for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
  echo "server did not come up" >&2; exit 1
}
