//! Hosted sparse extents (`KDMV`): monolithicSparse files and the `-sNNN` files of
//! twoGbMaxExtentSparse disks.
//!
//! The extent answers "where does this range live?" from its grain directory and
//! grain tables ([`SparseExtent::map`]), writes data into allocated grains in place,
//! and allocates new grains at the end of the file. Metadata is written back in
//! crash-consistent order on [`SparseExtent::flush`]: grain data, grain tables (and
//! their redundant copies), grain directories, header.

pub mod cowd;
mod embedded;
pub mod header;
pub mod offline;

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::cache::GtCache;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::new_grains::{leading_zero_grains, write_new_grains, NewGrains};
use crate::extent::{BelowFn, ExtentMapping};
use crate::limits::{GT_CACHE_BYTES, MAX_SPARSE_FILE_SECTORS, SECTOR_SIZE};
use crate::storage::{FileStorage, Storage};
use cowd::{has_cowd_magic, CowdHeader, COWD_HEADER_SIZE};

pub use embedded::{read_descriptor_area, write_descriptor_area};
use header::FLAG_ZEROED_GTE;
pub use header::{SparseHeader, GD_AT_END, HEADER_SIZE};

/// A grain table entry value with a meaning of its own.
const GTE_UNALLOCATED: u32 = 0;
/// Grain table entry "zeroed grain" (reads as zeros, hides the parent).
const GTE_ZEROED: u32 = 1;

/// What a grain table entry says about one grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GrainState {
    Unallocated,
    Zero,
    /// Data at this byte offset in the file.
    Data(u64),
}

#[derive(Debug)]
struct State {
    header: SparseHeader,
    /// The file's own header when it is a vmfsSparse (COWD) file; `header` then
    /// describes its geometry.
    cowd: Option<CowdHeader>,
    header_dirty: bool,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    gd_dirty: bool,
    cache: GtCache,
    /// Next free sector at the end of the file.
    next_free: u64,
    /// Bytes known to be in the file (grows as grains are written).
    file_len: u64,
    /// Data was written since the last sync.
    data_unsynced: bool,
    /// Grains being allocated by a writer right now (their data is in flight).
    inflight: HashSet<u64>,
    /// Sorted first sectors of every grain table (primary and redundant); no grain may
    /// overlap one. Built from the directories when a grain is first checked
    /// against them (an empty disk never needs it: 2 MiB and a sort for 8 TB).
    gt_starts: Option<Vec<u32>>,
    /// Bytes `[start, end)` of the file known to be a hole (what `SEEK_DATA` said
    /// last): a grain table inside it reads as all unallocated without being read.
    /// Emptied whenever a grain table is written.
    hole: (u64, u64),
}

/// A hosted sparse extent file.
#[derive(Debug)]
pub struct SparseExtent {
    storage: Box<dyn Storage>,
    name: String,
    writable: bool,
    /// Entry 1 means "zeroed grain" (hosted sparse); in COWD files it is a sector.
    zeroed_gte: bool,
    grain_bytes: u64,
    capacity_bytes: u64,
    gtes_per_gt: u64,
    gt_bytes: u64,
    /// Sector ranges no grain may overlap: header, descriptor, directories.
    protected: Vec<(u64, u64, &'static str)>,
    state: Mutex<State>,
    /// Signalled when in-flight grain allocations complete.
    allocated: Condvar,
}

/// Grains claimed by one writer: reserved file space, not yet in the grain table.
struct Claim {
    first: u64,
    n: u64,
    sector: u64,
    state: GrainState,
}

/// Releases a claim (also when the write failed) and wakes waiting writers.
struct ClaimGuard<'a> {
    ext: &'a SparseExtent,
    first: u64,
    n: u64,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        let mut st = match self.ext.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for g in self.first..self.first + self.n {
            st.inflight.remove(&g);
        }
        drop(st);
        self.ext.allocated.notify_all();
    }
}

fn le_u32s(bytes: &[u8], count: usize) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .take(count)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u32s_le(values: &[u32], pad_to: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(pad_to.max(values.len() * 4));
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.resize(pad_to.max(out.len()), 0);
    out
}

impl SparseExtent {
    /// Opens a sparse extent on an already opened (and locked) file. `name` is used in
    /// error messages.
    pub fn open(storage: FileStorage, writable: bool) -> Result<SparseExtent> {
        let name = storage.path().display().to_string();
        Self::open_storage(Box::new(storage), &name, writable)
    }

