//! The NBD server: listeners, the handshake, and the transmission phase.
//!
//! Each connection has one reader thread. It decodes requests with
//! [`proto`] and submits them to the export's asynchronous
//! calls, so requests pipeline; each completion writes its reply through the
//! connection's writer lock, so replies go out in completion order. A
//! connection keeps at most [`MAX_IN_FLIGHT`] requests and
//! [`MAX_IN_FLIGHT_BYTES`] of request and reply data (writes and reads
//! alike) in flight, and all connections together at most
//! [`Limits::total_bytes`]; past that the reader stops reading requests,
//! which pushes back on the client through the socket, instead of
//! allocating. One request larger than a budget still goes when nothing
//! else is in flight, so no request size deadlocks.
//!
//! The server's memory is bounded whatever clients do: at most
//! [`Limits::max_connections`] connections (more are closed at once), each
//! with two threads and a 256 KiB read buffer, a handshake that must end
//! within [`Limits::handshake_timeout`], replies that a client must keep
//! reading ([`Limits::reply_timeout`] without progress closes it), and the
//! data in flight within the budgets above.
//!
//! What a client sends can only end its own connection: bad magic or a
//! broken handshake closes it; requests out of range or too large get an
//! error reply and the connection goes on.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::{self, ClientOption, Command, Decoded, ProtoError};

mod event_loop;
use crate::disk::AlignedBuf;

/// Requests one connection may have in flight.
pub const MAX_IN_FLIGHT: usize = 128;
/// Read and write data one connection may have in flight (a single request
/// larger than this still goes, alone).
pub const MAX_IN_FLIGHT_BYTES: u64 = 128 * 1024 * 1024;

/// Connections in their handshake at once; the oldest is closed for a new
/// one past this.
const HANDSHAKING: usize = 64;

/// What the server lets clients take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; one more is closed as soon as accepted.
    pub max_connections: usize,
    /// A client must finish its handshake within this.
    pub handshake_timeout: Duration,
    /// A client that reads none of its replies for this long is closed.
    pub reply_timeout: Duration,
    /// Request and reply data in flight over all connections.
    pub total_bytes: u64,
    /// Threads that serve the plain connections after their handshake,
    /// each turning one io_uring for all of its connections (see
    /// `event_loop`); 0: every connection keeps a thread of its own (as
    /// TLS connections always do).
    pub loops: usize,
}

/// How many loops `serve` runs its plain connections on with `engine`:
/// one per CPU (at most 4) on io_uring, where a loop waits for sockets
/// and disks in one ring; none on worker threads (a thread per
/// connection, as before), or where the kernel refuses io_uring.
pub fn loops_for(engine: crate::volume::queue::IoEngine) -> usize {
    if engine != crate::volume::queue::IoEngine::Uring || !crate::volume::queue::uring_available() {
        return 0;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(30),
            total_bytes: 1024 * 1024 * 1024,
            loops: 0,
        }
    }
}
/// A rejected WRITE's payload up to this size is read and dropped so the
/// connection goes on; a larger one is taken as a denial of service (the
/// spec allows a hard disconnect) and closes the connection.
pub const MAX_DISCARD: u64 = 256 * 1024 * 1024;

/// A completion callback.
pub type Done<T> = Box<dyn FnOnce(io::Result<T>) + Send>;

/// A block device the server exports: a byte range with asynchronous I/O.
/// The server knows nothing else about it.
pub trait Export: Send + Sync {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: usize, done: Done<AlignedBuf>);
    fn write(&self, offset: u64, data: AlignedBuf, fua: bool, done: Done<()>);
    /// Makes the range read as zeroes (TRIM and WRITE_ZEROES); `keep`
    /// keeps it allocated (`NBD_CMD_FLAG_NO_HOLE`), otherwise the export
    /// may deallocate it.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, keep: bool, done: Done<()>);
    fn flush(&self, done: Done<()>);
    /// True for an export clients may only read: it is advertised with
    /// `NBD_FLAG_READ_ONLY`, and the server answers writes, trims and
    /// write-zeroes with `EPERM` without calling the export.
    fn read_only(&self) -> bool {
        false
    }
    /// Whether zeroing (`keep`: without deallocating) costs less than
    /// writing zeroes: a write-zeroes with `NBD_CMD_FLAG_FAST_ZERO` fails
    /// at once with `ENOTSUP` unless it does.
    fn fast_zero(&self, _keep: bool) -> bool {
        false
    }
    /// `NBD_CMD_CACHE`: the client will read the range soon. Nothing to
    /// warm unless the export says otherwise.
    fn cache(&self, _offset: u64, _len: u64, done: Done<()>) {
        done(Ok(()))
    }
    /// The metadata contexts the export answers besides `base:allocation`.
    fn contexts(&self) -> &[&'static str] {
        &[]
    }
    /// The status of `[offset, offset + len)` in context `which` (0:
    /// `base:allocation`, `i`: `contexts()[i - 1]`): extents as (bytes,
    /// flags) from `offset` on, covering at least a first part of the
    /// range. By default everything is allocated data with no flag set.
    fn block_status(&self, _which: usize, _offset: u64, len: u64, done: Done<Vec<(u64, u32)>>) {
        done(Ok(vec![(len, 0)]))
    }
}

/// The transmission flags every export advertises: all connections share
/// one engine with no cache of its own, so a flush covers every completed
/// write whatever connection sent it (CAN_MULTI_CONN).
pub const TRANSMISSION_FLAGS: u16 = proto::FLAG_HAS_FLAGS
    | proto::FLAG_SEND_FLUSH
    | proto::FLAG_SEND_FUA
    | proto::FLAG_SEND_TRIM
    | proto::FLAG_SEND_WRITE_ZEROES
    | proto::FLAG_CAN_MULTI_CONN
    | proto::FLAG_SEND_CACHE
    | proto::FLAG_SEND_FAST_ZERO;

/// The transmission flags of one export for one client:
/// [`TRANSMISSION_FLAGS`], `NBD_FLAG_READ_ONLY` for a read-only export,
/// and `NBD_FLAG_SEND_DF` once structured replies are negotiated.
fn transmission_flags(e: &dyn Export, structured: bool) -> u16 {
    let mut flags = TRANSMISSION_FLAGS;
    if e.read_only() {
        flags |= proto::FLAG_READ_ONLY;
    }
    if structured {
        flags |= proto::FLAG_SEND_DF;
    }
    flags
}

/// A read at least this long, in a structured reply, asks the export where
/// its holes are and sends them as `NBD_REPLY_TYPE_OFFSET_HOLE` chunks;
/// shorter reads go as one data chunk. Clients that copy sparsely ask for
/// block status first and read only data, in pieces of 256 KiB (nbdcopy)
/// to 2 MiB: asking again for each piece cost nbdcopy 10% of its time
/// with a 64 KiB threshold, so only reads of a size such clients do not
/// make are checked.
pub const SPARSE_READ_MIN: u32 = 1024 * 1024;

/// The name of the one metadata context the spec defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    /// `HOST:PORT`, or a bare port (`PORT`, `:PORT`) on loopback.
    Tcp(String),
}

