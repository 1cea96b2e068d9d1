//! Events of a group in service, for the log and for the admin's hook
//! (`serve --on-event CMD`).
//!
//! An [`Event`] is a kind and a few fields (group, volume, disk, ...). Every
//! event goes to the log at once; with a hook, it is also queued for one
//! hook thread that runs `sh -c CMD` per event, in the order the events
//! happened, with the fields in `MIRRORVOL_*` environment variables and as
//! one JSON line on its stdin. [`Events::emit`] never blocks: I/O paths emit
//! while holding the group lock, so a slow or hung hook must cost only its
//! own events (a full queue drops them, with one warning), never a request.
//!
//! Disk and volume state changes are not emitted where they happen but
//! derived: after every config change, a [`Snapshot`] of the states
//! `status` shows is compared with the one last reported
//! ([`Snapshot::events_to`]), so every path that changes the config reports
//! alike, and a change nobody reported is caught by the next.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use uuid::Uuid;

use super::Group;

/// Field names whose environment variable is a setting of mirrorvol itself
/// (`MIRRORVOL_DISKS`, `MIRRORVOL_RUN_DIR`).
const RESERVED: [&str; 2] = ["disks", "run_dir"];

/// Events queued for the hook at most; more are dropped (and counted).
const QUEUE_LIMIT: usize = 1024;

/// How long one run of the hook may take before it is killed.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    DiskFailed,
    DiskReturned,
    VolumeDegraded,
    VolumeHealthy,
    ResyncStarted,
    ResyncProgress,
    ResyncFinished,
    ScrubMismatch,
    ChecksumMismatch,
    SplitBrain,
}

impl EventKind {
    /// The name hooks see (`MIRRORVOL_EVENT`, the JSON `event` key).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::DiskFailed => "disk-failed",
            EventKind::DiskReturned => "disk-returned",
            EventKind::VolumeDegraded => "volume-degraded",
            EventKind::VolumeHealthy => "volume-healthy",
            EventKind::ResyncStarted => "resync-started",
            EventKind::ResyncProgress => "resync-progress",
            EventKind::ResyncFinished => "resync-finished",
            EventKind::ScrubMismatch => "scrub-mismatch",
            EventKind::ChecksumMismatch => "checksum-mismatch",
            EventKind::SplitBrain => "split-brain",
        }
    }
}

/// The value of one field: text, a count, or a list (of disk paths).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Number(u64),
    List(Vec<String>),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}

impl From<u64> for Value {
    fn from(n: u64) -> Value {
        Value::Number(n)
    }
}

impl From<Vec<String>> for Value {
    fn from(l: Vec<String>) -> Value {
        Value::List(l)
    }
}

impl Value {
    fn json(&self) -> serde_json::Value {
        match self {
            Value::Text(s) => serde_json::Value::from(s.as_str()),
            Value::Number(n) => serde_json::Value::from(*n),
            Value::List(l) => serde_json::Value::from(l.clone()),
        }
    }

