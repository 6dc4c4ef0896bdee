//! The production NBD client: [`RemoteDisk`], a remote export behind
//! [`vdisk::VirtualDisk`], so that every consumer of a disk (C ABI, FUSE mount,
//! convert, backup) reads, writes, maps and asks for changed areas of a remote disk
//! as of a local one.
//!
//! * [`uri`]: NBD URIs (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`, as libnbd
//!   and qemu read them).
//! * [`tls`]: the client side of `STARTTLS` (rustls with ring): a CA file or the
//!   system bundle, a client certificate, or a pinned certificate thumbprint.
//! * [`handshake`]: fixed newstyle negotiation through the strict
//!   [`crate::testing::Handshake`]: `STARTTLS` per policy, extended headers or
//!   structured replies, metadata contexts, `GO` with block sizes (`EXPORT_NAME`
//!   only when `GO` is unknown).
//! * [`connection`]: one connection in transmission - many requests in flight, a
//!   reader thread that matches replies by cookie through
//!   [`crate::replies::ReplyChecker`] and runs each request's completion, bounded
//!   requests and bytes in flight, a request timeout, and every request answered
//!   exactly once even when the connection dies.
//! * [`spec`]: [`RemoteSpec`] - how to open an export again, and its text form.
//! * [`remote`]: [`RemoteDisk`] - several connections when the server allows
//!   multi-conn, reads and writes split at the server's maximum block, one
//!   reconnection for reads, block status walks, change IDs.
//!
//! No `unsafe`; std threads only.

use std::path::PathBuf;
use std::time::Duration;

use vdisk::{Error, ErrorKind};

pub mod connection;
pub mod handshake;
pub mod remote;
pub mod spec;
pub mod tls;
pub mod uri;

pub use crate::replies::ReadSink;
pub use remote::RemoteDisk;
pub use spec::RemoteSpec;
pub use uri::{parse_uri, NbdUri};

/// The default NBD port (IANA).
pub const DEFAULT_PORT: u16 = 10809;
/// The most data one request carries, whatever the server allows.
pub const MAX_REQUEST_BYTES: u32 = 32 << 20;
/// Default of [`ClientOptions::max_in_flight_bytes`].
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// The system CA bundle used when no CA file is given.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP host (name or address) and port.
    Tcp {
        /// Host name, IPv4 or IPv6 address (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

/// Whether the connection runs under TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Plaintext; a server that requires TLS is a clear error (`AccessDenied`).
    #[default]
    Off,
    /// `STARTTLS` first; a server that refuses it is an error (never a plaintext
    /// fallback).
    Require,
}

/// How to connect and what to allow.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Plaintext or TLS.
    pub tls: TlsPolicy,
    /// Pins the server certificate: the SHA-1 (20 `xx:` pairs) or SHA-256 (32 pairs)
    /// of its DER, any case; replaces the CA and host name checks; forces TLS.
    pub thumbprint: Option<String>,
    /// CA certificates (PEM) to check the server against; else
    /// [`SYSTEM_CA_BUNDLE`].
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its private key (PEM).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name checked in the server certificate (default: the host; `localhost`
    /// for Unix sockets).
    pub tls_hostname: Option<String>,
    /// No writes (the export is opened read-only even if the server allows writes).
    pub read_only: bool,
    /// Most connections per [`RemoteDisk`] (used only when the server advertises
    /// `CAN_MULTI_CONN`).
    pub connections: usize,
    /// Most requests in flight per connection.
    pub max_in_flight: usize,
    /// Most bytes of read and write data in flight per connection (one request
    /// alone always goes).
    pub max_in_flight_bytes: u64,
    /// Connecting and the whole negotiation.
    pub connect_timeout: Duration,
    /// A request unanswered this long fails its connection.
    pub request_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            tls: TlsPolicy::Off,
            thumbprint: None,
            ca_file: None,
            client_cert: None,
            tls_hostname: None,
            read_only: false,
            connections: 4,
            max_in_flight: 16,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

impl ClientOptions {
    /// Whether TLS is to be used (asked for, or implied by a thumbprint).
    pub fn wants_tls(&self) -> bool {
        self.tls == TlsPolicy::Require || self.thumbprint.is_some()
    }
}

/// The error of an NBD reply's error value: EPERM is `ReadOnly` for commands that
/// write (else `AccessDenied`), ENOSPC `DiskFull`, EINVAL `InvalidArgument`,
/// ENOTSUP `NotSupported`, ENOMEM `OutOfMemory`, anything else `Io`.
pub fn errno_error(errno: u32, writes: bool, what: &str, message: &str) -> Error {
    use crate::wire::errno as e;
    let kind = match errno {
        e::EPERM if writes => ErrorKind::ReadOnly,
        e::EPERM => ErrorKind::AccessDenied,
        e::ENOSPC => ErrorKind::DiskFull,
        e::EINVAL => ErrorKind::InvalidArgument,
        e::ENOTSUP => ErrorKind::NotSupported,
        e::ENOMEM => ErrorKind::OutOfMemory,
        _ => ErrorKind::Io,
    };
    let name = match errno {
        e::EPERM => "EPERM",
        e::EIO => "EIO",
        e::ENOMEM => "ENOMEM",
        e::EINVAL => "EINVAL",
        e::ENOSPC => "ENOSPC",
        e::EOVERFLOW => "EOVERFLOW",
        e::ENOTSUP => "ENOTSUP",
        e::ESHUTDOWN => "ESHUTDOWN",
        _ => "error",
    };
    if message.is_empty() {
        Error::new(
            kind,
            format!("{what}: the server answered {name} ({errno})"),
        )
    } else {
        Error::new(
            kind,
            format!("{what}: the server answered {name} ({errno}): {message}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_map_to_kinds() {
        use crate::wire::errno as e;
        assert_eq!(
            errno_error(e::EPERM, true, "w", "").kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(
            errno_error(e::EPERM, false, "r", "").kind(),
            ErrorKind::AccessDenied
        );
        assert_eq!(
            errno_error(e::ENOSPC, true, "w", "").kind(),
            ErrorKind::DiskFull
        );
        assert_eq!(
            errno_error(e::EINVAL, false, "r", "past the end").kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            errno_error(e::ENOTSUP, true, "z", "").kind(),
            ErrorKind::NotSupported
        );
        assert_eq!(
            errno_error(e::ENOMEM, false, "r", "").kind(),
            ErrorKind::OutOfMemory
        );
        let io = errno_error(e::EIO, false, "read 0+512", "bad sector");
        assert_eq!(io.kind(), ErrorKind::Io);
        assert!(io.to_string().contains("bad sector"), "{io}");
    }
}