impl Listen {
    /// Parses `unix:PATH`, `HOST:PORT`, `:PORT` or `PORT`.
    pub fn parse(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("listen address {s:?} names no socket path"));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let port_only = s.strip_prefix(':').unwrap_or(s);
        if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
            return port_only
                .parse::<u16>()
                .map(|p| Listen::Tcp(format!("127.0.0.1:{p}")))
                .map_err(|_| format!("listen address {s:?} has a port out of range"));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Listen::Tcp(s.to_string()))
            }
            Some((host, port))
                if !host.is_empty()
                    && !port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Err(format!(
                    "listen address {s:?} has a port out of range (ports go from 0 to 65535)"
                ))
            }
            _ => Err(format!(
                "listen address {s:?} is neither unix:PATH nor HOST:PORT"
            )),
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A bound listening socket.
pub enum Bound {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Bound {
    fn fd(&self) -> RawFd {
        match self {
            Bound::Unix(l, _) => l.as_raw_fd(),
            Bound::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// The address as users write it (the real port for port 0).
    pub fn describe(&self) -> String {
        match self {
            Bound::Unix(_, p) => format!("unix:{}", p.display()),
            Bound::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
        }
    }

    fn accept(&self) -> io::Result<Sock> {
        match self {
            Bound::Unix(l, _) => l.accept().map(|(s, _)| Sock::Unix(s)),
            Bound::Tcp(l) => l.accept().map(|(s, _)| {
                // Replies are small and latency-bound: no Nagle.
                let _ = s.set_nodelay(true);
                Sock::Tcp(s)
            }),
        }
    }
}

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {0}: the address is already in use")]
    InUse(String),
    #[error("cannot listen on {0}: {1}")]
    Other(String, io::Error),
}

/// Binds a listener. A Unix socket path left over by a server that is gone
/// (nobody accepts on it) is replaced; one that answers is in use.
pub fn bind(listen: &Listen) -> Result<Bound, BindError> {
    let name = listen.to_string();
    match listen {
        Listen::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(BindError::Other(
                        name,
                        io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "a file that is not a socket is there",
                        ),
                    ));
                }
                if UnixStream::connect(path).is_ok() {
                    return Err(BindError::InUse(name));
                }
                let _ = std::fs::remove_file(path);
            }
            match UnixListener::bind(path) {
                Ok(l) => Ok(Bound::Unix(l, path.clone())),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(BindError::InUse(name)),
                Err(e) => Err(BindError::Other(name, e)),
            }
        }
        Listen::Tcp(addr) => {
            let addrs: Vec<_> = addr
                .to_socket_addrs()
                .map_err(|e| BindError::Other(name.clone(), e))?
                .collect();
            match TcpListener::bind(&addrs[..]) {
                Ok(l) => Ok(Bound::Tcp(l)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(BindError::InUse(name)),
                Err(e) => Err(BindError::Other(name, e)),
            }
        }
    }
}

/// A connected stream of either kind.
pub(super) enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    pub(super) fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }

    pub(super) fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(how),
            Sock::Tcp(s) => s.shutdown(how),
        };
    }

    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_write_timeout(t),
            Sock::Tcp(s) => s.set_write_timeout(t),
        }
    }

    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(t),
            Sock::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub(super) fn raw_fd(&self) -> RawFd {
        match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// A connection's reading side: during the handshake every read waits at
/// most until the handshake's deadline, so a client that trickles bytes
/// cannot stretch it.
struct Deadlined {
    sock: Sock,
    deadline: Option<Instant>,
}

impl Deadlined {
    /// Reads what the socket holds; while the thread's own ring has
    /// requests in it, waits for the socket in that ring, answering their
    /// completions meanwhile, rather than in `read`.
    fn read_turning(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.sock.raw_fd();
        loop {
            // SAFETY: receives at most `buf.len()` bytes into `buf`, which
            // is alive and writable for the call.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {}
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
            loop {
                if !crate::volume::queue::busy_here() {
                    crate::volume::queue::unplug_now();
                    return self.sock.read(buf);
                }
                if crate::volume::queue::turn_here(Some(fd), None) {
                    break;
                }
            }
        }
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.deadline.is_none() && crate::volume::queue::busy_here() {
            return self.read_turning(buf);
        }
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not finish its handshake in time",
                ));
            }
            self.sock.set_read_timeout(Some(left))?;
        }
        self.sock.read(buf)
    }
}

