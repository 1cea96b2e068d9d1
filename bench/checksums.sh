#!/usr/bin/env bash
# What block checksums cost (issue 13): the same build of `mirrorvol serve`
# with them (the default) and without (MIRRORVOL_NO_CHECKSUMS=1), driven by
# fio over NBD on a Unix socket, side by side in one run. Each run, for
# each side, on new sparse image files and a new mirrored volume:
#   0. fresh:     random 4 KiB writes QD32 on the new volume (every
#                 write-intent bit clear, nothing written: what a user
#                 meets first);
#   1. fill:      sequential 1 MiB writes over the whole volume (every
#                 block then has a checksum; not reported);
#   2. randwrite: random 4 KiB writes QD32 (warm);
#   3. randread:  random 4 KiB reads QD32 (warm; every read verified);
#   4. qd1:       random 4 KiB writes QD1 (p50 latency).
# Every figure is the median of --runs runs; every ratio is taken within a
# run (checksums / none) and its median printed with its spread.
#
#   bash bench/checksums.sh [--dir DIR] [--size MIB] [--seconds S] [--runs N]
#                           [--cache none|writeback]
set -euo pipefail
cd "$(dirname "$0")/.."

dir=""
size_mib=1088
seconds=5
runs=3
cache=none
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --size) size_mib="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    *) echo "usage: $0 [--dir DIR] [--size MIB] [--seconds S] [--runs N] [--cache none|writeback]" >&2; exit 2 ;;
  esac
done
for t in fio python3; do
  command -v "$t" >/dev/null || { echo "bench needs $t" >&2; exit 2; }
done

cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/mirrorvol"

# A directory of its own is removed at the end; one given with --dir keeps
# its results and logs.
made=""
if [ -z "$dir" ]; then dir=$(mktemp -d /var/tmp/mirrorvol-sums-bench.XXXXXX); made=1; fi
mkdir -p "$dir"
a="$dir/a.img" b="$dir/b.img" sock="$dir/nbd.sock" results="$dir/results.tsv"
: > "$results"
# shellcheck source=bench/server.sh
. bench/server.sh
trap 'stop_server; rm -f "$a" "$b"; if [ -n "$made" ]; then rm -rf "$dir"; fi' EXIT
vol_mib=$((size_mib - 64))

for run in $(seq "$runs"); do
  for side in checksums none; do
    rm -f "$a" "$b"
    truncate -s "${size_mib}M" "$a" "$b"
    MIRRORVOL_DISKS="$a,$b" "$bin" init "$a" "$b" --style raw --group bench >/dev/null
    MIRRORVOL_DISKS="$a,$b" "$bin" create data --size "${vol_mib}M" --mirror >/dev/null 2>&1
    off=""
    if [ "$side" = none ]; then off=1; fi
    MIRRORVOL_NO_CHECKSUMS="$off" MIRRORVOL_DISKS="$a,$b" "$bin" serve --cache="$cache" \
      --listen "unix:$sock" 2>"$dir/serve.log" &
    server_pid=$!
    wait_socket
    fio_job fresh "$run" "$side" --rw=randwrite --bs=4k --iodepth=32
    fio_job fill "$run" "$side" --rw=write --bs=1M --iodepth=8 --time_based=0 --runtime=300 --end_fsync=1
    fio_job randwrite "$run" "$side" --rw=randwrite --bs=4k --iodepth=32 --ramp_time=1
    fio_job randread "$run" "$side" --rw=randread --bs=4k --iodepth=32 --ramp_time=1
    fio_job qd1 "$run" "$side" --rw=randwrite --bs=4k --iodepth=1 --ramp_time=1
    stop_server
  done
done

echo
python3 - "$results" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = defaultdict(dict)  # (side, job) -> run -> (iops, mibs, p50)
for line in open(sys.argv[1]):
    run, side, job, iops, mibs, p50 = line.rstrip("\n").split("\t")
    rows[(side, job)][run] = (float(iops), float(mibs), float(p50))
med = lambda xs: statistics.median(xs) if xs else float("nan")
fig = lambda side, job, k: med([v[k] for v in rows[(side, job)].values()])
print("Medians of", len(rows[("checksums", "randwrite")]), "runs:")
print()
print("| build | fresh randwrite 4K QD32 IOPS | randwrite 4K QD32 IOPS | randread 4K QD32 IOPS | QD1 randwrite p50 µs |")
print("|---|---:|---:|---:|---:|")
for side in ["checksums", "none"]:
    print(f"| {side} | {fig(side,'fresh',0):.0f} | {fig(side,'randwrite',0):.0f} | {fig(side,'randread',0):.0f} | {fig(side,'qd1',2):.0f} |")
print()
for what, job, k, inv in [("fresh randwrite IOPS", "fresh", 0, False),
                          ("randwrite IOPS", "randwrite", 0, False), ("randread IOPS", "randread", 0, False),
                          ("QD1 p50 latency, none/checksums", "qd1", 2, True)]:
    per_run = []
    for run, v in rows[("checksums", job)].items():
        w = rows[("none", job)].get(run)
        if w and v[k] > 0 and w[k] > 0:
            per_run.append(w[k] / v[k] if inv else v[k] / w[k])
    r = med(per_run)
    verdict = "ok" if r >= 0.9 else "MISS"
    print(f"  {what:32} {r:5.2f}x  ({min(per_run):.2f}-{max(per_run):.2f})  target >= 0.90x  {verdict}")
EOF
