//! A disk that is an NBD export on this machine or another: served by
//! qemu-nbd, nbdkit (any plugin) or another mirrorvol, named by a URI as
//! the NBD URI specification writes them:
//!
//! ```text
//! nbd://HOST[:PORT]/EXPORT            TCP (port 10809 by default)
//! nbd+unix:///EXPORT?socket=PATH      a Unix socket
//! ```
//!
//! The connections are made when the disk is opened, all to the export
//! whose label assembly then reads: several only when the server
//! advertises `NBD_FLAG_CAN_MULTI_CONN` (without it, a flush on one
//! connection need not cover writes made on another, and servers such as
//! qemu-nbd take one client unless told more). Each request borrows one
//! and gives it back when its reply came. A connection that fails breaks
//! the disk: every later request fails and [`Disk::health`] says so, and
//! the group fails the disk. Only [`Disk::reconnect`] mends it: it
//! connects again and puts the new connections in service only once the
//! caller has read what they reach (the group checks the label, config
//! and generation: what answers at the same address later may be another
//! export, or this one rolled back). Connections lent before a break are
//! never given back to the pool after it. An export that cannot flush is refused: a mirror's
//! bitmap and config must be durable before the writes they cover are
//! acknowledged, and such an export could only promise that by lying.
//! A read-only export is refused too.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::{Disk, DiskIdentity};
use crate::nbd::client::Client;
use crate::nbd::proto;

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
        if scheme.starts_with("nbds") {
            return Err(format!(
                "NBD URI {s:?} asks for TLS, which disks over NBD do not speak yet: use nbd:// or nbd+unix://"
            ));
        }
        if scheme != "nbd" && scheme != "nbd+unix" {
            return Err(format!(
                "NBD URI {s:?} has the scheme {scheme}://, which disks do not speak: use nbd:// or nbd+unix://"
            ));
        }
        let rest = &s[scheme.len() + 3..];
        if scheme == "nbd+unix" {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| format!("NBD URI {s:?} names no socket: add ?socket=PATH"))?;
            if !path.is_empty() && !path.starts_with('/') {
                return Err(format!(
                    "NBD URI {s:?} names a host; a Unix socket URI is nbd+unix:///EXPORT?socket=PATH"
                ));
            }
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| format!("NBD URI {s:?} names no socket: add ?socket=PATH"))?;
            let socket = decode(socket, "socket path")?;
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
            });
        }
        if rest.contains('?') {
            return Err(format!(
                "NBD URI {s:?} has a query, which nbd:// URIs do not take"
            ));
        }
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') || rest.contains('#') {
            return Err(format!(
                "NBD URI {s:?} has a user or a fragment, which NBD URIs do not take"
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
        })
    }

    /// Opens one connection to the export.
    fn connect(&self, timeout: Duration) -> io::Result<Client> {
        match &self.address {
            NbdAddress::Unix { socket } => Client::connect_unix(socket, &self.export, timeout),
            NbdAddress::Tcp { host, port } => {
                Client::connect_tcp(host, *port, &self.export, timeout)
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
    /// Connections free for the next request; `broken` once one failed.
    pool: Mutex<Pool>,
    returned: Condvar,
    /// The connections made at open.
    most: usize,
    /// What each request (and each connection attempt) waits at most.
    timeout: Duration,
}

struct Pool {
    idle: Vec<Client>,
    broken: Option<String>,
    /// Raised by every reconnection: a connection lent before it is not
    /// taken back.
    epoch: u64,
    /// Connections lent out now (a request on each).
    lent: usize,
}

/// Connections to an export that can take several (multi-conn).
const MULTI_CONN: usize = 4;

impl std::fmt::Debug for NbdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdDisk({}, {} bytes)", self.shown, self.size)
    }
}

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
        let mut idle = vec![first];
        while idle.len() < most {
            let c = connect()?;
            if (c.size(), c.flags()) != (size, flags) {
                return refuse(format!(
                    "the NBD export {shown} changed between two connections"
                ));
            }
            idle.push(c);
        }
        Ok(NbdDisk {
            uri,
            shown: shown.to_string(),
            size,
            flags: flags.into(),
            pool: Mutex::new(Pool {
                idle,
                broken: None,
                epoch: 0,
                lent: 0,
            }),
            returned: Condvar::new(),
            most,
            timeout,
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
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.broken
                .get_or_insert_with(|| "reconnecting".to_string());
            for c in pool.idle.drain(..) {
                c.abort();
            }
            // Requests on lent connections end within the socket's timeout.
            let limit = std::time::Instant::now() + 2 * self.timeout;
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
                    .returned
                    .wait_timeout(pool, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let fresh = NbdDisk::open(&self.shown, self.timeout)?;
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
        let conns = std::mem::take(&mut fresh.pool.lock().unwrap_or_else(|e| e.into_inner()).idle);
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.epoch += 1;
        pool.idle = conns;
        pool.broken = None;
        self.flags.store(fresh.flags(), Ordering::Relaxed);
        drop(pool);
        self.returned.notify_all();
        Ok(())
    }

    fn flags(&self) -> u16 {
        self.flags.load(Ordering::Relaxed)
    }

    /// Runs `op` on a free connection and gives it back; when `op` fails
    /// (the connection did: an error reply is an answer, in step) or
    /// panics, the disk is broken for good.
    fn with<T>(&self, op: impl FnOnce(&mut Client) -> io::Result<T>) -> io::Result<T> {
        let lock = || self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let mut pool = lock();
        let c = loop {
            if let Some(why) = &pool.broken {
                return Err(self.broken(why));
            }
            if let Some(c) = pool.idle.pop() {
                break c;
            }
            pool = self.returned.wait(pool).unwrap_or_else(|e| e.into_inner());
        };
        let epoch = pool.epoch;
        pool.lent += 1;
        drop(pool);
        /// Gives the connection back, or breaks the disk when it is not
        /// given back (a failure, or a panic in between). A connection lent
        /// before a reconnection is dropped, whatever became of it.
        struct Lent<'a> {
            disk: &'a NbdDisk,
            conn: Option<Client>,
            why: String,
            epoch: u64,
        }
        impl Drop for Lent<'_> {
            fn drop(&mut self) {
                // A panic mid-request may have left the connection out of
                // step with the server's replies.
                if std::thread::panicking() {
                    self.conn = None;
                }
                let mut pool = self.disk.pool.lock().unwrap_or_else(|e| e.into_inner());
                pool.lent -= 1;
                match self.conn.take() {
                    Some(c) if pool.epoch != self.epoch => c.abort(),
                    Some(c) if pool.broken.is_none() => pool.idle.push(c),
                    Some(c) => c.abort(),
                    None if pool.epoch != self.epoch => {}
                    None => {
                        pool.broken.get_or_insert(std::mem::take(&mut self.why));
                    }
                }
                drop(pool);
                self.disk.returned.notify_all();
            }
        }
        let mut lent = Lent {
            disk: self,
            conn: Some(c),
            why: "a request did not finish".into(),
            epoch,
        };
        let conn = lent.conn.as_mut().expect("lent above");
        let r = op(conn).map_err(|e| no_answer(e, self.timeout));
        if let Err(e) = &r {
            lent.why = e.to_string();
            if let Some(c) = lent.conn.take() {
                c.abort();
            }
        }
        r
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

    fn can(&self, flag: u16) -> bool {
        self.flags() & flag != 0
    }

    /// Sends `kind` over `[offset, offset + len)` in requests the server
    /// takes, each answered before the next.
    fn ranged(&self, kind: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(u64::from(proto::MAX_REQUEST)) as u32;
            reply(self.with(|c| shut(c.request_with(kind, flags, at, n, &[])))?)?;
            at += u64::from(n);
        }
        Ok(())
    }
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