impl Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => (&*s).read(buf),
            Sock::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => (&*s).write(buf),
            Sock::Tcp(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(buf),
            Sock::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write_vectored(bufs),
            Sock::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a connection's answers go: the client's socket, or the TLS
/// session on it, which encrypts them on the way.
enum Out {
    Plain(Sock),
    Tls(super::tls::TlsOut),
}

impl Out {
    /// Sends what the socket takes now, without waiting (`WouldBlock`
    /// when it takes nothing). Under TLS nothing is sent here: replies go
    /// to the connection's writer thread, which encrypts them beside the
    /// thread that reads requests and completes their I/O.
    fn send_now(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Out::Plain(s) => send_now(s.raw_fd(), slices),
            Out::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Sends every slice, failing with `TimedOut` once the client has
    /// taken nothing for `stall`.
    fn send_all(&self, slices: &mut [IoSlice<'_>], stall: Duration) -> io::Result<()> {
        match self {
            Out::Plain(s) => write_all_vectored(s, slices, stall),
            Out::Tls(t) => t.send_all(slices, stall),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        match self {
            Out::Plain(s) => s.shutdown(how),
            Out::Tls(t) => t.shutdown(how),
        }
    }

    /// During the handshake a write waits at most `t` (a TLS write at
    /// most the client timeout).
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Out::Plain(s) => s.set_write_timeout(t),
            Out::Tls(_) => Ok(()),
        }
    }
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Out::Plain(s) => s.write(buf),
            Out::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The state the listeners and connections share.
struct Shared {
    limits: Limits,
    /// Data in flight over every connection.
    budget: Arc<Budget>,
    exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
    /// TLS, when the server offers it.
    tls: Option<super::tls::Tls>,
    stopping: AtomicBool,
    /// The loops connections are handed to after their handshake.
    loops: event_loop::Loops,
    /// Open connections, by id: a handle to shut their reading side, and
    /// the export chosen once the handshake is over.
    conns: Mutex<HashMap<u64, Conn>>,
    idle: Condvar,
    next_id: AtomicU64,
}

/// An open connection.
struct Conn {
    sock: Sock,
    export: Option<String>,
}

/// An NBD server; exports come and go while it serves
/// ([`Server::add_export`], [`Server::remove_export`]).
pub struct Server {
    shared: Arc<Shared>,
    acceptors: Mutex<Vec<(JoinHandle<()>, Option<PathBuf>)>>,
}

impl Server {
    pub fn new(exports: Vec<Arc<dyn Export>>) -> Server {
        Server::with_limits(exports, Limits::default())
    }

    /// A server that lets clients take at most `limits`.
    pub fn with_limits(exports: Vec<Arc<dyn Export>>, limits: Limits) -> Server {
        Server::with_tls(exports, limits, None)
    }

    /// A server that lets clients take at most `limits` and offers them
    /// `tls` (or requires it, as it says).
    pub fn with_tls(
        exports: Vec<Arc<dyn Export>>,
        limits: Limits,
        tls: Option<super::tls::Tls>,
    ) -> Server {
        Server {
            shared: Arc::new(Shared {
                limits,
                budget: Arc::new(Budget {
                    limit: limits.total_bytes,
                    used: Mutex::new((0, 0)),
                    changed: Condvar::new(),
                }),
                exports: RwLock::new(
                    exports
                        .into_iter()
                        .map(|e| (e.name().to_string(), e))
                        .collect(),
                ),
                tls,
                stopping: AtomicBool::new(false),
                loops: event_loop::Loops::new(limits.loops),
                conns: Mutex::new(HashMap::new()),
                idle: Condvar::new(),
                next_id: AtomicU64::new(0),
            }),
            acceptors: Mutex::new(Vec::new()),
        }
    }

    /// Starts accepting connections on `bound`.
    pub fn serve(&self, bound: Bound) {
        let shared = self.shared.clone();
        let path = match &bound {
            Bound::Unix(_, p) => Some(p.clone()),
            Bound::Tcp(_) => None,
        };
        let handle = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(shared, bound))
            .expect("spawn an accept thread");
        lock(&self.acceptors).push((handle, path));
    }

    /// Connections currently open.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Offers `export` to new connections (replacing one of the same name).
    pub fn add_export(&self, export: Arc<dyn Export>) {
        self.shared
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(export.name().to_string(), export);
    }

    /// Stops offering the export `name` to new connections; connections
    /// already using it go on until they close ([`Server::disconnect`]).
    pub fn remove_export(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.shared
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    /// Connections using the export `name`.
    pub fn clients(&self, name: &str) -> usize {
        lock(&self.shared.conns)
            .values()
            .filter(|c| c.export.as_deref() == Some(name))
            .count()
    }

    /// Ends the connections using the export `name` at once (both ways: a
    /// client that does not read its replies cannot hold the server up).
    /// Returns once their threads are done; requests they had in flight
    /// still run to their end in the export.
    pub fn disconnect(&self, name: &str) {
        self.close(Shutdown::Both, |c| c.export.as_deref() == Some(name));
    }

    /// Stops accepting, stops reading new requests on every connection,
    /// waits until every request in flight has been answered and every
    /// connection is closed, and removes Unix socket files.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (handle, path) in lock(&self.acceptors).drain(..) {
            let _ = handle.join();
            if let Some(p) = path {
                let _ = std::fs::remove_file(p);
            }
        }
        self.close(Shutdown::Read, |_| true);
    }

    /// Shuts `how` the connections `which` picks, and waits until they are
    /// closed.
    fn close(&self, how: Shutdown, which: impl Fn(&Conn) -> bool) {
        let mut conns = lock(&self.shared.conns);
        for c in conns.values().filter(|c| which(c)) {
            c.sock.shutdown(how);
        }
        while conns.values().any(&which) {
            conns = self
                .shared
                .idle
                .wait(conns)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits for a listener to become readable, waking every 100 ms to see
/// whether the server is stopping.
fn wait_readable(fd: RawFd, stopping: &AtomicBool) -> bool {
    loop {
        if stopping.load(Ordering::SeqCst) {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, 100) };
        if rc > 0 {
            return true;
        }
    }
}

fn accept_loop(shared: Arc<Shared>, bound: Bound) {
    while wait_readable(bound.fd(), &shared.stopping) {
        let sock = match bound.accept() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let Ok(handle) = sock.try_clone() else {
            continue;
        };
        {
            let mut conns = lock(&shared.conns);
            let serving = conns.values().filter(|c| c.export.is_some()).count();
            if serving >= shared.limits.max_connections {
                drop(conns);
                tracing::warn!(
                    max = shared.limits.max_connections,
                    "connection refused: the server has as many clients as it takes"
                );
                sock.shutdown(Shutdown::Both);
                continue;
            }
            // Clients still in their handshake hold a thread each: past
            // HANDSHAKING of them, the oldest goes, so a flood of idle
            // connections never keeps a new client out.
            let mut waiting: Vec<u64> = conns
                .iter()
                .filter(|(_, c)| c.export.is_none())
                .map(|(id, _)| *id)
                .collect();
            if waiting.len() >= HANDSHAKING {
                waiting.sort_unstable();
                for old in &waiting[..=waiting.len() - HANDSHAKING] {
                    if let Some(c) = conns.get(old) {
                        c.sock.shutdown(Shutdown::Both);
                    }
                }
            }
            conns.insert(
                id,
                Conn {
                    sock: handle,
                    export: None,
                },
            );
        }
        // A connection accepted while stopping gets no request read.
        if shared.stopping.load(Ordering::SeqCst) {
            sock.shutdown(Shutdown::Read);
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                match connection(&s, id, sock) {
                    // A loop serves it now, and takes it off the list.
                    Ok(Ended::Handed) => return,
                    Ok(Ended::Closed) => {}
                    Err(e) => tracing::info!(connection = id, error = %e, "connection closed"),
                }
                let mut conns = lock(&s.conns);
                conns.remove(&id);
                s.idle.notify_all();
                drop(conns);
                // Off the list (nothing waits for it): what a hung disk
                // still has in this thread's ring is seen to end if it
                // answers soon.
                crate::volume::queue::drain_here(crate::volume::queue::LEFTOVER_WAIT);
            });
        if spawned.is_err() {
            lock(&shared.conns).remove(&id);
        }
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Closed(String),
}

/// Reads exactly what `decode` asks for, and decodes it. Never reads past
/// the message, so nothing of the next one is lost.
fn read_decoded<T>(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    decode: impl Fn(&[u8]) -> Result<Decoded<T>, ProtoError>,
) -> Result<T, ConnError> {
    buf.clear();
    loop {
        match decode(buf)? {
            Decoded::Done(v, _) => return Ok(v),
            Decoded::NeedMore(n) => {
                let have = buf.len();
                buf.resize(n, 0);
                r.read_exact(&mut buf[have..])?;
            }
        }
    }
}

/// How a connection's thread ended.
enum Ended {
    Closed,
    /// The connection went on in a loop.
    Handed,
}

fn connection(shared: &Arc<Shared>, id: u64, sock: Sock) -> Result<Ended, ConnError> {
    let mut writer = Out::Plain(sock.try_clone()?);
    // The handshake has a deadline: an idle client holds no thread for long.
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    writer.set_write_timeout(Some(shared.limits.handshake_timeout))?;
    let mut reader = BufReader::with_capacity(
        256 * 1024,
        Deadlined {
            sock,
            deadline: Some(deadline),
        },
    );
    writer.write_all(&proto::encode_greeting())?;
    let mut buf = Vec::new();
    let flags = read_decoded(&mut reader, &mut buf, proto::decode_client_flags)?;
    let mut secure = false;
    let (export, session) = loop {
        match handshake(shared, &mut reader, &mut writer, flags.no_zeroes, secure)? {
            Handshake::Go(export, session) => break (export, session),
            Handshake::Abort => return Ok(Ended::Closed),
            Handshake::StartTls => {
                // The client waits for the ACK before it starts TLS: a byte
                // already here is a client that did not.
                if !reader.buffer().is_empty() {
                    return Err(ConnError::Closed(
                        "the client sent data before the TLS handshake".into(),
                    ));
                }
                let Some(tls) = &shared.tls else {
                    return Err(ConnError::Closed("TLS is not configured".into()));
                };
                let (plain, out) = super::tls::start(
                    tls,
                    &reader.get_ref().sock,
                    deadline,
                    shared.limits.reply_timeout,
                )?;
                writer = Out::Tls(out);
                reader = BufReader::with_capacity(
                    256 * 1024,
                    Deadlined {
                        sock: plain,
                        deadline: Some(deadline),
                    },
                );
                secure = true;
            }
        }
    };
    reader.get_mut().deadline = None;
    reader.get_ref().sock.set_read_timeout(None)?;
    writer.set_write_timeout(None)?;
    {
        let mut conns = lock(&shared.conns);
        let Some(c) = conns.get_mut(&id) else {
            return Ok(Ended::Closed);
        };
        c.export = Some(export.name().to_string());
        // The export went while the client negotiated (under this lock, so
        // whoever removed it and then counts its clients counts this one
        // or sees it go): it is not served.
        if !is_exported(shared, export.name()) {
            c.sock.shutdown(Shutdown::Both);
            return Ok(Ended::Closed);
        }
        if shared.stopping.load(Ordering::SeqCst) {
            c.sock.shutdown(Shutdown::Read);
        }
    }
    if matches!(writer, Out::Plain(_))
        && let Some(lp) = shared.loops.pick(shared)
    {
        let buffered = reader.buffer().to_vec();
        lp.adopt(event_loop::Adopted {
            id,
            sock: reader.into_inner().sock,
            export,
            session,
            buffered,
        });
        return Ok(Ended::Handed);
    }
    transmission(export, session, reader, writer, shared).map(|()| Ended::Closed)
}

fn exports(shared: &Shared) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<dyn Export>>> {
    shared.exports.read().unwrap_or_else(|e| e.into_inner())
}

fn is_exported(shared: &Shared, name: &str) -> bool {
    exports(shared).contains_key(name)
}

/// Looks up an export: by name, or the only one for the empty name.
fn find_export(shared: &Shared, name: &[u8]) -> Option<Arc<dyn Export>> {
    let exports = exports(shared);
    if name.is_empty() && exports.len() == 1 {
        return exports.values().next().cloned();
    }
    let name = std::str::from_utf8(name).ok()?;
    exports.get(name).cloned()
}

/// What one client negotiated for the transmission phase.
#[derive(Debug, Clone, Default)]
struct Session {
    /// Structured replies (or extended headers) were negotiated.
    structured: bool,
    /// Extended headers were negotiated.
    extended: bool,
    /// The metadata contexts selected (id, which: 0 for `base:allocation`,
    /// `i` for the export's `contexts()[i - 1]`), and the export name they
    /// were selected for.
    contexts: Vec<(u32, usize)>,
    contexts_for: Vec<u8>,
}

/// Decodes one request header (compact or extended).
type DecodeRequest = fn(&[u8]) -> Result<Decoded<proto::Request>, ProtoError>;

impl Session {
    fn negotiated(&self) -> proto::Negotiated {
        proto::Negotiated {
            structured: self.structured,
            extended: self.extended,
            contexts: self.contexts.len(),
        }
    }

    /// The request decoder of the session, and its header's length.
    fn decoder(&self) -> (DecodeRequest, usize) {
        if self.extended {
            (proto::decode_extended_request, proto::EXTENDED_REQUEST_LEN)
        } else {
            (proto::decode_request, proto::REQUEST_LEN)
        }
    }
}

/// How the option haggling ended.
enum Handshake {
    Go(Arc<dyn Export>, Session),
    Abort,
    /// The client asked for TLS and was told yes: the rest of the
    /// haggling happens inside it.
    StartTls,
}

/// Every metadata context of an export, by `which`.
fn context_names(e: &dyn Export) -> Vec<&'static str> {
    std::iter::once(BASE_ALLOCATION)
        .chain(e.contexts().iter().copied())
        .collect()
}

/// Whether `query` names the context `name`: exactly, or (when listing) as
/// its namespace with an empty leaf (`base:`, `mirrorvol:`).
fn query_matches(query: &[u8], name: &str, list: bool) -> bool {
    let Ok(q) = std::str::from_utf8(query) else {
        return false;
    };
    q == name || (list && q.ends_with(':') && name.starts_with(q))
}

/// Option haggling, until the client picks an export, aborts, or starts
/// TLS. `secure`: TLS is running (options start afresh inside it).
fn handshake(
    shared: &Shared,
    reader: &mut impl Read,
    w: &mut Out,
    no_zeroes: bool,
    secure: bool,
) -> Result<Handshake, ConnError> {
    let mut buf = Vec::new();
    let mut session = Session::default();
    let tls_required = !secure && shared.tls.as_ref().is_some_and(|t| t.required());
    let reply = |w: &mut Out, option: u32, kind: u32, msg: &str| -> io::Result<()> {
        w.write_all(&proto::encode_option_reply(option, kind, msg.as_bytes()))
    };
    loop {
        let option = read_decoded(reader, &mut buf, proto::decode_option)?;
        tracing::debug!(option = option_code(&option), secure, "NBD option");
        if tls_required {
            match option {
                ClientOption::StartTls | ClientOption::Abort => {}
                ClientOption::ExportName(_) => {
                    return Err(ConnError::Closed(
                        "the client asked for an export without TLS, which this server requires"
                            .into(),
                    ));
                }
                other => {
                    reply(
                        w,
                        option_code(&other),
                        proto::REP_ERR_TLS_REQD,
                        "this server requires TLS (NBD_OPT_STARTTLS) first",
                    )?;
                    continue;
                }
            }
        }
        match option {
            ClientOption::ExportName(name) => {
                let Some(e) = find_export(shared, &name) else {
                    // This option cannot carry an error: the spec says
                    // to end the session.
                    return Err(ConnError::Closed(format!(
                        "the client asked for unknown export {:?}",
                        String::from_utf8_lossy(&name)
                    )));
                };
                w.write_all(&proto::encode_export_name_reply(
                    e.size(),
                    transmission_flags(&*e, session.structured),
                    no_zeroes,
                ))?;
                session.keep_contexts_for(&name);
                return Ok(Handshake::Go(e, session));
            }
            ClientOption::Abort => {
                let _ = w.write_all(&proto::encode_option_reply(
                    proto::OPT_ABORT,
                    proto::REP_ACK,
                    &[],
                ));
                return Ok(Handshake::Abort);
            }
            ClientOption::List => {
                let mut out = Vec::new();
                for name in exports(shared).keys() {
                    out.extend(proto::encode_rep_server(name));
                }
                out.extend(proto::encode_option_reply(
                    proto::OPT_LIST,
                    proto::REP_ACK,
                    &[],
                ));
                w.write_all(&out)?;
            }
            ClientOption::StartTls => {
                if secure {
                    reply(
                        w,
                        proto::OPT_STARTTLS,
                        proto::REP_ERR_INVALID,
                        "TLS is already running",
                    )?;
                } else if shared.tls.is_none() {
                    reply(
                        w,
                        proto::OPT_STARTTLS,
                        proto::REP_ERR_POLICY,
                        "this server has no TLS certificates (serve --tls-certs)",
                    )?;
                } else {
                    reply(w, proto::OPT_STARTTLS, proto::REP_ACK, "")?;
                    return Ok(Handshake::StartTls);
                }
            }
            ClientOption::StructuredReply if session.extended => {
                reply(
                    w,
                    proto::OPT_STRUCTURED_REPLY,
                    proto::REP_ERR_EXT_HEADER_REQD,
                    "extended headers are on already",
                )?;
            }
            ClientOption::StructuredReply => {
                session.structured = true;
                reply(w, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, "")?;
            }
            ClientOption::ExtendedHeaders => {
                session.structured = true;
                session.extended = true;
                reply(w, proto::OPT_EXTENDED_HEADERS, proto::REP_ACK, "")?;
            }
            ClientOption::MetaContext { set, name, queries } => {
                let opt = if set {
                    proto::OPT_SET_META_CONTEXT
                } else {
                    proto::OPT_LIST_META_CONTEXT
                };
                // A failed SET selects nothing too.
                if set {
                    session.contexts.clear();
                }
                if !session.structured {
                    reply(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "metadata contexts need structured replies (NBD_OPT_STRUCTURED_REPLY) first",
                    )?;
                    continue;
                }
                let Some(e) = find_export(shared, &name) else {
                    let msg = format!("no export named {:?}", String::from_utf8_lossy(&name));
                    reply(w, opt, proto::REP_ERR_UNKNOWN, &msg)?;
                    continue;
                };
                let mut out = Vec::new();
                for (which, ctx) in context_names(&*e).into_iter().enumerate() {
                    let picked = if set {
                        queries.iter().any(|q| query_matches(q, ctx, false))
                    } else {
                        queries.is_empty() || queries.iter().any(|q| query_matches(q, ctx, true))
                    };
                    if !picked {
                        continue;
                    }
                    let id = if set { which as u32 + 1 } else { 0 };
                    if set {
                        session.contexts.push((id, which));
                    }
                    out.extend(proto::encode_meta_context(opt, id, ctx));
                }
                session.contexts_for = name;
                out.extend(proto::encode_option_reply(opt, proto::REP_ACK, &[]));
                w.write_all(&out)?;
            }
            ClientOption::Info { go, name, requests } => {
                let opt = if go { proto::OPT_GO } else { proto::OPT_INFO };
                let Some(e) = find_export(shared, &name) else {
                    let msg = format!(
                        "no export named {:?} (exports: {})",
                        String::from_utf8_lossy(&name),
                        exports(shared)
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    reply(w, opt, proto::REP_ERR_UNKNOWN, &msg)?;
                    continue;
                };
                let mut out = proto::encode_info_export(
                    opt,
                    e.size(),
                    transmission_flags(&*e, session.structured),
                );
                // Block sizes go out whether asked for or not: a client
                // must ignore what it does not understand, and the limits
                // hold either way.
                out.extend(proto::encode_info_block_size(
                    opt,
                    proto::MIN_BLOCK,
                    proto::PREFERRED_BLOCK,
                    proto::MAX_REQUEST,
                ));
                if requests.contains(&proto::INFO_NAME) {
                    out.extend(proto::encode_info_name(opt, e.name()));
                }
                out.extend(proto::encode_option_reply(opt, proto::REP_ACK, &[]));
                w.write_all(&out)?;
                if go {
                    session.keep_contexts_for(&name);
                    return Ok(Handshake::Go(e, session));
                }
            }
            ClientOption::Invalid { option, why } => {
                reply(w, option, proto::REP_ERR_INVALID, why)?;
            }
            ClientOption::Unsupported(option) => {
                reply(
                    w,
                    option,
                    proto::REP_ERR_UNSUP,
                    "option not supported by this server",
                )?;
            }
        }
    }
}

impl Session {
    /// Contexts selected for another export than the one the client went
    /// with are dropped (the spec forbids block status then).
    fn keep_contexts_for(&mut self, export: &[u8]) {
        if self.contexts_for != export {
            self.contexts.clear();
        }
    }
}

/// The option code a decoded option came with.
fn option_code(o: &ClientOption) -> u32 {
    match o {
        ClientOption::ExportName(_) => proto::OPT_EXPORT_NAME,
        ClientOption::Abort => proto::OPT_ABORT,
        ClientOption::List => proto::OPT_LIST,
        ClientOption::StartTls => proto::OPT_STARTTLS,
        ClientOption::StructuredReply => proto::OPT_STRUCTURED_REPLY,
        ClientOption::ExtendedHeaders => proto::OPT_EXTENDED_HEADERS,
        ClientOption::MetaContext { set: true, .. } => proto::OPT_SET_META_CONTEXT,
        ClientOption::MetaContext { set: false, .. } => proto::OPT_LIST_META_CONTEXT,
        ClientOption::Info { go: true, .. } => proto::OPT_GO,
        ClientOption::Info { go: false, .. } => proto::OPT_INFO,
        ClientOption::Invalid { option, .. } | ClientOption::Unsupported(option) => *option,
    }
}

/// Waits on `changed` for what `guard` guards to change; while this
/// thread's own ring holds requests, turns it instead (what the wait is
/// for may be one of their replies), looking again every few
/// milliseconds for what another thread changed.
fn wait_turning<'a, T>(
    changed: &Condvar,
    guard: std::sync::MutexGuard<'a, T>,
    mutex: &'a Mutex<T>,
) -> std::sync::MutexGuard<'a, T> {
    if crate::volume::queue::busy_here() {
        drop(guard);
        crate::volume::queue::turn_here(None, Some(Duration::from_millis(5)));
        lock(mutex)
    } else {
        // What this thread held back may be what frees the wait.
        crate::volume::queue::unplug_now();
        changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }
}

/// Data in flight over all connections, against [`Limits::total_bytes`].
struct Budget {
    limit: u64,
    /// Bytes in use, and threads waiting for some.
    used: Mutex<(u64, usize)>,
    changed: Condvar,
}

impl Budget {
    /// Waits until `bytes` fit (or nothing else is in flight), and takes them.
    fn acquire(&self, bytes: u64) {
        let mut used = lock(&self.used);
        while used.0 > 0 && used.0 + bytes > self.limit {
            used.1 += 1;
            used = wait_turning(&self.changed, used, &self.used);
            used.1 -= 1;
        }
        used.0 += bytes;
    }

    /// Takes `bytes` if they fit now (or nothing else is in flight).
    fn try_acquire(&self, bytes: u64) -> bool {
        let mut used = lock(&self.used);
        if used.0 > 0 && used.0 + bytes > self.limit {
            return false;
        }
        used.0 += bytes;
        true
    }

    fn release(&self, bytes: u64) {
        let mut used = lock(&self.used);
        used.0 -= bytes;
        // A wake-up is a system call: only when someone waits.
        if used.1 > 0 {
            self.changed.notify_all();
        }
    }
}

/// What one connection has in flight.
#[derive(Default)]
struct Held {
    requests: usize,
    bytes: u64,
    /// Threads waiting for the connection's share (the reader) or for
    /// nothing to be in flight (the end of the connection).
    waiting: usize,
}

/// Requests in flight on one connection, and the read and write data they
/// carry; each share is also taken from the server's [`Budget`].
struct InFlight {
    state: Mutex<Held>,
    changed: Condvar,
    budget: Arc<Budget>,
}

impl InFlight {
    fn acquire(&self, bytes: u64) {
        {
            let mut s = lock(&self.state);
            while s.requests > 0
                && (s.requests >= MAX_IN_FLIGHT || s.bytes + bytes > MAX_IN_FLIGHT_BYTES)
            {
                s.waiting += 1;
                s = wait_turning(&self.changed, s, &self.state);
                s.waiting -= 1;
            }
            s.requests += 1;
            s.bytes += bytes;
        }
        self.budget.acquire(bytes);
    }

    /// [`InFlight::acquire`] without waiting: whether the share was taken.
    fn try_acquire(&self, bytes: u64) -> bool {
        {
            let mut s = lock(&self.state);
            if s.requests > 0
                && (s.requests >= MAX_IN_FLIGHT || s.bytes + bytes > MAX_IN_FLIGHT_BYTES)
            {
                return false;
            }
            s.requests += 1;
            s.bytes += bytes;
        }
        if self.budget.try_acquire(bytes) {
            return true;
        }
        let mut s = lock(&self.state);
        s.requests -= 1;
        s.bytes -= bytes;
        false
    }

    fn release(&self, bytes: u64) {
        self.budget.release(bytes);
        let mut s = lock(&self.state);
        s.requests -= 1;
        s.bytes -= bytes;
        if s.waiting > 0 {
            self.changed.notify_all();
        }
    }

    fn drain(&self) {
        let mut s = lock(&self.state);
        while s.requests > 0 {
            s.waiting += 1;
            s = wait_turning(&self.changed, s, &self.state);
            s.waiting -= 1;
        }
    }
}

/// The bytes of a reply or chunk before its data: small ones inline (no
/// allocation for the replies of every request), larger ones (an error
/// message, block status) on the heap.
enum Head {
    Inline([u8; proto::MAX_CHUNK_HEAD_LEN], u8),
    Heap(Vec<u8>),
}

impl Head {
    /// A head encoded in place by the codec.
    fn encoded((bytes, n): proto::Head) -> Head {
        Head::Inline(bytes, n as u8)
    }

    fn new(bytes: &[u8]) -> Head {
        if bytes.len() <= proto::MAX_CHUNK_HEAD_LEN {
            let mut b = [0u8; proto::MAX_CHUNK_HEAD_LEN];
            b[..bytes.len()].copy_from_slice(bytes);
            Head::Inline(b, bytes.len() as u8)
        } else {
            Head::Heap(bytes.to_vec())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Head::Inline(b, n) => &b[..usize::from(*n)],
            Head::Heap(v) => v,
        }
    }
}

/// One reply on its way to the client: the head, a read's data, and the
/// in-flight share to give back once it is written (None for a request that
/// took none, such as a refusal). A sparse read's reply is several chunks:
/// `spans` holds each chunk's head and the part of `data` it carries (none
/// for a hole). `sent` bytes of it are on the wire.
struct Reply {
    head: Head,
    data: Option<AlignedBuf>,
    spans: Vec<(Head, std::ops::Range<usize>)>,
    release: Option<u64>,
    sent: usize,
}

impl Reply {
    fn new(head: &[u8], data: Option<AlignedBuf>, release: Option<u64>) -> Reply {
        Reply::with(Head::new(head), data, release)
    }

    fn with(head: Head, data: Option<AlignedBuf>, release: Option<u64>) -> Reply {
        Reply {
            head,
            data,
            spans: Vec::new(),
            release,
            sent: 0,
        }
    }

    /// Gives back the reply's in-flight share, written or dropped.
    fn give_back(&self, inflight: &InFlight) {
        if let Some(bytes) = self.release {
            inflight.release(bytes);
        }
    }

    fn len(&self) -> usize {
        let mut n = self.head.bytes().len();
        if self.spans.is_empty() {
            n += self.data.as_ref().map_or(0, |d| d.len());
        }
        for (h, r) in &self.spans {
            n += h.bytes().len() + r.len();
        }
        n
    }

    /// Adds what is left of the reply to `slices`.
    fn unsent<'a>(&'a self, slices: &mut Vec<IoSlice<'a>>) {
        let mut skip = self.sent;
        let mut part = |bytes: &'a [u8]| {
            if skip < bytes.len() {
                slices.push(IoSlice::new(&bytes[skip..]));
            }
            skip = skip.saturating_sub(bytes.len());
        };
        part(self.head.bytes());
        let data = self.data.as_deref().unwrap_or(&[]);
        if self.spans.is_empty() {
            part(data);
        }
        for (h, r) in &self.spans {
            part(h.bytes());
            if !r.is_empty() {
                part(&data[r.clone()]);
            }
        }
    }
}

