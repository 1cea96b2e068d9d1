//! Reading and writing one disk's metadata: partition table, both labels,
//! both config slots. No policy: which config is current is the group's call.

use std::io;

use uuid::Uuid;

use super::label::LabelError;
use super::layout::{CONFIG_SLOT_SIZE, LABEL_SIZE, TAIL_SIZE};
use super::partition::{self, MEMBER_START, MIN_MEMBER_SIZE, PartitionError};
use super::slot::{ConfigSlot, SlotError};
use super::state::{CLAIM_OFFSET, ClaimBlock, GENERATION_OFFSET, Generation, Read, STATE_BLOCK};
use super::{FORMAT_VERSION, Label, Layout, Style};
use crate::MIB;
use crate::disk::Disk;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("cannot {op} at offset {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "the disk ({size} bytes) is too small: style {style} needs at least {min} bytes \
         ({} MiB, of which {} MiB member area)", min.div_ceil(MIB), MIN_MEMBER_SIZE / MIB
    )]
    TooSmall { size: u64, style: Style, min: u64 },
    #[error("its labels are damaged")]
    Damaged,
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Label(#[from] LabelError),
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> FormatError {
    move |source| FormatError::Io { op, offset, source }
}

fn read(disk: &dyn Disk, op: &'static str, offset: u64, len: u64) -> Result<Vec<u8>, FormatError> {
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, offset).map_err(io_err(op, offset))?;
    Ok(buf)
}

/// Formats one disk: writes the partition table, zeroes the metadata areas
/// (labels, config slots, bitmaps, tail), writes both labels and flushes.
/// The data and checksum areas are left alone. Refuses, before writing
/// anything, a disk too small for a member.
pub fn format_disk(
    disk: &dyn Disk,
    style: Style,
    disk_uuid: Uuid,
    group_uuid: Uuid,
) -> Result<Label, FormatError> {
    let size = disk.size();
    let too_small = |min| FormatError::TooSmall { size, style, min };
    let (offset, member_size) = match partition::member_for(size, disk.sector_size(), style) {
        Err(PartitionError::TooSmall { min, .. }) => return Err(too_small(min)),
        other => other?,
    };
    let min = size - member_size + MIN_MEMBER_SIZE;
    let layout = Layout::for_member(offset, member_size).ok_or_else(|| too_small(min))?;
    let written = partition::write_table(disk, style, disk_uuid)?;
    debug_assert_eq!(written, (offset, member_size));
    let head = layout.primary_label_offset() + LABEL_SIZE;
    disk.write_zeroes(head, layout.data_offset() - head)
        .map_err(io_err("zero the metadata area", head))?;
    let tail = layout.end() - TAIL_SIZE;
    disk.write_zeroes(tail, TAIL_SIZE)
        .map_err(io_err("zero the tail", tail))?;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let label = Label {
        version: FORMAT_VERSION,
        disk_uuid,
        group_uuid,
        style,
        layout,
        created,
    };
    write_labels(disk, &label)?;
    Ok(label)
}

/// Writes both label copies and flushes; also heals a damaged copy.
pub fn write_labels(disk: &dyn Disk, label: &Label) -> Result<(), FormatError> {
    let buf = label.encode();
    for at in [
        label.layout.primary_label_offset(),
        label.layout.backup_label_offset(),
    ] {
        disk.write_at(&buf, at)
            .map_err(io_err("write a label", at))?;
    }
    disk.flush().map_err(io_err("flush the labels", 0))
}

/// Zeroes both label copies: the disk is no mirrorvol disk any more (its
/// config slots and data stay, unreadable without a label).
pub fn wipe_labels(
    disk: &dyn Disk,
    layout: &crate::format::layout::Layout,
) -> Result<(), FormatError> {
    let zeros = vec![0u8; crate::format::layout::LABEL_SIZE as usize];
    for at in [layout.primary_label_offset(), layout.backup_label_offset()] {
        disk.write_at(&zeros, at)
            .map_err(io_err("wipe a label", at))?;
    }
    disk.flush().map_err(io_err("flush the wiped labels", 0))
}

/// A label as read from a disk, and which of its copies are good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRead {
    pub label: Label,
    pub primary_ok: bool,
    /// False too when the backup decodes but disagrees with the primary.
    pub backup_ok: bool,
}

/// What one label position holds.
enum Copy {
    /// Nothing there, or the position lies outside the disk.
    Absent,
    Bad(LabelError),
    Good(Label),
}

