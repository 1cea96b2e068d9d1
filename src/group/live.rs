//! A group in service: the assembled group, a queue per disk, the mirror
//! engine of every volume, and the failure handling that keeps the config
//! true while I/O runs.
//!
//! The engine reports failures through [`FailureSink`]; each report takes the
//! group lock, changes the config and commits it to the surviving disks
//! before the engine acknowledges the I/O that saw the failure.
//!
//! Plexes to resync (resyncing, or stale on a disk in service) are resynced
//! in the background while the volumes serve I/O ([`LiveGroup::start_resyncs`]):
//! one thread per volume, one plex at a time, throttled, with checkpoints in
//! the config.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};

use uuid::Uuid;

use super::Group;
use super::events::{Event, EventKind, Events, Snapshot};
use super::status::StatusReport;

mod online;
use crate::format::PlexState;
use crate::volume::engine::{EngineOptions, EnginePlex, FailureSink, MirrorVolume, Mode};
use crate::volume::queue::DiskQueue;
use crate::volume::resync::{ResyncError, ResyncOptions, ResyncProgress, resync};
pub use online::Done;

/// A background resync under way.
struct Running {
    disk: Uuid,
    progress: Arc<ResyncProgress>,
}

pub struct LiveGroup {
    group: Mutex<Group>,
    volumes: RwLock<BTreeMap<String, Arc<MirrorVolume>>>,
    /// I/O errors seen per disk since the group was started.
    errors: Mutex<BTreeMap<Uuid, u64>>,
    /// Background resyncs under way, by volume.
    resyncs: Mutex<BTreeMap<String, Running>>,
    resync_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Volumes with a resync thread; changed under the group lock, so a
    /// thread that finds nothing left to do and a new resync started meanwhile
    /// never miss each other.
    resync_volumes: Mutex<std::collections::BTreeSet<String>>,
    stopping: std::sync::atomic::AtomicBool,
    /// Tells a background scrub to stop between chunks.
    scrub_stop: Arc<std::sync::atomic::AtomicBool>,
    /// Online operations run one at a time.
    ops: Mutex<()>,
    /// Volumes a `scrub` through the control socket is comparing.
    scrubbing: Mutex<std::collections::BTreeSet<String>>,
    opts: EngineOptions,
    me: Weak<LiveGroup>,
    /// The pace of background resyncs ([`LiveGroup::start_resyncs`]).
    resync_opts: Mutex<ResyncOptions>,
    /// Set when failed plexes are rebuilt onto hot spares by themselves.
    hot_spares: std::sync::atomic::AtomicBool,
    /// Where events go (set by `serve`); unset, they are only logged.
    events: OnceLock<Events>,
    /// The disk and volume states the events last reported.
    reported: Mutex<Snapshot>,
}

impl LiveGroup {
    /// Puts an assembled group in service: a queue for every online disk, an
    /// engine for every volume.
    pub fn start(group: Group, opts: EngineOptions) -> Arc<LiveGroup> {
        Arc::new_cyclic(|me: &Weak<LiveGroup>| {
            let mut volumes = BTreeMap::new();
            for v in &group.config.volumes {
                let engine = Self::engine_for(&group, me, &opts, v);
                volumes.insert(v.name.clone(), engine);
            }
            let reported = Snapshot::of(&group);
            LiveGroup {
                group: Mutex::new(group),
                volumes: RwLock::new(volumes),
                errors: Mutex::new(BTreeMap::new()),
                resyncs: Mutex::new(BTreeMap::new()),
                resync_threads: Mutex::new(Vec::new()),
                resync_volumes: Mutex::new(std::collections::BTreeSet::new()),
                stopping: std::sync::atomic::AtomicBool::new(false),
                scrub_stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                ops: Mutex::new(()),
                scrubbing: Mutex::new(std::collections::BTreeSet::new()),
                opts,
                me: me.clone(),
                resync_opts: Mutex::new(ResyncOptions::default()),
                hot_spares: std::sync::atomic::AtomicBool::new(false),
                events: OnceLock::new(),
                reported: Mutex::new(reported),
            }
        })
    }

