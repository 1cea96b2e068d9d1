//! A `Read + Write + Seek` stream over a [`Disk`], for the partition-table
//! crates, which want a stream rather than positional I/O.

use std::io::{self, Read, Seek, SeekFrom, Write};

use super::Disk;

pub struct DiskCursor<'a> {
    disk: &'a dyn Disk,
    pos: u64,
}

impl<'a> DiskCursor<'a> {
    pub fn new(disk: &'a dyn Disk) -> DiskCursor<'a> {
        DiskCursor { disk, pos: 0 }
    }
}

impl Read for DiskCursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.disk.size().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        self.disk.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for DiskCursor<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.disk.write_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.disk.flush()
    }
}

impl Seek for DiskCursor<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.disk.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )
        })?;
        Ok(self.pos)
    }
}
