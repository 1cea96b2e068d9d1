//! Split brain: two or more sides of a group that each changed the config
//! without the others (each disk assembled alone, say). Assembly never picks
//! a side: it records them here, with what each side's write-intent bitmaps
//! say it changed in every volume they share, and every command that would
//! write refuses until the admin keeps one side with
//! `resolve-split-brain --keep PATH`.
//!
//! Resolution makes the kept side's config the group's and brings the other
//! side's disks back as returning disks; the group's controller then
//! resyncs their plexes from the kept side as it resyncs any returning
//! plex: the regions that either side changed since they parted (the
//! union of both sides' bitmaps), or the whole volume when a bitmap cannot
//! vouch for that (absent, damaged, or started after the sides parted).

use std::ops::Range;
use std::path::Path;

use uuid::Uuid;

use super::bitmap::{merge, to_volume};
use super::{Found, Group};
use crate::format::{DiskState, GroupConfig, PlexState};
use crate::volume::bitmap::{DiskBitmap, Found as BitmapFound};
use crate::{Error, Result};

/// One side of a split group: disks that share one config.
#[derive(Debug, Clone)]
pub struct SplitSide {
    pub disks: Vec<Uuid>,
    pub paths: Vec<String>,
    /// The config seqno this side reached.
    pub seqno: u64,
    /// This side's config (its `seqno` set).
    pub config: GroupConfig,
}

/// What one side changed in one volume since the sides parted.
#[derive(Debug, Clone)]
pub struct SideChange {
    /// Volume byte ranges the side's bitmaps name, merged; empty when the
    /// side holds no plex of the volume.
    pub ranges: Vec<Range<u64>>,
    /// Bitmap regions those ranges cover.
    pub regions: u64,
    pub bytes: u64,
    /// Why the bitmaps cannot say what this side changed (then the whole
    /// volume must be assumed changed).
    pub unknown: Option<String>,
}

/// A volume with plexes on more than one side.
#[derive(Debug, Clone)]
pub struct SplitVolume {
    pub name: String,
    pub uuid: Uuid,
    pub size: u64,
    /// One entry per side, in the order of [`SplitBrain::sides`].
    pub changes: Vec<SideChange>,
}

/// The sides of a split group and what each changed.
#[derive(Debug, Clone)]
pub struct SplitBrain {
    /// The side holding the newest config comes first.
    pub sides: Vec<SplitSide>,
    pub volumes: Vec<SplitVolume>,
}

fn same_config(a: &GroupConfig, b: &GroupConfig) -> bool {
    let states = |c: &GroupConfig| -> Vec<(Uuid, DiskState, u64)> {
        c.disks
            .iter()
            .map(|d| (d.uuid, d.state, d.state_seqno))
            .collect()
    };
    a.volumes == b.volumes && states(a) == states(b)
}

/// Sorts the disks found into sides: the newest config's side (`main`:
/// every disk not in `split`), then one side per distinct config among the
/// disks in `split`; and reads each side's bitmaps for what it changed.
pub(super) fn build(found: &[Found], split: &[usize], main: &GroupConfig) -> SplitBrain {
    let mut sides: Vec<(SplitSide, Vec<usize>)> = Vec::new();
    let main_idx: Vec<usize> = (0..found.len())
        .filter(|i| !split.contains(i) && main.disk(found[*i].read.label.disk_uuid).is_some())
        .collect();
    sides.push((
        SplitSide {
            disks: Vec::new(),
            paths: Vec::new(),
            seqno: main.seqno,
            config: main.clone(),
        },
        main_idx,
    ));
    for &i in split {
        let f = &found[i];
        let mut c = f.config.clone().expect("split disks have a config");
        c.seqno = f.seqno;
        match sides
            .iter_mut()
            .skip(1)
            .find(|(s, _)| s.seqno == c.seqno && same_config(&s.config, &c))
        {
            Some((_, idx)) => idx.push(i),
            None => sides.push((
                SplitSide {
                    disks: Vec::new(),
                    paths: Vec::new(),
                    seqno: c.seqno,
                    config: c,
                },
                vec![i],
            )),
        }
    }
    for (s, idx) in &mut sides {
        for &i in idx.iter() {
            s.disks.push(found[i].read.label.disk_uuid);
            s.paths.push(found[i].path.display().to_string());
        }
    }

    // A volume is affected when its plexes, in some side's config, sit on
    // disks of more than one side.
    let side_of = |disk: Uuid| sides.iter().position(|(s, _)| s.disks.contains(&disk));
    let mut affected: Vec<(Uuid, String, u64)> = Vec::new();
    for (s, _) in &sides {
        for v in &s.config.volumes {
            let mut on: Vec<usize> = v.plexes.iter().filter_map(|p| side_of(p.disk)).collect();
            on.sort();
            on.dedup();
            if on.len() > 1 && !affected.iter().any(|(u, _, _)| *u == v.uuid) {
                affected.push((v.uuid, v.name.clone(), v.size));
            }
        }
    }

    let oldest = sides.iter().map(|(s, _)| s.seqno).min().unwrap_or(0);
    let volumes = affected
        .into_iter()
        .map(|(uuid, name, size)| {
            let changes = sides
                .iter()
                .map(|(side, idx)| side_change(found, side, idx, &sides, uuid, oldest))
                .collect();
            SplitVolume {
                name,
                uuid,
                size,
                changes,
            }
        })
        .collect();
    SplitBrain {
        sides: sides.into_iter().map(|(s, _)| s).collect(),
        volumes,
    }
}