    /// The environment form: a list is one item per line.
    fn env(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::List(l) => l.join("\n"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub time: SystemTime,
    /// Field names are lower-case words joined by `_`; their environment
    /// variable is `MIRRORVOL_` and the name in upper case.
    pub fields: Vec<(&'static str, Value)>,
}

impl Event {
    pub fn new(kind: EventKind) -> Event {
        Event {
            kind,
            time: SystemTime::now(),
            fields: Vec::new(),
        }
    }

    /// Adds a field. Its name must not make the environment variable of a
    /// setting the hook inherits (`disks`, `run_dir`): a hook that runs
    /// `mirrorvol status` must still find the group.
    pub fn with(mut self, name: &'static str, value: impl Into<Value>) -> Event {
        debug_assert!(!RESERVED.contains(&name), "field {name} is reserved");
        self.fields.push((name, value.into()));
        self
    }

    #[cfg(test)]
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    fn seconds(&self) -> f64 {
        self.time
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
    }

    /// The JSON line a hook reads on stdin: `event` and `time` (Unix
    /// seconds) first, then the fields in order.
    pub fn json_line(&self) -> String {
        let mut line = format!(
            "{{\"event\":\"{}\",\"time\":{:.3}",
            self.kind.name(),
            self.seconds()
        );
        for (name, value) in &self.fields {
            line.push_str(&format!(",\"{name}\":{}", value.json()));
        }
        line.push('}');
        line
    }

    /// The environment a hook runs with (besides the daemon's own).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("MIRRORVOL_EVENT".to_string(), self.kind.name().to_string()),
            (
                "MIRRORVOL_TIME".to_string(),
                format!("{:.3}", self.seconds()),
            ),
        ];
        for (name, value) in &self.fields {
            env.push((
                format!("MIRRORVOL_{}", name.to_ascii_uppercase()),
                value.env(),
            ));
        }
        env.push(("MIRRORVOL_EVENT_JSON".to_string(), self.json_line()));
        env
    }

    /// Logs the event: failures as errors, lost redundancy and scrub
    /// findings as warnings, the rest as information.
    pub fn log(&self) {
        let line = self.json_line();
        match self.kind {
            EventKind::DiskFailed | EventKind::SplitBrain => {
                tracing::error!(event = self.kind.name(), "{line}")
            }
            EventKind::VolumeDegraded | EventKind::ScrubMismatch | EventKind::ChecksumMismatch => {
                tracing::warn!(event = self.kind.name(), "{line}")
            }
            _ => tracing::info!(event = self.kind.name(), "{line}"),
        }
    }
}

/// A warning for the admin: on stderr and in the log.
fn warn(message: &str) {
    tracing::warn!("{message}");
    eprintln!("warning: {message}");
}

/// Where a group's events go: the log always, the hook when there is one.
/// Clones share the queue and the hook thread.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    /// None without a hook, and after [`Events::shutdown`].
    queue: Mutex<Option<Sender<Event>>>,
    dropped: AtomicU64,
    /// Set at shutdown when the wait is over: the hook running is killed
    /// and the events left are dropped.
    abort: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Disconnects when the hook thread ends (its sender goes with it).
    ended: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// The last [`RECENT_LIMIT`] events, oldest first (the web view shows
    /// them to a page that has just loaded).
    recent: Mutex<std::collections::VecDeque<Event>>,
    /// Whoever watches events as they happen (the web view's live pages).
    /// A watcher that falls [`WATCH_LIMIT`] events behind misses the
    /// newer ones; its [`Watch`] going takes it off.
    watchers: Mutex<Vec<(u64, Sender<Event>)>>,
    /// The id of the next watcher.
    next_watcher: AtomicU64,
}

/// Events as they are emitted, until it is dropped.
pub struct Watch {
    pub events: Receiver<Event>,
    id: u64,
    inner: Arc<Inner>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        watchers.retain(|(id, _)| *id != self.id);
    }
}

/// Events kept for [`Events::recent`].
pub const RECENT_LIMIT: usize = 50;

/// Events one watcher may be behind.
const WATCH_LIMIT: usize = 64;

/// The hook `serve --on-event` runs.
#[derive(Debug, Clone)]
pub struct Hook {
    /// Run with `sh -c`.
    pub command: String,
    /// A run that takes longer is killed (its whole process group).
    pub timeout: Duration,
}

impl Events {
    /// Events that are logged and, with a hook, handed to it by a thread of
    /// their own.
    pub fn start(hook: Option<Hook>) -> Events {
        let abort = Arc::new(AtomicBool::new(false));
        let (queue, thread, ended) = match hook {
            None => (None, None, None),
            Some(hook) => {
                let (tx, rx) = crossbeam_channel::bounded(QUEUE_LIMIT);
                let (ending, ended) = std::sync::mpsc::channel::<()>();
                let stop = abort.clone();
                let thread = std::thread::Builder::new()
                    .name("event-hook".into())
                    .spawn(move || {
                        let _ending = ending;
                        run_hooks(&hook, &rx, &stop)
                    })
                    .expect("spawn the event hook thread");
                (Some(tx), Some(thread), Some(ended))
            }
        };
        Events {
            inner: Arc::new(Inner {
                queue: Mutex::new(queue),
                dropped: AtomicU64::new(0),
                abort,
                thread: Mutex::new(thread),
                ended: Mutex::new(ended),
                recent: Mutex::new(std::collections::VecDeque::new()),
                watchers: Mutex::new(Vec::new()),
                next_watcher: AtomicU64::new(0),
            }),
        }
    }

