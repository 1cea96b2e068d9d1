//! The controller: the one owner of a group in service.
//!
//! One thread owns the group's config and every disk's, plex's, volume's
//! and job's state. Everyone else sends it a message and, when they need
//! an answer, waits for the reply: engines (a plex failed, a read error),
//! the control socket (admin operations), the housekeeper (a disk failed
//! its check), resync workers (next job, checkpoint, end) and hot-spare
//! rebuilds. Messages run one at a time, in the order sent, so no decision
//! ever sees another half made. The I/O hot path never waits on it: it
//! reads the engines' plex sets, which only the controller changes.
//!
//! Offline, every command that changes the group (`fail`,
//! `remove-mirror`, `break`, `create`, `extend`, `delete`, `add-mirror`,
//! `repair`, `reactivate`, `scrub`, `copy`, `resolve-split-brain`) starts
//! a controller with no listeners and runs the same operation through it
//! as `serve` does; those that resync then run its resync jobs to the end
//! in the foreground ([`Controller::resync_in_foreground`]).
//!
//! The controller waits on nothing but config commits, which go through
//! the disk queues under the hang deadline (a hung disk costs one deadline
//! and is failed, unless it holds a volume's last in-sync copy: see
//! [`Controller::take_disk_out`]). Whatever waits longer (a plex draining its requests, a
//! resync stopping at its checkpoint, a scrub, a copy) waits on the thread
//! that asked, for a channel the controller or the plex closes: never by
//! polling.
//!
//! ```text
//!  DISK (config + health)                    who moves it
//!  ──────────────────────
//!   online ──I/O error, deadline, health──▶ failed     engine, housekeeper
//!   online ──hangs holding a last copy──▶ online-errors  engine, housekeeper
//!     │  (its plexes with another copy fail; that volume waits: not-answering)
//!     ▲   ╲                                    │
//!     │    ╲──admin `fail`─────────────────────┤       control socket
//!     └──────────────admin `reactivate`────────┘       control socket
//!   online ──errors counted──▶ online-errors           engine (read errors)
//!   missing: listed, not found at assembly; offline: found, not usable
//!
//!  PLEX (config state / engine mode)
//!  ─────────────────────────────────
//!   resyncing/WriteOnly ──resync ends──▶ in-sync/InSync      resync worker
//!   stale/(absent) ──resync starts──▶ stale|resyncing/WriteOnly  controller
//!   in-sync|resyncing ──I/O error──▶ failed/Out              engine
//!   in-sync (last copy) ──write fails──▶ disk failed, plex kept in-sync/Out
//!   any ──remove-mirror, break, repair──▶ gone (drained, then freed)
//!
//!  VOLUME (derived from its plexes; never stored)
//!  ──────────────────────────────────────────────
//!   healthy ◀──▶ failed-redundancy ──errors──▶ failed-redundancy-at-risk
//!   resynching (a plex being copied) · failed (no in-sync plex)
//!   not-answering (every in-sync plex waits on a disk past the deadline)
//!
//!  RESYNC JOB (one slot per volume, in `resyncs`)
//!  ──────────────────────────────────────────────
//!   (none) ──resume──▶ planning ──next_resync──▶ copying ──checkpoint──▶ copying
//!   copying ──end: done──▶ planning (next plex)     ──end: stopped──▶ (none)
//!   planning ──nothing left, paused, stopping──▶ (none)
//!   copying ──target failed──▶ planning (the worker fails the plex)
//! ```
//!
//! The rule that the last in-sync plex is never failed is decided in one
//! place, the engine's decision ([`MirrorVolume::take_out`] under
//! [`MirrorVolume::decision`]): the engine applies it to its own errors,
//! and the controller asks it before an admin `fail` takes a plex out.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{DiskSettings, Done, LiveGroup, ResyncJob};
use crate::format::PlexState;
use crate::group::Group;

/// The largest write-behind backlog `set-disk` takes (md's limit).
pub const MAX_WRITE_BEHIND: u32 = 16383;
use crate::group::events::{Event, EventKind, Events, Snapshot};
use crate::group::status::StatusReport;
use crate::volume::bitmap::DiskBitmap;
use crate::volume::engine::{EngineOptions, EnginePlex, FailureSink, MirrorVolume, Mode};
use crate::volume::queue::QueuedDisk;
use crate::volume::resync::{ResyncError, ResyncOptions, ResyncProgress};

/// The engines of the volumes in service, as the I/O path sees them.
pub(super) type Engines = Arc<BTreeMap<String, Arc<MirrorVolume>>>;

/// A piece of work for the controller.
pub(super) type Job = Box<dyn FnOnce(&mut Controller) + Send>;

/// An error that takes a disk (or a plex) out of service, as the controller
/// records it.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub error: String,
    /// A request past the deadline.
    pub hung: bool,
    /// The connection was lost rather than an I/O failed (see
    /// [`crate::volume::error::link_lost`]).
    pub lost: bool,
}

impl Fault {
    pub(crate) fn of(e: &io::Error) -> Fault {
        Fault {
            error: e.to_string(),
            hung: e.kind() == io::ErrorKind::TimedOut,
            lost: crate::volume::error::link_lost(e),
        }
    }
}

/// Why a plex that failed an I/O gets a full resync when it returns.
const IO_FAILED: &str = "it failed an I/O, so its data cannot be trusted";

/// How often the housekeeper asks every disk whether it is still the one
/// opened.
const CHECK_EVERY: Duration = Duration::from_secs(1);

std::thread_local! {
    /// Set on the controller's thread: a call from it to itself would wait
    /// for itself.
    pub(super) static ON_CONTROLLER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A volume's resync slot: a worker thread is planning or copying.
#[derive(Default)]
struct Slot {
    /// The plex being copied, with the copy's progress.
    copying: Option<(Uuid, Arc<ResyncProgress>)>,
    /// Asked to stop at its next checkpoint (an admin operation, or the
    /// group stopping); the worker ends then.
    pause: bool,
    /// Dropped when the slot goes: whoever paused the resync waits for it.
    waiters: Vec<Sender<()>>,
}

/// What an admin asks of a volume's resyncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncControl {
    Pause,
    Resume,
    Cancel,
    /// Bytes/s; 0: the daemon's pacing again.
    Rate(u64),
}

/// What a resync worker does after a job ended.
pub(super) enum Next {
    /// Plan the next plex.
    GoOn,
    /// Fail the target plex through its engine (the controller does no
    /// engine I/O and must not wait on the engine's report), then plan.
    FailTarget(io::Error),
    /// The worker ends.
    End,
}

/// Idle-bitmap clearing of one disk: the bitmap and the extents to keep.
pub(super) struct ClearWork {
    bitmap: Arc<DiskBitmap>,
    pinned: Vec<std::ops::Range<u64>>,
    path: String,
}

/// One round of the housekeeper: check these disks, then clear these bits.
pub(super) struct Chore {
    pub(super) check: Vec<(Uuid, Arc<QueuedDisk>)>,
    pub(super) clear: Vec<ClearWork>,
}

