//! The written map of one disk (format 4): which regions of its data area
//! were ever written by a volume. A region whose bit is clear holds zeroes
//! on that disk wherever a plex lies over it: plexes are born zeroed
//! (`create`, `extend`) or filled by a resync that writes every region of
//! them, and a region's bit is durable before the first write to it is
//! submitted. So a resync, `add-mirror`, `repair` or hot-spare rebuild
//! copies only the regions some in-sync plex records as written, and
//! gives the target zeroes (the cheap way) elsewhere.
//!
//! It lives in the state area between the label and config slot A (see
//! [`super::state`]), from 64 KiB to 1 MiB of the member area, and is
//! encoded as the write-intent bitmap is ([`super::bitmap`]): a 4 KiB
//! header, then bit blocks of 4 KiB, bit `i` covering data-area bytes
//! `[i * W, (i + 1) * W)`:
//!
//! ```text
//!  member offset
//!  64 KiB  header                                           4 KiB
//!          0 magic "MVWRITTN"                        (8)
//!          8 map version, 1 (4), reserved, zero      (4)
//!         16 region size W in bytes                  (8)
//!         24 regions (bits in use)                   (8)
//!         32 reserved, zero                         (28)
//!         60 crc32c of bytes [0, 60)                 (4)
//!  68 KiB  bit blocks, 32768 regions each        up to 956 KiB
//!  1 MiB   (config slot A)
//! ```
//!
//! `W` is the group's region size, doubled until every region of the data
//! area has a bit (7 831 552 bits: 64 KiB regions cover 478 GiB, 1 MiB
//! regions 7.4 TiB). An all-zero header means the disk has no written map
//! (formatted before version 4): every region of it counts as written.
//! Bits are only set by writes and cleared after the region's zeroes are
//! durable on the disk, so a torn bit block leaves a bit either set or
//! not needed yet, as in the write-intent bitmap.

use super::bitmap::{BITMAP_BLOCK, BITS_PER_BLOCK, BitmapError, BitmapHeader, region_size_within};
use crate::MIB;

const KIB: u64 = 1024;

/// Offset of the written map from the start of the member area.
pub const WRITTEN_OFFSET: u64 = 64 * KIB;
/// Bytes of the written map's area (header and bit blocks).
pub const WRITTEN_SIZE: u64 = MIB - WRITTEN_OFFSET;
pub const WRITTEN_MAGIC: &[u8; 8] = b"MVWRITTN";
/// The most regions the area holds.
pub const MAX_WRITTEN_REGIONS: u64 = (WRITTEN_SIZE - BITMAP_BLOCK) / BITMAP_BLOCK * BITS_PER_BLOCK;

/// The header of a new written map over `data_size` bytes, with regions of
/// `wanted` bytes (0: the default) or larger.
pub fn new_header(data_size: u64, wanted: u64) -> BitmapHeader {
    let region_size = region_size_within(data_size, wanted, MAX_WRITTEN_REGIONS);
    BitmapHeader {
        region_size,
        regions: data_size.div_ceil(region_size),
        since: 0,
    }
}

pub fn encode(header: &BitmapHeader) -> Vec<u8> {
    header.encode_as(WRITTEN_MAGIC)
}

/// The header in `buf` (a 4 KiB block): `None` for an all-zero one.
pub fn decode(buf: &[u8]) -> Result<Option<BitmapHeader>, BitmapError> {
    BitmapHeader::decode_as(buf, WRITTEN_MAGIC, MAX_WRITTEN_REGIONS)
}

/// A disk's written map as stored: its header and its bit blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub header: BitmapHeader,
    pub bits: Vec<u8>,
}

impl Stored {
    /// Data-area bytes whose regions are marked written.
    pub fn written_bytes(&self, data_size: u64) -> u64 {
        self.bytes_within(0, data_size)
    }

