//! The write-intent bitmap (issue 5): crash consistency under a seeded
//! workload cut at every disk write and flush, a `serve` killed with SIGKILL
//! during fio writes, and `reactivate` copying only what was written while a
//! disk was away.

mod common;

use std::fs;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::crash::{Cut, wrap_group};
use common::serve;
use common::*;
use mirrorvol::format::Style;
use mirrorvol::group::live::LiveGroup;
use mirrorvol::group::ops::{self, InitOptions};
use mirrorvol::group::{DiskSet, Group, Lookup};

const DISK_MIB: u64 = 16;
const VOL: u64 = 2 * MIB;

fn assemble(paths: &[PathBuf]) -> Group {
    let set = DiskSet {
        explicit: paths.to_vec(),
        ..DiskSet::default()
    };
    Group::assemble(&set, Lookup::Required).unwrap().unwrap()
}

/// Two raw disks with a 2 MiB mirror `m`, 4 KiB regions (so that a small
/// volume has many), and the pristine image bytes.
fn crash_group(dir: &std::path::Path) -> (Vec<PathBuf>, Vec<Vec<u8>>) {
    let paths: Vec<PathBuf> = ["a.img", "b.img"].iter().map(|n| dir.join(n)).collect();
    for p in &paths {
        fs::File::create(p)
            .unwrap()
            .set_len(DISK_MIB * MIB)
            .unwrap();
    }
    let opts = InitOptions {
        style: Style::Raw,
        controller: None,
        group: Some("g".into()),
        force: false,
        region_size: 4096,
        spare: false,
    };
    let mut g = ops::init(None, &paths, &opts).unwrap();
    g.create("m", VOL, 2, &[]).unwrap();
    drop(g);
    let images = paths.iter().map(|p| fs::read(p).unwrap()).collect();
    (paths, images)
}

/// A seeded workload: (offset, len, fill byte) writes, a flush every few.
fn workload(seed: u64) -> Vec<Option<(u64, usize, u8)>> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..24)
        .map(|i| {
            if i % 4 == 3 {
                None
            } else {
                let sectors = next() % 24 + 1;
                let off = next() % (VOL / 512 - sectors) * 512;
                Some((off, sectors as usize * 512, (next() % 250 + 1) as u8))
            }
        })
        .collect()
}

/// Crash images, the volume as of the last completed flush, the ranges
/// written since, and whether the workload ran to its end.
type AfterCut = (Vec<Vec<u8>>, Vec<u8>, Vec<(u64, usize)>, bool);

/// Runs the workload on a group whose disks lose power after `cut_at`
/// operations; returns the crash images, the volume as of the last
/// completed flush, and the ranges written after it (acknowledged or not).
fn run_until_cut(paths: &[PathBuf], images: &[Vec<u8>], cut_at: u64, seed: u64) -> AfterCut {
    run_until_cut_tearing(paths, images, cut_at, seed, false)
}

/// [`run_until_cut`], unflushed writes torn at sectors with `tear`.
fn run_until_cut_tearing(
    paths: &[PathBuf],
    images: &[Vec<u8>],
    cut_at: u64,
    seed: u64,
    tear: bool,
) -> AfterCut {
    for (p, img) in paths.iter().zip(images) {
        fs::write(p, img).unwrap();
    }
    let cut = Arc::new(Cut {
        ops: AtomicU64::new(0),
        at: cut_at,
        off: AtomicBool::new(false),
        tear,
    });
    let mut g = assemble(paths);
    let crash = wrap_group(&mut g, &cut);
    let mut flushed = vec![0u8; VOL as usize];
    let mut model = flushed.clone();
    let mut later: Vec<(u64, usize)> = Vec::new();
    let mut completed = true;
    let live = if g.start_bitmaps().is_ok() {
        // Through the group's controller, as a command or `serve` writes: a
        // plex that fails is recorded in the config before the write
        // returns.
        let live = LiveGroup::start(g, Default::default());
        let engine = live.volume("m").unwrap();
        for step in workload(seed) {
            match step {
                Some((off, len, fill)) => {
                    later.push((off, len));
                    if engine.write(off, &vec![fill; len]).is_err() {
                        completed = false;
                        break;
                    }
                    model[off as usize..off as usize + len].fill(fill);
                }
                None => {
                    if engine.flush().is_err() {
                        completed = false;
                        break;
                    }
                    flushed.copy_from_slice(&model);
                    later.clear();
                }
            }
        }
        Some(live)
    } else {
        completed = false;
        drop(g);
        None
    };
    // A crash: no clean shutdown, whatever the cut left undone (the power
    // is off before the group lets go of its disks).
    cut.off.store(true, Ordering::SeqCst);
    drop(live);
    let mut coin = seed ^ cut_at;
    let out = crash.iter().map(|c| c.after_crash(&mut coin)).collect();
    (out, flushed, later, completed)
}

