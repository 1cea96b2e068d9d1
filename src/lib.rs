//! mirrorvol: mirrored volumes (RAID-1) in user space.
//!
//! The layers, from the bottom up (each depends only on those below it):
//!
//! - [`disk`]: the [`disk::Disk`] trait and its backends (files, block devices,
//!   memory, fault injection).
//! - [`format`](mod@format): partition tables, labels, config slots: encode and decode.
//! - [`volume`]: the mirror I/O engine: fan-out writes, reads with fallback, copy.
//! - [`group`]: the group config, extent allocation and the operations on it.
//! - [`nbd`]: the NBD protocol codec and server (knows nothing of mirrors).
//! - [`daemon`]: `serve`: a group in service, exported over NBD.
//! - [`cli`]: argument parsing, text and JSON output, progress bars, the demo.

pub mod cli;
pub mod daemon;
pub mod disk;
pub mod error;
pub mod format;
pub mod group;
pub mod nbd;
pub mod volume;

pub use error::{Error, Result};

/// One mebibyte: plexes and data areas are allocated in whole MiB.
pub const MIB: u64 = 1024 * 1024;

/// Crashes the process on the spot, as a power cut would: the fault points
/// of `tests/failpoints.rs` use it (`FAILPOINTS="NAME=return"`).
#[cfg(feature = "failpoints")]
pub fn crash_here(point: &str) -> ! {
    eprintln!("fault point {point}: crashing");
    std::process::abort()
}

/// A named fault point: with the `failpoints` feature and the point set
/// (`FAILPOINTS="NAME=return"` for `serve`), the process crashes there;
/// without the feature it is nothing at all.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| { $crate::crash_here($name) });
    };
}
