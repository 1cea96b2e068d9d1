//! The operations on a group (DESIGN.md §6). Each one checks everything it
//! can before it changes anything, so a refusal leaves every disk as it was;
//! then it changes the config in memory, writes data where it must, and
//! commits.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::alloc::{extent_len, first_fit, free_after, largest_free};
use super::{Group, Member, Progress, open_disk_with};
use crate::disk::AlignedBuf;
use crate::disk::buf::IO_ALIGN;
use crate::disk::{Disk, FileDisk, OpenOptions};
use crate::format::layout::Layout;
use crate::format::ondisk;
use crate::format::{DiskEntry, DiskState, GroupConfig, PlexEntry, PlexState, Style, VolumeEntry};
use crate::volume::COPY_CHUNK;
use crate::volume::queue::QueuedDisk;
use crate::{Error, Result};

/// The name a new group gets when `init` is not given `--group`.
pub const DEFAULT_GROUP_NAME: &str = "mirrorvol";

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub style: Style,
    pub controller: Option<String>,
    pub group: Option<String>,
    pub force: bool,
    /// Region size of a new group's write-intent bitmaps (0: the default).
    pub region_size: u64,
    /// Mark the disks hot spares of an existing group (`init --spare`).
    pub spare: bool,
}

/// Formats `paths` as disks of `existing`, or of a new group when there is
/// none. Returns the group after the change.
pub fn init(existing: Option<Group>, paths: &[PathBuf], opts: &InitOptions) -> Result<Group> {
    init_with(existing, paths, opts, super::DiskOpen::default())
}

/// [`init`], with the disks of a new group opened as `open` says (the
/// command's `--io-timeout`); an existing group's disks are opened as its
/// others were.
pub fn init_with(
    existing: Option<Group>,
    paths: &[PathBuf],
    opts: &InitOptions,
    open: super::DiskOpen,
) -> Result<Group> {
    let open = existing.as_ref().map_or(open, |g| g.open);
    let disks = check_new_disks(existing.as_ref(), paths, opts, &open)?;
    let mut group = match existing {
        Some(g) => g,
        None => Group {
            config: GroupConfig {
                name: opts
                    .group
                    .clone()
                    .unwrap_or_else(|| DEFAULT_GROUP_NAME.to_string()),
                uuid: Uuid::new_v4(),
                seqno: 0,
                disks: Vec::new(),
                volumes: Vec::new(),
                // Recorded: a later default does not change this group's.
                region_size: if opts.region_size == 0 {
                    crate::format::bitmap::DEFAULT_REGION_SIZE
                } else {
                    opts.region_size
                },
                removed: Vec::new(),
                history: Vec::new(),
            },
            members: Default::default(),
            warnings: Vec::new(),
            bitmaps: None,
            bitmap_found: Default::default(),
            split: None,
            unreadable: Vec::new(),
            open,
            keeper: None,
            generation_stale: false,
            claim: None,
        },
    };
    group.add_disks(disks, opts)?;
    Ok(group)
}

impl Group {
    /// `init` with --disks while the group serves: formats `paths` as new
    /// disks of this group and commits. Returns their UUIDs.
    pub fn join(&mut self, paths: &[PathBuf], opts: &InitOptions) -> Result<Vec<Uuid>> {
        let disks = check_new_disks(Some(self), paths, opts, &self.open)?;
        self.add_disks(disks, opts)
    }

    /// Formats checked disks as members of this group (label, empty bitmap,
    /// config entry) and commits. Every disk is formatted before the group
    /// changes, and a commit that fails takes them out again, so a group in
    /// service never keeps a disk half added. With the bitmaps loaded, the
    /// new disks' bitmaps join them.
    fn add_disks(
        &mut self,
        disks: Vec<(PathBuf, Arc<QueuedDisk>)>,
        opts: &InitOptions,
    ) -> Result<Vec<Uuid>> {
        let mut formatted = Vec::new();
        for (path, disk) in disks {
            let uuid = Uuid::new_v4();
            let label = ondisk::format_disk(&*disk, opts.style, uuid, self.config.uuid)
                .map_err(|e| Error::failed(format!("formatting {} failed: {e}", path.display())))?;
            // A new disk's bitmap tracks from the start: its plexes can always
            // be resynced from it.
            let (bitmap, _) = crate::volume::bitmap::DiskBitmap::load(
                disk.clone(),
                &label.layout,
                self.config.region_size,
                0,
            )
            .map_err(|e| Error::io(format!("cannot read the bitmap of {}", path.display()), e))?;
            bitmap.set_patient(disk.queue());
            // Its written map starts empty: a plex is born zeroed (create)
            // or filled by a resync that writes all of it.
            bitmap.start_written_map(self.config.region_size);
            bitmap.persist_header().map_err(|e| {
                Error::io(format!("cannot write the bitmap of {}", path.display()), e)
            })?;
            formatted.push((uuid, path, disk, label, bitmap));
        }
        let added: Vec<Uuid> = formatted.iter().map(|f| f.0).collect();
        let mut bitmaps = Vec::new();
        for (uuid, path, disk, label, bitmap) in formatted {
            let identity = disk.identity();
            self.config.disks.push(DiskEntry {
                uuid,
                path: path.display().to_string(),
                controller: opts
                    .controller
                    .clone()
                    .or(identity.controller)
                    .unwrap_or_else(|| "default".to_string()),
                style: opts.style,
                size: disk.size(),
                data_size: label.layout.data_size,
                model: identity.model,
                state: DiskState::Online,
                state_seqno: self.config.seqno + 1,
                spare: opts.spare,
                left_generation: 0,
                replaced_by: None,
                write_mostly: false,
                write_behind: 0,
                link_lost: false,
                timeout_ms: 0,
            });
            self.members.insert(
                uuid,
                super::Member {
                    canonical: super::canonical(&path, self.open.timeout),
                    path,
                    raise: crate::volume::generation::VersionRaise::new(disk.clone(), &label),
                    disk,
                    label,
                    seqno: 0,
                    damaged: Vec::new(),
                    generation: crate::format::state::Read::Empty,
                },
            );
            bitmaps.push((uuid, bitmap));
        }
        if let Err(e) = self.commit() {
            self.config.disks.retain(|d| !added.contains(&d.uuid));
            self.members.retain(|u, _| !added.contains(u));
            return Err(e);
        }
        if let Some(set) = &self.bitmaps {
            for (uuid, bitmap) in bitmaps {
                self.bitmap_found
                    .insert(uuid, crate::volume::bitmap::Found::Valid);
                set.insert(uuid, Arc::new(bitmap));
            }
        }
        Ok(added)
    }
}

