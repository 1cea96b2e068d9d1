//! A small blocking NBD client: fixed newstyle handshake with `NBD_OPT_GO`
//! over a Unix socket or TCP, then one request at a time with simple
//! replies; or, handed to a [`super::session::Session`], many at once
//! (with structured replies when the handshake asked for them).
//!
//! `test-mirrors` reads each plex through it, so a plex is checked as any
//! client would see it: through the handshake, the export's advertised size
//! and flags, and the server's replies; [`crate::disk::nbd`] keeps a few of
//! them to use an export as a disk. Requests are built with
//! [`proto::encode_request`]; the few server messages a client reads are
//! decoded here.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::conn::{ClientTls, Conn, TlsStream};
use super::proto::{self, Request, be_u16, be_u32, be_u64};
use super::server::Sock;

/// A connection in the transmission phase.
pub struct Client {
    sock: Conn,
    size: u64,
    flags: u16,
    next_handle: u64,
    /// Structured replies were negotiated (only for a [`Session`]'s
    /// reader: this client's own requests read simple replies).
    ///
    /// [`Session`]: super::session::Session
    structured: bool,
    /// The id the server gave the `base:allocation` metadata context,
    /// when it agreed to it (structured replies only): block status
    /// requests may then ask where the export's holes are.
    allocation: Option<u32>,
}

