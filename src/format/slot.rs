//! Config slots: two per disk (A and B). Each holds one config text with a
//! sequence number and a crc32c. A new config goes to the slot that does not
//! hold the newest valid one, so a torn write never loses the last good config.
//!
//! A slot starts with a 64-byte header; the text follows it. Little-endian:
//!
//! ```text
//!  0 ┌───────────────────────────────────────────┐
//!    │ magic "MVCONFIG"                      (8) │
//!  8 ├─────────────────────┬─────────────────────┤
//!    │ format version  (4) │ text length     (4) │
//! 16 ├─────────────────────┴─────────────────────┤
//!    │ seqno                                 (8) │
//! 24 ├───────────────────────────────────────────┤
//!    │ group UUID                           (16) │
//! 40 ├───────────────────────────────────────────┤
//!    │ reserved, zero                       (20) │
//! 60 ├───────────────────────────────────────────┤
//!    │ crc32c of header [0, 60) then the text (4)│
//! 64 ├───────────────────────────────────────────┤
//!    │ text (text length bytes)                  │
//!    ├───────────────────────────────────────────┤
//!    │ whatever an older config left, ignored    │
//!    └───────────────────────────────────────────┘
//! ```

use uuid::Uuid;

use super::FORMAT_VERSION;

pub const SLOT_MAGIC: &[u8; 8] = b"MVCONFIG";

const MAGIC: usize = 0;
const VERSION: usize = MAGIC + 8;
const TEXT_LEN: usize = VERSION + 4;
const SEQNO: usize = TEXT_LEN + 4;
const GROUP_UUID: usize = SEQNO + 8;
const RESERVED: usize = GROUP_UUID + 16;
const CRC: usize = 60;
/// Size of the slot header; the text starts here.
pub const SLOT_HEADER_LEN: usize = CRC + 4;

const _: () = assert!(RESERVED <= CRC);

/// Encoded slots are padded to this size, so that a slot is written in whole
/// sectors on both 512- and 4096-byte disks.
const SLOT_WRITE_ALIGN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSlot {
    pub seqno: u64,
    pub group_uuid: Uuid,
    pub text: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    #[error("config slot is empty")]
    Empty,
    #[error("config slot checksum mismatch")]
    BadChecksum,
    #[error("config slot is damaged: {0}")]
    Damaged(&'static str),
    #[error("config of {len} bytes does not fit a config slot of {room} bytes")]
    TooLarge { len: usize, room: usize },
    #[error("config slot format version {0} is newer than this mirrorvol understands")]
    NewerVersion(u32),
}

fn checksum(header: &[u8], text: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..CRC]), text)
}

/// The text length a slot's header (the first bytes of `buf`) gives,
/// when it carries the slot magic: how much more of the slot to read.
pub fn text_len(buf: &[u8]) -> Option<u64> {
    let header = buf.get(..SLOT_HEADER_LEN)?;
    (&header[MAGIC..VERSION] == SLOT_MAGIC).then(|| {
        u64::from(u32::from_le_bytes(
            header[TEXT_LEN..SEQNO].try_into().expect("4 bytes"),
        ))
    })
}

