//! What the write-intent bitmap costs and what it saves (issue 5, item 7).
//! Not a test: it prints tables of medians and ratios.
//!
//!   cargo bench --bench bitmap -- [--seconds S] [--runs N] [--dir DIR] [--dirty PCT] [--part a|b]
//!
//! (a) Random 4 KiB writes at QD 32 (32 threads, one request each) through
//!     the engine on two 1 GiB files opened O_DIRECT, without a bitmap and
//!     with one: "cold" starts every run from a clear bitmap (the first write
//!     to each 64 KiB region sets and flushes its bit), "warm" starts with
//!     every bit set (the steady state of a workload that writes each region
//!     at least once per clearing period).
//! (b) Recovery after an unclean stop against a full resync: a child process
//!     writes to PCT % of the regions of a 1 GiB mirror (default 1) and is
//!     killed with SIGKILL, so its bits stay set; the parent times the next
//!     assembly that opens the group for writing (which copies the dirty
//!     regions), then a full copy of the same volume onto a new plex
//!     (remove-mirror + add-mirror), and the same assembly with nothing
//!     dirty (the fixed cost).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use mirrorvol::disk::{Disk, FileDisk, OpenOptions as DiskOpen};
use mirrorvol::format::{Layout, Style};
use mirrorvol::group::live::LiveGroup;
use mirrorvol::group::ops::{self, InitOptions};
use mirrorvol::group::{DiskSet, Group, Lookup, NoProgress};
use mirrorvol::volume::bitmap::{BitmapSet, DiskBitmap};
use mirrorvol::volume::engine::{
    EngineOptions, EnginePlex, FailureSink, MirrorVolume, Mode, NoSink, WriteIntent,
};
use mirrorvol::volume::queue::{DEFAULT_IO_TIMEOUT, DiskQueue};
use uuid::Uuid;

mod common;
use common::{FILE_SIZE, drive, median, prepare};

const MIB: u64 = 1 << 20;
const QD: usize = 32;
const BS: usize = 4096;
/// The region size the README's figures were measured with (the default
/// was 64 KiB until 2026-12-05).
const REGION: u64 = 64 * 1024;

