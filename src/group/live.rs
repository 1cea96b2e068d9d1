//! A group in service: the assembled group, a queue per disk, the mirror
//! engine of every volume, and the failure handling that keeps the config
//! true while I/O runs.
//!
//! The engine reports failures through [`FailureSink`]; each report takes the
//! group lock, changes the config and commits it to the surviving disks
//! before the engine acknowledges the I/O that saw the failure.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use uuid::Uuid;

use super::Group;
use super::status::StatusReport;
use crate::format::PlexState;
use crate::volume::engine::{EngineOptions, EnginePlex, FailureSink, MirrorVolume, Mode};
use crate::volume::queue::{DiskQueue, Watchdog};

pub struct LiveGroup {
    group: Mutex<Group>,
    queues: BTreeMap<Uuid, Arc<DiskQueue>>,
    volumes: RwLock<BTreeMap<String, Arc<MirrorVolume>>>,
    /// I/O errors seen per disk since the group was started.
    errors: Mutex<BTreeMap<Uuid, u64>>,
    _watchdog: Watchdog,
}

impl LiveGroup {
    /// Puts an assembled group in service: a queue for every online disk, an
    /// engine for every volume.
    pub fn start(group: Group, opts: EngineOptions) -> Arc<LiveGroup> {
        let mut queues = BTreeMap::new();
        for (uuid, m) in &group.members {
            if group.is_online(*uuid) {
                let name = m.path.display().to_string();
                queues.insert(
                    *uuid,
                    DiskQueue::start(&name, m.disk.clone(), opts.threads_per_disk),
                );
            }
        }
        let watchdog = Watchdog::start(
            queues.values().map(Arc::downgrade).collect(),
            opts.io_timeout,
        );
        Arc::new_cyclic(|me: &Weak<LiveGroup>| {
            let sink: Weak<dyn FailureSink> = me.clone();
            let mut volumes = BTreeMap::new();
            for v in &group.config.volumes {
                let plexes = v
                    .plexes
                    .iter()
                    .filter_map(|p| {
                        let queue = queues.get(&p.disk)?;
                        let mode = match p.state {
                            PlexState::InSync => Mode::InSync,
                            PlexState::Resyncing => Mode::WriteOnly,
                            PlexState::Stale | PlexState::Failed => return None,
                        };
                        let offset = group.members[&p.disk].label.layout.data_offset() + p.offset;
                        Some(EnginePlex::new(p.disk, queue.clone(), offset, mode))
                    })
                    .collect();
                volumes.insert(
                    v.name.clone(),
                    MirrorVolume::new(&v.name, v.size, plexes, sink.clone(), opts.clone()),
                );
            }
            LiveGroup {
                group: Mutex::new(group),
                queues,
                volumes: RwLock::new(volumes),
                errors: Mutex::new(BTreeMap::new()),
                _watchdog: watchdog,
            }
        })
    }

    /// The engine of a volume.
    pub fn volume(&self, name: &str) -> Option<Arc<MirrorVolume>> {
        self.volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The names of the volumes in service.
    pub fn volume_names(&self) -> Vec<String> {
        self.volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The group, locked.
    pub fn group(&self) -> MutexGuard<'_, Group> {
        self.group.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Status with what the running engine knows: error counts make a disk
    /// `online-errors` and its volumes `failed-redundancy-at-risk`.
    pub fn status(&self) -> StatusReport {
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.group().status_with(&errors)
    }

    fn count_error(&self, disk: Uuid) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(disk)
            .or_default() += 1;
    }

    /// Commits a change the engine reported, then takes out of the engines
    /// whatever the config no longer has in service (a disk that failed its
    /// config write is marked failed by the commit itself). Returns whether
    /// any disk took the config.
    fn commit(&self, g: &mut Group, what: &str) -> bool {
        let ok = match g.commit() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "the config change for {what} could not be written");
                false
            }
        };
        for v in self
            .volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let Some(entry) = g.config.volume(&v.name) else {
                continue;
            };
            for p in v.plexes() {
                let state = entry
                    .plexes
                    .iter()
                    .find(|e| e.disk == p.disk)
                    .map(|e| g.plex_state(e.disk, e.state));
                if !matches!(state, Some("in-sync" | "resyncing")) {
                    p.set_mode(Mode::Out);
                }
            }
        }
        ok
    }

    /// Stops the disk queues after the work queued on them.
    pub fn stop(&self) {
        for q in self.queues.values() {
            q.stop();
        }
    }
}

impl LiveGroup {
    /// Takes a whole disk out of service: in the config (its last in-sync
    /// plexes keep their data and state) and in every volume's engine.
    fn fail_disk(&self, g: &mut Group, disk: Uuid) {
        g.mark_disk_failed(disk);
        for v in self
            .volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            for p in v.plexes() {
                if p.disk == disk {
                    p.set_mode(Mode::Out);
                }
            }
        }
    }
}

impl FailureSink for LiveGroup {
    fn plex_failed(&self, volume: &str, disk: Uuid, error: &io::Error) -> bool {
        self.count_error(disk);
        let mut g = self.group();
        let path = g.disk_path(disk);
        if error.kind() == io::ErrorKind::TimedOut {
            // A hung disk answers nothing, config writes included: the whole
            // disk goes out of service, so no commit waits on it.
            tracing::error!(%volume, disk = %path, %error, "disk hung; it is failed");
            self.fail_disk(&mut g, disk);
        } else {
            tracing::error!(%volume, disk = %path, %error, "plex failed");
            g.mark_plex_failed(volume, disk);
        }
        self.commit(&mut g, &format!("the failed plex of {volume} on {path}"))
    }

    fn last_copy_failed(&self, volume: &str, disk: Uuid, error: &io::Error) {
        self.count_error(disk);
        let mut g = self.group();
        let path = g.disk_path(disk);
        tracing::error!(%volume, disk = %path, %error, "the last in-sync plex failed; its disk is taken out of service");
        self.fail_disk(&mut g, disk);
        self.commit(&mut g, &format!("failed disk {path}"));
    }

    fn read_error(&self, volume: &str, disk: Uuid, error: &io::Error, repaired: bool) {
        self.count_error(disk);
        tracing::warn!(%volume, %disk, %error, repaired, "read error");
    }
}

impl Drop for LiveGroup {
    fn drop(&mut self) {
        self.stop();
    }
}
