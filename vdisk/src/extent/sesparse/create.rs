//! Making a new, empty seSparse file with the layout ESXi uses.

use super::*;

fn align_region(sectors: u64) -> u64 {
    sectors.max(1).div_ceil(REGION_ALIGN_SECTORS) * REGION_ALIGN_SECTORS
}

/// The header [`create_sesparse`] writes for `capacity` sectors (already checked
/// against the limit).
pub(super) fn new_layout(capacity: u64) -> ConstHeader {
    let gdes = capacity.div_ceil(SECTORS_PER_GT);
    let grains = capacity.div_ceil(SESPARSE_GRAIN_SECTORS);
    let gd_size = align_region((gdes * 8).div_ceil(SECTOR_SIZE));
    let gt_size = align_region(gdes * SESPARSE_GT_SECTORS);
    let bitmap_size = align_region(grains.div_ceil(8).div_ceil(SECTOR_SIZE));
    let backmap_size = align_region((grains * 8).div_ceil(SECTOR_SIZE));
    let journal_offset = REGION_ALIGN_SECTORS;
    let journal_size = REGION_ALIGN_SECTORS;
    let gd_offset = journal_offset + journal_size;
    let gt_offset = gd_offset + gd_size;
    let bitmap_offset = gt_offset + gt_size;
    let backmap_offset = bitmap_offset + bitmap_size;
    let grains_offset = backmap_offset + backmap_size;
    ConstHeader {
        capacity,
        volatile_offset: 1,
        volatile_size: 1,
        journal_header_offset: 2,
        journal_header_size: 2,
        journal_offset,
        journal_size,
        gd_offset,
        gd_size,
        gt_offset,
        gt_size,
        bitmap_offset,
        bitmap_size,
        backmap_offset,
        backmap_size,
        grains_offset,
        grains_size: grains * SESPARSE_GRAIN_SECTORS,
    }
}

/// Creates a new, empty seSparse extent of `capacity_sectors` in `storage` (an
/// already created, empty file) with the layout ESXi uses (see the module
/// documentation): constant and volatile headers written, every other region zeros,
/// the file extended to the start of the grain area, then synced.
pub fn create_sesparse(storage: &FileStorage, capacity_sectors: u64) -> Result<()> {
    let name = storage.path().display().to_string();
    if capacity_sectors == 0 || capacity_sectors > MAX_SESPARSE_CAPACITY_SECTORS {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{name}: a seSparse extent holds 1 to {MAX_SESPARSE_CAPACITY_SECTORS} sectors, not {capacity_sectors}"
            ),
        ));
    }
    let len = storage
        .len()
        .map_err(|e| Error::io(format!("{name}: cannot read file size"), e))?;
    if len != 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{name}: a new seSparse extent needs an empty file, not one of {len} bytes"),
        ));
    }
    let h = new_layout(capacity_sectors);
    debug_assert!(h.gt_offset + h.gt_size <= QEMU_MAX_GT_SECTOR);
    h.validate_layout().map_err(|e| e.within(&name))?;
    let io = |what: &str, e| Error::io(format!("{name}: cannot {what}"), e);
    storage
        .write_all_at(&h.to_bytes(), 0)
        .map_err(|e| io("write the seSparse header", e))?;
    storage
        .write_all_at(
            &VolatileHeader::new().to_bytes(),
            h.volatile_offset * SECTOR_SIZE,
        )
        .map_err(|e| io("write the seSparse volatile header", e))?;
    storage
        .set_len(h.grains_offset * SECTOR_SIZE)
        .map_err(|e| io("extend the file", e))?;
    storage.sync().map_err(|e| io("sync", e))
}
