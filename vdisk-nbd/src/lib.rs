//! NBD (Network Block Device) for vdisk: the wire protocol and a server that exports
//! VMDK disks and snapshot chains, with their allocation, allocation depth and
//! changed blocks as metadata contexts.
//!
//! * [`wire`]: the protocol's messages, parsed and encoded by pure functions over
//!   bytes with checked lengths (shared by the server, the client and the fuzz target).
//! * [`export`]: what is served - named disks and datastores - and how each is opened
//!   (non-persistent by default, read-only, persistent); one shared [`vdisk::Disk`]
//!   per export.
//! * [`negotiate`]: fixed newstyle negotiation; [`transmission`]: requests served by
//!   a few workers per connection, replies matched by cookie; [`context`]: block
//!   status contexts; [`server`]: listeners, limits ([`limits::Limits`]), orderly
//!   stop.
//! * [`transport`]: the sockets, plain or under TLS ([`tls`]: `STARTTLS` with
//!   rustls, X.509 certificates, optional client certificates).
//! * [`client`]: the production client - [`client::RemoteDisk`], an export as a
//!   [`vdisk::VirtualDisk`] (pipelined, multi-conn, TLS, reconnecting reads);
//!   [`replies`]: the reply reader and checker it shares with [`testing`].
//! * [`testing`]: a strict hand-made client for tests; [`fuzzing`]: the bodies of
//!   the fuzz targets (a whole connection over a socket pair), replayed by
//!   `tests/fuzz_replay.rs`.
//!
//! Std threads, no `unsafe`, no async runtime: a connection costs
//! [`limits::WORKERS_PER_CONNECTION`] threads (its own among them), which take turns
//! reading requests and each serve what they read, and its bytes in flight are
//! bounded.

pub mod client;
pub mod context;
pub mod export;
pub mod fuzzing;
pub mod limits;
pub mod negotiate;
pub mod replies;
pub mod server;
pub mod testing;
pub mod tls;
pub mod transmission;
pub mod transport;
pub mod wire;

pub use export::{Datastore, DiskExport, Exports, Mode};
pub use server::{Server, TlsMode};
