//! Where the bytes come from.

use crate::PartError;

/// A random-access, read-only byte source: a disk, a file, a buffer.
pub trait BlockSource {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`. Reads past [`BlockSource::size`] fail.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PartError>;
}

/// Fails with [`PartError::OutOfRange`] unless `len` bytes at `offset` lie inside `size`.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> Result<(), PartError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(PartError::OutOfRange { offset, len, size }),
    }
}

/// Reads `len` bytes at `offset` into a new buffer, checking the range first (so a
/// hostile length never allocates more than the source holds).
pub(crate) fn read_vec(
    src: &dyn BlockSource,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, PartError> {
    check_range(offset, len, src.size())?;
    let mut buf = vec![0u8; len];
    src.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// Any disk, local or remote, is a block source.
pub struct DiskSource<'a>(pub &'a dyn vdisk::VirtualDisk);

impl BlockSource for DiskSource<'_> {
    fn size(&self) -> u64 {
        self.0.capacity()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PartError> {
        check_range(offset, buf.len(), self.0.capacity())?;
        self.0.read_at(buf, offset).map_err(|e| PartError::Read {
            offset,
            len: buf.len(),
            source: Box::new(e),
        })
    }
}

impl BlockSource for vdisk::Disk {
    fn size(&self) -> u64 {
        DiskSource(self).size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PartError> {
        DiskSource(self).read_at(buf, offset)
    }
}

impl BlockSource for &[u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PartError> {
        check_range(offset, buf.len(), self.len() as u64)?;
        // In range, so the offset fits in usize.
        let start = offset as usize;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
}

impl BlockSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PartError> {
        self.as_slice().read_at(buf, offset)
    }
}

#[cfg(unix)]
impl BlockSource for std::fs::File {
    /// The file's length at the time of the call (0 if it cannot be queried).
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PartError> {
        use std::os::unix::fs::FileExt;
        check_range(offset, buf.len(), BlockSource::size(self))?;
        self.read_exact_at(buf, offset)
            .map_err(|e| PartError::Read {
                offset,
                len: buf.len(),
                source: Box::new(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_check_their_bounds() {
        let data: Vec<u8> = (0..=255).collect();
        let mut buf = [0u8; 4];
        data.read_at(&mut buf, 252).unwrap();
        assert_eq!(buf, [252, 253, 254, 255]);
        assert!(matches!(
            data.read_at(&mut buf, 253),
            Err(PartError::OutOfRange {
                offset: 253,
                len: 4,
                size: 256
            })
        ));
        assert!(matches!(
            data.read_at(&mut buf, u64::MAX - 1),
            Err(PartError::OutOfRange { .. })
        ));
        assert!(read_vec(&data, 0, usize::MAX).is_err());
    }
}
