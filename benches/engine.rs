//! In-process benchmark of the mirror engine against plain pread/pwrite on
//! the same two files at the same concurrency (issue 3). Not a test: it
//! prints a table of medians and ratios.
//!
//!   cargo bench --bench engine -- [--direct] [--seconds S] [--runs N] [--dir DIR]
//!
//! Workloads: 4 KiB random writes and reads, 1 MiB sequential writes, at
//! queue depth 1 and 32 (QD threads each with one request in flight).
//! Baselines:
//! - writes: the same data written to both files by hand: QD threads, each
//!   writing its block to file A and then to file B (what a mirror with one
//!   submitter per request does without hand-offs); one op = the block on
//!   both files.
//! - reads: QD threads pread on one file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use mirrorvol::disk::buf::IO_ALIGN;
use mirrorvol::disk::{AlignedBuf, Disk, FileDisk, OpenOptions as DiskOpen};
use mirrorvol::volume::engine::{
    EngineOptions, EnginePlex, FailureSink, MirrorVolume, Mode, NoSink,
};
use mirrorvol::volume::queue::{DEFAULT_IO_TIMEOUT, DiskQueue};
use uuid::Uuid;

mod common;
use common::{FILE_SIZE, drive, median, prepare};

struct Args {
    direct: bool,
    seconds: f64,
    runs: usize,
    dir: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        direct: false,
        seconds: 2.0,
        runs: 3,
        dir: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--direct" => a.direct = true,
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).unwrap_or(2.0),
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            "--dir" => a.dir = it.next().map(PathBuf::from).unwrap_or(a.dir),
            "--bench" => {}
            _ => {}
        }
    }
    a
}

fn open(path: &Path, direct: bool) -> File {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).unwrap()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    RandWrite,
    RandRead,
    SeqWrite,
}

struct Workload {
    name: &'static str,
    kind: Kind,
    bs: usize,
    qd: usize,
}

/// Offset of the n-th request of worker w.
fn offset(kind: Kind, bs: usize, w: usize, qd: usize, n: u64, rng: &mut u64) -> u64 {
    let blocks = FILE_SIZE / bs as u64;
    match kind {
        Kind::SeqWrite => {
            // Each worker streams through its own slice of the file.
            let per = blocks / qd as u64;
            (w as u64 * per + n % per) * bs as u64
        }
        _ => {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % blocks) * bs as u64
        }
    }
}

fn baseline(w: &Workload, a: &File, b: &File, secs: f64) -> f64 {
    match w.kind {
        Kind::RandRead => drive(w.qd, secs, |wk, n, rng| {
            let mut buf = AlignedBuf::new(w.bs, IO_ALIGN);
            let off = offset(w.kind, w.bs, wk, w.qd, n, rng);
            a.read_exact_at(&mut buf, off).unwrap();
        }),
        _ => {
            // What a mirror does by hand with one submitter per op: QD
            // writers, each writing the block to one file, then the other.
            drive(w.qd, secs, |wk, n, rng| {
                let buf = AlignedBuf::from_slice(&vec![0x5a; w.bs]);
                let off = offset(w.kind, w.bs, wk, w.qd, n, rng);
                a.write_all_at(&buf, off).unwrap();
                b.write_all_at(&buf, off).unwrap();
            })
        }
    }
}

fn mirror(w: &Workload, vol: &Arc<MirrorVolume>, secs: f64) -> f64 {
    drive(w.qd, secs, |wk, n, rng| {
        let off = offset(w.kind, w.bs, wk, w.qd, n, rng);
        match w.kind {
            Kind::RandRead => {
                let mut buf = vec![0u8; w.bs];
                vol.read(off, &mut buf).unwrap();
            }
            _ => {
                let buf = vec![0x5au8; w.bs];
                vol.write(off, &buf).unwrap();
            }
        }
    })
}

fn main() {
    let a = args();
    let pa = a.dir.join("mirrorvol-bench-a.img");
    let pb = a.dir.join("mirrorvol-bench-b.img");
    prepare(&pa);
    prepare(&pb);
    let fa = open(&pa, a.direct);
    let fb = open(&pb, a.direct);
    let opts = DiskOpen {
        direct: a.direct,
        ..DiskOpen::default()
    };
    let da: Arc<dyn Disk> = Arc::new(FileDisk::open(&pa, opts).unwrap());
    let db: Arc<dyn Disk> = Arc::new(FileDisk::open(&pb, opts).unwrap());
    let sink: Arc<dyn FailureSink> = Arc::new(NoSink);
    let workloads = [
        Workload {
            name: "randwrite 4k qd1",
            kind: Kind::RandWrite,
            bs: 4096,
            qd: 1,
        },
        Workload {
            name: "randwrite 4k qd32",
            kind: Kind::RandWrite,
            bs: 4096,
            qd: 32,
        },
        Workload {
            name: "randread 4k qd1",
            kind: Kind::RandRead,
            bs: 4096,
            qd: 1,
        },
        Workload {
            name: "randread 4k qd32",
            kind: Kind::RandRead,
            bs: 4096,
            qd: 32,
        },
        Workload {
            name: "seqwrite 1M qd1",
            kind: Kind::SeqWrite,
            bs: 1 << 20,
            qd: 1,
        },
        Workload {
            name: "seqwrite 1M qd32",
            kind: Kind::SeqWrite,
            bs: 1 << 20,
            qd: 32,
        },
    ];
    println!(
        "mirror engine ({} queues) vs pread/pwrite on two {} GiB files in {} ({}), {} runs of {} s, medians",
        mirrorvol::volume::queue::IoEngine::from_env().name(),
        FILE_SIZE >> 30,
        a.dir.display(),
        if a.direct { "O_DIRECT" } else { "page cache" },
        a.runs,
        a.seconds
    );
    println!(
        "{:<20} {:>14} {:>14} {:>8}  target",
        "workload", "baseline op/s", "mirror op/s", "ratio"
    );
    for w in &workloads {
        let eopts = EngineOptions::default();
        let engine = mirrorvol::volume::queue::IoEngine::from_env();
        let qa = DiskQueue::start_on("a", da.clone(), w.qd, DEFAULT_IO_TIMEOUT, engine);
        let qb = DiskQueue::start_on("b", db.clone(), w.qd, DEFAULT_IO_TIMEOUT, engine);
        let vol = MirrorVolume::new(
            "bench",
            FILE_SIZE,
            vec![
                EnginePlex::new(Uuid::new_v4(), qa.clone(), 0, Mode::InSync),
                EnginePlex::new(Uuid::new_v4(), qb.clone(), 0, Mode::InSync),
            ],
            Arc::downgrade(&sink) as Weak<dyn FailureSink>,
            eopts,
        );
        let mut base = Vec::new();
        let mut mine = Vec::new();
        for _ in 0..a.runs {
            base.push(baseline(w, &fa, &fb, a.seconds));
            mine.push(mirror(w, &vol, a.seconds));
        }
        let (b, m) = (median(base), median(mine));
        let target = match w.kind {
            Kind::RandWrite => ">= 0.80",
            Kind::RandRead => ">= 1.00",
            Kind::SeqWrite => "",
        };
        println!(
            "{:<20} {:>14.0} {:>14.0} {:>8.2}  {target}",
            w.name,
            b,
            m,
            m / b
        );
        qa.stop();
        qb.stop();
    }
}