    /// The last events emitted, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        let recent = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// Events from now on, as they are emitted (never blocking the emitter:
    /// a receiver that falls behind misses events).
    pub fn watch(&self) -> Watch {
        let (tx, rx) = crossbeam_channel::bounded(WATCH_LIMIT);
        let id = self.inner.next_watcher.fetch_add(1, Ordering::Relaxed);
        let mut watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        watchers.push((id, tx));
        Watch {
            events: rx,
            id,
            inner: self.inner.clone(),
        }
    }

    /// Watchers taking events now.
    pub fn watchers(&self) -> usize {
        let watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        watchers.len()
    }

    /// Keeps the event for [`Events::recent`] and hands it to the watchers.
    fn remember(&self, event: &Event) {
        {
            let mut recent = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_LIMIT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        let watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (_, w) in watchers.iter() {
            let _ = w.try_send(event.clone());
        }
    }

    /// Logs the event and queues it for the hook. Never blocks: when the
    /// queue is full the event is dropped (the first drop is warned about,
    /// the count at shutdown).
    pub fn emit(&self, event: Event) {
        event.log();
        self.remember(&event);
        let queue = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = queue.as_ref() else {
            return;
        };
        if let Err(TrySendError::Full(e)) = tx.try_send(event)
            && self.inner.dropped.fetch_add(1, Ordering::Relaxed) == 0
        {
            warn(&format!(
                "the --on-event hook is {QUEUE_LIMIT} events behind; {} and later events are not handed to it",
                e.kind.name()
            ));
        }
    }

    /// Stops taking events and waits up to `wait` for the hook to run the
    /// ones queued; then kills the run under way and drops the rest, with a
    /// warning.
    pub fn shutdown(&self, wait: Duration) {
        drop(
            self.inner
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        let Some(thread) = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        // The hook thread ends once it has run what was queued.
        if let Some(ended) = self
            .inner
            .ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = ended.recv_timeout(wait);
        }
        self.inner.abort.store(true, Ordering::SeqCst);
        let _ = thread.join();
        let dropped = self.inner.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            warn(&format!(
                "{dropped} event{} never reached the --on-event hook",
                if dropped == 1 { "" } else { "s" }
            ));
        }
    }
}

/// The hook thread: one run per event, in order, until the queue closes.
fn run_hooks(hook: &Hook, rx: &Receiver<Event>, abort: &AtomicBool) {
    let mut skipped = 0u64;
    for event in rx.iter() {
        if abort.load(Ordering::SeqCst) {
            skipped += 1;
            continue;
        }
        run_hook(hook, &event, abort);
    }
    if skipped > 0 {
        warn(&format!(
            "mirrorvol serve stopped before the --on-event hook ran for {skipped} event{}",
            if skipped == 1 { "" } else { "s" }
        ));
    }
}

