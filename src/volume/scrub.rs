//! Scrub (DESIGN.md §2): read every in-sync plex of a volume, compare them,
//! report the byte ranges where they differ and, on request, make them equal.
//!
//! The volume is walked in chunks of [`SCRUB_CHUNK`]. Each chunk is read from
//! every in-sync plex's disk directly, in parallel (a read through the engine
//! would see one copy only), and compared while the chunk is held in the
//! volume's range lock: no write to it is in flight meanwhile, so a write
//! racing the scrub can never look like a mismatch, and a repair can never
//! undo a write. Mismatches are found per 512-byte sector and reported as
//! merged byte ranges in volume offsets.
//!
//! Which copy wins a repair is decided per 4 KiB block by the block
//! checksums ([`Verdict`]): the copy that matches its own. Where none is
//! known, the content held by the most in-sync plexes, never one known bad;
//! on a tie, the first in-sync plex's in config order (md's `repair` copies
//! from the first device), and the verdict says it was the rule. Where every
//! copy fails its checksum, nothing is repaired.
//!
//! A scrub can run throttled ([`ScrubOptions::max_rate`]) so that the daemon
//! can run it in the background; it sleeps between chunks, never while it
//! holds a range.

use super::meter::Meter;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::engine::{EnginePlex, MirrorVolume, Mode, NewSums};
use super::queue::{Op, QueuedDisk, channel, read_data, received};
use crate::disk::AlignedBuf;
use crate::disk::Disk;
use crate::disk::buf::IO_ALIGN;

/// Bytes compared per step, under one range lock.
pub const SCRUB_CHUNK: usize = 1 << 20;

/// The unit of comparison and of repair.
pub const SCRUB_SECTOR: usize = 512;

#[derive(Debug, Clone, Default)]
pub struct ScrubOptions {
    /// Make the plexes equal where they differ (otherwise only report).
    pub repair: bool,
    /// Bytes per second to compare at most (per plex); `None` or 0: as fast
    /// as the disks go.
    pub max_rate: Option<u64>,
    /// Set to stop between chunks (a daemon shutting down); the report then
    /// covers what was compared so far.
    pub stop: Option<Arc<AtomicBool>>,
    /// Set to stop this scrub alone between chunks (a background scrub
    /// making way for an admin's operation).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl ScrubOptions {
    fn stopped(&self) -> bool {
        [&self.stop, &self.cancel]
            .into_iter()
            .flatten()
            .any(|s| s.load(Ordering::Relaxed))
    }
}

/// One byte range where the plexes differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Volume offset and length, whole sectors.
    pub offset: u64,
    pub length: u64,
    /// The plex whose copy wins (see the module comment).
    pub kept: Uuid,
    /// The plexes whose copy differs from the winning one, in config order.
    pub outvoted: Vec<Uuid>,
    /// The winning copy was written to the outvoted plexes and read back.
    pub repaired: bool,
    /// What decided.
    pub verdict: Verdict,
}

/// What decides which copy of a range is right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The kept copy matches its block checksums; the outvoted ones differ
    /// from it, and from their own checksums where those are known.
    Checksum,
    /// The copies agree, but the checksums on the outvoted plexes do not
    /// match them: their checksum entries are damaged, not their data.
    Entry,
    /// No checksum is known there: the copy most plexes hold.
    Majority,
    /// No checksum is known there and no majority: the first plex's copy.
    First,
    /// Every copy there fails its checksum: none is known good, and a
    /// repair leaves them as they are.
    NoGoodCopy,
}

impl Verdict {
    /// As `scrub --json` and the events name it.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Checksum => "checksum",
            Verdict::Entry => "checksum-entry",
            Verdict::Majority => "majority",
            Verdict::First => "first-plex",
            Verdict::NoGoodCopy => "no-good-copy",
        }
    }
}

/// What a scrub found.
#[derive(Debug, Clone, Default)]
pub struct ScrubReport {
    /// The in-sync plexes compared, in config order.
    pub compared: Vec<Uuid>,
    pub checked_bytes: u64,
    /// Of `checked_bytes`, those never written on any compared plex (by
    /// their written maps): zeroes on every copy, not read.
    pub unwritten_bytes: u64,
    pub mismatches: Vec<Mismatch>,
}

impl ScrubReport {
    pub fn mismatched_bytes(&self) -> u64 {
        self.mismatches.iter().map(|m| m.length).sum()
    }

