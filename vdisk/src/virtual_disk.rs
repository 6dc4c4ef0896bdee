//! [`VirtualDisk`]: what every consumer of a disk needs - read, write, zero,
//! flush, map and ask for changed areas - whether the disk is a local chain
//! ([`Disk`]) or a remote export (`vdisk_nbd::client::RemoteDisk`). The C ABI, the
//! FUSE mount, convert and the backup code work on `dyn VirtualDisk` and do not
//! know which they have.

use crate::disk::{Disk, MapRange};
use crate::error::Result;

/// A virtual disk, local or remote. Thread-safe: any number of threads may read
/// and write at once.
pub trait VirtualDisk: Send + Sync {
    /// Virtual size in bytes.
    fn capacity(&self) -> u64;

    /// Whether writes are allowed.
    fn is_writable(&self) -> bool;

    /// Reads `buf.len()` bytes at byte `offset` (the whole range must lie inside
    /// the disk).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `data` at byte `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> Result<()>;

    /// Makes `[offset, offset+len)` read as zeros, allocating as little as the
    /// disk can; with `only_if_cheap`, fails with `NotSupported` rather than write
    /// zeros.
    fn write_zeroes(&self, offset: u64, len: u64, only_if_cheap: bool) -> Result<()>;

    /// Makes every write acknowledged so far durable.
    fn flush(&self) -> Result<()>;

    /// The size a writer should align to (a grain, or a remote preferred block).
    fn grain_bytes(&self) -> u64;

    /// Calls `f` for each run of the allocation map of `[offset, offset+len)`, in
    /// ascending order, covering the range (clipped to the disk) without gaps.
    fn for_each_range(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(MapRange) -> Result<()>,
    ) -> Result<()>;

    /// [`VirtualDisk::for_each_range`] collected (for bounded windows: a hostile
    /// disk can describe millions of runs).
    fn allocation_map(&self, offset: u64, len: u64) -> Result<Vec<MapRange>> {
        let mut out = Vec::new();
        self.for_each_range(offset, len, &mut |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// The change ID of the disk's current state (`NotSupported` without change
    /// tracking).
    fn change_id(&self) -> Result<String>;

    /// Calls `f(offset, length)` for each area of `[offset, offset+len)` changed
    /// since change ID `since` (`*`: every area holding data), ascending, merged.
    fn for_each_changed_area(
        &self,
        since: &str,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<()>;

    /// What the disk is, for messages: a path or a URI.
    fn describe(&self) -> String;
}

impl VirtualDisk for Disk {
    fn capacity(&self) -> u64 {
        Disk::capacity(self)
    }

    fn is_writable(&self) -> bool {
        Disk::is_writable(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Disk::read_at(self, buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        Disk::write_at(self, data, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, only_if_cheap: bool) -> Result<()> {
        Disk::write_zeroes(self, offset, len, only_if_cheap)
    }

    fn flush(&self) -> Result<()> {
        Disk::flush(self)
    }

    fn grain_bytes(&self) -> u64 {
        Disk::grain_bytes(self)
    }

    fn for_each_range(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(MapRange) -> Result<()>,
    ) -> Result<()> {
        Disk::for_each_range(self, offset, len, f)
    }

    fn change_id(&self) -> Result<String> {
        Disk::change_id(self)
    }

    fn for_each_changed_area(
        &self,
        since: &str,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        Disk::for_each_changed_area(self, since, offset, len, f)
    }

    fn describe(&self) -> String {
        self.links()[0].path().display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create, CreateOptions, DiskType, OpenOptions, RangeKind};

    #[test]
    fn a_disk_behind_the_trait_reads_writes_and_maps_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vmdk");
        create(
            &path,
            &CreateOptions::new(DiskType::MonolithicSparse, 8 << 20),
        )
        .unwrap();
        let disk = OpenOptions::new().write(true).open(&path).unwrap();
        let v: &dyn VirtualDisk = &disk;
        assert_eq!(v.capacity(), 8 << 20);
        assert!(v.is_writable());
        v.write_at(&[7u8; 4096], 1 << 20).unwrap();
        let mut b = [0u8; 4096];
        v.read_at(&mut b, 1 << 20).unwrap();
        assert_eq!(b, [7u8; 4096]);
        let mut runs = Vec::new();
        v.for_each_range(0, 8 << 20, &mut |r| {
            runs.push((r.offset, r.length, r.kind));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            runs,
            disk.allocation_map(0, 8 << 20)
                .unwrap()
                .iter()
                .map(|r| (r.offset, r.length, r.kind))
                .collect::<Vec<_>>()
        );
        assert!(runs.iter().any(|r| r.2 == RangeKind::Data));
        let mut areas = Vec::new();
        v.for_each_changed_area("*", 0, 8 << 20, &mut |o, l| {
            areas.push((o, l));
            Ok(())
        })
        .unwrap();
        assert_eq!(areas, disk.changed_areas("*", 0, 8 << 20).unwrap());
        assert_eq!(
            v.change_id().unwrap_err().kind(),
            crate::ErrorKind::NotSupported
        );
        assert!(v.describe().ends_with("d.vmdk"));
        v.flush().unwrap();
    }
}
