//! Resyncs of a group's plexes: what a resync must copy (the whole volume, the
//! rest of it after a checkpoint, or the regions the write-intent bitmaps
//! name). The group's controller runs them ([`super::live`]): in the
//! background under `serve`, in the foreground for an offline command
//! (`add-mirror`, `repair`, `reactivate`, `resolve-split-brain`). The copy
//! itself is [`crate::volume::resync`].

use std::ops::Range;

use uuid::Uuid;

use super::Group;
use crate::format::PlexState;
use crate::volume::bitmap::Found;
use crate::{Error, Result};

/// What a resync of one plex copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncPlan {
    /// Volume ranges to copy, sorted and disjoint.
    pub ranges: Vec<Range<u64>>,
    /// Bytes the whole resync covers (for progress), with `done` of them
    /// copied before (by a run that was interrupted).
    pub total: u64,
    pub done: u64,
    /// A full resync (the plex is `resyncing` and checkpointed); otherwise
    /// a copy of the regions the bitmaps name onto a stale plex.
    pub full: bool,
    /// The checkpoint a full resync resumes from.
    pub resumed_at: Option<u64>,
}

impl Group {
    /// Plans the resync of the plex of `name` on `disk`.
    #[allow(clippy::single_range_in_vec_init)]
    pub fn resync_plan(&self, name: &str, disk: Uuid) -> Result<ResyncPlan> {
        let v = self.volume(name)?;
        let plex = v
            .plexes
            .iter()
            .find(|p| p.disk == disk)
            .ok_or_else(|| Error::failed(format!("volume {name} has no plex on that disk")))?;
        let size = v.size;
        if plex.state == PlexState::Stale && self.full_resync_reason(name, disk).is_none() {
            let ranges = self.returning_plex_ranges(name, disk);
            let total = ranges.iter().map(|r| r.end - r.start).sum();
            return Ok(ResyncPlan {
                ranges,
                total,
                done: 0,
                full: false,
                resumed_at: None,
            });
        }
        let sources: Vec<Uuid> = v
            .plexes
            .iter()
            .filter(|p| p.disk != disk && self.plex_state(p.disk, p.state) == "in-sync")
            .map(|p| p.disk)
            .collect();
        let checkpoint = match plex.state {
            PlexState::Resyncing => plex.resync_offset.min(size),
            _ => 0,
        };
        // Below the checkpoint the plex missed only what the sources' bitmaps
        // name; that holds when every source has tracked all along.
        let trusted = self.bitmaps.is_some()
            && !sources.is_empty()
            && sources
                .iter()
                .all(|d| matches!(self.bitmap_found.get(d), Some(Found::Valid)));
        if checkpoint == 0 || !trusted {
            return Ok(ResyncPlan {
                ranges: vec![0..size],
                total: size,
                done: 0,
                full: true,
                resumed_at: None,
            });
        }
        let mut ranges: Vec<Range<u64>> = self
            .dirty_volume_ranges(name, &sources)
            .into_iter()
            .filter(|r| r.start < checkpoint)
            .map(|r| r.start..r.end.min(checkpoint))
            .collect();
        let again: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        if checkpoint < size {
            ranges.push(checkpoint..size);
        }
        Ok(ResyncPlan {
            ranges,
            total: size,
            done: checkpoint - again,
            full: true,
            resumed_at: Some(checkpoint),
        })
    }

    /// Records a full resync's checkpoint in the config (committed by the
    /// caller); it never moves back.
    pub(super) fn set_resync_offset(&mut self, name: &str, disk: Uuid, position: u64) {
        if let Some(p) = self
            .config
            .volume_mut(name)
            .and_then(|v| v.plexes.iter_mut().find(|p| p.disk == disk))
            && p.state == PlexState::Resyncing
        {
            p.resync_offset = p.resync_offset.max(position);
        }
    }
}

/// The line a finished resync prints.
pub(super) fn resynced_line(
    name: &str,
    path: &str,
    copied: u64,
    zeroed: u64,
    plan: &ResyncPlan,
    why: &str,
) -> String {
    // Human units, with the exact count for scripts: "64 MiB (67108864 bytes)".
    let amount = super::ops::human_exact(copied);
    let line = resynced_what(name, path, &amount, plan, why);
    match zeroed.min(copied) {
        0 => line,
        z => format!(
            "{line}; {} of it read and copied, {} never written (or a hole on every copy) given as zeroes",
            super::ops::human(copied - z),
            super::ops::human(z)
        ),
    }
}

fn resynced_what(name: &str, path: &str, amount: &str, plan: &ResyncPlan, why: &str) -> String {
    match (plan.full, plan.resumed_at) {
        (true, None) => {
            format!("resynced {amount} of volume {name} onto {path} (full resync: {why})")
        }
        (true, Some(at)) => format!(
            "resynced {amount} of volume {name} onto {path} (full resync: {why}; resumed from the checkpoint at {})",
            super::ops::human(at)
        ),
        (false, _) => format!(
            "resynced {amount} of volume {name} onto {path} ({} dirty region{} from the write-intent bitmaps)",
            plan.ranges.len(),
            if plan.ranges.len() == 1 { "" } else { "s" }
        ),
    }
}