/// `init --restore`: rewrites the labels (and partition table) of members
/// of `g` whose every metadata copy is gone, from the config the other
/// disks hold: the disk UUID, style and layout the member had, so that its
/// data area (untouched) is found where its plexes are. Each path must be
/// the one the config last recorded for a member not present, hold no
/// label, and have that member's size. Everything is checked before
/// anything is written. Returns the members' UUIDs, in the order given.
pub fn restore_labels(g: &Group, paths: &[PathBuf]) -> Result<Vec<Uuid>> {
    let open = g.open;
    let mut plan = Vec::new();
    for path in paths {
        let want = super::canonical(path, open.timeout);
        let entry = g
            .config
            .disks
            .iter()
            .find(|d| {
                Path::new(&d.path) == path.as_path()
                    || super::canonical(Path::new(&d.path), open.timeout) == want
            })
            .ok_or_else(|| {
                Error::refused(format!(
                    "group {} records no disk at {}; init --restore rewrites the label of a member at the path the group last saw it",
                    g.config.name,
                    path.display()
                ))
            })?;
        if g.members.contains_key(&entry.uuid) {
            return Err(Error::refused(format!(
                "disk {} of group {} is present with its label; there is nothing to restore",
                path.display(),
                g.config.name
            )));
        }
        let (p, how) = (path.clone(), open);
        let disk = super::within(open.timeout, move || super::open_disk_with(&p, &how))
            .ok_or_else(|| {
                Error::failed(format!(
                    "disk {} did not answer within {} s",
                    path.display(),
                    open.timeout.as_secs_f64()
                ))
            })??;
        match ondisk::read_label(&*disk) {
            Ok(None) => {}
            Ok(Some(read)) => {
                return Err(Error::refused(format!(
                    "{} holds a mirrorvol label (disk {} of group {}); init --restore writes only where every label is gone",
                    path.display(),
                    read.label.disk_uuid,
                    read.label.group_uuid
                )));
            }
            Err(e) => {
                return Err(Error::refused(format!(
                    "{} holds a damaged mirrorvol label ({e}); assembly reads its good copy, or init --force makes it a new disk",
                    path.display()
                )));
            }
        }
        if disk.size() != entry.size {
            return Err(Error::refused(format!(
                "{} has {} and disk {} of group {} had {}: it is not that disk",
                path.display(),
                human(disk.size()),
                entry.uuid,
                g.config.name,
                human(entry.size)
            )));
        }
        // The same size and style give the same layout; a different data
        // area would put the plexes elsewhere.
        let layout =
            crate::format::partition::member_for(disk.size(), disk.sector_size(), entry.style)
                .ok()
                .and_then(|(offset, size)| Layout::for_member(offset, size));
        if layout.map(|l| l.data_size) != Some(entry.data_size) {
            return Err(Error::refused(format!(
                "{} would not get the data area disk {} of group {} had ({}); it is not that disk",
                path.display(),
                entry.uuid,
                g.config.name,
                human(entry.data_size)
            )));
        }
        plan.push((path, disk, entry.clone()));
    }
    let mut restored = Vec::new();
    for (path, disk, entry) in plan {
        ondisk::format_disk(&*disk, entry.style, entry.uuid, g.config.uuid)
            .map_err(|e| Error::failed(format!("restoring {} failed: {e}", path.display())))?;
        restored.push(entry.uuid);
    }
    Ok(restored)
}

/// Checks and opens the disks `init` would format, before anything is
/// written: each exists, is named once, is not a disk of `existing`, has
/// room, and holds nothing (unless `force`).
fn check_new_disks(
    existing: Option<&Group>,
    paths: &[PathBuf],
    opts: &InitOptions,
    open: &super::DiskOpen,
) -> Result<Vec<(PathBuf, Arc<QueuedDisk>)>> {
    if paths.is_empty() {
        return Err(Error::refused("init needs at least one disk path"));
    }
    // As md adds spares to an array: a group made only of spares would
    // have nothing for them to stand in for.
    if opts.spare && existing.is_none() {
        return Err(Error::refused(
            "a hot spare must join an existing group: name the group's disks with --disks",
        ));
    }
    if let Some(name) = &opts.group {
        check_name("group", name)?;
    }
    if let (Some(g), Some(name)) = (existing, &opts.group)
        && g.config.name != *name
    {
        return Err(Error::refused(format!(
            "the disks given with --disks belong to group {}, not {name}",
            g.config.name
        )));
    }
    let mut canon = Vec::new();
    let mut disks = Vec::new();
    for path in paths {
        // Looked up under the deadline: a FUSE or network file hangs even
        // a stat.
        let p = path.clone();
        let c = if super::is_nbd(path) {
            // An export is named by its URI; it is reached when opened.
            p
        } else {
            super::within(open.timeout, move || fs::canonicalize(&p))
                .ok_or_else(|| {
                    Error::failed(format!(
                        "disk {} did not answer within {} s",
                        path.display(),
                        open.timeout.as_secs_f64()
                    ))
                })?
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Error::refused(format!("disk {} does not exist", path.display()))
                    } else {
                        Error::io_path("open", path, e)
                    }
                })?
        };
        if canon.contains(&c) {
            return Err(Error::refused(format!(
                "disk {} is named twice",
                path.display()
            )));
        }
        canon.push(c);
        if let Some(g) = existing
            && let Ok(uuid) = g.resolve_disk(path)
        {
            // A member whose label is gone may be made a new disk at the
            // same path (its plexes there are then repaired elsewhere).
            if g.members.contains_key(&uuid) {
                return Err(Error::refused(format!(
                    "{} is already a disk of group {}",
                    path.display(),
                    g.config.name
                )));
            }
            if !opts.force {
                return Err(Error::refused(format!(
                    "{} was disk {uuid} of group {} and its label is gone; `init --restore` puts its label back (its data untouched), `init --force` makes it a new disk of the group",
                    path.display(),
                    g.config.name
                )));
            }
        }
        // Opened as the group's disks are (the same deadline).
        let (p, how) = (path.clone(), *open);
        let disk =
            super::within(open.timeout, move || open_disk_with(&p, &how)).ok_or_else(|| {
                Error::failed(format!(
                    "disk {} did not answer within {} s",
                    path.display(),
                    open.timeout.as_secs_f64()
                ))
            })??;
        check_room(path, &*disk, opts.style)?;
        if !opts.force {
            if let Ok(Some(read)) = ondisk::read_label(&*disk) {
                return Err(Error::refused(format!(
                    "{} is already a mirrorvol disk of group {}; use --force to re-initialize it",
                    path.display(),
                    read.label.group_uuid
                )));
            }
            if let Some(what) =
                crate::format::probe::probe(&*disk).map_err(|e| Error::io_path("read", path, e))?
            {
                return Err(Error::refused(format!(
                    "{} holds {what}; use --force to overwrite it",
                    path.display()
                )));
            }
        }
        disks.push((path.clone(), disk));
    }

    Ok(disks)
}

/// Refuses a disk too small for the style, or too large for MBR, before
/// anything is written.
fn check_room(path: &Path, disk: &dyn Disk, style: Style) -> Result<()> {
    use crate::format::partition::{PartitionError, member_for};
    let too_small = |min: u64| {
        Error::refused(format!(
            "{} is too small for a mirrorvol disk: it has {} and style {style} needs at least {}",
            path.display(),
            human(disk.size()),
            human(min)
        ))
    };
    match member_for(disk.size(), disk.sector_size(), style) {
        Ok((offset, size)) => match Layout::for_member(offset, size) {
            Some(_) => Ok(()),
            None => Err(too_small(
                disk.size() - size + crate::format::partition::MIN_MEMBER_SIZE,
            )),
        },
        Err(PartitionError::TooSmall { min, .. }) => Err(too_small(min)),
        Err(PartitionError::TooLargeForMbr { .. }) => Err(Error::refused(format!(
            "{} is larger than 2 TiB, which an MBR partition table cannot address; use --style gpt",
            path.display()
        ))),
        Err(e) => Err(Error::refused(format!(
            "{} cannot hold a mirrorvol disk: {e}",
            path.display()
        ))),
    }
}

/// Checks a volume or group name: it is also an NBD export name and a word in
/// the config, so it is kept to letters, digits, `.`, `_` and `-`.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::refused(format!(
            "{what} name {name:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '-'"
        )))
    }
}

/// Checks a volume size: positive and a whole number of sectors.
pub fn check_size(name: &str, size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::refused(format!(
            "the size of volume {name} must be larger than zero"
        )));
    }
    if !size.is_multiple_of(512) {
        return Err(Error::refused(format!(
            "the size of volume {name} ({size} bytes) is not a whole number of 512-byte sectors"
        )));
    }
    Ok(())
}

/// Wipes the labels of a disk that left the group (`remove-disk`), so that
/// nothing takes it for a member; returns a warning when it cannot.
pub fn wipe_departed(m: &Member, shown: &str) -> Option<String> {
    ondisk::wipe_labels(&*m.disk, &m.label.layout).err().map(|e| {
        format!(
            "the labels of disk {shown} could not be wiped ({e}); it left the group all the same, and is not taken in again should it come back"
        )
    })
}

