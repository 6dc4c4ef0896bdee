//! Checking and repairing files with a grain directory -> grain table -> grain
//! structure: hosted sparse extents (`KDMV`, with an optional redundant copy of the
//! directory and every table) and ESXi vmfsSparse deltas (`COWD`: no redundant copy,
//! no zeroed-grain entries).
//!
//! # What is checked
//! * the directories' places (inside the file, clear of the header and descriptor,
//!   and of each other), each directory entry (a table inside the file and clear of
//!   that metadata), tables used twice or overlapping;
//! * every entry of every table: unallocated, a permitted zeroed grain, or a grain
//!   starting inside the file and clear of all metadata; a grain cut short by the end
//!   of the file; the two copies of each table entry by entry; grains that two
//!   entries share;
//! * the unclean-shutdown flag, and in COWD files the next-free-sector field.
//!
//! # How repair decides
//! Per entry it keeps the copy that is sound (preferring the one that maps data when
//! both are sound, as a crash between the two table writes leaves the primary ahead,
//! and distrusting a data entry that lands on a grain other entries agree on: that is
//! the damaged one of a pair). An entry sound in neither copy is cleared (its data is
//! lost and reported so). A table with no sound place is rebuilt from its other copy
//! at the end of the file; a grain two entries share is copied for the later one;
//! a file cut inside a grain is extended. Nothing an entry names is ever freed.
//!
//! # Bounded memory, crash order
//! Both directories are held (at most [`MAX_GD_ENTRIES`] entries each); tables are
//! read one at a time. The per-grain state (which grains entries agree on, which are
//! used) is a bitmap over the file's grain slots, at most
//! [`crate::limits::CHECK_BITMAP_BITS`] bits; a larger file is swept in windows of slots, one pass
//! over the tables per window. Repairs are written as they are decided, in crash
//! order: copied grains (at the end of the file, referenced by nothing yet) are
//! synced before the batch of tables that points at them is written; directories
//! follow once every table is synced; the header comes last. Every intermediate state
//! is one a second repair handles.

use std::path::Path;

use super::report::{CheckReport, Finding};
use super::CheckOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::cowd::CowdHeader;
use crate::extent::sparse::header::SparseHeader;
use crate::extent::sparse::offline::{read_u32s, write_u32s, GTE_UNALLOCATED, GTE_ZEROED};
use crate::limits::{MAX_GD_ENTRIES, MAX_SPARSE_FILE_SECTORS, REPAIR_BATCH_BYTES, SECTOR_SIZE};
use crate::storage::{FileStorage, Storage};

/// The header of a grain-table file, as read.
#[derive(Clone, Debug)]
pub(super) enum GrainHeader {
    /// A hosted sparse (`KDMV`) extent.
    Hosted(SparseHeader),
    /// A vmfsSparse (`COWD`) delta.
    Cowd(CowdHeader),
}

/// A bitmap of `len` bits.
pub(super) struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    pub(super) fn new(len: u64) -> Bits {
        Bits {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    pub(super) fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    pub(super) fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }
}

/// Sorted, disjoint metadata of a file: fixed regions and grain tables of one size.
struct Metadata {
    /// Header, descriptor, directories: `[start, end)` sectors.
    fixed: Vec<(u64, u64)>,
    /// First sectors of the grain tables kept, sorted (the tables do not overlap).
    tables: Vec<u32>,
    /// Sectors per table.
    gts: u64,
}

impl Metadata {
    /// Whether `[start, end)` (sectors) touches any metadata.
    fn overlaps(&self, start: u64, end: u64) -> bool {
        if self.fixed.iter().any(|&(s, e)| start < e && s < end) {
            return true;
        }
        let k = self.tables.partition_point(|&t| u64::from(t) < end);
        k > 0 && u64::from(self.tables[k - 1]) + self.gts > start
    }
}

/// What merging the two copies of one table found.
#[derive(Default)]
struct TableStats {
    /// Entries whose copies differ.
    differ: u64,
    /// Entries with one copy only, unsound.
    bad: u64,
    /// Entries unsound in both copies.
    lost: u64,
    /// Kept data entries whose grain is cut short by the end of the file.
    cut_short: u64,
}

/// The fixed parameters of one file.
struct Layout {
    n: usize,
    per: usize,
    gts: u64,
    gds: u64,
    g: u64,
    cap_bytes: u64,
    zeroed_ok: bool,
    redundant: bool,
    overhead: u64,
}