struct Timer {
    period: Duration,
    next_check: Instant,
    next_clear: Instant,
    chores: std::sync::mpsc::SyncSender<Chore>,
    /// A chore is out (the housekeeper may be waiting on a hung disk):
    /// no second one is sent until it reports back.
    busy: bool,
}

pub(super) struct Controller {
    pub(super) group: Group,
    engines: BTreeMap<String, Arc<MirrorVolume>>,
    /// The engines as published to the I/O path (replaced, never changed).
    published: Arc<RwLock<Engines>>,
    /// I/O errors seen per disk since the group was started.
    errors: BTreeMap<Uuid, u64>,
    resyncs: BTreeMap<String, Slot>,
    /// Volumes an admin operation holds: no resync starts on them.
    held: BTreeSet<String>,
    /// Volumes whose resync an admin paused (`resync NAME --pause`): none
    /// starts on them until `--resume` (or `serve` starts again).
    paused: BTreeSet<String>,
    /// Bytes/s an admin set for a volume's resyncs (`resync NAME --rate`).
    rate_limits: BTreeMap<String, u64>,
    /// Volumes being scrubbed (through the control socket or in the
    /// background), with how far each scrub is.
    pub(super) scrubbing: BTreeMap<String, Arc<crate::volume::scrub::ScrubProgress>>,
    /// Copies to or from a volume (`copy` through the control socket), by
    /// the volume's name, with how far each is.
    pub(super) copies: BTreeMap<String, Arc<super::online::CopyProgress>>,
    pub(super) stopping: bool,
    /// Remote disks away since their connection was lost, tried again
    /// while `remote_return` is set (see [`super::reconnect`]).
    pub(super) away: BTreeMap<Uuid, super::reconnect::Away>,
    /// Remote disks taken back: when, and how many times in a row each
    /// was lost again soon after (a flapping link, a disk slower than its
    /// deadline): the next wait grows with that count.
    pub(super) returned: BTreeMap<Uuid, (std::time::Instant, u32)>,
    pub(super) remote_return: Option<super::RemoteReturn>,
    /// The disk and volume states the events last reported.
    reported: Snapshot,
    resync_opts: ResyncOptions,
    /// Background resyncs run (`serve`); an offline command's controller
    /// starts none.
    resyncs_on: bool,
    /// An offline command waits for the resyncs: what each ended with is
    /// kept for it ([`Controller::take_outcomes`]) instead of printed.
    foreground: bool,
    outcomes: Vec<crate::Result<super::Resynced>>,
    /// Dropped when the last resync slot goes ([`Controller::when_idle`]).
    idle_waiters: Vec<Sender<()>>,
    hot_spares: bool,
    /// How long a remote disk being reconnected keeps its plexes before a
    /// hot spare takes them over.
    pub(super) spare_delay: std::time::Duration,
    /// Resync workers and the scrub thread, joined at stop.
    pub(super) workers: Vec<std::thread::JoinHandle<()>>,
    opts: EngineOptions,
    pub(super) live: Weak<LiveGroup>,
    events: Arc<OnceLock<Events>>,
    timer: Option<Timer>,
}

impl Controller {
    pub(super) fn new(
        group: Group,
        opts: EngineOptions,
        live: Weak<LiveGroup>,
        published: Arc<RwLock<Engines>>,
        events: Arc<OnceLock<Events>>,
    ) -> Controller {
        let reported = Snapshot::of(&group);
        let mut c = Controller {
            group,
            engines: BTreeMap::new(),
            published,
            errors: BTreeMap::new(),
            resyncs: BTreeMap::new(),
            held: BTreeSet::new(),
            paused: BTreeSet::new(),
            rate_limits: BTreeMap::new(),
            scrubbing: BTreeMap::new(),
            copies: BTreeMap::new(),
            stopping: false,
            away: BTreeMap::new(),
            returned: BTreeMap::new(),
            remote_return: None,
            reported,
            resync_opts: ResyncOptions::default(),
            resyncs_on: false,
            foreground: false,
            outcomes: Vec::new(),
            idle_waiters: Vec::new(),
            hot_spares: false,
            spare_delay: std::time::Duration::ZERO,
            workers: Vec::new(),
            opts,
            live,
            events,
            timer: None,
        };
        for name in c.volume_names() {
            c.add_engine(&name);
        }
        c
    }

    /// The names of the group's volumes, as the config lists them.
    fn volume_names(&self) -> Vec<String> {
        self.group
            .config
            .volumes
            .iter()
            .map(|v| v.name.clone())
            .collect()
    }

