//! Hosted sparse extents (`KDMV`): monolithicSparse files and the `-sNNN` files of
//! twoGbMaxExtentSparse disks; and ESXi vmfsSparse deltas (`COWD`), which share the
//! directory -> table -> grain structure.
//!
//! This module is the format half of the [grain-table engine](crate::extent::grains):
//! it opens and checks the headers and directories, says what an entry means (0
//! unallocated, 1 zeroed grain where the file allows it, otherwise a sector), places
//! new grains and tables at the end of the file, and writes its directories and
//! header after the tables in crash-consistent order: grain data, grain tables (and
//! their redundant copies), grain directories, header.

pub mod cowd;
mod embedded;
pub mod header;
pub mod offline;

use crate::error::{Error, ErrorKind, Result};
use crate::extent::grains::{
    parse_entries, Geometry, GrainEngine, GrainFormat, GrainState, MetaWriter,
};
use crate::limits::{MAX_SPARSE_FILE_SECTORS, SECTOR_SIZE};
use crate::storage::Storage;
use cowd::{has_cowd_magic, CowdHeader, COWD_HEADER_SIZE};

pub use embedded::{read_descriptor_area, write_descriptor_area};
use header::FLAG_ZEROED_GTE;
pub use header::{SparseHeader, GD_AT_END, HEADER_SIZE};

/// A grain table entry value with a meaning of its own.
const GTE_UNALLOCATED: u32 = 0;
/// Grain table entry "zeroed grain" (reads as zeros, hides the parent).
const GTE_ZEROED: u32 = 1;

/// A hosted sparse (or COWD) extent file.
pub type SparseExtent = GrainEngine<SparseFormat>;

/// What does not change while a hosted sparse or COWD file is open.
#[derive(Debug)]
pub struct SparseFormat {
    name: String,
    /// Entry 1 means "zeroed grain" (hosted sparse); in COWD files it is a sector.
    zeroed_gte: bool,
    grain_bytes: u64,
    capacity_bytes: u64,
    gtes_per_gt: u64,
    /// Sectors per grain table.
    gt_sectors: u64,
    /// Sector ranges no grain may overlap: header, descriptor, directories.
    protected: Vec<(u64, u64, &'static str)>,
}

/// A hosted sparse file's metadata under the engine's lock.
#[derive(Debug)]
pub struct SparseMeta {
    header: SparseHeader,
    /// The file's own header when it is a vmfsSparse (COWD) file; `header` then
    /// describes its geometry.
    cowd: Option<CowdHeader>,
    header_dirty: bool,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    gd_dirty: bool,
    /// Next free sector at the end of the file.
    next_free: u64,
    /// Sorted first sectors of every grain table (primary and redundant); no grain may
    /// overlap one. Built from the directories when a grain is first checked
    /// against them (an empty disk never needs it: 2 MiB and a sort for 8 TB).
    gt_starts: Option<Vec<u32>>,
    /// Bytes `[start, end)` of the file known to be a hole (what `SEEK_DATA` said
    /// last): a grain table inside it reads as all unallocated without being read.
    /// Emptied whenever a grain table is written.
    hole: (u64, u64),
}

impl GrainFormat for SparseFormat {
    type Entry = u32;
    type Meta = SparseMeta;

    fn table_offset(&self, meta: &SparseMeta, index: u64) -> Option<u64> {
        match meta.gd[index as usize] {
            0 => None,
            gde => Some(u64::from(gde) * SECTOR_SIZE),
        }
    }

    /// A table that lies wholly in a hole of the file (a freshly created disk's
    /// preallocated tables: an empty 8 TB disk has 512 MiB of them). One
    /// `SEEK_DATA` answers for every table up to the next data.
    fn table_known_empty(
        &self,
        meta: &mut SparseMeta,
        storage: &dyn Storage,
        start: u64,
        len: u64,
    ) -> bool {
        let end = start + len;
        if meta.hole.0 <= start && end <= meta.hole.1 {
            return true;
        }
        match storage.next_data(start) {
            Ok(None) => {
                meta.hole = (start, u64::MAX);
                true
            }
            Ok(Some(data)) if data >= end => {
                meta.hole = (start, data);
                true
            }
            _ => false,
        }
    }