/// What `side` changed in volume `uuid`, from the bitmaps of its disks.
fn side_change(
    found: &[Found],
    side: &SplitSide,
    idx: &[usize],
    sides: &[(SplitSide, Vec<usize>)],
    uuid: Uuid,
    oldest: u64,
) -> SideChange {
    let unknown = |why: String| SideChange {
        ranges: Vec::new(),
        regions: 0,
        bytes: 0,
        unknown: Some(why),
    };
    let Some(v) = side.config.volumes.iter().find(|v| v.uuid == uuid) else {
        return unknown(format!(
            "the volume does not exist in the config of this side (config {})",
            side.seqno
        ));
    };
    // The config at which this side recorded the others gone: its bitmaps
    // must have tracked every write from before then.
    let parted = sides
        .iter()
        .flat_map(|(s, _)| s.disks.iter())
        .filter(|d| !side.disks.contains(d))
        .filter_map(|d| side.config.disk(*d))
        .filter(|d| d.state != DiskState::Online)
        .map(|d| d.state_seqno)
        .min()
        .unwrap_or(oldest);
    let mut ranges = Vec::new();
    let mut region = 0;
    for &i in idx {
        let f = &found[i];
        let disk = f.read.label.disk_uuid;
        let Some(plex) = v.plexes.iter().find(|p| p.disk == disk) else {
            continue;
        };
        let path = f.path.display();
        let loaded = DiskBitmap::load(
            f.disk.clone(),
            &f.read.label.layout,
            side.config.region_size,
            side.seqno,
        );
        let b = match loaded {
            Ok((b, BitmapFound::Valid)) => b,
            Ok((_, BitmapFound::Absent)) => {
                return unknown(format!("disk {path} has no write-intent bitmap"));
            }
            Ok((_, BitmapFound::Damaged(e))) => {
                return unknown(format!(
                    "the write-intent bitmap of disk {path} is damaged ({e})"
                ));
            }
            Err(e) => return unknown(format!("the bitmap of disk {path} cannot be read ({e})")),
        };
        let h = b.header();
        if h.since >= parted {
            return unknown(format!(
                "the write-intent bitmap of disk {path} started at config {}, after the sides parted at config {parted}",
                h.since
            ));
        }
        region = h.region_size;
        ranges.extend(to_volume(plex, v.size, &b.dirty_ranges()));
    }
    let ranges = merge(ranges);
    let bytes = ranges.iter().map(|r| r.end - r.start).sum();
    let regions = if region == 0 {
        0
    } else {
        ranges
            .iter()
            .map(|r| (r.end - r.start).div_ceil(region))
            .sum()
    };
    SideChange {
        ranges,
        regions,
        bytes,
        unknown: None,
    }
}

fn describe_change(c: &SideChange) -> String {
    match &c.unknown {
        Some(why) => format!("unknown ({why})"),
        None => format!(
            "{} region{} ({})",
            c.regions,
            if c.regions == 1 { "" } else { "s" },
            super::ops::human(c.bytes)
        ),
    }
}

impl SplitBrain {
    /// One line per side: its disks, its config and what it changed.
    pub fn side_lines(&self) -> Vec<String> {
        self.sides
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let changed: Vec<String> = self
                    .volumes
                    .iter()
                    .map(|v| format!("volume {} {}", v.name, describe_change(&v.changes[i])))
                    .collect();
                format!(
                    "side {} ({}, config {}) changed {}",
                    i + 1,
                    s.paths.join(", "),
                    s.seqno,
                    if changed.is_empty() {
                        "no shared volume".to_string()
                    } else {
                        changed.join(", ")
                    }
                )
            })
            .collect()
    }

    pub fn is_affected(&self, volume: Uuid) -> bool {
        self.volumes.iter().any(|v| v.uuid == volume)
    }
}

