//! Remote disks that come back. A disk reached over NBD whose connection
//! was lost (cut, reset, a server killed or hung: not an I/O error the
//! export answered, nor a disk an admin failed) is failed like any disk,
//! and then tried again under `serve`, with backoff: 1 s after it left,
//! then 2, 4, 8, 16 and every 30 s. Each attempt connects anew, on a thread
//! of its own, and reads what answers before anything is written to it:
//! the label of the disk that left, no config the group did not write
//! (another host wrote it meanwhile: a split brain), and the data
//! generation the group last gave it (another export behind the same
//! address, or this one rolled back, holds another). What fails these is
//! not taken back, and says why in `status`; an unreachable export is
//! tried again.
//!
//! Taken back, the disk is reactivated at once (`--remote-return auto`,
//! the default, as DRBD reconnects its peer) or waits for `reactivate`
//! (`manual`, as md waits for a re-add). Either way its plexes are
//! resynced from the write-intent bitmaps only: the bits of a volume with
//! a plex away are kept, so they name every region written meanwhile.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::LiveGroup;
use super::controller::Controller;
use crate::disk::Disk;
use crate::format::DiskState;
use crate::format::ondisk;
use crate::format::state::{Generation, Read};
use crate::volume::queue::QueuedDisk;

/// The first attempt after a disk left; each next one waits twice as long,
/// up to [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// A disk lost again within this long of being taken back flaps: its
/// first attempt waits [`FIRST_RETRY`] times 4 to the power of the times
/// in a row it did so, up to [`FLAP_HOLD`], so a link that keeps breaking
/// (or a disk slower than its deadline) does not cost a reconnection and
/// a resync every few seconds.
const FLAP_WINDOW: Duration = Duration::from_secs(60);
const FLAP_HOLD: Duration = Duration::from_secs(300);

/// What happens to a remote disk that answers again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RemoteReturn {
    /// Reactivated at once; its plexes resync from the bitmaps.
    #[default]
    Auto,
    /// Connected, and left for `reactivate`.
    Manual,
}

/// A remote disk away since its connection was lost (or not reached when
/// `serve` started).
#[derive(Debug)]
pub(super) struct Away {
    pub(super) since: Instant,
    attempts: u32,
    next: Instant,
    /// An attempt is under way.
    trying: bool,
    /// Why the last attempt failed.
    last: Option<String>,
    /// What answered is not the disk that left: no more attempts.
    refused: Option<String>,
    /// Connected again (manual policy): waits for `reactivate`.
    back: bool,
    /// Not reached since `serve` started (missing when the group was
    /// assembled), rather than lost under it.
    missing: bool,
    /// Hot spares were looked for once its grace ended.
    spares_asked: bool,
    /// The attempt made when its grace ended was started.
    last_chance: bool,
    /// Times in a row it was lost again soon after it came back.
    flaps: u32,
}

impl Away {
    fn new(missing: bool, flaps: u32) -> Away {
        let now = Instant::now();
        let first = if flaps == 0 {
            FIRST_RETRY
        } else {
            FIRST_RETRY
                .saturating_mul(4u32.saturating_pow(flaps))
                .min(FLAP_HOLD)
        };
        Away {
            since: now,
            attempts: 0,
            // A disk missing since the start is tried at once.
            next: if missing { now } else { now + first },
            trying: false,
            last: None,
            refused: None,
            back: false,
            missing,
            spares_asked: false,
            last_chance: false,
            flaps,
        }
    }

    /// The link's state, as `status` shows it.
    pub(super) fn shown(&self) -> String {
        let away = self.since.elapsed().as_secs();
        if let Some(why) = &self.refused {
            return format!("answers, but is not taken back: {why}");
        }
        if self.back {
            return "connected again; `mirrorvol reactivate` takes it back".to_string();
        }
        let lost = if self.missing {
            format!("not reached since serve started {away} s ago")
        } else if self.flaps > 0 {
            format!(
                "lost {away} s ago, {} time{} in a row soon after it came back",
                self.flaps,
                if self.flaps == 1 { "" } else { "s" }
            )
        } else {
            format!("lost {away} s ago")
        };
        let next = self.next.saturating_duration_since(Instant::now());
        if self.last.is_none() && !self.trying && next >= Duration::from_secs(2) {
            return format!("{lost}; reconnecting in {} s", next.as_secs());
        }
        match &self.last {
            Some(e) => format!(
                "{lost}; reconnecting ({} attempt{} failed, the last: {e})",
                self.attempts,
                if self.attempts == 1 { "" } else { "s" }
            ),
            None => format!("{lost}; reconnecting"),
        }
    }
}

