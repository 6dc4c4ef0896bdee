//! Checking and repairing a closed disk (vmware-vdiskmanager `-e` / `-R`, VDDK
//! `CheckRepair`).
//!
//! The check reads the files directly instead of opening the disk, so it works on
//! exactly the files the normal open refuses. For each hosted sparse extent it
//! compares the grain directory with its redundant copy and every grain table with
//! its redundant copy, entry by entry, and flags tables or grains that lie past the
//! end of the file, inside metadata, or are shared by two entries, and a set
//! unclean-shutdown flag. Flat extent files shorter than their extent are flagged.
//!
//! Repair takes, for each entry, the copy that is sound (in range, not inside
//! metadata); when both are sound and differ it prefers the one that maps data over
//! one that maps nothing (writers update the primary first, so a crash between the
//! two writes leaves exactly that), and the primary otherwise. Entries sound in
//! neither copy are cleared (that data is lost and reported). New tables and copies
//! of shared grains go to the end of the file. Writes happen in crash-consistent
//! order: data, tables, directories, header. Without `repair`, nothing is written.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::descriptor::{Descriptor, ExtentKind};
use crate::disk::{Disk, RangeKind};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::header::{has_sparse_magic, SparseHeader, GD_AT_END, HEADER_SIZE};
use crate::extent::sparse::offline::{read_u32s, write_u32s, GTE_UNALLOCATED, GTE_ZEROED};
use crate::limits::{MAX_DESCRIPTOR_BYTES, MAX_SPARSE_FILE_SECTORS, SECTOR_SIZE};
use crate::storage::{FileStorage, LockMode, Storage};

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The file it is in.
    pub file: PathBuf,
    /// What is wrong.
    pub problem: String,
    /// What repair did (or, when only checking, would do); None if it cannot be repaired.
    pub repair: Option<String>,
    /// Whether repair can fix it.
    pub repairable: bool,
}

/// The result of [`check`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Every problem found, in file order.
    pub findings: Vec<Finding>,
    /// Whether repairs were written (false when only checking or nothing needed it).
    pub repaired: bool,
}

impl CheckReport {
    /// No problem found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// Problems that remain after this call: all of them when nothing was repaired,
    /// those repair could not fix otherwise.
    pub fn unrepaired(&self) -> usize {
        if self.repaired {
            self.findings.iter().filter(|f| !f.repairable).count()
        } else {
            self.findings.len()
        }
    }
}

/// Checks the closed disk at `path`; with `repair`, fixes what can be fixed. An
/// error means the check itself could not run (no such file, not a VMDK, locked);
/// problems of the disk are findings in the report.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    check_inner(path, repair).map_err(|e| e.within(path.display()))
}