struct Args {
    seconds: f64,
    runs: usize,
    dir: PathBuf,
    dirty_pct: f64,
    /// "a", "b" or both (None).
    part: Option<String>,
    child: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 3.0,
        runs: 5,
        dir: std::env::temp_dir(),
        dirty_pct: 1.0,
        part: None,
        child: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).unwrap_or(3.0),
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(5),
            "--dir" => a.dir = it.next().map(PathBuf::from).unwrap_or(a.dir),
            "--dirty" => a.dirty_pct = it.next().and_then(|v| v.parse().ok()).unwrap_or(1.0),
            "--part" => a.part = it.next(),
            "--child-dirty" => a.child = it.next(),
            _ => {}
        }
    }
    a
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// (a): random 4 KiB writes at QD 32, without and with the bitmap.
fn write_cost(a: &Args) {
    let paths = [
        a.dir.join("mirrorvol-bench-a.img"),
        a.dir.join("mirrorvol-bench-b.img"),
    ];
    let layout = Layout::for_member(0, FILE_SIZE).expect("1 GiB holds a member");
    let vol_size = layout.data_size / MIB * MIB;
    let disks: Vec<Arc<dyn Disk>> = paths
        .iter()
        .map(|p| {
            prepare(p);
            let opts = DiskOpen {
                direct: true,
                ..DiskOpen::default()
            };
            Arc::new(FileDisk::open(p, opts).unwrap()) as Arc<dyn Disk>
        })
        .collect();
    let sink: Arc<dyn FailureSink> = Arc::new(NoSink);
    let eopts = EngineOptions::default();
    let uuids = [Uuid::new_v4(), Uuid::new_v4()];
    let queues: Vec<Arc<DiskQueue>> = disks
        .iter()
        .zip(["a", "b"])
        .map(|(d, n)| DiskQueue::start(n, d.clone(), QD, DEFAULT_IO_TIMEOUT))
        .collect();
    let volume = |intent: Option<Arc<dyn WriteIntent>>| {
        let plexes = queues
            .iter()
            .zip(uuids)
            .map(|(q, u)| EnginePlex::new(u, q.clone(), layout.data_offset(), Mode::InSync))
            .collect();
        let v = MirrorVolume::new(
            "bench",
            vol_size,
            plexes,
            Arc::downgrade(&sink) as Weak<dyn FailureSink>,
            eopts.clone(),
        );
        if let Some(i) = intent {
            v.set_intent(i);
        }
        v
    };
    // A clear bitmap: the area zeroed, then loaded fresh.
    let fresh = || -> Arc<BitmapSet> {
        let set = BitmapSet::default();
        let zero = vec![0u8; 5 * MIB as usize];
        let zero = mirrorvol::disk::AlignedBuf::from_slice(&zero);
        for (d, u) in disks.iter().zip(uuids) {
            d.write_at(&zero, layout.bitmap_offset()).unwrap();
            d.flush().unwrap();
            let (b, _) = DiskBitmap::load(d.clone(), &layout, REGION, 0).unwrap();
            set.insert(u, Arc::new(b));
        }
        Arc::new(set)
    };
    let run = |v: &Arc<MirrorVolume>| {
        let blocks = vol_size / BS as u64;
        drive(QD, a.seconds, |_, _, rng| {
            let off = (xorshift(rng) % blocks) * BS as u64;
            let buf = vec![0x5au8; BS];
            v.write(off, &buf).unwrap();
        })
    };
    let (mut none, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    let mut cold_bit_writes = Vec::new();
    for _ in 0..a.runs {
        none.push(run(&volume(None)));
        let set = fresh();
        cold.push(run(&volume(Some(set.clone()))));
        cold_bit_writes.push(
            set.all()
                .iter()
                .map(|(_, b)| b.writes.load(Ordering::Relaxed))
                .sum::<u64>() as f64,
        );
        // Every bit set beforehand: writes find their region's bit set, as
        // in steady state under `serve`, where a region written at least
        // once per 5 s clearing period keeps its bit.
        for (_, b) in set.all() {
            let regions = b.mark(0, layout.data_size).unwrap();
            b.done(regions);
        }
        warm.push(run(&volume(Some(set))));
    }
    let (n, c, w) = (median(none), median(cold), median(warm));
    println!(
        "\n(a) random 4 KiB writes, QD {QD}, engine in process, O_DIRECT on two 1 GiB files in {}, {} runs of {} s, medians",
        a.dir.display(),
        a.runs,
        a.seconds
    );
    println!(
        "{:<34} {:>10} {:>8}  target",
        "configuration", "IOPS", "ratio"
    );
    println!("{:<34} {:>10.0} {:>8.2}", "no bitmap", n, 1.0);
    println!(
        "{:<34} {:>10.0} {:>8.2}  >= 0.90 ({:.0} bitmap block writes per run)",
        "bitmap, cold (clear at start)",
        c,
        c / n,
        median(cold_bit_writes)
    );
    println!(
        "{:<34} {:>10.0} {:>8.2}  >= 0.90",
        "bitmap, warm (bits already set)",
        w,
        w / n
    );
    for q in &queues {
        q.stop();
    }
}

fn disk_set(paths: &[PathBuf]) -> DiskSet {
    DiskSet {
        explicit: paths.to_vec(),
        open: mirrorvol::group::DiskOpen {
            direct: true,
            ..Default::default()
        },
        ..DiskSet::default()
    }
}

/// The child of (b): writes 4 KiB into `pct` % of the regions of the
/// volume, then kills itself with SIGKILL: no clean stop clears the bits.
fn child_dirty(paths: &[PathBuf], pct: f64) -> ! {
    let mut g = Group::assemble(&disk_set(paths), Lookup::Required)
        .unwrap()
        .unwrap();
    g.start_bitmaps().unwrap();
    let live = LiveGroup::start(g, Default::default());
    let engine = live.volume("v").unwrap();
    let size = engine.size();
    let region = 64 * 1024;
    let regions = size / region;
    let want = ((regions as f64) * pct / 100.0).round() as u64;
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < want {
        picked.insert(xorshift(&mut rng) % regions);
    }
    let buf = vec![0xc3u8; BS];
    for r in picked {
        engine.write(r * region, &buf).unwrap();
    }
    // SAFETY: kill takes integers; the pid is this process's own.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL")
}

/// The bytes a group's warnings say were copied after an unclean stop (the
/// dirty regions are compared, and copied where the plexes differ).
fn recovered_bytes(g: &Group) -> u64 {
    g.warnings
        .iter()
        .filter_map(|w| w.split(": ").nth(1))
        .filter_map(|w| w.strip_suffix(" bytes differed between the plexes and were copied"))
        .filter_map(|w| w.parse::<u64>().ok())
        .sum()
}

/// (b): recovery after an unclean stop against a full resync.
fn resync_cost(a: &Args) {
    let dir = a.dir.join("mirrorvol-bench-resync");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let paths: Vec<PathBuf> = ["a.img", "b.img"].iter().map(|n| dir.join(n)).collect();
    for p in &paths {
        let f = std::fs::File::create(p).unwrap();
        f.set_len(FILE_SIZE + 64 * MIB).unwrap();
    }
    let opts = InitOptions {
        style: Style::Raw,
        controller: None,
        group: Some("bench".into()),
        force: false,
        region_size: REGION,
        spare: false,
    };
    let mut g = ops::init(None, &paths, &opts).unwrap();
    g.create("v", FILE_SIZE, 2, &paths).unwrap();
    drop(g);
    // Fill the volume so that a full copy moves real data.
    {
        let mut g = Group::assemble(&disk_set(&paths), Lookup::Required)
            .unwrap()
            .unwrap();
        g.start_bitmaps().unwrap();
        let live = LiveGroup::start(g, Default::default());
        let chunk: Vec<u8> = (0..(8 << 20)).map(|i| (i * 13 + 1) as u8).collect();
        let mut off = 0;
        while off < FILE_SIZE {
            live.write("v", off, &chunk).unwrap();
            off += chunk.len() as u64;
        }
        live.volume("v").unwrap().flush().unwrap();
    }
    let exe = std::env::current_exe().unwrap();
    let (mut recover, mut clean, mut full) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    for _ in 0..a.runs {
        let st = std::process::Command::new(&exe)
            .arg("--child-dirty")
            .arg(dir.display().to_string())
            .arg("--dirty")
            .arg(a.dirty_pct.to_string())
            .status()
            .unwrap();
        assert!(!st.success(), "the child should die of SIGKILL");
        let t = Instant::now();
        let mut g = Group::assemble(&disk_set(&paths), Lookup::Required)
            .unwrap()
            .unwrap();
        g.start_bitmaps().unwrap();
        recover.push(t.elapsed().as_secs_f64());
        bytes = recovered_bytes(&g);
        drop(g);
        // The same with nothing dirty: what any start costs.
        let t = Instant::now();
        let mut g = Group::assemble(&disk_set(&paths), Lookup::Required)
            .unwrap()
            .unwrap();
        g.start_bitmaps().unwrap();
        clean.push(t.elapsed().as_secs_f64());
        // A full resync of the same volume: its plex on b.img is removed
        // and added again, copied whole (through the group's controller,
        // as `add-mirror` runs it).
        let live = LiveGroup::start(g, Default::default());
        live.remove_mirror("v", &paths[1]).unwrap();
        let t = Instant::now();
        live.add_mirror("v", Some(&paths[1])).unwrap();
        live.resync_in_foreground(&NoProgress, None).unwrap();
        full.push(t.elapsed().as_secs_f64());
    }
    let (r, c, f) = (median(recover), median(clean), median(full));
    println!(
        "\n(b) recovery after SIGKILL with {} % of the 64 KiB regions of a 1 GiB mirror dirty, O_DIRECT, {} runs, medians",
        a.dirty_pct, a.runs
    );
    println!("{:<44} {:>10} {:>14}", "", "seconds", "bytes copied");
    println!(
        "{:<44} {:>10.3} {:>14}",
        "recovery (assembly + dirty-region resync)", r, bytes
    );
    println!(
        "{:<44} {:>10.3} {:>14}",
        "the same assembly, nothing dirty", c, 0
    );
    println!(
        "{:<44} {:>10.3} {:>14}",
        "full resync of the volume (add-mirror)", f, FILE_SIZE
    );
    println!(
        "recovery / full resync: {:.3} (time), {:.3} (bytes); resync part alone: {:.3}",
        r / f,
        bytes as f64 / FILE_SIZE as f64,
        (r - c).max(0.0) / f
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let a = args();
    if let Some(dir) = &a.child {
        let dir = Path::new(dir);
        child_dirty(&[dir.join("a.img"), dir.join("b.img")], a.dirty_pct);
    }
    if a.part.as_deref() != Some("b") {
        write_cost(&a);
    }
    if a.part.as_deref() != Some("a") {
        resync_cost(&a);
    }
}
