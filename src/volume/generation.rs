//! Data generations at work (the blocks are in [`crate::format::state`]).
//!
//! Every disk in service records the group's data generation: a counter
//! and a random id. The [`GenerationKeeper`] raises it on all of them, and
//! waits until it is durable, before the first write after the group is
//! opened for writing and before the first write after each idle period
//! (the group goes idle once no write has been in flight for
//! [`IDLE_BEFORE_NEW_GENERATION`], as md marks an array clean after its
//! safe-mode delay and bumps its events counter when it is written again).
//! A copy of a disk taken earlier (a restored snapshot, a rolled-back
//! image, a disk that was pulled and comes back from elsewhere) then holds
//! an older counter than its twins, and assembly sees it as stale.
//!
//! [`VersionRaise`] raises an older disk's labels to the current format
//! version once, before anything of the current format is first written.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::disk::Disk;
use crate::format::state::{Generation, now_secs};
use crate::format::{FORMAT_VERSION, Label, Layout, ondisk};

/// How long no write may be in flight before the next write starts a new
/// generation (the bitmap clearing period: see the README).
pub const IDLE_BEFORE_NEW_GENERATION: Duration = Duration::from_secs(5);

/// Raises a disk's labels to [`FORMAT_VERSION`], once, before the first
/// write of anything that version adds, so that an older build refuses the
/// disk ("label format version N is newer ...") rather than ignore it.
#[derive(Debug)]
pub struct VersionRaise {
    disk: Arc<dyn Disk>,
    /// The label to write; `None` once the disk is at the current version.
    pending: Mutex<Option<Label>>,
}

impl VersionRaise {
    pub fn new(disk: Arc<dyn Disk>, label: &Label) -> Arc<VersionRaise> {
        let pending = (label.version < FORMAT_VERSION).then(|| {
            let mut l = label.clone();
            l.version = FORMAT_VERSION;
            l
        });
        Arc::new(VersionRaise {
            disk,
            pending: Mutex::new(pending),
        })
    }

