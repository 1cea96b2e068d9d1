//! Operations of the control socket that change the volumes while they
//! serve: the offline commands' checks and config changes
//! ([`super::super::ops`]), then the engines brought in line with the new
//! config.
//!
//! The rules that keep clients' data whole:
//! - a plex leaves an engine only once no request holds it
//!   ([`MirrorVolume::remove_plex`]), so its space is never reused, and a
//!   split-off plex never exported, while a write to it is in flight;
//! - a plex joins an engine write-only and is read from only after a resync
//!   ([`LiveGroup::start_resyncs`]);
//! - a volume's background resync is stopped (at a checkpoint) before one of
//!   its plexes leaves, and resumed afterwards;
//! - operations run one at a time.

use std::path::Path;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::LiveGroup;
use crate::disk::{Disk, FileDisk};
use crate::group::Group;
use crate::group::NoProgress;
use crate::group::events::{Event, EventKind};
use crate::group::io::io_refusal;
use crate::group::ops::{Endpoint, copy_chunks, human, path_io, refuse_smaller};
use crate::group::scrub::VolumeScrub;
use crate::volume::engine::{MirrorVolume, Mode};
use crate::volume::scrub::ScrubOptions;
use crate::{Error, Result};

/// How long a leaving plex may keep requests in flight (a hung disk's are
/// failed by the watchdog well before).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Takes the plexes on `disks` out of `engine`, each once no request holds
/// it (a hung disk's requests are failed by the watchdog well before
/// [`DRAIN_TIMEOUT`]).
fn drain(engine: &MirrorVolume, disks: &[Uuid]) {
    for d in disks {
        if let Err(p) = engine.remove_plex(*d, DRAIN_TIMEOUT) {
            tracing::warn!(volume = %engine.name, disk = %p.queue.name(), "requests to a plex that left the volume are still in flight");
        }
    }
}

/// What an online operation did, for the command to print.
#[derive(Debug, Default)]
pub struct Done {
    pub message: String,
    pub warnings: Vec<String>,
}

impl Done {
    pub(super) fn new(message: String, g: &mut Group, mut warnings: Vec<String>) -> Done {
        warnings.extend(g.warnings.split_off(0));
        Done { message, warnings }
    }
}

impl LiveGroup {
    /// Runs a config change, then emits the events of the states it
    /// changed.
    fn changed<T>(&self, g: &mut Group, change: impl FnOnce(&mut Group) -> Result<T>) -> Result<T> {
        let r = change(g);
        self.emit_changes(g);
        r
    }

