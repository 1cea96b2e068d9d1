//! A disk that is an NBD export on this machine or another: served by
//! qemu-nbd, nbdkit (any plugin) or another mirrorvol, named by a URI as
//! the NBD URI specification writes them:
//!
//! ```text
//! nbd://HOST[:PORT]/EXPORT            TCP (port 10809 by default)
//! nbd+unix:///EXPORT?socket=PATH      a Unix socket
//! nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR
//! nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR
//! ```
//!
//! `nbds` asks the server for TLS (`NBD_OPT_STARTTLS`) before anything
//! else, and never talks in the clear to one that refuses. `DIR` holds
//! the certificates as qemu and libnbd keep a client's: `ca-cert.pem`
//! (the CA the server's certificate must chain to) and, for a server that
//! asks for one, `client-cert.pem` and `client-key.pem`. The server's
//! certificate must name the URI's host (`localhost` for a Unix socket),
//! or `tls-hostname=NAME`.
//!
//! The connections are made when the disk is opened, all to the export
//! whose label assembly then reads: several only when the server
//! advertises `NBD_FLAG_CAN_MULTI_CONN` (without it, a flush on one
//! connection need not cover writes made on another, and servers such as
//! qemu-nbd take one client unless told more). Each connection carries
//! many requests at once ([`Session`]: pipelined, answered in any order,
//! structured replies when the server offers them, so a read of a hole
//! sends no zeroes), and the disk's queue workers share them. A
//! connection that fails breaks the disk: every connection is dropped,
//! every later request fails and [`Disk::health`] says so (also when a
//! connection ended while idle), and the group fails the disk. Only
//! [`Disk::reconnect`] mends it: it connects again and puts the new
//! connections in service only once the caller has read what they reach
//! (the group checks the label, config and generation: what answers at
//! the same address later may be another export, or this one rolled
//! back). A failure of a request made before a reconnection does not
//! break the connections made after it. An export that cannot flush is refused: a mirror's
//! bitmap and config must be durable before the writes they cover are
//! acknowledged, and such an export could only promise that by lying.
//! A read-only export is refused too.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Disk, DiskIdentity};
use crate::nbd::client::Client;
use crate::nbd::conn::ClientTls;
use crate::nbd::proto;
use crate::nbd::session::{Answer, Finished, Session};

/// Where an export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp { host: String, port: u16 },
    Unix { socket: PathBuf },
}

/// An NBD URI, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: NbdAddress,
    pub export: String,
    /// `nbds`: TLS, with these certificates.
    pub tls: Option<ClientTls>,
}

/// The port NBD servers listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 10809;

impl NbdUri {
    /// Whether `s` is written as an NBD URI (whether or not it parses).
    pub fn is_uri(s: &str) -> bool {
        let scheme = s
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        scheme.is_some_and(|s| s == "nbd" || s.starts_with("nbd+") || s.starts_with("nbds"))
    }