/// The socket a connection's replies go out on, and who may write next.
struct Wire {
    out: Out,
    state: Mutex<WireState>,
}

impl Wire {
    /// After a failed write: the connection is shut, and every reply from
    /// now on dropped.
    fn fail(&self, state: &mut WireState, e: &io::Error) {
        tracing::info!(error = %e, "a reply could not be sent; closing the connection");
        state.broken = true;
        self.out.shutdown(Shutdown::Both);
    }
}

/// Held by whoever writes to the socket: the writer thread, the loop, or
/// a completion sending its reply itself.
#[derive(Default)]
struct WireState {
    /// A reply begun and not taken whole by the socket: its sender (the
    /// writer thread, or the loop when `held`) sends the rest before
    /// anything else.
    partial: Option<Reply>,
    /// In a loop: the partial reply, and the `pending` ones after it, wait
    /// for the loop to send them as the socket takes them (it polls for
    /// room in its ring; see [`Replies::send_to_loop`]).
    held: bool,
    pending: std::collections::VecDeque<Reply>,
    /// When the client last took a byte of what is held.
    since: Option<Instant>,
    /// A write failed: the connection is shut, replies are dropped.
    broken: bool,
}

impl WireState {
    /// The partial reply and what waits behind it, for whoever sends (or
    /// drops) them now.
    fn take_held(&mut self) -> impl Iterator<Item = Reply> + use<> {
        self.held = false;
        let pending = std::mem::take(&mut self.pending);
        self.partial.take().into_iter().chain(pending)
    }
}