fn read_copy(disk: &dyn Disk, at: u64) -> Result<Copy, FormatError> {
    if at
        .checked_add(LABEL_SIZE)
        .is_none_or(|end| end > disk.size())
    {
        return Ok(Copy::Absent);
    }
    let buf = read(disk, "read a label", at, LABEL_SIZE)?;
    Ok(match Label::decode(&buf) {
        Ok(label) if label.layout.end() <= disk.size() => Copy::Good(label),
        Ok(_) => Copy::Bad(LabelError::Inconsistent("member area ends past the disk")),
        Err(LabelError::NoMagic) => Copy::Absent,
        Err(e) => Copy::Bad(e),
    })
}

/// Reads the label of a disk. The member is found through the partition
/// table, else taken as raw at offset 0; a label at 1 MiB is found even when
/// the table is gone. The primary copy is preferred; the backup stands in
/// when the primary is damaged.
///
/// `Ok(None)`: no label copy anywhere, not a mirrorvol disk. An error
/// [`FormatError::Damaged`] (or the newer-version error) when label magic is
/// there, or the GPT partition is ours, but no copy decodes.
pub fn read_label(disk: &dyn Disk) -> Result<Option<LabelRead>, FormatError> {
    let size = disk.size();
    let table = match partition::find_member(disk) {
        // A disk that does not answer its partition table's reads does not
        // answer the label's either: its deadline is paid once, not twice.
        Err(PartitionError::Io { offset, source }) if source.kind() == io::ErrorKind::TimedOut => {
            return Err(FormatError::Io {
                op: "read the partition table",
                offset,
                source,
            });
        }
        table => table,
    };
    let ours_by_table = matches!(table, Ok(Some((Style::Gpt, _, _))));
    // (position, is_primary): where a label copy may be.
    let mut places = Vec::new();
    if let Ok(Some((_, offset, len))) = table {
        places.push((offset, true));
        if let Some(end) = offset.checked_add(len / MIB * MIB) {
            places.push((end.saturating_sub(LABEL_SIZE), false));
        }
    }
    places.push((0, true));
    places.push(((size / MIB * MIB).saturating_sub(LABEL_SIZE), false));
    places.push((MEMBER_START, true));

    let mut damage = None;
    for (at, primary) in places {
        match read_copy(disk, at)? {
            Copy::Absent => continue,
            Copy::Bad(e) => {
                damage.get_or_insert(e);
            }
            Copy::Good(label) => {
                // A copy only counts where its own layout puts it.
                let layout = label.layout;
                let expected = if primary {
                    layout.primary_label_offset()
                } else {
                    layout.backup_label_offset()
                };
                if expected != at {
                    damage.get_or_insert(LabelError::Inconsistent("label is out of place"));
                    continue;
                }
                return read_both(disk, layout).map(Some);
            }
        }
    }
    match (damage, table) {
        (Some(LabelError::NewerVersion(v)), _) => Err(LabelError::NewerVersion(v).into()),
        (Some(_), _) => Err(FormatError::Damaged),
        (None, _) if ours_by_table => Err(FormatError::Damaged),
        (None, Err(e)) => Err(e.into()),
        (None, Ok(_)) => Ok(None),
    }
}

/// Both copies of a label whose layout one good copy gave.
fn read_both(disk: &dyn Disk, layout: Layout) -> Result<LabelRead, FormatError> {
    let good = |c: Copy| match c {
        Copy::Good(l) => Some(l),
        _ => None,
    };
    let primary =
        good(read_copy(disk, layout.primary_label_offset())?).filter(|l| l.layout == layout);
    let backup =
        good(read_copy(disk, layout.backup_label_offset())?).filter(|l| l.layout == layout);
    Ok(match (primary, backup) {
        (Some(p), b) => LabelRead {
            backup_ok: b.as_ref() == Some(&p),
            label: p,
            primary_ok: true,
        },
        (None, Some(b)) => LabelRead {
            label: b,
            primary_ok: false,
            backup_ok: true,
        },
        (None, None) => return Err(FormatError::Damaged),
    })
}

/// Reads the claim block of a member (format 3; all zero before).
pub fn read_claim(disk: &dyn Disk, layout: &Layout) -> Result<Read<ClaimBlock>, FormatError> {
    let at = layout.member_offset + CLAIM_OFFSET;
    let mut buf = vec![0u8; STATE_BLOCK as usize];
    disk.read_fresh(&mut buf, at)
        .map_err(io_err("read the claim block", at))?;
    Ok(ClaimBlock::decode(&buf))
}

/// Writes the claim block of a member and flushes it.
pub fn write_claim(disk: &dyn Disk, layout: &Layout, claim: &ClaimBlock) -> io::Result<()> {
    let at = layout.member_offset + CLAIM_OFFSET;
    disk.write_all_then_flush(&[(at, &claim.encode())], true)
}

