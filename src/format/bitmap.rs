//! The write-intent bitmap of one disk: which regions of its data area may
//! hold writes that its twin plexes lack. Encoding and addressing only; the
//! I/O and the policy of when bits are set and cleared live in
//! [`crate::volume::bitmap`] and the group layer.
//!
//! The bitmap area ([`super::layout::BITMAP_OFFSET`], 5 MiB) holds a 4 KiB
//! header block, then bit blocks of 4 KiB. Bit `i` (bit `i % 8` of byte
//! `i / 8`, counted over the bit blocks) covers data-area bytes
//! `[i * R, (i + 1) * R)`, where `R` is the region size. All integers are
//! little-endian:
//!
//! ```text
//!   0 ┌─────────────────────────────────────────────┐
//!     │ magic "MVBITMAP"                        (8) │
//!   8 ├──────────────────────┬──────────────────────┤
//!     │ bitmap version   (4) │ reserved, zero   (4) │
//!  16 ├──────────────────────┴──────────────────────┤
//!     │ region size R in bytes                  (8) │
//!  24 ├─────────────────────────────────────────────┤
//!     │ regions (bits in use)                   (8) │
//!  32 ├─────────────────────────────────────────────┤
//!     │ since: the config seqno from which this     │
//!     │ bitmap has tracked every write          (8) │
//!  40 ├─────────────────────────────────────────────┤
//!     │ reserved, zero                              │
//!  60 ├─────────────────────────────────────────────┤
//!     │ crc32c of bytes [0, 60)                 (4) │
//!  64 ├─────────────────────────────────────────────┤
//!     │ zero up to 4 KiB                            │
//! 4 KiB ├───────────────────────────────────────────┤
//!     │ bit blocks, 32768 regions each              │
//!     └─────────────────────────────────────────────┘
//! ```
//!
//! An all-zero header means "no bitmap": a disk formatted by version 1
//! reserved and zeroed this area but never used it. Bit blocks carry no
//! checksum: a bit is set by rewriting its whole block and flushing before
//! the data write that needs it is submitted, so a torn block write leaves
//! the bit either set or not needed yet.

use super::layout::BITMAP_SIZE;

pub const BITMAP_MAGIC: &[u8; 8] = b"MVBITMAP";
pub const BITMAP_VERSION: u32 = 1;
/// Size of the header and of every bit block.
pub const BITMAP_BLOCK: u64 = 4096;
/// Regions one bit block covers.
pub const BITS_PER_BLOCK: u64 = BITMAP_BLOCK * 8;
/// The most regions one disk's bitmap area can hold.
pub const MAX_REGIONS: u64 = (BITMAP_SIZE - BITMAP_BLOCK) / BITMAP_BLOCK * BITS_PER_BLOCK;
/// The region size a new group records: see the README ("Write-intent
/// bitmap").
pub const DEFAULT_REGION_SIZE: u64 = 1024 * 1024;
/// What a group's recorded region size of 0 stands for: the default of
/// groups made before 2026-12-05, which recorded none. Their new disks get
/// it too, so that a group keeps one region size.
pub const LEGACY_REGION_SIZE: u64 = 64 * 1024;

const REGION: usize = 16;
const REGIONS: usize = 24;
const SINCE: usize = 32;
const CRC: usize = 60;
const HEADER_LEN: usize = 64;

/// The decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapHeader {
    pub region_size: u64,
    pub regions: u64,
    pub since: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmap header checksum mismatch")]
    BadChecksum,
    #[error("bitmap version {0} is newer than this mirrorvol understands")]
    NewerVersion(u32),
    #[error("bitmap header fields are inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// The region size a data area of `data_size` bytes gets when the group asks
/// for `wanted` (0: [`LEGACY_REGION_SIZE`]): `wanted`, or the next power of
/// two that lets every region fit in the bitmap area.
pub fn region_size_for(data_size: u64, wanted: u64) -> u64 {
    region_size_within(data_size, wanted, MAX_REGIONS)
}

/// [`region_size_for`] for an area that holds at most `max_regions` bits.
pub fn region_size_within(data_size: u64, wanted: u64, max_regions: u64) -> u64 {
    let mut r = if wanted == 0 {
        LEGACY_REGION_SIZE
    } else {
        wanted
    };
    while data_size.div_ceil(r) > max_regions {
        r = (r + 1).next_power_of_two();
    }
    r
}

impl BitmapHeader {
    /// A header for a data area of `data_size` bytes.
    pub fn new(data_size: u64, wanted_region: u64, since: u64) -> BitmapHeader {
        let region_size = region_size_for(data_size, wanted_region);
        BitmapHeader {
            region_size,
            regions: data_size.div_ceil(region_size),
            since,
        }
    }

    /// Bit blocks in use.
    pub fn blocks(&self) -> u64 {
        self.regions.div_ceil(BITS_PER_BLOCK)
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(BITMAP_MAGIC)
    }