/// The writing side of a connection, shared by the completions.
///
/// With a thread of its own, a completion sends its reply itself when
/// nothing else is queued and the socket takes it at once (no wake-up of
/// another thread: what a reply at queue depth one waits for); otherwise
/// the reply goes to the connection's writer thread, so the threads that
/// complete I/O never wait on a client's socket.
///
/// In a loop, a reply the socket does not take whole is held: the loop
/// sends the rest when its ring says the socket has room, while it serves
/// its other connections; a 256 KiB read's reply is larger than a Unix
/// socket's default buffer, and handing each to a writer thread cost two
/// thread switches a reply.
struct Replies {
    behind: Behind,
    wire: Arc<Wire>,
    inflight: Arc<InFlight>,
    /// How long the client may take no byte of a reply.
    stall: Duration,
}

/// Who sends the replies a completion does not send itself.
enum Behind {
    /// The connection's writer thread (`None` only wakes it for a partial).
    Writer(crossbeam_channel::Sender<Option<Reply>>),
    /// The loop that serves the connection: it sends every reply, those
    /// completed on other threads queued for it.
    Loop(Arc<event_loop::Waker>),
}

impl Replies {
    /// [`Replies::send`] for a connection a loop serves: on the loop's
    /// thread, sent now as far as the socket takes it, the rest held; from
    /// elsewhere, queued behind what is held, and the loop woken.
    fn send_to_loop(&self, owner: &event_loop::Waker, reply: Reply) {
        if owner.here() {
            // No writer thread: whoever else holds the wire holds it for
            // a moment.
            let wire = lock(&self.wire.state);
            return self.send_held(wire, reply);
        }
        let mut wire = lock(&self.wire.state);
        if !wire.held {
            wire.held = true;
            wire.since = Some(Instant::now());
        }
        wire.pending.push_back(reply);
        drop(wire);
        owner.wake();
    }

