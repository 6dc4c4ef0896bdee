//! Growing a closed disk (vmware-vdiskmanager `-x`, VDDK `Grow`).
//!
//! The last extent grows first (a sparse extent gets new grain tables, a flat file is
//! extended); split disks then get new extent files of at most 2047 MiB. The
//! descriptor is rewritten last: until then the disk reads at its old size, so a
//! failure or crash part way leaves a working disk (new extent files of a failed
//! grow are removed).

use std::path::Path;

use crate::descriptor::{CreateType, ExtentKind, ExtentLine};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::header::new_sparse_header;
use crate::geometry::{AdapterType, Geometry};
use crate::limits::{MAX_CAPACITY_SECTORS, SECTOR_SIZE, SPLIT_EXTENT_SECTORS};
use crate::ops::closed::{ClosedKind, ClosedLink};
use crate::ops::convert::Progress;
use crate::ops::create::{base_name, extent, split, write_new_sparse, Created};
use crate::storage::{FileStorage, LockMode, Storage};

/// How to grow.
#[derive(Clone, Debug)]
pub struct GrowOptions {
    /// Recompute `ddb.geometry.*` for the new capacity (VDDK's `updateGeometry`).
    pub update_geometry: bool,
}

impl Default for GrowOptions {
    fn default() -> Self {
        GrowOptions {
            update_geometry: true,
        }
    }
}

/// Grows the closed disk at `path` to `new_capacity` bytes (a multiple of 512, not
/// below the current capacity; the same capacity is a no-op). The new space reads
/// as zeros. streamOptimized disks cannot grow (`NotSupported`).
pub fn grow(
    path: &Path,
    new_capacity: u64,
    opts: &GrowOptions,
    progress: Progress<'_>,
) -> Result<()> {
    grow_inner(path, new_capacity, opts, progress).map_err(|e| e.within(path.display()))
}

