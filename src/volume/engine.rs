//! The concurrent mirror engine (DESIGN.md §5).
//!
//! Many callers submit reads, writes and flushes at once; each returns through
//! a callback, or waits with the blocking wrappers.
//!
//! - A write holds its range in the [`RangeLock`] and fans out to every
//!   writable plex through the plexes' disk queues in parallel; it completes
//!   when all have answered. Overlapping writes start in arrival order, one
//!   after the other, so every plex applies them in the same order.
//! - A plex that fails a write is failed (the [`FailureSink`] records it in
//!   the config on the surviving disks) before the write is acknowledged.
//!   The last in-sync plex is never failed: when no in-sync plex took a write,
//!   the error goes back to the caller, and that plex's disk is taken out of
//!   service with the plex's data kept (`reactivate` brings it back).
//! - A read goes to one in-sync plex: the one whose last read ended where this
//!   one starts (a sequential stream stays on its plex), else the one with the
//!   fewest requests pending. On an error it is served from another plex, and
//!   the range is rewritten on the plex that failed, under the range lock, and
//!   read back. Errors are counted; past `max_read_errors` the plex is failed.
//! - Requests to a plex have a deadline while another in-sync plex remains: a
//!   hung disk is failed instead of stalling the volume.
//! - Decisions to fail a plex are taken one at a time, against the plex
//!   states of that moment, so two failures racing on two plexes can never
//!   fail both and lose what each alone had taken.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use uuid::Uuid;

use super::error::IoFailure;
use super::queue::{DiskQueue, Op, Outcome, read_data, wait, wait_here};
use super::range_lock::RangeLock;
use crate::disk::{AlignedBuf, Disk};

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Read errors a plex may show (each repaired) before it is failed
    /// (default 20, md's `max_read_errors`).
    pub max_read_errors: u64,
}

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            max_read_errors: 20,
        }
    }
}

/// Where the engine reports what the config must record.
pub trait FailureSink: Send + Sync {
    /// The plex on `disk` failed and is out of service; returns once the
    /// config on the surviving disks says so, with `false` when no disk took
    /// that config (then no write that plex missed may be acknowledged: after
    /// a restart the config would still call it in sync).
    fn plex_failed(&self, volume: &str, disk: Uuid, error: &io::Error) -> bool;
    /// The last in-sync plex, on `disk`, failed a write: its disk is taken out
    /// of service with the plex's data kept.
    fn last_copy_failed(&self, volume: &str, disk: Uuid, error: &io::Error);
    /// A read error on `disk`; `repaired` when the range was rewritten from a
    /// good copy and read back correctly.
    fn read_error(&self, volume: &str, disk: Uuid, error: &io::Error, repaired: bool);
}

/// The write-intent bitmap as the engine sees it (see [`super::bitmap`]).
pub trait WriteIntent: Send + Sync {
    /// Makes durable, on the disk of each of `plexes`, that volume bytes
    /// `[offset, offset + len)` may be about to differ between plexes; blocks
    /// until it is. Dropping the guard tells the bitmap the write is over.
    fn mark(&self, plexes: &[Arc<EnginePlex>], offset: u64, len: u64) -> io::Result<IntentGuard>;

    /// [`WriteIntent::mark`] in two halves: the bits are set in memory at
    /// once, and when they still have to be written out, the waiting is
    /// handed back ([`Begun::Pending`]) for the caller to do where it may
    /// block.
    fn begin(&self, plexes: &[Arc<EnginePlex>], offset: u64, len: u64) -> io::Result<Begun> {
        self.mark(plexes, offset, len).map(Begun::Ready)
    }

    /// The volume byte ranges within `[offset, offset + len)` whose bits
    /// are set on the disk of any of `plexes`, merged and in order.
    fn dirty(
        &self,
        _plexes: &[Arc<EnginePlex>],
        _offset: u64,
        _len: u64,
    ) -> Vec<std::ops::Range<u64>> {
        Vec::new()
    }

    /// Whether volume bytes `[offset, offset + len)` were never written on
    /// the disk of every one of `plexes` (their written maps: zeroes
    /// there). False wherever a disk cannot tell.
    fn unwritten(&self, _plexes: &[Arc<EnginePlex>], _offset: u64, _len: u64) -> bool {
        false
    }

    /// After zeroes that may leave holes landed on every one of `plexes`
    /// (the write still counted in): the regions they cover whole become
    /// unwritten where no other write to them is marked.
    fn unwrite(&self, _plexes: &[Arc<EnginePlex>], _offset: u64, _len: u64) {}

    /// Sets the block checksums of `plexes` ([`crate::format::checksum`]).
    fn record_sums(&self, _plexes: &[Arc<EnginePlex>], _sums: &NewSums) {}

    /// The block checksums of `plex` for `n` blocks from block-aligned
    /// volume offset `first` (0: unknown); `None` when its disk keeps none.
    fn sums(&self, _plex: &EnginePlex, _first: u64, _n: u64) -> Option<Vec<u32>> {
        None
    }

    /// Makes the checksums of `plex`'s disk that changed in memory durable
    /// (a resync's target, before a checkpoint says it holds them).
    fn persist_sums(&self, _plex: &EnginePlex) -> io::Result<()> {
        Ok(())
    }

    /// Records on the disk of `target` as written every volume byte below
    /// `len` that the disk of any of `sources` records as written (all of
    /// them where one cannot tell); returns once that is durable.
    fn cover_written(
        &self,
        _target: &EnginePlex,
        _sources: &[Arc<EnginePlex>],
        _len: u64,
    ) -> io::Result<()> {
        Ok(())
    }
}

/// A block a write covers in part: its volume offset, where the write's
/// bytes start in it, and those bytes.
pub type Edge = (u64, usize, Vec<u8>);

/// Block checksums a write leaves on the plexes it goes to.
#[derive(Debug, Clone)]
pub enum NewSums {
    /// From block-aligned volume offset `.0`, one entry per block (0:
    /// unknown).
    Each(u64, Vec<u32>),
    /// Zeroes over volume bytes `.0 .. .0 + .1`: the zero block's entry
    /// for the blocks covered whole, unknown for those covered in part.
    Zeroes(u64, u64),
}

impl NewSums {
    /// The entries a write of `data` at volume offset `offset` leaves: the
    /// blocks it covers whole get theirs, those it covers in part become
    /// unknown (their other bytes were not read).
    /// The blocks a write of `data` at volume `offset` covers in part:
    /// (block offset, where in the block, the new bytes), for the verified
    /// read-modify-write that gives them checksums.
    pub fn edges_of(offset: u64, data: &[u8]) -> Vec<Edge> {
        use crate::format::checksum::DATA_BLOCK;
        let end = offset + data.len() as u64;
        let head = offset / DATA_BLOCK * DATA_BLOCK;
        let tail = end / DATA_BLOCK * DATA_BLOCK;
        let mut out = Vec::new();
        if data.is_empty() {
            return out;
        }
        if head != offset || (tail == head && !end.is_multiple_of(DATA_BLOCK)) {
            let n = ((head + DATA_BLOCK).min(end) - offset) as usize;
            out.push((head, (offset - head) as usize, data[..n].to_vec()));
        }
        if !end.is_multiple_of(DATA_BLOCK) && tail != head {
            out.push((tail, 0, data[(tail - offset) as usize..].to_vec()));
        }
        out
    }

    pub fn of_write(offset: u64, data: &[u8]) -> NewSums {
        use crate::format::checksum::{DATA_BLOCK, UNKNOWN, sum};
        let len = data.len() as u64;
        let first = offset / DATA_BLOCK * DATA_BLOCK;
        let end = (offset + len).div_ceil(DATA_BLOCK) * DATA_BLOCK;
        let mut v = Vec::with_capacity(((end - first) / DATA_BLOCK) as usize);
        let mut b = first;
        while b < end {
            if b >= offset && b + DATA_BLOCK <= offset + len {
                let i = (b - offset) as usize;
                v.push(sum(&data[i..i + DATA_BLOCK as usize]));
            } else {
                v.push(UNKNOWN);
            }
            b += DATA_BLOCK;
        }
        NewSums::Each(first, v)
    }
}

/// What [`WriteIntent::begin`] found.
pub enum Begun {
    /// The bits are durable: the write may go.
    Ready(IntentGuard),
    /// A bitmap (or generation) write must be waited for first: `wait`
    /// blocks until then. `patient`: a volume's last copy, whose bits are
    /// waited for without a deadline.
    Pending {
        wait: Box<dyn FnOnce() -> io::Result<IntentGuard> + Send>,
        patient: bool,
    },
}

/// Where writes wait for their write-intent bits off the submitting thread
/// (an NBD connection's reader goes on reading): a few threads shared by
/// every volume. A wait there lasts at most the disks' deadline (a last
/// copy's bits, waited for without one, are waited for by the submitter).
fn cold_waits() -> &'static crossbeam_channel::Sender<Box<dyn FnOnce() + Send>> {
    static POOL: std::sync::OnceLock<crossbeam_channel::Sender<Box<dyn FnOnce() + Send>>> =
        std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<Box<dyn FnOnce() + Send>>();
        for i in 0..COLD_WAITERS {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("mv-bit-wait-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                });
        }
        tx
    })
}

/// Threads of [`cold_waits`]: one bitmap write covers every bit set while
/// the previous one was out, so a few waiters keep a deep queue of cold
/// writes moving.
const COLD_WAITERS: usize = 8;

/// The most bytes of writes a write-behind plex may have outstanding,
/// whatever its backlog in writes.
pub const WRITE_BEHIND_BYTES: u64 = 64 << 20;

/// What runs once a plex's deferred write-intent bits are durable, or
/// could not be made so (the plex's write then fails with that error).
pub type Later = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Runs its [`Later`] once the bits it stands for are durable.
pub type Deferred = Box<dyn FnOnce(Later) + Send>;

/// Ends a marked write when dropped.
pub struct IntentGuard {
    #[allow(dead_code)]
    inner: Box<dyn Send>,
    /// Plexes whose bits were not waited for before the write was let go
    /// (a write-behind plex's, whose write waits for them on its own): a
    /// plex's write goes to it only once its bits are durable.
    deferred: Vec<(Uuid, Deferred)>,
    /// The disks whose bits could not be made durable, with the error:
    /// their plexes must not take the write (their written maps would
    /// lack it).
    unmarked: Vec<(Uuid, io::Error)>,
}

impl IntentGuard {
    pub fn new(inner: impl Send + 'static) -> IntentGuard {
        IntentGuard {
            inner: Box::new(inner),
            deferred: Vec::new(),
            unmarked: Vec::new(),
        }
    }

    /// With the disks whose bits could not be made durable.
    pub fn with_unmarked(mut self, unmarked: Vec<(Uuid, io::Error)>) -> IntentGuard {
        self.unmarked = unmarked;
        self
    }

    /// Why the bits of the write on `disk` could not be made durable, if
    /// they could not.
    pub fn unmarked(&self, disk: Uuid) -> Option<&io::Error> {
        self.unmarked
            .iter()
            .find(|(d, _)| *d == disk)
            .map(|(_, e)| e)
    }

    /// With the bits of `deferred`'s plexes still on their way.
    pub fn with_deferred(mut self, deferred: Vec<(Uuid, Deferred)>) -> IntentGuard {
        self.deferred = deferred;
        self
    }

    /// What waits for the deferred bits, taken out of the guard.
    pub fn take_deferred(&mut self) -> Vec<Deferred> {
        std::mem::take(&mut self.deferred)
            .into_iter()
            .map(|(_, d)| d)
            .collect()
    }
}

/// Runs `job` on one of the threads that wait for write-intent bits.
pub(crate) fn off_thread(job: Box<dyn FnOnce() + Send>) {
    if let Err(job) = cold_waits().send(job) {
        (job.0)();
    }
}

