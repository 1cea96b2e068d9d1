//! Disks: the small positional storage trait every layer above uses, and its
//! backends.
//!
//! The trait is `&self` and positional so that one disk can serve many
//! threads, and so that wrappers (fault injection, crash images) are a page
//! each. Backends:
//!
//! - [`file::FileDisk`]: regular files and block devices (loop devices too).
//! - [`memory::MemDisk`]: a byte vector, for unit tests.
//! - [`faulty::FaultyDisk`]: wraps another disk and fails on cue; disks that
//!   share a [`faulty::Controller`] fail together.
//! - [`cursor::DiskCursor`]: `Read + Write + Seek` over a disk, for crates
//!   (gptman, mbrman) that want a stream.

use std::fmt;
use std::io;
use std::sync::Arc;

pub mod buf;
pub mod cursor;
pub mod faulty;
pub mod file;
pub mod memory;
pub mod nbd;

pub use buf::AlignedBuf;
pub use cursor::DiskCursor;
pub use faulty::{Controller, FaultyDisk, Op};
pub use file::{FileDisk, OpenOptions};
pub use memory::MemDisk;

/// What a disk can tell about itself; every field is a hint and may be absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskIdentity {
    /// The I/O path the disk sits behind (for block devices, from sysfs; for
    /// files, the device of the filesystem that holds them).
    pub controller: Option<String>,
    /// True for spinning disks.
    pub rotational: Option<bool>,
    /// Vendor and model, for the "same size and model" advice of the seed.
    pub model: Option<String>,
}

/// A disk: a fixed-size array of bytes addressed by offset.
///
/// Reads and writes must cover the whole buffer or fail; short transfers are
/// retried inside the backend. Offsets and lengths handed down by the layers
/// above are multiples of [`Disk::sector_size`].
pub trait Disk: Send + Sync + fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Logical sector size in bytes (512 or 4096).
    fn sector_size(&self) -> u32 {
        512
    }

    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Fills `buf` from `offset` with what the storage holds now, not a
    /// copy this host cached: another host (or another path to the same
    /// storage) may have written it since. Used for the group's claim.
    fn read_fresh(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Writes each `(offset, bytes)` in order and, when `flush`, makes
    /// them durable before it returns (other writes need not be): metadata
    /// that goes out together (a bitmap's blocks and header) is one
    /// request to a queued disk, not one hand-off per block.
    fn write_all_then_flush(&self, writes: &[(u64, &[u8])], flush: bool) -> io::Result<()> {
        for (offset, data) in writes {
            self.write_at(data, *offset)?;
        }
        if flush { self.flush() } else { Ok(()) }
    }

    /// Makes the range read back as zeroes, the cheap way where the backend
    /// can (punching holes in files, BLKZEROOUT on devices).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Tells the disk the range is unused. Contents afterwards are unspecified.
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Makes the range read back as zeroes and keeps it allocated (NBD's
    /// `NO_HOLE`: later writes there cannot run out of space). Backends
    /// without holes do what [`Disk::write_zeroes`] does.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }

    /// Whether [`Disk::write_zeroes`] (`keep`: [`Disk::zero_range`]) costs
    /// less than writing zeroes, whatever the range: NBD's `FAST_ZERO`.
    fn zeroes_cheaply(&self, _keep: bool) -> bool {
        false
    }

    /// Where data lies: whether byte `offset` holds data (true) or lies in
    /// a hole that reads as zeroes (false), and for how many bytes from
    /// `offset` (1 to `len`) that stays so. A backend that cannot tell
    /// says data.
    fn extent_at(&self, _offset: u64, len: u64) -> io::Result<(bool, u64)> {
        Ok((true, len))
    }

    /// The range will be read soon: a backend with a cache may start
    /// reading it in. A hint; nothing by default.
    fn will_need(&self, _offset: u64, _len: u64) {}

    /// Identity hints: controller, rotational, model.
    fn identity(&self) -> DiskIdentity {
        DiskIdentity::default()
    }

    /// The file or device under this disk, when it is one with nothing in
    /// between (no fault injection, no instrumentation): an io_uring
    /// backend drives its descriptor directly.
    fn as_file_disk(&self) -> Option<&FileDisk> {
        None
    }

    /// Whether the disk is still the one opened: an error when it is gone
    /// (a file deleted, or shrunk under the size it had). Cheap (a stat);
    /// a running group asks every second, and before a repair writes.
    fn health(&self) -> io::Result<()> {
        Ok(())
    }

    /// A disk reached over connections that broke (an NBD export):
    /// connects again and, once `check` accepted what the new connections
    /// read, serves requests on them. `None`: this disk has no connection
    /// to make again.
    fn reconnect(&self, _check: &dyn Fn(&dyn Disk) -> io::Result<()>) -> Option<io::Result<()>> {
        None
    }

    /// The disk's deadline changed (`set-disk --io-timeout`): a backend
    /// with deadlines of its own (an NBD export's connections) follows.
    fn set_timeout(&self, _timeout: std::time::Duration) {}

    /// The NBD export this disk is, with nothing wrapped around it: its
    /// queue sends data requests on its connections without a worker
    /// waiting for each answer.
    fn as_nbd_disk(&self) -> Option<&nbd::NbdDisk> {
        None
    }
}

impl<D: Disk + ?Sized> Disk for Arc<D> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn read_fresh(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_fresh(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn write_all_then_flush(&self, writes: &[(u64, &[u8])], flush: bool) -> io::Result<()> {
        (**self).write_all_then_flush(writes, flush)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).zero_range(offset, len)
    }
    fn zeroes_cheaply(&self, keep: bool) -> bool {
        (**self).zeroes_cheaply(keep)
    }
    fn extent_at(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        (**self).extent_at(offset, len)
    }
    fn will_need(&self, offset: u64, len: u64) {
        (**self).will_need(offset, len)
    }
    fn identity(&self) -> DiskIdentity {
        (**self).identity()
    }
    fn as_file_disk(&self) -> Option<&FileDisk> {
        (**self).as_file_disk()
    }
    fn health(&self) -> io::Result<()> {
        (**self).health()
    }
    fn reconnect(&self, check: &dyn Fn(&dyn Disk) -> io::Result<()>) -> Option<io::Result<()>> {
        (**self).reconnect(check)
    }
    fn set_timeout(&self, timeout: std::time::Duration) {
        (**self).set_timeout(timeout)
    }
    fn as_nbd_disk(&self) -> Option<&nbd::NbdDisk> {
        (**self).as_nbd_disk()
    }
}

/// The error a backend returns for an access past the end of the disk.
pub fn out_of_range(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "access of {len} bytes at offset {offset} is past the end of the disk ({size} bytes)"
        ),
    )
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(out_of_range(offset, len, size)),
    }
}

/// The errno of the disk's own error underneath `e`, however deeply it is
/// wrapped.
pub fn os_error(e: &io::Error) -> Option<i32> {
    if let Some(n) = e.raw_os_error() {
        return Some(n);
    }
    let mut next: Option<&(dyn std::error::Error + 'static)> = e
        .get_ref()
        .map(|inner| inner as &(dyn std::error::Error + 'static));
    while let Some(err) = next {
        if let Some(n) = err
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(n);
        }
        next = err.source();
    }
    None
}