fn check_inner(path: &Path, repair: bool) -> Result<CheckReport> {
    let lock = if repair {
        LockMode::Exclusive
    } else {
        LockMode::Shared
    };
    let mut report = CheckReport {
        findings: Vec::new(),
        repaired: false,
    };
    crate::paths::check_file_type(path, false)?;
    let top = FileStorage::open(path, repair, lock)?;
    let len = top
        .len()
        .map_err(|e| Error::io("cannot read the file size", e))?;
    let mut head = vec![0u8; len.min(HEADER_SIZE as u64) as usize];
    top.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("cannot read", e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut has_stream = false;
    if has_sparse_magic(&head) {
        // Monolithic: the descriptor is inside the extent.
        let header = match parse_header(&head) {
            Ok(h) => h,
            Err(e) => {
                report
                    .findings
                    .push(fatal(path, format!("the sparse header is invalid: {e}")));
                return Ok(report);
            }
        };
        if header.is_compressed() || header.gd_offset == GD_AT_END {
            has_stream = true;
        } else {
            report.repaired |= check_sparse(path, &top, header, repair, &mut report.findings)?;
        }
    } else {
        if len > MAX_DESCRIPTOR_BYTES as u64 {
            return Err(Error::new(
                ErrorKind::IncorrectFileType,
                "not a VMDK: no sparse header, and too large to be a descriptor",
            ));
        }
        let mut text = vec![0u8; len as usize];
        top.read_exact_at(&mut text, 0)
            .map_err(|e| Error::io("cannot read the descriptor", e))?;
        let d = Descriptor::parse(&text).map_err(|e| {
            Error::new(
                ErrorKind::IncorrectFileType,
                format!(
                    "not a valid VMDK descriptor: line {}: {}",
                    e.line, e.message
                ),
            )
        })?;
        for line in d.extents() {
            let Some(name) = line.file.as_deref() else {
                continue;
            };
            let p = dir.join(std::ffi::OsStr::from_bytes(&d.file_name_bytes(name)));
            crate::paths::check_file_type(&p, false)?;
            if !p.exists() {
                report
                    .findings
                    .push(fatal(&p, "the extent file is missing".to_string()));
                continue;
            }
            let storage = FileStorage::open(&p, repair, lock)?;
            match line.kind {
                ExtentKind::Flat | ExtentKind::Vmfs => {
                    let need = (line.offset.unwrap_or(0) + line.sectors) * SECTOR_SIZE;
                    report.repaired |=
                        check_flat(&p, &storage, need, repair, &mut report.findings)?;
                }
                ExtentKind::Sparse => {
                    let mut h = [0u8; HEADER_SIZE];
                    let n = storage
                        .read_at(&mut h, 0)
                        .map_err(|e| Error::io(format!("cannot read {}", p.display()), e))?;
                    if !has_sparse_magic(&h[..n]) {
                        report.findings.push(fatal(
                            &p,
                            "a SPARSE extent file without a sparse (KDMV) header".to_string(),
                        ));
                        continue;
                    }
                    match parse_header(&h[..n]) {
                        Ok(header) if header.is_compressed() || header.gd_offset == GD_AT_END => {
                            has_stream = true
                        }
                        Ok(header) => {
                            report.repaired |=
                                check_sparse(&p, &storage, header, repair, &mut report.findings)?
                        }
                        Err(e) => report
                            .findings
                            .push(fatal(&p, format!("the sparse header is invalid: {e}"))),
                    }
                }
                _ => {}
            }
        }
    }
    drop(top);
    // Whatever the tables say, the disk must open (and, for compressed extents whose
    // grains are only verified by decompressing them, read).
    let verify = if repair {
        report.findings.iter().all(|f| f.repairable)
    } else {
        report.findings.is_empty()
    };
    if verify {
        if let Err(e) = verify_opens(path, has_stream) {
            report
                .findings
                .push(fatal(path, format!("the disk does not read: {e}")));
        }
    }
    Ok(report)
}

/// Opens the disk read-only and, with `read_all`, reads every data range.
fn verify_opens(path: &Path, read_all: bool) -> Result<()> {
    let disk = Disk::open(path)?;
    if !read_all {
        return Ok(());
    }
    let mut buf = vec![0u8; 1 << 20];
    for r in disk.allocation_map(0, disk.capacity())? {
        if r.kind != RangeKind::Data {
            continue;
        }
        let mut off = r.offset;
        while off < r.offset + r.length {
            let n = (r.offset + r.length - off).min(buf.len() as u64) as usize;
            disk.read_at(&mut buf[..n], off)?;
            off += n as u64;
        }
    }
    Ok(())
}

fn parse_header(head: &[u8]) -> Result<SparseHeader> {
    let bytes: &[u8; HEADER_SIZE] = head
        .get(..HEADER_SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::invalid("the file is shorter than a sparse header"))?;
    SparseHeader::parse(bytes)
}

fn fatal(file: &Path, problem: String) -> Finding {
    Finding {
        file: file.to_path_buf(),
        problem,
        repair: None,
        repairable: false,
    }
}

fn fixable(file: &Path, problem: String, repair: String) -> Finding {
    Finding {
        file: file.to_path_buf(),
        problem,
        repair: Some(repair),
        repairable: true,
    }
}

fn check_flat(
    p: &Path,
    storage: &FileStorage,
    need: u64,
    repair: bool,
    out: &mut Vec<Finding>,
) -> Result<bool> {
    let have = storage
        .len()
        .map_err(|e| Error::io(format!("cannot read the size of {}", p.display()), e))?;
    if have >= need {
        return Ok(false);
    }
    out.push(fixable(
        p,
        format!(
            "the flat extent file is {have} bytes, shorter than the {need} bytes its extent needs"
        ),
        format!("extend the file to {need} bytes (the missing part reads as zeros)"),
    ));
    if repair {
        storage
            .set_len(need)
            .and_then(|()| storage.sync())
            .map_err(|e| Error::io(format!("cannot extend {}", p.display()), e))?;
    }
    Ok(repair)
}

/// The state of checking one hosted sparse file.
struct SparseCheck<'a> {
    path: &'a Path,
    storage: &'a FileStorage,
    h: SparseHeader,
    file_len: u64,
    file_sectors: u64,
    repair: bool,
    /// Next free sector for new tables and grains (grain aligned).
    next: u64,
    /// Metadata regions no table or grain may overlap (header, descriptor, directories).
    fixed: Vec<(u64, u64)>,
    out: &'a mut Vec<Finding>,
}

