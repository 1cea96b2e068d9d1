//! Recognizes what a disk already holds, so `init` never overwrites a
//! partition table or filesystem without `--force`.

use std::io;

use super::Label;
use super::layout::LABEL_SIZE;
use super::partition;
use crate::disk::Disk;

/// Reads `len` bytes at `offset`, or `None` when they lie past the end of
/// the disk: a small disk simply cannot hold that signature.
fn bytes_at(disk: &dyn Disk, offset: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
    if offset
        .checked_add(len as u64)
        .is_none_or(|end| end > disk.size())
    {
        return Ok(None);
    }
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, offset)?;
    Ok(Some(buf))
}

fn has(disk: &dyn Disk, offset: u64, magic: &[u8]) -> io::Result<bool> {
    Ok(bytes_at(disk, offset, magic.len())?.is_some_and(|b| b == magic))
}

/// A short description of what `disk` already holds ("an ext4 filesystem"),
/// for `PATH holds <description>; use --force to overwrite it`. `None` when
/// nothing known is found (an all-zero disk, say).
pub fn probe(disk: &dyn Disk) -> io::Result<Option<String>> {
    let found = |s: &str| Ok(Some(s.to_string()));
    if let Some(d) = mirrorvol_label(disk)? {
        return Ok(Some(d));
    }
    let ss = u64::from(disk.sector_size());
    if has(disk, ss, b"EFI PART")? || has(disk, 512, b"EFI PART")? {
        return found("a GPT partition table");
    }
    if has(disk, 0, b"LUKS\xba\xbe")? {
        return found("a LUKS encrypted volume");
    }
    if has(disk, 0, b"XFSB")? {
        return found("an XFS filesystem");
    }
    const MD_MAGIC: [u8; 4] = 0xa92b_4efcu32.to_le_bytes();
    if has(disk, 4096, &MD_MAGIC)? {
        return found("an md RAID member (metadata 1.2)");
    }
    if has(disk, 0, &MD_MAGIC)? {
        return found("an md RAID member (metadata 1.1)");
    }
    for sector in 0..4 {
        if has(disk, sector * 512, b"LABELONE")? {
            return found("an LVM2 physical volume");
        }
    }
    if let Some(sb) = bytes_at(disk, 1024, 1024)?
        && sb[56..58] == [0x53, 0xEF]
    {
        return Ok(Some(ext_kind(&sb).to_string()));
    }
    if has(disk, 65536 + 64, b"_BHRfS_M")? {
        return found("a btrfs filesystem");
    }
    for page in [4096u64, 8192, 16384, 65536] {
        if has(disk, page - 10, b"SWAPSPACE2")? || has(disk, page - 10, b"SWAP-SPACE")? {
            return found("a swap area");
        }
    }
    if has(disk, 32769, b"CD001")? {
        return found("an ISO 9660 filesystem");
    }
    if let Some(boot) = bytes_at(disk, 0, 512)?
        && boot[510..512] == [0x55, 0xAA]
    {
        if &boot[54..57] == b"FAT" || &boot[82..85] == b"FAT" {
            return found("a FAT filesystem");
        }
        if &boot[3..8] == b"NTFS " {
            return found("an NTFS filesystem");
        }
        let used: Vec<u8> = boot[446..510].chunks_exact(16).map(|e| e[4]).collect();
        if used.contains(&0xEE) {
            return found("a GPT partition table");
        }
        if used.iter().any(|&t| t != 0) {
            return found("an MBR partition table");
        }
    }
    // md metadata 1.0 and 0.90 live near the end of the disk.
    let size = disk.size();
    if size >= 128 * 1024 {
        let v10 = (size & !4095) - 8192;
        let v090 = (size & !65535) - 65536;
        if has(disk, v10, &MD_MAGIC)? {
            return found("an md RAID member (metadata 1.0)");
        }
        if has(disk, v090, &MD_MAGIC)? {
            return found("an md RAID member (metadata 0.90)");
        }
    }
    Ok(None)
}

/// A mirrorvol label, raw at offset 0 or at the start of a member partition.
fn mirrorvol_label(disk: &dyn Disk) -> io::Result<Option<String>> {
    let mut places = vec![0];
    if let Ok(Some((_, offset, _))) = partition::find_member(disk) {
        places.push(offset);
    }
    for at in places {
        let Some(buf) = bytes_at(disk, at, LABEL_SIZE as usize)? else {
            continue;
        };
        if !Label::has_magic(&buf) {
            continue;
        }
        return Ok(Some(match Label::decode(&buf) {
            Ok(label) => format!("a mirrorvol label (group {})", label.group_uuid),
            Err(_) => "a damaged mirrorvol label".to_string(),
        }));
    }
    Ok(None)
}