    fn write_table(
        &self,
        meta: &mut SparseMeta,
        out: &mut MetaWriter<'_>,
        index: u64,
        bytes: &[u8],
    ) -> Result<()> {
        // The table may lie in the hole known so far: it no longer is one.
        meta.hole = (0, 0);
        let mut targets = vec![meta.gd[index as usize]];
        if let Some(rgd) = &meta.rgd {
            targets.push(rgd[index as usize]);
        }
        for sector in targets.into_iter().filter(|&s| s != 0) {
            out.write(
                bytes,
                u64::from(sector) * SECTOR_SIZE,
                &format!("grain table {index}"),
            )?;
        }
        Ok(())
    }

    fn allocate_table(&self, meta: &mut SparseMeta, index: u64) -> Result<u64> {
        let gt = self.place(meta, self.gt_sectors)?;
        if let Some(starts) = meta.gt_starts.as_mut() {
            insert_sorted(starts, gt);
        }
        meta.gd[index as usize] = gt;
        if meta.rgd.is_some() {
            let rgt = self.place(meta, self.gt_sectors)?;
            if let Some(starts) = meta.gt_starts.as_mut() {
                insert_sorted(starts, rgt);
            }
            if let Some(rgd) = meta.rgd.as_mut() {
                rgd[index as usize] = rgt;
            }
        }
        meta.gd_dirty = true;
        Ok(meta.next_free * SECTOR_SIZE)
    }

    fn decode(
        &self,
        meta: &mut SparseMeta,
        grain: u64,
        entry: u32,
        file_len: u64,
    ) -> Result<GrainState> {
        let index = grain / self.gtes_per_gt;
        match entry {
            GTE_UNALLOCATED => Ok(GrainState::Unallocated),
            GTE_ZEROED if self.zeroed_gte => Ok(GrainState::Zero),
            sector => {
                let sector = u64::from(sector);
                let start = grain * self.grain_bytes;
                let needed = self.grain_bytes.min(self.capacity_bytes - start);
                let offset = sector * SECTOR_SIZE;
                if offset + needed > file_len {
                    return Err(Error::invalid(format!(
                        "{}: grain table {index} entry {} points to sector {sector}, past the end of the file ({file_len} bytes)",
                        self.name,
                        grain % self.gtes_per_gt,
                    )));
                }
                let sectors = needed.div_ceil(SECTOR_SIZE);
                let what = overlaps(&self.protected, sector, sector + sectors).or_else(|| {
                    overlaps_table(
                        table_starts(meta),
                        self.gt_sectors,
                        sector,
                        sector + sectors,
                    )
                    .then_some("a grain table")
                });
                if let Some(what) = what {
                    return Err(Error::invalid(format!(
                        "{}: grain table {index} entry {} points to sector {sector}, into {what}",
                        self.name,
                        grain % self.gtes_per_gt
                    )));
                }
                Ok(GrainState::Data(offset))
            }
        }
    }

    fn is_zero_entry(&self, entry: u32) -> bool {
        entry == GTE_ZEROED && self.zeroed_gte
    }

    /// Entry 1. A version 1 file becomes version 2 with the zeroed-grain flag, as
    /// qemu's `zeroed_grain=on` makes them (VMware and qemu read them; VirtualBox
    /// and libvmdk do not); the header says so on disk before any zeroed entry can.
    /// COWD and version 3 files have no zeroed entry.
    fn zero_entry(&self, meta: &mut SparseMeta, out: &mut MetaWriter<'_>) -> Result<Option<u32>> {
        if !self.zeroed_gte {
            return Ok(None);
        }
        if !meta.header.zeroed_gte_enabled() {
            if meta.header.version != 1 {
                return Ok(None);
            }
            meta.header.version = 2;
            meta.header.flags |= FLAG_ZEROED_GTE;
            if let Err(e) = write_header(meta, out) {
                meta.header.version = 1;
                meta.header.flags &= !FLAG_ZEROED_GTE;
                return Err(e);
            }
            tracing::info!(
                "{}: now a version 2 (zeroed-grain) sparse extent: zeros over the parent's data are marked, not stored",
                self.name
            );
        }
        Ok(Some(GTE_ZEROED))
    }

