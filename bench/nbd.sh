#!/usr/bin/env bash
# `mirrorvol serve` against qemu-nbd (quorum over two files, and one raw
# file), all driven by fio over NBD on a Unix socket, side by side in one
# run (issues 4 and 12, DESIGN §7). Same image files, same filesystem;
# every figure is the median of --runs runs, every ratio is taken within a
# run and then its median printed with its spread.
#
#   bash bench/nbd.sh [--dir DIR] [--size MIB] [--seconds S] [--runs N]
#                     [--engines "uring threads"] [--caches "none writeback"]
#
# Each run, for each server and cache mode, in this order:
#   1. fresh:   new sparse files, a new volume, random 4 KiB writes QD32
#               over the whole volume with nothing written before (every
#               write-intent bit clear): what a user meets first. As many
#               writes for every server (half the volume's size), not as
#               many seconds: the jobs after it then start from files
#               written alike, where a faster server used to leave more
#               blocks scattered over the files for the sequential writes
#               to write back;
#   2. warm:    sequential 1 MiB writes QD8 over the volume (end_fsync=1,
#               so the page cache is paid for), random 4 KiB writes QD32,
#               random 4 KiB reads QD32, random 4 KiB writes QD1 (p50
#               latency);
#   3. clients: four connections at once (numjobs 4, QD8 each), random
#               4 KiB writes.
# Between two jobs the image files are synced (`sync FILE`), so that under
# --cache writeback no job waits behind the dirty pages of the one before.
# qemu-nbd runs with --cache=none|writeback --aio=io_uring --shared=4
# (without --shared it serves one connection at a time: the four clients
# would run one after another and fio would add up four single-client
# rates); mirrorvol with --cache=none|writeback and each --io-engine of
# --engines.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=""
size_mib=1088
seconds=5
runs=3
engines="uring threads"
caches="none writeback"
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --size) size_mib="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --engines) engines="$2"; shift 2 ;;
    --caches) caches="$2"; shift 2 ;;
    *) echo "usage: $0 [--dir DIR] [--size MIB] [--seconds S] [--runs N] [--engines LIST] [--caches LIST]" >&2; exit 2 ;;
  esac
done
for t in fio qemu-nbd python3; do
  command -v "$t" >/dev/null || { echo "bench needs $t" >&2; exit 2; }
done

cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/mirrorvol"

if [ -z "$dir" ]; then dir=$(mktemp -d /var/tmp/mirrorvol-nbd-bench.XXXXXX); fi
mkdir -p "$dir"
a="$dir/a.img" b="$dir/b.img" sock="$dir/nbd.sock" results="$dir/results.tsv"
: > "$results"
# shellcheck source=bench/server.sh
. bench/server.sh
trap 'stop_server; rm -f "$a" "$b"' EXIT

fresh_images() {
  rm -f "$a" "$b"
  truncate -s "${size_mib}M" "$a" "$b"
}


# The volume is a little smaller than a disk (labels, config); every
# target is driven over the same byte range.
vol_mib=$((size_mib - 64))


# Writes back what the last job left dirty in the page cache (--cache
# writeback), so that no job pays for the one before: a server that took
# more random writes in the fresh job left more for the sequential writes
# to wait behind (writeback and dirty throttling), and their end_fsync
# wrote it back too. Nothing is dirty under --cache none.
settle() {
  sync "$a" "$b"
}

workloads() { # RUN TARGET
  local run="$1" target="$2"
  fio_job fresh "$run" "$target" --rw=randwrite --bs=4k --iodepth=32 \
    --time_based=0 --runtime=120 --io_size="$((vol_mib / 2))M"
  settle
  fio_job seqwrite "$run" "$target" --rw=write --bs=1M --iodepth=8 --end_fsync=1 --time_based=0 --runtime=120
  settle
  fio_job randwrite "$run" "$target" --rw=randwrite --bs=4k --iodepth=32 --ramp_time=1
  settle
  fio_job randread "$run" "$target" --rw=randread --bs=4k --iodepth=32 --ramp_time=1
  settle
  fio_job qd1 "$run" "$target" --rw=randwrite --bs=4k --iodepth=1 --ramp_time=1
  settle
  fio_job clients "$run" "$target" --rw=randwrite --bs=4k --iodepth=8 --numjobs=4 --ramp_time=1
}

quorum="driver=quorum,vote-threshold=1,read-pattern=fifo"
quorum+=",children.0.driver=raw,children.0.file.driver=file,children.0.file.filename=$a"
quorum+=",children.1.driver=raw,children.1.file.driver=file,children.1.file.filename=$b"