/// A sink that records nothing (benchmarks, unit tests).
pub struct NoSink;

impl FailureSink for NoSink {
    fn plex_failed(&self, _: &str, _: Uuid, _: &io::Error) -> bool {
        true
    }
    fn last_copy_failed(&self, _: &str, _: Uuid, _: &io::Error) {}
    fn read_error(&self, _: &str, _: Uuid, _: &io::Error, _: bool) {}
}

/// What a plex does in the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Serves reads and takes every write.
    InSync = 0,
    /// Takes every write, serves no reads (being resynced).
    WriteOnly = 1,
    /// Out of service.
    Out = 2,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::InSync,
            1 => Mode::WriteOnly,
            _ => Mode::Out,
        }
    }
}

/// One plex in the engine.
#[derive(Debug)]
pub struct EnginePlex {
    pub disk: Uuid,
    pub queue: Arc<DiskQueue>,
    /// Absolute offset of the volume's first byte on the disk.
    pub offset: u64,
    mode: AtomicU8,
    last_read_end: AtomicU64,
    read_errors: AtomicU64,
    /// Reads go elsewhere while another in-sync plex can serve them.
    write_mostly: AtomicBool,
    /// Write-behind (md's, on a write-mostly plex): up to this many writes
    /// to it may be outstanding once the other plexes have them; 0: off.
    write_behind: AtomicUsize,
    /// Writes (and their bytes) answered to the client and still on their
    /// way to this plex.
    behind: AtomicUsize,
    behind_bytes: AtomicU64,
    /// Dropped with the plex: its receiver learns that nothing holds the
    /// plex any more ([`EnginePlex::on_release`]).
    released: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl EnginePlex {
    pub fn new(disk: Uuid, queue: Arc<DiskQueue>, offset: u64, mode: Mode) -> EnginePlex {
        EnginePlex {
            disk,
            queue,
            offset,
            mode: AtomicU8::new(mode as u8),
            last_read_end: AtomicU64::new(u64::MAX),
            read_errors: AtomicU64::new(0),
            write_mostly: AtomicBool::new(false),
            write_behind: AtomicUsize::new(0),
            behind: AtomicUsize::new(0),
            behind_bytes: AtomicU64::new(0),
            released: Mutex::new(None),
        }
    }

    /// [`EnginePlex::new`], write-mostly when `on`.
    pub fn write_mostly(self, on: bool) -> EnginePlex {
        self.set_write_mostly(on);
        self
    }

    /// Keeps reads off the plex while another in-sync plex can serve them
    /// (md's write-mostly), or no longer.
    pub fn set_write_mostly(&self, on: bool) {
        self.write_mostly.store(on, Ordering::Relaxed);
    }

    pub fn is_write_mostly(&self) -> bool {
        self.write_mostly.load(Ordering::Relaxed)
    }

    /// [`EnginePlex::new`] with write-behind of up to `most` writes.
    pub fn write_behind(self, most: usize) -> EnginePlex {
        self.set_write_behind(most);
        self
    }

    /// Lets up to `most` writes to this plex be outstanding once the other
    /// plexes have them (0: every write waits for it). Only a write-mostly
    /// plex writes behind.
    pub fn set_write_behind(&self, most: usize) {
        self.write_behind.store(most, Ordering::Relaxed);
    }

    /// Whether the plex writes behind (write-mostly, with a backlog).
    pub fn writes_behind(&self) -> bool {
        self.write_behind.load(Ordering::Relaxed) > 0 && self.is_write_mostly()
    }

    /// Writes answered to their client and not yet landed on this plex.
    pub fn behind(&self) -> usize {
        self.behind.load(Ordering::Acquire)
    }

    /// Takes a place in the write-behind backlog for a write of `len`
    /// bytes; false when the plex does not write behind or its backlog is
    /// full (in writes or in [`WRITE_BEHIND_BYTES`]): the write then waits
    /// for this plex as for any other.
    fn take_behind(&self, len: u64) -> bool {
        let most = self.write_behind.load(Ordering::Relaxed);
        if most == 0 || !self.is_write_mostly() {
            return false;
        }
        if self
            .behind
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < most).then_some(n + 1)
            })
            .is_err()
        {
            return false;
        }
        let bytes = self.behind_bytes.fetch_add(len, Ordering::AcqRel) + len;
        if bytes > WRITE_BEHIND_BYTES && bytes != len {
            self.landed(len);
            return false;
        }
        true
    }

    /// A write behind landed (or failed).
    fn landed(&self, len: u64) {
        self.behind_bytes.fetch_sub(len, Ordering::AcqRel);
        self.behind.fetch_sub(1, Ordering::AcqRel);
    }

    /// A receiver that disconnects when the plex is dropped, that is when
    /// the last request (or job) holding it lets go: whoever waits for a
    /// plex that left a volume to be free waits on it, without polling.
    pub fn on_release(&self) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.released.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
    }

    pub fn read_errors(&self) -> u64 {
        self.read_errors.load(Ordering::Relaxed)
    }

    /// Puts a write-only plex in sync (a resync of it ended); false when it
    /// is no longer write-only (it failed meanwhile), and then nothing
    /// changes.
    pub fn promote(&self) -> bool {
        self.mode
            .compare_exchange(
                Mode::WriteOnly as u8,
                Mode::InSync as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

type Done<T> = Box<dyn FnOnce(io::Result<T>) + Send>;

/// What the engine decided about a plex that met an error, under the
/// volume's decision lock; the [`FailureSink`] hears of it after the lock
/// is released (it takes the group's lock, which an admin operation holds
/// while it asks the engines through [`MirrorVolume::decision`]).
enum Verdict {
    /// Failed: out of service now, the config must record it.
    Failed,
    /// The last in-sync plex, and nothing took the write: out of service,
    /// its disk taken out with the plex's data kept.
    LastCopy,
}

/// Where a request's I/O runs: all on the disks' workers (callers that must
/// not block, such as a network server), or one part on the calling thread
/// (blocking callers, which save a hand-off to a worker that way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Queued,
    Here,
}

impl DiskQueue {
    /// Sends `op` to the disk. [`Run::Here`] runs it on the calling thread
    /// only when it has no deadline (the volume's last copy, which the
    /// caller must wait for anyway): a request with a deadline always goes
    /// to the workers, so the caller is answered when the deadline passes
    /// even if the disk never returns.
    fn dispatch(&self, run: Run, op: Op, deadline: bool, done: super::queue::Callback) {
        match run {
            Run::Here if !deadline => self.submit_here(op, deadline, done),
            _ => self.submit(op, deadline, done),
        }
    }
}

/// A callback that gets every outcome of a fan-out.
type FanDone = Box<dyn FnOnce(Outcomes) + Send>;

/// Every plex's outcome of one fanned-out request.
type Outcomes = Vec<(Arc<EnginePlex>, Outcome)>;

/// A copy that does not match its block checksum (the error of a read
/// from it, with what it read).
#[derive(Debug)]
pub struct ChecksumMismatch {
    /// The disk's name.
    pub disk: String,
    /// Volume offset of the first block that differs.
    pub offset: u64,
    /// What the read returned.
    pub data: AlignedBuf,
}

impl ChecksumMismatch {
    /// The mismatch an I/O error carries, if it is one.
    pub fn of(e: &io::Error) -> Option<&ChecksumMismatch> {
        e.get_ref()?.downcast_ref::<ChecksumMismatch>()
    }
}

impl std::fmt::Display for ChecksumMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the copy on disk {} does not match its checksum at volume offset {}",
            self.disk, self.offset
        )
    }
}

impl std::error::Error for ChecksumMismatch {}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// Adds `n` bytes of state `v` to extents, merged with the last one when
/// it is in the same state; nothing for no bytes.
fn push_run(out: &mut Vec<(u64, bool)>, n: u64, v: bool) {
    match out.last_mut() {
        _ if n == 0 => {}
        Some((m, was)) if *was == v => *m += n,
        _ => out.push((n, v)),
    }
}

/// The most steps one [`MirrorVolume::allocation`] takes through the
/// disks' extents; a client asks again from where the answer stops.
const MAX_ALLOCATION_STEPS: usize = 4096;

/// Requests the users of a volume submitted (clients, `copy`; a resync's
/// or a scrub's own I/O is not counted), for `iostat`.
#[derive(Debug, Default)]
pub struct VolumeIo {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
}

/// A volume served by the engine.
pub struct MirrorVolume {
    pub name: String,
    /// Bytes; grows when a simple volume is extended while it serves.
    size: AtomicU64,
    plexes: RwLock<Vec<Arc<EnginePlex>>>,
    lock: RangeLock,
    sink: Weak<dyn FailureSink>,
    opts: EngineOptions,
    /// Serializes decisions to fail plexes.
    decide: Mutex<()>,
    rotate: AtomicUsize,
    /// The write-intent bitmap, when the volume has one.
    intent: std::sync::OnceLock<Arc<dyn WriteIntent>>,
    /// Requests submitted by users of the volume (not by a resync): a
    /// resync backs off while it moves.
    foreground: AtomicU64,
    /// What the volume's users asked of it (`iostat`).
    pub io: VolumeIo,
}

impl std::fmt::Debug for MirrorVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorVolume")
            .field("name", &self.name)
            .field("size", &self.size())
            .finish()
    }
}

impl MirrorVolume {
    pub fn new(
        name: &str,
        size: u64,
        plexes: Vec<EnginePlex>,
        sink: Weak<dyn FailureSink>,
        opts: EngineOptions,
    ) -> Arc<MirrorVolume> {
        Arc::new(MirrorVolume {
            name: name.to_string(),
            size: AtomicU64::new(size),
            plexes: RwLock::new(plexes.into_iter().map(Arc::new).collect()),
            lock: RangeLock::new(),
            sink,
            opts,
            decide: Mutex::new(()),
            rotate: AtomicUsize::new(0),
            intent: std::sync::OnceLock::new(),
            foreground: AtomicU64::new(0),
            io: VolumeIo::default(),
        })
    }

