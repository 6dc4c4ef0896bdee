//! Every limit the NBD code enforces on what a peer sends or may cost, in one place.

use std::time::Duration;

/// Largest string (export name, context name, message) accepted or sent.
pub const MAX_STRING_BYTES: u64 = 4096;
/// Largest option data read during negotiation; longer data is skipped and refused.
pub const MAX_OPTION_BYTES: u64 = 64 << 10;
/// Option data beyond this is not even skipped: the connection is closed.
pub const MAX_SKIPPED_OPTION_BYTES: u64 = 16 << 20;
/// Most queries in one meta-context option.
pub const MAX_CONTEXT_QUERIES: u64 = 256;
/// Most options in one negotiation (a client that never starts is cut off).
pub const MAX_OPTIONS: u32 = 1024;
/// How long a negotiation may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake (after the `STARTTLS` ACK) may take in all.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the TLS `close_notify` at the end of a connection may wait for the
/// client to take it.
pub const TLS_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Ciphertext bytes the TLS reader takes off the socket at once (what rustls
/// decrypts per round; it holds at most one record of plaintext more).
pub const TLS_READ_BYTES: usize = 16 << 10;
/// How long a connection may stay silent during transmission.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The largest data a `READ` or `WRITE` may carry (the advertised maximum block).
pub const MAX_PAYLOAD: u64 = 32 << 20;
/// Bytes of requests (their data, in or out) in flight on one connection: the
/// reader stops taking requests beyond this until replies are sent.
pub const MAX_INFLIGHT_BYTES: u64 = 64 << 20;
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

/// Connections served at once, all exports together.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections to one export at once.
pub const MAX_CONNECTIONS_PER_EXPORT: usize = 64;
/// Most disks a datastore listing walks (and lists).
pub const MAX_DATASTORE_DISKS: usize = 10_000;
