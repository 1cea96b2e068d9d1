//! Partition styles: GPT (one partition of mirrorvol's type GUID), MBR (one
//! primary partition at 1 MiB) or raw (the whole disk). Tables are written
//! with the gptman and mbrman crates.

use std::fmt;
use std::io::{self, Seek, SeekFrom};
use std::str::FromStr;

use gptman::{GPT, GPTHeader, GPTPartitionEntry};
use mbrman::{MBR, MBRPartitionEntry};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::layout::{DATA_OFFSET, MIN_DATA_SIZE, TAIL_SIZE};
use crate::MIB;
use crate::disk::{Disk, DiskCursor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    Gpt,
    Mbr,
    Raw,
}

impl fmt::Display for Style {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Style::Gpt => "gpt",
            Style::Mbr => "mbr",
            Style::Raw => "raw",
        })
    }
}

impl FromStr for Style {
    type Err = String;
    fn from_str(s: &str) -> Result<Style, String> {
        match s {
            "gpt" => Ok(Style::Gpt),
            "mbr" => Ok(Style::Mbr),
            "raw" => Ok(Style::Raw),
            _ => Err(format!(
                "unknown partition style {s:?}: use gpt, mbr or raw"
            )),
        }
    }
}

/// mirrorvol's own GPT partition type, generated once at random for this
/// project: `24BE5091-CE43-4512-9703-D3C6F3C42054`. `sfdisk -d` shows it as
/// the `type=` of the partition; it is how `find_member` recognizes our
/// partition without reading its contents.
pub const MIRRORVOL_GPT_TYPE: Uuid = Uuid::from_u128(0x24be5091_ce43_4512_9703_d3c6f3c42054);

/// The MBR partition type we write: 0xDA, "non-FS data". It is not ours
/// alone, so an MBR member is only trusted once its label decodes.
pub const MBR_TYPE: u8 = 0xDA;

/// The GPT partition name.
pub const GPT_NAME: &str = "mirrorvol";

/// Where the member area starts on GPT and MBR disks: 1 MiB, as every
/// partitioning tool aligns today.
pub const MEMBER_START: u64 = MIB;

/// The smallest member area with a layout (see [`Layout::for_member`](super::layout::Layout::for_member)):
/// metadata, the smallest data area, its checksum MiB and the tail.
pub const MIN_MEMBER_SIZE: u64 = DATA_OFFSET + MIN_DATA_SIZE + MIB + TAIL_SIZE;

