//! TLS for `STARTTLS`, with rustls: the server configuration read from PEM files,
//! the handshake, and a TLS stream that splits into a read half and a write half
//! like a plain socket.
//!
//! **The split.** A rustls connection is one state machine for both directions,
//! so it lives behind one mutex ([`Session`]) that both halves share, with a handle
//! to the socket that only its holder writes to. The reader owns another handle to
//! the same socket and reads ciphertext from it *without* the lock - the only
//! blocking read of the connection never holds it - then locks to hand the bytes to
//! rustls, decrypt, and take plaintext out. Writers lock, encrypt, and send the
//! records before unlocking, so records leave in the order they were sealed. Any
//! output the reader's processing queues (alerts, a key update the client asked
//! for) is sent at once under the same lock. A reply stuck on a client that does not
//! read blocks its writer, and with it the reader's next use of the lock - the same
//! stall a plaintext connection reaches once its in-flight budget is full - and ends
//! with the connection (a shutdown wakes every blocked call).
//!
//! **Ends.** A `close_notify` from the client reads as the end of the stream, an
//! EOF without one as [`std::io::ErrorKind::UnexpectedEof`]; either ends the
//! transmission normally. When the last half is dropped the server sends its own
//! `close_notify` (GnuTLS peers complain of an improper termination otherwise),
//! waiting at most [`TLS_CLOSE_TIMEOUT`] for a client that does not read.
//!
//! **Bytes after `STARTTLS`.** Negotiation reads exactly the bytes of each option
//! from the socket, never more, so a `ClientHello` sent right behind `STARTTLS` is
//! still in the socket for the handshake; likewise, whatever the client sends right
//! behind its `Finished` stays in rustls for the first read.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{Connection, RootCertStore, ServerConfig, ServerConnection};

use crate::limits::{TLS_CLOSE_TIMEOUT, TLS_HANDSHAKE_TIMEOUT, TLS_READ_BYTES};
use crate::server::{ConnError, TlsAcceptor};
use crate::transport::{Socket, Transport};

/// Why the TLS configuration could not be set up (reported at startup).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be opened or read.
    #[error("cannot read the {what} file {}: {source}", path.display())]
    Read {
        /// Which file ("certificate", "private key", "CA certificate").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no PEM item of the kind expected, or a broken one.
    #[error("{} holds no {what}: {reason}", path.display())]
    Pem {
        /// What was looked for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The private key is not the certificate's.
    #[error("the private key in {} does not belong to the certificate in {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the certificate, key or CA.
    #[error("{0}")]
    Rustls(String),
}

/// Reads every PEM item of type `T` in `path` (at least one).
pub(crate) fn read_pem<T: PemObject>(
    path: &Path,
    what: &'static str,
    pem_what: &'static str,
) -> Result<Vec<T>, TlsSetupError> {
    let pem_error = |reason: String| TlsSetupError::Pem {
        what: pem_what,
        path: path.to_path_buf(),
        reason,
    };
    let read_error = |source| TlsSetupError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut items = Vec::new();
    for item in T::pem_file_iter(path).map_err(|e| match e {
        pem::Error::Io(e) => read_error(e),
        e => pem_error(e.to_string()),
    })? {
        match item {
            Ok(i) => items.push(i),
            Err(pem::Error::Io(e)) => return Err(read_error(e)),
            Err(e) => return Err(pem_error(e.to_string())),
        }
    }
    if items.is_empty() {
        return Err(pem_error("no such PEM section found".into()));
    }
    Ok(items)
}

/// Starts TLS on connections: the server certificate and key, and, when a CA is
/// given, the client certificates it requires.
#[derive(Clone, Debug)]
pub struct Acceptor {
    config: Arc<ServerConfig>,
}

impl Acceptor {
    /// Reads the server certificate chain `cert` and its private key `key` (PEM:
    /// PKCS#8, PKCS#1 or SEC1). With `client_ca`, every client must present a
    /// certificate issued by one of the CAs in that PEM file; without it, none is
    /// asked for. TLS 1.2 and 1.3.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Acceptor, TlsSetupError> {
        let chain: Vec<CertificateDer<'static>> =
            read_pem(cert, "certificate", "PEM certificate (BEGIN CERTIFICATE)")?;
        let key_der = read_pem::<PrivateKeyDer<'static>>(
            key,
            "private key",
            "PEM private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
        )?
        .remove(0);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in read_pem::<CertificateDer<'static>>(
                    ca,
                    "CA certificate",
                    "PEM certificate (BEGIN CERTIFICATE)",
                )? {
                    roots.add(c).map_err(|e| TlsSetupError::Pem {
                        what: "usable CA certificate",
                        path: ca.to_path_buf(),
                        reason: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsSetupError::Rustls(format!("{}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key_der)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    TlsSetupError::Mismatch {
                        cert: cert.to_path_buf(),
                        key: key.to_path_buf(),
                    }
                }
                e => TlsSetupError::Rustls(format!(
                    "the certificate {} or the key {}: {e}",
                    cert.display(),
                    key.display()
                )),
            })?;
        Ok(Acceptor {
            config: Arc::new(config),
        })
    }
}