/// What a remote disk must show to be taken back.
pub(super) struct ReturnCheck {
    path: String,
    disk: Uuid,
    group: Uuid,
    /// The seqno of the commit that recorded it out of service: a config
    /// on it this new or newer was written by someone else (a config write
    /// of before whose answer was lost in the cut is older).
    left_at: u64,
    /// The data generations it may hold.
    generations: Allowed,
    /// The generation it holds, once read.
    seen: Mutex<Option<Read<Generation>>>,
}

/// The data generations a returning disk may hold.
enum Allowed {
    /// Any (an admin's `reactivate`: one older than it left with gets a
    /// full resync).
    Any,
    /// One of these (counter, id; `None`: none at all, a disk never given
    /// one): the one it left with, or the one being given when it left.
    Exactly(Vec<Option<(u64, Uuid)>>),
    /// The counter the config recorded when it left (a disk not reached
    /// since `serve` started: the id it holds was never seen).
    Counter(u64),
}

impl Allowed {
    fn admits(&self, held: &Read<Generation>) -> bool {
        match (self, held) {
            (Allowed::Any, _) => true,
            (Allowed::Exactly(list), Read::Good(g)) => list.contains(&Some((g.counter, g.id))),
            (Allowed::Exactly(list), Read::Empty) => list.contains(&None),
            (Allowed::Counter(c), Read::Good(g)) => g.counter == *c,
            (Allowed::Counter(c), Read::Empty) => *c == 0,
            (_, Read::Damaged(_)) => false,
        }
    }

    /// The generation it left with, as shown.
    fn shown(&self) -> String {
        match self {
            Allowed::Exactly(list) => match list.first() {
                Some(Some((c, _))) => c.to_string(),
                _ => "none".to_string(),
            },
            Allowed::Counter(0) => "none".to_string(),
            Allowed::Counter(c) => c.to_string(),
            Allowed::Any => "any".to_string(),
        }
    }
}

/// What answers is not the disk that left (or not as it left): no more
/// attempts, unlike an error reaching it.
#[derive(Debug)]
struct NotIt(String);

impl std::fmt::Display for NotIt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotIt {}

fn not_it(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, NotIt(why))
}

/// Whether `e` says what answered is not the disk that left.
fn is_not_it(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NotIt>())
}

impl ReturnCheck {
    fn check(&self, d: &dyn Disk) -> io::Result<()> {
        let path = &self.path;
        let read = match ondisk::read_label(d) {
            Ok(Some(read)) => read,
            Ok(None) => return Err(not_it(format!("{path} holds no mirrorvol label"))),
            Err(ondisk::FormatError::Io { source, .. }) => return Err(source),
            Err(e) => return Err(not_it(format!("the label of {path} cannot be read: {e}"))),
        };
        let l = &read.label;
        if l.disk_uuid != self.disk || l.group_uuid != self.group {
            return Err(not_it(format!(
                "{path} now holds disk {} of group {}, not the disk that left",
                l.disk_uuid, l.group_uuid
            )));
        }
        let seqno = match ondisk::read_config(d, l) {
            Ok(slots) => slots.newest.map_or(0, |(_, slot)| slot.seqno),
            Err(ondisk::FormatError::Io { source, .. }) => return Err(source),
            Err(e) => return Err(not_it(format!("the config of {path} cannot be read: {e}"))),
        };
        if seqno >= self.left_at {
            return Err(not_it(format!(
                "{path} holds config {seqno}, written after it left the group at {} by someone else: a split brain; stop mirrorvol serve and settle it with resolve-split-brain",
                self.left_at
            )));
        }
        let generation = match ondisk::read_generation(d, &l.layout) {
            Ok(g) => g,
            Err(ondisk::FormatError::Io { source, .. }) => return Err(source),
            Err(_) => Read::Damaged("the generation slots cannot be read"),
        };
        if !self.generations.admits(&generation) {
            let held = match &generation {
                Read::Good(g) => g.counter.to_string(),
                Read::Empty => "none".to_string(),
                Read::Damaged(_) => "unreadable".to_string(),
            };
            return Err(not_it(format!(
                "{path} holds data generation {held}, not {} it left with: another copy of the disk, or this one rolled back; `mirrorvol reactivate` takes it back with a full resync",
                self.generations.shown()
            )));
        }
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(generation);
        Ok(())
    }
}

/// How an attempt reaches the disk.
pub(super) enum Reach {
    /// A member whose connection broke: connected again.
    Again(Arc<QueuedDisk>),
    /// A disk not reached since `serve` started: opened.
    Open(std::path::PathBuf, crate::group::DiskOpen),
}

