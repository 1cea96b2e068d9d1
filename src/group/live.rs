//! A group in service: the handle through which the NBD server, the
//! control socket, the engines and the background jobs reach the group's
//! controller (`live/controller.rs`, where the states are drawn).
//!
//! The handle holds no state of the group: each of its methods sends the
//! controller a message and waits for the reply, or reads the engines the
//! controller published. What takes long (draining a plex, stopping a
//! resync, scrubbing, copying) runs on the caller's thread between two
//! messages, so the controller never waits on it.

use std::io;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};

use uuid::Uuid;

use super::Group;
use super::events::{Event, EventKind, Events};
use super::status::StatusReport;

mod controller;
pub use controller::ResyncControl;
mod online;
mod reconnect;

use crate::volume::engine::{EngineOptions, EnginePlex, FailureSink, MirrorVolume};
use crate::volume::queue::DiskQueue;
use crate::volume::resync::{ResyncOptions, ResyncProgress, resync};
use controller::{Chore, Controller, Engines, Fault, Job, Next, ON_CONTROLLER};
pub use online::Done;
pub use reconnect::RemoteReturn;

/// How long `reactivate` waits for a disk out of service to answer the
/// requests it was sent before it refuses it (see
/// [`LiveGroup::reactivate_by_path`]).
const REACTIVATE_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// A resync an offline command ran to its end: the line it prints and the
/// bytes it copied.
#[derive(Debug, Clone)]
pub struct Resynced {
    pub line: String,
    pub bytes: u64,
}

pub struct LiveGroup {
    /// The controller's inbox; taken when the group is dropped.
    inbox: Mutex<Option<Sender<Job>>>,
    controller: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The engines of the volumes in service, as the controller last
    /// published them.
    engines: Arc<RwLock<Engines>>,
    /// Tells the background scrub to stop between chunks.
    scrub_stop: Arc<std::sync::atomic::AtomicBool>,
    /// Dropped to wake the background scrub from its wait between rounds.
    scrub_wake: Mutex<Option<Sender<()>>>,
    /// Admin operations run one after the other (each is a few messages to
    /// the controller with waits between them).
    ops: Mutex<()>,
    /// One [`LiveGroup::finish_replacements`] at a time.
    finishing: Mutex<()>,
    /// Where events go (set by `serve`); unset, they are only logged.
    events: Arc<OnceLock<Events>>,
}

impl LiveGroup {
    /// Puts an assembled group in service: its controller, and an engine
    /// for every volume.
    pub fn start(group: Group, opts: EngineOptions) -> Arc<LiveGroup> {
        if group.bitmaps.is_none() && !group.open.shared {
            group.forget_written_maps();
        }
        let engines = Arc::new(RwLock::new(Engines::default()));
        let events = Arc::new(OnceLock::new());
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        Arc::new_cyclic(|me: &Weak<LiveGroup>| {
            // A disk that fails a claim write is failed like after any
            // failed write.
            if let Some(claim) = &group.claim {
                let me = me.clone();
                claim.on_disk_error(Box::new(move |disk, error| {
                    let fault = Fault::of(error);
                    if let Some(live) = me.upgrade() {
                        live.send(move |c| {
                            c.fail_whole_disk(disk, "it failed a claim write", &fault)
                        });
                    }
                }));
            }
            let c = Controller::new(group, opts, me.clone(), engines.clone(), events.clone());
            let thread = std::thread::Builder::new()
                .name("controller".into())
                .spawn(move || c.run(rx))
                .expect("spawn the group's controller");
            LiveGroup {
                inbox: Mutex::new(Some(tx)),
                controller: Mutex::new(Some(thread)),
                engines,
                scrub_stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                scrub_wake: Mutex::new(None),
                ops: Mutex::new(()),
                finishing: Mutex::new(()),
                events,
            }
        })
    }

