#!/usr/bin/env bash
# `mirrorvol serve` against qemu-nbd (quorum over two files, and one raw
# file), all driven by fio over NBD on a Unix socket (issue 4, DESIGN §7).
# Same two image files, same filesystem, one run; prints each figure and
# the ratios against the targets.
#
#   bash bench/nbd.sh [--dir DIR] [--size MIB] [--seconds S] [--cold]
#
# --cold: only random writes, on the fresh sparse files with nothing
# written before (a new volume's first writes: every region's write-intent
# bit is still clear), the case a user meets first.
#
# Workloads: randwrite 4 KiB iodepth 32, randread 4 KiB iodepth 32,
# sequential write 1 MiB iodepth 8. Each server runs with --cache=none
# (O_DIRECT: the DESIGN recipe) and with --cache=writeback (the page
# cache, made durable on flush); ratios compare like with like.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=""
size_mib=1024
seconds=10
cold=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cold) cold=1; shift ;;
    --dir) dir="$2"; shift 2 ;;
    --size) size_mib="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    *) echo "usage: $0 [--dir DIR] [--size MIB] [--seconds S] [--cold]" >&2; exit 2 ;;
  esac
done
for t in fio qemu-nbd python3; do
  command -v "$t" >/dev/null || { echo "bench needs $t" >&2; exit 2; }
done

cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/mirrorvol"

if [ -z "$dir" ]; then dir=$(mktemp -d /var/tmp/mirrorvol-nbd-bench.XXXXXX); fi
mkdir -p "$dir"
a="$dir/a.img" b="$dir/b.img" sock="$dir/nbd.sock" results="$dir/results.txt"
: > "$results"
server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
  rm -f "$sock"
}
trap 'stop_server; rm -f "$a" "$b"' EXIT

fresh_images() {
  rm -f "$a" "$b"
  truncate -s "${size_mib}M" "$a" "$b"
}

wait_socket() {
  for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
  echo "server did not come up" >&2; exit 1
}

# The volume is a little smaller than a disk (labels, config); every
# target is driven over the same byte range.
vol_mib=$((size_mib - 64))

run_fio() { # NAME URI
  local name="$1" uri="$2"
  local common=(--ioengine=nbd "--uri=$uri" --size="${vol_mib}M" --time_based
                --runtime="$seconds" --ramp_time=1 --output-format=json --group_reporting)
  if [ "$cold" = 1 ]; then
    # No ramp: the first writes are the point.
    fio --name=randwrite --rw=randwrite --bs=4k --iodepth=32 --randrepeat=0 "${common[@]}" \
      --ramp_time=0 --output="$dir/rw.json" >/dev/null
    python3 -c 'import json, sys; print(sys.argv[1], round(json.load(open(sys.argv[2]))["jobs"][0]["write"]["iops"]), 0, 0, sep="\t")' \
      "$name" "$dir/rw.json" >> "$results"
    tail -n 1 "$results" | awk -F'\t' '{printf "%-26s cold randwrite %8s IOPS\n", $1, $2}'
    return
  fi
  # Sequential first (lays the data down), then random writes, then reads.
  # (the nbd engine prints a line of its own on stdout: JSON goes to files)
  fio --name=seqwrite --rw=write --bs=1M --iodepth=8 "${common[@]}" --output="$dir/sw.json" >/dev/null
  fio --name=randwrite --rw=randwrite --bs=4k --iodepth=32 --randrepeat=0 "${common[@]}" \
    --output="$dir/rw.json" >/dev/null
  fio --name=randread --rw=randread --bs=4k --iodepth=32 --randrepeat=0 "${common[@]}" \
    --output="$dir/rr.json" >/dev/null
  python3 - "$name" "$dir/sw.json" "$dir/rw.json" "$dir/rr.json" >> "$results" <<'EOF'
import json, sys
name, sw, rw, rr = sys.argv[1], *(json.load(open(x)) for x in sys.argv[2:])
w = lambda j: j["jobs"][0]["write"]
r = lambda j: j["jobs"][0]["read"]
print(f'{name}\t{w(rw)["iops"]:.0f}\t{r(rr)["iops"]:.0f}\t{w(sw)["bw"] / 1024:.0f}')
EOF
  tail -n 1 "$results" | awk -F'\t' '{printf "%-26s randwrite %8s IOPS  randread %8s IOPS  seqwrite %6s MiB/s\n", $1, $2, $3, $4}'
}

