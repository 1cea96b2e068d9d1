//! The on-disk format: partition tables, labels, config slots.
//!
//! This module encodes and decodes; it makes no decisions about mirrors. The
//! functions in [`ondisk`] read and write metadata on one disk, and leave it
//! to the group layer to decide which copy of the config is current.

pub mod bitmap;
pub mod checksum;
pub mod config;
pub mod label;
pub mod layout;
pub mod ondisk;
pub mod partition;
pub mod probe;
pub mod slot;
pub mod state;
pub mod written;

pub use config::{DiskEntry, DiskState, GroupConfig, PlexEntry, PlexState, VolumeEntry};
pub use label::Label;
pub use layout::Layout;
pub use partition::Style;

/// The format version written by this build. Every format change bumps it,
/// and `tests/data` keeps an image of each released version.
///
/// - 1: labels, config slots A and B, a reserved (zeroed) bitmap area.
/// - 2: the bitmap area holds the write-intent bitmap ([`bitmap`]). A
///   format-1 disk is opened as it is and raised to 2 just before its
///   bitmap is first written, so that a format-1 mirrorvol refuses it
///   ("label format version 2 is newer ...") rather than ignore the bits.
///
/// - 3: the area between the label and config slot A holds the claim
///   block and two generation slots ([`state`]), and the bitmap header
///   records nothing new. A format-1 or 2 disk opens as it is (no claim,
///   no generation: reported as absent) and is raised to 3 just before
///   anything of format 3 is first written to it: the claim of the first
///   command that writes, or the first bitmap or generation write.
///
/// - 4: the written map ([`written`]) between the state blocks and config
///   slot A, from 64 KiB (zero before). A disk of version 3 or older opens
///   as it is, without a written map (every region counts as written), and
///   is raised to 4 with its first bitmap write, so that an older build,
///   which would write without setting the map's bits, refuses it.
///
/// - 5: the checksum area holds block checksums ([`checksum`]), kept
///   consistent with the data by the write-intent bitmap. A disk of
///   version 4 or older opens with every checksum unknown; its checksum
///   area is zeroed and it is raised to 5 with its first bitmap write, so
///   that an older build, which would write data without its checksums,
///   refuses it. `scrub --repair` hashes what was written before.
///
/// Not bumped for the hot-spare mark (`DiskEntry::spare`): it is written
/// only when true, so a group without spares keeps its exact config text,
/// and an older build that meets it ignores it (serde keeps unknown fields
/// out) and sees an ordinary empty disk: it may place a plex there and
/// drops the mark at its next commit, but loses no data. Refusing the whole
/// group to older builds for that would cost more than it saves.
pub const FORMAT_VERSION: u32 = 5;

#[cfg(test)]
mod test_tools;
