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

# Cold caches before a timed copy. all: every cache dropped (the binaries
# too: mirrorvol's 11 MiB is read in again, dd's and libc's are not, as
# `date` runs between); data: only the disks' pages are evicted (files and
# loop devices alike, by posix_fadvise DONTNEED), what a user meets who
# ran any mirrorvol command before.
cold() {
    sync
    if [ "$1" = all ]; then
        echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    else
        local f
        for f in "${@:2}"; do
            dd if="$f" iflag=nocache count=0 status=none
        done
    fi
}

# The disk over image file $1: the file, or (--loop) a loop device over it.
disk_of() {
    if [ "$loop" = 1 ]; then
        losetup --find --show "$work/$1"
    else
        echo "$work/$1"
    fi
}

# One run: a new group, a volume holding $1, add-mirror timed with caches
# $2 cold (all or data); prints seconds.
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
    cold "$2" "$a" "$b" "$work/a.img" "$work/b.img"
    local t0 t1
    t0=$(now)
    "$mv_bin" add-mirror v --disk "$b" >/dev/null 2>&1
    t1=$(now)
    detach_all
    echo "$t1 - $t0" | bc -l
}

# dd of the written bytes from a.img's data area to a new c.img, with
# caches $1 cold, made durable as a rebuild is (conv=fsync: O_DIRECT alone
# leaves a sparse file's new extents, and a loop device's whole write, in
# the page cache); prints seconds.
ddcopy() {
    local a c t0 t1
    a=$(disk_of a.img)
    c=$(disk_of c.img)
    cold "$1" "$a" "$c" "$work/a.img" "$work/c.img"
    t0=$(now)
    dd if="$a" of="$c" bs=4M count=$((written / 4)) skip=2 seek=2 \
        iflag=direct oflag=direct conv=notrunc,fsync status=none
    t1=$(now)
    detach_all
    echo "$t1 - $t0" | bc -l
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

declare -a sparse full dds ratio_full ratio_dd wsparse wdds ratio_wdd
for i in $(seq 1 "$runs"); do
    s=$(rebuild part.bin all)
    f=$(rebuild full.bin all)
    ws=$(rebuild part.bin data)
    truncate -s "${disk_mib}M" c.img
    d=$(ddcopy all)
    detach_all
    rm -f c.img
    truncate -s "${disk_mib}M" c.img
    wd=$(ddcopy data)
    detach_all
    rm -f c.img
    sparse+=("$s") full+=("$f") dds+=("$d") wsparse+=("$ws") wdds+=("$wd")
    ratio_full+=("$(echo "$s / $f" | bc -l)")
    ratio_dd+=("$(echo "$d / $s" | bc -l)")
    ratio_wdd+=("$(echo "$wd / $ws" | bc -l)")
    printf 'run %d: holding %d MiB %.3f s, full %.3f s, dd of %d MiB %.3f s; disks cold only: holding %.3f s, dd %.3f s\n' \
        "$i" "$written" "$s" "$f" "$written" "$d" "$ws" "$wd"
done
med() { printf '%s\n' "$@" | median; }
what="sparse image files"
[ "$loop" = 1 ] && what="loop devices over sparse files"
printf 'on %s, add-mirror of a %d GiB volume, medians of %d runs:\n' "$what" "$gib" "$runs"
printf '  every cache dropped: holding %d MiB %.3f s, full %.3f s, dd of the %d MiB %.3f s\n' \
    "$written" "$(med "${sparse[@]}")" "$(med "${full[@]}")" "$written" "$(med "${dds[@]}")"
printf '  the disks cold only: holding %d MiB %.3f s, dd of the %d MiB %.3f s\n' \
    "$written" "$(med "${wsparse[@]}")" "$written" "$(med "${wdds[@]}")"
printf 'holding/full %.3fx (target <= 0.05x); dd/holding %.2fx every cache dropped, %.2fx the disks cold only (target >= 0.8x); medians of the per-run ratios\n' \
    "$(med "${ratio_full[@]}")" "$(med "${ratio_dd[@]}")" "$(med "${ratio_wdd[@]}")"
