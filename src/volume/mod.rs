//! The mirror I/O engine: one volume's plexes, fan-out writes, reads with
//! fallback, and copying a volume onto a plex (resync).
//!
//! The engine owns no config. It reports which plexes failed an I/O; the group
//! layer records that in the config on the surviving disks before the caller's
//! operation is acknowledged.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use uuid::Uuid;

use crate::disk::Disk;

pub mod engine;
pub mod queue;
pub mod range_lock;

/// Bytes moved per step by [`copy_to_plex`] and by volume copies.
pub const COPY_CHUNK: usize = 4 << 20;

/// One plex as the engine sees it: a disk and the absolute offset of the
/// volume's first byte on it.
#[derive(Debug, Clone)]
pub struct PlexIo {
    pub disk_uuid: Uuid,
    pub disk: Arc<dyn Disk>,
    pub offset: u64,
    /// In sync and on an online disk: may serve reads.
    pub readable: bool,
    /// Must receive every write (in sync, or being resynced).
    pub writable: bool,
}

/// A plex's failed I/O: the plex's index in [`Volume::plexes`] and the error.
#[derive(Debug)]
pub struct PlexError {
    pub plex: usize,
    pub error: io::Error,
    /// A read error whose range was rewritten from a good copy and now holds
    /// the right data; the plex stays in service.
    pub repaired: bool,
}

/// What a read or write did besides succeeding: the plexes that failed.
#[derive(Debug, Default)]
pub struct IoReport {
    pub failed: Vec<PlexError>,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume} has no in-sync plex to read from")]
    NoReadablePlex { volume: String },
    #[error("volume {volume} has no plex to write to")]
    NoWritablePlex { volume: String },
    #[error("{len} bytes at offset {offset} lie past the end of volume {volume} ({size} bytes)")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("every plex of volume {volume} failed the {op} at offset {offset}: {error}")]
    AllPlexesFailed {
        volume: String,
        op: &'static str,
        offset: u64,
        error: io::Error,
    },
}

impl From<VolumeError> for crate::Error {
    /// A request the volume cannot serve in its state is refused; an I/O
    /// failure of every plex is a failure.
    fn from(e: VolumeError) -> crate::Error {
        match e {
            VolumeError::AllPlexesFailed { .. } => crate::Error::failed(e.to_string()),
            _ => crate::Error::refused(e.to_string()),
        }
    }
}

/// A volume's data path.
#[derive(Debug)]
pub struct Volume {
    pub name: String,
    pub size: u64,
    pub plexes: Vec<PlexIo>,
    next_read: AtomicUsize,
}

impl Volume {
    pub fn new(name: &str, size: u64, plexes: Vec<PlexIo>) -> Volume {
        Volume {
            name: name.to_string(),
            size,
            plexes,
            next_read: AtomicUsize::new(0),
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), VolumeError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                volume: self.name.clone(),
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Reads from one readable plex; on an error, from the next. The range
    /// that failed is rewritten on the failing plex from the good copy (a
    /// disk remaps a bad sector on write); a plex whose rewrite fails too is
    /// reported.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<IoReport, VolumeError> {
        self.check(offset, buf.len())?;
        let readable: Vec<usize> = (0..self.plexes.len())
            .filter(|&i| self.plexes[i].readable)
            .collect();
        if readable.is_empty() {
            return Err(VolumeError::NoReadablePlex {
                volume: self.name.clone(),
            });
        }
        let start = self.next_read.load(Ordering::Relaxed) % readable.len();
        let mut report = IoReport::default();
        let mut bad: Vec<(usize, io::Error)> = Vec::new();
        for k in 0..readable.len() {
            let i = readable[(start + k) % readable.len()];
            let plex = &self.plexes[i];
            match plex.disk.read_at(buf, plex.offset + offset) {
                Ok(()) => {
                    // Later reads start from the plex that answered, so a
                    // sequential stream stays on one plex.
                    self.next_read
                        .store((start + k) % readable.len(), Ordering::Relaxed);
                    for (j, error) in bad {
                        let p = &self.plexes[j];
                        match p.disk.write_at(buf, p.offset + offset) {
                            Ok(()) => report.failed.push(PlexError {
                                plex: j,
                                error,
                                repaired: true,
                            }),
                            Err(e) => report.failed.push(PlexError {
                                plex: j,
                                error: e,
                                repaired: false,
                            }),
                        }
                    }
                    return Ok(report);
                }
                Err(e) => bad.push((i, e)),
            }
        }
        let (_, error) = bad.pop().expect("at least one plex was tried");
        Err(VolumeError::AllPlexesFailed {
            volume: self.name.clone(),
            op: "read",
            offset,
            error,
        })
    }