/// Where each plex of volume m lies: its disk's path, the plex's absolute
/// offset on it, and the disk's layout.
fn plex_places(g: &Group) -> (Vec<PathBuf>, Vec<u64>, Vec<mirrorvol::format::Layout>) {
    let plexes = &g.volume("m").unwrap().plexes;
    let member = |p: &mirrorvol::format::PlexEntry| &g.members[&p.disk];
    (
        plexes.iter().map(|p| member(p).path.clone()).collect(),
        plexes
            .iter()
            .map(|p| member(p).label.layout.data_offset() + p.offset)
            .collect(),
        plexes.iter().map(|p| member(p).label.layout).collect(),
    )
}

/// The first block of a plex (disk at `order[i]`, plex at absolute
/// `offsets[i]`) that holds anything but zeroes and is not in its disk's
/// written map: a written bit is durable before the first write to its
/// region reaches the disk, and a copy marks what it copies.
fn uncovered(
    order: &[PathBuf],
    offsets: &[u64],
    layouts: &[mirrorvol::format::Layout],
) -> Option<String> {
    for (i, path) in order.iter().enumerate() {
        let disk: Arc<dyn mirrorvol::disk::Disk> =
            Arc::new(mirrorvol::disk::FileDisk::open(path, Default::default()).unwrap());
        let layout = &layouts[i];
        let (map, _) = mirrorvol::volume::bitmap::DiskBitmap::load(disk, layout, 4096, 0).unwrap();
        assert!(map.has_written_map());
        let base = offsets[i] - layout.data_offset();
        let data = read_range(path, offsets[i], VOL as usize);
        for (k, block) in data.chunks(4096).enumerate() {
            let at = base + k as u64 * 4096;
            if !(block.iter().all(|&x| x == 0) || map.any_written(at, at + 4096)) {
                return Some(format!(
                    "block {k} of plex {i} holds data its written map lacks"
                ));
            }
        }
    }
    None
}

/// The blocks of each plex whose checksum its disk knows (trusted: not
/// in a region dirty on the disk), counted; an error names the first whose
/// data does not match it.
fn sums_hold(
    order: &[PathBuf],
    offsets: &[u64],
    layouts: &[mirrorvol::format::Layout],
) -> Result<usize, String> {
    let mut known = 0;
    for (i, path) in order.iter().enumerate() {
        let disk: Arc<dyn mirrorvol::disk::Disk> =
            Arc::new(mirrorvol::disk::FileDisk::open(path, Default::default()).unwrap());
        let layout = &layouts[i];
        let (map, _) = mirrorvol::volume::bitmap::DiskBitmap::load(disk, layout, 4096, 0).unwrap();
        let base = offsets[i] - layout.data_offset();
        let data = read_range(path, offsets[i], VOL as usize);
        let sums = map.sums_of(base, VOL / 4096);
        for (k, (block, e)) in data.chunks(4096).zip(sums).enumerate() {
            if e == 0 {
                continue;
            }
            known += 1;
            if crc32c::crc32c(block) != e {
                return Err(format!(
                    "block {k} of plex {i} does not match its checksum: a good block reported bad"
                ));
            }
        }
    }
    Ok(known)
}