    pub fn repaired(&self) -> usize {
        self.mismatches.iter().filter(|m| m.repaired).count()
    }

    pub fn repaired_bytes(&self) -> u64 {
        self.mismatches
            .iter()
            .filter(|m| m.repaired)
            .map(|m| m.length)
            .sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error("volume {volume} has fewer than two in-sync plexes: there is nothing to compare")]
    TooFewPlexes { volume: String },
    /// A plex failed a read, a repair write, or read back other data than
    /// was written; it was failed unless it is the last in-sync plex.
    #[error(
        "scrub of volume {volume} stopped at volume offset {offset}: {op} on disk {disk} failed: {error}"
    )]
    Plex {
        volume: String,
        disk: String,
        op: &'static str,
        offset: u64,
        error: io::Error,
        /// What was found before it stopped.
        report: Box<ScrubReport>,
    },
}

/// How far a scrub under way has come, for `status` (its [`Meter`]), and
/// what it is.
#[derive(Debug)]
pub struct ScrubProgress {
    /// Bytes of the volume compared so far.
    meter: Meter,
    /// A `scrub --repair`, not a check.
    pub repair: bool,
    /// Run by the daemon on its `--scrub-interval`, not asked for.
    pub background: bool,
    /// Set to stop it between chunks.
    cancel: Arc<AtomicBool>,
}

impl std::ops::Deref for ScrubProgress {
    type Target = Meter;
    fn deref(&self) -> &Meter {
        &self.meter
    }
}