    /// Runs messages until every sender is gone.
    pub(super) fn run(mut self, inbox: Receiver<Job>) {
        ON_CONTROLLER.with(|c| c.set(true));
        loop {
            let job = match self.timer.as_ref().map(|t| t.next_check.min(t.next_clear)) {
                Some(due) => {
                    match inbox.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(job) => Some(job),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match inbox.recv() {
                    Ok(job) => Some(job),
                    Err(_) => return,
                },
            };
            match job {
                Some(job) => job(&mut self),
                None => self.tick(),
            }
        }
    }

    // ---- engines ----

    /// Starts the engine of a volume the config has: its in-sync plexes
    /// serve, resyncing ones take writes; stale and failed plexes join when
    /// a resync starts.
    pub(super) fn add_engine(&mut self, name: &str) -> Option<Arc<MirrorVolume>> {
        let sink: Weak<dyn FailureSink> = self.live.clone();
        let engine = self
            .group
            .build_engine(name, None, sink, self.opts.clone())
            .ok()?;
        self.engines.insert(name.to_string(), engine.clone());
        self.publish();
        Some(engine)
    }

    /// Puts the plex `entry` (on a member disk) into `engine` in `mode`.
    fn join_engine(
        &self,
        engine: &MirrorVolume,
        entry: &crate::format::PlexEntry,
        mode: Mode,
    ) -> Option<Arc<EnginePlex>> {
        let m = self.group.members.get(&entry.disk)?;
        engine.add_plex(
            EnginePlex::new(
                entry.disk,
                m.disk.queue().clone(),
                m.label.layout.data_offset() + entry.offset,
                mode,
            )
            .write_mostly(self.group.is_write_mostly(entry.disk))
            .write_behind(self.group.write_behind(entry.disk)),
        );
        engine.plex(entry.disk)
    }

    /// Takes a volume's engine out of the I/O path.
    pub(super) fn remove_engine(&mut self, name: &str) -> Option<Arc<MirrorVolume>> {
        let e = self.engines.remove(name);
        self.publish();
        e
    }

    fn publish(&self) {
        *self.published.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(self.engines.clone());
    }

    pub(super) fn engine(&self, name: &str) -> Option<Arc<MirrorVolume>> {
        self.engines.get(name).cloned()
    }

    // ---- status ----

    /// Status with what the running engines know: error counts make a
    /// disk `online-errors` and its volumes `failed-redundancy-at-risk`.
    pub(super) fn status(&self) -> StatusReport {
        let g = &self.group;
        let mut report = g.status_with(&self.errors);
        for (disk, link) in self.links() {
            let path = g.disk_path(disk);
            if let Some(d) = report.disks.iter_mut().find(|d| d.path == path) {
                d.link = Some(link);
            }
        }
        for (name, slot) in &self.resyncs {
            let Some((disk, progress)) = &slot.copying else {
                continue;
            };
            let path = g.disk_path(*disk);
            let plex = report
                .volumes
                .iter_mut()
                .filter(|v| v.name == *name)
                .flat_map(|v| v.plexes.iter_mut())
                .find(|p| p.disk == path);
            if let Some(p) = plex {
                p.state = "resyncing";
                p.resync_percent = Some((progress.percent() * 10.0).floor() / 10.0);
                p.resync_rate = Some(progress.rate());
                p.resync_eta_seconds = progress.eta_seconds();
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
            let Some(engine) = self.engines.get(&v.name) else {
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
        for v in report
            .volumes
            .iter_mut()
            .filter(|v| self.paused.contains(&v.name))
        {
            for p in v.plexes.iter_mut() {
                if p.resync_held.is_none() && matches!(p.state, "resyncing" | "stale") {
                    p.resync_held = Some("paused");
                }
            }
        }
        for v in report.volumes.iter_mut() {
            if let Some(s) = self.scrubbing.get(&v.name) {
                v.scrub = Some(crate::group::status::ScrubStatus {
                    repair: s.repair,
                    background: s.background,
                    percent: (s.percent() * 10.0).floor() / 10.0,
                    rate: s.rate(),
                    eta_seconds: s.eta_seconds(),
                });
            }
            if let Some(c) = self.copies.get(&v.name) {
                v.copy = Some(crate::group::status::CopyStatus {
                    from: c.from.clone(),
                    to: c.to.clone(),
                    done: c.done(),
                    total: c.total(),
                    percent: (c.percent() * 10.0).floor() / 10.0,
                    rate: c.rate(),
                    eta_seconds: c.eta_seconds(),
                });
            }
        }
        report
    }

    pub(super) fn resync_progress(&self, volume: &str) -> Option<Arc<ResyncProgress>> {
        self.resyncs
            .get(volume)?
            .copying
            .as_ref()
            .map(|(_, p)| p.clone())
    }

    pub(super) fn resyncing(&self) -> bool {
        !self.resyncs.is_empty()
    }

    // ---- failures ----

    pub(super) fn count_error(&mut self, disk: Uuid) {
        *self.errors.entry(disk).or_default() += 1;
    }

    /// Commits the config, then takes out of the engines whatever it no
    /// longer has in service (a disk that failed its config write is marked
    /// failed by the commit itself). Returns whether any disk took it.
    pub(super) fn commit(&mut self, what: &str) -> bool {
        let ok = match self.group.commit() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "the config change for {what} could not be written");
                false
            }
        };
        // The config says it; the engines do not yet.
        crate::crash_point!("live-commit-before-engine");
        self.retire_plexes();
        ok
    }

    /// Takes out of the engines every plex the config no longer has in
    /// service.
    pub(super) fn retire_plexes(&self) {
        let g = &self.group;
        for v in self.engines.values() {
            let Some(entry) = g.config.volume(&v.name) else {
                continue;
            };
            let target = self
                .resyncs
                .get(&v.name)
                .and_then(|s| s.copying.as_ref())
                .map(|(d, _)| *d);
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

    /// A plex the engine failed (it is out of the engine already): recorded
    /// in the config before the engine acknowledges the I/O that saw it.
    pub(super) fn plex_failed(
        &mut self,
        volume: &str,
        disk: Uuid,
        disk_wide: bool,
        fault: &Fault,
    ) -> bool {
        self.count_error(disk);
        let path = self.group.disk_path(disk);
        let error = &fault.error;
        let why = self.full_resync_why(disk, fault);
        if disk_wide {
            // A hung, full, read-only, vanished or unreachable disk fails
            // every plex on it next, config writes included: the whole disk
            // goes out of service at once, so no commit waits on it.
            tracing::error!(%volume, disk = %path, %error, "the disk as a whole failed");
            self.take_disk_out(disk, fault);
            // The engine took this plex out, having another in-sync copy:
            // its decision stands even where the config, not yet told of
            // that copy's failure (reported from another thread, maybe
            // first), saw this one as the last.
            self.group.mark_plex_failed(volume, disk, why);
        } else {
            tracing::error!(%volume, disk = %path, %error, "plex failed");
            self.group.mark_plex_failed(volume, disk, why);
        }
        let ok = self.commit(&format!("the failed plex of {volume} on {path}"));
        self.emit_changes();
        self.use_spares();
        ok
    }

    /// Takes a disk in service out of service for an error that is the
    /// whole disk's: recorded in the config (its last in-sync plexes keep
    /// their data and state), reported, and a hot spare sought.
    pub(super) fn fail_whole_disk(&mut self, disk: Uuid, why: &str, fault: &Fault) {
        self.fail_disk_keeping(disk, why, fault, None);
    }

    /// The engine of `volume` kept its plex on `disk`, the last in-sync
    /// one, after a write to it failed: the disk is failed and that plex
    /// keeps its in-sync state, as the engine decided, even where the
    /// config has not yet heard that the other copies were taken out
    /// (their reports come from other threads and may arrive after this).
    pub(super) fn last_copy_failed(&mut self, volume: &str, disk: Uuid, why: &str, fault: &Fault) {
        let fault = Fault {
            hung: false,
            ..fault.clone()
        };
        self.fail_disk_keeping(disk, why, &fault, Some(volume));
    }

    fn fail_disk_keeping(&mut self, disk: Uuid, why: &str, fault: &Fault, keep: Option<&str>) {
        let error = &fault.error;
        self.count_error(disk);
        if !self.group.is_online(disk) {
            return;
        }
        let path = self.group.disk_path(disk);
        // The plex to keep, with its resync reason as it was.
        let kept = keep.and_then(|name| {
            let v = self.group.config.volume(name)?;
            let p = v
                .plexes
                .iter()
                .find(|p| p.disk == disk && p.state == PlexState::InSync)?;
            Some((name, p.resync_reason.clone()))
        });
        if !self.take_disk_out(disk, fault) {
            return;
        }
        if let Some((name, reason)) = kept
            && let Some(v) = self.group.config.volume_mut(name)
        {
            for p in v.plexes.iter_mut().filter(|p| p.disk == disk) {
                p.state = PlexState::InSync;
                p.resync_reason = reason.clone();
            }
        }
        tracing::error!(disk = %path, %error, "{why}; the disk is taken out of service");
        self.commit(&format!("failed disk {path}"));
        self.emit_changes();
        self.use_spares();
    }

    /// The one rule for a disk-wide failure. A disk that failed is failed
    /// whole. A disk that hangs is not taken from under a volume whose last
    /// in-sync plex it holds: there is no other copy to serve that volume,
    /// so its requests wait for the disk (`not-answering` in status) and go
    /// on when it returns; the disk's other plexes fail, so their volumes go
    /// on without it. Returns whether anything changed.
    fn take_disk_out(&mut self, disk: Uuid, fault: &Fault) -> bool {
        let last = self.group.last_copies_on(disk);
        let why = self.full_resync_why(disk, fault);
        if !fault.hung || last.is_empty() {
            self.group.mark_disk_failed(disk, why);
            return true;
        }
        let others: Vec<String> = self
            .group
            .config
            .volumes
            .iter()
            .filter(|v| !last.contains(&v.name))
            .filter(|v| {
                v.plexes
                    .iter()
                    .any(|p| p.disk == disk && p.state != PlexState::Failed)
            })
            .map(|v| v.name.clone())
            .collect();
        for name in &others {
            self.group.mark_plex_failed(name, disk, why);
        }
        if !others.is_empty() {
            tracing::error!(
                disk = %self.group.disk_path(disk),
                waiting = ?last,
                failed = ?others,
                "the disk hangs: its plexes with another copy are failed; the volumes whose last copy it holds wait for it"
            );
        }
        !others.is_empty()
    }

    /// Why the plexes of `disk`, failed by `fault`, need a full resync
    /// when they return: none when a remote disk's connection was lost (what
    /// it held stays good, and the bitmaps, kept while it is away, name
    /// what it misses, as md's failfast legs come back by their bitmap).
    fn full_resync_why(&mut self, disk: Uuid, fault: &Fault) -> Option<&'static str> {
        let remote = crate::group::is_nbd(std::path::Path::new(&self.group.disk_path(disk)));
        if fault.lost && remote {
            self.link_lost(disk);
            return None;
        }
        Some(IO_FAILED)
    }

    /// `set-disk PATH [--write-mostly on|off] [--write-behind N]`:
    /// recorded in the config, and the disk's plexes in every engine follow
    /// at once. Write-behind needs write-mostly (as md's); write-mostly
    /// off turns it off too.
    pub(super) fn set_disk(
        &mut self,
        path: &std::path::Path,
        set: DiskSettings,
    ) -> crate::Result<Done> {
        if let Some(n) = set.write_behind
            && n > MAX_WRITE_BEHIND
        {
            return Err(crate::Error::refused(format!(
                "write-behind of {n} writes is more than the {MAX_WRITE_BEHIND} allowed"
            )));
        }
        let uuid = self.group.resolve_disk(path)?;
        let shown = self.group.disk_path(uuid);
        let timeout_note = match set.timeout_ms {
            Some(ms) if self.group.config.disk(uuid).map(|d| d.timeout_ms) != Some(ms) => {
                if let Some(d) = self.group.config.disk_mut(uuid) {
                    d.timeout_ms = ms;
                }
                self.group.commit()?;
                self.group.apply_deadlines();
                let now = self.group.deadline_of(uuid);
                tracing::info!(disk = %shown, timeout_ms = now.as_millis() as u64, "disk deadline changed");
                Some(if ms == 0 {
                    format!(
                        "disk {shown} has the group's deadline again ({})",
                        crate::group::show_duration(now)
                    )
                } else {
                    format!(
                        "disk {shown} has a deadline of {}",
                        crate::group::show_duration(now)
                    )
                })
            }
            _ => None,
        };
        if set.write_mostly.is_none() && set.write_behind.is_none() {
            let message = timeout_note.unwrap_or_else(|| {
                format!(
                    "disk {shown} has a deadline of {} already",
                    crate::group::show_duration(self.group.deadline_of(uuid))
                )
            });
            return Ok(Done::new(message, &mut self.group, Vec::new()));
        }
        let was = (
            self.group.is_write_mostly(uuid),
            self.group.write_behind(uuid) as u32,
        );
        let mostly = set.write_mostly.unwrap_or(was.0);
        let behind = match (mostly, set.write_behind) {
            (false, Some(n)) if n > 0 => {
                return Err(crate::Error::refused(format!(
                    "disk {shown} is not write-mostly: write-behind applies to write-mostly disks only (add --write-mostly on)"
                )));
            }
            (false, _) => 0,
            (true, n) => n.unwrap_or(was.1),
        };
        let describe = |(m, b): (bool, u32)| match (m, b) {
            (false, _) => "not write-mostly".to_string(),
            (true, 0) => "write-mostly".to_string(),
            (true, n) => format!("write-mostly, with up to {n} writes behind"),
        };
        let with_note = |m: String| match &timeout_note {
            Some(n) => format!("{n}; {m}"),
            None => m,
        };
        if (mostly, behind) == was {
            return Ok(Done::new(
                with_note(format!("disk {shown} is {} already", describe(was))),
                &mut self.group,
                Vec::new(),
            ));
        }
        let mut warnings = Vec::new();
        if mostly {
            // Every volume it holds whose only other copies are not in sync
            // still reads from it, and writes nothing behind: say so rather
            // than refuse.
            for v in &self.group.config.volumes {
                let others = v.plexes.iter().filter(|p| {
                    p.disk != uuid
                        && !self.group.is_write_mostly(p.disk)
                        && self.group.plex_state(p.disk, p.state) == "in-sync"
                });
                if v.plexes.iter().any(|p| p.disk == uuid) && others.count() == 0 {
                    warnings.push(format!(
                        "volume {} has no other in-sync plex that is not write-mostly: its reads still go to {shown}, and its writes wait for it",
                        v.name
                    ));
                }
            }
        }
        if let Some(d) = self.group.config.disks.iter_mut().find(|d| d.uuid == uuid) {
            d.write_mostly = mostly;
            d.write_behind = behind;
        }
        self.group.commit()?;
        for engine in self.engines.values() {
            if let Some(p) = engine.plex(uuid) {
                p.set_write_mostly(mostly);
                p.set_write_behind(behind as usize);
            }
        }
        tracing::info!(disk = %shown, write_mostly = mostly, write_behind = behind, "disk settings changed");
        Ok(Done::new(
            with_note(format!("disk {shown} is {}", describe((mostly, behind)))),
            &mut self.group,
            warnings,
        ))
    }

    /// `fail PATH [--force]`: the disk is failed in the config (refused as
    /// offline when it holds a last in-sync plex, unless `force`) and its
    /// plexes leave every engine; a resync onto it stops.
    pub(super) fn fail_by_path(
        &mut self,
        path: &std::path::Path,
        force: bool,
    ) -> crate::Result<Done> {
        // A remote disk away since its link was lost (or missing since
        // `serve` started): out of service already, it is no longer tried
        // again (the admin's word, kept in the config).
        if let Ok(uuid) = self.group.resolve_disk(path)
            && !self.group.is_online(uuid)
            && (self.away.remove(&uuid).is_some()
                || self.group.config.disk(uuid).is_some_and(|d| d.link_lost))
        {
            if let Some(d) = self.group.config.disk_mut(uuid) {
                d.link_lost = false;
                // Its seqno stays the one it left at: the split-brain
                // check compares with that.
                d.state = crate::format::DiskState::Failed;
            }
            self.group.commit()?;
            return Ok(Done::new(
                format!(
                    "disk {} stays failed: it is no longer reconnected",
                    self.group.disk_path(uuid)
                ),
                &mut self.group,
                Vec::new(),
            ));
        }
        let uuid = self.group.check_fail(path, force)?;
        self.take_out_of_engines(uuid, force, path)?;
        self.group.mark_disk_failed(uuid, None);
        self.group.commit()?;
        let done = Done::new(
            format!("marked disk {} failed", self.group.disk_path(uuid)),
            &mut self.group,
            Vec::new(),
        );
        for slot in self.resyncs.values() {
            if let Some((d, p)) = &slot.copying
                && *d == uuid
            {
                p.stop();
            }
        }
        // The config has the disk failed: its plexes leave every engine.
        self.retire_plexes();
        self.emit_changes();
        tracing::info!(disk = %path.display(), "disk failed by the admin");
        self.use_spares();
        Ok(done)
    }

    /// Takes the plexes on `disk` out of every engine at once, under the
    /// engines' decision locks (taken in volume-name order), unless one is
    /// a last in-sync plex as the engines see it and `force` is not given.
    /// The engines may have failed another plex a moment ago whose record
    /// is the next message: checking the config alone could fail both.
    fn take_out_of_engines(
        &self,
        disk: Uuid,
        force: bool,
        path: &std::path::Path,
    ) -> crate::Result<()> {
        let volumes: Vec<&Arc<MirrorVolume>> = self
            .engines
            .values()
            .filter(|v| v.plex(disk).is_some())
            .collect();
        let _decisions: Vec<_> = volumes.iter().map(|v| v.decision()).collect();
        if !force && let Some(v) = volumes.iter().find(|v| v.last_in_sync(disk)) {
            return Err(crate::Error::refused(format!(
                "disk {} holds the last in-sync plex of volume {} (its other plexes failed and are being recorded); use --force to fail it anyway",
                path.display(),
                v.name
            )));
        }
        if !force && let Some(v) = volumes.iter().find(|v| v.holds_writes_alone(disk)) {
            return Err(crate::Error::refused(format!(
                "disk {} holds writes to volume {} that its write-behind plexes have not received yet; try again once they have landed, or use --force",
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

    /// Runs `change`, which takes the plex on `disk` out of volume `name`
    /// (`remove-mirror`, `break`), under the engine's decision lock and
    /// only when the engine does not see that plex as the last in-sync
    /// one: the config may still call another plex in sync whose failure
    /// the engine decided a moment ago and is the next message. The plex
    /// leaves the engine before the lock is released.
    pub(super) fn without_last_copy<T>(
        &mut self,
        name: &str,
        disk: &std::path::Path,
        doing: &str,
        change: impl FnOnce(&mut Group) -> crate::Result<T>,
    ) -> crate::Result<T> {
        let uuid = self.group.resolve_disk(disk)?;
        // Where the config sees the plex as the last in-sync one (or the
        // volume as not mirrored), its own refusal says so better.
        let g = &self.group;
        let config_last = g.volume(name).is_ok_and(|v| {
            v.plexes
                .iter()
                .filter(|p| g.plex_state(p.disk, p.state) == "in-sync")
                .all(|p| p.disk == uuid)
        });
        let engine = self.engines.get(name).cloned();
        let _decision = engine.as_ref().map(|e| e.decision());
        if !config_last
            && let Some(e) = &engine
            && (e.last_in_sync(uuid) || e.holds_writes_alone(uuid))
        {
            return Err(crate::Error::refused(format!(
                "the plex of volume {name} on {} is its last in-sync plex (its other plexes failed and are being recorded); {doing} is refused",
                disk.display()
            )));
        }
        let r = self.changed(change)?;
        self.retire_plexes();
        Ok(r)
    }

    /// `reactivate PATH`: the disk is recorded online and its plexes stale;
    /// the background resyncs bring them in sync (write-only in the engine
    /// until then).
    pub(super) fn reactivate_by_path(&mut self, path: &std::path::Path) -> crate::Result<Done> {
        let g = &mut self.group;
        // A disk absent until now (hot-plugged back) becomes a member
        // first: found by its path, or by its label at a new path.
        let uuid = match g.resolve_disk(path) {
            Ok(u) if g.members.contains_key(&u) => u,
            Ok(_) => g.attach(path)?,
            Err(e) => g.attach(path).map_err(|_| e)?,
        };
        // A request the disk was sent and has not answered may still land
        // (a write stuck in the kernel on a disk that hung, or one on its
        // way when another request failed it): taken back now, the disk
        // could take that write after its resync copied the block, and
        // hold old data as in sync. md keeps a faulty member until its last
        // request has ended, for the same reason. A disk out of service
        // must have answered everything (what is merely slow was waited
        // for on the caller's thread, `LiveGroup::reactivate_by_path`); one
        // still online (a hung last copy, kept) must have answered what
        // the watchdog gave up on.
        if let Some(queue) = g.members.get(&uuid).map(|m| m.disk.queue()) {
            let left = if g.is_online(uuid) {
                queue.owed()
            } else {
                queue.pending()
            };
            if left > 0 {
                return Err(crate::Error::failed(format!(
                    "disk {} still has {left} unanswered request{}; a write among them landing late would undo its resync, so it can be reactivated only once the disk answers",
                    path.display(),
                    if left == 1 { "" } else { "s" }
                )));
            }
        }
        let (_, vols) = g.reactivate_config(path)?;
        self.away.remove(&uuid);
        // The errors that failed it are behind it now (md forgets a
        // re-added member's errors as well): counted again from zero, the
        // disk is `online`, not `online-errors`, once back in sync.
        self.errors.remove(&uuid);
        let warnings = self.group.warnings.split_off(0);
        // A plex that kept its in-sync state (a last copy failed with
        // --force) serves again as it is.
        for name in &vols {
            let (Some(engine), Some(entry)) =
                (self.engines.get(name), self.group.config.volume(name))
            else {
                continue;
            };
            for p in &entry.plexes {
                if p.disk != uuid || self.group.plex_state(p.disk, p.state) != "in-sync" {
                    continue;
                }
                match engine.plex(uuid) {
                    Some(ep) => ep.set_mode(Mode::InSync),
                    // Out of the engine since the group started (its disk
                    // was failed then): it joins now.
                    None => {
                        self.join_engine(engine, p, Mode::InSync);
                    }
                }
            }
        }
        self.retire_plexes();
        self.emit_changes();
        let shown = self.group.disk_path(uuid);
        let resyncing = vols
            .iter()
            .any(|n| next_target(&self.group, n) == Some(uuid));
        self.resume_resyncs();
        tracing::info!(disk = %shown, "disk reactivated while serving");
        Ok(Done {
            message: if resyncing {
                format!("reactivated disk {shown}; resync started")
            } else {
                format!("reactivated disk {shown}")
            },
            warnings,
        })
    }

    // ---- events ----

    pub(super) fn emit(&self, event: Event) {
        match self.events.get() {
            Some(events) => events.emit(event),
            None => event.log(),
        }
    }

    /// Emits disk-failed, disk-returned, volume-degraded and volume-healthy
    /// for what changed since the states last reported. Called after every
    /// config change.
    pub(super) fn emit_changes(&mut self) {
        let now = Snapshot::of(&self.group);
        for e in self.reported.events_to(&now) {
            self.emit(e);
        }
        self.reported = now;
    }

    /// Runs a config change, then emits the events of the states it
    /// changed.
    pub(super) fn changed<T>(
        &mut self,
        change: impl FnOnce(&mut Group) -> crate::Result<T>,
    ) -> crate::Result<T> {
        let r = change(&mut self.group);
        self.emit_changes();
        r
    }

    // ---- hot spares ----

    pub(super) fn enable_hot_spares(&mut self, remote_delay: std::time::Duration) {
        self.hot_spares = true;
        self.spare_delay = remote_delay;
        self.use_spares();
    }

    /// Looks, on a thread of its own, for volumes with a failed or missing
    /// plex and a spare to rebuild it on (the rebuild drains plexes, which
    /// the controller never waits for).
    pub(super) fn use_spares(&self) {
        if !self.hot_spares || self.stopping {
            return;
        }
        let live = self.live.clone();
        let _ = std::thread::Builder::new()
            .name("hot-spare".into())
            .spawn(move || {
                if let Some(live) = live.upgrade() {
                    live.rebuild_onto_spares();
                }
            });
    }

    /// Rebuilds every failed or missing plex it can onto a spare; returns
    /// the volumes rebuilt, whose departed plexes the caller drains.
    pub(super) fn rebuild_onto_spares(&mut self) -> Vec<String> {
        let mut rebuilt = Vec::new();
        if self.stopping {
            return rebuilt;
        }
        for name in self.volume_names() {
            loop {
                // A link lost in a commit just now is away already.
                self.find_away();
                let waiting = self.spare_waits_for();
                match self.changed(|g| g.repair_onto_spare(&name, &waiting)) {
                    Ok(Some((spare, old))) => {
                        let line = format!(
                            "hot spare {} replaces the plex of volume {name} on {}; it resyncs in the background",
                            self.group.disk_path(spare),
                            self.group.disk_path(old)
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
        for w in self.group.warnings.split_off(0) {
            eprintln!("warning: {w}");
        }
        self.retire_plexes();
        rebuilt.dedup();
        rebuilt
    }

    // ---- resync jobs ----

    /// Turns background resyncs on, paced by `opts`.
    pub(super) fn set_resync_options(&mut self, opts: ResyncOptions) {
        self.resync_opts = opts;
        self.resyncs_on = true;
    }

    /// Starts a worker for every volume that has a plex to resync
    /// (resyncing, or stale on a disk in service) and an in-sync plex to
    /// copy from, and none running; not for volumes an admin operation
    /// holds, nor once the group stops.
    pub(super) fn resume_resyncs(&mut self) {
        // A pause ends with what it paused (a copy removed, a volume
        // deleted), and a rate with its volume.
        let g = &self.group;
        self.paused.retain(|n| {
            g.config.volume(n).is_some_and(|v| {
                v.plexes
                    .iter()
                    .any(|p| matches!(g.plex_state(p.disk, p.state), "resyncing" | "stale"))
            })
        });
        self.rate_limits.retain(|n, _| g.config.volume(n).is_some());
        if self.stopping || !self.resyncs_on {
            return;
        }
        self.workers.retain(|t| !t.is_finished());
        let names: Vec<String> = self
            .group
            .config
            .volumes
            .iter()
            .filter(|v| {
                !self.resyncs.contains_key(&v.name)
                    && !self.held.contains(&v.name)
                    && !self.paused.contains(&v.name)
            })
            .filter(|v| next_target(&self.group, &v.name).is_some())
            .map(|v| v.name.clone())
            .collect();
        for name in names {
            self.resyncs.insert(name.clone(), Slot::default());
            let live = self.live.clone();
            let opts = self.resync_opts.clone();
            let worker = std::thread::Builder::new()
                .name(format!("resync-{name}"))
                .spawn(move || super::resync_worker(live, name, opts));
            match worker {
                Ok(t) => self.workers.push(t),
                Err(e) => tracing::error!(error = %e, "cannot start a resync thread"),
            }
        }
    }

    /// Holds `name` for an admin operation: its resync stops at the next
    /// checkpoint and none starts until [`Controller::release`]. Returns
    /// what to wait on for a running resync to have stopped.
    pub(super) fn hold(&mut self, name: &str) -> Option<Receiver<()>> {
        self.held.insert(name.to_string());
        let slot = self.resyncs.get_mut(name)?;
        slot.pause = true;
        if let Some((_, p)) = &slot.copying {
            p.stop();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        slot.waiters.push(tx);
        Some(rx)
    }

    /// Ends the hold of [`Controller::hold`]; the resyncs resume.
    pub(super) fn release(&mut self, name: &str) {
        self.held.remove(name);
        self.resume_resyncs();
    }

    /// `resync NAME --pause|--resume|--cancel|--rate`: what an admin asks
    /// of a volume's resyncs while serving. Returns what was done.
    pub(super) fn control_resync(
        &mut self,
        name: &str,
        ask: ResyncControl,
    ) -> crate::Result<String> {
        // The plexes still to resync: disk, cancelled, path.
        let pending: Vec<(Uuid, bool, String)> = self
            .group
            .volume(name)?
            .plexes
            .iter()
            .filter(|p| {
                matches!(
                    self.group.plex_state(p.disk, p.state),
                    "resyncing" | "stale"
                )
            })
            .map(|p| (p.disk, p.resync_cancelled, self.group.disk_path(p.disk)))
            .collect();
        let cancelled = pending.iter().any(|p| p.1);
        let paths = |only_cancelled: bool| -> String {
            pending
                .iter()
                .filter(|p| !only_cancelled || p.1)
                .map(|p| p.2.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let nothing = || {
            crate::Error::refused(format!(
                "volume {name} has no copy to resync: every plex is in sync, failed or missing"
            ))
        };
        match ask {
            ResyncControl::Rate(rate) => {
                if rate == 0 {
                    self.rate_limits.remove(name);
                } else {
                    self.rate_limits.insert(name.to_string(), rate);
                }
                if let Some((_, p)) = self.resyncs.get(name).and_then(|s| s.copying.as_ref()) {
                    p.set_limit(rate);
                }
                Ok(match rate {
                    0 => format!(
                        "resyncs of volume {name} are paced by serve's --resync-min-rate and --resync-max-rate again"
                    ),
                    r => format!(
                        "resyncs of volume {name} run at {}/s, whether or not clients are busy",
                        crate::group::ops::human(r)
                    ),
                })
            }
            ResyncControl::Pause => {
                if pending.is_empty() {
                    return Err(nothing());
                }
                if self.paused.contains(name) {
                    return Err(crate::Error::refused(format!(
                        "the resync of volume {name} is paused already"
                    )));
                }
                self.paused.insert(name.to_string());
                self.stop_slot(name);
                Ok(format!(
                    "paused the resync of volume {name} (onto {}); it stops at its next checkpoint, and `mirrorvol resync {name} --resume` goes on from there",
                    paths(false)
                ))
            }
            ResyncControl::Cancel => {
                if pending.is_empty() {
                    return Err(nothing());
                }
                if pending.iter().all(|p| p.1) {
                    return Err(crate::Error::refused(format!(
                        "the resync of volume {name} is cancelled already"
                    )));
                }
                let disks: Vec<Uuid> = pending.iter().map(|p| p.0).collect();
                if let Some(vol) = self.group.config.volume_mut(name) {
                    for p in vol.plexes.iter_mut().filter(|p| disks.contains(&p.disk)) {
                        p.resync_cancelled = true;
                    }
                }
                self.stop_slot(name);
                if !self.commit(&format!("cancelling the resync of {name}")) {
                    return Err(crate::Error::failed(format!(
                        "the cancelled resync of volume {name} could not be recorded on any disk"
                    )));
                }
                Ok(format!(
                    "cancelled the resync of volume {name}: the copies on {} stay out of sync and are never read; `mirrorvol resync {name} --resume` resyncs them, `mirrorvol remove-mirror {name} --disk PATH` frees one",
                    paths(false)
                ))
            }
            ResyncControl::Resume => {
                if !self.paused.contains(name) && !cancelled {
                    return Err(crate::Error::refused(format!(
                        "the resync of volume {name} is neither paused nor cancelled"
                    )));
                }
                self.paused.remove(name);
                let resumed = paths(cancelled);
                if cancelled {
                    if let Some(vol) = self.group.config.volume_mut(name) {
                        for p in vol.plexes.iter_mut() {
                            p.resync_cancelled = false;
                        }
                    }
                    if !self.commit(&format!("resuming the resync of {name}")) {
                        return Err(crate::Error::failed(format!(
                            "the resumed resync of volume {name} could not be recorded on any disk"
                        )));
                    }
                }
                self.resume_resyncs();
                Ok(format!(
                    "resumed the resync of volume {name} (onto {}) from its checkpoint",
                    if resumed.is_empty() {
                        paths(false)
                    } else {
                        resumed
                    }
                ))
            }
        }
    }

    /// Asks the resync of `name` to stop at its next checkpoint.
    fn stop_slot(&mut self, name: &str) {
        if let Some(slot) = self.resyncs.get_mut(name) {
            slot.pause = true;
            if let Some((_, p)) = &slot.copying {
                p.stop();
            }
        }
    }

    /// Stops every resync at its next checkpoint and the scrub thread;
    /// returns the workers to join (off this thread: they need it to end).
    pub(super) fn stop_jobs(&mut self) -> Vec<std::thread::JoinHandle<()>> {
        self.stopping = true;
        for slot in self.resyncs.values_mut() {
            slot.pause = true;
            if let Some((_, p)) = &slot.copying {
                p.stop();
            }
        }
        std::mem::take(&mut self.workers)
    }

    /// The worker of `name` ends: its slot goes, and whoever waits for it
    /// (or for every resync to end) hears.
    fn end_slot(&mut self, name: &str) {
        self.resyncs.remove(name);
        if self.resyncs.is_empty() {
            self.idle_waiters.clear();
        }
    }

    /// Whether the resyncs run for an offline command, which waits for them.
    pub(super) fn in_foreground(&self) -> bool {
        self.foreground
    }

    /// Runs the resyncs for an offline command: unthrottled, their outcomes
    /// kept for it. Returns what disconnects once none is left.
    pub(super) fn resync_in_foreground(&mut self, rate: u64) -> Receiver<()> {
        self.foreground = true;
        // At most `rate` bytes/s when asked (no client is there to yield to).
        self.set_resync_options(ResyncOptions {
            min_rate: rate,
            max_rate: rate,
            ..ResyncOptions::unthrottled()
        });
        self.resume_resyncs();
        let (tx, rx) = std::sync::mpsc::channel();
        if !self.resyncs.is_empty() {
            self.idle_waiters.push(tx);
        }
        rx
    }

    /// The resyncs under way, for a progress bar: volume, target disk's
    /// path, progress.
    pub(super) fn copying(&self) -> Vec<(String, String, Arc<ResyncProgress>)> {
        self.resyncs
            .iter()
            .filter_map(|(name, s)| {
                let (disk, p) = s.copying.as_ref()?;
                Some((name.clone(), self.group.disk_path(*disk), p.clone()))
            })
            .collect()
    }

    /// What the resyncs of an offline command ended with.
    pub(super) fn take_outcomes(&mut self) -> Vec<crate::Result<super::Resynced>> {
        std::mem::take(&mut self.outcomes)
    }

    /// Prepares the next resync of `name`: records a plex that needs a full
    /// copy as resyncing, puts the plex in the engine write-only, plans the
    /// copy (after that, so every write the plex misses is in the plan).
    pub(super) fn next_resync(&mut self, name: &str) -> Option<Arc<ResyncJob>> {
        let job = self.plan_resync(name);
        if job.is_none() {
            self.end_slot(name);
        }
        job
    }

    fn plan_resync(&mut self, name: &str) -> Option<Arc<ResyncJob>> {
        if self.stopping || self.resyncs.get(name).is_none_or(|s| s.pause) {
            return None;
        }
        let disk = next_target(&self.group, name)?;
        let engine = self.engines.get(name)?.clone();
        let entry = self
            .group
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
        let full = self.group.resync_plan(name, disk).ok()?.full;
        if full && entry.state != PlexState::Resyncing {
            self.group.set_plex_state(name, disk, PlexState::Resyncing);
            let ok = self.commit(&format!("the resync of {name}"));
            self.emit_changes();
            if !ok {
                return None;
            }
        }
        let progress = ResyncProgress::new(0, 0);
        let target = match engine.plex(disk) {
            // Out: a plex of a disk failed and reactivated while serving.
            Some(p) if matches!(p.mode(), Mode::WriteOnly | Mode::Out) => {
                p.set_mode(Mode::WriteOnly);
                p
            }
            Some(_) => return None,
            None => self.join_engine(&engine, &entry, Mode::WriteOnly)?,
        };
        let plan = self.group.resync_plan(name, disk).ok()?;
        progress.reset(plan.total, plan.done);
        progress.set_limit(self.rate_limits.get(name).copied().unwrap_or(0));
        if let Some(slot) = self.resyncs.get_mut(name) {
            slot.copying = Some((disk, progress.clone()));
        }
        let g = &self.group;
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
        Some(Arc::new(ResyncJob {
            group: g.config.name.clone(),
            path: g.disk_path(disk),
            disk,
            engine,
            target,
            plan,
            progress,
            why,
        }))
    }

    /// Records a resync's checkpoint.
    pub(super) fn checkpoint(&mut self, name: &str, disk: Uuid, position: u64) -> io::Result<()> {
        self.group.set_resync_offset(name, disk, position);
        let ok = self.commit(&format!("the resync checkpoint of {name}"));
        // Recorded, while the copy goes on behind it.
        crate::crash_point!("resync-checkpoint");
        self.emit_changes();
        if ok {
            Ok(())
        } else {
            Err(io::Error::other("no disk took the config"))
        }
    }

    /// Ends a resync: a finished one puts its plex in sync, in the config
    /// and then in the engine.
    pub(super) fn end_resync(
        &mut self,
        name: &str,
        job: &ResyncJob,
        result: std::result::Result<u64, ResyncError>,
    ) -> Next {
        if let Some(slot) = self.resyncs.get_mut(name) {
            slot.copying = None;
        }
        let path = self.group.disk_path(job.disk);
        match result {
            Ok(copied) => {
                // A plex that failed meanwhile stays out: the failure is
                // being recorded.
                if job.target.mode() != Mode::WriteOnly {
                    return Next::GoOn;
                }
                self.group.set_plex_state(name, job.disk, PlexState::InSync);
                if self.commit(&format!("the end of the resync of {name}")) {
                    job.target.promote();
                    let line = crate::group::resync::resynced_line(
                        name,
                        &path,
                        copied,
                        job.progress.zeroed(),
                        &job.plan,
                        &job.why,
                    );
                    tracing::info!("{line}");
                    if self.foreground {
                        self.outcomes.push(Ok(super::Resynced {
                            line,
                            bytes: copied,
                        }));
                    } else {
                        eprintln!("{line}");
                    }
                    self.emit(
                        job.event(EventKind::ResyncFinished, name)
                            .with("bytes", copied),
                    );
                }
                // After resync-finished: the volume is healthy again.
                self.emit_changes();
                Next::GoOn
            }
            Err(ResyncError::Stopped { position }) => {
                tracing::info!(volume = %name, disk = %path, position, "resync stopped; it resumes from its checkpoint");
                self.end_slot(name);
                Next::End
            }
            Err(ResyncError::Target { offset, error }) => {
                tracing::error!(volume = %name, disk = %path, offset, %error, "the plex being resynced failed");
                if self.foreground {
                    self.outcomes.push(Err(crate::Error::io(
                        format!(
                            "the plex of volume {name} on {path} failed at volume offset {offset} during its resync; it is marked failed"
                        ),
                        io::Error::new(error.kind(), error.to_string()),
                    )));
                }
                Next::FailTarget(error)
            }
            Err(e) => {
                tracing::error!(volume = %name, disk = %path, error = %e, "resync failed");
                if self.foreground {
                    self.outcomes.push(Err(match e {
                        ResyncError::Source { offset, error } => crate::Error::io(
                            format!(
                                "reading volume {name} at offset {offset} for the resync failed"
                            ),
                            error,
                        ),
                        e => crate::Error::failed(format!(
                            "the resync of volume {name} onto {path} failed: {e}"
                        )),
                    }));
                } else {
                    eprintln!("error: the resync of volume {name} onto {path} failed: {e}");
                }
                self.end_slot(name);
                Next::End
            }
        }
    }

    // ---- timers ----

    /// Starts the housekeeper: every second it asks each disk in service
    /// whether it is still the one opened, and every `period` it clears
    /// the write-intent bits of regions idle for that long (between one and
    /// two periods, as md's bitmap daemon).
    pub(super) fn start_timer(&mut self, period: Duration) {
        if self.timer.is_some() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let live = self.live.clone();
        let started = std::thread::Builder::new()
            .name("housekeeper".into())
            .spawn(move || super::housekeeper(live, rx));
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start the housekeeper");
            return;
        }
        let now = Instant::now();
        self.timer = Some(Timer {
            period,
            next_check: now + CHECK_EVERY,
            next_clear: now + period,
            chores: tx,
            busy: false,
        });
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.timer.as_ref().is_some_and(|t| now >= t.next_check) {
            self.try_returns();
        }
        let Some(t) = self.timer.as_mut() else { return };
        let check = now >= t.next_check;
        let clear = now >= t.next_clear;
        if check {
            t.next_check = now + CHECK_EVERY;
            // Idle long enough, the next write starts a new generation.
            if let Some(k) = &self.group.keeper {
                k.tick();
            }
        }
        if clear {
            t.next_clear = now + t.period;
        }
        if t.busy || !(check || clear) {
            return;
        }
        let chore = Chore {
            check: if check {
                self.disks_in_service()
            } else {
                Vec::new()
            },
            clear: if clear { self.clear_work() } else { Vec::new() },
        };
        if let Some(t) = self.timer.as_mut() {
            t.busy = t.chores.try_send(chore).is_ok();
        }
    }

    /// The housekeeper is done with its chore.
    pub(super) fn chore_done(&mut self) {
        if let Some(t) = self.timer.as_mut() {
            t.busy = false;
        }
    }

    fn disks_in_service(&self) -> Vec<(Uuid, Arc<QueuedDisk>)> {
        let g = &self.group;
        g.members
            .iter()
            .filter(|(u, _)| g.is_online(**u))
            .map(|(u, m)| (*u, m.disk.clone()))
            .collect()
    }

    /// What a bitmap clearing pass does on each disk in service: regions of
    /// volumes with a plex out of sync, in the config or in the engine,
    /// keep their bits.
    pub(super) fn clear_work(&self) -> Vec<ClearWork> {
        let g = &self.group;
        let Some(set) = g.bitmaps.clone() else {
            return Vec::new();
        };
        let degraded: Vec<&str> = self
            .engines
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
                    || v.plexes.len() > self.engines.get(&v.name).map_or(0, |e| e.plexes().len())
                {
                    pinned.extend(
                        v.plexes
                            .iter()
                            .filter(|p| p.disk == uuid)
                            .map(|p| p.offset..p.offset + p.length),
                    );
                }
            }
            work.push(ClearWork {
                bitmap: b.clone(),
                pinned,
                path: g.disk_path(uuid),
            });
        }
        work
    }
}

/// Clears the idle bits `work` names (`now`: every idle region at once,
/// as on a clean shutdown). Runs off the controller: it writes the disks.
pub(super) fn clear_bits(work: Vec<ClearWork>, now: bool) {
    for w in work {
        let overlaps =
            |r: std::ops::Range<u64>| w.pinned.iter().any(|p| p.start < r.end && r.start < p.end);
        match w.bitmap.clear_idle(now, &overlaps) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(disk = %w.path, regions = n, "write-intent bits cleared"),
            Err(e) => tracing::warn!(disk = %w.path, error = %e, "cannot clear write-intent bits"),
        }
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
                && !p.resync_cancelled
                && matches!(g.plex_state(p.disk, p.state), "resyncing" | "stale")
        })
        .map(|p| p.disk)
}