#[test]
fn a_crash_at_every_write_and_flush_leaves_equal_plexes_with_every_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, images) = crash_group(dir.path());
    let (order, offsets, layouts) = plex_places(&assemble(&paths));
    let written_covers = |seed: u64, cut_at: u64| {
        if let Some(e) = uncovered(&order, &offsets, &layouts) {
            panic!("seed {seed}, cut at op {cut_at}: {e}");
        }
    };
    // Known checksums match their blocks, before and after the recovery
    // (which rehashes what was dirty): no good block is reported bad.
    let sums_match = |seed: u64, cut_at: u64| match sums_hold(&order, &offsets, &layouts) {
        Ok(known) => known,
        Err(e) => panic!("seed {seed}, cut at op {cut_at}: {e}"),
    };
    let mut cuts = 0;
    let mut known_at_end = 0;
    // Seed 2 tears unflushed writes at 512-byte sectors (the checksum
    // blocks' too).
    for seed in [1u64, 2] {
        let mut cut_at = 0;
        loop {
            let (crashed, flushed, later, completed) =
                run_until_cut_tearing(&paths, &images, cut_at, seed, seed == 2);
            for (p, img) in paths.iter().zip(&crashed) {
                fs::write(p, img).unwrap();
            }
            written_covers(seed, cut_at);
            sums_match(seed, cut_at);
            let mut g = assemble(&paths);
            g.start_bitmaps().unwrap();
            drop(g);
            written_covers(seed, cut_at);
            let known = sums_match(seed, cut_at);
            if completed {
                known_at_end = known_at_end.max(known);
            }
            let plex = |i: usize| read_range(&order[i], offsets[i], VOL as usize);
            let (a, b) = (plex(0), plex(1));
            assert!(a == b, "seed {seed}, cut at op {cut_at}: plexes differ");
            for (i, (got, want)) in a.iter().zip(&flushed).enumerate() {
                let i = i as u64;
                let overwritten = later.iter().any(|(o, l)| *o <= i && i < *o + *l as u64);
                assert!(
                    overwritten || got == want,
                    "seed {seed}, cut at op {cut_at}: byte {i} lost a flushed write"
                );
            }
            cuts += 1;
            if completed {
                break;
            }
            cut_at += 1;
        }
    }
    eprintln!("{cuts} cut points tried");
    assert!(cuts > 100, "only {cuts} cut points were tried");
    // The check above is not empty: whole blocks written get checksums.
    assert!(
        known_at_end > 8,
        "{known_at_end} blocks with a known checksum"
    );
}