    /// Parses `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`;
    /// the error is a sentence naming what is wrong.
    pub fn parse(s: &str) -> Result<NbdUri, String> {
        let decode = |part: &str, what: &str| {
            percent_decode(part).ok_or_else(|| format!("NBD URI {s:?} has a malformed {what}"))
        };
        let scheme = s
            .split_once("://")
            .map_or(String::new(), |(x, _)| x.to_ascii_lowercase());
        let tls = match scheme.as_str() {
            "nbd" | "nbd+unix" => false,
            "nbds" | "nbds+unix" => true,
            _ => {
                return Err(format!(
                    "NBD URI {s:?} has the scheme {scheme}://, which disks do not speak: use nbd://, nbds://, nbd+unix:// or nbds+unix://"
                ));
            }
        };
        let unix = scheme.ends_with("+unix");
        let rest = &s[scheme.len() + 3..];
        if rest.contains('#') {
            return Err(format!(
                "NBD URI {s:?} has a fragment, which NBD URIs do not take"
            ));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        // The query: socket= (Unix), tls-certificates= and tls-hostname=
        // (nbds); nothing else.
        let mut socket = None;
        let mut certificates = None;
        let mut hostname = None;
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let slot = match k {
                "socket" if unix => &mut socket,
                "tls-certificates" if tls => &mut certificates,
                "tls-hostname" if tls => &mut hostname,
                _ => {
                    let takes = match (unix, tls) {
                        (true, true) => "socket, tls-certificates and tls-hostname",
                        (true, false) => "socket",
                        (false, true) => "tls-certificates and tls-hostname",
                        (false, false) => "none",
                    };
                    return Err(format!(
                        "NBD URI {s:?} has the query parameter {k:?}; {scheme}:// URIs of disks take {takes}"
                    ));
                }
            };
            *slot = Some(decode(v, k)?);
        }
        let tls = if tls {
            let Some(dir) = certificates else {
                return Err(format!(
                    "NBD URI {s:?} asks for TLS but names no certificates: add tls-certificates=DIR (a directory holding ca-cert.pem, and client-cert.pem with client-key.pem if the server asks for a client certificate)"
                ));
            };
            if !dir.starts_with('/') {
                return Err(format!(
                    "NBD URI {s:?} names the certificates directory {dir:?}, not an absolute path: the group finds its disks from any directory"
                ));
            }
            Some((PathBuf::from(dir), hostname))
        } else {
            None
        };
        let client_tls = |default_host: &str| {
            tls.clone().map(|(certificates, hostname)| ClientTls {
                certificates,
                hostname: hostname.unwrap_or_else(|| default_host.to_string()),
            })
        };
        if unix {
            let path = rest;
            if !path.is_empty() && !path.starts_with('/') {
                return Err(format!(
                    "NBD URI {s:?} names a host; a Unix socket URI is {scheme}:///EXPORT?socket=PATH"
                ));
            }
            let socket =
                socket.ok_or_else(|| format!("NBD URI {s:?} names no socket: add ?socket=PATH"))?;
            if !socket.starts_with('/') {
                return Err(format!(
                    "NBD URI {s:?} names the socket {socket:?}, not an absolute path: the group finds its disks from any directory"
                ));
            }
            return Ok(NbdUri {
                address: NbdAddress::Unix {
                    socket: PathBuf::from(socket),
                },
                export: decode(path.strip_prefix('/').unwrap_or(path), "export name")?,
                tls: client_tls("localhost"),
            });
        }
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(format!(
                "NBD URI {s:?} has a user, which NBD URIs do not take"
            ));
        }
        let (host, port) = match authority.strip_prefix('[') {
            // [IPv6]:PORT
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("NBD URI {s:?} has an unclosed [ in its host"))?;
                if !after.is_empty() && !after.starts_with(':') {
                    return Err(format!("NBD URI {s:?} has {after:?} after its IPv6 host"));
                }
                (host, after.strip_prefix(':'))
            }
            None if authority.matches(':').count() > 1 => {
                return Err(format!(
                    "NBD URI {s:?} has an IPv6 host without brackets: write nbd://[ADDRESS]:PORT/EXPORT"
                ));
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(format!("NBD URI {s:?} names no host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("NBD URI {s:?} has a port {p:?} that is not 0 to 65535"))?,
        };
        Ok(NbdUri {
            address: NbdAddress::Tcp {
                host: host.to_string(),
                port,
            },
            export: decode(export, "export name")?,
            tls: client_tls(host),
        })
    }

    /// Opens one connection to the export.
    fn connect(&self, timeout: Duration) -> io::Result<Client> {
        match &self.address {
            NbdAddress::Unix { socket } => {
                Client::connect_unix_tls(socket, &self.export, timeout, true, self.tls.as_ref())
            }
            NbdAddress::Tcp { host, port } => {
                Client::connect_tcp_tls(host, *port, &self.export, timeout, true, self.tls.as_ref())
            }
        }
    }

    /// The I/O path: the server's host, or the socket's machine.
    fn controller(&self) -> String {
        match &self.address {
            NbdAddress::Tcp { host, port } => format!("nbd:{host}:{port}"),
            NbdAddress::Unix { socket } => format!("nbd:{}", socket.display()),
        }
    }
}