impl ScrubProgress {
    pub fn new(total: u64, repair: bool, background: bool) -> Arc<ScrubProgress> {
        Arc::new(ScrubProgress {
            meter: Meter::new(total),
            repair,
            background,
            cancel: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Asks the scrub to stop between chunks.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// What the scrub's options watch for [`ScrubProgress::cancel`].
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }
}

/// Compares (and with `repair`, equalizes) the in-sync plexes of `volume`.
/// `progress` gets the bytes compared so far.
pub fn scrub(
    volume: &Arc<MirrorVolume>,
    opts: &ScrubOptions,
    progress: &dyn Fn(u64),
) -> Result<ScrubReport, ScrubError> {
    let mut plexes: Vec<Arc<EnginePlex>> = volume
        .plexes()
        .into_iter()
        .filter(|p| p.mode() == Mode::InSync)
        .collect();
    let too_few = || ScrubError::TooFewPlexes {
        volume: volume.name.clone(),
    };
    if plexes.len() < 2 {
        return Err(too_few());
    }
    let mut report = ScrubReport {
        compared: plexes.iter().map(|p| p.disk).collect(),
        ..ScrubReport::default()
    };
    let mut bufs: Vec<AlignedBuf> = plexes
        .iter()
        .map(|_| AlignedBuf::new(SCRUB_CHUNK, IO_ALIGN))
        .collect();
    let started = Instant::now();
    let mut pos = 0u64;
    while pos < volume.size() && !opts.stopped() {
        let n = (volume.size() - pos).min(SCRUB_CHUNK as u64) as usize;
        let mut unwritten = false;
        let found = volume.with_range_locked(pos..pos + n as u64, || {
            // A plex failed by a write since the last chunk lacks that write:
            // comparing it would report a false mismatch, and it must never
            // win a repair.
            plexes.retain(|p| p.mode() == Mode::InSync);
            if plexes.len() < 2 {
                return Ok(None);
            }
            // Never written on any plex: the volume reads zeroes there
            // without reading a disk, whatever the disks hold.
            if volume.never_written(&plexes, pos, n as u64) {
                unwritten = true;
                return Ok(Some(Vec::new()));
            }
            bufs.truncate(plexes.len());
            scrub_chunk(volume, &plexes, &mut bufs, pos, n, opts.repair).map(Some)
        });
        let found = match found {
            Ok(Some(found)) => found,
            Ok(None) => return Err(too_few()),
            Err(mut e) => {
                if let ScrubError::Plex { report: r, .. } = &mut e {
                    **r = report;
                }
                return Err(e);
            }
        };
        for m in found {
            match report.mismatches.last_mut() {
                Some(last)
                    if last.offset + last.length == m.offset
                        && last.kept == m.kept
                        && last.outvoted == m.outvoted
                        && last.repaired == m.repaired
                        && last.verdict == m.verdict =>
                {
                    last.length += m.length
                }
                _ => report.mismatches.push(m),
            }
        }
        pos += n as u64;
        report.checked_bytes = pos;
        if unwritten {
            report.unwritten_bytes += n as u64;
        }
        progress(pos);
        if let Some(rate) = opts.max_rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(pos as f64 / rate as f64);
            // Sleep in slices, so a stop request is seen within 100 ms.
            while started.elapsed() < due && !opts.stopped() {
                std::thread::sleep((due - started.elapsed()).min(Duration::from_millis(100)));
            }
        }
    }
    // What a repair set (mended and newly hashed checksums of clean
    // regions, which no bit keeps untrusted) is made durable now.
    if opts.repair {
        for p in &plexes {
            if let Err(e) = volume.persist_sums(p.disk) {
                tracing::warn!(disk = %p.queue.name(), error = %e, "cannot write the checksums a scrub set");
            }
        }
    }
    Ok(report)
}

/// A run of sectors in one chunk with the same verdict: chunk-relative
/// start, length, the winning plex and the outvoted ones (indices).
struct Run {
    start: usize,
    len: usize,
    kept: usize,
    outvoted: Vec<usize>,
    verdict: Verdict,
}

/// Per plex, per 4 KiB block of a chunk: whether its copy matches its
/// checksum (`None`: not known).
fn block_checks(
    volume: &MirrorVolume,
    plexes: &[Arc<EnginePlex>],
    bufs: &[AlignedBuf],
    pos: u64,
    n: usize,
) -> Vec<Vec<Option<bool>>> {
    use crate::format::checksum::{DATA_BLOCK, UNKNOWN, sum};
    let blocks = n / DATA_BLOCK as usize;
    plexes
        .iter()
        .zip(bufs)
        .map(|(p, b)| match volume.block_sums(p, pos, blocks as u64) {
            None => vec![None; blocks],
            Some(sums) => sums
                .iter()
                .enumerate()
                .map(|(j, e)| {
                    (*e != UNKNOWN).then(|| {
                        sum(&b[j * DATA_BLOCK as usize..(j + 1) * DATA_BLOCK as usize]) == *e
                    })
                })
                .collect(),
        })
        .collect()
}

/// Who wins sector `s`: by the block checksums where a copy matches its
/// own, else by the most votes (ties to the first plex in order) among
/// the copies not known bad. `class` as [`classes`] gives it (`None`: the
/// copies agree there, and only a damaged entry can be found).
fn decide(
    class: Option<&[usize]>,
    checks: &[Vec<Option<bool>>],
    s: usize,
) -> Option<(usize, Vec<usize>, Verdict)> {
    let b = s / crate::format::checksum::DATA_BLOCK as usize;
    let ok = |i: usize| checks[i].get(b).copied().flatten();
    let n = checks.len();
    let Some(class) = class else {
        let bad: Vec<usize> = (0..n).filter(|&i| ok(i) == Some(false)).collect();
        if bad.is_empty() {
            return None;
        }
        let kept = (0..n).find(|i| !bad.contains(i)).unwrap_or(0);
        return Some((kept, bad, Verdict::Entry));
    };
    let votes = |c: usize| class.iter().filter(|&&x| x == c).count();
    let verified = (0..n)
        .filter(|&i| ok(i) == Some(true))
        .map(|i| class[i])
        .max_by_key(|&c| (votes(c), std::cmp::Reverse(c)));
    let (kept, verdict) = match verified {
        Some(c) => (c, Verdict::Checksum),
        None => {
            // Without a copy known good, a copy known bad never wins: the
            // rule picks among the others.
            let clean = |c: usize| (0..n).all(|i| class[i] != c || ok(i) != Some(false));
            let best = (0..n)
                .filter(|&c| class[c] == c && clean(c))
                .max_by_key(|&c| (votes(c), std::cmp::Reverse(c)));
            match best {
                None => (0, Verdict::NoGoodCopy),
                Some(c) => {
                    let tie =
                        (0..n).any(|i| class[i] == i && i != c && clean(i) && votes(i) == votes(c));
                    (
                        c,
                        if tie {
                            Verdict::First
                        } else {
                            Verdict::Majority
                        },
                    )
                }
            }
        }
    };
    let outvoted = (0..n).filter(|&i| class[i] != class[kept]).collect();
    Some((kept, outvoted, verdict))
}

/// Per sector, the index of the first plex holding the same content as
/// each plex (its class), or `None` when every plex agrees.
fn classes(bufs: &[AlignedBuf], s: usize) -> Option<Vec<usize>> {
    let sector = |i: usize| &bufs[i][s..s + SCRUB_SECTOR];
    if (1..bufs.len()).all(|i| sector(i) == sector(0)) {
        return None;
    }
    let mut class: Vec<usize> = Vec::with_capacity(bufs.len());
    for i in 0..bufs.len() {
        let c = (0..i)
            .find(|&j| class[j] == j && sector(j) == sector(i))
            .unwrap_or(i);
        class.push(c);
    }
    Some(class)
}

/// Compares one chunk of every plex; returns its mismatches in volume
/// offsets, repaired when asked. The caller holds the chunk's range.
fn scrub_chunk(
    volume: &MirrorVolume,
    plexes: &[Arc<EnginePlex>],
    bufs: &mut [AlignedBuf],
    pos: u64,
    n: usize,
    repair: bool,
) -> Result<Vec<Mismatch>, ScrubError> {
    let fail = |p: &EnginePlex, op: &'static str, error: io::Error| {
        // Recorded through the engine's sink, like any I/O error: the
        // command's `settle` (or the daemon) puts it in the config.
        volume.fail_plex(p.disk, &error);
        ScrubError::Plex {
            volume: volume.name.clone(),
            disk: p.queue.name().to_string(),
            op,
            offset: pos,
            error,
            report: Box::default(),
        }
    };