    /// Bytes of data-area `[start, end)` whose regions are marked written.
    pub fn bytes_within(&self, start: u64, end: u64) -> u64 {
        bytes_within(&self.header, &self.bits, start, end)
    }
}

/// Bytes of data-area `[start, end)` whose regions are set in `bits` (a
/// map of `header`), counted a byte of bits at a time.
pub fn bytes_within(header: &BitmapHeader, bits: &[u8], start: u64, end: u64) -> u64 {
    let regions = header.regions_of(start, end);
    if regions.is_empty() {
        return 0;
    }
    let r = header.region_size;
    let mut set = 0u64;
    let mut i = regions.start;
    while i < regions.end {
        if i.is_multiple_of(8) && i + 8 <= regions.end {
            set += u64::from(bits[(i / 8) as usize].count_ones());
            i += 8;
        } else {
            set += u64::from(super::bitmap::bit(bits, i));
            i += 1;
        }
    }
    // The first and last regions count only their part inside.
    let mut bytes = set * r;
    let first = regions.start;
    let last = regions.end - 1;
    if super::bitmap::bit(bits, first) {
        bytes -= start - first * r;
    }
    if super::bitmap::bit(bits, last) {
        bytes -= (last + 1) * r - end.min((last + 1) * r);
    }
    bytes
}

/// Reads the written map of a disk with `layout`: `Empty` when it has none.
pub fn read(
    disk: &dyn crate::disk::Disk,
    layout: &super::Layout,
) -> std::io::Result<super::state::Read<Stored>> {
    use super::state::Read;
    let mut head = vec![0u8; BITMAP_BLOCK as usize];
    disk.read_at(&mut head, layout.written_offset())?;
    Ok(match decode(&head) {
        Ok(None) => Read::Empty,
        Ok(Some(h)) if h.regions == layout.data_size.div_ceil(h.region_size) => {
            let mut bits = vec![0u8; (h.blocks() * BITMAP_BLOCK) as usize];
            disk.read_at(&mut bits, layout.written_offset() + BITMAP_BLOCK)?;
            Read::Good(Stored { header: h, bits })
        }
        Ok(Some(_)) => Read::Damaged("its region count does not fit the data area"),
        Err(_) => Read::Damaged("its header does not decode"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_fits_its_area_and_round_trips() {
        assert_eq!(MAX_WRITTEN_REGIONS, 7_831_552);
        for (data, wanted, region) in [
            (MIB, MIB, MIB),
            (7u64 << 40, MIB, MIB),
            (8u64 << 40, MIB, 2 * MIB),
            (MIB, 0, 64 * KIB),
            (478 << 30, 0, 64 * KIB),
            (479 << 30, 0, 128 * KIB),
            (MIB, 4 * MIB, 4 * MIB),
        ] {
            let h = new_header(data, wanted);
            assert_eq!(h.region_size, region, "{data} bytes");
            assert!(h.blocks() * BITMAP_BLOCK + BITMAP_BLOCK <= WRITTEN_SIZE);
            assert_eq!(decode(&encode(&h)).unwrap(), Some(h));
        }
        assert_eq!(decode(&[0u8; 4096]).unwrap(), None);
        // Counting: regions 1, 3..=12 set; parts of the edge ones.
        let h = new_header(MIB, 0);
        let mut bits = vec![0u8; 4096];
        for i in [1u64, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] {
            super::super::bitmap::set_bit(&mut bits, i, true);
        }
        let r = 64 * KIB;
        assert_eq!(bytes_within(&h, &bits, 0, MIB), 11 * r);
        assert_eq!(bytes_within(&h, &bits, r + 100, 4 * r), (r - 100) + r);
        assert_eq!(bytes_within(&h, &bits, 3 * r, 12 * r + 10), 9 * r + 10);
        assert_eq!(bytes_within(&h, &bits, 5, 5), 0);
        // A write-intent bitmap's header is not a written map's.
        let h = new_header(MIB, 0);
        assert!(decode(&h.encode()).is_err());
    }
}
