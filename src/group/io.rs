//! The engine of a volume, assembled from the group's config on the disks at
//! hand. The group's controller ([`super::live`]) builds one per volume in
//! service, for `serve` and for an offline command alike, and is the sink
//! of what the engine reports.

use std::io;
use std::sync::Arc;

use uuid::Uuid;

use super::Group;
use crate::volume::engine::{EngineOptions, EnginePlex, FailureSink, MirrorVolume, Mode};
use crate::{Error, Result};

impl Group {
    /// The engine of a volume, for one command or for `serve`: its in-sync
    /// plexes serve reads and take writes, resyncing ones take writes, and
    /// the plex on `resync` (whatever its state, on a disk in service) is
    /// write-only; stale, failed and missing plexes stay out. Every plex
    /// goes through the queue its disk was opened behind, so data and
    /// metadata meet in one queue per disk, under one deadline.
    pub fn build_engine(
        &self,
        name: &str,
        resync: Option<Uuid>,
        sink: std::sync::Weak<dyn FailureSink>,
        opts: EngineOptions,
    ) -> Result<Arc<MirrorVolume>> {
        let v = self.volume(name)?;
        let plexes = v
            .plexes
            .iter()
            .filter_map(|p| {
                let m = self.members.get(&p.disk)?;
                let mode = match self.plex_state(p.disk, p.state) {
                    _ if resync == Some(p.disk) && self.is_online(p.disk) => Mode::WriteOnly,
                    "in-sync" => Mode::InSync,
                    "resyncing" => Mode::WriteOnly,
                    _ => return None,
                };
                Some(
                    EnginePlex::new(
                        p.disk,
                        m.disk.queue().clone(),
                        m.label.layout.data_offset() + p.offset,
                        mode,
                    )
                    .write_mostly(self.is_write_mostly(p.disk))
                    .write_behind(self.write_behind(p.disk)),
                )
            })
            .collect();
        let engine = MirrorVolume::new(&v.name, v.size, plexes, sink, opts);
        if let Some(b) = &self.bitmaps {
            engine.set_intent(b.clone());
        }
        Ok(engine)
    }
}

/// An engine error as a command's error: a request outside the volume is
/// refused; anything else is an I/O failure.
pub fn io_refusal(name: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::InvalidInput {
        Error::refused(e.to_string())
    } else {
        Error::io(format!("I/O on volume {name} failed"), e)
    }
}
