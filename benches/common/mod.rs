//! What the in-process benchmarks share: a data file to run on, the driver
//! that keeps QD threads busy for a while, and medians.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The size of every benchmark file.
pub const FILE_SIZE: u64 = 1 << 30;

/// Creates a file of [`FILE_SIZE`] filled with data, so reads and writes
/// land on allocated blocks; an existing file of that size is reused.
pub fn prepare(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == FILE_SIZE) {
        return;
    }
    let f = File::create(path).unwrap();
    let chunk: Vec<u8> = (0..(8 << 20)).map(|i| (i * 7 + 3) as u8).collect();
    let mut off = 0;
    while off < FILE_SIZE {
        f.write_all_at(&chunk, off).unwrap();
        off += chunk.len() as u64;
    }
    f.sync_all().unwrap();
}

/// Runs `qd` threads calling `op(worker, n, rng)` for `secs` (n counts the
/// worker's calls; rng is a per-worker xorshift state); returns calls per
/// second over all workers.
pub fn drive<F>(qd: usize, secs: f64, op: F) -> f64
where
    F: Fn(usize, u64, &mut u64) + Sync,
{
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for w in 0..qd {
            let (stop, done, op) = (&stop, &done, &op);
            s.spawn(move || {
                let mut rng = 0x2545_f491_4f6c_dd1d ^ ((w as u64 + 1) * 0x9e37_79b9);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    op(w, n, &mut rng);
                    n += 1;
                }
                done.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