/// A byte count in human units with the exact count after it, for lines
/// scripts read too: "64 MiB (67108864 bytes)", "512 bytes".
pub fn human_exact(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} bytes"),
        _ => format!("{} ({bytes} bytes)", human(bytes)),
    }
}

/// Renders a byte count for messages: "64 MiB", "1.5 GiB", "4096 bytes".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Group {
    pub(super) fn controller(&self, disk: Uuid) -> &str {
        self.config
            .disk(disk)
            .map(|d| d.controller.as_str())
            .unwrap_or("")
    }

    /// Refuses a disk that cannot take new plexes.
    fn require_online(&self, disk: Uuid) -> Result<()> {
        match self.disk_state(disk) {
            "online" => Ok(()),
            state => Err(Error::refused(format!(
                "disk {} is {state} and cannot take a plex",
                self.disk_path(disk)
            ))),
        }
    }

    /// Picks `count` disks with a free extent of `len` bytes for a volume,
    /// after the ones the user named: distinct disks, and distinct
    /// controllers where possible (duplexing), then the most free space.
    fn choose_disks(
        &self,
        volume: &str,
        count: usize,
        len: u64,
        named: &[PathBuf],
        exclude: &[Uuid],
    ) -> Result<Vec<(Uuid, u64)>> {
        let mut chosen: Vec<(Uuid, u64)> = Vec::new();
        if named.len() > count {
            return Err(Error::refused(format!(
                "{} disks were named for volume {volume}, which needs {count}",
                named.len()
            )));
        }
        for path in named {
            let uuid = self.resolve_disk(path)?;
            if chosen.iter().any(|(u, _)| *u == uuid) {
                return Err(Error::refused(format!(
                    "disk {} is named twice",
                    path.display()
                )));
            }
            if exclude.contains(&uuid) {
                return Err(Error::refused(format!(
                    "volume {volume} already has a plex on disk {}",
                    path.display()
                )));
            }
            self.require_online(uuid)?;
            let Some(offset) = first_fit(&self.config, uuid, len) else {
                return Err(Error::refused(format!(
                    "disk {} has no free extent of {} for volume {volume} (largest free extent: {})",
                    path.display(),
                    human(len),
                    human(largest_free(&self.config, uuid))
                )));
            };
            chosen.push((uuid, offset));
        }
        // A disk being replaced takes no new copy (it is leaving; one placed
        // there would hold its replacement back for good).
        let skip: Vec<Uuid> = exclude
            .iter()
            .copied()
            .chain(chosen.iter().map(|(u, _)| *u))
            .chain(
                self.config
                    .disks
                    .iter()
                    .filter(|d| d.replaced_by.is_some())
                    .map(|d| d.uuid),
            )
            .collect();
        // Spares are kept for repairs; only a user's --disk puts a plex on
        // one (above). They are named when only they have room.
        let (spares, mut candidates): (Vec<Uuid>, Vec<Uuid>) = {
            let (s, c): (Vec<_>, Vec<_>) = self
                .disks_with_room(len, &skip)
                .into_iter()
                .partition(|(_, _, spare)| *spare);
            (
                s.into_iter().map(|(u, _, _)| u).collect(),
                c.into_iter().map(|(u, _, _)| u).collect(),
            )
        };
        while chosen.len() < count {
            let used: Vec<&str> = exclude
                .iter()
                .chain(chosen.iter().map(|(u, _)| u))
                .map(|u| self.controller(*u))
                .collect();
            candidates.sort_by_key(|u| {
                (
                    used.contains(&self.controller(*u)),
                    std::cmp::Reverse(largest_free(&self.config, *u)),
                )
            });
            if candidates.is_empty() {
                // Disks with room that already hold a copy of the volume
                // are why, when there are any: say so, not "no room".
                let holders: Vec<String> = exclude
                    .iter()
                    .filter(|u| self.is_online(**u) && first_fit(&self.config, **u, len).is_some())
                    .map(|u| self.disk_path(*u))
                    .collect();
                if !holders.is_empty() {
                    let more = count - chosen.len();
                    return Err(Error::refused(format!(
                        "volume {volume} needs {more} more disk{} with a free extent of {}, and the disks of group {} with room ({}) already hold a copy of it: each copy of a mirror needs a disk of its own, so add a disk to the group{}",
                        if more == 1 { "" } else { "s" },
                        human(len),
                        self.config.name,
                        holders.join(", "),
                        self.spares_note(&spares)
                    )));
                }
                // Every disk that could take a plex is chosen by now.
                return Err(Error::refused(format!(
                    "volume {volume} needs {count} disks with a free extent of {}, but group {} has only {} such disks{}",
                    human(len),
                    self.config.name,
                    chosen.len(),
                    self.spares_note(&spares)
                )));
            }
            let uuid = candidates.remove(0);
            let offset = first_fit(&self.config, uuid, len).expect("filtered on free space");
            chosen.push((uuid, offset));
        }
        Ok(chosen)
    }

    /// The warnings the seed's advice calls for on a mirror's disks.
    pub fn mirror_warnings(&self, name: &str) -> Vec<String> {
        let Some(v) = self.config.volume(name) else {
            return Vec::new();
        };
        if v.plexes.len() < 2 {
            return Vec::new();
        }
        let mut warnings = Vec::new();
        let mut controllers: Vec<&str> = v.plexes.iter().map(|p| self.controller(p.disk)).collect();
        controllers.sort();
        controllers.dedup();
        if controllers.len() < v.plexes.len() {
            warnings.push(format!(
                "mirror {name} is not duplexed: some of its plexes share a controller ({}), so a failure of that controller makes those copies inaccessible at once",
                controllers.join(", ")
            ));
        }
        let disks: Vec<&DiskEntry> = v
            .plexes
            .iter()
            .filter_map(|p| self.config.disk(p.disk))
            .collect();
        let sizes_differ = disks.iter().any(|d| d.size != disks[0].size);
        let models_differ = disks.iter().any(|d| d.model != disks[0].model);
        if sizes_differ || models_differ {
            let list: Vec<String> = disks
                .iter()
                .map(|d| {
                    format!(
                        "{}: {}{}",
                        d.path,
                        human(d.size),
                        d.model
                            .as_deref()
                            .map(|m| format!(", {m}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            warnings.push(format!(
                "the disks of mirror {name} differ in {} ({}); identical disks are best for a mirror",
                if sizes_differ { "size" } else { "model" },
                list.join("; ")
            ));
        }
        warnings
    }

    /// Creates a volume: simple (`copies` = 1) or a mirror. Its plexes are
    /// zeroed the cheap way, so a new mirror starts in sync without a copy.
    pub fn create(
        &mut self,
        name: &str,
        size: u64,
        copies: usize,
        disks: &[PathBuf],
    ) -> Result<Vec<String>> {
        check_name("volume", name)?;
        check_size(name, size)?;
        if self.config.volume(name).is_some() {
            return Err(Error::refused(format!(
                "volume {name} already exists in group {}",
                self.config.name
            )));
        }
        if copies == 0 {
            return Err(Error::refused(format!(
                "volume {name} needs at least one copy"
            )));
        }
        let len = extent_len(size);
        let chosen = self.choose_disks(name, copies, len, disks, &[])?;
        for (disk, offset) in &chosen {
            self.zero_extent(*disk, *offset, len)?;
            self.forget_written(*disk, *offset, len)?;
        }
        self.config.volumes.push(VolumeEntry {
            name: name.to_string(),
            uuid: Uuid::new_v4(),
            size,
            plexes: chosen
                .iter()
                .map(|(disk, offset)| PlexEntry {
                    disk: *disk,
                    offset: *offset,
                    length: len,
                    state: PlexState::InSync,
                    resync_reason: None,
                    resync_offset: 0,
                    resync_cancelled: false,
                })
                .collect(),
        });
        self.commit()?;
        Ok(self.mirror_warnings(name))
    }

    /// Records a zeroed extent of a disk's data area as never written
    /// (a plex that lay there before left its regions marked).
    fn forget_written(&self, disk: Uuid, offset: u64, len: u64) -> Result<()> {
        let Some(b) = self.bitmaps.as_ref().and_then(|set| set.get(disk)) else {
            return Ok(());
        };
        b.clear_written(offset, offset + len).map_err(|e| {
            Error::io(
                format!("cannot write the written map of {}", self.disk_path(disk)),
                e,
            )
        })?;
        // The checksums `clear_written` gave the zeroed blocks of regions
        // it shares with a neighbour (they stay written), durably.
        b.persist_sums().map_err(|e| {
            Error::io(
                format!("cannot write the checksums of {}", self.disk_path(disk)),
                e,
            )
        })
    }

    fn zero_extent(&self, disk: Uuid, offset: u64, len: u64) -> Result<()> {
        let m = self.members.get(&disk).ok_or_else(|| {
            Error::failed(format!("disk {} is not present", self.disk_path(disk)))
        })?;
        let at = m.label.layout.data_offset() + offset;
        m.disk
            .write_zeroes(at, len)
            .and_then(|()| m.disk.flush())
            .map_err(|e| {
                Error::io(
                    format!("cannot zero {} at offset {at}", m.path.display()),
                    e,
                )
            })
    }

    /// A volume that has an in-sync plex to copy from, or a refusal.
    pub(super) fn require_source(&self, name: &str) -> Result<()> {
        let v = self.volume(name)?;
        if v.plexes
            .iter()
            .any(|p| self.plex_state(p.disk, p.state) == "in-sync")
        {
            Ok(())
        } else {
            Err(Error::refused(format!(
                "volume {name} has no in-sync plex to copy from"
            )))
        }
    }

    /// The first half of `add-mirror`: allocates a new plex for a volume
    /// and records it resyncing (a resync then fills it, here or in
    /// `serve`). Returns the disk it is on.
    pub fn add_resyncing_plex(&mut self, name: &str, disk: Option<&Path>) -> Result<Uuid> {
        let v = self.volume(name)?.clone();
        self.require_source(name)?;
        let exclude: Vec<Uuid> = v.plexes.iter().map(|p| p.disk).collect();
        let named: Vec<PathBuf> = disk.map(|d| vec![d.to_path_buf()]).unwrap_or_default();
        let len = extent_len(v.size);
        let (target, offset) = self.choose_disks(name, 1, len, &named, &exclude)?[0];
        self.config
            .volume_mut(name)
            .expect("checked")
            .plexes
            .push(PlexEntry {
                disk: target,
                offset,
                length: len,
                state: PlexState::Resyncing,
                resync_reason: Some("a new plex".to_string()),
                resync_offset: 0,
                resync_cancelled: false,
            });
        self.commit()?;
        Ok(target)
    }

    pub(super) fn set_plex_state(&mut self, name: &str, disk: Uuid, state: PlexState) {
        if let Some(v) = self.config.volume_mut(name) {
            for p in &mut v.plexes {
                if p.disk == disk {
                    p.state = state;
                    if state != PlexState::Resyncing {
                        p.resync_offset = 0;
                    }
                    if state == PlexState::InSync {
                        p.resync_reason = None;
                        p.resync_cancelled = false;
                    }
                }
            }
        }
    }

    /// Removes the plex on `disk` from a mirror; its space becomes free.
    pub fn remove_mirror(&mut self, name: &str, disk: &Path) -> Result<()> {
        let uuid = self.resolve_disk(disk)?;
        let v = self.volume(name)?;
        let Some(index) = v.plexes.iter().position(|p| p.disk == uuid) else {
            return Err(Error::refused(format!(
                "volume {name} has no plex on disk {}",
                disk.display()
            )));
        };
        if v.plexes.len() == 1 {
            return Err(Error::refused(format!(
                "disk {} holds the only plex of volume {name}; use `delete` to remove the volume",
                disk.display()
            )));
        }
        self.refuse_losing_last_copy(name, uuid, "removing")?;
        self.config
            .volume_mut(name)
            .expect("checked")
            .plexes
            .remove(index);
        self.commit()
    }

    /// Refuses an operation that takes away the last in-sync plex.
    fn refuse_losing_last_copy(&self, name: &str, disk: Uuid, doing: &str) -> Result<()> {
        let v = self.volume(name)?;
        let others = v
            .plexes
            .iter()
            .filter(|p| p.disk != disk && self.plex_state(p.disk, p.state) == "in-sync")
            .count();
        if others == 0 {
            return Err(Error::refused(format!(
                "{doing} the plex on disk {} would leave volume {name} without an in-sync plex; it holds the volume's only good copy",
                self.disk_path(disk)
            )));
        }
        Ok(())
    }

    /// Breaks a mirror: the plex on `disk` leaves the volume and becomes a
    /// simple volume of its own (a new UUID, `new_name` or a derived name), or
    /// is freed with `nokeep`. The other plexes keep the name and UUID.
    pub fn break_mirror(
        &mut self,
        name: &str,
        disk: &Path,
        new_name: Option<&str>,
        nokeep: bool,
    ) -> Result<Option<String>> {
        let uuid = self.resolve_disk(disk)?;
        let v = self.volume(name)?;
        if !v.is_mirror() {
            return Err(Error::refused(format!(
                "volume {name} is not mirrored; there is no mirror to break"
            )));
        }
        let Some(index) = v.plexes.iter().position(|p| p.disk == uuid) else {
            return Err(Error::refused(format!(
                "volume {name} has no plex on disk {}",
                disk.display()
            )));
        };
        self.refuse_losing_last_copy(name, uuid, "breaking off")?;
        let state = self.plex_state(uuid, v.plexes[index].state);
        if !nokeep && state != "in-sync" {
            return Err(Error::refused(format!(
                "the plex of volume {name} on disk {} is {state}, so it does not hold the volume's data and cannot stand alone as a volume; use remove-mirror (or break --nokeep) to free it",
                disk.display()
            )));
        }
        let new_name = if nokeep {
            if new_name.is_some() {
                return Err(Error::refused(
                    "--new-name and --nokeep contradict each other: --nokeep frees the plex instead of keeping it as a volume",
                ));
            }
            None
        } else {
            let n = match new_name {
                Some(n) => {
                    check_name("volume", n)?;
                    if self.config.volume(n).is_some() {
                        return Err(Error::refused(format!(
                            "volume {n} already exists in group {}",
                            self.config.name
                        )));
                    }
                    n.to_string()
                }
                None => self.derived_name(name),
            };
            Some(n)
        };
        let v = self.config.volume_mut(name).expect("checked");
        let plex = v.plexes.remove(index);
        let size = v.size;
        if let Some(n) = &new_name {
            self.config.volumes.push(VolumeEntry {
                name: n.clone(),
                uuid: Uuid::new_v4(),
                size,
                plexes: vec![plex],
            });
        }
        self.commit()?;
        Ok(new_name)
    }

    /// `NAME-broken`, or `NAME-broken2`, ... when that is taken.
    fn derived_name(&self, name: &str) -> String {
        let base: String = format!("{name}-broken").chars().take(64).collect();
        let mut candidate = base.clone();
        let mut n = 2;
        while self.config.volume(&candidate).is_some() {
            candidate = format!("{base}{n}");
            n += 1;
        }
        candidate
    }

    /// The config half of `repair`: replaces each failed or missing
    /// plex of a volume by a new plex, recorded resyncing, and commits.
    /// Without `disk`, a replacement goes to a hot spare while one fits (as
    /// md rebuilds onto a spare), else to free space as `add-mirror` would
    /// choose it; `disk` names the disk for the first replacement. Returns
    /// the new plexes' disks and the disks of stale plexes to resync in
    /// place; the resyncs are the caller's (in the foreground offline, in
    /// the background under `serve`).
    pub fn repair_config(
        &mut self,
        name: &str,
        disk: Option<&Path>,
    ) -> Result<(Vec<Uuid>, Vec<Uuid>)> {
        let v = self.volume(name)?.clone();
        let bad: Vec<&PlexEntry> = v.plexes.iter().filter(|p| self.plex_lost(p)).collect();
        let stale: Vec<Uuid> = v
            .plexes
            .iter()
            .filter(|p| matches!(self.plex_state(p.disk, p.state), "stale" | "resyncing"))
            .map(|p| p.disk)
            .collect();
        if bad.is_empty() && stale.is_empty() {
            if let Some(d) = disk {
                return Err(Error::refused(format!(
                    "volume {name} has no failed or missing plex to replace with {}",
                    d.display()
                )));
            }
            return Err(Error::refused(format!(
                "volume {name} has no failed, missing or stale plex; there is nothing to repair"
            )));
        }
        self.require_source(name)?;
        if disk.is_some() && bad.is_empty() {
            return Err(Error::refused(format!(
                "volume {name} has no failed or missing plex to replace with {}",
                disk.map(|d| d.display().to_string()).unwrap_or_default()
            )));
        }
        // Plan every replacement before changing anything.
        let len = extent_len(v.size);
        let mut exclude: Vec<Uuid> = v.plexes.iter().map(|p| p.disk).collect();
        let bad_disks: Vec<Uuid> = bad.iter().map(|p| p.disk).collect();
        let mut plan = Vec::new();
        for (i, old) in bad.iter().enumerate() {
            let (target, offset) = match (i, disk) {
                (0, Some(d)) => self.choose_disks(name, 1, len, &[d.to_path_buf()], &exclude)?[0],
                _ => {
                    // The plexes that stay, and the replacements planned so
                    // far, are the ones a spare should not share a
                    // controller with.
                    let staying: Vec<Uuid> = exclude
                        .iter()
                        .copied()
                        .filter(|u| !bad_disks.contains(u))
                        .collect();
                    match self.pick_spare(len, &exclude, &staying) {
                        Some(spare) => spare,
                        None => self.choose_disks(name, 1, len, &[], &exclude)?[0],
                    }
                }
            };
            exclude.push(target);
            plan.push((old.disk, target, offset));
        }
        // A repair resyncs: a cancel of the stale copies no longer holds.
        let cancelled = self
            .config
            .volume(name)
            .is_some_and(|v| v.plexes.iter().any(|p| p.resync_cancelled));
        if cancelled && plan.is_empty() {
            if let Some(v) = self.config.volume_mut(name) {
                for p in &mut v.plexes {
                    p.resync_cancelled = false;
                }
            }
            self.commit()?;
        }
        let targets = self.replace_plexes(name, &plan)?;
        Ok((targets, stale))
    }

    /// Puts a new plex, recorded resyncing, in place of each old one of
    /// `plan` (old disk, new disk, offset), and commits (which also retires
    /// the spares that received a plex). Returns the new plexes' disks.
    pub(super) fn replace_plexes(
        &mut self,
        name: &str,
        plan: &[(Uuid, Uuid, u64)],
    ) -> Result<Vec<Uuid>> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let len = extent_len(self.volume(name)?.size);
        let reasons: Vec<String> = plan
            .iter()
            .map(|(old, target, _)| {
                let what = if self.is_spare(*target) {
                    "a hot spare"
                } else {
                    "a new plex"
                };
                format!("{what} replacing the plex on {}", self.disk_path(*old))
            })
            .collect();
        let vol = self.config.volume_mut(name).expect("checked above");
        for ((old, target, offset), reason) in plan.iter().zip(reasons) {
            let p = vol
                .plexes
                .iter_mut()
                .find(|p| p.disk == *old)
                .expect("planned from this volume");
            *p = PlexEntry {
                disk: *target,
                offset: *offset,
                length: len,
                state: PlexState::Resyncing,
                resync_reason: Some(reason),
                resync_offset: 0,
                resync_cancelled: false,
            };
        }
        // A repair resyncs: a cancel no longer holds.
        if let Some(v) = self.config.volume_mut(name) {
            for p in &mut v.plexes {
                p.resync_cancelled = false;
            }
        }
        self.commit()?;
        Ok(plan.iter().map(|(_, t, _)| *t).collect())
    }

    /// The config half of `reactivate`: records the disk online and
    /// its plexes that are not in sync stale, and commits. Returns the disk
    /// and the volumes with a plex on it; their resyncs are the caller's
    /// (in the foreground offline, in the background under `serve`).
    pub fn reactivate_config(&mut self, path: &Path) -> Result<(Uuid, Vec<String>)> {
        let uuid = self.resolve_disk(path)?;
        if !self.members.contains_key(&uuid) {
            return Err(Error::refused(format!(
                "disk {} is not present; attach it and name it with --disks",
                path.display()
            )));
        }
        if self.is_online(uuid) && self.members[&uuid].seqno == self.config.seqno {
            return Err(Error::refused(format!(
                "disk {} is already online",
                path.display()
            )));
        }
        // Its writes are tracked from before it is back in service.
        self.ensure_bitmap(uuid)?;
        // Decided before the config changes: the seqno at which the disk
        // left is what its twins' bitmaps must cover.
        let mut full: Vec<(String, Option<String>)> = Vec::new();
        for v in &self.config.volumes {
            if v.plexes.iter().any(|p| p.disk == uuid) {
                full.push((v.name.clone(), self.full_resync_reason(&v.name, uuid)));
            }
        }
        let next = self.config.seqno + 1;
        let entry = self.config.disk_mut(uuid).expect("resolved");
        entry.state = DiskState::Online;
        entry.state_seqno = next;
        for v in &mut self.config.volumes {
            let reason = full
                .iter()
                .find(|(n, _)| *n == v.name)
                .and_then(|(_, r)| r.clone());
            for p in &mut v.plexes {
                if p.disk == uuid && p.state != PlexState::InSync {
                    p.state = PlexState::Stale;
                    p.resync_reason = reason.clone();
                }
                // Reactivated to be resynced: a cancel no longer holds.
                if p.disk == uuid {
                    p.resync_cancelled = false;
                }
            }
        }
        self.commit()?;
        Ok((uuid, full.into_iter().map(|(n, _)| n).collect()))
    }

    /// Grows a simple volume into the free space that follows its plex.
    pub fn extend(&mut self, name: &str, size: u64) -> Result<()> {
        let v = self.volume(name)?.clone();
        if v.is_mirror() {
            return Err(Error::refused(format!(
                "volume {name} is mirrored, and a mirrored volume cannot be extended; break the mirror, extend the remaining simple volume, then add a mirror again"
            )));
        }
        check_size(name, size)?;
        if size <= v.size {
            return Err(Error::refused(format!(
                "volume {name} is already {}; the new size must be larger (volumes do not shrink)",
                human(v.size)
            )));
        }
        let plex = &v.plexes[0];
        self.require_online(plex.disk)?;
        let len = extent_len(size);
        let extra = len.saturating_sub(plex.length);
        if extra > 0 {
            let free = free_after(&self.config, plex.disk, plex.offset, plex.length);
            if free < extra {
                return Err(Error::refused(format!(
                    "disk {} has {} free right after volume {name}, and growing it to {} needs {}",
                    self.disk_path(plex.disk),
                    human(free),
                    human(size),
                    human(extra)
                )));
            }
            self.zero_extent(plex.disk, plex.offset + plex.length, extra)?;
            self.forget_written(plex.disk, plex.offset + plex.length, extra)?;
        }
        let v = self.config.volume_mut(name).expect("checked");
        v.size = size;
        v.plexes[0].length = len.max(v.plexes[0].length);
        self.commit()
    }

    /// Deletes a volume; its space becomes free.
    pub fn delete(&mut self, name: &str) -> Result<()> {
        self.volume(name)?;
        self.config.volumes.retain(|v| v.name != name);
        self.commit()
    }

    /// Marks a disk failed, and its plexes. Refused when it would take away a
    /// volume's last in-sync plex, unless `force`.
    pub fn fail(&mut self, path: &Path, force: bool) -> Result<()> {
        let uuid = self.check_fail(path, force)?;
        self.mark_disk_failed(uuid, None);
        self.commit()
    }

    /// `replace OLD NEW`, its first step: checks that the copies on `old`
    /// can be rebuilt on `new` (a disk of the group in service, with room,
    /// holding no copy of those volumes; every volume with a source in
    /// sync), and records that `old` is being replaced. Returns the
    /// volumes with a copy on `old`.
    pub fn start_replace(&mut self, old: &Path, new: &Path) -> Result<Vec<String>> {
        let o = self.resolve_disk(old)?;
        let n = self.resolve_disk(new).map_err(|_| {
            Error::refused(format!(
                "{} is not a disk of group {}: label it into the group first (`mirrorvol init {}`, or `init --spare`)",
                new.display(),
                self.config.name,
                new.display()
            ))
        })?;
        let (os, ns) = (self.disk_path(o), self.disk_path(n));
        if o == n {
            return Err(Error::refused(format!(
                "{os} and {ns} are the same disk: name another disk to replace it by"
            )));
        }
        if let Some(by) = self.config.disk(o).and_then(|d| d.replaced_by) {
            return Err(Error::refused(format!(
                "disk {os} is being replaced by {} already; `mirrorvol replace {os} --cancel` first",
                self.disk_path(by)
            )));
        }
        if !self.is_online(n) {
            return Err(Error::refused(format!(
                "disk {ns} is {}: a replacement must be in service",
                self.disk_state(n)
            )));
        }
        let volumes: Vec<&VolumeEntry> = self
            .config
            .volumes
            .iter()
            .filter(|v| v.plexes.iter().any(|p| p.disk == o))
            .collect();
        for v in &volumes {
            if v.plexes.iter().any(|p| p.disk == n) {
                return Err(Error::refused(format!(
                    "disk {ns} holds a copy of volume {} already: each copy needs a disk of its own",
                    v.name
                )));
            }
            if !v
                .plexes
                .iter()
                .any(|p| self.plex_state(p.disk, p.state) == "in-sync")
            {
                return Err(Error::refused(format!(
                    "volume {} has no copy in sync to rebuild from",
                    v.name
                )));
            }
        }
        let need: u64 = volumes
            .iter()
            .flat_map(|v| v.plexes.iter().filter(|p| p.disk == o))
            .map(|p| p.length)
            .sum();
        let room = super::alloc::free_bytes(&self.config, n);
        if need > room {
            return Err(Error::refused(format!(
                "disk {ns} has {} free; the copies on {os} need {}",
                human(room),
                human(need)
            )));
        }
        // Every new copy must find an extent, planned before anything
        // is recorded.
        let mut plan = self.config.clone();
        for v in &volumes {
            let len = v
                .plexes
                .iter()
                .find(|p| p.disk == o)
                .map_or(v.size, |p| p.length);
            let Some(offset) = first_fit(&plan, n, len) else {
                return Err(Error::refused(format!(
                    "disk {ns} has no free extent of {} for the copy of volume {} (largest free extent: {})",
                    human(len),
                    v.name,
                    human(largest_free(&plan, n))
                )));
            };
            if let Some(pv) = plan.volume_mut(&v.name) {
                pv.plexes.push(PlexEntry {
                    disk: n,
                    offset,
                    length: len,
                    state: PlexState::Resyncing,
                    resync_reason: None,
                    resync_offset: 0,
                    resync_cancelled: false,
                });
            }
        }
        let names: Vec<String> = volumes.iter().map(|v| v.name.clone()).collect();
        if let Some(d) = self.config.disk_mut(o) {
            d.replaced_by = Some(n);
        }
        self.commit()?;
        Ok(names)
    }

    /// `replace OLD --cancel`: OLD stays; the copies already made on its
    /// replacement stay too, as more copies of their volumes.
    pub fn cancel_replace(&mut self, old: &Path) -> Result<String> {
        let o = self.resolve_disk(old)?;
        let os = self.disk_path(o);
        let Some(by) = self.config.disk(o).and_then(|d| d.replaced_by) else {
            return Err(Error::refused(format!("disk {os} is not being replaced")));
        };
        if let Some(d) = self.config.disk_mut(o) {
            d.replaced_by = None;
        }
        self.commit()?;
        Ok(format!(
            "disk {os} is no longer being replaced by {}; the copies made there stay (`mirrorvol remove-mirror NAME --disk {}` frees one)",
            self.disk_path(by),
            self.disk_path(by)
        ))
    }

    /// The replacements whose every copy is in sync on the new disk: the
    /// old disk's path, the new one's, and the volumes to take off the old.
    pub fn ready_replacements(&self) -> Vec<(String, String, Vec<String>)> {
        self.config
            .disks
            .iter()
            .filter_map(|d| Some((d.uuid, d.replaced_by?)))
            .filter(|(_, n)| self.is_online(*n))
            .filter_map(|(o, n)| {
                let volumes: Vec<&VolumeEntry> = self
                    .config
                    .volumes
                    .iter()
                    .filter(|v| v.plexes.iter().any(|p| p.disk == o))
                    .collect();
                let ready = volumes.iter().all(|v| {
                    v.plexes
                        .iter()
                        .any(|p| p.disk == n && self.plex_state(p.disk, p.state) == "in-sync")
                });
                ready.then(|| {
                    (
                        self.disk_path(o),
                        self.disk_path(n),
                        volumes.iter().map(|v| v.name.clone()).collect(),
                    )
                })
            })
            .collect()
    }

    /// `remove-disk PATH`: a disk that holds no plex, or one failed or
    /// missing whose plexes all have an in-sync twin elsewhere, leaves the
    /// group. Its plexes leave their volumes (a two-way mirror becomes a
    /// simple volume), its UUID is remembered in the config so that it is
    /// not taken in again should it come back. Returns the disk's path,
    /// the volumes that lost a plex, and the disk when it is here, for the
    /// caller to wipe its labels ([`wipe_departed`]) off the controller's
    /// thread (a disk that hangs holds that thread up to its deadline).
    pub fn remove_disk(&mut self, path: &Path) -> Result<(String, Vec<String>, Option<Member>)> {
        let uuid = self.resolve_disk(path)?;
        let shown = self.disk_path(uuid);
        let holding: Vec<String> = self
            .config
            .volumes
            .iter()
            .filter(|v| v.plexes.iter().any(|p| p.disk == uuid))
            .map(|v| v.name.clone())
            .collect();
        if self.disk_state(uuid) == "online" && !holding.is_empty() {
            return Err(Error::refused(format!(
                "disk {shown} is in service and holds copies of {}: take them off first (`mirrorvol remove-mirror NAME --disk {shown}`, or `mirrorvol replace {shown} NEW`), or `mirrorvol fail` the disk",
                holding.join(", ")
            )));
        }
        let last = self.last_copies_on(uuid);
        if !last.is_empty() {
            return Err(Error::refused(format!(
                "disk {shown} holds the only copy of {} (no in-sync copy elsewhere): `mirrorvol reactivate` it to bring the data back, or `mirrorvol delete` {} first",
                last.join(", "),
                if last.len() == 1 {
                    "that volume"
                } else {
                    "those volumes"
                }
            )));
        }
        if !self.others_online(uuid) {
            return Err(Error::refused(format!(
                "disk {shown} is the last disk in service of group {}: removing it would leave no disk to record the group config on",
                self.config.name
            )));
        }
        for v in &mut self.config.volumes {
            v.plexes.retain(|p| p.disk != uuid);
        }
        self.config.disks.retain(|d| d.uuid != uuid);
        // A replacement under way onto it has nowhere to go.
        for d in &mut self.config.disks {
            if d.replaced_by == Some(uuid) {
                d.replaced_by = None;
            }
        }
        self.config.removed.push(uuid);
        let excess = self
            .config
            .removed
            .len()
            .saturating_sub(crate::format::config::REMOVED_KEPT);
        self.config.removed.drain(..excess);
        let member = self.members.remove(&uuid);
        if let Some(b) = &self.bitmaps {
            b.remove(uuid);
        }
        self.commit()?;
        Ok((shown, holding, member))
    }

    /// Whether a disk other than `uuid` is in service: one the config can
    /// still be written to once `uuid` leaves.
    fn others_online(&self, uuid: Uuid) -> bool {
        self.config
            .disks
            .iter()
            .any(|d| d.uuid != uuid && self.is_online(d.uuid))
    }

    /// The refusals of [`Group::fail`], as the config sees the disks: the
    /// disk that `fail PATH` would fail. A running group asks its engines
    /// too (a plex they failed a moment ago may not be recorded yet).
    pub fn check_fail(&self, path: &Path, force: bool) -> Result<Uuid> {
        let uuid = self.resolve_disk(path)?;
        if self.disk_state(uuid) == "failed" {
            return Err(Error::refused(format!(
                "disk {} is already failed",
                path.display()
            )));
        }
        // The config records the failure on the disks that stay online; with
        // none left, there is nowhere to record it.
        if !self.others_online(uuid) {
            return Err(Error::refused(format!(
                "disk {} is the last online disk of group {}; failing it would leave no disk to record the group config on",
                path.display(),
                self.config.name
            )));
        }
        if !force {
            for v in &self.config.volumes {
                if v.plexes.iter().any(|p| p.disk == uuid)
                    && self.plex_state(
                        uuid,
                        v.plexes.iter().find(|p| p.disk == uuid).unwrap().state,
                    ) == "in-sync"
                {
                    self.refuse_losing_last_copy(&v.name, uuid, "failing")
                        .map_err(|e| {
                            Error::refused(format!("{e}; use --force to fail it anyway"))
                        })?;
                }
            }
        }
        Ok(uuid)
    }

    pub(crate) fn refuse_group_disk(&self, path: &Path) -> Result<()> {
        if self.resolve_disk(path).is_ok() {
            return Err(Error::refused(format!(
                "{} is a disk of group {}; copying to or from it directly would bypass the mirror",
                path.display(),
                self.config.name
            )));
        }
        Ok(())
    }

    /// Opens a file or device to copy from (not a disk of the group).
    pub(crate) fn open_path_source(&self, path: &Path) -> Result<FileDisk> {
        self.refuse_group_disk(path)?;
        let opts = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        FileDisk::open(path, opts).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::refused(format!("{} does not exist", path.display()))
            } else {
                Error::io_path("open", path, e)
            }
        })
    }

    /// Opens a file or device to copy `size` bytes of `what` onto (not a
    /// disk of the group): a device must be large enough; a file is created
    /// or resized to `size`, and only after the checks.
    pub(crate) fn open_path_target(&self, path: &Path, size: u64, what: &str) -> Result<FileDisk> {
        self.refuse_group_disk(path)?;
        use std::os::unix::fs::FileTypeExt;
        let is_device = fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if is_device {
            let disk = FileDisk::open(path, OpenOptions::default())
                .map_err(|e| Error::io_path("open", path, e))?;
            if disk.size() < size {
                return Err(Error::refused(format!(
                    "{} ({}) is smaller than {what} ({})",
                    path.display(),
                    human(disk.size()),
                    human(size)
                )));
            }
            return Ok(disk);
        }
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io_path("create", path, e))?;
        f.set_len(size)
            .map_err(|e| Error::io_path("resize", path, e))?;
        FileDisk::open(path, OpenOptions::default()).map_err(|e| Error::io_path("open", path, e))
    }

    /// Before data is written to a volume, plexes that cannot receive it (on
    /// absent disks) are recorded stale, so they are known to be behind.
    pub(super) fn prepare_write(&mut self, name: &str) -> Result<()> {
        let v = self.volume(name)?.clone();
        let mut changed = false;
        for p in &v.plexes {
            if p.state == PlexState::InSync && self.plex_state(p.disk, p.state) == "missing" {
                self.set_plex_state(name, p.disk, PlexState::Stale);
                changed = true;
            }
        }
        if !v
            .plexes
            .iter()
            .any(|p| self.plex_state(p.disk, p.state) == "in-sync")
        {
            return Err(Error::refused(format!(
                "volume {name} is {} and has no in-sync plex to write to",
                self.volume_state(&v)
            )));
        }
        if changed {
            self.commit()?;
        }
        Ok(())
    }
}