/// `%XX` escapes decoded; None when one is malformed or the result is not
/// UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// An NBD export used as a disk.
pub struct NbdDisk {
    uri: NbdUri,
    shown: String,
    size: u64,
    flags: AtomicU16,
    /// The connections in service and the requests made on them.
    lender: Arc<Lender>,
    /// Where the answers of requests sent by [`NbdDisk::send_then`] go, with
    /// what runs with them: a thread of the disk's own runs them
    /// ([`completer`]).
    finished: crossbeam_channel::Sender<Finished>,
    /// The connections made at open.
    most: usize,
    /// Which connection the next request goes on.
    next: AtomicUsize,
    /// What each request (and each connection attempt) waits at most:
    /// nanoseconds (`set-disk --io-timeout` changes it).
    timeout: std::sync::atomic::AtomicU64,
}

/// The connections in service (`broken` once one failed), and told when
/// a request made on them ends.
struct Lender {
    pool: Mutex<Pool>,
    returned: Condvar,
}

impl Lender {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request made at `epoch` out; `why`: it failed, which breaks
    /// the disk (unless the disk was mended since).
    fn end(&self, epoch: u64, why: Option<String>) {
        let mut pool = self.lock();
        pool.lent -= 1;
        if let Some(why) = why
            && pool.epoch == epoch
        {
            pool.broken.get_or_insert(why);
            pool.give_up();
        }
        drop(pool);
        self.returned.notify_all();
    }
}

/// The thread that runs what comes with the answers of a disk's requests
/// sent by [`NbdDisk::send_then`]: never a connection's reader (a request
/// ended there may wait for another answer that reader must read), nor the
/// sender. It ends once the disk and every request made on it are gone.
fn completer(rx: crossbeam_channel::Receiver<Finished>) {
    ON_COMPLETER.set(true);
    for f in rx {
        // A continuation that panics loses its own answer, not every one
        // after it.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.run())).is_err() {
            tracing::error!("a request's completion panicked");
        }
    }
}

thread_local! {
    static ON_COMPLETER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is an NBD disk's completer: what waits for an NBD
/// disk's requests to be answered must not wait here.
pub fn on_completer() -> bool {
    ON_COMPLETER.get()
}

/// Requests a disk's sender keeps in flight at most: 512 at 5 ms a round
/// trip is 100000 a second, and the oldest of a deep burst is answered
/// well within any deadline (each request's clock starts when it is sent).
const MOST_IN_FLIGHT: usize = 512;

struct Pool {
    sessions: Vec<Arc<Session>>,
    /// Connections given up on that the server may still owe answers:
    /// the disk is not taken back until they are drained.
    draining: Vec<Arc<Session>>,
    broken: Option<String>,
    /// Raised by every reconnection: a failure of a request made before it
    /// does not break the connections made after.
    epoch: u64,
    /// Requests being made now (any number on each connection).
    lent: usize,
}

impl Pool {
    /// Gives every connection in service up: their requests fail now, and
    /// they drain (the server's answers still owed are read) out of
    /// service.
    fn give_up(&mut self) {
        for s in self.sessions.drain(..) {
            s.abandon();
            self.draining.push(s);
        }
    }
}

/// Connections to an export that can take several (multi-conn).
const MULTI_CONN: usize = 4;

impl std::fmt::Debug for NbdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdDisk({}, {} bytes)", self.shown, self.size)
    }
}

/// One request of a batch: (command, command flags, offset, length, a
/// write's bytes).
pub type Ask<'a> = (u16, u16, u64, u32, &'a [u8]);

