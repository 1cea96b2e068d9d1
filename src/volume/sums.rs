//! One disk's block checksums in memory ([`crate::format::checksum`]): the
//! blocks of its checksum area that were used lately, changed in memory by
//! writes and written out lazily, by the bitmap's clearing pass, before the
//! bits of the regions they cover are cleared ([`super::bitmap`]).
//!
//! Offsets here are data-area offsets of the disk.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use crate::disk::Disk;
use crate::format::Layout;
use crate::format::checksum::{BLOCKS_PER_SUM_BLOCK, DATA_BLOCK, SUM_BLOCK, UNKNOWN};

/// Whether block checksums are kept and verified: always, unless the
/// environment sets `MIRRORVOL_NO_CHECKSUMS=1`, which exists to measure
/// what they cost (`bench/checksums.sh`). Without them every disk's
/// checksums are forgotten (zeroed before its next bitmap write), so a
/// later run with them finds them unknown, never wrong.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MIRRORVOL_NO_CHECKSUMS").is_none_or(|v| v != "1"))
}

/// Checksum blocks kept in memory at most (64 MiB, for 64 GiB of data);
/// past that, unchanged ones are dropped and read again when needed.
const MAX_CACHED: usize = 16 * 1024;

/// Checksum blocks read or written in one request at most (1 MiB).
const MAX_RUN: u64 = 256;

/// `ks` (ascending or not) as runs of consecutive blocks, each at most
/// `max` long.
fn runs(mut ks: Vec<u64>, max: u64) -> impl Iterator<Item = std::ops::Range<u64>> {
    ks.sort_unstable();
    ks.dedup();
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for k in ks {
        match out.last_mut() {
            Some(r) if r.end == k && r.end - r.start < max => r.end += 1,
            _ => out.push(k..k + 1),
        }
    }
    out.into_iter()
}

#[derive(Debug)]
struct Cached {
    sums: Box<[u32]>,
    /// Read from the disk (or known without: an untrusted area). A block
    /// only set so far is not: writes never wait for a read of the disk
    /// (a hung or far one would stall them); the entries not set are
    /// read when the block is first needed whole.
    loaded: bool,
    /// Entries set while not loaded, one bit each.
    set: [u64; BLOCKS_PER_SUM_BLOCK as usize / 64],
    /// Changed since it was last written out.
    dirty: bool,
    /// Bumped on every change.
    version: u64,
}

impl Cached {
    fn put(&mut self, j: usize, v: u32) {
        if !self.loaded {
            self.set[j / 64] |= 1 << (j % 64);
            // Every entry set: what the disk holds would all be
            // overwritten, so it need not be read.
            if self.set[j / 64] == u64::MAX && self.set.iter().all(|w| *w == u64::MAX) {
                self.loaded = true;
            }
        } else if self.sums[j] == v {
            return;
        }
        self.sums[j] = v;
        self.dirty = true;
        self.version += 1;
    }
}

#[derive(Debug)]
struct State {
    /// Whether the area on disk may be read: false on a disk formatted
    /// before format 5 (or whose writes went untracked), until its area is
    /// zeroed ([`DiskSums::wipe_if_needed`]).
    trusted: bool,
    /// The area must be zeroed before anything relies on it.
    wipe: bool,
    cache: HashMap<u64, Cached>,
}

/// One disk's checksums.
#[derive(Debug)]
pub struct DiskSums {
    /// Absolute offset of the checksum area.
    area: u64,
    /// Bytes of the checksum area.
    size: u64,
    /// Data blocks covered.
    blocks: u64,
    state: Mutex<State>,
}

