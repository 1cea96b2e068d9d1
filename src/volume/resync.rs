//! Resync: copying a volume onto one of its plexes while the volume serves
//! I/O.
//!
//! The target plex is write-only in the engine, so it takes every
//! foreground write from the moment the resync starts. The resync walks the
//! volume ranges it is given in LBA order, one chunk at a time; each chunk is
//! read from the in-sync plexes (with the engine's fallback and repair) and
//! written to the target while the chunk's range is held in the engine's
//! range lock. No foreground write to the chunk is in flight meanwhile, so
//! the copy never puts older data over a newer write, below the position or
//! above it.
//!
//! Throttling follows md: below `min_rate` the resync always proceeds;
//! between `min_rate` and `max_rate` it backs off to `min_rate` while
//! foreground requests arrive. The caller gets a checkpoint (the position
//! below which the target holds the volume, after a flush of the target)
//! every few seconds, and records it so a restart resumes there.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::engine::{EnginePlex, MirrorVolume, Mode, NewSums};
use super::queue::{Op, Outcome, wait};
use crate::disk::AlignedBuf;

/// How a resync paces itself.
#[derive(Debug, Clone)]
pub struct ResyncOptions {
    /// Bytes/s the resync keeps up even while foreground I/O goes on (0: it
    /// pauses between chunks only as `max_rate` asks). md's
    /// `speed_limit_min` is 1000 KiB/s; the default here is 1 MiB/s.
    pub min_rate: u64,
    /// Bytes/s the resync never exceeds (0: unlimited, the default: with no
    /// foreground I/O the copy runs at disk speed). md's `speed_limit_max`
    /// is 200000 KiB/s, a bound from the days of slower disks.
    pub max_rate: u64,
    /// Bytes per chunk while foreground I/O goes on: a foreground write to
    /// the chunk waits for at most this much copying.
    pub busy_chunk: usize,
    /// Bytes per chunk while the volume is idle: fewer, larger requests.
    pub idle_chunk: usize,
    /// Foreground I/O within this window counts as "going on".
    pub busy_window: Duration,
    /// How often a checkpoint is taken.
    pub checkpoint_every: Duration,
}

impl Default for ResyncOptions {
    fn default() -> ResyncOptions {
        ResyncOptions {
            min_rate: 1 << 20,
            max_rate: 0,
            busy_chunk: 1 << 20,
            idle_chunk: 4 << 20,
            busy_window: Duration::from_millis(100),
            checkpoint_every: Duration::from_secs(5),
        }
    }
}

impl ResyncOptions {
    /// A resync that nothing holds back (a command in the foreground).
    pub fn unthrottled() -> ResyncOptions {
        ResyncOptions {
            min_rate: 0,
            max_rate: 0,
            ..ResyncOptions::default()
        }
    }
}

/// A resync's progress, shared with whoever shows it (status, a progress
/// bar) and with whoever may stop it.
#[derive(Debug, Default)]
pub struct ResyncProgress {
    /// Bytes the whole resync covers, including what an earlier, interrupted
    /// run already copied.
    total: AtomicU64,
    /// Bytes done out of `total`.
    done: AtomicU64,
    /// The volume offset below which the target holds the volume.
    position: AtomicU64,
    /// Bytes/s, a moving average.
    rate: AtomicU64,
    stop: AtomicBool,
    /// Bytes/s the admin set for this resync (`resync NAME --rate`),
    /// instead of the pacing options; 0: none set.
    limit: AtomicU64,
    /// Bytes of `done` given to the target as zeroes without being read
    /// (never written, or a hole on every in-sync plex).
    zeroed: AtomicU64,
}

impl ResyncProgress {
    /// A resync of `total` bytes of which `done` were copied by an earlier run.
    pub fn new(total: u64, done: u64) -> Arc<ResyncProgress> {
        let p = ResyncProgress::default();
        p.reset(total, done);
        Arc::new(p)
    }