/// A reply of `NBD_ESHUTDOWN` (the server is going away) ends the
/// connection, as a broken one does: kept, it would hold the server up
/// and fail every request after.
fn shut(r: io::Result<u32>) -> io::Result<u32> {
    match r {
        Ok(e) if e == libc::ESHUTDOWN as u32 => Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)),
        r => r,
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

impl Disk for NbdDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        reply(self.with(|c| shut(c.read_answered(offset, buf)))?)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (i, part) in buf.chunks(proto::MAX_REQUEST as usize).enumerate() {
            let at = offset + (i as u64) * u64::from(proto::MAX_REQUEST);
            let len = part.len() as u32;
            reply(self.with(|c| shut(c.request_with(proto::CMD_WRITE, 0, at, len, part)))?)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        reply(self.with(|c| shut(c.request(proto::CMD_FLUSH, 0, 0, &[])))?)
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

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.can(proto::FLAG_SEND_TRIM) {
            return self.ranged(proto::CMD_TRIM, 0, offset, len);
        }
        Ok(())
    }

    fn health(&self) -> io::Result<()> {
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        match &pool.broken {
            Some(why) => Err(self.broken(why)),
            None => Ok(()),
        }
    }

    fn reconnect(&self, check: &dyn Fn(&dyn Disk) -> io::Result<()>) -> Option<io::Result<()>> {
        Some(self.mend(check))
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
            ("nbd+unix:///data?sock=/x", "names no socket"),
            ("nbd://:10809/x", "names no host"),
            ("nbd://h:99999/x", "not 0 to 65535"),
            ("nbd://h/x?socket=/s", "do not take"),
            ("nbds://h/x", "TLS"),
            ("nbd://h/%zz", "malformed export name"),
            ("nbd://[::1/x", "unclosed"),
            ("http://h/x", "which disks do not speak"),
            ("nbd+vsock:///x", "which disks do not speak"),
            ("nbd+unix:///x?socket=s.sock", "not an absolute path"),
            ("nbd://user@h/x", "a user or a fragment"),
            ("nbd://h/x#y", "a user or a fragment"),
            ("nbd://[::1]junk/x", "after its IPv6 host"),
            ("nbd://::1/x", "without brackets"),
            ("nbd://h/%+1", "malformed export name"),
        ] {
            let e = NbdUri::parse(uri).unwrap_err();
            assert!(e.contains(says), "{uri}: {e}");
        }
    }
}
