//! Per-disk submission queues.
//!
//! Every disk gets its own queue and its own worker threads, so a slow or
//! hung disk never delays submission to another (duplexing carried down to
//! the I/O path). Submitting never blocks: the request goes into the disk's
//! channel, and its completion runs on the worker that finished it.
//!
//! Every byte a disk sees goes through its queue: the engine's data
//! requests, and through [`QueuedDisk`] the labels, config slots and
//! bitmaps too. One watchdog thread for the process completes requests
//! that have waited longer than their queue's deadline with `TimedOut`, so
//! the layers above can fail the disk and go on with the others; the stuck
//! worker's own completion, if it ever comes, is then ignored. A request
//! past its deadline is abandoned, not cancelled (the kernel cannot cancel
//! it): the worker keeps its buffer until the disk returns it, and a hung
//! disk holds at most its queue's workers, never the caller's thread.
//!
//! Each queue counts what it does ([`DiskStats`]): bytes, requests by kind,
//! errors, and the latency of every request from submission to completion
//! (the wait in the queue included, as iostat's `await`). The metrics
//! endpoint reads them; the cost on the I/O path is a few relaxed atomic
//! adds and one histogram observation per request.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::disk::{AlignedBuf, Disk};

mod nbd;
mod uring;
pub use uring::{
    IoEngine, LEFTOVER_WAIT, Plug, available as uring_available, busy_here, drain_here,
    ensure_ring_here, run_here, submit_here, turn_here, turn_polls, unplug_now,
};

/// What a queue asks before the first request that changes its disk.
pub trait WriteGate: Send + Sync {
    fn before_first_write(&self) -> io::Result<()>;
}

/// One I/O request to one disk, at absolute disk offsets.
#[derive(Debug)]
pub enum Op {
    Read {
        offset: u64,
        len: usize,
    },
    /// A read of what the storage holds now ([`Disk::read_fresh`]).
    ReadFresh {
        offset: u64,
        len: usize,
    },
    /// Reads the first `len` bytes of a buffer the caller lends (it comes
    /// back as the outcome's buffer, `len` long): resync and scrub reuse
    /// their buffers, where a fresh one per chunk costs page faults.
    ReadInto {
        offset: u64,
        len: usize,
        buf: AlignedBuf,
    },
    /// Writes `data`; with `fua`, makes it durable before completing.
    Write {
        offset: u64,
        data: Arc<AlignedBuf>,
        fua: bool,
    },
    Flush,
    /// Makes the range read as zeroes; `keep`: keeps it allocated
    /// ([`Disk::zero_range`]), else it may become a hole.
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        keep: bool,
    },
    /// Tells the disk the range is unused (contents afterwards unspecified).
    Discard {
        offset: u64,
        len: u64,
    },
    /// Asks whether the disk is still the one opened ([`Disk::health`]).
    Check,
    /// Writes each buffer at its offset in order, then flushes when
    /// `flush`: one request for metadata that goes out together.
    WriteMany {
        writes: Vec<(u64, AlignedBuf)>,
        flush: bool,
    },
}

impl Op {
    /// The kind of request, as the statistics count it.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Read { .. } | Op::ReadFresh { .. } | Op::ReadInto { .. } => OpKind::Read,
            Op::Write { .. } | Op::WriteMany { .. } => OpKind::Write,
            Op::Flush | Op::Check => OpKind::Flush,
            Op::WriteZeroes { .. } | Op::Discard { .. } => OpKind::Zeroes,
        }
    }

    /// The bytes the request moves (read, written or zeroed).
    fn bytes(&self) -> u64 {
        match self {
            Op::Read { len, .. } | Op::ReadFresh { len, .. } | Op::ReadInto { len, .. } => {
                *len as u64
            }
            Op::Write { data, .. } => data.len() as u64,
            Op::WriteMany { writes, .. } => writes.iter().map(|(_, d)| d.len() as u64).sum(),
            Op::WriteZeroes { len, .. } | Op::Discard { len, .. } => *len,
            Op::Flush | Op::Check => 0,
        }
    }
}

/// The kinds of request a disk queue carries. NBD's TRIM reaches the disks
/// as write-zeroes, so there is no separate discard kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Zeroes = 3,
}

impl OpKind {
    pub const ALL: [OpKind; 4] = [OpKind::Read, OpKind::Write, OpKind::Flush, OpKind::Zeroes];

    /// The name metrics label it with.
    pub fn label(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Zeroes => "zeroes",
        }
    }
}

/// The deadline of a disk request unless `--io-timeout` says otherwise: the
/// SCSI layer's default command timeout.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bounds of the latency histogram buckets, in seconds: 50 µs (a
/// fast NVMe read) to 10 s (a disk about to time out), 1-2.5-5 steps.
pub const LATENCY_BUCKETS: [f64; 18] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 0.5,
    1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The latency of one kind of request: a count per bucket of
/// [`LATENCY_BUCKETS`] (and one past the last) and the sum, in
/// nanoseconds. Lock-free: a request adds to two atomics.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    pub fn observe(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS.partition_point(|&b| b < secs);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(latency.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Requests observed.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The sum of the latencies, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// (upper bound in seconds, requests in that bucket alone), the last
    /// bound infinite.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// What a disk's queue has done since it started. Counters only grow.
