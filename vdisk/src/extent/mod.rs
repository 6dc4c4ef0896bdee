//! Extents: the pieces a link's descriptor lists, each covering a run of the virtual
//! disk. An extent never does guest I/O on its own; it answers "where does this range
//! live?" with an [`ExtentMapping`], reads file bytes where told, and writes.

pub mod flat;
pub mod grains;
pub mod sesparse;
pub mod sparse;
pub mod stream;

use std::os::fd::BorrowedFd;

use crate::error::{Error, ErrorKind, Result};
pub use flat::FlatExtent;
pub use sesparse::SeSparseExtent;
pub use sparse::SparseExtent;
pub use stream::StreamExtent;

/// Reads the chain below the current link: `(offset within this extent, buffer)`.
/// Used to complete partially written grains (copy on write).
pub type BelowFn<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<()>;

/// Where a range of an extent lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentMapping {
    /// Stored in the extent's file at this byte offset.
    Data {
        /// Byte offset in the extent file.
        file_offset: u64,
    },
    /// Part of a compressed grain.
    Compressed {
        /// Sector of the grain's marker in the extent file.
        marker: u64,
        /// Index of the grain in the extent (its marker must say the same LBA).
        grain: u64,
        /// Byte offset of the range within the (decompressed) grain.
        offset_in_grain: u64,
    },
    /// Reads as zeros and hides the parent.
    Zero,
    /// Not stored here: ask the parent link (zeros at the bottom of the chain).
    Unallocated,
}

/// One extent of a link.
#[derive(Debug)]
pub enum Extent {
    /// `FLAT` or `VMFS`.
    Flat(FlatExtent),
    /// `ZERO`: reads zeros, no file.
    Zero {
        /// Capacity in bytes.
        len: u64,
    },
    /// Hosted sparse (`SPARSE`, KDMV).
    Sparse(Box<SparseExtent>),
    /// streamOptimized (compressed KDMV), read-only.
    Stream(Box<StreamExtent>),
    /// ESXi space-efficient sparse (`SESPARSE`).
    SeSparse(Box<SeSparseExtent>),
}