/// The exact byte count of `resynced 8 MiB (8388608 bytes) ...` lines
/// (`resynced 512 bytes ...` below a KiB), summed; 0 without any.
fn resynced_bytes(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split("resynced ").nth(1))
        .filter_map(|rest| {
            let mut words = rest.split(' ');
            let (n, unit) = (words.next()?, words.next()?);
            if unit == "bytes" {
                return n.parse::<u64>().ok();
            }
            // "8 MiB (8388608 bytes)": the exact count in parentheses.
            let (_, exact) = rest.split_once(" (")?;
            exact.split(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}

#[test]
fn reactivate_copies_only_what_was_written_while_the_disk_was_away() {
    let sb = Sandbox::new();
    sb.image("a.img", 80);
    sb.image("b.img", 80);
    sb.mv(&[
        "init",
        &sb.p("disks/a.img"),
        &sb.p("disks/b.img"),
        "--style",
        "raw",
    ])
    .ok();
    sb.mv(&["create", "m", "--size", "64M", "--mirror"]).ok();
    let (before, _) = sb.data_file("before.bin", 4 << 20, 1);
    sb.mv(&["copy", &before, "vol:m"]).ok();
    // b goes away; 1 MiB is written meanwhile.
    fs::create_dir_all(sb.path("away")).unwrap();
    fs::rename(sb.path("disks/b.img"), sb.path("away/b.img")).unwrap();
    let (while_away, data) = sb.data_file("away.bin", 1 << 20, 2);
    // One disk of two is no majority: b may be in use elsewhere, so the
    // group is claimed only when the admin says b is gone.
    sb.mv(&["copy", &while_away, "vol:m"])
        .refused("--force-claim");
    sb.mv(&["--force-claim", "copy", &while_away, "vol:m"]).ok();
    fs::rename(sb.path("away/b.img"), sb.path("disks/b.img")).unwrap();
    let r = sb.mv(&["reactivate", &sb.p("disks/b.img")]).ok();
    let copied = resynced_bytes(&r.stdout);
    assert!(
        (1 << 20..=(1 << 20) + (128 << 10)).contains(&copied),
        "copied {copied} bytes for 1 MiB written while away:\n{}",
        r.stdout
    );
    assert!(r.stdout.contains("dirty region"), "{}", r.stdout);
    // b alone holds the volume: the 1 MiB and what was there before.
    sb.mv(&["fail", &sb.p("disks/a.img")]).ok();
    let got = sb.read_volume("m");
    assert_eq!(&got[..1 << 20], &data[..]);
    assert_eq!(
        &got[1 << 20..4 << 20],
        &pattern(4 << 20, 1)[1 << 20..],
        "what b held before it left"
    );
}

#[test]
fn a_plex_failed_by_io_errors_gets_a_full_resync_and_status_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = crash_group(dir.path());
    let mut g = assemble(&paths);
    let b = g.volume("m").unwrap().plexes[1].disk;
    g.mark_disk_failed(b, Some("it failed an I/O, so its data cannot be trusted"));
    g.commit().unwrap();
    let s = serde_json::to_value(g.status()).unwrap();
    assert_eq!(
        s["volumes"][0]["plexes"][1]["resync_reason"],
        "it failed an I/O, so its data cannot be trusted"
    );
    drop(g);
    let mut g = assemble(&paths);
    g.start_bitmaps().unwrap();
    let path = g.members[&b].path.clone();
    let live = LiveGroup::start(g, Default::default());
    live.reactivate_by_path(&path).unwrap();
    let done = live
        .resync_in_foreground(&mirrorvol::group::NoProgress, None)
        .unwrap();
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(
        done[0].line.contains("full resync: it failed an I/O"),
        "{done:?}"
    );
}

#[test]
fn a_serve_killed_during_fio_writes_resyncs_about_the_dirty_regions_only() {
    if !serve::tools(&["fio"]) {
        return skip_or_fail("fio is not installed");
    }
    let sb = Sandbox::new();
    serve::mirror_group(&sb, 300, 256);
    let s = serve::Served::start(&sb, &[], &[]);
    // 8 MiB of random 4 KiB writes, from 64 MiB on, running when killed.
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=dirty",
            "--ioengine=nbd",
            &format!("--uri={}", s.uri("data")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--offset=64M",
            "--size=8M",
            "--time_based",
            "--runtime=30",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    s.signal(libc::SIGKILL);
    let _ = fio.kill();
    let _ = fio.wait();
    drop(s);
    // The next command that opens the group for writing resyncs: it
    // compares the dirty regions (a warning says so when they differed,
    // with the bytes compared) and copies what differs.
    let r = sb.mv(&["extend", "nothing", "--size", "1M"]);
    let resynced = resynced_bytes(&r.stderr);
    eprintln!("resynced {resynced} bytes after the kill");
    assert!(
        resynced <= 3 * (8 << 20),
        "resynced {resynced} bytes after 8 MiB of writes to a 256 MiB volume:\n{}",
        r.stderr
    );
    assert!(
        resynced == 0 || r.stderr.contains("after an unclean stop"),
        "{}",
        r.stderr
    );
    let (at, len) = (64 << 20, 8 << 20);
    assert!(
        plex_read(&sb, "a.img", "data", at, len) == plex_read(&sb, "b.img", "data", at, len),
        "the plexes differ where fio wrote after the resync"
    );
    // Nothing is left dirty: the next start resyncs nothing.
    let r = sb.mv(&["extend", "nothing", "--size", "1M"]);
    assert_eq!(resynced_bytes(&r.stderr), 0, "{}", r.stderr);
    // No good block is reported bad: the copies agree with each other and
    // with every checksum known (scrub names a damaged entry too).
    let r = sb.mv(&["scrub", "data", "--json"]).ok();
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["mismatches"], 0, "{j:#}");
}

#[test]
fn a_refused_command_on_a_degraded_mirror_writes_nothing_to_any_disk() {
    let sb = Sandbox::new();
    for d in ["a.img", "b.img", "c.img"] {
        sb.image(d, 40);
    }
    let disks = ["a.img", "b.img", "c.img"].map(|d| sb.p(&format!("disks/{d}")));
    sb.mv(&["init", &disks[0], &disks[1], &disks[2], "--style", "raw"])
        .ok();
    sb.mv(&["create", "m", "--size", "16M", "--mirror", "--copies", "3"])
        .ok();
    // c goes away while 1 MiB is written: its plex is stale, and the bits
    // of that MiB stay set on a and b after the clean stop of `copy`.
    fs::create_dir_all(sb.path("away")).unwrap();
    fs::rename(sb.path("disks/c.img"), sb.path("away/c.img")).unwrap();
    let (data, _) = sb.data_file("data.bin", 1 << 20, 3);
    sb.mv(&["copy", &data, "vol:m"]).ok();
    fs::rename(sb.path("away/c.img"), sb.path("disks/c.img")).unwrap();
    let s = sb.status();
    assert_ne!(volume(&s, "m")["plexes"][2]["state"], "in-sync", "{s:#}");

    // The next command finds those bits, compares the regions on a and b
    // (equal after a clean stop) and is refused: no disk is written.
    let mtimes = || {
        disks
            .iter()
            .map(|d| fs::metadata(d).unwrap().modified().unwrap())
            .collect::<Vec<_>>()
    };
    let before = mtimes();
    refused_unchanged(&sb, &["extend", "nothing", "--size", "32M"], "nothing");
    assert_eq!(mtimes(), before, "a refused command wrote to a disk");
}

/// The `written` of volume `data` in a status report, in bytes.
#[track_caller]
fn written_of(s: &serde_json::Value) -> u64 {
    volume(s, "data")["written"]
        .as_u64()
        .unwrap_or_else(|| panic!("no written in {s:#}"))
}

/// A TRIM, or zeroes a client lets become holes, return the regions they
/// cover whole to unwritten; zeroes the client wants kept allocated
/// (NO_HOLE) leave them written. The written map says so at once under
/// `serve`, on the disks after a clean stop, and a rebuild copies only
/// what is left written.
#[test]
fn trimmed_regions_become_unwritten_and_stay_so() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    // 64 KiB regions, so that the slivers below hold whole ones.
    serve::mirror_group_64k(&sb, 64, 32);
    let s = serve::Served::start(&sb, &[], &[]);
    let uri = s.uri("data");
    serve::qemu_io(&uri, &["write -P 0x5a 0 8M"]);
    assert_eq!(written_of(&serve::status(&sb)), 8 * MIB);
    // Whole regions (64 KiB) only: 2 MiB and the 64 KiB inside a sliver.
    serve::qemu_io(&uri, &["discard 0 2M", "discard 6143k 66k"]);
    assert_eq!(written_of(&serve::status(&sb)), 6 * MIB - 64 * 1024);
    serve::qemu_io(&uri, &["write -z 2M 1M"]);
    assert_eq!(written_of(&serve::status(&sb)), 6 * MIB - 64 * 1024);
    serve::qemu_io(&uri, &["write -z -u 3M 1M"]);
    assert_eq!(written_of(&serve::status(&sb)), 5 * MIB - 64 * 1024);
    serve::qemu_io(
        &uri,
        &[
            "read -P 0 0 4M",
            "read -P 0x5a 4M 2047k",
            "read -P 0 6143k 66k",
            "read -P 0x5a 6209k 1983k",
        ],
    );
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
    assert_eq!(written_of(&serve::status(&sb)), 5 * MIB - 64 * 1024);
    // A rebuild copies what is left written, and zeroes the rest.
    sb.mv(&["fail", &sb.p("disks/a.img")]).ok();
    sb.image("c.img", 64);
    sb.mv(&["init", &sb.p("disks/c.img")]).ok();
    let out = sb.mv(&["repair", "data"]).ok().stdout;
    assert!(out.contains("c.img"), "{out}");
    sb.mv(&["fail", &sb.p("disks/b.img")]).ok();
    let got = sb.read_volume("data");
    let mut want = vec![0u8; 32 << 20];
    want[4 << 20..8 << 20].fill(0x5a);
    want[(6 << 20) - 1024..(6 << 20) + 65 * 1024].fill(0);
    assert!(got == want, "the volume from the rebuilt copy alone");
}

