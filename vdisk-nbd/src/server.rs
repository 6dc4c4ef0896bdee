//! The server: listeners, one thread per connection (negotiation, then the
//! transmission phase with its own workers), limits on connections, and an orderly
//! stop.
//!
//! A connection's failure - a malformed handshake, a hostile request, a client that
//! vanishes - ends that connection only. [`Server::stop`] stops accepting, refuses
//! new options with `ERR_SHUTDOWN`, ends every connection's reading side so its
//! in-flight requests finish and their replies go out, waits for them, and drops the
//! exports: persistent disks are flushed and closed cleanly, non-persistent redo
//! logs vanish.

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::export::Exports;
use crate::limits::{HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS};
use crate::negotiate::{negotiate, Outcome};
use crate::transport::{Closer, Transport};

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed (or the peer went away mid-message).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol; the connection is closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Whether the server offers or requires TLS (fixed for the server's lifetime).
/// The `vdisk-nbd` program requires TLS once it is given a certificate, as
/// `qemu-nbd --tls-creds` does; `On` is nbdkit's `--tls=on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: `STARTTLS` is refused with `ERR_UNSUP`.
    Off,
    /// TLS is offered; plaintext is allowed too.
    On,
    /// Every client must start TLS before anything else: other options than
    /// `STARTTLS` and `ABORT` get `ERR_TLS_REQD`, an `EXPORT_NAME` closes the
    /// connection.
    Require,
}

/// How TLS is started on a connection (set up by the embedding program).
pub trait TlsAcceptor: Send + Sync {
    /// Runs the TLS handshake on `t` (after the `STARTTLS` ACK was sent) and returns
    /// the encrypted transport.
    fn accept(&self, t: Transport) -> Result<Transport, ConnError>;
}

/// What every connection shares.
pub struct Shared {
    /// The exports.
    pub exports: Exports,
    /// Whether TLS is off, offered or required.
    pub tls_mode: TlsMode,
    tls: Option<Box<dyn TlsAcceptor>>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Live connections: a closer each.
    live: Mutex<HashMap<u64, Closer>>,
    drained: Condvar,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("exports", &self.exports)
            .field("tls_mode", &self.tls_mode)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Whether the server is stopping.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Answers `STARTTLS` (the option's data already checked): ACK and run the TLS
    /// handshake, or refuse when TLS is off. Returns the new transport, the old one
    /// when refused, or None when the handshake failed (the connection is over).
    pub(crate) fn start_tls(
        &self,
        mut t: Transport,
        option: u32,
    ) -> Result<Option<Transport>, ConnError> {
        use std::io::Write;
        let Some(tls) = self.tls.as_ref().filter(|_| self.tls_mode != TlsMode::Off) else {
            t.write_all(&crate::wire::option_reply(
                option,
                crate::wire::rep::ERR_UNSUP,
                b"TLS is not configured on this server",
            ))?;
            return Ok(Some(t));
        };
        t.write_all(&crate::wire::option_reply(
            option,
            crate::wire::rep::ACK,
            &[],
        ))?;
        match tls.accept(t) {
            Ok(t) => Ok(Some(t)),
            Err(e) => {
                tracing::info!("TLS handshake failed: {e}");
                Ok(None)
            }
        }
    }
}

/// An NBD server over a set of exports.
#[derive(Clone, Debug)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// A server for `exports`, without TLS.
    pub fn new(exports: Exports) -> Server {
        Server::with_tls(exports, TlsMode::Off, None)
    }

    /// A server for `exports` with TLS as `mode` says, started by `acceptor`.
    pub fn with_tls(
        exports: Exports,
        mode: TlsMode,
        acceptor: Option<Box<dyn TlsAcceptor>>,
    ) -> Server {
        Server {
            shared: Arc::new(Shared {
                exports,
                tls_mode: if acceptor.is_some() {
                    mode
                } else {
                    TlsMode::Off
                },
                tls: acceptor,
                stopping: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                live: Mutex::new(HashMap::new()),
                drained: Condvar::new(),
            }),
        }
    }

    /// What the connections share.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Accepts TCP connections until [`Server::stop`] (which also needs the
    /// listener woken: it connects to it).
    pub fn serve_tcp(&self, listener: &TcpListener) {
        for s in listener.incoming() {
            if self.shared.stopping() {
                return;
            }
            match s {
                Ok(s) => self.spawn(Transport::from(s)),
                Err(e) => tracing::warn!("accept failed: {e}"),
            }
        }
    }

    /// Accepts Unix socket connections until [`Server::stop`].
    pub fn serve_unix(&self, listener: &UnixListener) {
        for s in listener.incoming() {
            if self.shared.stopping() {
                return;
            }
            match s {
                Ok(s) => self.spawn(Transport::from(s)),
                Err(e) => tracing::warn!("accept failed: {e}"),
            }
        }
    }

    /// Serves one connection on a thread of its own.
    pub fn spawn(&self, t: Transport) {
        let shared = Arc::clone(&self.shared);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        {
            let Ok(mut live) = shared.live.lock() else {
                return;
            };
            if live.len() >= MAX_CONNECTIONS || shared.stopping() {
                tracing::warn!("connection refused: {} connections open", live.len());
                return;
            }
            match t.closer() {
                Ok(c) => {
                    live.insert(id, c);
                }
                Err(_) => return,
            }
        }
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    if let Err(e) = connection(t, &shared) {
                        tracing::info!("connection {id} ended: {e}");
                    }
                    if let Ok(mut live) = shared.live.lock() {
                        live.remove(&id);
                    }
                    shared.drained.notify_all();
                }
            });
        if spawned.is_err() {
            if let Ok(mut live) = shared.live.lock() {
                live.remove(&id);
            }
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Stops: no new connections or options, every connection's reading side ended
    /// (requests in flight finish and are replied to), then waits for them all.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let Ok(mut live) = self.shared.live.lock() else {
            return;
        };
        for c in live.values() {
            c.stop_reading();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !live.is_empty() {
            let now = std::time::Instant::now();
            if now >= deadline {
                for c in live.values() {
                    c.close();
                }
                break;
            }
            live = match self.shared.drained.wait_timeout(live, deadline - now) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
        drop(live);
        self.shared.exports.close_all();
    }
}

/// One connection: negotiation, then transmission.
fn connection(t: Transport, shared: &Shared) -> Result<(), ConnError> {
    t.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let (session, t) = match negotiate(t, shared)? {
        Outcome::Transmit(s, t) => (s, t),
        Outcome::Done => return Ok(()),
    };
    t.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let (input, output) = t.split()?;
    crate::transmission::serve(session, input, output)
}
