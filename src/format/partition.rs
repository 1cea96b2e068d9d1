//! Partition styles: GPT (one partition of mirrorvol's type GUID), MBR (one
//! primary partition at 1 MiB) or raw (the whole disk). Tables are written
//! with the gptman and mbrman crates.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
