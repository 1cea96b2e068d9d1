//! A group: the disks managed together, their shared config, and the
//! operations that change it.
//!
//! Assembly reads every disk's label and config, takes the newest config,
//! and sorts the disks it finds into current, behind (missed only the last
//! write, as after a crash mid-commit), returned (marked missing or failed
//! and back now: `reactivate`) and split-brain (moved on without the group:
//! recorded in [`split::SplitBrain`]; commands that write refuse until the
//! admin keeps one side). A commit raises the seqno and writes the config to every online
//! disk, each into the slot that does not hold its newest good copy.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::disk::{Disk, FileDisk, OpenOptions};
use crate::format::ondisk::{self, FormatError, LabelRead};
use crate::format::state::{Generation, Read};
use crate::format::{DiskState, GroupConfig, Label, PlexState, VolumeEntry};
use crate::volume::generation::{GenerationKeeper, VersionRaise};
use crate::volume::queue::{DEFAULT_IO_TIMEOUT, QueuedDisk};
use crate::{Error, Result};

/// How long a request to a disk that is an NBD export may take before the
/// disk is failed, unless `--remote-io-timeout` says otherwise.
pub const REMOTE_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub mod alloc;
mod attach;
pub mod bitmap;
pub mod claim;
pub mod events;
mod generation;
pub mod history;
pub mod holder;
pub mod io;
pub mod live;
pub mod ops;
pub mod resync;
pub mod scrub;
pub mod show;
pub mod spare;
pub mod split;
pub mod status;

/// Shows the progress of a long copy (a progress bar on a terminal).
pub trait Progress {
    fn start(&self, what: &str, total: u64);
    fn set(&self, done: u64);
    fn finish(&self);
}

/// A progress sink that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn set(&self, _: u64) {}
    fn finish(&self) {}
}

/// A disk of the group that assembly found.
#[derive(Debug)]
pub struct Member {
    pub path: PathBuf,
    /// The path's canonical form, found when it was opened: a disk that
    /// hangs later is still recognised without asking it.
    pub canonical: PathBuf,
    /// Every request to the disk, metadata included, goes through its queue
    /// under the hang deadline.
    pub disk: Arc<QueuedDisk>,
    pub label: Label,
    /// Seqno of the newest good config on this disk (0: none readable).
    pub seqno: u64,
    /// A label copy or config slot is damaged; the next commit heals it.
    pub damaged: Vec<String>,
    /// The data generation the disk held when it was opened (format 3;
    /// `Empty` before), or when a remote disk reconnected: what it says of
    /// the disk's past.
    pub generation: Read<Generation>,
    /// Raises the disk's labels to the current format version before the
    /// first write of anything that version adds.
    pub raise: Arc<VersionRaise>,
}

impl Member {
    fn from_found(f: Found) -> Member {
        let raise = VersionRaise::new(f.disk.clone(), &f.read.label);
        Member {
            path: f.path,
            canonical: f.canonical,
            disk: f.disk,
            label: f.read.label,
            seqno: f.seqno,
            damaged: f.damaged,
            generation: f.generation,
            raise,
        }
    }

    /// The writer of the disk's state blocks (claim, generation).
    pub(crate) fn state_disk(&self) -> crate::volume::generation::GenerationDisk {
        crate::volume::generation::GenerationDisk {
            disk: self.disk.clone(),
            layout: self.label.layout,
            raise: self.raise.clone(),
            path: self.path.display().to_string(),
        }
    }

    /// The generation counter the disk held when opened, if it had one.
    pub fn generation_counter(&self) -> Option<u64> {
        match &self.generation {
            Read::Good(g) => Some(g.counter),
            _ => None,
        }
    }
}

/// The group as assembled from the disks at hand.
#[derive(Debug)]
pub struct Group {
    pub config: GroupConfig,
    pub members: BTreeMap<Uuid, Member>,
    /// Things the operator should know that did not stop assembly.
    pub warnings: Vec<String>,
    /// The write-intent bitmaps, once [`Group::start_bitmaps`] loaded them.
    pub bitmaps: Option<Arc<crate::volume::bitmap::BitmapSet>>,
    /// What loading found on each disk's bitmap area.
    pub bitmap_found: BTreeMap<Uuid, crate::volume::bitmap::Found>,
    /// Set when the disks found moved on without each other: nothing is
    /// written until the admin keeps one side ([`Group::keep_split_side`]).
    pub split: Option<split::SplitBrain>,
    /// Paths given that could not be read at all (an I/O error, a disk that
    /// does not answer): they say nothing of which disk they are, so the
    /// group goes on without them, and `status` shows them with the reason.
    pub unreadable: Vec<Unreadable>,
    /// How disks are opened: the ones assembled, and those that join later.
    pub open: DiskOpen,
    /// Raises the data generation before writes, once the bitmaps started.
    pub keeper: Option<Arc<GenerationKeeper>>,
    /// Assembly found plexes stale by their generation: recorded in the
    /// config before anything is written ([`Group::start_bitmaps`]).
    pub generation_stale: bool,
    /// The claim on the disks while this process holds the group for
    /// writing ([`Group::claim`]); released when the group is dropped.
    pub claim: Option<claim::Claim>,
}

/// The process's own command is recorded in the history once.
static PROCESS_RECORDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A path given as a disk of the group that could not be read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Unreadable {
    pub path: String,
    pub reason: String,
}

/// How the group's disks are opened and served.
#[derive(Debug, Clone, Copy)]
pub struct DiskOpen {
    /// `O_DIRECT`, bypassing the page cache (where the filesystem allows it).
    pub direct: bool,
    /// `O_DIRECT` for block devices even without `direct`: an offline
    /// command's rebuild through a device's page cache pays for a second
    /// cache under a loop device's own (twice the time of the copy on
    /// this project's VMs), and fills the host's cache with a copy nobody
    /// reads again. Image files keep the page cache (measured no faster
    /// without it).
    pub devices_direct: bool,
    /// Worker threads of each disk's queue: requests it serves at once.
    pub threads: usize,
    /// How long any request to a disk may take before the disk is failed
    /// (`--io-timeout`).
    pub timeout: std::time::Duration,
    /// The deadline of disks that are NBD exports (`--remote-io-timeout`;
    /// the shorter of the two applies).
    pub remote_timeout: std::time::Duration,
    /// What runs the disks' data requests (`--io-engine`).
    pub engine: crate::volume::queue::IoEngine,
    /// Read-only and without the lock: a look at a group another process
    /// may hold (`status`, `history`); every write is refused.
    pub shared: bool,
}