/// Runs the hook for one event, in a process group of its own (so that a
/// time-out kills what it started too, and a Ctrl-C meant for `serve` does
/// not reach it), and reports how it ended if not well.
fn run_hook(hook: &Hook, event: &Event, abort: &AtomicBool) {
    use std::os::unix::process::CommandExt;
    let name = event.kind.name();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&hook.command)
        .envs(event.env())
        .stdin(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn(&format!(
                "the --on-event hook for {name} could not be started: {e}"
            ));
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // One line, well under a pipe's buffer: this does not wait on the
        // hook. A hook that exits without reading it is fine (EPIPE).
        let _ = stdin.write_all(format!("{}\n", event.json_line()).as_bytes());
    }
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(status)) => {
                let how = match (
                    status.code(),
                    std::os::unix::process::ExitStatusExt::signal(&status),
                ) {
                    (Some(code), _) => format!("exited with status {code}"),
                    (None, Some(sig)) => format!("was killed by signal {sig}"),
                    (None, None) => status.to_string(),
                };
                warn(&format!("the --on-event hook for {name} {how}"));
                return;
            }
            Ok(None) => {}
            Err(e) => {
                warn(&format!(
                    "cannot wait for the --on-event hook for {name}: {e}"
                ));
                return;
            }
        }
        let late = started.elapsed() >= hook.timeout;
        if late || abort.load(Ordering::SeqCst) {
            // SAFETY: kill takes integers; the group is the child's own
            // (process_group(0)), and the child is not reaped yet, so its
            // id still names it.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            warn(&if late {
                format!(
                    "the --on-event hook for {name} did not finish within {} s; it was killed",
                    hook.timeout.as_secs_f64()
                )
            } else {
                format!("the --on-event hook for {name} was killed: mirrorvol serve is stopping")
            });
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The disk and volume states of a group, as `status` shows them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub group: String,
    /// Disk → (path, state).
    pub disks: BTreeMap<Uuid, (String, &'static str)>,
    /// Volume → (name, state).
    pub volumes: BTreeMap<Uuid, (String, &'static str)>,
}

/// How far a volume state is from healthy, for telling a loss from a gain.
fn volume_rank(state: &str) -> u8 {
    match state {
        "healthy" => 0,
        "resynching" => 1,
        "failed-redundancy" => 2,
        "failed-redundancy-at-risk" => 3,
        _ => 4,
    }
}

fn in_service(state: &str) -> bool {
    matches!(state, "online" | "online-errors")
}

impl Snapshot {
    pub fn of(g: &Group) -> Snapshot {
        Snapshot {
            group: g.config.name.clone(),
            disks: g
                .config
                .disks
                .iter()
                .map(|d| (d.uuid, (g.disk_path(d.uuid), g.disk_state(d.uuid))))
                .collect(),
            volumes: g
                .config
                .volumes
                .iter()
                .map(|v| (v.uuid, (v.name.clone(), g.volume_state(v))))
                .collect(),
        }
    }

    /// The events that lead from this snapshot to `after`, disks first:
    /// - `disk-failed`: a disk in service is not any more (failed, missing);
    /// - `disk-returned`: a disk out of service is in service again;
    /// - `volume-degraded`: a volume's state got worse, to
    ///   `failed-redundancy` or below;
    /// - `volume-healthy`: a volume is healthy again.
    ///
    /// Disks and volumes that come or go (added, deleted) make no event.
    pub fn events_to(&self, after: &Snapshot) -> Vec<Event> {
        let mut out = Vec::new();
        for (uuid, (path, state)) in &after.disks {
            let Some((_, was)) = self.disks.get(uuid) else {
                continue;
            };
            let kind = match (in_service(was), in_service(state)) {
                (true, false) => EventKind::DiskFailed,
                (false, true) => EventKind::DiskReturned,
                _ => continue,
            };
            out.push(
                Event::new(kind)
                    .with("group", after.group.as_str())
                    .with("disk", path.as_str())
                    .with("state", *state)
                    .with("previous", *was),
            );
        }
        for (uuid, (name, state)) in &after.volumes {
            let Some((_, was)) = self.volumes.get(uuid) else {
                continue;
            };
            let (rank, was_rank) = (volume_rank(state), volume_rank(was));
            let kind = if rank == 0 && was_rank > 0 {
                EventKind::VolumeHealthy
            } else if rank > was_rank && rank >= volume_rank("failed-redundancy") {
                EventKind::VolumeDegraded
            } else {
                continue;
            };
            out.push(
                Event::new(kind)
                    .with("group", after.group.as_str())
                    .with("volume", name.as_str())
                    .with("state", *state)
                    .with("previous", *was),
            );
        }
        out
    }
}

/// The event of a group `serve` refuses as split: each side's disks
/// (`side1` to `side4`, and every side in `sides`, one "disk, disk" item
/// per side) and the refusal sentence.
pub fn split_brain_event(g: &Group, reason: &str) -> Option<Event> {
    let split = g.split.as_ref()?;
    const SIDES: [&str; 4] = ["side1", "side2", "side3", "side4"];
    let mut e = Event::new(EventKind::SplitBrain).with("group", g.config.name.as_str());
    for (name, side) in SIDES.iter().zip(&split.sides) {
        e = e.with(name, side.paths.clone());
    }
    let sides: Vec<String> = split.sides.iter().map(|s| s.paths.join(", ")).collect();
    Some(e.with("sides", sides).with("reason", reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(disks: &[(&str, &'static str)], volumes: &[(&str, &'static str)]) -> Snapshot {
        let id = |s: &str| {
            Uuid::from_u128(
                s.bytes()
                    .fold(1u128, |h, b| h.wrapping_mul(131) + b as u128),
            )
        };
        Snapshot {
            group: "g".into(),
            disks: disks
                .iter()
                .map(|(p, s)| (id(p), (p.to_string(), *s)))
                .collect(),
            volumes: volumes
                .iter()
                .map(|(n, s)| (id(n), (n.to_string(), *s)))
                .collect(),
        }
    }

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind.name()).collect()
    }

    #[test]
    fn a_failed_disk_degrades_its_volume_and_disks_come_first() {
        let before = snap(&[("/a", "online"), ("/b", "online")], &[("v", "healthy")]);
        let after = snap(
            &[("/a", "online"), ("/b", "failed")],
            &[("v", "failed-redundancy")],
        );
        let e = before.events_to(&after);
        assert_eq!(kinds(&e), ["disk-failed", "volume-degraded"]);
        assert_eq!(e[0].field("disk"), Some(&Value::from("/b")));
        assert_eq!(e[0].field("previous"), Some(&Value::from("online")));
        assert_eq!(e[1].field("state"), Some(&Value::from("failed-redundancy")));
    }

    #[test]
    fn a_resync_start_is_no_degradation_and_its_end_is_healthy() {
        let disks = [("/a", "online"), ("/b", "online")];
        let stale = snap(&disks, &[("v", "failed-redundancy")]);
        let resyncing = snap(&disks, &[("v", "resynching")]);
        let healthy = snap(&disks, &[("v", "healthy")]);
        assert!(stale.events_to(&resyncing).is_empty());
        assert_eq!(kinds(&resyncing.events_to(&healthy)), ["volume-healthy"]);
        // Losing the copy being resynced loses redundancy again.
        assert_eq!(kinds(&resyncing.events_to(&stale)), ["volume-degraded"]);
        // A mirror being added to a healthy volume is not degraded.
        assert!(healthy.events_to(&resyncing).is_empty());
    }

    #[test]
    fn a_returned_disk_is_reported_and_new_or_gone_objects_are_not() {
        let before = snap(&[("/a", "online"), ("/b", "failed")], &[("v", "healthy")]);
        let after = snap(
            &[("/a", "online"), ("/b", "online"), ("/c", "online")],
            &[("w", "failed")],
        );
        assert_eq!(kinds(&before.events_to(&after)), ["disk-returned"]);
        let missing = snap(&[("/a", "missing"), ("/b", "failed")], &[]);
        // failed → missing: still out of service.
        assert_eq!(kinds(&before.events_to(&missing)), ["disk-failed"]);
    }

    #[test]
    fn the_json_line_and_the_environment_carry_the_same_fields() {
        let e = Event::new(EventKind::ScrubMismatch)
            .with("group", "g")
            .with("volume", "v \"q\"")
            .with("offset", 4096u64)
            .with("plexes", vec!["/a".to_string(), "/b".to_string()]);
        let line = e.json_line();
        assert!(line.starts_with("{\"event\":\"scrub-mismatch\",\"time\":"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["volume"], "v \"q\"");
        assert_eq!(v["offset"], 4096);
        assert_eq!(v["plexes"], serde_json::json!(["/a", "/b"]));
        assert!(v["time"].as_f64().unwrap() > 1.6e9);
        let env: BTreeMap<String, String> = e.env().into_iter().collect();
        assert_eq!(env["MIRRORVOL_EVENT"], "scrub-mismatch");
        assert_eq!(env["MIRRORVOL_OFFSET"], "4096");
        assert_eq!(env["MIRRORVOL_PLEXES"], "/a\n/b");
        assert_eq!(env["MIRRORVOL_EVENT_JSON"], line);
    }

    #[test]
    fn the_hook_sees_events_in_order_and_a_slow_one_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let events = Events::start(Some(Hook {
            command: format!(
                "read line; echo \"$MIRRORVOL_EVENT $MIRRORVOL_PERCENT\" >> {}; [ \"$MIRRORVOL_PERCENT\" != 20 ] || sleep 30",
                log.display()
            ),
            timeout: Duration::from_millis(300),
        }));
        let started = Instant::now();
        for p in [10u64, 20, 30] {
            events.emit(Event::new(EventKind::ResyncProgress).with("percent", p));
        }
        // emit returned at once, though the hook sleeps on 20.
        assert!(started.elapsed() < Duration::from_millis(200));
        events.shutdown(Duration::from_secs(10));
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            text,
            "resync-progress 10\nresync-progress 20\nresync-progress 30\n"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