    /// The engine of the volume `v`: its in-sync plexes serve, resyncing
    /// ones take writes; stale and failed plexes join when a resync starts.
    fn engine_for(
        group: &Group,
        me: &Weak<LiveGroup>,
        opts: &EngineOptions,
        v: &crate::format::VolumeEntry,
    ) -> Arc<MirrorVolume> {
        let sink: Weak<dyn FailureSink> = me.clone();
        let plexes = v
            .plexes
            .iter()
            .filter_map(|p| {
                // The queue the disk was opened behind: data and metadata
                // meet in one queue per disk, under one deadline.
                let queue = group.members.get(&p.disk)?.disk.queue();
                let mode = match group.plex_state(p.disk, p.state) {
                    "in-sync" => Mode::InSync,
                    "resyncing" => Mode::WriteOnly,
                    _ => return None,
                };
                let offset = group.members[&p.disk].label.layout.data_offset() + p.offset;
                Some(EnginePlex::new(p.disk, queue.clone(), offset, mode))
            })
            .collect();
        let engine = MirrorVolume::new(&v.name, v.size, plexes, sink, opts.clone());
        if let Some(b) = &group.bitmaps {
            engine.set_intent(b.clone());
        }
        engine
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

    /// The queue of every disk in service, with the disk's UUID: the
    /// metrics endpoint reads their statistics.
    pub fn disk_queues(&self) -> Vec<(Uuid, Arc<DiskQueue>)> {
        self.group()
            .members
            .iter()
            .map(|(u, m)| (*u, m.disk.queue().clone()))
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
        let g = self.group();
        let mut report = g.status_with(&errors);
        for (name, r) in self.running().iter() {
            let path = g.disk_path(r.disk);
            let plex = report
                .volumes
                .iter_mut()
                .filter(|v| v.name == *name)
                .flat_map(|v| v.plexes.iter_mut())
                .find(|p| p.disk == path);
            if let Some(p) = plex {
                p.state = "resyncing";
                p.resync_percent = Some((r.progress.percent() * 10.0).floor() / 10.0);
                p.resync_rate = Some(r.progress.rate());
                p.resync_eta_seconds = r.progress.eta_seconds();
            }
            // A stale plex being resynced makes its volume resynching, as
            // a plex recorded resyncing does (Group::volume_state).
            for v in report.volumes.iter_mut().filter(|v| v.name == *name) {
                if v.state == "failed-redundancy" && v.plexes.iter().any(|p| p.state == "resyncing")
                {
                    v.state = "resynching";
                }
            }
        }
        // A volume whose every in-sync plex waits on a disk past the
        // deadline is not answering: its last copy is waited for, and says so.
        for v in report.volumes.iter_mut() {
            let Some(engine) = self.volume(&v.name) else {
                continue;
            };
            let serving: Vec<Arc<EnginePlex>> = engine
                .plexes()
                .into_iter()
                .filter(|p| p.mode() == Mode::InSync)
                .collect();
            if !serving.is_empty() && serving.iter().all(|p| p.queue.stalled()) {
                v.state = "not-answering";
                v.waiting_on = serving.iter().map(|p| g.disk_path(p.disk)).collect();
            }
        }
        report
    }

    fn running(&self) -> MutexGuard<'_, BTreeMap<String, Running>> {
        self.resyncs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The progress of the background resync of `volume`, if one runs.
    pub fn resync_progress(&self, volume: &str) -> Option<Arc<ResyncProgress>> {
        self.running().get(volume).map(|r| r.progress.clone())
    }

    /// Whether a background resync runs or waits to run.
    pub fn resyncing(&self) -> bool {
        !self.running().is_empty()
            || self
                .resync_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|t| !t.is_finished())
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
        // The config says it; the engines do not yet.
        crate::crash_point!("live-commit-before-engine");
        self.retire_plexes(g);
        ok
    }