#[derive(Debug, Default)]
pub struct DiskStats {
    /// Bytes read by successful reads.
    pub read_bytes: AtomicU64,
    /// Bytes written by successful writes (write-zeroes not included).
    pub written_bytes: AtomicU64,
    /// Bytes zeroed by successful write-zeroes.
    pub zeroed_bytes: AtomicU64,
    /// Requests the disk failed.
    pub errors: AtomicU64,
    /// Requests the watchdog completed with `TimedOut`.
    pub timeouts: AtomicU64,
    /// Latency from submission to completion of every completed request
    /// (successful or not), by [`OpKind`]: its count is the request count.
    pub latency: [Latency; 4],
}

impl DiskStats {
    /// Completed requests (successful or not) of one kind.
    pub fn ops(&self, kind: OpKind) -> u64 {
        self.latency[kind as usize].count()
    }

    /// Counts one completed request of `kind` that moved `bytes` when it
    /// succeeded.
    fn record(&self, kind: OpKind, bytes: u64, ok: bool, latency: Duration) {
        let counter = match kind {
            _ if !ok => Some((&self.errors, 1)),
            OpKind::Read => Some((&self.read_bytes, bytes)),
            OpKind::Write => Some((&self.written_bytes, bytes)),
            OpKind::Zeroes => Some((&self.zeroed_bytes, bytes)),
            OpKind::Flush => None,
        };
        if let Some((c, n)) = counter {
            c.fetch_add(n, Ordering::Relaxed);
        }
        self.latency[kind as usize].observe(latency);
    }
}

/// What a completed request yields: the bytes of a read, nothing otherwise.
pub type Outcome = io::Result<Option<AlignedBuf>>;

/// A completion callback.
pub type Callback = Box<dyn FnOnce(Outcome) + Send>;

/// Runs a completion once: by the worker, or by the watchdog on a timeout,
/// whichever comes first.
struct Ticket {
    callback: Mutex<Option<Callback>>,
}

impl Ticket {
    fn complete(&self, outcome: Outcome) {
        let cb = self
            .callback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(cb) = cb {
            cb(outcome);
        }
    }
}

type InFlight = (Instant, bool, Arc<Ticket>);

struct Job {
    id: u64,
    submitted: Instant,
    op: Op,
    ticket: Arc<Ticket>,
}

/// A disk's queue and workers.
pub struct DiskQueue {
    name: String,
    /// The backend; taken out when the queue closes ([`DiskQueue::close`]),
    /// so that the file (and its lock) is let go then, whoever still holds
    /// the queue.
    disk: Mutex<Option<Arc<dyn Disk>>>,
    size: u64,
    sector_size: u32,
    tx: Mutex<Option<Sender<Job>>>,
    /// The metadata lane: labels, config slots and bitmaps ([`QueuedDisk`])
    /// have a worker of their own. The data workers run the engine's
    /// completions, which may record a failure in the config and wait for
    /// that write: were it queued behind them, a queue whose every worker
    /// waits so would never serve it.
    meta_tx: Mutex<Option<Sender<Job>>>,
    pending: AtomicUsize,
    next_id: AtomicU64,
    /// Requests submitted and not completed: id to (submission time, has a
    /// deadline, ticket).
    in_flight: Mutex<HashMap<u64, InFlight>>,
    timed_out: AtomicBool,
    /// Set when the group's claim fenced itself: every request fails.
    fenced: AtomicBool,
    /// Asked before the first request that changes the disk
    /// ([`DiskQueue::set_gate`]).
    gate: std::sync::OnceLock<Arc<dyn WriteGate>>,
    gate_open: AtomicBool,
    /// How long a request with a deadline may take before it is completed
    /// with `TimedOut` (`--io-timeout`, or the disk's own): nanoseconds.
    timeout: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// The io_uring backend, when the queue runs on one: data requests it
    /// takes go there, the rest to the workers.
    ring: std::sync::OnceLock<Arc<uring::Ring>>,
    stats: Arc<DiskStats>,
}

impl std::fmt::Debug for DiskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskQueue")
            .field("name", &self.name)
            .field("pending", &self.pending())
            .finish()
    }
}

fn execute(disk: &dyn Disk, op: Op) -> Outcome {
    match op {
        // Reads fill their buffers whole or fail: recycled ones do.
        Op::Read { offset, len } => {
            let mut buf = AlignedBuf::recycled(len);
            disk.read_at(&mut buf, offset)?;
            Ok(Some(buf))
        }
        Op::ReadFresh { offset, len } => {
            let mut buf = AlignedBuf::recycled(len);
            disk.read_fresh(&mut buf, offset)?;
            Ok(Some(buf))
        }
        Op::ReadInto {
            offset,
            len,
            mut buf,
        } => {
            if len > buf.capacity() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a {len}-byte read into a {}-byte buffer", buf.capacity()),
                ));
            }
            buf.set_len(len);
            disk.read_at(&mut buf, offset)?;
            Ok(Some(buf))
        }
        Op::Write { offset, data, fua } => {
            disk.write_at(&data, offset)?;
            if fua {
                disk.flush()?;
            }
            Ok(None)
        }
        Op::Flush => disk.flush().map(|()| None),
        Op::WriteZeroes {
            offset,
            len,
            fua,
            keep,
        } => {
            if keep {
                disk.zero_range(offset, len)?;
            } else {
                disk.write_zeroes(offset, len)?;
            }
            if fua {
                disk.flush()?;
            }
            Ok(None)
        }
        Op::Discard { offset, len } => disk.discard(offset, len).map(|()| None),
        Op::Check => disk.health().map(|()| None),
        Op::WriteMany { writes, flush } => {
            let refs: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, &d[..])).collect();
            disk.write_all_then_flush(&refs, flush).map(|()| None)
        }
    }
}

