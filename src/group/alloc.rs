//! Extent allocation: plexes are contiguous extents of whole MiB inside a
//! disk's data area. Free space is whatever no plex (of any state) covers.

use uuid::Uuid;

use crate::MIB;
use crate::format::GroupConfig;

/// The length of the extent that holds a volume of `size` bytes.
pub fn extent_len(size: u64) -> u64 {
    size.div_ceil(MIB) * MIB
}

/// The used extents of one disk, sorted by offset: (offset, length).
pub fn used_extents(config: &GroupConfig, disk: Uuid) -> Vec<(u64, u64)> {
    let mut used: Vec<(u64, u64)> = config
        .volumes
        .iter()
        .flat_map(|v| v.plexes.iter())
        .filter(|p| p.disk == disk)
        .map(|p| (p.offset, p.length))
        .collect();
    used.sort();
    used
}

/// The free extents of one disk, sorted by offset: (offset, length).
pub fn free_extents(config: &GroupConfig, disk: Uuid) -> Vec<(u64, u64)> {
    let Some(entry) = config.disk(disk) else {
        return Vec::new();
    };
    let mut free = Vec::new();
    let mut pos = 0;
    for (off, len) in used_extents(config, disk) {
        if off > pos {
            free.push((pos, off - pos));
        }
        pos = pos.max(off + len);
    }
    if entry.data_size > pos {
        free.push((pos, entry.data_size - pos));
    }
    free
}

/// Free bytes on a disk.
pub fn free_bytes(config: &GroupConfig, disk: Uuid) -> u64 {
    free_extents(config, disk).iter().map(|(_, l)| l).sum()
}

/// The largest free extent of a disk.
pub fn largest_free(config: &GroupConfig, disk: Uuid) -> u64 {
    free_extents(config, disk)
        .iter()
        .map(|(_, l)| *l)
        .max()
        .unwrap_or(0)
}

/// First fit: the offset of the first free extent of at least `len` bytes.
pub fn first_fit(config: &GroupConfig, disk: Uuid, len: u64) -> Option<u64> {
    free_extents(config, disk)
        .into_iter()
        .find(|(_, l)| *l >= len)
        .map(|(o, _)| o)
}

/// The free bytes that directly follow the extent at `offset` on `disk`.
pub fn free_after(config: &GroupConfig, disk: Uuid, offset: u64, len: u64) -> u64 {
    free_extents(config, disk)
        .iter()
        .find(|(o, _)| *o == offset + len)
        .map(|(_, l)| *l)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{DiskEntry, DiskState, PlexEntry, PlexState, Style, VolumeEntry};

    fn config(data_mib: u64, plexes: &[(u64, u64)]) -> (GroupConfig, Uuid) {
        let disk = Uuid::new_v4();
        let volumes = plexes
            .iter()
            .enumerate()
            .map(|(i, (o, l))| VolumeEntry {
                name: format!("v{i}"),
                uuid: Uuid::new_v4(),
                size: l * MIB,
                plexes: vec![PlexEntry {
                    disk,
                    offset: o * MIB,
                    length: l * MIB,
                    state: PlexState::InSync,
                    resync_reason: None,
                    resync_offset: 0,
                    resync_cancelled: false,
                }],
            })
            .collect();
        let c = GroupConfig {
            name: "g".into(),
            uuid: Uuid::new_v4(),
            seqno: 1,
            disks: vec![DiskEntry {
                uuid: disk,
                path: "d".into(),
                controller: "c".into(),
                style: Style::Raw,
                size: 0,
                data_size: data_mib * MIB,
                model: None,
                state: DiskState::Online,
                state_seqno: 0,
                spare: false,
                left_generation: 0,
                replaced_by: None,
                write_mostly: false,
                write_behind: 0,
                link_lost: false,
                timeout_ms: 0,
            }],
            volumes,
            region_size: 0,
            removed: Vec::new(),
            history: Vec::new(),
        };
        (c, disk)
    }

    #[test]
    fn extents_round_up_to_whole_mib() {
        assert_eq!(extent_len(1), MIB);
        assert_eq!(extent_len(MIB), MIB);
        assert_eq!(extent_len(MIB + 512), 2 * MIB);
    }

    #[test]
    fn free_space_is_the_gaps_between_plexes() {
        let (c, d) = config(100, &[(10, 5), (40, 10)]);
        assert_eq!(
            free_extents(&c, d),
            vec![(0, 10 * MIB), (15 * MIB, 25 * MIB), (50 * MIB, 50 * MIB)]
        );
        assert_eq!(free_bytes(&c, d), 85 * MIB);
        assert_eq!(first_fit(&c, d, 20 * MIB), Some(15 * MIB));
        assert_eq!(first_fit(&c, d, 60 * MIB), None);
        assert_eq!(largest_free(&c, d), 50 * MIB);
        assert_eq!(free_after(&c, d, 10 * MIB, 5 * MIB), 25 * MIB);
        assert_eq!(free_after(&c, d, 40 * MIB, 10 * MIB), 50 * MIB);
    }

    #[test]
    fn a_full_disk_has_no_free_extent() {
        let (c, d) = config(10, &[(0, 10)]);
        assert!(free_extents(&c, d).is_empty());
        assert_eq!(free_after(&c, d, 0, 10 * MIB), 0);
    }
}
