//! The group's state as `status` shows it: one serializable report, printed
//! as JSON (DESIGN.md §6 schema) or as text.

use std::collections::BTreeMap;

use serde::Serialize;
use uuid::Uuid;

use super::Group;
use super::alloc::free_bytes;
use crate::format::PlexState;

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub group: GroupStatus,
    pub disks: Vec<DiskStatus>,
    pub volumes: Vec<VolumeStatus>,
    /// The sides of a split group (empty, and left out, when not split).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub split_brain: Vec<SplitSideStatus>,
    /// Paths given as disks that could not be read at all, with the reason
    /// (left out when there are none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<super::Unreadable>,
}

#[derive(Debug, Serialize)]
pub struct SplitSideStatus {
    /// The disks of this side, as found.
    pub disks: Vec<String>,
    /// The config seqno this side reached.
    pub seqno: u64,
    pub volumes: Vec<SplitVolumeStatus>,
}

/// What one side changed in a volume shared with another side since they
/// parted, from its write-intent bitmaps.
#[derive(Debug, Serialize)]
pub struct SplitVolumeStatus {
    pub name: String,
    /// Bitmap regions changed; null when the bitmaps cannot say.
    pub regions: Option<u64>,
    /// Bytes those regions cover; null when the bitmaps cannot say.
    pub bytes: Option<u64>,
    /// Why the bitmaps cannot say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub uuid: Uuid,
    pub seqno: u64,
    /// The newest data generation of the disks in service (left out
    /// before format 3 wrote one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Who holds the group's claim on its disks ("mirrorvol serve (pid N)
    /// on host H"), when someone does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    /// The progress of the command holding the group, as its claim shows
    /// it (offline `status` while another command runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder_progress: Option<HolderProgress>,
}

/// What the process holding the group is doing.
#[derive(Debug, Serialize)]
pub struct HolderProgress {
    pub what: String,
    pub done: u64,
    pub total: u64,
    pub percent: f64,
    /// Bytes per second since it began.
    pub rate: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// Seconds since the holder last renewed its claim, when that is late
    /// (it may have stopped): no rate or time left is shown then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_renewed_for: Option<u64>,
}

