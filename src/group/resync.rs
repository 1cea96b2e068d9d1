//! Resyncs of a group's plexes: what a resync must copy (the whole volume, the
//! rest of it after a checkpoint, or the regions the write-intent bitmaps
//! name), and resyncs run by a command in the foreground (`add-mirror`,
//! `repair`, `reactivate`). `serve` runs the same resyncs in the background
//! ([`super::live`]). The copy itself is [`crate::volume::resync`].

use std::io;
use std::ops::Range;
use std::sync::Arc;

use uuid::Uuid;

use super::{Group, Progress};
use crate::format::PlexState;
use crate::volume::bitmap::Found;
use crate::volume::resync::{ResyncError, ResyncOptions, ResyncProgress, resync};
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

    /// Resyncs the plex of `name` on `disk` (new, resyncing or stale) in the
    /// foreground, unthrottled, with a progress bar, then records it in
    /// sync. A failure of the plex being resynced fails it.
    pub fn resync_plex(&mut self, name: &str, disk: Uuid, progress: &dyn Progress) -> Result<u64> {
        let shared = ResyncProgress::new(0, 0);
        self.resync_plex_with(name, disk, &ResyncOptions::unthrottled(), &shared, progress)
    }

    /// [`Group::resync_plex`] with pacing and a shared progress (whoever
    /// holds it may stop the resync: the plex stays resyncing, and the next
    /// resync resumes from the checkpoint recorded when it stopped).
    pub fn resync_plex_with(
        &mut self,
        name: &str,
        disk: Uuid,
        opts: &ResyncOptions,
        shared: &Arc<ResyncProgress>,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let plan = self.resync_plan(name, disk)?;
        let state = self
            .volume(name)?
            .plexes
            .iter()
            .find(|p| p.disk == disk)
            .map(|p| p.state);
        if plan.full && state != Some(PlexState::Resyncing) {
            self.set_plex_state(name, disk, PlexState::Resyncing);
            self.commit()?;
        }
        let io = self.open_volume_with(name, Some(disk))?;
        let target = io.engine.plex(disk).ok_or_else(|| {
            Error::failed(format!(
                "disk {} is not online; its plex of volume {name} cannot be resynced",
                self.disk_path(disk)
            ))
        })?;
        shared.reset(plan.total, plan.done);
        let path = self.disk_path(disk);
        progress.start(&format!("resync {name} onto {path}"), plan.total);
        progress.set(plan.done);
        let full = plan.full;
        let result = resync(
            &io.engine,
            &target,
            &plan.ranges,
            opts,
            shared,
            &mut |position| {
                if !full {
                    return Ok(());
                }
                self.set_resync_offset(name, disk, position);
                self.commit().map_err(|e| io::Error::other(e.to_string()))
            },
            &|p| progress.set(p.done()),
        );
        progress.finish();
        self.settle(&io)?;
        drop(io);
        match result {
            Ok(copied) => {
                let why = self
                    .volume(name)?
                    .plexes
                    .iter()
                    .find(|p| p.disk == disk)
                    .and_then(|p| p.resync_reason.clone())
                    .unwrap_or_else(|| "it was stale".to_string());
                self.set_plex_state(name, disk, PlexState::InSync);
                self.commit()?;
                let line = resynced_line(name, &path, copied, &plan, &why);
                tracing::info!("{line}");
                self.resynced.push(line);
                Ok(copied)
            }
            Err(ResyncError::Target { offset, error }) => {
                self.set_plex_state(name, disk, PlexState::Failed);
                self.commit()?;
                Err(Error::io(
                    format!(
                        "the plex of volume {name} on {path} failed at volume offset {offset} during its resync; it is marked failed"
                    ),
                    error,
                ))
            }
            Err(ResyncError::Source { offset, error }) => Err(Error::io(
                format!("reading volume {name} at offset {offset} for the resync failed"),
                error,
            )),
            Err(ResyncError::Stopped { position }) => Err(Error::failed(format!(
                "the resync of volume {name} onto {path} stopped at offset {position}; the next resync resumes there"
            ))),
            Err(e @ ResyncError::Checkpoint { .. }) => Err(Error::failed(format!(
                "the resync of volume {name} onto {path} failed: {e}"
            ))),
        }
    }
}

/// The line a finished resync prints.
pub(super) fn resynced_line(
    name: &str,
    path: &str,
    copied: u64,
    plan: &ResyncPlan,
    why: &str,
) -> String {
    match (plan.full, plan.resumed_at) {
        (true, None) => {
            format!("resynced {copied} bytes of volume {name} onto {path} (full resync: {why})")
        }
        (true, Some(at)) => format!(
            "resynced {copied} bytes of volume {name} onto {path} (full resync: {why}; resumed from the checkpoint at offset {at})"
        ),
        (false, _) => format!(
            "resynced {copied} bytes of volume {name} onto {path} ({} dirty region{} from the write-intent bitmaps)",
            plan.ranges.len(),
            if plan.ranges.len() == 1 { "" } else { "s" }
        ),
    }
}
