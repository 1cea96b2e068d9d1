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
use crate::disk::buf::IO_ALIGN;
use crate::disk::file::RingTarget;
use crate::disk::{AlignedBuf, Disk};

/// Requests in one disk's ring at once; more wait in its backlog.
pub const DEPTH: u32 = 128;

/// How a disk queue runs its data requests (`--io-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IoEngine {
    /// Worker threads doing `pread`/`pwrite`/`fdatasync`.
    Threads,
    /// io_uring: submitted from the caller's thread, completed by one
    /// reaper thread per disk; worker threads where io_uring is refused.
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

    /// Tells the kernel about everything held back so far.
    pub fn flush(&self) {
        unplug_now();
    }
}

impl Default for Plug {
    fn default() -> Plug {
        Plug::new()
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        unplug_now();
        PLUGGED.with(|p| *p.borrow_mut() = None);
    }
}

/// Flushes the calling thread's [`Plug`], if it holds one: for code about
/// to wait on a completion.
pub fn unplug_now() {
    let rings = PLUGGED.with(|p| p.borrow_mut().as_mut().map(std::mem::take));
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
}

enum Progress {
    More,
    Done(Outcome),
}

impl Slot {
    /// The submission entry for what is left of the transfer.
    fn entry(&mut self, fd: types::Fd, index: u64) -> squeue::Entry {
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
}

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
        });
        // The ring is made on its thread: with SINGLE_ISSUER, the task
        // that makes it is the only one that may submit.
        let (made, built) = std::sync::mpsc::sync_channel(1);
        let me = ring.clone();
        let handle = std::thread::Builder::new()
            .name("mv-uring".into())
            .spawn(move || {
                let uring = IoUring::builder()
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .build(DEPTH)
                    // Kernels before 6.1 refuse those flags.
                    .or_else(|_| IoUring::builder().build(DEPTH));
                match uring {
                    Ok(uring) => {
                        let _ = made.send(Ok(()));
                        me.run(uring);
                    }
                    Err(e) => {
                        let _ = made.send(Err(e));
                        me.disk.lock().unwrap_or_else(|e| e.into_inner()).take();
                    }
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
        // A read is a read into a buffer of its own length.
        let op = match job.op {
            Op::Read { offset, len } => Op::ReadInto {
                offset,
                len,
                buf: AlignedBuf::new(len, IO_ALIGN),
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
        PLUGGED.with(|p| match p.borrow_mut().as_mut() {
            Some(rings) => {
                if !rings.iter().any(|r| Arc::ptr_eq(r, self)) {
                    rings.push(self.clone());
                }
                true
            }
            None => false,
        })
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
        let fd = types::Fd(self.target.fd);
        let wake_fd = types::Fd(std::os::fd::AsRawFd::as_raw_fd(&self.wake));
        let mut slots: Vec<Option<Slot>> = (0..DEPTH).map(|_| None).collect();
        let mut free: Vec<usize> = (0..DEPTH as usize).rev().collect();
        let mut backlog: VecDeque<Slot> = VecDeque::new();
        let mut wake_buf: Box<u64> = Box::new(0);
        let mut wake_armed = false;
        let mut stopping = false;
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner()).clone();
        loop {
            {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                backlog.extend(st.incoming.drain(..));
                stopping |= st.stopping;
            }
            let in_flight = DEPTH as usize - free.len();
            if stopping && in_flight == 0 && backlog.is_empty() && !wake_armed {
                break;
            }
            {
                let mut sq = uring.submission();
                while let Some(index) = free.last().copied() {
                    let Some(mut slot) = backlog.pop_front() else {
                        break;
                    };
                    let entry = slot.entry(fd, index as u64);
                    // SAFETY: the entry's buffer is owned by its slot, kept in
                    // `slots` until the completion is reaped.
                    if unsafe { sq.push(&entry) }.is_err() {
                        backlog.push_front(slot);
                        break;
                    }
                    free.pop();
                    slots[index] = Some(slot);
                }
                let parked = stopping && backlog.is_empty();
                if !wake_armed && !parked {
                    let read = opcode::Read::new(wake_fd, (&mut *wake_buf as *mut u64).cast(), 8)
                        .build()
                        .user_data(WAKE);
                    // SAFETY: `wake_buf` lives until this thread ends, and
                    // the thread ends only once this read has completed.
                    wake_armed = unsafe { sq.push(&read) }.is_ok();
                }
            }
            match uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    tracing::error!(disk = %self.name, error = %e, "io_uring wait failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            let mut finished = Vec::new();
            let mut woken = false;
            for cqe in uring.completion() {
                let index = cqe.user_data();
                if index == WAKE {
                    wake_armed = false;
                    woken = true;
                    if cqe.result() < 0 && cqe.result() != -libc::EINTR {
                        // Never seen; if it ever comes, no hot loop.
                        tracing::warn!(disk = %self.name, errno = -cqe.result(), "the ring's wake read failed");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    continue;
                }
                let Some(mut slot) = slots.get_mut(index as usize).and_then(Option::take) else {
                    continue;
                };
                match slot.progress(cqe.result(), disk.as_ref()) {
                    // The rest goes first, in the slot it had.
                    Progress::More => {
                        free.push(index as usize);
                        backlog.push_front(slot);
                    }
                    Progress::Done(outcome) => {
                        free.push(index as usize);
                        finished.push((slot, outcome));
                    }
                }
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
        };
        wait(|cb| q.submit(op, true, cb)).unwrap();
        assert!(read(&q, 4096, 4096).iter().all(|b| *b == 0));
        wait(|cb| q.submit(Op::Check, true, cb)).unwrap();
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