impl TlsAcceptor for Acceptor {
    fn accept(&self, t: Transport) -> Result<Transport, ConnError> {
        let Transport::Plain(sock) = t else {
            return Err(ConnError::Protocol("TLS is already on".into()));
        };
        let conn = ServerConnection::new(Arc::clone(&self.config)).map_err(|e| tls_error(&e))?;
        match TlsStream::handshake(conn.into(), sock, TLS_HANDSHAKE_TIMEOUT) {
            Ok(t) => Ok(Transport::Tls(t)),
            Err(HandshakeError::Io(e)) => Err(ConnError::Io(e)),
            Err(HandshakeError::Tls(e)) => Err(tls_error(&e)),
            Err(HandshakeError::TimedOut) => Err(ConnError::Protocol(format!(
                "TLS handshake not done within {TLS_HANDSHAKE_TIMEOUT:?}"
            ))),
            Err(HandshakeError::Closed) => Err(ConnError::Protocol(
                "the client left during the TLS handshake".into(),
            )),
        }
    }
}

fn tls_error(e: &rustls::Error) -> ConnError {
    ConnError::Io(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What both halves of a TLS stream share, behind one mutex: the rustls state and
/// the socket handle records are written to.
struct Session {
    conn: Connection,
    sock: Socket,
    /// Records on their way to the socket (reused; at most rustls' buffer limit).
    out: Vec<u8>,
}

/// Sends every record `conn` has queued, through `out`. One `write_all` per
/// batch: no vectored write, which could raise SIGPIPE (see [`Socket`]).
fn send_records(conn: &mut Connection, sock: &mut Socket, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        out.clear();
        conn.write_tls(out)?;
        sock.write_all(out)?;
    }
    Ok(())
}

impl Session {
    /// Sends every record rustls has queued.
    fn flush(&mut self) -> io::Result<()> {
        send_records(&mut self.conn, &mut self.sock, &mut self.out)
    }
}

impl Drop for Session {
    /// The connection is over (both halves are gone): `close_notify`, then any
    /// alert still queued, sent as far as the client takes them in time.
    fn drop(&mut self) {
        self.conn.send_close_notify();
        let _ = self.sock.set_write_timeout(Some(TLS_CLOSE_TIMEOUT));
        let _ = self.flush();
    }
}

fn lock(s: &Mutex<Session>) -> io::Result<MutexGuard<'_, Session>> {
    s.lock()
        .map_err(|_| io::Error::other("the TLS session lock is poisoned"))
}

/// Why a TLS handshake failed.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The socket failed.
    Io(io::Error),
    /// rustls refused the peer (its error; the alert was sent).
    Tls(rustls::Error),
    /// Not done in time.
    TimedOut,
    /// The peer closed the connection.
    Closed,
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> HandshakeError {
        HandshakeError::Io(e)
    }
}