fn grow_inner(
    path: &Path,
    new_capacity: u64,
    opts: &GrowOptions,
    progress: Progress<'_>,
) -> Result<()> {
    if new_capacity == 0 || !new_capacity.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("new capacity {new_capacity} bytes is not a positive multiple of 512"),
        ));
    }
    let new_sectors = new_capacity / SECTOR_SIZE;
    if new_sectors > MAX_CAPACITY_SECTORS {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "new capacity {new_capacity} bytes exceeds the limit of {} bytes",
                MAX_CAPACITY_SECTORS * SECTOR_SIZE
            ),
        ));
    }
    let link = ClosedLink::open(path)?;
    let old_sectors: u64 = link.extents.iter().map(|e| e.line.sectors).sum();
    if new_sectors < old_sectors {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "new capacity {new_capacity} bytes is smaller than the current {} bytes; a disk cannot be grown smaller",
                old_sectors * SECTOR_SIZE
            ),
        ));
    }
    if !progress(0, 1) {
        return Err(Error::new(ErrorKind::Cancelled, "grow cancelled"));
    }
    if new_sectors == old_sectors {
        progress(1, 1);
        return Ok(());
    }
    let split_disk = match link.create_type {
        CreateType::TwoGbMaxExtentSparse | CreateType::TwoGbMaxExtentFlat => true,
        CreateType::MonolithicSparse
        | CreateType::MonolithicFlat
        | CreateType::Vmfs
        | CreateType::VmfsThin
        | CreateType::VmfsPreallocated
        | CreateType::VmfsEagerZeroedThick
        | CreateType::VmfsThick => false,
        CreateType::StreamOptimized => {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "a streamOptimized disk cannot grow; convert it to another type first",
            ))
        }
        ref other => {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!("disks of type {} cannot grow", other.as_str()),
            ))
        }
    };
    let last_index = link.extents.len() - 1;
    let last = &link.extents[last_index];
    if matches!(
        last.kind,
        ClosedKind::Zero | ClosedKind::Stream | ClosedKind::SeSparse
    ) {
        return Err(Error::new(
            ErrorKind::NotSupported,
            "the last extent of this disk cannot grow",
        ));
    }
    let added = new_sectors - old_sectors;
    let room = if split_disk {
        SPLIT_EXTENT_SECTORS.saturating_sub(last.line.sectors)
    } else {
        added
    };
    let grow_last = added.min(room);
    let extra: Vec<u64> = split(added - grow_last).collect();

    // New extent files of a split disk, removed again on failure.
    let mut created = Created::default();
    let mut lines = link.descriptor.extents();
    let (dir, stem) = base_name(path)?;
    let sparse_grain = if last.kind == ClosedKind::Sparse {
        let f = link.open_sparse(last_index)?;
        Some(f.header.grain_size)
    } else {
        None
    };
    for (i, &n) in extra.iter().enumerate() {
        let number = lines.len() + 1;
        let (suffix, kind, offset) = match sparse_grain {
            Some(_) => ("s", ExtentKind::Sparse, None),
            None => ("f", ExtentKind::Flat, Some(0)),
        };
        let name = format!("{stem}-{suffix}{number:03}.vmdk");
        let storage = created.new_file(&dir.join(&name))?;
        match sparse_grain {
            Some(grain) => write_new_sparse(&storage, &new_sparse_header(n, grain, 0)?, None)?,
            None => storage
                .set_len(n * SECTOR_SIZE)
                .and_then(|()| storage.sync())
                .map_err(|e| Error::io(format!("cannot size {name}"), e))?,
        }
        lines.push(extent(n, kind, &name, offset));
        if !progress(i as u64 + 1, extra.len() as u64 + 1) {
            return Err(Error::new(ErrorKind::Cancelled, "grow cancelled"));
        }
    }

    // The last extent.
    let mut embedded = None;
    if grow_last > 0 {
        let line: &mut ExtentLine = &mut lines[last_index];
        let target = line.sectors + grow_last;
        match last.kind {
            ClosedKind::Sparse => {
                let mut f = link.open_sparse(last_index)?;
                f.grow(target)?;
                if link.embedded {
                    embedded = Some(f);
                }
            }
            _ => {
                let p = link.extent_path(last_index)?;
                let storage = FileStorage::open(p, true, LockMode::Exclusive)?;
                let base = line.offset.unwrap_or(0);
                let end_of = |sectors: u64| {
                    base.checked_add(sectors)
                        .and_then(|s| s.checked_mul(SECTOR_SIZE))
                        .ok_or_else(|| Error::invalid("the flat extent's end overflows"))
                };
                zero_new_flat_space(&storage, end_of(line.sectors)?, end_of(target)?)?;
            }
        }
        line.sectors = target;
    } else if link.embedded {
        embedded = Some(link.open_sparse(0)?);
    }

    let mut d = link.descriptor.clone();
    d.set_extents(&lines);
    if opts.update_geometry {
        let adapter = d
            .ddb("ddb.adapterType")
            .and_then(|a| a.parse::<AdapterType>().ok())
            .unwrap_or(AdapterType::LsiLogic);
        let g = Geometry::for_new_disk(new_sectors, adapter);
        d.set_ddb("ddb.geometry.cylinders", &g.cylinders.to_string());
        d.set_ddb("ddb.geometry.heads", &g.heads.to_string());
        d.set_ddb("ddb.geometry.sectors", &g.sectors.to_string());
    }
    link.save_descriptor(&d, embedded.as_ref())?;
    created.keep();
    progress(extra.len() as u64 + 1, extra.len() as u64 + 1);
    Ok(())
}

/// Makes bytes `[old_end, new_end)` of a flat extent's file read as zeros: whatever
/// lay past the old extent's end (the file may be longer than its extent) must not
/// appear in the grown disk. A regular file is cut back to `old_end` and extended
/// (a hole); a block device (raw device mapping) cannot change size, so it must be
/// large enough and the range is overwritten with zeros. Synced; the descriptor,
/// written after this, is what makes the new space part of the disk.
fn zero_new_flat_space(storage: &FileStorage, old_end: u64, new_end: u64) -> Result<()> {
    let name = storage.path().display();
    let io = |what: &str, e| Error::io(format!("cannot {what} {name}"), e);
    if !storage.is_block_device().map_err(|e| io("inspect", e))? {
        return storage
            .set_len(old_end)
            .and_then(|()| storage.set_len(new_end))
            .and_then(|()| storage.sync())
            .map_err(|e| io("extend", e));
    }
    let have = storage.len().map_err(|e| io("read the size of", e))?;
    if have < new_end {
        return Err(Error::new(
            ErrorKind::DiskFull,
            format!("the device {name} holds {have} bytes; growing the disk needs {new_end}"),
        ));
    }
    let zeros = vec![0u8; ZERO_CHUNK.min(new_end - old_end) as usize];
    let mut at = old_end;
    while at < new_end {
        let n = (new_end - at).min(zeros.len() as u64);
        storage
            .write_all_at(&zeros[..n as usize], at)
            .map_err(|e| io("write zeros to", e))?;
        at += n;
    }
    storage.sync().map_err(|e| io("sync", e))
}

/// Bytes of zeros written at once into a block device's new space.
const ZERO_CHUNK: u64 = 1 << 20;