impl NbdDisk {
    /// Connects to the export `uri` names; every request waits at most
    /// `timeout` for the server. Refuses an export that is read-only,
    /// cannot flush, or is not a whole number of 512-byte sectors.
    pub fn open(shown: &str, timeout: Duration) -> io::Result<NbdDisk> {
        let uri =
            NbdUri::parse(shown).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let connect = || uri.connect(timeout).map_err(|e| no_answer(e, timeout));
        let first = connect()?;
        let (size, flags) = (first.size(), first.flags());
        let refuse = |why: String| Err(io::Error::new(io::ErrorKind::Unsupported, why));
        if first.read_only() {
            return refuse(format!("the NBD export {shown} is read-only"));
        }
        if flags & proto::FLAG_SEND_FLUSH == 0 {
            return refuse(format!(
                "the NBD export {shown} cannot flush (no NBD_FLAG_SEND_FLUSH), so nothing written to it could be known durable"
            ));
        }
        if !size.is_multiple_of(512) {
            return refuse(format!(
                "the NBD export {shown} is {size} bytes, not a whole number of 512-byte sectors"
            ));
        }
        let most = if flags & proto::FLAG_CAN_MULTI_CONN != 0 {
            MULTI_CONN
        } else {
            1
        };
        // All made now, to the export just checked: none is made later.
        let mut clients = vec![first];
        while clients.len() < most {
            let c = connect()?;
            if (c.size(), c.flags()) != (size, flags) {
                return refuse(format!(
                    "the NBD export {shown} changed between two connections"
                ));
            }
            clients.push(c);
        }
        let sessions = clients
            .into_iter()
            .map(|c| Session::start(c, timeout).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let (finished, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("mv-nbd-done".into())
            .spawn(move || completer(rx))?;
        Ok(NbdDisk {
            uri,
            shown: shown.to_string(),
            size,
            flags: flags.into(),
            lender: Arc::new(Lender {
                pool: Mutex::new(Pool {
                    sessions,
                    draining: Vec::new(),
                    broken: None,
                    epoch: 0,
                    lent: 0,
                }),
                returned: Condvar::new(),
            }),
            finished,
            most,
            next: AtomicUsize::new(0),
            timeout: std::sync::atomic::AtomicU64::new(
                timeout.as_nanos().min(u64::MAX as u128) as u64
            ),
        })
    }

    /// Connects again to the export and, once `check` accepted what the
    /// new connections read (`Err`: they are closed, the disk stays
    /// broken), puts them in service. Always on new connections: the old
    /// ones are dropped (reset), and the disk stays broken until every
    /// request made on them has ended, so that none lands after the disk is
    /// taken back. An export that changed size is refused before `check`
    /// runs; what else it offers (zeroes, trim) is taken as it is now.
    fn mend(&self, check: &dyn Fn(&dyn Disk) -> io::Result<()>) -> io::Result<()> {
        {
            let mut pool = self.lock();
            pool.broken
                .get_or_insert_with(|| "reconnecting".to_string());
            pool.give_up();
            // Every request on a connection given up fails at once, but its
            // sender may still be writing: that ends within the timeout.
            let limit = std::time::Instant::now() + 2 * self.timeout();
            while pool.lent > 0 {
                let left = limit.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{} requests made before the connection broke have not ended",
                            pool.lent
                        ),
                    ));
                }
                pool = self
                    .lender
                    .returned
                    .wait_timeout(pool, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            // What the server has in hand may still be done (a write that
            // waited in a hung server): nothing new is checked or written
            // before every old connection is drained, or closed by the
            // server.
            while pool.draining.iter().any(|s| !s.drained()) {
                if std::time::Instant::now() >= limit {
                    let owed: usize = pool.draining.iter().map(|s| s.owed()).sum();
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the server has not answered {owed} requests made before the connection broke; it is not taken back before it has (or has closed those connections)"
                        ),
                    ));
                }
                drop(pool);
                std::thread::sleep(Duration::from_millis(20));
                pool = self.lock();
            }
            pool.draining.clear();
        }
        let fresh = NbdDisk::open(&self.shown, self.timeout())?;
        if fresh.size != self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the NBD export {} answers again with {} bytes, where it had {}: not the disk that left",
                    self.shown, fresh.size, self.size
                ),
            ));
        }
        check(&fresh)?;
        let sessions = std::mem::take(&mut fresh.lock().sessions);
        let mut pool = self.lock();
        pool.epoch += 1;
        pool.sessions = sessions;
        pool.broken = None;
        self.flags.store(fresh.flags(), Ordering::Relaxed);
        drop(pool);
        self.lender.returned.notify_all();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.lender.lock()
    }

    fn flags(&self) -> u16 {
        self.flags.load(Ordering::Relaxed)
    }

    /// Sends every request of `asks` on one connection, all before the
    /// first answer is waited for, and returns their answers in order.
    /// When the connection fails (an error reply is an answer, not a
    /// failure), or a request panics, the disk is broken until
    /// [`NbdDisk::mend`]: every connection is dropped, since what the
    /// failed one left undone is not known.
    fn exchange(&self, asks: &[Ask<'_>]) -> io::Result<Vec<Answer>> {
        let (session, epoch) = {
            let mut pool = self.lock();
            if let Some(why) = &pool.broken {
                return Err(self.broken(why));
            }
            if pool.sessions.is_empty() {
                return Err(self.broken("no connection"));
            }
            let i = self.next.fetch_add(1, Ordering::Relaxed) % pool.sessions.len();
            pool.lent += 1;
            (pool.sessions[i].clone(), pool.epoch)
        };
        /// Counts the request out, and breaks the disk when it failed
        /// (`why` set, or a panic in between).
        struct Lent<'a> {
            disk: &'a NbdDisk,
            why: Option<String>,
            epoch: u64,
        }
        impl Drop for Lent<'_> {
            fn drop(&mut self) {
                let failed = if std::thread::panicking() {
                    Some("a request did not finish".to_string())
                } else {
                    self.why.take()
                };
                self.disk.lender.end(self.epoch, failed);
            }
        }
        let mut lent = Lent {
            disk: self,
            why: None,
            epoch,
        };
        let r = (|| {
            let tickets = asks
                .iter()
                .map(|&(kind, flags, at, len, data)| session.send(kind, flags, at, len, data))
                .collect::<io::Result<Vec<_>>>()?;
            tickets
                .into_iter()
                .map(|t| {
                    let a = t.wait()?;
                    // NBD_ESHUTDOWN: the server is going away. Kept, the
                    // connection would hold it up and fail every request.
                    if a.errno == libc::ESHUTDOWN as u32 {
                        return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
                    }
                    Ok(a)
                })
                .collect::<io::Result<Vec<_>>>()
        })();
        if let Err(e) = &r {
            lent.why = Some(e.to_string());
        }
        r
    }

    /// Sends one request without waiting for its answer (once fewer than
    /// `MOST_IN_FLIGHT` are); `then` runs with the answer (an error: the
    /// connection failed, or the server is going away) on the disk's
    /// completer thread, after the request is counted out. A request that
    /// fails so breaks the disk, as in `NbdDisk::exchange`.
    pub fn send_then(
        &self,
        (kind, flags, offset, len, data): Ask<'_>,
        then: Box<dyn FnOnce(io::Result<Answer>) + Send>,
    ) {
        let lent = {
            let mut pool = self.lock();
            while pool.lent >= MOST_IN_FLIGHT && pool.broken.is_none() {
                pool = self
                    .lender
                    .returned
                    .wait(pool)
                    .unwrap_or_else(|e| e.into_inner());
            }
            match (&pool.broken, pool.sessions.is_empty()) {
                (Some(why), _) => Err(self.broken(why)),
                (None, true) => Err(self.broken("no connection")),
                (None, false) => {
                    let i = self.next.fetch_add(1, Ordering::Relaxed) % pool.sessions.len();
                    pool.lent += 1;
                    Ok((pool.sessions[i].clone(), pool.epoch))
                }
            }
        };
        let (session, epoch) = match lent {
            Ok(l) => l,
            // Run by the completer too, never by the sender: what runs
            // then may wait (a failure report).
            Err(e) => {
                let _ = self.finished.send(Finished::new(then, Err(e)));
                return;
            }
        };
        let lender = self.lender.clone();
        let counted: Box<dyn FnOnce(io::Result<Answer>) + Send> = Box::new(move |answer| {
            // NBD_ESHUTDOWN: the server is going away (see `exchange`).
            let answer = match answer {
                Ok(a) if a.errno == libc::ESHUTDOWN as u32 => {
                    Err(io::Error::from_raw_os_error(libc::ESHUTDOWN))
                }
                other => other,
            };
            lender.end(epoch, answer.as_ref().err().map(|e| e.to_string()));
            then(answer)
        });
        session.send_then((kind, flags, offset, len, data), &self.finished, counted);
    }

    /// Whether the export takes NBD_CMD_FLAG_FUA on writes.
    pub fn can_fua(&self) -> bool {
        self.can(proto::FLAG_SEND_FUA)
    }

    /// Whether the export takes NBD_CMD_WRITE_ZEROES.
    pub fn can_write_zeroes(&self) -> bool {
        self.can(proto::FLAG_SEND_WRITE_ZEROES)
    }

    /// The error of every request once the disk is broken.
    fn broken(&self, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!(
                "the connection to the NBD export {} broke ({why})",
                self.shown
            ),
        )
    }

    /// The most connections it opens at once: 4 to a multi-conn export,
    /// else 1.
    pub fn max_connections(&self) -> usize {
        self.most
    }

    /// Whether its connections use structured replies.
    pub fn structured(&self) -> bool {
        self.lock().sessions.iter().all(|s| s.structured())
    }

    fn can(&self, flag: u16) -> bool {
        self.flags() & flag != 0
    }

    /// Sends `kind` over `[offset, offset + len)` in requests the server
    /// takes, all in flight at once.
    fn ranged(&self, kind: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        let asks: Vec<Ask<'_>> = parts(offset, len)
            .map(|(at, n)| (kind, flags, at, n, &[][..]))
            .collect();
        self.exchange(&asks)?
            .iter()
            .try_for_each(|a| reply(a.errno))
    }
}

