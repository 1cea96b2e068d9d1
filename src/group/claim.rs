//! One owner per group, across processes and hosts: whoever opens a group
//! for writing claims it on the disks themselves, as ZFS's multihost
//! protection does, and renews the claim every heartbeat interval while it
//! holds the group. The claim block's layout is in
//! [`crate::format::state`].
//!
//! Claiming reads every disk's claim block:
//! - released, never written, or written by a process of this boot that
//!   is gone (same host id, same boot id, pid dead): free, no wait;
//! - written by a live process of this boot: refused, naming it;
//! - anything else (another host, another boot of this host, a clone of
//!   this machine): the holder may be alive. The claimer watches the
//!   sequence for longer than the holder would go on without renewing
//!   (its fence time, recorded in the block, plus two intervals): a
//!   change refuses, no change means the holder stopped, and the claim is
//!   taken over. Liveness is the sequence changing, never a clock compared
//!   across hosts.
//!
//! A claimer that sees no majority of the group's disks in service never
//! claims without `--force-claim`: a partition cannot give each side a
//! disk. The holder fences itself: when it could not renew its claim on a
//! majority of the disks for its fence time, every I/O of the group fails
//! from then on (before anyone may take over), and `serve` stops.
//!
//! The host id is a random UUID kept in `/var/lib/mirrorvol/host-id`
//! (`$MIRRORVOL_HOST_ID_FILE`), made on first use; the boot id is the
//! kernel's, different on every boot even of cloned machines, which share
//! their machine-id and may share that file too: a same-host claim from
//! another boot is waited for like a foreign one.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{Group, holder};
use crate::format::state::{Activity, ClaimBlock, Read, now_secs};
use crate::format::{DiskState, ondisk};
use crate::volume::generation::GenerationDisk;
use crate::volume::queue::{DiskQueue, WriteGate};
use crate::{Error, Result};

/// The environment variable naming the host-id file.
pub const HOST_ID_ENV: &str = "MIRRORVOL_HOST_ID_FILE";
/// How often the holder renews its claim.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// The longest a claimer waits for a holder it cannot see stop.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Who claims: this host, this boot, this process.
#[derive(Debug, Clone)]
pub struct Identity {
    pub host: Uuid,
    pub boot: Uuid,
    pub pid: u32,
    pub hostname: String,
}

/// Where the host id is kept: `$MIRRORVOL_HOST_ID_FILE`, else
/// `/var/lib/mirrorvol/host-id`, else (a user who cannot write there, with
/// groups of image files) `~/.local/state/mirrorvol/host-id`.
fn host_id_file() -> PathBuf {
    if let Some(p) = std::env::var_os(HOST_ID_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let system = PathBuf::from("/var/lib/mirrorvol/host-id");
    if system.exists() || system.parent().is_some_and(can_write) {
        return system;
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/mirrorvol/host-id"),
        None => system,
    }
}

/// Whether this process may create files in `dir` (made when absent).
fn can_write(dir: &std::path::Path) -> bool {
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: access(2) only reads the NUL-terminated path we own.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// This host's id: read from the host-id file, made there on first use.
pub fn host_id() -> Result<Uuid> {
    let path = host_id_file();
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Uuid::parse_str(text.trim()).map_err(|_| {
            Error::corrupt(format!(
                "host id file {} does not hold a UUID; remove it to make a new one",
                path.display()
            ))
        });
    }
    let id = Uuid::new_v4();
    let made = (|| -> io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Made aside and renamed: two first commands at once agree on one.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, format!("{id}\n"))?;
        std::fs::hard_link(&tmp, &path).or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        std::fs::remove_file(&tmp)
    })();
    made.map_err(|e| {
        Error::io(
            format!("cannot make the host id file {}", path.display()),
            e,
        )
    })?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    Uuid::parse_str(text.trim()).map_err(|_| {
        Error::corrupt(format!(
            "host id file {} does not hold a UUID",
            path.display()
        ))
    })
}

