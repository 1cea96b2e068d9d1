//! Fault injection: a [`FaultyDisk`] wraps another disk and fails on cue.
//!
//! Faults come in two scopes:
//!
//! - a [`Controller`] is the I/O path several disks share; failing it fails
//!   every I/O of every disk attached to it, until it is restored;
//! - rules on one disk: byte ranges that fail to read or write, a countdown
//!   after which every operation fails, one torn write, and a hang that
//!   blocks every I/O until released.
//!
//! Rules are set at run time through `&self`, so a test can hand the disk to
//! a volume and still break it mid-scenario. Injected failures are `EIO`, as
//! a dying disk reports them.
//!
//! What counts as an operation: `read_at` is a read; `write_at`,
//! `write_zeroes` and `discard` are writes. `flush` is neither, but fails
//! while the controller is failed or once a write countdown has tripped.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{Disk, DiskIdentity};

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// The I/O path shared by the disks behind one adapter: they fail together.
pub struct Controller {
    name: String,
    failed: AtomicBool,
}

impl Controller {
    pub fn new(name: &str) -> Arc<Controller> {
        Arc::new(Controller {
            name: name.to_string(),
            failed: AtomicBool::new(false),
        })
    }

    /// Every I/O of every disk on this controller fails from now on.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// The disks on this controller work again.
    pub fn restore(&self) {
        self.failed.store(false, Ordering::SeqCst);
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.name)
            .field("failed", &self.is_failed())
            .finish()
    }
}

/// Which operations a [`FaultyDisk::fail_after`] countdown counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Any,
}

impl Op {
    fn matches(self, op: Op) -> bool {
        self == Op::Any || self == op
    }
}

#[derive(Debug)]
struct Countdown {
    op: Op,
    /// Matching operations still allowed to succeed.
    left: u64,
    /// Set once a matching operation has failed because of it.
    tripped: bool,
}

#[derive(Debug, Default)]
struct Rules {
    read_ranges: Vec<Range<u64>>,
    /// Unreadable until rewritten, like a disk's pending sectors.
    bad_sectors: Vec<Range<u64>>,
    write_ranges: Vec<Range<u64>>,
    countdown: Option<Countdown>,
    /// `write_at` calls still to pass before the torn one.
    torn_after: Option<u64>,
    hung: bool,
}

/// What one operation does, decided under the rules' lock.
enum Verdict {
    Pass,
    Fail,
    /// Write this many bytes of the buffer, then fail.
    Tear(usize),
}

/// A disk that fails on cue; see the module docs.
#[derive(Debug)]
pub struct FaultyDisk {
    inner: Arc<dyn Disk>,
    controller: Option<Arc<Controller>>,
    rules: Mutex<Rules>,
    /// Signalled when a hang is released.
    unhung: Condvar,
    reads: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
}

impl FaultyDisk {
    pub fn new(inner: Arc<dyn Disk>) -> FaultyDisk {
        FaultyDisk {
            inner,
            controller: None,
            rules: Mutex::new(Rules::default()),
            unhung: Condvar::new(),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// Puts the disk behind `controller`: it fails when the controller does,
    /// and reports the controller's name as its identity's controller.
    pub fn on_controller(mut self, controller: Arc<Controller>) -> FaultyDisk {
        self.controller = Some(controller);
        self
    }

    /// Reads overlapping `range` (bytes) fail.
    pub fn fail_reads(&self, range: Range<u64>) {
        self.rules().read_ranges.push(range);
    }

    /// Reads overlapping `range` fail until a write covers it: a bad sector
    /// that the disk remaps when it is rewritten.
    pub fn bad_sectors(&self, range: Range<u64>) {
        self.rules().bad_sectors.push(range);
    }

    /// Writes (and write-zeroes, discards) overlapping `range` (bytes) fail.
    pub fn fail_writes(&self, range: Range<u64>) {
        self.rules().write_ranges.push(range);
    }

    /// The next `n_ops` operations matching `op` are let through (other rules
    /// permitting); every matching operation after them fails. Replaces an
    /// earlier countdown.
    pub fn fail_after(&self, n_ops: u64, op: Op) {
        self.rules().countdown = Some(Countdown {
            op,
            left: n_ops,
            tripped: false,
        });
    }

    /// After `n_ops` more `write_at` calls, the next one writes only the first
    /// half of its buffer (rounded down to a multiple of 512 bytes) and fails.
    /// Writes after it behave normally.
    pub fn torn_write_after(&self, n_ops: u64) {
        self.rules().torn_after = Some(n_ops);
    }

    /// Every I/O blocks until [`FaultyDisk::release`] (or [`FaultyDisk::clear`]).
    pub fn hang(&self) {
        self.rules().hung = true;
    }

    /// Lets blocked and later I/O proceed.
    pub fn release(&self) {
        self.rules().hung = false;
        self.unhung.notify_all();
    }

    /// Removes every rule of this disk (the controller is left as it is) and
    /// releases a hang. The counters keep counting.
    pub fn clear(&self) {
        *self.rules() = Rules::default();
        self.unhung.notify_all();
    }

    /// Reads issued so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Writes (including write-zeroes and discards) issued so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Operations, flushes included, that returned an error, injected or not.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::SeqCst)
    }

    fn rules(&self) -> MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits out a hang, then returns the rules' lock.
    fn rules_when_running(&self) -> MutexGuard<'_, Rules> {
        let mut rules = self.rules();
        while rules.hung {
            rules = self.unhung.wait(rules).unwrap_or_else(|e| e.into_inner());
        }
        rules
    }