    fn reserve_grains(&self, meta: &mut SparseMeta, n: u64) -> Result<u64> {
        let sector = self.place(meta, n * (self.grain_bytes / SECTOR_SIZE))?;
        Ok(u64::from(sector) * SECTOR_SIZE)
    }

    fn data_entry(&self, file_offset: u64) -> Result<u32> {
        u32::try_from(file_offset / SECTOR_SIZE).map_err(|_| {
            Error::new(
                ErrorKind::FileTooBig,
                format!("{}: sector beyond 2 TiB", self.name),
            )
        })
    }

    fn open(storage: Box<dyn Storage>, name: &str, writable: bool) -> Result<GrainEngine<Self>> {
        open_sparse(storage, writable, name)
    }

    fn flush_metadata(&self, meta: &mut SparseMeta, out: &mut MetaWriter<'_>) -> Result<()> {
        if meta.gd_dirty {
            let pad = (meta.header.gd_sectors() * SECTOR_SIZE) as usize;
            let gd = crate::extent::grains::entries_bytes(&meta.gd, pad);
            out.write(
                &gd,
                meta.header.gd_offset * SECTOR_SIZE,
                "the grain directory",
            )?;
            if let Some(rgd) = &meta.rgd {
                let bytes = crate::extent::grains::entries_bytes(rgd, pad);
                out.write(
                    &bytes,
                    meta.header.rgd_offset * SECTOR_SIZE,
                    "the redundant grain directory",
                )?;
            }
            meta.gd_dirty = false;
            out.barrier()?;
        }
        if meta.header_dirty {
            write_header(meta, out)?;
        }
        Ok(())
    }
}

impl SparseFormat {
    /// Reserves `sectors` at the end of the file; returns the first.
    fn place(&self, meta: &mut SparseMeta, sectors: u64) -> Result<u32> {
        let s = meta.next_free;
        let end = s + sectors;
        if end > MAX_SPARSE_FILE_SECTORS {
            return Err(Error::new(
                ErrorKind::FileTooBig,
                format!(
                    "{}: a sparse extent file cannot grow beyond 2 TiB",
                    self.name
                ),
            ));
        }
        meta.next_free = end;
        u32::try_from(s).map_err(|_| {
            Error::new(
                ErrorKind::FileTooBig,
                format!("{}: sector beyond 2 TiB", self.name),
            )
        })
    }
}

/// Writes the header as the metadata describes it, and syncs.
fn write_header(meta: &mut SparseMeta, out: &mut MetaWriter<'_>) -> Result<()> {
    out.write(&header_bytes(meta), 0, "the header")?;
    out.barrier()?;
    meta.header_dirty = false;
    Ok(())
}

impl GrainEngine<SparseFormat> {
    /// A copy of the current header.
    pub fn header(&self) -> Result<SparseHeader> {
        self.with_meta(|meta, _| Ok(meta.header.clone()))
    }

    /// The raw bytes of the embedded descriptor area, if the extent has one.
    pub fn read_embedded_descriptor(&self) -> Result<Option<Vec<u8>>> {
        read_descriptor_area(self.storage(), &self.header()?, self.name())
    }

    /// Rewrites the embedded descriptor (see [`write_descriptor_area`]: one readable
    /// copy at every point); fails if the text does not fit.
    pub fn write_embedded_descriptor(&self, text: &[u8]) -> Result<()> {
        write_descriptor_area(self.storage(), &self.header()?, text, self.name())
    }

    /// Marks the extent as open for writing (`uncleanShutdown = 1`, synced). Called
    /// once the whole link opened fine, so that a failed open never changes a file.
    pub fn begin_write(&self) -> Result<()> {
        if !self.writable() {
            return Ok(());
        }
        self.with_meta(|meta, out| {
            meta.header.unclean_shutdown = true;
            write_header(meta, out)
        })
    }

