//! Engine bugs found by the fault-injection suite, each pinned by a small
//! test that failed before its fix.

use std::sync::Arc;
use std::time::Duration;

use mirrorvol::disk::{Disk, MemDisk};
use mirrorvol::volume::engine::{
    EngineOptions, EnginePlex, FailureSink, MirrorVolume, Mode, NoSink,
};
use mirrorvol::volume::queue::DiskQueue;
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;

fn opts() -> EngineOptions {
    EngineOptions {
        threads_per_disk: 4,
        io_timeout: Duration::from_secs(30),
        max_read_errors: 20,
    }
}

/// A volume over `disks`, every plex at offset 0 and in sync, with no sink.
fn volume(disks: &[Arc<dyn Disk>], size: u64) -> (Arc<MirrorVolume>, Arc<dyn FailureSink>) {
    let sink: Arc<dyn FailureSink> = Arc::new(NoSink);
    let plexes = disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let q = DiskQueue::start(&format!("d{i}"), d.clone(), 4);
            EnginePlex::new(Uuid::new_v4(), q, 0, Mode::InSync)
        })
        .collect();
    let v = MirrorVolume::new("v", size, plexes, Arc::downgrade(&sink), opts());
    (v, sink)
}

/// Picking a plex to read from read each queue's pending count twice: once
/// for the minimum and once to find the plexes at the minimum. A count that
/// moved in between left no plex at the minimum, and `turn % 0` panicked
/// the reading thread (a caller, or a disk worker retrying a failed read).
#[test]
fn concurrent_reads_always_find_a_plex_to_read_from() {
    let disks: Vec<Arc<dyn Disk>> = (0..2)
        .map(|_| Arc::new(MemDisk::new(4 * MIB)) as Arc<dyn Disk>)
        .collect();
    let (v, _sink) = volume(&disks, 4 * MIB);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                for i in 0..8_000u64 {
                    let offset = ((t * 7919 + i * 104_729) % 1024) * 4096;
                    v.read(offset, &mut buf).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a reader panicked");
    }
}

/// The watchdog timed out only the requests a worker had started: with every
/// worker of a disk stuck in a hang, the requests queued behind them had no
/// clock and never completed, and the writes waiting on them blocked until
/// the disk came back, although the disk had been failed long before.
#[test]
fn requests_queued_behind_a_hung_disk_time_out_too() {
    use mirrorvol::disk::FaultyDisk;
    use mirrorvol::volume::queue::{Op, Watchdog};

    let disk = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(MIB))));
    let q = DiskQueue::start("hung", disk.clone(), 1);
    let _dog = Watchdog::start(vec![Arc::downgrade(&q)], Duration::from_millis(50));
    disk.hang();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..3u64 {
        let tx = tx.clone();
        q.submit(
            Op::Read {
                offset: i * 4096,
                len: 4096,
            },
            true,
            Box::new(move |o| {
                let _ = tx.send(o);
            }),
        );
    }
    for _ in 0..3 {
        let outcome = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("a request queued behind the hung one never completed");
        assert_eq!(outcome.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }
    disk.release();
}