    fn controller_failed(&self) -> bool {
        self.controller.as_ref().is_some_and(|c| c.is_failed())
    }

    /// Decides the fate of one read or write of `len` bytes at `offset`.
    /// Countdowns advance for every operation issued, whatever else fails it.
    fn judge(&self, op: Op, offset: u64, len: u64, tearable: bool) -> Verdict {
        let mut rules = self.rules_when_running();
        let mut verdict = Verdict::Pass;

        if let Some(c) = rules.countdown.as_mut()
            && c.op.matches(op)
        {
            if c.left == 0 {
                c.tripped = true;
                verdict = Verdict::Fail;
            } else {
                c.left -= 1;
            }
        }
        if tearable && let Some(left) = rules.torn_after {
            if left == 0 {
                rules.torn_after = None;
                if matches!(verdict, Verdict::Pass) {
                    verdict = Verdict::Tear((len / 2 / 512 * 512) as usize);
                }
            } else {
                rules.torn_after = Some(left - 1);
            }
        }

        let end = offset.saturating_add(len);
        let hits = |ranges: &[Range<u64>]| ranges.iter().any(|r| r.start < end && offset < r.end);
        let hit = if op == Op::Read {
            hits(&rules.read_ranges) || hits(&rules.bad_sectors)
        } else {
            hits(&rules.write_ranges)
        };
        if hit || self.controller_failed() {
            verdict = Verdict::Fail;
        }
        if op != Op::Read && matches!(verdict, Verdict::Pass) {
            // A write that lands remaps the bad sectors it covers.
            rules
                .bad_sectors
                .retain(|r| !(offset <= r.start && r.end <= end));
        }
        verdict
    }

    /// Runs `io` unless the rules fail it, and counts the outcome.
    fn run(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        io: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let counter = if op == Op::Read {
            &self.reads
        } else {
            &self.writes
        };
        counter.fetch_add(1, Ordering::SeqCst);
        let result = match self.judge(op, offset, len, false) {
            Verdict::Pass => io(),
            Verdict::Fail | Verdict::Tear(_) => Err(eio()),
        };
        self.count_error(result)
    }

