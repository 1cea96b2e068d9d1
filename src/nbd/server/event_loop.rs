//! The transmission phase of plain connections on a few threads: after its
//! handshake (on a thread of its own, with its deadline), a connection
//! without TLS is handed to the loop with the fewest connections. A loop
//! is one thread turning one io_uring of its own, as qemu-nbd's main loop
//! does: the polls of its connections' sockets (to read requests, and for
//! room to send what a socket did not take whole) sit in the same ring as
//! the disk requests those connections start, so one wake-up of the
//! thread serves whatever is ready on any of them, and a request costs no
//! hand-off between threads. With a thread per connection, four clients
//! meant four threads waking once per event each.
//!
//! A loop never blocks: a request header waits in the connection's buffer
//! while the connection has no room in flight (its socket is read only
//! until that buffer is full, so the client is held back by TCP or the
//! Unix socket), a
//! write's payload is read as it comes, and replies completed on other
//! threads (a read retried on another plex, the workers of the threads
//! engine) are queued for the loop, which is woken to send them.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::{
    Answer, Behind, ConnError, DecodeRequest, Export, InFlight, MAX_DISCARD, Out, Plan, Replies,
    Session, Shared, Sock, Wire, WireState, lock, plan, start, too_large_to_skip,
};
use crate::disk::AlignedBuf;
use crate::nbd::proto::{self, Decoded};

/// Bytes of requests read ahead of their start, per connection.
const INPUT: usize = 256 * 1024;
/// How often a connection held back by the server's whole budget (which
/// other loops' replies free) looks again.
const BUDGET_RETRY: Duration = Duration::from_millis(5);
/// The token of a loop's own wake-up poll (connections have 2 × id and
/// 2 × id + 1).
const WAKE: u64 = (1 << 62) - 1;

thread_local! {
    /// The loop this thread runs (0: none).
    static LOOP: Cell<usize> = const { Cell::new(0) };
}

/// Wakes a loop from another thread: an eventfd in its ring.
pub(super) struct Waker {
    id: usize,
    fd: OwnedFd,
    woken: AtomicBool,
}

impl Waker {
    fn new(id: usize) -> io::Result<Waker> {
        // SAFETY: eventfd takes integers and returns a new descriptor.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            id,
            // SAFETY: `fd` was just made and is owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            woken: AtomicBool::new(false),
        })
    }

    /// Whether the calling thread is this waker's loop.
    pub(super) fn here(&self) -> bool {
        LOOP.get() == self.id
    }

    /// Wakes the loop (one system call until it has looked).
    pub(super) fn wake(&self) {
        if !self.woken.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from `one` to the eventfd it owns.
            unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Called by the loop when its poll fired, before it looks at what it
    /// was woken for: the next wake writes again. The count is read first:
    /// a wake between the two then either is seen by the loop's look or
    /// writes again (cleared first, a wake's write could be read here and
    /// the flag stay set, and no wake would ever write again).
    fn clear(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads at most 8 bytes into `n`; the eventfd is
        // non-blocking.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        self.woken.store(false, Ordering::SeqCst);
    }
}

/// A connection handed to a loop after its handshake.
pub(super) struct Adopted {
    pub(super) id: u64,
    pub(super) sock: Sock,
    pub(super) export: Arc<dyn Export>,
    pub(super) session: Session,
    /// What the client sent after its handshake and was read already.
    pub(super) buffered: Vec<u8>,
}

/// One loop: its thread takes connections from `inbox`.
pub(super) struct Handle {
    waker: Arc<Waker>,
    inbox: Mutex<Vec<Adopted>>,
    serving: AtomicUsize,
    stop: AtomicBool,
}

/// The server's loops, started as connections come.
pub(super) struct Loops {
    max: usize,
    loops: Mutex<Vec<Arc<Handle>>>,
    /// A loop could not be started: connections keep a thread each.
    broken: AtomicBool,
}

impl Loops {
    /// Up to `max` loops (none: every connection keeps its thread).
    pub(super) fn new(max: usize) -> Loops {
        Loops {
            max,
            loops: Mutex::new(Vec::new()),
            broken: AtomicBool::new(false),
        }
    }

    /// The loop for the next connection: the one with the fewest, or a
    /// new one while there are fewer than `max` and each has some. None:
    /// no loops, or none could be started (connections keep a thread).
    pub(super) fn pick(&self, shared: &Arc<Shared>) -> Option<Arc<Handle>> {
        if self.max == 0 || self.broken.load(Ordering::SeqCst) {
            return None;
        }
        let mut loops = lock(&self.loops);
        let least = loops
            .iter()
            .min_by_key(|h| h.serving.load(Ordering::SeqCst))
            .cloned();
        let handle = match least {
            Some(h) if h.serving.load(Ordering::SeqCst) == 0 || loops.len() >= self.max => h,
            _ => match start_loop(Arc::downgrade(shared)) {
                Ok(h) => {
                    loops.push(h.clone());
                    h
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no event loop for NBD connections; each keeps a thread");
                    self.broken.store(true, Ordering::SeqCst);
                    return None;
                }
            },
        };
        // Counted now, so the next pick sees it.
        handle.serving.fetch_add(1, Ordering::SeqCst);
        Some(handle)
    }
}

