//! A closed hosted sparse extent seen as plain tables, for the whole-file maintenance
//! operations (grow, shrink, defragment, check and repair).
//!
//! Unlike [`super::SparseExtent`], which serves guest I/O through a bounded cache,
//! this view holds both grain directories in memory and reads or writes one grain
//! table at a time, so a caller can walk every entry of a file in bounded memory.
//! Nothing beyond the header is validated here: the callers decide what a bad entry
//! means (an error for shrink, a finding for check).

use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::header::{SparseHeader, GD_AT_END, HEADER_SIZE};
use crate::limits::SECTOR_SIZE;
use crate::storage::{FileStorage, Storage};

/// Grain table entry: grain not allocated.
pub const GTE_UNALLOCATED: u32 = 0;
/// Grain table entry: zeroed grain (version 2 files with the zeroed-grain flag).
pub const GTE_ZEROED: u32 = 1;

/// One hosted sparse extent file, opened for maintenance.
#[derive(Debug)]
pub struct SparseFile {
    /// The file (locked by the caller's choice of [`FileStorage::open`]).
    pub storage: FileStorage,
    /// The parsed header.
    pub header: SparseHeader,
    /// The grain directory (one sector number per grain table, 0 = none).
    pub gd: Vec<u32>,
    /// The redundant grain directory, if the header announces one.
    pub rgd: Option<Vec<u32>>,
    /// Length of the file in bytes.
    pub file_len: u64,
}

impl SparseFile {
    /// Reads the header and both directories. Compressed (streamOptimized) files are
    /// refused with `NotSupported`: their grains cannot be rewritten in place.
    pub fn open(storage: FileStorage) -> Result<SparseFile> {
        let name = storage.path().display().to_string();
        Self::open_inner(storage).map_err(|e| e.within(name))
    }

    fn open_inner(storage: FileStorage) -> Result<SparseFile> {
        let header = read_header(&storage)?;
        if header.is_compressed() || header.gd_offset == GD_AT_END {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "the extent is streamOptimized (compressed)",
            ));
        }
        let file_len = storage
            .len()
            .map_err(|e| Error::io("cannot read the file size", e))?;
        let n = header.num_gdes() as usize;
        let gd = read_u32s(&storage, header.gd_offset, n, "grain directory")?;
        let rgd = if header.has_redundant_gd() {
            Some(read_u32s(
                &storage,
                header.rgd_offset,
                n,
                "redundant grain directory",
            )?)
        } else {
            None
        };
        Ok(SparseFile {
            storage,
            header,
            gd,
            rgd,
            file_len,
        })
    }

    /// A short name for messages.
    pub fn name(&self) -> String {
        self.storage.path().display().to_string()
    }

    /// Sectors per grain.
    pub fn grain_sectors(&self) -> u64 {
        self.header.grain_size
    }

    /// Sectors one grain table occupies.
    pub fn gt_sectors(&self) -> u64 {
        self.header.gt_sectors()
    }

    /// Entries per grain table.
    pub fn gtes_per_gt(&self) -> usize {
        self.header.num_gtes_per_gt as usize
    }

    /// Bytes of the grain `grain` (index in the extent) that lie inside the capacity.
    pub fn grain_valid_bytes(&self, grain: u64) -> u64 {
        let g = self.header.grain_bytes();
        let cap = self.header.capacity * SECTOR_SIZE;
        g.min(cap.saturating_sub(grain * g))
    }

    /// Reads the grain table at `sector`.
    pub fn read_table(&self, sector: u32) -> Result<Vec<u32>> {
        read_u32s(
            &self.storage,
            u64::from(sector),
            self.gtes_per_gt(),
            "grain table",
        )
    }

    /// Writes `entries` as a grain table at `sector` (padded to whole sectors).
    pub fn write_table_at(&self, sector: u32, entries: &[u32]) -> Result<()> {
        write_u32s(
            &self.storage,
            u64::from(sector),
            entries,
            self.gt_sectors(),
            "grain table",
        )
    }

    /// Writes grain table `index` to the places both directories name.
    pub fn write_table(&self, index: usize, entries: &[u32]) -> Result<()> {
        let mut at = vec![self.gd[index]];
        if let Some(rgd) = &self.rgd {
            at.push(rgd[index]);
        }
        for sector in at.into_iter().filter(|&s| s != 0) {
            self.write_table_at(sector, entries)?;
        }
        Ok(())
    }

    /// Writes both directories where the header says they are.
    pub fn write_directories(&self) -> Result<()> {
        let sectors = self.header.gd_sectors();
        write_u32s(
            &self.storage,
            self.header.gd_offset,
            &self.gd,
            sectors,
            "grain directory",
        )?;
        if let Some(rgd) = &self.rgd {
            write_u32s(
                &self.storage,
                self.header.rgd_offset,
                rgd,
                sectors,
                "redundant grain directory",
            )?;
        }
        Ok(())
    }

    /// Writes the header.
    pub fn write_header(&self) -> Result<()> {
        self.storage
            .write_all_at(&self.header.to_bytes(), 0)
            .map_err(|e| Error::io(format!("{}: cannot write the header", self.name()), e))
    }

    /// Reads `buf.len()` bytes at byte `offset`.
    pub fn read_bytes(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("{}: read failed", self.name()), e))
    }

    /// Writes `buf` at byte `offset`, tracking the file length.
    pub fn write_bytes(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.storage
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(format!("{}: write failed", self.name()), e))?;
        self.file_len = self.file_len.max(offset + buf.len() as u64);
        Ok(())
    }

    /// Truncates or extends the file to `len` bytes.
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        self.storage
            .set_len(len)
            .map_err(|e| Error::io(format!("{}: cannot resize", self.name()), e))?;
        self.file_len = len;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<()> {
        self.storage
            .sync()
            .map_err(|e| Error::io(format!("{}: sync failed", self.name()), e))
    }

    /// First free sector at the end of the file, rounded up to a grain boundary (where
    /// new grains and tables are placed, as qemu and VMware place them).
    pub fn end_sector(&self) -> u64 {
        let g = self.grain_sectors();
        self.file_len
            .div_ceil(SECTOR_SIZE)
            .max(self.header.overhead)
            .div_ceil(g)
            * g
    }
}