    /// Writes to every writable plex in parallel. Succeeds when at least one
    /// readable (in-sync) plex took the write; the plexes that failed are
    /// reported so the caller can fail them before acknowledging.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<IoReport, VolumeError> {
        self.check(offset, buf.len())?;
        let targets: Vec<usize> = (0..self.plexes.len())
            .filter(|&i| self.plexes[i].writable)
            .collect();
        if targets.is_empty() {
            return Err(VolumeError::NoWritablePlex {
                volume: self.name.clone(),
            });
        }
        let results = self.fan_out(&targets, |p| p.disk.write_at(buf, p.offset + offset));
        self.settle(results, "write", offset)
    }

    /// Flushes every writable plex.
    pub fn flush(&self) -> Result<IoReport, VolumeError> {
        let targets: Vec<usize> = (0..self.plexes.len())
            .filter(|&i| self.plexes[i].writable)
            .collect();
        let results = self.fan_out(&targets, |p| p.disk.flush());
        self.settle(results, "flush", 0)
    }

    /// Zeroes a range on every writable plex (cheaply where the disk can).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<IoReport, VolumeError> {
        self.check(offset, 0)?;
        if offset + len > self.size {
            return Err(VolumeError::OutOfRange {
                volume: self.name.clone(),
                offset,
                len: len as usize,
                size: self.size,
            });
        }
        let targets: Vec<usize> = (0..self.plexes.len())
            .filter(|&i| self.plexes[i].writable)
            .collect();
        let results = self.fan_out(&targets, |p| p.disk.write_zeroes(p.offset + offset, len));
        self.settle(results, "write-zeroes", offset)
    }

    /// Runs `op` on each target plex, in parallel when there is more than one.
    fn fan_out<F>(&self, targets: &[usize], op: F) -> Vec<(usize, io::Result<()>)>
    where
        F: Fn(&PlexIo) -> io::Result<()> + Sync,
    {
        if targets.len() == 1 {
            let i = targets[0];
            return vec![(i, op(&self.plexes[i]))];
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = targets
                .iter()
                .map(|&i| {
                    let op = &op;
                    let plex = &self.plexes[i];
                    (i, s.spawn(move || op(plex)))
                })
                .collect();
            handles
                .into_iter()
                .map(|(i, h)| {
                    let r = h
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("plex I/O thread panicked")));
                    (i, r)
                })
                .collect()
        })
    }

    fn settle(
        &self,
        results: Vec<(usize, io::Result<()>)>,
        op: &'static str,
        offset: u64,
    ) -> Result<IoReport, VolumeError> {
        let survived = results
            .iter()
            .any(|(i, r)| r.is_ok() && self.plexes[*i].readable);
        let mut report = IoReport::default();
        for (plex, r) in results {
            if let Err(error) = r {
                report.failed.push(PlexError {
                    plex,
                    error,
                    repaired: false,
                });
            }
        }
        if !survived && !report.failed.is_empty() {
            let error = report.failed.pop().expect("non-empty").error;
            return Err(VolumeError::AllPlexesFailed {
                volume: self.name.clone(),
                op,
                offset,
                error,
            });
        }
        Ok(report)
    }
}