    /// Flushes and clears the unclean-shutdown mark (a clean close).
    pub fn close(&self) -> Result<()> {
        if !self.writable() {
            return Ok(());
        }
        self.flush()?;
        self.with_meta(|meta, out| {
            meta.header.unclean_shutdown = false;
            write_header(meta, out)
        })
    }
}

/// Opens and checks a hosted sparse or COWD file: headers, the places of the
/// directories and every directory entry (a reader needs only the primary
/// directory; a writer both).
fn open_sparse(storage: Box<dyn Storage>, writable: bool, name: &str) -> Result<SparseExtent> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io("cannot read file size", e))?;
    if file_len < HEADER_SIZE as u64 {
        return Err(Error::invalid(format!(
            "file is {file_len} bytes, too short for a sparse extent header"
        )));
    }
    let mut hb = [0u8; HEADER_SIZE];
    storage
        .read_exact_at(&mut hb, 0)
        .map_err(|e| Error::io("cannot read the sparse header", e))?;
    let (header, cowd, header_sectors) = if has_cowd_magic(&hb) {
        if file_len < COWD_HEADER_SIZE as u64 {
            return Err(Error::invalid(format!(
                "file is {file_len} bytes, too short for a COWD header"
            )));
        }
        let mut cb = vec![0u8; COWD_HEADER_SIZE];
        storage
            .read_exact_at(&mut cb, 0)
            .map_err(|e| Error::io("cannot read the COWD header", e))?;
        let c = CowdHeader::parse(&cb)?;
        (
            c.geometry(),
            Some(c),
            (COWD_HEADER_SIZE as u64) / SECTOR_SIZE,
        )
    } else {
        (SparseHeader::parse(&hb)?, None, 1)
    };
    if header.is_compressed() || header.gd_offset == GD_AT_END {
        return Err(Error::new(
            ErrorKind::DiskNotSupported,
            "streamOptimized (compressed) sparse extents are not supported yet",
        ));
    }
    let file_sectors = file_len / SECTOR_SIZE;
    let gd_sectors = header.gd_sectors();
    let num_gdes = header.num_gdes() as usize;
    let mut protected: Vec<(u64, u64, &'static str)> = vec![(0, header_sectors, "the header")];
    if header.descriptor_offset != 0 {
        let end = region_end(header.descriptor_offset, header.descriptor_size)?;
        if end > file_sectors {
            return Err(Error::invalid(format!(
                "embedded descriptor (sectors {}..{end}) lies past the end of the file ({file_sectors} sectors)",
                header.descriptor_offset
            )));
        }
        protected.push((header.descriptor_offset, end, "the embedded descriptor"));
    }
    let gd_end = check_directory_region(
        header.gd_offset,
        gd_sectors,
        file_sectors,
        "grain directory",
    )?;
    if let Some(what) = overlaps(&protected, header.gd_offset, gd_end) {
        return Err(Error::invalid(format!(
            "grain directory at sector {} overlaps {what}",
            header.gd_offset
        )));
    }
    protected.push((header.gd_offset, gd_end, "the grain directory"));
    let gt_sectors = header.gt_sectors();

    // The redundant directory's own region is placed first, so that no grain
    // table may lie in it. A reader only needs the primary directory; a writer
    // must keep both, so a bad redundant copy stops a writer only.
    let mut rgd_problem: Option<Error> = None;
    let mut rgd_end = None;
    if header.has_redundant_gd() {
        match check_directory_region(
            header.rgd_offset,
            gd_sectors,
            file_sectors,
            "redundant grain directory",
        ) {
            Ok(end) => match overlaps(&protected, header.rgd_offset, end) {
                Some(what) => {
                    rgd_problem = Some(Error::invalid(format!(
                        "redundant grain directory at sector {} overlaps {what}",
                        header.rgd_offset
                    )))
                }
                None => {
                    protected.push((header.rgd_offset, end, "the redundant grain directory"));
                    rgd_end = Some(end);
                }
            },
            Err(e) => rgd_problem = Some(e),
        }
    }
    let gd = read_directory(&*storage, header.gd_offset, num_gdes, "grain directory")?;
    validate_directory(&gd, gt_sectors, file_sectors, &protected, "grain directory")?;
    check_tables_disjoint(&[&gd], gt_sectors, "grain directory")?;

    let mut rgd = None;
    if rgd_end.is_some() {
        let loaded = (|| {
            let table = read_directory(
                &*storage,
                header.rgd_offset,
                num_gdes,
                "redundant grain directory",
            )?;
            validate_directory(
                &table,
                gt_sectors,
                file_sectors,
                &protected,
                "redundant grain directory",
            )?;
            check_tables_disjoint(&[&table, &gd], gt_sectors, "redundant grain directory")?;
            Ok::<_, Error>(table)
        })();
        match loaded {
            Ok(table) => rgd = Some(table),
            Err(e) => rgd_problem = Some(e),
        }
    }
    if let Some(e) = rgd_problem {
        if writable {
            return Err(Error::new(
                ErrorKind::NeedsRepair,
                format!("{e}; the disk needs a repair before it can be written"),
            ));
        }
        tracing::warn!("{name}: ignoring the redundant grain directory: {e}");
    }
    if header.unclean_shutdown {
        tracing::warn!("{name}: the extent was not closed cleanly by its last writer");
    }

    let grain = header.grain_size;
    let end_sectors = file_len.div_ceil(SECTOR_SIZE).max(header.overhead);
    let next_free = end_sectors.div_ceil(grain) * grain;
    let format = SparseFormat {
        name: name.to_string(),
        zeroed_gte: cowd.is_none(),
        grain_bytes: header.grain_bytes(),
        capacity_bytes: header.capacity * SECTOR_SIZE,
        gtes_per_gt: u64::from(header.num_gtes_per_gt),
        gt_sectors,
        protected,
    };
    let geo = Geometry {
        grain_bytes: format.grain_bytes,
        capacity_bytes: format.capacity_bytes,
        entries_per_table: format.gtes_per_gt,
    };
    let meta = SparseMeta {
        header,
        cowd,
        header_dirty: false,
        gd,
        rgd,
        gd_dirty: false,
        next_free,
        gt_starts: None,
        hole: (0, 0),
    };
    Ok(GrainEngine::new(
        storage, name, writable, format, meta, geo, file_len,
    ))
}