    // Every plex's copy, read in parallel on the disks' queues, under the
    // hang watchdog: one slow disk does not add its time to the others',
    // and one that hangs is timed out (and failed) instead of holding the
    // chunk's range for good.
    let pending: Vec<_> = plexes
        .iter()
        .zip(bufs.iter_mut())
        .map(|(p, b)| {
            let buf = std::mem::replace(b, AlignedBuf::new(0, IO_ALIGN));
            let (cb, rx) = channel();
            let op = Op::ReadInto {
                offset: p.offset + pos,
                len: n,
                buf,
            };
            p.queue.submit(op, true, cb);
            rx
        })
        .collect();
    let mut failed = None;
    for ((p, b), rx) in plexes.iter().zip(bufs.iter_mut()).zip(pending) {
        match read_data(received(&rx)) {
            Ok(got) => *b = got,
            Err(e) => {
                *b = AlignedBuf::new(SCRUB_CHUNK, IO_ALIGN);
                failed.get_or_insert((p, e));
            }
        }
    }
    if let Some((p, e)) = failed {
        return Err(fail(p, "reading", e));
    }
    let checks = block_checks(volume, plexes, bufs, pos, n);
    let equal = bufs[1..].iter().all(|b| b[..n] == bufs[0][..n]);
    let entries_ok = checks.iter().flatten().all(|c| *c != Some(false));
    if equal && entries_ok {
        if repair {
            // Blocks whose checksums are not known yet (written before
            // format 5, or dirty at a crash) get them: the copies agree.
            for (p, b) in plexes.iter().zip(bufs.iter()) {
                volume.record_sums(p.disk, &NewSums::of_write(pos, &b[..n]));
            }
        }
        return Ok(Vec::new());
    }

    // Blocks equal on every plex: only there can a checksum that does not
    // match be the entry's fault rather than the data's.
    let block = crate::format::checksum::DATA_BLOCK as usize;
    let block_equal = |s: usize| {
        let (a, b) = (s / block * block, (s / block * block + block).min(n));
        bufs[1..].iter().all(|x| x[a..b] == bufs[0][a..b])
    };
    let mut runs: Vec<Run> = Vec::new();
    for s in (0..n).step_by(SCRUB_SECTOR) {
        let class = if equal { None } else { classes(bufs, s) };
        if class.is_none() && !equal && !block_equal(s) {
            continue;
        }
        let Some((kept, outvoted, verdict)) = decide(class.as_deref(), &checks, s) else {
            continue;
        };
        match runs.last_mut() {
            Some(r)
                if r.start + r.len == s
                    && r.kept == kept
                    && r.outvoted == outvoted
                    && r.verdict == verdict =>
            {
                r.len += SCRUB_SECTOR
            }
            _ => runs.push(Run {
                start: s,
                len: SCRUB_SECTOR,
                kept,
                outvoted,
                verdict,
            }),
        }
    }

