#!/usr/bin/env bash
# Whole-volume copies over NBD (issue 14), mirrorvol against qemu-nbd side
# by side in one run, on a Unix socket, both with --cache=none:
#
#   sparse: nbdcopy of a 4 GiB volume holding 256 MiB (16 extents of 16
#           MiB) to null: -- what a backup of a mostly empty volume costs:
#           nbdcopy asks for block status and reads only the data.
#           mirrorvol's mirror over two sparse files against qemu-nbd over
#           one raw sparse file with the same data. Three ways: four
#           connections on both sides (qemu-nbd --shared=4, so that it
#           offers multi-conn as mirrorvol does), one connection on both,
#           and each server as it comes (nbdcopy's defaults: four
#           connections to mirrorvol, one to a qemu-nbd without --shared,
#           which does not offer multi-conn).
#   tls:    the same copy of a fully written 1 GiB volume (reads), and
#           nbdcopy --connections=4 --flush of 1 GiB of random data from
#           tmpfs into it (writes), over TLS: mirrorvol serve --tls-certs
#           against qemu-nbd --tls-creds --shared=4 with the same
#           certificates (four connections on both sides).
#
# Every figure is the median of --runs runs (wall seconds of the copy);
# every ratio is taken within a run (peer time / mirrorvol time, so > 1 is
# faster) and its median printed with its spread.
#
#   bash bench/copy.sh [--dir DIR] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."

dir=""
runs=5
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    *) echo "usage: $0 [--dir DIR] [--runs N]" >&2; exit 2 ;;
  esac
done
for t in nbdcopy qemu-nbd qemu-io openssl python3; do
  command -v "$t" >/dev/null || { echo "bench needs $t" >&2; exit 2; }
done

cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/mirrorvol"
if [ -z "$dir" ]; then dir=$(mktemp -d /var/tmp/mirrorvol-copy-bench.XXXXXX); fi
mkdir -p "$dir"
a="$dir/a.img" b="$dir/b.img" raw="$dir/raw.img" sock="$dir/nbd.sock"
certs="$dir/certs" results="$dir/results.tsv" random="/dev/shm/mirrorvol-copy-bench.$$"
: > "$results"
# shellcheck source=bench/server.sh
. bench/server.sh
trap 'stop_server; rm -f "$a" "$b" "$raw" "$random"' EXIT

# Certificates: a CA, the server (localhost), a client.
mkdir -p "$certs"
(
  cd "$certs"
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=bench-ca 2>/dev/null
  for who in server client; do
    openssl req "${ec[@]}" -keyout "$who-key.pem" -out "$who.csr" -subj "/CN=$who" 2>/dev/null
    if [ "$who" = server ]; then
      printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > ext
    else
      printf 'extendedKeyUsage=clientAuth\n' > ext
    fi
    openssl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
      -days 2 -out "$who-cert.pem" -extfile ext 2>/dev/null
  done
)
head -c 1G /dev/urandom > "$random"

# timed RUN TARGET JOB CMD...: the wall seconds of CMD, appended.
timed() {
  local run="$1" target="$2" job="$3"; shift 3
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  python3 -c "print('$run', '$target', '$job', f'{$t1 - $t0:.3f}', sep='\t')" >> "$results"
  tail -n 1 "$results" | awk -F'\t' '{printf "  run %s %-10s %-8s %7s s\n", $1, $2, $3, $4}'
}

