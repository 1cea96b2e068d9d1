//! The on-disk format: partition tables, labels, config slots.
//!
//! This module encodes and decodes; it makes no decisions about mirrors. The
//! functions in [`ondisk`] read and write metadata on one disk, and leave it
//! to the group layer to decide which copy of the config is current.

pub mod bitmap;
pub mod config;
pub mod label;
pub mod layout;
pub mod ondisk;
pub mod partition;
pub mod probe;
pub mod slot;

pub use config::{DiskEntry, DiskState, GroupConfig, PlexEntry, PlexState, VolumeEntry};
pub use label::Label;
pub use layout::Layout;
pub use partition::Style;

/// The format version written by this build. Every format change bumps it,
/// and `tests/data` keeps an image of each released version.
pub const FORMAT_VERSION: u32 = 1;

#[cfg(test)]
mod test_tools;