/// Runs `op` and counts it.
fn execute_counted(disk: &dyn Disk, stats: &DiskStats, op: Op, submitted: Instant) -> Outcome {
    let (kind, bytes, counted) = (op.kind(), op.bytes(), !matches!(op, Op::Check));
    let outcome = execute(disk, op);
    // A health check is no request of the disk's users: not counted.
    if counted {
        stats.record(kind, bytes, outcome.is_ok(), submitted.elapsed());
    }
    outcome
}

/// A callback that sends the outcome to the receiver returned with it.
pub fn channel() -> (Callback, std::sync::mpsc::Receiver<Outcome>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let cb: Callback = Box::new(move |o| {
        let _ = tx.send(o);
    });
    (cb, rx)
}

/// The outcome that arrives on `rx` (from [`channel`]).
pub fn received(rx: &std::sync::mpsc::Receiver<Outcome>) -> Outcome {
    // A thread with requests in its own ring answers them while it waits:
    // the outcome may be one of them.
    while busy_here() {
        match rx.try_recv() {
            Ok(outcome) => return outcome,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                turn_here(None, Some(std::time::Duration::from_millis(5)));
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
        }
    }
    rx.recv().unwrap_or_else(|_| {
        Err(io::Error::other(
            "the request was dropped without an answer",
        ))
    })
}

/// [`wait`], with the ring requests `submit` makes going to the calling
/// thread's own ring ([`run_here`]), which [`received`] turns meanwhile: a
/// blocking caller's request wakes no other thread (a read the page cache
/// holds completes in the submitting system call).
pub fn wait_here(submit: impl FnOnce(Callback)) -> Outcome {
    wait(|cb| run_here(|| submit(cb)))
}

/// Submits with a callback and waits for its outcome.
pub fn wait(submit: impl FnOnce(Callback)) -> Outcome {
    let (cb, rx) = channel();
    submit(cb);
    received(&rx)
}

/// The data of a read's outcome.
pub fn read_data(outcome: Outcome) -> io::Result<AlignedBuf> {
    outcome?.ok_or_else(|| io::Error::other("a read returned no data"))
}

impl DiskQueue {
    /// Starts a queue with `threads` workers over `disk`, whose requests
    /// with a deadline time out after `timeout`; `name` (its path) names the
    /// threads and the errors.
    pub fn start(
        name: &str,
        disk: Arc<dyn Disk>,
        threads: usize,
        timeout: Duration,
    ) -> Arc<DiskQueue> {
        DiskQueue::start_on(name, disk, threads, timeout, IoEngine::Threads)
    }