/// The MBR protective partition type of GPT disks: never ours.
const MBR_PROTECTIVE: u8 = 0xEE;
/// Bytes of a GPT partition entry array with the usual 128 entries.
const GPT_ARRAY_BYTES: u64 = 128 * 128;
/// Partition entry arrays larger than this are refused when reading, so that
/// a crafted header cannot make us allocate without bound.
const GPT_MAX_ENTRIES: u32 = 4096;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionError {
    #[error(
        "the disk ({size} bytes) is too small for a mirrorvol member with style {style}: \
         it needs at least {min} bytes ({} MiB)", min.div_ceil(MIB)
    )]
    TooSmall { size: u64, style: Style, min: u64 },
    #[error(
        "the disk ({size} bytes) is larger than 2 TiB, which an MBR partition table \
         cannot address; use --style gpt"
    )]
    TooLargeForMbr { size: u64 },
    #[error("sector size {0} is not supported (use 512 or 4096)")]
    SectorSize(u32),
    #[error("cannot write the GPT: {0}")]
    Gpt(#[source] gptman::Error),
    #[error("cannot write the MBR: {0}")]
    Mbr(#[source] mbrman::Error),
    #[error("cannot read or write the partition table at offset {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("the partition table is damaged: {0}")]
    Damaged(String),
}

fn io_at(offset: u64) -> impl FnOnce(io::Error) -> PartitionError {
    move |source| PartitionError::Io { offset, source }
}

/// Where the member area of a disk of `size` bytes and `sector_size`-byte
/// sectors lies with `style`: `(member_offset, member_size)` in bytes, the
/// size in whole MiB. Nothing is written; [`write_table`] puts it there.
pub fn member_for(size: u64, sector_size: u32, style: Style) -> Result<(u64, u64), PartitionError> {
    let ss = u64::from(sector_size);
    if !sector_size.is_power_of_two() || !(512..=4096).contains(&sector_size) {
        return Err(PartitionError::SectorSize(sector_size));
    }
    let sectors = size / ss;
    let (offset, end, min) = match style {
        Style::Raw => (0, size, MIN_MEMBER_SIZE),
        Style::Mbr => {
            // Start and length of an MBR partition are 32-bit sector counts.
            if sectors > u64::from(u32::MAX) {
                return Err(PartitionError::TooLargeForMbr { size });
            }
            (MEMBER_START, sectors * ss, MEMBER_START + MIN_MEMBER_SIZE)
        }
        Style::Gpt => {
            // The backup header and entry array take the last sectors.
            let trailer = (GPT_ARRAY_BYTES / ss + 1) * ss;
            let end = (sectors * ss).saturating_sub(trailer);
            (MEMBER_START, end, MEMBER_START + MIN_MEMBER_SIZE + trailer)
        }
    };
    let member_size = end.saturating_sub(offset) / MIB * MIB;
    if member_size < MIN_MEMBER_SIZE {
        return Err(PartitionError::TooSmall { size, style, min });
    }
    Ok((offset, member_size))
}

/// Writes a fresh partition table of `style` with one member partition and
/// returns `(member_offset, member_size)` in bytes (the size in whole MiB).
///
/// First zeroes the first and the last MiB of the disk, so that no older
/// table, label or filesystem signature outlives the new table there. Those
/// ranges only hold tables and the head and tail of the member area; the data
/// area is left alone.
pub fn write_table(
    disk: &dyn Disk,
    style: Style,
    disk_guid: Uuid,
) -> Result<(u64, u64), PartitionError> {
    let size = disk.size();
    let ss = disk.sector_size();
    let (offset, member_size) = member_for(size, ss, style)?;
    let wipe = MIB.min(size);
    disk.write_zeroes(0, wipe).map_err(io_at(0))?;
    disk.write_zeroes(size - wipe, wipe)
        .map_err(io_at(size - wipe))?;
    let mut cursor = DiskCursor::new(disk);
    let ss = u64::from(ss);
    match style {
        Style::Raw => {}
        Style::Gpt => {
            let mut gpt = GPT::new_from(&mut cursor, ss, disk_guid.to_bytes_le())
                .map_err(PartitionError::Gpt)?;
            gpt[1] = GPTPartitionEntry {
                partition_type_guid: MIRRORVOL_GPT_TYPE.to_bytes_le(),
                unique_partition_guid: Uuid::new_v4().to_bytes_le(),
                starting_lba: offset / ss,
                ending_lba: (offset + member_size) / ss - 1,
                attribute_bits: 0,
                partition_name: GPT_NAME.into(),
            };
            gpt.write_into(&mut cursor).map_err(PartitionError::Gpt)?;
            GPT::write_protective_mbr_into(&mut cursor, ss).map_err(PartitionError::Gpt)?;
        }
        Style::Mbr => {
            let signature: [u8; 4] = disk_guid.as_bytes()[..4].try_into().expect("4 bytes");
            let mut mbr =
                MBR::new_from(&mut cursor, ss as u32, signature).map_err(PartitionError::Mbr)?;
            // member_for checked that the disk's sector count fits 32 bits.
            mbr[1] = MBRPartitionEntry {
                boot: mbrman::BOOT_INACTIVE,
                first_chs: mbrman::CHS::empty(),
                sys: MBR_TYPE,
                last_chs: mbrman::CHS::empty(),
                starting_lba: (offset / ss) as u32,
                sectors: (member_size / ss) as u32,
            };
            mbr.write_into(&mut cursor).map_err(PartitionError::Mbr)?;
        }
    }
    disk.flush().map_err(io_at(0))?;
    Ok((offset, member_size))
}

/// Finds the mirrorvol member partition: a GPT partition of
/// [`MIRRORVOL_GPT_TYPE`] (from the primary GPT, or the backup when the
/// primary is damaged), else a primary MBR partition of type 0xDA. Returns
/// `(style, offset, size)` in bytes, the size as the table says. `None` when
/// neither is there: the caller then tries a raw member at offset 0.
///
/// Garbage never panics: headers are checked before gptman is let near them,
/// and an MBR is parsed by hand (its four primary entries are all we need).
pub fn find_member(disk: &dyn Disk) -> Result<Option<(Style, u64, u64)>, PartitionError> {
    if let Some(partitions) = read_gpt(disk)? {
        let ss = u64::from(disk.sector_size());
        let ours = MIRRORVOL_GPT_TYPE.to_bytes_le();
        let Some(p) = partitions.iter().find(|p| p.partition_type_guid == ours) else {
            return Ok(None);
        };
        let extent = p
            .ending_lba
            .checked_sub(p.starting_lba)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(ss))
            .zip(p.starting_lba.checked_mul(ss))
            .filter(|&(len, start)| start.checked_add(len).is_some_and(|e| e <= disk.size()));
        return match extent {
            Some((len, start)) => Ok(Some((Style::Gpt, start, len))),
            None => Err(PartitionError::Damaged(format!(
                "the mirrorvol GPT partition (sectors {}..={}) does not fit the disk",
                p.starting_lba, p.ending_lba
            ))),
        };
    }
    find_mbr_member(disk)
}