/// The bytes of the file's header as the state describes it (COWD files keep their
/// own header, with the unclean flag and next free sector updated).
fn header_bytes(st: &SparseMeta) -> Vec<u8> {
    match &st.cowd {
        Some(c) => {
            let mut c = c.clone();
            c.unclean_shutdown = st.header.unclean_shutdown;
            c.free_sector = u32::try_from(st.next_free).unwrap_or(u32::MAX);
            c.to_bytes()
        }
        None => st.header.to_bytes().to_vec(),
    }
}

fn region_end(start: u64, sectors: u64) -> Result<u64> {
    start
        .checked_add(sectors)
        .ok_or_else(|| Error::invalid(format!("region at sector {start} overflows")))
}

fn check_directory_region(start: u64, sectors: u64, file_sectors: u64, what: &str) -> Result<u64> {
    if start == 0 {
        return Err(Error::invalid(format!(
            "{what} offset is 0 (it would overlap the header)"
        )));
    }
    let end = region_end(start, sectors)?;
    if end > file_sectors {
        return Err(Error::invalid(format!(
            "{what} (sectors {start}..{end}) lies past the end of the file ({file_sectors} sectors)"
        )));
    }
    Ok(end)
}

fn read_directory(
    storage: &dyn Storage,
    start: u64,
    entries: usize,
    what: &str,
) -> Result<Vec<u32>> {
    let mut buf = vec![0u8; entries * 4];
    storage
        .read_exact_at(&mut buf, start * SECTOR_SIZE)
        .map_err(|e| Error::io(format!("cannot read the {what}"), e))?;
    Ok(parse_entries(&buf, entries))
}