impl Default for DiskOpen {
    fn default() -> DiskOpen {
        DiskOpen {
            direct: false,
            devices_direct: false,
            threads: 4,
            timeout: DEFAULT_IO_TIMEOUT,
            remote_timeout: REMOTE_IO_TIMEOUT,
            engine: crate::volume::queue::IoEngine::from_env(),
            shared: false,
        }
    }
}

/// At the end of every command (and of `serve`), the bits of regions in
/// sync everywhere are cleared, so that the next start finds nothing dirty;
/// then every disk is let go, its file closed and its lock released, even
/// where a bitmap or an engine still holds its queue.
impl Drop for Group {
    fn drop(&mut self) {
        self.clean_bitmaps(true);
        if let Some(claim) = self.claim.take() {
            claim.release();
        }
        for m in self.members.values() {
            m.disk.queue().close();
        }
    }
}

/// Where to look for the group's disks, from `--disks`.
#[derive(Debug, Clone, Default)]
pub struct DiskSet {
    /// Paths named one by one: each must be a mirrorvol disk (or be absent,
    /// which assembly reports as missing).
    pub explicit: Vec<PathBuf>,
    /// Paths found inside a directory: those without a label are skipped.
    pub scanned: Vec<PathBuf>,
    /// How to open them.
    pub open: DiskOpen,
    /// Paths whose lookup did not answer within the deadline while they
    /// were expanded: assembly reports them unreadable without asking again.
    pub hung: Vec<PathBuf>,
}

/// Runs `f` on a thread of its own and waits for it at most `timeout`.
/// Looking a path up (stat, open) reaches the disk behind it on some
/// backends (a FUSE file, a network filesystem), and a disk that hangs hangs
/// the lookup in the kernel, where no signal ends it: past the deadline the
/// thread is left behind, and None says the path did not answer.
pub fn within<T: Send + 'static>(
    timeout: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    within_each(timeout, std::iter::once(f)).pop().flatten()
}

/// The canonical form of `path`, looked up within `timeout`; the path as
/// given, made absolute, when it has none (absent) or does not answer.
pub fn canonical(path: &Path, timeout: std::time::Duration) -> PathBuf {
    if is_nbd(path) {
        return path.to_path_buf();
    }
    let p = path.to_path_buf();
    within(timeout, move || fs::canonicalize(&p).ok())
        .flatten()
        .unwrap_or_else(|| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// What a path given as a disk turned out to be.
enum PathKind {
    /// It does not exist.
    Absent,
    /// It is a directory.
    Directory,
    /// Anything else (a file, a device), with its canonical form.
    Present(PathBuf),
    /// The lookup did not answer within the deadline.
    Hung,
}

/// Whether a disk path is an NBD URI (an export as a disk).
pub fn is_nbd(path: &Path) -> bool {
    path.to_str().is_some_and(crate::disk::nbd::NbdUri::is_uri)
}

/// What `path` is (one stat, and its canonical form), looked up on the
/// calling thread; an NBD URI is taken as present (its server is asked
/// when it is opened).
fn kind_of(p: &Path) -> PathKind {
    if is_nbd(p) {
        return PathKind::Present(p.to_path_buf());
    }
    match fs::metadata(p) {
        Ok(meta) if meta.is_dir() => PathKind::Directory,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PathKind::Absent,
        // Anything else is left to the open, which names the error.
        _ => PathKind::Present(
            fs::canonicalize(p)
                .unwrap_or_else(|_| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
        ),
    }
}

/// What `path` is and, when present, the storage behind it (see
/// [`storage_id`]), looked up on the calling thread.
fn identify(path: &Path) -> (PathKind, Option<(u64, u64)>) {
    let kind = kind_of(path);
    let id = match &kind {
        PathKind::Present(canonical) if !is_nbd(path) => storage_id(canonical),
        _ => None,
    };
    (kind, id)
}

/// Runs each job on a thread of its own, up to 32 at once, and waits for
/// each at most `timeout` from its batch's start (see [`within`]); None for
/// a job that did not answer in time.
fn all_within<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
    timeout: std::time::Duration,
    jobs: Vec<F>,
) -> Vec<Option<T>> {
    const AT_ONCE: usize = 32;
    let mut out = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        out.extend(within_each(timeout, jobs.by_ref().take(AT_ONCE)));
    }
    out
}

/// `f` of each path, on threads as [`all_within`] runs them.
fn each_path_within<T: Send + 'static>(
    timeout: std::time::Duration,
    paths: &[&PathBuf],
    f: fn(&Path) -> T,
) -> Vec<Option<T>> {
    all_within(
        timeout,
        paths
            .iter()
            .map(|p| {
                let p = (*p).clone();
                move || f(&p)
            })
            .collect(),
    )
}

/// Whether `path` is a file or a block device (what a directory given as
/// disks stands for).
fn is_file_or_device(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(path).map(|meta| meta.is_file() || meta.file_type().is_block_device())
}

/// [`all_within`] of one batch, all at once.
fn within_each<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
    timeout: std::time::Duration,
    jobs: impl Iterator<Item = F>,
) -> Vec<Option<T>> {
    let deadline = std::time::Instant::now() + timeout;
    let waits: Vec<_> = jobs
        .map(|f| {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name("mv-lookup".into())
                .spawn(move || {
                    let _ = tx.send(f());
                })
                .ok()
                .map(|_| rx)
        })
        .collect();
    waits
        .into_iter()
        .map(|rx| {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            rx?.recv_timeout(left).ok()
        })
        .collect()
}

/// A disk being opened and read (label, config, generation) on a thread
/// of its own, so that a group's disks are read at once.
struct Reading {
    /// When the open started: it is waited for `timeout` from then.
    started: std::time::Instant,
    /// The open's outcome, first.
    opened: Option<std::sync::mpsc::Receiver<Result<()>>>,
    /// Then, once opened, what its label and metadata gave.
    read: std::sync::mpsc::Receiver<std::result::Result<Option<Found>, FormatError>>,
}