# 1. mirrorvol serve: a group of the two files, one mirrored volume.
for cache in none writeback; do
  fresh_images
  MIRRORVOL_DISKS="$a,$b" "$bin" init "$a" "$b" --style raw --group bench ${MIRRORVOL_BENCH_REGION:+--region-size $MIRRORVOL_BENCH_REGION} >/dev/null
  MIRRORVOL_DISKS="$a,$b" "$bin" create data --size "${vol_mib}M" --mirror >/dev/null 2>&1
  MIRRORVOL_DISKS="$a,$b" "$bin" serve --cache=$cache --listen "unix:$sock" 2>"$dir/serve.log" &
  server_pid=$!
  wait_socket
  run_fio "mirrorvol-cache=$cache" "nbd+unix:///data?socket=$sock"
  stop_server
done

# 2. and 3. qemu-nbd: quorum over the two files, and one raw file.
quorum="driver=quorum,vote-threshold=1,read-pattern=fifo"
quorum+=",children.0.driver=raw,children.0.file.driver=file,children.0.file.filename=$a"
quorum+=",children.1.driver=raw,children.1.file.driver=file,children.1.file.filename=$b"
for cache in none writeback; do
  fresh_images
  qemu-nbd -t -k "$sock" -x data --cache=$cache --aio=io_uring --image-opts "$quorum" &
  server_pid=$!
  wait_socket
  run_fio "qemu-quorum-cache=$cache" "nbd+unix:///data?socket=$sock"
  stop_server

  fresh_images
  qemu-nbd -t -k "$sock" -x data --cache=$cache --aio=io_uring -f raw "$a" &
  server_pid=$!
  wait_socket
  run_fio "qemu-raw-cache=$cache" "nbd+unix:///data?socket=$sock"
  stop_server
done

echo
python3 - "$results" "$cold" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    n, rw, rr, sw = line.rstrip("\n").split("\t")
    rows[n] = (float(rw), float(rr), float(sw))
print("| target | randwrite 4k IOPS | randread 4k IOPS | seqwrite 1M MiB/s |")
print("|---|---:|---:|---:|")
for n, (rw, rr, sw) in rows.items():
    print(f"| {n} | {rw:.0f} | {rr:.0f} | {sw:.0f} |")
print()
cold = sys.argv[2] == "1"
for cache in ("none", "writeback"):
    m = rows[f"mirrorvol-cache={cache}"]
    if cold:
        q, r = rows[f"qemu-quorum-cache={cache}"], rows[f"qemu-raw-cache={cache}"]
        print(f"mirrorvol --cache={cache}, cold (fresh files, first writes):")
        print(f"  randwrite vs quorum    {m[0] / q[0]:5.2f}x  (target >= 1.3x)")
        print(f"  randwrite vs raw       {m[0] / r[0]:5.2f}x  (target >= 0.85x)")
        continue
    q, r = rows[f"qemu-quorum-cache={cache}"], rows[f"qemu-raw-cache={cache}"]
    checks = [
        ("randwrite vs quorum", m[0] / q[0], 1.3),
        ("randwrite vs raw", m[0] / r[0], 0.85),
        ("randread vs raw", m[1] / r[1], 1.0),
        ("seqwrite vs quorum", m[2] / q[2], 1.0),
    ]
    print(f"mirrorvol --cache={cache} against qemu-nbd --cache={cache}:")
    for what, ratio, target in checks:
        verdict = "ok" if ratio >= target else "MISS"
        print(f"  {what:22} {ratio:5.2f}x  (target >= {target}x)  {verdict}")
EOF