fn check_sparse(
    path: &Path,
    storage: &FileStorage,
    h: SparseHeader,
    repair: bool,
    out: &mut Vec<Finding>,
) -> Result<bool> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io(format!("cannot read the size of {}", path.display()), e))?;
    let file_sectors = file_len.div_ceil(SECTOR_SIZE);
    let g = h.grain_size;
    let next = file_sectors.max(h.overhead).div_ceil(g) * g;
    let mut c = SparseCheck {
        path,
        storage,
        h,
        file_len,
        file_sectors,
        repair,
        next,
        fixed: vec![(0, 1)],
        out,
    };
    c.run()
}

impl SparseCheck<'_> {
    fn note(&mut self, problem: String, repair: String) {
        self.out.push(fixable(self.path, problem, repair));
    }

    fn lost(&mut self, problem: String) {
        // Data that no copy describes any more cannot come back, but the file can be
        // made consistent again: reported as repairable with what is lost.
        self.out.push(fixable(
            self.path,
            problem,
            "clear the entry (its data is lost and reads as zeros)".to_string(),
        ));
    }

    fn io(&self, what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
        let what = format!("{}: {what}", self.path.display());
        move |e| Error::io(what.clone(), e)
    }

    /// Reserves `sectors` at the end of the file.
    fn allocate(&mut self, sectors: u64) -> Result<u32> {
        let s = self.next;
        let g = self.h.grain_size;
        self.next = (self.next + sectors).div_ceil(g) * g;
        if self.next > MAX_SPARSE_FILE_SECTORS {
            return Err(Error::new(
                ErrorKind::FileTooBig,
                "repair would grow the file beyond 2 TiB",
            ));
        }
        Ok(s as u32)
    }

    fn overlaps_fixed(&self, start: u64, end: u64) -> bool {
        self.fixed.iter().any(|&(s, e)| start < e && s < end)
    }

    /// Whether a directory region `[start, start+sectors)` is usable.
    fn dir_region_ok(&self, start: u64, sectors: u64) -> bool {
        start != 0
            && start + sectors <= self.file_sectors
            && !self.overlaps_fixed(start, start + sectors)
    }

    fn run(&mut self) -> Result<bool> {
        let h = self.h.clone();
        if h.descriptor_offset != 0 {
            self.fixed
                .push((h.descriptor_offset, h.descriptor_offset + h.descriptor_size));
        }
        let n = h.num_gdes() as usize;
        let gds = h.gd_sectors();
        let gts = h.gt_sectors();
        let gd_ok = self.dir_region_ok(h.gd_offset, gds);
        let rgd_ok = h.has_redundant_gd()
            && self.dir_region_ok(h.rgd_offset, gds)
            && (h.rgd_offset + gds <= h.gd_offset || h.gd_offset + gds <= h.rgd_offset);
        let gd = if gd_ok {
            Some(read_u32s(self.storage, h.gd_offset, n, "grain directory")?)
        } else {
            None
        };
        let rgd = if rgd_ok {
            Some(read_u32s(
                self.storage,
                h.rgd_offset,
                n,
                "redundant grain directory",
            )?)
        } else {
            None
        };
        if gd_ok {
            self.fixed.push((h.gd_offset, h.gd_offset + gds));
        }
        if rgd_ok {
            self.fixed.push((h.rgd_offset, h.rgd_offset + gds));
        }
        let mut new_header = h.clone();
        let mut header_dirty = false;
        if h.unclean_shutdown {
            self.note(
                "the extent was not closed cleanly (uncleanShutdown is set)".to_string(),
                "clear the flag once the tables are consistent".to_string(),
            );
            new_header.unclean_shutdown = false;
            header_dirty = true;
        }
        if !gd_ok && !rgd_ok {
            self.out.push(fatal(
                self.path,
                format!(
                    "neither the grain directory (sector {}) nor a redundant copy (sector {}) lies inside the file",
                    h.gd_offset, h.rgd_offset
                ),
            ));
            return Ok(false);
        }
        if !gd_ok {
            let at = self.allocate(gds)?;
            self.note(
                format!(
                    "the grain directory at sector {} lies outside the file or over other metadata",
                    h.gd_offset
                ),
                format!("rebuild it from the redundant directory at sector {at}"),
            );
            new_header.gd_offset = u64::from(at);
            self.fixed.push((u64::from(at), u64::from(at) + gds));
            header_dirty = true;
        }
        if h.has_redundant_gd() && !rgd_ok {
            let at = self.allocate(gds)?;
            self.note(
                format!("the redundant grain directory at sector {} lies outside the file or over other metadata", h.rgd_offset),
                format!("rebuild it from the grain directory at sector {at}"),
            );
            new_header.rgd_offset = u64::from(at);
            self.fixed.push((u64::from(at), u64::from(at) + gds));
            header_dirty = true;
        }
        let redundant = h.has_redundant_gd();
        let mut gd = gd.unwrap_or_else(|| vec![0; n]);
        let mut rgd = rgd.unwrap_or_else(|| vec![0; n]);
        let (orig_gd, orig_rgd) = (gd.clone(), rgd.clone());

        // Sound table places: inside the file, off fixed metadata, not shared.
        let table_ok = |c: &Self, e: u32| {
            let s = u64::from(e);
            e != 0 && s + gts <= c.file_sectors && !c.overlaps_fixed(s, s + gts)
        };
        for i in 0..n {
            for (dir, primary, orig) in [(&mut gd, true, &orig_gd), (&mut rgd, false, &orig_rgd)] {
                if !primary && !redundant {
                    continue;
                }
                let e = orig[i];
                if e == 0 {
                    continue;
                }
                if !table_ok(self, e) {
                    dir[i] = 0;
                    let which = if primary {
                        "grain directory"
                    } else {
                        "redundant grain directory"
                    };
                    self.out.push(fixable(
                        self.path,
                        format!("{which} entry {i} points to sector {e}, outside the file or into metadata"),
                        "rebuild the table from its other copy".to_string(),
                    ));
                }
            }
        }
        // A table place used twice (or overlapping another): the first user keeps
        // it, later ones get a fresh table rebuilt from their other copy.
        let mut claimed: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
        let mut starts: Vec<u64> = Vec::new();
        for i in 0..n {
            for (dir, primary) in [(&mut gd, true), (&mut rgd, false)] {
                if dir[i] == 0 {
                    continue;
                }
                let s = u64::from(dir[i]);
                let before = claimed.range(..=s).next_back().is_some_and(|(_, &e)| e > s);
                let after = claimed.range(s..s + gts).next().is_some();
                if before || after {
                    let which = if primary {
                        "grain directory"
                    } else {
                        "redundant grain directory"
                    };
                    self.out.push(fixable(
                        self.path,
                        format!("{which} entry {i} points to a grain table at sector {s} that another entry uses too"),
                        "give it its own table, rebuilt from the other copy".to_string(),
                    ));
                    dir[i] = 0;
                } else {
                    claimed.insert(s, s + gts);
                    starts.push(s);
                }
            }
        }
        let mut tables: Vec<(u64, u64)> = starts.iter().map(|&s| (s, s + gts)).collect();
        tables.extend(self.fixed.iter().copied());
        tables.sort_unstable();

        let per = h.num_gtes_per_gt as usize;
        let g = h.grain_size;
        let gb = h.grain_bytes();
        let cap_bytes = h.capacity * SECTOR_SIZE;
        let zeroed_ok = h.zeroed_gte_enabled();
        // Grains that an entry maps with no disagreement between the two copies.
        let mut agreed = Bitmap::new(self.file_sectors.div_ceil(g));
        for i in 0..n {
            let p = gd[i];
            let r = if redundant { rgd[i] } else { 0 };
            let pt = if p != 0 {
                Some(self.read_table(p, per)?)
            } else {
                None
            };
            let rt = if r != 0 {
                Some(self.read_table(r, per)?)
            } else {
                None
            };
            for j in 0..per {
                let grain = (i * per + j) as u64;
                let valid = gb.min(cap_bytes.saturating_sub(grain * gb));
                let x = match (pt.as_ref().map(|t| t[j]), rt.as_ref().map(|t| t[j])) {
                    (Some(x), Some(y)) if x == y => x,
                    (Some(x), None) | (None, Some(x)) => x,
                    _ => continue,
                };
                let s = u64::from(x);
                if x > GTE_ZEROED
                    && s.is_multiple_of(g)
                    && s / g < agreed.len
                    && entry_sound(x, valid, zeroed_ok, &tables, self.file_len)
                {
                    agreed.set(s / g);
                }
            }
        }
        let mut grain_starts = Bitmap::new(self.file_sectors.div_ceil(g));
        let mut data_writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut table_writes: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut extend_to = self.file_len;
        for i in 0..n {
            let p = gd[i];
            let r = if redundant { rgd[i] } else { 0 };
            if p == 0 && r == 0 && orig_gd[i] == 0 && (orig_rgd[i] == 0 || !redundant) {
                continue;
            }
            let pt = if p != 0 {
                Some(self.read_table(p, per)?)
            } else {
                None
            };
            let rt = if r != 0 {
                Some(self.read_table(r, per)?)
            } else {
                None
            };
            if pt.is_none() && rt.is_none() {
                self.lost(format!(
                    "grain table {i} has no sound copy; the grains it mapped are lost"
                ));
            }
            let mut merged = vec![GTE_UNALLOCATED; per];
            let (mut differ, mut bad, mut lost) = (0u64, 0u64, 0u64);
            for j in 0..per {
                let grain = (i * per + j) as u64;
                let valid = gb.min(cap_bytes.saturating_sub(grain * gb));
                let sound = |x: u32| entry_sound(x, valid, zeroed_ok, &tables, self.file_len);
                // A data entry that lands on a grain the other entries agree on is
                // the damaged one of a pair.
                let clash = |x: u32| {
                    let s = u64::from(x);
                    x > GTE_ZEROED && s.is_multiple_of(g) && s / g < agreed.len && agreed.get(s / g)
                };
                let a = pt.as_ref().map(|t| t[j]);
                let b = rt.as_ref().map(|t| t[j]);
                let pick = match (a, b) {
                    (Some(x), Some(y)) if x == y => {
                        if sound(x) {
                            x
                        } else {
                            lost += 1;
                            0
                        }
                    }
                    (Some(x), Some(y)) => {
                        differ += 1;
                        match (sound(x) && !clash(x), sound(y) && !clash(y)) {
                            (true, true) if x == GTE_UNALLOCATED => y,
                            (true, _) => x,
                            (false, true) => y,
                            (false, false) => {
                                lost += 1;
                                0
                            }
                        }
                    }
                    (Some(x), None) | (None, Some(x)) => {
                        if sound(x) {
                            x
                        } else {
                            bad += 1;
                            0
                        }
                    }
                    (None, None) => 0,
                };
                if pick > GTE_ZEROED || (pick == GTE_ZEROED && !zeroed_ok) {
                    let s = u64::from(pick);
                    // A grain cut short by the end of the file.
                    let end = s * SECTOR_SIZE + valid;
                    if end > self.file_len {
                        self.note(
                            format!("grain table {i} entry {j}: the grain at sector {s} is cut short by the end of the file"),
                            "extend the file (the missing part reads as zeros)".to_string(),
                        );
                        extend_to = extend_to.max(s * SECTOR_SIZE + gb);
                    }
                    if s.is_multiple_of(g) && s / g < grain_starts.len {
                        if grain_starts.get(s / g) {
                            let to = self.allocate(g)?;
                            self.note(
                                format!("grain table {i} entry {j}: sector {s} is used by another grain too"),
                                format!("copy the grain to sector {to}"),
                            );
                            if self.repair {
                                let mut buf = vec![0u8; gb as usize];
                                let have =
                                    gb.min(self.file_len.saturating_sub(s * SECTOR_SIZE)) as usize;
                                self.storage
                                    .read_exact_at(&mut buf[..have], s * SECTOR_SIZE)
                                    .map_err(self.io("cannot read a grain"))?;
                                data_writes.push((u64::from(to) * SECTOR_SIZE, buf));
                            }
                            merged[j] = to;
                            continue;
                        }
                        grain_starts.set(s / g);
                    }
                }
                merged[j] = pick;
            }
            if differ > 0 {
                self.note(
                    format!("grain table {i}: {differ} entries differ from the redundant copy"),
                    "keep the sound entry of each pair in both copies".to_string(),
                );
            }
            if bad > 0 {
                self.lost(format!(
                    "grain table {i}: {bad} entries point outside the file or into metadata and have no sound copy"
                ));
            }
            if lost > 0 {
                self.lost(format!(
                    "grain table {i}: {lost} entries are unsound in both copies"
                ));
            }
            // Places for the merged table: existing ones, or new ones.
            let mut changed_dir = false;
            if gd[i] == 0 {
                gd[i] = self.allocate(gts)?;
                changed_dir = true;
                if orig_gd[i] == 0 && gd_ok {
                    self.note(
                        format!("grain directory entry {i} is empty but its redundant copy is not"),
                        format!("restore the table at sector {}", gd[i]),
                    );
                }
            }
            if redundant && rgd[i] == 0 {
                rgd[i] = self.allocate(gts)?;
                changed_dir = true;
                if orig_rgd[i] == 0 && rgd_ok {
                    self.note(
                        format!("redundant grain directory entry {i} is empty but the grain directory's is not"),
                        format!("restore the table at sector {}", rgd[i]),
                    );
                }
            }
            let need_write = changed_dir
                || pt.as_ref() != Some(&merged)
                || (redundant && rt.as_ref() != Some(&merged));
            if need_write {
                table_writes.push((gd[i], merged.clone()));
                if redundant {
                    table_writes.push((rgd[i], merged));
                }
            }
        }
        if !self.repair {
            return Ok(false);
        }
        let dirs_changed =
            gd != orig_gd || (redundant && rgd != orig_rgd) || !gd_ok || (redundant && !rgd_ok);
        if data_writes.is_empty()
            && table_writes.is_empty()
            && !dirs_changed
            && !header_dirty
            && extend_to == self.file_len
        {
            return Ok(false);
        }
        let end = (self.next * SECTOR_SIZE).max(extend_to);
        if end > self.file_len {
            self.storage
                .set_len(end)
                .map_err(self.io("cannot extend the file"))?;
        }
        for (at, buf) in &data_writes {
            self.storage
                .write_all_at(buf, *at)
                .map_err(self.io("cannot write a grain"))?;
        }
        self.storage.sync().map_err(self.io("sync failed"))?;
        for (at, entries) in &table_writes {
            write_u32s(self.storage, u64::from(*at), entries, gts, "grain table")?;
        }
        self.storage.sync().map_err(self.io("sync failed"))?;
        if dirs_changed {
            write_u32s(
                self.storage,
                new_header.gd_offset,
                &gd,
                gds,
                "grain directory",
            )?;
            if redundant {
                write_u32s(
                    self.storage,
                    new_header.rgd_offset,
                    &rgd,
                    gds,
                    "redundant grain directory",
                )?;
            }
            self.storage.sync().map_err(self.io("sync failed"))?;
        }
        if header_dirty || new_header != h {
            self.storage
                .write_all_at(&new_header.to_bytes(), 0)
                .and_then(|()| self.storage.sync())
                .map_err(self.io("cannot write the header"))?;
        }
        Ok(true)
    }

    fn read_table(&self, sector: u32, per: usize) -> Result<Vec<u32>> {
        read_u32s(self.storage, u64::from(sector), per, "grain table")
    }
}

/// Whether a grain table entry can be right: unallocated, a permitted zeroed grain,
/// or data starting inside the file and clear of all metadata (`tables`, sorted).
fn entry_sound(x: u32, valid: u64, zeroed_ok: bool, tables: &[(u64, u64)], file_len: u64) -> bool {
    match x {
        GTE_UNALLOCATED => true,
        GTE_ZEROED if zeroed_ok => true,
        _ => {
            let s = u64::from(x);
            let end = s + valid.div_ceil(SECTOR_SIZE).max(1);
            let k = tables.partition_point(|t| t.0 < end);
            valid > 0 && s * SECTOR_SIZE < file_len && !(k > 0 && tables[k - 1].1 > s)
        }
    }
}

/// One bit per grain slot of a file.
struct Bitmap {
    bits: Vec<u64>,
    len: u64,
}

impl Bitmap {
    fn new(len: u64) -> Bitmap {
        Bitmap {
            bits: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    fn get(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u64) {
        self.bits[(i / 64) as usize] |= 1 << (i % 64);
    }
}
