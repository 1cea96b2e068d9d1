//! Regular files and block devices (loop devices included) as [`Disk`]s.
//!
//! A [`FileDisk`] owns one open file descriptor and does positional I/O on it
//! (`pread`/`pwrite`). What differs between a file and a device is confined to
//! a few places:
//!
//! - size: `st_size` for a file, `BLKGETSIZE64` for a device;
//! - logical sector size: 512 for a file, `BLKSSZGET` for a device;
//! - zeroing: punching a hole in a file, `BLKZEROOUT` on a device, with a
//!   fallback to writing zero buffers where the cheap way is refused;
//! - identity: the filesystem's device for a file, sysfs for a device.
//!
//! With [`OpenOptions::direct`] the descriptor is opened `O_DIRECT`, which
//! wants buffers, offsets and lengths aligned; callers' buffers are arbitrary,
//! so every transfer is copied through an aligned bounce buffer, and a
//! transfer that is not aligned to the device's I/O granularity becomes a
//! read-modify-write of the covering aligned range (see [`FileDisk::write_at`]).

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::buf::AlignedBuf;
use super::{Disk, DiskIdentity, check_range, out_of_range};

/// How to open a [`FileDisk`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Bypass the page cache (`O_DIRECT`).
    pub direct: bool,
    /// Open for reading only; writes fail with `PermissionDenied`.
    pub read_only: bool,
    /// Take an exclusive `flock` for as long as the disk is open, so that two
    /// mirrorvol processes never drive the same member.
    pub lock: bool,
}

/// True when a transfer can go to `O_DIRECT` as it is, without a bounce
/// buffer: memory, offset and length all aligned.
fn direct_ready(ptr: *const u8, len: usize, offset: u64, align: u64) -> bool {
    let mem = FileDisk::bounce_align(align);
    (ptr as usize).is_multiple_of(mem)
        && (len as u64).is_multiple_of(align)
        && offset.is_multiple_of(align)
}

/// The largest bounce buffer one transfer uses; longer transfers are split.
const BOUNCE_MAX: u64 = 1024 * 1024;

/// The largest zero buffer the write-zeroes fallback writes at once.
const ZERO_CHUNK: u64 = 1024 * 1024;

/// The descriptor of a [`FileDisk`] and the rules a transfer on it must
/// keep to go to the kernel as it is: what an io_uring backend needs. The
/// descriptor stays open for as long as the `FileDisk` lives.
#[derive(Debug, Clone, Copy)]
pub struct RingTarget {
    pub fd: std::os::fd::RawFd,
    pub size: u64,
    pub writable: bool,
    /// `Some(granularity)` when opened `O_DIRECT`.
    pub direct_align: Option<u64>,
}

impl RingTarget {
    /// True when a transfer of `len` bytes at `offset` from `ptr` can go to
    /// the kernel as it is: inside the disk, and aligned where `O_DIRECT`
    /// wants it. Anything else takes [`FileDisk`]'s own path (bounce
    /// buffers, read-modify-write, its error messages).
    pub fn takes(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        len > 0
            && check_range(offset, len, self.size).is_ok()
            && self
                .direct_align
                .is_none_or(|align| direct_ready(ptr, len, offset, align))
    }
}

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    path: PathBuf,
    size: u64,
    sector_size: u32,
    block_device: bool,
    read_only: bool,
    /// `Some(granularity)` when opened `O_DIRECT`: offsets and lengths handed
    /// to the kernel are multiples of it.
    direct_align: Option<u32>,
    /// Serialises direct writes that need a read-modify-write against every
    /// other direct write of this disk: aligned writes share it, a
    /// read-modify-write takes it alone, so two writers of neighbouring
    /// sectors in one aligned block cannot undo each other.
    rmw: RwLock<()>,
    /// The filesystem refused to punch a hole once: zeroing writes zeroes
    /// here, which is no faster than writing.
    no_punch: AtomicBool,
    /// For a loop device: its backing file, held locked as well, so that
    /// a process opening the file and another opening the loop device over
    /// it cannot both drive the disk.
    _backing_lock: Option<File>,
}

