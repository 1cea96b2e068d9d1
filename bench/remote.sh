#!/usr/bin/env bash
# A mirror with one leg on another machine's NBD export (issue 16):
# mirrorvol against qemu's quorum driver with the same far leg, and a
# single local file for reference, all driven by fio over NBD on a Unix
# socket, side by side in one run. The far disk is an image file served
# by qemu-nbd over TCP on loopback, with --delay MS of latency added each
# way by nbdkit's delay filter in front of it (0: none). Every figure is
# the median of --runs runs; ratios are taken within a run.
#
#   bash bench/remote.sh [--dir DIR] [--size MIB] [--seconds S] [--runs N]
#                        [--delay MS] [--away MIB] [--write-behind N]
#
# With --write-behind N, mirrorvol runs a second time with the far disk
# write-mostly and N writes behind (md's write-mostly/write-behind), as
# target mirrorvol-wb.
#
# Each run, for each target, in this order:
#   1. fresh:     new sparse files, a new volume, random 4 KiB writes QD32
#                 with nothing written before (what a user meets first);
#   2. randwrite: random 4 KiB writes QD32 again (bits set, files written);
#   3. randread:  random 4 KiB reads QD32;
#   4. qd1:       random 4 KiB writes QD1 (p50 latency).
# Then, for mirrorvol only, on a new volume, the link is cut (the far
# server stopped) while --away MiB are written, the server started again,
# and the time until the volume is healthy again (the first reconnection
# attempts are 1, 2 and 4 s after the cut) and the bytes resynced are
# printed: quorum
# has no resync to compare (a child that missed writes stays behind until
# an admin copies it), md over NBD and DRBD are kernel modules this
# machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=""
size_mib=1088
seconds=5
runs=3
delay=0
away=64
write_behind=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --size) size_mib="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --delay) delay="$2"; shift 2 ;;
    --away) away="$2"; shift 2 ;;
    --write-behind) write_behind="$2"; shift 2 ;;
    *) echo "usage: $0 [--dir DIR] [--size MIB] [--seconds S] [--runs N] [--delay MS] [--away MIB] [--write-behind N]" >&2; exit 2 ;;
  esac
done
for t in fio qemu-nbd qemu-io nbdkit python3; do
  command -v "$t" >/dev/null || { echo "bench needs $t" >&2; exit 2; }
done

cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/mirrorvol"

if [ -z "$dir" ]; then dir=$(mktemp -d /var/tmp/mirrorvol-remote-bench.XXXXXX); fi
mkdir -p "$dir"
a="$dir/a.img" b="$dir/b.img" sock="$dir/nbd.sock" results="$dir/results.tsv"
far_port=10899 front_port=10898
: > "$results"
# shellcheck source=bench/server.sh
. bench/server.sh
far_pid="" front_pid=""

# The far disk: qemu-nbd on loopback TCP, and (with --delay) nbdkit's
# delay filter in front of it, forwarding to it.
start_far() {
  qemu-nbd --persistent --shared=16 --format=raw --cache=none --aio=io_uring \
    --export-name=disk --bind 127.0.0.1 --port "$far_port" "$b" &
  far_pid=$!
  for _ in $(seq 200); do nbdinfo "nbd://127.0.0.1:$far_port/disk" >/dev/null 2>&1 && break; sleep 0.05; done
  if [ "$delay" != 0 ]; then
    nbdkit --exit-with-parent -f -i 127.0.0.1 -p "$front_port" --filter=delay nbd \
      hostname=127.0.0.1 port="$far_port" export=disk \
      delay-read="${delay}ms" delay-write="${delay}ms" \
      delay-zero="${delay}ms" &
    front_pid=$!
    for _ in $(seq 200); do nbdinfo "nbd://127.0.0.1:$front_port/" >/dev/null 2>&1 && break; sleep 0.05; done
  fi
}
stop_far() {
  for p in $front_pid $far_pid; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  far_pid="" front_pid=""
}
far_uri() {
  if [ "$delay" != 0 ]; then echo "nbd://127.0.0.1:$front_port/"; else echo "nbd://127.0.0.1:$far_port/disk"; fi
}
trap 'stop_server; stop_far; rm -f "$a" "$b"' EXIT