/// One grain-table file being checked.
struct GrainCheck<'a> {
    path: &'a Path,
    storage: &'a FileStorage,
    header: GrainHeader,
    l: Layout,
    /// Length of the file when the check began; soundness is judged against it.
    file_len: u64,
    file_sectors: u64,
    opts: &'a CheckOptions,
    report: &'a mut CheckReport,
    /// Next free sector for what repair adds (grain aligned), once known.
    next: u64,
    /// Grain bytes copied so far by repair (bounded).
    copied: u64,
}

/// Checks (and with `opts.repair` repairs) one grain-table file; returns whether
/// anything was written.
pub(super) fn check_grain_file(
    path: &Path,
    storage: &FileStorage,
    header: GrainHeader,
    opts: &CheckOptions,
    report: &mut CheckReport,
) -> Result<bool> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io(format!("{}: cannot read the file size", path.display()), e))?;
    let geometry = match &header {
        GrainHeader::Hosted(h) => h.clone(),
        GrainHeader::Cowd(c) => c.geometry(),
    };
    let l = Layout {
        n: geometry.num_gdes() as usize,
        per: geometry.num_gtes_per_gt as usize,
        gts: geometry.gt_sectors(),
        gds: geometry.gd_sectors(),
        g: geometry.grain_size,
        cap_bytes: geometry.capacity * SECTOR_SIZE,
        zeroed_ok: matches!(header, GrainHeader::Hosted(_)) && geometry.zeroed_gte_enabled(),
        redundant: matches!(header, GrainHeader::Hosted(_)) && geometry.has_redundant_gd(),
        overhead: geometry.overhead,
    };
    if l.n as u64 > MAX_GD_ENTRIES {
        // The header parsers bound this; a second guard costs nothing.
        return Err(Error::invalid(format!(
            "{}: {} grain directory entries exceed the limit",
            path.display(),
            l.n
        )));
    }
    let mut c = GrainCheck {
        path,
        storage,
        header,
        l,
        file_len,
        file_sectors: file_len.div_ceil(SECTOR_SIZE),
        opts,
        report,
        next: 0,
        copied: 0,
    };
    c.run()
}

/// Where a directory's entries come from and go to.
struct Directory {
    /// Entries (0 = no table).
    entries: Vec<u32>,
    /// Entries cleared by the check (their table place was unusable).
    cleared: Bits,
    /// The directory's region was usable.
    place_ok: bool,
    /// Where it is (or, after repair, will be) written.
    offset: u64,
    /// An entry differs from what the file holds.
    changed: bool,
}

/// Both directories (the redundant one empty in files without it).
struct Dirs {
    gd: Directory,
    rgd: Directory,
}

/// What the passes over the tables go by.
struct Plan {
    meta: Metadata,
    /// Grain slots both copies agree on (None: not used, see `survey`).
    agreed: Option<Bits>,
    /// Length the file needs (a grain cut short is extended), in bytes.
    extend_to: u64,
}

/// Sector ranges `[start, end)`.
type Regions = Vec<(u64, u64)>;

/// Copies of one table as read: primary and redundant.
type Copies = (Option<Vec<u32>>, Option<Vec<u32>>);