/// The partition entries of the primary GPT, else of the backup GPT; `None`
/// when neither header is valid.
fn read_gpt(disk: &dyn Disk) -> Result<Option<Vec<GPTPartitionEntry>>, PartitionError> {
    let ss = u64::from(disk.sector_size());
    let sectors = disk.size() / ss;
    if sectors < 3 {
        return Ok(None);
    }
    for lba in [1, sectors - 1] {
        let at = lba * ss;
        let mut sig = [0u8; 8];
        disk.read_at(&mut sig, at).map_err(io_at(at))?;
        if &sig != b"EFI PART" {
            continue;
        }
        let mut cursor = DiskCursor::new(disk);
        cursor.seek(SeekFrom::Start(at)).map_err(io_at(at))?;
        // Checks signature, revision, header size and header crc.
        let Ok(header) = GPTHeader::read_from(&mut cursor) else {
            continue;
        };
        // gptman trusts these fields (it allocates and asserts on them); a
        // header with a valid crc can still carry any values.
        let array_end = u64::from(header.number_of_partition_entries)
            .checked_mul(128)
            .and_then(|n| n.checked_add(header.partition_entry_lba.checked_mul(ss)?));
        if header.size_of_partition_entry != 128
            || header.number_of_partition_entries == 0
            || header.number_of_partition_entries > GPT_MAX_ENTRIES
            || array_end.is_none_or(|end| end > disk.size())
        {
            continue;
        }
        if let Ok(partitions) = header.read_partitions(&mut cursor, ss) {
            return Ok(Some(partitions));
        }
    }
    Ok(None)
}

