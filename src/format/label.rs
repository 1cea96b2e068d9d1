//! The disk label: who this disk is, which group it belongs to, where its
//! member area is. Two copies: at the start and at the end of the member area.
//! (Helper fills in encode/decode; see the contract below.)

use uuid::Uuid;

use super::{Layout, Style};

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

impl Label {
    /// Encodes into one `LABEL_SIZE` block.
    pub fn encode(&self) -> Vec<u8> {
        todo!()
    }

    /// Decodes a block read from a label position.
    pub fn decode(_buf: &[u8]) -> Result<Label, LabelError> {
        todo!()
    }
}
