//! Many requests in flight on one NBD connection.
//!
//! A [`Session`] takes a connection out of the handshake ([`Client`]) and
//! lets any number of threads send requests on it at once: each request
//! gets its own handle and goes out whole under the writing side's lock;
//! one reader thread per connection reads the replies as they come, in
//! whatever order the server sends them, and hands each to the thread
//! waiting for it. Structured replies are read when the handshake
//! negotiated them: a read's data may then come in chunks, holes as
//! zeroes, and an error chunk carries the errno.
//!
//! Everything the server sends is checked before it is believed: a reply
//! to a handle that was not asked, a chunk outside its request, a read
//! whose chunks do not cover it exactly, an unknown reply type: each ends
//! the connection with `InvalidData`, never a panic. A connection that
//! ends (EOF, reset, a protocol error, or no answer to its oldest request
//! within the timeout) fails every request on it, and every one after.
//!
//! A connection given up on ([`Session::abandon`]: the disk failed) fails
//! its requests at once but goes on reading what the server still owes:
//! a write the server has in hand may yet be done, and the caller must
//! not take the disk back before it is ([`Session::drained`]: every
//! request answered, or the server closed the connection).

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::client::Client;
use super::conn::Conn;
use super::proto::{self, Request, be_u16, be_u32, be_u64};
use super::server::Sock;

/// What a request was answered with.
#[derive(Debug)]
pub struct Answer {
    /// The NBD error value (0: success).
    pub errno: u32,
    /// A successful read's bytes.
    pub data: Option<Vec<u8>>,
    /// A block status's extents of `base:allocation`: (length, flags),
    /// in order from the request's offset.
    pub extents: Vec<(u64, u32)>,
}

/// A request sent and not yet answered: [`Ticket::wait`] for its answer.
pub struct Ticket {
    rx: Receiver<io::Result<Answer>>,
    session: Arc<Inner>,
}

impl Ticket {
    /// Waits for the answer; an `Err` is the connection's failure.
    pub fn wait(self) -> io::Result<Answer> {
        match self.rx.recv() {
            Ok(r) => r,
            // Dropped unanswered by a reader that is ending the connection:
            // it says why in a moment.
            Err(_) => {
                let start = Instant::now();
                while self.session.lock().ended.is_none()
                    && start.elapsed() < Duration::from_secs(1)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(self.session.failure())
            }
        }
    }
}

/// One connection in the transmission phase, shared by many threads.
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    /// The writing side: one whole request at a time.
    writer: Mutex<Conn>,
    /// A handle on the socket to shut it down from any thread.
    control: Conn,
    state: Mutex<State>,
    /// The reader thread has stopped.
    reader_done: std::sync::atomic::AtomicBool,
    structured: bool,
    /// The `base:allocation` context's id, when the server agreed to it.
    allocation: Option<u32>,
    /// How long a request may wait for its answer: nanoseconds.
    timeout: std::sync::atomic::AtomicU64,
    size: u64,
    flags: u16,
}

struct State {
    next_handle: u64,
    pending: HashMap<u64, Pending>,
    /// Why the connection ended, once it has: (kind, message).
    ended: Option<(io::ErrorKind, String)>,
    /// Given up on, still reading the answers the server owes.
    abandoned: bool,
}

struct Pending {
    kind: u16,
    offset: u64,
    len: u32,
    sent: Instant,
    /// A read's buffer; out of the map while the reader fills it.
    data: Option<Vec<u8>>,
    /// The ranges (offset within the request, length) its chunks covered.
    covered: Vec<(u64, u64)>,
    /// A block status's extents, as they came.
    extents: Vec<(u64, u32)>,
    /// The first error a chunk reported.
    errno: u32,
    /// Its waiter was failed already (the connection was abandoned).
    failed_early: bool,
    reply: Reply,
}

/// What runs with a request's answer ([`Session::send_then`]).
pub type Then = Box<dyn FnOnce(io::Result<Answer>) + Send>;

/// A request's answer with what runs with it, for the thread that runs it.
pub struct Finished {
    then: Then,
    answer: io::Result<Answer>,
}

impl Finished {
    /// `then` with `answer`, for the thread that runs it.
    pub fn new(then: Then, answer: io::Result<Answer>) -> Finished {
        Finished { then, answer }
    }

    pub fn run(self) {
        (self.then)(self.answer)
    }
}

/// Where a request's answer goes: to the thread waiting on its ticket, or
/// with its continuation to a channel another thread empties. Either way
/// the reader only sends: nothing runs on it, and a send never blocks (it
/// may be made under the connection's lock).
enum Reply {
    Wait(Sender<io::Result<Answer>>),
    Then(Sender<Finished>, Option<Then>),
}

/// A request dropped unanswered (a path that forgot to answer it) still
/// runs what waits for its answer, with an error: a continuation left
/// unrun would leave its request counted in for good.
impl Drop for Reply {
    fn drop(&mut self) {
        if let Reply::Then(_, Some(_)) = self {
            self.give(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the request was dropped unanswered",
            )));
        }
    }
}