    /// [`DiskQueue::start`] on the backend `engine`: with
    /// [`IoEngine::Uring`], a plain file or device gets a ring for its data
    /// requests (the workers take the rest); a wrapped disk, or a process
    /// where io_uring is refused, keeps the workers alone.
    pub fn start_on(
        name: &str,
        disk: Arc<dyn Disk>,
        threads: usize,
        timeout: Duration,
        engine: IoEngine,
    ) -> Arc<DiskQueue> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let (meta_tx, meta_rx) = crossbeam_channel::unbounded::<Job>();
        let stats = Arc::new(DiskStats::default());
        let q = Arc::new(DiskQueue {
            name: name.to_string(),
            size: disk.size(),
            sector_size: disk.sector_size(),
            disk: Mutex::new(Some(disk.clone())),
            tx: Mutex::new(Some(tx)),
            meta_tx: Mutex::new(Some(meta_tx)),
            pending: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            in_flight: Mutex::new(HashMap::new()),
            timed_out: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            gate: std::sync::OnceLock::new(),
            gate_open: AtomicBool::new(false),
            timeout: AtomicU64::new(timeout.as_nanos().min(u64::MAX as u128) as u64),
            workers: Mutex::new(Vec::new()),
            ring: std::sync::OnceLock::new(),
            stats: stats.clone(),
        });
        if engine == IoEngine::Uring && uring_available() {
            match uring::Ring::start(name, &disk, Arc::downgrade(&q), stats.clone()) {
                Ok(Some(ring)) => {
                    let _ = q.ring.set(ring);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(disk = name, error = %e, "no io_uring for this disk; using worker threads");
                }
            }
        }
        let mut workers = Vec::new();
        // An NBD export's data requests go to its sender thread, which
        // hands the workers only what it cannot send without waiting.
        let rx = if disk.as_nbd_disk().is_some() {
            let (fallback, workers_rx) = crossbeam_channel::unbounded::<Job>();
            let (q, disk, stats) = (Arc::downgrade(&q), disk.clone(), stats.clone());
            let handle = std::thread::Builder::new()
                .name("mv-nbd-send".into())
                .spawn(move || nbd::sender(q, disk, stats, rx, fallback))
                .expect("spawn an NBD disk's sender");
            workers.push(handle);
            workers_rx
        } else {
            rx
        };
        let lanes = (0..threads.max(1))
            .map(|i| (format!("mv-disk-{i}"), rx.clone()))
            .chain(std::iter::once(("mv-disk-meta".to_string(), meta_rx)));
        for (name, rx) in lanes {
            let (q, disk) = (Arc::downgrade(&q), disk.clone());
            let stats = stats.clone();
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || worker(q, disk, stats, rx))
                .expect("spawn a disk worker");
            workers.push(handle);
        }
        *q.workers.lock().unwrap_or_else(|e| e.into_inner()) = workers;
        watchdog().watch(&q);
        q
    }

    /// Whether its data requests go to an NBD export's sender.
    fn nbd_sender(&self) -> bool {
        self.disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|d| d.as_nbd_disk().is_some())
    }

    /// The backend its data requests run on.
    pub fn engine(&self) -> IoEngine {
        if self.ring.get().is_some() {
            IoEngine::Uring
        } else {
            IoEngine::Threads
        }
    }

    /// The deadline of this queue's requests.
    pub fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout.load(Ordering::Relaxed))
    }

    /// A new deadline, from the next look of the watchdog on (which is
    /// woken: a shorter one holds at once); the backend follows.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout.store(
            timeout.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
        if let Some(d) = self.disk() {
            d.set_timeout(timeout);
        }
        watchdog().thread.unpark();
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend's sector size.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// The backend, until the queue closes.
    pub fn disk(&self) -> Option<Arc<dyn Disk>> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn closed(&self) -> io::Error {
        io::Error::other(format!("the queue of disk {} is stopped", self.name))
    }

    /// What this queue has done since it started.
    pub fn stats(&self) -> &Arc<DiskStats> {
        &self.stats
    }

    /// Requests submitted and not yet completed.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// True while a request has waited longer than the deadline and is still
    /// not answered: one without a deadline (a volume's last copy, which is
    /// waited for rather than failed), or one the watchdog has yet to see.
    pub fn stalled(&self) -> bool {
        let timeout = self.timeout();
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|(start, _, _)| start.elapsed() > timeout)
    }

    /// Requests the watchdog gave up on that have not ended: each is still
    /// in the disk (a write stuck in the kernel on a disk that hung), or
    /// queued behind one that is, and a write among them may yet land.
    /// The disk is not taken back while any is owed (see the controller's
    /// `reactivate_by_path`).
    pub fn owed(&self) -> usize {
        let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        self.pending().saturating_sub(in_flight.len())
    }

    /// True once a request on this disk has timed out.
    pub fn has_timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// The disk answers again (its connection was made anew): once no
    /// request of before is in flight, none is stuck in it any more.
    pub fn answered_again(&self) {
        if self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            self.timed_out.store(false, Ordering::Relaxed);
        }
    }

    /// Books a request in: it counts as pending, and the watchdog's clock
    /// for it starts now, not when a worker takes it (behind workers stuck in
    /// a hung disk, a queued request must time out too).
    fn begin(&self, deadline: bool, done: Callback) -> (u64, Arc<Ticket>, Instant) {
        let ticket = Arc::new(Ticket {
            callback: Mutex::new(Some(done)),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        // Counted under the lock of `in_flight`, so that [`Self::owed`]
        // reads the two together.
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.fetch_add(1, Ordering::Relaxed);
        in_flight.insert(id, (now, deadline, ticket.clone()));
        (id, ticket, now)
    }

    /// Whether request `id` still waits for its answer (not timed out).
    fn is_in_flight(&self, id: u64) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
    }

    /// Books a request out, whoever completes it.
    fn end(&self, id: u64) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.remove(&id);
        self.pending.fetch_sub(1, Ordering::Relaxed);
    }

    /// Queues `op`; `done` runs when it completes (or times out, when
    /// `deadline` allows it).
    pub fn submit(&self, op: Op, deadline: bool, done: Callback) {
        self.send(&self.tx, self.ring.get(), op, deadline, done)
    }

    /// Queues `op` on the metadata lane (see `DiskQueue::meta_tx`).
    pub fn submit_meta(&self, op: Op, deadline: bool, done: Callback) {
        self.send(&self.meta_tx, None, op, deadline, done)
    }

    /// Fails every request from now on: the group's claim fenced itself
    /// (another host may take the disk over), so nothing more reaches it.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    fn fenced_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "disk {} is fenced: the group's claim could not be renewed",
                self.name
            ),
        )
    }

    /// Sets what is asked before the first request that changes the disk:
    /// the group's claim is written to the disks then, so a command refused
    /// before it writes anything leaves them as they were.
    pub fn set_gate(&self, gate: Arc<dyn WriteGate>) {
        let _ = self.gate.set(gate);
    }

    /// Lets requests through without asking the gate again.
    pub fn open_gate(&self) {
        self.gate_open.store(true, Ordering::SeqCst);
    }

    /// Checks a request before it is queued: fenced, or a first write whose
    /// gate refuses.
    fn admit(&self, op: &Op) -> io::Result<()> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(self.fenced_error());
        }
        let changes = matches!(op.kind(), OpKind::Write | OpKind::Zeroes);
        if changes && !self.gate_open.load(Ordering::SeqCst) {
            if let Some(gate) = self.gate.get() {
                gate.before_first_write()?;
            }
            self.gate_open.store(true, Ordering::SeqCst);
            if self.fenced.load(Ordering::SeqCst) {
                return Err(self.fenced_error());
            }
        }
        Ok(())
    }

    /// Books `op` in and hands it to `ring` when one takes it, else to the
    /// workers of `lane`.
    fn send(
        &self,
        lane: &Mutex<Option<Sender<Job>>>,
        ring: Option<&Arc<uring::Ring>>,
        op: Op,
        deadline: bool,
        done: Callback,
    ) {
        if let Err(e) = self.admit(&op) {
            done(Err(e));
            return;
        }
        let (id, ticket, submitted) = self.begin(deadline, done);
        let mut job = Job {
            id,
            submitted,
            op,
            ticket: ticket.clone(),
        };
        if let Some(ring) = ring {
            match ring.take(job) {
                Ok(()) => return,
                Err(back) => job = back,
            }
        }
        let sent = match &*lane.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        if !sent {
            self.end(id);
            ticket.complete(Err(io::Error::other(format!(
                "the queue of disk {} is stopped",
                self.name
            ))));
        }
    }

    /// Runs `op` on the calling thread, with the same bookkeeping as a queued
    /// request: it counts as pending, and the watchdog may time it out, in
    /// which case `done` runs (from the watchdog) with `TimedOut` and the
    /// late result is dropped. Blocking callers use it to save the hand-off
    /// to a worker thread.
    pub fn submit_here(&self, op: Op, deadline: bool, done: Callback) {
        if let Err(e) = self.admit(&op) {
            done(Err(e));
            return;
        }
        let (id, ticket, submitted) = self.begin(deadline, done);
        let outcome = match self.disk() {
            Some(disk) => execute_counted(&*disk, &self.stats, op, submitted),
            None => Err(self.closed()),
        };
        self.end(id);
        ticket.complete(outcome);
    }

    /// Reads `len` bytes at `offset` into `buf` on the workers, under the
    /// watchdog (`deadline`), and waits: the caller's thread never blocks in
    /// a disk that hangs, only here until the watchdog gives up on it.
    /// Returns the buffer, `len` long.
    pub fn read_into(
        &self,
        offset: u64,
        len: usize,
        buf: AlignedBuf,
        deadline: bool,
    ) -> io::Result<AlignedBuf> {
        read_data(wait(|cb| {
            self.submit(Op::ReadInto { offset, len, buf }, deadline, cb)
        }))
    }

    /// Times out the requests of this queue older than its deadline.
    /// Takes the requests past their deadline out of flight, counted and
    /// logged, each with the error to complete it with (by the caller, who
    /// may hold locks the completions must not run under).
    fn take_expired(&self) -> Vec<(Arc<Ticket>, io::Error)> {
        let timeout = self.timeout();
        let now = Instant::now();
        let expired: Vec<Arc<Ticket>> = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u64> = in_flight
                .iter()
                .filter(|(_, (start, deadline, _))| *deadline && now - *start > timeout)
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| in_flight.remove(id))
                .map(|(_, _, t)| t)
                .collect()
        };
        if expired.is_empty() {
            return Vec::new();
        }
        self.timed_out.store(true, Ordering::Relaxed);
        self.stats
            .timeouts
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        tracing::error!(disk = %self.name, count = expired.len(), "I/O timed out");
        expired
            .into_iter()
            .map(|t| {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "I/O on disk {} did not complete within {} ms",
                        self.name,
                        timeout.as_millis()
                    ),
                );
                (t, e)
            })
            .collect()
    }

    /// Stops the queue and lets its backend go: the file is closed (and its
    /// lock released) once no request holds it, which is at once unless
    /// the disk hung. Whoever still holds the queue gets errors.
    pub fn close(&self) {
        self.stop();
        self.disk.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Every worker was joined (none left in flight) unless the disk
        // hung: then its stuck requests still need their deadline.
        if !self.has_timed_out() {
            watchdog().leave(self);
        }
    }

    /// Stops accepting requests; workers finish what is queued and exit.
    /// Workers stuck in a hung disk are left behind, not joined.
    pub fn stop(&self) {
        if let Some(ring) = self.ring.get() {
            ring.stop(!self.has_timed_out());
        }
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.meta_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        if self.has_timed_out() {
            return;
        }
        let me = std::thread::current().id();
        for w in workers {
            // A worker that drops the disk's last handle in a completion
            // cannot wait for itself.
            if w.thread().id() != me {
                let _ = w.join();
            }
        }
        // An NBD export's sender has sent what was queued; their answers
        // come on other threads: waited for (within the deadline), so that
        // closing the disk does not cut off writes the server is doing.
        // Not on the completer, which brings those answers.
        if self.nbd_sender() && !crate::disk::nbd::on_completer() {
            let started = Instant::now();
            while self.pending() > 0 && started.elapsed() < self.timeout() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// A worker holds the backend for as long as it runs: [`DiskQueue::close`]
/// ends and joins the workers before it lets the backend go, so no request
/// pays for a look-up of it.
fn worker(q: Weak<DiskQueue>, disk: Arc<dyn Disk>, stats: Arc<DiskStats>, rx: Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        // Timed out while it waited behind a stuck request: its caller has
        // its answer (an error) and went on, so it is not made now (a write
        // landing after the disk was failed and taken back would undo what
        // the resync copied).
        if let Some(queue) = q.upgrade()
            && !queue.is_in_flight(job.id)
        {
            queue.end(job.id);
            continue;
        }
        let outcome = execute_counted(&*disk, &stats, job.op, job.submitted);
        if let Some(queue) = q.upgrade() {
            queue.end(job.id);
        }
        job.ticket.complete(outcome);
    }
}

/// The process's one watchdog: a thread that times out overdue requests of
/// every queue, looking every quarter of the shortest deadline. Queues join
/// it when they start and leave it when they are dropped.
struct Watchdog {
    queues: Mutex<Vec<Weak<DiskQueue>>>,
    thread: std::thread::Thread,
}

fn watchdog() -> &'static Watchdog {
    static DOG: std::sync::OnceLock<Watchdog> = std::sync::OnceLock::new();
    DOG.get_or_init(|| {
        let thread = std::thread::Builder::new()
            .name("mv-watchdog".into())
            .spawn(|| {
                loop {
                    // The queues are held only under the lock: once a queue
                    // has left ([`Watchdog::leave`]), the watchdog holds no
                    // handle to it, so its file is never closed here after
                    // its owner let go of it.
                    let (expired, tick) = {
                        let mut queues =
                            watchdog().queues.lock().unwrap_or_else(|e| e.into_inner());
                        queues.retain(|q| q.strong_count() > 0);
                        let mut expired = Vec::new();
                        let mut tick: Option<Duration> = None;
                        for q in queues.iter().filter_map(Weak::upgrade) {
                            expired.extend(q.take_expired());
                            let t = q.timeout() / 4;
                            tick = Some(tick.map_or(t, |m| m.min(t)));
                        }
                        (expired, tick.map(|t| t.max(Duration::from_millis(5))))
                    };
                    // Each expired request is answered on a thread of its
                    // own: its callback may wait on whoever waits for
                    // another expired request (an engine's failure report
                    // waits on the group's controller, which may itself
                    // wait on a config write to the same hung disk), and
                    // the watchdog must never be the one stuck between.
                    for (ticket, error) in expired {
                        let late = std::sync::Arc::new(Mutex::new(Some((ticket, error))));
                        let answer = late.clone();
                        let spawned = std::thread::Builder::new().name("mv-expired".into()).spawn(
                            move || {
                                if let Some((t, e)) =
                                    answer.lock().unwrap_or_else(|e| e.into_inner()).take()
                                {
                                    t.complete(Err(e));
                                }
                            },
                        );
                        if spawned.is_err()
                            && let Some((t, e)) =
                                late.lock().unwrap_or_else(|e| e.into_inner()).take()
                        {
                            t.complete(Err(e));
                        }
                    }
                    match tick {
                        Some(t) => std::thread::park_timeout(t),
                        // No queue: nothing to watch until one starts.
                        None => std::thread::park(),
                    }
                }
            })
            .expect("spawn the watchdog")
            .thread()
            .clone();
        Watchdog {
            queues: Mutex::new(Vec::new()),
            thread,
        }
    })
}

