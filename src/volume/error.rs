//! The I/O path's error: what failed (the operation, the volume, the disk,
//! the offset) with the disk's own error underneath, its errno kept.
//!
//! ```text
//!   io::Error (kind of the disk's error)
//!     └── IoFailure { op, volume, disk, offset, what }
//!           └── source: io::Error from the disk (raw errno: ENOSPC, EIO, ...)
//! ```
//!
//! The NBD server turns it into a wire errno in one place
//! (`nbd::proto::errno_of`), which finds the disk's errno by walking the
//! sources: a full disk reaches the client as ENOSPC, not EIO.

use std::fmt;
use std::io;

pub use crate::disk::os_error;

/// An I/O request of a volume that failed.
#[derive(Debug)]
pub struct IoFailure {
    /// `read`, `write`, `flush`, `write-zeroes`.
    pub op: &'static str,
    pub volume: String,
    /// The disk whose error this is, when one disk's.
    pub disk: Option<String>,
    pub offset: u64,
    /// How it failed, e.g. "failed on every plex".
    pub what: &'static str,
    pub source: io::Error,
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {} of volume {} {}",
            self.op, self.offset, self.volume, self.what
        )?;
        if let Some(d) = &self.disk {
            write!(f, " (last on disk {d})")?;
        }
        write!(f, ": {}", self.source)
    }
}

impl std::error::Error for IoFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl IoFailure {
    /// The failure as an `io::Error` of the disk error's kind.
    pub fn into_io(self) -> io::Error {
        io::Error::new(self.source.kind(), self)
    }
}

/// Whether an error says the whole disk is unusable, not one range of it:
/// it hangs, it is full or read-only, it is gone, or its file shrank. Such
/// a disk is failed as a whole (as md fails a member device), since every
/// plex on it meets the same error next.
pub fn disk_wide(e: &io::Error) -> bool {
    matches!(
        os_error(e),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::ENODEV | libc::ENXIO)
    ) || matches!(
        e.kind(),
        io::ErrorKind::TimedOut
            | io::ErrorKind::StorageFull
            | io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotFound
    ) || link_lost(e)
}

/// Whether an error says the connection to a disk was lost (cut, reset,
/// closed by the server, or no answer within the deadline) rather than
/// that the disk failed an I/O. For a remote disk this is its link, not
/// its media: what it held stays good, and what it missed while away is
/// named by the write-intent bitmaps.
pub fn link_lost(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::NotConnected
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NetworkDown
    ) || os_error(e) == Some(libc::ESHUTDOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_errno_survives_wrapping() {
        let e = IoFailure {
            op: "write",
            volume: "v".into(),
            disk: Some("a.img".into()),
            offset: 4096,
            what: "failed on every plex",
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        }
        .into_io();
        assert_eq!(os_error(&e), Some(libc::ENOSPC));
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert!(e.to_string().contains("write at offset 4096 of volume v"));
        assert!(disk_wide(&e));
        assert!(!disk_wide(&io::Error::from_raw_os_error(libc::EIO)));
        let cut = io::Error::new(io::ErrorKind::BrokenPipe, "the connection broke");
        assert!(disk_wide(&cut) && link_lost(&cut));
        assert!(link_lost(&io::Error::from(io::ErrorKind::TimedOut)));
        assert!(link_lost(&io::Error::from_raw_os_error(libc::ESHUTDOWN)));
        assert!(!link_lost(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(!link_lost(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert_eq!(os_error(&io::Error::other("plain")), None);
    }
}