/// Reads (or writes) one chunk of a copy on a file or device.
pub(crate) fn path_io(
    path: &Path,
    disk: &FileDisk,
    pos: u64,
    chunk: &mut [u8],
    write: bool,
) -> Result<()> {
    let (r, verb) = if write && chunk.iter().all(|b| *b == 0) {
        // A chunk of zeroes becomes a hole in a file (zeroes the cheap way
        // on a device): a copy of a mostly empty volume stays sparse.
        (disk.write_zeroes(pos, chunk.len() as u64), "write")
    } else if write {
        (disk.write_at(chunk, pos), "write")
    } else {
        (disk.read_at(chunk, pos), "read")
    };
    r.map_err(|e| {
        Error::io(
            format!("cannot {verb} {} at offset {pos}", path.display()),
            e,
        )
    })
}

/// Copies `size` bytes a chunk at a time: `step` moves the chunk at `pos`
/// (reads it into the buffer, then writes it out); with a `rate` (bytes/s,
/// 0 for none), no faster than that, in chunks of about a quarter second's
/// worth, sleeping between them. Stops between chunks once `stop` says so,
/// returning where (`None`: it copied everything).
pub(crate) fn copy_chunks(
    size: u64,
    progress: &dyn Progress,
    rate: u64,
    stop: &dyn Fn() -> bool,
    mut step: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<Option<u64>> {
    let chunk = match rate {
        0 => COPY_CHUNK as u64,
        r => (r / 4).clamp(64 << 10, COPY_CHUNK as u64) / (64 << 10) * (64 << 10),
    };
    let mut buf = AlignedBuf::new(chunk as usize, IO_ALIGN);
    let mut pos = 0;
    let started = std::time::Instant::now();
    while pos < size {
        if stop() {
            return Ok(Some(pos));
        }
        let n = (size - pos).min(chunk) as usize;
        step(pos, &mut buf[..n])?;
        pos += n as u64;
        progress.set(pos);
        if rate > 0 && pos < size {
            let due = std::time::Duration::from_secs_f64(pos as f64 / rate as f64);
            // In slices, so that a stop is seen within 100 ms.
            while started.elapsed() < due && !stop() {
                let left = due.saturating_sub(started.elapsed());
                std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
            }
        }
    }
    Ok(None)
}

/// Refuses to copy `size` bytes of `what` onto the volume `name` of
/// `volume_size` bytes when they do not fit.
pub(crate) fn refuse_smaller(name: &str, volume_size: u64, what: &str, size: u64) -> Result<()> {
    if volume_size < size {
        return Err(Error::refused(format!(
            "volume {name} ({}) is smaller than {what} ({})",
            human(volume_size),
            human(size)
        )));
    }
    Ok(())
}

/// One side of `copy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Path(PathBuf),
    Volume(String),
}