    /// Starts over with a new plan.
    pub fn reset(&self, total: u64, done: u64) {
        self.zeroed.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done.min(total), Ordering::Relaxed);
        self.rate.store(0, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Relaxed)
    }

    /// Bytes given as zeroes without a read (see the field).
    pub fn zeroed(&self) -> u64 {
        self.zeroed.load(Ordering::Relaxed)
    }

    /// Bytes/s, averaged over the last seconds; 0 before the first second.
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn percent(&self) -> f64 {
        match self.total() {
            0 => 100.0,
            t => (self.done() as f64 * 100.0 / t as f64).min(100.0),
        }
    }

    /// Seconds left at the current rate; `None` before a rate is known.
    pub fn eta_seconds(&self) -> Option<u64> {
        let rate = self.rate();
        (rate > 0).then(|| self.total().saturating_sub(self.done()).div_ceil(rate))
    }

    /// Asks the resync to stop after its current chunk (with a checkpoint).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Paces the copy at `rate` bytes/s whether or not clients are busy
    /// (0: by the options again); taken at the next chunk.
    pub fn set_limit(&self, rate: u64) {
        self.limit.store(rate, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("reading the volume failed at offset {offset}: {error}")]
    Source { offset: u64, error: io::Error },
    #[error("writing the plex being resynced failed at volume offset {offset}: {error}")]
    Target { offset: u64, error: io::Error },
    #[error("the resync was stopped at volume offset {position}")]
    Stopped { position: u64 },
    #[error("recording the resync checkpoint at volume offset {position} failed: {error}")]
    Checkpoint { position: u64, error: io::Error },
}

/// Tells a busy volume from an idle one by sampling its foreground counter.
struct Activity<'a> {
    volume: &'a MirrorVolume,
    seen: u64,
    last: Option<Instant>,
    window: Duration,
}

impl Activity<'_> {
    fn busy(&mut self) -> bool {
        let now = self.volume.foreground_requests();
        if now != self.seen {
            self.seen = now;
            self.last = Some(Instant::now());
        }
        self.last.is_some_and(|t| t.elapsed() < self.window)
    }
}

/// Resyncs the plex on `target` (write-only in `volume`) over `ranges`
/// (sorted, disjoint volume ranges), in LBA order. `checkpoint` gets, every
/// `opts.checkpoint_every` and when stopped, a position below which every
/// range is copied and durable on the target. `progress` counts the bytes of
/// `ranges` as they are done; `on_chunk` runs after each chunk (a progress
/// bar). Returns the bytes copied.
pub fn resync(
    volume: &Arc<MirrorVolume>,
    target: &Arc<EnginePlex>,
    ranges: &[Range<u64>],
    opts: &ResyncOptions,
    progress: &ResyncProgress,
    checkpoint: &mut dyn FnMut(u64) -> io::Result<()>,
    on_chunk: &dyn Fn(&ResyncProgress),
) -> Result<u64, ResyncError> {
    // The target's written map first: once in sync, it records all that
    // its sources do (a copy whose map lacked a region would give a later
    // rebuild from it zeroes there).
    volume
        .cover_written(target)
        .map_err(|error| ResyncError::Target {
            offset: ranges.first().map_or(0, |r| r.start),
            error,
        })?;
    let mut activity = Activity {
        volume,
        seen: volume.foreground_requests(),
        last: None,
        window: opts.busy_window,
    };
    let mut copied = 0u64;
    let mut last_checkpoint = Instant::now();
    // Pacing: the time before which the next chunk may not start.
    let mut next = Instant::now();
    let mut meter = (Instant::now(), 0u64);
    let mut pos = ranges.first().map_or(0, |r| r.start);
    progress.position.store(pos, Ordering::Relaxed);
    // The write of the previous chunk, still in flight while this one is
    // read: the copy keeps the source and the target busy at once.
    let mut inflight: Option<Inflight> = None;
    let mut pool = Pool::default();
    for r in ranges {
        pos = pos.max(r.start);
        while pos < r.end {
            if progress.stopping() {
                settle(&mut inflight, progress, &mut pool)?;
                flush_target(volume, target, pos)?;
                checkpoint(pos).map_err(|error| ResyncError::Checkpoint {
                    position: pos,
                    error,
                })?;
                return Err(ResyncError::Stopped { position: pos });
            }
            let busy = activity.busy();
            let chunk = if busy {
                opts.busy_chunk
            } else {
                opts.idle_chunk
            } as u64;
            let n = (r.end - pos).min(chunk);
            let started = Instant::now();
            let most = (r.end - pos).min(ZERO_RUN);
            let chunk = match start_chunk(volume, target, pos, n as usize, most, &mut pool) {
                Ok(c) => c,
                Err(e) => {
                    let _ = settle(&mut inflight, progress, &mut pool);
                    return Err(e);
                }
            };
            settle(&mut inflight, progress, &mut pool)?;
            // A run given as zeroes may be longer than a chunk, and is not
            // paced: the rate is what the copy reads and writes.
            let (n, paced) = (chunk.end - chunk.start, chunk.buf.is_some());
            inflight = Some(chunk);
            pos += n;
            copied += n;
            if paced {
                meter.1 += n;
            }
            let span = meter.0.elapsed();
            if span >= Duration::from_millis(500) {
                let now_rate = (meter.1 as f64 / span.as_secs_f64()) as u64;
                let old = progress.rate();
                let avg = if old == 0 {
                    now_rate
                } else {
                    (old * 7 + now_rate * 3) / 10
                };
                progress.rate.store(avg.max(1), Ordering::Relaxed);
                meter = (Instant::now(), 0);
            }
            on_chunk(progress);
            // Pace: this chunk may take n/rate of time, at the rate the
            // volume's activity allows now; re-decided while waiting, so a
            // volume that turns idle speeds the resync up at once.
            let base = next.max(started);
            if paced {
                loop {
                    let rate = match progress.limit() {
                        0 if activity.busy() && opts.min_rate > 0 => opts.min_rate,
                        0 => opts.max_rate,
                        set => set,
                    };
                    if rate == 0 {
                        next = Instant::now();
                        break;
                    }
                    next = base + Duration::from_secs_f64(n as f64 / rate as f64);
                    let now = Instant::now();
                    if now >= next || progress.stopping() {
                        break;
                    }
                    std::thread::sleep((next - now).min(Duration::from_millis(20)));
                }
            }
            if last_checkpoint.elapsed() >= opts.checkpoint_every {
                settle(&mut inflight, progress, &mut pool)?;
                flush_target(volume, target, pos)?;
                checkpoint(pos).map_err(|error| ResyncError::Checkpoint {
                    position: pos,
                    error,
                })?;
                last_checkpoint = Instant::now();
            }
        }
    }
    settle(&mut inflight, progress, &mut pool)?;
    flush_target(volume, target, pos)?;
    Ok(copied)
}

