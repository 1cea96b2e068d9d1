//! The group config: what disks the group has, and where each volume's plexes
//! live. It is stored as JSON text in the config slots of every disk, as LVM
//! stores its metadata as text: an admin can read it with `examine`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Style;

/// The whole group config. Every change raises `seqno` and is written to all
/// online disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConfig {
    pub name: String,
    pub uuid: Uuid,
    pub seqno: u64,
    pub disks: Vec<DiskEntry>,
    pub volumes: Vec<VolumeEntry>,
    /// Bytes of data area one write-intent bitmap bit covers (0: the
    /// default). A disk too large for it to fit uses the next power of two
    /// that does; its bitmap header records the size it uses.
    #[serde(default)]
    pub region_size: u64,
    /// Disks taken out of the group with `remove-disk`, oldest first (at
    /// most [`REMOVED_KEPT`]): one that comes back, its label unwiped, is
    /// not taken in again. Written only when there are some (older builds
    /// ignore the field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Uuid>,
    /// The commands that changed the config, oldest first (the last 200;
    /// see `group::history`). Written only when there are some.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
}

/// One recorded configuration change (`mirrorvol history`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unix seconds.
    pub time: u64,
    /// The config seqno the change was written with.
    pub seqno: u64,
    pub command: String,
    pub user: String,
    pub host: String,
}

/// Removed disks a config remembers.
pub const REMOVED_KEPT: usize = 256;

/// A disk's state as recorded in the config. `online-errors` and `offline`
/// are runtime states and are never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    Online,
    /// Marked failed by `fail` or by the I/O engine; `reactivate` brings it back.
    Failed,
    /// Absent when a config change was written; it has missed that change.
    Missing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub uuid: Uuid,
    /// Where the disk was last seen; assembly finds disks by label, not path.
    pub path: String,
    pub controller: String,
    pub style: Style,
    /// Size of the whole disk in bytes.
    pub size: u64,
    /// Size of the data area in bytes (whole MiB); plexes are carved from it.
    pub data_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub state: DiskState,
    /// The config seqno at which `state` last changed. A disk that is missing
    /// or failed since seqno `m` and comes back with a config of its own at
    /// seqno `m` or later has moved on without the group: split brain.
    #[serde(default)]
    pub state_seqno: u64,
    /// A hot spare: it holds no plex, automatic placement leaves it alone,
    /// and `repair` rebuilds a failed or missing plex onto it (as md turns a
    /// spare into an active member). It stops being a spare when a plex is
    /// placed on it. Written only when true, so a group without spares keeps
    /// the config text of older builds (which ignore the field).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spare: bool,
    /// While the disk is failed or missing: the data generation counter it
    /// held when it left (0: unknown, left before format 3). A disk that
    /// comes back with an older one was rolled back further than that, and
    /// the bitmaps cannot say what it lacks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub left_generation: u64,
    /// `replace PATH NEW`: the disk whose copies are being rebuilt onto the
    /// disk named here; it leaves the group once they are all in sync.
    /// Written only while set (older builds ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<Uuid>,
    /// Write-mostly (md's): its plexes take every write but serve reads
    /// only when no other in-sync plex can, for a slow or far disk.
    /// Written only when true (older builds ignore it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub write_mostly: bool,
    /// Write-behind (md's) on a write-mostly disk: up to this many writes
    /// to its plexes may be outstanding once the other plexes have them.
    /// 0: off. Written only when set.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub write_behind: u32,
    /// A disk reached over NBD that left service because its connection
    /// was lost (not an I/O error, not an admin): `serve` keeps trying to
    /// connect it again, also after a restart. Cleared once it is back in
    /// service. Written only while set (older builds ignore it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub link_lost: bool,
    /// The disk's own deadline in milliseconds (`set-disk --timeout`): how
    /// long a request to it may take before it is failed, in place of
    /// `--io-timeout` / `--remote-io-timeout`. 0: those. Written only when
    /// set (older builds ignore it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_ms: u64,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlexState {
    /// Holds every write the volume acknowledged.
    InSync,
    /// Missed writes; must be resynced before it serves reads.
    Stale,
    /// Being copied onto; holds valid data only below the resync position.
    Resyncing,
    /// Failed an I/O; holds nothing trustworthy until repaired or reactivated.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub name: String,
    pub uuid: Uuid,
    /// Size in bytes the users see.
    pub size: u64,
    pub plexes: Vec<PlexEntry>,
}

impl VolumeEntry {
    /// A volume with more than one plex is a mirror.
    pub fn is_mirror(&self) -> bool {
        self.plexes.len() > 1
    }
}