/// ext2, ext3 or ext4, from the superblock's feature flags.
fn ext_kind(sb: &[u8]) -> &'static str {
    let word = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().expect("4 bytes"));
    let (compat, incompat, ro_compat) = (word(0x5C), word(0x60), word(0x64));
    // extents, 64bit, flex_bg, meta_bg csum...; huge_file, dir_nlink,
    // extra_isize, metadata_csum: features only ext4 has.
    const EXT4_INCOMPAT: u32 = 0x0040 | 0x0080 | 0x0200 | 0x2000 | 0x8000;
    const EXT4_RO_COMPAT: u32 = 0x0008 | 0x0020 | 0x0040 | 0x0400;
    if incompat & EXT4_INCOMPAT != 0 || ro_compat & EXT4_RO_COMPAT != 0 {
        "an ext4 filesystem"
    } else if compat & 0x0004 != 0 {
        "an ext3 filesystem"
    } else {
        "an ext2 filesystem"
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use uuid::Uuid;

    use super::*;
    use crate::MIB;
    use crate::disk::MemDisk;
    use crate::format::Style;
    use crate::format::ondisk::format_disk;
    use crate::format::partition::write_table;
    use crate::format::test_tools::{run, system_tool};

    fn with(at: u64, bytes: &[u8]) -> MemDisk {
        let disk = MemDisk::new(4 * MIB);
        disk.write_at(bytes, at).unwrap();
        disk
    }

    fn probed(disk: &MemDisk) -> String {
        probe(disk).unwrap().unwrap_or_default()
    }

    #[test]
    fn an_empty_or_tiny_disk_holds_nothing() {
        assert_eq!(probe(&MemDisk::new(4 * MIB)).unwrap(), None);
        assert_eq!(probe(&MemDisk::new(0)).unwrap(), None);
        assert_eq!(probe(&MemDisk::new(700)).unwrap(), None);
    }

    #[test]
    fn each_signature_is_named() {
        let md = 0xa92b_4efcu32.to_le_bytes();
        let cases: Vec<(MemDisk, &str)> = vec![
            (with(0, b"LUKS\xba\xbe"), "LUKS"),
            (with(0, b"XFSB"), "XFS"),
            (with(65536 + 64, b"_BHRfS_M"), "btrfs"),
            (with(4096 - 10, b"SWAPSPACE2"), "swap"),
            (with(4096 - 10, b"SWAP-SPACE"), "swap"),
            (with(1024, b"LABELONE"), "LVM2"),
            (with(4096, &md), "metadata 1.2"),
            (with(0, &md), "metadata 1.1"),
            (with(4 * MIB - 8192, &md), "metadata 1.0"),
            (with(32769, b"CD001"), "ISO 9660"),
            (with(1024 + 56, &[0x53, 0xEF]), "ext2"),
        ];
        for (disk, name) in cases {
            assert!(probed(&disk).contains(name), "{name}: {:?}", probe(&disk));
        }
    }

    #[test]
    fn ext_flavours_are_told_apart() {
        let disk = with(1024 + 56, &[0x53, 0xEF]);
        disk.write_at(&4u32.to_le_bytes(), 1024 + 0x5C).unwrap();
        assert_eq!(probed(&disk), "an ext3 filesystem");
        disk.write_at(&0x40u32.to_le_bytes(), 1024 + 0x60).unwrap();
        assert_eq!(probed(&disk), "an ext4 filesystem");
    }

    #[test]
    fn fat_is_recognized_before_a_generic_mbr() {
        let disk = with(510, &[0x55, 0xAA]);
        assert_eq!(probe(&disk).unwrap(), None, "signature alone is nothing");
        disk.write_at(b"FAT32   ", 82).unwrap();
        assert_eq!(probed(&disk), "a FAT filesystem");
        let disk = with(510, &[0x55, 0xAA]);
        disk.write_at(&[0x83], 446 + 4).unwrap();
        assert_eq!(probed(&disk), "an MBR partition table");
    }

    #[test]
    fn tables_and_mirrorvol_labels_are_named() {
        let disk = MemDisk::new(64 * MIB);
        write_table(&disk, Style::Gpt, Uuid::new_v4()).unwrap();
        assert_eq!(probed(&disk), "a GPT partition table");
        let disk = MemDisk::new(64 * MIB);
        write_table(&disk, Style::Mbr, Uuid::new_v4()).unwrap();
        assert_eq!(probed(&disk), "an MBR partition table");
        for style in [Style::Raw, Style::Gpt, Style::Mbr] {
            let disk = MemDisk::new(64 * MIB);
            let group = Uuid::new_v4();
            format_disk(&disk, style, Uuid::new_v4(), group).unwrap();
            assert_eq!(probed(&disk), format!("a mirrorvol label (group {group})"));
        }
    }

    #[test]
    fn a_real_ext4_filesystem_is_recognized() {
        let test = "a_real_ext4_filesystem_is_recognized";
        let Some(mkfs) = system_tool("mkfs.ext4", test) else {
            return;
        };
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(32 * MIB).unwrap();
        run(
            &mkfs,
            &[OsStr::new("-q"), OsStr::new("-F"), file.path().as_os_str()],
        );
        let disk = MemDisk::new(32 * MIB);
        disk.write_at(&std::fs::read(file.path()).unwrap(), 0)
            .unwrap();
        assert_eq!(probed(&disk), "an ext4 filesystem");
    }
}