impl FileDisk {
    /// Opens `path`, which must be a regular file or a block device.
    pub fn open(path: &Path, opts: OpenOptions) -> io::Result<FileDisk> {
        let mut oo = fs::OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path)?;
        let meta = file.metadata()?;
        let kind = meta.file_type();
        let block_device = kind.is_block_device();
        if !block_device && !kind.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        let mut backing_lock = None;
        if opts.lock {
            lock_exclusive(&file, path)?;
            if block_device && let Some(backing) = loop_backing_file(&meta) {
                let f = fs::OpenOptions::new().read(true).open(&backing)?;
                lock_exclusive(&f, &backing).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("{} (the file behind {})", e, path.display()),
                    )
                })?;
                backing_lock = Some(f);
            }
        }

        let (size, sector_size) = if block_device {
            (device_size(&file)?, device_sector_size(&file)?)
        } else {
            (meta.len(), 512)
        };

        let direct_align = if opts.direct {
            let align = if block_device {
                sector_size
            } else {
                file_direct_align(&file).unwrap_or(512)
            };
            if !align.is_power_of_two() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: direct I/O alignment {align} is not a power of two",
                        path.display()
                    ),
                ));
            }
            // The aligned range covering the last byte must lie inside the
            // file, or a read-modify-write at the tail would grow it.
            if !size.is_multiple_of(u64::from(align)) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: size {size} is not a multiple of {align}, the direct I/O alignment",
                        path.display()
                    ),
                ));
            }
            Some(align)
        } else {
            None
        };

        Ok(FileDisk {
            _backing_lock: backing_lock,
            file,
            path: path.to_path_buf(),
            size,
            sector_size,
            block_device,
            read_only: opts.read_only,
            direct_align,
            rmw: RwLock::new(()),
            no_punch: AtomicBool::new(false),
        })
    }

    /// The path the disk was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What an io_uring backend needs to run this disk's plain reads,
    /// writes and flushes itself (see [`RingTarget`]).
    pub fn ring_target(&self) -> RingTarget {
        RingTarget {
            fd: self.file.as_raw_fd(),
            size: self.size,
            writable: !self.read_only,
            direct_align: self.direct_align.map(u64::from),
        }
    }

    /// True for a block device (loop devices included), false for a file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is opened read-only", self.path.display()),
            ));
        }
        Ok(())
    }

    /// Memory alignment of bounce buffers: at least a page, which every
    /// `O_DIRECT` implementation accepts.
    fn bounce_align(align: u64) -> usize {
        align.max(4096) as usize
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64, align: u64) -> io::Result<()> {
        if direct_ready(buf.as_ptr(), buf.len(), offset, align) {
            return self.file.read_exact_at(buf, offset);
        }
        let end = offset + buf.len() as u64;
        let chunk_max = BOUNCE_MAX.max(align);
        let covering = align_up(end, align) - align_down(offset, align);
        let mut bounce =
            AlignedBuf::new(covering.min(chunk_max) as usize, Self::bounce_align(align));
        let mut pos = offset;
        while pos < end {
            let start = align_down(pos, align);
            let chunk_end = end.min(start + chunk_max);
            let n = (align_up(chunk_end, align) - start) as usize;
            let b = &mut bounce.as_mut_slice()[..n];
            self.file.read_exact_at(b, start)?;
            let skip = (pos - start) as usize;
            let take = (chunk_end - pos) as usize;
            let dst = (pos - offset) as usize;
            buf[dst..dst + take].copy_from_slice(&b[skip..skip + take]);
            pos = chunk_end;
        }
        Ok(())
    }

    fn write_direct(&self, buf: &[u8], offset: u64, align: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let needs_rmw = !offset.is_multiple_of(align) || !end.is_multiple_of(align);
        let _alone = needs_rmw.then(|| self.rmw.write().unwrap_or_else(|e| e.into_inner()));
        let _shared = (!needs_rmw).then(|| self.rmw.read().unwrap_or_else(|e| e.into_inner()));
        if direct_ready(buf.as_ptr(), buf.len(), offset, align) {
            return self.file.write_all_at(buf, offset);
        }

        let chunk_max = BOUNCE_MAX.max(align);
        let covering = align_up(end, align) - align_down(offset, align);
        let mut bounce =
            AlignedBuf::new(covering.min(chunk_max) as usize, Self::bounce_align(align));
        let a = align as usize;
        let mut pos = offset;
        while pos < end {
            let start = align_down(pos, align);
            let chunk_end = end.min(start + chunk_max);
            let aligned_end = align_up(chunk_end, align);
            let n = (aligned_end - start) as usize;
            let b = &mut bounce.as_mut_slice()[..n];
            // Read back the partly written blocks at either edge.
            let head_partial = pos != start;
            if head_partial {
                self.file.read_exact_at(&mut b[..a], start)?;
            }
            if chunk_end != aligned_end && !(head_partial && n == a) {
                self.file
                    .read_exact_at(&mut b[n - a..], aligned_end - align)?;
            }
            let skip = (pos - start) as usize;
            let take = (chunk_end - pos) as usize;
            let src = (pos - offset) as usize;
            b[skip..skip + take].copy_from_slice(&buf[src..src + take]);
            self.file.write_all_at(b, start)?;
            pos = chunk_end;
        }
        Ok(())
    }

    /// Deallocates the range of a regular file; it reads back as zeroes.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        if r.as_ref().is_err_and(is_unsupported) {
            self.no_punch.store(true, Ordering::Relaxed);
        }
        r
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate only takes integers; the descriptor is owned by
        // `self.file` and open for the whole call.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Issues `BLKZEROOUT` or `BLKDISCARD` for a byte range of the device.
    fn device_range_ioctl(&self, request: libc::Ioctl, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: both requests read a `[u64; 2]` {start, length} from the
        // pointer, which points at `range` and lives for the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `lseek` with `SEEK_DATA` or `SEEK_HOLE` from `offset`; None where
    /// the file has no more data (`ENXIO`).
    fn seek(&self, whence: libc::c_int, offset: u64) -> io::Result<Option<u64>> {
        // SAFETY: lseek only takes integers; the descriptor is owned by
        // `self.file` and open for the whole call.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// The slow way to zero: write zero buffers, at most [`ZERO_CHUNK`] at a time.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK) as usize;
            self.write_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl Disk for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_fresh(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct_align.is_none() {
            check_range(offset, buf.len(), self.size)?;
            // SAFETY: posix_fadvise only drops clean cached pages of our
            // own descriptor's file in the range; no memory is touched.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    offset as libc::off_t,
                    buf.len() as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        self.read_at(buf, offset)
    }

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn as_file_disk(&self) -> Option<&FileDisk> {
        Some(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let r = match self.direct_align {
            Some(align) => self.read_direct(buf, offset, u64::from(align)),
            // Holes of a sparse file read as zeroes; `read_exact_at` retries
            // short reads.
            None => self.file.read_exact_at(buf, offset),
        };
        match r {
            // The end of a file inside the disk: it was truncated under us.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.health().err().unwrap_or(e))
            }
            r => r,
        }
    }

    /// Writes all of `buf` at `offset`.
    ///
    /// With `O_DIRECT`, a write not aligned to the device's I/O granularity
    /// reads the edge blocks, patches them and writes them back. That is
    /// serialised against other writes through this `FileDisk`, but it is not
    /// atomic against another process (or another `FileDisk`) writing the same
    /// block. The layers above always write whole sectors, which never takes
    /// this path on a device; it exists for files on filesystems whose direct
    /// I/O granularity is larger than 512.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        self.check_writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        match self.direct_align {
            Some(align) => self.write_direct(buf, offset, u64::from(align)),
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// With `flush`, through the page cache, each write goes out with
    /// `RWF_DSYNC`, durable when it returns, instead of writes and then
    /// `fdatasync`: the sync covers these bytes (and the file's metadata),
    /// not every page of the file the page cache holds dirty, so a bitmap
    /// commit under `--cache writeback` does not write the volume's data
    /// back with it (1.95x the first random writes of a new volume,
    /// measured). With `O_DIRECT` there are no dirty pages to spare, and
    /// one `fdatasync` after plain writes measured 1.25x faster than
    /// `RWF_DSYNC` writes: that path stays.
    fn write_all_then_flush(&self, writes: &[(u64, &[u8])], flush: bool) -> io::Result<()> {
        let mut then_flush = false;
        for (offset, data) in writes {
            if !flush || self.direct_align.is_some() || data.is_empty() {
                self.write_at(data, *offset)?;
                then_flush |= flush;
                continue;
            }
            check_range(*offset, data.len(), self.size)?;
            self.check_writable()?;
            let mut done = 0;
            while done < data.len() {
                let rest = &data[done..];
                let iov = libc::iovec {
                    iov_base: rest.as_ptr() as *mut libc::c_void,
                    iov_len: rest.len(),
                };
                // SAFETY: one iovec over `rest`, alive and unchanged for the
                // call, which only reads it; the descriptor is open.
                let n = unsafe {
                    libc::pwritev2(
                        self.file.as_raw_fd(),
                        &iov,
                        1,
                        (*offset + done as u64) as libc::off_t,
                        libc::RWF_DSYNC,
                    )
                };
                match n {
                    n if n > 0 => done += n as usize,
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    _ => {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
            }
        }
        if then_flush { self.flush() } else { Ok(()) }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_span(offset, len, self.size)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        if self.block_device {
            // A punch on a device is the kernel's zeroout that may unmap
            // and never falls back to writing zeroes: a thin device (a loop
            // device over a sparse file) stays thin, and it is quick.
            // BLKZEROOUT keeps the blocks mapped (a loop device allocates
            // its whole backing range for it), and may write zeroes where
            // the device cannot zero by itself.
            if !self.no_punch.load(Ordering::Relaxed) && self.punch_hole(offset, len).is_ok() {
                return Ok(());
            }
            match self.device_range_ioctl(BLKZEROOUT, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(path = %self.path.display(), error = %e, "BLKZEROOUT refused; writing zeroes")
                }
            }
        } else {
            match self.punch_hole(offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => {
                    tracing::debug!(path = %self.path.display(), "hole punching unsupported; writing zeroes")
                }
                Err(e) => return Err(e),
            }
        }
        self.write_zero_buffers(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        check_span(offset, len, self.size)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        if self.block_device {
            // BLKZEROOUT leaves the blocks mapped (the kernel passes
            // NOUNMAP for it).
            if self.device_range_ioctl(BLKZEROOUT, offset, len).is_ok() {
                return Ok(());
            }
        } else {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.write_zero_buffers(offset, len)
    }

    fn zeroes_cheaply(&self, keep: bool) -> bool {
        // A hole is punched in a regular file whatever its size (where
        // the filesystem can); keeping the blocks, or zeroing a device, may
        // end up writing zeroes.
        !keep && !self.block_device && !self.no_punch.load(Ordering::Relaxed)
    }

    fn extent_at(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        if self.block_device || len == 0 {
            return Ok((true, len.max(1)));
        }
        let end = offset.saturating_add(len);
        match self.seek(libc::SEEK_DATA, offset)? {
            // A hole up to the data, or to the end.
            None => Ok((false, len)),
            Some(data) if data > offset => Ok((false, (data.min(end) - offset).max(1))),
            Some(_) => {
                let hole = self.seek(libc::SEEK_HOLE, offset)?.unwrap_or(end);
                Ok((true, (hole.min(end) - offset).max(1)))
            }
        }
    }

    fn will_need(&self, offset: u64, len: u64) {
        // The page cache is what would be warmed: nothing to do when it is
        // bypassed.
        if self.direct_align.is_none() {
            // SAFETY: posix_fadvise only takes integers; the descriptor is
            // owned by `self.file` and open for the call.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_span(offset, len, self.size)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        // A discard is a hint: a device or filesystem that refuses it loses
        // nothing.
        let result = if self.block_device {
            self.device_range_ioctl(BLKDISCARD, offset, len)
        } else {
            match self.punch_hole(offset, len) {
                Err(e) if !is_unsupported(&e) => return Err(e),
                other => other,
            }
        };
        if let Err(e) = result {
            tracing::debug!(path = %self.path.display(), error = %e, "discard refused");
        }
        Ok(())
    }

    fn health(&self) -> io::Result<()> {
        if self.block_device {
            return Ok(());
        }
        let meta = self.file.metadata()?;
        if meta.nlink() == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the file of disk {} was deleted", self.path.display()),
            ));
        }
        if meta.len() < self.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file of disk {} shrank from {} to {} bytes",
                    self.path.display(),
                    self.size,
                    meta.len()
                ),
            ));
        }
        Ok(())
    }

    fn identity(&self) -> DiskIdentity {
        match self.file.metadata() {
            Ok(meta) if self.block_device => device_identity(meta.rdev(), 0),
            Ok(meta) => DiskIdentity {
                controller: Some(filesystem_controller(meta.dev())),
                ..DiskIdentity::default()
            },
            Err(_) => DiskIdentity::default(),
        }
    }
}