impl Watchdog {
    fn watch(&self, queue: &Arc<DiskQueue>) {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(queue));
        // A new, shorter deadline takes effect at once.
        self.thread.unpark();
    }

    /// Stops watching `queue`; when this returns the watchdog holds no
    /// handle to it.
    fn leave(&self, queue: &DiskQueue) {
        let target: *const DiskQueue = queue;
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|q| !std::ptr::eq(q.as_ptr(), target) && q.strong_count() > 0);
    }
}

/// A disk whose every request goes through its queue, under the queue's
/// deadline: labels, config slots and bitmaps take the path the data takes,
/// so a disk that hangs during a config commit or a bitmap write is timed
/// out like one that hangs under a data write, and no caller waits on it
/// longer than the deadline.
#[derive(Debug)]
pub struct QueuedDisk {
    queue: Arc<DiskQueue>,
    /// The disk's own handle (not a view of a queue owned elsewhere):
    /// dropping it stops the queue and waits for its workers, so that when
    /// a group lets its disks go every file is closed, and its lock
    /// released, before the next open of the same path.
    owner: bool,
    /// Requests carry the queue's deadline (all but [`QueuedDisk::patient`]).
    deadline: bool,
}

impl Drop for QueuedDisk {
    fn drop(&mut self) {
        if self.owner {
            self.queue.close();
        }
    }
}