    /// Opens a sparse (or COWD) extent on any [`Storage`] (an in-memory file in tests
    /// and fuzzing); `name` is used in error messages.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        name: &str,
        writable: bool,
    ) -> Result<SparseExtent> {
        Self::open_inner(storage, writable, name).map_err(|e| e.within(name))
    }

    fn open_inner(storage: Box<dyn Storage>, writable: bool, name: &str) -> Result<SparseExtent> {
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

        let gt_bytes = u64::from(header.num_gtes_per_gt) * 4;
        let cache_tables = (GT_CACHE_BYTES as u64 / gt_bytes.max(1)) as usize;
        let grain = header.grain_size;
        let end_sectors = file_len.div_ceil(SECTOR_SIZE).max(header.overhead);
        let next_free = end_sectors.div_ceil(grain) * grain;
        Ok(SparseExtent {
            storage,
            name: name.to_string(),
            writable,
            zeroed_gte: cowd.is_none(),
            grain_bytes: header.grain_bytes(),
            capacity_bytes: header.capacity * SECTOR_SIZE,
            gtes_per_gt: u64::from(header.num_gtes_per_gt),
            gt_bytes,
            protected,
            state: Mutex::new(State {
                header,
                cowd,
                header_dirty: false,
                gd,
                rgd,
                gd_dirty: false,
                cache: GtCache::new(cache_tables),
                hole: (0, 0),
                next_free,
                file_len,
                data_unsynced: false,
                inflight: HashSet::new(),
                gt_starts: None,
            }),
            allocated: Condvar::new(),
        })
    }

    /// Marks the extent as open for writing (`uncleanShutdown = 1`, synced). Called
    /// once the whole link opened fine, so that a failed open never changes a file.
    pub fn begin_write(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock()?;
        st.header.unclean_shutdown = true;
        let bytes = header_bytes(&st);
        self.storage
            .write_all_at(&bytes, 0)
            .and_then(|()| self.storage.sync())
            .map_err(|e| Error::io("cannot mark the extent open for writing", e))
    }

    /// Waits (releasing the lock) until no writer is allocating grain `grain`.
    fn wait_for_grain<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        grain: u64,
    ) -> Result<MutexGuard<'a, State>> {
        while st.inflight.contains(&grain) {
            st = self
                .allocated
                .wait(st)
                .map_err(|_| Error::new(ErrorKind::Fail, "extent state poisoned"))?;
        }
        Ok(st)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| {
            Error::new(
                ErrorKind::Fail,
                format!("{}: extent state poisoned by a panic", self.name),
            )
        })
    }

    /// The extent's capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_bytes
    }

    /// A copy of the current header.
    pub fn header(&self) -> Result<SparseHeader> {
        Ok(self.lock()?.header.clone())
    }

    /// The raw bytes of the embedded descriptor area, if the extent has one.
    pub fn read_embedded_descriptor(&self) -> Result<Option<Vec<u8>>> {
        read_descriptor_area(&*self.storage, &self.header()?, &self.name)
    }

    /// Rewrites the embedded descriptor (see [`write_descriptor_area`]: one readable
    /// copy at every point); fails if the text does not fit.
    pub fn write_embedded_descriptor(&self, text: &[u8]) -> Result<()> {
        write_descriptor_area(&*self.storage, &self.header()?, text, &self.name)
    }

    /// Loads grain table `index` into the cache if it is allocated; returns whether it is.
    fn ensure_table(&self, st: &mut State, index: u64) -> Result<bool> {
        if st.cache.contains(index) {
            return Ok(true);
        }
        let gde = st.gd[index as usize];
        if gde == 0 {
            return Ok(false);
        }
        let mut buf = vec![0u8; self.gt_bytes as usize];
        self.storage
            .read_exact_at(&mut buf, u64::from(gde) * SECTOR_SIZE)
            .map_err(|e| Error::io(format!("{}: cannot read grain table {index}", self.name), e))?;
        let entries = le_u32s(&buf, self.gtes_per_gt as usize);
        self.make_room(st)?;
        st.cache.insert(index, entries, false);
        Ok(true)
    }

    /// Evicts a table if the cache is full, writing it back first if it is dirty.
    fn make_room(&self, st: &mut State) -> Result<()> {
        if let Some((index, table)) = st.cache.evict_if_full() {
            if table.dirty {
                if st.data_unsynced {
                    self.sync_data(st)?;
                }
                self.write_table(st, index, &table.entries)?;
            }
        }
        Ok(())
    }

    fn sync_data(&self, st: &mut State) -> Result<()> {
        self.storage
            .sync()
            .map_err(|e| Error::io(format!("{}: sync failed", self.name), e))?;
        st.data_unsynced = false;
        Ok(())
    }

    fn write_table(&self, st: &mut State, index: u64, entries: &[u32]) -> Result<()> {
        // The table may lie in the hole known so far: it no longer is one.
        st.hole = (0, 0);
        let bytes = u32s_le(entries, self.gt_bytes as usize);
        let mut targets = vec![st.gd[index as usize]];
        if let Some(rgd) = &st.rgd {
            targets.push(rgd[index as usize]);
        }
        for sector in targets.into_iter().filter(|&s| s != 0) {
            self.storage
                .write_all_at(&bytes, u64::from(sector) * SECTOR_SIZE)
                .map_err(|e| {
                    Error::io(
                        format!("{}: cannot write grain table {index}", self.name),
                        e,
                    )
                })?;
        }
        Ok(())
    }

    /// Whether grain table `index` is known to be all unallocated without reading
    /// it: no directory entry, or a table that lies wholly in a hole of the file
    /// (a freshly created disk's preallocated tables: an empty 8 TB disk has 512
    /// MiB of them). One `SEEK_DATA` answers for every table up to the next data.
    fn table_is_empty(&self, st: &mut State, index: u64) -> bool {
        let gde = st.gd[index as usize];
        if gde == 0 {
            return true;
        }
        if st.cache.contains(index) {
            return false;
        }
        let start = u64::from(gde) * SECTOR_SIZE;
        let end = start + self.gt_bytes;
        if st.hole.0 <= start && end <= st.hole.1 {
            return true;
        }
        match self.storage.next_data(start) {
            Ok(None) => {
                st.hole = (start, u64::MAX);
                true
            }
            Ok(Some(data)) if data >= end => {
                st.hole = (start, data);
                true
            }
            _ => false,
        }
    }

    /// Classifies the grain `grain` (index within the extent).
    fn grain_state(&self, st: &mut State, grain: u64) -> Result<GrainState> {
        let index = grain / self.gtes_per_gt;
        if self.table_is_empty(st, index) || !self.ensure_table(st, index)? {
            return Ok(GrainState::Unallocated);
        }
        let entry = match st.cache.get(index) {
            Some(t) => t.entries[(grain % self.gtes_per_gt) as usize],
            None => return Ok(GrainState::Unallocated),
        };
        match entry {
            GTE_UNALLOCATED => Ok(GrainState::Unallocated),
            GTE_ZEROED if self.zeroed_gte => Ok(GrainState::Zero),
            sector => {
                let sector = u64::from(sector);
                let start = grain * self.grain_bytes;
                let needed = self.grain_bytes.min(self.capacity_bytes - start);
                let offset = sector * SECTOR_SIZE;
                if offset + needed > st.file_len {
                    return Err(Error::invalid(format!(
                        "{}: grain table {index} entry {} points to sector {sector}, past the end of the file ({} bytes)",
                        self.name,
                        grain % self.gtes_per_gt,
                        st.file_len
                    )));
                }
                let sectors = needed.div_ceil(SECTOR_SIZE);
                let what = overlaps(&self.protected, sector, sector + sectors).or_else(|| {
                    overlaps_table(
                        table_starts(st),
                        self.gt_bytes.div_ceil(SECTOR_SIZE),
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

    /// Where the range starting at `offset` (bytes within the extent, below capacity)
    /// lives, and for how many bytes (at most `len`) that answer holds.
    pub fn map(&self, offset: u64, len: u64) -> Result<(ExtentMapping, u64)> {
        let mut st = self.lock()?;
        let g = self.grain_bytes;
        let end = offset + len.min(self.capacity_bytes - offset);
        let first_grain = offset / g;
        let first = self.grain_state(&mut st, first_grain)?;
        let end_grain = end.div_ceil(g);
        let mut grain = first_grain + 1;
        // Data is followed grain by grain (each entry is checked); a run of
        // unallocated or zeroed grains a table at a time: skipped whole where the
        // table is known empty, else scanned as a slice of its entries.
        let same_entry = match first {
            GrainState::Unallocated => Some(GTE_UNALLOCATED),
            GrainState::Zero => Some(GTE_ZEROED),
            GrainState::Data(_) => None,
        };
        while grain < end_grain {
            let Some(want) = same_entry else {
                let next = self.grain_state(&mut st, grain)?;
                match (first, next) {
                    (GrainState::Data(a), GrainState::Data(b))
                        if b == a + (grain - first_grain) * g =>
                    {
                        grain += 1;
                        continue;
                    }
                    _ => break,
                }
            };
            let index = grain / self.gtes_per_gt;
            let table_end = ((index + 1) * self.gtes_per_gt).min(end_grain);
            if self.table_is_empty(&mut st, index) || !self.ensure_table(&mut st, index)? {
                if want != GTE_UNALLOCATED {
                    break;
                }
                grain = table_end;
                continue;
            }
            let base = index * self.gtes_per_gt;
            let Some(table) = st.cache.get(index) else {
                break;
            };
            let from = (grain - base) as usize;
            let to = (table_end - base) as usize;
            match table.entries[from..to].iter().position(|&e| e != want) {
                Some(differs) => {
                    grain += differs as u64;
                    break;
                }
                None => grain = table_end,
            }
        }
        let covered = (grain * g).min(end) - offset;
        let mapping = match first {
            GrainState::Unallocated => ExtentMapping::Unallocated,
            GrainState::Zero => ExtentMapping::Zero,
            GrainState::Data(o) => ExtentMapping::Data {
                file_offset: o + (offset - first_grain * g),
            },
        };
        Ok((mapping, covered))
    }

    /// The host file descriptor of the extent's file, if it is one.
    pub(crate) fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.storage.fd()
    }

    /// Reads file bytes at `file_offset` (as given by [`SparseExtent::map`]).
    pub fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_exact_at(buf, file_offset)
            .map_err(|e| Error::io(format!("{}: read failed", self.name), e))
    }

    /// Writes `data` at `offset` (bytes within the extent). Grains not yet allocated
    /// are allocated at the end of the file; a partly written new grain is completed
    /// with what `below` reads (the chain under this link, or zeros).
    pub fn write(&self, offset: u64, data: &[u8], below: BelowFn<'_>) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{} is open read-only", self.name),
            ));
        }
        let g = self.grain_bytes;
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let rest = &data[pos..];
            let (mapping, run) = self.map(off, rest.len() as u64)?;
            let run = run as usize;
            match mapping {
                ExtentMapping::Data { file_offset } => {
                    self.storage
                        .write_all_at(&rest[..run], file_offset)
                        .map_err(|e| Error::io(format!("{}: write failed", self.name), e))?;
                    self.lock()?.data_unsynced = true;
                    pos += run;
                }
                ExtentMapping::Compressed { .. } => {
                    return Err(Error::new(
                        ErrorKind::Fail,
                        "a sparse extent has no compressed grains",
                    ))
                }
                ExtentMapping::Zero | ExtentMapping::Unallocated => {
                    let zeros = leading_zero_grains(off, &rest[..run], g);
                    let marked = match mapping {
                        _ if zeros == 0 => 0,
                        ExtentMapping::Zero => zeros,
                        _ => self.mark_zeroed(off / g, zeros)?,
                    };
                    if marked > 0 {
                        pos += (marked * g) as usize;
                        continue;
                    }
                    let Some(claim) = self.claim(off, run as u64)? else {
                        continue; // allocated by another writer meanwhile
                    };
                    let _guard = ClaimGuard {
                        ext: self,
                        first: claim.first,
                        n: claim.n,
                    };
                    let (used, end) = write_new_grains(
                        &*self.storage,
                        &self.name,
                        g,
                        self.capacity_bytes,
                        &NewGrains {
                            first: claim.first,
                            n: claim.n,
                            file_offset: claim.sector * SECTOR_SIZE,
                            from_below: claim.state == GrainState::Unallocated,
                        },
                        off,
                        rest,
                        below,
                    )?;
                    self.commit_grains(claim.first, claim.n, claim.sector, end)?;
                    pos += used;
                }
            }
        }
        Ok(())
    }

    /// Marks up to `n` grains from `first` zeroed (entry 1: zeros that hide the
    /// parent) where they have no data, writing no grain: zeros over a parent's data
    /// cost a table entry. Returns how many were marked from `first`: 0 if the file
    /// cannot hold zeroed entries (COWD, version 3) or the first grain has data by
    /// now. A version 1 file becomes version 2 with the zeroed-grain flag, as qemu's
    /// `zeroed_grain=on` makes them (VMware and qemu read them; VirtualBox and
    /// libvmdk do not); the header says so on disk before any zeroed entry can.
    fn mark_zeroed(&self, first: u64, n: u64) -> Result<u64> {
        if !self.zeroed_gte {
            return Ok(0);
        }
        let mut st = self.lock()?;
        if !st.header.zeroed_gte_enabled() {
            if st.header.version != 1 {
                return Ok(0);
            }
            st.header.version = 2;
            st.header.flags |= FLAG_ZEROED_GTE;
            if let Err(e) = self.write_header(&mut st) {
                st.header.version = 1;
                st.header.flags &= !FLAG_ZEROED_GTE;
                return Err(e);
            }
            tracing::info!(
                "{}: now a version 2 (zeroed-grain) sparse extent: zeros over the parent's data are marked, not stored",
                self.name
            );
        }
        st = self.wait_for_grain(st, first)?;
        let mut done = 0;
        while done < n {
            let grain = first + done;
            if (done > 0 && st.inflight.contains(&grain))
                || matches!(self.grain_state(&mut st, grain)?, GrainState::Data(_))
            {
                break;
            }
            let index = grain / self.gtes_per_gt;
            if !self.ensure_table(&mut st, index)? {
                self.allocate_table(&mut st, index)?;
            }
            let Some(t) = st.cache.get(index) else {
                return Err(Error::new(
                    ErrorKind::Fail,
                    "grain table vanished from the cache",
                ));
            };
            t.entries[(grain % self.gtes_per_gt) as usize] = GTE_ZEROED;
            t.dirty = true;
            done += 1;
        }
        Ok(done)
    }

    /// Claims the unallocated (or zeroed) grains at the start of `[off, off+len)` for
    /// this writer and reserves file space for them. Waits while another writer is
    /// allocating the first grain; returns `None` if that grain has data by now.
    /// No lock is held once this returns: data is written outside any lock.
    fn claim(&self, off: u64, len: u64) -> Result<Option<Claim>> {
        let g = self.grain_bytes;
        let first = off / g;
        let mut st = self.lock()?;
        st = self.wait_for_grain(st, first)?;
        let state = self.grain_state(&mut st, first)?;
        if let GrainState::Data(_) = state {
            return Ok(None);
        }
        let mut n = 1;
        if off.is_multiple_of(g) {
            let max_n = len / g;
            while n < max_n
                && !st.inflight.contains(&(first + n))
                && self.grain_state(&mut st, first + n)? == state
            {
                n += 1;
            }
        }
        let sectors = n * (g / SECTOR_SIZE);
        let sector = st.next_free;
        if sector + sectors > MAX_SPARSE_FILE_SECTORS {
            return Err(Error::new(
                ErrorKind::FileTooBig,
                format!(
                    "{}: a sparse extent file cannot grow beyond 2 TiB",
                    self.name
                ),
            ));
        }
        st.next_free += sectors;
        for i in 0..n {
            st.inflight.insert(first + i);
        }
        Ok(Some(Claim {
            first,
            n,
            sector,
            state,
        }))
    }

    /// Points grain table entries of `n` grains from `first` at consecutive grains
    /// starting at `sector`, allocating grain tables where the directory has none.
    fn commit_grains(&self, first: u64, n: u64, sector: u64, file_end: u64) -> Result<()> {
        let mut st = self.lock()?;
        st.data_unsynced = true;
        st.file_len = st.file_len.max(file_end);
        let gs = self.grain_bytes / SECTOR_SIZE;
        for i in 0..n {
            let grain = first + i;
            let index = grain / self.gtes_per_gt;
            if !self.ensure_table(&mut st, index)? {
                self.allocate_table(&mut st, index)?;
            }
            let value = u32::try_from(sector + i * gs).map_err(|_| {
                Error::new(
                    ErrorKind::FileTooBig,
                    format!("{}: sector beyond 2 TiB", self.name),
                )
            })?;
            match st.cache.get(index) {
                Some(t) => {
                    t.entries[(grain % self.gtes_per_gt) as usize] = value;
                    t.dirty = true;
                }
                None => {
                    return Err(Error::new(
                        ErrorKind::Fail,
                        "grain table vanished from the cache",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Allocates a zeroed grain table (and its redundant copy) for directory entry `index`.
    fn allocate_table(&self, st: &mut State, index: u64) -> Result<()> {
        let gt_sectors = self.gt_bytes.div_ceil(SECTOR_SIZE);
        let place = |st: &mut State| -> Result<u32> {
            let s = st.next_free;
            st.next_free += gt_sectors;
            if st.next_free > MAX_SPARSE_FILE_SECTORS {
                return Err(Error::new(
                    ErrorKind::FileTooBig,
                    format!("{}: file beyond 2 TiB", self.name),
                ));
            }
            st.file_len = st.file_len.max(st.next_free * SECTOR_SIZE);
            Ok(s as u32)
        };
        let gt = place(st)?;
        if let Some(starts) = st.gt_starts.as_mut() {
            insert_sorted(starts, gt);
        }
        st.gd[index as usize] = gt;
        if st.rgd.is_some() {
            let rgt = place(st)?;
            if let Some(starts) = st.gt_starts.as_mut() {
                insert_sorted(starts, rgt);
            }
            if let Some(rgd) = st.rgd.as_mut() {
                rgd[index as usize] = rgt;
            }
        }
        st.gd_dirty = true;
        self.make_room(st)?;
        st.cache
            .insert(index, vec![0; self.gtes_per_gt as usize], true);
        Ok(())
    }

    /// Writes back dirty metadata in crash-consistent order and syncs.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock()?;
        let dirty = st.cache.dirty_indexes();
        if st.data_unsynced || !dirty.is_empty() {
            self.sync_data(&mut st)?;
        }
        if !dirty.is_empty() {
            for index in dirty {
                let entries = match st.cache.get(index) {
                    Some(t) => {
                        t.dirty = false;
                        t.entries.clone()
                    }
                    None => continue,
                };
                self.write_table(&mut st, index, &entries)?;
            }
            self.sync_data(&mut st)?;
        }
        if st.gd_dirty {
            let pad = (st.header.gd_sectors() * SECTOR_SIZE) as usize;
            let bytes = u32s_le(&st.gd, pad);
            let gd_off = st.header.gd_offset;
            self.storage
                .write_all_at(&bytes, gd_off * SECTOR_SIZE)
                .map_err(|e| {
                    Error::io(
                        format!("{}: cannot write the grain directory", self.name),
                        e,
                    )
                })?;
            if let Some(rgd) = &st.rgd {
                let bytes = u32s_le(rgd, pad);
                self.storage
                    .write_all_at(&bytes, st.header.rgd_offset * SECTOR_SIZE)
                    .map_err(|e| {
                        Error::io(
                            format!("{}: cannot write the redundant grain directory", self.name),
                            e,
                        )
                    })?;
            }
            st.gd_dirty = false;
            self.sync_data(&mut st)?;
        }
        if st.header_dirty {
            self.write_header(&mut st)?;
        }
        Ok(())
    }

    fn write_header(&self, st: &mut State) -> Result<()> {
        let bytes = header_bytes(st);
        self.storage
            .write_all_at(&bytes, 0)
            .map_err(|e| Error::io(format!("{}: cannot write the header", self.name), e))?;
        self.sync_data(st)?;
        st.header_dirty = false;
        Ok(())
    }

    /// Flushes and clears the unclean-shutdown mark (a clean close).
    pub fn close(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush()?;
        let mut st = self.lock()?;
        st.header.unclean_shutdown = false;
        self.write_header(&mut st)
    }

    /// Size of the extent file in bytes.
    pub fn file_len(&self) -> Result<u64> {
        Ok(self.lock()?.file_len)
    }
}

/// The bytes of the file's header as the state describes it (COWD files keep their
/// own header, with the unclean flag and next free sector updated).
fn header_bytes(st: &State) -> Vec<u8> {
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
    Ok(le_u32s(&buf, entries))
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
fn table_starts(st: &mut State) -> &[u32] {
    let State {
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