for run in $(seq "$runs"); do
  for cache in $caches; do
    for engine in $engines; do
      fresh_images
      MIRRORVOL_DISKS="$a,$b" "$bin" init "$a" "$b" --style raw --group bench \
        ${MIRRORVOL_BENCH_REGION:+--region-size $MIRRORVOL_BENCH_REGION} >/dev/null
      MIRRORVOL_DISKS="$a,$b" "$bin" create data --size "${vol_mib}M" --mirror >/dev/null 2>&1
      MIRRORVOL_DISKS="$a,$b" "$bin" serve --cache="$cache" --io-engine="$engine" \
        --listen "unix:$sock" 2>"$dir/serve.log" &
      server_pid=$!
      wait_socket
      workloads "$run" "mirrorvol-$engine-$cache"
      stop_server
    done

    fresh_images
    qemu-nbd -t --shared=4 -k "$sock" -x data --cache="$cache" --aio=io_uring --image-opts "$quorum" &
    server_pid=$!
    wait_socket
    workloads "$run" "quorum-$cache"
    stop_server

    fresh_images
    qemu-nbd -t --shared=4 -k "$sock" -x data --cache="$cache" --aio=io_uring -f raw "$a" &
    server_pid=$!
    wait_socket
    workloads "$run" "raw-$cache"
    stop_server
  done
done

echo
python3 - "$results" "$engines" "$caches" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = defaultdict(dict)  # (target, job) -> run -> (iops, mibs, p50)
for line in open(sys.argv[1]):
    run, target, job, iops, mibs, p50 = line.rstrip("\n").split("\t")
    rows[(target, job)][run] = (float(iops), float(mibs), float(p50))
engines, caches = sys.argv[2].split(), sys.argv[3].split()
jobs = ["fresh", "seqwrite", "randwrite", "randread", "qd1", "clients"]
med = lambda xs: statistics.median(xs) if xs else float("nan")
def fig(target, job, k):
    return med([v[k] for v in rows[(target, job)].values()])
print("Medians of", len({r for d in rows.values() for r in d}), "runs:")
print()
print("| target | fresh randwrite IOPS | seqwrite 1M MiB/s | randwrite IOPS | randread IOPS | QD1 randwrite p50 µs | 4 clients randwrite IOPS |")
print("|---|---:|---:|---:|---:|---:|---:|")
targets = sorted({t for t, _ in rows}, key=lambda t: (t.split("-")[-1], t))
for t in targets:
    print(f"| {t} | {fig(t,'fresh',0):.0f} | {fig(t,'seqwrite',1):.0f} | {fig(t,'randwrite',0):.0f} | "
          f"{fig(t,'randread',0):.0f} | {fig(t,'qd1',2):.0f} | {fig(t,'clients',0):.0f} |")
print()
def ratio(m, o, job, k, invert=False):
    per_run = []
    for run, v in rows[(m, job)].items():
        w = rows[(o, job)].get(run)
        if w and v[k] > 0 and w[k] > 0:
            per_run.append(w[k] / v[k] if invert else v[k] / w[k])
    return med(per_run), (min(per_run) if per_run else float("nan")), (max(per_run) if per_run else float("nan"))
checks = [
    ("fresh randwrite vs quorum", "fresh", 0, "quorum", 1.0, False),
    ("warm randwrite vs quorum", "randwrite", 0, "quorum", 1.3, False),
    ("warm randwrite vs raw", "randwrite", 0, "raw", 0.85, False),
    ("four clients vs quorum", "clients", 0, "quorum", 1.0, False),
    ("randread vs raw", "randread", 0, "raw", 1.0, False),
    ("seqwrite 1M vs quorum", "seqwrite", 1, "quorum", 1.0, False),
    # Latency: lower is better; the figure is raw's p50 over ours.
    ("QD1 p50 latency, raw/ours", "qd1", 2, "raw", 1 / 1.1, True),
]
for cache in caches:
    for engine in engines:
        m = f"mirrorvol-{engine}-{cache}"
        print(f"mirrorvol --io-engine={engine} --cache={cache} against qemu-nbd --cache={cache} "
              "(median of per-run ratios, min-max):")
        for what, job, k, peer, target, inv in checks:
            r, lo, hi = ratio(m, f"{peer}-{cache}", job, k, inv)
            verdict = "ok" if r >= target else "MISS"
            print(f"  {what:28} {r:5.2f}x  ({lo:.2f}-{hi:.2f})  target >= {target:.2f}x  {verdict}")
        print()
EOF