impl Drop for NbdDisk {
    fn drop(&mut self) {
        for s in &self.lock().sessions {
            s.disconnect();
        }
    }
}

/// `[offset, offset + len)` cut into requests of at most
/// [`proto::MAX_REQUEST`] bytes: (offset, length).
fn parts(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    let most = u64::from(proto::MAX_REQUEST);
    (0..len.div_ceil(most)).map(move |i| {
        let at = offset + i * most;
        (at, (offset + len - at).min(most) as u32)
    })
}

/// A socket's timeout says EAGAIN: the server did not answer in time,
/// which the group reads as a disk past its deadline (and, for a remote
/// one, a lost link), as it reads the queue's own deadline.
fn no_answer(e: io::Error, timeout: Duration) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} s", timeout.as_secs_f64()),
        )
    } else {
        e
    }
}

/// An NBD error reply as the errno it stands for (the protocol's values
/// are Linux's): kept raw, as a file's would be, so that a full export
/// (ENOSPC) fails the whole disk as a full filesystem does.
fn reply(errno: u32) -> io::Result<()> {
    match errno {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

impl NbdDisk {
    fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout.load(Ordering::Relaxed))
    }
}

impl Disk for NbdDisk {
    fn set_timeout(&self, timeout: Duration) {
        self.timeout.store(
            timeout.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
        for s in &self.lock().sessions {
            s.set_timeout(timeout);
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let asks: Vec<Ask<'_>> = parts(offset, buf.len() as u64)
            .map(|(at, n)| (proto::CMD_READ, 0, at, n, &[][..]))
            .collect();
        let answers = self.exchange(&asks)?;
        for (a, part) in answers
            .into_iter()
            .zip(buf.chunks_mut(proto::MAX_REQUEST as usize))
        {
            reply(a.errno)?;
            match a.data {
                Some(d) if d.len() == part.len() => part.copy_from_slice(&d),
                _ => return Err(io::Error::other("a read was answered without its data")),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let asks: Vec<Ask<'_>> = parts(offset, buf.len() as u64)
            .zip(buf.chunks(proto::MAX_REQUEST as usize))
            .map(|((at, n), part)| (proto::CMD_WRITE, 0, at, n, part))
            .collect();
        self.exchange(&asks)?
            .iter()
            .try_for_each(|a| reply(a.errno))
    }

    fn flush(&self) -> io::Result<()> {
        let answers = self.exchange(&[(proto::CMD_FLUSH, 0, 0, 0, &[])])?;
        reply(answers[0].errno)
    }

    /// All in flight at once. Made durable by FUA on each write where the
    /// export takes it: one round trip, where writes and then a flush
    /// (which covers only writes already answered) take two.
    fn write_all_then_flush(&self, writes: &[(u64, &[u8])], flush: bool) -> io::Result<()> {
        let overlap = writes.iter().enumerate().any(|(i, (a, da))| {
            writes[i + 1..]
                .iter()
                .any(|(b, db)| *a < b + db.len() as u64 && *b < a + da.len() as u64)
        });
        if overlap {
            // In order, as the trait says: one at a time.
            for (offset, data) in writes {
                self.write_at(data, *offset)?;
            }
            return if flush { self.flush() } else { Ok(()) };
        }
        let fua = flush && !writes.is_empty() && self.can(proto::FLAG_SEND_FUA);
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        let asks: Vec<Ask<'_>> = writes
            .iter()
            .flat_map(|(offset, data)| {
                parts(*offset, data.len() as u64)
                    .zip(data.chunks(proto::MAX_REQUEST as usize))
                    .map(move |((at, n), part)| (proto::CMD_WRITE, flags, at, n, part))
            })
            .collect();
        self.exchange(&asks)?
            .iter()
            .try_for_each(|a| reply(a.errno))?;
        if flush && !fua { self.flush() } else { Ok(()) }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.can(proto::FLAG_SEND_WRITE_ZEROES) {
            return self.ranged(proto::CMD_WRITE_ZEROES, 0, offset, len);
        }
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.can(proto::FLAG_SEND_WRITE_ZEROES) {
            return self.ranged(
                proto::CMD_WRITE_ZEROES,
                proto::CMD_FLAG_NO_HOLE,
                offset,
                len,
            );
        }
        self.write_zeroes(offset, len)
    }

    /// Asks the export (NBD_CMD_BLOCK_STATUS, `base:allocation`, one
    /// extent) where its holes are, when the server agreed to say: a hole
    /// is what reads as zeroes (`NBD_STATE_ZERO`; a hole alone may not).
    /// A server that cannot tell, or answers with an error, says data.
    fn extent_at(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let knows = self.lock().sessions.iter().all(|s| s.knows_allocation());
        if !knows || len == 0 {
            return Ok((true, len.max(1)));
        }
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return Ok((true, len.max(1)));
        }
        let n = (end - offset).min(u64::from(proto::MAX_REQUEST)) as u32;
        let answers = self.exchange(&[(
            proto::CMD_BLOCK_STATUS,
            proto::CMD_FLAG_REQ_ONE,
            offset,
            n,
            &[],
        )])?;
        let a = &answers[0];
        match a.extents.first() {
            Some(&(bytes, flags)) if a.errno == 0 => {
                let bytes = bytes.clamp(1, u64::from(n));
                Ok((flags & proto::STATE_ZERO == 0, bytes))
            }
            _ => Ok((true, u64::from(n))),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.can(proto::FLAG_SEND_TRIM) {
            return self.ranged(proto::CMD_TRIM, 0, offset, len);
        }
        Ok(())
    }

    /// Broken once a request failed, and once a connection ended on its
    /// own (the server closed it or stopped answering while idle): the
    /// group asks every second, so a server gone is seen without a write.
    fn health(&self) -> io::Result<()> {
        let mut pool = self.lock();
        if pool.broken.is_none()
            && let Some(e) = pool.sessions.iter().find_map(|s| s.ended())
        {
            pool.broken = Some(e.to_string());
            pool.give_up();
        }
        match &pool.broken {
            Some(why) => Err(self.broken(why)),
            None => Ok(()),
        }
    }

    fn reconnect(&self, check: &dyn Fn(&dyn Disk) -> io::Result<()>) -> Option<io::Result<()>> {
        Some(self.mend(check))
    }

    fn as_nbd_disk(&self) -> Option<&NbdDisk> {
        Some(self)
    }

    fn identity(&self) -> DiskIdentity {
        DiskIdentity {
            controller: Some(self.uri.controller()),
            rotational: Some(self.can(proto::FLAG_ROTATIONAL)),
            model: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_the_nbd_uri_specification_writes_them() {
        let u = NbdUri::parse("nbd://example.com/disk0").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "example.com".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "disk0");
        let u = NbdUri::parse("nbd://10.0.0.2:10810/").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "10.0.0.2".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[fe80::1]:7000/a%20b").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "fe80::1".into(),
                port: 7000
            }
        );
        assert_eq!(u.export, "a b");
        let u = NbdUri::parse("NBD://h").unwrap();
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///data?socket=/run/x%2Cy.sock").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Unix {
                socket: "/run/x,y.sock".into()
            }
        );
        assert_eq!(u.export, "data");
        assert_eq!(u.tls, None);
        let u = NbdUri::parse("nbds://h.example:7000/x?tls-certificates=/etc/pki/c").unwrap();
        assert_eq!(
            u.tls,
            Some(ClientTls {
                certificates: "/etc/pki/c".into(),
                hostname: "h.example".into()
            })
        );
        let u = NbdUri::parse(
            "nbds+unix:///x?socket=/s&tls-certificates=/c&tls-hostname=server.example",
        )
        .unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Unix {
                socket: "/s".into()
            }
        );
        assert_eq!(u.tls.unwrap().hostname, "server.example");
        let u = NbdUri::parse("nbds+unix:///x?tls-certificates=/c&socket=/s").unwrap();
        assert_eq!(u.tls.unwrap().hostname, "localhost");
        assert!(NbdUri::is_uri("nbd+unix:///?socket=/s"));
        assert!(NbdUri::is_uri("NBD://h/x"));
        assert!(NbdUri::is_uri("nbd+vsock:///x"));
        assert!(!NbdUri::is_uri("/dev/sdb"));
        assert!(!NbdUri::is_uri("nbdstore.img"), "a file named nbd...");
        assert!(!NbdUri::is_uri("disks/nbds.img"));
    }