impl Group {
    /// Refuses, with a sentence naming every side and the resolving
    /// command, when the group is split: nothing may be written to it.
    pub fn refuse_split(&self) -> Result<()> {
        let Some(split) = &self.split else {
            return Ok(());
        };
        Err(Error::refused(format!(
            "group {} is split: {} moved on without each other: {}; nothing is written or served until you keep one side with `mirrorvol resolve-split-brain --keep PATH` (PATH a disk of that side; the other side is resynced from it)",
            self.config.name,
            split
                .sides
                .iter()
                .map(|s| s.paths.join(" + "))
                .collect::<Vec<_>>()
                .join(" and "),
            split.side_lines().join("; ")
        )))
    }

    /// Keeps the side of the disk at `keep`: its config becomes the group's,
    /// and the other sides' disks return with their plexes stale, each with
    /// the reason it needs a full copy where a bitmap cannot vouch for what
    /// either side changed. Committed here; the resyncs are the
    /// controller's, as for any returning plex: the regions either side's
    /// bitmaps name (the union of both sides' changes), or the whole volume.
    /// Returns the volumes to resync.
    pub fn keep_split_side(&mut self, keep: &Path) -> Result<Vec<String>> {
        let Some(split) = self.split.clone() else {
            return Err(Error::refused(format!(
                "group {} has no split brain to resolve",
                self.config.name
            )));
        };
        let paths = || {
            split
                .sides
                .iter()
                .map(|s| s.paths.join(", "))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let not_a_side = || {
            Error::refused(format!(
                "{} is not a disk of either side of the split group {}; name a disk of one side: {}",
                keep.display(),
                self.config.name,
                paths()
            ))
        };
        let uuid = self.resolve_disk(keep).map_err(|_| not_a_side())?;
        let Some(k) = split.sides.iter().position(|s| s.disks.contains(&uuid)) else {
            return Err(not_a_side());
        };
        let kept = &split.sides[k];
        let returning: Vec<Uuid> = split
            .sides
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != k)
            .flat_map(|(_, s)| s.disks.iter().copied())
            .filter(|d| kept.config.disk(*d).is_some())
            .collect();

        // Decide every plex's resync before the config changes.
        let mut config = kept.config.clone();
        config.seqno = split.sides.iter().map(|s| s.seqno).max().unwrap_or(0);
        let next = config.seqno + 1;
        let mut volumes = Vec::new();
        for v in &mut config.volumes {
            let sv = split.volumes.iter().find(|s| s.uuid == v.uuid);
            for p in v.plexes.iter_mut().filter(|p| returning.contains(&p.disk)) {
                let side = split
                    .sides
                    .iter()
                    .find(|s| s.disks.contains(&p.disk))
                    .expect("returning disks are on a side");
                let same_place = side
                    .config
                    .volumes
                    .iter()
                    .find(|o| o.uuid == v.uuid)
                    .and_then(|o| o.plexes.iter().find(|q| q.disk == p.disk))
                    .is_some_and(|q| q.offset == p.offset && q.length == p.length);
                let why_full = if let Some(r) = &p.resync_reason {
                    Some(r.clone())
                } else if matches!(p.state, PlexState::Failed | PlexState::Resyncing) {
                    Some("it was not in sync before the split".to_string())
                } else if !same_place {
                    Some("the volume changed shape on the other side of the split".to_string())
                } else {
                    match sv {
                        None => Some("the split could not be measured".to_string()),
                        Some(sv) => sv.changes.iter().find_map(|c| c.unknown.clone()),
                    }
                };
                p.state = PlexState::Stale;
                p.resync_reason = why_full;
                if !volumes.contains(&v.name) {
                    volumes.push(v.name.clone());
                }
            }
        }
        for d in &mut config.disks {
            if returning.contains(&d.uuid) {
                d.state = DiskState::Online;
                d.state_seqno = next;
            }
        }
        self.config = config;
        // Keep the paths the disks were found at.
        for (uuid, m) in &self.members {
            if let Some(e) = self.config.disk_mut(*uuid) {
                e.path = m.path.display().to_string();
            }
        }
        self.split = None;
        self.commit()?;
        for name in &volumes {
            if self.require_source(name).is_err() {
                let disks: Vec<String> = self
                    .volume(name)?
                    .plexes
                    .iter()
                    .filter(|p| returning.contains(&p.disk))
                    .map(|p| self.disk_path(p.disk))
                    .collect();
                self.warnings.push(format!(
                    "volume {name} has no in-sync plex on the kept side; its plex on {} stays stale",
                    disks.join(", ")
                ));
            }
        }
        Ok(volumes)
    }
}
