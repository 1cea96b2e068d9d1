//! Where everything lives inside a disk's member area.
//!
//! The member area is the mirrorvol partition (GPT or MBR style) or the whole
//! disk (raw style). Offsets below are from the start of the member area:
//!
//! ```text
//!  0 ─────────┬──────────────────────────────────────────────┐
//!             │ label (primary), 4 KiB                       │
//!  4 KiB ─────┼──────────────────────────────────────────────┤
//!             │ state blocks (format 3: claim, generations,  │
//!             │ see [`super::state`]); from 64 KiB the       │
//!             │ written map (format 4, [`super::written`])   │
//!  1 MiB ─────┼──────────────────────────────────────────────┤
//!             │ config slot A, 1 MiB                         │
//!  2 MiB ─────┼──────────────────────────────────────────────┤
//!             │ config slot B, 1 MiB                         │
//!  3 MiB ─────┼──────────────────────────────────────────────┤
//!             │ bitmap area, 5 MiB (write-intent bitmaps)    │
//!  8 MiB ─────┼──────────────────────────────────────────────┤
//!             │ data area, whole MiB: plexes are carved here │
//!  ... ───────┼──────────────────────────────────────────────┤
//!             │ checksum area, whole MiB: 4 bytes per 4 KiB  │
//!             │ block of the data area (block checksums)     │
//!  ... ───────┼──────────────────────────────────────────────┤
//!             │ tail, 1 MiB; its last 4 KiB hold the label   │
//!             │ copy                                         │
//!  end ───────┴──────────────────────────────────────────────┘
//! ```
//!
//! The end is the member size rounded down to whole MiB, so that the layout of
//! a member depends only on its size in MiB.

use crate::MIB;

pub const LABEL_SIZE: u64 = 4096;
pub const CONFIG_OFFSET: u64 = MIB;
pub const CONFIG_SLOT_SIZE: u64 = MIB;
pub const BITMAP_OFFSET: u64 = CONFIG_OFFSET + 2 * CONFIG_SLOT_SIZE;
pub const BITMAP_SIZE: u64 = 5 * MIB;
pub const DATA_OFFSET: u64 = BITMAP_OFFSET + BITMAP_SIZE;
pub const TAIL_SIZE: u64 = MIB;
/// Bytes of data covered by one 4-byte block checksum.
pub const CHECKSUM_BLOCK: u64 = 4096;
/// The smallest data area a disk may have.
pub const MIN_DATA_SIZE: u64 = 4 * MIB;

/// The absolute byte offsets (from the start of the disk) of every area of
/// one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub member_offset: u64,
    pub member_size: u64,
    pub data_size: u64,
    pub checksum_size: u64,
}

impl Layout {
    /// The layout of a member area of `member_size` bytes at `member_offset`,
    /// or `None` when it is too small to hold a useful data area.
    pub fn for_member(member_offset: u64, member_size: u64) -> Option<Layout> {
        let end = member_size / MIB * MIB;
        let room = end.checked_sub(DATA_OFFSET + TAIL_SIZE)?;
        // Largest data area whose checksum area still fits beside it.
        let mut data_size = (room / MIB * 1024 / 1025) * MIB;
        loop {
            let checksum_size = Self::checksum_size_for(data_size);
            if data_size + checksum_size <= room {
                break;
            }
            data_size -= MIB;
        }
        while data_size + MIB + Self::checksum_size_for(data_size + MIB) <= room {
            data_size += MIB;
        }
        if data_size < MIN_DATA_SIZE {
            return None;
        }
        Some(Layout {
            member_offset,
            member_size: end,
            data_size,
            checksum_size: Self::checksum_size_for(data_size),
        })
    }

    fn checksum_size_for(data_size: u64) -> u64 {
        (data_size / CHECKSUM_BLOCK * 4).div_ceil(MIB) * MIB
    }

    pub fn primary_label_offset(&self) -> u64 {
        self.member_offset
    }

    pub fn backup_label_offset(&self) -> u64 {
        self.member_offset + self.member_size - LABEL_SIZE
    }

    /// Offset of config slot 0 (A) or 1 (B).
    pub fn config_slot_offset(&self, slot: usize) -> u64 {
        self.member_offset + CONFIG_OFFSET + slot as u64 * CONFIG_SLOT_SIZE
    }

    pub fn bitmap_offset(&self) -> u64 {
        self.member_offset + BITMAP_OFFSET
    }

    /// Offset of the written map ([`super::written`]).
    pub fn written_offset(&self) -> u64 {
        self.member_offset + super::written::WRITTEN_OFFSET
    }

    pub fn data_offset(&self) -> u64 {
        self.member_offset + DATA_OFFSET
    }

    pub fn checksum_offset(&self) -> u64 {
        self.data_offset() + self.data_size
    }

    /// End of the member area (exclusive).
    pub fn end(&self) -> u64 {
        self.member_offset + self.member_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_are_ordered_aligned_and_inside_the_member() {
        for mib in [14u64, 16, 17, 64, 100, 1025, 4096, 1 << 20] {
            let l = Layout::for_member(MIB, mib * MIB + 12345).unwrap();
            assert_eq!(l.data_offset() % MIB, 0);
            assert_eq!(l.data_size % MIB, 0);
            assert!(l.checksum_size * (CHECKSUM_BLOCK / 4) >= l.data_size);
            assert!(l.checksum_offset() + l.checksum_size + TAIL_SIZE <= l.end());
            // No MiB is wasted beyond what the checksum area needs.
            assert!(l.checksum_offset() + l.checksum_size + TAIL_SIZE + 2 * MIB > l.end());
            assert_eq!(l.backup_label_offset() + LABEL_SIZE, l.end());
        }
    }

    #[test]
    fn too_small_members_have_no_layout() {
        assert!(Layout::for_member(0, 12 * MIB).is_none());
        assert!(Layout::for_member(0, 13 * MIB).is_none());
        assert!(Layout::for_member(0, 14 * MIB).is_some());
        assert!(Layout::for_member(0, 0).is_none());
    }
}
