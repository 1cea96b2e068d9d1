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

# fio JOB RUN TARGET [fio args...]: runs one job over NBD on "$sock"
# against "${vol_mib}M" for "$seconds" s and appends its figures (IOPS,
# MiB/s, p50 completion latency in µs) to "$results" ("$dir" holds its
# JSON).
fio_job() {
  local job="$1" run="$2" target="$3"; shift 3
  local started=$EPOCHREALTIME
  fio --name="$job" --ioengine=nbd "--uri=nbd+unix:///data?socket=$sock" --size="${vol_mib}M" \
    --time_based --runtime="$seconds" --output-format=json --group_reporting --randrepeat=0 \
    "$@" --output="$dir/job.json" >/dev/null
  # Jobs of several clients must have run at once: a server that takes one
  # connection at a time serves them one after another, and fio then adds
  # up single-client rates as if they had been concurrent.
  if [[ " $* " == *" --numjobs="* ]] &&
    python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) - float(sys.argv[2]) > 2 * $seconds + 5 else 1)" \
      "$EPOCHREALTIME" "$started"; then
    echo "fio job $job against $target took over twice its $seconds s: its clients were not served at once" >&2
    exit 1
  fi
  python3 - "$dir/job.json" "$run" "$target" "$job" >> "$results" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
p50 = side["clat_ns"].get("percentile", {}).get("50.000000", 0) / 1000
print(sys.argv[2], sys.argv[3], sys.argv[4], f'{side["iops"]:.0f}', f'{side["bw"] / 1024:.1f}', f"{p50:.1f}", sep="\t")
EOF
  tail -n 1 "$results" | awk -F'\t' '{printf "  run %s %-24s %-10s %9s IOPS %8s MiB/s  p50 %7s us\n", $1, $2, $3, $4, $5, $6}'
}