    if repair {
        for (i, p) in plexes.iter().enumerate() {
            // A damaged entry needs no data written: its checksums are
            // set again from the copy below.
            let mine: Vec<&Run> = runs
                .iter()
                .filter(|r| {
                    r.outvoted.contains(&i)
                        && !matches!(r.verdict, Verdict::Entry | Verdict::NoGoodCopy)
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            // Patch this plex's copy in place with the winning sectors: the
            // winner of a sector is never outvoted in it, so its bytes there
            // are still as read.
            for r in &mine {
                let (head, tail) = bufs.split_at_mut(i.max(r.kept));
                let (dst, src) = if i > r.kept {
                    (&mut tail[0], &head[r.kept])
                } else {
                    (&mut head[i], &tail[0])
                };
                dst[r.start..r.start + r.len].copy_from_slice(&src[r.start..r.start + r.len]);
            }
            // Writes cover whole sectors of the disk (4 KiB ones too); the
            // bytes around a run are this plex's own, as read under the lock.
            let ss = (p.queue.sector_size() as usize).max(SCRUB_SECTOR);
            // Through the queue, under the deadline: a plex that hangs during
            // a repair fails the scrub instead of holding its range for good.
            let disk = QueuedDisk::over(p.queue.clone());
            for r in &mine {
                let a = r.start / ss * ss;
                let b = (r.start + r.len).div_ceil(ss).saturating_mul(ss).min(n);
                let at = p.offset + pos + a as u64;
                disk.write_at(&bufs[i][a..b], at)
                    .map_err(|e| fail(p, "a repair write", e))?;
            }
            disk.flush()
                .map_err(|e| fail(p, "a flush after repair", e))?;
            for r in &mine {
                let a = r.start / ss * ss;
                let b = (r.start + r.len).div_ceil(ss).saturating_mul(ss).min(n);
                let mut back = AlignedBuf::new(b - a, IO_ALIGN);
                disk.read_at(&mut back, p.offset + pos + a as u64)
                    .map_err(|e| fail(p, "reading back a repair", e))?;
                if back[..] != bufs[i][a..b] {
                    return Err(fail(
                        p,
                        "reading back a repair",
                        io::Error::other("the disk read back other data than was written"),
                    ));
                }
            }
        }
        // Every copy of the chunk is now the one kept: its checksums are
        // set from it (mending damaged entries, hashing unknown ones),
        // except in blocks where no copy is good, whose checksums still
        // say so.
        let bad: Vec<std::ops::Range<usize>> = runs
            .iter()
            .filter(|r| r.verdict == Verdict::NoGoodCopy)
            .map(|r| r.start / block * block..(r.start + r.len).div_ceil(block) * block)
            .collect();
        let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
        let mut at = 0;
        for r in &bad {
            if r.start > at {
                spans.push(at..r.start);
            }
            at = at.max(r.end);
        }
        if at < n {
            spans.push(at..n);
        }
        for (p, b) in plexes.iter().zip(bufs.iter()) {
            for r in &spans {
                volume.record_sums(
                    p.disk,
                    &NewSums::of_write(pos + r.start as u64, &b[r.clone()]),
                );
            }
        }
    }

    Ok(runs
        .into_iter()
        .map(|r| Mismatch {
            offset: pos + r.start as u64,
            length: r.len as u64,
            kept: plexes[r.kept].disk,
            outvoted: r.outvoted.iter().map(|&i| plexes[i].disk).collect(),
            repaired: repair && r.verdict != Verdict::NoGoodCopy,
            verdict: r.verdict,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Disk, MemDisk};
    use crate::volume::engine::{EngineOptions, FailureSink, NoSink};
    use crate::volume::queue::{DEFAULT_IO_TIMEOUT, DiskQueue};

    const SIZE: u64 = 3 << 20;

    struct Rig {
        vol: Arc<MirrorVolume>,
        disks: Vec<Arc<MemDisk>>,
        _sink: Arc<dyn FailureSink>,
    }

    /// `copies` plexes, each at its own disk offset, all holding `fill`.
    fn rig(copies: usize) -> Rig {
        let sink: Arc<dyn FailureSink> = Arc::new(NoSink);
        let mut disks = Vec::new();
        let mut plexes = Vec::new();
        for i in 0..copies {
            let d = Arc::new(MemDisk::new(SIZE + (1 << 20)));
            let q = DiskQueue::start(&format!("d{i}"), d.clone(), 2, DEFAULT_IO_TIMEOUT);
            plexes.push(EnginePlex::new(
                Uuid::new_v4(),
                q,
                i as u64 * 8192,
                Mode::InSync,
            ));
            disks.push(d);
        }
        let vol = MirrorVolume::new(
            "v",
            SIZE,
            plexes,
            Arc::downgrade(&sink),
            EngineOptions::default(),
        );
        let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
        vol.write(0, &data).unwrap();
        Rig {
            vol,
            disks,
            _sink: sink,
        }
    }

    fn poke(r: &Rig, plex: usize, offset: u64, len: usize, byte: u8) {
        r.disks[plex]
            .write_at(&vec![byte; len], plex as u64 * 8192 + offset)
            .unwrap();
    }

    fn plex_bytes(r: &Rig, plex: usize) -> Vec<u8> {
        let mut b = vec![0; SIZE as usize];
        r.disks[plex].read_at(&mut b, plex as u64 * 8192).unwrap();
        b
    }

    #[test]
    fn identical_plexes_have_no_mismatch() {
        let r = rig(2);
        let rep = scrub(&r.vol, &ScrubOptions::default(), &|_| {}).unwrap();
        assert_eq!(rep.checked_bytes, SIZE);
        assert!(rep.mismatches.is_empty());
    }

    #[test]
    fn mismatches_merge_across_chunks_and_split_on_other_verdicts() {
        let r = rig(3);
        let ids: Vec<Uuid> = r.vol.plexes().iter().map(|p| p.disk).collect();
        // 8 KiB across the first chunk boundary, odd on plex 2.
        poke(&r, 2, (1 << 20) - 4096, 8192, 0xee);
        // Right after it, odd on plex 1: a separate range.
        poke(&r, 1, (1 << 20) + 4096, 512, 0xee);
        let rep = scrub(&r.vol, &ScrubOptions::default(), &|_| {}).unwrap();
        assert_eq!(
            rep.mismatches,
            vec![
                Mismatch {
                    offset: (1 << 20) - 4096,
                    length: 8192,
                    kept: ids[0],
                    outvoted: vec![ids[2]],
                    repaired: false,
                    verdict: Verdict::Majority,
                },
                Mismatch {
                    offset: (1 << 20) + 4096,
                    length: 512,
                    kept: ids[0],
                    outvoted: vec![ids[1]],
                    repaired: false,
                    verdict: Verdict::Majority,
                },
            ]
        );
    }

    #[test]
    fn repair_takes_the_majority_and_ties_go_to_the_first_plex() {
        let r = rig(3);
        let want = plex_bytes(&r, 1);
        // Plex 0 is odd: plexes 1 and 2 outvote it.
        poke(&r, 0, 4096, 512, 0x11);
        // All three differ: plex 0's copy wins the tie.
        poke(&r, 0, 65536, 512, 0x21);
        poke(&r, 1, 65536, 512, 0x22);
        poke(&r, 2, 65536, 512, 0x23);
        let opts = ScrubOptions {
            repair: true,
            ..ScrubOptions::default()
        };
        let rep = scrub(&r.vol, &opts, &|_| {}).unwrap();
        assert_eq!(rep.mismatches.len(), 2);
        assert_eq!(rep.repaired(), 2);
        assert_eq!(rep.mismatches[0].verdict, Verdict::Majority);
        assert_eq!(rep.mismatches[1].verdict, Verdict::First);
        let a = plex_bytes(&r, 0);
        assert_eq!(a, plex_bytes(&r, 1));
        assert_eq!(a, plex_bytes(&r, 2));
        assert_eq!(&a[4096..4608], &want[4096..4608]);
        assert_eq!(&a[65536..66048], &[0x21; 512][..]);
        let again = scrub(&r.vol, &ScrubOptions::default(), &|_| {}).unwrap();
        assert!(again.mismatches.is_empty());
    }

    #[test]
    fn a_throttled_scrub_keeps_to_its_rate() {
        let r = rig(2);
        let opts = ScrubOptions {
            repair: false,
            max_rate: Some(SIZE * 5),
            ..ScrubOptions::default()
        };
        let t = Instant::now();
        scrub(&r.vol, &opts, &|_| {}).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_write_waits_for_the_chunk_being_compared() {
        let r = rig(2);
        let (tx, rx) = std::sync::mpsc::channel();
        let vol = r.vol.clone();
        r.vol.with_range_locked(0..4096, || {
            std::thread::spawn(move || {
                vol.write(0, &[5u8; 4096]).unwrap();
                tx.send(()).unwrap();
            });
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        });
        // Released: the write goes through.
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(&plex_bytes(&r, 1)[..4096], &[5u8; 4096][..]);
    }
}
