#!/usr/bin/env bash
# A mirror of a local file and a remote export across a real network link
# (issue 16): a veth pair into a network namespace made for the run, the
# far image served inside it by qemu-nbd over TCP, and with --delays D > 0
# nbdkit's delay filter inside it too, in front of qemu-nbd, adding D ms to
# every read, write and zero (nbdkit 1.32 has no delay-flush; -t 64 threads
# a connection, so that the sleeping requests of the filter are not the
# cap). Against the two legs alone, all driven by fio over NBD:
#
#   local      the local image file alone, qemu-nbd on a Unix socket;
#   remote     the far export alone, fio straight at its nbd:// URI;
#   mirror     mirrorvol serve of a two-way mirror of the two;
#   mirror-wb  the same with the far disk write-mostly, 256 writes behind
#              (set-disk --write-mostly on --write-behind 256);
#   both       the local file alone and the far export alone at once, one
#              fio each, the far one with 256 in flight as mirror-wb may
#              have (fresh and warm only): what this machine gives two
#              legs served side by side with nothing between them. A
#              mirror makes both writes (and its far server's work shares
#              these CPUs), so the lower of the two is a ceiling for it.
#
# Each run, for each delay, for each target in this order, on new sparse
# files (a new volume, a new far image): random 4 KiB writes QD32 with
# nothing written before (fresh), again (warm), then QD1 (p50 latency).
# Every figure is the median of --runs runs; ratios are taken within a run,
# then their median given. The targets of issue 16: mirror QD1 p50 <= 1.1x
# the slower of local and remote alone (DRBD protocol C's rule is under 1%
# over disk + round trip); mirror-wb QD32 >= 0.9x local alone.
#
# Then once, delay 0, on a new serving mirror, twice (a sequential write of
# --away MiB with qemu-io, then --away MiB of random 4 KiB writes with fio
# over the whole volume): the link is cut (the far end of the veth set
# down: packets vanish, the remote deadline, 5 s, fails the far disk), the
# writes made through serve, the link put back 10 s after the cut, and the
# seconds until `status` shows the volume healthy again (reconnection
# attempts are 1, 2, 4, 8 s... after the disk left) printed with the bytes
# resynced (serve's "resynced N MiB (B bytes) of volume data onto ..."),
# against the bytes written.
#
#   sudo bash bench/veth.sh [--dir DIR] [--size MIB] [--seconds S] [--runs N]
#                           [--delays "0 1 5"] [--away MIB]
#
# Needs root (ip netns, ip link), fio, qemu-nbd, qemu-io, nbdkit, nbdinfo.
# The namespace, the veth pair and every process started are removed on
# exit; results.tsv and the logs stay in DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=""
size_mib=1024
seconds=4
runs=3
delays="0 1 5"
away=64
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --size) size_mib="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --delays) delays="$2"; shift 2 ;;
    --away) away="$2"; shift 2 ;;
    *) echo "usage: $0 [--dir DIR] [--size MIB] [--seconds S] [--runs N] [--delays \"0 1 5\"] [--away MIB]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench/veth.sh needs root (a network namespace and a veth pair)" >&2; exit 2; }
for t in ip fio qemu-nbd qemu-io nbdkit nbdinfo python3; do
  command -v "$t" >/dev/null || { echo "bench needs $t" >&2; exit 2; }
done

cargo build --release --quiet
bin="$PWD/${CARGO_TARGET_DIR:-target}/release/mirrorvol"

if [ -z "$dir" ]; then dir=$(mktemp -d /var/tmp/mirrorvol-veth-bench.XXXXXX); fi
mkdir -p "$dir"
a="$dir/local.img" b="$dir/far.img" sock="$dir/nbd.sock" results="$dir/results.tsv"
: > "$results"
# The volume's size; the images have 64 MiB more for labels and bitmaps.
vol_mib=$size_mib
img_mib=$((size_mib + 64))
# serve's control socket and the host id in DIR: nothing of the machine's.
export MIRRORVOL_RUN_DIR="$dir/run" MIRRORVOL_HOST_ID_FILE="$dir/host-id"
# shellcheck source=bench/server.sh
. bench/server.sh

# The link: names and a /30 of this process's own (tests/remote_link.rs
# takes 10.20-219.x.x; these are 10.220-249.x.x).
ns="mvb-$$" near="mvbn$$" far="mvbf$$"
net="10.$(($$ % 30 + 220)).$((($$ / 30) % 64 * 4))"
here="$net.1" there="$net.2"
far_port=10809 front_port=10810
far_pid="" front_pid="" job_pid="" made_link=""