/// When process `pid` started, in clock ticks after boot (field 22 of
/// /proc/PID/stat): with the boot id, it names one process for good.
fn started(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This kernel's boot id.
fn boot_id() -> Uuid {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|t| Uuid::parse_str(t.trim()).ok())
        .unwrap_or_else(Uuid::nil)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|t| t.trim().to_string())
        .unwrap_or_default()
}

impl Identity {
    pub fn here() -> Result<Identity> {
        Ok(Identity {
            host: host_id()?,
            boot: boot_id(),
            pid: std::process::id(),
            hostname: hostname(),
        })
    }
}

/// How a claim is made.
#[derive(Debug, Clone)]
pub struct ClaimOptions {
    /// Claim with fewer than a majority of the disks (`--force-claim`).
    pub force: bool,
    /// What claims, as shown to others: `serve`, `add-mirror`, ...
    pub command: String,
    pub interval: Duration,
    /// Write the claim at once (`serve`), not before the first write.
    pub eager: bool,
    /// The command only reads (a volume copied out): no majority is asked
    /// unless it writes after all.
    pub reads_only: bool,
    /// Claims of holders watched and found silent: taken over.
    pub silent: Vec<Read<ClaimBlock>>,
}

/// Assembles the group with `assemble` and claims it. When a holder that
/// went silent had to be watched, the disks' cached pages are dropped and
/// the group assembled again (it may have changed until the holder
/// stopped), then claimed over that holder's claim, as ZFS imports a pool
/// after its activity check.
pub fn claim_assembled(
    mut assemble: impl FnMut() -> Result<Group>,
    opts: &ClaimOptions,
) -> Result<Group> {
    let mut g = assemble()?;
    let Some(silent) = g.claim(opts)? else {
        return Ok(g);
    };
    let paths: Vec<PathBuf> = g.members.values().map(|m| m.path.clone()).collect();
    drop(g);
    for p in &paths {
        drop_cached(p);
    }
    let mut g = assemble()?;
    let opts = ClaimOptions {
        silent,
        ..opts.clone()
    };
    match g.claim(&opts)? {
        None => Ok(g),
        Some(_) => Err(Error::refused(format!(
            "group {} was claimed again while it was being taken over; run the command again",
            g.config.name
        ))),
    }
}