    /// Runs `f` on the controller and returns its result; None when the
    /// controller is gone, or when called from the controller itself.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller) -> T + Send + 'static,
    ) -> Option<T> {
        if ON_CONTROLLER.with(|c| c.get()) {
            tracing::error!("the controller asked itself; the request is refused");
            return None;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send(move |c| {
            let _ = tx.send(f(c));
        });
        rx.recv().ok()
    }

    /// Sends `f` to the controller without waiting.
    fn send(&self, f: impl FnOnce(&mut Controller) + Send + 'static) {
        let inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = inbox.as_ref() {
            let _ = tx.send(Box::new(f));
        }
    }

    /// [`LiveGroup::call`] for operations that may fail.
    fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller) -> crate::Result<T> + Send + 'static,
    ) -> crate::Result<T> {
        self.call(f)
            .unwrap_or_else(|| Err(crate::Error::failed("the group is out of service")))
    }

    /// Reads the group on the controller.
    pub fn with_group<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Group) -> T + Send + 'static,
    ) -> crate::Result<T> {
        self.ask(move |c| Ok(f(&c.group)))
    }

    /// The engine of a volume.
    pub fn volume(&self, name: &str) -> Option<Arc<MirrorVolume>> {
        self.engines().get(name).cloned()
    }

    fn engines(&self) -> Engines {
        self.engines
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The names of the volumes in service.
    pub fn volume_names(&self) -> Vec<String> {
        self.engines().keys().cloned().collect()
    }

    /// The queue of every disk in service, with the disk's UUID: the
    /// metrics endpoint reads their statistics.
    pub fn disk_queues(&self) -> Vec<(Uuid, Arc<DiskQueue>)> {
        self.with_group(|g| {
            g.members
                .iter()
                .map(|(u, m)| (*u, m.disk.queue().clone()))
                .collect()
        })
        .unwrap_or_default()
    }

    /// Status with what the running engines know.
    pub fn status(&self) -> crate::Result<StatusReport> {
        self.ask(|c| Ok(c.status()))
    }

    /// `resync NAME --pause|--resume|--cancel|--rate` while serving.
    pub fn control_resync(
        &self,
        name: &str,
        ask: controller::ResyncControl,
    ) -> crate::Result<String> {
        let name = name.to_string();
        self.ask(move |c| c.control_resync(&name, ask))
    }

    /// Records a request that changed the group in its history (one more
    /// config commit).
    pub fn record_history(&self, actor: crate::group::history::Actor) {
        self.send(move |c| {
            let seqno = c.group.config.seqno + 1;
            crate::group::history::record(&mut c.group.config.history, actor.entry(seqno));
            c.commit("the history");
        });
    }

    /// The progress of the background resync of `volume`, if one runs.
    pub fn resync_progress(&self, volume: &str) -> Option<Arc<ResyncProgress>> {
        let volume = volume.to_string();
        self.call(move |c| c.resync_progress(&volume)).flatten()
    }

    /// Whether a background resync runs or waits to run.
    pub fn resyncing(&self) -> bool {
        self.call(|c| c.resyncing()).unwrap_or(false)
    }

    /// Starts the group's housekeeper: every second it asks each disk in
    /// service whether it is still the one opened, and every `period` it
    /// clears the write-intent bits of regions idle for that long.
    pub fn start_bitmap_clearing(&self, period: std::time::Duration) {
        self.send(move |c| c.start_timer(period));
    }

    /// One clearing pass over every disk's bitmap (`now`: every idle region
    /// at once, as on a clean shutdown), on the caller's thread.
    pub fn clear_bitmaps(&self, now: bool) {
        if let Some(work) = self.call(|c| c.clear_work()) {
            controller::clear_bits(work, now);
        }
    }

    /// Scrubs every mirrored volume in the background, one after the other,
    /// every `interval`, comparing at most `max_rate` bytes per second (it
    /// only reports: repairing is the admin's decision, as with md's
    /// `check`). A plex that fails a read during the scrub is failed as on
    /// any other I/O.
    pub fn start_scrubs(self: &Arc<Self>, interval: std::time::Duration, max_rate: u64) {
        let me = Arc::downgrade(self);
        let stop = self.scrub_stop.clone();
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        *self.scrub_wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake);
        let t = std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || {
                let mut opts = crate::volume::scrub::ScrubOptions {
                    repair: false,
                    max_rate: Some(max_rate),
                    stop: Some(stop.clone()),
                    cancel: None,
                };
                let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
                loop {
                    // Woken early only by the stop, which drops the sender.
                    if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                        woken.recv_timeout(interval)
                    {
                        return;
                    }
                    let Some(live) = me.upgrade() else { return };
                    for name in live.volume_names() {
                        let Some(vol) = live.volume(&name) else {
                            continue;
                        };
                        // A volume an admin is scrubbing is left to that scrub.
                        let tracked =
                            crate::volume::scrub::ScrubProgress::new(vol.size(), false, true);
                        let (n, t) = (name.clone(), tracked.clone());
                        let started = live.ask(move |c| {
                            if c.scrubbing.contains_key(&n) {
                                return Ok(false);
                            }
                            c.scrubbing.insert(n, t);
                            Ok(true)
                        });
                        if !matches!(started, Ok(true)) {
                            continue;
                        }
                        opts.cancel = Some(tracked.cancel_flag());
                        let result =
                            crate::volume::scrub::scrub(&vol, &opts, &|done| tracked.set(done));
                        let n = name.clone();
                        live.send(move |c| {
                            c.scrubbing.remove(&n);
                        });
                        if stopped() {
                            return;
                        }
                        // Stopped for an admin's operation: what it found
                        // so far is reported, a clean part is not.
                        if tracked.cancelled() {
                            tracing::info!(volume = %name, "background scrub stopped for an admin operation");
                            if matches!(&result, Ok(r) if r.mismatches.is_empty()) {
                                continue;
                            }
                        }
                        live.report_scrub(name, result);
                    }
                }
            })
            .expect("spawn the scrub thread");
        self.send(move |c| c.workers.push(t));
    }

    fn report_scrub(
        &self,
        name: String,
        result: std::result::Result<
            crate::volume::scrub::ScrubReport,
            crate::volume::scrub::ScrubError,
        >,
    ) {
        use crate::volume::scrub::ScrubError;
        let r = match result {
            Ok(r) if r.mismatches.is_empty() => {
                tracing::info!(volume = %name, bytes = r.checked_bytes, "scrub found the plexes equal");
                return;
            }
            Ok(r) => r,
            Err(ScrubError::TooFewPlexes { .. }) => return,
            Err(e) => {
                tracing::error!(volume = %name, error = %e, "scrub stopped");
                eprintln!("{e}");
                return;
            }
        };
        self.send(move |c| {
            for m in &r.mismatches {
                let g = &c.group;
                let kept = g.disk_path(m.kept);
                let outvoted: Vec<String> = m.outvoted.iter().map(|d| g.disk_path(*d)).collect();
                let line = format!(
                    "scrub of volume {name}: plexes differ at offset {}, {} bytes (disk {kept} against {})",
                    m.offset,
                    m.length,
                    outvoted.join(", ")
                );
                tracing::error!("{line}");
                eprintln!("{line}");
                let event = Event::new(EventKind::ScrubMismatch)
                    .with("group", g.config.name.as_str())
                    .with("volume", name.as_str())
                    .with("offset", m.offset)
                    .with("length", m.length)
                    .with("plexes", [vec![kept.clone()], outvoted.clone()].concat())
                    .with("kept", kept)
                    .with("outvoted", outvoted)
                    .with("verdict", m.verdict.name());
                c.emit(event);
            }
        });
    }

    /// Paces the background resyncs with `opts` from now on, and starts
    /// one for every volume with a plex to resync (resyncing, or stale on a
    /// disk in service) and an in-sync plex to copy from.
    pub fn start_resyncs(&self, opts: ResyncOptions) {
        self.send(move |c| {
            c.set_resync_options(opts);
            c.resume_resyncs();
        });
    }

    /// `set-disk PATH ...`, offline or under serve.
    pub fn set_disk_by_path(
        &self,
        path: &std::path::Path,
        set: DiskSettings,
    ) -> crate::Result<Done> {
        let path = path.to_path_buf();
        self.ask(move |c| c.set_disk(&path, set))
    }

    /// `fail PATH [--force]` while serving: the disk is failed in the
    /// config (refused as offline when it holds a last in-sync plex, unless
    /// `force`) and its plexes leave every engine; a resync onto it stops.
    pub fn fail_disk_by_path(&self, path: &std::path::Path, force: bool) -> crate::Result<Done> {
        let path = path.to_path_buf();
        self.ask(move |c| c.fail_by_path(&path, force))
    }

    /// `reactivate PATH` while serving: the disk is recorded online and its
    /// plexes stale; the background resyncs bring them in sync. Returns at
    /// once, saying whether a resync started.
    pub fn reactivate_by_path(&self, path: &std::path::Path) -> crate::Result<Done> {
        self.reconnect_for_admin(path)?;
        // What a disk out of service is merely slow to answer is waited for
        // here, on the caller's thread, not on the controller's (which
        // refuses the disk while anything is left; see its
        // `reactivate_by_path`).
        let asked = path.to_path_buf();
        let queue = self.with_group(move |g| {
            let uuid = g.resolve_disk(&asked).ok()?;
            let member = g.members.get(&uuid).filter(|_| !g.is_online(uuid))?;
            Some(member.disk.queue().clone())
        })?;
        if let Some(queue) = queue {
            let until = std::time::Instant::now() + REACTIVATE_DRAIN;
            while queue.pending() > 0 && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let path = path.to_path_buf();
        self.ask(move |c| c.reactivate_by_path(&path))
    }

    /// Runs every resync the group has to do to its end on the controller's
    /// workers, unthrottled, showing the copy under way on `progress`: an
    /// offline command's resync, the same job `serve` runs in the
    /// background. Returns each finished resync's line; the first failure
    /// is the error.
    pub fn resync_in_foreground(
        &self,
        progress: &dyn super::Progress,
        rate: Option<u64>,
    ) -> crate::Result<Vec<Resynced>> {
        let rate = rate.unwrap_or(0);
        let idle = self
            .call(move |c| c.resync_in_foreground(rate))
            .ok_or_else(|| crate::Error::failed("the group is out of service"))?;
        // The bar is redrawn a few times a second; the end is the channel's.
        let mut shown: Option<String> = None;
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            idle.recv_timeout(std::time::Duration::from_millis(100))
        {
            let copying = self.call(|c| c.copying()).unwrap_or_default();
            if let Some((name, path, p)) = copying.first() {
                let what = format!("resync {name} onto {path}");
                if shown.as_deref() != Some(what.as_str()) {
                    if shown.is_some() {
                        progress.finish();
                    }
                    progress.start(&what, p.total());
                    shown = Some(what);
                }
                progress.set(p.done());
            }
        }
        if shown.is_some() {
            progress.finish();
        }
        // The workers are ending: joined, so that none holds the group
        // after the command lets go of it (the last holder closes it).
        for t in self
            .call(|c| std::mem::take(&mut c.workers))
            .unwrap_or_default()
        {
            let _ = t.join();
        }
        let mut lines = Vec::new();
        for outcome in self.call(|c| c.take_outcomes()).unwrap_or_default() {
            lines.push(outcome?);
        }
        Ok(lines)
    }

    /// Stops the background resyncs (each records its checkpoint) and the
    /// scrub, and waits for them.
    pub fn stop_resyncs(&self) {
        self.scrub_stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        drop(
            self.scrub_wake
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        let workers = self.call(|c| c.stop_jobs()).unwrap_or_default();
        for t in workers {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Stops the background work. The controller and the disk queues stay
    /// until the group is dropped: the group's last bitmap and config
    /// writes go through them.
    pub fn stop(&self) {
        self.stop_resyncs();
    }
}

/// A volume's resync worker: resyncs its plexes one at a time until none
/// is left, the group stops or holds the volume, or a resync fails. Every
/// step that changes state is a message to the controller.
fn resync_worker(me: Weak<LiveGroup>, name: String, opts: ResyncOptions) {
    loop {
        let job = {
            let name = name.clone();
            me.upgrade()
                .and_then(|live| live.call(move |c| c.next_resync(&name)).flatten())
        };
        let Some(job) = job else { return };
        // resync-progress at each 10 % crossed from where the copy starts
        // (100 % is resync-finished).
        let decile = std::cell::Cell::new((job.progress.percent() / 10.0).floor() as u64);
        let on_chunk = |p: &ResyncProgress| {
            let now = ((p.percent() / 10.0).floor() as u64).min(9);
            while decile.get() < now {
                decile.set(decile.get() + 1);
                if let Some(live) = me.upgrade() {
                    live.emit(
                        job.event(EventKind::ResyncProgress, &name)
                            .with("percent", decile.get() * 10),
                    );
                }
            }
        };
        let result = resync(
            &job.engine,
            &job.target,
            &job.plan.ranges,
            &opts,
            &job.progress,
            &mut |position| {
                if !job.plan.full {
                    return Ok(());
                }
                let (name, disk) = (name.clone(), job.disk);
                me.upgrade()
                    .and_then(|live| live.call(move |c| c.checkpoint(&name, disk, position)))
                    .unwrap_or_else(|| Err(io::Error::other("the group is out of service")))
            },
            &on_chunk,
        );
        if result.is_ok() {
            // The last chunk's steps: the copy is whole before it is
            // recorded in sync.
            on_chunk(&job.progress);
        }
        let ended = {
            let (name, job) = (name.clone(), job.clone());
            me.upgrade()
                .and_then(|live| live.call(move |c| c.end_resync(&name, &job, result)))
        };
        // A copy in sync may complete a `replace`: finished off this
        // thread, since taking the old copies off pauses this resync.
        // (An offline command finishes it itself, and waits for it.)
        if let Some(live) = me.upgrade()
            && !live.call(|c| c.in_foreground()).unwrap_or(true)
            && live
                .with_group(|g| !g.ready_replacements().is_empty())
                .unwrap_or(false)
        {
            let me = me.clone();
            let _ = std::thread::Builder::new()
                .name("replace".into())
                .spawn(move || {
                    if let Some(live) = me.upgrade() {
                        live.finish_replacements();
                    }
                });
        }
        match ended {
            Some(Next::GoOn) => {}
            Some(Next::FailTarget(error)) => {
                job.engine.fail_plex(job.disk, &error);
            }
            Some(Next::End) | None => return,
        }
    }
}

/// The housekeeper: runs the controller's chores (disk checks, bitmap
/// clearing), which wait on disks, off the controller's thread.
fn housekeeper(me: Weak<LiveGroup>, chores: Receiver<Chore>) {
    for chore in chores {
        // Every disk is asked at once, through its queue (no thread per
        // disk per check): a hung one costs one deadline.
        let answers: Vec<_> = chore
            .check
            .iter()
            .map(|(uuid, disk)| {
                let (cb, rx) = crate::volume::queue::channel();
                disk.queue()
                    .submit_meta(crate::volume::queue::Op::Check, true, cb);
                (*uuid, rx)
            })
            .collect();
        let failed: Vec<(Uuid, Fault)> = answers
            .into_iter()
            .filter_map(|(uuid, rx)| {
                crate::volume::queue::received(&rx)
                    .err()
                    .map(|e| (uuid, Fault::of(&e)))
            })
            .collect();
        controller::clear_bits(chore.clear, false);
        let Some(live) = me.upgrade() else { return };
        live.send(move |c| {
            for (uuid, fault) in failed {
                c.fail_whole_disk(uuid, "the disk failed its check", &fault);
            }
            c.chore_done();
        });
    }
}

/// One plex resync a volume's worker runs.
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

impl ResyncJob {
    /// An event about this resync.
    fn event(&self, kind: EventKind, volume: &str) -> Event {
        Event::new(kind)
            .with("group", self.group.as_str())
            .with("volume", volume)
            .with("disk", self.path.as_str())
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
}

/// The engines report to the controller and wait for its record.
impl FailureSink for LiveGroup {
    fn plex_failed(&self, volume: &str, disk: Uuid, error: &io::Error) -> bool {
        let wide = crate::volume::error::disk_wide(error);
        let (volume, fault) = (volume.to_string(), Fault::of(error));
        self.call(move |c| c.plex_failed(&volume, disk, wide, &fault))
            .unwrap_or(false)
    }

    fn last_copy_failed(&self, volume: &str, disk: Uuid, error: &io::Error) {
        let why = format!("the last in-sync plex of {volume} failed");
        let (volume, fault) = (volume.to_string(), Fault::of(error));
        self.call(move |c| c.last_copy_failed(&volume, disk, &why, &fault));
    }

    fn read_error(&self, volume: &str, disk: Uuid, error: &io::Error, repaired: bool) {
        tracing::warn!(%volume, %disk, %error, repaired, "read error");
        if let Some(m) = crate::volume::engine::ChecksumMismatch::of(error) {
            let (volume, offset) = (volume.to_string(), m.offset);
            let events = self.events.clone();
            self.send(move |c| {
                let g = &c.group;
                let event = Event::new(EventKind::ChecksumMismatch)
                    .with("group", g.config.name.as_str())
                    .with("volume", volume.as_str())
                    .with("disk", g.disk_path(disk))
                    .with("offset", offset)
                    .with("repaired", if repaired { "yes" } else { "no" });
                match events.get() {
                    Some(events) => events.emit(event),
                    None => event.log(),
                }
            });
        }
        self.send(move |c| c.count_error(disk));
    }
}

impl LiveGroup {
    fn op_lock(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for LiveGroup {
    fn drop(&mut self) {
        self.stop();
        // The controller ends once its inbox is closed; the group (disks,
        // queues) goes with it.
        drop(self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self
            .controller
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

/// What `set-disk` changes; `None`: left as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_mostly: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_behind: Option<u32>,
    /// The disk's own deadline in milliseconds; 0: the group's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}