fresh_images() {
  stop_far
  rm -f "$a" "$b"
  truncate -s "${size_mib}M" "$a" "$b"
  start_far
}

vol_mib=$((size_mib - 64))


workloads() { # RUN TARGET
  fio_job fresh "$1" "$2" --rw=randwrite --bs=4k --iodepth=32
  fio_job randwrite "$1" "$2" --rw=randwrite --bs=4k --iodepth=32 --ramp_time=1
  fio_job randread "$1" "$2" --rw=randread --bs=4k --iodepth=32 --ramp_time=1
  fio_job qd1 "$1" "$2" --rw=randwrite --bs=4k --iodepth=1 --ramp_time=1
}

status_state() {
  MIRRORVOL_DISKS="$a,$(far_uri)" "$bin" status --json 2>/dev/null |
    python3 -c 'import json,sys; print(next(v["state"] for v in json.load(sys.stdin)["volumes"] if v["name"]=="data"))' || true
}

for run in $(seq "$runs"); do
  fresh_images
  disks="$a,$(far_uri)"
  MIRRORVOL_DISKS="$disks" "$bin" init "$a" "$(far_uri)" --style raw --group bench >/dev/null
  MIRRORVOL_DISKS="$disks" "$bin" create data --size "${vol_mib}M" --mirror >/dev/null 2>&1
  MIRRORVOL_DISKS="$disks" "$bin" serve --listen "unix:$sock" 2>"$dir/serve.log" &
  server_pid=$!
  wait_socket
  workloads "$run" mirrorvol
  stop_server
  if [ "$write_behind" != 0 ]; then
    fresh_images
    MIRRORVOL_DISKS="$disks" "$bin" init "$a" "$(far_uri)" --style raw --group bench >/dev/null
    MIRRORVOL_DISKS="$disks" "$bin" create data --size "${vol_mib}M" --mirror >/dev/null 2>&1
    MIRRORVOL_DISKS="$disks" "$bin" set-disk "$(far_uri)" --write-mostly on \
      --write-behind "$write_behind" >/dev/null
    MIRRORVOL_DISKS="$disks" "$bin" serve --listen "unix:$sock" 2>"$dir/serve.log" &
    server_pid=$!
    wait_socket
    workloads "$run" mirrorvol-wb
    stop_server
  fi
  # The link cut, on a new volume (the random writes above leave bits set
  # all over this one for a while): the far server stops, --away MiB are
  # written, it comes back; time until the volume is healthy, bytes
  # resynced.
  fresh_images
  MIRRORVOL_DISKS="$disks" "$bin" init "$a" "$(far_uri)" --style raw --group bench >/dev/null
  MIRRORVOL_DISKS="$disks" "$bin" create data --size "${vol_mib}M" --mirror >/dev/null 2>&1
  MIRRORVOL_DISKS="$disks" "$bin" serve --listen "unix:$sock" 2>"$dir/serve.log" &
  server_pid=$!
  wait_socket
  # serve binds its socket before it opens the disks: the far server goes
  # only once the volume is served with both (stopped while serve still
  # read the far disk, serve saw 1 of 2 disks and, rightly, would not
  # claim the group: it could be one side of a partition).
  for _ in $(seq 300); do [ "$(status_state)" = healthy ] && break; sleep 0.1; done
  [ "$(status_state)" = healthy ] || { echo "the new mirror did not come up healthy (see $dir/serve.log)" >&2; exit 1; }
  stop_far
  qemu-io -f raw -c "write -P 7 0 ${away}M" "nbd+unix:///data?socket=$sock" >/dev/null
  for _ in $(seq 300); do [ "$(status_state)" = failed-redundancy ] && break; sleep 0.1; done
  back=$(date +%s.%N)
  start_far
  for _ in $(seq 1200); do [ "$(status_state)" = healthy ] && break; sleep 0.1; done
  took=$(python3 -c "import time; print(f'{time.time() - $back:.1f}')")
  bytes=$(grep -o 'resynced .* of volume data onto nbd[^ ]* (' "$dir/serve.log" | tail -n 1 |
    sed -E 's/.*\(([0-9]+) bytes\).*/\1/; s/^resynced ([0-9]+) bytes.*/\1/')
  printf '%s\tmirrorvol\treturn\t%s\t%s\t0\n' "$run" "$took" "${bytes:-0}" >> "$results"
  echo "  run $run mirrorvol  back in sync ${took} s after the far disk returned; resynced ${bytes:-?} bytes after ${away} MiB written away"
  stop_server

  fresh_images
  quorum="driver=quorum,vote-threshold=1,read-pattern=fifo"
  quorum+=",children.0.driver=raw,children.0.file.driver=file,children.0.file.filename=$a"
  quorum+=",children.1.driver=raw,children.1.file.driver=nbd,children.1.file.server.type=inet"
  if [ "$delay" != 0 ]; then
    quorum+=",children.1.file.server.host=127.0.0.1,children.1.file.server.port=$front_port"
  else
    quorum+=",children.1.file.server.host=127.0.0.1,children.1.file.server.port=$far_port,children.1.file.export=disk"
  fi
  qemu-nbd -t -k "$sock" -x data --cache=none --aio=io_uring --image-opts "$quorum" &
  server_pid=$!
  wait_socket
  workloads "$run" quorum
  stop_server

  fresh_images
  qemu-nbd -t -k "$sock" -x data --cache=none --aio=io_uring -f raw "$a" &
  server_pid=$!
  wait_socket
  workloads "$run" local-raw
  stop_server
