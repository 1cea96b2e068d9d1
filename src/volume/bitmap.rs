//! The write-intent bitmap at work: one [`DiskBitmap`] per disk keeps the
//! disk's bitmap in memory and on disk; a [`BitmapSet`] (every disk of a
//! group) is the [`WriteIntent`] the engine asks before each write.
//!
//! The rules, for every region of a disk's data area:
//! - its bit is durable on the disk before the first write to it is
//!   submitted to that disk's plex ([`DiskBitmap::mark`]); later writes find
//!   the bit set in memory and cost a mutex and a map lookup;
//! - the bit is cleared lazily ([`DiskBitmap::clear_idle`]): only when no
//!   write to the region is in flight, none arrived during a whole clearing
//!   period, the disk was flushed after the last one, the caller does not
//!   pin the region (a volume there has a plex out of sync: the bit then
//!   records what the absent plex missed), and it is not in the hot set
//!   (the [`HOT_SET_BYTES`] of idle regions written most recently keep
//!   their bits up to [`KEEP_PASSES`] periods);
//! - bits are set by concurrent writers in memory and written out by one of
//!   them for all (group commit): a write waits only until the generation
//!   that set its bit is durable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::engine::{Begun, Deferred, EnginePlex, IntentGuard, Later, NewSums, WriteIntent};
use super::generation::{GenerationKeeper, GenerationTicket, VersionRaise};
use super::sums::DiskSums;
use crate::disk::Disk;
use crate::format::Layout;
use crate::format::bitmap::{
    BITMAP_BLOCK, BITS_PER_BLOCK, BitmapError, BitmapHeader, bit, set_bit,
};
use crate::format::checksum::{UNKNOWN, zero_sum};
use crate::format::state::Read;
use crate::format::written;

/// Clearing passes an idle region of the hot set keeps its bit: with
/// `serve`'s 5 s period, a minute.
pub const KEEP_PASSES: u32 = 12;

/// The hot set: the bytes of idle regions, the most recently written
/// first, whose bits are kept up to [`KEEP_PASSES`] (as DRBD's activity
/// log keeps its hot extents): a write after a pause finds its bit set
/// instead of waiting for a bitmap write. What it costs: after a crash, up
/// to this much more is compared between the copies than was being
/// written when it came.
pub const HOT_SET_BYTES: u64 = 1 << 30;

/// What loading found in a disk's bitmap area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A valid bitmap.
    Valid,
    /// An all-zero area: a disk from format version 1, or one whose bitmap
    /// was never written. A fresh bitmap tracks from now on.
    Absent,
    /// A damaged header: a fresh bitmap tracks from now on, and nothing is
    /// known about the past.
    Damaged(BitmapError),
}

/// Activity of one region whose bit is set.
#[derive(Debug, Clone, Copy)]
struct Use {
    /// Writes marked and not finished.
    inflight: u32,
    /// Clearing passes since the region was last written (0: written
    /// since the last pass).
    idle: u32,
    /// Chosen by a clearing pass, waiting for its flush.
    clearing: bool,
    /// Generation of the bitmap that first holds this bit.
    set_gen: u64,
}

/// The disk's written map in memory ([`crate::format::written`]).
#[derive(Debug)]
struct Written {
    header: BitmapHeader,
    header_dirty: bool,
    bits: Vec<u8>,
    /// Bit blocks changed since they were last written.
    dirty: BTreeSet<u64>,
    /// The bitmap generation that set each bit not yet known durable: a
    /// write finding its bit set waits until that generation is durable
    /// (pruned as generations become durable).
    set_gen: HashMap<u64, u64>,
    /// A map made anew in memory (all written, or a new disk's empty one)
    /// is durable once this generation is: every write waits for it.
    floor: u64,
    /// Regions returned to unwritten in memory whose zeroes may not be
    /// durable yet, with the [`Written::epoch`] of their clearing: on disk
    /// their bits stay set until a flush has made the zeroes durable
    /// ([`DiskBitmap::settle_unwritten`]).
    pending: BTreeMap<u64, u64>,
    epoch: u64,
}

impl Written {
    /// A map of `header` holding `bits`: as read from the disk, or made
    /// anew (`fresh`: all of it, header and blocks, to be written).
    fn new(header: BitmapHeader, bits: Vec<u8>, fresh: bool) -> Written {
        Written {
            header,
            header_dirty: fresh,
            bits,
            dirty: if fresh {
                (0..header.blocks()).collect()
            } else {
                BTreeSet::new()
            },
            set_gen: HashMap::new(),
            floor: 0,
            pending: BTreeMap::new(),
            epoch: 0,
        }
    }

    /// A map of `header` with every bit `on`, all of it to be written.
    fn filled(header: BitmapHeader, on: bool) -> Written {
        let mut bits = vec![0u8; (header.blocks() * BITMAP_BLOCK) as usize];
        if on {
            for i in 0..header.regions {
                set_bit(&mut bits, i, true);
            }
        }
        Written::new(header, bits, true)
    }

    /// Copies of bit blocks `which` as they go to the disk: with the bits
    /// of the regions whose clearing is not durable yet still set.
    fn blocks_out(&self, which: BTreeSet<u64>) -> Vec<(u64, Vec<u8>)> {
        let mut out = copy_blocks(&self.bits, which);
        for (b, data) in &mut out {
            let first = *b * BITS_PER_BLOCK;
            for (&i, _) in self.pending.range(first..first + BITS_PER_BLOCK) {
                set_bit(data, i - first, true);
            }
        }
        out
    }

    /// Sets bit `i`; true when it was clear.
    fn set(&mut self, i: u64, generation: u64) -> bool {
        self.pending.remove(&i);
        if bit(&self.bits, i) {
            return false;
        }
        set_bit(&mut self.bits, i, true);
        self.dirty.insert(i / BITS_PER_BLOCK);
        self.set_gen.insert(i, generation);
        true
    }

    /// Data-area ranges within `[start, end)` whose bits are set, merged.
    fn ranges(&self, start: u64, end: u64) -> Vec<Range<u64>> {
        let r = self.header.region_size;
        let mut out: Vec<Range<u64>> = Vec::new();
        for i in self.header.regions_of(start, end) {
            if !bit(&self.bits, i) {
                continue;
            }
            let (a, b) = ((i * r).max(start), ((i + 1) * r).min(end));
            match out.last_mut() {
                Some(last) if last.end == a => last.end = b,
                _ => out.push(a..b),
            }
        }
        out
    }
}

#[derive(Debug)]
struct State {
    header: BitmapHeader,
    header_dirty: bool,
    bits: Vec<u8>,
    uses: HashMap<u64, Use>,
    /// Bumped on every change in memory.
    generation: u64,
    /// Bit blocks changed since they were last written.
    dirty: BTreeSet<u64>,
    /// The written map; `None` on a disk without one (formatted before
    /// format 4): every region counts as written.
    written: Option<Written>,
    /// Regions whose checksums are not trusted: dirty when the disk was
    /// opened, not rehashed whole since. Their entries count as unknown,
    /// and are made so on disk before their bits are cleared.
    untrusted: BTreeSet<u64>,
}

/// One disk's bitmap.
#[derive(Debug)]
pub struct DiskBitmap {
    pub disk: Arc<dyn Disk>,
    /// Absolute offset of the bitmap area.
    area: u64,
    /// Absolute offset of the written map's area.
    written_area: u64,
    /// Absolute offset of the data area.
    pub data_offset: u64,
    /// Bytes of the data area.
    data_size: u64,
    state: Mutex<State>,
    /// Serializes writing out: true while a caller writes ([`Writing`]).
    io: Mutex<bool>,
    /// Told when the writer is done.
    io_done: std::sync::Condvar,
    /// The disk without a deadline, and how long a caller with one waits
    /// for another's write ([`DiskBitmap::set_patient`]).
    patient: std::sync::OnceLock<(Arc<dyn Disk>, std::time::Duration)>,
    /// The newest generation known durable.
    durable: AtomicU64,
    /// Bitmap blocks written, for tests and benchmarks.
    pub writes: AtomicU64,
    /// Bytes of the hot set ([`HOT_SET_BYTES`]; tests make it smaller).
    hot_set: AtomicU64,
    /// Runs once, before anything of this bitmap is first written.
    /// Raises the disk's labels to the current format version before the
    /// first bitmap write ([`DiskBitmap::set_version_raise`]).
    raise: std::sync::OnceLock<Arc<VersionRaise>>,
    /// Writes waiting for their bits without a thread each
    /// ([`DiskBitmap::when_durable`]).
    waiters: Mutex<Waiters>,
    /// The disk's block checksums ([`crate::format::checksum`]): written
    /// out by the clearing pass before the bits of their regions go.
    pub sums: DiskSums,
}

/// What waits for a generation of a bitmap to be durable: (generation,
/// what runs then); `writing` while a job writes them out.
#[derive(Default)]
struct Waiters {
    list: Vec<(u64, Later)>,
    writing: bool,
}

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Waiters({}, writing: {})", self.list.len(), self.writing)
    }
}

/// The bitmap's writer while it writes; dropping it lets the next one in.
struct Writing<'a>(&'a DiskBitmap);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        *self.0.io.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.io_done.notify_all();
    }
}