/// Like [`check_range`], for a length in `u64`.
fn check_span(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(out_of_range(offset, len as usize, size)),
    }
}

fn align_down(x: u64, align: u64) -> u64 {
    x - x % align
}

fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// The file behind a loop device, from sysfs; None for any other device.
pub fn loop_backing_file(meta: &fs::Metadata) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let text =
        fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file")).ok()?;
    let path = PathBuf::from(text.trim());
    // "(deleted)" and the like: nothing to lock.
    path.is_file().then_some(path)
}

/// How long a lock left by a process that has exited, or by this one as it
/// closes a disk, may take to go.
const DEAD_HOLDER_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes `flock(LOCK_EX | LOCK_NB)`; the lock goes with the descriptor. A
/// lock whose holder has exited is waited for a moment: its descriptor
/// can outlive the process (an io_uring instance's teardown closes its
/// files after the process is reaped), as when `serve` restarts at once.
/// So is one held by this process: a disk it closed a moment ago may not
/// be closed yet (the model test saw a group opened again refused by its
/// own process, once in a full run under load).
fn lock_exclusive(file: &File, path: &Path) -> io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        // SAFETY: flock only takes integers; `file` owns the descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        let holder = lock_holder(path).map(|(pid, _)| pid);
        if !holder_may_let_go(holder) || start.elapsed() > DEAD_HOLDER_GRACE {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another mirrorvol process", path.display()),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether a lock refused to us is worth trying again for a moment, given
/// its holder as `/proc/locks` names it: this process (closing the disk),
/// a process that has exited, or none at all (it let go between our try
/// and the read; a holder that never shows is refused after the grace).
fn holder_may_let_go(holder: Option<u32>) -> bool {
    holder
        .is_none_or(|pid| pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists())
}

/// The process holding the `flock` on the file at `path`, from
/// `/proc/locks`, and its command line: what a refused disk lock names when
/// no daemon recorded itself (an offline command such as a long
/// `add-mirror`).
pub fn lock_holder(path: &Path) -> Option<(u32, String)> {
    let meta = fs::metadata(path).ok()?;
    let dev = meta.dev();
    let locks = fs::read_to_string("/proc/locks").ok()?;
    let pid = locks_holder(&locks, libc::major(dev), libc::minor(dev), meta.ino())?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    Some((pid, words.join(" ")))
}

/// The pid of the FLOCK in `locks` (the text of `/proc/locks`) on the file
/// with device `major:minor` and inode `ino`. Lines read `1: FLOCK
/// ADVISORY WRITE 4242 fe:01:131 0 EOF` (major and minor in hex).
fn locks_holder(locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A waiter's line has "->" after the index: not the holder.
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, file, ..] if *file == want => pid.parse().ok(),
            _ => None,
        }
    })
}