impl Reading {
    fn start(path: &Path, canonical: PathBuf, open: DiskOpen) -> Reading {
        let (open_tx, opened) = std::sync::mpsc::sync_channel(1);
        let (read_tx, read) = std::sync::mpsc::sync_channel(1);
        let p = path.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("mv-lookup".into())
            .spawn(move || match open_disk_with(&p, &open) {
                Err(e) => {
                    let _ = open_tx.send(Err(e));
                }
                Ok(disk) => {
                    // Past the deadline nobody listens: the disk is
                    // closed again, unread.
                    if open_tx.send(Ok(())).is_err() {
                        return;
                    }
                    let found = ondisk::read_label(&*disk)
                        .map(|read| read.map(|read| read_found(&p, canonical, disk, read)));
                    let _ = read_tx.send(found);
                }
            });
        Reading {
            started: std::time::Instant::now(),
            opened: spawned.ok().map(|_| opened),
            read,
        }
    }

    /// Waits for the open at most `timeout` from its start, then for the
    /// reads, which the disk's queue times out on its own.
    fn finish(
        self,
        timeout: std::time::Duration,
    ) -> Result<std::result::Result<Option<Found>, FormatError>> {
        let left = (self.started + timeout).saturating_duration_since(std::time::Instant::now());
        let opened = self.opened.and_then(|rx| rx.recv_timeout(left).ok());
        match opened {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => {
                return Err(Error::io(
                    "open",
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("it did not answer within {}", show_duration(timeout)),
                    ),
                ));
            }
        }
        Ok(self.read.recv().unwrap_or_else(|_| {
            Err(FormatError::Io {
                op: "read the label",
                offset: 0,
                source: std::io::Error::other("the reader stopped"),
            })
        }))
    }
}

impl DiskSet {
    /// Expands `--disks` entries: a directory stands for every regular file
    /// and block device directly inside it. Each path is looked up within
    /// the deadline of `open`; one that does not answer is kept, and
    /// assembly reports it unreadable.
    pub fn expand(entries: &[PathBuf], open: DiskOpen) -> Result<DiskSet> {
        let mut set = DiskSet {
            open,
            ..DiskSet::default()
        };
        // Every entry looked up at once (see `Group::assemble`).
        let kinds = each_path_within(open.timeout, &entries.iter().collect::<Vec<_>>(), kind_of);
        for (entry, kind) in entries.iter().zip(kinds) {
            let kind = kind.unwrap_or(PathKind::Hung);
            if matches!(kind, PathKind::Hung) {
                set.hung.push(entry.clone());
            }
            if matches!(kind, PathKind::Directory) {
                let mut found = Vec::new();
                let dir = fs::read_dir(entry).map_err(|e| Error::io_path("read", entry, e))?;
                let items: Vec<PathBuf> = dir.flatten().map(|item| item.path()).collect();
                // All at once: files that hang cost the deadline once.
                let kinds = each_path_within(
                    open.timeout,
                    &items.iter().collect::<Vec<_>>(),
                    is_file_or_device,
                );
                for (path, kind) in items.into_iter().zip(kinds) {
                    match kind {
                        Some(Ok(true)) => found.push(path),
                        None => {
                            set.hung.push(path.clone());
                            found.push(path);
                        }
                        Some(Ok(false)) | Some(Err(_)) => {}
                    }
                }
                found.sort();
                set.scanned.extend(found);
            } else {
                set.explicit.push(entry.clone());
            }
        }
        Ok(set)
    }

    pub fn is_empty(&self) -> bool {
        self.explicit.is_empty() && self.scanned.is_empty()
    }
}

/// Opens a disk path for the group: exclusively, so two mirrorvol processes
/// never change one group at once.
pub fn open_disk(path: &Path) -> Result<Arc<QueuedDisk>> {
    open_disk_with(path, &DiskOpen::default())
}

/// [`open_disk`] with `how`, behind the disk's queue; where the filesystem
/// refuses `O_DIRECT` (tmpfs), through the page cache, with a warning in
/// the log.
pub fn open_disk_with(path: &Path, how: &DiskOpen) -> Result<Arc<QueuedDisk>> {
    let queued_within = |d: Arc<dyn Disk>, deadline| {
        QueuedDisk::start_on(
            &path.display().to_string(),
            d,
            how.threads,
            deadline,
            how.engine,
        )
    };
    if is_nbd(path) {
        // A far disk is failed sooner than a local one (md's failfast).
        let deadline = how.remote_timeout.min(how.timeout);
        return open_nbd(path, deadline).map(|d| queued_within(Arc::new(d), deadline));
    }
    let queued = |d: FileDisk| queued_within(Arc::new(d), how.timeout);
    let direct = how.direct
        || (how.devices_direct
            && std::fs::metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_block_device()
            }));
    let mut opts = OpenOptions {
        lock: !how.shared,
        read_only: how.shared,
        direct,
    };
    if direct {
        match FileDisk::open(path, opts) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "O_DIRECT refused; using the page cache");
                opts.direct = false;
            }
            Ok(d) => return Ok(queued(d)),
            Err(_) => {}
        }
    }
    match FileDisk::open(path, opts) {
        Ok(d) => Ok(queued(d)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::refused(format!(
            "disk {} does not exist",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Err(Error::refused(match holder::holder_of(path) {
                Some(h) => format!("disk {} is in use by {}", path.display(), h.describe()),
                None => {
                    let who = match holder::lock_holder(path) {
                        Some((pid, cmd)) if !cmd.is_empty() => {
                            format!("another process (pid {pid}: {cmd})")
                        }
                        Some((pid, _)) => format!("another process (pid {pid})"),
                        None => "another mirrorvol process".to_string(),
                    };
                    format!("disk {} is in use by {who}", path.display())
                }
            }))
        }
        Err(e) => Err(Error::io_path("open", path, e)),
    }
}

/// Opens the NBD export `path` names as a disk. It has no lock: the
/// group's claim on its disks keeps two writers apart.
fn open_nbd(path: &Path, deadline: std::time::Duration) -> Result<crate::disk::nbd::NbdDisk> {
    let shown = path.display().to_string();
    crate::disk::nbd::NbdDisk::open(&shown, deadline).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported => {
            Error::refused(format!("disk {shown}: {e}"))
        }
        std::io::ErrorKind::NotFound => Error::refused(format!(
            "disk {shown} does not exist (the server has no such export, or its socket is not there)"
        )),
        _ => Error::io(format!("cannot reach disk {shown}"), e),
    })
}