    fn count_error<T>(&self, result: io::Result<T>) -> io::Result<T> {
        if result.is_err() {
            self.errors.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

impl Disk for FaultyDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.run(Op::Read, offset, len, || self.inner.read_at(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let result = match self.judge(Op::Write, offset, buf.len() as u64, true) {
            Verdict::Pass => self.inner.write_at(buf, offset),
            Verdict::Fail => Err(eio()),
            Verdict::Tear(prefix) => {
                if prefix > 0 {
                    // The prefix lands; the caller is told the write failed.
                    let _ = self.inner.write_at(&buf[..prefix], offset);
                }
                Err(eio())
            }
        };
        self.count_error(result)
    }

    fn flush(&self) -> io::Result<()> {
        let failed = {
            let rules = self.rules_when_running();
            let tripped = rules
                .countdown
                .as_ref()
                .is_some_and(|c| c.tripped && c.op.matches(Op::Write));
            tripped || self.controller_failed()
        };
        let result = if failed {
            Err(eio())
        } else {
            self.inner.flush()
        };
        self.count_error(result)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(Op::Write, offset, len, || {
            self.inner.write_zeroes(offset, len)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(Op::Write, offset, len, || self.inner.discard(offset, len))
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(Op::Write, offset, len, || {
            self.inner.zero_range(offset, len)
        })
    }

    fn zeroes_cheaply(&self, keep: bool) -> bool {
        self.inner.zeroes_cheaply(keep)
    }

    fn extent_at(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.inner.extent_at(offset, len)
    }

    fn identity(&self) -> DiskIdentity {
        let mut identity = self.inner.identity();
        if let Some(c) = &self.controller {
            identity.controller = Some(c.name().to_string());
        }
        identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    fn is_eio(r: io::Result<()>) -> bool {
        matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
    }

    fn faulty(size: u64) -> (Arc<MemDisk>, FaultyDisk) {
        let mem = Arc::new(MemDisk::new(size));
        let disk = FaultyDisk::new(mem.clone());
        (mem, disk)
    }

    #[test]
    fn without_rules_io_passes_through() {
        let (mem, disk) = faulty(4096);
        disk.write_at(&[7; 512], 512).unwrap();
        let mut buf = [0; 512];
        disk.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [7; 512]);
        assert_eq!(mem.snapshot()[512..1024], [7; 512]);
        disk.write_zeroes(512, 512).unwrap();
        disk.flush().unwrap();
        assert!(mem.snapshot().iter().all(|&b| b == 0));
        assert_eq!(disk.size(), 4096);
        assert_eq!((disk.reads(), disk.writes(), disk.errors()), (1, 2, 0));
    }

    #[test]
    fn failed_read_range_fails_only_overlapping_reads() {
        let (_, disk) = faulty(8192);
        disk.fail_reads(1024..1536);
        let mut buf = [0; 512];
        assert!(is_eio(disk.read_at(&mut buf, 1024)));
        assert!(is_eio(disk.read_at(&mut buf, 1535 - 511)));
        let mut big = [0; 4096];
        assert!(is_eio(disk.read_at(&mut big, 0)));
        disk.read_at(&mut buf, 512).unwrap();
        disk.read_at(&mut buf, 1536).unwrap();
        // Writes to the range still work.
        disk.write_at(&buf, 1024).unwrap();
        assert_eq!(disk.errors(), 3);
    }

    #[test]
    fn failed_write_range_fails_writes_zeroes_and_discards() {
        let (mem, disk) = faulty(8192);
        disk.fail_writes(4096..8192);
        assert!(is_eio(disk.write_at(&[1; 512], 4096)));
        assert!(is_eio(disk.write_zeroes(3584, 1024)));
        assert!(is_eio(disk.discard(8000, 192)));
        disk.write_at(&[1; 512], 3584).unwrap();
        let mut buf = [0; 512];
        disk.read_at(&mut buf, 4096).unwrap();
        assert!(
            mem.snapshot()[4096..].iter().all(|&b| b == 0),
            "failed write left no trace"
        );
        assert_eq!(disk.errors(), 3);
    }

    #[test]
    fn fail_after_lets_n_writes_through_then_fails_every_write() {
        let (_, disk) = faulty(8192);
        disk.fail_after(2, Op::Write);
        disk.write_at(&[1; 512], 0).unwrap();
        let mut buf = [0; 512];
        disk.read_at(&mut buf, 0).unwrap(); // reads are not counted
        disk.write_at(&[1; 512], 512).unwrap();
        disk.flush().unwrap(); // not tripped yet
        assert!(is_eio(disk.write_at(&[1; 512], 1024)));
        assert!(is_eio(disk.write_zeroes(0, 512)));
        assert!(is_eio(disk.flush()));
        disk.read_at(&mut buf, 0).unwrap();
        disk.clear();
        disk.write_at(&[1; 512], 1024).unwrap();
        disk.flush().unwrap();
    }

    #[test]
    fn fail_after_reads_leaves_writes_and_flush_alone() {
        let (_, disk) = faulty(8192);
        disk.fail_after(1, Op::Read);
        let mut buf = [0; 512];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(is_eio(disk.read_at(&mut buf, 0)));
        disk.write_at(&buf, 0).unwrap();
        disk.flush().unwrap();
    }

    #[test]
    fn fail_after_any_counts_reads_and_writes() {
        let (_, disk) = faulty(8192);
        disk.fail_after(2, Op::Any);
        let mut buf = [0; 512];
        disk.read_at(&mut buf, 0).unwrap();
        disk.write_at(&buf, 0).unwrap();
        assert!(is_eio(disk.read_at(&mut buf, 0)));
        assert!(is_eio(disk.write_at(&buf, 0)));
        assert!(is_eio(disk.flush()));
        assert_eq!(disk.errors(), 3);
    }

    #[test]
    fn fail_after_zero_fails_the_first_operation() {
        let (_, disk) = faulty(8192);
        disk.fail_after(0, Op::Write);
        assert!(is_eio(disk.write_at(&[1; 512], 0)));
    }

    #[test]
    fn torn_write_lands_half_and_reports_failure() {
        let (mem, disk) = faulty(8192);
        disk.torn_write_after(1);
        disk.write_at(&[1; 1024], 0).unwrap();
        // 3 sectors: half is 768, rounded down to 512.
        assert!(is_eio(disk.write_at(&[2; 1536], 2048)));
        let snap = mem.snapshot();
        assert_eq!(snap[..1024], [1; 1024]);
        assert_eq!(snap[2048..2560], [2; 512]);
        assert!(snap[2560..3584].iter().all(|&b| b == 0));
        // The next write is whole again.
        disk.write_at(&[3; 1536], 2048).unwrap();
        assert_eq!(mem.snapshot()[2048..3584], [3; 1536]);
        assert_eq!(disk.errors(), 1);
    }

    #[test]
    fn torn_single_sector_write_writes_nothing() {
        let (mem, disk) = faulty(4096);
        disk.torn_write_after(0);
        assert!(is_eio(disk.write_at(&[9; 512], 0)));
        assert!(mem.snapshot().iter().all(|&b| b == 0));
    }

    #[test]
    fn disks_on_one_controller_fail_and_recover_together() {
        let controller = Controller::new("pci-0000:00:1f.2-ata1");
        let a = FaultyDisk::new(Arc::new(MemDisk::new(4096))).on_controller(controller.clone());
        let b = FaultyDisk::new(Arc::new(MemDisk::new(4096))).on_controller(controller.clone());
        let c = FaultyDisk::new(Arc::new(MemDisk::new(4096)));
        assert_eq!(
            a.identity().controller.as_deref(),
            Some("pci-0000:00:1f.2-ata1")
        );
        assert_eq!(controller.name(), "pci-0000:00:1f.2-ata1");

        controller.fail();
        assert!(controller.is_failed());
        let mut buf = [0; 512];
        for disk in [&a, &b] {
            assert!(is_eio(disk.read_at(&mut buf, 0)));
            assert!(is_eio(disk.write_at(&buf, 0)));
            assert!(is_eio(disk.write_zeroes(0, 512)));
            assert!(is_eio(disk.flush()));
        }
        c.write_at(&buf, 0).unwrap();

        controller.restore();
        for disk in [&a, &b] {
            disk.write_at(&[5; 512], 0).unwrap();
            disk.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, [5; 512]);
            disk.flush().unwrap();
        }
    }

    #[test]
    fn hung_disk_blocks_io_until_released() {
        let (_, disk) = faulty(4096);
        let disk = Arc::new(disk);
        disk.hang();
        let (done_tx, done_rx) = mpsc::channel();
        let worker = {
            let disk = disk.clone();
            thread::spawn(move || {
                let mut buf = [0; 512];
                let r = disk.read_at(&mut buf, 0);
                done_tx.send(r.is_ok()).unwrap();
            })
        };
        assert!(
            done_rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "read finished while hung"
        );
        disk.release();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        worker.join().unwrap();
    }

    #[test]
    fn clear_releases_a_hang_and_drops_rules() {
        let (_, disk) = faulty(4096);
        let disk = Arc::new(disk);
        disk.fail_reads(0..4096);
        disk.hang();
        let worker = {
            let disk = disk.clone();
            thread::spawn(move || disk.flush())
        };
        thread::sleep(Duration::from_millis(50));
        disk.clear();
        worker.join().unwrap().unwrap();
        let mut buf = [0; 512];
        disk.read_at(&mut buf, 0).unwrap();
    }
}