    /// Sends what the loop holds as far as the socket takes it. While
    /// some is left: the socket to wait for room in and how long the
    /// client may still take to read (the socket is cut after that).
    fn progress(&self) -> Option<(Option<RawFd>, Duration)> {
        let Ok(mut wire) = self.wire.state.try_lock() else {
            // Another thread is at the wire (adding a reply to what is
            // held): look again shortly.
            return Some((None, Duration::from_millis(1)));
        };
        if !wire.held {
            return None;
        }
        let mut done = if wire.broken {
            wire.take_held().collect()
        } else {
            self.push(&mut wire)
        };
        let left = if wire.held {
            let since = wire.since.map_or(Duration::ZERO, |t| t.elapsed());
            let left = self.stall.saturating_sub(since);
            if left.is_zero() {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client read no reply for {} s", self.stall.as_secs()),
                );
                self.wire.fail(&mut wire, &e);
                done.extend(wire.take_held());
                None
            } else {
                match &self.wire.out {
                    Out::Plain(s) => Some((Some(s.raw_fd()), left)),
                    Out::Tls(_) => Some((None, left)),
                }
            }
        } else {
            None
        };
        drop(wire);
        for r in done {
            r.give_back(&self.inflight);
        }
        left
    }

    /// Sends the held partial reply and those pending after it, as far as
    /// the socket takes them now; returns the replies wholly sent (or
    /// dropped, when the socket failed).
    fn push(&self, wire: &mut WireState) -> Vec<Reply> {
        const BATCH: usize = 64;
        let mut done = Vec::new();
        while wire.held && !wire.broken {
            if wire.partial.is_none() {
                wire.partial = wire.pending.pop_front();
            }
            let Some(first) = wire.partial.as_ref() else {
                wire.held = false;
                break;
            };
            let mut slices = Vec::with_capacity(4);
            first.unsent(&mut slices);
            for r in wire.pending.iter().take(BATCH) {
                r.unsent(&mut slices);
            }
            let offered: usize = slices.iter().map(|s| s.len()).sum();
            match self.wire.out.send_now(&slices) {
                Ok(n) => {
                    wire.since = Some(Instant::now());
                    let mut n = n;
                    while let Some(p) = wire.partial.as_mut() {
                        let left = p.len() - p.sent;
                        if n < left {
                            p.sent += n;
                            break;
                        }
                        n -= left;
                        done.extend(wire.partial.take());
                        wire.partial = wire.pending.pop_front();
                    }
                    if wire.partial.is_none() {
                        wire.held = false;
                    }
                    if n < offered {
                        // The socket is full: wait for room.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.wire.fail(wire, &e);
                    done.extend(wire.take_held());
                }
            }
        }
        done
    }

    /// Sends `reply` on the wire the loop holds, now or, as far as the
    /// socket does not take it, later (held).
    fn send_held(&self, mut wire: std::sync::MutexGuard<'_, WireState>, reply: Reply) {
        if wire.broken {
            drop(wire);
            return reply.give_back(&self.inflight);
        }
        if wire.held {
            wire.pending.push_back(reply);
            return;
        }
        wire.partial = Some(reply);
        wire.held = true;
        wire.since = Some(Instant::now());
        let done = self.push(&mut wire);
        drop(wire);
        for r in done {
            r.give_back(&self.inflight);
        }
    }

    fn send(&self, mut reply: Reply) {
        let tx = match &self.behind {
            Behind::Loop(owner) => return self.send_to_loop(owner, reply),
            Behind::Writer(tx) => tx,
        };
        if tx.is_empty()
            && let Ok(mut wire) = self.wire.state.try_lock()
            && wire.partial.is_none()
            && !wire.broken
        {
            let mut slices = Vec::with_capacity(2 + 2 * reply.spans.len());
            reply.unsent(&mut slices);
            match self.wire.out.send_now(&slices) {
                Ok(n) if n == reply.len() => {
                    drop(wire);
                    return reply.give_back(&self.inflight);
                }
                Ok(n) => {
                    reply.sent = n;
                    wire.partial = Some(reply);
                    drop(wire);
                    // Cannot fail: the writer reads until every sender is gone.
                    let _ = tx.send(None);
                    return;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    self.wire.fail(&mut wire, &e);
                    drop(wire);
                    return reply.give_back(&self.inflight);
                }
            }
        }
        let _ = tx.send(Some(reply));
    }
}

/// The writer thread of a connection: writes the replies queued for it
/// (after the rest of a partial one), several per system call, and gives
/// back their in-flight shares once written. After a failed write (the
/// client went, or read nothing for `stall`) the connection is shut and
/// the remaining replies are dropped, their shares given back.
fn write_replies(
    wire: Arc<Wire>,
    rx: crossbeam_channel::Receiver<Option<Reply>>,
    inflight: Arc<InFlight>,
    stall: Duration,
) {
    const BATCH: usize = 64;
    let mut batch: Vec<Reply> = Vec::with_capacity(BATCH);
    while let Ok(first) = rx.recv() {
        batch.extend(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.extend(r),
                Err(_) => break,
            }
        }
        let mut state = wire.state.lock().unwrap_or_else(|e| e.into_inner());
        // A partial reply goes first.
        let before: Vec<Reply> = state.take_held().collect();
        batch.splice(0..0, before);
        if !state.broken && !batch.is_empty() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
            for r in &batch {
                r.unsent(&mut slices);
            }
            if let Err(e) = wire.out.send_all(&mut slices, stall) {
                wire.fail(&mut state, &e);
            }
        }
        drop(state);
        for r in batch.drain(..) {
            r.give_back(&inflight);
        }
    }
}