// <linux/fs.h> ioctls that libc does not define. `_IO(0x12, nr)` has no
// direction or size bits; `_IOR` encodes them as the architecture does.
const BLKDISCARD: libc::Ioctl = ioc(0, 0x12, 119, 0);
const BLKZEROOUT: libc::Ioctl = ioc(0, 0x12, 127, 0);
const BLKGETSIZE64: libc::Ioctl = ioc(IOC_READ, 0x12, 114, size_of::<usize>() as u32);

#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const IOC_READ: u32 = 2 << 29;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const IOC_READ: u32 = 2 << 30;

const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> libc::Ioctl {
    (dir | (size << 16) | (ty << 8) | nr) as libc::Ioctl
}

fn device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn device_sector_size(file: &File) -> io::Result<u32> {
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at
    // `sector`.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut sector as *mut libc::c_int,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(sector)
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| {
            io::Error::other(format!("device reports a logical sector size of {sector}"))
        })
}

/// The file offset alignment `O_DIRECT` needs on this file's filesystem
/// (`statx` `STATX_DIOALIGN`, Linux 6.1+), if the kernel says.
fn file_direct_align(file: &File) -> Option<u32> {
    // SAFETY: statx is plain data; all-zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a NUL-terminated string and `stx` a writable statx,
    // both living for the call; AT_EMPTY_PATH makes it stat the descriptor.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align)
}