/// Copies the whole volume onto `target` (which must not be one of its
/// readable plexes), reading through the volume so a read error on one
/// source plex falls back to another. The target must read as zeroes
/// beforehand: chunks that are all zero are not written, so a volume that
/// holds little data copies quickly. `progress` gets the bytes done so far.
///
/// Returns the read report (source plexes that failed along the way) and the
/// number of bytes written to the target.
pub fn copy_to_plex(
    volume: &Volume,
    target: &PlexIo,
    progress: &dyn Fn(u64),
) -> Result<(IoReport, u64), CopyError> {
    let mut report = IoReport::default();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut written = 0u64;
    let mut pos = 0u64;
    while pos < volume.size {
        let n = (volume.size - pos).min(COPY_CHUNK as u64) as usize;
        let chunk = &mut buf[..n];
        let r = volume.read_at(chunk, pos).map_err(CopyError::Source)?;
        report.failed.extend(r.failed);
        if chunk.iter().any(|&b| b != 0) {
            target
                .disk
                .write_at(chunk, target.offset + pos)
                .map_err(|e| CopyError::Target {
                    offset: pos,
                    error: e,
                })?;
            written += n as u64;
        }
        pos += n as u64;
        progress(pos);
    }
    target.disk.flush().map_err(|e| CopyError::Target {
        offset: pos,
        error: e,
    })?;
    Ok((report, written))
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Source(VolumeError),
    #[error("writing the new plex failed at volume offset {offset}: {error}")]
    Target { offset: u64, error: io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{FaultyDisk, MemDisk};

    fn plex(disk: Arc<dyn Disk>, offset: u64) -> PlexIo {
        PlexIo {
            disk_uuid: Uuid::new_v4(),
            disk,
            offset,
            readable: true,
            writable: true,
        }
    }

    #[test]
    fn write_reaches_every_plex_at_its_offset() {
        let a: Arc<dyn Disk> = Arc::new(MemDisk::new(1 << 20));
        let b: Arc<dyn Disk> = Arc::new(MemDisk::new(1 << 20));
        let v = Volume::new(
            "v",
            4096 * 4,
            vec![plex(a.clone(), 0), plex(b.clone(), 8192)],
        );
        let data = vec![0x5a; 4096];
        let r = v.write_at(&data, 4096).unwrap();
        assert!(r.failed.is_empty());
        let mut got = vec![0; 4096];
        a.read_at(&mut got, 4096).unwrap();
        assert_eq!(got, data);
        b.read_at(&mut got, 8192 + 4096).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn read_error_is_served_by_other_plex_and_rewritten() {
        let a = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(1 << 20))));
        let b: Arc<dyn Disk> = Arc::new(MemDisk::new(1 << 20));
        let v = Volume::new("v", 65536, vec![plex(a.clone(), 0), plex(b.clone(), 0)]);
        v.write_at(&[7u8; 65536], 0).unwrap();
        a.fail_reads(0..4096);
        let mut got = vec![0; 65536];
        let r = v.read_at(&mut got, 0).unwrap();
        assert_eq!(got, vec![7u8; 65536]);
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].plex, 0);
    }

    #[test]
    fn write_failure_of_one_plex_is_reported_not_returned() {
        let a = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(1 << 20))));
        let b: Arc<dyn Disk> = Arc::new(MemDisk::new(1 << 20));
        let v = Volume::new("v", 65536, vec![plex(a.clone(), 0), plex(b.clone(), 0)]);
        a.fail_writes(0..65536);
        let r = v.write_at(&[1u8; 4096], 0).unwrap();
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].plex, 0);
    }

    #[test]
    fn write_failure_of_every_plex_goes_to_the_caller() {
        let a = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(1 << 20))));
        let b = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(1 << 20))));
        let v = Volume::new("v", 65536, vec![plex(a.clone(), 0), plex(b.clone(), 0)]);
        a.fail_writes(0..65536);
        b.fail_writes(0..65536);
        assert!(matches!(
            v.write_at(&[1u8; 4096], 0),
            Err(VolumeError::AllPlexesFailed { .. })
        ));
    }

    #[test]
    fn out_of_range_access_is_refused() {
        let a: Arc<dyn Disk> = Arc::new(MemDisk::new(1 << 20));
        let v = Volume::new("v", 8192, vec![plex(a, 0)]);
        let mut buf = vec![0; 4096];
        assert!(matches!(
            v.read_at(&mut buf, 8192),
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            v.write_at(&buf, u64::MAX - 10),
            Err(VolumeError::OutOfRange { .. })
        ));
    }

    #[test]
    fn copy_skips_zero_chunks_and_copies_the_rest() {
        let a: Arc<dyn Disk> = Arc::new(MemDisk::new(16 << 20));
        let t: Arc<dyn Disk> = Arc::new(MemDisk::new(16 << 20));
        let v = Volume::new("v", 12 << 20, vec![plex(a.clone(), 0)]);
        v.write_at(&[9u8; 4096], (5 << 20) + 4096).unwrap();
        let target = plex(t.clone(), 1 << 20);
        let (_, written) = copy_to_plex(&v, &target, &|_| {}).unwrap();
        assert_eq!(written, COPY_CHUNK as u64);
        let mut got = vec![0; 4096];
        t.read_at(&mut got, (6 << 20) + 4096).unwrap();
        assert_eq!(got, vec![9u8; 4096]);
    }
}
