//! Engine bugs found by the fault-injection suite, each pinned by a small
//! test that failed before its fix.

use std::sync::Arc;
use std::time::Duration;

use mirrorvol::disk::{AlignedBuf, Disk, MemDisk};
use mirrorvol::volume::engine::{
    EngineOptions, EnginePlex, FailureSink, MirrorVolume, Mode, NoSink, Run,
};
use mirrorvol::volume::queue::DiskQueue;
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;

fn opts() -> EngineOptions {
    EngineOptions {
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
            let q = DiskQueue::start(&format!("d{i}"), d.clone(), 4, Duration::from_secs(30));
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
    use mirrorvol::volume::queue::Op;

    let disk = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(MIB))));
    let q = DiskQueue::start("hung", disk.clone(), 1, Duration::from_millis(50));
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

/// Holds writes until opened: orders a write against a read repair.
#[derive(Debug)]
struct Gate {
    inner: Arc<dyn Disk>,
    open: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Gate {
    fn new(inner: Arc<dyn Disk>) -> Gate {
        Gate {
            inner,
            open: std::sync::Mutex::new(true),
            changed: std::sync::Condvar::new(),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.changed.notify_all();
    }
}

impl Disk for Gate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
        drop(open);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

/// A read that failed on plex A was served by plex B, and the repair of A
/// waited for the range lock behind a write W. W failed on B (B was failed)
/// and was acknowledged from A. The repair then copied the range from B, no
/// longer in sync and without W, onto A, the only in-sync plex: the
/// acknowledged write W was lost. The repair must copy only from a plex that
/// is still in sync once it holds the range.
#[test]
fn a_read_repair_never_copies_from_a_plex_failed_while_it_waited() {
    use mirrorvol::disk::FaultyDisk;
    use std::sync::atomic::Ordering;

    let a_mem = Arc::new(MemDisk::new(MIB));
    let b_mem = Arc::new(MemDisk::new(MIB));
    let a = Arc::new(FaultyDisk::new(a_mem.clone()));
    let b_faulty = Arc::new(FaultyDisk::new(b_mem.clone()));
    let b = Arc::new(Gate::new(b_faulty.clone()));
    let (v, _sink) = volume(&[a.clone(), b.clone()], MIB);
    let old = vec![0x0du8; 4096];
    let new = vec![0x1du8; 4096];
    v.write(0, &old).unwrap();

    // W: held up on B, where it will fail; A takes it.
    b.set(false);
    b_faulty.fail_writes(0..4096);
    a.fail_reads(0..4096);
    let (tx, rx) = std::sync::mpsc::channel();
    let writes_on_a = a.writes();
    v.submit_write(
        0,
        Arc::new(AlignedBuf::from_slice(&new)),
        false,
        Run::Queued,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    while b.waiting.load(Ordering::SeqCst) == 0 || a.writes() == writes_on_a {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The read fails on A, is served by B (W is in flight: the old data is
    // a fine answer), and queues A's repair behind W.
    let mut buf = vec![0u8; 4096];
    v.read(0, &mut buf).unwrap();
    assert!(buf == old);
    assert_eq!(a.errors(), 1, "the read went to A first");
    a.clear();
    b.set(true);
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("W is acknowledged: A took it");
    while v.ranges_busy() > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    v.read(0, &mut buf).unwrap();
    assert!(buf == new, "the acknowledged write was lost");
    assert!(a_mem.snapshot()[..4096] == new[..]);
}