    #[test]
    fn malformed_uris_are_refused_naming_what_is_wrong() {
        for (uri, says) in [
            ("nbd+unix:///data", "names no socket"),
            ("nbd+unix:///data?sock=/x", "query parameter \"sock\""),
            ("nbd://:10809/x", "names no host"),
            ("nbd://h:99999/x", "not 0 to 65535"),
            ("nbd://h/x?socket=/s", "take none"),
            ("nbds://h/x", "names no certificates"),
            ("nbds://h/x?tls-certificates=certs", "not an absolute path"),
            ("nbd://h/x?tls-certificates=/c", "take none"),
            ("nbds+unix:///x?tls-certificates=/c", "names no socket"),
            ("nbd://h/%zz", "malformed export name"),
            ("nbd://[::1/x", "unclosed"),
            ("http://h/x", "which disks do not speak"),
            ("nbd+vsock:///x", "which disks do not speak"),
            ("nbd+unix:///x?socket=s.sock", "not an absolute path"),
            ("nbd://user@h/x", "a user"),
            ("nbd://h/x#y", "a fragment"),
            ("nbd://[::1]junk/x", "after its IPv6 host"),
            ("nbd://::1/x", "without brackets"),
            ("nbd://h/%+1", "malformed export name"),
        ] {
            let e = NbdUri::parse(uri).unwrap_err();
            assert!(e.contains(says), "{uri}: {e}");
        }
    }
}