/// Reads the newest data generation of a member (format 3; `Empty` before).
pub fn read_generation(disk: &dyn Disk, layout: &Layout) -> Result<Read<Generation>, FormatError> {
    let at = layout.member_offset + GENERATION_OFFSET;
    let buf = read(disk, "read the generation slots", at, 2 * STATE_BLOCK)?;
    let (a, b) = buf.split_at(STATE_BLOCK as usize);
    Ok(Generation::newest(a, b))
}

/// Writes a data generation into its slot and flushes it.
pub fn write_generation(disk: &dyn Disk, layout: &Layout, g: &Generation) -> io::Result<()> {
    let at = layout.member_offset + GENERATION_OFFSET + g.slot() * STATE_BLOCK;
    disk.write_all_then_flush(&[(at, &g.encode())], true)
}

/// Both config slots of a disk: which decode, and the newest valid one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRead {
    /// The valid slot with the highest seqno, and its index (0 = A, 1 = B).
    pub newest: Option<(usize, ConfigSlot)>,
    /// Which slots hold a valid config of this label's group.
    pub valid: [bool; 2],
    /// Which slots were never written (all zero): not valid, yet not damaged.
    pub empty: [bool; 2],
}

/// Bytes of a config slot read first: its header and a text of up to
/// 128 KiB, which a config fits in unless it has hundreds of volumes (its
/// history is kept under 64 KiB).
const SLOT_FIRST_READ: u64 = 128 << 10;

/// A config slot at `at`: its first 128 KiB, and the rest of what its
/// header says the text holds when that is longer (a whole 1 MiB slot read
/// each time costs an offline command a few milliseconds per disk).
fn read_slot(disk: &dyn Disk, at: u64) -> Result<Vec<u8>, FormatError> {
    let first = SLOT_FIRST_READ.min(CONFIG_SLOT_SIZE);
    let mut buf = read(disk, "read a config slot", at, first)?;
    let need = (super::slot::SLOT_HEADER_LEN as u64)
        .saturating_add(super::slot::text_len(&buf).unwrap_or(0))
        .min(CONFIG_SLOT_SIZE);
    if need > first {
        let rest = need.next_multiple_of(4096).min(CONFIG_SLOT_SIZE) - first;
        buf.extend(read(disk, "read a config slot", at + first, rest)?);
    }
    Ok(buf)
}

/// Reads both config slots. A slot is valid when it decodes and belongs to
/// the label's group; empty and damaged slots are simply not valid.
pub fn read_config(disk: &dyn Disk, label: &Label) -> Result<SlotRead, FormatError> {
    let mut read_slots = SlotRead {
        newest: None,
        valid: [false; 2],
        empty: [false; 2],
    };
    for i in 0..2 {
        let at = label.layout.config_slot_offset(i);
        let buf = read_slot(disk, at)?;
        let slot = match ConfigSlot::decode(&buf) {
            Ok(slot) => slot,
            Err(SlotError::Empty) => {
                read_slots.empty[i] = true;
                continue;
            }
            Err(_) => continue,
        };
        if slot.group_uuid != label.group_uuid {
            continue;
        }
        read_slots.valid[i] = true;
        if read_slots
            .newest
            .as_ref()
            .is_none_or(|(_, n)| slot.seqno > n.seqno)
        {
            read_slots.newest = Some((i, slot));
        }
    }
    Ok(read_slots)
}

/// Writes a config: reads the slots, then writes to the one that does not
/// hold the newest valid config (slot 0 when none is valid), so that a torn
/// write leaves the last good config intact. Returns the slot written.
pub fn write_config(
    disk: &dyn Disk,
    label: &Label,
    seqno: u64,
    text: &[u8],
) -> Result<usize, FormatError> {
    let slots = read_config(disk, label)?;
    let slot = match slots.newest {
        Some((newest, _)) => 1 - newest,
        None => 0,
    };
    write_config_slot(disk, label, slot, seqno, text)?;
    Ok(slot)
}