fn find_mbr_member(disk: &dyn Disk) -> Result<Option<(Style, u64, u64)>, PartitionError> {
    if disk.size() < 512 {
        return Ok(None);
    }
    let mut sector = [0u8; 512];
    disk.read_at(&mut sector, 0).map_err(io_at(0))?;
    if sector[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let ss = u64::from(disk.sector_size());
    for entry in sector[446..510].chunks_exact(16) {
        let sys = entry[4];
        let start = u64::from(u32::from_le_bytes(entry[8..12].try_into().expect("4")));
        let count = u64::from(u32::from_le_bytes(entry[12..16].try_into().expect("4")));
        if sys != MBR_TYPE || sys == MBR_PROTECTIVE || count == 0 || start == 0 {
            continue;
        }
        let (offset, len) = (start * ss, count * ss);
        if offset + len > disk.size() {
            return Err(PartitionError::Damaged(format!(
                "the MBR partition of type 0xda (sectors {start}+{count}) does not fit the disk"
            )));
        }
        return Ok(Some((Style::Mbr, offset, len)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;
    use crate::disk::MemDisk;
    use crate::format::Layout;
    use crate::format::test_tools::{run, system_tool};

    const DISK: u64 = 64 * MIB;

    #[test]
    fn min_member_size_is_the_smallest_with_a_layout() {
        assert!(Layout::for_member(0, MIN_MEMBER_SIZE).is_some());
        assert!(Layout::for_member(0, MIN_MEMBER_SIZE - MIB).is_none());
    }

    #[test]
    fn each_style_writes_a_table_that_find_member_reads_back() {
        for ss in [512, 4096] {
            for style in [Style::Gpt, Style::Mbr] {
                let disk = MemDisk::with_sector_size(DISK, ss);
                let (offset, size) = write_table(&disk, style, Uuid::new_v4()).unwrap();
                assert_eq!(offset, MIB);
                assert_eq!(size % MIB, 0);
                assert!(offset + size <= DISK);
                assert_eq!(find_member(&disk).unwrap(), Some((style, offset, size)));
            }
            let disk = MemDisk::with_sector_size(DISK + 4096, ss);
            assert_eq!(
                write_table(&disk, Style::Raw, Uuid::nil()).unwrap(),
                (0, DISK)
            );
            assert_eq!(find_member(&disk).unwrap(), None);
        }
    }

    #[test]
    fn gpt_and_mbr_members_of_same_disk_differ_by_at_most_one_mib() {
        let (_, gpt) = member_for(DISK, 512, Style::Gpt).unwrap();
        let (_, mbr) = member_for(DISK, 512, Style::Mbr).unwrap();
        assert_eq!(mbr, DISK - MIB);
        assert_eq!(gpt, DISK - 2 * MIB);
    }

    #[test]
    fn mbr_refuses_disks_over_2_tib() {
        let limit = u64::from(u32::MAX) * 512;
        assert!(member_for(limit, 512, Style::Mbr).is_ok());
        let err = member_for(limit + 512, 512, Style::Mbr).unwrap_err();
        assert!(matches!(err, PartitionError::TooLargeForMbr { .. }));
        assert!(err.to_string().contains("use --style gpt"), "{err}");
        assert!(member_for(limit + 512, 512, Style::Gpt).is_ok());
    }

    #[test]
    fn too_small_disks_are_refused_with_the_minimum() {
        for style in [Style::Raw, Style::Gpt, Style::Mbr] {
            let err = member_for(14 * MIB - 1, 512, style).unwrap_err();
            let PartitionError::TooSmall { min, .. } = err else {
                panic!("{err}")
            };
            assert!(member_for(min, 512, style).is_ok(), "{style}");
            assert!(member_for(min - 512, 512, style).is_err(), "{style}");
        }
        let disk = MemDisk::new(3 * MIB);
        assert!(write_table(&disk, Style::Gpt, Uuid::nil()).is_err());
        assert!(member_for(DISK, 1000, Style::Raw).is_err());
    }

    #[test]
    fn a_damaged_primary_gpt_is_read_from_the_backup() {
        let disk = MemDisk::new(DISK);
        let (offset, size) = write_table(&disk, Style::Gpt, Uuid::new_v4()).unwrap();
        disk.write_at(&[0xFF; 64], 512 + 24).unwrap();
        assert_eq!(
            find_member(&disk).unwrap(),
            Some((Style::Gpt, offset, size))
        );
        // The primary's entry array damaged instead of its header.
        let disk = MemDisk::new(DISK);
        write_table(&disk, Style::Gpt, Uuid::new_v4()).unwrap();
        disk.write_at(&[0xFF; 64], 1024 + 40).unwrap();
        assert_eq!(
            find_member(&disk).unwrap(),
            Some((Style::Gpt, offset, size))
        );
    }

    #[test]
    fn a_protective_mbr_alone_is_not_a_member() {
        let disk = MemDisk::new(DISK);
        write_table(&disk, Style::Gpt, Uuid::new_v4()).unwrap();
        disk.write_zeroes(512, 512).unwrap();
        disk.write_zeroes(DISK - 512, 512).unwrap();
        assert_eq!(find_member(&disk).unwrap(), None);
    }

    #[test]
    fn a_gpt_header_with_a_valid_crc_and_absurd_fields_is_ignored() {
        let disk = MemDisk::new(DISK);
        let mut cursor = DiskCursor::new(&disk);
        let mut header = GPTHeader::new_from(&mut cursor, 512, [1; 16]).unwrap();
        for (entries, lba) in [(u32::MAX, 2), (128, u64::MAX / 4), (0, 2)] {
            header.number_of_partition_entries = entries;
            header.partition_entry_lba = lba;
            let mut h = header.clone();
            h.update_crc32_checksum();
            write_header_only(&disk, &h);
            assert!(find_member(&disk).is_ok());
        }
    }

    /// Writes a GPT header (92 bytes, little-endian) at LBA 1, sealed with its crc.
    fn write_header_only(disk: &MemDisk, h: &GPTHeader) {
        let mut b = Vec::new();
        b.extend_from_slice(&h.signature);
        b.extend_from_slice(&h.revision);
        b.extend_from_slice(&h.header_size.to_le_bytes());
        b.extend_from_slice(&h.crc32_checksum.to_le_bytes());
        b.extend_from_slice(&h.reserved);
        for v in [
            h.primary_lba,
            h.backup_lba,
            h.first_usable_lba,
            h.last_usable_lba,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&h.disk_guid);
        b.extend_from_slice(&h.partition_entry_lba.to_le_bytes());
        b.extend_from_slice(&h.number_of_partition_entries.to_le_bytes());
        b.extend_from_slice(&h.size_of_partition_entry.to_le_bytes());
        b.extend_from_slice(&h.partition_entry_array_crc32.to_le_bytes());
        disk.write_at(&b, 512).unwrap();
        let mut cursor = DiskCursor::new(disk);
        cursor.seek(SeekFrom::Start(512)).unwrap();
        assert!(
            GPTHeader::read_from(&mut cursor).is_ok(),
            "header is sealed"
        );
    }

    #[test]
    fn garbage_never_panics_find_member() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..200 {
            let disk = MemDisk::new(2 * MIB);
            let mut junk = vec![0u8; 64 * 1024];
            for b in junk.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            if round % 2 == 0 {
                junk[510] = 0x55;
                junk[511] = 0xAA;
                junk[446 + 4] = MBR_TYPE;
                junk[512..520].copy_from_slice(b"EFI PART");
            }
            disk.write_at(&junk, 0).unwrap();
            let _ = find_member(&disk);
        }
        assert_eq!(find_member(&MemDisk::new(0)).unwrap(), None);
        assert_eq!(find_member(&MemDisk::new(100)).unwrap(), None);
    }

    /// Writes a table of `style` to a 64 MiB file and returns the file.
    fn table_in_file(style: Style) -> tempfile::NamedTempFile {
        let disk = MemDisk::new(DISK);
        write_table(&disk, style, Uuid::new_v4()).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), disk.snapshot()).unwrap();
        file
    }

    fn sfdisk_partition_line(dump: &str) -> &str {
        let lines: Vec<&str> = dump.lines().filter(|l| l.contains("start=")).collect();
        assert_eq!(lines.len(), 1, "one partition expected:\n{dump}");
        lines[0]
    }

    #[test]
    fn sfdisk_and_blkid_read_our_gpt() {
        let test = "sfdisk_and_blkid_read_our_gpt";
        let (Some(sfdisk), Some(blkid)) = (system_tool("sfdisk", test), system_tool("blkid", test))
        else {
            return;
        };
        let file = table_in_file(Style::Gpt);
        let path = file.path().as_os_str();
        let dump = run(&sfdisk, &[OsStr::new("-d"), path]);
        assert!(dump.contains("label: gpt"), "{dump}");
        let line = sfdisk_partition_line(&dump);
        assert!(line.contains("start=        2048,"), "{line}");
        let ty = MIRRORVOL_GPT_TYPE.to_string().to_uppercase();
        assert!(line.contains(&format!("type={ty}")), "{line}");
        assert!(line.contains("name=\"mirrorvol\""), "{line}");
        let size: u64 = line
            .split("size=")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(size * 512 % MIB, 0, "{line}");
        let verify = run(&sfdisk, &[OsStr::new("--verify"), path]);
        assert!(verify.contains("No errors detected"), "{verify}");
        let probe = run(
            &blkid,
            &[
                OsStr::new("-o"),
                OsStr::new("export"),
                OsStr::new("-p"),
                path,
            ],
        );
        assert!(probe.contains("PTTYPE=gpt"), "{probe}");
    }

    #[test]
    fn sfdisk_and_blkid_read_our_mbr() {
        let test = "sfdisk_and_blkid_read_our_mbr";
        let (Some(sfdisk), Some(blkid)) = (system_tool("sfdisk", test), system_tool("blkid", test))
        else {
            return;
        };
        let file = table_in_file(Style::Mbr);
        let path = file.path().as_os_str();
        let dump = run(&sfdisk, &[OsStr::new("-d"), path]);
        assert!(dump.contains("label: dos"), "{dump}");
        let line = sfdisk_partition_line(&dump);
        assert!(line.contains("start=        2048,"), "{line}");
        assert!(line.contains("type=da"), "{line}");
        let probe = run(
            &blkid,
            &[
                OsStr::new("-o"),
                OsStr::new("export"),
                OsStr::new("-p"),
                path,
            ],
        );
        assert!(probe.contains("PTTYPE=dos"), "{probe}");
    }
}
