//! An in-memory disk, for tests and for crash images.

use std::io;
use std::sync::RwLock;

use super::{Disk, DiskIdentity, check_range};

#[derive(Debug)]
pub struct MemDisk {
    bytes: RwLock<Vec<u8>>,
    sector_size: u32,
    identity: DiskIdentity,
}

impl MemDisk {
    pub fn new(size: u64) -> MemDisk {
        MemDisk::with_sector_size(size, 512)
    }

    pub fn with_sector_size(size: u64, sector_size: u32) -> MemDisk {
        MemDisk {
            bytes: RwLock::new(vec![0; size as usize]),
            sector_size,
            identity: DiskIdentity::default(),
        }
    }

    /// The same disk, reporting `controller` as its I/O path.
    pub fn on_controller(mut self, controller: &str) -> MemDisk {
        self.identity.controller = Some(controller.to_string());
        self
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len(), bytes.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len(), bytes.len() as u64)?;
        let start = offset as usize;
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, len as usize, bytes.len() as u64)?;
        bytes[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn identity(&self) -> DiskIdentity {
        self.identity.clone()
    }
}
