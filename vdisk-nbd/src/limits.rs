//! Every limit the NBD code enforces on what a peer sends or may cost, in one place.
//!
//! The constants are fixed by the protocol or by what one message may hold; the
//! per-server ones an embedder may change (timeouts, connection counts, bytes in
//! flight) are gathered in [`Limits`], whose defaults are the `DEFAULT_*` constants.

use std::time::Duration;

/// Largest string (export name, context name, message) accepted or sent.
pub const MAX_STRING_BYTES: u64 = 4096;
/// Largest option data read during negotiation; longer data is skipped and refused.
pub const MAX_OPTION_BYTES: u64 = 64 << 10;
/// Option data beyond this is not even skipped: the connection is closed.
pub const MAX_SKIPPED_OPTION_BYTES: u64 = 16 << 20;
/// Most queries in one meta-context option.
pub const MAX_CONTEXT_QUERIES: u64 = 256;
/// Most metadata contexts one connection may select (each adds a chunk of up to
/// [`MAX_STATUS_EXTENTS`] extents to every block status reply).
pub const MAX_SELECTED_CONTEXTS: usize = 16;
/// Most options in one negotiation (a client that never starts is cut off).
pub const MAX_OPTIONS: u32 = 1024;
/// How long a TLS handshake (after the `STARTTLS` ACK) may take in all.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the TLS `close_notify` at the end of a connection may wait for the
/// client to take it.
pub const TLS_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Ciphertext bytes the TLS reader takes off the socket at once (what rustls
/// decrypts per round; it holds at most one record of plaintext more).
pub const TLS_READ_BYTES: usize = 16 << 10;

/// The largest data a `READ` or `WRITE` may carry (the advertised maximum block).
pub const MAX_PAYLOAD: u64 = 32 << 20;
/// A worker keeps its reply buffer between requests up to this size (a larger read
/// allocates for itself, and gives the memory back once replied to).
pub const KEPT_REPLY_BYTES: usize = 4 << 20;
/// The send buffer asked for on each Unix socket connection (the kernel caps it at
/// `net.core.wmem_max`).
pub const SEND_BUFFER_BYTES: usize = 1 << 20;
/// Worker threads per connection (requests served at once).
pub const WORKERS_PER_CONNECTION: usize = 4;
/// Most extents in one block status chunk.
pub const MAX_STATUS_EXTENTS: usize = 1 << 16;
/// Largest extent in a compact block status chunk: a u32, rounded down to whole
/// sectors (2^32 would wrap to an illegal 0; an unaligned length makes libnbd ask
/// unaligned questions).
pub const MAX_COMPACT_EXTENT: u64 = (1 << 32) - 512;
/// Most disks a datastore listing walks (and lists).
pub const MAX_DATASTORE_DISKS: usize = 10_000;

/// Default of [`Limits::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`Limits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default of [`Limits::reply_timeout`].
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// Default of [`Limits::max_inflight_bytes`].
pub const DEFAULT_MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// Default of [`Limits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default of [`Limits::max_connections_per_export`].
pub const DEFAULT_MAX_CONNECTIONS_PER_EXPORT: usize = 64;

/// What one server allows each client, set with [`crate::Server::set_limits`]
/// (connections accepted afterwards get the new values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a negotiation may take in all, from the accept to the start of
    /// transmission (TLS handshake included); the connection is closed then.
    pub handshake_timeout: Duration,
    /// How long a connection may stay silent during transmission with no request
    /// in flight (a request being served or answered is not idleness); the
    /// connection is closed then.
    pub idle_timeout: Duration,
    /// How long a reply may wait for the client to take any of its bytes (a client
    /// that stops reading); the connection is closed then.
    pub reply_timeout: Duration,
    /// Bytes of requests in flight on one connection - data of writes taken in,
    /// data of reads and block status replies being made or sent: beyond it the
    /// reader stops taking requests until replies are sent (backpressure).
    pub max_inflight_bytes: u64,
    /// Connections served at once, all exports together; one more is closed at
    /// once, before the greeting.
    pub max_connections: usize,
    /// Connections to one export at once; one more is refused the export
    /// (`ERR_POLICY` to `GO`/`INFO`, a closed connection after `EXPORT_NAME`).
    pub max_connections_per_export: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_export: DEFAULT_MAX_CONNECTIONS_PER_EXPORT,
        }
    }
}