    /// The header block with `magic` (the written map's header has the
    /// same fields, `since` unused).
    pub fn encode_as(&self, magic: &[u8; 8]) -> Vec<u8> {
        let mut buf = vec![0u8; BITMAP_BLOCK as usize];
        buf[..8].copy_from_slice(magic);
        buf[8..12].copy_from_slice(&BITMAP_VERSION.to_le_bytes());
        buf[REGION..REGION + 8].copy_from_slice(&self.region_size.to_le_bytes());
        buf[REGIONS..REGIONS + 8].copy_from_slice(&self.regions.to_le_bytes());
        buf[SINCE..SINCE + 8].copy_from_slice(&self.since.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..CRC]);
        buf[CRC..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// `Ok(None)` for an all-zero header (no bitmap yet).
    pub fn decode(buf: &[u8]) -> Result<Option<BitmapHeader>, BitmapError> {
        Self::decode_as(buf, BITMAP_MAGIC, MAX_REGIONS)
    }

    /// Decodes a header block of `magic` whose area holds at most
    /// `max_regions` bits.
    pub fn decode_as(
        buf: &[u8],
        magic: &[u8; 8],
        max_regions: u64,
    ) -> Result<Option<BitmapHeader>, BitmapError> {
        let buf = &buf[..HEADER_LEN];
        if buf.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8"));
        let crc = u32::from_le_bytes(buf[CRC..HEADER_LEN].try_into().expect("4"));
        if &buf[..8] != magic || crc32c::crc32c(&buf[..CRC]) != crc {
            return Err(BitmapError::BadChecksum);
        }
        let version = u32::from_le_bytes(buf[8..12].try_into().expect("4"));
        if version > BITMAP_VERSION {
            return Err(BitmapError::NewerVersion(version));
        }
        let h = BitmapHeader {
            region_size: u64_at(REGION),
            regions: u64_at(REGIONS),
            since: u64_at(SINCE),
        };
        if h.region_size < 4096 || !h.region_size.is_power_of_two() {
            return Err(BitmapError::Inconsistent("region size"));
        }
        if h.regions > max_regions {
            return Err(BitmapError::Inconsistent(
                "more regions than the area holds",
            ));
        }
        Ok(Some(h))
    }

    /// The regions that lie wholly inside data-area bytes `[start, end)`.
    pub fn regions_within(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        let r = self.region_size;
        let first = start.div_ceil(r);
        first..(end / r).min(self.regions).max(first)
    }

    /// The regions that data-area bytes `[start, end)` touch.
    pub fn regions_of(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        if end <= start {
            return 0..0;
        }
        start / self.region_size..end.div_ceil(self.region_size).min(self.regions)
    }
}

/// Whether bit `i` of `bits` is set.
pub fn bit(bits: &[u8], i: u64) -> bool {
    bits[(i / 8) as usize] & (1 << (i % 8)) != 0
}

pub fn set_bit(bits: &mut [u8], i: u64, on: bool) {
    let b = &mut bits[(i / 8) as usize];
    if on {
        *b |= 1 << (i % 8);
    } else {
        *b &= !(1 << (i % 8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MIB;

    #[test]
    fn header_round_trips_and_zero_means_absent() {
        let h = BitmapHeader::new(100 * MIB, DEFAULT_REGION_SIZE, 7);
        assert_eq!(h.regions, 100);
        let h = BitmapHeader::new(100 * MIB, 0, 7);
        assert_eq!(h.region_size, LEGACY_REGION_SIZE);
        assert_eq!(h.regions, 1600);
        assert_eq!(BitmapHeader::decode(&h.encode()), Ok(Some(h)));
        assert_eq!(BitmapHeader::decode(&[0u8; 4096]), Ok(None));
        let mut bad = h.encode();
        bad[20] ^= 1;
        assert_eq!(BitmapHeader::decode(&bad), Err(BitmapError::BadChecksum));
    }

    #[test]
    fn large_data_areas_get_larger_regions_that_fit() {
        // 1 MiB regions cover almost 40 TiB in the 5 MiB area; 40 TiB
        // needs 2 MiB.
        assert_eq!(region_size_for(39 << 40, DEFAULT_REGION_SIZE), 1 << 20);
        assert_eq!(region_size_for(40 << 40, DEFAULT_REGION_SIZE), 2 << 20);
        // An older group's 64 KiB regions cover 2.6 TB; 4 TiB needs 128 KiB.
        assert_eq!(region_size_for(2 << 40, 0), 64 << 10);
        assert_eq!(region_size_for(4 << 40, 0), 128 << 10);
        assert!((64u64 << 40).div_ceil(region_size_for(64 << 40, 0)) <= MAX_REGIONS);
        assert_eq!(region_size_for(MIB, 4096), 4096);
    }

    #[test]
    fn regions_of_covers_partial_regions() {
        let h = BitmapHeader::new(MIB, 0, 0);
        assert_eq!(h.regions_of(0, 1), 0..1);
        assert_eq!(h.regions_of(65535, 65537), 0..2);
        assert_eq!(h.regions_of(65536, 131072), 1..2);
        assert_eq!(h.regions_of(5, 5), 0..0);
        assert_eq!(h.regions_within(1, 3 * 65536 + 5), 1..3);
        assert_eq!(h.regions_within(65536, 2 * 65536), 1..2);
        assert!(h.regions_within(5, 65535).is_empty());
    }
}