/// Reaches `disk` and checks what answers (on the caller's thread: it waits
/// up to the disk's deadline for each connection). Returns the disk opened
/// (for [`Reach::Open`]) and the generation it holds.
fn attempt(
    reach: &Reach,
    check: &ReturnCheck,
) -> io::Result<(Option<Arc<QueuedDisk>>, Read<Generation>)> {
    match reach {
        Reach::Again(disk) => Ok((None, reconnect(disk, check)?)),
        Reach::Open(path, how) => {
            let disk = crate::group::open_disk_with(path, how).map_err(|e| match e {
                crate::Error::Io { source, .. } => source,
                other => io::Error::other(other.to_string()),
            })?;
            check.check(&*disk)?;
            let seen = check.seen.lock().unwrap_or_else(|e| e.into_inner()).take();
            Ok((Some(disk), seen.unwrap_or(Read::Empty)))
        }
    }
}

/// Connects `disk` again and checks what answers (on the caller's thread:
/// it waits up to the disk's deadline for each connection). A disk whose
/// connection is whole is only checked. Returns the generation it holds.
pub(super) fn reconnect(disk: &QueuedDisk, check: &ReturnCheck) -> io::Result<Read<Generation>> {
    match disk.reconnect(&|d| check.check(d)) {
        Some(r) => r?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the disk has no connection to make again",
            ));
        }
    }
    let seen = check.seen.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(seen.unwrap_or(Read::Empty))
}

impl Controller {
    /// From now on remote disks whose connection is lost are tried again
    /// (`serve`; an offline command's group never is).
    pub(super) fn set_remote_return(&mut self, policy: RemoteReturn) {
        self.remote_return = Some(policy);
        self.find_away();
    }

    /// A remote disk lost its connection and was failed: it is tried
    /// again (and after a restart of `serve`, by the mark in the config).
    pub(super) fn link_lost(&mut self, disk: Uuid) {
        if let Some(d) = self.group.config.disk_mut(disk) {
            d.link_lost = true;
        }
        let away = self.lost_away(disk);
        self.away.insert(disk, away);
    }

    /// The away entry of a disk whose link was lost now: lost again soon
    /// after it came back, it waits longer.
    fn lost_away(&self, disk: Uuid) -> Away {
        let flaps = match self.returned.get(&disk) {
            Some((at, n)) if at.elapsed() < FLAP_WINDOW => n + 1,
            _ => 0,
        };
        let away = Away::new(false, flaps);
        if flaps > 0 {
            tracing::warn!(
                disk = %self.group.disk_path(disk),
                flaps,
                wait_seconds = away.next.saturating_duration_since(Instant::now()).as_secs(),
                "the remote disk was lost again soon after it came back; the next attempt waits longer"
            );
        }
        away
    }

    /// Remote disks out of service that are to be tried: those whose
    /// connection was lost (marked in the config, so also those lost
    /// before this `serve` started) and those missing (not reached when
    /// the group was assembled).
    pub(super) fn find_away(&mut self) {
        let g = &self.group;
        let found: Vec<(Uuid, bool)> = g
            .config
            .disks
            .iter()
            .filter(|d| !g.is_online(d.uuid) && !self.away.contains_key(&d.uuid))
            .filter(|d| {
                d.link_lost || (d.state == DiskState::Missing && !g.members.contains_key(&d.uuid))
            })
            .filter(|d| crate::group::is_nbd(std::path::Path::new(&d.path)))
            .map(|d| (d.uuid, !d.link_lost))
            .collect();
        for (disk, missing) in found {
            let away = if missing {
                Away::new(true, 0)
            } else {
                self.lost_away(disk)
            };
            self.away.insert(disk, away);
        }
    }

