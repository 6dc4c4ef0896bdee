//! The server: listeners, one thread per connection (negotiation, then the
//! transmission phase with its own workers), limits on connections, and an orderly
//! stop.
//!
//! A connection's failure - a malformed handshake, a hostile request, a client that
//! vanishes - ends that connection only. The [`Limits`] keep a server alive: a
//! connection over [`Limits::max_connections`] is closed before the greeting; a
//! negotiation still running after [`Limits::handshake_timeout`] is closed by a
//! watchdog thread (which runs while some connection is negotiating), whatever it is
//! blocked on; transmission ends a connection silent for [`Limits::idle_timeout`]
//! with nothing in flight, or one whose client takes no reply bytes for
//! [`Limits::reply_timeout`].
//!
//! [`Server::stop`] stops accepting, refuses new options with `ERR_SHUTDOWN`, ends
//! every connection's reading side so its in-flight requests finish and their
//! replies go out, waits for them, and drops the exports: persistent disks are
//! flushed and closed cleanly, non-persistent redo logs vanish.

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::export::{ExportUse, Exports, Refusal};
use crate::limits::Limits;
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
    /// The connection was not accepted (too many connections, stopping).
    #[error("connection refused: {0}")]
    Refused(String),
    /// A request's worker panicked (a bug): the request got `EIO`, the connection
    /// was ended.
    #[error("internal error: {0}")]
    Panicked(String),
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
    limits: Mutex<Limits>,
    /// Bytes of requests in flight, all connections.
    inflight: Arc<AtomicU64>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Live connections.
    live: Mutex<Registry>,
    /// Signalled when a connection ends.
    drained: Condvar,
    /// Wakes the watchdog (a new deadline, or stopping).
    watch: Condvar,
    /// The watchdog thread last started (joined by `stop`).
    watchdog: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The live connections, and whether the handshake watchdog runs.
#[derive(Default)]
struct Registry {
    conns: HashMap<u64, Live>,
    watchdog_running: bool,
}

/// A live connection.
struct Live {
    closer: Closer,
    /// While it negotiates: when it is closed.
    handshake_deadline: Option<Instant>,
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

    /// The limits in force for new connections.
    pub fn limits(&self) -> Limits {
        self.limits.lock().map(|l| *l).unwrap_or_default()
    }

    /// The export `name` for a connection, within the per-export connection limit.
    pub(crate) fn acquire(&self, name: &str) -> Result<ExportUse, Refusal> {
        self.exports
            .acquire(name, self.limits().max_connections_per_export)
    }