    /// Writes the raised labels unless done already (a failure leaves it
    /// pending, and the next write tries again).
    pub fn ensure(&self) -> io::Result<()> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(label) = pending.as_ref() {
            ondisk::write_labels(&*self.disk, label)
                .map_err(|e| io::Error::other(e.to_string()))?;
            *pending = None;
        }
        Ok(())
    }

    /// True while the labels are still at an older version.
    pub fn is_pending(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// A disk the keeper writes generations to.
#[derive(Debug, Clone)]
pub struct GenerationDisk {
    pub disk: Arc<dyn Disk>,
    pub layout: Layout,
    pub raise: Arc<VersionRaise>,
    pub path: String,
}

#[derive(Debug)]
struct State {
    current: Generation,
    disks: BTreeMap<Uuid, GenerationDisk>,
    /// The generation (counter, id) each disk last recorded, as far as this
    /// process knows.
    known: BTreeMap<Uuid, (u64, Uuid)>,
}

/// Raises the group's data generation on every disk in service (see the
/// module's top).
#[derive(Debug)]
pub struct GenerationKeeper {
    state: Mutex<State>,
    /// Serializes raising: the second writer after an idle period waits for
    /// the first one's raise instead of raising again.
    raising: Mutex<()>,
    /// False while the group is idle: the next write raises the generation.
    dirty: AtomicBool,
    inflight: AtomicU64,
    /// When the last write ended (ms since `epoch`).
    last_done: AtomicU64,
    epoch: Instant,
    idle: Duration,
    /// Generations raised by this process, for tests and status.
    pub raised: AtomicU64,
}

/// A write the keeper counts in; dropping it counts it out.
pub struct GenerationTicket(Arc<GenerationKeeper>);

impl GenerationTicket {
    /// True when the group was idle (or just opened): the write must wait
    /// for a new generation.
    pub fn needs_raise(&self) -> bool {
        !self.0.dirty.load(Ordering::SeqCst)
    }

    /// Raises the generation unless another writer did meanwhile.
    pub fn raise(&self) -> io::Result<()> {
        let k = &self.0;
        let _raising = k.raising.lock().unwrap_or_else(|e| e.into_inner());
        if !k.dirty.load(Ordering::SeqCst) {
            k.raise()?;
            k.dirty.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Drop for GenerationTicket {
    fn drop(&mut self) {
        let k = &self.0;
        k.last_done
            .store(k.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
        k.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GenerationKeeper {
    /// A keeper that starts from `current` (the newest generation assembly
    /// found; counter 0 when no disk had one) and knows what each disk held.
    pub fn new(
        current: Generation,
        known: BTreeMap<Uuid, (u64, Uuid)>,
        idle: Duration,
    ) -> Arc<GenerationKeeper> {
        Arc::new(GenerationKeeper {
            state: Mutex::new(State {
                current,
                disks: BTreeMap::new(),
                known,
            }),
            raising: Mutex::new(()),
            dirty: AtomicBool::new(false),
            inflight: AtomicU64::new(0),
            last_done: AtomicU64::new(0),
            epoch: Instant::now(),
            idle,
            raised: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disks in service from now on (the group's commit sets them).
    /// One that does not hold the current generation yet (it joined, came
    /// back, or its plexes were found stale and are now recorded so) is
    /// given it now: from here on the config says what it lacks.
    pub fn set_disks(&self, disks: BTreeMap<Uuid, GenerationDisk>) {
        self.serve_disks(disks, true);
    }

    /// The disks in service when the group starts. A disk behind the
    /// current generation is not written yet: the first write raises the
    /// generation on every disk, and the first commit gives the current one
    /// to those behind (so a command refused after assembly writes none).
    pub fn start_disks(&self, disks: BTreeMap<Uuid, GenerationDisk>) {
        self.serve_disks(disks, false);
    }

    fn serve_disks(&self, disks: BTreeMap<Uuid, GenerationDisk>, catch_up: bool) {
        let _raising = self.raising.lock().unwrap_or_else(|e| e.into_inner());
        let (current, behind) = {
            let mut s = self.lock();
            s.disks = disks;
            let behind: BTreeMap<Uuid, GenerationDisk> = s
                .disks
                .iter()
                .filter(|(u, _)| s.known.get(u) != Some(&(s.current.counter, s.current.id)))
                .map(|(u, d)| (*u, d.clone()))
                .collect();
            (s.current, behind)
        };
        if !catch_up || current.counter == 0 || behind.is_empty() {
            return;
        }
        let _ = self.write_all(&current, &behind);
    }

    /// The group's current generation.
    pub fn current(&self) -> Generation {
        self.lock().current
    }

    /// The counter `disk` last recorded, as far as this process knows.
    pub fn known(&self, disk: Uuid) -> Option<u64> {
        self.known_generation(disk).map(|(c, _)| c)
    }

    /// The generation (counter, id) `disk` last recorded, as far as this
    /// process knows.
    pub fn known_generation(&self, disk: Uuid) -> Option<(u64, Uuid)> {
        self.lock().known.get(&disk).copied()
    }

    /// Counts a write in; before the first write after an open or an idle
    /// period, raises the generation on every disk in service and returns
    /// once it is durable on at least one (a disk that fails it is left
    /// behind: its plexes' data writes meet the same disk).
    pub fn before_write(self: &Arc<Self>) -> io::Result<GenerationTicket> {
        let ticket = self.enter();
        if ticket.needs_raise() {
            ticket.raise()?;
        }
        Ok(ticket)
    }

    /// Counts a write in, without raising: [`GenerationTicket::needs_raise`]
    /// says whether [`GenerationTicket::raise`] must run before it goes.
    pub fn enter(self: &Arc<Self>) -> GenerationTicket {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        GenerationTicket(self.clone())
    }

    /// The housekeeper's tick: once no write has been in flight for the
    /// idle period, the next write starts a new generation.
    pub fn tick(&self) {
        if !self.dirty.load(Ordering::SeqCst) {
            return;
        }
        let _raising = self.raising.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_done.load(Ordering::SeqCst);
        if self.inflight.load(Ordering::SeqCst) == 0
            && now.saturating_sub(last) >= self.idle.as_millis() as u64
        {
            self.dirty.store(false, Ordering::SeqCst);
            // A write that counted itself in meanwhile saw the group busy
            // and went on in this generation: it stays busy.
            if self.inflight.load(Ordering::SeqCst) > 0 {
                self.dirty.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Writes the next generation to every disk in service, at once.
    fn raise(&self) -> io::Result<()> {
        let (next, disks) = {
            let s = self.lock();
            let next = Generation {
                counter: s.current.counter + 1,
                id: Uuid::new_v4(),
                previous: s.current.id,
                written_at: now_secs(),
            };
            (next, s.disks.clone())
        };
        if disks.is_empty() {
            self.lock().current = next;
            return Ok(());
        }
        self.write_all(&next, &disks)?;
        self.lock().current = next;
        self.raised.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes generation `g` to `disks` at once; fails when no disk took it.
    fn write_all(&self, g: &Generation, disks: &BTreeMap<Uuid, GenerationDisk>) -> io::Result<()> {
        let outcomes: Vec<(Uuid, io::Result<()>)> = std::thread::scope(|scope| {
            let writers: Vec<_> = disks
                .iter()
                .map(|(uuid, d)| {
                    let w = scope.spawn(move || {
                        d.raise.ensure()?;
                        ondisk::write_generation(&*d.disk, &d.layout, g)
                    });
                    (*uuid, w)
                })
                .collect();
            writers
                .into_iter()
                .map(|(u, w)| {
                    let r = w
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("a generation writer panicked")));
                    (u, r)
                })
                .collect()
        });
        let mut s = self.lock();
        let mut first_error = None;
        let mut wrote = 0;
        for (uuid, r) in outcomes {
            match r {
                Ok(()) => {
                    s.known.insert(uuid, (g.counter, g.id));
                    wrote += 1;
                }
                Err(e) => {
                    let path = disks.get(&uuid).map(|d| d.path.as_str()).unwrap_or("?");
                    tracing::error!(disk = %path, error = %e, "cannot write the data generation");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if wrote == 0 => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MIB;
    use crate::disk::memory::MemDisk;
    use crate::format::{Style, ondisk};

    fn disk() -> (Arc<dyn Disk>, Label) {
        let d: Arc<dyn Disk> = Arc::new(MemDisk::new(64 * MIB));
        let label = ondisk::format_disk(&*d, Style::Raw, Uuid::new_v4(), Uuid::new_v4()).unwrap();
        (d, label)
    }

    fn keeper_over(disks: &[(Arc<dyn Disk>, Label)], idle: Duration) -> Arc<GenerationKeeper> {
        let k = GenerationKeeper::new(
            Generation {
                counter: 0,
                id: Uuid::nil(),
                previous: Uuid::nil(),
                written_at: 0,
            },
            BTreeMap::new(),
            idle,
        );
        k.set_disks(
            disks
                .iter()
                .map(|(d, l)| {
                    (
                        l.disk_uuid,
                        GenerationDisk {
                            disk: d.clone(),
                            layout: l.layout,
                            raise: VersionRaise::new(d.clone(), l),
                            path: "mem".into(),
                        },
                    )
                })
                .collect(),
        );
        k
    }

    fn on_disk(d: &(Arc<dyn Disk>, Label)) -> u64 {
        match ondisk::read_generation(&*d.0, &d.1.layout).unwrap() {
            crate::format::state::Read::Good(g) => g.counter,
            other => panic!("no generation: {other:?}"),
        }
    }

    #[test]
    fn the_first_write_and_the_first_after_idle_raise_the_generation() {
        let disks = [disk(), disk()];
        let k = keeper_over(&disks, Duration::ZERO);
        let t = k.before_write().unwrap();
        assert_eq!((on_disk(&disks[0]), on_disk(&disks[1])), (1, 1));
        // Busy: no new generation, however long, while a write is in flight.
        let t2 = k.before_write().unwrap();
        k.tick();
        drop(t);
        k.tick();
        drop(t2);
        assert_eq!(on_disk(&disks[0]), 1);
        let _t3 = k.before_write().unwrap();
        assert_eq!(on_disk(&disks[0]), 1, "no tick since the writes ended");
        drop(_t3);
        k.tick();
        let _t4 = k.before_write().unwrap();
        assert_eq!((on_disk(&disks[0]), on_disk(&disks[1])), (2, 2));
        assert_eq!(k.known(disks[1].1.disk_uuid), Some(2));
    }

    #[test]
    fn a_short_pause_is_no_idle_period() {
        let disks = [disk()];
        let k = keeper_over(&disks, Duration::from_secs(3600));
        drop(k.before_write().unwrap());
        k.tick();
        drop(k.before_write().unwrap());
        assert_eq!(on_disk(&disks[0]), 1);
    }
}