impl DiskSums {
    /// The checksums of a disk with `layout`; `trusted`: its area holds
    /// valid entries (format 5).
    pub fn new(layout: &Layout, trusted: bool) -> DiskSums {
        DiskSums {
            area: layout.checksum_offset(),
            size: layout.checksum_size,
            blocks: layout.data_size / DATA_BLOCK,
            state: Mutex::new(State {
                trusted,
                wipe: !trusted,
                cache: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A disk whose written map starts empty (a new disk): no entry is
    /// consulted before its region is first written, which sets them all,
    /// so its area needs no zeroing.
    pub fn trust_fresh(&self) {
        let mut s = self.lock();
        s.trusted = true;
        s.wipe = false;
    }

    /// Forgets every entry: the area is zeroed before it is next relied on
    /// (a disk of an older format, or one written without checksums).
    pub fn distrust(&self) {
        let mut s = self.lock();
        s.trusted = false;
        s.wipe = true;
        s.cache.clear();
    }

    /// The cached checksum block `k` (entries not set unknown until it is
    /// loaded, [`DiskSums::load`]).
    fn block<'a>(&self, s: &'a mut State, k: u64) -> &'a mut Cached {
        if !s.cache.contains_key(&k) {
            if s.cache.len() >= MAX_CACHED {
                let clean: Vec<u64> = s
                    .cache
                    .iter()
                    .filter(|(_, c)| !c.dirty)
                    .map(|(k, _)| *k)
                    .take(MAX_CACHED / 8)
                    .collect();
                for c in clean {
                    s.cache.remove(&c);
                }
            }
            s.cache.insert(
                k,
                Cached {
                    sums: vec![UNKNOWN; BLOCKS_PER_SUM_BLOCK as usize].into_boxed_slice(),
                    loaded: false,
                    set: [0; BLOCKS_PER_SUM_BLOCK as usize / 64],
                    dirty: false,
                    version: 0,
                },
            );
        }
        s.cache.get_mut(&k).expect("inserted above")
    }

    /// Makes checksum blocks `ks` whole in memory, reading from `disk`
    /// those not loaded yet, without holding the lock meanwhile (a slow
    /// disk stalls only its caller, never a writer setting entries).
    fn load(&self, disk: &dyn Disk, ks: impl Iterator<Item = u64>) {
        let (want, trusted): (Vec<u64>, bool) = {
            let s = self.lock();
            let want = ks
                .filter(|k| !s.cache.get(k).is_some_and(|c| c.loaded))
                .collect();
            (want, s.trusted)
        };
        // Adjacent blocks are read in one request (a resync's target
        // loads a thousand of them at its end).
        let mut todo: Vec<std::ops::Range<u64>> = runs(want, MAX_RUN).collect();
        todo.reverse();
        while let Some(run) = todo.pop() {
            let mut raw = vec![0u8; (run.end - run.start) as usize * SUM_BLOCK as usize];
            let got = if trusted {
                match disk.read_at(&mut raw, self.area + run.start * SUM_BLOCK) {
                    Ok(()) => true,
                    // A run that fails is read again a block at a time:
                    // one bad sector costs the entries of one block.
                    Err(_) if run.end - run.start > 1 => {
                        todo.extend((run.start..run.end).rev().map(|k| k..k + 1));
                        continue;
                    }
                    // Unknown, never bad: the read error itself shows on
                    // the disk's data soon enough.
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read a checksum block");
                        false
                    }
                }
            } else {
                false
            };
            let mut s = self.lock();
            // Distrusted (and wiped) meanwhile: what was read is void.
            let got = got && s.trusted;
            for (k, raw) in run.zip(raw.chunks_exact(SUM_BLOCK as usize)) {
                let c = self.block(&mut s, k);
                if c.loaded {
                    continue;
                }
                if got {
                    for (j, b) in raw.chunks_exact(4).enumerate() {
                        if c.set[j / 64] & (1 << (j % 64)) == 0 {
                            c.sums[j] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                    }
                }
                c.loaded = true;
            }
        }
    }

    /// The entries of `n` blocks from block-aligned data-area offset
    /// `first` (unknown past the end of the area).
    pub fn get(&self, disk: &dyn Disk, first: u64, n: u64) -> Vec<u32> {
        let first = first / DATA_BLOCK;
        let end = (first + n).min(self.blocks);
        if !enabled() || first >= end {
            return vec![UNKNOWN; n as usize];
        }
        self.load(
            disk,
            first / BLOCKS_PER_SUM_BLOCK..(end - 1) / BLOCKS_PER_SUM_BLOCK + 1,
        );
        let mut s = self.lock();
        let mut out = Vec::with_capacity(n as usize);
        let mut b = first;
        while b < end {
            let k = b / BLOCKS_PER_SUM_BLOCK;
            let to = ((k + 1) * BLOCKS_PER_SUM_BLOCK).min(end);
            let c = self.block(&mut s, k);
            let at = (b % BLOCKS_PER_SUM_BLOCK) as usize;
            let len = (to - b) as usize;
            // Evicted or not loaded (a failed read): unknown.
            if c.loaded {
                out.extend_from_slice(&c.sums[at..at + len]);
            } else {
                out.resize(out.len() + len, UNKNOWN);
            }
            b = to;
        }
        out.resize(n as usize, UNKNOWN);
        out
    }

    /// Sets the entries of the blocks from block-aligned data-area offset
    /// `first`, one per value of `sums`, without reading the disk.
    pub fn set(&self, disk: &dyn Disk, first: u64, sums: &[u32]) {
        self.set_with(disk, first, sums, false)
    }

    /// [`DiskSums::set`], reading the blocks first: entries that do not
    /// change are not written out again (a rehash of equal data writes
    /// nothing).
    pub fn set_read(&self, disk: &dyn Disk, first: u64, sums: &[u32]) {
        self.set_with(disk, first, sums, true)
    }

    fn set_with(&self, disk: &dyn Disk, first: u64, sums: &[u32], load: bool) {
        if !enabled() || sums.is_empty() {
            return;
        }
        let first = first / DATA_BLOCK;
        if load {
            let last = (first + sums.len() as u64 - 1).min(self.blocks.saturating_sub(1));
            self.load(
                disk,
                first / BLOCKS_PER_SUM_BLOCK..last / BLOCKS_PER_SUM_BLOCK + 1,
            );
        }
        self.put_all(first, sums.iter().copied());
    }

    /// Sets the entries of blocks `first..`, one per value, up to the end
    /// of the area.
    fn put_all(&self, first: u64, values: impl Iterator<Item = u32>) {
        let mut s = self.lock();
        let mut values = values.peekable();
        let mut b = first;
        // One lookup per checksum block, not per entry (a resync sets a
        // million entries of a 4 GiB target).
        while b < self.blocks && values.peek().is_some() {
            let k = b / BLOCKS_PER_SUM_BLOCK;
            let c = self.block(&mut s, k);
            let end = ((k + 1) * BLOCKS_PER_SUM_BLOCK).min(self.blocks);
            for (b, v) in (b..end).zip(values.by_ref()) {
                c.put((b % BLOCKS_PER_SUM_BLOCK) as usize, v);
            }
            b = end;
        }
    }

    /// Sets every entry of the whole blocks within data-area bytes
    /// `[start, end)` to `value`.
    pub fn fill(&self, start: u64, end: u64, value: u32) {
        if !enabled() {
            return;
        }
        let (first, n) = crate::format::checksum::whole_blocks(start, end.saturating_sub(start));
        self.put_all(first / DATA_BLOCK, std::iter::repeat_n(value, n as usize));
    }

    /// Whether entries changed in memory are still to be written out.
    pub fn has_dirty(&self) -> bool {
        self.lock().cache.values().any(|c| c.dirty)
    }

    /// Whether the area waits to be zeroed (written out only with the
    /// first entry: a command that writes none leaves the disk as it is).
    pub fn wipe_pending(&self) -> bool {
        self.lock().wipe
    }

    /// Zeroes the area on `disk`, durably, when its entries are not to be
    /// trusted; before the disk is raised to format 5, and before any
    /// entry is written there.
    pub fn wipe_if_needed(&self, disk: &dyn Disk) -> io::Result<()> {
        if !self.lock().wipe {
            return Ok(());
        }
        disk.write_zeroes(self.area, self.size)?;
        disk.flush()?;
        let mut s = self.lock();
        s.wipe = false;
        s.trusted = true;
        Ok(())
    }

    /// Writes every changed checksum block to `disk`, without a flush (the
    /// caller flushes before it relies on them). Returns the blocks
    /// written.
    pub fn write_out(&self, disk: &dyn Disk) -> io::Result<usize> {
        if !self.has_dirty() {
            return Ok(0);
        }
        self.wipe_if_needed(disk)?;
        // Blocks only set so far get their other entries first.
        let partial: Vec<u64> = self
            .lock()
            .cache
            .iter()
            .filter(|(_, c)| c.dirty && !c.loaded)
            .map(|(k, _)| *k)
            .collect();
        self.load(disk, partial.into_iter());
        // The (block, version) of each block written, and the writes: one
        // per run of adjacent blocks.
        type Out = (Vec<(u64, u64)>, Vec<(u64, Vec<u8>)>);
        let (versions, bufs): Out = {
            let s = self.lock();
            let ks: Vec<u64> = s
                .cache
                .iter()
                .filter(|(_, c)| c.dirty && c.loaded)
                .map(|(k, _)| *k)
                .collect();
            let versions = ks.iter().map(|k| (*k, s.cache[k].version)).collect();
            let bufs = runs(ks, MAX_RUN)
                .map(|run| {
                    let mut raw =
                        Vec::with_capacity((run.end - run.start) as usize * SUM_BLOCK as usize);
                    let at = self.area + run.start * SUM_BLOCK;
                    for k in run {
                        for e in s.cache[&k].sums.iter() {
                            raw.extend_from_slice(&e.to_le_bytes());
                        }
                    }
                    (at, raw)
                })
                .collect();
            (versions, bufs)
        };
        if versions.is_empty() {
            return Ok(0);
        }
        let writes: Vec<(u64, &[u8])> = bufs.iter().map(|(at, raw)| (*at, &raw[..])).collect();
        disk.write_all_then_flush(&writes, false)?;
        let mut s = self.lock();
        for (k, version) in &versions {
            if let Some(c) = s.cache.get_mut(k)
                && c.version == *version
            {
                c.dirty = false;
            }
        }
        Ok(versions.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;
    use crate::format::checksum::sum;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A disk that counts the requests it gets.
    #[derive(Debug)]
    struct Counting {
        disk: MemDisk,
        reads: AtomicUsize,
        writes: AtomicUsize,
        /// A read covering this offset fails.
        bad: Option<u64>,
    }

    impl Disk for Counting {
        fn size(&self) -> u64 {
            self.disk.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            if self
                .bad
                .is_some_and(|b| (offset..offset + buf.len() as u64).contains(&b))
            {
                return Err(io::Error::other("a bad sector"));
            }
            self.disk.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.disk.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            self.disk.flush()
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
            self.disk.write_zeroes(offset, len)
        }
    }

    #[test]
    fn adjacent_blocks_go_out_and_come_in_one_request_each_run() {
        let layout = Layout::for_member(0, 64 << 20).unwrap();
        let disk = Counting {
            disk: MemDisk::new(64 << 20),
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            bad: None,
        };
        // Stale entries on the disk under what is set.
        disk.disk
            .write_at(&[0xAB; 3 * 4096], layout.checksum_offset())
            .unwrap();
        let s = DiskSums::new(&layout, true);
        let per = BLOCKS_PER_SUM_BLOCK as usize;
        // Checksum blocks 0 and 1 set whole, block 2 in part.
        let whole: Vec<u32> = (1..=2 * per as u32).collect();
        s.set(&disk, 0, &whole);
        s.set(&disk, 2 * per as u64 * DATA_BLOCK, &[9]);
        assert_eq!(s.write_out(&disk).unwrap(), 3);
        // Only block 2 was read (for its other entries), and the three
        // went out in one write.
        assert_eq!(disk.reads.load(Ordering::Relaxed), 1);
        assert_eq!(disk.writes.load(Ordering::Relaxed), 1);
        let again = DiskSums::new(&layout, true);
        let got = again.get(&disk, 0, 2 * per as u64 + 2);
        assert_eq!(
            disk.reads.load(Ordering::Relaxed),
            2,
            "one read for three blocks"
        );
        assert_eq!(&got[..2 * per], &whole[..]);
        assert_eq!(got[2 * per], 9);
        assert_eq!(got[2 * per + 1], 0xABAB_ABAB, "an entry not set kept");
        // Two runs: blocks 0 and 2 are not adjacent.
        let s = DiskSums::new(&layout, true);
        s.set(&disk, 0, &[5]);
        s.set(&disk, 2 * per as u64 * DATA_BLOCK, &[6]);
        let writes = disk.writes.load(Ordering::Relaxed);
        assert_eq!(s.write_out(&disk).unwrap(), 2);
        assert_eq!(disk.writes.load(Ordering::Relaxed), writes + 2);
        assert_eq!(
            runs(vec![7, 3, 4, 5, 9], 2).collect::<Vec<_>>(),
            vec![3..5, 5..6, 7..8, 9..10]
        );
        // A bad sector in the middle block of a run: that block's entries
        // are unknown, its neighbours' are read one by one.
        let bad = Counting {
            disk: disk.disk,
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            bad: Some(layout.checksum_offset() + SUM_BLOCK + 100),
        };
        let got = DiskSums::new(&layout, true).get(&bad, 0, 3 * per as u64);
        assert_eq!(got[0], 5);
        assert!(got[per..2 * per].iter().all(|e| *e == UNKNOWN));
        assert_eq!(got[2 * per], 6);
        assert_eq!(
            bad.reads.load(Ordering::Relaxed),
            4,
            "the run, then each block"
        );
    }

    #[test]
    fn entries_go_out_when_written_and_come_back() {
        let layout = Layout::for_member(0, 64 << 20).unwrap();
        let disk = MemDisk::new(64 << 20);
        disk.write_at(&[0xAB; 4096], layout.checksum_offset())
            .unwrap();
        // An untrusted area reads as unknown and is zeroed before use.
        let s = DiskSums::new(&layout, false);
        assert_eq!(s.get(&disk, 0, 2), vec![UNKNOWN, UNKNOWN]);
        s.set(&disk, 4 << 20, &[sum(&[1; 4096]), 7]);
        assert_eq!(s.write_out(&disk).unwrap(), 1);
        assert!(!s.has_dirty());
        let again = DiskSums::new(&layout, true);
        assert_eq!(again.get(&disk, 0, 1), vec![UNKNOWN]);
        assert_eq!(
            again.get(&disk, 4 << 20, 3),
            vec![sum(&[1; 4096]), 7, UNKNOWN]
        );
        again.fill(4 << 20, (4 << 20) + 8192, UNKNOWN);
        assert_eq!(again.get(&disk, 4 << 20, 2), vec![UNKNOWN, UNKNOWN]);
        assert!(again.has_dirty());
    }
}