/// A disk found with a label, before grouping.
struct Found {
    path: PathBuf,
    canonical: PathBuf,
    disk: Arc<QueuedDisk>,
    read: LabelRead,
    config: Option<GroupConfig>,
    seqno: u64,
    damaged: Vec<String>,
    generation: Read<Generation>,
}

/// What a path stores its bytes in: (device, inode) of a file, or of the
/// file behind a loop device; the device number of any other block device.
fn storage_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    if !m.file_type().is_block_device() {
        return Some((m.dev(), m.ino()));
    }
    match crate::disk::file::loop_backing_file(&m) {
        Some(file) => {
            let m = std::fs::metadata(file).ok()?;
            Some((m.dev(), m.ino()))
        }
        None => Some((u64::MAX, m.rdev())),
    }
}

fn read_found(path: &Path, canonical: PathBuf, disk: Arc<QueuedDisk>, read: LabelRead) -> Found {
    let mut damaged = Vec::new();
    if !read.primary_ok {
        damaged.push("primary label".to_string());
    }
    if !read.backup_ok {
        damaged.push("backup label".to_string());
    }
    let (config, seqno) = match ondisk::read_config(&*disk, &read.label) {
        Ok(slots) => {
            for (i, ok) in slots.valid.iter().enumerate() {
                if !ok && !slots.empty[i] {
                    damaged.push(format!("config slot {}", ["A", "B"][i]));
                }
            }
            match slots.newest {
                Some((_, slot)) => match GroupConfig::from_text(&slot.text) {
                    Ok(c) => (Some(c), slot.seqno),
                    Err(_) => (None, 0),
                },
                None => (None, 0),
            }
        }
        Err(_) => (None, 0),
    };
    let generation = match ondisk::read_generation(&*disk, &read.label.layout) {
        Ok(g) => g,
        Err(_) => Read::Damaged("the generation slots cannot be read"),
    };
    if let Read::Damaged(why) = &generation {
        damaged.push(format!("generation slots ({why})"));
    }
    Found {
        generation,
        path: path.to_path_buf(),
        canonical,
        disk,
        read,
        config,
        seqno,
        damaged,
    }
}