impl Endpoint {
    /// Refuses a copy between two files, or of a volume onto itself.
    pub fn refuse_pair(src: &Endpoint, dst: &Endpoint) -> Result<()> {
        match (src, dst) {
            (Endpoint::Path(_), Endpoint::Path(_)) => Err(Error::refused(
                "copy needs a volume on at least one side: write it as vol:NAME",
            )),
            (Endpoint::Volume(a), Endpoint::Volume(b)) if a == b => Err(Error::refused(format!(
                "volume {a} cannot be copied onto itself"
            ))),
            _ => Ok(()),
        }
    }

    /// `vol:NAME` names a volume; anything else is a path.
    pub fn parse(s: &str) -> Endpoint {
        match s.strip_prefix("vol:") {
            Some(name) => Endpoint::Volume(name.to_string()),
            None => Endpoint::Path(PathBuf::from(s)),
        }
    }
}

/// What the tests of this file set a group up with.
#[cfg(test)]
mod test_group {
    use std::path::{Path, PathBuf};

    use super::InitOptions;
    use crate::MIB;
    use crate::format::Style;

    /// A new 40 MiB image file `name` in `dir`.
    pub(super) fn image_in(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .set_len(40 * MIB)
            .unwrap();
        p
    }

    /// `init` of a raw group `g` with the default region size.
    pub(super) fn raw() -> InitOptions {
        InitOptions {
            style: Style::Raw,
            controller: None,
            group: Some("g".into()),
            force: false,
            region_size: 0,
            spare: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::FaultyDisk;
    use crate::group::open_disk;

    #[test]
    fn a_join_that_fails_part_way_leaves_the_group_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let image = |name: &str| test_group::image_in(dir.path(), name);
        let opts = test_group::raw();
        let mut g = init(None, &[image("a.img")], &opts).unwrap();
        let (disks, members, seqno) = (g.config.disks.clone(), g.members.len(), g.config.seqno);
        // The second new disk fails its first write: the first one is
        // formatted, and must not join on its own.
        let good = open_disk(&image("b.img")).unwrap();
        let bad = Arc::new(FaultyDisk::new(open_disk(&image("c.img")).unwrap()));
        bad.fail_writes(0..u64::MAX);
        let bad = QueuedDisk::start("c.img", bad, 1, crate::volume::queue::DEFAULT_IO_TIMEOUT);
        let new: Vec<(PathBuf, Arc<QueuedDisk>)> = vec![
            (dir.path().join("b.img"), good),
            (dir.path().join("c.img"), bad),
        ];
        assert!(g.add_disks(new, &opts).is_err());
        assert_eq!(g.config.disks, disks);
        assert_eq!(g.members.len(), members);
        assert_eq!(g.config.seqno, seqno, "nothing was committed");
    }

    /// A new group records the default region size; a group made before it
    /// did (0 recorded) gives a disk that joins it the 64 KiB regions its
    /// disks have, so that a group keeps one region size.
    #[test]
    fn a_group_keeps_the_region_size_it_was_made_with() {
        use crate::format::bitmap::{DEFAULT_REGION_SIZE, LEGACY_REGION_SIZE};
        let dir = tempfile::tempdir().unwrap();
        let image = |name: &str| test_group::image_in(dir.path(), name);
        let opts = test_group::raw();
        // What the disk's bitmap header says (4 KiB, neither size, would be
        // a header not found).
        let region_of = |g: &Group, path: &Path| {
            let m = g
                .members
                .values()
                .find(|m| m.path == path)
                .expect("a member");
            let disk: Arc<dyn crate::disk::Disk> = m.disk.clone();
            let (b, _) =
                crate::volume::bitmap::DiskBitmap::load(disk, &m.label.layout, 4096, 0).unwrap();
            b.header().region_size
        };
        let (a, b) = (image("a.img"), image("b.img"));
        let mut g = init(None, std::slice::from_ref(&a), &opts).unwrap();
        assert_eq!(g.config.region_size, DEFAULT_REGION_SIZE);
        assert_eq!(region_of(&g, &a), DEFAULT_REGION_SIZE);
        // As a group made before 2026-12-05 records it.
        g.config.region_size = 0;
        let g = init(Some(g), std::slice::from_ref(&b), &opts).unwrap();
        assert_eq!(region_of(&g, &b), LEGACY_REGION_SIZE);
    }
}

#[cfg(test)]
mod link_tests {
    use std::fs;
    use std::time::Duration;

