//! The disk label: who this disk is, which group it belongs to, where its
//! member area is. Two copies: at the start and at the end of the member area
//! (see [`super::layout`]).
//!
//! A label is one `LABEL_SIZE` block. Its meaningful bytes are the first 512,
//! so that a label is written in one sector even on 512-byte disks; the rest
//! of the block is zero. All integers are little-endian:
//!
//! ```text
//!   0 ┌─────────────────────────────────────────────┐
//!     │ magic "MIRRVOL1"                        (8) │
//!   8 ├──────────────────────┬──────────────────────┤
//!     │ format version   (4) │ header length    (4) │
//!  16 ├──────────────────────┴──────────────────────┤
//!     │ disk UUID                              (16) │
//!  32 ├─────────────────────────────────────────────┤
//!     │ group UUID                             (16) │
//!  48 ├──────┬──────────────────────────────────────┤
//!     │style │ padding, zero                    (7) │
//!  56 ├──────┴──────────────────────────────────────┤
//!     │ member offset                           (8) │
//!  64 ├─────────────────────────────────────────────┤
//!     │ member size (whole MiB)                 (8) │
//!  72 ├─────────────────────────────────────────────┤
//!     │ data size                               (8) │
//!  80 ├─────────────────────────────────────────────┤
//!     │ checksum size                           (8) │
//!  88 ├─────────────────────────────────────────────┤
//!     │ created, Unix seconds                   (8) │
//!  96 ├─────────────────────────────────────────────┤
//!     │ reserved, zero                              │
//! 508 ├─────────────────────────────────────────────┤
//!     │ crc32c of bytes [0, 508)                (4) │
//! 512 ├─────────────────────────────────────────────┤
//!     │ zero up to LABEL_SIZE                       │
//!     └─────────────────────────────────────────────┘
//! ```
//!
//! The magic and the checksum stay where they are in every format version, so
//! that any build can tell "damaged" from "newer than me". The label itself
//! is the same in versions 1 and 2; the version says what the rest of the
//! member area holds (see [`super::FORMAT_VERSION`]).

use uuid::Uuid;

use super::layout::LABEL_SIZE;
use super::{FORMAT_VERSION, Layout, Style};

pub const LABEL_MAGIC: &[u8; 8] = b"MIRRVOL1";

const MAGIC: usize = 0;
const VERSION: usize = MAGIC + 8;
const HEADER_LEN: usize = VERSION + 4;
const DISK_UUID: usize = HEADER_LEN + 4;
const GROUP_UUID: usize = DISK_UUID + 16;
const STYLE: usize = GROUP_UUID + 16;
const MEMBER_OFFSET: usize = STYLE + 8;
const MEMBER_SIZE: usize = MEMBER_OFFSET + 8;
const DATA_SIZE: usize = MEMBER_SIZE + 8;
const CHECKSUM_SIZE: usize = DATA_SIZE + 8;
const CREATED: usize = CHECKSUM_SIZE + 8;
const RESERVED: usize = CREATED + 8;
const CRC: usize = 508;
/// Bytes of the label that carry meaning (and the value of the header length
/// field in this version).
pub const LABEL_HEADER_LEN: usize = CRC + 4;

const _: () = assert!(RESERVED <= CRC);
const _: () = assert!(LABEL_HEADER_LEN as u64 <= LABEL_SIZE);

/// The decoded label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub version: u32,
    pub disk_uuid: Uuid,
    pub group_uuid: Uuid,
    pub style: Style,
    pub layout: Layout,
    /// Unix seconds at `init`.
    pub created: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("no mirrorvol label")]
    NoMagic,
    #[error("label checksum mismatch")]
    BadChecksum,
    #[error("label format version {0} is newer than this mirrorvol understands")]
    NewerVersion(u32),
    #[error("label fields are inconsistent: {0}")]
    Inconsistent(&'static str),
}

fn style_code(style: Style) -> u8 {
    match style {
        Style::Raw => 0,
        Style::Gpt => 1,
        Style::Mbr => 2,
    }
}

pub(super) fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

pub(super) fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

