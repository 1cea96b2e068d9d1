//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls and X.509 certificates in
//! the files qemu-nbd reads from its `dir`: `ca-cert.pem`,
//! `server-cert.pem` and `server-key.pem`. Clients must show a certificate
//! the CA signed unless peer verification is turned off (as qemu-nbd's
//! `verify-peer`, on by default for a server).
//!
//! Once the TLS handshake is done, a thread decrypts what the client sends
//! into one end of a Unix socket pair, and the server reads the other end
//! as it reads a plain client's socket (limits and deadlines hold
//! unchanged). Replies go to the connection's writer thread, which
//! encrypts them straight from their buffers onto the client's socket
//! (`TlsOut`), so encryption runs beside the thread that reads requests
//! and completes their I/O, and a client that takes nothing for the stall
//! time is cut as a plain one is. The kernel here has no kTLS, which
//! would spare the copy into the pair.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::server::{Sock, send_now, wait_writable};

/// Whether clients must, may or cannot use TLS (`serve --tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused.
    #[default]
    Off,
    /// Clients choose.
    Allow,
    /// Every option but `NBD_OPT_STARTTLS` is refused until TLS runs.
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "allow" => Ok(TlsMode::Allow),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!("TLS mode {s:?} is none of require, allow and off")),
        }
    }
}

/// The server's TLS set-up.
pub struct Tls {
    config: Arc<ServerConfig>,
    require: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("require", &self.require)
            .finish()
    }
}

/// Reads every certificate of a PEM file, naming the file on failure.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

impl Tls {
    /// Loads the certificates in `dir`. `verify_peer`: clients must show a
    /// certificate signed by `ca-cert.pem`.
    pub fn load(dir: &Path, mode: TlsMode, verify_peer: bool) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates(&dir.join("server-cert.pem"))?;
        let key_path = dir.join("server-key.pem");
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| format!("cannot read a private key from {}: {e}", key_path.display()))?;
        let verifier = if verify_peer {
            let mut roots = RootCertStore::empty();
            let ca = dir.join("ca-cert.pem");
            let (added, _) = roots.add_parsable_certificates(certificates(&ca)?);
            if added == 0 {
                return Err(format!("{} holds no usable CA certificate", ca.display()));
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("cannot verify clients with {}: {e}", ca.display()))?
        } else {
            WebPkiClientVerifier::no_client_auth()
        };
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up failed: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| {
                format!(
                    "the certificate and key in {} do not go together: {e}",
                    dir.display()
                )
            })?;
        Ok(Tls {
            config: Arc::new(config),
            require: mode == TlsMode::Require,
        })
    }

    /// Clients must use TLS.
    pub fn required(&self) -> bool {
        self.require
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the TLS handshake on `sock` (by `deadline`), then starts the
/// thread that decrypts what the client sends, and returns the plaintext
/// socket the server reads from and the encrypting side it writes to. A
/// client that takes nothing for `stall` is cut.
pub(super) fn start(
    tls: &Tls,
    sock: &Sock,
    deadline: Instant,
    stall: Duration,
) -> io::Result<(Sock, TlsOut)> {
    let mut raw = sock.try_clone()?;
    let mut conn = ServerConnection::new(tls.config.clone()).map_err(io::Error::other)?;
    // Replies are encrypted whole and sent as the socket takes them: no
    // limit on what waits for that (a reply's share of the in-flight
    // budget is held until it is all out).
    conn.set_buffer_limit(None);
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not finish its TLS handshake in time",
            ));
        }
        raw.set_read_timeout(Some(left))?;
        raw.set_write_timeout(Some(left))?;
        conn.complete_io(&mut raw)?;
    }
    raw.set_read_timeout(None)?;
    raw.set_write_timeout(None)?;
    let (plain, inner) = UnixStream::pair()?;
    let conn = Arc::new(Mutex::new(conn));
    let (c, r) = (conn.clone(), raw.try_clone()?);
    std::thread::Builder::new()
        .name("nbd-tls-in".into())
        .spawn(move || inbound(c, r, inner))?;
    Ok((Sock::Unix(plain), TlsOut { conn, raw, stall }))
}

/// Sends on a socket without waiting (`EWOULDBLOCK` when it takes
/// nothing): what rustls writes its records to.
struct NonBlocking<'a>(&'a Sock);

