//! Flat extents (`FLAT`, `VMFS`): the guest bytes stored verbatim in a host file,
//! starting at a sector offset.

use crate::error::{Error, ErrorKind, Result};
use crate::extent::ExtentMapping;
use crate::limits::SECTOR_SIZE;
use crate::storage::{FileStorage, Storage};

/// A flat extent: `len` bytes of the guest disk at byte `base` of `storage`.
#[derive(Debug)]
pub struct FlatExtent {
    storage: FileStorage,
    base: u64,
    len: u64,
    writable: bool,
    name: String,
}

impl FlatExtent {
    /// Opens a flat extent of `sectors` sectors starting at sector `offset` of the file.
    /// The file must be long enough to hold the extent.
    pub fn open(
        storage: FileStorage,
        offset: u64,
        sectors: u64,
        writable: bool,
    ) -> Result<FlatExtent> {
        let name = storage.path().display().to_string();
        let base = offset
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(|| Error::invalid(format!("{name}: extent offset {offset} overflows")))?;
        let len = sectors
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(|| Error::invalid(format!("{name}: extent size {sectors} overflows")))?;
        let need = base
            .checked_add(len)
            .ok_or_else(|| Error::invalid(format!("{name}: extent end overflows")))?;
        let have = storage
            .len()
            .map_err(|e| Error::io(format!("{name}: cannot read file size"), e))?;
        if have < need {
            return Err(Error::invalid(format!(
                "{name}: flat extent file is {have} bytes but the descriptor needs {need}"
            )));
        }
        Ok(FlatExtent {
            storage,
            base,
            len,
            writable,
            name,
        })
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.len
    }

    /// Every byte of a flat extent is data.
    pub fn map(&self, offset: u64, len: u64) -> (ExtentMapping, u64) {
        (
            ExtentMapping::Data {
                file_offset: self.base + offset,
            },
            len.min(self.len - offset),
        )
    }

    /// The extent's file.
    pub(crate) fn storage(&self) -> &dyn Storage {
        &self.storage
    }

    /// The host file descriptor of the extent's file, if it is one.
    pub(crate) fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.storage.fd()
    }

    /// Reads file bytes at `file_offset`.
    pub fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_exact_at(buf, file_offset)
            .map_err(|e| Error::io(format!("{}: read failed", self.name), e))
    }

    /// Writes guest bytes at `offset` within the extent.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{} is open read-only", self.name),
            ));
        }
        self.storage
            .write_all_at(data, self.base + offset)
            .map_err(|e| Error::io(format!("{}: write failed", self.name), e))
    }

    /// Makes written data durable.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.storage
            .sync()
            .map_err(|e| Error::io(format!("{}: sync failed", self.name), e))
    }

    /// Size of the host file.
    pub fn file_len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io(format!("{}: cannot read file size", self.name), e))
    }
}