/// The controller of a file: the device of the filesystem holding it.
fn filesystem_controller(dev: u64) -> String {
    format!("fs:{}:{}", libc::major(dev), libc::minor(dev))
}

/// Identity of the block device `rdev`, from sysfs. `depth` bounds the
/// recursion through loop devices backed by other devices.
fn device_identity(rdev: u64, depth: u32) -> DiskIdentity {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let Ok(mut disk) = fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")) else {
        return DiskIdentity::default();
    };
    // A partition's directory sits inside its disk's.
    if disk.join("partition").exists() {
        disk.pop();
    }
    let rotational = read_sysfs(&disk.join("queue/rotational")).map(|s| s == "1");
    let vendor = read_sysfs(&disk.join("device/vendor"));
    let model = read_sysfs(&disk.join("device/model"));
    let model = match (vendor, model) {
        (Some(v), Some(m)) => Some(format!("{v} {m}")),
        (v, m) => m.or(v),
    };
    DiskIdentity {
        controller: device_controller(&disk, depth),
        rotational,
        model,
    }
}

/// The controller of a disk whose sysfs directory is `disk`. A loop device
/// reports the controller of what backs it, so a loop device and the files
/// beside its backing file are seen on one I/O path.
fn device_controller(disk: &Path, depth: u32) -> Option<String> {
    if let Some(backing) = read_sysfs(&disk.join("loop/backing_file"))
        && let Ok(meta) = fs::metadata(&backing)
    {
        if meta.file_type().is_block_device() {
            if depth < 8 {
                return device_identity(meta.rdev(), depth + 1).controller;
            }
        } else {
            return Some(filesystem_controller(meta.dev()));
        }
    }
    controller_from_sysfs_path(&disk.to_string_lossy())
}

