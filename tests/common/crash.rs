//! A disk with a volatile cache that loses power: writes reach the
//! durable image only when flushed (shared by the crash tests).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mirrorvol::disk::{Disk, MemDisk};

/// Power is cut after this many disk operations (writes and flushes, over
/// every disk of the group).
#[derive(Debug)]
pub struct Cut {
    pub ops: AtomicU64,
    pub at: u64,
    pub off: AtomicBool,
    /// Unflushed writes reach the platters sector by sector (512 bytes),
    /// each sector or not by the coin: a write torn as a raw device or an
    /// image file may tear it.
    pub tear: bool,
}

impl Cut {
    /// Counts one operation; false once the power is off.
    pub fn tick(&self) -> bool {
        if self.off.load(Ordering::SeqCst) {
            return false;
        }
        if self.ops.fetch_add(1, Ordering::SeqCst) >= self.at {
            self.off.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }
}

/// A crash disk: writes land in a live image at once and in the durable
/// image only on flush, as in a volatile disk cache. After a cut, every
/// operation fails, and [`CrashDisk::after_crash`] is what the platters
/// hold: the durable image plus each unflushed write or not, by a seeded
/// coin.
#[derive(Debug)]
pub struct CrashDisk {
    live: MemDisk,
    durable: Mutex<Vec<u8>>,
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
    cut: Arc<Cut>,
}

impl CrashDisk {
    pub fn new(image: Vec<u8>, cut: Arc<Cut>) -> CrashDisk {
        let live = MemDisk::new(image.len() as u64);
        live.write_at(&image, 0).unwrap();
        CrashDisk {
            live,
            durable: Mutex::new(image),
            pending: Mutex::new(Vec::new()),
            cut,
        }
    }

    fn tick(&self) -> io::Result<()> {
        if self.cut.tick() {
            Ok(())
        } else {
            Err(io::Error::other("power cut"))
        }
    }

    pub fn after_crash(&self, seed: &mut u64) -> Vec<u8> {
        let mut image = self.durable.lock().unwrap().clone();
        let mut coin = || {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *seed >> 63 == 1
        };
        for (at, data) in self.pending.lock().unwrap().iter() {
            let at = *at as usize;
            if !self.cut.tear {
                if coin() {
                    image[at..at + data.len()].copy_from_slice(data);
                }
                continue;
            }
            for (k, sector) in data.chunks(512).enumerate() {
                if coin() {
                    image[at + k * 512..at + k * 512 + sector.len()].copy_from_slice(sector);
                }
            }
        }
        image
    }
}

impl Cut {
    /// Power that is never cut (the test cuts it by hand, if at all).
    pub fn never() -> Arc<Cut> {
        Arc::new(Cut {
            ops: AtomicU64::new(0),
            at: u64::MAX,
            off: AtomicBool::new(false),
            tear: false,
        })
    }
}

impl CrashDisk {
    /// What the platters hold when every write since the last flush is
    /// lost.
    pub fn durable(&self) -> Vec<u8> {
        self.durable.lock().unwrap().clone()
    }
}

impl Disk for CrashDisk {
    fn size(&self) -> u64 {
        self.live.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.live.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.tick()?;
        self.live.write_at(buf, offset)?;
        self.pending.lock().unwrap().push((offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.tick()?;
        let mut durable = self.durable.lock().unwrap();
        for (at, data) in self.pending.lock().unwrap().drain(..) {
            durable[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0; len as usize], offset)
    }
}

/// Puts every disk of `g` behind a crash disk holding a copy of what it
/// holds now, all losing power with `cut`; returns the crash disks.
pub fn wrap_group(g: &mut mirrorvol::group::Group, cut: &Arc<Cut>) -> Vec<Arc<CrashDisk>> {
    let mut crash = Vec::new();
    g.wrap_disks(|_, d| {
        let mut image = vec![0; d.size() as usize];
        d.read_at(&mut image, 0).unwrap();
        let c = Arc::new(CrashDisk::new(image, cut.clone()));
        crash.push(c.clone());
        c as Arc<dyn Disk>
    });
    crash
}
