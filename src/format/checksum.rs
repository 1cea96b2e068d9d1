//! Block checksums (format 5): the checksum area of a member
//! ([`super::Layout::checksum_offset`]) holds one crc32c per 4 KiB block of
//! the data area, in order, little-endian:
//!
//! ```text
//!  checksum area + 4 × k ── u32 LE: crc32c of data-area bytes
//!                            [4096 × k, 4096 × (k + 1))
//!                            0: unknown (never hashed, or not trusted)
//! ```
//!
//! The area is read and written in blocks of [`SUM_BLOCK`] bytes: one
//! covers [`BLOCKS_PER_SUM_BLOCK`] data blocks (4 MiB of data). It has no
//! header and no checksum of its own: a damaged entry shows as a block
//! whose data matches its twin on the other plexes but not its entry, and
//! is rewritten.
//!
//! What an entry means depends on the write-intent bitmap and the written
//! map of the same disk:
//! - in a region never written (written map bit clear) the entry means
//!   nothing: the block reads as zeroes and is not verified;
//! - in a written region whose write-intent bit is clear, a non-zero entry
//!   is the block's crc32c: entries are written lazily, and a region's bit
//!   is cleared only after its entries are durable (like dm-integrity's
//!   bitmap mode);
//! - in a region whose bit was set when the disk was opened (an unclean
//!   stop, or a plex out of sync) the entries are not trusted: they count
//!   as unknown until the region is rehashed (by the resync after a crash,
//!   or by `scrub --repair`).
//!
//! A block whose crc32c happens to be 0 is stored as 0 and so is never
//! verified (one block in 2^32).
//!
//! A disk formatted before format 5 has no valid entries; its area is
//! zeroed just before it is raised to format 5, and its written blocks are
//! unknown until written again or hashed by `scrub --repair`.

/// Bytes of data covered by one entry.
pub const DATA_BLOCK: u64 = super::layout::CHECKSUM_BLOCK;
/// Bytes of the checksum area read and written at once.
pub const SUM_BLOCK: u64 = 4096;
/// Entries in one [`SUM_BLOCK`].
pub const BLOCKS_PER_SUM_BLOCK: u64 = SUM_BLOCK / 4;
/// The entry of a block whose checksum is not known.
pub const UNKNOWN: u32 = 0;

/// The entry for one 4 KiB block of data.
pub fn sum(block: &[u8]) -> u32 {
    debug_assert_eq!(block.len() as u64, DATA_BLOCK);
    crc32c::crc32c(block)
}

/// The entry of a block of zeroes.
pub fn zero_sum() -> u32 {
    static ZERO: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| sum(&[0u8; DATA_BLOCK as usize]))
}

/// The entries of the whole blocks within `data`, which starts at byte
/// `offset` of a data area (or volume: plexes start block-aligned): the
/// offset of the first whole block and one entry per whole block.
pub fn sums_of(offset: u64, data: &[u8]) -> (u64, Vec<u32>) {
    let first = offset.next_multiple_of(DATA_BLOCK);
    let skip = (first - offset) as usize;
    if skip >= data.len() {
        return (first, Vec::new());
    }
    let sums = data[skip..]
        .chunks_exact(DATA_BLOCK as usize)
        .map(sum)
        .collect();
    (first, sums)
}

/// The whole blocks within `[offset, offset + len)`: first block offset and
/// count.
pub fn whole_blocks(offset: u64, len: u64) -> (u64, u64) {
    let first = offset.next_multiple_of(DATA_BLOCK);
    let end = (offset + len) / DATA_BLOCK * DATA_BLOCK;
    (first, end.saturating_sub(first) / DATA_BLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_blocks_get_entries() {
        let data = vec![7u8; 3 * 4096];
        let (first, sums) = sums_of(512, &data);
        assert_eq!(first, 4096);
        assert_eq!(sums.len(), 2);
        assert_eq!(sums[0], sum(&[7u8; 4096]));
        assert_eq!(whole_blocks(512, 3 * 4096), (4096, 2));
        assert_eq!(whole_blocks(0, 4095), (0, 0));
        assert_eq!(sums_of(100, &[0u8; 200]).1.len(), 0);
        assert_ne!(zero_sum(), UNKNOWN);
    }
}
