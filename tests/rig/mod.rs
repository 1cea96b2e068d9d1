//! A rig for the engine's fault tests: a group of image files with mirrored
//! volumes, every member wrapped in a [`FaultyDisk`] (disks of one configured
//! controller share one [`Controller`]) over a [`BadSectors`] layer, put in
//! service by [`LiveGroup`]; a seeded workload of writers and readers that
//! keeps a reference of every acknowledged write; and the checks run after
//! every scenario (plexes read directly from the image files, status, the
//! re-assembled config).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mirrorvol::disk::{Controller, Disk, FaultyDisk};
use mirrorvol::format::{PlexState, Style};
use mirrorvol::group::live::LiveGroup;
use mirrorvol::group::ops::{self, InitOptions};
use mirrorvol::group::{DiskOpen, DiskSet, Group, Lookup};
use mirrorvol::volume::engine::{EngineOptions, MirrorVolume};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use uuid::Uuid;

use crate::common::{MIB, Sandbox};

pub const BLOCK: u64 = 4096;

// ---- bad sectors that a write heals ----

/// Sectors that fail to read until they are written, as a disk remaps a bad
/// sector on write. `FaultyDisk::fail_reads` ranges never heal, so a read
/// repair's read-back would always fail; this layer lets a repair succeed.
#[derive(Debug)]
pub struct BadSectors {
    inner: Arc<dyn Disk>,
    bad: Mutex<Vec<Range<u64>>>,
    pub read_errors: AtomicU64,
    pub healed: AtomicU64,
}

impl BadSectors {
    pub fn new(inner: Arc<dyn Disk>) -> BadSectors {
        BadSectors {
            inner,
            bad: Mutex::new(Vec::new()),
            read_errors: AtomicU64::new(0),
            healed: AtomicU64::new(0),
        }
    }

    /// Reads overlapping `range` (absolute disk bytes) fail until a write
    /// covers it.
    pub fn add(&self, range: Range<u64>) {
        self.bad.lock().unwrap().push(range);
    }

    pub fn inner(&self) -> &Arc<dyn Disk> {
        &self.inner
    }

    fn heal(&self, offset: u64, len: u64) {
        let end = offset + len;
        let mut bad = self.bad.lock().unwrap();
        let before = bad.len();
        bad.retain(|r| !(offset <= r.start && r.end <= end));
        self.healed
            .fetch_add((before - bad.len()) as u64, Ordering::SeqCst);
    }
}

impl Disk for BadSectors {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if self
            .bad
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.start < end && offset < r.end)
        {
            self.read_errors.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        self.heal(offset, buf.len() as u64);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)?;
        self.heal(offset, len);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn identity(&self) -> mirrorvol::disk::DiskIdentity {
        self.inner.identity()
    }
}

// ---- the group ----

/// One disk of a rig: image file name and configured controller.
#[derive(Clone, Copy)]
pub struct DiskSpec {
    pub name: &'static str,
    pub controller: &'static str,
}

pub const fn disk(name: &'static str, controller: &'static str) -> DiskSpec {
    DiskSpec { name, controller }
}

/// A disk in service, with its fault handles.
pub struct Member {
    pub path: PathBuf,
    pub uuid: Uuid,
    pub faulty: Arc<FaultyDisk>,
    pub bad: Arc<BadSectors>,
}

pub struct Rig {
    pub sb: Sandbox,
    pub paths: Vec<PathBuf>,
    pub uuids: Vec<Uuid>,
    pub controllers: BTreeMap<String, Arc<Controller>>,
    /// The fault handles of the running group, by disk index (empty when the
    /// group is not running).
    pub members: Vec<Member>,
}

/// How the tests run a group: few workers per disk (so a hang can occupy
/// them all), a short deadline, and the engine's options.
#[derive(Clone)]
pub struct Opts {
    pub open: DiskOpen,
    pub engine: EngineOptions,
    /// Load the write-intent bitmaps (after the disks are wrapped, so their
    /// writes meet the faults too), as `serve` does.
    pub bitmaps: bool,
}

pub fn opts(io_timeout_ms: u64, max_read_errors: u64) -> Opts {
    Opts {
        // The engine from MIRRORVOL_IO_ENGINE (`.ci/run` runs the suite
        // under both).
        open: DiskOpen {
            direct: false,
            threads: 4,
            timeout: Duration::from_millis(io_timeout_ms),
            ..DiskOpen::default()
        },
        engine: EngineOptions { max_read_errors },
        bitmaps: false,
    }
}