impl GrainCheck<'_> {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn fixable(&mut self, problem: String, repair: &str) {
        self.report
            .push(Finding::fixable(self.path, problem, repair.to_string()));
    }

    fn lost(&mut self, problem: String) {
        // Data no copy describes cannot come back, but the file can be made
        // consistent again: repairable, saying what is lost.
        self.fixable(
            problem,
            "clear the entries (their data is lost and reads as zeros)",
        );
    }

    fn io(&self, what: &str) -> impl Fn(std::io::Error) -> Error {
        let what = format!("{}: {what}", self.name());
        move |e| Error::io(what.clone(), e)
    }

    /// Bytes of grain `grain` inside the capacity.
    fn valid_bytes(&self, grain: u64) -> u64 {
        let gb = self.l.g * SECTOR_SIZE;
        gb.min(self.l.cap_bytes.saturating_sub(grain.saturating_mul(gb)))
    }

    /// Whether entry `x` of grain `grain` can be right: unallocated, a permitted
    /// zeroed grain, or a grain starting inside the file and clear of all metadata.
    fn sound(&self, meta: &Metadata, x: u32, grain: u64) -> bool {
        match x {
            GTE_UNALLOCATED => true,
            GTE_ZEROED if self.l.zeroed_ok => true,
            _ => {
                let s = u64::from(x);
                let valid = self.valid_bytes(grain);
                valid > 0
                    && s * SECTOR_SIZE < self.file_len
                    && !meta.overlaps(s, s + valid.div_ceil(SECTOR_SIZE))
            }
        }
    }

    fn is_data(&self, x: u32) -> bool {
        x > GTE_ZEROED || (x == GTE_ZEROED && !self.l.zeroed_ok)
    }

    /// Sectors at the end of the file reserved for what repair adds.
    fn allocate(&mut self, sectors: u64) -> Result<u32> {
        let s = self.next;
        let g = self.l.g;
        self.next = (self.next + sectors).div_ceil(g) * g;
        if self.next > MAX_SPARSE_FILE_SECTORS {
            return Err(Error::new(
                ErrorKind::FileTooBig,
                format!("{}: repair would grow the file beyond 2 TiB", self.name()),
            ));
        }
        Ok(s as u32)
    }

    fn fixed_regions(&self) -> Vec<(u64, u64)> {
        match &self.header {
            GrainHeader::Hosted(h) => {
                let mut v = vec![(0, 1)];
                if h.descriptor_offset != 0 {
                    v.push((
                        h.descriptor_offset,
                        h.descriptor_offset.saturating_add(h.descriptor_size),
                    ));
                }
                v
            }
            GrainHeader::Cowd(_) => vec![(0, 4)],
        }
    }

    /// Whether a directory region at `start` is usable next to `taken`.
    fn dir_region_ok(&self, start: u64, taken: &[(u64, u64)]) -> bool {
        let end = start.saturating_add(self.l.gds);
        start != 0
            && end.saturating_mul(SECTOR_SIZE) <= self.file_len
            && !taken.iter().any(|&(s, e)| start < e && s < end)
    }

    fn run(&mut self) -> Result<bool> {
        let mut header_dirty = false;
        if self.unclean() {
            self.fixable(
                "the extent was not closed cleanly (uncleanShutdown is set)".to_string(),
                "clear the flag once the tables are consistent",
            );
            header_dirty = true;
        }
        let Some((mut dirs, fixed)) = self.read_directories()? else {
            return Ok(false);
        };
        self.clear_bad_table_places(&mut dirs, &fixed);
        let tables = self.dedupe_tables(&mut dirs);
        let meta = Metadata {
            fixed,
            tables,
            gts: self.l.gts,
        };

        // Survey: where the data ends, and which grains both copies agree on.
        let slots = self.file_sectors.div_ceil(self.l.g);
        let (agreed, data_end) = self.survey(&meta, &dirs, slots)?;
        let plan = Plan {
            meta,
            agreed,
            extend_to: data_end.max(self.file_len),
        };
        // What repair adds goes after everything an entry names.
        let g = self.l.g;
        self.next = self
            .file_sectors
            .max(data_end.div_ceil(SECTOR_SIZE))
            .max(self.l.overhead)
            .div_ceil(g)
            * g;
        header_dirty |= self.check_free_sector(&plan.meta, data_end);

        // Repair: the file extended over cut grains, new places for directories.
        let repair = self.opts.repair;
        if repair {
            if plan.extend_to > self.file_len {
                self.storage
                    .set_len(plan.extend_to)
                    .map_err(self.io("cannot extend the file"))?;
            }
            if !dirs.gd.place_ok {
                dirs.gd.offset = u64::from(self.allocate(self.l.gds)?);
            }
            if self.l.redundant && !dirs.rgd.place_ok {
                dirs.rgd.offset = u64::from(self.allocate(self.l.gds)?);
            }
        }

        // Passes over the tables, one window of grain slots at a time for the check
        // of shared grains.
        let mut writer = Writer::default();
        let window = self.opts.bitmap_bits.max(64);
        let mut w = 0u64;
        let mut first_pass = true;
        loop {
            let end = (w + window).min(slots.max(1));
            self.table_pass(&plan, &mut dirs, (w, end), first_pass, &mut writer)?;
            if repair {
                writer.flush(self)?;
            }
            first_pass = false;
            w = end;
            if w >= slots {
                break;
            }
        }
        if !repair {
            return Ok(false);
        }
        self.finish(&dirs, &writer, plan.extend_to, header_dirty)
    }

    fn unclean(&self) -> bool {
        match &self.header {
            GrainHeader::Hosted(h) => h.unclean_shutdown,
            GrainHeader::Cowd(c) => c.unclean_shutdown,
        }
    }

    /// Where the directories are and what they hold; None (after a finding) when
    /// no copy of the directory lies inside the file. Also the fixed metadata
    /// (header, descriptor, the usable directories), sorted.
    fn read_directories(&mut self) -> Result<Option<(Dirs, Regions)>> {
        let mut fixed = self.fixed_regions();
        let (gd_offset, rgd_offset) = match &self.header {
            GrainHeader::Hosted(h) => (h.gd_offset, h.rgd_offset),
            GrainHeader::Cowd(c) => (u64::from(c.gd_offset), 0),
        };
        let gd_ok = self.dir_region_ok(gd_offset, &fixed);
        let mut taken = fixed.clone();
        if gd_ok {
            taken.push((gd_offset, gd_offset + self.l.gds));
        }
        let rgd_ok = self.l.redundant && self.dir_region_ok(rgd_offset, &taken);
        if !gd_ok && !rgd_ok {
            let problem = if self.l.redundant {
                format!(
                    "neither the grain directory (sector {gd_offset}) nor its redundant copy (sector {rgd_offset}) lies inside the file, clear of other metadata"
                )
            } else {
                format!(
                    "the grain directory (sector {gd_offset}) does not lie inside the file, clear of the header"
                )
            };
            self.report.push(Finding::fatal(self.path, problem));
            return Ok(None);
        }
        if !gd_ok {
            self.fixable(
                format!(
                    "the grain directory at sector {gd_offset} lies outside the file or over other metadata"
                ),
                "rebuild it from the redundant directory at the end of the file",
            );
        }
        if self.l.redundant && !rgd_ok {
            self.fixable(
                format!(
                    "the redundant grain directory at sector {rgd_offset} lies outside the file or over other metadata"
                ),
                "rebuild it from the grain directory at the end of the file",
            );
        }
        let n = if self.l.redundant { self.l.n } else { 0 };
        let dirs = Dirs {
            gd: self.read_directory(gd_ok, gd_offset, self.l.n, "grain directory")?,
            rgd: self.read_directory(rgd_ok, rgd_offset, n, "redundant grain directory")?,
        };
        if gd_ok {
            fixed.push((gd_offset, gd_offset + self.l.gds));
        }
        if rgd_ok {
            fixed.push((rgd_offset, rgd_offset + self.l.gds));
        }
        fixed.sort_unstable();
        Ok(Some((dirs, fixed)))
    }

    /// A directory of `n` entries at `offset` (all empty when its place is unusable).
    fn read_directory(&self, ok: bool, offset: u64, n: usize, what: &str) -> Result<Directory> {
        let entries = if ok {
            read_u32s(self.storage, offset, n, what).map_err(|e| e.within(self.name()))?
        } else {
            vec![0; n]
        };
        Ok(Directory {
            entries,
            cleared: Bits::new(n as u64),
            place_ok: ok,
            offset,
            changed: false,
        })
    }

    /// Clears directory entries whose table is not inside the file, clear of the
    /// fixed metadata.
    fn clear_bad_table_places(&mut self, dirs: &mut Dirs, fixed: &[(u64, u64)]) {
        for (dir, what) in [
            (&mut dirs.gd, "grain directory"),
            (&mut dirs.rgd, "redundant grain directory"),
        ] {
            let mut bad = 0u64;
            let mut first = None;
            for (i, e) in dir.entries.iter_mut().enumerate() {
                if *e == 0 {
                    continue;
                }
                let s = u64::from(*e);
                let end = s + self.l.gts;
                if end * SECTOR_SIZE > self.file_len || fixed.iter().any(|&(a, b)| s < b && a < end)
                {
                    first.get_or_insert((i, *e));
                    bad += 1;
                    *e = 0;
                    dir.changed = true;
                    dir.cleared.set(i as u64);
                }
            }
            if let Some((i, e)) = first {
                self.fixable(
                    format!(
                        "{bad} {what} entries point outside the file or into other metadata (entry {i}: sector {e})"
                    ),
                    "rebuild those tables from their other copies",
                );
            }
        }
    }

    /// COWD files record the next free sector: it must lie past everything in use.
    /// Returns whether the header needs rewriting.
    fn check_free_sector(&mut self, meta: &Metadata, data_end: u64) -> bool {
        let GrainHeader::Cowd(c) = &self.header else {
            return false;
        };
        let free = c.free_sector;
        let used = self.used_end(meta, data_end);
        if u64::from(free) >= used {
            return false;
        }
        self.fixable(
            format!(
                "the next free sector recorded in the header ({free}) lies inside allocated data or tables (used up to sector {used})"
            ),
            "record the end of the allocated space",
        );
        true
    }

    /// The end of a repair: the file's new length, the directories, the header, each
    /// synced before the next. Returns whether anything was written.
    fn finish(
        &mut self,
        dirs: &Dirs,
        writer: &Writer,
        extend_to: u64,
        header_dirty: bool,
    ) -> Result<bool> {
        let redundant = self.l.redundant;
        let dirs_changed = dirs.gd.changed
            || (redundant && dirs.rgd.changed)
            || !dirs.gd.place_ok
            || (redundant && !dirs.rgd.place_ok);
        let new_end = (self.next * SECTOR_SIZE).max(extend_to);
        if !writer.wrote && !dirs_changed && !header_dirty && new_end == self.file_len {
            return Ok(false);
        }
        let len = self
            .storage
            .len()
            .map_err(self.io("cannot read the size"))?;
        if new_end > len {
            self.storage
                .set_len(new_end)
                .map_err(self.io("cannot extend the file"))?;
        }
        self.sync()?;
        if dirs_changed {
            let gds = self.l.gds;
            let d = &dirs.gd;
            write_u32s(self.storage, d.offset, &d.entries, gds, "grain directory")?;
            if redundant {
                let r = &dirs.rgd;
                write_u32s(
                    self.storage,
                    r.offset,
                    &r.entries,
                    gds,
                    "redundant grain directory",
                )?;
            }
            self.sync()?;
        }
        let bytes = match &self.header {
            GrainHeader::Hosted(h) => {
                let mut h = h.clone();
                h.unclean_shutdown = false;
                h.gd_offset = dirs.gd.offset;
                if redundant {
                    h.rgd_offset = dirs.rgd.offset;
                }
                h.to_bytes().to_vec()
            }
            GrainHeader::Cowd(c) => {
                let mut c = c.clone();
                c.unclean_shutdown = false;
                let end = u32::try_from(new_end.div_ceil(SECTOR_SIZE)).unwrap_or(u32::MAX);
                c.free_sector = c.free_sector.max(end);
                c.to_bytes()
            }
        };
        self.storage
            .write_all_at(&bytes, 0)
            .map_err(self.io("cannot write the header"))?;
        self.sync()?;
        Ok(true)
    }

    fn sync(&self) -> Result<()> {
        self.storage.sync().map_err(self.io("sync failed"))
    }

    /// The end (in sectors) of everything the file uses: tables, directories, data.
    fn used_end(&self, meta: &Metadata, data_end: u64) -> u64 {
        let tables = meta.tables.last().map_or(0, |&t| u64::from(t) + self.l.gts);
        let fixed = meta.fixed.iter().map(|r| r.1).max().unwrap_or(0);
        tables.max(fixed).max(data_end.div_ceil(SECTOR_SIZE))
    }

    /// Clears directory entries whose table place another entry uses too (or
    /// overlaps): the lowest place, and of equal places the first entry (primary
    /// before redundant), keeps it. Returns the sorted starts of the tables kept.
    fn dedupe_tables(&mut self, dirs: &mut Dirs) -> Vec<u32> {
        let gts = self.l.gts;
        let Dirs { gd, rgd } = dirs;
        // (start, entry * 2 + redundant): at most 2 * 4 Mi pairs (64 MiB) while sorting.
        let mut places: Vec<(u32, u32)> = Vec::new();
        for (d, r) in [(&*gd, 0u32), (&*rgd, 1u32)] {
            for (i, &e) in d.entries.iter().enumerate() {
                if e != 0 {
                    places.push((e, i as u32 * 2 + r));
                }
            }
        }
        places.sort_unstable();
        let mut kept: Vec<u32> = Vec::with_capacity(places.len());
        let mut end = 0u64;
        let mut shared = [0u64; 2];
        let mut example = None;
        for &(s, key) in &places {
            if u64::from(s) < end {
                let (i, r) = ((key / 2) as usize, (key % 2) as usize);
                let d = if r == 0 { &mut *gd } else { &mut *rgd };
                d.entries[i] = 0;
                d.changed = true;
                d.cleared.set(i as u64);
                shared[r] += 1;
                example.get_or_insert((i, s, r));
            } else {
                kept.push(s);
                end = u64::from(s) + gts;
            }
        }
        drop(places);
        if let Some((i, s, r)) = example {
            let what = if r == 0 {
                "grain directory"
            } else {
                "redundant grain directory"
            };
            self.fixable(
                format!(
                    "{} directory entries point to grain tables another entry uses too (e.g. {what} entry {i}: sector {s})",
                    shared[0] + shared[1]
                ),
                "give each its own table, rebuilt from its other copy",
            );
        }
        kept
    }

    /// Reads the copies of table `i` the directories still name.
    fn read_copies(&self, dirs: &Dirs, i: usize) -> Result<Copies> {
        let read = |e: u32| -> Result<Option<Vec<u32>>> {
            if e == 0 {
                return Ok(None);
            }
            read_u32s(self.storage, u64::from(e), self.l.per, "grain table")
                .map(Some)
                .map_err(|err| err.within(self.name()))
        };
        let p = read(dirs.gd.entries[i])?;
        let r = if self.l.redundant {
            read(dirs.rgd.entries[i])?
        } else {
            None
        };
        Ok((p, r))
    }

    /// One pass over every table: where the data ends (bytes; the end of the last
    /// grain an entry starts inside the file), and, for files with two copies, the
    /// grain slots both copies agree on (None when the file has more slots than the
    /// bitmap budget: the agreement rule is then not used).
    fn survey(&self, meta: &Metadata, dirs: &Dirs, slots: u64) -> Result<(Option<Bits>, u64)> {
        let mut agreed =
            (self.l.redundant && slots <= self.opts.bitmap_bits).then(|| Bits::new(slots));
        let gb = self.l.g * SECTOR_SIZE;
        let mut data_end = 0u64;
        for i in 0..self.l.n {
            let (pt, rt) = self.read_copies(dirs, i)?;
            if pt.is_none() && rt.is_none() {
                continue;
            }
            for j in 0..self.l.per {
                let grain = (i * self.l.per + j) as u64;
                let a = pt.as_ref().map(|t| t[j]);
                let b = rt.as_ref().map(|t| t[j]);
                for x in [a, b].into_iter().flatten() {
                    let s = u64::from(x) * SECTOR_SIZE;
                    if self.is_data(x) && s < self.file_len && self.valid_bytes(grain) > 0 {
                        data_end = data_end.max(
                            s + gb.min(self.valid_bytes(grain).div_ceil(SECTOR_SIZE) * SECTOR_SIZE),
                        );
                    }
                }
                let x = match (a, b) {
                    (Some(x), Some(y)) if x == y => x,
                    (Some(x), None) | (None, Some(x)) => x,
                    _ => continue,
                };
                if let Some(bits) = agreed.as_mut() {
                    if self.is_data(x) && self.sound(meta, x, grain) {
                        bits.set(u64::from(x) / self.l.g);
                    }
                }
            }
        }
        Ok((agreed, data_end))
    }

    /// The entries of table `i` repair keeps, from its two copies.
    fn merge(
        &self,
        meta: &Metadata,
        agreed: Option<&Bits>,
        i: usize,
        pt: Option<&[u32]>,
        rt: Option<&[u32]>,
        stats: &mut TableStats,
    ) -> Vec<u32> {
        let mut merged = vec![GTE_UNALLOCATED; self.l.per];
        for (j, slot) in merged.iter_mut().enumerate() {
            let grain = (i * self.l.per + j) as u64;
            let sound = |x: u32| self.sound(meta, x, grain);
            let clash =
                |x: u32| self.is_data(x) && agreed.is_some_and(|b| b.get(u64::from(x) / self.l.g));
            let pick = match (pt.map(|t| t[j]), rt.map(|t| t[j])) {
                (Some(x), Some(y)) if x == y => {
                    if sound(x) {
                        x
                    } else {
                        stats.lost += 1;
                        GTE_UNALLOCATED
                    }
                }
                (Some(x), Some(y)) => {
                    stats.differ += 1;
                    match (sound(x) && !clash(x), sound(y) && !clash(y)) {
                        (true, true) if x == GTE_UNALLOCATED => y,
                        (true, _) => x,
                        (false, true) => y,
                        (false, false) => {
                            stats.lost += 1;
                            GTE_UNALLOCATED
                        }
                    }
                }
                (Some(x), None) | (None, Some(x)) => {
                    if sound(x) {
                        x
                    } else {
                        stats.bad += 1;
                        GTE_UNALLOCATED
                    }
                }
                (None, None) => GTE_UNALLOCATED,
            };
            if self.is_data(pick)
                && u64::from(pick) * SECTOR_SIZE + self.valid_bytes(grain) > self.file_len
            {
                stats.cut_short += 1;
            }
            *slot = pick;
        }
        merged
    }

    fn report_table(&mut self, i: usize, st: &TableStats) {
        if st.differ > 0 {
            self.fixable(
                format!(
                    "grain table {i}: {} entries differ from the redundant copy",
                    st.differ
                ),
                "keep the sound entry of each pair in both copies",
            );
        }
        if st.bad > 0 {
            self.lost(format!(
                "grain table {i}: {} entries point outside the file or into metadata and have no sound copy",
                st.bad
            ));
        }
        if st.lost > 0 {
            self.lost(format!(
                "grain table {i}: {} entries are unsound in both copies",
                st.lost
            ));
        }
        if st.cut_short > 0 {
            self.fixable(
                format!(
                    "grain table {i}: {} grains are cut short by the end of the file",
                    st.cut_short
                ),
                "extend the file (the missing part reads as zeros)",
            );
        }
    }

    /// One pass over the tables. The first pass merges the two copies of each table,
    /// reports what differs and (repairing) gives tables without a usable place a new
    /// one; every pass checks the grains of its `window` of grain slots for entries
    /// that share them (repair copies the grain for the later entry, or clears it
    /// once the copy budget is spent). Repairs go to `writer`.
    fn table_pass(
        &mut self,
        plan: &Plan,
        dirs: &mut Dirs,
        window: (u64, u64),
        first_pass: bool,
        writer: &mut Writer,
    ) -> Result<()> {
        let repair = self.opts.repair;
        let redundant = self.l.redundant;
        let mut used = Bits::new(window.1 - window.0);
        for i in 0..self.l.n {
            let (gd, rgd) = (&dirs.gd, &dirs.rgd);
            let needed = gd.entries[i] != 0
                || gd.cleared.get(i as u64)
                || (redundant && (rgd.entries[i] != 0 || rgd.cleared.get(i as u64)));
            // Later passes of a repair: the first gave every table it kept a place.
            if !needed || (repair && !first_pass && gd.entries[i] == 0) {
                continue;
            }
            let (mut table, mut changed) = if first_pass || !repair {
                self.merged_table(plan, dirs, i, first_pass)?
            } else {
                // Later passes of a repair read the table as the first pass wrote it.
                let t = read_u32s(
                    self.storage,
                    u64::from(gd.entries[i]),
                    self.l.per,
                    "grain table",
                )
                .map_err(|e| e.within(self.name()))?;
                (t, false)
            };
            changed |= self.unshare_grains(i, &mut table, window, &mut used, writer)?;
            if repair {
                self.place_table(dirs, i, table, changed, writer)?;
            }
        }
        Ok(())
    }

    /// Table `i` as repair keeps it, merged from its copies, and whether that differs
    /// from what the file holds; the first pass also reports what it found.
    fn merged_table(
        &mut self,
        plan: &Plan,
        dirs: &Dirs,
        i: usize,
        first_pass: bool,
    ) -> Result<(Vec<u32>, bool)> {
        let (pt, rt) = self.read_copies(dirs, i)?;
        let mut st = TableStats::default();
        let merged = self.merge(
            &plan.meta,
            plan.agreed.as_ref(),
            i,
            pt.as_deref(),
            rt.as_deref(),
            &mut st,
        );
        if first_pass {
            if pt.is_none() && rt.is_none() {
                self.lost(format!(
                    "grain table {i} has no sound copy; the grains it mapped are lost"
                ));
            }
            self.report_table(i, &st);
            if self.l.redundant {
                self.note_missing_copy(dirs, i);
            }
        }
        let differs = pt.as_deref() != Some(&merged[..])
            || (self.l.redundant && rt.as_deref() != Some(&merged[..]));
        Ok((merged, first_pass && differs))
    }

    /// Finds the entries of `table` (number `i`) whose grain, in the `window` of
    /// grain slots, an earlier entry uses (`used`); repair gives each a copy of the
    /// grain at the end of the file, or clears it once the copy budget (the file's
    /// size, at least 64 MiB) is spent. Returns whether the table changed.
    fn unshare_grains(
        &mut self,
        i: usize,
        table: &mut [u32],
        window: (u64, u64),
        used: &mut Bits,
        writer: &mut Writer,
    ) -> Result<bool> {
        let g = self.l.g;
        let gb = g * SECTOR_SIZE;
        let budget = self.file_len.max(64 << 20);
        let (mut shared, mut dropped) = (0u64, 0u64);
        for entry in table.iter_mut() {
            let x = *entry;
            if !self.is_data(x) {
                continue;
            }
            let slot = u64::from(x) / g;
            if slot < window.0 || slot >= window.1 {
                continue;
            }
            if !used.get(slot - window.0) {
                used.set(slot - window.0);
                continue;
            }
            shared += 1;
            if !self.opts.repair {
                continue;
            }
            if self.copied + gb > budget {
                *entry = GTE_UNALLOCATED;
                dropped += 1;
                continue;
            }
            let to = self.allocate(g)?;
            let s = u64::from(x);
            let mut buf = vec![0u8; gb as usize];
            let have = gb.min(self.file_len.saturating_sub(s * SECTOR_SIZE)) as usize;
            self.storage
                .read_exact_at(&mut buf[..have], s * SECTOR_SIZE)
                .map_err(self.io("cannot read a grain"))?;
            writer.data(self, u64::from(to) * SECTOR_SIZE, &buf)?;
            self.copied += gb;
            *entry = to;
        }
        if shared > 0 {
            self.fixable(
                format!("grain table {i}: {shared} entries point to grains another entry uses too"),
                "give each entry its own copy of the grain",
            );
        }
        if dropped > 0 {
            self.lost(format!(
                "grain table {i}: {dropped} shared grains were not copied (the copies would grow the file beyond {budget} bytes)"
            ));
        }
        Ok(shared > 0 && self.opts.repair)
    }

    /// Gives table `i` its places (existing ones, or new ones at the end of the
    /// file) and queues it for writing if it `changed`. A table that lost a place
    /// and maps nothing needs no place at all: both directory entries become "no
    /// table" (the range reads unallocated), so a file of millions of lost tables
    /// does not grow by as many new ones.
    fn place_table(
        &mut self,
        dirs: &mut Dirs,
        i: usize,
        table: Vec<u32>,
        mut changed: bool,
        writer: &mut Writer,
    ) -> Result<()> {
        let redundant = self.l.redundant;
        let Dirs { gd, rgd } = dirs;
        let lost_place = gd.entries[i] == 0 || (redundant && rgd.entries[i] == 0);
        if lost_place && table.iter().all(|&x| x == GTE_UNALLOCATED) {
            gd.entries[i] = 0;
            gd.changed = true;
            if redundant {
                rgd.entries[i] = 0;
                rgd.changed = true;
            }
            return Ok(());
        }
        for (d, on) in [(gd, true), (rgd, redundant)] {
            if on && d.entries[i] == 0 {
                d.entries[i] = self.allocate(self.l.gts)?;
                d.changed = true;
                changed = true;
            }
        }
        if changed {
            let mut places = vec![dirs.gd.entries[i]];
            if redundant {
                places.push(dirs.rgd.entries[i]);
            }
            writer.table(self, places, table)?;
        }
        Ok(())
    }

    /// A table one directory names and the other does not (empty there from the
    /// start, not cleared by the check).
    fn note_missing_copy(&mut self, dirs: &Dirs, i: usize) {
        let Dirs { gd, rgd } = dirs;
        let p_empty = gd.entries[i] == 0 && !gd.cleared.get(i as u64) && gd.place_ok;
        let r_empty = rgd.entries[i] == 0 && !rgd.cleared.get(i as u64) && rgd.place_ok;
        if p_empty && rgd.entries[i] != 0 {
            self.fixable(
                format!("grain directory entry {i} is empty but its redundant copy is not"),
                "restore the table from the redundant copy at the end of the file",
            );
        } else if r_empty && gd.entries[i] != 0 {
            self.fixable(
                format!(
                    "redundant grain directory entry {i} is empty but the grain directory's is not"
                ),
                "restore the redundant table at the end of the file",
            );
        }
    }
}