    use super::*;
    use crate::MIB;
    use crate::disk::FaultyDisk;

    /// A disk whose bitmap cannot be read when the group starts is failed,
    /// not the group; reactivated, it gets a fresh bitmap tracking from
    /// then on (its old bits missed what was written meanwhile), so a disk
    /// that left before cannot come back by it.
    #[test]
    fn a_disk_whose_bitmap_fails_at_start_is_failed_and_comes_back_with_a_fresh_one() {
        let dir = tempfile::tempdir().unwrap();
        let image = |name: &str| test_group::image_in(dir.path(), name);
        let opts = test_group::raw();
        let paths = [image("a.img"), image("b.img"), image("c.img")];
        let mut g = init(None, &paths, &opts).unwrap();
        g.create("m", 8 * MIB, 2, &paths[..2]).unwrap();
        let b = g.resolve_disk(&paths[1]).unwrap();
        let area = g.members[&b].label.layout.bitmap_offset();
        let bad = Arc::new(FaultyDisk::new(g.members[&b].disk.clone()));
        bad.fail_reads(area..area + 4096);
        let m = g.members.get_mut(&b).unwrap();
        m.disk = QueuedDisk::start("b", bad.clone(), 1, Duration::from_secs(5));
        g.start_bitmaps().unwrap();
        assert_eq!(g.config.disk(b).unwrap().state, DiskState::Failed);
        assert!(g.bitmaps.as_ref().unwrap().get(b).is_none());
        assert!(
            g.warnings.iter().any(|w| w.contains("write-intent bitmap")),
            "{:?}",
            g.warnings
        );
        bad.clear();
        g.reactivate_config(&paths[1]).unwrap();
        let fresh = g.bitmaps.as_ref().unwrap().get(b).expect("a bitmap now");
        assert!(
            fresh.header().since >= g.config.seqno - 1,
            "tracks from its return on"
        );
    }

