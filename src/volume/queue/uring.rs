//! The io_uring backend of a disk queue.
//!
//! A disk that is a plain file or block device ([`crate::disk::FileDisk`]
//! with nothing wrapped around it) can have its data requests run by
//! io_uring instead of the queue's worker threads. Each disk has one ring
//! and one thread that alone submits to it and reaps it (io_uring's
//! single-issuer mode, with deferred task work where the kernel has it):
//! a submitting thread hands the request over and writes the ring's
//! eventfd, of which the ring's thread keeps a read in the ring, so one
//! wait covers both new requests and completions. Callbacks run on the
//! ring's thread. An NBD reader holds a [`Plug`] so the requests that
//! arrived together cost one wake per ring.
//!
//! A thread may also have a ring of its own ([`run_here`]): an NBD
//! connection's thread submits its clients' disk requests there and waits
//! for its socket in the same ring (a poll), answering the completions
//! itself, as qemu's event loop does. A request then wakes no other
//! thread: measured with four NBD clients at QD 8, 1.2-1.35x the IOPS of
//! the hand-off to each disk's ring thread, and QD 1 write latency from
//! 128 to 80 us (p50). Such a request keeps its disk open until it
//! completes; what the thread submits while it answers completions, or
//! outside `run_here`, goes to the disk's ring as before, so no callback
//! waits on a ring that only its own thread turns. A thread that waits
//! ([`super::received`], the NBD server's in-flight limits) turns its ring
//! meanwhile.
//!
//! What goes to the ring: reads, writes (a FUA write as one `RWF_DSYNC`
//! write) and flushes (`fdatasync`). What the ring cannot run as it is goes
//! to the queue's threads as before: write-zeroes and discards (hole
//! punching, `BLKZEROOUT`), health checks, reads of what the storage holds
//! now, transfers that `O_DIRECT` would refuse without a bounce buffer,
//! and every write of a disk whose `O_DIRECT` granularity is larger than a
//! sector (those may need [`crate::disk::FileDisk`]'s read-modify-write,
//! which must not race a write of the same block in the ring). Metadata
//! keeps its own lane and thread (see the queue's `meta_tx`).
//!
//! A write through the page cache that comes alone (see
//! [`Ring::alone_through_page_cache`]) is written by the ring's thread
//! itself, without the kernel worker io_uring would hand it to.
//!
//! No `IOSQE_IO_DRAIN`: the engine submits a flush only once the writes it
//! covers have completed, so an `fdatasync` issued then covers them. Short
//! reads and writes are resubmitted for the rest. At most [`DEPTH`]
//! requests are in the ring at once; more wait in a backlog that the
//! ring's thread feeds from as requests complete, so the completion queue
//! never overflows. No SQPOLL: an idle disk costs no CPU (its thread sleeps
//! in `io_uring_enter`).
//!
//! The ring reads into and writes from the request's own buffers, which
//! are not registered with the kernel: the engine allocates a buffer per
//! request (the NBD reader reads a write's payload straight into it), so
//! fixed buffers would cost a copy into the ring's pool per request. Not
//! measured yet; the README says so.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use io_uring::{IoUring, opcode, squeue, types};

use super::{DiskQueue, DiskStats, Job, Op, OpKind, Outcome, Ticket};
use crate::disk::file::RingTarget;
use crate::disk::{AlignedBuf, Disk};

/// Requests in one disk's ring at once; more wait in its backlog.
pub const DEPTH: u32 = 128;

/// How a disk queue runs its data requests (`--io-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IoEngine {
    /// Worker threads doing `pread`/`pwrite`/`fdatasync`.
    Threads,
    /// io_uring: a ring per disk with one thread that submits and reaps,
    /// and a ring per NBD connection; worker threads where io_uring is
    /// refused.
    #[default]
    Uring,
}

impl IoEngine {
    /// The engine `MIRRORVOL_IO_ENGINE` names (`threads` or `uring`), else
    /// the default: what a group opened by the library, not the command
    /// line, runs on (the test suite runs under both this way).
    pub fn from_env() -> IoEngine {
        match std::env::var("MIRRORVOL_IO_ENGINE").as_deref() {
            Ok("threads") => IoEngine::Threads,
            Ok("uring") => IoEngine::Uring,
            _ => IoEngine::default(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            IoEngine::Threads => "threads",
            IoEngine::Uring => "uring",
        }
    }
}

thread_local! {
    /// While this thread holds a [`Plug`]: the rings it pushed requests to
    /// and has not told the kernel about yet.
    static PLUGGED: std::cell::RefCell<Option<Vec<Arc<Ring>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Holds back this thread's io_uring submissions, so that the requests it
/// submits in a burst (an NBD reader's requests that arrived together) go
/// to each ring's kernel side in one system call, as the block layer's
/// plugging does: [`Plug::flush`] (or the drop) tells the kernel. A
/// plugged thread must flush before it blocks on anything a completion
/// may be needed for.
pub struct Plug {
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl Plug {
    pub fn new() -> Plug {
        PLUGGED.with(|p| {
            p.borrow_mut().get_or_insert_with(Vec::new);
        });
        Plug {
            _this_thread: std::marker::PhantomData,
        }
    }

    /// Tells the disks' rings about everything held back so far (what went
    /// to the thread's own ring waits for its next turn).
    pub fn flush(&self) {
        kick_plugged();
    }
}

impl Default for Plug {
    fn default() -> Plug {
        Plug::new()
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        kick_plugged();
        PLUGGED.with(|p| *p.borrow_mut() = None);
    }
}

/// Flushes the calling thread's [`Plug`], if it holds one, and submits
/// what waits in its own ring: for code about to wait on a completion.
pub fn unplug_now() {
    kick_plugged();
    submit_here();
}

fn kick_plugged() {
    // `try_with`: also called while the thread's locals are torn down (a
    // request left in its own ring is answered then).
    let rings = PLUGGED
        .try_with(|p| p.borrow_mut().as_mut().map(std::mem::take))
        .ok()
        .flatten();
    for ring in rings.unwrap_or_default() {
        ring.kick();
    }
}

/// Whether this process may use io_uring. Asked once: where the kernel
/// refuses it (ENOSYS on an old or stripped kernel, EPERM under seccomp or
/// `kernel.io_uring_disabled`), the log says so once and every disk uses
/// worker threads.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| match IoUring::new(2) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "io_uring is refused here; disks use worker threads instead"
            );
            false
        }
    })
}