    fn registry(&self) -> Option<MutexGuard<'_, Registry>> {
        self.live.lock().ok()
    }

    /// Whether `STARTTLS` is accepted.
    pub(crate) fn tls_offered(&self) -> bool {
        self.tls.is_some() && self.tls_mode != TlsMode::Off
    }

    /// Answers `STARTTLS` (the option's data already checked, TLS offered): ACK and
    /// run the TLS handshake. Returns the new transport, or None when the handshake
    /// failed (the connection is over).
    pub(crate) fn start_tls(
        &self,
        mut t: Transport,
        option: u32,
    ) -> Result<Option<Transport>, ConnError> {
        use std::io::Write;
        let Some(tls) = self.tls.as_ref().filter(|_| self.tls_offered()) else {
            return Err(ConnError::Protocol(
                "STARTTLS on a server without TLS".into(),
            ));
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
                limits: Mutex::new(Limits::default()),
                inflight: Arc::new(AtomicU64::new(0)),
                stopping: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                live: Mutex::new(Registry::default()),
                drained: Condvar::new(),
                watch: Condvar::new(),
                watchdog: Mutex::new(None),
            }),
        }
    }

    /// What the connections share.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Sets the limits of connections accepted from now on (tests use short
    /// timeouts and small counts).
    pub fn set_limits(&self, limits: Limits) {
        if let Ok(mut l) = self.shared.limits.lock() {
            *l = limits;
        }
    }

    /// The limits in force for new connections.
    pub fn limits(&self) -> Limits {
        self.shared.limits()
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

    /// Serves one connection on a thread of its own (or closes it at once when the
    /// server is full or stopping).
    pub fn spawn(&self, t: Transport) {
        let id = match self.admit(&t) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!("{e}");
                return;
            }
        };
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                // Leaves the registry however the connection ends (a panic too).
                let _registered = Registered {
                    shared: &shared,
                    id,
                };
                if let Err(e) = connection(t, &shared, id) {
                    tracing::info!("connection {id} ended: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("connection {id} refused: no thread for it: {e}");
            self.shared.leave(id);
        }
    }

    /// Serves one connection on the calling thread, negotiation and transmission,
    /// within the same limits as [`Server::spawn`]; returns how it ended.
    pub fn serve_connection(&self, t: Transport) -> Result<(), ConnError> {
        let id = self.admit(&t)?;
        let _registered = Registered {
            shared: &self.shared,
            id,
        };
        connection(t, &self.shared, id)
    }

    /// Registers a new connection: its closer, and its handshake deadline for the
    /// watchdog (started if it does not run). Refused when the server is full or
    /// stopping.
    fn admit(&self, t: &Transport) -> Result<u64, ConnError> {
        let shared = &self.shared;
        let limits = shared.limits();
        let closer = t.closer()?;
        let mut reg = shared
            .registry()
            .ok_or_else(|| ConnError::Refused("connection table poisoned".into()))?;
        if shared.stopping() {
            return Err(ConnError::Refused("the server is stopping".into()));
        }
        if reg.conns.len() >= limits.max_connections {
            return Err(ConnError::Refused(format!(
                "{} connections are open (the limit)",
                reg.conns.len()
            )));
        }
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        reg.conns.insert(
            id,
            Live {
                closer,
                handshake_deadline: Instant::now().checked_add(limits.handshake_timeout),
            },
        );
        if !reg.watchdog_running {
            let watched = Arc::clone(shared);
            let started = std::thread::Builder::new()
                .name("nbd-handshake-watchdog".into())
                .spawn(move || watchdog(&watched));
            match started {
                Ok(h) => {
                    reg.watchdog_running = true;
                    // The one before has ended (it cleared `watchdog_running`).
                    let old = shared.watchdog.lock().ok().and_then(|mut w| w.replace(h));
                    if let Some(old) = old {
                        let _ = old.join();
                    }
                }
                // The handshake's read timeout still applies.
                Err(e) => tracing::warn!("no handshake watchdog: {e}"),
            }
        }
        shared.watch.notify_all();
        Ok(id)
    }

    /// Bytes of requests in flight now, all connections together: what
    /// [`Limits::max_inflight_bytes`] bounds per connection (write data taken in,
    /// read data and block status replies being made or sent).
    pub fn inflight_bytes(&self) -> u64 {
        self.shared.inflight.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.registry().map(|r| r.conns.len()).unwrap_or(0)
    }

    /// Stops: no new connections or options, every connection's reading side ended
    /// (requests in flight finish and are replied to), then waits for them all.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.watch.notify_all();
        let Some(mut live) = self.shared.registry() else {
            return;
        };
        for c in live.conns.values() {
            c.closer.stop_reading();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !live.conns.is_empty() {
            let now = std::time::Instant::now();
            if now >= deadline {
                for c in live.conns.values() {
                    c.closer.close();
                }
                break;
            }
            live = match self.shared.drained.wait_timeout(live, deadline - now) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
        drop(live);
        self.shared.watch.notify_all();
        let watchdog = self.shared.watchdog.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = watchdog {
            let _ = w.join();
        }
        self.shared.exports.close_all();
    }
}

impl Shared {
    /// A connection ended.
    fn leave(&self, id: u64) {
        if let Some(mut reg) = self.registry() {
            reg.conns.remove(&id);
        }
        self.drained.notify_all();
        // The watchdog ends when no connection negotiates.
        self.watch.notify_all();
    }

    /// A connection finished its negotiation: no handshake deadline any more.
    fn negotiated(&self, id: u64) {
        if let Some(mut reg) = self.registry() {
            if let Some(l) = reg.conns.get_mut(&id) {
                l.handshake_deadline = None;
            }
        }
        self.watch.notify_all();
    }
}

/// Removes a connection from the registry when dropped.
struct Registered<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.leave(self.id);
    }
}

/// Closes every connection whose negotiation outlives its deadline; runs while
/// some connection negotiates (or until the server stops).
fn watchdog(shared: &Shared) {
    let Some(mut reg) = shared.registry() else {
        return;
    };
    loop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for (id, l) in reg.conns.iter_mut() {
            match l.handshake_deadline {
                Some(d) if d <= now => {
                    tracing::info!("connection {id}: negotiation timed out");
                    l.closer.close();
                    l.handshake_deadline = None;
                }
                Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
        let Some(next) = next.filter(|_| !shared.stopping()) else {
            reg.watchdog_running = false;
            return;
        };
        reg = match shared.watch.wait_timeout(reg, next - now) {
            Ok((g, _)) => g,
            Err(_) => return,
        };
    }
}

/// One connection: negotiation, then transmission.
fn connection(t: Transport, shared: &Shared, id: u64) -> Result<(), ConnError> {
    let limits = shared.limits();
    t.set_read_timeout(Some(limits.handshake_timeout))?;
    let (session, t) = match negotiate(t, shared)? {
        Outcome::Transmit(s, t) => (s, t),
        Outcome::Done => return Ok(()),
    };
    shared.negotiated(id);
    // Read timeouts wake the reader to check whether the connection is idle.
    t.set_read_timeout(Some(limits.idle_timeout))?;
    t.set_write_timeout(Some(limits.reply_timeout))?;
    let files = t.file_sender()?;
    let (input, output) = t.split()?;
    crate::transmission::serve(
        session,
        input,
        output,
        files,
        &limits,
        Arc::clone(&shared.inflight),
    )
}