impl Handle {
    /// Hands the loop a connection [`Loops::pick`] chose it for.
    pub(super) fn adopt(&self, conn: Adopted) {
        lock(&self.inbox).push(conn);
        self.waker.wake();
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for h in lock(&self.loops).drain(..) {
            h.stop.store(true, Ordering::SeqCst);
            h.waker.wake();
        }
    }
}

/// Starts a loop's thread, once it has its ring.
fn start_loop(shared: Weak<Shared>) -> io::Result<Arc<Handle>> {
    // Unique in the process: a thread knows its loop by it.
    static IDS: AtomicUsize = AtomicUsize::new(1);
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    let handle = Arc::new(Handle {
        waker: Arc::new(Waker::new(id)?),
        inbox: Mutex::new(Vec::new()),
        serving: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = handle.clone();
    std::thread::Builder::new()
        .name(format!("nbd-loop-{id}"))
        .spawn(move || {
            LOOP.set(id);
            if !crate::volume::queue::ensure_ring_here() {
                let _ = ready_tx.send(false);
                return;
            }
            let _ = ready_tx.send(true);
            crate::volume::queue::run_here(|| run(&h, &shared));
            // What a hung disk still has in the loop's ring is seen to end
            // if it answers soon (nothing joins a loop).
            crate::volume::queue::drain_here(crate::volume::queue::LEFTOVER_WAIT);
        })?;
    match ready_rx.recv() {
        Ok(true) => Ok(handle),
        _ => Err(io::Error::other("the kernel refused the loop an io_uring")),
    }
}

/// A connection a loop serves.
struct LoopConn {
    id: u64,
    sock: Sock,
    fd: RawFd,
    export: Arc<dyn Export>,
    session: Session,
    negotiated: proto::Negotiated,
    decode: DecodeRequest,
    replies: Arc<Replies>,
    inflight: Arc<InFlight>,
    /// Bytes read and not yet taken: `input[start..end]`.
    input: Box<[u8]>,
    start: usize,
    end: usize,
    /// A write whose payload is being read.
    write: Option<Payload>,
    /// Bytes of a refused write's payload still to drop.
    skip: u64,
    /// A request waits for room in flight.
    blocked: bool,
    /// The last read got bytes: the next is tried before the socket is
    /// polled (a client in a burst has usually sent more by then).
    hot: bool,
    /// Nothing more is read: the client hung up, said goodbye, or broke
    /// the protocol (`error`).
    eof: bool,
    error: Option<ConnError>,
}

/// A write's payload as it arrives.
struct Payload {
    command: proto::Command,
    answer: Answer,
    bytes: u64,
    data: AlignedBuf,
    filled: usize,
}

impl LoopConn {
    fn new(a: Adopted, shared: &Shared, waker: &Arc<Waker>) -> io::Result<LoopConn> {
        let inflight = Arc::new(InFlight {
            state: Mutex::new(Default::default()),
            changed: Default::default(),
            budget: shared.budget.clone(),
        });
        let replies = Arc::new(Replies {
            behind: Behind::Loop(waker.clone()),
            wire: Arc::new(Wire {
                out: Out::Plain(a.sock.try_clone()?),
                state: Mutex::new(WireState::default()),
            }),
            inflight: inflight.clone(),
            stall: shared.limits.reply_timeout,
        });
        let mut input = vec![0u8; INPUT.max(a.buffered.len())].into_boxed_slice();
        input[..a.buffered.len()].copy_from_slice(&a.buffered);
        let fd = a.sock.raw_fd();
        let (decode, _) = a.session.decoder();
        Ok(LoopConn {
            id: a.id,
            fd,
            negotiated: a.session.negotiated(),
            decode,
            sock: a.sock,
            export: a.export,
            session: a.session,
            replies,
            inflight,
            end: a.buffered.len(),
            input,
            start: 0,
            write: None,
            skip: 0,
            blocked: false,
            hot: true,
            eof: false,
            error: None,
        })
    }

    /// Starts the requests read so far, as far as the connection's room in
    /// flight goes.
    fn parse(&mut self) {
        self.blocked = false;
        if !self.eof && self.replies.wire.state.try_lock().is_ok_and(|w| w.broken) {
            // The socket failed (or was shut from outside): what is
            // buffered is not started, and nothing more is read.
            self.eof = true;
            self.start = self.end;
            self.skip = 0;
        }
        while self.error.is_none() {
            let avail = self.end - self.start;
            if self.skip > 0 {
                let n = (avail as u64).min(self.skip);
                self.start += n as usize;
                self.skip -= n;
                if self.skip > 0 {
                    return;
                }
                continue;
            }
            if self.eof && self.start == self.end && self.write.is_some() {
                // Cut off in its payload: never started (see `done`).
                return;
            }
            if let Some(w) = &mut self.write {
                let n = avail.min(w.data.len() - w.filled);
                w.data[w.filled..w.filled + n]
                    .copy_from_slice(&self.input[self.start..self.start + n]);
                w.filled += n;
                self.start += n;
                if w.filled < w.data.len() {
                    return;
                }
                let w = self.write.take().expect("just seen");
                start_now(
                    &self.export,
                    &self.session,
                    w.command,
                    w.answer,
                    w.bytes,
                    Some(w.data),
                    self.start < self.end,
                );
                continue;
            }
            let (req, used) = match (self.decode)(&self.input[self.start..self.end]) {
                Ok(Decoded::NeedMore(_)) => return,
                Ok(Decoded::Done(req, used)) => (req, used),
                Err(e) => {
                    self.error = Some(e.into());
                    return;
                }
            };
            let command = proto::classify(&req, self.export.size(), &self.negotiated);
            match plan(
                &command,
                &*self.export,
                req.payload_len(self.session.extended),
            ) {
                Plan::Disconnect => {
                    self.eof = true;
                    self.start = self.end;
                    return;
                }
                Plan::Refuse { errno, why, skip } => {
                    if skip > MAX_DISCARD {
                        self.error = Some(too_large_to_skip(skip));
                        return;
                    }
                    if !self.inflight.try_acquire(0) {
                        self.blocked = true;
                        return;
                    }
                    self.start += used;
                    self.skip = skip;
                    Answer::new(&self.replies, &self.session, &req).error(errno, why, Some(0));
                }
                Plan::Start { bytes, payload } => {
                    if !self.inflight.try_acquire(bytes) {
                        self.blocked = true;
                        return;
                    }
                    self.start += used;
                    let answer = Answer::new(&self.replies, &self.session, &req);
                    if payload > 0 {
                        self.write = Some(Payload {
                            command,
                            answer,
                            bytes,
                            data: AlignedBuf::recycled(payload),
                            filled: 0,
                        });
                    } else {
                        let more = self.start < self.end;
                        start_now(
                            &self.export,
                            &self.session,
                            command,
                            answer,
                            bytes,
                            None,
                            more,
                        );
                    }
                }
            }
        }
    }

    /// Whether the socket is to be read: not after the end, and while the
    /// buffer (or a write's payload) has room.
    fn wants_input(&self) -> bool {
        !self.eof
            && self.error.is_none()
            && (self.end < self.input.len() || self.start > 0 || self.write.is_some())
    }

    /// Reads what the socket holds (it polled readable).
    fn read_input(&mut self) {
        if !self.wants_input() {
            return;
        }
        let got = if let Some(w) = self
            .write
            .as_mut()
            .filter(|w| self.start == self.end && w.filled < w.data.len())
        {
            // A payload larger than what is buffered goes straight into its
            // buffer.
            let r = recv(self.fd, &mut w.data[w.filled..]);
            if let Ok(n) = r {
                w.filled += n;
            }
            r
        } else {
            if self.start > 0 {
                self.input.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.input.len() {
                // Full: read again once requests have taken some.
                return;
            }
            let r = recv(self.fd, &mut self.input[self.end..]);
            if let Ok(n) = r {
                self.end += n;
            }
            r
        };
        self.hot = matches!(got, Ok(n) if n > 0);
        match got {
            Ok(0) => self.eof = true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                self.eof = true;
                self.error = Some(e.into());
            }
        }
    }

    /// Whether the connection is over: nothing more to read, and every
    /// request it started answered (or its reply dropped).
    fn done(&mut self) -> bool {
        if !(self.eof || self.error.is_some()) {
            return false;
        }
        if let Some(w) = self.write.take() {
            // Cut off in its payload: never started.
            self.inflight.release(w.bytes);
        }
        // Every reply holds a share until it is written (refusals one of no
        // bytes), so nothing is held once none is in flight; the second
        // test only makes sure.
        lock(&self.inflight.state).requests == 0 && !lock(&self.replies.wire.state).held
    }

    /// Closes the connection and takes it off the server's list.
    fn finish(self, shared: &Weak<Shared>) {
        self.sock.shutdown(Shutdown::Both);
        if let Some(e) = &self.error {
            tracing::info!(connection = self.id, error = %e, "connection closed");
        }
        if let Some(shared) = shared.upgrade() {
            let mut conns = lock(&shared.conns);
            conns.remove(&self.id);
            shared.idle.notify_all();
        }
    }
}

/// Starts a request; with `more` read behind it, its disk requests go to
/// the kernel at once, as qemu-nbd submits each request, rather than with
/// the others read in the same turn at its end. A turn's batch reached the
/// disk in one burst and came back in one: held to 32 in flight, the disk
/// then had fewer in hand between the bursts. Measured with fio over NBD
/// (QD 32, O_DIRECT, medians of 4 alternating runs): random reads 52.3k ->
/// 62.2k IOPS, random writes 45.6k -> 60.7k. The last request read goes
/// with the turn's wait, in the same system call (at QD 1, one call per
/// request instead of two).
#[allow(clippy::too_many_arguments)]
fn start_now(
    export: &Arc<dyn Export>,
    session: &Session,
    command: proto::Command,
    answer: Answer,
    bytes: u64,
    data: Option<AlignedBuf>,
    more: bool,
) {
    start(export, session, command, answer, bytes, data);
    if more {
        crate::volume::queue::submit_here();
    }
}

/// Receives what the socket holds, without waiting.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receives at most `buf.len()` bytes into `buf`, alive and
    // writable for the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn min_timeout(a: Option<Duration>, b: Duration) -> Option<Duration> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// A loop's connections. Should the loop's thread end without finishing
/// them (a panic), they are shut and taken off the server's list, so that
/// nothing waits for them.
struct Served<'a> {
    conns: HashMap<u64, LoopConn>,
    shared: &'a Weak<Shared>,
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        for (_, c) in self.conns.drain() {
            c.finish(self.shared);
        }
    }
}

