//! The mirror I/O engine: a volume's plexes, fan-out writes, reads with
//! fallback and repair ([`engine`]), per-disk queues with a hang watchdog
//! ([`queue`]), the range lock that orders overlapping writes
//! ([`range_lock`]), copying a volume onto a plex (resync), and comparing
//! and repairing the plexes ([`scrub`]).
//!
//! The engine owns no config. It reports what the config must record through
//! [`engine::FailureSink`]; the group layer records it on the surviving
//! disks before the I/O that saw the failure is acknowledged.

use std::io;
use std::sync::Arc;

use crate::disk::{AlignedBuf, Disk};

pub mod bitmap;
pub mod engine;
pub mod queue;
pub mod range_lock;
pub mod scrub;

use engine::MirrorVolume;

/// Bytes moved per step by [`copy_to_plex`] and by volume copies.
pub const COPY_CHUNK: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading the volume failed at offset {offset}: {error}")]
    Source { offset: u64, error: io::Error },
    #[error("writing the new plex failed at volume offset {offset}: {error}")]
    Target { offset: u64, error: io::Error },
}

/// Copies the whole volume onto a plex at `target_offset` of `target`,
/// reading through the engine, so that a read error on one source plex falls
/// back to another and is repaired there. The target must read as zeroes
/// beforehand: chunks that are all zero are not written, so a volume that
/// holds little data copies quickly. `progress` gets the bytes done so far.
/// Returns the bytes written to the target.
pub fn copy_to_plex(
    volume: &Arc<MirrorVolume>,
    target: &dyn Disk,
    target_offset: u64,
    progress: &dyn Fn(u64),
) -> Result<u64, CopyError> {
    let mut buf = AlignedBuf::new(COPY_CHUNK, crate::disk::buf::IO_ALIGN);
    let mut written = 0u64;
    let mut pos = 0u64;
    while pos < volume.size {
        let n = (volume.size - pos).min(COPY_CHUNK as u64) as usize;
        let chunk = &mut buf[..n];
        volume
            .read(pos, chunk)
            .map_err(|error| CopyError::Source { offset: pos, error })?;
        if chunk.iter().any(|&b| b != 0) {
            target
                .write_at(chunk, target_offset + pos)
                .map_err(|error| CopyError::Target { offset: pos, error })?;
            written += n as u64;
        }
        pos += n as u64;
        progress(pos);
    }
    target
        .flush()
        .map_err(|error| CopyError::Target { offset: pos, error })?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;
    use crate::volume::engine::{EngineOptions, EnginePlex, FailureSink, Mode, NoSink};
    use crate::volume::queue::DiskQueue;
    use uuid::Uuid;

    #[test]
    fn copy_skips_zero_chunks_and_copies_the_rest() {
        let a: Arc<dyn Disk> = Arc::new(MemDisk::new(16 << 20));
        let t = MemDisk::new(16 << 20);
        let sink: Arc<dyn FailureSink> = Arc::new(NoSink);
        let q = DiskQueue::start("a", a, 2);
        let v = MirrorVolume::new(
            "v",
            12 << 20,
            vec![EnginePlex::new(Uuid::new_v4(), q, 0, Mode::InSync)],
            Arc::downgrade(&sink),
            EngineOptions::default(),
        );
        v.write((5 << 20) + 4096, &[9u8; 4096]).unwrap();
        let written = copy_to_plex(&v, &t, 1 << 20, &|_| {}).unwrap();
        assert_eq!(written, COPY_CHUNK as u64);
        let mut got = vec![0; 4096];
        t.read_at(&mut got, (6 << 20) + 4096).unwrap();
        assert_eq!(got, vec![9u8; 4096]);
    }
}
