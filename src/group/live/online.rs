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
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::LiveGroup;
use crate::disk::{Disk, FileDisk};
use crate::group::Group;
use crate::group::Progress;
use crate::group::events::{Event, EventKind};
use crate::group::io::io_refusal;
use crate::group::ops::{Endpoint, copy_chunks, human, path_io, refuse_smaller};
use crate::group::scrub::VolumeScrub;
use crate::volume::engine::{MirrorVolume, Mode};
use crate::volume::scrub::{ScrubOptions, ScrubProgress};
use crate::{Error, Result};

/// How long a leaving plex may keep requests in flight (a hung disk's are
/// failed by the watchdog well before).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Takes the plexes on `disks` out of `engine`, each once no request holds
/// it (a hung disk's requests are failed by the watchdog well before
/// [`DRAIN_TIMEOUT`]).
fn drain(engine: &MirrorVolume, disks: &[Uuid]) {
    for d in disks {
        if !engine.remove_plex(*d, DRAIN_TIMEOUT) {
            tracing::warn!(volume = %engine.name, disk = %d, "requests to a plex that left the volume are still in flight");
        }
    }
}

/// How long an admin operation waits for a background scrub it stopped.
const SCRUB_STOP_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Holds `name` for the length of `op`: its resync stops at its next
    /// checkpoint (waited for here, off the controller) and none starts
    /// until `op` returned. Refused when the resync does not stop (its disk
    /// hangs): a plex it writes to must not change hands.
    fn with_resync_paused<T>(&self, name: &str, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let held = name.to_string();
        let stopped = self.call(move |c| c.hold(&held)).flatten();
        let r = match stopped.map(|rx| rx.recv_timeout(DRAIN_TIMEOUT)) {
            Some(Err(std::sync::mpsc::RecvTimeoutError::Timeout)) => Err(Error::failed(format!(
                "the resync of volume {name} did not stop within {} s; try again once its disks answer",
                DRAIN_TIMEOUT.as_secs()
            ))),
            _ => op(),
        };
        let held = name.to_string();
        self.send(move |c| c.release(&held));
        r
    }

    fn refuse_scrubbing(&self, name: &str, doing: &str) -> Result<()> {
        self.make_way(name, Some(doing))
    }

    /// Refuses `doing` (None: another scrub) while an admin scrubs `name`;
    /// a background scrub of it is stopped instead, and waited for.
    fn make_way(&self, name: &str, doing: Option<&str>) -> Result<()> {
        let deadline = std::time::Instant::now() + SCRUB_STOP_TIMEOUT;
        loop {
            let (n, d) = (name.to_string(), doing.map(str::to_string));
            let busy = self.ask(move |c| match c.scrubbing.get(&n) {
                None => Ok(false),
                Some(s) if s.background => {
                    s.cancel();
                    Ok(true)
                }
                Some(_) => Err(Error::refused(match d {
                    Some(d) => format!("volume {n} is being scrubbed; {d} it after the scrub ends"),
                    None => format!("volume {n} is being scrubbed already"),
                })),
            })?;
            if !busy {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::failed(format!(
                    "the background scrub of volume {name} did not stop within {} s; try again once its disks answer",
                    SCRUB_STOP_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes out of the engine of `name` every plex the volume's config no
    /// longer lists, once no request holds it: its space can then be reused,
    /// or serve another volume.
    fn drain_departed(&self, name: &str) {
        let Some(engine) = self.volume(name) else {
            return;
        };
        let n = name.to_string();
        let listed: Vec<Uuid> = self
            .with_group(move |g| match g.volume(&n) {
                Ok(v) => v.plexes.iter().map(|p| p.disk).collect(),
                Err(_) => Vec::new(),
            })
            .unwrap_or_default();
        let gone: Vec<Uuid> = engine
            .plexes()
            .iter()
            .map(|p| p.disk)
            .filter(|d| !listed.contains(d))
            .collect();
        drain(&engine, &gone);
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
        let (name, disks) = (name.to_string(), disks.to_vec());
        self.ask(move |c| {
            let warnings = c.changed(|g| g.create(&name, size, copies, &disks))?;
            c.add_engine(&name);
            let g = &mut c.group;
            let on: Vec<String> = g
                .volume(&name)?
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
            Ok(Done::new(message, g, warnings))
        })
    }

    /// `init PATH... --disks ...` while serving: the disks are formatted as
    /// new disks of the group (hot spares with `spare`) and put in service.
    pub fn join(
        &self,
        paths: &[std::path::PathBuf],
        opts: &crate::group::ops::InitOptions,
    ) -> Result<Done> {
        let _op = self.op_lock();
        let (paths, opts) = (paths.to_vec(), opts.clone());
        self.ask(move |c| {
            // The new disks' queues came with them (each disk is opened
            // behind one); the engines find them through the members.
            c.changed(|g| g.join(&paths, &opts))?;
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
                c.group.config.name
            );
            // A new spare may be what a degraded mirror waits for.
            c.use_spares();
            Ok(Done::new(message, &mut c.group, Vec::new()))
        })
    }

    /// `add-mirror` while serving: the new plex is recorded resyncing and
    /// filled by a background resync.
    pub fn add_mirror(&self, name: &str, disk: Option<&Path>) -> Result<Done> {
        let _op = self.op_lock();
        let (name, disk) = (name.to_string(), disk.map(Path::to_path_buf));
        self.ask(move |c| {
            let target = c.changed(|g| g.add_resyncing_plex(&name, disk.as_deref()))?;
            let warnings = c.group.mirror_warnings(&name);
            let message = format!(
                "added a mirror to volume {name} on {}; it resyncs in the background (see `mirrorvol status`)",
                c.group.disk_path(target)
            );
            c.resume_resyncs();
            Ok(Done::new(message, &mut c.group, warnings))
        })
    }

    /// `repair` while serving: failed or missing plexes are replaced with
    /// new space (resynced in the background), stale ones resync in place.
    pub fn repair(&self, name: &str, disk: Option<&Path>) -> Result<Done> {
        let _op = self.op_lock();
        self.with_resync_paused(name, || {
            let (n, disk) = (name.to_string(), disk.map(Path::to_path_buf));
            let done = self.ask(move |c| {
                let (targets, stale) = c.changed(|g| g.repair_config(&n, disk.as_deref()))?;
                c.retire_plexes();
                let g = &mut c.group;
                let mut parts: Vec<String> = targets
                    .iter()
                    .map(|t| format!("a new plex on {}", g.disk_path(*t)))
                    .collect();
                parts.extend(
                    stale
                        .iter()
                        .map(|t| format!("the stale plex on {}", g.disk_path(*t))),
                );
                let warnings = g.mirror_warnings(&n);
                let message = format!(
                    "repairing volume {n}: {} resync{} in the background (see `mirrorvol status`)",
                    parts.join(" and "),
                    if parts.len() == 1 { "s" } else { "" }
                );
                Ok(Done::new(message, g, warnings))
            })?;
            self.drain_departed(name);
            Ok(done)
        })
    }

    /// `remove-mirror` while serving: the plex leaves the config, then the
    /// engine once no request holds it; clients go on.
    pub fn remove_mirror(&self, name: &str, disk: &Path) -> Result<Done> {
        let _op = self.op_lock();
        self.refuse_scrubbing(name, "remove a mirror of")?;
        self.with_resync_paused(name, || {
            let (n, disk) = (name.to_string(), disk.to_path_buf());
            let done = self.ask(move |c| {
                let uuid = c.group.resolve_disk(&disk)?;
                c.without_last_copy(&n, &disk, "removing it", |g| g.remove_mirror(&n, &disk))?;
                let message = format!(
                    "removed the plex on {} from volume {n}",
                    c.group.disk_path(uuid)
                );
                Ok(Done::new(message, &mut c.group, Vec::new()))
            })?;
            self.drain_departed(name);
            Ok(done)
        })
    }

    /// `replace OLD NEW`: the copies on OLD are rebuilt on NEW (in the
    /// background under serve; the caller runs them in the foreground
    /// offline), and OLD leaves the group once they are all in sync
    /// ([`LiveGroup::finish_replacements`]).
    pub fn replace(&self, old: &Path, new: &Path) -> Result<Done> {
        let op = self.op_lock();
        let (old, new) = (old.to_path_buf(), new.to_path_buf());
        let (done, nothing_to_copy) = self.ask(move |c| {
            let volumes = c.changed(|g| g.start_replace(&old, &new))?;
            let mut warnings = Vec::new();
            for v in &volumes {
                c.changed(|g| g.add_resyncing_plex(v, Some(&new)))?;
                warnings.extend(c.group.mirror_warnings(v));
            }
            c.resume_resyncs();
            let g = &c.group;
            let (os, ns) = (
                g.disk_path(g.resolve_disk(&old)?),
                g.disk_path(g.resolve_disk(&new)?),
            );
            let message = if volumes.is_empty() {
                format!("disk {os} holds no copy: it leaves the group, replaced by {ns}")
            } else {
                format!(
                    "replacing disk {os} by {ns}: the copies of {} are rebuilt on {ns}, and {os} leaves the group once they are in sync",
                    volumes.join(", ")
                )
            };
            Ok((
                Done::new(message, &mut c.group, warnings),
                volumes.is_empty(),
            ))
        })?;
        drop(op);
        // No copy to wait for: it leaves now.
        if nothing_to_copy {
            self.finish_replacements();
        }
        Ok(done)
    }

    /// `replace OLD --cancel`.
    pub fn cancel_replace(&self, old: &Path) -> Result<Done> {
        let _op = self.op_lock();
        let old = old.to_path_buf();
        self.ask(move |c| {
            let message = c.changed(|g| g.cancel_replace(&old))?;
            Ok(Done::new(message, &mut c.group, Vec::new()))
        })
    }

    /// Ends every replacement whose copies are all in sync on the new
    /// disk: the old disk's copies leave their volumes, then the disk
    /// leaves the group. Returns what was done, a line each.
    pub fn finish_replacements(&self) -> Vec<String> {
        let _one = self.finishing.lock().unwrap_or_else(|e| e.into_inner());
        let ready = self
            .with_group(|g| g.ready_replacements())
            .unwrap_or_default();
        let mut done = Vec::new();
        'each: for (old, new, volumes) in ready {
            for v in &volumes {
                if let Err(e) = self.remove_mirror(v, Path::new(&old)) {
                    tracing::error!(disk = %old, volume = %v, error = %e, "the replaced disk's copy could not be taken off");
                    continue 'each;
                }
            }
            match self.remove_disk(Path::new(&old)) {
                Ok(_) => {
                    let line = format!("replaced disk {old} by {new}");
                    tracing::info!("{line}");
                    done.push(line);
                }
                Err(e) => {
                    tracing::error!(disk = %old, error = %e, "the replaced disk could not leave the group")
                }
            }
        }
        done
    }

    /// `remove-disk` (while serving, or offline through the controller): an
    /// empty, failed or missing disk leaves the group; the plexes it held
    /// leave their volumes' engines once no request holds them.
    pub fn remove_disk(&self, path: &Path) -> Result<Done> {
        let _op = self.op_lock();
        let path = path.to_path_buf();
        let (mut done, volumes, departed) = self.ask(move |c| {
            let (shown, volumes, member) = c.group.remove_disk(&path)?;
            let mut message = format!("removed disk {shown} from group {}", c.group.config.name);
            if !volumes.is_empty() {
                message.push_str(&format!(
                    "; its copies of {} are gone from those volumes",
                    volumes.join(", ")
                ));
            }
            c.retire_plexes();
            c.emit_changes();
            let done = Done::new(message, &mut c.group, Vec::new());
            Ok((done, volumes, member.map(|m| (m, shown))))
        })?;
        // Here, not on the controller's thread: a disk that hangs holds
        // this request only.
        if let Some((m, shown)) = departed {
            done.warnings
                .extend(super::super::ops::wipe_departed(&m, &shown));
        }
        for v in &volumes {
            self.drain_departed(v);
        }
        Ok(done)
    }

    /// `break` while serving: the plex leaves the volume (its clients go
    /// on with the other plexes) and, kept, becomes a volume of its own with
    /// the data of the moment it left. Returns the new volume's name; the
    /// caller exports it.
    pub fn break_mirror(
        &self,
        name: &str,
        disk: &Path,
        new_name: Option<&str>,
        nokeep: bool,
    ) -> Result<(Option<String>, Done)> {
        let _op = self.op_lock();
        self.refuse_scrubbing(name, "break")?;
        self.with_resync_paused(name, || {
            let (n, d, new_name) = (
                name.to_string(),
                disk.to_path_buf(),
                new_name.map(str::to_string),
            );
            let (uuid, kept) = self.ask(move |c| {
                let uuid = c.group.resolve_disk(&d)?;
                let kept = c.without_last_copy(&n, &d, "breaking it off", |g| {
                    g.break_mirror(&n, &d, new_name.as_deref(), nokeep)
                })?;
                Ok((uuid, kept))
            })?;
            // Writes in flight to the plex land before it serves elsewhere.
            self.drain_departed(name);
            let (n, k) = (name.to_string(), kept.clone());
            let done = self.ask(move |c| {
                let message = match &k {
                    Some(new) => {
                        c.add_engine(new);
                        format!(
                            "broke volume {n}: the plex on {} is now volume {new}",
                            c.group.disk_path(uuid)
                        )
                    }
                    None => format!(
                        "broke volume {n}: the plex on {} was freed",
                        c.group.disk_path(uuid)
                    ),
                };
                Ok(Done::new(message, &mut c.group, Vec::new()))
            })?;
            Ok((kept, done))
        })
    }

    /// `delete` while serving, once the volume's export and clients are
    /// gone: its engine is flushed and stopped, then the volume leaves the
    /// config. If the config cannot be written, the engine is back.
    pub fn delete_volume(&self, name: &str) -> Result<Done> {
        let _op = self.op_lock();
        self.refuse_scrubbing(name, "delete")?;
        let n = name.to_string();
        self.ask(move |c| c.group.volume(&n).map(|_| ()))?;
        self.with_resync_paused(name, || {
            let n = name.to_string();
            let engine = self.call(move |c| c.remove_engine(&n)).flatten();
            if let Some(e) = &engine {
                let _ = e.flush();
                let disks: Vec<Uuid> = e.plexes().iter().map(|p| p.disk).collect();
                drain(e, &disks);
            }
            let n = name.to_string();
            self.ask(move |c| {
                if let Err(err) = c.changed(|g| g.delete(&n)) {
                    c.add_engine(&n);
                    return Err(err);
                }
                Ok(Done::new(
                    format!("deleted volume {n}"),
                    &mut c.group,
                    Vec::new(),
                ))
            })
        })
    }

    /// `extend` while serving: the volume grows; clients see the new size
    /// when they connect again (NBD fixes the size at the handshake).
    pub fn extend(&self, name: &str, size: u64) -> Result<Done> {
        let _op = self.op_lock();
        let name = name.to_string();
        self.ask(move |c| {
            c.changed(|g| g.extend(&name, size))?;
            if let Some(e) = c.engine(&name) {
                e.grow(size);
            }
            Ok(Done::new(
                format!("extended volume {name} to {}", human(size)),
                &mut c.group,
                Vec::new(),
            ))
        })
    }

    /// `scrub` while serving: compares (and with `repair`, fixes) the plexes
    /// through the running engine, under its range lock, while clients do
    /// I/O. The comparison runs on the caller's thread.
    pub fn scrub(
        &self,
        name: &str,
        repair: bool,
        rate: Option<u64>,
        progress: &dyn crate::group::Progress,
    ) -> Result<VolumeScrub> {
        let n = name.to_string();
        self.ask(move |c| c.group.refuse_unscrubbable(&n))?;
        self.make_way(name, None)?;
        let n = name.to_string();
        let tracked = self.ask(move |c| {
            c.group.refuse_unscrubbable(&n)?;
            if c.scrubbing.contains_key(&n) {
                return Err(Error::refused(format!(
                    "volume {n} is being scrubbed already"
                )));
            }
            let size = c.group.volume(&n)?.size;
            let tracked = ScrubProgress::new(size, repair, false);
            c.scrubbing.insert(n, tracked.clone());
            Ok(tracked)
        })?;
        struct Unmark<'a>(&'a LiveGroup, String);
        impl Drop for Unmark<'_> {
            fn drop(&mut self) {
                let n = std::mem::take(&mut self.1);
                self.0.send(move |c| {
                    c.scrubbing.remove(&n);
                });
            }
        }
        let _unmark = Unmark(self, name.to_string());
        let engine = self.in_service(name)?;
        let opts = ScrubOptions {
            repair,
            max_rate: rate,
            stop: Some(self.scrub_stop.clone()),
            cancel: None,
        };
        progress.start(
            &format!("{} {name}", if repair { "scrub --repair" } else { "scrub" }),
            engine.size(),
        );
        let result = crate::volume::scrub::scrub(&engine, &opts, &|done| {
            tracked.set(done);
            progress.set(done);
        });
        progress.finish();
        let n = name.to_string();
        self.ask(move |c| {
            let report = c.group.scrub_outcome(&n, &opts, result)?;
            for r in &report.ranges {
                let event = Event::new(EventKind::ScrubMismatch)
                    .with("group", c.group.config.name.as_str())
                    .with("volume", n.as_str())
                    .with("offset", r.offset)
                    .with("length", r.length)
                    .with("plexes", r.plexes())
                    .with("kept", r.kept.as_str())
                    .with("outvoted", r.outvoted.clone())
                    .with("repaired", if r.repaired { "yes" } else { "no" })
                    .with("verdict", r.verdict.name());
                c.emit(event);
            }
            Ok(report)
        })
    }

    /// Writes `data` to volume `name` at `offset` through its engine, as a
    /// client's write would go: plexes on absent disks are recorded stale
    /// first (under `serve` they were, at its start), and a plex that fails
    /// the write is failed by the controller.
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        let (n, len) = (name.to_string(), data.len() as u64);
        // Refuse a range past the end before anything is recorded.
        let size = self.ask(move |c| c.group.volume(&n).map(|v| v.size))?;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::refused(format!(
                "{len} bytes at offset {offset} lie past the end of volume {name} ({size} bytes)"
            )));
        }
        self.prepare_write(name)?;
        let e = self.in_service(name)?;
        e.write(offset, data).map_err(|err| io_refusal(name, err))
    }

    /// The engine of volume `name`, or a refusal naming it.
    fn in_service(&self, name: &str) -> Result<Arc<MirrorVolume>> {
        self.volume(name)
            .ok_or_else(|| Error::refused(format!("no volume named {name} is in service")))
    }

    /// Before data is written to volume `name` by a command: its plexes on
    /// absent disks are recorded stale, as they miss it (under `serve` they
    /// were, at its start).
    fn prepare_write(&self, name: &str) -> Result<()> {
        let n = name.to_string();
        self.ask(move |c| {
            let r = c.group.prepare_write(&n);
            c.retire_plexes();
            c.emit_changes();
            r
        })
    }

    /// Reads volume `name` at `offset` through its engine (from any in-sync
    /// plex, repairing a plex that fails the read from another).
    pub fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = name.to_string();
        self.ask(move |c| c.group.require_source(&n))?;
        let e = self.in_service(name)?;
        let r = e.read(offset, buf).map_err(|err| io_refusal(name, err));
        // A read repair runs behind the read: done before the caller looks.
        e.wait_idle();
        r
    }

    /// `copy` while serving: through the running engines, so clients of a
    /// source volume go on (the caller refuses a target volume with
    /// clients).
    pub fn copy(
        &self,
        src: &Endpoint,
        dst: &Endpoint,
        rate: Option<u64>,
        gone: &dyn Fn() -> bool,
        progress: &dyn Progress,
    ) -> Result<u64> {
        enum Side {
            Path(std::path::PathBuf, FileDisk),
            Volume(Arc<MirrorVolume>),
        }
        let engine = |name: &str| -> Result<Arc<MirrorVolume>> {
            let e = self.in_service(name)?;
            if !e.plexes().iter().any(|p| p.mode() == Mode::InSync) {
                return Err(Error::refused(format!("volume {name} has no in-sync plex")));
            }
            Ok(e)
        };
        Endpoint::refuse_pair(src, dst)?;
        let (source, size, what) = match src {
            Endpoint::Volume(n) => {
                let name = n.clone();
                self.ask(move |c| c.group.volume(&name).map(|_| ()))?;
                let e = engine(n)?;
                let size = e.size();
                (Side::Volume(e), size, format!("volume {n}"))
            }
            Endpoint::Path(p) => {
                let path = p.clone();
                let d = self.ask(move |c| c.group.open_path_source(&path))?;
                let size = d.size();
                (Side::Path(p.clone(), d), size, p.display().to_string())
            }
        };
        let target = match dst {
            Endpoint::Volume(n) => {
                let name = n.clone();
                let room = self.ask(move |c| c.group.volume(&name).map(|v| v.size))?;
                refuse_smaller(n, room, &what, size)?;
                self.prepare_write(n)?;
                Side::Volume(engine(n)?)
            }
            Endpoint::Path(p) => {
                let path = p.clone();
                let d = self.ask(move |c| c.group.open_path_target(&path, size, &what))?;
                Side::Path(p.clone(), d)
            }
        };
        let io = |side: &Side, pos: u64, chunk: &mut [u8], write: bool| match side {
            Side::Volume(e) if write => e.write(pos, chunk).map_err(|err| io_refusal(&e.name, err)),
            Side::Volume(e) => e.read(pos, chunk).map_err(|err| io_refusal(&e.name, err)),
            Side::Path(p, d) => path_io(p, d, pos, chunk, write),
        };
        let describe = |side: &Side| match side {
            Side::Volume(e) => format!("volume {}", e.name),
            Side::Path(p, _) => p.display().to_string(),
        };
        let (from, to) = (describe(&source), describe(&target));
        progress.start(&format!("copy {from} to {to}"), size);
        // Shown in `status` on the volume written, or else the one read.
        let tracked = Arc::new(CopyProgress {
            meter: crate::volume::meter::Meter::new(size),
            from,
            to,
        });
        // (refuse_pair refused a copy between two paths).
        let shown_on = match (&target, &source) {
            (Side::Volume(e), _) | (_, Side::Volume(e)) => e.name.clone(),
            (Side::Path(..), Side::Path(..)) => String::new(),
        };
        let (n, t) = (shown_on.clone(), tracked.clone());
        self.send(move |c| {
            c.copies.insert(n, t);
        });
        struct Unmark<'a>(&'a LiveGroup, String, Arc<CopyProgress>);
        impl Drop for Unmark<'_> {
            fn drop(&mut self) {
                let (n, t) = (std::mem::take(&mut self.1), self.2.clone());
                self.0.send(move |c| {
                    // Another copy of the same volume may have come since.
                    if c.copies.get(&n).is_some_and(|x| Arc::ptr_eq(x, &t)) {
                        c.copies.remove(&n);
                    }
                });
            }
        }
        let _unmark = Unmark(self, shown_on, tracked.clone());
        let shown = Tracked(progress, &tracked);
        let stopped = copy_chunks(size, &shown, rate.unwrap_or(0), gone, |pos, chunk| {
            io(&source, pos, chunk, false)?;
            io(&target, pos, chunk, true)
        })?;
        if let Some(at) = stopped {
            progress.finish();
            return Err(Error::failed(format!(
                "the copy from {} to {} stopped after {}: its client went away",
                describe(&source),
                describe(&target),
                crate::group::ops::human(at)
            )));
        }
        match &target {
            Side::Volume(e) => e.flush().map_err(|err| io_refusal(&e.name, err))?,
            Side::Path(p, d) => d.flush().map_err(|e| Error::io_path("flush", p, e))?,
        }
        progress.finish();
        Ok(size)
    }
}