impl Extent {
    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        match self {
            Extent::Flat(f) => f.capacity_bytes(),
            Extent::Zero { len } => *len,
            Extent::Sparse(s) => s.capacity_bytes(),
            Extent::Stream(s) => s.capacity_bytes(),
            Extent::SeSparse(s) => s.capacity_bytes(),
        }
    }

    /// Where `offset` (bytes within the extent) lives, and for how many bytes (≤ `len`).
    pub fn map(&self, offset: u64, len: u64) -> Result<(ExtentMapping, u64)> {
        match self {
            Extent::Flat(f) => Ok(f.map(offset, len)),
            Extent::Zero { len: cap } => Ok((ExtentMapping::Zero, len.min(cap - offset))),
            Extent::Sparse(s) => s.map(offset, len),
            Extent::Stream(s) => s.map(offset, len),
            Extent::SeSparse(s) => s.map(offset, len),
        }
    }

    /// Reads file bytes at `file_offset` (from a [`ExtentMapping::Data`] answer).
    pub fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Extent::Flat(f) => f.read_data(file_offset, buf),
            Extent::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Extent::Sparse(s) => s.read_data(file_offset, buf),
            Extent::SeSparse(s) => s.read_data(file_offset, buf),
            Extent::Stream(_) => Err(Error::new(
                ErrorKind::Fail,
                "streamOptimized extents hold only compressed grains",
            )),
        }
    }

    /// The host file that holds `len` bytes at `file_offset` (an
    /// [`ExtentMapping::Data`] answer), for a sender that moves them without reading
    /// them (`sendfile`). `None` where the extent is not a host file, or its file
    /// does not reach the end of the range: then [`Extent::read_data`] gives the
    /// bytes, or the error.
    pub fn data_file(&self, file_offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        let (fd, file_len) = match self {
            Extent::Flat(f) => (f.fd()?, f.file_len().ok()?),
            Extent::Sparse(s) => (s.fd()?, s.file_len().ok()?),
            Extent::SeSparse(s) => (s.fd()?, s.file_len().ok()?),
            Extent::Zero { .. } | Extent::Stream(_) => return None,
        };
        let end = file_offset.checked_add(len)?;
        (end <= file_len).then_some(fd)
    }

    /// Calls `f(holds_data, bytes)` for the pieces of the `len` bytes at
    /// `file_offset` (an [`ExtentMapping::Data`] answer), in order. In a flat
    /// extent the holes of its file (`SEEK_HOLE`) read as zeros and are no data:
    /// an all-hole 16 GiB flat disk maps, converts and backs up in a few system
    /// calls. Every other extent's data is data.
    pub fn for_each_file_piece(
        &self,
        file_offset: u64,
        len: u64,
        mut f: impl FnMut(bool, u64) -> Result<()>,
    ) -> Result<()> {
        let Extent::Flat(flat) = self else {
            return f(true, len);
        };
        let mut at = file_offset;
        crate::storage::for_each_data(flat.storage(), file_offset, len, |start, n| {
            if start > at {
                f(false, start - at)?;
            }
            at = start + n;
            f(true, n)
        })?;
        let end = file_offset + len;
        if at < end {
            f(false, end - at)?;
        }
        Ok(())
    }

    /// Reads part of a compressed grain (from a [`ExtentMapping::Compressed`] answer).
    pub fn read_compressed(
        &self,
        marker: u64,
        grain: u64,
        offset_in_grain: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        match self {
            Extent::Stream(s) => s.read_compressed(marker, grain, offset_in_grain, buf),
            _ => Err(Error::new(ErrorKind::Fail, "not a compressed extent")),
        }
    }

    /// Writes `data` at `offset` within the extent.
    pub fn write(&self, offset: u64, data: &[u8], below: BelowFn<'_>) -> Result<()> {
        match self {
            Extent::Flat(f) => f.write(offset, data),
            Extent::Zero { .. } => Err(Error::new(
                ErrorKind::ReadOnly,
                "a ZERO extent cannot be written",
            )),
            Extent::Sparse(s) => s.write(offset, data, below),
            Extent::SeSparse(s) => s.write(offset, data, below),
            Extent::Stream(_) => Err(Error::new(
                ErrorKind::NotSupported,
                "streamOptimized disks cannot be written in place; convert them to another type",
            )),
        }
    }

    /// Writes back metadata and makes data durable.
    pub fn flush(&self) -> Result<()> {
        match self {
            Extent::Flat(f) => f.flush(),
            Extent::Zero { .. } => Ok(()),
            Extent::Sparse(s) => s.flush(),
            Extent::SeSparse(s) => s.flush(),
            Extent::Stream(_) => Ok(()),
        }
    }

    /// Marks the extent open for writing (sparse extents set `uncleanShutdown`).
    pub fn begin_write(&self) -> Result<()> {
        match self {
            Extent::Sparse(s) => s.begin_write(),
            Extent::SeSparse(s) => s.begin_write(),
            _ => Ok(()),
        }
    }

    /// Clean close: flush and clear open-for-write markers.
    pub fn close(&self) -> Result<()> {
        match self {
            Extent::Flat(f) => f.flush(),
            Extent::Zero { .. } => Ok(()),
            Extent::Sparse(s) => s.close(),
            Extent::SeSparse(s) => s.close(),
            Extent::Stream(_) => Ok(()),
        }
    }

    /// Bytes the extent's file occupies (its length), 0 for ZERO extents.
    pub fn file_len(&self) -> Result<u64> {
        match self {
            Extent::Flat(f) => f.file_len(),
            Extent::Zero { .. } => Ok(0),
            Extent::Sparse(s) => s.file_len(),
            Extent::Stream(s) => Ok(s.file_len()),
            Extent::SeSparse(s) => s.file_len(),
        }
    }
}