/// Puts an assembled group in service with `opts`: its disks' queues are
/// started again with the tests' workers and deadline.
pub fn start_live(mut g: Group, opts: Opts) -> Arc<LiveGroup> {
    g.open = DiskOpen {
        direct: g.open.direct,
        ..opts.open
    };
    g.wrap_disks(|_, disk| disk);
    LiveGroup::start(g, opts.engine)
}

impl Rig {
    /// Image files of `mib` MiB for `disks`, initialised into group `g`, and
    /// volumes `(name, size, disk indices)` created on them.
    pub fn new(disks: &[DiskSpec], mib: u64, volumes: &[(&str, u64, &[usize])]) -> Rig {
        let sb = Sandbox::new();
        let mut paths = Vec::new();
        let mut group: Option<Group> = None;
        for d in disks {
            let path = PathBuf::from(sb.image(d.name, mib));
            let g = ops::init(
                group.take(),
                std::slice::from_ref(&path),
                &InitOptions {
                    style: Style::Raw,
                    controller: Some(d.controller.to_string()),
                    group: Some("g".to_string()),
                    force: false,
                    region_size: 0,
                    spare: false,
                },
            )
            .expect("init");
            group = Some(g);
            paths.push(path);
        }
        let mut g = group.expect("at least one disk");
        for (name, size, on) in volumes {
            let chosen: Vec<PathBuf> = on.iter().map(|&i| paths[i].clone()).collect();
            g.create(name, *size, on.len(), &chosen).expect("create");
        }
        let uuids = paths
            .iter()
            .map(|p| g.resolve_disk(p).expect("resolve"))
            .collect();
        drop(g);
        let mut controllers = BTreeMap::new();
        for d in disks {
            controllers
                .entry(d.controller.to_string())
                .or_insert_with(|| Controller::new(d.controller));
        }
        Rig {
            sb,
            paths,
            uuids,
            controllers,
            members: Vec::new(),
        }
    }

    pub fn index(&self, uuid: Uuid) -> usize {
        self.uuids
            .iter()
            .position(|u| *u == uuid)
            .expect("a disk of the rig")
    }

    /// Assembles the group from the image files and puts it in service with
    /// every disk wrapped for fault injection.
    pub fn start(&mut self, opts: Opts) -> Arc<LiveGroup> {
        let mut g = assemble(&self.paths);
        g.open = opts.open;
        let mut members: BTreeMap<Uuid, Member> = BTreeMap::new();
        let controller_of: BTreeMap<Uuid, String> = g
            .config
            .disks
            .iter()
            .map(|d| (d.uuid, d.controller.clone()))
            .collect();
        let paths: BTreeMap<Uuid, PathBuf> = g
            .members
            .iter()
            .map(|(u, m)| (*u, m.path.clone()))
            .collect();
        g.wrap_disks(|uuid, disk| {
            let bad = Arc::new(BadSectors::new(disk));
            let controller = self.controllers[&controller_of[&uuid]].clone();
            let faulty = Arc::new(FaultyDisk::new(bad.clone()).on_controller(controller));
            members.insert(
                uuid,
                Member {
                    path: paths[&uuid].clone(),
                    uuid,
                    faulty: faulty.clone(),
                    bad,
                },
            );
            faulty
        });
        self.members = self
            .uuids
            .iter()
            .map(|u| members.remove(u).expect("every disk assembled"))
            .collect();
        if opts.bitmaps {
            g.start_bitmaps().expect("load the write-intent bitmaps");
        }
        LiveGroup::start(g, opts.engine)
    }

    /// Drops the fault handles (they keep the image files open and locked).
    pub fn release_handles(&mut self) {
        for m in &self.members {
            m.faulty.clear();
        }
        for c in self.controllers.values() {
            c.restore();
        }
        self.members.clear();
    }

    /// Absolute offset on disk `i` of volume `name`'s first byte.
    pub fn plex_offset(live: &LiveGroup, name: &str, disk: Uuid) -> u64 {
        let name = name.to_string();
        live.with_group(move |g| {
            let p = g
                .config
                .volume(&name)
                .unwrap()
                .plexes
                .iter()
                .find(|p| p.disk == disk)
                .unwrap()
                .clone();
            g.members[&disk].label.layout.data_offset() + p.offset
        })
        .unwrap()
    }
}