/// A deadline as people write it: `2 s`, `500 ms`.
pub fn show_duration(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn describe_unreadable(unreadable: &[Unreadable]) -> String {
    unreadable
        .iter()
        .map(|u| format!("{} ({})", u.path, u.reason))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a group is looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A group must be found.
    Required,
    /// No group is fine (`init` makes one); unlabelled disks are skipped.
    Optional,
}

impl Group {
    /// Assembles the group from the disks of `set`.
    pub fn assemble(set: &DiskSet, lookup: Lookup) -> Result<Option<Group>> {
        let mut found: Vec<Found> = Vec::new();
        let mut warnings = Vec::new();
        let mut seen = Vec::new();
        let mut damaged_labels = Vec::new();
        let mut unreadable: Vec<Unreadable> = Vec::new();
        let candidates: Vec<(&PathBuf, bool)> = set
            .explicit
            .iter()
            .map(|p| (p, true))
            .chain(set.scanned.iter().map(|p| (p, false)))
            .collect();
        let timeout = set.open.timeout;
        let mut blank: Vec<(PathBuf, bool)> = Vec::new();
        // Paths named in --disks that do not exist: a member's is reported
        // missing below; any other is named too, not passed over in silence.
        let mut absent_named: Vec<PathBuf> = Vec::new();
        let mut seen_storage: Vec<((u64, u64), PathBuf)> = Vec::new();
        // Every path is looked up at once, and every disk kept is opened
        // and read at once: a group's disks cost the slowest one's time,
        // not the sum (a far disk's round trips, a cold disk's reads), and
        // paths that hang cost the deadline once. What they gave is taken
        // in the order given, as one at a time would.
        let asked: Vec<&PathBuf> = candidates
            .iter()
            .map(|(path, _)| *path)
            .filter(|path| !set.hung.contains(path))
            .collect();
        let looked = each_path_within(timeout, &asked, identify);
        let mut looked = looked.into_iter();
        // What each path gave, in the order given: reported in that order
        // once the disks kept are read.
        enum Step<'a> {
            Unreadable(Unreadable),
            Warning(String),
            Open(&'a PathBuf, bool, PathBuf),
        }
        let mut steps: Vec<Step> = Vec::new();
        for &(path, explicit) in &candidates {
            let (kind, id) = if set.hung.contains(path) {
                (PathKind::Hung, None)
            } else {
                looked
                    .next()
                    .expect("one lookup per path not known hung")
                    .unwrap_or((PathKind::Hung, None))
            };
            let canonical = match kind {
                PathKind::Present(canonical) => canonical,
                PathKind::Hung => {
                    steps.push(Step::Unreadable(Unreadable {
                        path: path.display().to_string(),
                        reason: format!("it did not answer within {}", show_duration(timeout)),
                    }));
                    continue;
                }
                // An absent disk: reported as missing once the config is
                // known (a scanned file gone since the directory was read
                // is no disk of the group's).
                PathKind::Absent | PathKind::Directory => {
                    if explicit && matches!(kind, PathKind::Absent) {
                        absent_named.push(path.clone());
                    }
                    continue;
                }
            };
            if seen.contains(&canonical) {
                continue;
            }
            seen.push(canonical.clone());
            // Another path to storage already taken (a loop device over an
            // image file given too, a second device node): used once.
            if let Some(id) = id {
                if let Some((_, first)) = seen_storage.iter().find(|(s, _)| *s == id) {
                    steps.push(Step::Warning(format!(
                        "{} and {} are the same disk; it is used once, as {}",
                        first.display(),
                        path.display(),
                        first.display()
                    )));
                    continue;
                }
                seen_storage.push((id, path.clone()));
            }
            steps.push(Step::Open(path, explicit, canonical));
        }
        // At most this many disks opened and read at once (a directory of
        // many devices must not open them all, each with its queue's
        // threads), the next started as each is taken.
        const AT_ONCE: usize = 16;
        let opens: Vec<(&PathBuf, PathBuf)> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Open(path, _, canonical) => Some((*path, canonical.clone())),
                _ => None,
            })
            .collect();
        let mut to_start = opens.into_iter();
        let mut reading: std::collections::VecDeque<Reading> = to_start
            .by_ref()
            .take(AT_ONCE)
            .map(|(path, canonical)| Reading::start(path, canonical, set.open))
            .collect();
        for step in steps {
            let (path, explicit) = match step {
                Step::Unreadable(u) => {
                    unreadable.push(u);
                    continue;
                }
                Step::Warning(w) => {
                    warnings.push(w);
                    continue;
                }
                Step::Open(path, explicit, _) => (path, explicit),
            };
            let reading_now = reading.pop_front().expect("a reading per disk to open");
            if let Some((path, canonical)) = to_start.next() {
                reading.push_back(Reading::start(path, canonical, set.open));
            }
            let unreadable_because = |reason: String| Unreadable {
                path: path.display().to_string(),
                reason,
            };
            let read = match reading_now.finish(timeout) {
                Ok(read) => read,
                // A path that exists but cannot be opened (an I/O error, a
                // device gone bad) says nothing of which disk it is.
                Err(Error::Io { source, .. }) => {
                    unreadable.push(unreadable_because(format!("cannot be opened: {source}")));
                    continue;
                }
                // An export that is not there (its server down, its socket
                // gone) or cannot be a disk is a disk the group goes on
                // without, as a file that is absent.
                Err(e) if is_nbd(path) => {
                    unreadable.push(unreadable_because(format!("cannot be opened: {e}")));
                    continue;
                }
                Err(e) => return Err(e),
            };
            match read {
                Ok(Some(f)) => found.push(f),
                // Blank: a wiped member, or a disk never initialised. Named
                // with --disks, or where the config last saw a member, it is
                // reported once the config is known; the group goes on
                // without it.
                Ok(None) => blank.push((path.clone(), explicit && lookup == Lookup::Required)),
                // A member whose every label copy is damaged cannot say which
                // disk it is: it is treated as absent, so the group (and the
                // other plexes of its mirrors) keeps working without it.
                Err(FormatError::Damaged) => {
                    warnings.push(format!(
                        "disk {}: every label copy is damaged; treated as missing",
                        path.display()
                    ));
                    damaged_labels.push(path.display().to_string());
                }
                // A disk that fails or does not answer its label reads: the
                // group goes on without it, as without an absent disk.
                Err(FormatError::Io { source, .. }) => {
                    unreadable.push(unreadable_because(format!(
                        "its label cannot be read: {source}"
                    )));
                }
                Err(e) => {
                    return Err(Error::corrupt(format!(
                        "disk {} cannot be read: {e}",
                        path.display()
                    )));
                }
            }
        }
        if found.is_empty()
            && unreadable.is_empty()
            && let Some((path, _)) = blank.iter().find(|(_, named)| *named)
        {
            return Err(Error::refused(format!(
                "{} is not a mirrorvol disk (no label found); initialize it with `mirrorvol init`",
                path.display()
            )));
        }
        if found.is_empty() && !damaged_labels.is_empty() {
            return Err(Error::corrupt(format!(
                "every label copy is damaged on {}; no group can be assembled from the disks given",
                damaged_labels.join(", ")
            )));
        }
        for u in &unreadable {
            tracing::warn!(path = %u.path, reason = %u.reason, "disk cannot be read");
            warnings.push(format!(
                "disk {} cannot be read ({}); the group goes on without it",
                u.path, u.reason
            ));
        }
        if found.is_empty() {
            return match lookup {
                Lookup::Optional if unreadable.is_empty() => Ok(None),
                Lookup::Optional => Err(Error::failed(format!(
                    "no disk given could be read: {}",
                    describe_unreadable(&unreadable)
                ))),
                Lookup::Required if unreadable.is_empty() => Err(Error::refused(
                    "no mirrorvol disk was found among the disks given with --disks",
                )),
                Lookup::Required => Err(Error::failed(format!(
                    "no mirrorvol disk could be read among the disks given with --disks: {}",
                    describe_unreadable(&unreadable)
                ))),
            };
        }

        // A disk that a config of the group says was removed (remove-disk)
        // is not taken in again, whatever config it carries itself.
        let removed: std::collections::BTreeSet<(Uuid, Uuid)> = found
            .iter()
            .filter_map(|f| f.config.as_ref())
            .flat_map(|c| c.removed.iter().map(|d| (c.uuid, *d)))
            .collect();
        found.retain(|f| {
            let gone = removed.contains(&(f.read.label.group_uuid, f.read.label.disk_uuid));
            if gone {
                warnings.push(format!(
                    "disk {} was removed from its group (remove-disk) and is not taken in again; `mirrorvol init --force` labels it anew",
                    f.path.display()
                ));
            }
            !gone
        });
        if found.is_empty() {
            return Err(Error::refused(
                "every disk given was removed from its group (remove-disk); `mirrorvol init --force` labels them anew",
            ));
        }
        let mut groups: Vec<Uuid> = found.iter().map(|f| f.read.label.group_uuid).collect();
        groups.sort();
        groups.dedup();
        if groups.len() > 1 {
            let names: Vec<String> = groups
                .iter()
                .map(|g| {
                    let f = found
                        .iter()
                        .find(|f| f.read.label.group_uuid == *g)
                        .unwrap();
                    let name = f.config.as_ref().map(|c| c.name.as_str()).unwrap_or("?");
                    format!("{name} ({})", f.path.display())
                })
                .collect();
            return Err(Error::refused(format!(
                "the disks given belong to {} different groups: {}; give the disks of one group",
                groups.len(),
                names.join(", ")
            )));
        }

        // One disk UUID on two different disks (the same storage was used
        // once above): a byte copy. Either could be the one the group
        // knows, so neither is used: refused, both named.
        for (i, f) in found.iter().enumerate() {
            if let Some(k) = found[..i]
                .iter()
                .find(|k| k.read.label.disk_uuid == f.read.label.disk_uuid)
            {
                // Two addresses of one export cannot be told from an export
                // and its copy: either way, one of them is given.
                let how = if is_nbd(&k.path) || is_nbd(&f.path) {
                    "one is a copy of the other, or both name the same export"
                } else {
                    "one is a copy of the other"
                };
                return Err(Error::refused(format!(
                    "{} and {} are two disks with the same disk UUID {} ({how}); give only the one that belongs to the group",
                    k.path.display(),
                    f.path.display(),
                    f.read.label.disk_uuid
                )));
            }
        }

        let newest = found
            .iter()
            .filter(|f| f.config.is_some())
            .max_by_key(|f| f.seqno)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "no readable group config on any of the disks ({}): every config slot is damaged",
                    found
                        .iter()
                        .map(|f| f.path.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let mut config = newest.config.clone().expect("filtered");
        config.seqno = newest.seqno;

        // Sort each disk found against the newest config.
        let mut split = Vec::new();
        for (i, f) in found.iter().enumerate() {
            let uuid = f.read.label.disk_uuid;
            let Some(entry) = config.disk(uuid) else {
                warnings.push(format!(
                    "disk {} carries this group's label but is not in its config (removed earlier); ignored",
                    f.path.display()
                ));
                continue;
            };
            if entry.state != DiskState::Online
                && f.seqno >= entry.state_seqno
                && f.config.is_some()
            {
                split.push(i);
            } else if entry.state == DiskState::Online && f.seqno == config.seqno {
                let states = |c: &GroupConfig| -> Vec<(Uuid, DiskState)> {
                    c.disks.iter().map(|d| (d.uuid, d.state)).collect()
                };
                let same = f
                    .config
                    .as_ref()
                    .map(|c| c.volumes == config.volumes && states(c) == states(&config));
                if same == Some(false) {
                    split.push(i);
                }
            }
        }
        // Disks at the newest data generation with another id than the
        // group's line moved on without it (each written alone): split.
        let gens: Vec<(usize, crate::format::state::Generation, u64)> = found
            .iter()
            .enumerate()
            .filter(|(i, f)| {
                !split.contains(i)
                    && config.disk(f.read.label.disk_uuid).map(|d| d.state)
                        == Some(DiskState::Online)
            })
            .filter_map(|(i, f)| match f.generation {
                Read::Good(g) => Some((i, g, f.seqno)),
                _ => None,
            })
            .collect();
        split.extend(generation::apart(&gens));
        // Split brain is recorded, not refused: `status` shows both sides and
        // what each changed, and commands that write refuse.
        let split = (!split.is_empty()).then(|| split::build(&found, &split, &config));
        if let Some(s) = &split {
            tracing::warn!(
                sides = s.sides.len(),
                "split brain in group {}",
                config.name
            );
        }

        let mut members = BTreeMap::new();
        for f in found {
            let uuid = f.read.label.disk_uuid;
            if let Some(entry) = config.disk_mut(uuid) {
                entry.path = f.path.display().to_string();
                if entry.state == DiskState::Online && f.seqno < config.seqno {
                    warnings.push(format!(
                        "disk {} missed the last config change (config {} of {}); the next change brings it up to date",
                        f.path.display(),
                        f.seqno,
                        config.seqno
                    ));
                }
                if !f.damaged.is_empty() {
                    warnings.push(format!(
                        "disk {}: damaged {} (the good copy is used; the next change rewrites it)",
                        f.path.display(),
                        f.damaged.join(", ")
                    ));
                }
                members.insert(uuid, Member::from_found(f));
            }
        }
        for (path, named) in blank {
            let was_member = config.disks.iter().any(|d| {
                !members.contains_key(&d.uuid)
                    && (Path::new(&d.path) == path
                        || canonical(Path::new(&d.path), timeout) == canonical(&path, timeout))
            });
            if named || was_member {
                let u = Unreadable {
                    path: path.display().to_string(),
                    reason: "it holds no mirrorvol label (wiped, or never initialised; `init --restore` rewrites the label of the member it was, `init --force` makes it a new disk)".to_string(),
                };
                warnings.push(format!(
                    "disk {}: {}; the group goes on without it",
                    u.path, u.reason
                ));
                unreadable.push(u);
            }
        }
        for d in &config.disks {
            if !members.contains_key(&d.uuid) && d.state == DiskState::Online {
                warnings.push(format!("disk {} ({}) is missing", d.path, d.uuid));
            }
        }
        for path in absent_named {
            if !config.disks.iter().any(|d| Path::new(&d.path) == path) {
                warnings.push(format!(
                    "disk {} named in --disks does not exist, and no disk of group {} was there",
                    path.display(),
                    config.name
                ));
            }
        }
        let mut group = Group {
            config,
            members,
            warnings,
            bitmaps: None,
            bitmap_found: BTreeMap::new(),
            split,
            unreadable,
            open: set.open,
            keeper: None,
            generation_stale: false,
            claim: None,
        };
        group.judge_generations();
        group.apply_deadlines();
        Ok(Some(group))
    }

    /// Replaces every member's disk with `wrap(uuid, disk)`, behind a new
    /// queue: fault injection in tests, instrumentation in benchmarks.
    pub fn wrap_disks(&mut self, mut wrap: impl FnMut(Uuid, Arc<dyn Disk>) -> Arc<dyn Disk>) {
        for (uuid, m) in &mut self.members {
            let Some(raw) = m.disk.raw() else {
                continue;
            };
            let wrapped = wrap(*uuid, raw);
            m.disk = QueuedDisk::start_on(
                &m.path.display().to_string(),
                wrapped,
                self.open.threads,
                self.open.timeout,
                self.open.engine,
            );
        }
    }

    /// The disk's state as users see it (DESIGN.md §2).
    pub fn disk_state(&self, uuid: Uuid) -> &'static str {
        let present = self.members.contains_key(&uuid);
        match (self.config.disk(uuid).map(|d| d.state), present) {
            (Some(DiskState::Failed), _) => "failed",
            (Some(DiskState::Online), true) => "online",
            (Some(DiskState::Missing), true) => "offline",
            _ => "missing",
        }
    }

    /// The members present and in service.
    pub(crate) fn members_in_service(&self) -> impl Iterator<Item = (Uuid, &Member)> {
        self.members
            .iter()
            .filter(|(u, _)| self.is_online(**u))
            .map(|(u, m)| (*u, m))
    }

    /// True when the disk is present and in service.
    pub fn is_online(&self, uuid: Uuid) -> bool {
        self.disk_state(uuid) == "online"
    }

    /// The write-behind backlog of the disk's plexes (0: none).
    pub fn write_behind(&self, uuid: Uuid) -> usize {
        self.config
            .disks
            .iter()
            .find(|d| d.uuid == uuid)
            .map_or(0, |d| d.write_behind as usize)
    }

    /// Whether the disk is write-mostly: its plexes serve reads only when
    /// no other in-sync plex can.
    pub fn is_write_mostly(&self, uuid: Uuid) -> bool {
        self.config
            .disks
            .iter()
            .any(|d| d.uuid == uuid && d.write_mostly)
    }

    /// A plex's state as users see it: its recorded state, unless its disk
    /// is not in service.
    pub fn plex_state(&self, disk: Uuid, recorded: PlexState) -> &'static str {
        match self.disk_state(disk) {
            "online" => match recorded {
                PlexState::InSync => "in-sync",
                PlexState::Stale => "stale",
                PlexState::Resyncing => "resyncing",
                PlexState::Failed => "failed",
            },
            "failed" => "failed",
            _ => "missing",
        }
    }

    /// A volume's state as users see it.
    /// Whether the plex is lost (failed, or on a missing disk): a repair
    /// replaces it, where a stale plex resyncs in place.
    pub fn plex_lost(&self, p: &crate::format::PlexEntry) -> bool {
        matches!(self.plex_state(p.disk, p.state), "failed" | "missing")
    }

    pub fn volume_state(&self, v: &VolumeEntry) -> &'static str {
        let states: Vec<&str> = v
            .plexes
            .iter()
            .map(|p| self.plex_state(p.disk, p.state))
            .collect();
        let in_sync = states.iter().filter(|s| **s == "in-sync").count();
        if in_sync == 0 {
            "failed"
        } else if states.contains(&"resyncing") {
            "resynching"
        } else if in_sync < states.len() {
            "failed-redundancy"
        } else {
            "healthy"
        }
    }

    /// Finds the disk a user named by path: a present disk by its file, or an
    /// absent one by the path it was last seen at.
    pub fn resolve_disk(&self, path: &Path) -> Result<Uuid> {
        let timeout = self.open.timeout;
        let want = canonical(path, timeout);
        for (uuid, m) in &self.members {
            if m.canonical == want {
                return Ok(*uuid);
            }
        }
        for d in &self.config.disks {
            if Path::new(&d.path) == path || canonical(Path::new(&d.path), timeout) == want {
                return Ok(d.uuid);
            }
        }
        Err(Error::refused(format!(
            "{} is not a disk of group {}",
            path.display(),
            self.config.name
        )))
    }

    /// The deadline of `disk`'s requests: its own (`set-disk --timeout`),
    /// else `--remote-io-timeout` for an NBD export (where shorter), else
    /// `--io-timeout`.
    pub fn deadline_of(&self, disk: Uuid) -> std::time::Duration {
        if let Some(ms) = self
            .config
            .disk(disk)
            .map(|d| d.timeout_ms)
            .filter(|ms| *ms > 0)
        {
            return std::time::Duration::from_millis(ms);
        }
        if is_nbd(Path::new(&self.disk_path(disk))) {
            self.open.remote_timeout.min(self.open.timeout)
        } else {
            self.open.timeout
        }
    }

    /// Gives every member's queue (and its backend) its deadline.
    pub fn apply_deadlines(&self) {
        for (uuid, m) in &self.members {
            let want = self.deadline_of(*uuid);
            if m.disk.queue().timeout() != want {
                m.disk.queue().set_timeout(want);
            }
        }
    }

    /// The path to show for a disk.
    pub fn disk_path(&self, uuid: Uuid) -> String {
        match self.members.get(&uuid) {
            Some(m) => m.path.display().to_string(),
            None => self
                .config
                .disk(uuid)
                .map(|d| d.path.clone())
                .unwrap_or_else(|| uuid.to_string()),
        }
    }

    pub fn volume(&self, name: &str) -> Result<&VolumeEntry> {
        self.config.volume(name).ok_or_else(|| {
            Error::refused(format!(
                "volume {name} does not exist in group {}",
                self.config.name
            ))
        })
    }

    /// Writes the config, with a raised seqno, to every online disk. Disks
    /// the config lists as online but that are not present are recorded as
    /// missing first, so they are known to be behind when they return. A disk
    /// whose config write fails is marked failed and the commit goes on with
    /// the others; it fails only when no disk took the config. A disk whose
    /// write hangs past the deadline while it holds a volume's last in-sync
    /// plex is not failed (that volume waits for it): the change is recorded
    /// on the others, and a later commit brings the disk up to date.
    pub fn commit(&mut self) -> Result<()> {
        // A spare that received a plex is an active member from this commit on.
        self.config.retire_used_spares();
        // The command making this change, in the history, once.
        let actor = history::process_actor().and_then(|process| {
            (!PROCESS_RECORDED.swap(true, std::sync::atomic::Ordering::SeqCst))
                .then(|| process.clone())
        });
        if let Some(a) = actor {
            history::record(&mut self.config.history, a.entry(self.config.seqno + 1));
        }
        // Hung disks holding a last copy: not asked again in this commit.
        let mut behind: std::collections::BTreeSet<Uuid> = Default::default();
        loop {
            let seqno = self.config.seqno + 1;
            for d in &mut self.config.disks {
                if d.state == DiskState::Online && !self.members.contains_key(&d.uuid) {
                    d.state = DiskState::Missing;
                    d.state_seqno = seqno;
                }
                // Back in service: no longer a connection to make again.
                if d.state == DiskState::Online {
                    d.link_lost = false;
                }
            }
            self.record_left_generations(seqno);
            let mut config = self.config.clone();
            config.seqno = seqno;
            let text = config.to_text();
            let mut wrote = 0;
            let mut failed = Vec::new();
            let versions: BTreeMap<Uuid, u32> = self
                .members
                .keys()
                .filter_map(|u| Some((*u, self.label_version(*u)?)))
                .collect();
            // Every disk at once, each through its queue: a disk that hangs
            // costs the deadline once, not once per disk behind it.
            let outcomes: Vec<(Uuid, std::result::Result<(), FormatError>)> =
                std::thread::scope(|scope| {
                    let writers: Vec<_> = self
                        .members
                        .iter()
                        .filter(|(uuid, _)| {
                            config.disk(**uuid).map(|d| d.state) == Some(DiskState::Online)
                                && !behind.contains(*uuid)
                        })
                        .map(|(uuid, m)| {
                            // A healed label keeps the version the disk is at now.
                            let heal = m.damaged.iter().any(|d| d.contains("label")).then(|| {
                                let mut label = m.label.clone();
                                label.version =
                                    versions.get(uuid).copied().unwrap_or(label.version);
                                label
                            });
                            let (disk, label, text) = (&m.disk, &m.label, &text);
                            let writer = scope.spawn(move || {
                                ondisk::write_config(&**disk, label, seqno, text.as_bytes())?;
                                match heal {
                                    Some(label) => ondisk::write_labels(&**disk, &label),
                                    None => Ok(()),
                                }
                            });
                            (*uuid, writer)
                        })
                        .collect();
                    writers
                        .into_iter()
                        .map(|(uuid, w)| {
                            let outcome = w.join().unwrap_or_else(|_| {
                                Err(FormatError::Io {
                                    op: "write the config",
                                    offset: 0,
                                    source: std::io::Error::other("the config writer panicked"),
                                })
                            });
                            (uuid, outcome)
                        })
                        .collect()
                });
            for (uuid, outcome) in outcomes {
                let m = self.members.get_mut(&uuid).expect("written above");
                match outcome {
                    Ok(()) => {
                        m.seqno = seqno;
                        m.damaged.clear();
                        wrote += 1;
                    }
                    Err(e) => failed.push((uuid, m.path.display().to_string(), e)),
                }
            }
            if wrote == 0 {
                let detail = failed
                    .iter()
                    .map(|(_, p, e)| format!("{p}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(Error::failed(format!(
                    "the config of group {} could not be written to any disk ({detail})",
                    self.config.name
                )));
            }
            self.config.seqno = seqno;
            let mut changed = false;
            for (uuid, path, e) in failed {
                let hung = matches!(&e, FormatError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut);
                let last = self.last_copies_on(uuid);
                if hung && !last.is_empty() {
                    let line = format!(
                        "disk {path} does not answer ({e}); it holds the last copy of {}, which waits for it; the config change is recorded on the other disks and reaches it when it answers",
                        last.join(", ")
                    );
                    tracing::warn!("{line}");
                    self.warnings.push(line);
                    behind.insert(uuid);
                    continue;
                }
                // A remote disk whose connection broke under the write
                // lost no data: it is tried again under `serve`, and its
                // plexes come back by the bitmaps.
                let lost = is_nbd(Path::new(&path))
                    && matches!(&e, FormatError::Io { source, .. } if crate::volume::error::link_lost(source));
                if lost {
                    self.warnings.push(format!(
                        "disk {path} lost its connection during a config write ({e}) and is marked failed until it answers again"
                    ));
                    self.mark_disk_failed(uuid, None);
                    if let Some(d) = self.config.disk_mut(uuid) {
                        d.link_lost = true;
                    }
                } else {
                    self.warnings.push(format!(
                        "disk {path} failed a config write ({e}) and is marked failed"
                    ));
                    self.mark_disk_failed(uuid, Some("its disk failed a config write"));
                }
                changed = true;
            }
            if !changed {
                self.sync_generation_disks();
                self.sync_claim_disks();
                return Ok(());
            }
        }
    }

    /// Records a disk as failed, and its plexes; except that a volume's last
    /// in-sync plex keeps its recorded state: it still holds every write the
    /// volume acknowledged, and `reactivate` puts it back in service as it is.
    /// `io_error` says why, when an I/O error did it: those plexes then get
    /// a full resync when they return.
    pub fn mark_disk_failed(&mut self, uuid: Uuid, io_error: Option<&str>) {
        let keep = self.last_copies_on(uuid);
        let next = self.config.seqno + 1;
        if let Some(d) = self.config.disk_mut(uuid) {
            d.state = DiskState::Failed;
            d.state_seqno = next;
        }
        for v in &mut self.config.volumes {
            for p in &mut v.plexes {
                if p.disk == uuid && !(keep.contains(&v.name) && p.state == PlexState::InSync) {
                    p.state = PlexState::Failed;
                    if let Some(why) = io_error {
                        p.resync_reason.get_or_insert_with(|| why.to_string());
                    }
                }
            }
        }
    }

    /// The volumes with a plex on `disk` and no in-sync plex elsewhere: the
    /// disk holds their last copy (if any copy is left at all).
    pub fn last_copies_on(&self, disk: Uuid) -> Vec<String> {
        self.config
            .volumes
            .iter()
            .filter(|v| v.plexes.iter().any(|p| p.disk == disk))
            .filter(|v| {
                !v.plexes
                    .iter()
                    .any(|p| p.disk != disk && self.plex_state(p.disk, p.state) == "in-sync")
            })
            .map(|v| v.name.clone())
            .collect()
    }

    /// Before a volume is put in service, its in-sync plexes on absent disks
    /// are recorded stale and their disks missing, so that they are known to
    /// be behind (and since when) when they return.
    pub fn record_absent_plexes(&mut self) -> Result<()> {
        let names: Vec<String> = self
            .config
            .volumes
            .iter()
            .filter(|v| {
                v.plexes.iter().any(|p| {
                    p.state == PlexState::InSync && self.plex_state(p.disk, p.state) == "missing"
                })
            })
            .map(|v| v.name.clone())
            .collect();
        for name in names {
            match self.prepare_write(&name) {
                Err(Error::Refused(_)) | Ok(()) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Records one plex of a volume as failed. `io_error` says why, when an
    /// I/O error did it: its data cannot be trusted then, so it gets a full
    /// resync when it returns (a remote disk whose link was lost returns by
    /// its bitmaps).
    pub fn mark_plex_failed(&mut self, volume: &str, disk: Uuid, io_error: Option<&str>) {
        if let Some(v) = self.config.volume_mut(volume) {
            for p in &mut v.plexes {
                if p.disk == disk {
                    p.state = PlexState::Failed;
                    if let Some(why) = io_error {
                        p.resync_reason.get_or_insert_with(|| why.to_string());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn hang<T>() -> T {
        std::thread::sleep(Duration::from_secs(5));
        panic!("a hung job was waited for");
    }

    #[test]
    fn all_within_waits_the_deadline_once_and_keeps_the_order() {
        let start = Instant::now();
        let jobs: Vec<Box<dyn FnOnce() -> u32 + Send>> = (0..40u32)
            .map(|i| -> Box<dyn FnOnce() -> u32 + Send> {
                if i % 10 == 3 {
                    Box::new(hang)
                } else {
                    Box::new(move || i)
                }
            })
            .collect();
        let got = all_within(Duration::from_millis(300), jobs);
        let want: Vec<Option<u32>> = (0..40).map(|i| (i % 10 != 3).then_some(i)).collect();
        assert_eq!(got, want);
        // Two batches (32, then 8), each with a job that hangs: two
        // deadlines, not four.
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "{:?}",
            start.elapsed()
        );
    }
}