impl SparseFile {
    /// Grows the extent to `capacity` sectors. New grain tables (and redundant copies)
    /// are allocated, zeroed, at the end of the file; the directories are rewritten in
    /// place when their sectors have room, or moved to the end of the file otherwise.
    /// The header is written last, after a sync, so a crash leaves either the old or
    /// the new extent, never a mix.
    pub fn grow(&mut self, capacity: u64) -> Result<()> {
        if capacity <= self.header.capacity {
            return Ok(());
        }
        let mut new = self.header.clone();
        new.capacity = capacity;
        SparseHeader::parse(&new.to_bytes()).map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("cannot grow the extent to {capacity} sectors: {e}"),
            )
        })?;
        let old_n = self.gd.len();
        let new_n = new.num_gdes() as usize;
        let gt_sectors = self.gt_sectors();
        // Entries past the old capacity in the last table must read as unallocated.
        if let Some(last) = old_n.checked_sub(1) {
            let old_grains = self.header.capacity.div_ceil(self.grain_sectors());
            let first_in_last = last as u64 * self.gtes_per_gt() as u64;
            let keep = (old_grains - first_in_last) as usize;
            if self.gd[last] != 0 {
                let mut t = self.read_table(self.gd[last])?;
                if t[keep..].iter().any(|&e| e != GTE_UNALLOCATED) {
                    t[keep..].fill(GTE_UNALLOCATED);
                    self.write_table(last, &t)?;
                }
            }
        }
        let added = (new_n - old_n) as u64;
        let move_dirs = new.gd_sectors() > self.header.gd_sectors();
        let dir_sectors = if move_dirs { new.gd_sectors() } else { 0 };
        let mut at = self.end_sector();
        let mut place = |sectors: u64| -> Result<u64> {
            let s = at;
            at += sectors;
            if at > crate::limits::MAX_SPARSE_FILE_SECTORS {
                return Err(Error::new(
                    ErrorKind::FileTooBig,
                    "growing would put grain tables beyond the 2 TiB limit of a sparse file",
                ));
            }
            Ok(s)
        };
        let to_u32 = |s: u64| u32::try_from(s).unwrap_or(u32::MAX);
        let mut gd = self.gd.clone();
        let mut rgd = self.rgd.clone();
        if let Some(r) = rgd.as_mut() {
            if move_dirs {
                new.rgd_offset = place(dir_sectors)?;
            }
            let first = place(added * gt_sectors)?;
            r.extend((0..added).map(|i| to_u32(first + i * gt_sectors)));
        }
        if move_dirs {
            new.gd_offset = place(dir_sectors)?;
        }
        let first = place(added * gt_sectors)?;
        gd.extend((0..added).map(|i| to_u32(first + i * gt_sectors)));
        let g = self.grain_sectors();
        let end = at.div_ceil(g) * g;
        // Zeroed tables: the file is extended with zeros.
        self.set_len(end * SECTOR_SIZE)?;
        self.gd = gd;
        self.rgd = rgd;
        let old_header = std::mem::replace(&mut self.header, new);
        if let Err(e) = self.write_directories().and_then(|()| self.sync()) {
            self.header = old_header;
            return Err(e);
        }
        self.write_header()?;
        self.sync()
    }
}