    fn op_lock(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the background resync of `name` at its next chunk and waits for
    /// its thread to end (it records its checkpoint); `resume_resyncs`
    /// resumes it.
    fn pause_resync(&self, name: &str) -> bool {
        let started = Instant::now();
        while self.resync_volumes().contains(name) {
            if started.elapsed() > DRAIN_TIMEOUT {
                return false;
            }
            if let Some(r) = self.running().get(name) {
                r.progress.stop();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Runs `op` with the resync of `name` paused, then resumes the resyncs
    /// (whatever `op` returned). Refused when the resync does not stop (its
    /// disk hangs): a plex it writes to must not change hands.
    fn with_resync_paused<T>(
        self: &Arc<Self>,
        name: &str,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let r = if self.pause_resync(name) {
            op()
        } else {
            Err(Error::failed(format!(
                "the resync of volume {name} did not stop within {} s; try again once its disks answer",
                DRAIN_TIMEOUT.as_secs()
            )))
        };
        self.resume_resyncs();
        r
    }

    fn refuse_scrubbing(&self, name: &str, doing: &str) -> Result<()> {
        if self
            .scrubbing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
        {
            return Err(Error::refused(format!(
                "volume {name} is being scrubbed; {doing} it after the scrub ends"
            )));
        }
        Ok(())
    }

    /// Takes out of the engine of `name` every plex the volume's config no
    /// longer lists, once no request holds it: its space can then be reused,
    /// or serve another volume.
    fn drain_departed(&self, name: &str) {
        let Some(engine) = self.volume(name) else {
            return;
        };
        let listed: Vec<Uuid> = match self.group().volume(name) {
            Ok(v) => v.plexes.iter().map(|p| p.disk).collect(),
            Err(_) => Vec::new(),
        };
        let gone: Vec<Uuid> = engine
            .plexes()
            .iter()
            .map(|p| p.disk)
            .filter(|d| !listed.contains(d))
            .collect();
        drain(&engine, &gone);
    }

    /// Starts the engine of a volume the config has and the engines lack.
    fn add_engine(&self, g: &Group, name: &str) -> Result<Arc<MirrorVolume>> {
        let entry = g.volume(name)?;
        let engine = Self::engine_for(g, &self.me, &self.opts, entry);
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), engine.clone());
        Ok(engine)
    }

    /// `create` while serving: the volume is zeroed, recorded, and its
    /// engine started; the caller exports it.
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        copies: usize,
        disks: &[std::path::PathBuf],
    ) -> Result<Done> {
        let _op = self.op_lock();
        let mut g = self.group();
        let warnings = self.changed(&mut g, |g| g.create(name, size, copies, disks))?;
        self.add_engine(&g, name)?;
        let on: Vec<String> = g
            .volume(name)?
            .plexes
            .iter()
            .map(|p| g.disk_path(p.disk))
            .collect();
        let message = format!(
            "created {} volume {name} ({}) on {}",
            if copies > 1 { "mirrored" } else { "simple" },
            human(size),
            on.join(", ")
        );
        Ok(Done::new(message, &mut g, warnings))
    }

    /// `init PATH... --disks ...` while serving: the disks are formatted as
    /// new disks of the group (hot spares with `spare`) and put in service.
    pub fn join(
        &self,
        paths: &[std::path::PathBuf],
        opts: &crate::group::ops::InitOptions,
    ) -> Result<Done> {
        let done = {
            let _op = self.op_lock();
            let mut g = self.group();
            // The new disks' queues came with them (each disk is opened
            // behind one); the engines find them through the members.
            self.changed(&mut g, |g| g.join(paths, opts))?;
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            let message = format!(
                "initialized {} as {} {} of existing group {}",
                names.join(", "),
                opts.style,
                match (opts.spare, names.len() > 1) {
                    (true, true) => "hot spares",
                    (true, false) => "hot spare",
                    (false, true) => "disks",
                    (false, false) => "disk",
                },
                g.config.name
            );
            Done::new(message, &mut g, Vec::new())
        };
        // A new spare may be what a degraded mirror waits for.
        self.use_spares();
        Ok(done)
    }

    /// `add-mirror` while serving: the new plex is recorded resyncing and
    /// filled by a background resync.
    pub fn add_mirror(self: &Arc<Self>, name: &str, disk: Option<&Path>) -> Result<Done> {
        let _op = self.op_lock();
        let done = {
            let mut g = self.group();
            let target = self.changed(&mut g, |g| g.add_resyncing_plex(name, disk))?;
            let warnings = g.mirror_warnings(name);
            let message = format!(
                "added a mirror to volume {name} on {}; it resyncs in the background (see `mirrorvol status`)",
                g.disk_path(target)
            );
            Done::new(message, &mut g, warnings)
        };
        self.resume_resyncs();
        Ok(done)
    }

    /// `repair` while serving: failed or missing plexes are replaced with
    /// new space (resynced in the background), stale ones resync in place.
    pub fn repair(self: &Arc<Self>, name: &str, disk: Option<&Path>) -> Result<Done> {
        let _op = self.op_lock();
        self.with_resync_paused(name, || {
            let done = {
                let mut g = self.group();
                let (targets, stale) = self.changed(&mut g, |g| g.repair_config(name, disk))?;
                self.retire_plexes(&g);
                let mut parts: Vec<String> = targets
                    .iter()
                    .map(|t| format!("a new plex on {}", g.disk_path(*t)))
                    .collect();
                parts.extend(
                    stale
                        .iter()
                        .map(|t| format!("the stale plex on {}", g.disk_path(*t))),
                );
                let warnings = g.mirror_warnings(name);
                let message = format!(
                    "repairing volume {name}: {} resync{} in the background (see `mirrorvol status`)",
                    parts.join(" and "),
                    if parts.len() == 1 { "s" } else { "" }
                );
                Done::new(message, &mut g, warnings)
            };
            self.drain_departed(name);
            Ok(done)
        })
    }

    /// `remove-mirror` while serving: the plex leaves the config, then the
    /// engine once no request holds it; clients go on.
    pub fn remove_mirror(self: &Arc<Self>, name: &str, disk: &Path) -> Result<Done> {
        let _op = self.op_lock();
        self.refuse_scrubbing(name, "remove a mirror of")?;
        self.with_resync_paused(name, || {
            let done = {
                let mut g = self.group();
                let uuid = g.resolve_disk(disk)?;
                self.changed(&mut g, |g| g.remove_mirror(name, disk))?;
                self.retire_plexes(&g);
                let message = format!(
                    "removed the plex on {} from volume {name}",
                    g.disk_path(uuid)
                );
                Done::new(message, &mut g, Vec::new())
            };
            self.drain_departed(name);
            Ok(done)
        })
    }

    /// `break` while serving: the plex leaves the volume (its clients go
    /// on with the other plexes) and, kept, becomes a volume of its own with
    /// the data of the moment it left. Returns the new volume's name; the
    /// caller exports it.
    pub fn break_mirror(
        self: &Arc<Self>,
        name: &str,
        disk: &Path,
        new_name: Option<&str>,
        nokeep: bool,
    ) -> Result<(Option<String>, Done)> {
        let _op = self.op_lock();
        self.refuse_scrubbing(name, "break")?;
        self.with_resync_paused(name, || {
            let (uuid, kept) = {
                let mut g = self.group();
                let uuid = g.resolve_disk(disk)?;
                let kept =
                    self.changed(&mut g, |g| g.break_mirror(name, disk, new_name, nokeep))?;
                self.retire_plexes(&g);
                (uuid, kept)
            };
            // Writes in flight to the plex land before it serves elsewhere.
            self.drain_departed(name);
            let mut g = self.group();
            let message = match &kept {
                Some(n) => {
                    self.add_engine(&g, n)?;
                    format!(
                        "broke volume {name}: the plex on {} is now volume {n}",
                        g.disk_path(uuid)
                    )
                }
                None => format!(
                    "broke volume {name}: the plex on {} was freed",
                    g.disk_path(uuid)
                ),
            };
            Ok((kept, Done::new(message, &mut g, Vec::new())))
        })
    }

    /// `delete` while serving, once the volume's export and clients are
    /// gone: its engine is flushed and stopped, then the volume leaves the
    /// config. If the config cannot be written, the engine is back.
    pub fn delete_volume(self: &Arc<Self>, name: &str) -> Result<Done> {
        let _op = self.op_lock();
        self.refuse_scrubbing(name, "delete")?;
        self.group().volume(name)?;
        self.with_resync_paused(name, || {
            let engine = self
                .volumes
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
            if let Some(e) = &engine {
                let _ = e.flush();
                let disks: Vec<Uuid> = e.plexes().iter().map(|p| p.disk).collect();
                drain(e, &disks);
            }
            let mut g = self.group();
            if let Err(err) = self.changed(&mut g, |g| g.delete(name)) {
                self.add_engine(&g, name)?;
                return Err(err);
            }
            Ok(Done::new(
                format!("deleted volume {name}"),
                &mut g,
                Vec::new(),
            ))
        })
    }

    /// `extend` while serving: the volume grows; clients see the new size
    /// when they connect again (NBD fixes the size at the handshake).
    pub fn extend(&self, name: &str, size: u64) -> Result<Done> {
        let _op = self.op_lock();
        let mut g = self.group();
        self.changed(&mut g, |g| g.extend(name, size))?;
        if let Some(e) = self.volume(name) {
            e.grow(size);
        }
        Ok(Done::new(
            format!(
                "extended volume {name} to {}; connected clients see the new size when they reconnect",
                human(size)
            ),
            &mut g,
            Vec::new(),
        ))
    }

    /// `scrub` while serving: compares (and with `repair`, fixes) the plexes
    /// through the running engine, under its range lock, while clients do
    /// I/O.
    pub fn scrub(&self, name: &str, repair: bool, rate: Option<u64>) -> Result<VolumeScrub> {
        self.group().refuse_unscrubbable(name)?;
        if !self
            .scrubbing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string())
        {
            return Err(Error::refused(format!(
                "volume {name} is being scrubbed already"
            )));
        }
        struct Unmark<'a>(&'a LiveGroup, &'a str);
        impl Drop for Unmark<'_> {
            fn drop(&mut self) {
                self.0
                    .scrubbing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(self.1);
            }
        }
        let _unmark = Unmark(self, name);
        let engine = self
            .volume(name)
            .ok_or_else(|| Error::refused(format!("volume {name} is not in service")))?;
        let opts = ScrubOptions {
            repair,
            max_rate: rate,
            stop: Some(self.scrub_stop.clone()),
        };
        let result = crate::volume::scrub::scrub(&engine, &opts, &|_| {});
        let g = self.group();
        let report = g.scrub_outcome(name, &opts, result)?;
        for r in &report.ranges {
            self.emit(
                Event::new(EventKind::ScrubMismatch)
                    .with("group", g.config.name.as_str())
                    .with("volume", name)
                    .with("offset", r.offset)
                    .with("length", r.length)
                    .with("plexes", r.plexes())
                    .with("kept", r.kept.as_str())
                    .with("outvoted", r.outvoted.clone())
                    .with("repaired", if r.repaired { "yes" } else { "no" }),
            );
        }
        Ok(report)
    }

    /// `copy` while serving: through the running engines, so clients of a
    /// source volume go on (the caller refuses a target volume with
    /// clients).
    pub fn copy(&self, src: &Endpoint, dst: &Endpoint) -> Result<u64> {
        enum Side {
            Path(std::path::PathBuf, FileDisk),
            Volume(Arc<MirrorVolume>),
        }
        let engine = |name: &str| -> Result<Arc<MirrorVolume>> {
            let e = self
                .volume(name)
                .ok_or_else(|| Error::refused(format!("no volume named {name} is in service")))?;
            if !e.plexes().iter().any(|p| p.mode() == Mode::InSync) {
                return Err(Error::refused(format!("volume {name} has no in-sync plex")));
            }
            Ok(e)
        };
        Endpoint::refuse_pair(src, dst)?;
        let (source, target, size) = {
            let g = self.group();
            let (source, size, what) = match src {
                Endpoint::Volume(n) => {
                    g.volume(n)?;
                    let e = engine(n)?;
                    let size = e.size();
                    (Side::Volume(e), size, format!("volume {n}"))
                }
                Endpoint::Path(p) => {
                    let d = g.open_path_source(p)?;
                    let size = d.size();
                    (Side::Path(p.clone(), d), size, p.display().to_string())
                }
            };
            let target = match dst {
                Endpoint::Volume(n) => {
                    refuse_smaller(n, g.volume(n)?.size, &what, size)?;
                    Side::Volume(engine(n)?)
                }
                Endpoint::Path(p) => Side::Path(p.clone(), g.open_path_target(p, size, &what)?),
            };
            (source, target, size)
        };
        let io = |side: &Side, pos: u64, chunk: &mut [u8], write: bool| match side {
            Side::Volume(e) if write => e.write(pos, chunk).map_err(|err| io_refusal(&e.name, err)),
            Side::Volume(e) => e.read(pos, chunk).map_err(|err| io_refusal(&e.name, err)),
            Side::Path(p, d) => path_io(p, d, pos, chunk, write),
        };
        copy_chunks(size, &NoProgress, |pos, chunk| {
            io(&source, pos, chunk, false)?;
            io(&target, pos, chunk, true)
        })?;
        match &target {
            Side::Volume(e) => e.flush().map_err(|err| io_refusal(&e.name, err))?,
            Side::Path(p, d) => d.flush().map_err(|e| Error::io_path("flush", p, e))?,
        }
        Ok(size)
    }
}