impl DiskBitmap {
    /// Reads the bitmap of a disk with `layout`. An absent or damaged one is
    /// replaced in memory by a clean bitmap with `wanted_region` bytes per
    /// bit that tracks from config seqno `since`; nothing is written until
    /// the first bit is set (or [`DiskBitmap::persist_header`]).
    pub fn load(
        disk: Arc<dyn Disk>,
        layout: &Layout,
        wanted_region: u64,
        since: u64,
    ) -> io::Result<(DiskBitmap, Found)> {
        DiskBitmap::load_or_fresh(disk, layout, wanted_region, since, true)
    }

    /// A fresh bitmap for the disk, tracking from `since` on, whatever its
    /// area holds (written over at its first write): for a disk whose
    /// writes went untracked for a while, whose old bits and header would
    /// claim more than they cover.
    pub fn fresh(
        disk: Arc<dyn Disk>,
        layout: &Layout,
        wanted_region: u64,
        since: u64,
    ) -> io::Result<DiskBitmap> {
        DiskBitmap::load_or_fresh(disk, layout, wanted_region, since, false).map(|(b, _)| b)
    }

    fn load_or_fresh(
        disk: Arc<dyn Disk>,
        layout: &Layout,
        wanted_region: u64,
        since: u64,
        read: bool,
    ) -> io::Result<(DiskBitmap, Found)> {
        let area = layout.bitmap_offset();
        let mut head = vec![0u8; BITMAP_BLOCK as usize];
        if read {
            disk.read_at(&mut head, area)?;
        }
        let fresh = BitmapHeader::new(layout.data_size, wanted_region, since);
        let (header, found) = match BitmapHeader::decode(&head) {
            Ok(Some(h)) if h.regions == layout.data_size.div_ceil(h.region_size) => {
                (h, Found::Valid)
            }
            Ok(Some(_)) => (
                fresh,
                Found::Damaged(BitmapError::Inconsistent("region count")),
            ),
            Ok(None) => (fresh, Found::Absent),
            Err(e) => (fresh, Found::Damaged(e)),
        };
        let mut bits = vec![0u8; (header.blocks() * BITMAP_BLOCK) as usize];
        let mut uses = HashMap::new();
        if found == Found::Valid {
            disk.read_at(&mut bits, area + BITMAP_BLOCK)?;
            for i in 0..header.regions {
                if bit(&bits, i) {
                    uses.insert(
                        i,
                        Use {
                            inflight: 0,
                            idle: KEEP_PASSES,
                            clearing: false,
                            set_gen: 0,
                        },
                    );
                }
            }
        }
        let written = DiskBitmap::load_written(&*disk, layout, wanted_region, read)?;
        // The checksums are trusted where the bitmap and the written map
        // tell what they cover: both read whole (the caller distrusts a
        // disk of an older format).
        let trusted = found == Found::Valid && written.as_ref().is_some_and(|w| !w.header_dirty);
        let sums = DiskSums::new(layout, trusted);
        // Regions dirty at the last stop: their entries may lag their data
        // (or be torn); unknown until rehashed whole.
        let untrusted = if trusted {
            uses.keys().copied().collect()
        } else {
            BTreeSet::new()
        };
        // A written region larger than an intent region (a data area over
        // 7.4 TiB with 1 MiB regions, over 478 GiB with 64 KiB ones): the
        // first write to it filled the entries of the whole
        // written region with the zero block's in memory, durable only with
        // the next clearing pass, while its bit went out with the intent
        // bit of the part written. The intent regions beside a dirty one
        // in its written region may still hold an earlier life's entries
        // on disk: unknown now, and written out before the dirty bit goes.
        if let Some(w) = written
            .as_ref()
            .filter(|w| trusted && w.header.region_size > header.region_size)
        {
            let (ir, wr) = (header.region_size, w.header.region_size);
            let beside: BTreeSet<u64> = uses
                .keys()
                .flat_map(|&i| w.header.regions_of(i * ir, (i + 1) * ir))
                .flat_map(|j| header.regions_of(j * wr, (j + 1) * wr))
                .filter(|i| !uses.contains_key(i))
                .collect();
            for i in beside {
                sums.fill(i * ir, ((i + 1) * ir).min(layout.data_size), UNKNOWN);
            }
        }
        let b = DiskBitmap {
            disk,
            area,
            written_area: layout.written_offset(),
            data_offset: layout.data_offset(),
            data_size: layout.data_size,
            state: Mutex::new(State {
                header,
                header_dirty: found != Found::Valid,
                bits,
                uses,
                generation: 0,
                dirty: BTreeSet::new(),
                written,
                untrusted,
            }),
            io: Mutex::new(false),
            io_done: std::sync::Condvar::new(),
            patient: std::sync::OnceLock::new(),
            durable: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            hot_set: AtomicU64::new(HOT_SET_BYTES),
            raise: std::sync::OnceLock::new(),
            waiters: Mutex::new(Waiters::default()),
            sums,
        };
        {
            let mut s = b.lock();
            if found != Found::Valid {
                // A fresh bitmap replaces whatever was there, bits included.
                s.generation = 1;
                s.dirty = (0..header.blocks()).collect();
            }
            // A written map made anew (all written) must be on the disk
            // before any write relies on it.
            let st = &mut *s;
            if let Some(w) = st.written.as_mut().filter(|w| w.header_dirty) {
                st.generation = st.generation.max(1);
                w.floor = st.generation;
            }
        }
        Ok((b, found))
    }

    /// The written map of the disk: `None` when its area is all zero (a
    /// disk formatted before format 4); a damaged one, or one of a `fresh`
    /// bitmap (`read` false: writes may have gone untracked), counts every
    /// region as written until it is written out anew.
    fn load_written(
        disk: &dyn Disk,
        layout: &Layout,
        wanted_region: u64,
        read: bool,
    ) -> io::Result<Option<Written>> {
        let full = written::new_header(layout.data_size, wanted_region);
        if !read {
            return Ok(Some(Written::filled(full, true)));
        }
        match written::read(disk, layout)? {
            Read::Empty => Ok(None),
            Read::Good(w) => Ok(Some(Written::new(w.header, w.bits, false))),
            Read::Damaged(why) => {
                tracing::warn!(
                    offset = layout.written_offset(),
                    "a disk's written map is damaged ({why}): every region of it counts as written"
                );
                Ok(Some(Written::filled(full, true)))
            }
        }
    }

    /// Gives a newly formatted disk an empty written map (no plex lies on
    /// it yet; plexes are born zeroed or resynced), written out in full
    /// with the next bitmap write so that its blocks are allocated from
    /// the start (a full filesystem under a sparse image does not refuse a
    /// bit later).
    pub fn start_written_map(&self, wanted_region: u64) {
        let header = written::new_header(self.data_size, wanted_region);
        let mut s = self.lock();
        s.generation += 1;
        let mut w = Written::filled(header, false);
        w.floor = s.generation;
        s.written = Some(w);
        drop(s);
        self.sums.trust_fresh();
    }