impl SparseFile {
    /// Sector ranges `[start, end)` of all metadata (header, descriptor, both
    /// directories, every grain table), sorted. Fails with `NeedsRepair` if two overlap
    /// or one lies past the end of the file.
    pub fn metadata_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let h = &self.header;
        let mut meta: Vec<(u64, u64)> = vec![(0, 1)];
        if h.descriptor_offset != 0 {
            meta.push((h.descriptor_offset, h.descriptor_offset + h.descriptor_size));
        }
        let gds = h.gd_sectors();
        meta.push((h.gd_offset, h.gd_offset + gds));
        if self.rgd.is_some() {
            meta.push((h.rgd_offset, h.rgd_offset + gds));
        }
        let gts = self.gt_sectors();
        for dir in std::iter::once(&self.gd).chain(self.rgd.iter()) {
            meta.extend(
                dir.iter()
                    .filter(|&&e| e != 0)
                    .map(|&e| (u64::from(e), u64::from(e) + gts)),
            );
        }
        meta.sort_unstable();
        for w in meta.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(self.needs_repair(format!(
                    "metadata at sectors {} and {} overlap",
                    w[0].0, w[1].0
                )));
            }
        }
        let file_sectors = self.file_len.div_ceil(SECTOR_SIZE);
        if let Some(last) = meta.iter().max_by_key(|m| m.1) {
            if last.1 > file_sectors {
                return Err(self.needs_repair(format!(
                    "metadata at sector {} lies past the end of the file",
                    last.0
                )));
            }
        }
        Ok(meta)
    }

    /// Checks that data entry `e` of grain `grain` (table `index`, entry `j`) lies in
    /// the file and outside the sorted metadata ranges `meta`.
    pub fn check_grain(
        &self,
        meta: &[(u64, u64)],
        index: usize,
        j: usize,
        grain: u64,
        e: u64,
    ) -> Result<()> {
        let valid = self.grain_valid_bytes(grain);
        let end = e + valid.div_ceil(SECTOR_SIZE);
        let i = meta.partition_point(|m| m.0 < end);
        if e * SECTOR_SIZE + valid > self.file_len || (i > 0 && meta[i - 1].1 > e) {
            return Err(self.needs_repair(format!(
                "grain table {index} entry {j} points to sector {e}, outside the grain area"
            )));
        }
        Ok(())
    }

    /// A `NeedsRepair` error naming this file.
    pub fn needs_repair(&self, what: String) -> Error {
        Error::new(
            ErrorKind::NeedsRepair,
            format!(
                "{}: {what}; check and repair the disk first (vdiskmanager -R)",
                self.name()
            ),
        )
    }

    /// Fails with `NeedsRepair` if the redundant directory names a table for entry
    /// `index`, which the grain directory leaves empty: that table may map data a
    /// repair would restore, so nothing it names may be treated as free.
    pub fn no_redundant_table(&self, index: usize) -> Result<()> {
        match &self.rgd {
            Some(rgd) if rgd[index] != 0 => Err(self.needs_repair(format!(
                "grain directory entry {index} is empty but its redundant copy names a table"
            ))),
            _ => Ok(()),
        }
    }

    /// Reads grain table `index` and verifies its redundant copy is identical.
    pub fn read_checked_table(&self, index: usize) -> Result<Vec<u32>> {
        let table = self.read_table(self.gd[index])?;
        if let Some(rgd) = &self.rgd {
            if rgd[index] == 0 || self.read_table(rgd[index])? != table {
                return Err(self.needs_repair(format!(
                    "grain table {index} differs from its redundant copy"
                )));
            }
        }
        Ok(table)
    }
}

/// Reads and parses the header of a hosted sparse file.
pub fn read_header(storage: &FileStorage) -> Result<SparseHeader> {
    let mut hb = [0u8; HEADER_SIZE];
    storage
        .read_exact_at(&mut hb, 0)
        .map_err(|e| Error::io("cannot read the sparse header", e))?;
    SparseHeader::parse(&hb)
}

/// Reads `count` little-endian u32 values at `sector`.
pub fn read_u32s(storage: &FileStorage, sector: u64, count: usize, what: &str) -> Result<Vec<u32>> {
    let mut buf = vec![0u8; count * 4];
    let at = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| Error::invalid(format!("{what} at sector {sector} overflows")))?;
    storage
        .read_exact_at(&mut buf, at)
        .map_err(|e| Error::io(format!("cannot read the {what} at sector {sector}"), e))?;
    Ok(buf
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Writes `values` as little-endian u32 at `sector`, zero padded to `sectors`.
pub fn write_u32s(
    storage: &FileStorage,
    sector: u64,
    values: &[u32],
    sectors: u64,
    what: &str,
) -> Result<()> {
    let mut buf = Vec::with_capacity((sectors * SECTOR_SIZE) as usize);
    for v in values {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    buf.resize(buf.len().max((sectors * SECTOR_SIZE) as usize), 0);
    storage
        .write_all_at(&buf, sector * SECTOR_SIZE)
        .map_err(|e| {
            Error::io(
                format!(
                    "{}: cannot write the {what} at sector {sector}",
                    storage.path().display()
                ),
                e,
            )
        })
}