/// Hot spares: a plex that fails is rebuilt onto a spare without the admin
/// (md's behaviour; `serve --hot-spares off` leaves it to `repair`).
impl LiveGroup {
    /// Rebuilds failed plexes onto spares from now on, resynced with
    /// `resync`; and at once, for plexes failed or missing already.
    pub fn enable_hot_spares(self: &Arc<Self>) {
        self.hot_spares
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.use_spares();
    }

    /// Looks, on a thread of its own, for volumes with a failed or missing
    /// plex and a spare to rebuild it on. Called after every failure; never
    /// blocks the caller (the engine reports failures holding its locks).
    pub(super) fn use_spares(&self) {
        if !self.hot_spares.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let me = self.me.clone();
        let _ = std::thread::Builder::new()
            .name("hot-spare".into())
            .spawn(move || {
                if let Some(live) = me.upgrade() {
                    live.rebuild_onto_spares();
                }
            });
    }

    fn rebuild_onto_spares(self: &Arc<Self>) {
        let _op = self.op_lock();
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut rebuilt = Vec::new();
        {
            let mut g = self.group();
            let names: Vec<String> = g.config.volumes.iter().map(|v| v.name.clone()).collect();
            for name in names {
                loop {
                    match self.changed(&mut g, |g| g.repair_onto_spare(&name)) {
                        Ok(Some((spare, old))) => {
                            let line = format!(
                                "hot spare {} replaces the plex of volume {name} on {}; it resyncs in the background",
                                g.disk_path(spare),
                                g.disk_path(old)
                            );
                            tracing::warn!("{line}");
                            eprintln!("{line}");
                            rebuilt.push(name.clone());
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(volume = %name, error = %e, "no rebuild onto a hot spare");
                            break;
                        }
                    }
                }
            }
            for w in g.warnings.split_off(0) {
                eprintln!("warning: {w}");
            }
            self.retire_plexes(&g);
        }
        rebuilt.dedup();
        for name in rebuilt {
            self.drain_departed(&name);
        }
        self.resume_resyncs();
    }
}
