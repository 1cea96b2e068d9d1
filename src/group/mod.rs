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
use crate::format::{DiskState, GroupConfig, Label, PlexState, VolumeEntry};
use crate::{Error, Result};

pub mod alloc;
mod attach;
pub mod bitmap;
pub mod events;
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
    pub disk: Arc<dyn Disk>,
    pub label: Label,
    /// Seqno of the newest good config on this disk (0: none readable).
    pub seqno: u64,
    /// A label copy or config slot is damaged; the next commit heals it.
    pub damaged: Vec<String>,
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
    /// One line per resync done: what was copied, and why in full.
    pub resynced: Vec<String>,
    /// Set when the disks found moved on without each other: nothing is
    /// written until the admin keeps one side ([`Group::resolve_split_brain`]).
    pub split: Option<split::SplitBrain>,
}

/// At the end of every command (and of `serve`), the bits of regions in
/// sync everywhere are cleared, so that the next start finds nothing dirty.
impl Drop for Group {
    fn drop(&mut self) {
        self.clean_bitmaps(true);
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
    /// Open the disks `O_DIRECT`, bypassing the page cache (block devices).
    pub direct: bool,
}

impl DiskSet {
    /// Expands `--disks` entries: a directory stands for every regular file
    /// and block device directly inside it.
    pub fn expand(entries: &[PathBuf]) -> Result<DiskSet> {
        let mut set = DiskSet::default();
        for entry in entries {
            if entry.is_dir() {
                let mut found = Vec::new();
                let dir = fs::read_dir(entry).map_err(|e| Error::io_path("read", entry, e))?;
                for item in dir.flatten() {
                    let path = item.path();
                    let Ok(meta) = fs::metadata(&path) else {
                        continue;
                    };
                    use std::os::unix::fs::FileTypeExt;
                    if meta.is_file() || meta.file_type().is_block_device() {
                        found.push(path);
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
pub fn open_disk(path: &Path) -> Result<Arc<dyn Disk>> {
    open_disk_with(path, false)
}

/// [`open_disk`], `O_DIRECT` when `direct`; where the filesystem refuses
/// `O_DIRECT` (tmpfs), through the page cache, with a warning in the log.
pub fn open_disk_with(path: &Path, direct: bool) -> Result<Arc<dyn Disk>> {
    let mut opts = OpenOptions {
        lock: true,
        direct,
        ..OpenOptions::default()
    };
    if direct {
        match FileDisk::open(path, opts) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "O_DIRECT refused; using the page cache");
                opts.direct = false;
            }
            Ok(d) => return Ok(Arc::new(d)),
            Err(_) => {}
        }
    }
    match FileDisk::open(path, opts) {
        Ok(d) => Ok(Arc::new(d)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::refused(format!(
            "disk {} does not exist",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Err(Error::refused(match holder::holder_of(path) {
                Some(h) => format!("disk {} is in use by {}", path.display(), h.describe()),
                None => format!(
                    "disk {} is in use by another mirrorvol process",
                    path.display()
                ),
            }))
        }
        Err(e) => Err(Error::io_path("open", path, e)),
    }
}

/// A disk found with a label, before grouping.
struct Found {
    path: PathBuf,
    disk: Arc<dyn Disk>,
    read: LabelRead,
    config: Option<GroupConfig>,
    seqno: u64,
    damaged: Vec<String>,
}

fn read_found(path: &Path, disk: Arc<dyn Disk>, read: LabelRead) -> Found {
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
    Found {
        path: path.to_path_buf(),
        disk,
        read,
        config,
        seqno,
        damaged,
    }
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
        let candidates = set
            .explicit
            .iter()
            .map(|p| (p, true))
            .chain(set.scanned.iter().map(|p| (p, false)));
        for (path, explicit) in candidates {
            let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            if seen.contains(&canonical) {
                continue;
            }
            seen.push(canonical);
            if explicit && !path.exists() {
                // An absent disk: reported as missing once the config is known.
                continue;
            }
            let disk = open_disk_with(path, set.direct)?;
            let read = match ondisk::read_label(&*disk) {
                Ok(read) => read,
                // A member whose every label copy is damaged cannot say which
                // disk it is: it is treated as absent, so the group (and the
                // other plexes of its mirrors) keeps working without it.
                Err(FormatError::Damaged) => {
                    warnings.push(format!(
                        "disk {}: every label copy is damaged; treated as missing",
                        path.display()
                    ));
                    damaged_labels.push(path.display().to_string());
                    continue;
                }
                Err(e) => {
                    return Err(Error::corrupt(format!(
                        "disk {} cannot be read: {e}",
                        path.display()
                    )));
                }
            };
            match read {
                Some(read) => found.push(read_found(path, disk, read)),
                None if explicit && lookup == Lookup::Required => {
                    return Err(Error::refused(format!(
                        "{} is not a mirrorvol disk (no label found); initialize it with `mirrorvol init`",
                        path.display()
                    )));
                }
                None => {}
            }
        }
        if found.is_empty() && !damaged_labels.is_empty() {
            return Err(Error::corrupt(format!(
                "every label copy is damaged on {}; no group can be assembled from the disks given",
                damaged_labels.join(", ")
            )));
        }
        if found.is_empty() {
            return match lookup {
                Lookup::Optional => Ok(None),
                Lookup::Required => Err(Error::refused(
                    "no mirrorvol disk was found among the disks given with --disks",
                )),
            };
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
                members.insert(
                    uuid,
                    Member {
                        path: f.path,
                        disk: f.disk,
                        label: f.read.label,
                        seqno: f.seqno,
                        damaged: f.damaged,
                    },
                );
            }
        }
        for d in &config.disks {
            if !members.contains_key(&d.uuid) && d.state == DiskState::Online {
                warnings.push(format!("disk {} ({}) is missing", d.path, d.uuid));
            }
        }
        Ok(Some(Group {
            config,
            members,
            warnings,
            bitmaps: None,
            bitmap_found: BTreeMap::new(),
            resynced: Vec::new(),
            split,
        }))
    }

    /// Replaces every member's disk with `wrap(uuid, disk)`: fault injection
    /// in tests, instrumentation in benchmarks.
    pub fn wrap_disks(&mut self, mut wrap: impl FnMut(Uuid, Arc<dyn Disk>) -> Arc<dyn Disk>) {
        for (uuid, m) in &mut self.members {
            m.disk = wrap(*uuid, m.disk.clone());
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

    /// True when the disk is present and in service.
    pub fn is_online(&self, uuid: Uuid) -> bool {
        self.disk_state(uuid) == "online"
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
        let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        for (uuid, m) in &self.members {
            let have = fs::canonicalize(&m.path).unwrap_or_else(|_| m.path.clone());
            if have == want {
                return Ok(*uuid);
            }
        }
        for d in &self.config.disks {
            let have = fs::canonicalize(&d.path).unwrap_or_else(|_| PathBuf::from(&d.path));
            if have == want || Path::new(&d.path) == path {
                return Ok(d.uuid);
            }
        }
        Err(Error::refused(format!(
            "{} is not a disk of group {}",
            path.display(),
            self.config.name
        )))
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
    /// the others; it fails only when no disk took the config.
    pub fn commit(&mut self) -> Result<()> {
        // A spare that received a plex is an active member from this commit on.
        self.config.retire_used_spares();
        loop {
            let seqno = self.config.seqno + 1;
            for d in &mut self.config.disks {
                if d.state == DiskState::Online && !self.members.contains_key(&d.uuid) {
                    d.state = DiskState::Missing;
                    d.state_seqno = seqno;
                }
            }
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
            for (uuid, m) in &mut self.members {
                if config.disk(*uuid).map(|d| d.state) != Some(DiskState::Online) {
                    continue;
                }
                let mut result =
                    ondisk::write_config(&*m.disk, &m.label, seqno, text.as_bytes()).map(|_| ());
                if result.is_ok() && m.damaged.iter().any(|d| d.contains("label")) {
                    // A healed label keeps the version the disk is at now.
                    let mut label = m.label.clone();
                    label.version = versions.get(uuid).copied().unwrap_or(label.version);
                    result = ondisk::write_labels(&*m.disk, &label);
                }
                match result {
                    Ok(()) => {
                        m.seqno = seqno;
                        m.damaged.clear();
                        wrote += 1;
                    }
                    Err(e) => failed.push((*uuid, m.path.display().to_string(), e)),
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
            if failed.is_empty() {
                return Ok(());
            }
            for (uuid, path, e) in failed {
                self.warnings.push(format!(
                    "disk {path} failed a config write ({e}) and is marked failed"
                ));
                self.mark_disk_failed(uuid, Some("its disk failed a config write"));
            }
        }
    }

    /// Records a disk as failed, and its plexes; except that a volume's last
    /// in-sync plex keeps its recorded state: it still holds every write the
    /// volume acknowledged, and `reactivate` puts it back in service as it is.
    /// `io_error` says why, when an I/O error did it: those plexes then get
    /// a full resync when they return.
    pub fn mark_disk_failed(&mut self, uuid: Uuid, io_error: Option<&str>) {
        let mut keep = Vec::new();
        for v in &self.config.volumes {
            let others = v
                .plexes
                .iter()
                .filter(|p| p.disk != uuid && self.plex_state(p.disk, p.state) == "in-sync")
                .count();
            if others == 0 {
                keep.push(v.name.clone());
            }
        }
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

    /// Records one plex of a volume as failed (after an I/O error): its data
    /// cannot be trusted, so it gets a full resync when it returns.
    pub fn mark_plex_failed(&mut self, volume: &str, disk: Uuid) {
        if let Some(v) = self.config.volume_mut(volume) {
            for p in &mut v.plexes {
                if p.disk == disk {
                    p.state = PlexState::Failed;
                    p.resync_reason.get_or_insert_with(|| {
                        "it failed an I/O, so its data cannot be trusted".to_string()
                    });
                }
            }
        }
    }
}
