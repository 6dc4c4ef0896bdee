//! How much host space a clone of a disk into a given type needs (VDDK's
//! SpaceNeededForClone): an upper bound computed from the allocation map and the
//! metadata layout the writers use.

use crate::disk::{Disk, RangeKind};
use crate::disk_type::DiskType;
use crate::error::Result;
use crate::extent::sparse::header::new_sparse_header;
use crate::limits::{SECTOR_SIZE, SPLIT_EXTENT_SECTORS};
use crate::ops::create::{DEFAULT_GRAIN_SECTORS, EMBEDDED_DESCRIPTOR_SECTORS};

/// Room for a separate descriptor file.
const DESCRIPTOR_BYTES: u64 = 4096;

/// Bytes a clone of `disk` (its whole chain) into `target` needs on the host at most.
/// Sparse targets need their metadata plus one grain per grain holding data; flat
/// targets their capacity (thin ones only the grains holding data); streamOptimized
/// is bounded by its uncompressed grains plus markers and tables.
pub fn space_needed_for_clone(disk: &Disk, target: DiskType) -> Result<u64> {
    let capacity = disk.capacity();
    let sectors = capacity.div_ceil(SECTOR_SIZE);
    let grain = DEFAULT_GRAIN_SECTORS * SECTOR_SIZE;
    // Grains that hold data, counting a grain touched by two ranges once.
    let mut grains = 0u64;
    let mut next_free_grain = 0u64;
    disk.for_each_range(0, capacity, |r| {
        if r.kind == RangeKind::Data {
            let first = (r.offset / grain).max(next_free_grain);
            let end = (r.offset + r.length).div_ceil(grain);
            if end > first {
                grains += end - first;
                next_free_grain = end;
            }
        }
        Ok(())
    })?;
    let data = grains * grain;
    let sparse_meta = |extent_sectors: u64, desc: u64| -> Result<u64> {
        Ok(new_sparse_header(extent_sectors, DEFAULT_GRAIN_SECTORS, desc)?.overhead * SECTOR_SIZE)
    };
    Ok(match target {
        DiskType::MonolithicSparse => sparse_meta(sectors, EMBEDDED_DESCRIPTOR_SECTORS)? + data,
        DiskType::TwoGbMaxExtentSparse => {
            let mut meta = DESCRIPTOR_BYTES;
            let mut left = sectors;
            while left > 0 {
                let n = left.min(SPLIT_EXTENT_SECTORS);
                meta += sparse_meta(n, 0)?;
                left -= n;
            }
            meta + data
        }
        DiskType::MonolithicFlat | DiskType::TwoGbMaxExtentFlat | DiskType::Vmfs => {
            DESCRIPTOR_BYTES + sectors * SECTOR_SIZE
        }
        DiskType::VmfsThin => DESCRIPTOR_BYTES + data,
        DiskType::StreamOptimized | DiskType::VmfsSparse | DiskType::SeSparse => {
            let tables = sectors.div_ceil(DEFAULT_GRAIN_SECTORS * 512) * (4 + 1) * SECTOR_SIZE;
            // Header, descriptor, grain markers (at most one sector each beyond the
            // data, plus deflate's few bytes), tables, directory, footer, EOS.
            128 * SECTOR_SIZE + grains * (grain + 2 * SECTOR_SIZE) + tables + 4 * SECTOR_SIZE
        }
    })
}