/// Assembles the group from `paths`; retries while a released disk is still
/// held open by a worker finishing its last request.
pub fn assemble(paths: &[PathBuf]) -> Group {
    assemble_with(paths, false)
}

pub fn assemble_with(paths: &[PathBuf], direct: bool) -> Group {
    let set = DiskSet {
        explicit: paths.to_vec(),
        open: DiskOpen {
            direct,
            ..DiskOpen::default()
        },
        ..DiskSet::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Group::assemble(&set, Lookup::Required) {
            Ok(g) => return g.expect("a group"),
            Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("assemble: {e}"),
        }
    }
}

/// Stops a live group once its volumes are idle, and waits until every
/// reference to it is gone.
pub fn shut_down(live: Arc<LiveGroup>) {
    for name in live.volume_names() {
        let v = live.volume(&name).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while v.ranges_busy() > 0 {
            assert!(Instant::now() < deadline, "volume {name} never went idle");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    drop(live);
}

// ---- block contents ----

/// The contents of `block` at `version` (version 0 and zero writes read as
/// zeroes): a header naming both, then bytes derived from them.
pub fn block_data(block: u64, version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK as usize);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    let mut x = (block.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ version.wrapping_mul(0xd1b5_4a32_d192_ed03))
        | 1;
    while out.len() < BLOCK as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// What a block read back holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    Zero,
    Version(u64),
    Garbage,
}

pub fn decode(block: u64, bytes: &[u8]) -> Seen {
    if bytes.iter().all(|&b| b == 0) {
        return Seen::Zero;
    }
    let b = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let v = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    if b == block && bytes == block_data(block, v) {
        Seen::Version(v)
    } else {
        Seen::Garbage
    }
}

// ---- the reference ----

/// Per block: the last acknowledged version, the last submitted one, and the
/// versions that were zero writes. A block is written by one writer only, one
/// request at a time, so the versions after `acked` are writes in flight or
/// writes that failed.
#[derive(Default)]
pub struct BlockRef {
    pub acked: AtomicU64,
    pub submitted: AtomicU64,
    zeroes: Mutex<Vec<u64>>,
}

pub struct Reference {
    pub blocks: Vec<BlockRef>,
}

impl Reference {
    pub fn new(blocks: u64) -> Reference {
        Reference {
            blocks: (0..blocks).map(|_| BlockRef::default()).collect(),
        }
    }

    /// Whether `seen` in block `b` is a version in `lo..=hi`.
    fn allows(&self, b: u64, seen: &Seen, lo: u64, hi: u64) -> bool {
        match seen {
            Seen::Zero => {
                lo == 0 || {
                    let z = self.blocks[b as usize].zeroes.lock().unwrap();
                    z.iter().any(|v| (lo..=hi).contains(v))
                }
            }
            Seen::Version(v) => (lo..=hi).contains(v),
            Seen::Garbage => false,
        }
    }

    /// Checks a whole volume's bytes once nothing is in flight: every block
    /// holds its last acknowledged version, or a later one whose write failed.
    pub fn check_volume(&self, bytes: &[u8], what: &str) {
        let mut bad = Vec::new();
        for (b, r) in self.blocks.iter().enumerate() {
            let b = b as u64;
            let chunk = &bytes[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
            let seen = decode(b, chunk);
            let lo = r.acked.load(Ordering::SeqCst);
            let hi = r.submitted.load(Ordering::SeqCst);
            if !self.allows(b, &seen, lo, hi) {
                bad.push(format!(
                    "block {b}: {seen:?}, want a version in {lo}..={hi}"
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{what}: {} blocks wrong, e.g. {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    }

    /// Writes the static region's blocks (version 1) before the workload.
    pub fn fill(&self, vol: &Arc<MirrorVolume>, blocks: Range<u64>) {
        for b in blocks {
            vol.write(b * BLOCK, &block_data(b, 1)).unwrap();
            let r = &self.blocks[b as usize];
            r.submitted.store(1, Ordering::SeqCst);
            r.acked.store(1, Ordering::SeqCst);
        }
    }
}

// ---- the workload ----

#[derive(Clone)]
pub struct WorkloadSpec {
    pub seed: u64,
    pub writers: u64,
    pub readers: u64,
    /// Blocks that the writers share out among themselves, each a contiguous
    /// part; blocks outside are read only.
    pub written: Range<u64>,
    /// Largest request, in blocks.
    pub max_blocks: u64,
    /// Chances (in percent) of a FUA write, a write-zeroes and a flush.
    pub fua: u32,
    pub zeroes: u32,
    pub flush: u32,
}

impl WorkloadSpec {
    pub fn new(seed: u64, volume_blocks: u64) -> WorkloadSpec {
        WorkloadSpec {
            seed,
            writers: 8,
            readers: 4,
            written: volume_blocks / 16..volume_blocks,
            max_blocks: 16,
            fua: 10,
            zeroes: 10,
            flush: 3,
        }
    }
}

pub struct Counters {
    epoch: Instant,
    /// Per writer: when its request in flight started (µs after `epoch`,
    /// plus one), 0 when it has none.
    busy: Vec<AtomicU64>,
    /// Requests of writers that succeeded.
    pub writes_ok: AtomicU64,
    pub write_errors: AtomicU64,
    pub reads_ok: AtomicU64,
    pub read_errors: AtomicU64,
    /// Reads that returned data no version explains: must stay 0.
    pub wrong_reads: AtomicU64,
    /// The slowest writer request, in microseconds.
    pub max_write_us: AtomicU64,
    pub first_wrong: Mutex<Option<String>>,
    pub first_error: Mutex<Option<String>>,
}

impl Counters {
    fn new(writers: u64) -> Counters {
        Counters {
            epoch: Instant::now(),
            busy: (0..writers).map(|_| AtomicU64::new(0)).collect(),
            writes_ok: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            reads_ok: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            wrong_reads: AtomicU64::new(0),
            max_write_us: AtomicU64::new(0),
            first_wrong: Mutex::new(None),
            first_error: Mutex::new(None),
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64 + 1
    }

    /// How long the longest request now in flight of any writer has waited.
    pub fn longest_outstanding(&self) -> Duration {
        let now = self.now_us();
        let oldest = self
            .busy
            .iter()
            .map(|b| b.load(Ordering::SeqCst))
            .filter(|&t| t != 0)
            .min();
        Duration::from_micros(oldest.map_or(0, |t| now - t))
    }
}

pub struct Workload {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    pub reference: Arc<Reference>,
    pub counters: Arc<Counters>,
    pub volume: Arc<MirrorVolume>,
}

impl Workload {
    pub fn start(
        spec: WorkloadSpec,
        volume: Arc<MirrorVolume>,
        reference: Arc<Reference>,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::new(spec.writers));
        let mut handles = Vec::new();
        let per = (spec.written.end - spec.written.start) / spec.writers;
        for w in 0..spec.writers {
            let start = spec.written.start + w * per;
            let own = start..start + per;
            let (stop, counters, reference, volume, spec) = (
                stop.clone(),
                counters.clone(),
                reference.clone(),
                volume.clone(),
                spec.clone(),
            );
            handles.push(std::thread::spawn(move || {
                writer(spec, w, own, &volume, &reference, &counters, &stop)
            }));
        }
        let total = volume.size() / BLOCK;
        for r in 0..spec.readers {
            let (stop, counters, reference, volume, spec) = (
                stop.clone(),
                counters.clone(),
                reference.clone(),
                volume.clone(),
                spec.clone(),
            );
            handles.push(std::thread::spawn(move || {
                reader(spec, r, total, &volume, &reference, &counters, &stop)
            }));
        }
        Workload {
            stop,
            handles,
            reference,
            counters,
            volume,
        }
    }

    /// Waits until the writers have had `n` more requests succeed (or fail,
    /// when `count_errors`), at most `limit`; returns whether they did.
    pub fn wait_writes(&self, n: u64, count_errors: bool, limit: Duration) -> bool {
        let done = |c: &Counters| {
            c.writes_ok.load(Ordering::SeqCst)
                + if count_errors {
                    c.write_errors.load(Ordering::SeqCst)
                } else {
                    0
                }
        };
        let target = done(&self.counters) + n;
        let deadline = Instant::now() + limit;
        while done(&self.counters) < target {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Stops every thread and waits for them; panics of threads come back.
    pub fn stop(self) -> (Arc<Reference>, Arc<Counters>) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            h.join().expect("workload thread panicked");
        }
        let c = &self.counters;
        assert_eq!(
            c.wrong_reads.load(Ordering::SeqCst),
            0,
            "a read returned data no write explains: {:?}",
            c.first_wrong.lock().unwrap()
        );
        (self.reference, self.counters)
    }
}

fn note(slot: &Mutex<Option<String>>, what: String) {
    let mut s = slot.lock().unwrap();
    if s.is_none() {
        *s = Some(what);
    }
}

fn writer(
    spec: WorkloadSpec,
    w: u64,
    own: Range<u64>,
    volume: &Arc<MirrorVolume>,
    reference: &Reference,
    c: &Counters,
    stop: &AtomicBool,
) {
    let mut rng = StdRng::seed_from_u64(spec.seed.wrapping_mul(1000).wrapping_add(w));
    while !stop.load(Ordering::SeqCst) {
        let roll = rng.random_range(0..100u32);
        let started = Instant::now();
        c.busy[w as usize].store(c.now_us(), Ordering::SeqCst);
        let result = if roll < spec.flush {
            volume.flush().map_err(|e| format!("flush: {e}"))
        } else {
            let n = rng.random_range(1..=spec.max_blocks.min(own.end - own.start));
            let first = rng.random_range(own.start..=own.end - n);
            let zero = roll < spec.flush + spec.zeroes;
            let fua = !zero && rng.random_range(0..100u32) < spec.fua;
            let mut data = Vec::new();
            for b in first..first + n {
                let r = &reference.blocks[b as usize];
                let v = r.submitted.load(Ordering::SeqCst) + 1;
                if zero {
                    r.zeroes.lock().unwrap().push(v);
                } else {
                    data.extend_from_slice(&block_data(b, v));
                }
                r.submitted.store(v, Ordering::SeqCst);
            }
            let offset = first * BLOCK;
            let r = if zero {
                volume.write_zeroes(offset, n * BLOCK)
            } else if fua {
                volume.write_fua(offset, &data)
            } else {
                volume.write(offset, &data)
            };
            if r.is_ok() {
                for b in first..first + n {
                    let r = &reference.blocks[b as usize];
                    r.acked
                        .store(r.submitted.load(Ordering::SeqCst), Ordering::SeqCst);
                }
            }
            r.map_err(|e| format!("write of {n} blocks at block {first}: {e}"))
        };
        c.busy[w as usize].store(0, Ordering::SeqCst);
        let us = started.elapsed().as_micros() as u64;
        c.max_write_us.fetch_max(us, Ordering::SeqCst);
        match result {
            Ok(()) => c.writes_ok.fetch_add(1, Ordering::SeqCst),
            Err(e) => {
                note(&c.first_error, e);
                c.write_errors.fetch_add(1, Ordering::SeqCst)
            }
        };
    }
}

fn reader(
    spec: WorkloadSpec,
    r: u64,
    total: u64,
    volume: &Arc<MirrorVolume>,
    reference: &Reference,
    c: &Counters,
    stop: &AtomicBool,
) {
    let mut rng = StdRng::seed_from_u64(spec.seed.wrapping_mul(1000).wrapping_add(500 + r));
    let mut buf = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let n = rng.random_range(1..=spec.max_blocks);
        let first = rng.random_range(0..=total - n);
        let before: Vec<u64> = (first..first + n)
            .map(|b| reference.blocks[b as usize].acked.load(Ordering::SeqCst))
            .collect();
        buf.resize((n * BLOCK) as usize, 0);
        match volume.read(first * BLOCK, &mut buf) {
            Ok(()) => {
                c.reads_ok.fetch_add(1, Ordering::SeqCst);
                for (i, b) in (first..first + n).enumerate() {
                    let hi = reference.blocks[b as usize]
                        .submitted
                        .load(Ordering::SeqCst);
                    let lo = before[i];
                    if lo != hi {
                        // A write was in flight: a read racing a write may see
                        // any mix; the checks after the run are exact.
                        continue;
                    }
                    let chunk = &buf[i * BLOCK as usize..(i + 1) * BLOCK as usize];
                    let seen = decode(b, chunk);
                    if !reference.allows(b, &seen, lo, hi) {
                        c.wrong_reads.fetch_add(1, Ordering::SeqCst);
                        note(
                            &c.first_wrong,
                            format!("block {b}: read {seen:?}, want version {lo}"),
                        );
                    }
                }
            }
            Err(e) => {
                note(&c.first_error, format!("read: {e}"));
                c.read_errors.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

// ---- checks after a scenario ----

/// A status report as JSON.
pub fn status_json(live: &LiveGroup) -> Value {
    serde_json::to_value(live.status().unwrap()).unwrap()
}

/// The states of a status report: per disk (by file name), per volume its
/// state and its plexes' states (by disk file name).
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct States {
    pub disks: BTreeMap<String, String>,
    pub volumes: BTreeMap<String, (String, BTreeMap<String, String>)>,
}

fn file_name(p: &str) -> String {
    Path::new(p)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.to_string())
}

pub fn states(status: &Value) -> States {
    let disks = status["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                file_name(d["path"].as_str().unwrap()),
                d["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let volumes = status["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let plexes = v["plexes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        file_name(p["disk"].as_str().unwrap()),
                        p["state"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            (
                v["name"].as_str().unwrap().to_string(),
                (v["state"].as_str().unwrap().to_string(), plexes),
            )
        })
        .collect();
    States { disks, volumes }
}

impl States {
    /// What the same group shows once re-assembled: the error counts of a
    /// running engine are gone.
    pub fn without_error_counts(&self) -> States {
        let mut s = self.clone();
        for state in s.disks.values_mut() {
            if state == "online-errors" {
                *state = "online".into();
            }
        }
        for (state, plexes) in s.volumes.values_mut() {
            if state == "failed-redundancy-at-risk" {
                *state = if plexes.values().all(|p| p == "in-sync") {
                    "healthy".into()
                } else {
                    "failed-redundancy".into()
                };
            }
        }
        s
    }

    pub fn disk(&self, name: &str) -> &str {
        &self.disks[name]
    }

    pub fn volume(&self, name: &str) -> &str {
        &self.volumes[name].0
    }

    pub fn plex(&self, volume: &str, disk: &str) -> &str {
        &self.volumes[volume].1[disk]
    }
}

/// Reads every in-sync plex of `volume` on an online disk of `g` straight
/// from its disk; returns (disk file name, bytes).
pub fn read_plexes(g: &Group, volume: &str) -> Vec<(String, Vec<u8>)> {
    let v = g.config.volume(volume).unwrap();
    let mut out = Vec::new();
    for p in &v.plexes {
        if p.state != PlexState::InSync || !g.is_online(p.disk) {
            continue;
        }
        let m = &g.members[&p.disk];
        let mut buf = vec![0u8; v.size as usize];
        m.disk
            .read_at(&mut buf, m.label.layout.data_offset() + p.offset)
            .unwrap();
        out.push((file_name(&m.path.display().to_string()), buf));
    }
    out
}

/// The checks after every scenario, on the group re-assembled from the image
/// files: its states agree with what the running group said, every in-sync
/// plex of `volume` holds every acknowledged write, and they are equal.
/// Returns the re-assembled group.
pub fn check_after(
    rig: &mut Rig,
    live_states: &States,
    volume: &str,
    reference: &Reference,
    min_in_sync: usize,
) -> Group {
    rig.release_handles();
    let g = assemble(&rig.paths);
    let on_disk = states(&serde_json::to_value(g.status()).unwrap());
    assert_eq!(
        on_disk,
        live_states.without_error_counts(),
        "the config on disk disagrees with what status said"
    );
    check_plexes(&g, volume, reference, min_in_sync);
    g
}

pub fn check_plexes(g: &Group, volume: &str, reference: &Reference, min_in_sync: usize) {
    let plexes = read_plexes(g, volume);
    assert!(
        plexes.len() >= min_in_sync,
        "{} in-sync plexes, want at least {min_in_sync}",
        plexes.len()
    );
    for (disk, bytes) in &plexes {
        reference.check_volume(bytes, &format!("plex on {disk}"));
    }
    for (disk, bytes) in &plexes[1..] {
        assert!(
            *bytes == plexes[0].1,
            "plexes on {} and {disk} differ",
            plexes[0].0
        );
    }
}

/// The size of the volumes of the scenarios.
pub const VOLUME: u64 = 16 * MIB;
