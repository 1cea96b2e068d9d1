//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls and X.509 certificates in
//! the files qemu-nbd reads from its `dir`: `ca-cert.pem`,
//! `server-cert.pem` and `server-key.pem`. Clients must show a certificate
//! the CA signed unless peer verification is turned off (as qemu-nbd's
//! `verify-peer`, on by default for a server).
//!
//! Once the TLS handshake is done, two threads carry the connection: one
//! decrypts what the client sends into one end of a Unix socket pair, the
//! other encrypts what the server writes on it. The server's transmission
//! phase reads and writes the other end as it does a plain client's socket,
//! so everything it does (limits, deadlines, replies written by
//! completions) holds under TLS unchanged. The kernel here has no kTLS,
//! which would spare the copies.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::server::Sock;

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

/// Runs the TLS handshake on `sock` (by `deadline`), then starts the two
/// threads that carry the connection, and returns the plaintext socket the
/// server goes on with. A client that reads nothing for `stall` is cut.
pub(super) fn start(
    tls: &Tls,
    sock: &Sock,
    deadline: Instant,
    stall: Duration,
) -> io::Result<Sock> {
    let mut raw = sock.try_clone()?;
    let mut conn = ServerConnection::new(tls.config.clone()).map_err(io::Error::other)?;
    // What the server writes is encrypted and sent at once: no limit on
    // plaintext waiting for that.
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
    raw.set_write_timeout(Some(stall))?;
    let (plain, inner) = UnixStream::pair()?;
    let conn = Arc::new(Mutex::new(conn));
    let (c, r, i) = (conn.clone(), raw.try_clone()?, inner.try_clone()?);
    std::thread::Builder::new()
        .name("nbd-tls-in".into())
        .spawn(move || inbound(c, r, i))?;
    std::thread::Builder::new()
        .name("nbd-tls-out".into())
        .spawn(move || outbound(conn, raw, inner))?;
    Ok(Sock::Unix(plain))
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
        let pumped = {
            let mut c = lock(&conn);
            let r = pump(&mut c, &wire[..n], &mut plain);
            // Answers of TLS's own (a key update, session tickets) go out
            // in order with the records the other thread writes: under
            // the same lock.
            let mut flushed = true;
            while flushed && c.wants_write() {
                flushed = c.write_tls(&mut raw).is_ok();
            }
            if let Err(e) = &r {
                tracing::info!(error = %e, "TLS failed; closing the connection");
                raw.shutdown(Shutdown::Both);
            }
            r.ok().filter(|_| flushed)
        };
        let Some(closed) = pumped else {
            break;
        };
        if inner.write_all(&plain).is_err() || closed {
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

/// Encrypts what the server writes on `inner` to the client. When the
/// client's side fails, what the server still writes is read and dropped,
/// so it is never held up by a connection that is gone.
fn outbound(conn: Arc<Mutex<ServerConnection>>, mut raw: Sock, mut inner: UnixStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut broken = false;
    loop {
        let n = match inner.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if broken {
            continue;
        }
        let mut c = lock(&conn);
        if c.writer().write_all(&buf[..n]).is_err() {
            broken = true;
        }
        while !broken && c.wants_write() {
            if c.write_tls(&mut raw).is_err() {
                broken = true;
            }
        }
        if broken {
            raw.shutdown(Shutdown::Both);
        }
    }
    if !broken {
        let mut c = lock(&conn);
        c.send_close_notify();
        while c.wants_write() {
            if c.write_tls(&mut raw).is_err() {
                break;
            }
        }
    }
    // The inbound thread ends too, whatever the client does.
    raw.shutdown(Shutdown::Both);
}
