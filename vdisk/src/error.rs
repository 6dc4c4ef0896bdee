//! The error type of the crate: a kind that maps one-to-one onto VDDK's `VixError`
//! codes, a human context that names the file / structure at fault, and an optional
//! underlying I/O error.

use std::fmt;
use std::io;

/// What went wrong, in VDDK's terms. Every kind has exactly one VixError code
/// ([`ErrorKind::vix_code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Unspecified failure (`VIX_E_FAIL`, 1).
    Fail,
    /// An allocation would exceed a limit (`VIX_E_OUT_OF_MEMORY`, 2).
    OutOfMemory,
    /// A parameter is invalid (`VIX_E_INVALID_ARG`, 3).
    InvalidArgument,
    /// A file named by the caller or by a descriptor does not exist (`VIX_E_FILE_NOT_FOUND`, 4).
    FileNotFound,
    /// The operation is not supported (yet) for this kind of disk (`VIX_E_NOT_SUPPORTED`, 6).
    NotSupported,
    /// An I/O error on a disk file (`VIX_E_FILE_ERROR`, 7).
    Io,
    /// The host file system is full (`VIX_E_DISK_FULL`, 8).
    DiskFull,
    /// The file is not of the expected kind (`VIX_E_INCORRECT_FILE_TYPE`, 9).
    IncorrectFileType,
    /// The operation was cancelled by the caller's progress callback (`VIX_E_CANCELLED`, 10).
    Cancelled,
    /// A write was attempted through a read-only handle (`VIX_E_FILE_READ_ONLY`, 11).
    ReadOnly,
    /// The file to be created already exists (`VIX_E_FILE_ALREADY_EXISTS`, 12).
    AlreadyExists,
    /// The host denied access to a file (`VIX_E_FILE_ACCESS_ERROR`, 13).
    AccessDenied,
    /// Another process holds a conflicting lock on a disk file (`VIX_E_FILE_ALREADY_LOCKED`, 15).
    Locked,
    /// A file would exceed what its format can address (`VIX_E_FILE_TOO_BIG`, 21).
    FileTooBig,
    /// The caller's buffer is too small (`VIX_E_BUFFER_TOOSMALL`, 24).
    BufferTooSmall,
    /// A disk's structures are inconsistent and need a repair (`VIX_E_DISK_NEEDSREPAIR`, 16006).
    NeedsRepair,
    /// An access lies outside the disk's capacity (`VIX_E_DISK_OUTOFRANGE`, 16007).
    OutOfRange,
    /// A child's parentCID does not match its parent's CID (`VIX_E_DISK_CID_MISMATCH`, 16008).
    CidMismatch,
    /// The disk cannot be shrunk (`VIX_E_DISK_CANTSHRINK`, 16009).
    CantShrink,
    /// A header or descriptor version we do not understand (`VIX_E_DISK_UNSUPPORTEDDISKVERSION`, 16011).
    UnsupportedDiskVersion,
    /// The disk type or feature is not supported by this library (`VIX_E_DISK_NOTSUPPORTED`, 16013).
    DiskNotSupported,
    /// A metadata key does not exist (`VIX_E_DISK_KEY_NOTFOUND`, 16052).
    KeyNotFound,
    /// A snapshot chain is deeper than the limit (`VIX_E_DISK_TOOMANYREDO`, 16028).
    TooManyRedo,
    /// A snapshot chain is malformed: a loop, a delta without a parent name (`VIX_E_DISK_INVALIDCHAIN`, 16030).
    InvalidChain,
    /// A check found damage that repair cannot undo (`VIX_E_DISK_CANTREPAIR`, 16062).
    CantRepair,
    /// The disk's files are malformed: bad descriptor, header, tables (`VIX_E_DISK_INVALIDDISK`, 16063).
    InvalidDisk,
    /// The disk's capacity does not match what its parts say (`VIX_E_DISK_CAPACITY_MISMATCH`, 16067).
    CapacityMismatch,
    /// A change ID cannot be used: the disk's change tracking was restarted, or cannot
    /// be trusted (an unclean shutdown, a write by a program that does not track);
    /// take a full backup. No VDDK code: the extension code `VDISK_E_CHANGE_ID_REFUSED`
    /// (0x56440001).
    ChangeIdRefused,
    /// The server refused the connection: nothing listens there
    /// (`VIX_E_HOST_NETWORK_CONN_REFUSED`, 14009).
    ConnectionRefused,
    /// The host name could not be resolved, or a Unix socket does not exist
    /// (`VIX_E_HOST_SERVER_NOT_FOUND`, 14008).
    HostNotFound,
    /// Connecting or negotiating took too long (`VIX_E_CANNOT_CONNECT_TO_HOST`, 18000).
    TimedOut,
    /// The peer does not speak NBD, or broke the negotiation
    /// (`VIX_E_HOST_NETBLKDEV_HANDSHAKE`, 14006).
    Handshake,
    /// The connection to the server was lost (closed, reset, or no reply in time)
    /// during I/O (`VIX_E_HOST_TCP_CONN_LOST`, 14011).
    ConnectionLost,
}