/// The most a resync gives as zeroes in one request (and holds in the
/// range lock meanwhile): a hole punched or BLKZEROOUT of it is quick.
const ZERO_RUN: u64 = 64 << 20;

/// A chunk's write to the target, in flight.
struct Inflight {
    write: std::sync::mpsc::Receiver<Outcome>,
    /// The data read (none for a hole).
    buf: Option<Arc<AlignedBuf>>,
    start: u64,
    end: u64,
}

/// What a resync keeps from one chunk to the next.
#[derive(Default)]
struct Pool {
    /// Buffers used again and again (a fresh 4 MiB buffer per chunk costs
    /// a thousand page faults, a quarter of the copy's time on this
    /// project's VMs); one is free again once its write has dropped it.
    bufs: Vec<Arc<AlignedBuf>>,
    /// The source's checksums are loaded up to this volume offset.
    sums_until: u64,
    /// Some in-sync plex holds data (not a hole) up to this volume offset:
    /// no need to ask again there (data stays data, or becomes a hole that
    /// reads as zeroes: either way reading it is right).
    data_until: u64,
}

impl Pool {
    /// A free buffer of at least `n` bytes.
    fn take(&mut self, n: usize) -> AlignedBuf {
        if let Some(i) = self
            .bufs
            .iter()
            .position(|b| Arc::strong_count(b) == 1 && b.capacity() >= n)
            && let Ok(b) = Arc::try_unwrap(self.bufs.swap_remove(i))
        {
            return b;
        }
        AlignedBuf::new(n, crate::disk::buf::IO_ALIGN)
    }
}

/// Waits for the chunk in flight, if any, counts it done, and gives its
/// buffer back to `pool`.
fn settle(
    inflight: &mut Option<Inflight>,
    progress: &ResyncProgress,
    pool: &mut Pool,
) -> Result<(), ResyncError> {
    let Some(f) = inflight.take() else {
        return Ok(());
    };
    f.write
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the request was dropped")))
        .map_err(|error| ResyncError::Target {
            offset: f.start,
            error,
        })?;
    progress.done.fetch_add(f.end - f.start, Ordering::Relaxed);
    if f.buf.is_none() {
        progress
            .zeroed
            .fetch_add(f.end - f.start, Ordering::Relaxed);
    }
    progress.position.store(f.end, Ordering::Relaxed);
    // The queue may hold its clone a moment longer: taken again once free.
    if let Some(b) = f.buf
        && pool.bufs.len() < 4
    {
        pool.bufs.push(b);
    }
    Ok(())
}