/// One complete copy of a volume: a contiguous extent of one disk's data area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlexEntry {
    pub disk: Uuid,
    /// Offset of the extent from the start of the disk's data area (whole MiB).
    pub offset: u64,
    /// Length of the extent (whole MiB, at least the volume's size).
    pub length: u64,
    pub state: PlexState,
    /// Why this plex needs (or is getting) a full resync rather than a copy
    /// of the regions its twins' bitmaps name: it failed an I/O, it is new,
    /// or the bitmaps cannot vouch for the time it was away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_reason: Option<String>,
    /// While the plex is resyncing in full: the resync's checkpoint. Below
    /// it the plex holds the volume, except the regions the write-intent
    /// bitmaps of its in-sync twins name (their bits stay set while it is
    /// out of sync); a restart resumes the copy here.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resync_offset: u64,
    /// An admin cancelled the plex's resync (`resync NAME --cancel`): it
    /// stays out of sync, is never read, and no resync starts onto it until
    /// `resync NAME --resume`. Written only when true (older builds ignore
    /// it, and would resync the plex).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resync_cancelled: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl GroupConfig {
    pub fn to_text(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("config serializes");
        s.push('\n');
        s
    }

    pub fn from_text(text: &[u8]) -> Result<GroupConfig, serde_json::Error> {
        serde_json::from_slice(text)
    }

    pub fn disk(&self, uuid: Uuid) -> Option<&DiskEntry> {
        self.disks.iter().find(|d| d.uuid == uuid)
    }

    pub fn disk_mut(&mut self, uuid: Uuid) -> Option<&mut DiskEntry> {
        self.disks.iter_mut().find(|d| d.uuid == uuid)
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| v.name == name)
    }

    pub fn volume_mut(&mut self, name: &str) -> Option<&mut VolumeEntry> {
        self.volumes.iter_mut().find(|v| v.name == name)
    }

    /// Keeps the rule that a spare holds no plex: a spare that received one
    /// has become an active member. Returns the disks that stopped being
    /// spares.
    pub fn retire_used_spares(&mut self) -> Vec<Uuid> {
        let holding: Vec<Uuid> = self
            .volumes
            .iter()
            .flat_map(|v| v.plexes.iter().map(|p| p.disk))
            .collect();
        let mut retired = Vec::new();
        for d in &mut self.disks {
            if d.spare && holding.contains(&d.uuid) {
                d.spare = false;
                retired.push(d.uuid);
            }
        }
        retired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(spare: bool) -> DiskEntry {
        DiskEntry {
            uuid: Uuid::nil(),
            path: "/d".into(),
            controller: "c0".into(),
            style: Style::Raw,
            size: 1 << 30,
            data_size: 1 << 29,
            model: None,
            state: DiskState::Online,
            state_seqno: 1,
            spare,
            left_generation: 0,
            replaced_by: None,
            write_mostly: false,
            write_behind: 0,
            link_lost: false,
            timeout_ms: 0,
        }
    }

    #[test]
    fn spare_is_written_only_when_set_and_defaults_to_false() {
        let plain = serde_json::to_string(&disk(false)).unwrap();
        assert!(!plain.contains("spare"), "{plain}");
        // Text of a build that knew no spares.
        assert_eq!(
            serde_json::from_str::<DiskEntry>(&plain).unwrap(),
            disk(false)
        );
        let spare = serde_json::to_string(&disk(true)).unwrap();
        assert!(spare.contains("\"spare\":true"), "{spare}");
        assert_eq!(
            serde_json::from_str::<DiskEntry>(&spare).unwrap(),
            disk(true)
        );
    }

    #[test]
    fn a_spare_that_received_a_plex_is_retired() {
        let mut c = GroupConfig {
            name: "g".into(),
            uuid: Uuid::nil(),
            seqno: 1,
            disks: vec![disk(true)],
            volumes: Vec::new(),
            region_size: 0,
            removed: Vec::new(),
            history: Vec::new(),
        };
        assert!(c.retire_used_spares().is_empty());
        assert!(c.disks[0].spare);
        c.volumes.push(VolumeEntry {
            name: "v".into(),
            uuid: Uuid::new_v4(),
            size: 1 << 20,
            plexes: vec![PlexEntry {
                disk: Uuid::nil(),
                offset: 0,
                length: 1 << 20,
                state: PlexState::Resyncing,
                resync_reason: None,
                resync_offset: 0,
                resync_cancelled: false,
            }],
        });
        assert_eq!(c.retire_used_spares(), vec![Uuid::nil()]);
        assert!(!c.disks[0].spare);
    }
}