impl Reply {
    fn give(&mut self, answer: io::Result<Answer>) {
        match self {
            Reply::Wait(tx) => {
                let _ = tx.try_send(answer);
            }
            Reply::Then(tx, then) => {
                if let Some(then) = then.take() {
                    // The channel outlives its senders' requests: each
                    // request holds one, so this never finds it closed.
                    let _ = tx.send(Finished { then, answer });
                }
            }
        }
    }
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// The longest block status chunk taken: 64 Ki extents (a server may
/// answer a long range with many).
const MAX_STATUS: u32 = 4 + 8 * 65536;

/// The longest non-data structured chunk a reply may carry: an error's
/// message is at most 4096 bytes by the specification.
const MAX_CHUNK: u32 = 4096 + 64;

impl Session {
    /// Starts the reader of `client`'s connection; requests wait at most
    /// `timeout` for the server (an older one unanswered ends the
    /// connection).
    pub fn start(client: Client, timeout: Duration) -> io::Result<Session> {
        let (sock, size, flags, structured, allocation) = client.into_parts();
        // The reader wakes this often to see whether a request is overdue.
        let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let reading = sock.try_clone()?;
        reading.set_read_timeout(Some(tick))?;
        let control = sock.try_clone()?;
        sock.set_write_timeout(Some(timeout))?;
        if let Sock::Tcp(t) = sock.sock() {
            keepalive(t, timeout);
        }
        let inner = Arc::new(Inner {
            writer: Mutex::new(sock),
            control,
            state: Mutex::new(State {
                next_handle: 1,
                pending: HashMap::new(),
                ended: None,
                abandoned: false,
            }),
            reader_done: std::sync::atomic::AtomicBool::new(false),
            structured,
            allocation,
            timeout: std::sync::atomic::AtomicU64::new(nanos(timeout)),
            size,
            flags,
        });
        let reader = Reader {
            sock: reading,
            inner: inner.clone(),
            buffered: vec![0; READ_AHEAD],
            at: 0,
            end: 0,
        };
        std::thread::Builder::new()
            .name("mv-nbd-reply".into())
            .spawn(move || reader.run())?;
        Ok(Session { inner })
    }

    /// The export's size as the server advertised it.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The transmission flags the server advertised.
    pub fn flags(&self) -> u16 {
        self.inner.flags
    }

    /// Whether the handshake negotiated structured replies.
    pub fn structured(&self) -> bool {
        self.inner.structured
    }

    /// Whether the server agreed to say where the export's holes are
    /// (`base:allocation`): an NBD_CMD_BLOCK_STATUS is answered with its
    /// extents in [`Answer::extents`].
    pub fn knows_allocation(&self) -> bool {
        self.inner.allocation.is_some()
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().pending.len()
    }

    /// Why the connection ended, if it has.
    pub fn ended(&self) -> Option<io::Error> {
        let state = self.inner.lock();
        state
            .ended
            .as_ref()
            .map(|(kind, why)| io::Error::new(*kind, why.clone()))
    }

    /// Sends one request (`data`: a WRITE's bytes, `len` long) and returns
    /// at once; the answer comes through the ticket.
    pub fn send(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<Ticket> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.make(kind, flags, offset, len, data, Reply::Wait(tx))
            .map_err(|(e, _)| e)?;
        Ok(Ticket {
            rx,
            session: self.inner.clone(),
        })
    }

    /// Sends one request and returns at once; `then` runs with its answer
    /// (or the connection's failure, also when it cannot be sent), on the
    /// thread that empties `to`: never on the caller's, never on the
    /// reader's.
    pub fn send_then(
        &self,
        (kind, flags, offset, len, data): (u16, u16, u64, u32, &[u8]),
        to: &Sender<Finished>,
        then: Then,
    ) {
        if let Err((e, reply)) = self.make(
            kind,
            flags,
            offset,
            len,
            data,
            Reply::Then(to.clone(), Some(then)),
        ) {
            let mut reply = reply;
            reply.give(Err(e));
        }
    }

    /// Books a request in and writes it out; a request that cannot be made
    /// comes back with its reply, unanswered.
    fn make(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        reply: Reply,
    ) -> Result<(), (io::Error, Reply)> {
        let inner = &self.inner;
        let handle = {
            let mut state = inner.lock();
            if let Some((kind, why)) = &state.ended {
                return Err((io::Error::new(*kind, why.clone()), reply));
            }
            let handle = state.next_handle;
            state.next_handle += 1;
            let data = (kind == proto::CMD_READ).then(|| vec![0u8; len as usize]);
            state.pending.insert(
                handle,
                Pending {
                    kind,
                    offset,
                    len,
                    sent: Instant::now(),
                    data,
                    covered: Vec::new(),
                    extents: Vec::new(),
                    errno: 0,
                    failed_early: false,
                    reply,
                },
            );
            handle
        };
        let header = proto::encode_request(&Request {
            flags,
            kind,
            handle,
            offset,
            len: len.into(),
        });
        let sent = {
            let mut w = inner.writer.lock().unwrap_or_else(|e| e.into_inner());
            // Nothing goes out once the connection ended (given up on
            // before a reconnection): the request is not made at all.
            let ended = {
                let mut state = inner.lock();
                match state.ended.clone() {
                    Some(why) => state.pending.remove(&handle).map(|p| (why, p.reply)),
                    None => None,
                }
            };
            if let Some(((kind, why), reply)) = ended {
                return Err((io::Error::new(kind, why), reply));
            }
            write_all_vectored(&mut w, &[&header, data])
        };
        match sent {
            // Its clock starts once it is all out: a request queued behind
            // a long write is not late for that.
            Ok(()) => {
                if let Some(p) = inner.lock().pending.get_mut(&handle) {
                    p.sent = Instant::now();
                }
            }
            // Half a request may be on the wire: the connection is done.
            Err(e) => inner.end(e.kind(), format!("sending a request failed: {e}")),
        }
        Ok(())
    }