/// Takes a chunk's range in the range lock, reads it from an in-sync plex
/// and submits its write to the target; the range is released when that
/// write completes. No foreground write to the chunk runs in between, so the
/// copy never puts older data over a newer write.
///
/// The read goes to the first in-sync plex's disk queue, under the hang
/// watchdog, into a buffer of `pool`; on an error the engine reads
/// instead, with its fallback to another plex and repair of the one that
/// failed. A source that hangs costs the watchdog's timeout, never a range
/// held for good.
fn start_chunk(
    volume: &Arc<MirrorVolume>,
    target: &EnginePlex,
    pos: u64,
    n: usize,
    most: u64,
    pool: &mut Pool,
) -> Result<Inflight, ResyncError> {
    // Where no in-sync plex holds data (never written, by the written
    // maps; or a hole on every one: a sparse file's, an NBD export's block
    // status), the volume reads as zeroes: the target gets them without
    // the source being read, up to `most` bytes at once. Decided again
    // with the range held, so no write lands there in between.
    let hole_from = |len: u64| match volume.allocation_asking_exports(pos, len).as_deref() {
        Ok([(bytes, true), ..]) => *bytes,
        _ => 0,
    };
    let run = if pos + n as u64 <= pool.data_until {
        n as u64
    } else {
        match volume.allocation_asking_exports(pos, most).as_deref() {
            Ok([(bytes, true), ..]) if *bytes >= n as u64 => *bytes.min(&most),
            Ok([(bytes, false), ..]) => {
                pool.data_until = pos + bytes;
                n as u64
            }
            _ => n as u64,
        }
    };
    // A hole seen: decided again below with the range held.
    let hole = run > n as u64 || pos + n as u64 > pool.data_until;
    let mut hold = volume.hold_range(pos..pos + run);
    if target.mode() != Mode::WriteOnly {
        return Err(ResyncError::Target {
            offset: pos,
            error: io::Error::other("the plex left service during the resync"),
        });
    }
    if hole && hole_from(run) >= run {
        volume.record_sums(target.disk, &NewSums::Zeroes(pos, run));
        return Ok(submit_write(
            target,
            Op::WriteZeroes {
                offset: target.offset + pos,
                len: run,
                fua: false,
                keep: false,
            },
            None,
            hold,
            pos..pos + run,
        ));
    }
    if run > n as u64 {
        drop(hold);
        hold = volume.hold_range(pos..pos + n as u64);
    }
    let buf = pool.take(n);
    let in_sync: Vec<Arc<EnginePlex>> = volume
        .plexes()
        .into_iter()
        .filter(|p| p.mode() == Mode::InSync)
        .collect();
    // The source's checksums ahead, in one read: loaded a block (4 MiB of
    // data) at a time, each a seek to the end of the disk, they cost a
    // cold copy more than its data.
    if let Some(p) = in_sync.first()
        && pos >= pool.sums_until
    {
        use crate::format::checksum::DATA_BLOCK;
        let from = pos / DATA_BLOCK * DATA_BLOCK;
        let _ = volume.block_sums(p, from, most.max(n as u64).div_ceil(DATA_BLOCK));
        pool.sums_until = from + most.max(n as u64);
    }
    let direct = in_sync
        .first()
        .map(|p| p.queue.read_into(p.offset + pos, n, buf, true));
    // The checksums of the whole blocks read, computed once: checked
    // against the source's entries, and the target's entries once written.
    let mut sums = None;
    let buf = match direct {
        Some(Ok(buf)) => {
            let hashed =
                super::sums::enabled().then(|| crate::format::checksum::sums_of(pos, &buf[..n]));
            let good = hashed
                .as_ref()
                .is_none_or(|(first, v)| volume.agrees_with_sums(&in_sync[0], *first, v));
            if good {
                sums = hashed;
                buf
            } else {
                // A copy that does not match its checksums is read the
                // engine's way instead: from another plex, and this one
                // repaired.
                volume
                    .read_for_resync(pos, n)
                    .map_err(|error| ResyncError::Source { offset: pos, error })?
            }
        }
        // The only copy hangs: nothing to fall back on, and the range must
        // not stay held.
        Some(Err(error)) if error.kind() == io::ErrorKind::TimedOut && in_sync.len() < 2 => {
            return Err(ResyncError::Source { offset: pos, error });
        }
        // A hung disk is failed, as the engine fails one that times out.
        Some(Err(error)) if error.kind() == io::ErrorKind::TimedOut => {
            volume.fail_plex(in_sync[0].disk, &error);
            volume
                .read_for_resync(pos, n)
                .map_err(|error| ResyncError::Source { offset: pos, error })?
        }
        // The engine reads instead: another plex, and repair of this one.
        _ => volume
            .read_for_resync(pos, n)
            .map_err(|error| ResyncError::Source { offset: pos, error })?,
    };
    // The target's checksums are those of what it gets, set before its
    // write lands (the range is held: nothing reads it meanwhile).
    if super::sums::enabled() {
        use crate::format::checksum::DATA_BLOCK;
        let new = match sums {
            // The chunk is whole blocks (it is, but at a volume's end).
            Some((first, v)) if first == pos && v.len() as u64 * DATA_BLOCK == n as u64 => {
                NewSums::Each(pos, v)
            }
            _ => NewSums::of_write(pos, &buf[..n]),
        };
        volume.record_sums(target.disk, &new);
    }
    // Zeroes cost no data transfer (a hole in a file, BLKZEROOUT).
    let buf = Arc::new(buf);
    let op = if buf.iter().all(|&b| b == 0) {
        Op::WriteZeroes {
            offset: target.offset + pos,
            len: n as u64,
            fua: false,
            keep: false,
        }
    } else {
        Op::Write {
            offset: target.offset + pos,
            data: buf.clone(),
            fua: false,
        }
    };
    Ok(submit_write(
        target,
        op,
        Some(buf),
        hold,
        pos..pos + n as u64,
    ))
}