/// The transfer a ring request does, with its progress for resubmitting a
/// short one.
enum Io {
    Read {
        buf: Option<AlignedBuf>,
        offset: u64,
        len: usize,
        done: usize,
    },
    Write {
        data: Arc<AlignedBuf>,
        offset: u64,
        done: usize,
        dsync: bool,
    },
    Flush,
}

/// A request in the ring (or its backlog): the queue's bookkeeping and the
/// buffer the kernel reads or writes, kept here until its completion.
struct Slot {
    id: u64,
    submitted: Instant,
    ticket: Arc<Ticket>,
    kind: OpKind,
    bytes: u64,
    io: Io,
    /// Set when the request runs in a connection's own ring
    /// ([`run_here`]): the disk's ring (which counts and answers it) and
    /// the disk, which keeps the descriptor open until the completion.
    owner: Option<(Arc<Ring>, Arc<dyn Disk>)>,
    fd: types::Fd,
}

enum Progress {
    More,
    Done(Outcome),
}

impl Slot {
    /// The submission entry for what is left of the transfer.
    fn entry(&mut self, index: u64) -> squeue::Entry {
        let fd = self.fd;
        let entry = match &mut self.io {
            Io::Read {
                buf,
                offset,
                len,
                done,
            } => {
                let buf = buf.as_mut().expect("a read in flight has its buffer");
                let rest = &mut buf.as_mut_slice()[*done..*len];
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                    .offset(*offset + *done as u64)
                    .build()
            }
            Io::Write {
                data,
                offset,
                done,
                dsync,
            } => {
                let rest = &data[*done..];
                opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(*offset + *done as u64)
                    .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Io::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(index)
    }

    /// Takes a completion's result: done, or more to transfer.
    fn progress(&mut self, res: i32, disk: Option<&Arc<dyn Disk>>) -> Progress {
        if res < 0 {
            return Progress::Done(Err(io::Error::from_raw_os_error(-res)));
        }
        let n = res as usize;
        match &mut self.io {
            Io::Flush => Progress::Done(Ok(None)),
            Io::Read { buf, len, done, .. } => {
                if n == 0 {
                    // The end of a file inside the disk: it was truncated
                    // under us (what `FileDisk::read_at` says too).
                    let eof = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "a read met the end of the file inside the disk",
                    );
                    let disk = self.owner.as_ref().map(|(_, d)| d).or(disk);
                    let gone = disk.and_then(|d| d.health().err());
                    return Progress::Done(Err(gone.unwrap_or(eof)));
                }
                *done += n;
                if *done < *len {
                    Progress::More
                } else {
                    Progress::Done(Ok(buf.take()))
                }
            }
            Io::Write { data, done, .. } => {
                if n == 0 {
                    return Progress::Done(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "a write made no progress",
                    )));
                }
                *done += n;
                if *done < data.len() {
                    Progress::More
                } else {
                    Progress::Done(Ok(None))
                }
            }
        }
    }
}

/// The requests of one io_uring: those in it, by slot index (their
/// completion's `user_data`), and those waiting for room.
struct Flight {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    backlog: VecDeque<Slot>,
}

impl Flight {
    fn new() -> Flight {
        Flight {
            slots: (0..DEPTH).map(|_| None).collect(),
            free: (0..DEPTH as usize).rev().collect(),
            backlog: VecDeque::new(),
        }
    }

    fn idle(&self) -> bool {
        self.free.len() == DEPTH as usize && self.backlog.is_empty()
    }

    /// Moves waiting requests into the submission queue while both have
    /// room.
    fn fill(&mut self, sq: &mut squeue::SubmissionQueue<'_>) {
        while let Some(index) = self.free.last().copied() {
            let Some(mut slot) = self.backlog.pop_front() else {
                break;
            };
            let entry = slot.entry(index as u64);
            // SAFETY: the entry's buffer is owned by its slot, kept in
            // `slots` until the completion is reaped (or forgotten with it,
            // see `abandon`).
            if unsafe { sq.push(&entry) }.is_err() {
                self.backlog.push_front(slot);
                break;
            }
            self.free.pop();
            self.slots[index] = Some(slot);
        }
    }

    /// Takes the completion of slot `index`: the request and its outcome
    /// when it is done; None when the rest of a short transfer went back
    /// first in line (or `index` names no request).
    fn reap(
        &mut self,
        index: u64,
        res: i32,
        disk: Option<&Arc<dyn Disk>>,
    ) -> Option<(Slot, Outcome)> {
        let mut slot = self.slots.get_mut(index as usize).and_then(Option::take)?;
        self.free.push(index as usize);
        match slot.progress(res, disk) {
            Progress::More => {
                self.backlog.push_front(slot);
                None
            }
            Progress::Done(outcome) => Some((slot, outcome)),
        }
    }

    /// Leaves the requests still in the ring, and their buffers, to the
    /// kernel for good: a hung disk may complete them after their ring is
    /// gone, and must not write into freed memory.
    fn abandon(&mut self) {
        for slot in self.slots.drain(..).flatten() {
            std::mem::forget(slot);
        }
    }
}

/// What submitters hand the ring's thread.
struct State {
    /// Requests taken and not yet seen by the ring's thread.
    incoming: Vec<Slot>,
    /// The eventfd was written since the ring's thread last read it: no
    /// need to write it again.
    signalled: bool,
    stopping: bool,
}

/// One disk's ring and the thread that alone submits to it and reaps it.
pub(super) struct Ring {
    name: String,
    target: RingTarget,
    /// Written to wake the ring's thread, which keeps a read of it in the
    /// ring.
    wake: std::os::fd::OwnedFd,
    /// Keeps the descriptor open while the ring may use it; the ring's
    /// thread lets it go when it exits, after the last completion.
    disk: Mutex<Option<Arc<dyn Disk>>>,
    state: Mutex<State>,
    queue: Weak<DiskQueue>,
    stats: Arc<DiskStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set when the ring stops: no connection's own ring takes this disk's
    /// requests any more.
    closed: std::sync::atomic::AtomicBool,
    /// Writes the ring's thread wrote itself
    /// ([`Ring::alone_through_page_cache`]).
    written_here: std::sync::atomic::AtomicU64,
}

/// Writes through the page cache that found their disk's ring empty, one
/// after another, before the next such is written by the ring's thread
/// itself ([`Ring::alone_through_page_cache`]).
const ALONE_STREAK: u32 = 2;

/// The `user_data` of the eventfd read that wakes the ring's thread.
const WAKE: u64 = u64::MAX - 1;