/// Repairs waiting to be written, in crash order: grain copies are written at once
/// (nothing references them yet); tables are held until [`REPAIR_BATCH_BYTES`] are
/// pending, then the copies are synced and the tables written.
#[derive(Default)]
struct Writer {
    tables: Vec<(Vec<u32>, Vec<u32>)>,
    pending: u64,
    data_unsynced: bool,
    /// Something was written.
    wrote: bool,
}

impl Writer {
    fn data(&mut self, c: &GrainCheck<'_>, at: u64, buf: &[u8]) -> Result<()> {
        c.storage
            .write_all_at(buf, at)
            .map_err(c.io("cannot write a grain copy"))?;
        self.data_unsynced = true;
        self.wrote = true;
        Ok(())
    }

    fn table(&mut self, c: &GrainCheck<'_>, places: Vec<u32>, entries: Vec<u32>) -> Result<()> {
        self.pending += entries.len() as u64 * 4 * places.len() as u64;
        self.tables.push((places, entries));
        if self.pending >= REPAIR_BATCH_BYTES {
            self.flush(c)?;
        }
        Ok(())
    }

    fn flush(&mut self, c: &GrainCheck<'_>) -> Result<()> {
        if self.tables.is_empty() {
            return Ok(());
        }
        if self.data_unsynced {
            c.sync()?;
            self.data_unsynced = false;
        }
        for (places, entries) in self.tables.drain(..) {
            for p in places {
                write_u32s(c.storage, u64::from(p), &entries, c.l.gts, "grain table")?;
            }
        }
        self.pending = 0;
        self.wrote = true;
        Ok(())
    }
}