/// Submits a chunk's write to the target; `hold` (its range) is let go
/// once the write completes.
fn submit_write(
    target: &EnginePlex,
    op: Op,
    buf: Option<Arc<AlignedBuf>>,
    hold: impl Send + 'static,
    range: std::ops::Range<u64>,
) -> Inflight {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Outcome>(1);
    target.queue.submit(
        op,
        true,
        Box::new(move |o| {
            drop(hold);
            let _ = tx.send(o);
        }),
    );
    Inflight {
        write: rx,
        buf,
        start: range.start,
        end: range.end,
    }
}

fn flush_target(volume: &MirrorVolume, target: &EnginePlex, pos: u64) -> Result<(), ResyncError> {
    // The target's checksums too: it has no write-intent bits that would
    // keep them untrusted after a crash, and a checkpoint says it holds
    // what lies below it.
    volume
        .persist_sums(target.disk)
        .map_err(|error| ResyncError::Target { offset: pos, error })?;
    run_on(target, Op::Flush).map_err(|error| ResyncError::Target { offset: pos, error })
}

/// Runs one request on the plex's disk, on its workers, with the deadline
/// (a hung target is failed instead of stalling the resync).
fn run_on(plex: &EnginePlex, op: Op) -> io::Result<()> {
    wait(|cb| plex.queue.submit(op, true, cb)).map(|_| ())
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::disk::{Disk, MemDisk};
    use crate::volume::engine::{EngineOptions, FailureSink, NoSink};
    use crate::volume::queue::{DEFAULT_IO_TIMEOUT, DiskQueue};
    use uuid::Uuid;

    const SIZE: u64 = 16 << 20;

    /// A disk whose large reads (a resync's) return late: it widens the
    /// window in which a copy without the range lock would put stale data
    /// over a foreground write.
    #[derive(Debug)]
    struct SlowCopyReads(Arc<MemDisk>);

    impl Disk for SlowCopyReads {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_at(buf, offset)?;
            if buf.len() > 64 << 10 {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            self.0.flush()
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
            self.0.write_zeroes(offset, len)
        }
    }

    struct Rig {
        vol: Arc<MirrorVolume>,
        disks: Vec<Arc<MemDisk>>,
        _sink: Arc<dyn FailureSink>,
    }

    /// A volume on plex 0 (in sync, filled with a pattern) and plex 1
    /// (write-only, holding garbage), each at its own disk offset.
    fn rig() -> Rig {
        let sink: Arc<dyn FailureSink> = Arc::new(NoSink);
        let disks: Vec<Arc<MemDisk>> = (0..2)
            .map(|_| Arc::new(MemDisk::new(SIZE + (1 << 20))))
            .collect();
        let fill: Vec<u8> = (0..SIZE).map(|i| (i / 4096 * 7 + 1) as u8).collect();
        disks[0].write_at(&fill, 4096).unwrap();
        disks[1].write_at(&vec![0xee; SIZE as usize], 8192).unwrap();
        let plexes = disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let disk: Arc<dyn Disk> = Arc::new(SlowCopyReads(d.clone()));
                let q = DiskQueue::start(&format!("d{i}"), disk, 4, DEFAULT_IO_TIMEOUT);
                let mode = if i == 0 {
                    Mode::InSync
                } else {
                    Mode::WriteOnly
                };
                EnginePlex::new(Uuid::new_v4(), q, 4096 * (i as u64 + 1), mode)
            })
            .collect();
        let vol = MirrorVolume::new(
            "v",
            SIZE,
            plexes,
            Arc::downgrade(&sink),
            EngineOptions::default(),
        );
        Rig {
            vol,
            disks,
            _sink: sink,
        }
    }

    fn plex_bytes(r: &Rig, i: usize) -> Vec<u8> {
        let mut buf = vec![0; SIZE as usize];
        r.disks[i].read_at(&mut buf, 4096 * (i as u64 + 1)).unwrap();
        buf
    }

    #[test]
    fn writes_during_a_resync_land_on_both_sides_of_the_position() {
        let r = rig();
        let target = r.vol.plexes()[1].clone();
        let progress = ResyncProgress::new(SIZE, 0);
        // Slow enough (0.25 s) for many writes to race it.
        let opts = ResyncOptions {
            busy_chunk: 256 << 10,
            idle_chunk: 256 << 10,
            max_rate: 64 << 20,
            ..ResyncOptions::unthrottled()
        };
        let stop = AtomicBool::new(false);
        // Thread t writes the 4 KiB slots whose index is t mod 4, so the
        // last write each thread acknowledged in a slot is what it holds.
        let last = std::sync::Mutex::new(std::collections::BTreeMap::new());
        let writes = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (vol, stop, last, progress, writes) =
                    (&r.vol, &stop, &last, &progress, &writes);
                s.spawn(move || {
                    let mut x = t * 7919 + 1;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        // Half the writes just behind the position, half
                        // anywhere (mostly ahead of it).
                        let at = if i.is_multiple_of(2) {
                            progress.position().saturating_sub((x >> 40) % (1 << 20))
                        } else {
                            (x >> 24) % SIZE
                        };
                        let slot = at / 4096 / 4 * 4 + t;
                        let data = vec![(x >> 56) as u8 | 1; 4096];
                        vol.write(slot * 4096, &data).unwrap();
                        last.lock().unwrap().insert(slot, data[0]);
                        writes.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                });
            }
            let copied = resync(
                &r.vol,
                &target,
                &[0..SIZE],
                &opts,
                &progress,
                &mut |_| Ok(()),
                &|_| {},
            )
            .unwrap();
            stop.store(true, Ordering::Relaxed);
            assert_eq!(copied, SIZE);
        });
        let (a, b) = (plex_bytes(&r, 0), plex_bytes(&r, 1));
        assert!(a == b, "the plexes differ after the resync");
        let writes = writes.into_inner();
        assert!(writes > 50, "only {writes} writes raced the resync");
        for (slot, byte) in last.into_inner().unwrap() {
            let at = slot as usize * 4096;
            assert!(
                b[at..at + 4096].iter().all(|&v| v == byte),
                "the last write to slot {slot} is lost"
            );
        }
        assert_eq!(progress.percent(), 100.0);
    }

    #[test]
    fn a_source_that_hangs_is_timed_out_and_the_copy_goes_on_from_another_plex() {
        let sink: Arc<dyn FailureSink> = Arc::new(NoSink);
        let mems: Vec<Arc<MemDisk>> = (0..3)
            .map(|_| Arc::new(MemDisk::new(SIZE + (1 << 20))))
            .collect();
        let fill: Vec<u8> = (0..SIZE).map(|i| (i / 4096 * 5 + 3) as u8).collect();
        mems[0].write_at(&fill, 0).unwrap();
        mems[1].write_at(&fill, 0).unwrap();
        let hung = Arc::new(crate::disk::FaultyDisk::new(mems[0].clone()));
        let disks: Vec<Arc<dyn Disk>> = vec![hung.clone(), mems[1].clone(), mems[2].clone()];
        let queues: Vec<Arc<DiskQueue>> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                DiskQueue::start(&format!("d{i}"), d.clone(), 4, Duration::from_millis(200))
            })
            .collect();
        let modes = [Mode::InSync, Mode::InSync, Mode::WriteOnly];
        let plexes = queues
            .iter()
            .zip(modes)
            .map(|(q, m)| EnginePlex::new(Uuid::new_v4(), q.clone(), 0, m))
            .collect();
        let vol = MirrorVolume::new(
            "v",
            SIZE,
            plexes,
            Arc::downgrade(&sink),
            EngineOptions::default(),
        );
        let target = vol.plexes()[2].clone();
        hung.hang();
        let started = Instant::now();
        let copied = resync(
            &vol,
            &target,
            &[0..SIZE],
            &ResyncOptions::unthrottled(),
            &ResyncProgress::new(SIZE, 0),
            &mut |_| Ok(()),
            &|_| {},
        )
        .expect("the copy goes on from the plex that answers");
        let took = started.elapsed();
        hung.release();
        assert_eq!(copied, SIZE);
        assert!(took < Duration::from_secs(5), "the resync took {took:?}");
        assert_eq!(vol.plexes()[0].mode(), Mode::Out, "the hung plex is failed");
        let mut got = vec![0; SIZE as usize];
        mems[2].read_at(&mut got, 0).unwrap();
        assert!(got == fill, "the target holds the volume");
    }

    #[test]
    fn max_rate_bounds_an_idle_resync_and_min_rate_a_busy_one() {
        let r = rig();
        let target = r.vol.plexes()[1].clone();
        // Idle: 4 MiB at 16 MiB/s takes at least 0.25 s.
        let opts = ResyncOptions {
            min_rate: 4 << 20,
            max_rate: 16 << 20,
            busy_chunk: 256 << 10,
            idle_chunk: 1 << 20,
            ..ResyncOptions::default()
        };
        let t = Instant::now();
        let p = ResyncProgress::new(4 << 20, 0);
        resync(
            &r.vol,
            &target,
            &[0..4 << 20],
            &opts,
            &p,
            &mut |_| Ok(()),
            &|_| {},
        )
        .unwrap();
        let idle = t.elapsed();
        assert!(idle >= Duration::from_millis(240), "{idle:?}");
        assert!(idle < Duration::from_millis(1500), "{idle:?}");
        // Busy: a reader keeps the volume busy; 2 MiB at 4 MiB/s takes at
        // least 0.5 s.
        let stop = AtomicBool::new(false);
        let busy = std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = vec![0; 4096];
                while !stop.load(Ordering::Relaxed) {
                    r.vol.read(SIZE - 4096, &mut buf).unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            std::thread::sleep(Duration::from_millis(20));
            let t = Instant::now();
            let p = ResyncProgress::new(2 << 20, 0);
            resync(
                &r.vol,
                &target,
                &[4 << 20..6 << 20],
                &opts,
                &p,
                &mut |_| Ok(()),
                &|_| {},
            )
            .unwrap();
            stop.store(true, Ordering::Relaxed);
            t.elapsed()
        });
        assert!(busy >= Duration::from_millis(480), "{busy:?}");
        assert!(busy < Duration::from_millis(2500), "{busy:?}");
    }

    #[test]
    fn a_stopped_resync_checkpoints_where_it_stopped() {
        let r = rig();
        let target = r.vol.plexes()[1].clone();
        let p = ResyncProgress::new(SIZE, 0);
        let opts = ResyncOptions {
            idle_chunk: 1 << 20,
            ..ResyncOptions::unthrottled()
        };
        let mut points = Vec::new();
        let err = resync(
            &r.vol,
            &target,
            &[0..SIZE],
            &opts,
            &p,
            &mut |pos| {
                points.push(pos);
                Ok(())
            },
            &|p| {
                if p.done() >= 5 << 20 {
                    p.stop()
                }
            },
        )
        .unwrap_err();
        // The chunk in flight when it was asked to stop completes too.
        let ResyncError::Stopped { position } = err else {
            panic!("{err}");
        };
        assert!((5 << 20..=6 << 20).contains(&position), "{position}");
        assert_eq!(p.position(), position);
        assert_eq!(points, vec![position]);
        let at = position as usize;
        assert!(plex_bytes(&r, 0)[..at] == plex_bytes(&r, 1)[..at]);
    }
}
