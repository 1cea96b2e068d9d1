//! The mirror I/O engine: a volume's plexes, fan-out writes, reads with
//! fallback and repair ([`engine`]), per-disk queues with a hang watchdog
//! ([`queue`]), the range lock that orders overlapping writes
//! ([`range_lock`]), copying a volume onto a plex while it serves I/O
//! ([`resync`]), and comparing and repairing the plexes ([`scrub`]).
//!
//! The engine owns no config. It reports what the config must record through
//! [`engine::FailureSink`]; the group layer records it on the surviving
//! disks before the I/O that saw the failure is acknowledged.

pub mod bitmap;
pub mod engine;
pub mod error;
pub mod generation;
pub mod meter;
pub mod queue;
pub mod range_lock;
pub mod resync;
pub mod scrub;
pub mod sums;

/// Bytes moved per step by volume copies.
pub const COPY_CHUNK: usize = 4 << 20;