    /// Takes out of the engines every plex the config no longer has in
    /// service.
    fn retire_plexes(&self, g: &Group) {
        let running = self.running();
        for v in self
            .volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let Some(entry) = g.config.volume(&v.name) else {
                continue;
            };
            let target = running.get(&v.name).map(|r| r.disk);
            for p in v.plexes() {
                let state = entry
                    .plexes
                    .iter()
                    .find(|e| e.disk == p.disk)
                    .map(|e| g.plex_state(e.disk, e.state));
                let kept = match state {
                    Some("in-sync" | "resyncing") => true,
                    // A stale plex takes writes while the bitmaps' regions
                    // are copied onto it.
                    Some("stale") => target == Some(p.disk),
                    _ => false,
                };
                if !kept {
                    p.set_mode(Mode::Out);
                }
            }
        }
    }

    /// Starts the group's timer thread: every second it asks each disk in
    /// service whether it is still the one opened ([`LiveGroup::check_disks`]),
    /// and every `period` it clears the write-intent bits of regions idle for
    /// that long (between one and two periods, as md's bitmap daemon). It
    /// ends with the group.
    pub fn start_bitmap_clearing(self: &Arc<Self>, period: std::time::Duration) {
        const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("group-timer".into())
            .spawn(move || {
                let mut since_clear = std::time::Duration::ZERO;
                loop {
                    std::thread::sleep(CHECK_EVERY);
                    since_clear += CHECK_EVERY;
                    let Some(live) = me.upgrade() else { return };
                    live.check_disks();
                    if since_clear >= period {
                        since_clear = std::time::Duration::ZERO;
                        live.clear_bitmaps(false);
                    }
                }
            })
            .expect("spawn the group timer thread");
    }

    /// Fails every disk in service that is no longer the one opened (its
    /// file deleted or truncated) or that does not answer the question
    /// within the deadline. The disks are asked without the group lock.
    pub fn check_disks(&self) {
        let disks: Vec<(Uuid, Arc<crate::volume::queue::QueuedDisk>)> = {
            let g = self.group();
            g.members
                .iter()
                .filter(|(u, _)| g.is_online(**u))
                .map(|(u, m)| (*u, m.disk.clone()))
                .collect()
        };
        for (uuid, disk) in disks {
            if let Err(error) = crate::disk::Disk::health(&*disk) {
                self.fail_whole_disk(uuid, "the disk failed its check", &error);
            }
        }
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
            for (uuid, b) in set.all() {
                if !g.is_online(uuid) {
                    continue;
                }
                let mut pinned = g.pinned_extents(uuid);
                for v in &g.config.volumes {
                    if degraded.contains(&v.name.as_str())
                        || v.plexes.len() > volumes.get(&v.name).map_or(0, |e| e.plexes().len())
                    {
                        pinned.extend(
                            v.plexes
                                .iter()
                                .filter(|p| p.disk == uuid)
                                .map(|p| p.offset..p.offset + p.length),
                        );
                    }
                }
                work.push((b.clone(), pinned, g.disk_path(uuid)));
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

    /// Scrubs every mirrored volume in the background, one after the other,
    /// every `interval`, comparing at most `max_rate` bytes per second (it
    /// only reports: repairing is the admin's decision, as with md's
    /// `check`). Mismatching ranges go to the log and to stderr; a plex that
    /// fails a read during the scrub is failed as on any other I/O.
    pub fn start_scrubs(self: &Arc<Self>, interval: std::time::Duration, max_rate: u64) {
        let me = Arc::downgrade(self);
        let stop = self.scrub_stop.clone();
        let t = std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || {
                let opts = crate::volume::scrub::ScrubOptions {
                    repair: false,
                    max_rate: Some(max_rate),
                    stop: Some(stop.clone()),
                };
                let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
                loop {
                    let started = std::time::Instant::now();
                    while started.elapsed() < interval {
                        if stopped() {
                            return;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    let Some(live) = me.upgrade() else { return };
                    for name in live.volume_names() {
                        let Some(vol) = live.volume(&name) else {
                            continue;
                        };
                        let result = crate::volume::scrub::scrub(&vol, &opts, &|_| {});
                        if stopped() {
                            return;
                        }
                        live.report_scrub(&name, result);
                    }
                }
            })
            .expect("spawn the scrub thread");
        self.resync_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
    }

    fn report_scrub(
        &self,
        name: &str,
        result: std::result::Result<
            crate::volume::scrub::ScrubReport,
            crate::volume::scrub::ScrubError,
        >,
    ) {
        use crate::volume::scrub::ScrubError;
        match result {
            Ok(r) if r.mismatches.is_empty() => {
                tracing::info!(volume = %name, bytes = r.checked_bytes, "scrub found the plexes equal");
            }
            Ok(r) => {
                let g = self.group();
                for m in &r.mismatches {
                    let line = format!(
                        "scrub of volume {name}: plexes differ at offset {}, {} bytes (disk {} against {})",
                        m.offset,
                        m.length,
                        g.disk_path(m.kept),
                        m.outvoted
                            .iter()
                            .map(|d| g.disk_path(*d))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    tracing::error!("{line}");
                    eprintln!("{line}");
                    let kept = g.disk_path(m.kept);
                    let outvoted: Vec<String> =
                        m.outvoted.iter().map(|d| g.disk_path(*d)).collect();
                    self.emit(
                        Event::new(EventKind::ScrubMismatch)
                            .with("group", g.config.name.as_str())
                            .with("volume", name)
                            .with("offset", m.offset)
                            .with("length", m.length)
                            .with("plexes", [vec![kept.clone()], outvoted.clone()].concat())
                            .with("kept", kept)
                            .with("outvoted", outvoted),
                    );
                }
            }
            Err(ScrubError::TooFewPlexes { .. }) => {}
            Err(e) => {
                tracing::error!(volume = %name, error = %e, "scrub stopped");
                eprintln!("{e}");
            }
        }
    }

    /// Stops the background resyncs (each records its checkpoint) and waits
    /// for them.
    pub fn stop_resyncs(&self) {
        {
            // Under the group lock: a thread preparing its next resync
            // either sees the flag or is registered below, and stopped.
            let _g = self.group();
            self.stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.scrub_stop
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        for r in self.running().values() {
            r.progress.stop();
        }
        let threads = std::mem::take(
            &mut *self
                .resync_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in threads {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Stops the background work. The disk queues stay: they belong to
    /// the disks, and the group's last bitmap and config writes go through
    /// them.
    pub fn stop(&self) {
        self.stop_resyncs();
    }
}

impl LiveGroup {
    /// Takes a whole disk out of service in the config (its last in-sync
    /// plexes keep their data and state); the engines follow at the commit
    /// that records it ([`LiveGroup::commit`] retires every plex the config
    /// no longer has in service).
    /// Takes a disk in service out of service for an error that is the
    /// whole disk's: recorded in the config, reported, and a hot spare
    /// sought for its plexes.
    fn fail_whole_disk(&self, disk: Uuid, why: &str, error: &dyn std::fmt::Display) {
        self.count_error(disk);
        let mut g = self.group();
        if !g.is_online(disk) {
            return;
        }
        let path = g.disk_path(disk);
        tracing::error!(disk = %path, %error, "{why}; the disk is taken out of service");
        self.fail_disk(&mut g, disk);
        self.commit(&mut g, &format!("failed disk {path}"));
        self.emit_changes(&g);
        drop(g);
        self.use_spares();
    }

    fn fail_disk(&self, g: &mut Group, disk: Uuid) {
        g.mark_disk_failed(
            disk,
            Some("it failed an I/O, so its data cannot be trusted"),
        );
    }
}

/// Operations of the control socket: the offline commands' checks and config
/// changes, applied to the engines while clients do I/O.
impl LiveGroup {
    /// `fail PATH [--force]` while serving: the disk is failed in the config
    /// (refused as offline when it holds a last in-sync plex, unless
    /// `force`) and its plexes leave every engine; a resync onto it stops.
    pub fn fail_disk_by_path(&self, path: &std::path::Path, force: bool) -> crate::Result<Done> {
        let mut g = self.group();
        let uuid = g.check_fail(path, force)?;
        self.take_out_of_engines(uuid, force, path)?;
        g.mark_disk_failed(uuid, None);
        g.commit()?;
        let done = Done::new(
            format!("marked disk {} failed", g.disk_path(uuid)),
            &mut g,
            Vec::new(),
        );
        for r in self.running().values() {
            if r.disk == uuid {
                r.progress.stop();
            }
        }
        // The config has the disk failed: its plexes leave every engine.
        self.retire_plexes(&g);
        self.emit_changes(&g);
        tracing::info!(disk = %path.display(), "disk failed by the admin");
        self.use_spares();
        Ok(done)
    }

    /// Takes the plexes on `disk` out of every engine at once, under the
    /// engines' decision locks (taken in volume-name order), unless one is
    /// a last in-sync plex as the engines see it and `force` is not given.
    /// The engines may have failed another plex a moment ago without the
    /// config saying so yet (its record waits for the group lock, which the
    /// caller holds): checking the config alone could then fail both.
    fn take_out_of_engines(
        &self,
        disk: Uuid,
        force: bool,
        path: &std::path::Path,
    ) -> crate::Result<()> {
        let volumes: Vec<Arc<MirrorVolume>> = self
            .volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|v| v.plex(disk).is_some())
            .cloned()
            .collect();
        let _decisions: Vec<_> = volumes.iter().map(|v| v.decision()).collect();
        if !force && let Some(v) = volumes.iter().find(|v| v.last_in_sync(disk)) {
            return Err(crate::Error::refused(format!(
                "disk {} holds the last in-sync plex of volume {} (its other plexes failed and are being recorded); use --force to fail it anyway",
                path.display(),
                v.name
            )));
        }
        for v in &volumes {
            if let Some(p) = v.plex(disk) {
                p.set_mode(Mode::Out);
            }
        }
        Ok(())
    }

    /// `reactivate PATH` while serving: the disk is recorded online and
    /// its plexes stale; the background resyncs bring them in sync (write-
    /// only in the engine until then). Returns at once, saying whether a
    /// resync started. Only a disk that was in service when `serve` started
    /// has a queue to come back to.
    pub fn reactivate_by_path(self: &Arc<Self>, path: &std::path::Path) -> crate::Result<Done> {
        let (vols, warnings, shown) = {
            let mut g = self.group();
            // A disk absent until now (hot-plugged back) becomes a member
            // first: found by its path, or by its label at a new path.
            let uuid = match g.resolve_disk(path) {
                Ok(u) if g.members.contains_key(&u) => u,
                Ok(_) => g.attach(path)?,
                Err(e) => g.attach(path).map_err(|_| e)?,
            };
            let (_, vols) = g.reactivate_config(path)?;
            // The errors that failed it are behind it now (md forgets a
            // re-added member's errors as well): counted again from zero,
            // the disk is `online`, not `online-errors`, once back in sync.
            self.errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uuid);
            let warnings = g.warnings.split_off(0);
            // A plex that kept its in-sync state (a last copy failed with
            // --force) serves again as it is.
            for name in &vols {
                let (Some(engine), Some(entry)) = (self.volume(name), g.config.volume(name)) else {
                    continue;
                };
                for p in &entry.plexes {
                    if p.disk == uuid
                        && g.plex_state(p.disk, p.state) == "in-sync"
                        && let Some(ep) = engine.plex(uuid)
                    {
                        ep.set_mode(Mode::InSync);
                    }
                }
            }
            self.retire_plexes(&g);
            self.emit_changes(&g);
            let vols = vols
                .into_iter()
                .filter(|n| Self::next_target(&g, n) == Some(uuid))
                .count();
            (vols, warnings, g.disk_path(uuid))
        };
        self.resume_resyncs();
        tracing::info!(disk = %shown, "disk reactivated while serving");
        Ok(Done {
            message: if vols > 0 {
                format!("reactivated disk {shown}; resync started")
            } else {
                format!("reactivated disk {shown}")
            },
            warnings,
        })
    }
}

/// One plex resync a volume's thread is about to run.
struct ResyncJob {
    /// The group's name and the target disk's path, for events.
    group: String,
    path: String,
    disk: Uuid,
    engine: Arc<MirrorVolume>,
    target: Arc<EnginePlex>,
    plan: super::resync::ResyncPlan,
    progress: Arc<ResyncProgress>,
    why: String,
}

impl LiveGroup {
    /// Paces the background resyncs with `opts` from now on, and starts
    /// them ([`LiveGroup::resume_resyncs`]).
    pub fn start_resyncs(self: &Arc<Self>, opts: ResyncOptions) {
        *self.resync_opts.lock().unwrap_or_else(|e| e.into_inner()) = opts;
        self.resume_resyncs();
    }

    /// Starts a background resync thread for every volume that has a plex
    /// to resync (resyncing, or stale on a disk in service) and an in-sync
    /// plex to copy from, and none running. Each thread resyncs its volume's
    /// plexes one after the other, paced by the options of
    /// [`LiveGroup::start_resyncs`], and records each in sync when done.
    pub fn resume_resyncs(self: &Arc<Self>) {
        let opts = self
            .resync_opts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let names: Vec<String> = {
            let g = self.group();
            let mut threads = self.resync_volumes();
            let names: Vec<String> = g
                .config
                .volumes
                .iter()
                .filter(|v| !threads.contains(&v.name))
                .filter(|v| Self::next_target(&g, &v.name).is_some())
                .map(|v| v.name.clone())
                .collect();
            threads.extend(names.iter().cloned());
            names
        };
        for name in names {
            let me = Arc::downgrade(self);
            let opts = opts.clone();
            let t = std::thread::Builder::new()
                .name(format!("resync-{name}"))
                .spawn(move || resync_volume(me, &name, &opts))
                .expect("spawn a resync thread");
            self.resync_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(t);
        }
    }

    /// The plex of `name` to resync next: resyncing or stale, on a disk in
    /// service, with an in-sync plex to copy from.
    fn next_target(g: &Group, name: &str) -> Option<Uuid> {
        let v = g.config.volume(name)?;
        g.require_source(name).ok()?;
        v.plexes
            .iter()
            .find(|p| {
                g.members.contains_key(&p.disk)
                    && matches!(g.plex_state(p.disk, p.state), "resyncing" | "stale")
            })
            .map(|p| p.disk)
    }

    /// Prepares the next resync of `name`: records a plex that needs a full
    /// copy as resyncing, puts the plex in the engine write-only, plans the
    /// copy (after that, so every write the plex misses is in the plan) and
    /// registers it.
    fn next_resync(&self, name: &str) -> Option<ResyncJob> {
        let mut g = self.group();
        let job = self.next_resync_locked(&mut g, name);
        if job.is_none() {
            self.resync_volumes().remove(name);
        }
        job
    }

    fn resync_volumes(&self) -> MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.resync_volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn next_resync_locked(&self, g: &mut Group, name: &str) -> Option<ResyncJob> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let disk = Self::next_target(g, name)?;
        let engine = self.volume(name)?;
        let entry = g
            .config
            .volume(name)?
            .plexes
            .iter()
            .find(|p| p.disk == disk)?
            .clone();
        let why = entry
            .resync_reason
            .clone()
            .unwrap_or_else(|| "it was stale".to_string());
        let full = g.resync_plan(name, disk).ok()?.full;
        if full && entry.state != PlexState::Resyncing {
            g.set_plex_state(name, disk, PlexState::Resyncing);
            let ok = self.commit(g, &format!("the resync of {name}"));
            self.emit_changes(g);
            if !ok {
                return None;
            }
        }
        let progress = ResyncProgress::new(0, 0);
        // Registered before the plex joins the engine, so a commit meanwhile
        // keeps a stale target in service.
        self.running().insert(
            name.to_string(),
            Running {
                disk,
                progress: progress.clone(),
            },
        );
        let target = match engine.plex(disk) {
            // Out: a plex of a disk failed and reactivated while serving.
            Some(p) if matches!(p.mode(), Mode::WriteOnly | Mode::Out) => {
                p.set_mode(Mode::WriteOnly);
                p
            }
            Some(_) => {
                self.running().remove(name);
                return None;
            }
            None => {
                let offset = g.members[&disk].label.layout.data_offset() + entry.offset;
                engine.add_plex(EnginePlex::new(
                    disk,
                    g.members.get(&disk)?.disk.queue().clone(),
                    offset,
                    Mode::WriteOnly,
                ));
                engine.plex(disk)?
            }
        };
        let plan = match g.resync_plan(name, disk) {
            Ok(p) => p,
            Err(_) => {
                self.running().remove(name);
                return None;
            }
        };
        progress.reset(plan.total, plan.done);
        tracing::info!(volume = %name, disk = %g.disk_path(disk), bytes = plan.total - plan.done, resumed_at = ?plan.resumed_at, "resync started");
        self.emit(
            Event::new(EventKind::ResyncStarted)
                .with("group", g.config.name.as_str())
                .with("volume", name)
                .with("disk", g.disk_path(disk))
                .with("bytes", plan.total - plan.done)
                .with("copy", if plan.full { "full" } else { "bitmap" })
                .with("reason", why.as_str()),
        );
        Some(ResyncJob {
            group: g.config.name.clone(),
            path: g.disk_path(disk),
            disk,
            engine,
            target,
            plan,
            progress,
            why,
        })
    }

    /// Records a resync's checkpoint.
    fn checkpoint(&self, name: &str, disk: Uuid, position: u64) -> io::Result<()> {
        let mut g = self.group();
        g.set_resync_offset(name, disk, position);
        let ok = self.commit(&mut g, &format!("the resync checkpoint of {name}"));
        // Recorded, while the copy goes on behind it.
        crate::crash_point!("resync-checkpoint");
        self.emit_changes(&g);
        if ok {
            Ok(())
        } else {
            Err(io::Error::other("no disk took the config"))
        }
    }

    /// Ends a resync: a finished one puts its plex in sync, in the config
    /// and then in the engine. Returns whether the volume's thread goes on.
    fn end_resync(
        &self,
        name: &str,
        job: &ResyncJob,
        result: std::result::Result<u64, ResyncError>,
    ) -> bool {
        let mut g = self.group();
        self.running().remove(name);
        let path = g.disk_path(job.disk);
        match result {
            Ok(copied) => {
                // A plex that failed meanwhile stays out: the failure is
                // being recorded.
                if job.target.mode() != Mode::WriteOnly {
                    return true;
                }
                g.set_plex_state(name, job.disk, PlexState::InSync);
                if self.commit(&mut g, &format!("the end of the resync of {name}")) {
                    job.target.promote();
                    let line =
                        super::resync::resynced_line(name, &path, copied, &job.plan, &job.why);
                    tracing::info!("{line}");
                    eprintln!("{line}");
                    self.emit(
                        job.event(EventKind::ResyncFinished, name)
                            .with("bytes", copied),
                    );
                }
                // After resync-finished: the volume is healthy again.
                self.emit_changes(&g);
                true
            }
            Err(ResyncError::Stopped { position }) => {
                tracing::info!(volume = %name, disk = %path, position, "resync stopped; it resumes from its checkpoint");
                self.resync_volumes().remove(name);
                false
            }
            Err(ResyncError::Target { offset, error }) => {
                drop(g);
                tracing::error!(volume = %name, disk = %path, offset, %error, "the plex being resynced failed");
                job.engine.fail_plex(job.disk, &error);
                true
            }
            Err(e) => {
                tracing::error!(volume = %name, disk = %path, error = %e, "resync failed");
                eprintln!("error: the resync of volume {name} onto {path} failed: {e}");
                self.resync_volumes().remove(name);
                false
            }
        }
    }
}

/// A volume's resync thread: resyncs its plexes one at a time until none is
/// left, the group stops, or a resync fails.
fn resync_volume(me: Weak<LiveGroup>, name: &str, opts: &ResyncOptions) {
    loop {
        let Some(job) = me.upgrade().and_then(|live| live.next_resync(name)) else {
            return;
        };
        // resync-progress at each 10 % crossed from where the copy starts
        // (100 % is resync-finished).
        let decile = std::cell::Cell::new((job.progress.percent() / 10.0).floor() as u64);
        let on_chunk = |p: &ResyncProgress| {
            let now = ((p.percent() / 10.0).floor() as u64).min(9);
            while decile.get() < now {
                decile.set(decile.get() + 1);
                if let Some(live) = me.upgrade() {
                    live.emit(
                        job.event(EventKind::ResyncProgress, name)
                            .with("percent", decile.get() * 10),
                    );
                }
            }
        };
        let result = resync(
            &job.engine,
            &job.target,
            &job.plan.ranges,
            opts,
            &job.progress,
            &mut |position| {
                if !job.plan.full {
                    return Ok(());
                }
                match me.upgrade() {
                    Some(live) => live.checkpoint(name, job.disk, position),
                    None => Err(io::Error::other("the group is out of service")),
                }
            },
            &on_chunk,
        );
        if result.is_ok() {
            // The last chunk's steps: the copy is whole before it is
            // recorded in sync.
            on_chunk(&job.progress);
        }
        let go_on = match me.upgrade() {
            Some(live) => live.end_resync(name, &job, result),
            None => false,
        };
        if !go_on {
            return;
        }
    }
}

/// Events (see [`super::events`]).
impl LiveGroup {
    /// Where the group's events go from now on (once; later calls are
    /// ignored). Without it they are only logged.
    pub fn set_events(&self, events: Events) {
        let _ = self.events.set(events);
    }

    /// Logs an event and hands it to the hook, without blocking.
    pub fn emit(&self, event: Event) {
        match self.events.get() {
            Some(events) => events.emit(event),
            None => event.log(),
        }
    }

    /// Emits disk-failed, disk-returned, volume-degraded and volume-healthy
    /// for what changed since the states last reported. Called (with the
    /// group locked) after every config change; a change whose caller
    /// returned early is reported with the next one.
    pub fn emit_changes(&self, g: &Group) {
        let now = Snapshot::of(g);
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for e in reported.events_to(&now) {
            self.emit(e);
        }
        *reported = now;
    }
}

impl ResyncJob {
    /// An event about this resync.
    fn event(&self, kind: EventKind, volume: &str) -> Event {
        Event::new(kind)
            .with("group", self.group.as_str())
            .with("volume", volume)
            .with("disk", self.path.as_str())
    }
}

impl FailureSink for LiveGroup {
    fn plex_failed(&self, volume: &str, disk: Uuid, error: &io::Error) -> bool {
        self.count_error(disk);
        let mut g = self.group();
        let path = g.disk_path(disk);
        if crate::volume::error::disk_wide(error) {
            // A hung, full, read-only or vanished disk fails every plex on
            // it next, config writes included: the whole disk goes out of
            // service at once, so no commit waits on it.
            tracing::error!(%volume, disk = %path, %error, "the disk as a whole failed");
            self.fail_disk(&mut g, disk);
        } else {
            tracing::error!(%volume, disk = %path, %error, "plex failed");
            g.mark_plex_failed(volume, disk);
        }
        let ok = self.commit(&mut g, &format!("the failed plex of {volume} on {path}"));
        self.emit_changes(&g);
        self.use_spares();
        ok
    }

    fn last_copy_failed(&self, volume: &str, disk: Uuid, error: &io::Error) {
        let why = format!("the last in-sync plex of {volume} failed");
        self.fail_whole_disk(disk, &why, error);
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