/// Writes every slice, failing with `TimedOut` once the client has taken
/// no byte for `stall` (measured from its last progress, not per system
/// call, so a client that stops reading is cut at `stall`).
fn write_all_vectored(
    sock: &Sock,
    mut slices: &mut [IoSlice<'_>],
    stall: Duration,
) -> io::Result<()> {
    let fd = sock.raw_fd();
    let mut progress = Instant::now();
    while !slices.is_empty() {
        match send_now(fd, slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                IoSlice::advance_slices(&mut slices, n);
                progress = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = stall.saturating_sub(progress.elapsed());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client read no reply for {} s", stall.as_secs()),
                    ));
                }
                wait_writable(fd, left)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends what the socket takes now, without waiting (`EWOULDBLOCK` when
/// it takes nothing).
pub(super) fn send_now(fd: RawFd, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec on Unix; sendmsg only reads them.
    msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = slices.len().min(1024) as _;
    // SAFETY: `msg` points at `slices`, alive and unchanged for the call;
    // `fd` is the connection's open socket.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Waits until the socket takes data, or `within` passes.
pub(super) fn wait_writable(fd: RawFd, within: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = within.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one pollfd, owned by this frame, for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn transmission(
    export: Arc<dyn Export>,
    session: Session,
    mut reader: BufReader<Deadlined>,
    writer: Out,
    shared: &Shared,
) -> Result<(), ConnError> {
    let inflight = Arc::new(InFlight {
        state: Mutex::new(Held::default()),
        changed: Condvar::new(),
        budget: shared.budget.clone(),
    });
    let stall = shared.limits.reply_timeout;
    let (tx, rx) = crossbeam_channel::unbounded();
    let wire = Arc::new(Wire {
        out: writer,
        state: Mutex::new(WireState::default()),
    });
    let replies = Arc::new(Replies {
        behind: Behind::Writer(tx),
        wire: wire.clone(),
        inflight: inflight.clone(),
        stall,
    });
    let released = inflight.clone();
    let writer = std::thread::Builder::new()
        .name("nbd-reply".into())
        .spawn(move || write_replies(wire, rx, released, stall))
        .map_err(ConnError::Io)?;
    // The disk requests of the clients' requests go to this thread's own
    // ring, which it turns while it waits (for the socket, for room in
    // flight, for the last replies).
    let r = crate::volume::queue::run_here(|| {
        let r = requests(&export, &session, &mut reader, &replies, &inflight);
        // Answer everything already accepted before the socket closes: every
        // share comes back once its reply is written (or dropped).
        inflight.drain();
        r
    });
    drop(replies);
    let _ = writer.join();
    r
}

/// Answers one request: simple replies, or structured or extended
/// chunks (with the error's message) once they are negotiated.
#[derive(Clone)]
struct Answer {
    replies: Arc<Replies>,
    handle: u64,
    /// How chunks are framed; None: simple replies.
    frame: Option<proto::Frame>,
}

impl Answer {
    fn new(replies: &Arc<Replies>, session: &Session, r: &proto::Request) -> Answer {
        let frame = session.structured.then_some(proto::Frame {
            handle: r.handle,
            extended: session.extended.then_some(r.offset),
        });
        Answer {
            replies: replies.clone(),
            handle: r.handle,
            frame,
        }
    }

    /// Success of a request that returns no data: a simple reply, or with
    /// extended headers (which have none) a final `NONE` chunk.
    fn ok(&self, release: Option<u64>) {
        let reply = match self.frame {
            Some(f) if f.extended.is_some() => {
                Reply::with(Head::encoded(proto::encode_none_chunk(f)), None, release)
            }
            _ => Reply::new(&proto::encode_simple_reply(0, self.handle), None, release),
        };
        self.replies.send(reply);
    }

    fn error(&self, errno: u32, why: &str, release: Option<u64>) {
        let reply = match self.frame {
            Some(f) => Reply::new(&proto::encode_error_chunk(f, errno, why), None, release),
            None => Reply::new(
                &proto::encode_simple_reply(errno, self.handle),
                None,
                release,
            ),
        };
        self.replies.send(reply);
    }

    fn outcome(&self, r: io::Result<()>, release: Option<u64>) {
        match r {
            Ok(()) => self.ok(release),
            Err(e) => self.error(proto::errno_of(&e), &e.to_string(), release),
        }
    }

    /// A read's data, in one piece.
    fn data(&self, offset: u64, r: io::Result<AlignedBuf>, release: Option<u64>) {
        let data = match r {
            Ok(data) => data,
            Err(e) => return self.error(proto::errno_of(&e), &e.to_string(), release),
        };
        let reply = match self.frame {
            // A content chunk carries at least one byte: a read of none
            // is answered with the final NONE chunk alone.
            Some(f) if data.is_empty() => {
                Reply::with(Head::encoded(proto::encode_none_chunk(f)), None, release)
            }
            Some(f) => {
                let head = proto::encode_data_chunk(f, offset, data.len() as u32, true);
                Reply::with(Head::encoded(head), Some(data), release)
            }
            None => Reply::new(
                &proto::encode_simple_reply(0, self.handle),
                Some(data),
                release,
            ),
        };
        self.replies.send(reply);
    }

    /// A sparse read (structured replies only): a chunk per piece of
    /// `layout` (bytes, reads as zeroes), data chunks carrying their part
    /// of `data`.
    fn sparse(
        &self,
        offset: u64,
        layout: &[(u32, bool)],
        data: Option<AlignedBuf>,
        release: Option<u64>,
    ) {
        let Some(f) = self.frame else {
            return self.error(
                proto::EIO,
                "a sparse read needs structured replies",
                release,
            );
        };
        let mut spans = Vec::with_capacity(layout.len());
        let mut pos = 0usize;
        for (i, &(n, zero)) in layout.iter().enumerate() {
            let done = i + 1 == layout.len();
            let at = offset + pos as u64;
            let end = pos + n as usize;
            if zero {
                let head = proto::encode_hole_chunk(f, at, n, done);
                spans.push((Head::encoded(head), pos..pos));
            } else {
                let head = proto::encode_data_chunk(f, at, n, done);
                spans.push((Head::encoded(head), pos..end));
            }
            pos = end;
        }
        self.replies.send(Reply {
            head: Head::new(&[]),
            data,
            spans,
            release,
            sent: 0,
        });
    }

    /// A block status reply: one chunk per context (id, extents), or the
    /// first error.
    fn block_status(&self, results: ContextResults) {
        let Some(f) = self.frame else {
            return self.error(
                proto::EINVAL,
                "block status needs structured replies",
                Some(0),
            );
        };
        let mut out = Vec::new();
        let last = results.len().saturating_sub(1);
        for (i, (id, r)) in results.into_iter().enumerate() {
            match r {
                Ok(extents) => out.extend(proto::encode_block_status(f, id, &extents, i == last)),
                Err(e) => return self.error(proto::errno_of(&e), &e.to_string(), Some(0)),
            }
        }
        self.replies.send(Reply::new(&out, None, Some(0)));
    }
}

/// Each selected context's id and extents (length, flags) for one block
/// status request, or why they are missing.
type ContextResults = Vec<(u32, io::Result<Vec<(u64, u32)>>)>;

/// An export's extents made fit for a block status reply to a request of
/// `len` bytes: adjacent extents with the same flags merged, none empty,
/// the total within `len` (so each fits the reply's length field: 32 bits
/// without extended headers, where requests are 32 bits too), at most
/// [`proto::MAX_EXTENTS`], and only the first with `one`
/// (`NBD_CMD_FLAG_REQ_ONE`). An export that reported nothing is an error.
fn fit_extents(extents: Vec<(u64, u32)>, len: u64, one: bool) -> io::Result<Vec<(u64, u32)>> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut left = len;
    for (n, flags) in extents {
        let n = n.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        match out.last_mut() {
            Some((m, f)) if *f == flags => *m += n,
            _ => out.push((n, flags)),
        }
        if left == 0 {
            break;
        }
    }
    if out.is_empty() {
        return Err(io::Error::other(
            "the export reported no extent for the range",
        ));
    }
    out.truncate(if one { 1 } else { proto::MAX_EXTENTS });
    Ok(out)
}

/// What a read of `len` bytes meets, from the `base:allocation` extents:
/// (bytes, reads as zeroes) covering exactly `len`; what the extents do
/// not cover counts as data.
fn read_layout(extents: io::Result<Vec<(u64, u32)>>, len: u32) -> Vec<(u32, bool)> {
    let mut out: Vec<(u32, bool)> = Vec::new();
    let mut covered = 0u32;
    if let Ok(fit) = extents.and_then(|e| fit_extents(e, u64::from(len), false)) {
        for (n, flags) in fit {
            // Within a read's length: fits 32 bits.
            let n = n as u32;
            let zero = flags & proto::STATE_ZERO != 0;
            match out.last_mut() {
                Some((m, z)) if *z == zero => *m += n,
                _ => out.push((n, zero)),
            }
            covered += n;
        }
    }
    if covered < len {
        match out.last_mut() {
            Some((m, false)) => *m += len - covered,
            _ => out.push((len - covered, false)),
        }
    }
    out
}

/// How a request is handled before it starts.
enum Plan {
    /// Answered at once with this error (the reply holds a share of no
    /// bytes: it counts as a request in flight until it is written);
    /// `skip` bytes of payload (a refused write's) are read and dropped.
    Refuse {
        errno: u32,
        why: &'static str,
        skip: u64,
    },
    /// Takes `bytes` of the connection's in-flight share, reads `payload`
    /// bytes of data (a write's), then starts ([`start`]).
    Start { bytes: u64, payload: usize },
    /// The client is done.
    Disconnect,
}

/// How `command` (with `payload` bytes after its header) is handled.
fn plan(command: &Command, export: &dyn Export, payload: u64) -> Plan {
    match *command {
        // The spec: a write to a read-only export fails with EPERM.
        Command::Write { .. } | Command::WriteZeroes { .. } if export.read_only() => Plan::Refuse {
            errno: proto::EPERM,
            why: "the export is read-only",
            skip: payload,
        },
        Command::Disconnect => Plan::Disconnect,
        Command::Reject { errno, why } => Plan::Refuse {
            errno,
            why,
            skip: payload,
        },
        Command::WriteZeroes {
            fast: true, keep, ..
        } if !export.fast_zero(keep) => Plan::Refuse {
            errno: proto::ENOTSUP,
            why: "zeroing this export costs as much as writing zeroes",
            skip: 0,
        },
        // The reply's data counts until it is written to the client.
        Command::Read { len, .. } => Plan::Start {
            bytes: u64::from(len),
            payload: 0,
        },
        Command::Write { len, .. } => Plan::Start {
            bytes: u64::from(len),
            payload: len as usize,
        },
        _ => Plan::Start {
            bytes: 0,
            payload: 0,
        },
    }
}

/// Why a refused write's payload is not skipped: too large to read and drop.
fn too_large_to_skip(skip: u64) -> ConnError {
    ConnError::Closed(format!(
        "the client sent a {skip}-byte write, too large to skip"
    ))
}

fn requests(
    export: &Arc<dyn Export>,
    session: &Session,
    reader: &mut BufReader<Deadlined>,
    replies: &Arc<Replies>,
    inflight: &Arc<InFlight>,
) -> Result<(), ConnError> {
    let negotiated = session.negotiated();
    let (decode, header_len) = session.decoder();
    let mut header = Vec::with_capacity(header_len);
    // Requests that arrived together reach each disk's ring together: the
    // kernel hears of them when the reader is about to wait for more.
    let plug = crate::volume::queue::Plug::new();
    loop {
        if reader.buffer().len() < header_len {
            plug.flush();
        }
        let req = match read_decoded(reader, &mut header, decode) {
            Ok(r) => r,
            // The client went away (or we stopped reading): not an error.
            Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let answer = Answer::new(replies, session, &req);
        let command = proto::classify(&req, export.size(), &negotiated);
        match plan(&command, &**export, req.payload_len(session.extended)) {
            Plan::Disconnect => return Ok(()),
            Plan::Refuse { errno, why, skip } => {
                if skip > MAX_DISCARD {
                    return Err(too_large_to_skip(skip));
                }
                io::copy(&mut reader.by_ref().take(skip), &mut io::sink())?;
                // A refusal counts in flight as any request: a client that
                // sends them without reading the replies is held back.
                inflight.acquire(0);
                answer.error(errno, why, Some(0));
            }
            Plan::Start { bytes, payload } => {
                inflight.acquire(bytes);
                let mut data = None;
                if payload > 0 {
                    // Filled whole from the socket, or the connection ends.
                    let mut buf = AlignedBuf::recycled(payload);
                    if reader.buffer().len() < payload {
                        plug.flush();
                    }
                    if let Err(e) = reader.read_exact(&mut buf) {
                        inflight.release(bytes);
                        return Err(e.into());
                    }
                    data = Some(buf);
                }
                start(export, session, command, answer, bytes, data);
            }
        }
    }
}

/// Starts a request that holds its in-flight share (`bytes`) and, for a
/// write, its data; the answer comes from its completion.
fn start(
    export: &Arc<dyn Export>,
    session: &Session,
    command: Command,
    answer: Answer,
    bytes: u64,
    data: Option<AlignedBuf>,
) {
    match command {
        Command::Read { offset, len, whole } => {
            if session.structured && !whole && len >= SPARSE_READ_MIN {
                let e = export.clone();
                export.block_status(
                    0,
                    offset,
                    bytes,
                    Box::new(move |r| {
                        let layout = read_layout(r, len);
                        if layout.iter().all(|&(_, zero)| zero) {
                            return answer.sparse(offset, &layout, None, Some(bytes));
                        }
                        if layout.len() == 1 {
                            return e.read(
                                offset,
                                len as usize,
                                Box::new(move |r| answer.data(offset, r, Some(bytes))),
                            );
                        }
                        e.read(
                            offset,
                            len as usize,
                            Box::new(move |r| match r {
                                Ok(data) => answer.sparse(offset, &layout, Some(data), Some(bytes)),
                                Err(e) => {
                                    answer.error(proto::errno_of(&e), &e.to_string(), Some(bytes))
                                }
                            }),
                        );
                    }),
                );
            } else {
                export.read(
                    offset,
                    len as usize,
                    Box::new(move |r| answer.data(offset, r, Some(bytes))),
                );
            }
        }
        // A write of no bytes has no payload to read.
        Command::Write { offset, fua, len } => {
            match data.or_else(|| (len == 0).then(|| AlignedBuf::recycled(0))) {
                Some(data) => export.write(
                    offset,
                    data,
                    fua,
                    Box::new(move |r| answer.outcome(r, Some(bytes))),
                ),
                None => answer.error(proto::EINVAL, "a write without its data", Some(bytes)),
            }
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            keep,
            ..
        } => export.write_zeroes(
            offset,
            len,
            fua,
            keep,
            Box::new(move |r| answer.outcome(r, Some(bytes))),
        ),
        Command::Flush => export.flush(Box::new(move |r| answer.outcome(r, Some(bytes)))),
        Command::Cache { offset, len } => export.cache(
            offset,
            len,
            Box::new(move |r| answer.outcome(r, Some(bytes))),
        ),
        Command::BlockStatus { offset, len, one } => {
            block_status(export, &session.contexts, offset, len, one, answer)
        }
        // Planned as refusals or the end, never started.
        Command::Disconnect | Command::Reject { .. } => {
            answer.error(proto::EINVAL, "not a request to start", Some(bytes))
        }
    }
}

/// Asks the export for every selected context's extents at once, and
/// answers when the last is in.
fn block_status(
    export: &Arc<dyn Export>,
    contexts: &[(u32, usize)],
    offset: u64,
    len: u64,
    one: bool,
    answer: Answer,
) {
    struct Gather {
        left: usize,
        results: ContextResults,
    }
    let gather = Arc::new(Mutex::new(Gather {
        left: contexts.len(),
        results: contexts
            .iter()
            .map(|&(id, _)| (id, Err(io::Error::other("no answer"))))
            .collect(),
    }));
    for (i, &(_, which)) in contexts.iter().enumerate() {
        let gather = gather.clone();
        let answer = answer.clone();
        export.block_status(
            which,
            offset,
            len,
            Box::new(move |r| {
                let mut g = lock(&gather);
                g.results[i].1 = r.and_then(|e| fit_extents(e, len, one));
                g.left -= 1;
                if g.left == 0 {
                    let results = std::mem::take(&mut g.results);
                    drop(g);
                    answer.block_status(results);
                }
            }),
        );
    }
}