    /// A disk that stops answering during a config write: a remote one
    /// (its path an NBD URI) lost its connection and comes back by the
    /// bitmaps (no resync reason, marked for reconnection); a local one
    /// failed, and its plexes get a full resync.
    #[test]
    fn a_remote_disk_lost_during_a_config_write_is_marked_for_reconnection() {
        for remote in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let image = |name: &str| {
                let p = dir.path().join(name);
                fs::File::create(&p).unwrap().set_len(40 * MIB).unwrap();
                p
            };
            let opts = InitOptions {
                style: Style::Raw,
                controller: None,
                group: Some("g".into()),
                force: false,
                region_size: 0,
                spare: false,
            };
            let paths = [image("a.img"), image("b.img"), image("c.img")];
            let mut g = init(None, &paths, &opts).unwrap();
            g.create("m", 8 * MIB, 2, &paths[..2]).unwrap();
            let b = g.resolve_disk(&paths[1]).unwrap();
            // b hangs behind a short deadline: its config write times out.
            let hung = Arc::new(FaultyDisk::new(g.members[&b].disk.clone()));
            hung.hang();
            let queued = QueuedDisk::start("b", hung.clone(), 1, Duration::from_millis(200));
            let shown = if remote {
                "nbd+unix:///b?socket=/nonexistent/b.sock".to_string()
            } else {
                paths[1].display().to_string()
            };
            let m = g.members.get_mut(&b).unwrap();
            m.disk = queued;
            m.path = PathBuf::from(&shown);
            g.config.disk_mut(b).unwrap().path = shown.clone();
            g.commit().unwrap();
            hung.release();
            let d = g.config.disk(b).unwrap();
            assert_eq!(d.state, DiskState::Failed, "{shown}");
            assert_eq!(d.link_lost, remote, "{shown}");
            let p = g
                .volume("m")
                .unwrap()
                .plexes
                .iter()
                .find(|p| p.disk == b)
                .unwrap();
            assert_eq!(p.state, crate::format::PlexState::Failed);
            assert_eq!(p.resync_reason.is_some(), !remote, "{shown}: {p:?}");
        }
    }
}