impl QueuedDisk {
    /// Starts the queue of `disk` (see [`DiskQueue::start`]).
    pub fn start(
        name: &str,
        disk: Arc<dyn Disk>,
        threads: usize,
        timeout: Duration,
    ) -> Arc<QueuedDisk> {
        QueuedDisk::start_on(name, disk, threads, timeout, IoEngine::Threads)
    }

    /// [`QueuedDisk::start`] on the backend `engine` (see
    /// [`DiskQueue::start_on`]).
    pub fn start_on(
        name: &str,
        disk: Arc<dyn Disk>,
        threads: usize,
        timeout: Duration,
        engine: IoEngine,
    ) -> Arc<QueuedDisk> {
        Arc::new(QueuedDisk {
            queue: DiskQueue::start_on(name, disk, threads, timeout, engine),
            owner: true,
            deadline: true,
        })
    }

    /// The disk of a queue already started, as a [`Disk`] whose requests go
    /// through that queue under its deadline.
    pub fn over(queue: Arc<DiskQueue>) -> QueuedDisk {
        QueuedDisk {
            queue,
            owner: false,
            deadline: true,
        }
    }

    /// The disk of a queue already started, whose requests have no
    /// deadline: they wait as long as the disk takes. Only for what a
    /// volume's last in-sync copy needs (its write-intent bits), which has
    /// no other disk to turn to.
    pub fn patient(queue: Arc<DiskQueue>) -> QueuedDisk {
        QueuedDisk {
            queue,
            owner: false,
            deadline: false,
        }
    }

