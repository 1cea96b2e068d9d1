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
                let engine = MirrorVolume::new(&v.name, v.size, plexes, sink.clone(), opts.clone());
                if let Some(b) = &group.bitmaps {
                    engine.set_intent(b.clone());
                }
                volumes.insert(v.name.clone(), engine);
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

    /// Starts the thread that clears the write-intent bits of regions idle
    /// for `period` (between one and two periods, as md's bitmap daemon).
    /// It ends with the group.
    pub fn start_bitmap_clearing(self: &Arc<Self>, period: std::time::Duration) {
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("bitmap-clear".into())
            .spawn(move || {
                let step = std::time::Duration::from_millis(100);
                loop {
                    let mut slept = std::time::Duration::ZERO;
                    while slept < period {
                        std::thread::sleep(step);
                        slept += step;
                        if me.strong_count() == 0 {
                            return;
                        }
                    }
                    match me.upgrade() {
                        Some(live) => live.clear_bitmaps(false),
                        None => return,
                    }
                }
            })
            .expect("spawn the bitmap clearing thread");
    }

    /// One clearing pass over every disk's bitmap (`now`: every idle region
    /// at once, as on a clean shutdown). Regions of volumes with a plex out
    /// of sync, in the config or in the engine, keep their bits.
    pub fn clear_bitmaps(&self, now: bool) {
        let work = {
            let g = self.group();
            let Some(set) = g.bitmaps.clone() else {
                return;
            };
            let volumes = self.volumes.read().unwrap_or_else(|e| e.into_inner());
            let degraded: Vec<&str> = volumes
                .values()
                .filter(|v| v.plexes().iter().any(|p| p.mode() == Mode::Out))
                .map(|v| v.name.as_str())
                .collect();
            let mut work = Vec::new();
            for (uuid, b) in &set.disks {
                if !g.is_online(*uuid) {
                    continue;
                }
                let mut pinned = g.pinned_extents(*uuid);
                for v in &g.config.volumes {
                    if degraded.contains(&v.name.as_str())
                        || v.plexes.len() > volumes.get(&v.name).map_or(0, |e| e.plexes().len())
                    {
                        pinned.extend(
                            v.plexes
                                .iter()
                                .filter(|p| p.disk == *uuid)
                                .map(|p| p.offset..p.offset + p.length),
                        );
                    }
                }
                work.push((b.clone(), pinned, g.disk_path(*uuid)));
            }
            work
        };
        for (b, pinned, path) in work {
            let overlaps =
                |r: std::ops::Range<u64>| pinned.iter().any(|p| p.start < r.end && r.start < p.end);
            match b.clear_idle(now, &overlaps) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(disk = %path, regions = n, "write-intent bits cleared"),
                Err(e) => {
                    tracing::warn!(disk = %path, error = %e, "cannot clear write-intent bits")
                }
            }
        }
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
        g.mark_disk_failed(
            disk,
            Some("it failed an I/O, so its data cannot be trusted"),
        );
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