impl ConfigSlot {
    /// Encodes the slot for a slot area of `slot_size` bytes. The result is
    /// the header and text, zero-padded to whole 4 KiB (never more than
    /// `slot_size`): bytes of the slot beyond it are not rewritten.
    pub fn encode(&self, slot_size: usize) -> Result<Vec<u8>, SlotError> {
        let room = slot_size.saturating_sub(SLOT_HEADER_LEN);
        if self.text.len() > room || u32::try_from(self.text.len()).is_err() {
            return Err(SlotError::TooLarge {
                len: self.text.len(),
                room,
            });
        }
        let used = SLOT_HEADER_LEN + self.text.len();
        let mut buf = vec![0u8; used.next_multiple_of(SLOT_WRITE_ALIGN).min(slot_size)];
        buf[MAGIC..VERSION].copy_from_slice(SLOT_MAGIC);
        buf[VERSION..TEXT_LEN].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf[TEXT_LEN..SEQNO].copy_from_slice(&(self.text.len() as u32).to_le_bytes());
        buf[SEQNO..GROUP_UUID].copy_from_slice(&self.seqno.to_le_bytes());
        buf[GROUP_UUID..RESERVED].copy_from_slice(self.group_uuid.as_bytes());
        buf[SLOT_HEADER_LEN..used].copy_from_slice(&self.text);
        let crc = checksum(&buf, &self.text);
        buf[CRC..SLOT_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(buf)
    }

    /// Decodes a slot read from disk (the whole slot area, or at least the
    /// header and the text).
    pub fn decode(buf: &[u8]) -> Result<ConfigSlot, SlotError> {
        let Some(header) = buf.get(..SLOT_HEADER_LEN) else {
            return Err(SlotError::Damaged("shorter than a slot header"));
        };
        // A slot that was never written (or zeroed at init) is not damage.
        if header.iter().all(|&b| b == 0) {
            return Err(SlotError::Empty);
        }
        if &header[MAGIC..VERSION] != SLOT_MAGIC {
            return Err(SlotError::Damaged("no config slot magic"));
        }
        let len = u32::from_le_bytes(header[TEXT_LEN..SEQNO].try_into().expect("4 bytes"));
        let Some(text) = buf.get(SLOT_HEADER_LEN..SLOT_HEADER_LEN.saturating_add(len as usize))
        else {
            return Err(SlotError::Damaged("text length runs past the slot"));
        };
        let stored = u32::from_le_bytes(header[CRC..SLOT_HEADER_LEN].try_into().expect("4 bytes"));
        if checksum(header, text) != stored {
            return Err(SlotError::BadChecksum);
        }
        let version = u32::from_le_bytes(header[VERSION..TEXT_LEN].try_into().expect("4 bytes"));
        if version > FORMAT_VERSION {
            return Err(SlotError::NewerVersion(version));
        }
        Ok(ConfigSlot {
            seqno: u64::from_le_bytes(header[SEQNO..GROUP_UUID].try_into().expect("8 bytes")),
            group_uuid: Uuid::from_bytes(header[GROUP_UUID..RESERVED].try_into().expect("16")),
            text: text.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SLOT: usize = 1 << 20;

    fn sample() -> ConfigSlot {
        ConfigSlot {
            seqno: 7,
            group_uuid: Uuid::from_u128(42),
            text: b"{\"name\": \"tank\"}\n".to_vec(),
        }
    }

    #[test]
    fn encode_pads_to_4k_and_decodes_back() {
        let buf = sample().encode(SLOT).unwrap();
        assert_eq!(buf.len(), 4096);
        assert_eq!(&buf[..8], b"MVCONFIG");
        assert_eq!(ConfigSlot::decode(&buf), Ok(sample()));
        // Read back as a whole slot area, with stale bytes after the text.
        let mut area = vec![0xAB; SLOT];
        area[..buf.len()].copy_from_slice(&buf);
        assert_eq!(ConfigSlot::decode(&area), Ok(sample()));
    }

    #[test]
    fn an_all_zero_slot_is_empty() {
        assert_eq!(ConfigSlot::decode(&vec![0; SLOT]), Err(SlotError::Empty));
        assert_eq!(ConfigSlot::decode(&[0; 64]), Err(SlotError::Empty));
    }

    #[test]
    fn a_text_too_large_for_the_slot_is_refused() {
        let mut slot = sample();
        slot.text = vec![b'x'; SLOT - SLOT_HEADER_LEN];
        assert_eq!(slot.encode(SLOT).unwrap().len(), SLOT);
        slot.text.push(b'x');
        assert_eq!(
            slot.encode(SLOT),
            Err(SlotError::TooLarge {
                len: SLOT - SLOT_HEADER_LEN + 1,
                room: SLOT - SLOT_HEADER_LEN
            })
        );
        assert!(matches!(slot.encode(10), Err(SlotError::TooLarge { .. })));
    }

    #[test]
    fn a_length_past_the_buffer_is_damage() {
        let buf = sample().encode(SLOT).unwrap();
        let mut short = buf[..SLOT_HEADER_LEN + 5].to_vec();
        assert_eq!(
            ConfigSlot::decode(&short),
            Err(SlotError::Damaged("text length runs past the slot"))
        );
        short[TEXT_LEN..SEQNO].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ConfigSlot::decode(&short),
            Err(SlotError::Damaged(_))
        ));
        assert!(matches!(
            ConfigSlot::decode(&buf[..10]),
            Err(SlotError::Damaged(_))
        ));
    }

    #[test]
    fn a_changed_text_or_header_byte_is_caught() {
        let good = sample().encode(SLOT).unwrap();
        for byte in [8, 16, 30, 45, 62, 64, 70] {
            let mut buf = good.clone();
            buf[byte] ^= 0x04;
            assert_eq!(
                ConfigSlot::decode(&buf),
                Err(SlotError::BadChecksum),
                "byte {byte}"
            );
        }
    }

    #[test]
    fn a_half_written_slot_does_not_decode() {
        let mut slot = sample();
        slot.text = vec![b'y'; 20_000];
        let full = slot.encode(SLOT).unwrap();
        let old = sample().encode(SLOT).unwrap();
        let mut torn = vec![0; SLOT];
        torn[..old.len()].copy_from_slice(&old);
        torn[..full.len() / 2].copy_from_slice(&full[..full.len() / 2]);
        assert!(ConfigSlot::decode(&torn).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = ConfigSlot::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_with_a_magic(mut bytes in proptest::collection::vec(any::<u8>(), 64..2048)) {
            bytes[..8].copy_from_slice(SLOT_MAGIC);
            let _ = ConfigSlot::decode(&bytes);
        }

        #[test]
        fn encode_then_decode_round_trips(
            seqno in any::<u64>(),
            group in any::<u128>(),
            text in proptest::collection::vec(any::<u8>(), 0..10_000),
        ) {
            let slot = ConfigSlot { seqno, group_uuid: Uuid::from_u128(group), text };
            let buf = slot.encode(SLOT).unwrap();
            prop_assert_eq!(buf.len() % 4096, 0);
            prop_assert_eq!(ConfigSlot::decode(&buf), Ok(slot));
        }
    }
}