/// The metadata context that says where an export's holes are.
const ALLOCATION: &str = "base:allocation";

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Client {
    /// Connects to the server on the Unix socket at `path` and enters
    /// transmission with `export`. Every read waits at most `timeout`.
    pub fn connect_unix(path: &Path, export: &str, timeout: Duration) -> io::Result<Client> {
        Client::connect_unix_with(path, export, timeout, false)
    }

    /// [`Client::connect_unix`], asking for structured replies when
    /// `structured` (for a [`super::session::Session`]).
    pub fn connect_unix_with(
        path: &Path,
        export: &str,
        timeout: Duration,
        structured: bool,
    ) -> io::Result<Client> {
        Client::connect_unix_tls(path, export, timeout, structured, None)
    }

    /// [`Client::connect_unix_with`], with TLS (`NBD_OPT_STARTTLS` first)
    /// when `tls` is given.
    pub fn connect_unix_tls(
        path: &Path,
        export: &str,
        timeout: Duration,
        structured: bool,
        tls: Option<&ClientTls>,
    ) -> io::Result<Client> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Client::start(Sock::Unix(sock), export, structured, tls)
    }

    /// Connects to the server at `host:port` over TCP (within `timeout`)
    /// and enters transmission with `export`, as [`Client::connect_unix`].
    pub fn connect_tcp(
        host: &str,
        port: u16,
        export: &str,
        timeout: Duration,
    ) -> io::Result<Client> {
        Client::connect_tcp_with(host, port, export, timeout, false)
    }

    /// [`Client::connect_tcp`], asking for structured replies when
    /// `structured`.
    pub fn connect_tcp_with(
        host: &str,
        port: u16,
        export: &str,
        timeout: Duration,
        structured: bool,
    ) -> io::Result<Client> {
        Client::connect_tcp_tls(host, port, export, timeout, structured, None)
    }

    /// [`Client::connect_tcp_with`], with TLS when `tls` is given.
    pub fn connect_tcp_tls(
        host: &str,
        port: u16,
        export: &str,
        timeout: Duration,
        structured: bool,
        tls: Option<&ClientTls>,
    ) -> io::Result<Client> {
        use std::net::ToSocketAddrs;
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
        for addr in (host, port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(sock) => {
                    sock.set_read_timeout(Some(timeout))?;
                    sock.set_write_timeout(Some(timeout))?;
                    sock.set_nodelay(true)?;
                    return Client::start(Sock::Tcp(sock), export, structured, tls);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn start(
        sock: Sock,
        export: &str,
        structured: bool,
        tls: Option<&ClientTls>,
    ) -> io::Result<Client> {
        let mut c = Client {
            sock: Conn::Plain(sock),
            size: 0,
            flags: 0,
            next_handle: 1,
            structured: false,
            allocation: None,
        };
        c.handshake(export, structured, tls)?;
        Ok(c)
    }

    /// The connection and what the handshake settled: (socket, size,
    /// flags, structured replies, the `base:allocation` context's id).
    pub(super) fn into_parts(self) -> (Conn, u64, u16, bool, Option<u32>) {
        (
            self.sock,
            self.size,
            self.flags,
            self.structured,
            self.allocation,
        )
    }

    /// Sends option `opt` with `data`.
    fn option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut out = proto::IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.sock.write_all(&out)
    }

    /// Reads one option reply to `opt`: (reply type, body).
    fn option_reply(&mut self, opt: u32) -> io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.sock.read_exact(&mut h)?;
        if be_u64(&h[0..8]) != proto::REPLY_MAGIC || be_u32(&h[8..12]) != opt {
            return Err(bad("the server sent a malformed option reply"));
        }
        let kind = be_u32(&h[12..16]);
        let len = be_u32(&h[16..20]);
        if len > proto::MAX_OPTION_LEN {
            return Err(bad(format!("the server sent a {len}-byte option reply")));
        }
        let mut body = vec![0u8; len as usize];
        self.sock.read_exact(&mut body)?;
        Ok((kind, body))
    }

    fn handshake(
        &mut self,
        export: &str,
        structured: bool,
        tls: Option<&ClientTls>,
    ) -> io::Result<()> {
        let mut greeting = [0u8; proto::HANDSHAKE_LEN];
        self.sock.read_exact(&mut greeting)?;
        if be_u64(&greeting[0..8]) != proto::NBDMAGIC || be_u64(&greeting[8..16]) != proto::IHAVEOPT
        {
            return Err(bad("the server is not a newstyle NBD server"));
        }
        let server_flags = be_u16(&greeting[16..18]);
        if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("the server does not speak fixed newstyle NBD"));
        }
        let mut flags = proto::FLAG_C_FIXED_NEWSTYLE;
        if server_flags & proto::FLAG_NO_ZEROES != 0 {
            flags |= proto::FLAG_C_NO_ZEROES;
        }
        let mut data = Vec::with_capacity(6 + export.len());
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.sock.write_all(&flags.to_be_bytes())?;
        if let Some(tls) = tls {
            self.start_tls(tls)?;
        }
        if structured {
            // Any refusal (an old server) leaves simple replies.
            self.option(proto::OPT_STRUCTURED_REPLY, &[])?;
            let mut answered = false;
            // Informational replies may come before the answer, a few.
            for _ in 0..16 {
                let (kind, _) = self.option_reply(proto::OPT_STRUCTURED_REPLY)?;
                self.structured = kind == proto::REP_ACK;
                if kind == proto::REP_ACK || kind & (1 << 31) != 0 {
                    answered = true;
                    break;
                }
            }
            if !answered {
                return Err(bad(
                    "the server never answered the option for structured replies",
                ));
            }
            if self.structured {
                self.allocation = self.set_allocation_context(export)?;
            }
        }
        self.option(proto::OPT_GO, &data)?;

        let mut export_info = None;
        loop {
            let (kind, body) = self.option_reply(proto::OPT_GO)?;
            match kind {
                proto::REP_INFO if body.len() >= 12 && be_u16(&body) == proto::INFO_EXPORT => {
                    export_info = Some((be_u64(&body[2..10]), be_u16(&body[10..12])));
                }
                proto::REP_INFO => {}
                proto::REP_ACK => break,
                proto::REP_ERR_TLS_REQD => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "the server requires TLS: name the export nbds://… or nbds+unix://… with tls-certificates=DIR",
                    ));
                }
                _ => {
                    // Only "unknown export" means the export is not there.
                    let why = if kind == proto::REP_ERR_UNKNOWN {
                        io::ErrorKind::NotFound
                    } else {
                        io::ErrorKind::Other
                    };
                    return Err(io::Error::new(
                        why,
                        format!(
                            "the server answered option GO for export {export:?} with reply type {kind:#x}: {}",
                            String::from_utf8_lossy(&body)
                        ),
                    ));
                }
            }
        }
        let (size, flags) = export_info.ok_or_else(|| {
            bad("the server did not say the export's size before entering transmission")
        })?;
        self.size = size;
        self.flags = flags;
        Ok(())
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation` on `export`: the
    /// id the server gave it, or None when it refused the option or chose
    /// no context (block status is then not asked; every byte counts as
    /// data).
    fn set_allocation_context(&mut self, export: &str) -> io::Result<Option<u32>> {
        let mut data = Vec::with_capacity(8 + export.len() + 4 + ALLOCATION.len());
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(ALLOCATION.len() as u32).to_be_bytes());
        data.extend_from_slice(ALLOCATION.as_bytes());
        self.option(proto::OPT_SET_META_CONTEXT, &data)?;
        let mut id = None;
        // One REP_META_CONTEXT per context chosen (one asked), then ACK;
        // or an error, which leaves block status unused.
        for _ in 0..16 {
            let (kind, body) = self.option_reply(proto::OPT_SET_META_CONTEXT)?;
            match kind {
                proto::REP_META_CONTEXT
                    if body.len() >= 4 && &body[4..] == ALLOCATION.as_bytes() =>
                {
                    id = Some(be_u32(&body[0..4]));
                }
                proto::REP_ACK => return Ok(id),
                k if k & (1 << 31) != 0 => return Ok(None),
                _ => {}
            }
        }
        Err(bad(
            "the server never finished answering the option for metadata contexts",
        ))
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake; the rest of the
    /// connection runs over TLS. A server that refuses is not talked to
    /// in the clear.
    fn start_tls(&mut self, tls: &ClientTls) -> io::Result<()> {
        self.option(proto::OPT_STARTTLS, &[])?;
        let (kind, body) = self.option_reply(proto::OPT_STARTTLS)?;
        if kind != proto::REP_ACK {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the server refused TLS (reply type {kind:#x}: {})",
                    String::from_utf8_lossy(&body)
                ),
            ));
        }
        let raw = self.sock.sock().try_clone()?;
        self.sock = Conn::Tls(std::sync::Arc::new(TlsStream::handshake(raw, tls)?));
        Ok(())
    }

    /// The export's size as the server advertised it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags the server advertised (`NBD_FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// True when the server advertised `NBD_FLAG_READ_ONLY`.
    pub fn read_only(&self) -> bool {
        self.flags & proto::FLAG_READ_ONLY != 0
    }

    /// Fills `buf` from `offset`, in requests of at most
    /// [`proto::MAX_REQUEST`] bytes. An error reply becomes an
    /// `io::Error` naming the NBD error value.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.read_answered(offset, buf)? {
            0 => Ok(()),
            errno => Err(io::Error::other(format!(
                "the server answered a read of {} bytes at offset {offset} with NBD error {errno}",
                buf.len()
            ))),
        }
    }

    /// [`Client::read`] that returns the NBD error value of the first
    /// part answered with one (0: all of `buf` was read); an `Err` is the
    /// connection's failure.
    pub fn read_answered(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<u32> {
        for (i, part) in buf.chunks_mut(proto::MAX_REQUEST as usize).enumerate() {
            let at = offset + (i as u64) * u64::from(proto::MAX_REQUEST);
            let errno = self.request(proto::CMD_READ, at, part.len() as u32, &[])?;
            if errno != 0 {
                return Ok(errno);
            }
            self.sock.read_exact(part)?;
        }
        Ok(0)
    }

    /// Sends one request (with `data` for a WRITE) and reads its reply
    /// header; returns the NBD error value (0: success). A READ's data
    /// follows on the socket.
    pub fn request(&mut self, kind: u16, offset: u64, len: u32, data: &[u8]) -> io::Result<u32> {
        self.request_with(kind, 0, offset, len, data)
    }

    /// [`Client::request`] with command flags (`NBD_CMD_FLAG_*`).
    pub fn request_with(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u32> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut out = proto::encode_request(&Request {
            flags,
            kind,
            handle,
            offset,
            len: len.into(),
        })
        .to_vec();
        out.extend_from_slice(data);
        self.sock.write_all(&out)?;
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        self.sock.read_exact(&mut h)?;
        if be_u32(&h[0..4]) != proto::SIMPLE_REPLY_MAGIC {
            return Err(bad("the server sent a reply with bad magic"));
        }
        if be_u64(&h[8..16]) != handle {
            return Err(bad("the server answered a request that was not asked"));
        }
        Ok(be_u32(&h[4..8]))
    }

    /// Ends the session politely (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) {
        let r = proto::encode_request(&Request {
            flags: 0,
            kind: proto::CMD_DISC,
            handle: 0,
            offset: 0,
            len: 0,
        });
        let _ = self.sock.write_all(&r);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::disk::AlignedBuf;
    use crate::nbd::server::{self, Done, Export, Listen, Server};

    /// Bytes in memory, read-only or not (the session's tests use it too).
    pub(in crate::nbd) struct Mem {
        pub(in crate::nbd) data: Vec<u8>,
        pub(in crate::nbd) read_only: bool,
    }

    impl Export for Mem {
        fn name(&self) -> &str {
            "mem"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read(&self, offset: u64, len: usize, done: Done<AlignedBuf>) {
            let o = offset as usize;
            done(Ok(AlignedBuf::from_slice(&self.data[o..o + len])));
        }
        fn write(&self, _: u64, _: AlignedBuf, _: bool, done: Done<()>) {
            done(Ok(()))
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool, done: Done<()>) {
            done(Ok(()))
        }
        fn flush(&self, done: Done<()>) {
            done(Ok(()))
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
    }

    fn serve(read_only: bool) -> (tempfile::TempDir, Server, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let server = Server::new(vec![Arc::new(Mem {
            data: data.clone(),
            read_only,
        })]);
        server.serve(server::bind(&Listen::Unix(sock.clone())).unwrap());
        (dir, server, sock, data)
    }

    #[test]
    fn reads_what_the_export_holds_and_sees_its_flags() {
        let (_dir, server, sock, data) = serve(false);
        let mut c = Client::connect_unix(&sock, "mem", Duration::from_secs(10)).unwrap();
        assert_eq!(c.size(), data.len() as u64);
        assert!(!c.read_only());
        let mut buf = vec![0u8; 5000];
        c.read(1000, &mut buf).unwrap();
        assert_eq!(buf, data[1000..6000]);
        c.disconnect();
        server.shutdown();
    }

    #[test]
    fn read_only_export_is_advertised_and_refuses_writes_with_eperm() {
        let (_dir, server, sock, data) = serve(true);
        let mut c = Client::connect_unix(&sock, "mem", Duration::from_secs(10)).unwrap();
        assert!(c.read_only());
        let payload = vec![0xaau8; 4096];
        assert_eq!(
            c.request(proto::CMD_WRITE, 0, 4096, &payload).unwrap(),
            proto::EPERM
        );
        assert_eq!(
            c.request(proto::CMD_WRITE_ZEROES, 0, 4096, &[]).unwrap(),
            proto::EPERM
        );
        assert_eq!(
            c.request(proto::CMD_TRIM, 0, 4096, &[]).unwrap(),
            proto::EPERM
        );
        // The connection goes on after the refusals.
        let mut buf = vec![0u8; 4096];
        c.read(0, &mut buf).unwrap();
        assert_eq!(buf, data[..4096]);
        c.disconnect();
        server.shutdown();
    }

    #[test]
    fn an_unknown_export_is_an_error() {
        let (_dir, server, sock, _) = serve(true);
        let e = Client::connect_unix(&sock, "nope", Duration::from_secs(10))
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        server.shutdown();
    }
}