# stop_pid PID: SIGTERM, SIGKILL after 10 s, reaped.
stop_pid() {
  [ -n "$1" ] || return 0
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  set +e
  stop_pid "$job_pid"
  stop_pid "$server_pid"; server_pid=""
  stop_pid "$front_pid"
  stop_pid "$far_pid"
  rm -f "$sock" "$a" "$b"
  if [ -n "$made_link" ]; then
    ip link del "$near" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

made_link=1
ip netns add "$ns"
ip link add "$near" type veth peer name "$far"
ip link set "$far" netns "$ns"
ip addr add "$here/30" dev "$near"
ip link set "$near" up
ip netns exec "$ns" ip addr add "$there/30" dev "$far"
ip netns exec "$ns" ip link set "$far" up
ip netns exec "$ns" ip link set lo up

wait_uri() {
  for _ in $(seq 200); do nbdinfo "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "$1 did not come up" >&2; exit 1
}
# The far disk, inside the namespace: qemu-nbd on TCP, and with a delay
# nbdkit's delay filter in front of it, forwarding to it.
start_far() {
  ip netns exec "$ns" qemu-nbd --persistent --shared=16 --format=raw --cache=none --aio=io_uring \
    --export-name=disk --bind "$there" --port "$far_port" "$b" 2>>"$dir/far.log" &
  far_pid=$!
  wait_uri "nbd://$there:$far_port/disk"
  if [ "$delay" != 0 ]; then
    ip netns exec "$ns" nbdkit --exit-with-parent -f -t 64 -i "$there" -p "$front_port" \
      --filter=delay nbd hostname="$there" port="$far_port" export=disk \
      delay-read="${delay}ms" delay-write="${delay}ms" delay-zero="${delay}ms" 2>>"$dir/far.log" &
    front_pid=$!
    wait_uri "nbd://$there:$front_port/"
  fi
}
stop_far() {
  stop_pid "$front_pid"; front_pid=""
  stop_pid "$far_pid"; far_pid=""
}
far_uri() {
  if [ "$delay" != 0 ]; then echo "nbd://$there:$front_port/"; else echo "nbd://$there:$far_port/disk"; fi
}
fresh_images() {
  stop_far
  rm -f "$a" "$b"
  truncate -s "${img_mib}M" "$a" "$b"
  start_far
}

mvol() { MIRRORVOL_DISKS="$a,$(far_uri)" "$bin" "$@"; }
# A new mirror of the local image and the far export, served on "$sock";
# with an argument, the far disk write-mostly with that many writes behind.
serve_mirror() {
  mvol init "$a" "$(far_uri)" --style raw --group bench >/dev/null
  mvol create data --size "${vol_mib}M" --mirror >/dev/null 2>&1
  if [ -n "${1:-}" ]; then
    mvol set-disk "$(far_uri)" --write-mostly on --write-behind "$1" >/dev/null
  fi
  # A simple command, so that $! is serve itself (a function or a
  # subshell in the background would leave serve behind when killed).
  MIRRORVOL_DISKS="$a,$(far_uri)" "$bin" serve --listen "unix:$sock" 2>"$dir/serve.log" &
  server_pid=$!
  wait_socket
}

# fio_on URI JOB RUN TARGET [fio args...]: one job against the first
# "${vol_mib}M" of URI for "$seconds" s; appends delay, run, target, job,
# IOPS and p50 completion latency (µs) to "$results".
fio_on() {
  fio_run "$@"
  fio_record "$2" "$3" "$4"
}
# fio_run URI JOB RUN TARGET [fio args...]: the job alone, its figures in
# "$dir/job-TARGET.json".
fio_run() {
  local uri="$1" job="$2" target="$4"; shift 4
  fio --name="$job" --ioengine=nbd "--uri=$uri" --size="${vol_mib}M" \
    --time_based --runtime="$seconds" --output-format=json --group_reporting --randrepeat=0 \
    "$@" --output="$dir/job-$target.json" >/dev/null
}
# fio_record JOB RUN TARGET: appends the figures of fio_run's job.
fio_record() {
  local job="$1" run="$2" target="$3"
  python3 - "$dir/job-$target.json" "$delay" "$run" "$target" "$job" >> "$results" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
p50 = side["clat_ns"].get("percentile", {}).get("50.000000", 0) / 1000
print(*sys.argv[2:6], f'{side["iops"]:.0f}', f"{p50:.1f}", sep="\t")
EOF
  tail -n 1 "$results" | awk -F'\t' '{printf "  delay %s ms run %s %-10s %-9s %8s IOPS  p50 %8s us\n", $1, $2, $3, $4, $5, $6}'
}
# both_at_once RUN: fresh and warm random writes against the local file
# alone (qemu-nbd, as "local", QD32) and the far export alone (QD256) at
# once.
both_at_once() {
  local job pid
  qemu-nbd -t -k "$sock" -x data --cache=none --aio=io_uring -f raw "$a" &
  server_pid=$!
  wait_socket
  for job in fresh warm; do
    local ramp=()
    [ "$job" = warm ] && ramp=(--ramp_time=1)
    fio_run "$vol_uri" "$job" "$1" both-local --rw=randwrite --bs=4k --iodepth=32 "${ramp[@]}" &
    pid=$!
    fio_run "$(far_uri)" "$job" "$1" both-remote --rw=randwrite --bs=4k --iodepth=256 "${ramp[@]}"
    wait "$pid"
    fio_record "$job" "$1" both-local
    fio_record "$job" "$1" both-remote
  done
  stop_server
}
workloads() { # URI RUN TARGET
  fio_on "$1" fresh "$2" "$3" --rw=randwrite --bs=4k --iodepth=32
  fio_on "$1" warm "$2" "$3" --rw=randwrite --bs=4k --iodepth=32 --ramp_time=1
  fio_on "$1" qd1 "$2" "$3" --rw=randwrite --bs=4k --iodepth=1 --ramp_time=1
}
vol_uri="nbd+unix:///data?socket=$sock"

for delay in $delays; do
  for run in $(seq "$runs"); do
    fresh_images
    qemu-nbd -t -k "$sock" -x data --cache=none --aio=io_uring -f raw "$a" &
    server_pid=$!
    wait_socket
    workloads "$vol_uri" "$run" local
    stop_server

    fresh_images
    workloads "$(far_uri)" "$run" remote

    fresh_images
    serve_mirror
    workloads "$vol_uri" "$run" mirror
    stop_server

    fresh_images
    serve_mirror 256
    workloads "$vol_uri" "$run" mirror-wb
    stop_server

    fresh_images
    both_at_once "$run"
  done
done

# The link cut, delay 0.
delay=0
far_disk() { # FIELD: of the far disk, from status
  mvol status --json 2>/dev/null | python3 -c '
import json, sys
st = json.load(sys.stdin)
if sys.argv[1] == "volume":
    print(next(v["state"] for v in st["volumes"] if v["name"] == "data"))
else:
    print(next(d["state"] for d in st["disks"] if d["path"] == sys.argv[2]))' "$1" "$(far_uri)" || true
}
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{$(now) - $1:.1f}')"; }
cut_case() { # PATTERN COMMAND...
  local pattern="$1"; shift
  fresh_images
  serve_mirror
  for _ in $(seq 100); do [ "$(far_disk volume)" = healthy ] && break; sleep 0.1; done
  local cut failed="" wrote back back_at took bytes
  cut=$(now)
  ip netns exec "$ns" ip link set "$far" down
  "$@" &
  job_pid=$!
  while kill -0 "$job_pid" 2>/dev/null; do
    [ -z "$failed" ] && [ "$(far_disk disk)" = failed ] && failed=$(since "$cut")
    sleep 0.1
  done
  wait "$job_pid"; job_pid=""
  wrote=$(since "$cut")
  while python3 -c "import sys; sys.exit($(now) - $cut >= 10)"; do
    [ -z "$failed" ] && [ "$(far_disk disk)" = failed ] && failed=$(since "$cut")
    sleep 0.1
  done
  [ -z "$failed" ] && [ "$(far_disk disk)" = failed ] && failed=$(since "$cut")
  ip netns exec "$ns" ip link set "$far" up
  back=$(now) back_at=$(since "$cut")
  took=""
  for _ in $(seq 1800); do
    [ "$(far_disk volume)" = healthy ] && { took=$(since "$back"); break; }
    sleep 0.1
  done
  bytes=$(grep -o 'resynced .* of volume data onto nbd[^ ]*' "$dir/serve.log" | tail -n 1 |
    sed -E 's/.*\(([0-9]+) bytes\).*/\1/; s/^resynced ([0-9]+) bytes.*/\1/')
  printf '0\t1\tcut-%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$pattern" "${failed:--1}" "$wrote" "$back_at" \
    "${took:--1}" "${bytes:--1}" $((away << 20)) >> "$results"
  echo "  link cut, $pattern writes: far disk failed ${failed:-?} s after the cut, writes done at $wrote s," \
    "healthy ${took:-never (3 min)} s after the link came back; resynced ${bytes:-?} bytes of $((away << 20)) written"
  cp "$dir/serve.log" "$dir/serve-cut-$pattern.log"
  stop_server
}
# exec: the job's pid is the writer's.
away_sequential() { exec qemu-io -f raw -c "write -P 7 0 ${away}M" "$vol_uri" >/dev/null; }
away_random() {
  exec fio --name=away --ioengine=nbd "--uri=$vol_uri" --size="${vol_mib}M" --io_size="${away}M" \
    --rw=randwrite --bs=4k --iodepth=32 --randrepeat=0 >"$dir/away.out"
}
cut_case sequential away_sequential
cut_case random away_random
stop_far

echo
python3 - "$results" "$away" "$vol_mib" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = defaultdict(dict)
cuts = []
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    if f[2].startswith("cut-"):
        cuts.append((f[2][4:], *map(float, f[3:])))
        continue
    delay, run, target, job, iops, p50 = f
    rows[(int(delay), target, job)][run] = (float(iops), float(p50))
med = lambda xs: statistics.median(xs) if xs else float("nan")
fig = lambda d, t, j, k: med([v[k] for v in rows[(d, t, j)].values()])
targets = ["local", "remote", "mirror", "mirror-wb"]
for d in sorted({k[0] for k in rows}):
    n = len(rows[(d, "local", "fresh")])
    print(f"Delay {d} ms on every far read and write (veth, nbdkit's delay filter); medians of {n} runs:")
    print()
    print("| target | fresh randwrite QD32 IOPS | warm randwrite QD32 IOPS | randwrite QD1 p50 µs |")
    print("|---|---:|---:|---:|")
    for t in targets:
        if rows[(d, t, "fresh")]:
            print(f"| {t} | {fig(d,t,'fresh',0):.0f} | {fig(d,t,'warm',0):.0f} | {fig(d,t,'qd1',1):.0f} |")
    if rows[(d, "both-local", "fresh")]:
        print(f"| both at once: local / remote | {fig(d,'both-local','fresh',0):.0f} / {fig(d,'both-remote','fresh',0):.0f}"
              f" | {fig(d,'both-local','warm',0):.0f} / {fig(d,'both-remote','warm',0):.0f} | |")
    print()
    def ratio(f):
        r = []
        for run in rows[(d, "local", "fresh")]:
            try:
                x = f(lambda t, j, k: rows[(d, t, j)][run][k])
            except (KeyError, ZeroDivisionError):
                continue
            r.append(x)
        return med(r), min(r, default=float("nan")), max(r, default=float("nan"))
    lines = [
        ("mirror QD1 p50 / max(local, remote) QD1 p50",
         lambda g: g("mirror", "qd1", 1) / max(g("local", "qd1", 1), g("remote", "qd1", 1)), "<=", 1.1),
        ("mirror-wb QD1 p50 / max(local, remote) QD1 p50",
         lambda g: g("mirror-wb", "qd1", 1) / max(g("local", "qd1", 1), g("remote", "qd1", 1)), None, None),
        ("mirror-wb fresh QD32 IOPS / local", lambda g: g("mirror-wb", "fresh", 0) / g("local", "fresh", 0), ">=", 0.9),
        ("mirror-wb warm QD32 IOPS / local", lambda g: g("mirror-wb", "warm", 0) / g("local", "warm", 0), ">=", 0.9),
        ("mirror-wb fresh QD32 IOPS / both at once (lower)",
         lambda g: g("mirror-wb", "fresh", 0) / min(g("both-local", "fresh", 0), g("both-remote", "fresh", 0)), None, None),
        ("mirror-wb warm QD32 IOPS / both at once (lower)",
         lambda g: g("mirror-wb", "warm", 0) / min(g("both-local", "warm", 0), g("both-remote", "warm", 0)), None, None),
        ("both at once, lower / local alone (warm)",
         lambda g: min(g("both-local", "warm", 0), g("both-remote", "warm", 0)) / g("local", "warm", 0), None, None),
        ("mirror fresh QD32 IOPS / local", lambda g: g("mirror", "fresh", 0) / g("local", "fresh", 0), None, None),
        ("mirror warm QD32 IOPS / local", lambda g: g("mirror", "warm", 0) / g("local", "warm", 0), None, None),
    ]
    print("Ratios (median of per-run ratios, min-max):")
    for what, f, op, goal in lines:
        r, lo, hi = ratio(f)
        verdict = ""
        if op:
            ok = r <= goal if op == "<=" else r >= goal
            verdict = f"  target {op} {goal}: {'met' if ok else 'MISSED'}"
        print(f"  {what:52} {r:5.2f}x  ({lo:.2f}-{hi:.2f}){verdict}")
    print()
if cuts:
    print(f"Link cut for 10 s (delay 0) while {sys.argv[2]} MiB are written through serve, on a new {sys.argv[3]} MiB volume:")
    print()
    print("| writes | far disk seen failed (s) | writes done after (s) | link back after (s) | healthy after link back (s) | bytes written | bytes resynced | resynced/written |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for pattern, failed, wrote, back, took, rbytes, wbytes in cuts:
        s = lambda x, fmt: "never" if x < 0 else format(x, fmt)
        print(f"| {pattern} | {s(failed, '.1f')} | {wrote:.1f} | {back:.1f} | {s(took, '.1f')} | "
              f"{wbytes:.0f} | {s(rbytes, '.0f')} | {s(rbytes / wbytes if rbytes >= 0 else -1, '.2f')} |")
EOF
