//! Volume I/O for one command: the engine of a volume, started on the disks
//! the group has at hand, with a sink that records what happened so the
//! command can put it in the config before it goes on ([`Group::settle`]).
//! `serve` keeps the engines running instead ([`super::live`]).

use std::io;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::Group;
use crate::volume::engine::{EngineOptions, EnginePlex, FailureSink, MirrorVolume, Mode};
use crate::{Error, Result};

/// What the engine reported during a command.
#[derive(Debug)]
enum Event {
    /// The plex failed; `true` when the error is the whole disk's.
    PlexFailed(Uuid, String, bool),
    LastCopyFailed(Uuid, String),
    ReadError(Uuid, String, bool),
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl FailureSink for Recorder {
    /// Recorded in memory: the command commits it before it reports
    /// success, and fails if it cannot.
    fn plex_failed(&self, _: &str, disk: Uuid, error: &io::Error) -> bool {
        self.push(Event::PlexFailed(
            disk,
            error.to_string(),
            crate::volume::error::disk_wide(error),
        ));
        true
    }
    fn last_copy_failed(&self, _: &str, disk: Uuid, error: &io::Error) {
        self.push(Event::LastCopyFailed(disk, error.to_string()));
    }
    fn read_error(&self, _: &str, disk: Uuid, error: &io::Error, repaired: bool) {
        self.push(Event::ReadError(disk, error.to_string(), repaired));
    }
}

impl Recorder {
    fn push(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }
}

/// A volume's engine for the length of one command.
pub struct VolumeIo {
    pub engine: Arc<MirrorVolume>,
    recorder: Arc<Recorder>,
    _sink: Arc<dyn FailureSink>,
}

impl VolumeIo {
    /// Waits for background read repairs to finish.
    fn quiesce(&self) {
        self.engine.wait_idle();
    }
}

impl Drop for VolumeIo {
    fn drop(&mut self) {
        // The queues are the disks': they outlive the engine.
        self.quiesce();
    }
}

impl Group {
    /// Starts the engine of a volume on its plexes that are present: in-sync
    /// plexes serve reads and take writes, resyncing ones take writes.
    pub fn open_volume(&self, name: &str) -> Result<VolumeIo> {
        self.open_volume_with(name, None)
    }

    /// Starts the engine of a volume as [`Group::open_volume`] does, with the
    /// plex on `resync` write-only whatever its state (stale included): the
    /// engine a resync of that plex runs in.
    pub fn open_volume_with(&self, name: &str, resync: Option<Uuid>) -> Result<VolumeIo> {
        let recorder = Arc::new(Recorder::default());
        let sink: Arc<dyn FailureSink> = recorder.clone();
        let engine = self.build_engine(
            name,
            resync,
            Arc::downgrade(&sink),
            EngineOptions::default(),
        )?;
        Ok(VolumeIo {
            engine,
            recorder,
            _sink: sink,
        })
    }

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
                Some(EnginePlex::new(
                    p.disk,
                    m.disk.queue().clone(),
                    m.label.layout.data_offset() + p.offset,
                    mode,
                ))
            })
            .collect();
        let engine = MirrorVolume::new(&v.name, v.size, plexes, sink, opts);
        if let Some(b) = &self.bitmaps {
            engine.set_intent(b.clone());
        }
        Ok(engine)
    }

    /// Records in the config what the engine reported, and commits when that
    /// changed anything. Repaired read errors become warnings.
    pub fn settle(&mut self, io: &VolumeIo) -> Result<()> {
        io.quiesce();
        let events =
            std::mem::take(&mut *io.recorder.events.lock().unwrap_or_else(|e| e.into_inner()));
        let name = io.engine.name.clone();
        let mut changed = false;
        for e in events {
            match e {
                Event::PlexFailed(disk, error, true) => {
                    self.warnings.push(format!(
                        "disk {}: I/O error ({error}); the whole disk is marked failed",
                        self.disk_path(disk)
                    ));
                    self.mark_disk_failed(
                        disk,
                        Some("it failed an I/O, so its data cannot be trusted"),
                    );
                    changed = true;
                }
                Event::PlexFailed(disk, error, false) => {
                    self.warnings.push(format!(
                        "disk {}: I/O error ({error}); its plex of volume {name} is marked failed",
                        self.disk_path(disk)
                    ));
                    self.mark_plex_failed(&name, disk);
                    changed = true;
                }
                Event::LastCopyFailed(disk, error) => {
                    self.warnings.push(format!(
                        "disk {}: I/O error ({error}) on the last in-sync plex of volume {name}; the disk is marked failed",
                        self.disk_path(disk)
                    ));
                    self.mark_disk_failed(
                        disk,
                        Some("it failed an I/O, so its data cannot be trusted"),
                    );
                    changed = true;
                }
                Event::ReadError(disk, error, repaired) => self.warnings.push(format!(
                    "disk {}: a read error ({error}) {} from another plex of volume {name}",
                    self.disk_path(disk),
                    if repaired {
                        "was repaired"
                    } else {
                        "could not be repaired"
                    }
                )),
            }
        }
        if changed {
            self.commit()?;
        }
        Ok(())
    }

    /// Writes `data` to a volume at `offset` through the engine; plexes that
    /// fail the write are failed in the config before it returns.
    pub fn write(&mut self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        // Refuse a range past the end before prepare_write commits anything.
        let size = self.volume(name)?.size;
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::refused(format!(
                "{} bytes at offset {offset} lie past the end of volume {name} ({size} bytes)",
                data.len()
            )));
        }
        self.prepare_write(name)?;
        let io = self.open_volume(name)?;
        let r = io.engine.write(offset, data);
        self.settle(&io)?;
        r.map_err(|e| io_refusal(name, e))
    }

    /// Reads from a volume at `offset`, falling back across plexes.
    pub fn read(&mut self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.require_source(name)?;
        let io = self.open_volume(name)?;
        let r = io.engine.read(offset, buf);
        self.settle(&io)?;
        r.map_err(|e| io_refusal(name, e))
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