    /// The queue every request goes through.
    pub fn queue(&self) -> &Arc<DiskQueue> {
        &self.queue
    }

    /// The backend under the queue, until it closes.
    pub fn raw(&self) -> Option<Arc<dyn Disk>> {
        self.queue.disk()
    }

    fn run(&self, op: Op) -> Outcome {
        wait(|cb| self.queue.submit_meta(op, self.deadline, cb))
    }
}

impl Disk for QueuedDisk {
    fn size(&self) -> u64 {
        self.queue.size
    }

    fn sector_size(&self) -> u32 {
        self.queue.sector_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let got = read_data(self.run(Op::Read {
            offset,
            len: buf.len(),
        }))?;
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn read_fresh(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let got = read_data(self.run(Op::ReadFresh {
            offset,
            len: buf.len(),
        }))?;
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let data = Arc::new(AlignedBuf::from_slice(buf));
        self.run(Op::Write {
            offset,
            data,
            fua: false,
        })
        .map(|_| ())
    }

    fn flush(&self) -> io::Result<()> {
        self.run(Op::Flush).map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(Op::WriteZeroes {
            offset,
            len,
            fua: false,
            keep: false,
        })
        .map(|_| ())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(Op::WriteZeroes {
            offset,
            len,
            fua: false,
            keep: true,
        })
        .map(|_| ())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(Op::Discard { offset, len }).map(|_| ())
    }

    fn identity(&self) -> crate::disk::DiskIdentity {
        self.queue.disk().map(|d| d.identity()).unwrap_or_default()
    }

    fn health(&self) -> io::Result<()> {
        self.run(Op::Check).map(|_| ())
    }

    /// On the backend itself, not through the queue (whose workers may
    /// still be waiting out the broken connections).
    fn reconnect(
        &self,
        check: &dyn Fn(&dyn crate::disk::Disk) -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        let r = self.queue.disk()?.reconnect(check)?;
        if r.is_ok() {
            self.queue.answered_again();
        }
        Some(r)
    }

    fn write_all_then_flush(&self, writes: &[(u64, &[u8])], flush: bool) -> io::Result<()> {
        let writes = writes
            .iter()
            .map(|(o, d)| (*o, AlignedBuf::from_slice(d)))
            .collect();
        self.run(Op::WriteMany { writes, flush }).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{FaultyDisk, MemDisk};
    use std::sync::mpsc;

    fn wait(q: &DiskQueue, op: Op, deadline: bool) -> Outcome {
        let (tx, rx) = mpsc::channel();
        q.submit(
            op,
            deadline,
            Box::new(move |o| {
                let _ = tx.send(o);
            }),
        );
        rx.recv().unwrap()
    }

    #[test]
    fn requests_complete_with_their_results() {
        let q = DiskQueue::start(
            "mem",
            Arc::new(MemDisk::new(1 << 20)),
            4,
            DEFAULT_IO_TIMEOUT,
        );
        let data = Arc::new(AlignedBuf::from_slice(&[3u8; 4096]));
        wait(
            &q,
            Op::Write {
                offset: 8192,
                data,
                fua: true,
            },
            true,
        )
        .unwrap();
        let got = wait(
            &q,
            Op::Read {
                offset: 8192,
                len: 4096,
            },
            true,
        )
        .unwrap();
        assert_eq!(&got.unwrap()[..], &[3u8; 4096][..]);
        assert!(
            wait(
                &q,
                Op::Read {
                    offset: 1 << 20,
                    len: 1
                },
                true
            )
            .is_err()
        );
        assert_eq!(q.pending(), 0);
        q.stop();
    }

    #[test]
    fn stats_count_bytes_requests_and_errors_of_both_paths() {
        let q = DiskQueue::start(
            "mem",
            Arc::new(MemDisk::new(1 << 20)),
            2,
            DEFAULT_IO_TIMEOUT,
        );
        let data = Arc::new(AlignedBuf::from_slice(&[7u8; 8192]));
        let write = Op::Write {
            offset: 0,
            data,
            fua: false,
        };
        wait(&q, write, true).unwrap();
        let read = Op::Read {
            offset: 0,
            len: 4096,
        };
        wait(&q, read, true).unwrap();
        q.submit_here(Op::Flush, true, Box::new(|o| assert!(o.is_ok())));
        let zeroes = Op::WriteZeroes {
            offset: 4096,
            len: 4096,
            fua: false,
            keep: false,
        };
        wait(&q, zeroes, true).unwrap();
        let beyond = Op::Read {
            offset: 1 << 20,
            len: 512,
        };
        assert!(wait(&q, beyond, true).is_err());
        let s = q.stats();
        let count = |k: OpKind| s.ops(k);
        assert_eq!(s.written_bytes.load(Ordering::Relaxed), 8192);
        assert_eq!(s.read_bytes.load(Ordering::Relaxed), 4096);
        assert_eq!(s.zeroed_bytes.load(Ordering::Relaxed), 4096);
        assert_eq!(
            OpKind::ALL.map(count),
            [2, 1, 1, 1],
            "read, write, flush, zeroes"
        );
        assert_eq!(s.errors.load(Ordering::Relaxed), 1);
        assert_eq!(s.timeouts.load(Ordering::Relaxed), 0);
        q.stop();
    }

    #[test]
    fn a_hung_request_times_out_and_its_late_completion_is_ignored() {
        let disk = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(1 << 20))));
        let q = DiskQueue::start("hung", disk.clone(), 2, Duration::from_millis(40));
        disk.hang();
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let c = calls.clone();
        q.submit(
            Op::Read {
                offset: 0,
                len: 512,
            },
            true,
            Box::new(move |o| {
                c.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(o);
            }),
        );
        let err = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(q.has_timed_out());
        assert_eq!(q.stats().timeouts.load(Ordering::Relaxed), 1);
        // Given up on, but still in the disk: owed until it returns.
        assert_eq!(q.owed(), 1);
        disk.release();
        let returned = Instant::now();
        while q.owed() > 0 {
            assert!(
                returned.elapsed() < Duration::from_secs(5),
                "the request the disk hung in never ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(q.pending(), 0);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn requests_without_deadline_wait_for_a_slow_disk() {
        let disk = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(1 << 20))));
        let q = DiskQueue::start("slow", disk.clone(), 2, Duration::from_millis(20));
        disk.hang();
        let (tx, rx) = mpsc::channel();
        q.submit(
            Op::Read {
                offset: 0,
                len: 512,
            },
            false,
            Box::new(move |o| {
                let _ = tx.send(o);
            }),
        );
        assert!(rx.recv_timeout(Duration::from_millis(150)).is_err());
        disk.release();
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap().is_ok());
    }

    #[test]
    fn metadata_io_on_a_hung_disk_times_out_instead_of_waiting() {
        let disk = Arc::new(FaultyDisk::new(Arc::new(MemDisk::new(1 << 20))));
        let q = QueuedDisk::start("hung", disk.clone(), 2, Duration::from_millis(50));
        q.write_at(&[9u8; 512], 4096).unwrap();
        disk.hang();
        let start = Instant::now();
        let err = q.write_at(&[1u8; 512], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let mut buf = [0u8; 512];
        assert_eq!(
            q.read_at(&mut buf, 4096).unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        assert!(q.flush().is_err());
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        disk.release();
        q.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [9u8; 512]);
    }

    /// A queue still held elsewhere (a bitmap's view, an engine) after its
    /// owner let go does not keep the file open: the next open of the
    /// same path, which takes the file's lock, succeeds at once.
    #[test]
    fn closing_the_owner_lets_the_file_go_while_the_queue_is_still_held() {
        use crate::disk::{FileDisk, OpenOptions};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let opts = OpenOptions {
            lock: true,
            ..OpenOptions::default()
        };
        let owner = QueuedDisk::start(
            "d.img",
            Arc::new(FileDisk::open(&path, opts).unwrap()),
            2,
            Duration::from_secs(5),
        );
        let view = owner.queue().clone();
        assert!(FileDisk::open(&path, opts).is_err(), "locked while open");
        drop(owner);
        FileDisk::open(&path, opts).expect("the file was let go with its owner");
        // The view only gets errors now.
        let (tx, rx) = std::sync::mpsc::channel();
        view.submit(
            Op::Flush,
            true,
            Box::new(move |o| tx.send(o.is_err()).unwrap()),
        );
        assert!(rx.recv().unwrap(), "a closed queue answers with an error");
    }
}