    /// Gives the volume a write-intent bitmap: from now on every write's
    /// regions are durable in it before the write reaches any plex. Set
    /// once, before the first write.
    pub fn set_intent(&self, intent: Arc<dyn WriteIntent>) {
        let _ = self.intent.set(intent);
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the volume (its plexes have the room): new requests may reach
    /// up to `size`.
    pub fn grow(&self, size: u64) {
        self.size.fetch_max(size, Ordering::AcqRel);
    }

    /// Takes the plex on `disk` out of the volume, and waits (up to
    /// `timeout`) until no request in flight holds it any more, so that
    /// its space can be reused or handed to another volume. False when
    /// requests still held it at the timeout (a hung disk); true when it is
    /// free, or the volume had no plex there.
    pub fn remove_plex(&self, disk: Uuid, timeout: std::time::Duration) -> bool {
        let plex = {
            let mut plexes = self.plexes.write().unwrap_or_else(|e| e.into_inner());
            let Some(i) = plexes.iter().position(|p| p.disk == disk) else {
                return true;
            };
            plexes.remove(i)
        };
        plex.set_mode(Mode::Out);
        // Every request that picked the plex holds a clone until it is
        // answered; the last one to let go drops it, and with it the
        // sender of `released`.
        let released = plex.on_release();
        drop(plex);
        !matches!(
            released.recv_timeout(timeout),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        )
    }

    /// A snapshot of the plexes.
    pub fn plexes(&self) -> Vec<Arc<EnginePlex>> {
        self.plexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn add_plex(&self, plex: EnginePlex) {
        self.plexes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(plex));
    }

    /// Requests submitted so far by users of the volume (reads, writes,
    /// flushes; a resync's own reads are not counted): a resync compares two
    /// samples to tell whether foreground I/O is going on.
    pub fn foreground_requests(&self) -> u64 {
        self.foreground.load(Ordering::Relaxed)
    }

    /// The plex on `disk`, if the engine has it.
    pub fn plex(&self, disk: Uuid) -> Option<Arc<EnginePlex>> {
        self.plexes().into_iter().find(|p| p.disk == disk)
    }

    /// Blocks until no write or read repair holds or waits for a range.
    pub fn wait_idle(&self) {
        self.lock.wait_idle();
    }

    /// Ranges held or waited for in the range lock: writes in flight and
    /// read repairs; 0 once the volume is idle.
    pub fn ranges_busy(&self) -> usize {
        self.lock.busy()
    }

    /// Runs `f` with `range` held in the range lock, blocking until it is
    /// free: no write to the range is in flight while `f` runs, and none
    /// starts before it returns. Scrub compares and repairs plexes this way,
    /// so a write racing it can cause neither a false mismatch nor a lost
    /// update.
    pub fn with_range_locked<T>(&self, range: std::ops::Range<u64>, f: impl FnOnce() -> T) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.lock.acquire(range, move |guard| {
            let _ = tx.send(guard);
        });
        let guard = rx
            .recv()
            .expect("a waiting range is started once the ranges ahead of it are released");
        // Released on unwind too: a panic in `f` must not wedge the range.
        struct Held<'a>(&'a RangeLock, Option<super::range_lock::RangeGuard>);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                if let Some(g) = self.1.take() {
                    self.0.release(g);
                }
            }
        }
        let _held = Held(&self.lock, Some(guard));
        f()
    }

    /// Holds `range` in the range lock, blocking until it is free, until the
    /// returned hold is dropped (on any thread: a resync drops it in the
    /// completion of its write, so that it can take the next range while
    /// that write is in flight without waiting on a write queued behind it).
    pub fn hold_range(self: &Arc<Self>, range: std::ops::Range<u64>) -> RangeHold {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.lock.acquire(range, move |guard| {
            let _ = tx.send(guard);
        });
        let guard = rx
            .recv()
            .expect("a waiting range is started once the ranges ahead of it are released");
        RangeHold {
            volume: self.clone(),
            guard: Some(guard),
        }
    }

    /// Fails the plex on `disk` after an I/O error seen outside the engine's
    /// own requests (scrub), with the engine's rules: never the last in-sync
    /// plex, and the config records it through the [`FailureSink`]. Returns
    /// true when the plex is out of service now.
    pub fn fail_plex(&self, disk: Uuid, error: &io::Error) -> bool {
        let Some(plex) = self.plexes().into_iter().find(|p| p.disk == disk) else {
            return false;
        };
        let failed = {
            let _decide = self.decision();
            self.take_out(&plex)
        };
        if failed {
            self.report(&plex, Verdict::Failed, error);
        }
        plex.mode() == Mode::Out
    }

    /// The volume's decision lock: whoever holds it sees the plexes' modes
    /// as they are and may change them, one decision at a time. The one
    /// rule, that the last in-sync plex is never failed, is applied under
    /// it (`MirrorVolume::take_out`, [`MirrorVolume::last_in_sync`]), by
    /// the engine and by admin operations alike.
    pub fn decision(&self) -> std::sync::MutexGuard<'_, ()> {
        self.decide.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the plex on `disk` is the volume's last in-sync plex (as the
    /// engine sees it: a plex it failed a moment ago counts as failed even
    /// before the config says so). The caller holds [`MirrorVolume::decision`].
    /// This is the one test of the rule that the last in-sync plex is never
    /// failed nor taken away: the engine's own failures
    /// (`MirrorVolume::take_out`) and every admin operation that takes a
    /// plex out of service (`fail`, `break`, `remove-mirror`) ask it.
    pub fn last_in_sync(&self, disk: Uuid) -> bool {
        self.plex(disk).is_some_and(|p| p.mode() == Mode::InSync) && self.in_sync() <= 1
    }

    /// [`MirrorVolume::last_in_sync`] for an admin's take-out: also true
    /// while every other in-sync plex still has writes behind (answered,
    /// not landed there): taken out now, the plex would take them along.
    pub fn holds_writes_alone(&self, disk: Uuid) -> bool {
        let plexes = self.plexes.read().unwrap_or_else(|e| e.into_inner());
        plexes
            .iter()
            .any(|p| p.disk == disk && p.mode() == Mode::InSync)
            && !plexes
                .iter()
                .any(|p| p.disk != disk && p.mode() == Mode::InSync && p.behind() == 0)
    }

    fn in_sync(&self) -> usize {
        self.plexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| p.mode() == Mode::InSync)
            .count()
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at offset {offset} lie past the end of volume {} ({} bytes)",
                    self.name,
                    self.size()
                ),
            )),
        }
    }

    fn with_sink<T: Default>(&self, f: impl FnOnce(&dyn FailureSink) -> T) -> T {
        match self.sink.upgrade() {
            Some(sink) => f(&*sink),
            None => T::default(),
        }
    }

    /// Takes `plex` out of service unless it is the last in-sync plex or
    /// out already; true when it did. The caller holds `decide`.
    fn take_out(&self, plex: &EnginePlex) -> bool {
        match plex.mode() {
            Mode::Out => false,
            Mode::InSync if self.last_in_sync(plex.disk) => false,
            Mode::WriteOnly | Mode::InSync => {
                plex.set_mode(Mode::Out);
                true
            }
        }
    }

    /// Tells the sink what was decided about `plex`, without the decision
    /// lock; false when the config could not record a failed plex.
    fn report(&self, plex: &EnginePlex, verdict: Verdict, error: &io::Error) -> bool {
        match verdict {
            Verdict::Failed => {
                tracing::error!(volume = %self.name, disk = %plex.queue.name(), %error, "plex failed");
                self.with_sink(|s| s.plex_failed(&self.name, plex.disk, error))
            }
            Verdict::LastCopy => {
                tracing::error!(volume = %self.name, disk = %plex.queue.name(), %error, "the last in-sync plex failed; the volume is failed");
                self.with_sink(|s| s.last_copy_failed(&self.name, plex.disk, error));
                true
            }
        }
    }

    // ---- writes ----

    /// Writes `data` at `offset` on every writable plex; `done` runs once
    /// every plex has answered and failures are recorded.
    pub fn submit_write(
        self: &Arc<Self>,
        offset: u64,
        data: Arc<AlignedBuf>,
        fua: bool,
        run: Run,
        done: Done<()>,
    ) {
        self.foreground.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.check(offset, data.len() as u64) {
            return done(Err(e));
        }
        let len = data.len() as u64;
        self.io.writes.fetch_add(1, Ordering::Relaxed);
        self.io.written_bytes.fetch_add(len, Ordering::Relaxed);
        let sums = self
            .intent
            .get()
            .filter(|_| super::sums::enabled())
            .map(|_| {
                (
                    NewSums::of_write(offset, &data),
                    NewSums::edges_of(offset, &data),
                )
            });
        self.submit_fanned(
            offset,
            len,
            run,
            false,
            sums,
            move |p| Op::Write {
                offset: p.offset + offset,
                data: data.clone(),
                fua,
            },
            done,
        );
    }

    /// Makes `len` bytes at `offset` read as zeroes on every writable plex;
    /// `keep`: keeps them allocated there ([`crate::disk::Disk::zero_range`]).
    pub fn submit_write_zeroes(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        keep: bool,
        run: Run,
        done: Done<()>,
    ) {
        self.foreground.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.check(offset, len) {
            return done(Err(e));
        }
        // Zeroes that may leave holes return the regions they cover whole
        // to unwritten (a TRIM, a WRITE_ZEROES without NO_HOLE).
        self.submit_fanned(
            offset,
            len,
            run,
            !keep,
            Some((NewSums::Zeroes(offset, len), Vec::new())),
            move |p| Op::WriteZeroes {
                offset: p.offset + offset,
                len,
                fua,
                keep,
            },
            done,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_fanned(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        run: Run,
        unwrites: bool,
        sums: Option<(NewSums, Vec<Edge>)>,
        op: impl Fn(&EnginePlex) -> Op + Send + 'static,
        done: Done<()>,
    ) {
        if len == 0 {
            return done(Ok(()));
        }
        // The bits go first, set in memory on the submitting thread; when a
        // bitmap write must be waited for, the wait happens elsewhere (a
        // connection's reader goes on reading), except for a last copy,
        // which its clients wait for anyway. The range lock's callback
        // (possibly another request's completion thread) never waits.
        let begun = match self.intent.get() {
            Some(intent) => {
                let writable: Vec<Arc<EnginePlex>> = self
                    .plexes()
                    .into_iter()
                    .filter(|p| p.mode() != Mode::Out)
                    .collect();
                match intent.begin(&writable, offset, len) {
                    Ok(b) => Some(b),
                    Err(e) => return done(Err(self.intent_failure(offset, e))),
                }
            }
            None => None,
        };
        match begun {
            None => self.write_locked(None, offset, len, run, unwrites, sums, op, done),
            Some(Begun::Ready(g)) => {
                self.write_locked(Some(g), offset, len, run, unwrites, sums, op, done)
            }
            Some(Begun::Pending {
                wait,
                patient: true,
            }) => {
                // Requests this thread held back go before it waits.
                super::queue::unplug_now();
                match wait() {
                    Ok(g) => {
                        self.fail_unmarked(&g);
                        self.write_locked(Some(g), offset, len, run, unwrites, sums, op, done)
                    }
                    Err(e) => done(Err(self.intent_failure(offset, e))),
                }
            }
            Some(Begun::Pending {
                wait,
                patient: false,
            }) => {
                let this = self.clone();
                let job: Box<dyn FnOnce() + Send> = Box::new(move || match wait() {
                    Ok(g) => {
                        this.fail_unmarked(&g);
                        this.write_locked(
                            Some(g),
                            offset,
                            len,
                            Run::Queued,
                            unwrites,
                            sums,
                            op,
                            done,
                        )
                    }
                    Err(e) => done(Err(this.intent_failure(offset, e))),
                });
                if let Err(job) = cold_waits().send(job) {
                    (job.0)();
                }
            }
        }
    }

    /// Takes out the plexes whose disks could not make the write's bits
    /// durable (another disk did): the write must not reach a disk whose
    /// written map may lack it. A plex the engine may not take out (a last
    /// copy) stays and takes the write.
    fn fail_unmarked(&self, g: &IntentGuard) {
        for p in self.plexes() {
            if p.mode() == Mode::Out {
                continue;
            }
            if let Some(e) = g.unmarked(p.disk) {
                // The error as the disk gave it (a lost link stays a lost
                // link: the disk comes back by the bitmaps).
                self.fail_plex(p.disk, e);
            }
        }
    }

    fn intent_failure(&self, offset: u64, e: io::Error) -> io::Error {
        IoFailure {
            op: "write",
            volume: self.name.clone(),
            disk: None,
            offset,
            what: "failed: no disk took its write-intent bit",
            source: e,
        }
        .into_io()
    }

    /// The second half of a write, once its bits are durable: the range
    /// lock, then the write to every writable plex.
    #[allow(clippy::too_many_arguments)]
    fn write_locked(
        self: &Arc<Self>,
        intent: Option<IntentGuard>,
        offset: u64,
        len: u64,
        run: Run,
        unwrites: bool,
        sums: Option<(NewSums, Vec<Edge>)>,
        op: impl Fn(&EnginePlex) -> Op + Send + 'static,
        done: Done<()>,
    ) {
        use crate::format::checksum::DATA_BLOCK;
        let this = self.clone();
        let caller = std::thread::current().id();
        let mut intent = intent;
        let deferred = intent
            .as_mut()
            .map(|g| std::mem::take(&mut g.deferred))
            .unwrap_or_default();
        let (sums, edges) = match sums {
            Some((s, e)) => (Some(s), e),
            None => (None, Vec::new()),
        };
        // A write that covers blocks in part holds them whole: their
        // checksums come from a read of the rest of them, which no other
        // write may change meanwhile.
        let locked = if edges.is_empty() {
            offset..offset + len
        } else {
            offset / DATA_BLOCK * DATA_BLOCK..(offset + len).div_ceil(DATA_BLOCK) * DATA_BLOCK
        };
        self.lock.acquire(locked, move |guard| {
            // A write that waited for an overlapping one starts on the thread
            // that released the range: never do I/O there.
            let run = if std::thread::current().id() == caller {
                run
            } else {
                Run::Queued
            };
            if edges.is_empty() {
                return this.write_held(
                    guard, offset, len, run, unwrites, sums, intent, deferred, op, done,
                );
            }
            // The read-modify-write reads and waits: off this thread.
            let job: Box<dyn FnOnce() + Send> = Box::new(move || {
                let sums = this.merge_edges(sums, edges);
                this.write_held(
                    guard,
                    offset,
                    len,
                    Run::Queued,
                    unwrites,
                    sums,
                    intent,
                    deferred,
                    op,
                    done,
                )
            });
            off_thread(job);
        });
    }

    /// The checksums of the blocks a write covers in part (`edges`): the
    /// rest of each block read, verified, from the volume (the caller
    /// holds the blocks whole), with the write's bytes laid over it. A
    /// block whose read fails stays unknown.
    fn merge_edges(self: &Arc<Self>, sums: Option<NewSums>, edges: Vec<Edge>) -> Option<NewSums> {
        use crate::format::checksum::{DATA_BLOCK, sum};
        let Some(NewSums::Each(first, mut v)) = sums else {
            return sums;
        };
        for (block, at, bytes) in edges {
            let got = read_data(wait(|cb| {
                self.read_from(
                    block,
                    DATA_BLOCK as usize,
                    Run::Queued,
                    Vec::new(),
                    true,
                    Box::new(move |r| cb(r.map(Some))),
                )
            }));
            let i = ((block - first) / DATA_BLOCK) as usize;
            if let Ok(mut b) = got
                && b.len() == DATA_BLOCK as usize
                && at + bytes.len() <= b.len()
                && i < v.len()
            {
                b[at..at + bytes.len()].copy_from_slice(&bytes);
                v[i] = sum(&b);
            }
        }
        Some(NewSums::Each(first, v))
    }

    /// [`MirrorVolume::write_locked`] with the range held.
    #[allow(clippy::too_many_arguments)]
    fn write_held(
        self: &Arc<Self>,
        guard: super::range_lock::RangeGuard,
        offset: u64,
        len: u64,
        run: Run,
        unwrites: bool,
        sums: Option<NewSums>,
        intent: Option<IntentGuard>,
        deferred: Vec<(Uuid, Deferred)>,
        op: impl Fn(&EnginePlex) -> Op + Send + 'static,
        done: Done<()>,
    ) {
        let this = self.clone();
        {
            let targets: Vec<Arc<EnginePlex>> = this
                .plexes()
                .into_iter()
                .filter(|p| p.mode() != Mode::Out)
                .collect();
            // The new checksums, in the order the range lock gives the
            // writes (a read racing this write may see either: it checks
            // again under the range lock before it calls a copy bad).
            if let (Some(i), Some(sums)) = (this.intent.get(), &sums) {
                i.record_sums(&targets, sums);
            }
            // Write-behind needs another in-sync plex that waits for the
            // write: the client's answer stands on it.
            // And a write-intent bitmap, to keep its regions dirty.
            let anchored = this.intent.get().is_some()
                && targets
                    .iter()
                    .any(|p| p.mode() == Mode::InSync && !p.is_write_mostly());
            let (behind, now): (Vec<_>, Vec<_>) = targets
                .into_iter()
                .partition(|p| anchored && p.take_behind(len));
            let mut deferred = deferred;
            if behind.is_empty() {
                let ops: Vec<Op> = now.iter().map(|p| op(p)).collect();
                let after = this.clone();
                this.fan_out_after(now, ops, run, &mut deferred, move |results| {
                    let r = after.settle_writes(results, "write", offset);
                    // While its own bits are still counted in (a write
                    // marked meanwhile keeps its regions written).
                    if unwrites
                        && r.is_ok()
                        && let (Some(i), Some(g)) = (after.intent.get(), &intent)
                    {
                        let plexes: Vec<Arc<EnginePlex>> = after
                            .plexes()
                            .into_iter()
                            .filter(|p| p.mode() != Mode::Out && g.unmarked(p.disk).is_none())
                            .collect();
                        i.unwrite(&plexes, offset, len);
                    }
                    drop(intent);
                    after.lock.release(guard);
                    done(r);
                });
                return;
            }
            // The client is answered once the plexes in `now` have the
            // write; the bits stay set and the range stays locked until the
            // plexes behind have it too, so a crash or a cut never loses
            // track of it and an overlapping write reaches them after it.
            let held = Arc::new(Mutex::new(Some((intent, guard))));
            let halves = Arc::new(AtomicUsize::new(2));
            let end_half = {
                let (this, held, halves) = (this.clone(), held.clone(), halves.clone());
                move || {
                    if halves.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let taken = held.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some((intent, guard)) = taken {
                            drop(intent);
                            this.lock.release(guard);
                        }
                    }
                }
            };
            let behind_ops: Vec<Op> = behind.iter().map(|p| op(p)).collect();
            let (after, end) = (this.clone(), end_half.clone());
            this.fan_out_after(
                behind,
                behind_ops,
                Run::Queued,
                &mut deferred,
                move |results| {
                    let plexes: Vec<Arc<EnginePlex>> =
                        results.iter().map(|(p, _)| p.clone()).collect();
                    // A failure fails the plex; its client was answered already.
                    let _ = after.settle_writes(results, "write", offset);
                    end();
                    // Counted out last: once `behind()` is 0, its bits and range
                    // are let go too.
                    for p in plexes {
                        p.landed(len);
                    }
                },
            );
            let ops: Vec<Op> = now.iter().map(|p| op(p)).collect();
            let after = this.clone();
            this.fan_out_after(now, ops, run, &mut deferred, move |results| {
                let r = after.settle_writes(results, "write", offset);
                // Let go of this half before answering: once the client
                // has its answer and `behind()` is 0, the bits and the
                // range are let go (as on the path without write-behind).
                end_half();
                done(r);
            });
        }
    }

    /// Flushes every writable plex.
    pub fn submit_flush(self: &Arc<Self>, run: Run, done: Done<()>) {
        self.flush_with(run, false, done)
    }

    /// A client's flush: answered once every plex that does not write
    /// behind is flushed. A write-behind plex's flush goes on behind, as
    /// its writes do (answered before they land there): its failure fails
    /// the plex. Without another in-sync plex, or a write-intent bitmap, it
    /// waits for every plex, as [`MirrorVolume::submit_flush`] (what `serve`
    /// does before it stops) always does.
    pub fn submit_client_flush(self: &Arc<Self>, run: Run, done: Done<()>) {
        self.flush_with(run, true, done)
    }

    fn flush_with(self: &Arc<Self>, run: Run, client: bool, done: Done<()>) {
        self.foreground.fetch_add(1, Ordering::Relaxed);
        let targets: Vec<Arc<EnginePlex>> = self
            .plexes()
            .into_iter()
            .filter(|p| p.mode() != Mode::Out)
            .collect();
        let anchored = client
            && self.intent.get().is_some()
            && targets
                .iter()
                .any(|p| p.mode() == Mode::InSync && !p.is_write_mostly());
        let (behind, now): (Vec<_>, Vec<_>) = targets
            .into_iter()
            .partition(|p| anchored && p.writes_behind());
        if !behind.is_empty() {
            let ops = behind.iter().map(|_| Op::Flush).collect();
            let this = self.clone();
            self.fan_out(behind, ops, Run::Queued, move |results| {
                // Its client was answered already; a failure fails the plex.
                let _ = this.settle_writes(results, "flush", 0);
            });
        }
        let ops = now.iter().map(|_| Op::Flush).collect();
        let this = self.clone();
        self.fan_out(now, ops, run, move |results| {
            done(this.settle_writes(results, "flush", 0))
        });
    }

    /// Sends `ops[i]` to `targets[i]` in parallel; `all_done` gets every
    /// outcome once the last one is in. With [`Run::Here`] the last target's
    /// I/O runs on this thread, after the others are queued.
    fn fan_out(
        &self,
        targets: Vec<Arc<EnginePlex>>,
        ops: Vec<Op>,
        run: Run,
        all_done: impl FnOnce(Outcomes) + Send + 'static,
    ) {
        self.fan_out_after(targets, ops, run, &mut Vec::new(), all_done)
    }

    /// [`Engine::fan_out`], where a target whose write-intent bits are
    /// still on their way (in `deferred`, taken from it) gets its request
    /// once they are durable, and fails with the error when they cannot be.
    fn fan_out_after(
        &self,
        targets: Vec<Arc<EnginePlex>>,
        ops: Vec<Op>,
        run: Run,
        deferred: &mut Vec<(Uuid, Deferred)>,
        all_done: impl FnOnce(Outcomes) + Send + 'static,
    ) {
        if targets.is_empty() {
            return all_done(Vec::new());
        }
        struct Fan {
            remaining: AtomicUsize,
            results: Mutex<Outcomes>,
            all_done: Mutex<Option<FanDone>>,
        }
        let fan = Arc::new(Fan {
            remaining: AtomicUsize::new(targets.len()),
            results: Mutex::new(Vec::with_capacity(targets.len())),
            all_done: Mutex::new(Some(Box::new(all_done))),
        });
        let deadline = self.in_sync() > 1;
        let last = targets.len() - 1;
        for (i, (plex, op)) in targets.into_iter().zip(ops).enumerate() {
            let fan = fan.clone();
            let p = plex.clone();
            let done: super::queue::Callback = Box::new(move |outcome| {
                fan.results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((p, outcome));
                if fan.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let results =
                        std::mem::take(&mut *fan.results.lock().unwrap_or_else(|e| e.into_inner()));
                    let cb = fan
                        .all_done
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    if let Some(cb) = cb {
                        cb(results);
                    }
                }
            });
            let run = if i == last { run } else { Run::Queued };
            match deferred.iter().position(|(d, _)| *d == plex.disk) {
                None => plex.queue.dispatch(run, op, deadline, done),
                Some(at) => {
                    let (_, bits) = deferred.swap_remove(at);
                    bits(Box::new(move |durable| match durable {
                        Ok(()) => plex.queue.dispatch(Run::Queued, op, deadline, done),
                        Err(e) => done(Err(e)),
                    }));
                }
            }
        }
    }

    /// Decides what a fanned-out write's outcomes mean: success when a plex
    /// that is in sync now took it; the plexes that failed are failed first.
    fn settle_writes(&self, results: Outcomes, op: &'static str, offset: u64) -> io::Result<()> {
        if results.is_empty() {
            return Err(eio(format!("volume {} has no plex to {op} to", self.name)));
        }
        if results.iter().all(|(_, r)| r.is_ok()) {
            return Ok(());
        }
        let mut last_error = None;
        let mut verdicts = Vec::new();
        let took_it = {
            let _decide = self.decision();
            let took_it = results
                .iter()
                .any(|(p, r)| r.is_ok() && p.mode() == Mode::InSync);
            for (i, (plex, r)) in results.iter().enumerate() {
                if r.is_ok() {
                    continue;
                }
                if self.take_out(plex) {
                    verdicts.push((i, Verdict::Failed));
                } else if !took_it && plex.mode() == Mode::InSync {
                    // The last in-sync plex failed and nothing else took it.
                    plex.set_mode(Mode::Out);
                    verdicts.push((i, Verdict::LastCopy));
                }
                last_error = Some(i);
            }
            took_it
        };
        // Recorded before the write is answered, outside the lock.
        let mut unrecorded = false;
        for (i, verdict) in verdicts {
            let (plex, r) = &results[i];
            if let Err(error) = r {
                unrecorded |= !self.report(plex, verdict, error);
            }
        }
        if took_it && !unrecorded {
            return Ok(());
        }
        let (plex, outcome) = results
            .into_iter()
            .nth(last_error.expect("some result failed"))
            .expect("an index of the results");
        Err(IoFailure {
            op,
            volume: self.name.clone(),
            disk: Some(plex.queue.name().to_string()),
            offset,
            what: if took_it {
                "was not recorded: no disk took the config that fails its plex"
            } else {
                "failed on every plex"
            },
            source: match outcome {
                Err(e) => e,
                Ok(_) => eio("the failed result went missing".to_string()),
            },
        }
        .into_io())
    }

    // ---- reads ----

    /// Reads `len` bytes at `offset`; `done` gets the bytes.
    pub fn submit_read(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        run: Run,
        done: Done<AlignedBuf>,
    ) {
        self.foreground.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.check(offset, len as u64) {
            return done(Err(e));
        }
        self.io.reads.fetch_add(1, Ordering::Relaxed);
        self.io.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
        // Never written on any in-sync plex: zeroes, whatever the disks
        // hold there (as block status and scrub have it).
        if self.intent.get().is_some() {
            let in_sync: Vec<Arc<EnginePlex>> = self
                .plexes()
                .into_iter()
                .filter(|p| p.mode() == Mode::InSync)
                .collect();
            if !in_sync.is_empty() && self.unwritten_on(&in_sync, offset, len as u64) {
                return done(Ok(AlignedBuf::new(len, crate::disk::buf::IO_ALIGN)));
            }
        }
        // Blocks the read covers in part are read whole, so that they are
        // checked against their checksums too (an entry covers a whole
        // 4 KiB block): a 512-byte read is verified like a 4 KiB one.
        if let Some(whole) = self.widened(offset, len) {
            let skip = (offset - whole.start) as usize;
            let wide = (whole.end - whole.start) as usize;
            return self.read_from(
                whole.start,
                wide,
                run,
                Vec::new(),
                false,
                Box::new(move |r| {
                    done(r.map(|buf| {
                        let mut out = AlignedBuf::recycled(len);
                        out.copy_from_slice(&buf[skip..skip + len]);
                        out
                    }))
                }),
            );
        }
        self.read_from(offset, len, run, Vec::new(), false, done);
    }

    /// The whole blocks around volume bytes `[offset, offset + len)` when
    /// it covers a block in part and the plexes keep checksums (the last
    /// block of a volume whose size is not a multiple of a block stays
    /// short: it has no entry).
    fn widened(&self, offset: u64, len: usize) -> Option<std::ops::Range<u64>> {
        use crate::format::checksum::DATA_BLOCK;
        if len == 0 || self.intent.get().is_none() || !super::sums::enabled() {
            return None;
        }
        let end = offset + len as u64;
        let whole =
            offset / DATA_BLOCK * DATA_BLOCK..end.next_multiple_of(DATA_BLOCK).min(self.size());
        (whole.start != offset || whole.end != end).then_some(whole)
    }

    /// Reads for a resync, and waits: as [`MirrorVolume::read`]
    /// (fallback to another in-sync plex, repair of the one that failed),
    /// but not counted as foreground I/O. The caller holds the range: a
    /// plex with writes behind elsewhere has every write to it, and may
    /// serve it.
    pub fn read_for_resync(self: &Arc<Self>, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        self.check(offset, len as u64)?;
        // On the disks' workers, not this thread: a plex that hangs is timed
        // out by the watchdog (and failed, and the read tried elsewhere)
        // while the resync waits, instead of holding its range for good.
        read_data(wait(|cb| {
            self.read_from(
                offset,
                len,
                Run::Queued,
                Vec::new(),
                true,
                Box::new(move |r| cb(r.map(Some))),
            )
        }))
    }

    // ---- what the volume holds ----

    /// Where the volume holds data: extents (bytes, hole) from `offset`
    /// covering `len` bytes or a first part of them. A range is a hole only
    /// where every in-sync plex has one (then every plex that may serve a
    /// read there returns zeroes); a plex whose disk cannot tell, or fails
    /// to, counts as data; so does a plex on an NBD export (asking it
    /// would put a round trip, and a far server's stall, in front of a
    /// client's read or block status: see [`MirrorVolume::allocation_asking_exports`]).
    /// Asks the disks directly (`lseek`), not through their queues.
    pub fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.allocation_with(offset, len, false)
    }

    /// [`MirrorVolume::allocation`], asking NBD exports too (block status,
    /// with the disk's deadline; a failure breaks that disk as any failed
    /// request does), for a resync: local disks first, and an export only
    /// where they all have a hole (data on one plex is data, wherever the
    /// others are), so its round trip is paid only to confirm a hole.
    pub fn allocation_asking_exports(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.allocation_with(offset, len, true)
    }

    fn allocation_with(
        &self,
        offset: u64,
        len: u64,
        exports: bool,
    ) -> io::Result<Vec<(u64, bool)>> {
        self.check(offset, len)?;
        let in_sync: Vec<Arc<EnginePlex>> = self
            .plexes()
            .into_iter()
            .filter(|p| p.mode() == Mode::InSync)
            .collect();
        // Never written on any in-sync plex (their written maps): zeroes
        // on every plex, whatever their disks hold around it.
        if !in_sync.is_empty() && self.unwritten_on(&in_sync, offset, len) {
            let mut out = Vec::new();
            push_run(&mut out, len, true);
            return Ok(out);
        }
        let mut disks: Vec<(Arc<dyn Disk>, u64)> = Vec::with_capacity(in_sync.len());
        for p in &in_sync {
            match p.queue.disk() {
                Some(d) if exports || d.as_nbd_disk().is_none() => disks.push((d, p.offset)),
                // Not asked (an export), or no disk to ask (its queue
                // closed under it): data, as a disk that cannot tell.
                _ => {
                    let mut out = Vec::new();
                    push_run(&mut out, len, false);
                    return Ok(out);
                }
            }
        }
        disks.sort_by_key(|(d, _)| d.as_nbd_disk().is_some());
        // Each disk is asked again only past the extent it last answered:
        // its last answer, data or not, up to where.
        // Per disk, its last answer: data or not, up to where.
        let mut known: Vec<Option<(bool, u64)>> = vec![None; disks.len()];
        if disks.is_empty() {
            return Err(eio(format!(
                "volume {} has no in-sync plex to ask where its data is",
                self.name
            )));
        }
        let end = offset + len;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        for _ in 0..MAX_ALLOCATION_STEPS {
            if pos >= end {
                break;
            }
            let mut run = end - pos;
            let mut data = false;
            for ((disk, base), known) in disks.iter().zip(known.iter_mut()) {
                let (is_data, until) = match *known {
                    Some((d, until)) if until > pos => (d, until),
                    _ => {
                        let left = end - pos;
                        let (d, n) = disk.extent_at(base + pos, left).unwrap_or((true, left));
                        *known = Some((d, pos + n.clamp(1, left)));
                        (d, pos + n.clamp(1, left))
                    }
                };
                if is_data {
                    // Data here is data, whatever the others hold.
                    data = true;
                    run = until - pos;
                    break;
                }
                run = run.min(until - pos);
            }
            push_run(&mut out, run, !data);
            pos += run;
        }
        Ok(out)
    }

    /// Whether volume bytes `[offset, offset + len)` were never written on
    /// the disk of any of `plexes`, by their written maps (false without
    /// a bitmap, or where a disk has no written map).
    fn unwritten_on(&self, plexes: &[Arc<EnginePlex>], offset: u64, len: u64) -> bool {
        self.intent
            .get()
            .is_some_and(|i| i.unwritten(plexes, offset, len))
    }

    /// Whether volume bytes `[offset, offset + len)` were never written on
    /// any of `plexes` (their written maps): they read as zeroes.
    pub fn never_written(&self, plexes: &[Arc<EnginePlex>], offset: u64, len: u64) -> bool {
        self.unwritten_on(plexes, offset, len)
    }

    /// Before a resync copies onto `target`: records on its disk's written
    /// map every region an in-sync plex records as written (durably), so
    /// that once in sync it knows all that the volume holds, as its
    /// sources did.
    pub fn cover_written(&self, target: &EnginePlex) -> io::Result<()> {
        let Some(intent) = self.intent.get() else {
            return Ok(());
        };
        let sources: Vec<Arc<EnginePlex>> = self
            .plexes()
            .into_iter()
            .filter(|p| p.mode() == Mode::InSync && p.disk != target.disk)
            .collect();
        intent.cover_written(target, &sources, self.size())
    }

    /// What the write-intent bitmaps say of `[offset, offset + len)`:
    /// extents (bytes, dirty) covering it, dirty where a bit is set on the
    /// disk of any plex (a write went there lately, or a copy still lacks
    /// it: a crash or a resync would copy it); and whether any plex of the
    /// volume is not in sync (being rebuilt, or out of service).
    pub fn sync_state(&self, offset: u64, len: u64) -> io::Result<(Vec<(u64, bool)>, bool)> {
        self.check(offset, len)?;
        let plexes = self.plexes();
        let degraded = plexes.iter().any(|p| p.mode() != Mode::InSync);
        let dirty = match self.intent.get() {
            Some(intent) => intent.dirty(&plexes, offset, len),
            None => Vec::new(),
        };
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, d: bool| push_run(&mut out, n, d);
        let mut pos = offset;
        for r in dirty {
            let (start, end) = (r.start.max(pos), r.end.min(offset + len));
            if start >= end {
                continue;
            }
            push(start - pos, false);
            push(end - start, true);
            pos = end;
        }
        push(offset + len - pos, false);
        Ok((out, degraded))
    }

    /// Whether zeroing (`keep`: keeping the blocks) is cheap on every
    /// writable plex.
    pub fn zeroes_cheaply(&self, keep: bool) -> bool {
        let plexes = self.plexes();
        let mut writable = plexes.iter().filter(|p| p.mode() != Mode::Out).peekable();
        writable.peek().is_some()
            && writable.all(|p| p.queue.disk().is_some_and(|d| d.zeroes_cheaply(keep)))
    }

    /// The range will be read soon: every in-sync plex (any may serve the
    /// reads) is told so.
    pub fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        for p in self.plexes().iter().filter(|p| p.mode() == Mode::InSync) {
            if let Some(d) = p.queue.disk() {
                d.will_need(p.offset + offset, len);
            }
        }
        Ok(())
    }

    /// The in-sync plex to read from: the one whose last read ended at
    /// `offset`, else one of those with the fewest requests pending, in turn;
    /// a write-mostly plex only when no other can. Runs on every read, so
    /// it allocates nothing.
    fn pick_reader(
        &self,
        offset: u64,
        tried: &[(Arc<EnginePlex>, io::Error)],
    ) -> Option<Arc<EnginePlex>> {
        self.pick_reader_among(offset, tried, false)
            .or_else(|| self.pick_reader_among(offset, tried, true))
    }

    /// [`MirrorVolume::pick_reader`] among the plexes that are not
    /// write-mostly, or (`mostly`) among all.
    fn pick_reader_among(
        &self,
        offset: u64,
        tried: &[(Arc<EnginePlex>, io::Error)],
        mostly: bool,
    ) -> Option<Arc<EnginePlex>> {
        let plexes = self.plexes.read().unwrap_or_else(|e| e.into_inner());
        let usable = |p: &&Arc<EnginePlex>| {
            p.mode() == Mode::InSync
                && (mostly || !p.is_write_mostly())
                // Writes behind not landed yet: stale where they go.
                && p.behind() == 0
                && !tried.iter().any(|(t, _)| Arc::ptr_eq(t, p))
        };
        let mut least = usize::MAX;
        let mut ties = 0;
        for p in plexes.iter().filter(usable) {
            // Where its last read ended: a read widened to whole blocks
            // starts up to a block before the end of the one before it.
            let last = p.last_read_end.load(Ordering::Relaxed);
            if last >= offset && last - offset <= crate::format::checksum::DATA_BLOCK {
                return Some(p.clone());
            }
            let load = p.queue.pending();
            if load < least {
                least = load;
                ties = 1;
            } else if load == least {
                ties += 1;
            }
        }
        if ties == 0 {
            return None;
        }
        let turn = self.rotate.fetch_add(1, Ordering::Relaxed) % ties;
        // Loads move under our feet; fall back to the first usable plex.
        plexes
            .iter()
            .filter(usable)
            .filter(|p| p.queue.pending() <= least)
            .nth(turn)
            .or_else(|| plexes.iter().find(usable))
            .cloned()
    }

    fn read_from(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        run: Run,
        mut tried: Vec<(Arc<EnginePlex>, io::Error)>,
        range_held: bool,
        done: Done<AlignedBuf>,
    ) {
        // With the range held by the caller, every write behind to it has
        // landed: a plex with writes behind elsewhere serves it as it is.
        let picked = self
            .pick_reader(offset, &tried)
            .or_else(|| range_held.then(|| self.behind_reader(&tried)).flatten());
        let Some(plex) = picked else {
            if let Some(p) = self.behind_reader(&tried) {
                return self.read_after_behind(offset, len, p, tried, done);
            }
            if let Some((data, repair)) = self.merged_copy(&tried, offset) {
                // Blocking I/O, off the disks' completion threads.
                std::thread::spawn(move || {
                    repair();
                    done(Ok(data));
                });
                return;
            }
            // Copies that failed their checksums, none of them good.
            for (p, e) in &tried {
                if ChecksumMismatch::of(e).is_some() {
                    self.with_sink(|s| s.read_error(&self.name, p.disk, e, false));
                }
            }
            let e = match tried.pop() {
                Some((p, e)) => IoFailure {
                    op: "read",
                    volume: self.name.clone(),
                    disk: Some(p.queue.name().to_string()),
                    offset,
                    what: "failed on every plex",
                    source: e,
                }
                .into_io(),
                None => eio(format!(
                    "volume {} has no in-sync plex to read from",
                    self.name
                )),
            };
            return done(Err(e));
        };
        self.read_plex(plex, offset, len, run, tried, range_held, done);
    }

    /// Reads from `plex` (one [`MirrorVolume::read_from`] picked, or the
    /// one [`MirrorVolume::checksum_failed`] reads again) and checks the
    /// data against its checksums; on an error, or data that does not
    /// match them, the read goes on as `read_from` decides.
    #[allow(clippy::too_many_arguments)]
    fn read_plex(
        self: &Arc<Self>,
        plex: Arc<EnginePlex>,
        offset: u64,
        len: usize,
        run: Run,
        mut tried: Vec<(Arc<EnginePlex>, io::Error)>,
        range_held: bool,
        done: Done<AlignedBuf>,
    ) {
        let this = self.clone();
        let p = plex.clone();
        let deadline = self.in_sync() > 1;
        plex.queue.dispatch(
            run,
            Op::Read {
                offset: plex.offset + offset,
                len,
            },
            deadline,
            Box::new(move |outcome| match outcome {
                Ok(buf) => {
                    let buf = buf.unwrap_or_else(|| AlignedBuf::new(0, 1));
                    if let Some(block) = this.mismatch(&p, offset, &buf) {
                        return this
                            .checksum_failed(offset, len, p, buf, block, tried, range_held, done);
                    }
                    p.last_read_end
                        .store(offset + len as u64, Ordering::Relaxed);
                    if !tried.is_empty() {
                        this.repair_after_read(offset, len, p, tried);
                    }
                    done(Ok(buf));
                }
                Err(e) => {
                    p.read_errors.fetch_add(1, Ordering::Relaxed);
                    tried.push((p, e));
                    // Retries go through the queues: this may be the
                    // watchdog's thread.
                    this.read_from(offset, len, Run::Queued, tried, range_held, done);
                }
            }),
        );
    }

    /// Makes the checksums of the disk of the plex on `disk` durable.
    pub fn persist_sums(&self, disk: Uuid) -> io::Result<()> {
        match (self.intent.get(), self.plex(disk)) {
            (Some(i), Some(p)) => i.persist_sums(&p),
            _ => Ok(()),
        }
    }

    /// The block checksums of `plex` for `n` blocks from block-aligned
    /// volume offset `first` (0: unknown); `None` without any.
    pub fn block_sums(&self, plex: &EnginePlex, first: u64, n: u64) -> Option<Vec<u32>> {
        self.intent.get()?.sums(plex, first, n)
    }

    /// Whether `sums`, the checksums of whole blocks read from `plex` at
    /// block-aligned volume offset `first`, agree with its entries (an
    /// entry not known agrees).
    pub fn agrees_with_sums(&self, plex: &EnginePlex, first: u64, sums: &[u32]) -> bool {
        use crate::format::checksum::UNKNOWN;
        let Some(known) = self
            .intent
            .get()
            .and_then(|i| i.sums(plex, first, sums.len() as u64))
        else {
            return true;
        };
        known.iter().zip(sums).all(|(e, s)| *e == UNKNOWN || e == s)
    }

    /// Records the block checksums a write left on the plex on `disk`
    /// (one the engine did not make: a resync's copy).
    pub fn record_sums(&self, disk: Uuid, sums: &NewSums) {
        if let (Some(i), Some(p)) = (self.intent.get(), self.plex(disk)) {
            i.record_sums(&[p], sums);
        }
    }

    /// The first block of `data`, read from `plex` at volume `offset`,
    /// whose checksum is known and differs; blocks read in part are not
    /// checked.
    fn mismatch(&self, plex: &EnginePlex, offset: u64, data: &[u8]) -> Option<u64> {
        use crate::format::checksum::{DATA_BLOCK, UNKNOWN, sum, whole_blocks};
        let intent = self.intent.get()?;
        let (first, n) = whole_blocks(offset, data.len() as u64);
        if n == 0 {
            return None;
        }
        let sums = intent.sums(plex, first, n)?;
        let skip = (first - offset) as usize;
        sums.iter().enumerate().find_map(|(j, e)| {
            let at = skip + j * DATA_BLOCK as usize;
            (*e != UNKNOWN && sum(&data[at..at + DATA_BLOCK as usize]) != *e)
                .then_some(first + j as u64 * DATA_BLOCK)
        })
    }

    /// A read from `plex` that does not match its checksums. Read again
    /// with the range held (a write racing the read may have changed the
    /// data or its checksum in between); if it still differs the copy is
    /// bad there: the read goes to another plex, which repairs this one
    /// as after a read error ([`MirrorVolume::repair_after_read`]).
    #[allow(clippy::too_many_arguments)]
    fn checksum_failed(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        plex: Arc<EnginePlex>,
        data: AlignedBuf,
        block: u64,
        mut tried: Vec<(Arc<EnginePlex>, io::Error)>,
        range_held: bool,
        done: Done<AlignedBuf>,
    ) {
        if range_held {
            plex.read_errors.fetch_add(1, Ordering::Relaxed);
            let e = ChecksumMismatch {
                disk: plex.queue.name().to_string(),
                offset: block,
                data,
            };
            tried.push((plex, io::Error::new(io::ErrorKind::InvalidData, e)));
            return self.read_from(offset, len, Run::Queued, tried, true, done);
        }
        drop(data);
        let this = self.clone();
        self.lock
            .acquire(offset..offset + len as u64, move |guard| {
                let lock = this.clone();
                let done: Done<AlignedBuf> = Box::new(move |r| {
                    lock.lock.release(guard);
                    done(r);
                });
                this.read_plex(plex, offset, len, Run::Queued, tried, true, done);
            });
    }

    /// Every in-sync plex failed the read, some or all by checksum: the
    /// copies that were read whole (each bad somewhere) are merged block
    /// by block. A block comes from a copy that matches its checksum
    /// there; where none does but every copy read agrees, from them (their
    /// checksums are what is wrong: independent disks do not go bad
    /// alike). Returns the merged data and the repair that writes it back
    /// to every plex that tried and differs from it, to run before the
    /// read answers (the caller holds the range). `None` when some block
    /// has no such copy: nothing can tell which is right.
    #[allow(clippy::type_complexity)]
    fn merged_copy(
        self: &Arc<Self>,
        tried: &[(Arc<EnginePlex>, io::Error)],
        offset: u64,
    ) -> Option<(AlignedBuf, Box<dyn FnOnce() + Send>)> {
        use crate::format::checksum::{DATA_BLOCK, UNKNOWN, sum};
        let copies: Vec<(&Arc<EnginePlex>, &ChecksumMismatch)> = tried
            .iter()
            .filter_map(|(p, e)| Some((p, ChecksumMismatch::of(e)?)))
            .collect();
        let (_, first) = copies.first()?;
        let len = first.data.len();
        let mut out = AlignedBuf::from_slice(&first.data);
        let end = offset + len as u64;
        let mut b = offset / DATA_BLOCK * DATA_BLOCK;
        while b < end {
            let (lo, hi) = (b.max(offset), (b + DATA_BLOCK).min(end));
            let r = (lo - offset) as usize..(hi - offset) as usize;
            let whole = lo == b && hi == b + DATA_BLOCK;
            let good = copies.iter().find(|(p, m)| {
                whole
                    && self
                        .block_sums(p, b, 1)
                        .is_some_and(|e| e[0] != UNKNOWN && sum(&m.data[r.clone()]) == e[0])
            });
            let chosen = match good {
                Some((_, m)) => &m.data,
                None if copies.len() >= 2
                    && copies
                        .iter()
                        .all(|(_, m)| m.data[r.clone()] == first.data[r.clone()]) =>
                {
                    &first.data
                }
                // Unchecked (read in part) and not agreed: the first copy,
                // as a mirror without checksums serves one.
                None if !whole => &first.data,
                None => return None,
            };
            out[r.clone()].copy_from_slice(&chosen[r]);
            b += DATA_BLOCK;
        }
        let merged = Arc::new(AlignedBuf::from_slice(&out));
        // The errors as reported (a mismatch stays one, without its data).
        let reported = |p: &EnginePlex, e: &io::Error| match ChecksumMismatch::of(e) {
            Some(m) => io::Error::new(
                io::ErrorKind::InvalidData,
                ChecksumMismatch {
                    disk: m.disk.clone(),
                    offset: m.offset,
                    data: AlignedBuf::new(0, 1),
                },
            ),
            None => io::Error::new(e.kind(), format!("{} on disk {}", e, p.queue.name())),
        };
        let fix: Vec<(Arc<EnginePlex>, io::Error)> = tried
            .iter()
            .filter(|(_, e)| ChecksumMismatch::of(e).is_none_or(|m| m.data[..] != merged[..]))
            .map(|(p, e)| (p.clone(), reported(p, e)))
            .collect();
        let agreed_errors: Vec<io::Error> = tried
            .iter()
            .filter(|(_, e)| ChecksumMismatch::of(e).is_some_and(|m| m.data[..] == merged[..]))
            .map(|(p, e)| reported(p, e))
            .collect();
        let agreed: Vec<Arc<EnginePlex>> = tried
            .iter()
            .filter(|(_, e)| ChecksumMismatch::of(e).is_some_and(|m| m.data[..] == merged[..]))
            .map(|(p, _)| p.clone())
            .collect();
        // Copies that hold the merged data already: their checksums are
        // what was wrong.
        if let Some(i) = self.intent.get()
            && !agreed.is_empty()
        {
            i.record_sums(&agreed, &NewSums::of_write(offset, &merged));
        }
        tracing::warn!(
            volume = %self.name,
            offset,
            len,
            "no single copy matched its checksums over the whole read: served block by block from the copies that do"
        );
        // Repaired before the read answers, while its range is still held
        // (a write waiting for the range must land after the repair, never
        // under it).
        let this = self.clone();
        let repair = Box::new(move || {
            for (plex, error) in fix {
                // A write since may have failed the plex; a hung one is
                // not waited for again.
                let repaired = plex.mode() == Mode::InSync
                    && error.kind() != io::ErrorKind::TimedOut
                    && this.write_back(&plex, offset, merged.clone()).is_ok();
                this.with_sink(|s| s.read_error(&this.name, plex.disk, &error, repaired));
            }
            for (plex, e) in agreed.iter().zip(&agreed_errors) {
                let repaired = this.persist_sums(plex.disk).is_ok();
                this.with_sink(|s| s.read_error(&this.name, plex.disk, e, repaired));
            }
        });
        Some((out, repair))
    }

    /// An in-sync plex with writes behind, not tried yet: the only kind
    /// left to read from when [`MirrorVolume::pick_reader`] finds none.
    fn behind_reader(&self, tried: &[(Arc<EnginePlex>, io::Error)]) -> Option<Arc<EnginePlex>> {
        self.plexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|p| p.mode() == Mode::InSync && !tried.iter().any(|(t, _)| Arc::ptr_eq(t, p)))
            .cloned()
    }

    /// Reads from `plex`, which has writes behind, once it has every write
    /// to the range: a write behind holds its range until it lands there,
    /// so the read waits for the range (the volume's last copy is on its
    /// way, not lost: the read waits for it rather than fail).
    fn read_after_behind(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        plex: Arc<EnginePlex>,
        tried: Vec<(Arc<EnginePlex>, io::Error)>,
        done: Done<AlignedBuf>,
    ) {
        let this = self.clone();
        self.lock
            .acquire(offset..offset + len as u64, move |guard| {
                // A write behind that failed took the plex out before it
                // let the range go: it lacks that write.
                if plex.mode() != Mode::InSync {
                    this.lock.release(guard);
                    let mut tried = tried;
                    tried.push((
                        plex,
                        eio(
                            "the plex left the volume while the read waited for its writes behind"
                                .into(),
                        ),
                    ));
                    return this.read_from(offset, len, Run::Queued, tried, false, done);
                }
                // Held, the range is the caller's: the read goes the usual
                // way (deadline, fallback, repair), then lets it go.
                let lock = this.clone();
                this.read_from(
                    offset,
                    len,
                    Run::Queued,
                    tried,
                    true,
                    Box::new(move |r| {
                        lock.lock.release(guard);
                        done(r);
                    }),
                );
            });
    }

    /// Rewrites a range that failed to read on some plexes from the plex
    /// `good`, under the range lock, and reads it back; plexes where that
    /// fails, that hung, or that passed `max_read_errors`, are failed.
    fn repair_after_read(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        good: Arc<EnginePlex>,
        bad: Vec<(Arc<EnginePlex>, io::Error)>,
    ) {
        let this = self.clone();
        self.lock
            .acquire(offset..offset + len as u64, move |guard| {
                std::thread::spawn(move || {
                    // `good` served the read, but a write to the range may
                    // have failed it since: then it lacks that write and
                    // must not be copied from. Holding the range, a plex
                    // still in sync has every write to it.
                    let source_ok = good.mode() == Mode::InSync;
                    for (plex, error) in bad {
                        let repaired = source_ok
                            && error.kind() != io::ErrorKind::TimedOut
                            && this.rewrite(&good, &plex, offset, len).is_ok();
                        this.with_sink(|s| s.read_error(&this.name, plex.disk, &error, repaired));
                        if !repaired || plex.read_errors() > this.opts.max_read_errors {
                            let failed = {
                                let _decide = this.decision();
                                this.take_out(&plex)
                            };
                            if failed {
                                this.report(&plex, Verdict::Failed, &error);
                            }
                        }
                    }
                    this.lock.release(guard);
                });
            });
    }

    /// Copies a range from `good` to `bad` and checks it reads back equal.
    fn rewrite(
        &self,
        good: &EnginePlex,
        bad: &EnginePlex,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        // With a deadline: a source that hangs now must not hold the range
        // (and every write to it) forever.
        let data = Arc::new(read_data(wait(|cb| {
            good.queue.submit(
                Op::Read {
                    offset: good.offset + offset,
                    len,
                },
                true,
                cb,
            )
        }))?);
        self.write_back(bad, offset, data)
    }

    /// Writes `data` over volume `offset` of `bad` and checks it reads
    /// back equal; its checksums there become those of `data`.
    fn write_back(&self, bad: &EnginePlex, offset: u64, data: Arc<AlignedBuf>) -> io::Result<()> {
        let len = data.len();
        // A file truncated under the plex must not be grown back by the
        // repair, with holes that read as zeroes where its data was.
        wait(|cb| bad.queue.submit(Op::Check, true, cb))?;
        wait(|cb| {
            bad.queue.submit(
                Op::Write {
                    offset: bad.offset + offset,
                    data: data.clone(),
                    fua: true,
                },
                true,
                cb,
            )
        })?;
        let back = wait(|cb| {
            bad.queue.submit(
                Op::Read {
                    offset: bad.offset + offset,
                    len,
                },
                true,
                cb,
            )
        })?;
        if back.as_deref() != Some(&data[..]) {
            return Err(eio(format!(
                "disk {} read back other data than was rewritten at offset {offset}",
                bad.queue.name()
            )));
        }
        // The copy is good now, and so are its checksums (a damaged
        // checksum block is mended this way too), durably: a clean region
        // has no bit that would keep them untrusted.
        if let (Some(i), Some(plex)) = (self.intent.get(), self.plex(bad.disk)) {
            i.record_sums(
                std::slice::from_ref(&plex),
                &NewSums::of_write(offset, &data),
            );
            i.persist_sums(&plex)?;
        }
        Ok(())
    }

    // ---- blocking wrappers: one part of the I/O runs on the calling thread ----

    pub fn write(self: &Arc<Self>, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_with(offset, data, false)
    }

    pub fn write_fua(self: &Arc<Self>, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_with(offset, data, true)
    }

    fn write_with(self: &Arc<Self>, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let data = Arc::new(AlignedBuf::from_slice(data));
        wait_here(|cb| {
            self.submit_write(
                offset,
                data,
                fua,
                Run::Here,
                Box::new(move |r| cb(r.map(|()| None))),
            )
        })
        .map(|_| ())
    }

    pub fn read(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let got = wait_here(|cb| {
            self.submit_read(
                offset,
                buf.len(),
                Run::Here,
                Box::new(move |r| cb(r.map(Some))),
            )
        })?;
        buf.copy_from_slice(got.as_deref().unwrap_or_default());
        Ok(())
    }

    pub fn flush(self: &Arc<Self>) -> io::Result<()> {
        wait_here(|cb| self.submit_flush(Run::Here, Box::new(move |r| cb(r.map(|()| None)))))
            .map(|_| ())
    }

    pub fn write_zeroes(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<()> {
        wait_here(|cb| {
            self.submit_write_zeroes(
                offset,
                len,
                false,
                false,
                Run::Here,
                Box::new(move |r| cb(r.map(|()| None))),
            )
        })
        .map(|_| ())
    }
}