    /// What `disk` must show to be taken back; `strict`: the generation it
    /// left with.
    pub(super) fn return_check(&self, disk: Uuid, strict: bool) -> Option<(Reach, ReturnCheck)> {
        let g = &self.group;
        let Some(m) = g.members.get(&disk) else {
            // Not reached since `serve` started: opened anew, and it must
            // hold the generation the config says it left with.
            let entry = g.config.disk(disk)?;
            return Some((
                Reach::Open(entry.path.clone().into(), g.open),
                ReturnCheck {
                    path: entry.path.clone(),
                    disk,
                    group: g.config.uuid,
                    left_at: entry.state_seqno,
                    generations: Allowed::Counter(entry.left_generation),
                    seen: Mutex::new(None),
                },
            ));
        };
        let generations = strict.then(|| {
            // What it left with: what the keeper last gave it, else what
            // it held when opened (none, for a disk never given one).
            let known = g.keeper.as_ref().and_then(|k| k.known_generation(disk));
            let left_with = match (known, &m.generation) {
                (Some(known), _) => Some(known),
                (None, Read::Good(at_open)) => Some((at_open.counter, at_open.id)),
                (None, _) => None,
            };
            let mut allowed = vec![left_with];
            if let Some(k) = &g.keeper {
                let current = k.current();
                allowed.push(Some((current.counter, current.id)));
            }
            Allowed::Exactly(allowed)
        });
        Some((
            Reach::Again(m.disk.clone()),
            ReturnCheck {
                path: g.disk_path(disk),
                disk,
                group: g.config.uuid,
                // A disk still in service (one that hung holding a last
                // copy) left at none: only a config past the group's is
                // someone else's.
                left_at: match g.config.disk(disk) {
                    Some(d) if !g.is_online(disk) => d.state_seqno,
                    _ => g.config.seqno + 1,
                },
                generations: generations.unwrap_or(Allowed::Any),
                seen: Mutex::new(None),
            },
        ))
    }

    /// The housekeeper's second: starts the attempts that are due, each on
    /// a thread of its own.
    pub(super) fn try_returns(&mut self) {
        if self.remote_return.is_none() || self.stopping {
            return;
        }
        self.find_away();
        // Back in service by other means (an admin's reactivate, a new
        // disk in its place), or gone from the group: no longer away.
        let g = &self.group;
        self.away
            .retain(|u, a| a.trying || (g.config.disk(*u).is_some() && !g.is_online(*u)));
        // A disk's grace ended: a hot spare may take its plexes now, once
        // one more attempt failed (the backoff may have made the last one
        // long before the end: a server back at 8 s of a 10 s grace is
        // tried at 15 s) or showed it is not the disk that left.
        let delay = self.spare_delay;
        let now = Instant::now();
        let mut graced = false;
        for a in self.away.values_mut() {
            if a.spares_asked || a.since.elapsed() < delay {
                continue;
            }
            let decided = a.refused.is_some() || a.back || delay.is_zero();
            if !decided && a.trying {
                // An attempt under way when the grace ends is its last
                // chance.
                a.last_chance = true;
                continue;
            }
            if !decided && !a.last_chance {
                a.last_chance = true;
                a.next = now;
                continue;
            }
            a.spares_asked = true;
            graced = true;
        }
        if graced {
            self.use_spares();
        }
        let due: Vec<Uuid> = self
            .away
            .iter()
            .filter(|(_, a)| !a.trying && !a.back && a.refused.is_none() && now >= a.next)
            .map(|(u, _)| *u)
            .collect();
        for disk in due {
            let Some((reach, check)) = self.return_check(disk, true) else {
                continue;
            };
            let live = self.live.clone();
            let started = std::thread::Builder::new()
                .name("reconnect".into())
                .spawn(move || {
                    let r = attempt(&reach, &check);
                    if let Some(live) = live.upgrade() {
                        live.send(move |c| c.attempted(disk, r));
                    }
                });
            if let Some(a) = self.away.get_mut(&disk) {
                a.trying = started.is_ok();
            }
        }
    }