impl Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_now(self.0.raw_fd(), &[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        send_now(self.0.raw_fd(), bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes of plaintext encrypted at a time before the socket is offered
/// what is ready.
const ENCRYPT_PIECE: usize = 64 * 1024;

/// Sends what `c` has encrypted and the socket takes now.
fn send_some(c: &mut ServerConnection, raw: &Sock) -> io::Result<()> {
    while c.wants_write() {
        match c.write_tls(&mut NonBlocking(raw)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends everything `conn` has encrypted, waiting for the socket without
/// holding `conn` (the other direction goes on meanwhile); fails with
/// `TimedOut` once the client has taken nothing for `stall`.
fn send_everything(conn: &Mutex<ServerConnection>, raw: &Sock, stall: Duration) -> io::Result<()> {
    let mut progress = Instant::now();
    loop {
        {
            let mut c = lock(conn);
            if !c.wants_write() {
                return Ok(());
            }
            match c.write_tls(&mut NonBlocking(raw)) {
                Ok(_) => {
                    progress = Instant::now();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let left = stall.saturating_sub(progress.elapsed());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s", stall.as_secs()),
            ));
        }
        wait_writable(raw.raw_fd(), left)?;
    }
}

/// The writing side of a TLS connection: the connection's writer thread
/// encrypts replies from their buffers straight onto the client's
/// socket. The decrypting thread may add TLS's own records (a key update)
/// in between, in order, under `conn`.
pub(super) struct TlsOut {
    conn: Arc<Mutex<ServerConnection>>,
    raw: Sock,
    stall: Duration,
}

impl TlsOut {
    /// Encrypts all of `slices` and sends everything, waiting for the
    /// client as [`send_everything`] does.
    /// The client gets each piece as soon as it is encrypted (what the
    /// socket takes at once), so its decryption overlaps the encryption of
    /// the next.
    ///
    /// What waits encrypted stays within about a piece: when the socket
    /// is full, the next piece is encrypted only once it takes the last,
    /// so a reply's bytes are not held twice (plaintext and ciphertext)
    /// beyond that.
    pub(super) fn send_all(&self, slices: &[IoSlice<'_>], stall: Duration) -> io::Result<()> {
        for s in slices {
            for piece in s.chunks(ENCRYPT_PIECE) {
                let full = {
                    let mut c = lock(&self.conn);
                    c.writer().write_all(piece)?;
                    send_some(&mut c, &self.raw)?;
                    c.wants_write()
                };
                if full {
                    send_everything(&self.conn, &self.raw, stall)?;
                }
            }
        }
        send_everything(&self.conn, &self.raw, stall)
    }

    pub(super) fn shutdown(&self, how: Shutdown) {
        self.raw.shutdown(how);
    }
}

impl Write for TlsOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send_all(&[IoSlice::new(buf)], self.stall)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for TlsOut {
    /// The connection is over: `close_notify` if the socket takes it at
    /// once, then the socket is shut both ways, which ends the decrypting
    /// thread whatever the client does.
    fn drop(&mut self) {
        {
            let mut c = lock(&self.conn);
            c.send_close_notify();
            while c.wants_write() && c.write_tls(&mut NonBlocking(&self.raw)).is_ok() {}
        }
        self.raw.shutdown(Shutdown::Both);
    }
}

/// Decrypts what the client sends into `inner`, until the client closes
/// (or breaks TLS); then the server reads the end of the stream. What
/// came with the end of the TLS handshake (a client may send its first
/// option in the same packet) goes first.
fn inbound(conn: Arc<Mutex<ServerConnection>>, mut raw: Sock, mut inner: UnixStream) {
    let mut wire = vec![0u8; 64 * 1024];
    let mut plain = Vec::with_capacity(256 * 1024);
    let mut n = 0;
    loop {
        plain.clear();
        let (pumped, sent) = {
            let mut c = lock(&conn);
            let pumped = pump(&mut c, &wire[..n], &mut plain);
            // Answers of TLS's own (a key update, session tickets; the
            // alert that says why TLS failed) go out in order with the
            // replies: what the socket takes now; the rest goes with the
            // writer's next reply. Never waiting here keeps requests
            // flowing while replies back up.
            (pumped, send_some(&mut c, &raw).is_ok())
        };
        let closed = match pumped {
            Ok(closed) => closed,
            Err(e) => {
                tracing::info!(error = %e, "TLS failed; closing the connection");
                raw.shutdown(Shutdown::Both);
                break;
            }
        };
        if !sent || inner.write_all(&plain).is_err() || closed {
            break;
        }
        n = match raw.read(&mut wire) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
    }
    let _ = inner.shutdown(Shutdown::Write);
}

/// Feeds `bytes` from the client to `c` and collects the plaintext they
/// (and what `c` held already) decrypt to; true once the client closed
/// TLS (`close_notify`).
fn pump(
    c: &mut ServerConnection,
    mut bytes: &[u8],
    plain: &mut Vec<u8>,
) -> Result<bool, rustls::Error> {
    let mut out = [0u8; 16 * 1024];
    loop {
        c.process_new_packets()?;
        loop {
            match c.reader().read(&mut out) {
                Ok(0) => return Ok(true),
                Ok(k) => plain.extend_from_slice(&out[..k]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The client went without close_notify.
                Err(_) => return Ok(true),
            }
        }
        if bytes.is_empty() {
            return Ok(false);
        }
        if c.read_tls(&mut bytes).is_err() {
            return Ok(true);
        }
    }
}