impl HolderProgress {
    pub fn of(a: &crate::format::state::Activity, late: Option<u64>) -> HolderProgress {
        let rate = if late.is_some() { 0 } else { a.rate };
        HolderProgress {
            what: a.what.clone(),
            done: a.done,
            total: a.total,
            percent: (a.done as f64 * 1000.0 / a.total.max(1) as f64).floor() / 10.0,
            rate,
            eta_seconds: (rate > 0).then(|| (a.total - a.done.min(a.total)).div_ceil(rate)),
            not_renewed_for: late,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DiskStatus {
    pub path: String,
    pub uuid: Uuid,
    pub state: &'static str,
    pub controller: String,
    pub style: String,
    pub size: u64,
    pub free: u64,
    /// The largest free extent: the largest plex the disk can take.
    pub largest_free: u64,
    /// I/O errors seen since the group was put in service.
    pub errors: u64,
    /// A hot spare: it holds no plex and waits for a repair to need it.
    pub spare: bool,
    /// Write-mostly (`set-disk --write-mostly on`): its plexes serve reads
    /// only when no other in-sync plex can.
    pub write_mostly: bool,
    /// Write-behind: writes to its plexes that may be outstanding once the
    /// others have them (0: none).
    pub write_behind: u32,
    /// The deadline of its requests in milliseconds, and whether it is the
    /// disk's own (`set-disk --timeout`) rather than the group's.
    pub timeout_ms: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub own_timeout: bool,
    /// `replace`: the disk its copies are being rebuilt on; it leaves the
    /// group once they are in sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// Bytes of the disk's data area, from which plexes are carved (the
    /// label, config slots and bitmaps take the rest of `size`).
    pub data_size: u64,
    /// Whether the disk keeps block checksums (format 5; false for an
    /// older disk until its checksums are first written; left out for a
    /// disk not present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksums: Option<bool>,
    /// The format version its labels hold now (with `checksums` false).
    #[serde(skip)]
    pub format: Option<u32>,
    /// The data generation the disk holds (left out when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// What runs the disk's data requests (`uring` or `threads`), while
    /// it is open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<&'static str>,
    /// An NBD export's connection: `connected`, or (under `serve`) how it
    /// was lost and is being tried again. Left out for local disks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub uuid: Uuid,
    pub size: u64,
    pub layout: &'static str,
    pub state: &'static str,
    pub duplexed: bool,
    pub plexes: Vec<PlexStatus>,
    /// The volume's plexes sit on both sides of a split group: it is
    /// `failed` (not served, not written) until the split is resolved.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub split_brain: bool,
    /// Under `serve`: NBD connections using the volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<usize>,
    /// Under `serve`, when the volume is `not-answering`: the disks of its
    /// in-sync plexes, whose requests are waiting past the deadline (a
    /// volume's last copy is waited for, not failed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_on: Vec<String>,
    /// Under `serve`, while a scrub of the volume runs: how far it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub: Option<ScrubStatus>,
    /// Under `serve`, while `copy` writes the volume or reads it: how far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyStatus>,
    /// Bytes some in-sync plex records as written (the written maps):
    /// what a rebuild copies. Absent where a disk has no written map
    /// (formatted before format 4) or none can be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written: Option<u64>,
}

/// A copy under way.
#[derive(Debug, Serialize)]
pub struct CopyStatus {
    /// "volume data", or a path.
    pub from: String,
    pub to: String,
    pub done: u64,
    pub total: u64,
    pub percent: f64,
    /// Bytes/s copied, and the seconds left at that rate.
    pub rate: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
}

/// A scrub under way.
#[derive(Debug, Serialize)]
pub struct ScrubStatus {
    /// `scrub --repair` rather than a check.
    pub repair: bool,
    /// Started by `serve --scrub-interval`, not by an admin.
    pub background: bool,
    pub percent: f64,
    /// Bytes/s compared, and the seconds left at that rate.
    pub rate: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct PlexStatus {
    pub disk: String,
    /// Where the plex's extent lies in its disk's data area, and how long
    /// it is (whole MiB, at least the volume's size).
    pub offset: u64,
    pub length: u64,
    pub state: &'static str,
    /// 100 when in sync, 0 when stale, the copy's progress while resyncing;
    /// null when the plex is failed or missing.
    pub resync_percent: Option<f64>,
    /// Why the plex needs or gets a full resync instead of a copy of the
    /// regions the write-intent bitmaps name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_reason: Option<String>,
    /// While a resync runs (under `serve`): its rate in bytes/s, a moving
    /// average, and the seconds left at that rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_rate: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_eta_seconds: Option<u64>,
    /// `paused` or `cancelled` when an admin stopped the plex's resync
    /// (`resync NAME --pause|--cancel`); left out otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_held: Option<&'static str>,
}

impl Group {
    pub fn status(&self) -> StatusReport {
        self.status_with(&BTreeMap::new())
    }

    /// Status, with the I/O errors a running engine has counted per disk: a
    /// disk with errors is `online-errors`, and a volume whose in-sync plex
    /// sits on such a disk is `failed-redundancy-at-risk` (a plex already
    /// failed puts nothing more at risk).
    /// An NBD disk's connection as this process holds it: `connected`,
    /// `lost (...)` once it broke, `not connected` when absent.
    fn link_of(&self, disk: Uuid) -> Option<String> {
        if !super::is_nbd(std::path::Path::new(&self.disk_path(disk))) {
            return None;
        }
        let backend = self.members.get(&disk).and_then(|m| m.disk.queue().disk());
        Some(match backend.map(|d| d.health()) {
            Some(Ok(())) => "connected".to_string(),
            Some(Err(e)) => format!("lost ({e})"),
            None => "not connected".to_string(),
        })
    }

    pub fn status_with(&self, errors: &BTreeMap<Uuid, u64>) -> StatusReport {
        let errors_on = |disk: Uuid| errors.get(&disk).copied().unwrap_or(0);
        let split_affected = |v: Uuid| self.split.as_ref().is_some_and(|s| s.is_affected(v));
        let disks = self
            .config
            .disks
            .iter()
            .map(|d| DiskStatus {
                path: self.disk_path(d.uuid),
                uuid: d.uuid,
                state: match self.disk_state(d.uuid) {
                    "online" if errors_on(d.uuid) > 0 => "online-errors",
                    state => state,
                },
                controller: d.controller.clone(),
                style: d.style.to_string(),
                size: d.size,
                data_size: d.data_size,
                checksums: self
                    .label_version(d.uuid)
                    .map(|v| v >= 5 && crate::volume::sums::enabled()),
                format: self.label_version(d.uuid),
                free: free_bytes(&self.config, d.uuid),
                largest_free: super::alloc::largest_free(&self.config, d.uuid),
                errors: errors_on(d.uuid),
                spare: d.spare,
                write_mostly: d.write_mostly,
                write_behind: d.write_behind,
                timeout_ms: self.deadline_of(d.uuid).as_millis() as u64,
                own_timeout: d.timeout_ms > 0,
                replaced_by: d.replaced_by.map(|n| self.disk_path(n)),
                generation: Some(self.generation_of(d.uuid)).filter(|g| *g > 0),
                io_engine: self
                    .members
                    .get(&d.uuid)
                    .map(|m| m.disk.queue().engine().name()),
                link: self.link_of(d.uuid),
            })
            .collect();
        let volumes = self
            .config
            .volumes
            .iter()
            .map(|v| {
                let mut controllers: Vec<&str> = v
                    .plexes
                    .iter()
                    .filter_map(|p| self.config.disk(p.disk))
                    .map(|d| d.controller.as_str())
                    .collect();
                controllers.sort();
                controllers.dedup();
                VolumeStatus {
                    name: v.name.clone(),
                    uuid: v.uuid,
                    size: v.size,
                    layout: if v.is_mirror() { "mirror" } else { "simple" },
                    state: match self.volume_state(v) {
                        _ if split_affected(v.uuid) => "failed",
                        "healthy" | "failed-redundancy"
                            if v.plexes.iter().any(|p| {
                                errors_on(p.disk) > 0
                                    && self.plex_state(p.disk, p.state) == "in-sync"
                            }) =>
                        {
                            "failed-redundancy-at-risk"
                        }
                        state => state,
                    },
                    duplexed: v.is_mirror() && controllers.len() == v.plexes.len(),
                    plexes: v
                        .plexes
                        .iter()
                        .map(|p| {
                            let state = self.plex_state(p.disk, p.state);
                            PlexStatus {
                                disk: self.disk_path(p.disk),
                                offset: p.offset,
                                length: p.length,
                                state,
                                resync_percent: match (state, p.state) {
                                    ("in-sync", _) => Some(100.0),
                                    // Where its checkpoint says a resync
                                    // resumes.
                                    ("resyncing", PlexState::Resyncing) => Some(
                                        (p.resync_offset.min(v.size) as f64 * 1000.0
                                            / v.size.max(1) as f64)
                                            .floor()
                                            / 10.0,
                                    ),
                                    ("stale", _) => Some(0.0),
                                    _ => None,
                                },
                                resync_reason: p.resync_reason.clone(),
                                resync_rate: None,
                                resync_eta_seconds: None,
                                resync_held: (p.resync_cancelled
                                    && matches!(state, "resyncing" | "stale"))
                                .then_some("cancelled"),
                            }
                        })
                        .collect(),
                    split_brain: split_affected(v.uuid),
                    clients: None,
                    waiting_on: Vec::new(),
                    scrub: None,
                    copy: None,
                    written: self.written_bytes(v),
                }
            })
            .collect();
        let split_brain = self
            .split
            .iter()
            .flat_map(|s| {
                s.sides.iter().enumerate().map(|(i, side)| SplitSideStatus {
                    disks: side.paths.clone(),
                    seqno: side.seqno,
                    volumes: s
                        .volumes
                        .iter()
                        .map(|v| {
                            let c = &v.changes[i];
                            let known = c.unknown.is_none();
                            SplitVolumeStatus {
                                name: v.name.clone(),
                                regions: known.then_some(c.regions),
                                bytes: known.then_some(c.bytes),
                                unknown: c.unknown.clone(),
                            }
                        })
                        .collect(),
                })
            })
            .collect();
        StatusReport {
            group: GroupStatus {
                name: self.config.name.clone(),
                uuid: self.config.uuid,
                seqno: self.config.seqno,
                generation: self
                    .keeper
                    .as_ref()
                    .map(|k| k.current().counter)
                    .or_else(|| self.assembled_generation().map(|g| g.counter))
                    .filter(|g| *g > 0),
                held_by: self.held_by(),
                holder_progress: None,
            },
            disks,
            volumes,
            split_brain,
            unreadable: self.unreadable.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::state::Activity;

    #[test]
    fn a_holder_late_to_renew_shows_where_it_was_without_a_rate() {
        let a = Activity {
            what: "resync data onto c.img".into(),
            done: 12 << 20,
            total: 256 << 20,
            rate: 14 << 20,
        };
        let live = HolderProgress::of(&a, None);
        assert_eq!(live.rate, 14 << 20);
        assert_eq!(live.eta_seconds, Some(18));
        assert_eq!(live.percent, 4.6);
        let late = HolderProgress::of(&a, Some(42));
        assert_eq!((late.rate, late.eta_seconds), (0, None));
        assert_eq!(late.not_renewed_for, Some(42));
        assert_eq!(late.done, 12 << 20);
    }
}