fn validate_directory(
    dir: &[u32],
    gt_sectors: u64,
    file_sectors: u64,
    protected: &[(u64, u64, &'static str)],
    what: &str,
) -> Result<()> {
    for (i, &e) in dir.iter().enumerate() {
        if e == 0 {
            continue;
        }
        let start = u64::from(e);
        let end = start + gt_sectors;
        if end > file_sectors {
            return Err(Error::invalid(format!(
                "{what} entry {i} points to sector {start}, past the end of the file ({file_sectors} sectors)"
            )));
        }
        if let Some(into) = overlaps(protected, start, end) {
            return Err(Error::invalid(format!(
                "{what} entry {i} points to sector {start}, into {into}"
            )));
        }
    }
    Ok(())
}

/// The first sectors of every grain table the directories name, sorted (built on
/// first use, kept up to date as tables are allocated).
fn table_starts(st: &mut SparseMeta) -> &[u32] {
    let SparseMeta {
        gt_starts, gd, rgd, ..
    } = st;
    gt_starts.get_or_insert_with(|| {
        let mut v: Vec<u32> = gd
            .iter()
            .chain(rgd.iter().flatten())
            .copied()
            .filter(|&e| e != 0)
            .collect();
        v.sort_unstable();
        v
    })
}

/// Fails if two of the grain tables the directories `dirs` name overlap (or are
/// shared). Directories whose tables ascend, as every producer lays them out,
/// are checked in one pass each without sorting or copying them.
fn check_tables_disjoint(dirs: &[&[u32]], gt_sectors: u64, what: &str) -> Result<()> {
    let spans: Option<Vec<(u64, u64)>> =
        dirs.iter().map(|d| ascending_span(d, gt_sectors)).collect();
    if let Some(mut spans) = spans {
        spans.retain(|&(s, e)| s < e);
        spans.sort_unstable();
        if spans.windows(2).all(|w| w[0].1 <= w[1].0) {
            return Ok(());
        }
    }
    let mut all: Vec<u32> = dirs
        .iter()
        .flat_map(|d| d.iter().copied())
        .filter(|&e| e != 0)
        .collect();
    check_disjoint_tables(&mut all, gt_sectors, what)
}

/// If the tables `dir` names (zeros skipped) ascend without overlapping: the
/// sectors they span together, `[first, last end)` (empty if none).
fn ascending_span(dir: &[u32], gt_sectors: u64) -> Option<(u64, u64)> {
    let mut span: Option<(u64, u64)> = None;
    for &e in dir.iter().filter(|&&e| e != 0) {
        let start = u64::from(e);
        span = match span {
            None => Some((start, start + gt_sectors)),
            Some((first, end)) if start >= end => Some((first, start + gt_sectors)),
            Some(_) => return None,
        };
    }
    Some(span.unwrap_or((0, 0)))
}

/// Sorts table start sectors and fails if two tables overlap (or are shared).
fn check_disjoint_tables(starts: &mut [u32], gt_sectors: u64, what: &str) -> Result<()> {
    starts.sort_unstable();
    for w in starts.windows(2) {
        if u64::from(w[1]) < u64::from(w[0]) + gt_sectors {
            return Err(Error::invalid(format!(
                "{what}: grain tables at sectors {} and {} overlap (two entries share a table)",
                w[0], w[1]
            )));
        }
    }
    Ok(())
}

/// Whether `[start, end)` overlaps one of the (sorted, disjoint) grain tables.
fn overlaps_table(starts: &[u32], gt_sectors: u64, start: u64, end: u64) -> bool {
    let idx = starts.partition_point(|&s| u64::from(s) < end);
    idx > 0 && u64::from(starts[idx - 1]) + gt_sectors > start
}

fn insert_sorted(v: &mut Vec<u32>, x: u32) {
    let idx = v.partition_point(|&s| s < x);
    v.insert(idx, x);
}

fn overlaps(ranges: &[(u64, u64, &'static str)], start: u64, end: u64) -> Option<&'static str> {
    ranges
        .iter()
        .find(|(s, e, _)| start < *e && *s < end)
        .map(|(_, _, what)| *what)
}
