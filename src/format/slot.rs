//! Config slots: two per disk (A and B). Each holds one config text with a
//! sequence number and a crc32c. A new config goes to the slot that does not
//! hold the newest valid one, so a torn write never loses the last good config.

use uuid::Uuid;

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
}

impl ConfigSlot {
    pub fn encode(&self, _slot_size: usize) -> Result<Vec<u8>, SlotError> {
        todo!()
    }

    pub fn decode(_buf: &[u8]) -> Result<ConfigSlot, SlotError> {
        todo!()
    }
}