pub(super) fn uuid_at(buf: &[u8], at: usize) -> Uuid {
    Uuid::from_bytes(buf[at..at + 16].try_into().expect("16 bytes"))
}

impl Label {
    /// Encodes into one `LABEL_SIZE` block.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; LABEL_SIZE as usize];
        buf[MAGIC..VERSION].copy_from_slice(LABEL_MAGIC);
        buf[VERSION..HEADER_LEN].copy_from_slice(&self.version.to_le_bytes());
        buf[HEADER_LEN..DISK_UUID].copy_from_slice(&(LABEL_HEADER_LEN as u32).to_le_bytes());
        buf[DISK_UUID..GROUP_UUID].copy_from_slice(self.disk_uuid.as_bytes());
        buf[GROUP_UUID..STYLE].copy_from_slice(self.group_uuid.as_bytes());
        buf[STYLE] = style_code(self.style);
        let l = &self.layout;
        buf[MEMBER_OFFSET..MEMBER_SIZE].copy_from_slice(&l.member_offset.to_le_bytes());
        buf[MEMBER_SIZE..DATA_SIZE].copy_from_slice(&l.member_size.to_le_bytes());
        buf[DATA_SIZE..CHECKSUM_SIZE].copy_from_slice(&l.data_size.to_le_bytes());
        buf[CHECKSUM_SIZE..CREATED].copy_from_slice(&l.checksum_size.to_le_bytes());
        buf[CREATED..RESERVED].copy_from_slice(&self.created.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..CRC]);
        buf[CRC..LABEL_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// True when `buf` starts with the label magic, damaged or not.
    pub fn has_magic(buf: &[u8]) -> bool {
        buf.len() >= LABEL_MAGIC.len() && &buf[..LABEL_MAGIC.len()] == LABEL_MAGIC
    }

    /// Decodes a block read from a label position. Only the first
    /// `LABEL_HEADER_LEN` bytes are looked at.
    pub fn decode(buf: &[u8]) -> Result<Label, LabelError> {
        if !Self::has_magic(buf) {
            return Err(LabelError::NoMagic);
        }
        if buf.len() < LABEL_HEADER_LEN {
            return Err(LabelError::Inconsistent("label is truncated"));
        }
        if crc32c::crc32c(&buf[..CRC]) != u32_at(buf, CRC) {
            return Err(LabelError::BadChecksum);
        }
        let version = u32_at(buf, VERSION);
        if version > FORMAT_VERSION {
            return Err(LabelError::NewerVersion(version));
        }
        if version == 0 {
            return Err(LabelError::Inconsistent("format version 0"));
        }
        if u32_at(buf, HEADER_LEN) as usize != LABEL_HEADER_LEN {
            return Err(LabelError::Inconsistent("unexpected header length"));
        }
        let style = match buf[STYLE] {
            0 => Style::Raw,
            1 => Style::Gpt,
            2 => Style::Mbr,
            _ => return Err(LabelError::Inconsistent("unknown partition style")),
        };
        let member_offset = u64_at(buf, MEMBER_OFFSET);
        let member_size = u64_at(buf, MEMBER_SIZE);
        if !member_offset.is_multiple_of(512) {
            return Err(LabelError::Inconsistent(
                "member offset is not sector aligned",
            ));
        }
        if member_offset.checked_add(member_size).is_none() {
            return Err(LabelError::Inconsistent("member area ends past 2^64"));
        }
        let stored = Layout {
            member_offset,
            member_size,
            data_size: u64_at(buf, DATA_SIZE),
            checksum_size: u64_at(buf, CHECKSUM_SIZE),
        };
        // The layout is a function of the member size: a label whose areas
        // disagree with it was written by a bug or bit rot, not by us.
        if Layout::for_member(member_offset, member_size) != Some(stored) {
            return Err(LabelError::Inconsistent(
                "areas do not match the member size",
            ));
        }
        Ok(Label {
            version,
            disk_uuid: uuid_at(buf, DISK_UUID),
            group_uuid: uuid_at(buf, GROUP_UUID),
            style,
            layout: stored,
            created: u64_at(buf, CREATED),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::MIB;

    fn sample() -> Label {
        Label {
            version: FORMAT_VERSION,
            disk_uuid: Uuid::from_u128(0x1111),
            group_uuid: Uuid::from_u128(0x2222),
            style: Style::Gpt,
            layout: Layout::for_member(MIB, 64 * MIB).unwrap(),
            created: 1_700_000_000,
        }
    }

    #[test]
    fn encode_is_one_block_with_meaning_in_the_first_sector() {
        let buf = sample().encode();
        assert_eq!(buf.len() as u64, LABEL_SIZE);
        assert!(buf[512..].iter().all(|&b| b == 0));
        assert_eq!(&buf[..8], b"MIRRVOL1");
        assert_eq!(Label::decode(&buf), Ok(sample()));
    }

    #[test]
    fn any_flipped_bit_is_caught() {
        let good = sample().encode();
        for byte in [8, 20, 40, 48, 60, 90, 200, 507, 509] {
            let mut buf = good.clone();
            buf[byte] ^= 0x10;
            assert_eq!(
                Label::decode(&buf),
                Err(LabelError::BadChecksum),
                "byte {byte}"
            );
        }
        let mut buf = good.clone();
        buf[0] ^= 1;
        assert_eq!(Label::decode(&buf), Err(LabelError::NoMagic));
    }

    #[test]
    fn short_and_empty_buffers_are_errors() {
        let buf = sample().encode();
        assert_eq!(Label::decode(&[]), Err(LabelError::NoMagic));
        assert!(Label::decode(&buf[..100]).is_err());
        assert!(Label::decode(&buf[..511]).is_err());
        assert!(Label::decode(&buf[..512]).is_ok());
    }

    /// Re-seals a hand-edited label so that only the edited field is wrong.
    fn reseal(buf: &mut [u8]) {
        let crc = crc32c::crc32c(&buf[..CRC]);
        buf[CRC..CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn newer_versions_are_refused_by_name() {
        let mut buf = sample().encode();
        buf[VERSION..VERSION + 4].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        reseal(&mut buf);
        assert_eq!(
            Label::decode(&buf),
            Err(LabelError::NewerVersion(FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn a_layout_that_does_not_follow_from_the_member_size_is_inconsistent() {
        let mut buf = sample().encode();
        let data = u64_at(&buf, DATA_SIZE) + MIB;
        buf[DATA_SIZE..DATA_SIZE + 8].copy_from_slice(&data.to_le_bytes());
        reseal(&mut buf);
        assert!(matches!(
            Label::decode(&buf),
            Err(LabelError::Inconsistent(_))
        ));
        let mut buf = sample().encode();
        buf[STYLE] = 9;
        reseal(&mut buf);
        assert!(matches!(
            Label::decode(&buf),
            Err(LabelError::Inconsistent(_))
        ));
    }

    fn any_style() -> impl Strategy<Value = Style> {
        prop_oneof![Just(Style::Raw), Just(Style::Gpt), Just(Style::Mbr)]
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = Label::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_sealed_garbage(mut bytes in proptest::collection::vec(any::<u8>(), 512..=512)) {
            bytes[..8].copy_from_slice(LABEL_MAGIC);
            bytes[VERSION..VERSION + 4].copy_from_slice(&1u32.to_le_bytes());
            bytes[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&512u32.to_le_bytes());
            reseal(&mut bytes);
            let _ = Label::decode(&bytes);
        }

        #[test]
        fn encode_then_decode_round_trips(
            disk in any::<u128>(),
            group in any::<u128>(),
            style in any_style(),
            offset_sectors in 0u64..(1 << 40),
            member_mib in 14u64..(1 << 30),
            created in any::<u64>(),
        ) {
            let label = Label {
                version: FORMAT_VERSION,
                disk_uuid: Uuid::from_u128(disk),
                group_uuid: Uuid::from_u128(group),
                style,
                layout: Layout::for_member(offset_sectors * 512, member_mib * MIB).unwrap(),
                created,
            };
            prop_assert_eq!(Label::decode(&label.encode()), Ok(label));
        }
    }
}