/// The crash test with the second plex write-behind (its bits are not
/// waited for): after a crash at every disk write and flush and the
/// recovery's copy of the dirty regions, every block of each plex that
/// holds anything but zeroes is in its disk's written map (the copy onto
/// the far plex marks what it copies first).
#[test]
fn a_crash_with_a_write_behind_plex_leaves_every_block_in_its_written_map() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = crash_group(dir.path());
    let mut g = assemble(&paths);
    let far = g.volume("m").unwrap().plexes[1].disk;
    let d = g.config.disk_mut(far).unwrap();
    d.write_mostly = true;
    d.write_behind = 8;
    g.commit().unwrap();
    let (order, offsets, layouts) = plex_places(&g);
    drop(g);
    let names: Vec<&std::ffi::OsStr> = order.iter().map(|p| p.file_name().unwrap()).collect();
    let images: Vec<Vec<u8>> = paths.iter().map(|p| fs::read(p).unwrap()).collect();
    let mut cuts = 0;
    for seed in [1u64, 2] {
        let mut cut_at = 0;
        loop {
            // New files for every cut: a group dropped with writes behind
            // may still hold its disks' locks for a moment.
            let run = dir.path().join(format!("run-{seed}-{cut_at}"));
            let rec = dir.path().join(format!("rec-{seed}-{cut_at}"));
            fs::create_dir_all(&run).unwrap();
            fs::create_dir_all(&rec).unwrap();
            let in_dir = |d: &std::path::Path| -> Vec<PathBuf> {
                paths
                    .iter()
                    .map(|p| d.join(p.file_name().unwrap()))
                    .collect()
            };
            let (crashed, _, _, completed) = run_until_cut(&in_dir(&run), &images, cut_at, seed);
            for (p, img) in in_dir(&rec).iter().zip(&crashed) {
                fs::write(p, img).unwrap();
            }
            let order: Vec<PathBuf> = names.iter().map(|n| rec.join(n)).collect();
            let check = |when: &str| {
                if let Some(e) = uncovered(&order, &offsets, &layouts) {
                    panic!("seed {seed}, cut at op {cut_at}, {when}: {e}");
                }
            };
            check("as the crash left it");
            let mut g = assemble(&in_dir(&rec));
            g.start_bitmaps().unwrap();
            drop(g);
            check("after recovery");
            let _ = fs::remove_dir_all(&run);
            let _ = fs::remove_dir_all(&rec);
            cuts += 1;
            if completed {
                break;
            }
            cut_at += 1;
        }
    }
    assert!(cuts > 100, "only {cuts} cut points were tried");
}