fn read_sysfs(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// The I/O path of a disk from its sysfs device directory, e.g.
///
/// ```text
/// /sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda  ──► pci-0000:00:1f.2-ata1
/// /sys/devices/pci0000:00/0000:00:04.0/virtio1/block/vda                         ──► pci-0000:00:04.0
/// /sys/devices/pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0/nvme0n1           ──► pci-0000:3d:00.0
/// /sys/devices/platform/soc/fe340000.mmc/mmc_host/mmc1/mmc1:aaaa/block/mmcblk1   ──► platform-soc-fe340000.mmc
/// /sys/devices/virtual/block/dm-0                                                ──► virtual
/// ```
///
/// That is: the PCI function nearest the disk, followed by the host adapter
/// port (`ataN`, `hostN`, `usbN`) if one comes right after it. Without a PCI
/// function, the path down to the first adapter or class directory.
pub(crate) fn controller_from_sysfs_path(path: &str) -> Option<String> {
    let (_, rest) = path.split_once("/devices/")?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    if parts.first() == Some(&"virtual") {
        return Some("virtual".to_string());
    }
    if let Some(i) = parts.iter().rposition(|p| is_pci_function(p)) {
        let mut name = format!("pci-{}", parts[i]);
        if let Some(next) = parts.get(i + 1).filter(|p| is_adapter(p)) {
            name.push('-');
            name.push_str(next);
        }
        return Some(name);
    }
    let stop = parts.iter().position(|p| is_adapter(p) || is_class_dir(p));
    let mut kept: Vec<&str> = match stop {
        Some(i) => parts[..i].to_vec(),
        // No landmark: everything but the disk itself.
        None => parts[..parts.len().saturating_sub(1)].to_vec(),
    };
    if let Some(i) = stop
        && is_adapter(parts[i])
    {
        kept.push(parts[i]);
    }
    (!kept.is_empty()).then(|| kept.join("-"))
}

/// `dddd:bb:dd.f` (domain of four or more hex digits, as VMD domains have).
fn is_pci_function(part: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut fields = part.split(':');
    let (Some(domain), Some(bus), Some(slot_fn), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let Some((slot, function)) = slot_fn.split_once('.') else {
        return false;
    };
    domain.len() >= 4
        && domain.bytes().all(|b| b.is_ascii_hexdigit())
        && hex(bus, 2)
        && hex(slot, 2)
        && matches!(function.as_bytes(), [b'0'..=b'7'])
}

/// A host adapter port component: `ataN`, `hostN`, `usbN`.
fn is_adapter(part: &str) -> bool {
    ["ata", "host", "usb"]
        .iter()
        .any(|prefix| numbered(part, prefix))
}

/// A component that starts the per-disk tail of a path.
fn is_class_dir(part: &str) -> bool {
    matches!(part, "block" | "nvme" | "mmc_host" | "scsi_host")
        || numbered(part, "virtio")
        || numbered(part, "target")
}

fn numbered(part: &str, prefix: &str) -> bool {
    part.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit() || b == b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_lock_is_found_in_proc_locks_text() {
        let text = "1: POSIX  ADVISORY  WRITE 10 fe:01:131 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fe:01:131 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 77 fe:01:131 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 99 08:10:131 0 EOF\n";
        assert_eq!(locks_holder(text, 0xfe, 1, 131), Some(4242));
        assert_eq!(locks_holder(text, 8, 16, 131), Some(99));
        assert_eq!(locks_holder(text, 8, 16, 132), None);
    }

    #[test]
    fn the_holder_of_a_real_flock_is_this_process() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let file = fs::File::open(f.path()).unwrap();
        // SAFETY: flock takes integers; `file` owns the descriptor.
        assert_eq!(
            unsafe {
                libc::flock(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    libc::LOCK_EX | libc::LOCK_NB,
                )
            },
            0
        );
        let (pid, cmdline) = lock_holder(f.path()).expect("the lock is listed");
        assert_eq!(pid, std::process::id());
        assert!(!cmdline.is_empty());
        drop(file);
        assert_eq!(lock_holder(f.path()), None, "gone with the descriptor");
    }

    use std::process::Command;

    fn sized_tempfile(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        f.as_file().set_len(len).expect("set_len");
        f
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn rw() -> OpenOptions {
        OpenOptions::default()
    }

    fn direct() -> OpenOptions {
        OpenOptions {
            direct: true,
            ..OpenOptions::default()
        }
    }

    /// Opens with `O_DIRECT`, or None when the filesystem refuses it (tmpfs).
    fn open_direct(path: &Path) -> Option<FileDisk> {
        match FileDisk::open(path, direct()) {
            Ok(d) => Some(d),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("SKIPPED: O_DIRECT refused on {}: {e}", path.display());
                None
            }
            Err(e) => panic!("open O_DIRECT {}: {e}", path.display()),
        }
    }

    #[test]
    fn a_file_truncated_or_deleted_under_the_disk_is_reported_gone() {
        let f = sized_tempfile(1 << 20);
        let disk = FileDisk::open(f.path(), rw()).unwrap();
        disk.health().unwrap();
        f.as_file().set_len(256 * 1024).unwrap();
        let err = disk.health().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("shrank"), "{err}");
        // A read past the new end says why, instead of a bare end of file.
        let mut buf = vec![0; 4096];
        let err = disk.read_at(&mut buf, 512 * 1024).unwrap_err();
        assert!(err.to_string().contains("shrank"), "{err}");

        let g = sized_tempfile(1 << 20);
        let disk = FileDisk::open(g.path(), rw()).unwrap();
        std::fs::remove_file(g.path()).unwrap();
        let err = disk.health().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("deleted"), "{err}");
    }

    #[test]
    fn file_round_trips_data() {
        let f = sized_tempfile(1 << 20);
        let disk = FileDisk::open(f.path(), rw()).unwrap();
        assert_eq!(disk.size(), 1 << 20);
        assert_eq!(disk.sector_size(), 512);
        assert!(!disk.is_block_device());
        assert_eq!(disk.path(), f.path());

        let data = pattern(8192, 7);
        disk.write_at(&data, 4096).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0; 8192];
        disk.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);

        // Never-written parts of the sparse file read as zeroes.
        let mut hole = vec![1; 4096];
        disk.read_at(&mut hole, 512 * 1024).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
    }

    #[test]
    fn durable_writes_go_out_with_rwf_dsync_or_a_flush() {
        let f = sized_tempfile(1 << 20);
        let mut disks = vec![("buffered", FileDisk::open(f.path(), rw()).unwrap())];
        if let Some(d) = open_direct(f.path()) {
            disks.push(("direct", d));
        }
        for (how, disk) in disks {
            let a = AlignedBuf::from_slice(&pattern(4096, 1));
            let b = pattern(700, 2); // unaligned: O_DIRECT's bounce path
            disk.write_all_then_flush(&[(8192, &a[..]), (20_000, &b[..])], true)
                .unwrap();
            let mut back = vec![0; 4096];
            disk.read_at(&mut back, 8192).unwrap();
            assert_eq!(&back[..], &a[..], "{how}");
            let mut back = vec![0; 700];
            disk.read_at(&mut back, 20_000).unwrap();
            assert_eq!(back, b, "{how}");
            // Past the end: refused, as a plain write is.
            let e = disk
                .write_all_then_flush(&[((1 << 20) - 512, &a[..])], true)
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{how}");
        }
        let ro = FileDisk::open(
            f.path(),
            OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let e = ro
            .write_all_then_flush(&[(0, &[0u8; 512][..])], true)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn write_zeroes_punches_a_hole() {
        let f = sized_tempfile(4 << 20);
        let disk = FileDisk::open(f.path(), rw()).unwrap();
        disk.write_at(&pattern(2 << 20, 3), 1 << 20).unwrap();
        disk.flush().unwrap();
        let before = fs::metadata(f.path()).unwrap().blocks();

        disk.write_zeroes(1 << 20, 1 << 20).unwrap();
        let mut back = vec![1; 1 << 20];
        disk.read_at(&mut back, 1 << 20).unwrap();
        assert!(back.iter().all(|&b| b == 0), "zeroed range reads back zero");
        let mut kept = vec![0; 1 << 20];
        disk.read_at(&mut kept, 2 << 20).unwrap();
        assert_eq!(kept, pattern(2 << 20, 3)[1 << 20..]);

        let after = fs::metadata(f.path()).unwrap().blocks();
        if after < before {
            assert!(
                before - after >= 2048 - 8,
                "about 1 MiB freed: {before} -> {after} blocks"
            );
        } else {
            eprintln!("NOTE: st_blocks did not drop ({before} -> {after}); no hole punching here?");
        }
    }

    #[test]
    fn direct_io_round_trips_unaligned_data() {
        let f = sized_tempfile(4 << 20);
        let Some(disk) = open_direct(f.path()) else {
            return;
        };
        // Aligned, in a buffer of arbitrary alignment.
        let data = pattern(8192 + 1, 1);
        disk.write_at(&data[1..], 8192).unwrap();
        let mut back = vec![0; 8192 + 1];
        disk.read_at(&mut back[1..], 8192).unwrap();
        assert_eq!(back[1..], data[1..]);

        // Unaligned at both ends, inside one block and across many, and one
        // longer than a bounce buffer.
        for (offset, len) in [
            (100u64, 10usize),
            (511, 2),
            (4000, 9000),
            (123_457, (1 << 20) + 777),
        ] {
            let before = {
                let mut b = vec![0; 8192];
                disk.read_at(&mut b, align_down(offset, 4096)).unwrap();
                b
            };
            let data = pattern(len, offset as u8);
            disk.write_at(&data, offset).unwrap();
            let mut back = vec![0; len];
            disk.read_at(&mut back, offset).unwrap();
            assert_eq!(back, data, "at {offset}+{len}");
            // Bytes before the write in its first block are untouched.
            let head = (offset - align_down(offset, 4096)) as usize;
            let mut now = vec![0; head];
            disk.read_at(&mut now, align_down(offset, 4096)).unwrap();
            assert_eq!(now, before[..head], "head of {offset}+{len}");
        }

        // The same bytes are seen without O_DIRECT.
        drop(disk);
        let buffered = FileDisk::open(f.path(), rw()).unwrap();
        let mut back = vec![0; 10];
        buffered.read_at(&mut back, 100).unwrap();
        assert_eq!(back, pattern(10, 100));
    }

    #[test]
    fn direct_write_zeroes_falls_back_cleanly() {
        let f = sized_tempfile(1 << 20);
        let Some(disk) = open_direct(f.path()) else {
            return;
        };
        disk.write_at(&pattern(65536, 9), 0).unwrap();
        disk.write_zero_buffers(1000, 3000).unwrap();
        disk.write_zeroes(8192, 4096).unwrap();
        let mut back = vec![0; 65536];
        disk.read_at(&mut back, 0).unwrap();
        let mut want = pattern(65536, 9);
        want[1000..4000].fill(0);
        want[8192..12288].fill(0);
        assert_eq!(back, want);
    }

    #[test]
    fn access_past_the_end_is_refused() {
        let f = sized_tempfile(8192);
        let disk = FileDisk::open(f.path(), rw()).unwrap();
        let mut buf = vec![0; 512];
        let kind = |r: io::Result<()>| r.unwrap_err().kind();
        assert_eq!(
            kind(disk.read_at(&mut buf, 8192 - 511)),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(kind(disk.write_at(&buf, 8192)), io::ErrorKind::InvalidInput);
        assert_eq!(
            kind(disk.read_at(&mut buf, u64::MAX)),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(disk.write_zeroes(4096, 4097)),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(kind(disk.discard(u64::MAX, 2)), io::ErrorKind::InvalidInput);
        disk.read_at(&mut buf, 8192 - 512).unwrap();
        // Nothing grew the file.
        assert_eq!(fs::metadata(f.path()).unwrap().len(), 8192);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let f = sized_tempfile(8192);
        let opts = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let disk = FileDisk::open(f.path(), opts).unwrap();
        let mut buf = vec![0; 512];
        disk.read_at(&mut buf, 0).unwrap();
        let err = disk.write_at(&buf, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(
            disk.write_zeroes(0, 512).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
    }

    /// Options that take the disk's lock.
    fn locking() -> OpenOptions {
        OpenOptions {
            lock: true,
            ..OpenOptions::default()
        }
    }

    #[test]
    fn locked_disk_refuses_a_second_locker() {
        let f = sized_tempfile(8192);
        let locked = locking();
        let first = FileDisk::open(f.path(), locked).unwrap();
        let err = FileDisk::open(f.path(), locked).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(
            err.to_string()
                .contains("is in use by another mirrorvol process"),
            "{err}"
        );
        // Opening without the lock is not refused.
        FileDisk::open(f.path(), rw()).unwrap();
        drop(first);
        FileDisk::open(f.path(), locked).unwrap();
    }

    #[test]
    fn a_lock_this_process_lets_go_of_within_the_grace_is_waited_for() {
        let f = sized_tempfile(8192);
        let locked = locking();
        let first = FileDisk::open(f.path(), locked).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        let start = std::time::Instant::now();
        FileDisk::open(f.path(), locked).unwrap();
        assert!(start.elapsed() >= std::time::Duration::from_millis(250));
        closer.join().unwrap();
    }

    #[test]
    fn a_lock_gone_before_its_holder_is_read_is_tried_again() {
        // The race CI met: the holder let go after our flock failed and
        // before /proc/locks was read, which then names nobody.
        assert!(holder_may_let_go(None));
        assert!(holder_may_let_go(Some(std::process::id())));
        // A live other process (our parent) is refused at once.
        let parent = std::os::unix::process::parent_id();
        assert!(!holder_may_let_go(Some(parent)));
        // A pid no process has.
        assert!(holder_may_let_go(Some(u32::MAX - 1)));
    }

    #[test]
    fn neither_file_nor_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileDisk::open(
            dir.path(),
            OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn file_identity_is_its_filesystem_device() {
        let f = sized_tempfile(8192);
        let disk = FileDisk::open(f.path(), rw()).unwrap();
        let dev = fs::metadata(f.path()).unwrap().dev();
        let id = disk.identity();
        assert_eq!(
            id.controller,
            Some(format!("fs:{}:{}", libc::major(dev), libc::minor(dev)))
        );
        assert_eq!(id.rotational, None);
        assert_eq!(id.model, None);
    }

    #[test]
    fn controller_from_sysfs_path_names_the_host_adapter() {
        let cases = [
            (
                "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
                Some("pci-0000:00:1f.2-ata1"),
            ),
            (
                "/sys/devices/pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sdb",
                Some("pci-0000:00:1f.2-ata2"),
            ),
            (
                "/sys/devices/pci0000:00/0000:00:04.0/virtio1/block/vda",
                Some("pci-0000:00:04.0"),
            ),
            (
                "/sys/devices/pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0/nvme0n1",
                Some("pci-0000:3d:00.0"),
            ),
            (
                "/sys/devices/pci0000:00/0000:00:03.0/0000:03:00.0/host2/port-2:0/end_device-2:0/target2:0:0/2:0:0:0/block/sdc",
                Some("pci-0000:03:00.0-host2"),
            ),
            (
                "/sys/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdd",
                Some("pci-0000:00:14.0-usb2"),
            ),
            (
                "/sys/devices/pci10000:e0/10000:e0:06.0/10000:e1:00.0/nvme/nvme1/nvme1n1",
                Some("pci-10000:e1:00.0"),
            ),
            (
                "/sys/devices/platform/soc/fe340000.mmc/mmc_host/mmc1/mmc1:aaaa/block/mmcblk1",
                Some("platform-soc-fe340000.mmc"),
            ),
            (
                "/sys/devices/platform/80000000.nvme/nvme/nvme0/nvme0n1",
                Some("platform-80000000.nvme"),
            ),
            (
                "/sys/devices/platform/host3/session1/target3:0:0/3:0:0:1/block/sde",
                Some("platform-host3"),
            ),
            ("/sys/devices/virtual/block/loop0", Some("virtual")),
            ("/sys/devices/virtual/block/dm-0", Some("virtual")),
            ("/dev/sda", None),
        ];
        for (path, want) in cases {
            assert_eq!(controller_from_sysfs_path(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn pci_function_names_are_recognised() {
        assert!(is_pci_function("0000:00:1f.2"));
        assert!(is_pci_function("10000:e1:00.0"));
        assert!(!is_pci_function("pci0000:00"));
        assert!(!is_pci_function("0:0:0:0"));
        assert!(!is_pci_function("0000:00:1f.8"));
        assert!(!is_pci_function("target0:0:0"));
    }

    /// Detaches a loop device when dropped, even if the test fails.
    struct LoopDevice(PathBuf);

    impl LoopDevice {
        fn attach(file: &Path) -> Result<LoopDevice, String> {
            let out = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .output()
                .map_err(|e| format!("cannot run losetup: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if dev.is_empty() {
                return Err("losetup printed no device".to_string());
            }
            Ok(LoopDevice(PathBuf::from(dev)))
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let status = Command::new("losetup").arg("-d").arg(&self.0).status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("WARNING: could not detach {}: {status:?}", self.0.display());
            }
        }
    }

    #[test]
    fn loop_device_is_a_direct_block_device() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED loop_device_is_a_direct_block_device: not root");
            return;
        }
        let f = sized_tempfile(8 << 20);
        let lo = match LoopDevice::attach(f.path()) {
            Ok(lo) => lo,
            Err(e) => {
                eprintln!("SKIPPED loop_device_is_a_direct_block_device: {e}");
                return;
            }
        };
        let disk = FileDisk::open(&lo.0, direct()).unwrap();
        assert!(disk.is_block_device());
        assert_eq!(disk.size(), 8 << 20);
        assert!(disk.sector_size() == 512 || disk.sector_size() == 4096);

        let data = pattern(1 << 16, 5);
        disk.write_at(&data, 1 << 20).unwrap();
        let odd = pattern(1000, 77);
        disk.write_at(&odd, 3 * 4096 + 17).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0; 1 << 16];
        disk.read_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, data);
        let mut back = vec![0; 1000];
        disk.read_at(&mut back, 3 * 4096 + 17).unwrap();
        assert_eq!(back, odd);

        disk.write_zeroes(1 << 20, 1 << 15).unwrap();
        let mut back = vec![1; 1 << 16];
        disk.read_at(&mut back, 1 << 20).unwrap();
        assert!(back[..1 << 15].iter().all(|&b| b == 0));
        assert_eq!(back[1 << 15..], data[1 << 15..]);
        disk.discard(4 << 20, 1 << 20).unwrap();

        // The data went to the backing file.
        disk.flush().unwrap();
        let file = FileDisk::open(f.path(), rw()).unwrap();
        let mut back = vec![0; 1000];
        file.read_at(&mut back, 3 * 4096 + 17).unwrap();
        assert_eq!(back, odd);

        // A loop device is on the I/O path of its backing file.
        let id = disk.identity();
        assert_eq!(id.controller, file.identity().controller);
        assert!(
            id.rotational.is_some(),
            "sysfs has queue/rotational for loop devices"
        );
    }
}
