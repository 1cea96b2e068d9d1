#!/usr/bin/env bash
# Rebuild cost against what a volume holds: `add-mirror` of a 4 GiB volume on
# a sparse image file holding 64 MiB, against the same volume full, and
# against dd copying the 64 MiB (issue 13's rebuild targets: <= 0.05x the
# full one, >= 0.8x dd). The resync skips chunks that no in-sync plex's
# written map records as written, or where every in-sync plex has a hole
# (SEEK_DATA on files, block status on NBD exports). With --loop the disks
# are loop devices over the files (block devices: no holes to see, the
# written map alone tells; needs root).
#   bash bench/rebuild.sh [--runs N] [--dir DIR] [--gib N] [--written-mib N] [--loop]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
dir=/var/tmp
gib=4
written=64
loop=0
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) runs=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --gib) gib=$2; shift 2 ;;
    --written-mib) written=$2; shift 2 ;;
    --loop) loop=1; shift ;;
    *) echo "usage: $0 [--runs N] [--dir DIR] [--gib N] [--written-mib N] [--loop]" >&2; exit 2 ;;
    esac
done
cargo build --release --quiet
mv_bin=$PWD/target/release/mirrorvol
work=$(mktemp -d "$dir/mv-rebuild.XXXXXX")
# Loop devices this run attached are found by their backing files (this
# run's own) and detached before those files go, and at the end.
detach_all() {
    [ "$loop" = 1 ] || return 0
    local f
    for f in a.img b.img c.img; do
        losetup -j "$work/$f" 2>/dev/null | cut -d: -f1 | xargs -r -n1 losetup -d 2>/dev/null || true
    done
}
cleanup() {
    detach_all
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
export MIRRORVOL_RUN_DIR=$work/run MIRRORVOL_HOST_ID_FILE=$work/host-id
# Room for the metadata (8 MiB), the checksum area and the tail.
disk_mib=$((gib * 1024 + gib * 2 + 16))
{ yes mirrorvol-rebuild || true; } | head -c $((gib << 30)) >full.bin
head -c $((written << 20)) full.bin >part.bin

now() { date +%s.%N; }

# The disk over image file $1: the file, or (--loop) a loop device over it.
disk_of() {
    if [ "$loop" = 1 ]; then
        losetup --find --show "$work/$1"
    else
        echo "$work/$1"
    fi
}

# One run: a new group, a volume holding $1, add-mirror timed; prints seconds.
rebuild() {
    detach_all
    rm -f a.img b.img
    truncate -s "${disk_mib}M" a.img b.img
    local a b
    a=$(disk_of a.img)
    b=$(disk_of b.img)
    export MIRRORVOL_DISKS=$a,$b
    "$mv_bin" init "$a" "$b" --style raw >/dev/null
    "$mv_bin" create v --size "${gib}G" --disk "$a" >/dev/null
    "$mv_bin" copy "$1" vol:v >/dev/null 2>&1
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    local t0 t1
    t0=$(now)
    "$mv_bin" add-mirror v --disk "$b" >/dev/null 2>&1
    t1=$(now)
    detach_all
    echo "$t1 - $t0" | bc -l
}

ddcopy() {
    local a c t0 t1
    a=$(disk_of a.img)
    c=$(disk_of c.img)
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    t0=$(now)
    dd if="$a" of="$c" bs=4M count=$((written / 4)) skip=2 seek=2 \
        iflag=direct oflag=direct conv=notrunc status=none
    t1=$(now)
    detach_all
    echo "$t1 - $t0" | bc -l
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

declare -a sparse full dds ratio_full ratio_dd
for i in $(seq 1 "$runs"); do
    s=$(rebuild part.bin)
    f=$(rebuild full.bin)
    truncate -s "${disk_mib}M" c.img
    d=$(ddcopy)
    detach_all
    rm -f c.img
    sparse+=("$s") full+=("$f") dds+=("$d")
    ratio_full+=("$(echo "$s / $f" | bc -l)")
    ratio_dd+=("$(echo "$d / $s" | bc -l)")
    printf 'run %d: holding %d MiB %.3f s, full %.3f s, dd of %d MiB %.3f s\n' \
        "$i" "$written" "$s" "$f" "$written" "$d"
done
ms=$(printf '%s\n' "${sparse[@]}" | median)
mf=$(printf '%s\n' "${full[@]}" | median)
md=$(printf '%s\n' "${dds[@]}" | median)
rf=$(printf '%s\n' "${ratio_full[@]}" | median)
rd=$(printf '%s\n' "${ratio_dd[@]}" | median)
what="sparse image files"
[ "$loop" = 1 ] && what="loop devices over sparse files"
printf 'on %s: ' "$what"
printf 'add-mirror of a %d GiB volume: holding %d MiB %.3f s, full %.3f s, dd of the %d MiB %.3f s (medians of %d runs)\n' \
    "$gib" "$written" "$ms" "$mf" "$written" "$md" "$runs"
printf 'holding/full %.3fx (target <= 0.05x); dd/holding %.2fx (target >= 0.8x), medians of the per-run ratios\n' \
    "$rf" "$rd"