/// A copy under way (`copy` through the control socket), for `status`.
#[derive(Debug)]
pub struct CopyProgress {
    meter: crate::volume::meter::Meter,
    pub from: String,
    pub to: String,
}

impl std::ops::Deref for CopyProgress {
    type Target = crate::volume::meter::Meter;
    fn deref(&self) -> &crate::volume::meter::Meter {
        &self.meter
    }
}

/// A progress sink that also moves a copy's meter on.
struct Tracked<'a>(&'a dyn Progress, &'a CopyProgress);

impl Progress for Tracked<'_> {
    fn start(&self, what: &str, total: u64) {
        self.0.start(what, total);
    }
    fn set(&self, done: u64) {
        self.1.set(done);
        self.0.set(done);
    }
    fn finish(&self) {
        self.0.finish();
    }
}

/// Hot spares: a plex that fails is rebuilt onto a spare without the admin
/// (md's behaviour; `serve --hot-spares off` leaves it to `repair`).
impl LiveGroup {
    /// Rebuilds failed plexes onto spares from now on, resynced with
    /// `resync`; and at once, for plexes failed or missing already.
    pub fn enable_hot_spares(&self, remote_delay: std::time::Duration) {
        self.send(move |c| c.enable_hot_spares(remote_delay));
    }

    /// Rebuilds what it can onto spares (on the thread the controller
    /// started for it), drains the plexes that left, and resumes the
    /// resyncs.
    pub(super) fn rebuild_onto_spares(&self) {
        let _op = self.op_lock();
        let rebuilt = self.call(|c| c.rebuild_onto_spares()).unwrap_or_default();
        for name in rebuilt {
            self.drain_departed(&name);
        }
        self.send(|c| c.resume_resyncs());
    }
}
