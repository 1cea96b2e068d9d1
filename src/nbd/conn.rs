//! The client's end of a connection to an NBD server: the socket itself,
//! or the same socket carrying TLS once `NBD_OPT_STARTTLS` was accepted
//! (`nbds://` and `nbds+unix://` disks).
//!
//! A TLS connection is shared, as a plain one is, by the threads that
//! send requests and the one that reads replies: the rustls state sits
//! behind a lock taken only to encrypt or decrypt, never while waiting
//! on the socket. A writer encrypts under that lock and takes the sending
//! lock before letting it go, so records reach the socket in the order
//! they were sealed; the reader reads the socket unlocked and decrypts
//! what came under the lock. Socket timeouts, shutdowns and options act on
//! the socket underneath, as for a plain connection.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::server::Sock;

/// What a client needs for TLS: the certificates (as qemu and libnbd keep
/// them for a client: `ca-cert.pem`, and `client-cert.pem` with
/// `client-key.pem` where the server asks for one) and the name the
/// server's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub certificates: PathBuf,
    pub hostname: String,
}

fn tls_error(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot read certificates from {}: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

impl ClientTls {
    /// The rustls set-up, read from the certificates directory (again at
    /// every connection: renewed certificates are taken at the next one).
    fn config(&self) -> io::Result<(Arc<ClientConfig>, ServerName<'static>)> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let dir = &self.certificates;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let ca = dir.join("ca-cert.pem");
        let (added, _) = roots.add_parsable_certificates(certs(&ca)?);
        if added == 0 {
            return Err(invalid(format!(
                "{} holds no usable CA certificate",
                ca.display()
            )));
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS set-up failed: {e}")))?
            .with_root_certificates(roots);
        let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        if cert.exists() != key.exists() {
            let (has, lacks) = if cert.exists() {
                (&cert, &key)
            } else {
                (&key, &cert)
            };
            return Err(invalid(format!(
                "{} holds {} but not {}: a client certificate needs both",
                dir.display(),
                has.display(),
                lacks.display()
            )));
        }
        let config = if cert.exists() {
            let k = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
                invalid(format!(
                    "cannot read a private key from {}: {e}",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(certs(&cert)?, k)
                .map_err(|e| {
                    invalid(format!(
                        "the client certificate and key in {} do not go together: {e}",
                        dir.display()
                    ))
                })?
        } else {
            builder.with_no_client_auth()
        };
        let name = ServerName::try_from(self.hostname.clone()).map_err(|_| {
            invalid(format!(
                "{:?} is not a host name or address a certificate can carry",
                self.hostname
            ))
        })?;
        Ok((Arc::new(config), name))
    }
}

/// A TLS connection over a socket.
pub(super) struct TlsStream {
    raw: Sock,
    tls: Mutex<TlsState>,
    /// Held from sealing records until they are on the socket.
    sending: Mutex<()>,
}

struct TlsState {
    conn: ClientConnection,
    /// Bytes read from the socket that rustls did not take yet (it takes
    /// no more while it holds 16 KiB of plaintext not read).
    pending: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TlsState {
    /// Hands rustls what it takes of the bytes pending and opens them;
    /// returns whether it took any.
    fn feed(&mut self) -> io::Result<bool> {
        let mut rest = &self.pending[..];
        while !rest.is_empty() && self.conn.wants_read() {
            if self.conn.read_tls(&mut rest)? == 0 {
                // The server said it closes (close_notify): what follows
                // it is not read.
                rest = &[];
                break;
            }
            self.conn
                .process_new_packets()
                .map_err(|e| tls_error(format!("TLS with the server failed: {e}")))?;
        }
        let used = self.pending.len() - rest.len();
        self.pending.drain(..used);
        Ok(used > 0)
    }
}

impl TlsStream {
    /// Runs the TLS handshake on `raw` (each socket read and write within
    /// its timeouts).
    pub(super) fn handshake(raw: Sock, tls: &ClientTls) -> io::Result<TlsStream> {
        let (config, name) = tls.config()?;
        let conn = ClientConnection::new(config, name).map_err(tls_error)?;
        let s = TlsStream {
            raw,
            tls: Mutex::new(TlsState {
                conn,
                pending: Vec::new(),
            }),
            sending: Mutex::new(()),
        };
        loop {
            let (handshaking, wants_read) = {
                let st = lock(&s.tls);
                (st.conn.is_handshaking(), st.conn.wants_read())
            };
            s.send_pending()?;
            if !handshaking {
                return Ok(s);
            }
            if wants_read && s.receive()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                ));
            }
        }
    }

    /// Writes what the TLS state has sealed.
    fn send_pending(&self) -> io::Result<()> {
        let mut st = lock(&self.tls);
        let mut out = Vec::new();
        while st.conn.wants_write() {
            st.conn.write_tls(&mut out)?;
        }
        if out.is_empty() {
            return Ok(());
        }
        let _order = lock(&self.sending);
        drop(st);
        (&self.raw).write_all(&out)
    }

    /// Reads from the socket once (not holding the state) and opens what
    /// rustls takes of it; returns the bytes read (0: the server closed
    /// the socket).
    fn receive(&self) -> io::Result<usize> {
        let mut buf = vec![0u8; 16 << 10];
        let n = (&self.raw).read(&mut buf)?;
        if n == 0 {
            return Ok(0);
        }
        {
            let mut st = lock(&self.tls);
            st.pending.extend_from_slice(&buf[..n]);
            st.feed()?;
        }
        // Alerts, key updates: what the state answers goes out.
        self.send_pending()?;
        Ok(n)
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut st = lock(&self.tls);
                match st.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // Bytes read earlier that it had no room for: taken now.
                if st.feed()? {
                    continue;
                }
            }
            if self.receive()? == 0 {
                return Ok(0);
            }
        }
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut st = lock(&self.tls);
        let n = st.conn.writer().write_vectored(bufs)?;
        let mut out = Vec::new();
        while st.conn.wants_write() {
            st.conn.write_tls(&mut out)?;
        }
        let _order = lock(&self.sending);
        drop(st);
        (&self.raw).write_all(&out)?;
        Ok(n)
    }
}

/// A connection to a server, plain or with TLS.
pub(super) enum Conn {
    Plain(Sock),
    Tls(Arc<TlsStream>),
}

impl Conn {
    /// The socket underneath.
    pub(super) fn sock(&self) -> &Sock {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.raw,
        }
    }

    pub(super) fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Plain(s) => Conn::Plain(s.try_clone()?),
            Conn::Tls(t) => Conn::Tls(t.clone()),
        })
    }

    pub(super) fn shutdown(&self, how: Shutdown) {
        self.sock().shutdown(how)
    }

    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock().set_read_timeout(t)
    }

    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock().set_write_timeout(t)
    }

    pub(super) fn raw_fd(&self) -> RawFd {
        self.sock().raw_fd()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write_vectored(bufs),
            Conn::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