/// The read half of a TLS stream (one reader at a time).
pub struct TlsReader {
    session: Arc<Mutex<Session>>,
    /// The reader's own handle to the socket, read without the lock.
    sock: Socket,
    /// Ciphertext read from the socket; `buf[start..end]` not yet taken by rustls.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// The write half of a TLS stream (writers take turns on the session's lock).
pub struct TlsWriter {
    session: Arc<Mutex<Session>>,
}

/// A TLS connection after its handshake: readable and writable during
/// negotiation, split into [`TlsReader`] and [`TlsWriter`] for transmission.
pub struct TlsStream {
    reader: TlsReader,
    writer: TlsWriter,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("socket", &self.reader.sock)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Runs the handshake of `conn` (server or client side) on `sock`, within
    /// `timeout` in all. On failure the alert rustls chose goes to the peer before
    /// the error returns.
    pub(crate) fn handshake(
        mut conn: Connection,
        mut sock: Socket,
        timeout: Duration,
    ) -> Result<TlsStream, HandshakeError> {
        let deadline = Instant::now() + timeout;
        let saved_timeout = sock.read_timeout()?;
        let mut out = Vec::new();
        loop {
            // Our flight (or the session tickets that follow the client's Finished).
            send_records(&mut conn, &mut sock, &mut out)?;
            if !conn.is_handshaking() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HandshakeError::TimedOut);
            }
            sock.set_read_timeout(Some(left))?;
            // rustls takes what is there, records beyond the handshake included.
            match conn.read_tls(&mut sock) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(HandshakeError::TimedOut)
                }
                Err(e) => return Err(e.into()),
            }
            if let Err(e) = conn.process_new_packets() {
                let _ = send_records(&mut conn, &mut sock, &mut out);
                return Err(HandshakeError::Tls(e));
            }
        }
        sock.set_read_timeout(saved_timeout)?;
        let session = Arc::new(Mutex::new(Session {
            conn,
            sock: sock.try_clone()?,
            out: Vec::new(),
        }));
        Ok(TlsStream {
            reader: TlsReader {
                session: Arc::clone(&session),
                sock,
                buf: vec![0u8; TLS_READ_BYTES].into_boxed_slice(),
                start: 0,
                end: 0,
            },
            writer: TlsWriter { session },
        })
    }

    /// The socket underneath (timeouts, closers).
    pub(crate) fn socket(&self) -> &Socket {
        &self.reader.sock
    }

    /// The read half and the write half.
    pub fn split(self) -> (TlsReader, TlsWriter) {
        (self.reader, self.writer)
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut s = lock(&self.session)?;
                loop {
                    match s.conn.reader().read(buf) {
                        // 0: the client's close_notify.
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // A TCP EOF without close_notify, or a failed session.
                        Err(e) => return Err(e),
                    }
                    if self.start == self.end {
                        break;
                    }
                    // No plaintext (so rustls has room): hand it ciphertext.
                    let n = s.conn.read_tls(&mut &self.buf[self.start..self.end])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a TLS record larger than the protocol allows",
                        ));
                    }
                    self.start += n;
                    let processed = s.conn.process_new_packets();
                    // Alerts, a key update asked for, or the alert of an error.
                    let flushed = s.flush();
                    processed.map_err(invalid)?;
                    flushed?;
                }
            }
            // Nothing to decrypt: wait for the client, lock not held, so that
            // replies go out meanwhile.
            let n = self.sock.read(&mut self.buf)?;
            self.start = 0;
            self.end = n;
            if n == 0 {
                // Tell rustls of the EOF: the next round returns Ok(0) after a
                // close_notify, UnexpectedEof without one.
                lock(&self.session)?.conn.read_tls(&mut io::empty())?;
            }
        }
    }
}

impl TlsWriter {
    /// Sends `close_notify` now (the peer reads the end of the stream); nothing
    /// can be written afterwards.
    pub fn send_close_notify(&mut self) -> io::Result<()> {
        let mut s = lock(&self.session)?;
        s.conn.send_close_notify();
        s.flush()
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = lock(&self.session)?;
        // Empty rustls' buffer first so that it takes plaintext (up to its limit).
        s.flush()?;
        let n = s.conn.writer().write(buf)?;
        s.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.session)?.flush()
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}