/// A loop's thread: takes the connections handed to it, and turns its ring
/// until it is stopped with none left.
fn run(handle: &Arc<Handle>, shared: &Weak<Shared>) {
    let waker = &handle.waker;
    let mut served = Served {
        conns: HashMap::new(),
        shared,
    };
    // What this thread starts for the disks' rings goes in one system call
    // per turn.
    let plug = crate::volume::queue::Plug::new();
    let mut polls = Vec::new();
    let mut ended = Vec::new();
    loop {
        let adopted = std::mem::take(&mut *lock(&handle.inbox));
        for a in adopted {
            let id = a.id;
            let made = shared
                .upgrade()
                .ok_or_else(|| io::Error::other("the server is gone"))
                .and_then(|s| LoopConn::new(a, &s, waker));
            match made {
                Ok(c) => {
                    served.conns.insert(id, c);
                }
                Err(e) => {
                    tracing::info!(connection = id, error = %e, "connection closed");
                    handle.serving.fetch_sub(1, Ordering::SeqCst);
                    if let Some(s) = shared.upgrade() {
                        lock(&s.conns).remove(&id);
                        s.idle.notify_all();
                    }
                }
            }
        }
        let stopping = handle.stop.load(Ordering::SeqCst);
        polls.clear();
        polls.push((waker.fd.as_raw_fd(), libc::POLLIN as u32, WAKE));
        let mut timeout = None;
        for (id, c) in served.conns.iter_mut() {
            if stopping && !c.eof {
                c.sock.shutdown(Shutdown::Both);
            }
            // What the socket took since the last turn gives back shares
            // first: the requests waiting for them start now.
            c.replies.progress();
            c.parse();
            if c.hot && c.wants_input() {
                c.read_input();
                c.parse();
            }
            if let Some((fd, left)) = c.replies.progress() {
                if let Some(fd) = fd {
                    polls.push((fd, libc::POLLOUT as u32, 2 * id + 1));
                }
                timeout = min_timeout(timeout, left);
            }
            if c.wants_input() {
                polls.push((c.fd, libc::POLLIN as u32, 2 * id));
            }
            if c.blocked {
                timeout = min_timeout(timeout, BUDGET_RETRY);
            }
            if c.done() {
                ended.push(*id);
            }
        }
        for id in ended.drain(..) {
            if let Some(c) = served.conns.remove(&id) {
                c.finish(shared);
                handle.serving.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if stopping && served.conns.is_empty() && lock(&handle.inbox).is_empty() {
            return;
        }
        plug.flush();
        for token in crate::volume::queue::turn_polls(&polls, timeout) {
            if token == WAKE {
                waker.clear();
            } else if token % 2 == 0
                && let Some(c) = served.conns.get_mut(&(token / 2))
            {
                c.read_input();
            }
        }
    }
}