impl ErrorKind {
    /// The VDDK `VixError` number of this kind.
    pub fn vix_code(self) -> u64 {
        match self {
            ErrorKind::Fail => 1,
            ErrorKind::OutOfMemory => 2,
            ErrorKind::InvalidArgument => 3,
            ErrorKind::FileNotFound => 4,
            ErrorKind::NotSupported => 6,
            ErrorKind::Io => 7,
            ErrorKind::DiskFull => 8,
            ErrorKind::IncorrectFileType => 9,
            ErrorKind::Cancelled => 10,
            ErrorKind::ReadOnly => 11,
            ErrorKind::AlreadyExists => 12,
            ErrorKind::AccessDenied => 13,
            ErrorKind::Locked => 15,
            ErrorKind::FileTooBig => 21,
            ErrorKind::BufferTooSmall => 24,
            ErrorKind::NeedsRepair => 16006,
            ErrorKind::OutOfRange => 16007,
            ErrorKind::CidMismatch => 16008,
            ErrorKind::CantShrink => 16009,
            ErrorKind::UnsupportedDiskVersion => 16011,
            ErrorKind::DiskNotSupported => 16013,
            ErrorKind::KeyNotFound => 16052,
            ErrorKind::TooManyRedo => 16028,
            ErrorKind::InvalidChain => 16030,
            ErrorKind::CantRepair => 16062,
            ErrorKind::InvalidDisk => 16063,
            ErrorKind::CapacityMismatch => 16067,
            ErrorKind::ChangeIdRefused => 0x5644_0001,
            ErrorKind::ConnectionRefused => 14009,
            ErrorKind::HostNotFound => 14008,
            ErrorKind::TimedOut => 18000,
            ErrorKind::Handshake => 14006,
            ErrorKind::ConnectionLost => 14011,
        }
    }

    /// A short English name of the kind, used when an error has no context.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorKind::Fail => "unknown error",
            ErrorKind::OutOfMemory => "limit exceeded",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::FileNotFound => "file not found",
            ErrorKind::NotSupported => "not supported",
            ErrorKind::Io => "I/O error",
            ErrorKind::DiskFull => "host disk full",
            ErrorKind::IncorrectFileType => "incorrect file type",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::ReadOnly => "disk opened read-only",
            ErrorKind::AlreadyExists => "file already exists",
            ErrorKind::AccessDenied => "access denied",
            ErrorKind::Locked => "disk is locked",
            ErrorKind::FileTooBig => "file too big",
            ErrorKind::BufferTooSmall => "buffer too small",
            ErrorKind::NeedsRepair => "disk needs repair",
            ErrorKind::OutOfRange => "access beyond the end of the disk",
            ErrorKind::CidMismatch => "parent content ID mismatch",
            ErrorKind::CantShrink => "disk cannot be shrunk",
            ErrorKind::UnsupportedDiskVersion => "unsupported disk version",
            ErrorKind::DiskNotSupported => "disk type not supported",
            ErrorKind::KeyNotFound => "metadata key not found",
            ErrorKind::TooManyRedo => "snapshot chain too deep",
            ErrorKind::InvalidChain => "invalid snapshot chain",
            ErrorKind::CantRepair => "disk damage cannot be repaired",
            ErrorKind::InvalidDisk => "invalid disk",
            ErrorKind::CapacityMismatch => "capacity mismatch",
            ErrorKind::ChangeIdRefused => "change ID refused: take a full backup",
            ErrorKind::ConnectionRefused => "the server refused the connection",
            ErrorKind::HostNotFound => "the server could not be found",
            ErrorKind::TimedOut => "timed out connecting to the server",
            ErrorKind::Handshake => "NBD handshake failed",
            ErrorKind::ConnectionLost => "the connection to the server was lost",
        }
    }
}

/// An error of the vdisk library.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<io::Error>,
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message that says what failed and where.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error caused by an I/O error; the kind follows the I/O error.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        let kind = match source.kind() {
            io::ErrorKind::NotFound => ErrorKind::FileNotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::AccessDenied,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            io::ErrorKind::StorageFull => ErrorKind::DiskFull,
            io::ErrorKind::FileTooLarge => ErrorKind::FileTooBig,
            io::ErrorKind::ReadOnlyFilesystem => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            context: context.into(),
            source: Some(source),
        }
    }

    /// Shorthand for an [`ErrorKind::InvalidDisk`] error.
    pub fn invalid(context: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidDisk, context)
    }

    /// The kind of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the underlying I/O error.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// This error with more context in front: `"{outer}: {inner}"`.
    pub fn within(mut self, outer: impl fmt::Display) -> Error {
        self.context = format!("{outer}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.context.is_empty() {
            f.write_str(self.kind.describe())?;
        } else {
            f.write_str(&self.context)?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<crate::descriptor::DescriptorError> for Error {
    fn from(e: crate::descriptor::DescriptorError) -> Error {
        Error::invalid(format!("descriptor {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_specific_kinds() {
        let e = Error::io("open x", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), ErrorKind::FileNotFound);
        assert_eq!(e.kind().vix_code(), 4);
        assert!(e.to_string().starts_with("open x: "));
    }

    #[test]
    fn within_prefixes_context() {
        let e = Error::invalid("bad grain size").within("disk.vmdk");
        assert_eq!(e.to_string(), "disk.vmdk: bad grain size");
    }
}