# The volume of mirrorvol, SIZE_MIB MiB, on two new sparse files.
mirror() {
  rm -f "$a" "$b"
  truncate -s "$(( $1 + 64 ))M" "$a" "$b"
  MIRRORVOL_DISKS="$a,$b" "$bin" init "$a" "$b" --style raw --group bench >/dev/null
  MIRRORVOL_DISKS="$a,$b" "$bin" create data --size "$1M" --mirror >/dev/null 2>&1
}
serve_mirror() {
  MIRRORVOL_DISKS="$a,$b" "$bin" serve --cache=none --listen "unix:$sock" "$@" 2>"$dir/serve.log" &
  server_pid=$!
  wait_socket
}
serve_raw() {
  qemu-nbd -t -k "$sock" -x data --cache=none --aio=io_uring -f raw "$@" "$raw" &
  server_pid=$!
  wait_socket
}
# 16 extents of 16 MiB, 256 MiB apart, written through the server.
write_extents() {
  local cmds=()
  for i in $(seq 0 15); do cmds+=(-c "write -P $((i + 1)) $((i * 256))M 16M"); done
  qemu-io -f raw "${cmds[@]}" "$1" >/dev/null
}
plain="nbd+unix:///data?socket=$sock"
tls="nbds+unix:///data?socket=$sock&tls-certificates=$certs"
qemu_tls=(--object "tls-creds-x509,id=tls0,endpoint=server,dir=$certs" --tls-creds tls0)

for run in $(seq "$runs"); do
  mirror 4096
  serve_mirror
  write_extents "$plain"
  timed "$run" mirrorvol sparse4 nbdcopy --connections=4 "$plain" null:
  timed "$run" mirrorvol sparse1 nbdcopy --connections=1 "$plain" null:
  timed "$run" mirrorvol default nbdcopy "$plain" null:
  stop_server
  rm -f "$raw"; truncate -s 4G "$raw"
  serve_raw --shared=4
  write_extents "$plain"
  timed "$run" qemu-nbd sparse4 nbdcopy --connections=4 "$plain" null:
  timed "$run" qemu-nbd sparse1 nbdcopy --connections=1 "$plain" null:
  stop_server
  serve_raw
  timed "$run" qemu-nbd default nbdcopy "$plain" null:
  stop_server

  mirror 1024
  serve_mirror --tls-certs "$certs"
  timed "$run" mirrorvol tls-write nbdcopy --connections=4 --flush "$random" "$tls"
  timed "$run" mirrorvol tls-read nbdcopy --connections=4 "$tls" null:
  stop_server
  rm -f "$raw"; truncate -s 1G "$raw"
  serve_raw --shared=4 "${qemu_tls[@]}"
  timed "$run" qemu-nbd tls-write nbdcopy --connections=4 --flush "$random" "$tls"
  timed "$run" qemu-nbd tls-read nbdcopy --connections=4 "$tls" null:
  stop_server
done

echo
python3 - "$results" <<'EOF'
import statistics, sys
from collections import defaultdict
t = defaultdict(dict)  # (target, job) -> run -> seconds
for line in open(sys.argv[1]):
    run, target, job, secs = line.rstrip("\n").split("\t")
    t[(target, job)][run] = float(secs)
med = statistics.median
jobs = [("sparse4", "4 GiB volume holding 256 MiB, four connections each", 256),
        ("sparse1", "the same, one connection each", 256),
        ("default", "the same, each server as it comes (4 connections to mirrorvol, 1 to qemu-nbd)", 256),
        ("tls-read", "TLS read 1 GiB, four connections each", 1024),
        ("tls-write", "TLS write 1 GiB, four connections each", 1024)]
print("Medians of", len(t[("mirrorvol", "sparse4")]), "runs:")
print()
print("| copy | mirrorvol s | qemu-nbd s | mirrorvol MiB/s | qemu-nbd MiB/s | ratio (per-run median, min-max) | target |")
print("|---|---:|---:|---:|---:|---:|---|")
for job, what, mib in jobs:
    m, q = t[("mirrorvol", job)], t[("qemu-nbd", job)]
    ratios = [q[r] / m[r] for r in m if r in q and m[r] > 0]
    r = med(ratios)
    print(f"| {what} | {med(m.values()):.2f} | {med(q.values()):.2f} | {mib / med(m.values()):.0f} | "
          f"{mib / med(q.values()):.0f} | {r:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | >= 1.00x {'ok' if r >= 1 else 'MISS'} |")
EOF