/// A range held in a volume's range lock; released when dropped.
pub struct RangeHold {
    volume: Arc<MirrorVolume>,
    guard: Option<super::range_lock::RangeGuard>,
}

impl Drop for RangeHold {
    fn drop(&mut self) {
        if let Some(g) = self.guard.take() {
            self.volume.lock.release(g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Disk, FaultyDisk, MemDisk};
    use std::time::{Duration, Instant};

    /// Records what the engine reports.
    #[derive(Default)]
    struct Record {
        /// Answer that no disk took the config (every commit failed).
        cannot_record: std::sync::atomic::AtomicBool,
        failed: Mutex<Vec<Uuid>>,
        last: Mutex<Vec<Uuid>>,
        read_errors: Mutex<Vec<(Uuid, bool)>>,
    }

    impl FailureSink for Record {
        fn plex_failed(&self, _: &str, disk: Uuid, _: &io::Error) -> bool {
            self.failed.lock().unwrap().push(disk);
            !self.cannot_record.load(Ordering::SeqCst)
        }
        fn last_copy_failed(&self, _: &str, disk: Uuid, _: &io::Error) {
            self.last.lock().unwrap().push(disk);
        }
        fn read_error(&self, _: &str, disk: Uuid, _: &io::Error, repaired: bool) {
            self.read_errors.lock().unwrap().push((disk, repaired));
        }
    }

    const SIZE: u64 = 4 << 20;

    struct Rig {
        vol: Arc<MirrorVolume>,
        disks: Vec<Arc<FaultyDisk>>,
        record: Arc<Record>,
        _sink: Arc<dyn FailureSink>,
    }

    fn rig(copies: usize, opts: EngineOptions) -> Rig {
        rig_timing_out(copies, opts, crate::volume::queue::DEFAULT_IO_TIMEOUT)
    }

    fn rig_timing_out(copies: usize, opts: EngineOptions, timeout: Duration) -> Rig {
        let record = Arc::new(Record::default());
        let sink: Arc<dyn FailureSink> = record.clone();
        let mut disks = Vec::new();
        let mut plexes = Vec::new();
        for i in 0..copies {
            let d = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(SIZE + (1 << 20)))));
            let q = DiskQueue::start(&format!("d{i}"), d.clone(), 4, timeout);
            // Each plex at its own offset, as on real disks.
            plexes.push(EnginePlex::new(
                Uuid::new_v4(),
                q,
                (i as u64) * 4096,
                Mode::InSync,
            ));
            disks.push(d);
        }
        let vol = MirrorVolume::new("v", SIZE, plexes, Arc::downgrade(&sink), opts);
        Rig {
            vol,
            disks,
            record,
            _sink: sink,
        }
    }

    fn plex_bytes(r: &Rig, i: usize) -> Vec<u8> {
        let mut buf = vec![0; SIZE as usize];
        r.disks[i].read_at(&mut buf, i as u64 * 4096).unwrap();
        buf
    }

    /// A write-intent stand-in that counts the writes marked and not over.
    struct Marks(Arc<AtomicUsize>);

    struct Unmark(Arc<AtomicUsize>);

    impl Drop for Unmark {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl WriteIntent for Marks {
        fn mark(&self, _: &[Arc<EnginePlex>], _: u64, _: u64) -> io::Result<IntentGuard> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(IntentGuard::new(Unmark(self.0.clone())))
        }
    }

    /// The read that waited for a write behind whose landing failed does
    /// not read the plex that lacks it: it fails, rather than return the
    /// data from before an answered write.
    #[test]
    fn a_read_waiting_for_a_write_behind_that_fails_does_not_return_old_data() {
        let r = rig(2, EngineOptions::default());
        r.vol
            .set_intent(Arc::new(Marks(Arc::new(AtomicUsize::new(0)))));
        let far = r.vol.plexes()[1].clone();
        far.set_write_mostly(true);
        far.set_write_behind(4);
        r.disks[1].hang();
        r.vol.write(0, &[7u8; 4096]).unwrap();
        assert_eq!(far.behind(), 1);
        r.vol.plexes()[0].set_mode(Mode::Out);
        let (tx, rx) = std::sync::mpsc::channel();
        let vol = r.vol.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            tx.send(vol.read(0, &mut buf).map(|_| buf)).unwrap()
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "it waits"
        );
        r.disks[1].fail_writes(0..SIZE * 4);
        r.disks[1].release();
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(got.is_err(), "old data returned: {:?}", got.map(|b| b[0]));
    }

    /// A resync holds its range and reads: a plex with writes behind
    /// elsewhere serves it at once (its writes to the range have landed),
    /// rather than wait for the range the caller holds.
    #[test]
    fn a_read_for_a_resync_holding_its_range_reads_a_plex_with_writes_behind_elsewhere() {
        let r = rig(2, EngineOptions::default());
        r.vol
            .set_intent(Arc::new(Marks(Arc::new(AtomicUsize::new(0)))));
        let far = r.vol.plexes()[1].clone();
        far.set_write_mostly(true);
        far.set_write_behind(4);
        r.vol.write(0, &[5u8; 4096]).unwrap();
        let start = Instant::now();
        while far.behind() > 0 {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        // Behind elsewhere: a write to 64 KiB hangs on the far disk.
        r.disks[1].hang();
        r.vol.write(1 << 16, &[6u8; 4096]).unwrap();
        assert_eq!(far.behind(), 1);
        r.vol.plexes()[0].set_mode(Mode::Out);
        let hold = r.vol.hold_range(0..4096);
        let (tx, rx) = std::sync::mpsc::channel();
        let vol = r.vol.clone();
        std::thread::spawn(move || tx.send(vol.read_for_resync(0, 4096).map(|b| b[0])).unwrap());
        // The hung disk holds reads too: let it go once the read is under
        // way (waiting for the range it would never get, before the fix).
        std::thread::sleep(Duration::from_millis(100));
        r.disks[1].release();
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no deadlock");
        assert_eq!(got.unwrap(), 5);
        drop(hold);
    }

    #[test]
    fn a_write_behind_is_answered_first_and_holds_its_range_and_reads_until_it_lands() {
        let r = rig(2, EngineOptions::default());
        let marked = Arc::new(AtomicUsize::new(0));
        r.vol.set_intent(Arc::new(Marks(marked.clone())));
        let far = r.vol.plexes()[1].clone();
        far.set_write_mostly(true);
        far.set_write_behind(4);
        r.disks[1].hang();
        // Answered with the far disk hung: the near plex has it.
        r.vol.write(0, &[7u8; 4096]).unwrap();
        assert_eq!(far.behind(), 1);
        assert_eq!(marked.load(Ordering::SeqCst), 1, "its bits stay set");
        assert_eq!(plex_bytes(&r, 0)[..4096], [7u8; 4096]);
        // With the near plex out, the far one serves the read once the
        // write behind has landed there: not before (old data), and not
        // an error (the data is on its way).
        let near = r.vol.plexes()[0].clone();
        near.set_mode(Mode::Out);
        let (tx, rx) = std::sync::mpsc::channel();
        let vol = r.vol.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            tx.send(vol.read(0, &mut buf).map(|_| buf)).unwrap()
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the read waits for the write behind"
        );
        r.disks[1].release();
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert!(
            got == [7u8; 4096],
            "the write behind, read from the far plex"
        );
        near.set_mode(Mode::InSync);
        let start = Instant::now();
        while far.behind() > 0 {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        r.disks[1].hang();
        r.vol.write(0, &[7u8; 4096]).unwrap();
        assert_eq!(far.behind(), 1);
        // An overlapping write waits for the one behind to land.
        let (tx, rx) = std::sync::mpsc::channel();
        let vol = r.vol.clone();
        std::thread::spawn(move || tx.send(vol.write(0, &[8u8; 4096])).unwrap());
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "it waits"
        );
        r.disks[1].release();
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        let start = Instant::now();
        while far.behind() > 0 {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            marked.load(Ordering::SeqCst),
            0,
            "landed: the bits may clear"
        );
        // Both writes reached both plexes, in order.
        assert_eq!(plex_bytes(&r, 1)[..4096], [8u8; 4096]);
        assert_eq!(plex_bytes(&r, 0)[..4096], [8u8; 4096]);
        // The backlog is bounded: with the far disk hung, the fifth write
        // waits for it as if nothing were behind.
        r.disks[1].hang();
        for i in 0..4u64 {
            r.vol.write((i + 1) << 16, &[9u8; 4096]).unwrap();
        }
        assert_eq!(far.behind(), 4);
        let (tx, rx) = std::sync::mpsc::channel();
        let vol = r.vol.clone();
        std::thread::spawn(move || tx.send(vol.write(1 << 20, &[9u8; 4096])).unwrap());
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the fifth waits"
        );
        r.disks[1].release();
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert!(r.record.failed.lock().unwrap().is_empty());
    }

    #[test]
    fn overlapping_concurrent_writes_leave_the_plexes_identical() {
        let r = rig(3, EngineOptions::default());
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let vol = r.vol.clone();
                s.spawn(move || {
                    let mut x = t + 1;
                    for _ in 0..200 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        // Overlapping ranges inside the first 64 KiB.
                        let off = (x >> 33) % 60 * 1024 / 512 * 512;
                        let len = ((x >> 20) % 8 + 1) as usize * 512;
                        let data = vec![(x >> 56) as u8; len];
                        if x & 1 == 0 {
                            vol.write(off, &data).unwrap();
                        } else {
                            let (tx, rx) = std::sync::mpsc::channel();
                            vol.submit_write(
                                off,
                                Arc::new(AlignedBuf::from_slice(&data)),
                                false,
                                Run::Queued,
                                Box::new(move |r| tx.send(r).unwrap()),
                            );
                            rx.recv().unwrap().unwrap();
                        }
                    }
                });
            }
        });
        let a = plex_bytes(&r, 0);
        assert_eq!(a, plex_bytes(&r, 1));
        assert_eq!(a, plex_bytes(&r, 2));
    }

    #[test]
    fn a_failed_write_fails_that_plex_and_the_write_succeeds() {
        let r = rig(2, EngineOptions::default());
        r.disks[1].fail_writes(0..SIZE + (1 << 20));
        r.vol.write(8192, &[1u8; 4096]).unwrap();
        assert_eq!(r.vol.plexes()[1].mode(), Mode::Out);
        assert_eq!(r.vol.plexes()[0].mode(), Mode::InSync);
        assert_eq!(r.record.failed.lock().unwrap().len(), 1);
        // Later writes go to the survivor only, without errors.
        r.vol.write(0, &[2u8; 4096]).unwrap();
        let mut got = vec![0; 4096];
        r.vol.read(0, &mut got).unwrap();
        assert_eq!(got, vec![2u8; 4096]);
    }

    #[test]
    fn a_write_is_not_acknowledged_when_the_failed_plex_cannot_be_recorded() {
        let r = rig(2, EngineOptions::default());
        r.record.cannot_record.store(true, Ordering::SeqCst);
        r.disks[1].fail_writes(0..SIZE + (1 << 20));
        assert!(r.vol.write(8192, &[1u8; 4096]).is_err());
        assert_eq!(r.vol.plexes()[1].mode(), Mode::Out);
    }

    #[test]
    fn when_every_plex_fails_a_write_the_last_is_kept_and_the_caller_gets_the_error() {
        let r = rig(2, EngineOptions::default());
        for d in &r.disks {
            d.fail_writes(0..SIZE + (1 << 20));
        }
        assert!(r.vol.write(0, &[1u8; 4096]).is_err());
        assert_eq!(r.record.failed.lock().unwrap().len(), 1);
        assert_eq!(r.record.last.lock().unwrap().len(), 1);
        assert_ne!(
            r.record.failed.lock().unwrap()[0],
            r.record.last.lock().unwrap()[0]
        );
        assert!(
            r.vol.write(0, &[1u8; 4096]).is_err(),
            "a failed volume takes no writes"
        );
    }

    #[test]
    fn a_read_error_is_served_from_another_plex_and_repaired() {
        let r = rig(2, EngineOptions::default());
        r.vol.write(0, &[7u8; 65536]).unwrap();
        // Corrupt plex 0's copy, then make its reads fail there.
        r.disks[0].write_at(&[0u8; 4096], 0).unwrap();
        r.disks[0].bad_sectors(0..4096);
        for _ in 0..4 {
            let mut got = vec![0; 4096];
            r.vol.read(0, &mut got).unwrap();
            assert_eq!(got, vec![7u8; 4096]);
        }
        // The repair runs in the background, under the range lock.
        let start = Instant::now();
        while r.record.read_errors.lock().unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        while r.vol.lock.busy() > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&plex_bytes(&r, 0)[..4096], &[7u8; 4096][..]);
        assert_eq!(r.vol.plexes()[0].mode(), Mode::InSync);
        assert!(
            r.record
                .read_errors
                .lock()
                .unwrap()
                .iter()
                .all(|(_, repaired)| *repaired)
        );
    }

    #[test]
    fn too_many_read_errors_fail_the_plex() {
        let opts = EngineOptions { max_read_errors: 2 };
        let r = rig(2, opts);
        r.disks[0].fail_reads(0..SIZE + (1 << 20));
        let mut got = vec![0; 4096];
        let start = Instant::now();
        while r.vol.plexes()[0].mode() != Mode::Out {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "plex 0 never failed"
            );
            r.vol.read(0, &mut got).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(!r.record.failed.lock().unwrap().is_empty());
    }

    #[test]
    fn a_hung_disk_is_failed_and_writes_go_on() {
        let r = rig_timing_out(2, EngineOptions::default(), Duration::from_millis(100));
        r.disks[1].hang();
        let start = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        r.vol.submit_write(
            0,
            Arc::new(AlignedBuf::from_slice(&[5u8; 4096])),
            false,
            Run::Queued,
            Box::new(move |r| tx.send(r).unwrap()),
        );
        rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(r.vol.plexes()[1].mode(), Mode::Out);
        r.vol.write(4096, &[6u8; 4096]).unwrap();
        r.disks[1].release();
    }

    /// Reads that do not start on a block are widened to whole blocks (to
    /// be checked against their checksums): a sequential stream of them
    /// still stays on one plex.
    #[test]
    fn sequential_reads_off_the_block_grid_stay_on_one_plex() {
        let r = rig(2, EngineOptions::default());
        r.vol
            .set_intent(Arc::new(Marks(Arc::new(AtomicUsize::new(0)))));
        let reads = reads_of(&r, |vol| {
            let mut buf = vec![0; 4096];
            for i in 0..32 {
                vol.read(512 + i * 4096, &mut buf).unwrap();
            }
        });
        assert!(reads.contains(&32) && reads.contains(&0), "{reads:?}");
    }

    /// The reads each disk of `r` served while `f` ran.
    fn reads_of(r: &Rig, f: impl FnOnce(&Arc<MirrorVolume>)) -> Vec<u64> {
        let before: Vec<u64> = r.disks.iter().map(|d| d.reads()).collect();
        f(&r.vol);
        r.disks
            .iter()
            .zip(&before)
            .map(|(d, b)| d.reads() - b)
            .collect()
    }

    #[test]
    fn sequential_reads_stay_on_one_plex() {
        let r = rig(2, EngineOptions::default());
        let reads = reads_of(&r, |vol| {
            let mut buf = vec![0; 4096];
            for i in 0..64 {
                vol.read(i * 4096, &mut buf).unwrap();
            }
        });
        assert!(reads.contains(&64) && reads.contains(&0), "{reads:?}");
    }
}