/// Writes a config into slot `slot` (0 or 1) and flushes. Prefer
/// [`write_config`], which picks the slot that is safe to overwrite.
pub fn write_config_slot(
    disk: &dyn Disk,
    label: &Label,
    slot: usize,
    seqno: u64,
    text: &[u8],
) -> Result<(), FormatError> {
    assert!(slot < 2, "config slot index {slot}");
    let buf = ConfigSlot {
        seqno,
        group_uuid: label.group_uuid,
        text: text.to_vec(),
    }
    .encode(CONFIG_SLOT_SIZE as usize)?;
    let at = label.layout.config_slot_offset(slot);
    disk.write_at(&buf, at)
        .map_err(io_err("write a config slot", at))?;
    disk.flush().map_err(io_err("flush a config slot", at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;

    const DISK: u64 = 64 * MIB;

    fn formatted(style: Style) -> (MemDisk, Label) {
        let disk = MemDisk::new(DISK);
        let label = format_disk(&disk, style, Uuid::new_v4(), Uuid::new_v4()).unwrap();
        (disk, label)
    }

    #[test]
    fn a_config_longer_than_the_first_read_comes_back_whole() {
        let (disk, label) = formatted(Style::Raw);
        // Past the first 128 KiB read, and not a multiple of 4 KiB.
        let long: Vec<u8> = (0..300_001u32).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(write_config(&disk, &label, 1, &long).unwrap(), 0);
        assert_eq!(write_config(&disk, &label, 2, b"short").unwrap(), 1);
        let slots = read_config(&disk, &label).unwrap();
        assert_eq!(slots.valid, [true, true]);
        assert_eq!(slots.newest.unwrap().1.text, b"short");
        assert_eq!(write_config(&disk, &label, 3, &long).unwrap(), 0);
        let (i, newest) = read_config(&disk, &label).unwrap().newest.unwrap();
        assert_eq!((i, newest.seqno), (0, 3));
        assert!(newest.text == long);
        // A length past the slot is damage, as before.
        let at = label.layout.config_slot_offset(0);
        disk.write_at(&u32::MAX.to_le_bytes(), at + 12).unwrap();
        let slots = read_config(&disk, &label).unwrap();
        assert_eq!(slots.valid, [false, true]);
    }

    fn smash(disk: &MemDisk, at: u64) {
        // Keep the magic: damage, not absence.
        disk.write_at(&[0xEE; 64], at + 16).unwrap();
    }

    #[test]
    fn each_style_formats_and_reads_its_label_back() {
        let mut data_sizes = Vec::new();
        for style in [Style::Raw, Style::Gpt, Style::Mbr] {
            let (disk, label) = formatted(style);
            assert_eq!(label.style, style);
            assert_eq!(label.layout.data_offset() % MIB, 0);
            assert_eq!(label.layout.data_size % MIB, 0);
            let read = read_label(&disk).unwrap().unwrap();
            assert_eq!(
                read,
                LabelRead {
                    label: label.clone(),
                    primary_ok: true,
                    backup_ok: true
                }
            );
            let slots = read_config(&disk, &label).unwrap();
            assert_eq!(slots.newest, None);
            data_sizes.push(label.layout.data_size);
        }
        // Raw, GPT, MBR of one disk: whole MiB, within a few MiB of each other.
        assert!(
            data_sizes
                .iter()
                .all(|s| s.abs_diff(data_sizes[0]) <= 2 * MIB)
        );
    }

    #[test]
    fn an_unformatted_disk_has_no_label() {
        assert_eq!(read_label(&MemDisk::new(DISK)).unwrap(), None);
        assert_eq!(read_label(&MemDisk::new(100)).unwrap(), None);
    }

    #[test]
    fn too_small_disks_are_refused_before_anything_is_written() {
        let disk = MemDisk::new(14 * MIB);
        disk.write_at(b"precious", 0).unwrap();
        let err = format_disk(&disk, Style::Gpt, Uuid::nil(), Uuid::nil()).unwrap_err();
        assert!(matches!(err, FormatError::TooSmall { .. }), "{err}");
        assert!(err.to_string().contains("14 MiB"), "{err}");
        let mut head = [0u8; 8];
        disk.read_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"precious");
        assert!(format_disk(&disk, Style::Raw, Uuid::nil(), Uuid::nil()).is_ok());
    }

    #[test]
    fn a_damaged_copy_is_covered_by_the_other_and_healed() {
        for style in [Style::Raw, Style::Gpt, Style::Mbr] {
            let (disk, label) = formatted(style);
            smash(&disk, label.layout.primary_label_offset());
            let read = read_label(&disk).unwrap().unwrap();
            assert_eq!((read.primary_ok, read.backup_ok), (false, true), "{style}");
            assert_eq!(read.label, label);
            write_labels(&disk, &read.label).unwrap();
            let read = read_label(&disk).unwrap().unwrap();
            assert_eq!((read.primary_ok, read.backup_ok), (true, true));

            smash(&disk, label.layout.backup_label_offset());
            let read = read_label(&disk).unwrap().unwrap();
            assert_eq!((read.primary_ok, read.backup_ok), (true, false), "{style}");
            assert_eq!(read.label, label);

            smash(&disk, label.layout.primary_label_offset());
            let err = read_label(&disk).unwrap_err();
            assert!(matches!(err, FormatError::Damaged), "{style}: {err}");
            assert_eq!(err.to_string(), "its labels are damaged");
        }
    }

    #[test]
    fn a_label_is_found_even_when_the_partition_table_is_gone() {
        for style in [Style::Gpt, Style::Mbr] {
            let (disk, label) = formatted(style);
            disk.write_zeroes(0, 64 * 512).unwrap();
            disk.write_zeroes(DISK - 64 * 512, 64 * 512).unwrap();
            let read = read_label(&disk).unwrap().unwrap();
            assert_eq!(read.label, label, "{style}");
        }
    }

    #[test]
    fn wholly_zeroed_labels_on_our_gpt_partition_are_damage() {
        let (disk, label) = formatted(Style::Gpt);
        disk.write_zeroes(label.layout.primary_label_offset(), LABEL_SIZE)
            .unwrap();
        disk.write_zeroes(label.layout.backup_label_offset(), LABEL_SIZE)
            .unwrap();
        assert!(matches!(read_label(&disk), Err(FormatError::Damaged)));
    }

    #[test]
    fn configs_alternate_slots_and_the_newest_wins() {
        let (disk, label) = formatted(Style::Gpt);
        assert_eq!(write_config(&disk, &label, 1, b"one").unwrap(), 0);
        assert_eq!(write_config(&disk, &label, 2, b"two").unwrap(), 1);
        assert_eq!(write_config(&disk, &label, 3, b"three").unwrap(), 0);
        let slots = read_config(&disk, &label).unwrap();
        assert_eq!(slots.valid, [true, true]);
        let (i, newest) = slots.newest.unwrap();
        assert_eq!((i, newest.seqno, &newest.text[..]), (0, 3, &b"three"[..]));

        // Destroy the newest: the previous one is read.
        disk.write_at(&[0x5A; 16], label.layout.config_slot_offset(0) + 64)
            .unwrap();
        let slots = read_config(&disk, &label).unwrap();
        assert_eq!(slots.valid, [false, true]);
        let (i, newest) = slots.newest.unwrap();
        assert_eq!((i, newest.seqno), (1, 2));
        // The next write goes over the damaged slot, not the good one.
        assert_eq!(write_config(&disk, &label, 4, b"four").unwrap(), 0);

        for i in 0..2 {
            disk.write_at(&[0x5A; 16], label.layout.config_slot_offset(i) + 8)
                .unwrap();
        }
        let slots = read_config(&disk, &label).unwrap();
        assert_eq!(slots.newest, None);
        assert_eq!(slots.valid, [false, false]);
    }

    #[test]
    fn a_torn_config_write_never_loses_the_previous_config() {
        let (disk, label) = formatted(Style::Mbr);
        write_config(&disk, &label, 1, &vec![b'a'; 30_000]).unwrap();
        write_config(&disk, &label, 2, &vec![b'b'; 30_000]).unwrap();
        let next = ConfigSlot {
            seqno: 3,
            group_uuid: label.group_uuid,
            text: vec![b'c'; 30_000],
        }
        .encode(CONFIG_SLOT_SIZE as usize)
        .unwrap();
        // The write of seqno 3 goes to slot 0 and stops half-way, at every
        // sector boundary in turn.
        for cut in (512..next.len()).step_by(4096) {
            let at = label.layout.config_slot_offset(0);
            disk.write_at(&next[..cut], at).unwrap();
            let (_, newest) = read_config(&disk, &label).unwrap().newest.unwrap();
            assert_eq!(newest.seqno, 2, "cut at {cut}");
            assert_eq!(newest.text, vec![b'b'; 30_000]);
        }
    }

    #[test]
    fn a_config_of_another_group_is_not_valid() {
        let (disk, label) = formatted(Style::Raw);
        let mut other = label.clone();
        other.group_uuid = Uuid::new_v4();
        write_config_slot(&disk, &other, 0, 9, b"foreign").unwrap();
        let slots = read_config(&disk, &label).unwrap();
        assert_eq!(slots.newest, None);
    }

    #[test]
    fn formatting_leaves_the_data_area_alone() {
        let disk = MemDisk::new(DISK);
        let probe = Layout::for_member(MIB, DISK - MIB).unwrap().data_offset() + 4096;
        disk.write_at(b"user data", probe).unwrap();
        format_disk(&disk, Style::Mbr, Uuid::new_v4(), Uuid::new_v4()).unwrap();
        let mut buf = [0u8; 9];
        disk.read_at(&mut buf, probe).unwrap();
        assert_eq!(&buf, b"user data");
    }
}