/// Drops this host's cached pages of the file or device at `path`, so that
/// the next reads see what the storage holds now.
fn drop_cached(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::File::open(path) {
        // SAFETY: posix_fadvise only drops clean cached pages of the file
        // behind our own descriptor; no memory of ours is touched.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// "mirrorvol serve (pid 42) on host h1 (<uuid>)".
fn describe(c: &ClaimBlock, me: &Identity) -> String {
    let host = if c.host == me.host && c.boot == me.boot {
        "on this host".to_string()
    } else if c.host == me.host {
        format!(
            "on this host in an earlier boot (or on a clone of it named {})",
            c.hostname
        )
    } else {
        format!("on host {} ({})", c.hostname, c.host)
    };
    format!("mirrorvol {} (pid {}) {host}", c.command, c.pid)
}

/// Who holds a group, as its disks' claim blocks say.
#[derive(Debug, Clone)]
pub struct Holding {
    /// "mirrorvol add-mirror (pid N) on this host".
    pub who: String,
    /// Its progress, when it shows one.
    pub doing: Option<Activity>,
    /// Seconds since its newest renewal, when that is late.
    pub late: Option<u64>,
}

/// One disk the claim is written to: its state-block writer, and its
/// queue for the heartbeat's renewals (answered by their completions).
#[derive(Clone)]
struct ClaimDisk {
    state: GenerationDisk,
    queue: Arc<DiskQueue>,
}

impl std::ops::Deref for ClaimDisk {
    type Target = GenerationDisk;
    fn deref(&self) -> &GenerationDisk {
        &self.state
    }
}

struct DiskRenewal {
    d: ClaimDisk,
    last_ok: Instant,
    busy: Arc<AtomicBool>,
}

/// Where a claim stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Checked, not yet written: nothing was written to the disks yet.
    Pending,
    /// Written and renewed by the heartbeat.
    Written,
    /// Could not be written (another holder came first): every I/O fails.
    Failed(String),
}

struct Inner {
    name: String,
    me: Identity,
    interval: Duration,
    /// The claim was taken over from a holder that went silent.
    took_over: bool,
    /// What each disk's claim block held when the claim was checked.
    seen: BTreeMap<Uuid, Read<ClaimBlock>>,
    phase: Mutex<Phase>,
    heartbeat: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Every member's queue: the gate, and what fencing stops.
    queues: Vec<Arc<crate::volume::queue::DiskQueue>>,
    force: bool,
    block: Mutex<ClaimBlock>,
    disks: Mutex<BTreeMap<Uuid, DiskRenewal>>,
    /// Disks the group's config has in service, present or not: the
    /// majority is counted against it.
    total: AtomicU64,
    fence_after: Duration,
    fenced: AtomicBool,
    stop: Mutex<bool>,
    wake: Condvar,
    on_fence: Mutex<Vec<Box<dyn Fn() + Send>>>,
    /// Told when a disk fails a claim write: the group takes it out of
    /// service as after any failed write.
    on_disk_error: Mutex<Option<DiskErrorHook>>,
}

/// What the group does with a disk that failed a claim write.
pub type DiskErrorHook = Box<dyn Fn(Uuid, &io::Error) + Send>;

/// A claim held on a group's disks: checked when made, written to the
/// disks before the first write to any of them (so that a command refused
/// before it writes leaves the disks as they were; `serve` writes it at
/// once), renewed from then on, and released when the group lets go.
pub struct Claim {
    inner: Arc<Inner>,
}

/// The queues' gate: writes the claim before the first write.
struct Gate(std::sync::Weak<Inner>);

impl WriteGate for Gate {
    fn before_first_write(&self) -> io::Result<()> {
        match self.0.upgrade() {
            Some(inner) => inner.materialize(),
            None => Ok(()),
        }
    }
}

impl Inner {
    fn disk_failed(&self, disk: Uuid, e: &io::Error) {
        if let Some(hook) = &*self.on_disk_error.lock().unwrap_or_else(|e| e.into_inner()) {
            hook(disk, e);
        }
    }

    /// Writes the claim to every disk (once; the first write of the group
    /// waits for it), after checking that nobody claimed the group since it
    /// was checked; then starts the heartbeat. On failure every I/O of the
    /// group fails: nothing is written without the claim.
    fn materialize(self: &Arc<Self>) -> io::Result<()> {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        match &*phase {
            Phase::Written => return Ok(()),
            Phase::Failed(e) => {
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, e.clone()));
            }
            Phase::Pending => {}
        }
        // The claim's own writes pass.
        for q in &self.queues {
            q.open_gate();
        }
        let r = self.write_claim();
        match r {
            Ok(()) => {
                *phase = Phase::Written;
                drop(phase);
                let now = Instant::now();
                for r in self
                    .disks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values_mut()
                {
                    r.last_ok = now;
                }
                let (inner, interval) = (self.clone(), self.interval);
                match std::thread::Builder::new()
                    .name("mv-claim".into())
                    .spawn(move || heartbeat(inner, interval))
                {
                    Ok(t) => {
                        *self.heartbeat.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start the claim's heartbeat"),
                }
                Ok(())
            }
            Err(e) => {
                *phase = Phase::Failed(e.clone());
                for q in &self.queues {
                    q.fence();
                }
                Err(io::Error::new(io::ErrorKind::PermissionDenied, e))
            }
        }
    }

    fn disks(&self) -> BTreeMap<Uuid, ClaimDisk> {
        self.disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(u, r)| (*u, r.d.clone()))
            .collect()
    }

    fn write_claim(&self) -> std::result::Result<(), String> {
        let disks = self.disks();
        let name = &self.name;
        let mut readable = Vec::new();
        for (u, d) in &disks {
            let now = match ondisk::read_claim(&*d.disk, &d.layout) {
                Ok(r) => r,
                Err(_) => continue,
            };
            readable.push(d.path.as_str());
            if let Read::Good(c) = &now
                && c.held
                && !matches!(look(&now, &self.me), Seen::Free)
                && self.seen.get(u) != Some(&now)
            {
                return Err(format!(
                    "group {name} was claimed by {} meanwhile (disk {})",
                    describe(c, &self.me),
                    d.path
                ));
            }
        }
        let total = self.total.load(Ordering::SeqCst);
        if (readable.len() as u64) * 2 <= total && !self.force {
            return Err(no_majority(name, &readable, total));
        }
        let block = self.block.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let wrote = write_everywhere(&disks, &block);
        let ok = wrote.iter().filter(|(_, r)| r.is_ok()).count();
        if ok == 0 {
            let why: Vec<String> = wrote
                .iter()
                .filter_map(|(u, r)| r.as_ref().err().map(|e| format!("{}: {e}", disks[u].path)))
                .collect();
            return Err(format!(
                "group {name} could not be claimed on any of its disks ({})",
                why.join("; ")
            ));
        }
        // A disk that takes no write is a failed disk, whatever wrote to it.
        for (u, r) in &wrote {
            if let Err(e) = r {
                self.disk_failed(*u, e);
            }
        }
        // Taken over from a holder that went silent: another claimer may
        // have done the same at the same moment; the last writer wins, and
        // the other sees it here and backs off.
        if self.took_over {
            std::thread::sleep(2 * self.interval);
            for (u, d) in &disks {
                if let Ok(Read::Good(c)) = ondisk::read_claim(&*d.disk, &d.layout)
                    && c.held
                    && (c.host != self.me.host || c.boot != self.me.boot || c.pid != self.me.pid)
                {
                    return Err(format!(
                        "group {name} was taken over by {} at the same time (disk {})",
                        describe(&c, &self.me),
                        disks[u].path
                    ));
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("fenced", &self.is_fenced())
            .finish()
    }
}

/// What one disk's claim block says to a claimer.
enum Seen {
    Free,
    Local(ClaimBlock),
    Foreign(ClaimBlock),
    Unknown(&'static str),
}

fn look(read: &Read<ClaimBlock>, me: &Identity) -> Seen {
    match read {
        Read::Empty => Seen::Free,
        Read::Damaged(why) => Seen::Unknown(why),
        Read::Good(c) if !c.held => Seen::Free,
        Read::Good(c) if c.host == me.host && c.boot == me.boot => {
            if c.pid == me.pid || !holder::alive(c.pid) || started(c.pid) != Some(c.started) {
                Seen::Free
            } else {
                Seen::Local(c.clone())
            }
        }
        Read::Good(c) => Seen::Foreign(c.clone()),
    }
}

impl Group {
    /// Disks that count for a majority: those the config has in service.
    fn claim_total(&self) -> u64 {
        self.config
            .disks
            .iter()
            .filter(|d| d.state == DiskState::Online)
            .count() as u64
    }

    fn claim_disks(&self) -> BTreeMap<Uuid, ClaimDisk> {
        self.members_in_service()
            .map(|(u, m)| {
                let (state, queue) = (m.state_disk(), m.disk.queue().clone());
                (u, ClaimDisk { state, queue })
            })
            .collect()
    }

    /// Who holds the group's claim when this process does: said without
    /// asking the disks (the status of a group in service must never wait
    /// on a disk that hangs).
    pub fn held_by(&self) -> Option<String> {
        let c = self.claim.as_ref()?;
        let block = c
            .inner
            .block
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        c.is_written().then(|| describe(&block, &c.inner.me))
    }

    /// Who holds the group's claim, as its disks say (offline `status`):
    /// the holder named on the disks in service, unless it is gone, with
    /// the progress its newest renewal shows and how many seconds ago that
    /// renewal was written when it is later than three intervals (a holder
    /// on another host, or of an earlier boot, that stopped: its progress
    /// is not moving; the clocks of two hosts are compared for this only).
    pub fn held_by_on_disks(&self) -> Option<Holding> {
        if self.claim.is_some() {
            return self.held_by().map(|who| Holding {
                who,
                doing: None,
                late: None,
            });
        }
        let me = Identity::here().ok()?;
        let mut newest: Option<ClaimBlock> = None;
        for d in self.claim_disks().values() {
            if let Ok(read) = ondisk::read_claim(&*d.disk, &d.layout)
                && !matches!(look(&read, &me), Seen::Free)
                && let Read::Good(c) = read
                && newest.as_ref().is_none_or(|n| c.seq > n.seq)
            {
                newest = Some(c);
            }
        }
        newest.map(|c| {
            let age = now_secs().saturating_sub(c.written_at);
            let late = age > 3 * u64::from(c.interval_ms).div_ceil(1000).max(1);
            Holding {
                who: describe(&c, &me),
                doing: c.activity.clone(),
                late: late.then_some(age),
            }
        })
    }

    /// Claims the group for writing (see the module's top), or refuses.
    /// After watching a holder that went silent it claims nothing and
    /// returns the claims it saw: the holder may have written until it
    /// stopped, so the caller assembles again from what the disks hold now
    /// and claims with those as `silent` ([`claim_assembled`]).
    pub fn claim(&mut self, opts: &ClaimOptions) -> Result<Option<Vec<Read<ClaimBlock>>>> {
        if self.claim.is_some() {
            return Ok(None);
        }
        let me = Identity::here()?;
        let disks = self.claim_disks();
        let total = self.claim_total();
        let name = self.config.name.clone();
        if (disks.len() as u64) * 2 <= total && !opts.force && !opts.reads_only {
            let here: Vec<&str> = disks.values().map(|d| d.path.as_str()).collect();
            return Err(Error::refused(no_majority(&name, &here, total)));
        }
        let read_all = |disks: &BTreeMap<Uuid, ClaimDisk>| -> BTreeMap<Uuid, Read<ClaimBlock>> {
            disks
                .iter()
                .map(|(u, d)| {
                    let r = ondisk::read_claim(&*d.disk, &d.layout)
                        .unwrap_or(Read::Damaged("the claim block cannot be read"));
                    (*u, r)
                })
                .collect()
        };
        let first = read_all(&disks);
        let mut wait = Duration::ZERO;
        let mut waited_for = Vec::new();
        let mut silent = false;
        for (u, r) in &first {
            let path = &disks[u].path;
            if !matches!(look(r, &me), Seen::Free) && opts.silent.contains(r) {
                silent = true;
                continue;
            }
            match look(r, &me) {
                Seen::Free => {}
                Seen::Local(c) => {
                    return Err(Error::refused(format!(
                        "group {name} is in use by {} (claimed on disk {path})",
                        describe(&c, &me)
                    )));
                }
                Seen::Foreign(c) => {
                    let interval = Duration::from_millis(u64::from(c.interval_ms.max(100)));
                    wait = wait.max(Duration::from_millis(c.fence_ms) + 2 * interval);
                    waited_for.push(describe(&c, &me));
                }
                Seen::Unknown(why) => {
                    wait =
                        wait.max(fence_time(self.open.timeout, opts.interval) + 2 * opts.interval);
                    waited_for.push(format!("an unreadable claim on disk {path} ({why})"));
                }
            }
        }
        let wait = wait.min(MAX_WAIT);
        if !waited_for.is_empty() {
            waited_for.dedup();
            eprintln!(
                "group {name} was claimed by {} and not released; watching its claim for {} to see whether it is alive",
                waited_for.join(", "),
                super::show_duration(Duration::from_secs(wait.as_secs().max(1)))
            );
            let start = Instant::now();
            loop {
                let step = opts.interval.min(wait.saturating_sub(start.elapsed()));
                std::thread::sleep(step);
                let now = read_all(&disks);
                for (u, r) in &now {
                    if let (Read::Good(c), Some(Read::Good(before))) = (r, first.get(u))
                        && c.held
                        && (c.seq != before.seq || c.host != before.host || c.pid != before.pid)
                    {
                        return Err(Error::refused(format!(
                            "group {name} is in use by {}: its claim on disk {} is being renewed",
                            describe(c, &me),
                            disks[u].path
                        )));
                    }
                }
                // Released meanwhile: free now.
                if now.values().all(|r| matches!(look(r, &me), Seen::Free)) {
                    break;
                }
                if start.elapsed() >= wait {
                    break;
                }
            }
            tracing::warn!("group {name}: the claim was not renewed; taking it over");
            return Ok(Some(first.into_values().collect()));
        }
        let fence_after = fence_time(self.open.timeout, opts.interval);
        let now = now_secs();
        let block = ClaimBlock {
            held: true,
            interval_ms: opts.interval.as_millis().min(u32::MAX as u128) as u32,
            host: me.host,
            boot: me.boot,
            pid: me.pid,
            seq: 1,
            fence_ms: fence_after.as_millis() as u64,
            claimed_at: now,
            written_at: now,
            hostname: me.hostname.clone(),
            command: opts.command.clone(),
            started: started(me.pid).unwrap_or(0),
            activity: None,
        };
        let started = Instant::now();
        let inner = Arc::new(Inner {
            name,
            me,
            interval: opts.interval,
            took_over: silent,
            seen: first,
            phase: Mutex::new(Phase::Pending),
            heartbeat: Mutex::new(None),
            block: Mutex::new(block),
            disks: Mutex::new(
                disks
                    .into_iter()
                    .map(|(u, d)| {
                        (
                            u,
                            DiskRenewal {
                                d,
                                last_ok: started,
                                busy: Arc::new(AtomicBool::new(false)),
                            },
                        )
                    })
                    .collect(),
            ),
            queues: self
                .members
                .values()
                .map(|m| m.disk.queue().clone())
                .collect(),
            total: AtomicU64::new(total),
            force: opts.force,
            fence_after,
            fenced: AtomicBool::new(false),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            on_fence: Mutex::new(Vec::new()),
            on_disk_error: Mutex::new(None),
        });
        if opts.eager {
            inner
                .materialize()
                .map_err(|e| Error::failed(e.to_string()))?;
        } else {
            let gate: Arc<dyn WriteGate> = Arc::new(Gate(Arc::downgrade(&inner)));
            for q in &inner.queues {
                q.set_gate(gate.clone());
            }
        }
        self.claim = Some(Claim { inner });
        Ok(None)
    }

    /// Tells the claim which disks are in service (after every commit).
    pub(super) fn sync_claim_disks(&self) {
        let Some(claim) = &self.claim else { return };
        let disks = self.claim_disks();
        claim
            .inner
            .total
            .store(self.claim_total(), Ordering::SeqCst);
        let mut held = claim.inner.disks.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|u, _| disks.contains_key(u));
        for (u, d) in disks {
            held.entry(u).or_insert_with(|| DiskRenewal {
                d,
                last_ok: Instant::now(),
                busy: Arc::new(AtomicBool::new(false)),
            });
        }
    }
}

/// Why a claimer that sees only `here` of the group's `total` disks in
/// service does not claim it.
fn no_majority(name: &str, here: &[&str], total: u64) -> String {
    format!(
        "group {name}: only {} of its {total} disks in service {} here{}; a host that sees no majority of them could be one side of a partition, so it does not claim the group: if the others are gone for good, run again with --force-claim",
        here.len(),
        if here.len() == 1 { "is" } else { "are" },
        if here.is_empty() {
            String::new()
        } else {
            format!(" ({})", here.join(", "))
        }
    )
}

/// How long a holder goes on without renewing on a majority before it
/// fences itself: a disk that hangs must first be taken out of service
/// (after the I/O deadline), then five intervals more.
pub fn fence_time(io_timeout: Duration, interval: Duration) -> Duration {
    io_timeout + 5 * interval
}

fn write_everywhere(
    disks: &BTreeMap<Uuid, ClaimDisk>,
    block: &ClaimBlock,
) -> Vec<(Uuid, io::Result<()>)> {
    std::thread::scope(|s| {
        let writers: Vec<_> = disks
            .iter()
            .map(|(u, d)| {
                (
                    *u,
                    s.spawn(move || {
                        d.raise.ensure()?;
                        ondisk::write_claim(&*d.disk, &d.layout, block)
                    }),
                )
            })
            .collect();
        writers
            .into_iter()
            .map(|(u, w)| {
                (
                    u,
                    w.join()
                        .unwrap_or_else(|_| Err(io::Error::other("a claim writer panicked"))),
                )
            })
            .collect()
    })
}

/// What this process shows other processes of its progress: a command's
/// progress bar reports here, and each renewal of the claim carries it, so
/// that `status` from another shell, which cannot take the disks, shows it
/// (as `/proc/mdstat` shows a resync whoever runs it).
pub mod activity {
    use std::sync::Mutex;

    use crate::format::state::Activity;
    use crate::volume::meter::Meter;

    /// What is shown, and how far it is (its rate measured from the first
    /// position reported: a resync resumed from a checkpoint starts past
    /// zero).
    static SHOWN: Mutex<Option<(String, Meter)>> = Mutex::new(None);

    fn shown() -> std::sync::MutexGuard<'static, Option<(String, Meter)>> {
        SHOWN.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A task of `total` bytes begins.
    pub fn begin(what: &str, total: u64) {
        *shown() = Some((what.to_string(), Meter::new(total)));
    }

    /// `done` bytes of it are done.
    pub fn advance(done: u64) {
        if let Some((_, m)) = shown().as_ref() {
            m.set(done);
        }
    }

    /// It ended.
    pub fn end() {
        *shown() = None;
    }

    /// What the next renewal writes.
    pub fn current() -> Option<Activity> {
        let s = shown();
        let (what, m) = s.as_ref().filter(|(_, m)| m.total() > 0)?;
        Some(Activity {
            what: what.clone(),
            done: m.done(),
            total: m.total(),
            rate: m.rate(),
        })
    }
}

/// The holder's heartbeat: renews the claim on every disk each interval
/// (a disk still busy with the previous renewal is skipped), and fences
/// the group when no majority renewed within the fence time.
fn heartbeat(inner: Arc<Inner>, interval: Duration) {
    loop {
        {
            let stop = inner.stop.lock().unwrap_or_else(|e| e.into_inner());
            let (stop, _) = inner
                .wake
                .wait_timeout(stop, interval)
                .unwrap_or_else(|e| e.into_inner());
            if *stop {
                return;
            }
        }
        let block = {
            let mut b = inner.block.lock().unwrap_or_else(|e| e.into_inner());
            b.seq += 1;
            b.written_at = now_secs();
            b.activity = activity::current();
            b.clone()
        };
        let now = Instant::now();
        // Each renewal goes to its disk's queue and is answered by its
        // completion: a disk that hangs holds one renewal, and no thread.
        let (due, fresh, count) = {
            let disks = inner.disks.lock().unwrap_or_else(|e| e.into_inner());
            let due: Vec<(Uuid, ClaimDisk, Arc<AtomicBool>)> = disks
                .iter()
                .filter(|(_, r)| !r.busy.swap(true, Ordering::SeqCst))
                .map(|(u, r)| (*u, r.d.clone(), r.busy.clone()))
                .collect();
            let fresh = disks
                .values()
                .filter(|r| now.duration_since(r.last_ok) < inner.fence_after)
                .count() as u64;
            (due, fresh, disks.len())
        };
        for (u, d, busy) in due {
            let inner = inner.clone();
            let at = d.layout.member_offset + crate::format::state::CLAIM_OFFSET;
            let path = d.path.clone();
            d.queue.submit_meta(
                crate::volume::queue::Op::WriteMany {
                    writes: vec![(at, crate::disk::AlignedBuf::from_slice(&block.encode()))],
                    flush: true,
                },
                true,
                Box::new(move |outcome| {
                    match outcome {
                        Err(e) => {
                            tracing::warn!(disk = %path, error = %e, "cannot renew the claim");
                            inner.disk_failed(u, &e);
                        }
                        Ok(_) => {
                            if let Some(entry) = inner
                                .disks
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_mut(&u)
                            {
                                entry.last_ok = Instant::now();
                            }
                        }
                    }
                    busy.store(false, Ordering::SeqCst);
                }),
            );
        }
        let total = inner.total.load(Ordering::SeqCst).max(count as u64);
        if fresh * 2 <= total {
            tracing::error!(
                renewed = fresh,
                disks = total,
                "the group's claim could not be renewed on a majority of its disks for {:?}: fencing, every I/O fails from now on",
                inner.fence_after
            );
            eprintln!(
                "error: the group's claim could not be renewed on a majority of its disks ({fresh} of {total}) for {}; stopping all I/O so that another host may take the group over",
                super::show_duration(inner.fence_after)
            );
            inner.fenced.store(true, Ordering::SeqCst);
            for f in inner
                .on_fence
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                f();
            }
            return;
        }
    }
}

impl Claim {
    /// True once the holder fenced itself.
    pub fn is_fenced(&self) -> bool {
        self.inner.fenced.load(Ordering::SeqCst)
    }

    /// True once the claim is on the disks.
    pub fn is_written(&self) -> bool {
        *self.inner.phase.lock().unwrap_or_else(|e| e.into_inner()) == Phase::Written
    }

    /// Runs `f` with a disk that failed a claim write.
    pub fn on_disk_error(&self, f: DiskErrorHook) {
        *self
            .inner
            .on_disk_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Runs `f` when the claim fences itself (after the disks stopped).
    pub fn on_fence(&self, f: Box<dyn Fn() + Send>) {
        self.inner
            .on_fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(f);
    }

    /// Stops renewing and writes the claim released on every disk, so that
    /// the next claimer need not wait. A claim never written, or fenced, is
    /// left as it is.
    pub fn release(self) {
        self.stop_heartbeat();
        if self.is_fenced() || !self.is_written() {
            return;
        }
        let mut block = self
            .inner
            .block
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        block.held = false;
        block.activity = None;
        block.seq += 1;
        block.written_at = now_secs();
        let disks = self.inner.disks();
        for (u, r) in write_everywhere(&disks, &block) {
            if let Err(e) = r {
                tracing::warn!(disk = %disks[&u].path, error = %e, "cannot release the claim");
            }
        }
    }

    fn stop_heartbeat(&self) {
        *self.inner.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.inner.wake.notify_all();
        let t = self
            .inner
            .heartbeat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_cannot_be_written_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        assert!(can_write(&dir.path().join("state/mirrorvol")));
        assert!(!can_write(std::path::Path::new("/proc/mirrorvol")));
    }

    #[test]
    fn a_process_start_time_is_read_and_names_this_process() {
        let me = started(std::process::id()).expect("our own start time");
        assert!(me > 0);
        assert_eq!(started(std::process::id()), Some(me));
        assert_eq!(started(u32::MAX), None);
    }

    #[test]
    fn claims_are_judged_by_host_boot_pid_and_start() {
        let me = Identity {
            host: Uuid::from_u128(1),
            boot: boot_id(),
            pid: std::process::id(),
            hostname: "h".into(),
        };
        let mut c = ClaimBlock {
            held: true,
            interval_ms: 1000,
            host: me.host,
            boot: me.boot,
            pid: 1,
            seq: 5,
            fence_ms: 7000,
            claimed_at: 0,
            written_at: 0,
            hostname: "h".into(),
            command: "serve".into(),
            started: started(1).unwrap_or(0),
            activity: None,
        };
        // pid 1 of this boot lives: refused by name.
        assert!(matches!(look(&Read::Good(c.clone()), &me), Seen::Local(_)));
        // The same pid with another start time is another process: the
        // holder is gone.
        c.started += 1;
        assert!(matches!(look(&Read::Good(c.clone()), &me), Seen::Free));
        // Another boot of this host may be a clone running now: watched.
        c.boot = Uuid::from_u128(9);
        assert!(matches!(
            look(&Read::Good(c.clone()), &me),
            Seen::Foreign(_)
        ));
        c.held = false;
        assert!(matches!(look(&Read::Good(c), &me), Seen::Free));
        assert!(matches!(look(&Read::Empty, &me), Seen::Free));
        assert!(matches!(look(&Read::Damaged("x"), &me), Seen::Unknown(_)));
    }
}