    /// Has the disk's labels raised by `raise` before the first bitmap write
    /// (a failure fails that write, and the next one tries again).
    pub fn set_version_raise(&self, raise: Arc<VersionRaise>) {
        let _ = self.raise.set(raise);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn header(&self) -> BitmapHeader {
        self.lock().header
    }

    /// Data-area byte ranges whose bits are set, merged, in order.
    pub fn dirty_ranges(&self) -> Vec<Range<u64>> {
        let s = self.lock();
        let mut regions: Vec<u64> = s.uses.keys().copied().collect();
        regions.sort_unstable();
        let r = s.header.region_size;
        let mut out: Vec<Range<u64>> = Vec::new();
        for i in regions {
            match out.last_mut() {
                Some(last) if last.end == i * r => last.end += r,
                _ => out.push(i * r..(i + 1) * r),
            }
        }
        out
    }

    /// Regions with a set bit.
    pub fn dirty_count(&self) -> u64 {
        self.lock().uses.len() as u64
    }

    /// Sets the bits of data-area bytes `[start, end)` and returns once they
    /// are durable. The returned guard ends the write ([`DiskBitmap::done`]).
    pub fn mark(&self, start: u64, end: u64) -> io::Result<Range<u64>> {
        let (regions, need) = self.mark_in_memory(start, end);
        self.make_durable(regions, need, false)
    }

    /// The first half of [`DiskBitmap::mark`]: the bits set in memory, the
    /// writes counted in; returns the regions and the generation that must
    /// be durable before the write may go to the disk.
    fn mark_in_memory(&self, start: u64, end: u64) -> (Range<u64>, u64) {
        let mut need = 0;
        let regions = {
            let mut s = self.lock();
            let regions = s.header.regions_of(start, end);
            let mut bumped = false;
            for i in regions.clone() {
                if let Some(u) = s.uses.get_mut(&i) {
                    u.inflight += 1;
                    u.idle = 0;
                    u.clearing = false;
                    need = need.max(u.set_gen);
                    continue;
                }
                if !bumped {
                    s.generation += 1;
                    bumped = true;
                }
                let gen_now = s.generation;
                set_bit(&mut s.bits, i, true);
                s.dirty.insert(i / BITS_PER_BLOCK);
                s.uses.insert(
                    i,
                    Use {
                        inflight: 1,
                        idle: 0,
                        clearing: false,
                        set_gen: gen_now,
                    },
                );
                need = gen_now;
            }
            // The written map's bits, set before the first write to a
            // region goes to this disk, with the same bitmap write.
            let st = &mut *s;
            if let Some(w) = st.written.as_mut() {
                let r = w.header.region_size;
                for i in w.header.regions_of(start, end) {
                    if !bit(&w.bits, i) && !bumped {
                        st.generation += 1;
                        bumped = true;
                    }
                    if w.set(i, st.generation) {
                        // Never written: zeroes, whatever its entries said
                        // (set under the lock, before any write to it).
                        self.sums.fill(i * r, (i + 1) * r, zero_sum());
                    }
                    if let Some(g) = w.set_gen.get(&i) {
                        need = need.max(*g);
                    }
                }
                need = need.max(w.floor);
            }
            regions
        };
        (regions, need)
    }

    /// The second half of [`DiskBitmap::mark`]: waits until generation
    /// `need` is durable (writing it out when nobody else is); on an error
    /// the marked writes are counted out again.
    fn make_durable(
        &self,
        regions: Range<u64>,
        need: u64,
        patient: bool,
    ) -> io::Result<Range<u64>> {
        if need > self.durable.load(Ordering::Acquire)
            && let Err(e) = self.persist(need, patient)
        {
            self.done(regions);
            return Err(e);
        }
        Ok(regions)
    }

    /// Whether generation `need` still has to be written out.
    fn needs_write(&self, need: u64) -> bool {
        need > self.durable.load(Ordering::Acquire)
    }

    /// Runs `then` once generation `need` is durable, without holding a
    /// thread meanwhile: one job at a time writes out every generation
    /// waited for (group commit) on the threads that wait for cold bits,
    /// and runs what waited; on an error, what waited gets it.
    pub fn when_durable(self: &Arc<Self>, need: u64, then: Later) {
        if !self.needs_write(need) {
            return then(Ok(()));
        }
        let start = {
            let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            w.list.push((need, then));
            !std::mem::replace(&mut w.writing, true)
        };
        if start {
            let this = self.clone();
            super::engine::off_thread(Box::new(move || this.write_for_waiters()));
        }
    }

    /// The job of [`DiskBitmap::when_durable`]: writes out what is waited
    /// for, runs the waiters, and goes to the back of the pool's queue while
    /// more wait (a far disk's bits never hold a waiting thread for good).
    fn write_for_waiters(self: Arc<Self>) {
        {
            let need = {
                let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
                match w.list.iter().map(|(n, _)| *n).max() {
                    Some(n) => n,
                    None => {
                        w.writing = false;
                        return;
                    }
                }
            };
            let r = if self.needs_write(need) {
                self.persist(need, false)
            } else {
                Ok(())
            };
            let ready: Vec<(u64, Later)> = {
                let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
                let list = std::mem::take(&mut w.list);
                let (ready, later): (Vec<_>, Vec<_>) = list
                    .into_iter()
                    .partition(|(n, _)| r.is_err() || !self.needs_write(*n));
                w.list = later;
                ready
            };
            for (_, then) in ready {
                then(match &r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
        super::engine::off_thread(Box::new(move || self.write_for_waiters()));
    }

    /// Ends writes to `regions` that [`DiskBitmap::mark`] began.
    pub fn done(&self, regions: Range<u64>) {
        let mut s = self.lock();
        for i in regions {
            if let Some(u) = s.uses.get_mut(&i) {
                u.inflight = u.inflight.saturating_sub(1);
                u.idle = 0;
            }
        }
    }

    /// Gives the bitmap its disk's queue without a deadline, for the bits of
    /// a volume's last in-sync copy; a caller with a deadline waits for
    /// another caller's write at most the queue's deadline.
    pub fn set_patient(&self, queue: &Arc<crate::volume::queue::DiskQueue>) {
        let disk: Arc<dyn Disk> =
            Arc::new(crate::volume::queue::QueuedDisk::patient(queue.clone()));
        let _ = self.patient.set((disk, queue.timeout()));
    }

    /// Waits for the bitmap's writer to be done and becomes it. A patient
    /// caller (a last copy's bits) waits as long as it takes; any other
    /// gives up after the deadline, so that a last copy's write held by a
    /// hung disk stalls only its own volume.
    fn begin_write(&self, patient: bool) -> io::Result<Writing<'_>> {
        let limit = match (patient, self.patient.get()) {
            (false, Some((_, wait))) => Some(*wait),
            _ => None,
        };
        let started = std::time::Instant::now();
        let mut busy = self.io.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = match limit {
                None => self.io_done.wait(busy).unwrap_or_else(|e| e.into_inner()),
                Some(limit) => {
                    let Some(left) = limit.checked_sub(started.elapsed()) else {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the write-intent bitmap's disk did not answer within the deadline",
                        ));
                    };
                    self.io_done
                        .wait_timeout(busy, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        *busy = true;
        Ok(Writing(self))
    }

    /// Writes out every change up to generation `need` (and any made since),
    /// then flushes. One caller writes for all who wait; a `patient` one
    /// (a last copy's bits) without the deadline.
    fn persist(&self, need: u64, patient: bool) -> io::Result<()> {
        let _writing = self.begin_write(patient)?;
        let disk: &dyn Disk = match (patient, self.patient.get()) {
            (true, Some((d, _))) => &**d,
            _ => &*self.disk,
        };
        if self.durable.load(Ordering::Acquire) >= need {
            return Ok(());
        }
        let (header, blocks, written_header, written_blocks, snap) = {
            let mut s = self.lock();
            let header = s.header_dirty.then(|| s.header.encode());
            s.header_dirty = false;
            let dirty = std::mem::take(&mut s.dirty);
            let blocks = copy_blocks(&s.bits, dirty);
            let (written_header, written_blocks) = match s.written.as_mut() {
                Some(w) => {
                    let header = w.header_dirty.then(|| written::encode(&w.header));
                    w.header_dirty = false;
                    let which = std::mem::take(&mut w.dirty);
                    (header, w.blocks_out(which))
                }
                None => (None, Vec::new()),
            };
            (header, blocks, written_header, written_blocks, s.generation)
        };
        let r = (|| {
            // An area of untrusted checksums is zeroed before the disk
            // may be taken for one of format 5.
            self.sums.wipe_if_needed(disk)?;
            if let Some(raise) = self.raise.get() {
                raise.ensure()?;
            }
            // The written map's blocks before its header: a new map's
            // header says it knows only once its bits are there.
            let mut writes: Vec<(u64, &[u8])> = blocks
                .iter()
                .map(|(b, data)| (self.area + (b + 1) * BITMAP_BLOCK, &data[..]))
                .chain(
                    written_blocks
                        .iter()
                        .map(|(b, data)| (self.written_area + (b + 1) * BITMAP_BLOCK, &data[..])),
                )
                .collect();
            // With fault points, the bits go out first on their own, so a
            // crash can fall between them and the header and flush.
            let split = cfg!(feature = "failpoints") && !writes.is_empty();
            if split {
                disk.write_all_then_flush(&writes, false)?;
                crate::crash_point!("bitmap-mid-write");
                writes.clear();
            }
            if let Some(h) = &header {
                writes.push((self.area, &h[..]));
            }
            if let Some(h) = &written_header {
                writes.push((self.written_area, &h[..]));
            }
            // Otherwise one request: the blocks, the header, the flush
            // (which may make only these writes durable: FUA).
            disk.write_all_then_flush(&writes, true)?;
            if split {
                disk.flush()?;
            }
            self.writes
                .fetch_add(blocks.len() as u64, Ordering::Relaxed);
            Ok(())
        })();
        match r {
            Ok(()) => {
                self.durable.store(snap, Ordering::Release);
                if !written_blocks.is_empty()
                    && let Some(w) = self.lock().written.as_mut()
                {
                    w.set_gen.retain(|_, g| *g > snap);
                }
                Ok(())
            }
            Err(e) => {
                let mut s = self.lock();
                s.dirty.extend(blocks.iter().map(|(b, _)| *b));
                s.header_dirty |= header.is_some();
                if let Some(w) = s.written.as_mut() {
                    w.dirty.extend(written_blocks.iter().map(|(b, _)| *b));
                    w.header_dirty |= written_header.is_some();
                }
                Err(e)
            }
        }
    }

    /// Writes the header (and any pending change) now: a new disk's bitmap
    /// starts tracking at once.
    pub fn persist_header(&self) -> io::Result<()> {
        let need = {
            let mut s = self.lock();
            s.header_dirty = true;
            s.generation += 1;
            s.generation
        };
        self.persist(need, false)
    }

    /// Writes out the checksums changed in memory (without a flush); an
    /// untrusted area is zeroed and the disk raised to format 5 first.
    fn write_sums(&self) -> io::Result<()> {
        if !self.sums.has_dirty() {
            return Ok(());
        }
        let _writing = self.begin_write(false)?;
        self.sums.wipe_if_needed(&*self.disk)?;
        if let Some(raise) = self.raise.get() {
            raise.ensure()?;
        }
        self.sums.write_out(&*self.disk)?;
        Ok(())
    }

    /// Makes the checksums changed in memory durable now (write, then
    /// flush): before a resync's checkpoint or the end of a copy, whose
    /// target has no bits that would keep them untrusted after a crash.
    pub fn persist_sums(&self) -> io::Result<()> {
        if self.sums.has_dirty() {
            self.write_sums()?;
            self.disk.flush()?;
        }
        Ok(())
    }

    /// Sets the bytes of the hot set (see [`HOT_SET_BYTES`]).
    pub fn set_hot_set(&self, bytes: u64) {
        self.hot_set.store(bytes, Ordering::Relaxed);
    }

    /// One pass of lazy clearing: regions that were idle for a whole period
    /// since the previous pass lose their bits, unless a write is in flight
    /// or `pinned(data-area range)` says so. With `now`, every idle region
    /// goes at once (clean shutdown). Returns the regions cleared.
    pub fn clear_idle(&self, now: bool, pinned: &dyn Fn(Range<u64>) -> bool) -> io::Result<u64> {
        // Unwritten regions not on disk yet go out too (a clean stop
        // leaves none behind).
        let pending = self
            .lock()
            .written
            .as_ref()
            .is_some_and(|w| !w.pending.is_empty());
        if pending {
            self.settle_unwritten();
        }
        let candidates: Vec<u64> = {
            let mut s = self.lock();
            let r = s.header.region_size;
            let keep = (self.hot_set.load(Ordering::Relaxed) / r.max(1)) as usize;
            let mut out = Vec::new();
            let mut idle = Vec::new();
            for (i, u) in s.uses.iter_mut() {
                if u.inflight > 0 || pinned(i * r..(i + 1) * r) {
                    continue;
                }
                if now {
                    u.clearing = true;
                    out.push(*i);
                    continue;
                }
                u.idle = u.idle.saturating_add(1);
                // Written during the period that just ended: kept.
                if u.idle >= 2 {
                    idle.push((u.idle, *i));
                }
            }
            // The hot set: the most recently written idle regions keep
            // their bits for a while, so a pause does not make their next
            // writes cold again.
            idle.sort_unstable();
            for (n, (passes, i)) in idle.into_iter().enumerate() {
                if n < keep && passes < KEEP_PASSES {
                    continue;
                }
                if let Some(u) = s.uses.get_mut(&i) {
                    u.clearing = true;
                }
                out.push(i);
            }
            out
        };
        // Checksums changed in clean regions (a read's repair) go out with
        // the next pass that clears a bit: a pass with nothing to clear
        // writes nothing (a command that changes nothing leaves every disk
        // as it was). A resync's target has its own made durable at each
        // checkpoint ([`DiskBitmap::persist_sums`]).
        if candidates.is_empty() {
            return Ok(0);
        }
        self.settle_untrusted(&candidates);
        // The checksums of the regions chosen are final (a write since
        // makes its region hot again): they go out now, and the flush
        // makes them durable with the data before the bits go.
        self.write_sums()?;
        // Every write that finished before the pass is made durable before
        // its bit may go; writes since then make their region hot again.
        self.disk.flush()?;
        let need = {
            let mut s = self.lock();
            let mut cleared = 0;
            for i in &candidates {
                let Some(u) = s.uses.get(i).copied() else {
                    continue;
                };
                if u.clearing && u.inflight == 0 {
                    s.uses.remove(i);
                    set_bit(&mut s.bits, *i, false);
                    s.dirty.insert(i / BITS_PER_BLOCK);
                    cleared += 1;
                }
            }
            if cleared == 0 {
                return Ok(0);
            }
            s.generation += 1;
            (s.generation, cleared)
        };
        self.persist(need.0, false)?;
        Ok(need.1)
    }

    /// The checksum entries of `n` blocks from block-aligned data-area
    /// offset `first`: unknown in regions never written (they read as
    /// zeroes whatever their entries say).
    pub fn sums_of(&self, first: u64, n: u64) -> Vec<u32> {
        let mut v = self.sums.get(&*self.disk, first, n);
        let s = self.lock();
        if !s.untrusted.is_empty() {
            let r = s.header.region_size;
            for (j, e) in v.iter_mut().enumerate() {
                let i = (first + j as u64 * crate::format::checksum::DATA_BLOCK) / r;
                if s.untrusted.contains(&i) {
                    *e = UNKNOWN;
                }
            }
        }
        if let Some(w) = s.written.as_ref() {
            let r = w.header.region_size;
            for (j, e) in v.iter_mut().enumerate() {
                let i = (first + j as u64 * crate::format::checksum::DATA_BLOCK) / r;
                if i >= w.header.regions || !bit(&w.bits, i) {
                    *e = UNKNOWN;
                }
            }
        }
        v
    }

    /// Records the checksums of `data`, now at data-area offset `start`
    /// (whole blocks only).
    pub fn rehash(&self, start: u64, data: &[u8]) {
        let (first, sums) = crate::format::checksum::sums_of(start, data);
        self.sums.set_read(&*self.disk, first, &sums);
        self.trust_within(start, start + data.len() as u64);
    }

    /// The regions wholly inside data-area `[start, end)` got every
    /// checksum anew: trusted from now on.
    pub fn trust_within(&self, start: u64, end: u64) {
        let mut s = self.lock();
        if s.untrusted.is_empty() {
            return;
        }
        for i in s.header.regions_within(start, end) {
            s.untrusted.remove(&i);
        }
    }

    /// Makes the entries of untrusted regions among `regions` unknown, in
    /// memory and (with the next write-out) on disk, before their bits go.
    fn settle_untrusted(&self, regions: &[u64]) {
        let (r, which): (u64, Vec<u64>) = {
            let s = self.lock();
            let which = regions
                .iter()
                .copied()
                .filter(|i| s.untrusted.contains(i))
                .collect();
            (s.header.region_size, which)
        };
        // Unknown first, trusted after: a read between sees one or the
        // other, never a stale entry as trusted.
        for i in &which {
            self.sums.fill(i * r, (i + 1) * r, UNKNOWN);
        }
        let mut s = self.lock();
        for i in which {
            s.untrusted.remove(&i);
        }
    }

    /// Whether the disk has a written map (a disk formatted before format 4
    /// has none: every region of it counts as written).
    pub fn has_written_map(&self) -> bool {
        self.lock().written.is_some()
    }

    /// Data-area ranges within `[start, end)` that were ever written,
    /// merged and in order; all of it on a disk without a written map.
    pub fn written_ranges(&self, start: u64, end: u64) -> Vec<Range<u64>> {
        match &self.lock().written {
            Some(w) => w.ranges(start, end),
            None if start < end => std::iter::once(start..end).collect(),
            None => Vec::new(),
        }
    }

    /// Bytes of data-area `[start, end)` whose regions are written; `None`
    /// on a disk without a written map.
    pub fn written_bytes(&self, start: u64, end: u64) -> Option<u64> {
        let s = self.lock();
        let w = s.written.as_ref()?;
        Some(written::bytes_within(&w.header, &w.bits, start, end))
    }

    /// Whether any byte of data-area `[start, end)` was ever written (true
    /// on a disk without a written map).
    pub fn any_written(&self, start: u64, end: u64) -> bool {
        match &self.lock().written {
            Some(w) => w.header.regions_of(start, end).any(|i| bit(&w.bits, i)),
            None => start < end,
        }
    }

    /// Records data-area `ranges` as written and returns once that is
    /// durable: a resync's target, before the regions its sources hold
    /// are copied to it. Nothing to do on a disk without a written map.
    ///
    /// A region newly marked held zeroes on this disk (never written): its
    /// checksum entries become the zero block's, as a write's first mark
    /// makes them, so that stale entries of an earlier life are never
    /// trusted where the caller does not copy (a resync copying only part
    /// of a region larger than a write-intent region). With `hashed`, the
    /// caller already set the entries within `ranges`; those are kept.
    pub fn set_written(&self, ranges: &[Range<u64>], hashed: bool) -> io::Result<()> {
        // No intent bit covers a region marked here: the zero block's
        // entries of the regions not marked yet are made durable before
        // their bits are set at all (in memory too, where any write-out of
        // the map would take them), so that no crash leaves a bit over an
        // earlier life's entries, trusted. Unmarked, the entries are not
        // used. A region found unmarked again (a TRIM in between) and not
        // filled yet goes round once more.
        let mut filled: BTreeSet<u64> = BTreeSet::new();
        let need = loop {
            let fresh = {
                let s = self.lock();
                let Some(w) = s.written.as_ref() else {
                    return Ok(());
                };
                let size = w.header.region_size;
                let mut fresh = false;
                for r in ranges {
                    for i in w.header.regions_of(r.start, r.end) {
                        if bit(&w.bits, i) || !filled.insert(i) {
                            continue;
                        }
                        fresh = true;
                        let (a, b) = (i * size, (i + 1) * size);
                        if hashed {
                            self.sums.fill(a, r.start.clamp(a, b), zero_sum());
                            self.sums.fill(r.end.clamp(a, b), b, zero_sum());
                        } else {
                            self.sums.fill(a, b, zero_sum());
                        }
                    }
                }
                fresh
            };
            if fresh {
                self.persist_sums()?;
            }
            let mut s = self.lock();
            let st = &mut *s;
            let Some(w) = st.written.as_mut() else {
                return Ok(());
            };
            let next = st.generation + 1;
            let mut changed = false;
            let mut again = false;
            // Bits set already may not be durable yet either.
            let mut need = w.floor;
            for r in ranges {
                for i in w.header.regions_of(r.start, r.end) {
                    if !bit(&w.bits, i) && !filled.contains(&i) {
                        again = true;
                        continue;
                    }
                    // A write finding the bit set waits for `next` too.
                    changed |= w.set(i, next);
                    if let Some(g) = w.set_gen.get(&i) {
                        need = need.max(*g);
                    }
                }
            }
            if changed {
                st.generation = next;
            }
            if !again {
                break need;
            }
        };
        if self.needs_write(need) {
            self.persist(need, false)?;
        }
        Ok(())
    }

    /// Records the regions that lie wholly inside data-area `[start, end)`
    /// as never written, once the caller made their zeroes durable on the
    /// disk (`create` zeroes a new plex's extent).
    pub fn clear_written(&self, start: u64, end: u64) -> io::Result<()> {
        let need = {
            let mut s = self.lock();
            let st = &mut *s;
            let Some(w) = st.written.as_mut() else {
                return Ok(());
            };
            let mut changed = false;
            let whole = w.header.regions_within(start, end);
            for i in whole.clone() {
                if bit(&w.bits, i) {
                    set_bit(&mut w.bits, i, false);
                    w.dirty.insert(i / BITS_PER_BLOCK);
                    changed = true;
                }
            }
            // The zeroed blocks of regions shared with a neighbour (still
            // written): their checksums are the zero block's, not those of
            // what was there before (the caller makes them durable).
            let r = w.header.region_size;
            let (a, b) = if whole.is_empty() {
                (end, end)
            } else {
                (whole.start * r, whole.end * r)
            };
            self.sums.fill(start, a.min(end), zero_sum());
            self.sums.fill(b.max(start), end, zero_sum());
            if !changed {
                return Ok(());
            }
            st.generation += 1;
            st.generation
        };
        self.persist(need, false)
    }

    /// After zeroes that may leave holes completed on this disk over
    /// data-area `[start, end)`, their write still counted in: the written
    /// regions wholly inside it that no other write has marked become
    /// unwritten, in memory at once (reads and resyncs see zeroes there),
    /// on disk with the next clearing pass, after its flush made the
    /// zeroes durable ([`DiskBitmap::clear_idle`]; a flush per TRIM would
    /// cost a filesystem mounted with `discard` dearly). Returns the
    /// regions.
    pub fn unwrite(&self, start: u64, end: u64) -> u64 {
        {
            let mut s = self.lock();
            let st = &mut *s;
            let Some(w) = st.written.as_mut() else {
                return 0;
            };
            let r = w.header.region_size;
            w.epoch += 1;
            let mut n = 0;
            for i in w.header.regions_within(start, end) {
                if !bit(&w.bits, i) {
                    continue;
                }
                // The zeroing write counts 1 in each of its intent regions;
                // more is another write, which keeps the region written.
                let busy = st
                    .header
                    .regions_of(i * r, (i + 1) * r)
                    .any(|j| st.uses.get(&j).is_some_and(|u| u.inflight > 1));
                if busy {
                    continue;
                }
                set_bit(&mut w.bits, i, false);
                w.pending.insert(i, w.epoch);
                n += 1;
            }
            n
        }
    }

    /// Writes out the clearings of [`DiskBitmap::unwrite`] made so far,
    /// after a flush of the disk makes their zeroes durable (a failure
    /// leaves the bits set on disk: the regions count as written there).
    fn settle_unwritten(&self) {
        let Some(epoch) = self.lock().written.as_ref().map(|w| w.epoch) else {
            return;
        };
        if let Err(e) = self.disk.flush() {
            tracing::warn!(error = %e, "a flush before clearing written bits failed; they stay set");
            return;
        }
        let need = {
            let mut s = self.lock();
            let st = &mut *s;
            let Some(w) = st.written.as_mut() else {
                return;
            };
            let done: Vec<u64> = w
                .pending
                .iter()
                .filter(|(_, e)| **e <= epoch)
                .map(|(i, _)| *i)
                .collect();
            if done.is_empty() {
                return;
            }
            for i in done {
                w.pending.remove(&i);
                w.dirty.insert(i / BITS_PER_BLOCK);
            }
            st.generation += 1;
            st.generation
        };
        if let Err(e) = self.persist(need, false) {
            tracing::warn!(error = %e, "cannot write cleared written bits; they stay set");
        }
    }

    /// Clears the bits of data-area bytes `[start, end)` after a resync made
    /// them equal everywhere (the caller flushed the copies). Offline use:
    /// no write may be in flight.
    pub fn clear_range(&self, start: u64, end: u64) -> io::Result<()> {
        // The checksums rehashed there are durable before the bits go
        // (those not rehashed become unknown).
        let regions: Vec<u64> = self.lock().header.regions_of(start, end).collect();
        self.settle_untrusted(&regions);
        if self.sums.has_dirty() {
            self.write_sums()?;
            self.disk.flush()?;
        }
        let need = {
            let mut s = self.lock();
            for i in s.header.regions_of(start, end) {
                if s.uses.remove(&i).is_some() {
                    set_bit(&mut s.bits, i, false);
                    s.dirty.insert(i / BITS_PER_BLOCK);
                }
            }
            s.generation += 1;
            s.generation
        };
        self.persist(need, false)
    }
}

/// Copies of the 4 KiB blocks `which` of `bits`.
fn copy_blocks(bits: &[u8], which: BTreeSet<u64>) -> Vec<(u64, Vec<u8>)> {
    which
        .into_iter()
        .map(|b| {
            let at = (b * BITMAP_BLOCK) as usize;
            (b, bits[at..at + BITMAP_BLOCK as usize].to_vec())
        })
        .collect()
}

/// The bitmaps of a group's disks: the engine's [`WriteIntent`].
#[derive(Debug, Default)]
pub struct BitmapSet {
    /// Disks join while the group serves (`init` under `serve`, a disk
    /// reactivated that was absent at the start).
    disks: std::sync::RwLock<BTreeMap<Uuid, Arc<DiskBitmap>>>,
    /// Raises the data generation before the first write after an open or
    /// an idle period.
    keeper: std::sync::OnceLock<Arc<GenerationKeeper>>,
}

impl BitmapSet {
    /// Every write asks `keeper` first (once; later calls are ignored).
    pub fn set_keeper(&self, keeper: Arc<GenerationKeeper>) {
        let _ = self.keeper.set(keeper);
    }

    pub fn get(&self, disk: Uuid) -> Option<Arc<DiskBitmap>> {
        self.read().get(&disk).cloned()
    }

    pub fn insert(&self, disk: Uuid, bitmap: Arc<DiskBitmap>) {
        self.disks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(disk, bitmap);
    }

    /// Forgets a disk that left the group: its bitmap is written no more.
    pub fn remove(&self, disk: Uuid) {
        self.disks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&disk);
    }

    /// Every disk's bitmap, in disk order.
    pub fn all(&self) -> Vec<(Uuid, Arc<DiskBitmap>)> {
        self.read().iter().map(|(u, b)| (*u, b.clone())).collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Uuid, Arc<DiskBitmap>>> {
        self.disks.read().unwrap_or_else(|e| e.into_inner())
    }
}

struct Marked(Vec<(Arc<DiskBitmap>, Range<u64>)>);

impl Drop for Marked {
    fn drop(&mut self) {
        for (b, regions) in self.0.drain(..) {
            b.done(regions);
        }
    }
}

/// One disk's part of a marked write: its bitmap, the regions counted in,
/// the bitmap generation that must be durable, and whether it is waited
/// for without a deadline (a volume's last in-sync copy).
struct Mark {
    plex: Arc<EnginePlex>,
    bitmap: Arc<DiskBitmap>,
    regions: Range<u64>,
    need: u64,
    patient: bool,
    /// A write-behind plex's bits: not waited for before the write is let
    /// go; its own write to that plex waits for them
    /// ([`IntentGuard::with_deferred`]).
    deferred: bool,
}

impl Mark {
    /// Whether the write waits for this disk's bits before it goes at all.
    fn waited(&self) -> bool {
        !self.deferred && self.bitmap.needs_write(self.need)
    }
}

/// The bits the write does not wait for, each waited for by its plex's
/// write alone.
fn deferred_of(marks: &[Mark]) -> Vec<(Uuid, Deferred)> {
    marks
        .iter()
        .filter(|m| m.deferred && m.bitmap.needs_write(m.need))
        .map(|m| {
            let (bitmap, need) = (m.bitmap.clone(), m.need);
            let bits: Deferred = Box::new(move |then| bitmap.when_durable(need, then));
            (m.plex.disk, bits)
        })
        .collect()
}

/// Waits until every disk's bits of a marked write are durable (all disks
/// at once), after raising the data generation when `raise`.
fn finish_mark(
    ticket: Option<GenerationTicket>,
    raise: bool,
    marks: Vec<Mark>,
) -> io::Result<IntentGuard> {
    if raise
        && let Some(t) = &ticket
        && let Err(e) = t.raise()
    {
        for m in marks {
            m.bitmap.done(m.regions);
        }
        return Err(e);
    }
    let deferred = deferred_of(&marks);
    let wait = |m: &Mark| {
        if m.deferred {
            Ok(m.regions.clone())
        } else {
            m.bitmap.make_durable(m.regions.clone(), m.need, m.patient)
        }
    };
    let outcomes: Vec<io::Result<Range<u64>>> = if marks.iter().filter(|m| m.waited()).count() > 1 {
        std::thread::scope(|scope| {
            let waits: Vec<_> = marks.iter().map(|m| scope.spawn(move || wait(m))).collect();
            waits
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(io::Error::other("a write-intent bit writer panicked"))
                    })
                })
                .collect()
        })
    } else {
        marks.iter().map(wait).collect()
    };
    // The write goes once a disk it is not deferred on has its bits: then
    // a crash before the deferred ones are durable finds the region dirty
    // there. With none, it does not go at all.
    let anchored = marks
        .iter()
        .zip(&outcomes)
        .any(|(m, o)| !m.deferred && o.is_ok());
    let mut marked = Marked(Vec::with_capacity(marks.len()));
    let mut unmarked = Vec::new();
    let mut first_error = None;
    for (m, outcome) in marks.into_iter().zip(outcomes) {
        match outcome {
            Ok(regions) => marked.0.push((m.bitmap, regions)),
            // The bits on the other disks cover the region; that disk's
            // plex is taken out before the write goes (its written map
            // would lack the write).
            Err(e) => {
                tracing::error!(disk = %m.plex.queue.name(), error = %e, "cannot set a write-intent bit");
                let copy = match e.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(e.kind(), e.to_string()),
                };
                unmarked.push((m.plex.disk, copy));
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        // `marked` lets the deferred regions go when dropped.
        Some(e) if !anchored => Err(e),
        _ => Ok(IntentGuard::new((marked, ticket))
            .with_deferred(deferred)
            .with_unmarked(unmarked)),
    }
}

impl WriteIntent for BitmapSet {
    fn dirty(&self, plexes: &[Arc<EnginePlex>], offset: u64, len: u64) -> Vec<Range<u64>> {
        let disks = self.read();
        let mut all: Vec<Range<u64>> = Vec::new();
        for p in plexes {
            let Some(b) = disks.get(&p.disk) else {
                continue;
            };
            // Volume byte v is byte v + shift of the disk's data area;
            // the disk's other volumes lie outside the window.
            let shift = p.offset - b.data_offset;
            let (lo, hi) = (offset + shift, offset + len + shift);
            for r in b.dirty_ranges() {
                let (start, end) = (r.start.max(lo), r.end.min(hi));
                if start < end {
                    all.push(start - shift..end - shift);
                }
            }
        }
        all.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in all {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        merged
    }

    fn unwritten(&self, plexes: &[Arc<EnginePlex>], offset: u64, len: u64) -> bool {
        let disks = self.read();
        !plexes.is_empty()
            && plexes.iter().all(|p| {
                disks.get(&p.disk).is_some_and(|b| {
                    let start = p.offset - b.data_offset + offset;
                    !b.any_written(start, start + len)
                })
            })
    }

    fn unwrite(&self, plexes: &[Arc<EnginePlex>], offset: u64, len: u64) {
        let disks = self.read();
        for p in plexes {
            if let Some(b) = disks.get(&p.disk) {
                let start = p.offset - b.data_offset + offset;
                b.unwrite(start, start + len);
            }
        }
    }

    fn record_sums(&self, plexes: &[Arc<EnginePlex>], sums: &NewSums) {
        use crate::format::checksum::DATA_BLOCK;
        if !super::sums::enabled() {
            return;
        }
        let disks = self.read();
        for p in plexes {
            let Some(b) = disks.get(&p.disk) else {
                continue;
            };
            let shift = p.offset - b.data_offset;
            match sums {
                NewSums::Each(first, v) => {
                    b.sums.set(&*b.disk, shift + first, v);
                    let start = shift + first;
                    b.trust_within(start, start + v.len() as u64 * DATA_BLOCK);
                }
                NewSums::Zeroes(offset, len) => {
                    b.trust_within(shift + offset, shift + offset + len);
                    let (start, end) = (shift + offset, shift + offset + len);
                    // Written regions only: entries of never-written
                    // ones are never used (they read as zeroes), and the
                    // first mark of a region gives it the zero block's
                    // ([`DiskBitmap::set_written`], the writes' mark).
                    // A rebuild of a volume holding little writes little
                    // of its target's checksum area.
                    for r in b.written_ranges(start, end) {
                        b.sums.fill(r.start, r.end, zero_sum());
                    }
                    // Blocks covered in part: their other bytes unread.
                    let head = start / DATA_BLOCK * DATA_BLOCK;
                    let tail = end / DATA_BLOCK * DATA_BLOCK;
                    if head != start {
                        b.sums.set(&*b.disk, head, &[UNKNOWN]);
                    }
                    if tail != end && tail != head {
                        b.sums.set(&*b.disk, tail, &[UNKNOWN]);
                    }
                }
            }
        }
    }

    fn persist_sums(&self, plex: &EnginePlex) -> io::Result<()> {
        match self.read().get(&plex.disk).cloned() {
            Some(b) => b.persist_sums(),
            None => Ok(()),
        }
    }

    fn sums(&self, plex: &EnginePlex, first: u64, n: u64) -> Option<Vec<u32>> {
        if !super::sums::enabled() {
            return None;
        }
        let b = self.read().get(&plex.disk)?.clone();
        Some(b.sums_of(plex.offset - b.data_offset + first, n))
    }

    fn cover_written(
        &self,
        target: &EnginePlex,
        sources: &[Arc<EnginePlex>],
        len: u64,
    ) -> io::Result<()> {
        let disks = self.read();
        let Some(t) = disks.get(&target.disk).cloned() else {
            return Ok(());
        };
        let tshift = target.offset - t.data_offset;
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for p in sources {
            match disks.get(&p.disk) {
                Some(b) => {
                    let shift = p.offset - b.data_offset;
                    ranges.extend(
                        b.written_ranges(shift, shift + len)
                            .into_iter()
                            .map(|r| r.start - shift + tshift..r.end - shift + tshift),
                    );
                }
                // A source whose disk has no bitmap here cannot tell.
                None => ranges.push(tshift..tshift + len),
            }
        }
        drop(disks);
        t.set_written(&ranges, false)
    }

    /// Blocks until every disk's bits are durable, the deferred ones too
    /// (a caller of `mark` does not wait for them itself).
    fn mark(&self, plexes: &[Arc<EnginePlex>], offset: u64, len: u64) -> io::Result<IntentGuard> {
        let mut guard = match self.begin(plexes, offset, len)? {
            Begun::Ready(g) => g,
            Begun::Pending { wait, .. } => wait()?,
        };
        for bits in guard.take_deferred() {
            let (tx, rx) = std::sync::mpsc::channel();
            bits(Box::new(move |r| {
                let _ = tx.send(r);
            }));
            rx.recv()
                .unwrap_or_else(|_| Err(io::Error::other("a write-intent bit writer went away")))?;
        }
        Ok(guard)
    }

    fn begin(&self, plexes: &[Arc<EnginePlex>], offset: u64, len: u64) -> io::Result<Begun> {
        // The data generation first: a copy taken before this write must
        // not pass for current.
        let ticket = self.keeper.get().map(|k| k.enter());
        let raise = ticket.as_ref().is_some_and(|t| t.needs_raise());
        // A last in-sync copy's bits wait for its disk as its data does
        // (the engine gives it no deadline: there is no other copy).
        let in_sync = plexes
            .iter()
            .filter(|p| p.mode() == crate::volume::engine::Mode::InSync)
            .count();
        // A write-behind plex's bits are not waited for: its write waits
        // for them on its own, and the client's answer stands on the
        // others (whose bits cover the write until it lands there).
        let disks = self.read();
        let anchored = plexes.iter().any(|p| {
            p.mode() == crate::volume::engine::Mode::InSync
                && !p.is_write_mostly()
                && disks.contains_key(&p.disk)
        });
        // Bits first, in memory, on every disk; then every disk that must
        // write them out does so at once (a cold region costs one bitmap
        // write and flush, not one per disk in turn).
        let marks: Vec<Mark> = plexes
            .iter()
            .filter_map(|p| {
                let b = disks.get(&p.disk)?;
                let start = p.offset - b.data_offset + offset;
                let (regions, need) = b.mark_in_memory(start, start + len);
                Some(Mark {
                    plex: p.clone(),
                    bitmap: b.clone(),
                    regions,
                    need,
                    patient: in_sync == 1 && p.mode() == crate::volume::engine::Mode::InSync,
                    deferred: anchored && p.writes_behind(),
                })
            })
            .collect();
        drop(disks);
        if !raise && marks.iter().all(|m| !m.waited()) {
            let deferred = deferred_of(&marks);
            let marked = Marked(marks.into_iter().map(|m| (m.bitmap, m.regions)).collect());
            return Ok(Begun::Ready(
                IntentGuard::new((marked, ticket)).with_deferred(deferred),
            ));
        }
        let patient = marks.iter().any(|m| m.patient);
        Ok(Begun::Pending {
            wait: Box::new(move || finish_mark(ticket, raise, marks)),
            patient,
        })
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;

    const MIB: u64 = 1 << 20;

    fn bitmap() -> DiskBitmap {
        let disk: Arc<dyn Disk> = Arc::new(MemDisk::new(64 * MIB));
        let layout = Layout::for_member(0, 64 * MIB).unwrap();
        DiskBitmap::load(disk, &layout, MIB, 1).unwrap().0
    }

    fn write(b: &DiskBitmap, region: u64) {
        let r = b.mark(region * MIB, region * MIB + 4096).unwrap();
        b.done(r);
    }

    fn pass(b: &DiskBitmap) -> u64 {
        b.clear_idle(false, &|_| false).unwrap()
    }

    /// A new disk's bitmap with an empty written map, written out, and a
    /// way to read back what its disk holds.
    fn new_disk() -> (Arc<dyn Disk>, Layout, DiskBitmap) {
        new_disk_with(65536)
    }

    /// [`new_disk`] with written regions of `written_region` bytes (64 KiB
    /// intent regions).
    fn new_disk_with(written_region: u64) -> (Arc<dyn Disk>, Layout, DiskBitmap) {
        let disk: Arc<dyn Disk> = Arc::new(MemDisk::new(64 * MIB));
        let layout = Layout::for_member(0, 64 * MIB).unwrap();
        let b = DiskBitmap::load(disk.clone(), &layout, 65536, 1).unwrap().0;
        b.start_written_map(written_region);
        b.persist_header().unwrap();
        (disk, layout, b)
    }

    fn reload(disk: &Arc<dyn Disk>, layout: &Layout) -> DiskBitmap {
        DiskBitmap::load(disk.clone(), layout, 65536, 1).unwrap().0
    }

    #[test]
    fn a_write_sets_its_written_bit_durably_and_it_outlives_the_intent_bit() {
        let (disk, layout, b) = new_disk();
        assert!(b.has_written_map());
        assert!(b.written_ranges(0, 8 * MIB).is_empty());
        // A 4 KiB write in the middle of a region, and one over two.
        let r = b.mark(MIB + 4096, MIB + 8192).unwrap();
        b.done(r);
        let r = b.mark(3 * MIB - 4096, 3 * MIB + 4096).unwrap();
        b.done(r);
        let regions = vec![MIB..MIB + 65536, 3 * MIB - 65536..3 * MIB + 65536];
        assert_eq!(b.written_ranges(0, 8 * MIB), regions);
        // Durable: a reload (after a crash) finds them.
        assert_eq!(reload(&disk, &layout).written_ranges(0, 8 * MIB), regions);
        // Clearing idle write-intent bits leaves the written map alone.
        b.clear_idle(true, &|_| false).unwrap();
        assert_eq!(b.dirty_count(), 0);
        let back = reload(&disk, &layout);
        assert_eq!(back.dirty_count(), 0);
        assert_eq!(back.written_ranges(0, 8 * MIB), regions);
        assert!(back.any_written(MIB, MIB + 1));
        assert!(!back.any_written(MIB + 65536, 2 * MIB));
    }

    #[test]
    fn a_second_writer_waits_for_a_written_bit_another_is_writing_out() {
        let (_disk, _layout, b) = new_disk();
        // The first writer set the bit in memory; it is not durable yet.
        let (r1, need1) = b.mark_in_memory(0, 4096);
        assert!(b.needs_write(need1));
        // A second write to the same region must wait for it as well,
        // though its bit is already set in memory.
        let (r2, need2) = b.mark_in_memory(8192, 12288);
        assert!(need2 >= need1 && b.needs_write(need2));
        b.make_durable(r1, need1, false).unwrap();
        assert!(!b.needs_write(need2));
        b.done(r2);
    }

    #[test]
    fn zeroes_unwrite_whole_regions_no_other_write_holds_and_the_disk_learns_it_after_a_flush() {
        let (disk, layout, b) = new_disk();
        // A zeroing write over the first MiB (16 regions), still counted
        // in, and another write in its third region, not done yet.
        let zeroes = b.mark(0, MIB).unwrap();
        let other = b.mark(2 * 65536, 2 * 65536 + 4096).unwrap();
        assert_eq!(b.written_ranges(0, MIB), vec![0..MIB]);
        // Only whole regions of the range, and not the one still written.
        assert_eq!(b.unwrite(4096, MIB), 14);
        assert_eq!(
            b.written_ranges(0, MIB),
            vec![0..65536, 2 * 65536..3 * 65536]
        );
        b.done(other);
        b.done(zeroes);
        // On disk only with the next clearing pass, after its flush.
        assert_eq!(reload(&disk, &layout).written_ranges(0, MIB), vec![0..MIB]);
        pass(&b);
        assert_eq!(
            reload(&disk, &layout).written_ranges(0, MIB),
            vec![0..65536, 2 * 65536..3 * 65536]
        );
        // A write there makes it written again, durably.
        let r = b.mark(5 * 65536, 5 * 65536 + 1).unwrap();
        b.done(r);
        assert!(reload(&disk, &layout).any_written(5 * 65536, 5 * 65536 + 1));
    }

    /// A write to a region written long ago does not wait for another
    /// write's first bit elsewhere in the same bit block of the map.
    #[test]
    fn a_hot_write_does_not_wait_for_an_unrelated_first_write() {
        let (_disk, _layout, b) = new_disk();
        let r = b.mark(0, 4096).unwrap();
        b.done(r);
        // Another writer's first write 10 MiB away, not written out yet.
        let (r1, need1) = b.mark_in_memory(10 * MIB, 10 * MIB + 4096);
        assert!(b.needs_write(need1));
        let (r2, need2) = b.mark_in_memory(0, 4096);
        assert!(!b.needs_write(need2), "the hot write goes at once");
        b.done(r1);
        b.done(r2);
    }

    /// A fresh bitmap's map (all written) is not on the disk yet: marking
    /// a resync target's regions, already set in memory, writes it out.
    #[test]
    fn set_written_on_a_fresh_bitmap_writes_its_map_out() {
        let (disk, layout, b) = new_disk();
        drop(b);
        let fresh = DiskBitmap::fresh(disk.clone(), &layout, 65536, 1).unwrap();
        fresh.set_written(&[4 * MIB..5 * MIB], false).unwrap();
        assert!(reload(&disk, &layout).any_written(4 * MIB, 5 * MIB));
        // And a write to it waits for the map as well.
        let (disk, layout, b) = new_disk();
        drop(b);
        let fresh = DiskBitmap::fresh(disk, &layout, 65536, 1).unwrap();
        let (r, need) = fresh.mark_in_memory(6 * MIB, 6 * MIB + 1);
        assert!(fresh.needs_write(need));
        fresh.done(r);
    }

    /// A disk whose bits cannot be written does not get the data: its
    /// plex is taken out (another disk's bits let the write go), so its
    /// written map never lacks what its plex holds.
    #[test]
    fn a_disk_that_cannot_write_its_bits_is_taken_out_before_the_data() {
        use crate::disk::faulty::FaultyDisk;
        use crate::volume::engine::{EngineOptions, FailureSink, MirrorVolume, Mode, NoSink};
        use crate::volume::queue::DiskQueue;
        let layout = Layout::for_member(0, 64 * MIB).unwrap();
        let set = Arc::new(BitmapSet::default());
        let (mut plexes, mut mems, mut faulties) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..2 {
            let mem = Arc::new(MemDisk::new(64 * MIB));
            let faulty = Arc::new(FaultyDisk::new(mem.clone()));
            let disk: Arc<dyn Disk> = faulty.clone();
            let b = DiskBitmap::load(disk.clone(), &layout, 65536, 1).unwrap().0;
            b.start_written_map(65536);
            b.persist_header().unwrap();
            let uuid = Uuid::new_v4();
            set.insert(uuid, Arc::new(b));
            let q = DiskQueue::start(
                &format!("d{i}"),
                disk,
                1,
                std::time::Duration::from_secs(10),
            );
            plexes.push(EnginePlex::new(uuid, q, layout.data_offset(), Mode::InSync));
            mems.push(mem);
            faulties.push(faulty);
        }
        let sink: Arc<dyn FailureSink> = Arc::new(NoSink);
        let vol = MirrorVolume::new(
            "v",
            16 * MIB,
            plexes,
            Arc::downgrade(&sink),
            EngineOptions::default(),
        );
        vol.set_intent(set.clone());
        faulties[1]
            .fail_writes(layout.written_offset()..layout.written_offset() + written::WRITTEN_SIZE);
        vol.write(4 * MIB, &[0x5au8; 4096]).unwrap();
        assert_eq!(vol.plexes()[1].mode(), Mode::Out, "plex 1 is taken out");
        let mut got = vec![1u8; 4096];
        mems[1]
            .read_at(&mut got, layout.data_offset() + 4 * MIB)
            .unwrap();
        assert_eq!(got, vec![0u8; 4096], "the data did not reach disk 1");
        mems[0]
            .read_at(&mut got, layout.data_offset() + 4 * MIB)
            .unwrap();
        assert_eq!(got, vec![0x5au8; 4096], "disk 0 has it");
    }

    #[test]
    fn a_clearing_not_yet_durable_goes_out_as_still_written() {
        let mut w = Written::filled(written::new_header(64 * MIB, 65536), true);
        w.dirty.clear();
        set_bit(&mut w.bits, 3, false);
        w.pending.insert(3, 1);
        set_bit(&mut w.bits, 4, false);
        let out = w.blocks_out([0].into());
        assert!(bit(&out[0].1, 3), "pending: still set on disk");
        assert!(!bit(&out[0].1, 4), "cleared for good");
        assert!(!bit(&w.bits, 3), "unwritten in memory");
        // Written again before it settled: no longer pending.
        assert!(w.set(3, 7));
        assert!(w.pending.is_empty());
    }

    #[test]
    fn regions_newly_marked_written_get_zero_checksums_but_what_was_hashed() {
        let (disk, _layout, b) = new_disk();
        // Stale entries over the first two regions (64 KiB each).
        b.sums.set(&*disk, 0, &[0xABAB_ABAB; 32]);
        b.set_written(&[0..4096], false).unwrap();
        assert!(b.sums_of(0, 16).iter().all(|e| *e == zero_sum()));
        // The caller rehashed two blocks of the second region first.
        b.sums.set(&*disk, 65536, &[7, 7]);
        b.set_written(&[65536..65536 + 8192], true).unwrap();
        let got = b.sums_of(65536, 16);
        assert_eq!(&got[..2], &[7, 7]);
        assert!(got[2..].iter().all(|e| *e == zero_sum()), "{got:x?}");
        // A region written already keeps its entries.
        b.sums.set(&*disk, 0, &[9]);
        b.set_written(&[0..65536], false).unwrap();
        assert_eq!(b.sums_of(0, 1), vec![9]);
    }

    /// A disk whose written map has 128 KiB regions over 64 KiB intent
    /// regions (as a data area over 478 GiB in a group with 64 KiB
    /// regions has), with stale entries durable over its first 128 KiB.
    fn wide_written_disk() -> (Arc<dyn Disk>, Layout, DiskBitmap) {
        let (disk, layout, b) = new_disk_with(131072);
        b.sums.set(&*disk, 0, &[0xABAB_ABAB; 32]);
        b.persist_sums().unwrap();
        (disk, layout, b)
    }

    #[test]
    fn after_a_crash_the_entries_beside_a_dirty_region_in_its_written_region_are_not_trusted() {
        let (disk, layout, b) = wide_written_disk();
        // The first write to the written region [0, 128K) fills its
        // entries in memory; its bits are durable, its entries not yet.
        let r = b.mark(0, 4096).unwrap();
        b.done(r);
        assert!(b.sums_of(16, 16).iter().all(|e| *e == zero_sum()));
        // A crash: the second intent region has no bit, its written
        // region is written, and its stale entries must not be trusted.
        let back = reload(&disk, &layout);
        assert!(back.any_written(65536, 65537));
        let got = back.sums_of(65536, 16);
        assert!(got.iter().all(|e| *e == UNKNOWN), "{got:x?}");
        // Unknown on disk too once the dirty bit is cleared: a clean
        // load later trusts what is there.
        back.clear_idle(true, &|_| false).unwrap();
        assert_eq!(back.dirty_count(), 0);
        let again = reload(&disk, &layout).sums_of(65536, 16);
        assert!(again.iter().all(|e| *e == UNKNOWN), "{again:x?}");
    }

    #[test]
    fn set_written_makes_the_zero_entries_durable_before_the_bits() {
        let (disk, layout, b) = wide_written_disk();
        // A resync's target marks the written region of its first 4 KiB
        // (no intent bit covers it); then a crash.
        b.set_written(&[0..4096], false).unwrap();
        let back = reload(&disk, &layout);
        assert!(back.any_written(65536, 65537));
        let got = back.sums_of(0, 32);
        assert!(got.iter().all(|e| *e == zero_sum()), "{got:x?}");
    }

    #[test]
    fn set_and_clear_written_are_durable_and_clear_only_whole_regions() {
        let (disk, layout, b) = new_disk();
        b.set_written(&[0..MIB], false).unwrap();
        assert_eq!(
            reload(&disk, &layout).written_ranges(0, 4 * MIB),
            vec![0..MIB]
        );
        // Only the regions wholly inside go.
        b.clear_written(4096, MIB - 4096).unwrap();
        let left = vec![0..65536, MIB - 65536..MIB];
        assert_eq!(b.written_ranges(0, 4 * MIB), left);
        assert_eq!(reload(&disk, &layout).written_ranges(0, 4 * MIB), left);
    }

    #[test]
    fn a_disk_without_a_written_map_counts_all_as_written_and_a_fresh_one_too() {
        // An older disk: nothing in the written map's area.
        let disk: Arc<dyn Disk> = Arc::new(MemDisk::new(64 * MIB));
        let layout = Layout::for_member(0, 64 * MIB).unwrap();
        let old = DiskBitmap::load(disk.clone(), &layout, 65536, 1).unwrap().0;
        assert!(!old.has_written_map());
        assert_eq!(old.written_ranges(4096, MIB), vec![4096..MIB]);
        assert!(old.any_written(0, 1));
        // Writes do not make one up.
        let r = old.mark(0, 4096).unwrap();
        old.done(r);
        assert!(!reload(&disk, &layout).has_written_map());
        // A fresh bitmap (writes may have gone untracked) knows nothing:
        // all of it written, and so on its disk after its first write.
        let (disk, layout, _b) = new_disk();
        let fresh = DiskBitmap::fresh(disk.clone(), &layout, 65536, 1).unwrap();
        assert_eq!(fresh.written_ranges(0, 2 * MIB), vec![0..2 * MIB]);
        let r = fresh.mark(0, 4096).unwrap();
        fresh.done(r);
        let back = reload(&disk, &layout);
        assert_eq!(
            back.written_ranges(0, layout.data_size),
            vec![0..layout.data_size]
        );
        // A damaged header: the same.
        let mut junk = vec![0u8; 4096];
        junk[..8].copy_from_slice(crate::format::written::WRITTEN_MAGIC);
        disk.write_at(&junk, layout.written_offset()).unwrap();
        let back = reload(&disk, &layout);
        assert!(back.has_written_map());
        assert_eq!(back.written_ranges(0, MIB), vec![0..MIB]);
    }

    /// A near plex and a write-behind far one, each with a bitmap on a
    /// disk of its own that can fail or hang.
    fn near_and_far() -> (
        BitmapSet,
        Vec<Arc<EnginePlex>>,
        [Arc<crate::disk::faulty::FaultyDisk>; 2],
    ) {
        use crate::disk::faulty::FaultyDisk;
        use crate::volume::engine::Mode;
        use crate::volume::queue::DiskQueue;
        let layout = Layout::for_member(0, 64 * MIB).unwrap();
        let set = BitmapSet::default();
        let mut plexes = Vec::new();
        let mut disks = Vec::new();
        for i in 0..2 {
            let faulty = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(64 * MIB))));
            let disk: Arc<dyn Disk> = faulty.clone();
            let uuid = Uuid::new_v4();
            let b = DiskBitmap::load(disk.clone(), &layout, MIB, 1).unwrap().0;
            set.insert(uuid, Arc::new(b));
            let queue = DiskQueue::start(
                &format!("d{i}"),
                disk,
                1,
                std::time::Duration::from_secs(10),
            );
            let plex = EnginePlex::new(uuid, queue, layout.data_offset(), Mode::InSync);
            if i == 1 {
                plex.set_write_mostly(true);
                plex.set_write_behind(8);
            }
            plexes.push(Arc::new(plex));
            disks.push(faulty);
        }
        let [near, far]: [Arc<FaultyDisk>; 2] = disks.try_into().unwrap();
        (set, plexes, [near, far])
    }