done
stop_far

echo
python3 - "$results" "$delay" "$away" "$vol_mib" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = defaultdict(dict)
for line in open(sys.argv[1]):
    run, target, job, a, b, c = line.rstrip("\n").split("\t")
    rows[(target, job)][run] = (float(a), float(b), float(c))
med = lambda xs: statistics.median(xs) if xs else float("nan")
fig = lambda t, j, k: med([v[k] for v in rows[(t, j)].values()])
print(f"Medians of {len(rows[('mirrorvol', 'fresh')])} runs, far leg over loopback TCP, {sys.argv[2]} ms added each way:")
print()
print("| target | fresh randwrite IOPS | randwrite IOPS | randread IOPS | QD1 randwrite p50 µs |")
print("|---|---:|---:|---:|---:|")
for t in ["mirrorvol", "mirrorvol-wb", "quorum", "local-raw"]:
    if not rows[(t, "fresh")]:
        continue
    print(f"| {t} | {fig(t,'fresh',0):.0f} | {fig(t,'randwrite',0):.0f} | {fig(t,'randread',0):.0f} | {fig(t,'qd1',2):.0f} |")
print()
def ratio(job, k, peer, invert=False, ours="mirrorvol"):
    r = []
    for run, v in rows[(ours, job)].items():
        w = rows[(peer, job)].get(run)
        if w and v[k] > 0 and w[k] > 0:
            r.append(w[k] / v[k] if invert else v[k] / w[k])
    return med(r), min(r, default=float("nan")), max(r, default=float("nan"))
print("mirrorvol against quorum with the same far leg (median of per-run ratios, min-max):")
for what, job, k, inv in [("fresh randwrite", "fresh", 0, False), ("warm randwrite", "randwrite", 0, False),
                          ("randread", "randread", 0, False), ("QD1 p50, quorum/ours", "qd1", 2, True)]:
    r, lo, hi = ratio(job, k, "quorum", inv)
    print(f"  {what:22} {r:5.2f}x  ({lo:.2f}-{hi:.2f})")
if rows[("mirrorvol-wb", "fresh")]:
    print("mirrorvol, far disk write-mostly with write-behind, against quorum:")
    for what, job, k, inv in [("fresh randwrite", "fresh", 0, False), ("warm randwrite", "randwrite", 0, False),
                              ("randread", "randread", 0, False), ("QD1 p50, quorum/ours", "qd1", 2, True)]:
        r, lo, hi = ratio(job, k, "quorum", inv, ours="mirrorvol-wb")
        print(f"  {what:22} {r:5.2f}x  ({lo:.2f}-{hi:.2f})")
ret = rows[("mirrorvol", "return")]
if ret:
    print()
    print(f"After {sys.argv[3]} MiB written with the far disk away: back in sync in "
          f"{med([v[0] for v in ret.values()]):.1f} s (median), resyncing "
          f"{med([v[1] for v in ret.values()]) / 2**20:.0f} MiB of the {sys.argv[4]} MiB volume "
          "(quorum has no resync: its far child stays behind)")
EOF