    /// [`Session::send`] and [`Ticket::wait`].
    pub fn call(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<Answer> {
        self.send(kind, flags, offset, len, data)?.wait()
    }

    /// Gives the connection up: every request on it fails now and no new
    /// one is made, but the reader goes on reading the answers the server
    /// owes, until [`Session::drained`]. Over TCP, the connection is reset
    /// once the last descriptor closes (`SO_LINGER` 0).
    /// A new deadline for the requests waiting and to come (the disk's
    /// was changed); the socket's send timeout and keepalive follow.
    pub fn set_timeout(&self, timeout: Duration) {
        self.inner
            .timeout
            .store(nanos(timeout), std::sync::atomic::Ordering::Relaxed);
        let _ = self.inner.control.set_write_timeout(Some(timeout));
        if let Sock::Tcp(t) = self.inner.control.sock() {
            keepalive(t, timeout);
        }
    }

    pub fn abandon(&self) {
        self.inner.reset_on_close();
        self.inner
            .abandon(io::ErrorKind::ConnectionAborted, "closed".into());
    }

    /// True once nothing sent on the connection can still be done by the
    /// server: every request was answered, or the connection is closed.
    pub fn drained(&self) -> bool {
        self.inner.reader_done.load(Ordering::Acquire) || {
            let state = self.inner.lock();
            state.ended.is_some() && state.pending.is_empty()
        }
    }

    /// Requests the server has not answered (abandoned ones included).
    pub fn owed(&self) -> usize {
        self.inner.lock().pending.len()
    }

    /// Ends the session politely (`NBD_CMD_DISC`) when it is still up.
    pub fn disconnect(&self) {
        if self.ended().is_some() {
            return;
        }
        let r = proto::encode_request(&Request {
            flags: 0,
            kind: proto::CMD_DISC,
            handle: 0,
            offset: 0,
            len: 0,
        });
        let _ = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(&r);
        self.inner
            .end(io::ErrorKind::NotConnected, "disconnected".into());
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The reader holds the connection too: it must be told.
        self.inner.end(io::ErrorKind::NotConnected, "closed".into());
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failure(&self) -> io::Error {
        gone(&self.lock())
    }

    /// [`Session::abandon`] for `why` (the first reason stays).
    fn abandon(&self, kind: io::ErrorKind, why: String) {
        let empty = {
            let mut state = self.lock();
            state.ended.get_or_insert((kind, why));
            state.abandoned = true;
            let why = state.ended.clone().expect("set above");
            for p in state.pending.values_mut() {
                if !p.failed_early {
                    p.failed_early = true;
                    p.reply.give(Err(io::Error::new(why.0, why.1.clone())));
                }
            }
            state.pending.is_empty()
        };
        if empty {
            // Nothing is owed: the reader may go.
            self.control.shutdown(Shutdown::Read);
        }
    }

    fn reset_on_close(&self) {
        if let Sock::Tcp(_) = self.control.sock() {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: the descriptor is this connection's, open for the
            // call; the value is a linger of the size passed.
            unsafe {
                libc::setsockopt(
                    self.control.raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
    }

    /// Ends the connection: records why (the first reason stays), fails
    /// every request still waiting, and wakes the reader (shutting the
    /// reading side only: shutting the writing side would send what is
    /// still queued, and a FIN after it).
    fn end(&self, kind: io::ErrorKind, why: String) {
        let pending = {
            let mut state = self.lock();
            state.ended.get_or_insert((kind, why));
            std::mem::take(&mut state.pending)
        };
        let (kind, why) = self.lock().ended.clone().expect("set above");
        for (_, mut p) in pending {
            p.reply.give(Err(io::Error::new(kind, why.clone())));
        }
        self.control.shutdown(Shutdown::Read);
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl Inner {
    fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl State {
    /// The request in flight under `handle`; an error once the connection
    /// ended (which fails them all).
    fn get(&mut self, handle: u64) -> io::Result<&mut Pending> {
        match self.pending.get_mut(&handle) {
            Some(p) => Ok(p),
            None => Err(match &self.ended {
                Some((kind, why)) => io::Error::new(*kind, why.clone()),
                None => bad(format!("no request in flight has handle {handle}")),
            }),
        }
    }
}

/// Why requests on the connection fail: it ended (or its reader stopped).
fn gone(state: &State) -> io::Error {
    match &state.ended {
        Some((kind, why)) => io::Error::new(*kind, why.clone()),
        None => io::Error::new(io::ErrorKind::BrokenPipe, "the connection's reader stopped"),
    }
}

/// Writes all of `parts` (a header and a payload) in as few system calls
/// as the socket takes.
fn write_all_vectored(w: &mut Conn, parts: &[&[u8]]) -> io::Result<()> {
    let mut bufs: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    while !bufs.is_empty() {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the server took no data within the timeout",
                ));
            }
            Err(e) => return Err(e),
        };
        let mut n = n;
        while n > 0 {
            if n >= bufs[0].len() {
                n -= bufs[0].len();
                bufs.remove(0);
            } else {
                bufs[0] = &bufs[0][n..];
                n = 0;
            }
        }
    }
    Ok(())
}

/// The reading side: one thread per connection.
struct Reader {
    sock: Conn,
    inner: Arc<Inner>,
    /// What one read from the socket brought beyond what was asked:
    /// `buffered[at..end]`. Replies come in bursts, and one system call
    /// takes many (two per reply before: its magic, then the rest).
    buffered: Vec<u8>,
    at: usize,
    end: usize,
}

/// Bytes the reader asks the socket for at once.
const READ_AHEAD: usize = 64 << 10;

impl Reader {
    /// Reads into `out` what is buffered, else from the socket: straight
    /// into `out` when it is at least as large as the buffer (a read's
    /// data), else into the buffer first.
    fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.end {
            if out.len() >= self.buffered.len() {
                return self.sock.read(out);
            }
            let n = self.sock.read(&mut self.buffered)?;
            self.at = 0;
            self.end = n;
            if n == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(self.end - self.at);
        out[..n].copy_from_slice(&self.buffered[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }

    fn run(mut self) {
        let err = loop {
            if let Err(e) = self.one().and_then(|()| self.after_reply()) {
                break e;
            }
        };
        self.inner.end(err.kind(), err.to_string());
        self.inner.reader_done.store(true, Ordering::Release);
    }

    /// After each reply: an abandoned connection that is owed nothing more
    /// is done; a live one whose oldest request is overdue is given up
    /// (replies to others that keep coming do not hide it).
    fn after_reply(&self) -> io::Result<()> {
        let state = self.inner.lock();
        if let Some((kind, why)) = &state.ended {
            if state.abandoned && !state.pending.is_empty() {
                return Ok(());
            }
            return Err(io::Error::new(*kind, why.clone()));
        }
        let oldest = state.pending.values().map(|p| p.sent.elapsed()).max();
        drop(state);
        if oldest.is_some_and(|w| w > self.inner.timeout()) {
            self.give_up();
        }
        Ok(())
    }

    /// The oldest request is overdue: its waiters fail now, but what the
    /// server has in hand may still be done, so the answers it owes are
    /// still read ([`Session::drained`] waits for them).
    fn give_up(&self) {
        let e = no_answer(self.inner.timeout());
        self.inner.abandon(e.kind(), e.to_string());
    }

    /// Fills `buf` from the socket. Waiting for the start of a reply
    /// (`between`), the connection is given up once its oldest request is
    /// older than the timeout; in the middle of one, once no byte came for
    /// that long.
    fn fill(&mut self, buf: &mut [u8], between: bool) -> io::Result<()> {
        let mut at = 0;
        let mut last = Instant::now();
        while at < buf.len() {
            match self.read_some(&mut buf[at..]) {
                Ok(0) => {
                    return Err(match self.inner.lock().ended.clone() {
                        Some((kind, why)) => io::Error::new(kind, why),
                        None => io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed the connection",
                        ),
                    });
                }
                Ok(n) => {
                    at += n;
                    last = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    let state = self.inner.lock();
                    if let Some((kind, why)) = &state.ended {
                        // Given up on, it waits for what the server owes, as
                        // long as it takes (or until the server closes).
                        if state.abandoned && !state.pending.is_empty() {
                            continue;
                        }
                        return Err(io::Error::new(*kind, why.clone()));
                    }
                    if between && at == 0 {
                        let oldest = state.pending.values().map(|p| p.sent.elapsed()).max();
                        drop(state);
                        if oldest.is_some_and(|w| w > self.inner.timeout()) {
                            self.give_up();
                        }
                    } else if last.elapsed() > self.inner.timeout() {
                        // Stuck in the middle of a reply: the stream cannot
                        // be followed any more.
                        return Err(no_answer(self.inner.timeout()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads one reply, or one chunk of a structured one.
    fn one(&mut self) -> io::Result<()> {
        let mut magic = [0u8; 4];
        self.fill(&mut magic, true)?;
        match be_u32(&magic) {
            proto::SIMPLE_REPLY_MAGIC => self.simple(),
            proto::STRUCTURED_REPLY_MAGIC if self.inner.structured => self.chunk(),
            m => Err(bad(format!("the server sent a reply with magic {m:#x}"))),
        }
    }

    /// Checks that `handle` names a request in flight.
    fn asked(&self, handle: u64) -> io::Result<()> {
        if self.inner.lock().pending.contains_key(&handle) {
            Ok(())
        } else {
            Err(bad(format!(
                "the server answered handle {handle}, which no request in flight has"
            )))
        }
    }

    fn simple(&mut self) -> io::Result<()> {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN - 4];
        self.fill(&mut h, false)?;
        let (errno, handle) = (be_u32(&h[0..4]), be_u64(&h[4..12]));
        self.asked(handle)?;
        let removed = self.inner.lock().pending.remove(&handle);
        let mut p = removed.ok_or_else(|| self.inner.failure())?;
        if p.kind == proto::CMD_READ && errno == 0 {
            if self.inner.structured {
                let e = bad(
                    "the server answered a read with a simple reply after agreeing to structured replies",
                );
                fail(&mut p, &e);
                return Err(e);
            }
            let mut data = p
                .data
                .take()
                .ok_or_else(|| bad("a read's buffer is missing"))?;
            if let Err(e) = self.fill(&mut data, false) {
                fail(&mut p, &e);
                return Err(e);
            }
            p.data = Some(data);
        }
        finish(p, errno);
        Ok(())
    }

    fn chunk(&mut self) -> io::Result<()> {
        // flags, type, handle, length: the structured reply header after its magic.
        let mut h = [0u8; 16];
        self.fill(&mut h, false)?;
        let flags = be_u16(&h[0..2]);
        let kind = be_u16(&h[2..4]);
        let handle = be_u64(&h[4..12]);
        let length = be_u32(&h[12..16]);
        self.asked(handle)?;
        let (req_kind, req_offset, req_len) = {
            let state = self.inner.lock();
            let p = state.pending.get(&handle).ok_or_else(|| gone(&state))?;
            (p.kind, p.offset, u64::from(p.len))
        };
        // Where a chunk of `n` bytes at `offset` lies in its request.
        let place = |offset: u64, n: u64| -> io::Result<u64> {
            match offset.checked_sub(req_offset) {
                Some(rel) if req_kind == proto::CMD_READ && rel.saturating_add(n) <= req_len => {
                    Ok(rel)
                }
                _ => Err(bad(format!(
                    "the server sent a chunk of {n} bytes at offset {offset} for a request of {req_len} bytes at {req_offset}"
                ))),
            }
        };
        match kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                if length < 8 || u64::from(length) - 8 > req_len {
                    return Err(bad(format!(
                        "the server sent a data chunk of {length} bytes"
                    )));
                }
                let mut off = [0u8; 8];
                self.fill(&mut off, false)?;
                let n = u64::from(length) - 8;
                let rel = place(be_u64(&off), n)?;
                let mut data = self.take_buffer(handle)?;
                let r = self.fill(&mut data[rel as usize..(rel + n) as usize], false);
                self.put_back(handle, data, rel, n);
                r?;
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                if length != 12 {
                    return Err(bad(format!(
                        "the server sent a hole chunk of {length} bytes"
                    )));
                }
                let mut b = [0u8; 12];
                self.fill(&mut b, false)?;
                let n = u64::from(be_u32(&b[8..12]));
                let rel = place(be_u64(&b[0..8]), n)?;
                // The buffer starts zeroed: a hole needs no bytes.
                let mut state = self.inner.lock();
                let p = state.get(handle)?;
                p.covered.push((rel, n));
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                // Context id, then descriptors of (length, flags).
                if req_kind != proto::CMD_BLOCK_STATUS
                    || length < 12
                    || !(length - 4).is_multiple_of(8)
                    || length > MAX_STATUS
                {
                    return Err(bad(format!(
                        "the server sent a block status chunk of {length} bytes for a request of type {req_kind}"
                    )));
                }
                let mut body = vec![0u8; length as usize];
                self.fill(&mut body, false)?;
                // Only the context asked for is kept (a server may send
                // others it was asked for on another connection: none here).
                if Some(be_u32(&body[0..4])) == self.inner.allocation {
                    let mut state = self.inner.lock();
                    let p = state.get(handle)?;
                    if !p.extents.is_empty() {
                        return Err(bad(
                            "the server sent two block status chunks for one context",
                        ));
                    }
                    for d in body[4..].chunks_exact(8) {
                        let n = u64::from(be_u32(&d[0..4]));
                        if n == 0 {
                            return Err(bad("the server sent a block status extent of no bytes"));
                        }
                        p.extents.push((n, be_u32(&d[4..8])));
                    }
                }
            }
            proto::REPLY_TYPE_NONE => {
                if length != 0 || flags & proto::REPLY_FLAG_DONE == 0 {
                    return Err(bad("the server sent a malformed NONE chunk"));
                }
            }
            k if k & 0x8000 != 0 => {
                if !(6..=MAX_CHUNK).contains(&length) {
                    return Err(bad(format!(
                        "the server sent an error chunk of {length} bytes"
                    )));
                }
                let mut body = vec![0u8; length as usize];
                self.fill(&mut body, false)?;
                let errno = match be_u32(&body[0..4]) {
                    // An error chunk must carry an error.
                    0 => proto::EIO,
                    e => e,
                };
                let mut state = self.inner.lock();
                let p = state.get(handle)?;
                if p.errno == 0 {
                    p.errno = errno;
                }
            }
            k => {
                return Err(bad(format!(
                    "the server sent a structured reply chunk of unknown type {k}"
                )));
            }
        }
        if flags & proto::REPLY_FLAG_DONE != 0 {
            let removed = self.inner.lock().pending.remove(&handle);
            let mut p = removed.ok_or_else(|| self.inner.failure())?;
            if p.kind == proto::CMD_READ && p.errno == 0 && !tiles(&p.covered, req_len) {
                let e = bad(format!(
                    "the server's chunks for a read of {req_len} bytes at {req_offset} do not cover it exactly"
                ));
                fail(&mut p, &e);
                return Err(e);
            }
            let errno = p.errno;
            finish(p, errno);
        }
        Ok(())
    }

    fn take_buffer(&self, handle: u64) -> io::Result<Vec<u8>> {
        let mut state = self.inner.lock();
        let p = state.get(handle)?;
        p.data
            .take()
            .ok_or_else(|| bad("a read's buffer is missing"))
    }

    fn put_back(&self, handle: u64, data: Vec<u8>, rel: u64, n: u64) {
        let mut state = self.inner.lock();
        // An abort may have failed the request meanwhile.
        if let Some(p) = state.pending.get_mut(&handle) {
            p.data = Some(data);
            p.covered.push((rel, n));
        }
    }
}

/// Whether `ranges` cover `[0, len)` exactly, without overlap.
fn tiles(ranges: &[(u64, u64)], len: u64) -> bool {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut at = 0;
    for (off, n) in sorted {
        if off != at {
            return false;
        }
        at += n;
    }
    at == len
}

/// Fails `p`'s waiter with `e` (the connection ends for it too).
fn fail(p: &mut Pending, e: &io::Error) {
    if !p.failed_early {
        p.reply.give(Err(io::Error::new(e.kind(), e.to_string())));
    }
}

fn finish(mut p: Pending, errno: u32) {
    if p.failed_early {
        return;
    }
    let data = if errno == 0 { p.data.take() } else { None };
    let extents = std::mem::take(&mut p.extents);
    p.reply.give(Ok(Answer {
        errno,
        data,
        extents,
    }));
}

fn no_answer(timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no answer within {} s", timeout.as_secs_f64()),
    )
}

/// TCP keepalive probes after `timeout` idle, then every second, five
/// times: a server that vanished (its host rebooted, the link down for
/// good) ends the connection even while nothing is sent on it (and so an
/// abandoned connection stops waiting for it).
fn keepalive(sock: &std::net::TcpStream, timeout: Duration) {
    use std::os::unix::io::AsRawFd;
    let fd = sock.as_raw_fd();
    let set = |level: i32, name: i32, value: i32| {
        // SAFETY: the descriptor is open for the call; the value is an int
        // of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        timeout.as_secs().max(1) as i32,
    );
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 5);
    // Data not acknowledged for this long (the link down, the host gone)
    // ends the connection too, rather than after TCP's quarter of an hour.
    let user = timeout.saturating_mul(6).max(Duration::from_secs(30));
    set(
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        user.as_millis().min(i32::MAX as u128) as i32,
    );
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::path::Path;

    use super::*;
    use crate::nbd::client::tests::Mem;
    use crate::nbd::server::{self, Listen, Server};

    #[test]
    fn many_threads_share_one_connection_and_each_gets_its_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let server = Server::new(vec![Arc::new(Mem {
            data: data.clone(),
            read_only: false,
        })]);
        server.serve(server::bind(&Listen::Unix(sock.clone())).unwrap());
        let t = Duration::from_secs(10);
        let c = Client::connect_unix_with(&sock, "mem", t, true).unwrap();
        let s = Arc::new(Session::start(c, t).unwrap());
        assert!(s.structured(), "our server offers structured replies");
        std::thread::scope(|scope| {
            for k in 0..8u64 {
                let (s, data) = (s.clone(), &data);
                scope.spawn(move || {
                    for i in 0..200u64 {
                        let offset = (k * 7919 + i * 4099) % (1024 * 1024 - 8192) / 512 * 512;
                        // Several requests out before the first answer is read.
                        let tickets: Vec<_> = (0..4u64)
                            .map(|j| {
                                s.send(proto::CMD_READ, 0, offset + j * 512, 1536, &[])
                                    .unwrap()
                            })
                            .collect();
                        for (j, t) in tickets.into_iter().enumerate() {
                            let a = t.wait().unwrap();
                            assert_eq!(a.errno, 0);
                            let at = (offset + j as u64 * 512) as usize;
                            assert_eq!(a.data.unwrap(), data[at..at + 1536]);
                        }
                    }
                });
            }
        });
        assert_eq!(s.in_flight(), 0);
        let a = s.call(proto::CMD_FLUSH, 0, 0, 0, &[]).unwrap();
        assert_eq!(a.errno, 0);
        s.disconnect();
        assert!(s.send(proto::CMD_FLUSH, 0, 0, 0, &[]).is_err());
        server.shutdown();
    }

    /// A server that shakes hands (offering structured replies), reads
    /// one request, and answers it with `reply(handle, offset)`'s bytes.
    fn scripted(
        dir: &Path,
        reply: impl Fn(u64, u64) -> Vec<u8> + Send + 'static,
    ) -> (Session, std::thread::JoinHandle<()>) {
        let path = dir.join("scripted.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.write_all(&proto::encode_greeting()).unwrap();
            let mut flags = [0u8; 4];
            c.read_exact(&mut flags).unwrap();
            loop {
                let mut h = [0u8; 16];
                c.read_exact(&mut h).unwrap();
                let opt = be_u32(&h[8..12]);
                let mut body = vec![0u8; be_u32(&h[12..16]) as usize];
                c.read_exact(&mut body).unwrap();
                if opt == proto::OPT_GO {
                    c.write_all(&proto::encode_info_export(
                        opt,
                        1 << 20,
                        proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH,
                    ))
                    .unwrap();
                    c.write_all(&proto::encode_option_reply(opt, proto::REP_ACK, &[]))
                        .unwrap();
                    break;
                }
                if opt == proto::OPT_SET_META_CONTEXT {
                    // base:allocation, as context 7.
                    let mut ctx = 7u32.to_be_bytes().to_vec();
                    ctx.extend_from_slice(b"base:allocation");
                    c.write_all(&proto::encode_option_reply(
                        opt,
                        proto::REP_META_CONTEXT,
                        &ctx,
                    ))
                    .unwrap();
                }
                c.write_all(&proto::encode_option_reply(opt, proto::REP_ACK, &[]))
                    .unwrap();
            }
            let mut r = [0u8; proto::REQUEST_LEN];
            c.read_exact(&mut r).unwrap();
            let (handle, offset) = (be_u64(&r[8..16]), be_u64(&r[16..24]));
            let _ = c.write_all(&reply(handle, offset));
            // Hold the connection until the client ends it.
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        });
        let t = Duration::from_millis(400);
        let c = Client::connect_unix_with(&path, "", t, true).unwrap();
        (Session::start(c, t).unwrap(), server)
    }

    fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&handle.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn data_chunk(done: bool, handle: u64, offset: u64, bytes: &[u8]) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        chunk(done as u16, proto::REPLY_TYPE_OFFSET_DATA, handle, &p)
    }

    fn hole_chunk(done: bool, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        chunk(done as u16, proto::REPLY_TYPE_OFFSET_HOLE, handle, &p)
    }

    /// A read of 1024 bytes at 4096 answered by `reply`.
    fn read_answered(reply: impl Fn(u64, u64) -> Vec<u8> + Send + 'static) -> io::Result<Answer> {
        let dir = tempfile::tempdir().unwrap();
        let (s, server) = scripted(dir.path(), reply);
        let r = s.call(proto::CMD_READ, 0, 4096, 1024, &[]);
        drop(s);
        server.join().unwrap();
        r
    }

    fn status_chunk(handle: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
        let mut p = context.to_be_bytes().to_vec();
        for (n, f) in extents {
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        chunk(1, proto::REPLY_TYPE_BLOCK_STATUS, handle, &p)
    }

    /// The handshake agrees to `base:allocation` (context 7 here), and a
    /// block status answer carries its extents; those of a context not
    /// asked for are left out; a block status chunk answering a read, or
    /// an extent of no bytes, ends the connection.
    #[test]
    fn a_block_status_answer_carries_the_extents_of_base_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let (s, server) = scripted(dir.path(), |h, _| {
            let mut out = status_chunk(h, 9, &[(512, 0)]);
            out[5] = 0; // flags: not the last chunk
            out.extend(status_chunk(h, 7, &[(4096, 3), (8192, 0)]));
            out
        });
        assert!(s.knows_allocation());
        let a = s.call(proto::CMD_BLOCK_STATUS, 0, 0, 65536, &[]).unwrap();
        assert_eq!(a.errno, 0);
        assert_eq!(a.extents, [(4096, 3), (8192, 0)]);
        drop(s);
        server.join().unwrap();

        let e = read_answered(|h, _| status_chunk(h, 7, &[(1024, 0)])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        type Script = fn(u64, u64) -> Vec<u8>;
        let bad: [(&str, Script); 4] = [
            ("an extent of no bytes", |h, _| {
                status_chunk(h, 7, &[(0, 0)])
            }),
            ("half a descriptor", |h, _| {
                let mut out = status_chunk(h, 7, &[(512, 0)]);
                out[19] -= 4; // length 8: the context and half of one
                out.truncate(out.len() - 4);
                out
            }),
            ("no descriptor", |h, _| status_chunk(h, 7, &[])),
            ("two chunks for one context", |h, _| {
                let mut out = status_chunk(h, 7, &[(512, 0)]);
                out[5] = 0;
                out.extend(status_chunk(h, 7, &[(512, 0)]));
                out
            }),
        ];
        for (what, script) in bad {
            let dir = tempfile::tempdir().unwrap();
            let (s, server) = scripted(dir.path(), script);
            let e = s
                .call(proto::CMD_BLOCK_STATUS, 0, 0, 65536, &[])
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
            drop(s);
            server.join().unwrap();
        }
        // An error chunk is the answer: no extents.
        let dir = tempfile::tempdir().unwrap();
        let (s, server) = scripted(dir.path(), |h, _| {
            let mut p = proto::EINVAL.to_be_bytes().to_vec();
            p.extend_from_slice(&0u16.to_be_bytes());
            chunk(1, proto::REPLY_TYPE_ERROR, h, &p)
        });
        let a = s.call(proto::CMD_BLOCK_STATUS, 0, 0, 65536, &[]).unwrap();
        assert_eq!((a.errno, a.extents.len()), (proto::EINVAL, 0));
        drop(s);
        server.join().unwrap();
    }

    #[test]
    fn a_read_in_chunks_and_holes_comes_back_whole() {
        let a = read_answered(|h, o| {
            let mut out = hole_chunk(false, h, o + 512, 512);
            out.extend(data_chunk(true, h, o, &[7u8; 512]));
            out
        })
        .unwrap();
        assert_eq!(a.errno, 0);
        let mut want = vec![7u8; 512];
        want.extend([0u8; 512]);
        assert_eq!(a.data.unwrap(), want);
    }

    #[test]
    fn an_error_chunk_is_the_answer() {
        let a = read_answered(|h, o| {
            let mut out = data_chunk(false, h, o, &[7u8; 512]);
            let mut p = proto::EIO.to_be_bytes().to_vec();
            p.extend_from_slice(&4u16.to_be_bytes());
            p.extend_from_slice(b"oops");
            out.extend(chunk(1, proto::REPLY_TYPE_ERROR, h, &p));
            out
        })
        .unwrap();
        assert_eq!(a.errno, proto::EIO);
        assert!(a.data.is_none());
    }

    #[test]
    fn what_the_server_must_not_send_ends_the_connection_without_a_panic() {
        type Script = fn(u64, u64) -> Vec<u8>;
        let cases: [(&str, Script); 9] = [
            ("a handle not asked", |h, o| {
                data_chunk(true, h + 1, o, &[0; 1024])
            }),
            ("data before the request", |h, o| {
                data_chunk(true, h, o - 512, &[0; 1024])
            }),
            ("data past the request", |h, o| {
                data_chunk(true, h, o + 512, &[0; 1024])
            }),
            ("a gap", |h, o| data_chunk(true, h, o, &[0; 512])),
            ("an overlap", |h, o| {
                let mut out = data_chunk(false, h, o, &[0; 1024]);
                out.extend(hole_chunk(true, h, o, 512));
                out
            }),
            ("an unknown type", |h, _| chunk(1, 77, h, &[])),
            ("a huge error", |h, _| {
                let mut out = chunk(1, proto::REPLY_TYPE_ERROR, h, &[]);
                out.truncate(16);
                out.extend_from_slice(&u32::MAX.to_be_bytes());
                out
            }),
            ("bad magic", |_, _| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]),
            ("a simple reply with data", |h, _| {
                let mut out = proto::encode_simple_reply(0, h).to_vec();
                out.extend_from_slice(&[0; 1024]);
                out
            }),
        ];
        for (what, script) in cases {
            let e = read_answered(script).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
            // Sent with a continuation, it runs with the error, on the
            // thread that empties the channel (before, a simple reply to
            // a read dropped it unrun).
            let dir = tempfile::tempdir().unwrap();
            let (s, server) = scripted(dir.path(), script);
            let (to, finished) = crossbeam_channel::unbounded::<Finished>();
            let (tx, rx) = std::sync::mpsc::channel();
            s.send_then(
                (proto::CMD_READ, 0, 4096, 1024, &[]),
                &to,
                Box::new(move |a| {
                    let _ = tx.send(a.map(|_| ()));
                }),
            );
            finished
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("{what}: the continuation came"))
                .run();
            let e = rx.recv().unwrap().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
            drop(s);
            server.join().unwrap();
        }
    }

    #[test]
    fn a_server_that_stops_answering_fails_the_request_within_the_timeout() {
        let started = Instant::now();
        let e = read_answered(|_, _| Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // The timeout is 400 ms; the reader looks every 100 ms.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_request_after_the_connection_ended_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (s, server) = scripted(dir.path(), |h, _| proto::encode_simple_reply(0, h).to_vec());
        assert_eq!(s.call(proto::CMD_FLUSH, 0, 0, 0, &[]).unwrap().errno, 0);
        s.abandon();
        assert!(s.drained(), "nothing was owed");
        let e = s.send(proto::CMD_FLUSH, 0, 0, 0, &[]).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        drop(s);
        server.join().unwrap();
    }

    #[test]
    fn chunks_tile_a_read_only_when_they_cover_it_once() {
        assert!(tiles(&[(0, 4096)], 4096));
        assert!(tiles(&[(4096, 4096), (0, 4096)], 8192));
        assert!(!tiles(&[(0, 4096)], 8192), "a gap at the end");
        assert!(!tiles(&[(0, 4096), (2048, 4096)], 6144), "an overlap");
        assert!(!tiles(&[(0, 2048), (0, 2048), (2048, 2048)], 4096));
        assert!(tiles(&[], 0));
    }
}