impl Ring {
    /// A ring for `disk` when it is a plain file or device, with its thread
    /// running; None when it is not (a wrapped disk keeps the workers), an
    /// error when the kernel refuses a ring.
    pub(super) fn start(
        name: &str,
        disk: &Arc<dyn Disk>,
        queue: Weak<DiskQueue>,
        stats: Arc<DiskStats>,
    ) -> io::Result<Option<Arc<Ring>>> {
        let Some(target) = disk.as_file_disk().map(|f| f.ring_target()) else {
            return Ok(None);
        };
        // SAFETY: eventfd takes integers and returns a new descriptor or -1.
        // Blocking: io_uring then waits on a read of it (on an O_NONBLOCK
        // descriptor some kernels answer such a read with EAGAIN at once).
        // A write to it blocks only at a counter near 2^64.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let wake = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let ring = Arc::new(Ring {
            name: name.to_string(),
            target,
            wake,
            disk: Mutex::new(Some(disk.clone())),
            state: Mutex::new(State {
                incoming: Vec::new(),
                signalled: false,
                stopping: false,
            }),
            queue,
            stats,
            thread: Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
            written_here: std::sync::atomic::AtomicU64::new(0),
        });
        // The ring is made on its thread: with SINGLE_ISSUER, the task
        // that makes it is the only one that may submit.
        let (made, built) = std::sync::mpsc::sync_channel(1);
        let me = ring.clone();
        let handle = std::thread::Builder::new()
            .name("mv-uring".into())
            .spawn(move || match single_issuer_ring(DEPTH) {
                Ok(uring) => {
                    let _ = made.send(Ok(()));
                    me.run(uring);
                }
                Err(e) => {
                    let _ = made.send(Err(e));
                    me.disk.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
            })?;
        let outcome = built
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the ring's thread ended at its start")));
        if let Err(e) = outcome {
            let _ = handle.join();
            return Err(e);
        }
        *ring.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(Some(ring))
    }

    /// Takes `job` for the ring, or gives it back when the ring does not
    /// run that request (see the module's comment).
    pub(super) fn take(self: &Arc<Self>, job: Job) -> Result<(), Job> {
        let t = &self.target;
        // Writes of a disk whose O_DIRECT granularity is above a sector may
        // take FileDisk's read-modify-write path: all of them stay there.
        let writes = t.writable && t.direct_align.is_none_or(|a| a <= 512);
        let fits = |len: usize| u32::try_from(len).is_ok();
        let (kind, bytes) = (job.op.kind(), job.op.bytes());
        // A read is a read into a buffer of its own length (recycled: the
        // read overwrites all of it, or fails).
        let op = match job.op {
            Op::Read { offset, len } => Op::ReadInto {
                offset,
                len,
                buf: AlignedBuf::recycled(len),
            },
            op => op,
        };
        let io = match op {
            Op::ReadInto {
                offset,
                len,
                mut buf,
            } if fits(len) && len <= buf.capacity() => {
                buf.set_len(len);
                if !t.takes(buf.as_ptr(), len, offset) {
                    return Err(Job {
                        op: Op::ReadInto { offset, len, buf },
                        ..job
                    });
                }
                Io::Read {
                    buf: Some(buf),
                    offset,
                    len,
                    done: 0,
                }
            }
            Op::Write {
                offset,
                ref data,
                fua,
            } if writes && fits(data.len()) && t.takes(data.as_ptr(), data.len(), offset) => {
                Io::Write {
                    data: data.clone(),
                    offset,
                    done: 0,
                    dsync: fua,
                }
            }
            Op::Flush => Io::Flush,
            op => return Err(Job { op, ..job }),
        };
        let slot = Slot {
            id: job.id,
            submitted: job.submitted,
            ticket: job.ticket,
            kind,
            bytes,
            io,
            owner: None,
            fd: types::Fd(t.fd),
        };
        let Some(slot) = route_here(self, slot) else {
            return Ok(());
        };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.stopping {
            drop(st);
            let stopped = io::Error::other(format!("the queue of disk {} is stopped", self.name));
            self.finish(slot, Err(stopped));
            return Ok(());
        }
        st.incoming.push(slot);
        let wake = !st.signalled;
        st.signalled = true;
        drop(st);
        if wake && !self.held_back() {
            self.kick();
        }
        Ok(())
    }

    /// True when the calling thread is plugged: the wake waits for its
    /// flush.
    fn held_back(self: &Arc<Self>) -> bool {
        PLUGGED
            .try_with(|p| match p.borrow_mut().as_mut() {
                Some(rings) => {
                    if !rings.iter().any(|r| Arc::ptr_eq(r, self)) {
                        rings.push(self.clone());
                    }
                    true
                }
                None => false,
            })
            .unwrap_or(false)
    }

    /// Wakes the ring's thread.
    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one`, alive for the call, to the
        // ring's own eventfd.
        let n = unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&self.wake),
                (&one as *const u64).cast(),
                8,
            )
        };
        if n != 8 {
            // Only when the counter is about to overflow, which a pending
            // wake makes moot.
            tracing::debug!(disk = %self.name, "the ring's eventfd took no wake");
        }
    }

    /// The ring's thread: takes what submitters handed over, submits it,
    /// waits for completions, resubmits short transfers, and runs the
    /// callbacks. It alone touches the ring.
    fn run(self: Arc<Ring>, mut uring: IoUring) {
        let wake_fd = types::Fd(std::os::fd::AsRawFd::as_raw_fd(&self.wake));
        let mut flight = Flight::new();
        let mut wake_buf: Box<u64> = Box::new(0);
        let mut wake_armed = false;
        let mut stopping = false;
        let mut alone = 0u32;
        let mut wrote_here = false;
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner()).clone();
        loop {
            let new = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                stopping |= st.stopping;
                let taken = st.incoming.len();
                flight.backlog.extend(st.incoming.drain(..));
                taken
            };
            if std::mem::take(&mut wrote_here) {
                // This thread was in a write of its own, which a hung disk
                // may have held past the deadline: what timed out meanwhile
                // has its answer and is not made now (as the workers do).
                self.drop_timed_out(&mut flight.backlog);
            }
            if stopping && flight.idle() && !wake_armed {
                break;
            }
            if let Some(slot) =
                self.alone_through_page_cache(&mut flight, new, stopping, &mut alone)
            {
                wrote_here = true;
                let (slot, outcome) = write_here(slot);
                self.written_here
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.finish(slot, outcome);
                continue;
            }
            {
                let mut sq = uring.submission();
                flight.fill(&mut sq);
                let parked = stopping && flight.backlog.is_empty();
                if !wake_armed && !parked {
                    let read = opcode::Read::new(wake_fd, (&mut *wake_buf as *mut u64).cast(), 8)
                        .build()
                        .user_data(WAKE);
                    // SAFETY: `wake_buf` lives until this thread ends, and
                    // the thread ends only once this read has completed.
                    wake_armed = unsafe { sq.push(&read) }.is_ok();
                }
            }
            if let Err(e) = uring.submit_and_wait(1) {
                waited(&self.name, &e);
            }
            let mut finished = Vec::new();
            let mut woken = false;
            for cqe in uring.completion() {
                if cqe.user_data() == WAKE {
                    wake_armed = false;
                    woken = true;
                    if cqe.result() < 0 && cqe.result() != -libc::EINTR {
                        // Never seen; if it ever comes, no hot loop.
                        tracing::warn!(disk = %self.name, errno = -cqe.result(), "the ring's wake read failed");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    continue;
                }
                finished.extend(flight.reap(cqe.user_data(), cqe.result(), disk.as_ref()));
            }
            if woken {
                // The read took the counter; later submitters write again.
                self.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .signalled = false;
            }
            for (slot, outcome) in finished {
                self.finish(slot, outcome);
            }
        }
        drop(disk);
        // Nothing of this disk is in flight: its descriptor may close.
        self.disk.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// The one request taken when it is a write through the page cache,
    /// nothing else of this disk is in the ring, and the last
    /// [`ALONE_STREAK`] turns that took requests found the same: this
    /// thread writes it itself ([`write_here`]). In the ring, a filesystem
    /// that cannot start a buffered write without blocking (ext4) has
    /// io_uring hand it to a kernel worker, which costs a wake of that
    /// worker and one of this thread after it: at QD 1 through NBD
    /// (`--cache writeback`, filled files) 177-185 us p50 in the ring
    /// against 115-152 written here. Writes that come several at a time
    /// go on in the ring, as before (QD 32 and four clients measured the
    /// same). A hung disk holds this thread in the write as it held the
    /// kernel worker: the queue's deadline fails the disk either way, and
    /// what timed out behind it is dropped, not made, when the write
    /// returns ([`Ring::drop_timed_out`]).
    fn alone_through_page_cache(
        &self,
        flight: &mut Flight,
        new: usize,
        stopping: bool,
        streak: &mut u32,
    ) -> Option<Slot> {
        // Only a turn that took requests counts: one that reaped a
        // completion or the wake alone says nothing of how they come.
        if new == 0 {
            return None;
        }
        let alone = !stopping
            && self.target.direct_align.is_none()
            && flight.backlog.len() == 1
            && flight.free.len() == DEPTH as usize
            && matches!(
                flight.backlog.front(),
                Some(Slot {
                    io: Io::Write { .. },
                    ..
                })
            );
        if !alone {
            *streak = 0;
            return None;
        }
        *streak = streak.saturating_add(1);
        if *streak > ALONE_STREAK {
            flight.backlog.pop_front()
        } else {
            None
        }
    }

    /// Drops the requests of `backlog` that timed out (their callers have
    /// an error and went on): a write landing after its disk was failed
    /// and taken back would undo what the resync copied.
    fn drop_timed_out(&self, backlog: &mut VecDeque<Slot>) {
        let Some(q) = self.queue.upgrade() else {
            return;
        };
        backlog.retain(|slot| {
            let live = q.is_in_flight(slot.id);
            if !live {
                q.end(slot.id);
            }
            live
        });
    }

    /// Counts a completed request and answers it.
    fn finish(&self, slot: Slot, outcome: Outcome) {
        self.stats.record(
            slot.kind,
            slot.bytes,
            outcome.is_ok(),
            slot.submitted.elapsed(),
        );
        if let Some(q) = self.queue.upgrade() {
            q.end(slot.id);
        }
        slot.ticket.complete(outcome);
    }

    /// Refuses new requests and lets the ring's thread exit once the ring
    /// is empty; with `join`, waits for it (not when a disk hung: its
    /// requests may never complete, and the thread keeps their buffers).
    pub(super) fn stop(&self, join: bool) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.stopping {
                return;
            }
            st.stopping = true;
            st.signalled = true;
        }
        self.kick();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle
            && join
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
    }
}

/// Writes a write slot's data with `pwritev2` on the calling thread (a FUA
/// write with `RWF_DSYNC`), the rest again after a short write, as the
/// ring would.
fn write_here(mut slot: Slot) -> (Slot, Outcome) {
    let fd = slot.fd.0;
    loop {
        let Io::Write {
            data,
            offset,
            done,
            dsync,
        } = &slot.io
        else {
            let wrong = io::Error::other("only a write is written by the ring's thread");
            return (slot, Err(wrong));
        };
        let rest = &data[*done..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len().min(i32::MAX as usize),
        };
        let at = (*offset + *done as u64) as libc::off_t;
        let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
        // SAFETY: one iovec over `rest`, which `slot` keeps alive for the
        // call; the kernel only reads it. `fd` is the disk's descriptor,
        // held open by the ring (its `disk`) while this thread runs.
        let n = unsafe { libc::pwritev2(fd, &iov, 1, at, flags) };
        let res = if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            -e.raw_os_error().unwrap_or(libc::EIO)
        } else {
            n as i32
        };
        match slot.progress(res, None) {
            Progress::More => continue,
            Progress::Done(outcome) => return (slot, outcome),
        }
    }
}

/// A ring that one thread alone submits to and reaps, with its task work
/// run when that thread asks for completions.
fn single_issuer_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        // Kernels before 6.1 refuse those flags.
        .or_else(|_| IoUring::builder().build(entries))
}

/// Takes a failed wait of a ring: an interrupted or busy one is retried at
/// once, a timed-out one is what was asked for; anything else is logged
/// and slowed down so that it cannot spin.
fn waited(name: &str, e: &io::Error) {
    match e.raw_os_error() {
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME) => {}
        _ => {
            tracing::error!(ring = %name, error = %e, "io_uring wait failed");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

thread_local! {
    /// This thread's own ring, made at its first request (see [`run_here`]).
    static LOCAL: std::cell::RefCell<Option<Local>> = const { std::cell::RefCell::new(None) };
    /// Inside [`run_here`]: this thread's requests go to its own ring.
    static HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This thread is answering completions of its own ring: what it
    /// submits meanwhile goes to the disks' rings, and it does not turn its
    /// own ring again (no callback runs inside another).
    static ANSWERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The `user_data` of a caller's poll is its token with this bit (and not
/// the top one) set (see [`turn_polls`]).
const POLL_TAG: u64 = 1 << 62;
/// The token of [`turn_here`]'s poll; the callers of [`turn_polls`] use
/// tokens below it.
const READABLE: u64 = POLL_TAG - 2;

/// Whether `user_data` is a caller's poll, and its token.
fn polled(user_data: u64) -> Option<u64> {
    (user_data >> 62 == 1).then_some(user_data & (POLL_TAG - 1))
}

/// A thread's own ring: an NBD loop (or connection thread) submits the
/// disk requests of its clients' requests to it and reaps them itself,
/// waiting for its sockets in the same ring, as qemu's event loop does; a
/// request then costs no hand-off between threads (see [`run_here`]).
struct Local {
    /// None when the kernel refused this thread a ring: not asked again.
    uring: Option<IoUring>,
    flight: Flight,
    /// The tokens of the polls in the ring, and of those that fired in a
    /// turn that was not their caller's (kept for its next one).
    armed: std::collections::HashSet<u64>,
    fired: Vec<u64>,
}

impl Local {
    fn new() -> Local {
        // Room for the poll of the socket next to a full flight.
        let uring = match single_issuer_ring(2 * DEPTH) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::debug!(error = %e, "no ring of its own for this thread; its requests go to the disks' rings");
                None
            }
        };
        Local {
            uring,
            flight: Flight::new(),
            armed: std::collections::HashSet::new(),
            fired: Vec::new(),
        }
    }

    fn busy(&self) -> bool {
        !self.flight.idle()
    }

    /// Submits what waits, without waiting.
    fn submit(&mut self) {
        let Some(uring) = self.uring.as_mut() else {
            return;
        };
        self.flight.fill(&mut uring.submission());
        if uring.submission().is_empty() {
            // Nothing to tell the kernel: no system call.
            return;
        }
        if let Err(e) = uring.submit() {
            waited("local", &e);
        }
    }

    /// Submits what waits, adds those of `polls` (descriptor, events,
    /// token) not in the ring yet, waits (at most `timeout`) for a
    /// completion, and returns the requests done and the tokens of the
    /// polls that fired.
    fn turn_polls(
        &mut self,
        polls: &[(std::os::fd::RawFd, u32, u64)],
        timeout: Option<std::time::Duration>,
    ) -> (Vec<(Slot, Outcome)>, Vec<u64>) {
        let Some(uring) = self.uring.as_mut() else {
            return (Vec::new(), polls.iter().map(|p| p.2).collect());
        };
        for &(fd, events, token) in polls {
            // Armed, or fired in a turn that was not ours and about to be
            // returned: not again.
            if self.armed.contains(&token) || self.fired.contains(&token) {
                continue;
            }
            let poll = opcode::PollAdd::new(types::Fd(fd), events)
                .build()
                .user_data(POLL_TAG | (token & (POLL_TAG - 1)));
            // SAFETY: a poll names no memory, and io_uring keeps its own
            // reference to the descriptor's file until the poll ends (the
            // caller shuts a socket it is done with, which ends it).
            let mut pushed = unsafe { uring.submission().push(&poll) }.is_ok();
            if !pushed {
                // The queue is full: what is in it goes to the kernel first.
                if let Err(e) = uring.submit() {
                    waited("local", &e);
                }
                // SAFETY: as above.
                pushed = unsafe { uring.submission().push(&poll) }.is_ok();
            }
            if pushed {
                self.armed.insert(token);
            }
        }
        self.flight.fill(&mut uring.submission());
        // Polls that fired in another turn are answered without waiting.
        let timeout = if self.fired.is_empty() {
            timeout
        } else {
            Some(std::time::Duration::ZERO)
        };
        let waited_for = match timeout {
            None => uring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                uring.submitter().submit_with_args(1, &args)
            }
        };
        if let Err(e) = waited_for {
            waited("local", &e);
        }
        let mut finished = Vec::new();
        let mut fired = std::mem::take(&mut self.fired);
        for cqe in uring.completion() {
            if let Some(token) = polled(cqe.user_data()) {
                self.armed.remove(&token);
                fired.push(token);
                continue;
            }
            finished.extend(self.flight.reap(cqe.user_data(), cqe.result(), None));
        }
        (finished, fired)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // Requests that never reached the kernel are answered.
        for mut slot in std::mem::take(&mut self.flight.backlog) {
            if let Some((ring, _disk)) = slot.owner.take() {
                let closed = io::Error::other(format!(
                    "the connection's ring closed before a request to disk {} ran",
                    ring.name
                ));
                ring.finish(slot, Err(closed));
            }
        }
        if !self.flight.idle() {
            // Requests of a hung disk are still in the ring.
            self.flight.abandon();
            std::mem::forget(self.uring.take());
        }
    }
}

/// How long a thread about to end waits for the requests still in its own
/// ring (see [`drain_here`]).
pub const LEFTOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Turns the calling thread's own ring until nothing is left in it, for at
/// most `within`: what a thread that used it calls before it ends. A
/// request a slow or hung disk still has is then seen to end, and counted
/// out of its queue, if the disk answers meanwhile; one left in the ring
/// when the thread ends is given to the kernel for good (its buffers kept)
/// and keeps its queue owing it, so its disk is not reactivated before
/// `serve` starts anew (see the controller's `reactivate_by_path`). Done
/// here, before the thread's locals are torn down, not when its ring is
/// dropped: a completion may log, or use other locals that are gone then.
pub fn drain_here(within: std::time::Duration) {
    let until = std::time::Instant::now() + within;
    while busy_here() {
        let now = std::time::Instant::now();
        if now >= until {
            break;
        }
        turn_here(None, Some((until - now).min(LEFTOVER_TURN)));
    }
}

/// One wait of [`drain_here`], at most.
const LEFTOVER_TURN: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs `f` with the ring requests it submits going to the calling
/// thread's own ring instead of each disk's. The thread then drives that
/// ring itself: [`turn_here`] submits them and answers their completions,
/// so an NBD connection's thread does all of a request's work, with no
/// other thread woken in between. It must turn its ring whenever it would
/// wait ([`busy_here`] says whether anything is in it).
pub fn run_here<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            HERE.set(self.0);
        }
    }
    let _restore = Restore(HERE.replace(true));
    f()
}

/// Puts `slot` in the calling thread's own ring when it runs inside
/// [`run_here`] and may (not while answering, not for a closed disk);
/// else gives it back.
fn route_here(ring: &Arc<Ring>, slot: Slot) -> Option<Slot> {
    if !HERE.get() || ANSWERING.get() || ring.closed.load(std::sync::atomic::Ordering::SeqCst) {
        return Some(slot);
    }
    // A write through the page cache goes to a kernel worker either way
    // (ext4 cannot start one without blocking); from the disk's ring,
    // random writes at QD 32 measured 1.5-2x the IOPS of the connection's
    // own ring under dirty-page throttling.
    if ring.target.direct_align.is_none() && matches!(slot.io, Io::Write { .. }) {
        return Some(slot);
    }
    // The descriptor stays open until the completion, whatever closes the
    // disk meanwhile.
    let Some(disk) = ring.disk.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
        return Some(slot);
    };
    let mut slot = Some(slot);
    // `try_with`: not while the thread's locals are torn down.
    let _ = LOCAL.try_with(|l| {
        let Ok(mut l) = l.try_borrow_mut() else {
            return;
        };
        let local = l.get_or_insert_with(Local::new);
        if local.uring.is_none() {
            return;
        }
        if let Some(mut mine) = slot.take() {
            mine.owner = Some((ring.clone(), disk));
            local.flight.backlog.push_back(mine);
        }
    });
    slot
}

/// Makes the calling thread's own ring if it has none; whether it has one
/// (the kernel may refuse it).
pub fn ensure_ring_here() -> bool {
    LOCAL
        .try_with(|l| {
            l.try_borrow_mut()
                .map(|mut l| l.get_or_insert_with(Local::new).uring.is_some())
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Turns the calling thread's own ring once, as [`turn_here`], with the
/// caller's polls in it: `polls` are (descriptor, poll events, token) with
/// tokens below 2^62 - 2; each stays in the ring until it fires, and is added
/// again only after. Returns the tokens that fired (all of them when there
/// is no ring to wait in).
pub fn turn_polls(
    polls: &[(std::os::fd::RawFd, u32, u64)],
    timeout: Option<std::time::Duration>,
) -> Vec<u64> {
    if ANSWERING.get() {
        return Vec::new();
    }
    kick_plugged();
    let turned = LOCAL
        .try_with(|l| match l.try_borrow_mut() {
            Ok(mut l) => l.as_mut().map(|local| local.turn_polls(polls, timeout)),
            Err(_) => None,
        })
        .ok()
        .flatten();
    let Some((finished, fired)) = turned else {
        return polls.iter().map(|p| p.2).collect();
    };
    answer_here(finished);
    fired
}

/// Answers the requests a turn of the thread's own ring finished, then
/// tells the disks' rings what the answers sent on.
fn answer_here(finished: Vec<(Slot, Outcome)>) {
    ANSWERING.set(true);
    for (mut slot, outcome) in finished {
        if let Some((ring, disk)) = slot.owner.take() {
            ring.finish(slot, outcome);
            drop(disk);
        }
    }
    ANSWERING.set(false);
    // What the answers sent on (a read retried on another plex, a write
    // the range lock let go) went to the disks' rings: tell them now, this
    // thread may wait next.
    kick_plugged();
}

/// Whether the calling thread's own ring holds requests it must turn for.
pub fn busy_here() -> bool {
    !ANSWERING.get()
        && LOCAL
            .try_with(|l| {
                l.try_borrow()
                    .map(|l| l.as_ref().is_some_and(Local::busy))
                    .unwrap_or(false)
            })
            .unwrap_or(false)
}

/// Turns the calling thread's own ring once: submits what waits, waits for
/// a completion (at most `timeout`), and answers what completed. With
/// `readable`, a poll of that socket is in the ring too; returns whether
/// it fired (true also when there is no ring to wait in). The polls of a
/// loop ([`turn_polls`]) that fire meanwhile are kept for its next turn.
pub fn turn_here(
    readable: Option<std::os::fd::RawFd>,
    timeout: Option<std::time::Duration>,
) -> bool {
    if ANSWERING.get() {
        return true;
    }
    // What this thread held back for the disks' rings goes before it waits.
    kick_plugged();
    let poll = readable.map(|fd| (fd, libc::POLLIN as u32, READABLE));
    let turned = LOCAL
        .try_with(|l| match l.try_borrow_mut() {
            Ok(mut l) => l.as_mut().filter(|l| l.uring.is_some()).map(|local| {
                let (finished, mut fired) = local.turn_polls(poll.as_slice(), timeout);
                let ready = fired.contains(&READABLE);
                fired.retain(|&t| t != READABLE);
                local.fired.extend(fired);
                (finished, ready)
            }),
            Err(_) => None,
        })
        .ok()
        .flatten();
    let Some((finished, ready)) = turned else {
        return true;
    };
    answer_here(finished);
    ready
}

/// Submits what waits in the calling thread's own ring, without waiting.
pub fn submit_here() {
    if ANSWERING.get() {
        return;
    }
    let _ = LOCAL.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut()
            && let Some(local) = l.as_mut()
        {
            local.submit();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::{DiskQueue, Op, QueuedDisk, read_data, wait};
    use super::*;
    use crate::disk::{FileDisk, OpenOptions};
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn file(len: u64) -> tempfile::NamedTempFile {
        // Next to the build, not on a tmpfs: O_DIRECT needs a real filesystem.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-files");
        std::fs::create_dir_all(&dir).unwrap();
        let f = tempfile::NamedTempFile::new_in(dir).unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    fn ring_queue(path: &std::path::Path, direct: bool) -> Option<Arc<DiskQueue>> {
        assert!(available(), "io_uring is refused on this machine");
        let opts = OpenOptions {
            direct,
            ..OpenOptions::default()
        };
        let disk = match FileDisk::open(path, opts) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("SKIPPED: O_DIRECT refused on {}", path.display());
                return None;
            }
            d => Arc::new(d.unwrap()) as Arc<dyn Disk>,
        };
        let q = DiskQueue::start_on("ring", disk, 2, Duration::from_secs(10), IoEngine::Uring);
        assert_eq!(q.engine(), IoEngine::Uring);
        Some(q)
    }

    fn pattern(len: usize, seed: u8) -> Arc<AlignedBuf> {
        let v: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        Arc::new(AlignedBuf::from_slice(&v))
    }

    fn write(q: &DiskQueue, offset: u64, data: &Arc<AlignedBuf>, fua: bool) {
        let op = Op::Write {
            offset,
            data: data.clone(),
            fua,
        };
        wait(|cb| q.submit(op, true, cb)).unwrap();
    }

    /// How many writes `q`'s ring thread wrote itself.
    fn written_here(q: &DiskQueue) -> u64 {
        let ring = q.ring.get().expect("a ring");
        ring.written_here.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn read(q: &DiskQueue, offset: u64, len: usize) -> AlignedBuf {
        read_data(wait(|cb| q.submit(Op::Read { offset, len }, true, cb))).unwrap()
    }

    #[test]
    fn reads_writes_and_flushes_round_trip_through_the_ring() {
        for direct in [false, true] {
            let f = file(4 * MIB);
            let Some(q) = ring_queue(f.path(), direct) else {
                continue;
            };
            let a = pattern(64 * 1024, 1);
            let b = pattern(4096, 2);
            write(&q, 0, &a, false);
            write(&q, MIB, &b, true);
            wait(|cb| q.submit(Op::Flush, true, cb)).unwrap();
            assert_eq!(&read(&q, 0, a.len())[..], &a[..]);
            let into = Op::ReadInto {
                offset: MIB,
                len: 4096,
                buf: AlignedBuf::new(8192, 4096),
            };
            let got = read_data(wait(|cb| q.submit(into, true, cb))).unwrap();
            assert_eq!(&got[..], &b[..]);
            // What the file holds, read around the queue.
            let mut on_file = vec![0u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(f.as_file(), &mut on_file, MIB).unwrap();
            assert_eq!(&on_file[..], &b[..]);
            let stats = q.stats();
            assert_eq!(
                stats
                    .written_bytes
                    .load(std::sync::atomic::Ordering::Relaxed),
                (a.len() + b.len()) as u64
            );
            assert_eq!(stats.ops(OpKind::Flush), 1, "direct={direct}");
            assert_eq!(q.pending(), 0);
            q.close();
        }
    }

    #[test]
    fn lone_page_cache_writes_after_a_streak_are_written_by_the_rings_thread() {
        let f = file(4 * MIB);
        let q = ring_queue(f.path(), false).unwrap();
        let n = 8u64;
        for i in 0..n {
            // One at a time, as a client at QD 1 sends them; every other
            // one FUA (`RWF_DSYNC`).
            write(&q, i * 8192, &pattern(4096, i as u8), i % 2 == 1);
        }
        assert_eq!(
            written_here(&q),
            n - u64::from(ALONE_STREAK),
            "the first ones go to the ring"
        );
        for i in 0..n {
            assert_eq!(&read(&q, i * 8192, 4096)[..], &pattern(4096, i as u8)[..]);
            let mut on_file = vec![0u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(f.as_file(), &mut on_file, i * 8192).unwrap();
            assert_eq!(&on_file[..], &pattern(4096, i as u8)[..], "write {i}");
        }
        let stats = q.stats();
        assert_eq!(stats.ops(OpKind::Write), n);
        assert_eq!(q.pending(), 0);
        // Many at once: none is written by the thread while others wait.
        let before = written_here(&q);
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let _plug = Plug::new();
            for i in 0..64u64 {
                let tx = tx.clone();
                let op = Op::Write {
                    offset: MIB + i * 4096,
                    data: pattern(4096, 7),
                    fua: false,
                };
                q.submit(op, true, Box::new(move |o| tx.send(o.map(|_| ())).unwrap()));
            }
        }
        for _ in 0..64 {
            rx.recv().unwrap().unwrap();
        }
        assert_eq!(written_here(&q), before);
        q.close();
    }

    #[test]
    fn direct_writes_are_never_written_by_the_rings_thread() {
        let f = file(4 * MIB);
        let Some(q) = ring_queue(f.path(), true) else {
            return;
        };
        for i in 0..8u64 {
            write(&q, i * 8192, &pattern(4096, i as u8), false);
        }
        assert_eq!(written_here(&q), 0);
        q.close();
    }

    #[test]
    fn more_requests_than_the_ring_holds_all_complete_in_place() {
        let f = file(8 * MIB);
        let q = ring_queue(f.path(), false).unwrap();
        let n = 4 * DEPTH as usize;
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..n {
            let tx = tx.clone();
            let op = Op::Write {
                offset: i as u64 * 4096,
                data: pattern(4096, i as u8),
                fua: false,
            };
            q.submit(op, true, Box::new(move |o| tx.send(o.map(|_| ())).unwrap()));
        }
        for _ in 0..n {
            rx.recv().unwrap().unwrap();
        }
        for i in 0..n {
            assert_eq!(
                &read(&q, i as u64 * 4096, 4096)[..],
                &pattern(4096, i as u8)[..]
            );
        }
        q.close();
    }

    #[test]
    fn a_file_truncated_under_the_ring_reads_as_gone_not_as_zeroes() {
        let f = file(4 * MIB);
        let q = ring_queue(f.path(), false).unwrap();
        f.as_file().set_len(MIB).unwrap();
        let e = wait(|cb| {
            q.submit(
                Op::Read {
                    offset: 2 * MIB,
                    len: 4096,
                },
                true,
                cb,
            )
        })
        .unwrap_err();
        assert!(e.to_string().contains("shrank"), "{e}");
        q.close();
    }

    #[test]
    fn what_the_ring_does_not_take_goes_to_the_workers() {
        let f = file(4 * MIB);
        let Some(q) = ring_queue(f.path(), true) else {
            return;
        };
        // An unaligned direct transfer takes FileDisk's bounce buffer.
        let odd = Arc::new(AlignedBuf::from_slice(&[7u8; 100]));
        write(&q, 4096 + 12, &odd, false);
        assert_eq!(&read(&q, 4096 + 12, 100)[..], &[7u8; 100][..]);
        // Zeroes punch a hole, a check stats the file.
        let op = Op::WriteZeroes {
            offset: 4096,
            len: 4096,
            fua: false,
            keep: false,
        };
        wait(|cb| q.submit(op, true, cb)).unwrap();
        assert!(read(&q, 4096, 4096).iter().all(|b| *b == 0));
        wait(|cb| q.submit(Op::Check, true, cb)).unwrap();
        q.close();
    }

    /// Submits `op` inside [`run_here`]; the outcome and the thread that
    /// answered arrive on the receiver.
    fn submit_here_with_thread(
        q: &DiskQueue,
        op: Op,
    ) -> std::sync::mpsc::Receiver<(Outcome, std::thread::ThreadId)> {
        let (tx, rx) = std::sync::mpsc::channel();
        run_here(|| {
            q.submit(
                op,
                true,
                Box::new(move |o| {
                    let _ = tx.send((o, std::thread::current().id()));
                }),
            )
        });
        rx
    }

    /// Turns this thread's own ring until `rx` has what it waits for.
    fn turned_until<T>(rx: std::sync::mpsc::Receiver<T>) -> T {
        loop {
            turn_here(None, Some(Duration::from_millis(100)));
            if let Ok(got) = rx.try_recv() {
                return got;
            }
        }
    }

    #[test]
    fn requests_run_in_the_threads_own_ring_and_are_answered_on_that_thread() {
        let f = file(4 * MIB);
        let Some(q) = ring_queue(f.path(), true) else {
            return;
        };
        let data = pattern(8192, 5);
        let wrote = submit_here_with_thread(
            &q,
            Op::Write {
                offset: MIB,
                data: data.clone(),
                fua: false,
            },
        );
        assert!(busy_here(), "the write waits in this thread's own ring");
        // Nothing reaches the disk before the thread turns its ring.
        std::thread::sleep(Duration::from_millis(50));
        assert!(wrote.try_recv().is_err(), "not run before the turn");
        let me = std::thread::current().id();
        let (outcome, on) = turned_until(wrote);
        outcome.unwrap();
        assert_eq!(on, me, "answered by the thread that turned its ring");
        assert!(!busy_here());
        // A read the same way, and the queue's books balance.
        let read_back = submit_here_with_thread(
            &q,
            Op::Read {
                offset: MIB,
                len: 8192,
            },
        );
        let (outcome, on) = turned_until(read_back);
        assert_eq!(on, me);
        assert_eq!(&read_data(outcome).unwrap()[..], &data[..]);
        assert_eq!(q.pending(), 0);
        assert_eq!(q.stats().ops(OpKind::Write), 1);
        // Outside run_here, requests go to the disk's ring as before.
        let (tx, rx) = std::sync::mpsc::channel();
        q.submit(
            Op::Read {
                offset: MIB,
                len: 4096,
            },
            true,
            Box::new(move |o| {
                let _ = tx.send((o.is_ok(), std::thread::current().id()));
            }),
        );
        let (ok, on) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(ok);
        assert_ne!(on, me, "answered by the disk's ring thread");
        assert!(!busy_here());
        q.close();
    }

    #[test]
    fn a_thread_waiting_for_an_outcome_turns_its_own_ring_meanwhile() {
        let f = file(4 * MIB);
        let Some(q) = ring_queue(f.path(), true) else {
            return;
        };
        // Without the turn inside `received`, this would wait for good:
        // the write sits in the ring of the very thread that waits.
        let data = pattern(4096, 6);
        let (cb, rx) = super::super::channel();
        run_here(|| {
            q.submit(
                Op::Write {
                    offset: 0,
                    data: data.clone(),
                    fua: true,
                },
                true,
                cb,
            )
        });
        super::super::received(&rx).unwrap();
        assert_eq!(&read(&q, 0, 4096)[..], &data[..]);
        q.close();
    }

    #[test]
    fn requests_left_in_a_threads_ring_when_it_ends_are_answered_and_a_closed_disk_is_refused() {
        let f = file(4 * MIB);
        let q = ring_queue(f.path(), false).unwrap();
        let q2 = q.clone();
        // The thread ends without turning its ring: the request never
        // reached the kernel, and is answered with an error.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            run_here(|| {
                q2.submit(
                    Op::Read {
                        offset: 0,
                        len: 4096,
                    },
                    true,
                    Box::new(move |o| {
                        let _ = tx.send(o.map(|_| ()));
                    }),
                )
            });
        })
        .join()
        .unwrap();
        let e = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("ring closed"), "{e}");
        assert_eq!(q.pending(), 0);
        // A closed disk's requests do not go to a thread's ring.
        q.close();
        let done = submit_here_with_thread(
            &q,
            Op::Read {
                offset: 0,
                len: 4096,
            },
        );
        assert!(!busy_here());
        let (outcome, _) = done.recv_timeout(Duration::from_secs(10)).unwrap();
        let e = outcome.unwrap_err();
        assert!(e.to_string().contains("stopped"), "{e}");
    }

    #[test]
    fn page_cache_writes_stay_off_a_threads_own_ring_and_reads_go_there() {
        let f = file(4 * MIB);
        let q = ring_queue(f.path(), false).unwrap();
        let me = std::thread::current().id();
        let data = pattern(4096, 7);
        let write = || Op::Write {
            offset: 0,
            data: data.clone(),
            fua: false,
        };
        // The write goes to the disk's ring (see `route_here`).
        let done = submit_here_with_thread(&q, write());
        assert!(!busy_here(), "not in this thread's ring");
        let (outcome, on) = done.recv_timeout(Duration::from_secs(10)).unwrap();
        outcome.unwrap();
        assert_ne!(on, me);
        // Its reads do go to the thread's own ring.
        let got = submit_here_with_thread(
            &q,
            Op::Read {
                offset: 0,
                len: 4096,
            },
        );
        assert!(busy_here());
        let (outcome, on) = turned_until(got);
        assert_eq!(on, me);
        assert_eq!(&read_data(outcome).unwrap()[..], &data[..]);
        assert_eq!(q.stats().ops(OpKind::Write), 1);
        q.close();
    }

    #[test]
    fn a_closed_ring_refuses_requests_and_lets_the_file_and_its_lock_go() {
        let f = file(4 * MIB);
        let opts = OpenOptions {
            lock: true,
            ..OpenOptions::default()
        };
        let disk: Arc<dyn Disk> = Arc::new(FileDisk::open(f.path(), opts).unwrap());
        let owner = QueuedDisk::start_on("ring", disk, 2, Duration::from_secs(10), IoEngine::Uring);
        let q = owner.queue().clone();
        assert_eq!(q.engine(), IoEngine::Uring);
        write(&q, 0, &pattern(4096, 3), false);
        drop(owner);
        let e = wait(|cb| {
            q.submit(
                Op::Read {
                    offset: 0,
                    len: 4096,
                },
                true,
                cb,
            )
        })
        .unwrap_err();
        assert!(e.to_string().contains("stopped"), "{e}");
        FileDisk::open(f.path(), opts).expect("the lock was let go with the queue");
    }
}
