//! What `scrub NAME [--repair]` reports: the check that a volume has
//! something to compare, and the engine's scrub ([`crate::volume::scrub`],
//! run by the group's controller) told with the plexes named by their
//! disks.

use serde_json::{Value, json};

use super::Group;
use super::ops::human;
use crate::volume::scrub::{self, ScrubError, ScrubOptions};
use crate::{Error, Result};

/// A byte range where the plexes differ, with the plexes named by disk path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubRange {
    pub offset: u64,
    pub length: u64,
    /// The plex whose copy wins (and was copied, with `repaired`).
    pub kept: String,
    /// The plexes whose copy differs from the winning one.
    pub outvoted: Vec<String>,
    pub repaired: bool,
    /// What decided ([`crate::volume::scrub::Verdict`]).
    pub verdict: scrub::Verdict,
}

impl ScrubRange {
    /// The plexes that differ in this range: the winner and those it
    /// outvotes, in config order of the winner first.
    pub fn plexes(&self) -> Vec<String> {
        std::iter::once(self.kept.clone())
            .chain(self.outvoted.iter().cloned())
            .collect()
    }
}

/// What `scrub` found on one volume.
#[derive(Debug, Clone)]
pub struct VolumeScrub {
    pub volume: String,
    pub repair: bool,
    /// The disks of the in-sync plexes compared, in config order.
    pub compared: Vec<String>,
    pub checked_bytes: u64,
    /// Of them, never written: not read.
    pub unwritten_bytes: u64,
    pub ranges: Vec<ScrubRange>,
}

impl VolumeScrub {
    pub fn mismatched_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }

    pub fn repaired(&self) -> usize {
        self.ranges.iter().filter(|r| r.repaired).count()
    }
}

impl Group {
    /// Refuses to scrub a volume with fewer than two in-sync plexes.
    pub fn refuse_unscrubbable(&self, name: &str) -> Result<()> {
        let v = self.volume(name)?;
        let in_sync = v
            .plexes
            .iter()
            .filter(|p| self.plex_state(p.disk, p.state) == "in-sync")
            .count();
        if in_sync < 2 {
            return Err(Error::refused(format!(
                "volume {name} has fewer than two in-sync plexes: there is nothing to compare"
            )));
        }
        Ok(())
    }

    /// What a scrub of `name` found, with the plexes named by their disks,
    /// or why it stopped (a plex's failure is recorded by then).
    pub fn scrub_outcome(
        &self,
        name: &str,
        opts: &ScrubOptions,
        result: std::result::Result<scrub::ScrubReport, ScrubError>,
    ) -> Result<VolumeScrub> {
        let report = match result {
            Ok(report) => report,
            Err(ScrubError::TooFewPlexes { .. }) => {
                return Err(Error::failed(format!(
                    "scrub of volume {name} stopped: fewer than two of its plexes remain in sync"
                )));
            }
            Err(ScrubError::Plex {
                disk,
                op,
                offset,
                error,
                ..
            }) => {
                return Err(Error::io(
                    format!(
                        "scrub of volume {name} stopped at volume offset {offset}: {op} on disk {disk} failed"
                    ),
                    error,
                ));
            }
        };
        let path = |u| self.disk_path(u);
        Ok(VolumeScrub {
            volume: name.to_string(),
            repair: opts.repair,
            compared: report.compared.iter().map(|u| path(*u)).collect(),
            checked_bytes: report.checked_bytes,
            unwritten_bytes: report.unwritten_bytes,
            ranges: report
                .mismatches
                .iter()
                .map(|m| ScrubRange {
                    offset: m.offset,
                    length: m.length,
                    kept: path(m.kept),
                    outvoted: m.outvoted.iter().map(|u| path(*u)).collect(),
                    repaired: m.repaired,
                    verdict: m.verdict,
                })
                .collect(),
        })
    }
}

/// `scrub`'s text output: a summary line, then one line per mismatching range.
pub fn scrub_text(r: &VolumeScrub) -> String {
    let mut out = format!(
        "scrubbed volume {}: compared {} on the plexes on {}",
        r.volume,
        human(r.checked_bytes),
        super::show::and_list(&r.compared)
    );
    if r.unwritten_bytes > 0 {
        out.push_str(&format!(
            " ({} of it never written: zeroes on every copy, not read)",
            human(r.unwritten_bytes)
        ));
    }
    if r.ranges.is_empty() {
        out.push_str("; they are identical\n");
        return out;
    }
    out.push_str(&format!(
        "; {} mismatching range{} ({})",
        r.ranges.len(),
        if r.ranges.len() == 1 { "" } else { "s" },
        human(r.mismatched_bytes())
    ));
    if r.repair {
        out.push_str(&format!(", {} repaired\n", r.repaired()));
    } else {
        out.push_str("; run with --repair to make them equal\n");
    }
    for m in &r.ranges {
        let outvoted = super::show::and_list(&m.outvoted);
        let (copy, does) = if m.outvoted.len() == 1 {
            ("copy", "does")
        } else {
            ("copies", "do")
        };
        let why = match m.verdict {
            scrub::Verdict::Checksum => format!(
                "the {copy} on {outvoted} {does} not match the block checksums, the copy on {} does",
                m.kept
            ),
            scrub::Verdict::Entry => format!(
                "the copies agree; the block checksums on {outvoted} are damaged, not the data"
            ),
            scrub::Verdict::Majority => format!(
                "no block checksum is known here; most plexes hold the copy on {}",
                m.kept
            ),
            scrub::Verdict::First => format!(
                "no block checksum is known here and no majority; the copy on {} is the first plex's",
                m.kept
            ),
            scrub::Verdict::NoGoodCopy => {
                "every copy fails its block checksums: none is known good".to_string()
            }
        };
        let what = if m.verdict == scrub::Verdict::Entry {
            "checksums differ"
        } else {
            "plexes differ"
        };
        out.push_str(&format!(
            "mismatch at offset {}, {} bytes: {what} on {} ({why})",
            m.offset,
            m.length,
            super::show::and_list(&m.plexes())
        ));
        if m.verdict == scrub::Verdict::NoGoodCopy {
            out.push_str("; left as it is: restore this range from a backup\n");
        } else if m.repaired && m.verdict == scrub::Verdict::Entry {
            out.push_str(&format!(
                "; repaired: the checksums on {outvoted} were rewritten\n"
            ));
        } else if m.repaired {
            out.push_str(&format!(
                "; repaired: the copy on {} was written to {}\n",
                m.kept,
                super::show::and_list(&m.outvoted)
            ));
        } else {
            out.push_str(&format!("; a repair would keep the copy on {}\n", m.kept));
        }
    }
    out
}

/// `{"volume", "checked_bytes", "mismatches", "repaired"}` (counts of
/// ranges), with the ranges themselves and byte totals besides.
/// `scrub --json`: DESIGN.md §6's keys, plus the ranges.
pub fn scrub_json(r: &VolumeScrub) -> Value {
    json!({
        "volume": r.volume,
        "checked_bytes": r.checked_bytes,
        "unwritten_bytes": r.unwritten_bytes,
        "mismatches": r.ranges.len(),
        "repaired": r.repaired(),
        "mismatched_bytes": r.mismatched_bytes(),
        "compared": r.compared,
        "ranges": r.ranges.iter().map(|m| json!({
            "offset": m.offset,
            "length": m.length,
            "plexes": m.plexes(),
            "kept": m.kept,
            "outvoted": m.outvoted,
            "repaired": m.repaired,
            "verdict": m.verdict.name(),
        })).collect::<Vec<_>>(),
    })
}