    fn begun(set: &BitmapSet, plexes: &[Arc<EnginePlex>]) -> io::Result<IntentGuard> {
        match set.begin(plexes, 0, 4096)? {
            Begun::Ready(g) => Ok(g),
            Begun::Pending { wait, .. } => wait(),
        }
    }

    /// The far plex's bits are not waited for: the write goes once the
    /// near bits are durable, and what waits for the far ones runs once
    /// they are (its disk hung meanwhile).
    #[test]
    fn a_write_behind_plexs_bits_are_waited_for_by_its_write_alone() {
        let (set, plexes, [_near, far]) = near_and_far();
        far.hang();
        let mut guard = begun(&set, &plexes).unwrap();
        let far_bits = set.get(plexes[1].disk).unwrap();
        assert_eq!(far_bits.writes.load(Ordering::Relaxed), 0);
        let mut deferred = guard.take_deferred();
        assert_eq!(deferred.len(), 1, "the far plex's bits");
        let (tx, rx) = std::sync::mpsc::channel();
        let bits = far_bits.clone();
        (deferred.pop().unwrap())(Box::new(move |r| {
            let _ = tx.send(r.map(|()| bits.writes.load(Ordering::Relaxed)));
        }));
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err()
        );
        far.release();
        let written = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert!(written.unwrap() > 0, "durable before what waited ran");
    }

    /// When no disk but the deferred ones could take the bits, the write
    /// does not go: nothing durable would cover it after a crash.
    #[test]
    fn a_write_whose_only_durable_bits_would_be_deferred_ones_fails() {
        let (set, plexes, [near, _far]) = near_and_far();
        near.fail_writes(0..64 * MIB);
        assert!(begun(&set, &plexes).is_err());
    }

    #[test]
    fn the_hot_set_keeps_the_newest_idle_regions_for_keep_passes() {
        let b = bitmap();
        b.set_hot_set(MIB);
        for region in [0, 1, 2] {
            write(&b, region);
        }
        // Written during the period: kept, whatever the hot set.
        assert_eq!(pass(&b), 0);
        write(&b, 2);
        // 0 and 1 idle for a whole period, one of them past the hot set of
        // one region; 2 was written again.
        assert_eq!(pass(&b), 1);
        assert_eq!(b.dirty_count(), 2);
        // Now 2 is idle too and the newest: the older one goes.
        assert_eq!(pass(&b), 1);
        assert_eq!(b.dirty_ranges(), vec![2 * MIB..3 * MIB]);
        // Idle for KEEP_PASSES periods, the rest goes too.
        let mut cleared = 0;
        for _ in 0..KEEP_PASSES {
            cleared += pass(&b);
        }
        assert_eq!(cleared, 1);
        assert_eq!(b.dirty_count(), 0);
    }

    #[test]
    fn without_a_hot_set_a_region_goes_after_one_idle_period() {
        let b = bitmap();
        b.set_hot_set(0);
        write(&b, 3);
        assert_eq!(pass(&b), 0, "written during the period");
        assert_eq!(pass(&b), 1, "idle for a whole period");
        // A region in flight is never cleared, and a clean stop clears all.
        let r = b.mark(5 * MIB, 5 * MIB + 1).unwrap();
        write(&b, 6);
        assert_eq!(b.clear_idle(true, &|_| false).unwrap(), 1);
        b.done(r);
        assert_eq!(b.clear_idle(true, &|_| false).unwrap(), 1);
        assert_eq!(b.dirty_count(), 0);
    }
}