    /// An attempt ended.
    fn attempted(
        &mut self,
        disk: Uuid,
        r: io::Result<(Option<Arc<QueuedDisk>>, Read<Generation>)>,
    ) {
        let path = self.group.disk_path(disk);
        let stopping = self.stopping;
        let Some(a) = self.away.get_mut(&disk) else {
            return;
        };
        a.trying = false;
        let flaps = a.flaps;
        if stopping {
            return;
        }
        match r {
            Err(e) if is_not_it(&e) => {
                tracing::error!(disk = %path, error = %e, "the remote disk answers again but is not taken back");
                a.refused = Some(e.to_string());
                // Not coming back by itself: a hot spare may take over.
                self.use_spares();
            }
            Err(e) => {
                a.attempts += 1;
                let wait = FIRST_RETRY
                    .saturating_mul(1 << a.attempts.min(5))
                    .min(LAST_RETRY);
                a.next = Instant::now() + wait;
                if a.attempts.is_power_of_two() {
                    tracing::warn!(disk = %path, error = %e, attempts = a.attempts, "the remote disk does not answer yet");
                }
                a.last = Some(e.to_string());
            }
            Ok((opened, generation)) => {
                if let Some(m) = self.group.members.get_mut(&disk) {
                    m.generation = generation;
                }
                if self.remote_return == Some(RemoteReturn::Manual) {
                    a.back = true;
                    tracing::warn!(disk = %path, "the remote disk answers again; `mirrorvol reactivate` takes it back");
                    return;
                }
                // Reached for the first time since `serve` started: a
                // member from now on.
                if let Some(queued) = opened
                    && !self.group.members.contains_key(&disk)
                    && let Err(e) = self.group.attach_disk(std::path::Path::new(&path), queued)
                {
                    tracing::error!(disk = %path, error = %e, "the remote disk answers but cannot be taken back");
                    if let Some(a) = self.away.get_mut(&disk) {
                        // Not this disk: no more attempts. An error reaching
                        // it (the link lost again, a read timing out): later.
                        if matches!(e, crate::Error::Refused(_)) {
                            a.refused = Some(e.to_string());
                        } else {
                            a.attempts += 1;
                            a.next = Instant::now() + LAST_RETRY.min(FIRST_RETRY * 4);
                            a.last = Some(e.to_string());
                        }
                    }
                    return;
                }
                match self.reactivate_by_path(std::path::Path::new(&path)) {
                    Ok(done) => {
                        tracing::warn!(disk = %path, "the remote disk answers again: {}", done.message);
                        self.away.remove(&disk);
                        self.returned.insert(disk, (Instant::now(), flaps));
                    }
                    // Back by other means meanwhile.
                    Err(_) if self.group.is_online(disk) => {
                        self.away.remove(&disk);
                    }
                    Err(e) => {
                        tracing::error!(disk = %path, error = %e, "the remote disk answers again but cannot be reactivated");
                        if let Some(a) = self.away.get_mut(&disk) {
                            if matches!(e, crate::Error::Refused(_)) {
                                a.refused = Some(e.to_string());
                            } else {
                                a.attempts += 1;
                                a.next = Instant::now() + LAST_RETRY;
                                a.last = Some(e.to_string());
                            }
                        }
                    }
                }
            }
        }
    }

    /// The remote disks whose plexes no hot spare takes yet: being
    /// reconnected (not refused), in their grace (lost less than the spare
    /// delay ago) or in the attempt made when it ended.
    pub(super) fn spare_waits_for(&self) -> Vec<Uuid> {
        self.away
            .iter()
            .filter(|(_, a)| {
                // Without reconnection (not under serve) nothing ends
                // the last chance: the grace alone counts.
                let tried =
                    self.remote_return.is_some() && !a.spares_asked && !self.spare_delay.is_zero();
                a.refused.is_none() && (a.since.elapsed() < self.spare_delay || tried)
            })
            .map(|(u, _)| *u)
            .collect()
    }

    /// The link state of every remote disk away, for `status`.
    pub(super) fn links(&self) -> Vec<(Uuid, String)> {
        self.away
            .iter()
            .filter(|(u, _)| !self.group.is_online(**u))
            .map(|(u, a)| (*u, a.shown()))
            .collect()
    }
}

impl LiveGroup {
    /// `serve --remote-return`: remote disks whose connection was lost are
    /// tried again from now on.
    pub fn set_remote_return(&self, policy: RemoteReturn) {
        self.send(move |c| c.set_remote_return(policy));
    }

    /// Before an admin's `reactivate` of a remote disk whose connection
    /// broke: connects it again, on the caller's thread, and checks that
    /// it is the disk that left (any generation: an older one gets a full
    /// resync). Nothing to do for other disks.
    pub(super) fn reconnect_for_admin(&self, path: &std::path::Path) -> crate::Result<()> {
        if !crate::group::is_nbd(path) {
            return Ok(());
        }
        let path = path.to_path_buf();
        let plan = self
            .call(move |c| {
                let disk = c.group.resolve_disk(&path).ok()?;
                let (Reach::Again(queued), check) = c.return_check(disk, false)? else {
                    // Not a member: `reactivate` opens it.
                    return None;
                };
                let broken = queued.queue().disk().is_some_and(|d| d.health().is_err());
                broken.then_some((disk, queued, check))
            })
            .flatten();
        let Some((disk, queued, check)) = plan else {
            return Ok(());
        };
        match reconnect(&queued, &check) {
            Ok(generation) => {
                self.call(move |c| {
                    if let Some(m) = c.group.members.get_mut(&disk) {
                        m.generation = generation;
                    }
                    c.away.remove(&disk);
                });
                Ok(())
            }
            Err(e) if is_not_it(&e) => {
                // Said in status too, as an attempt of its own would.
                let why = e.to_string();
                self.call(move |c| {
                    if let Some(a) = c.away.get_mut(&disk) {
                        a.refused = Some(why);
                    }
                });
                Err(crate::Error::refused(e.to_string()))
            }
            Err(e) => Err(crate::Error::io(
                format!("cannot reach disk {}", check.path),
                e,
            )),
        }
    }
}
